"""FlashVSR: streaming 4x video super-resolution (v1 "Tiny" pipeline) on the family seam.

A session takes low-resolution frames per block (`lq_frames`) and streams the upscaled video:
LQ projector -> one-step Wan-1.3B DiT with LCSA block-sparse attention over a window cache ->
LQ-conditioned TC decoder -> AdaIN colour fix. See plan.py for the chunking.

Weights: a directory with the released files (`diffusion_pytorch_model_streaming_dmd.safetensors`,
`LQ_proj_in.safetensors`, `TCDecoder.safetensors`; the two `.ckpt` files converted with
`fd-convert`), or one state dict whose keys carry the prefixes `dit.`, `LQ_proj_in.` and
`TCDecoder.`; or the built-in / random weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import torch

from flashdreams.errors import InvalidArgumentError, NotFoundError
from flashdreams.models.checkpoint import read_state_dict, strip_prefixes, validate_and_load
from flashdreams.models.families.flashvsr.lq_proj import LQProjector
from flashdreams.models.families.flashvsr.plan import build_plan, cache_schedule, kind_names, ring_slabs, valid_slabs
from flashdreams.models.families.flashvsr.presets import PRESETS, Preset
from flashdreams.models.families.flashvsr.steps import (
    FIRST_LQ_FRAMES,
    STEADY_LQ_FRAMES,
    DiTChunkStep,
    EncodePromptStep,
    PrepareStep,
    TCDecodeStep,
)
from flashdreams.models.families.flashvsr.tcdecoder import TCDecoder, tc_config
from flashdreams.models.family import Family, LoadedModel, LoadOptions, dtype_name
from flashdreams.models.random_init import init_random_
from flashdreams.models.wan_dit import WanDiT
from flashdreams.models.wan_loader import load_wan_dit

DIT_FILE = "diffusion_pytorch_model_streaming_dmd.safetensors"
LQ_FILE = "LQ_proj_in.safetensors"
TC_FILE = "TCDecoder.safetensors"
PREFIXES = {"dit": "dit.", "lq": "LQ_proj_in.", "tc": "TCDecoder."}


def _split(weights: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A combined state dict -> {"dit", "lq", "tc"} parts (prefixes removed; absent parts are empty)."""
    return {part: {k[len(p) :]: v for k, v in weights.items() if k.startswith(p)} for part, p in PREFIXES.items()}


def _read_dir(path: Path, decoder_weights: str | None) -> dict[str, dict[str, torch.Tensor]]:
    if path.is_file():
        return _split(read_state_dict(path))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for part, name in (("dit", DIT_FILE), ("lq", LQ_FILE), ("tc", TC_FILE)):
        f = Path(decoder_weights) if part == "tc" and decoder_weights else path / name
        if f.is_file():
            parts[part] = strip_prefixes(read_state_dict(f))
            continue
        # A DiT file that carries the projector or decoder under their prefixes serves for them too.
        inside = _split(parts["dit"])[part] if part != "dit" else {}
        if inside or part == "tc":
            parts[part] = inside
            continue
        hint = " (convert the released .ckpt with `fd-convert`)" if name != DIT_FILE else ""
        raise NotFoundError(f"FlashVSR checkpoint '{path}': '{name}' is missing{hint}")
    dit = parts["dit"]
    if any(k.startswith(p) for k in dit for p in (PREFIXES["lq"], PREFIXES["tc"])):
        parts["dit"] = {k: v for k, v in dit.items() if not k.startswith((PREFIXES["lq"], PREFIXES["tc"]))}
    return parts


class TCDecoderHandle:
    """What the runtime and fd-build read of a family's decoder: a name and the one module with its weights.

    The decoding itself runs as the plan's `decode_first` / `decode` graphs (steps.TCDecodeStep).
    """

    name = "tcdecoder"

    def __init__(self, model: TCDecoder) -> None:
        self.model = model
        self.device = model.decoder[1].weight.device
        self.dtype = model.decoder[1].weight.dtype


class FlashVSRFamily(Family):
    name = "flashvsr"
    description = "FlashVSR: one-step streaming video super-resolution (LQ frames in, 4x frames out)"

    def presets(self) -> list[Preset]:
        return list(PRESETS)

    def preset_from_dict(self, d: Mapping) -> Preset:
        return Preset.from_dict(dict(d))

    def build(self, preset: Preset, opts: LoadOptions, weights: Mapping[str, torch.Tensor] | None = None):
        """(DiT, LQ projector, TC decoder or None): from a checkpoint, a state dict, or seeded random weights."""
        dev, dt = opts.device, opts.dtype
        if opts.decoder not in (None, "preset", "tcdecoder"):
            raise InvalidArgumentError(
                f"decoder '{opts.decoder}': FlashVSR decodes with its own LQ-conditioned TC decoder "
                "(decoder 'preset' or 'tcdecoder'), or none for latents only"
            )
        want_decoder = preset.decoder is not None and opts.decoder is not None
        parts = None
        if weights is not None:
            parts = _split(weights)
        elif opts.source is not None:
            parts = _read_dir(Path(opts.source), opts.decoder_weights)
        if parts is None and not (preset.builtin or opts.random_weights):
            raise InvalidArgumentError(
                f"preset '{preset.name}' needs a checkpoint: pass the FlashVSR directory, "
                "or --random-weights for speed runs"
            )
        with torch.device("meta"):  # materialised on the device below: no full-size CPU copy first
            lq = LQProjector(preset.lq_proj)
            tc = TCDecoder(tc_config(preset.tc_channels)) if want_decoder else None
        lq = lq.to_empty(device=dev).to(dt)
        tc = tc.to_empty(device=dev).to(dt) if tc is not None else None
        if parts is not None:
            dit = load_wan_dit(parts["dit"], preset.model, device=dev, dtype=dt)
            validate_and_load(
                lq, parts["lq"], "LQ_proj_in", hint=f"expected Buffer_LQ4x_Proj keys for {preset.lq_proj}"
            )
            if tc is not None:
                if not parts["tc"]:
                    raise NotFoundError(
                        f"preset '{preset.name}' decodes with the TC decoder: give {TC_FILE} (--decoder-weights) "
                        "or run without a decoder (latents only)"
                    )
                tc.load_weights(parts["tc"], "TCDecoder")
        else:
            with torch.device("meta"):
                dit = WanDiT(preset.model)
            dit = dit.to_empty(device=dev).to(dt)
            gen_dev = "cpu" if preset.builtin or dev.type == "cpu" else dev
            init_random_(dit, opts.weights_seed, gen_dev)
            init_random_(lq, opts.weights_seed + 1, gen_dev)
            if tc is not None:
                init_random_(tc, opts.weights_seed + 2, gen_dev)
        dit = dit.eval().requires_grad_(False)
        dit.fuse_projections_()  # one q/k/v GEMM (state-dict keys unchanged)
        dit.set_attention(opts.attention)
        lq = lq.to(dev, dt).eval().requires_grad_(False)
        if tc is not None:
            tc = tc.to(dev, dt).in_device_layout(tc_channels_last()).eval().requires_grad_(False)
        return dit, lq, tc

    def load(self, preset: Preset, opts: LoadOptions, weights: Mapping[str, torch.Tensor] | None = None) -> LoadedModel:
        height, width = opts.height or preset.height, opts.width or preset.width
        preset.check_size(height, width)
        if opts.precision != "bf16":
            raise InvalidArgumentError(
                f"FlashVSR runs in the model dtype only (precision 'bf16'); got '{opts.precision}'"
            )
        dit, lq, tc = self.build(preset, opts, weights)
        mem_shapes = None
        if tc is not None:
            st = tc.new_decode_state(opts.batch, height // 8, width // 8, opts.device)
            mem_shapes = [tuple(m.shape) for m in st.memory]
        plan = build_plan(preset, opts.batch, height, width, dtype_name(opts.dtype), mem_shapes)
        schedule = cache_schedule(preset.kv_ratio)
        attn = {"topk": plan.meta["topk"], "local_range": preset.local_range, "mode": preset.attention_mode}
        graphs = {
            "encode_prompt": EncodePromptStep(dit),
            "prepare_first": PrepareStep(FIRST_LQ_FRAMES, preset.scale),
            "prepare": PrepareStep(STEADY_LQ_FRAMES, preset.scale),
        }
        ring = ring_slabs(schedule)
        for kind, valid in zip(kind_names(schedule), valid_slabs(schedule)):
            graphs[f"dit_{kind}"] = DiTChunkStep(dit, lq, kind == "first", ring, valid, **attn)
        if tc is not None:
            graphs["decode_first"], graphs["decode"] = TCDecodeStep(tc, True), TCDecodeStep(tc, False)
        if opts.source is not None:
            source = str(opts.source)
        elif weights is not None:
            source = "<state dict>"
        else:
            source = ("builtin:" if preset.builtin else "random:") + preset.name
        examples = partial(example_inputs, plan, opts.device, opts.dtype)
        weights_module = torch.nn.ModuleDict({"dit": dit, "LQ_proj_in": lq} | ({"TCDecoder": tc} if tc else {}))
        return LoadedModel(
            plan=plan,
            graphs=graphs,
            weights=weights_module,
            decoder=TCDecoderHandle(tc) if tc is not None else None,
            examples=examples,
            source=source,
            device=opts.device,
            dtype=opts.dtype,
            describe={"attention": dit.attention_impl, "attention_mode": preset.attention_mode, "topk": attn["topk"]},
        )


# Shapes of the buffers a block program makes between graph calls (the rest are plan declarations).
def _intermediates(plan) -> dict[str, tuple[int, ...]]:
    b, _, _, lh, lw = plan.latents.shape
    h, w = plan.meta["height"], plan.meta["width"]
    return {
        "lq_first": (b, 3, FIRST_LQ_FRAMES, h, w),
        "lq_video": (b, 3, STEADY_LQ_FRAMES, h, w),
        "x": (b, 16, 2, lh, lw),
        "latents_first": plan.latents.shape,
        "latents": (b, 16, 2, lh, lw),
    }


def example_inputs(plan, device: torch.device, dtype: torch.dtype, graph: str) -> tuple[torch.Tensor, ...]:
    """Call inputs of `graph` like a session's (random values, the steady block's index), for tracing."""
    gen = torch.Generator().manual_seed(sum(map(ord, graph)))
    sig, shapes = plan.graphs[graph], _intermediates(plan)
    first = graph.endswith("_first") or graph == "decode_first"
    out = []
    for arg in sig.args:
        decl = plan.state.get(arg) or plan.draws.get(arg)
        if arg == "block_index":
            t = torch.full(decl.shape, len(plan.sequence), dtype=torch.int64)
        elif arg == "lq_frames":
            t = torch.randint(0, 256, plan.inputs[arg].shape, generator=gen).float()
        elif arg in ("lq_video", "x", "latents"):
            name = {"lq_video": "lq_first", "latents": "latents_first", "x": "latents_first"}[arg] if first else arg
            t = torch.randn(shapes[name], generator=gen)
            t = t.clamp(-1, 1) if arg == "lq_video" else t
        elif arg in plan.inputs:
            t = torch.randn(plan.inputs[arg].shape, generator=gen)
        elif decl is not None:
            t = torch.randn(decl.shape, generator=gen).to(decl.torch_dtype())
        else:  # pragma: no cover - plan.validate catches this
            raise InvalidArgumentError(f"graph '{graph}': no example for input '{arg}'")
        out.append(t.to(device))
    return tuple(out)


def tc_channels_last() -> bool:
    """Whether the TC decoder runs its convs NHWC on CUDA (the default, as its reference does):
    FD_TC_DECODER_LAYOUT=nchw keeps NCHW, for the A/B the suite's vsr-tc-layout part measures."""
    layout = os.environ.get("FD_TC_DECODER_LAYOUT", "nhwc")
    if layout not in ("nhwc", "nchw"):
        raise InvalidArgumentError(f"FD_TC_DECODER_LAYOUT must be 'nhwc' or 'nchw', got {layout!r}")
    return layout == "nhwc"


FAMILY = FlashVSRFamily()
__all__ = ["FAMILY", "Preset"]
