"""LingBot-World: camera-controlled worlds from a start image, moved through by a camera path given per block.

Two forms of one architecture (a Wan2.2-I2V-A14B-style DiT with a camera scale/shift in every
block, models/lingbot_dit.py): Fast, a causal stream of 3-frame blocks whose camera comes in as
the named inputs `poses`, `intrinsics` and `world_scale` before each block (plan.py), and Base,
the bidirectional two-expert clip sampler (UniPC + guidance). The start image is the `image`
input (set at creation or reset); it becomes the conditioning y through the Wan VAE encoder.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.decode_step import decoder_graphs
from flashdreams.models.decoders import choose_decoder
from flashdreams.models.families.lingbot.loader import load_image_encoder, load_networks
from flashdreams.models.families.lingbot.plan import LATENT_CHANNELS, build_base_plan, build_fast_plan
from flashdreams.models.families.lingbot.presets import PRESETS, Preset
from flashdreams.models.families.lingbot.steps import (
    CameraStep,
    ClipCameraStep,
    DiTCfgStep,
    DiTStep,
    EncodeImageStep,
    EncodePromptStep,
)
from flashdreams.models.families.wan21.steps import ClipDecodeStep
from flashdreams.models.family import Family, LoadedModel, LoadOptions, dtype_name, ring_length_hints, weights_source
from flashdreams.models.fp8_ring_shadow import shadow_block_n
from flashdreams.parallel.hooks import ParallelHooks


class LingBotFamily(Family):
    name = "lingbot"
    description = "LingBot-World: camera-controlled worlds from a start image (Fast causal stream, Base clips)"

    def presets(self) -> list[Preset]:
        return list(PRESETS)

    def preset_from_dict(self, d: Mapping) -> Preset:
        return Preset.from_dict(dict(d))

    def load(self, preset: Preset, opts: LoadOptions, weights: Mapping[str, torch.Tensor] | None = None) -> LoadedModel:
        """`preset` at opts' size and batch. `weights` (a state dict) replaces opts.source (loader.py's layouts)."""
        if opts.batch < 1:
            raise InvalidArgumentError(f"batch must be >= 1, got {opts.batch}")
        height, width = opts.height or preset.height, opts.width or preset.width
        lh, lw = preset.latent_size(height, width)
        nets = load_networks(preset, opts, weights)
        vae = load_image_encoder(preset, opts, weights)
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
        dt = dtype_name(opts.dtype)
        hints = None
        if preset.mode == "fast":
            nf = preset.num_frame_per_block
            dec = decoder_graphs(decoder, opts.batch, lh, lw, nf) if decoder else None
            model = nets["dit"]
            block_n = shadow_block_n(model, opts.device, opts.dtype)
            plan = build_fast_plan(preset, preset.model, opts.batch, height, width, dt, dec, block_n)
            graphs = {
                "dit": DiTStep(model, block_n),
                "encode_prompt": EncodePromptStep(model, negative=False),
                "encode_image": EncodeImageStep(vae, (lh, lw), nf * preset.image_blocks),
                "camera_first": CameraStep(model, True, nf, (lh, lw)),
                "camera": CameraStep(model, False, nf, (lh, lw)),
            }
            if dec is not None:
                graphs.update(dec.graphs)
            hints = ring_length_hints(plan.ring, model.attention_impl == "sdpa")
            parallel = ParallelHooks(
                steps={"dit": graphs["dit"].forward},
                frame_tokens=plan.ring.frame_tokens,
                num_heads=model.cfg.num_heads,
                kv_rings=("ring_k", "ring_v"),
                # Every rank must condition on the same prompt, image and camera path.
                broadcast=("encode_prompt", "encode_image", "camera_first", "camera"),
                attention=model.attention_impl,
            )

            identity = torch.nn.ModuleDict({"dit": model, "image_encoder": vae})
        else:
            nf = (preset.num_frames - 1) // 4 + 1
            dec = {"name": decoder.name, "frames": decoder.num_frames(nf, True)} if decoder else None
            plan = build_base_plan(preset, preset.model, opts.batch, height, width, dt, dec)
            graphs = {
                "camera_clip": ClipCameraStep((lh, lw), preset.model.patch_size),
                "encode_image": EncodeImageStep(vae, (lh, lw), nf),
            }
            for e in ("high", "low"):
                graphs[f"dit_{e}"] = DiTCfgStep(nets[e])
                graphs[f"encode_prompt_{e}"] = EncodePromptStep(nets[e], negative=True)
            if decoder is not None:
                graphs["decode"] = ClipDecodeStep(decoder, opts.batch, (lh, lw), 3)
            identity = torch.nn.ModuleDict({"high": nets["high"], "low": nets["low"], "image_encoder": vae})
            parallel = None  # Base is bidirectional (no KV ring): nothing for context parallel to shard
        source = weights_source(opts, weights, preset)
        return LoadedModel(
            plan=plan,
            graphs=graphs,
            weights=identity,
            decoder=decoder,
            examples=lambda g: example_inputs(plan, g, opts.device),
            eager_hints=hints,
            source=source,
            device=opts.device,
            dtype=opts.dtype,
            describe={"attention": opts.attention, "precision": opts.precision, "mode": preset.mode},
            parallel=parallel,
        )


def example_camera(batch: int, frames: int, height: int, width: int, device: torch.device | str = "cpu") -> dict:
    """A valid camera for tracing and stand-ins: a slow forward dolly with a small yaw, and a ~60 degree
    field of view at `height` x `width` (poses [B, frames, 4, 4], intrinsics [B, 4], world_scale [B])."""
    from flashdreams.models.camera_path import orbit_path

    poses = orbit_path(frames)
    f = 0.9 * width
    k = torch.tensor([f, f, width / 2, height / 2])
    return {
        "poses": poses.expand(batch, -1, -1, -1).to(device),
        "intrinsics": k.expand(batch, -1).to(device),
        "world_scale": torch.ones(batch, device=device),
    }


def example_inputs(plan, graph: str, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Call inputs for tracing `graph` (fd-build): seeded random values at the plan's shapes, a valid camera."""
    gen = torch.Generator(device=device).manual_seed(sum(map(ord, graph)))
    cam = example_camera(plan.batch, plan.inputs["poses"].shape[1], plan.meta["height"], plan.meta["width"], device)
    values = plan.ring.values(len(plan.sequence)) if plan.ring else {}
    out = []
    for arg in plan.graphs[graph].args:
        if arg in cam:
            out.append(cam[arg])
        elif arg in values:
            out.append(torch.tensor(values[arg], dtype=torch.int64, device=device))
        elif arg == "t":
            c = plan.constants.get("t_steady_0") or plan.constants["t_0"]
            out.append(c.allocate(device))
        elif arg in ("x", "latents"):
            out.append(torch.randn(plan.latents.shape, generator=gen, device=device))
        elif arg == "y":
            y = plan.state["y_all"]
            shape = (*y.shape[:2], plan.latents.shape[2], *y.shape[3:])
            out.append(torch.randn(shape, generator=gen, device=device))
        elif arg in plan.inputs:
            spec = plan.inputs[arg]
            value = torch.rand(spec.shape, generator=gen, device=device) if spec.units == "image" else None
            out.append(value if value is not None else torch.randn(spec.shape, generator=gen, device=device))
        else:
            # Base's expert graphs (dit_high, dit_low) take their expert's prompt keys (cross_k_high, ...)
            expert_state = plan.state.get(f"{arg}_{graph.rpartition('_')[2]}")
            decl = plan.state.get(arg) or expert_state or plan.constants.get(arg) or plan.draws.get(arg)
            if decl is None:  # pragma: no cover - plan.validate catches this
                raise InvalidArgumentError(f"graph '{graph}': no example for input '{arg}'")
            if arg == "cam_anchor":
                out.append(torch.eye(4, device=device).expand(decl.shape).contiguous())
            elif graph == "decode_first":
                out.append(decl.allocate(device))
            else:
                out.append(torch.randn(decl.shape, generator=gen, device=device).to(decl.torch_dtype()))
    return tuple(out)


FAMILY = LingBotFamily()
__all__ = ["FAMILY", "LATENT_CHANNELS", "Preset", "example_camera"]
