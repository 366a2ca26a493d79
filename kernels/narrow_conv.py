"""A 3x3 convolution with few output channels (a decoder's last layer, to RGB), its input ReLU fused.

TAEHV's decoder ends `ReLU -> conv 3x3, 64 -> 3 channels` at full resolution. cuDNN serves that conv with
a tile 64 output channels wide of which 3 are used: at OmniDreams' 704x1280 (8 frames, NHWC bf16) it took
1.45 ms on an H100 for 25 GFLOP, and padding its outputs to 8, 16 or 32 channels did not make cuDNN pick
better (1.39 / 1.52 / 1.81 ms, bench/results/next78-h100); the ReLU before it was another full pass
(0.43 ms). The conv only needs to read its input once (923 MB there: 0.28 ms at the H100's copy rate).

Here each program takes BLOCK_W pixels of one image row, and for each of the 9 taps loads the shifted
[BLOCK_W, C_in] input tile (NHWC: one contiguous run; zero outside the image), applies the ReLU, and
multiplies it on the tensor cores by that tap's [C_in, 16] weights (the outputs padded to 16 columns,
tl.dot's narrowest); neighbouring taps hit the same lines in L1/L2, so HBM sees the input about once.
The bias is added in fp32 and the C_out real columns stored (NHWC). Accumulation is fp32 over taps and
channels, as cuDNN's; the order differs, so bf16 results agree to rounding, not bit for bit.
"""

from __future__ import annotations

import torch

from flashdreams.errors import InvalidArgumentError

from ._common import check_tensor, interpreted, launch, new_output, register_op, require_triton, tl, triton

OUT_PAD = 16  # output columns of the tensor-core product (tl.dot needs >= 16)
MAX_OUT = OUT_PAD


@triton.jit
def _conv3x3_narrow_kernel(
    X, W, B, Y, H, Wd, C_OUT,
    C_IN: tl.constexpr, RELU_IN: tl.constexpr, BLOCK_W: tl.constexpr, OUT_PAD: tl.constexpr,
):  # fmt: skip
    """X [N, H, Wd, C_IN] (NHWC), W [9, C_IN, OUT_PAD] (tap-major, zero past C_OUT), B [OUT_PAD] fp32 ->
    Y [N, H, Wd, C_OUT]: BLOCK_W pixels of image row pid(0) (= n * H + h)."""
    row = tl.program_id(0)
    n = row // H
    h = row % H
    w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    c = tl.arange(0, C_IN)
    o = tl.arange(0, OUT_PAD)
    acc = tl.zeros([BLOCK_W, OUT_PAD], dtype=tl.float32)
    img = X + n.to(tl.int64) * H * Wd * C_IN
    for tap in tl.static_range(9):
        # the tap's row as a [BLOCK_W] vector, so that the mask is one vector (the interpreter refuses a mask
        # that mixes scalars and vectors)
        hh = h + (tap // 3 - 1) + tl.zeros([BLOCK_W], dtype=tl.int32)
        ww = w + (tap % 3 - 1)
        ok = (ww >= 0) & (ww < Wd) & (hh >= 0) & (hh < H)
        x = tl.load(img + (hh * Wd + ww).to(tl.int64)[:, None] * C_IN + c[None, :], mask=ok[:, None], other=0.0)
        if RELU_IN:
            x = tl.maximum(x, 0.0).to(X.dtype.element_ty)  # the max with a float promotes; tl.dot wants one dtype
        wt = tl.load(W + tap * C_IN * OUT_PAD + c[:, None] * OUT_PAD + o[None, :])
        acc = tl.dot(x, wt, acc)
    acc += tl.load(B + o)[None, :]
    out = Y + (row.to(tl.int64) * Wd + w.to(tl.int64))[:, None] * C_OUT + o[None, :]
    tl.store(out, acc.to(Y.dtype.element_ty), mask=(w < Wd)[:, None] & (o < C_OUT)[None, :])


def _conv3x3_narrow_op(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, c_out: int, relu_in: bool) -> torch.Tensor:
    N, H, Wd, C = x.shape
    y = new_output((N, H, Wd, c_out), x.dtype, x.device)
    block_w = 128 if not interpreted() else 256
    launch(
        _conv3x3_narrow_kernel, (N * H, triton.cdiv(Wd, block_w)),
        x, w, b, y, H, Wd, c_out,
        C_IN=C, RELU_IN=relu_in, BLOCK_W=block_w, OUT_PAD=OUT_PAD, num_warps=4,
    )  # fmt: skip
    return y


register_op("conv3x3_narrow", _conv3x3_narrow_op)


def narrow_conv_weights(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A conv's weight [C_out, C_in, 3, 3] and bias as the kernel reads them: [9, C_in, 16] in the weight's
    dtype (tap-major, zero past C_out) and [16] float32. A few KB: TAEHV builds them in each decode (four small
    launches, captured with it), so that they always follow the conv's parameters."""
    c_out, c_in = weight.shape[:2]
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3) or c_out > MAX_OUT:
        raise InvalidArgumentError(
            f"narrow conv: expected a weight [C_out <= {MAX_OUT}, C_in, 3, 3], found {list(weight.shape)}"
        )
    w = torch.zeros(9, c_in, OUT_PAD, dtype=weight.dtype, device=weight.device)
    w[:, :, :c_out] = weight.detach().permute(2, 3, 1, 0).reshape(9, c_in, c_out)
    b = torch.zeros(OUT_PAD, dtype=torch.float32, device=weight.device)
    if bias is not None:
        b[:c_out] = bias.detach().float()
    return w, b


def conv3x3_narrow(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, c_out: int, relu_in: bool = False
) -> torch.Tensor:
    """conv2d(relu(x) if relu_in else x, weight, bias, padding=1) for `narrow_conv_weights(weight, bias)` =
    (w, b). x [N, C_in, H, W] in channels_last memory (C_in a power of two, 16..256) -> [N, c_out, H, W] in
    channels_last memory, x's dtype."""
    check_tensor("x", x, ndim=4, dtypes=(torch.float32, torch.bfloat16, torch.float16))
    N, C, H, Wd = x.shape
    if not x.is_contiguous(memory_format=torch.channels_last) or C & (C - 1) or not 16 <= C <= 256:
        raise InvalidArgumentError(
            f"narrow conv: x must be channels_last with a power-of-two channel count in 16..256, found shape "
            f"{list(x.shape)}, strides {list(x.stride())}"
        )
    check_tensor("w", w, ndim=3, dtypes=(x.dtype,), device=x.device)
    check_tensor("b", b, ndim=1, dtypes=(torch.float32,), device=x.device)
    if tuple(w.shape) != (9, C, OUT_PAD) or tuple(b.shape) != (OUT_PAD,) or not 1 <= c_out <= MAX_OUT:
        raise InvalidArgumentError(
            f"narrow conv: expected w [9, {C}, {OUT_PAD}], b [{OUT_PAD}] and 1 <= c_out <= {MAX_OUT}, found "
            f"{list(w.shape)}, {list(b.shape)}, c_out {c_out}"
        )
    require_triton(x.device)
    y = torch.ops.flashdreams.conv3x3_narrow(x.permute(0, 2, 3, 1), w.contiguous(), b, int(c_out), bool(relu_in))
    return y.permute(0, 3, 1, 2)


def conv3x3_narrow_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu_in: bool = False
) -> torch.Tensor:
    """The torch form: conv2d(relu(x) if relu_in else x, weight, bias, padding=1)."""
    return torch.nn.functional.conv2d(torch.relu(x) if relu_in else x, weight, bias, padding=1)
