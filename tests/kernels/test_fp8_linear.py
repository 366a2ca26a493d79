"""FP8 linears: per-token activation quantization (Triton) against torch, fp8_linear against an fp32
reference, `Fp8Linear` round trips, and which layers of a (tiny) WanDiT get swapped.

On a CPU the quantization kernel runs in Triton's interpreter; `fp8_linear` itself takes its torch
path there (dequantize, fp32 matmul). The `gpu`-marked test holds `torch._scaled_mm` to that path.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from flashdreams.errors import InvalidArgumentError  # noqa: E402
from flashdreams.kernels import triton_available  # noqa: E402
from flashdreams.kernels._common import poisoned_outputs  # noqa: E402
from flashdreams.kernels.fp8_linear import (  # noqa: E402
    Fp8Linear,
    Fp8Rows,
    fp8_linear,
    fp8_linear_reference,
    is_dit_fp8_linear,
    quantize_linears_fp8_,
    quantize_rows_fp8,
    quantize_rows_fp8_reference,
    quantize_weight_fp8,
    row_chunks,
)
from flashdreams.models.wan_config import WanConfig  # noqa: E402
from flashdreams.models.wan_dit import WanDiT  # noqa: E402
from flashdreams.numerics import rel_l2  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(
    not triton_available(DEVICE),
    reason="Triton kernels need CUDA, or TRITON_INTERPRET=1 set before triton is first imported",
)
# e4m3 keeps 3 mantissa bits: each operand element carries ~2.6% RMS rounding error, so a GEMM of
# Gaussian data lands at ~3.5% relative L2 (x and w both quantized); measured 3.5% here.
LINEAR_TOL = 4.5e-2


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("R,K", [(37, 96), (5, 1536), (3, 8960)])
def test_quantize_rows_kernel_matches_torch(dtype, R, K):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(R, K, generator=g) * torch.rand(R, 1, generator=g) * 10).to(dtype).to(DEVICE)
    x[0] = 0.0  # an all-zero row quantizes to zeros
    with poisoned_outputs():
        x8, sx = quantize_rows_fp8(x)
    r8, rs = quantize_rows_fp8_reference(x)
    assert x8.dtype == torch.float8_e4m3fn and x8.shape == (R, K) and x8.is_contiguous() and sx.shape == (R,)
    assert torch.equal(x8.view(torch.uint8), r8.view(torch.uint8)) and torch.equal(sx, rs)
    assert (x8[0].float() == 0).all()
    assert rel_l2(x8.float() * sx[:, None], x.float()) < 0.03


def test_row_chunks_cover_the_row_with_at_most_three_power_of_two_tiles():
    assert row_chunks(8960) == (8192, 512, 256)  # Self-Forcing's FFN hidden: exact
    assert row_chunks(13824) == (8192, 4096, 2048)  # LingBot's: 512 masked, against 2560 in one tile
    assert row_chunks(1536) == (1024, 512, 0) and row_chunks(4096) == (4096, 0, 0) and row_chunks(1) == (1, 0, 0)
    assert row_chunks(8960, chunked=False) == (16384, 0, 0)
    for k in range(1, 3000):
        c = row_chunks(k)
        assert all(n == 0 or n & (n - 1) == 0 for n in c) and k <= sum(c) < k + max(c[2], 1)
    with pytest.raises(InvalidArgumentError, match="row width"):
        row_chunks(0)


def test_rows_are_chunked_only_where_a_gelu_is_fused():
    """The GPU's default (measured: next63-h100, next77-h200): the FFN hidden passes with their GELU chunked
    (8960, 13824 columns); the plain attention-output passes (1536, 5120) and powers of two as one tile."""
    from flashdreams.kernels.fp8_linear import GELU_FORMS, chunks_pay

    tanh = GELU_FORMS["tanh"][0]
    assert chunks_pay(8960, tanh) and chunks_pay(13824, tanh) and chunks_pay(13824, GELU_FORMS["exact"][0])
    assert not any(chunks_pay(k, 0) for k in (1536, 5120, 8960))
    assert not chunks_pay(8192, tanh)


@needs_triton
@pytest.mark.parametrize("gelu", [None, "tanh"])
@pytest.mark.parametrize("R,K", [(5, 111), (2, 13824), (9, 96)])
def test_chunked_rows_quantize_bit_for_bit_as_one_tile(monkeypatch, gelu, R, K):
    """The chunked row (row_chunks: 111 -> 64 + 32 + 16 with one column masked) gives the codes and
    scales of the whole next_pow2(K) tile it replaced, and the torch reference's."""
    fp8_module = sys.modules[quantize_rows_fp8.__module__]  # the package re-exports a function of that name
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(R, K, generator=g) * 3).to(torch.bfloat16).to(DEVICE)
    x[-1, -1] = 40.0  # the row's amax in the last (partly masked) chunk
    monkeypatch.setattr(fp8_module, "ROW_CHUNKS", True)  # the interpreter's default is one tile
    with poisoned_outputs():
        c8, cs = quantize_rows_fp8(x, gelu=gelu)
    monkeypatch.setattr(fp8_module, "ROW_CHUNKS", False)
    with poisoned_outputs():
        w8, ws = quantize_rows_fp8(x, gelu=gelu)
    assert torch.equal(c8.view(torch.uint8), w8.view(torch.uint8)) and torch.equal(cs, ws)
    r8, rs = quantize_rows_fp8_reference(x, gelu=gelu)
    assert rel_l2(cs, rs) < 1e-2 and (c8.view(torch.uint8) == r8.view(torch.uint8)).float().mean().item() > 0.95
    assert cs[-1].item() == pytest.approx(float(F.gelu(torch.tensor(40.0)) if gelu else 40.0) / 448, rel=1e-3)


@needs_triton
@pytest.mark.parametrize("form,approximate", [("exact", "none"), ("tanh", "tanh")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("R,K", [(37, 96), (3, 8192)])
def test_gelu_quantize_rows_is_quantizing_gelu_output(form, approximate, dtype, R, K):
    """The fused pass quantizes GELU(x) (exact, or the tanh form Wan's FFN uses) rounded to x's dtype:
    nearly all e4m3 codes equal those of F.gelu's output (the kernel's erf/sigmoid and torch's differ
    in the last bits, which can move the row's scale and flip codes that sit on a rounding boundary:
    ~3% of them in the interpreter)."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(R, K, generator=g) * 3).to(dtype).to(DEVICE)
    with poisoned_outputs():
        x8, sx = quantize_rows_fp8(x, gelu=form)
    r8, rs = quantize_rows_fp8_reference(x, gelu=form)
    same = (x8.view(torch.uint8) == r8.view(torch.uint8)).float().mean().item()
    assert same > 0.95 and rel_l2(sx, rs) < 1e-2
    assert rel_l2(x8.float() * sx[:, None], r8.float() * rs[:, None]) < 1e-2
    assert rel_l2(x8.float() * sx[:, None], F.gelu(x, approximate=approximate).float()) < 0.03
    plain8, _ = quantize_rows_fp8(x)
    assert (plain8.view(torch.uint8) != x8.view(torch.uint8)).float().mean().item() > 0.5  # GELU did run


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_exact_gelu_by_the_erfc_fit_quantizes_as_by_erf(monkeypatch, dtype):
    """The exact GELU's erf as the branch-free fit (`EXACT_GELU_ERF = "fit"`, |error| <= 1.5e-7) or as erf
    itself ("libdevice"; the interpreter's is exact): the same row scales and e4m3 values but for a handful
    on a rounding boundary, on rows spanning [-10, 10] (both tails, the fit's worst region near 1) and
    Gaussian rows. (A row of the far negative tail alone would be all noise either way: there 1 + erf
    cancels, as in F.gelu, and the fit's relative error in erfc grows; next to any x > -4 it rounds to 0.)"""
    import importlib

    mod = importlib.import_module("flashdreams.kernels.fp8_linear")  # the package re-exports a same-named function
    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.linspace(-10, 10, 8192).reshape(2048, 4).t(), torch.randn(12, 2048, generator=g) * 3])
    x = x.to(dtype).to(DEVICE)
    out = {}
    for erf in ("fit", "libdevice"):
        monkeypatch.setattr(mod, "EXACT_GELU_ERF", erf)
        out[erf] = quantize_rows_fp8(x, gelu="exact")
    (f8, fs), (e8, es) = out["fit"], out["libdevice"]
    assert rel_l2(fs, es) < 1e-6
    assert (f8.float() != e8.float()).sum().item() <= 8  # of 32768 (values: -0 and +0 are one)
    r8, rs = quantize_rows_fp8_reference(x, gelu="exact")
    assert rel_l2(f8.float() * fs[:, None], r8.float() * rs[:, None]) < 1e-3


@needs_triton
@pytest.mark.parametrize("form", ["exact", "tanh"])
def test_the_fast_math_gelus_quantize_as_the_forms_before(monkeypatch, form):
    """`GELU_FAST_MATH`: the tanh form with its constants folded into x / (1 + 2^z), and on CUDA the exp2 and
    reciprocal of both GELUs as single MUFU instructions (kernels/_fast_math.py), against the forms before:
    the same row scales and e4m3 values but for a handful on a rounding boundary, over both tails and
    Gaussian rows; and the codes torch's GELU would give."""
    import importlib

    mod = importlib.import_module("flashdreams.kernels.fp8_linear")
    g = torch.Generator().manual_seed(7)
    x = torch.cat([torch.linspace(-12, 12, 8192).reshape(2048, 4).t(), torch.randn(12, 2048, generator=g) * 3])
    x = x.to(torch.bfloat16).to(DEVICE)
    out = {}
    for fast in (False, True):
        monkeypatch.setattr(mod, "GELU_FAST_MATH", fast)
        out[fast] = quantize_rows_fp8(x, gelu=form)
    (b8, bs), (f8, fs) = out[False], out[True]
    assert rel_l2(fs, bs) < 1e-6
    assert (f8.float() != b8.float()).sum().item() <= 8  # of 32768 (values: -0 and +0 are one)
    r8, rs = quantize_rows_fp8_reference(x, gelu=form)
    assert (f8.view(torch.uint8) == r8.view(torch.uint8)).float().mean().item() > 0.97
    assert rel_l2(f8.float() * fs[:, None], r8.float() * rs[:, None]) < 1e-3


@needs_triton
def test_gelu_forms_differ_where_they_should():
    """On x in [-4, -2.5] the tanh form is off from exact GELU by 10-50% (both are tiny there, and each
    row is scaled to its own amax), so every code of one form's row would be wrong for the other."""
    x = torch.linspace(-4, -2.5, 4096).reshape(4, 1024).to(DEVICE)
    e8, _ = quantize_rows_fp8(x, gelu="exact")
    t8, _ = quantize_rows_fp8(x, gelu="tanh")
    for x8, form in ((e8, "exact"), (t8, "tanh")):
        ref8, _ = quantize_rows_fp8_reference(x, gelu=form)
        assert (x8.view(torch.uint8) == ref8.view(torch.uint8)).float().mean().item() > 0.97
    assert (e8.view(torch.uint8) != t8.view(torch.uint8)).float().mean().item() > 0.3
    with pytest.raises(InvalidArgumentError, match="gelu"):
        quantize_rows_fp8(x, gelu="erf")


@needs_triton
@pytest.mark.parametrize("form,approximate", [("exact", "none"), ("tanh", "tanh")])
def test_fp8_linear_with_gelu_equals_it_after_gelu(form, approximate):
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(256, 64, bias=False).to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_((torch.randn(64, 256, generator=g) / 16).to(DEVICE, torch.bfloat16))
    fp8 = Fp8Linear.from_linear(lin)
    x = torch.randn(40, 256, generator=g).to(DEVICE, torch.bfloat16)
    assert fp8.takes_gelu
    assert rel_l2(fp8(x, gelu=form), fp8(F.gelu(x, approximate=approximate))) < 1e-2
    with pytest.raises(InvalidArgumentError, match="gelu"):
        fp8(x, gelu=True)


@needs_triton
def test_quantize_rows_strided_view():
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(9, 200, generator=g).to(torch.bfloat16).to(DEVICE)
    x = wide[:, 40:136]  # rows strided by 200, last dim contiguous
    x8, sx = quantize_rows_fp8(x)
    r8, rs = quantize_rows_fp8_reference(x)
    assert torch.equal(x8.view(torch.uint8), r8.view(torch.uint8)) and torch.equal(sx, rs)
    with pytest.raises(InvalidArgumentError, match="x"):
        quantize_rows_fp8(wide.t())


def test_quantize_weight_per_output_channel():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(48, 64, generator=g) * torch.logspace(-3, 1, 48)[:, None]  # channels 10^4 apart
    w8, sw = quantize_weight_fp8(w.to(torch.bfloat16))
    assert w8.dtype == torch.float8_e4m3fn and w8.shape == (48, 64) and sw.shape == (48,) and sw.dtype == torch.float32
    assert torch.allclose(w8.float().abs().amax(1), torch.full((48,), 448.0))
    back = w8.float() * sw[:, None]
    per_channel = [rel_l2(back[i], w.to(torch.bfloat16)[i].float()) for i in range(48)]
    assert max(per_channel) < 0.04  # every channel keeps its own relative precision


@pytest.mark.parametrize("bias", [True, False])
def test_fp8_linear_against_fp32(bias):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 45, 256, generator=g).to(torch.bfloat16).to(DEVICE)
    w = (torch.randn(192, 256, generator=g) / 16).to(torch.bfloat16).to(DEVICE)
    b = torch.randn(192, generator=g).to(torch.bfloat16).to(DEVICE) if bias else None
    w8, sw = quantize_weight_fp8(w)
    y = fp8_linear(x, w8, sw, b)
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert y.shape == (2, 45, 192) and y.dtype == torch.bfloat16
    err = rel_l2(y, ref)
    print(f"\nfp8_linear rel L2 vs fp32: {err:.4f} (bf16 F.linear: {rel_l2(F.linear(x, w, b), ref):.4f})")
    assert err < LINEAR_TOL
    assert fp8_linear(x, w8, sw, b, torch.float32).dtype == torch.float32


def test_fp8_linear_checks_arguments():
    w8, sw = quantize_weight_fp8(torch.randn(32, 64))
    x = torch.randn(3, 64)
    with pytest.raises(InvalidArgumentError, match="x"):
        fp8_linear(torch.randn(3, 48), w8, sw)
    with pytest.raises(InvalidArgumentError, match="w_fp8"):
        fp8_linear(x, w8.float(), sw)
    with pytest.raises(InvalidArgumentError, match="w_scale"):
        fp8_linear(x, w8, sw[:16])


@needs_triton
def test_fp8_linear_takes_rows_quantized_already():
    """Given x's rows quantized (`Fp8Rows`, as the AdaLN pass hands them over), the linear skips its own
    quantization and gives bit for bit what it gives for x; a GELU cannot apply to them."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 45, 256, generator=g).to(torch.bfloat16).to(DEVICE)
    lin = nn.Linear(256, 192).to(torch.bfloat16).to(DEVICE)
    layer = Fp8Linear.from_linear(lin)
    values, scale = quantize_rows_fp8(x.reshape(-1, 256))
    rows = Fp8Rows(values.view(2, 45, 256), scale.view(2, 45))
    y = layer(rows)
    assert y.shape == (2, 45, 192) and y.dtype == torch.bfloat16
    assert torch.equal(y, layer(x))
    assert rel_l2(y, lin(x)) < LINEAR_TOL
    assert layer.takes_fp8_rows and not getattr(lin, "takes_fp8_rows", False)
    with pytest.raises(InvalidArgumentError, match="gelu"):
        layer(rows, gelu="tanh")
    with pytest.raises(InvalidArgumentError, match="x.scale"):
        layer(Fp8Rows(rows.values, rows.scale[:, 1:]))
    with pytest.raises(InvalidArgumentError, match="x.values"):
        layer(Fp8Rows(rows.values.float(), rows.scale))
    with pytest.raises(InvalidArgumentError, match="x.values"):
        layer(Fp8Rows(rows.values[..., :128], rows.scale))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fast_accum", [False, True])
def test_scaled_mm_matches_reference_on_gpu(fast_accum):
    g = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(300, 1536, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(8960, 1536, device="cuda", generator=g) / 40).to(torch.bfloat16)
    b = torch.randn(8960, device="cuda", generator=g).to(torch.bfloat16)
    w8, sw = quantize_weight_fp8(w)
    y = fp8_linear(x, w8, sw, b, use_fast_accum=fast_accum)
    assert rel_l2(y, fp8_linear_reference(x, w8, sw, b)) < (1e-2 if fast_accum else 5e-3)
    assert torch.equal(fp8_linear(Fp8Rows(*quantize_rows_fp8(x)), w8, sw, b, use_fast_accum=fast_accum), y)


def test_from_linear_round_trip():
    g = torch.Generator().manual_seed(5)
    lin = nn.Linear(64, 96).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 64, generator=g) / 8)
        lin.bias.copy_(torch.randn(96, generator=g))
    f = Fp8Linear.from_linear(lin)
    assert (f.in_features, f.out_features) == (64, 96) and f.out_dtype == torch.bfloat16
    assert f.weight_fp8.dtype == torch.float8_e4m3fn and f.weight_scale.dtype == torch.float32
    assert torch.equal(f.bias, lin.bias) and not f.bias.requires_grad
    assert rel_l2(f.dequantized_weight(), lin.weight.float()) < 0.03
    x = torch.randn(7, 64, generator=g).to(torch.bfloat16)
    y = f(x)
    assert (
        y.dtype == torch.bfloat16 and rel_l2(y, F.linear(x.float(), lin.weight.float(), lin.bias.float())) < LINEAR_TOL
    )
    # state_dict round trip into a fresh module
    g2 = Fp8Linear(64, 96)
    g2.load_state_dict(f.state_dict())
    assert torch.equal(g2(x), y)
    assert set(f.state_dict()) == {"weight_fp8", "weight_scale", "bias"}
    # .to(dtype) leaves the fp8 weight and fp32 scale alone
    f.to(torch.float32)
    assert f.weight_fp8.dtype == torch.float8_e4m3fn and f.weight_scale.dtype == torch.float32
    no_bias = Fp8Linear.from_linear(nn.Linear(64, 32, bias=False))
    assert no_bias.bias is None and no_bias(torch.randn(2, 64)).shape == (2, 32)


TINY = WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, text_len=16)
EXPECTED = {
    f"blocks.{i}.{n}"
    for i in range(2)
    for n in (
        "self_attn.q",
        "self_attn.k",
        "self_attn.v",
        "self_attn.o",
        "cross_attn.q",
        "cross_attn.o",
        "ffn.0",
        "ffn.2",
    )
}


def test_quantize_linears_swaps_exactly_the_dit_block_linears():
    torch.manual_seed(6)
    model = WanDiT(TINY)
    before = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    x = torch.randn(1, TINY.in_dim, 2, 4, 4)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 10, TINY.text_dim)
    with torch.no_grad():
        ref = model(x, t, ctx)
    swapped = quantize_linears_fp8_(model)
    assert set(swapped) == EXPECTED
    after_fp8 = {n for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    still_linear = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    assert after_fp8 == EXPECTED and still_linear == before - EXPECTED
    kept = {"blocks.0.cross_attn.k", "blocks.0.cross_attn.v", "head.head", "text_embedding.0", "time_projection.1"}
    assert kept <= still_linear
    assert quantize_linears_fp8_(model) == []  # idempotent: nothing left to swap
    with torch.no_grad():
        out = model(x, t, ctx)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert rel_l2(out, ref) < 0.1  # two blocks of fp8 linears on a random-weight model


def test_include_predicate():
    assert is_dit_fp8_linear("blocks.12.ffn.2", nn.Linear(64, 64))
    assert not is_dit_fp8_linear("blocks.12.cross_attn.k", nn.Linear(64, 64))
    assert not is_dit_fp8_linear("blocks.1.self_attn.q", nn.Linear(60, 64))  # not a multiple of 16
    model = WanDiT(TINY)
    only_ffn = quantize_linears_fp8_(model, include=lambda name, lin: name.endswith(("ffn.0", "ffn.2")))
    assert set(only_ffn) == {n for n in EXPECTED if "ffn" in n}
