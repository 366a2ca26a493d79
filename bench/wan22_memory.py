"""Causal Wan2.2 A14B memory: the analytic plan (any machine) and, on CUDA, the measured peak.

The analytic plan (models/families/wan22/memory.py) needs no weights: it builds each preset's
block plan at 480x832 with the Wan VAE decoder's state declared (on the meta device) and adds
the experts' parameter counts. `--measure` then loads a full-size preset with random weights
on the GPU (both 14B experts drawn on the device, allocated directly in bf16), runs a few
blocks and records torch's peak allocated/reserved memory after loading and after each block,
with the load time and the time of every block, next to the analytic figures.

    python bench/wan22_memory.py                      # analytic plan of every full-size preset (CPU)
    python bench/wan22_memory.py --measure            # H200: wan2.2-a14b-t2v-rolling, 4 blocks
    python bench/wan22_memory.py --measure --preset wan2.2-a14b-t2v --blocks 8 --attention triton
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from flashdreams import registry
from flashdreams.models.decode_step import decoder_graphs
from flashdreams.models.decoders import WanVAEDecoder
from flashdreams.models.families.wan22.memory import GIB, memory_plan
from flashdreams.models.families.wan22.plan import build_plan
from flashdreams.models.families.wan22.presets import FIRST_BLOCK_FRAMES
from flashdreams.models.wan_vae import WanVAE, WanVAEConfig

FULL_SIZE = ("wan2.2-a14b-t2v", "wan2.2-a14b-t2v-rolling", "wan2.2-a14b-i2v")


def analytic(preset_name: str, batch: int = 1, decoder: bool = True) -> dict:
    """The memory plan of a preset at its size, bf16, with the Wan VAE decoder (nothing allocated)."""
    preset = registry.get_preset(preset_name)
    lh, lw = preset.latent_size()
    dec, enc_params = None, 0
    with torch.device("meta"):
        if decoder:
            vae = WanVAE(WanVAEConfig(), parts=("decoder",)).to(torch.bfloat16)
        enc = WanVAE(WanVAEConfig.from_dict(preset.vae or {}), parts=("encoder",)) if preset.i2v else None
    if decoder:
        wan_vae = WanVAEDecoder(vae)
        dec = decoder_graphs(wan_vae, batch, lh, lw, preset.num_frame_per_block)
        dec.frames_first = wan_vae.num_frames(FIRST_BLOCK_FRAMES, True)
    if enc is not None:
        enc_params = sum(p.numel() for p in enc.parameters())
    plan = build_plan(preset, preset.model, batch, (lh, lw), "bfloat16", dec)
    out = memory_plan(plan, preset.model, 2, encoder_params=enc_params)
    out["preset"] = preset_name
    out["resolution"] = [lh * 8, lw * 8]
    out["ring_frames"] = {"sink": preset.sink_frames, "window": preset.window_frames}
    out["block_flops"] = plan.meta["block_flops"]
    return out


def measure(args: argparse.Namespace) -> dict:
    import flashdreams

    dev = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    engine = flashdreams.load(
        preset=args.preset, device="cuda", dtype="bfloat16", random_weights=True, attention=args.attention
    )
    torch.cuda.synchronize(dev)
    load_s = time.perf_counter() - t0
    after_load = {"allocated": torch.cuda.max_memory_allocated(dev), "reserved": torch.cuda.max_memory_reserved(dev)}
    session = engine.session(seed=0, cuda_graphs=args.cuda_graphs)
    blocks = []
    for b in range(args.blocks):
        t = time.perf_counter()
        session.step()
        torch.cuda.synchronize(dev)
        blocks.append(
            {
                "block": b,
                "seconds": time.perf_counter() - t,
                "peak_allocated": torch.cuda.max_memory_allocated(dev),
                "peak_reserved": torch.cuda.max_memory_reserved(dev),
            }
        )
        print(
            f"block {b}: {blocks[-1]['seconds']:.2f} s, peak {blocks[-1]['peak_allocated'] / GIB:.2f} GiB", flush=True
        )
    return {
        "device": torch.cuda.get_device_name(dev),
        "total_memory": torch.cuda.get_device_properties(dev).total_memory,
        "torch": torch.__version__,
        "preset": args.preset,
        "attention": args.attention,
        "cuda_graphs": args.cuda_graphs,
        "load_seconds": load_s,
        "after_load": after_load,
        "blocks": blocks,
        "peak_allocated_gib": max(b["peak_allocated"] for b in blocks) / GIB,
        "analytic": analytic(args.preset),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure", action="store_true", help="load on CUDA with random weights and measure")
    ap.add_argument("--preset", default="wan2.2-a14b-t2v-rolling")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--attention", default="sdpa", choices=("sdpa", "triton"))
    ap.add_argument("--cuda-graphs", action="store_true", help="replay captured graphs after the warm-up")
    ap.add_argument("--out", default=None, help="JSON path (default: bench/results/wan22-memory-*/...)")
    args = ap.parse_args()
    root = Path(__file__).resolve().parent / "results"
    if args.measure:
        result = measure(args)
        out = Path(args.out or root / "wan22-memory-h200" / f"{args.preset}.json")
    else:
        result = {name: analytic(name) for name in FULL_SIZE}
        for name, r in result.items():
            print(f"{name}: peak {r['peak_gb']:.2f} GB ({r['peak_gib']:.2f} GiB), fits one H200: {r['fits_h200']}")
        out = Path(args.out or root / "wan22-memory-plan" / "plan.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
