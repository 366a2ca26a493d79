"""fd-parity runner for `wan_vae_decode`: the Wan VAE full decode and the demo's block stream.

../shared/fixtures/README.md, "Kind wan_vae_decode". Computed in float32 on the CPU.
"""

from __future__ import annotations

import torch

from flashdreams.models.wan_vae import WanVAE, WanVAEConfig
from flashdreams.parity.common import Check, Fixture, register


@register("wan_vae_decode")
def run(fixture: Fixture, **_options) -> list[Check]:
    """Decode the fixture's latents both ways; one Check per expected video (raw and clamped)."""
    vae = WanVAE(WanVAEConfig.from_dict(fixture.config))  # both parts: checks every stored key
    vae.load_weights(fixture.weights(), source=str(fixture.weights_path))
    vae.set_latent_stats(fixture["latent_mean"], fixture["latent_std"])
    params = fixture.params
    z = fixture["z"].float().permute(0, 2, 1, 3, 4)  # [B, T, 16, h, w] -> the decoder's [B, 16, T, h, w]

    def frame_major(video: torch.Tensor) -> torch.Tensor:
        return video.permute(0, 2, 1, 3, 4)

    full = frame_major(vae.decode_full(z))
    stream = frame_major(
        vae.decode_demo(
            z, block=int(params.get("stream_block", 3)), drop=int(params.get("stream_drop_first_frames", 3))
        )
    )
    return [
        fixture.check("video_full_raw", full),
        fixture.check("video_full", full.clamp(-1.0, 1.0)),
        fixture.check("video_stream_raw", stream),
        fixture.check("video_stream", stream.clamp(-1.0, 1.0)),
    ]
