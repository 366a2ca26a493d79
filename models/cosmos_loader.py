"""Loading the Cosmos DiT from the official (`net.`) or the diffusers `CosmosTransformer3DModel` layout.

The released `.pt` files (Cosmos-Predict2.5 `base/*/<uuid>_ema_bf16.pt`, OmniDreams) store the
model under `net.` together with entries that carry no weights: the RoPE buffers
`pos_embedder.*`, Transformer-Engine `_extra_state` entries and the training counters
`accum_*`. Those are dropped; every parameter must then match exactly. OmniDreams' loader also
drops the padding-mask columns of `x_embedder` (its inference always passes a zero mask), which
`load_cosmos_dit` does when the config has no padding channel and the checkpoint has it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from flashdreams.errors import CheckpointError
from flashdreams.models.checkpoint import read_state_dict, validate_and_load
from flashdreams.models.cosmos_dit import CosmosConfig, CosmosDiT

# diffusers name -> official name (after `net.`); block-level names follow `transformer_blocks.N.`.
_DIFFUSERS_TOP = {
    "patch_embed.proj": "x_embedder.proj.1",
    "time_embed.t_embedder.linear_1": "t_embedder.1.linear_1",
    "time_embed.t_embedder.linear_2": "t_embedder.1.linear_2",
    "time_embed.norm": "t_embedding_norm",
    "crossattn_proj.0": "crossattn_proj.0",
    "norm_out.linear_1": "final_layer.adaln_modulation.1",
    "norm_out.linear_2": "final_layer.adaln_modulation.2",
    "proj_out": "final_layer.linear",
}
_DIFFUSERS_BLOCK = {
    "attn1.to_q": "self_attn.q_proj",
    "attn1.to_k": "self_attn.k_proj",
    "attn1.to_v": "self_attn.v_proj",
    "attn1.to_out.0": "self_attn.output_proj",
    "attn1.norm_q": "self_attn.q_norm",
    "attn1.norm_k": "self_attn.k_norm",
    "attn2.to_q": "cross_attn.q_proj",
    "attn2.to_k": "cross_attn.k_proj",
    "attn2.to_v": "cross_attn.v_proj",
    "attn2.to_out.0": "cross_attn.output_proj",
    "attn2.norm_q": "cross_attn.q_norm",
    "attn2.norm_k": "cross_attn.k_norm",
    "norm1.linear_1": "adaln_modulation_self_attn.1",
    "norm1.linear_2": "adaln_modulation_self_attn.2",
    "norm2.linear_1": "adaln_modulation_cross_attn.1",
    "norm2.linear_2": "adaln_modulation_cross_attn.2",
    "norm3.linear_1": "adaln_modulation_mlp.1",
    "norm3.linear_2": "adaln_modulation_mlp.2",
    "ff.net.0.proj": "mlp.layer1",
    "ff.net.2": "mlp.layer2",
}
_BLOCK_RX = re.compile(r"^transformer_blocks\.(\d+)\.(.+)\.(weight|bias)$")
# Entries of the released files that carry no weights (recomputed buffers, TE state, counters).
_IGNORED_RX = re.compile(r"(^|\.)pos_embedder\.|_extra_state$|^accum_")


def is_diffusers_layout(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("transformer_blocks.", "patch_embed.", "time_embed.")) for k in sd)


def diffusers_to_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename diffusers keys to official ones; unknown keys are kept so validation can name them."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = key
        m = _BLOCK_RX.match(key)
        if m and m.group(2) in _DIFFUSERS_BLOCK:
            new = f"blocks.{m.group(1)}.{_DIFFUSERS_BLOCK[m.group(2)]}.{m.group(3)}"
        elif not m:
            for src, dst in _DIFFUSERS_TOP.items():
                if key.startswith(src + "."):
                    new = dst + key[len(src) :]
                    break
        out[new] = value
    return out


def official_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Either layout -> official keys without `net.`, weightless entries dropped."""
    sd = dict(sd)
    if sd and all(k.startswith("net.") for k in sd if not k.startswith("accum_")):
        sd = {k[4:] if k.startswith("net.") else k: v for k, v in sd.items()}
    elif any(k.startswith("net.") for k in sd):
        sd = {k[4:]: v for k, v in sd.items() if k.startswith("net.")}
    if is_diffusers_layout(sd):
        sd = diffusers_to_official(sd)
    return {k: v for k, v in sd.items() if not _IGNORED_RX.search(k)}


def load_cosmos_dit(
    source: str | Mapping[str, torch.Tensor],
    cfg: CosmosConfig,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> CosmosDiT:
    """A CosmosDiT of `cfg` with the weights of `source` (a file/directory or a state dict)."""
    name = "<state dict>" if isinstance(source, Mapping) else str(source)
    raw = dict(source) if isinstance(source, Mapping) else read_state_dict(source)
    sd = official_state_dict(raw)
    w = sd.get("x_embedder.proj.1.weight")
    if w is not None and not cfg.padding_channel and w.shape[1] == cfg.embed_in + 4:
        sd["x_embedder.proj.1.weight"] = w[:, : cfg.embed_in]  # the padding-mask columns are never used
    with torch.device("meta"):
        model = CosmosDiT(cfg)
    model = model.to_empty(device="cpu").float()
    hint = (
        "is this a Cosmos-Predict2.5 / OmniDreams DiT checkpoint of this size? "
        f"(preset: dim {cfg.dim}, {cfg.num_blocks} blocks, text {cfg.text_in_dim} -> {cfg.text_dim})"
    )
    if not sd:
        raise CheckpointError(f"checkpoint '{name}': no tensors found; {hint}")
    validate_and_load(model, {k: v.float() for k, v in sd.items()}, name, hint)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
