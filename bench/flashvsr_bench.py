"""Benchmark FlashVSR streaming super-resolution (random weights, bf16): FPS, the sparse kernel, chaining.

Three parts, each optional:
  stream     steady-state output FPS of a session per preset (4x to 768x1408 with sparse ratio
             2.0 and 1.5, dense attention for comparison, 4x to 1152x1920), with the denoise and
             decode stage times; CUDA graphs on by default.
  attention  the block-sparse kernel against dense attention (SDPA) on the same q/k/v at each
             preset's steady shape: mask density, ms, achieved TFLOP/s of the work it does.
  chain      Self-Forcing (480x832) -> FlashVSR 2x (448x832 centre crop -> 896x1664) as frames
             stream: combined output FPS.

    python bench/flashvsr_bench.py               # H200: everything, writes bench/results/flashvsr-h200.json
    python bench/flashvsr_bench.py --parts stream --blocks 20
    python bench/flashvsr_bench.py --device cpu --tiny  # smoke test on a CPU (flashvsr-tiny)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

import flashdreams
from flashdreams.benchmark.environment import environment, time_calls_ms
from flashdreams.kernels.block_sparse_attention import (
    block_sparse_attention,
    launch_block_sparse_attention,
    mask_to_lists,
    select_blocks,
)
from flashdreams.kernels.fa4_attention import block_sparse_attention_fa4, fa4_unavailable_reason
from flashdreams.numerics import rel_l2
from flashdreams.registry import all_presets
from flashdreams.stage import Upscaler

PRESET = {n: p for n, p in all_presets().items() if p.family == "flashvsr"}  # through the registry
TILES = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 2), (128, 32, 4, 3)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stream_fps(preset, device, dtype, attention, blocks: int, cuda_graphs: bool) -> dict:
    """Steady output FPS of one session: blocks 0-2 warm up (and capture), then `blocks` steady blocks."""
    engine = flashdreams.load(
        preset=preset, device=device, dtype=dtype, attention=attention, random_weights=not preset.builtin
    )
    meta = engine.plan.meta
    fin = meta["frame_input"]
    lq_shape = (1, fin["first"], fin["height"], fin["width"], 3)
    gen = torch.Generator().manual_seed(0)
    lq = torch.randint(0, 256, lq_shape, generator=gen).float().to(device)
    session = engine.session(seed=0, inputs={"lq_frames": lq}, cuda_graphs=cuda_graphs and device.type == "cuda")
    _sync(device)
    t0 = time.perf_counter()
    first = session.step()
    first.frames_cpu()
    first_s = time.perf_counter() - t0
    for _ in range(2):  # the eager warm-up of the steady kind, then its capture
        session.step().frames_cpu()
    _sync(device)
    session.timing = True
    stages: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    frames = 0
    for _ in range(blocks):
        r = session.step()
        frames += r.frames.shape[1]
        for k, v in r.stage_ms().items():
            stages.setdefault(k, []).append(v)
    _sync(device)
    wall = time.perf_counter() - t0
    return {
        "preset": preset.name,
        "output": [meta["height"], meta["width"]],
        "lq_input": [fin["height"], fin["width"]],
        "attention_mode": meta["attention_mode"],
        "topk": meta["topk"],
        "steady_blocks": blocks,
        "frames": frames,
        "fps": frames / wall,
        "block_ms": 1e3 * wall / blocks,
        "first_block_s": first_s,
        "stage_ms_median": {k: statistics.median(v) for k, v in stages.items()},
        "cuda_graphs": session.cuda_graphs,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def attention_rate(preset, device, dtype, reps: int) -> dict:
    """The sparse kernel vs dense SDPA at the steady call's shape (1 query slab, 4 key slabs), one layer."""
    cfg = preset.model
    gh, gw = preset.height // 128, preset.width // 128
    slab = gh * gw * 128
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (1, slab, cfg.num_heads, cfg.head_dim)
    q = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    k = torch.randn((1, 4 * slab, *shape[2:]), generator=gen, device=device, dtype=dtype)
    v = torch.randn_like(k)
    topk = preset.topk(preset.height, preset.width)
    mask = select_blocks(q, k, 128, (gh, gw), preset.local_range, topk)
    density = float(mask.float().mean())
    select_ms = statistics.median(
        time_calls_ms(lambda: select_blocks(q, k, 128, (gh, gw), preset.local_range, topk), device, reps, 2)
    )
    sparse_ms = statistics.median(time_calls_ms(lambda: block_sparse_attention(q, k, v, mask), device, reps, 3))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    dense_fn = lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)  # noqa: E731
    dense_ms = statistics.median(time_calls_ms(dense_fn, device, reps, 3))
    full = torch.ones_like(mask)
    full_ms = statistics.median(time_calls_ms(lambda: block_sparse_attention(q, k, v, full), device, reps, 3))
    dense_flop = 4.0 * slab * 4 * slab * cfg.num_heads * cfg.head_dim
    fa4: dict = {"unavailable": fa4_unavailable_reason(device)}
    if fa4["unavailable"] is None:  # FlashAttention-4's block-sparse kernel on the same mask
        try:
            got = block_sparse_attention_fa4(q, k, v, mask)
            fa4["rel_l2_vs_ours"] = rel_l2(got.float(), block_sparse_attention(q, k, v, mask).float())
            fa4["ms"] = statistics.median(
                time_calls_ms(lambda: block_sparse_attention_fa4(q, k, v, mask), device, reps, 3)
            )
            fa4["tflops_achieved"] = density * dense_flop / fa4["ms"] / 1e9
            fa4["speedup_vs_ours"] = sparse_ms / fa4["ms"]
            fa4["speedup_vs_dense_sdpa"] = dense_ms / fa4["ms"]
        except Exception as exc:  # noqa: BLE001 - an unverified kernel: its failure is a result, not the item's end
            fa4["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    counts, idx = mask_to_lists(mask)
    scale = cfg.head_dim**-0.5
    tiles = {}
    for t in TILES:  # (BLOCK_M, BLOCK_N, num_warps, num_stages): to pick the kernel's default on this GPU
        fn = lambda t=t: launch_block_sparse_attention(q, k, v, counts, idx, 128, scale, t)  # noqa: E731
        try:
            tiles[",".join(map(str, t))] = statistics.median(time_calls_ms(fn, device, reps, 3))
        except Exception as exc:  # a tile that does not fit this GPU's shared memory
            tiles[",".join(map(str, t))] = f"failed: {type(exc).__name__}"
    return {
        "preset": preset.name,
        "q_tokens": slab,
        "kv_tokens": 4 * slab,
        "heads": cfg.num_heads,
        "head_dim": cfg.head_dim,
        "topk": topk,
        "mask_density": density,
        "select_ms": select_ms,
        "sparse_kernel_ms": sparse_ms,
        "sparse_kernel_full_mask_ms": full_ms,
        "dense_sdpa_ms": dense_ms,
        "speedup_vs_dense_sdpa": dense_ms / sparse_ms,
        "sparse_tflops_achieved": density * dense_flop / sparse_ms / 1e9,
        "full_mask_tflops": dense_flop / full_ms / 1e9,
        "dense_sdpa_tflops": dense_flop / dense_ms / 1e9,
        "tile_sweep_ms": tiles,
        "fa4": fa4,
    }


def chain_fps(device, dtype, attention, world_blocks: int) -> dict:
    """Self-Forcing frames streamed through FlashVSR 2x; FPS of upscaled frames over the whole chain."""
    world = flashdreams.load(
        preset="self-forcing-1.3b", device=device, dtype=dtype, attention=attention, random_weights=True
    )
    vsr_preset = PRESET["flashvsr"].replace(name="flashvsr-2x-sf", height=896, width=1664, scale=2)
    vsr = flashdreams.load(preset=vsr_preset, device=device, dtype=dtype, attention=attention, random_weights=True)
    ws = world.session(seed=0)
    fin = vsr.plan.meta["frame_input"]
    lq = torch.zeros(1, fin["first"], fin["height"], fin["width"], 3, device=device)
    up = Upscaler(vsr.session(seed=0, inputs={"lq_frames": lq}))
    for _ in range(3):  # warm both sessions up (first block kinds, captures)
        for b in up.push(ws.step().frames):
            b.cpu()
    _sync(device)
    t0 = time.perf_counter()
    out = 0
    for _ in range(world_blocks):
        for b in up.push(ws.step().frames):
            out += b.shape[1]
    _sync(device)
    wall = time.perf_counter() - t0
    return {
        "world": "self-forcing-1.3b 480x832",
        "upscaler": "flashvsr 2x: 448x832 centre crop -> 896x1664",
        "world_blocks": world_blocks,
        "upscaled_frames": out,
        "combined_fps": out / wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--attention", default="triton", choices=["triton", "sdpa"])
    ap.add_argument("--parts", default="stream,attention,chain")
    ap.add_argument("--blocks", type=int, default=12, help="steady blocks timed per preset")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="the built-in tiny preset only (CPU smoke test)")
    ap.add_argument("--out", default="bench/results/flashvsr-h200.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    parts = set(args.parts.split(","))
    if args.tiny:
        presets = [PRESET["flashvsr-tiny"]]
    else:
        base = PRESET["flashvsr"]
        presets = [base, PRESET["flashvsr-faster"], base.replace(name="flashvsr-dense", attention_mode="dense")]
        presets.append(PRESET["flashvsr-1080p"])
    results: dict = {"environment": environment(device), "args": vars(args)}
    if "stream" in parts:
        results["stream"] = []
        for p in presets:
            r = stream_fps(p, device, dtype, args.attention, args.blocks, not args.no_cuda_graphs)
            print(json.dumps(r))
            results["stream"].append(r)
    if "attention" in parts and device.type == "cuda" and not args.tiny:
        results["attention"] = []
        for p in (PRESET["flashvsr"], PRESET["flashvsr-faster"], PRESET["flashvsr-1080p"]):
            r = attention_rate(p, device, dtype, args.reps)
            print(json.dumps(r))
            results["attention"].append(r)
    if "chain" in parts and not args.tiny:
        r = chain_fps(device, dtype, args.attention, args.blocks)
        print(json.dumps(r))
        results["chain"] = r
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(results, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x))
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
