"""fd-run refuses bad paths, files and numbers before it loads a model; fractional frame rates stay exact."""

from __future__ import annotations

import os
from fractions import Fraction

import pytest
import torch
from safetensors.torch import save_file

import flashdreams
from flashdreams.cli.run import main as run_main
from flashdreams.session import Session
from flashdreams.video import frame_rate, write_video


class _Loaded(Exception):
    """flashdreams.load was called (the checks should have refused the run first)."""


@pytest.fixture
def no_load(monkeypatch):
    def fake_load(*_args, **_kwargs):
        raise _Loaded("flashdreams.load was called")

    monkeypatch.setattr(flashdreams, "load", fake_load)


def _files(tmp_path):
    save_file({"a": torch.randn(16, 32), "b": torch.randn(2)}, str(tmp_path / "two.safetensors"))
    save_file({"prompt_embeds": torch.randn(2, 3, 4, 5)}, str(tmp_path / "rank4.safetensors"))
    save_file({"prompt_embeds": torch.zeros(4, 32, dtype=torch.int64)}, str(tmp_path / "ints.safetensors"))
    (tmp_path / "text.safetensors").write_text("not a safetensors file")
    (tmp_path / "dir.mp4").mkdir()


BEFORE_LOAD = [
    (["--out", "{tmp}/missing/x.mp4"], "--out: the folder"),
    (["--out", "{tmp}/x.txt"], "use one of the suffixes"),
    (["--out", "{tmp}/x"], "use one of the suffixes"),
    (["--out", "{tmp}/dir.mp4"], "is a directory"),
    (["--save-latents", "{tmp}/missing/l.safetensors"], "--save-latents: the folder"),
    (["--save-latents", "{tmp}/l.pt"], "must end in .safetensors"),
    (["--prompt-embeds", "{tmp}/nope.safetensors"], "does not exist"),
    (["--prompt-embeds", "{tmp}/text.safetensors"], "is not a readable safetensors file"),
    (["--prompt-embeds", "{tmp}/two.safetensors"], "holds 2 tensors; keep one, or name it 'prompt_embeds'"),
    (["--prompt-embeds", "{tmp}/rank4.safetensors"], "[T, D] or [B, T, D]"),
    (["--prompt-embeds", "{tmp}/ints.safetensors"], "expected floats"),
    (["--prompt", "a cat"], "--text-encoder"),
    (["--prompt", "a cat", "--prompt-embeds", "{tmp}/two.safetensors"], "not both"),
    (["--text-encoder", "{tmp}/no-encoder"], "--text-encoder"),
    (["--decoder-weights", "{tmp}/nope.safetensors"], "--decoder-weights"),
    (["--fps", "0"], "--fps must be a positive number"),
    (["--fps", "-2"], "--fps must be a positive number"),
    (["--fps", "nan"], "--fps must be a positive number"),
    (["--fps", "inf"], "--fps must be a positive number"),
    (["--height", "70"], "--height/--width"),
    (["--width", "100"], "multiples of 16"),
    (["--height", "0"], "--height must be a positive"),
    (["--width", "-16"], "--width must be a positive"),
    (["--blocks", "0"], "--blocks must be at least 1"),
    (["--seed", "-1"], "--seed must be in [0, 2**63)"),
    (["--seed", str(2**63)], "--seed must be in [0, 2**63)"),
]


@pytest.mark.parametrize("argv, message", BEFORE_LOAD, ids=[" ".join(a) for a, _ in BEFORE_LOAD])
def test_refused_before_the_model_loads(argv, message, tmp_path, capsys, no_load, monkeypatch):
    _files(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert run_main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fd-run: ") and message in err, err
    assert "Traceback" not in err and "_" not in err.split("'")[0]  # flags, not Python argument names
    assert not (tmp_path / "flashdreams.mp4").exists() and not (tmp_path / "missing").exists()


def test_no_out_check_without_a_decoder(tmp_path, monkeypatch):
    """--decoder none writes no video, so an --out it would not use is not refused."""
    monkeypatch.chdir(tmp_path)
    assert run_main(["--decoder", "none", "--out", "x.txt", "--blocks", "1", "--no-progress"]) == 0
    assert not (tmp_path / "x.txt").exists()


def test_prompt_width_is_checked_after_load_before_any_block(tmp_path, capsys, monkeypatch):
    def no_step(self, *a, **k):
        raise AssertionError("a block ran")

    monkeypatch.setattr(Session, "step", no_step)
    for shape in ([16, 99], [2, 16, 32], [17, 32]):  # width, batch, length
        save_file({"prompt_embeds": torch.randn(shape)}, str(tmp_path / "p.safetensors"))
        argv = ["--prompt-embeds", str(tmp_path / "p.safetensors"), "--out", str(tmp_path / "v.mp4"), "--no-progress"]
        assert run_main(argv) == 2
        err = capsys.readouterr().err
        assert f"has shape {shape}; tiny takes [T, 32] or [1, T, 32] with T <= 16" in err, err
        assert not (tmp_path / "v.mp4").exists()
        assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".webm"])
def test_fractional_fps_is_written_exactly(tmp_path, suffix):
    import av

    path = tmp_path / f"v{suffix}"
    frames = torch.randint(0, 255, (15, 32, 48, 3), dtype=torch.uint8)
    write_video(path, [frames], fps=7.5)
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        assert stream.average_rate == Fraction(15, 2)
        decoded = list(c.decode(video=0))
    assert len(decoded) == 15
    assert float(decoded[-1].pts * decoded[-1].time_base) == pytest.approx(14 / 7.5, abs=1e-3)  # mkv: ms


def test_fd_run_fps_7_5(tmp_path, capsys):
    import av

    out = tmp_path / "v.mp4"
    assert run_main(["--blocks", "1", "--fps", "7.5", "--out", str(out), "--no-progress"]) == 0
    assert "at 7.5 fps" in capsys.readouterr().out
    with av.open(str(out)) as c:
        assert c.streams.video[0].average_rate == Fraction(15, 2)


def test_frame_rate_fractions():
    assert frame_rate(16.0) == 16 and frame_rate(7.5) == Fraction(15, 2)
    assert frame_rate(24000 / 1001) == Fraction(24000, 1001) and frame_rate(29.97) == Fraction(2997, 100)
    for bad in (0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(flashdreams.FlashDreamsError):
            frame_rate(bad)


def test_latents_file_is_written_whole_or_not_at_all(tmp_path, monkeypatch, capsys):
    """A run that fails after its blocks leaves neither the video nor the latents (nor a temporary)."""
    import flashdreams.video as video

    def broken_close(self):
        raise flashdreams.FlashDreamsError("disk full")

    monkeypatch.setattr(video.VideoWriter, "close", broken_close)
    argv = ["--blocks", "1", "--out", str(tmp_path / "v.mp4"), "--save-latents", str(tmp_path / "l.safetensors")]
    assert run_main([*argv, "--no-progress"]) == 2
    assert "disk full" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
