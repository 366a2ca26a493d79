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
    X, GAMMA, Y, stride_b, stride_c, stride_p, out_b, out_c, out_p, P, C, C_OUT, scale,
    C_PAD: tl.constexpr, BLOCK_P: tl.constexpr, SILU: tl.constexpr, ONES: tl.constexpr,
):  # fmt: skip
    """BLOCK_P pixels of one batch element, all C channels: normalise each pixel's channel vector. Writes
    C_OUT >= C channels: those past C are 0 (gamma reads 0 there, and SiLU(0) = 0), channel C is 1 with ONES."""
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
    if ONES:
        y = tl.where((c == C)[:, None], 1.0, y)
    out_mask = (c < C_OUT)[:, None] & (p < P)[None, :]
    out_offs = b * out_b + c[:, None].to(tl.int64) * out_c + p[None, :] * out_p
    tl.store(Y + out_offs, y.to(Y.dtype.element_ty), mask=out_mask)


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


def _launch(x: torch.Tensor, gamma: torch.Tensor, silu: bool, y: torch.Tensor, ones: bool) -> None:
    """Normalise x into y (x's shape but for y's channels, any layout with one pixel stride)."""
    B, C = x.shape[:2]
    P = x.shape[2] * x.shape[3] * x.shape[4]
    c_pad = next_pow2(y.shape[1])
    # (the interpreter runs fewer, larger programs faster)
    tile = _TILE_ELEMS if not interpreted() else 65536
    block_p = max(1, min(next_pow2(P), tile // c_pad))
    # fmt: off
    launch(
        _channel_rms_norm_kernel, (triton.cdiv(P, block_p), B),
        x, gamma, y, x.stride(0), x.stride(1), _pixel_stride(x), y.stride(0), y.stride(1), _pixel_stride(y),
        P, C, y.shape[1], math.sqrt(C),
        C_PAD=c_pad, BLOCK_P=block_p, SILU=silu, ONES=ones, num_warps=8 if c_pad * block_p >= 4096 else 4,
    )
    # fmt: on


def _channel_rms_norm_op(x: torch.Tensor, gamma: torch.Tensor, silu: bool) -> torch.Tensor:
    y = torch.empty_like(x)  # x's layout (NCDHW or channels_last_3d)
    _launch(x, gamma, silu, y, False)
    return y


def _channel_rms_norm_padded_op(
    x: torch.Tensor, gamma: torch.Tensor, silu: bool, past: torch.Tensor, channels: int, ones: bool
) -> torch.Tensor:
    b, c, t, h, w = x.shape
    tp = past.shape[2]
    out = torch.empty((b, channels, tp + t, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
    _launch(x, gamma, silu, out[:, :, tp:], ones)
    if past.shape[1] == channels:  # already padded (a padded cache): one block copy
        out[:, :, :tp].copy_(past)
        return out
    out[:, :c, :tp].copy_(past)
    out[:, c:, :tp].zero_()
    if ones:
        out[:, c, :tp].fill_(1.0)
    return out


register_op("channel_rms_norm", _channel_rms_norm_op)
register_op("channel_rms_norm_padded", _channel_rms_norm_padded_op)


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


def channel_rms_norm_padded(
    x: torch.Tensor, gamma: torch.Tensor, silu: bool, past: torch.Tensor, channels: int, ones: bool = False
) -> torch.Tensor:
    """[past | channel_rms_norm(x)] along time in a new channels_last_3d buffer of `channels` >= C channels,
    those past C zero (channel C one with `ones`): a narrow causal conv's padded input
    (`models/wan_vae_blocks.py`, `CausalConv3d.narrow_form`) written by the norm's own pass instead of a
    norm pass and then a strided copy into the padded buffer. `past` is [B, C, t, H, W] (already normed), or
    [B, channels, t, H, W] already padded (then copied whole)."""
    check_tensor("x", x, ndim=5, dtypes=FLOAT_DTYPES)
    check_tensor("gamma", gamma, dtypes=FLOAT_DTYPES, device=x.device)
    check_tensor("past", past, ndim=5, dtypes=(x.dtype,), device=x.device)
    b, c, _, h, w = x.shape
    if gamma.numel() != c:
        raise InvalidArgumentError(f"gamma: expected {c} elements (x's channels), found {gamma.numel()}")
    if past.shape[0] != b or past.shape[1] not in (c, channels) or past.shape[3:] != (h, w):
        raise InvalidArgumentError(f"past: expected [{b}, {c} or {channels}, t, {h}, {w}], found {list(past.shape)}")
    if channels < c + int(ones):
        extra = " and a ones channel" if ones else ""
        raise InvalidArgumentError(f"channels: {channels} cannot hold x's {c}{extra}")
    require_triton(x.device)
    if _pixel_stride(x) is None:
        x = x.contiguous()
    op = torch.ops.flashdreams.channel_rms_norm_padded
    return op(x, gamma.reshape(-1).contiguous(), bool(silu), past, channels, bool(ones))


def channel_rms_norm_padded_reference(
    x: torch.Tensor, gamma: torch.Tensor, silu: bool, past: torch.Tensor, channels: int, ones: bool = False
) -> torch.Tensor:
    """What `channel_rms_norm_padded` computes, from the torch reference norm and plain copies."""
    y = channel_rms_norm_reference(x, gamma, silu)
    out = torch.zeros(
        (y.shape[0], channels, past.shape[2] + y.shape[2], *y.shape[3:]), dtype=y.dtype, device=y.device
    ).contiguous(memory_format=torch.channels_last_3d)
    out[:, : y.shape[1], past.shape[2] :] = y
    if ones:
        out[:, y.shape[1], past.shape[2] :] = 1.0
    out[:, : past.shape[1], : past.shape[2]] = past
    if ones and past.shape[1] < channels:
        out[:, y.shape[1], : past.shape[2]] = 1.0
    return out
