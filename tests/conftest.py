"""Shared test helpers: where the parity fixtures are, and the GPU marker's skip."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _unshadow_repo_root() -> None:
    """Move the repo root to the end of sys.path so its top-level folders shadow no PyPI package.

    `python -m pytest` puts the working directory (the repo root) first on sys.path, where the
    repo's `kernels/` folder (installed as `flashdreams.kernels`) hides the PyPI package `kernels`
    that transformers imports. The root stays on the path, last, so `flashdreams` still imports
    from a checkout that is not pip-installed. A repo `kernels` imported already is dropped.
    """
    root = Path(__file__).resolve().parents[1]

    def is_root(entry: str) -> bool:
        try:
            return Path(entry or os.curdir).resolve() == root
        except OSError:
            return False

    kept = [e for e in sys.path if not is_root(e)]
    if len(kept) != len(sys.path):
        sys.path[:] = [*kept, str(root)]
    shadow = sys.modules.get("kernels")
    if shadow is not None and Path(getattr(shadow, "__file__", None) or "").resolve().parent == root / "kernels":
        for name in [m for m in sys.modules if m == "kernels" or m.startswith("kernels.")]:
            del sys.modules[name]


# Before anything below (torch, flashdreams, transformers) can import `kernels`.
_unshadow_repo_root()

# Triton kernels run on the CPU under the interpreter; it must be chosen before triton is
# imported anywhere. On a CUDA machine the kernels run natively.
if os.environ.get("FD_TEST_DEVICE", "cpu") == "cpu" and "TRITON_INTERPRET" not in os.environ:
    try:
        import torch as _torch

        if not _torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from flashdreams.parity.common import fixtures_root  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def fixture_dirs(*kinds: str) -> list[Path]:
    """Fixture directories of the given kinds (empty if the fixture set is absent)."""
    root = fixtures_root()
    if root is None or not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        meta = d / "fixture.json"
        if meta.is_file() and json.loads(meta.read_text()).get("kind") in kinds:
            out.append(d)
    return out


def require_fixtures() -> Path:
    root = fixtures_root()
    if root is None or not root.is_dir():
        where = os.environ.get("FD_FIXTURES") or Path(__file__).resolve().parents[2] / "shared" / "fixtures"
        pytest.skip(f"parity fixtures not found in {where}; set FD_FIXTURES to the directory that holds them")
    return root


def params_or_skip(kinds: tuple[str, ...]):
    """pytest params over fixture dirs; one skipped param when the fixture set is absent."""
    dirs = fixture_dirs(*kinds)
    if not dirs:
        where = os.environ.get("FD_FIXTURES") or Path(__file__).resolve().parents[2] / "shared" / "fixtures"
        reason = f"parity fixtures of kinds {', '.join(kinds)} not found in {where}; set FD_FIXTURES"
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason))]
    return [pytest.param(d, id=d.name) for d in dirs]


@pytest.fixture
def count_calls(monkeypatch):
    """count_calls(owner, name) -> a list that gains an entry per call of `owner.name` (a function of a
    module, or a method of a class), which still runs as before; undone with the test."""

    def wrap(owner, name: str) -> list:
        calls, real = [], getattr(owner, name)

        def counted(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
        return calls

    return wrap
