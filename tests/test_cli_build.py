"""fd-build on the built-in model: it removes what a killed build left, and --check prints what it verified."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flashdreams.cli.build import main as fd_build
from flashdreams.export.manifest import listed_files, machine_fingerprint, manifest_digest, required_fields

pytestmark = pytest.mark.slow  # one real build of the tiny model (about a minute on a CPU)
BUILD_LOG: dict[str, str] = {}  # what the build printed on stderr


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("build")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    stale = root / f".tiny.building-{proc.pid}-0123abcd"  # what a build killed with SIGKILL leaves
    (stale / "graphs").mkdir(parents=True)
    out = root / "tiny"
    log, summary = io.StringIO(), io.StringIO()  # stderr as in a CI log: not a terminal
    with contextlib.redirect_stderr(log), contextlib.redirect_stdout(summary):
        assert fd_build(["--out", str(out), "--device", "cpu", "--decoder", "none"]) == 0
    BUILD_LOG["stderr"], BUILD_LOG["stdout"] = log.getvalue(), summary.getvalue()
    assert not stale.exists()
    assert sorted(p.name for p in root.iterdir()) == ["tiny"]
    return out


def test_check_prints_the_seal_every_file_and_the_fingerprint(engine, capsys):
    assert fd_build(["--check", str(engine)]) == 0
    out = capsys.readouterr().out
    m = json.loads((engine / "manifest.json").read_text())
    assert f"seal: manifest.json content sha256 {manifest_digest(m)} equals its recorded manifest_sha256" in out
    records = listed_files(m)
    assert records and f"{len(records)} files present, sha256 verified" in out
    for r in records:
        assert re.search(rf"{re.escape(r['file'])}\s+{r['bytes']:,d} B  sha256 {r['sha256']}", out), r["file"]
    fields = required_fields(m["backend"], m["fingerprint"]["device_type"])
    here = machine_fingerprint("cpu")
    assert "device_type" in fields and f"{len(fields)} fields must equal this machine's" in out
    for name in fields:
        if name == "python_minor":
            continue
        assert re.search(
            rf"{name}\s+built {re.escape(repr(m['fingerprint'][name]))}\s+here {re.escape(repr(here[name]))}", out
        )
    assert out.rstrip().splitlines()[-1].startswith("engine OK for this machine")


def test_check_of_a_modified_file_fails_with_its_name(engine, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(engine, copy)
    rec = listed_files(json.loads((copy / "manifest.json").read_text()))[0]
    data = bytearray((copy / rec["file"]).read_bytes())
    data[-1] ^= 0xFF
    (copy / rec["file"]).write_bytes(bytes(data))
    assert fd_build(["--check", str(copy)]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.err and rec["file"] in captured.err and "engine OK" not in captured.out


# fd-build's progress in a log: plain lines, no carriage-return bar (these run without a build).


@pytest.mark.parametrize("ok", [True, False])
def test_progress_in_a_log_is_plain_lines(ok):
    import io

    from flashdreams.export.progress import PhaseProgress

    log = io.StringIO()  # not a terminal
    bar = PhaseProgress(stream=log)
    assert not bar.use_bar
    for i, phase in enumerate(["load model", "compile dit", "check"]):
        bar(phase, i, 3)
    bar.close(ok=ok)
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert [ln.split(" (")[0] for ln in lines[:3]] == [
        "fd-build: [1/3] load model",
        "fd-build: [2/3] compile dit",
        "fd-build: [3/3] check",
    ]
    assert lines[3].startswith("fd-build: done in " if ok else "fd-build: stopped in ") and len(lines) == 4


def test_progress_shows_an_unknown_total_as_a_question_mark():
    import io

    from flashdreams.export.progress import PhaseProgress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    log = io.StringIO()
    lines = PhaseProgress(stream=log)
    lines("load model", 0, 0)
    lines("hash weights", 1, 4)
    assert [ln.split(" (")[0] for ln in log.getvalue().splitlines()] == [
        "fd-build: [1/?] load model",
        "fd-build: [2/4] hash weights",
    ]
    early = io.StringIO()  # a build that stops while the total is still unknown still ends its log
    stopped = PhaseProgress(stream=early)
    stopped("load model", 0, 0)
    stopped.close(ok=False)
    assert early.getvalue().splitlines()[-1].startswith("fd-build: stopped in ")
    tty = Tty()
    bar = PhaseProgress(stream=tty)
    bar("load model", 0, 0)  # a bar without a total yet
    bar("hash weights", 1, 4)
    bar.close()
    assert "4/4" in tty.getvalue()


def test_progress_on_a_terminal_draws_a_bar_and_no_progress_prints_nothing():
    import io

    from flashdreams.export.progress import PhaseProgress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    bar = PhaseProgress(stream=tty)
    assert bar.use_bar
    bar("load model", 0, 2)
    bar.close()
    assert "\r" in tty.getvalue() and "2/2" in tty.getvalue()
    quiet = io.StringIO()
    off = PhaseProgress(disable=True, stream=quiet)
    off("load model", 0, 2)
    off.close()
    assert quiet.getvalue() == ""


def test_a_real_build_logs_one_plain_line_per_phase(engine):
    """The module's build ran with stderr to a file: every phase is one line, no carriage return."""
    text = BUILD_LOG["stderr"]
    assert "\r" not in text and "\x1b" not in text
    lines = [ln for ln in text.splitlines() if ln.startswith("fd-build: ")]
    steps = [re.match(r"fd-build: \[(\d+)/(\d+|\?)\] (.+) \(\d+\.\d s\)$", ln) for ln in lines[:-1]]
    assert len(steps) >= 3 and all(steps), lines
    assert [int(m.group(1)) for m in steps] == list(range(1, len(steps) + 1))
    # Before the model is loaded its graph count is unknown: "?", then one total that never changes.
    assert steps[0].group(3) == "load model" and steps[0].group(2) == "?"
    assert {m.group(2) for m in steps[1:]} == {str(len(steps))}
    assert re.fullmatch(r"fd-build: done in \d+\.\d s", lines[-1])


def test_the_summary_names_each_graphs_worst_output_against_eager(engine):
    """A graph with several outputs (the DiT: its flow and the ring it writes) prints its check's worst
    rel. L2 and the output that gave it."""
    graphs = json.loads((engine / "manifest.json").read_text())["graphs"]
    several = {n: g["build_check"]["rel_l2"] for n, g in graphs.items() if len(g["build_check"].get("rel_l2", {})) > 1}
    assert several, "the tiny model's DiT graph checks its flow and its state"
    lines = BUILD_LOG["stdout"].splitlines()
    for name, errs in several.items():
        worst = max(errs, key=errs.get)
        line = next(ln for ln in lines if ln.split()[:1] == [name])
        assert line.endswith(f"{errs[worst]:.2e} ({worst})"), line
