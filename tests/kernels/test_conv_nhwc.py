"""The layout-pinned convolution (kernels/conv_nhwc.py): cuDNN's (or the CPU's) numbers, channels-last outputs in
eager runs and on fake tensors, named errors; TAEHV's convs go through it on NHWC activations."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flashdreams.errors import InvalidArgumentError  # noqa: E402
from flashdreams.kernels import conv_nhwc, triton_available  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_available(DEVICE), reason="needs CUDA or TRITON_INTERPRET=1")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


def _nhwc(*shape: int, seed: int) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x.to(DEVICE, DTYPE).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(("kernel", "stride", "padding", "bias"), [(3, 1, 1, True), (3, 1, 1, False), (1, 1, 0, False)])
def test_equals_the_convolution_and_stays_channels_last(kernel, stride, padding, bias):
    x = _nhwc(2, 16, 9, 13, seed=1)
    w = _nhwc(24, 16, kernel, kernel, seed=2)
    b = torch.randn(24, generator=torch.Generator().manual_seed(3)).to(DEVICE, DTYPE) if bias else None
    got = conv_nhwc.conv2d_nhwc(x, w, b, stride, padding)
    want = F.conv2d(x, w, b, stride, padding)
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    assert torch.equal(got, want)


def test_an_nchw_input_gives_the_same_numbers_channels_last():
    x = _nhwc(1, 8, 6, 7, seed=4)
    w = _nhwc(8, 8, 3, 3, seed=5)
    got = conv_nhwc.conv2d_nhwc(x.contiguous(), w, None, 1, 1)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, F.conv2d(x, w, None, 1, 1))


def test_fake_tensors_come_out_channels_last():
    """What a trace sees (torch.export, Inductor): the layout by contract, whatever the fake convolution reports
    (on the CPU it reports NCHW for an NCHW input; on CUDA, torch 2.11, it did for NHWC ones too, next111)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    x = mode.from_tensor(_nhwc(3, 32, 10, 12, seed=6).contiguous())
    w = mode.from_tensor(_nhwc(16, 32, 3, 3, seed=7))
    with mode:
        y = conv_nhwc.conv2d_nhwc(x, w, None, 1, 1)
    assert y.shape == (3, 16, 10, 12)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "b_shape", "match"),
    [
        ((2, 16, 5, 5), (8, 12, 3, 3), None, "one C"),
        ((16, 5, 5), (8, 16, 3, 3), None, "x \\[N, C, H, W\\]"),
        ((2, 16, 5, 5), (8, 16, 3, 3), (4,), "bias must be \\[8\\]"),
    ],
)
def test_mismatched_shapes_are_refused_by_name(x_shape, w_shape, b_shape, match):
    x, w = torch.zeros(x_shape, device=DEVICE), torch.zeros(w_shape, device=DEVICE)
    b = None if b_shape is None else torch.zeros(b_shape, device=DEVICE)
    with pytest.raises(InvalidArgumentError, match=match):
        conv_nhwc.conv2d_nhwc(x, w, b, 1, 1)


def test_taehv_convs_run_through_it_on_nhwc_activations_only(monkeypatch):
    """TAEHV's convs (NHWCConv2d, its MemBlocks' bias-free convs) call the op on NHWC activations and weights,
    and F.conv2d on NCHW ones, with the same numbers either way."""
    from flashdreams.models import taehv

    calls = []
    real = conv_nhwc.conv2d_nhwc
    monkeypatch.setattr(conv_nhwc, "conv2d_nhwc", lambda *a: calls.append(a[0].shape) or real(*a))
    conv = taehv.NHWCConv2d(16, 8, 3, padding=1).to(DEVICE, DTYPE)
    x = _nhwc(2, 16, 6, 6, seed=8)
    want = conv(x.contiguous())  # NCHW module and input: F.conv2d
    assert calls == []
    conv = conv.to(memory_format=torch.channels_last)
    got = conv(x)
    assert calls == [x.shape]
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want)
    uneven = taehv.NHWCConv2d(16, 8, 3, padding=(1, 0)).to(DEVICE, DTYPE).to(memory_format=torch.channels_last)
    assert uneven(x).shape == (2, 8, 6, 4) and calls == [x.shape]  # (the op takes one stride and padding: F.conv2d)


def _ndhwc(*shape: int, seed: int) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x.to(DEVICE, DTYPE).contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize(("stride", "padding", "bias"), [((1, 1, 1), (0, 1, 1), True), ((2, 1, 1), (0, 0, 0), False)])
def test_the_3d_form_equals_the_convolution_and_stays_ndhwc(stride, padding, bias):
    x = _ndhwc(1, 8, 5, 6, 7, seed=11)
    w = _ndhwc(12, 8, 3, 3, 3, seed=12)
    b = torch.randn(12, generator=torch.Generator().manual_seed(13)).to(DEVICE, DTYPE) if bias else None
    got = conv_nhwc.conv3d_ndhwc(x.contiguous(), w, b, stride, padding)  # (an NCDHW input is made NDHWC)
    want = F.conv3d(x, w, b, stride, padding)
    assert got.is_contiguous(memory_format=torch.channels_last_3d) and not got.is_contiguous()
    torch.testing.assert_close(got, want)


def test_the_3d_form_comes_out_ndhwc_on_fake_tensors_and_refuses_bad_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    x = mode.from_tensor(_ndhwc(1, 8, 4, 6, 6, seed=14).contiguous())
    w = mode.from_tensor(_ndhwc(16, 8, 3, 3, 3, seed=15))
    with mode:
        y = conv_nhwc.conv3d_ndhwc(x, w, None, (1, 1, 1), (0, 1, 1))
    assert y.shape == (1, 16, 2, 6, 6)
    assert y.is_contiguous(memory_format=torch.channels_last_3d) and not y.is_contiguous()
    x, w = torch.zeros(1, 8, 4, 6, 6, device=DEVICE), torch.zeros(16, 8, 3, 3, 3, device=DEVICE)
    with pytest.raises(InvalidArgumentError, match="one C expected"):
        conv_nhwc.conv3d_ndhwc(x[:, :4], w)
    with pytest.raises(InvalidArgumentError, match="bias must be \\[16\\]"):
        conv_nhwc.conv3d_ndhwc(x, w, torch.zeros(8, device=DEVICE))
    with pytest.raises(InvalidArgumentError, match="stride and padding of 3 dims"):
        conv_nhwc.conv3d_ndhwc(x, w, None, (1, 1), (0, 1, 1))


@pytest.mark.parametrize("form", [None, "pad", "fold"])
def test_wan_vae_causal_convs_run_through_it_when_their_weights_are_ndhwc(form, monkeypatch):
    """A CausalConv3d whose weight is held channels_last_3d calls the 3-D op, with the numbers of F.conv3d; with a
    contiguous weight it does not. The "fold" form's 2-D conv over NHWC frames (its weight made channels-last by the
    fold itself) calls the 2-D op either way."""
    from flashdreams.models.wan_vae_blocks import CausalConv3d

    calls = []
    real3, real2 = conv_nhwc.conv3d_ndhwc, conv_nhwc.conv2d_nhwc
    monkeypatch.setattr(conv_nhwc, "conv3d_ndhwc", lambda *a: calls.append(3) or real3(*a))
    monkeypatch.setattr(conv_nhwc, "conv2d_nhwc", lambda *a: calls.append(2) or real2(*a))
    torch.manual_seed(0)
    conv = CausalConv3d(3, 8, 3, spatial_pad=1).to(DEVICE, DTYPE).eval()
    conv.narrow_form, conv.slot = form, 0
    x = _ndhwc(1, 3, 4, 6, 6, seed=16)
    with torch.no_grad():
        want = conv(x, [None])
        assert calls == ([2] if form == "fold" else [])
        calls.clear()
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
        got = conv(x, [None])
    assert calls == [2 if form == "fold" else 3]
    assert got.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(got, want)
