"""The memory plan of a causal Wan2.2 session, from the plan's buffer declarations and parameter counts.

Nothing here allocates: the figures come from the shapes a plan declares (both experts' KV
rings, the shared cross-attention cache, the decoder's carried state, constants, draws,
inputs) plus the experts' parameter counts (computed from the config, checked against the
modules in tests) and two transient terms: the per-forward DiT activations (an estimate from
the block's token count, stated below) and the Wan VAE decode's working memory (measured on
an H100 at 480x832, bench/results/decoders-h100.json). The decode runs between the denoise
and the commit, when no DiT forward is alive, so the peak takes the larger of the two.
"""

from __future__ import annotations

import math

from flashdreams.models.family import BlockPlan, TensorDecl, dtype_from_name
from flashdreams.models.wan_config import WanConfig

GB, GIB = 1e9, 2**30
# One H200 as the device tool reports it: about 139 GiB usable.
H200_BYTES = 139 * GIB
# Measured eager Wan VAE decode of a 3-latent block at 480x832 in bf16 on an H100
# (bench/results/decoders-h100.json: peak_mem_steady_bytes 8073242112 - state_bytes 1888573440
# - weights 73295603 x 2 bytes): the decoder's transient working memory.
WAN_VAE_DECODE_TRANSIENT_480P = 8073242112 - 1888573440 - 2 * 73295603
WAN_VAE_DECODER_PARAMS = 73295603


def expert_param_count(cfg: WanConfig) -> dict[str, int]:
    """Parameters of one T2V Wan DiT expert and the part the low-noise expert never reads.

    `unused_in_low`: the text embedding and every block's cross-attention k, v and norm_k
    (the shared cross-attention cache is made by the high-noise expert).
    """
    d, f, ff = cfg.dim, cfg.ffn_dim, cfg.freq_dim
    patch = math.prod(cfg.patch_size)
    text = cfg.text_dim * d + d + d * d + d
    top = (
        d * cfg.in_dim * patch
        + d  # patch embedding
        + text
        + ff * d
        + d
        + d * d
        + d  # time embedding
        + 6 * d * d
        + 6 * d  # time projection
        + cfg.out_dim * patch * d
        + cfg.out_dim * patch
        + 2 * d  # head
    )
    attn = 4 * (d * d + d) + 2 * d
    block = 6 * d + 2 * attn + (2 * d if cfg.cross_attn_norm else 0) + 2 * d * f + f + d
    unused = text + cfg.num_layers * (2 * (d * d + d) + d)
    return {"total": top + cfg.num_layers * block, "unused_in_low": unused}


def decl_bytes(decl: TensorDecl) -> int:
    return math.prod(decl.shape) * dtype_from_name(decl.dtype).itemsize


def plan_buffer_bytes(plan: BlockPlan) -> dict[str, int]:
    """Bytes of every buffer the plan declares, grouped (the session allocates exactly these)."""
    out = {"rings": 0, "cross_attention": 0, "decoder_state": 0, "other_state": 0}
    dec = set(plan.meta.get("decoder_state", ()))
    for name, decl in plan.state.items():
        if name.startswith("ring_"):
            out["rings"] += decl_bytes(decl)
        elif name.startswith("cross_"):
            out["cross_attention"] += decl_bytes(decl)
        elif name in dec:
            out["decoder_state"] += decl_bytes(decl)
        else:
            out["other_state"] += decl_bytes(decl)
    out["constants"] = sum(decl_bytes(d) for d in plan.constants.values())
    out["draws"] = sum(decl_bytes(d) for d in plan.draws.values())
    out["inputs"] = sum(math.prod(s.shape) * s.torch_dtype().itemsize for s in plan.inputs.values())
    return out


def block_temporaries_bytes(plan: BlockPlan) -> int:
    """Buffers the block program creates (x, x0, flow per block shape; the decoded video and frames;
    the session's emitted copies): float32 latents, float32 video, uint8 frames."""
    lat = math.prod(plan.latents.shape) * 4
    first = lat * plan.meta.get("first_block_frames", 1) // plan.latents.shape[2]
    total = 4 * (lat + first)  # x, x0, flow and the emitted copy, for both block shapes
    frames = plan.meta.get("video_frames_steady")
    if frames:
        pixels = plan.batch * frames * 3 * plan.meta["height"] * plan.meta["width"]
        total += pixels * 4 + 2 * pixels  # video (float32), frames and their emitted copy (uint8)
    return total


def dit_activation_bytes(cfg: WanConfig, tokens: int, dtype_bytes: int) -> int:
    """An upper estimate of one DiT forward's live activations for a block of `tokens` tokens.

    At most about eight D-wide float32 working tensors (the residual, the normed and modulated
    input, q/k after their float32 norms and RoPE, the attention output) and two FFN-wide tensors
    in the model dtype (the hidden layer before and after GELU) are alive at once; attention
    itself is fused (no score matrix) on CUDA, and the ring is written in place.
    """
    return tokens * (8 * cfg.dim * 4 + 2 * cfg.ffn_dim * dtype_bytes)


def memory_plan(
    plan: BlockPlan,
    cfg: WanConfig,
    dtype_bytes: int = 2,
    decoder_params: int = WAN_VAE_DECODER_PARAMS,
    decode_transient: int = WAN_VAE_DECODE_TRANSIENT_480P,
    encoder_params: int = 0,
) -> dict:
    """The session's device memory, term by term, and its peak (bytes; also in GB and GiB)."""
    params = expert_param_count(cfg)
    high = params["total"] * dtype_bytes
    low = (params["total"] - params["unused_in_low"]) * dtype_bytes
    buffers = plan_buffer_bytes(plan)
    tokens = plan.latents.shape[2] * plan.meta["ring"]["frame_seq_length"] * plan.batch
    has_decoder = bool(plan.meta.get("decoder"))
    persistent = {
        "weights_high_expert": high,
        "weights_low_expert": low,
        "weights_decoder": decoder_params * dtype_bytes if has_decoder else 0,
        "weights_image_encoder": encoder_params * dtype_bytes,
        **{f"buffers_{k}": v for k, v in buffers.items()},
        "block_temporaries": block_temporaries_bytes(plan),
    }
    transient = {
        "dit_forward_activations": dit_activation_bytes(cfg, tokens, dtype_bytes),
        "decode_activations": decode_transient if has_decoder else 0,
    }
    steady = sum(persistent.values())
    peak = steady + max(transient.values())
    return {
        "persistent_bytes": persistent,
        "transient_bytes": transient,
        "steady_bytes": steady,
        "peak_bytes": peak,
        "peak_gb": peak / GB,
        "peak_gib": peak / GIB,
        "fits_h200": peak <= H200_BYTES,
        "params_per_expert": params["total"],
        "params_low_expert_loaded": params["total"] - params["unused_in_low"],
    }
