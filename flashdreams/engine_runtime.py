"""Load a built engine directory and run sessions from it with no compilation at start.

`load_engine_dir` validates the manifest first (seal, files, fingerprint), loads the
backend's shared artifacts and each graph, runs each graph once (the warm-up: for the
inductor backend this is where the cached compile happens), and returns a plain
`flashdreams.Engine` whose backend, `CompiledBackend`, calls the loaded graphs by name. The
block plan comes from the manifest, so sessions made from it run the same program through
the same `Session` loop as eager ones, and no model family's code runs. Each load phase is
timed into `engine.load_times` (seconds) for fd-bench.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from flashdreams import registry
from flashdreams.errors import EngineIncompatibleError, InvalidArgumentError
from flashdreams.export.backends import GraphFn, get_backend
from flashdreams.export.build_config import BuildConfig
from flashdreams.export.manifest import TensorSpec, dtype_from_name, validate_engine
from flashdreams.export.steps import flatten_call
from flashdreams.models.family import BlockPlan

log = logging.getLogger(__name__)


class GraphRunner:
    """One loaded graph with its typed I/O: flattens the call, checks inputs, copies state outputs back.

    It is called with the *call inputs* of the manifest (the session's tensors, the rings as
    whole [layers, ...] tensors); a grouped call input is passed to the graph as its
    dim-0 slices, so every per-layer write lands in the session's buffer.
    """

    def __init__(self, name: str, fn: GraphFn, record: dict, device: torch.device) -> None:
        self.name = name
        self.fn = fn
        self.device = device
        self.inputs = [TensorSpec.from_dict(d) for d in record["inputs"]]
        self.outputs = [TensorSpec.from_dict(d) for d in record["outputs"]]
        self.call_names = list(record.get("call_inputs", [s.name for s in self.inputs]))
        self.groups = {k: list(v) for k, v in record.get("groups", {}).items()}
        names = [s.name for s in self.inputs]
        # functional graphs: output index -> input index it replaces
        self.copy_back = [
            (i, names.index(record["state_outputs"][s.name]))
            for i, s in enumerate(self.outputs)
            if s.name in record.get("state_outputs", {})
        ]
        self.n_results = len(self.outputs) - len(self.copy_back)
        self.warmup_values = record.get("warmup_values", {})

    def check(self, args: tuple[torch.Tensor, ...]) -> None:
        """Shapes, dtypes and device against the manifest (host metadata only: no sync)."""
        if len(args) != len(self.inputs):
            raise InvalidArgumentError(f"graph '{self.name}' takes {len(self.inputs)} inputs, got {len(args)}")
        for spec, t in zip(self.inputs, args):
            if not spec.matches(t) or t.device != self.device:
                raise InvalidArgumentError(
                    f"graph '{self.name}': input '{spec.name}' must be {spec.dtype} {list(spec.shape)} on "
                    f"{self.device} (the engine's static shapes); got {t.dtype} {list(t.shape)} on {t.device}"
                )
            if not t.is_contiguous():  # compiled graphs assume the traced (contiguous) strides
                raise InvalidArgumentError(
                    f"graph '{self.name}': input '{spec.name}' must be contiguous (the engine's static strides); "
                    f"got strides {t.stride()}"
                )

    def __call__(self, *call_args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(call_args) != len(self.call_names):
            raise InvalidArgumentError(
                f"graph '{self.name}' is called with {len(self.call_names)} inputs ({', '.join(self.call_names)}), "
                f"got {len(call_args)}"
            )
        args = flatten_call(self.call_names, self.groups, call_args)
        self.check(args)
        outs = self.fn(*args)
        for out_i, in_i in self.copy_back:
            args[in_i].copy_(outs[out_i])
        return tuple(outs[: self.n_results])

    def dummy_inputs(self) -> tuple[torch.Tensor, ...]:
        """Call inputs for the warm-up: zeros (grouped ones as one tensor, like a session's), with
        the build's example values for small integer inputs."""
        specs = {s.name: s for s in self.inputs}
        out = []
        for name in self.call_names:
            if name in self.groups:
                first = specs[self.groups[name][0]]
                shape = (len(self.groups[name]), *first.shape)
                out.append(torch.zeros(shape, dtype=first.dtype, device=self.device))
                continue
            s = specs[name]
            if name in self.warmup_values:
                t = torch.tensor(self.warmup_values[name], dtype=s.dtype).reshape(s.shape).to(self.device)
            else:
                t = torch.zeros(s.shape, dtype=s.dtype, device=self.device)
            out.append(t)
        return tuple(out)


class CompiledBackend:
    """The graph backend of a built engine: runs its loaded graphs by name, with the eager contract."""

    shape_specialized = False

    def __init__(self, name: str, graphs: dict[str, GraphRunner], plan: BlockPlan, dtype, device) -> None:
        self.name = name
        self.graphs = graphs
        self.plan = plan
        self.device = device
        self.dtype = dtype

    @torch.no_grad()
    def call(self, graph: str, args: dict[str, torch.Tensor], block: int) -> tuple[torch.Tensor, ...]:
        runner = self.graphs[graph]
        return runner(*[args[n] for n in runner.call_names])


def _resolve_device(device, fallback: torch.device) -> torch.device:
    dev = torch.device(device) if device is not None else fallback
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def built_attention(engine_record: dict) -> str:
    """The attention a built engine's graphs run: a manifest's "engine" record (older manifests name only
    "attention")."""
    return engine_record.get("graph_attention", engine_record.get("attention"))


def load_engine_dir(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    attention: str | None = "sdpa",
    decoder: str | None = "preset",
    warmup: bool = True,
    precision: str | None = "bf16",
):
    """Load a built engine directory as a `flashdreams.Engine` (see the module docstring).

    `attention` is fixed when the engine is built; the default ("sdpa") or None accepts
    whatever the engine was built with, another value that differs is refused. `precision` likewise: the
    default ("bf16") or None accepts the engine's, "fp8" is refused for an engine built in bf16.
    `decoder`: "preset" uses the engine's compiled decoder (if it was built with one),
    None gives latents only, another name builds that decoder eagerly (random weights).
    """
    from flashdreams.engine import Engine

    path = Path(path)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    val = validate_engine(path, device)
    m, dev = val.manifest, _resolve_device(device, val.device)
    for note in val.notes:
        log.info("engine %s: %s", path, note)
    eng = m["engine"]
    built = built_attention(eng)
    if attention not in (None, "sdpa", built):
        raise InvalidArgumentError(
            f"engine '{path}' was built with attention '{built}'; attention is fixed at build time "
            f"(asked for '{attention}'): rebuild with fd-build --attention {attention}"
        )
    built_precision = eng.get("precision", "bf16")  # (engines from before FP8 builds were all bf16)
    if precision not in (None, "bf16", built_precision):
        raise InvalidArgumentError(
            f"engine '{path}' was built with precision '{built_precision}'; precision is fixed at build time "
            f"(asked for '{precision}'): rebuild with fd-build --precision {precision}"
        )
    plan = BlockPlan.from_dict(m["plan"])
    preset = registry.preset_from_dict(m["preset"])
    if plan.batch != eng["batch"] or list(plan.latents.shape) != eng["latent_shape"]:
        raise EngineIncompatibleError(
            f"manifest's engine shapes (batch {eng['batch']}, latents {eng['latent_shape']}) disagree with its plan "
            f"(batch {plan.batch}, latents {list(plan.latents.shape)}); rebuild the engine"
        )
    times["validate"] = time.perf_counter() - t0

    # The compiled decoder, or none (then its graphs are not loaded).
    dec_rec = m.get("decoder")
    built_name = dec_rec["name"] if dec_rec else None
    if decoder not in (None, "none", "preset", built_name):
        raise InvalidArgumentError(
            f"engine '{path}' was built with decoder '{built_name}'; the decoder is fixed at build time "
            f"(asked for '{decoder}'): rebuild with fd-build --decoder {decoder}, or pass --decoder none"
        )
    if decoder in (None, "none"):
        plan = plan.without_decoder()
    graphs = {n: r for n, r in m["graphs"].items() if n in plan.graphs}
    if built_precision == "fp8":  # after every check above, so that a refused load changes nothing
        from flashdreams.kernels.fp8_linear import prefer_workspace_free_gemms

        prefer_workspace_free_gemms()  # before the graphs' first GEMM

    backend = get_backend(m["backend"], BuildConfig.from_env(m["backend"]))  # FD_AOTI_FORCE=1: try a blocked load
    kernels = m.get("artifacts", {}).get("kernels")
    if kernels is not None:  # Triton kernels on CUDA, compiled C++ kernels on CPU
        from flashdreams.export.kernel_cache import install_kernels

        t = time.perf_counter()
        added = install_kernels(path / kernels["file"])
        times["install_kernels"] = time.perf_counter() - t
        log.info("engine %s: %d kernel cache entries added to this machine's caches", path, added)
    t = time.perf_counter()
    backend.load_times = {}
    backend.begin_load(path, m, dev)
    times["load_artifacts"] = time.perf_counter() - t

    t = time.perf_counter()
    runners = {n: GraphRunner(n, backend.load_graph(path, n, rec, dev), rec, dev) for n, rec in graphs.items()}
    backend.end_load()
    times["load_programs"] = time.perf_counter() - t
    # (after the programs: a backend may read its artifacts while they load, the inductor one its weights)
    times.update({f"load_artifacts.{k}": v for k, v in backend.load_times.items()})

    t = time.perf_counter()
    if warmup:
        with torch.no_grad():
            for runner in runners.values():
                runner(*runner.dummy_inputs())
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    times["first_call"] = time.perf_counter() - t

    cb = CompiledBackend(m["backend"], runners, plan, dtype_from_name(eng["dtype"]), dev)
    engine = Engine(cb, plan, preset, str(path), None, bool(m.get("stand_in_inputs")), precision=built_precision)
    engine.decoder_name = plan.meta.get("decoder")
    times["total"] = time.perf_counter() - t0
    engine.load_times = {k: round(v, 4) for k, v in times.items()}
    engine.manifest = m
    engine.validation = val
    log.info("loaded %s engine %s in %.2f s (%s)", m["backend"], path, times["total"], engine.load_times)
    return engine
