"""The command line the micro-benchmark scripts of `bench/` share: `--out`, `--smoke`, `--reps`.

Each script times a few kernels or model pieces beside their baselines in one process and writes
one JSON file; on the GPU machine it runs at full size, with `--smoke` on a CPU at tiny shapes
(under Triton's interpreter, which a script selects before triton is first imported).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from flashdreams.benchmark.environment import time_calls_ms


def micro_bench_setup(
    doc: str, default_reps: int, smoke_reps: int = 1, warmup: int = 3
) -> tuple[argparse.Namespace, torch.device, Callable[[Callable[[], object]], float]]:
    """Parse the shared options; returns (args, device, ms): `ms(fn)` is the median of `reps` timed
    calls in milliseconds (CUDA events on the GPU) after `warmup` untimed ones (none with --smoke)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    p.add_argument("--reps", type=int, default=default_reps, help="timed calls per measurement (median)")
    args = p.parse_args()
    if args.reps < 1:
        p.error("--reps must be >= 1")
    dev = torch.device("cpu" if args.smoke else "cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: run with --smoke on a CPU")
    reps = smoke_reps if args.smoke else args.reps
    warm = 0 if args.smoke else warmup

    def ms(fn: Callable[[], object]) -> float:
        return statistics.median(time_calls_ms(fn, dev, reps, warmup=warm))

    return args, dev, ms


def graph_ms(
    fn: Callable[[], object], device: torch.device, ms: Callable[[Callable[[], object]], float], calls: int = 20
) -> float:
    """Milliseconds of one call of fn as a captured model replays it: on a GPU `calls` calls captured in one
    CUDA graph (compiled and warmed on a side stream first) and the replay timed by `ms`, so the host's
    dispatch of each call (~45 us for a custom op) drops out; on a CPU fn timed by `ms` as it is."""
    if device.type != "cuda":
        return ms(fn)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return ms(graph.replay) / calls


def write_result(path: Path, result: dict) -> None:
    """The script's JSON result at `path` (its folder made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))


def decode_switch_off_on(
    model: Any, latents: torch.Tensor, state: Any, switch: Callable[[bool], None], ms: Callable, rounds: int
) -> tuple[dict, dict]:
    """A streaming decoder's (TAEHV's) steady block with a module switch off (False) and on (True): first each
    form's frames from the same carried state (restored after each), then `rounds` alternated timed rounds, so
    drift hits both. Returns ({form: frames}, {form: [ms, ...]}); leaves the switch on (the default)."""
    outs: dict = {}
    times: dict = {False: [], True: []}
    with torch.no_grad():
        model.decode_stream(latents, state)  # past the stream's first block
        saved = [m.clone() for m in state.memory]
        for on in (False, True):
            switch(on)
            outs[on] = model.decode_stream(latents, state)
            for m, s in zip(state.memory, saved):
                m.copy_(s)
        for _ in range(rounds):
            for on in (False, True):
                switch(on)
                times[on].append(ms(lambda: model.decode_stream(latents, state)))
    switch(True)
    return outs, times
