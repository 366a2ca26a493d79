"""Matrix-Game 2.0 on the family seam: key layouts, plans, action inputs, steering, bounded caches."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import flashdreams
from flashdreams.errors import CheckpointError, InvalidArgumentError
from flashdreams.models.action_module import window_index
from flashdreams.models.families.matrixgame import FAMILY
from flashdreams.models.families.matrixgame.actions import block_rows, demo_script, script_frames, video_frames
from flashdreams.models.families.matrixgame.loader import load_matrixgame_dit
from flashdreams.models.families.matrixgame.plan import build_plan
from flashdreams.models.families.matrixgame.presets import TINY_ACTION, Preset
from flashdreams.models.families.matrixgame.steps import ActionWindowStep
from flashdreams.models.matrixgame_dit import MatrixGameDiT
from flashdreams.numerics import rel_l2

TINY = "matrix-game-2-tiny"


@pytest.fixture(scope="module")
def engine():
    return flashdreams.load(preset=TINY, decoder=None, height=32, width=32)


def _image(seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _play(engine, keyboard_blocks, mouse_blocks=None, seed=3):
    s = engine.session(inputs={"image": _image()}, seed=seed)
    out = []
    for b, kb in enumerate(keyboard_blocks):
        s.set_input("keyboard", kb)
        if mouse_blocks is not None:
            s.set_input("mouse", mouse_blocks[b])
        out.append(s.step().latents)
    return out


def test_released_key_layouts_have_the_released_sizes():
    """Parameter and key counts of the three releases (matrixgame.md), from the presets alone."""
    want = {
        "matrix-game-2-universal": (1_619_242_304, 1114),
        "matrix-game-2-gta-drive": (1_619_238_464, 1114),
        "matrix-game-2-templerun": (1_508_715_584, 964),
    }
    presets = {p.name: p for p in FAMILY.presets()}
    for name, (params, keys) in want.items():
        p = presets[name]
        with torch.device("meta"):
            sd = MatrixGameDiT(p.model, p.action, p.visual_context_dim).state_dict()
        assert (sum(t.numel() for t in sd.values()), len(sd)) == (params, keys), name
        assert (
            "blocks.14.action_model.keyboard_attn_kv.weight" in sd and "blocks.15.action_model.t_qkv.weight" not in sd
        )
        assert ("blocks.0.action_model.t_qkv.weight" in sd) == (p.mode != "templerun")
        assert not any(k.startswith("text_embedding") for k in sd)


def test_checkpoint_layout_loads_and_other_modes_are_refused(engine):
    p = engine.spec.preset
    dit = engine.model.weights["dit"]
    sd = {"model." + k: v for k, v in dit.state_dict().items()}
    again = load_matrixgame_dit(sd, p.model, p.action, p.visual_context_dim)
    # (the loader builds on the CPU; on a CUDA machine the engine's weights live on the GPU)
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(again.state_dict().values(), dit.state_dict().values()))
    templerun = dataclasses.replace(p.action, keyboard_dim_in=7, enable_mouse=False)
    with pytest.raises(CheckpointError, match="unexpected"):
        load_matrixgame_dit(sd, p.model, templerun, p.visual_context_dim)


def test_full_size_plans():
    presets = {p.name: p for p in FAMILY.presets()}
    for name, window, keys, steps in (
        ("matrix-game-2-universal", 6, 4, 3),
        ("matrix-game-2-gta-drive", 4, 2, 3),
        ("matrix-game-2-templerun", 6, 7, 4),
    ):
        p = presets[name]
        plan = build_plan(p, 1, p.latent_size(), "bfloat16", None)
        assert plan.state["ring_k"].shape == (30, 1, window * 880, 12, 128)
        assert plan.state["keyboard_k"].shape == (15, 1, window, 16, 64)
        assert plan.inputs["keyboard"].shape == (1, 12, keys) and plan.inputs["keyboard"].units == "keys"
        assert plan.inputs["keyboard"].labels == p.keys
        assert ("mouse" in plan.inputs) == (p.mode != "templerun")
        if "mouse" in plan.inputs:
            assert plan.state["mouse_k"].shape == (15, 1, 880, window, 16, 64)
            assert plan.inputs["mouse"].labels == ("pitch", "yaw")
        assert len(plan.meta["schedule"]["timesteps"]) == steps
        assert plan.meta["action_rows_first_block"] == 9
    ts = presets["matrix-game-2-universal"].schedule().timesteps
    assert ts[0] == 1000.0 and abs(ts[1] - 908.84271) < 1e-4 and abs(ts[2] - 713.97943) < 1e-4


def test_block_windows_follow_the_reference_rule():
    """Per-block inputs plus the carried history give every latent frame the window of video frames
    4f-12 .. 4f-1 (clamped at 0) of the whole clip; block 0's first 3 rows are ignored."""
    gen = torch.Generator().manual_seed(0)
    blocks, nf, ratio, w = 5, 3, 4, 12
    frames = video_frames(blocks, 12, 9)
    clip = torch.rand(2, frames, 4, generator=gen)
    step = ActionWindowStep(nf, ratio, w, mouse=False)
    hist = torch.zeros(2, w, 4)
    for b in range(blocks):
        rows = block_rows(clip, b, 12, 9)
        if b == 0:
            rows[:, :3] = 7.0  # rows before frame 0: must not matter
        win, hist = step(rows, hist, torch.full((2,), b))
        pos = torch.arange(b * nf, (b + 1) * nf)
        assert torch.equal(win, clip[:, window_index(pos, ratio, w)]), b
    # The second row of a batch may be at another block: block_index is per row.
    rows = block_rows(clip, 1, 12, 9)
    win, _ = step(rows, hist, torch.tensor([1, 0]))
    assert not torch.equal(win[0], win[1])


def test_an_action_steers_from_the_block_that_sees_it(engine):
    """Same seed and image: identical until the first block whose windows read a changed frame."""
    frames = video_frames(4, 12, 9)
    a = torch.zeros(1, frames, 4)
    a[..., 0] = 1  # W all along
    b = a.clone()
    b[:, 21:, 0], b[:, 21:, 1] = 0, 1  # S from video frame 21 (block 2's rows; its window reads 12..23)
    split = lambda x: [block_rows(x, k, 12, 9) for k in range(4)]  # noqa: E731
    out_a, out_b = _play(engine, split(a)), _play(engine, split(b))
    assert torch.equal(out_a[0], out_b[0]) and torch.equal(out_a[1], out_b[1])
    assert not torch.allclose(out_a[2], out_b[2], atol=1e-4) and not torch.allclose(out_a[3], out_b[3], atol=1e-4)
    # The rows block 0 ignores change nothing; a change of frame 8 (read by block 1 only) moves block 1.
    c = split(a)
    c[0][:, :3] = torch.tensor([0.0, 1.0, 1.0, 0.0])
    assert all(torch.equal(x, y) for x, y in zip(out_a, _play(engine, c)))
    d = a.clone()
    d[:, 8] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    out_d = _play(engine, split(d))
    assert torch.equal(out_a[0], out_d[0]) and not torch.allclose(out_a[1], out_d[1], atol=1e-4)
    # The mouse steers too.
    m = torch.zeros(1, frames, 2)
    m[:, 9:, 1] = 0.1
    out_m = _play(engine, split(a), split(m))
    assert torch.equal(out_a[0], out_m[0]) and not torch.allclose(out_a[1], out_m[1], atol=1e-4)


def test_bad_actions_are_refused_and_change_nothing(engine):
    s = engine.session(inputs={"image": _image()})
    good = torch.zeros(1, 12, 4)
    good[..., 0] = 1
    s.set_input("keyboard", good)
    before = {n: s.buffers[n].clone() for n in ("keyboard", "mouse")}
    bad = {
        "keyboard": [torch.zeros(1, 9, 4), torch.zeros(1, 12, 3), torch.full((1, 12, 4), float("nan")), good * 2],
        "mouse": [torch.zeros(1, 12, 3), torch.full((1, 12, 2), float("inf")), torch.full((1, 12, 2), 5.0)],
    }
    for name, values in bad.items():
        for v in values:
            with pytest.raises(InvalidArgumentError):
                s.set_input(name, v)
    for n, t in before.items():
        assert torch.equal(s.buffers[n], t)
    with pytest.raises(InvalidArgumentError):
        s.set_input("image", torch.full((1, 3, 32, 32), 2.0))


def test_keyboard_only_mode_has_no_mouse():
    p = Preset(
        name="tiny-templerun",
        description="test",
        model=FAMILY.presets()[0].model,
        action=dataclasses.replace(TINY_ACTION, keyboard_dim_in=7, enable_mouse=False),
        mode="templerun",
        visual_context_dim=16,
        cond_frames=4,
        height=32,
        width=32,
        clip=FAMILY.presets()[0].clip,
        vae=FAMILY.presets()[0].vae,
        decoder=None,
        builtin=True,
    )
    from flashdreams.backend import EagerBackend
    from flashdreams.engine import Engine
    from flashdreams.models.family import LoadOptions

    model = FAMILY.load(p, LoadOptions(decoder=None))
    eng = Engine(EagerBackend(model), model.plan, p, "test", None, True, model)
    s = eng.session()
    assert "mouse" not in s.input_names() and s.plan.inputs["keyboard"].labels == ("q", "w", "s", "z", "c", "a", "d")
    with pytest.raises(InvalidArgumentError):
        s.set_input("mouse", torch.zeros(1, 12, 2))
    s.set_input("keyboard", torch.eye(7)[[1] * 12][None])
    assert s.step().latents.shape == (1, 16, 3, 4, 4)


def test_long_play_keeps_every_buffer(engine):
    """Bounded caches: the state's buffers keep their shapes and addresses, and the ring slots wrap."""
    s = engine.session(inputs={"image": _image()})
    ptrs = {n: (s.buffers[n].data_ptr(), tuple(s.buffers[n].shape)) for n in s.plan.state}
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        s.set_input("keyboard", (torch.rand(1, 12, 4, generator=gen) > 0.5).float())
        s.set_input("mouse", torch.rand(1, 12, 2, generator=gen) * 0.2 - 0.1)
        out = s.step()
        assert torch.isfinite(out.latents).all()
    assert ptrs == {n: (s.buffers[n].data_ptr(), tuple(s.buffers[n].shape)) for n in s.plan.state}
    assert s.buffers["slots"].tolist() == [0, 1, 2] and s.buffers["valid_len"].tolist() == [6 * 4]
    # Block 4 wrote frames 12..14 at slots 0..2 of every cache: nothing there is still zero.
    assert (s.buffers["mouse_k"][:, :, :, :3].abs().sum(-1) > 0).all()


def test_reset_replays_the_same_world(engine):
    kb = torch.zeros(1, 12, 4)
    kb[..., 3] = 1
    s = engine.session(inputs={"image": _image()}, seed=5)
    s.set_input("keyboard", kb)
    first = [s.step().latents for _ in range(2)]
    s.reset(image=_image())
    assert torch.equal(s.buffers["keyboard_hist"], torch.zeros_like(s.buffers["keyboard_hist"]))
    again = [s.step().latents for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    s.reset(image=_image(1))
    assert not torch.equal(s.step().latents, first[0])


def test_decoders_give_9_then_12_frames():
    for name in ("wan-vae", "taehv"):
        eng = flashdreams.load(preset=TINY, decoder=name, height=32, width=32)
        s = eng.session()
        assert [tuple(s.step().frames.shape) for _ in range(2)] == [(1, 9, 32, 32, 3), (1, 12, 32, 32, 3)]


def test_action_scripts():
    keys = ("w", "s", "a", "d")
    kb, ms = script_frames([{"keys": ["w", "a"], "mouse": [0.1, 0]}, {"keys": []}], keys, True, 4)
    assert kb.tolist() == [[1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert ms[0].tolist() == pytest.approx([0.1, 0.0]) and ms[3].tolist() == [0.0, 0.0]
    for bad in ([], [{"keys": ["x"]}], [{"keys": ["w"], "mouse": [1]}], [{"key": ["w"]}], ["w"]):
        with pytest.raises(InvalidArgumentError):
            script_frames(bad, keys, True, 4)
    with pytest.raises(InvalidArgumentError, match="no mouse"):
        script_frames([{"mouse": [0, 0.1]}], ("q", "w", "s", "z", "c", "a", "d"), False, 4)
    for mode, k, mouse in (("universal", keys, True), ("gta_drive", ("w", "s"), True), ("templerun", "qwszcad", False)):
        kb, ms = script_frames(demo_script(mode), tuple(k), mouse, 60)
        assert kb.shape == (60, len(k)) and (ms is None) == (not mouse)
    assert video_frames(1, 12, 9) == 9 and video_frames(3, 12, 9) == 33


def test_a_checkpoint_folder_loads_with_its_image_encoders(engine, tmp_path):
    """The release layout on disk: `model.`-prefixed DiT, CLIP and VAE safetensors beside it."""
    from safetensors.torch import save_file

    enc = engine.model.graphs["encode_image"]
    own = lambda m: {k: v.contiguous() for k, v in m.state_dict().items()}  # noqa: E731
    save_file({"model." + k: v for k, v in own(engine.model.weights["dit"]).items()}, tmp_path / "base.safetensors")
    save_file({"visual." + k: v for k, v in own(enc.clip).items()}, tmp_path / "models_clip_tiny.safetensors")
    save_file(own(enc.vae), tmp_path / "Wan2.1_VAE.safetensors")
    real = flashdreams.load(tmp_path / "base.safetensors", preset=TINY, decoder=None, height=32, width=32)
    a = engine.session(inputs={"image": _image()}, seed=4).step().latents
    b = real.session(inputs={"image": _image()}, seed=4).step().latents
    assert torch.equal(a, b)
    (tmp_path / "Wan2.1_VAE.safetensors").unlink()
    with pytest.raises(InvalidArgumentError, match="Wan2.1_VAE"):
        flashdreams.load(tmp_path / "base.safetensors", preset=TINY, decoder=None, height=32, width=32)
    with pytest.raises(InvalidArgumentError, match="--random-weights"):
        flashdreams.load(preset="matrix-game-2-universal", decoder=None)


def test_encode_image_exports_without_lifted_constants():
    """fd-build exports `encode_image`; a tensor built inside the call (a mask, CLIP's mean) would become an
    extra graph input that a built engine does not feed. The shared Wan I2V step keeps them as buffers."""
    from torch.export.graph_signature import InputKind

    from flashdreams import registry
    from flashdreams.models.family import LoadOptions
    from flashdreams.models.wan_i2v import first_frame_mask

    family = registry.family("matrixgame")
    preset = next(p for p in family.presets() if p.name == "matrix-game-2-tiny")
    step = family.load(preset, LoadOptions(device=torch.device("cpu"))).graphs["encode_image"]
    image = torch.rand(1, 3, preset.height, preset.width)

    def lifted(module) -> list:
        ep = torch.export.export(module, (image,), strict=False)
        return [s.target for s in ep.graph_signature.input_specs if s.kind == InputKind.CONSTANT_TENSOR]

    assert lifted(step) == []

    class MaskInside(torch.nn.Module):  # the pattern the step avoids: the same mask, made in the call
        def forward(self, image):
            return image.sum() + first_frame_mask(step.num_latent_frames, *step.latent_hw).sum()

    assert lifted(MaskInside()) != []


@pytest.mark.parametrize("lq", [3, 40])  # the short-query matmul path and the SDPA path
def test_ring_attend_masks_slots_past_valid(lq):
    """Slots at or past `valid` never contribute (filled with huge values here), and both paths equal
    a plain softmax over the valid prefix."""
    from flashdreams.models.action_module import SHORT_QUERIES, ring_attend
    from flashdreams.numerics import rel_l2

    assert (lq <= SHORT_QUERIES) == (lq == 3)
    g = torch.Generator().manual_seed(lq)
    q = torch.randn(2, 5, 4, lq, 16, generator=g)
    k, v = torch.randn(2, 5, 4, 9, 16, generator=g), torch.randn(2, 5, 4, 9, 16, generator=g)
    valid = torch.tensor(6)
    k[..., 6:, :], v[..., 6:, :] = 1e4, -1e4
    out = ring_attend(q, k, v, valid)
    probs = torch.softmax(q @ k[..., :6, :].transpose(-1, -2) / 4.0, dim=-1)
    assert out.shape == q.shape
    assert rel_l2(out, probs @ v[..., :6, :]) < 1e-6


def test_triton_attention_drives_the_action_modules_too(engine, monkeypatch):
    """With attention='triton' the DiT hands its kernels switch to every action module, and a stream that
    wraps the caches gives the latents of the torch path."""
    from flashdreams.kernels import triton_available
    from flashdreams.models.action_module import ActionModule
    from flashdreams.numerics import rel_l2

    if not triton_available(torch.device("cpu")):
        pytest.skip("Triton kernels on the CPU need TRITON_INTERPRET=1 set before triton is imported")
    seen = []
    real = ActionModule._forward_fused

    def spy(self, *args, **kwargs):
        seen.append(True)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ActionModule, "_forward_fused", spy)
    fused = flashdreams.load(preset=TINY, decoder=None, height=32, width=32, attention="triton")
    gen = torch.Generator().manual_seed(8)
    frames = video_frames(4, 12, 9)  # 4 blocks of 3 latent frames: the 6-frame caches wrap
    kb = (torch.rand(1, frames, 4, generator=gen) > 0.5).float()
    ms = torch.randn(1, frames, 2, generator=gen) * 0.1
    split = lambda x: [block_rows(x, k, 12, 9) for k in range(4)]  # noqa: E731
    want, got = _play(engine, split(kb), split(ms)), _play(fused, split(kb), split(ms))
    assert seen
    for b, (w, g) in enumerate(zip(want, got)):
        assert rel_l2(g, w) < 1e-4, f"block {b}: {rel_l2(g, w):.2e}"


@pytest.mark.slow
def test_inductor_engine_session_equals_eager(tmp_path):
    """fd-build of the tiny universal-controls preset: the action modules are inside the captured step
    graphs, and a session from the engine equals eager under the same image, keys and mouse."""
    from flashdreams.export.build import build_engine

    size = {"height": 32, "width": 32}
    build_engine(tmp_path / "e", preset=TINY, backend="inductor", device="cpu", decoder=None, **size)
    built = flashdreams.load(tmp_path / "e", device="cpu")
    eager = flashdreams.load(preset=TINY, device="cpu", decoder=None, **size)
    assert built.plan.to_dict() == eager.plan.to_dict()
    gen = torch.Generator().manual_seed(4)
    keys = [(torch.rand(1, 12, 4, generator=gen) > 0.5).float() for _ in range(3)]
    mouse = [torch.randn(1, 12, 2, generator=gen) * 0.1 for _ in range(3)]
    outs = []
    for engine in (built, eager):
        s = engine.session(inputs={"image": _image()}, seed=1)
        lat = []
        for k, m in zip(keys, mouse):
            s.set_input("keyboard", k[:, : s.plan.inputs["keyboard"].shape[1]])
            s.set_input("mouse", m[:, : s.plan.inputs["mouse"].shape[1]])
            lat.append(s.step().latents.clone())
        outs.append(lat)
    for a, b in zip(*outs):
        assert rel_l2(a, b) <= 1e-5
    assert not torch.equal(outs[0][1], outs[0][2])
