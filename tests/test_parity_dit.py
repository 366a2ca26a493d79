"""fd-parity on every DiT fixture (causal rollouts and bidirectional forwards), and its CLI contract."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import params_or_skip, require_fixtures
from safetensors.torch import load_file, save_file

from flashdreams.cli.parity import main as parity_main
from flashdreams.errors import InvalidArgumentError, NotFoundError
from flashdreams.parity import run_fixture


@pytest.mark.parametrize("fixture_dir", params_or_skip(("causal_wan_rollout", "wan_dit_forward")))
def test_fixture_passes(fixture_dir):
    fixture, checks = run_fixture(fixture_dir)
    expected = [n for n, r in fixture.roles.items() if r == "expected"]
    assert {c.name for c in checks} >= set(expected), "every [expected] tensor is compared"
    for c in checks:
        assert c.passed, f"{fixture_dir.name}: {c.name} rel_l2 {c.rel_l2:.3e} > {c.tolerance}"


@pytest.mark.slow
@pytest.mark.parametrize("fixture_dir", params_or_skip(("causal_wan_rollout",)))
def test_rollout_fixture_passes_with_triton_kernels(fixture_dir):
    """The same rollouts through our Triton kernels (ring attention, fused norms, RoPE + cache write)."""
    from flashdreams.kernels import triton_available

    if not triton_available(torch.device("cpu")):
        pytest.skip("Triton kernels on the CPU need TRITON_INTERPRET=1 set before triton is imported")
    fixture, checks = run_fixture(fixture_dir, attention="triton")
    for c in checks:
        assert c.passed, f"{fixture_dir.name} [triton]: {c.name} rel_l2 {c.rel_l2:.3e} > {c.tolerance}"


def test_cli_passes_and_prints(capsys):
    root = require_fixtures()
    assert parity_main([str(root / "causal_wan_rollout_rolling_sink")]) == 0
    out = capsys.readouterr().out
    assert "output_latents" in out and "rel_l2" in out and "passed" in out


def test_cli_fails_on_a_wrong_reference(tmp_path):
    """A perturbed expected tensor must make fd-parity exit non-zero: the check can fail."""
    root = require_fixtures()
    dst = tmp_path / "fx"
    shutil.copytree(root / "wan_dit_forward", dst)
    io = load_file(str(dst / "io.safetensors"))
    io["output"] = io["output"] * 1.001
    save_file(io, str(dst / "io.safetensors"))
    assert parity_main([str(dst)]) == 1


def test_unknown_kind_and_malformed_fixture(tmp_path):
    (tmp_path / "fixture.json").write_text(
        json.dumps({"kind": "nope", "config": {}, "tensors": {}, "tolerance": {"rel_l2": 1e-4}})
    )
    (tmp_path / "weights.safetensors").write_bytes(b"")
    save_file({}, str(tmp_path / "io.safetensors"))
    with pytest.raises(InvalidArgumentError, match="kind 'nope'"):
        run_fixture(tmp_path)
    assert parity_main([str(tmp_path)]) == 2
    (tmp_path / "fixture.json").write_text("{not json")
    with pytest.raises(InvalidArgumentError, match="not valid JSON"):
        run_fixture(tmp_path)
    with pytest.raises(NotFoundError, match="no fixture.json"):
        run_fixture(tmp_path / "missing")
