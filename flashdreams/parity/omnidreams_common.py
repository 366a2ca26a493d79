"""What the two OmniDreams fixture kinds share: the fixture's preset and engine, and its tensor layouts.

The fixtures store latents as [B, V, T, C, H, W] (V = 1 view) and the random draws patchified
as [B, V, L, 64]; sessions use [B, C, T, H, W] (the fixture set's omnidreams.md ($FD_FIXTURES)).
"""

from __future__ import annotations

import torch

from flashdreams.backend import EagerBackend
from flashdreams.engine import Engine
from flashdreams.errors import InvalidArgumentError
from flashdreams.models.cosmos_dit import CosmosConfig
from flashdreams.models.families.omnidreams import FAMILY, Preset
from flashdreams.models.family import LoadOptions
from flashdreams.parity.common import Fixture


def fixture_preset(fixture: Fixture) -> Preset:
    c = fixture.config
    p = fixture.params
    net = dict(c["network"])
    net["rope_h_extrapolation_ratio"] = c.get("h_extrapolation_ratio", 3.0)
    net["rope_w_extrapolation_ratio"] = c.get("w_extrapolation_ratio", 3.0)
    model = CosmosConfig.from_reference(net).replace(padding_channel=False)
    sched = c.get("scheduler", {})
    return Preset(
        name=f"fixture:{fixture.path.name}",
        description="parity fixture",
        model=model,
        len_t=int(c["len_t"]),
        window_t=int(c["window_size_t"]),
        sink_t=int(c.get("sink_size_t", 0)),
        denoising_timesteps=tuple(int(t) for t in sched.get("denoising_timesteps", (1000, 450))),
        shift=float(sched.get("shift", 5.0)),
        context_noise=float(c.get("context_noise", 128)),
        text_len=int(p["text_len"]),
        height=8 * int(p["height"]),
        width=8 * int(p["width"]),
        decoder=None,
        hdmap_input="latent",  # the fixtures give the HD-map latent (LightVAE output stand-in)
    )


def fixture_engine(fixture: Fixture, device: str = "cpu", attention: str = "sdpa") -> Engine:
    """An eager engine of the omnidreams family with the fixture's preset and weights (through FAMILY.load)."""
    preset = fixture_preset(fixture)
    if fixture.config.get("network", {}).get("enable_cross_view_attn"):
        raise InvalidArgumentError(f"fixture '{fixture.path.name}': multi-view OmniDreams is not supported")
    opts = LoadOptions(device=torch.device(device), attention=attention, batch=1, decoder=None)
    model = FAMILY.load(preset, opts, weights=fixture.weights())
    return Engine(EagerBackend(model), model.plan, preset, preset.name, None, False, model)


def to_session(t: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, C, H, W] -> [B, C, T, H, W]."""
    return t[:, 0].permute(0, 2, 1, 3, 4).contiguous()


def from_session(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, 1, T, C, H, W]."""
    return x.permute(0, 2, 1, 3, 4)[:, None].contiguous()


def unpatchify_draw(stored: torch.Tensor, t: int, h: int, w: int) -> torch.Tensor:
    """A draw stored as [B, 1, L, C*4] (token (t, h', w'), vector (c, kh, kw)) -> [B, C, T, H, W]."""
    b = stored.shape[0]
    c = stored.shape[-1] // 4
    x = stored[:, 0].reshape(b, t, h // 2, w // 2, c, 2, 2).permute(0, 4, 1, 2, 5, 3, 6)
    return x.reshape(b, c, t, h, w).contiguous()
