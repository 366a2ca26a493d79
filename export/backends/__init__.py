"""Graph backends: how a step program is compiled into files at build time and loaded back.

One engine format, several compilers (DESIGN.md, "Backends"). A backend turns each
`StepProgram` into files under the engine directory and, at load, those files into a
callable that takes the graph's inputs in manifest order and returns all its outputs as
a tuple. Mutated inputs are written in place (`inductor`, `aoti`) or come back as extra
outputs that the runtime copies into the session's buffers (`onnx`, `tensorrt`, whose
`functional` is True).

`get_backend` makes a new backend object for each build or load: what a backend keeps
between calls (a build's weight store, a load's weights, its load times) belongs to that
one build or load, and its options arrive as a `BuildConfig`, never through the environment.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import torch

from flashdreams.errors import InvalidArgumentError
from flashdreams.export.build_config import BuildConfig

GraphFn = Callable[..., tuple[torch.Tensor, ...]]

# Backend name -> (module, class); the module is imported on first use.
_CLASSES = {
    "inductor": ("flashdreams.export.backends.inductor", "InductorBackend"),
    "aoti": ("flashdreams.export.backends.aoti", "AOTIBackend"),
    "onnx": ("flashdreams.export.backends.onnx", "ONNXBackend"),
    "tensorrt": ("flashdreams.export.backends.tensorrt", "TensorRTBackend"),
}

# Where each backend has been verified, for fd-build --help and the README.
VERIFIED = {
    "inductor": "CPU: tests (sessions match eager, rel. L2 < 1e-5). CUDA: bench/engine_bench.py on the H100 "
    "(full 1.3B: built in ~105 s, cold start 20 s, engine vs eager bf16 rel. L2 6.5e-3; "
    "bench/results/engine-h100*.json)",
    "aoti": "CPU: tests (sessions match eager). CUDA: refused with torch 2.11 (its loader segfaults); "
    "fd-build --aoti-force (FD_AOTI_FORCE=1 at load) tries anyway",
    "onnx": "CPU with onnxruntime: tests (sessions match eager, every graph checked at build)",
    "tensorrt": "not verified: needs `import tensorrt` (absent here and on our H100 image); refused elsewhere",
}


class GraphBackend:
    """Base class; see the module docstring for the contract. One object serves one build or one load."""

    name = "?"
    functional = False

    def __init__(self, config: BuildConfig | None = None) -> None:
        self.config = config if config is not None else BuildConfig(backend=self.name)
        self.load_times: dict[str, float] = {}  # seconds of begin_load's parts, for engine.load_times

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None if this backend can build/run on `device` here, else why not."""
        return None

    def build_attention(self, attention: str) -> str:
        """The attention implementation the graphs are traced with (ONNX cannot hold Triton ops)."""
        return attention

    def begin_build(self, engine_dir: Path, device: torch.device) -> None:
        pass

    def build_graph(self, prog, engine_dir: Path, device: torch.device) -> tuple[dict, GraphFn | None]:
        """Write the graph's files; return (manifest record, callable for the build check or None)."""
        raise NotImplementedError

    def finish_build(self, engine_dir: Path) -> dict[str, str]:
        """Write shared artifacts; return {artifact name: relative path}."""
        return {}

    def begin_load(self, engine_dir: Path, manifest: dict, device: torch.device) -> None:
        pass

    def load_graph(self, engine_dir: Path, name: str, record: dict, device: torch.device) -> GraphFn:
        raise NotImplementedError

    def end_load(self) -> None:
        """After the last load_graph: drop what begin_load kept (the graphs hold what they need)."""


def get_backend(name: str, config: BuildConfig | None = None) -> GraphBackend:
    """A new backend object called `name`, configured by `config` (default: `BuildConfig(backend=name)`).

    Its module is imported on first use. A config made for another backend is refused.
    """
    try:
        module_name, class_name = _CLASSES[name]
    except KeyError:
        raise InvalidArgumentError(f"backend '{name}' is unknown; choose one of {sorted(_CLASSES)}") from None
    if config is not None and config.backend != name:
        raise InvalidArgumentError(f"backend '{name}' was given a build config for backend '{config.backend}'")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(config if config is not None else BuildConfig(backend=name))


def backend_names() -> list[str]:
    """The names `get_backend` knows."""
    return list(_CLASSES)


def as_tuple(out) -> tuple[torch.Tensor, ...]:
    if isinstance(out, torch.Tensor):
        return (out,)
    return tuple(out)


def rel(engine_dir: Path, path: Path) -> str:
    return path.relative_to(engine_dir).as_posix()
