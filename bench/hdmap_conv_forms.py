"""Where OmniDreams' HD-map encode spends its time, and whether other forms of its convolutions are faster.

The LightVAE encoder (the Wan2.1 VAE at width 24) codes a steady chunk of 8 frames at 704x1280 inside
the block program, before the first DiT forward, so all of it delays the chunk's frames (issue 16's
180 ms FP8 bar). next58-h200's chunk profile put 17.5 ms in six cuDNN `implicit_gemm_indexed` calls
(the full-resolution 24-channel convs, ~2.9 ms each where their memory traffic alone is ~0.2 ms) and
3.2 ms in one `implicit_convolveNd_sgemm` (a cuDNN fallback: the first conv, 3 input channels).

This script runs the engine's encoder (channels_last_3d, fused norms) once on a steady chunk, records
every `F.conv3d` call it makes (inputs as they were laid out), then times each call as it is and in
the forms below, each checked against the call's own output:

* `as is`            the recorded call;
* `ndhwc input`      the input copied to channels_last_3d first (copy included), when it was not;
* `conv2d`           a (1, k, k) kernel as one 2-D conv over the frames (a free view of an NDHWC input);
* `3 conv2d`         a causal kernel-3 conv as three 2-D convs over shifted frame windows, summed;
* `fold to 16`       the 3-channel first conv as one 2-D conv over [frame t | t+1 | t+2] stacked on
                     channels and zero-padded to 16 (the stacking copy included);
* `cin to 8`/`cin to 32`  the input's channels zero-padded (conv alone: what a padded cache concatenation
                     would hand it), as is and in the 2-D forms.

Calls of the same shapes (a resblock's twins) are timed once and counted. (next63-h100 showed cuDNN's
algorithm search changing nothing, so it is not tried.) Before that it profiles one whole encode by kernel
category, so the convs' share is known beside the norms and copies.

Last, the encode again with `use_narrow_forms` (what the engine builds since next64: the padded, folded and
2-D forms where they won, with the caches the engine's state then holds), timed, profiled, its copies,
fills and adds listed by input shape, and compared with the first encode and with a float32 encode.

    python bench/hdmap_conv_forms.py --out conv_forms.json               # GPU: ~40 s
    python bench/hdmap_conv_forms.py --smoke --out /tmp/conv_forms.json  # CPU, tiny frames
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
import torch.nn.functional as F

from flashdreams.benchmark.environment import environment
from flashdreams.benchmark.micro import micro_bench_setup, write_result
from flashdreams.benchmark.profile import profile_call
from flashdreams.models.families.omnidreams.hdmap_encoder import LIGHTVAE, cache_templates
from flashdreams.models.wan_vae import WanVAE
from flashdreams.numerics import rel_l2

CL3 = torch.channels_last_3d


def record_convs(fn: Callable[[], object]) -> list[dict]:
    """Every F.conv3d call of fn() with a copy of its input (strides kept) and its arguments."""
    calls: list[dict] = []
    real = F.conv3d

    def recorder(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        keep = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device).copy_(x)
        calls.append({"x": keep, "w": weight, "b": bias, "stride": _triple(stride), "padding": _triple(padding)})
        return real(x, weight, bias, stride, padding, dilation, groups)

    F.conv3d = recorder
    try:
        fn()
    finally:
        F.conv3d = real
    return calls


def _triple(v) -> tuple[int, int, int]:
    return tuple(v) if isinstance(v, list | tuple) else (v, v, v)


def _frames(x: torch.Tensor) -> torch.Tensor:
    """[1, C, T, H, W] -> [T, C, H, W] (a view; channels-last when x is NDHWC)."""
    return x[0].permute(1, 0, 2, 3)


def _pad_cin(x: torch.Tensor, w: torch.Tensor, to: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The input's channels and the weight's input channels zero-padded to `to` (NDHWC input)."""
    cin = x.shape[1]
    xp = F.pad(x, (0, 0, 0, 0, 0, 0, 0, to - cin)).contiguous(memory_format=CL3)
    return xp, F.pad(w, (0, 0, 0, 0, 0, 0, 0, to - cin)).contiguous(memory_format=CL3)


def _shaped_forms(x: torch.Tensor, w: torch.Tensor, b, stride, pad, tag: str) -> dict:
    """The 2-D forms of one NDHWC call (B = 1, no time padding), named with `tag`."""
    kt, c = w.shape[2], x.shape[1]
    out: dict[str, Callable[[], torch.Tensor]] = {}
    if kt == 1:
        w2 = w[:, :, 0].contiguous(memory_format=torch.channels_last)
        out["conv2d" + tag] = lambda: F.conv2d(_frames(x), w2, b, stride[1:], pad[1:]).permute(1, 0, 2, 3)[None]
    if kt == 3 and stride[0] == 1:
        t_out = x.shape[2] - 2
        taps = [w[:, :, k].contiguous(memory_format=torch.channels_last) for k in range(3)]

        def three() -> torch.Tensor:
            y = F.conv2d(_frames(x[:, :, 0:t_out]), taps[0], b, stride[1:], pad[1:])
            for k in (1, 2):
                y = y + F.conv2d(_frames(x[:, :, k : k + t_out]), taps[k], None, stride[1:], pad[1:])
            return y.permute(1, 0, 2, 3)[None]

        out["3 conv2d" + tag] = three
        if 3 * c <= 16:  # the stacking copy is 3x the input: only worth weighing for the 3-channel first conv
            wf = w.permute(0, 2, 1, 3, 4).reshape(w.shape[0], 3 * c, *w.shape[3:])
            fold_to = 16
            wf = F.pad(wf, (0, 0, 0, 0, 0, fold_to - 3 * c)).contiguous(memory_format=torch.channels_last)

            def fold() -> torch.Tensor:
                nd = x[0].permute(1, 2, 3, 0)  # [T, H, W, C] view of the NDHWC input
                stacked = torch.zeros((t_out, *nd.shape[1:3], fold_to), dtype=x.dtype, device=x.device)
                for k in range(3):
                    stacked[..., k * c : (k + 1) * c].copy_(nd[k : k + t_out])
                return F.conv2d(stacked.permute(0, 3, 1, 2), wf, b, stride[1:], pad[1:]).permute(1, 0, 2, 3)[None]

            out[f"fold to {fold_to}" + tag] = fold
    return out


def forms(call: dict) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> a function giving the call's output as [1, Co, T, H, W] (any layout)."""
    x, w, b, stride, pad = call["x"], call["w"], call["b"], call["stride"], call["padding"]
    out: dict[str, Callable[[], torch.Tensor]] = {"as is": lambda: F.conv3d(x, w, b, stride, pad)}
    if not x.is_contiguous(memory_format=CL3):
        out["ndhwc input"] = lambda: F.conv3d(x.contiguous(memory_format=CL3), w, b, stride, pad)
    if pad[0] != 0 or x.shape[0] != 1:
        return out
    xc = x if x.is_contiguous(memory_format=CL3) else x.contiguous(memory_format=CL3)
    out.update(_shaped_forms(xc, w, b, stride, pad, ""))
    cin = x.shape[1]
    to = 8 if cin < 8 else 32 if cin < 32 else None
    if to is not None:  # conv alone on a padded input: a padded cache concatenation would make it
        xp, wp = _pad_cin(xc, w, to)
        out[f"cin to {to}"] = lambda: F.conv3d(xp, wp, b, stride, pad)
        out.update(_shaped_forms(xp, wp, b, stride, pad, f", cin to {to}"))
    return out


def elementwise_ops(fn: Callable[[], object], dev: torch.device, top: int = 24) -> list[dict]:
    """The copies, fills and adds of one fn() call, grouped by op and input shapes, by device time: which
    of the encode's passes the kernel profile's `direct_copy` and `add` lines are."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    keep = ("aten::copy_", "aten::add", "aten::add_", "aten::fill_", "aten::zero_", "aten::cat", "aten::clone")
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in keep:
            dev_us = getattr(e, "device_time_total", 0.0) if dev.type == "cuda" else e.self_cpu_time_total
            rows.append({"op": e.key, "shapes": str(e.input_shapes[:2]), "count": e.count, "device_ms": dev_us / 1e3})
    return sorted(rows, key=lambda r: -r["device_ms"])[:top]


def main() -> None:
    args, dev, ms = micro_bench_setup(__doc__, default_reps=5)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    height, width = (32, 48) if args.smoke else (704, 1280)
    torch.manual_seed(0)
    vae = WanVAE(LIGHTVAE, parts=("encoder",)).to(dev, dtype).eval()
    if dev.type == "cuda":  # the engine's form (OmniDreams' build_hdmap_encoder)
        vae.use_channels_last().use_fused_norms()
    templates = cache_templates(vae, 1, height, width)
    frames = torch.rand(1, 8, 3, height, width, device=dev)
    video = (frames.permute(0, 2, 1, 3, 4) * 2 - 1).to(dtype)  # as EncodeHdmapStep makes it

    def encode() -> torch.Tensor:
        return vae.encoder(video, [t.clone() for t in templates])

    result: dict = {"env": environment(dev), "height": height, "width": width, "calls": []}
    with torch.no_grad():
        encode()
        result["encode_ms"] = ms(encode)
        result["encode_profile"], _ = profile_call(encode, dev)
        print(f"encode {result['encode_ms']:.2f} ms; profile:", json.dumps(result["encode_profile"]["categories"]))
        calls = record_convs(encode)
        seen: dict[tuple, dict] = {}
        for i, call in enumerate(calls):
            key = (tuple(call["x"].shape), tuple(call["x"].stride()), tuple(call["w"].shape), call["stride"])
            if key in seen:  # the same call again (a resblock's twin): counted, not re-timed
                seen[key]["count"] += 1
                continue
            fns = forms(call)
            ref = fns["as is"]()
            row = {
                "input": list(call["x"].shape),
                "input_ndhwc": call["x"].is_contiguous(memory_format=CL3),
                "weight": list(call["w"].shape),
                "stride": call["stride"],
                "count": 1,
                "forms": {},
            }
            seen[key] = row
            for name, fn in fns.items():
                row["forms"][name] = {"ms": ms(fn), "rel_l2": rel_l2(fn().float(), ref.float())}
            result["calls"].append(row)
            best = min(row["forms"].items(), key=lambda kv: kv[1]["ms"])
            print(
                f"conv {i:2d} in {row['input']} w {row['weight']} s {row['stride']} ndhwc {row['input_ndhwc']}: "
                + "  ".join(f"{n} {r['ms']:.3f}" for n, r in row["forms"].items())
                + f"  -> best {best[0]}"
            )
            del call["x"]
        # The encoder as the engine now builds it (`use_narrow_forms`), same weights, caches and video; both
        # forms also against a float32 encode of the same video by the plain encoder (which is nearer).
        before = encode()
        fp32 = WanVAE(LIGHTVAE, parts=("encoder",)).to(dev).eval()
        fp32.load_state_dict(vae.state_dict())
        tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False  # full float32 convs
        ref32 = fp32.encoder(video.float(), [t.float() for t in cache_templates(fp32, 1, height, width)])
        torch.backends.cudnn.allow_tf32 = tf32
        del fp32
        vae.use_narrow_forms()
        templates[:] = cache_templates(vae, 1, height, width)  # the padded caches the engine's state holds
        result["narrow_encode_ms"] = ms(encode)
        result["narrow_encode_profile"], after = profile_call(encode, dev)
        result["narrow_rel_l2"] = rel_l2(after.float(), before.float())
        result["rel_l2_vs_fp32"] = {"before": rel_l2(before.float(), ref32), "narrow": rel_l2(after.float(), ref32)}
        print("against a float32 encode:", json.dumps(result["rel_l2_vs_fp32"]))
        print(
            f"encode with narrow forms {result['narrow_encode_ms']:.2f} ms (was {result['encode_ms']:.2f}), "
            f"rel. L2 {result['narrow_rel_l2']:.1e}; profile:",
            json.dumps(result["narrow_encode_profile"]["categories"]),
        )
        result["narrow_ops"] = elementwise_ops(encode, dev)
        for row in result["narrow_ops"][:16]:
            print(f"  {row['device_ms']:7.3f} ms {row['count']:3d}x {row['op']} {row['shapes']}")
    total = sum(r["count"] * r["forms"]["as is"]["ms"] for r in result["calls"])
    best_total = sum(r["count"] * min(f["ms"] for f in r["forms"].values()) for r in result["calls"])
    result["convs_as_is_ms"], result["convs_best_ms"] = total, best_total
    print(f"encode {result['encode_ms']:.2f} ms; convs as is {total:.2f} ms, each in its best form {best_total:.2f}")
    write_result(args.out, result)


if __name__ == "__main__":
    main()
