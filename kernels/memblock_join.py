"""TAEHV's MemBlock input, cat([x, past], channels), and its memory update, as one NHWC pass.

A MemBlock's first conv reads cat([x, past]) where past is each frame's predecessor (for a batch row's first
frame the memory kept from the previous call, zeros without one), and after the block the memory becomes the
row's last input frame. In torch that was three copies into the channel halves of the joined buffer (strided
destinations, TensorIterator's generic path) and a transposing copy into the memory, which is NCHW: most of
the 43 generic copies (1.5 ms) in Self-Forcing's 7.2 ms TAEHV decode at 480x832 (H100, next104). Here one
program takes BLOCK_P pixels of one batch row through its T frames: each frame is read once and written twice
into its joined row (as x, and as the next frame's past), the memory read at the start and overwritten with the
last frame at the end. A memory pixel is read and written by the same program, so no program races another.
Steady streaming decode on an H100 (bench/results/next105-h100, alternated rounds, frames bit-equal): 8.21 ->
7.83 ms at Self-Forcing's 480x832, 10.84 -> 9.99 ms at OmniDreams' 704x1280.
"""

from __future__ import annotations

import torch

from flashdreams.errors import InvalidArgumentError

from ._common import check_tensor, interpreted, launch, new_output, next_pow2, register_op, require_triton, tl, triton


@triton.jit
def _memblock_join_kernel(
    X, MEM, OUT, P, T, C, stride_mn, stride_mc, stride_mp,
    HAS_MEM: tl.constexpr, C_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """X [N*T, P, C] (NHWC pixels), MEM [N, C, P] by strides (any layout whose pixels flatten), OUT [N*T, P, 2C]:
    program (pixel block, batch row)."""
    n = tl.program_id(1).to(tl.int64)
    p = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    c = tl.arange(0, C_PAD)
    mask = (p < P)[:, None] & (c < C)[None, :]
    mem_ptrs = MEM + n * stride_mn + c[None, :] * stride_mc + p[:, None] * stride_mp
    if HAS_MEM:
        prev = tl.load(mem_ptrs, mask=mask).to(X.dtype.element_ty)
    else:
        prev = tl.zeros([BLOCK_P, C_PAD], dtype=X.dtype.element_ty)
    for t in range(T):
        row = (n * T + t) * P + p
        cur = tl.load(X + row[:, None] * C + c[None, :], mask=mask)
        out = OUT + row[:, None] * (2 * C) + c[None, :]
        tl.store(out, cur, mask=mask)
        tl.store(out + C, prev, mask=mask)
        prev = cur
    if HAS_MEM:
        tl.store(mem_ptrs, prev.to(MEM.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, batch: int, memory: torch.Tensor | None) -> torch.Tensor:
    nt, h, w, c = x.shape  # NHWC view
    out = new_output((nt, h, w, 2 * c), x.dtype, x.device)
    c_pad = next_pow2(c)
    # Under the interpreter each program costs Python time, so wider ones there.
    block_p = max(1, min(8192 // c_pad, 128)) if not interpreted() else 256
    mem = x if memory is None else memory
    strides = (0, 0, 0) if memory is None else (memory.stride(0), memory.stride(1), memory.stride(3))
    launch(
        _memblock_join_kernel, (triton.cdiv(h * w, block_p), batch),
        x, mem, out, h * w, nt // batch, c, *strides,
        HAS_MEM=memory is not None, C_PAD=c_pad, BLOCK_P=block_p, num_warps=4,
    )  # fmt: skip
    return out


def _memblock_join_op(x: torch.Tensor, batch: int) -> torch.Tensor:
    return _launch(x, batch, None)


def _memblock_join_update_op(x: torch.Tensor, batch: int, memory: torch.Tensor) -> torch.Tensor:
    return _launch(x, batch, memory)


register_op("memblock_join", _memblock_join_op)
register_op("memblock_join_update", _memblock_join_update_op, mutates_args=("memory",))


def memblock_join(x: torch.Tensor, batch: int, memory: torch.Tensor | None = None) -> torch.Tensor:
    """cat([x, past], channels) for x [N*T, C, H, W] in channels_last memory (a batch row's T frames
    consecutive), past = each frame's predecessor, `memory` [N, C, H, W] (zeros when None) for a row's first;
    the result in channels_last memory. With `memory`, it is then overwritten in place with each row's last
    frame, as `MemBlock` streaming needs."""
    check_tensor("x", x, ndim=4)
    nt, c, h, w = x.shape
    if not x.is_contiguous(memory_format=torch.channels_last):
        raise InvalidArgumentError(
            f"memblock_join: x must be in channels_last memory, found shape {list(x.shape)}, strides {list(x.stride())}"
        )
    if batch < 1 or nt % batch:
        raise InvalidArgumentError(f"memblock_join: batch ({batch}) must be >= 1 and divide x's {nt} frames")
    if memory is not None:
        check_tensor("memory", memory, ndim=4, dtypes=(x.dtype,), device=x.device)
        if tuple(memory.shape) != (batch, c, h, w):
            raise InvalidArgumentError(
                f"memblock_join: memory must be [{batch}, {c}, {h}, {w}] (one frame a batch row), "
                f"found {list(memory.shape)}"
            )
        if memory.stride(2) != w * memory.stride(3):
            raise InvalidArgumentError(
                "memblock_join: memory's rows must be whole (pixels that flatten), "
                f"found strides {list(memory.stride())}"
            )
    require_triton(x.device)
    nhwc = x.permute(0, 2, 3, 1)
    if memory is None:
        out = torch.ops.flashdreams.memblock_join(nhwc, int(batch))
    else:
        out = torch.ops.flashdreams.memblock_join_update(nhwc, int(batch), memory)
    return out.permute(0, 3, 1, 2)


def memblock_join_reference(x: torch.Tensor, batch: int, memory: torch.Tensor | None = None) -> torch.Tensor:
    """What `memblock_join` computes, in torch (memory updated in place likewise)."""
    nt, c, h, w = x.shape
    frames = x.reshape(batch, nt // batch, c, h, w)
    first = torch.zeros_like(frames[:, :1]) if memory is None else memory[:, None].to(x.dtype)
    past = torch.cat([first, frames[:, :-1]], 1).reshape(nt, c, h, w)
    if memory is not None:
        memory.copy_(frames[:, -1])
    return torch.cat([x, past], 1)
