"""The repo's top-level folders must not shadow PyPI packages of the same name under pytest.

`kernels/` installs as `flashdreams.kernels`; `python -m pytest` from the repo root would put the
root first on sys.path and make `import kernels` (done by transformers 5.x) find the repo folder.
tests/conftest.py moves the root to the end of sys.path; these tests fail if that stops working.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _installed_files(dist_name: str) -> set[Path]:
    """Absolute paths of the files a distribution installed; skips if it is not installed."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"the PyPI package '{dist_name}' is not installed")
    return {Path(dist.locate_file(f)).resolve() for f in dist.files or ()}


def test_import_kernels_is_the_pypi_package_not_the_repo_folder():
    files = _installed_files("kernels")
    module = importlib.import_module("kernels")
    origin = Path(module.__file__).resolve()
    assert origin.parent != REPO / "kernels", f"`import kernels` found the repo folder ({origin})"
    assert origin in files, f"`import kernels` resolved to {origin}, not a file of the installed PyPI package"


def test_repo_root_is_not_ahead_of_site_packages():
    site = [i for i, e in enumerate(sys.path) if e.endswith("site-packages")]
    root = [i for i, e in enumerate(sys.path) if Path(e or ".").resolve() == REPO]
    if site and root:
        assert min(root) > max(site), f"the repo root is on sys.path before site-packages: {sys.path}"


def test_flashdreams_kernels_still_imports_from_the_repo_folder():
    module = importlib.import_module("flashdreams.kernels")
    assert Path(module.__file__).resolve().parent == REPO / "kernels"


def test_transformers_hub_kernels_imports():
    """What failed on a fresh install: transformers' hub-kernels integration importing `kernels`."""
    _installed_files("kernels")
    pytest.importorskip("transformers")
    importlib.import_module("transformers.integrations.hub_kernels")
