"""Step programs: a family's named step graphs as modules with flat tensor I/O, ready to trace.

Any family's graph is traced the same way: its `GraphSig` names the call inputs, outputs and
the inputs it writes in place; its `LoadedModel.examples(name)` gives example call inputs at
the engine's fixed shapes (batch, resolution, block size and ring capacity are an engine's
identity). A grouped call input (one tensor per layer along dim 0, the KV ring) becomes one
graph input per layer, fed at run time with the dim-0 slices of the session's tensor, so the
compiled write touches only the block's rows (a mutated slice of one big input makes
Inductor copy the whole ring back every call: 84 ms per call for a 205 MB ring on CPU).

With `functional=True` (ONNX, TensorRT: formats without in-place inputs) a step clones the
state it would mutate and returns the updated state as extra outputs, named `<input>_out`;
the runtime copies them back into the session's buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from flashdreams.export.manifest import TensorSpec
from flashdreams.models.family import GraphSig, LoadedModel


class FlatStep(nn.Module):
    """A family graph called with flat inputs (grouped inputs as one input per layer)."""

    def __init__(self, module: nn.Module, sig: GraphSig, group_sizes: dict[str, int], functional: bool) -> None:
        super().__init__()
        self.module = module
        self.sig = sig
        self.group_sizes = group_sizes
        self.functional = functional

    def forward(self, *flat):
        args, i = [], 0
        for name in self.sig.args:
            n = self.group_sizes.get(name)
            if n is None:
                value = flat[i]
                i += 1
                if self.functional and name in self.sig.mutates:
                    value = value.clone()
            else:
                value = list(flat[i : i + n])
                i += n
                if self.functional and name in self.sig.mutates:
                    value = [v.clone() for v in value]
            args.append(value)
        out = self.module(*args)
        outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        if not self.functional:
            return outs if len(outs) > 1 else outs[0]
        state = []
        for name, value in zip(self.sig.args, args):
            if name in self.sig.mutates:
                state.extend(value if isinstance(value, list) else [value])
        return (*outs, *state)


@dataclass
class StepProgram:
    """A step module ready to trace: example inputs, typed I/O, mutated inputs, eager references.

    A caller passes *call inputs*; a call input listed in `groups` is one tensor whose dim-0
    slices are separate graph inputs (the per-layer rings). `inputs` are the graph's flat inputs.
    """

    name: str
    module: nn.Module
    call_names: list[str]
    call_inputs: tuple[torch.Tensor, ...]
    groups: dict[str, list[str]]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    mutates: list[str]
    serves: list[str]
    state_outputs: dict[str, str] = field(default_factory=dict)  # functional: output name -> input name
    attention: str = "sdpa"
    # Eager results on the example inputs: every output, and (in-place form) each mutated input after the call.
    reference_outputs: tuple[torch.Tensor, ...] = ()
    reference_state: dict[str, torch.Tensor] = field(default_factory=dict)

    def flatten(self, call_args) -> tuple[torch.Tensor, ...]:
        return flatten_call(self.call_names, self.groups, call_args)

    def fresh_inputs(self) -> tuple[torch.Tensor, ...]:
        """Graph inputs from copies of the example call inputs (a call mutates its state inputs)."""
        return self.flatten(tuple(t.clone() for t in self.call_inputs))

    def to_dict(self) -> dict:
        # Small integer inputs (positions, slots, valid length) keep their example values: the
        # loader's warm-up call uses them, so it runs on meaningful indices, not zeros.
        warmup = {
            n: t.reshape(-1).tolist()
            for n, t in zip(self.call_names, self.call_inputs)
            if not t.is_floating_point() and t.numel() <= 64
        }
        return {
            "call_inputs": list(self.call_names),
            "groups": {k: list(v) for k, v in self.groups.items()},
            "warmup_values": warmup,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "mutates": list(self.mutates),
            "serves": list(self.serves),
            "state_outputs": dict(self.state_outputs),
            "attention": self.attention,
        }


def flatten_call(call_names, groups, call_args) -> tuple[torch.Tensor, ...]:
    """Call inputs -> graph inputs: a grouped call input contributes its dim-0 slices (views)."""
    out: list[torch.Tensor] = []
    for name, t in zip(call_names, call_args):
        if name in groups:
            out.extend(t.unbind(0))
        else:
            out.append(t)
    return tuple(out)


def _spec(name: str, t: torch.Tensor) -> TensorSpec:
    return TensorSpec(name, tuple(t.shape), t.dtype)


@torch.no_grad()
def step_program(model: LoadedModel, name: str, functional: bool = False) -> StepProgram:
    """Graph `name` of a loaded family model at its engine shapes, run once eagerly for its I/O and references."""
    sig = model.plan.graphs[name]
    call_inputs = model.examples(name)
    groups = {g: [f"{g}_{i}" for i in range(call_inputs[sig.args.index(g)].shape[0])] for g in sig.groups}
    module = FlatStep(model.graphs[name], sig, {g: len(v) for g, v in groups.items()}, functional)
    input_names = [n for a in sig.args for n in groups.get(a, [a])]
    mutates = [n for m in sig.mutates for n in groups.get(m, [m])]
    copies = flatten_call(sig.args, groups, tuple(t.clone() for t in call_inputs))
    outs = module(*copies)
    outs = outs if isinstance(outs, tuple) else (outs,)
    names = list(sig.outs)
    state_outputs = {}
    if functional:
        names += [f"{m}_out" for m in mutates]
        state_outputs = {f"{m}_out": m for m in mutates}
    if len(names) != len(outs):
        raise AssertionError(f"step {name}: {len(outs)} outputs for names {names}")
    return StepProgram(
        name=name,
        module=module,
        call_names=list(sig.args),
        call_inputs=tuple(call_inputs),
        groups=groups,
        inputs=[_spec(n, t) for n, t in zip(input_names, copies)],
        outputs=[_spec(n, t) for n, t in zip(names, outs)],
        mutates=mutates,
        serves=[name],
        state_outputs=state_outputs,
        attention=model.describe.get("attention", "none"),
        reference_outputs=tuple(outs),
        reference_state={} if functional else {n: copies[input_names.index(n)] for n in mutates},
    )


def step_programs(model: LoadedModel, functional: bool = False) -> list[StepProgram]:
    """Every graph of the model's plan, in plan order."""
    return [step_program(model, name, functional) for name in model.plan.graphs]
