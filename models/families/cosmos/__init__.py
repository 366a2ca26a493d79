"""Cosmos-Predict2.5 2B (text/image/video-to-world) as a session family.

A session block samples one whole clip: UniPC over Karras sigmas with classifier-free guidance
against a negative prompt, the given latent frames replaced in the network input (video2world),
then the Wan2.1-VAE decode. Text comes in as precomputed Cosmos-Reason1 features
(`prompt_embeds`, 100352 wide for the 2B); the DiT loads from the released `.pt` (converted with
fd-convert; `net.` prefix) or from the diffusers `CosmosTransformer3DModel` layout.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.cosmos_dit import CosmosDiT
from flashdreams.models.cosmos_loader import load_cosmos_dit
from flashdreams.models.decoders import choose_decoder
from flashdreams.models.families.cosmos.plan import build_plan
from flashdreams.models.families.cosmos.presets import PRESETS, Preset
from flashdreams.models.families.cosmos.steps import CosmosCfgStep, EncodePromptStep
from flashdreams.models.families.wan21.steps import ClipDecodeStep
from flashdreams.models.family import Family, LoadedModel, LoadOptions, dtype_name
from flashdreams.models.family import weights_source as source_label  # the name `weights_source` is taken here
from flashdreams.models.random_init import seeded_module


def build_dit(cfg, opts: LoadOptions, source, builtin: bool, seed_offset: int = 0) -> CosmosDiT:
    """The DiT from `source` (file, directory or state dict) or with seeded random weights."""
    if source is not None:
        model = load_cosmos_dit(source, cfg, device=opts.device, dtype=opts.dtype)
    else:
        with torch.device("meta"):
            model = CosmosDiT(cfg)
        model = seeded_module(model, opts.weights_seed + seed_offset, opts.device, opts.dtype, builtin)
    model.set_attention(opts.attention)
    model.set_precision(opts.precision, opts.fp8_keep)
    return model


def weights_source(preset, opts: LoadOptions, weights: Mapping[str, torch.Tensor] | None):
    """The DiT's state dict or checkpoint path, or None for random/builtin weights (refused otherwise)."""
    if weights is not None:
        return dict(weights)
    if opts.source is not None:
        return opts.source
    if not (preset.builtin or opts.random_weights):
        raise InvalidArgumentError(
            f"preset '{preset.name}' needs a checkpoint: pass --checkpoint FILE, or --random-weights for speed runs"
        )
    return None


class CosmosFamily(Family):
    name = "cosmos"
    description = "Cosmos-Predict2.5 2B: text/image/video-to-world clips with Karras UniPC and guidance"

    def presets(self) -> list[Preset]:
        return list(PRESETS)

    def preset_from_dict(self, d: Mapping) -> Preset:
        return Preset.from_dict(dict(d))

    def load(self, preset: Preset, opts: LoadOptions, weights: Mapping[str, torch.Tensor] | None = None) -> LoadedModel:
        """`preset` at opts' size and batch; `weights` (a state dict, either layout) replaces opts.source."""
        if opts.batch < 1:
            raise InvalidArgumentError(f"batch must be >= 1, got {opts.batch}")
        latent_hw = preset.latent_size(opts.height, opts.width)
        source = weights_source(preset, opts, weights)
        model = build_dit(preset.model, opts, source, preset.builtin)
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
        plan = build_plan(preset, opts.batch, latent_hw, dtype_name(opts.dtype), dec)
        graphs = {
            "dit_cfg": CosmosCfgStep(model, preset.latent_frames, preset.num_cond_frames, preset.cond_timestep),
            "encode_prompt": EncodePromptStep(model),
        }
        if decoder is not None:
            graphs["decode"] = ClipDecodeStep(decoder, opts.batch, latent_hw, preset.decode_chunk)
        return LoadedModel(
            plan=plan,
            graphs=graphs,
            weights=model,
            decoder=decoder,
            examples=lambda g: example_inputs(plan, g, opts.device),
            source=source_label(opts, weights, preset),
            device=opts.device,
            dtype=opts.dtype,
            describe={"attention": model.attention_impl, "precision": opts.precision},
        )


def example_inputs(plan, graph: str, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Call inputs for tracing `graph` (fd-build): seeded random values at the plan's shapes."""
    gen = torch.Generator(device=device).manual_seed(sorted(plan.graphs).index(graph))
    out = []
    for arg in plan.graphs[graph].args:
        if arg == "t":
            decl = plan.constants["t_0"]
            out.append(decl.allocate(device))
            continue
        if arg in ("x", "latents"):
            shape, dt = plan.latents.shape, torch.float32
        else:
            decl = plan.inputs.get(arg) or plan.state.get(arg) or plan.constants.get(arg) or plan.draws.get(arg)
            shape, dt = decl.shape, decl.torch_dtype()
        out.append(torch.randn(shape, generator=gen, device=device).to(dt))
    return tuple(out)


FAMILY = CosmosFamily()
__all__ = ["FAMILY", "Preset", "build_dit", "weights_source"]
