"""TAEHV's frame split and nearest upsampling as one NHWC copy.

Each TAEHV decoder stage ends `nearest 2x upsample -> TGrow (1x1 conv C -> G*C; channel group g of frame t
becomes frame t*G + g) -> 3x3 conv`. The 1x1 conv acts on each pixel alone, so it commutes with the
upsampling: run at the stage's resolution it does a quarter of the work, and what is left is to move channel
group g of each pixel to frame t*G + g while repeating the pixel f x f times. In torch that was two copies
of broadcast or permuted views (TensorIterator's generic path, ~0.7 TB/s on an H200): at OmniDreams'
704x1280 the upsample copy took 0.67 ms and the frame split 1.25 ms, on top of the full-resolution 1x1 conv
(next76 op-sources). Here each program reads BLOCK_W pixels x C channels of one group of one input row
(one strided run) and writes them f x f times into the output's rows (contiguous runs): the input is read
once and the output written once.
"""

from __future__ import annotations

import torch

from flashdreams.errors import InvalidArgumentError

from ._common import check_tensor, interpreted, launch, new_output, next_pow2, register_op, require_triton, tl, triton


@triton.jit
def _upsample_frames_kernel(
    Y, OUT, H, W, C,
    G: tl.constexpr, F: tl.constexpr, C_PAD: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """Y [N, H, W, G*C] (NHWC) -> OUT [N*G, H*F, W*F, C]: program (n*G*H + g*H + h, column block)."""
    pid = tl.program_id(0)
    h = pid % H
    g = (pid // H) % G
    n = pid // (H * G)
    w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    c = tl.arange(0, C_PAD)
    mask = (w < W)[:, None] & (c < C)[None, :]
    src = Y + ((n * H + h).to(tl.int64) * W + w.to(tl.int64))[:, None] * (G * C) + (g * C + c)[None, :]
    x = tl.load(src, mask=mask)
    frame = (n * G + g).to(tl.int64)
    for a in tl.static_range(F):
        row = frame * (H * F) + h * F + a
        for b in tl.static_range(F):
            dst = OUT + (row * (W * F) + w.to(tl.int64) * F + b)[:, None] * C + c[None, :]
            tl.store(dst, x, mask=mask)


def _upsample_frames_op(y: torch.Tensor, groups: int, factor: int) -> torch.Tensor:
    N, H, W, GC = y.shape
    C = GC // groups
    out = new_output((N * groups, H * factor, W * factor, C), y.dtype, y.device)
    c_pad = next_pow2(C)
    # Under the interpreter each program costs Python time, so wider ones there.
    block_w = max(1, min(8192 // c_pad, 64)) if not interpreted() else 128
    launch(
        _upsample_frames_kernel, (N * groups * H, triton.cdiv(W, block_w)),
        y, out, H, W, C,
        G=groups, F=factor, C_PAD=c_pad, BLOCK_W=block_w, num_warps=4,
    )  # fmt: skip
    return out


register_op("upsample_frames", _upsample_frames_op)


def upsample_frames(y: torch.Tensor, groups: int, factor: int) -> torch.Tensor:
    """y [N, G*C, H, W] in channels_last memory -> [N*G, C, H*f, W*f] in channels_last memory: channel group g
    of image n becomes image n*G + g, each pixel repeated f x f (nearest upsampling by `factor`)."""
    check_tensor("y", y, ndim=4)
    n, gc, h, w = y.shape
    if groups < 1 or factor < 1 or gc % groups:
        raise InvalidArgumentError(
            f"upsample_frames: groups ({groups}) and factor ({factor}) must be >= 1 and groups divide y's {gc} channels"
        )
    if not y.is_contiguous(memory_format=torch.channels_last):
        raise InvalidArgumentError(
            f"upsample_frames: y must be in channels_last memory, found shape {list(y.shape)}, strides "
            f"{list(y.stride())}"
        )
    require_triton(y.device)
    out = torch.ops.flashdreams.upsample_frames(y.permute(0, 2, 3, 1), int(groups), int(factor))
    return out.permute(0, 3, 1, 2)


def upsample_frames_reference(y: torch.Tensor, groups: int, factor: int) -> torch.Tensor:
    """The torch form: the frame split (group g -> image n*G + g), then nearest upsampling."""
    n, gc, h, w = y.shape
    frames = y.reshape(n, groups, gc // groups, h, w).reshape(n * groups, gc // groups, h, w)
    return frames.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
