"""Short descriptions of an op's arguments in Inductor's lowering messages.

Why this exists: torch 2.11's Inductor, the first time it meets an op without a lowering (our
custom kernels, for one), writes a log line describing every argument, and formats it eagerly,
logging enabled or not (graph.py: `log.info("Creating implicit fallback for:\\n%s",
error.operator_str(...))`). An IR node's text holds the full text of its inputs, and a chain of
extern kernels and views (a DiT whose layers are cuBLAS GEMMs and our fused ops) repeats each
shared input once per path: the text grows exponentially with depth. A full-size Self-Forcing
DiT spent 9+ minutes of one core there on the H200 before being killed (bench/results
next34/next35; the stack sat in `ir.py __str__`). torch 2.13 formats that line lazily.

While `short_lowering_messages()` is active, an argument is described by its kind, buffer name,
size and dtype, which is also what a reader of the message needs.
"""

from __future__ import annotations

import contextlib
import textwrap
from collections.abc import Iterator
from typing import Any

MAX_ITEMS = 8  # items of a list argument described before "..."
MAX_REPR = 200  # characters of a plain argument's repr


def describe(arg: Any) -> str:
    """One short line for an argument of a lowering: IR nodes by name/size/dtype, never their inputs."""
    from torch._inductor import ir

    if isinstance(arg, ir.IRNode):
        parts = []
        for label, getter in (("name", "get_name"), ("size", "get_size"), ("dtype", "get_dtype")):
            try:
                value = getattr(arg, getter)()
            except Exception:  # views without a name, nodes without a dtype: leave it out
                continue
            parts.append(f"{label}={list(value) if label == 'size' else value}")
        return f"{type(arg).__name__}({', '.join(parts)})"
    if isinstance(arg, (list, tuple)):
        items = [describe(a) for a in arg[:MAX_ITEMS]]
        if len(arg) > MAX_ITEMS:
            items.append(f"... {len(arg) - MAX_ITEMS} more")
        open_, close = ("[", "]") if isinstance(arg, list) else ("(", ")")
        return open_ + ", ".join(items) + close
    if isinstance(arg, dict):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in list(arg.items())[:MAX_ITEMS]) + "}"
    text = repr(arg)
    return text if len(text) <= MAX_REPR else text[:MAX_REPR] + "..."


def short_operator_str(target: Any, args: list[Any], kwargs: dict[str, Any]) -> str:
    """Inductor's `OperatorIssue.operator_str`, with each argument described by `describe`."""
    lines = [f"target: {target}"] + [f"args[{i}]: {describe(a)}" for i, a in enumerate(args)]
    if kwargs:
        lines.append(f"kwargs: {describe(kwargs)}")
    return textwrap.indent("\n".join(lines), "  ")


@contextlib.contextmanager
def short_lowering_messages() -> Iterator[None]:
    """Within the block, Inductor describes lowering arguments with `short_operator_str`.

    Used around every Inductor compile of a build (single-threaded: the build runs in one thread).
    Does nothing where Inductor has no `OperatorIssue.operator_str` to replace.
    """
    try:
        from torch._inductor import exc
    except ImportError:  # pragma: no cover - torch without Inductor
        yield
        return
    saved = exc.OperatorIssue.__dict__.get("operator_str")
    if saved is None:  # pragma: no cover - a torch that renamed it
        yield
        return
    exc.OperatorIssue.operator_str = staticmethod(short_operator_str)
    try:
        yield
    finally:
        exc.OperatorIssue.operator_str = saved
