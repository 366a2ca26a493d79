"""FP8 (e4m3) linear layers for the DiT: per-token activations x per-output-channel weights.

y = (x8 @ w8^T) * sx[m] * sw[n] + bias, where x8 = e4m3(x * 448/amax(x_row)) with
sx = amax(x_row)/448 (one scale per token, computed on the fly) and w8 / sw likewise per output
channel (once, at load). On CUDA the product is `torch._scaled_mm` with row-wise scales (on sm_90
a CUTLASS/cuBLASLt fp8 GEMM, bf16 output, fp32 accumulation; `use_fast_accum` lets the tensor
core accumulate in its reduced-precision adder for the whole K loop, what the linears a model swaps in
use: `FAST_ACCUM_ENV`); the activations are
quantized by one Triton pass (read x once, write x8 and sx). Elsewhere (CPU tests) the same
quantization is emulated in torch and the product is an fp32 matmul of the dequantized operands.

Cost model at Self-Forcing's block (4680 tokens): the GEMMs are compute-bound, 22-129 GFLOP
each; quantizing x moves 1.5 bytes per element (14 MB for D 1536, 84+42 MB for the FFN's 8960),
i.e. 5-45 us against 30-110 us of fp8 GEMM, so the pass is fused into its producer where one holds the
whole row: the GELU here (`gelu=`), the AdaLN/LayerNorm row passes in kernels/adaln.py, which hand over
`Fp8Rows` that `fp8_linear` takes without a pass of its own.

Which layers (`quantize_linears_fp8_`, default `is_dit_fp8_linear`): in every DiT block the
self-attention q/k/v/o, the cross-attention q/o and the FFN's two linears. Cross-attention k/v
run once per prompt (the cross cache) and stay bf16, as do the patch, text and time embeddings
and the head.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from flashdreams.errors import InvalidArgumentError

from ._common import (
    check_tensor,
    interpreted,
    launch,
    new_output,
    next_pow2,
    register_op,
    require_triton,
    row_tile,
    tl,
    triton,
)
from ._fast_math import exp2_ftz, rcp_ftz
from ._rounding import round_to_f32, to_e4m3
from .fp8_kv import quantize_rows_e4m3

FP8 = torch.float8_e4m3fn


# ----------------------------------------------------------------------------- activation quantization


@triton.jit
def _store_e4m3_rows(x, x8_ptrs, s_ptrs, mask, row_mask, EMULATE: tl.constexpr):
    """Quantize the fp32 rows x `[R, K]` (masked entries 0) per row and store them:
    x8 = e4m3(x * 448/amax(|x_row|)) at x8_ptrs, scale = amax/448 at s_ptrs (amax floored at 1e-16).
    Every producer of pre-quantized rows (this file's pass, the AdaLN row pass) stores through here,
    so that they agree bit for bit."""
    amax = tl.max(tl.abs(x), 1)
    inv = _e4m3_inv_scale(amax)
    tl.store(x8_ptrs, to_e4m3(x * inv[:, None], EMULATE), mask=mask)
    _store_row_scale(amax, s_ptrs, row_mask)


@triton.jit
def _e4m3_inv_scale(amax):
    """448/amax per row (amax floored at 1e-16): what a row's values are multiplied by before the e4m3 cast."""
    amax = tl.maximum(amax, 1e-16)
    return tl.math.div_rn(tl.full(amax.shape, 448.0, tl.float32), amax)


@triton.jit
def _store_row_scale(amax, s_ptrs, row_mask):
    """Store amax/448 per row (amax floored at 1e-16), the scale the e4m3 codes are multiplied by."""
    amax = tl.maximum(amax, 1e-16)
    tl.store(s_ptrs, tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32)), mask=row_mask)


@triton.jit
def _gelu_erfc_fit(x, FAST: tl.constexpr, EMULATE: tl.constexpr):
    """Exact GELU, x * Phi(x), with erfc from Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7, far below the
    bf16 rounding that follows): erfc(a) ~ t (a1 + ... + a5 t^4) exp(-a^2), t = 1 / (1 + p a), a = |x| / sqrt 2,
    the coefficients halved so that h = erfc(a) / 2 = Phi(-|x|). One reciprocal, one exp2 and seven FMAs
    without a branch, where libdevice's erff takes two polynomial paths and a full exp (the pass was
    issue-bound on it: bench/results/NOTES.md, the fourth session of 2026-12-06). FAST: the reciprocal as one
    MUFU instruction (kernels/_fast_math.py; the exp2 is one either way)."""
    d = 1.0 + 0.23164189758 * tl.abs(x)  # p / sqrt 2 = 0.3275911 / 1.41421356
    if FAST:
        t = rcp_ftz(d, EMULATE)
    else:
        t = 1.0 / d
    poly = t * (0.127414796 + t * (-0.142248368 + t * (0.7107068705 + t * (-0.7265760135 + t * 0.5307027145))))
    h = poly * exp2_ftz(x * x * -0.7213475204444817, EMULATE)  # exp(-x^2 / 2) = 2^(-x^2 log2(e) / 2)
    return x * tl.where(x >= 0.0, 1.0 - h, h)


# The tanh GELU as x / (1 + 2^z) with z = -2 log2(e) sqrt(2/pi) (x + 0.044715 x^3) = x (A + B x^2).
_TANH_A = tl.constexpr(-2.302208198144325)
_TANH_B = tl.constexpr(-0.1029432395800235)


@triton.jit
def _gelu_in_dtype(x, GELU: tl.constexpr, dtype: tl.constexpr, FAST: tl.constexpr, EMULATE: tl.constexpr):
    """GELU(x) (1 exact, 2 tanh form, 3 exact with `_gelu_erfc_fit`; 0 none) of fp32 x, rounded to `dtype`
    as `F.gelu` would hand it on. FAST: the fit's reciprocal and the tanh form's exp2 and reciprocal as single
    MUFU instructions, the tanh form with its constants folded (its pass: 32 -> 23 sm_90 SASS instructions an
    element)."""
    if GELU != 0:
        if GELU == 1:
            x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
        elif GELU == 3:
            x = _gelu_erfc_fit(x, FAST, EMULATE)
        elif FAST:
            x = x * rcp_ftz(1.0 + exp2_ftz(x * (_TANH_A + _TANH_B * (x * x)), EMULATE), EMULATE)
        else:  # 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)
            x = x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
        x = round_to_f32(x, dtype, EMULATE)
    return x


@triton.jit
def _load_gelu_chunk(
    X, r, stride_x, R, K, OFF: tl.constexpr, C: tl.constexpr, GELU: tl.constexpr, FAST: tl.constexpr,
    EMULATE: tl.constexpr,
):  # fmt: skip
    """Columns OFF..OFF+C of BLOCK_R rows as fp32 (0 past K or R), GELU applied where asked."""
    c = OFF + tl.arange(0, C)
    mask = (r < R)[:, None] & (c < K)[None, :]
    x = tl.load(X + r[:, None] * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
    return _gelu_in_dtype(x, GELU, X.dtype.element_ty, FAST, EMULATE), c, mask


@triton.jit
def _quantize_rows_kernel(
    X, X8, SX, stride_x, R, K,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, BLOCK_R: tl.constexpr, EMULATE: tl.constexpr,
    GELU: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    """BLOCK_R rows: x8 = e4m3(x * 448/amax(|x_row|)), sx = amax/448 (amax floored at 1e-16). With
    GELU (1 exact, 2 tanh form), x is first replaced by GELU(x) rounded to x's dtype: what `F.gelu`
    would hand the linear, without writing it out and reading it back.

    A row is held as up to three power-of-two column chunks C0 + C1 + C2 >= K (`row_chunks`; C1/C2
    0: absent) rather than one tile of next_pow2(K): at Self-Forcing's FFN width 8960 that is 8960
    columns of work instead of 16384, and the pass is issue-bound (the GELU), not only HBM-bound."""
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    x0, c0, m0 = _load_gelu_chunk(X, r, stride_x, R, K, 0, C0, GELU, FAST, EMULATE)
    amax = tl.max(tl.abs(x0), 1)
    if C1 > 0:
        x1, c1, m1 = _load_gelu_chunk(X, r, stride_x, R, K, C0, C1, GELU, FAST, EMULATE)
        amax = tl.maximum(amax, tl.max(tl.abs(x1), 1))
    if C2 > 0:
        x2, c2, m2 = _load_gelu_chunk(X, r, stride_x, R, K, C0 + C1, C2, GELU, FAST, EMULATE)
        amax = tl.maximum(amax, tl.max(tl.abs(x2), 1))
    inv = _e4m3_inv_scale(amax)[:, None]
    tl.store(X8 + r[:, None] * K + c0[None, :], to_e4m3(x0 * inv, EMULATE), mask=m0)
    if C1 > 0:
        tl.store(X8 + r[:, None] * K + c1[None, :], to_e4m3(x1 * inv, EMULATE), mask=m1)
    if C2 > 0:
        tl.store(X8 + r[:, None] * K + c2[None, :], to_e4m3(x2 * inv, EMULATE), mask=m2)
    _store_row_scale(amax, SX + r, r < R)


# Rows held as power-of-two chunks (row_chunks) rather than one next_pow2(K) tile. None: chunks on a GPU where
# they pay (`chunks_pay`), one tile under the interpreter, where fewer and larger array operations run faster
# (an FP8 session test took 117 s chunked against 108 s). bench/row_chunks_bench.py and the tests set True /
# False to run either form.
ROW_CHUNKS: bool | None = None


def chunks_pay(k: int, gelu: int) -> bool:
    """Whether a row K wide runs faster as chunks than as one next_pow2(K) tile on a GPU; gelu: the pass's GELU
    code (0: none). Chunks pay where the pass computes (a GELU fused) rather than only moves bytes: graph-timed
    on an H100 and an H200 (bench/results/next63-h100, next77-h200) the FFN hidden with its GELU ran faster
    chunked at 8960 columns (1.35-1.47x) and 13824 (1.02-1.09x), while the plain passes over the attention
    outputs ran slower (1536: 0.83x, 5120: 0.84-0.89x): there the padded lanes cost little, the chunks more."""
    return gelu != 0 and next_pow2(k) != k


def row_chunks(k: int, chunked: bool = True) -> tuple[int, int, int]:
    """Column chunks (C0, C1, C2) of a row K wide: C0 the largest power of two <= K, C1 the largest <= what
    is left, C2 the next power of two >= the rest (masked past K); 0 for a chunk not needed. With `chunked`
    False, one tile of next_pow2(K). 8960 -> (8192, 512, 256), 13824 -> (8192, 4096, 2048), 1536 ->
    (1024, 512, 0)."""
    if k < 1:
        raise InvalidArgumentError(f"row width: expected >= 1, found {k}")
    if not chunked:
        return next_pow2(k), 0, 0
    c0 = 1 << (k.bit_length() - 1)
    rest = k - c0
    c1 = 1 << (rest.bit_length() - 1) if rest else 0
    rest -= c1
    return c0, c1, next_pow2(rest) if rest else 0


# The GELU a quantization pass may apply first, by name -> (kernel code, torch's `approximate`).
GELU_FORMS = {"exact": (1, "none"), "tanh": (2, "tanh")}
# How the pass computes the exact GELU's erf: "fit" (`_gelu_erfc_fit`) or "libdevice" (tl.math.erf, the form
# before 2026-12-06; bench/gelu_quantize_bench.py times both in one run).
EXACT_GELU_ERF = "fit"
# The GELUs' exp2 and reciprocal as single MUFU instructions (`_gelu_in_dtype`'s FAST); False: the forms before
# 2026-12-07 (bench/gelu_quantize_bench.py times both in one run).
GELU_FAST_MATH = True


def _check_gelu(gelu: str | None) -> None:
    if gelu is not None and gelu not in GELU_FORMS:
        raise InvalidArgumentError(f"gelu: expected None or one of {sorted(GELU_FORMS)}, found {gelu!r}")


def _gelu(x: torch.Tensor, gelu: str | None) -> torch.Tensor:
    return x if gelu is None else F.gelu(x, approximate=GELU_FORMS[gelu][1])


def _launch_quantize_rows(x: torch.Tensor, gelu: int) -> tuple[torch.Tensor, torch.Tensor]:
    R, K = x.shape
    x8 = new_output((R, K), FP8, x.device)
    sx = new_output((R,), torch.float32, x.device)
    # rows per program and warps as for the whole next_pow2(K) tile, so that the chunks change only the padding
    block_r, num_warps = row_tile(next_pow2(K), R, x.device)
    c0, c1, c2 = row_chunks(K, (not interpreted() and chunks_pay(K, gelu)) if ROW_CHUNKS is None else ROW_CHUNKS)
    if gelu == GELU_FORMS["exact"][0] and EXACT_GELU_ERF == "fit":
        gelu = 3
    # fmt: off
    launch(
        _quantize_rows_kernel, (triton.cdiv(R, block_r),),
        x, x8, sx, x.stride(0), R, K,
        C0=c0, C1=c1, C2=c2, BLOCK_R=block_r, EMULATE=interpreted(), GELU=gelu, FAST=GELU_FAST_MATH,
        num_warps=num_warps,
    )
    # fmt: on
    return x8, sx


def _quantize_rows_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_quantize_rows(x, 0)


def _gelu_quantize_rows_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_quantize_rows(x, GELU_FORMS["exact"][0])


def _gelu_tanh_quantize_rows_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_quantize_rows(x, GELU_FORMS["tanh"][0])


register_op("quantize_rows_fp8", _quantize_rows_op)
register_op("gelu_quantize_rows_fp8", _gelu_quantize_rows_op)
register_op("gelu_tanh_quantize_rows_fp8", _gelu_tanh_quantize_rows_op)


def quantize_rows_fp8(x: torch.Tensor, gelu: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantization of a 2-D `[R, K]` tensor (last dim contiguous) by the Triton kernel:
    (x8 `[R, K]` float8_e4m3fn, contiguous; sx `[R]` float32) with x ~= sx[:, None] * x8. `gelu`
    ("exact" or "tanh", the form `F.gelu` calls "none" / "tanh"): quantize GELU(x) (in x's dtype)
    instead, in the same single pass."""
    check_tensor("x", x, ndim=2, dtypes=(torch.bfloat16, torch.float16, torch.float32), last_contiguous=True)
    _check_gelu(gelu)
    require_triton(x.device)
    if gelu == "exact":
        return torch.ops.flashdreams.gelu_quantize_rows_fp8(x)
    if gelu == "tanh":
        return torch.ops.flashdreams.gelu_tanh_quantize_rows_fp8(x)
    return torch.ops.flashdreams.quantize_rows_fp8(x)


def quantize_rows_fp8_reference(x: torch.Tensor, gelu: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What `quantize_rows_fp8` computes, in torch (any device)."""
    _check_gelu(gelu)
    x8, sx, _ = quantize_rows_e4m3(_gelu(x, gelu).float())
    return x8.to(FP8), sx


def quantize_weight_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An `[N, K]` linear weight -> (w8 `[N, K]` e4m3 contiguous, scale `[N]` float32), per output channel."""
    check_tensor("w", w, ndim=2)
    w8, sw, _ = quantize_rows_e4m3(w.detach().float())
    return w8.to(FP8).contiguous(), sw.contiguous()


# ----------------------------------------------------------------------------- the linear


_bias_fusable: dict[torch.device, bool] = {}


def _scaled_mm_takes_bias(device: torch.device) -> bool:
    """Whether this torch's row-wise `_scaled_mm` accepts a bf16 bias (probed once per device)."""
    if device not in _bias_fusable:
        if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
            return False  # cannot probe inside a trace or a capture: add the bias outside, always right
        a = torch.ones(16, 32, device=device).to(FP8)
        b = torch.ones(16, 32, device=device).to(FP8)
        one = torch.ones(16, 1, device=device)
        try:
            y = torch._scaled_mm(
                a, b.t(), one, one.t(), bias=torch.ones(16, device=device, dtype=torch.bfloat16),
                out_dtype=torch.bfloat16,
            )  # fmt: skip
            _bias_fusable[device] = bool((y.float() == 33.0).all().item())
        except (RuntimeError, TypeError, ValueError):
            _bias_fusable[device] = False
    return _bias_fusable[device]


def _gemm_ok(x: torch.Tensor, w8: torch.Tensor) -> bool:
    """The shapes `_scaled_mm` takes: K and N multiples of 16 (cuBLASLt / CUTLASS fp8 alignment)."""
    return x.device.type == "cuda" and w8.shape[0] % 16 == 0 and w8.shape[1] % 16 == 0


class Fp8Rows(NamedTuple):
    """An activation already quantized per row for an FP8 linear: `values` `[..., K]` float8_e4m3fn
    and `scale` `[...]` float32, x ~= scale[..., None] * values (what `quantize_rows_fp8` makes of x).
    A pass that computes x anyway (the AdaLN row pass, kernels/adaln.py) writes these in place of x:
    1 byte an element instead of 2, and the linear skips its own read-and-quantize pass."""

    values: torch.Tensor
    scale: torch.Tensor

    def dequantized(self) -> torch.Tensor:
        """scale[..., None] * values in float32."""
        return self.values.float() * self.scale[..., None]


def _check_rows(rows: Fp8Rows, K: int) -> None:
    check_tensor("x.values", rows.values, dtypes=(FP8,), last_contiguous=True)
    if rows.values.dim() < 1 or rows.values.shape[-1] != K:
        raise InvalidArgumentError(
            f"x.values: expected last dim {K} (the weight's in_features), found {list(rows.values.shape)}"
        )
    check_tensor("x.scale", rows.scale, dtypes=(torch.float32,), device=rows.values.device)
    if rows.scale.shape != rows.values.shape[:-1]:
        raise InvalidArgumentError(
            f"x.scale: expected shape {list(rows.values.shape[:-1])} (one per row of x.values), "
            f"found {list(rows.scale.shape)}"
        )


def fp8_linear(
    x: torch.Tensor | Fp8Rows,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    *,
    use_fast_accum: bool = False,
    gelu: str | None = None,
) -> torch.Tensor:
    """F.linear(x, w, bias) with x quantized per token and w = w_scale[:, None] * w_fp8 (e4m3).
    `gelu` ("exact" / "tanh"): F.linear(GELU(x), ...), the GELU done inside the activation
    quantization's pass.

    x `[..., K]`, or an `Fp8Rows` (quantized already: no pass here, no `gelu`); w_fp8 `[N, K]`
    float8_e4m3fn; w_scale `[N]` float32; bias `[N]` or None. Returns `[..., N]` in `out_dtype`
    (default x's dtype; bf16 for Fp8Rows). On CUDA: Triton quantization + `torch._scaled_mm` (bf16
    output, cast if another dtype is asked for); elsewhere, or for shapes `_scaled_mm` refuses,
    `fp8_linear_reference`.
    """
    rows = x if isinstance(x, Fp8Rows) else None
    out_dtype = out_dtype or (torch.bfloat16 if rows is not None else x.dtype)
    if w_fp8.dtype != FP8 or w_fp8.dim() != 2:
        raise InvalidArgumentError(
            f"w_fp8: expected a 2-D float8_e4m3fn tensor, found {w_fp8.dtype} {list(w_fp8.shape)}"
        )
    N, K = w_fp8.shape
    if rows is not None:
        _check_rows(rows, K)
        if gelu is not None:
            raise InvalidArgumentError("gelu: an Fp8Rows input is quantized already; GELU cannot be applied to it")
    elif x.shape[-1] != K:
        raise InvalidArgumentError(f"x: expected last dim {K} (the weight's in_features), found {list(x.shape)}")
    if w_scale.shape != (N,) or w_scale.dtype != torch.float32:
        raise InvalidArgumentError(f"w_scale: expected float32 [{N}], found {w_scale.dtype} {list(w_scale.shape)}")
    _check_gelu(gelu)
    if not _gemm_ok(rows.values if rows is not None else x, w_fp8):
        if rows is not None:
            return _dequantized_product(rows.values.float(), rows.scale, w_fp8, w_scale, bias, out_dtype)
        return fp8_linear_reference(_gelu(x, gelu), w_fp8, w_scale, bias, out_dtype)
    if rows is not None:
        lead = rows.values.shape[:-1]
        x8, sx = rows.values.reshape(-1, K), rows.scale.reshape(-1)
    else:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, K)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        x8, sx = quantize_rows_fp8(x2, gelu=gelu)
    fuse = bias is not None and _scaled_mm_takes_bias(x8.device)
    y = torch._scaled_mm(
        x8,
        w_fp8.t(),  # [K, N] column-major, as the second operand must be
        scale_a=sx[:, None],
        scale_b=w_scale[None, :],
        bias=bias.to(torch.bfloat16) if fuse else None,
        out_dtype=torch.bfloat16,
        use_fast_accum=use_fast_accum,
    )
    if bias is not None and not fuse:
        y = y + bias.to(y.dtype)
    return y.to(out_dtype).reshape(*lead, N)


def _dequantized_product(
    x8: torch.Tensor,
    sx: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The fp32 matmul of quantized rows (e4m3 values as fp32, per-row scales) and the dequantized
    weight, with `_scaled_mm`'s bf16 output rounding."""
    w = w_fp8.float() * w_scale[:, None]
    y = (x8 * sx[..., None]) @ w.t()
    if bias is not None:
        y = y + bias.float()
    if out_dtype != torch.float32:
        y = y.to(torch.bfloat16)  # _scaled_mm's output rounding
    return y.to(out_dtype)


def fp8_linear_reference(
    x: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """What `fp8_linear` computes, in torch: the same quantization of x, then an fp32 matmul of the
    dequantized operands (the GPU's result differs by fp32 summation order and bf16 rounding)."""
    x8, sx, _ = quantize_rows_e4m3(x.float())
    return _dequantized_product(x8, sx, w_fp8, w_scale, bias, x.dtype if out_dtype is None else out_dtype)


class Fp8Linear(nn.Module):
    """A frozen `nn.Linear` with an e4m3 weight (per output channel) and per-token fp8 activations.

    Buffers `weight_fp8` `[out, in]` float8_e4m3fn and `weight_scale` `[out]` float32 keep their
    dtypes through `module.to(dtype)` (only their device follows); `bias` (if any) is an ordinary
    frozen parameter in the original dtype, which is also the output dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
        use_fast_accum: bool = False,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.use_fast_accum = use_fast_accum
        self.register_buffer("weight_fp8", torch.zeros(out_features, in_features, dtype=FP8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._dtype = dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, use_fast_accum: bool | None = None) -> Fp8Linear:
        """Quantize an `nn.Linear` (its weight per output channel); output dtype = its weight's dtype.
        `use_fast_accum` None: FD_FP8_FAST_ACCUM's choice (`fast_accum_default`)."""
        if use_fast_accum is None:
            use_fast_accum = fast_accum_default()
        w = linear.weight
        mod = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            device=w.device,
            dtype=w.dtype,
            use_fast_accum=use_fast_accum,
        )
        w8, sw = quantize_weight_fp8(w)
        mod.weight_fp8.copy_(w8)
        mod.weight_scale.copy_(sw)
        if linear.bias is not None:
            mod.bias.data = linear.bias.detach().clone()
        return mod

    @property
    def out_dtype(self) -> torch.dtype:
        return self.bias.dtype if self.bias is not None else self._dtype

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this layer multiplies by, `[out, in]` float32."""
        return self.weight_fp8.float() * self.weight_scale[:, None]

    # forward(x, gelu="exact" | "tanh") is this layer applied to GELU(x), fused into the quantization.
    takes_gelu = True

    # forward(Fp8Rows) takes an activation quantized already (by the AdaLN row pass, say).
    takes_fp8_rows = True

    def forward(self, x: torch.Tensor | Fp8Rows, gelu: str | None = None) -> torch.Tensor:
        return fp8_linear(
            x,
            self.weight_fp8,
            self.weight_scale,
            self.bias,
            self.out_dtype,
            use_fast_accum=self.use_fast_accum,
            gelu=gelu,
        )

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        """`.to()` / `.cuda()` move the fp8 weight and its scale but never change their dtypes."""
        keep = {n: self._buffers.pop(n) for n in ("weight_fp8", "weight_scale")}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in keep.items():
                target = fn(torch.empty(0, device=t.device)).device
                self._buffers[name] = t.to(target)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"fp8=e4m3 (per-channel weight, per-token activation), fast_accum={self.use_fast_accum}"
        )


# ----------------------------------------------------------------------------- swapping a model's linears

# The FP8 linears a model swaps in use `_scaled_mm`'s fast accumulation (the tensor cores' own fp8
# accumulation, without cuBLAS's periodic promotion to fp32): on an H100, LingBot-World Fast's FP8 block 7
# took 1372.6 ms against 1470.2 (its FP8 GEMMs 406.2 against 515.6 ms), Self-Forcing's block 5 287.5 against
# 294.5, each pair own processes on one machine, and their 7-block error against bf16 did not move (LingBot
# rel. L2 0.0079 / 48.58 dB against 0.0080 / 48.57; Self-Forcing 0.0235 / 43.34 against 0.0236 / 43.34;
# bench/results/next50-h100, next48-h100). FD_FP8_FAST_ACCUM=0 gives the promoting form (the suite's
# *-fp8-fastaccum parts time both).
FAST_ACCUM_ENV = "FD_FP8_FAST_ACCUM"


def fast_accum_default() -> bool:
    """Whether new FP8 linears use fast accumulation: FD_FP8_FAST_ACCUM ("0" no; unset, "" or "1" yes)."""
    raw = os.environ.get(FAST_ACCUM_ENV, "")
    if raw not in ("", "0", "1"):
        raise InvalidArgumentError(f"{FAST_ACCUM_ENV}: expected 0 or 1, found {raw!r}")
    return raw != "0"


# cuBLASLt, which runs `_scaled_mm`, takes a workspace for its split-K / stream-K kernels and zeroes part of it with
# a memset before each such GEMM (~930 memsets in a Self-Forcing FP8 block). Without workspace it runs the same tiles
# in variants that need none: Self-Forcing's FP8 block 5 256.1 / 257.0 against 260.2 / 261.7 ms, LingBot-World
# Fast's 1319.4 against 1325.5 (H100, own processes; bench/results/next113-h100, next114-h100). So an FP8 load asks
# for none, unless the process says otherwise: it set CUBLASLT_WORKSPACE_SIZE itself, or FD_FP8_WORKSPACE_FREE=0
# (torch's default, for comparisons).
WORKSPACE_ENV = "CUBLASLT_WORKSPACE_SIZE"
WORKSPACE_FREE_ENV = "FD_FP8_WORKSPACE_FREE"


def prefer_workspace_free_gemms() -> bool:
    """Set CUBLASLT_WORKSPACE_SIZE=0 (KiB) unless it is set already or FD_FP8_WORKSPACE_FREE is "0" (unset, "" or
    "1": set it; anything else is refused by name); True if this call set it. torch reads the variable once, at the
    process's first cuBLASLt GEMM, so it acts only when no GEMM ran before it."""
    raw = os.environ.get(WORKSPACE_FREE_ENV, "")
    if raw not in ("", "0", "1"):
        raise InvalidArgumentError(f"{WORKSPACE_FREE_ENV}: expected 0 or 1, found {raw!r}")
    if raw == "0" or WORKSPACE_ENV in os.environ:
        return False
    os.environ[WORKSPACE_ENV] = "0"
    return True


_DIT_FP8 = re.compile(r"(^|\.)blocks\.\d+\.(self_attn\.(q|k|v|o)|cross_attn\.(q|o)|ffn\.(0|2))$")


def fp8_exclusion(pattern: str) -> re.Pattern | None:
    """The compiled regex of the linears a DiT's `quantize_fp8_(exclude=...)` keeps out of FP8 ("": none)."""
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise InvalidArgumentError(f"exclude: {pattern!r} is not a regular expression ({exc})") from None


def is_dit_fp8_linear(name: str, linear: nn.Linear) -> bool:
    """The DiT linears that run per token per forward: self-attn q/k/v/o, cross-attn q/o, ffn.0/ffn.2
    of every block (and whose dims suit fp8 GEMMs: multiples of 16)."""
    return bool(_DIT_FP8.search(name)) and linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def quantize_linears_fp8_(
    module: nn.Module,
    include: Callable[[str, nn.Linear], bool] | None = None,
    *,
    use_fast_accum: bool | None = None,
) -> list[str]:
    """Replace, in place, every `nn.Linear` of `module` for which `include(name, linear)` holds
    (default `is_dit_fp8_linear`) by `Fp8Linear.from_linear`; returns the replaced names.
    `use_fast_accum` None: FD_FP8_FAST_ACCUM's choice.

    Run it after the weights are loaded and the model is on its device and dtype.
    """
    include = is_dit_fp8_linear if include is None else include
    if use_fast_accum is None:
        use_fast_accum = fast_accum_default()  # read once, before anything is swapped
    targets = [
        (name, parent, child_name, child)
        for name, parent in module.named_modules()
        for child_name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    done = []
    for name, parent, child_name, child in targets:
        full = f"{name}.{child_name}" if name else child_name
        if include(full, child):
            setattr(parent, child_name, Fp8Linear.from_linear(child, use_fast_accum=use_fast_accum))
            done.append(full)
            if child.weight.is_cuda:
                _scaled_mm_takes_bias(child.weight.device)  # probe now, not during a graph capture
    return done
