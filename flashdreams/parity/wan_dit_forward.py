"""fd-parity kind `wan_dit_forward`: one call of the bidirectional WanModel."""

from __future__ import annotations

import torch

from flashdreams.models.wan_config import WanConfig
from flashdreams.models.wan_loader import load_wan_dit
from flashdreams.parity.common import Check, Fixture, register


@register("wan_dit_forward")
def run(fixture: Fixture, device: str = "cpu", **_options) -> list[Check]:
    """One forward pass on the fixture's inputs; a Check for `output` (the Wan reference's)."""
    cfg_dict = fixture.meta.get("config_wan_equivalent", fixture.config)
    cfg = WanConfig.from_dict(cfg_dict)
    model = load_wan_dit(fixture.weights(), cfg, device=device)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(fixture["x"].to(device), fixture["timestep"].to(device), fixture["context"].to(device))

    # `output_diffusers` is [info] (diffusers' own float32 sinusoid), not a target.
    return fixture.check_present({"output": forward})
