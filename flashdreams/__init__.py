"""FlashDreams: run autoregressive video and world models as live, compiled sessions.

import flashdreams
engine = flashdreams.load()                      # built-in tiny model, no download
session = engine.session(seed=0)
for _ in range(4):
    result = session.step()                      # latents [B, C, nf, h, w] (+ frames)
"""

from __future__ import annotations

import os as _os

__version__ = "0.1.0"

from flashdreams.engine import Engine, load  # noqa: E402
from flashdreams.errors import FlashDreamsError  # noqa: E402
from flashdreams.presets import get_preset, preset_names  # noqa: E402
from flashdreams.session import Session, StepResult  # noqa: E402

# Where a C++ host finds the CMake package (`find_package(flashdreams)`), like torch.utils.cmake_prefix_path.
cmake_prefix_path = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "share", "cmake")

__all__ = [
    "Engine",
    "FlashDreamsError",
    "Session",
    "StepResult",
    "get_preset",
    "load",
    "preset_names",
    "cmake_prefix_path",
]
