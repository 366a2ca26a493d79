"""A new fd-serve player's first blocks: on a parked session renewed for it, against a new session.

fd-serve keeps closed sessions (and the one it measures memory with at start, warmed up) for the next
players (`flashdreams.serve.stepper.SessionStepper`, `Session.renew`). A new session runs its first
block of each kind eagerly and captures the CUDA graphs on the next one, on the server's one worker
thread, so every other player's round waits for it; a renewed one replays the graphs it captured for
the player before. Here, in one process through the stepper fd-serve uses (frames copied to the host
as the server does), each way is timed `--rounds` times in alternation: the open, then each of the first
`--blocks` blocks. The frames of the two ways are compared (bf16: captured graphs against the eager
blocks may differ by rounding).

    python bench/serve_spares_bench.py --out spares.json            # GPU: Self-Forcing 1.3B, ~60 s
    python bench/serve_spares_bench.py --smoke --out /tmp/s.json    # CPU, the tiny model
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import flashdreams
from flashdreams.benchmark.environment import environment
from flashdreams.benchmark.micro import write_result
from flashdreams.serve.stepper import SessionStepper

FULL = {
    "preset": "self-forcing-1.3b",
    "random_weights": True,
    "decoder": "taehv",
    "attention": "triton",
    "device": "cuda",
}
SMOKE = {"preset": "tiny", "device": "cpu"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_blocks(stepper: SessionStepper, seed: int, blocks: int) -> dict:
    """Open a session through `stepper`, step it `blocks` times, close it: ms of the open and each block."""
    device = stepper.engine.device
    _sync(device)
    t0 = time.perf_counter()
    stepper.open("player", seed)
    _sync(device)
    open_ms = (time.perf_counter() - t0) * 1e3
    block_ms, frames = [], []
    for _ in range(blocks):
        t = time.perf_counter()
        out = stepper.step(["player"])["player"]  # the frames reach the host inside, as the server needs them
        block_ms.append((time.perf_counter() - t) * 1e3)
        if out.error is not None:
            raise out.error
        frames.append(out.frames)
    stepper.close("player")
    return {"open_ms": open_ms, "block_ms": block_ms, "first_frame_ms": open_ms + block_ms[0], "frames": frames}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--smoke", action="store_true", help="CPU, the tiny model")
    p.add_argument("--blocks", type=int, default=5, help="blocks timed per player (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="players each way, alternated (default 3)")
    args = p.parse_args()
    if args.blocks < 1 or args.rounds < 1:
        p.error("--blocks and --rounds must be >= 1")
    engine = flashdreams.load(**(SMOKE if args.smoke else FULL))
    device = engine.device
    parked = SessionStepper(engine)  # fd-serve's default: closed sessions kept for the next players
    t0 = time.perf_counter()
    per_session = parked.session_bytes()  # what fd-serve does at start: the probe, warmed up, parked
    start_s = time.perf_counter() - t0
    fresh = SessionStepper(engine, spares=0)  # each player a new session (the behaviour before)
    runs: dict = {"renewed": [], "new": []}
    diffs = []  # per round: the largest |difference| between the two ways' frames
    for r in range(args.rounds):
        for way, stepper in (
            (("renewed", parked), ("new", fresh)) if r % 2 == 0 else (("new", fresh), ("renewed", parked))
        ):
            runs[way].append(first_blocks(stepper, seed=100 + r, blocks=args.blocks))
        a, b = runs["renewed"][-1]["frames"], runs["new"][-1]["frames"]
        diffs.append(max(int(np.abs(x.astype(int) - y.astype(int)).max()) for x, y in zip(a, b, strict=True)))
    summary = {}
    for way in ("renewed", "new"):
        rows = runs[way]
        summary[way] = {
            "open_ms": [round(x["open_ms"], 1) for x in rows],
            "block_ms": [[round(v, 1) for v in x["block_ms"]] for x in rows],
            "first_frame_ms_median": round(statistics.median(x["first_frame_ms"] for x in rows), 1),
            "first_blocks_ms_median": round(statistics.median(sum(x["block_ms"]) for x in rows), 1),
        }
    result = {
        "environment": environment(device),
        "engine": repr(engine),
        "blocks": args.blocks,
        "rounds": args.rounds,
        "start_warm_up_s": round(start_s, 2),
        "session_bytes": per_session,
        "renewed_players": parked.renewed,
        "frames_max_abs_diff": diffs,
        **summary,
    }
    write_result(args.out, result)
    for way in ("renewed", "new"):
        s = summary[way]
        print(
            f"{way:8s} open {s['open_ms']} ms; blocks {s['block_ms']} ms; first frame (median) "
            f"{s['first_frame_ms_median']} ms; first {args.blocks} blocks {s['first_blocks_ms_median']} ms"
        )
    print(f"start (probe warmed up and parked) {start_s:.2f} s; frames max |diff| {diffs}")


if __name__ == "__main__":
    main()
