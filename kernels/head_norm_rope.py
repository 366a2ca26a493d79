"""Cosmos' self-attention prologue in one pass: per-head q/k RMSNorm, rotate-half RoPE, KV-ring write.

The Cosmos DiT (OmniDreams' network) normalises q and k over each head's d channels (weight
[d], shared by the heads), then turns them with a rotate-half RoPE: channel i and i + d/2
form a pair, x_i' = x_i cos - x_{i+d/2} sin and x_{i+d/2}' = x_{i+d/2} cos + x_i sin, with one
angle per pair. Unfused, torch runs about a dozen passes over q and k (float casts, square,
mean, scale, weight, the two halves, a concatenation, two products and a sum, the index copy
into the ring); at OmniDreams' chunk (7040 tokens x 2048 channels) that was ~1.3 ms of every
layer's forward. Here q, k and v are read once and q_rot, the k rows and the v rows written
once: 6 * B * L * N * d elements (173 MB in bf16 at that chunk, ~55 us at 3.2 TB/s).

Rounding follows the torch path exactly (models/cosmos_dit.py: `HeadNorm`, `rope_rotate_half`):
norm in fp32, rounded to x's dtype, times the weight, rounded to the promoted dtype; rotation in
fp32, rounded to that dtype, then to the cache's.

Ring rows: token t = f * fs + i goes to row `slots[f] * fs + i` (rope_cache_write.py's rule).
"""

from __future__ import annotations

import torch

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
from .qk_norm_rope import _check_norm_weight, _round_code, rms_norm_reference
from .rope_cache_write import cache_rows, check_cache_args, round_to


@triton.jit
def _norm_rotate(x1, x2, w1, w2, cos, sin, head_dim, eps, X_DTYPE: tl.constexpr, ROUND: tl.constexpr):
    """Per-head RMSNorm of the halves [T, N, d/2] (fp32), weight halves [1, 1, d/2], then rotate-half."""
    ms = (tl.sum(x1 * x1, 2) + tl.sum(x2 * x2, 2)) / head_dim  # [T, N]
    r = tl.rsqrt(ms + eps)[:, :, None]
    y1 = round_to((x1 * r).to(X_DTYPE).to(tl.float32) * w1, ROUND)
    y2 = round_to((x2 * r).to(X_DTYPE).to(tl.float32) * w2, ROUND)
    return round_to(y1 * cos - y2 * sin, ROUND), round_to(y2 * cos + y1 * sin, ROUND)


@triton.jit
def _head_norm_rope_kernel(
    Q, K, V, WQ, WK, COS, SIN, KC, VC, SLOTS, QO,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_cos, stride_sin,
    stride_kcb, stride_kct, stride_kch,
    stride_vcb, stride_vct, stride_vch,
    stride_ob, stride_ot, stride_oh,
    L, S, H, FS, eps,
    HEAD_DIM: tl.constexpr, N_PAD: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    ROUND_Q: tl.constexpr, ROUND_K: tl.constexpr,
):  # fmt: skip
    """BLOCK_T whole tokens (all heads) of one batch row, as two half-head tiles [T, N, d/2]."""
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    half = HEAD_DIM // 2
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    hh = tl.arange(0, N_PAD)
    c = tl.arange(0, HALF_PAD)
    t_ok = t < L
    mask = t_ok[:, None, None] & ((hh < H)[:, None] & (c < half)[None, :])[None, :, :]

    f = t // FS
    slot = tl.load(SLOTS + f, mask=t_ok, other=-1).to(tl.int64)
    row = slot * FS + (t - f * FS)
    w_mask = mask & ((row >= 0) & (row < S))[:, None, None]

    t3, h3, c3 = t[:, None, None], hh[None, :, None], c[None, None, :]
    r3 = row[:, None, None]
    v_src = V + b * stride_vb + t3 * stride_vt + h3 * stride_vh + c3
    v_dst = VC + b * stride_vcb + r3 * stride_vct + h3 * stride_vch + c3
    tl.store(v_dst, tl.load(v_src, mask=mask, other=0.0).to(VC.dtype.element_ty), mask=w_mask)
    tl.store(v_dst + half, tl.load(v_src + half, mask=mask, other=0.0).to(VC.dtype.element_ty), mask=w_mask)

    a_mask = t_ok[:, None] & (c < half)[None, :]
    cos = tl.load(COS + t[:, None] * stride_cos + c[None, :], mask=a_mask, other=1.0)[:, None, :]
    sin = tl.load(SIN + t[:, None] * stride_sin + c[None, :], mask=a_mask, other=0.0)[:, None, :]
    w_ok = c < half
    wq1 = tl.load(WQ + c, mask=w_ok, other=0.0).to(tl.float32)[None, None, :]
    wq2 = tl.load(WQ + half + c, mask=w_ok, other=0.0).to(tl.float32)[None, None, :]
    wk1 = tl.load(WK + c, mask=w_ok, other=0.0).to(tl.float32)[None, None, :]
    wk2 = tl.load(WK + half + c, mask=w_ok, other=0.0).to(tl.float32)[None, None, :]

    q_src = Q + b * stride_qb + t3 * stride_qt + h3 * stride_qh + c3
    q1 = tl.load(q_src, mask=mask, other=0.0).to(tl.float32)
    q2 = tl.load(q_src + half, mask=mask, other=0.0).to(tl.float32)
    y1, y2 = _norm_rotate(q1, q2, wq1, wq2, cos, sin, HEAD_DIM, eps, Q.dtype.element_ty, ROUND_Q)
    q_dst = QO + b * stride_ob + t3 * stride_ot + h3 * stride_oh + c3
    tl.store(q_dst, y1.to(QO.dtype.element_ty), mask=mask)
    tl.store(q_dst + half, y2.to(QO.dtype.element_ty), mask=mask)

    k_src = K + b * stride_kb + t3 * stride_kt + h3 * stride_kh + c3
    k1 = tl.load(k_src, mask=mask, other=0.0).to(tl.float32)
    k2 = tl.load(k_src + half, mask=mask, other=0.0).to(tl.float32)
    y1, y2 = _norm_rotate(k1, k2, wk1, wk2, cos, sin, HEAD_DIM, eps, K.dtype.element_ty, ROUND_K)
    k_dst = KC + b * stride_kcb + r3 * stride_kct + h3 * stride_kch + c3
    tl.store(k_dst, y1.to(KC.dtype.element_ty), mask=w_mask)
    tl.store(k_dst + half, y2.to(KC.dtype.element_ty), mask=w_mask)


def _head_norm_rope_cache_write_op(
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
    B, L, H, d = q.shape
    out = new_output((B, L, H, d), torch.promote_types(q.dtype, norm_q_weight.dtype), q.device)
    n_pad, half_pad = next_pow2(H), next_pow2(d // 2)
    block_t, num_warps = row_tile(n_pad * half_pad * 2, L, q.device)
    # fmt: off
    launch(
        _head_norm_rope_kernel, (triton.cdiv(L, block_t), B),
        q, k, v, norm_q_weight, norm_k_weight, cos, sin, k_cache, v_cache, slots, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        L, k_cache.shape[1], H, frame_seq_length, eps,
        HEAD_DIM=d, N_PAD=n_pad, HALF_PAD=half_pad, BLOCK_T=block_t,
        ROUND_Q=_round_code(q.dtype, norm_q_weight.dtype), ROUND_K=_round_code(k.dtype, norm_k_weight.dtype),
        num_warps=num_warps,
    )
    # fmt: on
    return out


register_op("head_norm_rope_cache_write", _head_norm_rope_cache_write_op, mutates_args=("k_cache", "v_cache"))


def head_norm_rope_cache_write(
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
    """Per-head RMSNorm of q and k `[B, L, N, d]` (weights [d]), rotate-half RoPE by per-token angles
    cos/sin `[L, d/2]` (fp32, one per channel pair), rotated k and raw v written into ring rows
    `slots[f] * fs + i` of k_cache / v_cache `[B, S, N, d]` (in place). Returns rotated q in the
    dtype of norm(q) * weight."""
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES, last_contiguous=True)
    B, L, H, d = q.shape
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, dtypes=FLOAT_DTYPES, device=q.device, last_contiguous=True)
        check_shape(name, t, (B, L, H, d))
    _check_norm_weight("norm_q_weight", norm_q_weight, d, q.device)
    _check_norm_weight("norm_k_weight", norm_k_weight, d, q.device)
    k_dtype = torch.promote_types(k.dtype, norm_k_weight.dtype)
    check_cache_args(q, k_cache, v_cache, k_dtype, v.dtype, cos, sin, slots, frame_seq_length, L, H, d)
    require_triton(q.device)
    return torch.ops.flashdreams.head_norm_rope_cache_write(
        q, k, v, norm_q_weight, norm_k_weight, float(eps), cos, sin, k_cache, v_cache, slots, frame_seq_length
    )


# ----------------------------------------------------------------------------- reference twin


def rotate_half_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[B, L, N, d]` turned pairwise (i, i + d/2) by angles `[L, d/2]`, in fp32; x's dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def head_norm_rope_cache_write_reference(
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
    """What `head_norm_rope_cache_write` computes (and writes), in plain torch: per head, the same RMSNorm
    as Wan's over a token (`rms_norm_reference` on the last dim, d)."""
    rows = cache_rows(slots, frame_seq_length)
    kn = rms_norm_reference(k, norm_k_weight, eps)
    k_cache.index_copy_(1, rows, rotate_half_reference(kn, cos, sin).to(k_cache.dtype))
    v_cache.index_copy_(1, rows, v.to(v_cache.dtype))
    return rotate_half_reference(rms_norm_reference(q, norm_q_weight, eps), cos, sin)
