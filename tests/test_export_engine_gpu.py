"""Engines of the built-in tiny model on CUDA: built, loaded, run under the session's CUDA graphs."""

from __future__ import annotations

import pytest
import torch

import flashdreams
from flashdreams.export.backends.aoti import cuda_load_blocked
from flashdreams.export.build import build_engine
from flashdreams.numerics import rel_l2

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

BLOCKS = 4


def _latents(engine, seed=5):
    s = engine.session(seed=seed)
    return [s.step().latents.float().cpu() for _ in range(BLOCKS)]


@pytest.mark.parametrize(
    ("dtype", "attention", "tol"),
    [("float32", "sdpa", 1e-4), ("bfloat16", "triton", 3e-2)],
)
def test_inductor_engine_on_cuda_matches_eager(tmp_path, dtype, attention, tol):
    out = tmp_path / "engine"
    build_engine(out, backend="inductor", device="cuda", dtype=dtype, attention=attention)
    engine = flashdreams.load(out)
    eager = flashdreams.load(device="cuda", dtype=dtype, attention=attention)
    for b, (x, y) in enumerate(zip(_latents(engine), _latents(eager))):
        assert rel_l2(x, y) <= tol, f"block {b}: rel. L2 {rel_l2(x, y):.3g}"


def test_aoti_engine_on_cuda(tmp_path):
    reason = cuda_load_blocked(torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    out = tmp_path / "engine"
    build_engine(out, backend="aoti", device="cuda", dtype="float32", decoder=None)
    engine = flashdreams.load(out)
    eager = flashdreams.load(device="cuda", dtype="float32", decoder=None)
    for x, y in zip(_latents(engine), _latents(eager)):
        assert rel_l2(x, y) <= 1e-4


def test_a_taehv_engine_decodes_in_nhwc_as_the_eager_decoder_does(tmp_path):
    """TAEHV holds its conv weights channels-last on CUDA, and its Triton passes are chosen by the activations'
    layout while the decode graphs are traced: the engine records those weights as channels-last, restores them
    so at the load, and its frames match the eager session's."""
    import json

    out = tmp_path / "engine"
    build_engine(out, backend="inductor", device="cuda", dtype="bfloat16", attention="triton", decoder="taehv")
    graphs = json.loads((out / "manifest.json").read_text())["graphs"]
    assert graphs["decode"].get("channels_last"), "the decode graph was traced with NCHW conv weights"
    import flashdreams.kernels.bias_act  # noqa: F401  (registers the op the saved graph calls)
    import flashdreams.kernels.memblock_join  # noqa: F401
    import flashdreams.kernels.upsample_frames  # noqa: F401
    from flashdreams.export.backends.inductor import graph_ops

    ep = torch.export.load(str(out / "graphs" / "decode.pt2"))
    ops = set(graph_ops(ep))
    assert {"bias_act", "memblock_join_update", "upsample_frames"} <= ops, f"the decode graph traced the twins: {ops}"
    engine = flashdreams.load(out)
    eager = flashdreams.load(device="cuda", dtype="bfloat16", attention="triton", decoder="taehv")
    a, b = engine.session(seed=5), eager.session(seed=5)
    for block in range(3):
        x, y = a.step(), b.step()
        assert rel_l2(x.frames.float(), y.frames.float()) <= 3e-2, f"block {block}: frames differ"


def test_an_omnidreams_engine_encodes_the_hdmap_in_ndhwc_as_the_eager_encoder_does(tmp_path):
    """The HD-map encoder's Wan VAE holds its 3-D conv weights channels_last_3d on CUDA: the engine's encoder
    graphs record them so (rather than tracing contiguous copies) and restore them at the load, and the engine's
    latents match the eager session's over three chunks, each with a new HD-map video."""
    import json

    out = tmp_path / "engine"
    kw = dict(preset="omnidreams-sv-tiny", dtype="bfloat16", attention="triton", decoder=None)
    build_engine(out, backend="inductor", device="cuda", **kw)
    graphs = json.loads((out / "manifest.json").read_text())["graphs"]
    for name in ("encode_hdmap_first", "encode_hdmap"):
        assert graphs[name].get("channels_last"), f"{name} traced contiguous copies of the NDHWC conv weights"
    engine = flashdreams.load(out)
    eager = flashdreams.load(device="cuda", **kw)
    spec = engine.plan.inputs["hdmap_video"]
    g = torch.Generator().manual_seed(0)
    inputs = {
        n: torch.randn(s.shape, generator=g) for n, s in engine.plan.inputs.items() if s.required and n != "hdmap_video"
    }
    videos = [torch.rand(spec.shape, generator=g) for _ in range(3)]
    a = engine.session(inputs={**inputs, "hdmap_video": videos[0]}, seed=5)
    b = eager.session(inputs={**inputs, "hdmap_video": videos[0]}, seed=5)
    for chunk, video in enumerate(videos):
        if chunk:
            a.set_input("hdmap_video", video)
            b.set_input("hdmap_video", video)
        x, y = a.step().latents.float(), b.step().latents.float()
        assert rel_l2(x, y) <= 3e-2, f"chunk {chunk}: rel. L2 {rel_l2(x, y):.3g}"
