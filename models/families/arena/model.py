"""The arena world model: a small transformer that predicts a block of video frames from the last frame and the keys.

The arena (world.py) is deterministic: the next frames are a function of the current frame
and the keys. So the model regresses them directly (no noise, no sampler): the last frame
becomes 8x8-pixel patch tokens; each of the block's F target frames gets the same patches
as its first guess plus an embedding of the keys held up to that frame; one transformer
attends over all (1 + F) * 64 tokens, and a linear head adds a correction to each target
patch. The last predicted frame is the next block's context, so the state is one frame:
bounded, and the same at block 500 as at block 5.

`ArenaStep` is the plan's one graph: it picks the context (the session's start frame at
block 0, else the last frame) on the device from `block_index`, so every row of a batch can
be at its own block, and projects settled pixels onto the arena's palette (`ArenaStep.project`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flashdreams.errors import InvalidArgumentError
from flashdreams.kernels import layer_norm_affine, residual_layer_norm, ring_attention, triton_available
from flashdreams.kernels.palette_snap import palette_snap, palette_snap_reference
from flashdreams.models.dit_ops import gelu_tanh_mlp

# How the step runs its norms, attention and palette snap: auto = our kernels on CUDA, torch elsewhere
IMPLS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class ArenaConfig:
    size: int = 64  # frame side in pixels
    patch: int = 8
    frames: int = 4  # video frames per block
    keys: int = 4  # w, s, a, d
    dim: int = 192
    layers: int = 6
    heads: int = 6
    mlp: int = 4  # MLP width as a multiple of dim

    @property
    def grid(self) -> int:
        return self.size // self.patch

    @property
    def tokens(self) -> int:
        return self.grid * self.grid

    def to_dict(self) -> dict:
        return asdict(self)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp * dim)
        self.fc2 = nn.Linear(mlp * dim, dim)

    def attend(self, h: torch.Tensor, valid_len: torch.Tensor | None = None) -> torch.Tensor:
        """The attention branch of the normed tokens h [B, N, D]: proj(softmax(q k^T) v). With
        `valid_len` (N as a device tensor: every key is valid) our Triton attention on the [B, N, heads,
        d] views of the qkv projection (no transposes); at 64 worlds on the H200 the step took 1.22 ms
        with it and 1.30 with torch's SDPA (cuDNN at head dim 32), bench/results/next15-h200/diag.log."""
        b, n, d = h.shape
        qkv = self.qkv(h).view(b, n, 3, self.heads, d // self.heads)
        if valid_len is not None:
            a = ring_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], valid_len)
            return self.proj(a.reshape(b, n, d))
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        return self.proj(a.transpose(1, 2).reshape(b, n, d))

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        # On CUDA the tanh GELU runs in the first GEMM's epilogue (dit_ops.gelu_tanh_mlp).
        return gelu_tanh_mlp(h, self.fc1, self.fc2, impl="triton" if h.is_cuda else "sdpa")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attend(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ArenaNet(nn.Module):
    """frames [B, F, 3, H, W] = net(context [B, 3, H, W], keys [B, F, 4])."""

    def __init__(self, cfg: ArenaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        pdim = 3 * cfg.patch * cfg.patch
        self.patch_in = nn.Linear(pdim, cfg.dim)
        self.pos = nn.Parameter(torch.randn(cfg.tokens, cfg.dim) * 0.02)
        self.frame_emb = nn.Parameter(torch.randn(cfg.frames + 1, cfg.dim) * 0.02)  # 0: context, 1..F: targets
        # Per target frame: the keys of every frame up to it (later ones masked) and the summed displacement.
        self.key_mlp = nn.Sequential(
            nn.Linear(cfg.frames * cfg.keys + 2, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim)
        )
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, pdim)
        nn.init.zeros_(self.head.weight)  # starts as "copy the context": a sane rollout from step 0
        nn.init.zeros_(self.head.bias)
        mask = torch.tril(torch.ones(cfg.frames, cfg.frames))  # [target f, key frame j]: j <= f
        self.register_buffer("key_mask", mask, persistent=False)

    def patchify(self, img: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, N, 3 * p * p]."""
        b, c, _, _ = img.shape
        p, g = self.cfg.patch, self.cfg.grid
        return img.view(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)

    def unpatchify(self, tok: torch.Tensor) -> torch.Tensor:
        """[B, N, 3 * p * p] -> [B, 3, H, W]."""
        b = tok.shape[0]
        p, g = self.cfg.patch, self.cfg.grid
        return tok.view(b, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, g * p, g * p)

    def key_features(self, keys: torch.Tensor) -> torch.Tensor:
        """keys [B, F, 4] (w, s, a, d) -> [B, F, F * 4 + 2]: the keys so far and the summed (dx, dy)."""
        b, f, k = keys.shape
        seen = keys[:, None, :, :] * self.key_mask[None, :, :, None]  # [B, F(target), F(key frame), 4]
        move = torch.stack([keys[..., 3] - keys[..., 2], keys[..., 1] - keys[..., 0]], dim=-1)  # [B, F, 2]
        total = torch.cumsum(move, dim=1) * 0.25
        return torch.cat([seen.reshape(b, f, f * k), total], dim=-1)

    def _blocks_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks and the final norm with each residual add and the norm after it in one row pass
        (kernels/adaln.py): 13 passes instead of 13 LayerNorms and 12 adds. At 64 worlds torch's
        LayerNorm alone took 0.36 ms of a 1.4 ms step on the H200 (bench/results/next13-h200/), the
        fused passes 0.12 ms (next14-h200/). Attention through our kernel (`Block.attend`).
        Inference only (the kernels have no backward). Returns the final norm of every token."""
        first = self.blocks[0].norm1
        h = layer_norm_affine(x, first.weight, first.bias, first.eps)
        every = torch.full((1,), x.shape[1], dtype=torch.int32, device=x.device)  # all tokens are keys
        for i, blk in enumerate(self.blocks):
            x, h = residual_layer_norm(x, blk.attend(h, every), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
            after = self.blocks[i + 1].norm1 if i + 1 < len(self.blocks) else self.norm
            x, h = residual_layer_norm(x, blk.mlp(h), after.weight, after.bias, after.eps)
        return h

    def forward(self, context: torch.Tensor, keys: torch.Tensor, kernels: bool = False) -> torch.Tensor:
        """`kernels`: our kernels for the norms and attention (`_blocks_fused`; CUDA, or the CPU under
        TRITON_INTERPRET=1; inference only); the plain torch modules otherwise, as training runs."""
        cfg = self.cfg
        b, n, f = context.shape[0], cfg.tokens, cfg.frames
        dtype = self.patch_in.weight.dtype  # float32, or bfloat16 on a GPU (the residual `out` stays float32)
        patches = self.patchify(context.float())  # [B, N, P]
        base = self.patch_in(patches.to(dtype)) + self.pos  # [B, N, D]
        ctx = base + self.frame_emb[0]
        cond = self.key_mlp(self.key_features(keys.to(dtype)))  # [B, F, D]
        tgt = base[:, None] + self.frame_emb[1:, None] + cond[:, :, None]  # [B, F, N, D]
        x = torch.cat([ctx, tgt.reshape(b, f * n, cfg.dim)], dim=1)
        if kernels:
            h = self._blocks_fused(x)[:, n:]
        else:
            for blk in self.blocks:
                x = blk(x)
            h = self.norm(x[:, n:])
        delta = self.head(h).view(b, f, n, -1)
        out = patches[:, None] + delta.float()  # [B, F, N, P]
        return self.unpatchify(out.reshape(b * f, n, -1)).view(b, f, 3, cfg.size, cfg.size)


def project_to_palette(video: torch.Tensor, palette: torch.Tensor, settle: float) -> torch.Tensor:
    """Clamp to [0, 1]; pixels within `settle` (squared RGB distance) of a floor, wall or block color
    become that color.

    video [..., 3, H, W]; palette [P, 3] with the agent's two colors in rows 0 and 1. The arena's
    static things have a fixed palette; the learned model leaves small errors on them that, fed
    back as context, grow into noise over a few hundred blocks. Snapping only the pixels that are
    already close keeps the static world clean and leaves everything uncertain (the agent, blur
    around it) as the model drew it. Training rolls out through the same function; on CUDA the
    session runs it as one kernel pass (`ArenaStep.project`).
    """
    return palette_snap_reference(video, palette, settle)


class ArenaStep(nn.Module):
    """The plan's graph: one block for every row, each row at its own block index.

    Block 0 of a row starts from its `start_frame` input, or, where that input is all zeros,
    from the built-in start (one of `starts`, picked by the row's `start_noise` draw, so the
    session seed picks the arena). Later blocks continue from `last_frame`.
    """

    def __init__(
        self, net: ArenaNet, starts: torch.Tensor, palette: torch.Tensor, settle: float = 0.02, impl: str = "auto"
    ) -> None:
        super().__init__()
        if impl not in IMPLS:
            raise InvalidArgumentError(f"arena step impl '{impl}': choose one of {', '.join(IMPLS)}")
        self.impl = impl
        self.net = net
        self.register_buffer("starts", starts.float().clone(), persistent=False)  # [S, 3, H, W]
        self.register_buffer("palette", palette.float().clone(), persistent=False)  # [P, 3]; rows 0, 1: the agent's
        self.settle = settle

    def uses_kernels(self, t: torch.Tensor) -> bool:
        """impl "triton"; or "auto" on CUDA (the CPU runs the kernels only in Triton's interpreter)."""
        return self.impl == "triton" or (self.impl == "auto" and t.is_cuda and triton_available(t.device))

    def project(self, video: torch.Tensor) -> torch.Tensor:
        """The net's raw frames clamped and snapped (`project_to_palette`); one kernel pass with the
        kernels (`uses_kernels`), the torch form otherwise."""
        if self.uses_kernels(video):
            return palette_snap(video.float(), self.palette, self.settle)
        return project_to_palette(video.float(), self.palette, self.settle)

    def forward(
        self,
        last_frame: torch.Tensor,
        block_index: torch.Tensor,
        keyboard: torch.Tensor,
        start_frame: torch.Tensor,
        start_noise: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = last_frame.shape[0]
        count = self.starts.shape[0]
        # Standard normal -> uniform -> one of the built-in starts; computed on the device for every row.
        u = 0.5 * (1.0 + torch.erf(start_noise.reshape(b) / 2**0.5))
        pick = torch.clamp((u * count).long(), 0, count - 1)
        given = start_frame.reshape(b, -1).abs().amax(dim=1) > 0
        start = torch.where(given.view(b, 1, 1, 1), start_frame, self.starts[pick])
        first = (block_index == 0).view(b, 1, 1, 1)
        context = torch.where(first, start, last_frame)
        video = self.project(
            self.net(context, keyboard, kernels=self.uses_kernels(context))
        )  # [B, F, 3, H, W], clamped and snapped
        return video, video[:, -1].contiguous(), video.transpose(1, 2).contiguous()
