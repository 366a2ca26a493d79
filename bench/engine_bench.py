"""Engine bench: build a compiled engine once, then measure a cold start from it in a fresh process.

One script, one device call (the lead runs it on the H100), every step in its own process:

1. build the engine (inductor backend) with a time limit, and report its phases;
2. the eager reference rollout (same weights, prompt, seed and draws), with, beside it,
   a probe of whether an AOTInductor package loads on this machine now (a tiny package
   compiled and loaded with FD_AOTI_FORCE=1, so a loader segfault only ends the probe);
3. the cold start in a FRESH process with empty Inductor/Triton caches and nothing else
   running: process start -> import -> validate -> load artifacts -> load programs ->
   first call (the warm-up compile from the engine's cache) -> session -> first block ->
   first frame on the host; then the remaining blocks (the session captures CUDA graphs
   from its third block);
4. engine vs eager latents per block (rel. L2); JSON to --out and a short table.

Full size (the default on CUDA): Self-Forcing 1.3B, all 30 layers, random weights, bf16,
480x832, attention=triton (the ring kernel reads only the valid cache rows; torch SDPA in
a fixed-shape graph has to mask the whole ring), decoder TAEHV (its graphs build in the
default Inductor mode; the Wan VAE would add minutes of build). The whole script keeps to
--budget seconds (default 530, under 9 minutes): the build gets at most --build-timeout
(330) and leaves 200 s for the rest; what is cut is reported as such in the JSON.
`--layers 4` builds a 4-layer slice, `--decoder none` skips the decoder.

CPU smoke test: `python bench/engine_bench.py --preset tiny --out /tmp/engine-cpu.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


# -- helpers shared by parent and children ---------------------------------------------------


def _preset(args):
    from flashdreams.presets import get_preset

    p = get_preset(args["preset"])
    if args.get("layers"):
        p = p.replace(model=p.model.replace(num_layers=int(args["layers"])))
    return p


def _decoder(args):
    return None if args["decoder"] == "none" else args["decoder"]


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rollout(engine, args, t_origin: float | None = None) -> dict:
    """N blocks from the model's default inputs (the stand-in prompt, image, ...) with the given seed;
    per-block wall ms (synced), latents."""
    import torch

    out: dict = {}
    t = time.perf_counter()
    session = engine.session(inputs=engine.default_inputs(), seed=args["seed"])
    _sync(engine.device)
    out["session_create_s"] = time.perf_counter() - t
    latents, block_ms = [], []
    for b in range(args["blocks"]):
        t = time.perf_counter()
        r = session.step()
        if r.frames is not None:
            r.frames_cpu()  # the frames on the host: what a viewer would wait for
            if b == 0 and t_origin is not None:
                out["first_frame_from_process_start_s"] = time.time() - t_origin
        _sync(engine.device)
        block_ms.append((time.perf_counter() - t) * 1e3)
        if b == 0 and t_origin is not None:
            out["first_block_from_process_start_s"] = time.time() - t_origin
        latents.append(r.latents.float().cpu())
    out["block_ms"] = block_ms
    out["capture_s"] = getattr(session, "capture_s", None)
    out["latents"] = torch.stack(latents)
    return out


# -- children ---------------------------------------------------------------------------


def child_build(args) -> dict:
    from flashdreams.export.build import build_engine
    from flashdreams.export.build_config import BuildConfig

    phases = []
    t0 = time.perf_counter()

    def progress(phase, i, n):
        phases.append([phase, round(time.perf_counter() - t0, 2)])
        print(f"build: {phase} at {time.perf_counter() - t0:.1f} s", flush=True)

    m = build_engine(
        args["engine_dir"],
        preset=_preset(args),
        backend="inductor",
        height=args["height"],
        width=args["width"],
        device=args["device"],
        dtype=args["dtype"],
        attention=args["attention"],
        decoder=_decoder(args),
        random_weights=not _preset(args).builtin,
        seed=args["weights_seed"],
        force=True,
        progress=progress,
        # FD_INDUCTOR_MODE / FD_INDUCTOR_AUTOTUNE in this child's environment pick the build options.
        config=BuildConfig.from_env("inductor"),
    )
    return {
        "seconds": m["build"]["seconds"],
        "phases": m["build"]["phases"],
        "progress": phases,
        "graphs": {
            n: {
                "mib": round(sum(f["bytes"] for f in g["files"]) / 2**20, 1),
                "build_check": g["build_check"],
                "compile": g.get("compile"),
            }
            for n, g in m["graphs"].items()
        },
        "artifacts_mib": {n: round(a["bytes"] / 2**20, 2) for n, a in m["artifacts"].items()},
        "fingerprint": m["fingerprint"],
        "config_hash": m["config_hash"],
        "weights_sha256": m["weights_sha256"],
    }


def child_eager(args) -> dict:
    import torch

    import flashdreams

    t = time.perf_counter()
    engine = flashdreams.load(
        preset=_preset(args),
        device=args["device"],
        dtype=args["dtype"],
        attention=args["attention"],
        decoder=_decoder(args),
        height=args["height"],
        width=args["width"],
        random_weights=not _preset(args).builtin,
        weights_seed=args["weights_seed"],
    )
    _sync(engine.device)
    load_s = time.perf_counter() - t
    out = _rollout(engine, args)
    torch.save(out.pop("latents"), args["latents_out"])
    out["load_s"] = load_s
    return out


def child_cold(args) -> dict:
    t_origin = args["t_origin"]
    out = {"process_start_to_main_s": time.time() - t_origin}
    t = time.perf_counter()
    import torch

    import flashdreams

    out["import_s"] = time.perf_counter() - t
    prof = None
    if os.environ.get("FD_COLD_PROFILE") == "1":  # where a cold load spends its time (slower under cProfile)
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t = time.perf_counter()
    engine = flashdreams.load(args["engine_dir"], device=args["device"], attention=args["attention"])
    out["engine_load_s"] = time.perf_counter() - t
    if prof is not None:
        import io
        import pstats

        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(60)
        out["cprofile_load_top"] = text.getvalue()[-12000:]
    out["load_times"] = engine.load_times
    try:
        from torch._dynamo.utils import counters

        out["inductor_counters"] = {k: v for k, v in counters["inductor"].items() if "cache" in k}
        out["dynamo_frames"] = dict(counters["frames"])  # empty for precompiled graphs (no re-trace)
    except Exception:  # counters are diagnostics only
        pass
    r = _rollout(engine, args, t_origin)
    torch.save(r.pop("latents"), args["latents_out"])
    out.update(r)
    if torch.cuda.is_available():
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def child_aoti_probe(args) -> dict:
    """Compile a tiny AOTInductor package on the device and load it (the loader is what crashes)."""
    import torch
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    dev = torch.device(args["device"])
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).to(dev)
    x = torch.randn(4, 64, device=dev)
    t = time.perf_counter()
    ep = torch.export.export(model, (x,))
    path = aoti_compile_and_package(ep, package_path=os.path.join(args["workdir"], "probe.pt2"))
    compile_s = time.perf_counter() - t
    print("aoti probe: compiled, loading", flush=True)
    t = time.perf_counter()
    runner = aoti_load_package(path)
    y = runner(x)
    _sync(dev)
    from flashdreams.numerics import rel_l2

    err = rel_l2(y, model(x))
    return {"compile_s": compile_s, "load_and_run_s": time.perf_counter() - t, "rel_l2": err}


CHILDREN = {"build": child_build, "eager": child_eager, "cold": child_cold, "aoti-probe": child_aoti_probe}
CHILDREN.update({f"cold{i}": child_cold for i in range(8)})


def child_main(mode: str, args_path: str) -> int:
    args = json.loads(Path(args_path).read_text())
    result = CHILDREN[mode](args)
    Path(args["result_out"]).write_text(json.dumps(result, default=str))
    return 0


# -- parent ---------------------------------------------------------------------------


class Child:
    """One child process of this script (started now, finished by `result`)."""

    def __init__(self, mode: str, args: dict, env: dict | None = None) -> None:
        workdir = Path(args["workdir"])
        self.mode = mode
        self.args = dict(args, result_out=str(workdir / f"{mode}.result.json"), t_origin=time.time())
        args_path = workdir / f"{mode}.args.json"
        args_path.write_text(json.dumps(self.args))
        Path(self.args["result_out"]).unlink(missing_ok=True)
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE), "--_child", mode, "--_args", str(args_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def result(self, timeout: float) -> dict:
        """Its result, or what went wrong (timeout, signal, exit code, the output's tail)."""
        timed_out = False
        try:
            output, _ = self.proc.communicate(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(self.proc.pid, signal.SIGKILL)
            output, _ = self.proc.communicate()
        rc = self.proc.returncode
        status = {"wall_s": round(time.perf_counter() - self.t0, 2), "returncode": rc}
        if timed_out:
            status["error"] = f"timed out after {timeout:.0f} s (killed)"
        elif rc is not None and rc < 0:
            status["error"] = f"killed by signal {signal.Signals(-rc).name}"
        elif rc != 0:
            status["error"] = f"exit code {rc}"
        if "error" in status:
            status["output_tail"] = (output or "")[-3000:]
            print(f"[{self.mode}] {status['error']}\n{status['output_tail'][-1500:]}", file=sys.stderr)
            return status
        result = json.loads(Path(self.args["result_out"]).read_text())
        result["_child"] = status
        return result


def rel_l2_blocks(a_path: Path, b_path: Path) -> list[float]:
    import torch

    from flashdreams.numerics import rel_l2

    a, b = torch.load(a_path), torch.load(b_path)
    return [rel_l2(x, y) for x, y in zip(a, b)]


def print_table(res: dict) -> None:
    cfg = res["config"]
    print(
        f"\nengine bench: {cfg['preset']} ({cfg['layers'] or 'all'} layers), {cfg['height']}x{cfg['width']}, "
        f"{cfg['dtype']}, attention {cfg['attention']}, decoder {cfg['decoder']}, "
        f"on {res['environment'].get('device_name')}"
    )
    b = res.get("build", {})
    print(f"  build (inductor)            {b.get('seconds', b.get('error', '?'))} s")
    for name, g in b.get("graphs", {}).items():
        chk = g["build_check"].get("max_rel_l2", g["build_check"].get("skipped"))
        print(f"    {name:<14} {g['mib']:>9.1f} MiB  check rel. L2 {chk}")
    c = res.get("cold_start", {})
    if "load_times" in c:
        lt = c["load_times"]
        rows = [
            ("process start -> main", c.get("process_start_to_main_s")),
            ("import flashdreams", c.get("import_s")),
            ("validate (sha256, fingerprint)", lt.get("validate")),
            ("install bundled kernels", lt.get("install_kernels")),
            ("load artifacts (weights, caches)", lt.get("load_artifacts")),
            ("load programs", lt.get("load_programs")),
            ("first call (warm-up)", lt.get("first_call")),
            ("session create", c.get("session_create_s")),
            ("first block", (c.get("block_ms") or [None])[0] and c["block_ms"][0] / 1e3),
            ("=> first frame from process start", c.get("first_frame_from_process_start_s")),
            ("=> first block from process start", c.get("first_block_from_process_start_s")),
        ]
        print("  cold start (fresh process, empty Inductor cache):")
        for label, v in rows:
            if v is not None:
                print(f"    {label:<36} {v:8.2f} s")
        print(f"    inductor cache counters: {c.get('inductor_counters')}")
        print(f"    block ms (engine): {[round(x, 1) for x in c.get('block_ms', [])]}")
    else:
        print(f"  cold start: {c.get('error')}")
    for v in res.get("cold_start_variants", []):
        lt = v.get("load_times", {})
        print(
            f"  cold start with {v['env']}: first frame {v.get('first_frame_from_process_start_s', v.get('error'))} s "
            f"(load programs {lt.get('load_programs')} s, first call {lt.get('first_call')} s)"
        )
    e = res.get("eager", {})
    if "block_ms" in e:
        print(f"    block ms (eager):  {[round(x, 1) for x in e['block_ms']]}")
    p = res.get("parity", {})
    if "rel_l2_per_block" in p:
        print(f"  engine vs eager latents, rel. L2 per block: {[f'{x:.2e}' for x in p['rel_l2_per_block']]}")
    a = res.get("aoti_probe", {})
    print(f"  AOTInductor package loads here: {a.get('loads')} ({a.get('error', 'ok')})")
    print(f"  total {res['total_seconds']:.1f} s -> {res['out']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="self-forcing-1.3b")
    ap.add_argument("--layers", type=int, default=0, help="build a slice of N layers (default: all)")
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--device", help="default: cuda if present")
    ap.add_argument("--dtype", help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--attention", help="sdpa | triton (default: triton on CUDA, sdpa on CPU)")
    ap.add_argument("--decoder", help="preset | wan-vae | taehv | none (default: taehv full size, preset tiny)")
    ap.add_argument("--blocks", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0, help="session seed (noise draws)")
    ap.add_argument("--weights-seed", type=int, default=0)
    ap.add_argument("--build-timeout", type=float, default=330.0, help="seconds the build may take")
    ap.add_argument("--aoti-timeout", type=float, default=150.0)
    ap.add_argument("--budget", type=float, default=530.0, help="seconds for the whole script (default 530)")
    ap.add_argument("--workdir", help="where the engine is built (default: a temp dir, removed after)")
    ap.add_argument("--no-eager", action="store_true", help="skip the eager reference (no parity) and the AOTI probe")
    ap.add_argument(
        "--cold-env",
        action="append",
        default=[],
        metavar="K=V[,K=V]",
        help="one more cold start with these environment variables (repeatable), e.g. TORCHINDUCTOR_COMPILE_THREADS=1",
    )
    ap.add_argument("--out", default="bench/results/engine-h100.json")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_args", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._child:
        return child_main(a._child, a._args)

    t_start = time.perf_counter()
    import torch

    from flashdreams.benchmark.environment import environment
    from flashdreams.presets import get_preset

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    builtin = get_preset(a.preset).builtin
    cfg = {
        "preset": a.preset,
        "layers": a.layers or None,
        "height": a.height or get_preset(a.preset).height,
        "width": a.width or get_preset(a.preset).width,
        "device": str(device),
        "dtype": a.dtype or ("bfloat16" if device.type == "cuda" else "float32"),
        "attention": a.attention or ("triton" if device.type == "cuda" else "sdpa"),
        "decoder": a.decoder or ("preset" if builtin else "taehv"),
        "blocks": a.blocks,
        "seed": a.seed,
        "weights_seed": a.weights_seed,
        "backend": "inductor",
    }
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="fd-engine-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    engine_dir = workdir / "engine"
    common = {**cfg, "workdir": str(workdir), "engine_dir": str(engine_dir)}
    res: dict = {"environment": environment(device), "config": cfg}
    print(f"engine bench: {cfg} in {workdir}", flush=True)

    deadline = t_start + a.budget
    left = lambda reserve=0.0: deadline - time.perf_counter() - reserve  # noqa: E731

    # 1. build (its own process, time-limited; ~200 s are kept for the steps after it)
    res["build"] = Child("build", common).result(min(a.build_timeout, left(60 if a.no_eager else 200)))
    print(f"build: {res['build'].get('seconds', res['build'].get('error'))}", flush=True)

    # 2. eager reference, with the AOTI probe beside it (the probe is mostly host compile time)
    if not a.no_eager:
        probe = Child("aoti-probe", common, {"FD_AOTI_FORCE": "1"})
        eager = Child("eager", {**common, "latents_out": str(workdir / "eager.pt")})
        res["eager"] = eager.result(min(240, left(110)))
        res["aoti_probe"] = probe.result(min(a.aoti_timeout, max(left(110), 5)))
        res["aoti_probe"]["loads"] = "error" not in res["aoti_probe"]

    # 3. cold start from the engine: a fresh process with empty Inductor/Triton caches, nothing beside it
    if (engine_dir / "manifest.json").is_file():
        cache = workdir / "inductor-cache-cold"
        shutil.rmtree(cache, ignore_errors=True)
        env = {"TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton")}
        cold = Child("cold", {**common, "latents_out": str(workdir / "engine.pt")}, env)
        res["cold_start"] = cold.result(max(left(5), 30))
        res["cold_start"]["env"] = {}
        for i, variant in enumerate(a.cold_env):
            extra = dict(kv.split("=", 1) for kv in variant.split(","))
            cache = workdir / f"inductor-cache-cold-{i}"
            env = {"TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton"), **extra}
            cold = Child(f"cold{i}", {**common, "latents_out": str(workdir / f"engine{i}.pt")}, env)
            res.setdefault("cold_start_variants", []).append({"env": extra, **cold.result(max(left(5), 30))})
    else:
        res["cold_start"] = {"error": "no engine was built"}

    # 5. parity
    if (workdir / "eager.pt").is_file() and (workdir / "engine.pt").is_file():
        errs = rel_l2_blocks(workdir / "engine.pt", workdir / "eager.pt")
        res["parity"] = {"rel_l2_per_block": errs, "max": max(errs), "against": f"eager, attention {cfg['attention']}"}
    res["total_seconds"] = time.perf_counter() - t_start
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res["out"] = str(out)
    out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    print_table(res)
    if not a.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
