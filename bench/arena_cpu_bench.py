#!/usr/bin/env python3
"""Blocks per second of the arena world (the fd-run default) through the engine's session loop.

CPU (the CI machine's 2 cores): `python bench/arena_cpu_bench.py --threads 2`; the issue asks
for >= 8 video frames per second there. On a GPU: `--device cuda`. Prints one JSON line (and
writes it to --json if given): blocks/s, frames/s, ms per block (median and p90), setup.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="arena_cpu_bench.py", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2, the CI machine)")
    p.add_argument("--blocks", type=int, default=100, help="timed blocks (after 5 warm-up blocks)")
    p.add_argument("--batch", type=int, default=1, help="worlds stepped together (batched sessions when > 1)")
    p.add_argument("--json", help="also write the result to this file")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import flashdreams
    from flashdreams.models.families.arena.world import loop_actions

    engine = flashdreams.load(preset="arena", device=args.device)
    f = engine.spec.frames_per_block
    script = loop_actions((args.blocks + 5) * f)
    cuda = engine.device.type == "cuda"
    if args.batch > 1:
        runner = engine.worlds(args.batch)
        step = lambda k: runner.step()  # noqa: E731
        setk = lambda k: runner.set_inputs("keyboard", script[k * f : (k + 1) * f].expand(args.batch, f, 4))  # noqa: E731
    else:
        runner = engine.session(seed=0)
        step = lambda k: runner.step()  # noqa: E731
        setk = lambda k: runner.set_input("keyboard", script[k * f : (k + 1) * f][None])  # noqa: E731
    times = []
    for k in range(args.blocks + 5):
        t0 = time.perf_counter()
        setk(k)
        r = step(k)
        r.frames.cpu()  # the frames reached the host: the block is done
        if k >= 5:
            times.append(time.perf_counter() - t0)
    total = sum(times)
    res = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "threads": args.threads if not cuda else None,
        "torch": torch.__version__,
        "batch": args.batch,
        "blocks": args.blocks,
        "frames_per_block": f,
        "blocks_per_s": round(args.blocks / total, 2),
        "frames_per_s": round(args.blocks * f * args.batch / total, 1),
        "ms_per_block_median": round(1e3 * statistics.median(times), 2),
        "ms_per_block_p90": round(1e3 * sorted(times)[int(0.9 * len(times))], 2),
    }
    line = json.dumps(res)
    print(line)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
