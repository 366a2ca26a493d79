"""How an engine is built: the options a graph backend receives, explicitly, as one frozen value.

Options used to reach the backends through environment variables that fd-build wrote
(FD_INDUCTOR_AUTOTUNE) or that the backends read on their own (FD_INDUCTOR_MODE,
FD_AOTI_FORCE). Now a `BuildConfig` is made once (by fd-build from its flags, or by a
caller of `build_engine`), handed to `get_backend`, and recorded in the manifest
(`to_dict`). `from_env` is the one place those variables are read, as defaults at a
command line or for a loader that has no flag of its own; nothing writes them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flashdreams.errors import InvalidArgumentError

INDUCTOR_MODES = ("precompiled", "cache")

# The environment variables `from_env` reads, by field.
ENV = {
    "autotune": "FD_INDUCTOR_AUTOTUNE",
    "inductor_mode": "FD_INDUCTOR_MODE",
    "aoti_force": "FD_AOTI_FORCE",
}


@dataclass(frozen=True)
class BuildConfig:
    """The build options of one engine.

    * `backend`: the graph backend (inductor, aoti, onnx, tensorrt).
    * `autotune`: inductor on CUDA: autotune the DiT and prompt GEMMs (max-autotune; minutes more).
    * `inductor_mode`: inductor: "precompiled" (default; loads with no trace or compile) or
      "cache" (the older path: Dynamo re-trace at load from Inductor's cache artifacts).
    * `aoti_force`: aoti on CUDA: build-check and load packages even where the loader is known
      to segfault (torch 2.11 + CUDA), instead of refusing.
    """

    backend: str = "inductor"
    autotune: bool = False
    inductor_mode: str = "precompiled"
    aoti_force: bool = False

    def __post_init__(self) -> None:
        from flashdreams.export.backends import backend_names  # the one list of backends

        if self.backend not in backend_names():
            raise InvalidArgumentError(f"backend '{self.backend}' is unknown; choose one of {sorted(backend_names())}")
        if self.inductor_mode not in INDUCTOR_MODES:
            raise InvalidArgumentError(
                f"inductor mode '{self.inductor_mode}' is unknown; choose one of {list(INDUCTOR_MODES)}"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record of the options (the manifest keeps it)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BuildConfig:
        """The config a `to_dict` record describes; unknown fields are refused (a newer writer)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InvalidArgumentError(f"build config has unknown fields {unknown}; known: {sorted(names)}")
        return cls(**d)

    def replace(self, **changes: Any) -> BuildConfig:
        """A copy with `changes` applied (validated like a new config)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, backend: str = "inductor", env: Mapping[str, str] | None = None, **overrides: Any) -> BuildConfig:
        """Defaults from FD_INDUCTOR_AUTOTUNE=1, FD_INDUCTOR_MODE and FD_AOTI_FORCE=1 (read, never written);
        `overrides` (a command line's flags) win over them."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {
            "backend": backend,
            "autotune": env.get(ENV["autotune"], "0") == "1",
            "inductor_mode": env.get(ENV["inductor_mode"]) or "precompiled",
            "aoti_force": env.get(ENV["aoti_force"], "0") == "1",
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values["inductor_mode"] not in INDUCTOR_MODES:
            raise InvalidArgumentError(
                f"{ENV['inductor_mode']}={values['inductor_mode']!r} is unknown; choose one of {list(INDUCTOR_MODES)}"
            )
        return cls(**values)
