"""Quality cost of the FP8 path against bf16 on the same inputs (issue target 6).

Full-size Self-Forcing 1.3B with random weights (the same weights for both), bf16 with our
Triton kernels vs precision fp8, the same prompt and the same noise draws, 7 blocks:
rel. L2 of each block's latents, and PSNR of the TAEHV-decoded frames (bf16 frames as the
reference). Random weights make the picture meaningless but the numerical cost real.
JSON to --out (default bench/results/fp8-quality-h100.json).
"""

from __future__ import annotations

import argparse
import json

import torch

import flashdreams
from flashdreams.benchmark.environment import environment
from flashdreams.numerics import psnr, rel_l2


def rollout(engine, draws):
    s = engine.session(engine.default_prompt(), seed=0)
    lat, frames = [], []
    for noise, renoise in draws:
        r = s.step(noise, renoise)
        lat.append(r.latents.float().cpu())
        frames.append(r.frames_cpu()[0].float())
    return lat, frames


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="self-forcing-1.3b")
    ap.add_argument("--blocks", type=int, default=7)
    ap.add_argument("--out", default="bench/results/fp8-quality-h100.json")
    a = ap.parse_args()
    kw = dict(preset=a.preset, random_weights=a.preset != "tiny", attention="triton", decoder="taehv")
    ref = flashdreams.load(**kw)
    spec = ref.spec
    dev = ref.device
    gen = torch.Generator(device=dev).manual_seed(1)
    shape = (1, spec.latent_channels, spec.num_frame_per_block, spec.latent_h, spec.latent_w)
    steps = spec.schedule.num_steps
    draws = [
        (torch.randn(shape, generator=gen, device=dev), torch.randn((steps - 1, *shape), generator=gen, device=dev))
        for _ in range(a.blocks)
    ]
    lat_ref, fr_ref = rollout(ref, draws)
    del ref
    fp8 = flashdreams.load(precision="fp8", **kw)
    lat8, fr8 = rollout(fp8, draws)
    res = {
        "environment": environment(dev),
        "workload": f"{a.preset}, random weights (seed 0), {spec.height}x{spec.width}, {a.blocks} blocks, "
        "same prompt and draws; reference = bf16 with the Triton kernels; decoder TAEHV",
        "latents_rel_l2_per_block": [rel_l2(x, y) for x, y in zip(lat8, lat_ref)],
        "frames_psnr_db_per_block": [psnr(x, y) for x, y in zip(fr8, fr_ref)],
    }
    res["latents_rel_l2_all"] = rel_l2(torch.cat(lat8, 2), torch.cat(lat_ref, 2))
    res["frames_psnr_db_all"] = psnr(torch.cat(fr8), torch.cat(fr_ref))
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print("fp8 vs bf16 latents rel L2 per block:", " ".join(f"{x:.3f}" for x in res["latents_rel_l2_per_block"]))
    print("fp8 vs bf16 frames PSNR dB per block:", " ".join(f"{x:.1f}" for x in res["frames_psnr_db_per_block"]))
    print(f"all: rel L2 {res['latents_rel_l2_all']:.4f}, PSNR {res['frames_psnr_db_all']:.2f} dB -> {a.out}")


if __name__ == "__main__":
    main()
