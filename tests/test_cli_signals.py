"""Interrupted runs leave nothing behind: fd-run under SIGTERM / SIGINT, and builds killed with SIGKILL."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flashdreams.export.build import remove_stale_builds


def _start_fd_run(cwd: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "flashdreams.cli.run", "--preset", "tiny", "--blocks", "200", "--out", "v.mp4"]
    argv += ["--save-latents", "l.safetensors"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(argv, cwd=cwd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=env)


def _wait_for_blocks(proc: subprocess.Popen, blocks: int, timeout: float = 240.0) -> str:
    """Read fd-run's progress lines on stderr (a pipe: "fd-run: block N/200, ...") until `blocks` are done."""
    seen = ""
    deadline = time.monotonic() + timeout
    fd = proc.stderr.fileno()
    os.set_blocking(fd, False)
    while time.monotonic() < deadline:
        with contextlib.suppress(BlockingIOError):
            seen += os.read(fd, 65536).decode(errors="replace")
        done = [int(n) for n in re.findall(r"block (\d+)/200", seen)]
        if done and max(done) >= blocks:
            return seen
        if proc.poll() is not None:
            raise AssertionError(f"fd-run ended early ({proc.returncode}): {seen}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"fd-run showed no progress in {timeout} s: {seen}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_fd_run_stopped_by_a_signal_leaves_no_files(tmp_path, sig):
    proc = _start_fd_run(tmp_path)
    try:
        _wait_for_blocks(proc, 1)
        deadline = time.monotonic() + 120  # the encoder buffers a few blocks before the file appears
        while not any(p.name.startswith(".v.mp4") for p in tmp_path.iterdir()):
            assert time.monotonic() < deadline and proc.poll() is None, "no partial video appeared"
            time.sleep(0.1)
        proc.send_signal(sig)
        os.set_blocking(proc.stderr.fileno(), True)
        _out, rest = proc.communicate(timeout=120)
        err = rest.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == (143 if sig == signal.SIGTERM else 130), err
    assert "no video written" in err and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == []  # no video, no latents, no temporaries


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has this pid (until the kernel reuses it)


def test_stale_building_folders_are_removed(tmp_path):
    out = tmp_path / "engine"
    stale = tmp_path / f".engine.building-{_dead_pid()}-0123abcd"
    (stale / "graphs").mkdir(parents=True)
    (stale / "graphs" / "dit.bin").write_bytes(b"x" * 100)
    live = tmp_path / f".engine.building-{os.getpid()}-deadbeef"  # a build still running
    live.mkdir()
    other = tmp_path / f".other.building-{_dead_pid()}-0123abcd"  # another output's: not ours to judge
    other.mkdir()
    odd = tmp_path / ".engine.building-notapid"
    odd.mkdir()
    assert remove_stale_builds(out) == [stale]
    assert not stale.exists() and live.exists() and other.exists() and odd.exists()
    assert remove_stale_builds(tmp_path / "missing" / "engine") == []


def test_a_build_removes_what_a_killed_build_left(tmp_path, monkeypatch):
    """build_engine cleans up before it starts (stopped right after, by a failing progress callback)."""
    from flashdreams.export.build import build_engine

    stale = tmp_path / f".engine.building-{_dead_pid()}-0123abcd"
    stale.mkdir()

    class Stop(Exception):
        pass

    def progress(phase, index, total):
        raise Stop(phase)

    with pytest.raises(Stop):
        build_engine(tmp_path / "engine", device="cpu", progress=progress)
    assert os.listdir(tmp_path) == []  # the stale folder and this build's own temporary are gone
