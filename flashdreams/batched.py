"""Many worlds of one model, stepped together: one forward pass per block for all of them.

`engine.worlds(n)` returns a `Worlds`: n independent sessions of one model that live in the rows
of one set of buffers. Each world keeps its own seed, inputs, KV ring, decoder state and block
index, and one world can be reset, replaced, added or removed while the others go on. For a
row-independent model (see `BlockPlan`'s docstring) worlds at different block indices share a
batch, because every graph reads each row's block index from the `block_index` buffer on the
device; other models run in lockstep groups (the last paragraph).

Batch buckets. The buffers are allocated once for `capacity` rows. A step runs over the
smallest bucket (1, 2, 4, ... up to the capacity) that holds the live worlds: a prefix view of
every buffer, with its own `Session` over those views, so on CUDA each bucket is captured as
CUDA graphs once and replayed (the views never move). Rows past the live worlds in a bucket are
computed and thrown away.

Isolation. Inputs are checked per world before anything is written, so a bad input (NaN, wrong
shape) is refused for that world alone. After a step, a world whose latents are not finite is
reported in `WorldsStep.failed` and reset by itself; rows never mix, so the other worlds' frames
are the same bit for bit as if nothing had happened.

Noise. World i's draws at its block b come from a generator seeded by (seed_i, b), the same
rule as a lone session, so a world stepped in a batch equals the same world stepped alone.

Plans that are not row-independent (every streaming Wan-style model: its RoPE positions, ring
slots and valid length are one table for the whole batch) run their worlds in lockstep groups:
a step runs one batch per distinct block index among the worlds (the engine's batch, loaded
with `batch=N`), holding the other rows as a paused world is held. Worlds that stay in step
(reset together, as a policy evaluation does) cost one batch per step; a world reset on its
own costs one more batch per step until the others are reset too. A block kind whose blocks
are shorter (block 0 of a Wan VAE decode: 9 frames, then 12) is padded at the front with its
first frame when it shares a step with longer ones; `WorldsStep.padded` says by how many.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.family import BlockPlan, InputSpec, run_ops
from flashdreams.session import BLOCK_INDEX, Session, _check_seed, block_seed, to_host
from flashdreams.snapshot import Snapshot, check_fits, model_identity, put_state, take_state

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket_for(n: int, capacity: int) -> int:
    """The smallest bucket that holds n worlds (the capacity itself if no listed bucket fits)."""
    return next((b for b in BUCKETS if n <= b <= capacity), capacity)


@dataclass
class WorldsStep:
    """One block of every live world, in `ids` order (row r belongs to world ids[r])."""

    ids: list[int]
    blocks: list[int]  # each world's block index in this step
    latents: torch.Tensor  # [n, ...] on the device
    frames: torch.Tensor | None  # uint8 [n, T, H, W, 3] on the device, or None without a decoder
    failed: dict[int, str] = field(default_factory=dict)  # world id -> why; those worlds were reset
    frames_ready: torch.cuda.Event | None = None
    # Per world, how many leading frames (and latent frames) of the padded block are padding: None
    # when every world's block had the same length (always, for row-independent plans).
    padded: list[tuple[int, int]] | None = None

    def frames_cpu(self) -> torch.Tensor:
        if self.frames is None:
            raise InvalidArgumentError("this model has no decoder, so the step produced no frames")
        return to_host(self.frames)  # stream-ordered after the step that wrote them


class _BucketSession(Session):
    """A session over the first `bucket` rows of the worlds' buffers; the owner fills block indices and draws."""

    def __init__(self, owner: Worlds, plan: BlockPlan, views: dict[str, torch.Tensor], cuda_graphs: bool) -> None:
        super().__init__(owner.engine, None, 0, cuda_graphs, _plan=plan, _buffers=views)
        self.owner = owner

    def _fill_block_index(self) -> None:  # written per row by the owner before the step
        pass

    def _draw(self, given: dict[str, torch.Tensor]) -> None:
        self.owner._draw_rows(self.buffers, self.batch)


class Worlds:
    """n independent worlds of one model, stepped in one batch (in lockstep groups for a model that is
    not row-independent). See the module docstring."""

    def __init__(
        self,
        engine,
        n: int,
        seeds: Sequence[int] | None = None,
        inputs: Mapping[str, torch.Tensor] | None = None,
        capacity: int | None = None,
        cuda_graphs: bool | None = None,
        check_finite: bool = True,
    ) -> None:
        plan = engine.plan
        lockstep = not plan.row_independent
        if lockstep:
            _check_rows(engine.preset_name, plan)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0 or (n == 0 and not capacity):
            raise InvalidArgumentError(f"worlds: n must be an integer >= 1 (or 0 with a capacity), got {n!r}")
        seeds = list(range(n)) if seeds is None else [_check_seed(s) for s in seeds]
        if len(seeds) != n:
            raise InvalidArgumentError(f"worlds: {len(seeds)} seeds for {n} worlds")
        static = getattr(engine.backend, "name", "eager") != "eager"
        if static or lockstep:  # compiled graphs, and plans that are not row-independent, have one batch
            capacity = capacity or plan.batch
            if capacity != plan.batch or n > plan.batch:
                what = "this built engine" if static else f"this {engine.preset_name} engine (not row-independent)"
                how = "rebuild it with fd-build --batch N" if static else "load it with flashdreams.load(..., batch=N)"
                raise InvalidArgumentError(
                    f"{what} runs batch {plan.batch} only: ask for at most {plan.batch} worlds, or {how} "
                    f"(N = {max(n, capacity)})"
                )
        else:
            capacity = capacity or bucket_for(max(n, 1), 1 << 30)
        if capacity < n:
            raise InvalidArgumentError(f"worlds: capacity {capacity} is smaller than n = {n}")
        self.engine = engine
        self.device = engine.device
        self.capacity = capacity
        self.check_finite = check_finite
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        self._static = static or lockstep  # one bucket: the full batch
        self.lockstep = lockstep
        self.plan = plan if plan.batch == capacity else plan.with_batch(capacity)
        self.buffers: dict[str, torch.Tensor] = {}
        for group in (self.plan.state, self.plan.constants, self.plan.draws):
            for name, decl in group.items():
                self.buffers[name] = decl.allocate(self.device)
        for name, spec in self.plan.inputs.items():
            self.buffers[name] = torch.zeros(spec.shape, dtype=spec.torch_dtype(), device=self.device)
        if BLOCK_INDEX not in self.buffers and not lockstep:
            raise InvalidArgumentError(f"{engine.preset_name}: a row-independent plan needs a '{BLOCK_INDEX}' buffer")
        self._sessions: dict[int, _BucketSession] = {}
        # Checks one world's inputs against the batch-1 specs; it never steps.
        if lockstep:  # a batch-1 plan over row 0's inputs, for the checks only
            one = dataclasses.replace(self.plan, batch=1, inputs={k: _one_row(v) for k, v in self.plan.inputs.items()})
        else:
            one = self.plan.with_batch(1)
        self._checker = _BucketSession(self, one, {k: self._view(k, b, 1) for k, b in self.buffers.items()}, False)
        self._generator = torch.Generator(device=self.device)
        self.ids: list[int] = []  # row -> world id
        self.seeds: list[int] = []
        self.blocks: list[int] = []
        self._next_id = 0
        self.episodes: dict[int, int] = {}
        for i in range(n):
            self.add(seeds[i], inputs=_row(inputs, i, n) if inputs else None)

    # -- worlds --------------------------------------------------------------------
    @property
    def n(self) -> int:
        return len(self.ids)

    def input_specs(self) -> list[InputSpec]:
        """The named inputs of one world (batch 1)."""
        return list(self._checker.plan.inputs.values())

    def row_of(self, world: int) -> int:
        try:
            return self.ids.index(world)
        except ValueError:
            raise InvalidArgumentError(f"world {world} does not exist; live worlds: {self.ids}") from None

    def add(self, seed: int = 0, inputs: Mapping[str, torch.Tensor] | None = None) -> int:
        """A new world at block 0 in the next free row; returns its id."""
        if self.n >= self.capacity:
            raise InvalidArgumentError(f"all {self.capacity} rows hold worlds: remove one first")
        seed = _check_seed(seed)
        checked = {k: self.check_input(k, v) for k, v in (inputs or {}).items()}
        world, row = self._next_id, self.n
        self._next_id += 1
        self.ids.append(world)
        self.seeds.append(seed)
        self.blocks.append(0)
        self._clear_row(row)
        for name in self.plan.inputs:
            self.buffers[name][row].zero_()
        for name, x in checked.items():
            self.buffers[name][row].copy_(x[0])
        # Every input counts as given (zeros unless set), so state derived from inputs is always
        # their program's output: the same for a world whichever other worlds share its batch.
        self._run_input_programs(self.plan.inputs)
        return world

    def remove(self, world: int) -> None:
        """End a world; the last row's world moves into its row (its state moves with it)."""
        row, last = self.row_of(world), self.n - 1
        if row != last:
            for buf in self._row_buffers():
                buf[row].copy_(buf[last])
            for lst in (self.ids, self.seeds, self.blocks):
                lst[row] = lst[last]
        for lst in (self.ids, self.seeds, self.blocks):
            lst.pop()

    def reset(self, world: int, seed: int | None = None, **inputs: torch.Tensor) -> None:
        """World `world` back to block 0 (optionally a new seed and inputs); the others go on."""
        row = self.row_of(world)
        new_seed = self.seeds[row] if seed is None else _check_seed(seed)
        checked = {k: self.check_input(k, v) for k, v in inputs.items()}
        for name, x in checked.items():
            self.buffers[name][row].copy_(x[0])
        self._clear_row(row)
        self._run_input_programs(self.plan.inputs)
        self.seeds[row] = new_seed
        self.blocks[row] = 0

    # -- snapshots (flashdreams.snapshot) ----------------------------------------------
    def _world_rows(self, row: int) -> dict[str, torch.Tensor]:
        """World `row`'s per-row state and inputs as views shaped like a batch-1 session's buffers."""
        out = {}
        for name, decl in self.plan.state.items():
            if decl.batch_dim is not None:
                out[name] = self.buffers[name].narrow(decl.batch_dim, row, 1)
        for name in self.plan.inputs:
            out[name] = self.buffers[name][row : row + 1]
        return out

    @property
    def snapshot_nbytes(self) -> int:
        """The bytes `snapshot()` copies for one world."""
        return sum(v.numel() * v.element_size() for v in self._world_rows(0).values())

    @torch.no_grad()
    def snapshot(
        self,
        world: int,
        device: torch.device | str | None = None,
        *,
        pinned: bool = False,
        into: Snapshot | None = None,
    ) -> Snapshot:
        """World `world`'s state after its current block: `restore()` it into any world of these worlds
        (or into a batch-1 session of the same preset), or `fork()` a world from it. `device`, `pinned`
        and `into` as for `Session.snapshot`."""
        row = self.row_of(world)
        where = f"snapshot(world {world})"
        tensors = take_state(self._world_rows(row), self.engine, self.device, device, into, pinned, where)
        ident, given = model_identity(self.engine), tuple(sorted(self.plan.inputs))
        snap = Snapshot(ident, self.blocks[row], self.seeds[row], given, tensors, str(self.engine.source), 1)
        return snap if into is None else into.assign(snap)

    @torch.no_grad()
    def restore(self, world: int, snapshot: Snapshot) -> None:
        """World `world` back to `snapshot` (its block index, seed, inputs and state); the other worlds go on.
        Checked whole first (EngineIncompatibleError for another model or shapes), nothing changed then."""
        row = self.row_of(world)
        targets = self._world_rows(row)
        check_fits(snapshot, self.engine, targets, f"restore(world {world})")
        put_state(snapshot, targets)
        self.blocks[row], self.seeds[row] = snapshot.block, snapshot.seed

    def fork(self, world: int, seed: int | None = None) -> int:
        """A new world (returned id) in the state `world` is in now: a branch. With the same seed it draws
        the same noise as `world` from here on, so it differs only by the inputs it is given; `seed`
        gives it its own noise from its next block."""
        new_seed = None if seed is None else _check_seed(seed)
        if self.n >= self.capacity:
            raise InvalidArgumentError(f"all {self.capacity} rows hold worlds: remove one before fork()")
        snap = self.snapshot(world)
        new = self.add(snap.seed)
        self.restore(new, snap)
        if new_seed is not None:
            self.seeds[self.row_of(new)] = new_seed
        return new

    def check_input(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """One world's input ([1, ...] or without the batch dim), validated, on the device; nothing is written."""
        return self._checker.check_input(name, value)

    def set_input(self, world: int, name: str, value: torch.Tensor) -> None:
        """Set one world's input (checked first; refused for this world alone). Takes effect next block."""
        row = self.row_of(world)
        x = self.check_input(name, value)
        self.buffers[name][row].copy_(x[0])
        if self.plan.inputs[name].program:
            self._run_input_programs({name: None})

    def set_inputs(self, name: str, values: torch.Tensor) -> dict[int, str]:
        """Every live world's input at once (values [n, ...] in row order). Rows that fail their check
        are left as they were and returned as {world id: reason}; the others are written."""
        if not isinstance(values, torch.Tensor) or values.dim() < 1 or values.shape[0] != self.n:
            got = list(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise InvalidArgumentError(f"set_inputs('{name}'): need one row per live world ({self.n}), got {got}")
        refused: dict[int, str] = {}
        good_rows, good = [], []
        for row in range(self.n):
            try:
                good.append(self.check_input(name, values[row : row + 1])[0])
                good_rows.append(row)
            except InvalidArgumentError as exc:
                refused[self.ids[row]] = str(exc)
        if good_rows:
            idx = torch.tensor(good_rows, device=self.device)
            self.buffers[name].index_copy_(0, idx, torch.stack(good))
            if self.plan.inputs[name].program:
                self._run_input_programs({name: None})
        return refused

    # -- the step --------------------------------------------------------------------
    @torch.no_grad()
    def step(self, only: Sequence[int] | None = None) -> WorldsStep:
        """One block of every live world, in one batch (the smallest bucket that holds them); for a
        plan that is not row-independent, one batch per distinct block index (module docstring).

        `only` (world ids) advances just those worlds: the others' state rows are restored after the
        batch ran (a paused world costs a copy of its state), and the result holds the chosen rows."""
        if self.n == 0:
            raise InvalidArgumentError("there are no worlds to step: add() one")
        rows = list(range(self.n)) if only is None else sorted({self.row_of(w) for w in only})
        if not self.lockstep:
            groups = [rows]
        else:
            by_block: dict[int, list[int]] = {}
            for r in rows:
                by_block.setdefault(self.blocks[r], []).append(r)
            groups = [by_block[b] for b in sorted(by_block)]
        parts = [self._step_rows(g) for g in groups]
        order = [r for g in groups for r in g]
        lat, frames, padded = _merge([p[0] for p in parts], [p[1] for p in parts])
        if len(groups) > 1:  # back to row order
            back = torch.tensor([order.index(r) for r in rows], device=self.device)
            lat, frames = lat[back], frames[back] if frames is not None else None
            padded = [padded[i] for i in back.tolist()] if padded is not None else None
        ids = [self.ids[r] for r in rows]
        out = WorldsStep(ids, [self.blocks[r] for r in rows], lat, frames, {}, parts[-1][2], padded)
        for row in rows:
            self.blocks[row] += 1
        if self.check_finite:
            ok = torch.isfinite(lat.reshape(len(rows), -1)).all(1).tolist()  # after the block: one read-back
            for i, good in enumerate(ok):
                if not good:
                    world = ids[i]
                    out.failed[world] = f"world {world}: non-finite output at block {out.blocks[i]}; it was reset"
                    self.reset(world)
        return out

    def _step_rows(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor | None, torch.cuda.Event | None]:
        """One batch that advances `rows` (each row's own block index, or in lockstep their shared one);
        every other live row is held: its state rows are put back after the batch."""
        n = self.n
        stepping = set(rows)
        held = [r for r in range(n) if r not in stepping]
        bucket = self.capacity if self._static else bucket_for(n, self.capacity)
        session = self._session_for(bucket)
        saved = {name: view[held].clone() for name, view in self._state_rows()} if held else {}
        if self.lockstep:  # the shared tables are the group's: every row runs at its block index
            block = self.blocks[rows[0]]
            session.block = block
            blocks = [block] * bucket
        else:
            blocks = self.blocks + [0] * (bucket - n)
        if BLOCK_INDEX in self.buffers:
            self.buffers[BLOCK_INDEX][:bucket].copy_(torch.tensor(blocks, dtype=torch.int64), non_blocking=True)
        result = session.step()
        if held:
            idx = torch.tensor(held, device=self.device)
            for name, view in self._state_rows():
                view.index_copy_(0, idx, saved[name])
        pick = slice(0, n) if len(rows) == n else torch.tensor(rows, device=self.device)
        frames = result.frames[pick] if result.frames is not None else None
        return result.latents[pick], frames, result.frames_ready

    # -- internals ------------------------------------------------------------------
    def _session_for(self, bucket: int) -> _BucketSession:
        s = self._sessions.get(bucket)
        if s is None:
            plan = self.plan if bucket == self.capacity else self.plan.with_batch(bucket)
            views = {name: self._view(name, buf, bucket) for name, buf in self.buffers.items()}
            s = self._sessions[bucket] = _BucketSession(self, plan, views, self.cuda_graphs)
        return s

    def _view(self, name: str, buf: torch.Tensor, bucket: int) -> torch.Tensor:
        if bucket == self.capacity:
            return buf
        if name in self.plan.constants and (not buf.dim() or buf.shape[0] != self.capacity):
            return buf  # a constant without a batch dim: shared by every row
        return buf[:bucket]  # smaller buckets exist for row-independent plans only: every buffer batch-first

    def _state_rows(self) -> list[tuple[str, torch.Tensor]]:
        """Every per-row state buffer as a view with its rows first (`TensorDecl.batch_dim`); tables
        every row shares (batch_dim None) are rewritten each block and never copied per row."""
        out = []
        for name, decl in self.plan.state.items():
            if decl.batch_dim is not None:
                out.append((name, self.buffers[name].movedim(decl.batch_dim, 0)))
        return out

    def _row_buffers(self) -> list[torch.Tensor]:
        return [v for _, v in self._state_rows()] + [self.buffers[n] for n in self.plan.inputs]

    def _clear_row(self, row: int) -> None:
        for name, view in self._state_rows():
            view[row].fill_(self.plan.state[name].fill)

    def _run_input_programs(self, names: Mapping[str, object]) -> None:
        """Rebuild state derived from inputs (e.g. a prompt's cache) over the live bucket. Rows are
        independent and the programs deterministic, so the other worlds' rows are rewritten unchanged."""
        if self.n == 0:
            return
        bucket = self.capacity if self._static else bucket_for(self.n, self.capacity)
        session = self._session_for(bucket)
        for name in names:
            spec = self.plan.inputs[name]
            if spec.program:
                run_ops(list(spec.program), session.buffers, session._call, self.plan.graphs)

    def _draw_rows(self, buffers: dict[str, torch.Tensor], bucket: int) -> None:
        """Row r's draws from a generator seeded by (its world's seed, its block): as a lone session draws."""
        gen = self._generator
        every = sorted(n for n, d in self.plan.draws.items() if not d.first_block_only)
        names = sorted(self.plan.draws)  # the order a lone session draws in
        for row in range(self.n):
            todo = names if self.blocks[row] == 0 else every  # past block 0: no first-block-only draws
            if not todo:
                continue
            gen.manual_seed(block_seed(self.seeds[row], self.blocks[row]))
            for name in todo:
                torch.randn(buffers[name].shape[1:], generator=gen, device=self.device, out=buffers[name][row])

    def memory_bytes(self) -> int:
        """Bytes of the worlds' buffers (state, inputs, draws, constants) at the full capacity."""
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def __repr__(self) -> str:
        return f"Worlds({self.engine.preset_name}, n={self.n}, capacity={self.capacity}, blocks={self.blocks})"


def _check_rows(name: str, plan: BlockPlan) -> None:
    """Lockstep worlds copy state rows along each buffer's batch dim: refuse a plan whose buffers do
    not hold exactly one row per world there (classifier-free guidance keeps two)."""
    for decl in plan.state.values():
        bd = decl.batch_dim
        if bd is not None and (bd >= len(decl.shape) or decl.shape[bd] != plan.batch):
            raise InvalidArgumentError(
                f"{name}: its state '{decl.name}' {list(decl.shape)} does not hold one row per world along dim "
                f"{bd} (batch {plan.batch}), so its worlds cannot be held or reset one by one; step them together "
                "with engine.session()"
            )


def _one_row(spec: InputSpec) -> InputSpec:
    return dataclasses.replace(spec, shape=(1, *spec.shape[1:]))


def pad_front(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """`x` grown to `length` along `dim` by repeating its first entry in front."""
    extra = length - x.shape[dim]
    if extra <= 0:
        return x
    first = x.narrow(dim, 0, 1)
    return torch.cat([first.expand(*[extra if d == dim else -1 for d in range(x.dim())]), x], dim)


def _merge(lats: list[torch.Tensor], frames: list[torch.Tensor | None]):
    """The groups' outputs as one batch (latents [n, C, F, h, w], frames [n, T, H, W, 3]); groups of
    shorter blocks padded in front, with each row's (frames, latent frames) of padding."""
    if len(lats) == 1:
        return lats[0], frames[0], None
    t_lat = max(x.shape[2] for x in lats)
    t_fr = max(f.shape[1] for f in frames) if frames[0] is not None else 0
    if all(x.shape[2] == t_lat for x in lats) and all(f is None or f.shape[1] == t_fr for f in frames):
        return torch.cat(lats), torch.cat(frames) if frames[0] is not None else None, None
    padded = [
        (t_fr - (f.shape[1] if f is not None else 0), t_lat - x.shape[2])
        for x, f in zip(lats, frames)
        for _ in range(x.shape[0])
    ]
    lat = torch.cat([pad_front(x, 2, t_lat) for x in lats])
    fr = torch.cat([pad_front(f, 1, t_fr) for f in frames]) if frames[0] is not None else None
    return lat, fr, padded


def _row(inputs: Mapping[str, torch.Tensor], i: int, n: int) -> dict[str, torch.Tensor]:
    """World i's slice of batched inputs ([n, ...]), or the same value for every world ([1, ...] / unbatched)."""
    out = {}
    for k, v in inputs.items():
        out[k] = v[i : i + 1] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n and n > 1 else v
    return out
