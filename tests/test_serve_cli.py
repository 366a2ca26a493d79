"""fd-serve's command line: the page URL is the first line of output, the server stops cleanly on
SIGTERM, and numbers it cannot use are refused before a model loads."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("aiohttp", reason="fd-serve needs aiohttp: pip install -e '.[serve]'")

from flashdreams.cli.serve import build_parser, default_world, main  # noqa: E402


def start(*argv: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flashdreams.cli.serve", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    first = proc.stdout.readline().strip()
    return proc, first


def test_first_line_is_the_page_url_and_sigterm_stops_it():
    proc, first = start("--port", "0", "--token", "a-token-for-the-cli-test")
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/\?token=a-token-for-the-cli-test", first), first
        page = urllib.request.urlopen(first, timeout=30).read().decode()
        assert '<canvas id="video"' in page
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0, proc.stderr.read()
    assert "draining" in proc.stderr.read()


def test_help_and_default_world():
    text = build_parser().format_help()
    for flag in ("--host", "--token", "--max-sessions", "--memory-budget", "--idle-timeout", "--ray", "--preset"):
        assert flag in text
    import flashdreams.presets as presets

    assert default_world() in presets.preset_names()
    want = getattr(presets, "DEFAULT_WORLD", "tiny")
    assert default_world() == (want if want in presets.preset_names() else "tiny")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--port", "70000"], "--port must be in"),
        (["--max-sessions", "0"], "--max-sessions must be at least 1"),
        (["--spare-sessions", "-1"], "--spare-sessions must be >= 0"),
        (["--idle-timeout", "0"], "--idle-timeout must be positive"),
        (["--save-limit-mb", "-1"], "--save-limit-mb must be >= 0"),
        (["--saves-budget-mb", "nan"], "--saves-budget-mb must be >= 0"),
        (["--workers", "2"], "--workers needs --ray"),
        (["--decoder", "none"], "nothing to show"),
        (["--token", "short"], "at least 16 characters"),
        (["--prompt", "a cat"], "--prompt needs --text-encoder"),
        (["--prompt-embeds", "/no/such/file.safetensors"], "does not exist"),
        (["--preset", "no-such-preset"], "preset 'no-such-preset' is unknown"),
    ],
)
def test_refusals_before_loading(argv, message, capsys):
    t0 = time.monotonic()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fd-serve: ") and message in err, err
    assert time.monotonic() - t0 < 20


def test_prompt_embeds_start_every_session_and_a_wrong_width_is_refused(tmp_path):
    import torch
    from safetensors.torch import save_file

    from flashdreams.client import Client
    from flashdreams.errors import InvalidArgumentError
    from flashdreams.serve import start_server

    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    save_file({"prompt_embeds": torch.randn(5, 32)}, str(good))
    save_file({"prompt_embeds": torch.randn(5, 31)}, str(bad))
    with pytest.raises(InvalidArgumentError, match="has shape"):
        start_server(preset="tiny", prompt_embeds=str(bad))
    srv = start_server(preset="tiny", prompt_embeds=str(good), max_sessions=1)
    try:
        with Client(srv.url) as c:
            assert c.next_frame(timeout=60).index == 0
            (sid,) = srv.manager.stepper.sessions
            buf = srv.manager.stepper.sessions[sid].buffers["prompt_embeds"]
            from safetensors.torch import load_file

            want = load_file(str(good))["prompt_embeds"]
            assert torch.equal(buf[0, :5], want) and not buf[0, 5:].any()  # the file's rows, zero-padded
    finally:
        srv.stop()
