"""LingBot-World's DiT: a Wan2.2-I2V-style Wan DiT with camera control in every block.

The network is the Wan DiT of wan_dit.py (same keys, same forward) with 36 input channels
([noise 16, mask 4, image latent 16]; no CLIP branch: Wan2.2 I2V conditions on the image only
through y) plus the camera layers of the released checkpoints:
  * model level: `patch_embedding_wancamctrl` (1536 -> dim) and `c2ws_hidden_states_layer1/2`
    make the conditioning tokens `c = E + L2(SiLU(L1(E)))`, E the projected camera tokens;
  * per block i: `blocks.i.cam_injector_layer1/2`, `blocks.i.cam_scale_layer`,
    `blocks.i.cam_shift_layer`: hc = L2'(SiLU(L1'(c))) + c, then right after the self-attention
    residual x <- (1 + scale(hc)) * x + shift(hc), ungated (wan_dit's `after_self` hook).
The camera path depends on neither x nor t, so a streaming block computes every layer's scale
and shift once (`camera_modulation`) and reuses them in its denoising and commit calls.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.camera_rays import FOLD, RAY_CHANNELS
from flashdreams.models.checkpoint import validate_and_load
from flashdreams.models.wan_config import I2V_COND_CHANNELS, WanConfig
from flashdreams.models.wan_dit import TokenModulation, WanDiT
from flashdreams.models.wan_loader import wan_state_dict

# Wan2.2-I2V-A14B's expert (and LingBot-World-Fast's network): dim 5120, 40 layers, 40 heads, 36 input channels.
LINGBOT_14B = WanConfig(in_dim=36, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
# The fixtures' toy size: the real structure at dim 64, 2 heads, 2 layers.
LINGBOT_TINY = WanConfig(in_dim=36, dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, text_len=16)
# Where FP8 puts a block's camera scale and shift layers, fused into one linear (LingBotDiT.quantize_fp8_).
CAM_SCALE_SHIFT_FP8 = "cam_scale_shift_fp8"


def lingbot_config(cfg: WanConfig | Mapping) -> WanConfig:
    """A reference `WanModel` config (model_type 'i2v', in_dim 36) as our WanConfig.

    The image enters only through y, so the network is the t2v-shaped Wan DiT with 36 input
    channels (no `img_emb`, no image rows in the cross-attention).
    """
    cfg = WanConfig.from_dict(dict(cfg)) if isinstance(cfg, Mapping) else cfg
    if cfg.in_dim != cfg.out_dim + I2V_COND_CHANNELS:
        raise InvalidArgumentError(
            f"LingBot: in_dim must be out_dim + {I2V_COND_CHANNELS} (noise, mask, image latent); got {cfg.in_dim}"
        )
    return cfg.replace(model_type="t2v")


class LingBotDiT(WanDiT):
    """WanDiT plus the camera layers; forwards take the camera as tokens [B, L, 1536] or as precomputed
    per-layer modulation (scale, shift) [layers, B, L, D]."""

    # Every block linear in FP8 but the camera's: LingBot-World Fast's latents stay within rel. L2 0.0080 of bf16 over
    # 7 blocks (48.6 dB) with its cross-attention in FP8 too; the camera layers in FP8 as well took that to 0.0271
    # (42.1 dB) for 1.3% of a block (H100, next47/next48-h100), so they stay in bf16 unless asked (fp8_keep="").
    fp8_keep = r"\.cam_"

    def __init__(self, cfg: WanConfig) -> None:
        cfg = lingbot_config(cfg)
        super().__init__(cfg)
        d = cfg.dim
        feats = RAY_CHANNELS * FOLD * FOLD * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
        self.patch_embedding_wancamctrl = nn.Linear(feats, d)
        self.c2ws_hidden_states_layer1 = nn.Linear(d, d)
        self.c2ws_hidden_states_layer2 = nn.Linear(d, d)
        for blk in self.blocks:
            blk.cam_injector_layer1 = nn.Linear(d, d)
            blk.cam_injector_layer2 = nn.Linear(d, d)
            blk.cam_scale_layer = nn.Linear(d, d)
            blk.cam_shift_layer = nn.Linear(d, d)

    # -- the camera path ---------------------------------------------------------------
    def camera_cond(self, cam_tokens: torch.Tensor) -> torch.Tensor:
        """Folded camera tokens [B, L, 1536] -> the conditioning c [B, L, D] every block receives."""
        e = self.patch_embedding_wancamctrl(cam_tokens.to(self.dtype))
        return e + self.c2ws_hidden_states_layer2(F.silu(self.c2ws_hidden_states_layer1(e)))

    def layer_modulation(self, layer: int, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block `layer`'s camera (scale, shift) [B, L, D] from the conditioning c."""
        blk = self.blocks[layer]
        hc = blk.cam_injector_layer2(F.silu(blk.cam_injector_layer1(cond))) + cond
        fused = getattr(blk, CAM_SCALE_SHIFT_FP8, None)
        if fused is not None:
            scale, shift = fused(hc).chunk(2, dim=-1)
            return scale, shift
        return blk.cam_scale_layer(hc), blk.cam_shift_layer(hc)

    def quantize_fp8_(self, exclude: str | None = None) -> list[str]:
        """WanDiT's FP8 swap, plus each block's camera layers where `exclude` does not match them (the
        default, `fp8_keep`, does): the scale and shift layers then run as one fused FP8 GEMM
        (`CAM_SCALE_SHIFT_FP8`, hc quantized once). They run once per streaming block on every token: at
        the Fast config 160 GEMMs of 5120 x 5120, 50.7 ms of an FP8 block 7 in bf16 and 36.1 + 2.7 ms of
        quantization in FP8 (block 7 1475.7 vs 1456.9 ms, H100, next47-h100)."""
        from flashdreams.kernels import Fp8Linear, quantize_linears_fp8_
        from flashdreams.kernels.fp8_linear import fp8_exclusion

        keep = fp8_exclusion(self.fp8_keep if exclude is None else exclude)  # a bad regex: nothing changed yet
        done = super().quantize_fp8_(exclude)

        def wanted(name: str) -> bool:
            return keep is None or not keep.search(name)

        for i, blk in enumerate(self.blocks):
            names = [f"blocks.{i}.cam_scale_layer", f"blocks.{i}.cam_shift_layer"]
            if not all(wanted(n) for n in names):
                continue
            sc, sh = blk.cam_scale_layer, blk.cam_shift_layer
            fused = nn.Linear(sc.in_features, 2 * sc.out_features, device=sc.weight.device, dtype=sc.weight.dtype)
            with torch.no_grad():
                fused.weight.copy_(torch.cat([sc.weight, sh.weight]))
                fused.bias.copy_(torch.cat([sc.bias, sh.bias]))
            setattr(blk, CAM_SCALE_SHIFT_FP8, Fp8Linear.from_linear(fused))
            del blk.cam_scale_layer, blk.cam_shift_layer
            done += names
        injector = re.compile(r"(^|\.)blocks\.\d+\.cam_injector_layer[12]$")
        done += quantize_linears_fp8_(self, include=lambda n, lin: bool(injector.search(n)) and wanted(n))
        return done

    def camera_modulation(self, cam_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer's (scale, shift), stacked [layers, B, L, D]: computed once per streaming block."""
        c = self.camera_cond(cam_tokens)
        mods = [self.layer_modulation(i, c) for i in range(len(self.blocks))]
        return torch.stack([s for s, _ in mods]), torch.stack([b for _, b in mods])

    def _hook(self, cam_tokens=None, cam_scale=None, cam_shift=None, debug: dict | None = None):
        """The camera as the DiT's `after_self`: each layer's (scale, shift) as a TokenModulation, which
        the block applies in one pass with its residual and the cross-attention's pre-norm."""
        if cam_tokens is None and cam_scale is None:
            return None
        cond = None
        if cam_tokens is not None:
            cond = self.camera_cond(cam_tokens)
            if debug is not None:
                debug["cam_cond"] = cond
        return _CameraLayers(self, cond, cam_scale, cam_shift, debug)

    # -- forwards ------------------------------------------------------------------------
    def forward_camera(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cross_k: torch.Tensor,
        cross_v: torch.Tensor,
        y: torch.Tensor,
        cam_tokens: torch.Tensor | None = None,
        debug: dict | None = None,
    ) -> torch.Tensor:
        """The bidirectional I2V forward with the camera (None: the camera branch is skipped).

        x [B, 16, F, H, W]; t [B] (one per sample), [B, F] or [B, L] (per token); y [B, 20, F, H, W];
        cam_tokens [B, L, 1536]. `debug` (a dict) receives cam_cond, per block the camera scale/shift
        and `block{i}.out`.
        """
        if y.shape[0] != x.shape[0] or tuple(y.shape[2:]) != tuple(x.shape[2:]) or y.shape[1] != I2V_COND_CHANNELS:
            raise InvalidArgumentError(f"LingBot: y {tuple(y.shape)} must be [B, 20, F, H, W] like x {tuple(x.shape)}")
        hook = self._hook(cam_tokens, debug=debug)
        handles = []
        if debug is not None:
            for i, blk in enumerate(self.blocks):
                record = lambda _m, _a, out, i=i: debug.__setitem__(f"block{i}.out", out)  # noqa: E731
                handles.append(blk.register_forward_hook(record))
        try:
            return self.forward_cached(torch.cat([x, y.to(x.dtype)], dim=1), t, cross_k, cross_v, after_self=hook)
        finally:
            for h in handles:
                h.remove()

    def forward_step_camera(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cam_scale: torch.Tensor,
        cam_shift: torch.Tensor,
        cross_k: torch.Tensor,
        cross_v: torch.Tensor,
        ring_k: torch.Tensor,
        ring_v: torch.Tensor,
        frame_positions: torch.Tensor,
        slots: torch.Tensor,
        valid_len: torch.Tensor,
        valid_len_host: int | None = None,
        *,
        attend=None,
        shard=None,
        fp8_shadow: tuple | None = None,
    ) -> torch.Tensor:
        """The causal forward of one block against the KV ring (wan_dit.forward_step) with y and the
        block's precomputed camera modulation [layers, B, L, D]. `attend` / `shard`: the context-parallel
        hooks (wan_dit.forward_step); the modulation is per token, so a rank takes its own rows of it.
        `fp8_shadow`: the ring's fp8 shadow (wan_dit.forward_step)."""
        if shard is not None:
            _, ph, pw = self.cfg.patch_size
            fs = (x.shape[3] // ph) * (x.shape[4] // pw)
            cam_scale, cam_shift = shard.take(cam_scale, fs, 2), shard.take(cam_shift, fs, 2)
        hook = self._hook(cam_scale=cam_scale, cam_shift=cam_shift)
        return self.forward_step(
            torch.cat([x, y.to(x.dtype)], dim=1),
            t,
            cross_k,
            cross_v,
            ring_k,
            ring_v,
            frame_positions,
            slots,
            valid_len,
            valid_len_host,
            attend=attend,
            shard=shard,
            after_self=hook,
            fp8_shadow=fp8_shadow,
        )


class _CameraLayers:
    """Each layer's camera modulation, from the camera condition (computed per layer, as the reference
    does) or from the block's precomputed [layers, B, L, D] scale/shift; `debug` records them."""

    def __init__(self, model: LingBotDiT, cond, cam_scale, cam_shift, debug: dict | None) -> None:
        self.model, self.cond, self.cam_scale, self.cam_shift, self.debug = model, cond, cam_scale, cam_shift, debug

    def layer(self, i: int) -> TokenModulation:
        if self.cond is not None:
            scale, shift = self.model.layer_modulation(i, self.cond)
        else:
            scale, shift = self.cam_scale[i], self.cam_shift[i]
        if self.debug is not None:
            self.debug[f"block{i}.cam_scale"], self.debug[f"block{i}.cam_shift"] = scale, shift
        return TokenModulation(scale, shift)


def load_lingbot_dit(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    config: WanConfig,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    prefix: str = "",
) -> LingBotDiT:
    """A LingBotDiT from the released layout (`diffusion_pytorch_model*.safetensors`, a sharded index, a
    folder, or a state dict); refuses any missing, unexpected or mis-shaped key whole."""
    name = str(source) if not isinstance(source, Mapping) else "<state dict>"
    sd = wan_state_dict(source, prefix)
    with torch.device("meta"):
        model = LingBotDiT(config)
    model = model.to_empty(device=device).to(dtype)
    validate_and_load(
        model, sd, name, hint="is this a LingBot-World DiT (Wan keys plus the camera layers) of the preset's size?"
    )
    return model.eval().requires_grad_(False)
