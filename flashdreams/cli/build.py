"""fd-build: compile a model into an engine directory once; `fd-build --check DIR` validates one."""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
import traceback

from flashdreams.cli.options import (
    add_build_options,
    add_load_options,
    build_config,
    check_load_args,
    flag_message,
    load_kwargs,
)
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
        "            Inductor's autotuning results). --inductor-mode cache: the older re-trace path.",
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
    p.add_argument("--backend", default="inductor", help="inductor (default) | aoti | onnx | tensorrt")
    p.add_argument("--batch", type=int, default=1, help="sessions' batch size (default 1)")
    p.add_argument("--force", action="store_true", help="replace an existing engine at --out")
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress (a bar on a terminal, else one line a phase)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log what the build does")
    add_load_options(p, weights_seed_flags=("--seed", "--weights-seed"))  # the engine runs only on --device
    add_build_options(p)
    return p


def _field(fp: dict, name: str):
    """A fingerprint field's value as the check compares it (python_minor: major.minor of python)."""
    if name == "python_minor":
        return ".".join(str(fp.get("python", "")).split(".")[:2])
    return fp.get(name)


def _check(path: str, parser: argparse.ArgumentParser | None = None) -> int:
    """Validate an engine (`validate_engine`) and print each thing verified, with its value."""
    from flashdreams.export.manifest import (
        MANIFEST_NAME,
        SCHEMA_VERSION,
        listed_files,
        machine_fingerprint,
        manifest_digest,
        required_fields,
        validate_engine,
    )

    print(f"checking engine {path}")
    try:
        t0 = time.perf_counter()
        val = validate_engine(path)
    except FlashDreamsError as exc:
        msg = flag_message(str(exc), parser) if parser is not None else str(exc)
        print(f"FAILED: {msg}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    m = val.manifest
    eng = m["engine"]
    print(
        f"  {m['model_id']} ({m['backend']}, {eng['dtype']}, batch {eng['batch']}, {eng['height']}x{eng['width']}, "
        f"attention {eng['graph_attention']}) on {val.device}; graphs: {', '.join(m['graphs'])}"
    )
    print(f"  ok  schema version {m.get('schema_version')} (this FlashDreams reads {SCHEMA_VERSION})")
    print(
        f"  ok  seal: {MANIFEST_NAME} content sha256 {manifest_digest(m)} equals its recorded manifest_sha256 "
        "(unchanged since the build)"
    )
    records = listed_files(m)
    print(f"  ok  {len(records)} files present, sha256 verified (each file's size and sha256 equal the manifest's):")
    width = max((len(r["file"]) for r in records), default=0)
    for r in records:
        print(f"        {r['file']:<{width}}  {r['bytes']:>12,d} B  sha256 {r['sha256']}")
    built = m.get("fingerprint", {})
    here = machine_fingerprint(val.device)
    fields = required_fields(m["backend"], built.get("device_type", "cpu"))
    if fields:
        print(f"  ok  fingerprint: {len(fields)} fields must equal this machine's ({m['backend']} engine):")
        for name in fields:
            print(f"        {name:<12} built {_field(built, name)!r:<24} here {_field(here, name)!r}")
    else:
        print(f"  ok  fingerprint: {m['backend']} graphs are portable; no field has to match")
    for n in val.notes:
        print(f"  --  {n}")
    print(f"engine OK for this machine ({time.perf_counter() - t0:.2f} s)")
    return EXIT_OK


def _state_mib(m: dict) -> float:
    """Bytes of one session's state buffers (KV rings, caches), from the plan in the manifest."""
    from flashdreams.models.family import TensorDecl

    decls = [TensorDecl.from_dict(d) for d in m["plan"]["state"].values()]
    return sum(d.torch_dtype().itemsize * math.prod(d.shape) for d in decls) / 2**20


def _summary(m: dict, out: str) -> None:
    eng = m["engine"]
    print(f"built {m['backend']} engine {out} in {m['build']['seconds']:.1f} s")
    print(
        f"  model {m['model_id']} ({m['weights_source']}), {eng['dtype']}, batch {eng['batch']}, "
        f"{eng['height']}x{eng['width']}, latents {eng['latent_shape']}, session state {_state_mib(m):.1f} MiB"
    )
    fp = m["fingerprint"]
    print(f"  device {fp['device_name']} ({fp['capability']}), torch {fp['torch']}")
    print(f"  {'graph':<14}{'MiB':>9}  {'build s':>8}  check vs eager (rel. L2)")
    for name, g in m["graphs"].items():
        mib = sum(f["bytes"] for f in g["files"]) / 2**20
        chk = g["build_check"]
        err = f"{chk['max_rel_l2']:.2e}" if "max_rel_l2" in chk else chk.get("skipped", "-")
        per_output = chk.get("rel_l2") or {}
        if len(per_output) > 1:  # which output it is (a flow, or the state a graph writes) says where to look
            err += f" ({max(per_output, key=per_output.get)})"
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
    if args.check:
        if args.out:
            print("fd-build: --check takes no --out", file=sys.stderr)
            return EXIT_USAGE
        return _check(args.check, p)
    if not args.out:
        print("fd-build: --out ENGINE_DIR is required (or --check ENGINE_DIR); see fd-build --help", file=sys.stderr)
        return EXIT_USAGE
    from flashdreams.errors import CheckpointError, InvalidArgumentError
    from flashdreams.export.build import build_engine
    from flashdreams.export.progress import PhaseProgress

    bar = PhaseProgress(disable=args.no_progress)  # a bar on a terminal, plain lines in a log
    try:
        kw = load_kwargs(args)
        check_load_args(kw)
        m = build_engine(
            args.out,
            checkpoint=kw.pop("source"),
            seed=kw.pop("weights_seed"),
            backend=args.backend,
            batch=args.batch,
            force=args.force,
            progress=bar,
            config=build_config(args, args.backend),
            **kw,
        )
    except InvalidArgumentError as exc:
        bar.close(ok=False)
        print(f"fd-build: {flag_message(str(exc), p)}", file=sys.stderr)
        return EXIT_CHECK_FAILED if isinstance(exc, CheckpointError) else EXIT_USAGE
    except FlashDreamsError as exc:
        bar.close(ok=False)
        print(f"fd-build: build failed: {flag_message(str(exc), p)}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except KeyboardInterrupt:
        bar.close(ok=False)
        print("fd-build: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception:  # a compiler failure: show it all, nothing was written
        bar.close(ok=False)
        traceback.print_exc()
        print("fd-build: build failed (the traceback above); nothing was written", file=sys.stderr)
        return EXIT_CHECK_FAILED
    bar.close()
    _summary(m, args.out)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
