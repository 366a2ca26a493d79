"""What a snapshot costs (flashdreams.snapshot): taking one and restoring it, on the device and through host
memory, for a full-size model, and that the restored session continues bit for bit.

In one process, on one session past its first blocks (so on CUDA its block kinds are captured):

1. the snapshot's size (the KV ring dominates);
2. ms to take it on the device, and into host memory (GB/s): pageable memory allocated per snapshot, and
   page-locked memory (`pinned=True`: the first call, which allocates, then into the same memory with
   `into=`);
3. ms to restore it from the device, from pageable host memory and from page-locked host memory;
4. ms of one steady block, for scale;
5. the block after a restore against the block the session made right after the snapshot: equal bit for
   bit (max abs difference of the latents and frames, 0 expected).

    python bench/snapshot_bench.py --preset self-forcing-1.3b --random-weights --attention triton \\
        --decoder taehv --out snapshot.json

CPU smoke: `python bench/snapshot_bench.py --preset tiny --repeats 2`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def _block(session) -> tuple[torch.Tensor, torch.Tensor | None]:
    r = session.step()
    frames = None if r.frames is None else r.frames.clone()
    return r.latents.clone(), frames


def _max_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    if a is None or b is None:
        return None
    return float((a.float() - b.float()).abs().max())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--attention")
    ap.add_argument("--decoder")
    ap.add_argument("--device")
    ap.add_argument("--warm-blocks", type=int, default=3, help="blocks before the snapshot (captured on CUDA)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="snapshot.json")
    a = ap.parse_args()

    import flashdreams
    from flashdreams.benchmark.environment import environment, time_calls_ms

    kw = {"preset": a.preset, "attention": a.attention, "decoder": a.decoder, "device": a.device}
    kw = {k: v for k, v in kw.items() if v is not None}
    if a.random_weights:
        kw["random_weights"] = True
    engine = flashdreams.load(**kw)
    device = engine.device
    session = engine.session(inputs=engine.default_inputs(seed=1), seed=0)
    for _ in range(a.warm_blocks):
        session.step()
    result: dict = {"environment": environment(device), "config": {**kw, "warm_blocks": a.warm_blocks}}
    result["block_ms"] = time_calls_ms(lambda: session.step(), device, a.repeats)

    snap = session.snapshot()
    host = session.snapshot(device="cpu")
    after_snapshot = _block(session)  # the block that follows the snapshot's point
    result["snapshot_bytes"] = snap.nbytes
    result["take_device_ms"] = time_calls_ms(lambda: session.snapshot(), device, a.repeats)
    result["take_host_ms"] = time_calls_ms(lambda: session.snapshot(device="cpu"), device, a.repeats)
    pinned: list = []
    result["take_pinned_first_ms"] = time_calls_ms(
        lambda: pinned.append(session.snapshot(device="cpu", pinned=True)), device, 1
    )
    result["take_pinned_into_ms"] = time_calls_ms(lambda: session.snapshot(into=pinned[0]), device, a.repeats)
    result["restore_device_ms"] = time_calls_ms(lambda: session.restore(snap), device, a.repeats)
    session.snapshot(into=pinned[0])  # back at the snapshot's point (restored from `snap` above)
    result["restore_pinned_ms"] = time_calls_ms(lambda: session.restore(pinned[0]), device, a.repeats)
    again_pinned = _block(session)
    result["restore_host_ms"] = time_calls_ms(lambda: session.restore(host), device, a.repeats)
    again = _block(session)  # after the last restore (from host memory): the same block again
    session.restore(snap)
    again_device = _block(session)
    result["restored_block_max_abs_diff"] = {
        "from_host": {
            "latents": _max_diff(again[0], after_snapshot[0]),
            "frames": _max_diff(again[1], after_snapshot[1]),
        },
        "from_pinned": {
            "latents": _max_diff(again_pinned[0], after_snapshot[0]),
            "frames": _max_diff(again_pinned[1], after_snapshot[1]),
        },
        "from_device": {
            "latents": _max_diff(again_device[0], after_snapshot[0]),
            "frames": _max_diff(again_device[1], after_snapshot[1]),
        },
    }
    gb = snap.nbytes / 1e9
    result["take_host_gbps"] = gb / (_median(result["take_host_ms"]) / 1e3)
    result["restore_host_gbps"] = gb / (_median(result["restore_host_ms"]) / 1e3)
    result["take_pinned_into_gbps"] = gb / (_median(result["take_pinned_into_ms"]) / 1e3)
    result["restore_pinned_gbps"] = gb / (_median(result["restore_pinned_ms"]) / 1e3)

    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    size, block = snap.nbytes / 2**30, _median(result["block_ms"])
    print(f"{engine.preset_name} on {device}: snapshot {size:.3f} GiB, block {block:.1f} ms")
    for what in ("take_device", "take_host", "take_pinned_first", "take_pinned_into"):
        print(f"  {what:18s} {_median(result[what + '_ms']):9.2f} ms")
    for what in ("restore_device", "restore_host", "restore_pinned"):
        print(f"  {what:18s} {_median(result[what + '_ms']):9.2f} ms")
    print(f"  to/from pageable host    {result['take_host_gbps']:.1f} / {result['restore_host_gbps']:.1f} GB/s")
    print(
        f"  to/from page-locked host {result['take_pinned_into_gbps']:.1f} / {result['restore_pinned_gbps']:.1f} GB/s"
    )
    print(f"  restored block vs the original: {result['restored_block_max_abs_diff']}")
    print(f"  -> {a.out}")
    same = all(v in (0.0, None) for d in result["restored_block_max_abs_diff"].values() for v in d.values())
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
