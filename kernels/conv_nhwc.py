"""A 2-D convolution whose output is channels-last by contract, for decoders that run in NHWC.

TAEHV picks its Triton passes (kernels/bias_act.py, memblock_join.py, upsample_frames.py, narrow_conv.py) by its
activations' layout. Run eagerly on CUDA, cuDNN returns a channels-last output for channels-last inputs and
weights, so those passes run. Traced for an engine (torch.export, torch 2.11 on an H100), the fake convolution
reported contiguous NCHW outputs for the same inputs (bench/results/next111-h100: every call site saw NCHW), so
the engine's decode graphs held the torch sequences instead, and the engine decoded a Self-Forcing block in 8.3
against the eager 6.4 ms. As a custom op, the convolution's output layout is what its fake implementation says,
the same in eager runs, traces and compiled graphs; the real one is cuDNN's convolution, unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flashdreams.errors import InvalidArgumentError

from ._common import register_op, require_triton


def _conv2d_nhwc_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int
) -> torch.Tensor:
    # Also the fake implementation (register_op): on fake tensors the layout comes from the explicit copy.
    y = F.conv2d(x.contiguous(memory_format=torch.channels_last), weight, bias, stride, padding)
    return y.contiguous(memory_format=torch.channels_last)  # (cuDNN's output already is: no copy there)


register_op("conv2d_nhwc", _conv2d_nhwc_op)


def conv2d_nhwc(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1, padding: int = 0
) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride, padding) for x [N, C, H, W] and weight [O, C, kh, kw] (groups 1, no
    dilation), returned in channels_last memory, traced as such."""
    if x.dim() != 4 or weight.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise InvalidArgumentError(
            f"conv2d_nhwc: x [N, C, H, W] and weight [O, C, kh, kw] with one C expected, found x {list(x.shape)}, "
            f"weight {list(weight.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise InvalidArgumentError(f"conv2d_nhwc: bias must be [{weight.shape[0]}], found {list(bias.shape)}")
    require_triton(x.device)  # (the op is registered with our others)
    return torch.ops.flashdreams.conv2d_nhwc(x, weight, bias, int(stride), int(padding))
