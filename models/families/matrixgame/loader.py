"""Loading the released Matrix-Game 2.0 checkpoints (`model.` + CausalWanModel keys) into MatrixGameDiT."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from flashdreams.models.action_module import ActionConfig
from flashdreams.models.checkpoint import read_state_dict, strip_prefixes, validate_and_load
from flashdreams.models.matrixgame_dit import MatrixGameDiT
from flashdreams.models.wan_config import WanConfig


def load_matrixgame_dit(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    cfg: WanConfig,
    action: ActionConfig,
    visual_context_dim: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> MatrixGameDiT:
    """The DiT with a checkpoint's weights (a file, a folder, or a state dict); any key or shape
    mismatch is refused whole (a checkpoint of another mode names the mode's action keys)."""
    name = "<state dict>" if isinstance(source, Mapping) else str(source)
    sd = strip_prefixes(dict(source) if isinstance(source, Mapping) else read_state_dict(source))
    with torch.device("meta"):
        model = MatrixGameDiT(cfg, action, visual_context_dim)
    model = model.to_empty(device=device).to(dtype)
    validate_and_load(
        model,
        sd,
        name,
        hint="is this a Matrix-Game 2.0 checkpoint of the preset's mode (universal: base_distill, gta_drive: "
        "gta_keyboard2dim, templerun: templerun_7dim_onlykey)?",
    )
    return model.eval().requires_grad_(False)
