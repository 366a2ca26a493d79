"""Load a built engine directory and run sessions from it with no compilation at start.

`load_engine_dir` validates the manifest first (seal, files, fingerprint), loads the
backend's shared artifacts and each graph, runs each graph once (the warm-up: for the
inductor backend this is where the cached compile happens), and returns a plain
`flashdreams.Engine` whose backend, `CompiledBackend`, calls the loaded graphs. Sessions
made from it run through the same `Session` loop as eager ones. Each load phase is timed
into `engine.load_times` (seconds) for fd-bench.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from flashdreams.errors import EngineIncompatibleError, InvalidArgumentError
from flashdreams.export.backends import GraphFn, get_backend
from flashdreams.export.manifest import TensorSpec, dtype_from_name, validate_engine
from flashdreams.export.steps import flatten_call
from flashdreams.models.scheduler import FlowSchedule

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
    """The StepBackend of a built engine: encode_prompt / denoise / commit call loaded graphs."""

    def __init__(self, name: str, graphs: dict[str, GraphRunner], manifest: dict, device: torch.device) -> None:
        eng = manifest["engine"]
        self.name = name
        self.graphs = graphs
        self.device = device
        self.dtype = dtype_from_name(eng["dtype"])
        self.num_layers, self.num_heads, self.head_dim = eng["num_layers"], eng["num_heads"], eng["head_dim"]
        self.text_len = eng["text_len"]
        self.batch = eng["batch"]
        sched = eng["schedule"]
        self._encode = graphs[sched["graph_of_call"]["encode_prompt"]]
        self._denoise = graphs[sched["graph_of_call"]["denoise"]]
        self._commit = graphs[sched["graph_of_call"]["commit"]]

    @torch.no_grad()
    def encode_prompt(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if context.shape[0] != self.batch:
            raise InvalidArgumentError(
                f"this engine was built for batch {self.batch}; the prompt has batch {context.shape[0]} "
                "(rebuild with fd-build --batch N)"
            )
        ctx = context.to(self.device, torch.float32)
        if ctx.shape[1] < self.text_len:  # the eager model zero-pads the same way
            ctx = F.pad(ctx, (0, 0, 0, self.text_len - ctx.shape[1]))
        cross_k, cross_v = self._encode(ctx.contiguous())
        return cross_k, cross_v

    @torch.no_grad()
    def denoise(self, x, t, cross_k, cross_v, ring_k, ring_v, frame_positions, slots, valid_len) -> torch.Tensor:
        return self._denoise(x, t, cross_k, cross_v, ring_k, ring_v, frame_positions, slots, valid_len)[0]

    @torch.no_grad()
    def commit(self, x, t, cross_k, cross_v, ring_k, ring_v, frame_positions, slots, valid_len) -> None:
        self._commit(x, t, cross_k, cross_v, ring_k, ring_v, frame_positions, slots, valid_len)


@dataclass
class CompiledDecodeState:
    """The decoder's state tensors (allocated once, updated in place) and the host-side first-block flag."""

    tensors: list[torch.Tensor]
    started: bool = field(default=False)

    def reset(self) -> None:
        for t in self.tensors:
            t.zero_()
        self.started = False


class CompiledDecoder:
    """A StreamingDecoder over the engine's `decode_first` / `decode` graphs."""

    def __init__(self, name: str, first: GraphRunner, steady: GraphRunner, manifest: dict) -> None:
        self.name = name
        self.first, self.steady = first, steady
        self.device = first.device
        self.state_specs = first.inputs[1:]
        self.dtype = self.state_specs[0].dtype if self.state_specs else torch.float32
        lat = manifest["engine"]["latent_shape"]
        self.batch, self.latent_h, self.latent_w = lat[0], lat[3], lat[4]
        self.frames_first = first.outputs[0].shape[1]
        self.frames = steady.outputs[0].shape[1]

    def new_state(self, batch: int, latent_h: int, latent_w: int) -> CompiledDecodeState:
        if (batch, latent_h, latent_w) != (self.batch, self.latent_h, self.latent_w):
            raise InvalidArgumentError(
                f"decoder '{self.name}' was built for batch {self.batch}, latents {self.latent_h}x{self.latent_w}; "
                f"asked for batch {batch}, {latent_h}x{latent_w}"
            )
        return CompiledDecodeState([torch.zeros(s.shape, dtype=s.dtype, device=self.device) for s in self.state_specs])

    @torch.no_grad()
    def decode_block(self, latents: torch.Tensor, state: CompiledDecodeState) -> torch.Tensor:
        graph = self.steady if state.started else self.first
        video = graph(latents.float(), *state.tensors)[0]
        state.started = True
        return video

    def reset(self, state: CompiledDecodeState) -> None:
        state.reset()

    def num_frames(self, num_latents: int, first: bool) -> int:
        return self.frames_first if first else self.frames


def _spec_from_manifest(m: dict):
    from flashdreams.engine import EngineSpec
    from flashdreams.presets import Preset

    eng = m["engine"]
    preset = Preset.from_dict(m["preset"])
    spec = EngineSpec.from_preset(preset, eng["height"], eng["width"])
    s = eng["schedule"]
    schedule = FlowSchedule(
        timesteps=tuple(float(v) for v in s["timesteps"]),
        sigmas=tuple(float(v) for v in s["sigmas"]),
        context_noise=float(s["context_noise"]),
        shift=float(s["shift"]),
    )
    spec = dataclasses.replace(spec, schedule=schedule)
    lat = [eng["batch"], spec.latent_channels, spec.num_frame_per_block, spec.latent_h, spec.latent_w]
    if lat != eng["latent_shape"] or spec.ring.to_dict() != eng["ring"]:
        raise EngineIncompatibleError(
            f"manifest's engine shapes (latents {eng['latent_shape']}, ring {eng['ring']}) disagree with its preset "
            f"(latents {lat}, ring {spec.ring.to_dict()}); rebuild the engine"
        )
    return spec


def _resolve_device(device, fallback: torch.device) -> torch.device:
    dev = torch.device(device) if device is not None else fallback
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def load_engine_dir(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    attention: str | None = "sdpa",
    decoder: str | None = "preset",
    warmup: bool = True,
):
    """Load a built engine directory as a `flashdreams.Engine` (see the module docstring).

    `attention` is fixed when the engine is built; the default ("sdpa") or None accepts
    whatever the engine was built with, another value that differs is refused.
    `decoder`: "preset" uses the engine's compiled decoder (if it was built with one),
    None gives latents only, another name builds that decoder eagerly (random weights).
    """
    from flashdreams.engine import Engine, build_session_decoder

    path = Path(path)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    val = validate_engine(path, device)
    m, dev = val.manifest, _resolve_device(device, val.device)
    for note in val.notes:
        log.info("engine %s: %s", path, note)
    eng = m["engine"]
    built_attention = eng.get("graph_attention", eng.get("attention"))
    if attention not in (None, "sdpa", built_attention):
        raise InvalidArgumentError(
            f"engine '{path}' was built with attention '{built_attention}'; attention is fixed at build time "
            f"(asked for '{attention}'): rebuild with fd-build --attention {attention}"
        )
    spec = _spec_from_manifest(m)
    times["validate"] = time.perf_counter() - t0

    # Which decoder: the compiled one, an eager one, or none (then its graphs are not loaded).
    dec_rec = m.get("decoder")
    built_name = dec_rec["name"] if dec_rec else None
    want = None if decoder in (None, "none") else (built_name if decoder == "preset" else decoder)
    compiled_decoder = want is not None and want == built_name and bool(dec_rec.get("compiled"))
    graphs = {n: r for n, r in m["graphs"].items() if compiled_decoder or "decode" not in r["serves"]}

    backend = get_backend(m["backend"])
    kernels = m.get("artifacts", {}).get("kernels")
    if kernels is not None and dev.type == "cuda":
        from flashdreams.export.kernel_cache import install_kernels

        t = time.perf_counter()
        added = install_kernels(path / kernels["file"])
        times["install_kernels"] = time.perf_counter() - t
        log.info("engine %s: %d kernel cache entries added to this machine's caches", path, added)
    t = time.perf_counter()
    backend.load_times = {}
    backend.begin_load(path, m, dev)
    times["load_artifacts"] = time.perf_counter() - t
    times.update({f"load_artifacts.{k}": v for k, v in backend.load_times.items()})

    t = time.perf_counter()
    runners = {n: GraphRunner(n, backend.load_graph(path, n, rec, dev), rec, dev) for n, rec in graphs.items()}
    backend.end_load()
    times["load_programs"] = time.perf_counter() - t

    t = time.perf_counter()
    if warmup:
        with torch.no_grad():
            for runner in runners.values():
                runner(*runner.dummy_inputs())
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    times["first_call"] = time.perf_counter() - t

    cb = CompiledBackend(m["backend"], runners, m, dev)
    dec = None
    if compiled_decoder:
        dec = CompiledDecoder(want, runners["decode_first"], runners["decode"], m)
    elif want is not None:
        log.warning("engine %s: decoder '%s' is not compiled into it; running it eagerly", path, want)
        seed = m.get("weights_seed") or 0
        dec = build_session_decoder(spec.preset, want, dev, cb.dtype, seed, None, True)
    elif decoder == "preset":
        log.info("engine %s was built without a decoder: sessions return latents only", path)
    engine = Engine(cb, spec, dec, str(path))
    times["total"] = time.perf_counter() - t0
    engine.load_times = {k: round(v, 4) for k, v in times.items()}
    engine.manifest = m
    engine.validation = val
    log.info("loaded %s engine %s in %.2f s (%s)", m["backend"], path, times["total"], engine.load_times)
    return engine
