"""Which DiT linears cost the FP8 path its quality (issues 16 and 22): a study that runs on a CPU.

Full-size weights (random, seeded), small frames, a float32 reference with torch attention against
the same model with its FP8 linears (the quantization the GPU runs: e4m3 per token x per output
channel; the product in float32, `fp8_linear_reference`), the same prompt and noise draws. Each
`--variant NAME=REGEX` leaves the linears whose names match REGEX in the model's dtype (an empty
REGEX: the model's whole FP8 set). The latents' rel. L2 over the blocks is what issue 22 bounds
(<= 0.03); on the H200, `bench/fp8_quality.py` measures the chosen set in bf16 at full size
(Self-Forcing's whole FP8 set: 0.0318 there, 0.0335 here at 64x112, so the small frames keep the
picture).

    python bench/fp8_layer_study.py --preset self-forcing-1.3b --height 64 --width 112 \\
        --variant all= --variant cross_bf16='cross_attn\\.' --out bench/results/fp8-layers-cpu/sf.json
"""

from __future__ import annotations

import argparse
import json
import re
import time

import torch

import flashdreams
from flashdreams.benchmark.environment import environment
from flashdreams.numerics import rel_l2


def parse_variant(text: str) -> tuple[str, str]:
    name, sep, pattern = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"must be NAME=REGEX (REGEX may be empty), got {text!r}")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"{name}: {pattern!r} is not a regular expression ({exc})") from None
    return name, pattern


def rollout(args, keep: str | None) -> tuple[list[torch.Tensor], list[str], float]:
    """The latents of `args.blocks` blocks; keep None: the float32 reference, else FP8 but `keep` (a regex)."""
    engine = flashdreams.load(
        preset=args.preset,
        random_weights=True,
        attention="sdpa",
        decoder=None,
        height=args.height,
        width=args.width,
        device="cpu",
    )
    quantized = [] if keep is None else engine.model.weights.quantize_fp8_(exclude=keep)
    session = engine.session(inputs=engine.default_inputs(), seed=args.seed)
    t = time.perf_counter()
    latents = [session.step().latents.float().clone() for _ in range(args.blocks)]
    return latents, quantized, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="self-forcing-1.3b")
    ap.add_argument("--height", type=int, help="video height (default: the preset's; the study used 64)")
    ap.add_argument("--width", type=int, help="video width (default: the preset's; the study used 112)")
    ap.add_argument("--blocks", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", action="append", type=parse_variant, required=True, metavar="NAME=REGEX")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.blocks < 1:
        ap.error("--blocks must be >= 1")
    names = [n for n, _ in a.variant]
    if len(set(names)) != len(names):
        ap.error(f"--variant names must differ, got {names}")
    torch.manual_seed(0)
    ref, _, t_ref = rollout(a, None)
    print(f"reference: {a.blocks} blocks in {t_ref:.0f} s", flush=True)
    results = {}
    for name, keep in a.variant:
        lat, quantized, took = rollout(a, keep)
        per = [rel_l2(x, y) for x, y in zip(lat, ref)]
        results[name] = {
            "kept_in_model_dtype": keep,
            "fp8_linears": len(quantized),
            "latents_rel_l2_all": rel_l2(torch.cat(lat, 2), torch.cat(ref, 2)),
            "latents_rel_l2_per_block": per,
        }
        print(f"{name}: {len(quantized)} FP8 linears, rel L2 {results[name]['latents_rel_l2_all']:.4f} ({took:.0f} s)")
    out = {
        "environment": environment(torch.device("cpu")),
        "workload": f"{a.preset}, random weights (seed 0), {a.height or 'preset'}x{a.width or 'preset'}, {a.blocks} "
        f"blocks, session seed "
        f"{a.seed}; reference float32 with sdpa attention; FP8 = e4m3 per token x per channel, product in float32",
        "target_latents_rel_l2": 0.03,
        "variants": results,
    }
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print("->", a.out)


if __name__ == "__main__":
    main()
