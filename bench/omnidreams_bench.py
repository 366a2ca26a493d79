"""Benchmark OmniDreams single view and Cosmos-Predict2.5 2B (random weights, bf16) on one GPU.

Two parts, each optional:
  omnidreams  the public preset at 704x1280 streaming chunk after chunk (CUDA graphs on): per chunk
              the time until its 8 frames are handed out (HD-map encode + 2 denoising forwards +
              LightTAE-architecture decode; the budget for real time at 30 fps is 267 ms) and the
              whole chunk with the finalize forward, stage times, achieved TFLOP/s (plan FLOPs),
              and the HD-map render time of the built-in rasterizer (outside the chunk).
  cosmos      Cosmos-Predict2.5-2B, 93 frames at 704x1280 (24 x 88 x 160 latents): the latency of
              one sampler evaluation (the CFG pair as one batch-2 forward) and its TFLOP/s against
              the bf16 matmul peak measured in the same run.

    python bench/omnidreams_bench.py                 # H200: both, writes bench/results/omnidreams-h200.json
    python bench/omnidreams_bench.py --parts omnidreams --chunks 30
    python bench/omnidreams_bench.py --device cpu --tiny   # smoke test on a CPU (the tiny presets)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import flashdreams
from flashdreams.benchmark.environment import environment, measure_ceilings, time_calls_ms
from flashdreams.models.cosmos_dit import forward_flops
from flashdreams.models.hdmap import DemoDrive

BUDGET_MS = 8 / 30 * 1e3  # 8 frames at 30 fps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def omnidreams(preset: str, device, dtype, attention: str, chunks: int, cuda_graphs: bool) -> dict:
    engine = flashdreams.load(preset=preset, device=device, dtype=dtype, attention=attention, random_weights=True)
    plan = engine.plan
    drive = DemoDrive(plan.meta["height"], plan.meta["width"], fps=plan.meta["fps"], device=device)
    session = engine.session(seed=0, inputs={"hdmap_video": drive.next_chunk()}, cuda_graphs=cuda_graphs)
    render_ms, emit_ms, chunk_ms, stages = [], [], [], []
    warm = 4  # first chunk, steady eager warm-up, capture, the window filling up
    for c in range(warm + chunks):
        t0 = time.perf_counter()
        video = drive.next_chunk()
        _sync(device)
        t1 = time.perf_counter()
        session.set_input("hdmap_video", video)
        session.timing = c >= warm
        _sync(device)
        t2 = time.perf_counter()
        result = session.step()
        result.frames_cpu()  # waits for the decode only, not for the finalize after it
        t3 = time.perf_counter()
        _sync(device)
        t4 = time.perf_counter()
        if c >= warm:
            render_ms.append((t1 - t0) * 1e3)
            emit_ms.append((t3 - t2) * 1e3)
            chunk_ms.append((t4 - t2) * 1e3)
            stages.append(result.stage_ms())
    flops = plan.meta["block_flops"][-1]
    chunk_med = statistics.median(chunk_ms)
    return {
        "preset": preset,
        "height": plan.meta["height"],
        "width": plan.meta["width"],
        "chunks": chunks,
        "frames_out_ms_p50": statistics.median(emit_ms),
        "frames_out_ms_p99": _pct(emit_ms, 0.99),
        "chunk_ms_p50": chunk_med,
        "chunk_ms_p99": _pct(chunk_ms, 0.99),
        "budget_ms": BUDGET_MS,
        "real_time": statistics.median(emit_ms) <= BUDGET_MS and chunk_med <= BUDGET_MS,
        "stage_ms_p50": {k: statistics.median(s[k] for s in stages) for k in stages[0]} if stages else {},
        "hdmap_render_ms_p50": statistics.median(render_ms),
        "chunk_tflop": flops / 1e12,
        "achieved_tflops": flops / (chunk_med / 1e3) / 1e12,
        "cuda_graphs": cuda_graphs,
    }


def cosmos(preset: str, device, dtype, attention: str, reps: int, peak_tflops: float) -> dict:
    engine = flashdreams.load(
        preset=preset, device=device, dtype=dtype, attention=attention, random_weights=True, decoder=None
    )
    plan, graphs = engine.plan, engine.model.graphs
    gen = torch.Generator(device=device).manual_seed(0)
    lat = plan.latents.shape
    text = plan.inputs["prompt_embeds"].shape
    with torch.no_grad():
        k, v = graphs["encode_prompt"](
            torch.randn(text, generator=gen, device=device), torch.randn(text, generator=gen, device=device)
        )
        x, noise = torch.randn(lat, generator=gen, device=device), torch.randn(lat, generator=gen, device=device)
        cond = torch.randn(lat, generator=gen, device=device)
        t = torch.tensor([593], device=device)
        step = graphs["dit_cfg"]
        ms = time_calls_ms(lambda: step(x, t, k, v, cond, noise), device, reps, warmup=2)
    tokens = lat[2] * (lat[3] // 2) * (lat[4] // 2)
    flops = 2 * lat[0] * forward_flops(step.model.cfg, tokens, tokens, plan.meta["text_len"])
    med = statistics.median(ms)
    evals = plan.meta["schedule"]["evaluations"]
    return {
        "preset": preset,
        "latent_shape": list(lat),
        "tokens": tokens,
        "evaluation_ms_p50": med,
        "evaluation_tflop": flops / 1e12,
        "achieved_tflops": flops / (med / 1e3) / 1e12,
        "matmul_peak_tflops": peak_tflops,
        "fraction_of_peak": flops / (med / 1e3) / 1e12 / peak_tflops,
        "clip_denoise_s_estimate": evals * med / 1e3,
        "evaluations": evals,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="omnidreams,cosmos")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--attention", default="sdpa", choices=("sdpa", "triton"))
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="the tiny presets (a CPU smoke test)")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    parts = set(args.parts.split(","))
    out = {"environment": environment(device), "ceilings": measure_ceilings(device, dtype, quick=args.tiny)}
    if "omnidreams" in parts:
        preset = "omnidreams-sv-tiny" if args.tiny else "omnidreams-sv"
        cg = device.type == "cuda" and not args.no_cuda_graphs
        out["omnidreams"] = omnidreams(preset, device, dtype, args.attention, args.chunks, cg)
        print(json.dumps(out["omnidreams"], indent=1))
    if "cosmos" in parts:
        preset = "cosmos-predict2.5-tiny" if args.tiny else "cosmos-predict2.5-2b"
        peak = out["ceilings"]["matmul_tflops"]
        out["cosmos"] = cosmos(preset, device, dtype, args.attention, args.reps, peak)
        print(json.dumps(out["cosmos"], indent=1))
    path = Path(args.out) if args.out else None
    if path is None and not args.tiny and device.type == "cuda":
        name = torch.cuda.get_device_name(device).split()[-1].lower()
        path = Path(__file__).parent / "results" / f"omnidreams-{name}.json"
    if path is not None:
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
