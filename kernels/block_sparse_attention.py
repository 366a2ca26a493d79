"""Block-sparse attention of FlashVSR's windowed self-attention (LCSA), and the block selection.

Tokens come in windows of `block` tokens (FlashVSR: 2 x 8 x 8 = 128, one window per
(frame pair, 8x8 patch)). Query window i attends to the key windows j with `mask[b, h, i, j]`,
exact `softmax(q k^T * scale) v` over those windows' tokens only; a query window that selects
nothing outputs zeros (flash-attn's convention, which the reference inherits).

`select_blocks` makes the mask the way the reference (`generate_draft_block_mask`) does:
window-mean q and k per head, scores `qbar . kbar / sqrt(d)`, a spatial local range (no
clamping at the borders), softmax over all key windows, then per head and per query slab the
`topk` largest probabilities of the flattened (query window x key window) map, kept with a
strict `>` against the (topk+1)-th largest. It runs in torch with the reference's dtypes (means
and scores in the model dtype, softmax in float32): its inputs are tiny (one vector per window)
and the exact masks are part of the parity contract.

The kernel is FlashAttention-2's forward over a compact list of the selected key windows:
`mask` is turned into per-(b, h, query window) counts and ascending window indices, each
program holds a BLOCK_M x d tile of one query window and streams only the listed windows'
K/V in BLOCK_N-row tiles with an online softmax in fp32 (base-2 exponentials). Work is the
dense attention's times the mask density: at 768x1408 (S = 66 windows per slab, 4 key slabs,
sparse ratio 2.0) about 0.45-0.6 of dense. `block_sparse_attention_reference` is the twin.
"""

from __future__ import annotations

import math

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
    tl,
    triton,
)

LOG2E = 1.4426950408889634

# "stable" and "faster" of the FlashVSR release: top-k budget relative to 768x1280 output.
SPARSE_RATIOS = {"stable": 2.0, "faster": 1.5}


# ----------------------------------------------------------------------------- block selection


def local_window_mask(grid_h: int, grid_w: int, local_range: int, device=None) -> torch.Tensor:
    """bool [S, S] (S = grid_h*grid_w windows of one slab, row-major): key window j is near query window i.

    Allowed iff r_i - half <= r_j <= r_i - half + R - 1 (and the same for columns), half =
    R // 2, without clamping at the borders: edge windows see fewer neighbours, an even R
    is asymmetric (the reference's `build_local_block_mask_shifted_vec_normal_slide`).
    """
    r = torch.arange(grid_h, device=device).repeat_interleave(grid_w)
    c = torch.arange(grid_w, device=device).repeat(grid_h)
    half = local_range // 2
    lo_r, lo_c = r - half, c - half
    in_r = (r[None, :] >= lo_r[:, None]) & (r[None, :] <= lo_r[:, None] + local_range - 1)
    in_c = (c[None, :] >= lo_c[:, None]) & (c[None, :] <= lo_c[:, None] + local_range - 1)
    return in_r & in_c


def topk_budget(slab_windows: int, topk_ratio: float) -> int:
    """The reference's `topk = int(S*S*topk_ratio) - 1` (selected blocks per head and query slab)."""
    return int(slab_windows * slab_windows * topk_ratio) - 1


def topk_ratio_for(sparse_ratio: float, height: int, width: int) -> float:
    """FlashVSR's `topk_ratio = sparse_ratio * 768 * 1280 / (H * W)` for an H x W output video."""
    return sparse_ratio * 768 * 1280 / (height * width)


def window_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, n*block, N, d] -> [B, n, N, d] in x's dtype: the mean of each window's tokens.

    In x's dtype like the reference (bf16 on a GPU: accumulated in float32, rounded once), so the
    selection sees the scores the released model was distilled with.
    """
    b, length, n, d = x.shape
    return x.reshape(b, length // block, block, n * d).mean(2).reshape(b, length // block, n, d)


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    block: int,
    grid_hw: tuple[int, int],
    local_range: int,
    topk: int,
) -> torch.Tensor:
    """The selected key windows: bool [B, N, nq, nk] for q [B, nq*block, N, d], k [B, nk*block, N, d].

    Windows are slab-major: slab s holds windows [s*S, (s+1)*S), S = grid_h*grid_w, row-major
    in the grid. `topk` is the per-head, per-query-slab budget (`topk_budget`).
    """
    gh, gw = grid_hw
    S = gh * gw
    qbar, kbar = window_means(q, block), window_means(k, block)
    B, nq, N, d = qbar.shape
    nk = kbar.shape[1]
    if nq % S or nk % S:
        raise InvalidArgumentError(f"select_blocks: {nq} query / {nk} key windows are not whole slabs of {S}")
    # Scores in the inputs' dtype, then float32 for the local mask and the softmax (the reference adds
    # a float32 0/-inf bias, which promotes them).
    scores = (torch.einsum("bihd,bjhd->bhij", qbar, kbar) / math.sqrt(d)).float()
    allowed = local_window_mask(gh, gw, local_range, q.device).repeat(nq // S, nk // S)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    flat = probs.reshape(B, N, nq // S, S * nk)
    kk = min(flat.shape[-1] - 1, topk)
    threshold = torch.topk(flat, kk + 1, dim=-1).values[..., -1:]
    return (flat > threshold).reshape(B, N, nq, nk)


def mask_to_lists(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [B, N, nq, nk] -> (counts int32 [B, N, nq], indices int32 [B, N, nq, nk]: selected j ascending first)."""
    counts = mask.sum(-1, dtype=torch.int32)
    order = torch.argsort((~mask).to(torch.uint8), dim=-1, stable=True)
    return counts, order.to(torch.int32)


# ----------------------------------------------------------------------------- kernel


@triton.jit
def _bsa_kernel(
    Q, K, V, Out, CNT, IDX,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    H, NQ, NK, qk_scale,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    MASK_D: tl.constexpr,
):  # fmt: skip
    """One (query tile of one window, batch x head): attention over that window's listed key windows."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    qwin = (pid_m * BLOCK_M) // BLOCK
    row = pid_bh.to(tl.int64) * NQ + qwin
    count = tl.load(CNT + row)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
        mask=d_ok[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_base = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]

    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for t in range(0, count):
        kwin = tl.load(IDX + row * NK + t).to(tl.int64)
        for sub in tl.static_range(BLOCK // BLOCK_N):
            start = kwin * BLOCK + sub * BLOCK_N
            if MASK_D:  # head_dim padded to a power of two
                k = tl.load(k_base + start * stride_kn, mask=d_ok[None, :], other=0.0)
                v = tl.load(v_base + start * stride_vn, mask=d_ok[None, :], other=0.0)
            else:
                k = tl.load(k_base + start * stride_kn)
                v = tl.load(v_base + start * stride_vn)
            if UPCAST:
                k = k.to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if UPCAST:
                acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
            m_i = m_new
    # A window that selected nothing outputs zeros (flash-attn convention).
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=d_ok[None, :])


def _pick_tiles(block: int, d: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): both tiles divide the window."""
    if device.type != "cuda":
        t = min(block, 64)
        return t, t, 4, 1
    bm = min(block, 128)
    bn = min(block, 64 if d > 64 else 128)
    # 3 stages: 6% faster than 2 at both FlashVSR sizes on the H200 (bench/results/flashvsr-h200, tile sweep).
    return bm, bn, 8 if bm * d >= 128 * 128 else 4, 3


def launch_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    counts: torch.Tensor,
    indices: torch.Tensor,
    block: int,
    scale: float,
    tiles: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Run the kernel on the compact lists (unchecked arguments; the bench and tests use this)."""
    B, Lq, H, d = q.shape
    nq, nk = Lq // block, k.shape[1] // block
    bm, bn, warps, stages = tiles or _pick_tiles(block, d, q.device)
    out = new_output(q.shape, q.dtype, q.device)
    upcast = q.dtype == torch.bfloat16 and interpreted()
    grid = (Lq // bm, B * H)
    # fmt: off
    launch(
        _bsa_kernel, grid, q, k, v, out, counts, indices,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        H, nq, nk, scale * LOG2E,
        BLOCK=block, HEAD_DIM=d, D_PAD=next_pow2(d, 16), BLOCK_M=bm, BLOCK_N=bn,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 or upcast else "tf32", UPCAST=upcast,
        MASK_D=next_pow2(d, 16) != d, num_warps=warps, num_stages=stages,
    )
    # fmt: on
    return out


def _bsa_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: torch.Tensor, indices: torch.Tensor, block: int
) -> torch.Tensor:
    return launch_block_sparse_attention(q, k, v, counts, indices, block, 1.0 / math.sqrt(q.shape[-1]))


register_op("block_sparse_attention", _bsa_op)


# ----------------------------------------------------------------------------- public API


def _check_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, block: int) -> None:
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES, last_contiguous=True)
    B, Lq, H, d = q.shape
    if d > 256:
        raise InvalidArgumentError(f"q: head_dim must be <= 256, found {d}")
    if block < 16 or block & (block - 1):
        raise InvalidArgumentError(f"block: expected a power of two >= 16 tokens per window, found {block}")
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, dtypes=(q.dtype,), device=q.device, last_contiguous=True)
        check_shape(name, t, (B, k.shape[1], H, d))
    if Lq % block or k.shape[1] % block:
        raise InvalidArgumentError(f"q ({Lq}) and k ({k.shape[1]}) rows must be whole windows of {block} tokens")
    check_tensor("mask", mask, ndim=4, device=q.device)
    check_shape("mask", mask, (B, H, Lq // block, k.shape[1] // block))


def block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, block: int = 128
) -> torch.Tensor:
    """Attention of q [B, Lq, N, d] over the key windows of k/v [B, Lk, N, d] that `mask` [B, N, nq, nk] selects.

    Windows are `block` consecutive tokens; scale 1/sqrt(d); out [B, Lq, N, d] in q's dtype.
    """
    _check_args(q, k, v, mask, block)
    require_triton(q.device)
    counts, indices = mask_to_lists(mask.bool())
    return torch.ops.flashdreams.block_sparse_attention(q, k, v, counts, indices, block)


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    block: int = 128,
    query_windows_per_pass: int = 16,
) -> torch.Tensor:
    """What `block_sparse_attention` computes, in float32 with an explicit token mask.

    Query windows go `query_windows_per_pass` at a time so the token mask stays small.
    """
    B, Lq, H, d = q.shape
    scale = 1.0 / math.sqrt(d)
    kf, vf = k.float(), v.float()
    outs = []
    nq = Lq // block
    for w0 in range(0, nq, query_windows_per_pass):
        w1 = min(nq, w0 + query_windows_per_pass)
        qf = q[:, w0 * block : w1 * block].float()
        keep = mask[:, :, w0:w1].bool().repeat_interleave(block, 2).repeat_interleave(block, 3)
        s = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
        s = s.masked_fill(~keep, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows with no key: zeros
        outs.append(torch.einsum("bhqk,bkhd->bqhd", p, vf))
    return torch.cat(outs, dim=1).to(q.dtype)
