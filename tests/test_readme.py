"""The README runs as written: every ```python block, and the install advice for a machine with its own torch.

A block that cannot run here (it needs a GPU or real weights) is marked by an HTML comment on
the line right before it, `<!-- readme-test: skip (needs a GPU) -->`; the reason is required.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

README = Path(__file__).resolve().parents[1] / "README.md"
PYPROJECT = README.with_name("pyproject.toml")
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->")
MAX_SKIPPED = 2  # blocks that need a GPU or real weights; keep it small


def code_blocks(text: str, lang: str) -> list[tuple[int, str, str | None]]:
    """(line number, code, skip reason or None) of each ```lang block of `text`."""
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].strip() == f"```{lang}":
            start = i
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            k = start - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            m = SKIP.search(lines[k]) if k >= 0 else None
            out.append((start + 1, "\n".join(lines[start + 1 : j]) + "\n", m.group("reason") if m else None))
            i = j
        i += 1
    return out


def section(text: str, title: str) -> str:
    """The text of the `## title` section, up to the next `## ` heading."""
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


BLOCKS = code_blocks(README.read_text(), "python")


def test_the_readme_has_python_blocks_and_few_skips():
    assert BLOCKS, "no ```python block found in README.md"
    skipped = [(line, reason) for line, _, reason in BLOCKS if reason]
    assert len(skipped) <= MAX_SKIPPED, f"too many README blocks skip the test: {skipped}"
    assert all(reason.strip() for _, reason in skipped)
    assert "readme-test" not in SKIP.sub("", README.read_text()), "a readme-test marker that is not understood"


@pytest.mark.parametrize("line, code, skip", BLOCKS, ids=[f"README.md:{line}" for line, _, _ in BLOCKS])
def test_python_block_runs(line, code, skip, tmp_path):
    if skip:
        pytest.skip(f"README.md:{line}: {skip}")
    (tmp_path / "block.py").write_text(code)
    proc = subprocess.run(
        [sys.executable, "block.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, f"README.md:{line} failed:\n{proc.stderr[-4000:]}"
    if "flashdreams.load()" in code and "input_specs()" in code:
        # The API example says what the built-in model's prompt is: check the README's claim.
        assert "prompt_embeds float32 [1, 16, 32]" in proc.stdout, proc.stdout
        assert "[1, 16, 32]" in code


def test_install_without_torch_installs_every_other_dependency():
    """`pip install --no-deps -e .` and the line after it: everything pyproject needs but torch, plus PyAV."""
    setup = section(README.read_text(), "Set up, test, run")
    bash = "\n".join(code for _, code, _ in code_blocks(setup, "bash"))
    lines = [ln.split("#")[0].strip() for ln in bash.splitlines()]
    i = next(n for n, ln in enumerate(lines) if ln.startswith("pip install --no-deps -e ."))
    assert "torch" not in lines[i]
    rest = lines[i + 1]
    assert rest.startswith("pip install ") and "--no-deps" not in rest and "-e" not in rest.split()
    given = {re.split(r"[<>=!~ \[]", r.strip('"'))[0].lower(): r.strip('"') for r in rest.split()[2:]}
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["video"]]
    for req in wanted:
        name = re.split(r"[<>=!~ \[;]", req)[0].lower()
        if name == "torch":
            assert name not in given, "the no-torch install must not name torch"
            continue
        assert given.get(name) == req, f"README installs {given.get(name)!r}, pyproject needs {req!r}"
    assert set(given) <= {re.split(r"[<>=!~ \[;]", r)[0].lower() for r in wanted}


def test_setup_sections_send_users_to_no_sibling_paths():
    text = README.read_text()
    for title in ("Set up, test, run", "Python API"):
        body = section(text, title)
        assert "../shared" not in body, title
    assert "FD_FIXTURES" in section(text, "Set up, test, run")


def test_engine_directories_are_called_code_to_trust():
    api = section(README.read_text(), "Python API")
    bullet = api[api.index('`flashdreams.load("engine_dir/")`') :].split("\n* ")[0]
    assert "compiled code" in bullet and "trust" in bullet
