"""FP8 attention and linears at Self-Forcing's shapes, beside bf16, with the quality each costs.

One script, one device call (< 4 min on the H100). Sections, each in its own process so that a
crash (a kernel that faults, a compiler abort) costs only that section, and each measurement
wrapped so that a failure is recorded, not fatal:

  attention  B 1, Lq 4680, 12 heads of d 128, bf16 ring of 32760 rows, valid 4680..32760:
             fp8 ring attention (fp8 P@V with fp32 / tensor-core accumulation; fp8 QK^T with
             bf16 P@V), its K/V pre-pass and kernel alone, our bf16 Triton kernel and cuDNN SDPA.
             TFLOP/s (4 Lq kv d N per call); rel. L2 of each against exact fp32 attention on the
             first 512 query rows, and of the fp8 kernels against their emulating twin (flagged
             above 1.5e-2, or when the kernel's error exceeds the twin's by > 10%). Quality also
             with V given a common component (mean 0.5).
  gemm       the DiT's linears at M 4680: D->D 1536x1536, D->ffn 1536x8960, ffn->D 8960x1536:
             bf16 F.linear vs fp8_linear (activation quantization included; also alone, and
             `_scaled_mm` alone, with and without fast accumulation); rel. L2 vs fp32.
  peak       bf16 matmul 8192^3 and fp8 `_scaled_mm` 8192^3 (tensor-wise and row-wise scales).
  sweep      FP8_SWEEP_CONFIGS at kv 28080 (both P@V variants), each checked like the above;
             time-boxed, the rest of the budget.

Timings are medians of `triton.testing.do_bench` over a CUDA-graph replay (L2 wiped before each
call). A projection for block 5 (kv 28080, 30 layers, 5 forwards: 4 denoise + commit) from the
measured attention and linears is printed with the table (norms, RoPE, cross-attention and
elementwise work are not in it).

    python bench/fp8_bench.py                      # H100: writes bench/results/fp8-h100.json
    python bench/fp8_bench.py --smoke              # CPU, Triton interpreter, tiny shapes (seconds)
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flashdreams.numerics import rel_l2  # noqa: E402

SECTIONS = ("attention", "gemm", "peak", "sweep")
# Seconds each section may take at most (the sweep gets what is left of --budget-s).
SECTION_CAPS = {"attention": 100.0, "gemm": 50.0, "peak": 30.0, "sweep": 120.0}
# fp8 kernel vs its emulating twin. The math is the same; on the GPU the fp8 wgmma's accumulator
# keeps ~14 fraction bits (and exp2 is approximate), which moves ~0.2% of P values across an e4m3
# rounding boundary: a few 1e-3 of rel. L2. A wrong scale or a lost tile costs more than 1.5e-2,
# and the kernel's error against exact attention must also match the twin's (within 10% + 1e-3).
TWIN_STRICT = 1.5e-2
EXACT_LIMIT = 0.08  # fp8 vs exact attention at unit-RMS q/k, zero-mean V (the twin's cost is ~5%)


def twin_agrees(err_twin: float, err_exact: float, twin_err_exact: float) -> bool:
    return err_twin < TWIN_STRICT and err_exact < 1.1 * twin_err_exact + 1e-3


@dataclasses.dataclass(frozen=True)
class Shapes:
    batch: int
    lq: int
    heads: int
    head_dim: int
    capacity: int
    kvs: tuple[int, ...]
    check_rows: int
    sweep_kv: int
    block_kv: int  # the KV length of "block 5", for the projection
    m: int  # GEMM rows (tokens)
    dim: int
    ffn: int
    peak_n: int
    layers: int


SELF_FORCING = Shapes(
    1, 4680, 12, 128, 32760, (4680, 9360, 14040, 18720, 23400, 28080, 32760), 512, 28080, 28080,
    4680, 1536, 8960, 8192, 30,
)  # fmt: skip
SMOKE = Shapes(1, 45, 2, 64, 300, (150, 300), 45, 300, 300, 37, 64, 128, 256, 2)


# ----------------------------------------------------------------------------- helpers


GRAPH_FALLBACKS: list[str] = []


def make_timer(smoke: bool) -> Callable[..., float]:
    """Median ms: a CUDA graph of fn replayed under do_bench (fn timed as launched if capture fails)."""
    if smoke:

        def cpu_ms(fn: Callable[[], object], label: str = "") -> float:
            fn()
            ts = []
            for _ in range(2):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(ts)

        return cpu_ms

    import triton.testing

    def gpu_ms(fn: Callable[[], object], label: str = "") -> float:
        fn()  # compile outside the capture
        torch.cuda.synchronize()
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            run = graph.replay
        except Exception as e:  # noqa: BLE001
            GRAPH_FALLBACKS.append(f"{label}: {type(e).__name__}: {str(e)[:160]}")
            torch.cuda.synchronize()
            graph, run = None, fn
        t = float(triton.testing.do_bench(run, warmup=10, rep=60, return_mode="median"))
        del graph, run
        return t

    return gpu_ms


def attempt(fn: Callable[[], dict]) -> dict:
    """One measurement; an exception is recorded (type, first line, last frame), never raised."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the bench records and goes on
        tb = traceback.extract_tb(e.__traceback__)
        where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
        msg = str(e).strip().splitlines()
        return {"error": f"{type(e).__name__}: {msg[0][:300] if msg else ''} ({where})"}


def environment(dev: torch.device) -> dict:
    env: dict = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(dev)}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        env.update(name=p.name, sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}")
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            env["nvidia_smi"] = out.stdout.strip().splitlines()[0]
        except Exception as e:  # noqa: BLE001
            env["nvidia_smi"] = f"unavailable: {e}"
    try:
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except Exception:  # noqa: BLE001
        env["git_commit"] = None
    return env


class Recorder:
    """A section's result dict, rewritten to disk after every entry (a killed child keeps its part)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.data: dict = {}

    def put(self, key: str, value) -> None:
        self.data[key] = value
        self.flush()

    def flush(self) -> None:
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, default=str))
            tmp.replace(self.path)


def rms_normed(shape: tuple[int, ...], g: torch.Generator, dev: torch.device) -> torch.Tensor:
    x = torch.randn(*shape, device=dev, generator=g)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))


# ----------------------------------------------------------------------------- attention


def attention_section(sh: Shapes, dev: torch.device, ms: Callable, rec: Recorder, smoke: bool) -> None:
    from flashdreams.kernels.ring_attention import launch_ring_attention, ring_attention_reference
    from flashdreams.kernels.ring_attention_configs import pick_config
    from flashdreams.kernels.ring_attention_fp8 import (
        launch_ring_attention_fp8,
        launch_ring_attention_fp8_quantized,
        pick_fp8_config,
        quantize_kv_fp8,
        ring_attention_fp8_reference,
    )

    g = torch.Generator(device=dev).manual_seed(0)
    B, L, H, d, S = sh.batch, sh.lq, sh.heads, sh.head_dim, sh.capacity
    q = rms_normed((B, L, H, d), g, dev).to(torch.bfloat16)  # Wan's q/k are RMS-normalised
    kc = rms_normed((B, S, H, d), g, dev).to(torch.bfloat16)
    vc = torch.randn(B, S, H, d, device=dev, generator=g).to(torch.bfloat16)
    scale = 1.0 / math.sqrt(d)
    cfg = pick_fp8_config(q)
    cfg_tc = dataclasses.replace(cfg, precise_pv=False)
    rec.put(
        "setup",
        {
            "q_k": "unit RMS per head vector",
            "v": "N(0, 1)",
            "fp8_config": dataclasses.asdict(cfg),
            "bf16_config": dataclasses.asdict(pick_config(q, S)),
        },
    )

    def vl(kv: int) -> torch.Tensor:
        return torch.tensor([kv], device=dev, dtype=torch.int32)

    def flops(kv: int) -> float:
        return 4.0 * B * L * kv * d * H

    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa_backend = SDPBackend.MATH if smoke else SDPBackend.CUDNN_ATTENTION
    qt = q.transpose(1, 2)

    def sdpa(kv: int):
        with sdpa_kernel([sdpa_backend]):
            return F.scaled_dot_product_attention(qt, kc[:, :kv].transpose(1, 2), vc[:, :kv].transpose(1, 2))

    variants: dict[str, Callable[[torch.Tensor], object]] = {
        "fp8": lambda lens: launch_ring_attention_fp8(q, kc, vc, lens, scale, cfg, True),
        "fp8_tc_accum": lambda lens: launch_ring_attention_fp8(q, kc, vc, lens, scale, cfg_tc, True),
        "fp8qk_bf16pv": lambda lens: launch_ring_attention_fp8(q, kc, vc, lens, scale, cfg, False),
        "bf16_triton": lambda lens: launch_ring_attention(q, kc, vc, lens, scale),
    }
    # Quality on the first check_rows queries at the block-5 ring and the full ring.
    rows = sh.check_rows

    def quality_at(kv: int) -> dict:
        lens = vl(kv)
        ref = ring_attention_reference(q[:, :rows].float(), kc, vc, lens, scale)
        twins: dict = {}
        entry: dict = {}
        for name, fn in variants.items():

            def check(fn=fn, name=name) -> dict:
                out = fn(lens)[0][:, :rows]
                res = {"rel_l2_vs_exact": rel_l2(out, ref), "finite": bool(torch.isfinite(out).all())}
                if name.startswith("fp8"):
                    pv = name != "fp8qk_bf16pv"
                    if pv not in twins:
                        twins[pv] = ring_attention_fp8_reference(
                            q[:, :rows], kc, vc, lens, scale, pv_fp8=pv, block_n=cfg.block_n
                        )
                    res["rel_l2_vs_twin"] = rel_l2(out, twins[pv])
                    res["twin_rel_l2_vs_exact"] = rel_l2(twins[pv], ref)
                    if name != "fp8_tc_accum":  # the tensor-core accumulation is expected to drift
                        res["twin_ok"] = twin_agrees(
                            res["rel_l2_vs_twin"], res["rel_l2_vs_exact"], res["twin_rel_l2_vs_exact"]
                        )
                    res["exact_ok"] = res["finite"] and res["rel_l2_vs_exact"] < EXACT_LIMIT
                return res

            entry[name] = attempt(check)
            rec.put("quality", {**quality, str(kv): entry})  # progress, in case a kernel faults
        entry["sdpa"] = attempt(lambda: {"rel_l2_vs_exact": rel_l2(sdpa(kv).transpose(1, 2)[:, :rows], ref)})
        return entry

    # Correctness first (one call of each variant), then the timings.
    quality: dict = {}
    for kv in sorted({sh.block_kv, sh.kvs[-1]}):
        quality[str(kv)] = attempt(lambda kv=kv: quality_at(kv))
        rec.put("quality", quality)

    timings: dict[str, list] = {name: [] for name in [*variants, "sdpa", "fp8_prepass", "fp8_kernel_only"]}
    for kv in sh.kvs:
        lens = vl(kv)
        for name, fn in variants.items():

            def one(fn=fn, lens=lens, name=name, kv=kv) -> dict:
                t = ms(lambda: fn(lens), f"{name} kv {kv}")
                return {"kv": kv, "ms": t, "tflops": flops(kv) / t / 1e9}

            timings[name].append(attempt(one))

        def one_sdpa(kv=kv) -> dict:
            t = ms(lambda: sdpa(kv), f"sdpa kv {kv}")
            return {"kv": kv, "ms": t, "tflops": flops(kv) / t / 1e9, "backend": str(sdpa_backend)}

        timings["sdpa"].append(attempt(one_sdpa))

        def split(kv=kv, lens=lens) -> tuple[dict, dict]:
            t_pre = ms(lambda: quantize_kv_fp8(kc, vc, lens, cfg.block_n, True), f"prepass kv {kv}")
            kvq = quantize_kv_fp8(kc, vc, lens, cfg.block_n, True)
            t_k = ms(lambda: launch_ring_attention_fp8_quantized(q, kvq, vc, lens, scale, cfg, True), f"kernel kv {kv}")
            moved = 2 * kv * H * d * 2 + 2 * kv * H * d + 3 * kv * H * 4  # bf16 in, fp8 + scales out
            return (
                {"kv": kv, "ms": t_pre, "gbps": moved / t_pre / 1e6},
                {"kv": kv, "ms": t_k, "tflops": flops(kv) / t_k / 1e9},
            )

        r = attempt(lambda split=split: dict(zip(("pre", "kern"), split())))
        timings["fp8_prepass"].append(r.get("pre", r))
        timings["fp8_kernel_only"].append(r.get("kern", r))
        rec.put("timings", timings)

    # V with a common component (real values have one): the relative cost shrinks.
    def offset_v() -> dict:
        kv = sh.block_kv
        lens = vl(kv)
        v2 = (vc.float() + 0.5).to(torch.bfloat16)
        ref = ring_attention_reference(q[:, :rows].float(), kc, v2, lens, scale)
        return {
            "kv": kv,
            "v": "N(0.5, 1)",
            "fp8": rel_l2(launch_ring_attention_fp8(q, kc, v2, lens, scale, cfg, True)[0][:, :rows], ref),
            "fp8qk_bf16pv": rel_l2(launch_ring_attention_fp8(q, kc, v2, lens, scale, cfg, False)[0][:, :rows], ref),
            "bf16_triton": rel_l2(launch_ring_attention(q, kc, v2, lens, scale)[0][:, :rows], ref),
        }

    rec.put("quality_v_mean_0.5", attempt(offset_v))


# ----------------------------------------------------------------------------- GEMMs


def gemm_section(sh: Shapes, dev: torch.device, ms: Callable, rec: Recorder, smoke: bool) -> None:
    from flashdreams.kernels.fp8_linear import (
        _scaled_mm_takes_bias,
        fp8_linear,
        fp8_linear_reference,
        quantize_rows_fp8,
        quantize_weight_fp8,
    )

    g = torch.Generator(device=dev).manual_seed(1)
    M = sh.m
    shapes = {"D->D": (sh.dim, sh.dim), "D->ffn": (sh.dim, sh.ffn), "ffn->D": (sh.ffn, sh.dim)}
    per_layer = {"D->D": 6, "D->ffn": 1, "ffn->D": 1}  # self q/k/v/o + cross q/o; ffn.0; ffn.2
    rec.put("setup", {"M": M, "shapes_K_N": shapes, "per_layer_count": per_layer})
    if dev.type == "cuda":
        rec.put("scaled_mm_fused_bias", attempt(lambda: {"ok": _scaled_mm_takes_bias(dev)}))
    out: dict = {}
    for name, (K, N) in shapes.items():
        x = torch.randn(M, K, device=dev, generator=g).to(torch.bfloat16)
        w = (torch.randn(N, K, device=dev, generator=g) / math.sqrt(K)).to(torch.bfloat16)
        b = (torch.randn(N, device=dev, generator=g) * 0.1).to(torch.bfloat16)
        w8, sw = quantize_weight_fp8(w)
        fl = 2.0 * M * K * N
        ref = F.linear(x.float(), w.float(), b.float())
        row: dict = {"K": K, "N": N, "gflop": fl / 1e9}

        def timed(fn: Callable[[], object], label: str, flop: float = fl, name: str = name) -> dict:
            t = ms(fn, f"{name} {label}")
            return {"ms": t, "tflops": flop / t / 1e9}

        def bf16(x=x, w=w, b=b, ref=ref) -> dict:
            return {**timed(lambda: F.linear(x, w, b), "bf16"), "rel_l2_vs_fp32": rel_l2(F.linear(x, w, b), ref)}

        row["bf16"] = attempt(bf16)
        for fast in (False, True):
            tag = "fp8_fast_accum" if fast else "fp8"

            def fp8(fast=fast, x=x, w8=w8, sw=sw, b=b, ref=ref) -> dict:
                y = fp8_linear(x, w8, sw, b, use_fast_accum=fast)
                r = timed(lambda: fp8_linear(x, w8, sw, b, use_fast_accum=fast), "fp8 total")
                r["rel_l2_vs_fp32"] = rel_l2(y, ref)
                r["rel_l2_vs_reference"] = rel_l2(y, fp8_linear_reference(x, w8, sw, b))
                r["reference_ok"] = r["rel_l2_vs_reference"] < (2e-2 if fast else 5e-3)
                if dev.type == "cuda":
                    x8, sx = quantize_rows_fp8(x)
                    r["scaled_mm_only"] = timed(
                        lambda: torch._scaled_mm(
                            x8, w8.t(), sx[:, None], sw[None, :], out_dtype=torch.bfloat16, use_fast_accum=fast
                        ),
                        "scaled_mm",
                    )
                return r

            row[tag] = attempt(fp8)

        def quant(x=x, K=K, name=name) -> dict:
            t = ms(lambda: quantize_rows_fp8(x), f"{name} quant")
            return {"ms": t, "gbps": M * K * 3 / t / 1e6}  # read bf16, write e4m3

        row["act_quant"] = attempt(quant)
        out[name] = row
        rec.put("shapes", out)
        del x, w, b, w8, sw, ref

    def per_forward() -> dict:
        res = {}
        for tag in ("bf16", "fp8", "fp8_fast_accum"):
            if all("ms" in out[n].get(tag, {}) for n in shapes):
                per = sum(per_layer[n] * out[n][tag]["ms"] for n in shapes)
                res[tag] = {"ms_per_layer": per, "ms_per_forward": per * sh.layers}
        return res

    rec.put("per_forward", attempt(per_forward))


# ----------------------------------------------------------------------------- peak


def peak_section(sh: Shapes, dev: torch.device, ms: Callable, rec: Recorder, smoke: bool) -> None:
    n = sh.peak_n
    g = torch.Generator(device=dev).manual_seed(2)
    a = torch.randn(n, n, device=dev, generator=g).to(torch.bfloat16)
    b = torch.randn(n, n, device=dev, generator=g).to(torch.bfloat16)
    fl = 2.0 * n**3
    rec.put("n", n)
    rec.put("bf16_matmul", attempt(lambda: (lambda t: {"ms": t, "tflops": fl / t / 1e9})(ms(lambda: a @ b, "bf16"))))
    if dev.type != "cuda":
        rec.put("fp8_scaled_mm", {"skipped": "torch._scaled_mm needs CUDA"})
        return
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    b8t = b8.t().contiguous().t()  # column-major second operand
    one = torch.tensor(1.0, device=dev)
    ra, rb = torch.ones(n, 1, device=dev), torch.ones(1, n, device=dev)
    res = {}
    for tag, sa, sb in (("tensorwise", one, one), ("rowwise", ra, rb)):
        for fast in (False, True):

            def run(sa=sa, sb=sb, fast=fast, tag=tag) -> dict:
                t = ms(
                    lambda: torch._scaled_mm(a8, b8t, sa, sb, out_dtype=torch.bfloat16, use_fast_accum=fast),
                    f"fp8 {tag} {fast}",
                )
                return {"ms": t, "tflops": fl / t / 1e9}

            res[f"{tag}{'_fast_accum' if fast else ''}"] = attempt(run)
            rec.put("fp8_scaled_mm", res)


# ----------------------------------------------------------------------------- sweep


def sweep_section(sh: Shapes, dev: torch.device, ms: Callable, rec: Recorder, smoke: bool, deadline: float) -> None:
    from flashdreams.kernels.ring_attention import ring_attention_reference
    from flashdreams.kernels.ring_attention_fp8 import (
        FP8_SWEEP_CONFIGS,
        Fp8AttnConfig,
        launch_ring_attention_fp8,
        ring_attention_fp8_reference,
    )

    g = torch.Generator(device=dev).manual_seed(3)
    B, L, H, d, S = sh.batch, sh.lq, sh.heads, sh.head_dim, sh.capacity
    q = rms_normed((B, L, H, d), g, dev).to(torch.bfloat16)
    kc = rms_normed((B, S, H, d), g, dev).to(torch.bfloat16)
    vc = torch.randn(B, S, H, d, device=dev, generator=g).to(torch.bfloat16)
    kv, rows, scale = sh.sweep_kv, sh.check_rows, 1.0 / math.sqrt(d)
    lens = torch.tensor([kv], device=dev, dtype=torch.int32)
    exact = ring_attention_reference(q[:, :rows].float(), kc, vc, lens, scale)
    twins: dict = {}
    configs = (
        [Fp8AttnConfig(32, 32, 1, 1, splits=1), Fp8AttnConfig(32, 64, 1, 1, splits=2, use_tma=True)]
        if smoke
        else FP8_SWEEP_CONFIGS
    )
    plan = [(c, True) for c in configs] + [(c, False) for c in configs if c.precise_pv][:5]
    rows_out: list = []
    rec.put("kv", kv)
    for cfg, pv in plan:
        entry: dict = {"config": dataclasses.asdict(cfg), "pv_fp8": pv}
        if time.time() > deadline - 8:
            entry["skipped"] = "time budget"
            rows_out.append(entry)
            continue

        def run(cfg=cfg, pv=pv) -> dict:
            out = launch_ring_attention_fp8(q, kc, vc, lens, scale, cfg, pv)[0][:, :rows]
            key = (cfg.block_n, cfg.splits, pv)
            if key not in twins:
                twins[key] = ring_attention_fp8_reference(
                    q[:, :rows], kc, vc, lens, scale, pv_fp8=pv, block_n=cfg.block_n, splits=cfg.splits
                )
            err_twin, err_exact = rel_l2(out, twins[key]), rel_l2(out, exact)
            ok = bool(torch.isfinite(out).all()) and err_exact < EXACT_LIMIT
            if cfg.precise_pv:
                ok = ok and twin_agrees(err_twin, err_exact, rel_l2(twins[key], exact))
            t = ms(lambda: launch_ring_attention_fp8(q, kc, vc, lens, scale, cfg, pv), f"sweep {cfg} {pv}")
            return {
                "ms": t,
                "tflops": 4.0 * B * L * kv * d * H / t / 1e9,
                "rel_l2_vs_twin": err_twin,
                "rel_l2_vs_exact": err_exact,
                "ok": ok,
            }

        entry.update(attempt(run))
        rows_out.append(entry)
        rec.put("configs", rows_out)
    best = {}
    for tag, pv, precise in (("pv_fp8", True, True), ("pv_fp8_tc_accum", True, False), ("pv_bf16", False, True)):
        good = [r for r in rows_out if r.get("ok") and r["pv_fp8"] == pv and r["config"]["precise_pv"] == precise]
        best[tag] = max(good, key=lambda r: r["tflops"]) if good else None
    rec.put("best", best)


# ----------------------------------------------------------------------------- driver


def run_section(name: str, smoke: bool, rec: Recorder, deadline: float) -> None:
    dev = torch.device("cpu" if smoke else "cuda")
    from flashdreams.kernels import require_triton

    require_triton(dev)
    sh = SMOKE if smoke else SELF_FORCING
    ms = make_timer(smoke)
    t0 = time.perf_counter()
    try:
        if name == "attention":
            attention_section(sh, dev, ms, rec, smoke)
        elif name == "gemm":
            gemm_section(sh, dev, ms, rec, smoke)
        elif name == "peak":
            peak_section(sh, dev, ms, rec, smoke)
        elif name == "sweep":
            sweep_section(sh, dev, ms, rec, smoke, deadline)
        else:
            raise ValueError(f"unknown section {name}")
    except Exception as e:  # noqa: BLE001
        rec.data["section_error"] = f"{type(e).__name__}: {e}"[:500]
        rec.data["traceback"] = traceback.format_exc()[-2000:]
    rec.data["graph_capture_fallbacks"] = GRAPH_FALLBACKS
    rec.data["seconds"] = round(time.perf_counter() - t0, 1)
    rec.data["done"] = True
    rec.flush()


def run_isolated(name: str, smoke: bool, timeout: float, deadline: float, workdir: Path) -> dict:
    """The section in a child process; whatever it wrote survives a crash or a timeout."""
    path = workdir / f"{name}.json"
    err = workdir / f"{name}.stderr"
    cmd = [sys.executable, os.path.abspath(__file__), "--section", name, "--child-out", str(path)]
    cmd += ["--deadline", str(deadline)] + (["--smoke"] if smoke else [])
    t0 = time.perf_counter()
    status: dict = {}
    with open(err, "w") as ferr:
        try:
            proc = subprocess.run(cmd, stderr=ferr, timeout=max(timeout, 5.0))
            status["returncode"] = proc.returncode
        except subprocess.TimeoutExpired:
            status["timeout_s"] = round(timeout, 1)
    data: dict = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            data = {"section_error": f"unreadable partial result: {e}"}
    status["wall_s"] = round(time.perf_counter() - t0, 1)
    if status.get("returncode", 0) != 0 or "timeout_s" in status or not data.get("done"):
        tail = err.read_text()[-3000:] if err.exists() else ""
        status["stderr_tail"] = tail
        print(f"[{name}] incomplete: {json.dumps({k: v for k, v in status.items() if k != 'stderr_tail'})}")
        print(tail[-1500:])
    data["process"] = status
    return data


def fmt(x: dict, key: str = "tflops", width: int = 9) -> str:
    if not isinstance(x, dict) or key not in x:
        return f"{'err':>{width}}"
    return f"{x[key]:>{width}.1f}"


def print_table(r: dict) -> None:
    env = r["env"]
    print(f"\n== {env.get('name', env['device'])}  torch {env['torch']}  triton {env.get('triton')}")
    pk = r.get("peak", {})
    line = f"peak: bf16 matmul {fmt(pk.get('bf16_matmul', {}), width=0)} TFLOP/s"
    for k, v in (pk.get("fp8_scaled_mm") or {}).items():
        if isinstance(v, dict) and "tflops" in v:
            line += f" | fp8 {k} {v['tflops']:.0f}"
    print(line)
    a = r.get("attention", {})
    tm = a.get("timings", {})
    if tm:
        names = [
            n for n in ("fp8", "fp8_tc_accum", "fp8qk_bf16pv", "fp8_kernel_only", "bf16_triton", "sdpa") if n in tm
        ]
        print(f"attention TFLOP/s (Lq {r['shapes']['lq']}):")
        print("  kv     " + "".join(f"{n:>16}" for n in names) + f"{'prepass ms':>12}")
        for i in range(len(tm[names[0]])):
            kv = tm[names[0]][i].get("kv", "?")
            pre = tm.get("fp8_prepass", [{}] * (i + 1))[i]
            cells = "".join(fmt(tm[n][i], width=16) for n in names)
            print(f"  {kv!s:<7}{cells}{fmt(pre, 'ms', 12) if 'ms' in pre else '         err'}")
    for kv, entry in (a.get("quality") or {}).items():
        if "error" in entry:
            print(f"  quality kv {kv}: {entry['error']}")
            continue
        parts = []
        for n, e in entry.items():
            if "rel_l2_vs_exact" in e:
                s = f"{n} {e['rel_l2_vs_exact']:.4f}"
                if "rel_l2_vs_twin" in e:
                    s += f" (twin {e['rel_l2_vs_twin']:.1e}{'' if e.get('twin_ok', True) else ' FAIL'})"
                parts.append(s)
            else:
                parts.append(f"{n} {e.get('error', '?')[:60]}")
        print(f"  rel L2 vs exact, kv {kv}: " + "; ".join(parts))
    if "quality_v_mean_0.5" in a:
        print("  V ~ N(0.5, 1):", json.dumps(a["quality_v_mean_0.5"]))
    gm = r.get("gemm", {})
    if gm.get("shapes"):
        print(f"linears (M {gm.get('setup', {}).get('M')}) TFLOP/s [rel L2 vs fp32]:")
        for n, row in gm["shapes"].items():
            cells = []
            for tag in ("bf16", "fp8", "fp8_fast_accum"):
                e = row.get(tag, {})
                cells.append(
                    f"{tag} {e['tflops']:.0f} [{e.get('rel_l2_vs_fp32', float('nan')):.3f}]"
                    if "tflops" in e
                    else f"{tag} {e.get('error', 'err')[:50]}"
                )
                if "scaled_mm_only" in e and "tflops" in e["scaled_mm_only"]:
                    cells[-1] += f" (mm {e['scaled_mm_only']['tflops']:.0f})"
            q = row.get("act_quant", {})
            qs = f"quant {q['ms'] * 1e3:.0f} us" if "ms" in q else ""
            print(f"  {n:<7} " + " | ".join(cells) + f" | {qs}")
        if gm.get("per_forward"):
            print(
                "  per forward (30 layers):", {k: round(v["ms_per_forward"], 2) for k, v in gm["per_forward"].items()}
            )
    sw = r.get("sweep", {})
    if sw.get("configs"):
        print(f"sweep at kv {sw.get('kv')}:")
        for row in sw["configs"]:
            c = row["config"]
            tag = (
                f"{c['block_m']}x{c['block_n']} w{c['num_warps']} s{c['num_stages']} sp{c['splits']} "
                f"tma{int(c['use_tma'])} ws{int(c['warp_specialize'])} prec{int(c['precise_pv'])} "
                f"pv{'8' if row['pv_fp8'] else '16'}"
            )
            if "tflops" in row:
                val = f"{row['tflops']:.1f} TFLOP/s exact {row['rel_l2_vs_exact']:.4f} twin {row['rel_l2_vs_twin']:.1e}"
                val += "" if row.get("ok") else "  NOT OK"
            else:
                val = row.get("error", row.get("skipped", "?"))[:100]
            print(f"  {tag:<48} {val}")
        print("  best:", json.dumps({k: (v or {}).get("config") for k, v in (sw.get("best") or {}).items()}))
    proj = r.get("projection") or {}
    if proj and "error" not in proj:
        print("block-5 projection, attention + linears only (ms per forward / per block of 5 forwards):")
        for label, p in proj.items():
            print(
                f"  {label:<48} attn {p['attn_ms_per_forward']:7.1f} + linears {p['linear_ms_per_forward']:6.1f}"
                f" = {p['ms_per_forward']:7.1f} / {p['ms_per_block_5_forwards']:7.1f}"
            )
    fails = r.get("check_failures", [])
    print("CHECKS:", "all passed" if not fails else f"{len(fails)} failed")
    for f in fails:
        print("  FAIL", f)


def check_failures(r: dict) -> list[str]:
    """Every correctness flag that is False, every recorded error, every incomplete section."""
    out = []

    def walk(x, path: str) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                if k in ("twin_ok", "exact_ok", "reference_ok", "finite", "ok") and v is False:
                    out.append(f"{path}.{k}")
                elif k in ("error", "section_error") and v:
                    out.append(f"{path}: {str(v)[:200]}")
                elif k not in ("traceback", "process"):
                    walk(v, f"{path}.{k}" if path else k)
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")

    for name in SECTIONS:
        sec = r.get(name)
        if not isinstance(sec, dict):
            continue
        walk(sec, name)
        proc = sec.get("process", {})
        if proc and (proc.get("returncode", 0) != 0 or "timeout_s" in proc or not sec.get("done")):
            out.append(f"{name}: incomplete ({ {k: v for k, v in proc.items() if k != 'stderr_tail'} })")
    return out


def projection(r: dict, sh: Shapes) -> dict:
    """Attention at the block-5 KV length and the linears, x layers, x 5 forwards (4 denoise + commit)."""
    tm = r.get("attention", {}).get("timings", {})
    pf = r.get("gemm", {}).get("per_forward", {})
    out = {}

    def at(name: str) -> float | None:
        for e in tm.get(name, []):
            if e.get("kv") == sh.block_kv and "ms" in e:
                return e["ms"]
        return None

    combos = {
        "bf16 (triton attn, bf16 linears)": ("bf16_triton", "bf16"),
        "bf16 (cuDNN attn, bf16 linears)": ("sdpa", "bf16"),
        "fp8 attn + fp8 linears": ("fp8", "fp8"),
        "fp8 attn + fp8 linears (fast accum)": ("fp8", "fp8_fast_accum"),
        "fp8 QK / bf16 PV + fp8 linears": ("fp8qk_bf16pv", "fp8"),
    }
    best = r.get("sweep", {}).get("best") or {}
    sweep_ms = {k: v["ms"] for k, v in best.items() if v and r.get("sweep", {}).get("kv") == sh.block_kv}
    if "pv_fp8" in sweep_ms:
        combos["fp8 attn (sweep's best config) + fp8 linears"] = ("sweep:pv_fp8", "fp8")
    if "pv_bf16" in sweep_ms:
        combos["fp8 QK / bf16 PV (sweep's best) + fp8 linears"] = ("sweep:pv_bf16", "fp8")
    for label, (attn, lin) in combos.items():
        a = sweep_ms.get(attn[6:]) if attn.startswith("sweep:") else at(attn)
        g = pf.get(lin, {}).get("ms_per_forward")
        if a is not None and g is not None:
            fwd = a * sh.layers + g
            out[label] = {"attn_ms_per_forward": round(a * sh.layers, 2), "linear_ms_per_forward": round(g, 2),
                          "ms_per_forward": round(fwd, 2), "ms_per_block_5_forwards": round(5 * fwd, 1)}  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under the Triton interpreter")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/fp8-h100.json)")
    ap.add_argument("--budget-s", type=float, default=225.0, help="wall-clock budget for all sections")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    ap.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto", help="sections in child processes")
    ap.add_argument("--section", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.section:  # a child: one section, results to --child-out
        rec = Recorder(Path(args.child_out) if args.child_out else None)
        run_section(args.section, args.smoke, rec, args.deadline or time.time() + 600)
        return

    t_start = time.time()
    deadline = t_start + args.budget_s
    isolate = args.isolate == "yes" or (args.isolate == "auto" and not args.smoke)
    dev = torch.device("cpu" if args.smoke else "cuda")
    r: dict = {
        "smoke": args.smoke,
        "env": environment(dev),
        "shapes": dataclasses.asdict(SMOKE if args.smoke else SELF_FORCING),
    }
    r["limits"] = {"twin_strict": TWIN_STRICT, "exact_limit": EXACT_LIMIT}
    wanted = [s for s in SECTIONS if s in args.sections.split(",")]
    with tempfile.TemporaryDirectory(prefix="fp8bench-") as tmp:
        for name in wanted:
            left = deadline - time.time()
            if left < 10:
                r[name] = {"skipped": "time budget"}
                continue
            cap = left if name == "sweep" else min(SECTION_CAPS[name], left)
            print(f"-- {name} (up to {cap:.0f} s)", flush=True)
            if isolate:
                r[name] = run_isolated(name, args.smoke, cap, time.time() + cap, Path(tmp))
            else:
                rec = Recorder(None)
                run_section(name, args.smoke, rec, time.time() + cap)
                r[name] = rec.data
            if r[name].get("section_error"):
                print(f"[{name}] {r[name]['section_error']}")
    r["projection"] = attempt(lambda: projection(r, SMOKE if args.smoke else SELF_FORCING))
    r["check_failures"] = check_failures(r)
    r["wall_s"] = round(time.time() - t_start, 1)
    default = Path(tempfile.gettempdir()) / "fp8-smoke.json" if args.smoke else Path("bench/results/fp8-h100.json")
    out = Path(args.out) if args.out else default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=1, default=str))
    try:
        print_table(r)
    except Exception:  # noqa: BLE001 - the JSON is what matters
        traceback.print_exc()
    print(f"\nwrote {out} ({r['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
