"""The causal Wan2.2 step graphs: each expert's DiT forward against its own KV ring, the shared
prompt encoder, the block positions from the device-side block index, and the start-image encoder."""

from __future__ import annotations

import torch
from torch import nn

from flashdreams.models.families.causal_wan.steps import DIT_ARGS, DiTStep, EncodePromptStep
from flashdreams.models.family import GraphSig
from flashdreams.models.wan_i2v import image_latent
from flashdreams.models.wan_vae import WanVAE

EXPERT_GRAPHS = {"high": "dit_high", "low": "dit_low"}
RING_BUFFERS = {e: (f"ring_k_{e}", f"ring_v_{e}") for e in EXPERT_GRAPHS}
FIRST_SUFFIX = "_first"


def expert_graph(expert: str, first: bool) -> str:
    """The graph of `expert` for block 0 (one latent frame) or for the steady blocks.

    Compiled engines have static shapes, so block 0's single-frame calls are their own graphs
    (the same module; an Inductor engine stores the shared weights once).
    """
    return EXPERT_GRAPHS[expert] + (FIRST_SUFFIX if first else "")


# Every expert graph name -> its expert.
EXPERT_OF_GRAPH = {expert_graph(e, f): e for e in EXPERT_GRAPHS for f in (False, True)}


def expert_sig(expert: str, first: bool = False) -> GraphSig:
    """One expert's DiT call: causal_wan's `dit` signature under the expert's graph name."""
    return GraphSig(expert_graph(expert, first), DIT_ARGS, ("flow",), ("ring_k", "ring_v"), ("ring_k", "ring_v"))


ENCODE_SIG = GraphSig("encode_prompt", ("prompt_embeds",), ("cross_k", "cross_v"))
POSITIONS_SIG = GraphSig("block_positions", ("block_index",), ("frame_positions", "slots", "valid_len"))
ENCODE_IMAGE_SIG = GraphSig("encode_image", ("image",), ("image_latent",))

__all__ = ["DiTStep", "EncodePromptStep", "BlockPositionsStep", "EncodeStartImageStep", "expert_sig"]


class BlockPositionsStep(nn.Module):
    """block_index int64 [B] -> frame_positions [nf], slots [nf], valid_len [1] of a steady block (int64).

    Block sizes are [first, nf, nf, ...] (FastVideo's MoE path makes the first block 1 frame), which
    the plan contract's RingRule (fixed nf per block) cannot describe, so the positions are derived
    on the device from the block index the runtime writes before every block: one tiny graph per
    block, no host read-back, the same graph for every block. Every row of a session is at the
    same block, so row 0's index is used. Ring layout as models/kv_ring.py.
    """

    def __init__(self, first_frames: int, nf: int, sink: int, window: int, frame_tokens: int) -> None:
        super().__init__()
        self.first, self.nf, self.sink, self.window, self.fs = first_frames, nf, sink, window, frame_tokens
        self.register_buffer("offsets", torch.arange(nf, dtype=torch.int64), persistent=False)

    def forward(self, block_index: torch.Tensor):
        b = block_index[:1].to(torch.int64)
        f0 = self.first + (b - 1) * self.nf  # [1]; block 0 is the first kind, with constant positions
        frames = f0 + self.offsets.to(b.device)
        rolled = self.sink + torch.remainder(frames - self.sink, self.window)
        slots = torch.where(frames < self.sink, frames, rolled)
        valid = torch.clamp(f0 + self.nf, max=self.sink + self.window) * self.fs
        return frames, slots, valid


def host_positions(block: int, first_frames: int, nf: int, sink: int, window: int, fs: int) -> dict[str, list[int]]:
    """What the session's buffers hold during block `block` (both kinds), computed on the host."""
    f0, n = (0, first_frames) if block == 0 else (first_frames + (block - 1) * nf, nf)
    frames = list(range(f0, f0 + n))
    slots = [f if f < sink else sink + (f - sink) % window for f in frames]
    return {"frame_positions": frames, "slots": slots, "valid_len": [min(f0 + n, sink + window) * fs]}


class EncodeStartImageStep(nn.Module):
    """image [B, 3, H, W] in [0, 1] -> image_latent [B, 16, 1, lat_h, lat_w] float32: the normalised
    Wan VAE latent of the start image (bicubic-resized to 8x the latent size), as wan_i2v.image_latent."""

    def __init__(self, vae: WanVAE, latent_hw: tuple[int, int]) -> None:
        super().__init__()
        self.vae = vae
        self.latent_hw = tuple(latent_hw)

    def forward(self, image):
        img = (image.float() - 0.5) / 0.5
        return torch.stack([image_latent(self.vae, im, self.latent_hw, 1) for im in img])
