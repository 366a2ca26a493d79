"""RoPE fused with the KV-ring write: rotate q and k, write rotated k and raw v into their ring slots.

A block's tokens are frame-major (token t = f * fs + i belongs to block-local frame f);
frame f goes to ring slot `slots[f]`, i.e. cache row `slots[f] * fs + i`. The slots are
a device tensor, so one graph serves every block. Rotation is per channel pair
(x[2p], x[2p+1]) with per-token angle tables cos/sin `[L, d/2]` in fp32:
x0' = x0 cos - x1 sin, x1' = x0 sin + x1 cos, in fp32, rounded once to the output dtype.

One pass: q, k, v are read once; q_rot, the k rows and the v rows are written once.
Bytes moved = 6 * B * L * N * d * elem + 2 * L * d/2 * 4 (the angle tables). At
Self-Forcing's block (B 1, L 4680, N 12, d 128, bf16) that is 86 MB + 2.4 MB: 29 us at
the H100's 3.0 TB/s copy rate; the target is >= 70% of it (<= 42 us). Unfused, torch
reads and writes each tensor 3-5 times (float casts, two rotations, the index copy).

The same kernel, with `HAS_NORM`, also applies the Wan QK RMSNorm (qk_norm_rope.py).
"""

from __future__ import annotations

import torch

from flashdreams.errors import InvalidArgumentError

from ._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
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


@triton.jit
def _rotate(x, cos, sin, BLOCK_T: tl.constexpr, N_PAD: tl.constexpr, D_PAD: tl.constexpr):
    """Rotate channel pairs (2p, 2p+1) of a [T, N, D_PAD] fp32 tile by angles [T, 1, D_PAD/2]."""
    x0, x1 = tl.split(tl.reshape(x, (BLOCK_T, N_PAD, D_PAD // 2, 2)))
    y0 = x0 * cos - x1 * sin
    y1 = x0 * sin + x1 * cos
    return tl.reshape(tl.join(y0, y1), (BLOCK_T, N_PAD, D_PAD))


@triton.jit
def round_to(y, CODE: tl.constexpr):
    """Round fp32 y to the dtype of CODE (0 fp32, 1 bf16, 2 fp16) and back to fp32."""
    if CODE == 1:
        y = y.to(tl.bfloat16).to(tl.float32)
    elif CODE == 2:
        y = y.to(tl.float16).to(tl.float32)
    return y


@triton.jit
def _rms_scale(x, w, n_valid, eps, X_DTYPE: tl.constexpr, ROUND: tl.constexpr):
    """Wan's RMSNorm of whole [T, N, D] token rows: (x * rsqrt(mean x^2 + eps)) -> x's dtype, * w."""
    ms = tl.sum(tl.sum(x * x, 2), 1) / n_valid
    return round_to((x * tl.rsqrt(ms + eps)[:, None, None]).to(X_DTYPE).to(tl.float32) * w[None, :, :], ROUND)


@triton.jit
def _rope_write_kernel(
    Q, K, V, COS, SIN, KC, VC, SLOTS, QO, WQ, WK,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_cos, stride_sin,
    stride_kcb, stride_kct, stride_kch,
    stride_vcb, stride_vct, stride_vch,
    stride_ob, stride_ot, stride_oh,
    L, S, H, FS, eps,
    HEAD_DIM: tl.constexpr, N_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_NORM: tl.constexpr, ROUND_Q: tl.constexpr, ROUND_K: tl.constexpr,
):  # fmt: skip
    """BLOCK_T whole tokens (all heads) of one batch row: [norm], rotate, write q_rot / k / v."""
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    hh = tl.arange(0, N_PAD)
    c = tl.arange(0, D_PAD)
    t_ok = t < L
    hd_ok = (hh < H)[:, None] & (c < HEAD_DIM)[None, :]
    mask = t_ok[:, None, None] & hd_ok[None, :, :]

    # Destination cache row of each token; slots outside the ring are never written.
    f = t // FS
    slot = tl.load(SLOTS + f, mask=t_ok, other=-1).to(tl.int64)
    row = slot * FS + (t - f * FS)
    w_mask = mask & ((row >= 0) & (row < S))[:, None, None]

    t3 = t[:, None, None]
    h3 = hh[None, :, None]
    c3 = c[None, None, :]
    q = tl.load(Q + b * stride_qb + t3 * stride_qt + h3 * stride_qh + c3, mask=mask, other=0.0)
    k = tl.load(K + b * stride_kb + t3 * stride_kt + h3 * stride_kh + c3, mask=mask, other=0.0)
    v = tl.load(V + b * stride_vb + t3 * stride_vt + h3 * stride_vh + c3, mask=mask, other=0.0)
    tl.store(VC + b * stride_vcb + row[:, None, None] * stride_vct + h3 * stride_vch + c3, v, mask=w_mask)

    p = tl.arange(0, D_PAD // 2)
    a_mask = t_ok[:, None] & (p < HEAD_DIM // 2)[None, :]
    cos = tl.load(COS + t[:, None] * stride_cos + p[None, :], mask=a_mask, other=1.0)[:, None, :]
    sin = tl.load(SIN + t[:, None] * stride_sin + p[None, :], mask=a_mask, other=0.0)[:, None, :]

    qf = q.to(tl.float32)
    kf = k.to(tl.float32)
    if HAS_NORM:
        w_off = hh[:, None] * HEAD_DIM + c[None, :]
        wq = tl.load(WQ + w_off, mask=hd_ok, other=0.0).to(tl.float32)
        wk = tl.load(WK + w_off, mask=hd_ok, other=0.0).to(tl.float32)
        n_valid = H * HEAD_DIM
        qf = _rms_scale(qf, wq, n_valid, eps, Q.dtype.element_ty, ROUND_Q)
        kf = _rms_scale(kf, wk, n_valid, eps, K.dtype.element_ty, ROUND_K)
    qr = _rotate(qf, cos, sin, BLOCK_T, N_PAD, D_PAD)
    kr = _rotate(kf, cos, sin, BLOCK_T, N_PAD, D_PAD)
    tl.store(QO + b * stride_ob + t3 * stride_ot + h3 * stride_oh + c3, qr.to(QO.dtype.element_ty), mask=mask)
    tl.store(
        KC + b * stride_kcb + row[:, None, None] * stride_kct + h3 * stride_kch + c3,
        kr.to(KC.dtype.element_ty),
        mask=w_mask,
    )


def launch_rope_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    fs: int,
    norm: tuple[torch.Tensor, torch.Tensor, float, int, int] | None = None,
) -> torch.Tensor:
    """Run the kernel on `[B, L, N, d]` views; `norm` = (w_q, w_k, eps, round_q, round_k) or None."""
    B, L, H, d = q.shape
    S = k_cache.shape[1]
    out = new_output((B, L, H, d), q.dtype, q.device)
    n_pad, d_pad = next_pow2(H), next_pow2(d, 2)
    block_t, num_warps = row_tile(n_pad * d_pad, L, q.device)
    wq, wk, eps, round_q, round_k = norm if norm is not None else (q, k, 0.0, 0, 0)
    # fmt: off
    launch(
        _rope_write_kernel, (triton.cdiv(L, block_t), B),
        q, k, v, cos, sin, k_cache, v_cache, slots, out, wq, wk,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        L, S, H, fs, eps,
        HEAD_DIM=d, N_PAD=n_pad, D_PAD=d_pad, BLOCK_T=block_t,
        HAS_NORM=norm is not None, ROUND_Q=round_q, ROUND_K=round_k, num_warps=num_warps,
    )
    # fmt: on
    return out


def _rope_cache_write_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    frame_seq_length: int,
) -> torch.Tensor:
    return launch_rope_write(q, k, v, cos, sin, k_cache, v_cache, slots, frame_seq_length)


register_op("rope_cache_write", _rope_cache_write_op, mutates_args=("k_cache", "v_cache"))


# ----------------------------------------------------------------------------- argument checks


def check_cache_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_dtype: torch.dtype,
    v_dtype: torch.dtype,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slots: torch.Tensor,
    frame_seq_length: int,
    L: int,
    heads: int,
    head_dim: int,
) -> None:
    """Checks shared by the RoPE cache writers (q gives batch and device)."""
    B, dev = q.shape[0], q.device
    if head_dim % 2:
        raise InvalidArgumentError(f"k_cache: head_dim must be even for RoPE, found {head_dim}")
    if head_dim > 256:
        raise InvalidArgumentError(f"k_cache: head_dim must be <= 256, found {head_dim}")
    for name, t, dt in (("k_cache", k_cache, k_dtype), ("v_cache", v_cache, v_dtype)):
        check_tensor(name, t, ndim=4, dtypes=(dt,), device=dev, last_contiguous=True)
        check_shape(name, t, (B, None, heads, head_dim))
    if v_cache.shape[1] != k_cache.shape[1]:
        raise InvalidArgumentError(f"v_cache: expected {k_cache.shape[1]} rows like k_cache, found {v_cache.shape[1]}")
    if not isinstance(frame_seq_length, int) or frame_seq_length <= 0:
        raise InvalidArgumentError(f"frame_seq_length: expected a positive int, found {frame_seq_length!r}")
    fs = frame_seq_length
    if k_cache.shape[1] % fs:
        raise InvalidArgumentError(f"k_cache: {k_cache.shape[1]} rows is not a whole number of {fs}-token frames")
    if L % fs:
        raise InvalidArgumentError(f"q: {L} tokens is not a whole number of {fs}-token frames")
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, ndim=2, dtypes=(torch.float32,), device=dev, last_contiguous=True)
        check_shape(name, t, (L, head_dim // 2))
    check_tensor("slots", slots, ndim=1, dtypes=INDEX_DTYPES, device=dev)
    check_shape("slots", slots, (L // fs,))


# ----------------------------------------------------------------------------- public API


def rope_cache_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    frame_seq_length: int,
) -> torch.Tensor:
    """Rotate q and k `[B, L, N, d]`; write rotated k and raw v into ring slots; return rotated q.

    Token t = f * fs + i goes to cache row `slots[f] * fs + i` of k_cache / v_cache
    `[B, S, N, d]` (mutated in place); slots must lie in [0, S / fs). Returns a new
    `[B, L, N, d]` tensor in q's dtype.
    """
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES, last_contiguous=True)
    B, L, H, d = q.shape
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, dtypes=FLOAT_DTYPES, device=q.device, last_contiguous=True)
        check_shape(name, t, (B, L, H, d))
    check_cache_args(q, k_cache, v_cache, k.dtype, v.dtype, cos, sin, slots, frame_seq_length, L, H, d)
    require_triton(q.device)
    return torch.ops.flashdreams.rope_cache_write(q, k, v, cos, sin, k_cache, v_cache, slots, frame_seq_length)


# ----------------------------------------------------------------------------- reference twins


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (2p, 2p+1) of x `[B, L, N, d]` by per-token angles `[L, d/2]`, in fp32; x's dtype."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).to(x.dtype)


def cache_rows(slots: torch.Tensor, frame_seq_length: int) -> torch.Tensor:
    """Cache row of each block token: `slots[f] * fs + i` for token f * fs + i; shape [nf * fs]."""
    offs = torch.arange(frame_seq_length, device=slots.device)
    return (slots.long()[:, None] * frame_seq_length + offs[None, :]).reshape(-1)


def rope_cache_write_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    frame_seq_length: int,
) -> torch.Tensor:
    """What `rope_cache_write` computes (and writes), in plain torch."""
    rows = cache_rows(slots, frame_seq_length)
    k_cache.index_copy_(1, rows, apply_rope_reference(k, cos, sin).to(k_cache.dtype))
    v_cache.index_copy_(1, rows, v.to(v_cache.dtype))
    return apply_rope_reference(q, cos, sin)
