"""LingBot-World's block plans: the Fast causal stream and the Base clip sampler, as data.

Fast, per block: the camera graph turns the block's poses into every layer's camera scale/shift
(once; they do not depend on x or t) and remembers the last used pose; the block's slice of
the start image's conditioning y is copied out; then causal Wan's few-step loop (DiT call,
x0 = x - sigma*flow in float64, re-noise) with y and the camera in every call, the decode, and
the commit. Blocks 0 .. image_blocks-1 are their own kinds (each copies its own y slice;
block 0 also picks its poses differently); every later block is the steady kind.

Base, per block: one clip. The clip's camera tokens, then UniPC + guidance where each step's
guidance pair runs on the expert its timestep selects (`dit_high` while t >= boundary, then
`dit_low`): the expert switch is which graph a step calls, fixed when the plan is built.
"""

from __future__ import annotations

import torch

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.camera_rays import VAE_TIME
from flashdreams.models.decode_step import DecoderGraphs
from flashdreams.models.families.causal_wan.plan import (
    block_flops,
    decode_emit_ops,
    denoise_ops,
    ring_capacity,
    ring_state,
)
from flashdreams.models.families.lingbot.presets import Preset
from flashdreams.models.families.lingbot.steps import DIT_SIG, ENCODE_IMAGE_SIG, camera_sig
from flashdreams.models.family import BlockPlan, GraphSig, InputSpec, RingRule, TensorDecl, call
from flashdreams.models.fp8_ring_shadow import add_shadow_args, shadow_state, with_fp8_shadow
from flashdreams.models.samplers import timestep_name, unipc_cfg_ops, unipc_schedule
from flashdreams.models.scheduler import NUM_TRAIN_TIMESTEPS
from flashdreams.models.wan_config import I2V_COND_CHANNELS, WanConfig
from flashdreams.models.wan_flops import dit_forward_flops

LATENT_CHANNELS = 16
CAMERA_FEATURES = 1536


def fast_schedule(preset: Preset) -> tuple[list[float], list[float]]:
    """(timesteps, sigmas) of the Fast model's warped steps.

    As the Fast pipeline's flow-match scheduler builds them: s_i = linspace(sigma_max, 0, 1001)[i]
    (i < 1000), sigma_i = shift*s/(1 + (shift-1)*s), T_i = 1000*sigma_i (float32); step k takes the
    table entry i = 1000 - step_k: timestep T_i, cast to an integer when `integer_timesteps` (the
    model sees the integer), and sigma_i itself (not the entry nearest to the integer).
    """
    shift = preset.timestep_shift
    s = torch.linspace(preset.sigma_max, 0.0, NUM_TRAIN_TIMESTEPS + 1, dtype=torch.float32)[:-1]
    sigmas = shift * s / (1 + (shift - 1) * s)
    table = sigmas * NUM_TRAIN_TIMESTEPS
    bad = [k for k in preset.denoising_step_list if not 0 < int(k) <= NUM_TRAIN_TIMESTEPS]
    if bad or not preset.denoising_step_list:
        raise InvalidArgumentError(f"preset {preset.name}: warped steps must lie in (0, 1000]; got {bad or '[]'}")
    idx = [NUM_TRAIN_TIMESTEPS - int(k) for k in preset.denoising_step_list]
    ts = [float(table[i]) for i in idx]
    if preset.integer_timesteps:
        ts = [float(int(t)) for t in ts]
    return ts, [float(sigmas[i]) for i in idx]


class _Schedule:
    """What causal_wan's `denoise_ops` reads: the sigmas and their count."""

    def __init__(self, sigmas: list[float]) -> None:
        self.sigmas = tuple(sigmas)

    @property
    def num_steps(self) -> int:
        return len(self.sigmas)


def _text_inputs(cfg: WanConfig, b: int, negative: bool, program: tuple[dict, ...]) -> dict[str, InputSpec]:
    text = (b, cfg.text_len, cfg.text_dim)
    inputs = {
        "prompt_embeds": InputSpec(
            "prompt_embeds",
            text,
            meaning="umT5-XXL embeddings of the prompt; fewer rows are zero-padded (the reference pads to text_len)",
            units="embedding",
            pad_dim=1,
            required=True,
            program=program,
        )
    }
    if negative:
        inputs["negative_prompt_embeds"] = InputSpec(
            "negative_prompt_embeds",
            text,
            meaning="umT5-XXL embeddings of the negative prompt (the unconditional side of guidance; the release "
            "uses its default Chinese negative prompt); fewer rows are zero-padded",
            units="embedding",
            pad_dim=1,
            required=True,
            program=program,
        )
    return inputs


def _image_input(b: int, height: int, width: int) -> InputSpec:
    return InputSpec(
        "image",
        (b, 3, height, width),
        meaning="the start image, RGB channels first in [0, 1], at the session's height x width; it becomes the "
        "conditioning y (first-frame mask + Wan VAE latent of [image; black frames]). Set it at creation or with reset",
        units="image",
        low=0.0,
        high=1.0,
        when="reset",
        required=True,
        program=(call("encode_image", {"image": "image"}, {"y_all": "y_all"}),),
    )


def _intrinsics_input(b: int, height: int, width: int) -> InputSpec:
    return InputSpec(
        "intrinsics",
        (b, 4),
        meaning=f"pinhole intrinsics (fx, fy, cx, cy) in pixels of the session's {height}x{width} frames "
        "(rescale from the capture size first: fx, cx by width ratio, fy, cy by height ratio); fx, fy > 0",
        units="camera",
        labels=("fx", "fy", "cx", "cy"),
        rules=("positive_focal",),  # fx, fy > 0 (models/input_rules.py); the range bounds the rest
        low=0.0,
        high=1e6,
        required=True,
    )


def build_fast_plan(
    preset: Preset,
    cfg: WanConfig,
    batch: int,
    height: int,
    width: int,
    dtype: str,
    decoder: DecoderGraphs | None,
    fp8_block_n: int | None = None,
) -> BlockPlan:
    """The causal stream's plan for `batch` sessions at `height` x `width`; `fp8_block_n` (FP8 attention):
    with the ring's fp8 shadow, which every DiT call takes (models/fp8_ring_shadow.py)."""
    lh, lw = preset.latent_size(height, width)
    nf, kimg = preset.num_frame_per_block, preset.image_blocks
    fs = (lh // cfg.patch_size[1]) * (lw // cfg.patch_size[2])
    ring = RingRule(preset.sink_frames, preset.window_frames, fs, nf)
    b, layers, heads, hd = batch, cfg.num_layers, cfg.num_heads, cfg.head_dim
    lat = (b, LATENT_CHANNELS, nf, lh, lw)
    tokens = nf * fs
    state = {
        **ring_state(cfg, b, ring, dtype),
        **(shadow_state(layers, b, ring_capacity(ring), heads, hd, fp8_block_n) if fp8_block_n is not None else {}),
        "y_all": TensorDecl(
            "y_all",
            (b, I2V_COND_CHANNELS, nf * kimg, lh, lw),
            "float32",
            f"the start image's conditioning for the first {kimg} blocks (mask 4 + image latent 16 channels)",
        ),
        "cam_anchor": TensorDecl(
            "cam_anchor", (b, 4, 4), "float32", "the previous block's last used camera pose", rollback=True
        ),
        "cam_scale": TensorDecl(
            "cam_scale", (layers, b, tokens, cfg.dim), dtype, "every layer's camera scale", batch_dim=1
        ),
        "cam_shift": TensorDecl(
            "cam_shift", (layers, b, tokens, cfg.dim), dtype, "every layer's camera shift", batch_dim=1
        ),
    }
    if decoder is not None:
        state.update(decoder.state)
    encode = call("encode_prompt", {"prompt_embeds": "prompt_embeds"}, {"cross_k": "cross_k", "cross_v": "cross_v"})
    chunk = VAE_TIME * nf
    inputs = {
        **_text_inputs(cfg, b, False, (encode,)),
        "image": _image_input(b, height, width),
        "poses": InputSpec(
            "poses",
            (b, chunk, 4, 4),
            meaning=f"camera-to-world poses (OpenCV axes: x right, y down, z forward; [R t; 0 0 0 1]) of the next "
            f"block's {chunk} pixel frames: block 0 takes video frames 0..{chunk - 1} and uses poses 0, 4, 8, ...; "
            f"block k >= 1 takes frames {chunk}k-3 .. {chunk}k+{chunk - 4} and uses poses 3, 7, 11, ... (latent "
            "frame j is video frame 4j). Only the motion matters: poses are made relative frame to frame, the first "
            "anchored on the previous block's last used pose. Set them before every block",
            units="camera",
            rules=("rigid_transform",),
            required=True,
        ),
        "intrinsics": _intrinsics_input(b, height, width),
        "world_scale": InputSpec(
            "world_scale",
            (b,),
            meaning="translation unit: every relative translation is divided by it (fixed for a whole trajectory: "
            "its largest framewise translation between the poses the model sees, flashdreams.models.camera_rays."
            "world_scale_of); 0 leaves translations as they are",
            units="camera",
            low=0.0,
        ),
    }
    timesteps, sigmas = fast_schedule(preset)
    constants = {}
    for s, t in enumerate(timesteps):
        constants[f"t_steady_{s}"] = TensorDecl(f"t_steady_{s}", (b, nf), "float32", f"timestep of step {s}", t)
    constants["t_commit"] = TensorDecl("t_commit", (b, nf), "float32", "timestep of the commit", preset.context_noise)
    draws = {"noise": TensorDecl("noise", lat, "float32", "the block's initial noise")}
    for s in range(len(timesteps) - 1):
        draws[f"renoise_{s}"] = TensorDecl(f"renoise_{s}", lat, "float32", f"re-noise draw after step {s}")

    extra = {"y": "y", "cam_scale": "cam_scale", "cam_shift": "cam_shift"}

    def with_camera(ops: list[dict]) -> list[dict]:
        # causal_wan's loop, every DiT call given the block's y and camera modulation too.
        return [{**op, "args": {**op["args"], **extra}} if op.get("graph") == "dit" else op for op in ops]

    dit_args = {a: a for a in DIT_SIG.args}
    programs, sequence = {}, []
    for k in range(kimg + 1):
        kind = f"image_{k}" if k < kimg else "steady"
        first = k == 0
        cam = "camera_first" if first else "camera"
        src = min(k, kimg - 1)
        programs[kind] = [
            call(
                cam,
                {a: a for a in ("poses", "intrinsics", "world_scale", "cam_anchor")},
                {o: o for o in ("cam_scale", "cam_shift", "cam_last")},
            ),
            {"op": "copy", "src": "cam_last", "out": "cam_anchor"},
            {"op": "copy", "src": "y_all", "out": "y", "index": [2, src * nf, (src + 1) * nf]},
            *with_camera(denoise_ops("steady", _Schedule(sigmas))),
            {"op": "mark", "name": "denoise"},
            *decode_emit_ops("x0", first, decoder),
            call("dit", dit_args | {"x": "x0", "t": "t_commit"}, {}),
            {"op": "mark", "name": "commit"},
        ]
        if k < kimg:
            sequence.append(kind)
    graphs = {
        "dit": DIT_SIG,
        "encode_prompt": GraphSig("encode_prompt", ("prompt_embeds",), ("cross_k", "cross_v")),
        "encode_image": ENCODE_IMAGE_SIG,
        "camera_first": camera_sig(True),
        "camera": camera_sig(False),
    }
    if fp8_block_n is not None:
        graphs["dit"] = with_fp8_shadow(DIT_SIG)
        add_shadow_args(programs, ("dit",))
    if decoder is not None:
        graphs.update(decoder.sigs)
    flops = block_flops(cfg, programs, sequence, "steady", ring)
    cam_flops = camera_flops(cfg, tokens)
    meta = {
        "mode": "fast",
        "height": height,
        "width": width,
        "latent_hw": [lh, lw],
        "latent_channels": LATENT_CHANNELS,
        "frames_per_block_latent": nf,
        "video_frames_first": decoder.frames_first if decoder else None,
        "video_frames_steady": decoder.frames_steady if decoder else None,
        "decoder": decoder.name if decoder else None,
        "decoder_graphs": list(decoder.sigs) if decoder else [],
        "decoder_state": list(decoder.state_names) if decoder else [],
        "schedule": {"timesteps": timesteps, "sigmas": sigmas, "shift": preset.timestep_shift},
        "ring": {"sink_frames": ring.sink, "window_frames": ring.window, "frame_seq_length": fs},
        "camera": {
            "poses_per_block": chunk,
            "pose_frames_first": [VAE_TIME * i for i in range(nf)],
            "pose_frames_later": [VAE_TIME - 1 + VAE_TIME * i for i in range(nf)],
        },
        "num_layers": layers,
        "num_heads": heads,
        "head_dim": hd,
        "text_len": cfg.text_len,
        "text_dim": cfg.text_dim,
        "fps": 16,
        "block_flops": [f + cam_flops for f in flops],
    }
    plan = BlockPlan(
        family="lingbot",
        batch=b,
        graphs=graphs,
        state=state,
        inputs=inputs,
        constants=constants,
        draws=draws,
        programs=programs,
        sequence=sequence,
        steady="steady",
        latents=TensorDecl("latents", lat, "float32", "the block's final x0"),
        ring=ring,
        meta=meta,
    )
    plan.validate()
    return plan


def camera_flops(cfg: WanConfig, tokens: int) -> float:
    """Matmul FLOPs of one block's camera path: the projection (1536 -> D, 2 x D x D) and per layer 4 x D x D."""
    d = cfg.dim
    return float(2 * tokens * (CAMERA_FEATURES * d + 2 * d * d) + cfg.num_layers * 4 * 2 * tokens * d * d)


def expert_of(t: float, boundary: float) -> str:
    """The Base expert of a step: the high-noise one while t >= boundary (Wan2.2's rule)."""
    return "high" if t >= boundary else "low"


def build_base_plan(
    preset: Preset, cfg: WanConfig, batch: int, height: int, width: int, dtype: str, decoder: dict | None
) -> BlockPlan:
    """One clip per block: camera tokens, UniPC + guidance on the expert each step's timestep selects."""
    lh, lw = preset.latent_size(height, width)
    if preset.num_frames < 1 or (preset.num_frames - 1) % VAE_TIME:
        raise InvalidArgumentError(f"preset {preset.name}: num_frames must be 1 + 4k; got {preset.num_frames}")
    nf = (preset.num_frames - 1) // VAE_TIME + 1
    b, layers, heads, hd = batch, cfg.num_layers, cfg.num_heads, cfg.head_dim
    lat = (b, LATENT_CHANNELS, nf, lh, lw)
    tokens = nf * (lh // cfg.patch_size[1]) * (lw // cfg.patch_size[2])
    kv = (layers, 2 * b, cfg.text_len, heads, hd)
    state = {
        "y_all": TensorDecl("y_all", (b, I2V_COND_CHANNELS, nf, lh, lw), "float32", "I2V conditioning of the clip"),
        "cam_tokens": TensorDecl("cam_tokens", (b, tokens, CAMERA_FEATURES), "float32", "the clip's camera tokens"),
    }
    for e in ("high", "low"):
        state[f"cross_k_{e}"] = TensorDecl(
            f"cross_k_{e}", kv, dtype, f"{e}-noise expert's keys: prompt, negative", batch_dim=1
        )
        state[f"cross_v_{e}"] = TensorDecl(f"cross_v_{e}", kv, dtype, f"{e}-noise expert's values", batch_dim=1)
    encode = [
        call(
            f"encode_prompt_{e}",
            {"prompt_embeds": "prompt_embeds", "negative_prompt_embeds": "negative_prompt_embeds"},
            {"cross_k": f"cross_k_{e}", "cross_v": f"cross_v_{e}"},
        )
        for e in ("high", "low")
    ]
    inputs = _text_inputs(cfg, b, True, tuple(encode))
    frames = preset.num_frames
    inputs["image"] = _image_input(b, height, width)
    inputs["poses"] = InputSpec(
        "poses",
        (b, frames, 4, 4),
        meaning=f"camera-to-world poses (OpenCV axes) of the clip's {frames} video frames; latent frame j uses "
        "pose 4j, made relative frame to frame with translations divided by the clip's largest one",
        units="camera",
        rules=("rigid_transform",),
        required=True,
    )
    inputs["intrinsics"] = _intrinsics_input(b, height, width)
    timesteps, sigmas = unipc_schedule(preset.sampling_steps, preset.timestep_shift)
    boundary = preset.boundary_ratio * NUM_TRAIN_TIMESTEPS
    constants = {
        timestep_name(k): TensorDecl(timestep_name(k), (1,), "int64", f"model timestep of step {k}", float(t))
        for k, t in enumerate(timesteps)
    }
    draws = {"noise": TensorDecl("noise", lat, "float32", "the clip's initial noise x_0")}
    args = {"y": "y_all", "cam_tokens": "cam_tokens"}
    per_expert = {
        e: unipc_cfg_ops(
            sigmas,
            preset.guide_scale_high if e == "high" else preset.guide_scale_low,
            graph=f"dit_{e}",
            cond_args={**args, "cross_k": f"cross_k_{e}", "cross_v": f"cross_v_{e}"},
            uncond_args={},
            history=False,
            batched_outs=("cond", "uncond"),
        )
        for e in ("high", "low")
    }
    experts = [expert_of(t, boundary) for t in timesteps]
    program = [
        call("camera_clip", {"poses": "poses", "intrinsics": "intrinsics"}, {"cam_tokens": "cam_tokens"}),
        {"op": "copy", "src": "noise", "out": "x_0"},
        *(op for k, e in enumerate(experts) for op in per_expert[e][k]),
        {"op": "mark", "name": "denoise"},
    ]
    dit_sig = lambda e: GraphSig(f"dit_{e}", ("x", "t", "y", "cam_tokens", "cross_k", "cross_v"), ("cond", "uncond"))  # noqa: E731
    enc_sig = lambda e: GraphSig(  # noqa: E731
        f"encode_prompt_{e}", ("prompt_embeds", "negative_prompt_embeds"), ("cross_k", "cross_v")
    )
    graphs = {
        "dit_high": dit_sig("high"),
        "dit_low": dit_sig("low"),
        "encode_prompt_high": enc_sig("high"),
        "encode_prompt_low": enc_sig("low"),
        "encode_image": ENCODE_IMAGE_SIG,
        "camera_clip": GraphSig("camera_clip", ("poses", "intrinsics"), ("cam_tokens",)),
    }
    if decoder is not None:
        graphs["decode"] = GraphSig("decode", ("latents",), ("video",))
        program += [
            call("decode", {"latents": "latents"}, {"video": "video"}),
            {"op": "frames", "src": "video", "out": "frames"},
            {"op": "emit", "latents": "latents", "frames": "frames"},
        ]
    else:
        program.append({"op": "emit", "latents": "latents", "frames": None})
    program.append({"op": "mark", "name": "decode"})
    per_forward = dit_forward_flops(cfg, tokens, tokens)["total"] + camera_flops(cfg, tokens)
    meta = {
        "mode": "base",
        "height": height,
        "width": width,
        "latent_hw": [lh, lw],
        "latent_channels": LATENT_CHANNELS,
        "frames_per_block_latent": nf,
        "video_frames_first": decoder["frames"] if decoder else None,
        "video_frames_steady": decoder["frames"] if decoder else None,
        "decoder": decoder["name"] if decoder else None,
        "decoder_graphs": ["decode"] if decoder else [],
        "decoder_state": [],
        "schedule": {
            "solver": "unipc",
            "sampling_steps": preset.sampling_steps,
            "shift": preset.timestep_shift,
            "timesteps": timesteps,
            "sigmas": sigmas,
            "boundary_timestep": boundary,
            "experts": experts,
        },
        "num_layers": layers,
        "num_heads": heads,
        "head_dim": hd,
        "text_len": cfg.text_len,
        "text_dim": cfg.text_dim,
        "fps": 16,
        "block_flops": [2 * preset.sampling_steps * per_forward],
    }
    plan = BlockPlan(
        family="lingbot",
        batch=b,
        graphs=graphs,
        state=state,
        inputs=inputs,
        constants=constants,
        draws=draws,
        programs={"clip": program},
        sequence=["clip"],
        steady="clip",
        latents=TensorDecl("latents", lat, "float32", "the clip's sampled latents (the solver's final x0)"),
        meta=meta,
    )
    plan.validate()
    return plan
