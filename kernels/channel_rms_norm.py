"""The Wan VAE's RMS norm over channels, optionally followed by SiLU, as one pass over a video tensor.

The VAE's `RMS_norm` is `F.normalize(x, dim=1) * sqrt(C) * gamma` on `[B, C, T, H, W]`: in torch a
norm reduction, a clamp, a division and two multiplications, each a full pass over the tensor,
then `SiLU` another. In every residual block of the Wan VAE encoder and decoder the norm is
followed by SiLU; at the decoder's full resolution one such tensor is 2.7M pixels x 96 channels.
Here each program loads a tile of pixels with all their channels, reduces the sum of squares in
float32, and writes the normalised, scaled (and SiLU'd) tile once:

    y = x / max(||x||_2 over C, 1e-12) * sqrt(C) * gamma[c]        (then y * sigmoid(y) with silu)

The tensor may be NCDHW or channels_last_3d (NDHWC), or any layout whose T, H, W flatten into one
pixel stride; the output has x's layout. All math is float32, rounded once to x's dtype (torch's
bf16 path rounds after the norm and again after each product).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flashdreams.errors import InvalidArgumentError

from ._common import FLOAT_DTYPES, check_tensor, interpreted, launch, next_pow2, register_op, require_triton, tl, triton

NORM_EPS = 1e-12  # F.normalize's floor on the norm
# Elements of one program's fp32 tile: about 32 registers a thread at 8 warps.
_TILE_ELEMS = 8192


@triton.jit
def _channel_rms_norm_kernel(
    X, GAMMA, Y, stride_b, stride_c, stride_p, P, C, scale,
    C_PAD: tl.constexpr, BLOCK_P: tl.constexpr, SILU: tl.constexpr,
):  # fmt: skip
    """BLOCK_P pixels of one batch element, all C channels: normalise each pixel's channel vector."""
    b = tl.program_id(1).to(tl.int64)
    p = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    c = tl.arange(0, C_PAD)
    mask = (c < C)[:, None] & (p < P)[None, :]
    offs = b * stride_b + c[:, None].to(tl.int64) * stride_c + p[None, :] * stride_p
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, axis=0))
    inv = scale / tl.maximum(norm, 1e-12)
    g = tl.load(GAMMA + c, mask=c < C, other=0.0).to(tl.float32)
    y = x * inv[None, :] * g[:, None]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


def _pixel_stride(x: torch.Tensor) -> int | None:
    """The one stride of the flattened T*H*W pixels, if the layout has one (NCDHW and NDHWC do)."""
    step = expected = None
    for n, s in zip(reversed(x.shape[2:]), reversed(x.stride()[2:])):
        if n == 1:
            continue
        if step is None:
            step = s
        elif s != expected:
            return None
        expected = s * n
    return 1 if step is None else step


def _channel_rms_norm_op(x: torch.Tensor, gamma: torch.Tensor, silu: bool) -> torch.Tensor:
    y = torch.empty_like(x)  # x's layout (NCDHW or channels_last_3d)
    B, C = x.shape[:2]
    P = x.shape[2] * x.shape[3] * x.shape[4]
    c_pad = next_pow2(C)
    # (the interpreter runs fewer, larger programs faster)
    tile = _TILE_ELEMS if not interpreted() else 65536
    block_p = max(1, min(next_pow2(P), tile // c_pad))
    # fmt: off
    launch(
        _channel_rms_norm_kernel, (triton.cdiv(P, block_p), B),
        x, gamma, y, x.stride(0), x.stride(1), _pixel_stride(x), P, C, math.sqrt(C),
        C_PAD=c_pad, BLOCK_P=block_p, SILU=silu, num_warps=8 if c_pad * block_p >= 4096 else 4,
    )
    # fmt: on
    return y


register_op("channel_rms_norm", _channel_rms_norm_op)


def channel_rms_norm(x: torch.Tensor, gamma: torch.Tensor, silu: bool = False) -> torch.Tensor:
    """`F.normalize(x, dim=1) * sqrt(C) * gamma` (then SiLU with `silu`) of a video `[B, C, T, H, W]`
    in one pass; gamma has C elements (any shape, e.g. the VAE's stored [C, 1, 1, 1])."""
    check_tensor("x", x, ndim=5, dtypes=FLOAT_DTYPES)
    check_tensor("gamma", gamma, dtypes=FLOAT_DTYPES, device=x.device)
    if gamma.numel() != x.shape[1]:
        raise InvalidArgumentError(f"gamma: expected {x.shape[1]} elements (x's channels), found {gamma.numel()}")
    require_triton(x.device)
    if _pixel_stride(x) is None:
        x = x.contiguous()
    return torch.ops.flashdreams.channel_rms_norm(x, gamma.reshape(-1).contiguous(), bool(silu))


def channel_rms_norm_reference(x: torch.Tensor, gamma: torch.Tensor, silu: bool = False) -> torch.Tensor:
    """What `channel_rms_norm` computes, in float32 torch, rounded once to x's dtype."""
    y = F.normalize(x.float(), dim=1, eps=NORM_EPS) * math.sqrt(x.shape[1]) * gamma.float().reshape(1, -1, 1, 1, 1)
    return (F.silu(y) if silu else y).to(x.dtype)
