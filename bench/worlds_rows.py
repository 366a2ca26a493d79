"""fd-bench --sessions, one world count at a time, for a GPU call with a hard time limit (issue 19).

Takes fd-bench's own options (its parser) and measures with fd-bench's own `bench_sessions`, but
writes results.json after every world count, records a count that raises (out of memory, a kernel)
and stops there instead of losing the counts before it, and skips the counts it has no time left
for (--budget-s: a count is started only if twice the last count's wall time still fits).

    python bench/worlds_rows.py --budget-s 120 -- --preset arena --sessions 1,2,4,...,256 --blocks 30 --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=1e9, help="wall seconds for all counts (load included)")
    ap.add_argument("fdbench", nargs=argparse.REMAINDER, help="fd-bench options after --")
    ours = ap.parse_args()
    t_start = time.perf_counter()
    argv = ours.fdbench[1:] if ours.fdbench[:1] == ["--"] else ours.fdbench

    import torch

    import flashdreams
    from flashdreams.benchmark.environment import environment
    from flashdreams.benchmark.sessions import bench_sessions, largest_fit
    from flashdreams.cli.bench import build_parser
    from flashdreams.cli.options import load_kwargs, split_list
    from flashdreams.engine import resolve_device_dtype

    args = build_parser().parse_args(argv)
    counts = sorted(int(c) for c in split_list(args.sessions))
    kw = load_kwargs(args, attention=split_list(args.attention)[0], precision=split_list(args.precision)[0])
    device, dtype = resolve_device_dtype(kw["device"], kw["dtype"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    first = flashdreams.load(**kw)
    load_s = time.perf_counter() - t0
    cache = {1: first}

    def engine_for(n: int):
        if first.plan.row_independent:
            return first
        if n not in cache:  # lockstep worlds: an engine loaded at batch n (as fd-bench)
            cache.clear()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            cache[n] = flashdreams.load(**kw, batch=n)
        return cache[n]

    results = {
        "schema": "fd-bench-sessions/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "measured_by": "bench/worlds_rows.py (fd-bench's bench_sessions, one count at a time)",
        "argv": argv,
        "environment": environment(device),
        "config": {
            "preset": first.preset_name,
            "blocks": args.blocks,
            "cuda_graphs": not args.no_cuda_graphs,
            "dtype": str(dtype).replace("torch.", ""),
            "attention": kw.get("attention"),
            "decoder": kw.get("decoder"),
            "height": first.plan.meta.get("height"),
            "width": first.plan.meta.get("width"),
            "row_independent": first.plan.row_independent,
        },
        "first_load_s": load_s,
        "rows": [],
        "failed": [],
        "skipped": [],
    }
    if device.type == "cuda":
        results["weights_bytes_allocated"] = torch.cuda.memory_allocated(device)

    def write() -> None:
        rows = results["rows"]
        base = rows[0]["aggregate_fps"] if rows and rows[0]["worlds"] == 1 else None
        for r in rows:
            r["speedup_vs_1"] = r["aggregate_fps"] / base if base else None
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            results["free_bytes_after"] = free
            results["total_bytes"] = total
            results["largest_worlds_fit_estimate"] = largest_fit(rows, free)
        (out / "results.json").write_text(json.dumps(results, indent=1))

    last_wall = 0.0
    for n in counts:
        left = ours.budget_s - (time.perf_counter() - t_start)
        if left < 2.2 * last_wall + 5:
            results["skipped"].append({"worlds": n, "seconds_left": left})
            print(f"worlds_rows: {n} worlds skipped ({left:.0f} s left, last count took {last_wall:.0f} s)", flush=True)
            continue
        t = time.perf_counter()
        try:
            (row,) = bench_sessions(
                engine_for,
                [n],
                blocks=args.blocks,
                warmup=3,
                cuda_graphs=False if args.no_cuda_graphs else None,
                profile=args.profile_block is not None,
            )
            row["wall_s"] = time.perf_counter() - t
            results["rows"].append(row)
        except Exception as exc:  # noqa: BLE001 - keep the counts before it; larger ones would fail too
            results["failed"].append(
                {"worlds": n, "error": f"{type(exc).__name__}: {exc}"[:2000], "trace": traceback.format_exc()[-3000:]}
            )
            print(f"worlds_rows: {n} worlds FAILED: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            cache.clear()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            write()
            break
        last_wall = time.perf_counter() - t
        write()
    write()
    rows = results["rows"]
    print(
        f"worlds_rows: {first.preset_name} {results['config']['dtype']}: "
        f"load {load_s:.1f} s, largest N fit estimate {results.get('largest_worlds_fit_estimate')}"
    )
    for r in rows:
        per = r.get("peak_bytes_per_world")
        print(
            f"  N={r['worlds']:4d} agg {r['aggregate_fps']:9.1f} fps  x{(r['speedup_vs_1'] or 0):6.2f}  "
            f"block p50 {r['block_ms_p50']:8.2f} p99 {r['block_ms_p99']:8.2f} ms  "
            f"peak/world {per / 2**20 if per else float('nan'):8.2f} MiB  state/world "
            f"{r['state_bytes_per_world'] / 2**20:8.2f} MiB  ({r['wall_s']:.0f} s)"
        )
    return 0 if rows and not results["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
