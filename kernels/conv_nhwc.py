"""2-D and 3-D convolutions whose outputs are channels-last by contract, for decoders and encoders that run so.

TAEHV picks its Triton passes (kernels/bias_act.py, memblock_join.py, upsample_frames.py, narrow_conv.py) by its
activations' layout. Run eagerly on CUDA, cuDNN returns a channels-last output for channels-last inputs and
weights, so those passes run. Traced for an engine (torch.export, torch 2.11 on an H100), the convolution
reported contiguous NCHW outputs for the same inputs (bench/results/next111-h100: every call site saw NCHW; a plain
FakeTensorMode convolution on the same device keeps NHWC, next114, so the export's own tracing loses it), so
the engine's decode graphs held the torch sequences instead, and the engine decoded a Self-Forcing block in 8.3
against the eager 6.4 ms. As a custom op, the convolution's output layout is what its fake implementation says,
the same in eager runs, traces and compiled graphs; the real one is cuDNN's convolution, unchanged.

The 3-D form serves the channels_last_3d Wan VAE (the OmniDreams HD-map encoder on CUDA, `WanVAE.use_channels_last`)
for the same reason: traced for an engine on an H100 (next114), its activations came out NCDHW.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flashdreams.errors import InvalidArgumentError

from ._common import register_op, require_triton, triton_available


def _check_conv(
    name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dims: int, expected: str
) -> None:
    """x and weight of `dims` dims (as `expected` says, for the error), one C; bias None or [O]."""
    if x.dim() != dims or weight.dim() != dims or x.shape[1] != weight.shape[1]:
        raise InvalidArgumentError(
            f"{name}: {expected} with one C expected, found x {list(x.shape)}, weight {list(weight.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise InvalidArgumentError(f"{name}: bias must be [{weight.shape[0]}], found {list(bias.shape)}")


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
    _check_conv("conv2d_nhwc", x, weight, bias, 4, "x [N, C, H, W] and weight [O, C, kh, kw]")
    require_triton(x.device)  # (the op is registered with our others)
    return torch.ops.flashdreams.conv2d_nhwc(x, weight, bias, int(stride), int(padding))


def _conv3d_ndhwc_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int], padding: list[int]
) -> torch.Tensor:
    # As the 2-D op: also the fake implementation, the layout from the explicit copy.
    cl3 = torch.channels_last_3d
    return F.conv3d(x.contiguous(memory_format=cl3), weight, bias, stride, padding).contiguous(memory_format=cl3)


register_op("conv3d_ndhwc", _conv3d_ndhwc_op)


def conv3d_ndhwc(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: tuple[int, int, int] = (1, 1, 1),
    padding: tuple[int, int, int] = (0, 0, 0),
) -> torch.Tensor:
    """F.conv3d(x, weight, bias, stride, padding) for x [N, C, T, H, W] and weight [O, C, kt, kh, kw] (groups 1,
    no dilation; stride and padding per dim), returned in channels_last_3d memory, traced as such."""
    _check_conv("conv3d_ndhwc", x, weight, bias, 5, "x [N, C, T, H, W] and weight [O, C, kt, kh, kw]")
    if len(stride) != 3 or len(padding) != 3:
        raise InvalidArgumentError(
            f"conv3d_ndhwc: stride and padding of 3 dims expected, found {list(stride)}, {list(padding)}"
        )
    require_triton(x.device)  # (the op is registered with our others)
    return torch.ops.flashdreams.conv3d_ndhwc(x, weight, bias, [int(v) for v in stride], [int(v) for v in padding])


def conv_pinned_where_it_runs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...] | str,
    dilation: tuple[int, ...],
    groups: int,
) -> torch.Tensor:
    """The 2-D or 3-D convolution (by the weight's dims) through `conv2d_nhwc` / `conv3d_ndhwc` where they apply
    (Triton runs on x's device, groups 1, no dilation; the 2-D op: one stride and one padding for both dims), else
    through F.conv2d / F.conv3d: the same numbers, the output channels-last by contract only in the first case.
    Whether the layout should be pinned at all (the activations' or the weight's layout) is the caller's rule."""
    conv = F.conv2d if weight.dim() == 4 else F.conv3d
    plain = isinstance(padding, tuple) and groups == 1 and all(d == 1 for d in dilation)
    if plain and triton_available(x.device):
        if weight.dim() == 5:
            return conv3d_ndhwc(x, weight, bias, stride, padding)
        if len({*padding}) == 1 and len({*stride}) == 1:
            return conv2d_nhwc(x, weight, bias, stride[0], padding[0])
    return conv(x, weight, bias, stride, padding, dilation, groups)
