"""Shared pieces of the flashvsr_* parity runners: building the DiT, exact mask checks."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from flashdreams.models.wan_config import WanConfig
from flashdreams.models.wan_dit import WanDiT
from flashdreams.models.wan_loader import load_wan_dit
from flashdreams.parity.common import Check, Fixture


def load_dit(config: Mapping, weights: Mapping[str, torch.Tensor], device: str, attention: str) -> WanDiT:
    """The DiT under the fixture's config (reference constructor names) with its weights."""
    model = load_wan_dit(weights, WanConfig.from_dict(dict(config)), device=device)
    model.set_attention(attention)
    return model


def exact_check(fixture: Fixture, name: str, mask: torch.Tensor) -> Check:
    """A `[debug, exact]` block mask: its 'rel_l2' is the fraction of differing entries, tolerance 0."""
    ref = fixture[name]
    got = mask.reshape(ref.shape).to(torch.uint8).cpu() if mask.numel() == ref.numel() else None
    if got is None:
        return Check(name, float("nan"), 0.0, "debug, exact", reason=f"shape {tuple(mask.shape)} vs {tuple(ref.shape)}")
    frac = float((got != ref).sum()) / max(1, ref.numel())
    return Check(name, frac, 0.0, fixture.roles.get(name, "debug, exact"))
