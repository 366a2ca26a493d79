"""fd-run: play a streaming session and write the video (the first thing a new user runs)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from flashdreams.cli.options import add_load_options, check_load_args, flag_message, load_kwargs
from flashdreams.errors import FlashDreamsError, InvalidArgumentError, NotFoundError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fd-run",
        description=(
            "Play a streaming world-model session block by block and write the frames to a video. "
            "With no model options it plays the arena: the project's own small world model (trained by "
            "train/train_arena.py, shipped in the package), driven by a built-in key script that walks the "
            "agent around the arena (or by --actions FILE), in real time on a CPU. Options that only fit "
            "the Wan models (--prompt*, --text-encoder, --decoder NAME, --decoder-weights, --height/--width, "
            "--random-weights) select the built-in tiny causal Wan instead (random weights: structured "
            "noise). With --checkpoint it runs a real model (a .safetensors file or directory, or an engine "
            "directory made by fd-build)."
        ),
        epilog=(
            "examples:\n"
            "  fd-run                                   # the arena world, a loop around it -> flashdreams.mp4\n"
            '  fd-run --actions keys.json --seed 3      # your keys: [{"keys": ["d"]}, {"keys": ["w", "d"]}, ...]\n'
            "  fd-run --preset tiny                     # the tiny causal Wan (random weights)\n"
            "  fd-run --checkpoint self_forcing_dmd.safetensors --decoder-weights Wan2.1_VAE.safetensors \\\n"
            "         --prompt-embeds prompt.safetensors --blocks 7 --out city.mp4\n"
            "  fd-run --checkpoint ckpt.safetensors --text-encoder umt5-xxl/ --prompt 'a drive through a city' \\\n"
            "         --decoder taehv --decoder-weights taew2_1.safetensors --offload-text-encoder"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--list-presets", action="store_true", help="list presets and exit")
    p.add_argument(
        "--prompt-embeds",
        metavar="FILE",
        help=".safetensors with one tensor (or one named prompt_embeds) of shape [T, D] or [B, T, D]: "
        "umT5 output, D = 4096 for the Wan models (32 for the built-in tiny model)",
    )
    p.add_argument("--prompt", help="prompt text (needs --text-encoder)")
    p.add_argument("--text-encoder", help="directory of a transformers UMT5EncoderModel + tokenizer (umT5-XXL)")
    p.add_argument("--offload-text-encoder", action="store_true", help="free the text encoder after encoding")
    p.add_argument(
        "--blocks",
        type=int,
        help="blocks to generate (default: enough for the --actions script; 20 for the arena's loop, "
        "80 frames; 7 otherwise, 81 frames at nf 3)",
    )
    p.add_argument(
        "--actions",
        metavar="FILE",
        help="key script (Matrix-Game's format): a JSON list with one object per video frame, "
        'e.g. [{"keys": ["d"]}, {"keys": ["w", "d"]}, {"keys": []}]; key names are the model\'s keyboard '
        'labels (w, s, a, d); optional "mouse": [pitch, yaw] where the model takes a mouse input. '
        "Past the script's end its last frame holds (a shorter list repeats its last entry)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the session's noise (default 0)")
    p.add_argument(
        "--out",
        default="flashdreams.mp4",
        help="video file to write: .mp4, .mkv, .mov, .avi or .webm, in an existing folder (default flashdreams.mp4)",
    )
    p.add_argument("--fps", type=float, default=16.0, help="frame rate of the video, kept exactly (default 16)")
    p.add_argument("--save-latents", help="write every block's latents to this .safetensors (block_0, ...)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--record",
        metavar="LOG",
        help="record the seed and every input of this run to LOG (one .safetensors file) for --replay",
    )
    p.add_argument(
        "--replay",
        metavar="LOG",
        help="replay a recorded run (its seed and inputs, block by block) instead of --blocks/--seed/--prompt*: "
        "the same engine on the same machine gives the same frames, bit for bit",
    )
    add_load_options(p)
    return p


SEED_LIMIT = 2**63


def check_args(args: argparse.Namespace) -> dict[str, Any]:
    """Refuse, before anything is loaded, the numbers, output paths and files fd-run cannot use.

    Returns what it learnt on the way (the prompt file's tensor name and shape) for the checks
    that need the model (`check_prompt_shape`).
    """
    from flashdreams.video import check_video_path, check_writable

    found: dict[str, Any] = {}
    if args.blocks is not None and args.blocks < 1:
        raise InvalidArgumentError(f"--blocks must be at least 1, got {args.blocks}")
    if not (math.isfinite(args.fps) and args.fps > 0):
        raise InvalidArgumentError(f"--fps must be a positive number of frames per second, got {args.fps:g}")
    if not 0 <= args.seed < SEED_LIMIT:
        raise InvalidArgumentError(f"--seed must be in [0, 2**63), got {args.seed}")
    if args.prompt_embeds and args.prompt:
        raise InvalidArgumentError("give --prompt-embeds FILE or --prompt TEXT, not both")
    if args.prompt and not args.text_encoder:
        raise InvalidArgumentError("--prompt needs --text-encoder DIR (or give --prompt-embeds FILE)")
    if args.text_encoder and not Path(args.text_encoder).is_dir():
        raise NotFoundError(f"--text-encoder '{args.text_encoder}' is not a directory (a UMT5EncoderModel + tokenizer)")
    if args.decoder != "none":
        _flagged("--out", check_video_path, args.out)
    if args.save_latents:
        if Path(args.save_latents).suffix != ".safetensors":
            raise InvalidArgumentError(f"--save-latents '{args.save_latents}' must end in .safetensors")
        _flagged("--save-latents", check_writable, args.save_latents)
    if args.prompt_embeds:
        found["prompt"] = prompt_file_header(args.prompt_embeds)
    if args.record:
        if Path(args.record).suffix != ".safetensors":
            raise InvalidArgumentError(f"--record '{args.record}' must end in .safetensors")
        _flagged("--record", check_writable, args.record)
    if args.actions:
        if args.replay:
            raise InvalidArgumentError("--replay takes its inputs from the recording: drop --actions")
        found["actions"] = read_action_script(args.actions)
    if args.replay:
        if args.record or args.prompt or args.prompt_embeds:
            raise InvalidArgumentError("--replay takes its inputs from the recording: drop --record/--prompt*")
        if not Path(args.replay).is_file():
            raise NotFoundError(f"--replay '{args.replay}' does not exist (a file written by fd-run --record)")
    return found


ACTION_FIELDS = ("keys", "mouse")
MAX_ACTION_FRAMES = 1_000_000


def read_action_script(path: str) -> list[dict]:
    """A --actions file, checked whole (it exists, is JSON, a non-empty list of objects with a "keys" list of
    key-name strings and an optional "mouse" pair of finite numbers); the key names are checked against the
    model once it is loaded (`action_tensors`)."""
    import json

    p = Path(path)
    if not p.is_file():
        raise NotFoundError(
            f'--actions \'{path}\' does not exist (a JSON list of per-frame objects like {{"keys": ["d"]}})'
        )
    try:
        script = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidArgumentError(f"--actions '{path}' is not valid JSON ({exc})") from None
    if not isinstance(script, list) or not script:
        raise InvalidArgumentError(
            f"--actions '{path}' must hold a non-empty JSON list with one object per video frame, "
            f'like [{{"keys": ["d"]}}]; got {type(script).__name__ if script else "an empty list"}'
        )
    if len(script) > MAX_ACTION_FRAMES:
        raise InvalidArgumentError(f"--actions '{path}' has {len(script)} frames; at most {MAX_ACTION_FRAMES}")
    for i, item in enumerate(script):
        where = f"--actions '{path}' frame {i}"
        if not isinstance(item, dict):
            raise InvalidArgumentError(f'{where} must be an object like {{"keys": ["d"]}}, got {json.dumps(item)}')
        unknown = sorted(set(item) - set(ACTION_FIELDS))
        if unknown:
            raise InvalidArgumentError(f"{where} has unknown fields {unknown}; known: {list(ACTION_FIELDS)}")
        keys = item.get("keys", [])
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise InvalidArgumentError(f'{where}: "keys" must be a list of key names (strings), got {json.dumps(keys)}')
        if len(set(keys)) != len(keys):
            raise InvalidArgumentError(f'{where}: "keys" names a key twice: {json.dumps(keys)}')
        if "mouse" in item:
            m = item["mouse"]
            ok = isinstance(m, list) and len(m) == 2
            ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in m)
            if not ok:
                raise InvalidArgumentError(
                    f'{where}: "mouse" must be [pitch, yaw], two finite numbers; got {json.dumps(m)}'
                )
    return script


def _control(engine, units: str):
    """The engine's input of these units (keys, mouse) with per-frame rows [B, F, C], or None."""
    for spec in engine.input_specs():
        if spec.units == units and len(spec.shape) == 3 and spec.when == "block":
            return spec
    return None


def action_tensors(script: list[dict], engine, path: str) -> dict[str, Any]:
    """The script as per-frame tensors {input name: [T, C]}; refuses keys or mouse the model does not take."""
    import torch

    keys, mouse = _control(engine, "keys"), _control(engine, "mouse")
    if keys is None:
        raise InvalidArgumentError(
            f"--actions: {engine.preset_name} takes no keyboard input (it is not a world you steer)"
        )
    labels = list(keys.labels)
    out = {keys.name: torch.zeros(len(script), keys.shape[-1])}
    if mouse is not None:
        out[mouse.name] = torch.zeros(len(script), mouse.shape[-1])
    for i, item in enumerate(script):
        for k in item.get("keys", []):
            if k not in labels:
                raise InvalidArgumentError(
                    f"--actions '{path}' frame {i}: key '{k}' is not one of {engine.preset_name}'s keys {labels}"
                )
            out[keys.name][i, labels.index(k)] = 1.0
        if "mouse" in item:
            if mouse is None:
                raise InvalidArgumentError(
                    f"--actions '{path}' frame {i}: {engine.preset_name} takes no mouse input; drop \"mouse\""
                )
            row = out[mouse.name][i] = torch.tensor(item["mouse"], dtype=torch.float32)
            low = -math.inf if mouse.low is None else mouse.low
            high = math.inf if mouse.high is None else mouse.high
            if not bool(((row >= low) & (row <= high)).all()):
                raise InvalidArgumentError(
                    f"--actions '{path}' frame {i}: mouse {item['mouse']} outside [{mouse.low}, {mouse.high}]"
                )
    return out


LOOP_SIDE_FRAMES = 20  # frames per side of the built-in loop


def loop_script(engine, frames: int) -> dict[str, Any] | None:
    """The built-in script for a keyboard world with w/a/s/d: d, s, a, w for 20 frames each, round and round."""
    import torch

    keys = _control(engine, "keys")
    if keys is None or not {"w", "a", "s", "d"} <= set(keys.labels):
        return None
    labels = list(keys.labels)
    out = torch.zeros(frames, keys.shape[-1])
    for t in range(frames):
        out[t, labels.index("dsaw"[(t // LOOP_SIDE_FRAMES) % 4])] = 1.0
    return {keys.name: out}


def _flagged(flag: str, check, value) -> None:
    try:
        check(value)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"{flag}: {exc}") from None


def prompt_file_header(path: str) -> tuple[str, list[int]]:
    """(tensor name, shape) of a --prompt-embeds file, read from its header only; refuses what cannot be a prompt."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise NotFoundError(f"--prompt-embeds '{path}' does not exist")
    try:
        with safe_open(str(p), framework="pt") as f:
            names = list(f.keys())
            name = "prompt_embeds" if "prompt_embeds" in names else (names[0] if len(names) == 1 else None)
            if name is None:
                raise InvalidArgumentError(
                    f"--prompt-embeds '{path}' holds {len(names)} tensors; keep one, or name it 'prompt_embeds'"
                )
            sl = f.get_slice(name)
            shape, dtype = list(sl.get_shape()), sl.get_dtype()
    except InvalidArgumentError:
        raise
    except Exception as exc:  # safetensors raises its own error types for a file that is not one
        raise InvalidArgumentError(
            f"--prompt-embeds '{path}' is not a readable safetensors file ({exc}); "
            "write it with safetensors.torch.save_file({'prompt_embeds': tensor}, path)"
        ) from None
    if len(shape) not in (2, 3) or not all(shape) or dtype not in ("F16", "BF16", "F32", "F64"):
        raise InvalidArgumentError(
            f"--prompt-embeds '{path}': tensor '{name}' is {dtype} {shape}; "
            "expected floats of shape [T, D] or [B, T, D]"
        )
    return name, shape


def check_prompt_shape(path: str, name: str, shape: list[int], engine) -> None:
    """Refuse a prompt whose width, length or batch the loaded model cannot take (before any block)."""
    specs = {s.name: s for s in engine.input_specs()}
    spec = specs.get("prompt_embeds")
    if spec is None:
        raise InvalidArgumentError(
            f"--prompt-embeds: {engine.preset_name} takes no prompt_embeds input (its inputs: {', '.join(specs)})"
        )
    batch, text_len, width = spec.shape[0], spec.shape[-2], spec.shape[-1]
    b = shape[0] if len(shape) == 3 else batch
    if shape[-1] != width or shape[-2] > text_len or b != batch:
        raise InvalidArgumentError(
            f"--prompt-embeds '{path}': tensor '{name}' has shape {shape}; {engine.preset_name} takes "
            f"[T, {width}] or [{batch}, T, {width}] with T <= {text_len} (its text width is {width})"
        )


def _prompt(args, engine, found: dict[str, Any]):
    if args.prompt_embeds:
        from safetensors import safe_open

        name, shape = found["prompt"]
        check_prompt_shape(args.prompt_embeds, name, shape, engine)
        with safe_open(args.prompt_embeds, framework="pt") as f:
            return f.get_tensor(name).float()
    if args.prompt:
        from flashdreams.models.text_encoder import TextEncoder

        spec = {s.name: s for s in engine.input_specs()}.get("prompt_embeds")
        if spec is None:
            raise InvalidArgumentError(f"--prompt: {engine.preset_name} takes no prompt_embeds input")
        enc = TextEncoder.from_dir(args.text_encoder, device=engine.device, text_len=spec.shape[-2])
        embeds = enc.encode(args.prompt)
        if args.offload_text_encoder:
            enc.offload()
            del enc
        return embeds
    if engine.stand_in_inputs:
        return None  # the session draws the seeded stand-in prompt
    raise InvalidArgumentError("a real model needs a prompt: --prompt-embeds FILE or --prompt TEXT --text-encoder DIR")


class _Stopped(BaseException):
    """Raised in the main thread by SIGTERM / SIGHUP, like KeyboardInterrupt for SIGINT."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


@contextlib.contextmanager
def _stop_signals():
    """While fd-run works, SIGTERM and SIGHUP raise `_Stopped` (SIGINT raises KeyboardInterrupt) so the
    partial outputs are removed; after the first, further stop signals are ignored until cleanup ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    watched = (*STOP_SIGNALS, signal.SIGINT)

    def stop(signum, _frame):
        for s in watched:
            signal.signal(s, signal.SIG_IGN)
        raise KeyboardInterrupt if signum == signal.SIGINT else _Stopped(signum)

    old = {s: signal.getsignal(s) for s in watched}
    for s in watched:
        signal.signal(s, stop)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class _Outputs:
    """The files a run is writing; each is written beside its target and renamed into place at the end."""

    def __init__(self) -> None:
        self.writer = None
        self.latents_tmp: Path | None = None

    def discard(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        if self.latents_tmp is not None:
            self.latents_tmp.unlink(missing_ok=True)
            self.latents_tmp = None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import flashdreams

    if args.list_presets:
        for name in flashdreams.preset_names():
            print(f"{name:28s} {flashdreams.get_preset(name).description}")
        return 0
    outputs = _Outputs()
    with _stop_signals():
        try:
            return _run(args, outputs)
        except FlashDreamsError as exc:
            outputs.discard()
            print(f"fd-run: {flag_message(str(exc), parser)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            outputs.discard()
            print("fd-run: interrupted; no video written", file=sys.stderr)
            return 130
        except _Stopped as exc:
            outputs.discard()
            print(f"fd-run: stopped by {signal.Signals(exc.signum).name}; no video written", file=sys.stderr)
            return 128 + exc.signum
        except BaseException:
            outputs.discard()
            raise


def _run(args: argparse.Namespace, outputs: _Outputs) -> int:
    import flashdreams
    from flashdreams.video import VideoWriter

    found = check_args(args)
    kw = load_kwargs(args)
    if plays_default_world(args):
        from flashdreams.presets import DEFAULT_WORLD

        kw["preset"] = DEFAULT_WORLD
    check_load_args(kw)
    t0 = time.perf_counter()
    engine = flashdreams.load(**kw)
    if args.replay:
        from flashdreams.recording import Recording, replay

        recording = Recording.load(args.replay)
        args.blocks = recording.num_steps
        steps = replay(recording, engine)
    else:
        controls, args.blocks = _controls(args, engine, found)
        session = engine.session(_prompt(args, engine, found), seed=args.seed)
        if args.record:
            session.start_recording()
        steps = (_step_with(session, controls, k) for k in range(args.blocks))
    print(f"fd-run: {engine} loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if engine.decoder is not None:
        outputs.writer = VideoWriter(args.out, fps=args.fps)
    latents = {}
    bar = _progress(args.blocks, disable=args.no_progress)
    frames_total, t_start = 0, time.perf_counter()
    for k in range(args.blocks):
        tb = time.perf_counter()
        result = next(steps)
        if outputs.writer is not None:
            frames = result.frames_cpu()[0]
            outputs.writer.write(frames)
            frames_total += frames.shape[0]
        if args.save_latents:
            latents[f"block_{k}"] = result.latents.float().cpu().contiguous()
        else:
            result.latents.cpu()  # the block is done before its time is reported
        dt = time.perf_counter() - tb
        fps = frames_total / (time.perf_counter() - t_start) if frames_total else 0.0
        bar.set_postfix_str(f"block {dt * 1e3:.0f} ms, {fps:.1f} fps")
        bar.update(1)
    bar.close()
    if args.save_latents:
        from safetensors.torch import save_file

        target = Path(args.save_latents)
        outputs.latents_tmp = target.with_name(f".{target.name}.partial-{os.getpid()}.safetensors")
        save_file(latents, str(outputs.latents_tmp))
    if outputs.writer is not None:
        path = outputs.writer.close()
        outputs.writer = None
        rate = f"{args.fps:g}"
        print(f"wrote {path}: {frames_total} frames, {engine.spec.height}x{engine.spec.width} at {rate} fps")
    else:
        print("no decoder: no video written (latents only)")
    if outputs.latents_tmp is not None:
        os.replace(outputs.latents_tmp, args.save_latents)
        outputs.latents_tmp = None
        print(f"wrote {args.save_latents}: {len(latents)} blocks of latents")
    if args.record:
        session.save_recording(args.record)
        print(f"wrote {args.record}: the seed and inputs of {args.blocks} blocks (fd-run --replay {args.record})")
    return 0


def plays_default_world(args: argparse.Namespace) -> bool:
    """No option picks a model: fd-run plays the default world (the arena). The options that only fit the Wan
    models (prompts, decoders, resolutions, random full-size weights) keep the tiny causal Wan as before."""
    wan_only = args.prompt or args.prompt_embeds or args.text_encoder or args.decoder_weights or args.random_weights
    sized = args.height is not None or args.width is not None
    return not (args.checkpoint or args.preset or wan_only or sized or args.decoder not in ("preset", "none"))


def _controls(args: argparse.Namespace, engine, found: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Per-frame control tensors ({input: [T, C]}) from --actions or the built-in loop, and the block count."""
    if args.actions:
        controls = action_tensors(found["actions"], engine, args.actions)
    else:
        loop = loop_script(engine, 1)
        rows = _control(engine, "keys").shape[1] if loop else 1
        blocks = args.blocks or (script_blocks(engine.plan, rows, 4 * LOOP_SIDE_FRAMES) if loop else 7)
        return (loop_script(engine, blocks * rows) or {}), blocks
    rows = _control(engine, "keys").shape[1]
    frames = next(iter(controls.values())).shape[0]
    return controls, args.blocks or script_blocks(engine.plan, rows, frames)


def block_frames(plan, rows: int, k: int) -> tuple[int, int, int]:
    """(start, count, lead): block k's video frames in a per-frame script.

    A plan may cover fewer video frames in its first block (meta "action_rows_first_block": Matrix-Game's
    block 0 makes frames 0..8 from rows 3..11 of its 12 action rows). Those frames fill the block's last
    rows; the `lead` rows before them stand before the video (the model ignores them) and repeat the first.
    """
    first = plan.meta.get("action_rows_first_block", rows)
    return (0, first, rows - first) if k == 0 else (first + (k - 1) * rows, rows, 0)


def script_blocks(plan, rows: int, frames: int) -> int:
    """Blocks that play a script of `frames` video frames to its end."""
    first = plan.meta.get("action_rows_first_block", rows)
    return 1 + math.ceil(max(0, frames - first) / rows)


def _step_with(session, controls: dict[str, Any], k: int):
    """Block k with its rows of each control; past the script's end its last frame holds."""
    import torch

    for name, per_frame in controls.items():
        spec = session.plan.inputs[name]
        rows = spec.shape[1]
        start, count, lead = block_frames(session.plan, rows, k)
        idx = torch.arange(start, start + count).clamp(max=per_frame.shape[0] - 1)
        chunk = per_frame[idx]
        if lead:
            chunk = torch.cat([chunk[:1].expand(lead, *chunk.shape[1:]), chunk])
        session.set_input(name, chunk[None].expand(spec.shape[0], *chunk.shape))
    return session.step()


def _progress(total: int, disable: bool):
    try:
        from tqdm import tqdm

        return tqdm(total=total, unit="block", disable=disable, file=sys.stderr)
    except ImportError:  # tqdm is a dependency, but keep fd-run working without it

        class _Quiet:
            def set_postfix_str(self, _s):
                pass

            def update(self, _n):
                pass

            def close(self):
                pass

        return _Quiet()


if __name__ == "__main__":
    sys.exit(main())
