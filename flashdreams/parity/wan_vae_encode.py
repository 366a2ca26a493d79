"""fd-parity runner for `wan_vae_encode`: the Wan VAE encoder (chunks 1, 4, 4, ...).

../shared/fixtures/wan21.md, "Kind wan_vae_encode". Only `encoder.*` and `conv1.*` are stored,
so only the encoder half is built.
"""

from __future__ import annotations

from flashdreams.models.wan_vae import WanVAE, WanVAEConfig
from flashdreams.parity.common import Check, Fixture, register


@register("wan_vae_encode")
def run(fixture: Fixture, **_options) -> list[Check]:
    """Encode the fixture's video; Checks for mu, the normalised latent and log_var."""
    vae = WanVAE(WanVAEConfig.from_dict(fixture.config), parts=("encoder",))
    vae.load_weights(fixture.weights(), source=str(fixture.weights_path))
    vae.set_latent_stats(fixture["latent_mean"], fixture["latent_std"])
    mu, log_var = vae.encode(fixture["video"].float())
    checks = [fixture.check("mu", mu), fixture.check("latent", vae.normalize(mu))]
    if "log_var" in fixture.tensors:
        # Stored with an extra leading axis ([1, B, 16, t, h, w]); the values are what matter.
        checks.append(fixture.check("log_var", log_var.reshape(fixture["log_var"].shape)))
    return checks
