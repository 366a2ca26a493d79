"""Matrix-Game 2.0's action module: keyboard and mouse conditioning inside a causal Wan block.

One module sits in each action block, after the cross-attention and before the FFN. Its
output already holds the residual. For the block's T latent frames it

1. reads each latent frame f's window of W = windows_size * ratio video-frame actions, the
   frames 4f-12 .. 4f-1 (clamped at frame 0), never the frames f itself covers;
2. mouse branch: per token, [hidden state, the 24 window values] -> MLP -> q, k, v, a temporal
   attention per token position over that position's mouse cache, `proj_mouse`, residual;
3. keyboard branch: keyboard rows embedded per video frame, the window concatenated -> k, v
   (one per latent frame, shared by all tokens); queries from the hidden state *after* the
   mouse residual; attention over the keyboard cache, `proj_keyboard`, residual.

q and k get a per-head RMS normalisation without weight (the stored `*_norm.weight` tensors are
loaded but never used, as in the reference) and a RoPE on the first 8 channels of each 64-wide
head at the absolute latent frame index. Neither attention is causal inside a call.

Caches are frame rings like the self-attention's (models/kv_ring.py, sink 0): frame f lives in
slot f % L, the valid slots are the prefix [0, min(frames seen, L)), and keys keep their
rotation. Softmax does not depend on key order, so this equals the reference's shifting cache.
Layouts: mouse [B, S, L, A, hd] (one ring per token position s), keyboard [B, L, A, hd].
See the fixture set's matrixgame.md ($FD_FIXTURES), "The action module".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flashdreams.errors import InvalidArgumentError
from flashdreams.models import dit_ops

QK_EPS = 1e-6


@dataclass(frozen=True)
class ActionConfig:
    """`action_config` of the released `config.json` (defaults: the universal release)."""

    blocks: tuple[int, ...] = tuple(range(15))
    enable_keyboard: bool = True
    enable_mouse: bool = True
    heads_num: int = 16
    hidden_size: int = 128  # keyboard embedding width
    img_hidden_size: int = 1536  # the DiT width
    keyboard_dim_in: int = 4
    keyboard_hidden_dim: int = 1024
    mouse_dim_in: int = 2
    mouse_hidden_dim: int = 1024
    mouse_qk_dim_list: tuple[int, ...] = (8, 28, 28)
    rope_dim_list: tuple[int, ...] = (8, 28, 28)
    rope_theta: float = 256.0
    vae_time_compression_ratio: int = 4
    windows_size: int = 3
    qk_norm: bool = True
    qkv_bias: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))
        object.__setattr__(self, "mouse_qk_dim_list", tuple(self.mouse_qk_dim_list))
        object.__setattr__(self, "rope_dim_list", tuple(self.rope_dim_list))
        if not self.enable_keyboard:
            raise InvalidArgumentError("ActionConfig: every released mode has a keyboard branch (enable_keyboard)")
        for name in ("keyboard_hidden_dim", *(("mouse_hidden_dim",) if self.enable_mouse else ())):
            if getattr(self, name) % self.heads_num:
                raise InvalidArgumentError(f"ActionConfig: {name} must be divisible by heads_num {self.heads_num}")
        if self.enable_mouse and self.mouse_hidden_dim != self.keyboard_hidden_dim:
            raise InvalidArgumentError("ActionConfig: mouse_hidden_dim and keyboard_hidden_dim must be equal")
        if self.rope_dim_list[0] % 2 or self.rope_dim_list[0] > self.head_dim:
            raise InvalidArgumentError(f"ActionConfig: rope_dim_list[0] {self.rope_dim_list[0]} must be even, <= head")
        if self.qkv_bias:
            raise InvalidArgumentError("ActionConfig: qkv_bias is not supported (no release uses it)")

    @property
    def head_dim(self) -> int:
        return self.keyboard_hidden_dim // self.heads_num

    @property
    def window(self) -> int:
        """Video frames in one latent frame's action window (12 in every release)."""
        return self.windows_size * self.vae_time_compression_ratio

    @classmethod
    def from_dict(cls, d: Mapping) -> ActionConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("blocks", "mouse_qk_dim_list", "rope_dim_list"):
            d[k] = list(d[k])
        return d


def window_index(frame_positions: torch.Tensor, ratio: int, window: int) -> torch.Tensor:
    """int64 [T, W]: video frame read by window position r of latent frame f, max(0, ratio*f - W + r)."""
    r = torch.arange(window, device=frame_positions.device)
    return (frame_positions[:, None] * ratio - window + r[None]).clamp(min=0)


def block_window_index(num_frames: int, ratio: int, window: int) -> list[list[int]]:
    """Rows of [history (W rows); the block's ratio*T rows] that window position r of the block's
    latent frame i reads. The block's rows are video frames ratio*f0 - (ratio-1) .. ratio*(f0+T) and
    the history the W rows before them, so latent frame f0+i reads rows ratio*i + ratio-1 + r."""
    return [[ratio * i + ratio - 1 + r for r in range(window)] for i in range(num_frames)]


def action_rope_tables(frame_positions: torch.Tensor, rope_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, rope_dim/2] (float32) of angle p * theta^(-2i/rope_dim), computed in float64."""
    i = torch.arange(rope_dim // 2, dtype=torch.float64, device=frame_positions.device)
    freqs = 1.0 / torch.pow(theta, 2.0 * i / rope_dim)
    ang = frame_positions.to(torch.float64)[:, None] * freqs[None]
    return torch.cos(ang).float(), torch.sin(ang).float()


def apply_action_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, frame_dim: int) -> torch.Tensor:
    """Rotate the first 2*len(pairs) channels of x [..., hd] as interleaved pairs; the rest pass through.

    cos/sin [T, n] broadcast along `frame_dim` of x (the latent-frame axis)."""
    n = cos.shape[-1]
    shape = [1] * x.dim()
    shape[frame_dim] = cos.shape[0]
    shape[-1] = n
    c, s = cos.view(shape), sin.view(shape)
    xf = x.float()
    rot = xf[..., : 2 * n].unflatten(-1, (n, 2))
    a, b = rot[..., 0], rot[..., 1]
    out = torch.stack([a * c - b * s, b * c + a * s], dim=-1).flatten(-2)
    return torch.cat([out, xf[..., 2 * n :]], dim=-1).to(x.dtype)


def head_rms(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(mean(x^2) + 1e-6) over each head's channels (last dim), float32 math, no weight."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + QK_EPS)).to(x.dtype)


def write_frames(cache: torch.Tensor, dim: int, slots: torch.Tensor, new: torch.Tensor) -> None:
    """cache[..., slots, ...] = new along `dim` (in place; the block's frames at their ring slots)."""
    cache.index_copy_(dim, slots, new.to(cache.dtype))


# Up to this many queries per attention, `ring_attend` computes it with batched matmuls in float32.
SHORT_QUERIES = 16


def ring_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v over the valid slot prefix; q [.., A, Lq, hd], k/v [.., A, L, hd].

    Leading dims are flattened into one batch dim (4-D SDPA: what every backend and compiler
    pattern handles), the mask is explicit [1, 1, 1, L]. The mouse attention is one tiny
    attention per token position (Lq = the block's 3 frames, L = the cached slots, 14080 of them
    at 352x640): fused attention kernels pad each to a 64 x 128 tile, ~50x the work, and took
    17% of Matrix-Game's block on an H200. For such short queries the same softmax runs as two
    batched matmuls with float32 scores (`SHORT_QUERIES`)."""
    lead = q.shape[:-3]
    q4, k4, v4 = (t.reshape(-1, *t.shape[-3:]) for t in (q, k.to(q.dtype), v.to(q.dtype)))
    keep = (torch.arange(k.shape[-2], device=k.device) < valid).view(1, 1, 1, -1)
    if q.shape[-2] <= SHORT_QUERIES:
        scores = torch.matmul(q4.float(), k4.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        probs = scores.masked_fill(~keep, float("-inf")).softmax(dim=-1)
        out = torch.matmul(probs, v4.float()).to(q.dtype)
    else:
        out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=keep)
    return out.reshape(*lead, *out.shape[1:])


class _UnusedNorm(nn.Module):
    """A stored per-head norm weight the reference never applies (kept so checkpoints load strictly)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class ActionModule(nn.Module):
    """One block's action module under the reference's key names (`blocks.i.action_model.*`)."""

    def __init__(self, cfg: ActionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, h, c, hd, w = cfg.img_hidden_size, cfg.hidden_size, cfg.keyboard_hidden_dim, cfg.head_dim, cfg.window
        self.keyboard_embed = nn.Sequential(nn.Linear(cfg.keyboard_dim_in, h), nn.SiLU(), nn.Linear(h, h))
        if cfg.enable_mouse:
            self.mouse_mlp = nn.Sequential(
                nn.Linear(d + cfg.mouse_dim_in * w, c),
                nn.GELU(approximate="tanh"),
                nn.Linear(c, c),
                nn.LayerNorm(c, eps=1e-5),
            )
            self.t_qkv = nn.Linear(c, 3 * c, bias=False)
            self.img_attn_q_norm = _UnusedNorm(hd)
            self.img_attn_k_norm = _UnusedNorm(hd)
            self.proj_mouse = nn.Linear(c, d, bias=False)
        self.mouse_attn_q = nn.Linear(d, c, bias=False)
        self.keyboard_attn_kv = nn.Linear(h * w, 2 * c, bias=False)
        self.key_attn_q_norm = _UnusedNorm(hd)
        self.key_attn_k_norm = _UnusedNorm(hd)
        self.proj_keyboard = nn.Linear(c, d, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.cfg.heads_num, self.cfg.head_dim))

    def forward(
        self,
        x: torch.Tensor,
        frame_positions: torch.Tensor,
        slots: torch.Tensor,
        valid_frames: torch.Tensor,
        keyboard_win: torch.Tensor,
        mouse_win: torch.Tensor | None,
        keyboard_k: torch.Tensor,
        keyboard_v: torch.Tensor,
        mouse_k: torch.Tensor | None = None,
        mouse_v: torch.Tensor | None = None,
        trace: dict | None = None,
        impl: str = "sdpa",
    ) -> torch.Tensor:
        """x [B, T*S, D] (frame-major tokens) -> [B, T*S, D], residuals included.

        frame_positions, slots: int64 [T] (absolute latent frame, its cache slot); valid_frames:
        int64 [] or [1], the valid cache slots once this call's frames are written;
        keyboard_win [B, T, W, K], mouse_win [B, T, W, 2] (None without a mouse branch): each latent
        frame's window of video-frame actions; caches as in the module docstring, written in place.
        `trace` (eager debugging) receives the intermediate tensors. `impl` as the DiT's
        (models/dit_ops.py): "sdpa" plain torch, "triton" the fused kernels of
        kernels/action_attention.py (same function, fewer and larger launches).
        """
        dit_ops.check_impl(impl)
        cfg = self.cfg
        b, n, d = x.shape
        t = frame_positions.shape[0]
        s = n // t
        cos, sin = action_rope_tables(frame_positions, cfg.rope_dim_list[0], cfg.rope_theta)
        if cfg.enable_mouse and (mouse_win is None or mouse_k is None or mouse_v is None):
            raise InvalidArgumentError("this action module has a mouse branch: it needs the mouse window and cache")
        if impl == "triton":
            caches = (keyboard_k, keyboard_v, mouse_k, mouse_v)
            return self._forward_fused(x, cos, sin, slots, valid_frames, keyboard_win, mouse_win, *caches, trace)
        if cfg.enable_mouse:
            mw = mouse_win.flatten(2).to(x.dtype)  # [B, T, W*2]: position slowest, channel fastest
            u = torch.cat([x.view(b, t, s, d), mw[:, :, None, :].expand(b, t, s, mw.shape[-1])], dim=-1)
            g = self.mouse_mlp(u)  # [B, T, S, c]
            q, k, v = (self._heads(p) for p in self.t_qkv(g).chunk(3, dim=-1))  # [B, T, S, A, hd]
            q = apply_action_rope(head_rms(q), cos, sin, 1)
            k = apply_action_rope(head_rms(k), cos, sin, 1)
            write_frames(mouse_k, 2, slots, k.transpose(1, 2))
            write_frames(mouse_v, 2, slots, v.transpose(1, 2))
            # Per token position: [B, S, A, T, hd] against [B, S, A, L, hd].
            out = ring_attend(
                q.permute(0, 2, 3, 1, 4), mouse_k.permute(0, 1, 3, 2, 4), mouse_v.permute(0, 1, 3, 2, 4), valid_frames
            )
            mouse_out = self.proj_mouse(out.permute(0, 3, 1, 2, 4).flatten(3).reshape(b, n, -1))
            if trace is not None:
                trace.update(mouse_mlp_out=g, mouse_q_rope=q, mouse_k_rope=k, mouse_attn_out=mouse_out)
            x = x + mouse_out
        e = self.keyboard_embed(keyboard_win.to(x.dtype))  # per video frame: [B, T, W, h]
        wk = e.flatten(2)  # [B, T, W*h]
        kk, kv = (self._heads(p) for p in self.keyboard_attn_kv(wk).chunk(2, dim=-1))  # [B, T, A, hd]
        kk = apply_action_rope(head_rms(kk), cos, sin, 1)
        write_frames(keyboard_k, 1, slots, kk)
        write_frames(keyboard_v, 1, slots, kv)
        q = self._heads(self.mouse_attn_q(x)).view(b, t, s, cfg.heads_num, cfg.head_dim)
        q = apply_action_rope(head_rms(q), cos, sin, 1)
        out = ring_attend(
            q.flatten(1, 2).transpose(1, 2), keyboard_k.transpose(1, 2), keyboard_v.transpose(1, 2), valid_frames
        )  # [B, A, T*S, hd]
        kb_out = self.proj_keyboard(out.transpose(1, 2).flatten(2))
        if trace is not None:
            trace.update(keyboard_windows=wk, keyboard_q_rope=q, keyboard_k_rope=kk, keyboard_attn_out=kb_out)
        return x + kb_out

    def _forward_fused(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        valid_frames: torch.Tensor,
        keyboard_win: torch.Tensor,
        mouse_win: torch.Tensor | None,
        keyboard_k: torch.Tensor,
        keyboard_v: torch.Tensor,
        mouse_k: torch.Tensor | None,
        mouse_v: torch.Tensor | None,
        trace: dict | None,
    ) -> torch.Tensor:
        """`forward` with impl="triton": per branch one GEMM chain, one kernel that normalises, rotates
        and writes k/v into the ring, one that attends (q normalised and rotated on load, the output
        token-major for the projection), and the projection with the residual as its GEMM's C."""
        from flashdreams import kernels

        cfg = self.cfg
        b, n, d = x.shape
        t = cos.shape[0]
        s = n // t
        if cfg.enable_mouse:
            first = self.mouse_mlp[0]
            # Linear(cat([x, window])) = x W_x^T + (window W_w^T + bias): the window's share once per
            # latent frame, broadcast over its tokens, instead of a concatenated copy of every token.
            per_frame = F.linear(mouse_win.flatten(2).to(x.dtype), first.weight[:, d:], first.bias)  # [B, T, c]
            h = F.linear(x.view(b, t, s, d), first.weight[:, :d]) + per_frame[:, :, None]
            g = self.mouse_mlp[3](self.mouse_mlp[2](self.mouse_mlp[1](h)))  # [B, T, S, c]
            q, k, v = (self._heads(p) for p in self.t_qkv(g).chunk(3, dim=-1))  # views [B, T, S, A, hd]
            kernels.action_norm_rope_cache_write(k, v, cos, sin, mouse_k, mouse_v, slots)
            out = kernels.short_ring_attention(q, mouse_k, mouse_v, valid_frames, cos, sin)  # [B, T, S, A, hd]
            if trace is not None:
                mouse_out = self.proj_mouse(out.view(b, n, -1))
                k_rope = mouse_k.index_select(2, slots).transpose(1, 2)
                q_rope = kernels.action_norm_rope(q, cos, sin)
                trace.update(mouse_mlp_out=g, mouse_q_rope=q_rope, mouse_k_rope=k_rope, mouse_attn_out=mouse_out)
                x = x + mouse_out
            else:
                x = _project_residual(x, out, self.proj_mouse.weight)
        e = self.keyboard_embed(keyboard_win.to(x.dtype))  # per video frame: [B, T, W, h]
        wk = e.flatten(2)  # [B, T, W*h]
        kk, kv = (self._heads(p) for p in self.keyboard_attn_kv(wk).chunk(2, dim=-1))  # [B, T, A, hd]
        kernels.action_norm_rope_cache_write(kk, kv, cos, sin, keyboard_k, keyboard_v, slots)
        q = self._heads(self.mouse_attn_q(x))  # [B, T*S, A, hd]: frame of token i is i // S
        out = kernels.short_ring_attention(q, keyboard_k, keyboard_v, valid_frames, cos, sin)
        if trace is None:
            # After the mouse residual x is this call's own tensor: accumulate into it, no copy of x.
            return _project_residual(x, out, self.proj_keyboard.weight, in_place=cfg.enable_mouse)
        kb_out = self.proj_keyboard(out.view(b, n, -1))
        q_rope = kernels.action_norm_rope(q, cos, sin).view(b, t, s, cfg.heads_num, cfg.head_dim)
        k_rope = keyboard_k.index_select(1, slots)
        trace.update(keyboard_windows=wk, keyboard_q_rope=q_rope, keyboard_k_rope=k_rope, keyboard_attn_out=kb_out)
        return x + kb_out


def _project_residual(
    x: torch.Tensor, heads: torch.Tensor, weight: torch.Tensor, in_place: bool = False
) -> torch.Tensor:
    """x + heads @ weight^T as one GEMM with x as its C (no separate add kernel; one rounding, not two).
    Out of place, torch first copies x into the result; `in_place` (x is ours to overwrite) skips that."""
    b, n, d = x.shape
    x2, h2 = x.reshape(b * n, d), heads.reshape(b * n, -1)
    if in_place:
        return x2.addmm_(h2, weight.t()).view(b, n, d)
    return torch.addmm(x2, h2, weight.t()).view(b, n, d)


def action_flops(cfg: ActionConfig, query_tokens: int, frames: int, valid_frames: int) -> float:
    """Matmul FLOPs of one action module call on `query_tokens` tokens of `frames` latent frames,
    attending to `valid_frames` cached frames (the MLPs, projections and both attentions)."""
    lq, d, c, w = query_tokens, cfg.img_hidden_size, cfg.keyboard_hidden_dim, cfg.window
    keyboard = 2 * frames * cfg.hidden_size * w * 2 * c + 2 * lq * d * c + 4 * lq * valid_frames * c + 2 * lq * c * d
    if not cfg.enable_mouse:
        return float(keyboard)
    mouse = 2 * lq * (d + cfg.mouse_dim_in * w) * c + 2 * lq * c * c + 2 * lq * c * 3 * c
    mouse += 4 * lq * valid_frames * c + 2 * lq * c * d
    return float(keyboard + mouse)
