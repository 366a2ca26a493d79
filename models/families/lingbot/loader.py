"""Loading LingBot-World's networks and image encoder: released layouts or seeded random weights.

Fast: one network, `diffusion_pytorch_model*.safetensors` (a single file, a sharded index, or a
folder holding either) in the original key layout. Base: a folder with the two experts in
`high_noise_model/` and `low_noise_model/` (the Wan2.2-I2V-A14B release layout). The start image's
Wan VAE encoder comes from `Wan2.1_VAE.safetensors` (the release's .pth converted with fd-convert)
beside the checkpoint. A state dict works too: the Fast network's keys as they are (or under `dit.`),
Base's under `high_noise_model.` / `low_noise_model.`, the VAE's under `vae.`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from flashdreams.errors import CheckpointError, InvalidArgumentError
from flashdreams.models.checkpoint import read_state_dict
from flashdreams.models.family import LoadOptions
from flashdreams.models.lingbot_dit import LingBotDiT, load_lingbot_dit
from flashdreams.models.random_init import seeded_module
from flashdreams.models.wan_loader import select_prefix
from flashdreams.models.wan_vae import WanVAE, WanVAEConfig

EXPERT_DIRS = {"high": "high_noise_model", "low": "low_noise_model"}
VAE_FILE = "Wan2.1_VAE.safetensors"


def _finish(model: LingBotDiT, opts: LoadOptions) -> LingBotDiT:
    model.fuse_projections_()
    model.set_attention(opts.attention)
    model.set_precision(opts.precision, opts.fp8_keep)
    return model


def load_networks(preset, opts: LoadOptions, weights: Mapping[str, torch.Tensor] | None) -> dict[str, LingBotDiT]:
    """{'dit': net} (Fast) or {'high': net, 'low': net} (Base), from opts.source / `weights` or random."""
    names = ("dit",) if preset.mode == "fast" else ("high", "low")
    if weights is None and opts.source is None:
        if not (preset.builtin or opts.random_weights):
            raise InvalidArgumentError(
                f"preset '{preset.name}' needs a checkpoint: pass --checkpoint PATH, or --random-weights for speed runs"
            )
        out = {}
        for i, n in enumerate(names):
            with torch.device("meta"):
                model = LingBotDiT(preset.model)
            out[n] = _finish(
                seeded_module(model, opts.weights_seed + 10 * i, opts.device, opts.dtype, preset.builtin), opts
            )
        return out
    kw = {"device": opts.device, "dtype": opts.dtype}
    if preset.mode == "fast":
        if weights is not None:
            sd = dict(weights)
            prefix = "dit." if any(k.startswith("dit.") for k in sd) else ""
            return {"dit": _finish(load_lingbot_dit(sd, preset.model, prefix=prefix, **kw), opts)}
        return {"dit": _finish(load_lingbot_dit(opts.source, preset.model, **kw), opts)}
    out = {}
    for n in names:
        if weights is not None:
            src = select_prefix(dict(weights), EXPERT_DIRS[n] + ".")
        else:
            src = Path(opts.source) / EXPERT_DIRS[n]
            if not src.is_dir():
                raise CheckpointError(
                    f"preset '{preset.name}' loads two experts: '{opts.source}' must hold the folders "
                    f"{EXPERT_DIRS['high']}/ and {EXPERT_DIRS['low']}/ (the release layout); '{src}' is missing"
                )
        out[n] = _finish(load_lingbot_dit(src, preset.model, **kw), opts)
    return out


def load_image_encoder(preset, opts: LoadOptions, weights: Mapping[str, torch.Tensor] | None) -> WanVAE:
    """The Wan VAE encoder of the start image: from `vae.` keys, the file beside the checkpoint, or random."""
    cfg = WanVAEConfig.from_dict(preset.vae or {})
    if weights is None and opts.source is None:
        with torch.device("meta"):
            vae = WanVAE(cfg, parts=("encoder",))
        return seeded_module(vae, opts.weights_seed + 100, opts.device, opts.dtype, preset.builtin)
    if weights is not None:
        sd = select_prefix(dict(weights), "vae.")
        where = "the state dict's vae. keys"
    else:
        src = Path(opts.source)
        folder = src if src.is_dir() else src.parent
        path = folder / VAE_FILE
        if not path.is_file():
            raise CheckpointError(
                f"preset '{preset.name}' encodes its start image with the Wan VAE: put {VAE_FILE} (the release's "
                f"Wan2.1_VAE.pth converted with fd-convert) in '{folder}'"
            )
        sd, where = read_state_dict(path), str(path)
    vae = WanVAE(cfg, parts=("encoder",))
    vae.load_weights(sd, source=where)
    return vae.to(opts.device, opts.dtype).eval().requires_grad_(False)
