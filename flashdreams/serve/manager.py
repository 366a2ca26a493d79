"""The session manager: admission, the per-engine stepping loop, flow control, idle timeouts, isolation.

One manager owns one engine (one GPU) through a `Stepper`. Its loop runs on the asyncio event
loop and hands each round of stepping to a single worker thread, so the event loop keeps
answering sockets while blocks run. A round applies every session's queued inputs, steps the
sessions that are running and whose client is about to run out of frames to show (so no session
runs ahead of its viewer, and no frame is ever dropped), and queues
each one's encoded frames, stamped with the last input sequence the block saw. A session whose
block fails is ended and freed; the others step on. Admission counts sessions against the memory
one session was measured to take.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from flashdreams.errors import FlashDreamsError, InvalidArgumentError, OutOfMemoryError
from flashdreams.serve import protocol
from flashdreams.serve.stepper import BlockOut, Stepper

log = logging.getLogger(__name__)

Send = Callable[[Any], None]  # queues one outgoing message (a dict for text, bytes for binary)


class Busy(FlashDreamsError):
    """No room for another session now (the memory budget or --max-sessions): try later."""


@dataclass
class Live:
    """One admitted session as the manager sees it."""

    sid: str
    seed: int
    send: Send
    running: bool = True
    # ("input", seq, name, tensor) / ("prompt", seq, text) / ("reset", seq, seed) / ("save", seq) / ("load", seq)
    pending: list[tuple] = field(default_factory=list)
    seq: int = 0  # the last input sequence applied before the latest block
    produced: int = 0  # frames its blocks made (flow control counts these)
    sent: int = 0  # frames queued to the client
    sending: asyncio.Task | None = None  # the latest block's encode-and-queue task (they run in order)
    acked: int = 0  # frames the client says it presented (or received)
    last_active: float = field(default_factory=time.monotonic)
    ended: str | None = None


def memory_available_bytes() -> int:
    """The host's available memory (Linux MemAvailable), or 4 GiB when it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


@dataclass(frozen=True)
class Limits:
    max_sessions: int | None = None  # a hard cap on top of the memory budget
    min_fps: float = 0.0  # refuse a session that would bring every session below this pace (0: off)
    memory_budget: int | None = None  # bytes for sessions; default: what the device has free, less a reserve
    idle_timeout_s: float = 600.0  # no message but acks for this long ends a session
    window_blocks: float = 1.0  # blocks a session may run ahead of what its client presented
    max_message_bytes: int = 1 << 20  # a client message over this is answered with an error
    save_limit_bytes: int = 2 << 30  # a session's saved world (host memory) may not be larger than this
    saves_budget_bytes: int | None = None  # all sessions' saved worlds together; default: a quarter of free host memory


class SessionManager:
    """Admits sessions, runs the stepping loop for one engine, and ends sessions cleanly."""

    def __init__(self, stepper: Stepper, limits: Limits, codec: protocol.FrameCodec, text_encoder=None) -> None:
        self.stepper = stepper
        self.engine = stepper.engine
        self.limits = limits
        self.codec = codec
        self.text_encoder = text_encoder
        self.specs = {s.name: s for s in stepper.input_specs()}  # what clients may send
        self.sessions: dict[str, Live] = {}
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="fd-serve-step")
        self.encoders = ThreadPoolExecutor(max(1, min(4, (os.cpu_count() or 2) // 2)), "fd-serve-encode")
        self.per_session_bytes = 0
        self.max_sessions = 0
        self.draining = False
        self.connections: set[asyncio.Event] = set()  # one per open socket, set when it has closed
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        spec = self.engine.spec
        self.frames_per_block = spec.frames_per_block
        self.window = max(1, int(round(limits.window_blocks * self.frames_per_block)))
        self.fps = float(spec.plan.meta.get("fps", 16))
        self.round_ms = 1000.0 * self.frames_per_block / self.fps  # until measured: one block's playback
        self.step_ms: float | None = None  # measured time of one session's block within a round
        self.max_elements = max(math.prod(s.shape) for s in self.specs.values()) if self.specs else 1
        self.stats = {"blocks": 0, "block_ms": 0.0, "admitted": 0, "refused": 0}
        self._saves: dict = {}  # session id -> its saved world (a host-memory Snapshot); worker thread only
        self.saves_budget = limits.saves_budget_bytes  # sized at start() when not given

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        """Measure one session's memory, size the admission limit, start the stepping loop."""
        loop = asyncio.get_running_loop()
        self.per_session_bytes = max(1, await loop.run_in_executor(self.worker, self.stepper.session_bytes))
        self.max_sessions = self._capacity()
        self._size_saves_budget()
        log.info(
            "one session takes %.1f MiB on %s: room for %d sessions",
            self.per_session_bytes / 2**20,
            self.engine.device,
            self.max_sessions,
        )
        self._task = asyncio.create_task(self._run(), name="fd-serve-loop")

    def _capacity(self) -> int:
        budget = self.limits.memory_budget
        if budget is not None:  # the sessions' memory, parked ones included
            n = max(0, budget // self.per_session_bytes)
        else:
            if self.engine.device.type == "cuda":
                free, total = torch.cuda.mem_get_info(self.engine.device)
                budget = free - max(1 << 30, total // 10)  # keep a reserve for the allocator and the decoder
            else:
                budget = memory_available_bytes() // 2
            # Free memory is measured with the parked sessions already in place: they count on top.
            n = max(0, budget // self.per_session_bytes) + self.stepper.parked()
        if self.limits.max_sessions is not None:
            n = min(n, self.limits.max_sessions)
        return int(n)

    async def drain(self, reason: str = "the server is shutting down") -> None:
        """Refuse new sessions, end the live ones (each client is told why), stop the loop."""
        if self.draining:
            return
        self.draining = True
        for sid in list(self.sessions):
            await self.end(sid, reason)
        if self.connections:  # let each socket send its "ended" and close (bounded)
            await asyncio.wait([asyncio.ensure_future(e.wait()) for e in self.connections], timeout=3.0)
        self._wake.set()  # the loop sees `draining` and returns after its current round
        if self._task is not None:
            await self._task
        self.worker.shutdown(wait=True)
        self.encoders.shutdown(wait=True)

    # -- sessions -----------------------------------------------------------------------
    async def open(self, send: Send, seed: int) -> Live:
        """Admit a session (or raise Busy) and create its world on the worker thread."""
        if self.draining:
            raise Busy("the server is shutting down; try another server or later")
        if len(self.sessions) >= self.max_sessions:
            self.stats["refused"] += 1
            raise Busy(
                f"busy: {len(self.sessions)} of {self.max_sessions} sessions are live on this "
                f"{self.engine.device.type} ({self.per_session_bytes / 2**20:.1f} MiB each); try again later"
            )
        n = len(self.sessions)
        if self.limits.min_fps > 0 and n > 0 and self.step_ms is not None:
            pace = self.frames_per_block / ((n + 1) * self.step_ms / 1000)  # frames/s each, one more stepped in turn
            if pace < self.limits.min_fps:
                self.stats["refused"] += 1
                raise Busy(
                    f"busy: another session would bring all {n + 1} to about {pace:.1f} frames/s each, under "
                    f"this server's {self.limits.min_fps:g} (--min-fps); try again later"
                )
        sid = secrets.token_hex(8)
        live = Live(sid, seed, send)
        self.sessions[sid] = live  # counted now, so concurrent opens cannot overshoot the limit
        try:
            await asyncio.get_running_loop().run_in_executor(self.worker, self.stepper.open, sid, seed)
        except (OutOfMemoryError, torch.OutOfMemoryError) as exc:
            self.sessions.pop(sid, None)
            self.stats["refused"] += 1
            raise Busy(f"busy: the device cannot hold another session now ({exc}); try again later") from None
        except BaseException:
            self.sessions.pop(sid, None)
            raise
        self.stats["admitted"] += 1
        self._wake.set()
        return live

    async def end(self, sid: str, reason: str, tell: bool = True) -> None:
        """End a session: tell its client why (unless it is gone), free its world."""
        live = self.sessions.pop(sid, None)
        if live is None:
            return
        live.ended = reason
        if tell:
            live.send({"t": "ended", "reason": reason})
        with contextlib.suppress(RuntimeError):  # the worker is already shut down (drain): the process ends
            await asyncio.get_running_loop().run_in_executor(self.worker, self._close, sid)
        self._wake.set()

    def handle(self, live: Live, msg: dict[str, Any], payload: bytes | None = None) -> None:
        """One client message, decoded and checked here; bad ones are answered with an error and the
        session goes on. Inputs are queued for the worker thread, applied before the next block."""
        kind = msg["t"]
        seq = msg.get("seq")
        if live.ended is not None:
            return  # a message that crossed the session's end
        try:
            if kind != "ack":
                live.last_active = time.monotonic()
            if kind == "ack":
                idx = protocol.field_int(msg, "index", low=0)
                live.acked = max(live.acked, min(idx, live.sent))
            elif kind == "input":
                seq = protocol.field_int(msg, "seq")
                name = msg.get("name")
                if name not in self.specs:
                    raise InvalidArgumentError(f"input '{name}' is unknown; this model takes {sorted(self.specs)}")
                value = protocol.input_tensor(msg, payload, self.max_elements)
                checked = self.stepper.check_input(live.sid, name, value)
                live.pending.append(("input", seq, name, checked))
            elif kind == "stand_in":
                seq = protocol.field_int(msg, "seq")
                name = msg.get("name")
                stand_ins = self.engine.default_inputs(seed=protocol.field_int(msg, "seed", 0))
                if name not in stand_ins:
                    raise InvalidArgumentError(
                        f"input '{name}' has no seeded stand-in; those with one are {sorted(stand_ins)}"
                    )
                live.pending.append(("input", seq, name, self.stepper.check_input(live.sid, name, stand_ins[name])))
            elif kind == "prompt":
                seq = protocol.field_int(msg, "seq")
                text = msg.get("text")
                if self.text_encoder is None:
                    raise InvalidArgumentError(
                        "this server has no text encoder (start fd-serve with --text-encoder DIR); "
                        "send prompt embeddings as an input, or a seeded stand-in"
                    )
                if not isinstance(text, str) or not text.strip() or len(text) > 2000:
                    raise InvalidArgumentError('"prompt" needs a non-empty "text" of at most 2000 characters')
                live.pending.append(("prompt", seq, text))
            elif kind == "reset":
                seq = protocol.field_int(msg, "seq")
                seed = msg.get("seed")
                live.pending.append(("reset", seq, None if seed is None else protocol.field_int(msg, "seed")))
            elif kind in ("save", "load"):
                live.pending.append((kind, protocol.field_int(msg, "seq")))
            elif kind == "pause":
                live.running = False
            elif kind == "resume":
                live.running = True
            elif kind == "ping":
                live.send({"t": "pong", "id": msg.get("id")})
            elif kind == "start":
                raise InvalidArgumentError("this connection already has a session; open another connection")
            else:
                raise InvalidArgumentError(f"message kind '{kind}' is unknown; kinds: {list(protocol.CLIENT_KINDS)}")
        except FlashDreamsError as exc:
            live.send({"t": "error", "code": error_code(exc), "message": str(exc), "seq": seq})
        except Exception as exc:  # a bug must not end the connection: say so and go on
            log.exception("message %r of session %s", kind, live.sid)
            live.send({"t": "error", "code": "internal", "message": f"internal error: {exc}", "seq": seq})
        self._wake.set()

    # -- the loop ---------------------------------------------------------------------
    def _ready(self) -> list[Live]:
        return [s for s in self.sessions.values() if self._due(s) or s.pending]

    def _due(self, s: Live) -> bool:
        """Step a session when it runs and its client is about to run out of frames: it has no more left
        to present than play while a round of stepping takes (with a margin), and never more than `window`.
        So the next block lands just as the last one ends: smooth video, and an input waits behind as
        little queued video as the server's speed allows."""
        playing_during_round = math.ceil(1.5 * self.round_ms / 1000 * self.fps) + 1
        return s.running and s.produced - s.acked <= min(self.window, playing_during_round)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.draining:
            await self._end_idle()
            ready = self._ready()
            if not ready:
                self._wake.clear()
                waiter = asyncio.ensure_future(self._wake.wait())
                done, _ = await asyncio.wait({waiter}, timeout=1.0)  # wakes for idle checks too
                if not done:
                    waiter.cancel()
                continue
            work = [(s.sid, s.pending, self._due(s)) for s in ready]
            for s in ready:
                s.pending = []
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.worker, self._round, work)
            except RuntimeError:  # the worker was shut down under us: draining
                return
            stepped = sum(1 for _, _, step in work if step)
            if stepped:
                ms = (time.perf_counter() - t0) * 1e3
                self.round_ms = 0.8 * self.round_ms + 0.2 * ms
                each = ms / stepped
                self.step_ms = each if self.step_ms is None else 0.8 * self.step_ms + 0.2 * each
            for sid, (replies, seq, out) in results.items():
                live = self.sessions.get(sid)
                if live is None:
                    continue
                for reply in replies:
                    live.send(reply)
                live.seq = seq if seq is not None else live.seq
                if out is None:
                    continue
                if out.error is not None:
                    await self.end(sid, f"failed: {type(out.error).__name__}: {out.error}")
                    continue
                self.stats["blocks"] += 1
                self.stats["block_ms"] += out.block_ms
                # Encoding runs on the encoder threads while the next round steps; blocks of one
                # session are queued in order (each send waits for the one before it).
                live.produced += len(out.frames)
                # The stamp is taken now: the next round may apply newer inputs before these frames go out.
                live.sending = asyncio.create_task(self._send_frames(live, out, live.seq, live.sending))

    def _close(self, sid: str) -> None:
        """On the worker thread: the session's world and its saved world go."""
        self._saves.pop(sid, None)
        self.stepper.close(sid)

    @property
    def saves_held_bytes(self) -> int:
        """Host memory the sessions' saved worlds take now."""
        return sum(snap.nbytes for snap in list(self._saves.values()))

    def _save(self, sid: str):
        """On the worker thread: `sid`'s world saved in host memory, over its earlier save (no second copy
        at any time). Refused, nothing changed, when all saves together would pass the server's budget:
        saved worlds live in host memory, which the device-memory admission does not count."""
        self._size_saves_budget()  # a manager stepped without start() sizes it here
        need, own = self.stepper.save_nbytes(sid), self._saves.get(sid)
        held = self.saves_held_bytes - (own.nbytes if own is not None else 0)  # its own save is overwritten
        if self.stepper.can_save and held + need > self.saves_budget:
            raise OutOfMemoryError(
                f"save: the server holds {held / 2**20:.1f} MiB of saved worlds and this one needs {need / 2**20:.1f}, "
                f"over its budget of {self.saves_budget / 2**20:.1f} MiB (fd-serve --saves-budget-mb); "
                "try again when other sessions have ended"
            )
        return self.stepper.save(sid, self.limits.save_limit_bytes, into=own)

    def _size_saves_budget(self) -> None:
        """Where no budget was given: a quarter of the host memory available now (at start(), or the first save)."""
        if self.saves_budget is None:
            self.saves_budget = memory_available_bytes() // 4

    def _round(self, work: list[tuple[str, list[tuple], bool]]) -> dict[str, tuple[list, int | None, BlockOut | None]]:
        """On the worker thread: apply each session's queued inputs, then step the sessions due a block."""
        results: dict[str, tuple[list, int | None, BlockOut | None]] = {}
        due = []
        for sid, pending, step in work:
            replies, seq = [], None  # messages for the client (errors, saved, loaded), and the last applied seq
            for item in pending:
                try:
                    if item[0] == "input":
                        self.stepper.set_input(sid, item[2], item[3])
                    elif item[0] == "prompt":
                        name = "prompt_embeds"
                        self.stepper.set_input(sid, name, self.text_encoder.encode(item[2]))
                    elif item[0] == "save":
                        snap = self._saves[sid] = self._save(sid)
                        replies.append({"t": "saved", "seq": item[1], "block": snap.block, "bytes": snap.nbytes})
                    elif item[0] == "load":
                        snap = self._saves.get(sid)
                        if snap is None:
                            raise InvalidArgumentError('load: this session has saved nothing yet (send "save" first)')
                        self.stepper.load(sid, snap)
                        replies.append({"t": "loaded", "seq": item[1], "block": snap.block})
                    else:
                        self.stepper.reset(sid, item[2])
                    seq = item[1]
                except Exception as exc:
                    replies.append({"t": "error", "code": error_code(exc), "message": str(exc), "seq": item[1]})
            results[sid] = (replies, seq, None)
            if step:
                due.append(sid)
        for sid, out in self.stepper.step(due).items():
            errors, seq, _ = results[sid]
            results[sid] = (errors, seq, out)
        return results

    async def _send_frames(self, live: Live, out: BlockOut, seq: int, before: asyncio.Task | None) -> None:
        loop = asyncio.get_running_loop()
        try:
            jobs = [loop.run_in_executor(self.encoders, self.codec.encode, f) for f in out.frames]
        except RuntimeError:  # the encoders were shut down: draining
            return
        encoded = await asyncio.gather(*jobs)
        if before is not None:
            await before
        if live.ended is not None:
            return
        n = len(encoded)
        for j, data in enumerate(encoded):
            header = {
                "t": "frame",
                "index": live.sent,
                "block": out.block,
                "frame": j,
                "frames": n,
                "seq": seq,
                "block_ms": round(out.block_ms, 2),
            }
            live.sent += 1
            live.send(protocol.pack(header, data))

    async def _end_idle(self) -> None:
        now = time.monotonic()
        for sid, live in list(self.sessions.items()):
            if now - live.last_active > self.limits.idle_timeout_s:
                await self.end(sid, f"idle: no input for {self.limits.idle_timeout_s:.0f} s (--idle-timeout)")

    def info(self) -> dict[str, Any]:
        """The hello message: what a client needs to build its controls and decode frames."""
        spec = self.engine.spec
        return {
            "t": "hello",
            "protocol": protocol.PROTOCOL_VERSION,
            "model": self.engine.preset_name,
            "specs": [protocol.spec_to_wire(s) for s in self.specs.values()],
            "stand_ins": sorted(self.engine.default_inputs()) if self.engine.stand_in_inputs else [],
            "text_encoder": self.text_encoder is not None,
            "height": spec.height,
            "width": spec.width,
            "fps": self.fps,
            "frames_per_block": self.frames_per_block,
            "window": self.window,
            "encoding": self.codec.name,
            "max_message_bytes": self.limits.max_message_bytes,
            "save_limit_bytes": self.limits.save_limit_bytes if self.stepper.can_save else 0,
            "sessions": len(self.sessions),
            "max_sessions": self.max_sessions,
            "spare_sessions": self.stepper.parked(),
        }


def error_code(exc: BaseException) -> str:
    """The error's code on the wire: the snake-case of its class (invalid_argument, out_of_memory, ...)."""
    name = type(exc).__name__.removesuffix("Error")
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_") or "internal"
