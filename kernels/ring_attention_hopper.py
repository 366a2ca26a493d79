"""The bf16/fp16 ring attention for Hopper in Gluon, FlashAttention-3's pipeline (opt-in: correct, but slower).

Same contract and numbers as `ring_attention._ring_attention_kernel` (q `[B, Lq, N, 128]` against ring caches
`[B, S, N, 128]`, keys [0, valid_len) read on the device, fp32 softmax, output rows and natural-log LSE per key
split), written like `ring_attention_fp8_hopper.py` so that the MMAs of one key tile run under the softmax
of the next:

    issue S_j = Q K_j^T (async)
    acc *= alpha_{j-1}; issue acc += P_{j-1} V_{j-1} (async)
    wait for S_j only; softmax(S_j) -> P_j, alpha_j        (under P_{j-1} V_{j-1})
    wait for P_{j-1} V_{j-1}

With 16-bit operands wgmma accumulates in full fp32, so P @ V adds into the accumulator in place (no fresh
registers, unlike FP8). P reaches P @ V through shared memory: with P in registers (its move to wgmma's A
layout is shuffle-free at 16 bits) ptxas still waits for P @ V before the softmax at every tiling tried,
through shared memory it does not (`VARIANTS`). K and V tiles come by TMA through descriptors made on the
device per (batch, head) with the valid length as their row count, so rows past it read as zeros (a ring's
unwritten rows may hold anything, NaN included, and 0 * NaN would reach the accumulator).

Status (h1-h100, h2-h100 in bench/results/NOTES.md): correct on an H100 (`tests/kernels/test_ring_attention_hopper.py`,
58 passed) but slower than our Triton kernel: 338-434 TFLOP/s against 472-537 at q 4680 / kv 4680..32760, and
Self-Forcing's bf16 block 5 419.5 ms (`gluon-n128`, the best tiling) against 360.0. Reachable only through
FD_RING_ATTN_KERNEL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import _is_traced
from ._gluon import (
    HAVE_GLUON,
    barrier_ring,
    fence_async_shared,
    gl,
    gluon,
    invalidate_ring,
    key_range,
    load_tile,
    mbarrier,
    on_hopper,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from .attention_merge import split_outputs

HEAD_DIM = 128


@dataclass(frozen=True)
class HopperAttnVariant:
    """One tiling of the kernel: query rows a CTA (two consumer warpgroups at 128), keys a tile, K and V
    buffer counts, and whether P reaches P @ V through shared memory (else registers)."""

    block_m: int
    block_n: int
    k_stages: int
    v_stages: int
    p_smem: bool


# What FD_RING_ATTN_KERNEL names (ring_attention.py). Cross-compiled for sm_90 with triton 3.6 (registers,
# shared memory): with P in registers ptxas waits for P @ V before the softmax at every tiling tried (the
# overlap is lost), with P through shared memory it does not, so every form but "gluon-regs" takes that road.
VARIANTS: dict[str, HopperAttnVariant] = {
    "gluon": HopperAttnVariant(128, 64, 2, 2, True),  # 168 registers, 131 KB
    "gluon-n128": HopperAttnVariant(128, 128, 2, 2, True),  # 251 registers, 229 KB (of 227 KiB)
    "gluon-n64s3": HopperAttnVariant(128, 64, 3, 3, True),  # 158 registers, 164 KB
    "gluon-m64": HopperAttnVariant(64, 64, 2, 2, True),  # 160 registers, 98 KB: two CTAs an SM
    "gluon-regs": HopperAttnVariant(128, 128, 2, 2, False),  # 254 registers, 164 KB: serialized (comparison)
}


def hopper_bf16_available(q: torch.Tensor) -> bool:
    """Whether this kernel can serve q (`[B, Lq, N, d]`): bf16/fp16, head dim 128, an sm_90 GPU, Gluon present."""
    return on_hopper(q) and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] == HEAD_DIM


if HAVE_GLUON:

    @gluon.jit
    def _p_operand(p, p_smem, j, dtype: gl.constexpr, p_layout: gl.constexpr, P_SMEM: gl.constexpr):
        """P as wgmma's A operand: in registers (no shuffle at 16 bits) or in shared memory (slot j % 2)."""
        if P_SMEM:
            slot = p_smem.index(j % 2)
            slot.store(p.to(dtype))
            fence_async_shared()
            gl.thread_barrier()  # every warp's rows are in before the warpgroups' wgmma reads them
            return slot
        else:
            return gl.convert_layout(p.to(dtype), p_layout)

    @gluon.jit
    def _softmax_tile(s, m_i, l_i, qk_scale, start, valid, s_layout: gl.constexpr, BLOCK_N: gl.constexpr):
        """One tile's raw logits -> (p = exp2(s * qk_scale - m_new), m_new, l_new, alpha = exp2(m_i - m_new)),
        in base-2 units of the scaled logits; keys >= valid masked where the tile crosses it."""
        s = s * qk_scale
        if start + BLOCK_N > valid:
            cols = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            s = gl.where(gl.expand_dims(cols < valid, 0), s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        p = gl.exp2(s - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)
        l_new = l_i * alpha + gl.sum(p, axis=1)
        return p, m_new, l_new, alpha

    @gluon.jit
    def _ring_attention_hopper_kernel(
        Q, K, V, Out, LSE, VALID,
        stride_qb, stride_qm, stride_qh,
        stride_kb, stride_kn, stride_kh,
        stride_vb, stride_vn, stride_vh,
        stride_os, stride_ob, stride_om, stride_oh,
        stride_ls, stride_lb, stride_lh,
        Lq, S, H, qk_scale,
        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, SPLITS: gl.constexpr,
        K_STAGES: gl.constexpr, V_STAGES: gl.constexpr, P_SMEM: gl.constexpr, num_warps: gl.constexpr,
    ):  # fmt: skip
        """One (query tile, batch x head, key split): normalised output rows and their natural-log LSE."""
        pid_m = gl.program_id(0)
        bh = gl.program_id(1)
        pid_s = gl.program_id(2)
        b = (bh // H).to(gl.int64)
        h = (bh % H).to(gl.int64)
        dtype: gl.constexpr = Q.dtype.element_ty

        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16]
        )
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16]
        )
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_l: gl.constexpr = gl.SliceLayout(1, o_layout)
        col_l: gl.constexpr = gl.SliceLayout(0, o_layout)
        kv_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        q_load: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])

        valid, lo, n_tiles = key_range(VALID, S, pid_s, BLOCK_N, SPLITS)

        # Descriptors over this (batch, head)'s valid rows: a tile past valid reads zeros.
        rows = gl.maximum(valid, 1)  # a descriptor needs a non-empty shape; no tile is read if valid is 0
        k_desc = tma.make_tensor_descriptor(
            K + b * stride_kb + h * stride_kh, [rows, HEAD_DIM], [stride_kn, 1], [BLOCK_N, HEAD_DIM], kv_layout
        )
        v_desc = tma.make_tensor_descriptor(
            V + b * stride_vb + h * stride_vh, [rows, HEAD_DIM], [stride_vn, 1], [BLOCK_N, HEAD_DIM], kv_layout
        )
        k_smem = gl.allocate_shared_memory(dtype, [K_STAGES, BLOCK_N, HEAD_DIM], kv_layout)
        v_smem = gl.allocate_shared_memory(dtype, [V_STAGES, BLOCK_N, HEAD_DIM], kv_layout)
        k_bar = barrier_ring(K_STAGES)
        v_bar = barrier_ring(V_STAGES)
        # K tile j + K_STAGES - 1 goes at the top of iteration j into the buffer S_{j-1} released, V tile
        # j + V_STAGES - 2 into the one P_{j-2} V_{j-2} released (P_{j-1} V_{j-1} is issued in iteration j).
        for i in gl.static_range(K_STAGES):
            load_tile(k_desc, k_smem, k_bar, i, n_tiles, lo + i * BLOCK_N, 0, K_STAGES)
        for i in gl.static_range(V_STAGES - 1):
            load_tile(v_desc, v_smem, v_bar, i, n_tiles, lo + i * BLOCK_N, 0, V_STAGES)

        offs_mq = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, q_load))
        offs_dq = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, q_load))
        q_ptrs = Q + b * stride_qb + h * stride_qh + gl.expand_dims(offs_mq, 1) * stride_qm + gl.expand_dims(offs_dq, 0)
        q = gl.load(q_ptrs, mask=gl.expand_dims(offs_mq < Lq, 1), other=0.0)
        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], kv_layout)
        p_smem = gl.allocate_shared_memory(dtype, [2 if P_SMEM else 1, BLOCK_M if P_SMEM else 8, BLOCK_N], kv_layout)
        q_smem.store(q)
        fence_async_shared()
        gl.thread_barrier()  # every warp's q rows are in before either warpgroup's wgmma reads them

        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([BLOCK_M], gl.float32, row_s)

        if n_tiles > 0:
            mbarrier.wait(k_bar.index(0), 0)
            s_tok = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(0, deps=(s_tok,))
            p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, qk_scale, lo, valid, s_layout, BLOCK_N)
            p16 = _p_operand(p, p_smem, 0, dtype, p_layout, P_SMEM)
            for j in range(1, n_tiles):
                jk = j + K_STAGES - 1
                jv = j + V_STAGES - 2
                load_tile(k_desc, k_smem, k_bar, jk, n_tiles, lo + jk * BLOCK_N, 0, K_STAGES)
                load_tile(v_desc, v_smem, v_bar, jv, n_tiles, lo + jv * BLOCK_N, 0, V_STAGES)
                mbarrier.wait(k_bar.index(j % K_STAGES), (j // K_STAGES) & 1)
                s_tok = warpgroup_mma(
                    q_smem, k_smem.index(j % K_STAGES).permute((1, 0)), s_zero, use_acc=False, is_async=True
                )
                vp = (j - 1) % V_STAGES
                mbarrier.wait(v_bar.index(vp), ((j - 1) // V_STAGES) & 1)
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_l), 1)
                a_prev = p_smem.index((j - 1) % 2) if P_SMEM else p16
                pv_tok = warpgroup_mma(a_prev, v_smem.index(vp), acc, is_async=True)
                s = warpgroup_mma_wait(1, deps=(s_tok,))
                p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, qk_scale, lo + j * BLOCK_N, valid, s_layout, BLOCK_N)
                p16_next = _p_operand(p, p_smem, j, dtype, p_layout, P_SMEM)
                # l_i through the wait: the softmax above must run before it (under P @ V), not be sunk past it.
                acc, l_i = warpgroup_mma_wait(0, deps=(pv_tok, l_i))
                if not P_SMEM:
                    p16 = p16_next
            vl = (n_tiles - 1) % V_STAGES
            mbarrier.wait(v_bar.index(vl), ((n_tiles - 1) // V_STAGES) & 1)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_l), 1)
            a_last = p_smem.index((n_tiles - 1) % 2) if P_SMEM else p16
            pv_tok = warpgroup_mma(a_last, v_smem.index(vl), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=(pv_tok,))

        invalidate_ring(k_bar, K_STAGES)
        invalidate_ring(v_bar, V_STAGES)

        has_keys = l_i > 0.0
        l_safe = gl.where(has_keys, l_i, 1.0)
        out = acc / gl.expand_dims(gl.convert_layout(l_safe, row_l), 1)
        lse = gl.where(has_keys, (m_i + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_l)
        offs_ms = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_s)
        offs_d = gl.arange(0, HEAD_DIM, layout=col_l)
        o_ptrs = (
            Out + pid_s * stride_os + b * stride_ob + h * stride_oh
            + gl.expand_dims(offs_m, 1) * stride_om + gl.expand_dims(offs_d, 0)
        )  # fmt: skip
        gl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=gl.expand_dims(offs_m < Lq, 1))
        gl.store(LSE + pid_s * stride_ls + b * stride_lb + h * stride_lh + offs_ms, lse, mask=offs_ms < Lq)


def launch_ring_attention_hopper(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    valid_len: torch.Tensor,
    scale: float,
    splits: int = 1,
    variant: str = "gluon",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out `[B, Lq, N, d]` in q's dtype, natural-log LSE `[B, N, Lq]`), `splits` key splits merged after.
    Unchecked arguments (`hopper_bf16_available` first; `ring_attention._check_attention_args`)."""
    from .ring_attention import LOG2E, _ensure_tma_allocator

    form = VARIANTS[variant]
    B, Lq, H, _ = q.shape
    bufs = split_outputs(q, splits)
    if _is_traced((q, k_cache, valid_len)):  # shapes only (export, fake tensors): nothing to launch
        return bufs.out, bufs.lse
    _ensure_tma_allocator()  # the device-side descriptors' scratch
    grid = (-(-Lq // form.block_m), B * H, splits)
    # fmt: off
    _ring_attention_hopper_kernel[grid](
        q, k_cache, v_cache, bufs.o_buf, bufs.l_buf, valid_len,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *bufs.strides(),
        Lq, k_cache.shape[1], H, scale * LOG2E,
        HEAD_DIM=HEAD_DIM, BLOCK_M=form.block_m, BLOCK_N=form.block_n, SPLITS=splits, K_STAGES=form.k_stages,
        V_STAGES=form.v_stages, P_SMEM=form.p_smem, num_warps=form.block_m // 16,
    )
    # fmt: on
    return bufs.finish()
