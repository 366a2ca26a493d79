"""A live session: all state of one rollout on the device, and the loop that runs the block plan.

The session knows no model. Its engine's `BlockPlan` (flashdreams.models.family) names the
state buffers, the static input buffers, the constants and the random draws of a block, and
the block program: which graph runs on which buffers, the sampler's updates, when the frames
leave, when the cache is committed. The session allocates those buffers once (their
addresses never change, so captured CUDA graphs stay valid), validates every input against
its spec before copying it into its buffer, and runs each block's program: eagerly, or on
CUDA as captured graphs after one eager warm-up of each block kind. Nothing reads a device
value back inside a block.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from flashdreams.errors import InvalidArgumentError, OutOfMemoryError, SessionFailedError
from flashdreams.models.family import BlockPlan, InputSpec, op_writes, run_ops
from flashdreams.models.input_rules import check_rules
from flashdreams.snapshot import Snapshot, check_fits, model_identity, put_state, take_state

if TYPE_CHECKING:
    from flashdreams.engine import Engine

log = logging.getLogger(__name__)

# probe(block, call_index, graph, args, outs): sees every graph call of a block, for parity
# debugging. Its tensors are live buffers: copy what you keep.
Probe = Callable[[int, int, str, dict, tuple], None]

_SEED_MIX = 0x9E3779B97F4A7C15


# A state buffer of this name (int64 [B]) holds each row's block index; the runtime writes it
# before every block (see BlockPlan's docstring, "row-independent plans").
BLOCK_INDEX = "block_index"


def block_seed(seed: int, block: int) -> int:
    """The generator seed of block `block`: a retried or replayed block draws the same noise."""
    return (seed * 1_000_003 + block * _SEED_MIX + 1) % (2**63 - 1)


class _Marks:
    """Stage boundaries of one block: CUDA events on a GPU (no sync until read), clock reads on a CPU."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.cuda = device.type == "cuda"
        self.enabled = enabled
        self.points: list[tuple[str, object]] = []
        if enabled:
            self._add("start", True)

    def _add(self, name: str, timing: bool):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=timing)
            ev.record()
        else:
            ev = time.perf_counter()
        self.points.append((name, ev))
        return ev if self.cuda else None

    def mark(self, name: str, always: bool = False):
        """Record a boundary; returns the CUDA event (for `frames_ready`) when there is one."""
        if self.enabled or (always and self.cuda):
            return self._add(name, self.enabled)
        return None

    def stage_ms(self) -> dict[str, float]:
        """Milliseconds of each stage since the previous mark (syncs on the last event)."""
        if not self.points:
            return {}
        if self.cuda:
            self.points[-1][1].synchronize()
            delta = lambda a, b: a.elapsed_time(b)  # noqa: E731
        else:
            delta = lambda a, b: (b - a) * 1e3  # noqa: E731
        return {name: delta(prev[1], cur) for prev, (name, cur) in zip(self.points, self.points[1:])}


@dataclass
class StepResult:
    """What one block produced. Tensors live on the session's device.

    `latents` and `frames` are the block's own copies. `frames_buffer` is the session's output
    buffer the frames were written to before the commit ran; it is valid until the next step,
    and `frames_ready` (CUDA) is recorded right after it was written, so a host can copy the
    frames out while the commit still runs (`frames_cpu` does).
    """

    block: int
    latents: torch.Tensor  # [B, C, nf, h, w] float32: the block's final x0
    frames: torch.Tensor | None  # uint8 [B, T, H, W, 3], or None without a decoder
    frames_ready: torch.cuda.Event | None = None
    marks: _Marks | None = None  # stage boundaries when the session's `timing` is on
    frames_buffer: torch.Tensor | None = None
    _session: Session | None = None

    def stage_ms(self) -> dict[str, float]:
        """{'denoise', 'decode', 'commit'}: milliseconds of each stage (needs `session.timing = True`)."""
        if self.marks is None:
            raise InvalidArgumentError("stage times need session.timing = True before the step")
        return self.marks.stage_ms()

    def frames_cpu(self) -> torch.Tensor:
        """The frames on the host; on CUDA waits only for the decode, not for the commit after it."""
        if self.frames is None:
            raise InvalidArgumentError("this session has no decoder, so the step produced no frames")
        current = self._session is not None and self._session.block == self.block + 1
        if self.frames_ready is None or self.frames_buffer is None or not current:
            return to_host(self.frames)
        stream = self._session._side_stream()
        stream.wait_event(self.frames_ready)
        with torch.cuda.stream(stream):
            return to_host(self.frames_buffer)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of `t`, waited for. From CUDA it lands in page-locked memory (torch's cached pinned
    blocks, so no allocation per call) on the current stream: a 3 MB batch of frames copied into
    fresh pageable memory took 0.76 ms of a 64-world arena step on the H200, several times the
    pinned transfer. The copy is the caller's to keep; a CPU tensor comes back as it is."""
    if t.device.type != "cuda":
        return t.cpu()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    torch.cuda.current_stream(t.device).synchronize()
    return out


@dataclass
class _Captured:
    """One block kind captured as CUDA graphs, one per stage, with the stage names."""

    graphs: list[torch.cuda.CUDAGraph]
    names: list[str]
    emit_stage: int


def _split_stages(ops: list[dict]) -> list[tuple[str, list[dict]]]:
    """The program cut at its `mark` ops: [(stage name, ops)], the mark closing each stage."""
    stages, cur = [], []
    for op in ops:
        if op["op"] == "mark":
            stages.append((op["name"], cur))
            cur = []
        else:
            cur.append(op)
    if cur:
        stages.append(("end", cur))
    return stages


class Session:
    """One rollout. Create it with `engine.session(...)`; call `step()` once per block."""

    def __init__(
        self,
        engine: Engine,
        inputs: dict[str, torch.Tensor] | None = None,
        seed: int = 0,
        cuda_graphs: bool | None = None,
        *,
        _plan: BlockPlan | None = None,
        _buffers: dict[str, torch.Tensor] | None = None,
    ) -> None:
        # `_plan`/`_buffers`: a session over buffers someone else owns (flashdreams.batched runs
        # one per batch bucket over a prefix of the worlds' rows).
        self.engine = engine
        self.plan = plan = _plan or engine.plan
        self.backend = engine.backend
        self.device = self.backend.device
        self.batch = plan.batch
        self.seed = _check_seed(seed)
        self.buffers: dict[str, torch.Tensor] = {} if _buffers is None else dict(_buffers)
        if _buffers is None:
            for group in (plan.state, plan.constants, plan.draws):
                for name, decl in group.items():
                    self.buffers[name] = decl.allocate(self.device)
            for name, spec in plan.inputs.items():
                self.buffers[name] = torch.zeros(spec.shape, dtype=spec.torch_dtype(), device=self.device)
        self._given: set[str] = set()
        self.generator = torch.Generator(device=self.device)
        self.block = 0
        self.probe: Probe | None = None
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and self.device.type != "cuda":
            raise InvalidArgumentError("cuda_graphs=True needs a CUDA device; this session runs on " + str(self.device))
        self._captured: dict[str, _Captured] = {}
        self._warm: set[str] = set()
        self._pool = None
        self._stream = None
        self._outputs: dict[tuple, torch.Tensor] = {}
        self._shelf: dict = {}  # buffers of other shapes (run_ops): kept alive for captured graphs
        self._emitted: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.timing = False  # record stage boundaries (events) for fd-bench
        self.capture_s = 0.0  # wall seconds spent capturing graphs
        self._failed: str | None = None  # why the session refuses calls until reset()
        self._replaying = False
        self._rollback = [n for n, d in plan.state.items() if d.rollback]
        self.recording = None  # a flashdreams.recording.Recording while one is made
        for name, value in (inputs or {}).items():
            self.set_input(name, value)
        if _buffers is None:
            self._check_required(self._given)

    def _check_required(self, given) -> None:
        """Refuse a session without every required input (`given`: the names it has)."""
        missing = [n for n, s in self.plan.inputs.items() if s.required and n not in given]
        if missing:
            raise InvalidArgumentError(
                f"engine '{self.engine.source}': a session needs the inputs {missing}; "
                + "; ".join(self.plan.inputs[n].describe() for n in missing)
            )

    @property
    def failed(self) -> str | None:
        """Why the session refuses calls until reset() (a failure inside a replayed graph), or None."""
        return self._failed

    # -- inputs ------------------------------------------------------------------
    def input_specs(self) -> list[InputSpec]:
        """The named inputs this session takes (shape, dtype, units, range, meaning)."""
        return list(self.plan.inputs.values())

    def input_names(self) -> list[str]:
        return list(self.plan.inputs)

    def check_input(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """`value` validated against the input's spec, widened, padded and on the device; nothing is written."""
        spec = self.plan.inputs.get(name)
        if spec is None:
            raise InvalidArgumentError(
                f"session input '{name}' is unknown for {self.engine.preset_name}; inputs: {self.input_names()}"
            )
        if not isinstance(value, torch.Tensor):
            raise InvalidArgumentError(f"input '{name}' must be a tensor, got {type(value).__name__}")
        if value.is_meta or value.device.type not in ("cpu", "cuda"):
            raise InvalidArgumentError(f"input '{name}' is on device '{value.device}'; pass it on the CPU or CUDA")
        x = value
        while x.dim() < len(spec.shape) and x.dim() >= 1:
            x = x.unsqueeze(0)
        if x.dim() != len(spec.shape):
            raise InvalidArgumentError(f"input '{name}' must have shape {list(spec.shape)}; got {list(value.shape)}")
        if x.shape[0] != spec.shape[0]:
            raise InvalidArgumentError(
                f"input '{name}': batch {x.shape[0]} differs from the session's batch {spec.shape[0]}"
            )
        want_float = spec.torch_dtype().is_floating_point
        if want_float and x.dtype == torch.uint8 and spec.units == "image":
            x = x.float()  # frames as they come from a camera or a decoder: pixel values, widened
        if want_float and not torch.is_floating_point(x):
            raise InvalidArgumentError(f"input '{name}' must be floating point ({spec.dtype}); got {x.dtype}")
        for d, (have, want) in enumerate(zip(x.shape, spec.shape)):
            if have == want or (d == spec.pad_dim and 0 < have < want):
                continue
            if d == spec.pad_dim and have > want:
                raise InvalidArgumentError(
                    f"input '{name}' has {have} rows along dim {d}; this model takes at most {want}"
                )
            raise InvalidArgumentError(f"input '{name}' must have shape {list(spec.shape)}; got {list(value.shape)}")
        if want_float:
            bad = ~torch.isfinite(x)
            if bool(bad.any()):  # checked on the host-side value before anything is written
                raise InvalidArgumentError(
                    f"input '{name}' holds {int(bad.sum())} non-finite values (NaN or inf); nothing was changed"
                )
        if spec.low is not None and bool((x < spec.low).any()) or spec.high is not None and bool((x > spec.high).any()):
            raise InvalidArgumentError(
                f"input '{name}' has values outside [{spec.low}, {spec.high}] ({spec.units or 'no units'})"
            )
        if spec.rules:
            check_rules(spec.rules, x, f"input '{name}'")
        x = x.to(self.device, spec.torch_dtype())
        if spec.pad_dim is not None and x.shape[spec.pad_dim] < spec.shape[spec.pad_dim]:
            pad = list(x.shape)
            pad[spec.pad_dim] = spec.shape[spec.pad_dim] - x.shape[spec.pad_dim]
            x = torch.cat([x, x.new_zeros(pad)], dim=spec.pad_dim)
        return x

    @torch.no_grad()
    def set_input(self, name: str, value: torch.Tensor) -> None:
        """Set a named input; it is checked whole before anything is written. Takes effect at the next block
        (inputs marked `when="reset"`, such as a start image, at the next reset).

        All or nothing: if the input's program (e.g. the prompt's cross-attention cache) fails, the
        input and every buffer the program writes are restored."""
        self._check_alive()
        x = self.check_input(name, value)
        spec = self.plan.inputs[name]
        touched = [name] + [n for op in spec.program for n in op_writes(op) if n in self.plan.state]
        saved = {n: self.buffers[n].clone() for n in touched}
        try:
            self.buffers[name].copy_(x)
            if spec.program:
                run_ops(list(spec.program), self.buffers, self._call, self.plan.graphs)
        except BaseException as exc:
            for n, t in saved.items():
                self.buffers[n].copy_(t)
            mapped = _mapped(exc, f"set_input('{name}')")
            if mapped is exc:
                raise
            raise mapped from exc
        self._given.add(name)
        if self.recording is not None:
            self.recording.input(name, x)

    def set_prompt(self, prompt_embeds: torch.Tensor) -> None:
        """Switch the prompt between blocks: the cross-attention cache is rewritten in place."""
        self.set_input("prompt_embeds", prompt_embeds)

    def reset(self, seed: int | None = None, **inputs: torch.Tensor) -> None:
        """Back to block 0 (same buffers, so captured graphs stay valid); optionally a new seed and inputs."""
        new_seed = self.seed if seed is None else _check_seed(seed)
        checked = {n: self.check_input(n, v) for n, v in inputs.items()}
        self._failed = None  # reset is the way out of a failed state
        for name, x in checked.items():
            self.set_input(name, x)
        self.seed = new_seed
        for name, decl in self.plan.state.items():
            self.buffers[name].fill_(decl.fill)
        for name, spec in self.plan.inputs.items():
            if spec.program and name in self._given:  # state derived from inputs is rebuilt
                run_ops(list(spec.program), self.buffers, self._call, self.plan.graphs)
        self.block = 0
        self._failed = None
        if self.recording is not None:
            self.recording.reset(new_seed)

    def renew(self, seed: int = 0, inputs: dict[str, torch.Tensor] | None = None) -> None:
        """Become the session `engine.session(seed=seed, inputs=inputs)` would make, on these buffers:
        every input this session was given is dropped (back to zeros, its derived state with it), the
        new ones are set, and the rollout starts at block 0. The CUDA graphs it captured stay valid, so
        its first blocks replay them at steady speed where a new session runs eagerly and captures
        (fd-serve hands a closed player's session to the next one this way). Every input is checked
        before anything changes; a recording or probe attached to it is dropped."""
        given = self.engine.session_inputs(inputs)
        seed = _check_seed(seed)
        checked = {n: self.check_input(n, v) for n, v in given.items()}
        self._check_required(checked)
        self.recording, self.probe, self.timing = None, None, False
        self._failed = None
        for name in self.plan.inputs:
            self.buffers[name].zero_()
        self._given.clear()
        try:
            for name, x in checked.items():
                self.set_input(name, x)
        except BaseException as exc:
            self._failed = f"renew() failed setting its inputs: {exc}"  # half its inputs set: refuse until reset
            raise
        self.reset(seed=seed)

    # -- snapshots -------------------------------------------------------------------
    def _snapshot_targets(self) -> dict[str, torch.Tensor]:
        """The buffers a snapshot holds: per-row state and the inputs (flashdreams.snapshot)."""
        names = [n for n, d in self.plan.state.items() if d.batch_dim is not None] + list(self.plan.inputs)
        return {n: self.buffers[n] for n in names}

    @property
    def snapshot_nbytes(self) -> int:
        """The bytes `snapshot()` copies (the KV ring dominates)."""
        return sum(b.numel() * b.element_size() for b in self._snapshot_targets().values())

    @torch.no_grad()
    def snapshot(
        self, device: torch.device | str | None = None, *, pinned: bool = False, into: Snapshot | None = None
    ) -> Snapshot:
        """This session's state after `self.block` blocks: `restore()` it to go back to this point, here or in
        another session of the same preset (and dtype). `device="cpu"` keeps the copy in host memory
        (`Snapshot.nbytes` says how large it is: the KV ring dominates); `pinned=True` makes that memory
        page-locked (copies at the link's speed; the allocation costs once), and `into=snap` overwrites an
        earlier snapshot's memory instead of allocating (returned updated; checked first)."""
        self._check_alive()
        tensors = take_state(self._snapshot_targets(), self.engine, self.device, device, into, pinned)
        given, ident = tuple(sorted(self._given)), model_identity(self.engine)
        snap = Snapshot(ident, self.block, self.seed, given, tensors, str(self.engine.source), self.batch)
        return snap if into is None else into.assign(snap)

    @torch.no_grad()
    def restore(self, snapshot: Snapshot) -> None:
        """Back to `snapshot`: its block index, seed, inputs and state; the next step continues as the
        snapshotted session did. Checked whole first (same preset and dtype, same tensors and shapes;
        EngineIncompatibleError otherwise), so a refused restore changes nothing. Like `reset()`, it is
        a way out of a failed session. Refused while recording (a replay could not reproduce the jump):
        `stop_recording()` first."""
        if self.recording is not None:
            raise InvalidArgumentError(
                "restore() while recording: a replay of the recording could not reproduce the jump; "
                "save_recording() if you want it, then stop_recording()"
            )
        targets = self._snapshot_targets()
        check_fits(snapshot, self.engine, targets, "restore")
        put_state(snapshot, targets)
        self.block, self.seed, self._given = snapshot.block, snapshot.seed, set(snapshot.given)
        self._failed = None

    # -- the loop ------------------------------------------------------------------
    def _call(self, graph: str, args: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return self.backend.call(graph, args, self.block)

    def _fill_block_values(self) -> int | None:
        ring = self.plan.ring
        if ring is None:
            return None
        values = ring.values(self.block)
        host = torch.tensor([v for name in values for v in values[name]], dtype=torch.int64)
        i = 0
        for name, vals in values.items():
            self.buffers[name].copy_(host[i : i + len(vals)], non_blocking=True)
            i += len(vals)
        return values[ring.valid_len][0]

    def _fill_block_index(self) -> None:
        if BLOCK_INDEX in self.buffers:  # row-independent plans read each row's block index on the device
            self.buffers[BLOCK_INDEX].fill_(self.block)

    def _check_draws(self, draws: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """Given draws checked whole (names, shapes, finite floats) before anything is written."""
        if draws is not None and not isinstance(draws, dict):
            raise InvalidArgumentError(f"step: draws must be a dict {{name: tensor}}, got {type(draws).__name__}")
        given = dict(draws or {})
        unknown = sorted(set(given) - set(self.plan.draws))
        if unknown:
            raise InvalidArgumentError(f"step: unknown draws {unknown}; this model draws {sorted(self.plan.draws)}")
        for name, t in given.items():
            want = self.plan.draws[name].shape
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
                got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise InvalidArgumentError(f"step: draw '{name}' must have shape {list(want)}, got {got}")
            if not torch.is_floating_point(t) or not bool(torch.isfinite(t).all()):
                raise InvalidArgumentError(f"step: draw '{name}' must hold finite floating-point values")
        return given

    def _draw(self, given: dict[str, torch.Tensor]) -> None:
        """Fill the draw buffers: given tensors (parity, replay) or the generator seeded by (seed, block)."""
        self.generator.manual_seed(block_seed(self.seed, self.block))
        for name in sorted(self.plan.draws):  # a canonical order: a manifest may list them in another
            buf = self.buffers[name]
            if name in given:
                buf.copy_(given[name])
            elif self.block == 0 or not self.plan.draws[name].first_block_only:
                torch.randn(buf.shape, generator=self.generator, device=self.device, out=buf)

    @torch.no_grad()
    def step(self, draws: dict[str, torch.Tensor] | None = None) -> StepResult:
        """Generate the next block. `draws` ({name: tensor}) replace the session's own random draws
        (parity with stored draws); by default they come from a generator seeded by (seed, block)."""
        self._check_alive()
        given = self._check_draws(draws)
        snapshot = {n: self.buffers[n].clone() for n in self._rollback}
        try:
            result = self._run_block(given)
        except BaseException as exc:
            if self._replaying:
                # Work inside a replayed graph cannot be undone or even located: refuse until reset().
                self._failed = f"{type(exc).__name__}: {exc}"
            for n, t in snapshot.items():
                self.buffers[n].copy_(t)
            mapped = _mapped(exc, f"step (block {self.block})")
            if mapped is exc:
                raise
            raise mapped from exc
        self.block += 1
        if self.recording is not None:
            self.recording.step(given)
        return result

    def _key(self, block: int) -> str:
        """What a captured graph set is kept under: the block's kind, and with a backend whose graphs
        take the host-known fill level (torch attention slicing the ring) that level too."""
        kind = self.plan.kind_of(block)
        if not self.backend.shape_specialized:
            return kind
        ring = self.plan.ring
        return f"{kind}@{None if ring is None else ring.values(block)[ring.valid_len][0]}"

    def warm_up(self, max_blocks: int = 64) -> float:
        """Run the blocks a rollout meets before its first repeated kind, eagerly and then (with CUDA
        graphs) once more to capture them, resetting after each pass; returns the seconds it took.

        Afterwards the session is where a new one starts (block 0, the same seed and inputs; its rollout
        is the same as a fresh session's) but its first blocks replay captured graphs at steady speed
        instead of running eagerly and capturing on the way. Call it before the first step or right
        after `reset()`; nothing is recorded. `max_blocks` bounds the blocks of one pass. It returns
        once the device has finished the work, so the next step starts on an idle GPU.
        """
        if self.block != 0:
            raise InvalidArgumentError(
                f"warm_up() runs before the first step or right after reset(); this session is at block {self.block}"
            )
        self._check_alive()
        t0 = time.perf_counter()
        seen: set[str] = set()
        n = 0
        while n < max_blocks and self._key(n) not in seen:
            seen.add(self._key(n))
            n += 1
        recording, self.recording = self.recording, None
        try:
            for _ in range(2 if self.cuda_graphs else 1):
                for _ in range(n):
                    self.step()
                self.reset()
        except BaseException:
            self.reset()  # a failed warm-up leaves a session at block 0 all the same
            raise
        finally:
            self.recording = recording
        if self.device.type == "cuda":
            # Replays only enqueue: without this the last pass's final block is still running when
            # warm_up returns, so its time is not in the figure returned and lands on the caller's
            # block 0 instead (next117: block 0 at 308 ms after a warm-up, 162 ms steady).
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def _run_block(self, given: dict[str, torch.Tensor]) -> StepResult:
        plan = self.plan
        kind = plan.kind_of(self.block)
        self._replaying = False
        self._fill_block_values()
        self._fill_block_index()
        self._draw(given)
        key = self._key(self.block)
        captured = None
        if self.cuda_graphs and self.probe is None:
            captured = self._captured.get(key)
            if captured is None and key in self._warm:
                self._replaying = True  # a failed capture leaves the stream's state unknown
                captured = self._captured[key] = self._capture(plan.programs[kind])
        marks = _Marks(self.device, self.timing)
        ready = None
        self._emitted = None
        if captured is not None:
            self._replaying = True
            for i, (g, name) in enumerate(zip(captured.graphs, captured.names)):
                g.replay()
                ev = marks.mark(name, always=i == captured.emit_stage)
                if i == captured.emit_stage:
                    ready = ev
            lat, frames = self._outputs[("latents", kind)], self._outputs.get(("frames", kind))
        else:
            calls = [0]

            def call(graph, args):
                outs = self._call(graph, args)
                if self.probe is not None:
                    self.probe(self.block, calls[0], graph, args, outs)
                calls[0] += 1
                return outs

            for name, ops in _split_stages(plan.programs[kind]):
                already = self._emitted is not None
                run_ops(
                    ops,
                    self.buffers,
                    call,
                    plan.graphs,
                    on_emit=lambda lat, fr: self._emit(kind, lat, fr),
                    shelf=self._shelf,
                )
                emit_stage = self._emitted is not None and not already
                ev = marks.mark(name, always=emit_stage)
                if emit_stage:
                    ready = ev
            self._warm.add(key)
            lat, frames = self._emitted if self._emitted else (None, None)
        if lat is None:
            raise InvalidArgumentError(f"block program '{kind}' emitted no latents")
        result = StepResult(
            self.block,
            lat.clone(),
            frames.clone() if frames is not None else None,
            ready,
            marks if self.timing else None,
            frames,
            self,
        )
        return result

    def _check_alive(self) -> None:
        if self._failed is not None:
            raise SessionFailedError(
                f"this session failed inside a replayed CUDA graph ({self._failed}); its state is unknown: "
                "call reset() to start it again"
            )

    def start_recording(self):
        """Record the seed and every named input from here on, for a bit-exact replay in another process
        (`flashdreams.recording`); starts at block 0, so a running session is reset first."""
        from flashdreams.recording import Recording

        if self.block != 0:
            self.reset()
        self.recording = Recording.begin(self)
        return self.recording

    def stop_recording(self):
        """Stop recording; returns the recording (None if there was none)."""
        recording, self.recording = self.recording, None
        return recording

    def save_recording(self, path) -> None:
        """Write the recording (one safetensors file: the inputs, the event log in its metadata)."""
        if self.recording is None:
            raise InvalidArgumentError("this session is not recording: call start_recording() first")
        self.recording.save(path)

    def _emit(self, kind: str, latents: torch.Tensor, frames: torch.Tensor | None) -> None:
        """Copy the block's results into persistent output buffers (inside the captured decode stage)."""
        lat = self._output(("latents", kind), latents)
        fr = self._output(("frames", kind), frames) if frames is not None else None
        self._emitted = (lat, fr)

    def _output(self, key: tuple, value: torch.Tensor) -> torch.Tensor:
        buf = self._outputs.get(key)
        if buf is None or buf.shape != value.shape:
            buf = self._outputs[key] = torch.empty_like(value)
        buf.copy_(value)
        return buf

    def _side_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    # -- CUDA graphs -----------------------------------------------------------------
    def _capture(self, ops: list[dict]) -> _Captured:
        """Capture this block kind as one CUDA graph per stage (split at the program's marks).

        Capture records work without running it; `step` replays right after. Every tensor the
        graphs touch is a session buffer whose address never changes. The stage that emits the
        frames ends before the commit's stage, so the frames can leave before the commit runs.
        """
        t0 = time.perf_counter()
        torch.cuda.synchronize(self.device)
        graphs, names, emit_stage = [], [], -1
        kind = self.plan.kind_of(self.block)
        for i, (name, stage_ops) in enumerate(_split_stages(ops)):
            g = torch.cuda.CUDAGraph()
            self._emitted = None
            # No cyclic garbage collection inside a capture: a collection there can free objects that
            # own CUDA resources (events, pinned host blocks), and such calls invalidate a global-mode
            # capture. The arena's 32-world bucket failed to capture now and then on the H200
            # (next12/next13-h200: CUBLAS_STATUS_* at whichever GEMM ran next); with the collector
            # off it has not since (a probe and every scan after; the cause is not pinned down:
            # bench/results/NOTES.md). torch.cuda.graph collects once on entry, before capturing.
            collecting = gc.isenabled()
            gc.disable()
            try:
                with torch.cuda.graph(g, pool=self._pool):
                    run_ops(
                        stage_ops,
                        self.buffers,
                        self._call,
                        self.plan.graphs,
                        on_emit=lambda la, fr: self._emit(kind, la, fr),
                        shelf=self._shelf,
                    )
            finally:
                if collecting:
                    gc.enable()
            if self._pool is None:
                self._pool = g.pool()
            if self._emitted is not None:
                emit_stage = i
            graphs.append(g)
            names.append(name)
        self.capture_s += time.perf_counter() - t0
        log.info("captured block kind '%s' at block %d (%d graphs)", kind, self.block, len(graphs))
        return _Captured(graphs, names, emit_stage)

    def frames(self, num_blocks: int | None = None) -> Iterator[torch.Tensor]:
        """Iterate over blocks' frames (uint8 [T, H, W, 3] on the host, batch 0), for embedding in an app."""
        n = 0
        while num_blocks is None or n < num_blocks:
            yield self.step().frames_cpu()[0]
            n += 1


def _mapped(exc: BaseException, where: str) -> BaseException:
    """A device out-of-memory becomes our named error (the step was undone); anything else as it is."""
    if isinstance(exc, torch.OutOfMemoryError):
        return OutOfMemoryError(
            f"{where}: the device ran out of memory ({exc}); the session is unchanged. Free memory, or use "
            "a smaller batch or resolution"
        )
    return exc


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidArgumentError(f"seed must be an integer, got {type(seed).__name__} {seed!r}")
    if not 0 <= seed < 2**63:
        raise InvalidArgumentError(f"seed must be in [0, 2**63), got {seed}")
    return seed
