"""Where TAEHV's traced decode leaves NHWC: each layout-picked call site, eager and under the engine's export.

TAEHV chooses its Triton passes (bias/ReLU, MemBlock join, frame split, narrow last conv) by its activations'
layout. The full-size FP8 engine's decode ran none of them on an H100 (next110) although the eager session runs
them all; this prints, for the decoder at the full and the tiny width on the device, what each call site saw
(shape, strides, NHWC or not, whether Triton runs there, whether the pass was taken) in an eager call and while
`export/backends/inductor.py` exports the `decode` graph with the weights as inputs, then the flashdreams ops
the exported graph holds. First, what a fake convolution reports on the device for NHWC tensors (the cause: on
the H100 the traced convs came out NCHW; TAEHV's convs are now `kernels.conv_nhwc`, channels-last by contract),
and the same for a 3-D convolution in NDHWC (the OmniDreams HD-map encoder's layout).

    python bench/decode_layout_probe.py [--device cuda] [--height 480 --width 832]
"""

from __future__ import annotations

import argparse
import collections
import functools

import torch

from flashdreams.export.backends import inductor as ib
from flashdreams.export.steps import StepProgram
from flashdreams.models import taehv
from flashdreams.models.decode_step import decoder_graphs
from flashdreams.models.decoders import TINY_CONFIGS, random_decoder

SITES = ("_conv_relu", "_memblock_join", "_upsample_then_tgrow", "_narrow_last_conv")


def _describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return repr(t)
    if t.dim() == 5:
        ndhwc = t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous()
        layout = "NDHWC" if ndhwc else "not-NDHWC"
    else:
        layout = "NHWC" if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) else "not-NHWC"
    return f"{type(t).__name__}{list(t.shape)} strides {list(t.stride())} {layout}"


def _spy(log: list[str], name: str, fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        from flashdreams.kernels import triton_available

        x = args[1] if name == "_conv_relu" else args[0]
        out = fn(*args, **kwargs)
        taken = "None" if out is None else _describe(out)
        log.append(f"{name}: in {_describe(x)} triton {triton_available(x.device)} -> {taken}")
        return out

    return wrapped


def probe(label: str, decoder, height: int, width: int) -> None:
    graphs = decoder_graphs(decoder, 1, height // 8, width // 8, 3)
    module = graphs.graphs["decode"]
    state = decoder.new_state(1, height // 8, width // 8)
    dev, dt = decoder.device, decoder.dtype
    latents = torch.randn(1, 16, 3, height // 8, width // 8, device=dev)
    inputs = (latents, *[t.clone() for t in state.memory])
    print(f"== {label}: conv weight {_describe(decoder.model.decoder[1].weight)} ({dt})")
    print(f"   state: {[_describe(t) for t in state.memory][:2]} ...")
    for mode in ("eager", "export"):
        log: list[str] = []
        originals = {s: getattr(taehv, s) for s in SITES}
        for s in SITES:
            setattr(taehv, s, _spy(log, s, originals[s]))
        try:
            if mode == "eager":
                with torch.no_grad():
                    module(*[t.clone() for t in inputs])
            else:
                prog = StepProgram(
                    name="decode",
                    module=module,
                    call_names=["latents", *graphs.state_names],
                    call_inputs=inputs,
                    groups={},
                    inputs=[],
                    outputs=[],
                    mutates=list(graphs.state_names),
                    serves=[],
                )
                ep, names, weights = ib._export_with_weight_inputs(prog)
                n_cl = sum(ib.channels_last_weight(w) for w in weights)
                ours = dict(ib.graph_ops(ep))
                print(f"   export: {len(weights)} weight inputs, {n_cl} channels-last; our ops {ours}")
        finally:
            for s, f in originals.items():
                setattr(taehv, s, f)
        counts = collections.Counter(line.split(":")[0] + (" taken" if "-> None" not in line else "") for line in log)
        print(f"   {mode}: {dict(counts)}")
        for line in log[:6]:
            print(f"     {line}")


def fake_conv(device: str, dtype: torch.dtype) -> None:
    """What a fake convolution reports for NHWC input and weight on `device`, against the real one."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(3, 256, 60, 104, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    kw = dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1], transposed=False, output_padding=[0, 0], groups=1)
    print(f"real conv: {_describe(torch.nn.functional.conv2d(x, w, None, 1, 1))}")
    print(f"  backend {torch._C._select_conv_backend(x, w, bias=None, **kw)}")
    mode = FakeTensorMode()
    fx, fw = mode.from_tensor(x), mode.from_tensor(w)
    with mode:
        print(f"fake conv: {_describe(torch.nn.functional.conv2d(fx, fw, None, 1, 1))}")
        try:
            backend = torch._C._select_conv_backend(fx, fw, bias=None, **kw)
            fmt = torch._C._conv_determine_backend_memory_format(fx, fw, backend)
            print(f"  backend {backend}, memory format {fmt}")
        except Exception as exc:  # (a private API: say what it did)
            print(f"  backend: {type(exc).__name__}: {exc}")


def fake_conv3d(device: str, dtype: torch.dtype) -> None:
    """The same for a 3-D convolution of NDHWC (channels_last_3d) input and weight, as the OmniDreams HD-map
    encoder's Wan VAE runs eagerly on CUDA: whether a trace of it would keep NDHWC."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cl3 = torch.channels_last_3d
    x = torch.randn(1, 96, 3, 88, 160, device=device, dtype=dtype).contiguous(memory_format=cl3)
    w = torch.randn(96, 96, 3, 3, 3, device=device, dtype=dtype).contiguous(memory_format=cl3)
    print(f"real conv3d: {_describe(torch.nn.functional.conv3d(x, w, None, 1, 1))}")
    mode = FakeTensorMode()
    fx, fw = mode.from_tensor(x), mode.from_tensor(w)
    with mode:
        print(f"fake conv3d: {_describe(torch.nn.functional.conv3d(fx, fw, None, 1, 1))}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    args = ap.parse_args()
    dt = torch.bfloat16 if args.device == "cuda" else torch.float32
    print(f"torch {torch.__version__}, device {args.device}")
    fake_conv(args.device, dt)
    fake_conv3d(args.device, dt)
    for label, config in (("full width", None), ("tiny width", TINY_CONFIGS["taehv"])):
        decoder = random_decoder("taehv", device=args.device, dtype=dt, config=config)
        if args.device == "cpu":  # as on CUDA (TAEHVDecoder makes it NHWC only there)
            decoder.model = decoder.model.to(memory_format=torch.channels_last)
        probe(label, decoder, args.height, args.width)


if __name__ == "__main__":
    main()
