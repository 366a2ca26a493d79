"""The 3x3 conv with few output channels (TAEHV's last layer) and its fused input ReLU, against torch's conv."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from flashdreams.errors import InvalidArgumentError  # noqa: E402
from flashdreams.kernels import triton_available  # noqa: E402
from flashdreams.kernels._common import poisoned_outputs  # noqa: E402
from flashdreams.kernels.narrow_conv import (  # noqa: E402
    conv3x3_narrow,
    conv3x3_narrow_reference,
    narrow_conv_weights,
)
from flashdreams.numerics import rel_l2  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_available(DEVICE), reason="needs CUDA or TRITON_INTERPRET=1")


def _case(n, c_in, h, w, c_out, seed, dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=g).to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(c_out, c_in, 3, 3, generator=g) / (9 * c_in) ** 0.5).to(DEVICE, dtype)
    b = (torch.randn(c_out, generator=g)).to(DEVICE, dtype) if bias else None
    return x, weight, b


@pytest.mark.parametrize("relu_in", [False, True])
@pytest.mark.parametrize(
    "n,c_in,h,w,c_out,bias", [(2, 16, 5, 300, 3, True), (1, 64, 3, 7, 16, False), (1, 32, 1, 1, 1, True)]
)
def test_matches_torch_conv(relu_in, n, c_in, h, w, c_out, bias):
    """Every pixel, border rows and columns included (zero padding), across more than one column block."""
    x, weight, b = _case(n, c_in, h, w, c_out, seed=c_in + w, bias=bias)
    wk, bk = narrow_conv_weights(weight, b)
    with poisoned_outputs():
        y = conv3x3_narrow(x, wk, bk, c_out, relu_in=relu_in)
    want = conv3x3_narrow_reference(x, weight, b, relu_in=relu_in)
    assert y.shape == want.shape and y.is_contiguous(memory_format=torch.channels_last)
    tol = 1e-5 if DEVICE.type == "cpu" else 2e-3  # the GPU's tl.dot rounds fp32 inputs to tf32
    assert rel_l2(y, want) < tol
    if relu_in:  # the ReLU really is applied: without it the result differs
        assert rel_l2(y, conv3x3_narrow_reference(x, weight, b)) > 0.05


@pytest.mark.skipif(DEVICE.type != "cuda", reason="bf16 tensor-core path")
@pytest.mark.gpu
def test_bf16_matches_cudnn_to_rounding():
    x, weight, b = _case(3, 64, 40, 200, 3, seed=1, dtype=torch.bfloat16)
    wk, bk = narrow_conv_weights(weight, b)
    y = conv3x3_narrow(x, wk, bk, 3, relu_in=True)
    assert rel_l2(y.float(), conv3x3_narrow_reference(x, weight, b, relu_in=True).float()) < 1e-2


def test_bad_arguments_are_refused_by_name():
    x, weight, b = _case(1, 16, 4, 4, 3, seed=0)
    wk, bk = narrow_conv_weights(weight, b)
    with pytest.raises(InvalidArgumentError, match="channels_last"):
        conv3x3_narrow(x.contiguous(), wk, bk, 3)  # NCHW memory
    with pytest.raises(InvalidArgumentError, match="power-of-two"):
        conv3x3_narrow(_case(1, 24, 4, 4, 3, seed=0)[0], wk, bk, 3)
    with pytest.raises(InvalidArgumentError, match="c_out"):
        conv3x3_narrow(x, wk, bk, 17)
    with pytest.raises(InvalidArgumentError, match="C_out <= 16"):
        narrow_conv_weights(torch.zeros(17, 16, 3, 3), None)
    with pytest.raises(InvalidArgumentError, match="C_out <= 16"):
        narrow_conv_weights(torch.zeros(3, 16, 5, 5), None)
