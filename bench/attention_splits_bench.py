"""Ring attention's key splits at each model's own steady shape, and the FP8 K/V pre-pass's warps.

The d = 128 config was swept on an H100 at Self-Forcing's shape and fixed at one split. On the
H200 the suite's attention part measured 2 splits 3.7% faster there (541 vs 522 TFLOP/s,
`issue22-h200/attention.json`): the last wave of programs is what splits even out, and how full
it runs depends on heads x query tiles, i.e. on the model. This measures splits 1, 2 and 3 at
each model's block shape (and what `pick_config` picks now), so the config rule can follow data.

The pre-pass (`quantize_kv_fp8`) ran at ~1 TB/s in that run; its 4- vs 8-warp sweep failed
there (the bench read the module attribute through the re-exported function). Here it is timed
at OmniDreams' ring (21120 rows x 16 heads) with 4, 8 and 16 warps.

    python bench/attention_splits_bench.py --out splits.json          # H200: ~30 s
    python bench/attention_splits_bench.py --smoke --out /tmp/s.json  # CPU, interpreter, tiny shapes
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import importlib  # noqa: E402

import torch  # noqa: E402

from flashdreams.benchmark.environment import environment  # noqa: E402
from flashdreams.benchmark.micro import micro_bench_setup, write_result  # noqa: E402
from flashdreams.numerics import rel_l2  # noqa: E402

# name: (query tokens, heads, valid keys = ring capacity) at the model's steady block, d = 128.
SHAPES = {
    "self-forcing block 5": (4680, 12, 28080),
    "wan2.2-a14b block 5": (4680, 40, 28080),
    "omnidreams chunk": (7040, 16, 21120),
    "lingbot fast stream": (4524, 40, 27144),
    "matrix-game block": (2640, 12, 7920),
}
SMOKE_SHAPES = {"tiny": (96, 2, 256)}
SCALE = 128**-0.5


def main() -> None:
    args, dev, med = micro_bench_setup(__doc__, default_reps=20)

    from flashdreams.kernels.ring_attention import launch_ring_attention
    from flashdreams.kernels.ring_attention_configs import pick_config

    fp8mod = importlib.import_module("flashdreams.kernels.ring_attention_fp8")
    kvmod = importlib.import_module("flashdreams.kernels.fp8_kv")  # the pre-pass and its PREPASS_* knobs
    dtype = torch.float32 if args.smoke else torch.bfloat16
    reps = 1 if args.smoke else args.reps
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    out: dict = {"environment": environment(dev), "reps": reps, "shapes": {}, "prepass": []}
    g = torch.Generator(device=dev).manual_seed(0)

    for name, (lq, heads, kv) in shapes.items():
        q = torch.randn(1, lq, heads, 128, device=dev, dtype=dtype, generator=g)
        k = torch.randn(1, kv, heads, 128, device=dev, dtype=dtype, generator=g)
        v = torch.randn(1, kv, heads, 128, device=dev, dtype=dtype, generator=g)
        valid = torch.tensor([kv], device=dev)
        scale = SCALE
        base_cfg = pick_config(q, kv)
        ref, _ = launch_ring_attention(q, k, v, valid, scale, dataclasses.replace(base_cfg, splits=1))
        flops = 4.0 * lq * kv * 128 * heads
        row = {"lq": lq, "heads": heads, "kv": kv, "picked": dataclasses.asdict(base_cfg), "splits": []}
        for splits in (1, 2, 3):
            cfg = dataclasses.replace(base_cfg, splits=splits)
            got, _ = launch_ring_attention(q, k, v, valid, scale, cfg)
            t = med(lambda cfg=cfg, q=q, k=k, v=v, valid=valid: launch_ring_attention(q, k, v, valid, SCALE, cfg))
            row["splits"].append(
                {"splits": splits, "ms": t, "tflops": flops / t / 1e9, "rel_l2_vs_1": rel_l2(got, ref)}
            )
        one = row["splits"][0]["ms"]
        for s in row["splits"]:
            s["speedup_vs_1"] = one / s["ms"]
        out["shapes"][name] = row
        print(name, " ".join(f"s{s['splits']}: {s['ms']:.3f} ms {s['tflops']:.0f} TF/s" for s in row["splits"]))

    lq, heads, kv = shapes["omnidreams chunk" if not args.smoke else "tiny"]
    k = torch.randn(1, kv, heads, 128, device=dev, dtype=dtype, generator=g)
    v = torch.randn(1, kv, heads, 128, device=dev, dtype=dtype, generator=g)
    valid = torch.tensor([kv], device=dev)
    block_n = fp8mod.fp8_kv_block_n(k)
    moved = k.numel() * k.element_size() * 2 + k.numel() * 2  # bf16 K, V in; e4m3 K, V out
    before = kvmod.PREPASS_WARPS
    for warps in (4, 8, 16):
        kvmod.PREPASS_WARPS = warps
        try:
            t = med(lambda: fp8mod.quantize_kv_fp8(k, v, valid, block_n))
            out["prepass"].append({"warps": warps, "kv": kv, "heads": heads, "ms": t, "gbps": moved / t / 1e6})
            print(f"prepass {warps} warps: {t:.3f} ms {moved / t / 1e6:.0f} GB/s")
        except Exception as exc:  # a warps count the compiler refuses is a result too
            out["prepass"].append({"warps": warps, "error": f"{type(exc).__name__}: {exc}"[:300]})
        finally:
            kvmod.PREPASS_WARPS = before
    write_result(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
