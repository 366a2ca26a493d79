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

from flashdreams.cli.feeds import (
    Feeds,
    action_tensors,
    camera_feed,
    drive_feed,
    image_input,
    key_controls,
    read_action_script,
    read_image,
)
from flashdreams.cli.options import add_load_options, check_load_args, flag_message, is_engine_dir, load_kwargs
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
            "         --decoder taehv --decoder-weights taew2_1.safetensors --offload-text-encoder\n"
            "  fd-run --preset flashvsr --checkpoint FlashVSR/ --prompt-embeds posi_prompt.safetensors \\\n"
            "         --input low_res.mp4 --out upscaled.mp4      # video super-resolution\n"
            "  fd-run --upscale flashvsr-tiny --out upscaled.mp4   # the default world, upscaled as it streams"
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
    p.add_argument(
        "--image",
        metavar="FILE",
        help="start image (PNG/JPEG) of an image-to-video world (Matrix-Game, LingBot-World): centre-cropped to "
        "the video's aspect and resized; without it a seeded stand-in image is used",
    )
    p.add_argument(
        "--camera",
        metavar="FILE",
        help='camera path of a camera-controlled world (LingBot-World): JSON {"moves": ["forward 2 m", '
        '"yaw 30 deg", ...]} or {"poses": [[4x4 camera-to-world, OpenCV axes], ...] one per video frame}, '
        'optional "intrinsics": [fx, fy, cx, cy] with "intrinsics_hw": [H, W], optional "world_scale"; '
        "default: a built-in orbit",
    )
    p.add_argument(
        "--drive",
        choices=("demo",),
        help="OmniDreams: drive the scripted demo route; its HD map, rendered on the device chunk by chunk, is "
        "the session's hdmap_video input (a simulator passes its own rendered HD map through the API instead)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the session's noise (default 0)")
    p.add_argument(
        "--out",
        default="flashdreams.mp4",
        help="video file to write: .mp4, .mkv, .mov, .avi or .webm, in an existing folder (default flashdreams.mp4)",
    )
    p.add_argument(
        "--fps",
        type=float,
        default=None,
        help="frame rate of the video, kept exactly (default: the model's own, e.g. 16 for the Wan models and the "
        "arena, 30 for OmniDreams; with --input, the input video's)",
    )
    p.add_argument(
        "--input",
        metavar="VIDEO",
        help="a video whose frames stream into the model's frame input (FlashVSR: the low-resolution frames), "
        "read with PyAV block by block; the whole video is processed (--blocks is ignored)",
    )
    p.add_argument(
        "--upscale",
        metavar="PRESET",
        help="stream this model's frames through a super-resolution preset as they are made (e.g. flashvsr); "
        "the video holds the upscaled frames",
    )
    p.add_argument("--upscale-checkpoint", metavar="DIR", help="weights of the --upscale model (its release directory)")
    p.add_argument("--save-latents", help="write every block's latents to this .safetensors (block_0, ...)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--record",
        metavar="LOG",
        help="record the seed and every input of this run to LOG (one .safetensors file) for --replay",
    )
    p.add_argument(
        "--save-state",
        metavar="FILE",
        help="after the last block, write the world's state (KV cache, decoder caches, inputs, block index, seed) "
        "to FILE (.safetensors) for --resume",
    )
    p.add_argument(
        "--resume",
        metavar="FILE",
        help="continue the world saved by --save-state (with its own seed and inputs; --seed is not used) for "
        "--blocks more blocks; a prompt, key script, camera path or drive given here applies from its first block",
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
    if args.fps is not None and not (math.isfinite(args.fps) and args.fps > 0):
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
    if args.input:
        if not Path(args.input).is_file():
            raise NotFoundError(f"--input '{args.input}' does not exist (a video file)")
        if args.replay or args.record or args.upscale or args.actions:
            raise InvalidArgumentError(
                "--input streams a video through one model: drop --replay/--record/--upscale/--actions"
            )
    if args.upscale_checkpoint and not args.upscale:
        raise InvalidArgumentError("--upscale-checkpoint needs --upscale PRESET")
    if args.upscale and args.decoder == "none":
        raise InvalidArgumentError("--upscale needs the model's frames: drop --decoder none")
    if args.actions:
        if args.replay:
            raise InvalidArgumentError("--replay takes its inputs from the recording: drop --actions")
        found["actions"] = read_action_script(args.actions)
    if args.image:
        read_image(args.image)  # exists and is an image: before a model loads
    if args.camera and not Path(args.camera).is_file():
        raise NotFoundError(f"--camera '{args.camera}' does not exist (a JSON camera path; see --help)")
    if (args.image or args.camera or args.drive) and (args.replay or args.input):
        raise InvalidArgumentError("--image/--camera/--drive feed a new session: drop --replay/--input")
    if args.save_state:
        if Path(args.save_state).suffix != ".safetensors":
            raise InvalidArgumentError(f"--save-state '{args.save_state}' must end in .safetensors")
        _flagged("--save-state", check_writable, args.save_state)
    if args.resume and not Path(args.resume).is_file():
        raise NotFoundError(f"--resume '{args.resume}' does not exist (a file written by fd-run --save-state)")
    if (args.save_state or args.resume) and (args.replay or args.input):
        raise InvalidArgumentError("--save-state/--resume run a world of their own: drop --replay/--input")
    if args.resume and args.image:
        raise InvalidArgumentError("--image starts a new world; the --resume world has its start: drop --image")
    if args.resume and args.record:
        raise InvalidArgumentError("--record starts a world at block 0 (a replay starts there): drop --resume")
    if args.replay:
        if args.record or args.prompt or args.prompt_embeds:
            raise InvalidArgumentError("--replay takes its inputs from the recording: drop --record/--prompt*")
        if not Path(args.replay).is_file():
            raise NotFoundError(f"--replay '{args.replay}' does not exist (a file written by fd-run --record)")
    return found


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


def _resumed_session(args, engine, found: dict[str, Any], feeds: Feeds):
    """A session in the state --resume saved (its seed, inputs, caches and block index); this run's prompt, when
    one is given, and its feeds' first inputs on top."""
    from flashdreams.snapshot import Snapshot, check_model

    snap = Snapshot.load(args.resume, device=engine.device)
    check_model(snap, engine, f"--resume '{args.resume}'")
    held = {n: snap.tensors[n] for n in snap.given}  # a session needs its required inputs to exist
    session = engine.session(inputs=held, seed=snap.seed)
    session.restore(snap)
    if args.prompt or args.prompt_embeds:
        session.set_prompt(_prompt(args, engine, found))
    for name, value in feeds.start_inputs().items():
        session.set_input(name, value)
    feeds.first_block = session.block
    return session


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
    if found.get("actions") is not None:
        found["controls"] = _check_actions_before_load(found["actions"], args.actions, kw)
    if args.input:
        from flashdreams.video import video_size

        _size_to_frames(kw, video_size(args.input), "--input")
    t0 = time.perf_counter()
    engine = flashdreams.load(**kw)
    if args.input:
        return _run_input(args, engine, outputs, found, t0)
    upscaler = _upscaler(args, kw, engine) if args.upscale else None
    if args.fps is None:
        args.fps = float(engine.plan.meta.get("fps", 16.0))  # the model's own pace (OmniDreams 30, the arena 16)
    if args.replay:
        from flashdreams.recording import Recording, replay

        recording = Recording.load(args.replay)
        args.blocks = recording.num_steps
        steps = replay(recording, engine)
    else:
        feeds = _feeds(args, engine, found)
        if args.resume:
            session = _resumed_session(args, engine, found, feeds)
        else:
            start = feeds.start_inputs()
            if args.image:
                start.update(image_input(engine, args.image))
            session = engine.session(_prompt(args, engine, found), seed=args.seed, inputs=start)
        if args.record:
            session.start_recording()
        steps = (feeds.step(session, k) for k in range(args.blocks))
    print(f"fd-run: {engine} loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if engine.makes_frames:  # a built engine's decoder is one of its graphs, not an object
        outputs.writer = VideoWriter(args.out, fps=args.fps)
    height, width = engine.spec.height, engine.spec.width
    latents = {}
    bar = _progress(args.blocks, disable=args.no_progress)
    frames_total, t_start = 0, time.perf_counter()
    for k in range(args.blocks):
        tb = time.perf_counter()
        result = next(steps)
        if outputs.writer is not None and upscaler is not None:
            for frames in upscaler.push(result.frames):
                outputs.writer.write(frames[0].cpu())
                frames_total += frames.shape[1]
        elif outputs.writer is not None:
            frames = result.frames_cpu()[0]
            outputs.writer.write(frames)
            frames_total += frames.shape[0]
        if args.save_latents:
            latents[f"block_{k}"] = result.latents.float().cpu().contiguous()
        else:
            result.latents.cpu()  # the block is done before its time is reported
        dt = time.perf_counter() - tb
        fps = frames_total / (time.perf_counter() - t_start) if frames_total else 0.0
        if upscaler is not None and not upscaler.blocks:  # its first block waits for `first` frames
            bar.set_postfix_str(f"block {dt * 1e3:.0f} ms, upscaler filling {upscaler.pushed}/{upscaler.first} frames")
        else:
            bar.set_postfix_str(f"block {dt * 1e3:.0f} ms, {fps:.1f} fps")
        bar.update(1)
    bar.close()
    if upscaler is not None:
        for frames in upscaler.flush():
            outputs.writer.write(frames[0].cpu())
            frames_total += frames.shape[1]
        height, width = upscaler.vsr.plan.meta["height"], upscaler.vsr.plan.meta["width"]
    if args.save_latents:
        from safetensors.torch import save_file

        target = Path(args.save_latents)
        outputs.latents_tmp = target.with_name(f".{target.name}.partial-{os.getpid()}.safetensors")
        save_file(latents, str(outputs.latents_tmp))
    if outputs.writer is not None:
        path = outputs.writer.close()
        outputs.writer = None
        rate = f"{args.fps:g}"
        print(f"wrote {path}: {frames_total} frames, {height}x{width} at {rate} fps")
    else:
        print("no decoder: no video written (latents only)")
    if outputs.latents_tmp is not None:
        os.replace(outputs.latents_tmp, args.save_latents)
        outputs.latents_tmp = None
        print(f"wrote {args.save_latents}: {len(latents)} blocks of latents")
    if args.save_state:
        session.snapshot(device="cpu").save(args.save_state)
        print(f"wrote {args.save_state}: the world after block {session.block} (fd-run --resume continues it)")
    if args.record:
        session.save_recording(args.record)
        print(f"wrote {args.record}: the seed and inputs of {args.blocks} blocks (fd-run --replay {args.record})")
    return 0


def _check_actions_before_load(actions: list[dict], path: str, kw: dict[str, Any]) -> dict[str, Any] | None:
    """The --actions script's key names and mouse values checked against the preset's inputs where its family
    knows them without weights, so a typo is refused at once, not after a multi-GB load: its control tensors,
    which `_feeds` then uses as they are; a built engine's manifest records them. None for an unnamed preset and
    a family that learns its inputs only at load: checked after the load."""
    import flashdreams

    if is_engine_dir(kw["source"]):
        from flashdreams.export.manifest import read_manifest

        specs = flashdreams.input_specs(kw["source"])  # (a manifest it cannot read is refused by name here)
        name = (read_manifest(kw["source"]).get("preset") or {}).get("name") or Path(kw["source"]).name
        return action_tensors(actions, specs, name, path)
    if kw["preset"] is None:
        return None
    size = {"height": kw["height"], "width": kw["width"]}
    specs = flashdreams.input_specs(kw["preset"], **size, decoder=kw["decoder"])
    return None if specs is None else action_tensors(actions, specs, kw["preset"], path)


def plays_default_world(args: argparse.Namespace) -> bool:
    """No option picks a model: fd-run plays the default world (the arena). The options that only fit the Wan
    models (prompts, decoders, resolutions, random full-size weights) keep the tiny causal Wan as before."""
    wan_only = args.prompt or args.prompt_embeds or args.text_encoder or args.decoder_weights or args.random_weights
    sized = args.height is not None or args.width is not None
    return not (args.checkpoint or args.preset or wan_only or sized or args.decoder not in ("preset", "none"))


def _feeds(args: argparse.Namespace, engine, found: dict[str, Any]) -> Feeds:
    """--actions (or the built-in key loop), --camera (or the built-in orbit) and --drive, checked against the
    model; sets args.blocks when the user gave none (the script's length, or the loop's)."""
    controls, args.blocks = key_controls(
        found.get("actions"), args.actions, engine, args.blocks, controls=found.get("controls")
    )
    per_block = []
    camera = camera_feed(engine, args.camera)
    if camera is not None:
        per_block.append(camera)
    if args.drive:
        per_block.append(drive_feed(engine, args.drive))
    return Feeds(controls, per_block)


def _frame_input(engine, flag: str) -> dict:
    spec = engine.plan.meta.get("frame_input")
    if spec is None:
        raise InvalidArgumentError(f"{flag}: preset '{engine.preset_name}' takes no stream of frames (try flashvsr)")
    return spec


def _frame_session(args, engine, found, flag: str):
    """A session of a frame-stream model: its frame input starts as zeros (the first block replaces them)."""
    import torch

    name = _frame_input(engine, flag)["name"]
    zeros = torch.zeros(engine.plan.inputs[name].shape)
    prompt = _prompt(args, engine, found) if "prompt_embeds" in engine.plan.inputs else None
    return engine.session(prompt, seed=args.seed, inputs={name: zeros})


def _size_to_frames(kw: dict, frame_size: tuple[int, int], flag: str) -> None:
    """Size a frame-stream model to the frames it will get, where its preset says how
    (`size_for_input`: FlashVSR takes `scale` times the frames, floored to whole attention windows)
    and no --height/--width or built engine fixes the size already."""
    from flashdreams import registry

    source = kw.get("source")
    if kw.get("height") is not None or kw.get("width") is not None or not isinstance(kw.get("preset"), str):
        return
    if is_engine_dir(source):
        return  # a built engine's shapes are its identity
    preset = registry.get_preset(kw["preset"])
    size_for = getattr(preset, "size_for_input", None)
    if size_for is None:
        return  # not a frame-stream model: _frame_input names the problem
    kw["height"], kw["width"] = size_for(*frame_size)
    hint = "; --height/--width pick another size" if flag == "--input" else ""
    print(
        f"fd-run: {flag} frames {frame_size[0]}x{frame_size[1]} -> {kw['height']}x{kw['width']} out "
        f"(centre-cropped to whole attention windows{hint})",
        file=sys.stderr,
    )
    times = kw["height"] * kw["width"] / (preset.height * preset.width)
    if times > 4:  # memory and time grow with the pixels (FlashVSR at 1152x1920 peaks near 60 GiB)
        print(
            f"fd-run: warning: that is {times:.0f}x the pixels of preset '{preset.name}' "
            f"({preset.height}x{preset.width}); expect memory and time to grow as much"
            + ("; --height/--width crop a smaller output" if flag == "--input" else ""),
            file=sys.stderr,
        )


def _upscaler(args, kw: dict, world):
    """The --upscale model's session, sized to the world's frames, wrapped to take them as they come."""
    import flashdreams
    from flashdreams.stage import Upscaler

    up_kw = {**kw, "preset": args.upscale, "source": args.upscale_checkpoint, "decoder": "preset"}
    up_kw.update(decoder_weights=None, height=None, width=None, precision="bf16", fp8_keep=None)
    _size_to_frames(up_kw, (world.spec.height, world.spec.width), "--upscale")
    check_load_args(up_kw)
    engine = flashdreams.load(**up_kw)
    _frame_input(engine, "--upscale")
    print(f"fd-run: upscaling with {engine}", file=sys.stderr)
    return Upscaler(_frame_session(args, engine, {}, "--upscale"))


def _run_input(args, engine, outputs, found, t0) -> int:
    """--input: stream a video file's frames through the model; write what it makes."""
    from flashdreams.stage import Upscaler
    from flashdreams.video import VideoWriter, iter_video, video_rate

    spec = _frame_input(engine, "--input")
    if not engine.makes_frames:
        raise InvalidArgumentError("--input writes a video: drop --decoder none")
    fps = args.fps if args.fps is not None else video_rate(args.input)
    up = Upscaler(_frame_session(args, engine, found, "--input"))
    print(f"fd-run: {engine} loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    outputs.writer = VideoWriter(args.out, fps=fps)
    done, t_start = 0, time.perf_counter()
    for block in iter_video(args.input, spec["steady"]):
        for frames in up.push(block.to(engine.device)):
            outputs.writer.write(frames[0].cpu())
            done += frames.shape[1]
    for frames in up.flush():
        outputs.writer.write(frames[0].cpu())
        done += frames.shape[1]
    path = outputs.writer.close()
    outputs.writer = None
    rate = done / max(time.perf_counter() - t_start, 1e-9)
    meta = engine.plan.meta
    print(f"wrote {path}: {done} frames, {meta['height']}x{meta['width']} at {float(fps):g} fps ({rate:.1f} fps made)")
    return 0


class _PlainProgress:
    """Progress for a log file or a pipe: a plain line for the first block, then at most one a second
    ("fd-run: block 12/200, 35 ms, 110.2 fps"), never a carriage-return bar. Quiet when disabled."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.quiet = total, quiet
        self.done, self.note, self.last = 0, "", -math.inf

    def set_postfix_str(self, note: str) -> None:
        self.note = note

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if not self.quiet and (self.done == 1 or self.done == self.total or now - self.last >= 1.0):
            self.last = now
            print(f"fd-run: block {self.done}/{self.total}, {self.note.removeprefix('block ')}", file=sys.stderr)

    def close(self) -> None:
        pass


def _progress(total: int, disable: bool):
    if not sys.stderr.isatty():
        return _PlainProgress(total, quiet=disable)
    try:
        from tqdm import tqdm

        return tqdm(total=total, unit="block", disable=disable, file=sys.stderr)
    except ImportError:  # tqdm is a dependency, but keep fd-run working without it
        return _PlainProgress(total, quiet=disable)


if __name__ == "__main__":
    sys.exit(main())
