"""OmniDreams single view: NVIDIA's streaming driving world model on the Cosmos DiT, as a session family.

Each session block is one chunk of 2 latent frames (8 video frames at 30 fps) conditioned on the
HD map around the ego car (`hdmap_video`, the chunk's rendered HD-map frames, encoded on the device;
or `hdmap`, its 16-channel latent, with the -latent presets) and on the scene
prompt; the first chunk continues a start frame (`image_latent`). The DiT loads from the
released `.pt` (`net.` prefix; converted with fd-convert); the padding-mask columns of its patch
embedding are dropped at load, as the reference's loader does. Decoder: TAEHV, the architecture
of the release's LightTAE (`--decoder-weights` for its weights).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.checkpoint import read_state_dict
from flashdreams.models.decode_step import decoder_graphs
from flashdreams.models.decoders import choose_decoder
from flashdreams.models.families.cosmos import build_dit, weights_source
from flashdreams.models.families.omnidreams.hdmap_encoder import LIGHTVAE, encoder_graphs
from flashdreams.models.families.omnidreams.plan import build_plan
from flashdreams.models.families.omnidreams.presets import PRESETS, Preset
from flashdreams.models.families.omnidreams.steps import ChunkStep, EncodePromptStep, InjectStep
from flashdreams.models.family import Family, LoadedModel, LoadOptions, dtype_name, ring_length_hints
from flashdreams.models.family import weights_source as source_label  # the cosmos name `weights_source` is taken
from flashdreams.models.fp8_ring_shadow import shadow_block_n
from flashdreams.models.random_init import init_random_
from flashdreams.models.wan_vae import WanVAE, WanVAEConfig
from flashdreams.parallel.hooks import ParallelHooks

HDMAP_PREFIX = "hdmap_vae."
HDMAP_FILE = "lightvaew2_1.safetensors"


class OmniDreamsFamily(Family):
    name = "omnidreams"
    description = "OmniDreams single view: a streaming driving world on the Cosmos DiT, conditioned on the HD map"

    def presets(self) -> list[Preset]:
        return list(PRESETS)

    def preset_from_dict(self, d: Mapping) -> Preset:
        return Preset.from_dict(dict(d))

    def build_hdmap_encoder(self, preset: Preset, opts: LoadOptions, weights) -> WanVAE:
        """The HD-map encoder (LightVAE as a narrow Wan VAE encoder): from `hdmap_vae.*` keys of the given state
        dict or a `lightvaew2_1.safetensors` beside the checkpoint, else seeded random weights (builtin / random)."""
        cfg = WanVAEConfig.from_dict(preset.hdmap_vae) if preset.hdmap_vae else LIGHTVAE
        vae = WanVAE(cfg, parts=("encoder",))
        sd = None
        if weights is not None and any(k.startswith(HDMAP_PREFIX) for k in weights):
            sd = {k[len(HDMAP_PREFIX) :]: v for k, v in weights.items() if k.startswith(HDMAP_PREFIX)}
        elif opts.source is not None:
            where = Path(opts.source)
            beside = (where if where.is_dir() else where.parent) / HDMAP_FILE
            if beside.is_file():
                sd = read_state_dict(beside)
            elif not opts.random_weights:
                raise InvalidArgumentError(
                    f"preset '{preset.name}' encodes the HD map with LightVAE: put {HDMAP_FILE} (the release's "
                    "lightvaew2_1 weights converted with fd-convert) next to the checkpoint, or use a "
                    "-latent preset and pass the HD-map latent as `hdmap`"
                )
        if sd is not None:
            vae.load_weights(sd, source="HD-map encoder weights")
        else:
            init_random_(vae, opts.weights_seed + 7)
        vae = vae.to(opts.device, opts.dtype).eval().requires_grad_(False)
        if torch.device(opts.device).type != "cuda":
            return vae
        # channels_last_3d and RMSNorm + SiLU in one pass: the 8-frame encode at 704x1280 took 43.8
        # ms instead of 51.7 (channels-last only) and 63.7 (neither): next12-h200/hdmap-encoder.json.
        # The narrow forms give cuDNN 32-channel inputs and 2-D convs where the width-24 layers ran
        # slow kernels (next64-h100/hdmap-conv-forms.json).
        return vae.use_channels_last().use_fused_norms().use_narrow_forms()

    def load(self, preset: Preset, opts: LoadOptions, weights: Mapping[str, torch.Tensor] | None = None) -> LoadedModel:
        if opts.batch < 1:
            raise InvalidArgumentError(f"batch must be >= 1, got {opts.batch}")
        lh, lw = preset.latent_size(opts.height, opts.width)
        model = build_dit(preset.model, opts, weights_source(preset, opts, weights), preset.builtin)
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
        dec = decoder_graphs(decoder, opts.batch, lh, lw, preset.len_t) if decoder else None
        enc = None
        if preset.hdmap_input == "pixels":
            vae = self.build_hdmap_encoder(preset, opts, weights)
            enc_graphs, enc_sigs, enc_decls, _ = encoder_graphs(vae, opts.batch, 8 * lh, 8 * lw)
            enc = (enc_sigs, enc_decls)
        block_n = shadow_block_n(model, opts.device, opts.dtype)
        plan = build_plan(preset, opts.batch, (lh, lw), dtype_name(opts.dtype), dec, enc, fp8_block_n=block_n)
        graphs = {
            "dit": ChunkStep(model, first=False, fp8_block_n=block_n),
            "dit_first": ChunkStep(model, first=True, fp8_block_n=block_n),
            "inject_image": InjectStep(),
            "encode_prompt": EncodePromptStep(model),
        }
        if dec is not None:
            graphs.update(dec.graphs)
        if enc is not None:
            graphs.update(enc_graphs)
        hints = ring_length_hints(plan.ring, model.attention_impl == "sdpa", ("dit", "dit_first"))
        parallel = ParallelHooks(
            steps={name: graphs[name].forward for name in ("dit", "dit_first")},
            frame_tokens=plan.ring.frame_tokens,
            num_heads=model.cfg.num_heads,
            kv_rings=("ring_k", "ring_v"),
            # Every rank must attend to the same text. The HD-map encoder is not broadcast: it updates its
            # streaming state in place (a broadcast call works on copies), and every rank sets the same inputs.
            broadcast=("encode_prompt",),
            attention=model.attention_impl,
        )

        return LoadedModel(
            plan=plan,
            graphs=graphs,
            weights=model,
            decoder=decoder,
            examples=lambda g: example_inputs(plan, g, opts.device),
            eager_hints=hints,
            source=source_label(opts, weights, preset),
            device=opts.device,
            dtype=opts.dtype,
            describe={"attention": model.attention_impl, "precision": opts.precision},
            parallel=parallel,
        )


def example_inputs(plan, graph: str, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Call inputs like a session's first steady block, for tracing (random values, real ring positions)."""
    gen = torch.Generator(device=device).manual_seed(sorted(plan.graphs).index(graph))
    values = plan.ring.values(len(plan.sequence))
    out = []
    for arg in plan.graphs[graph].args:
        decl = plan.inputs.get(arg) or plan.state.get(arg) or plan.constants.get(arg) or plan.draws.get(arg)
        if arg in values:
            out.append(torch.tensor(values[arg], dtype=torch.int64, device=device))
        elif arg == "t":
            out.append(plan.constants["t_0"].allocate(device))
        elif arg in ("x", "x0", "latents"):
            out.append(torch.randn(plan.latents.shape, generator=gen, device=device))
        elif decl is not None and graph == "decode_first":
            out.append(decl.allocate(device))
        elif decl is not None:
            out.append(torch.randn(decl.shape, generator=gen, device=device).to(decl.torch_dtype()))
        else:  # pragma: no cover - plan.validate catches this
            raise InvalidArgumentError(f"graph '{graph}': no example for input '{arg}'")
    return tuple(out)


FAMILY = OmniDreamsFamily()
__all__ = ["FAMILY", "Preset"]
