"""fd-serve --ray: one worker per GPU as Ray Serve deployments, a gateway that pins each session to one.

Each worker is its own single-replica Ray Serve deployment (`fd-worker-<i>`, one GPU each) holding
one engine and a `SessionManager`, exactly as a plain fd-serve process does. The gateway is the
same aiohttp app (page, token, size limits) with a `RayHub` in place of the manager: it admits a
session on the least-loaded worker that has room (asking the next when one says busy), and from
then on routes every message of that session to that worker's deployment handle (sticky by
construction: the session's state lives in that replica) and relays the worker's frames back over
a streaming handle call. Ray places the replicas; there is no scheduler of ours. On shutdown the
gateway stops admitting, every worker drains (clients are told why), then Serve and Ray stop.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from dataclasses import dataclass, field
from typing import Any

from flashdreams.serve.manager import Busy, Limits, Live

log = logging.getLogger(__name__)


class Worker:
    """One engine on one GPU (a Ray Serve replica): the SessionManager of a plain fd-serve, driven
    through handle calls instead of sockets."""

    def __init__(self, args: dict[str, Any]) -> None:
        from flashdreams.cli.serve import build_manager

        self.manager = build_manager(argparse.Namespace(**args))
        self.queues: dict[str, asyncio.Queue] = {}
        self.lives: dict[str, Live] = {}
        self._started = False

    async def _ensure(self) -> None:
        if not self._started:
            self._started = True
            await self.manager.start()

    async def info(self) -> dict[str, Any]:
        await self._ensure()
        return self.manager.info()

    async def open(self, seed: int) -> dict[str, Any]:
        await self._ensure()
        q: asyncio.Queue = asyncio.Queue()
        try:
            live = await self.manager.open(q.put_nowait, seed)
        except Busy as exc:
            return {"t": "busy", "message": str(exc)}
        self.queues[live.sid], self.lives[live.sid] = q, live
        return {"t": "started", "session": live.sid, "seed": seed}

    async def messages(self, sid: str):
        """The session's outgoing messages (frames as bytes, the rest as dicts) until it ends."""
        q = self.queues.get(sid)
        if q is None:
            yield {"t": "ended", "reason": "unknown session"}
            return
        while True:
            item = await q.get()
            if item is None:
                return
            yield item
            if isinstance(item, dict) and item.get("t") == "ended":
                return

    async def send(self, sid: str, messages: list[tuple[dict, bytes | None]]) -> None:
        live = self.lives.get(sid)
        if live is None:
            return
        for header, payload in messages:
            self.manager.handle(live, header, payload)

    async def close(self, sid: str, reason: str | None = None) -> None:
        """End `sid`; with a reason its client is told (through `messages`), else it has gone."""
        await self.manager.end(sid, reason or "client disconnected", tell=reason is not None)
        self.lives.pop(sid, None)
        q = self.queues.pop(sid, None)
        if q is not None and reason is None:
            q.put_nowait(None)

    async def drain(self, reason: str = "the server is shutting down") -> int:
        n = len(self.manager.sessions)
        await self.manager.drain(reason)
        return n

    async def check_health(self) -> None:
        if self.manager.draining:
            return
        if self._started and self.manager._task is not None and self.manager._task.done():
            raise RuntimeError("the stepping loop stopped")


@dataclass
class _Route:
    live: Live
    worker: int
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    tasks: list[asyncio.Task] = field(default_factory=list)


class RayHub:
    """The gateway's stand-in for a SessionManager: admission over the workers, sticky routing, relays."""

    def __init__(self, handles: list, max_message_bytes: int | None = None) -> None:
        self.handles = handles
        self.limits = Limits(max_message_bytes=max_message_bytes or 0)
        self.connections: set[asyncio.Event] = set()
        self.routes: dict[str, _Route] = {}
        self.draining = False
        self.hellos: list[dict[str, Any]] = []

    @property
    def sessions(self) -> dict[str, Live]:
        return {sid: r.live for sid, r in self.routes.items()}

    async def start(self) -> None:
        self.hellos = list(await asyncio.gather(*(h.info.remote() for h in self.handles)))
        if not self.limits.max_message_bytes:
            self.limits = Limits(max_message_bytes=self.hellos[0]["max_message_bytes"])

    def info(self) -> dict[str, Any]:
        hello = dict(self.hellos[0])
        hello["sessions"] = len(self.routes)
        hello["max_sessions"] = sum(h["max_sessions"] for h in self.hellos)
        hello["workers"] = len(self.handles)
        return hello

    def load(self, i: int) -> int:
        return sum(1 for r in self.routes.values() if r.worker == i)

    async def open(self, send, seed: int) -> Live:
        if self.draining:
            raise Busy("the server is shutting down; try another server or later")
        for i in sorted(range(len(self.handles)), key=self.load):
            answer = await self.handles[i].open.remote(seed)
            if answer["t"] == "started":
                break
        else:
            raise Busy(f"busy: all {len(self.handles)} workers are full; try again later")
        live = Live(answer["session"], seed, send)
        route = _Route(live, i)
        self.routes[live.sid] = route
        route.tasks = [asyncio.create_task(self._relay(route)), asyncio.create_task(self._forward(route))]
        log.info("session %s on worker %d", live.sid, i)
        return live

    async def _relay(self, route: _Route) -> None:
        """The worker's messages for this session, to its client, in order."""
        stream = self.handles[route.worker].options(stream=True).messages.remote(route.live.sid)
        async for item in stream:
            if isinstance(item, dict) and item.get("t") == "ended":
                route.live.ended = item.get("reason", "ended")
                self.routes.pop(route.live.sid, None)
            route.live.send(item)
        route.tasks[1].cancel()  # the session ended: nothing more to forward

    async def _forward(self, route: _Route) -> None:
        """The client's messages, to the session's worker, in order; one call takes all that queued."""
        handle = self.handles[route.worker]
        while True:
            batch = [await route.inbox.get()]
            while not route.inbox.empty():
                batch.append(route.inbox.get_nowait())
            acks = [m for m in batch if m[0].get("t") == "ack"]
            batch = [m for m in batch if m[0].get("t") != "ack"] + acks[-1:]  # only the latest ack matters
            await handle.send.remote(route.live.sid, batch)

    def handle(self, live: Live, header: dict, payload: bytes | None = None) -> None:
        route = self.routes.get(live.sid)
        if route is not None:
            route.inbox.put_nowait((header, payload))

    async def end(self, sid: str, reason: str, tell: bool = True) -> None:
        route = self.routes.pop(sid, None)
        if route is None:
            return
        route.tasks[1].cancel()
        await self.handles[route.worker].close.remote(sid, reason if tell else None)
        if not tell:
            route.tasks[0].cancel()

    async def drain(self, reason: str = "the server is shutting down") -> None:
        if self.draining:
            return
        self.draining = True
        counts = await asyncio.gather(*(h.drain.remote(reason) for h in self.handles))
        log.info("drained %d sessions from %d workers", sum(counts), len(self.handles))
        if self.connections:
            await asyncio.wait([asyncio.ensure_future(e.wait()) for e in self.connections], timeout=3.0)
        for route in list(self.routes.values()):
            for t in route.tasks:
                t.cancel()


def deploy_workers(args: argparse.Namespace, n: int, gpus: bool) -> list:
    """n single-replica deployments (`fd-worker-0` ...), each with one GPU when `gpus`; their handles."""
    from ray import serve

    serve.start(proxy_location="Disabled")  # the gateway is the only front door
    worker_args = {k: v for k, v in vars(args).items() if k not in ("ray", "workers", "ray_address")}
    deployment = serve.deployment(
        Worker,
        num_replicas=1,
        max_ongoing_requests=10_000,  # every live session holds one streaming call open
        graceful_shutdown_timeout_s=10,
        health_check_period_s=10,
    )
    actor = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 0}
    apps = [deployment.options(name=f"fd-worker-{i}", ray_actor_options=actor).bind(worker_args) for i in range(n)]
    if hasattr(serve, "run_many"):  # the workers start (load their engines) side by side
        targets = [serve.RunTarget(app, name=f"fd-worker-{i}", route_prefix=None) for i, app in enumerate(apps)]
        return list(serve.run_many(targets))
    return [serve.run(app, name=f"fd-worker-{i}", route_prefix=None) for i, app in enumerate(apps)]


def start_ray(address: str | None, num_cpus: int | None = None) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(
            address=address,
            num_cpus=None if address else num_cpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )


def stop_ray() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def run_ray(args: argparse.Namespace, token: str | None) -> int:
    """fd-serve --ray: start (or join) Ray, deploy the workers, serve the gateway until a stop signal."""
    try:
        import ray
    except ImportError:
        from flashdreams.errors import NotFoundError

        raise NotFoundError("--ray needs Ray Serve: pip install 'flashdreams[serve]' (or 'ray[serve]')") from None
    start_ray(args.ray_address)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    n = args.workers or max(1, gpus)
    handles = deploy_workers(args, n, gpus > 0)
    try:
        asyncio.run(_gateway(args, token, handles))
    finally:
        stop_ray()
    return 0


async def _gateway(args: argparse.Namespace, token: str | None, handles: list) -> None:
    from flashdreams.serve.server import make_app, page_url, serve, stop

    hub = RayHub(handles, args.max_message_bytes)
    runner, port = await serve(make_app(hub, token), args.host, args.port)
    print(page_url(args.host, port, token), flush=True)
    print(f"fd-serve: {len(handles)} Ray Serve workers; Ctrl-C drains and stops", file=sys.stderr, flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    print("fd-serve: draining sessions and stopping", file=sys.stderr, flush=True)
    await stop(runner)
