"""Causal Wan: Self-Forcing, CausVid and Causal-Forcing (T2V, I2V, ++), the streaming Wan2.1-1.3B family.

One DiT forward serves every call of a block (denoise and commit) against a KV ring; the
block plan (plan.py) says which calls a block makes. Checkpoints load in the Wan and the
diffusers key layouts, with or without the distilled checkpoints' prefixes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.decode_step import decoder_graphs
from flashdreams.models.decoders import choose_decoder
from flashdreams.models.families.causal_wan.plan import LATENT_CHANNELS, build_plan
from flashdreams.models.families.causal_wan.presets import PRESETS, Preset
from flashdreams.models.families.causal_wan.steps import DiTStep, EncodePromptStep
from flashdreams.models.family import Family, LoadedModel, LoadOptions, dtype_name, ring_length_hints, weights_source
from flashdreams.models.fp8_ring_shadow import shadow_block_n
from flashdreams.models.random_init import seeded_module
from flashdreams.models.wan_dit import WanDiT
from flashdreams.models.wan_loader import load_wan_dit
from flashdreams.parallel.hooks import ParallelHooks


class CausalWanFamily(Family):
    name = "causal_wan"
    description = "Self-Forcing / CausVid / Causal-Forcing: streaming causal Wan2.1 with a KV ring"

    def presets(self) -> list[Preset]:
        return list(PRESETS)

    def preset_from_dict(self, d: Mapping) -> Preset:
        return Preset.from_dict(dict(d))

    def build_dit(self, preset: Preset, opts: LoadOptions, weights: Mapping[str, torch.Tensor] | None = None) -> WanDiT:
        """The DiT of `preset`: from a checkpoint (opts.source or `weights`), or seeded random weights."""
        dev, dt = opts.device, opts.dtype
        if weights is not None or opts.source is not None:
            model = load_wan_dit(weights if weights is not None else opts.source, preset.model, device=dev, dtype=dt)
        else:
            if not (preset.builtin or opts.random_weights):
                raise InvalidArgumentError(
                    f"preset '{preset.name}' needs a checkpoint: pass --checkpoint FILE, "
                    "or --random-weights for speed runs"
                )
            with torch.device("meta"):
                model = WanDiT(preset.model)
            # The built-in model draws on the CPU (identical everywhere); big speed runs on the device.
            model = seeded_module(model, opts.weights_seed, dev, dt, preset.builtin)
        model.fuse_projections_()
        model.set_attention(opts.attention)
        model.set_precision(opts.precision, opts.fp8_keep)
        return model

    def load(self, preset: Preset, opts: LoadOptions, weights: Mapping[str, torch.Tensor] | None = None) -> LoadedModel:
        model = self.build_dit(preset, opts, weights)
        height, width = opts.height or preset.height, opts.width or preset.width
        name = preset.decoder if opts.decoder == "preset" else opts.decoder
        random_ok = opts.random_weights or opts.source is None
        decoder = choose_decoder(
            name,
            opts.device,
            opts.dtype,
            builtin=preset.builtin,
            random_ok=random_ok and weights is None,
            seed=opts.weights_seed,
            weights=opts.decoder_weights,
        )
        if height <= 0 or width <= 0 or height % 16 or width % 16:
            raise InvalidArgumentError(
                f"resolution {height}x{width}: height and width must be positive multiples of 16 for {preset.name}"
            )
        lh, lw = height // 8, width // 8
        dec = decoder_graphs(decoder, opts.batch, lh, lw, preset.num_frame_per_block) if decoder else None
        block_n = shadow_block_n(model, opts.device, opts.dtype)
        plan = build_plan(preset, preset.model, opts.batch, height, width, dtype_name(opts.dtype), dec, block_n)
        graphs = {"dit": DiTStep(model, block_n), "encode_prompt": EncodePromptStep(model)}
        if dec is not None:
            graphs.update(dec.graphs)
        hints = ring_length_hints(plan.ring, model.attention_impl == "sdpa")

        source = weights_source(opts, weights, preset)
        return LoadedModel(
            plan=plan,
            graphs=graphs,
            weights=model,
            decoder=decoder,
            examples=lambda g: example_inputs(plan, g, model.dtype, opts.device),
            eager_hints=hints,
            parallel=parallel_hooks(graphs["dit"], plan.ring.frame_tokens),
            source=source,
            device=opts.device,
            dtype=opts.dtype,
            describe={"attention": model.attention_impl, "precision": opts.precision},
        )


def parallel_hooks(step: DiTStep, frame_tokens: int) -> ParallelHooks:
    """Context parallel over the DiT: `forward_step`'s `attend`/`shard` hooks, the KV ring sharded."""
    model = step.model
    return ParallelHooks(
        steps={"dit": step.forward},
        frame_tokens=frame_tokens,
        num_heads=model.cfg.num_heads,
        kv_rings=("ring_k", "ring_v"),
        broadcast=("encode_prompt",),
        attention=model.attention_impl,
    )


def example_inputs(plan, graph: str, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Call inputs like a session's first steady block, for tracing (random values, real positions)."""
    gen = torch.Generator(device=device).manual_seed({"dit": 0, "encode_prompt": 1}.get(graph, 2))
    sig = plan.graphs[graph]
    values = plan.ring.values(len(plan.sequence)) if plan.ring else {}
    out = []
    for arg in sig.args:
        decl = plan.state.get(arg) or plan.constants.get(arg) or plan.draws.get(arg)
        if arg in values:
            out.append(torch.tensor(values[arg], dtype=torch.int64, device=device))
        elif arg == "t":
            out.append(plan.constants["t_steady_0"].allocate(device))
        elif arg in ("x", "latents"):
            out.append(torch.randn(plan.latents.shape, generator=gen, device=device))
        elif arg == "prompt_embeds":
            out.append(torch.randn(plan.inputs[arg].shape, generator=gen, device=device))
        elif decl is not None and graph == "decode_first":
            out.append(decl.allocate(device))
        elif decl is not None:
            out.append(torch.randn(decl.shape, generator=gen, device=device).to(decl.torch_dtype()))
        else:  # pragma: no cover - plan.validate catches this
            raise InvalidArgumentError(f"graph '{graph}': no example for input '{arg}'")
    return tuple(out)


FAMILY = CausalWanFamily()
__all__ = ["FAMILY", "LATENT_CHANNELS", "Preset"]
