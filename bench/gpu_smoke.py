"""GPU smoke run: the tiny model in bfloat16 vs float32, graphs vs eager, on the lent GPU.

One script, one device call. Writes JSON to --out (default bench/results/gpu-smoke-h100.json).
Issue 2 asks for: a tiny-model session in bfloat16 on the GPU agreeing with float32
within bf16 tolerance; this also checks that CUDA-graph replay gives the eager result.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import flashdreams
from flashdreams.benchmark.environment import environment
from flashdreams.numerics import rel_l2


def rollout(engine, draws, cuda_graphs):
    """Blocks with the given draws ({name: CPU tensor} per block), so every device and dtype sees the same noise."""
    s = engine.session(engine.default_prompt(seed=0), seed=0, cuda_graphs=cuda_graphs)
    return [s.step({k: v.to(engine.device) for k, v in d.items()}).latents.float().cpu() for d in draws]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/gpu-smoke-h100.json")
    ap.add_argument("--blocks", type=int, default=8)
    args = ap.parse_args()
    dev = torch.device("cuda")
    t0 = time.perf_counter()
    e32 = flashdreams.load(device="cuda", dtype="float32", decoder=None)
    e16 = flashdreams.load(device="cuda", dtype="bfloat16", decoder=None)
    e16t = flashdreams.load(device="cuda", dtype="bfloat16", decoder=None, attention="triton")
    e32t = flashdreams.load(device="cuda", dtype="float32", decoder=None, attention="triton")
    gen = torch.Generator().manual_seed(1)
    decls = e32.plan.draws  # the plan's random draws: name -> TensorDecl (shape, dtype)
    draws = [
        {n: torch.randn(d.shape, generator=gen, dtype=d.torch_dtype()) for n, d in decls.items()}
        for _ in range(args.blocks)
    ]
    ref32 = rollout(e32, draws, cuda_graphs=False)
    bf16_eager = rollout(e16, draws, cuda_graphs=False)
    bf16_graph = rollout(e16, draws, cuda_graphs=True)
    f32_graph = rollout(e32, draws, cuda_graphs=True)
    bf16_triton = rollout(e16t, draws, cuda_graphs=True)
    f32_triton = rollout(e32t, draws, cuda_graphs=True)
    cpu = flashdreams.load(device="cpu", dtype="float32", decoder=None)
    ref_cpu = rollout(cpu, draws, cuda_graphs=False)
    res = {
        "environment": environment(dev),
        "workload": f"built-in tiny model ({e32.preset_name}), {args.blocks} blocks, same draws everywhere",
        "bf16_vs_fp32_rel_l2_per_block": [rel_l2(a, b) for a, b in zip(bf16_eager, ref32)],
        "bf16_graphs_vs_bf16_eager_rel_l2": [rel_l2(a, b) for a, b in zip(bf16_graph, bf16_eager)],
        "fp32_graphs_vs_fp32_eager_rel_l2": [rel_l2(a, b) for a, b in zip(f32_graph, ref32)],
        "cuda_fp32_vs_cpu_fp32_rel_l2": [rel_l2(a, b) for a, b in zip(ref32, ref_cpu)],
        "triton_bf16_graphs_vs_fp32_rel_l2": [rel_l2(a, b) for a, b in zip(bf16_triton, ref32)],
        "triton_fp32_graphs_vs_fp32_sdpa_rel_l2": [rel_l2(a, b) for a, b in zip(f32_triton, ref32)],
        "seconds": time.perf_counter() - t0,
    }
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    for k, v in res.items():
        if isinstance(v, list):
            print(f"{k}: max {max(v):.2e}  " + " ".join(f"{x:.1e}" for x in v))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
