"""Wan's QK RMSNorm fused with RoPE and the KV-ring write, and a standalone RMSNorm.

Wan normalises q and k over all D = N * d channels of a token (not per head), in fp32,
rounds to the input dtype and multiplies by the weight (torch's type promotion decides
the product's dtype, as in `WanRMSNorm`). Fused with rope_cache_write.py's kernel the
whole self-attention prologue is one pass: the raw projections q, k, v `[B, L, D]` are
read once; q_rot, the cache rows of k and v are written once. Bytes moved are the same
as rope_cache_write's (86 MB at Self-Forcing's block in bf16, 29 us at 3.0 TB/s); the
unfused chain (norm, cast, multiply, rotate, copy) moves about four times that.

`rms_norm` serves the cross-attention's q/k norms: one read and one write per element.
"""

from __future__ import annotations

import torch

from flashdreams.errors import InvalidArgumentError

from ._common import (
    FLOAT_DTYPES,
    check_shape,
    check_tensor,
    launch,
    new_output,
    next_pow2,
    register_op,
    require_triton,
    row_tile,
    tl,
    triton,
)
from .rope_cache_write import apply_rope_reference, cache_rows, check_cache_args, launch_rope_write

_ROUND_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _round_code(x_dtype: torch.dtype, w_dtype: torch.dtype) -> int:
    """How the kernel rounds norm(x) * w: to the dtype torch would promote the product to."""
    return _ROUND_CODE[torch.promote_types(x_dtype, w_dtype)]


@triton.jit
def _rms_norm_kernel(X, W, Y, stride_x, stride_y, R, D, eps, D_PAD: tl.constexpr, BLOCK_R: tl.constexpr):
    """BLOCK_R rows: y = (x * rsqrt(mean x^2 + eps)) in fp32 -> x's dtype, times w -> y's dtype."""
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    c = tl.arange(0, D_PAD)
    mask = (r < R)[:, None] & (c < D)[None, :]
    x = tl.load(X + r[:, None] * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + c, mask=c < D, other=0.0).to(tl.float32)
    ms = tl.sum(x * x, 1) / D
    y = (x * tl.rsqrt(ms + eps)[:, None]).to(X.dtype.element_ty).to(tl.float32) * w[None, :]
    tl.store(Y + r[:, None] * stride_y + c[None, :], y.to(Y.dtype.element_ty), mask=mask)


def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    D = x.shape[-1]
    x2 = x.reshape(-1, D)
    y = new_output(x2.shape, torch.promote_types(x.dtype, weight.dtype), x.device)
    R = x2.shape[0]
    d_pad = next_pow2(D)
    block_r, num_warps = row_tile(d_pad, R, x.device)
    launch(
        _rms_norm_kernel,
        (triton.cdiv(R, block_r),),
        x2,
        weight,
        y,
        x2.stride(0),
        y.stride(0),
        R,
        D,
        eps,
        D_PAD=d_pad,
        BLOCK_R=block_r,
        num_warps=num_warps,
    )
    return y.view(x.shape)


def _qk_norm_rope_cache_write_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    norm_q_weight: torch.Tensor,
    norm_k_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    frame_seq_length: int,
) -> torch.Tensor:
    B, L, D = q.shape
    H, d = k_cache.shape[2], k_cache.shape[3]
    q4, k4, v4 = (t.view(B, L, H, d) for t in (q, k, v))
    norm = (
        norm_q_weight,
        norm_k_weight,
        eps,
        _round_code(q.dtype, norm_q_weight.dtype),
        _round_code(k.dtype, norm_k_weight.dtype),
    )
    return launch_rope_write(q4, k4, v4, cos, sin, k_cache, v_cache, slots, frame_seq_length, norm=norm)


register_op("rms_norm", _rms_norm_op)
register_op("qk_norm_rope_cache_write", _qk_norm_rope_cache_write_op, mutates_args=("k_cache", "v_cache"))


# ----------------------------------------------------------------------------- public API


def _check_norm_weight(name: str, w: torch.Tensor, D: int, device: torch.device) -> None:
    check_tensor(name, w, ndim=1, dtypes=FLOAT_DTYPES, device=device)
    check_shape(name, w, (D,))
    if w.stride(0) != 1 and D > 1:
        raise InvalidArgumentError(f"{name}: expected a contiguous vector, found stride {w.stride(0)}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Wan's RMSNorm over the last dim: (x * rsqrt(mean(x^2) + eps)) in fp32, cast to x's dtype, * weight.

    The result has torch's promoted dtype of x and weight, like `WanRMSNorm`.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, last_contiguous=True)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise InvalidArgumentError(f"x: expected a non-empty last dim, found shape {list(x.shape)}")
    _check_norm_weight("weight", weight, x.shape[-1], x.device)
    require_triton(x.device)
    return torch.ops.flashdreams.rms_norm(x, weight, float(eps))


def qk_norm_rope_cache_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    norm_q_weight: torch.Tensor,
    norm_k_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    frame_seq_length: int,
) -> torch.Tensor:
    """RMSNorm q and k `[B, L, D]` over all D channels, then `rope_cache_write` on their heads.

    Heads N and head_dim d come from the caches `[B, S, N, d]` (D = N * d). Writes rotated
    normalised k and raw v into ring slots; returns rotated normalised q `[B, L, N, d]`
    in q's dtype.
    """
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    B, L, D = q.shape
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=3, dtypes=FLOAT_DTYPES, device=q.device, last_contiguous=True)
        check_shape(name, t, (B, L, D))
    check_tensor("k_cache", k_cache, ndim=4)
    H, d = k_cache.shape[2], k_cache.shape[3]
    if H * d != D:
        raise InvalidArgumentError(f"k_cache: heads x head_dim = {H} x {d} = {H * d} does not match D = {D} of q")
    _check_norm_weight("norm_q_weight", norm_q_weight, D, q.device)
    _check_norm_weight("norm_k_weight", norm_k_weight, D, q.device)
    check_cache_args(q, k_cache, v_cache, k.dtype, v.dtype, cos, sin, slots, frame_seq_length, L, H, d)
    require_triton(q.device)
    return torch.ops.flashdreams.qk_norm_rope_cache_write(
        q, k, v, norm_q_weight, norm_k_weight, float(eps), cos, sin, k_cache, v_cache, slots, frame_seq_length
    )


# ----------------------------------------------------------------------------- reference twins


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """What `rms_norm` computes: WanRMSNorm's forward."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype) * weight


def qk_norm_rope_cache_write_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    norm_q_weight: torch.Tensor,
    norm_k_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    frame_seq_length: int,
) -> torch.Tensor:
    """What `qk_norm_rope_cache_write` computes (and writes), in plain torch."""
    B, L, _ = q.shape
    H, d = k_cache.shape[2], k_cache.shape[3]
    qn = rms_norm_reference(q, norm_q_weight, eps).view(B, L, H, d)
    kn = rms_norm_reference(k, norm_k_weight, eps).view(B, L, H, d)
    rows = cache_rows(slots, frame_seq_length)
    k_cache.index_copy_(1, rows, apply_rope_reference(kn, cos, sin).to(k_cache.dtype))
    v_cache.index_copy_(1, rows, v.view(B, L, H, d).to(v_cache.dtype))
    return apply_rope_reference(qn, cos, sin).to(q.dtype)
