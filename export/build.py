"""Build an engine directory: trace the step programs once, compile them, seal a manifest.

The build writes into a temporary sibling directory and renames it into place only at
the very end, so a failed or interrupted build leaves nothing that looks like an engine.
An existing non-engine directory is refused; an existing engine is replaced only with
`force=True`.
"""

from __future__ import annotations

import hashlib
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

from flashdreams.errors import InternalError, InvalidArgumentError
from flashdreams.export.backends import get_backend
from flashdreams.export.kernel_cache import bundle_kernels, capture_compile_caches
from flashdreams.export.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    dtype_name,
    file_record,
    machine_fingerprint,
    write_manifest,
)
from flashdreams.export.steps import GRAPH_OF_CALL, decode_programs, decoder_module, dit_program, encode_program
from flashdreams.parity.common import rel_l2
from flashdreams.presets import Preset

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
    preset: str | Preset | None = None,
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
) -> dict:
    """Build an engine directory at `out_dir` and return its (sealed) manifest.

    Without a checkpoint the built-in tiny model is built (or, with `random_weights`, a
    full-size preset with seeded random weights, for speed runs); `seed` picks those
    weights (`weights_seed` of flashdreams.load). `decoder=None` builds an engine without
    a decoder (sessions return latents only); a real checkpoint's decoder needs
    `decoder_weights`.
    """
    import flashdreams
    from flashdreams.engine import load, resolve_device_dtype

    t_start = time.perf_counter()
    if batch < 1:
        raise InvalidArgumentError(f"batch must be >= 1, got {batch}")
    out = Path(out_dir).absolute()
    _check_out_dir(out, force)
    gb = get_backend(backend)
    dev, dt = resolve_device_dtype(device, dtype)
    reason = gb.unavailable_reason(dev)
    if reason:
        raise InvalidArgumentError(f"backend '{backend}' cannot build here: {reason}")
    graph_attention = gb.build_attention(attention)
    preset_arg = preset if preset is not None else ("tiny" if checkpoint is None else "self-forcing-1.3b")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    phases: dict[str, float] = {}
    step = [0]
    total = [4]

    def phase(name: str) -> float:
        if progress is not None:
            progress(name, step[0], total[0])
        step[0] += 1
        return time.perf_counter()

    # Our Triton kernels (and on CUDA Inductor's autotuning results) land in `scratch` during
    # the build and are bundled into the engine below (export/kernel_cache.py).
    with capture_compile_caches(redirect_inductor=dev.type == "cuda") as scratch:
        try:
            t = phase("load model")
            eager = load(
                checkpoint,
                preset=preset_arg,
                device=dev,
                dtype=dt,
                attention=graph_attention,
                decoder=decoder,
                height=height,
                width=width,
                random_weights=random_weights,
                weights_seed=seed,
                decoder_weights=decoder_weights,
            )
            progs = [encode_program(eager, batch), dit_program(eager, batch, gb.functional)]
            dec_progs = decode_programs(eager, batch, gb.functional)
            progs += dec_progs or []
            total[0] = 4 + len(progs)
            phases["load model"] = time.perf_counter() - t

            t = phase("hash weights")
            w_hash = weights_sha256(eager.backend.model)
            dec_module = decoder_module(eager.decoder) if eager.decoder is not None else None
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
            kernels = bundle_kernels(scratch, tmp)
            if kernels is not None:
                produced["kernels"] = kernels
            artifacts = {name: file_record(tmp, f) for name, f in produced.items()}
            phases["save artifacts"] = time.perf_counter() - t

            t = phase("write manifest")
            spec = eager.spec
            sched = spec.schedule
            calls = ["denoise"] * sched.num_steps + (["decode"] if eager.decoder is not None else []) + ["commit"]
            manifest = {
                "schema_version": SCHEMA_VERSION,
                "fd_version": flashdreams.__version__,
                "model_id": spec.preset.name,
                "preset": spec.preset.to_dict(),
                "config": spec.preset.model.to_dict(),
                "config_hash": spec.preset.model.hash(),
                "weights_sha256": w_hash,
                "weights_source": eager.source + (f" (seed {seed})" if checkpoint is None else ""),
                "weights_seed": seed if checkpoint is None else None,
                "backend": backend,
                "engine": {
                    "batch": batch,
                    "height": spec.height,
                    "width": spec.width,
                    "dtype": dtype_name(dt),
                    "device_type": dev.type,
                    "attention": attention,
                    "graph_attention": graph_attention,
                    "latent_shape": [
                        batch,
                        spec.latent_channels,
                        spec.num_frame_per_block,
                        spec.latent_h,
                        spec.latent_w,
                    ],
                    "text_len": eager.backend.text_len,
                    "text_dim": spec.text_dim,
                    "num_layers": eager.backend.num_layers,
                    "num_heads": eager.backend.num_heads,
                    "head_dim": eager.backend.head_dim,
                    "ring": spec.ring.to_dict(),
                    "schedule": {
                        **sched.to_dict(),
                        "block_calls": calls,
                        "graph_of_call": {c: g for c, g in GRAPH_OF_CALL.items() if c != "decode" or dec_progs},
                        "first_block_graph_of_call": {"decode": "decode_first"} if dec_progs else {},
                    },
                },
                "decoder": _decoder_record(eager.decoder, dec_progs, dec_hash, decoder_weights),
                "graphs": graphs,
                "artifacts": artifacts,
                "fingerprint": machine_fingerprint(dev),
                "build": {
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "seconds": None,
                    "phases": {},
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


def _decoder_record(decoder, dec_progs, dec_hash, weights) -> dict | None:
    if decoder is None:
        return None
    return {
        "name": decoder.name,
        "weights": str(weights) if weights is not None else "random (seeded)",
        "compiled": bool(dec_progs),
        "weights_sha256": dec_hash,
        "frames_first_block": dec_progs[0].outputs[0].shape[1] if dec_progs else None,
        "frames_per_block": dec_progs[1].outputs[0].shape[1] if dec_progs else None,
    }


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
