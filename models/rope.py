"""Wan's 3-D rotary position embedding: per-token angle tables and their application.

Head channels form d/2 complex pairs (x[2p], x[2p+1]); the pairs are split unevenly
over the (frame, height, width) axes as [c - 2*(c//3), c//3, c//3] with c = d/2, and
pair j of an axis with n pairs turns at 10000^(-j/n) per position (reference
`rope_params`). Angles and their cos/sin are computed in float64, like the
reference, then stored as float32 tables of shape [tokens, d/2]. Positions are
computed on the fly, so there is no 1024-position table limit (the reference has
one; below it the two agree).
"""

from __future__ import annotations

import torch


def axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs given to the (frame, height, width) axes."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def pair_frequencies(head_dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """float64 [d/2]: the angular frequency of each channel pair, axis by axis."""
    parts = []
    for n in axis_pairs(head_dim):
        j = torch.arange(n, dtype=torch.float64, device=device)
        # A Python base keeps this free of host-to-device copies (CUDA-graph capturable).
        parts.append(1.0 / torch.pow(10000.0, j / n))
    return torch.cat(parts)


def rope_tables(
    frame_positions: torch.Tensor, grid_h: int, grid_w: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [F*grid_h*grid_w, d/2] (float32) for tokens in (f, h, w) order.

    `frame_positions` is an integer tensor [F] of absolute latent-frame indices; it
    may live on the GPU and change per block without a host sync.
    """
    device = frame_positions.device
    nt, nh, nw = axis_pairs(head_dim)
    freqs = pair_frequencies(head_dim, device)
    f = frame_positions.to(torch.float64)
    h = torch.arange(grid_h, dtype=torch.float64, device=device)
    w = torch.arange(grid_w, dtype=torch.float64, device=device)
    nf = f.shape[0]
    ang_t = (f[:, None] * freqs[None, :nt])[:, None, None, :].expand(nf, grid_h, grid_w, nt)
    ang_h = (h[:, None] * freqs[None, nt : nt + nh])[None, :, None, :].expand(nf, grid_h, grid_w, nh)
    ang_w = (w[:, None] * freqs[None, nt + nh :])[None, None, :, :].expand(nf, grid_h, grid_w, nw)
    angles = torch.cat([ang_t, ang_h, ang_w], dim=-1).reshape(nf * grid_h * grid_w, nt + nh + nw)
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, L, N, d] by the tables [L, d/2]; float32 math, x's dtype out."""
    b, length, n, d = x.shape
    xf = x.float().reshape(b, length, n, d // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)
    return out.reshape(b, length, n, d).to(x.dtype)
