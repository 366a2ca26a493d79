"""fd-parity runner for `wan_vae_decode`: the Wan VAE full decode and the demo's block stream.

the fixture set's README.md ($FD_FIXTURES), "Kind wan_vae_decode". Computed in float32 on the CPU.
"""

from __future__ import annotations

import functools

import torch

from flashdreams.models.wan_vae import WanVAE, WanVAEConfig
from flashdreams.parity.common import Check, Fixture, register


@register("wan_vae_decode")
def run(fixture: Fixture, **_options) -> list[Check]:
    """Decode the fixture's latents both ways; one Check per video it holds (raw and clamped)."""
    vae = WanVAE(WanVAEConfig.from_dict(fixture.config))  # both parts: checks every stored key
    vae.load_weights(fixture.weights(), source=str(fixture.weights_path))
    vae.set_latent_stats(fixture["latent_mean"], fixture["latent_std"])
    params = fixture.params
    z = fixture["z"].float().permute(0, 2, 1, 3, 4)  # [B, T, 16, h, w] -> the decoder's [B, 16, T, h, w]

    def frame_major(video: torch.Tensor) -> torch.Tensor:
        return video.permute(0, 2, 1, 3, 4)

    block, drop = int(params.get("stream_block", 3)), int(params.get("stream_drop_first_frames", 3))

    @functools.cache
    def full() -> torch.Tensor:
        return frame_major(vae.decode_full(z))

    @functools.cache
    def stream() -> torch.Tensor:
        return frame_major(vae.decode_demo(z, block=block, drop=drop))

    # Each decode runs once, and only if the fixture holds one of its videos.
    return fixture.check_present(
        {
            "video_full_raw": full,
            "video_full": lambda: full().clamp(-1.0, 1.0),
            "video_stream_raw": stream,
            "video_stream": lambda: stream().clamp(-1.0, 1.0),
        }
    )
