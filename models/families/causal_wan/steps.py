"""The causal Wan step graphs with named inputs: one DiT forward against the KV ring, and the prompt encoder."""

from __future__ import annotations

import torch
from torch import nn

from flashdreams.models.family import GraphSig
from flashdreams.models.wan_dit import WanAttention, WanDiT

DIT_ARGS = ("x", "t", "cross_k", "cross_v", "ring_k", "ring_v", "frame_positions", "slots", "valid_len")
DIT_SIG = GraphSig("dit", DIT_ARGS, ("flow",), ("ring_k", "ring_v"), ("ring_k", "ring_v"))
ENCODE_SIG = GraphSig("encode_prompt", ("prompt_embeds",), ("cross_k", "cross_v"))


class DiTStep(nn.Module):
    """x [B, C, nf, h, w], t [B, nf], cross_k/v, ring_k/v (one tensor [L, ...] or a list of layers),
    frame_positions, slots, valid_len -> flow [B, C, nf, h, w] float32; writes the block's K/V
    into the ring in place. It serves both the denoising calls and the commit."""

    def __init__(self, model: WanDiT, fp8_block_n: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.fp8_block_n = fp8_block_n  # key tile of the ring's fp8 shadow; None: no shadow (its args absent)

    def forward(
        self, x, t, cross_k, cross_v, ring_k, ring_v, frame_positions, slots, valid_len, *shadow,
        valid_len_host=None, attend=None, shard=None,
    ):  # fmt: skip
        """`shadow`: the ring's fp8 shadow (models/fp8_ring_shadow.FP8_SHADOW) where the plan keeps one;
        `attend`/`shard`: context parallel's hooks (WanDiT.forward_step), None in a plain call."""
        return self.model.forward_step(
            x, t, cross_k, cross_v, ring_k, ring_v, frame_positions, slots, valid_len, valid_len_host=valid_len_host,
            attend=attend, shard=shard, fp8_shadow=(*shadow, self.fp8_block_n) if shadow else None,
        )  # fmt: skip


class _CrossKV(nn.Module):
    """One layer's cross-attention K/V projections; reuses WanAttention's own `kv`."""

    heads = WanAttention.heads
    kv = WanAttention.kv

    def __init__(self, attn: WanAttention) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.k, self.v, self.norm_k = attn.k, attn.v, attn.norm_k


class EncodePromptStep(nn.Module):
    """prompt_embeds [B, text_len, text_dim] float32 -> cross_k, cross_v [layers, B, text_len, N, d].

    Holds only the weights it uses (text embedding, per-layer k/v/norm_k), so a compiled
    engine does not store the DiT's weights twice.
    """

    embed_text = WanDiT.embed_text

    def __init__(self, model: WanDiT) -> None:
        super().__init__()
        self.cfg = model.cfg
        self.text_embedding = model.text_embedding
        self.layers = nn.ModuleList([_CrossKV(blk.cross_attn) for blk in model.blocks])

    @property
    def dtype(self) -> torch.dtype:
        return self.text_embedding[0].weight.dtype

    def forward(self, prompt_embeds):
        c = self.embed_text(prompt_embeds)
        kvs = [layer.kv(c) for layer in self.layers]
        return torch.stack([k for k, _ in kvs]), torch.stack([v for _, v in kvs])
