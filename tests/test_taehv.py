"""TAEHV: fixture parity, streaming with carried MemBlock memory, the decoder interface, loading."""

from __future__ import annotations

import pytest
import torch

from flashdreams.errors import CheckpointError, InvalidArgumentError
from flashdreams.models.decoders import TINY_CONFIGS, init_random_, tiny_decoder
from flashdreams.models.taehv import TAEHV, TAEHVConfig
from flashdreams.numerics import rel_l2
from flashdreams.parity.common import fixtures_root, load_fixture


@pytest.fixture(scope="module")
def model() -> TAEHV:
    m = TAEHV(TINY_CONFIGS["taehv"])
    init_random_(m, torch.Generator().manual_seed(3))
    return m.eval()


def _latents(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_fixture_parity() -> None:
    from flashdreams.parity.taehv_decode import run

    root = fixtures_root()
    if root is None or not (root / "taehv_decode").is_dir():
        where = root or "$FD_FIXTURES (unset) or ../shared/fixtures beside the repo (absent)"
        pytest.skip(f"parity fixture 'taehv_decode' not found in {where}; set FD_FIXTURES")
    checks = run(load_fixture(root / "taehv_decode"), attention="ignored")
    assert {c.name for c in checks} == {"video_full", "video_sequential", "video_stream"}
    for check in checks:
        assert check.passed, f"{check.name}: rel_l2 {check.rel_l2:.3e} > {check.tolerance}"


@pytest.mark.parametrize("split", [(1, 1, 1, 1, 1), (3, 2), (2, 3), (5,), (1, 4)])
def test_stream_equals_parallel_decode(model: TAEHV, split: tuple[int, ...]) -> None:
    latents = _latents(2, sum(split), 16, 3, 5, seed=len(split) * 100 + split[0])
    full = model.decode_full(latents)
    assert full.shape == (2, 4 * sum(split), 3, 24, 40)
    state = model.new_decode_state(2, 3, 5)
    outs, start = [], 0
    for n in split:
        outs.append(model.decode_stream(latents[:, start : start + n], state, trim=False))
        start += n
    assert rel_l2(torch.cat(outs, 1), full) < 1e-5


def test_channels_last_stream_equals_the_nchw_stream(model: TAEHV) -> None:
    """The NHWC layout a CUDA TAEHVDecoder uses (its TGrow reshapes then copy across layouts) streams the
    same frames as NCHW, memory carried over three blocks (forced here on the CPU)."""
    import copy

    nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert nhwc.decoder[1].weight.is_contiguous(memory_format=torch.channels_last)
    latents = _latents(2, 6, 16, 3, 5, seed=11)
    outs = []
    for m in (model, nhwc):
        state = m.new_decode_state(2, 3, 5)
        outs.append(torch.cat([m.decode_stream(latents[:, i : i + 2], state) for i in (0, 2, 4)], 1))
    assert outs[0].shape == outs[1].shape == (2, 21, 3, 24, 40)
    assert rel_l2(outs[1], outs[0]) < 1e-6


def test_channels_last_activations_stay_channels_last(model: TAEHV, monkeypatch) -> None:
    """With NHWC weights every conv's input is NHWC (the MemBlock inputs and TGrow's frame split used to
    come out NCHW, so cuDNN transposed around each conv); the MemBlock memories stay NCHW as declared.
    (The convs are watched as modules, so MemBlock's fused bias pass, which calls F.conv2d and keeps NHWC
    itself, tests/kernels/test_bias_act.py, is off here.)"""
    import copy

    from flashdreams.models import taehv

    monkeypatch.setattr(taehv, "FUSED_BIAS_ACT", False)
    nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)
    seen = []

    def check(module, args):
        x = args[0]
        seen.append(x.shape[1] == 1 or x.is_contiguous(memory_format=torch.channels_last))

    hooks = [m.register_forward_pre_hook(check) for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d)]
    state = nhwc.new_decode_state(2, 3, 5)
    latents = _latents(2, 2, 16, 3, 5, seed=3).contiguous(memory_format=torch.contiguous_format)
    nhwc.decode_stream(latents, state)
    for h in hooks:
        h.remove()
    convs = [i for i, ok in enumerate(seen) if not ok]
    assert len(seen) > 10 and not convs, f"convs fed NCHW activations: {convs} of {len(seen)}"
    assert all(m.is_contiguous() for m in state.memory)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("factor", [1, 2, 3])
def test_upsample_copy_equals_nn_upsample_and_keeps_the_layout(channels_last: bool, factor: int) -> None:
    from flashdreams.models.taehv import upsample_nearest

    x = _latents(2, 5, 3, 4, seed=7)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    y = upsample_nearest(x, factor)
    assert torch.equal(y, torch.nn.Upsample(scale_factor=factor)(x))
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_decode_with_either_upsample_gives_the_same_frames(model: TAEHV, monkeypatch) -> None:
    """The decoder's upsampling as a broadcast copy (`UPSAMPLE_AS_COPY`, the default) or torch's kernel:
    bit-equal frames, NCHW and NHWC."""
    import copy

    from flashdreams.models import taehv

    latents = _latents(1, 2, 16, 3, 5, seed=9)
    for m in (model, copy.deepcopy(model).to(memory_format=torch.channels_last)):
        outs = []
        for as_copy in (False, True):
            monkeypatch.setattr(taehv, "UPSAMPLE_AS_COPY", as_copy)
            outs.append(m.decode_stream(latents, m.new_decode_state(1, 3, 5)))
        assert torch.equal(outs[0], outs[1])


def test_trimmed_stream_drops_only_the_first_three_frames(model: TAEHV) -> None:
    latents = _latents(1, 6, 16, 3, 5, seed=9)
    state = model.new_decode_state(1, 3, 5)
    first, second = model.decode_stream(latents[:, :3], state), model.decode_stream(latents[:, 3:], state)
    assert (first.shape[1], second.shape[1]) == (9, 12)
    assert rel_l2(torch.cat([first, second], 1), model.decode_full(latents)[:, 3:]) < 1e-5


def test_demo_stream_uses_the_previous_block_as_context(model: TAEHV) -> None:
    latents = _latents(1, 9, 16, 3, 5, seed=10)
    demo = model.decode_demo(latents, block=3, context=3)
    assert demo.shape[1] == 33
    # Block 1 has the whole history in its window, so it equals the parallel decode there.
    assert rel_l2(demo[:, :21], model.decode_full(latents)[:, 3:24]) < 1e-5
    third = model.decode_full(latents[:, 3:9])[:, 12:]
    assert torch.allclose(demo[:, 21:], third, atol=1e-6)


def test_state_in_place_and_reset(model: TAEHV) -> None:
    state = model.new_decode_state(1, 3, 5)
    pointers = [m.data_ptr() for m in state.memory]
    z1, z2 = _latents(1, 3, 16, 3, 5, seed=1), _latents(1, 3, 16, 3, 5, seed=2)
    first = model.decode_stream(z1, state)
    model.decode_stream(z2, state)
    assert [m.data_ptr() for m in state.memory] == pointers
    assert all(m.abs().sum() > 0 for m in state.memory)
    state.reset()
    assert not state.started and all(m.abs().sum() == 0 for m in state.memory)
    assert torch.equal(model.decode_stream(z1, state), first)


def test_wrong_latent_shape_is_refused(model: TAEHV) -> None:
    state = model.new_decode_state(1, 3, 5)
    with pytest.raises(InvalidArgumentError, match="do not fit the state"):
        model.decode_stream(_latents(1, 3, 16, 3, 6, seed=3), state)


def test_interface_frame_counts_and_range() -> None:
    decoder = tiny_decoder("taehv", seed=0)
    state = decoder.new_state(1, 8, 8)
    for block, frames in enumerate((9, 12, 12)):
        video = decoder.decode_block(_latents(1, 16, 3, 8, 8, seed=30 + block), state)  # [B, C, F, h, w] in
        assert video.shape == (1, frames, 3, 64, 64) and video.dtype == torch.float32
        assert decoder.num_frames(3, first=block == 0) == frames
        assert video.min() >= 0.0 and video.max() <= 1.0
        assert video.std() > 0.05
        assert (video == 0).logical_or(video == 1).float().mean() < 0.5
    decoder.reset(state)
    assert decoder.decode_block(_latents(1, 16, 3, 8, 8, seed=30), state).shape[1] == 9


# ---- loading ---------------------------------------------------------------------------------


def _weights(cfg: TAEHVConfig) -> dict[str, torch.Tensor]:
    m = TAEHV(cfg)
    init_random_(m, torch.Generator().manual_seed(5))
    sd = {k: v.half() for k, v in m.state_dict().items()}  # the released file is float16
    sd["encoder.0.weight"] = torch.randn(64, 3, 3, 3).half()  # encoder keys are accepted, not used
    return sd


def test_disabled_time_upscale_keeps_the_last_tgrow_channels() -> None:
    full_cfg = TINY_CONFIGS["taehv"]
    weights = _weights(full_cfg)
    cfg = TAEHVConfig(decoder_time_upscale=(False, True), channels=full_cfg.channels)
    m = TAEHV(cfg)
    m.load_weights(weights)
    c = cfg.channels[1]
    assert m.decoder[13].conv.weight.shape[0] == c
    assert torch.equal(m.decoder[13].conv.weight, weights["decoder.13.conv.weight"][-c:].float())
    assert m.decode_full(_latents(1, 2, 16, 2, 2, seed=6)).shape == (1, 4, 3, 16, 16)


@pytest.mark.parametrize("fault", ["missing", "shape", "unexpected"])
def test_bad_weights_are_refused(fault: str) -> None:
    cfg = TINY_CONFIGS["taehv"]
    weights = _weights(cfg)
    key = "decoder.9.conv.2.weight"
    if fault == "missing":
        del weights[key]
    elif fault == "shape":
        weights[key] = weights[key][:, :-1]
    else:
        key = "decoder.23.weight"
        weights[key] = torch.randn(3)
    m = TAEHV(cfg)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        m.load_weights(weights, source="bad.pth")
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the narrow last conv runs on CUDA")
def test_cuda_decode_ends_in_the_narrow_conv_kernel(monkeypatch) -> None:
    """On CUDA in NHWC bf16 the decoder's ReLU + last conv run as kernels/narrow_conv (called once a decode),
    with frames equal to cuDNN's to bf16 rounding; NARROW_LAST_CONV off brings cuDNN back."""
    from flashdreams.kernels import narrow_conv
    from flashdreams.models import taehv
    from flashdreams.models.decoders import random_decoder

    model = random_decoder("taehv", "cuda", torch.bfloat16).model
    latents = torch.randn(1, 2, 16, 6, 10, device="cuda", dtype=torch.bfloat16)
    calls = []
    real = narrow_conv.conv3x3_narrow
    monkeypatch.setattr(narrow_conv, "conv3x3_narrow", lambda *a, **k: calls.append(1) or real(*a, **k))
    outs = {}
    for on in (True, False):
        monkeypatch.setattr(taehv, "NARROW_LAST_CONV", on)
        outs[on] = model.decode_stream(latents, model.new_decode_state(1, 6, 10))
    assert len(calls) == 1
    assert rel_l2(outs[True].float(), outs[False].float()) < 1e-2
