"""fd-parity kind `cosmos_dit_forward`: one `MinimalV1LVGDiT.forward` call (official or diffusers layout).

The fixture's weights go through the same loader a checkpoint does (models/cosmos_loader.py);
every [expected] and [debug] tensor is compared (the fixture set's cosmos.md ($FD_FIXTURES)).
"""

from __future__ import annotations

import torch

from flashdreams.models.cosmos_dit import CosmosConfig
from flashdreams.models.cosmos_loader import load_cosmos_dit
from flashdreams.parity.common import Check, Fixture, register


def fixture_config(fixture: Fixture) -> CosmosConfig:
    """The network config: the official constructor arguments (the diffusers fixture gives them beside)."""
    return CosmosConfig.from_reference(fixture.meta.get("config_official_equivalent", fixture.config))


@register("cosmos_dit_forward")
def run(fixture: Fixture, device: str = "cpu", attention: str = "sdpa", **_options) -> list[Check]:
    model = load_cosmos_dit(fixture.weights(), fixture_config(fixture), device=device)
    model.set_attention(attention)
    debug: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        out = model(
            fixture["x"].to(device),
            fixture["timesteps"].to(device),
            fixture["crossattn_emb"].to(device),
            fixture["condition_mask"].to(device),
            fixture["padding_mask"].to(device),
            debug=debug,
        )
    outputs = {"output": out, **{f"debug_{k}": v for k, v in debug.items() if k != "cache_k0"}}
    wanted = [n for n, r in fixture.roles.items() if r in ("expected", "debug")]
    return [fixture.check(n, outputs[n].detach().cpu()) for n in wanted if n in outputs]
