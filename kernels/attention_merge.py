"""Merging attentions of the same queries over disjoint key sets, by their log-sum-exps.

If part p attended its keys with output o_p and natural-log LSE l_p, the attention over
the union is sum_p w_p o_p with w_p = exp(l_p - l), l = log sum_p exp(l_p), and l is its
LSE. Ring attention uses this for its key splits (evening out the last wave of programs);
context parallelism will use it to combine shards held by different GPUs.

One pass: P partial outputs and LSEs read, one output and LSE written. Bound by memory:
for Self-Forcing's block with two fp32 parts (4680 x 12 x 128) that is 58 MB read and
14 MB written, ~24 us at 3.0 TB/s.
"""

from __future__ import annotations

from typing import NamedTuple

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
from ._rounding import to_e4m3
from .fp8_linear import FP8, _e4m3_inv_scale, _launch_quantize_rows, _store_row_scale


@triton.jit
def _merge_parts(op, lp, stride_ps, stride_lps, lse_mask, mask, ROW_AXES: tl.constexpr, PARTS: tl.constexpr):
    """The LSE-weighted mean of PARTS partial attentions, in float32: `lp` points at part 0's LSE of each row
    (of shape `lse_mask`, ROW_AXES axes), `op` at its values (`mask`: those axes plus head dim); parts lie
    `stride_ps` / `stride_lps` apart. Returns (values, the weights' sum, the largest LSE or 0 where none is
    finite): a row no part has a key for gets zeros and a zero sum."""
    m = tl.full(lse_mask.shape, float("-inf"), dtype=tl.float32)
    for s in tl.static_range(PARTS):
        m = tl.maximum(m, tl.load(lp + s * stride_lps, mask=lse_mask, other=float("-inf")).to(tl.float32))
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # no part has a key: every weight is 0
    acc = tl.zeros(mask.shape, dtype=tl.float32)
    den = tl.zeros(lse_mask.shape, dtype=tl.float32)
    for s in tl.static_range(PARTS):
        w = tl.exp(tl.load(lp + s * stride_lps, mask=lse_mask, other=float("-inf")).to(tl.float32) - m_safe)
        wd = tl.expand_dims(w, ROW_AXES)
        # A keyless part may hold anything, and is not read: rows a kernel ran whole (the persistent FP8
        # kernel's, a split past the ring's end) cost only their one part's bytes.
        part = tl.load(op + s * stride_ps, mask=mask & (wd > 0.0), other=0.0).to(tl.float32)
        acc += part * wd
        den += w
    return acc / tl.expand_dims(tl.where(den > 0.0, den, 1.0), ROW_AXES), den, m_safe


@triton.jit
def _merge_kernel(
    OP, LP, Out, LSE,
    stride_ps, stride_pb, stride_pm, stride_ph,
    stride_lps, stride_lpb, stride_lph,
    stride_ob, stride_om, stride_oh,
    stride_lb, stride_lh,
    Lq, H,
    PARTS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Combine PARTS partial attentions of BLOCK_M queries of one (batch, head) by their LSE weights."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    m_ok = offs_m < Lq
    mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    lp = LP + b * stride_lpb + h * stride_lph + offs_m
    op = OP + b * stride_pb + h * stride_ph + offs_m[:, None] * stride_pm + offs_d[None, :]
    out, den, m_safe = _merge_parts(op, lp, stride_ps, stride_lps, m_ok, mask, 1, PARTS)
    has = den > 0.0
    lse = tl.where(has, m_safe + tl.log(tl.where(has, den, 1.0)), float("-inf"))
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask)
    tl.store(LSE + b * stride_lb + h * stride_lh + offs_m, lse, mask=m_ok)


@triton.jit
def _merge_rows_fp8_kernel(
    OP, LP, X8, SX,
    stride_ps, stride_pb, stride_pm, stride_ph,
    stride_lps, stride_lpb, stride_lph,
    Lq, H,
    PARTS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, H_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    OUT_DTYPE: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    """`_merge_kernel` for BLOCK_M query rows of one batch over every head at once, then each merged row (the H x d
    values of the linear's input row, rounded to OUT_DTYPE as `_merge_kernel` stores them) quantized for an FP8
    linear as `fp8_linear._quantize_rows_kernel` quantizes it: x8 `[B, Lq, H * d]` e4m3, sx `[B, Lq]`."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, D_PAD)
    m_ok = offs_m < Lq
    mh = m_ok[:, None] & (offs_h < H)[None, :]  # [BLOCK_M, H_PAD]: one LSE each
    mask = mh[:, :, None] & (offs_d < HEAD_DIM)[None, None, :]
    lp = LP + b * stride_lpb + offs_h[None, :] * stride_lph + offs_m[:, None]
    op = OP + b * stride_pb + offs_m[:, None, None] * stride_pm + offs_h[None, :, None] * stride_ph
    op += offs_d[None, None, :]
    out, _, _ = _merge_parts(op, lp, stride_ps, stride_lps, mh, mask, 2, PARTS)
    out = tl.where(mask, out.to(OUT_DTYPE).to(tl.float32), 0.0)  # the values the unfused linear would read
    amax = tl.max(tl.max(tl.abs(out), 2), 1)
    inv = _e4m3_inv_scale(amax)[:, None, None]
    row = b * Lq + offs_m
    x8_ptrs = X8 + row[:, None, None] * (H * HEAD_DIM) + offs_h[None, :, None] * HEAD_DIM + offs_d[None, None, :]
    tl.store(x8_ptrs, to_e4m3(out * inv, EMULATE), mask=mask)
    _store_row_scale(amax, SX + row, m_ok)


def merge_into(parts: torch.Tensor, lses: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge parts `[P, B, Lq, N, d]` with lses `[P, B, N, Lq]` into out `[B, Lq, N, d]`, lse `[B, N, Lq]`."""
    P, B, Lq, H, d = parts.shape
    block_m = 64 if parts.device.type == "cuda" else 128
    # fmt: off
    launch(
        _merge_kernel, (triton.cdiv(Lq, block_m), B * H),
        parts, lses, out, lse,
        parts.stride(0), parts.stride(1), parts.stride(2), parts.stride(3),
        lses.stride(0), lses.stride(1), lses.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        Lq, H,
        PARTS=P, HEAD_DIM=d, D_PAD=next_pow2(d, 16), BLOCK_M=block_m, num_warps=4,
    )
    # fmt: on


def merge_rows_fp8(parts: torch.Tensor, lses: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Parts `[P, B, Lq, N, d]` and lses `[P, B, N, Lq]` merged, rounded to `dtype` and quantized per row of N * d
    values for an FP8 linear: (x8 `[B, Lq, N * d]` e4m3, sx `[B, Lq]` float32), equal bit for bit to
    `merge_into` into a `dtype` output followed by `fp8_linear.quantize_rows_fp8` of its rows, in one pass
    instead of two (the merged output is not written out and read back). Unchecked arguments."""
    P, B, Lq, H, d = parts.shape
    x8 = new_output((B, Lq, H * d), FP8, parts.device)
    sx = new_output((B, Lq), torch.float32, parts.device)
    h_pad, d_pad = next_pow2(H), next_pow2(d, 16)
    # A program holds block_m x h_pad x d_pad values per tensor: 4 rows at Self-Forcing's 12 (16) heads of 128,
    # one row from 64 padded heads (LingBot's 40); the interpreter takes large tiles.
    block_m = max(1, 8192 // (h_pad * d_pad)) if parts.device.type == "cuda" else 64
    # fmt: off
    launch(
        _merge_rows_fp8_kernel, (triton.cdiv(Lq, block_m), B),
        parts, lses, x8, sx,
        parts.stride(0), parts.stride(1), parts.stride(2), parts.stride(3),
        lses.stride(0), lses.stride(1), lses.stride(2),
        Lq, H,
        PARTS=P, HEAD_DIM=d, D_PAD=d_pad, H_PAD=h_pad, BLOCK_M=block_m,
        OUT_DTYPE=_TL_DTYPES[dtype], EMULATE=interpreted(), num_warps=4 if block_m * h_pad * d_pad <= 8192 else 8,
    )
    # fmt: on
    return x8, sx


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


class SplitOutputs(NamedTuple):
    """Where a key-split attention kernel writes: `o_buf` / `l_buf` are out / lse themselves for one split, else
    fp32 parts `[splits, B, Lq, N, d]` / `[splits, B, N, Lq]` that `finish` merges into them."""

    out: torch.Tensor
    lse: torch.Tensor
    o_buf: torch.Tensor
    l_buf: torch.Tensor
    splits: int

    def strides(self) -> tuple[int, ...]:
        """The kernels' stride arguments: split, batch, row, head of the output; split, batch, head of the LSE."""
        ob = self.o_buf if self.splits == 1 else self.o_buf[0]
        lb = self.l_buf if self.splits == 1 else self.l_buf[0]
        os_ = 0 if self.splits == 1 else self.o_buf.stride(0)
        ls_ = 0 if self.splits == 1 else self.l_buf.stride(0)
        return (os_, ob.stride(0), ob.stride(1), ob.stride(2), ls_, lb.stride(0), lb.stride(1))

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, lse), the parts merged first where there are several."""
        if self.splits > 1:
            merge_into(self.o_buf, self.l_buf, self.out, self.lse)
        return self.out, self.lse

    def finish_fp8_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The output as an FP8 linear's pre-quantized input, (x8 `[B, Lq, N * d]` e4m3, sx `[B, Lq]`): what
        `fp8_linear.quantize_rows_fp8` makes of `finish()`'s out, bit for bit. Several parts are merged and
        quantized in one pass (`merge_rows_fp8`); no LSE comes back."""
        B, Lq, H, d = self.out.shape
        if self.splits > 1:
            return merge_rows_fp8(self.o_buf, self.l_buf, self.out.dtype)
        x8, sx = _launch_quantize_rows(self.out.view(B * Lq, H * d), 0)
        return x8.view(B, Lq, H * d), sx.view(B, Lq)


def split_outputs(q: torch.Tensor, splits: int) -> SplitOutputs:
    """Outputs for an attention of q `[B, Lq, N, d]` over `splits` key splits (uninitialised, see new_output)."""
    B, Lq, H, d = q.shape
    out = new_output(q.shape, q.dtype, q.device)
    lse = new_output((B, H, Lq), torch.float32, q.device)
    if splits == 1:
        return SplitOutputs(out, lse, out, lse, 1)
    o_buf = new_output((splits, B, Lq, H, d), torch.float32, q.device)
    l_buf = new_output((splits, B, H, Lq), torch.float32, q.device)
    return SplitOutputs(out, lse, o_buf, l_buf, splits)


def _merge_op(parts: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    P, B, Lq, H, d = parts.shape
    out = new_output((B, Lq, H, d), parts.dtype, parts.device)
    lse = new_output((B, H, Lq), torch.float32, parts.device)
    merge_into(parts, lses, out, lse)
    return out, lse


register_op("merge_attention", _merge_op)


def merge_attention(parts: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of P disjoint key sets, from each set's attention and LSE.

    parts `[P, B, Lq, N, d]` (each normalised over its own keys) and lses `[P, B, N, Lq]`
    float32 natural-log LSEs, as `ring_attention(..., return_lse=True)` returns them.
    Returns (out `[B, Lq, N, d]` in the parts' dtype, lse `[B, N, Lq]` float32).
    """
    check_tensor("parts", parts, ndim=5, dtypes=FLOAT_DTYPES, last_contiguous=True)
    P, B, Lq, H, d = parts.shape
    check_tensor("lses", lses, dtypes=(torch.float32,), device=parts.device)
    check_shape("lses", lses, (P, B, H, Lq))
    if d > 256:
        raise InvalidArgumentError(f"parts: head_dim must be <= 256, found {d}")
    require_triton(parts.device)
    return torch.ops.flashdreams.merge_attention(parts, lses)


def merge_attention_reference(parts: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What `merge_attention` computes: the LSE-weighted average of the parts, in fp32."""
    lse = torch.logsumexp(lses, dim=0)  # [B, N, Lq]
    w = torch.exp(lses - lse).nan_to_num(0.0)  # [P, B, N, Lq]; 0 for parts without keys
    used = (w > 0).permute(0, 1, 3, 2)[..., None]  # [P, B, Lq, N, 1]
    out = torch.einsum("pbhq,pbqhd->bqhd", w, torch.where(used, parts.float(), 0.0)).to(parts.dtype)
    return out, lse
