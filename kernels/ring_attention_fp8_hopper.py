"""The FP8 ring attention for Hopper in Gluon: the MMAs of one key tile run under the softmax of the next.

Same operands and numbers as `ring_attention_fp8._ring_attention_fp8_kernel` on the fp8 shadow (q quantized
per row in the kernel, K and V^T per key tile by the pre-pass, P = 2^8 * exp2(s - m) in e4m3, each tile's
P @ V taken into fresh registers and added to the fp32 accumulator), but written in Gluon, Triton's
layout-explicit dialect, because the Triton kernel cannot express what FP8 attention at head dim 128 needs
on an H100/H200: at that size one key tile's softmax costs about as many cycles (MUFU exp2 and issue slots)
as its two fp8 wgmmas at full rate, and Triton waits for each wgmma before the code after it runs
(bench/results/NOTES.md, "Looked at and left"). Here the loop is FlashAttention-3's intra-warpgroup
pipeline (Shah et al. 2024, sec. 3.2):

    issue S_j = Q K_j^T (async)            tensor cores: S_j, then PV_{j-1}
    issue PV_{j-1} = P_{j-1} V_{j-1} (async)
    wait for S_j only                      PV_{j-1} still running
    softmax(S_j) -> P_j, alpha_j           CUDA cores, under PV_{j-1}
    wait for PV_{j-1}; acc = acc * alpha_{j-1} + PV_{j-1}

with K and V^T tiles brought in by TMA into rings of K_STAGES and V_STAGES buffers (one mbarrier each): at
the top of iteration j, K tile j + K_STAGES - 1 into the buffer S_{j-1} released and V^T tile
j + V_STAGES - 2 into the one PV_{j-2} released. Two 4-warp CTAs share an SM as with the Triton kernel,
so one CTA's softmax also runs under the other's MMAs.

Forms (`VARIANTS`, measured on an H100, bench/results/NOTES.md g1..g5-h100, TFLOP/s at kv 28080):

* P through shared memory (`gluon-psmem`, the default on sm_90): P is stored into one of two e4m3 slots
  and P @ V reads it from there. Two things that cost the register forms their speed go away: the
  fresh-register P @ V then fits beside the next tile's logits (249 registers, the softmax runs between
  the two waits), and the move of P from the logits' layout to wgmma's A layout (~250 instructions a
  tile, against 32 two-byte stores). 758 against the Triton kernel's 694 in the same run; Self-Forcing's
  FP8 block 5 272.8 against 286.1 ms, quality unchanged (latents 0.0235 against bf16 over 7 blocks).
* P in registers, fresh-register P @ V (`gluon`): ptxas waits for P @ V before the softmax (it does not
  fit), 622-654.
* P in registers, P @ V accumulated in the tensor cores (`gluon-inplace`): overlapped, 574-602, and the
  fp8 accumulator's error grows over a rollout (latents 0.061 over 7 blocks): not for streaming models.

Schedules of `gluon-psmem` (bench/results/NOTES.md, next100..next104-h100). The plain grid runs one CTA a
(query tile, batch x head, key split); at Self-Forcing's 888 programs on 264 resident CTAs (3.36 waves) the
grid rule splits the keys in two to fill the last wave, and a merge pass joins the halves. The persistent
kernel instead runs 264 CTAs: full waves of whole programs, then the partial last wave's key tiles cut
evenly over every CTA (stream-K, up to 4 parts a program, merged after; the merge reads only the parts a
row has), and `-stagger` starts each whole program at a key tile set by its query tile:

* `gluon-psmem-persistent-stagger` (the route's choice where the grid rule would split: a short grid):
  777 against 730 TFLOP/s at kv 28080 in one run, Self-Forcing's FP8 block 5 257.7 against 259.7 ms.
* `gluon-psmem-persistent` (not staggered): slower (721; in the model 169.0 against 159.1 ms of kernel):
  its CTAs, starting together, read the same key tiles at once.
* `gluon-psmem-stagger` (the plain grid staggered): slower too (692; 167.5 ms of kernel).

GPU only (Gluon has no CPU interpreter): `tests/kernels/test_fp8_attention_hopper.py` checks it
against the Triton kernel and the torch twin on CUDA; the Triton kernel stays the CPU-tested one and the
fallback for every other shape and device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashdreams.errors import InvalidArgumentError

from ._common import _is_traced
from ._gluon import (
    HAVE_GLUON,
    TensorDescriptor,
    fence_async_shared,
    gl,
    gluon,
    init_ring,
    invalidate_ring,
    key_range,
    load_tile,
    mbarrier,
    on_hopper,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from .attention_merge import SplitOutputs, split_outputs

HEAD_DIM = 128  # the one head dim this kernel is written for (fp8 wgmma K steps of 32; TMA rows of 128 bytes)
BLOCK_N = 128


@dataclass(frozen=True)
class HopperVariant:
    """One form of the kernel: K and V^T buffer counts, where P @ V accumulates, where P goes."""

    k_stages: int
    v_stages: int
    precise_pv: bool  # each tile's P @ V into fresh registers, added in fp32 (else the fp8 accumulator)
    p_smem: bool  # P through shared memory (else a register layout conversion)
    block_m: int = 64  # query rows a CTA; 128 = two consumer warpgroups sharing each K/V tile (8 warps)
    persistent: bool = False  # one CTA per resident slot, the last wave's work spread evenly (stream-K)
    ctas_per_sm: int = 2  # CTAs an SM holds at once (shared memory): the persistent grid's size per SM
    parts: int = 4  # a persistent form's output parts (merged after): the most runs a program is cut into
    stagger: bool = False  # programs (a persistent form's whole ones) start at key tiles set by their query tile


# What FD_FP8_ATTN_KERNEL names (kernels/ring_attention_fp8.py): shared memory per CTA must stay under ~113 KB
# for two CTAs an SM (q 8 KB, each K or V^T buffer 16 KB, P 8 KB a slot).
VARIANTS: dict[str, HopperVariant] = {
    "gluon": HopperVariant(3, 3, True, False),
    "gluon-inplace": HopperVariant(3, 3, False, False),
    "gluon-psmem": HopperVariant(3, 2, True, True),
    "gluon-psmem-k2": HopperVariant(2, 2, True, True),
    "gluon-psmem-m128": HopperVariant(3, 3, True, True, block_m=128, ctas_per_sm=1),  # 144 KB: one CTA an SM
    "gluon-psmem-persistent": HopperVariant(3, 2, True, True, persistent=True),
    "gluon-psmem-persistent-stagger": HopperVariant(3, 2, True, True, persistent=True, stagger=True),
    "gluon-psmem-stagger": HopperVariant(3, 2, True, True, stagger=True),
}


def hopper_fp8_available(q: torch.Tensor, block_n: int) -> bool:
    """Whether this kernel can serve q (`[B, Lq, N, d]`) against a shadow quantized in tiles of `block_n`."""
    return on_hopper(q) and q.shape[-1] == HEAD_DIM and block_n == BLOCK_N


if HAVE_GLUON:

    @gluon.jit
    def _p_operand(p, p_smem, j, p_layout: gl.constexpr, P_SMEM: gl.constexpr):
        """P (fp32, the logits' layout) as e4m3 wgmma A operand: in shared memory (slot j % 2: the previous
        slot is still being read by the P @ V in flight) or in registers (a layout conversion)."""
        if P_SMEM:
            slot = p_smem.index(j % 2)
            slot.store(p.to(gl.float8e4nv))
            fence_async_shared()
            gl.thread_barrier()  # every warp's rows are in before the warpgroup's wgmma reads them
            return slot
        else:
            return gl.convert_layout(p.to(gl.float8e4nv), p_layout)

    @gluon.jit
    def _softmax_tile(s, m_i, l_i, q_fac, kt, start, valid, s_layout: gl.constexpr, BLOCK_N: gl.constexpr):
        """One tile's logits s (raw fp8 products) -> (p fp32 = 2^8 exp2(logit - m_new), m_new, l_new,
        alpha = exp2(m_i - m_new)); keys >= valid masked where the tile crosses it."""
        if start + BLOCK_N > valid:
            cols = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            s = gl.where(gl.expand_dims(cols < valid, 0), s, float("-inf"))
        f = q_fac * kt
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * f)
        p = gl.exp2(s * gl.expand_dims(f, 1) - gl.expand_dims(m_new - 8.0, 1))
        alpha = gl.exp2(m_i - m_new)
        l_new = l_i * alpha + gl.sum(p, axis=1)
        return p, m_new, l_new, alpha

    @gluon.jit
    def _tile_offset(j, rot, n_tiles, ROTATE: gl.constexpr):
        """Which tile of a run (from its first) iteration j takes: (j + rot) mod n_tiles with ROTATE (for
        j + rot < 2 n_tiles; the loads ahead of the last tile are skipped whatever tile this names), else j, so
        that a kernel that does not rotate compiles exactly as before the rotation existed."""
        if ROTATE:
            t = j + rot
            return gl.where(t >= n_tiles, t - n_tiles, t)
        else:
            return j

    @gluon.jit
    def _attend_run(
        Q, k_desc, v_desc, KT, VT, Out, LSE,
        k_smem, v_smem, k_bar, v_bar, p_smem, q_smem,
        pid_m, bh, part, lo, n_tiles, rot, valid, n_parts,
        stride_qb, stride_qm, stride_qh,
        stride_os, stride_ob, stride_om, stride_oh,
        stride_ls, stride_lb, stride_lh,
        Lq, S, H, N_TILES, qk_fac,
        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, K_STAGES: gl.constexpr,
        V_STAGES: gl.constexpr, PRECISE_PV: gl.constexpr, P_SMEM: gl.constexpr, NUM_WARPS: gl.constexpr,
        PARTS: gl.constexpr, ROTATE: gl.constexpr,
    ):  # fmt: skip
        """One run of key tiles of one (query tile `pid_m`, batch x head `bh`): `n_tiles` tiles from key `lo`
        (keys >= valid masked), taken from the run's tile `rot` on, wrapping around (the order changes only the
        rounding of P and which tiles the CTAs running at once read), its normalised output rows and natural-log
        LSE written as part `part` of PARTS; the parts from `n_parts` on get LSE -inf for these rows (no run
        writes them: nothing to merge there).
        The rings' barriers are armed here and invalidated at the end, so that runs can follow one another in
        a persistent CTA, each counting its barrier phases from its first tile."""
        b = bh // H
        h = bh % H

        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, BLOCK_N, 32]
        )
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[NUM_WARPS, 1], instr_shape=[16, HEAD_DIM, 32]
        )
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
        q_load: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NUM_WARPS, 1], [1, 0])

        # Every warp is past the previous run's last reads of the buffers and waits on the barriers.
        gl.thread_barrier()
        init_ring(k_bar, K_STAGES)
        init_ring(v_bar, V_STAGES)
        fence_async_shared()
        gl.thread_barrier()
        # The key tiles' loads go out first, so that they are in flight while q is quantized. K tile
        # j + K_STAGES - 1 is loaded at the top of iteration j into the buffer S_{j-1} released; V tile
        # j + V_STAGES - 2 into the one P @ V of tile j - 2 released (the P @ V of tile j - 1 is issued in j).
        k_row0 = bh * S
        v_row0 = bh * HEAD_DIM
        for i in gl.static_range(K_STAGES):
            k_row = k_row0 + lo + _tile_offset(i, rot, n_tiles, ROTATE) * BLOCK_N
            load_tile(k_desc, k_smem, k_bar, i, n_tiles, k_row, 0, K_STAGES)
        for i in gl.static_range(V_STAGES - 1):
            v_col = lo + _tile_offset(i, rot, n_tiles, ROTATE) * BLOCK_N
            load_tile(v_desc, v_smem, v_bar, i, n_tiles, v_row0, v_col, V_STAGES)

        # q: per-row e4m3 into shared memory (wgmma's A); the row scale joins the logit factor.
        offs_mq = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, q_load))
        offs_dq = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, q_load))
        q_ptrs = Q + b * stride_qb + h * stride_qh + gl.expand_dims(offs_mq, 1) * stride_qm + gl.expand_dims(offs_dq, 0)
        q = gl.load(q_ptrs, mask=gl.expand_dims(offs_mq < Lq, 1), other=0.0).to(gl.float32)
        q_amax = gl.maximum(gl.max(gl.abs(q), axis=1), 1e-16)
        q8 = (q * gl.expand_dims(gl.div_rn(gl.full_like(q_amax, 448.0), q_amax), 1)).to(gl.float8e4nv)
        q_smem.store(q8)
        fence_async_shared()
        q_fac = gl.convert_layout(q_amax * qk_fac, row_s)

        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([BLOCK_M], gl.float32, row_s)
        u_i = gl.to_tensor(1.0)  # the V scale acc is held in (acc * u_i is the numerator)
        KT_b = KT + bh * N_TILES
        VT_b = VT + bh * N_TILES
        tile0 = lo // BLOCK_N

        if n_tiles > 0:
            # Tile 0: its logits alone (nothing to overlap yet).
            mbarrier.wait(k_bar.index(0), 0)
            s_tok = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(0, deps=(s_tok,))
            t = _tile_offset(0, rot, n_tiles, ROTATE)
            kt = gl.load(KT_b + tile0 + t)
            p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, q_fac, kt, lo + t * BLOCK_N, valid, s_layout, BLOCK_N)
            p8 = _p_operand(p, p_smem, 0, p_layout, P_SMEM)
            u_i = gl.load(VT_b + tile0 + t)
            alpha_o = gl.zeros([BLOCK_M], gl.float32, row_o)  # acc is zero: any factor
            for j in range(1, n_tiles):
                jk = j + K_STAGES - 1
                jv = j + V_STAGES - 2
                k_row = k_row0 + lo + _tile_offset(jk, rot, n_tiles, ROTATE) * BLOCK_N
                load_tile(k_desc, k_smem, k_bar, jk, n_tiles, k_row, 0, K_STAGES)
                v_col = lo + _tile_offset(jv, rot, n_tiles, ROTATE) * BLOCK_N
                load_tile(v_desc, v_smem, v_bar, jv, n_tiles, v_row0, v_col, V_STAGES)
                mbarrier.wait(k_bar.index(j % K_STAGES), (j // K_STAGES) & 1)
                s_tok = warpgroup_mma(
                    q_smem, k_smem.index(j % K_STAGES).permute((1, 0)), s_zero, use_acc=False, is_async=True
                )
                vp = (j - 1) % V_STAGES
                mbarrier.wait(v_bar.index(vp), ((j - 1) // V_STAGES) & 1)
                a_prev = p_smem.index((j - 1) % 2) if P_SMEM else p8
                if PRECISE_PV:
                    pv_tok = warpgroup_mma(a_prev, v_smem.index(vp).permute((1, 0)), acc, use_acc=False, is_async=True)
                else:
                    acc = acc * gl.expand_dims(alpha_o, 1)
                    pv_tok = warpgroup_mma(a_prev, v_smem.index(vp).permute((1, 0)), acc, is_async=True)
                s = warpgroup_mma_wait(1, deps=(s_tok,))
                t = _tile_offset(j, rot, n_tiles, ROTATE)
                kt = gl.load(KT_b + tile0 + t)
                u_new = gl.load(VT_b + tile0 + t)
                p, m_i, l_i, alpha = _softmax_tile(s, m_i, l_i, q_fac, kt, lo + t * BLOCK_N, valid, s_layout, BLOCK_N)
                p8_next = _p_operand(p, p_smem, j, p_layout, P_SMEM)
                # l_i through the wait: the softmax above must run before it (under PV), not be sunk past it.
                pv, l_i = warpgroup_mma_wait(0, deps=(pv_tok, l_i))
                if PRECISE_PV:
                    acc = acc * gl.expand_dims(alpha_o, 1) + pv
                else:
                    acc = pv
                alpha_o = gl.convert_layout(alpha * gl.div_rn(u_i, u_new), row_o)
                u_i = u_new
                if not P_SMEM:
                    p8 = p8_next
            # The last tile's P @ V.
            vl = (n_tiles - 1) % V_STAGES
            mbarrier.wait(v_bar.index(vl), ((n_tiles - 1) // V_STAGES) & 1)
            a_last = p_smem.index((n_tiles - 1) % 2) if P_SMEM else p8
            if PRECISE_PV:
                pv_tok = warpgroup_mma(a_last, v_smem.index(vl).permute((1, 0)), acc, use_acc=False, is_async=True)
                pv = warpgroup_mma_wait(0, deps=(pv_tok,))
                acc = acc * gl.expand_dims(alpha_o, 1) + pv
            else:
                acc = acc * gl.expand_dims(alpha_o, 1)
                pv_tok = warpgroup_mma(a_last, v_smem.index(vl).permute((1, 0)), acc, is_async=True)
                acc = warpgroup_mma_wait(0, deps=(pv_tok,))

        gl.thread_barrier()  # every warp is past its last wait before the barriers go
        invalidate_ring(k_bar, K_STAGES)
        invalidate_ring(v_bar, V_STAGES)

        has_keys = l_i > 0.0
        l_safe = gl.where(has_keys, l_i, 1.0)
        out = acc * gl.expand_dims(gl.convert_layout(gl.div_rn(u_i + gl.zeros_like(l_safe), l_safe), row_o), 1)
        lse = gl.where(has_keys, (m_i + gl.log2(l_safe) - 8.0) * 0.6931471805599453, float("-inf"))
        offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_o)
        offs_d = gl.arange(0, HEAD_DIM, layout=col_o)
        o_ptrs = (
            Out + part * stride_os + b * stride_ob + h * stride_oh
            + gl.expand_dims(offs_m, 1) * stride_om + gl.expand_dims(offs_d, 0)
        )  # fmt: skip
        gl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=gl.expand_dims(offs_m < Lq, 1))
        offs_ml = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_s)
        lse_ptrs = LSE + b * stride_lb + h * stride_lh + offs_ml
        gl.store(lse_ptrs + part * stride_ls, lse, mask=offs_ml < Lq)
        none = gl.full_like(lse, float("-inf"))
        for unused in gl.static_range(1, PARTS):
            gl.store(lse_ptrs + unused * stride_ls, none, mask=(offs_ml < Lq) & (unused >= n_parts))

    @gluon.jit
    def _buffers(
        k_desc, v_desc, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        K_STAGES: gl.constexpr, V_STAGES: gl.constexpr, P_SMEM: gl.constexpr,
    ):  # fmt: skip
        """A CTA's shared memory: the K and V^T rings and their barriers (armed by each run), P's two slots
        where it goes through shared memory (else an unused 1 KB placeholder), q's tile."""
        q_smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
        k_smem = gl.allocate_shared_memory(gl.float8e4nv, [K_STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(gl.float8e4nv, [V_STAGES, HEAD_DIM, BLOCK_N], v_desc.layout)
        k_bar = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
        v_bar = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
        p_smem = gl.allocate_shared_memory(
            gl.float8e4nv, [2 if P_SMEM else 1, BLOCK_M if P_SMEM else 8, BLOCK_N], q_smem_layout
        )
        q_smem = gl.allocate_shared_memory(gl.float8e4nv, [BLOCK_M, HEAD_DIM], q_smem_layout)
        return k_smem, v_smem, k_bar, v_bar, p_smem, q_smem

    @gluon.jit
    def _ring_attention_fp8_hopper_kernel(
        Q, k_desc, v_desc, KT, VT, Out, LSE, VALID,
        stride_qb, stride_qm, stride_qh,
        stride_os, stride_ob, stride_om, stride_oh,
        stride_ls, stride_lb, stride_lh,
        Lq, S, H, N_TILES, qk_fac,
        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, SPLITS: gl.constexpr,
        K_STAGES: gl.constexpr, V_STAGES: gl.constexpr, PRECISE_PV: gl.constexpr, P_SMEM: gl.constexpr,
        STAGGER: gl.constexpr, num_warps: gl.constexpr,
    ):  # fmt: skip
        """One (query tile, batch x head, key split): normalised output rows and their natural-log LSE. STAGGER:
        the query tile sets the key tile its run starts from (wrapping around), as in the persistent kernel."""
        valid, lo, n_tiles = key_range(VALID, S, gl.program_id(2), BLOCK_N, SPLITS)
        rot = (gl.program_id(0) * n_tiles) // gl.num_programs(0) if STAGGER else 0
        k_smem, v_smem, k_bar, v_bar, p_smem, q_smem = _buffers(
            k_desc, v_desc, HEAD_DIM, BLOCK_M, BLOCK_N, K_STAGES, V_STAGES, P_SMEM
        )
        # fmt: off
        _attend_run(
            Q, k_desc, v_desc, KT, VT, Out, LSE, k_smem, v_smem, k_bar, v_bar, p_smem, q_smem,
            gl.program_id(0), gl.program_id(1), gl.program_id(2), lo, n_tiles, rot, valid, SPLITS,
            stride_qb, stride_qm, stride_qh, stride_os, stride_ob, stride_om, stride_oh,
            stride_ls, stride_lb, stride_lh, Lq, S, H, N_TILES, qk_fac,
            HEAD_DIM, BLOCK_M, BLOCK_N, K_STAGES, V_STAGES, PRECISE_PV, P_SMEM, num_warps, 1, STAGGER,
        )
        # fmt: on

    @gluon.jit
    def _ring_attention_fp8_hopper_persistent_kernel(
        Q, k_desc, v_desc, KT, VT, Out, LSE, VALID,
        stride_qb, stride_qm, stride_qh,
        stride_os, stride_ob, stride_om, stride_oh,
        stride_ls, stride_lb, stride_lh,
        Lq, S, H, BH, N_TILES, qk_fac,
        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        K_STAGES: gl.constexpr, V_STAGES: gl.constexpr, PRECISE_PV: gl.constexpr, P_SMEM: gl.constexpr,
        PARTS: gl.constexpr, STAGGER: gl.constexpr, num_warps: gl.constexpr,
    ):  # fmt: skip
        """A grid of as many CTAs as can be resident at once, over the same work as the kernel above (see
        `persistent_runs`, its twin): whole programs (query tile x batch-head, every key tile) in full waves
        (with STAGGER each starting at a key tile set by its query tile: the CTAs of a wave start together, and
        unstaggered they ask L2 for the same tiles at once, which measured slower than the plain grid), then the
        partial last wave's key tiles cut evenly over all CTAs (stream-K), so that no CTA idles through it. A
        cut program's runs go to parts 0, 1, ... (at most PARTS: a CTA's share of the last wave is at least a
        (PARTS - 1)-th of a program's tiles); its first run clears the LSEs of the parts no run writes. Programs
        are numbered query tile fastest: the CTAs of a wave share heads."""
        G = gl.num_programs(0)
        pid = gl.program_id(0)
        valid = gl.maximum(gl.minimum(gl.load(VALID).to(gl.int32), S), 0)
        key_tiles = gl.cdiv(valid, BLOCK_N)
        tiles = gl.maximum(key_tiles, 1)  # with no keys each program still runs once: zeros, LSE -inf
        n_m = gl.cdiv(Lq, BLOCK_M)
        programs = n_m * BH
        n_whole = programs // G  # full waves of whole programs
        work = (programs - n_whole * G) * tiles
        share = gl.maximum(gl.cdiv(work, G), gl.cdiv(tiles, PARTS - 1))
        it = gl.minimum(pid * share, work)
        end = gl.minimum(it + share, work)
        k_smem, v_smem, k_bar, v_bar, p_smem, q_smem = _buffers(
            k_desc, v_desc, HEAD_DIM, BLOCK_M, BLOCK_N, K_STAGES, V_STAGES, P_SMEM
        )
        i = 0
        while (i < n_whole) | (it < end):
            if i < n_whole:
                prog = pid + i * G
                first = 0
                stop = tiles
                part = 0
                n_parts = 1
                i += 1
                # STAGGER: a whole program's run starts at a key tile set by its query tile, so that the CTAs of
                # a wave, which start together, do not all ask L2 for the same tiles at once
                rot = ((prog % n_m) * tiles) // n_m if STAGGER else 0
            else:
                p = it // tiles
                prog = n_whole * G + p
                first = it - p * tiles
                stop = gl.minimum(end - p * tiles, tiles)
                c0 = (p * tiles) // share  # the CTA holding the program's first tile
                part = pid - c0
                n_parts = (p * tiles + tiles - 1) // share - c0 + 1
                it = p * tiles + stop
                rot = 0
            n_run = gl.maximum(gl.minimum(stop, key_tiles) - first, 0)
            # fmt: off
            _attend_run(
                Q, k_desc, v_desc, KT, VT, Out, LSE, k_smem, v_smem, k_bar, v_bar, p_smem, q_smem,
                prog % n_m, prog // n_m, part, first * BLOCK_N, n_run, rot, valid, gl.where(part == 0, n_parts, PARTS),
                stride_qb, stride_qm, stride_qh, stride_os, stride_ob, stride_om, stride_oh,
                stride_ls, stride_lb, stride_lh, Lq, S, H, N_TILES, qk_fac,
                HEAD_DIM, BLOCK_M, BLOCK_N, K_STAGES, V_STAGES, PRECISE_PV, P_SMEM, num_warps, PARTS, STAGGER,
            )
            # fmt: on


def kv_descriptors(k8: torch.Tensor, v8t: torch.Tensor) -> tuple:
    """TMA descriptors of an fp8 shadow: K `[B, N, S, 128]` as rows of 128 bytes, V^T `[B, N, 128, S_PAD]`
    as 128-row slabs; a tile past the end of the tensor reads zeros, one past valid is masked in the kernel."""
    B, H, S, D = k8.shape
    s_pad = v8t.shape[3]
    k_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], gl.float8e4nv)
    v_layout = gl.NVMMASharedLayout.get_default_for([D, BLOCK_N], gl.float8e4nv)
    k2 = k8.view(B * H * S, D)
    v2 = v8t.view(B * H * D, s_pad)
    k_desc = TensorDescriptor(k2, list(k2.shape), list(k2.stride()), [BLOCK_N, D], k_layout)
    v_desc = TensorDescriptor(v2, list(v2.shape), list(v2.stride()), [D, BLOCK_N], v_layout)
    return k_desc, v_desc


def persistent_runs(programs: int, tiles: int, ctas: int, parts: int) -> list[list[tuple[int, int, int, int]]]:
    """What each CTA of the persistent kernel runs, in order: (program, first key tile, end key tile, part)
    runs of a ring of `tiles` key tiles (at least 1) shared by `programs` programs on `ctas` CTAs, a program
    in at most `parts` runs. The kernel computes the same on the device (it reads the ring length there);
    this twin is what the tests check it against."""
    whole = programs // ctas
    work = (programs - whole * ctas) * tiles
    share = max(-(-work // ctas), -(-tiles // (parts - 1)))
    runs = []
    for c in range(ctas):
        mine = [(c + i * ctas, 0, tiles, 0) for i in range(whole)]
        it = min(c * share, work)
        end = min(it + share, work)
        while it < end:
            p = it // tiles
            first, stop = it - p * tiles, min(end - p * tiles, tiles)
            mine.append((whole * ctas + p, first, stop, c - (p * tiles) // share))
            it = p * tiles + stop
        runs.append(mine)
    return runs


def persistent_ctas(q: torch.Tensor, variant: HopperVariant) -> int:
    """The persistent grid: every CTA the GPU holds at once (`ctas_per_sm` on each SM), at most one a program."""
    B, Lq, H, _ = q.shape
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    return min(variant.ctas_per_sm * sms, -(-Lq // variant.block_m) * B * H)


def launch_hopper(
    q: torch.Tensor,
    kv,
    valid_len: torch.Tensor,
    qk_fac: float,
    bufs: SplitOutputs,
    variant: HopperVariant,
    ctas: int | None = None,
) -> None:
    """On the fp8 shadow `kv` (`ring_attention_fp8.Fp8KV`), write each key split's output rows and LSE into
    `bufs` (`attention_merge.split_outputs`; `parts` parts for a persistent variant). Unchecked arguments
    (`hopper_fp8_available` first). `ctas`: the persistent grid's size instead of `persistent_ctas` (tests
    make small grids cut programs into runs at small shapes).

    `precise_pv=False` accumulates P @ V in the tensor cores' fp8 accumulator (the Triton kernel's
    `precise_pv` knob): at 64-row tiles the fresh-register form needs more registers than a thread has
    (ptxas then waits for P @ V before the softmax, undoing the overlap), the in-place form does not, but
    its error grows over a rollout (see the module docstring)."""
    B, Lq, H, _ = q.shape
    k_desc, v_desc = kv_descriptors(kv.k8, kv.v8t)
    common = dict(
        HEAD_DIM=HEAD_DIM, BLOCK_M=variant.block_m, BLOCK_N=BLOCK_N, K_STAGES=variant.k_stages,
        V_STAGES=variant.v_stages, PRECISE_PV=variant.precise_pv, P_SMEM=variant.p_smem,
        num_warps=variant.block_m // 16,
    )  # fmt: skip
    head = (q, k_desc, v_desc, kv.kt, kv.vt, bufs.o_buf, bufs.l_buf, valid_len, q.stride(0), q.stride(1), q.stride(2))
    if variant.persistent:
        if bufs.splits != variant.parts:
            raise InvalidArgumentError(f"this persistent form writes {variant.parts} parts, found {bufs.splits}")
        grid = (ctas or persistent_ctas(q, variant),)
        _ring_attention_fp8_hopper_persistent_kernel[grid](
            *head,
            *bufs.strides(),
            Lq,
            kv.k8.shape[2],
            H,
            B * H,
            kv.kt.shape[2],
            qk_fac,
            PARTS=variant.parts,
            STAGGER=variant.stagger,
            **common,
        )
    else:
        grid = (-(-Lq // variant.block_m), B * H, bufs.splits)
        _ring_attention_fp8_hopper_kernel[grid](
            *head,
            *bufs.strides(),
            Lq,
            kv.k8.shape[2],
            H,
            kv.kt.shape[2],
            qk_fac,
            SPLITS=bufs.splits,
            STAGGER=variant.stagger,
            **common,
        )


def launch_ring_attention_fp8_hopper(
    q: torch.Tensor,
    kv,
    valid_len: torch.Tensor,
    qk_fac: float,
    splits: int,
    variant: str = "gluon",
    rows_fp8: bool = False,
    ctas: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out `[B, Lq, N, d]` in q's dtype, natural-log LSE `[B, N, Lq]`) on an fp8 shadow `kv`
    (`ring_attention_fp8.Fp8KV`), `splits` key splits merged after (a persistent form cuts its own parts);
    qk_fac = softmax scale * log2(e) / 448. `rows_fp8`: the output quantized per row for an FP8 linear instead
    (`SplitOutputs.finish_fp8_rows`). `ctas`: see `launch_hopper`."""
    form = VARIANTS[variant]
    bufs = split_outputs(q, form.parts if form.persistent else splits)
    if not _is_traced((q, kv.k8, valid_len)):  # shapes only (export, fake tensors): nothing to launch or describe
        launch_hopper(q, kv, valid_len, qk_fac, bufs, form, ctas)
    return bufs.finish_fp8_rows() if rows_fp8 else bufs.finish()
