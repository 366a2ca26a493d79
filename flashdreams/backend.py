"""Graph backends at run time: one contract for eager and compiled graphs alike.

A backend runs a named graph on named tensors: `call(graph, args, block)` takes the graph's
call inputs by name (the plan's `GraphSig.args`) and returns its outputs in `outs` order.
`EagerBackend` runs a family's torch modules; a built engine's backend
(`flashdreams.engine_runtime`) runs compiled graphs with the same contract, so one session
loop serves both.
"""

from __future__ import annotations

from typing import Protocol

import torch

from flashdreams.models.family import LoadedModel


class GraphBackend(Protocol):
    name: str
    device: torch.device
    dtype: torch.dtype
    shape_specialized: bool

    def call(self, graph: str, args: dict[str, torch.Tensor], block: int) -> tuple[torch.Tensor, ...]: ...


class EagerBackend:
    """A family's torch modules as they are: the reference path and what CPU tests use."""

    name = "eager"

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.plan = model.plan
        self.device = model.device
        self.dtype = model.dtype
        self.graphs = model.graphs

    @property
    def shape_specialized(self) -> bool:
        """True when calls depend on a host-known value per block (torch attention slicing the
        ring to its fill level); the session then keys its captured graphs by block index value."""
        hints = self.model.eager_hints
        return hints is not None and any(hints(g, 0) for g in self.plan.graphs)

    @torch.no_grad()
    def call(self, graph: str, args: dict[str, torch.Tensor], block: int) -> tuple[torch.Tensor, ...]:
        sig = self.plan.graphs[graph]
        hints = self.model.eager_hints(graph, block) if self.model.eager_hints else {}
        out = self.graphs[graph](*[args[a] for a in sig.args], **hints)
        return (out,) if isinstance(out, torch.Tensor) else tuple(out)
