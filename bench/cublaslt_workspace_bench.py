"""The FP8 GEMMs of a Self-Forcing block under cuBLASLt workspace sizes: time, kernels, memsets.

An FP8 block-5 profile (next110/next111) holds ~930 `Memset` nodes, about one per `_scaled_mm`: each costs a graph
node's launch gap beside its own ~0.7 us. cuBLASLt zeroes workspace for its split-K / stream-K kernels; with less
workspace (torch reads CUBLASLT_WORKSPACE_SIZE, KiB, once per process) it picks kernels that need none. This
times the block's six FP8 GEMM shapes (row-wise scales, fast accumulation, the bias fused, bf16 out, as
`kernels.fp8_linear` calls them) in one CUDA graph per shape, and counts the kernels and memsets one replay
launches; `--sizes` runs each workspace size in a process of its own.

    python bench/cublaslt_workspace_bench.py --sizes default,0,1024 [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


# (model, tokens a call, [(name, K, N)]): Self-Forcing 1.3B at 480x832 (a block of 3 latent frames), Matrix-Game 2.0
# at 352x640, LingBot-World 14B at 464x832, OmniDreams' Cosmos 2B at 704x1280 (a chunk of 2 latent frames).
def _layer(tokens: int, dim: int, ffn: int) -> tuple[int, list[tuple[str, int, int]]]:
    return tokens, [("qkv", dim, 3 * dim), ("o", dim, dim), ("ffn1", dim, ffn), ("ffn2", ffn, dim)]


REPEAT = 30  # GEMMs per graph (a block's layers)
MODELS = {
    "self-forcing": _layer(4680, 1536, 8960),
    "matrix-game": _layer(2640, 1536, 8960),
    "lingbot": _layer(4524, 5120, 13824),
    "omnidreams": _layer(7040, 2048, 8192),
}


def _time(gemm, flops: int, label: str) -> dict:
    """One CUDA graph of REPEAT calls: the median replay's microseconds a call, and the nodes one call adds."""
    import torch

    for _ in range(3):
        gemm()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPEAT):
            gemm()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / REPEAT * 1e3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    memsets = sum("memset" in nm.lower() for nm in names)
    kernels = sorted({nm for nm in names if "memset" not in nm.lower()})
    us = sorted(times)[len(times) // 2]
    print(f"  {label:26s} {us:7.2f} us ({flops / us / 1e6:6.1f} TFLOP/s), memsets a GEMM {memsets / REPEAT:.2f}, "
          f"kernels {kernels}", flush=True)  # fmt: skip
    return {
        "us_per_gemm": round(us, 2),
        "tflops": round(flops / us / 1e6, 1),
        "memsets_per_gemm": memsets / REPEAT,
        "nodes_per_gemm": len(names) / REPEAT,
        "kernels": kernels,
    }


def measure() -> dict:
    import torch

    from flashdreams.benchmark.environment import environment

    dev = torch.device("cuda")
    out = {"environment": environment(dev), "workspace_env": os.environ.get("CUBLASLT_WORKSPACE_SIZE", "default")}
    out["shapes"] = {}
    for model, (tokens, shapes) in MODELS.items():
        for name, k, n in shapes:
            g = torch.Generator(device=dev).manual_seed(0)
            x = torch.randn(tokens, k, device=dev, generator=g).to(torch.float8_e4m3fn)
            w = torch.randn(n, k, device=dev, generator=g).to(torch.float8_e4m3fn)
            sx = torch.rand(tokens, 1, device=dev) + 0.5
            sw = torch.rand(1, n, device=dev) + 0.5
            xb, wb = x.to(torch.bfloat16), w.to(torch.bfloat16)
            bias = torch.zeros(n, device=dev, dtype=torch.bfloat16)
            # With the bias fused, as `kernels.fp8_linear` calls it where torch takes one (the model's kernels are the
            # `_bias_` variants; next114 timed these without it and overstated the gain: LingBot's layer -10% here,
            # its block's GEMMs -0.7%).
            forms = {
                "fp8": lambda x=x, w=w, sx=sx, sw=sw, bias=bias: torch._scaled_mm(
                    x, w.t(), scale_a=sx, scale_b=sw, bias=bias, out_dtype=torch.bfloat16, use_fast_accum=True
                ),
                "bf16": lambda xb=xb, wb=wb, bias=bias: torch.nn.functional.linear(xb, wb, bias),
            }
            for form, gemm in forms.items():
                label = f"{model} {name} {form}"
                out["shapes"][label] = _time(gemm, 2 * tokens * k * n, label)
            del x, w, xb, wb
        for form in ("fp8", "bf16"):
            keys = [key for key in out["shapes"] if key.startswith(model + " ") and key.endswith(form)]
            total = round(sum(out["shapes"][key]["us_per_gemm"] for key in keys), 2)
            out[f"{model} {form} us_per_layer"] = total
            print(f"  {model}: a layer's {form} GEMMs {total} us", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="default,0,1024", help="workspace sizes in KiB ('default': torch's own)")
    ap.add_argument("--out", default=None, help="write every size's results here (JSON)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # (a child process: measure, print JSON)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure()))
        return
    results = []
    for size in args.sizes.split(","):
        env = dict(os.environ)
        env.pop("CUBLASLT_WORKSPACE_SIZE", None)
        if size != "default":
            env["CUBLASLT_WORKSPACE_SIZE"] = size
        print(f"== CUBLASLT_WORKSPACE_SIZE={size}", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--one"], env=env, capture_output=True, text=True, timeout=300)
        lines = proc.stdout.splitlines()
        print("\n".join(ln for ln in lines if not ln.startswith("RESULT ")), flush=True)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], flush=True)
            continue
        results.append(json.loads(next(ln for ln in lines if ln.startswith("RESULT "))[7:]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"results": results}, f, indent=1)


if __name__ == "__main__":
    main()
