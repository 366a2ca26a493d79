"""Benchmark the streaming video decoders (Wan VAE, TAEHV) on one block of latents.

Full-size configs with random weights (speed does not depend on the values), a block of 3
latent frames at 480x832 (latent 60x104) by default. Times the first block of a stream and a
steady-state block (eager, with CUDA events, median of N after warm-up), optionally a CUDA
graph of the steady-state block (the decoder state is static, so it captures), and the
per-latent decode (one latent per call, closer to the reference's frame-by-frame loop) and,
with --compile, torch.compile of the steady-state block.

    python bench/decoders_bench.py                          # H100: bf16, writes bench/results/decoders-h100.json
    python bench/decoders_bench.py --dtype fp16 --out bench/results/decoders-h100-fp16.json
    python bench/decoders_bench.py --device cpu --tiny      # smoke test on a CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from flashdreams.benchmark.environment import time_calls_ms
from flashdreams.models.decoders import DECODER_NAMES, random_decoder, tiny_decoder
from flashdreams.numerics import rel_l2

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> list[float]:
    """Per-call times in ms: CUDA events on a GPU, perf_counter on a CPU."""
    return time_calls_ms(fn, device, iters, warmup)


def summary(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {"median_ms": statistics.median(times), "p10_ms": q[0], "p90_ms": q[-1], "n": len(times)}


def _state_tensors(state) -> list[torch.Tensor]:
    return list(getattr(state, "caches", None) or state.memory)


def _peak(device: torch.device, fn: Callable[[], object]) -> int | None:
    if device.type != "cuda":
        fn()
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device)


LAYOUTS = {"nhwc": torch.channels_last, "nchw": torch.contiguous_format}


def bench_decoder(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """One decoder; "NAME:nhwc" / "NAME:nchw" put its convs' weights in that layout (default: as it loads;
    TAEHV decodes in NCHW, measured faster than NHWC on the H200: next26-h200)."""
    base, _, layout = name.partition(":")
    make = tiny_decoder if args.tiny else random_decoder
    decoder = make(base, device=device, dtype=dtype)
    module = getattr(decoder, "vae", None) or decoder.model
    if layout in LAYOUTS:
        module.to(memory_format=LAYOUTS[layout])
    elif layout:
        raise SystemExit(f"decoders_bench: unknown layout '{layout}' in '{name}' (':nhwc' or ':nchw')")
    b, n, h, w = args.batch, args.block, args.latent_h, args.latent_w
    gen = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(b, 16, n, h, w, device=device, dtype=dtype, generator=gen)
    state = decoder.new_state(b, h, w)
    out: dict = {
        "params": sum(p.numel() for p in module.parameters()),
        "state_bytes": sum(t.numel() * t.element_size() for t in _state_tensors(state)),
        "frames_first": decoder.num_frames(n, first=True),
        "frames_steady": decoder.num_frames(n, first=False),
    }

    def first_block() -> torch.Tensor:
        decoder.reset(state)
        return decoder.decode_block(latents, state)

    def steady_block() -> torch.Tensor:
        return decoder.decode_block(latents, state)

    def per_latent() -> None:
        for i in range(n):
            decoder.decode_block(latents[:, :, i : i + 1], state)

    out["first_block"] = summary(time_ms(first_block, device, args.iters, args.warmup))
    out["peak_mem_first_bytes"] = _peak(device, first_block)
    out["steady_block"] = summary(time_ms(steady_block, device, args.iters, args.warmup))
    out["peak_mem_steady_bytes"] = _peak(device, steady_block)
    med = out["steady_block"]["median_ms"]
    out["steady_fps"] = out["frames_steady"] / (med / 1e3)
    if args.per_latent:
        out["per_latent_block"] = summary(time_ms(per_latent, device, max(3, args.iters // 4), 1))
    if args.cuda_graph and device.type == "cuda":
        out["cuda_graph"] = bench_graph(decoder, state, latents, device, args)
    if args.compile:
        out["compiled"] = bench_compiled(decoder, state, latents, device, args)
    return out


def _layouts_agree(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> float:
    """rel. L2 between TAEHV's streamed frames in NHWC and in NCHW (same weights, 3 blocks)."""
    make = tiny_decoder if args.tiny else random_decoder
    outs = []
    for layout in (torch.channels_last, torch.contiguous_format):
        decoder = make("taehv", device=device, dtype=dtype)
        decoder.model.to(memory_format=layout)
        gen = torch.Generator(device=device).manual_seed(1)
        shape = (args.batch, 16, args.block, args.latent_h, args.latent_w)
        state = decoder.new_state(args.batch, args.latent_h, args.latent_w)
        blocks = [torch.randn(shape, device=device, dtype=dtype, generator=gen) for _ in range(3)]
        outs.append(torch.cat([decoder.decode_block(x, state).float() for x in blocks], 1))
    return rel_l2(outs[0], outs[1])


def bench_graph(decoder, state, latents: torch.Tensor, device: torch.device, args: argparse.Namespace) -> dict:
    """Capture one steady-state block decode and replay it; checks it against eager first."""
    try:
        static_in = latents.clone()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up on a side stream, as capture requires
                decoder.decode_block(static_in, state)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = decoder.decode_block(static_in, state)
        # Same state, eager vs replay: the graph must reproduce the eager decode.
        tensors = _state_tensors(state)
        saved = [t.clone() for t in tensors]
        eager = decoder.decode_block(static_in, state)
        for t, s in zip(tensors, saved):
            t.copy_(s)
        graph.replay()
        _sync(device)
        result = {"rel_l2_vs_eager": rel_l2(static_out, eager)}
        result["steady_block"] = summary(time_ms(graph.replay, device, args.iters, args.warmup))
        result["peak_mem_bytes"] = _peak(device, graph.replay)
        return result
    except Exception as exc:  # report, do not hide: the table says it failed
        return {"error": f"{type(exc).__name__}: {exc}"}


def bench_compiled(decoder, state, latents: torch.Tensor, device: torch.device, args: argparse.Namespace) -> dict:
    """torch.compile of the steady-state block decode (fuses the norms and activations)."""
    try:
        fn = torch.compile(decoder.decode_block, mode=args.compile_mode)
        t0 = time.perf_counter()
        fn(latents, state)
        _sync(device)
        result = {"mode": args.compile_mode, "compile_s": time.perf_counter() - t0}
        result["steady_block"] = summary(time_ms(lambda: fn(latents, state), device, args.iters, args.warmup))
        return result
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version())
        try:
            smi = ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"]
            env["driver"] = subprocess.run(smi, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    else:
        env.update(device=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument(
        "--decoders",
        default=",".join(DECODER_NAMES),
        help="comma-separated: wan-vae,taehv; NAME:nhwc or NAME:nchw sets the convs' layout (taehv,taehv:nhwc)",
    )
    parser.add_argument("--tiny", action="store_true", help="the tiny test-size decoders (a CPU smoke run)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--block", type=int, default=3, help="latent frames per block")
    parser.add_argument("--latent-h", type=int, default=None, help="default 60 (480 px), 8 with --tiny")
    parser.add_argument("--latent-w", type=int, default=None, help="default 104 (832 px), 8 with --tiny")
    parser.add_argument("--iters", type=int, default=None, help="timed calls (default 20; 3 with --tiny)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false")
    parser.add_argument("--no-per-latent", dest="per_latent", action="store_false")
    parser.add_argument("--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the steady block")
    parser.add_argument("--compile-mode", default="max-autotune-no-cudagraphs")
    parser.add_argument("--out", default="bench/results/decoders-h100.json")
    args = parser.parse_args()
    args.latent_h = args.latent_h or (8 if args.tiny else 60)
    args.latent_w = args.latent_w or (8 if args.tiny else 104)
    args.iters = args.iters or (3 if args.tiny else 20)
    if args.tiny:
        args.warmup = min(args.warmup, 1)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    names = [s.strip() for s in args.decoders.split(",") if s.strip()]
    config = {k: v for k, v in vars(args).items() if k not in ("out",)}
    config["pixels"] = [args.latent_h * 8, args.latent_w * 8]
    report = {"environment": environment(device), "config": config, "results": {}}
    for name in names:
        report["results"][name] = bench_decoder(name, args, device, dtype)
    if len({n for n in names if n.partition(":")[0] == "taehv"}) > 1:  # layouts compared: they must agree
        report["taehv_layouts_rel_l2"] = _layouts_agree(args, device, dtype)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))

    env = report["environment"]
    print(
        f"{env['device']}  torch {env['torch']}  {args.dtype}  block {args.block} latents at "
        f"{args.latent_h}x{args.latent_w} (batch {args.batch})"
    )
    columns = [("decoder", 9), ("first ms", 9), ("steady ms", 10), ("graph ms", 9), ("per-lat ms", 10)]
    columns += [("fps", 7), ("peak GiB", 9)]
    print(" ".join(f"{label:<{width}}" if i == 0 else f"{label:>{width}}" for i, (label, width) in enumerate(columns)))
    for name, r in report["results"].items():
        graph = r.get("cuda_graph", {})
        g = f"{graph['steady_block']['median_ms']:.2f}" if "steady_block" in graph else ("err" if graph else "-")
        pl = f"{r['per_latent_block']['median_ms']:.2f}" if "per_latent_block" in r else "-"
        peak = r["peak_mem_steady_bytes"]
        peak_gib = peak / 2**30 if peak else float("nan")
        print(
            f"{name:<9} {r['first_block']['median_ms']:>9.2f} {r['steady_block']['median_ms']:>10.2f} {g:>9} "
            f"{pl:>10} {r['steady_fps']:>7.1f} {peak_gib:>9.2f}"
        )
        if "error" in graph:
            print(f"  cuda graph failed: {graph['error']}")
        elif "rel_l2_vs_eager" in graph:
            print(f"  cuda graph vs eager rel_l2 {graph['rel_l2_vs_eager']:.2e}")
        compiled = r.get("compiled", {})
        if "error" in compiled:
            print(f"  torch.compile failed: {compiled['error']}")
        elif compiled:
            median = compiled["steady_block"]["median_ms"]
            print(
                f"  torch.compile ({compiled['mode']}): steady {median:.2f} ms, compile {compiled['compile_s']:.0f} s"
            )
    if "taehv_layouts_rel_l2" in report:
        print(f"taehv NHWC vs NCHW frames rel_l2 {report['taehv_layouts_rel_l2']:.2e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
