"""A conv's bias, an optional residual and a ReLU in one pass over its NHWC output.

torch runs a cuDNN convolution without its bias and then adds the bias as a broadcast `add_`; on a
channels-last output that add takes TensorIterator's generic (non-vectorized) path. TAEHV's MemBlock then
makes two more passes: ReLU, or the residual add and ReLU. At OmniDreams' decode (the last stage's nine
convs on [4, 64, 352, 640] bf16, 58 MB each) the bias adds took 1.43 ms and the ReLUs 0.49 ms of an H200's
chunk (bench/results/NOTES.md, next76 op-sources), where each pass moves its bytes at about half the copy
rate. Here each program takes BLOCK_P pixels x all channels (NHWC: one contiguous run), adds the bias and
the residual, applies the ReLU and writes the result once.

The sums round as torch's sequence does: y + bias rounded to y's dtype, then + residual rounded again, then
the ReLU, so the result equals `relu(conv(x) + bias [+ residual])` computed by torch bit for bit.
"""

from __future__ import annotations

import torch

from flashdreams.errors import InvalidArgumentError

from ._common import check_tensor, interpreted, launch, new_output, next_pow2, register_op, require_triton, tl, triton
from ._rounding import round_to_f32


@triton.jit
def _bias_act_kernel(
    Y, B, R, OUT, P, C,
    C_PAD: tl.constexpr, BLOCK_P: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    """Y, R, OUT [P, C] row-major (NHWC pixels x channels), B [C]: OUT = act(round(Y + B) [+ R])."""
    p = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    c = tl.arange(0, C_PAD)
    mask = (p < P)[:, None] & (c < C)[None, :]
    offs = p[:, None] * C + c[None, :]
    y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
    y = round_to_f32(y + tl.load(B + c, mask=c < C, other=0.0).to(tl.float32)[None, :], OUT.dtype.element_ty, EMULATE)
    if HAS_RES:
        y = round_to_f32(y + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32), OUT.dtype.element_ty, EMULATE)
    if RELU:
        y = tl.maximum(y, 0.0)
    tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=mask)


def _bias_act_op(y: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, relu: bool) -> torch.Tensor:
    P, C = y.shape
    out = new_output((P, C), y.dtype, y.device)
    c_pad = next_pow2(C)
    # Under the interpreter each program costs Python time, so far fewer, larger ones there.
    block_p = max(1, min(4096 // c_pad, 64)) if not interpreted() else 1024
    has_res = residual.numel() > 0
    launch(
        _bias_act_kernel, (triton.cdiv(P, block_p),),
        y, bias, residual if has_res else y, out, P, C,
        C_PAD=c_pad, BLOCK_P=block_p, HAS_RES=has_res, RELU=relu, EMULATE=interpreted(), num_warps=4,
    )  # fmt: skip
    return out


register_op("bias_act", _bias_act_op)


def _pixels(name: str, t: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] in channels_last memory as the [N*H*W, C] matrix it is (a view)."""
    if t.dim() != 4 or not t.is_contiguous(memory_format=torch.channels_last):
        raise InvalidArgumentError(
            f"bias_act: {name} must be [N, C, H, W] in channels_last memory, found shape {list(t.shape)}, "
            f"strides {list(t.stride())}"
        )
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def bias_act(
    y: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None = None, relu: bool = True
) -> torch.Tensor:
    """relu(y + bias [+ residual]) (the ReLU if `relu`) for a conv's output y [N, C, H, W] in channels_last
    memory, bias [C], residual like y: a new tensor like y, rounded as torch's add, add, relu would."""
    check_tensor("y", y, ndim=4, dtypes=(torch.float32, torch.bfloat16, torch.float16))
    check_tensor("bias", bias, ndim=1, device=y.device)
    if bias.shape[0] != y.shape[1]:
        raise InvalidArgumentError(
            f"bias_act: bias must have {y.shape[1]} elements (y's channels), found {bias.shape[0]}"
        )
    rows = _pixels("y", y)
    res = y.new_empty(0)
    if residual is not None:
        check_tensor("residual", residual, dtypes=(y.dtype,), device=y.device)
        if residual.shape != y.shape:
            raise InvalidArgumentError(
                f"bias_act: residual must be shaped as y {list(y.shape)}, found {list(residual.shape)}"
            )
        res = _pixels("residual", residual)
    require_triton(y.device)
    out = torch.ops.flashdreams.bias_act(rows, bias.contiguous(), res, bool(relu))
    n, c, h, w = y.shape
    return out.view(n, h, w, c).permute(0, 3, 1, 2)


def bias_act_reference(
    y: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None = None, relu: bool = True
) -> torch.Tensor:
    """The torch sequence `bias_act` fuses: y + bias, + residual, ReLU (each rounded to y's dtype)."""
    out = y + bias.to(y.dtype).view(1, -1, 1, 1)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out
