"""Recording a session's inputs, and replaying them bit for bit in another process.

Simulator and RL users debug by replaying: a recording holds the session's seed and every
named input it was given, in order, with the block it arrived before. The session draws each
block's noise from (seed, block index), so the same engine on the same machine reproduces the
same frames. One safetensors file: the input tensors, and the event log as JSON in its metadata.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from flashdreams.errors import InvalidArgumentError, NotFoundError

if TYPE_CHECKING:
    from flashdreams.engine import Engine
    from flashdreams.session import Session, StepResult

FORMAT = "flashdreams-recording/1"


def engine_identity(engine: Engine) -> dict:
    """What must match for a replay to be exact: the model, its plan (shapes, schedule) and the backend."""
    plan = json.dumps(engine.plan.to_dict(), sort_keys=True)
    import hashlib

    return {
        "preset": engine.preset_name,
        "source": engine.source,
        "backend": engine.backend.name,
        "dtype": str(engine.backend.dtype).removeprefix("torch."),
        "plan_sha256": hashlib.sha256(plan.encode()).hexdigest(),
    }


class Recording:
    """An event log: `input` (name, tensor), `step` (with any given draws), `reset` (seed)."""

    def __init__(self, identity: dict, seed: int) -> None:
        self.identity = identity
        self.seed = seed
        self.events: list[dict] = []
        self.tensors: dict[str, torch.Tensor] = {}

    @classmethod
    def begin(cls, session: Session) -> Recording:
        """A recording of `session` from block 0: its seed and the inputs it holds now."""
        rec = cls(engine_identity(session.engine), session.seed)
        for name in sorted(session._given):
            rec.input(name, session.buffers[name])
        return rec

    def _tensor(self, value: torch.Tensor) -> str:
        key = f"t{len(self.tensors)}"
        self.tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return key

    def input(self, name: str, value: torch.Tensor) -> None:
        self.events.append({"op": "input", "name": name, "tensor": self._tensor(value)})

    def step(self, draws: dict[str, torch.Tensor]) -> None:
        self.events.append({"op": "step", "draws": {n: self._tensor(t) for n, t in draws.items()}})

    def reset(self, seed: int) -> None:
        self.events.append({"op": "reset", "seed": seed})

    @property
    def num_steps(self) -> int:
        return sum(1 for e in self.events if e["op"] == "step")

    def save(self, path: str | os.PathLike) -> None:
        meta = {"format": FORMAT, "engine": self.identity, "seed": self.seed, "events": self.events}
        tensors = self.tensors or {"_empty": torch.zeros(0)}
        tmp = f"{os.fspath(path)}.partial"
        save_file(tensors, tmp, metadata={"flashdreams_recording": json.dumps(meta)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Recording:
        if not os.path.isfile(path):
            raise NotFoundError(f"recording '{path}' does not exist")
        try:
            with safe_open(os.fspath(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("flashdreams_recording", "null"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        except (SafetensorError, OSError, ValueError) as exc:  # JSONDecodeError is a ValueError
            raise InvalidArgumentError(f"recording '{path}' is not a FlashDreams recording ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise InvalidArgumentError(f"recording '{path}' is not a {FORMAT} file (made by session.save_recording)")
        rec = cls(meta["engine"], int(meta["seed"]))
        rec.events, rec.tensors = meta["events"], tensors
        return rec


def replay(source: str | os.PathLike | Recording, engine: Engine, check: bool = True) -> Iterator[StepResult]:
    """Replay a recording on `engine`: yields each block's result, in order (copy what you keep).

    With `check`, an engine whose model, plan or backend differs from the recorded one is refused
    (the frames would differ).
    """
    rec = source if isinstance(source, Recording) else Recording.load(source)
    if check:
        here = engine_identity(engine)
        diff = {k: (rec.identity.get(k), v) for k, v in here.items() if k != "source" and rec.identity.get(k) != v}
        if diff:
            raise InvalidArgumentError(
                f"this recording was made on another engine ({diff}: recorded vs here); "
                "load the same preset, weights, backend and dtype to replay it"
            )
    session: Session | None = None
    pending: dict[str, torch.Tensor] = {}
    for event in rec.events:
        op = event["op"]
        if op == "input":
            value = rec.tensors[event["tensor"]]
            if session is None:
                pending[event["name"]] = value
            else:
                session.set_input(event["name"], value)
        elif op == "reset":
            if session is None:
                session = engine.session(inputs=pending, seed=rec.seed)
            session.reset(seed=event["seed"])
        elif op == "step":
            if session is None:
                session = engine.session(inputs=pending, seed=rec.seed)
            draws = {n: rec.tensors[k] for n, k in event.get("draws", {}).items()}
            yield session.step(draws or None)
