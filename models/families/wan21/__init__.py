"""Wan2.1 bidirectional T2V and I2V: `WanT2V.generate` / `WanI2V.generate` as a session family.

A session block samples one whole clip (UniPC + classifier-free guidance, then the decode);
every `step()` draws new noise. The guidance pair runs as one DiT forward of batch 2B
against cross-attention caches that the prompt inputs fill once (plan.py). Checkpoints: the
DiT in the Wan or diffusers layout; I2V also needs the CLIP vision tower and the VAE
encoder, either in one file under the prefixes `dit.`, `clip.` and `vae.` (the fixtures'
layout) or beside the DiT as the release's files converted to safetensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.checkpoint import read_state_dict
from flashdreams.models.clip_vision import ClipVision, ClipVisionConfig
from flashdreams.models.decoders import choose_decoder
from flashdreams.models.families.wan21.plan import LATENT_CHANNELS, build_plan
from flashdreams.models.families.wan21.presets import PRESETS, Preset
from flashdreams.models.families.wan21.steps import (
    ClipDecodeStep,
    DiTCfgStep,
    EncodeImageStep,
    EncodePromptStep,
)
from flashdreams.models.family import Family, LoadedModel, LoadOptions, dtype_name, weights_source
from flashdreams.models.random_init import seeded_module
from flashdreams.models.wan_dit import WanDiT
from flashdreams.models.wan_loader import load_wan_dit, select_prefix
from flashdreams.models.wan_vae import WanVAE, WanVAEConfig

COMBINED_PREFIXES = ("dit.", "clip.", "vae.")
CLIP_FILE_GLOB = "models_clip_*.safetensors"
VAE_FILE = "Wan2.1_VAE.safetensors"


def _is_combined(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("dit.") for k in sd) and any(k.startswith(("clip.", "vae.")) for k in sd)


class Wan21Family(Family):
    name = "wan21"
    description = "Wan2.1 T2V / I2V: bidirectional clips with UniPC and classifier-free guidance"

    def presets(self) -> list[Preset]:
        return list(PRESETS)

    def preset_from_dict(self, d: Mapping) -> Preset:
        return Preset.from_dict(dict(d))

    def _weights(self, preset: Preset, opts: LoadOptions, weights: Mapping[str, torch.Tensor] | None):
        """(DiT state dict or source, CLIP state dict, VAE state dict); all None for random weights."""
        if weights is None and opts.source is None:
            if not (preset.builtin or opts.random_weights):
                raise InvalidArgumentError(
                    f"preset '{preset.name}' needs a checkpoint: pass --checkpoint FILE, "
                    "or --random-weights for speed runs"
                )
            return None, None, None
        if weights is not None:
            sd = dict(weights)
        elif preset.i2v:
            sd = read_state_dict(opts.source)
        else:
            return opts.source, None, None
        if _is_combined(sd):
            clip = select_prefix(sd, "clip.") if preset.i2v else None
            vae = select_prefix(sd, "vae.") if preset.i2v else None
            return select_prefix(sd, "dit."), clip, vae
        if not preset.i2v:
            return sd, None, None
        return sd, *self._i2v_side_files(preset, opts)

    def _i2v_side_files(self, preset: Preset, opts: LoadOptions):
        """The CLIP tower and the VAE of the I2V release, as safetensors beside the DiT checkpoint."""
        where = Path(opts.source) if opts.source is not None else None
        folder = where if where is not None and where.is_dir() else (where.parent if where is not None else None)
        clips = sorted(folder.glob(CLIP_FILE_GLOB)) if folder is not None else []
        vae = Path(opts.decoder_weights) if opts.decoder_weights else (folder / VAE_FILE if folder else None)
        if len(clips) != 1 or vae is None or not vae.is_file():
            raise InvalidArgumentError(
                f"preset '{preset.name}' needs the CLIP vision tower and the Wan VAE encoder besides the DiT: "
                f"put {CLIP_FILE_GLOB.replace('*', '<...>')} and {VAE_FILE} (the release's .pth files, converted "
                "with fd-convert) next to the checkpoint, or pass one file with the prefixes dit./clip./vae."
            )
        return read_state_dict(clips[0]), read_state_dict(vae)

    def build_dit(self, preset: Preset, opts: LoadOptions, source) -> WanDiT:
        if source is not None:
            model = load_wan_dit(source, preset.model, device=opts.device, dtype=opts.dtype)
        else:
            with torch.device("meta"):
                model = WanDiT(preset.model)
            model = seeded_module(model, opts.weights_seed, opts.device, opts.dtype, preset.builtin)
        model.fuse_projections_()
        model.set_attention(opts.attention)
        model.set_precision(opts.precision, opts.fp8_keep)
        return model

    def build_image_encoder(self, preset: Preset, opts: LoadOptions, clip_sd, vae_sd, latent_hw) -> EncodeImageStep:
        """The CLIP tower and the VAE encoder of I2V, from their weights or seeded random ones."""
        clip_cfg = ClipVisionConfig.from_dict(preset.clip or {})
        vae_cfg = WanVAEConfig.from_dict(preset.vae or {})
        if clip_sd is None:
            with torch.device("meta"):
                clip = ClipVision(clip_cfg)
            clip = seeded_module(clip, opts.weights_seed + 1, opts.device, opts.dtype, preset.builtin)
            with torch.device("meta"):
                vae = WanVAE(vae_cfg, parts=("encoder",))
            vae = seeded_module(vae, opts.weights_seed + 2, opts.device, opts.dtype, preset.builtin)
        else:
            clip = ClipVision(clip_cfg)
            clip.load_weights(clip_sd, source="CLIP weights")
            vae = WanVAE(vae_cfg, parts=("encoder",))
            vae.load_weights(vae_sd, source="VAE weights")
            clip = clip.to(opts.device, opts.dtype).eval().requires_grad_(False)
            vae = vae.to(opts.device, opts.dtype).eval().requires_grad_(False)
        return EncodeImageStep(clip, vae, latent_hw, preset.latent_frames)

    def load(self, preset: Preset, opts: LoadOptions, weights: Mapping[str, torch.Tensor] | None = None) -> LoadedModel:
        """`preset` at opts' size and batch: the plan, the step graphs and the decoder.

        `weights` (a state dict) replaces opts.source: a DiT, or for I2V the combined
        dit./clip./vae. layout.
        """
        if opts.batch < 1:
            raise InvalidArgumentError(f"batch must be >= 1, got {opts.batch}")
        dit_source, clip_sd, vae_sd = self._weights(preset, opts, weights)
        latent_hw = preset.latent_size(opts.height, opts.width)
        image_hw = preset.image_size(opts.height, opts.width) if preset.i2v else None
        model = self.build_dit(preset, opts, dit_source)
        name = preset.decoder if opts.decoder == "preset" else opts.decoder
        decoder = choose_decoder(
            name,
            opts.device,
            opts.dtype,
            builtin=preset.builtin,
            random_ok=(opts.random_weights or opts.source is None) and weights is None,
            seed=opts.weights_seed,
            weights=opts.decoder_weights,
        )
        dec = None
        if decoder is not None:
            dec = {"name": decoder.name, "frames": decoder.num_frames(preset.latent_frames, True)}
        plan = build_plan(preset, preset.model, opts.batch, latent_hw, image_hw, dtype_name(opts.dtype), dec)
        graphs = {"dit_cfg": DiTCfgStep(model), "encode_prompt": EncodePromptStep(model)}
        weights_module = torch.nn.ModuleDict({"dit": model})
        if preset.i2v:
            graphs["encode_image"] = self.build_image_encoder(preset, opts, clip_sd, vae_sd, latent_hw)
            weights_module["image_encoder"] = graphs["encode_image"]
        if decoder is not None:
            graphs["decode"] = ClipDecodeStep(decoder, opts.batch, latent_hw, preset.decode_chunk)
        source = weights_source(opts, weights, preset)
        return LoadedModel(
            plan=plan,
            graphs=graphs,
            weights=weights_module if preset.i2v else model,
            decoder=decoder,
            examples=lambda g: example_inputs(plan, g, opts.device),
            source=source,
            device=opts.device,
            dtype=opts.dtype,
            describe={"attention": model.attention_impl, "precision": opts.precision},
        )


def example_inputs(plan, graph: str, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Call inputs for tracing `graph` (fd-build): seeded random values at the plan's shapes."""
    gen = torch.Generator(device=device).manual_seed(
        {"dit_cfg": 0, "encode_prompt": 1, "encode_image": 2}.get(graph, 3)
    )
    out = []
    for arg in plan.graphs[graph].args:
        if arg in plan.inputs:
            spec = plan.inputs[arg]
            if spec.low is not None and spec.high is not None:
                value = spec.low + (spec.high - spec.low) * torch.rand(spec.shape, generator=gen, device=device)
            else:
                value = torch.randn(spec.shape, generator=gen, device=device)
            out.append(value.to(spec.torch_dtype()))
        elif arg == "t":
            out.append(plan.constants["t_0"].allocate(device))
        elif arg in ("x", "latents"):
            out.append(torch.randn(plan.latents.shape, generator=gen, device=device))
        elif arg in plan.state:
            decl = plan.state[arg]
            out.append(torch.randn(decl.shape, generator=gen, device=device).to(decl.torch_dtype()))
        else:  # pragma: no cover - plan.validate catches this
            raise InvalidArgumentError(f"graph '{graph}': no example for input '{arg}'")
    return tuple(out)


FAMILY = Wan21Family()
__all__ = ["FAMILY", "LATENT_CHANNELS", "Preset"]
