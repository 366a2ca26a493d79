"""Inductor's implicit-fallback message stays short while our builds compile.

torch 2.11 formats that message eagerly, and an IR node's text repeats its whole upstream graph on
every path, so a deep chain of extern kernels stalled the full-size H200 build (export/backends/
lowering_messages.py). torch 2.13 formats it lazily, so here the message is forced by enabling the
log at INFO: unpatched, its length doubles with every layer of the chain below.
"""

from __future__ import annotations

import logging

import pytest
import torch

from flashdreams.export.backends import lowering_messages
from flashdreams.export.backends.lowering_messages import describe, short_lowering_messages, short_operator_str

_LIB = torch.library.Library("fdlowermsg", "DEF")
_LIB.define("mix(Tensor a, Tensor b) -> Tensor")
_LIB.define("last(Tensor a) -> Tensor")
_LIB.impl("mix", lambda a, b: a * 0.5 + b, "CompositeExplicitAutograd")
_LIB.impl("last", lambda a: a + 1, "CompositeExplicitAutograd")
torch.library.register_fake("fdlowermsg::mix", lambda a, b: torch.empty_like(a), lib=_LIB)
torch.library.register_fake("fdlowermsg::last", lambda a: torch.empty_like(a), lib=_LIB)


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(record.getMessage())


def _chain(depth: int):
    """`depth` custom ops, each fed by the previous one and a GEMM of it (an extern kernel), then an op
    met for the first time at the end: its message describes the last link of the chain."""

    def f(x, w):
        for _ in range(depth):
            x = torch.ops.fdlowermsg.mix(x, x @ w)
        return torch.ops.fdlowermsg.last(x)

    return torch.fx.symbolic_trace(f)


def _fallback_messages(depth: int, patched: bool) -> list[str]:
    from torch._inductor import standalone_compile
    from torch._inductor.lowering import lowerings

    for op in (torch.ops.fdlowermsg.mix.default, torch.ops.fdlowermsg.last.default):
        lowerings.pop(op, None)  # met for the first time again: the message is written again
    logger = logging.getLogger("torch._inductor.graph")
    handler, level, propagate = _Messages(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    x, w = torch.randn(8, 8), torch.randn(8, 8)
    # A cached graph is not lowered again, so it would write no message.
    options = {"config_patches": {"force_disable_caches": True}}
    try:
        if patched:
            with short_lowering_messages():
                standalone_compile(_chain(depth), [x, w], dynamic_shapes="from_example_inputs", options=options)
        else:
            standalone_compile(_chain(depth), [x, w], dynamic_shapes="from_example_inputs", options=options)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
    return [t for t in handler.texts if "implicit fallback" in t]


def test_fallback_message_of_a_deep_chain_stays_short():
    unpatched = {d: _fallback_messages(d, patched=False) for d in (3, 6)}
    last = {d: next(t for t in msgs if "fdlowermsg.last" in t) for d, msgs in unpatched.items()}
    assert len(last[6]) > 4 * len(last[3])  # the stall's mechanism: the text grows with each layer

    patched = _fallback_messages(6, patched=True)
    short = next(t for t in patched if "fdlowermsg.last" in t)
    assert len(short) < 400, short
    assert "size=[8, 8]" in short and "dtype=torch.float32" in short
    from torch._inductor import exc

    assert exc.OperatorIssue.operator_str is not short_operator_str  # put back after the block


def test_describe_names_ir_nodes_without_their_inputs():
    from torch._inductor import ir

    class Node(ir.IRNode):  # an IR node whose text would be enormous
        def get_name(self):
            return "buf7"

        def get_size(self):
            return (2, 3)

        def get_dtype(self):
            return torch.bfloat16

        def __str__(self):
            raise AssertionError("formatted the node's inputs")

        __repr__ = __str__

    text = short_operator_str("aten.foo", [Node(), [Node()] * 20, 3.5], {"k": Node()})
    assert "args[0]: Node(name=buf7, size=[2, 3], dtype=torch.bfloat16)" in text
    assert f"... {20 - lowering_messages.MAX_ITEMS} more" in text
    assert "args[2]: 3.5" in text and "'k': Node(name=buf7" in text
    assert describe("x" * 1000).endswith("...") and len(describe("x" * 1000)) <= lowering_messages.MAX_REPR + 3


def test_the_build_compiles_inside_the_short_messages(monkeypatch, tmp_path):
    """Both Inductor backends compile with the short messages in force."""
    import torch._inductor as inductor_pkg
    from torch._inductor import exc

    seen = []

    def fake_standalone_compile(*args, **kwargs):
        seen.append(exc.OperatorIssue.operator_str is short_operator_str)
        raise RuntimeError("stop here")

    monkeypatch.setattr(inductor_pkg, "standalone_compile", fake_standalone_compile)
    monkeypatch.setattr(inductor_pkg, "aoti_compile_and_package", fake_standalone_compile)
    from flashdreams.export.backends import aoti, inductor

    class Prog:
        name = "dit"
        module = torch.nn.Linear(4, 4)

        @staticmethod
        def fresh_inputs():
            return (torch.randn(2, 4),)

    for backend in (inductor.InductorBackend(), aoti.AOTIBackend()):
        with pytest.raises(RuntimeError, match="stop here"):
            backend.build_graph(Prog(), tmp_path, torch.device("cpu"))
    assert seen == [True, True]
    assert exc.OperatorIssue.operator_str is not short_operator_str
