"""The AdaLN row kernels (modulate, gated residual, affine LayerNorm, the fused pairs) against their twins.

On a CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set below before
triton is imported). bf16 tolerances are loose there because the interpreter truncates
fp32 -> bf16 instead of rounding to nearest even (fp16 is exact and checked tightly).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from flashdreams.errors import InvalidArgumentError  # noqa: E402
from flashdreams.kernels import (  # noqa: E402
    adaln_modulate,
    adaln_modulate_reference,
    gated_residual,
    gated_residual_adaln,
    gated_residual_adaln_reference,
    gated_residual_layer_norm,
    gated_residual_layer_norm_reference,
    gated_residual_modulate_layer_norm,
    gated_residual_modulate_layer_norm_reference,
    gated_residual_reference,
    layer_norm_affine,
    layer_norm_affine_reference,
    residual_adaln,
    residual_adaln_reference,
    residual_layer_norm,
    residual_layer_norm_reference,
    triton_available,
)
from flashdreams.kernels._common import poisoned_outputs  # noqa: E402
from flashdreams.numerics import rel_l2  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    not triton_available(DEVICE),
    reason="Triton kernels need CUDA, or TRITON_INTERPRET=1 set before triton is first imported",
)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SHAPES = [(2, 3, 15, 96), (1, 3, 15, 1536), (1, 2, 7, 144)]  # (B, F, fs, D): L = 45, 45, 14


def make(B, F, fs, D, dtype, y_dtype=None, seed=0):
    """x with a large mean (LayerNorm must centre it), y, and per-frame float32 modulations."""
    g = torch.Generator().manual_seed(seed + D)
    x = (torch.randn(B, F * fs, D, generator=g) * 2 + 3).to(dtype).to(DEVICE)
    y = torch.randn(B, F * fs, D, generator=g).to(y_dtype or dtype).to(DEVICE)
    # e[:, :, i] views of one [B, F, 6, D] tensor, as the model's modulation chunks are
    e = torch.randn(B, F, 6, D, generator=g).to(DEVICE)
    return x, y, e[:, :, 0], e[:, :, 1], e[:, :, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,F,fs,D", SHAPES)
def test_modulate_and_residual_match_twins(dtype, B, F, fs, D):
    x, y, shift, scale, gate = make(B, F, fs, D, dtype)
    with poisoned_outputs():
        h = adaln_modulate(x, shift, scale, 1e-6)
        r = gated_residual(x, y, gate)
        x_new, h2 = gated_residual_adaln(x, y, gate, shift, scale, 1e-6)
    assert h.dtype == r.dtype == x_new.dtype == h2.dtype == dtype
    assert rel_l2(h, adaln_modulate_reference(x, shift, scale, 1e-6)) < TOL[dtype]
    assert rel_l2(r, gated_residual_reference(x, y, gate)) < TOL[dtype]
    ref_x, ref_h = gated_residual_adaln_reference(x, y, gate, shift, scale, 1e-6)
    assert rel_l2(x_new, ref_x) < TOL[dtype] and rel_l2(h2, ref_h) < TOL[dtype]
    assert torch.equal(x_new, r)  # the fused residual is the same kernel arithmetic


@pytest.mark.parametrize("B,F,fs,D", SHAPES)
def test_fp32_residual_stream_with_bf16_branch(B, F, fs, D):
    """Wan keeps the residual x in float32 while the attention/FFN output y is bf16."""
    x, y, shift, scale, gate = make(B, F, fs, D, torch.float32, y_dtype=torch.bfloat16, seed=1)
    with poisoned_outputs():
        x_new, h = gated_residual_adaln(x, y, gate, shift, scale, 1e-6, out_dtype=torch.float16)
        h1 = adaln_modulate(x, shift, scale, 1e-6, out_dtype=torch.float16)
    ref_x, ref_h = gated_residual_adaln_reference(x, y, gate, shift, scale, 1e-6, out_dtype=torch.float16)
    assert x_new.dtype == torch.float32 and h.dtype == torch.float16 and h1.dtype == torch.float16
    assert rel_l2(x_new, ref_x) < 1e-6 and rel_l2(h, ref_h) < 2e-3
    assert rel_l2(h1, adaln_modulate_reference(x, shift, scale, 1e-6, out_dtype=torch.float16)) < 2e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,F,fs,D", SHAPES)
def test_layer_norm_affine_matches_twin(dtype, B, F, fs, D):
    x, _, _, _, _ = make(B, F, fs, D, dtype, seed=2)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(D, generator=g).to(DEVICE)
    b = torch.randn(D, generator=g).to(dtype).to(DEVICE)
    with poisoned_outputs():
        h = layer_norm_affine(x, w, b, 1e-6)
    assert h.dtype == dtype
    assert rel_l2(h, layer_norm_affine_reference(x, w, b, 1e-6)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,F,fs,D", SHAPES)
def test_fused_pairs_of_a_wan_block_match_twins(dtype, B, F, fs, D):
    """The ungated residual + modulated norm, and the gated residual + affine norm: each equals its
    two unfused kernels (same arithmetic, so the residual is bit-equal) and its twin."""
    x, y, shift, scale, gate = make(B, F, fs, D, dtype, seed=5)
    g = torch.Generator().manual_seed(6)
    w = torch.randn(D, generator=g).to(DEVICE)
    b = torch.randn(D, generator=g).to(dtype).to(DEVICE)
    with poisoned_outputs():
        xr, hr = residual_adaln(x, y, shift, scale, 1e-6)
        xg, hg = gated_residual_layer_norm(x, y, gate, w, b, 1e-6)
        plain = x + y  # torch's own add: same fp32 math, one rounding
        gated = gated_residual(x, y, gate)
        h_affine = layer_norm_affine(gated, w, b, 1e-6)
    assert xr.dtype == hr.dtype == xg.dtype == hg.dtype == dtype
    assert torch.equal(xg, gated) and torch.equal(hg, h_affine)
    # The interpreter truncates fp32 -> bf16 where torch and the GPU round to nearest even.
    rounds_like_torch = dtype != torch.bfloat16 or DEVICE.type == "cuda"
    assert torch.equal(xr, plain) if rounds_like_torch else rel_l2(xr, plain) < TOL[dtype]
    ref_x, ref_h = residual_adaln_reference(x, y, shift, scale, 1e-6)
    assert torch.equal(ref_x, plain)
    assert rel_l2(hr, ref_h) < TOL[dtype]
    ref_x, ref_h = gated_residual_layer_norm_reference(x, y, gate, w, b, 1e-6)
    assert rel_l2(xg, ref_x) < TOL[dtype] and rel_l2(hg, ref_h) < TOL[dtype]
    # A wrong frame mapping or a gate applied to the plain residual would break these.
    assert rel_l2(xr, gated) > 0.1 and rel_l2(hr, adaln_modulate_reference(x, shift, scale, 1e-6)) > 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_residual_with_an_affine_norm_matches_twin_and_torch(dtype):
    """The arena's pair (x' = x + y, then nn.LayerNorm with weight and bias), on strided row views too
    (the arena norms only the target tokens of its last block)."""
    x, y, *_ = make(2, 4, 5, 192, dtype, seed=8)
    g = torch.Generator().manual_seed(9)
    w, b = (torch.randn(192, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    with poisoned_outputs():
        xn, h = residual_layer_norm(x, y, w, b, 1e-5)
        xv, hv = residual_layer_norm(x[:, 5:], y[:, 5:], w, b, 1e-5)
    ref_x, ref_h = residual_layer_norm_reference(x, y, w, b, 1e-5)
    rounds_like_torch = dtype != torch.bfloat16 or DEVICE.type == "cuda"
    assert torch.equal(xn, x + y) if rounds_like_torch else rel_l2(xn, ref_x) < TOL[dtype]
    torch_h = torch.nn.functional.layer_norm(xn.float(), (192,), w.float(), b.float(), 1e-5)
    assert rel_l2(h, ref_h) < TOL[dtype] and rel_l2(h, torch_h) < TOL[dtype]
    assert torch.equal(xv, xn[:, 5:]) and torch.equal(hv, h[:, 5:])
    assert rel_l2(h, layer_norm_affine_reference(x, w, b, 1e-5)) > 0.05  # the residual was applied
    with pytest.raises(InvalidArgumentError, match="weight"):
        residual_layer_norm(x, y, w[:3].contiguous(), b, 1e-5)


def test_fused_pairs_keep_an_fp32_residual_stream():
    x, y, shift, scale, gate = make(1, 3, 5, 96, torch.float32, y_dtype=torch.bfloat16, seed=7)
    w, b = torch.ones(96, device=DEVICE), torch.zeros(96, device=DEVICE)
    with poisoned_outputs():
        xr, hr = residual_adaln(x, y, shift, scale, 1e-6, out_dtype=torch.bfloat16)
        xg, hg = gated_residual_layer_norm(x, y, gate, w, b, 1e-6, out_dtype=torch.bfloat16)
    assert xr.dtype == xg.dtype == torch.float32 and hr.dtype == hg.dtype == torch.bfloat16
    assert torch.equal(xr, x + y)
    assert rel_l2(xg, gated_residual_reference(x, y, gate)) < 1e-6


def test_custom_ops_and_export():
    x, y, shift, scale, gate = make(1, 3, 5, 64, torch.float32, seed=4)
    w, b = shift[0, 0].contiguous(), scale[0, 0].contiguous()
    h = torch.ops.flashdreams.adaln_modulate(x, shift, scale, 1e-6, None)
    assert rel_l2(h, adaln_modulate_reference(x, shift, scale, 1e-6)) < 1e-6

    class Block(torch.nn.Module):
        def forward(self, x, y, shift, scale, gate):
            x1, h = gated_residual_adaln(x, y, gate, shift, scale, 1e-6)
            x2 = gated_residual(x1, h, gate)
            return layer_norm_affine(x2, w, b, 1e-6), adaln_modulate(x2, shift, scale, 1e-6)

    def twin(x, y, shift, scale, gate):
        x1, h = gated_residual_adaln_reference(x, y, gate, shift, scale, 1e-6)
        x2 = gated_residual_reference(x1, h, gate)
        return layer_norm_affine_reference(x2, w, b, 1e-6), adaln_modulate_reference(x2, shift, scale, 1e-6)

    args = (x, y, shift, scale, gate)
    ep = torch.export.export(Block(), args)
    graph = str(ep.graph)
    for name in ("gated_residual_adaln", "gated_residual", "layer_norm_affine", "adaln_modulate"):
        assert f"flashdreams.{name}" in graph
    for got, want in zip(ep.module()(*args), twin(*args)):
        assert rel_l2(got, want) < 1e-5


def test_bad_arguments_name_the_argument():
    x, y, shift, scale, gate = make(1, 3, 5, 64, torch.float32)
    with pytest.raises(InvalidArgumentError, match="shift"):
        adaln_modulate(x, shift.half(), scale, 1e-6)
    with pytest.raises(InvalidArgumentError, match="frames"):
        adaln_modulate(x, shift[:, :2], scale[:, :2], 1e-6)
    with pytest.raises(InvalidArgumentError, match="one frame count"):
        gated_residual_adaln(x, y, gate, shift[:, :1], scale, 1e-6)
    with pytest.raises(InvalidArgumentError, match="y"):
        gated_residual(x, y[:, :3], gate)
    with pytest.raises(InvalidArgumentError, match="bias"):
        layer_norm_affine(x, shift[0, 0].contiguous(), shift[0, 0, :3].contiguous(), 1e-6)
    with pytest.raises(InvalidArgumentError, match="out_dtype"):
        adaln_modulate(x, shift, scale, 1e-6, out_dtype=torch.int32)
    with pytest.raises(InvalidArgumentError, match="y"):
        residual_adaln(x, y[:, :3], shift, scale, 1e-6)
    with pytest.raises(InvalidArgumentError, match="scale"):
        residual_adaln(x, y, shift, scale.double(), 1e-6)
    with pytest.raises(InvalidArgumentError, match="weight"):
        gated_residual_layer_norm(x, y, gate, shift[0, 0, :3].contiguous(), shift[0, 0].contiguous(), 1e-6)
    with pytest.raises(InvalidArgumentError, match="gate"):
        gated_residual_layer_norm(x, y, gate[:, :, :3], shift[0, 0].contiguous(), shift[0, 0].contiguous(), 1e-6)


def test_opaque_ops_launch_directly_not_through_wrap_triton(monkeypatch):
    """An opaque op launches its kernel itself: `wrap_triton`'s eager dispatch cost every launch
    (bench/results/next33-h100/cold-profile.txt). With `triton_op`s (FD_TRITON_OP_INLINE=1) the
    launch still goes through it, which compile and export need to trace the body."""
    if not triton_available(DEVICE):
        pytest.skip("triton not available")
    import flashdreams.kernels.adaln as adaln_module

    wrapped = []
    real = torch.library.wrap_triton
    monkeypatch.setattr(torch.library, "wrap_triton", lambda k: wrapped.append(k) or real(k))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 64, generator=g).to(DEVICE)
    shift, scale = (torch.randn(1, 1, 64, generator=g).to(DEVICE) for _ in range(2))
    want = adaln_modulate_reference(x, shift, scale, 1e-6)
    assert rel_l2(adaln_modulate(x, shift, scale, 1e-6), want) < 1e-5
    assert wrapped == []

    monkeypatch.setenv("FD_TRITON_OP_INLINE", "1")  # the op body as a triton_op would run it
    assert rel_l2(adaln_module._adaln_modulate_op(x, shift, scale, 1e-6), want) < 1e-5
    assert wrapped == [adaln_module._adaln_kernel]


@pytest.mark.parametrize("rows_per_program,one_frame", [(4, True), (16, False)])
def test_rows_of_one_frame_load_each_modulation_once(monkeypatch, rows_per_program, one_frame):
    """When a program's rows all lie in one frame (its row count divides the frame size, as on a GPU:
    2 rows of 1536 against 1560-token frames), the per-frame gate/shift/scale are loaded once and
    broadcast; otherwise per row. Both give the twins' numbers; the launch says which ran."""
    import flashdreams.kernels.adaln as adaln_module

    modes = []
    real_launch = adaln_module.launch

    def spy(kernel, grid, *args, **kwargs):
        modes.append(kwargs["ONE_FRAME"])
        return real_launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(adaln_module, "row_tile", lambda width, rows, device: (rows_per_program, 4))
    monkeypatch.setattr(adaln_module, "launch", spy)
    x, y, shift, scale, gate = make(2, 3, 8, 96, torch.float32, seed=7)  # 8-token frames, L = 24
    x_new, h = gated_residual_adaln(x, y, gate, shift, scale, 1e-6)
    ref_x, ref_h = gated_residual_adaln_reference(x, y, gate, shift, scale, 1e-6)
    assert rel_l2(x_new, ref_x) < 1e-6 and rel_l2(h, ref_h) < 1e-5
    assert rel_l2(adaln_modulate(x, shift, scale, 1e-6), adaln_modulate_reference(x, shift, scale, 1e-6)) < 1e-5
    assert rel_l2(gated_residual(x, y, gate), gated_residual_reference(x, y, gate)) < 1e-6
    assert modes == [one_frame] * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,F,fs,D", SHAPES)
def test_gated_residual_with_token_modulation_and_affine_norm(dtype, B, F, fs, D):
    """LingBot's step after the self-attention in one pass: the gated residual, its camera's per-token
    scale/shift (bf16, as the session keeps them), the cross-attention's affine pre-norm. Equal to its
    twin, and in float32 to the three unfused kernels with the modulation between them."""
    x, y, _, _, gate = make(B, F, fs, D, dtype, seed=9)
    g = torch.Generator().manual_seed(10)
    tsc, tsh = ((torch.randn(B, F * fs, D, generator=g) * 0.3).to(torch.bfloat16).to(DEVICE) for _ in range(2))
    w = torch.randn(D, generator=g).to(DEVICE)
    b = torch.randn(D, generator=g).to(dtype).to(DEVICE)
    with poisoned_outputs():
        xm, h = gated_residual_modulate_layer_norm(x, y, gate, tsc, tsh, w, b, 1e-6)
        unfused = gated_residual(x, y, gate)
    assert xm.dtype == h.dtype == dtype
    ref_x, ref_h = gated_residual_modulate_layer_norm_reference(x, y, gate, tsc, tsh, w, b, 1e-6)
    assert rel_l2(xm, ref_x) < TOL[dtype] and rel_l2(h, ref_h) < TOL[dtype]
    if dtype == torch.float32:
        modulated = ((1 + tsc.float()) * unfused + tsh.float()).to(dtype)
        assert rel_l2(xm, modulated) < 1e-6
        assert rel_l2(h, layer_norm_affine(modulated, w, b, 1e-6)) < 1e-5
    # the modulation is there: without it the residual and the norm would differ
    assert rel_l2(xm, unfused) > 0.05 and rel_l2(h, layer_norm_affine_reference(unfused, w, b, 1e-6)) > 0.05
    with pytest.raises(InvalidArgumentError, match="token_scale"):
        gated_residual_modulate_layer_norm(x, y, gate, tsc[:, 1:], tsh, w, b, 1e-6)


def _forms(x, y, gate, shift, scale, w, b, tsc, tsh):
    """Each pass by name: (kernel call taking out_dtype, whether it has a residual, the norm of x' as a
    reference twin taking out_dtype)."""
    eps = 1e-6

    def modulated(xn, od):
        return adaln_modulate_reference(xn, shift, scale, eps, od)

    def affine(xn, od):
        return layer_norm_affine_reference(xn, w, b, eps, od)

    return {
        "adaln_modulate": (lambda od: adaln_modulate(x, shift, scale, eps, od), False, modulated),
        "layer_norm_affine": (lambda od: layer_norm_affine(x, w, b, eps, od), False, affine),
        "gated_residual_adaln": (lambda od: gated_residual_adaln(x, y, gate, shift, scale, eps, od), True, modulated),
        "residual_adaln": (lambda od: residual_adaln(x, y, shift, scale, eps, od), True, modulated),
        "gated_residual_layer_norm": (lambda od: gated_residual_layer_norm(x, y, gate, w, b, eps, od), True, affine),
        "residual_layer_norm": (lambda od: residual_layer_norm(x, y, w, b, eps, od), True, affine),
        "gated_residual_modulate_layer_norm": (
            lambda od: gated_residual_modulate_layer_norm(x, y, gate, tsc, tsh, w, b, eps, od),
            True,
            affine,
        ),
    }


FORMS = list(_forms(*[None] * 9))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("form", FORMS)
def test_h_quantized_for_an_fp8_linear_is_h_quantized(dtype, form):
    """out_dtype float8_e4m3fn: h comes out as Fp8Rows, bit-equal to rounding h to x's dtype and
    quantizing it per row (what an FP8 linear given h would do), and x' is the pass's usual x'."""
    from flashdreams.kernels.fp8_linear import FP8, Fp8Rows, quantize_rows_fp8

    B, F, fs, D = 2, 3, 5, 96
    x, y, shift, scale, gate = make(B, F, fs, D, dtype, seed=11)
    g = torch.Generator().manual_seed(12)
    w, b = torch.randn(D, generator=g).to(DEVICE), torch.randn(D, generator=g).to(dtype).to(DEVICE)
    tsc, tsh = ((torch.randn(B, F * fs, D, generator=g) * 0.3).to(dtype).to(DEVICE) for _ in range(2))
    run, has_residual, norm_twin = _forms(x, y, gate, shift, scale, w, b, tsc, tsh)[form]
    with poisoned_outputs():
        out, plain = run(FP8), run(None)
    if has_residual:
        (x_new, rows), (x_plain, h_plain) = out, plain
        assert torch.equal(x_new, x_plain)
    else:
        rows, h_plain, x_new = out, plain, x
    assert isinstance(rows, Fp8Rows)
    assert rows.values.dtype == FP8 and rows.values.shape == (B, F * fs, D) and rows.scale.shape == (B, F * fs)
    # The interpreter truncates its bf16 stores, so there the plain kernel's bf16 h is off by an ulp. On CUDA
    # the quantizing and the plain specializations of the kernel may contract h's multiply-add differently
    # (FMA or not): an fp32 or fp16 h can then differ by an ulp (found by the first CUDA run of this test,
    # bench/results/next79-h100); rounded to bf16, the engine's dtype, the two agree bit for bit.
    v8, s8 = quantize_rows_fp8(h_plain.reshape(-1, D))
    if (dtype != torch.bfloat16) == (DEVICE.type != "cuda"):
        assert torch.equal(rows.values.reshape(-1, D).view(torch.uint8), v8.view(torch.uint8))
        assert torch.equal(rows.scale.reshape(-1), s8)
    elif DEVICE.type == "cuda":
        assert rel_l2(rows.scale.reshape(-1), s8) < 1e-6
        assert (rows.values.reshape(-1, D).view(torch.uint8) != v8.view(torch.uint8)).float().mean() < 0.01
    want = norm_twin(x_new, FP8)  # the twin's h in x's dtype, quantized (fp32 LayerNorm sums in another order)
    # On CUDA the kernel's row sums and torch's run in other orders: a row's largest h can round an ulp of x's
    # dtype apart (next81-h100: 1.4e-4 against 1e-6), so its scale is held to that ulp there.
    scale_tol = 1e-6 if DEVICE.type != "cuda" else max(torch.finfo(dtype).eps, 1e-6)
    assert rel_l2(rows.scale, want.scale) < scale_tol and rel_l2(rows.dequantized(), want.dequantized()) < 1e-2
    # e4m3 keeps 3 mantissa bits: within 1/16 of each row's largest value of h
    err = (rows.dequantized() - h_plain.float()).abs().amax(-1) / h_plain.float().abs().amax(-1)
    assert err.max() <= 1 / 16


def test_quantized_h_through_export_and_its_argument_checks():
    """The quantizing pass is one custom op (`norm_rows_fp8`) that torch.export keeps; out_dtype still
    refuses what is neither a float dtype nor e4m3."""
    from flashdreams.kernels.fp8_linear import FP8

    x, y, shift, scale, gate = make(1, 3, 5, 64, torch.bfloat16, seed=13)

    class Pass(torch.nn.Module):
        def forward(self, x, y, gate, shift, scale):
            x1, rows = gated_residual_adaln(x, y, gate, shift, scale, 1e-6, FP8)
            return x1, rows.values, rows.scale

    args = (x, y, gate, shift, scale)
    ep = torch.export.export(Pass(), args)
    assert "flashdreams.norm_rows_fp8" in str(ep.graph)
    x1, values, row_scale = ep.module()(*args)
    want_x, want = gated_residual_adaln(x, y, gate, shift, scale, 1e-6, FP8)
    assert torch.equal(x1, want_x) and torch.equal(row_scale, want.scale)
    assert torch.equal(values.view(torch.uint8), want.values.view(torch.uint8))
    with pytest.raises(InvalidArgumentError, match="float8_e4m3fn"):
        adaln_modulate(x, shift, scale, 1e-6, out_dtype=torch.float8_e5m2)


def test_row_tile_is_one_row_of_eight_warps_from_2048_columns_on_a_gpu():
    """The AdaLN passes' tile (measured: bench/results/next74-h100): one row and 8 warps a program from 2048
    padded columns on CUDA; narrower rows and the interpreter keep the shared row rule."""
    from flashdreams.kernels._common import row_tile
    from flashdreams.kernels.adaln import adaln_tile

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert adaln_tile(2048, 4680, cuda) == (1, 8) and adaln_tile(8192, 4524, cuda) == (1, 8)
    assert row_tile(2048, 4680, cuda) == (2, 8)  # what the Self-Forcing and OmniDreams widths had
    assert adaln_tile(1024, 4680, cuda) == row_tile(1024, 4680, cuda)
    assert adaln_tile(2048, 4680, cpu) == row_tile(2048, 4680, cpu)
