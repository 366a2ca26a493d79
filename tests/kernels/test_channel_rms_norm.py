"""The Wan VAE's channel RMS norm (+ SiLU) kernel against its twin and the VAE's own torch layers."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch import nn  # noqa: E402

from flashdreams.errors import InvalidArgumentError  # noqa: E402
from flashdreams.kernels import triton_available  # noqa: E402
from flashdreams.kernels._common import poisoned_outputs  # noqa: E402
from flashdreams.kernels.channel_rms_norm import (  # noqa: E402
    channel_rms_norm,
    channel_rms_norm_padded,
    channel_rms_norm_padded_reference,
    channel_rms_norm_reference,
)
from flashdreams.models.wan_vae_blocks import RMSNorm  # noqa: E402
from flashdreams.numerics import rel_l2  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_available(DEVICE), reason="needs CUDA or TRITON_INTERPRET=1")
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


def _video(shape, dtype, seed, channels_last=False):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3 + 1).to(DEVICE, dtype)
    return x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 24, 3, 5, 7), (1, 96, 2, 4, 6), (1, 3, 1, 2, 3)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("silu", [False, True])
def test_matches_twin_and_the_vae_layers(dtype, shape, channels_last, silu):
    x = _video(shape, dtype, seed=sum(shape), channels_last=channels_last)
    norm = RMSNorm(shape[1], images=False).to(DEVICE)
    with torch.no_grad():
        norm.gamma.uniform_(0.5, 1.5, generator=torch.Generator(device=DEVICE).manual_seed(1))
    with poisoned_outputs():
        y = channel_rms_norm(x, norm.gamma, silu=silu)
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride()  # x's layout kept
    assert rel_l2(y, channel_rms_norm_reference(x, norm.gamma, silu)) < TOL[dtype]
    with torch.no_grad():
        layers = norm(x.float())
        layers = nn.functional.silu(layers) if silu else layers
    assert rel_l2(y, layers) < TOL[dtype] * 2


def test_strided_views_and_zero_pixels():
    """A time slice of a cache (pixels not flattenable by one stride) is made contiguous first; an
    all-zero pixel stays zero (the 1e-12 floor), as F.normalize leaves it."""
    big = _video((1, 8, 5, 4, 6), torch.float32, seed=3)
    view = big[:, :, 1:4, :, 1:5]
    gamma = torch.linspace(0.5, 1.5, 8, device=DEVICE)
    assert rel_l2(channel_rms_norm(view, gamma), channel_rms_norm_reference(view, gamma)) < 1e-6
    x = big.clone()
    x[:, :, 0, 0, 0] = 0
    y = channel_rms_norm(x, gamma, silu=True)
    assert torch.equal(y[:, :, 0, 0, 0], torch.zeros_like(y[:, :, 0, 0, 0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ones", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_padded_form_writes_the_norm_after_the_past_and_pads_with_zeros(dtype, ones, channels_last):
    """A narrow conv's padded input in one pass: frames [past | norm(x)], channels [C real | zeros], channel
    C one with `ones` (the folded bias's input), channels_last_3d."""
    x = _video((2, 5, 3, 4, 6), dtype, seed=11, channels_last=channels_last)
    past = _video((2, 5, 2, 4, 6), dtype, seed=12)
    gamma = torch.linspace(0.5, 1.5, 5, device=DEVICE)
    with poisoned_outputs():
        out = channel_rms_norm_padded(x, gamma, True, past, 8, ones)
    assert out.shape == (2, 8, 5, 4, 6) and out.is_contiguous(memory_format=torch.channels_last_3d)
    ref = channel_rms_norm_padded_reference(x, gamma, True, past, 8, ones)
    assert torch.equal(out[:, :5, :2], past)
    assert rel_l2(out[:, :5, 2:], channel_rms_norm_reference(x, gamma, True)) < TOL[dtype]
    assert rel_l2(out, ref) < TOL[dtype]
    assert torch.equal(out[:, 5], torch.full_like(out[:, 5], float(ones)))
    assert torch.count_nonzero(out[:, 6:]) == 0


def test_padded_form_copies_a_padded_past_whole():
    """A past of `channels` channels (a narrow conv's padded cache, its ones and zeros included) lands as it is."""
    x = _video((1, 5, 3, 4, 6), torch.float32, seed=13, channels_last=True)
    past = _video((1, 8, 2, 4, 6), torch.float32, seed=14, channels_last=True)
    gamma = torch.linspace(0.5, 1.5, 5, device=DEVICE)
    out = channel_rms_norm_padded(x, gamma, False, past, 8, ones=True)
    assert torch.equal(out[:, :, :2], past)
    assert rel_l2(out, channel_rms_norm_padded_reference(x, gamma, False, past, 8, ones=True)) < 1e-6


def test_padded_form_refuses_what_does_not_fit():
    x = _video((1, 8, 2, 3, 4), torch.float32, seed=4)
    gamma, past = torch.ones(8, device=DEVICE), torch.zeros(1, 8, 2, 3, 4, device=DEVICE)
    with pytest.raises(InvalidArgumentError, match="channels"):
        channel_rms_norm_padded(x, gamma, True, past, 8, ones=True)
    with pytest.raises(InvalidArgumentError, match="past"):
        channel_rms_norm_padded(x, gamma, True, past[:, :4], 16)
    with pytest.raises(InvalidArgumentError, match="gamma"):
        channel_rms_norm_padded(x, gamma[:7], True, past, 16)


def test_bad_arguments_name_the_argument():
    x = _video((1, 8, 2, 3, 4), torch.float32, seed=4)
    with pytest.raises(InvalidArgumentError, match="x"):
        channel_rms_norm(x[0], torch.ones(8, device=DEVICE))
    with pytest.raises(InvalidArgumentError, match="gamma"):
        channel_rms_norm(x, torch.ones(7, device=DEVICE))
    with pytest.raises(InvalidArgumentError, match="x"):
        channel_rms_norm(x.to(torch.int32), torch.ones(8, device=DEVICE))


def test_custom_op_exports():
    x = _video((1, 8, 2, 3, 4), torch.float32, seed=5)
    gamma = torch.linspace(0.5, 1.5, 8, device=DEVICE)

    class Block(nn.Module):
        def forward(self, x):
            return channel_rms_norm(x, gamma, silu=True)

    ep = torch.export.export(Block(), (x,))
    assert "flashdreams.channel_rms_norm" in str(ep.graph)
    assert rel_l2(ep.module()(x), channel_rms_norm_reference(x, gamma, True)) < 1e-6
