"""The AdaLN steps of a Wan DiT block, with per-frame modulation, as single-pass row kernels.

x is `[B, L, D]` with L = F * fs tokens (token t in frame t // fs); shift, scale and gate
are `[B, F, D]` float32 (one modulation per latent frame, as the causal models use). All
math is fp32; results are rounded once to the output dtype (x's unless `out_dtype`):

  adaln_modulate(x, shift, scale)            LayerNorm(x) * (1 + scale) + shift
  gated_residual(x, y, gate)                 x + y * gate
  gated_residual_adaln(x, y, gate, shift, scale)
                                             x' = x + y * gate; (x', LayerNorm(x') * (1 + scale) + shift)
  residual_adaln(x, y, shift, scale)         x' = x + y; (x', LayerNorm(x') * (1 + scale) + shift)
  layer_norm_affine(x, weight, bias)         LayerNorm(x) * weight + bias (the cross-attention pre-norm)
  gated_residual_layer_norm(x, y, gate, weight, bias)
                                             x' = x + y * gate; (x', LayerNorm(x') * weight + bias)
  residual_layer_norm(x, y, weight, bias)    x' = x + y; (x', LayerNorm(x') * weight + bias) (a plain
                                             pre-norm transformer's residual and next norm: the arena's)
  gated_residual_modulate_layer_norm(x, y, gate, token_scale, token_shift, weight, bias)
                                             x' = (1 + token_scale) * (x + y * gate) + token_shift;
                                             (x', LayerNorm(x') * weight + bias) (LingBot: its camera's
                                             per-token scale/shift sits between the two)

LayerNorm has no affine here and eps inside the rsqrt, like `torch.nn.LayerNorm`.
`out_dtype=torch.float8_e4m3fn` hands h out quantized per row for an FP8 linear (`Fp8Rows`), with the
numbers of rounding h to x's dtype and quantizing it: the linear's own quantization pass (read 2 bytes
an element, write 1) disappears, and h is written at 1 byte an element instead of 2.
The fused pairs are the reason for this file: after each attention/FFN the residual add
and the next norm read x once and write x' and h once (4 tensor passes instead of 6). A Wan
block uses two: the self-attention residual with the cross-attention's pre-norm, the
cross-attention residual (ungated) with the FFN's modulated norm. Each kernel is bound by
HBM: bytes moved = (tensors read + written) * B * L * D * elem; at Self-Forcing's block
(B 1, L 4680, D 1536) one bf16 tensor pass is 14.4 MB, 4.8 us at the H100's 3.0 TB/s; the target is >= 70% of that rate.
"""

from __future__ import annotations

import torch

from flashdreams.errors import InvalidArgumentError

from ._common import (
    FLOAT_DTYPES,
    check_shape,
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
from ._rounding import round_to_f32
from .fp8_linear import FP8, Fp8Rows, _store_e4m3_rows, quantize_rows_fp8_reference

NORM_NONE, NORM_MODULATE, NORM_AFFINE = 0, 1, 2
# Per-frame vectors loaded once per program where its rows share a frame (see _adaln_kernel);
# bench/kernels_bench.py turns it off to time the per-row loads beside it in one run.
ONE_FRAME_LOADS = True
RESIDUAL_NONE, RESIDUAL_GATED, RESIDUAL_PLAIN = 0, 1, 2


@triton.jit
def _adaln_kernel(
    X, Y, GATE, SHIFT, SCALE, XO, HO, TSC, TSH, HS,
    stride_xb, stride_xt, stride_yb, stride_yt,
    stride_gb, stride_gf, stride_shb, stride_shf, stride_scb, stride_scf,
    stride_xob, stride_xot, stride_hob, stride_hot, stride_tscb, stride_tsct, stride_tshb, stride_tsht,
    stride_hsb,
    L, D, FS, eps,
    RESIDUAL: tl.constexpr, NORM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    ONE_FRAME: tl.constexpr, TOKEN_MOD: tl.constexpr, QUANT: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    """BLOCK_T token rows of one batch: [x += y (* gate)] [x = (1 + tscale) * x + tshift] [store x];
    [h = norm(x) modulated, store].

    QUANT: h is stored quantized for an FP8 linear (HO e4m3 `[B, L, D]`, HS its per-row scale
    `[B, L]`), after rounding it to x's dtype: the same numbers as storing h in x's dtype and
    quantizing that (`fp8_linear.quantize_rows_fp8`), without writing h out and reading it back.

    TOKEN_MOD: a per-token modulation of the residual (LingBot's camera: scale/shift `[B, L, D]`)
    after the residual add, each step rounded to x's dtype as the unfused ops round it.

    ONE_FRAME: every program's rows lie in one frame (BLOCK_T divides FS), so each per-frame vector
    (gate, shift, scale) is loaded once as [1, D] and broadcast, not once per row: per row those
    loads are 12 bytes an element against the row's 8 of x, y and the outputs.
    """
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    b = tl.program_id(1).to(tl.int64)
    c = tl.arange(0, D_PAD)
    c_ok = c < D
    mask = (t < L)[:, None] & c_ok[None, :]
    t2 = t.to(tl.int64)[:, None]
    if ONE_FRAME:
        f2 = ((tl.program_id(0) * BLOCK_T) // FS + tl.zeros([1, 1], dtype=tl.int32)).to(tl.int64)
        vec_mask = c_ok[None, :]
    else:
        f2 = (t // FS).to(tl.int64)[:, None]
        vec_mask = mask
    x = tl.load(X + b * stride_xb + t2 * stride_xt + c[None, :], mask=mask, other=0.0).to(tl.float32)
    if RESIDUAL != 0:
        y = tl.load(Y + b * stride_yb + t2 * stride_yt + c[None, :], mask=mask, other=0.0).to(tl.float32)
        if RESIDUAL == 1:
            g = tl.load(GATE + b * stride_gb + f2 * stride_gf + c[None, :], mask=vec_mask, other=0.0)
            y = y * g
        x_new = (x + y).to(XO.dtype.element_ty)
        if TOKEN_MOD:
            tsc = tl.load(TSC + b * stride_tscb + t2 * stride_tsct + c[None, :], mask=mask, other=0.0)
            tsh = tl.load(TSH + b * stride_tshb + t2 * stride_tsht + c[None, :], mask=mask, other=0.0)
            x_new = ((1.0 + tsc.to(tl.float32)) * x_new.to(tl.float32) + tsh.to(tl.float32)).to(XO.dtype.element_ty)
        tl.store(XO + b * stride_xob + t2 * stride_xot + c[None, :], x_new, mask=mask)
        x = x_new.to(tl.float32)  # the norm sees x' as stored
    if NORM != 0:
        mean = tl.sum(x, 1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, 1) / D + eps)
        xhat = xc * rstd[:, None]
        sh = tl.load(SHIFT + b * stride_shb + f2 * stride_shf + c[None, :], mask=vec_mask, other=0.0).to(tl.float32)
        sc = tl.load(SCALE + b * stride_scb + f2 * stride_scf + c[None, :], mask=vec_mask, other=0.0).to(tl.float32)
        if NORM == 1:
            h = xhat * (1.0 + sc) + sh
        else:
            h = xhat * sc + sh
        h_ptrs = HO + b * stride_hob + t2 * stride_hot + c[None, :]
        if QUANT:
            h = tl.where(mask, round_to_f32(h, X.dtype.element_ty, EMULATE), 0.0)
            _store_e4m3_rows(h, h_ptrs, HS + b * stride_hsb + t, mask, t < L, EMULATE)
        else:
            tl.store(h_ptrs, h.to(HO.dtype.element_ty), mask=mask)


def adaln_tile(row_width: int, rows: int, device: torch.device) -> tuple[int, int]:
    """(rows a program, warps) of `_adaln_kernel` for rows `row_width` wide (padded): one row and 8 warps from
    2048 columns on a GPU, else `row_tile`'s. Graph-timed on an H100 (bench/results/next74-h100, row_tiles_bench)
    the fused residual + norm passes at Self-Forcing's 1536 (2048 padded) columns ran 29.8 -> 24.9 us and
    27.6 -> 21.7 us with one row instead of row_tile's two, OmniDreams' 2048 48.3 -> 40.9 and 46.5 -> 41.6; the
    third pass (residual_adaln) was even (+-4%). LingBot's 5120 already got one row and 8 warps."""
    if device.type == "cuda" and row_width >= 2048:
        return 1, 8
    return row_tile(row_width, rows, device)


def _launch_rows(
    x: torch.Tensor,
    y: torch.Tensor | None,
    gate: torch.Tensor | None,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    x_out: torch.Tensor | None,
    h_out: torch.Tensor | None,
    fs: int,
    eps: float,
    norm: int,
    residual: int | None = None,
    token_mod: tuple[torch.Tensor, torch.Tensor] | None = None,
    h_scale: torch.Tensor | None = None,
) -> None:
    """Launch over `[B, L, D]` rows. For NORM_AFFINE, shift/scale are the bias/weight vectors `[D]`.
    `residual` defaults to gated when y and gate are given, none without y; `token_mod` is a
    per-token (scale, shift) applied to the residual after it (needs a residual). `h_scale` `[B, L]`:
    h_out is e4m3 and takes h quantized per row, its scales going here."""
    if residual is None:
        residual = RESIDUAL_NONE if y is None else RESIDUAL_GATED
    B, L, D = x.shape
    d_pad = next_pow2(D)
    block_t, num_warps = adaln_tile(d_pad, L, x.device)

    def rows(t: torch.Tensor | None) -> tuple[int, int]:
        return (0, 0) if t is None or t.dim() == 1 else (t.stride(0), t.stride(1))

    # fmt: off
    launch(
        _adaln_kernel, (triton.cdiv(L, block_t), B),
        x, x if y is None else y, x if gate is None else gate, x if shift is None else shift,
        x if scale is None else scale, x if x_out is None else x_out, x if h_out is None else h_out,
        *((x, x) if token_mod is None else token_mod), x if h_scale is None else h_scale,
        *rows(x), *rows(y), *rows(gate), *rows(shift), *rows(scale), *rows(x_out), *rows(h_out),
        *rows(None if token_mod is None else token_mod[0]), *rows(None if token_mod is None else token_mod[1]),
        0 if h_scale is None else h_scale.stride(0),
        L, D, fs, eps,
        RESIDUAL=residual, NORM=norm, D_PAD=d_pad, BLOCK_T=block_t, ONE_FRAME=ONE_FRAME_LOADS and fs % block_t == 0,
        TOKEN_MOD=token_mod is not None, QUANT=h_scale is not None, EMULATE=interpreted(),
        num_warps=num_warps,
    )
    # fmt: on


def _adaln_modulate_op(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    h = new_output(x.shape, out_dtype or x.dtype, x.device)
    _launch_rows(x, None, None, shift, scale, None, h, x.shape[1] // shift.shape[1], eps, NORM_MODULATE)
    return h


def _gated_residual_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    x_new = new_output(x.shape, x.dtype, x.device)
    _launch_rows(x, y, gate, None, None, x_new, None, x.shape[1] // gate.shape[1], 0.0, NORM_NONE)
    return x_new


def _frame_size(x: torch.Tensor, gate: torch.Tensor | None, shift: torch.Tensor) -> int:
    """Tokens per frame of a pass, from its per-frame tensor `[B, F, D]` (the gate, else the shift); for
    NORM_AFFINE without a gate the shift is the bias `[D]`: one "frame"."""
    per_frame = gate if gate is not None else shift
    return x.shape[1] // (per_frame.shape[1] if per_frame.dim() == 3 else 1)


def _residual_and_norm(x, y, gate, shift, scale, eps, out_dtype, norm, residual, token_mod=None):
    """The fused pairs: (x', h) allocated and written by one row pass. For NORM_AFFINE, shift/scale are
    the bias/weight vectors `[D]` (no frame axis); the frame size comes from the per-frame tensors.
    `token_mod`: a per-token (scale, shift) applied to the residual before the norm."""
    x_new = new_output(x.shape, x.dtype, x.device)
    h = new_output(x.shape, out_dtype or x.dtype, x.device)
    _launch_rows(x, y, gate, shift, scale, x_new, h, _frame_size(x, gate, shift), eps, norm, residual, token_mod)
    return x_new, h


def _gated_residual_adaln_op(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _residual_and_norm(x, y, gate, shift, scale, eps, out_dtype, NORM_MODULATE, RESIDUAL_GATED)


def _residual_adaln_op(
    x: torch.Tensor,
    y: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _residual_and_norm(x, y, None, shift, scale, eps, out_dtype, NORM_MODULATE, RESIDUAL_PLAIN)


def _gated_residual_layer_norm_op(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _residual_and_norm(x, y, gate, bias, weight, eps, out_dtype, NORM_AFFINE, RESIDUAL_GATED)


def _gated_residual_modulate_layer_norm_op(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    token_scale: torch.Tensor,
    token_shift: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    mod = (token_scale, token_shift)
    return _residual_and_norm(x, y, gate, bias, weight, eps, out_dtype, NORM_AFFINE, RESIDUAL_GATED, mod)


def _residual_layer_norm_op(
    x: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _residual_and_norm(x, y, None, bias, weight, eps, out_dtype, NORM_AFFINE, RESIDUAL_PLAIN)


def _layer_norm_affine_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    h = new_output(x.shape, out_dtype or x.dtype, x.device)
    _launch_rows(x, None, None, bias, weight, None, h, 1, eps, NORM_AFFINE)
    return h


def _norm_rows_fp8_op(
    x: torch.Tensor,
    y: torch.Tensor | None,
    gate: torch.Tensor | None,
    shift: torch.Tensor,
    scale: torch.Tensor,
    token_scale: torch.Tensor | None,
    token_shift: torch.Tensor | None,
    eps: float,
    norm: int,
    residual: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Any pass of this file with h quantized for an FP8 linear: (x' or an empty tensor where there is
    no residual, h e4m3 `[B, L, D]`, h's row scales `[B, L]` float32). One op for every form: they
    differ only in which optional tensors come and the two flags."""
    B, L, _ = x.shape
    x_new = new_output(x.shape if residual != RESIDUAL_NONE else (0,), x.dtype, x.device)
    h8 = new_output(x.shape, FP8, x.device)
    hs = new_output((B, L), torch.float32, x.device)
    token_mod = None if token_scale is None else (token_scale, token_shift)
    x_out = x_new if residual != RESIDUAL_NONE else None
    fs = _frame_size(x, gate, shift)
    _launch_rows(x, y, gate, shift, scale, x_out, h8, fs, eps, norm, residual, token_mod, hs)
    return x_new, h8, hs


register_op("adaln_modulate", _adaln_modulate_op)
register_op("gated_residual", _gated_residual_op)
register_op("gated_residual_adaln", _gated_residual_adaln_op)
register_op("residual_adaln", _residual_adaln_op)
register_op("layer_norm_affine", _layer_norm_affine_op)
register_op("gated_residual_layer_norm", _gated_residual_layer_norm_op)
register_op("residual_layer_norm", _residual_layer_norm_op)
register_op("gated_residual_modulate_layer_norm", _gated_residual_modulate_layer_norm_op)
register_op("norm_rows_fp8", _norm_rows_fp8_op)


# ----------------------------------------------------------------------------- public API


def _check_x(x: torch.Tensor) -> None:
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES, last_contiguous=True)


def _check_frames(x: torch.Tensor, **mods: torch.Tensor) -> None:
    """Each modulation is `[B, F, D]` float32 on x's device, and F divides L."""
    B, L, D = x.shape
    for name, t in mods.items():
        check_tensor(name, t, ndim=3, dtypes=(torch.float32,), device=x.device, last_contiguous=True)
        check_shape(name, t, (B, None, D))
    frames = {t.shape[1] for t in mods.values()}
    if len(frames) != 1:
        raise InvalidArgumentError(f"{', '.join(mods)}: expected one frame count, found {sorted(frames)}")
    F = frames.pop()
    if F == 0 or L % F:
        raise InvalidArgumentError(f"x: {L} tokens do not split into {F} equal frames")


def _check_y(x: torch.Tensor, y: torch.Tensor) -> None:
    check_tensor("y", y, ndim=3, dtypes=FLOAT_DTYPES, device=x.device, last_contiguous=True)
    check_shape("y", y, tuple(x.shape))


def _check_out_dtype(out_dtype: torch.dtype | None) -> None:
    if out_dtype is not None and out_dtype not in (*FLOAT_DTYPES, FP8):
        raise InvalidArgumentError(
            f"out_dtype: expected bfloat16, float16, float32 or float8_e4m3fn (h as Fp8Rows), found {out_dtype}"
        )


def _fp8_pass(
    x: torch.Tensor,
    y: torch.Tensor | None,
    gate: torch.Tensor | None,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    norm: int,
    residual: int,
    token_mod: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, Fp8Rows]:
    """out_dtype float8_e4m3fn: the pass with h quantized per row, (x', Fp8Rows(h8, scales))."""
    tsc, tsh = (None, None) if token_mod is None else token_mod
    x_new, h8, hs = torch.ops.flashdreams.norm_rows_fp8(x, y, gate, shift, scale, tsc, tsh, float(eps), norm, residual)
    return x_new, Fp8Rows(h8, hs)


def _check_pair(x: torch.Tensor, y: torch.Tensor, out_dtype: torch.dtype | None) -> None:
    """What every residual + norm pair checks besides its per-frame and affine tensors."""
    _check_x(x)
    _check_y(x, y)
    _check_out_dtype(out_dtype)
    require_triton(x.device)


def adaln_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> torch.Tensor | Fp8Rows:
    """LayerNorm(x) * (1 + scale) + shift with per-frame shift/scale `[B, F, D]`; fp32 math."""
    _check_x(x)
    _check_frames(x, shift=shift, scale=scale)
    _check_out_dtype(out_dtype)
    require_triton(x.device)
    if out_dtype == FP8:
        return _fp8_pass(x, None, None, shift, scale, eps, NORM_MODULATE, RESIDUAL_NONE)[1]
    return torch.ops.flashdreams.adaln_modulate(x, shift, scale, float(eps), out_dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + y * gate with per-frame gate `[B, F, D]`; fp32 math, x's dtype."""
    _check_x(x)
    _check_y(x, y)
    _check_frames(x, gate=gate)
    require_triton(x.device)
    return torch.ops.flashdreams.gated_residual(x, y, gate)


def gated_residual_adaln(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | Fp8Rows]:
    """(x', h): x' = x + y * gate (x's dtype), h = adaln_modulate(x', shift, scale) in one pass."""
    _check_pair(x, y, out_dtype)
    _check_frames(x, gate=gate, shift=shift, scale=scale)
    if out_dtype == FP8:
        return _fp8_pass(x, y, gate, shift, scale, eps, NORM_MODULATE, RESIDUAL_GATED)
    return torch.ops.flashdreams.gated_residual_adaln(x, y, gate, shift, scale, float(eps), out_dtype)


def residual_adaln(
    x: torch.Tensor,
    y: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | Fp8Rows]:
    """(x', h): x' = x + y (x's dtype, fp32 math), h = adaln_modulate(x', shift, scale) in one pass."""
    _check_pair(x, y, out_dtype)
    _check_frames(x, shift=shift, scale=scale)
    if out_dtype == FP8:
        return _fp8_pass(x, y, None, shift, scale, eps, NORM_MODULATE, RESIDUAL_PLAIN)
    return torch.ops.flashdreams.residual_adaln(x, y, shift, scale, float(eps), out_dtype)


def _check_affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    D = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        check_tensor(name, t, ndim=1, dtypes=FLOAT_DTYPES, device=x.device, last_contiguous=True)
        check_shape(name, t, (D,))


def layer_norm_affine(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> torch.Tensor | Fp8Rows:
    """LayerNorm(x) * weight + bias over the last dim of x `[B, L, D]`; fp32 math."""
    _check_x(x)
    _check_affine(x, weight, bias)
    _check_out_dtype(out_dtype)
    require_triton(x.device)
    if out_dtype == FP8:
        return _fp8_pass(x, None, None, bias, weight, eps, NORM_AFFINE, RESIDUAL_NONE)[1]
    return torch.ops.flashdreams.layer_norm_affine(x, weight, bias, float(eps), out_dtype)


def gated_residual_layer_norm(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | Fp8Rows]:
    """(x', h): x' = x + y * gate (per-frame gate), h = layer_norm_affine(x', weight, bias) in one pass."""
    _check_pair(x, y, out_dtype)
    _check_frames(x, gate=gate)
    _check_affine(x, weight, bias)
    if out_dtype == FP8:
        return _fp8_pass(x, y, gate, bias, weight, eps, NORM_AFFINE, RESIDUAL_GATED)
    return torch.ops.flashdreams.gated_residual_layer_norm(x, y, gate, weight, bias, float(eps), out_dtype)


def gated_residual_modulate_layer_norm(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    token_scale: torch.Tensor,
    token_shift: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | Fp8Rows]:
    """(x', h): x' = (1 + token_scale) * (x + y * gate) + token_shift, each step rounded to x's dtype
    (per-frame gate, per-token scale/shift `[B, L, D]`: LingBot's camera after its self-attention),
    h = layer_norm_affine(x', weight, bias), in one pass."""
    _check_pair(x, y, out_dtype)
    _check_frames(x, gate=gate)
    _check_affine(x, weight, bias)
    for name, t in (("token_scale", token_scale), ("token_shift", token_shift)):
        check_tensor(name, t, ndim=3, dtypes=FLOAT_DTYPES, device=x.device, last_contiguous=True)
        check_shape(name, t, tuple(x.shape))
    if out_dtype == FP8:
        return _fp8_pass(x, y, gate, bias, weight, eps, NORM_AFFINE, RESIDUAL_GATED, (token_scale, token_shift))
    return torch.ops.flashdreams.gated_residual_modulate_layer_norm(
        x, y, gate, token_scale, token_shift, weight, bias, float(eps), out_dtype
    )


def residual_layer_norm(
    x: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | Fp8Rows]:
    """(x', h): x' = x + y (x's dtype, fp32 math), h = layer_norm_affine(x', weight, bias) in one pass."""
    _check_pair(x, y, out_dtype)
    _check_affine(x, weight, bias)
    if out_dtype == FP8:
        return _fp8_pass(x, y, None, bias, weight, eps, NORM_AFFINE, RESIDUAL_PLAIN)
    return torch.ops.flashdreams.residual_layer_norm(x, y, weight, bias, float(eps), out_dtype)


# ----------------------------------------------------------------------------- reference twins


def _per_token(m: torch.Tensor, L: int) -> torch.Tensor:
    """[B, F, D] per-frame values -> [B, L, D] per-token (token t in frame t // (L / F))."""
    return m.float().repeat_interleave(L // m.shape[1], dim=1)


def _h_out(h: torch.Tensor, x_dtype: torch.dtype, out_dtype: torch.dtype | None) -> torch.Tensor | Fp8Rows:
    """h (float32) as the kernels hand it out: in out_dtype (default x's), or for float8_e4m3fn
    rounded to x's dtype and quantized per row."""
    if out_dtype == FP8:
        return Fp8Rows(*quantize_rows_fp8_reference(h.to(x_dtype)))
    return h.to(out_dtype or x_dtype)


def _layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), eps=eps)


def adaln_modulate_reference(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> torch.Tensor | Fp8Rows:
    """What `adaln_modulate` computes."""
    L = x.shape[1]
    h = _layer_norm(x, eps) * (1 + _per_token(scale, L)) + _per_token(shift, L)
    return _h_out(h, x.dtype, out_dtype)


def gated_residual_reference(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """What `gated_residual` computes."""
    return (x.float() + y.float() * _per_token(gate, x.shape[1])).to(x.dtype)


def residual_reference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + y in float32, rounded once to x's dtype: the ungated residual of the fused pairs."""
    return (x.float() + y.float()).to(x.dtype)


def gated_residual_adaln_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | Fp8Rows]:
    """What `gated_residual_adaln` computes: the two twins above, composed."""
    x_new = gated_residual_reference(x, y, gate)
    return x_new, adaln_modulate_reference(x_new, shift, scale, eps, out_dtype)


def residual_adaln_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | Fp8Rows]:
    """What `residual_adaln` computes."""
    x_new = residual_reference(x, y)
    return x_new, adaln_modulate_reference(x_new, shift, scale, eps, out_dtype)


def layer_norm_affine_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> torch.Tensor | Fp8Rows:
    """What `layer_norm_affine` computes."""
    h = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
    return _h_out(h, x.dtype, out_dtype)


def gated_residual_layer_norm_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | Fp8Rows]:
    """What `gated_residual_layer_norm` computes."""
    x_new = gated_residual_reference(x, y, gate)
    return x_new, layer_norm_affine_reference(x_new, weight, bias, eps, out_dtype)


def gated_residual_modulate_layer_norm_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    token_scale: torch.Tensor,
    token_shift: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | Fp8Rows]:
    """What `gated_residual_modulate_layer_norm` computes: the gated residual, the per-token
    modulation in float32 (rounded to x's dtype), the affine norm."""
    x_new = gated_residual_reference(x, y, gate)
    x_new = ((1 + token_scale.float()) * x_new.float() + token_shift.float()).to(x.dtype)
    return x_new, layer_norm_affine_reference(x_new, weight, bias, eps, out_dtype)


def residual_layer_norm_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | Fp8Rows]:
    """What `residual_layer_norm` computes."""
    x_new = residual_reference(x, y)
    return x_new, layer_norm_affine_reference(x_new, weight, bias, eps, out_dtype)
