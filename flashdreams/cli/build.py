"""fd-build: compile a model into an engine directory once; `fd-build --check DIR` validates one."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback

from flashdreams.errors import FlashDreamsError

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2


def _backend_help() -> str:
    import textwrap

    from flashdreams.export.backends import VERIFIED

    pad = " " * 12
    verified = {k: textwrap.fill(v, 100, initial_indent=pad, subsequent_indent=pad)[12:] for k, v in VERIFIED.items()}

    lines = [
        "backends:",
        "  inductor  (default) torch.export programs + Inductor's precompiled graphs (loaded without a",
        "            trace or compile) + weights.safetensors + kernels.tar (our Triton kernels and",
        "            Inductor's autotuning results). FD_INDUCTOR_MODE=cache: the older re-trace path.",
        "            On CPU the artifacts hold C++ source: a cold machine compiles it at load (use aoti).",
        "            verified: " + verified["inductor"],
        "  aoti      AOTInductor .pt2 packages: no compiler at load, loadable from C++.",
        "            verified: " + verified["aoti"],
        "  onnx      torch.onnx.export(dynamo=True) of the same programs (state updates come back as",
        "            outputs), run with onnxruntime; always traced with attention=sdpa.",
        "            verified: " + verified["onnx"],
        "  tensorrt  the ONNX graphs built into TensorRT plans (needs `import tensorrt` and CUDA).",
        "            verified: " + verified["tensorrt"],
        "",
        "An engine is tied to the machine that built it: fd-build --check compares its fingerprint",
        "(device, compute capability, torch/triton/CUDA/TensorRT versions as the backend needs) with",
        "this machine and verifies every file's sha256, without running anything.",
        "",
        "exit codes: 0 ok, 1 build or check failed, 2 bad usage",
        "",
        "examples:",
        "  fd-build --out engines/tiny                          # built-in tiny model, this device",
        "  fd-build --preset self-forcing-1.3b --random-weights --height 480 --width 832 --out engines/sf",
        "  fd-build --checkpoint self_forcing_dmd.safetensors --decoder-weights Wan2.1_VAE.safetensors \\",
        "           --backend inductor --attention triton --out engines/sf-h100",
        "  fd-build --check engines/sf-h100",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fd-build",
        description=(
            "Build an engine directory (manifest.json + one compiled file per step graph) from a model, "
            "so that sessions start from it with no compilation. Shapes are fixed at build time: batch, "
            "resolution, block size and cache capacity are the engine's identity."
        ),
        epilog=_backend_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--check", metavar="ENGINE_DIR", help="validate an engine against this machine and exit")
    p.add_argument("--out", metavar="ENGINE_DIR", help="engine directory to write (built beside it, then renamed)")
    p.add_argument("--checkpoint", help="DiT checkpoint (.safetensors / sharded index / dir); default: built-in")
    p.add_argument("--preset", help="model preset (default: tiny built-in, or self-forcing-1.3b with a checkpoint)")
    p.add_argument("--backend", default="inductor", help="inductor (default) | aoti | onnx | tensorrt")
    p.add_argument("--height", type=int, help="video height in pixels (default: the preset's)")
    p.add_argument("--width", type=int, help="video width in pixels (default: the preset's)")
    p.add_argument("--batch", type=int, default=1, help="sessions' batch size (default 1)")
    p.add_argument("--device", help="cuda | cpu (default: cuda if present); the engine runs only there")
    p.add_argument("--dtype", help="bfloat16 | float16 | float32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "triton"], help="attention/norm kernels")
    p.add_argument("--decoder", default="preset", help="wan-vae | taehv | none | preset (default)")
    p.add_argument("--decoder-weights", help="decoder weights (.safetensors) for a real checkpoint")
    p.add_argument("--random-weights", action="store_true", help="full-size preset with random weights")
    p.add_argument("--seed", type=int, default=0, help="seed of the built-in / random weights (default 0)")
    p.add_argument("--force", action="store_true", help="replace an existing engine at --out")
    p.add_argument(
        "--autotune",
        action="store_true",
        help="inductor on CUDA: autotune the DiT's GEMMs (max-autotune; minutes more build time)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the build does")
    return p


def _check(path: str) -> int:
    from flashdreams.export.manifest import validate_engine

    print(f"checking engine {path}")
    try:
        t0 = time.perf_counter()
        val = validate_engine(path)
    except FlashDreamsError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    m = val.manifest
    eng = m["engine"]
    print(
        f"  {m['model_id']} ({m['backend']}, {eng['dtype']}, batch {eng['batch']}, {eng['height']}x{eng['width']}, "
        f"attention {eng['graph_attention']}) on {val.device}; graphs: {', '.join(m['graphs'])}"
    )
    for c in val.checks:
        print(f"  ok  {c}")
    for n in val.notes:
        print(f"  --  {n}")
    print(f"engine OK for this machine ({time.perf_counter() - t0:.2f} s)")
    return EXIT_OK


class _Bar:
    """A tqdm bar over the build phases, on stderr."""

    def __init__(self, disable: bool) -> None:
        self.bar = None
        self.disable = disable
        self.t0 = time.perf_counter()

    def __call__(self, phase: str, index: int, total: int) -> None:
        if self.disable:
            return
        if self.bar is None:
            from tqdm import tqdm

            fmt = "{l_bar}{bar}| {n}/{total} [{elapsed}]"
            self.bar = tqdm(total=total, unit="phase", file=sys.stderr, bar_format=fmt)
        self.bar.total = total
        self.bar.n = index
        self.bar.set_description(f"fd-build: {phase}")
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.n = self.bar.total
            self.bar.refresh()
            self.bar.close()


def _summary(m: dict, out: str) -> None:
    eng = m["engine"]
    print(f"built {m['backend']} engine {out} in {m['build']['seconds']:.1f} s")
    print(
        f"  model {m['model_id']} ({m['weights_source']}), {eng['dtype']}, batch {eng['batch']}, "
        f"{eng['height']}x{eng['width']}, latents {eng['latent_shape']}, ring {eng['ring']['capacity_tokens']} tokens"
    )
    fp = m["fingerprint"]
    print(f"  device {fp['device_name']} ({fp['capability']}), torch {fp['torch']}")
    print(f"  {'graph':<14}{'MiB':>9}  {'build s':>8}  check vs eager (rel. L2)")
    for name, g in m["graphs"].items():
        mib = sum(f["bytes"] for f in g["files"]) / 2**20
        chk = g["build_check"]
        err = f"{chk['max_rel_l2']:.2e}" if "max_rel_l2" in chk else chk.get("skipped", "-")
        secs = m["build"]["phases"].get(f"compile {name}", 0.0)
        print(f"  {name:<14}{mib:>9.1f}  {secs:>8.1f}  {err}")
    for name, a in m["artifacts"].items():
        print(f"  {name:<14}{a['bytes'] / 2**20:>9.1f}")


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage, 0 on --help
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.autotune:
        os.environ["FD_INDUCTOR_AUTOTUNE"] = "1"  # read by the inductor backend's compile options
    if args.check:
        if args.out:
            print("fd-build: --check takes no --out", file=sys.stderr)
            return EXIT_USAGE
        return _check(args.check)
    if not args.out:
        print("fd-build: --out ENGINE_DIR is required (or --check ENGINE_DIR); see fd-build --help", file=sys.stderr)
        return EXIT_USAGE
    from flashdreams.errors import CheckpointError, InvalidArgumentError
    from flashdreams.export.build import build_engine

    bar = _Bar(args.no_progress)
    try:
        m = build_engine(
            args.out,
            checkpoint=args.checkpoint,
            preset=args.preset,
            backend=args.backend,
            height=args.height,
            width=args.width,
            batch=args.batch,
            device=args.device,
            dtype=args.dtype,
            attention=args.attention,
            decoder=None if args.decoder == "none" else args.decoder,
            decoder_weights=args.decoder_weights,
            random_weights=args.random_weights,
            seed=args.seed,
            force=args.force,
            progress=bar,
        )
    except InvalidArgumentError as exc:
        bar.close()
        print(f"fd-build: {exc}", file=sys.stderr)
        return EXIT_CHECK_FAILED if isinstance(exc, CheckpointError) else EXIT_USAGE
    except FlashDreamsError as exc:
        bar.close()
        print(f"fd-build: build failed: {exc}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except KeyboardInterrupt:
        bar.close()
        print("fd-build: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception:  # a compiler failure: show it all, nothing was written
        bar.close()
        traceback.print_exc()
        print("fd-build: build failed (the traceback above); nothing was written", file=sys.stderr)
        return EXIT_CHECK_FAILED
    bar.close()
    _summary(m, args.out)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
