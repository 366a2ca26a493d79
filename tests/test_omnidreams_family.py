"""The omnidreams family on the seam: the public preset's numbers, the streaming plan as data, the hdmap
input read by every chunk, the KV window, the first chunk's image, and what a session refuses."""

from __future__ import annotations

import json

import pytest
import torch

import flashdreams
from flashdreams import registry
from flashdreams.errors import InvalidArgumentError
from flashdreams.models.cosmos_dit import CosmosDiT
from flashdreams.models.cosmos_loader import load_cosmos_dit
from flashdreams.models.families.omnidreams import FAMILY
from flashdreams.models.families.omnidreams.plan import build_plan
from flashdreams.models.families.omnidreams.presets import TINY_OMNIDREAMS
from flashdreams.models.family import BlockPlan
from flashdreams.models.random_init import init_random_
from flashdreams.models.wan_vae import WanVAE
from flashdreams.parity import rel_l2

TINY = "omnidreams-sv-tiny-latent"
LAT = (1, 16, 2, 8, 12)


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "prompt_embeds": torch.randn(1, 6, 80, generator=g),
        "image_latent": torch.randn(1, 16, 1, 8, 12, generator=g),
        "hdmap": torch.randn(*LAT, generator=g),
    }


def _engine():
    return flashdreams.load(preset=TINY, device="cpu", dtype="float32", decoder=None)


def test_public_preset_numbers():
    p = registry.get_preset("omnidreams-sv")
    assert (p.len_t, p.window_t, p.sink_t, p.denoising_timesteps, p.shift, p.context_noise, p.fps) == (
        2,
        6,
        0,
        (1000, 450),
        5.0,
        128.0,
        30,
    )
    sched = p.schedule()
    assert sched.timesteps[0] == 1000.0 and abs(sched.timesteps[1] - 803.5714111328125) < 1e-9
    assert p.hdmap_input == "pixels"
    plan = build_plan(p.replace(hdmap_input="latent"), 1, p.latent_size(), "bfloat16", None)  # no encoder at 704p
    ring = plan.meta["ring"]
    assert p.latent_size() == (88, 160) and ring["frame_seq_length"] == 3520
    assert plan.ring.valid_tokens(2) == 21120 and plan.ring.valid_tokens(50) == 21120  # 6 latent frames
    assert abs(plan.meta["schedule"]["context_sigma"] - 0.12992832) < 1e-7
    assert plan.inputs["hdmap"].shape == (1, 16, 2, 88, 160) and plan.inputs["hdmap"].units == "latent"
    assert 150e12 < plan.meta["block_flops"][-1] < 230e12  # the issue's ~190 TFLOP per chunk over 3 forwards
    calls = [op["graph"] for op in plan.programs["steady"] if op["op"] == "call"]
    assert calls == ["dit", "dit", "dit"]
    assert BlockPlan.from_dict(json.loads(json.dumps(plan.to_dict()))).to_dict() == plan.to_dict()
    for q in FAMILY.presets():
        assert registry.preset_from_dict(json.loads(json.dumps(q.to_dict()))) == q


def test_stream_follows_the_hdmap_and_keeps_the_start_frame():
    engine = _engine()
    inp = _inputs()
    a = engine.session(inputs=inp, seed=1)
    b = engine.session(inputs=inp, seed=1)
    first = a.step()
    assert torch.equal(first.latents[:, :, :1], inp["image_latent"])  # chunk 0 keeps the given frame
    assert torch.equal(b.step().latents, first.latents)
    b.set_input("hdmap", inp["hdmap"].flip(-1))  # a different map for chunk 1 only
    la, lb = a.step().latents, b.step().latents
    assert rel_l2(la, lb) > 1e-3
    for _ in range(3):  # the window rolls (chunks 3, 4): the ring holds 6 latent frames
        a.step()
    assert int(a.buffers["valid_len"]) == 6 * 4 * 6 and a.block == 5


def test_reset_replays_the_stream():
    engine = _engine()
    s = engine.session(inputs=_inputs(), seed=2)
    first = [s.step().latents for _ in range(4)]
    s.reset()
    again = [s.step().latents for _ in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(first, again))


def test_session_refuses_bad_hdmap_and_missing_inputs():
    engine = _engine()
    s = engine.session(inputs=_inputs(), seed=0)
    before = s.buffers["hdmap"].clone()
    with pytest.raises(InvalidArgumentError):
        s.set_input("hdmap", torch.randn(1, 16, 3, 8, 12))  # 3 latent frames: a chunk has 2
    with pytest.raises(InvalidArgumentError):
        s.set_input("hdmap", torch.full(LAT, float("inf")))
    assert torch.equal(s.buffers["hdmap"], before)
    latent = registry.get_preset("omnidreams-sv").replace(hdmap_input="latent")
    real = build_plan(latent, 1, (88, 160), "bfloat16", None)
    assert {n for n, spec in real.inputs.items() if spec.required} == {"prompt_embeds", "image_latent", "hdmap"}
    pixels = flashdreams.load(preset="omnidreams-sv-tiny", device="cpu", dtype="float32", decoder=None)
    spec = pixels.plan.inputs["hdmap_video"]
    assert spec.shape == (1, 8, 3, 64, 96) and (spec.low, spec.high, spec.units) == (0.0, 1.0, "image")
    with pytest.raises(InvalidArgumentError):  # rendered frames are in [0, 1]
        pixels.session(inputs={**_inputs(), "hdmap_video": torch.full(spec.shape, 2.0)})


def test_loader_drops_the_padding_mask_columns():
    """The released checkpoint's x_embedder has 72 columns; OmniDreams uses the first 68."""
    full = init_random_(CosmosDiT(TINY_OMNIDREAMS.replace(padding_channel=True)), 0)
    sd = {f"net.{k}": v for k, v in full.state_dict().items()}
    model = load_cosmos_dit(sd, TINY_OMNIDREAMS)
    w = model.state_dict()["x_embedder.proj.1.weight"]
    assert w.shape == (64, 68) and torch.equal(w, sd["net.x_embedder.proj.1.weight"][:, :68])
    assert "additional_patch_embedding.proj.1.weight" in model.state_dict()


def _video(seed: int, frames: int = 8) -> torch.Tensor:
    return torch.rand(1, frames, 3, 64, 96, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("narrow", [False, True])
def test_hdmap_encoder_streams_like_one_causal_encode(narrow, monkeypatch):
    """Chunk 0 codes its last 5 frames, later chunks 8: the streamed latents equal one encode of the whole
    video (frames 3, 4, ...), so the cached stream is consistent; a reset starts it over. With `narrow`
    the engine's encoder is built in its CUDA convolution forms (`use_narrow_forms`: padded caches in the
    session state among them) and streams against the plain encoder's reference."""
    if narrow:
        build = type(FAMILY).build_hdmap_encoder
        monkeypatch.setattr(
            type(FAMILY), "build_hdmap_encoder", lambda self, *a, **k: build(self, *a, **k).use_narrow_forms()
        )
    engine = flashdreams.load(preset="omnidreams-sv-tiny", device="cpu", dtype="float32", decoder=None)
    inp = {k: v for k, v in _inputs().items() if k != "hdmap"}
    videos = [_video(i) for i in range(3)]
    vae = engine.model.graphs["encode_hdmap"].vae
    plain = WanVAE(vae.config, parts=("encoder",)).eval()
    plain.load_state_dict(vae.state_dict())
    whole = torch.cat(videos, dim=1)[:, 3:].permute(0, 2, 1, 3, 4) * 2 - 1  # 21 = 1 + 4*5 frames
    ref = plain.encode_latent(whole)
    forms = {getattr(m, "narrow_form", None) for m in vae.modules()}
    assert forms >= ({None, "pad", "fold"} if narrow else {None}) and (narrow or forms == {None})
    s = engine.session(inputs={**inp, "hdmap_video": videos[0]}, seed=0)
    caches = [t for n, t in s.buffers.items() if n.startswith("hdmap_enc_")]
    padded = [t for t in caches if t.dim() == 5 and t.shape[1] == 2 and t.shape[-1] == 32]  # [B, 2, H, W, 32]
    assert caches and bool(padded) == narrow
    got = []
    for v in videos:
        s.set_input("hdmap_video", v)
        s.step()
        got.append(s.buffers["hdmap"].clone())
    assert all(g.shape == LAT for g in got)
    assert rel_l2(torch.cat(got, dim=2), ref) < 1e-5
    s.reset()
    s.set_input("hdmap_video", videos[0])
    s.step()
    assert torch.equal(s.buffers["hdmap"], got[0])


def test_cuda_form_hdmap_encoder_exports_as_it_runs(monkeypatch):
    """fd-build's trace (torch.export) of the HD-map encode step in its CUDA form (channels-last, fused norms
    with the padded-norm op, narrow convs, layout-following caches), here on the CPU under the interpreter:
    the exported program computes the eager step's latent and leaves the same caches."""
    from flashdreams.export.backends.inductor import export_program
    from flashdreams.export.steps import step_program
    from flashdreams.kernels import triton_available

    if not triton_available(torch.device("cpu")):  # (a CUDA machine runs its tests without the interpreter)
        pytest.skip("Triton kernels on the CPU need TRITON_INTERPRET=1 set before triton is imported")
    build = type(FAMILY).build_hdmap_encoder
    cuda_form = lambda self, *a, **k: build(self, *a, **k).use_channels_last().use_fused_norms().use_narrow_forms()  # noqa: E731
    monkeypatch.setattr(type(FAMILY), "build_hdmap_encoder", cuda_form)
    engine = flashdreams.load(preset="omnidreams-sv-tiny", device="cpu", dtype="float32", decoder=None)
    vae = engine.model.graphs["encode_hdmap"].vae
    assert any(m._pre_norm for m in vae.modules() if getattr(m, "narrow_form", None) == "pad")
    prog = step_program(engine.model, "encode_hdmap")
    inputs = prog.fresh_inputs()
    ep = export_program(prog)
    assert "channel_rms_norm_padded" in str(ep.graph)  # the norms write the padded conv inputs
    outs = ep.module()(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    assert rel_l2(outs[0], prog.reference_outputs[0]) < 1e-5
    names = [spec.name for spec in prog.inputs]
    assert prog.reference_state
    for name, ref in prog.reference_state.items():
        assert rel_l2(inputs[names.index(name)], ref) < 1e-5, name


def test_released_pt_layout_converts_and_loads(tmp_path):
    """A `.pt` like the release's (`net.` prefix, training counters) goes through fd-convert and loads."""
    from flashdreams.convert import convert_checkpoint

    full = init_random_(CosmosDiT(TINY_OMNIDREAMS.replace(padding_channel=True)), 5)
    ckpt = {f"net.{k}": v for k, v in full.state_dict().items()} | {"net.accum_iteration": torch.tensor(7)}
    torch.save(ckpt, tmp_path / "model_ema_bf16.pt")
    convert_checkpoint(tmp_path / "model_ema_bf16.pt", tmp_path / "model.safetensors")
    engine = flashdreams.load(tmp_path / "model.safetensors", preset=TINY, device="cpu", dtype="float32", decoder=None)
    got = engine.model.weights.state_dict()
    assert torch.equal(got["blocks.1.mlp.layer2.weight"], full.state_dict()["blocks.1.mlp.layer2.weight"])
    s = engine.session(inputs=_inputs(), seed=0)
    assert torch.isfinite(s.step().latents).all()


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["omnidreams-sv-tiny", "omnidreams-sv-tiny-latent"])
def test_cuda_graph_stream_matches_eager(preset):
    """Captured chunks (HD-map encode, denoise, decode, finalize) replay what the eager session computes."""
    engine = flashdreams.load(preset=preset, device="cuda", dtype="float32")
    inputs = {k: v.cuda() for k, v in _inputs().items()}
    if preset == "omnidreams-sv-tiny":
        inputs = {k: v for k, v in inputs.items() if k != "hdmap"}
        inputs["hdmap_video"] = torch.rand(1, 8, 3, 64, 96, generator=torch.Generator().manual_seed(0)).cuda()
    eager = engine.session(inputs=inputs, seed=3, cuda_graphs=False)
    graphs = engine.session(inputs=inputs, seed=3, cuda_graphs=True)
    for _ in range(5):
        a, b = eager.step(), graphs.step()
        assert rel_l2(a.latents, b.latents) < 1e-5
        assert a.frames.shape == b.frames.shape and (a.frames.int() - b.frames.int()).abs().max() <= 1


def test_fp8_precision_quantizes_the_per_token_linears():
    engine = flashdreams.load(preset=TINY, device="cpu", dtype="float32", decoder=None, precision="fp8")
    net = engine.model.weights
    kinds = {n: type(m).__name__ for n, m in net.named_modules() if n.startswith("blocks.0.") and n.count(".") == 3}
    assert kinds["blocks.0.self_attn.q_proj"] == kinds["blocks.0.mlp.layer2"] == "Fp8Linear"
    assert kinds["blocks.0.cross_attn.k_proj"] == "Linear"  # text K/V run once per prompt: kept
    assert type(net.final_layer.linear).__name__ == "Linear" and net.precision == "fp8"
    ref = _engine().session(inputs=_inputs(), seed=1).step().latents
    got = engine.session(inputs=_inputs(), seed=1).step().latents
    assert 1e-4 < rel_l2(got, ref) < 0.1  # quantized, and close


def test_fp8_ring_shadow_equals_quantizing_the_window_every_call(monkeypatch):
    """FP8 attention (Triton) keeps an fp8 shadow of the ring as session state and re-quantizes only the
    tiles a chunk writes; over 4 chunks (the window rolls at chunk 3) and a reset the latents equal,
    bit for bit, an engine that quantizes the whole window in every call."""
    from flashdreams.kernels import triton_available
    from flashdreams.models import dit_ops
    from flashdreams.models.families import omnidreams

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not triton_available(torch.device(device)):
        pytest.skip("Triton kernels on the CPU need TRITON_INTERPRET=1 set before triton is imported")
    opts = dict(preset=TINY, device=device, dtype="float32", decoder=None, attention="triton", precision="fp8")
    shadowed = flashdreams.load(**opts)
    assert {"ring_k8", "ring_kt", "ring_v8t", "ring_vt"} <= set(shadowed.plan.state)
    assert shadowed.plan.state["ring_k8"].dtype == "float8_e4m3fn"
    with monkeypatch.context() as m:
        m.setattr(omnidreams, "shadow_block_n", lambda *a: None)
        per_call = flashdreams.load(**opts)
    assert "ring_k8" not in per_call.plan.state and "ring_k8" not in per_call.plan.graphs["dit"].args
    calls = []
    real = dit_ops.ring_attention_fp8_shadowed
    monkeypatch.setattr(dit_ops, "ring_attention_fp8_shadowed", lambda *a: calls.append(1) or real(*a))
    inputs = {k: v.to(device) for k, v in _inputs().items()}
    a, b = shadowed.session(inputs=inputs, seed=1), per_call.session(inputs=inputs, seed=1)
    for _ in range(4):
        assert torch.equal(a.step().latents, b.step().latents)
    # 4 chunks x 3 forwards x 2 layers, all through the shadow (on CUDA the steady chunks replay as
    # captured graphs, which run no Python: there only the calls before capture are counted)
    assert len(calls) == 4 * 3 * 2 if device == "cpu" else len(calls) >= 2 * 3 * 2
    assert a.buffers["ring_k8"].float().abs().sum() > 0
    a.reset()
    b.reset()
    assert torch.equal(a.step().latents, b.step().latents)


def test_fp8_norms_quantize_for_their_linears_with_the_same_numbers(monkeypatch, count_calls):
    """In FP8 with the Triton kernels, each Cosmos block's three norms feeding only FP8 linears (q/k/v,
    the cross-attention's q, the MLP's first layer) hand them h quantized in their own pass; the latents
    equal, bit for bit, the linears quantizing h themselves."""
    from flashdreams.kernels import adaln, triton_available
    from flashdreams.models import cosmos_dit, dit_ops

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not triton_available(torch.device(device)):
        pytest.skip("Triton kernels on the CPU need TRITON_INTERPRET=1 set before triton is imported")
    passes, blocks = count_calls(adaln, "_fp8_pass"), count_calls(cosmos_dit.CosmosBlock, "forward")
    opts = dict(preset=TINY, device=device, dtype="float32", decoder=None, attention="triton", precision="fp8")
    inputs = {k: v.to(device) for k, v in _inputs().items()}
    fused = flashdreams.load(**opts).session(inputs=inputs, seed=1).step().latents
    assert blocks and len(passes) == 3 * len(blocks)
    monkeypatch.setattr(dit_ops, "QUANTIZE_IN_NORMS", False)
    passes.clear()
    blocks.clear()
    unfused = flashdreams.load(**opts).session(inputs=inputs, seed=1).step().latents
    assert blocks and not passes
    assert torch.equal(fused, unfused)


@pytest.mark.slow
def test_an_engine_of_the_ndhwc_encoder_builds_though_its_trace_loses_the_layout(tmp_path, monkeypatch):
    """The HD-map encoder as CUDA runs it (channels_last_3d weights, narrow forms), built into an engine while the
    trace's 3-D convolutions report NCDHW outputs, as torch 2.11's export did on an H100 (next114): the encoder's
    caches take their form from the weights, so the first graph's caches fit the session state made eagerly, and
    the engine streams as eager does. (Its caches followed the activations before, and this build failed with
    `expand: attempting to expand a dimension`.)"""
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import is_fake

    from flashdreams.export.build import build_engine

    build = type(FAMILY).build_hdmap_encoder
    monkeypatch.setattr(
        type(FAMILY),
        "build_hdmap_encoder",
        lambda self, *a, **k: build(self, *a, **k).use_channels_last().use_narrow_forms(),
    )
    conv3d = F.conv3d

    def traced_as_on_cuda(*args, **kwargs):  # cuDNN's NDHWC outputs when run, NCDHW ones when traced
        y = conv3d(*args, **kwargs)
        return y.contiguous() if is_fake(y) else y.contiguous(memory_format=torch.channels_last_3d)

    monkeypatch.setattr(F, "conv3d", traced_as_on_cuda)
    kw = dict(preset="omnidreams-sv-tiny", dtype="float32", decoder=None)
    build_engine(tmp_path / "e", backend="inductor", device="cpu", **kw)
    engine, eager = flashdreams.load(tmp_path / "e"), flashdreams.load(device="cpu", **kw)
    assert eager.model.graphs["encode_hdmap"].vae.conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
    inp = {k: v for k, v in _inputs().items() if k != "hdmap"}
    a = engine.session(inputs={**inp, "hdmap_video": _video(0)}, seed=5)
    b = eager.session(inputs={**inp, "hdmap_video": _video(0)}, seed=5)
    for chunk in range(3):
        if chunk:
            a.set_input("hdmap_video", _video(chunk))
            b.set_input("hdmap_video", _video(chunk))
        assert rel_l2(a.step().latents, b.step().latents) < 1e-5, f"chunk {chunk}"
