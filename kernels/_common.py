"""What every kernel file shares: the Triton import guard, launching, and argument checks.

Triton is optional (`flashdreams[kernels]`): without it this package still imports, the
plain-torch twins still work, and the kernels raise a clear error when called. On a
machine without CUDA the kernels run only under Triton's interpreter, which Triton
enables when `TRITON_INTERPRET=1` is in the environment before it is first imported.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from flashdreams.errors import InvalidArgumentError

log = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

    class _Stub:
        """Just enough of `triton` / `triton.language` for the kernel files to be defined."""

        constexpr = object

        @staticmethod
        def jit(fn: Callable | None = None, **_: Any) -> Callable:
            return fn if fn is not None else (lambda f: f)

    triton = tl = _Stub()  # type: ignore[assignment]


@functools.cache
def interpreted() -> bool:
    """True when `@triton.jit` kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    @triton.jit
    def _probe():  # pragma: no cover - never launched
        pass

    return isinstance(_probe, InterpretedFunction)


def triton_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on `device`: CUDA with triton, or CPU under the interpreter."""
    device = torch.device(device)
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and interpreted()


def require_triton(device: torch.device | str) -> None:
    """Raise InvalidArgumentError, saying what to do, unless the kernels can run on `device`."""
    device = torch.device(device)
    if triton_available(device):
        return
    if not HAS_TRITON:
        why = "triton is not installed; install it with `pip install flashdreams[kernels]`"
    elif device.type == "cpu":
        why = "on a CPU they run only in Triton's interpreter: set TRITON_INTERPRET=1 before importing triton"
    elif device.type == "cuda":
        why = "CUDA is not available"
    else:
        why = f"device type '{device.type}' has no Triton backend here"
    raise InvalidArgumentError(f"flashdreams kernels cannot run on device '{device}': {why}")


def next_pow2(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum): Triton tiles are powers of two."""
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()


def _is_traced(args: Iterable[Any]) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return any(isinstance(a, torch.Tensor) and is_fake(a) for a in args)


def launch(kernel: Any, grid: Sequence[int], *args: Any, **kwargs: Any) -> None:
    """Launch `kernel` through `torch.library.wrap_triton`, so compile/export can trace the call.

    Under the interpreter `wrap_triton` hands back the bare kernel, which cannot run on
    fake tensors: while torch.export propagates shapes, the launch is skipped (the op's
    outputs are already allocated). Inductor, which would need to compile the kernel
    itself, is refused there with a clear error.
    """
    if interpreted() and _is_traced(list(args) + list(kwargs.values())):
        from torch._subclasses.functional_tensor import FunctionalTensor

        if any(isinstance(a, FunctionalTensor) for a in list(args) + list(kwargs.values())):
            raise InvalidArgumentError(
                "flashdreams Triton ops cannot be compiled by Inductor under TRITON_INTERPRET=1 "
                "(Inductor needs a GPU to compile Triton); run them eagerly, through torch.export, "
                "or torch.compile(backend='eager') on a CPU"
            )
        return
    torch.library.wrap_triton(kernel)[tuple(grid)](*args, **kwargs)


# ----------------------------------------------------------------------------- argument checks


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_tensor(
    name: str,
    t: Any,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
    last_contiguous: bool = False,
) -> None:
    """Raise InvalidArgumentError naming `name` unless `t` is a tensor of the given rank/dtype/device."""
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentError(f"{name}: expected a torch.Tensor, found {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise InvalidArgumentError(f"{name}: expected {ndim} dims, found shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(_dtype_name(d) for d in dtypes)
        raise InvalidArgumentError(f"{name}: expected dtype in ({allowed}), found {_dtype_name(t.dtype)}")
    if device is not None and t.device != device:
        raise InvalidArgumentError(f"{name}: expected device {device}, found {t.device}")
    if last_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise InvalidArgumentError(
            f"{name}: the last dim must be contiguous (stride 1), found strides {tuple(t.stride())}; "
            "call .contiguous() first"
        )


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int | None]) -> None:
    """Raise unless `t.shape` matches `expected` (None matches any size)."""
    ok = t.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, t.shape))
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise InvalidArgumentError(f"{name}: expected shape {want}, found {list(t.shape)}")


FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def register_op(name: str, fn: Callable, mutates_args: Iterable[str] = ()) -> None:
    """Register `fn` as `torch.ops.flashdreams.<name>` via `torch.library.triton_op`, once.

    Needs triton only to launch; registering on a CPU machine without the interpreter is
    harmless. Re-importing a module (e.g. under another name) does not register twice.
    """
    if not HAS_TRITON or hasattr(torch.ops.flashdreams, name):
        return
    torch.library.triton_op(f"flashdreams::{name}", fn, mutates_args=tuple(mutates_args))
