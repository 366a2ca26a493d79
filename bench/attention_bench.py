"""Ring attention at Self-Forcing's block shapes: cuDNN vs our bf16 and FP8 kernels, against the
matmul peak measured in the same run (issue 22). One process, time-boxed, every measurement
wrapped so that a failure is recorded and the rest goes on; the JSON is rewritten after each part.

Shape: B 1, q 4680 (one block of 3 latent frames), 12 heads of d 128, a ring of 32760 rows with
4680..32760 valid (blocks 0..6); `--shapes lingbot`: LingBot-World Fast's steady block, q 4524, 40 heads,
a full ring of 27144 rows (every "kv" row below is then that one length).
TFLOP/s = 4 q kv d heads per call / time. Timings are medians of
`triton.testing.do_bench` over a CUDA-graph replay (do_bench wipes the L2 before each call).

  peak        bf16 matmul 8192^3 and fp8 `_scaled_mm` 8192^3 (tensor-wise scales): the ceilings.
  attention   per kv: cudnn (torch SDPA, cuDNN backend, on the sliced ring), bf16 (our kernel, its
              default config), bf16_split2 (the same with 2 key splits: the wave-quantization fix),
              fp8 (our FP8 kernel with its per-call K/V pre-pass: today's engine route), fp8_shadow
              (the ring's fp8 shadow re-quantized for the block's own 4680 rows, then the kernel:
              what a ring that keeps fp8 copies would pay per call), fp8_kernel (the kernel alone on
              quantized K/V) and fp8_prev_cfg (the previous 128x128 / 8-warp default, pre-pass included).
              Also the pre-pass and the shadow update alone (ms, GB/s), each also with V's transposed
              store masked by valid (`PREPASS_PAD_V_STORE` off: byte stores, the form before it).
  quality     at kv 28080, first 512 query rows: rel. L2 of each against exact fp32 attention; the
              shadow route must equal the per-call route bit for bit.
  sweeps      bf16 configs (splits / tiles) and fp8 kernel configs at kv 4680 / 28080 / 32760, and
              the pre-pass with 4 vs 8 warps; the rest of the budget.

    python bench/attention_bench.py --out attention.json           # H200: ~2-3 min
    python bench/attention_bench.py --shapes lingbot --out a.json    # LingBot-World Fast's shape
    python bench/attention_bench.py --smoke --out /tmp/a.json      # CPU, Triton interpreter, tiny shapes
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flashdreams.benchmark.environment import environment  # noqa: E402
from flashdreams.numerics import rel_l2  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Shapes:
    lq: int
    heads: int
    head_dim: int
    capacity: int
    kvs: tuple[int, ...]
    quality_kv: int
    check_rows: int
    block_rows: int  # rows one block writes into the ring (the shadow's update per call)
    sweep_kvs: tuple[int, ...]
    peak_n: int


SELF_FORCING = Shapes(
    4680, 12, 128, 32760, tuple(4680 * i for i in range(1, 8)), 28080, 512, 4680, (4680, 28080, 32760), 8192
)
# LingBot-World Fast's steady block (issue 15): q 4524 (3 frames of 1508 tokens), 40 heads, a full ring of
# sink 3 + window 15 frames.
LINGBOT = Shapes(4524, 40, 128, 27144, (27144,), 27144, 512, 4524, (27144,), 8192)
SMOKE = Shapes(45, 2, 64, 300, (300,), 300, 45, 45, (300,), 128)
SHAPES = {"self-forcing": SELF_FORCING, "lingbot": LINGBOT}
# Kernel vs exact fp32 attention at unit-RMS q/k and V ~ N(0, 1) (bench/fp8_bench.py measured the
# twins: bf16 ~2.3e-3, fp8 ~5.2%): a wrong tile or scale costs far more.
LIMITS = {"cudnn": 1e-2, "bf16": 1e-2, "fp8": 0.08}


class Recorder:
    """The result dict, rewritten to disk after every entry (a killed run keeps what it measured)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict = {}

    def put(self, key: str, value) -> None:
        self.data[key] = value
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(path)


def attempt(fn: Callable[[], dict]) -> dict:
    """One measurement; an exception is recorded (type, first line, where), never raised."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the bench records and goes on
        tb = traceback.extract_tb(e.__traceback__)
        where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
        msg = str(e).strip().splitlines()
        return {"error": f"{type(e).__name__}: {msg[0][:300] if msg else ''} ({where})"}


def make_timer(smoke: bool) -> Callable[[Callable[[], object]], float]:
    """Median ms: fn captured in a CUDA graph, replayed by do_bench (timed as launched if capture fails)."""
    if smoke:

        def cpu_ms(fn: Callable[[], object]) -> float:
            t0 = time.perf_counter()  # one call: the smoke checks the plumbing, not the speed
            fn()
            return (time.perf_counter() - t0) * 1e3

        return cpu_ms

    import triton.testing

    def gpu_ms(fn: Callable[[], object]) -> float:
        fn()  # compile outside the capture
        torch.cuda.synchronize()
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            run = graph.replay
        except Exception:  # noqa: BLE001 - timed as launched instead
            torch.cuda.synchronize()
            graph, run = None, fn
        t = float(triton.testing.do_bench(run, warmup=10, rep=50, return_mode="median"))
        del graph, run
        return t

    return gpu_ms


def rms_normed(shape: tuple[int, ...], g: torch.Generator, dev: torch.device) -> torch.Tensor:
    x = torch.randn(*shape, device=dev, generator=g)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))


def cfg_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def peak_part(sh: Shapes, dev: torch.device, ms, rec: Recorder) -> dict:
    n = sh.peak_n
    g = torch.Generator(device=dev).manual_seed(2)
    a = torch.randn(n, n, device=dev, generator=g).to(torch.bfloat16)
    b = torch.randn(n, n, device=dev, generator=g).to(torch.bfloat16)
    fl = 2.0 * n**3
    out: dict = {"n": n}
    out["bf16_matmul"] = attempt(lambda: (lambda t: {"ms": t, "tflops": fl / t / 1e9})(ms(lambda: a @ b)))
    if dev.type == "cuda":
        a8, b8t = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()
        one = torch.tensor(1.0, device=dev)

        def fp8() -> dict:
            t = ms(lambda: torch._scaled_mm(a8, b8t, one, one, out_dtype=torch.bfloat16))
            return {"ms": t, "tflops": fl / t / 1e9}

        out["fp8_scaled_mm"] = attempt(fp8)
    rec.put("peak", out)
    return out


def attention_parts(
    sh: Shapes, dev: torch.device, ms, rec: Recorder, smoke: bool, deadline: float, only: str | None = None
) -> None:
    """Quality, timings per kv and config sweeps; `only` (a regex): just the rows whose name it matches, beside
    cuDNN, and no sweeps."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # The modules themselves (the pre-pass's PREPASS_* knobs live in fp8_kv): `flashdreams.kernels.
    # ring_attention_fp8` as an attribute is the re-exported function of that name, which shadows the module.
    fp8mod = importlib.import_module("flashdreams.kernels.ring_attention_fp8")
    kvmod = importlib.import_module("flashdreams.kernels.fp8_kv")  # the pre-pass and its PREPASS_* knobs
    from flashdreams.kernels.ring_attention import launch_ring_attention, ring_attention_reference
    from flashdreams.kernels.ring_attention_configs import AttnConfig, pick_config
    from flashdreams.kernels.ring_attention_fp8 import (
        Fp8AttnConfig,
        empty_fp8_kv,
        launch_ring_attention_fp8,
        launch_ring_attention_fp8_quantized,
        pick_fp8_config,
        quantize_kv_fp8,
        quantize_kv_fp8_into,
    )

    g = torch.Generator(device=dev).manual_seed(0)
    L, H, d, S = sh.lq, sh.heads, sh.head_dim, sh.capacity
    q = rms_normed((1, L, H, d), g, dev).to(torch.bfloat16)  # Wan's q/k are RMS-normalised
    kc = rms_normed((1, S, H, d), g, dev).to(torch.bfloat16)
    vc = torch.randn(1, S, H, d, device=dev, generator=g).to(torch.bfloat16)
    scale = 1.0 / math.sqrt(d)
    bf16_cfg = pick_config(q, S)
    fp8_cfg = pick_fp8_config(q)
    prev_fp8 = Fp8AttnConfig(128, 128, 8, 3, splits=1, use_tma=True) if not smoke else Fp8AttnConfig(32, 64, 1, 1)
    split2 = dataclasses.replace(bf16_cfg, splits=2)
    staggered, split2_staggered = (dataclasses.replace(c, stagger=True) for c in (bf16_cfg, split2))
    rec.put(
        "setup",
        {
            "q_k": "unit RMS per head vector",
            "v": "N(0, 1)",
            "bf16_config": cfg_dict(bf16_cfg),
            "fp8_config": cfg_dict(fp8_cfg),
            "fp8_prev_config": cfg_dict(prev_fp8),
            "sdpa_backend": "math (smoke)" if smoke else "cudnn",
        },
    )
    backend = SDPBackend.MATH if smoke else SDPBackend.CUDNN_ATTENTION
    qt = q.transpose(1, 2)
    shadow = empty_fp8_kv(kc, fp8_cfg.block_n)
    full_rows = torch.tensor([0, S], device=dev, dtype=torch.int32)

    def lens(kv: int) -> torch.Tensor:
        return torch.tensor([kv], device=dev, dtype=torch.int32)

    def block_rows(kv: int) -> torch.Tensor:
        return torch.tensor([kv - sh.block_rows, kv], device=dev, dtype=torch.int32)

    def cudnn(kv: int):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(qt, kc[:, :kv].transpose(1, 2), vc[:, :kv].transpose(1, 2))

    def fp8_shadow(kv: int, vl: torch.Tensor, rows: torch.Tensor):
        quantize_kv_fp8_into(shadow, kc, vc, vl, rows)
        return launch_ring_attention_fp8_quantized(q, shadow, shadow.v8t, vl, scale, fp8_cfg, True)

    variants: dict[str, Callable[[int, torch.Tensor, torch.Tensor], object]] = {
        "cudnn": lambda kv, vl, rows: cudnn(kv),
        "bf16": lambda kv, vl, rows: launch_ring_attention(q, kc, vc, vl, scale, bf16_cfg),
        "bf16_split2": lambda kv, vl, rows: launch_ring_attention(q, kc, vc, vl, scale, split2),
        "bf16_stagger": lambda kv, vl, rows: launch_ring_attention(q, kc, vc, vl, scale, staggered),
        "bf16_split2_stagger": lambda kv, vl, rows: launch_ring_attention(q, kc, vc, vl, scale, split2_staggered),
        "fp8": lambda kv, vl, rows: launch_ring_attention_fp8(q, kc, vc, vl, scale, fp8_cfg, True),
        "fp8_shadow": fp8_shadow,
        "fp8_kernel": lambda kv, vl, rows: launch_ring_attention_fp8_quantized(
            q, shadow, shadow.v8t, vl, scale, fp8_cfg, True
        ),
        "fp8_prev_cfg": lambda kv, vl, rows: launch_ring_attention_fp8(q, kc, vc, vl, scale, prev_fp8, True),
    }
    if prev_fp8 == fp8_cfg:
        del variants["fp8_prev_cfg"]
    from flashdreams.kernels.ring_attention_fp8_hopper import (
        VARIANTS,
        hopper_fp8_available,
        launch_ring_attention_fp8_hopper,
    )

    if hopper_fp8_available(q, shadow.block_n):  # the Gluon kernel's forms on the shadow, as fp8_kernel
        qk_fac = scale * fp8mod.LOG2E / fp8mod.E4M3_MAX
        hop_splits = fp8mod.fp8_splits_for(-(-L // 64) * H, torch.cuda.get_device_properties(dev).multi_processor_count)
        rec.put("fp8_gluon_splits", hop_splits)  # the key splits of the fp8_gluon_* rows (the default rule's)
        hop = launch_ring_attention_fp8_hopper
        for form in VARIANTS:
            tag = f"fp8_{form.replace('-', '_')}"
            variants[tag] = lambda kv, vl, rows, f=form: hop(q, shadow, vl, qk_fac, hop_splits, f)
        for n in sorted({1, 2, 3} - {hop_splits}):  # the default form's key splits (wave quantization vs merge)
            tag = f"fp8_gluon_psmem_split{n}"
            variants[tag] = lambda kv, vl, rows, n=n: hop(q, shadow, vl, qk_fac, n, "gluon-psmem")
    from flashdreams.kernels.ring_attention_hopper import VARIANTS as BF16_VARIANTS
    from flashdreams.kernels.ring_attention_hopper import hopper_bf16_available, launch_ring_attention_hopper

    if hopper_bf16_available(q):  # the Gluon bf16 kernel's tilings, beside our Triton kernel (same splits)
        bf16_hop = launch_ring_attention_hopper
        for form in BF16_VARIANTS:
            tag = f"bf16_{form.replace('-', '_')}"
            variants[tag] = lambda kv, vl, rows, f=form: bf16_hop(q, kc, vc, vl, scale, bf16_cfg.splits or 1, f)
    from flashdreams.kernels.fa4_attention import fa4_unavailable_reason, ring_attention_fa4

    fa4_missing = fa4_unavailable_reason(dev)
    rec.put("fa4", {"available": fa4_missing is None, "reason": fa4_missing})
    if fa4_missing is None:  # FlashAttention-4's CuTe-DSL kernel, the third route of issue 22
        variants["fa4"] = lambda kv, vl, rows: ring_attention_fa4(q, kc, vc, vl, scale, return_lse=True)

    if only is not None:
        pattern = re.compile(only)
        variants = {k: f for k, f in variants.items() if k == "cudnn" or pattern.search(k)}
        rec.put("only", {"pattern": only, "rows": list(variants)})

    def out_of(x) -> torch.Tensor:
        return (x[0] if isinstance(x, tuple) else x.transpose(1, 2))[:, : sh.check_rows]

    # Correctness first: one call of each at the quality kv, against exact fp32 attention.
    def quality() -> dict:
        kv = sh.quality_kv
        vl = lens(kv)
        ref = ring_attention_reference(q[:, : sh.check_rows].float(), kc, vc, vl, scale)
        quantize_kv_fp8_into(shadow, kc, vc, vl, full_rows)  # the shadow holds the whole ring first
        res: dict = {"kv": kv, "rows": sh.check_rows}
        outs = {}
        for name, fn in variants.items():

            def one(name=name, fn=fn) -> dict:
                o = out_of(fn(kv, vl, block_rows(kv)))
                outs[name] = o
                err = rel_l2(o, ref)
                limit = LIMITS["fp8" if name.startswith("fp8") else "bf16" if name == "fa4" else name.split("_")[0]]
                return {"rel_l2_vs_exact": err, "ok": bool(torch.isfinite(o).all()) and err < limit}

            res[name] = attempt(one)
        if "fp8" in outs and "fp8_shadow" in outs:
            res["fp8_shadow_equals_fp8"] = bool(torch.equal(outs["fp8"], outs["fp8_shadow"]))
        return res

    rec.put("quality", attempt(quality))

    # Timings per kv. The shadow's update covers the block's own rows only (the history was
    # quantized when it was written); fp8_kernel reads the shadow as that update leaves it.
    flops = lambda kv: 4.0 * L * kv * d * H  # noqa: E731
    prepass_rows = ["fp8_prepass", "fp8_shadow_update", "fp8_prepass_byte_v_store", "fp8_shadow_update_byte_v_store"]
    timings: dict[str, list] = {name: [] for name in [*variants, *prepass_rows]}
    for kv in sh.kvs:
        vl, rows = lens(kv), block_rows(kv)
        quantize_kv_fp8_into(shadow, kc, vc, vl, full_rows)
        for name, fn in variants.items():
            if time.time() > deadline:
                timings[name].append({"kv": kv, "skipped": "time budget"})
                continue

            def one(fn=fn, kv=kv, vl=vl, rows=rows) -> dict:
                t = ms(lambda: fn(kv, vl, rows))
                return {"kv": kv, "ms": t, "tflops": flops(kv) / t / 1e9}

            timings[name].append(attempt(one))

        def pre(kv=kv, vl=vl) -> dict:
            t = ms(lambda: quantize_kv_fp8(kc, vc, vl, fp8_cfg.block_n))
            moved = kv * H * d * (2 * 2 + 2 * 1) + 2 * kv // fp8_cfg.block_n * H * 4  # bf16 in, fp8 out
            return {"kv": kv, "ms": t, "gbps": moved / t / 1e6}

        def upd(kv=kv, vl=vl, rows=rows) -> dict:
            t = ms(lambda: quantize_kv_fp8_into(shadow, kc, vc, vl, rows))
            moved = (sh.block_rows + 2 * fp8_cfg.block_n) * H * d * 6
            return {"kv": kv, "ms": t, "gbps_upper": moved / t / 1e6}

        timings["fp8_prepass"].append(attempt(pre))
        timings["fp8_shadow_update"].append(attempt(upd))
        # the same two with V's transposed store masked by valid (byte stores: the form before
        # PREPASS_PAD_V_STORE)
        before = kvmod.PREPASS_PAD_V_STORE
        kvmod.PREPASS_PAD_V_STORE = False
        try:
            timings["fp8_prepass_byte_v_store"].append(attempt(pre))
            timings["fp8_shadow_update_byte_v_store"].append(attempt(upd))
        finally:
            kvmod.PREPASS_PAD_V_STORE = before
        rec.put("timings", timings)

    if only is not None:
        return
    # Sweeps, while the budget lasts: bf16 configs (splits and tiles for the 37 x 12 programs on
    # 132 SMs), fp8 kernel configs on quantized K/V, and the pre-pass's warps.
    if smoke:
        bf16_sweep = [AttnConfig(32, 32, 1, 1, splits=1), AttnConfig(32, 32, 1, 1, splits=2, use_tma=True)]
        fp8_sweep = [Fp8AttnConfig(32, 64, 1, 1), Fp8AttnConfig(64, 64, 1, 1, splits=2, maxnreg=168)]
    else:
        bf16_sweep = [
            bf16_cfg,
            split2,
            AttnConfig(128, 128, 8, 3, splits=3, use_tma=True),
            AttnConfig(128, 64, 8, 3, splits=2, use_tma=True),
            AttnConfig(64, 64, 4, 3, splits=1, use_tma=True),
            AttnConfig(64, 128, 4, 2, splits=1, use_tma=True),
        ]
        fp8_sweep = [
            fp8_cfg,
            prev_fp8,
            Fp8AttnConfig(64, 128, 4, 4, splits=1, use_tma=True),
            Fp8AttnConfig(64, 128, 4, 2, splits=1, use_tma=True),
            Fp8AttnConfig(64, 128, 4, 3, splits=2, use_tma=True),
            Fp8AttnConfig(128, 128, 8, 3, splits=2, use_tma=True),
            # 64-key tiles, and capped at 168 registers so that three CTAs share an SM instead of two
            # (cross-compiled: 208 registers uncapped; capped, a few spills in the loop)
            Fp8AttnConfig(64, 64, 4, 3, splits=1, use_tma=True),
            Fp8AttnConfig(64, 64, 4, 3, splits=1, use_tma=True, maxnreg=168),
            Fp8AttnConfig(64, 64, 4, 3, splits=1, use_tma=True, precise_pv=False, maxnreg=168),
            Fp8AttnConfig(64, 128, 4, 2, splits=1, use_tma=True, precise_pv=False, maxnreg=168),
        ]
    sweeps: dict = {"kvs": list(sh.sweep_kvs), "bf16": [], "fp8_kernel": [], "prepass_warps": []}
    exact = {}
    for kv in sh.sweep_kvs:
        exact[kv] = ring_attention_reference(q[:, : sh.check_rows].float(), kc, vc, lens(kv), scale)
    for tag, cfgs in (("bf16", bf16_sweep), ("fp8_kernel", fp8_sweep)):
        for cfg in cfgs:
            row: dict = {"config": cfg_dict(cfg), "tflops": [], "rel_l2_vs_exact": []}
            for kv in sh.sweep_kvs:
                if time.time() > deadline:
                    row["skipped"] = "time budget"
                    break
                vl = lens(kv)

                def run(cfg=cfg, kv=kv, vl=vl, tag=tag) -> dict:
                    if tag == "bf16":
                        fn = lambda: launch_ring_attention(q, kc, vc, vl, scale, cfg)  # noqa: E731
                    else:
                        kvq = quantize_kv_fp8(kc, vc, vl, cfg.block_n)
                        fn = lambda: launch_ring_attention_fp8_quantized(q, kvq, vc, vl, scale, cfg, True)  # noqa: E731
                    err = rel_l2(fn()[0][:, : sh.check_rows], exact[kv])
                    t = ms(fn)
                    return {"tflops": flops(kv) / t / 1e9, "err": err}

                r = attempt(run)
                row["tflops"].append(r.get("tflops"))
                row["rel_l2_vs_exact"].append(r.get("err"))
                if "error" in r:
                    row["error"] = r["error"]
                    break
            ok = [e for e in row["rel_l2_vs_exact"] if e is not None]
            row["ok"] = bool(ok) and max(ok) < LIMITS["fp8" if tag.startswith("fp8") else "bf16"]
            sweeps[tag].append(row)
            rec.put("sweeps", sweeps)
    for warps in (4, 8):
        if time.time() > deadline:
            break
        kv = sh.sweep_kvs[-1]
        vl = lens(kv)

        def pw(warps=warps, kv=kv, vl=vl) -> dict:
            before = kvmod.PREPASS_WARPS
            kvmod.PREPASS_WARPS = warps
            try:
                t = ms(lambda: quantize_kv_fp8(kc, vc, vl, fp8_cfg.block_n))
            finally:
                kvmod.PREPASS_WARPS = before
            return {"warps": warps, "kv": kv, "ms": t}

        sweeps["prepass_warps"].append(attempt(pw))
        rec.put("sweeps", sweeps)


def summarise(r: dict, sh: Shapes) -> dict:
    """Per variant: TFLOP/s at the block-5 kv and the range over kv, and the fraction of the matmul peak."""
    peak = (r.get("peak", {}).get("bf16_matmul") or {}).get("tflops")
    peak8 = (r.get("peak", {}).get("fp8_scaled_mm") or {}).get("tflops")
    out: dict = {"bf16_matmul_peak_tflops": peak, "fp8_matmul_peak_tflops": peak8, "variants": {}}
    tm = r.get("timings", {})
    cudnn_at = {e["kv"]: e["tflops"] for e in tm.get("cudnn", []) if "tflops" in e}
    for name, rows in tm.items():
        vals = {e["kv"]: e["tflops"] for e in rows if "tflops" in e}
        if not vals:
            continue
        at = vals.get(sh.quality_kv)
        ceiling = peak8 if name.startswith("fp8") else peak
        out["variants"][name] = {
            "tflops_at_block5_kv": at,
            "tflops_min": min(vals.values()),
            "tflops_max": max(vals.values()),
            "fraction_of_its_matmul_peak_at_block5_kv": at / ceiling if at and ceiling else None,
            "vs_cudnn_at_block5_kv": at / cudnn_at[sh.quality_kv] if at and cudnn_at.get(sh.quality_kv) else None,
        }
    return out


def print_table(r: dict) -> None:
    env = r.get("env", {})
    pk = r.get("peak", {})
    b = (pk.get("bf16_matmul") or {}).get("tflops")
    f8 = (pk.get("fp8_scaled_mm") or {}).get("tflops")
    print(
        f"\n== {env.get('device_name', env.get('device_type'))}  torch {env.get('torch')}  triton {env.get('triton')}"
    )
    print(f"matmul peak in this run: bf16 {b or float('nan'):.0f} TFLOP/s, fp8 {f8 or float('nan'):.0f} TFLOP/s")
    tm = r.get("timings", {})
    ms_rows = ("fp8_prepass", "fp8_shadow_update", "fp8_prepass_byte_v_store", "fp8_shadow_update_byte_v_store")
    names = [n for n in tm if n not in ms_rows]
    if names:
        shp = r["shapes"]
        print(
            f"attention TFLOP/s (q {shp['lq']}, {shp['heads']} heads, d {shp['head_dim']}; fp8 and fp8_shadow "
            "include their quantization)"
        )
        print(
            f"{'kv':>7}" + "".join(f"{n:>14}" for n in names) + f"{'prepass ms':>12}{'update ms':>11}"
            f"{'(byte V store: prepass':>24}{'update)':>9}"
        )
        for i, e in enumerate(tm[names[0]]):
            cells = "".join(
                f"{tm[n][i]['tflops']:>14.1f}" if i < len(tm[n]) and "tflops" in tm[n][i] else f"{'-':>14}"
                for n in names
            )
            got = {n: (tm.get(n, [])[i] if i < len(tm.get(n, [])) else {}).get("ms", float("nan")) for n in ms_rows}
            print(
                f"{e.get('kv', '?'):>7}{cells}{got['fp8_prepass']:>12.3f}{got['fp8_shadow_update']:>11.3f}"
                f"{got['fp8_prepass_byte_v_store']:>24.3f}{got['fp8_shadow_update_byte_v_store']:>9.3f}"
            )
    qual = r.get("quality", {})
    if qual:
        parts = [
            f"{k} {v['rel_l2_vs_exact']:.4f}{'' if v.get('ok') else ' FAIL'}"
            for k, v in qual.items()
            if isinstance(v, dict) and "rel_l2_vs_exact" in v
        ]
        print(f"rel. L2 vs exact at kv {qual.get('kv')}: " + "; ".join(parts))
        if "fp8_shadow_equals_fp8" in qual:
            print(f"fp8 via the shadow equals fp8 per call: {qual['fp8_shadow_equals_fp8']}")
    sw = r.get("sweeps", {})
    for tag in ("bf16", "fp8_kernel"):
        for row in sw.get(tag, []):
            c = row["config"]
            name = f"{c['block_m']}x{c['block_n']} w{c['num_warps']} s{c['num_stages']} sp{c['splits']}"
            name += f" tma{int(c['use_tma'])}"
            if c.get("precise_pv") is False:
                name += " pv-"
            if c.get("maxnreg"):
                name += f" r{c['maxnreg']}"
            vals = " ".join(f"{t:.0f}" if t else "-" for t in row["tflops"])
            # a row the time budget cut before any kv is skipped, not wrong
            verdict = "" if row["ok"] else "  skipped (time budget)" if not row["tflops"] else "  NOT OK"
            print(f"  sweep {tag:<10} {name:<28} TFLOP/s at kv {sw['kvs']}: {vals}{verdict}")
    for e in sw.get("prepass_warps", []):
        if "ms" in e:
            print(f"  pre-pass with {e['warps']} warps at kv {e['kv']}: {e['ms']:.3f} ms")
    s = r.get("summary", {}).get("variants", {})
    cells = []
    for n, v in s.items():
        if v.get("tflops_at_block5_kv"):
            ratio = v.get("vs_cudnn_at_block5_kv")
            cells.append(f"{n} {v['tflops_at_block5_kv']:.0f}" + (f" ({ratio:.2f}x cuDNN)" if ratio else ""))
    if cells:
        print("at the block-5 kv: " + "; ".join(cells))
    fails = r.get("check_failures", [])
    print("CHECKS:", "all passed" if not fails else f"{len(fails)} failed: {fails[:6]}")


def check_failures(r: dict) -> list[str]:
    out = []
    for k, v in (r.get("quality") or {}).items():
        if isinstance(v, dict) and (v.get("ok") is False or "error" in v):
            out.append(f"quality.{k}")
    if (r.get("quality") or {}).get("fp8_shadow_equals_fp8") is False:
        out.append("quality.fp8_shadow_equals_fp8")
    if "error" in (r.get("quality") or {}):
        out.append(f"quality: {r['quality']['error']}")
    for tag in ("bf16", "fp8_kernel"):
        for row in (r.get("sweeps") or {}).get(tag, []):
            if not row.get("ok") and "skipped" not in row:
                out.append(f"sweep {tag} {row['config']}: {row.get('error', 'rel. L2 over limit')}"[:200])
    if r.get("error"):
        out.append(r["error"])
    return out


def _regex(text: str) -> str:
    """An --only value: refused by argparse (exit 2, nothing measured) when it does not compile."""
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"not a regular expression: {text!r} ({e})") from None
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under the Triton interpreter")
    ap.add_argument(
        "--shapes",
        choices=sorted(SHAPES),
        default="self-forcing",
        help="the model whose attention shape is measured (default self-forcing; lingbot: q 4524, 40 heads, kv 27144)",
    )
    ap.add_argument("--out", required=True, help="JSON path")
    ap.add_argument("--budget-s", type=float, default=200.0, help="wall-clock budget (sweeps stop first)")
    ap.add_argument(
        "--only",
        metavar="REGEX",
        type=_regex,
        help="time only the rows whose name matches (cuDNN always), no sweeps: e.g. 'gluon_psmem' for the Gluon "
        "FP8 forms",
    )
    args = ap.parse_args(argv)
    t0 = time.time()
    deadline = t0 + args.budget_s
    dev = torch.device("cpu" if args.smoke else "cuda")
    sh = SMOKE if args.smoke else SHAPES[args.shapes]
    rec = Recorder(Path(args.out))
    rec.put("env", environment(dev))
    rec.put("shapes", dataclasses.asdict(sh))
    ms = make_timer(args.smoke)
    peak_part(sh, dev, ms, rec)
    try:
        attention_parts(sh, dev, ms, rec, args.smoke, deadline, args.only)
    except Exception as e:  # noqa: BLE001 - keep what was measured
        rec.put("error", f"{type(e).__name__}: {e}"[:500])
        rec.put("traceback", traceback.format_exc()[-2000:])
    rec.put("summary", attempt(lambda: summarise(rec.data, sh)))
    rec.put("check_failures", check_failures(rec.data))
    rec.put("wall_s", round(time.time() - t0, 1))
    try:
        print_table(rec.data)
    except Exception:  # noqa: BLE001 - the JSON is what matters
        traceback.print_exc()
    print(f"wrote {args.out} ({rec.data['wall_s']:.0f} s)")
    return 1 if rec.data["check_failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
