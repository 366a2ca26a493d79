"""The block plan of Matrix-Game 2.0: `CausalInferencePipeline.inference`'s loop as data.

Per block: the `actions` graph turns the block's keyboard/mouse rows and the carried history
into each latent frame's action window; the few-step denoise (a DiT call per step, x0 = x -
sigma*flow in float64, re-noise between steps); the decode of x0 (the Wan VAE's full-decode
stream: 9 frames for block 0, then 12) and the frames handed out; then the cache write (the
DiT on the clean x0 at `context_noise`), which also rewrites the block's mouse and keyboard
cache entries. Block 0 differs only in its decode graph (`decode_first`).

Actions (session inputs, read every block): `keyboard` [B, 4*nf, K] and `mouse` [B, 4*nf, 2],
one row per video frame of the block. Block b >= 1 covers video frames 12b-3 .. 12b+8; block 0
covers only frames 0 .. 8, which are its rows 3..11 (rows 0..2 stand for frames before the
video and are ignored; the reference clamps them to frame 0). An input holds until it is set
again, so a host that sets nothing repeats the last rows.

The plan is not row-independent (models/family.py) yet: the action windows and cond_concat
already work per row from `block_index`, but the shared causal Wan DiT takes one set of RoPE
frame positions, ring slots and valid length for all rows (dit_ops and the Triton ring
kernels), its rings are [layers, B, ...] (per-layer groups for in-place compiled writes), and
block 0's decode differs in shape (9 frames, the VAE's first-chunk path) from later blocks (12).
Batched worlds therefore run in lockstep groups (flashdreams.batched), which is why the tables are
declared `batch_dim=None` and the per-layer caches `batch_dim=1`.
"""

from __future__ import annotations

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.action_module import action_flops
from flashdreams.models.decode_step import DecoderGraphs
from flashdreams.models.families.matrixgame.presets import MOUSE_LABELS, Preset
from flashdreams.models.families.matrixgame.steps import (
    ENCODE_CONTEXT_SIG,
    ENCODE_IMAGE_SIG,
    actions_sig,
    dit_sig,
)
from flashdreams.models.family import BlockPlan, InputSpec, RingRule, TensorDecl, call, lincomb, ring_tables
from flashdreams.models.fp8_ring_shadow import add_shadow_args, shadow_state, with_fp8_shadow
from flashdreams.models.scheduler import FlowSchedule
from flashdreams.models.wan_flops import dit_forward_flops
from flashdreams.models.wan_i2v import MASK_CHANNELS

LATENT_CHANNELS = 16
CLIP_TOKENS = 257
MOUSE_LIMIT = 1.0  # |mouse| per video frame; the demos use 0.1, the release was trained near that


def _dit_args(x: str, t: str, mouse: bool) -> dict[str, str]:
    return {a: a for a in dit_sig(mouse).args} | {"x": x, "t": t}


def denoise_ops(sched: FlowSchedule, mouse: bool) -> list[dict]:
    ops, x = [], "noise"
    for s, sigma in enumerate(sched.sigmas):
        ops.append(call("dit", _dit_args(x, f"t_{s}", mouse), {"flow": "flow"}))
        ops.append(lincomb("x0", [(1.0, x), (-sigma, "flow")], f64=True))
        if s + 1 < sched.num_steps:
            sn = sched.sigmas[s + 1]
            ops.append(lincomb("x", [(1.0 - sn, "x0"), (sn, f"renoise_{s}")]))
            x = "x"
    return ops


def decode_emit_ops(first: bool, decoder: DecoderGraphs | None) -> list[dict]:
    if decoder is None:
        return [{"op": "emit", "latents": "x0", "frames": None}, {"op": "mark", "name": "decode"}]
    args = {"latents": "x0"} | {n: n for n in decoder.state_names}
    return [
        call("decode_first" if first else "decode", args, {"video": "video"}),
        {"op": "frames", "src": "video", "out": "frames"},
        {"op": "emit", "latents": "x0", "frames": "frames"},
        {"op": "mark", "name": "decode"},
    ]


def build_plan(
    preset: Preset,
    batch: int,
    latent_hw: tuple[int, int],
    dtype: str,
    decoder: DecoderGraphs | None,
    conditioning: str = "image",
    fp8_block_n: int | None = None,
) -> BlockPlan:
    """The plan for `batch` sessions of `preset` at latent size `latent_hw`. `fp8_block_n` (FP8 attention):
    the session also keeps the ring's fp8 shadow in key tiles of that many rows (models/fp8_ring_shadow.py).

    `conditioning` "image": the start image is an input and `encode_image` makes the CLIP tokens
    and cond_concat; "tensors": `visual_context` and `cond_concat` are inputs themselves (parity,
    or hosts that encode the image elsewhere).
    """
    if conditioning not in ("image", "tensors"):
        raise InvalidArgumentError(f"conditioning '{conditioning}' is unknown; choose image or tensors")
    cfg, act = preset.model, preset.action
    lh, lw = latent_hw
    if lh % cfg.patch_size[1] or lw % cfg.patch_size[2]:
        raise InvalidArgumentError(f"preset {preset.name}: latent size {lh}x{lw} is not a multiple of the patch")
    nf, window, mouse = preset.num_frame_per_block, preset.local_attn_size, act.enable_mouse
    fs = (lh // cfg.patch_size[1]) * (lw // cfg.patch_size[2])
    ring = RingRule(0, window, fs, nf)
    b, layers, heads, hd = batch, cfg.num_layers, cfg.num_heads, cfg.head_dim
    n_act, ah, ahd, w = len(act.blocks), act.heads_num, act.head_dim, act.window
    rows = act.vae_time_compression_ratio * nf
    keys = preset.keys
    lat = (b, LATENT_CHANNELS, nf, lh, lw)
    cond = (b, LATENT_CHANNELS + MASK_CHANNELS, preset.cond_frames, lh, lw)
    vctx = (b, CLIP_TOKENS, preset.visual_context_dim)
    state = {
        "cross_k": TensorDecl(
            "cross_k", (layers, b, CLIP_TOKENS, heads, hd), dtype, "CLIP-token cross-attention keys", batch_dim=1
        ),
        "cross_v": TensorDecl(
            "cross_v", (layers, b, CLIP_TOKENS, heads, hd), dtype, "CLIP-token cross-attention values", batch_dim=1
        ),
        "ring_k": TensorDecl(
            "ring_k", (layers, b, window * fs, heads, hd), dtype, "self-attention ring keys (RoPE'd)", batch_dim=1
        ),
        "ring_v": TensorDecl(
            "ring_v", (layers, b, window * fs, heads, hd), dtype, "self-attention ring values", batch_dim=1
        ),
        "keyboard_k": TensorDecl(
            "keyboard_k", (n_act, b, window, ah, ahd), dtype, "keyboard cache keys per action layer", batch_dim=1
        ),
        "keyboard_v": TensorDecl(
            "keyboard_v", (n_act, b, window, ah, ahd), dtype, "keyboard cache values", batch_dim=1
        ),
        "keyboard_hist": TensorDecl(
            "keyboard_hist", (b, w, len(keys)), "float32", "the last video frames' keys (action windows)", rollback=True
        ),
        **ring_tables(nf),
        "block_index": TensorDecl("block_index", (b,), "int64", "each row's block index (written by the runtime)"),
    }
    if mouse:
        ms = (n_act, b, fs, window, ah, ahd)
        state["mouse_k"] = TensorDecl(
            "mouse_k", ms, dtype, "mouse cache keys per action layer and token position", batch_dim=1
        )
        state["mouse_v"] = TensorDecl("mouse_v", ms, dtype, "mouse cache values", batch_dim=1)
        state["mouse_hist"] = TensorDecl(
            "mouse_hist", (b, w, 2), "float32", "the last video frames' mouse deltas (action windows)", rollback=True
        )
    if fp8_block_n is not None:
        state.update(shadow_state(layers, b, window * fs, heads, hd, fp8_block_n))
    if decoder is not None:
        state.update(decoder.state)
    encode_context = call(
        "encode_context", {"visual_context": "visual_context"}, {"cross_k": "cross_k", "cross_v": "cross_v"}
    )
    inputs = {
        "keyboard": InputSpec(
            "keyboard",
            (b, rows, len(keys)),
            meaning=f"key states (0 up, 1 down) of the block's {rows} video frames, columns {list(keys)}; "
            f"block 0 reads only rows {act.vae_time_compression_ratio - 1}.. (its {rows - 3} frames)",
            units="keys",
            low=0.0,
            high=1.0,
            labels=keys,
        )
    }
    if mouse:
        inputs["mouse"] = InputSpec(
            "mouse",
            (b, rows, 2),
            meaning=f"camera rotation per video frame of the block (pitch > 0 looks up, yaw > 0 turns right; the "
            f"demos use +-0.1); block 0 reads only rows {act.vae_time_compression_ratio - 1}..",
            units="mouse",
            low=-MOUSE_LIMIT,
            high=MOUSE_LIMIT,
            labels=MOUSE_LABELS,
        )
    if conditioning == "image":
        state["visual_context"] = TensorDecl("visual_context", vctx, "float32", "CLIP tokens of the start image")
        state["cond_concat"] = TensorDecl("cond_concat", cond, "float32", "first-frame mask + start-image latents")
        inputs["image"] = InputSpec(
            "image",
            (b, 3, lh * 8, lw * 8),
            meaning="the start image, RGB channels first in [0, 1], at the video size (centre-crop and resize it "
            "first); sets the CLIP tokens, cond_concat and the cross-attention cache",
            units="image",
            low=0.0,
            high=1.0,
            when="reset",
            required=True,
            program=(
                call(
                    "encode_image",
                    {"image": "image"},
                    {"visual_context": "visual_context", "cond_concat": "cond_concat"},
                ),
                encode_context,
            ),
        )
    else:
        inputs["visual_context"] = InputSpec(
            "visual_context",
            vctx,
            meaning="CLIP ViT-H/14 tokens of the start image (all but the last block, no post-norm)",
            units="embedding",
            when="reset",
            required=True,
            program=(encode_context,),
        )
        inputs["cond_concat"] = InputSpec(
            "cond_concat",
            cond,
            meaning="4 first-frame mask channels + the normalised VAE latent of [image; black frames] per latent frame",
            units="latent",
            when="reset",
            required=True,
        )
    sched = preset.schedule()
    constants = {
        f"t_{s}": TensorDecl(f"t_{s}", (b, nf), "float32", f"timestep of denoising step {s}", float(t))
        for s, t in enumerate(sched.timesteps)
    }
    constants["t_commit"] = TensorDecl(
        "t_commit", (b, nf), "float32", "timestep of the cache write", sched.context_noise
    )
    draws = {"noise": TensorDecl("noise", lat, "float32", "the block's initial noise")}
    for s in range(sched.num_steps - 1):
        draws[f"renoise_{s}"] = TensorDecl(f"renoise_{s}", lat, "float32", f"re-noise draw after step {s}")
    act_args = {a: a for a in actions_sig(mouse).args}
    act_outs = {o: o for o in actions_sig(mouse).outs}
    commit = [call("dit", _dit_args("x0", "t_commit", mouse), {}), {"op": "mark", "name": "commit"}]
    programs = {}
    for kind in ("first", "steady"):
        programs[kind] = [
            call("actions", act_args, act_outs),
            *denoise_ops(sched, mouse),
            {"op": "mark", "name": "denoise"},
            *decode_emit_ops(kind == "first", decoder),
            *commit,
        ]
    graphs = {"dit": dit_sig(mouse), "actions": actions_sig(mouse), "encode_context": ENCODE_CONTEXT_SIG}
    if fp8_block_n is not None:
        graphs["dit"] = with_fp8_shadow(graphs["dit"])
        add_shadow_args(programs, ("dit",))
    if conditioning == "image":
        graphs["encode_image"] = ENCODE_IMAGE_SIG
    if decoder is not None:
        graphs.update(decoder.sigs)
    meta = {
        "height": lh * 8,
        "width": lw * 8,
        "latent_hw": [lh, lw],
        "latent_channels": LATENT_CHANNELS,
        "frames_per_block_latent": nf,
        "video_frames_first": decoder.frames_first if decoder else None,
        "video_frames_steady": decoder.frames_steady if decoder else None,
        "action_rows_per_block": rows,
        "action_rows_first_block": rows - (act.vae_time_compression_ratio - 1),
        "decoder": decoder.name if decoder else None,
        "decoder_graphs": list(decoder.sigs) if decoder else [],
        "decoder_state": list(decoder.state_names) if decoder else [],
        "schedule": sched.to_dict(),
        "ring": {"sink_frames": 0, "window_frames": window, "frame_seq_length": fs},
        "mode": preset.mode,
        "keys": list(keys),
        "mouse": mouse,
        "conditioning": conditioning,
        "num_layers": layers,
        "num_heads": heads,
        "head_dim": hd,
        "fps": 16,
        "block_flops": block_flops(preset, ring, sched.num_steps + 1),
    }
    plan = BlockPlan(
        family="matrixgame",
        batch=b,
        graphs=graphs,
        state=state,
        inputs=inputs,
        constants=constants,
        draws=draws,
        programs=programs,
        sequence=["first"],
        steady="steady",
        latents=TensorDecl("latents", lat, "float32", "the block's final x0"),
        ring=ring,
        meta=meta,
    )
    plan.validate()
    return plan


def block_flops(preset: Preset, ring: RingRule, calls: int) -> list[float]:
    """Matmul FLOPs of blocks 0, 1, ... until the caches are full (the last entry holds after):
    the Wan DiT (cross-attention over the 257 CLIP tokens) plus the action modules."""
    out, block = [], 0
    q = ring.frames_per_block * ring.frame_tokens
    cfg = preset.model.replace(text_len=CLIP_TOKENS)
    while True:
        valid = ring.valid_tokens(block)
        dit = dit_forward_flops(cfg, q, valid)["total"]
        act = len(preset.action.blocks) * action_flops(
            preset.action, q, ring.frames_per_block, valid // ring.frame_tokens
        )
        out.append(calls * (dit + act))
        if (block + 1) * ring.frames_per_block >= ring.window:
            return out
        block += 1
