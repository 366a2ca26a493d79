"""Wan VAE: fixture parity, streaming with preallocated state, the decoder interface, loading errors."""

from __future__ import annotations

import pytest
import torch

from flashdreams.errors import CheckpointError, InvalidArgumentError
from flashdreams.models.decoders import build_decoder, init_random_, tiny_decoder
from flashdreams.models.wan_vae import WAN21_LATENT_MEAN, WanVAE, WanVAEConfig
from flashdreams.models.wan_vae_blocks import CausalConv3d, Resample, RMSNorm
from flashdreams.numerics import rel_l2
from flashdreams.parity.common import fixtures_root, load_fixture


def _fixture(name: str):
    root = fixtures_root()
    if root is None or not (root / name).is_dir():
        where = root or "$FD_FIXTURES (unset) or ../shared/fixtures beside the repo (absent)"
        pytest.skip(f"parity fixture '{name}' not found in {where}; set FD_FIXTURES to the fixture folder")
    return load_fixture(root / name)


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    """A small decoder-only VAE with seeded random weights (dim 4 keeps the CPU time low)."""
    model = WanVAE(WanVAEConfig(dim=4), parts=("decoder",))
    init_random_(model, torch.Generator().manual_seed(7))
    return model.eval()


def _latents(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- fixtures --------------------------------------------------------------------------------


def test_decode_fixture_parity() -> None:
    from flashdreams.parity.wan_vae_decode import run

    fixture = _fixture("wan_vae_decode")
    checks = run(fixture, attention="ignored", device="cpu")
    assert {c.name for c in checks} == {"video_full_raw", "video_full", "video_stream_raw", "video_stream"}
    for check in checks:
        assert check.passed, f"{check.name}: rel_l2 {check.rel_l2:.3e} > {check.tolerance}"


def test_decode_cache_shapes_match_the_demo_zero_cache() -> None:
    fixture = _fixture("wan_vae_decode")
    model = WanVAE(WanVAEConfig.from_dict(fixture.config), parts=("decoder",))
    h, w = fixture.params["latent_hw"]
    state = model.new_decode_state(fixture.params["batch_size"], h, w)
    assert [list(c.shape) for c in state.caches] == fixture.params["zero_cache_shapes"]


def test_encode_fixture_parity() -> None:
    from flashdreams.parity.wan_vae_encode import run

    fixture = _fixture("wan21_vae_encode")
    checks = run(fixture)
    assert {c.name for c in checks} >= {"mu", "latent"}
    for check in checks:
        assert check.passed, f"{check.name}: rel_l2 {check.rel_l2:.3e} > {check.tolerance}"


# ---- streaming -------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [(1, 1, 1, 1, 1, 1), (3, 3), (2, 4), (1, 5), (4, 1, 1)])
def test_official_stream_equals_full_decode(vae: WanVAE, split: tuple[int, ...]) -> None:
    z = _latents(1, 16, sum(split), 4, 4, seed=sum(s * 10**i for i, s in enumerate(split)))
    full = vae.decode_full(z, chunk=z.shape[2])  # the whole video in one call
    assert full.shape == (1, 3, 1 + 4 * (z.shape[2] - 1), 32, 32)
    state = vae.new_decode_state(1, 4, 4)
    outs, start = [], 0
    for i, n in enumerate(split):
        out = vae.decode_stream(z[:, :, start : start + n], state)
        assert out.shape[2] == (1 + 4 * (n - 1) if i == 0 else 4 * n)
        outs.append(out)
        start += n
    assert rel_l2(torch.cat(outs, 2), full) < 1e-5


def test_state_is_updated_in_place(vae: WanVAE) -> None:
    state = vae.new_decode_state(2, 4, 6)
    pointers = [c.data_ptr() for c in state.caches]
    for block in range(3):
        vae.decode_stream(_latents(2, 16, 3, 4, 6, seed=100 + block), state)
        assert [c.data_ptr() for c in state.caches] == pointers
    assert all(c.abs().sum() > 0 for c in state.caches)


def test_reset_restores_the_start(vae: WanVAE) -> None:
    z1, z2 = _latents(1, 16, 3, 4, 4, seed=1), _latents(1, 16, 3, 4, 4, seed=2)
    state = vae.new_decode_state(1, 4, 4)
    first = vae.decode_stream(z1, state)
    vae.decode_stream(z2, state)
    state.reset()
    assert not state.started and all(c.abs().sum() == 0 for c in state.caches)
    again = vae.decode_stream(z1, state)
    assert torch.equal(first, again)


def test_demo_mode_differs_from_official_and_gives_four_frames_per_latent(vae: WanVAE) -> None:
    z = _latents(1, 16, 6, 4, 4, seed=3)
    demo = vae.decode_demo(z, block=3, drop=0)
    assert demo.shape[2] == 24
    state = vae.new_decode_state(1, 4, 4, mode="demo")
    blocks = torch.cat([vae.decode_stream(z[:, :, :3], state), vae.decode_stream(z[:, :, 3:], state)], 2)
    assert torch.equal(blocks, demo)
    official = vae.decode_full(z)
    assert rel_l2(demo[:, :, 3:], official) > 1e-3  # zero caches without the skip: a different stream


def test_wrong_latent_shape_is_refused(vae: WanVAE) -> None:
    state = vae.new_decode_state(1, 4, 4)
    with pytest.raises(InvalidArgumentError, match="do not fit the state"):
        vae.decode_stream(_latents(1, 16, 3, 4, 6, seed=4), state)


# ---- the decoder interface -------------------------------------------------------------------


@pytest.mark.parametrize(("first_frame", "batch"), [("official", 2), ("demo", 1)])
def test_interface_frame_counts_and_range(first_frame: str, batch: int) -> None:
    decoder = tiny_decoder("wan-vae", seed=0, first_frame=first_frame)
    state = decoder.new_state(batch, 4, 6)
    for block, frames in enumerate((9, 12, 12)):
        video = decoder.decode_block(_latents(batch, 16, 3, 4, 6, seed=20 + block), state)
        assert video.shape == (batch, frames, 3, 32, 48) and video.dtype == torch.float32
        assert decoder.num_frames(3, first=block == 0) == frames
        assert video.min() >= 0.0 and video.max() <= 1.0
        assert video.std() > 0.05  # random weights, but not a constant picture
        assert (video == 0).logical_or(video == 1).float().mean() < 0.5  # nor a saturated one


def test_interface_matches_the_model(vae: WanVAE) -> None:
    from flashdreams.models.decoders import WanVAEDecoder

    decoder = WanVAEDecoder(vae)
    z = _latents(1, 16, 6, 4, 4, seed=5)
    state = decoder.new_state(1, 4, 4)
    video = torch.cat([decoder.decode_block(z[:, :, :3], state), decoder.decode_block(z[:, :, 3:], state)], 1)
    expected = (vae.decode_full(z).clamp(-1, 1) + 1) / 2
    assert rel_l2(video, expected.permute(0, 2, 1, 3, 4)) < 1e-5


def test_tiny_decoder_is_deterministic() -> None:
    a, b, c = (tiny_decoder("wan-vae", seed=s).vae.state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# ---- loading ---------------------------------------------------------------------------------


def _full_weights(cfg: WanVAEConfig) -> dict[str, torch.Tensor]:
    model = WanVAE(cfg)
    init_random_(model, torch.Generator().manual_seed(11))
    return model.state_dict()


def test_decoder_only_load_accepts_a_full_checkpoint() -> None:
    cfg = WanVAEConfig(dim=4)
    weights = _full_weights(cfg)
    model = WanVAE(cfg, parts=("decoder",))
    model.load_weights(weights)
    assert torch.equal(model.decoder.conv1.weight, weights["decoder.conv1.weight"])
    encoder_only = {k: v for k, v in weights.items() if k.startswith(("encoder.", "conv1."))}
    WanVAE(cfg, parts=("encoder",)).load_weights(encoder_only)
    with pytest.raises(CheckpointError, match="decoder.conv1.weight"):
        WanVAE(cfg, parts=("decoder",)).load_weights(encoder_only)


@pytest.mark.parametrize("fault", ["missing", "shape", "unexpected"])
def test_bad_weights_are_refused_and_nothing_is_loaded(fault: str) -> None:
    cfg = WanVAEConfig(dim=4)
    weights = _full_weights(cfg)
    key = "decoder.upsamples.3.time_conv.weight"
    if fault == "missing":
        del weights[key]
    elif fault == "shape":
        weights[key] = weights[key][:, :-1]
    else:
        key = "decoder.upsamples.99.bias"
        weights[key] = torch.randn(3)
    model = WanVAE(cfg, parts=("decoder",))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        model.load_weights(weights, source="bad.pth")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_latent_stats_stay_float32_under_dtype_casts() -> None:
    model = WanVAE(WanVAEConfig(dim=4), parts=("decoder",)).to(torch.bfloat16)
    assert model.latent_mean.dtype == torch.float32
    assert torch.equal(model.latent_mean, torch.tensor(WAN21_LATENT_MEAN, dtype=torch.float32))
    assert model.conv2.weight.dtype == torch.bfloat16


def test_encode_refuses_a_bad_frame_count() -> None:
    model = WanVAE(WanVAEConfig(dim=4), parts=("encoder",))
    with pytest.raises(InvalidArgumentError, match="1\\+4k"):
        model.encode(torch.rand(1, 3, 8, 16, 16) * 2 - 1)


# ---- memory layout ---------------------------------------------------------------------------


def _plain_and_channels_last(device: str, dim: int = 4) -> tuple[WanVAE, WanVAE]:
    cfg = WanVAEConfig(dim=dim, attn_scales=(1.0,))
    plain = WanVAE(cfg)
    init_random_(plain, torch.Generator().manual_seed(3))
    last = WanVAE(cfg)
    last.load_state_dict(plain.state_dict())
    return plain.to(device).eval(), last.to(device).eval().use_channels_last()


def _same_stream(plain: WanVAE, last: WanVAE, device: str, tol: float) -> None:
    states = [m.new_decode_state(1, 4, 6, device=torch.device(device)) for m in (plain, last)]
    for i, n in enumerate((2, 3, 1)):
        z = _latents(1, 16, n, 4, 6, seed=40 + i).to(device)
        a, b = plain.decode_stream(z, states[0]), last.decode_stream(z, states[1])
        assert rel_l2(b, a) < tol, i
    for ca, cb in zip(*(s.caches for s in states)):
        assert rel_l2(cb, ca) < tol
    video = (torch.rand(1, 3, 9, 32, 48, generator=torch.Generator().manual_seed(5)) * 2 - 1).to(device)
    assert rel_l2(last.encode_latent(video), plain.encode_latent(video)) < tol


def test_channels_last_vae_computes_the_same_stream() -> None:
    """`use_channels_last` changes only the memory order: the channels-last VAE's weights are NDHWC and
    it decodes a stream and encodes a video as the NCDHW VAE does (the CPU's conv3d hands back NCDHW
    activations whatever the weights' layout; the CUDA test below checks they stay NDHWC there)."""
    plain, last = _plain_and_channels_last("cpu")
    conv = last.decoder.conv1
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d) and not conv.weight.is_contiguous()
    _same_stream(plain, last, "cpu", 1e-5)


def test_cat_frames_keeps_the_activation_layout() -> None:
    """An NCDHW cache before NDHWC activations: torch.cat would hand back NCDHW, cat_frames NDHWC."""
    from flashdreams.models.wan_vae_blocks import cat_frames

    past = torch.randn(1, 8, 2, 4, 6)
    x = torch.randn(1, 8, 3, 4, 6).contiguous(memory_format=torch.channels_last_3d)
    out = cat_frames(past, x)
    assert out.is_contiguous(memory_format=torch.channels_last_3d) and not out.is_contiguous()
    assert torch.equal(out, torch.cat([past, x], dim=2))
    plain = cat_frames(past, x.contiguous())
    assert plain.is_contiguous() and torch.equal(plain, out)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_channels_last_vae_on_cuda_stays_channels_last() -> None:
    plain, last = _plain_and_channels_last("cuda")
    seen = []
    hook = last.decoder.conv1.register_forward_hook(
        lambda m, i, o: seen.append(o.is_contiguous(memory_format=torch.channels_last_3d))
    )
    _same_stream(plain, last, "cuda", 5e-3)  # TF32 convolutions, two algorithms
    hook.remove()
    assert seen and all(seen)


def test_fused_norms_compute_the_same_stream() -> None:
    """`use_fused_norms`: every residual block's and head's RMSNorm + SiLU as one kernel pass (our Triton
    kernel under the interpreter here, else its float32 twin): the same decoded stream and encoding."""
    plain, _ = _plain_and_channels_last("cpu")
    fused = WanVAE(plain.config)
    fused.load_state_dict(plain.state_dict())
    fused.eval().use_fused_norms()
    norms = [m for m in fused.modules() if isinstance(m, RMSNorm) and m.fused]
    assert norms and all(m.silu for m in norms)  # in the Wan VAE every video norm is followed by SiLU
    assert not any(isinstance(m, torch.nn.SiLU) for m in fused.modules())
    assert fused.state_dict().keys() == plain.state_dict().keys()
    _same_stream(plain, fused, "cpu", 1e-5)


@pytest.mark.parametrize("dim", [4, 12])  # 12: LightVAE's widths halved, so 24- and 48-channel convs (48 -> 64)
def test_narrow_forms_compute_the_same_stream(dim: int) -> None:
    """`use_narrow_forms`: the few-channel convs padded (24 -> 32, 48 -> 64), the first conv's time taps folded
    into channels, the stride-2 downsampling as 2-D convs: the same decoded stream, encoding and caches,
    alone and on top of the channels-last and fused-norm forms (the HD-map encoder's CUDA form)."""
    plain, last = _plain_and_channels_last("cpu", dim)
    narrow = WanVAE(plain.config)
    narrow.load_state_dict(plain.state_dict())
    narrow.eval().use_narrow_forms()
    for m in narrow.modules():
        if isinstance(m, CausalConv3d):  # 1x1 and time-only convs keep their form, as do wide ones
            full = m.kernel_size == (3, 3, 3)
            padded_width = m.in_channels <= 48 and m.in_channels % 32 != 0
            want = None if not full or not padded_width else "fold" if m.in_channels <= 5 else "pad"
            assert m.narrow_form == want, (m.in_channels, m.kernel_size)
    forms = {m.narrow_form for m in narrow.modules() if isinstance(m, CausalConv3d)}
    assert forms == {None, "pad", "fold"} and narrow.encoder.conv1.narrow_form == "fold"
    widths = {m.in_channels for m in narrow.modules() if getattr(m, "narrow_form", None) == "pad"}
    assert 48 in widths if dim == 12 else max(widths) < 32
    downs = [m for m in narrow.modules() if isinstance(m, Resample) and m.mode.startswith("down")]
    assert all(m.spatial_as_2d == (m.resample[1].in_channels < 32) for m in downs)
    assert narrow.state_dict().keys() == plain.state_dict().keys()
    _same_stream(plain, narrow, "cpu", 1e-5)
    last.use_fused_norms().use_narrow_forms()
    padded = [m for m in last.modules() if isinstance(m, CausalConv3d) and m.narrow_form == "pad"]
    assert any(m._pre_norm for m in padded)  # their norms write the padded input themselves
    assert all(m._pre_norm[0].deferred for m in padded if m._pre_norm)
    _same_stream(plain, last, "cpu", 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dim", [4, 12])
def test_narrow_forms_on_cuda_compute_the_same_stream(dim: int) -> None:
    """On cuDNN (the forms' reason to be): the engine's HD-map encoder form against the plain VAE."""
    plain, last = _plain_and_channels_last("cuda", dim)
    last.use_fused_norms().use_narrow_forms()
    _same_stream(plain, last, "cuda", 5e-3)  # TF32 convolutions, different algorithms


@pytest.mark.parametrize("form", [None, "pad"])
def test_a_causal_conv_keeps_its_cache_in_its_weights_layout(form) -> None:
    """A conv whose weight is held channels_last_3d (`WanVAE.use_channels_last`) gets an NDHWC cache ([B, 2, H, W, C],
    or the padded [B, 2, H, W, 32] of a "pad" conv, always), copied to and from the input buffer as one block; a
    contiguous weight keeps [B, C, 2, H, W]. The rule follows the weight, not the activations (whose layout a CUDA
    trace did not keep), so a traced graph makes the caches its eager templates have. Streamed chunk by chunk in
    either input layout, every form computes what one whole-stream call computes."""
    torch.manual_seed(0)
    conv = CausalConv3d(6, 5, 3, spatial_pad=1).eval()
    conv.narrow_form = form
    chunks = [torch.randn(1, 6, n, 4, 5) for n in (1, 3, 2)]
    with torch.no_grad():
        whole = conv(torch.cat(chunks, dim=2))
        for ndhwc_weight in (False, True):
            held = conv.weight.data.contiguous()
            conv.weight.data = held.contiguous(memory_format=torch.channels_last_3d) if ndhwc_weight else held
            assert conv.ndhwc_weight() == ndhwc_weight
            for channels_last in (False, True):
                caches: list = [None]
                conv.slot = 0
                outs = []
                for x in chunks:
                    x = x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x
                    outs.append(conv(x, caches))
                want = (1, 2, 4, 5, 32 if form else 6) if ndhwc_weight or form else (1, 6, 2, 4, 5)
                assert caches[0].shape == want and caches[0].is_contiguous()
                assert rel_l2(torch.cat(outs, dim=2), whole) < 1e-6


def test_cat_frames_padded_zeroes_only_the_added_channels() -> None:
    from flashdreams.models.wan_vae_blocks import cat_frames_padded

    past, x = torch.randn(1, 3, 2, 4, 6), torch.randn(1, 3, 5, 4, 6)
    out = cat_frames_padded(past, x, 8)
    assert out.shape == (1, 8, 7, 4, 6) and out.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(out[:, :3], torch.cat([past, x], dim=2))
    assert torch.count_nonzero(out[:, 3:]) == 0
    whole = cat_frames_padded(None, x, 8)  # no cache: the past is 2 frames of zeros
    assert torch.count_nonzero(whole[:, :, :2]) == 0 and torch.equal(whole[:, :3, 2:], x)


def _fused_norms(vae: WanVAE) -> list[bool]:
    return [m.fused for m in vae.modules() if isinstance(m, RMSNorm) and m.gamma.dim() == 4]


def test_a_cpu_decoder_keeps_the_torch_norms() -> None:
    dec = build_decoder("wan-vae", None, device="cpu", config={"dim": 8}, seed=4)
    assert _fused_norms(dec.vae) and not any(_fused_norms(dec.vae))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_decoder_fuses_its_norms_and_decodes_as_the_cpu_one() -> None:
    """models/decoders.py switches the fused RMSNorm + SiLU on for CUDA Wan VAE decoders (measured faster
    in next12-h200); the same seeded weights decode the same frames as the torch form on the CPU."""
    cpu = build_decoder("wan-vae", None, device="cpu", config={"dim": 8}, seed=4)
    cuda = build_decoder("wan-vae", None, device="cuda", config={"dim": 8}, seed=4)
    cuda.vae.load_state_dict(cpu.vae.state_dict())  # one set of weights (the seeded draws differ per device)
    assert all(_fused_norms(cuda.vae))
    lat = torch.randn(1, 16, 3, 6, 8, generator=torch.Generator().manual_seed(2))
    outs = []
    for dec in (cpu, cuda):
        state = dec.new_state(1, 6, 8)
        outs.append(
            torch.cat([dec.decode_block(lat[:, :, i : i + 1].to(dec.device), state).cpu() for i in range(3)], 1)
        )
    assert rel_l2(outs[1], outs[0]) < 5e-3  # TF32 convolutions on the GPU
