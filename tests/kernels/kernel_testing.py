"""Helpers shared by the kernel tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64; a zero reference gives a huge ratio, never a pass."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
