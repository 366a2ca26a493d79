"""What every kernel file shares: the Triton import guard, launching, and argument checks.

Triton is optional (`flashdreams[kernels]`): without it this package still imports, the
plain-torch twins still work, and the kernels raise a clear error when called. On a
machine without CUDA the kernels run only under Triton's interpreter, which Triton
enables when `TRITON_INTERPRET=1` is in the environment before it is first imported.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from flashdreams.errors import InvalidArgumentError

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


def _probe_interpreter() -> bool:
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    @triton.jit
    def _probe():  # pragma: no cover - never launched
        pass

    return isinstance(_probe, InterpretedFunction)


# Decided once, like Triton itself decides when each `@triton.jit` kernel is defined.
INTERPRETED = _probe_interpreter()


def interpreted() -> bool:
    """True when `@triton.jit` kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return INTERPRETED


# Set while a graph is traced for an exporter that has no form for our custom ops (ONNX, and TensorRT
# through it): the models then take the plain-torch twins wherever they would pick a kernel by device. A
# plain module global, not a ContextVar: Dynamo traces `triton_available` and cannot trace ContextVar.get.
_twins_only_depth = 0


@contextlib.contextmanager
def torch_twins_only() -> Iterator[None]:
    """Inside, `triton_available` answers False on every device, so code that chooses between a kernel
    and its torch twin by it takes the twin (an exporter without our ops traces plain torch)."""
    global _twins_only_depth
    _twins_only_depth += 1
    try:
        yield
    finally:
        _twins_only_depth -= 1


def triton_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on `device`: CUDA with triton, or CPU under the interpreter
    (never inside `torch_twins_only`)."""
    device = torch.device(device)
    if not HAS_TRITON or _twins_only_depth:
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


# Elements one program of a row kernel (norms, AdaLN, RoPE writes) holds per tensor on a GPU:
# 4096 bf16 = 8 KB in flight per tensor and program. The bench sweeps it.
ROW_TILE_ELEMS = 4096


def row_tile(row_width: int, rows: int, device: torch.device) -> tuple[int, int]:
    """(rows per program, num_warps) for a row kernel whose rows are `row_width` (padded) wide."""
    if device.type != "cuda":  # the interpreter: fewer, larger programs run faster
        return min(32, next_pow2(rows)), 4
    block = max(1, min(64, ROW_TILE_ELEMS // row_width))
    return block, 8 if block * row_width >= 4096 else 4


def _is_traced(args: Iterable[Any]) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return any(isinstance(a, torch.Tensor) and is_fake(a) for a in args)


def launch(kernel: Any, grid: Sequence[int], *args: Any, **kwargs: Any) -> None:
    """Launch `kernel`: directly for an opaque op, through `torch.library.wrap_triton` for a
    `triton_op` (compile/export trace into its body then, see `inline_into_compilers`).

    An opaque op's body only ever runs on real tensors or, as its own fake implementation, on
    fake ones (then nothing is launched: the op's outputs are already allocated). Launching it
    through `wrap_triton` outside a trace costs the higher-order op's dispatch, signature
    inspection included, on every call: over a second under cProfile for the 3793 launches of a
    cold Self-Forcing engine's load and first blocks on the H100
    (bench/results/next33-h100/cold-profile.txt). The direct launch skips it.

    Under the interpreter `wrap_triton` hands back the bare kernel, which cannot run on
    fake tensors: while torch.export propagates shapes, the launch is skipped. Inductor,
    which would need to compile the kernel itself, is refused there with a clear error.
    """
    if not inline_into_compilers():
        if not _is_traced(list(args) + list(kwargs.values())):
            kernel[tuple(grid)](*args, **kwargs)
        return  # traced: the fake implementation of an opaque op, shapes only, nothing to run
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


_poison = False


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """For tests: outputs the launchers allocate start as NaN, so an element a kernel forgot shows."""
    global _poison
    before, _poison = _poison, True
    try:
        yield
    finally:
        _poison = before


def new_output(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised output tensor (NaN-filled inside `poisoned_outputs`)."""
    t = torch.empty(tuple(shape), dtype=dtype, device=device)
    if _poison:
        t.fill_(float("nan"))
    return t


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


def env_choice(name: str, default: str, choices: Sequence[str]) -> str:
    """The environment variable `name` ("" or unset: `default`), refused by name unless one of `choices`:
    the kernel knobs read per call (FD_RING_ATTN_KERNEL, FD_FP8_ATTN_KERNEL), also checked when a model loads."""
    raw = os.environ.get(name, "") or default
    if raw not in choices:
        raise InvalidArgumentError(f"{name}: expected one of {', '.join(choices)}, found {raw!r}")
    return raw


def env_key_splits(name: str) -> int | None:
    """The key split count the environment variable `name` asks for (1..8), None where unset or empty; refused
    by name otherwise: FD_ATTN_SPLITS / FD_FP8_ATTN_SPLITS, benchmark knobs read per call."""
    raw = os.environ.get(name, "")
    if not raw:
        return None
    if not raw.isdigit() or not 1 <= int(raw) <= 8:
        raise InvalidArgumentError(f"{name}: expected a key split count from 1 to 8, found {raw!r}")
    return int(raw)


def inline_into_compilers() -> bool:
    """Whether ops are `triton_op`s (Inductor sees and compiles the Triton source) rather than
    opaque custom ops (Inductor calls them as they are). Opaque is the default: on our H100
    image (torch 2.11, triton 3.6) Inductor failed to recompile the ring-attention kernel
    (CompilationError at its nested tile loop, bench/results/kernels-h100.json), while the
    same kernel runs fine when called. FD_TRITON_OP_INLINE=1 selects triton_op."""
    return os.environ.get("FD_TRITON_OP_INLINE", "0") == "1"


# Op name -> the module that registers it: an engine records the modules its graphs' ops come from, so a fresh
# process imports them before it loads the graphs (export/backends/inductor.py).
OP_MODULES: dict[str, str] = {}


def register_op(name: str, fn: Callable, mutates_args: Iterable[str] = ()) -> None:
    """Register `fn` as `torch.ops.flashdreams.<name>`, once.

    Opaque custom op by default (its fake implementation is `fn` itself: launches are
    skipped on fake tensors, and outputs are allocated by shape), or a `triton_op`
    (see `inline_into_compilers`). Needs triton only to launch; registering on a CPU
    machine without the interpreter is harmless.
    """
    OP_MODULES.setdefault(name, fn.__module__)
    if not HAS_TRITON or hasattr(torch.ops.flashdreams, name):
        return
    if inline_into_compilers():
        torch.library.triton_op(f"flashdreams::{name}", fn, mutates_args=tuple(mutates_args))
        return
    op = torch.library.custom_op(f"flashdreams::{name}", fn, mutates_args=tuple(mutates_args))
    op.register_fake(fn)
