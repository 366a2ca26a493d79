"""The block plan of OmniDreams: `DiffusionModel.generate` + `finalize` per chunk, as data.

One block is one chunk of `len_t` latent frames. The denoise: x = noise; per step the chunk
forward against the KV ring, x0 = x - sigma*flow, and before the next step a re-noise with a
fresh draw (self-forcing, not an Euler step). Block 0 runs the `dit_first` graph (image
injection and frame-0 mask) and keeps the given frame in its output. Then the decode and the
frames handed out, then the finalize: the clean latent re-noised to the sigma nearest
`context_noise`, one forward at the raw `context_noise` timestep that rewrites the chunk's K/V.
The per-chunk sensor input is the HD map: `hdmap_video` (rendered frames, encoded on the device by
the first op of the block) or, with `hdmap_input="latent"`, `hdmap` (its latent) directly.
"""

from __future__ import annotations

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.cosmos_dit import LATENT_CHANNELS, forward_flops
from flashdreams.models.decode_step import DecoderGraphs
from flashdreams.models.families.causal_wan.plan import decode_emit_ops, ring_capacity
from flashdreams.models.families.omnidreams.hdmap_encoder import FIRST_CHUNK_FRAMES, FRAMES_PER_CHUNK
from flashdreams.models.families.omnidreams.presets import HDMAP_CHANNELS, Preset
from flashdreams.models.families.omnidreams.steps import DIT_FIRST_SIG, DIT_SIG, ENCODE_SIG, INJECT_SIG
from flashdreams.models.family import BlockPlan, InputSpec, RingRule, TensorDecl, call, lincomb, ring_tables
from flashdreams.models.fp8_ring_shadow import FP8_SHADOW, shadow_state, with_fp8_shadow
from flashdreams.models.scheduler import flow_match_tables, sigma_of

RING_ARGS = ("ring_k", "ring_v", "frame_positions", "slots", "valid_len")


def _dit_call(first: bool, x: str, t: str, outs: dict, shadow: bool) -> dict:
    args = {"x": x, "t": t, "cross_k": "cross_k", "cross_v": "cross_v", "hdmap": "hdmap"}
    if first:
        args["image_latent"] = "image_latent"
    args |= {a: a for a in (*RING_ARGS, *(FP8_SHADOW if shadow else ()))}
    return call("dit_first" if first else "dit", args, outs)


def chunk_program(
    preset: Preset, first: bool, decoder: DecoderGraphs | None, encoder: list[str] | None, shadow: bool = False
) -> list[dict]:
    """One chunk's ops; `encoder` (the HD-map encoder's cache names) when the map comes in as pixels;
    `shadow`: the chunk forwards also take the ring's fp8 shadow."""
    sched = preset.schedule()
    ops, x = [], "noise"
    if encoder is not None:
        graph = "encode_hdmap_first" if first else "encode_hdmap"
        ops.append(call(graph, {"hdmap_video": "hdmap_video"} | {n: n for n in encoder}, {"hdmap": "hdmap"}))
        ops.append({"op": "mark", "name": "encode"})
    for s, sigma in enumerate(sched.sigmas):
        ops.append(_dit_call(first, x, f"t_{s}", {"flow": "flow"}, shadow))
        ops.append(lincomb("x0", [(1.0, x), (-sigma, "flow")]))
        if s + 1 < sched.num_steps:
            sn = sched.sigmas[s + 1]
            ops.append(lincomb("x", [(1.0 - sn, "x0"), (sn, f"renoise_{s}")]))
            x = "x"
    if first:
        ops.append(call("inject_image", {"x0": "x0", "image_latent": "image_latent"}, {"latents": "latents"}))
    else:
        ops.append({"op": "copy", "src": "x0", "out": "latents"})
    ops.append({"op": "mark", "name": "denoise"})
    ops += decode_emit_ops("latents", first, decoder)
    sc = context_sigma(preset)
    ops.append(lincomb("x_ctx", [(1.0 - sc, "latents"), (sc, "renoise_ctx")]))
    ops.append(_dit_call(first, "x_ctx", "t_ctx", {}, shadow))
    ops.append({"op": "mark", "name": "commit"})
    return ops


def context_sigma(preset: Preset) -> float:
    """sigma of the table entry nearest `context_noise` (the finalize re-noise; the timestep stays raw)."""
    sigmas, table = flow_match_tables(preset.shift)
    return sigma_of(preset.context_noise, sigmas, table)


def build_plan(
    preset: Preset,
    batch: int,
    latent_hw: tuple[int, int],
    dtype: str,
    decoder: DecoderGraphs | None,
    encoder: tuple[dict, dict] | None = None,
    fp8_block_n: int | None = None,
) -> BlockPlan:
    """The plan for `batch` streams; `encoder` = (graph sigs, cache state decls) of the HD-map encoder,
    needed when the preset takes the HD map as pixels (`hdmap_input="pixels"`).

    `fp8_block_n` (FP8 attention): the session also keeps an fp8 shadow of each layer's ring in key
    tiles of that many rows. Each chunk forward re-quantizes only the tiles its own rows fall in, not
    the whole window on every call (a third of the K/V pre-pass at the public preset: 2 of its 6
    latent frames change per chunk); the attention reads the shadow. Same results, bit for bit."""
    pixels = preset.hdmap_input == "pixels"
    if pixels != (encoder is not None):
        raise InvalidArgumentError(f"preset {preset.name}: the HD-map encoder graphs are needed for pixel input only")
    cfg = preset.model
    lh, lw = latent_hw
    nf = preset.len_t
    fs = (lh // 2) * (lw // 2)
    ring = RingRule(preset.sink_t, preset.window_t, fs, nf)
    b, layers, heads, hd = batch, cfg.num_blocks, cfg.num_heads, cfg.head_dim
    lat = (b, LATENT_CHANNELS, nf, lh, lw)
    cap = ring_capacity(ring)
    state = {
        "cross_k": TensorDecl(
            "cross_k", (layers, b, preset.text_len, heads, hd), dtype, "prompt cross-attention keys", batch_dim=1
        ),
        "cross_v": TensorDecl(
            "cross_v", (layers, b, preset.text_len, heads, hd), dtype, "prompt cross-attention values", batch_dim=1
        ),
        "ring_k": TensorDecl(
            "ring_k", (layers, b, cap, heads, hd), dtype, "KV window keys (after norm and RoPE)", batch_dim=1
        ),
        "ring_v": TensorDecl("ring_v", (layers, b, cap, heads, hd), dtype, "KV window values", batch_dim=1),
        **ring_tables(nf, "chunk"),
    }
    if fp8_block_n is not None:
        state.update(shadow_state(layers, b, cap, heads, hd, fp8_block_n))
    if decoder is not None:
        state.update(decoder.state)
    inputs = {
        "prompt_embeds": InputSpec(
            "prompt_embeds",
            (b, preset.text_len, cfg.text_in_dim),
            meaning="Cosmos-Reason1 text features of the scene prompt (all decoder layers' hidden states "
            f"concatenated per token, {cfg.text_in_dim} wide); fewer rows are zero-padded",
            units="embedding",
            pad_dim=1,
            required=True,
            program=(
                call("encode_prompt", {"prompt_embeds": "prompt_embeds"}, {"cross_k": "cross_k", "cross_v": "cross_v"}),
            ),
        ),
        "image_latent": InputSpec(
            "image_latent",
            (b, LATENT_CHANNELS, 1, lh, lw),
            meaning="the start frame as a normalised Wan2.1-VAE latent (one latent frame); the first chunk's "
            "latent frame 0 is this frame",
            units="latent",
            when="reset",
            required=True,
        ),
    }
    lat_meaning = (
        f"the HD-map condition of the next chunk as the {HDMAP_CHANNELS}-channel latent of its rendered HD-map video "
        f"({nf} latent frames; the release encodes the video with LightVAE)"
    )
    if pixels:
        h8, w8 = 8 * lh, 8 * lw
        inputs["hdmap_video"] = InputSpec(
            "hdmap_video",
            (b, FRAMES_PER_CHUNK, 3, h8, w8),
            meaning=f"the HD map of the next chunk: {FRAMES_PER_CHUNK} RGB frames (channels first) rendered from the "
            "ego camera at the video size: lane lines, road edges and agent boxes around the ego pose; set it "
            f"before every step (the first chunk uses its last {FIRST_CHUNK_FRAMES} frames). Encoded on the "
            "device by the HD-map encoder inside the block",
            units="image",
            low=0.0,
            high=1.0,
            required=True,
        )
        sigs, decls = encoder
        state.update(decls)
        state["hdmap"] = TensorDecl("hdmap", (b, HDMAP_CHANNELS, nf, lh, lw), "float32", lat_meaning)
    else:
        inputs["hdmap"] = InputSpec(
            "hdmap",
            (b, HDMAP_CHANNELS, nf, lh, lw),
            meaning=lat_meaning + "; set it before every step",
            units="latent",
            required=True,
        )
    sched = preset.schedule()
    constants = {
        f"t_{s}": TensorDecl(f"t_{s}", (b,), "float32", f"timestep of denoising step {s}", float(t))
        for s, t in enumerate(sched.timesteps)
    }
    constants["t_ctx"] = TensorDecl("t_ctx", (b,), "float32", "timestep of the finalize forward", preset.context_noise)
    draws = {"noise": TensorDecl("noise", lat, "float32", "the chunk's initial noise")}
    for s in range(sched.num_steps - 1):
        draws[f"renoise_{s}"] = TensorDecl(f"renoise_{s}", lat, "float32", f"re-noise draw after step {s}")
    # Named so that sorted order is the declared order (an engine manifest may list them sorted).
    draws["renoise_ctx"] = TensorDecl("renoise_ctx", lat, "float32", "the finalize re-noise draw")
    enc_names = list(encoder[1]) if pixels else None
    shadow = fp8_block_n is not None
    programs = {
        kind: chunk_program(preset, kind == "first", decoder, enc_names, shadow) for kind in ("first", "steady")
    }
    dit, dit_first = (with_fp8_shadow(DIT_SIG), with_fp8_shadow(DIT_FIRST_SIG)) if shadow else (DIT_SIG, DIT_FIRST_SIG)
    graphs = {"dit": dit, "dit_first": dit_first, "inject_image": INJECT_SIG, "encode_prompt": ENCODE_SIG}
    if pixels:
        graphs.update(encoder[0])
    if decoder is not None:
        graphs.update(decoder.sigs)
    calls = sched.num_steps + 1
    flops, block = [], 0
    while True:
        flops.append(b * calls * forward_flops(cfg, nf * fs, ring.valid_tokens(block), preset.text_len))
        if (block + 1) * nf >= ring.sink + ring.window:
            break
        block += 1
    meta = {
        "height": lh * 8,
        "width": lw * 8,
        "latent_hw": [lh, lw],
        "latent_channels": LATENT_CHANNELS,
        "frames_per_block_latent": nf,
        "video_frames_first": decoder.frames_first if decoder else None,
        "video_frames_steady": decoder.frames_steady if decoder else None,
        "decoder": decoder.name if decoder else None,
        "decoder_graphs": list(decoder.sigs) if decoder else [],
        "decoder_state": list(decoder.state_names) if decoder else [],
        "schedule": sched.to_dict() | {"context_sigma": context_sigma(preset)},
        "ring": {"sink_frames": ring.sink, "window_frames": ring.window, "frame_seq_length": fs},
        "num_layers": layers,
        "num_heads": heads,
        "head_dim": hd,
        "text_len": preset.text_len,
        "text_dim": cfg.text_in_dim,
        "fps": preset.fps,
        "block_flops": flops,
    }
    plan = BlockPlan(
        family="omnidreams",
        batch=b,
        graphs=graphs,
        state=state,
        inputs=inputs,
        constants=constants,
        draws=draws,
        programs=programs,
        sequence=["first"],
        steady="steady",
        latents=TensorDecl("latents", lat, "float32", "the chunk's clean latent (x0 of the last step)"),
        ring=ring,
        meta=meta,
    )
    plan.validate()
    return plan
