"""Running one benchmark configuration: load or build, warm up, capture, then measure rollouts."""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import flashdreams
from flashdreams.benchmark.environment import NvmlSampler
from flashdreams.benchmark.report import precision_label, run_tflops
from flashdreams.engine_runtime import built_attention
from flashdreams.errors import InvalidArgumentError

if TYPE_CHECKING:
    from flashdreams.export.build_config import BuildConfig

log = logging.getLogger(__name__)


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), for cold-start figures."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / ticks
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class BenchConfig:
    source: str | None = None
    preset: str | None = None
    random_weights: bool = False
    blocks: int = 7
    rollouts: int = 1
    steady_blocks: int = 0
    steady_inputs: bool = False  # the steady rollout sets a new value of every per-block input before each block
    input_latency: int = 0  # blocks measuring input set -> that block's frames on the host
    profile_block: int | None = None  # also profile this block index (flashdreams.benchmark.profile)
    warm_up: bool = False  # Session.warm_up() before the first block: it replays at steady speed
    height: int | None = None
    width: int | None = None
    decoder: str | None = "preset"
    device: str | None = None
    dtype: str | None = None
    seed: int = 0
    cuda_graphs: bool | None = None
    workdir: str | None = None
    engine_dir: str | None = None  # backend "engine": load this prebuilt engine directory
    precision: str = "bf16"
    fp8_keep: str | None = None  # the linears fp8 runs keep in bf16 (flashdreams.load's fp8_keep); None: the model's
    decoder_weights: str | None = None
    weights_seed: int = 0  # seed of built-in / random weights (`seed` drives the sessions' noise)
    build_config: BuildConfig | None = None  # how engines built in-process are compiled (default: BuildConfig())
    extra: dict = field(default_factory=dict)

    @property
    def run_fp8_keep(self) -> str | None:
        """fp8_keep as the current run takes it: only an fp8 run has linears to keep in bf16."""
        return self.fp8_keep if self.precision == "fp8" else None


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "min": v[0], "max": v[-1], "n": len(v)}


def _load(cfg: BenchConfig, backend: str, attention: str) -> tuple[flashdreams.Engine, dict]:
    """The engine for one backend, with the time its build and its load took."""
    times: dict[str, float] = {}
    kw = dict(
        preset=cfg.preset,
        device=cfg.device,
        dtype=cfg.dtype,
        attention=attention,
        height=cfg.height,
        width=cfg.width,
        decoder_weights=cfg.decoder_weights,
    )
    if backend == "eager":
        t0 = time.perf_counter()
        engine = flashdreams.load(
            cfg.source,
            decoder=cfg.decoder,
            random_weights=cfg.random_weights,
            weights_seed=cfg.weights_seed,
            precision=cfg.precision,
            fp8_keep=cfg.run_fp8_keep,
            **kw,
        )
        times["load_s"] = time.perf_counter() - t0
        return engine, times
    if backend == "engine":
        if not cfg.engine_dir:
            raise InvalidArgumentError("backend 'engine' needs --engine DIR (an engine built by fd-build)")
        t0 = time.perf_counter()
        engine = flashdreams.load(cfg.engine_dir, device=cfg.device, attention=attention, decoder=cfg.decoder)
        times["load_s"] = time.perf_counter() - t0
        times.update({f"load_{k}": v for k, v in getattr(engine, "load_times", {}).items()})
        times["engine_backend"] = engine.manifest.get("backend") if hasattr(engine, "manifest") else None
        return engine, times
    try:
        from flashdreams.export.build import build_engine
    except ImportError as exc:
        raise InvalidArgumentError(f"backend '{backend}' needs flashdreams.export ({exc})") from None
    out = os.path.join(cfg.workdir or tempfile.mkdtemp(prefix="fd-bench-"), f"engine-{backend}-{attention}")
    t0 = time.perf_counter()
    config = cfg.build_config if cfg.build_config is not None and cfg.build_config.backend == backend else None
    build_engine(
        out,
        checkpoint=cfg.source,
        backend=backend,
        precision=cfg.precision,
        fp8_keep=cfg.run_fp8_keep,
        random_weights=cfg.random_weights,
        seed=cfg.weights_seed,
        decoder=cfg.decoder,
        config=config,
        **kw,
    )
    times["build_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine = flashdreams.load(out, device=cfg.device, attention=attention, decoder=cfg.decoder)
    times["load_s"] = time.perf_counter() - t0
    times.update({f"load_{k}": v for k, v in getattr(engine, "load_times", {}).items()})
    return engine, times


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rollout(session, blocks: int, inputs=None, memory: list | None = None) -> tuple[list, float]:
    """`blocks` steps with stage marks; no host sync inside the loop. Returns results and wall seconds.
    `inputs(k)` (optional) gives the inputs to set before block k; `memory` (optional) gets the allocator's
    bytes after each block (a host-side query: no sync)."""
    t0 = time.perf_counter()
    results = []
    for k in range(blocks):
        for name, value in (inputs(k) if inputs else {}).items():
            session.set_input(name, value)
        result = session.step()
        if memory is not None:
            # Keep the stage marks, not the block's copies of its frames and latents: 1000 blocks of
            # Matrix-Game would hold 8.8 GB and the memory series would show the bench, not the session.
            frames = None if result.frames is None else result.frames.to("meta")
            result = dataclasses.replace(result, latents=result.latents.to("meta"), frames=frames, frames_buffer=None)
            if session.device.type == "cuda":
                memory.append(torch.cuda.memory_allocated(session.device))
        results.append(result)
    _sync(session.device)
    return results, time.perf_counter() - t0


def varying_inputs(engine, seed: int = 0):
    """inputs(k): a new valid value of every per-block input for block k (seeded by k): uniform in its range
    (keys, mouse, intrinsics), the rule's stand-in where it has one (poses), normal draws otherwise (a prompt);
    built on the host and copied in by set_input, as a live host sends them."""
    from flashdreams.models.input_rules import sample_valid

    specs = [s for s in engine.input_specs() if s.when == "block" and s.torch_dtype().is_floating_point]

    def inputs(k: int) -> dict:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + k)
        return {spec.name: sample_valid(spec, spec.shape, gen) for spec in specs}

    return inputs


def input_latency(session, inputs, blocks: int) -> list[float]:
    """ms from setting block k's new inputs to its frames on the host (its first frame is the first that
    can reflect them), for `blocks` blocks; each block waits for its frames, as a live host does."""
    out = []
    for k in range(blocks):
        t0 = time.perf_counter()
        for name, value in inputs(k).items():
            session.set_input(name, value)
        result = session.step()
        if result.frames is not None:
            result.frames_cpu()
        else:
            _sync(session.device)
        out.append((time.perf_counter() - t0) * 1e3)
    _sync(session.device)
    return out


def run_config(cfg: BenchConfig, backend: str, attention: str, first_in_process: bool) -> dict:
    """Benchmark one (backend, attention) pair; returns its results.json entry."""
    if torch.cuda.is_available() and (cfg.device is None or torch.device(cfg.device).type == "cuda"):
        torch.cuda.reset_peak_memory_stats()
    t_start = time.perf_counter()
    engine, times = _load(cfg, backend, attention)
    device = engine.device
    spec = engine.spec
    # Stand-ins for every required input (a prompt for causal Wan, a start image for Matrix-Game, ...).
    session = engine.session(inputs=engine.default_inputs(), seed=cfg.seed, cuda_graphs=cfg.cuda_graphs)
    session.timing = True

    # Cold: the first block of the first rollout (eager warm-up on CUDA, or a replay after --warm-up),
    # to its frames.
    warm_up_s = session.warm_up() if cfg.warm_up else None
    t0 = time.perf_counter()
    first = session.step()
    if first.frames_ready is not None:
        first.frames_ready.synchronize()
    _sync(device)
    cold = {"first_block_s": time.perf_counter() - t0, "warm_up_s": warm_up_s, **times}
    cold["load_to_first_frame_s"] = time.perf_counter() - t_start
    # Process start to first frame means that only for the first run of a process: later runs
    # would add the earlier runs' time. Their figure is load_to_first_frame_s alone.
    cold["process_start_to_first_frame_s"] = process_age_s() if first_in_process else None
    # Warm-up: the rest of the rollout (each block timed to the end of its work: how the first blocks
    # after load run), then a second rollout so every block kind is captured.
    t0 = time.perf_counter()
    first_ms = [cold["first_block_s"] * 1e3]
    for _ in range(cfg.blocks - 1):
        tb = time.perf_counter()
        session.step()
        _sync(device)
        first_ms.append((time.perf_counter() - tb) * 1e3)
    cold["first_rollout_block_ms"] = [round(ms, 2) for ms in first_ms]
    session.reset()
    _rollout(session, cfg.blocks)
    cold["warmup_and_capture_s"] = time.perf_counter() - t0
    cold["capture_s"] = session.capture_s

    per_block: list[list[dict]] = []
    warm_first_frame = []
    fps_wall = []
    with NvmlSampler(device) as nvml:
        for _ in range(max(1, cfg.rollouts)):
            t0 = time.perf_counter()
            session.reset()
            r0 = session.step()
            if r0.frames_ready is not None:
                r0.frames_ready.synchronize()
            _sync(device)
            warm_first_frame.append((time.perf_counter() - t0) * 1e3)
            rest, wall = _rollout(session, cfg.blocks - 1)
            results = [r0, *rest]
            frames = sum(r.frames.shape[1] for r in results if r.frames is not None)
            if frames:
                fps_wall.append(frames / (wall + warm_first_frame[-1] / 1e3))
            per_block.append([_block_entry(r, spec, engine) for r in results])
        steady, memory = [], []
        if cfg.steady_blocks:
            session.reset()
            changing = varying_inputs(engine, cfg.seed) if cfg.steady_inputs else None
            results, wall = _rollout(session, cfg.steady_blocks, changing, memory)
            steady = [_block_entry(r, spec, engine) for r in results]
        latency = []
        if cfg.input_latency:
            session.reset()
            latency = input_latency(session, varying_inputs(engine, cfg.seed + 1), cfg.input_latency)
    out = _summarise(
        cfg, backend, attention, engine, cold, per_block, steady, warm_first_frame, fps_wall, nvml.summary(), device
    )
    if steady:
        out["steady_state"]["inputs_changed_every_block"] = cfg.steady_inputs
        if memory:
            out["steady_state"]["allocated_bytes_first_last_max"] = [memory[0], memory[-1], max(memory)]
            out["steady_state"]["allocated_bytes_series"] = memory[:: max(1, len(memory) // 200)]
    if latency:
        lat = _percentiles(latency[1:] if len(latency) > 1 else latency)  # block 0 is its own kind
        block = out["latency"]["total_ms"].get("p50")
        out["input_to_frames_ms"] = {
            **lat,
            "blocks": len(latency),
            "over_block_p50": lat["p50"] / block if block else None,
        }
    if cfg.profile_block is not None:
        from flashdreams.benchmark.profile import profile_block

        out["profile"] = profile_block(session, cfg.profile_block)
    return out


def _block_entry(result, spec, engine) -> dict:
    ms = result.stage_ms()
    entry = {"block": result.block, **{f"{k}_ms": v for k, v in ms.items()}}
    entry["total_ms"] = sum(ms.values())
    # Frames are handed out when the decode ends: every stage before the commit counts (OmniDreams'
    # HD-map encode runs first, inside the block program).
    entry["to_frames_ms"] = sum(v for k, v in ms.items() if k != "commit")
    entry["frames"] = int(result.frames.shape[1]) if result.frames is not None else 0
    # The model's matmul FLOPs of this block come from its plan (the family counts them).
    flops = spec.block_flops(result.block) or 0.0
    dit_ms = ms.get("denoise", 0.0) + ms.get("commit", 0.0)
    entry["dit_tflop"] = flops / 1e12
    entry["dit_tflops"] = flops / dit_ms / 1e9 if dit_ms > 0 and flops else None
    return entry


def _summarise(cfg, backend, attention, engine, cold, per_block, steady, warm_ff, fps_wall, nvml, device) -> dict:
    flat = [b for rollout in per_block for b in rollout]
    stages = {
        k: _percentiles([b[k] for b in flat if k in b])
        for k in ("total_ms", "encode_ms", "denoise_ms", "decode_ms", "commit_ms", "to_frames_ms")
        if k != "encode_ms" or any(k in b for b in flat)  # only OmniDreams' plans have an encode stage
    }
    by_index = {}
    for b in flat:
        by_index.setdefault(b["block"], []).append(b)
    index_table = [
        {
            "block": i,
            **{k: sorted(x[k] for x in bs)[len(bs) // 2] for k in bs[0] if k.endswith("_ms")},
            "dit_tflops": sorted(x["dit_tflops"] or 0 for x in bs)[len(bs) // 2],
            "dit_tflop": bs[0]["dit_tflop"],
        }
        for i, bs in sorted(by_index.items())
    ]
    out = {
        "backend": backend,
        # what ran: a built engine's attention is its build's, whatever --attention said
        "attention": built_attention(engine.manifest["engine"]) if hasattr(engine, "manifest") else attention,
        "precision": precision_label(engine.precision, engine.backend.dtype),  # what ran (an engine: as built)
        "precision_option": cfg.precision,
        "fp8_keep": cfg.run_fp8_keep,
        # read after the load: an FP8 load sets it (kernels.fp8_linear.prefer_workspace_free_gemms), and the
        # environment's record is taken before any load (None: torch's default)
        "cublaslt_workspace_kib": os.environ.get("CUBLASLT_WORKSPACE_SIZE"),
        "dtype": str(engine.backend.dtype).removeprefix("torch."),
        "engine": repr(engine),
        "cold_start": cold,
        "warm_first_frame_ms": _percentiles(warm_ff),
        "latency": stages,
        "per_block_index": index_table,
        "blocks": flat,
        "fps_wall": max(fps_wall) if fps_wall else None,
        "frames_per_steady_block": engine.spec.frames_per_block,
        "nvml": nvml,
    }
    p50 = stages["total_ms"].get("p50")
    if p50:
        out["fps_steady"] = engine.spec.frames_per_block * 1e3 / p50
        out["jitter_ms"] = stages["total_ms"]["p99"] - stages["total_ms"]["p50"]
    if steady:
        tot = _percentiles([b["total_ms"] for b in steady])
        out["steady_state"] = {
            "blocks": len(steady),
            "total_ms": tot,
            "to_frames_ms": _percentiles([b["to_frames_ms"] for b in steady]),
            "p99_over_p50": tot["p99"] / tot["p50"],
            "series_ms": [b["total_ms"] for b in steady],
        }
    if device.type == "cuda":
        # GiB (2^30 bytes), named so; results before this change called the same numbers "_gb".
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    out["dit_tflops_median"], out["dit_tflops_best"] = run_tflops(out)
    return out
