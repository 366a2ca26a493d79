"""What the Gluon kernels (the Hopper forms of the ring attention) import: Gluon itself when this triton ships
it (>= 3.5), and the one device test they share. Without Gluon, HAVE_GLUON is False and the kernels' modules
only report themselves unavailable; the Triton kernels serve every call."""

from __future__ import annotations

import functools

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the triton build
    gluon = gl = fence_async_shared = mbarrier = tma = warpgroup_mma = warpgroup_mma_wait = TensorDescriptor = None
    HAVE_GLUON = False

__all__ = [
    "HAVE_GLUON",
    "barrier_ring",
    "init_ring",
    "invalidate_ring",
    "key_range",
    "load_tile",
    "TensorDescriptor",
    "fence_async_shared",
    "gl",
    "gluon",
    "mbarrier",
    "on_hopper",
    "tma",
    "warpgroup_mma",
    "warpgroup_mma_wait",
]


def on_hopper(t: torch.Tensor) -> bool:
    """Whether t lives on an sm_90 GPU and Gluon is here to compile for it."""
    return HAVE_GLUON and t.device.type == "cuda" and _capability(t.device.index or 0) == (9, 0)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


if HAVE_GLUON:

    @gluon.jit
    def key_range(VALID, S, pid_s, BLOCK_N: gl.constexpr, SPLITS: gl.constexpr):
        """(valid, lo, n_tiles): the ring length read on the device (clamped to [0, S]) and this key split's
        run of tiles, whole tiles of BLOCK_N from lo, only the run holding valid ending in a partial one
        (the Triton kernels' split rule, so that their parts merge the same way)."""
        valid = gl.load(VALID).to(gl.int32)
        valid = gl.maximum(gl.minimum(valid, S), 0)
        per_split = gl.cdiv(gl.cdiv(valid, BLOCK_N), SPLITS) * BLOCK_N
        lo = gl.minimum(pid_s * per_split, valid)
        hi = gl.minimum(lo + per_split, valid)
        return valid, lo, gl.cdiv(hi - lo, BLOCK_N)

    @gluon.jit
    def barrier_ring(STAGES: gl.constexpr):
        """STAGES mbarriers, one per buffer of a TMA ring, each completed by one load's bytes."""
        bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        init_ring(bar, STAGES)
        return bar

    @gluon.jit
    def init_ring(bar, STAGES: gl.constexpr):
        """(Re)arm a ring's mbarriers at phase 0: a persistent kernel does this for each run of tiles, after
        `invalidate_ring`, so that every run counts its phases from its first tile."""
        for i in gl.static_range(STAGES):
            mbarrier.init(bar.index(i), count=1)

    @gluon.jit
    def invalidate_ring(bar, STAGES: gl.constexpr):
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bar.index(i))

    @gluon.jit
    def load_tile(desc, smem, bar, j, n_tiles, row, col, STAGES: gl.constexpr):
        """Start the TMA load of tile j (its box at [row, col] of `desc`) into buffer j % STAGES of the ring
        `smem` / `bar`; nothing for j past the last tile."""
        if j < n_tiles:
            s = j % STAGES
            mbarrier.expect(bar.index(s), desc.block_type.nbytes)
            tma.async_copy_global_to_shared(desc, [row, col], bar.index(s), smem.index(s))
