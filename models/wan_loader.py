"""Loading a Wan2.1 DiT from a checkpoint in the Wan or the diffusers key layout."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from flashdreams.errors import CheckpointError
from flashdreams.models.checkpoint import (
    find_weights,
    max_index,
    read_state_dict,
    strip_prefixes,
    validate_and_load,
)
from flashdreams.models.wan_config import WanConfig
from flashdreams.models.wan_dit import WanDiT

# diffusers WanTransformer3DModel name -> Wan name (block-level names after `blocks.N.`).
_DIFFUSERS_TOP = {
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "scale_shift_table": "head.modulation",
    "proj_out": "head.head",
    "patch_embedding": "patch_embedding",
}
_DIFFUSERS_BLOCK = {
    "scale_shift_table": "modulation",
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    # The names are swapped: diffusers' norm2 is the affine cross-attention pre-norm (Wan's norm3).
    "norm2": "norm3",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
_BLOCK_RX = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$|^blocks\.(\d+)\.(scale_shift_table)$")


def is_diffusers_layout(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("condition_embedder.") or ".attn1." in k for k in sd)


def diffusers_to_wan(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename diffusers keys to Wan keys; unknown keys are kept so validation can name them."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = key
        m = _BLOCK_RX.match(key)
        if m:
            idx, name, suffix = (m.group(1), m.group(2), m.group(3)) if m.group(1) else (m.group(4), m.group(5), None)
            if name in _DIFFUSERS_BLOCK:
                new = f"blocks.{idx}.{_DIFFUSERS_BLOCK[name]}" + (f".{suffix}" if suffix else "")
        else:
            for src, dst in _DIFFUSERS_TOP.items():
                if key == src or key.startswith(src + "."):
                    new = dst + key[len(src) :]
                    break
        if new in ("head.modulation",) or new.endswith(".modulation"):
            value = value.reshape(1, -1, value.shape[-1])
        out[new] = value
    return out


def infer_config(sd: Mapping[str, torch.Tensor], base: WanConfig | None = None) -> WanConfig:
    """A WanConfig from the tensor shapes (Wan layout); num_heads assumes head_dim 128 unless `base` says."""
    try:
        dim, in_dim = sd["patch_embedding.weight"].shape[:2]
        patch = tuple(sd["patch_embedding.weight"].shape[2:])
        ffn_dim = sd["blocks.0.ffn.0.weight"].shape[0]
        text_dim = sd["text_embedding.0.weight"].shape[1]
        freq_dim = sd["time_embedding.0.weight"].shape[1]
        out_dim = sd["head.head.weight"].shape[0] // (patch[0] * patch[1] * patch[2])
    except KeyError as exc:
        raise CheckpointError(
            f"checkpoint has no {exc} tensor, so it is not a Wan DiT (Wan or diffusers layout)"
        ) from None
    base = base or WanConfig()
    # An I2V checkpoint carries the image projection; its first Linear gives the CLIP width.
    i2v = (
        {"model_type": "i2v", "clip_dim": int(sd["img_emb.proj.1.weight"].shape[1])}
        if "img_emb.proj.1.weight" in sd
        else {}
    )
    heads = base.num_heads if base.dim == dim else max(1, dim // 128)
    return base.replace(
        dim=int(dim),
        in_dim=int(in_dim),
        patch_size=patch,
        ffn_dim=int(ffn_dim),
        text_dim=int(text_dim),
        freq_dim=int(freq_dim),
        out_dim=int(out_dim),
        num_heads=int(heads),
        num_layers=max_index(sd, r"^blocks\.(\d+)\."),
        cross_attn_norm="blocks.0.norm3.weight" in sd,
        **i2v,
    )


def select_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix` (e.g. 'dit.' of a file that also holds 'clip.' and 'vae.'), prefix removed."""
    out = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if not out:
        roots = sorted({k.split(".", 1)[0] + "." for k in sd})
        raise CheckpointError(f"checkpoint has no tensor under '{prefix}' (its key roots: {', '.join(roots[:8])})")
    return out


def wan_state_dict(source: str | os.PathLike | Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Read a checkpoint and bring it to plain Wan keys (prefixes stripped, diffusers renamed).

    `prefix` first keeps only the keys under it (a combined file, e.g. 'dit.').
    """
    sd = read_state_dict(source) if not isinstance(source, Mapping) else dict(source)
    if prefix:
        sd = select_prefix(sd, prefix)
    sd = strip_prefixes(sd)
    return diffusers_to_wan(sd) if is_diffusers_layout(sd) else sd


def read_config(path: str | os.PathLike) -> WanConfig | None:
    """config.json beside (or in) a checkpoint, in Wan or diffusers names; None if absent."""
    p = Path(path)
    weights = find_weights(p)
    for cand in (p / "config.json" if p.is_dir() else None, weights.parent / "config.json"):
        if cand is not None and cand.is_file():
            try:
                return WanConfig.from_dict(json.loads(cand.read_text()))
            except (json.JSONDecodeError, TypeError) as exc:
                raise CheckpointError(f"config '{cand}' is not a valid Wan config: {exc}") from None
    return None


def load_wan_dit(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    config: WanConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    prefix: str = "",
) -> WanDiT:
    """A WanDiT with the checkpoint's weights; refuses any key or shape mismatch whole.

    `prefix` selects the DiT's keys in a combined file (e.g. 'dit.' of the I2V fixtures).
    """
    name = str(source) if not isinstance(source, Mapping) else "<state dict>"
    sd = wan_state_dict(source, prefix)
    if config is None and not isinstance(source, Mapping):
        config = read_config(source)
    if config is None:
        config = infer_config(sd)
    with torch.device("meta"):
        model = WanDiT(config)
    model = model.to_empty(device=device).to(dtype)
    validate_and_load(
        model,
        sd,
        name,
        hint="is this a Wan2.1 DiT checkpoint (Wan or diffusers layout) of the preset's size?",
    )
    return model.eval().requires_grad_(False)
