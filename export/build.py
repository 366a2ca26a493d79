"""Build an engine directory: trace the step programs once, compile them, seal a manifest.

The build writes into a temporary sibling directory and renames it into place only at
the very end, so a failed or interrupted build leaves nothing that looks like an engine.
An existing non-engine directory is refused; an existing engine is replaced only with
`force=True`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from flashdreams import registry
from flashdreams.errors import InternalError, InvalidArgumentError
from flashdreams.export.backends import get_backend
from flashdreams.export.build_config import BuildConfig
from flashdreams.export.kernel_cache import bundle_kernels, capture_compile_caches, record_cpp_kernels
from flashdreams.export.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    dtype_name,
    file_record,
    machine_fingerprint,
    write_manifest,
)
from flashdreams.export.steps import step_programs
from flashdreams.models.decode_step import decoder_module
from flashdreams.models.family import LoadOptions
from flashdreams.parity.common import rel_l2

log = logging.getLogger(__name__)

# progress(phase, index, total): called before each phase; raising from it aborts the build.
Progress = Callable[[str, int, int], None]

# A graph whose build check (compiled vs eager on the same inputs) errs more than this fails the build.
CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float16: 0.1, torch.bfloat16: 0.1}


def weights_sha256(module: nn.Module) -> str:
    """sha256 over the state dict in name order: name, dtype, shape and raw bytes of each tensor."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(f"|{t.dtype}|{tuple(t.shape)}|".encode())
        data = t.detach().reshape(-1).contiguous().cpu()
        if data.numel():
            h.update(memoryview(data.view(torch.uint8).numpy()))
    return h.hexdigest()


def _check_out_dir(out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise InvalidArgumentError(f"engine output '{out}' exists and is not a directory")
    if (out / MANIFEST_NAME).is_file():
        if not force:
            raise InvalidArgumentError(f"'{out}' already holds an engine; pass --force (force=True) to replace it")
        return
    if any(out.iterdir()):
        raise InvalidArgumentError(
            f"'{out}' exists and is not an engine directory (no {MANIFEST_NAME}); refusing to write into it"
        )


def remove_stale_builds(out: str | os.PathLike) -> list[Path]:
    """Remove the `.<name>.building-<pid>-<hex>` siblings of `out` left by builds that were killed
    (SIGKILL, power loss) before they could clean up; a folder whose pid is alive is left alone.
    Returns the folders removed."""
    out = Path(out).absolute()
    if not out.parent.is_dir():
        return []
    prefix = f".{out.name}.building-"
    removed = []
    for entry in out.parent.iterdir():
        if not entry.name.startswith(prefix) or not entry.is_dir() or entry.is_symlink():
            continue
        pid_text = entry.name[len(prefix) :].split("-", 1)[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        log.warning("removing %s, left by build process %s which is no longer running", entry, pid_text)
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (one we may not signal counts as alive)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: someone else's live process
        return True
    return True


def _install(tmp: Path, out: Path) -> None:
    """Move the finished build into place; an old engine there is removed only after."""
    old = None
    if out.exists():
        if (out / MANIFEST_NAME).is_file():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
        else:
            out.rmdir()  # empty (checked before the build)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_engine(
    out_dir: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    preset=None,
    backend: str = "inductor",
    height: int | None = None,
    width: int | None = None,
    batch: int = 1,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    attention: str = "sdpa",
    decoder: str | None = "preset",
    decoder_weights: str | os.PathLike | None = None,
    random_weights: bool = False,
    seed: int = 0,
    force: bool = False,
    progress: Progress | None = None,
    precision: str = "bf16",
    config: BuildConfig | None = None,
    fp8_keep: str | None = None,
) -> dict:
    """Build an engine directory at `out_dir` and return its (sealed) manifest.

    Without a checkpoint the built-in tiny model is built (or, with `random_weights`, a
    full-size preset with seeded random weights, for speed runs); `seed` picks those
    weights (`weights_seed` of flashdreams.load). `decoder=None` builds an engine without
    a decoder (sessions return latents only); a real checkpoint's decoder needs
    `decoder_weights`. `precision` "fp8" builds the FP8 path (with attention "triton": FP8 linears, FP8 ring
    attention, the ring's e4m3 shadow in the session state); `fp8_keep` is flashdreams.load's, checked here.
    """
    import flashdreams
    from flashdreams.engine import check_fp8_keep, resolve_device_dtype

    t_start = time.perf_counter()
    if batch < 1:
        raise InvalidArgumentError(f"batch must be >= 1, got {batch}")
    check_fp8_keep(precision, fp8_keep)
    if precision == "fp8" and attention != "triton":
        raise InvalidArgumentError(
            f"precision 'fp8' needs attention 'triton' (our FP8 linears and ring attention), found '{attention}'"
        )
    if attention == "fa4":
        raise InvalidArgumentError(
            "attention 'fa4' (FlashAttention-4 for the KV ring) runs in eager sessions with CUDA graphs only; "
            "build engines with attention sdpa or triton"
        )
    out = Path(out_dir).absolute()
    _check_out_dir(out, force)
    gb = get_backend(backend, config)  # config None: BuildConfig(backend=backend)
    dev, dt = resolve_device_dtype(device, dtype)
    reason = gb.unavailable_reason(dev)
    if reason:
        raise InvalidArgumentError(f"backend '{backend}' cannot build here: {reason}")
    graph_attention = gb.build_attention(attention)
    preset_arg = preset if preset is not None else ("tiny" if checkpoint is None else "self-forcing-1.3b")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(out)  # what killed builds into the same place left behind
    tmp = out.with_name(f".{out.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    phases: dict[str, float] = {}
    step = [0]
    # load, hash, save, manifest, install, plus one per graph: 0 (shown as "?") until the model is
    # loaded and its graphs are known, so the total a reader sees never changes.
    total = [0]

    def phase(name: str) -> float:
        if progress is not None:
            progress(name, step[0], total[0])
        step[0] += 1
        return time.perf_counter()

    # Our Triton kernels (and on CUDA Inductor's autotuning results) land in `scratch` during
    # the build, the C++ kernels Inductor loads are recorded; all are bundled into the engine
    # below (export/kernel_cache.py).
    with capture_compile_caches(redirect_inductor=dev.type == "cuda") as scratch:
        cpp_loaded = record_cpp_kernels()
        try:
            t = phase("load model")
            preset_obj = registry.get_preset(preset_arg) if isinstance(preset_arg, str) else preset_arg
            opts = LoadOptions(
                source=None if checkpoint is None else str(checkpoint),
                device=dev,
                dtype=dt,
                attention=graph_attention,
                precision=precision,
                fp8_keep=fp8_keep,
                height=height,
                width=width,
                batch=batch,
                random_weights=random_weights,
                weights_seed=seed,
                decoder=decoder,
                decoder_weights=None if decoder_weights is None else str(decoder_weights),
            )
            model = registry.family(preset_obj.family).load(preset_obj, opts)
            progs = step_programs(model, gb.functional)
            total[0] = 5 + len(progs)
            phases["load model"] = time.perf_counter() - t

            t = phase("hash weights")
            w_hash = weights_sha256(model.weights)
            # A decoder object holds weights; a name alone (the arena draws its own pixels) holds none.
            dec_module = decoder_module(model.decoder) if hasattr(model.decoder, "__dict__") else None
            dec_hash = weights_sha256(dec_module) if dec_module is not None else None
            phases["hash weights"] = time.perf_counter() - t

            gb.begin_build(tmp, dev)
            graphs: dict[str, dict] = {}
            for prog in progs:
                t = phase(f"compile {prog.name}")
                record, fn = gb.build_graph(prog, tmp, dev)
                record = {"backend": backend, **record, **prog.to_dict()}
                record["files"] = [file_record(tmp, f) for f in record["files"]]
                record["build_check"] = _check_graph(prog, fn, gb.functional, dt)
                graphs[prog.name] = record
                phases[f"compile {prog.name}"] = time.perf_counter() - t
                del fn

            t = phase("save artifacts")
            produced = gb.finish_build(tmp)
            kernels = bundle_kernels(scratch, tmp, cpp_loaded())
            if kernels is not None:
                produced["kernels"] = kernels
            artifacts = {name: file_record(tmp, f) for name, f in produced.items()}
            phases["save artifacts"] = time.perf_counter() - t

            t = phase("write manifest")
            plan = model.plan
            manifest = {
                "schema_version": SCHEMA_VERSION,
                "fd_version": flashdreams.__version__,
                "model_id": preset_obj.name,
                "family": plan.family,
                "preset": preset_obj.to_dict(),
                "config_hash": config_hash(preset_obj),
                "weights_sha256": w_hash,
                "weights_source": model.source + (f" (seed {seed})" if checkpoint is None else ""),
                "weights_seed": seed if checkpoint is None else None,
                "stand_in_inputs": checkpoint is None and (getattr(preset_obj, "builtin", False) or random_weights),
                "backend": backend,
                "engine": {
                    "batch": batch,
                    "height": plan.meta.get("height"),
                    "width": plan.meta.get("width"),
                    "dtype": dtype_name(dt),
                    "device_type": dev.type,
                    "attention": attention,
                    "graph_attention": graph_attention,
                    "precision": precision,
                    "latent_shape": list(plan.latents.shape),
                },
                "plan": plan.to_dict(),
                "decoder": _decoder_record(model.decoder, progs, dec_hash, decoder_weights),
                "graphs": graphs,
                "artifacts": artifacts,
                "fingerprint": machine_fingerprint(dev),
                "build": {
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "seconds": None,
                    "phases": {},
                    "config": gb.config.to_dict(),
                },
            }
            phases["write manifest"] = time.perf_counter() - t
            manifest["build"]["phases"] = {k: round(v, 3) for k, v in phases.items()}
            manifest["build"]["seconds"] = round(time.perf_counter() - t_start, 3)
            sealed = write_manifest(tmp, manifest)

            phase("install")
            _install(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("built %s engine %s in %.1f s", backend, out, time.perf_counter() - t_start)
    return sealed


def _decoder_record(decoder, progs, dec_hash, weights) -> dict | None:
    if decoder is None:
        return None
    shapes = {p.name: p.outputs[0].shape for p in progs if p.name in ("decode_first", "decode")}
    own_pixels = isinstance(decoder, str)  # the network draws the frames itself: no decoder weights
    return {
        "name": decoder if own_pixels else decoder.name,
        "weights": None if own_pixels else str(weights) if weights is not None else "random (seeded)",
        "compiled": bool(shapes),
        "weights_sha256": dec_hash,
        "frames_first_block": shapes["decode_first"][1] if "decode_first" in shapes else None,
        "frames_per_block": shapes["decode"][1] if "decode" in shapes else None,
    }


def config_hash(preset) -> str:
    """A stable hash of the preset (its config and schedule): part of an engine's identity."""
    return hashlib.sha256(json.dumps(preset.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()
def _check_graph(prog, fn, functional: bool, dtype: torch.dtype) -> dict:
    """Run the compiled graph on the example inputs and compare with eager; fail on a gross mismatch."""
    if fn is None:
        return {"skipped": "the graph cannot run in the build process here"}
    inputs = prog.fresh_inputs()
    outs = fn(*inputs)
    errs, state = {}, []
    for spec, o, r in zip(prog.outputs, outs, prog.reference_outputs):
        if spec.name in prog.state_outputs:
            state.append(rel_l2(o, r))
        else:
            errs[spec.name] = rel_l2(o, r)
    if not functional:
        names = [s.name for s in prog.inputs]
        state += [rel_l2(inputs[names.index(n)], ref) for n, ref in prog.reference_state.items()]
    if state:
        errs["state (max over mutated inputs)"] = max(state)
    worst = max(errs.values()) if errs else 0.0
    tol = CHECK_TOLERANCE.get(dtype, 0.1)
    if not worst <= tol:  # also catches NaN
        raise InternalError(
            f"graph '{prog.name}': compiled output differs from eager by rel. L2 {worst:.3g} (> {tol}); "
            f"per output: {errs}. This is a compiler or export bug; please report it"
        )
    return {"against": "eager", "max_rel_l2": worst, "rel_l2": errs}
