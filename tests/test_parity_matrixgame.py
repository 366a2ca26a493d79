"""Matrix-Game 2.0 parity: the four public fixtures through fd-parity's runners (eager and Triton)."""

from __future__ import annotations

import pytest
import torch
from conftest import params_or_skip

from flashdreams.parity import run_fixture

KINDS = ("matrixgame_action_module", "matrixgame_dit_forward", "matrixgame_rollout")


@pytest.mark.parametrize("fixture_dir", params_or_skip(KINDS))
def test_fixture_passes(fixture_dir):
    fixture, checks = run_fixture(fixture_dir)
    compared = {c.name for c in checks}
    declared = {n for n, r in fixture.roles.items() if r in ("expected", "debug")}
    assert compared >= declared, f"not compared: {sorted(declared - compared)}"
    for c in checks:
        assert c.passed, f"{fixture_dir.name}: {c.name} rel_l2 {c.rel_l2:.3e} > {c.tolerance}"


@pytest.mark.parametrize("fixture_dir", params_or_skip(("matrixgame_rollout",)))
def test_rollout_passes_with_triton_kernels(fixture_dir):
    from flashdreams.kernels import triton_available

    if not triton_available(torch.device("cpu")):
        pytest.skip("Triton kernels on the CPU need TRITON_INTERPRET=1 set before triton is imported")
    _, checks = run_fixture(fixture_dir, attention="triton")
    for c in checks:
        assert c.passed, f"{fixture_dir.name} [triton]: {c.name} rel_l2 {c.rel_l2:.3e} > {c.tolerance}"


@pytest.mark.parametrize("fixture_dir", params_or_skip(("matrixgame_rollout",)))
def test_rollout_check_can_fail(fixture_dir, monkeypatch):
    """Actions one video frame late (the window covering its own frames) must fail the rollout."""
    from flashdreams.models import action_module

    real = action_module.block_window_index
    monkeypatch.setattr(
        "flashdreams.models.families.matrixgame.steps.block_window_index",
        lambda nf, ratio, window: [[r + 1 for r in row] for row in real(nf, ratio, window)],
    )
    _, checks = run_fixture(fixture_dir)
    by_name = {c.name: c for c in checks}
    assert not by_name["output_latents"].passed and by_name["output_latents"].rel_l2 > 1e-3


@pytest.mark.parametrize("fixture_dir", params_or_skip(("matrixgame_rollout",)))
def test_action_script_reproduces_the_demo_assembly(fixture_dir):
    """The per-frame script of the fixture's per-block demo actions gives its keyboard/mouse rows:
    block 0 = video frames 0..8, block b >= 1 the next 12 (the streaming demo's rule)."""
    from flashdreams.models.families.matrixgame.actions import script_frames, video_frames
    from flashdreams.parity.common import load_fixture

    fixture = load_fixture(fixture_dir)
    if fixture.params.get("mode", "universal") != "universal":
        pytest.skip("the demo letters below are the universal mode's")
    cam = {"i": [0.1, 0.0], "k": [-0.1, 0.0], "j": [0.0, -0.1], "l": [0.0, 0.1], "u": [0.0, 0.0]}
    script = []
    for b, (keys, look) in enumerate(fixture.params["block_actions"]):
        entry = {"keys": [] if keys == "q" else list(keys), "mouse": cam[look]}
        script += [entry] * (9 if b == 0 else 12)
    n = video_frames(len(fixture.params["block_actions"]), 12, 9)
    kb, ms = script_frames(script, ("w", "s", "a", "d"), True, n)
    assert torch.equal(kb[None], fixture["keyboard_cond"])
    assert torch.allclose(ms[None], fixture["mouse_cond"])
