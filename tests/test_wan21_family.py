"""The wan21 family on the seam: its plan as data, sessions, the batched CFG graph, I2V inputs, engines."""

from __future__ import annotations

import json

import pytest
import torch

import flashdreams
from flashdreams import registry
from flashdreams.backend import EagerBackend
from flashdreams.engine import Engine
from flashdreams.errors import InvalidArgumentError
from flashdreams.models.families.wan21 import FAMILY, Preset
from flashdreams.models.family import BlockPlan, LoadOptions
from flashdreams.models.wan_config import WanConfig
from flashdreams.parity import rel_l2

TINY = "wan2.1-t2v-tiny"


def _engine(**kw) -> Engine:
    return flashdreams.load(preset=TINY, device="cpu", dtype="float32", **kw)


def _tiny_i2v() -> Preset:
    cfg = WanConfig(
        model_type="i2v", in_dim=36, dim=32, ffn_dim=64, num_heads=2, num_layers=1, text_dim=16, text_len=8, clip_dim=16
    )
    return Preset(
        name="test-i2v",
        description="tiny random I2V",
        model=cfg,
        num_frames=5,
        sampling_steps=2,
        shift=3.0,
        height=32,
        width=48,
        clip={"image_size": 32, "patch_size": 2, "dim": 16, "num_heads": 2, "num_layers": 2, "out_dim": 8},
        vae={"dim": 4, "num_res_blocks": 1},
        decoder=None,
    )


def test_presets_carry_the_release_settings_and_round_trip():
    presets = {p.name: p for p in FAMILY.presets()}
    assert {TINY, "wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b-480p"} <= set(presets)
    t2v, i2v = presets["wan2.1-t2v-1.3b"], presets["wan2.1-i2v-14b-480p"]
    assert (t2v.sampling_steps, t2v.shift, t2v.guide_scale, t2v.latent_frames) == (50, 5.0, 5.0, 21)
    assert (t2v.height, t2v.width) == (480, 832) and t2v.latent_size() == (60, 104)
    assert (presets["wan2.1-t2v-14b"].height, presets["wan2.1-t2v-14b"].width) == (720, 1280)
    assert (i2v.sampling_steps, i2v.shift, i2v.guide_scale, i2v.i2v) == (40, 3.0, 5.0, True)
    # The reference's rule in float64: sqrt(480*832 * 480/832) = 479.99999999999994, so a 480x832
    # image gives 58 latent rows (a 464x832 video), as `WanI2V.generate` does.
    assert i2v.latent_size() == (58, 104)
    assert presets[TINY].builtin and not t2v.builtin
    for p in presets.values():
        assert p.family == "wan21" and registry.get_preset(p.name) is p
        back = registry.preset_from_dict(json.loads(json.dumps(p.to_dict())))
        assert back == p
    with pytest.raises(InvalidArgumentError, match="unknown fields"):
        Preset.from_dict({**presets[TINY].to_dict(), "bogus": 1})


def test_plan_validates_and_round_trips_through_json():
    plan = _engine().plan
    back = BlockPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back.to_dict() == plan.to_dict()
    back.validate()
    ops = plan.programs[plan.kind_of(0)]
    calls = [op for op in ops if op["op"] == "call"]
    # One batched guidance call per step, no prompt encoding inside the block, one decode.
    assert [c["graph"] for c in calls] == ["dit_cfg"] * 4 + ["decode"]
    assert set(calls[0]["outs"]) == {"cond", "uncond"}
    assert plan.kind_of(0) == plan.kind_of(7)
    assert plan.state["cross_k"].shape[1] == 2 * plan.batch
    # A plan that reads a buffer nobody writes is refused.
    bad = BlockPlan.from_dict(plan.to_dict())
    bad.programs["clip"] = [{"op": "copy", "src": "nowhere", "out": "x_0"}]
    with pytest.raises(InvalidArgumentError, match="reads 'nowhere'"):
        bad.validate()


def test_inputs_are_described():
    specs = {s.name: s for s in _engine().input_specs()}
    assert set(specs) == {"prompt_embeds", "negative_prompt_embeds"}
    for s in specs.values():
        assert s.shape == (1, 16, 32) and s.required and s.pad_dim == 1 and s.units and s.meaning
        assert s.program and s.program[0]["graph"] == "encode_prompt"
    assert "negative prompt" in specs["negative_prompt_embeds"].meaning


def test_session_is_reproducible_and_depends_on_the_seed():
    eng = _engine()
    a = eng.session(seed=4).step()
    b = eng.session(seed=4).step()
    c = eng.session(seed=5).step()
    assert a.frames is not None and a.frames.shape == (1, 9, 64, 96, 3)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.frames, b.frames)
    assert not torch.equal(a.latents, c.latents)
    # Every step is a new clip with its own draw; replaying block 0 after a reset gives it again.
    s = eng.session(seed=4)
    first, second = s.step().latents.clone(), s.step().latents.clone()
    assert not torch.equal(first, second)
    s.reset()
    assert torch.equal(s.step().latents, first)


def test_the_guidance_matters_and_the_prompt_cache_is_state():
    eng = _engine()
    prompt, neg = torch.randn(1, 16, 32), torch.randn(1, 16, 32)
    s = eng.session(inputs={"prompt_embeds": prompt, "negative_prompt_embeds": neg}, seed=0)
    base = s.step().latents.clone()
    k = s.buffers["cross_k"].clone()
    s.set_input("negative_prompt_embeds", torch.randn(1, 16, 32))
    assert not torch.equal(s.buffers["cross_k"][:, 1], k[:, 1])  # the negative rows changed ...
    assert torch.equal(s.buffers["cross_k"][:, 0], k[:, 0])  # ... the prompt's did not
    s.reset()
    assert not torch.equal(s.step().latents, base)


def test_batched_cfg_graph_equals_two_separate_calls():
    eng = _engine()
    model = eng.model
    s = eng.session(seed=0)
    dit = model.graphs["dit_cfg"].model
    x = torch.randn(model.plan.latents.shape, generator=torch.Generator().manual_seed(1))
    t = s.buffers["t_1"]
    ck, cv = s.buffers["cross_k"], s.buffers["cross_v"]
    with torch.no_grad():
        cond, uncond = model.graphs["dit_cfg"](x, t, ck, cv)
        c1 = dit.forward_cached(x, t, ck[:, :1], cv[:, :1])
        u1 = dit.forward_cached(x, t, ck[:, 1:], cv[:, 1:])
        # ... and the cache equals the plain forward from the prompts.
        c2 = dit(x, t, s.buffers["prompt_embeds"])
        u2 = dit(x, t, s.buffers["negative_prompt_embeds"])
    assert rel_l2(cond, c1) <= 1e-6 and rel_l2(uncond, u1) <= 1e-6
    assert rel_l2(cond, c2) <= 1e-6 and rel_l2(uncond, u2) <= 1e-6
    assert rel_l2(cond, uncond) > 1e-3  # the two halves are different predictions


def test_nan_in_negative_prompt_is_refused_by_name():
    eng = _engine()
    s = eng.session(seed=0)
    before = {n: t.clone() for n, t in s.buffers.items()}
    bad = torch.randn(1, 16, 32)
    bad[0, 2, 3] = float("nan")
    with pytest.raises(InvalidArgumentError, match="negative_prompt_embeds.*non-finite"):
        s.set_input("negative_prompt_embeds", bad)
    with pytest.raises(InvalidArgumentError, match="negative_prompt_embeds"):
        s.set_input("negative_prompt_embeds", torch.randn(1, 17, 32))
    assert all(torch.equal(before[n], t) for n, t in s.buffers.items())
    with pytest.raises(InvalidArgumentError, match="negative_prompt_embeds"):
        Engine(eng.backend, eng.plan, eng.spec.preset).session(prompt_embeds=torch.randn(1, 16, 32))


def test_checkpoint_presets_need_weights():
    preset = registry.get_preset("wan2.1-t2v-1.3b")
    with pytest.raises(InvalidArgumentError, match="needs a checkpoint"):
        FAMILY.load(preset, LoadOptions())


def _i2v_engine() -> Engine:
    preset = _tiny_i2v()
    model = FAMILY.load(preset, LoadOptions(random_weights=True, decoder=None))
    return Engine(EagerBackend(model), model.plan, preset, "test", None, False, model)


def test_i2v_image_input_fills_clip_tokens_and_y_in_any_order():
    eng = _i2v_engine()
    plan = eng.plan
    spec = plan.inputs["image"]
    assert spec.shape == (1, 3, 32, 48) and (spec.low, spec.high, spec.when) == (0.0, 1.0, "reset")
    assert plan.state["cross_k"].shape[2] == 257 + 8
    gen = torch.Generator().manual_seed(0)
    image, prompt, neg = torch.rand(1, 3, 32, 48, generator=gen), torch.randn(1, 8, 16), torch.randn(1, 8, 16)
    a = eng.session(inputs={"image": image, "prompt_embeds": prompt, "negative_prompt_embeds": neg})
    b = eng.session(inputs={"prompt_embeds": prompt, "negative_prompt_embeds": neg, "image": image})
    for name in ("cross_k", "cross_v", "clip_fea", "y"):
        assert torch.equal(a.buffers[name], b.buffers[name]), name
    y = a.buffers["y"]
    assert y.shape == (1, 20, 2, 4, 6)
    assert torch.equal(y[:, :4, 0], torch.ones_like(y[:, :4, 0])) and not y[:, :4, 1:].any()
    lat = a.step().latents
    assert torch.equal(lat, b.step().latents)
    with pytest.raises(InvalidArgumentError, match="image"):
        a.set_input("image", image * 2)  # outside [0, 1]
    with pytest.raises(InvalidArgumentError, match="image"):
        eng.session(inputs={"prompt_embeds": prompt, "negative_prompt_embeds": neg})
    # Another image: other clip tokens, other K/V image rows, another clip.
    a.reset(image=torch.rand(1, 3, 32, 48, generator=gen))
    assert not torch.equal(a.buffers["clip_fea"], b.buffers["clip_fea"])
    assert not torch.equal(a.buffers["cross_k"][:, :, :257], b.buffers["cross_k"][:, :, :257])
    assert torch.equal(a.buffers["cross_k"][:, :, 257:], b.buffers["cross_k"][:, :, 257:])
    assert not torch.equal(a.step().latents, lat)


@pytest.mark.slow
def test_inductor_engine_matches_eager(tmp_path):
    from flashdreams.export.build import build_engine

    build_engine(tmp_path / "e", preset=TINY, backend="inductor", device="cpu")
    built = flashdreams.load(tmp_path / "e", device="cpu")
    eager = _engine()
    assert built.plan.to_dict() == eager.plan.to_dict()
    gen = torch.Generator().manual_seed(2)
    # Explicit inputs: the stand-ins are drawn in input order, which a manifest stores sorted.
    inputs = {n: torch.randn(1, 16, 32, generator=gen) for n in ("prompt_embeds", "negative_prompt_embeds")}
    for seed in (0, 9):
        a = built.session(inputs=inputs, seed=seed).step()
        b = eager.session(inputs=inputs, seed=seed).step()
        assert rel_l2(a.latents, b.latents) <= 1e-5
        assert a.frames is not None and a.frames.shape == b.frames.shape
        assert rel_l2(a.frames.float(), b.frames.float()) <= 1e-2  # uint8 rounding of near-equal floats
    s = built.session(inputs=inputs, seed=0)
    first = s.step().latents.clone()
    assert not torch.equal(s.step().latents, first)
