"""Deterministic random weights, for the built-in model and for full-size speed runs.

Speed does not depend on weight values, and the built-in default must be the same
on every machine, so weights come from a seeded generator in a fixed order of
parameter names, scaled like a trained network's (unit-variance activations).
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def init_random_(module: nn.Module, seed: int = 0, generator_device: str | torch.device = "cpu") -> nn.Module:
    """Fill every parameter of `module` from a seeded normal draw, in sorted name order.

    Drawing on the CPU (the default) gives the same values on every machine; drawing on
    the module's GPU is much faster for billion-parameter speed runs.
    """
    gen = torch.Generator(device=generator_device).manual_seed(seed)
    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "modulation":
            std, mean = p.shape[-1] ** -0.5, 0.0
        elif leaf == "bias":
            std, mean = 0.02, 0.0
        elif p.dim() == 1:  # norm weights
            std, mean = 0.05, 1.0
        else:
            fan_in = p[0].numel()
            std, mean = fan_in**-0.5, 0.0
        draw = torch.randn(p.shape, generator=gen, device=generator_device, dtype=torch.float32)
        # In place: the same roundings as `draw * std + mean`, without two more temporaries of the
        # parameter's size (a billion-parameter CPU draw spent a third of its time allocating them).
        draw.mul_(std)
        if mean:
            draw.add_(mean)
        p.copy_(draw)
    return module


def seeded_module(
    module: nn.Module, seed: int, device: torch.device, dtype: torch.dtype, draw_on_cpu: bool = False
) -> nn.Module:
    """`module`, built on the meta device, made real on `device` in `dtype` with seeded random weights.

    The dtype is set while still on meta, so each weight is allocated once, in its final dtype (a
    14B network: 28 GB in bf16, never 56 GB in float32 first). `draw_on_cpu` draws on the CPU (the
    same values on every machine: the built-in models); else a GPU draws its own (seconds for 14B).
    """
    module = module.to(dtype).to_empty(device=device)
    init_random_(module, seed, "cpu" if draw_on_cpu or torch.device(device).type == "cpu" else device)
    return module.eval().requires_grad_(False)
