"""FlashVSR's LQ projector (`Buffer_LQ4x_Proj`): low-quality frames -> a feature per DiT block.

Every clip of 4 LQ frames (at output resolution, values in [-1, 1]) gives one latent-rate
feature map: 16x16 pixel-unshuffle (3 -> 768 channels), two causal 3-D convs (kernel (4,3,3),
stride (2,1,1), replicate spatial padding) each followed by the VAE-style RMS_norm and SiLU,
then one Linear per DiT block that receives a feature (`layer_num`; 1 as released).

The reference's conv "caches" are filled from the current clip itself just before each conv
(conv1 sees [c, d, a, b, c, d] for a clip a, b, c, d; conv2 sees [y0, y1, y0, y1]), so clips
are independent and a chunk's clips run as one batch. Clip 0 of a stream (frame 0 alone)
produces nothing; clip i >= 1 covers frames 4i-3 .. 4i.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flashdreams.errors import InvalidArgumentError

UNSHUFFLE = 16  # pixels per side of one token (VAE 8x times the DiT patch 2x)


@dataclass(frozen=True)
class LQProjConfig:
    """`Buffer_LQ4x_Proj` arguments; hidden widths are hard-coded 2048 / 3072 in the release."""

    in_dim: int = 3
    out_dim: int = 1536
    layer_num: int = 1
    hidden_dim1: int = 2048
    hidden_dim2: int = 3072

    @classmethod
    def from_dict(cls, d: dict) -> LQProjConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InvalidArgumentError(f"LQProjConfig: unknown keys {unknown}; known are {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class RMSNormVAE(nn.Module):
    """y / max(||y||_2 over channels, 1e-12) * sqrt(C) * gamma (the Wan VAE's RMS_norm, channels at dim 1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = channels**0.5
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class LQProjector(nn.Module):
    """`LQ_proj_in.ckpt` weights (conv1, norm1, conv2, norm2, linear_layers.l) and the clip forward."""

    def __init__(self, cfg: LQProjConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or LQProjConfig()
        c_in = cfg.in_dim * UNSHUFFLE * UNSHUFFLE
        self.conv1 = nn.Conv3d(c_in, cfg.hidden_dim1, (4, 3, 3), stride=(2, 1, 1))
        self.norm1 = RMSNormVAE(cfg.hidden_dim1)
        self.conv2 = nn.Conv3d(cfg.hidden_dim1, cfg.hidden_dim2, (4, 3, 3), stride=(2, 1, 1))
        self.norm2 = RMSNormVAE(cfg.hidden_dim2)
        self.linear_layers = nn.ModuleList([nn.Linear(cfg.hidden_dim2, cfg.out_dim) for _ in range(cfg.layer_num)])

    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    @staticmethod
    def _conv(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
        return conv(F.pad(x, (1, 1, 1, 1, 0, 0), mode="replicate"))

    def clips_forward(self, clips: torch.Tensor) -> list[torch.Tensor]:
        """clips [B, n, 3, 4, H, W] in [-1, 1] -> one [B, n*(H/16)*(W/16), out_dim] per fed block.

        Tokens are clip-major, then (row, column): the DiT's token order for n latent frames.
        """
        b, n, c, t, hh, ww = clips.shape
        if t != 4 or hh % UNSHUFFLE or ww % UNSHUFFLE:
            raise InvalidArgumentError(
                f"LQ projector: clips must be 4 frames with H, W multiples of {UNSHUFFLE}; got {list(clips.shape)}"
            )
        x = clips.reshape(b * n * c, t, hh, ww).to(self.dtype)
        # Per frame 16x16 unshuffle: channel c*256 + 16*i + j (F.pixel_unshuffle's order).
        x = x.reshape(b * n, c, t, hh, ww).transpose(1, 2).reshape(b * n * t, c, hh, ww)
        x = F.pixel_unshuffle(x, UNSHUFFLE)
        h, w = x.shape[-2:]
        x = x.reshape(b * n, t, -1, h, w).transpose(1, 2)  # [b*n, 768, 4, h, w]
        x = torch.cat([x[:, :, 2:], x], dim=2)  # the clip's own last two frames in front
        y = F.silu(self.norm1(self._conv(self.conv1, x)))  # [b*n, h1, 2, h, w]
        y = torch.cat([y, y], dim=2)
        y = F.silu(self.norm2(self._conv(self.conv2, y)))  # [b*n, h2, 1, h, w]
        tokens = y.reshape(b, n, -1, h * w).transpose(2, 3).reshape(b, n * h * w, -1)
        return [lin(tokens) for lin in self.linear_layers]

    def stream_features(self, frames: torch.Tensor) -> list[torch.Tensor]:
        """LQ frames [B, 3, 4n, H, W] (n whole clips, clip i = frames 4i .. 4i+3) -> the clips' features."""
        b, c, f, hh, ww = frames.shape
        if f % 4:
            raise InvalidArgumentError(f"LQ projector: {f} frames are not whole clips of 4")
        clips = frames.reshape(b, c, f // 4, 4, hh, ww).transpose(1, 2)
        return self.clips_forward(clips)

    def video_features(self, video: torch.Tensor) -> list[torch.Tensor]:
        """A whole LQ video [B, 3, 1+4m, H, W]: frame 0 alone yields nothing, then m clips."""
        if (video.shape[2] - 1) % 4 or video.shape[2] < 5:
            raise InvalidArgumentError(f"LQ projector: a video needs 1 + 4m frames (m >= 1), got {video.shape[2]}")
        return self.stream_features(video[:, :, 1:])
