"""fd-serve: play a world model in the browser; many sessions on one engine; Ray Serve scale-out."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import signal
import sys

from flashdreams.cli.options import add_load_options, check_load_args, flag_message, load_kwargs
from flashdreams.errors import FlashDreamsError, InvalidArgumentError


def default_world() -> str:
    """The preset fd-serve plays with no --preset/--checkpoint: the project's default world, else tiny."""
    import flashdreams.presets as presets

    name = getattr(presets, "DEFAULT_WORLD", None)
    return name if isinstance(name, str) and name in presets.preset_names() else "tiny"


DEFAULT_BATCHED_CAPACITY = 64  # batch rows for sessions stepped together, without --max-sessions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fd-serve",
        description=(
            "Serve a world model to browsers and Python clients. The first line printed is the page's URL: "
            "open it, press start, and drive the world with the controls its inputs call for (keys, "
            "pointer-lock mouse, a prompt box, ...). Each browser tab or client connection gets its own "
            "session; sessions of one engine are stepped in turn on one worker thread, admitted while the "
            "memory one session was measured to take still fits. With no arguments it serves the default "
            "world on 127.0.0.1. Wire protocol: docs/PROTOCOL.md; Python client: flashdreams.client."
        ),
        epilog=(
            "examples:\n"
            "  fd-serve                                  # default world on http://127.0.0.1:8000/\n"
            "  fd-serve --preset tiny --port 0           # any free port\n"
            "  fd-serve --host 0.0.0.0                   # reachable from others: a token is generated and printed\n"
            "  fd-serve --checkpoint engine_dir/ --max-sessions 8\n"
            "  fd-serve --preset omnidreams-sv-tiny --drive demo   # steer a car: the HD map follows it\n"
            "  fd-serve --ray --workers 2                # one Ray Serve worker per GPU, sticky sessions\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    net = p.add_argument_group("network and security")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    net.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    net.add_argument(
        "--token",
        help="access token every request must carry (?token= or 'Authorization: Bearer'); required off "
        "loopback, where one is generated and printed in the URL when not given",
    )
    net.add_argument(
        "--max-message-bytes",
        type=int,
        metavar="N",
        help="largest client message; bigger ones get an error (default: twice the largest input, >= 256 KiB)",
    )
    ses = p.add_argument_group("sessions")
    ses.add_argument("--max-sessions", type=int, metavar="N", help="cap on live sessions (default: memory decides)")
    ses.add_argument(
        "--memory-budget",
        metavar="GiB",
        type=float,
        help="memory for sessions (default: the GPU's free memory less a reserve; half the host's on a CPU)",
    )
    ses.add_argument(
        "--spare-sessions",
        type=int,
        metavar="N",
        help="closed sessions kept (with their memory and captured CUDA graphs) for the next players, so a "
        "new player's first blocks replay at steady speed instead of running eagerly and capturing while "
        "everyone else waits; the first one is warmed up at start (default: every closed one, within "
        "--max-sessions and the memory budget; 0 frees each closed session's memory at once)",
    )
    ses.add_argument(
        "--min-fps",
        type=float,
        default=0.0,
        metavar="F",
        help="refuse a session that would bring every session's measured pace under F frames/s (default 0: off)",
    )
    ses.add_argument(
        "--idle-timeout", type=float, default=600.0, metavar="S", help="end a session with no input for S s (600)"
    )
    ses.add_argument(
        "--window",
        type=float,
        default=1.0,
        metavar="BLOCKS",
        help="blocks a session may run ahead of the frames its client presented (default 1: lowest latency "
        "that keeps the video flowing)",
    )
    ses.add_argument(
        "--save-limit-mb",
        type=float,
        default=2048.0,
        metavar="MB",
        help='largest world a client may save ("save" keeps one snapshot per session in host memory; "load" goes '
        "back to it): default 2048 MiB, 0 turns saving off (Self-Forcing 1.3B's is ~5.7 GiB, the arena's < 1 MiB)",
    )
    ses.add_argument(
        "--saves-budget-mb",
        type=float,
        default=None,
        metavar="MB",
        help="host memory all sessions' saved worlds may take together; a save past it is refused "
        "(out_of_memory) until others end (default: a quarter of the host's available memory at start)",
    )
    ses.add_argument(
        "--encoding", default="auto", choices=("auto", "jpeg", "png", "raw"), help="frame codec (auto: JPEG)"
    )
    ses.add_argument("--jpeg-quality", type=int, default=85, metavar="Q", help="JPEG quality 1-95 (85)")
    ses.add_argument(
        "--batching",
        choices=("auto", "on", "off"),
        default="auto",
        help="on: the sessions of a row-independent model (such as the arena) step together, one forward pass "
        "per round for all; off: in turn, one forward pass each; auto (default): on with a GPU, off on a CPU "
        "(a CPU forward costs in proportion to its batch, so a batch gains nothing there, and sessions that "
        "are not due would still ride along)",
    )
    ses.add_argument(
        "--drive",
        choices=("demo",),
        help="OmniDreams: each session drives a car on the demo road, steered from the page (steer, throttle); "
        "the HD map the model takes is rendered along the car's path every block",
    )
    ses.add_argument(
        "--text-encoder", metavar="DIR", help="umT5 encoder directory: enables the page's prompt box (else stand-ins)"
    )
    ses.add_argument(
        "--prompt-embeds",
        metavar="FILE",
        help="every session's starting prompt: .safetensors with one [T, D] or [B, T, D] tensor (a real model "
        "needs a prompt; the built-in ones draw a seeded stand-in)",
    )
    ses.add_argument("--prompt", help="every session's starting prompt as text (needs --text-encoder)")
    ray = p.add_argument_group("scale-out")
    ray.add_argument(
        "--ray",
        action="store_true",
        help="deploy one worker per GPU as Ray Serve deployments (sticky sessions, draining on shutdown)",
    )
    ray.add_argument(
        "--workers", type=int, metavar="N", help="with --ray: workers (default: the cluster's GPUs, or 1 without)"
    )
    ray.add_argument("--ray-address", metavar="ADDR", help="with --ray: an existing cluster (default: start one)")
    p.add_argument("--list-presets", action="store_true", help="list presets and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the server does (to stderr)")
    add_load_options(p)
    return p


def check_args(args: argparse.Namespace) -> None:
    """Refuse numbers fd-serve cannot use, before a model is loaded."""
    if not 0 <= args.port <= 65535:
        raise InvalidArgumentError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_sessions is not None and args.max_sessions < 1:
        raise InvalidArgumentError(f"--max-sessions must be at least 1, got {args.max_sessions}")
    if args.spare_sessions is not None and args.spare_sessions < 0:
        raise InvalidArgumentError(f"--spare-sessions must be >= 0 (0: none kept), got {args.spare_sessions}")
    if args.memory_budget is not None and not args.memory_budget > 0:
        raise InvalidArgumentError(f"--memory-budget must be a positive number of GiB, got {args.memory_budget}")
    if not args.min_fps >= 0:
        raise InvalidArgumentError(f"--min-fps must be >= 0 frames per second, got {args.min_fps}")
    if not args.idle_timeout > 0:
        raise InvalidArgumentError(f"--idle-timeout must be positive seconds, got {args.idle_timeout}")
    if not (math.isfinite(args.save_limit_mb) and args.save_limit_mb >= 0):
        raise InvalidArgumentError(f"--save-limit-mb must be >= 0 MiB (0: no saving), got {args.save_limit_mb}")
    if args.saves_budget_mb is not None and not (math.isfinite(args.saves_budget_mb) and args.saves_budget_mb >= 0):
        raise InvalidArgumentError(f"--saves-budget-mb must be >= 0 MiB, got {args.saves_budget_mb}")
    if not args.window > 0:
        raise InvalidArgumentError(f"--window must be a positive number of blocks, got {args.window}")
    if not 1 <= args.jpeg_quality <= 95:
        raise InvalidArgumentError(f"--jpeg-quality must be in [1, 95], got {args.jpeg_quality}")
    if args.max_message_bytes is not None and args.max_message_bytes < 1024:
        raise InvalidArgumentError(f"--max-message-bytes must be at least 1024, got {args.max_message_bytes}")
    if args.workers is not None and not args.ray:
        raise InvalidArgumentError("--workers needs --ray (one process serves one engine)")
    if args.workers is not None and args.workers < 1:
        raise InvalidArgumentError(f"--workers must be at least 1, got {args.workers}")
    if args.prompt and args.prompt_embeds:
        raise InvalidArgumentError("give --prompt-embeds FILE or --prompt TEXT, not both")
    if args.prompt and not args.text_encoder:
        raise InvalidArgumentError("--prompt needs --text-encoder DIR (or pass --prompt-embeds FILE)")
    if args.prompt_embeds:
        from flashdreams.cli.run import prompt_file_header

        prompt_file_header(args.prompt_embeds)  # exists, readable, prompt-shaped: before a model loads
    if args.decoder == "none":
        raise InvalidArgumentError("fd-serve shows frames: --decoder none leaves it nothing to show")


def build_manager(args: argparse.Namespace, engine=None):
    """A SessionManager for parsed `args` (loads the engine unless given)."""
    import flashdreams
    from flashdreams.serve.manager import Limits, SessionManager
    from flashdreams.serve.protocol import FrameCodec
    from flashdreams.serve.stepper import SessionStepper

    if engine is None:
        engine = flashdreams.load(**load_kwargs(args))
    if not engine.makes_frames:
        raise InvalidArgumentError(f"{engine.preset_name} has no decoder here: fd-serve needs frames to show")
    text_encoder = None
    if args.text_encoder:
        from flashdreams.models.text_encoder import TextEncoder

        spec = {s.name: s for s in engine.input_specs()}.get("prompt_embeds")
        if spec is None:
            raise InvalidArgumentError(f"--text-encoder: {engine.preset_name} takes no prompt_embeds input")
        text_encoder = TextEncoder.from_dir(args.text_encoder, device=engine.device, text_len=spec.shape[-2])
    defaults = session_defaults(args, engine, text_encoder)
    largest = max((s.torch_dtype().itemsize * _numel(s.shape) for s in engine.input_specs()), default=0)
    batched = batches(args.batching, engine)
    # Batched sessions are rows of one batch of fixed capacity: admission stops there even if memory would
    # hold more (the capacity is --max-sessions, else DEFAULT_BATCHED_CAPACITY).
    cap = args.max_sessions or (DEFAULT_BATCHED_CAPACITY if batched else None)
    limits = Limits(
        max_sessions=cap,
        memory_budget=None if args.memory_budget is None else int(args.memory_budget * 2**30),
        idle_timeout_s=args.idle_timeout,
        min_fps=args.min_fps,
        window_blocks=args.window,
        max_message_bytes=args.max_message_bytes or max(256 * 1024, 2 * largest + 16 * 1024),
        save_limit_bytes=int(args.save_limit_mb * 2**20),
        saves_budget_bytes=None if args.saves_budget_mb is None else int(args.saves_budget_mb * 2**20),
    )
    codec = FrameCodec.choose(args.encoding, args.jpeg_quality)
    if batched:
        # Every world of a row-independent model can sit at its own block: all due sessions step as
        # one batch (one forward pass per round).
        from flashdreams.serve.worlds_stepper import WorldsStepper

        stepper = WorldsStepper(engine, cap, defaults)
    else:
        stepper = SessionStepper(engine, defaults, spares=args.spare_sessions)
    if args.drive:
        from flashdreams.serve.drive import DriveStepper

        stepper = DriveStepper(stepper)
    return SessionManager(stepper, limits, codec, text_encoder)


def batches(choice: str, engine) -> bool:
    """Whether fd-serve steps its sessions as one batch (--batching); refuses `on` for a lockstep model."""
    if choice == "on" and not engine.plan.row_independent:
        raise InvalidArgumentError(
            f"--batching on: {engine.preset_name} steps all rows of a batch at one block index, so its sessions "
            "cannot share a batch; use --batching off or auto"
        )
    if choice == "auto":
        return engine.plan.row_independent and engine.device.type == "cuda"
    return choice == "on"


def session_defaults(args: argparse.Namespace, engine, text_encoder) -> dict:
    """The inputs every new session starts with (--prompt-embeds / --prompt), checked against the model."""
    from flashdreams.cli.run import check_prompt_shape, prompt_file_header

    if args.prompt_embeds:
        from safetensors import safe_open

        name, shape = prompt_file_header(args.prompt_embeds)
        check_prompt_shape(args.prompt_embeds, name, shape, engine)
        with safe_open(args.prompt_embeds, framework="pt") as f:
            return {"prompt_embeds": f.get_tensor(name).float()}
    if args.prompt:
        return {"prompt_embeds": text_encoder.encode(args.prompt)}
    return {}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


async def _serve(args: argparse.Namespace, token: str | None) -> None:
    from flashdreams.serve.server import make_app, page_url, serve, stop

    manager = build_manager(args)
    app = make_app(manager, token)
    runner, port = await serve(app, args.host, args.port)
    print(page_url(args.host, port, token), flush=True)
    print(
        f"fd-serve: {manager.engine.preset_name} on {manager.engine.device}, {manager.max_sessions} sessions "
        f"({manager.per_session_bytes / 2**20:.1f} MiB each); Ctrl-C stops",
        file=sys.stderr,
        flush=True,
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread / not a Unix loop
            loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    print("fd-serve: draining sessions and stopping", file=sys.stderr, flush=True)
    await stop(runner)  # every client is told the server stops


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.list_presets:
            import flashdreams

            for name in flashdreams.preset_names():
                print(f"{name:28s} {flashdreams.get_preset(name).description}")
            return 0
        check_args(args)
        if args.preset is None and args.checkpoint is None:
            args.preset = default_world()
        check_load_args(load_kwargs(args))
        from flashdreams.serve.server import access_token

        token = access_token(args.host, args.token)
        if args.ray:
            from flashdreams.serve.ray_app import run_ray

            return run_ray(args, token)
        asyncio.run(_serve(args, token))
        return 0
    except FlashDreamsError as exc:
        print(f"fd-serve: {flag_message(str(exc), parser)}", file=sys.stderr)
        return 2
    except OSError as exc:  # the port is taken, the address is not ours
        print(f"fd-serve: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
