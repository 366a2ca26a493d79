"""FlashVSR's block plan: the streaming Tiny pipeline, one chunk per block.

Block 0 (the cold start) takes 25 LQ frames: frame 0 plus 6 clips of 4 give 6 latent frames,
denoised in one step from noise (`clean = x - flow`, t = 1000) and decoded to 21 frames.
Every later block takes the next 8 LQ frames (2 clips, 2 latent frames) and gives 8 frames,
which lag the input by 4 frames (the decoder conditions chunk k on LQ frames 8k+13 .. 8k+20,
the first 4 from the previous block). The DiT's K/V window cache grows to its steady size in
the first blocks (`cache_schedule`); each distinct size is its own block kind, so every graph
has static shapes. The cache is rewritten inside the DiT call: there is no commit stage.
"""

from __future__ import annotations

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.families.flashvsr.dit import FIRST_SLABS, WINDOW, WINDOW_TOKENS, cache_slabs_after
from flashdreams.models.families.flashvsr.presets import Preset
from flashdreams.models.families.flashvsr.steps import (
    ENCODE_SIG,
    FIRST_LATENTS,
    FIRST_LQ_FRAMES,
    FIRST_OUT_FRAMES,
    STEADY_LATENTS,
    STEADY_LQ_FRAMES,
    STEADY_OUT_FRAMES,
    TAIL,
    dit_sig,
    prepare_sig,
)
from flashdreams.models.family import BlockPlan, GraphSig, InputSpec, TensorDecl, call, lincomb
from flashdreams.models.wan_flops import dit_forward_flops

LATENT_CHANNELS = 16


def cache_schedule(kv_ratio: float) -> list[tuple[int, int]]:
    """(cache slabs read, cache slabs kept) of blocks 0, 1, ... until the sizes stop changing.

    The last entry is the steady block's; block 0 reads nothing and brings 3 slabs.
    """
    kv_len = int(kv_ratio)
    if kv_len < 1:
        raise InvalidArgumentError(f"kv_ratio {kv_ratio}: keep at least one cached slab (kv_ratio >= 1)")
    out = [(0, cache_slabs_after(0, FIRST_LATENTS // WINDOW[0], kv_len))]
    while True:
        cin = out[-1][1]
        cout = cache_slabs_after(cin, STEADY_LATENTS // WINDOW[0], kv_len)
        out.append((cin, cout))
        if cout == cin:
            return out


def ring_slabs(schedule: list[tuple[int, int]]) -> int:
    """Slots of the K/V ring: the slabs kept in steady state plus the current chunk's."""
    return schedule[-1][1] + 1


def valid_slabs(schedule: list[tuple[int, int]]) -> list[int]:
    """Ring slots each block kind attends to (first, grow_1, ..., steady): its cache plus its own slabs."""
    return [FIRST_SLABS] + [cin + 1 for cin, _ in schedule[1:]]


def kind_names(schedule: list[tuple[int, int]]) -> list[str]:
    """first, grow_1, ..., steady."""
    return ["first"] + [f"grow_{i}" for i in range(1, len(schedule) - 1)] + ["steady"]


def decoder_state(memory_shapes: list[tuple[int, ...]], dtype: str, b: int, height: int, width: int) -> dict:
    decls = {
        f"tc_mem_{i}": TensorDecl(f"tc_mem_{i}", shape, dtype, f"TC decoder MemBlock {i} memory", rollback=True)
        for i, shape in enumerate(memory_shapes)
    }
    decls["lq_tail"] = TensorDecl(
        "lq_tail",
        (b, 3, TAIL, height, width),
        "float32",
        "the previous block's last 4 LQ frames (upsampled, [-1, 1]): the decoder's conditioning of this block",
        rollback=True,
    )
    return decls


def build_plan(
    preset: Preset,
    batch: int,
    height: int,
    width: int,
    dtype: str,
    memory_shapes: list[tuple[int, ...]] | None,
) -> BlockPlan:
    """The plan for `batch` streams of `preset` with output `height` x `width` (decoder memory shapes, or None)."""
    preset.check_size(height, width)
    cfg = preset.model
    b, layers, heads, hd = batch, cfg.num_layers, cfg.num_heads, cfg.head_dim
    lh, lw = height // 8, width // 8
    gh, gw = lh // 2 // WINDOW[1], lw // 2 // WINDOW[2]
    slab_tokens = gh * gw * WINDOW_TOKENS
    schedule = cache_schedule(preset.kv_ratio)
    kinds = kind_names(schedule)
    ring = ring_slabs(schedule)
    sh, sw = height // preset.scale, width // preset.scale
    state = {
        "cross_k": TensorDecl(
            "cross_k", (layers, b, cfg.text_len, heads, hd), dtype, "prompt cross-attention keys", batch_dim=1
        ),
        "cross_v": TensorDecl(
            "cross_v", (layers, b, cfg.text_len, heads, hd), dtype, "prompt cross-attention values", batch_dim=1
        ),
        "cache_k": TensorDecl(
            "cache_k",
            (layers, b, ring * slab_tokens, heads, hd),
            dtype,
            "K windows of the slab ring (after RoPE)",
            batch_dim=1,
        ),
        "cache_v": TensorDecl(
            "cache_v", (layers, b, ring * slab_tokens, heads, hd), dtype, "V windows of the slab ring", batch_dim=1
        ),
        "block_index": TensorDecl("block_index", (b,), "int64", "the chunk index (RoPE frames 4+2k, 5+2k)"),
    }
    dec = memory_shapes is not None and preset.decoder is not None
    if dec:
        state.update(decoder_state(memory_shapes, dtype, b, height, width))
    inputs = {
        "lq_frames": InputSpec(
            "lq_frames",
            (b, FIRST_LQ_FRAMES, sh, sw, 3),
            meaning=(
                f"low-resolution RGB frames [B, T, {sh}, {sw}, 3] as pixel values 0..255 (uint8 frames as float): "
                f"block 0 takes {FIRST_LQ_FRAMES} frames, every later block the next {STEADY_LQ_FRAMES} "
                "(rows after those are ignored)"
            ),
            units="image",
            low=0.0,
            high=255.0,
            pad_dim=1,
            required=True,
        ),
        "prompt_embeds": InputSpec(
            "prompt_embeds",
            (b, cfg.text_len, cfg.text_dim),
            meaning="the fixed prompt tensor FlashVSR ships (posi_prompt.pth, umT5 output), used as given",
            units="embedding",
            required=True,
            program=(
                call("encode_prompt", {"prompt_embeds": "prompt_embeds"}, {"cross_k": "cross_k", "cross_v": "cross_v"}),
            ),
        ),
    }
    lat_first = (b, LATENT_CHANNELS, FIRST_LATENTS, lh, lw)
    draws = {
        "noise": TensorDecl("noise", lat_first, "float32", "the chunk's noise (later chunks use the first 2 frames)")
    }
    graphs: dict[str, GraphSig] = {"encode_prompt": ENCODE_SIG}
    graphs["prepare_first"], graphs["prepare"] = prepare_sig("prepare_first"), prepare_sig("prepare")
    dec_names = [n for n in state if n.startswith("tc_mem_")]
    if dec:
        for name in ("decode_first", "decode"):
            graphs[name] = GraphSig(
                name, ("latents", "lq_video", "lq_tail", *dec_names), ("video",), ("lq_tail", *dec_names)
            )
    programs = {}
    for kind in kinds:
        first = kind == "first"
        graphs[f"dit_{kind}"] = dit_sig(f"dit_{kind}")
        lq, x = ("lq_first", "noise") if first else ("lq_video", "x")
        lat = "latents_first" if first else "latents"
        ops = [call("prepare_first" if first else "prepare", {"lq_frames": "lq_frames"}, {"lq_video": lq})]
        if not first:
            ops.append({"op": "copy", "src": "noise", "out": "x", "index": [2, 0, STEADY_LATENTS]})
        args = {a: a for a in dit_sig("").args} | {"lq_video": lq, "x": x}
        ops += [
            call(f"dit_{kind}", args, {"flow": "flow_first" if first else "flow"}),
            lincomb(lat, [(1.0, x), (-1.0, "flow_first" if first else "flow")]),
            {"op": "mark", "name": "denoise"},
        ]
        if dec:
            dargs = {"latents": lat, "lq_video": lq, "lq_tail": "lq_tail"} | {n: n for n in dec_names}
            video = "video_first" if first else "video"
            ops += [
                call("decode_first" if first else "decode", dargs, {"video": video}),
                {"op": "frames", "src": video, "out": "frames_first" if first else "frames"},
                {"op": "emit", "latents": lat, "frames": "frames_first" if first else "frames"},
            ]
        else:
            ops.append({"op": "emit", "latents": lat, "frames": None})
        ops.append({"op": "mark", "name": "decode"})
        programs[kind] = ops
    meta = {
        "height": height,
        "width": width,
        "lq_height": sh,
        "lq_width": sw,
        "scale": preset.scale,
        "latent_hw": [lh, lw],
        "latent_channels": LATENT_CHANNELS,
        "frames_per_block_latent": STEADY_LATENTS,
        # A frame-stream input, described generically so a host can feed any video source into it
        # (fd-run --input, a stage after a world) without knowing the family.
        "frame_input": {
            "name": "lq_frames",
            "first": FIRST_LQ_FRAMES,
            "steady": STEADY_LQ_FRAMES,
            "height": sh,
            "width": sw,
            "lag": TAIL,
        },
        "video_frames_first": FIRST_OUT_FRAMES if dec else None,
        "video_frames_steady": STEADY_OUT_FRAMES if dec else None,
        "decoder": preset.decoder if dec else None,
        "decoder_graphs": ["decode_first", "decode"] if dec else [],
        "decoder_state": [*dec_names, "lq_tail"] if dec else [],
        "cache_schedule": [list(s) for s in schedule],
        "ring_slabs": ring,
        "window_grid": [gh, gw],
        "topk": preset.topk(height, width),
        "topk_ratio": preset.resolved_topk_ratio(height, width),
        "local_range": preset.local_range,
        "attention_mode": preset.attention_mode,
        "num_layers": layers,
        "num_heads": heads,
        "head_dim": hd,
        "text_len": cfg.text_len,
        "text_dim": cfg.text_dim,
        "fps": preset.fps,
        # DiT matmul FLOPs per block kind (first, ..., steady) with attention counted dense: the sparse
        # kernel does about the mask density of that; the LQ projector and the decoder are not counted.
        "block_flops": [
            dit_forward_flops(
                cfg,
                (FIRST_LATENTS if k == 0 else STEADY_LATENTS) * slab_tokens // 2,
                (cin + (3 if k == 0 else 1)) * slab_tokens,
            )["total"]
            for k, (cin, _) in enumerate(schedule)
        ],
    }
    plan = BlockPlan(
        family="flashvsr",
        batch=b,
        graphs=graphs,
        state=state,
        inputs=inputs,
        constants={},
        draws=draws,
        programs=programs,
        sequence=kinds[:-1],
        steady="steady",
        latents=TensorDecl(
            "latents_first", lat_first, "float32", "the chunk's clean latents (block 0: 6 frames, later 2)"
        ),
        meta=meta,
    )
    plan.validate()
    return plan
