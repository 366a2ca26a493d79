"""FlashVSR's step graphs with named inputs: LQ frame preparation, the DiT chunk, the prompt, the decode."""

from __future__ import annotations

import torch
from torch import nn

from flashdreams.models.families.flashvsr.dit import FIRST_SLABS, chunk_frame_positions, cross_kv, forward_chunk
from flashdreams.models.families.flashvsr.lq_proj import LQProjector
from flashdreams.models.families.flashvsr.tcdecoder import (
    TCDecoder,
    adain_colorfix,
    decoder_input,
    to_signed,
    upsample_lq,
)
from flashdreams.models.family import GraphSig
from flashdreams.models.taehv import TAEHVDecodeState
from flashdreams.models.wan_dit import WanDiT

FIRST_LQ_FRAMES = 25  # chunk 0: frame 0 (decoder only) + 6 clips of 4
STEADY_LQ_FRAMES = 8  # every later chunk: 2 clips
FIRST_LATENTS, STEADY_LATENTS = 6, 2
FIRST_OUT_FRAMES = 4 * FIRST_LATENTS - 3  # a fresh decode drops 3 frames
STEADY_OUT_FRAMES = 4 * STEADY_LATENTS
TAIL = 4  # LQ frames a chunk's decode borrows from the previous chunk's input

ENCODE_SIG = GraphSig("encode_prompt", ("prompt_embeds",), ("cross_k", "cross_v"))
DIT_ARGS = ("lq_video", "x", "cross_k", "cross_v", "cache_k", "cache_v", "block_index")


def dit_sig(name: str) -> GraphSig:
    return GraphSig(name, DIT_ARGS, ("flow",), ("cache_k", "cache_v"), ("cache_k", "cache_v"))


def prepare_sig(name: str) -> GraphSig:
    return GraphSig(name, ("lq_frames",), ("lq_video",))


class PrepareStep(nn.Module):
    """lq_frames [B, >=n, h, w, 3] pixel values in [0, 255] -> the first n frames as [B, 3, n, H, W] in [-1, 1].

    `u8 / 255`, bicubic x scale (torch, as the release's GPU loader), then `* 2 - 1`.
    """

    def __init__(self, frames: int, scale: int) -> None:
        super().__init__()
        self.frames, self.scale = frames, scale

    def forward(self, lq_frames: torch.Tensor) -> torch.Tensor:
        b, _, h, w, c = lq_frames.shape
        x = lq_frames[:, : self.frames].float().permute(0, 1, 4, 2, 3).reshape(b * self.frames, c, h, w) / 255
        x = upsample_lq(x, self.scale) * 2 - 1
        return x.reshape(b, self.frames, c, *x.shape[-2:]).transpose(1, 2).contiguous()


class DiTChunkStep(nn.Module):
    """One chunk: LQ features of its clips, then the DiT with LCSA over the K/V ring; returns the flow.

    lq_video [B, 3, n, H, W]; x [B, 16, f, h, w] noise; block_index int64 [B]: chunk k gives the
    RoPE frames 4 + 2k, 5 + 2k and the ring slot (k + 2) mod R (rows step together). Attention
    reads the first `valid_slabs` ring slots. `masks`: a list to record the block masks in.
    """

    def __init__(
        self, dit: WanDiT, lq_proj: LQProjector, first: bool, ring_slabs: int, valid_slabs: int, **attn
    ) -> None:
        super().__init__()
        self.dit, self.lq_proj = dit, lq_proj
        self.first, self.ring_slabs, self.valid_slabs = first, ring_slabs, valid_slabs
        self.attn = attn  # topk, local_range, mode
        self.masks: list | None = None

    def forward(self, lq_video, x, cross_k, cross_v, cache_k, cache_v, block_index):
        clips = lq_video[:, :, 1:FIRST_LQ_FRAMES] if self.first else lq_video[:, :, :STEADY_LQ_FRAMES]
        feats = self.lq_proj.stream_features(clips)
        f = x.shape[2]
        if self.first:
            positions, slot = chunk_frame_positions(0, f, x.device), None
        else:
            k = block_index[:1]
            positions = 4 + 2 * k + torch.arange(f, device=x.device)
            slot = (k + FIRST_SLABS - 1) % self.ring_slabs
        return forward_chunk(
            self.dit, x, feats, cross_k, cross_v, cache_k, cache_v, positions,
            slot=slot, valid_slabs=self.valid_slabs, masks=self.masks, **self.attn,
        )  # fmt: skip


class EncodePromptStep(nn.Module):
    """prompt_embeds [B, T, text_dim] (the fixed prompt tensor, used as given) -> cross_k, cross_v."""

    def __init__(self, dit: WanDiT) -> None:
        super().__init__()
        self.dit = dit

    def forward(self, prompt_embeds):
        return cross_kv(self.dit, prompt_embeds)


class TCDecodeStep(nn.Module):
    """latents [B, 16, f, h, w] + the chunk's LQ frames -> colour-fixed frames [B, T, 3, H, W] in [0, 1].

    The first chunk decodes latents 0..5 with LQ frames 0..20 on fresh memory (3 frames dropped);
    chunk k >= 1 decodes its 2 latents with the previous input's last 4 LQ frames and its own
    first 4 (`lq_tail`, rewritten here), continuing the memory. Output frame j is LQ frame j's.
    """

    def __init__(self, decoder: TCDecoder, first: bool) -> None:
        super().__init__()
        self.decoder, self.first = decoder, first

    def forward(self, latents, lq_video, lq_tail, *memory):
        b, _, f, h, w = latents.shape
        if self.first:
            cond, tail = lq_video[:, :, :FIRST_OUT_FRAMES], lq_video[:, :, FIRST_LQ_FRAMES - TAIL :]
        else:
            cond = torch.cat([lq_tail, lq_video[:, :, :TAIL]], dim=2)
            tail = lq_video[:, :, STEADY_LQ_FRAMES - TAIL : STEADY_LQ_FRAMES]
        state = TAEHVDecodeState(list(memory), b, h, w, started=not self.first)
        out = self.decoder.decode_stream(decoder_input(latents.transpose(1, 2), cond), state)
        video = adain_colorfix(to_signed(out.float()), cond)
        lq_tail.copy_(tail)
        return ((video + 1) / 2).transpose(1, 2)
