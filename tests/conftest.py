"""Shared test helpers: where the parity fixtures are, and the GPU marker's skip."""

from __future__ import annotations

import os

# Triton kernels run on the CPU under the interpreter; it must be chosen before triton is
# imported anywhere. On a CUDA machine the kernels run natively.
if os.environ.get("FD_TEST_DEVICE", "cpu") == "cpu" and "TRITON_INTERPRET" not in os.environ:
    try:
        import torch as _torch

        if not _torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass

import json
from pathlib import Path

import pytest
import torch

from flashdreams.parity.common import fixtures_root


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
        pytest.skip("parity fixtures not found: set FD_FIXTURES or put them at ../shared/fixtures")
    return root


def params_or_skip(kinds: tuple[str, ...]):
    """pytest params over fixture dirs; one skipped param when the fixture set is absent."""
    dirs = fixture_dirs(*kinds)
    if not dirs:
        return [pytest.param(None, marks=pytest.mark.skip(reason="parity fixtures not found (FD_FIXTURES)"))]
    return [pytest.param(d, id=d.name) for d in dirs]
