"""A world's state at a block boundary: taken, restored, forked, written to disk.

Planning and RL users branch a world (try several action sequences from one state, keep the best:
tree search, model-predictive control), simulators save a game and rewind it, and anyone debugging a
long rollout wants to go back a few blocks. Everything a world carries between blocks is in the
session's buffers (DESIGN.md: state stays on the GPU): the per-row state the plan declares (KV rings,
their fp8 shadow, decoder caches, state derived from inputs such as a prompt's cross-attention cache),
the named inputs, and on the host the block index and the seed. A `Snapshot` is a copy of exactly
those. The ring's shared tables (`TensorDecl.batch_dim` None: RoPE positions, slots, valid length) are
rewritten from the block index every block and are left out, and so are the random draws: a session
draws each block's noise from (seed, block), so a restored world continues as the original did.

Restoring copies into the existing buffers (their addresses never change, so captured CUDA graphs stay
valid). It is checked whole first (the same model and dtype, the same tensors, shapes and dtypes) and
refused by name otherwise, with nothing changed. A snapshot of one world of `engine.worlds(...)` and
one of a batch-1 session are the same thing, so either restores into the other.

Costs: a snapshot holds the whole KV ring (Self-Forcing 1.3B in bf16: ~5.7 GiB at its 21-frame ring),
on the session's device unless `device="cpu"` is asked for. `nbytes` says how much. Into host memory the
copy runs at pageable-memory speed (h2-h100: 1.2 GB/s, a fresh allocation each time); `pinned=True`
takes page-locked host memory (DMA at the link's speed), and `into=` an earlier snapshot whose memory is
reused (a planner that rewinds to a moving checkpoint allocates once).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from flashdreams.errors import EngineIncompatibleError, InvalidArgumentError, NotFoundError

FORMAT = "flashdreams-snapshot/1"
_META_KEY = "flashdreams_snapshot"


def model_identity(engine) -> dict:
    """What a snapshot must share with the engine it restores into: the model and its dtype. The backend
    may differ (a snapshot of an eager session restores into a built engine of the same preset)."""
    return {"preset": engine.preset_name, "dtype": str(engine.backend.dtype).removeprefix("torch.")}


@dataclass
class Snapshot:
    """One world's (or a session's batch of worlds') state after `block` blocks; see the module docstring."""

    identity: dict  # model_identity() of the engine it was taken from
    block: int
    seed: int
    given: tuple[str, ...]  # the inputs that had been set (a session requires some before its first step)
    tensors: dict[str, torch.Tensor]  # per-row state and inputs, as the session's buffers hold them
    source: str = ""  # the engine's source (checkpoint, engine directory), for the reader: not checked
    batch: int = 1  # worlds in it: 1 for a world of `engine.worlds(...)` or a batch-1 session

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def assign(self, other: Snapshot) -> Snapshot:
        """Take `other`'s fields (its tensors are this snapshot's own, copied into by `into=`); returns self."""
        self.identity, self.block, self.seed, self.given = other.identity, other.block, other.seed, other.given
        self.tensors, self.source, self.batch = other.tensors, other.source, other.batch
        return self

    def to(self, device: torch.device | str) -> Snapshot:
        """The same snapshot with its tensors on `device` (host memory: "cpu")."""
        moved = {k: v.to(device, copy=True) for k, v in self.tensors.items()}
        return Snapshot(self.identity, self.block, self.seed, self.given, moved, self.source, self.batch)

    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file: the tensors, and the rest as JSON in its metadata. Written to a side file
        and renamed, so an interrupted save leaves no half-written snapshot under `path`."""
        meta = {
            "format": FORMAT,
            "engine": self.identity,
            "source": self.source,
            "block": self.block,
            "seed": self.seed,
            "given": list(self.given),
            "batch": self.batch,
        }
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        tmp = f"{os.fspath(path)}.partial"
        try:
            save_file(tensors, tmp, metadata={_META_KEY: json.dumps(meta)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> Snapshot:
        """A snapshot written by `save`, its tensors on `device` (read into host memory first)."""
        if not os.path.isfile(path):
            raise NotFoundError(f"snapshot '{path}' does not exist")
        try:
            with safe_open(os.fspath(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get(_META_KEY, "null"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise InvalidArgumentError(f"snapshot '{path}' is not a FlashDreams snapshot ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise InvalidArgumentError(f"snapshot '{path}' is not a {FORMAT} file (made by Snapshot.save)")
        try:
            snap = cls(
                dict(meta["engine"]),
                int(meta["block"]),
                int(meta["seed"]),
                tuple(str(n) for n in meta["given"]),
                tensors,
                str(meta.get("source", "")),
                int(meta["batch"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"snapshot '{path}': its metadata is incomplete ({exc})") from None
        return snap if torch.device(device).type == "cpu" else snap.to(device)


def take_state(
    sources: Mapping[str, torch.Tensor],
    engine,
    home: torch.device,
    device: torch.device | str | None = None,
    into: Snapshot | None = None,
    pinned: bool = False,
    where: str = "snapshot",
) -> dict[str, torch.Tensor]:
    """Copies of `sources` (a session's or one world's buffers, on `home`) for a snapshot: on `device`
    (default `home`), page-locked when `pinned` and the copy goes from a GPU to host memory, or into the
    tensors of `into` (an earlier snapshot of the same model and shapes, on whatever device it is). Every
    argument is checked before anything is written; returns once every copy has landed, so the caller may
    read or overwrite the result at once."""
    if into is not None:
        if not isinstance(into, Snapshot):
            raise InvalidArgumentError(f"{where}: into= takes a flashdreams Snapshot, got {type(into).__name__}")
        check_fits(into, engine, sources, where)
        held = {t.device.type for t in into.tensors.values()}
        if device is not None and {torch.device(device).type} != held:
            raise InvalidArgumentError(f"{where}: device={device!s} but the into= snapshot is on {sorted(held)}")
    dev = home if device is None else torch.device(device)
    to_pinned = pinned and dev.type == "cpu" and torch.cuda.is_available()
    out: dict[str, torch.Tensor] = {}
    for name, src in sources.items():
        if into is not None:
            out[name] = into.tensors[name]
        elif to_pinned and src.is_cuda:
            out[name] = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
        else:
            out[name] = torch.empty(src.shape, dtype=src.dtype, device=dev)
    _copy_landed([(sources[name], dst) for name, dst in out.items()])
    return out


def put_state(snapshot: Snapshot, targets: Mapping[str, torch.Tensor]) -> None:
    """Copy a checked (`check_fits`) snapshot's tensors into `targets`; returns once they have landed, so the
    snapshot's host memory may be reused at once."""
    _copy_landed([(snapshot.tensors[name], dst) for name, dst in targets.items()])


def _copy_landed(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """dst.copy_(src) for each pair; returns once every copy has landed. Copies between a GPU and
    page-locked host memory run as DMA one after another without the host waiting on each, then one
    synchronize per GPU involved; pageable memory copies in step."""
    landing = set()
    for src, dst in pairs:
        asynchronous = src.device != dst.device and (src.is_pinned() or dst.is_pinned())
        dst.copy_(src, non_blocking=asynchronous)
        if asynchronous:
            landing.add(src.device if src.is_cuda else dst.device)
    for gpu in landing:
        torch.cuda.synchronize(gpu)


def check_model(snapshot: Snapshot, engine, where: str) -> None:
    """Refuse a snapshot of another model or dtype than `engine`'s (EngineIncompatibleError)."""
    if not isinstance(snapshot, Snapshot):
        raise InvalidArgumentError(f"{where}: expected a flashdreams Snapshot, got {type(snapshot).__name__}")
    here = model_identity(engine)
    if snapshot.identity != here:
        raise EngineIncompatibleError(
            f"{where}: the snapshot is of {snapshot.identity}, this engine runs {here}; restore it into an engine "
            "of the same preset and dtype"
        )


def check_fits(snapshot: Snapshot, engine, targets: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse (EngineIncompatibleError, naming the difference) a snapshot that does not fit `targets`, the
    buffers (or one world's rows of them) it would be copied into; nothing is written here."""
    check_model(snapshot, engine, where)
    missing, extra = sorted(set(targets) - set(snapshot.tensors)), sorted(set(snapshot.tensors) - set(targets))
    if missing or extra:
        raise EngineIncompatibleError(
            f"{where}: the snapshot's tensors differ from this session's state: missing {missing}, unexpected {extra}"
        )
    stray = sorted(set(snapshot.given) - set(targets))
    if stray:
        raise EngineIncompatibleError(f"{where}: the snapshot names inputs this model does not take: {stray}")
    for name, dst in targets.items():
        src = snapshot.tensors[name]
        if tuple(src.shape) != tuple(dst.shape) or src.dtype != dst.dtype:
            raise EngineIncompatibleError(
                f"{where}: '{name}' is {list(src.shape)} {src.dtype} in the snapshot and {list(dst.shape)} "
                f"{dst.dtype} here (a snapshot of {snapshot.batch} world(s); sessions and worlds of another batch "
                "or another configuration hold other shapes)"
            )
