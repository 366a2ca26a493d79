"""The FP8 activation pass with a GELU fused: erf by libdevice vs the erfc fit, and the fast-math forms.

OmniDreams' and Cosmos' MLPs use the exact (erf) GELU; their FFN hidden is quantized by
`kernels/fp8_linear.py` `_quantize_rows_kernel` with the GELU inside. At OmniDreams' chunk (7040 x 8192)
that pass took 92 us on an H200 for 173 MB, ~46% of what a plain quantization moves in the same time
(next76's op-sources, next77's row-chunks): the erf's arithmetic, not HBM, bounds it. Here, on the same
tensor in one process, each form of the pass is timed as a CUDA graph of GRAPH_CALLS calls (as the model
replays it): `EXACT_GELU_ERF = "libdevice"` (tl.math.erf, the form before), `"fit"` (`_gelu_erfc_fit`), the
tanh GELU, each of the last two with `GELU_FAST_MATH` off and on (the exp2 and reciprocal as single MUFU
instructions, the default since 2026-12-07), and no GELU at all (the byte-moving floor); the exact forms'
codes are compared, and each fast form's against its form before.

    python bench/gelu_quantize_bench.py --out gelu.json          # GPU: ~10 s
    python bench/gelu_quantize_bench.py --smoke --out /tmp/g.json  # CPU, interpreter, tiny shapes
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

# name: (rows, columns)
SHAPES = {"omnidreams ffn hidden": (7040, 8192), "self-forcing's hidden size": (4680, 8960)}
SMOKE_SHAPES = {"tiny hidden": (6, 111)}
GRAPH_CALLS = 20
# label: (gelu, EXACT_GELU_ERF, GELU_FAST_MATH)
FORMS = {
    "exact, libdevice erf": ("exact", "libdevice", False),
    "exact, erfc fit": ("exact", "fit", False),
    "exact, erfc fit, fast math": ("exact", "fit", True),
    "tanh": ("tanh", "fit", False),
    "tanh, fast math": ("tanh", "fit", True),
    "no gelu": (None, "fit", True),
}


def main() -> None:
    args, dev, ms = micro_bench_setup(__doc__, default_reps=50, warmup=5)
    fp8 = importlib.import_module("flashdreams.kernels.fp8_linear")  # the module, not the re-exported function
    timing = f"CUDA graph of {GRAPH_CALLS} calls" if dev.type == "cuda" else "one call at a time"
    out: dict = {"environment": environment(dev), "timing": timing, "shapes": {}}
    g = torch.Generator().manual_seed(0)
    saved = fp8.EXACT_GELU_ERF, fp8.GELU_FAST_MATH
    for name, (rows, cols) in (SMOKE_SHAPES if args.smoke else SHAPES).items():
        x = (torch.randn(rows, cols, generator=g) * 2).to(dev, torch.bfloat16)
        moved = x.numel() * (2 + 1) + rows * 4  # bf16 in, e4m3 + one fp32 scale a row out
        row: dict = {"rows": rows, "cols": cols}
        codes = {}
        for label, (gelu, erf, fast) in FORMS.items():
            fp8.EXACT_GELU_ERF, fp8.GELU_FAST_MATH = erf, fast
            try:
                codes[label] = fp8.quantize_rows_fp8(x, gelu=gelu)
                t = graph_ms(lambda x=x, gelu=gelu: fp8.quantize_rows_fp8(x, gelu=gelu), dev, ms, GRAPH_CALLS)
            finally:
                fp8.EXACT_GELU_ERF, fp8.GELU_FAST_MATH = saved
            row[label] = {"ms": t, "gbps": moved / t / 1e6}
            print(f"{name:28s} {rows}x{cols} {label:22s} {t * 1e3:7.1f} us ({moved / t / 1e6:5.0f} GB/s)")
        (l8, ls), (f8, fs) = codes["exact, libdevice erf"], codes["exact, erfc fit"]
        row["fit_vs_libdevice"] = {
            "codes_differing": int((l8.float() != f8.float()).sum().item()),
            "of": l8.numel(),
            "scale_max_rel_diff": float(((fs - ls).abs() / ls.abs().clamp_min(1e-30)).max().item()),
        }
        row["speedup_fit"] = row["exact, libdevice erf"]["ms"] / row["exact, erfc fit"]["ms"]
        print(f"  fit vs libdevice: {row['fit_vs_libdevice']}, {row['speedup_fit']:.2f}x")
        for before, fast in (("exact, erfc fit", "exact, erfc fit, fast math"), ("tanh", "tanh, fast math")):
            (b8, bs), (f8, fs) = codes[before], codes[fast]
            row[f"{fast} vs before"] = {
                "codes_differing": int((b8.float() != f8.float()).sum().item()),
                "scale_max_rel_diff": float(((fs - bs).abs() / bs.abs().clamp_min(1e-30)).max().item()),
                "speedup": row[before]["ms"] / row[fast]["ms"],
            }
            print(f"  {fast} vs before: {row[f'{fast} vs before']}")
        out["shapes"][name] = row
    write_result(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
