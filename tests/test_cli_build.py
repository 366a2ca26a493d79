"""fd-build on the built-in model: it removes what a killed build left, and --check prints what it verified."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flashdreams.cli.build import main as fd_build
from flashdreams.export.manifest import listed_files, machine_fingerprint, manifest_digest, required_fields

pytestmark = pytest.mark.slow  # one real build of the tiny model (about a minute on a CPU)


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("build")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    stale = root / f".tiny.building-{proc.pid}-0123abcd"  # what a build killed with SIGKILL leaves
    (stale / "graphs").mkdir(parents=True)
    out = root / "tiny"
    assert fd_build(["--out", str(out), "--device", "cpu", "--decoder", "none", "--no-progress"]) == 0
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
