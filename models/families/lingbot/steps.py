"""LingBot-World's step graphs with named inputs: the camera of a block, the causal DiT call, the start
image's conditioning, and (Base) the two experts' guidance pairs over a whole clip."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flashdreams.models.camera_rays import camera_tokens, clip_relative_poses, latent_poses, stream_relative_poses
from flashdreams.models.family import GraphSig
from flashdreams.models.lingbot_dit import CAM_SCALE_SHIFT_FP8, LingBotDiT
from flashdreams.models.wan_i2v import first_frame_mask, image_latent
from flashdreams.models.wan_vae import WanVAE

DIT_ARGS = ("x", "t", "y", "cam_scale", "cam_shift", "cross_k", "cross_v", "ring_k", "ring_v")
DIT_SIG = GraphSig(
    "dit",
    (*DIT_ARGS, "frame_positions", "slots", "valid_len"),
    ("flow",),
    ("ring_k", "ring_v"),
    ("ring_k", "ring_v"),
)
CAMERA_ARGS = ("poses", "intrinsics", "world_scale", "cam_anchor")
CAMERA_OUTS = ("cam_scale", "cam_shift", "cam_last")
ENCODE_IMAGE_SIG = GraphSig("encode_image", ("image",), ("y_all",))


def camera_sig(first: bool) -> GraphSig:
    return GraphSig("camera_first" if first else "camera", CAMERA_ARGS, CAMERA_OUTS)


class _CameraLayers(nn.Module):
    """The camera weights of a LingBotDiT (model-level projection and each block's four layers), nothing else."""

    def __init__(self, model: LingBotDiT) -> None:
        super().__init__()
        self.patch_embedding_wancamctrl = model.patch_embedding_wancamctrl
        self.c2ws_hidden_states_layer1 = model.c2ws_hidden_states_layer1
        self.c2ws_hidden_states_layer2 = model.c2ws_hidden_states_layer2
        self.blocks = nn.ModuleList()
        for blk in model.blocks:
            layer = nn.Module()
            for name in ("cam_injector_layer1", "cam_injector_layer2", "cam_scale_layer", "cam_shift_layer"):
                if hasattr(blk, name):  # in FP8 scale and shift are one fused layer
                    setattr(layer, name, getattr(blk, name))
            if hasattr(blk, CAM_SCALE_SHIFT_FP8):
                setattr(layer, CAM_SCALE_SHIFT_FP8, getattr(blk, CAM_SCALE_SHIFT_FP8))
            self.blocks.append(layer)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding_wancamctrl.weight.dtype

    # The math is LingBotDiT's own (one definition), run on these references.
    camera_cond = LingBotDiT.camera_cond
    layer_modulation = LingBotDiT.layer_modulation
    camera_modulation = LingBotDiT.camera_modulation


class CameraStep(nn.Module):
    """poses [B, 4nf, 4, 4], intrinsics [B, 4], world_scale [B], cam_anchor [B, 4, 4] -> the block's camera
    modulation cam_scale, cam_shift [layers, B, L, D] (model dtype) and cam_last [B, 4, 4].

    The block's latent frames take the poses at 0, 4, 8 (block 0) or 3, 7, 11 (later blocks),
    made relative frame to frame (block 0's first = identity, later blocks anchored on
    cam_anchor, the previous block's cam_last), translations divided by world_scale; the ray
    map is cast to the model dtype before the folds (models/camera_rays.py).
    """

    def __init__(self, model: LingBotDiT, first: bool, frames_per_block: int, latent_hw: tuple[int, int]) -> None:
        super().__init__()
        self.cam = _CameraLayers(model)
        self.first = first
        self.frames_per_block = frames_per_block
        self.latent_hw = tuple(latent_hw)
        self.patch = tuple(model.cfg.patch_size)

    def forward(self, poses, intrinsics, world_scale, cam_anchor):
        rel, last = stream_relative_poses(
            poses.float(), cam_anchor.float(), world_scale.float(), self.first, self.frames_per_block
        )
        tokens = camera_tokens(rel, intrinsics.float(), self.latent_hw, self.cam.dtype, self.patch)
        scale, shift = self.cam.camera_modulation(tokens)
        return scale, shift, last


class DiTStep(nn.Module):
    """x [B, 16, nf, h, w], t [B, nf], y [B, 20, nf, h, w], cam_scale/cam_shift [layers, B, L, D],
    cross_k/v, ring_k/v, frame_positions, slots, valid_len -> flow [B, 16, nf, h, w] float32;
    writes the block's K/V into the ring in place (denoising calls and the commit alike)."""

    def __init__(self, model: LingBotDiT, fp8_block_n: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.fp8_block_n = fp8_block_n  # key tile of the ring's fp8 shadow; None: no shadow (its args absent)

    def forward(
        self, x, t, y, cam_scale, cam_shift, cross_k, cross_v, ring_k, ring_v, frame_positions, slots, valid_len,
        *shadow, valid_len_host=None, attend=None, shard=None,
    ):  # fmt: skip
        """`shadow`: the ring's fp8 shadow (models/fp8_ring_shadow.FP8_SHADOW) where the plan keeps one;
        `attend`/`shard`: context parallel's hooks, None in a plain call."""
        return self.model.forward_step_camera(
            x, t, y, cam_scale, cam_shift, cross_k, cross_v, ring_k, ring_v, frame_positions, slots, valid_len,
            valid_len_host, attend=attend, shard=shard, fp8_shadow=(*shadow, self.fp8_block_n) if shadow else None,
        )  # fmt: skip


class EncodeImageStep(nn.Module):
    """image [B, 3, H, W] in [0, 1] -> y_all [B, 20, F, h, w]: the first-frame mask and the VAE latent of
    [the image; black frames] for the first F latent frames (the Wan2.2-I2V conditioning; no CLIP)."""

    def __init__(self, vae: WanVAE, latent_hw: tuple[int, int], num_latent_frames: int) -> None:
        super().__init__()
        self.vae = vae
        self.latent_hw = tuple(latent_hw)
        self.num_latent_frames = num_latent_frames
        # Made once here: built inside forward, a traced graph would carry it as a lifted constant.
        mask = first_frame_mask(num_latent_frames, *latent_hw).to(vae.encoder.conv1.weight.device)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, image):
        img = (image.float() - 0.5) / 0.5
        latents = torch.stack([image_latent(self.vae, im, self.latent_hw, self.num_latent_frames) for im in img])
        return torch.cat([self.mask.to(latents.device).expand(img.shape[0], *self.mask.shape), latents], dim=1)


# -- Base: a whole clip ----------------------------------------------------------------------------


class ClipCameraStep(nn.Module):
    """poses [B, N, 4, 4] (one per pixel frame of the clip), intrinsics [B, 4] -> cam_tokens [B, L, 1536]:
    the reference's clip rule (pixel frames 0, 4, 8, ..., frame 0 = identity, translations divided by
    the clip's largest framewise one)."""

    def __init__(self, latent_hw: tuple[int, int], patch: tuple[int, int, int]) -> None:
        super().__init__()
        self.latent_hw = tuple(latent_hw)
        self.patch = tuple(patch)

    def forward(self, poses, intrinsics):
        rel = clip_relative_poses(latent_poses(poses.float()))
        return camera_tokens(rel, intrinsics.float(), self.latent_hw, torch.float32, self.patch)


class DiTCfgStep(nn.Module):
    """One expert's guidance pair as one forward of batch 2B: x [B, 16, F, h, w], t int64 [1], y, cam_tokens,
    cross_k/v [layers, 2B, T, N, d] (prompt rows, then negative-prompt rows) -> (cond, uncond)."""

    def __init__(self, model: LingBotDiT) -> None:
        super().__init__()
        self.model = model

    def forward(self, x, t, y, cam_tokens, cross_k, cross_v):
        b = x.shape[0]
        two = lambda v: torch.cat([v, v])  # noqa: E731
        t2 = t.expand(2 * b) if t.numel() == 1 else two(t)
        flow = self.model.forward_camera(two(x), t2, cross_k, cross_v, two(y), two(cam_tokens))
        return flow[:b], flow[b:]


class EncodePromptStep(nn.Module):
    """prompt_embeds [B, text_len, text_dim] (and, with guidance, negative_prompt_embeds) -> cross_k,
    cross_v [layers, B or 2B, text_len, N, d]; holds only the text embedding and the per-layer K/V."""

    def __init__(self, model: LingBotDiT, negative: bool) -> None:
        super().__init__()
        self.cfg = model.cfg
        self.text_embedding = model.text_embedding
        self.k = nn.ModuleList([blk.cross_attn.k for blk in model.blocks])
        self.v = nn.ModuleList([blk.cross_attn.v for blk in model.blocks])
        self.norm_k = nn.ModuleList([blk.cross_attn.norm_k for blk in model.blocks])
        self.heads = model.cfg.num_heads
        self.negative = negative

    @property
    def dtype(self) -> torch.dtype:
        return self.text_embedding[0].weight.dtype

    def _embed(self, context: torch.Tensor) -> torch.Tensor:
        pad = self.cfg.text_len - context.shape[1]
        if pad > 0:
            context = F.pad(context, (0, 0, 0, pad))
        return self.text_embedding(context[:, : self.cfg.text_len].to(self.dtype))

    def forward(self, prompt_embeds, negative_prompt_embeds=None):
        ctx = prompt_embeds if not self.negative else torch.cat([prompt_embeds, negative_prompt_embeds])
        c = self._embed(ctx)
        ks = [n(k(c)).unflatten(-1, (self.heads, -1)) for k, n in zip(self.k, self.norm_k)]
        vs = [v(c).unflatten(-1, (self.heads, -1)) for v in self.v]
        return torch.stack(ks), torch.stack(vs)
