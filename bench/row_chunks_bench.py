"""The FP8 linears' activation pass with rows held as power-of-two chunks vs one padded tile.

`kernels/fp8_linear.py` `_quantize_rows_kernel` (the FP8 linear's input pass, GELU fused for an FFN's
hidden) used to hold a row as one next_pow2(K) tile: Self-Forcing's FFN hidden of 8960 columns ran as
16384, so the GELU and the e4m3 conversion did 1.83x the work the row needs, and at ~1.5 TB/s on an
H100 (next51) the pass was bound by issue slots rather than HBM. It now holds up to three power-of-two
chunks (`row_chunks`: 8192 + 512 + 256). Both forms run here on the same tensors in one process
(`ROW_CHUNKS` off, then on), with their codes and scales compared bit for bit. On a GPU each form is
timed as a CUDA graph of GRAPH_CALLS calls, as the model replays it: timed one launch at a time, the
custom op's host dispatch (~45 us) showed in next62-h200's first run of this script as 58 us for a
21 MB pass.

Shapes: each Wan-family model's two quantized activations that the norms do not already quantize (the
FFN hidden with the tanh GELU, the self-attention output), at its steady block's tokens. OmniDreams'
widths (2048, 8192) are powers of two: nothing changes there.

    python bench/row_chunks_bench.py --out chunks.json          # GPU: ~20 s
    python bench/row_chunks_bench.py --smoke --out /tmp/c.json  # CPU, interpreter, tiny shapes
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

# name: (rows, columns, GELU form or None)
SHAPES = {
    "self-forcing ffn hidden": (4680, 8960, "tanh"),
    "self-forcing attention out": (4680, 1536, None),
    "lingbot ffn hidden": (4524, 13824, "tanh"),
    "lingbot attention out": (4524, 5120, None),
    "matrix-game ffn hidden": (2640, 8960, "tanh"),
}
SMOKE_SHAPES = {"tiny hidden": (6, 111, "tanh"), "tiny out": (6, 96, None)}
GRAPH_CALLS = 20


def main() -> None:
    args, dev, ms = micro_bench_setup(__doc__, default_reps=50, warmup=5)
    fp8 = importlib.import_module("flashdreams.kernels.fp8_linear")  # the module, not the re-exported function
    timing = f"CUDA graph of {GRAPH_CALLS} calls" if dev.type == "cuda" else "one call at a time"
    out: dict = {"environment": environment(dev), "timing": timing, "shapes": {}}
    g = torch.Generator().manual_seed(0)
    for name, (rows, cols, gelu) in (SMOKE_SHAPES if args.smoke else SHAPES).items():
        x = (torch.randn(rows, cols, generator=g) * 2).to(dev, torch.bfloat16)
        moved = x.numel() * (2 + 1) + rows * 4  # bf16 in, e4m3 + one fp32 scale a row out
        row: dict = {"rows": rows, "cols": cols, "gelu": gelu, "chunks": fp8.row_chunks(cols)}
        results = {}
        for chunked in (False, True):
            fp8.ROW_CHUNKS = chunked
            try:
                results[chunked] = fp8.quantize_rows_fp8(x, gelu=gelu)
                t = graph_ms(lambda x=x, gelu=gelu: fp8.quantize_rows_fp8(x, gelu=gelu), dev, ms, GRAPH_CALLS)
            finally:
                fp8.ROW_CHUNKS = None
            row["chunked" if chunked else "one_tile"] = {"ms": t, "gbps": moved / t / 1e6}
        (w8, ws), (c8, cs) = results[False], results[True]
        row["bit_equal"] = bool(torch.equal(w8.view(torch.uint8), c8.view(torch.uint8)) and torch.equal(ws, cs))
        row["speedup"] = row["one_tile"]["ms"] / row["chunked"]["ms"]
        out["shapes"][name] = row
        print(
            f"{name:28s} {rows}x{cols} chunks {row['chunks']}: one tile {row['one_tile']['ms'] * 1e3:7.1f} us "
            f"({row['one_tile']['gbps']:5.0f} GB/s), chunked {row['chunked']['ms'] * 1e3:7.1f} us "
            f"({row['chunked']['gbps']:5.0f} GB/s): {row['speedup']:.2f}x, bit-equal {row['bit_equal']}"
        )
    write_result(args.out, out)
    print(f"wrote {args.out}")
    if not all(r["bit_equal"] for r in out["shapes"].values()):
        raise SystemExit("the chunked rows differ from the one-tile form")


if __name__ == "__main__":
    main()
