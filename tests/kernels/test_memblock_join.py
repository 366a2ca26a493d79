"""TAEHV's MemBlock input and memory update as one NHWC pass (kernels/memblock_join.py), against torch's
copies, and TAEHV decoding through it."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from flashdreams.errors import InvalidArgumentError  # noqa: E402
from flashdreams.kernels import memblock_join as mod  # noqa: E402
from flashdreams.kernels import triton_available  # noqa: E402
from flashdreams.kernels._common import poisoned_outputs  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_available(DEVICE), reason="needs CUDA or TRITON_INTERPRET=1")


def _frames(nt, c, h, w, dtype, seed):
    x = torch.randn(nt, c, h, w, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,t,c,h,w", [(1, 4, 16, 3, 5), (2, 3, 48, 3, 100), (3, 1, 8, 2, 2)])
@pytest.mark.parametrize("memory_layout", [None, "nchw", "nhwc"])
def test_equals_the_torch_copies_and_updates_the_memory(dtype, batch, t, c, h, w, memory_layout):
    """cat([x, past]) bit for bit, past = the previous frame of the same batch row (the memory, or zeros, for the
    first), and the memory then holds each row's last frame: channel counts no power of two, pixels past a
    program's block, a memory in either layout."""
    x = _frames(batch * t, c, h, w, dtype, seed=batch + t)
    memory = want_memory = original = None
    if memory_layout is not None:
        memory = torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(9)).to(DEVICE, dtype)
        if memory_layout == "nhwc":
            memory = memory.contiguous(memory_format=torch.channels_last)
        want_memory, original = memory.clone(), memory.clone()
    want = mod.memblock_join_reference(x, batch, want_memory)
    with poisoned_outputs():
        got = mod.memblock_join(x, batch, memory)
    assert got.shape == (batch * t, 2 * c, h, w) and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, want)
    if memory is not None:
        assert torch.equal(memory, want_memory)
        assert torch.equal(memory, x.reshape(batch, t, c, h, w)[:, -1])
    # the past is each frame's predecessor within its own batch row, not the previous row's last frame
    frames = x.reshape(batch, t, c, h, w)
    first_past = got[::t, c:]
    assert torch.equal(first_past, torch.zeros_like(first_past) if original is None else original)
    if t > 1:
        assert torch.equal(got.reshape(batch, t, 2 * c, h, w)[:, 1:, c:], frames[:, :-1])


def test_refuses_bad_arguments_by_name():
    x = _frames(4, 8, 2, 3, torch.float32, seed=1)
    with pytest.raises(InvalidArgumentError, match="channels_last"):
        mod.memblock_join(x.contiguous(), 2)
    with pytest.raises(InvalidArgumentError, match="batch"):
        mod.memblock_join(x, 3)
    with pytest.raises(InvalidArgumentError, match=r"memory must be \[2, 8, 2, 3\]"):
        mod.memblock_join(x, 2, torch.zeros(2, 8, 3, 2, device=DEVICE))
    with pytest.raises(InvalidArgumentError, match="rows must be whole"):
        mod.memblock_join(x, 2, torch.zeros(2, 8, 4, 3, device=DEVICE)[:, :, ::2])
    untouched = torch.ones(2, 8, 2, 3, device=DEVICE)
    with pytest.raises(InvalidArgumentError, match="memory"):
        mod.memblock_join(x, 2, untouched.to(torch.bfloat16))
    assert torch.equal(untouched, torch.ones_like(untouched))


def test_taehv_streams_the_same_frames_through_it(count_calls, taehv_switch_streams):
    """An NHWC TAEHV streams the very same frames with MEMBLOCK_JOIN_KERNEL on as off (copies only: bit for bit),
    memory carried between its two blocks, one call a MemBlock a block."""
    from flashdreams.models import taehv

    calls = count_calls(mod, "memblock_join")
    model, outs = taehv_switch_streams("MEMBLOCK_JOIN_KERNEL", DEVICE)
    blocks = sum(isinstance(layer, taehv.MemBlock) for layer in model.decoder)
    assert blocks > 0 and len(calls) == 2 * blocks
    assert all(args[2] is not None for args, _ in calls)  # the stream's memories went through the kernel
    assert outs[True].shape == outs[False].shape and torch.equal(outs[True], outs[False])
