"""cuDNN convolutions with few channels, as they are and with their channels zero-padded.

OmniDreams' FP8 chunk on the H200 (bench/results/next76-h200, op_sources.py) still spends ~12 ms of its
frames-out path in convolutions whose channel counts cuDNN serves with an sm80 kernel of 32-wide tiles:
TAEHV's last conv (64 -> 3 channels at 704x1280, 1.36 ms for 25 GFLOP), the HD-map encoder's 48 -> 48
causal convs (1.64 ms each), its full-resolution 32 -> 24 convs (1.55 ms) and its folded first conv
(16 -> 24, 1.04 ms). Padding the input channels of the 24-channel convs to 32 already made cuDNN pick a
faster kernel (next64-h100). Here each conv runs as the engine runs it (NHWC / NDHWC, bf16) and with its
output and/or input channels zero-padded to the named width (the padded output's extra channels are
zero and sliced off; a padded input's extra channels are zero and meet zero weights), timed as a CUDA
graph of GRAPH_CALLS calls, the real channels compared against the plain form.

None of the paddings helped TAEHV's last conv (next78-h100), so it now runs as our own Triton kernel with
its input ReLU fused (kernels/narrow_conv.py, `models/taehv.NARROW_LAST_CONV`). The "taehv" section times
that conv alone (cuDNN's ReLU + conv against the kernel) and TAEHV's steady streaming decode at
Self-Forcing's and OmniDreams' sizes with the switch off and on (alternated rounds, best of each; frames
compared by rel. L2: the kernel sums in another order), then the same with FUSED_BIAS_ACT off and on
(MemBlock's bias adds, residual add and ReLUs as one pass after each conv, kernels/bias_act.py; the frames
should be bit-equal), with UPSAMPLE_FRAMES_KERNEL off and on (each stage's TGrow 1x1 conv before its
upsampling, then one Triton copy that splits the frames and repeats the pixels, kernels/upsample_frames.py)
and with MEMBLOCK_JOIN_KERNEL off and on (each MemBlock's cat([x, past]) and memory update as one pass,
kernels/memblock_join.py; bit-equal frames).

    python bench/narrow_conv_bench.py --out convs.json            # GPU: ~30 s
    python bench/narrow_conv_bench.py --smoke --out /tmp/c.json   # CPU, tiny shapes
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flashdreams.benchmark.environment import environment
from flashdreams.benchmark.micro import decode_switch_off_on, graph_ms, micro_bench_setup, write_result
from flashdreams.kernels import narrow_conv
from flashdreams.models import taehv
from flashdreams.models.decoders import random_decoder, tiny_decoder
from flashdreams.numerics import rel_l2

GRAPH_CALLS = 10
# name: (input shape NCHW / NCDHW, output channels, kernel size, [(input channels, output channels) forms])
CASES = {
    "taehv last 64->3 (704x1280, 8 frames)": ((8, 64, 704, 1280), 3, 3, [(64, 8), (64, 16), (64, 32)]),
    "taehv first 16->256 (88x160, 8 frames)": ((8, 16, 88, 160), 256, 3, []),
    "hdmap 48->48 causal (352x640)": ((1, 48, 10, 352, 640), 48, 3, [(64, 48), (64, 64), (48, 64)]),
    "hdmap 32->24 causal (704x1280)": ((1, 32, 10, 704, 1280), 24, 3, [(32, 32)]),
    "hdmap 32->48 causal (352x640)": ((1, 32, 10, 352, 640), 48, 3, [(32, 64)]),
    "hdmap folded first 16->24 (704x1280)": ((8, 16, 704, 1280), 24, 3, [(16, 32)]),
}
SMOKE_CASES = {
    "tiny 2d": ((2, 8, 12, 16), 3, 3, [(8, 8), (16, 8)]),
    "tiny 3d": ((1, 12, 4, 8, 10), 12, 3, [(16, 12), (16, 16)]),
}


def conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The engine's form: 2-D convs padded in space; 3-D ones causal in time (the input carries the cache
    frames) and padded in space."""
    if x.dim() == 4:
        return F.conv2d(x, w, b, padding=1)
    return F.conv3d(x, w, b, padding=(0, 1, 1))


# (name, latent frames per block, height, width)
DECODES = (("self-forcing 480x832", 3, 480, 832), ("omnidreams 704x1280", 2, 704, 1280))
SMOKE_DECODES = (("tiny 32x48", 2, 32, 48),)


def last_conv_alone(dev, dtype, ms, smoke: bool) -> dict:
    """TAEHV's end at OmniDreams' size: cuDNN's ReLU + conv against the fused kernel."""
    shape = (2, 16, 12, 16) if smoke else (8, 64, 704, 1280)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g).to(dev, dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(3, shape[1], 3, 3, generator=g) / (9 * shape[1]) ** 0.5).to(dev, dtype)
    b = torch.randn(3, generator=g).to(dev, dtype)
    wk, bk = narrow_conv.narrow_conv_weights(w, b)
    want = F.conv2d(F.relu(x), w, b, padding=1)
    got = narrow_conv.conv3x3_narrow(x, wk, bk, 3, relu_in=True)
    cudnn = graph_ms(lambda: F.conv2d(F.relu(x), w, b, padding=1), dev, ms, GRAPH_CALLS)
    kernel = graph_ms(lambda: narrow_conv.conv3x3_narrow(x, wk, bk, 3, relu_in=True), dev, ms, GRAPH_CALLS)
    return {"input": list(shape), "cudnn_relu_conv_ms": cudnn, "kernel_ms": kernel, "speedup": cudnn / kernel,
            "rel_l2": rel_l2(got.float(), want.float())}  # fmt: skip


def decode_on_off(dev, dtype, ms, smoke: bool, switch: str = "NARROW_LAST_CONV") -> dict:
    """TAEHV's steady streaming decode with the module switch `switch` off and on, alternated rounds, best of
    each: NARROW_LAST_CONV (the last conv as our kernel), FUSED_BIAS_ACT (MemBlock's bias, residual and
    ReLUs as one pass after each conv, kernels/bias_act.py), UPSAMPLE_FRAMES_KERNEL (each stage's TGrow
    before its upsampling, then one copy, kernels/upsample_frames.py) or MEMBLOCK_JOIN_KERNEL (each
    MemBlock's input and memory update as one pass, kernels/memblock_join.py). (next82-h100's file names the two
    times decode_ms_cudnn / decode_ms_kernel: off / on.)"""

    def set_switch(on: bool) -> None:
        setattr(taehv, switch, on)

    res = {}
    for name, frames, height, width in SMOKE_DECODES if smoke else DECODES:
        dec = tiny_decoder("taehv", device=dev, dtype=dtype) if smoke else random_decoder("taehv", dev, dtype)
        model, h, w = dec.model, height // 8, width // 8
        latents = torch.randn(1, frames, 16, h, w, device=dev, dtype=dtype)
        state = model.new_decode_state(1, h, w, dev, dtype)
        outs, times = decode_switch_off_on(model, latents, state, set_switch, ms, 1 if smoke else 3)
        off, on = min(times[False]), min(times[True])
        res[name] = {"decode_ms_off": off, "decode_ms_on": on, "speedup": off / on, "rounds": times,
                     "frames_rel_l2": rel_l2(outs[True].float(), outs[False].float()),
                     "frames_equal": bool(torch.equal(outs[True], outs[False]))}  # fmt: skip
        print(f"{name}: steady decode, {switch} off {off:.2f} ms, on {on:.2f} ms ({off / on:.2f}x)")
    return res


def main() -> None:
    args, dev, ms = micro_bench_setup(__doc__, default_reps=20, warmup=3)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    out: dict = {"environment": environment(dev), "timing": f"CUDA graph of {GRAPH_CALLS} calls", "cases": {}}
    g = torch.Generator().manual_seed(0)
    for name, (shape, c_out, k, forms) in (SMOKE_CASES if args.smoke else CASES).items():
        c_in, spatial = shape[1], len(shape) - 2
        fmt = torch.channels_last if spatial == 2 else torch.channels_last_3d
        x = torch.randn(*shape, generator=g).to(dev, dtype).contiguous(memory_format=fmt)
        w = (torch.randn(c_out, c_in, *[k] * spatial, generator=g) / (c_in * k**spatial) ** 0.5).to(dev, dtype)
        b = (torch.randn(c_out, generator=g) * 0.1).to(dev, dtype)
        want = conv(x, w, b.to(dtype))
        res: dict = {"input": list(shape), "out_channels": c_out}
        res["plain"] = {"ms": graph_ms(lambda x=x, w=w, b=b: conv(x, w, b), dev, ms, GRAPH_CALLS)}
        for ci, co in forms:
            xp = torch.zeros(shape[0], ci, *shape[2:], device=dev, dtype=dtype).contiguous(memory_format=fmt)
            xp[:, :c_in] = x
            wp = torch.zeros(co, ci, *w.shape[2:], device=dev, dtype=dtype).contiguous(memory_format=fmt)
            wp[:c_out, :c_in] = w
            bp = torch.zeros(co, device=dev, dtype=dtype)
            bp[:c_out] = b
            got = conv(xp, wp, bp)[:, :c_out]
            t = graph_ms(lambda xp=xp, wp=wp, bp=bp: conv(xp, wp, bp), dev, ms, GRAPH_CALLS)
            err = (got.float() - want.float()).abs().max().item()
            res[f"in{ci}_out{co}"] = {"ms": t, "speedup": res["plain"]["ms"] / t, "max_abs_diff": err}
        out["cases"][name] = res
        print(name, {k2: (round(v["ms"], 3) if isinstance(v, dict) else v) for k2, v in res.items()})
    out["taehv"] = {"last_conv_alone": last_conv_alone(dev, dtype, ms, args.smoke)}
    print("taehv last conv alone", out["taehv"]["last_conv_alone"])
    out["taehv"]["decode"] = decode_on_off(dev, dtype, ms, args.smoke)
    out["taehv"]["decode_fused_bias_act"] = decode_on_off(dev, dtype, ms, args.smoke, "FUSED_BIAS_ACT")
    out["taehv"]["decode_upsample_frames"] = decode_on_off(dev, dtype, ms, args.smoke, "UPSAMPLE_FRAMES_KERNEL")
    out["taehv"]["decode_memblock_join"] = decode_on_off(dev, dtype, ms, args.smoke, "MEMBLOCK_JOIN_KERNEL")
    write_result(args.out, out)


if __name__ == "__main__":
    main()
