"""Graph backends: how a step program is compiled into files at build time and loaded back.

One engine format, several compilers (DESIGN.md, "Backends"). A backend turns each
`StepProgram` into files under the engine directory and, at load, those files into a
callable that takes the graph's inputs in manifest order and returns all its outputs as
a tuple. Mutated inputs are written in place (`inductor`, `aoti`) or come back as extra
outputs that the runtime copies into the session's buffers (`onnx`, `tensorrt`, whose
`functional` is True).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import torch

from flashdreams.errors import InvalidArgumentError

GraphFn = Callable[..., tuple[torch.Tensor, ...]]

_MODULES = {
    "inductor": "flashdreams.export.backends.inductor",
    "aoti": "flashdreams.export.backends.aoti",
    "onnx": "flashdreams.export.backends.onnx",
    "tensorrt": "flashdreams.export.backends.tensorrt",
}

# Where each backend has been verified, for fd-build --help and the README.
VERIFIED = {
    "inductor": "CPU: tests (sessions match eager, rel. L2 < 1e-5). CUDA: bench/engine_bench.py on the H100 "
    "(full 1.3B: built in ~105 s, cold start 20 s, engine vs eager bf16 rel. L2 6.5e-3; "
    "bench/results/engine-h100*.json)",
    "aoti": "CPU: tests (sessions match eager). CUDA: refused with torch 2.11 (its loader segfaults); "
    "FD_AOTI_FORCE=1 tries anyway",
    "onnx": "CPU with onnxruntime: tests (sessions match eager, every graph checked at build)",
    "tensorrt": "not verified: needs `import tensorrt` (absent here and on our H100 image); refused elsewhere",
}


class GraphBackend:
    """Base class; see the module docstring for the contract."""

    name = "?"
    functional = False
    load_times: dict[str, float] = {}  # seconds of begin_load's parts, for engine.load_times

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


def get_backend(name: str) -> GraphBackend:
    """The backend called `name` (its module is imported on first use)."""
    try:
        module = importlib.import_module(_MODULES[name])
    except KeyError:
        raise InvalidArgumentError(f"backend '{name}' is unknown; choose one of {sorted(_MODULES)}") from None
    return module.BACKEND


def backend_names() -> list[str]:
    return list(_MODULES)


def as_tuple(out) -> tuple[torch.Tensor, ...]:
    if isinstance(out, torch.Tensor):
        return (out,)
    return tuple(out)


def rel(engine_dir: Path, path: Path) -> str:
    return path.relative_to(engine_dir).as_posix()
