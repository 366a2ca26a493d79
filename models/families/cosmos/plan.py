"""The block plan of Cosmos-Predict2.5: `generate_samples_from_batch` of the video2world model as data.

One block is one whole clip: copy the block's noise draw into x_0, run the UniPC + CFG loop over
the Karras schedule (models/samplers.py; each evaluation one batched `dit_cfg` call for the
guidance pair, guidance `c + g(c - u)`, then the solver's linear updates), decode, emit. The
prompt's and the negative prompt's cross-attention K/V are session state written when those
inputs are set (graph `encode_prompt`).
"""

from __future__ import annotations

from flashdreams.models.cosmos_dit import LATENT_CHANNELS, forward_flops
from flashdreams.models.families.cosmos.presets import Preset
from flashdreams.models.families.cosmos.steps import DIT_SIG, ENCODE_SIG
from flashdreams.models.families.wan21.steps import DECODE_SIG
from flashdreams.models.family import BlockPlan, InputSpec, TensorDecl, call
from flashdreams.models.samplers import karras_schedule, timestep_name, unipc_cfg_ops

KIND = "clip"
PROMPT_MEANING = (
    "Cosmos-Reason1-7B text features of the {what}: the hidden states of all 28 decoder layers (3584 wide) "
    "concatenated per token ({dim} wide), before the DiT's crossattn_proj; fewer rows are zero-padded"
)


def build_plan(preset: Preset, batch: int, latent_hw: tuple[int, int], dtype: str, decoder: dict | None) -> BlockPlan:
    """The plan for `batch` clips of `preset` at latent size `latent_hw`; `decoder` None or {name, frames}."""
    cfg = preset.model
    lh, lw = latent_hw
    nf = preset.latent_frames
    b, layers, heads, hd = batch, cfg.num_blocks, cfg.num_heads, cfg.head_dim
    lat = (b, LATENT_CHANNELS, nf, lh, lw)
    kv = (layers, 2 * b, preset.text_len, heads, hd)
    state = {
        "cross_k": TensorDecl(
            "cross_k", kv, dtype, "cross-attention keys: rows [0, B) the prompt, [B, 2B) the negative", batch_dim=1
        ),
        "cross_v": TensorDecl("cross_v", kv, dtype, "cross-attention values (as cross_k)", batch_dim=1),
    }
    encode = call(
        "encode_prompt",
        {"prompt_embeds": "prompt_embeds", "negative_prompt_embeds": "negative_prompt_embeds"},
        {"cross_k": "cross_k", "cross_v": "cross_v"},
    )
    text = (b, preset.text_len, cfg.text_in_dim)
    inputs = {
        "prompt_embeds": InputSpec(
            "prompt_embeds",
            text,
            meaning=PROMPT_MEANING.format(what="prompt", dim=cfg.text_in_dim),
            units="embedding",
            pad_dim=1,
            required=True,
            program=(encode,),
        ),
        "negative_prompt_embeds": InputSpec(
            "negative_prompt_embeds",
            text,
            meaning=PROMPT_MEANING.format(
                what="negative prompt (the unconditional side of guidance)", dim=cfg.text_in_dim
            ),
            units="embedding",
            pad_dim=1,
            required=True,
            program=(encode,),
        ),
    }
    constants = {}
    if preset.num_cond_frames:
        inputs["cond_latent"] = InputSpec(
            "cond_latent",
            lat,
            meaning=f"the clean Wan2.1-VAE latent (normalised) of the conditioning video; its first "
            f"{preset.num_cond_frames} latent frames are kept, the rest is ignored",
            units="latent",
            required=True,
        )
    else:  # text2world: no frame is given, the graph's input is zeros
        constants["cond_latent"] = TensorDecl("cond_latent", lat, "float32", "no conditioning frames (text2world)")
    timesteps, sigmas = karras_schedule(preset.num_steps, preset.sigma_max, preset.sigma_min, preset.rho)
    for k, t in enumerate(timesteps):
        constants[timestep_name(k)] = TensorDecl(
            timestep_name(k), (1,), "int64", f"model timestep of evaluation {k}", t
        )
    draws = {"noise": TensorDecl("noise", lat, "float32", "the clip's initial noise")}
    dit_args = {"cross_k": "cross_k", "cross_v": "cross_v", "cond_latent": "cond_latent", "noise": "noise"}
    steps = unipc_cfg_ops(
        sigmas,
        preset.guidance,
        graph="dit_cfg",
        cond_args=dit_args,
        history=preset.history,
        batched_outs=("cond", "uncond"),
        guidance_base="cond",
        keep_velocity=preset.history,
    )
    program = [{"op": "copy", "src": "noise", "out": "x_0"}, *(op for ops in steps for op in ops)]
    program.append({"op": "mark", "name": "denoise"})
    graphs = {"dit_cfg": DIT_SIG, "encode_prompt": ENCODE_SIG}
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
    tokens = nf * (lh // 2) * (lw // 2)
    evals = len(timesteps)
    flops = 2 * b * evals * forward_flops(cfg, tokens, tokens, preset.text_len)
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
            "sigmas_kind": "karras",
            "num_steps": preset.num_steps,
            "evaluations": evals,
            "guidance": preset.guidance,
            "guidance_form": "c + g*(c - u)",
            "cond_timestep": preset.cond_timestep,
            "timesteps": timesteps,
            "sigmas": sigmas,
        },
        "num_cond_frames": preset.num_cond_frames,
        "num_layers": layers,
        "num_heads": heads,
        "head_dim": hd,
        "text_len": preset.text_len,
        "text_dim": cfg.text_in_dim,
        "fps": 16,
        "block_flops": [flops],
    }
    plan = BlockPlan(
        family="cosmos",
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
