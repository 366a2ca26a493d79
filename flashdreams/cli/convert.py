"""fd-convert: turn a PyTorch .pt/.pth checkpoint into a safetensors file."""

from __future__ import annotations

import argparse
import sys

from flashdreams.cli.options import flag_message
from flashdreams.errors import FlashDreamsError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fd-convert",
        description=(
            "Convert a PyTorch .pt/.pth checkpoint to .safetensors, the only format FlashDreams reads. "
            "The file is opened with torch.load(weights_only=True): tensors and plain containers only, "
            "never arbitrary pickled objects. Nested dicts become dotted keys "
            "(generator_ema.model.blocks.0...); the loaders strip those prefixes."
        ),
        epilog="example: fd-convert self_forcing_dmd.pt self_forcing_dmd.safetensors --key generator_ema",
    )
    p.add_argument("src", help="the .pt/.pth file")
    p.add_argument("dst", help="the .safetensors file to write (written atomically)")
    p.add_argument("--key", help="keep only this top-level entry, e.g. generator_ema")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    from flashdreams.convert import convert_checkpoint

    try:
        info = convert_checkpoint(args.src, args.dst, key=args.key)
    except FlashDreamsError as exc:
        msg = str(exc).removeprefix("fd-convert: ")  # library messages may name the tool already
        print(f"fd-convert: {flag_message(msg, p)}", file=sys.stderr)
        return 2
    print(f"wrote {info['output']}: {info['tensors']} tensors, {info['bytes'] / 2**20:.1f} MiB")
    if info["skipped"]:
        shown = ", ".join(info["skipped"][:6])
        print(f"skipped {len(info['skipped'])} non-tensor entries ({shown})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
