"""The OmniDreams step graphs with named inputs: the cached chunk forward (with the first chunk's image
injection and mask), the image injection into the clean latent, and the prompt encoder."""

from __future__ import annotations

import torch
from torch import nn

from flashdreams.models.cosmos_dit import CosmosDiT
from flashdreams.models.families.cosmos.steps import _CrossKV
from flashdreams.models.family import GraphSig

_RING = ("ring_k", "ring_v", "frame_positions", "slots", "valid_len")
DIT_SIG = GraphSig("dit", ("x", "t", "cross_k", "cross_v", "hdmap", *_RING), ("flow",), _RING[:2], _RING[:2])
DIT_FIRST_SIG = GraphSig(
    "dit_first", ("x", "t", "cross_k", "cross_v", "hdmap", "image_latent", *_RING), ("flow",), _RING[:2], _RING[:2]
)


INJECT_SIG = GraphSig("inject_image", ("x0", "image_latent"), ("latents",))
ENCODE_SIG = GraphSig("encode_prompt", ("prompt_embeds",), ("cross_k", "cross_v"))


def inject_first_frame(x: torch.Tensor, image_latent: torch.Tensor) -> torch.Tensor:
    """x [B, 16, T, h, w] with latent frame 0 replaced by image_latent [B, 16, 1, h, w]."""
    return torch.cat([image_latent.to(x.dtype), x[:, :, 1:]], dim=2)


class ChunkStep(nn.Module):
    """x [B, 16, nf, h, w], t float32 [B], cross_k/v [layers, B, L, N, d], hdmap [B, 16, nf, h, w]
    (the chunk's HD-map latent), [first: image_latent [B, 16, 1, h, w]], ring_k/v, frame_positions,
    slots, valid_len -> flow [B, 16, nf, h, w] float32; writes the chunk's K/V into the ring.

    The first chunk's network input has latent frame 0 replaced by the image latent and a
    condition mask of 1 on that frame; later chunks have neither.
    """

    def __init__(self, model: CosmosDiT, first: bool, fp8_block_n: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.first = first
        self.fp8_block_n = fp8_block_n  # key tile of the ring's fp8 shadow; None: no shadow (its args absent)

    def forward(self, x, t, cross_k, cross_v, hdmap, *rest, valid_len_host=None, attend=None, shard=None):
        """`attend`/`shard`: context parallel's hooks (CosmosDiT.forward_chunk), None in a plain call."""
        if self.first:
            image_latent, *rest = rest
            x = inject_first_frame(x, image_latent)
        ring_k, ring_v, frame_positions, slots, valid_len, *shadow = rest
        b, _, nf, h, w = x.shape
        mask = x.new_zeros(b, 1, nf, h, w)
        if self.first:  # built functionally: an in-place write would leave a lifted constant in an exported graph
            mask = torch.cat([x.new_ones(b, 1, 1, h, w), mask[:, :, 1:]], dim=2)
        fp8_shadow = (*shadow, self.fp8_block_n) if shadow else None
        return self.model.forward_chunk(
            x, t, cross_k, cross_v, mask, hdmap, ring_k, ring_v, frame_positions, slots, valid_len, valid_len_host,
            fp8_shadow=fp8_shadow, attend=attend, shard=shard,
        )  # fmt: skip


class InjectStep(nn.Module):
    """x0, image_latent -> latents: the first chunk's output keeps the given frame exactly."""

    def forward(self, x0, image_latent):
        return inject_first_frame(x0, image_latent)


class EncodePromptStep(nn.Module):
    """prompt_embeds [B, L, text_in_dim] -> cross_k, cross_v [layers, B, L, N, d] (text projection + per-layer K/V)."""

    def __init__(self, model: CosmosDiT) -> None:
        super().__init__()
        self.crossattn_proj = model.crossattn_proj
        self.layers = nn.ModuleList([_CrossKV(blk.cross_attn) for blk in model.blocks])

    def forward(self, prompt_embeds):
        text = self.crossattn_proj(prompt_embeds.to(self.crossattn_proj[0].weight.dtype))
        kvs = [layer(text) for layer in self.layers]
        return torch.stack([k for k, _ in kvs]), torch.stack([v for _, v in kvs])
