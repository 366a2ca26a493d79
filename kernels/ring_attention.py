"""Attention of one block's queries over the KV ring: softmax(q k^T * scale) v over keys [0, valid_len).

The ring (DESIGN.md, "The KV ring") keeps a layer's keys (after RoPE) and values in
`[B, S, N, d]` buffers whose valid rows are always a prefix `[0, valid_len)`, and the
block's own keys are written before attention, so there is no mask inside the block:
every query sees every valid key, and softmax does not care about the ring's order.
`valid_len` is a device tensor read by the kernel itself, so one compiled graph (and one
CUDA graph) serves every block without a host sync.

The kernel is FlashAttention-2's forward: each program holds a BLOCK_M x d tile of
queries, streams BLOCK_N-row tiles of K and V through shared memory, and keeps an online
softmax in fp32 (base-2 exponentials, log2(e) folded into the scale). Only the last key
tile is masked. Rows past valid_len are never multiplied in, so garbage or NaN there is
harmless.

Work and traffic, per forward (Lq queries, Lkv valid keys, N heads, head dim d):
  FLOPs  = 4 * Lq * Lkv * d * N  (QK^T and PV, 2 FLOPs per multiply-add);
  bytes  = 2 * Lq * N * d * 2 (q in, out) + 2 * Lkv * N * d * 2 (K, V) from HBM in bf16,
           K and V being re-read from L2 by each of the Lq / BLOCK_M query tiles.
At Self-Forcing's largest block (Lq 4680, Lkv 32760, N 12, d 128) that is 942 GFLOP over
~230 MB: about 4000 FLOP per HBM byte, so the kernel is bound by the tensor cores: at
cuDNN's measured 514 TFLOP/s it takes 1.83 ms; the HBM traffic alone would take 0.08 ms.

With Lq / BLOCK_M * B * N programs (444 at that shape) on 132 SMs the last wave runs a
third full; splitting the keys of each query tile across `splits` programs, merged by
their log-sum-exp afterwards, evens the waves (888 programs: 6.7 waves) for the price of
writing and re-reading fp32 partials (~60 MB, ~0.03 ms).
"""

from __future__ import annotations

import math

import torch

from flashdreams.errors import InvalidArgumentError

from ._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_shape,
    check_tensor,
    env_choice,
    inline_into_compilers,
    interpreted,
    launch,
    next_pow2,
    register_op,
    require_triton,
    tl,
    triton,
)
from .attention_merge import split_outputs
from .ring_attention_configs import AttnConfig, pick_config
from .ring_attention_hopper import VARIANTS as HOPPER_VARIANTS
from .ring_attention_hopper import hopper_bf16_available, launch_ring_attention_hopper

LOG2E = 1.4426950408889634


@triton.jit
def _attend_tiles(
    acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, lo, hi, valid, qk_scale, offs_n, d_ok,
    MASK_N: tl.constexpr, MASK_D: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
    WARP_SPEC: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Fold key tiles [lo, hi) into the running (acc, l_i, m_i); MASK_N masks keys >= valid.

    k_src / v_src are tensor descriptors (USE_TMA: rows past valid arrive as zeros) or
    pointer tiles.
    """
    for start in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPEC):
        rows = start + offs_n
        if USE_TMA:
            k = k_src.load([start, 0])
            v = v_src.load([start, 0])
        elif MASK_N:
            ld_mask = (rows < valid)[:, None] & d_ok[None, :]
            k = tl.load(k_src + start * stride_kn, mask=ld_mask, other=0.0)
            v = tl.load(v_src + start * stride_vn, mask=ld_mask, other=0.0)
        elif MASK_D:
            k = tl.load(k_src + start * stride_kn, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_src + start * stride_vn, mask=d_ok[None, :], other=0.0)
        else:
            k = tl.load(k_src + start * stride_kn)
            v = tl.load(v_src + start * stride_vn)
        if UPCAST:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASK_N:
            qk = tl.where((rows < valid)[None, :], qk, float("-inf"))
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
    return acc, l_i, m_i


@triton.jit
def _ring_attention_kernel(
    Q, K, V, Out, LSE, VALID,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_os, stride_ob, stride_om, stride_oh,
    stride_ls, stride_lb, stride_lh,
    Lq, S, H, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, STAGGER: tl.constexpr,
):  # fmt: skip
    """One (query tile, batch x head, key split): normalised output rows and their natural-log LSE. STAGGER:
    the whole key tiles are taken from the one set by the query tile on, wrapping around (`AttnConfig.stagger`)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    valid = tl.load(VALID).to(tl.int32)
    valid = tl.maximum(tl.minimum(valid, S), 0)
    # This program's keys: a run of whole tiles; only the run holding valid_len has a partial tile.
    per_split = tl.cdiv(tl.cdiv(valid, BLOCK_N), SPLITS) * BLOCK_N
    lo = tl.minimum(pid_s * per_split, valid)
    hi = tl.minimum(lo + per_split, valid)
    full_hi = lo + ((hi - lo) // BLOCK_N) * BLOCK_N

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < Lq

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    if USE_TMA:
        rows = tl.maximum(valid, 1)  # a descriptor needs a non-empty shape; no tile is read if valid is 0
        k_src = tl.make_tensor_descriptor(
            k_base, shape=[rows, HEAD_DIM], strides=[stride_kn, 1], block_shape=[BLOCK_N, D_PAD]
        )
        v_src = tl.make_tensor_descriptor(
            v_base, shape=[rows, HEAD_DIM], strides=[stride_vn, 1], block_shape=[BLOCK_N, D_PAD]
        )
    else:
        k_src = k_base + offs_n[:, None] * stride_kn + offs_d[None, :]
        v_src = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]

    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    # fmt: off
    if STAGGER:  # its own branch, so that the unstaggered kernel compiles exactly as before (one key loop)
        mid = lo + (pid_m * ((full_hi - lo) // BLOCK_N) // tl.num_programs(0)) * BLOCK_N
        acc, l_i, m_i = _attend_tiles(
            acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, mid, full_hi, valid, qk_scale, offs_n, d_ok,
            False, HEAD_DIM != D_PAD, BLOCK_N, USE_TMA, WARP_SPEC, DOT_PRECISION, UPCAST,
        )
        acc, l_i, m_i = _attend_tiles(
            acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, lo, mid, valid, qk_scale, offs_n, d_ok,
            False, HEAD_DIM != D_PAD, BLOCK_N, USE_TMA, WARP_SPEC, DOT_PRECISION, UPCAST,
        )
    else:
        acc, l_i, m_i = _attend_tiles(
            acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, lo, full_hi, valid, qk_scale, offs_n, d_ok,
            False, HEAD_DIM != D_PAD, BLOCK_N, USE_TMA, WARP_SPEC, DOT_PRECISION, UPCAST,
        )
    if full_hi < hi:  # the one partial tile, masked
        acc, l_i, m_i = _attend_tiles(
            acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, full_hi, hi, valid, qk_scale, offs_n, d_ok,
            True, True, BLOCK_N, USE_TMA, False, DOT_PRECISION, UPCAST,
        )
    # fmt: on

    # No key at all (valid_len 0, or an empty split): output 0 and LSE -inf.
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_keys, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_ptrs = Out + pid_s * stride_os + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_s * stride_ls + b * stride_lb + h * stride_lh + offs_m, lse, mask=m_ok)


# ----------------------------------------------------------------------------- launchers


def _tma_ok(*caches: torch.Tensor) -> bool:
    """Whether every (batch, head) base and row of these caches is 16-byte aligned, as TMA needs."""
    for t in caches:
        e = t.element_size()
        if any((x * e) % 16 for x in (t.storage_offset(), t.stride(0), t.stride(1), t.stride(2), t.shape[3])):
            return False
    return True


_allocator_set = False


def _ensure_tma_allocator() -> None:
    """Device-side tensor descriptors need a little global scratch per program; torch supplies it."""
    global _allocator_set
    if not _allocator_set:
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, device="cuda", dtype=torch.int8))
        _allocator_set = True


# FD_RING_ATTN_KERNEL: "triton" (this file's kernel; the default) or a form of the Gluon kernel for Hopper at
# head dim 128 (ring_attention_hopper.VARIANTS: "gluon", ...). The Gluon kernel is opt-in: correct on an H100,
# but 20-30% slower than this one there (bench/results/NOTES.md, h1-h100); where it cannot serve a call, this
# kernel does.
KERNEL_ENV = "FD_RING_ATTN_KERNEL"


def kernel_choice() -> str:
    """FD_RING_ATTN_KERNEL's value ("triton" unset), refused by name when it names no kernel."""
    return env_choice(KERNEL_ENV, "triton", ("triton", *HOPPER_VARIANTS))


def hopper_form(q: torch.Tensor) -> str | None:
    """The Gluon form that runs a call with the picked config, or None for this file's kernel: chosen by
    FD_RING_ATTN_KERNEL, ops left opaque (Inductor inlines Triton kernels, not Gluon ones), and a q the
    Gluon kernel serves."""
    kernel = kernel_choice()
    if kernel == "triton" or inline_into_compilers():
        return None
    return kernel if hopper_bf16_available(q) else None


def launch_ring_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    valid_len: torch.Tensor,
    scale: float,
    config: AttnConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernel with an explicit config (unchecked arguments; the bench and tests use this). With no
    config, FD_RING_ATTN_KERNEL may send the call to the Gluon kernel (`ring_attention_hopper`)."""
    B, Lq, H, d = q.shape
    S = k_cache.shape[1]
    cfg = config if config is not None else pick_config(q, S)
    splits = cfg.splits or 1
    form = hopper_form(q) if config is None else None
    if form is not None:
        return launch_ring_attention_hopper(q, k_cache, v_cache, valid_len, scale, splits, form)
    d_pad = next_pow2(d, 16)
    bufs = split_outputs(q, splits)
    # Triton 3.9's interpreter multiplies bf16 bit patterns as integers in tl.dot: there (only)
    # the tiles are upcast to fp32 first, which is exact, so the math is the same as on GPU.
    upcast = q.dtype == torch.bfloat16 and interpreted()
    use_tma = cfg.use_tma and _tma_ok(k_cache, v_cache)
    if use_tma and q.device.type == "cuda":
        _ensure_tma_allocator()
    grid = (triton.cdiv(Lq, cfg.block_m), B * H, splits)
    # fmt: off
    launch(
        _ring_attention_kernel, grid, q, k_cache, v_cache, bufs.o_buf, bufs.l_buf, valid_len,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *bufs.strides(),
        Lq, S, H, scale * LOG2E,
        HEAD_DIM=d, D_PAD=d_pad, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLITS=splits,
        USE_TMA=use_tma, WARP_SPEC=cfg.warp_specialize,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 or upcast else "tf32",
        UPCAST=upcast, STAGGER=cfg.stagger,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    # fmt: on
    return bufs.finish()


def _ring_attention_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, valid_len: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_ring_attention(q, k_cache, v_cache, valid_len, scale)


register_op("ring_attention", _ring_attention_op)


# ----------------------------------------------------------------------------- public API


def _check_attention_args(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, valid_len: torch.Tensor
) -> None:
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES, last_contiguous=True)
    B, _, H, d = q.shape
    if d > 256:
        raise InvalidArgumentError(f"q: head_dim must be <= 256, found {d}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, t, ndim=4, dtypes=(q.dtype,), device=q.device, last_contiguous=True)
        check_shape(name, t, (B, None, H, d))
    if v_cache.shape[1] != k_cache.shape[1]:
        raise InvalidArgumentError(f"v_cache: expected {k_cache.shape[1]} rows like k_cache, found {v_cache.shape[1]}")
    check_tensor("valid_len", valid_len, dtypes=INDEX_DTYPES, device=q.device)
    if valid_len.numel() != 1:
        raise InvalidArgumentError(f"valid_len: expected 1 element, found shape {list(valid_len.shape)}")


def resolve_scale(q: torch.Tensor, scale: float | None) -> float:
    """The softmax scale: 1/sqrt(head_dim) by default; a given one must be positive and finite."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not (scale > 0.0 and math.isfinite(scale)):
        raise InvalidArgumentError(f"scale: expected a positive finite float, found {scale}")
    return scale


def ring_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    valid_len: torch.Tensor,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of q `[B, Lq, N, d]` over cache rows [0, valid_len) of `[B, S, N, d]` K/V caches.

    Returns out `[B, Lq, N, d]` in q's dtype and, with `return_lse`, the natural-log
    log-sum-exp of the scaled scores `[B, N, Lq]` in float32 (for merging partial
    attentions). `scale` defaults to 1/sqrt(d).
    """
    _check_attention_args(q, k_cache, v_cache, valid_len)
    scale = resolve_scale(q, scale)
    require_triton(q.device)
    out, lse = torch.ops.flashdreams.ring_attention(q, k_cache, v_cache, valid_len.reshape(1), scale)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------- reference twins


def ring_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    valid_len: torch.Tensor,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """What `ring_attention` computes, in fp32 with a masked softmax (keys >= valid_len never count)."""
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    S = k_cache.shape[1]
    keep = torch.arange(S, device=q.device) < valid_len.reshape(()).to(q.device)  # [S]
    k = torch.where(keep[None, :, None, None], k_cache.float(), 0.0)
    v = torch.where(keep[None, :, None, None], v_cache.float(), 0.0)
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k) * scale
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [B, N, Lq]; -inf where no key is valid
    p = torch.where(keep, torch.exp(s - lse[..., None]), 0.0).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", p, v).to(q.dtype)
    return (out, lse) if return_lse else out
