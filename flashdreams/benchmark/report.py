"""fd-bench output: the printed table, the PNG plots, and ratios against another results.json."""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

log = logging.getLogger(__name__)


SHORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}


def precision_label(precision: str, dtype: object) -> str:
    """What a run computed in: "fp8" for --precision fp8, else its dtype (bf16, fp16, fp32), never the
    --precision default when the dtype differs (a float32 CPU run is "fp32", not "bf16")."""
    if precision == "fp8":
        return "fp8"
    name = str(dtype).removeprefix("torch.")
    return SHORT_DTYPES.get(name, name)


def _fmt(v, unit: str = "", digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}{unit}"


# The run table's columns: (header, width, value of a run). One meaning each; LEGEND says which.
COLUMNS: list[tuple[str, int]] = [
    ("backend", 10),
    ("attn", 8),
    ("prec", 6),
    ("p50 ms", 9),
    ("p90 ms", 9),
    ("p99 ms", 9),
    ("denoise", 9),
    ("decode", 8),
    ("commit", 8),
    ("frames@ms", 10),
    ("fps", 7),
    ("TFLOP/s med", 12),
    ("TFLOP/s best", 13),
    ("peak GiB", 9),
    ("proc->frame s", 14),
    ("load->frame s", 14),
]
LEGEND = (
    "columns: p50/p90/p99 ms = whole block (every stage: [encode +] denoise + decode + commit) over every "
    "measured block; denoise/decode/commit = p50 ms of that stage; frames@ms = p50 of every stage before the "
    "commit ([encode +] denoise + decode: frames handed out); "
    "fps = frames per block / p50; TFLOP/s med / best = the DiT's matmul FLOPs over its denoise + commit time, "
    "median over measured blocks / best block; peak GiB = peak allocated GPU memory in GiB (2^30 bytes); "
    "proc->frame s = process start to first frame (only for the first run of a process, else '-'); "
    "load->frame s = this run's load (or build + load) to its first frame"
)


def peak_gib(run: dict) -> float | None:
    """Peak allocated GPU memory in GiB (older results.json called the same number peak_memory_gb)."""
    v = run.get("peak_memory_gib", run.get("peak_memory_gb"))
    return None if v is None else float(v)


def run_tflops(run: dict) -> tuple[float | None, float | None]:
    """(median over measured blocks, best block) of the DiT's achieved TFLOP/s; None when not counted."""
    tf = sorted(b["dit_tflops"] for b in run.get("blocks", []) if b.get("dit_tflops"))
    if not tf:
        tf = sorted(b["dit_tflops"] for b in run.get("per_block_index", []) if b.get("dit_tflops"))
    if not tf:
        return None, None
    return tf[(len(tf) - 1) // 2], tf[-1]


def _cells(r: dict) -> list[str]:
    lat = r["latency"]
    med, best = run_tflops(r)
    cold = r.get("cold_start", {})
    return [
        backend_label(r),
        r["attention"],
        r.get("precision", "bf16"),
        _fmt(lat["total_ms"].get("p50")),
        _fmt(lat["total_ms"].get("p90")),
        _fmt(lat["total_ms"].get("p99")),
        _fmt(lat["denoise_ms"].get("p50")),
        _fmt(lat["decode_ms"].get("p50")),
        _fmt(lat["commit_ms"].get("p50")),
        _fmt(lat["to_frames_ms"].get("p50")),
        _fmt(r.get("fps_steady")),
        _fmt(med),
        _fmt(best),
        _fmt(peak_gib(r), digits=2),
        _fmt(cold.get("process_start_to_first_frame_s")),
        _fmt(cold.get("load_to_first_frame_s")),
    ]


def table(results: dict) -> str:
    """A short human table, one row per run, its columns named in the header and explained below it."""
    lines = []
    env = results["environment"]
    ceil = results.get("ceilings", {})
    lines.append(
        f"device {env.get('device_name')}  torch {env.get('torch')}  triton {env.get('triton')}  "
        f"matmul peak {_fmt(ceil.get('matmul_tflops'), ' TFLOP/s')}  copy {_fmt(ceil.get('copy_gbps'), ' GB/s', 0)}"
    )
    c = results["config"]
    lines.append(f"model {c['preset']}  {c['height']}x{c['width']}  blocks {c['blocks']}  decoder {c['decoder']}")
    widths = [max(w, len(h) + 2) for h, w in COLUMNS]  # at least two spaces between headers
    widths[0] = max([widths[0]] + [len(backend_label(r)) + 2 for r in results["runs"]])

    def row(cells: list[str]) -> str:
        return "".join(f"{v:<{w}}" if i < 3 else f"{v:>{w}}" for i, (v, w) in enumerate(zip(cells, widths)))

    lines.append(row([h for h, _ in COLUMNS]))
    lines.extend(row(_cells(r)) for r in results["runs"])
    for f in results.get("failed_runs", []):
        lines.append(f"{f['backend']}/{f['attention']}/{f['precision']} FAILED: {f['error']}")
    lines.extend(textwrap.wrap(LEGEND, 118, subsequent_indent="  "))
    lines.append("first rollout after load (ms per block" + (", after warm_up" if c.get("warm_up") else "") + "):")
    for r in results["runs"]:
        first = r.get("cold_start", {}).get("first_rollout_block_ms")
        if first:
            blocks = "  ".join(f"{i}:{ms:.1f}" for i, ms in enumerate(first))
            lines.append(f"  {backend_label(r)}/{r['attention']}/{r.get('precision', 'bf16')}: {blocks}")
    lines.append("per block index (median ms, total / to frames):")
    for r in results["runs"]:
        row = "  ".join(f"{b['block']}:{b['total_ms']:.1f}/{b['to_frames_ms']:.1f}" for b in r["per_block_index"])
        lines.append(f"  {backend_label(r)}/{r['attention']}/{r.get('precision', 'bf16')}: {row}")
    for r in results["runs"]:
        prof = r.get("profile")
        if not prof:
            continue
        lines.append(
            f"profile of block {prof['block']} ({'/'.join(_run_id(r))}): wall {prof['wall_ms']:.1f} ms, "
            f"kernels {prof['kernel_ms']:.1f} ms ({_fmt(prof['kernel_coverage'] and 100 * prof['kernel_coverage'])}%)"
        )
        lines.append(
            "  " + "  ".join(f"{c} {v['ms']:.1f} ms ({100 * v['share']:.0f}%)" for c, v in prof["categories"].items())
        )
    return "\n".join(lines)


def plots(results: dict, out_dir: Path) -> list[Path]:
    """latency_per_block.png, stages.png, backends.png; nothing if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install 'flashdreams[bench]')")
        return []
    runs = results["runs"]
    labels = [f"{backend_label(r)}/{r['attention']}/{r.get('precision', 'bf16')}" for r in runs]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    for r, label in zip(runs, labels):
        idx = [b["block"] for b in r["per_block_index"]]
        ax.plot(idx, [b["total_ms"] for b in r["per_block_index"]], marker="o", label=f"{label} block")
        ax.plot(idx, [b["to_frames_ms"] for b in r["per_block_index"]], ls="--", label=f"{label} to frames")
    ax.set_xlabel("block index (the cache grows until it is full)")
    ax.set_ylabel("ms (median)")
    ax.set_title(f"{results['config']['preset']} on {results['environment'].get('device_name')}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    written.append(_save(fig, out_dir / "latency_per_block.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(runs)
    for stage in ("denoise", "decode", "commit"):
        vals = [r["latency"][f"{stage}_ms"].get("p50", 0.0) for r in runs]
        ax.bar(labels, vals, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("ms per block (p50)")
    ax.set_title("per-stage breakdown")
    ax.legend()
    written.append(_save(fig, out_dir / "stages.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(labels, [r.get("fps_steady") or 0 for r in runs])
    ax.set_ylabel("frames per second (steady state)")
    ax.set_title("backend comparison")
    written.append(_save(fig, out_dir / "backends.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def backend_label(r: dict) -> str:
    """The run's backend, marked when cuDNN's algorithm search was on (fd-bench --cudnn-benchmark)."""
    return r["backend"] + ("+cudnn-bm" if r.get("cudnn_benchmark") else "")


def _run_id(r: dict) -> tuple[str, str, str]:
    """What identifies a run across two results.json files: backend, attention and precision."""
    return backend_label(r), r["attention"], r.get("precision", "bf16")


def compare(results: dict, other_path: str | Path) -> str:
    """Ratios other / this for runs present in both (same backend, attention and precision)."""
    other = json.loads(Path(other_path).read_text())
    theirs = {_run_id(r): r for r in other["runs"]}
    lines = [f"ratios against {other_path} (>1: this run is faster / smaller)"]
    for r in results["runs"]:
        label = "/".join(_run_id(r))
        o = theirs.get(_run_id(r))
        if o is None:
            lines.append(f"  {label}: not in the other run")
            continue
        parts = []
        for stage in ("total_ms", "to_frames_ms", "denoise_ms", "commit_ms", "decode_ms"):
            a, b = r["latency"][stage].get("p50"), o["latency"][stage].get("p50")
            if a and b:
                parts.append(f"{stage[:-3]} {b / a:.2f}x")
        if peak_gib(r) and peak_gib(o):
            parts.append(f"memory {peak_gib(o) / peak_gib(r):.2f}x")
        lines.append(f"  {label}: " + ", ".join(parts))
    return "\n".join(lines)
