"""Matrix-Game 2.0 (Skywork): an interactive world steered by keyboard and mouse, block by block.

A causal Wan2.1-1.3B-style image-to-video DiT, distilled with Self-Forcing to 3 (templerun: 4)
steps, with action modules in its first 15 blocks. From one start image, each block makes 3
latent frames (12 video frames; 9 for block 0) from the actions of those frames (session inputs
`keyboard` and `mouse`). Every cache is bounded (6 frames; gta_drive 4), so a session runs
forever. Checkpoints: the released `*.safetensors` (`model.` + CausalWanModel keys); the start
image's encoders (CLIP ViT-H/14, Wan VAE encoder) as safetensors beside it, as for Wan2.1-I2V.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.checkpoint import read_state_dict, strip_prefixes
from flashdreams.models.clip_vision import ClipVision, ClipVisionConfig
from flashdreams.models.decode_step import decoder_graphs
from flashdreams.models.decoders import choose_decoder
from flashdreams.models.families.matrixgame.loader import load_matrixgame_dit
from flashdreams.models.families.matrixgame.plan import LATENT_CHANNELS, build_plan
from flashdreams.models.families.matrixgame.presets import MODE_KEYS, PRESETS, Preset
from flashdreams.models.families.matrixgame.steps import (
    ActionWindowStep,
    DiTStep,
    EncodeContextStep,
    EncodeImageStep,
)
from flashdreams.models.family import (
    Family,
    InputSpec,
    LoadedModel,
    LoadOptions,
    dtype_name,
    ring_length_hints,
    weights_source,
)
from flashdreams.models.fp8_ring_shadow import shadow_block_n
from flashdreams.models.matrixgame_dit import MatrixGameDiT
from flashdreams.models.random_init import seeded_module
from flashdreams.models.wan_vae import WanVAE, WanVAEConfig

CLIP_FILE_GLOB = "models_clip_*.safetensors"
VAE_FILE = "Wan2.1_VAE.safetensors"


class MatrixGameFamily(Family):
    name = "matrixgame"
    description = "Matrix-Game 2.0: an image-started world steered by keyboard and mouse (causal Wan + action modules)"

    def presets(self) -> list[Preset]:
        return list(PRESETS)

    def preset_from_dict(self, d: Mapping) -> Preset:
        return Preset.from_dict(dict(d))

    def build_dit(
        self, preset: Preset, opts: LoadOptions, weights: Mapping[str, torch.Tensor] | None = None
    ) -> MatrixGameDiT:
        """The DiT of `preset`: from a checkpoint (opts.source or `weights`), or seeded random weights."""
        if weights is not None or opts.source is not None:
            src = weights if weights is not None else opts.source
            model = load_matrixgame_dit(
                src, preset.model, preset.action, preset.visual_context_dim, opts.device, opts.dtype
            )
        else:
            if not (preset.builtin or opts.random_weights):
                raise InvalidArgumentError(
                    f"preset '{preset.name}' needs a checkpoint ({preset.checkpoint or 'the release'}): pass "
                    "--checkpoint FILE, or --random-weights for speed runs"
                )
            with torch.device("meta"):
                model = MatrixGameDiT(preset.model, preset.action, preset.visual_context_dim)
            model = seeded_module(model, opts.weights_seed, opts.device, opts.dtype, preset.builtin)
        model.fuse_projections_()
        model.set_attention(opts.attention)
        # FP8 as for the causal Wan DiT it extends: the blocks' per-token linears and the ring attention; the
        # action modules, embeddings and head stay in the model's dtype.
        model.set_precision(opts.precision, opts.fp8_keep)
        return model

    def _encoder_weights(self, preset: Preset, opts: LoadOptions):
        """(CLIP state dict, VAE state dict) of the start-image encoders, or (None, None) for random ones."""
        if opts.source is None:
            return None, None
        where = Path(opts.source)
        folder = where if where.is_dir() else where.parent
        clips = sorted(folder.glob(CLIP_FILE_GLOB))
        vae = folder / VAE_FILE
        if len(clips) != 1 or not vae.is_file():
            raise InvalidArgumentError(
                f"preset '{preset.name}' encodes its start image with the CLIP vision tower and the Wan VAE encoder: "
                f"put {CLIP_FILE_GLOB.replace('*', '<...>')} and {VAE_FILE} (the release's .pth files converted "
                "with fd-convert) next to the checkpoint"
            )
        return strip_prefixes(read_state_dict(clips[0])), strip_prefixes(read_state_dict(vae))

    def build_image_encoder(self, preset: Preset, opts: LoadOptions, latent_hw) -> EncodeImageStep:
        clip_cfg = ClipVisionConfig.from_dict(preset.clip or {})
        vae_cfg = WanVAEConfig.from_dict(preset.vae or {})
        if clip_cfg.dim != preset.visual_context_dim:
            raise InvalidArgumentError(
                f"preset {preset.name}: CLIP width {clip_cfg.dim} != visual_context_dim {preset.visual_context_dim}"
            )
        clip_sd, vae_sd = self._encoder_weights(preset, opts)
        if clip_sd is None:
            with torch.device("meta"):
                clip = ClipVision(clip_cfg)
                vae = WanVAE(vae_cfg, parts=("encoder",))
            clip = seeded_module(clip, opts.weights_seed + 1, opts.device, opts.dtype, preset.builtin)
            vae = seeded_module(vae, opts.weights_seed + 2, opts.device, opts.dtype, preset.builtin)
        else:
            clip = ClipVision(clip_cfg)
            clip.load_weights(clip_sd, source="CLIP weights")
            vae = WanVAE(vae_cfg, parts=("encoder",))
            vae.load_weights(vae_sd, source="VAE weights")
            clip = clip.to(opts.device, opts.dtype).eval().requires_grad_(False)
            vae = vae.to(opts.device, opts.dtype).eval().requires_grad_(False)
        return EncodeImageStep(clip, vae, latent_hw, preset.cond_frames)

    def input_specs(self, preset: Preset, opts: LoadOptions, conditioning: str = "image") -> dict[str, InputSpec]:
        latent_hw = preset.latent_size(opts.height, opts.width)
        return build_plan(preset, opts.batch, latent_hw, dtype_name(opts.dtype), None, conditioning).inputs

    def load(
        self,
        preset: Preset,
        opts: LoadOptions,
        weights: Mapping[str, torch.Tensor] | None = None,
        conditioning: str = "image",
    ) -> LoadedModel:
        """`preset` at opts' size and batch. `weights` (a DiT state dict) replaces opts.source;
        `conditioning="tensors"` takes the CLIP tokens and cond_concat as inputs instead of an image."""
        if opts.batch < 1:
            raise InvalidArgumentError(f"batch must be >= 1, got {opts.batch}")
        latent_hw = preset.latent_size(opts.height, opts.width)
        model = self.build_dit(preset, opts, weights)
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
        nf = preset.num_frame_per_block
        dec = decoder_graphs(decoder, opts.batch, *latent_hw, nf) if decoder is not None else None
        block_n = shadow_block_n(model, opts.device, opts.dtype)
        plan = build_plan(preset, opts.batch, latent_hw, dtype_name(opts.dtype), dec, conditioning, block_n)
        act = preset.action
        graphs = {
            "dit": DiTStep(model, block_n),
            "actions": ActionWindowStep(nf, act.vae_time_compression_ratio, act.window, act.enable_mouse).to(
                opts.device
            ),
            "encode_context": EncodeContextStep(model),
        }
        weights_module = torch.nn.ModuleDict({"dit": model})
        if conditioning == "image":
            graphs["encode_image"] = self.build_image_encoder(preset, opts, latent_hw)
            weights_module["image_encoder"] = graphs["encode_image"]
        if dec is not None:
            graphs.update(dec.graphs)
        hints = ring_length_hints(plan.ring, model.attention_impl == "sdpa")

        source = weights_source(opts, weights, preset)
        return LoadedModel(
            plan=plan,
            graphs=graphs,
            weights=weights_module,
            decoder=decoder,
            examples=lambda g: example_inputs(plan, g, opts.device),
            eager_hints=hints,
            source=source,
            device=opts.device,
            dtype=opts.dtype,
            describe={"attention": model.attention_impl, "precision": opts.precision, "mode": preset.mode},
        )


def example_inputs(plan, graph: str, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Call inputs like a session's first steady block, for tracing `graph` (fd-build)."""
    gen = torch.Generator(device=device).manual_seed(sum(map(ord, graph)))
    values = plan.ring.values(len(plan.sequence))
    nf, lat = plan.meta["frames_per_block_latent"], plan.latents.shape
    b = plan.batch
    win = plan.state["keyboard_hist"].shape[1]
    temporaries = {
        "keyboard_win": (b, nf, win, len(plan.meta["keys"])),
        "mouse_win": (b, nf, win, 2),
    }
    out = []
    for arg in plan.graphs[graph].args:
        if arg in values:
            out.append(torch.tensor(values[arg], dtype=torch.int64, device=device))
        elif arg == "block_index":
            out.append(torch.full((b,), len(plan.sequence), dtype=torch.int64, device=device))
        elif arg == "t":
            out.append(plan.constants["t_0"].allocate(device))
        elif arg in ("x", "latents"):
            out.append(torch.randn(lat, generator=gen, device=device))
        elif arg in temporaries:
            out.append(torch.rand(temporaries[arg], generator=gen, device=device))
        elif arg in plan.inputs:
            spec = plan.inputs[arg]
            lo = spec.low if spec.low is not None else 0.0
            hi = spec.high if spec.high is not None else 1.0
            out.append((lo + (hi - lo) * torch.rand(spec.shape, generator=gen, device=device)).to(spec.torch_dtype()))
        elif arg in plan.state:
            decl = plan.state[arg]
            if graph.startswith("decode"):
                out.append(decl.allocate(device))
            else:
                out.append(torch.randn(decl.shape, generator=gen, device=device).to(decl.torch_dtype()))
        else:  # pragma: no cover - plan.validate catches this
            raise InvalidArgumentError(f"graph '{graph}': no example for input '{arg}'")
    return tuple(out)


FAMILY = MatrixGameFamily()
__all__ = ["FAMILY", "LATENT_CHANNELS", "MODE_KEYS", "Preset"]
