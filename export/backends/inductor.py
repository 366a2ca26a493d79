"""The `inductor` backend (the default): torch.export programs plus Inductor's own cache.

Build: each step program is saved with `torch.export.save`, loaded back and compiled
with `torch.compile` exactly as the loader will do it (on CUDA the DiT and prompt graphs
in max-autotune-no-cudagraphs mode: the session captures its own CUDA graphs), run once,
and everything Inductor compiled and autotuned is saved with
`torch.compiler.save_cache_artifacts()` into `inductor_cache.bin`.
Load: `load_cache_artifacts`, `torch.export.load`, `torch.compile(ep.module())`; the
first call (the runtime's warm-up) then compiles from the cache instead of from scratch.

On CPU the artifacts hold Inductor's generated C++ source but not the compiled .so
files, so a machine whose local Inductor cache is cold recompiles the C++ at the first
call (tens of seconds for the tiny model). Use `aoti` for a CPU engine that starts with
no compiler. On CUDA the Triton kernels are bundled and only need loading.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from flashdreams.errors import EngineIncompatibleError, InvalidArgumentError
from flashdreams.export.backends import GraphBackend, GraphFn, as_tuple, rel

log = logging.getLogger(__name__)

CACHE_FILE = "inductor_cache.bin"
CUDA_MODE = "max-autotune-no-cudagraphs"


def autotune_requested() -> bool:
    """FD_INDUCTOR_AUTOTUNE=1 (fd-build --autotune) autotunes the DiT and prompt GEMMs.

    Off by default: on the H100 the full 1.3B build spent ~60 s benchmarking each GEMM
    shape and passed 5 minutes (bench/results/engine-h100-autotune-timeout.json); the
    default mode uses cuBLAS for the GEMMs and Inductor's fused kernels for the rest.
    """
    return os.environ.get("FD_INDUCTOR_AUTOTUNE", "0") == "1"


def compile_options(device: torch.device, graph: str = "dit") -> dict:
    """Inductor options of one graph (recorded in the manifest, reused at load).

    With autotuning requested, the DiT and prompt graphs are autotuned on CUDA; the
    decoder's graphs always use the default mode (its convolutions go to cuDNN either
    way, and autotuning them would cost minutes of build time for little).
    """
    if device.type == "cuda" and autotune_requested() and not graph.startswith("decode"):
        from torch._inductor import list_mode_options

        return dict(list_mode_options(CUDA_MODE))
    return {}


def export_program(prog) -> torch.export.ExportedProgram:
    """torch.export of a step program at its fixed example shapes."""
    with torch.no_grad():
        return torch.export.export(prog.module, prog.fresh_inputs(), strict=False)


def compile_saved(path: Path, options: dict):
    """What the loader runs: the saved program, unlifted, under torch.compile (fullgraph)."""
    ep = torch.export.load(str(path))
    return torch.compile(ep.module(), options=dict(options) or None, fullgraph=True)


def _no_recompile(fn, name: str) -> GraphFn:
    """Call the compiled graph. The first call compiles (from the cache); after it, a call that
    would recompile is an error, never a silent compile in the middle of a session."""
    warm = [False]

    def call(*args):
        if not warm[0]:
            with torch.no_grad():
                out = as_tuple(fn(*args))
            warm[0] = True
            return out
        with torch.no_grad(), torch.compiler.set_stance("fail_on_recompile"):
            try:
                return as_tuple(fn(*args))
            except RuntimeError as exc:
                if "recompil" in str(exc).lower():
                    raise InvalidArgumentError(
                        f"graph '{name}': this call differs from the engine's static inputs (shape, dtype, "
                        f"device, strides, or grad/inference mode) and would need a recompile ({exc})"
                    ) from exc
                raise

    return call


class InductorBackend(GraphBackend):
    name = "inductor"

    def begin_build(self, engine_dir: Path, device: torch.device) -> None:
        torch.compiler.reset()
        try:  # keep only this build's artifacts in inductor_cache.bin
            from torch.compiler._cache import CacheArtifactManager

            CacheArtifactManager.clear()
        except (ImportError, AttributeError):  # pragma: no cover - older torch
            pass

    def build_graph(self, prog, engine_dir: Path, device: torch.device):
        path = engine_dir / "graphs" / f"{prog.name}.pt2"
        path.parent.mkdir(parents=True, exist_ok=True)
        ep = export_program(prog)
        # torch.export keeps the example inputs and saves them: for the DiT that is the whole
        # KV ring (6 GB of the 9 GB dit.pt2 of the first full-size H100 build). Only the
        # manifest's shapes are needed at load.
        ep.example_inputs = None
        torch.export.save(ep, str(path))
        del ep
        options = compile_options(device, prog.name)
        fn = compile_saved(path, options)
        fn = _no_recompile(fn, prog.name)
        fn(*prog.fresh_inputs())  # compiles (and on CUDA autotunes) now, into the cache
        record = {"files": [rel(engine_dir, path)], "compile": {"options": options}}
        return record, fn

    def finish_build(self, engine_dir: Path) -> dict[str, str]:
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            raise EngineIncompatibleError("Inductor produced no cache artifacts for this build")
        data, info = saved
        (engine_dir / CACHE_FILE).write_bytes(data)
        log.info("inductor cache artifacts: %d bytes (%s)", len(data), dict(info.artifacts))
        return {"inductor_cache": CACHE_FILE}

    def begin_load(self, engine_dir: Path, manifest: dict, device: torch.device) -> None:
        if manifest["engine"].get("graph_attention") == "triton":
            import flashdreams.kernels  # noqa: F401  (registers torch.ops.flashdreams.* before torch.export.load)
        art = manifest.get("artifacts", {}).get("inductor_cache")
        if art is not None:
            torch.compiler.load_cache_artifacts((engine_dir / art["file"]).read_bytes())

    def load_graph(self, engine_dir: Path, name: str, record: dict, device: torch.device) -> GraphFn:
        fn = compile_saved(engine_dir / record["files"][0]["file"], record.get("compile", {}).get("options", {}))
        return _no_recompile(fn, name)


BACKEND = InductorBackend()
