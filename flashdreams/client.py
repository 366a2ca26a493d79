"""A Python client for fd-serve: open a session, send inputs, receive frames, without a browser.

    from flashdreams.client import Client
    with Client("http://127.0.0.1:8000/") as c:          # add token="..." off loopback
        print([s["name"] for s in c.specs])                # the model's inputs (docs/PROTOCOL.md)
        seq = c.send_input("keyboard", keys)              # a tensor / array / nested list of the spec's shape
        f = c.next_frame()                                 # f.image: uint8 [H, W, 3]; f.seq: input it reflects

The client is synchronous (a simulator's loop calls it); its socket runs on one background
asyncio thread shared by every Client of the process. Frames arrive in order; by default each
is acknowledged on arrival, so the server steps the session as fast as it can (the browser page
acknowledges a frame when it shows it instead, which paces the session to playback).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse, urlunparse

import numpy as np

from flashdreams.errors import FlashDreamsError, InvalidArgumentError
from flashdreams.serve import protocol

_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


class ServerBusy(FlashDreamsError):
    """The server has no room for another session now: try again later (or another server)."""


class AccessRefused(FlashDreamsError):
    """The server refused the access token (or none was given where one is needed)."""


class SessionEnded(FlashDreamsError):
    """The server ended the session (idle timeout, a failed block, shutdown); `reason` says which."""


@dataclass
class Frame:
    """One video frame and what produced it."""

    index: int  # the frame's position in the session's video (0, 1, 2, ...)
    block: int  # the block that made it
    frame: int  # its position in that block
    seq: int  # the last input sequence number applied before that block
    block_ms: float  # how long the block took on the server
    image: np.ndarray  # uint8 [H, W, 3]
    received: float  # time.monotonic() when it arrived


def _loop() -> asyncio.AbstractEventLoop:
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = asyncio.new_event_loop()
            threading.Thread(target=_LOOP.run_forever, name="fd-client", daemon=True).start()
        return _LOOP


def ws_url(url: str, token: str | None = None) -> str:
    """The WebSocket address of a server URL (http://host:port/... -> ws://host:port/ws?token=...)."""
    u = urlparse(url if "://" in url else "http://" + url)
    query = parse_qs(u.query)
    if token is None and "token" in query:
        token = query["token"][0]
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(u.scheme)
    if scheme is None:
        raise InvalidArgumentError(f"server URL '{url}' must start with http:// or ws://")
    return urlunparse((scheme, u.netloc, "/ws", "", urlencode({"token": token}) if token else "", ""))


class Client:
    """One session on an fd-serve server (one WebSocket)."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        seed: int = 0,
        timeout: float = 60.0,
        auto_ack: bool = True,
    ) -> None:
        self.url = ws_url(url, token)
        self.timeout = timeout
        self.auto_ack = auto_ack
        self.info: dict[str, Any] = {}
        self.session: str | None = None
        self.ended: str | None = None
        self.errors: queue.Queue = queue.Queue()  # {"t": "error", ...} messages, in arrival order
        self.replies: queue.Queue = queue.Queue()  # {"t": "saved" | "loaded", ...} answers, in arrival order
        self._frames: queue.Queue = queue.Queue()
        self._seq = 0
        self._ws = None
        self._http = None
        self._reader = None
        self._run(self._connect(seed), timeout)

    # -- plumbing ------------------------------------------------------------------------
    def _run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, _loop()).result(timeout or self.timeout)

    async def _connect(self, seed: int) -> None:
        import aiohttp

        self._http = aiohttp.ClientSession()
        try:
            self._ws = await self._http.ws_connect(self.url, max_msg_size=0, heartbeat=30.0)
        except aiohttp.WSServerHandshakeError as exc:
            await self._http.close()
            if exc.status == 401:
                raise AccessRefused(f"{self.url.split('?')[0]}: the server refused the access token") from None
            raise
        except BaseException:
            await self._http.close()
            raise
        self.info = await self._receive_json("hello")
        await self._ws.send_json({"t": "start", "seed": seed})
        msg = await self._receive_json("started", "busy")
        if msg["t"] == "busy":
            await self._ws.close()
            await self._http.close()
            raise ServerBusy(msg.get("message", "the server is busy; try again later"))
        self.session = msg["session"]
        self._reader = asyncio.ensure_future(self._read())

    async def _receive_json(self, *kinds: str) -> dict:
        import aiohttp

        while True:
            msg = await self._ws.receive()
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise SessionEnded(f"the server closed the connection before '{kinds[0]}' ({msg.type.name})")
            obj = json.loads(msg.data)
            if obj.get("t") in kinds:
                return obj
            if obj.get("t") == "error":
                if "started" in kinds:  # the session could not start: say why
                    await self._ws.close()
                    await self._http.close()
                    raise FlashDreamsError(f"the server could not start a session: {obj.get('message')}")
                self.errors.put(obj)

    async def _read(self) -> None:
        import aiohttp

        h, w = self.info["height"], self.info["width"]
        codec = protocol.FrameCodec(self.info["encoding"])
        try:
            async for msg in self._ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    header, payload = protocol.unpack(msg.data)
                    image = codec.decode(payload, h, w)
                    self._frames.put(
                        Frame(
                            header["index"],
                            header["block"],
                            header["frame"],
                            header["seq"],
                            header["block_ms"],
                            image,
                            time.monotonic(),
                        )
                    )
                    if self.auto_ack and not self._ws.closed:
                        with contextlib.suppress(ConnectionError):  # the server is closing: read what it sent
                            await self._ws.send_json({"t": "ack", "index": header["index"] + 1})
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    obj = json.loads(msg.data)
                    if obj.get("t") == "error":
                        self.errors.put(obj)
                    elif obj.get("t") in ("saved", "loaded"):
                        self.replies.put(obj)
                    elif obj.get("t") == "ended":
                        self.ended = obj.get("reason", "ended")
                        await self._ws.close()  # the server waits for us to close: nothing is lost
                        break
                else:
                    break
        finally:
            if self.ended is None:
                self.ended = f"connection closed ({self._ws.close_code})"
            self._frames.put(None)

    async def _send(self, data: Any) -> None:
        if isinstance(data, bytes):
            await self._ws.send_bytes(data)
        elif isinstance(data, str):
            await self._ws.send_str(data)
        else:
            await self._ws.send_json(data)

    async def _close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(self._reader, 5.0)
        if self._http is not None:
            await self._http.close()

    # -- the API ----------------------------------------------------------------------
    @property
    def specs(self) -> list[dict[str, Any]]:
        """The model's inputs: name, shape, dtype, units, labels, low/high, meaning, when."""
        return self.info.get("specs", [])

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def send(self, message: dict | bytes | str) -> None:
        """Send one raw protocol message (docs/PROTOCOL.md)."""
        self._run(self._send(message))

    def send_input(self, name: str, value, binary: bool | None = None) -> int:
        """Set input `name` (applied before the next block); returns its sequence number. `value` is a
        torch tensor, numpy array or nested lists; binary (the default for over 64 values) sends raw bytes."""
        arr = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
        seq = self._next_seq()
        if binary is None:
            binary = arr.size > 64
        if binary:
            dtype = "float32" if arr.dtype.kind == "f" else "int64"
            data = np.ascontiguousarray(arr.astype(protocol.WIRE_DTYPES[dtype]))
            header = {"t": "input", "seq": seq, "name": name, "dtype": dtype, "shape": list(arr.shape)}
            self.send(protocol.pack(header, data.tobytes()))
        else:
            self.send(json.dumps({"t": "input", "seq": seq, "name": name, "value": arr.tolist()}, allow_nan=True))
        return seq

    def stand_in(self, name: str, seed: int) -> int:
        """Set input `name` to the engine's seeded stand-in (e.g. a prompt embedding without a text encoder)."""
        seq = self._next_seq()
        self.send({"t": "stand_in", "seq": seq, "name": name, "seed": seed})
        return seq

    def prompt(self, text: str) -> int:
        """A text prompt (the server needs --text-encoder)."""
        seq = self._next_seq()
        self.send({"t": "prompt", "seq": seq, "text": text})
        return seq

    def reset(self, seed: int | None = None) -> int:
        seq = self._next_seq()
        self.send({"t": "reset", "seq": seq, **({} if seed is None else {"seed": seed})})
        return seq

    def save(self) -> int:
        """Have the server keep a copy of the world after its newest block (one per session); answered by
        a "saved" reply (`next_reply`) with the block it holds, or an error. Returns the sequence number."""
        seq = self._next_seq()
        self.send({"t": "save", "seq": seq})
        return seq

    def load(self) -> int:
        """Put the world back to the saved copy; frames stamped with this sequence number or later continue
        from the saved block. Answered by a "loaded" reply, or an error when nothing was saved."""
        seq = self._next_seq()
        self.send({"t": "load", "seq": seq})
        return seq

    def next_reply(self, timeout: float | None = None) -> dict[str, Any]:
        """The next "saved" / "loaded" answer."""
        return self._next(self.replies, "saved/loaded reply", timeout)

    def _next(self, q: queue.Queue, what: str, timeout: float | None) -> dict[str, Any]:
        try:
            return q.get(timeout=timeout or self.timeout)
        except queue.Empty:
            raise TimeoutError(f"no {what} within {timeout or self.timeout} s") from None

    def pause(self) -> None:
        self.send({"t": "pause"})

    def resume(self) -> None:
        self.send({"t": "resume"})

    def ack(self, index: int) -> None:
        """Tell the server frames before `index` were presented (only needed with auto_ack=False)."""
        self.send({"t": "ack", "index": index})

    def next_frame(self, timeout: float | None = None) -> Frame:
        """The next frame, in order; raises SessionEnded once the server ended the session and none is left."""
        try:
            f = self._frames.get(timeout=timeout or self.timeout)
        except queue.Empty:
            raise TimeoutError(f"no frame within {timeout or self.timeout} s") from None
        if f is None:
            self._frames.put(None)
            raise SessionEnded(f"the session ended: {self.ended}")
        return f

    def next_error(self, timeout: float | None = None) -> dict[str, Any]:
        """The next error message the server sent ({"t": "error", "code", "message", "seq"})."""
        return self._next(self.errors, "error message", timeout)

    def close(self) -> None:
        """Close the connection (the server ends the session and frees it)."""
        if self._http is not None and not self._http.closed:
            self._run(self._close())

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
