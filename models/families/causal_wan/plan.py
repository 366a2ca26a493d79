"""The block plan of the causal Wan models: Self-Forcing's loop as data.

Per block: the few-step flow-matching denoise (a DiT call per step, x0 = x - sigma*flow,
re-noise between steps), the decode of the final x0, the frames handed out, then the commit
(the DiT call at `context_noise` that rewrites the block's K/V in the ring). Causal-Forcing
adds a first-block step list and, for I2V, prefill blocks that write the clean start latent
into the cache at timestep 0.
"""

from __future__ import annotations

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.decode_step import DecoderGraphs
from flashdreams.models.families.causal_wan.presets import Preset
from flashdreams.models.families.causal_wan.steps import DIT_SIG, ENCODE_SIG
from flashdreams.models.family import BlockPlan, InputSpec, RingRule, TensorDecl, call, lincomb, ring_tables
from flashdreams.models.fp8_ring_shadow import add_shadow_args, shadow_state, with_fp8_shadow
from flashdreams.models.scheduler import FlowSchedule
from flashdreams.models.wan_config import WanConfig
from flashdreams.models.wan_flops import dit_forward_flops

VAE_STRIDE = (4, 8, 8)
LATENT_CHANNELS = 16


def _dit_args(x: str, t: str) -> dict[str, str]:
    return {a: a for a in DIT_SIG.args} | {"x": x, "t": t}


def denoise_ops(kind: str, sched: FlowSchedule) -> list[dict]:
    """The few-step loop: x0 = x - sigma*flow in float64 (the reference's rule), re-noise between steps."""
    ops, x = [], "noise"
    for s, sigma in enumerate(sched.sigmas):
        ops.append(call("dit", _dit_args(x, f"t_{kind}_{s}"), {"flow": "flow"}))
        ops.append(lincomb("x0", [(1.0, x), (-sigma, "flow")], f64=True))
        if s + 1 < sched.num_steps:
            sn = sched.sigmas[s + 1]
            ops.append(lincomb("x", [(1.0 - sn, "x0"), (sn, f"renoise_{s}")]))
            x = "x"
    return ops


def decode_emit_ops(latents: str, first: bool, decoder: DecoderGraphs | None) -> list[dict]:
    if decoder is None:
        return [{"op": "emit", "latents": latents, "frames": None}, {"op": "mark", "name": "decode"}]
    graph = "decode_first" if first else "decode"
    args = {"latents": latents} | {n: n for n in decoder.state_names}
    return [
        call(graph, args, {"video": "video"}),
        {"op": "frames", "src": "video", "out": "frames"},
        {"op": "emit", "latents": latents, "frames": "frames"},
        {"op": "mark", "name": "decode"},
    ]


def build_plan(
    preset: Preset,
    cfg: WanConfig,
    batch: int,
    height: int,
    width: int,
    dtype: str,
    decoder: DecoderGraphs | None,
    fp8_block_n: int | None = None,
) -> BlockPlan:
    """The plan for `batch` sessions of `preset` at `height` x `width`. `fp8_block_n` (FP8 attention):
    the session also keeps the ring's fp8 shadow in key tiles of that many rows, which every DiT call
    takes and keeps up to date (models/fp8_ring_shadow.py)."""
    step = VAE_STRIDE[1] * cfg.patch_size[1]
    if height % step or width % step or height <= 0 or width <= 0:
        raise InvalidArgumentError(
            f"resolution {height}x{width}: height and width must be positive multiples of {step} for {preset.name}"
        )
    lh, lw = height // VAE_STRIDE[1], width // VAE_STRIDE[2]
    nf = preset.num_frame_per_block
    fs = (lh // cfg.patch_size[1]) * (lw // cfg.patch_size[2])
    if preset.num_input_frames % nf:
        raise InvalidArgumentError(
            f"preset {preset.name}: num_input_frames {preset.num_input_frames} "
            f"must be a multiple of the block size {nf}"
        )
    ring = RingRule(preset.sink_frames, preset.window_frames, fs, nf)
    if nf > preset.window_frames:
        raise InvalidArgumentError(
            f"ring window of {preset.window_frames} frames cannot hold a block of {nf} frames; "
            "use a window at least as large as num_frame_per_block"
        )
    b, layers, heads, hd = batch, cfg.num_layers, cfg.num_heads, cfg.head_dim
    lat = (b, LATENT_CHANNELS, nf, lh, lw)
    state = ring_state(cfg, b, ring, dtype)
    if fp8_block_n is not None:
        state.update(shadow_state(layers, b, ring_capacity(ring), heads, hd, fp8_block_n))
    if decoder is not None:
        state.update(decoder.state)
    inputs = {
        "prompt_embeds": InputSpec(
            "prompt_embeds",
            (b, cfg.text_len, cfg.text_dim),
            meaning="text embeddings of the prompt (umT5-XXL output); fewer rows are zero-padded",
            units="embedding",
            pad_dim=1,
            required=True,
            program=(
                call("encode_prompt", {"prompt_embeds": "prompt_embeds"}, {"cross_k": "cross_k", "cross_v": "cross_v"}),
            ),
        )
    }
    n_prefill = preset.num_input_frames // nf
    if n_prefill:
        inputs["image_latent"] = InputSpec(
            "image_latent",
            (b, LATENT_CHANNELS, preset.num_input_frames, lh, lw),
            meaning="the start image as normalised Wan VAE latent frames, written into the cache before block 0",
            units="latent",
            when="reset",
            required=True,
        )
    first, steady = preset.schedule(first_chunk=True), preset.schedule()
    kinds = {"first": first, "steady": steady}
    constants = {}
    for kind, sched in kinds.items():
        for s, t in enumerate(sched.timesteps):
            name = f"t_{kind}_{s}"
            constants[name] = TensorDecl(name, (b, nf), "float32", f"timestep of step {s} ({kind} blocks)", float(t))
    constants["t_commit"] = TensorDecl("t_commit", (b, nf), "float32", "timestep of the commit", steady.context_noise)
    constants["t_zero"] = TensorDecl("t_zero", (b, nf), "float32", "timestep 0 of the prefill calls", 0.0)
    max_steps = max(s.num_steps for s in kinds.values())
    draws = {"noise": TensorDecl("noise", lat, "float32", "the block's initial noise")}
    for s in range(max_steps - 1):
        draws[f"renoise_{s}"] = TensorDecl(f"renoise_{s}", lat, "float32", f"re-noise draw after step {s}")

    commit = [call("dit", _dit_args("x0", "t_commit"), {}), {"op": "mark", "name": "commit"}]
    programs = {}
    for kind, sched in kinds.items():
        programs[kind] = [
            *denoise_ops(kind, sched),
            {"op": "mark", "name": "denoise"},
            *decode_emit_ops("x0", kind == "first" and not n_prefill, decoder),
            *commit,
        ]
    sequence = ["first"]
    if n_prefill:
        sequence = []
        for p in range(n_prefill):
            kind = f"prefill_{p}"
            programs[kind] = [
                {"op": "copy", "src": "image_latent", "out": "x0", "index": [2, p * nf, (p + 1) * nf]},
                {"op": "mark", "name": "denoise"},
                *decode_emit_ops("x0", p == 0, decoder),
                call("dit", _dit_args("x0", "t_zero"), {}),
                {"op": "mark", "name": "commit"},
            ]
            sequence.append(kind)
        sequence.append("first")
    graphs = {"dit": DIT_SIG, "encode_prompt": ENCODE_SIG}
    if fp8_block_n is not None:
        graphs["dit"] = with_fp8_shadow(DIT_SIG)
        add_shadow_args(programs, ("dit",))
    if decoder is not None:
        graphs.update(decoder.sigs)
    meta = {
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
        "schedule": steady.to_dict(),
        "schedule_first": first.to_dict(),
        "ring": {"sink_frames": ring.sink, "window_frames": ring.window, "frame_seq_length": fs},
        "num_layers": layers,
        "num_heads": heads,
        "head_dim": hd,
        "text_len": cfg.text_len,
        "text_dim": cfg.text_dim,
        "fps": 16,
        "block_flops": block_flops(cfg, programs, sequence, "steady", ring),
    }
    plan = BlockPlan(
        family="causal_wan",
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


def block_flops(cfg: WanConfig, programs: dict, sequence: list[str], steady: str, ring: RingRule) -> list[float]:
    """Matmul FLOPs of blocks 0, 1, ...: one entry per block until the ring is full, then the
    last entry holds for every later block (fd-bench reads this; a C++ host can too)."""
    out = []
    block = 0
    while True:
        kind = sequence[block] if block < len(sequence) else steady
        calls = sum(1 for op in programs[kind] if op["op"] == "call" and op["graph"] == "dit")
        q = ring.frames_per_block * ring.frame_tokens
        out.append(calls * dit_forward_flops(cfg, q, ring.valid_tokens(block))["total"])
        full = (block + 1) * ring.frames_per_block >= ring.sink + ring.window
        if block >= len(sequence) and full:
            return out
        block += 1


def ring_state(cfg, batch: int, ring: RingRule, dtype: str) -> dict[str, TensorDecl]:
    """The causal Wan DiT's session state: per-layer prompt K/V and KV ring ([layers, B, ...]), and
    the block's position tables (one for the whole batch, rewritten every block)."""
    b, layers, heads, hd, nf = batch, cfg.num_layers, cfg.num_heads, cfg.head_dim, ring.frames_per_block
    return {
        "cross_k": TensorDecl(
            "cross_k", (layers, b, cfg.text_len, heads, hd), dtype, "prompt cross-attention keys", batch_dim=1
        ),
        "cross_v": TensorDecl(
            "cross_v", (layers, b, cfg.text_len, heads, hd), dtype, "prompt cross-attention values", batch_dim=1
        ),
        "ring_k": TensorDecl(
            "ring_k", (layers, b, ring_capacity(ring), heads, hd), dtype, "KV ring keys (after RoPE)", batch_dim=1
        ),
        "ring_v": TensorDecl(
            "ring_v", (layers, b, ring_capacity(ring), heads, hd), dtype, "KV ring values", batch_dim=1
        ),
        **ring_tables(nf),
    }


def ring_capacity(ring: RingRule) -> int:
    return (ring.sink + ring.window) * ring.frame_tokens
