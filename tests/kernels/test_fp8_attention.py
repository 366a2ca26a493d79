"""FP8 ring attention: the kernel against its emulating twin, and the twin against exact attention.

On a CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set below before triton is
imported). The interpreter multiplies fp8 operands exactly; its own fp32 -> fp8 / bf16
conversions are wrong (truncation, a broken carry), so the kernel rounds to the target grid
itself there (EMULATE) and the math is the GPU's: kernel and twin agree to fp32 summation
order, so they are held tightly. The fp8 quality cost (twin vs exact attention) is tested
separately, with RMS-normalised q/k (Wan normalises them) and V ~ N(0, 1).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from flashdreams.errors import InvalidArgumentError  # noqa: E402
from flashdreams.kernels import ring_attention_reference, triton_available  # noqa: E402
from flashdreams.kernels._common import poisoned_outputs  # noqa: E402
from flashdreams.kernels._rounding import to_e4m3  # noqa: E402
from flashdreams.kernels.ring_attention_fp8 import (  # noqa: E402
    Fp8AttnConfig,
    empty_fp8_kv,
    launch_ring_attention_fp8,
    quantize_kv_fp8,
    quantize_kv_fp8_into,
    quantize_tiles_e4m3,
    ring_attention_fp8,
    ring_attention_fp8_reference,
    round_e4m3,
)
from flashdreams.numerics import rel_l2  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    not triton_available(DEVICE),
    reason="Triton kernels need CUDA, or TRITON_INTERPRET=1 set before triton is first imported",
)
# Kernel vs twin. In the interpreter they agree to fp32 summation order (observed <= 1e-4); on a
# GPU the fp8 wgmma accumulator keeps ~14 fraction bits and exp2 is approximate, which flips a
# few e4m3 roundings of P (a few 1e-3 of rel. L2).
TWIN_TOL = 1e-3 if DEVICE.type == "cpu" else 1.5e-2
# LSE: fp32 math in the interpreter; a GPU's ex2.approx / lg2.approx move it by ~2e-5 relative (H100, g6-h100).
LSE_TOL = 1e-5 if DEVICE.type == "cpu" else 1e-4


def rms_normed(*shape: int, g: torch.Generator, gain: float = 1.0) -> torch.Tensor:
    x = torch.randn(*shape, generator=g)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)) * gain


def make_case(B, Lq, H, d, S, valid, dtype=torch.bfloat16, seed=0, v_mean=0.0):
    """RMS-normalised q/k, V ~ N(v_mean, 1); NaN in every cache row >= valid (never to be used)."""
    g = torch.Generator().manual_seed(seed)
    q = rms_normed(B, Lq, H, d, g=g).to(dtype).to(DEVICE)
    k = rms_normed(B, S, H, d, g=g).to(dtype).to(DEVICE)
    v = (torch.randn(B, S, H, d, generator=g) + v_mean).to(dtype).to(DEVICE)
    k[:, valid:] = float("nan")
    v[:, valid:] = float("nan")
    return q, k, v, torch.tensor([valid], dtype=torch.int32, device=DEVICE)


@triton.jit
def _cast_e4m3(X, Y, N: tl.constexpr):
    r = tl.arange(0, N)
    tl.store(Y + r, to_e4m3(tl.load(X + r), True))


@pytest.mark.parametrize("pv_fp8", [True, False], ids=["pv_fp8", "pv_bf16"])
@pytest.mark.parametrize(
    "B,Lq,H,d,S,valid",
    [
        (1, 45, 2, 128, 150, 150),  # full ring, odd query count, partial last key tile
        (2, 37, 3, 64, 150, 101),  # batch 2, partially filled ring
        (1, 30, 2, 64, 90, 17),  # valid ends inside the first key tile
        (1, 21, 2, 48, 70, 70),  # head dim padded (48 -> 64)
    ],
)
def test_kernel_matches_twin(pv_fp8, B, Lq, H, d, S, valid):
    q, k, v, vl = make_case(B, Lq, H, d, S, valid)
    with poisoned_outputs():
        out, lse = ring_attention_fp8(q, k, v, vl, return_lse=True, pv_fp8=pv_fp8)
    ref, ref_lse = ring_attention_fp8_reference(q, k, v, vl, return_lse=True, pv_fp8=pv_fp8)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (B, H, Lq)
    assert torch.isfinite(out).all()
    assert rel_l2(out, ref) < TWIN_TOL
    assert rel_l2(lse, ref_lse) < LSE_TOL
    exact = ring_attention_reference(q.float(), k.float(), v.float(), vl)
    assert rel_l2(out, exact) < (0.08 if pv_fp8 else 0.06)


CONFIGS = [
    Fp8AttnConfig(32, 32, 1, 1, splits=1),  # many key tiles
    Fp8AttnConfig(32, 32, 1, 1, splits=3, use_tma=True),  # key splits + LSE merge, descriptors
    Fp8AttnConfig(16, 64, 1, 1, splits=2, precise_pv=False),  # tensor-core accumulation path
]


@pytest.mark.parametrize("pv_fp8", [True, False], ids=["pv_fp8", "pv_bf16"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_configs_match_twin(config, pv_fp8):
    # fp16: the split merge writes through a plain cast, which the interpreter rounds right for fp16
    q, k, v, vl = make_case(2, 45, 2, 64, 200, 163, torch.float16, seed=1)
    with poisoned_outputs():
        out, lse = launch_ring_attention_fp8(q, k, v, vl, 0.11, config, pv_fp8)
    ref, ref_lse = ring_attention_fp8_reference(
        q, k, v, vl, 0.11, return_lse=True, pv_fp8=pv_fp8, block_n=config.block_n, splits=config.splits
    )
    assert rel_l2(out, ref) < TWIN_TOL
    assert rel_l2(lse, ref_lse) < 1e-5


def test_wrapped_ring_matches_logical_window():
    """Frames written into a ring that has wrapped (rows in rotated order) attend like the logical
    window in time order, up to the fp8 cost; the kernel matches the twin on the ring as laid out."""
    g = torch.Generator().manual_seed(4)
    B, H, d, fs, slots = 1, 2, 64, 20, 5
    S = slots * fs
    frames_k = [rms_normed(B, fs, H, d, g=g) for _ in range(8)]
    frames_v = [torch.randn(B, fs, H, d, generator=g) for _ in range(8)]
    window = list(range(3, 8))  # the newest 5 frames; frame f lives in slot f % 5
    ring_k = torch.empty(B, S, H, d)
    ring_v = torch.empty(B, S, H, d)
    for f in window:
        ring_k[:, (f % slots) * fs : (f % slots + 1) * fs] = frames_k[f]
        ring_v[:, (f % slots) * fs : (f % slots + 1) * fs] = frames_v[f]
    q = rms_normed(B, 33, H, d, g=g)
    q, ring_k, ring_v = (t.to(torch.bfloat16).to(DEVICE) for t in (q, ring_k, ring_v))
    vl = torch.tensor([S], device=DEVICE)
    out = ring_attention_fp8(q, ring_k, ring_v, vl)
    assert rel_l2(out, ring_attention_fp8_reference(q, ring_k, ring_v, vl)) < TWIN_TOL
    lk = torch.cat([frames_k[f] for f in window], 1).to(torch.bfloat16).to(DEVICE)
    lv = torch.cat([frames_v[f] for f in window], 1).to(torch.bfloat16).to(DEVICE)
    logical = ring_attention_reference(q.float(), lk.float(), lv.float(), vl)
    assert rel_l2(out, logical) < 0.08


def test_float32_inputs():
    """An fp32 model (the CPU tests' tiny DiT) can take the fp8 path too: same quantization."""
    q, k, v, vl = make_case(1, 21, 2, 64, 100, 77, torch.float32, seed=10)
    for pv in (True, False):
        out = ring_attention_fp8(q, k, v, vl, pv_fp8=pv)
        assert out.dtype == torch.float32
        assert rel_l2(out, ring_attention_fp8_reference(q, k, v, vl, pv_fp8=pv)) < TWIN_TOL


def test_precise_and_tensor_core_accumulation_agree_in_interpreter():
    """Both accumulation paths compute the same function (they differ only in the GPU's adder)."""
    q, k, v, vl = make_case(1, 20, 2, 64, 130, 130, seed=6)
    a, _ = launch_ring_attention_fp8(q, k, v, vl, 0.125, Fp8AttnConfig(32, 32, 1, 1, splits=1), True)
    b, _ = launch_ring_attention_fp8(q, k, v, vl, 0.125, Fp8AttnConfig(32, 32, 1, 1, splits=1, precise_pv=False), True)
    assert rel_l2(a, b) < TWIN_TOL


@pytest.mark.parametrize("split_kv", [True, False], ids=["k_v_programs", "one_program_both"])
def test_quantize_kv_prepass_matches_torch(split_kv, monkeypatch):
    """k8 / V transposed with one scale per key tile, as the twin quantizes. Past valid: K rows and tiles
    starting there untouched; V's columns in the last worked tile zero (its store covers the whole tile so
    that it vectorizes). Either grid: a program per tile and K or V (the default), or one doing both."""
    monkeypatch.setattr(importlib.import_module("flashdreams.kernels.fp8_kv"), "PREPASS_SPLIT_KV", split_kv)
    B, S, H, d, valid, bn = 2, 70, 3, 48, 53, 32
    q, k, v, vl = make_case(B, 4, H, d, S, valid, seed=2)
    kv = empty_fp8_kv(k, bn)
    for t in (kv.k8, kv.v8t):
        t.view(torch.uint8).fill_(0x38)  # e4m3 1.0: what an unwritten element keeps
    kv.kt.fill_(-1.0)
    kv.vt.fill_(-1.0)
    quantize_kv_fp8_into(kv, k, v, vl, torch.tensor([0, S], dtype=torch.int32, device=DEVICE))
    assert (kv.k8[:, :, valid:].float() == 1.0).all() and (kv.v8t[..., 64:].float() == 1.0).all()
    assert (kv.v8t[..., valid:64].float() == 0.0).all()
    assert (kv.kt[..., 2] == -1.0).all() and (kv.vt[..., 2] == -1.0).all()
    k8, kt = quantize_tiles_e4m3(k[:, :valid].float().permute(0, 2, 1, 3), bn)
    v8, vt = quantize_tiles_e4m3(v[:, :valid].float().permute(0, 2, 1, 3), bn)
    for shadow in (kv, quantize_kv_fp8(k, v, vl, bn)):  # the update over every row, then the whole-ring pass
        assert shadow.k8.shape == (B, H, S, 64) and shadow.v8t.shape == (B, H, 64, 80) and shadow.kt.shape == (B, H, 3)
        assert torch.equal(shadow.k8[:, :, :valid, :d].float(), k8) and (shadow.k8[:, :, :valid, d:].float() == 0).all()
        assert torch.equal(shadow.v8t[:, :, :d, :valid].float(), v8.transpose(-1, -2))
        assert torch.equal(shadow.kt[:, :, :2], kt) and torch.equal(shadow.vt[:, :, :2], vt)  # tile 2 starts past valid
    # the tile scale is the tile's amax / 448: its largest element becomes +-448
    assert torch.equal(k8[:, :, :bn].abs().amax((-1, -2)), torch.full((B, H), 448.0, device=DEVICE))


def test_e4m3_rounding_emulation_matches_torch():
    """The interpreter-only rounding (integer RNE + saturation) equals torch's e4m3 cast, ties and
    subnormals included: what makes the CPU run of the kernel the GPU's math."""
    g = torch.Generator().manual_seed(3)
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)]
    mids = (grid[:-1] + grid[1:]) / 2  # exact ties (sorted positives / negatives mixed: fine)
    rnd = torch.randn(4096, generator=g) * torch.exp2(torch.randint(-14, 10, (4096,), generator=g).float())
    x = torch.cat([grid, mids, rnd, torch.tensor([460.0, 500.0, -1e4, 1e-9, -3e-3])])
    n = 1 << (x.numel() - 1).bit_length()
    xp = torch.cat([x, torch.zeros(n - x.numel())])
    if DEVICE.type == "cuda":
        pytest.skip("the emulation is only used by the interpreter")
    y = torch.empty(n, dtype=torch.float8_e4m3fn)
    _cast_e4m3[(1,)](xp, y, n)
    assert torch.equal(y[: x.numel()].float(), round_e4m3(x))


def test_all_zero_key_and_value_tiles():
    """A zero V tile (scale at the floor) between ordinary ones: the accumulator's unit changes by
    ~1e16 and back, which must stay finite; a zero K tile gives its keys logit 0."""
    q, k, v, vl = make_case(1, 19, 2, 64, 192, 192, seed=9)
    k[:, 64:128] = 0.0
    v[:, 64:128] = 0.0
    out = launch_ring_attention_fp8(q, k, v, vl, 0.125, Fp8AttnConfig(32, 64, 1, 1, splits=1), True)[0]
    assert torch.isfinite(out).all()
    assert rel_l2(out, ring_attention_fp8_reference(q, k, v, vl, 0.125, block_n=64)) < TWIN_TOL
    assert rel_l2(out, ring_attention_reference(q.float(), k.float(), v.float(), vl, 0.125)) < 0.08


def test_no_valid_keys_gives_zero_and_minus_inf_lse():
    q, k, v, vl = make_case(1, 8, 2, 64, 32, 0)
    out, lse = ring_attention_fp8(q, k, v, vl, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


@pytest.mark.parametrize("v_mean", [0.0, 0.5])
def test_quality_cost_against_exact_attention(v_mean):
    """The price of fp8 at a realistic key count, measured on the twin (the kernel is held to it).

    Zero-mean V is the worst case: the output is pure cancellation, so every per-element error
    (q, k, P, V each rounded to 3 mantissa bits: ~2.6% RMS) shows in full; measured ~5% (fp8 PV)
    / ~3.5% (bf16 PV) at unit-RMS q/k. With a common V component, as real values have, the
    relative error is far smaller (~0.5% at mean 0.5).
    """
    q, k, v, vl = make_case(1, 64, 2, 128, 2048, 2048, seed=5, v_mean=v_mean)
    exact = ring_attention_reference(q.float(), k.float(), v.float(), vl)
    fp8 = rel_l2(ring_attention_fp8_reference(q, k, v, vl, block_n=128), exact)
    pv_bf16 = rel_l2(ring_attention_fp8_reference(q, k, v, vl, block_n=128, pv_fp8=False), exact)
    bf16 = rel_l2(ring_attention_reference(q, k, v, vl), exact)
    print(f"\nv_mean {v_mean}: rel L2 vs exact: fp8 {fp8:.4f}, fp8 QK + bf16 PV {pv_bf16:.4f}, bf16 {bf16:.4f}")
    if v_mean == 0.0:
        assert fp8 < 0.06 and pv_bf16 < 0.045
    else:
        assert fp8 < 0.01 and pv_bf16 < 0.01
    assert bf16 < fp8 and pv_bf16 < fp8


def test_kernel_quality_at_a_longer_ring():
    """The kernel itself (not just its twin) over 1000+ keys in 128-key tiles, against exact."""
    q, k, v, vl = make_case(1, 32, 1, 128, 1100, 1030, seed=7)
    out = launch_ring_attention_fp8(q, k, v, vl, 1 / math.sqrt(128), Fp8AttnConfig(32, 128, 1, 1, splits=1))[0]
    assert rel_l2(out, ring_attention_fp8_reference(q, k, v, vl, block_n=128)) < TWIN_TOL
    assert rel_l2(out, ring_attention_reference(q.float(), k.float(), v.float(), vl)) < 0.07


def test_custom_op_and_export():
    q, k, v, vl = make_case(1, 20, 2, 64, 64, 40, seed=8)
    ref = ring_attention_fp8_reference(q, k, v, vl)
    out, _ = torch.ops.flashdreams.ring_attention_fp8(q, k, v, vl, 1.0 / math.sqrt(64), True)
    assert rel_l2(out, ref) < TWIN_TOL

    class Attend(torch.nn.Module):
        def forward(self, q, k, v, vl):
            return ring_attention_fp8(q, k, v, vl) * 2.0

    ep = torch.export.export(Attend(), (q, k, v, vl))
    assert "flashdreams.ring_attention_fp8" in str(ep.graph)
    assert rel_l2(ep.module()(q, k, v, vl), 2 * ref.float()) < TWIN_TOL


def test_bad_arguments_name_the_argument():
    q, k, v, vl = make_case(1, 8, 2, 32, 16, 16)
    with pytest.raises(InvalidArgumentError, match="q"):
        ring_attention_fp8(q.double(), k.double(), v.double(), vl)
    with pytest.raises(InvalidArgumentError, match="k_cache"):
        ring_attention_fp8(q, k.half(), v, vl)
    with pytest.raises(InvalidArgumentError, match="valid_len"):
        ring_attention_fp8(q, k, v, torch.tensor([1, 2], device=DEVICE))
    with pytest.raises(InvalidArgumentError, match="scale"):
        ring_attention_fp8(q, k, v, vl, scale=0.0)


# ----------------------------------------------------------------------------- fp8 shadow of the ring


@pytest.mark.parametrize("split_kv", [True, False], ids=["k_v_programs", "one_program_both"])
def test_shadow_updated_per_write_equals_a_full_quantization(split_kv, monkeypatch):
    """A ring written block by block (rows not aligned to key tiles), its fp8 shadow re-quantized only
    where each write landed: the shadow equals a full pre-pass of the ring after every write, tiles
    outside a write are left alone, and attention on the shadow equals `ring_attention_fp8` exactly."""
    from flashdreams.kernels.ring_attention_fp8 import (
        empty_fp8_kv,
        fp8_kv_block_n,
        ring_attention_fp8_prequantized,
        update_fp8_kv,
    )

    monkeypatch.setattr(importlib.import_module("flashdreams.kernels.fp8_kv"), "PREPASS_SPLIT_KV", split_kv)
    g = torch.Generator().manual_seed(11)
    B, H, d, S = 1, 2, 64, 150  # writes of 50 / 25 / 75 rows: they straddle the 64-row key tiles
    ring_k = torch.zeros(B, S, H, d, dtype=torch.bfloat16, device=DEVICE)
    ring_v = torch.zeros_like(ring_k)
    q = rms_normed(B, 19, H, d, g=g).to(torch.bfloat16).to(DEVICE)
    bn = fp8_kv_block_n(q)
    shadow = empty_fp8_kv(ring_k, bn)
    shadow.kt.fill_(-1.0)  # a tile no write touched keeps this
    for blk, (lo, hi) in enumerate([(0, 50), (50, 75), (75, 150)]):
        ring_k[:, lo:hi] = rms_normed(B, hi - lo, H, d, g=g).to(torch.bfloat16).to(DEVICE)
        ring_v[:, lo:hi] = torch.randn(B, hi - lo, H, d, generator=g).to(torch.bfloat16).to(DEVICE)
        vl = torch.tensor([hi], dtype=torch.int32, device=DEVICE)
        update_fp8_kv(shadow, ring_k, ring_v, vl, torch.tensor([lo, hi], device=DEVICE))
        full = quantize_kv_fp8(ring_k, ring_v, vl, bn)
        tiles = -(-hi // bn)
        assert torch.equal(shadow.kt[..., :tiles], full.kt[..., :tiles]), blk
        assert torch.equal(shadow.vt[..., :tiles], full.vt[..., :tiles]), blk
        assert (shadow.kt[..., tiles:] == -1.0).all(), blk  # past valid: untouched
        assert torch.equal(shadow.k8[:, :, :hi].float(), full.k8[:, :, :hi].float())
        assert torch.equal(shadow.v8t[..., :hi].float(), full.v8t[..., :hi].float())
        out = ring_attention_fp8_prequantized(q, shadow, vl)
        assert torch.equal(out, ring_attention_fp8(q, ring_k, ring_v, vl)), blk
    # A write in the middle of a full ring (a rolling window overwriting a slot) re-quantizes only
    # the tiles it overlaps.
    before = shadow.kt.clone()
    ring_k[:, 70:80] *= 4.0
    update_fp8_kv(shadow, ring_k, ring_v, torch.tensor([S], device=DEVICE), torch.tensor([70, 80], device=DEVICE))
    changed = (shadow.kt != before).any(0).any(0)
    assert changed.tolist() == [False, True, False]  # tiles of 64: rows 70..79 lie in tile 1 only
    full = quantize_kv_fp8(ring_k, ring_v, torch.tensor([S], device=DEVICE), bn)
    assert torch.equal(shadow.kt, full.kt) and torch.equal(shadow.k8.float(), full.k8.float())
    # A write that wraps around the window (rows 140..149, then 0..9): two ranges, and the tile
    # between them is left alone.
    before = shadow.kt.clone()
    ring_k[:, 140:150] *= 2.0
    ring_k[:, 0:10] *= 2.0
    wrapped = torch.tensor([140, 150, 0, 10], device=DEVICE)
    update_fp8_kv(shadow, ring_k, ring_v, torch.tensor([S], device=DEVICE), wrapped)
    changed = (shadow.kt != before).any(0).any(0)
    assert changed.tolist() == [True, False, True]
    full = quantize_kv_fp8(ring_k, ring_v, torch.tensor([S], device=DEVICE), bn)
    assert torch.equal(shadow.kt, full.kt) and torch.equal(shadow.k8.float(), full.k8.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merge_rows_fp8_equals_merge_then_the_linears_quantization(dtype):
    """Key-split partials merged and quantized per row of N x d values in one pass equal, bit for bit, the
    merge into a `dtype` output followed by the FP8 linear's own row quantization; a part without keys for
    some rows (LSE -inf, garbage values) weighs nothing. 3 heads (padded to 4) and 37 rows test the masks."""
    from flashdreams.kernels.attention_merge import merge_into, merge_rows_fp8
    from flashdreams.kernels.fp8_linear import _launch_quantize_rows

    g = torch.Generator().manual_seed(5)
    P, B, Lq, H, d = 3, 2, 37, 3, 64
    parts = (torch.randn(P, B, Lq, H, d, generator=g) * 3).to(DEVICE)
    lses = (torch.randn(P, B, H, Lq, generator=g) * 2).to(DEVICE)
    lses[1, :, :, :9] = float("-inf")  # part 1 holds no key for these rows
    parts[1, :, :9] = float("nan")
    with poisoned_outputs():
        x8, sx = merge_rows_fp8(parts, lses, dtype)
        out = torch.empty(B, Lq, H, d, dtype=dtype, device=DEVICE)
        merge_into(parts, lses, out, torch.empty(B, H, Lq, device=DEVICE))
        ref8, ref_s = _launch_quantize_rows(out.view(B * Lq, H * d), 0)
    assert x8.shape == (B, Lq, H * d) and sx.shape == (B, Lq)
    assert torch.isfinite(sx).all()
    assert torch.equal(x8.view(B * Lq, H * d).float(), ref8.float()) and torch.equal(sx.view(-1), ref_s)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("splits", ["1", "2"])
def test_attention_rows_equal_the_output_projections_quantization(splits, d, monkeypatch):
    """`ring_attention_fp8_rows` (the output handed to the FP8 output projection quantized) equals the linear's
    quantization of `ring_attention_fp8_prequantized`'s output, bit for bit: unsplit (a quantization pass after
    the kernel) and with two key splits (the merge quantizes as it merges). Head dim 128 runs the Gluon kernel
    on an H100/H200."""
    from flashdreams.kernels.fp8_linear import quantize_rows_fp8
    from flashdreams.kernels.ring_attention_fp8 import (
        empty_fp8_kv,
        fp8_kv_block_n,
        ring_attention_fp8_prequantized,
        ring_attention_fp8_rows,
        update_fp8_kv,
    )

    monkeypatch.setenv("FD_FP8_ATTN_SPLITS", splits)
    q, k, v, vl = make_case(1, 21, 2, d, 300, 270, seed=4)
    shadow = empty_fp8_kv(k, fp8_kv_block_n(q))
    update_fp8_kv(shadow, k, v, vl, torch.tensor([0, 270], device=DEVICE))
    rows = ring_attention_fp8_rows(q, shadow, vl)
    out = ring_attention_fp8_prequantized(q, shadow, vl)
    ref8, ref_s = quantize_rows_fp8(out.flatten(2).reshape(21, 2 * d))
    assert rows.values.shape == (1, 21, 2 * d) and rows.scale.shape == (1, 21)
    assert torch.equal(rows.values.view(21, 2 * d).float(), ref8.float()) and torch.equal(rows.scale.view(-1), ref_s)


def test_written_ring_rows_are_one_run_or_two():
    """The rows a block writes at its frame slots: one run, or two where the slots wrap around the window."""
    from flashdreams.models.dit_ops import written_ring_rows

    assert written_ring_rows(torch.tensor([3, 4, 5]), 10).tolist() == [30, 60, 30, 60]
    assert written_ring_rows(torch.tensor([10, 11, 1]), 10).tolist() == [100, 120, 10, 20]
    assert written_ring_rows(torch.tensor([11, 1, 2]), 10).tolist() == [110, 120, 10, 30]


def test_shadow_refuses_a_mismatched_tile_or_layout():
    from flashdreams.kernels.ring_attention_fp8 import (
        empty_fp8_kv,
        fp8_kv_block_n,
        ring_attention_fp8_prequantized,
        update_fp8_kv,
    )

    q, k, v, vl = make_case(1, 8, 2, 64, 64, 64)
    with pytest.raises(InvalidArgumentError, match="key tiles of"):
        ring_attention_fp8_prequantized(q, empty_fp8_kv(k, fp8_kv_block_n(q) // 2), vl)
    with pytest.raises(InvalidArgumentError, match="holds V too"):
        update_fp8_kv(empty_fp8_kv(k, 64, quant_v=False), k, v, vl, torch.tensor([0, 8], device=DEVICE))
    with pytest.raises(InvalidArgumentError, match="rows: expected 2 elements .* or 4"):
        update_fp8_kv(empty_fp8_kv(k, 64), k, v, vl, torch.tensor([0], device=DEVICE))
    with pytest.raises(InvalidArgumentError, match="fp8 shadow"):
        ring_attention_fp8_prequantized(q[:, :, :1], empty_fp8_kv(k, 64), vl)


def test_sm90_config_keeps_the_key_tile():
    """The measured sm_90 config may change the query tile and warps but not the key tile: K/V
    quantized for one config (a ring's fp8 shadow) must serve the other."""
    from flashdreams.kernels.ring_attention_fp8 import FP8_ARCH_CONFIGS, FP8_CUDA_CONFIGS

    sm90 = FP8_ARCH_CONFIGS[(9, 0)][128]
    assert (sm90.block_m, sm90.block_n, sm90.num_warps, sm90.num_stages, sm90.use_tma) == (64, 128, 4, 3, True)
    for arch in FP8_ARCH_CONFIGS.values():
        for d_pad, cfg in arch.items():
            assert cfg.block_n == FP8_CUDA_CONFIGS[d_pad].block_n


def test_splits_override_from_the_environment(monkeypatch):
    """FD_FP8_ATTN_SPLITS replaces the picked config's key splits (the bench's whole-block comparison),
    the result still the twin's; a value that is not a count from 1 to 8 is refused by name."""
    from flashdreams.kernels.ring_attention_fp8 import SPLITS_ENV, pick_fp8_config

    q, k, v, vl = make_case(1, 30, 2, 64, 150, 140, seed=8)
    monkeypatch.delenv(SPLITS_ENV, raising=False)
    base = pick_fp8_config(q)
    whole = ring_attention_fp8(q, k, v, vl)
    monkeypatch.setenv(SPLITS_ENV, "3")
    picked = pick_fp8_config(q)
    assert picked.splits == 3 and picked.block_n == base.block_n and picked.block_m == base.block_m
    split = ring_attention_fp8(q, k, v, vl)
    want = ring_attention_fp8_reference(q, k, v, vl, block_n=base.block_n, splits=3)
    assert rel_l2(split, want) < 1e-2 and rel_l2(split, whole) < 2e-2  # (bf16 out, truncated in the interpreter)
    for bad in ("0", "two", "9", "-1"):
        monkeypatch.setenv(SPLITS_ENV, bad)
        with pytest.raises(InvalidArgumentError, match=SPLITS_ENV):
            ring_attention_fp8(q, k, v, vl)


def test_sm90_key_splits_come_from_the_grid():
    """On Hopper the FP8 kernel splits the keys in two where the grid is short (Self-Forcing's 12 heads:
    measured faster on the H200) and not where it is long (LingBot's 40 heads: not measured split)."""
    from flashdreams.kernels.ring_attention_fp8 import FP8_ARCH_CONFIGS, fp8_splits_for

    assert FP8_ARCH_CONFIGS[(9, 0)][128].splits == 0  # left to the grid
    tiles = -(-4680 // 64)
    assert fp8_splits_for(1 * 12 * tiles, 132) == 2  # Self-Forcing 480x832: 888 programs on 132 SMs
    assert fp8_splits_for(1 * 40 * -(-4524 // 64), 132) == 1  # LingBot Fast 464x832: 2840
    assert fp8_splits_for(4 * 12 * tiles, 132) == 1  # four worlds of Self-Forcing fill the GPU already
