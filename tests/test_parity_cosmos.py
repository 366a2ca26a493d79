"""Cosmos-Predict2.5: the public fixtures pass (forward in both key layouts, the Karras UniPC + CFG sampler),
and the documented mistakes are caught by them."""

from __future__ import annotations

import pytest
import torch
from conftest import params_or_skip, require_fixtures

from flashdreams.models import cosmos_dit
from flashdreams.parity import load_fixture, run_fixture


@pytest.mark.parametrize("fixture_dir", params_or_skip(("cosmos_dit_forward", "cosmos_sample")))
def test_fixture_passes(fixture_dir):
    fixture, checks = run_fixture(fixture_dir)
    declared = {n for n, r in fixture.roles.items() if r in ("expected", "debug")}
    assert {c.name for c in checks} >= declared, "every [expected] and [debug] tensor is compared"
    for c in checks:
        assert c.passed, f"{fixture_dir.name}: {c.name} rel_l2 {c.rel_l2:.3e} > {c.tolerance}"


def _output_error(monkeypatch, name: str, replacement) -> float:
    root = require_fixtures()
    if not (root / "cosmos_dit_forward").is_dir():
        pytest.skip("cosmos_dit_forward fixture not found")
    monkeypatch.setattr(cosmos_dit, name, replacement)
    _, checks = run_fixture(root / "cosmos_dit_forward")
    return {c.name: c for c in checks}["output"].rel_l2


def test_interleaved_rope_is_caught(monkeypatch):
    """RoPE pairs (2k, 2k+1) instead of rotate-half: cosmos.md measures 1.0e-1."""

    def interleaved(x, cos, sin):
        xf = x.float()
        pairs = xf.unflatten(-1, (-1, 2))
        rot = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        return (xf * cos[None, :, None, :] + rot * sin[None, :, None, :]).to(x.dtype)

    assert _output_error(monkeypatch, "rope_rotate_half", interleaved) > 1e-2


def test_sinusoid_order_is_caught(monkeypatch):
    """[sin, cos] instead of [cos, sin]: cosmos.md measures 1.4."""
    original = cosmos_dit.timestep_sinusoid

    def swapped(t, dim, scale):
        return original(t, dim, scale).roll(dim // 2, dims=-1)

    assert _output_error(monkeypatch, "timestep_sinusoid", swapped) > 0.1


def test_karras_schedule_matches_the_fixture_and_ignores_shift():
    root = require_fixtures()
    if not (root / "cosmos_sample").is_dir():
        pytest.skip("cosmos_sample fixture not found")
    from flashdreams.models.samplers import karras_schedule

    fixture = load_fixture(root / "cosmos_sample")
    timesteps, sigmas = karras_schedule(fixture.params["num_steps"])
    assert timesteps == fixture.params["timesteps_int"]
    assert sigmas == fixture.params["sigmas"] and len(sigmas) == len(timesteps) + 1 and sigmas[-1] == 0.0
