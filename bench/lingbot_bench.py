"""LingBot-World-Fast block latency on one GPU: random weights, bf16 (or FP8), 464x832, streaming preset.

What it measures, in one process (the lead runs it on an H200; it needs CUDA):
  * per block: wall time of `session.step()` until the latents are on the device (cuda sync),
    its stage times (camera + denoise, decode, commit), and the steady-state p50 over the
    blocks after the ring is full (window 15 + sink 3 frames: from block 6 on);
  * the block's matmul FLOPs (plan.meta['block_flops'], camera path included) -> achieved
    TFLOP/s, against a bf16 GEMM peak measured in the same run (8192^3, best of 20);
  * camera-to-frame latency: new poses set -> the first frame on the host that reflects them
    (the next block's first frame: set_input + step + frames_cpu, which waits for the decode
    only, not for the commit forward that follows it; runs before 2026-12-05 waited for both);
  * peak device memory (torch.cuda.max_memory_allocated) and what a second session would add.

    python bench/lingbot_bench.py --out bench/results/lingbot-h200.json [--precision fp8] [--blocks 12]

`--layers N` runs an N-layer slice (smoke tests); `--preset lingbot-world-fast-tiny --device cpu`
runs on a CPU in seconds (numbers meaningless, checks the script).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def gemm_peak_tflops(device, dtype, n: int = 8192, reps: int = 20) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="lingbot-world-fast-stream")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp8"))
    ap.add_argument(
        "--attention",
        default="triton",
        choices=("sdpa", "triton", "fa4"),
        help="fa4: FlashAttention-4 for the KV ring (flash-attn-4, sm90+); with --precision fp8 the linears "
        "run in FP8 and the attention in bf16",
    )
    ap.add_argument("--blocks", type=int, default=10)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--height", type=int, default=464)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--cuda-graphs", action="store_true", help="replay blocks as captured CUDA graphs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    import flashdreams
    from flashdreams.models.camera_path import block_poses, orbit_path
    from flashdreams.models.camera_rays import world_scale_of
    from flashdreams.presets import get_preset

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    preset = get_preset(args.preset)
    if args.layers:
        preset = preset.replace(model=preset.model.replace(num_layers=args.layers))
    tiny = preset.builtin
    h, w = (preset.height, preset.width) if tiny else (args.height, args.width)
    t0 = time.perf_counter()
    engine = flashdreams.load(
        preset=preset,
        device=device,
        dtype="float32" if tiny else "bfloat16",
        # On a CPU (smoke runs): our kernels need the Triton interpreter, so torch's unless fp8 asks for them.
        attention=args.attention if cuda else ("triton" if args.precision == "fp8" else "sdpa"),
        precision=args.precision,
        random_weights=not tiny,
        height=h,
        width=w,
    )
    load_s = time.perf_counter() - t0
    plan = engine.plan
    nf = plan.meta["frames_per_block_latent"]
    path = orbit_path(4 * nf * (args.blocks + 2))
    f = 0.866 * w
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "prompt_embeds": torch.randn(plan.inputs["prompt_embeds"].shape, generator=gen),
        "image": torch.rand(plan.inputs["image"].shape, generator=gen),
        "poses": block_poses(path, 0, nf)[None].expand(plan.batch, -1, -1, -1),
        "intrinsics": torch.tensor([[f, f, w / 2, h / 2]]).expand(plan.batch, -1),
        "world_scale": world_scale_of(path).expand(plan.batch),
    }
    mem0 = torch.cuda.memory_allocated(device) if cuda else 0
    session = engine.session(inputs=inputs, cuda_graphs=args.cuda_graphs and cuda)
    session.timing = True
    blocks = []
    for b in range(args.blocks):
        tc = time.perf_counter()
        session.set_input("poses", block_poses(path, b, nf)[None].expand(plan.batch, -1, -1, -1))
        ts = time.perf_counter()
        result = session.step()
        # The frames reach the host as soon as the decode wrote them (frames_cpu waits for that
        # event only), while the commit forward still runs: that is when a viewer sees the new poses.
        first_frame = result.frames_cpu()[0, 0] if result.frames is not None else None
        cam_to_frame = time.perf_counter() - tc
        if cuda:
            torch.cuda.synchronize(device)
        step_s = time.perf_counter() - ts
        flops = engine.spec.block_flops(b) or 0.0
        blocks.append(
            {
                "block": b,
                "step_ms": step_s * 1e3,
                "camera_to_first_frame_ms": cam_to_frame * 1e3 if first_frame is not None else None,
                "stages_ms": result.stage_ms(),
                "flops": flops,
                "tflops": flops / step_s / 1e12,
            }
        )
        print(f"block {b}: {step_s * 1e3:.1f} ms, {flops / step_s / 1e12:.1f} TFLOP/s", file=sys.stderr)
    ring = plan.meta["ring"]
    full_from = -(-(ring["sink_frames"] + ring["window_frames"]) // nf)
    steady = [x["step_ms"] for x in blocks[max(full_from, 2) :]] or [blocks[-1]["step_ms"]]
    peak = gemm_peak_tflops(device, torch.bfloat16) if cuda else None
    steady_ms = statistics.median(steady)
    steady_tflops = (engine.spec.block_flops(args.blocks) or 0.0) / (steady_ms / 1e3) / 1e12
    report = {
        "preset": preset.name,
        "layers": preset.model.num_layers,
        "resolution": [h, w],
        "precision": args.precision,
        "attention": args.attention,
        "cuda_graphs": bool(args.cuda_graphs and cuda),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "load_s": load_s,
        "steady_block_ms_p50": steady_ms,
        "steady_tflops": steady_tflops,
        "gemm_peak_bf16_tflops": peak,
        "fraction_of_gemm_peak": steady_tflops / peak if peak else None,
        "camera_to_first_frame_ms_p50": statistics.median(
            [x["camera_to_first_frame_ms"] for x in blocks[2:] if x["camera_to_first_frame_ms"] is not None] or [0.0]
        ),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "session_state_gib": (torch.cuda.memory_allocated(device) - mem0) / 2**30 if cuda else None,
        "blocks": blocks,
    }
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(
        f"{preset.name} {args.precision}: steady block {steady_ms:.0f} ms ({steady_tflops:.0f} TFLOP/s"
        + (f", {100 * steady_tflops / peak:.0f}% of the GEMM peak {peak:.0f}" if peak else "")
        + f"), camera->frame {report['camera_to_first_frame_ms_p50']:.0f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
