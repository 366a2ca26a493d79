"""Wan2.1 bidirectional T2V / I2V: the fixtures, the UniPC ops, the CLIP tokens and the I2V mask."""

from __future__ import annotations

import pytest
import torch
from conftest import params_or_skip, require_fixtures

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.clip_vision import ClipVision, ClipVisionConfig
from flashdreams.models.family import run_ops
from flashdreams.models.samplers import (
    dit_graph_sig,
    solver_orders,
    timestep_constants,
    unipc_cfg_ops,
    unipc_schedule,
)
from flashdreams.models.wan_config import WanConfig
from flashdreams.models.wan_dit import WanDiT
from flashdreams.models.wan_i2v import first_frame_mask, latent_size
from flashdreams.parity import load_fixture, rel_l2, run_fixture


@pytest.mark.parametrize("fixture_dir", params_or_skip(("wan_t2v_sample", "wan_i2v_forward", "wan_i2v_sample")))
def test_fixture_passes(fixture_dir):
    fixture, checks = run_fixture(fixture_dir)
    declared = {n for n, r in fixture.roles.items() if r in ("expected", "debug")}
    assert {c.name for c in checks} >= declared, "every [expected] and [debug] tensor is compared"
    for c in checks:
        assert c.passed, f"{fixture_dir.name}: {c.name} rel_l2 {c.rel_l2:.3e} > {c.tolerance}"


def test_unipc_timesteps_8_steps_shift_5():
    timesteps, sigmas = unipc_schedule(8, 5.0)
    assert timesteps == [999, 972, 937, 892, 833, 749, 624, 416]
    assert len(sigmas) == 9 and sigmas[-1] == 0.0
    # sigma_max is float32(0.999) (not 1), shifted in float64, then stored as float32.
    u = float(torch.tensor(0.999, dtype=torch.float32))
    assert sigmas[0] == float(torch.tensor(5 * u / (1 + 4 * u), dtype=torch.float32)) and sigmas[0] < 1.0
    assert solver_orders(8) == [1, 2, 2, 2, 2, 2, 2, 1]


def test_unipc_schedule_refuses_bad_input():
    with pytest.raises(InvalidArgumentError):
        unipc_schedule(0, 5.0)
    with pytest.raises(InvalidArgumentError):
        unipc_cfg_ops([0.5, 0.2], 5.0)  # no final 0


def _replay(fixture, ops_per_step):
    """Run the ops with the fixture's stored model outputs as the 'model': the solver alone."""
    p = fixture.params
    timesteps, _ = unipc_schedule(p["sampling_steps"], p["shift"])
    buffers = {"x_0": fixture["noise"].clone(), **timestep_constants(timesteps)}
    buffers["context"] = torch.zeros(1)
    buffers["context_null"] = torch.ones(1)
    step = {"k": 0}

    def call_graph(name, args):
        which = "noise_pred_cond" if float(args["context"].flatten()[0]) == 0 else "noise_pred_uncond"
        return (fixture[which][step["k"]].clone(),)

    for k, ops in enumerate(ops_per_step):
        step["k"] = k
        run_ops(ops, buffers, call_graph, {"dit": dit_graph_sig()})
    return buffers


def test_unipc_ops_replay_the_stored_trajectory():
    """From the stored model outputs, the ops give the reference's x0, corrected and final latents;
    the rolling-name program (what a session keeps) gives the same result; no corrector fails."""
    root = require_fixtures()
    fixture = load_fixture(root / "wan21_t2v_sample")
    p = fixture.params
    _, sigmas = unipc_schedule(p["sampling_steps"], p["shift"])
    steps = p["sampling_steps"]
    buf = _replay(fixture, unipc_cfg_ops(sigmas, p["guide_scale"]))
    assert rel_l2(buf["latents"], fixture["latents"]) < 1e-6
    m = torch.stack([buf[f"m_{k}"] for k in range(steps)])
    xc = torch.stack([buf[f"xc_{k}"] for k in range(steps)])
    assert rel_l2(m, fixture["step_x0_pred"]) < 1e-6
    assert rel_l2(xc, fixture["step_corrected"]) < 1e-6
    # The last step lands exactly on m_{S-1}.
    assert torch.equal(buf["latents"], buf[f"m_{steps - 1}"])

    rolling = _replay(fixture, unipc_cfg_ops(sigmas, p["guide_scale"], history=False))
    assert torch.equal(rolling["latents"], buf["latents"])
    assert not any(name.startswith("m_") and int(name[2:]) >= 3 for name in rolling)

    # Skipping the corrector (x'_k = x_k) must be visible: the check can fail.
    ops = unipc_cfg_ops(sigmas, p["guide_scale"])
    for k, step in enumerate(ops[1:], start=1):
        for i, op in enumerate(step):
            if op.get("out") == f"xc_{k}":
                step[i] = {"op": "copy", "src": f"x_{k}", "out": f"xc_{k}"}
    wrong = _replay(fixture, ops)
    assert rel_l2(wrong["latents"], fixture["latents"]) > 1e-3


def test_clip_gives_257_tokens_from_all_but_the_last_block():
    torch.manual_seed(0)
    cfg = ClipVisionConfig(image_size=32, patch_size=2, dim=16, num_heads=2, num_layers=2, out_dim=8)
    clip = ClipVision(cfg).eval()
    tokens = clip.encode_image(torch.rand(3, 30, 46) * 2 - 1)
    assert tokens.shape == (1, 257, 16)
    # The last block is skipped: changing its weights changes nothing.
    with torch.no_grad():
        clip.transformer[-1].mlp[0].weight.mul_(3)
    assert torch.equal(clip.encode_image(torch.zeros(3, 8, 8)), clip.encode_image(torch.zeros(3, 8, 8)))
    before = clip.encode_image(torch.full((3, 8, 8), 0.3))
    with torch.no_grad():
        clip.transformer[-1].attn.proj.bias.add_(1.0)
    assert torch.equal(before, clip.encode_image(torch.full((3, 8, 8), 0.3)))
    with pytest.raises(InvalidArgumentError):
        ClipVisionConfig.from_dict({"image_size": 32, "patch_size": 2, "post_norm": True})


def test_i2v_mask_is_ones_on_latent_frame_0_only():
    mask = first_frame_mask(21, 4, 6)
    assert mask.shape == (4, 21, 4, 6)
    assert torch.equal(mask[:, 0], torch.ones(4, 4, 6))
    assert torch.equal(mask[:, 1:], torch.zeros(4, 20, 4, 6))
    assert latent_size((30, 46), 2000) == (4, 6)
    assert latent_size((24, 40), 1200) == (2, 4)


def test_i2v_dit_needs_its_conditioning():
    cfg = WanConfig(
        model_type="i2v", in_dim=36, dim=32, ffn_dim=64, num_heads=2, num_layers=1, text_dim=8, text_len=4, clip_dim=8
    )
    torch.manual_seed(0)
    model = WanDiT(cfg).eval()
    x, t, ctx = torch.randn(1, 16, 2, 4, 4), torch.tensor([500]), torch.randn(1, 4, 8)
    y, clip = torch.randn(1, 20, 2, 4, 4), torch.randn(1, 257, 8)
    with torch.no_grad():
        out = model(x, t, ctx, clip_fea=clip, y=y)
        assert out.shape == (1, 16, 2, 4, 4)
        # The image branch matters: other CLIP tokens, another output.
        assert not torch.allclose(out, model(x, t, ctx, clip_fea=clip + 1, y=y))
        k, _ = model.cross_kv(ctx, clip)
        assert k.shape == (1, 1, 257 + 4, 2, 16)
    with pytest.raises(InvalidArgumentError):
        model(x, t, ctx, y=y)  # no CLIP tokens
    with pytest.raises(InvalidArgumentError):
        model(x, t, ctx, clip_fea=clip)  # no y
    with pytest.raises(InvalidArgumentError):
        WanConfig(model_type="i2v", in_dim=16)
    # t2v keeps its identity: clip_dim is not part of a t2v config's dict (engine hash).
    assert "clip_dim" not in WanConfig().to_dict()
