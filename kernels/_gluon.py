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
    "key_range",
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
