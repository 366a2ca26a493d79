"""Which lines of our Python launch the GPU time of one block: torch's profiler over one eager step of a
preset, its ops grouped by input shapes and the calling frames, sorted by their own device time.

fd-bench's profile names kernels (`at::native::elementwise_kernel<...direct_copy...>`, 85 calls, 5.4 ms in
OmniDreams' FP8 chunk, next71-h100) but not the code that asked for them; this names the op, its shapes and
the three innermost frames of this repository that called it. Eager on purpose (a captured graph replays
kernels without their Python), so host overheads are not what it measures; device times are.

    python bench/op_sources.py --preset omnidreams-sv --precision fp8 --out ops.txt    # GPU
    python bench/op_sources.py --smoke --out /tmp/ops.txt                               # CPU, tiny model
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import flashdreams  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="omnidreams-sv", help="the preset (random weights)")
    p.add_argument("--precision", default="fp8", choices=("bf16", "fp8"))
    p.add_argument("--decoder", default="preset", help="the decoder (flashdreams.load's: preset, taehv, wan-vae)")
    p.add_argument("--warm-steps", type=int, default=3, help="steps before the profiled one (steady block)")
    p.add_argument("--rows", type=int, default=40, help="ops listed")
    p.add_argument("--out", type=Path, required=True, help="text file to write (the table)")
    p.add_argument("--smoke", action="store_true", help="CPU, the tiny causal Wan preset, one warm step")
    args = p.parse_args()
    if args.warm_steps < 0 or args.rows < 1:
        p.error("--warm-steps must be >= 0 and --rows >= 1")
    if args.smoke:
        engine = flashdreams.load(preset="tiny", device="cpu", dtype="float32")  # torch ops: no interpreter to trace
        warm, activities = 1, [ProfilerActivity.CPU]
    else:
        if not torch.cuda.is_available():
            p.error("no CUDA device: run with --smoke on a CPU")
        engine = flashdreams.load(
            preset=args.preset,
            attention="triton",
            random_weights=True,
            precision=args.precision,
            decoder=args.decoder,
            device="cuda",
        )
        warm, activities = args.warm_steps, [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    session = engine.session(seed=0, cuda_graphs=False)  # kernels under their ops, not a replay
    for _ in range(warm):
        session.step()
    if torch.cuda.is_available() and not args.smoke:
        torch.cuda.synchronize()
    with profile(activities=activities, record_shapes=True, with_stack=True) as prof:
        session.step()
        if not args.smoke:
            torch.cuda.synchronize()
    rows = aggregate(prof.events(), "device" if not args.smoke else "cpu")[: args.rows]
    lines = [f"{engine!r}: one steady step after {warm}; own {'device' if not args.smoke else 'CPU'} time per op"]
    for (name, shapes, frames), (calls, us) in rows:
        lines.append(f"{us / 1e3:9.3f} ms {calls:5d} x  {name}  {shapes}")
        lines += [f"{'':22s}{f}" for f in frames]
    launched = launches(prof.events())
    lines.append(f"\n{sum(n for n, _ in launched.values())} device launches in the step; memsets and copies by op:")
    for (kernel, op, frames), (n, us) in sorted(launched.items(), key=lambda kv: -kv[1][0]):
        if kernel.startswith(("Memset", "Memcpy")):
            lines.append(f"{n:6d} x {kernel} ({us / 1e3:.3f} ms)  under {op}")
            lines += [f"{'':22s}{f}" for f in frames]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def own_frames(event, n: int = 3) -> tuple[str, ...]:
    """The n innermost Python frames of this repository above an op (the profiler records each frame as a
    parent event named "file.py(line): function"; torch's, triton's and other packages' are skipped)."""
    frames = []
    e = event.cpu_parent
    while e is not None and len(frames) < n:
        name = e.name
        if ".py(" in name and not name.startswith(("torch/", "triton/")) and "site-packages" not in name:
            frames.append(name)
        e = e.cpu_parent
    return tuple(frames)


def launches(events) -> dict:
    """{(kernel name, innermost op, frames): (launches, us)}: every kernel, memset and copy of the step under the
    innermost op that launched it (a captured graph replays each as a node with its own launch gap, so the
    count matters as well as the time; cuBLAS and cuDNN launch memsets of their own)."""
    table: dict = {}
    for e in events:
        if e.device_type != DeviceType.CPU or "::" not in e.name:
            continue
        for k in e.kernels:
            kind = k.name.split("(")[0].strip() if k.name.startswith(("Memset", "Memcpy")) else "kernel"
            key = (kind, e.name, own_frames(e))
            n, us = table.get(key, (0, 0.0))
            table[key] = (n + 1, us + k.duration)
    return table


def aggregate(events, kind: str) -> list:
    """[((op, input shapes, frames), (calls, own us))] over the aten ops, most time first."""
    table: dict = {}
    for e in events:
        if e.device_type != DeviceType.CPU or "::" not in e.name:  # aten and our ops; not frames or kernels
            continue
        us = e.self_device_time_total if kind == "device" else e.self_cpu_time_total
        key = (e.name, str(e.input_shapes)[:100], own_frames(e))
        calls, total = table.get(key, (0, 0.0))
        table[key] = (calls + 1, total + us)
    return sorted(table.items(), key=lambda kv: -kv[1][1])


if __name__ == "__main__":
    main()
