"""fd-parity kinds `wan_i2v_forward` and `wan_i2v_sample`: Wan2.1-I2V preprocessing and sampling.

One weights file holds the DiT (`dit.`), the CLIP vision tower (`clip.visual.`) and the VAE
encoder (`vae.`). `wan_i2v_forward` computes the CLIP tokens and `y` from the image here and
uses them for the two DiT calls; `wan_i2v_sample` runs a wan21 Session, which computes them
from its `image` input (so an error upstream shows downstream too). the fixture set's wan21.md ($FD_FIXTURES),
"Kinds wan_i2v_forward and wan_i2v_sample".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashdreams.models.clip_vision import ClipVision, ClipVisionConfig
from flashdreams.models.wan_config import WanConfig
from flashdreams.models.wan_dit import WanDiT
from flashdreams.models.wan_i2v import clip_tokens, i2v_condition
from flashdreams.models.wan_loader import load_wan_dit, select_prefix
from flashdreams.models.wan_vae import WanVAE, WanVAEConfig
from flashdreams.parity.common import Check, Fixture, register
from flashdreams.parity.wan_t2v_sample import check_all, sample_session


@dataclass
class I2VModels:
    dit: WanDiT
    clip: ClipVision
    vae: WanVAE


def load_models(fixture: Fixture, device: str = "cpu", attention: str = "sdpa") -> I2VModels:
    """The three models of the fixture's combined weights file."""
    p = fixture.params
    sd = fixture.weights()
    src = str(fixture.weights_path)
    cfg = WanConfig.from_dict(fixture.config).replace(clip_dim=int(p["clip_dim"]))
    dit = load_wan_dit(sd, cfg, device=device, prefix="dit.")
    dit.set_attention(attention)
    clip = ClipVision(ClipVisionConfig.from_dict(fixture.meta.get("clip_config", p.get("clip_config"))))
    clip.load_weights(select_prefix(sd, "clip."), source=src)
    vae = WanVAE(WanVAEConfig.from_dict(p["vae_config"]), parts=("encoder",))
    vae.load_weights(select_prefix(sd, "vae."), source=src)
    vae.set_latent_stats(fixture["latent_mean"], fixture["latent_std"])
    return I2VModels(dit, clip.eval().to(device), vae.eval().to(device))


def preprocess(fixture: Fixture, models: I2VModels, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(clip_context [257, clip_dim], y [20, F_lat, lat_h, lat_w]) from the fixture's image."""
    p = fixture.params
    image = fixture["image"].to(device)
    clip = clip_tokens(models.clip, image)
    y, _ = i2v_condition(models.vae, image, float(p["max_area"]), int(p["frame_num"]))
    return clip, y


@register("wan_i2v_forward")
def run_forward(fixture: Fixture, device: str = "cpu", attention: str = "sdpa", **_options) -> list[Check]:
    models = load_models(fixture, device, attention)
    clip, y = preprocess(fixture, models, device)
    x, t = fixture["x"].to(device)[None], fixture["timestep"].to(device)
    with torch.no_grad():
        out = {
            name: models.dit(x, t, fixture[ctx].to(device)[None], clip_fea=clip[None], y=y[None])[0]
            for name, ctx in (("output_cond", "context"), ("output_uncond", "context_null"))
        }
    return check_all(fixture, {"clip_context": clip, "y": y, **out})


@register("wan_i2v_sample")
def run_sample(fixture: Fixture, device: str = "cpu", attention: str = "sdpa", **_options) -> list[Check]:
    """Through a wan21 Session: the image is the `image` input, the family computes clip tokens and y."""
    return check_all(fixture, sample_session(fixture, device, attention))
