"""Where a block's time goes: one block under torch.profiler, its kernels summed by kind.

fd-bench --profile-block N runs a session up to block N (unprofiled), then block N under
the profiler, and reports device time per category (communication in a context-parallel
session, attention, GEMM, fused norm/modulation/RoPE, convolution, copies, other), the top
kernels, and how much of the
block's wall time the kernels cover (the rest is the GPU idling: launch gaps, host waits).
On CUDA the kernels are the device activity CUPTI records (kernels replayed inside CUDA
graphs included); on CPU the operators' self times stand in for kernels.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

import torch

# (category, substrings of a lower-cased kernel/op name), first match wins: collectives first, the attention
# kernels are named before GEMMs (ring_attention_fp8 contains "fp8"), Inductor's GEMM
# templates ("triton_tem_fused_mm") before its fused pointwise/reduction kernels.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    # collectives of a context-parallel session: NCCL's kernels on CUDA, the c10d / gloo ops on a CPU
    ("communication", ("nccl", "c10d::", "gloo", "record_param_comms", "all_to_all", "alltoall", "all_gather")),
    ("attention", ("attention", "attn", "flash", "fmha", "sdpa", "scaled_dot_product", "_merge")),
    (
        "gemm",
        (
            "gemm",
            "xmma",
            "cutlass",
            "nvjet",
            "cublas",
            "addmm",
            "aten::mm",
            "aten::bmm",
            "matmul",
            "_mm_",
            "tem_fused",
            "fp8_linear",
            "scaled_mm",
            "aten::linear",
        ),
    ),
    # not a bare "conv": Inductor names kernels "..._convert_element_type_..."
    ("conv", ("convolution", "conv2d", "conv3d", "aten::conv", "cudnn", "implicit_convolve", "winograd", "fprop")),
    (
        "elementwise/norm/rope",
        (
            "elementwise",
            "vectorized",
            "aten::mul",
            "aten::add",
            "gelu",
            "silu",
            "adaln",
            "layer_norm",
            "rms",
            "rope",
            "qk_norm",
            "norm",
            "modulat",
            "triton_",
            "fused",
        ),
    ),
    ("copy/fill", ("memcpy", "memset", "copy", "fill", "cat", "index_put", "scatter")),
]


def kernel_category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def _device_events(prof, device: torch.device) -> list[tuple[str, float]]:
    """(name, microseconds) of every kernel (CUDA) or every op's self time (CPU)."""
    out = []
    for e in prof.events():
        if device.type == "cuda":
            if e.device_type == torch.autograd.DeviceType.CUDA:
                out.append((e.name, e.time_range.elapsed_us()))
        elif e.device_type == torch.autograd.DeviceType.CPU and e.self_cpu_time_total > 0:
            out.append((e.name, e.self_cpu_time_total))
    return out


def summarise_kernels(events: list[tuple[str, float]], wall_ms: float, top: int = 20) -> dict:
    """Per-category and per-kernel device time of one profiled block."""
    by_cat: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for name, us in events:
        c = by_cat[kernel_category(name)]
        c[0] += us / 1e3
        c[1] += 1
        k = by_name[name]
        k[0] += us / 1e3
        k[1] += 1
    total = sum(v[0] for v in by_cat.values())
    cats = {
        cat: {"ms": round(ms, 3), "count": int(n), "share": round(ms / total, 4) if total else 0.0}
        for cat, (ms, n) in sorted(by_cat.items(), key=lambda kv: -kv[1][0])
    }
    kernels = [
        {"name": name[:160], "category": kernel_category(name), "ms": round(ms, 3), "count": int(n)}
        for name, (ms, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    ]
    return {
        "wall_ms": round(wall_ms, 3),
        "kernel_ms": round(total, 3),
        "kernel_coverage": round(total / wall_ms, 4) if wall_ms > 0 else None,
        "categories": cats,
        "top_kernels": kernels,
    }


def profile_call(fn: Callable[[], object], device: torch.device) -> tuple[dict, object]:
    """Profile one call of `fn` (warmed up already, so no capture or compile inside): (the summary of its
    kernels, what `fn` returned)."""
    from torch.profiler import ProfilerActivity, profile

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - t0) * 1e3
    return summarise_kernels(_device_events(prof, device), wall_ms), result


def profile_block(session, block: int) -> dict:
    """Reset the session, run blocks 0..block-1, profile block `block`; the summary of its kernels."""
    session.reset()
    for _ in range(block):
        session.step()
    out, result = profile_call(session.step, session.device)
    out["block"] = block
    out["stage_ms"] = result.stage_ms() if getattr(session, "timing", False) else None
    out["cuda_graphs"] = bool(getattr(session, "cuda_graphs", False))
    return out
