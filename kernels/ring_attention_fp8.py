"""Ring attention with both matmuls in float8 e4m3 on tensor cores (fp32 accumulation).

Same contract as `ring_attention.ring_attention`: q `[B, Lq, N, d]` against bf16/fp16 ring
caches `[B, S, N, d]`, keys `[0, valid_len)` attended, `valid_len` read on the device, output
in q's dtype (plus, on request, the natural-log LSE). Opt-in (`precision="fp8"`): it trades
accuracy for speed; `ring_attention_fp8_reference` emulates the quantization exactly in torch
and states the cost.

Quantization scheme (scales fp32; fp8 values e4m3, round-to-nearest-even, saturating at 448):

* q, per query row (in the kernel, once per program): q8 = q * 448/amax(|q_row|); the row
  scale and softmax_scale * log2(e) form one per-row factor.
* K and V, per key tile (the kernel's BLOCK_N keys x head dim, one scalar each, by a pre-pass):
  k8 = k * 448/amax(|K tile|), v8 = v * 448/amax(|V tile|). e4m3 is floating point: its relative
  precision (3 mantissa bits) does not depend on the scale, which only has to keep the tile
  inside e4m3's 2^15 normal range, so a tile scale costs no accuracy against per-row or
  per-channel scales (measured: 5.2% vs 5.1% on the worst-case data below) and costs nothing in
  the loop: the K scale joins the per-row logit factor (a BLOCK_M-vector multiply per tile), the
  V scale joins the accumulator's running rescale (acc *= alpha * u_prev / u_tile,
  out = acc * u_last / l). The per-element work is then exactly the bf16 kernel's.
* P, after the running-max exp2, is taken as 256 * P (exp2 of s - m + 8): its row maximum sits
  at 256, so weights down to 2^-14 of it are normal e4m3 numbers; the row sum l uses the same
  fp32 values, so the factor cancels. P goes to e4m3 directly.
* The `pv_fp8=False` variant keeps P @ V in bf16 (P rounded to bf16, V read from the bf16 ring),
  so the bench can show what each half buys.

Quality (twin vs exact fp32 attention, unit-RMS q/k as Wan's RMSNorm makes them): zero-mean
V ~ N(0, 1), where the output is pure cancellation and every per-element error shows, costs
~5% rel. L2 (fp8 QK + bf16 PV: ~3.5%; bf16: ~0.2%); V with a common component (mean 0.5)
~0.5%. Each of q, k, P, V rounded to e4m3 contributes ~2.6% RMS.

K and V are quantized by a pre-pass (`fp8_kv.py`: why not inside this kernel, and the fp8 shadow of a
ring that a block's writes keep up to date), into copies laid out as fp8 wgmma reads them.

Accumulation: Hopper's fp8 wgmma adds into its accumulator with reduced precision (about 14
fraction bits kept, DeepSeek-V3 sec. 3.3.2). Chaining all key tiles of P @ V through it
loses accuracy over 200+ tiles, so by default (`precise_pv`) each tile's P @ V product is
taken into fresh registers and added to the fp32 accumulator by ordinary FMAs (the rescale
FMUL becomes an FFMA; only registers cost more). `precise_pv=False` accumulates in the
tensor core, for the bench to compare.

Triton's interpreter (CPU tests) converts fp32 to fp8 and bf16 with truncation and a broken
carry; there (only) values are first rounded to the target grid with integer arithmetic
(`EMULATE`), after which its conversion is exact, so the CPU tests check the GPU's math.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass

import torch

from flashdreams.errors import InvalidArgumentError

from ._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_tensor,
    env_choice,
    env_key_splits,
    inline_into_compilers,
    interpreted,
    launch,
    register_op,
    require_triton,
    tl,
    triton,
)
from ._rounding import to_e4m3, to_out
from .attention_merge import split_outputs
from .fp8_kv import (  # noqa: F401 (Fp8KV .. update_fp8_kv: this module's API before the pre-pass moved out)
    E4M3_MAX,
    Fp8KV,
    empty_fp8_kv,
    fp8_d_pad,
    fp8_kv_shapes,
    quantize_kv_fp8,
    quantize_kv_fp8_into,
    quantize_rows_e4m3,
    quantize_tiles_e4m3,
    round_e4m3,
    update_fp8_kv,
)
from .fp8_linear import Fp8Rows
from .ring_attention import LOG2E, _check_attention_args, _ensure_tma_allocator, _tma_ok, resolve_scale
from .ring_attention_configs import AttnConfig
from .ring_attention_fp8_hopper import VARIANTS as HOPPER_VARIANTS
from .ring_attention_fp8_hopper import hopper_fp8_available, launch_ring_attention_fp8_hopper

P_SHIFT = 8.0  # P is stored as 2^P_SHIFT * exp2(s - m): row maximum 256 < 448
LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class Fp8AttnConfig(AttnConfig):
    """`AttnConfig` plus where P @ V accumulates (see the module docstring)."""

    precise_pv: bool = True
    # A register cap per thread for ptxas (None: its own choice). At 64-row tiles / 4 warps the kernel takes
    # 208-243 registers, so an SM holds two CTAs; 168 lets it hold three, with some spilling. Measured on an
    # H100 (next49-h100, q 4680 / kv 28080): 64-key tiles 501 -> 595 TFLOP/s capped, still short of the
    # uncapped 64x128 default's 712. A sweep knob of bench/attention_bench.py, set in no default.
    maxnreg: int | None = None


# By head dim padded to a power of two >= 32 (fp8 wgmma's K step is 32): spill-free (cross-compiled for
# sm_90) defaults for any CUDA device that runs fp8 dots; FP8_ARCH_CONFIGS overrides them per
# compute capability where a config was measured.
FP8_CUDA_CONFIGS: dict[int, Fp8AttnConfig] = {
    32: Fp8AttnConfig(64, 64, 4, 3, splits=1, use_tma=True),
    64: Fp8AttnConfig(64, 64, 4, 3, splits=1, use_tma=True),
    128: Fp8AttnConfig(128, 128, 8, 3, splits=1, use_tma=True),
    256: Fp8AttnConfig(64, 64, 8, 2, splits=1, use_tma=True),
}
FP8_ARCH_CONFIGS: dict[tuple[int, int], dict[int, Fp8AttnConfig]] = {
    # H200 (issue 22, q 4680 / kv 28080, 12 heads, d 128, L2 flushed, medians of 3 rounds): 620 TFLOP/s
    # with 64-row query tiles / 4 warps / 3 stages / TMA against 511 with the 128x128 / 8-warp default;
    # two 4-warp CTAs share an SM, so one's softmax runs under the other's MMAs. Same key tile (128), so
    # K/V quantized for either config serve both. Key splits from the grid (`fp8_splits_for`).
    (9, 0): {128: Fp8AttnConfig(64, 128, 4, 3, splits=0, use_tma=True)},
}

# Where a config leaves the key splits to the grid (splits=0): 2 when the unsplit grid gives each SM fewer
# than this many programs, else 1. Measured on the H200 at Self-Forcing's shape (12 heads x 74 query tiles
# = 888 programs, 6.7 per SM): 2 splits took block 5 from 300.6 to 290.5 ms, its attention from 192.8 to
# 177.6 ms, and the 7-block rollout from 1673 to 1646 ms, slower only at the shortest ring (block 0, kv 4680:
# 150.1 vs 146.0 ms; next40-h200, FD_FP8_ATTN_SPLITS=2 in its own process on the same machine). The last
# wave of a short grid leaves SMs idle; twice the programs fill it. LingBot's grid (40 heads: 2840 programs,
# 21.5 per SM) and OmniDreams' (13.3 per SM) are not measured split, so they stay whole.
SPLIT_BELOW_PROGRAMS_PER_SM = 12


def fp8_splits_for(programs: int, sm_count: int) -> int:
    """Key splits for an unsplit grid of `programs` on `sm_count` SMs (see SPLIT_BELOW_PROGRAMS_PER_SM)."""
    return 2 if programs < SPLIT_BELOW_PROGRAMS_PER_SM * sm_count else 1


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


FP8_CPU_CONFIG = Fp8AttnConfig(64, 64, 1, 1, splits=1)

# What the bench sweeps at Self-Forcing's shape (d 128). Cross-compiled for sm_90 with triton 3.6
# (the H100's) and 3.9: all use fp8 wgmma (QGMMA) without spills; the 128-row tiles need ~246
# registers x 8 warps (one CTA per SM), the 64-row ones ~241 x 4 warps and <= 107 KB of shared
# memory, so two CTAs share an SM and one's softmax can hide under the other's MMAs. Without
# TMA the 128x128 tile spills, so pointer loads are left out.
FP8_SWEEP_CONFIGS: list[Fp8AttnConfig] = [
    Fp8AttnConfig(128, 128, 8, 3, splits=1, use_tma=True),
    Fp8AttnConfig(64, 128, 4, 3, splits=1, use_tma=True),
    Fp8AttnConfig(128, 128, 8, 2, splits=1, use_tma=True),
    Fp8AttnConfig(64, 128, 4, 2, splits=1, use_tma=True),
    Fp8AttnConfig(128, 64, 8, 3, splits=1, use_tma=True),
    Fp8AttnConfig(128, 128, 8, 4, splits=1, use_tma=True),
    Fp8AttnConfig(64, 64, 4, 3, splits=1, use_tma=True),
    Fp8AttnConfig(64, 64, 4, 4, splits=1, use_tma=True),
    Fp8AttnConfig(128, 128, 8, 3, splits=2, use_tma=True),
    Fp8AttnConfig(128, 128, 8, 2, splits=1, use_tma=True, warp_specialize=True),
    Fp8AttnConfig(64, 128, 4, 3, splits=1, use_tma=True, warp_specialize=True),
    Fp8AttnConfig(128, 128, 8, 3, splits=1, use_tma=True, precise_pv=False),
    Fp8AttnConfig(64, 128, 4, 3, splits=1, use_tma=True, precise_pv=False),
]


# FD_FP8_ATTN_SPLITS=N runs the FP8 kernel with N key splits (merged after) instead of its table's, so that
# the bench can weigh splits in whole blocks: issue22-h200's kernel sweep had 64x128 with 2 splits at 724
# TFLOP/s against 657 unsplit at kv 28080 (570 against 577 at kv 4680).
SPLITS_ENV = "FD_FP8_ATTN_SPLITS"


# The kernel behind the FP8 ring attention where the Gluon one can serve (sm_90, head dim 128, the 64 x 128
# default config): its form that takes P through shared memory, 758 against this file's 694 TFLOP/s at kv 28080
# on an H100 and Self-Forcing's FP8 block 5 272.8 against 286.1 ms, the same quality (bench/results/g4-h100,
# g5-h100). FD_FP8_ATTN_KERNEL overrides it: "triton" (this file's kernel everywhere) or another of the Gluon
# forms (ring_attention_fp8_hopper.VARIANTS), for benchmarks.
KERNEL_ENV = "FD_FP8_ATTN_KERNEL"
KERNEL_CHOICES = ("triton", *HOPPER_VARIANTS)
DEFAULT_HOPPER_FORM = "gluon-psmem"
# Where the grid rule would split the keys to even out a short grid's last wave (fewer than
# SPLIT_BELOW_PROGRAMS_PER_SM programs an SM) and FD_FP8_ATTN_KERNEL is unset, the persistent form runs instead: its
# last wave is cut evenly over every CTA (stream-K) and its whole programs start at staggered key tiles. Measured
# on an H100 at Self-Forcing's shape (bench/results/next102-h100, next103-h100, one process each, the same
# machine): block 5 258.3 / 257.7 against 260.1 / 259.7 ms, the attention kernel + merge 159.5 / 158.7 against
# 163.2 / 163.2 ms a profiled block, 777 against 730 TFLOP/s at kv 28080 alone; quality unchanged (latents 0.0235
# against bf16 over 7 blocks). Without the stagger the persistent form was slower (169.0 ms: its CTAs, starting
# together, read the same key tiles at once), and so was the stagger on the unpersistent grid (167.5 ms).
SHORT_GRID_HOPPER_FORM = "gluon-psmem-persistent-stagger"


def _kernel_choice() -> str:
    return env_choice(KERNEL_ENV, DEFAULT_HOPPER_FORM, KERNEL_CHOICES)


def _hopper_form(
    q: torch.Tensor, kv: Fp8KV, config: Fp8AttnConfig | None, pv_fp8: bool, short_grid: bool = False
) -> str | None:
    """The Gluon form that runs this call, or None for this file's kernel: only the picked config (an
    explicit one is this kernel's, as the bench's sweeps and tests ask), fp8 P @ V, ops left opaque
    (Inductor can inline Triton kernels, not Gluon ones), and a device and shape the Gluon kernel serves.
    `short_grid`: the grid rule would split this call's keys (no splits asked for): unless FD_FP8_ATTN_KERNEL
    names a form, SHORT_GRID_HOPPER_FORM."""
    kernel = _kernel_choice()
    if config is not None or not pv_fp8 or inline_into_compilers() or kernel == "triton":
        return None
    if short_grid and not os.environ.get(KERNEL_ENV):
        kernel = SHORT_GRID_HOPPER_FORM
    return kernel if hopper_fp8_available(q, kv.block_n) else None


def pick_fp8_config(q: torch.Tensor) -> Fp8AttnConfig:
    """The config for q's device and head dim: the per-capability table first, then the generic one
    (the key splits overridden by FD_FP8_ATTN_SPLITS where set)."""
    if q.device.type != "cuda":
        cfg = FP8_CPU_CONFIG
    else:
        d_pad = fp8_d_pad(q.shape[-1])
        arch = FP8_ARCH_CONFIGS.get(torch.cuda.get_device_capability(q.device), {})
        cfg = arch.get(d_pad, FP8_CUDA_CONFIGS[d_pad])
    splits = env_key_splits(SPLITS_ENV)
    return cfg if splits is None else dataclasses.replace(cfg, splits=splits)


# ----------------------------------------------------------------------------- attention kernel


@triton.jit
def _fp8_attend_tiles(
    acc, l_i, m_i, u_i, q8, q_fac, k_src, v8_src, v_src, KT, VT, stride_vn, lo, hi, valid, offs_n, d_ok,
    MASK_N: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, USE_TMA: tl.constexpr,
    V_TMA: tl.constexpr, WARP_SPEC: tl.constexpr, PV_FP8: tl.constexpr, PRECISE_PV: tl.constexpr,
    EMULATE: tl.constexpr,
):  # fmt: skip
    """Fold key tiles [lo, hi) into the running (acc, l_i, m_i, u_i); MASK_N masks keys >= valid.

    m_i is the running row max of the base-2 logits, l_i the row sum of 2^8 * exp2(s - m_i),
    u_i the V scale acc is held in (pv_fp8: the true numerator is u_i * acc).
    """
    for start in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPEC):
        rows = start + offs_n
        ok = rows < valid
        if USE_TMA:
            k = k_src.load([start, 0])
        elif MASK_N:
            k = tl.load(k_src + start * D_PAD, mask=ok[:, None], other=0.0)
        else:
            k = tl.load(k_src + start * D_PAD)
        f = q_fac * tl.load(KT + start // BLOCK_N)  # the logit factor of this tile's rows
        s = tl.dot(q8, tl.trans(k))
        if MASK_N:
            s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * f)
        p = tl.math.exp2(s * f[:, None] - (m_new - 8.0)[:, None])  # 2^8 * exp2(logit - max)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if PV_FP8:
            u_new = tl.load(VT + start // BLOCK_N)
            p8 = to_e4m3(p, EMULATE)
            if USE_TMA:
                vt = v8_src.load([0, start])
            elif MASK_N:
                vt = tl.load(v8_src + start, mask=ok[None, :], other=0.0)
            else:
                vt = tl.load(v8_src + start)
            alpha = alpha * tl.math.div_rn(u_i, u_new)
            if PRECISE_PV:
                acc = acc * alpha[:, None] + tl.dot(p8, tl.trans(vt))
            else:
                acc = tl.dot(p8, tl.trans(vt), acc * alpha[:, None])
            u_i = u_new
        else:
            if V_TMA:
                v = v_src.load([start, 0])
            elif MASK_N:
                v = tl.load(v_src + start * stride_vn, mask=ok[:, None] & d_ok[None, :], other=0.0)
            else:
                v = tl.load(v_src + start * stride_vn, mask=d_ok[None, :], other=0.0)
            if EMULATE:  # the interpreter's bf16 dot is wrong: exact fp32 products of bf16 values
                pb = to_out(p, v.dtype, EMULATE).to(tl.float32)
                acc = tl.dot(pb, v.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
            else:
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i, u_i


@triton.jit
def _ring_attention_fp8_kernel(
    Q, K8, KT, V8T, VT, V, Out, LSE, VALID,
    stride_qb, stride_qm, stride_qh,
    stride_vb, stride_vn, stride_vh,
    stride_os, stride_ob, stride_om, stride_oh,
    stride_ls, stride_lb, stride_lh,
    Lq, S, S_PAD, H, N_TILES, qk_fac,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr, USE_TMA: tl.constexpr, V_TMA: tl.constexpr, WARP_SPEC: tl.constexpr,
    PV_FP8: tl.constexpr, PRECISE_PV: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    """One (query tile, batch x head, key split): normalised output rows and their natural-log LSE."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    b = bh // H
    h = bh % H

    valid = tl.load(VALID).to(tl.int32)
    valid = tl.maximum(tl.minimum(valid, S), 0)
    per_split = tl.cdiv(tl.cdiv(valid, BLOCK_N), SPLITS) * BLOCK_N
    lo = tl.minimum(pid_s * per_split, valid)
    hi = tl.minimum(lo + per_split, valid)
    full_hi = lo + ((hi - lo) // BLOCK_N) * BLOCK_N

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < Lq

    # q: per-row e4m3; the row scale and softmax_scale * log2(e) / 448 form q_fac.
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    q_amax = tl.maximum(tl.max(tl.abs(q), 1), 1e-16)
    q8 = to_e4m3(q * tl.math.div_rn(tl.full(q_amax.shape, 448.0, tl.float32), q_amax)[:, None], EMULATE)
    q_fac = q_amax * qk_fac

    k_base = K8 + bh * S * D_PAD
    v8_base = V8T + bh * D_PAD * S_PAD
    v_base = V + b * stride_vb + h * stride_vh
    rows_desc = tl.maximum(valid, 1)  # a descriptor needs a non-empty shape; no tile is read if valid is 0
    if USE_TMA:
        k_src = tl.make_tensor_descriptor(
            k_base, shape=[rows_desc, D_PAD], strides=[D_PAD, 1], block_shape=[BLOCK_N, D_PAD]
        )
        if PV_FP8:
            v8_src = tl.make_tensor_descriptor(
                v8_base, shape=[D_PAD, rows_desc], strides=[S_PAD, 1], block_shape=[D_PAD, BLOCK_N]
            )
        else:
            v8_src = v8_base
    else:
        k_src = k_base + offs_n[:, None] * D_PAD + offs_d[None, :]
        v8_src = v8_base + offs_d[:, None] * S_PAD + offs_n[None, :]
    if V_TMA:
        v_src = tl.make_tensor_descriptor(
            v_base, shape=[rows_desc, HEAD_DIM], strides=[stride_vn, 1], block_shape=[BLOCK_N, D_PAD]
        )
    else:
        v_src = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]
    KT_b = KT + bh * N_TILES
    VT_b = VT + bh * N_TILES

    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    u_i = tl.max(tl.full([BLOCK_N], 1.0, dtype=tl.float32), 0)  # the V scale of acc (a scalar)
    # fmt: off
    acc, l_i, m_i, u_i = _fp8_attend_tiles(
        acc, l_i, m_i, u_i, q8, q_fac, k_src, v8_src, v_src, KT_b, VT_b, stride_vn, lo, full_hi, valid,
        offs_n, d_ok, False, BLOCK_N, D_PAD, USE_TMA, V_TMA, WARP_SPEC, PV_FP8, PRECISE_PV, EMULATE,
    )
    if full_hi < hi:  # the one partial tile, masked
        acc, l_i, m_i, u_i = _fp8_attend_tiles(
            acc, l_i, m_i, u_i, q8, q_fac, k_src, v8_src, v_src, KT_b, VT_b, stride_vn, full_hi, hi, valid,
            offs_n, d_ok, True, BLOCK_N, D_PAD, USE_TMA, V_TMA, False, PV_FP8, PRECISE_PV, EMULATE,
        )
    # fmt: on

    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    if PV_FP8:
        out = acc * tl.math.div_rn(u_i + tl.zeros_like(l_safe), l_safe)[:, None]
    else:
        out = acc / l_safe[:, None]
    lse = tl.where(has_keys, (m_i + tl.math.log2(l_safe) - 8.0) * 0.6931471805599453, float("-inf"))
    o_ptrs = Out + pid_s * stride_os + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, to_out(out, Out.dtype.element_ty, EMULATE), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_s * stride_ls + b * stride_lb + h * stride_lh + offs_m, lse, mask=m_ok)


# ----------------------------------------------------------------------------- launchers


def launch_ring_attention_fp8_quantized(
    q: torch.Tensor,
    kv: Fp8KV,
    v_cache: torch.Tensor,
    valid_len: torch.Tensor,
    scale: float,
    config: Fp8AttnConfig | None = None,
    pv_fp8: bool = True,
    rows_fp8: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention kernel on already-quantized K/V (`quantize_kv_fp8`); v_cache is read only
    when `pv_fp8` is False. With no config, on sm_90 at head dim 128 the Gluon kernel runs it
    (`ring_attention_fp8_hopper`, see KERNEL_ENV). (out, lse), or with `rows_fp8` the output quantized per
    row for an FP8 linear (`SplitOutputs.finish_fp8_rows`). Unchecked arguments (the bench and tests use this)."""
    B, Lq, H, d = q.shape
    S = kv.k8.shape[2]
    d_pad = kv.k8.shape[3]
    s_pad = kv.v8t.shape[3] if pv_fp8 else -(-S // 16) * 16
    n_tiles = kv.kt.shape[2]
    cfg = config if config is not None else pick_fp8_config(q)
    if not isinstance(cfg, Fp8AttnConfig):
        cfg = Fp8AttnConfig(**dataclasses.asdict(cfg))
    if cfg.block_n != kv.block_n:
        raise InvalidArgumentError(f"kv: quantized in key tiles of {kv.block_n}, the config has block_n {cfg.block_n}")
    splits = cfg.splits
    if not splits:
        on_gpu = q.device.type == "cuda"
        programs = triton.cdiv(Lq, cfg.block_m) * B * H
        splits = fp8_splits_for(programs, _sm_count(q.device.index or 0)) if on_gpu else 1
    form = _hopper_form(q, kv, config, pv_fp8, short_grid=not cfg.splits and splits > 1)
    if form is not None:
        return launch_ring_attention_fp8_hopper(q, kv, valid_len, scale * LOG2E / E4M3_MAX, splits, form, rows_fp8)
    bufs = split_outputs(q, splits)
    use_tma = bool(cfg.use_tma)
    v_tma = use_tma and not pv_fp8 and _tma_ok(v_cache) and d == d_pad
    if (use_tma or v_tma) and q.device.type == "cuda":
        _ensure_tma_allocator()
    grid = (triton.cdiv(Lq, cfg.block_m), B * H, splits)
    # fmt: off
    launch(
        _ring_attention_fp8_kernel, grid,
        q, kv.k8, kv.kt, kv.v8t, kv.vt, v_cache, bufs.o_buf, bufs.l_buf, valid_len,
        q.stride(0), q.stride(1), q.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *bufs.strides(),
        Lq, S, s_pad, H, n_tiles, scale * LOG2E / E4M3_MAX,
        HEAD_DIM=d, D_PAD=d_pad, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLITS=splits,
        USE_TMA=use_tma, V_TMA=v_tma, WARP_SPEC=cfg.warp_specialize,
        PV_FP8=pv_fp8, PRECISE_PV=cfg.precise_pv, EMULATE=interpreted(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **({"maxnreg": cfg.maxnreg} if cfg.maxnreg and not interpreted() else {}),
    )
    # fmt: on
    return bufs.finish_fp8_rows() if rows_fp8 else bufs.finish()


def launch_ring_attention_fp8(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    valid_len: torch.Tensor,
    scale: float,
    config: Fp8AttnConfig | None = None,
    pv_fp8: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-pass + kernel with an explicit config (unchecked arguments; the bench and tests use this)."""
    cfg = config if config is not None else pick_fp8_config(q)
    kv = quantize_kv_fp8(k_cache, v_cache, valid_len, cfg.block_n, quant_v=pv_fp8)
    return launch_ring_attention_fp8_quantized(q, kv, v_cache, valid_len, scale, config, pv_fp8)


def _ring_attention_fp8_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, valid_len: torch.Tensor, scale: float, pv_fp8: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_ring_attention_fp8(q, k_cache, v_cache, valid_len, scale, None, pv_fp8)


register_op("ring_attention_fp8", _ring_attention_fp8_op)


# ----------------------------------------------------------------------------- public API


def ring_attention_fp8(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    valid_len: torch.Tensor,
    scale: float | None = None,
    return_lse: bool = False,
    *,
    pv_fp8: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`ring_attention` with QK^T (and, unless `pv_fp8=False`, P @ V) in fp8 e4m3.

    q `[B, Lq, N, d]` bf16/fp16/fp32, caches `[B, S, N, d]` of q's dtype, valid_len a 1-element int
    device tensor; keys [0, valid_len) are attended. Returns out `[B, Lq, N, d]` in q's dtype
    and, with `return_lse`, the natural-log LSE `[B, N, Lq]` float32. `scale` defaults to 1/sqrt(d).
    """
    _check_attention_args(q, k_cache, v_cache, valid_len)
    scale = resolve_scale(q, scale)
    require_triton(q.device)
    out, lse = torch.ops.flashdreams.ring_attention_fp8(q, k_cache, v_cache, valid_len.reshape(1), scale, bool(pv_fp8))
    return (out, lse) if return_lse else out


def _prequantized_op(rows_fp8: bool):
    """The op over an fp8 shadow's tensors: (out, lse), or with `rows_fp8` the output's FP8 rows (values, scale)."""

    def op(
        q: torch.Tensor,
        k8: torch.Tensor,
        kt: torch.Tensor,
        v8t: torch.Tensor,
        vt: torch.Tensor,
        valid_len: torch.Tensor,
        scale: float,
        block_n: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kv = Fp8KV(k8, kt, v8t, vt, block_n)
        return launch_ring_attention_fp8_quantized(q, kv, v8t, valid_len, scale, None, True, rows_fp8=rows_fp8)

    return op


register_op("ring_attention_fp8_prequantized", _prequantized_op(False))
register_op("ring_attention_fp8_rows", _prequantized_op(True))


def fp8_kv_block_n(q_or_cache: torch.Tensor) -> int:
    """The key tile an fp8 shadow of a ring on this device must be quantized in (the attention
    config's block_n there), for `empty_fp8_kv`."""
    return pick_fp8_config(q_or_cache).block_n


def ring_attention_fp8_prequantized(
    q: torch.Tensor,
    kv: Fp8KV,
    valid_len: torch.Tensor,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`ring_attention_fp8` (fp8 QK^T and P @ V) on an fp8 shadow of the ring kept by `update_fp8_kv`:
    no K/V pass per call. The result equals `ring_attention_fp8` on the bf16 ring the shadow mirrors."""
    scale = _check_prequantized(q, kv, valid_len, scale)
    out, lse = torch.ops.flashdreams.ring_attention_fp8_prequantized(
        q, kv.k8, kv.kt, kv.v8t, kv.vt, valid_len.reshape(1), scale, kv.block_n
    )
    return (out, lse) if return_lse else out


def ring_attention_fp8_rows(q: torch.Tensor, kv: Fp8KV, valid_len: torch.Tensor, scale: float | None = None) -> Fp8Rows:
    """`ring_attention_fp8_prequantized`'s output `[B, Lq, N, d]` as the FP8 output projection reads it: each
    token's N * d values quantized per row (`Fp8Rows`, values `[B, Lq, N * d]`, scale `[B, Lq]`), the same codes
    and scales as `fp8_linear.quantize_rows_fp8` makes of it. Where the kernel splits the keys, the merge of the
    splits quantizes as it merges (`attention_merge.merge_rows_fp8`): one pass over the fp32 parts instead of
    the merge's and the linear's two, and no bf16 output written and read back."""
    scale = _check_prequantized(q, kv, valid_len, scale)
    x8, sx = torch.ops.flashdreams.ring_attention_fp8_rows(
        q, kv.k8, kv.kt, kv.v8t, kv.vt, valid_len.reshape(1), scale, kv.block_n
    )
    return Fp8Rows(x8, sx)


def _check_prequantized(q: torch.Tensor, kv: Fp8KV, valid_len: torch.Tensor, scale: float | None) -> float:
    """The prequantized kernels' argument checks; the resolved softmax scale."""
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES, last_contiguous=True)
    B, _, H, d = q.shape
    if kv.v8t.dim() != 4 or kv.k8.shape[:2] != (B, H) or kv.k8.shape[3] != fp8_d_pad(d):
        raise InvalidArgumentError(
            f"kv: expected an fp8 shadow [B {B}, N {H}, S, {fp8_d_pad(d)}] with V, found k8 {list(kv.k8.shape)}"
        )
    if kv.block_n != fp8_kv_block_n(q):
        raise InvalidArgumentError(
            f"kv: quantized in key tiles of {kv.block_n}, the kernel here reads tiles of {fp8_kv_block_n(q)}"
        )
    check_tensor("valid_len", valid_len, dtypes=INDEX_DTYPES, device=q.device)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if not (scale > 0.0 and math.isfinite(scale)):
        raise InvalidArgumentError(f"scale: expected a positive finite float, found {scale}")
    require_triton(q.device)
    return scale


# ----------------------------------------------------------------------------- reference twin


def ring_attention_fp8_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    valid_len: torch.Tensor,
    scale: float | None = None,
    return_lse: bool = False,
    *,
    pv_fp8: bool = True,
    block_n: int | None = None,
    splits: int = 1,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """What `ring_attention_fp8` computes, emulated in torch (fp32 math, e4m3 roundings as the GPU's).

    The K/V scales are per key tile and the P quantization depends on the running max at each
    tile, so the twin walks the keys in the kernel's tiles (`block_n`, default that of the
    config the kernel would pick) and `splits`. Products of e4m3 values are exact in fp32, so
    the kernel differs from this only by fp32 summation order and exp2 rounding (and the GPU's
    imprecise accumulation if `precise_pv` is off).
    """
    B, Lq, H, d = q.shape
    S = k_cache.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if block_n is None:
        block_n = pick_fp8_config(q).block_n
    valid = max(0, min(int(valid_len.reshape(()).item()), S))
    dev = q.device
    q8, _, q_amax = quantize_rows_e4m3(q.float().permute(0, 2, 1, 3))  # [B, H, Lq, d]
    q_fac = (q_amax * (scale * LOG2E / E4M3_MAX))[..., None]  # [B, H, Lq, 1]
    k8, kt = quantize_tiles_e4m3(k_cache[:, :valid].float().permute(0, 2, 1, 3), block_n)
    vf = v_cache[:, :valid].float().permute(0, 2, 1, 3)
    if pv_fp8:
        v8, vt = quantize_tiles_e4m3(vf, block_n)

    tiles = -(-valid // block_n)
    per_split = -(-tiles // splits) * block_n
    outs, lses = [], []
    for sp in range(splits):
        lo = min(sp * per_split, valid)
        hi = min(lo + per_split, valid)
        acc = torch.zeros(B, H, Lq, d, device=dev)
        l_i = torch.zeros(B, H, Lq, 1, device=dev)
        m_i = torch.full((B, H, Lq, 1), float("-inf"), device=dev)
        u_i = torch.ones(B, H, 1, 1, device=dev)
        for start in range(lo, hi, block_n):
            t, ti = slice(start, min(start + block_n, hi)), start // block_n
            f = q_fac * kt[:, :, ti, None, None]
            s = q8 @ k8[:, :, t].transpose(-1, -2)
            m_new = torch.maximum(m_i, s.amax(-1, keepdim=True) * f)
            p = torch.exp2(s * f - (m_new - P_SHIFT))
            alpha = torch.exp2(m_i - m_new)
            l_i = l_i * alpha + p.sum(-1, keepdim=True)
            if pv_fp8:
                u_new = vt[:, :, ti, None, None]
                acc = acc * (alpha * (u_i / u_new)) + round_e4m3(p) @ v8[:, :, t]
                u_i = u_new
            else:
                pb = p.to(torch.bfloat16 if q.dtype == torch.bfloat16 else q.dtype).float()
                acc = acc * alpha + pb @ vf[:, :, t]
            m_i = m_new
        has = l_i > 0
        l_safe = torch.where(has, l_i, torch.ones_like(l_i))
        out = acc * (u_i / l_safe) if pv_fp8 else acc / l_safe
        lse = torch.where(has, (m_i + torch.log2(l_safe) - P_SHIFT) * LN2, float("-inf"))
        outs.append(out)
        lses.append(lse[..., 0])
    if splits == 1:
        out, lse = outs[0], lses[0]
    else:
        lse_all = torch.stack(lses)  # [P, B, H, Lq]
        lse = torch.logsumexp(lse_all, 0)
        w = torch.exp(lse_all - lse).nan_to_num(0.0)[..., None]
        out = sum(torch.where(w[i] > 0, outs[i], 0.0) * w[i] for i in range(splits))
    out = out.permute(0, 2, 1, 3).to(q.dtype)
    return (out, lse) if return_lse else out
