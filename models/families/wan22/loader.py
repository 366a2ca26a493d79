"""Loading the two experts of causal Wan2.2 A14B from the released diffusers layout.

The released `FastVideo/CausalWan2.2-*-A14B-*-Diffusers` folders keep one
`WanTransformer3DModel` per expert: `transformer/` (the high-noise expert) and
`transformer_2/` (the low-noise expert), each a sharded safetensors index with diffusers key
names. The parity fixture holds both in one file under the prefixes `transformer.` and
`transformer_2.`. Either way each expert is renamed to Wan keys (models/wan_loader.py) and
validated whole before anything is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from flashdreams.errors import CheckpointError, NotFoundError
from flashdreams.models.checkpoint import read_state_dict, validate_and_load
from flashdreams.models.wan_config import WanConfig
from flashdreams.models.wan_dit import WanDiT
from flashdreams.models.wan_loader import wan_state_dict

# Expert -> its folder in the release and its key prefix in a combined file.
EXPERT_FOLDERS = {"high": "transformer", "low": "transformer_2"}


def _split_combined(sd: Mapping[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for expert, folder in EXPERT_FOLDERS.items():
        prefix = folder + "."
        part = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        if not part:
            roots = sorted({k.split(".", 1)[0] for k in sd})[:6]
            raise CheckpointError(
                f"checkpoint '{source}' has no tensors under '{prefix}' (the {expert}-noise expert); a two-expert "
                f"file keeps them under 'transformer.' and 'transformer_2.' (its key roots: {', '.join(roots)})"
            )
        out[expert] = part
    stray = sorted(k for k in sd if not k.startswith(tuple(f + "." for f in EXPERT_FOLDERS.values())))
    if stray:
        raise CheckpointError(
            f"checkpoint '{source}' holds {len(stray)} keys outside 'transformer.' / 'transformer_2.' "
            f"({', '.join(stray[:4])}); is it a two-expert Wan2.2 checkpoint?"
        )
    return out


def expert_state_dicts(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
) -> dict[str, dict[str, torch.Tensor]]:
    """{"high": sd, "low": sd} in Wan key names, from a release folder, a combined file or a state dict.

    A folder must hold `transformer/` and `transformer_2/` (each a .safetensors file or a sharded
    `.safetensors.index.json`); a file or state dict must prefix every key with its expert's folder.
    """
    if isinstance(source, Mapping):
        parts = _split_combined(source, "<state dict>")
    else:
        path = Path(source)
        if path.is_dir() and any((path / f).exists() for f in EXPERT_FOLDERS.values()):
            absent = [f for f in EXPERT_FOLDERS.values() if not (path / f).is_dir()]
            if absent:
                raise NotFoundError(
                    f"Wan2.2 checkpoint '{path}' lacks the expert folder(s) {absent}: both 'transformer/' (high "
                    "noise) and 'transformer_2/' (low noise) are needed"
                )
            parts = {e: read_state_dict(path / f) for e, f in EXPERT_FOLDERS.items()}
        else:
            parts = _split_combined(read_state_dict(path), str(path))
    return {e: wan_state_dict(sd) for e, sd in parts.items()}


def load_expert(
    sd: Mapping[str, torch.Tensor], cfg: WanConfig, expert: str, device: torch.device, dtype: torch.dtype, source: str
) -> WanDiT:
    """One expert with its weights, allocated directly in `dtype` on `device`; refuses any mismatch whole."""
    with torch.device("meta"):
        model = WanDiT(cfg)
    model = model.to(dtype).to_empty(device=device)
    validate_and_load(
        model,
        sd,
        f"{source} ({EXPERT_FOLDERS[expert]}, the {expert}-noise expert)",
        hint="is this a causal Wan2.2 A14B expert (diffusers or Wan layout) of the preset's size?",
    )
    return model.eval().requires_grad_(False)


def drop_unused_cross_kv_(model: WanDiT) -> int:
    """Free the weights the low-noise expert never uses; returns how many parameters were freed.

    The reference fills one cross-attention cache with the high-noise expert's text embedding
    and K/V projections and hands it to both experts (fixtures' wan22.md, "Caches"), so the
    low-noise expert's `text_embedding` and per-layer `cross_attn.k/v/norm_k` are never read:
    4.3 GB of bf16 at 14B.
    """
    freed = sum(p.numel() for p in model.text_embedding.parameters())
    model.text_embedding = None
    for blk in model.blocks:
        ca = blk.cross_attn
        for name in ("k", "v", "norm_k"):
            freed += sum(p.numel() for p in getattr(ca, name).parameters())
            setattr(ca, name, None)
    return freed
