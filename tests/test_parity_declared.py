"""fd-parity checks what a fixture declares: every [expected] tensor is compared, absent ones are skipped.

The fixtures are copied into tmp_path and edited there (the shared set is read-only).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import require_fixtures
from safetensors.torch import load_file, save_file

from flashdreams.cli.parity import main as parity_main
from flashdreams.parity import run_fixture
from flashdreams.parity.common import load_fixture


def _copy_fixture(name: str, dst_root: Path) -> Path:
    """A writable copy of one shared fixture, with its weights materialised if it stores a recipe."""
    src_root = require_fixtures()
    if not (src_root / name).is_dir():
        pytest.skip(f"parity fixture '{name}' not found in {src_root}")
    dst = dst_root / name
    shutil.copytree(src_root / name, dst, copy_function=shutil.copyfile)  # writable files
    dst.chmod(0o755)  # copytree gives the folder the shared set's read-only mode
    if (dst / "weights.recipe.json").is_file():
        # The materializer sits beside the fixtures. Materialise before editing io.safetensors:
        # the recipe records the io file's hash, and the weights are cached by the recipe's hash.
        shutil.copy(src_root / "materialize.py", dst_root / "materialize.py")
        load_fixture(dst)
    return dst


def _edit_fixture(path: Path, add: dict | None = None, remove: tuple[str, ...] = ()) -> None:
    """Add `{name: (tensor, description)}` and drop `remove` from io.safetensors and fixture.json."""
    meta = json.loads((path / "fixture.json").read_text())
    io = load_file(str(path / "io.safetensors"))
    for name in remove:
        del io[name], meta["tensors"][name]
    for name, (tensor, description) in (add or {}).items():
        io[name] = tensor.clone().contiguous()
        meta["tensors"][name] = description
    save_file(io, str(path / "io.safetensors"))
    (path / "fixture.json").write_text(json.dumps(meta, indent=1))


def test_an_expected_tensor_the_runner_does_not_know_fails_by_name(tmp_path, capsys):
    path = _copy_fixture("wan_dit_forward", tmp_path)
    output = load_file(str(path / "io.safetensors"))["output"]
    _edit_fixture(path, add={"output_extra": (output * 2, "[expected] a target no runner produces")})

    fixture, checks = run_fixture(path)
    by_name = {c.name: c for c in checks}
    assert by_name["output"].passed, "the tensors the runner knows are still compared"
    extra = by_name["output_extra"]
    assert not extra.passed and math.isnan(extra.rel_l2) and extra.role == "expected"
    assert "does not compare" in extra.reason and "wan_dit_forward" in extra.reason

    assert parity_main([str(path)]) == 1
    assert "failing: output_extra" in capsys.readouterr().out


def test_debug_and_info_tensors_are_not_demanded(tmp_path):
    """Only [expected] is enforced; an unknown [debug] or [info] tensor does not fail the run."""
    path = _copy_fixture("wan_dit_forward", tmp_path)
    x = load_file(str(path / "io.safetensors"))["x"]
    _edit_fixture(path, add={"extra_debug": (x, "[debug] an intermediate"), "extra_info": (x, "[info] a note")})
    _, checks = run_fixture(path)
    assert [c.name for c in checks] == ["output"] and checks[0].passed


def test_taehv_fixture_without_the_demo_stream_checks_the_rest(tmp_path, monkeypatch):
    path = _copy_fixture("taehv_decode", tmp_path)
    _edit_fixture(path, remove=("video_stream",))

    from flashdreams.models.taehv import TAEHV

    def no_stream(*_args, **_kwargs):
        raise AssertionError("the demo stream was decoded, but the fixture holds no video_stream")

    monkeypatch.setattr(TAEHV, "decode_demo", no_stream)
    fixture, checks = run_fixture(path)
    assert "video_stream" not in fixture.tensors
    assert sorted(c.name for c in checks) == ["video_full", "video_sequential"]
    for c in checks:
        assert c.passed, f"{c.name}: rel_l2 {c.rel_l2:.3e} > {c.tolerance}"


def test_wan_vae_fixture_without_the_stream_videos_checks_the_rest(tmp_path, monkeypatch):
    path = _copy_fixture("wan_vae_decode", tmp_path)
    _edit_fixture(path, remove=("video_stream", "video_stream_raw"))

    from flashdreams.models.wan_vae import WanVAE

    def no_stream(*_args, **_kwargs):
        raise AssertionError("the demo stream was decoded, but the fixture holds no stream video")

    monkeypatch.setattr(WanVAE, "decode_demo", no_stream)
    _, checks = run_fixture(path)
    assert sorted(c.name for c in checks) == ["video_full", "video_full_raw"]
    assert all(c.passed for c in checks)
