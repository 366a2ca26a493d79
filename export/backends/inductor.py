"""The `inductor` backend (the default): exported step programs plus Inductor's compiled output.

Build, per step program:
1. The step is exported with its weights as leading *inputs* (`WeightsAsInputs`), so the
   saved `graphs/<name>.pt2` holds the graph alone; the weights go once into the engine's
   `weights.safetensors` (deduplicated across graphs: the prompt graph shares the DiT's
   cross-attention projections), and each graph's record lists the weight keys it takes.
   Weights the graph never reads (q/k/v kept beside their fused copy) are left out.
2. The program is compiled with Inductor and its output is saved, in one of two modes
   (`compile.mode` in the graph's record):
   - `precompiled` (default): `torch._inductor.standalone_compile` on the unlifted
     graph, saved with `CompiledArtifact.save(format="binary")` as
     `graphs/<name>.inductor`. Load is `CompiledArtifact.load`: no Dynamo trace, no
     compile, only the generated wrapper and its kernels are loaded.
   - `cache` (`BuildConfig.inductor_mode`, fd-build --inductor-mode cache): the older
     path. `torch.compile(ep.module())` is run once and Inductor's caches are saved
     with `torch.compiler.save_cache_artifacts` (`inductor_cache.bin`); load re-traces
     the program with Dynamo and compiles from that cache (on the H100 the 1.3B DiT
     spent ~19 s re-tracing at the first call).
On CUDA, `BuildConfig.autotune` (fd-build --autotune) autotunes the DiT and prompt GEMMs.

On CPU the artifacts hold Inductor's generated C++; a machine whose local Inductor cache
is cold may compile that C++ at load (seconds for the tiny model). Use `aoti` for a CPU
engine that starts with no compiler at all. On CUDA the Triton kernels are bundled.
"""

from __future__ import annotations

import collections
import importlib
import logging
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from flashdreams.errors import EngineIncompatibleError, InvalidArgumentError
from flashdreams.export.backends import GraphBackend, GraphFn, as_tuple, rel
from flashdreams.export.backends.lowering_messages import short_lowering_messages
from flashdreams.export.build_config import BuildConfig

log = logging.getLogger(__name__)

CACHE_FILE = "inductor_cache.bin"
WEIGHTS_FILE = "weights.safetensors"
CUDA_MODE = "max-autotune-no-cudagraphs"


def compile_options(device: torch.device, graph: str = "dit", autotune: bool = False) -> dict:
    """Inductor options of one graph (recorded in the manifest).

    With `autotune` (BuildConfig.autotune, fd-build --autotune), the DiT and prompt graphs
    are autotuned on CUDA. Off by default: on the H100 the full 1.3B build spent ~60 s
    benchmarking each GEMM shape and passed 5 minutes
    (bench/results/engine-h100-autotune-timeout.json); the default mode uses cuBLAS for the
    GEMMs and Inductor's fused kernels for the rest. The decoder's graphs always use the
    default mode (its convolutions go to cuDNN either way, and autotuning them would cost
    minutes of build time for little).
    """
    if device.type == "cuda" and autotune and not graph.startswith("decode"):
        from torch._inductor import list_mode_options

        return dict(list_mode_options(CUDA_MODE))
    return {}


def warm_compile_workers(timeout_s: float = 180.0) -> None:
    """Start Inductor's compile workers and wait until they answer. Until then Inductor compiles each
    kernel in this process, one at a time, and a full-size DiT's first graph is most of a build: on
    a VM where the workers take long to start, that is the whole graph compiled serially."""
    from torch._inductor.async_compile import AsyncCompile

    t = time.perf_counter()
    try:
        AsyncCompile.wait_pool_ready(timeout_s)
    except Exception as exc:  # no pool here (or it never answered): Inductor compiles in-process
        log.warning("Inductor's compile workers did not start (%s: %s); compiling in-process", type(exc).__name__, exc)
        return
    log.info("Inductor compile workers ready in %.1f s", time.perf_counter() - t)


def export_program(prog) -> torch.export.ExportedProgram:
    """torch.export of a step program at its fixed example shapes, weights inside (aoti)."""
    with torch.no_grad():
        return torch.export.export(prog.module, prog.fresh_inputs(), strict=False)


# -- weights as inputs -----------------------------------------------------------------


class WeightsAsInputs(nn.Module):
    """`step` with the tensors named in `names` (parameters/buffers) taken as leading inputs.

    The step is held outside the module tree on purpose: registered, its weights would be
    saved inside the exported program as well.
    """

    def __init__(self, step: nn.Module, names: list[str]) -> None:
        super().__init__()
        object.__setattr__(self, "step", step)
        self.names = list(names)

    def forward(self, *flat):
        n = len(self.names)
        return torch.func.functional_call(self.step, dict(zip(self.names, flat[:n])), tuple(flat[n:]))


# Contiguous copies of the weights that are neither contiguous nor channels-last, one per weight, so graphs sharing
# it still share one stored tensor.
# Keyed by id (tensors compare elementwise), with a weak reference that says the weight is still that one.
_CONTIGUOUS: dict[int, tuple[weakref.ref, torch.Tensor]] = {}


# The channels-last memory format of a conv weight, by its number of dims.
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def channels_last_weight(t: torch.Tensor) -> bool:
    """A 4-D or 5-D weight held channels-last (not also contiguous): an NHWC decoder's 2-D conv weight, or an NDHWC
    video VAE's 3-D one."""
    fmt = _CHANNELS_LAST.get(t.dim())
    return fmt is not None and not t.is_contiguous() and t.is_contiguous(memory_format=fmt)


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    if t.is_contiguous() or channels_last_weight(t):
        return t.detach()
    key = id(t)
    ref, copy = _CONTIGUOUS.get(key, (None, None))
    if ref is None or ref() is not t:
        copy = t.detach().contiguous()
        _CONTIGUOUS[key] = (weakref.ref(t, lambda _: _CONTIGUOUS.pop(key, None)), copy)
    return copy


def _module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's weights as the graphs take them: contiguous, or channels-last where the module holds a conv
    weight so. The second matters: a decoder in NHWC picks its Triton passes by its activations' layout while it is
    traced, and NCHW weights traced it into the torch twins (the FP8 engine's TAEHV decode took 8.2 ms against the
    eager 6.4, bench/results/next109-h100). weights.safetensors stores every weight contiguous; the build records
    which a graph takes channels-last and the load restores that layout (the graph asserts its inputs' strides)."""
    out = {n: _contiguous(p) for n, p in module.named_parameters()}
    out.update({n: _contiguous(b) for n, b in module.named_buffers()})
    return out


def _export_with_weight_inputs(prog) -> tuple[torch.export.ExportedProgram, list[str], list[torch.Tensor]]:
    """Export the step with only the weights its graph reads as inputs (two traces: the first finds them)."""
    tensors = _module_tensors(prog.module)
    names = list(tensors)
    for _ in range(2):
        weights = [tensors[n] for n in names]
        with torch.no_grad():
            ep = torch.export.export(
                WeightsAsInputs(prog.module, names), (*weights, *prog.fresh_inputs()), strict=False
            )
        placeholders = [n for n in ep.graph_module.graph.nodes if n.op == "placeholder"]
        user = ep.graph_signature.user_inputs
        used = {p.name for p in placeholders if p.users}
        keep = [name for name, ph in zip(names, user[: len(names)]) if ph in used]
        if len(keep) == len(names):
            return ep, names, weights
        names = keep
    raise EngineIncompatibleError(f"graph '{prog.name}': could not export it with its weights as inputs")


def graph_ops(ep: torch.export.ExportedProgram) -> collections.Counter[str]:
    """The flashdreams ops an exported graph calls, by name (`conv2d_nhwc`, not `flashdreams.conv2d_nhwc.default`),
    with how often."""
    targets = (str(n.target) for n in ep.graph.nodes if n.op == "call_function")
    return collections.Counter(t.split(".")[1] for t in targets if t.startswith("flashdreams."))


def _kernel_modules(ep: torch.export.ExportedProgram) -> list[str]:
    """The modules that register the flashdreams ops the exported graph calls (TAEHV's NHWC passes, say, which
    `import flashdreams.kernels` does not bring in)."""
    from flashdreams.kernels._common import OP_MODULES

    return sorted({OP_MODULES[op] for op in graph_ops(ep) if op in OP_MODULES})


def _import_kernel_modules(engine_dir: Path, manifest: dict) -> None:
    """Import what each graph's record names (`_kernel_modules`), so its ops exist before the graph loads."""
    for name, record in manifest.get("graphs", {}).items():
        for module in record.get("kernel_modules", ()):
            if not module.startswith("flashdreams.kernels."):
                raise EngineIncompatibleError(
                    f"engine '{engine_dir}': graph '{name}' names kernel module '{module}', which is not one of "
                    "flashdreams.kernels; rebuild the engine with fd-build"
                )
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise EngineIncompatibleError(
                    f"engine '{engine_dir}': graph '{name}' calls ops of '{module}', which this flashdreams "
                    f"lacks ({exc}); rebuild the engine with this version's fd-build"
                ) from None


def _plain_graph_module(ep: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """ep.module() as a plain FX module: flat tensor inputs, tuple output, no pytree or guard
    code (standalone_compile pickles the module for its cache key; those helpers do not pickle).
    Mutated inputs stay mutated in place (ep.module() re-applies them with copy_)."""
    gm = ep.module()
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op in ("call_module", "call_function") and "_guards_fn" in str(node.target):
            graph.erase_node(node)
    graph._codegen = torch.fx.graph.CodeGen()
    plain = torch.fx.GraphModule(gm, graph)  # keeps the get_attr constants it references
    plain.recompile()
    return plain


class _WeightStore:
    """The engine's weights, deduplicated by storage across graphs, in one safetensors file."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._by_storage: dict[tuple, str] = {}

    def add(self, graph: str, names: list[str], tensors: list[torch.Tensor]) -> list[str]:
        keys = []
        for name, t in zip(names, tensors):
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            key = self._by_storage.get(ident)
            if key is None:
                key = f"{graph}.{name}"
                self._by_storage[ident] = key
                self.tensors[key] = t
            keys.append(key)
        return keys

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        # Own CPU copies: safetensors refuses tensors that share storage.
        save_file({k: t.detach().to("cpu", copy=True).contiguous() for k, t in self.tensors.items()}, str(path))
        path.chmod(0o644)  # safetensors creates it owner-only; an engine is meant to be shared


def _bind(fn, weights: list[torch.Tensor]) -> GraphFn:
    def call(*args):
        with torch.no_grad():
            return as_tuple(fn(*weights, *args))

    return call


# -- the `cache` mode's loader ---------------------------------------------------------


def _compile_saved(path: Path, options: dict):
    ep = torch.export.load(str(path))
    return torch.compile(ep.module(), options=dict(options) or None, fullgraph=True)


def _no_recompile(fn, name: str):
    """The first call compiles (from the cache); after it, a call that would recompile is an
    error, never a silent compile in the middle of a session."""
    warm = [False]

    def call(*args):
        if not warm[0]:
            with short_lowering_messages():  # this call compiles
                out = fn(*args)
            warm[0] = True
            return out
        with torch.compiler.set_stance("fail_on_recompile"):
            try:
                return fn(*args)
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

    def __init__(self, config: BuildConfig | None = None) -> None:
        super().__init__(config)
        self._store = _WeightStore()
        self._mode = self.config.inductor_mode
        self._weights_pool: ThreadPoolExecutor | None = None  # the load's weight read (begin_load)
        self._weights_future = None
        self._channels_last: dict[str, torch.Tensor] = {}  # one channels-last copy a weight, shared by its graphs

    def begin_build(self, engine_dir: Path, device: torch.device) -> None:
        self._store = _WeightStore()
        self._mode = self.config.inductor_mode
        torch.compiler.reset()
        if device.type == "cuda":
            warm_compile_workers()
        try:  # keep only this build's artifacts in inductor_cache.bin
            from torch.compiler._cache import CacheArtifactManager

            CacheArtifactManager.clear()
        except (ImportError, AttributeError):  # pragma: no cover - older torch
            pass

    def build_graph(self, prog, engine_dir: Path, device: torch.device):
        graphs = engine_dir / "graphs"
        graphs.mkdir(parents=True, exist_ok=True)
        ep, names, weights = _export_with_weight_inputs(prog)
        keys = self._store.add(prog.name, names, weights)
        ep.example_inputs = None  # the KV ring would be saved with it (6 GB at full size)
        pt2 = graphs / f"{prog.name}.pt2"
        torch.export.save(ep, str(pt2))
        options = compile_options(device, prog.name, self.config.autotune)
        files = [rel(engine_dir, pt2)]
        if self._mode == "precompiled":
            from torch._inductor import standalone_compile

            art_path = graphs / f"{prog.name}.inductor"
            with torch.no_grad(), short_lowering_messages():
                art = standalone_compile(
                    _plain_graph_module(ep),
                    [*weights, *prog.fresh_inputs()],
                    dynamic_shapes="from_example_inputs",
                    options=dict(options),
                )
            art.save(path=str(art_path), format="binary")
            files.append(rel(engine_dir, art_path))
            fn = _bind(art, weights)
        else:
            fn = _bind(_no_recompile(_compile_saved(pt2, options), prog.name), weights)
            fn(*prog.fresh_inputs())  # compiles (and on CUDA autotunes) now, into the cache
        modules = _kernel_modules(ep)
        del ep
        record = {"files": files, "weights": keys, "compile": {"mode": self._mode, "options": options}}
        if modules:
            record["kernel_modules"] = modules
        nhwc = sorted({k for k, w in zip(keys, weights) if channels_last_weight(w)})
        if nhwc:
            record["channels_last"] = nhwc
        return record, fn

    def finish_build(self, engine_dir: Path) -> dict[str, str]:
        out = {"weights": WEIGHTS_FILE}
        self._store.save(engine_dir / WEIGHTS_FILE)
        self._store = _WeightStore()
        if self._mode == "cache":
            saved = torch.compiler.save_cache_artifacts()
            if saved is None:
                raise EngineIncompatibleError("Inductor produced no cache artifacts for this build")
            data, info = saved
            (engine_dir / CACHE_FILE).write_bytes(data)
            log.info("inductor cache artifacts: %d bytes (%s)", len(data), dict(info.artifacts))
            out["inductor_cache"] = CACHE_FILE
        return out

    def begin_load(self, engine_dir: Path, manifest: dict, device: torch.device) -> None:
        """Start reading the weights on a thread of their own: the read waits on the disk and the
        copies to the device, loading the graphs is Python, so the two overlap (the graphs wait
        for the weights only to bind them). `load_times["weights"]` is the read's own duration."""
        from flashdreams.export.weight_file import read_safetensors

        if manifest["engine"].get("graph_attention") == "triton":
            import flashdreams.kernels  # noqa: F401  (registers torch.ops.flashdreams.* the graphs call)
        _import_kernel_modules(engine_dir, manifest)
        arts = manifest.get("artifacts", {})
        t = time.perf_counter()
        if "inductor_cache" in arts:
            torch.compiler.load_cache_artifacts((engine_dir / arts["inductor_cache"]["file"]).read_bytes())
        self.load_times = {"inductor_cache": time.perf_counter() - t}
        path = engine_dir / arts["weights"]["file"]

        def read() -> dict[str, torch.Tensor]:
            t0 = time.perf_counter()
            try:
                return read_safetensors(path, device)
            finally:
                self.load_times["weights"] = time.perf_counter() - t0

        self._weights_pool = ThreadPoolExecutor(1, thread_name_prefix="fd-weights")
        self._weights_future = self._weights_pool.submit(read)
        self._channels_last = {}  # this load's channels-last copies (`_in_layout`)

    def _loaded_weights(self) -> dict[str, torch.Tensor]:
        return self._weights_future.result()  # (re-raises the read's error, e.g. a truncated file)

    def _in_layout(self, key: str, t: torch.Tensor, nhwc: set[str]) -> torch.Tensor:
        """A loaded weight in the layout its graph was traced with (see `_module_tensors`)."""
        if key not in nhwc:
            return t
        if key not in self._channels_last:
            self._channels_last[key] = t.contiguous(memory_format=_CHANNELS_LAST[t.dim()])
        return self._channels_last[key]

    def load_graph(self, engine_dir: Path, name: str, record: dict, device: torch.device) -> GraphFn:
        files = [f["file"] for f in record["files"]]
        mode = record.get("compile", {}).get("mode", "precompiled")
        if mode == "precompiled":
            from torch._inductor import CompiledArtifact

            art_file = next(f for f in files if f.endswith(".inductor"))
            try:
                fn = CompiledArtifact.load(path=str(engine_dir / art_file), format="binary")
            except Exception as exc:  # a corrupt or foreign artifact: name it, do not limp on
                raise EngineIncompatibleError(
                    f"engine '{engine_dir}': Inductor could not load '{art_file}' ({type(exc).__name__}: {exc}); "
                    "rebuild the engine with fd-build on this machine"
                ) from exc
        else:
            options = record.get("compile", {}).get("options", {})
            fn = _no_recompile(_compile_saved(engine_dir / files[0], options), name)
        loaded = self._loaded_weights()
        nhwc = set(record.get("channels_last", ()))
        try:
            weights = [self._in_layout(k, loaded[k], nhwc) for k in record["weights"]]
        except KeyError as exc:
            raise EngineIncompatibleError(
                f"engine '{engine_dir}': graph '{name}' takes weight {exc} that {WEIGHTS_FILE} lacks; rebuild it"
            ) from None
        return _bind(fn, weights)

    def end_load(self) -> None:
        # the bound graphs keep their tensors; nothing else needs the dict (a failed load that never
        # got here leaves a finished, idle thread behind: the read ends on its own)
        self._weights_pool.shutdown(wait=True)
        self._weights_future = None
        self._channels_last = {}
