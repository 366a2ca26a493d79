"""TAEHV's nearest 2x upsampling as torch's kernel or as a broadcast copy (`models/taehv.UPSAMPLE_AS_COPY`).

TAEHV (Self-Forcing's decoder, and LightTAE's architecture in OmniDreams) upsamples three times per
decode. In NHWC (its CUDA layout) torch runs `upsample_nearest2d_nhwc_out_frame`: 1.41 ms of Self-Forcing's
block 5 (next57-h200) and 2.13 ms of an OmniDreams chunk (next71-h100). The broadcast copy writes the same
values. Timed here in one process on the same weights and latents: the steady streaming decode of a block
with either form (alternated, so drift hits both), and the upsampling alone at the decoder's largest input;
the frames of both forms compared bit for bit.

    python bench/taehv_upsample_bench.py --out taehv-upsample.json               # GPU: ~30 s
    python bench/taehv_upsample_bench.py --smoke --out /tmp/taehv-upsample.json  # CPU, tiny decoder
"""

from __future__ import annotations

import torch

from flashdreams.benchmark.environment import environment
from flashdreams.benchmark.micro import decode_switch_off_on, micro_bench_setup, write_result
from flashdreams.models import taehv
from flashdreams.models.decoders import random_decoder, tiny_decoder

# (name, latent frames per block, height, width)
WORKLOADS = (("self-forcing 480x832", 3, 480, 832), ("omnidreams 704x1280", 2, 704, 1280))
SMOKE_WORKLOADS = (("tiny 32x48", 2, 32, 48),)


def set_copy(on: bool) -> None:
    taehv.UPSAMPLE_AS_COPY = on


def measure(decoder, frames: int, height: int, width: int, ms, rounds: int) -> dict:
    model = decoder.model
    dev, dtype = decoder.device, decoder.dtype
    h, w = height // 8, width // 8
    latents = torch.randn(1, frames, 16, h, w, device=dev, dtype=dtype)
    state = model.new_decode_state(1, h, w, dev, dtype)
    outs, times = decode_switch_off_on(model, latents, state, set_copy, ms, rounds)
    with torch.no_grad():
        # the upsampling alone at its largest input (the last stage's, in the decoder's layout)
        c = model.config.channels[2]
        x = torch.randn(frames * 4, c, height // 2, width // 2, device=dev, dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last) if dev.type == "cuda" else x
        up = torch.nn.Upsample(scale_factor=2)
        equal_alone = torch.equal(up(x), taehv.upsample_nearest(x, 2))
        alone = {"torch kernel": ms(lambda: up(x)), "broadcast copy": ms(lambda: taehv.upsample_nearest(x, 2))}
    kernel_ms, copy_ms = (min(times[k]) for k in (False, True))
    return {
        "decode_ms": {"torch kernel": kernel_ms, "broadcast copy": copy_ms, "rounds": times},
        "decode_speedup": kernel_ms / copy_ms,
        "frames_equal": torch.equal(outs[False], outs[True]),
        "upsample_alone_ms": alone,
        "upsample_alone_shape": list(x.shape),
        "upsample_alone_equal": equal_alone,
    }


def main() -> None:
    args, dev, ms = micro_bench_setup(__doc__, default_reps=10)
    result = {"env": environment(dev), "workloads": {}}
    for name, frames, height, width in SMOKE_WORKLOADS if args.smoke else WORKLOADS:
        if args.smoke:
            decoder = tiny_decoder("taehv", device="cpu", dtype=torch.float32)
        else:
            decoder = random_decoder("taehv", device=dev, dtype=torch.bfloat16)
        row = measure(decoder, frames, height, width, ms, rounds=1 if args.smoke else 3)
        result["workloads"][name] = row
        d, a = row["decode_ms"], row["upsample_alone_ms"]
        print(
            f"{name}: steady decode torch kernel {d['torch kernel']:.2f} ms, broadcast copy {d['broadcast copy']:.2f}"
            f" ({row['decode_speedup']:.2f}x), frames equal {row['frames_equal']}; upsample alone "
            f"{a['torch kernel']:.3f} vs {a['broadcast copy']:.3f} ms at {row['upsample_alone_shape']}"
        )
    write_result(args.out, result)


if __name__ == "__main__":
    main()
