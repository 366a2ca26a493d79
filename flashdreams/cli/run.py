"""fd-run: play a streaming session and write the video (the first thing a new user runs)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from flashdreams.errors import FlashDreamsError, InvalidArgumentError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fd-run",
        description=(
            "Play a streaming world-model session block by block and write the frames to a video. "
            "With no checkpoint it plays the built-in tiny model (deterministic random weights, no "
            "download: the frames are structured noise, which is what a random model draws) on whatever "
            "device is here. With --checkpoint it runs a real model (a .safetensors file or directory, or "
            "an engine directory made by fd-build)."
        ),
        epilog=(
            "examples:\n"
            "  fd-run                                   # built-in model -> flashdreams.mp4\n"
            "  fd-run --checkpoint self_forcing_dmd.safetensors --decoder-weights Wan2.1_VAE.safetensors \\\n"
            "         --prompt-embeds prompt.safetensors --blocks 7 --out city.mp4\n"
            "  fd-run --checkpoint ckpt.safetensors --text-encoder umt5-xxl/ --prompt 'a drive through a city' \\\n"
            "         --decoder taehv --decoder-weights taew2_1.safetensors --offload-text-encoder"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", help="DiT checkpoint (.safetensors / sharded index / dir) or engine directory")
    p.add_argument("--preset", help="model preset (default: tiny built-in, or self-forcing-1.3b with a checkpoint)")
    p.add_argument("--list-presets", action="store_true", help="list presets and exit")
    p.add_argument("--prompt-embeds", help=".safetensors with one tensor [T, 4096] or [B, T, 4096] (umT5 output)")
    p.add_argument("--prompt", help="prompt text (needs --text-encoder)")
    p.add_argument("--text-encoder", help="directory of a transformers UMT5EncoderModel + tokenizer (umT5-XXL)")
    p.add_argument("--offload-text-encoder", action="store_true", help="free the text encoder after encoding")
    p.add_argument("--decoder", default="preset", help="wan-vae | taehv | none (default: the preset's)")
    p.add_argument("--decoder-weights", help="decoder weights (.safetensors): Wan2.1_VAE or taew2_1")
    p.add_argument("--blocks", type=int, default=7, help="blocks to generate (default 7 = 81 frames at nf 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="flashdreams.mp4", help="video file to write (default flashdreams.mp4)")
    p.add_argument("--fps", type=float, default=16.0, help="frame rate of the video (default 16)")
    p.add_argument("--device", help="cuda | cpu (default: cuda if present)")
    p.add_argument("--dtype", help="bfloat16 | float16 | float32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "triton"], help="attention/norm kernels")
    p.add_argument(
        "--precision",
        default="bf16",
        choices=["bf16", "fp8"],
        help="fp8: the DiT blocks' linears and attention in float8 e4m3 (needs --attention triton)",
    )
    p.add_argument("--height", type=int, help="video height in pixels (default: the preset's)")
    p.add_argument("--width", type=int, help="video width in pixels (default: the preset's)")
    p.add_argument("--random-weights", action="store_true", help="full-size preset with random weights")
    p.add_argument("--save-latents", help="write every block's latents to this .safetensors (block_0, ...)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _prompt(args, engine):
    from safetensors.torch import load_file

    if args.prompt_embeds:
        tensors = load_file(args.prompt_embeds)
        if len(tensors) != 1 and "prompt_embeds" not in tensors:
            raise InvalidArgumentError(
                f"'{args.prompt_embeds}' holds {len(tensors)} tensors; keep one, or name it 'prompt_embeds'"
            )
        return tensors.get("prompt_embeds", next(iter(tensors.values()))).float()
    if args.prompt:
        if not args.text_encoder:
            raise InvalidArgumentError("--prompt needs --text-encoder DIR (or give --prompt-embeds FILE)")
        from flashdreams.models.text_encoder import TextEncoder

        enc = TextEncoder.from_dir(args.text_encoder, device=engine.device, text_len=engine.backend.text_len)
        embeds = enc.encode(args.prompt)
        if args.offload_text_encoder:
            enc.offload()
            del enc
        return embeds
    if engine.spec.preset.builtin or args.random_weights:
        return engine.default_prompt()  # the stand-in prompt Engine.session uses too
    raise InvalidArgumentError("a real model needs a prompt: --prompt-embeds FILE or --prompt TEXT --text-encoder DIR")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import flashdreams
    from flashdreams.video import VideoWriter

    if args.list_presets:
        for name in flashdreams.preset_names():
            print(f"{name:28s} {flashdreams.get_preset(name).description}")
        return 0
    if args.blocks < 1:
        print("fd-run: --blocks must be at least 1", file=sys.stderr)
        return 2
    writer = None
    try:
        t0 = time.perf_counter()
        engine = flashdreams.load(
            args.checkpoint,
            preset=args.preset,
            device=args.device,
            dtype=args.dtype,
            attention=args.attention,
            decoder=None if args.decoder == "none" else args.decoder,
            height=args.height,
            width=args.width,
            random_weights=args.random_weights,
            decoder_weights=args.decoder_weights,
        )
        session = engine.session(_prompt(args, engine), seed=args.seed)
        print(f"fd-run: {engine} loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if engine.decoder is not None:
            writer = VideoWriter(args.out, fps=args.fps)
        latents = {}
        bar = _progress(args.blocks, disable=args.no_progress)
        frames_total, t_start = 0, time.perf_counter()
        for k in range(args.blocks):
            tb = time.perf_counter()
            result = session.step()
            if writer is not None:
                frames = result.frames_cpu()[0]
                writer.write(frames)
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
        if writer is not None:
            path = writer.close()
            writer = None
            print(f"wrote {path}: {frames_total} frames, {engine.spec.height}x{engine.spec.width} at {args.fps:g} fps")
        else:
            print("no decoder: no video written (latents only)")
        if args.save_latents:
            from safetensors.torch import save_file

            Path(args.save_latents).parent.mkdir(parents=True, exist_ok=True)
            save_file(latents, args.save_latents)
            print(f"wrote {args.save_latents}: {len(latents)} blocks of latents")
    except FlashDreamsError as exc:
        if writer is not None:
            writer.abort()
        print(f"fd-run: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if writer is not None:
            writer.abort()
        print("fd-run: interrupted; no video written", file=sys.stderr)
        return 130
    return 0


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
