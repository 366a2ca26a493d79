"""The block plan of the bidirectional Wan2.1 models: `WanT2V/WanI2V.generate` as data.

One block is one whole clip: copy the block's noise draw into x_0, run the UniPC + CFG
loop (models/samplers.py; each step one batched `dit_cfg` call for the guidance pair, then
the solver's linear updates), decode every latent frame, emit. The prompt's and the
negative prompt's cross-attention K/V are session state, written when those inputs are set
(graph `encode_prompt`), so the steps never recompute them. For I2V, setting `image` runs
`encode_image` (CLIP tokens and the conditioning y into state) and re-encodes the prompts
with the new image rows; the prompt programs read the CLIP-token state too, so the inputs
may be set in any order.
"""

from __future__ import annotations

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.families.wan21.presets import Preset
from flashdreams.models.families.wan21.steps import DECODE_SIG, ENCODE_IMAGE_SIG, dit_sig, encode_prompt_sig
from flashdreams.models.family import BlockPlan, InputSpec, TensorDecl, call
from flashdreams.models.samplers import timestep_name, unipc_cfg_ops, unipc_schedule
from flashdreams.models.wan_config import I2V_COND_CHANNELS, WanConfig
from flashdreams.models.wan_dit import CLIP_TOKENS
from flashdreams.models.wan_flops import dit_forward_flops

LATENT_CHANNELS = 16
KIND = "clip"


def build_plan(
    preset: Preset,
    cfg: WanConfig,
    batch: int,
    latent_hw: tuple[int, int],
    image_hw: tuple[int, int] | None,
    dtype: str,
    decoder: dict | None,
) -> BlockPlan:
    """The plan for `batch` clips of `preset` at latent size `latent_hw`.

    `decoder` is None (latents only) or {"name", "frames"}: the `decode` graph's decoder and
    its frame count for the clip. `image_hw` is the I2V start image's size (None for T2V).
    """
    i2v = cfg.model_type == "i2v"
    if i2v != (image_hw is not None):
        raise InvalidArgumentError(f"preset {preset.name}: an image size is needed by i2v models and only by them")
    lh, lw = latent_hw
    if lh % cfg.patch_size[1] or lw % cfg.patch_size[2]:
        raise InvalidArgumentError(
            f"preset {preset.name}: latent size {lh}x{lw} is not a multiple of the patch {cfg.patch_size[1:]}"
        )
    nf = preset.latent_frames
    b, layers, heads, hd = batch, cfg.num_layers, cfg.num_heads, cfg.head_dim
    ctx = cfg.text_len + (CLIP_TOKENS if i2v else 0)
    lat = (b, LATENT_CHANNELS, nf, lh, lw)
    rows = "image rows (257), then text rows; " if i2v else ""
    state = {
        "cross_k": TensorDecl(
            "cross_k",
            (layers, 2 * b, ctx, heads, hd),
            dtype,
            f"cross-attention keys: batch rows [0, B) the prompt, [B, 2B) the negative prompt; {rows}per layer",
            batch_dim=1,
        ),
        "cross_v": TensorDecl(
            "cross_v", (layers, 2 * b, ctx, heads, hd), dtype, "cross-attention values (as cross_k)", batch_dim=1
        ),
    }
    enc_args = {"prompt_embeds": "prompt_embeds", "negative_prompt_embeds": "negative_prompt_embeds"}
    if i2v:
        enc_args["clip_fea"] = "clip_fea"
        state["clip_fea"] = TensorDecl(
            "clip_fea", (b, CLIP_TOKENS, cfg.clip_dim), "float32", "CLIP tokens of the start image (zero until set)"
        )
        state["y"] = TensorDecl(
            "y", (b, I2V_COND_CHANNELS, nf, lh, lw), "float32", "I2V conditioning: first-frame mask + image latent"
        )
    encode = call("encode_prompt", enc_args, {"cross_k": "cross_k", "cross_v": "cross_v"})
    text = (b, cfg.text_len, cfg.text_dim)
    inputs = {
        "prompt_embeds": InputSpec(
            "prompt_embeds",
            text,
            meaning="umT5-XXL embeddings of the prompt; fewer rows are zero-padded (the reference pads to text_len)",
            units="embedding",
            pad_dim=1,
            required=True,
            program=(encode,),
        ),
        "negative_prompt_embeds": InputSpec(
            "negative_prompt_embeds",
            text,
            meaning="umT5-XXL embeddings of the negative prompt, the unconditional side of guidance; for the "
            "release's behaviour pass the embeddings of its default negative prompt (`sample_neg_prompt` of "
            "the Wan2.1 configs); zeros are not the empty prompt. Fewer rows are zero-padded",
            units="embedding",
            pad_dim=1,
            required=True,
            program=(encode,),
        ),
    }
    if i2v:
        ih, iw = image_hw
        inputs["image"] = InputSpec(
            "image",
            (b, 3, ih, iw),
            meaning="the start image, RGB channels first (as TF.to_tensor gives it); the clip's first frame. "
            "Sets the CLIP tokens and y, and re-encodes the prompts with the image rows",
            units="RGB intensity",
            low=0.0,
            high=1.0,
            when="reset",
            required=True,
            program=(call("encode_image", {"image": "image"}, {"clip_fea": "clip_fea", "y": "y"}), encode),
        )
    timesteps, sigmas = unipc_schedule(preset.sampling_steps, preset.shift)
    constants = {
        timestep_name(k): TensorDecl(timestep_name(k), (1,), "int64", f"model timestep of step {k}", float(t))
        for k, t in enumerate(timesteps)
    }
    draws = {"noise": TensorDecl("noise", lat, "float32", "the clip's initial noise x_0")}
    dit_args = {"cross_k": "cross_k", "cross_v": "cross_v", **({"y": "y"} if i2v else {})}
    steps = unipc_cfg_ops(
        sigmas,
        preset.guide_scale,
        graph="dit_cfg",
        cond_args=dit_args,
        uncond_args=dit_args,
        history=preset.history,
        batched_outs=("cond", "uncond"),
    )
    program = [{"op": "copy", "src": "noise", "out": "x_0"}, *(op for ops in steps for op in ops)]
    program.append({"op": "mark", "name": "denoise"})
    graphs = {"dit_cfg": dit_sig(i2v), "encode_prompt": encode_prompt_sig(i2v)}
    if i2v:
        graphs["encode_image"] = ENCODE_IMAGE_SIG
    if decoder is not None:
        graphs["decode"] = DECODE_SIG
        program += [
            call("decode", {"latents": "latents"}, {"video": "video"}),
            {"op": "frames", "src": "video", "out": "frames"},
            {"op": "emit", "latents": "latents", "frames": "frames"},
        ]
    else:
        program.append({"op": "emit", "latents": "latents", "frames": None})
    program.append({"op": "mark", "name": "decode"})
    tokens = nf * (lh // cfg.patch_size[1]) * (lw // cfg.patch_size[2])
    flops = 2 * preset.sampling_steps * dit_forward_flops(cfg, tokens, tokens)["total"]
    meta = {
        "height": lh * 8,
        "width": lw * 8,
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
            "shift": preset.shift,
            "guide_scale": preset.guide_scale,
            "timesteps": timesteps,
            "sigmas": sigmas,
        },
        "image_hw": list(image_hw) if image_hw else None,
        "model_type": cfg.model_type,
        "num_layers": layers,
        "num_heads": heads,
        "head_dim": hd,
        "text_len": cfg.text_len,
        "text_dim": cfg.text_dim,
        "fps": 16,
        "block_flops": [flops],
    }
    plan = BlockPlan(
        family="wan21",
        batch=b,
        graphs=graphs,
        state=state,
        inputs=inputs,
        constants=constants,
        draws=draws,
        programs={KIND: program},
        sequence=[KIND],
        steady=KIND,
        latents=TensorDecl("latents", lat, "float32", "the clip's sampled latents (the solver's final x0)"),
        meta=meta,
    )
    plan.validate()
    return plan
