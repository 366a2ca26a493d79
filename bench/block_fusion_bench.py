"""The Wan block's fused steps against their unfused forms, at each Wan-family model's block shape.

The fusions of `models/wan_dit.py` WanBlock (impl="triton"), each timed beside what it replaced,
in the same process on the same tensors (ratios, not absolute targets):

* FFN: Linear -> GELU(tanh) -> Linear as three kernels, vs the GELU in cuBLASLt's epilogue of the
  first GEMM (`dit_ops.gelu_tanh_mlp`); and in FP8, a GELU pass before the second layer's
  quantization vs the GELU inside it.
* self-attention residual + the cross-attention pre-norm: two row kernels vs one
  (`gated_residual_layer_norm`);
* cross-attention residual + the FFN's modulated norm: torch's add + a row kernel vs one
  (`residual_adaln`);
* the FFN's gated residual + the next block's modulated norm: two row kernels vs one
  (`gated_residual_adaln`, WanBlock's `defer_ffn`);
* in FP8, each norm feeding only an FP8 linear (q/k/v, the cross-attention's q, the FFN's first layer):
  h written in bf16 and quantized by the linear, vs quantized in the norm's pass (`fp8=True`); the
  rel. L2 is 0 on a GPU (same numbers by construction).

    python bench/block_fusion_bench.py --out fusion.json          # GPU: ~30 s
    python bench/block_fusion_bench.py --smoke --out /tmp/f.json  # CPU, interpreter, tiny shapes
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")


import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from flashdreams.benchmark.environment import environment  # noqa: E402
from flashdreams.benchmark.micro import micro_bench_setup, write_result  # noqa: E402
from flashdreams.numerics import rel_l2  # noqa: E402

# name: (tokens per block, frames per block, dim, ffn dim)
SHAPES = {
    "self-forcing 1.3b": (4680, 3, 1536, 8960),
    "wan2.2-a14b": (4680, 3, 5120, 13824),
    "matrix-game 2.0": (2640, 3, 1536, 8960),
}
SMOKE_SHAPES = {"tiny": (48, 3, 64, 128)}


def main() -> None:
    args, dev, ms = micro_bench_setup(__doc__, default_reps=30, smoke_reps=2, warmup=5)
    results = {"env": environment(dev), "shapes": {}}
    g = torch.Generator().manual_seed(0)
    for name, (L, nf, d, f) in (SMOKE_SHAPES if args.smoke else SHAPES).items():
        rows = measure_shape(name, L, nf, d, f, dev, g, ms)
        results["shapes"][name] = {"tokens": L, "dim": d, "ffn_dim": f, "rows": rows}
    write_result(args.out, results)


@torch.no_grad()
def measure_shape(name: str, L: int, nf: int, d: int, f: int, dev: torch.device, g: torch.Generator, ms) -> dict:
    """Each fusion at one shape: (unfused ms, fused ms, speedup, rel. L2 of the fused result)."""
    from flashdreams.kernels import Fp8Linear
    from flashdreams.models import dit_ops

    dt = torch.bfloat16
    ffn = nn.Sequential(nn.Linear(d, f), nn.GELU(approximate="tanh"), nn.Linear(f, d)).to(dev, dt)
    x = torch.randn(1, L, d, generator=g).to(dev)  # the residual stream is float32
    y = torch.randn(1, L, d, generator=g).to(dev, dt)
    h = torch.randn(1, L, d, generator=g).to(dev, dt)
    gate, shift, scale = torch.randn(1, nf, 3, d, generator=g).to(dev).unbind(2)
    w, b = torch.randn(d, generator=g).to(dev), torch.randn(d, generator=g).to(dev)
    first8, second8 = Fp8Linear.from_linear(ffn[0]), Fp8Linear.from_linear(ffn[2])
    qkv8 = Fp8Linear.from_linear(nn.Linear(d, 3 * d).to(dev, dt))
    q8 = Fp8Linear.from_linear(nn.Linear(d, d).to(dev, dt))
    eps, tri = 1e-6, "triton"

    def self_unfused() -> torch.Tensor:
        return dit_ops.layer_norm_affine(dit_ops.gated_residual(x, y, gate, tri), w, b, eps, tri)

    rows = {
        "ffn bf16": (lambda: ffn(h), lambda: dit_ops.gelu_tanh_mlp(h, ffn[0], ffn[2], tri)),
        "ffn fp8": (
            lambda: second8(F.gelu(first8(h), approximate="tanh")),
            lambda: dit_ops.gelu_tanh_mlp(h, first8, second8, tri),
        ),
        "self residual + pre-norm": (
            self_unfused,
            lambda: dit_ops.gated_residual_layer_norm(x, y, gate, w, b, eps, tri)[1],
        ),
        "ffn residual + next block's norm": (
            lambda: dit_ops.adaln_modulate(dit_ops.gated_residual(x, y, gate, tri), shift, scale, eps, tri),
            lambda: dit_ops.gated_residual_adaln(x, y, gate, shift, scale, eps, tri)[1],
        ),
        "cross residual + ffn norm": (
            lambda: dit_ops.adaln_modulate(x + y, shift, scale, eps, tri),
            lambda: dit_ops.residual_adaln(x, y, shift, scale, eps, tri)[1],
        ),
        # FP8: the norm hands its linear h quantized (Fp8Rows) vs the linear quantizing h itself
        "fp8 qkv: norm quantizes": (
            lambda: qkv8(dit_ops.gated_residual_adaln(x, y, gate, shift, scale, eps, tri)[1]),
            lambda: qkv8(dit_ops.gated_residual_adaln(x, y, gate, shift, scale, eps, tri, fp8=True)[1]),
        ),
        "fp8 cross q: norm quantizes": (
            lambda: q8(dit_ops.gated_residual_layer_norm(x, y, gate, w, b, eps, tri)[1]),
            lambda: q8(dit_ops.gated_residual_layer_norm(x, y, gate, w, b, eps, tri, fp8=True)[1]),
        ),
        "fp8 ffn.0: norm quantizes": (
            lambda: first8(dit_ops.residual_adaln(x, y, shift, scale, eps, tri)[1]),
            lambda: first8(dit_ops.residual_adaln(x, y, shift, scale, eps, tri, fp8=True)[1]),
        ),
    }
    out = {}
    for row, (unfused, fused) in rows.items():
        err = rel_l2(fused(), unfused())
        t_unfused, t_fused = ms(unfused), ms(fused)
        out[row] = {
            "unfused_ms": t_unfused,
            "fused_ms": t_fused,
            "speedup": t_unfused / t_fused,
            "rel_l2_fused_vs_unfused": err,
        }
        print(
            f"{name:20s} {row:28s} {t_unfused:8.3f} -> {t_fused:8.3f} ms"
            f"  x{t_unfused / t_fused:5.2f}  rel.L2 {err:.2e}",
            flush=True,
        )
    return out


if __name__ == "__main__":
    main()
