"""fd-bench: measure sessions (latency per block and per stage, cold start, memory, power) per backend."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from pathlib import Path

from flashdreams.cli.options import (
    add_build_options,
    add_load_options,
    build_config,
    check_load_args,
    flag_message,
    load_kwargs,
    split_list,
)
from flashdreams.errors import FlashDreamsError, InvalidArgumentError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fd-bench",
        description=(
            "Benchmark streaming sessions. For each backend x attention implementation, in one process: "
            "cold start (load / build / capture, to first frame), warm first frame after reset, per-block "
            "latency p50/p90/p99 split into denoise / decode / commit (CUDA events, no syncs in the loop), "
            "latency per block index, steady-state FPS, jitter, peak GPU memory, NVML clocks/power/temperature, "
            "and the DiT's achieved TFLOP/s against a matmul peak measured in the same run. Writes "
            "results.json and PNG plots to --out and prints a short table."
        ),
        epilog=(
            "examples:\n  fd-bench                                   # built-in tiny model, eager\n"
            "  fd-bench --preset self-forcing-1.3b --random-weights --backend eager,inductor "
            "--attention sdpa,triton --decoder taehv\n"
            "  fd-bench --preset self-forcing-1.3b-rolling --random-weights --steady-blocks 200"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--backend",
        default="eager",
        help="comma list of: eager, inductor, aoti (built in-process), engine (loads --engine DIR); default eager",
    )
    p.add_argument("--engine", help="a prebuilt engine directory (fd-build) for --backend engine")
    p.add_argument("--blocks", type=int, default=7, help="blocks per rollout (7 = 21 latent frames)")
    p.add_argument("--rollouts", type=int, default=3, help="measured rollouts after warm-up (default 3)")
    p.add_argument("--steady-blocks", type=int, default=0, help="also run one long rollout of N blocks (jitter)")
    p.add_argument(
        "--warm-up",
        action="store_true",
        help="run and capture every block kind before the first block (Session.warm_up), so the first blocks "
        "after load replay at steady speed; the cold start then includes it",
    )
    p.add_argument(
        "--steady-inputs",
        action="store_true",
        help="in the --steady-blocks rollout, set a new value of every per-block input (keys, mouse, camera, a "
        "prompt) before each block, and record the allocated GPU memory after each block (flat or not)",
    )
    p.add_argument(
        "--input-latency",
        type=int,
        default=0,
        metavar="N",
        help="also measure N blocks of input-to-frames latency: a new input set, then its block's frames on the "
        "host (p50/p99, and over the block's p50)",
    )
    p.add_argument(
        "--profile-block",
        type=int,
        help="also profile block N (torch.profiler): device time per kernel category and the top kernels; "
        "with --sessions, any N profiles one more step of every world count",
    )
    p.add_argument("--no-cuda-graphs", action="store_true", help="run every block eagerly")
    p.add_argument(
        "--cudnn-benchmark",
        default="off",
        help="off, on, or off,on (both, one run each): cuDNN tries its convolution algorithms at the first "
        "call of each shape and keeps the fastest (the decoders' and encoders' convs; shapes are static, "
        "so the tuning happens once, in warm-up). Default off",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sessions' noise (default 0)")
    p.add_argument("--out", default="fd-bench-out", help="output directory (results.json + plots)")
    p.add_argument("--compare", help="another results.json: print ratios against it")
    p.add_argument(
        "--sessions",
        help="many worlds per GPU instead: comma list of world counts (e.g. 1,2,4,8,16,32,64); reports "
        "aggregate frames/s, per-world block latency p50/p99 and memory per world (first backend and attention)",
    )
    p.add_argument("--quick-ceilings", action="store_true", help="small matmul/copy ceilings (smoke runs)")
    add_load_options(p, lists=True)
    add_build_options(p)  # for the engines fd-bench builds in-process (--backend inductor, aoti)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from flashdreams.benchmark.environment import environment, measure_ceilings
    from flashdreams.benchmark.report import compare, plots, precision_label, table
    from flashdreams.benchmark.runner import BenchConfig, run_config
    from flashdreams.engine import check_attention, resolve_device_dtype
    from flashdreams.export.backends import backend_names
    from flashdreams.presets import get_preset

    out = Path(args.out)
    if args.sessions:
        return _sessions_main(args, parser, out)
    try:
        kw = load_kwargs(args)
        device, dtype = resolve_device_dtype(kw["device"], kw["dtype"])
        preset = get_preset(kw["preset"] or ("self-forcing-1.3b" if kw["source"] else "tiny"))
        check_load_args({**kw, "preset": preset.name, "attention": None, "precision": split_list(args.precision)})
        for attention in split_list(args.attention):
            check_attention(attention, device)  # before the first run, not after it
        if args.blocks < 2:
            raise InvalidArgumentError("--blocks must be at least 2 (a first block and a steady one)")
        if args.rollouts < 1:
            raise InvalidArgumentError(f"--rollouts must be at least 1, got {args.rollouts}")
        if args.input_latency < 0:
            raise InvalidArgumentError(f"--input-latency must be 0 (off) or more blocks, got {args.input_latency}")
        if args.steady_inputs and not args.steady_blocks:
            raise InvalidArgumentError("--steady-inputs changes the inputs of the --steady-blocks rollout: give both")
        if args.steady_blocks < 0:
            raise InvalidArgumentError(f"--steady-blocks must be 0 (off) or more, got {args.steady_blocks}")
        if args.profile_block is not None and args.profile_block < 0:
            raise InvalidArgumentError(f"--profile-block must be a block index >= 0, got {args.profile_block}")
        cudnn_modes = split_list(args.cudnn_benchmark)
        if not cudnn_modes or any(m not in ("off", "on") for m in cudnn_modes):
            raise InvalidArgumentError(f"--cudnn-benchmark takes off, on or off,on; got '{args.cudnn_benchmark}'")
        if not 0 <= args.seed < 2**63:
            raise InvalidArgumentError(f"--seed must be in [0, 2**63), got {args.seed}")
        cfg = BenchConfig(
            source=kw["source"],
            preset=preset.name,
            random_weights=kw["random_weights"],
            blocks=args.blocks,
            rollouts=args.rollouts,
            steady_blocks=args.steady_blocks,
            steady_inputs=args.steady_inputs,
            input_latency=args.input_latency,
            profile_block=args.profile_block,
            warm_up=args.warm_up,
            height=kw["height"],
            width=kw["width"],
            decoder=kw["decoder"],
            decoder_weights=kw["decoder_weights"],
            weights_seed=kw["weights_seed"],
            fp8_keep=kw["fp8_keep"],
            device=str(device),
            dtype=str(dtype).replace("torch.", ""),
            seed=args.seed,
            cuda_graphs=False if args.no_cuda_graphs else None,
            engine_dir=args.engine,
            workdir=str(out / "engines"),
        )
        out.mkdir(parents=True, exist_ok=True)
        runs: list[dict] = []
        failed: list[dict] = []  # runs that raised: recorded in results.json, the others still measured
        env = environment(device)
        first = True
        for precision in split_list(args.precision):
            cfg.precision = precision
            for backend in split_list(args.backend):
                if backend in backend_names():  # built in-process: its build options
                    cfg.build_config = build_config(args, backend)
                for attention, cudnn_mode in itertools.product(split_list(args.attention), cudnn_modes):
                    label = precision_label(precision, dtype)
                    tag = "+cudnn-bm" if cudnn_mode == "on" else ""
                    print(f"fd-bench: {backend}{tag}/{attention}/{label} ...", file=sys.stderr, flush=True)
                    torch.backends.cudnn.benchmark = cudnn_mode == "on"
                    try:
                        run = run_config(cfg, backend, attention, first)
                        runs.append({**run, "cudnn_benchmark": cudnn_mode == "on"})
                    except FlashDreamsError:
                        raise  # bad options: a usage error, whatever ran before
                    except Exception as exc:  # noqa: BLE001 - a run that breaks (a kernel, a compiler) costs only itself
                        failed.append(_failed_run(backend, attention, label, exc))
                        print(f"fd-bench: {backend}/{attention}/{label} FAILED: {failed[-1]['error']}", file=sys.stderr)
                        if torch.cuda.is_available():
                            torch.cuda.empty_cache()
                    first = False
                    partial = _results(args, preset, dtype, env, {}, runs, failed, complete=False)
                    (out / "results.json").write_text(json.dumps(partial, indent=1))
        ceilings = measure_ceilings(device, dtype if dtype != torch.float32 else torch.float32, args.quick_ceilings)
    except FlashDreamsError as exc:
        print(f"fd-bench: {flag_message(str(exc), parser)}", file=sys.stderr)
        return 2
    results = _results(args, preset, dtype, env, ceilings, runs, failed, complete=True)
    peak = ceilings.get("matmul_tflops")
    for r in runs:  # the DiT's rate against the matmul peak measured in this run: median block and best block
        r["dit_fraction_of_matmul_peak_median"] = (r.get("dit_tflops_median") or 0) / peak if peak else None
        r["dit_fraction_of_matmul_peak_best"] = (r.get("dit_tflops_best") or 0) / peak if peak else None
    (out / "results.json").write_text(json.dumps(results, indent=1))
    written = plots(results, out)
    print(table(results))
    if args.compare:
        print(compare(results, args.compare))
    print(f"wrote {out / 'results.json'}" + (f" and {len(written)} plots" if written else ""))
    return 1 if failed else 0


def _results(args, preset, dtype, env: dict, ceilings: dict, runs: list, failed: list, complete: bool) -> dict:
    """results.json: environment, ceilings, the configuration and every run."""
    from flashdreams.benchmark.report import precision_label

    spec_h = args.height or getattr(preset, "height", None)
    spec_w = args.width or getattr(preset, "width", None)
    return {
        "schema": "fd-bench/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": env,
        "ceilings": ceilings,
        "config": {
            "preset": preset.name,
            "checkpoint": args.checkpoint,
            "random_weights": args.random_weights,
            "height": spec_h,
            "width": spec_w,
            "blocks": args.blocks,
            "rollouts": args.rollouts,
            "steady_blocks": args.steady_blocks,
            "warm_up": args.warm_up,
            "decoder": args.decoder,
            "dtype": str(dtype),
            "cuda_graphs": not args.no_cuda_graphs,
            "seed": args.seed,
            "weights_seed": args.weights_seed,
            "precision": ",".join(precision_label(pr, dtype) for pr in split_list(args.precision)),  # what ran
            "precision_option": args.precision,
            "fp8_keep": args.fp8_keep,  # the linears the fp8 runs kept in bf16 (None: the model's own choice)
            # The whole preset as its family writes it (every family's preset has to_dict).
            "preset_config": preset.to_dict(),
        },
        "runs": runs,
        "failed_runs": failed,
        "complete": complete,  # False: written after a run, before the rest (a killed fd-bench keeps it)
    }


def _failed_run(backend: str, attention: str, precision: str, exc: BaseException) -> dict:
    import traceback

    msg = str(exc).strip().splitlines()
    return {
        "backend": backend,
        "attention": attention,
        "precision": precision,
        "error": f"{type(exc).__name__}: {msg[0][:300] if msg else ''}",
        "traceback": traceback.format_exc()[-3000:],
    }


def _sessions_main(args: argparse.Namespace, parser: argparse.ArgumentParser, out: Path) -> int:
    import torch

    import flashdreams
    from flashdreams.benchmark.environment import environment
    from flashdreams.benchmark.sessions import bench_sessions, largest_fit
    from flashdreams.engine import resolve_device_dtype

    try:
        counts = [int(c) for c in split_list(args.sessions)]
        if not counts or any(c < 1 for c in counts):
            raise ValueError
    except ValueError:
        print(f"fd-bench: --sessions must be a comma list of positive integers, got {args.sessions!r}", file=sys.stderr)
        return 2
    try:
        kw = load_kwargs(args, attention=split_list(args.attention)[0], precision=split_list(args.precision)[0])
        if kw["precision"] != "fp8":
            kw["fp8_keep"] = None
        device, _ = resolve_device_dtype(kw["device"], kw["dtype"])
        if args.blocks < 1:
            raise InvalidArgumentError("--blocks must be at least 1")
        first = flashdreams.load(**kw)
        cache = {1: first}

        def engine_for(n: int):
            if first.plan.row_independent:
                return first
            if n not in cache:  # lockstep worlds: an engine loaded at batch n
                cache.clear()
                cache[n] = flashdreams.load(**kw, batch=n)
            return cache[n]

        env = environment(device)
        config = {"preset": first.preset_name, "blocks": args.blocks, "cuda_graphs": not args.no_cuda_graphs}

        def write(rows: list[dict], failed: dict | None = None) -> None:
            """results.json after every N, so a later N that fails (out of memory) keeps the earlier rows."""
            free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
            results = {
                "schema": "fd-bench-sessions/1",
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "environment": env,
                "config": config,
                "rows": rows,
                "failed": failed,
                "largest_worlds_fit_estimate": largest_fit(rows, free) if free else None,
            }
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(json.dumps(results, indent=1))

        done: list[dict] = []
        try:
            bench_sessions(
                engine_for,
                sorted(counts),
                blocks=args.blocks,
                warmup=3,
                cuda_graphs=False if args.no_cuda_graphs else None,
                on_row=lambda row: (done.append(row), write(done)),
                profile=args.profile_block is not None,
            )
        except (FlashDreamsError, torch.OutOfMemoryError) as exc:
            failed_n = sorted(counts)[len(done)]
            write(done, {"worlds": failed_n, "error": f"{type(exc).__name__}: {exc}"})
            print(
                f"fd-bench: {failed_n} worlds failed ({type(exc).__name__}: {exc}); rows before it kept",
                file=sys.stderr,
            )
            print(f"wrote {out / 'results.json'}")
            return 1
    except FlashDreamsError as exc:
        print(f"fd-bench: {flag_message(str(exc), parser)}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
