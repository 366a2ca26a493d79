"""Error measures shared by the parity runners, the engine build check, the tests and the benches.

Everything is computed in float64 on the CPU over the whole tensor, so a measure does not depend
on the dtype or device the tensors come from. This module imports only torch: it must stay
importable without any runtime module of flashdreams.
"""

from __future__ import annotations

import math

import torch

__all__ = ["max_abs_err", "psnr", "rel_l2"]


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64)


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error ||out - ref||_2 / ||ref||_2 over the whole tensor, in float64.

    With an all-zero reference the ratio is undefined; the absolute error ||out||_2 is returned
    instead (0 only for an exact match). A NaN anywhere gives NaN, which passes no `<=` bound.
    """
    out64, ref64 = _f64(out), _f64(ref)
    num = torch.linalg.vector_norm(out64 - ref64)
    denom = torch.linalg.vector_norm(ref64)
    if denom == 0:
        return float(num)
    return float(num / denom)


def max_abs_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest elementwise |out - ref|, in float64 (0 for empty tensors; NaN if any value is NaN)."""
    diff = (_f64(out) - _f64(ref)).abs()
    return float(diff.max()) if diff.numel() else 0.0  # max() propagates NaN


def psnr(out: torch.Tensor, ref: torch.Tensor, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB, 10 log10(peak^2 / MSE), in float64; inf for identical tensors.

    `peak` is the largest possible value: 255 for 8-bit frames, 1 or 2 for float video in [0, 1]
    or [-1, 1].
    """
    mse = float(((_f64(out) - _f64(ref)) ** 2).mean())
    if mse == 0:
        return math.inf
    return 10.0 * math.log10(peak**2 / mse)
