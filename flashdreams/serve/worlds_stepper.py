"""The batched stepper: every session of a row-independent model is a world of one `Worlds`, and a
round steps all due sessions in one forward pass (flashdreams.batched).

Sessions at different block indices share the batch; a session that is not due this round (its
viewer is behind, or it is stopped) is held: its state rows are restored after the batch ran.
"""

from __future__ import annotations

import logging
import time

import torch

from flashdreams.errors import InvalidArgumentError
from flashdreams.serve.stepper import IMPULSE_UNITS, BlockOut, Stepper, check_save_size

log = logging.getLogger(__name__)


class WorldsStepper(Stepper):
    """Sessions as worlds of one batch, up to `capacity` of them."""

    can_save = True

    def __init__(self, engine, capacity: int, defaults: dict[str, torch.Tensor] | None = None) -> None:
        self.engine = engine
        self.defaults = dict(defaults or {})  # inputs every new world starts with (fd-serve --prompt-embeds)
        self.worlds = engine.worlds(0, capacity=capacity)
        self.ids: dict[str, int] = {}  # session id -> world id
        self._impulses: dict[str, set[str]] = {}
        self.specs = {s.name: s for s in self.worlds.input_specs()}

    def open(self, sid: str, seed: int, inputs: dict | None = None) -> None:
        if sid in self.ids:
            raise InvalidArgumentError(f"session '{sid}' is already open")
        if self.worlds.n >= self.worlds.capacity:
            from flashdreams.errors import OutOfMemoryError

            raise OutOfMemoryError(f"all {self.worlds.capacity} world rows are taken")
        stand_ins = self.engine.default_inputs(seed, batch=1) if self.engine.stand_in_inputs else {}
        self.ids[sid] = self.worlds.add(seed, inputs={**stand_ins, **self.defaults, **(inputs or {})})
        self._impulses[sid] = set()

    def close(self, sid: str) -> None:
        world = self.ids.pop(sid, None)
        self._impulses.pop(sid, None)
        if world is not None:
            self.worlds.remove(world)

    def check_input(self, sid: str, name: str, value: torch.Tensor) -> torch.Tensor:
        return self.worlds.check_input(name, value)

    def set_input(self, sid: str, name: str, value: torch.Tensor) -> None:
        self.worlds.set_input(self.ids[sid], name, value)
        if self.specs[name].units in IMPULSE_UNITS:
            self._impulses[sid].add(name)

    def reset(self, sid: str, seed: int | None) -> None:
        self.worlds.reset(self.ids[sid], seed=seed)

    def save_nbytes(self, sid: str) -> int:
        return self.worlds.snapshot_nbytes

    def save(self, sid: str, limit_bytes: int, into=None):
        check_save_size(self.worlds.snapshot_nbytes, limit_bytes)
        return self.worlds.snapshot(self.ids[sid], device="cpu", into=into)

    def load(self, sid: str, snapshot) -> None:
        self.worlds.restore(self.ids[sid], snapshot)

    def step(self, sids: list[str]) -> dict[str, BlockOut]:
        live = [sid for sid in sids if sid in self.ids]
        if not live:
            return {}
        t0 = time.perf_counter()
        try:
            out = self.worlds.step(only=[self.ids[sid] for sid in live])
            frames = out.frames_cpu().numpy()
        except Exception as exc:  # the batch failed as a whole: every stepped session ends
            log.warning("batched step failed: %s", exc)
            ms = (time.perf_counter() - t0) * 1e3
            return {sid: BlockOut(self.worlds.blocks[self.worlds.row_of(self.ids[sid])], None, ms, exc) for sid in live}
        ms = (time.perf_counter() - t0) * 1e3
        row = {w: i for i, w in enumerate(out.ids)}
        result = {}
        for sid in live:
            world = self.ids[sid]
            i = row[world]
            if world in out.failed:
                result[sid] = BlockOut(out.blocks[i], None, ms, InvalidArgumentError(out.failed[world]))
                continue
            for name in self._impulses[sid]:
                self.worlds.set_input(world, name, torch.zeros(self.specs[name].shape))
            self._impulses[sid].clear()
            result[sid] = BlockOut(out.blocks[i], frames[i], ms)
        return result

    def session_bytes(self) -> int:
        """A world's share of the buffers (the batch's activations grow with the bucket, not per session)."""
        return max(1, self.worlds.memory_bytes() // self.worlds.capacity)
