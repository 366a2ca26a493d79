"""A toy row-independent world for the batched-session tests: a 3-slot ring, a keyboard input,
per-row block indices read on the device, a draw per block and a small decoder.

It is not a family in the registry (tests build its Engine directly): it exercises exactly the
contract `flashdreams.batched` relies on, with arithmetic small enough to check by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flashdreams.backend import EagerBackend
from flashdreams.engine import Engine
from flashdreams.models.family import BlockPlan, GraphSig, InputSpec, LoadedModel, TensorDecl, call

DIM, SLOTS, FRAMES, KEYS, SIDE = 8, 3, 2, 4, 4


class ToyStep(nn.Module):
    """x = tanh(mean of the valid ring slots @ Wc + keys @ Wk + pos(block) + 0.5 * noise); x goes to slot block % 3."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.wc = nn.Parameter(torch.randn(DIM, DIM, generator=g) / DIM**0.5)
        self.wk = nn.Parameter(torch.randn(FRAMES * KEYS, DIM, generator=g))
        self.pos = nn.Parameter(torch.randn(5, DIM, generator=g))

    def forward(self, ring, block_index, keyboard, noise):
        b = ring.shape[0]
        valid = torch.clamp(block_index, max=SLOTS)  # [B]: slots written so far
        mask = (torch.arange(SLOTS, device=ring.device)[None, :] < valid[:, None]).to(ring.dtype)
        ctx = (ring * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        x = torch.tanh(ctx @ self.wc + keyboard.reshape(b, -1) @ self.wk + self.pos[block_index % 5] + 0.5 * noise)
        slot = (block_index % SLOTS).view(b, 1, 1).expand(b, 1, DIM)
        ring.scatter_(1, slot, x[:, None, :])  # in place: each row writes its own slot
        return x


class ToyDecode(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(8)
        self.w = nn.Parameter(torch.randn(DIM, 3 * SIDE * SIDE, generator=g))

    def forward(self, x):
        return torch.sigmoid(x @ self.w).view(x.shape[0], 1, 3, SIDE, SIDE)


@dataclass
class ToyPreset:
    name: str = "toy-world"
    family: str = "toy"
    builtin: bool = True
    description: str = "test world"

    def to_dict(self) -> dict:
        return {"name": self.name}


def toy_plan(batch: int = 1) -> BlockPlan:
    b = batch
    plan = BlockPlan(
        family="toy",
        batch=b,
        graphs={
            "step": GraphSig("step", ("ring", "block_index", "keyboard", "noise"), ("x",), mutates=("ring",)),
            "decode": GraphSig("decode", ("x",), ("video",)),
        },
        state={
            "ring": TensorDecl("ring", (b, SLOTS, DIM), "float32", "ring of past states"),
            "block_index": TensorDecl("block_index", (b,), "int64", "each row's block index"),
        },
        inputs={
            "keyboard": InputSpec(
                "keyboard", (b, FRAMES, KEYS), units="keys", labels=("w", "s", "a", "d"), low=0.0, high=1.0
            )
        },
        constants={},
        draws={"noise": TensorDecl("noise", (b, DIM), "float32", "the block's noise")},
        programs={
            "step": [
                call("step", {a: a for a in ("ring", "block_index", "keyboard", "noise")}, {"x": "x"}),
                call("decode", {"x": "x"}, {"video": "video"}),
                {"op": "frames", "src": "video", "out": "frames"},
                {"op": "emit", "latents": "x", "frames": "frames"},
                {"op": "mark", "name": "block"},
            ]
        },
        sequence=[],
        steady="step",
        latents=TensorDecl("latents", (b, DIM), "float32", "the block's state"),
        meta={"rows": "independent", "height": SIDE, "width": SIDE, "fps": 4},
    )
    plan.validate()
    return plan


def toy_engine(batch: int = 1, device: str = "cpu") -> Engine:
    step, dec = ToyStep().to(device), ToyDecode().to(device)
    weights = nn.ModuleDict({"step": step, "decode": dec})
    model = LoadedModel(
        plan=toy_plan(batch),
        graphs={"step": step, "decode": dec},
        weights=weights,
        source="toy",
        device=torch.device(device),
    )
    return Engine(EagerBackend(model), model.plan, ToyPreset(), "toy", None, False, model)
