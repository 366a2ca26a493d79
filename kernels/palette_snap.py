"""Clamp a video to [0, 1] and snap the pixels close to a palette color onto it, in one pass.

The arena world model (models/families/arena) ends every block with `project_to_palette`: each
pixel's squared RGB distance to every palette color, the nearest color, and a `torch.where`
that snaps the pixel to it when the distance is below `settle` (unless the nearest color is one
of the agent's two, rows 0 and 1). In torch that materialises a [B, F, P, 3, H, W] float32
difference tensor and reduces it three times; with 64 worlds in a batch those passes took
0.45 ms of a 2.6 ms step on the H200 (bench/results/next2a-h200/). Here each program loads a
tile of pixels (their three channels), walks the P palette colors in registers, and writes the
result once:

    v = clamp(x, 0, 1);  d_p = sum_c (v_c - pal[p, c])^2;  i = argmin_p d_p (first of equals)
    y = v where i <= 1 or d_i >= settle, else pal[i]

The distance is summed in channel order, as torch sums it, and ties keep the first color, as
`torch.min` does, so the kernel and the twin agree exactly on float32 input.
"""

from __future__ import annotations

import torch

from flashdreams.errors import InvalidArgumentError

from ._common import check_shape, check_tensor, interpreted, launch, new_output, register_op, require_triton, tl, triton

_BLOCK = 1024  # pixels per program: 3 loads and 3 stores of 4 KB each


@triton.jit
def _palette_snap_kernel(X, PAL, Y, HW, settle, P: tl.constexpr, BLOCK: tl.constexpr):
    """BLOCK pixels of one frame ([3, H*W] contiguous): clamp, nearest palette color, snap."""
    img = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = p < HW
    base = X + img * 3 * HW
    r = tl.minimum(tl.maximum(tl.load(base + p, mask=mask, other=0.0), 0.0), 1.0)
    g = tl.minimum(tl.maximum(tl.load(base + HW + p, mask=mask, other=0.0), 0.0), 1.0)
    b = tl.minimum(tl.maximum(tl.load(base + 2 * HW + p, mask=mask, other=0.0), 0.0), 1.0)
    best = tl.full([BLOCK], float("inf"), tl.float32)
    idx = tl.zeros([BLOCK], tl.int32)
    for k in tl.static_range(P):
        dr = r - tl.load(PAL + 3 * k)
        dg = g - tl.load(PAL + 3 * k + 1)
        db = b - tl.load(PAL + 3 * k + 2)
        d = dr * dr + dg * dg + db * db
        closer = d < best  # strict: the first of equal distances wins, as torch.min picks
        best = tl.where(closer, d, best)
        idx = tl.where(closer, k, idx)
    snap = (idx > 1) & (best < settle)
    out = Y + img * 3 * HW
    tl.store(out + p, tl.where(snap, tl.load(PAL + 3 * idx, mask=mask, other=0.0), r), mask=mask)
    tl.store(out + HW + p, tl.where(snap, tl.load(PAL + 3 * idx + 1, mask=mask, other=0.0), g), mask=mask)
    tl.store(out + 2 * HW + p, tl.where(snap, tl.load(PAL + 3 * idx + 2, mask=mask, other=0.0), b), mask=mask)


def _palette_snap_op(x: torch.Tensor, palette: torch.Tensor, settle: float) -> torch.Tensor:
    y = new_output(x.shape, x.dtype, x.device)
    hw = x.shape[-1] * x.shape[-2]
    frames = x.numel() // (3 * hw)
    block = _BLOCK if not interpreted() else 4096  # the interpreter runs fewer, larger programs faster
    launch(
        _palette_snap_kernel, (triton.cdiv(hw, block), frames),
        x, palette, y, hw, float(settle), P=palette.shape[0], BLOCK=block, num_warps=4,
    )  # fmt: skip
    return y


register_op("palette_snap", _palette_snap_op)


def palette_snap(video: torch.Tensor, palette: torch.Tensor, settle: float) -> torch.Tensor:
    """`palette_snap_reference` in one kernel pass. video float32 [..., 3, H, W] (contiguous);
    palette float32 [P, 3] on the same device, the agent's two colors in rows 0 and 1."""
    check_tensor("video", video, dtypes=(torch.float32,))
    check_tensor("palette", palette, ndim=2, dtypes=(torch.float32,), device=video.device)
    if video.dim() < 3 or video.shape[-3] != 3:
        raise InvalidArgumentError(f"video: expected [..., 3, H, W], found shape {list(video.shape)}")
    check_shape("palette", palette, [None, 3])
    if palette.shape[0] < 2:
        raise InvalidArgumentError(f"palette: needs the agent's two colors first, found {palette.shape[0]} rows")
    require_triton(video.device)
    return torch.ops.flashdreams.palette_snap(video.contiguous(), palette.contiguous(), float(settle))


def palette_snap_reference(video: torch.Tensor, palette: torch.Tensor, settle: float) -> torch.Tensor:
    """The torch form: clamp to [0, 1], then snap the pixels within `settle` (squared RGB distance)
    of a palette color other than rows 0 and 1 onto it (the arena's `project_to_palette`)."""
    v = video.clamp(0.0, 1.0)
    d = ((v.unsqueeze(-4) - palette.view(-1, 3, 1, 1)) ** 2).sum(dim=-3)  # [..., P, H, W]
    best, idx = d.min(dim=-3)
    snapped = palette[idx].movedim(-1, -3)
    keep = (idx <= 1) | (best >= settle)
    return torch.where(keep.unsqueeze(-3), v, snapped)
