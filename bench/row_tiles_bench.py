"""The AdaLN row kernels (kernels/adaln.py) under other row tiles: rows per program and warps.

`_adaln_kernel` takes its tile from `adaln.adaln_tile` ("default" below); its first run here (next74-h100)
timed `_common.row_tile`'s rule, 4096 // next_pow2(D) rows a program and 8 warps from 4096 elements ("2x8w"
at Self-Forcing's and OmniDreams' widths). In Self-Forcing's FP8 block 5 (bench/results/next62-h200) the
kernel's 455 calls took 10.7 ms, 23.5 us each, where the bytes of a fused residual + norm pass (x, y read;
x', h written) move in ~12 us at the H200's copy rate. This times each pass the Wan blocks run, at each
model's steady block, under the default rule and the tiles in TILES, with the outputs compared bit for bit
against the default's; GB/s counts the bytes each pass must move. On a GPU each form is a CUDA graph of
GRAPH_CALLS calls (`benchmark.micro.graph_ms`).

    python bench/row_tiles_bench.py --out tiles.json            # GPU: ~30 s
    python bench/row_tiles_bench.py --smoke --out /tmp/t.json   # CPU, interpreter, tiny shapes
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

import torch  # noqa: E402

from flashdreams.benchmark.environment import environment  # noqa: E402
from flashdreams.benchmark.micro import graph_ms, micro_bench_setup, write_result  # noqa: E402

# name: (tokens, width, frames of the block)
SHAPES = {
    "self-forcing": (4680, 1536, 3),
    "omnidreams": (7040, 2048, 2),
    "lingbot": (4524, 5120, 3),
}
SMOKE_SHAPES = {"tiny": (24, 96, 2)}
# (rows a program, warps)
TILES = [(1, 4), (1, 8), (2, 4), (2, 8), (2, 16), (4, 8), (4, 16), (8, 16)]
GRAPH_CALLS = 20


def passes(adaln, x, y, gate, shift, scale, weight, bias) -> dict:
    """The three row passes of a Wan block (FP8 inputs of the next linear where the engine quantizes them)."""
    fp8 = torch.float8_e4m3fn
    return {
        "gated_residual_adaln fp8": lambda: adaln.gated_residual_adaln(x, y, gate, shift, scale, 1e-6, fp8),
        "gated_residual_layer_norm": lambda: adaln.gated_residual_layer_norm(x, y, gate, weight, bias, 1e-6),
        "residual_adaln fp8": lambda: adaln.residual_adaln(x, y, shift, scale, 1e-6, fp8),
    }


def moved_bytes(name: str, x: torch.Tensor) -> int:
    h = 1 if name.endswith("fp8") else 2
    return x.numel() * (2 + 2 + 2 + h) + (x.shape[1] * 4 if h == 1 else 0)


def flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    res = []
    for o in out:
        res += flat(o) if not isinstance(o, torch.Tensor) else [o]
    return res


def main() -> None:
    args, dev, ms = micro_bench_setup(__doc__, default_reps=30, warmup=5)
    mod = importlib.import_module("flashdreams.kernels.adaln")
    ops = importlib.import_module("flashdreams.kernels")
    default_rule = mod.adaln_tile
    timing = f"CUDA graph of {GRAPH_CALLS} calls" if dev.type == "cuda" else "one call at a time"
    out: dict = {"environment": environment(dev), "timing": timing, "shapes": {}}
    g = torch.Generator().manual_seed(0)
    for shape, (L, D, F) in (SMOKE_SHAPES if args.smoke else SHAPES).items():
        x = torch.randn(1, L, D, generator=g).to(dev, torch.bfloat16)
        y = torch.randn(1, L, D, generator=g).to(dev, torch.bfloat16)
        gate, shift, scale = (torch.randn(1, F, D, generator=g).to(dev) * 0.1 for _ in range(3))
        weight, bias = (torch.randn(D, generator=g).to(dev) for _ in range(2))
        rows: dict = {"tokens": L, "width": D, "default": list(default_rule(1 << (D - 1).bit_length(), L, dev))}
        for name, fn in passes(ops, x, y, gate, shift, scale, weight, bias).items():
            mod.adaln_tile = default_rule
            want = [t.float() for t in flat(fn())]
            res = {"default": None}
            for tile in [None, *([] if args.smoke else TILES)]:
                mod.adaln_tile = default_rule if tile is None else (lambda w, r, d, t=tile: t)
                got = [t.float() for t in flat(fn())]
                same = all(torch.equal(a, b) for a, b in zip(got, want))
                t_ms = graph_ms(fn, dev, ms, GRAPH_CALLS)
                res["default" if tile is None else f"{tile[0]}x{tile[1]}w"] = {
                    "us": t_ms * 1e3,
                    "gbps": moved_bytes(name, x) / t_ms / 1e6,
                    "bit_equal": same,
                }
            mod.adaln_tile = default_rule
            rows[name] = res
            best = min(res, key=lambda k: res[k]["us"])
            print(
                f"{shape:14s} {name:28s} default {res['default']['us']:7.2f} us; best {best} {res[best]['us']:7.2f} us"
            )
        out["shapes"][shape] = rows
    write_result(args.out, out)


if __name__ == "__main__":
    main()
