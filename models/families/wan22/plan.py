"""The block plan of causal Wan2.2 A14B: FastVideo's two-expert streaming loop as data.

Per block: the 8-step denoise where each step's graph (`dit_high` or `dit_low`) and its x0 /
re-noise coefficients are fixed here, when the plan is built (the step list is static, so no
captured block branches on the timestep); the decode of the final x0 and the frames handed
out; then the commit: the low-noise expert, then the high-noise expert, each run on the final
x0 at `context_noise`, rewriting the block's K/V in its own ring. One cross-attention cache,
filled from the prompt by the high-noise expert, serves both (as the reference shares it).

Block 0 is one latent frame (FIRST_BLOCK_FRAMES) with constant positions (kind "first"; for
I2V kind "prefill": the start image's latent, committed into both rings, no denoising); every
later block is `num_frame_per_block` frames (kind "steady") whose RoPE positions, ring slots
and valid length the `block_positions` graph derives from the device-side block index.
"""

from __future__ import annotations

from flashdreams.models.decode_step import DecoderGraphs
from flashdreams.models.families.causal_wan.plan import LATENT_CHANNELS, decode_emit_ops
from flashdreams.models.families.wan22.presets import FIRST_BLOCK_FRAMES, Preset
from flashdreams.models.families.wan22.schedule import MoESchedule
from flashdreams.models.families.wan22.steps import (
    ENCODE_IMAGE_SIG,
    ENCODE_SIG,
    EXPERT_OF_GRAPH,
    POSITIONS_SIG,
    RING_BUFFERS,
    expert_graph,
    expert_sig,
    host_positions,
)
from flashdreams.models.family import BlockPlan, InputSpec, TensorDecl, call, lincomb, ring_tables
from flashdreams.models.wan_config import WanConfig
from flashdreams.models.wan_flops import dit_forward_flops

POSITION_BUFFERS = ("frame_positions", "slots", "valid_len")


def _dit_call(expert: str, x: str, t: str, kind: str, outs: dict) -> dict:
    ring_k, ring_v = RING_BUFFERS[expert]
    pos = {n: (n if kind == "steady" else f"{n}_first") for n in POSITION_BUFFERS}
    args = {"x": x, "t": t, "cross_k": "cross_k", "cross_v": "cross_v", "ring_k": ring_k, "ring_v": ring_v, **pos}
    return call(expert_graph(expert, kind != "steady"), args, outs)


def draw_names(kind: str, steps: int) -> tuple[str, list[str]]:
    """The noise draw and the re-noise draws (one after every step but the last) of a block kind."""
    sfx = "" if kind == "steady" else "_first"
    return f"noise{sfx}", [f"renoise{sfx}_{i}" for i in range(steps - 1)]


def denoise_ops(kind: str, sched: MoESchedule) -> list[dict]:
    """The two-expert loop: each step's expert and update are chosen here, once."""
    noise, renoise = draw_names(kind, sched.num_steps)
    ops, x = [], noise
    for i, step in enumerate(sched.steps):
        ops.append(_dit_call(step.expert, x, f"t_{kind}_{i}", kind, {"flow": "flow"}))
        ops.append(lincomb("x0", [(1.0, x), (-step.x0_coef, "flow")], f64=True))
        if step.renoise == "copy":  # the boundary latent goes to the low-noise expert as is
            ops.append({"op": "copy", "src": "x0", "out": "x"})
            x = "x"
        elif step.renoise is not None:
            a, c = step.renoise
            ops.append(lincomb("x", [(a, "x0"), (c, renoise[i])]))
            x = "x"
    return ops


def commit_ops(kind: str) -> list[dict]:
    """Both experts rewrite the block's K/V from the final x0: low-noise first, then high-noise."""
    return [
        _dit_call("low", "x0", f"t_commit_{kind}", kind, {}),
        _dit_call("high", "x0", f"t_commit_{kind}", kind, {}),
        {"op": "mark", "name": "commit"},
    ]


def build_plan(
    preset: Preset,
    cfg: WanConfig,
    batch: int,
    latent_hw: tuple[int, int],
    dtype: str,
    decoder: DecoderGraphs | None,
) -> BlockPlan:
    """The plan for `batch` sessions of `preset` at latent size `latent_hw`."""
    lh, lw = latent_hw
    nf, first = preset.num_frame_per_block, FIRST_BLOCK_FRAMES
    fs = (lh // cfg.patch_size[1]) * (lw // cfg.patch_size[2])
    sink, window = preset.sink_frames, preset.window_frames
    b, layers, heads, hd = batch, cfg.num_layers, cfg.num_heads, cfg.head_dim
    capacity = (sink + window) * fs
    lat = (b, LATENT_CHANNELS, nf, lh, lw)
    lat_first = (b, LATENT_CHANNELS, first, lh, lw)
    state = {
        "cross_k": TensorDecl(
            "cross_k",
            (layers, b, cfg.text_len, heads, hd),
            dtype,
            "prompt cross-attention keys (high-noise expert's)",
            batch_dim=1,
        ),
        "cross_v": TensorDecl(
            "cross_v", (layers, b, cfg.text_len, heads, hd), dtype, "prompt cross-attention values", batch_dim=1
        ),
    }
    for expert, (rk, rv) in RING_BUFFERS.items():
        state[rk] = TensorDecl(
            rk, (layers, b, capacity, heads, hd), dtype, f"{expert}-noise expert's KV ring keys", batch_dim=1
        )
        state[rv] = TensorDecl(
            rv, (layers, b, capacity, heads, hd), dtype, f"{expert}-noise expert's KV ring values", batch_dim=1
        )
    state["block_index"] = TensorDecl("block_index", (b,), "int64", "the block being generated (runtime-written)")
    state.update(ring_tables(nf))
    if decoder is not None:
        state.update(decoder.state)
    inputs = {
        "prompt_embeds": InputSpec(
            "prompt_embeds",
            (b, cfg.text_len, cfg.text_dim),
            meaning="text embeddings of the prompt (umT5-XXL output); fewer rows are zero-padded. Both experts "
            "attend to the high-noise expert's K/V of it (one shared cross-attention cache, as the reference)",
            units="embedding",
            pad_dim=1,
            required=True,
            program=(
                call("encode_prompt", {"prompt_embeds": "prompt_embeds"}, {"cross_k": "cross_k", "cross_v": "cross_v"}),
            ),
        )
    }
    graphs = {
        **{expert_graph(e, f): expert_sig(e, f) for f in (False, True) for e in ("high", "low")},
        "encode_prompt": ENCODE_SIG,
        "block_positions": POSITIONS_SIG,
    }
    if preset.i2v:
        state["image_latent"] = TensorDecl(
            "image_latent", lat_first, "float32", "the start image's normalised Wan VAE latent (set with `image`)"
        )
        inputs["image"] = InputSpec(
            "image",
            (b, 3, lh * 8, lw * 8),
            meaning="the start image, RGB channels first in [0, 1]; its VAE latent is block 0, committed into both "
            "experts' caches before the first generated block",
            units="image",
            low=0.0,
            high=1.0,
            when="reset",
            required=True,
            program=(call("encode_image", {"image": "image"}, {"image_latent": "image_latent"}),),
        )
        graphs["encode_image"] = ENCODE_IMAGE_SIG
    sched = preset.schedule()
    first_kind = "prefill" if preset.i2v else "first"
    constants: dict[str, TensorDecl] = {}
    kinds = {first_kind: (b, first), "steady": (b, nf)}
    for kind, tshape in kinds.items():
        if kind != "prefill":
            for i, t in enumerate(sched.timesteps):
                name = f"t_{kind}_{i}"
                desc = f"timestep of step {i} ({sched.steps[i].expert}-noise expert, {kind} blocks)"
                constants[name] = TensorDecl(name, tshape, "float32", desc, float(t))
        name = f"t_commit_{kind}"
        constants[name] = TensorDecl(
            name, tshape, "float32", "timestep of the commit (context_noise)", sched.context_noise
        )
    # Block 0 is frame 0 in slot 0 (a single frame: one fill value each).
    valid0 = host_positions(0, first, nf, sink, window, fs)["valid_len"][0]
    constants["frame_positions_first"] = TensorDecl("frame_positions_first", (first,), "int64", "block 0's frame", 0)
    constants["slots_first"] = TensorDecl("slots_first", (first,), "int64", "block 0's ring slot", 0)
    constants["valid_len_first"] = TensorDecl(
        "valid_len_first", (1,), "int64", "valid ring rows after block 0", float(valid0)
    )
    draws = {}
    for kind, shape in (("first", lat_first), ("steady", lat)):
        noise, renoise = draw_names(kind, sched.num_steps)
        draws[noise] = TensorDecl(noise, shape, "float32", f"the block's initial noise ({kind} block)")
        for i, n in enumerate(renoise):
            used = "" if sched.steps[i].renoise != "copy" else " (drawn but unused: the switch step, as the reference)"
            draws[n] = TensorDecl(n, shape, "float32", f"re-noise draw after step {i} ({kind} block){used}")
    if preset.i2v:  # no generated first block: its draws are not needed
        draws = {n: d for n, d in draws.items() if "_first" not in n}
    positions = call("block_positions", {"block_index": "block_index"}, {n: n for n in POSITION_BUFFERS})
    programs = {
        "steady": [
            positions,
            *denoise_ops("steady", sched),
            {"op": "mark", "name": "denoise"},
            *decode_emit_ops("x0", False, decoder),
            *commit_ops("steady"),
        ]
    }
    if preset.i2v:
        programs["prefill"] = [
            {"op": "copy", "src": "image_latent", "out": "x0"},
            {"op": "mark", "name": "denoise"},
            *decode_emit_ops("x0", True, decoder),
            *commit_ops("prefill"),
        ]
    else:
        programs["first"] = [
            *denoise_ops("first", sched),
            {"op": "mark", "name": "denoise"},
            *decode_emit_ops("x0", True, decoder),
            *commit_ops("first"),
        ]
    if decoder is not None:
        graphs.update(decoder.sigs)
    meta = {
        "height": lh * 8,
        "width": lw * 8,
        "latent_hw": [lh, lw],
        "latent_channels": LATENT_CHANNELS,
        "frames_per_block_latent": nf,
        "first_block_frames": first,
        "video_frames_first": decoder.frames_first if decoder else None,
        "video_frames_steady": decoder.frames_steady if decoder else None,
        "decoder": decoder.name if decoder else None,
        "decoder_graphs": list(decoder.sigs) if decoder else [],
        "decoder_state": list(decoder.state_names) if decoder else [],
        "schedule": sched.to_dict(),
        "experts": {g: f"{e} noise" for g, e in EXPERT_OF_GRAPH.items()},
        "i2v": preset.i2v,
        "ring": {"sink_frames": sink, "window_frames": window, "frame_seq_length": fs, "per_expert": True},
        "num_layers": layers,
        "num_heads": heads,
        "head_dim": hd,
        "text_len": cfg.text_len,
        "text_dim": cfg.text_dim,
        "fps": 16,
        "block_flops": block_flops(cfg, programs, first_kind, preset, fs),
    }
    plan = BlockPlan(
        family="wan22",
        batch=b,
        graphs=graphs,
        state=state,
        inputs=inputs,
        constants=constants,
        draws=draws,
        programs=programs,
        sequence=[first_kind],
        steady="steady",
        latents=TensorDecl("latents", lat, "float32", "the block's final x0 (block 0: one frame)"),
        ring=None,  # block sizes [first, nf, nf, ...]: positions come from `block_positions` (steps.py)
        meta=meta,
    )
    plan.validate()
    return plan


def block_flops(cfg: WanConfig, programs: dict, first_kind: str, preset: Preset, fs: int) -> list[float]:
    """Matmul FLOPs of blocks 0, 1, ...: one entry per block until the rings are full, then the last
    entry holds for every later block (fd-bench reads this)."""
    nf, first, sink, window = preset.num_frame_per_block, FIRST_BLOCK_FRAMES, preset.sink_frames, preset.window_frames
    out, block = [], 0
    while True:
        kind = first_kind if block == 0 else "steady"
        n = first if block == 0 else nf
        calls = sum(1 for op in programs[kind] if op["op"] == "call" and op["graph"] in EXPERT_OF_GRAPH)
        valid = host_positions(block, first, nf, sink, window, fs)["valid_len"][0]
        out.append(calls * dit_forward_flops(cfg, n * fs, valid)["total"])
        end = first + block * nf
        if block >= 1 and end >= sink + window:
            return out
        block += 1
