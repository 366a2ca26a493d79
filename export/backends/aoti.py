"""The `aoti` backend: AOTInductor packages (.pt2), one per step program.

No compiler runs at load: the package holds the compiled kernels and weights, and C++
hosts can load it without Python. Built and verified on CPU (the test suite runs a
session from an aoti engine). On our H100 image (torch 2.11 + CUDA) loading ANY
AOTInductor package segfaults inside the loader, so a CUDA aoti engine is refused there
with EngineIncompatibleError unless `BuildConfig.aoti_force` is set (fd-build --aoti-force;
FD_AOTI_FORCE=1 where the engine is loaded) to try anyway (bench/engine_bench.py probes it
in a subprocess).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from flashdreams.errors import EngineIncompatibleError
from flashdreams.export.backends import GraphBackend, GraphFn, as_tuple, rel
from flashdreams.export.backends.inductor import export_program
from flashdreams.export.backends.lowering_messages import short_lowering_messages

log = logging.getLogger(__name__)


def cuda_load_blocked(device: torch.device, force: bool = False) -> str | None:
    """Why loading an AOTI package on `device` is refused here, or None (always None with `force`)."""
    if device.type != "cuda" or force:
        return None
    if torch.__version__.startswith("2.11") and torch.version.cuda is not None:
        return (
            f"loading AOTInductor packages on CUDA segfaults inside the loader with torch {torch.__version__} "
            f"(seen on our H100 image, torch 2.11+cu130); use the inductor backend there, or force it "
            "(fd-build --aoti-force; FD_AOTI_FORCE=1 where the engine is loaded) to try anyway"
        )
    return None


def _configs(device: torch.device, graph: str) -> dict:
    """Autotune the DiT and prompt graphs on CUDA (the decoder's convs go to cuDNN anyway)."""
    return {"max_autotune": True} if device.type == "cuda" and not graph.startswith("decode") else {}


class AOTIBackend(GraphBackend):
    name = "aoti"

    def build_graph(self, prog, engine_dir: Path, device: torch.device):
        from torch._inductor import aoti_compile_and_package

        path = engine_dir / "graphs" / f"{prog.name}.pt2"
        path.parent.mkdir(parents=True, exist_ok=True)
        ep = export_program(prog)
        configs = _configs(device, prog.name)
        with short_lowering_messages():
            aoti_compile_and_package(ep, package_path=str(path), inductor_configs=configs)
        record = {"files": [rel(engine_dir, path)], "compile": {"inductor_configs": configs}}
        blocked = cuda_load_blocked(device, self.config.aoti_force)
        if blocked:
            log.warning("aoti: built %s, but not loading it for the build check: %s", prog.name, blocked)
            return record, None
        return record, self._load(path, prog.name)

    def _load(self, path: Path, name: str) -> GraphFn:
        from torch._inductor import aoti_load_package

        runner = aoti_load_package(str(path))

        def call(*args):
            with torch.no_grad():
                return as_tuple(runner(*args))

        return call

    def begin_load(self, engine_dir: Path, manifest: dict, device: torch.device) -> None:
        reason = cuda_load_blocked(device, self.config.aoti_force)
        if reason:
            raise EngineIncompatibleError(f"engine '{engine_dir}' (aoti): {reason}")

    def load_graph(self, engine_dir: Path, name: str, record: dict, device: torch.device) -> GraphFn:
        return self._load(engine_dir / record["files"][0]["file"], name)
