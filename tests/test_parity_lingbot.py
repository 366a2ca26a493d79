"""LingBot-World fixtures: the camera embedding step by step and the camera-controlled I2V DiT forward."""

from __future__ import annotations

import pytest
import torch
from conftest import params_or_skip, require_fixtures

from flashdreams.models.camera_rays import clip_relative_poses, fold_rays, latent_pose_frames, ray_map
from flashdreams.parity import load_fixture, rel_l2, run_fixture


@pytest.mark.parametrize("fixture_dir", params_or_skip(("lingbot_camera_embed", "lingbot_dit_forward")))
def test_fixture_passes(fixture_dir):
    fixture, checks = run_fixture(fixture_dir)
    declared = {n for n, r in fixture.roles.items() if r in ("expected", "debug")}
    assert {c.name for c in checks} >= declared, "every [expected] and [debug] tensor is compared"
    for c in checks:
        assert c.passed, f"{fixture_dir.name}: {c.name} rel_l2 {c.rel_l2:.3e} > {c.tolerance}"


def test_camera_quirks_are_visible():
    """The fixture tells the documented mistakes apart: o x d instead of [o, d], poses relative to
    frame 0 instead of frame to frame, no translation normalisation, pixel corners instead of centres."""
    fixture = load_fixture(require_fixtures() / "lingbot_camera_embed")
    p = fixture.params
    h, w = p["lat_hw"][0] * 8, p["lat_hw"][1] * 8
    ks = fixture["Ks"]
    c2ws = fixture["poses_raw"][latent_pose_frames(fixture["poses_raw"].shape[0])]
    rel = clip_relative_poses(c2ws[None])
    good = ray_map(rel, ks[None], h, w)
    assert rel_l2(fold_rays(good), fixture["c2ws_plucker_emb"]) < 1e-5

    moment = torch.cat([torch.cross(good[..., :3], good[..., 3:], dim=-1), good[..., 3:]], dim=-1)
    to_first = torch.linalg.inv(c2ws[:1]) @ c2ws
    to_first[:, :3, 3] /= to_first[:, :3, 3].norm(dim=-1).max()
    unnormalised = rel.clone()
    unnormalised[..., :3, 3] *= 3.0
    corners = ks - torch.tensor([0.0, 0.0, 0.5, 0.5])
    wrong = {
        "o x d": moment,
        "relative to frame 0": ray_map(to_first[None], ks[None], h, w),
        "no normalisation": ray_map(unnormalised, ks[None], h, w),
        "pixel corners": ray_map(rel, corners[None], h, w),
    }
    for name, rays in wrong.items():
        assert rel_l2(rays[0], fixture["plucker_pixel"]) > 1e-3, name
