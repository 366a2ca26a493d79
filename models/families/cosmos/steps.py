"""The Cosmos-Predict2.5 step graphs with named inputs: the guidance pair as one forward (with the
video2world conditioning of `Video2WorldModelRectifiedFlow.denoise`), the prompt encoder, and the
whole-clip decode (shared with wan21)."""

from __future__ import annotations

import torch
from torch import nn

from flashdreams.models.cosmos_dit import CosmosDiT
from flashdreams.models.family import GraphSig

DIT_SIG = GraphSig("dit_cfg", ("x", "t", "cross_k", "cross_v", "cond_latent", "noise"), ("cond", "uncond"))
ENCODE_SIG = GraphSig("encode_prompt", ("prompt_embeds", "negative_prompt_embeds"), ("cross_k", "cross_v"))


def condition_frames(num_frames: int, num_cond: int, device=None) -> torch.Tensor:
    """float32 [1, 1, T, 1, 1]: 1 on the first `num_cond` latent frames (the given ones)."""
    m = torch.zeros(1, 1, num_frames, 1, 1, device=device)
    m[:, :, :num_cond] = 1.0
    return m


def frame_timesteps(t: torch.Tensor, mask: torch.Tensor, batch: int, cond_timestep: float) -> torch.Tensor:
    """[B, T] float32 network timesteps: `cond_timestep` on given frames, float(t) on the others."""
    m = mask.reshape(1, -1).expand(batch, -1)
    return torch.where(m > 0, torch.full_like(m, cond_timestep), t.reshape(-1, 1).float().expand_as(m))


class CosmosCfgStep(nn.Module):
    """x [B, 16, T, h, w], t int64 [1], cross_k/v [layers, 2B, L, N, d] (prompt rows, then the negative
    prompt's), cond_latent [B, 16, T, h, w] (clean latent of the given frames), noise (the clip's
    initial noise) -> (cond, uncond) velocities [B, 16, T, h, w] float32.

    As the reference's denoise: the given frames are replaced by the clean latent in the network
    input (not in the latents), run at `cond_timestep`, and their velocity is replaced by
    noise - cond_latent in both branches. Both branches run as one forward of batch 2B.
    """

    def __init__(self, model: CosmosDiT, num_frames: int, num_cond: int, cond_timestep: float) -> None:
        super().__init__()
        self.model = model
        self.cond_timestep = float(cond_timestep)
        # On the model's device from the start: a host-to-device copy inside a captured graph is not allowed.
        device = model.final_layer.linear.weight.device
        self.register_buffer("mask", condition_frames(num_frames, num_cond, device), persistent=False)

    def forward(self, x, t, cross_k, cross_v, cond_latent, noise):
        b = x.shape[0]
        m = self.mask
        x_in = cond_latent * m + x * (1 - m)
        tt = frame_timesteps(t, m, b, self.cond_timestep)
        cm = m.expand(2 * b, 1, x.shape[2], x.shape[3], x.shape[4])
        out = self.model.forward_cached(torch.cat([x_in, x_in]), torch.cat([tt, tt]), cross_k, cross_v, cm)
        replaced = (noise - cond_latent) * m
        return replaced + out[:b] * (1 - m), replaced + out[b:] * (1 - m)


class _CrossKV(nn.Module):
    """One layer's cross-attention K/V projections and K norm, nothing else of the block."""

    def __init__(self, attn) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.k_proj, self.v_proj, self.k_norm = attn.k_proj, attn.v_proj, attn.k_norm

    def forward(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.k_norm(self.k_proj(text).unflatten(-1, (self.num_heads, -1)))
        return k, self.v_proj(text).unflatten(-1, (self.num_heads, -1))


class EncodePromptStep(nn.Module):
    """prompt_embeds, negative_prompt_embeds [B, L, text_in_dim] -> cross_k, cross_v [layers, 2B, L, N, d].

    Holds only the weights it uses (the text projection and per-layer K/V), so a compiled engine
    does not store the DiT's weights twice.
    """

    def __init__(self, model: CosmosDiT) -> None:
        super().__init__()
        self.crossattn_proj = model.crossattn_proj
        self.layers = nn.ModuleList([_CrossKV(blk.cross_attn) for blk in model.blocks])

    def forward(self, prompt_embeds, negative_prompt_embeds):
        w = self.crossattn_proj[0].weight
        text = self.crossattn_proj(torch.cat([prompt_embeds, negative_prompt_embeds]).to(w.dtype))
        kvs = [layer(text) for layer in self.layers]
        return torch.stack([k for k, _ in kvs]), torch.stack([v for _, v in kvs])
