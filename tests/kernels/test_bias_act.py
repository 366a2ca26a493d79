"""A conv's bias, residual and ReLU in one NHWC pass (kernels/bias_act.py), against torch's sequence, and TAEHV
decoding through it."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from flashdreams.errors import InvalidArgumentError  # noqa: E402
from flashdreams.kernels import bias_act as mod  # noqa: E402
from flashdreams.kernels import triton_available  # noqa: E402
from flashdreams.kernels._common import poisoned_outputs  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_available(DEVICE), reason="needs CUDA or TRITON_INTERPRET=1")


def _nhwc(*shape: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2
    return x.to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual,relu", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("shape", [(2, 48, 5, 7), (1, 24, 37, 31), (1, 3, 1, 1)])
def test_equals_torch_add_add_relu_bit_for_bit(dtype, residual, relu, shape):
    """y + bias (rounded), + residual (rounded), ReLU: the kernel's output is torch's, bit for bit, in the
    activations' layout; channel counts that are no power of two and pixel counts past a block included."""
    y = _nhwc(*shape, seed=1, dtype=dtype)
    bias = torch.randn(shape[1], generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    res = _nhwc(*shape, seed=3, dtype=dtype) if residual else None
    with poisoned_outputs():
        got = mod.bias_act(y, bias, res, relu=relu)
    want = mod.bias_act_reference(y, bias, res, relu=relu)
    assert got.shape == y.shape and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, want)
    assert (got < 0).any() != relu  # the ReLU ran exactly when asked
    if residual:  # and the residual was added (it is not small next to y)
        assert not torch.equal(got, mod.bias_act_reference(y, bias, None, relu=relu))


def test_refuses_bad_arguments_by_name():
    y = _nhwc(1, 8, 2, 3, seed=0, dtype=torch.float32)
    bias = torch.zeros(8, device=DEVICE)
    with pytest.raises(InvalidArgumentError, match="channels_last"):
        mod.bias_act(y.contiguous(), bias)
    with pytest.raises(InvalidArgumentError, match="bias"):
        mod.bias_act(y, torch.zeros(7, device=DEVICE))
    with pytest.raises(InvalidArgumentError, match="residual"):
        mod.bias_act(y, bias, _nhwc(1, 8, 2, 4, seed=0, dtype=torch.float32))
    with pytest.raises(InvalidArgumentError, match="residual"):
        mod.bias_act(y, bias, y.contiguous())


def test_taehv_memblocks_run_through_it_with_the_same_frames(count_calls, taehv_switch_streams):
    """An NHWC TAEHV streams the same frames with FUSED_BIAS_ACT on as off (bit for bit in float32), each of
    its MemBlock convs (3 a block) through one `bias_act` pass, the last of each block with the residual."""
    from flashdreams.models import taehv

    calls = count_calls(mod, "bias_act")
    model, outs = taehv_switch_streams("FUSED_BIAS_ACT", DEVICE)
    blocks = sum(isinstance(layer, taehv.MemBlock) for layer in model.decoder)
    with_residual = [args[2] is not None for args, _ in calls]  # _conv_relu passes the residual third
    assert len(calls) == 2 * 3 * blocks and sum(with_residual) == 2 * blocks  # the switched-on stream's 2 blocks
    assert torch.equal(outs[True], outs[False])
