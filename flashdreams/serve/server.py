"""The fd-serve HTTP/WebSocket app (aiohttp): the page, the hello/info endpoint, one WebSocket per session.

aiohttp because it is one small dependency that serves static files, HTTP and WebSockets from
one asyncio loop, and its client gives the Python client the same stack. Every request (the page,
/api/info, the WebSocket upgrade) must carry the access token when the server has one; a
wrong token is refused with 401 before anything else happens. A client message over
`max_message_bytes` is answered with an error and ignored (the session goes on); one over four
times that closes the connection at the transport (1009), before it is buffered whole.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import secrets
import socket
from importlib import resources
from typing import Any
from urllib.parse import quote, urlparse

from aiohttp import WSCloseCode, WSMsgType, web

from flashdreams.errors import FlashDreamsError, InvalidArgumentError
from flashdreams.serve import protocol
from flashdreams.serve.manager import Busy, SessionManager, error_code

log = logging.getLogger(__name__)

# The app's session hub: a SessionManager, or the Ray gateway's RayHub (the same methods).
MANAGER = web.AppKey("manager", object)
TOKEN = web.AppKey("token", str)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and names that resolve only to loopback addresses (localhost)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def access_token(host: str, token: str | None) -> str | None:
    """The token a server on `host` checks: the one given; a fresh one off loopback; none on loopback."""
    if token is not None:
        if len(token) < 16:
            raise InvalidArgumentError(
                "--token must be at least 16 characters (or leave it out to get a generated one)"
            )
        return token
    return None if is_loopback(host) else secrets.token_urlsafe(24)


def _authorized(request: web.Request) -> bool:
    want = request.app[TOKEN]
    if not want:
        return True
    given = request.query.get("token", "")
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        given = auth[len("Bearer ") :]
    return hmac.compare_digest(given.encode(), want.encode())


@web.middleware
async def _check_token(request: web.Request, handler):
    if not _authorized(request):
        return web.Response(status=401, text="access token missing or wrong: open the URL fd-serve printed\n")
    return await handler(request)


def _static(name: str) -> str:
    return resources.files("flashdreams.serve").joinpath("static", name).read_text()


async def _page(request: web.Request) -> web.Response:
    html = _static("index.html")
    if request.app[TOKEN]:  # the page's script is a request too: it carries the token the page came with
        html = html.replace('src="app.js"', f'src="app.js?token={quote(request.app[TOKEN])}"')
    return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-store"})


async def _script(request: web.Request) -> web.Response:
    return web.Response(text=_static("app.js"), content_type="application/javascript")


async def _info(request: web.Request) -> web.Response:
    return web.json_response(request.app[MANAGER].info())


async def _socket(request: web.Request) -> web.StreamResponse:
    """One WebSocket = at most one session: hello, start (admission), then inputs in and frames out."""
    manager = request.app[MANAGER]
    origin = request.headers.get("Origin")
    if origin and urlparse(origin).netloc != request.host:
        # A page of another site must not drive a session through the visitor's browser (WebSockets
        # are not covered by CORS); non-browser clients send no Origin.
        return web.Response(status=403, text=f"origin {origin} is not this server's page\n")
    limit = manager.limits.max_message_bytes
    ws = web.WebSocketResponse(max_msg_size=4 * limit + 65536, heartbeat=30.0)
    await ws.prepare(request)
    closed = asyncio.Event()
    manager.connections.add(closed)
    outbox: asyncio.Queue = asyncio.Queue()
    live = None
    refused = False

    async def sender() -> None:
        while True:
            item = await outbox.get()
            if isinstance(item, bytes):
                await ws.send_bytes(item)
                continue
            await ws.send_json(item)
            if item.get("t") in ("ended", "busy"):
                # The client closes when it has read this; closing first could reset the connection
                # (its unread acks) and lose the message. A client that does not close is closed after 2 s.
                await asyncio.sleep(2.0)
                await ws.close(code=WSCloseCode.TRY_AGAIN_LATER if item["t"] == "busy" else WSCloseCode.OK)
                return

    send_task = asyncio.create_task(sender())
    outbox.put_nowait(manager.info())
    try:
        async for msg in ws:
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                break
            size = len(msg.data) if msg.type == WSMsgType.BINARY else len(msg.data.encode())
            try:
                if size > limit:
                    raise InvalidArgumentError(
                        f"message of {size} bytes is over this server's {limit} (--max-message-bytes); it was ignored"
                    )
                if msg.type == WSMsgType.TEXT:
                    header, payload = protocol.parse_json(msg.data), None
                else:
                    header, payload = protocol.unpack(msg.data)
                if refused:
                    continue  # the client was told "busy"; it closes (or is closed)
                if live is None:
                    if header["t"] != "start":
                        raise InvalidArgumentError(f"send 'start' first (got '{header['t']}')")
                    try:
                        live = await manager.open(outbox.put_nowait, protocol.field_int(header, "seed", 0))
                    except Busy as exc:
                        outbox.put_nowait({"t": "busy", "message": str(exc)})
                        refused = True
                        continue
                    outbox.put_nowait({"t": "started", "session": live.sid, "seed": live.seed})
                    continue
                manager.handle(live, header, payload)
            except FlashDreamsError as exc:  # a malformed message, or a session that could not start
                outbox.put_nowait({"t": "error", "code": error_code(exc), "message": str(exc), "seq": None})
    finally:
        if live is not None and live.ended is None:
            await manager.end(live.sid, "client disconnected", tell=False)
        send_task.cancel()
        await ws.close()
        closed.set()
        manager.connections.discard(closed)
    return ws


def make_app(manager: SessionManager, token: str | None) -> web.Application:
    """The aiohttp application of one manager; `token` (or None on loopback) guards every route."""
    app = web.Application(middlewares=[_check_token], client_max_size=64 * 1024)
    app[MANAGER] = manager
    app[TOKEN] = token or ""
    app.router.add_get("/", _page)
    app.router.add_get("/app.js", _script)
    app.router.add_get("/api/info", _info)
    app.router.add_get("/ws", _socket)

    async def on_startup(app: web.Application) -> None:
        await manager.start()

    async def on_shutdown(app: web.Application) -> None:
        await manager.drain()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    return app


def page_url(host: str, port: int, token: str | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    if host in ("0.0.0.0", "::"):
        shown = "127.0.0.1"  # all interfaces: this machine's own loopback works for the person at it
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


async def serve(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start `app` on host:port (0: a free port); returns the runner and the port it listens on."""
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound: Any = runner.addresses[0]
    return runner, int(bound[1])


async def stop(runner: web.AppRunner) -> None:
    """Drain first (every client is told the server stops and its socket closes), then stop listening."""
    await runner.app[MANAGER].drain()
    await runner.cleanup()


class ServerThread:
    """A server on its own event-loop thread (tests, notebooks, an app embedding fd-serve)."""

    def __init__(self, manager: SessionManager, host: str = "127.0.0.1", port: int = 0, token: str | None = None):
        import threading

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fd-serve", daemon=True)
        self.thread.start()
        self.manager = manager
        self.token = token
        app = make_app(manager, token)
        self.runner, self.port = asyncio.run_coroutine_threadsafe(serve(app, host, port), self.loop).result(300)
        self.url = page_url(host, self.port, token)

    def stop(self) -> None:
        """Drain the sessions, close the sockets, stop the loop."""
        asyncio.run_coroutine_threadsafe(stop(self.runner), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
