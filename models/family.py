"""The model-family contract: what a family declares, as plain data the runtime can run.

A family (one package under `models/families/`, one line in `flashdreams.registry`) turns a
preset into a `LoadedModel`: eager step graphs (nn.Modules called with named tensors) and a
`BlockPlan`. The plan is data and nothing else: the session's state and static input buffers
(named, with shape and dtype), the constants and random draws of a block, and the block
program (which graph runs on which buffers, the sampler's linear updates, when frames leave,
when the cache is committed). The eager runtime runs the plan over the family's modules; a
built engine stores the plan in its manifest and runs it over compiled graphs; a C++ host can
read it. Nothing here imports the runtime or any family.

Block program ops (JSON objects; every name is a session buffer):
  {"op": "call", "graph": G, "args": {param: buffer}, "outs": {output: buffer}}
  {"op": "lincomb", "out": B, "terms": [[coef, buffer], ...], "f64": bool}   B = sum(coef * buffer), float32
  {"op": "frames", "src": video, "out": frames}   float [B, T, 3, H, W] in [0, 1] -> uint8 [B, T, H, W, 3]
  {"op": "copy", "src": A, "out": B, "index": [dim, start, end] (optional: a slice of A)}
  {"op": "emit", "latents": A, "frames": F | None}   the block's result; frames may leave from here
  {"op": "mark", "name": stage}   a stage boundary (timing, and where captured graphs split)

Row-independent plans (`meta["rows"] == "independent"`) can be stepped as many worlds in one
batch, each at its own block index (flashdreams.batched): every state, input, draw and latents
buffer has the batch as dim 0 (constants have it, or no batch dim at all), the plan has one
block kind (`sequence == []`), and a state buffer `block_index` (int64 [B]) that the runtime
writes before each block gives every row its own block index on the device; graphs derive RoPE
positions, ring slots and valid lengths from it, so no graph branches on a host-side block
index. Rows never mix: row i of every output depends only on row i of the inputs and state.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from flashdreams.errors import InvalidArgumentError

DTYPE_NAMES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
    "float8_e4m3fn": torch.float8_e4m3fn,
}


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPE_NAMES[name]
    except KeyError:
        raise InvalidArgumentError(f"dtype '{name}' is unknown; known: {sorted(DTYPE_NAMES)}") from None


@dataclass(frozen=True)
class TensorDecl:
    """A named buffer of fixed shape and dtype (session state, a random draw, a temporary)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    meaning: str = ""
    fill: float = 0.0  # the value it holds after allocation and after reset
    # State a block advances in a way a retry cannot redo (a decoder's carried caches): the session
    # snapshots it before a step and restores it if the step fails. A KV ring needs no snapshot:
    # a block rewrites exactly the slots it wrote before the failure.
    rollback: bool = False
    # A random draw the graphs read only at block 0 (a start pick): drawn there and never again, so
    # a batch of worlds past their first block draws nothing for it (one seeded draw per row each block
    # would cost a launch per world).
    first_block_only: bool = False
    # Which dim holds the batch rows: 0 for most buffers, 1 for per-layer caches ([layers, B, ...]),
    # None for a table every row shares (a block's RoPE positions and ring slots in plans that are
    # not row-independent, rewritten every block). Batched worlds copy and clear rows along it.
    batch_dim: int | None = 0

    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    def allocate(self, device: torch.device | str) -> torch.Tensor:
        return torch.full(self.shape, self.fill, dtype=self.torch_dtype(), device=device)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> TensorDecl:
        return cls(**{**d, "shape": tuple(d["shape"])})


@dataclass(frozen=True)
class InputSpec:
    """A named input a session accepts: what a host must send, and what it means.

    `shape` is exact (batch included); `accepts` lists other ranks the runtime widens
    (e.g. a prompt [T, D] for [1, T, D]); rows along `pad_dim` may be fewer than the shape's
    (zero-padded, e.g. prompt rows up to text_len). `low`/`high` bound finite values.
    `when` is "block" (read by every block) or "reset" (takes effect when the session resets,
    e.g. a start image). Setting an input runs `program` (ops) if it has one, e.g. the
    prompt's cross-attention cache.

    `units` says what kind of control it is, so hosts (fd-serve's page, the Gymnasium space)
    can build it without knowing the family: "keys" (0/1 key states per video frame, the last
    dim's columns named by `labels`, e.g. ("w", "s", "a", "d")), "mouse" (per-frame deltas,
    `labels` e.g. ("pitch", "yaw")), "embedding" (a prompt), "camera", "image", "latent", ...
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    meaning: str = ""
    units: str = ""
    low: float | None = None
    high: float | None = None
    when: str = "block"
    pad_dim: int | None = None
    required: bool = False
    program: tuple[dict, ...] = ()
    labels: tuple[str, ...] = ()  # names of the last dim's columns (keys, mouse axes), if they have names
    rules: tuple[str, ...] = ()  # named value checks (models/input_rules.py), e.g. "rigid_transform"

    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    def describe(self) -> str:
        rng = ""
        if self.low is not None or self.high is not None:
            rng = f", values in [{self.low if self.low is not None else '-inf'}, "
            rng += f"{self.high if self.high is not None else 'inf'}]"
        units = f" ({self.units})" if self.units else ""
        return f"{self.name} {self.dtype} {list(self.shape)}{units}{rng}: {self.meaning}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["program"] = [dict(op) for op in self.program]
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> InputSpec:
        return cls(
            **{
                **d,
                "shape": tuple(d["shape"]),
                "program": tuple(d.get("program", ())),
                "labels": tuple(d.get("labels", ())),
                "rules": tuple(d.get("rules", ())),
            }
        )


@dataclass(frozen=True)
class GraphSig:
    """A step graph's named call inputs (in call order), outputs, and the inputs it writes in place.

    `groups` names call inputs that hold one tensor per layer along dim 0 (the KV ring): a
    compiled graph takes each slice as its own input so its writes land in place.
    """

    name: str
    args: tuple[str, ...]
    outs: tuple[str, ...]
    mutates: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping) -> GraphSig:
        return cls(
            d["name"], tuple(d["args"]), tuple(d["outs"]), tuple(d.get("mutates", ())), tuple(d.get("groups", ()))
        )


@dataclass(frozen=True)
class RingRule:
    """Per-block integer buffers of a streaming model's KV ring, from the host-known block index.

    Block b covers absolute latent frames [b*nf, b*nf + nf); the rule writes the RoPE frame
    positions, the ring slots and the valid length into the named int64 state buffers.
    `sink`/`window` in frames, `frame_tokens` tokens per latent frame (see models/kv_ring.py).
    """

    sink: int
    window: int
    frame_tokens: int
    frames_per_block: int
    positions: str = "frame_positions"
    slots: str = "slots"
    valid_len: str = "valid_len"

    def slot_of(self, frame: int) -> int:
        return frame if frame < self.sink else self.sink + (frame - self.sink) % self.window

    def values(self, block: int) -> dict[str, list[int]]:
        first = block * self.frames_per_block
        frames = list(range(first, first + self.frames_per_block))
        end = first + self.frames_per_block
        return {
            self.positions: frames,
            self.slots: [self.slot_of(f) for f in frames],
            self.valid_len: [min(end, self.sink + self.window) * self.frame_tokens],
        }

    def valid_tokens(self, block: int) -> int:
        return self.values(block)[self.valid_len][0]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def ring_tables(frames: int, unit: str = "block") -> dict[str, TensorDecl]:
    """The int64 tables a streaming model's KV ring reads each block (RingRule's `positions`, `slots`,
    `valid_len`, or a family's own rule): one for the whole batch, rewritten every block, so batched
    worlds never copy them per row (`batch_dim` None)."""
    return {
        "frame_positions": TensorDecl(
            "frame_positions", (frames,), "int64", f"absolute latent frame of each {unit} frame", batch_dim=None
        ),
        "slots": TensorDecl("slots", (frames,), "int64", f"ring frame-slot of each {unit} frame", batch_dim=None),
        "valid_len": TensorDecl("valid_len", (1,), "int64", f"valid ring rows after this {unit}", batch_dim=None),
    }


@dataclass
class BlockPlan:
    """Everything a session needs to run a model's blocks, as data (see the module docstring)."""

    family: str
    batch: int
    graphs: dict[str, GraphSig]
    state: dict[str, TensorDecl]
    inputs: dict[str, InputSpec]
    constants: dict[str, TensorDecl]
    draws: dict[str, TensorDecl]
    programs: dict[str, list[dict]]
    sequence: list[str]  # the kinds of the first blocks, in order
    steady: str  # the kind of every later block
    latents: TensorDecl  # what `emit` hands out as the block's latents (first of any kind)
    ring: RingRule | None = None
    # A buffer written by an input's program on reset, e.g. the start image's prefill.
    reset_program: list[dict] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # informational (fps, frames per block, ...)

    def kind_of(self, block: int) -> str:
        return self.sequence[block] if block < len(self.sequence) else self.steady

    def validate(self) -> None:
        """Every buffer an op names exists or is written earlier; every graph is declared."""
        known = set(self.state) | set(self.inputs) | set(self.constants) | set(self.draws)
        for kind, ops in (
            list(self.programs.items())
            + [("reset", self.reset_program)]
            + [(f"input {n}", list(s.program)) for n, s in self.inputs.items()]
        ):
            written = set(known)
            for i, op in enumerate(ops):
                for name in op_reads(op):
                    if name not in written:
                        raise InvalidArgumentError(f"plan '{kind}' op {i} ({op['op']}) reads '{name}' before it exists")
                if op["op"] == "call" and op["graph"] not in self.graphs:
                    raise InvalidArgumentError(f"plan '{kind}' op {i} calls undeclared graph '{op['graph']}'")
                written |= set(op_writes(op))
        for kind in {*self.sequence, self.steady}:
            if kind not in self.programs:
                raise InvalidArgumentError(f"plan: block kind '{kind}' has no program")
        from flashdreams.models.input_rules import RULES

        for spec in self.inputs.values():
            unknown = [r for r in spec.rules if r not in RULES]
            if unknown:
                raise InvalidArgumentError(f"plan input '{spec.name}': unknown rules {unknown}; known: {sorted(RULES)}")

    @property
    def row_independent(self) -> bool:
        return self.meta.get("rows") == "independent"

    def with_batch(self, batch: int) -> BlockPlan:
        """The same row-independent plan for `batch` rows: every buffer's dim 0 resized."""
        if not self.row_independent:
            raise InvalidArgumentError(
                f"the {self.family} plan is not row-independent (meta['rows']), so its batch is fixed at {self.batch}"
            )
        if not isinstance(batch, int) or batch < 1:
            raise InvalidArgumentError(f"batch must be an integer >= 1, got {batch!r}")

        def resized(d):
            if not d.shape or d.shape[0] != self.batch:
                raise InvalidArgumentError(
                    f"plan buffer '{d.name}' {list(d.shape)} does not have the batch ({self.batch}) as dim 0"
                )
            return dataclasses.replace(d, shape=(batch, *d.shape[1:]))

        def group(g):
            return {n: resized(d) for n, d in g.items()}

        return dataclasses.replace(
            self,
            batch=batch,
            state=group(self.state),
            inputs=group(self.inputs),
            # Constants hold one value for every row: resized when batched, else shared as they are.
            constants={n: resized(d) if d.shape and d.shape[0] == self.batch else d for n, d in self.constants.items()},
            draws=group(self.draws),
            latents=resized(self.latents),
        )

    def without_decoder(self) -> BlockPlan:
        """The same plan with its decoder graphs left out: blocks hand out latents only."""
        dec = set(self.meta.get("decoder_graphs", ()))
        if not dec:
            return self
        dropped: set[str] = set()
        programs = {}
        for kind, ops in self.programs.items():
            kept = []
            for op in ops:
                if op["op"] == "call" and op["graph"] in dec:
                    dropped |= set(op["outs"].values())
                elif op["op"] == "frames" and op["src"] in dropped:
                    dropped.add(op["out"])
                elif op["op"] == "emit":
                    kept.append({**op, "frames": None})
                else:
                    kept.append(op)
            programs[kind] = kept
        dec_state = set(self.meta.get("decoder_state", ()))
        meta = {**self.meta, "decoder": None, "decoder_graphs": [], "decoder_state": []}
        return dataclasses.replace(
            self,
            graphs={n: g for n, g in self.graphs.items() if n not in dec},
            state={n: s for n, s in self.state.items() if n not in dec_state},
            programs=programs,
            meta=meta,
        )

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "batch": self.batch,
            "graphs": {n: g.to_dict() for n, g in self.graphs.items()},
            "state": {n: s.to_dict() for n, s in self.state.items()},
            "inputs": {n: s.to_dict() for n, s in self.inputs.items()},
            "constants": {n: s.to_dict() for n, s in self.constants.items()},
            "draws": {n: s.to_dict() for n, s in self.draws.items()},
            "programs": self.programs,
            "sequence": list(self.sequence),
            "steady": self.steady,
            "latents": self.latents.to_dict(),
            "ring": self.ring.to_dict() if self.ring else None,
            "reset_program": self.reset_program,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> BlockPlan:
        decls = lambda m: {n: TensorDecl.from_dict(s) for n, s in m.items()}  # noqa: E731
        return cls(
            family=d["family"],
            batch=int(d["batch"]),
            graphs={n: GraphSig.from_dict(g) for n, g in d["graphs"].items()},
            state=decls(d["state"]),
            inputs={n: InputSpec.from_dict(s) for n, s in d["inputs"].items()},
            constants=decls(d["constants"]),
            draws=decls(d["draws"]),
            programs={k: [dict(op) for op in v] for k, v in d["programs"].items()},
            sequence=list(d["sequence"]),
            steady=d["steady"],
            latents=TensorDecl.from_dict(d["latents"]),
            ring=RingRule(**d["ring"]) if d.get("ring") else None,
            reset_program=[dict(op) for op in d.get("reset_program", [])],
            meta=dict(d.get("meta", {})),
        )


def op_reads(op: Mapping) -> list[str]:
    kind = op["op"]
    if kind == "call":
        return list(op["args"].values())
    if kind == "lincomb":
        return [name for _, name in op["terms"]]
    if kind in ("frames", "copy"):
        return [op["src"]]
    if kind == "emit":
        return [n for n in (op["latents"], op.get("frames")) if n]
    return []


def op_writes(op: Mapping) -> list[str]:
    kind = op["op"]
    if kind == "call":
        return list(op["outs"].values())
    if kind in ("lincomb", "frames", "copy"):
        return [op["out"]]
    return []


# -- op helpers for families (samplers build their updates with these) -------------------------


def call(graph: str, args: Mapping[str, str], outs: Mapping[str, str] | None = None) -> dict:
    return {"op": "call", "graph": graph, "args": dict(args), "outs": dict(outs or {})}


def lincomb(out: str, terms: list[tuple[float, str]], f64: bool = False) -> dict:
    return {"op": "lincomb", "out": out, "terms": [[float(c), n] for c, n in terms], "f64": bool(f64)}


def run_lincomb(terms: list, buffers: Mapping[str, torch.Tensor], f64: bool) -> torch.Tensor:
    """sum(coef * buffer) as float32; with f64 the sum is taken in float64 (the reference's x0 rule)."""
    dt = torch.float64 if f64 else torch.float32
    acc = None
    for coef, name in terms:
        term = buffers[name].to(dt) * coef if coef != 1.0 else buffers[name].to(dt)
        acc = term if acc is None else acc + term
    return acc.float()


def video_to_frames(video: torch.Tensor) -> torch.Tensor:
    """[B, T, 3, H, W] float in [0, 1] -> uint8 [B, T, H, W, 3] (rounded, clamped)."""
    return (video.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2)


def run_ops(
    ops: list[dict],
    buffers: dict[str, torch.Tensor],
    call_graph: Callable[[str, dict[str, torch.Tensor]], tuple[torch.Tensor, ...]],
    graphs: Mapping[str, GraphSig],
    on_emit: Callable[[torch.Tensor, torch.Tensor | None], None] | None = None,
    on_mark: Callable[[str], None] | None = None,
    shelf: dict | None = None,
) -> None:
    """Run block-program ops eagerly over named buffers.

    `call_graph(name, args)` runs a graph on its named call inputs and returns its outputs in
    `graphs[name].outs` order. A buffer an op writes is written in place when it exists with
    the same shape (its address stays fixed, which captured graphs need), else created. With a
    `shelf`, a buffer whose shape changes (a first block's 9 frames, then 12) is kept there and
    reused when that shape comes back, so no buffer a captured graph writes is ever freed.
    """
    store = lambda name, value: _store(buffers, name, value, shelf)  # noqa: E731
    for op in ops:
        kind = op["op"]
        if kind == "call":
            sig = graphs[op["graph"]]
            outs = call_graph(op["graph"], {a: buffers[b] for a, b in op["args"].items()})
            for out_name, value in zip(sig.outs, outs):
                if out_name in op["outs"]:
                    store(op["outs"][out_name], value)
        elif kind == "lincomb":
            store(op["out"], run_lincomb(op["terms"], buffers, op.get("f64", False)))
        elif kind == "frames":
            store(op["out"], video_to_frames(buffers[op["src"]]))
        elif kind == "copy":
            src = buffers[op["src"]]
            if op.get("index"):
                dim, start, end = op["index"]
                src = src.narrow(dim, start, end - start)
            store(op["out"], src)
        elif kind == "emit":
            if on_emit is not None:
                on_emit(buffers[op["latents"]], buffers[op["frames"]] if op.get("frames") else None)
        elif kind == "mark":
            if on_mark is not None:
                on_mark(op["name"])
        else:
            raise InvalidArgumentError(f"block program: unknown op '{kind}'")


def _store(buffers: dict[str, torch.Tensor], name: str, value: torch.Tensor, shelf: dict | None = None) -> None:
    cur = buffers.get(name)
    key = lambda t: (name, tuple(t.shape), t.dtype, t.device)  # noqa: E731
    if cur is not None and key(cur) != key(value) and shelf is not None:
        shelf[key(cur)] = cur  # still referenced: a captured graph may write it
        cur = shelf.pop(key(value), None)
        if cur is not None:
            buffers[name] = cur
    if cur is not None and key(cur) == key(value):
        if cur.data_ptr() != value.data_ptr():
            cur.copy_(value)
    else:
        # A new buffer owns its memory (a view of another buffer or a graph's output would alias).
        buffers[name] = value.clone(memory_format=torch.contiguous_format)


# -- what a family gives the runtime ------------------------------------------------------------


@dataclass
class LoadedModel:
    """A family's model, loaded: eager step graphs by name, the plan, and what speed work needs.

    `graphs[name](*args)` takes the call inputs in `plan.graphs[name].args` order and returns a
    tensor or a tuple in `outs` order. `examples(name)` gives example call inputs for tracing
    (fd-build). `weights` is the module whose state dict is the model's identity (hashing).
    `flops(block)` counts the matmul FLOPs of one block (fd-bench). `decoder` is the
    streaming decoder object (a `.name` and its weights' module), the name of a family's own
    pixel output (the arena's "pixels": no decoder weights), or None (latents only).
    """

    plan: BlockPlan
    graphs: dict[str, nn.Module]
    weights: nn.Module
    decoder: Any = None
    examples: Callable[[str], tuple[torch.Tensor, ...]] | None = None
    flops: Callable[[int], float] | None = None
    eager_hints: Callable[[str, int], dict] | None = None  # extra kwargs for an eager call (host-side fill level)
    # Context-parallel hooks (flashdreams.parallel): how the family's attention and tokens are
    # sharded across ranks; None when the family does not support it.
    parallel: Any = None
    source: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    describe: dict[str, Any] = field(default_factory=dict)


def numel(shape) -> int:
    return math.prod(shape)


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model: the options fd-run, fd-build and fd-bench share (one declaration)."""

    source: str | None = None  # checkpoint file / directory; None: built-in or random weights
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    attention: str = "sdpa"
    precision: str = "bf16"
    # With precision "fp8": a regex over the linears' names that stay in the model's dtype (None: the model's own
    # choice, "": none), e.g. r"\.cam_" keeps LingBot's camera layers in bf16.
    fp8_keep: str | None = None
    height: int | None = None
    width: int | None = None
    batch: int = 1
    random_weights: bool = False
    weights_seed: int = 0
    decoder: str | None = "preset"
    decoder_weights: str | None = None


def weights_source(opts: LoadOptions, weights, preset) -> str:
    """What `LoadedModel.source` says: the checkpoint path, a state dict given in memory, or the preset's
    built-in / seeded random weights."""
    if opts.source is not None:
        return str(opts.source)
    if weights is not None:
        return "<state dict>"
    return ("builtin:" if preset.builtin else "random:") + preset.name


def ring_length_hints(ring, use: bool, graphs: tuple[str, ...] = ("dit",)):
    """`LoadedModel.eager_hints` for torch attention over a KV ring: the ring's fill level at each block,
    known on the host, so eager SDPA attends only the valid prefix (our kernels read it on the device)."""

    def hints(graph: str, block: int) -> dict:
        return {"valid_len_host": ring.valid_tokens(block)} if use and graph in graphs else {}

    return hints


class Family:
    """Base class of a registry entry: presets, and loading a preset into a `LoadedModel`."""

    name = "?"
    description = ""

    def presets(self) -> list:
        """The family's presets; each has `name`, `family`, `description`, `builtin`, `to_dict()`."""
        raise NotImplementedError

    def preset_from_dict(self, d: Mapping):
        """The inverse of a preset's `to_dict` (engine manifests store presets that way)."""
        raise NotImplementedError

    def load(self, preset, opts: LoadOptions) -> LoadedModel:
        raise NotImplementedError

    def input_specs(self, preset, opts: LoadOptions) -> dict[str, InputSpec] | None:
        """The inputs a session of `preset` at opts' size takes, known without loading a weight (a host checks
        a control script against them before a multi-GB load), or None where the family learns them only at
        load. Equal to the loaded plan's `inputs`."""
        return None
