"""TAEHV's frame split and nearest upsampling as one NHWC copy (kernels/upsample_frames.py), against torch's
sequence, and TAEHV decoding through it."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from flashdreams.errors import InvalidArgumentError  # noqa: E402
from flashdreams.kernels import triton_available  # noqa: E402
from flashdreams.kernels import upsample_frames as mod  # noqa: E402
from flashdreams.kernels._common import poisoned_outputs  # noqa: E402
from flashdreams.numerics import rel_l2  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_available(DEVICE), reason="needs CUDA or TRITON_INTERPRET=1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,groups,c,h,w,factor", [(2, 2, 48, 3, 37, 2), (1, 1, 64, 2, 5, 2), (3, 2, 8, 1, 150, 1)])
def test_equals_the_frame_split_then_nearest_upsampling(dtype, n, groups, c, h, w, factor):
    """Channel group g of image i becomes image i*G + g, each pixel repeated f x f: the very values of torch's
    reshape and repeat_interleave, in channels_last memory (channel counts no power of two, widths past a
    block included)."""
    y = torch.randn(n, groups * c, h, w, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    y = y.contiguous(memory_format=torch.channels_last)
    with poisoned_outputs():
        got = mod.upsample_frames(y, groups, factor)
    want = mod.upsample_frames_reference(y, groups, factor)
    assert got.shape == (n * groups, c, h * factor, w * factor)
    assert got.is_contiguous(memory_format=torch.channels_last) and torch.equal(got, want)
    if groups > 1:  # the groups are frames, not channels: swapping them is caught
        swapped = y.reshape(n, groups, c, h, w).flip(1).reshape(n, groups * c, h, w)
        assert not torch.equal(got, mod.upsample_frames_reference(swapped, groups, factor))


def test_refuses_bad_arguments_by_name():
    y = torch.zeros(1, 8, 2, 3, device=DEVICE).contiguous(memory_format=torch.channels_last)
    with pytest.raises(InvalidArgumentError, match="channels_last"):
        mod.upsample_frames(y.contiguous(), 2, 2)
    with pytest.raises(InvalidArgumentError, match="groups"):
        mod.upsample_frames(y, 3, 2)
    with pytest.raises(InvalidArgumentError, match="factor"):
        mod.upsample_frames(y, 2, 0)


def test_taehv_stages_split_and_upsample_through_it(count_calls, taehv_switch_streams):
    """An NHWC TAEHV streams the same frames with UPSAMPLE_FRAMES_KERNEL on as off (its TGrow 1x1 convs now
    run before the upsampling, at a quarter of the pixels: equal to rounding), one call a stage."""
    from flashdreams.models import taehv

    calls = count_calls(mod, "upsample_frames")
    model, outs = taehv_switch_streams("UPSAMPLE_FRAMES_KERNEL", DEVICE)
    stages = sum(isinstance(layer, taehv.TGrow) for layer in model.decoder)
    assert len(calls) == 2 * stages  # the switched-on stream's two blocks
    cfg = model.config
    strides = (False, *cfg.decoder_time_upscale)  # the first stage never grows time
    want = [(2 if t else 1, 2 if s else 1) for t, s in zip(strides, cfg.decoder_space_upscale)]
    assert [args[1:] for args, _ in calls[:stages]] == want
    # equal to rounding: on CUDA the float32 convs run in TF32 and cuDNN picks its algorithm by size
    # (next82-h100: 1.2e-4), on the CPU 1e-6
    tol = 1e-3 if DEVICE.type == "cuda" else 1e-6
    assert outs[True].shape == outs[False].shape and rel_l2(outs[True], outs[False]) < tol
