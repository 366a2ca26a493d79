"""What lockstep worlds cost when they fall out of step (issue 19): `engine.worlds(N)` of a model
that is not row-independent, in step and with one world reset on its own.

In step, a step is one batch of N. After one world's own reset, every step is two batches (the
reset world's block index, then the others'), each holding the other rows' state. This measures,
in one process on one engine loaded at batch N:

1. ms per step in step (all N worlds at one block index), and the same step through a plain
   batch-N session (the runtime's lockstep path without worlds: the overhead of worlds);
2. ms per step out of step (world 0 reset two blocks after the others), and the ratio to (1);
3. peak memory above the engine in each phase (the held rows' copies);
4. world 0 after its reset equals a lone world with its seed (rel. L2 of the latents, per block).

    python bench/lockstep_worlds.py --preset matrix-game-2-universal --random-weights \\
        --height 352 --width 640 --attention triton --decoder taehv --worlds 8 --out results.json

CPU smoke: `python bench/lockstep_worlds.py --preset matrix-game-2-tiny --worlds 2 --blocks 2`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _timed(fn, device: torch.device, n: int) -> list[float]:
    """Wall ms of each of n calls, synced (a step ends when its frames could be read)."""
    out = []
    for _ in range(n):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def _session_ms(engine, inputs: dict, n: int, blocks: int) -> list[float]:
    """ms per step of a plain batch-n session (freed on return, before worlds are measured)."""
    session = engine.session(inputs={k: v.expand(n, *v.shape[1:]) for k, v in inputs.items()}, seed=0)
    for _ in range(2):  # block 0 and the first steady block: warm (and on CUDA captured)
        session.step()
    return _timed(lambda: session.step().frames_cpu(), engine.device, blocks)


def _peak_above(device: torch.device, base: int) -> int | None:
    return torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="matrix-game-2-tiny")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--attention", default="sdpa")
    ap.add_argument("--decoder", default="preset")
    ap.add_argument("--device")
    ap.add_argument("--worlds", type=int, default=8, help="N: the engine is loaded at batch N")
    ap.add_argument("--blocks", type=int, default=6, help="timed steps per phase")
    ap.add_argument("--out", default="lockstep-worlds.json")
    a = ap.parse_args()

    import flashdreams
    from flashdreams.benchmark.environment import environment
    from flashdreams.numerics import rel_l2

    kw = {
        "preset": a.preset,
        "attention": a.attention,
        "decoder": a.decoder,
        "device": a.device,
        "height": a.height,
        "width": a.width,
        "random_weights": a.random_weights or None,
    }
    kw = {k: v for k, v in kw.items() if v is not None}
    engine = flashdreams.load(**kw, batch=a.worlds)
    device = engine.device
    inputs = engine.default_inputs(seed=1, batch=1)
    n, blocks = a.worlds, a.blocks
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    result: dict = {
        "environment": environment(device),
        "config": {**kw, "worlds": n, "blocks": blocks, "row_independent": engine.plan.row_independent},
    }

    # 1. In step: a batch-N session, then the same through worlds.
    result["session_ms"] = _session_ms(engine, inputs, n, blocks)
    worlds = engine.worlds(n, seeds=list(range(n)), inputs=inputs)
    for _ in range(2):
        worlds.step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result["in_step_ms"] = _timed(lambda: worlds.step().frames_cpu(), device, blocks)
    result["in_step_peak_bytes_above"] = _peak_above(device, base)

    # 2. Out of step: world 0 reset on its own; every step is now two batches.
    worlds.reset(0, seed=100)
    kept = []

    def out_of_step():
        out = worlds.step()
        pad = out.padded[0][1] if out.padded else 0
        kept.append(out.latents[0, :, pad:].clone())
        return out.frames_cpu()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result["out_of_step_ms"] = _timed(out_of_step, device, blocks)
    result["out_of_step_peak_bytes_above"] = _peak_above(device, base)
    alone = flashdreams.load(**kw).session(inputs=inputs, seed=100)  # batch 1: the reset world's reference
    errors = [rel_l2(lat, alone.step().latents[0]) for lat in kept]
    result["reset_world_rel_l2"] = errors
    result["overhead_of_worlds"] = _median(result["in_step_ms"]) / _median(result["session_ms"])
    result["out_of_step_ratio"] = _median(result["out_of_step_ms"]) / _median(result["in_step_ms"])

    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"{engine.preset_name}, {n} worlds on {device}:")
    print(f"  batch-{n} session      {_median(result['session_ms']):8.1f} ms per step")
    print(f"  worlds in step        {_median(result['in_step_ms']):8.1f} ms ({result['overhead_of_worlds']:.2f}x)")
    print(f"  one world reset alone {_median(result['out_of_step_ms']):8.1f} ms ({result['out_of_step_ratio']:.2f}x)")
    if device.type == "cuda":
        gib = 2**30
        print(
            f"  peak above the engine: in step {result['in_step_peak_bytes_above'] / gib:.2f} GiB, "
            f"out of step {result['out_of_step_peak_bytes_above'] / gib:.2f} GiB"
        )
    print(f"  reset world vs alone: rel. L2 max {max(errors):.2e}")
    print(f"  -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
