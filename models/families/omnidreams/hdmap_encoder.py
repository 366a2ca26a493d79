"""The HD-map encoder of OmniDreams as two step graphs: rendered HD-map frames -> the chunk's 16-channel latent.

The public preset encodes the HD map with LightVAE. We take it to be the Wan2.1 VAE encoder at a
reduced width (LightX2V's `lightvaew2_1`, a channel-pruned Wan2.1 VAE; `dim` 24 here). That is an
assumption: no reference fixture covers LightVAE, so its numerics are unverified; the Wan2.1
VAE encoder itself (dim 96) is fixtured (`wan21_vae_encode`) and is the fallback (`dim=96`).

Streaming: the causal encoder codes frame 0 alone and then 4 frames per latent, carrying a 2-frame
cache per causal conv and the last frame of each temporal downsampler. Every chunk hands in 8
frames: the first chunk uses its last 5 (1 + 4 -> 2 latents, the 5 frames the first chunk's
decoder hands out), later chunks all 8 (4 + 4 -> 2 latents, coded in one pass). The caches are fixed-shape session
state (found by running the encoder once on a blank first frame at load), written in place, so
the block program stays capturable and a reset starts the stream over.
"""

from __future__ import annotations

import torch
from torch import nn

from flashdreams.models.family import GraphSig, TensorDecl, dtype_name
from flashdreams.models.wan_vae import WanVAE, WanVAEConfig

FRAMES_PER_CHUNK = 8
FIRST_CHUNK_FRAMES = 5
LIGHTVAE = WanVAEConfig(dim=24)


def cache_templates(vae: WanVAE, batch: int, height: int, width: int) -> list[torch.Tensor]:
    """The encoder's per-slot caches after a stream's first frame (their shapes and dtypes are the state's)."""
    caches: list = [None] * vae.encoder.num_slots
    w = vae.conv1.weight
    with torch.no_grad():
        vae.encoder(torch.zeros(batch, 3, 1, height, width, device=w.device, dtype=w.dtype), caches)
    return caches


class EncodeHdmapStep(nn.Module):
    """hdmap_video [B, 8, 3, H, W] in [0, 1], *caches -> hdmap [B, 16, 2, H/8, W/8] (normalised latent);
    the caches are updated in place. `first` starts a new stream (the caches' old values are not read)."""

    def __init__(self, vae: WanVAE, first: bool) -> None:
        super().__init__()
        self.vae = vae
        self.first = first

    def forward(self, hdmap_video: torch.Tensor, *caches: torch.Tensor) -> torch.Tensor:
        w = self.vae.conv1.weight
        video = (hdmap_video.permute(0, 2, 1, 3, 4) * 2 - 1).to(w.dtype)  # [B, 3, T, H, W] in [-1, 1]
        live: list = [None] * len(caches) if self.first else list(caches)
        enc = self.vae.encoder
        if self.first:
            start = FRAMES_PER_CHUNK - FIRST_CHUNK_FRAMES
            outs = [enc(video[:, :, start : start + 1], live), enc(video[:, :, start + 1 :], live)]
        else:
            # Both latents' 8 frames in one pass: each causal conv sees [its 2 cached frames | 8 frames]
            # and each stride-2 time step [its last frame | the chunk], which is what two 4-frame passes
            # compute, with half the launches and cache copies and twice the rows per convolution.
            outs = [enc(video, live)]
        for state, value in zip(caches, live):
            if value is not state:  # new tensors (first chunk, temporal downsamplers): copy into the state
                state.copy_(value)
        mu = self.vae.conv1(torch.cat(outs, dim=2)).chunk(2, dim=1)[0]
        return self.vae.normalize(mu).float()


def encoder_graphs(vae: WanVAE, batch: int, height: int, width: int):
    """(graphs, sigs, state decls, state names) of the `encode_hdmap_first` / `encode_hdmap` graphs."""
    templates = cache_templates(vae, batch, height, width)
    names = [f"hdmap_enc_{i}" for i in range(len(templates))]
    decls = {
        n: TensorDecl(n, tuple(t.shape), dtype_name(t.dtype), f"HD-map encoder streaming cache {i}", rollback=True)
        for i, (n, t) in enumerate(zip(names, templates))
    }
    graphs, sigs = {}, {}
    for name, first in (("encode_hdmap_first", True), ("encode_hdmap", False)):
        graphs[name] = EncodeHdmapStep(vae, first)
        sigs[name] = GraphSig(name, ("hdmap_video", *names), ("hdmap",), tuple(names))
    return graphs, sigs, decls, names
