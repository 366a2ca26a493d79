"""Matrix-Game step graphs with named inputs: the action windows of a block, the DiT against all
caches, and the start-image encoders that fill the session's conditioning state."""

from __future__ import annotations

import torch
from torch import nn

from flashdreams.models.action_module import block_window_index
from flashdreams.models.family import GraphSig
from flashdreams.models.fp8_ring_shadow import FP8_SHADOW
from flashdreams.models.matrixgame_dit import MatrixGameDiT
from flashdreams.models.wan_i2v import EncodeImageStep  # noqa: F401  (the family's encode_image graph)

CACHES_KB = ("keyboard_k", "keyboard_v")
CACHES_MOUSE = ("mouse_k", "mouse_v")


def dit_sig(mouse: bool) -> GraphSig:
    caches = ("ring_k", "ring_v", *CACHES_KB, *(CACHES_MOUSE if mouse else ()))
    args = (
        "x",
        "t",
        "cond_concat",
        "cross_k",
        "cross_v",
        *caches,
        "frame_positions",
        "slots",
        "valid_len",
        "keyboard_win",
        *(("mouse_win",) if mouse else ()),
    )
    return GraphSig("dit", args, ("flow",), caches, caches)


def actions_sig(mouse: bool) -> GraphSig:
    ins = ("keyboard", "keyboard_hist", *(("mouse", "mouse_hist") if mouse else ()), "block_index")
    outs = ("keyboard_win", "keyboard_hist", *(("mouse_win", "mouse_hist") if mouse else ()))
    return GraphSig("actions", ins, outs)


ENCODE_CONTEXT_SIG = GraphSig("encode_context", ("visual_context",), ("cross_k", "cross_v"))
ENCODE_IMAGE_SIG = GraphSig("encode_image", ("image",), ("visual_context", "cond_concat"))


class DiTStep(nn.Module):
    """The `dit` graph: MatrixGameDiT.step with the plan's argument order (see `dit_sig`)."""

    def __init__(self, model: MatrixGameDiT, fp8_block_n: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.mouse = model.action_cfg.enable_mouse
        self.fp8_block_n = fp8_block_n  # key tile of the ring's fp8 shadow; None: no shadow (its args absent)

    def forward(self, x, t, cond_concat, cross_k, cross_v, ring_k, ring_v, keyboard_k, keyboard_v, *rest, **hints):
        shadow = None
        if self.fp8_block_n is not None:  # the shadow's tensors come last (fp8_ring_shadow.with_fp8_shadow)
            n = len(FP8_SHADOW)
            rest, shadow = rest[:-n], (*rest[-n:], self.fp8_block_n)
        if self.mouse:
            mouse_k, mouse_v, frame_positions, slots, valid_len, keyboard_win, mouse_win = rest
        else:
            (frame_positions, slots, valid_len, keyboard_win), mouse_k, mouse_v, mouse_win = rest, None, None, None
        return self.model.step(
            x,
            t,
            cond_concat,
            cross_k,
            cross_v,
            ring_k,
            ring_v,
            keyboard_k,
            keyboard_v,
            mouse_k,
            mouse_v,
            frame_positions,
            slots,
            valid_len,
            keyboard_win,
            mouse_win,
            valid_len_host=hints.get("valid_len_host"),
            fp8_shadow=shadow,
        )


class ActionWindowStep(nn.Module):
    """The `actions` graph: a block's action rows plus the carried history -> each latent frame's window.

    keyboard [B, R*nf, K] (mouse [B, R*nf, 2]) are the block's video frames R*f0-(R-1) .. R*(f0+nf-1)+... ,
    i.e. R*nf rows; `*_hist` [B, W, .] the W rows before them (state). Block 0 (block_index 0, per
    row) has only 1 + R*(nf-1) video frames: its first R-1 rows stand for frames before frame 0,
    which the reference clamps to frame 0, so they and the history are replaced by row R-1 (frame 0)
    on the device; whatever the host sent there is ignored. Returns the windows [B, nf, W, .] and
    the new history (the last W rows).
    """

    def __init__(self, num_frames: int, ratio: int, window: int, mouse: bool) -> None:
        super().__init__()
        self.ratio, self.window, self.mouse = ratio, window, mouse
        idx = torch.tensor(block_window_index(num_frames, ratio, window), dtype=torch.int64)
        self.register_buffer("index", idx, persistent=False)

    def _one(self, new: torch.Tensor, hist: torch.Tensor, first: torch.Tensor):
        seq = torch.cat([hist.to(new.dtype), new], dim=1)
        r, w = self.ratio, self.window
        before_frame0 = torch.arange(seq.shape[1], device=seq.device) < w + r - 1
        seq = torch.where(first[:, None, None] & before_frame0[None, :, None], new[:, r - 1 : r], seq)
        return seq[:, self.index], seq[:, -w:]

    def forward(self, keyboard, keyboard_hist, *rest):
        block_index = rest[-1]
        first = block_index == 0
        kb_win, kb_hist = self._one(keyboard, keyboard_hist, first)
        if not self.mouse:
            return kb_win, kb_hist
        ms_win, ms_hist = self._one(rest[0], rest[1], first)
        return kb_win, kb_hist, ms_win, ms_hist


class _CrossKV(nn.Module):
    """One layer's cross-attention K/V projections (shares the DiT's modules)."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.k, self.v, self.norm_k = attn.k, attn.v, attn.norm_k

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heads = lambda y: y.unflatten(-1, (self.num_heads, -1))  # noqa: E731
        return heads(self.norm_k(self.k(c))), heads(self.v(c))


class EncodeContextStep(nn.Module):
    """The `encode_context` graph: CLIP tokens [B, 257, vdim] -> cross_k, cross_v [layers, B, 257, N, d].

    Holds only the weights it uses (img_emb, per-layer k/v/norm_k)."""

    def __init__(self, model: MatrixGameDiT) -> None:
        super().__init__()
        self.img_emb = model.img_emb
        self.layers = nn.ModuleList([_CrossKV(blk.cross_attn) for blk in model.blocks])

    def forward(self, visual_context):
        c = self.img_emb(visual_context.to(self.img_emb.proj[1].weight.dtype))
        kvs = [layer(c) for layer in self.layers]
        return torch.stack([k for k, _ in kvs]), torch.stack([v for _, v in kvs])
