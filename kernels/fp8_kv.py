"""The K/V pre-pass of the FP8 ring attention: fp8 copies of a bf16 ring's keys and
values in the layout fp8 wgmma reads, kept up to date as an fp8 shadow of the ring.

Why K and V are quantized by a pre-pass, not inside the attention kernel: each key tile is read by every
query tile of its head (Lq / BLOCK_M = 37 programs at Self-Forcing's block), so in-kernel quantization
would redo the amax / scale / convert / shared-memory round trip 37 times, in the very instruction slots
fp8 attention is short of (at d 128 a 128x128 tile's fp8 wgmma time is about what 8 warps need to issue
its softmax alone). The pre-pass (`quantize_kv_fp8`) reads the valid rows of the bf16 ring once and writes
transient fp8 copies in the layout fp8 wgmma wants (both operands K-major: K as `[B, N, S, D]`, V
transposed as `[B, N, D, S]`); the ring itself stays bf16 and unchanged. It moves ~2.5 bytes per K/V
element (~0.1 ms per layer at kv 28080, against ~1 ms of attention; 0.05 ms at kv 4680, where the kernel
itself takes only ~0.3 ms). Tiles are aligned to absolute ring rows, so an fp8 shadow of the ring
(`empty_fp8_kv`) needs only the tiles a block writes re-quantized (`update_fp8_kv`, one pass over the
block's own rows), and `ring_attention_fp8.ring_attention_fp8_prequantized` then attends with no pass per
call: 5 forwards x 30 layers of a Self-Forcing block read the ring's history once, not 150 times.

K and V get one scale per key tile (`ring_attention_fp8`'s docstring says why that costs no accuracy).
Its roundings are the kernels' shared ones (`_rounding.py`: why the CPU tests round by hand, `EMULATE`).
The torch twins at the end (`round_e4m3`, `quantize_rows_e4m3`, `quantize_tiles_e4m3`) are what the
kernels compute.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from flashdreams.errors import InvalidArgumentError

from ._common import INDEX_DTYPES, check_tensor, interpreted, launch, next_pow2, register_op, tl, triton
from ._rounding import to_e4m3

E4M3_MAX = 448.0
# An all-zero row or tile gets this amax (its values quantize to exactly 0). Not much smaller: when a
# zero V tile becomes the accumulator's unit, acc (<= 448^2 * S ~ 1e10) grows by u_prev / u_zero
# (<~ 1e20 for tile maxima up to 1e4), which must stay finite in fp32.
AMAX_FLOOR = 1e-16


def fp8_d_pad(d: int) -> int:
    return next_pow2(d, 32)


# ----------------------------------------------------------------------------- K/V pre-pass


class Fp8KV(NamedTuple):
    """The fp8 operands of one layer's ring, in key tiles of `block_n` rows: rows [0, valid_len)
    are meaningful.

    k8 `[B, N, S, D]` e4m3 (D = head dim padded to a power of two >= 32, padding zero) and
    v8t `[B, N, D, S_pad]` e4m3 (V transposed: keys contiguous; S_pad a multiple of 16); kt / vt
    `[B, N, ceil(S / block_n)]` fp32 are the tiles' scales: row n of K is kt[n // block_n] * k8[n],
    of V vt[n // block_n] * v8t[:, n]. v8t / vt are placeholders when only K was quantized (the
    bf16-PV variant).
    """

    k8: torch.Tensor
    kt: torch.Tensor
    v8t: torch.Tensor
    vt: torch.Tensor
    block_n: int


@triton.jit
def _quantize_tile(x, EMULATE: tl.constexpr):
    """One-scale e4m3 quantization of an fp32 tile: (x8, scale) with x ~= scale * x8."""
    amax = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), 1e-16)
    one = amax * 0.0 + 1.0
    x8 = to_e4m3(x * tl.math.div_rn(one * 448.0, amax), EMULATE)
    return x8, tl.math.div_rn(amax, one * 448.0)


@triton.jit
def _quantize_kv_kernel(
    K, V, K8, KT, V8T, VT, VALID, ROWS,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    S, S_PAD, H, N_TILES,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_R: tl.constexpr, QUANT_V: tl.constexpr,
    ROW_RANGE: tl.constexpr, SPLIT_KV: tl.constexpr, PAD_V_STORE: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    """One key tile (BLOCK_R rows) of one (batch, head): K to k8 and its scale, V (transposed) to
    v8t and its scale. With ROW_RANGE (the number of row ranges, 1 or 2) only tiles overlapping ring rows
    [ROWS[0], ROWS[1]) (or [ROWS[2], ROWS[3])) are done. With SPLIT_KV the grid's third axis says which
    of K (0) and V (1) this program does, instead of one program doing both in turn."""
    pid_r = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    valid = tl.load(VALID).to(tl.int32)
    valid = tl.maximum(tl.minimum(valid, S), 0)
    r0 = pid_r * BLOCK_R
    todo = r0 < valid
    if ROW_RANGE != 0:
        hit = (r0 < tl.load(ROWS + 1).to(tl.int32)) & (r0 + BLOCK_R > tl.load(ROWS).to(tl.int32))
        if ROW_RANGE == 2:
            hit = hit | ((r0 < tl.load(ROWS + 3).to(tl.int32)) & (r0 + BLOCK_R > tl.load(ROWS + 2).to(tl.int32)))
        todo = todo & hit
    if todo:
        rows = r0 + tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, D_PAD)
        ok = rows < valid
        # PAD_V_STORE: V's transposed store is masked by the padded ring length, not by valid: a mask that varies along
        # the store's contiguous axis at an unknown point makes Triton store byte by byte (64 single-byte
        # stores a thread, each warp's touching 32 lines: the pre-pass ran at ~0.76 TB/s, next42-h100);
        # S_PAD is a multiple of 16, so this one keeps 16-byte stores. Columns in [valid, tile end) get
        # the zeros the masked load gave: never read, since the attention masks keys >= valid and the
        # write that makes them valid re-quantizes their tile.
        in_pad = (rows < S_PAD) if PAD_V_STORE else ok
        ld_mask = ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        k_ptrs = K + b * stride_kb + h * stride_kh + rows[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = V + b * stride_vb + h * stride_vh + rows[:, None] * stride_vn + offs_d[None, :]
        k8_ptrs = K8 + bh * S * D_PAD + rows[:, None] * D_PAD + offs_d[None, :]
        v8t_ptrs = V8T + bh * D_PAD * S_PAD + offs_d[:, None] * S_PAD + rows[None, :]
        if SPLIT_KV:
            if tl.program_id(2) == 0:
                _quantize_k_tile(
                    tl.load(k_ptrs, mask=ld_mask, other=0.0), k8_ptrs, KT + bh * N_TILES + pid_r, ok, EMULATE
                )
            else:
                _quantize_vt_tile(
                    tl.load(v_ptrs, mask=ld_mask, other=0.0), v8t_ptrs, VT + bh * N_TILES + pid_r, in_pad, EMULATE
                )
        else:
            # Both loads are issued before either reduction, so the two tiles' latencies overlap.
            k = tl.load(k_ptrs, mask=ld_mask, other=0.0)
            if QUANT_V:
                v = tl.load(v_ptrs, mask=ld_mask, other=0.0)
            _quantize_k_tile(k, k8_ptrs, KT + bh * N_TILES + pid_r, ok, EMULATE)
            if QUANT_V:
                _quantize_vt_tile(v, v8t_ptrs, VT + bh * N_TILES + pid_r, in_pad, EMULATE)


@triton.jit
def _quantize_k_tile(k, k8_ptrs, kt_ptr, ok, EMULATE: tl.constexpr):
    k8, kt = _quantize_tile(k.to(tl.float32), EMULATE)
    tl.store(k8_ptrs, k8, mask=ok[:, None])
    tl.store(kt_ptr, kt)


@triton.jit
def _quantize_vt_tile(v, v8t_ptrs, vt_ptr, key_mask, EMULATE: tl.constexpr):
    """V's tile quantized and stored transposed (keys contiguous, as fp8 wgmma reads it), the keys where
    key_mask holds."""
    v8, vt = _quantize_tile(v.to(tl.float32), EMULATE)
    tl.store(v8t_ptrs, tl.trans(v8), mask=key_mask[None, :])
    tl.store(vt_ptr, vt)


# Warps of the pre-pass per (BLOCK_R x D_PAD) tile; None: 4 up to 8192 elements, else 8. The GPU
# suite's attention part times 4 against 8 at 128 x 128 (bench/attention_bench.py).
PREPASS_WARPS: int | None = None


# One program per (tile, K or V) instead of one per tile doing K then V: twice the programs, each half the
# serial work. The pre-pass ran at ~0.76 TB/s (0.057 ms for Self-Forcing's 4680 written rows x 12 heads on
# the H100, next42-h100; LingBot's 200 calls 39.6 ms a block there): few programs (444 at Self-Forcing's
# block, 3.4 an SM), each a chain of two loads, reductions and stores. Split, in one run (next44-h100):
# the shadow update 0.053-0.054 against 0.057-0.058 ms, the whole pre-pass at kv 32760 0.267 against
# 0.324 ms. The attention bench times both forms.
PREPASS_SPLIT_KV = True

# V's transposed store masked by the padded ring length (vectorized) instead of by valid (byte stores);
# see `_quantize_kv_kernel`. False is the form before, kept for the attention bench's same-run ratio.
PREPASS_PAD_V_STORE = True


def _prepass_warps(block_n: int, d_pad: int) -> int:
    if PREPASS_WARPS is not None:
        return PREPASS_WARPS
    return 4 if block_n * d_pad <= 8192 else 8


def fp8_kv_shapes(B: int, S: int, H: int, d: int, block_n: int) -> dict[str, tuple[int, ...]]:
    """Shapes of an fp8 shadow's four tensors (`Fp8KV` fields k8, kt, v8t, vt) for `[B, S, N, d]` caches:
    what a model declares as session state to keep one per layer."""
    d_pad, s_pad, n_tiles = fp8_d_pad(d), -(-S // 16) * 16, -(-S // block_n)
    return {"k8": (B, H, S, d_pad), "kt": (B, H, n_tiles), "v8t": (B, H, d_pad, s_pad), "vt": (B, H, n_tiles)}


def empty_fp8_kv(k_cache: torch.Tensor, block_n: int, quant_v: bool = True) -> Fp8KV:
    """Uninitialised fp8 operands for `[B, S, N, d]` caches in key tiles of `block_n` rows: an fp8
    shadow of a ring that `quantize_kv_fp8_into` keeps up to date as rows are written."""
    shapes = fp8_kv_shapes(*k_cache.shape, block_n)
    dev = k_cache.device
    k8 = torch.empty(shapes["k8"], dtype=torch.float8_e4m3fn, device=dev)
    kt = torch.empty(shapes["kt"], dtype=torch.float32, device=dev)
    if quant_v:
        v8t = torch.empty(shapes["v8t"], dtype=torch.float8_e4m3fn, device=dev)
        vt = torch.empty(shapes["vt"], dtype=torch.float32, device=dev)
    else:  # never read
        v8t = torch.zeros((16,), dtype=torch.float8_e4m3fn, device=dev)
        vt = torch.zeros((4,), dtype=torch.float32, device=dev)
    return Fp8KV(k8, kt, v8t, vt, block_n)  # the pre-pass writes a tile's padding columns too


def _launch_quantize(
    k_cache: torch.Tensor, v_cache: torch.Tensor, valid_len: torch.Tensor, kv: Fp8KV, rows: torch.Tensor | None
) -> None:
    B, S, H, d = k_cache.shape
    d_pad = kv.k8.shape[3]
    quant_v = kv.v8t.dim() == 4
    s_pad = kv.v8t.shape[3] if quant_v else -(-S // 16) * 16
    n_tiles = kv.kt.shape[2]
    ranges = 0 if rows is None else rows.numel() // 2
    split = PREPASS_SPLIT_KV and quant_v
    # fmt: off
    launch(
        _quantize_kv_kernel, (n_tiles, B * H, 2 if split else 1),
        k_cache, v_cache, kv.k8, kv.kt, kv.v8t, kv.vt, valid_len, rows if rows is not None else valid_len,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        S, s_pad, H, n_tiles,
        HEAD_DIM=d, D_PAD=d_pad, BLOCK_R=kv.block_n, QUANT_V=quant_v, ROW_RANGE=ranges, SPLIT_KV=split,
        PAD_V_STORE=PREPASS_PAD_V_STORE, EMULATE=interpreted(), num_warps=_prepass_warps(kv.block_n, d_pad),
    )
    # fmt: on


def quantize_kv_fp8(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    valid_len: torch.Tensor,
    block_n: int,
    quant_v: bool = True,
) -> Fp8KV:
    """fp8 copies of ring rows [0, valid_len) of `[B, S, N, d]` K/V caches, in key tiles of `block_n`
    rows: the key tile of the attention kernel that will read them. Past valid_len, K's rows are
    untouched and V's (transposed) hold zeros up to the end of valid_len's tile."""
    kv = empty_fp8_kv(k_cache, block_n, quant_v)
    _launch_quantize(k_cache, v_cache, valid_len, kv, None)
    return kv


def quantize_kv_fp8_into(
    kv: Fp8KV, k_cache: torch.Tensor, v_cache: torch.Tensor, valid_len: torch.Tensor, rows: torch.Tensor
) -> None:
    """Re-quantize, in place, the key tiles of `kv` that overlap ring rows [rows[0], rows[1]) (a
    2-element int device tensor), or either of [rows[0], rows[1]) and [rows[2], rows[3]) (4 elements:
    a block whose frame slots wrap around the ring's window writes two runs of rows); tiles past
    valid_len are left alone. After a block writes its rows into the bf16 ring, only the tiles holding
    them change, so an fp8 shadow of the ring costs one pass over the block's rows (plus the tiles it
    shares with its neighbours) per write, not one over the whole ring per attention call. Tiles are
    aligned to absolute ring rows."""
    _launch_quantize(k_cache, v_cache, valid_len, kv, rows)


def _quantize_kv_fp8_into_op(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    valid_len: torch.Tensor,
    rows: torch.Tensor,
    k8: torch.Tensor,
    kt: torch.Tensor,
    v8t: torch.Tensor,
    vt: torch.Tensor,
    block_n: int,
) -> None:
    quantize_kv_fp8_into(Fp8KV(k8, kt, v8t, vt, block_n), k_cache, v_cache, valid_len, rows)


register_op("quantize_kv_fp8_into", _quantize_kv_fp8_into_op, mutates_args=("k8", "kt", "v8t", "vt"))


def update_fp8_kv(
    kv: Fp8KV, k_cache: torch.Tensor, v_cache: torch.Tensor, valid_len: torch.Tensor, rows: torch.Tensor
) -> None:
    """`quantize_kv_fp8_into` as a registered op (traceable by torch.export / capturable in a CUDA graph)."""
    if kv.v8t.dim() != 4:
        raise InvalidArgumentError("kv: an fp8 shadow of a ring holds V too (empty_fp8_kv(..., quant_v=True))")
    check_tensor("rows", rows, dtypes=INDEX_DTYPES, device=k_cache.device)
    if rows.numel() not in (2, 4):
        raise InvalidArgumentError(
            f"rows: expected 2 elements [first, end) or 4 (two such ranges), found shape {list(rows.shape)}"
        )
    torch.ops.flashdreams.quantize_kv_fp8_into(
        k_cache, v_cache, valid_len.reshape(1), rows.reshape(-1), kv.k8, kv.kt, kv.v8t, kv.vt, kv.block_n
    )


# ----------------------------------------------------------------------------- torch twins


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest e4m3 value (ties to even, saturating at +-448), as fp32."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()


def quantize_rows_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (last dim) e4m3 quantization of fp32 x: (x8 as fp32 values, scale, amax); x ~= scale * x8."""
    amax = x.abs().amax(-1).clamp_min(AMAX_FLOOR)
    c = torch.full_like(amax, E4M3_MAX)  # tensor / tensor: correctly rounded, like the kernel's div_rn
    x8 = round_e4m3(x * (c / amax)[..., None])  # (a python scalar / tensor is reciprocal-then-multiply)
    return x8, amax / c, amax


def quantize_tiles_e4m3(x: torch.Tensor, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x `[B, N, L, d]` fp32 in tiles of `block_n` rows along L, one scale per tile:
    (x8 as fp32 values `[B, N, L, d]`, scales `[B, N, ceil(L / block_n)]`)."""
    B, N, L, d = x.shape
    tiles = -(-L // block_n)
    xp = torch.nn.functional.pad(x, (0, 0, 0, tiles * block_n - L)).reshape(B, N, tiles, block_n * d)
    x8, scale, _ = quantize_rows_e4m3(xp)
    return x8.reshape(B, N, tiles * block_n, d)[:, :, :L], scale
