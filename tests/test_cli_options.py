"""The load and build options shared by fd-run, fd-build and fd-bench (flashdreams/cli/options.py).

Fast: nothing is loaded or built; `flashdreams.load`, `build_engine` and `run_config` are
replaced by recorders, so these tests check what each command would pass on.
"""

from __future__ import annotations

import argparse

import pytest

import flashdreams
from flashdreams.cli import bench, build, options, run
from flashdreams.errors import FlashDreamsError, InvalidArgumentError
from flashdreams.export.build_config import BuildConfig

LOAD_FLAGS = {
    "--checkpoint",
    "--preset",
    "--device",
    "--dtype",
    "--attention",
    "--precision",
    "--fp8-keep",
    "--decoder",
    "--decoder-weights",
    "--height",
    "--width",
    "--random-weights",
    "--weights-seed",
}
BUILD_FLAGS = {"--autotune", "--inductor-mode", "--aoti-force"}


class _Stop(FlashDreamsError):
    """Raised by the recorders once they have what a command passed on."""


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def test_every_command_declares_the_load_options():
    for mod in (run, build, bench):
        assert _flags(mod.build_parser()) >= LOAD_FLAGS, mod.__name__
    for mod in (build, bench):
        assert _flags(mod.build_parser()) >= BUILD_FLAGS, mod.__name__
    assert "--seed" in _flags(build.build_parser())  # fd-build's older spelling of --weights-seed


def test_defaults_and_load_kwargs():
    args = run.build_parser().parse_args([])
    assert options.load_kwargs(args) == {
        "source": None,
        "preset": None,
        "device": None,
        "dtype": None,
        "attention": "sdpa",
        "decoder": "preset",
        "height": None,
        "width": None,
        "random_weights": False,
        "weights_seed": 0,
        "decoder_weights": None,
        "precision": "bf16",
        "fp8_keep": None,
    }
    args = run.build_parser().parse_args(
        ["--checkpoint", "c.safetensors", "--decoder", "none", "--precision", "fp8", "--attention", "triton"]
    )
    kw = options.load_kwargs(args)
    assert kw["source"] == "c.safetensors" and kw["decoder"] is None and kw["precision"] == "fp8"
    assert options.load_kwargs(args, attention="sdpa")["attention"] == "sdpa"
    assert build.build_parser().parse_args(["--seed", "3"]).weights_seed == 3
    assert build.build_parser().parse_args(["--weights-seed", "4"]).weights_seed == 4


def test_bench_lists_are_checked_and_kept_as_given():
    p = bench.build_parser()
    args = p.parse_args(["--attention", "sdpa, triton", "--precision", "bf16,fp8"])
    assert options.split_list(args.attention) == ["sdpa", "triton"] and args.precision == "bf16,fp8"
    with pytest.raises(SystemExit):
        p.parse_args(["--attention", "sdpa,flash"])


def test_fd_run_passes_every_load_option_to_load(monkeypatch):
    got = {}

    def fake_load(*args, **kwargs):
        got.update(kwargs, args=args)
        raise _Stop("recorded")

    monkeypatch.setattr(flashdreams, "load", fake_load)
    argv = ["--precision", "fp8", "--attention", "triton", "--weights-seed", "9", "--height", "64", "--no-progress"]
    assert run.main([*argv, "--fp8-keep", r"ffn\."]) == 2
    assert got["precision"] == "fp8" and got["attention"] == "triton" and got["weights_seed"] == 9
    assert got["fp8_keep"] == r"ffn\."
    assert got["height"] == 64 and got["source"] is None and got["args"] == ()


def test_fd_build_passes_load_options_and_its_build_config(monkeypatch, tmp_path):
    import flashdreams.export.build as export_build

    got = {}

    def fake_build_engine(out, **kwargs):
        got.update(kwargs, out=out)
        raise _Stop("recorded")

    monkeypatch.setattr(export_build, "build_engine", fake_build_engine)
    monkeypatch.setenv("FD_INDUCTOR_MODE", "cache")  # a default; the flag below wins
    monkeypatch.setenv("FD_INDUCTOR_AUTOTUNE", "1")
    argv = ["--out", str(tmp_path / "e"), "--seed", "5", "--inductor-mode", "precompiled", "--decoder", "none"]
    assert build.main(argv) == 1
    assert got["checkpoint"] is None and got["seed"] == 5 and got["decoder"] is None and got["precision"] == "bf16"
    assert got["fp8_keep"] is None
    assert got["config"] == BuildConfig(backend="inductor", autotune=True, inductor_mode="precompiled")
    assert got["backend"] == "inductor" and got["batch"] == 1


def test_fd_bench_passes_load_and_build_options(monkeypatch, tmp_path):
    import flashdreams.benchmark.runner as runner

    got = []

    def fake_run_config(cfg, backend, attention, first):
        got.append((backend, attention, cfg.precision, cfg.weights_seed, cfg.decoder_weights, cfg.build_config))
        raise _Stop("recorded")

    monkeypatch.setattr(runner, "run_config", fake_run_config)
    argv = ["--backend", "inductor", "--weights-seed", "2", "--autotune", "--out", str(tmp_path)]
    assert bench.main(argv) == 2
    assert got == [("inductor", "sdpa", "bf16", 2, None, BuildConfig(backend="inductor", autotune=True))]


def test_fp8_keep_is_checked_before_anything_loads_and_reaches_the_fp8_runs_only(monkeypatch, tmp_path, capsys):
    """--fp8-keep needs fp8 among the precisions and a valid regex (named errors, nothing loaded); fd-bench
    hands it to its fp8 runs and not to its bf16 ones."""
    p = run.build_parser()
    with pytest.raises(InvalidArgumentError, match="--fp8-keep needs --precision fp8"):
        options.check_load_args(options.load_kwargs(p.parse_args(["--fp8-keep", "cam"])))
    with pytest.raises(InvalidArgumentError, match="not a regular expression"):
        argv = ["--precision", "fp8", "--attention", "triton", "--fp8-keep", "cam("]
        options.check_load_args(options.load_kwargs(p.parse_args(argv)))
    loads = []
    monkeypatch.setattr(flashdreams, "load", lambda *a, **k: loads.append(k))
    assert run.main(["--fp8-keep", "cam", "--no-progress"]) == 2 and not loads
    assert "--fp8-keep needs --precision fp8" in capsys.readouterr().err

    seen = []

    def fake_load(*args, **kwargs):
        seen.append((kwargs["precision"], kwargs["fp8_keep"]))
        raise RuntimeError("recorded")  # a run that breaks: fd-bench goes on to the next

    monkeypatch.setattr(flashdreams, "load", fake_load)
    argv = ["--attention", "triton", "--precision", "bf16,fp8", "--fp8-keep", r"\.cam_", "--out", str(tmp_path)]
    bench.main(argv)
    assert seen == [("bf16", None), ("fp8", r"\.cam_")]


def test_messages_name_flags_not_python_arguments(capsys):
    p = run.build_parser()
    msg = "preset 'x' needs a checkpoint; pass one, or random_weights=True for speed runs"
    assert options.flag_message(msg, p) == "preset 'x' needs a checkpoint; pass one, or --random-weights for speed runs"
    msg = "pass decoder_weights (fd-run --decoder-weights W.safetensors), or decoder=None for latents"
    assert options.flag_message(msg, p) == (
        "pass --decoder-weights (fd-run --decoder-weights W.safetensors), or --decoder none for latents"
    )
    assert options.flag_message("precision 'fp8' needs attention='triton'", p) == (
        "precision 'fp8' needs --attention triton"
    )
    assert options.flag_message("file my_decoder_weights.safetensors", p) == "file my_decoder_weights.safetensors"
    # fd-build spells the weight seed --seed
    assert options.flag_message("weights_seed=3", build.build_parser()) == "--seed 3"
    with pytest.raises(InvalidArgumentError, match="--precision fp8 needs --attention triton"):
        options.check_load_args(options.load_kwargs(p.parse_args(["--precision", "fp8"])))
    # FP8 linears with FlashAttention-4's bf16 ring attention: accepted here (fa4 itself is checked at load)
    options.check_load_args(options.load_kwargs(p.parse_args(["--precision", "fp8", "--attention", "fa4"])))
    assert run.main(["--precision", "fp8"]) == 2
    assert "--attention triton" in capsys.readouterr().err
