"""fd-serve: play a world model in the browser, many sessions per engine, Ray Serve scale-out.

`protocol` is the wire format (docs/PROTOCOL.md), `stepper` advances the live sessions of one
engine a block at a time, `manager` admits, steps and ends sessions (admission from measured
memory per session, idle timeouts, per-session isolation), `server` is the aiohttp app (the
page, the WebSocket, the access token) and `ray_app` deploys one worker per GPU on Ray Serve.
"""

from __future__ import annotations

from typing import Any


def start_server(
    preset: str | None = None, host: str = "127.0.0.1", port: int = 0, token: str | None = None, **options: Any
):
    """What `fd-serve` runs, on a background thread: returns a `ServerThread` (`.url`, `.stop()`).

    `options` are fd-serve's flags as keyword arguments (`max_sessions=4`, `device="cpu"`,
    `checkpoint=...`); the preset defaults to the default world, as `fd-serve` does.
    """
    from flashdreams.cli.serve import build_manager, build_parser, default_world
    from flashdreams.serve.server import ServerThread, access_token

    args = build_parser().parse_args([])
    for key, value in options.items():
        if not hasattr(args, key):
            raise TypeError(f"start_server: unknown option {key!r} (fd-serve --help lists them)")
        setattr(args, key, value)
    args.preset = preset or (None if args.checkpoint else default_world())
    return ServerThread(build_manager(args), host, port, access_token(host, token))
