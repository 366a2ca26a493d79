"""fd-bench --sessions: many worlds per GPU. Aggregate frames per second, per-world block latency
and memory per world, for N = 1, 2, 4, ... worlds of one model stepped together.

Every model runs as `engine.worlds(N)`, what a user steps: row-independent models in one batch
with each world at its own block index; the others loaded at batch N, their worlds in step (one
batch per step: a batch of synchronous rollouts, as a policy evaluation runs them).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from flashdreams.engine import Engine


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(stepper: Callable[[], torch.Tensor], device: torch.device, warmup: int, blocks: int) -> dict:
    """Time `blocks` steps after `warmup` (capture happens there); each step ends with the frames on the host."""
    for _ in range(warmup):
        stepper()
    _sync(device)
    times, frames = [], 0
    t_all = time.perf_counter()
    for _ in range(blocks):
        t0 = time.perf_counter()
        out = stepper()
        _sync(device)
        times.append(time.perf_counter() - t0)
        frames += out.shape[0] * out.shape[1]
    total = time.perf_counter() - t_all
    return {
        "block_ms_p50": 1e3 * statistics.median(times),
        "block_ms_p99": 1e3 * _percentile(times, 99),
        "block_ms_mean": 1e3 * statistics.fmean(times),
        "aggregate_fps": frames / total,
        "frames_per_block": out.shape[1],
    }


def bench_sessions(
    engine_for: Callable[[int], Engine],
    counts: list[int],
    blocks: int = 20,
    warmup: int = 3,
    cuda_graphs: bool | None = None,
    on_row: Callable[[dict], object] | None = None,
    profile: bool = False,
) -> list[dict]:
    """One row per N in `counts`. `engine_for(n)` gives an engine able to hold n worlds (the same one
    for row-independent models; one loaded at batch n for lockstep). `on_row` sees each row as it is
    measured (its speedup filled against the first). `profile`: each row also gets the kernel profile
    of one more step after the timed ones (`row["profile"]`, benchmark.profile's summary)."""
    rows = []
    for n in counts:
        engine = engine_for(n)
        device = engine.device
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        inputs = engine.default_inputs(batch=1) if engine.stand_in_inputs else None
        worlds = engine.worlds(n, seeds=list(range(n)), inputs=inputs, capacity=n, cuda_graphs=cuda_graphs)
        mode = "worlds" if engine.plan.row_independent else "lockstep worlds"
        state_bytes = worlds.memory_bytes()

        def step(worlds=worlds):
            return worlds.step().frames_cpu()

        row = {"worlds": n, "mode": mode, **bench_one(step, device, warmup, blocks)}
        if profile:
            from flashdreams.benchmark.profile import profile_call

            row["profile"] = profile_call(step, device)[0]
        row["per_world_fps"] = row["aggregate_fps"] / n
        row["state_bytes_per_world"] = state_bytes / n
        if device.type == "cuda":
            row["peak_bytes_above_weights"] = torch.cuda.max_memory_allocated(device) - base
            row["peak_bytes_per_world"] = row["peak_bytes_above_weights"] / n
        rows.append(row)
        base_fps = rows[0]["aggregate_fps"]
        row["speedup_vs_first"] = row["aggregate_fps"] / base_fps if base_fps else None
        if on_row is not None:
            on_row(row)
        print(
            f"fd-bench: {n:4d} worlds ({mode}): {row['aggregate_fps']:9.1f} frames/s in all, block p50 "
            f"{row['block_ms_p50']:8.2f} ms p99 {row['block_ms_p99']:8.2f} ms",
            flush=True,
        )
    return rows


def largest_fit(rows: list[dict], free_bytes: int) -> int | None:
    """The largest N whose measured peak (linear in N, fitted on the last two points) fits `free_bytes`."""
    pts = [(r["worlds"], r.get("peak_bytes_above_weights")) for r in rows if r.get("peak_bytes_above_weights")]
    if len(pts) < 2:
        return None
    (n0, m0), (n1, m1) = pts[-2], pts[-1]
    slope = (m1 - m0) / (n1 - n0) if n1 != n0 else 0
    if slope <= 0:
        return None
    return int(n1 + (free_bytes - m1) // slope)
