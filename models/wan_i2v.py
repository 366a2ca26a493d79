"""Wan2.1-I2V conditioning: the latent size, the first-frame mask, `y`, and the CLIP tokens.

Plain functions over the loaded VAE encoder and CLIP tower, as `WanI2V.generate` prepares
its inputs (the fixture set's wan21.md ($FD_FIXTURES), "Kinds wan_i2v_forward and wan_i2v_sample"). The
image comes in as `TF.to_tensor` gives it ([3, h, w] in [0, 1]); everything here runs once
per start image, before sampling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.clip_vision import CLIP_MEAN, CLIP_STD, ClipVision
from flashdreams.models.wan_vae import WanVAE

VAE_STRIDE = (4, 8, 8)  # temporal, height, width compression of the Wan VAE
PATCH_HW = (2, 2)  # the DiT's spatial patch: latent sizes are rounded down to multiples of it
MASK_CHANNELS = 4


def _check_image(image: torch.Tensor) -> None:
    if image.dim() != 3 or image.shape[0] != 3 or min(image.shape[1:]) < 1:
        raise InvalidArgumentError(f"I2V: the image must be [3, h, w] in [0, 1]; got {tuple(image.shape)}")


def to_model_range(image: torch.Tensor) -> torch.Tensor:
    """[3, h, w] in [0, 1] -> [-1, 1] as the pipeline does it: (x - 0.5) / 0.5."""
    _check_image(image)
    return (image.float() - 0.5) / 0.5


def latent_frames(frame_num: int) -> int:
    """Latent frames of a `frame_num`-frame video (1 + 4k pixel frames)."""
    if frame_num < 1 or (frame_num - 1) % VAE_STRIDE[0]:
        raise InvalidArgumentError(f"I2V: frame_num must be 1 + 4k; got {frame_num}")
    return (frame_num - 1) // VAE_STRIDE[0] + 1


def latent_size(image_hw: tuple[int, int], max_area: float) -> tuple[int, int]:
    """(lat_h, lat_w) for an image of (h, w) pixels: the aspect ratio kept at about `max_area` pixels.

    `lat = floor(floor(sqrt(max_area * a) / 8) / 2) * 2` with a = h / w (width: max_area / a),
    computed in float64 as the reference does.
    """
    h, w = image_hw
    if h < 1 or w < 1 or max_area <= 0:
        raise InvalidArgumentError(f"I2V: need a positive image size and max_area; got {image_hw}, {max_area}")
    a = h / w
    lat_h = math.floor(math.sqrt(max_area * a) // VAE_STRIDE[1] // PATCH_HW[0]) * PATCH_HW[0]
    lat_w = math.floor(math.sqrt(max_area / a) // VAE_STRIDE[2] // PATCH_HW[1]) * PATCH_HW[1]
    if lat_h < PATCH_HW[0] or lat_w < PATCH_HW[1]:
        raise InvalidArgumentError(f"I2V: max_area {max_area} is too small for an image of {h}x{w}")
    return int(lat_h), int(lat_w)


def pixel_latent_size(height: int, width: int, patch_hw: int, name: str) -> tuple[int, int]:
    """Latent (h, w) of a Wan-VAE video at height x width; both must be positive multiples of the VAE's
    stride times the DiT's patch (16 for the Wan models), else InvalidArgumentError naming the preset."""
    step = VAE_STRIDE[1] * patch_hw
    if height <= 0 or width <= 0 or height % step or width % step:
        raise InvalidArgumentError(
            f"resolution {height}x{width}: height and width must be positive multiples of {step} for {name}"
        )
    return height // VAE_STRIDE[1], width // VAE_STRIDE[2]


def first_frame_mask(num_latent_frames: int, lat_h: int, lat_w: int) -> torch.Tensor:
    """The 4-channel mask [4, F_lat, lat_h, lat_w]: ones on latent frame 0, zeros elsewhere.

    Built like the reference: a per-pixel-frame mask (1 at frame 0), frame 0 repeated 4 times,
    regrouped as F_lat frames x 4 channels (channel c of frame f = entry 4f + c).
    """
    frames = (num_latent_frames - 1) * VAE_STRIDE[0] + 1
    msk = torch.zeros(1, frames, lat_h, lat_w)
    msk[:, 0] = 1
    msk = torch.cat([msk[:, :1].repeat_interleave(MASK_CHANNELS, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, num_latent_frames, MASK_CHANNELS, lat_h, lat_w)
    return msk.transpose(1, 2)[0].contiguous()


def image_latent(vae: WanVAE, img: torch.Tensor, lat_hw: tuple[int, int], num_latent_frames: int) -> torch.Tensor:
    """Normalised VAE latent [16, F_lat, lat_h, lat_w] of [resized image; black frames].

    img [3, h_img, w_img] in [-1, 1] is bicubic-resized to 8x the latent size and followed by
    4*(F_lat - 1) zero frames, then encoded by the Wan VAE.
    """
    h, w = lat_hw[0] * VAE_STRIDE[1], lat_hw[1] * VAE_STRIDE[2]
    first = F.interpolate(img[None].float(), size=(h, w), mode="bicubic", align_corners=False)  # [1, 3, h, w]
    rest = torch.zeros(3, (num_latent_frames - 1) * VAE_STRIDE[0], h, w, dtype=first.dtype, device=first.device)
    video = torch.cat([first.transpose(0, 1), rest], dim=1)  # [3, T, h, w]
    return vae.encode_latent(video[None])[0].float()


def i2v_condition(
    vae: WanVAE, image: torch.Tensor, max_area: float, frame_num: int = 81
) -> tuple[torch.Tensor, tuple[int, int]]:
    """`y` [20, F_lat, lat_h, lat_w] (mask, then the image latent) and (lat_h, lat_w) for an image in [0, 1]."""
    img = to_model_range(image)
    lat_hw = latent_size(tuple(image.shape[1:]), max_area)
    n = latent_frames(frame_num)
    latent = image_latent(vae, img, lat_hw, n)
    mask = first_frame_mask(n, *lat_hw).to(latent.device)
    return torch.cat([mask, latent], dim=0), lat_hw


def clip_tokens(clip: ClipVision, image: torch.Tensor) -> torch.Tensor:
    """The image's CLIP tokens [257, clip_dim] for `img_emb` (image in [0, 1])."""
    return clip.encode_image(to_model_range(image).to(clip.patch_embedding.weight.device))[0]


class EncodeImageStep(nn.Module):
    """The `encode_image` graph of the Wan I2V models (Wan2.1 I2V, Matrix-Game): start image [B, 3, H, W] in
    [0, 1] at the video size -> CLIP tokens [B, 257, clip_dim] (all but the last ViT block, of the image
    resized to the tower's input) and y [B, 20, F, h, w] (the first-frame mask + the VAE latent of
    [image; black frames]), as the releases prepare their conditioning.

    The CLIP normalisation and the mask are buffers made here, on the weights' device, rather than
    tensors built inside the call: torch.export lifts such tensors into extra graph inputs, which a
    built engine would have to feed (`tests/test_wan21_family.py` checks none is lifted).
    """

    def __init__(self, clip: ClipVision, vae: WanVAE, latent_hw: tuple[int, int], num_latent_frames: int) -> None:
        super().__init__()
        self.clip, self.vae = clip, vae
        self.latent_hw = tuple(latent_hw)
        self.num_latent_frames = num_latent_frames
        dev = clip.patch_embedding.weight.device
        self.register_buffer("clip_mean", torch.tensor(CLIP_MEAN, device=dev).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(CLIP_STD, device=dev).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("mask", first_frame_mask(num_latent_frames, *latent_hw).to(dev), persistent=False)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img = (image.float() - 0.5) / 0.5
        size = (self.clip.cfg.image_size, self.clip.cfg.image_size)
        pixels = F.interpolate(img, size=size, mode="bicubic", align_corners=False) * 0.5 + 0.5
        tokens = self.clip((pixels - self.clip_mean) / self.clip_std).float()
        lat = torch.stack([image_latent(self.vae, im, self.latent_hw, self.num_latent_frames) for im in img])
        return tokens, torch.cat([self.mask.expand(img.shape[0], *self.mask.shape), lat], dim=1)
