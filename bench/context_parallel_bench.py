"""Context-parallel scaling: per-block latency of one streaming session on 1, 2, 4 (8) GPUs of a host.

    torchrun --nproc-per-node 4 bench/context_parallel_bench.py --mode ulysses
    torchrun --nproc-per-node 4 bench/context_parallel_bench.py --mode ring [--ring-pass kv]
    torchrun --nproc-per-node 2 bench/context_parallel_bench.py --preset tiny --device cpu --mode ring   # CPU smoke

One launch measures every GPU count up to the world size: ranks [0, P) form a group and run
a session while the others wait on a CPU barrier, so P = 1, 2, 4 share one launch, one set
of weights and one JSON. P = 1 runs the plain eager engine, the baseline of every speedup
(--with-cp1 adds the context-parallel engine on one rank: its overhead). The context-parallel
engines wrap the loaded one (`flashdreams.parallel.context_parallel_engine`): the family's
own graphs with its attention and token-sharding hooks set. Models: Wan2.1
1.3B and 14B with random weights (speed does not depend on the values), bf16, 480x832, the
Self-Forcing schedule (4 steps + commit a block) and its full 21-frame cache; blocks whose
window is full are the steady state (p50 and p99). Each count also reports the rel. L2 of every
measured block's latents against the baseline (same seed, same prompt; the worst block and each
one), ring mode checks its attention-with-LSE path against plain torch first (`lse_check`), and
--profile adds one profiled steady block per run: kernel time per category, communication
(NCCL kernels) included. A run that fails under --cuda-graphs (NCCL inside a capture) is
recorded with its error under "failed" and the others go on.

Expect roughly 1 min (1.3B) + 4 min (14B) of device time per launch on 4 GPUs, eager;
split with --models 1.3b / --models 14b if a call's time is short. --cuda-graphs replays
blocks as CUDA graphs with the NCCL collectives inside (whether torch.distributed's NCCL
bookkeeping survives replay is what that run finds out; a hang there is the answer "no").
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import flashdreams
from flashdreams.benchmark.environment import environment
from flashdreams.benchmark.profile import profile_call
from flashdreams.engine import Engine, resolve_device_dtype
from flashdreams.models.wan_config import WAN21_T2V_14B
from flashdreams.numerics import max_abs_err, rel_l2
from flashdreams.parallel import Comm, attention_lse, context_parallel_engine, init_from_env, parallel_hooks, shutdown
from flashdreams.presets import get_preset

MODELS = {
    "1.3b": lambda base: get_preset(base),
    "14b": lambda base: get_preset(base).replace(
        name=base.replace("1.3b", "14b") + "-random", description="Wan2.1-T2V-14B shape", model=WAN21_T2V_14B
    ),
}
HEADROOM_GB = 12.0  # activations, workspace, NCCL buffers on top of weights and ring


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("ulysses", "ring"), default="ulysses")
    ap.add_argument("--ring-pass", choices=("q", "kv"), default="q", help="ring mode: pass queries or K/V")
    ap.add_argument("--models", default="1.3b,14b", help="comma list of 1.3b, 14b (ignored with --preset)")
    ap.add_argument("--base-preset", default="self-forcing-1.3b", help="schedule and cache of the --models runs")
    ap.add_argument(
        "--preset",
        default=None,
        help="comma list of registered presets instead of --models (e.g. tiny; self-forcing-1.3b,"
        "lingbot-world-fast-stream,wan2.2-a14b-t2v-rolling for issue 23's three models)",
    )
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None)
    ap.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--attention", choices=("sdpa", "triton"), default="sdpa")
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--gpus", default=None, help="comma list of rank counts (default 1, 2, 4, 8 up to the world)")
    ap.add_argument("--blocks", type=int, default=10, help="measured blocks per session")
    ap.add_argument("--warmup-passes", type=int, default=None, help="full unmeasured passes (default 1, 2 w/ graphs)")
    ap.add_argument("--cuda-graphs", action="store_true", help="replay blocks as CUDA graphs (NCCL inside capture)")
    ap.add_argument("--with-cp1", action="store_true", help="also time the context-parallel backend on 1 rank")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also profile one steady block per run on rank 0 (torch.profiler): kernel time per category, "
        "communication (NCCL kernels / gloo ops) included",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/cp-<mode>-<device>-x<world>.json)")
    return ap.parse_args()


def log0(*msg) -> None:
    if dist.get_rank() == 0:
        print(*msg, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def param_bytes(engine: Engine) -> int:
    return sum(p.numel() * p.element_size() for p in engine.model.weights.parameters())


def ring_bytes(engine: Engine, world: int) -> int:
    """Bytes of the KV rings of one session, per rank when split over `world` ranks."""
    decls = [engine.plan.state[n] for n in parallel_hooks(engine).kv_rings]
    return sum(math.prod(d.shape) * torch.empty((), dtype=d.torch_dtype()).element_size() for d in decls) // world


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def measure(engine: Engine, args, warmup_passes: int) -> tuple[dict, list[torch.Tensor]]:
    """Warm up with full passes, then time each block of the pass after (host clock after a device sync);
    with --profile, one more (steady) block under the profiler on rank 0 (every rank steps it).

    Returns the stats and every measured block's latents (the correctness check against one GPU).
    """
    dev = engine.device
    prompt = engine.default_prompt(batch=1, seed=args.seed)
    cuda_graphs = args.cuda_graphs and dev.type == "cuda"
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    s = engine.session(prompt, seed=args.seed, cuda_graphs=cuda_graphs)
    s.timing = True
    for _ in range(warmup_passes):
        for _ in range(args.blocks):
            s.step()
        s.reset()
    per_block, stages, latents = [], [], []
    for _ in range(args.blocks):
        sync(dev)
        t0 = time.perf_counter()
        res = s.step()
        sync(dev)
        per_block.append((time.perf_counter() - t0) * 1e3)
        stages.append(res.stage_ms())
        latents.append(res.latents.float().cpu().clone())
    spec, ring = engine.spec, engine.plan.meta["ring"]  # every streaming plan states its sink and window
    nf, cap = spec.num_frame_per_block, ring["sink_frames"] + ring["window_frames"]
    # Steady state: blocks that see a full window (attention no longer grows); never block 0.
    steady = [b for b in range(1, args.blocks) if (b + 1) * nf >= cap] or list(range(1, args.blocks)) or [0]
    steady_ms = [per_block[b] for b in steady]
    stats = {
        "per_block_ms": per_block,
        "stage_ms_per_block": stages,
        "steady_blocks": steady,
        "steady_p50_ms": statistics.median(steady_ms),
        "steady_p99_ms": percentile(steady_ms, 99),
        "steady_mean_ms": statistics.fmean(steady_ms),
        "steady_fps": 1e3 * spec.frames_per_block / statistics.median(steady_ms),
        "first_block_ms": per_block[0],
        "capture_s": s.capture_s,
        "ring_gb_per_rank": sum(s.buffers[n].nbytes for n in parallel_hooks(engine).kv_rings) / 2**30,
        "peak_mem_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
    }
    if args.profile:
        if dist.get_rank() == 0:
            summary, _ = profile_call(s.step, dev)
            stats["profile"] = summary
            stats["comm_ms"] = summary["categories"].get("communication", {}).get("ms", 0.0)
        else:
            s.step()
            sync(dev)
    del s
    return stats, latents


def lse_check(dev: torch.device, dtype: torch.dtype, attention: str) -> dict | None:
    """The fast attention-with-LSE path of this machine against the plain torch one (ring mode's merge needs it)."""
    if dev.type != "cuda":
        return None
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, n, 12, 128, generator=g, device=dev, dtype=dtype) for n in (780, 4096, 4096))
    valid = torch.tensor([3120], device=dev)
    ref_out, ref_lse = attention_lse(q.float(), k.float(), v.float(), valid, None)  # fp32 plain torch
    out, lse = attention_lse(q, k, v, valid, 3120, attention)
    return {
        "path": attention,
        "out_rel_l2": rel_l2(out.float().cpu(), ref_out.cpu()),
        "lse_max_abs": max_abs_err(lse, ref_lse),
    }


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def skip_reason(args, engine: Engine, dev, p: int, coord) -> str | None:
    """Why `p` ranks cannot run this model (the same answer on every rank), or None."""
    hooks = parallel_hooks(engine)
    if args.mode == "ulysses" and hooks.num_heads % p:
        return f"{hooks.num_heads} heads not divisible by {p}"
    if hooks.frame_tokens % p:
        return f"{hooks.frame_tokens} tokens a frame not divisible by {p}"
    if dev.type != "cuda":
        return None
    need = ring_bytes(engine, p) / 2**30 + HEADROOM_GB  # weights are loaded already
    have = torch.cuda.mem_get_info(dev)[0] / 2**30
    decision = [f"needs ~{need:.0f} GiB more per GPU, {have:.0f} GiB free" if need > have else None]
    dist.broadcast_object_list(decision, src=0, group=coord)  # rank 0 decides (free memory differs a bit)
    return decision[0]


def run_preset(args, preset, dev, dtype, counts, groups, coord, warmup, result) -> None:
    """Every rank count for one model: P = 1 baseline first, then the groups of 2, 4, ..."""
    rank = dist.get_rank()
    base = flashdreams.load(
        preset=preset, device=dev, dtype=dtype, decoder=None, attention=args.attention,
        random_weights=not preset.builtin, height=args.height, width=args.width, weights_seed=args.seed,
    )  # fmt: skip
    label = f"{preset.name} {base.spec.height}x{base.spec.width}"
    comm = Comm(None)
    weights = base.model.weights
    for t in list(weights.parameters()) + list(weights.buffers()):
        comm.broadcast_(t.data)  # the same weights everywhere, whatever each device's RNG did
    log0(f"[{label}] {param_bytes(base) / 2**30:.1f} GiB of weights on each rank")
    ref_latents, base_ms = None, None
    for p in counts:
        reason = skip_reason(args, base, dev, p, coord)
        if reason is not None:
            result["skipped"].append({"model": label, "gpus": p, "reason": reason})
            log0(f"[{label}] skip {p} rank(s): {reason}")
            continue
        if rank < p:
            engines = [("eager", base)] if p == 1 else []
            if p > 1 or args.with_cp1:
                cp = context_parallel_engine(
                    base, args.mode, group=groups[p], ring_pass=args.ring_pass, sync_weights=False
                )
                engines.append((cp.backend.name, cp))
            for name, engine in engines:
                try:
                    stats, latents = measure(engine, args, warmup)
                except Exception as exc:  # noqa: BLE001 - e.g. NCCL inside a CUDA-graph capture: recorded, not fatal
                    if name == "eager" or not args.cuda_graphs:
                        raise
                    error = f"{type(exc).__name__}: {exc}"[:2000]
                    if rank == 0:
                        result["failed"].append({"model": label, "gpus": p, "backend": name, "error": error})
                    log0(f"[{label}] {p} rank(s) {name} FAILED: {error}")
                    free_memory()
                    continue
                if name == "eager":
                    ref_latents, base_ms = latents, stats["steady_p50_ms"]
                if rank == 0:
                    speedup = base_ms / stats["steady_p50_ms"]
                    per_block = [rel_l2(x, y) for x, y in zip(latents, ref_latents)]
                    run = {"model": label, "preset": preset.name, "gpus": p, "backend": name, **stats}
                    run.update(
                        rel_l2_vs_single=max(per_block),
                        rel_l2_vs_single_per_block=per_block,
                        speedup_vs_single=speedup,
                        scaling_efficiency=speedup / p,
                    )
                    result["runs"].append(run)
                    log0(
                        f"[{label}] {p} rank(s) {name}: steady {stats['steady_p50_ms']:.1f} ms/block "
                        f"({stats['steady_fps']:.1f} fps), speedup {speedup:.2f}x, efficiency {speedup / p:.2f}, "
                        f"rel. L2 vs 1 GPU {run['rel_l2_vs_single']:.2e} (max over {len(per_block)} blocks)"
                        + (f", communication {stats['comm_ms']:.1f} ms of a block" if args.profile else "")
                    )
                free_memory()
        dist.barrier(group=coord)
    del base
    free_memory()


def main() -> None:
    args = parse_args()
    backend = {"cuda": "nccl", "cpu": "gloo", None: None}[args.device]
    info = init_from_env(backend=backend, timeout_s=3600)
    world, rank = dist.get_world_size(), dist.get_rank()
    dev, dtype = resolve_device_dtype(info.device, args.dtype)
    # Idle ranks wait on the CPU (gloo), so the NCCL groups only ever see their own members' work.
    coord = dist.new_group(backend="gloo", timeout=timedelta(hours=2)) if info.backend != "gloo" else None
    counts = [int(p) for p in args.gpus.split(",")] if args.gpus else [p for p in (1, 2, 4, 8) if p <= world]
    counts = sorted({p for p in counts if 1 <= p <= world} | {1})  # the baseline always runs
    groups = {p: dist.new_group(list(range(p))) for p in counts}  # every rank creates every group, in order
    if args.preset:
        presets = [get_preset(name.strip()) for name in args.preset.split(",") if name.strip()]
    else:
        presets = [MODELS[m.strip()](args.base_preset) for m in args.models.split(",") if m.strip()]
    warmup = args.warmup_passes if args.warmup_passes is not None else (2 if args.cuda_graphs else 1)
    result = {
        "bench": "context_parallel",
        "mode": args.mode,
        "ring_pass": args.ring_pass if args.mode == "ring" else None,
        "attention": args.attention,
        "dtype": str(dtype).replace("torch.", ""),
        "world_size": world,
        "dist_backend": info.backend,
        "cuda_graphs": bool(args.cuda_graphs and dev.type == "cuda"),
        "blocks": args.blocks,
        "warmup_passes": warmup,
        "timing": "per block: host clock around session.step() with a device sync on each side, rank 0",
        "environment": environment(dev),
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if dev.type == "cuda" else None,
        "lse_check": lse_check(dev, dtype, args.attention) if args.mode == "ring" else None,
        "runs": [],
        "skipped": [],
        "failed": [],
    }
    for preset in presets:
        run_preset(args, preset, dev, dtype, counts, groups, coord, warmup, result)
    if rank == 0:
        out = Path(args.out) if args.out else _default_out(args, result, world)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}", flush=True)
    dist.barrier(group=coord)
    shutdown()


def _default_out(args, result: dict, world: int) -> Path:
    env = result["environment"]
    dev = env.get("device_name", "cpu").lower().replace("nvidia ", "").split()[0] if env.get("device_name") else "cpu"
    mode = args.mode + (f"-{args.ring_pass}" if args.mode == "ring" else "")
    graphs = "-graphs" if result["cuda_graphs"] else ""
    return Path(__file__).resolve().parent / "results" / f"cp-{mode}-{args.attention}{graphs}-{dev}-x{world}.json"


if __name__ == "__main__":
    main()
