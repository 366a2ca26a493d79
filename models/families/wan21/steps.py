"""The Wan2.1 step graphs with named inputs: the CFG pair as one forward, the prompt and image
encoders that fill the session's state, and the whole-clip decode."""

from __future__ import annotations

import torch
from torch import nn

from flashdreams.models.decode_step import decoder_module
from flashdreams.models.family import GraphSig
from flashdreams.models.wan_dit import WanDiT
from flashdreams.models.wan_i2v import EncodeImageStep  # noqa: F401  (the family's encode_image graph)


def dit_sig(i2v: bool) -> GraphSig:
    args = ("x", "t", "cross_k", "cross_v", *(("y",) if i2v else ()))
    return GraphSig("dit_cfg", args, ("cond", "uncond"))


def encode_prompt_sig(i2v: bool) -> GraphSig:
    args = ("prompt_embeds", "negative_prompt_embeds", *(("clip_fea",) if i2v else ()))
    return GraphSig("encode_prompt", args, ("cross_k", "cross_v"))


ENCODE_IMAGE_SIG = GraphSig("encode_image", ("image",), ("clip_fea", "y"))
DECODE_SIG = GraphSig("decode", ("latents",), ("video",))


class DiTCfgStep(nn.Module):
    """x [B, 16, F, h, w], t int64 [1] (or [B]), cross_k/v [layers, 2B, T, N, d] (the prompt's
    rows, then the negative prompt's), i2v: y [B, 20, F, h, w] -> (cond, uncond), each
    [B, 16, F, h, w] float32.

    Both predictions of classifier-free guidance come from one forward of batch 2B: the
    latent, timestep and y are repeated, the cached cross-attention K/V differ.
    """

    def __init__(self, model: WanDiT) -> None:
        super().__init__()
        self.model = model

    def forward(self, x, t, cross_k, cross_v, y=None):
        b = x.shape[0]
        x2 = torch.cat([x, x])
        t2 = t.expand(2 * b) if t.numel() == 1 else torch.cat([t, t])
        y2 = torch.cat([y, y]) if y is not None else None
        flow = self.model.forward_cached(x2, t2, cross_k, cross_v, y=y2)
        return flow[:b], flow[b:]


class _CrossKV(nn.Module):
    """One layer's cross-attention K/V projections (text; and image for i2v), nothing else of the block."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.k, self.v, self.norm_k = attn.k, attn.v, attn.norm_k
        self.image = hasattr(attn, "k_img")
        if self.image:
            self.k_img, self.v_img, self.norm_k_img = attn.k_img, attn.v_img, attn.norm_k_img

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1))

    def forward(self, text: torch.Tensor, image: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._heads(self.norm_k(self.k(text))), self._heads(self.v(text))
        if image is None:
            return k, v
        ki, vi = self._heads(self.norm_k_img(self.k_img(image))), self._heads(self.v_img(image))
        return torch.cat([ki, k], dim=1), torch.cat([vi, v], dim=1)  # image rows first, as the reference


class EncodePromptStep(nn.Module):
    """prompt_embeds, negative_prompt_embeds [B, text_len, text_dim] (i2v: clip_fea [B, 257, clip_dim])
    -> cross_k, cross_v [layers, 2B, T, N, d]: the prompt's rows, then the negative prompt's.

    Holds only the weights it uses (text and image embeddings, per-layer K/V), so a compiled
    engine does not store the DiT's weights twice.
    """

    embed_text = WanDiT.embed_text

    def __init__(self, model: WanDiT) -> None:
        super().__init__()
        self.cfg = model.cfg
        self.text_embedding = model.text_embedding
        self.img_emb = model.img_emb
        self.layers = nn.ModuleList([_CrossKV(blk.cross_attn) for blk in model.blocks])

    @property
    def dtype(self) -> torch.dtype:
        return self.text_embedding[0].weight.dtype

    def forward(self, prompt_embeds, negative_prompt_embeds, clip_fea=None):
        text = self.embed_text(torch.cat([prompt_embeds, negative_prompt_embeds]))
        image = None
        if self.img_emb is not None:
            image = self.img_emb(torch.cat([clip_fea, clip_fea]).to(self.dtype))
        kvs = [layer(text, image) for layer in self.layers]
        return torch.stack([k for k, _ in kvs]), torch.stack([v for _, v in kvs])


class ClipDecodeStep(nn.Module):
    """latents [B, 16, F, h, w] -> video [B, 1 + 4(F-1), 3, 8h, 8w] float32 in [0, 1].

    Every block is a new clip, so each call starts a fresh decoder stream (zeroed caches made
    inside the graph, not carried in the session) and feeds it `chunk` latent frames at a time.
    """

    def __init__(self, decoder, batch: int, latent_hw: tuple[int, int], chunk: int) -> None:
        super().__init__()
        self.net = decoder_module(decoder)  # registers the decoder's weights with this module
        self.decoder = decoder
        self.batch = batch
        self.latent_hw = tuple(latent_hw)
        self.chunk = max(1, int(chunk))

    def forward(self, latents):
        state = self.decoder.new_state(self.batch, *self.latent_hw)
        outs = [
            self.decoder.decode_block(latents[:, :, i : i + self.chunk], state)
            for i in range(0, latents.shape[2], self.chunk)
        ]
        return torch.cat(outs, dim=1)
