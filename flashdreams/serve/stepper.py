"""Steppers: the live worlds of one engine, advanced one block at a time on the server's worker thread.

The session manager talks to a `Stepper` only: open a world for a session id, set its inputs,
advance a set of worlds one block, read each one's frames, close it. `SessionStepper` keeps one
`flashdreams.Session` per id and steps them in turn; a batched stepper (many worlds in one
forward pass) implements the same methods and replaces it without touching the server. Every
method runs on the manager's single worker thread, so a session is only ever used from one thread.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from flashdreams.errors import InvalidArgumentError

log = logging.getLogger(__name__)

# Inputs of these units are impulses (pointer deltas since the last block): a block consumes them,
# then they read zero until the client sends new ones. Key states and prompts persist instead.
IMPULSE_UNITS = frozenset({"mouse"})


@dataclass
class BlockOut:
    """One world's block: its frames (uint8 [T, H, W, 3], batch row 0) or the error that ended it."""

    block: int
    frames: np.ndarray | None
    block_ms: float
    error: BaseException | None = None


class Stepper(ABC):
    """The live worlds of one engine. All methods run on one worker thread."""

    engine: object

    def input_specs(self) -> list:
        """The inputs clients may send (the model's, unless a wrapper feeds some itself)."""
        return list(self.engine.input_specs())

    @abstractmethod
    def open(self, sid: str, seed: int, inputs: dict | None = None) -> None:
        """Create the world of session `sid` with its starting `inputs` on top of the stepper's defaults
        (raises OutOfMemoryError when the device cannot hold it)."""

    @abstractmethod
    def close(self, sid: str) -> None:
        """End `sid` and free its memory; unknown ids are ignored."""

    @abstractmethod
    def check_input(self, sid: str, name: str, value: torch.Tensor) -> torch.Tensor:
        """`value` validated by the input's spec without setting it (InvalidArgumentError when bad).
        Called from the server's event loop: it must not touch a world's state."""

    @abstractmethod
    def set_input(self, sid: str, name: str, value: torch.Tensor) -> None:
        """Set a checked input of `sid`; it takes effect at its next block."""

    @abstractmethod
    def reset(self, sid: str, seed: int | None) -> None:
        """Back to block 0 with the same inputs (and a new seed when given)."""

    @abstractmethod
    def step(self, sids: list[str]) -> dict[str, BlockOut]:
        """Advance every world in `sids` one block. A world that fails gets an error entry; the others
        are unaffected."""

    @abstractmethod
    def session_bytes(self) -> int:
        """Memory one more session takes on the engine's device (measured)."""

    def parked(self) -> int:
        """Sessions held ready for the next players (their memory is taken already, so the server's
        capacity counts them on top of what its free memory holds)."""
        return 0

    # Snapshots (flashdreams.snapshot), in host memory. A stepper whose worlds carry state outside their
    # buffers (the demo drive's ego pose) keeps these refusals and `can_save` False.
    can_save = False

    def save_nbytes(self, sid: str) -> int:
        """The host memory a save of `sid`'s world takes."""
        return 0

    def save(self, sid: str, limit_bytes: int, into=None):
        """A snapshot of `sid`'s world after its newest block, in host memory (written into `into`, the
        session's earlier save, when given); refused over `limit_bytes`."""
        raise InvalidArgumentError("this server cannot save its worlds (they carry state outside the model's)")

    def load(self, sid: str, snapshot) -> None:
        """`sid`'s world back to `snapshot`."""
        raise InvalidArgumentError("this server cannot load saved worlds (they carry state outside the model's)")


def check_save_size(nbytes: int, limit_bytes: int) -> None:
    """Refuse a save over the server's limit, naming both sizes and the flag."""
    if nbytes > limit_bytes:
        raise InvalidArgumentError(
            f"save: this model's state is {nbytes / 2**20:.1f} MiB, over this server's limit of "
            f"{limit_bytes / 2**20:.1f} MiB (fd-serve --save-limit-mb)"
        )


class SessionStepper(Stepper):
    """One `Session` per id, stepped one after another (the batched stepper steps them together).

    A closed session is parked, not freed (up to `spares` of them; None: no cap), and the next player
    gets it renewed (`Session.renew`): its buffers and captured CUDA graphs are kept, so that player's
    first blocks replay at steady speed instead of running eagerly and capturing on the worker thread,
    which would hold up every other player's round. The session that measures the memory at start is
    warmed up (every block kind captured) and parked as the first spare."""

    can_save = True

    def __init__(self, engine, defaults: dict[str, torch.Tensor] | None = None, spares: int | None = None) -> None:
        if spares is not None and spares < 0:
            raise InvalidArgumentError(f"spares must be >= 0 (0: free each closed session); got {spares}")
        self.engine = engine
        self.defaults = dict(defaults or {})  # inputs every new session starts with (e.g. fd-serve --prompt-embeds)
        self.sessions: dict = {}
        self.max_spares = spares
        self.spares: list = []  # closed sessions kept for the next players, newest last
        self.renewed = 0  # players who got a parked session
        self._impulses: dict[str, set[str]] = {}
        self._units = {s.name: s.units for s in engine.input_specs()}

    def open(self, sid: str, seed: int, inputs: dict | None = None) -> None:
        if sid in self.sessions:
            raise InvalidArgumentError(f"session '{sid}' is already open")
        given = {**self.defaults, **(inputs or {})}
        if self.spares:
            session = self.spares.pop()
            try:
                session.renew(seed, given)
            except BaseException:
                # Refused before anything changed: still a good spare. Failed part-way through its inputs:
                # freed, its memory given back at once.
                self._park_or_free(session)
                raise
            self.renewed += 1
        else:
            session = self.engine.session(seed=seed, inputs=given)
        self.sessions[sid] = session
        self._impulses[sid] = set()

    def close(self, sid: str) -> None:
        session = self.sessions.pop(sid, None)
        self._impulses.pop(sid, None)
        if session is not None:
            self._park_or_free(session)

    def _park_or_free(self, session) -> None:
        """Keep `session` for the next player while there is room (and it did not fail in a replayed graph),
        else free its memory."""
        if session.failed is None and (self.max_spares is None or len(self.spares) < self.max_spares):
            self.spares.append(session)
        elif self.engine.device.type == "cuda":
            del session
            torch.cuda.empty_cache()  # give the freed buffers back so the memory budget stays true

    def parked(self) -> int:
        return len(self.spares)

    def check_input(self, sid: str, name: str, value: torch.Tensor) -> torch.Tensor:
        """`value` validated by the input's spec (shape, dtype, finite, range) without setting it."""
        return self.sessions[sid].check_input(name, value)

    def set_input(self, sid: str, name: str, value: torch.Tensor) -> None:
        self.sessions[sid].set_input(name, value)
        if self._units.get(name) in IMPULSE_UNITS:
            self._impulses[sid].add(name)

    def reset(self, sid: str, seed: int | None) -> None:
        self.sessions[sid].reset(seed=seed)

    def save_nbytes(self, sid: str) -> int:
        return self.sessions[sid].snapshot_nbytes

    def save(self, sid: str, limit_bytes: int, into=None):
        session = self.sessions[sid]
        check_save_size(session.snapshot_nbytes, limit_bytes)
        return session.snapshot(device="cpu", into=into)

    def load(self, sid: str, snapshot) -> None:
        self.sessions[sid].restore(snapshot)

    def step(self, sids: list[str]) -> dict[str, BlockOut]:
        out = {}
        for sid in sids:
            s = self.sessions.get(sid)
            if s is None:
                continue
            t0 = time.perf_counter()
            try:
                result = s.step()
                frames = result.frames_cpu()[0].numpy()
            except Exception as exc:  # one world's failure ends that world only
                log.warning("session %s failed at block %d: %s", sid, s.block, exc)
                out[sid] = BlockOut(s.block, None, (time.perf_counter() - t0) * 1e3, exc)
                continue
            for name in self._impulses[sid]:
                s.set_input(name, torch.zeros(s.plan.inputs[name].shape))
            self._impulses[sid].clear()
            out[sid] = BlockOut(result.block, frames, (time.perf_counter() - t0) * 1e3)
        return out

    def session_bytes(self) -> int:
        """One probe session: on CUDA the allocator's growth over its creation and warm-up (buffers, every
        block kind's captured graphs and their pool, the eager blocks' peak temporaries); on a CPU the
        bytes of its buffers after a block. The probe is then parked as the first spare (unless spares
        are off), so the first player starts on captured graphs too."""
        eng = self.engine
        if eng.device.type == "cuda":
            torch.cuda.synchronize(eng.device)
            torch.cuda.reset_peak_memory_stats(eng.device)
            before = torch.cuda.memory_allocated(eng.device)
            probe = eng.session(seed=0, inputs=self.defaults)
            probe.warm_up()  # each block kind run eagerly, then captured
            torch.cuda.synchronize(eng.device)
            used = int(torch.cuda.max_memory_allocated(eng.device) - before)
        else:
            probe = eng.session(seed=0, inputs=self.defaults)
            probe.step()
            tensors = list(probe.buffers.values()) + list(probe._outputs.values())
            used = int(sum(t.numel() * t.element_size() for t in tensors))
        self._park_or_free(probe)
        return used
