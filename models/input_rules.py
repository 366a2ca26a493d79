"""Named value checks an input spec can ask for (`InputSpec.rules`), beyond shape, dtype and range.

The session runs them on the host-side value before anything is written, so a refused value
changes nothing. A rule is data in the plan (a name), so a built engine's manifest and a C++ host
see the same checks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.camera_rays import check_intrinsics, check_poses

# name -> check(value, what) raising InvalidArgumentError
RULES: dict[str, Callable[[torch.Tensor, str], None]] = {
    "rigid_transform": check_poses,  # [..., 4, 4] camera-to-world: R a proper rotation, bottom row 0 0 0 1
    "positive_focal": check_intrinsics,  # [..., 4] = (fx, fy, cx, cy) with fx, fy > 0
}


def check_rules(rules: tuple[str, ...], value: torch.Tensor, what: str) -> None:
    for rule in rules:
        check = RULES.get(rule)
        if check is None:
            raise InvalidArgumentError(f"{what}: unknown input rule '{rule}'; known: {sorted(RULES)}")
        check(value, what)


def stand_in(rules: tuple[str, ...], shape: tuple[int, ...]) -> torch.Tensor | None:
    """A value that passes the rules, for inputs a built-in model fills itself; None: no constraint."""
    if "rigid_transform" in rules:
        return torch.eye(4).expand(*shape).clone()
    return None


def sample_valid(spec, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A seeded value of input `spec` at `shape` that its checks accept: the rules' stand-in where they
    have one (poses), uniform in the range where it has one (keys, mouse, intrinsics), normal draws
    otherwise (embeddings). For stand-in inputs and for benchmarks that change inputs every block."""
    valid = stand_in(spec.rules, shape)
    if valid is not None:
        return valid
    if spec.low is not None and spec.high is not None:
        return spec.low + (spec.high - spec.low) * torch.rand(shape, generator=gen)
    return torch.randn(shape, generator=gen)
