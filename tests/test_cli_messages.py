"""What the CLIs print: fd-bench's precision label, flag names in errors, fd-convert and fd-parity output."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from flashdreams.benchmark.report import precision_label, table
from flashdreams.cli import bench, build, convert, options, parity, run
from flashdreams.errors import FlashDreamsError, InvalidArgumentError
from flashdreams.parity.common import Check


def test_precision_label_says_what_ran():
    assert precision_label("bf16", torch.float32) == "fp32"
    assert precision_label("bf16", "float32") == "fp32"
    assert precision_label("bf16", torch.bfloat16) == "bf16"
    assert precision_label("bf16", torch.float16) == "fp16"
    assert precision_label("fp8", torch.bfloat16) == "fp8"


def test_fd_bench_on_cpu_labels_float32_runs(tmp_path, capsys):
    out = tmp_path / "b"
    argv = ["--blocks", "2", "--rollouts", "1", "--out", str(out), "--quick-ceilings", "--decoder", "none"]
    assert bench.main([*argv, "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    res = json.loads((out / "results.json").read_text())
    (r,) = res["runs"]
    assert (r["precision"], r["dtype"], r["precision_option"]) == ("fp32", "float32", "bf16")
    assert res["config"]["precision"] == "fp32"
    assert "bf16" not in table(res) and "eager/sdpa/fp32" in captured.err + captured.out
    row = next(line for line in table(res).splitlines() if line.startswith("eager"))
    assert row.split()[:3] == ["eager", "sdpa", "fp32"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rollouts", "0"], "--rollouts must be at least 1"),
        (["--steady-blocks", "-1"], "--steady-blocks"),
        (["--seed", "-1"], "--seed must be in [0, 2**63)"),
        (["--height", "70"], "--height/--width"),
    ],
)
def test_fd_bench_refuses_bad_numbers(argv, message, tmp_path, capsys):
    assert bench.main([*argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_flag_message_keeps_quoted_names_and_says_a_flag_once():
    p = run.build_parser()
    msg = "'p.safetensors' holds 2 tensors; keep one, or name it 'prompt_embeds'"
    assert options.flag_message(msg, p) == msg  # a tensor's name, not the --prompt-embeds flag
    bp = build.build_parser()
    msg = "'e' already holds an engine; pass --force (force=True) to replace it"
    assert options.flag_message(msg, bp) == "'e' already holds an engine; pass --force to replace it"
    assert options.flag_message("needs random_weights=True", bp) == "needs --random-weights"


@pytest.mark.parametrize("mod", [run, build, bench], ids=["fd-run", "fd-build", "fd-bench"])
def test_every_load_error_names_flags(mod, monkeypatch, tmp_path, capsys):
    """A library error naming Python arguments reaches each command's user as flags."""
    import flashdreams
    import flashdreams.benchmark.runner as runner
    import flashdreams.export.build as export_build

    def fail(*_a, **_k):
        raise InvalidArgumentError("pass decoder_weights, or decoder=None, or random_weights=True")

    monkeypatch.setattr(flashdreams, "load", fail)
    monkeypatch.setattr(export_build, "build_engine", fail)
    monkeypatch.setattr(runner, "run_config", fail)
    monkeypatch.chdir(tmp_path)
    argv = {"run": ["--no-progress"], "build": ["--out", "e"], "bench": ["--out", "b"]}[mod.__name__.split(".")[-1]]
    assert mod.main(argv) == 2
    err = capsys.readouterr().err
    assert "pass --decoder-weights, or --decoder none, or --random-weights" in err, err


def test_fd_convert_names_itself_once(tmp_path, capsys):
    assert convert.main([str(tmp_path / "missing.pt"), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fd-convert: ") and "fd-convert: fd-convert:" not in err and "does not exist" in err
    torch.save({"w": torch.zeros(2)}, tmp_path / "w.pt")
    assert convert.main([str(tmp_path / "w.pt"), str(tmp_path / "w.bin")]) == 2
    err = capsys.readouterr().err
    assert err.count("fd-convert:") == 1 and ".safetensors" in err


def _fake_fixture(monkeypatch, checks):
    import flashdreams.parity as fp

    fixture = SimpleNamespace(path=SimpleNamespace(name="fx"), kind="causal_wan_rollout")
    monkeypatch.setattr(fp, "run_fixture", lambda *a, **k: (fixture, checks))


def test_fd_parity_prints_why_a_check_failed(monkeypatch, capsys):
    checks = [
        Check("latents_block_0", 2e-7, 1e-4),
        Check("frames", math.nan, 1e-4, reason="the runner did not compare this [expected] tensor"),
    ]
    _fake_fixture(monkeypatch, checks)
    assert parity.main(["somewhere"]) == 1
    out = capsys.readouterr().out
    assert "FAIL frames" in out and "the runner did not compare this [expected] tensor" in out
    assert "1/2 passed; failing: frames" in out


def test_fd_parity_with_no_checks_fails_without_a_traceback(monkeypatch, capsys):
    _fake_fixture(monkeypatch, [])
    assert parity.main(["somewhere"]) == 1
    assert "compared nothing" in capsys.readouterr().err


def test_fd_parity_errors_name_flags(monkeypatch, capsys):
    import flashdreams.parity as fp

    def fail(*_a, **_k):
        raise FlashDreamsError("fixture needs attention='triton'")

    monkeypatch.setattr(fp, "run_fixture", fail)
    assert parity.main(["somewhere"]) == 2
    assert "fd-parity: fixture needs --attention triton" in capsys.readouterr().err


def test_fixture_skip_reasons_say_where_they_looked(monkeypatch, tmp_path):
    import conftest

    monkeypatch.setenv("FD_FIXTURES", str(tmp_path / "nowhere"))
    with pytest.raises(pytest.skip.Exception) as info:
        conftest.require_fixtures()
    reason = str(info.value)
    assert str(tmp_path / "nowhere") in reason and "None" not in reason
    (param,) = conftest.params_or_skip(("causal_wan_rollout",))
    (mark,) = param.marks
    assert str(tmp_path / "nowhere") in mark.kwargs["reason"] and "None" not in mark.kwargs["reason"]
