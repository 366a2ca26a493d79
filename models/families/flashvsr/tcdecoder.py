"""FlashVSR's TCDecoder: TAEHV's decoder conditioned on the LQ frames, plus the AdaIN colour fix.

The decoder is `models/taehv.py`'s TAEHV with two changes (the fixture set's flashvsr.md):
the input is [LQ features (768 = 3 x 4 x 8 x 8 pixel-unshuffled LQ frames), latents (16)]
along channels, and every top-level ReLU that follows a Conv2d is followed by an extra 3x3
conv without bias and another ReLU ("IdentityConv2d", trained weights), which shifts the
`decoder.<index>` keys of `TCDecoder.ckpt`. The MemBlock memory, the TGrow interleave and the
streaming state are TAEHV's own (`new_decode_state` / `decode_stream`): a fresh stream drops
its first 3 frames, a continued one drops nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.checkpoint import validate_and_load
from flashdreams.models.taehv import TAEHV, Clamp, MemBlock, NHWCConv2d, TAEHVConfig, TGrow

COND_CHANNELS = 3 * 4 * 8 * 8  # one LQ group of 4 frames, 8x8 pixels per latent position
RELEASED_CHANNELS = (512, 256, 128, 128)
ADAIN_EPS = 1e-5


def tc_config(channels: tuple[int, ...] = RELEASED_CHANNELS) -> TAEHVConfig:
    return TAEHVConfig(channels=tuple(channels), latent_channels=16 + COND_CHANNELS)


def _conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return NHWCConv2d(n_in, n_out, 3, padding=1, bias=bias)


class TCDecoder(TAEHV):
    """`TCDecoder.ckpt` (`decoder.<index>`), decoding [cond features; latents] like TAEHV."""

    def __init__(self, config: TAEHVConfig | None = None) -> None:
        nn.Module.__init__(self)  # TAEHV's own layer list is replaced, not extended
        self.config = cfg = config or tc_config()
        if cfg.latent_channels != 16 + COND_CHANNELS or cfg.decoder_time_upscale != (True, True):
            raise InvalidArgumentError(f"TCDecoder: needs latent_channels {16 + COND_CHANNELS} and 4x time; got {cfg}")
        c = cfg.channels

        def stage(n_in: int, n_out: int, stride: int) -> list[nn.Module]:
            return [*(MemBlock(n_in) for _ in range(3)), nn.Upsample(scale_factor=2), TGrow(n_in, stride)] + [
                _conv(n_in, n_out, False)
            ]

        self.decoder = nn.Sequential(
            Clamp(),
            _conv(cfg.latent_channels, c[0]),
            nn.ReLU(),
            _conv(c[0], c[0], False),
            nn.ReLU(),
            *stage(c[0], c[1], 1),
            *stage(c[1], c[2], 2),
            *stage(c[2], c[3], 2),
            nn.ReLU(),
            _conv(c[3], c[3], False),
            nn.ReLU(),
            _conv(c[3], cfg.image_channels),
        )

    def load_weights(self, state_dict: dict[str, Tensor], source: str = "state dict") -> None:
        wanted = {k: v for k, v in state_dict.items() if not k.startswith("encoder.")}
        validate_and_load(
            self, wanted, source, hint=f"expected the TCDecoder.ckpt layout (decoder.<index>.*) for {self.config}"
        )


def cond_features(cond: Tensor) -> Tensor:
    """LQ frames [B, 3, Fc, 8h, 8w] in [-1, 1] -> [B, ceil(Fc/4), 768, h, w].

    With Fc not a multiple of 4, copies of frame 0 go in front; channel c*256 + df*64 + dy*8 + dx
    of group t holds pixel (8y+dy, 8x+dx) of frame 4t+df, channel c.
    """
    b, c, fc, hh, ww = cond.shape
    if hh % 8 or ww % 8:
        raise InvalidArgumentError(f"TCDecoder cond: height and width must be multiples of 8, got {hh}x{ww}")
    if fc % 4:
        cond = torch.cat([cond[:, :, :1].expand(-1, -1, 4 - fc % 4, -1, -1), cond], dim=2)
    t = cond.shape[2] // 4
    x = cond.reshape(b, c, t, 4, hh // 8, 8, ww // 8, 8).permute(0, 2, 1, 3, 5, 7, 4, 6)
    return x.reshape(b, t, COND_CHANNELS, hh // 8, ww // 8)


def decoder_input(latents: Tensor, cond: Tensor) -> Tensor:
    """NTCHW latents [B, T, 16, h, w] and their LQ frames -> the decoder's input [B, T, 784, h, w]."""
    feats = cond_features(cond).to(latents.dtype)
    if feats.shape[1] != latents.shape[1] or feats.shape[3:] != latents.shape[3:]:
        raise InvalidArgumentError(
            f"TCDecoder: {latents.shape[1]} latents of {tuple(latents.shape[3:])} need LQ frames giving as many "
            f"groups of that size; got {tuple(feats.shape)} from cond {tuple(cond.shape)}"
        )
    return torch.cat([feats, latents], dim=2)


def adain_colorfix(video: Tensor, lq: Tensor) -> Tensor:
    """Per frame and channel, move `video`'s mean/std over H x W to the LQ frame's; clamp to [-1, 1].

    video, lq [B, 3, F, H, W] in [-1, 1]; std = sqrt(biased variance + 1e-5) (the pipeline's AdaIN).
    """
    dims = (3, 4)
    v, q = video.float(), lq.float()
    v_mean, q_mean = v.mean(dims, keepdim=True), q.mean(dims, keepdim=True)
    v_std = (v.var(dims, keepdim=True, unbiased=False) + ADAIN_EPS).sqrt()
    q_std = (q.var(dims, keepdim=True, unbiased=False) + ADAIN_EPS).sqrt()
    return ((v - v_mean) / v_std * q_std + q_mean).clamp(-1, 1)


def to_signed(video_ntchw: Tensor) -> Tensor:
    """Decoder frames NTCHW in [0, 1] -> [B, 3, F, H, W] in [-1, 1], as the pipeline maps them."""
    return video_ntchw.transpose(1, 2) * 2 - 1


def lq_to_signed(frames: Tensor) -> Tensor:
    """uint8-valued pixels (any float/int dtype) -> float32 in [-1, 1] as `u8 / 255 * 2 - 1`."""
    return frames.float() / 255 * 2 - 1


def upsample_lq(frames: Tensor, scale: int) -> Tensor:
    """[N, 3, h, w] in [0, 1] -> bicubic x scale (torch, align_corners False), as the release's GPU loader."""
    if scale == 1:
        return frames
    size = (frames.shape[-2] * scale, frames.shape[-1] * scale)
    return F.interpolate(frames, size=size, mode="bicubic", align_corners=False)
