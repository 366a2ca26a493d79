"""Matrix-Game's action-module attention in two kernels: q/k head norm + RoPE (+ ring write), short attention.

The action module (models/action_module.py) normalises each 64-wide head of q and k by its RMS
(float32, eps 1e-6, no weight), turns the first 2n channels as interleaved pairs (2i, 2i+1) by
the latent frame's angle, writes k and v into frame rings, and attends every query to the few
cached frames (<= ~16). In torch that is dozens of tiny launches per call (casts, pow/mean/rsqrt,
slices, stack, cat, index copies of transposes, float32 batched matmuls, mask, softmax), ~8300
of them per Matrix-Game block on an H200. Here:

* `action_norm_rope` / `action_norm_rope_cache_write`: one pass over x (q) or over k and v that
  writes the rotated heads (or the ring slots `slots[f]` of the caches, in place);
* `short_ring_attention`: softmax(q k^T / sqrt(hd)) v for many small groups of queries over a
  short ring, reading q and the caches through their strides, scores and softmax in float32
  registers, the output written token-major (the layout the following projection reads), and
  optionally the q norm + RoPE applied on load so that q is never written.

Layouts (those of the module): either per token position, q [B, T, S, A, hd] against caches
[B, S, L, A, hd] (the mouse branch: each position s has its own ring), or shared, q [B, N, A, hd]
against caches [B, L, A, hd] (the keyboard branch: all N tokens read one ring). Latent frame of
dim-1 index m: m // (size of dim 1 / T), T = rows of the cos/sin tables.

Rounding follows the torch path: the norm rounds to x's dtype, the rotation is float32 rounded
to x's dtype (then to the cache's); attention reads k/v rounded to q's dtype, then float32.
The valid slot count is a device tensor read inside the kernel (CUDA-graph capturable).
"""

from __future__ import annotations

import torch

from flashdreams.errors import InvalidArgumentError

from ._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_shape,
    check_tensor,
    interpreted,
    launch,
    new_output,
    next_pow2,
    register_op,
    require_triton,
    tl,
    triton,
)

EPS = 1e-6
# Elements of one program's fp32 tile on a GPU (q, the accumulator: 32 registers each per thread at
# 4 warps); the interpreter runs fewer, larger programs faster.
_TILE_CUDA = 4096
_TILE_INTERPRETED = 16384
# The norm + RoPE + ring-write kernel: 32 rows of 64 channels per program measured fastest on an H200
# (7.9 us against 9.6 us at 64 rows for Matrix-Game's mouse k/v, 3 x 880 tokens x 16 heads).
_ROW_TILE_CUDA = 2048
_BLOCK_M_CUDA = 64  # queries per program along a group's query axis (the keyboard's 2640 tokens)
_NUM_WARPS = 4


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _angles(COS, SIN, f, c, stride_cos, stride_sin, n_rot, ok):
    """Per-channel factors: y_c = x_c * cs + x_(c xor 1) * sn turns pairs (2i, 2i+1) by angle i of frame f;
    channels past 2 n_rot pass through (cs 1, sn 0)."""
    rot = ok & (c < 2 * n_rot)
    cs = tl.load(COS + f * stride_cos + c // 2, mask=rot, other=1.0)
    sn = tl.load(SIN + f * stride_sin + c // 2, mask=rot, other=0.0)
    return cs, tl.where(c % 2 == 0, -sn, sn)


@triton.jit
def _norm_rope(x, xp, cs, sn, head_dim, eps, X_DTYPE: tl.constexpr, AXIS: tl.constexpr):
    """RMS norm along AXIS, the channels (x and its pair partner xp, float32), rounded to X_DTYPE, then the
    rotation in float32, rounded to X_DTYPE: `apply_action_rope(head_rms(x))`."""
    r = tl.rsqrt(tl.sum(x * x, axis=AXIS, keep_dims=True) / head_dim + eps)
    xn = (x * r).to(X_DTYPE).to(tl.float32)
    xpn = (xp * r).to(X_DTYPE).to(tl.float32)
    return (xn * cs + xpn * sn).to(X_DTYPE)


@triton.jit
def _norm_rope_kernel(
    X, V, COS, SIN, SLOTS, DST, VDST,
    sxb, sxm, sxg, sxa,
    svb, svm, svg, sva,
    stride_cos, stride_sin,
    sdb, sdm, sdg, sda,
    svdb, svdm, svdg, svda,
    R, M, G, A, QPF, N_ROT, L, head_dim, eps,
    HD_PAD: tl.constexpr, BLOCK_R: tl.constexpr, HAS_SLOTS: tl.constexpr, HAS_V: tl.constexpr,
):  # fmt: skip
    """BLOCK_R head rows (b, m, g, a) of x: normalised, rotated, stored at dim-1 index m (or ring slot
    slots[m]) of DST; with HAS_V the same rows of V copied to VDST."""
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    c = tl.arange(0, HD_PAD)
    r_ok = r < R
    a = r % A
    g = (r // A) % G
    m = (r // (A * G)) % M
    b = r // (A * G * M)
    c_ok = c < head_dim
    mask = r_ok[:, None] & c_ok[None, :]

    src = X + (b * sxb + m * sxm + g * sxg + a * sxa)[:, None]
    x = tl.load(src + c[None, :], mask=mask, other=0.0).to(tl.float32)
    # Pair partners (2i <-> 2i+1) swapped in registers: a second, gathered load would not vectorise.
    pairs = tl.split(tl.reshape(x, (BLOCK_R, HD_PAD // 2, 2)))
    xp = tl.reshape(tl.join(pairs[1], pairs[0]), (BLOCK_R, HD_PAD))
    cs, sn = _angles(COS, SIN, (m // QPF)[:, None], c[None, :], stride_cos, stride_sin, N_ROT, mask)
    y = _norm_rope(x, xp, cs, sn, head_dim, eps, X.dtype.element_ty, 1)

    if HAS_SLOTS:
        row = tl.load(SLOTS + m, mask=r_ok, other=-1).to(tl.int64)
        w_ok = r_ok & (row >= 0) & (row < L)  # a slot outside the ring is never written
    else:
        row = m
        w_ok = r_ok
    w_mask = w_ok[:, None] & c_ok[None, :]
    dst = DST + (b * sdb + row * sdm + g * sdg + a * sda)[:, None] + c[None, :]
    tl.store(dst, y.to(DST.dtype.element_ty), mask=w_mask)
    if HAS_V:
        v = tl.load(V + (b * svb + m * svm + g * svg + a * sva)[:, None] + c[None, :], mask=mask, other=0.0)
        vdst = VDST + (b * svdb + row * svdm + g * svdg + a * svda)[:, None] + c[None, :]
        tl.store(vdst, v.to(VDST.dtype.element_ty), mask=w_mask)


@triton.jit
def _short_attention_kernel(
    Q, K, V, VALID, COS, SIN, OUT,
    sqb, sqm, sqg, sqa,
    skb, skg, skl, ska,
    svb, svg, svl, sva,
    stride_cos, stride_sin,
    sob, som, sog, soa,
    R, M, G, A, L, QPF, N_ROT, head_dim, eps, scale,
    HD_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, NORM_ROPE: tl.constexpr,
):  # fmt: skip
    """BLOCK_M queries of BLOCK_R groups (b, g, a) as one [R, M, hd] tile against the group's first
    `valid` ring slots, one slot per step (online softmax in float32)."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r = (tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    c = tl.arange(0, HD_PAD)
    a = r % A
    g = (r // A) % G
    b = r // (A * G)
    r_ok = r < R
    c_ok = c < head_dim
    m3 = m.to(tl.int64)[None, :, None]
    c3 = c[None, None, :]
    ok = r_ok[:, None, None] & (m < M)[None, :, None] & c_ok[None, None, :]

    q_src = Q + (b * sqb + g * sqg + a * sqa)[:, None, None] + m3 * sqm
    q = tl.load(q_src + c3, mask=ok, other=0.0).to(tl.float32)
    if NORM_ROPE:
        pairs = tl.split(tl.reshape(q, (BLOCK_R, BLOCK_M, HD_PAD // 2, 2)))
        qp = tl.reshape(tl.join(pairs[1], pairs[0]), (BLOCK_R, BLOCK_M, HD_PAD))
        a_ok = (m < M)[None, :, None] & c_ok[None, None, :]  # one angle row per query, not per group
        cs, sn = _angles(COS, SIN, m3 // QPF, c3, stride_cos, stride_sin, N_ROT, a_ok)
        q = _norm_rope(q, qp, cs, sn, head_dim, eps, Q.dtype.element_ty, 2).to(tl.float32)

    kv_mask = r_ok[:, None, None] & c_ok[None, None, :]
    k_src = K + (b * skb + g * skg + a * ska)[:, None, None] + c3
    v_src = V + (b * svb + g * svg + a * sva)[:, None, None] + c3
    n_valid = tl.minimum(tl.load(VALID).to(tl.int32), L)
    m_i = tl.full((BLOCK_R, BLOCK_M), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_R, BLOCK_M), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_M, HD_PAD), tl.float32)
    for slot in range(0, n_valid):
        # k and v as the torch path sees them: rounded to q's dtype, then float32.
        k = tl.load(k_src + slot * skl, mask=kv_mask, other=0.0).to(Q.dtype.element_ty).to(tl.float32)
        s = tl.sum(q * k, axis=2) * scale
        m_new = tl.maximum(m_i, s)
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        v = tl.load(v_src + slot * svl, mask=kv_mask, other=0.0).to(Q.dtype.element_ty).to(tl.float32)
        acc = acc * alpha[:, :, None] + p[:, :, None] * v
        l_i = l_i * alpha + p
        m_i = m_new
    out = acc / l_i[:, :, None]
    o_dst = OUT + (b * sob + g * sog + a * soa)[:, None, None] + m3 * som + c3
    tl.store(o_dst, out.to(OUT.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- launchers


def _tile() -> int:
    return _TILE_INTERPRETED if interpreted() else _TILE_CUDA


def _head_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(b, dim-1, g, a) strides of a [B, M, G, A, hd] or [B, M, A, hd] tensor (g stride 0 when absent)."""
    if t.dim() == 5:
        return t.stride(0), t.stride(1), t.stride(2), t.stride(3)
    return t.stride(0), t.stride(1), 0, t.stride(2)


def _cache_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(b, slot, g, a) strides of a [B, S, L, A, hd] (per position) or [B, L, A, hd] (shared) cache."""
    if t.dim() == 5:
        return t.stride(0), t.stride(2), t.stride(1), t.stride(3)
    return t.stride(0), t.stride(1), 0, t.stride(2)


def _groups(x: torch.Tensor) -> tuple[int, int, int, int]:
    """(B, M, G, A) of a [B, M, G, A, hd] or [B, M, A, hd] tensor."""
    if x.dim() == 5:
        return x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    return x.shape[0], x.shape[1], 1, x.shape[2]


def _launch_norm_rope(x, v, cos, sin, slots, dst, vdst, dst_strides, vdst_strides, ring_len: int) -> None:
    B, M, G, A = _groups(x)
    hd = x.shape[-1]
    rows = B * M * G * A
    if rows == 0:
        return
    hd_pad = next_pow2(hd)
    tile = _TILE_INTERPRETED if interpreted() else _ROW_TILE_CUDA
    block_r = max(1, min(next_pow2(rows), tile // hd_pad))
    has_v = v is not None
    # fmt: off
    launch(
        _norm_rope_kernel, (triton.cdiv(rows, block_r),),
        x, v if has_v else x, cos, sin, slots if slots is not None else cos, dst, vdst if has_v else dst,
        *_head_strides(x), *(_head_strides(v) if has_v else (0, 0, 0, 0)),
        cos.stride(0), sin.stride(0),
        *dst_strides, *(vdst_strides if has_v else (0, 0, 0, 0)),
        rows, M, G, A, M // cos.shape[0], cos.shape[1], ring_len, hd, EPS,
        HD_PAD=hd_pad, BLOCK_R=block_r, HAS_SLOTS=slots is not None, HAS_V=has_v,
        num_warps=_NUM_WARPS,
    )
    # fmt: on


def _action_norm_rope_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    out = new_output(x.shape, x.dtype, x.device)
    _launch_norm_rope(x, None, cos, sin, None, out, None, _head_strides(out), None, x.shape[1])
    return out


def _action_norm_rope_cache_write_op(
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    ring_len = k_cache.shape[2] if k_cache.dim() == 5 else k_cache.shape[1]
    _launch_norm_rope(
        k, v, cos, sin, slots, k_cache, v_cache, _cache_strides(k_cache), _cache_strides(v_cache), ring_len
    )


def _short_ring_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    valid: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
) -> torch.Tensor:
    out = new_output(q.shape, q.dtype, q.device)
    B, M, G, A = _groups(q)
    hd = q.shape[-1]
    rows = B * G * A
    if rows == 0 or M == 0:
        return out
    ring_len = k_cache.shape[2] if k_cache.dim() == 5 else k_cache.shape[1]
    hd_pad = next_pow2(hd)
    block_m = min(next_pow2(M), _BLOCK_M_CUDA if q.device.type == "cuda" else 256)
    block_r = max(1, min(next_pow2(rows), _tile() // (block_m * hd_pad)))
    norm_rope = cos is not None
    table_cos = cos if norm_rope else q  # never read without NORM_ROPE
    table_sin = sin if norm_rope else q
    qb, qm, qg, qa = _head_strides(q)
    ob, om, og, oa = _head_strides(out)
    kb, kl, kg, ka = _cache_strides(k_cache)
    vb, vl, vg, va = _cache_strides(v_cache)
    # fmt: off
    launch(
        _short_attention_kernel, (triton.cdiv(M, block_m), triton.cdiv(rows, block_r)),
        q, k_cache, v_cache, valid, table_cos, table_sin, out,
        qb, qm, qg, qa,
        kb, kg, kl, ka,
        vb, vg, vl, va,
        table_cos.stride(0) if norm_rope else 0, table_sin.stride(0) if norm_rope else 0,
        ob, om, og, oa,
        rows, M, G, A, ring_len, M // cos.shape[0] if norm_rope else 1, cos.shape[1] if norm_rope else 0,
        hd, EPS, hd**-0.5,
        HD_PAD=hd_pad, BLOCK_R=block_r, BLOCK_M=block_m, NORM_ROPE=norm_rope,
        num_warps=_NUM_WARPS,
    )
    # fmt: on
    return out


register_op("action_norm_rope", _action_norm_rope_op)
register_op("action_norm_rope_cache_write", _action_norm_rope_cache_write_op, mutates_args=("k_cache", "v_cache"))
register_op("short_ring_attention", _short_ring_attention_op)


# ----------------------------------------------------------------------------- argument checks


def _check_heads(name: str, x: torch.Tensor, device: torch.device | None = None) -> None:
    check_tensor(name, x, dtypes=FLOAT_DTYPES, device=device, last_contiguous=True)
    if x.dim() not in (4, 5):
        raise InvalidArgumentError(
            f"{name}: expected [B, T, S, A, hd] (per token position) or [B, N, A, hd] (shared), "
            f"found shape {list(x.shape)}"
        )


def _check_tables(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """cos/sin [T, n] float32 on x's device; T divides x's dim 1; the 2n rotated channels fit a head."""
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, ndim=2, dtypes=(torch.float32,), device=x.device, last_contiguous=True)
    check_shape("sin", sin, tuple(cos.shape))
    frames, n = cos.shape
    if frames == 0 or x.shape[1] % frames:
        raise InvalidArgumentError(
            f"cos: {frames} latent frames do not divide dim 1 of the heads ({x.shape[1]}); "
            "pass one row of angles per latent frame"
        )
    if 2 * n > x.shape[-1]:
        raise InvalidArgumentError(f"cos: {n} angle pairs rotate {2 * n} channels, more than head_dim {x.shape[-1]}")


def _check_cache(name: str, cache: torch.Tensor, x: torch.Tensor) -> None:
    """A cache of x's layout: [B, S, L, A, hd] for x [B, T, S, A, hd], [B, L, A, hd] for x [B, N, A, hd]."""
    check_tensor(name, cache, ndim=x.dim(), dtypes=FLOAT_DTYPES, device=x.device, last_contiguous=True)
    B, _, G, A = _groups(x)
    want = (B, G, None, A, x.shape[-1]) if x.dim() == 5 else (B, None, A, x.shape[-1])
    check_shape(name, cache, want)


def _check_valid(valid: torch.Tensor, device: torch.device) -> None:
    check_tensor("valid", valid, dtypes=INDEX_DTYPES, device=device)
    if valid.numel() != 1:
        raise InvalidArgumentError(f"valid: expected one element ([] or [1]), found shape {list(valid.shape)}")


# ----------------------------------------------------------------------------- public API


def action_norm_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_action_rope(head_rms(x), cos, sin, 1)` of the action module in one pass: x [B, T, S, A, hd]
    or [B, N, A, hd] (any strides, last dim contiguous), cos/sin [T, n] float32 (frame of dim-1 index m:
    m // (size / T)). Returns a contiguous tensor of x's shape and dtype."""
    _check_heads("x", x)
    _check_tables(x, cos, sin)
    require_triton(x.device)
    return torch.ops.flashdreams.action_norm_rope(x, cos, sin)


def action_norm_rope_cache_write(
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Normalise and rotate k (as `action_norm_rope`) and write it, and v unchanged, into ring slot
    `slots[f]` of k_cache / v_cache (in place). k, v [B, T, S, A, hd] with caches [B, S, L, A, hd]
    (per token position), or k, v [B, T, A, hd] with caches [B, L, A, hd] (shared); slots int [T]."""
    _check_heads("k", k)
    _check_heads("v", v, k.device)
    check_shape("v", v, tuple(k.shape))
    _check_tables(k, cos, sin)
    if cos.shape[0] != k.shape[1]:
        raise InvalidArgumentError(f"cos: expected one row per latent frame of k ({k.shape[1]}), found {cos.shape[0]}")
    _check_cache("k_cache", k_cache, k)
    _check_cache("v_cache", v_cache, k)
    check_shape("v_cache", v_cache, tuple(k_cache.shape))
    check_tensor("slots", slots, ndim=1, dtypes=INDEX_DTYPES, device=k.device)
    check_shape("slots", slots, (k.shape[1],))
    require_triton(k.device)
    torch.ops.flashdreams.action_norm_rope_cache_write(k, v, cos, sin, k_cache, v_cache, slots)


def short_ring_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    valid: torch.Tensor,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v over ring slots [0, valid), scores in float32, for many short query
    groups. q [B, T, S, A, hd] against caches [B, S, L, A, hd] (position s, head a: T queries over its
    own ring) or q [B, N, A, hd] against [B, L, A, hd] (head a: N queries over one ring). valid: int,
    one element, on the device (never read on the host). With cos/sin, q is first normalised and
    rotated as by `action_norm_rope`. Returns a contiguous tensor of q's shape and dtype."""
    _check_heads("q", q)
    _check_cache("k_cache", k_cache, q)
    _check_cache("v_cache", v_cache, q)
    check_shape("v_cache", v_cache, tuple(k_cache.shape))
    _check_valid(valid, q.device)
    if (cos is None) != (sin is None):
        raise InvalidArgumentError("cos/sin: pass both angle tables or neither")
    if cos is not None:
        _check_tables(q, cos, sin)
    require_triton(q.device)
    return torch.ops.flashdreams.short_ring_attention(q, k_cache, v_cache, valid, cos, sin)


# ----------------------------------------------------------------------------- reference twins


def _frames_view(x: torch.Tensor, frames: int) -> torch.Tensor:
    """x [B, M, ..., hd] -> [B, T, M/T, ..., hd]: the latent frame gets its own axis (dim 1)."""
    return x.unflatten(1, (frames, x.shape[1] // frames))


def action_norm_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """What `action_norm_rope` computes, in plain torch: per-head RMS norm (float32, rounded to x's
    dtype), then interleaved pairs (2i, 2i+1) of the first 2n channels turned by the frame's angle."""
    n = cos.shape[-1]
    xf = _frames_view(x, cos.shape[0]).float()
    xn = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype).float()
    shape = [1] * xn.dim()
    shape[1], shape[-1] = cos.shape[0], n
    c, s = cos.view(shape), sin.view(shape)
    a, b = xn[..., 0 : 2 * n : 2], xn[..., 1 : 2 * n : 2]
    rot = torch.stack([a * c - b * s, b * c + a * s], dim=-1).flatten(-2)
    return torch.cat([rot, xn[..., 2 * n :]], dim=-1).to(x.dtype).flatten(1, 2)


def action_norm_rope_cache_write_reference(
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """What `action_norm_rope_cache_write` does, in plain torch (index copies into the rings)."""
    kr = action_norm_rope_reference(k, cos, sin)
    if k.dim() == 5:  # [B, T, S, A, hd] -> the caches' [B, S, T, A, hd]
        kr, v = kr.transpose(1, 2), v.transpose(1, 2)
    dim = k_cache.dim() - 3
    k_cache.index_copy_(dim, slots, kr.to(k_cache.dtype))
    v_cache.index_copy_(dim, slots, v.to(v_cache.dtype))


def short_ring_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    valid: torch.Tensor,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> torch.Tensor:
    """What `short_ring_attention` computes, in plain torch: float32 batched matmuls, masked softmax."""
    if cos is not None:
        q = action_norm_rope_reference(q, cos, sin)
    if q.dim() == 5:  # per position: [B, S, A, T, hd] against [B, S, A, L, hd]
        qh, kh, vh = q.permute(0, 2, 3, 1, 4), k_cache.transpose(2, 3), v_cache.transpose(2, 3)
    else:  # shared: [B, A, N, hd] against [B, A, L, hd]
        qh, kh, vh = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    kf, vf = kh.to(q.dtype).float(), vh.to(q.dtype).float()
    scores = torch.matmul(qh.float(), kf.transpose(-1, -2)) * q.shape[-1] ** -0.5
    keep = torch.arange(kf.shape[-2], device=q.device) < valid.reshape(())
    out = torch.matmul(scores.masked_fill(~keep, float("-inf")).softmax(-1), vf).to(q.dtype)
    out = out.permute(0, 3, 1, 2, 4) if q.dim() == 5 else out.transpose(1, 2)
    return out.contiguous()
