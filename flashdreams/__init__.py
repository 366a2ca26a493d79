"""FlashDreams: run autoregressive video and world models as live, compiled sessions.

import flashdreams
engine = flashdreams.load()                      # built-in tiny model, no download
session = engine.session(seed=0)
for _ in range(4):
    result = session.step()                      # latents [B, C, nf, h, w] (+ frames)

The package root is lazy (PEP 562): `import flashdreams` (and `import flashdreams.kernels`)
imports neither the runtime nor any model family; `flashdreams.load` and the other public
names import their module on first access.
"""

from __future__ import annotations

import importlib as _importlib
import os as _os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Where a C++ host finds the CMake package (`find_package(flashdreams)`), like torch.utils.cmake_prefix_path.
cmake_prefix_path = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "share", "cmake")

# Public name -> the module that defines it, imported on first access.
_LAZY = {
    "Engine": "flashdreams.engine",
    "load": "flashdreams.engine",
    "input_specs": "flashdreams.engine",
    "FlashDreamsError": "flashdreams.errors",
    "get_preset": "flashdreams.presets",
    "preset_names": "flashdreams.presets",
    "Session": "flashdreams.session",
    "StepResult": "flashdreams.session",
    "replay": "flashdreams.recording",
}

if TYPE_CHECKING:  # for type checkers and IDEs only; at run time these resolve in __getattr__
    from flashdreams.engine import Engine, input_specs, load
    from flashdreams.errors import FlashDreamsError
    from flashdreams.presets import get_preset, preset_names
    from flashdreams.recording import replay
    from flashdreams.session import Session, StepResult

__all__ = [
    "Engine",
    "FlashDreamsError",
    "Session",
    "StepResult",
    "get_preset",
    "input_specs",
    "load",
    "preset_names",
    "replay",
    "cmake_prefix_path",
]


def __getattr__(name: str) -> Any:
    """Import the module behind a public name on first access and cache the name here."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flashdreams' has no attribute '{name}'")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
