"""Causal Wan2.2 A14B (FastVideo): the two-expert streaming model, T2V and I2V.

Two Wan DiTs of the same shape (the high-noise and the low-noise expert), each with its own
KV ring, share one cross-attention cache made by the high-noise expert. The block plan
(plan.py) fixes which expert runs each denoising step when the plan is built, and commits
both rings after every block. Checkpoints: the release's diffusers folders `transformer/` and
`transformer_2/` (sharded indexes) or one file with those key prefixes (loader.py). I2V
prefills the start image's Wan VAE latent into both rings as block 0.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.checkpoint import read_state_dict
from flashdreams.models.decode_step import decoder_graphs
from flashdreams.models.decoders import choose_decoder
from flashdreams.models.families.wan22.loader import drop_unused_cross_kv_, expert_state_dicts, load_expert
from flashdreams.models.families.wan22.plan import LATENT_CHANNELS, build_plan
from flashdreams.models.families.wan22.presets import FIRST_BLOCK_FRAMES, PRESETS, Preset
from flashdreams.models.families.wan22.steps import (
    RING_BUFFERS,
    BlockPositionsStep,
    DiTStep,
    EncodePromptStep,
    EncodeStartImageStep,
    expert_graph,
    host_positions,
)
from flashdreams.models.family import Family, LoadedModel, LoadOptions, dtype_name, weights_source
from flashdreams.models.random_init import seeded_module
from flashdreams.models.wan_dit import WanDiT
from flashdreams.models.wan_vae import WanVAE, WanVAEConfig
from flashdreams.parallel.hooks import ParallelHooks

# Seed offsets of the random weights: the experts differ, as the released ones do.
SEED_OFFSETS = {"high": 0, "low": 1, "vae": 2}


class Wan22Family(Family):
    name = "wan22"
    description = "Causal Wan2.2 A14B (FastVideo): two streaming experts switched at a boundary timestep"

    def presets(self) -> list[Preset]:
        return list(PRESETS)

    def preset_from_dict(self, d: Mapping) -> Preset:
        return Preset.from_dict(dict(d))

    def build_experts(
        self, preset: Preset, opts: LoadOptions, weights: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, WanDiT]:
        """{"high": WanDiT, "low": WanDiT}: from a checkpoint (opts.source or `weights`) or seeded random weights."""
        if weights is not None or opts.source is not None:
            source = "<state dict>" if weights is not None else str(opts.source)
            sds = expert_state_dicts(weights if weights is not None else opts.source)
            experts = {}
            for e in ("high", "low"):
                experts[e] = load_expert(sds.pop(e), preset.model, e, opts.device, opts.dtype, source)
        else:
            if not (preset.builtin or opts.random_weights):
                raise InvalidArgumentError(
                    f"preset '{preset.name}' needs a checkpoint: pass --checkpoint DIR (the folder holding "
                    "transformer/ and transformer_2/), or --random-weights for speed runs"
                )
            experts = {}
            for e in ("high", "low"):
                with torch.device("meta"):
                    model = WanDiT(preset.model)
                experts[e] = seeded_module(
                    model, opts.weights_seed + SEED_OFFSETS[e], opts.device, opts.dtype, preset.builtin
                )
        drop_unused_cross_kv_(experts["low"])
        for model in experts.values():
            # No fuse_projections_(): it keeps a second copy of q/k/v (3 D^2 per layer, 6.3 GB per 14B
            # expert), and at D = 5120 the three separate GEMMs already run the tensor cores well.
            model.set_attention(opts.attention)
            model.set_precision(opts.precision, opts.fp8_keep)
        return experts

    def build_image_encoder(self, preset: Preset, opts: LoadOptions, latent_hw, use_random: bool):
        """The Wan VAE encoder of the start image: the decoder-weights file's encoder, or seeded random weights."""
        cfg = WanVAEConfig.from_dict(preset.vae or {})
        if use_random:
            with torch.device("meta"):
                vae = WanVAE(cfg, parts=("encoder",))
            vae = seeded_module(vae, opts.weights_seed + SEED_OFFSETS["vae"], opts.device, opts.dtype, preset.builtin)
        else:
            if not opts.decoder_weights:
                raise InvalidArgumentError(
                    f"preset '{preset.name}' encodes its start image with the Wan2.1 VAE: pass --decoder-weights "
                    "Wan2.1_VAE.safetensors (the release's .pth converted with fd-convert; original key layout)"
                )
            vae = WanVAE(cfg, parts=("encoder",))
            vae.load_weights(read_state_dict(opts.decoder_weights), source=str(opts.decoder_weights))
            vae = vae.to(opts.device, opts.dtype).eval().requires_grad_(False)
        return EncodeStartImageStep(vae, latent_hw)

    def load(self, preset: Preset, opts: LoadOptions, weights: Mapping[str, torch.Tensor] | None = None) -> LoadedModel:
        if opts.batch < 1:
            raise InvalidArgumentError(f"batch must be >= 1, got {opts.batch}")
        lh, lw = preset.latent_size(opts.height, opts.width)
        experts = self.build_experts(preset, opts, weights)
        random_ok = (opts.random_weights or opts.source is None) and weights is None
        name = preset.decoder if opts.decoder == "preset" else opts.decoder
        decoder = choose_decoder(
            name,
            opts.device,
            opts.dtype,
            builtin=preset.builtin,
            random_ok=random_ok,
            seed=opts.weights_seed,
            weights=opts.decoder_weights,
        )
        nf = preset.num_frame_per_block
        dec = decoder_graphs(decoder, opts.batch, lh, lw, nf) if decoder else None
        if dec is not None:  # block 0 is one latent frame: the first decode gives decoder.num_frames(1, True)
            dec.frames_first = decoder.num_frames(FIRST_BLOCK_FRAMES, True)
        plan = build_plan(preset, preset.model, opts.batch, (lh, lw), dtype_name(opts.dtype), dec)
        fs = plan.meta["ring"]["frame_seq_length"]
        steps = {e: DiTStep(m) for e, m in experts.items()}
        graphs = {
            **{expert_graph(e, f): steps[e] for f in (False, True) for e in steps},
            # One cross-attention cache for both experts, from the high-noise expert (as the reference).
            "encode_prompt": EncodePromptStep(experts["high"]),
            "block_positions": BlockPositionsStep(
                FIRST_BLOCK_FRAMES, nf, preset.sink_frames, preset.window_frames, fs
            ).to(opts.device),
        }
        weights_module = torch.nn.ModuleDict({"high": experts["high"], "low": experts["low"]})
        if preset.i2v:
            graphs["encode_image"] = self.build_image_encoder(preset, opts, (lh, lw), random_ok)
            weights_module["image_encoder"] = graphs["encode_image"]
        if dec is not None:
            graphs.update(dec.graphs)
        source = weights_source(opts, weights, preset)
        return LoadedModel(
            plan=plan,
            graphs=graphs,
            weights=weights_module,
            decoder=decoder,
            examples=lambda g: example_inputs(plan, g, opts.device),
            source=source,
            device=opts.device,
            dtype=opts.dtype,
            describe={"attention": experts["high"].attention_impl, "precision": opts.precision, "experts": 2},
            parallel=parallel_hooks(experts, fs, preset.i2v),
        )


def parallel_hooks(experts: Mapping[str, WanDiT], frame_tokens: int, i2v: bool) -> ParallelHooks:
    """Context parallel over both experts: each expert graph (steady and first) runs its expert's
    `forward_step` with the hooks, and both experts' KV rings are sharded alike. The plan has no
    ring rule (block 0 is shorter), so the sharded attention always masks by the device length."""
    return ParallelHooks(
        steps={expert_graph(e, first): m.forward_step for e, m in experts.items() for first in (False, True)},
        frame_tokens=frame_tokens,
        num_heads=experts["high"].cfg.num_heads,
        kv_rings=tuple(name for e in experts for name in RING_BUFFERS[e]),
        # Every rank must condition on the same prompt (and start image).
        broadcast=("encode_prompt", "encode_image") if i2v else ("encode_prompt",),
        attention=experts["high"].attention_impl,
    )


def example_inputs(plan, graph: str, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Call inputs like a session's block 0 (graphs of the first kind) or first steady block, for
    tracing: random values at the plan's shapes, real positions."""
    gen = torch.Generator(device=device).manual_seed(sorted(plan.graphs).index(graph))
    ring = plan.meta["ring"]
    first = graph.endswith("_first")
    nf = FIRST_BLOCK_FRAMES if first else plan.latents.shape[2]
    args = (ring["sink_frames"], ring["window_frames"], ring["frame_seq_length"])
    pos = host_positions(0 if first else 1, FIRST_BLOCK_FRAMES, plan.latents.shape[2], *args)
    lat = (*plan.latents.shape[:2], nf, *plan.latents.shape[3:])
    out = []
    for arg in plan.graphs[graph].args:
        if arg in pos:
            out.append(torch.tensor(pos[arg], dtype=torch.int64, device=device))
        elif arg == "block_index":
            out.append(torch.ones(plan.batch, dtype=torch.int64, device=device))
        elif arg == "t":
            out.append(plan.constants["t_steady_0"].allocate(device)[:, :nf].contiguous())
        elif arg in ("x", "latents"):
            out.append(torch.randn(lat, generator=gen, device=device))
        elif arg in plan.inputs:
            spec = plan.inputs[arg]
            out.append(torch.rand(spec.shape, generator=gen, device=device).to(spec.torch_dtype()))
        elif arg in ("ring_k", "ring_v"):
            d = plan.state[f"{arg}_high"]
            out.append(torch.randn(d.shape, generator=gen, device=device).to(d.torch_dtype()))
        elif arg in plan.state and graph == "decode_first":
            out.append(plan.state[arg].allocate(device))
        elif arg in plan.state:
            d = plan.state[arg]
            out.append(torch.randn(d.shape, generator=gen, device=device).to(d.torch_dtype()))
        else:  # pragma: no cover - plan.validate catches this
            raise InvalidArgumentError(f"graph '{graph}': no example for input '{arg}'")
    return tuple(out)


FAMILY = Wan22Family()
__all__ = ["FAMILY", "LATENT_CHANNELS", "Preset"]
