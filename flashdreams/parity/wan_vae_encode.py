"""fd-parity runner for `wan_vae_encode`: the Wan VAE encoder (chunks 1, 4, 4, ...).

the fixture set's wan21.md ($FD_FIXTURES), "Kind wan_vae_encode". Only `encoder.*` and `conv1.*` are stored,
so only the encoder half is built.
"""

from __future__ import annotations

import functools

import torch

from flashdreams.models.wan_vae import WanVAE, WanVAEConfig
from flashdreams.parity.common import Check, Fixture, register


@register("wan_vae_encode")
def run(fixture: Fixture, **_options) -> list[Check]:
    """Encode the fixture's video; Checks for mu, the normalised latent and log_var, where held."""
    vae = WanVAE(WanVAEConfig.from_dict(fixture.config), parts=("encoder",))
    vae.load_weights(fixture.weights(), source=str(fixture.weights_path))
    vae.set_latent_stats(fixture["latent_mean"], fixture["latent_std"])

    @functools.cache
    def encoded() -> tuple[torch.Tensor, torch.Tensor]:
        return vae.encode(fixture["video"].float())  # (mu, log_var), once and only if compared

    return fixture.check_present(
        {
            "mu": lambda: encoded()[0],
            "latent": lambda: vae.normalize(encoded()[0]),
            # Stored with an extra leading axis ([1, B, 16, t, h, w]); the values are what matter.
            "log_var": lambda: encoded()[1].reshape(fixture["log_var"].shape),
        }
    )
