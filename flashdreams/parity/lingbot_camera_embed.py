"""fd-parity kind `lingbot_camera_embed`: camera poses + intrinsics -> ray map -> LingBot's conditioning tokens.

Every step of the fixture set's lingbot.md, "Kind lingbot_camera_embed", is checked on its own
tensor: the rescaled intrinsics, the latent-frame poses, the framewise relative poses, the
per-pixel rays, the 8x8 fold, the (1, 2, 2) patch fold, and the two projections.
"""

from __future__ import annotations

import torch

from flashdreams.models.camera_rays import (
    camera_tokens,
    clip_relative_poses,
    fold_rays,
    latent_pose_frames,
    patch_tokens,
    ray_map,
    rescale_intrinsics,
)
from flashdreams.models.lingbot_dit import LingBotDiT, lingbot_config
from flashdreams.models.wan_config import WanConfig
from flashdreams.parity.common import Check, Fixture, register


def camera_steps(poses_raw: torch.Tensor, intrinsics_raw: torch.Tensor, org_hw, lat_hw, patch) -> dict:
    """The reference's clip preparation, step by step (float32): {fixture tensor name: value}."""
    h, w = lat_hw[0] * 8, lat_hw[1] * 8
    ks = rescale_intrinsics(intrinsics_raw[0], tuple(org_hw), (h, w))
    c2ws = poses_raw[latent_pose_frames(poses_raw.shape[0])]
    rel = clip_relative_poses(c2ws[None])[0]
    rays = ray_map(rel[None], ks[None], h, w)
    emb = fold_rays(rays)
    return {
        "Ks": ks,
        "c2ws_latent": c2ws,
        "c2ws_relative": rel,
        "plucker_pixel": rays[0],
        "c2ws_plucker_emb": emb,
        "cam_tokens_in": patch_tokens(emb, tuple(patch)),
        # The same through the one-call path a session uses (checked against the fold above in tests).
        "_tokens": camera_tokens(rel[None], ks[None], tuple(lat_hw), torch.float32, tuple(patch)),
    }


def camera_projection(fixture: Fixture, device: str) -> LingBotDiT:
    """A LingBotDiT of the fixture's config holding only its camera-projection weights (num_layers 0)."""
    cfg = lingbot_config(WanConfig.from_dict(fixture.config))
    model = LingBotDiT(cfg).to(device).eval()
    sd = fixture.weights()
    missing = [k for k in sd if k not in model.state_dict()]
    if missing:
        from flashdreams.errors import CheckpointError

        raise CheckpointError(f"fixture '{fixture.path.name}': unexpected camera weights {missing}")
    model.load_state_dict(sd, strict=False)
    return model


@register("lingbot_camera_embed")
def run(fixture: Fixture, device: str = "cpu", **_options) -> list[Check]:
    p = fixture.params
    patch = fixture.config.get("patch_size", (1, 2, 2))
    steps = camera_steps(
        fixture["poses_raw"].to(device), fixture["intrinsics_raw"].to(device), p["org_hw"], p["lat_hw"], patch
    )
    model = camera_projection(fixture, device)
    with torch.no_grad():
        embed = model.patch_embedding_wancamctrl(steps["cam_tokens_in"])
        cond = model.camera_cond(steps["cam_tokens_in"])
    outs = {**{k: v for k, v in steps.items() if not k.startswith("_")}, "cam_embed": embed, "cam_cond": cond}
    return [fixture.check(name, value) for name, value in outs.items() if fixture.has(name)]
