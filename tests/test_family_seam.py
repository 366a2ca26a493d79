"""The model-family seam: the registry, named inputs and state, the block plan as data."""

from __future__ import annotations

import json

import pytest
import torch

import flashdreams
from flashdreams import registry
from flashdreams.errors import InvalidArgumentError, NotFoundError
from flashdreams.models.family import BlockPlan, run_ops


def _engine(**kw):
    return flashdreams.load(device="cpu", dtype="float32", decoder=None, **kw)


def test_registry_lists_families_and_their_presets():
    presets = registry.all_presets()
    assert {"tiny", "self-forcing-1.3b", "causal-forcing-i2v-framewise", "causal-forcing-pp-2step"} <= set(presets)
    for name, p in presets.items():
        assert p.name == name and p.family in registry.FAMILIES
        assert registry.preset_from_dict(json.loads(json.dumps(p.to_dict(), default=list))).name == name
    with pytest.raises(NotFoundError, match="known families"):
        registry.family("no-such-family")
    with pytest.raises(NotFoundError, match="known presets"):
        registry.get_preset("no-such-preset")


def test_plan_is_data_that_round_trips_through_json():
    plan = flashdreams.load(device="cpu").plan
    text = json.dumps(plan.to_dict())
    back = BlockPlan.from_dict(json.loads(text))
    assert back.to_dict() == plan.to_dict()
    back.validate()
    assert plan.kind_of(0) == "first" and plan.kind_of(5) == "steady"
    # Each block program hands its frames out before the commit call.
    ops = plan.programs["steady"]
    emit = next(i for i, op in enumerate(ops) if op["op"] == "emit")
    last_call = max(i for i, op in enumerate(ops) if op["op"] == "call")
    assert emit < last_call and ops[last_call]["args"]["t"] == "t_commit"


def test_plan_validation_names_a_buffer_read_before_it_exists():
    plan = _engine().plan
    bad = BlockPlan.from_dict(plan.to_dict())
    bad.programs["steady"] = [{"op": "lincomb", "out": "y", "terms": [[1.0, "nowhere"]], "f64": False}]
    with pytest.raises(InvalidArgumentError, match="reads 'nowhere'"):
        bad.validate()


def test_input_specs_describe_the_named_inputs():
    s = _engine().session(seed=0)
    specs = {sp.name: sp for sp in s.input_specs()}
    assert set(specs) == {"prompt_embeds"}
    p = specs["prompt_embeds"]
    assert p.shape == (1, 16, 32) and p.dtype == "float32" and p.meaning and p.pad_dim == 1
    assert "prompt_embeds float32 [1, 16, 32]" in p.describe()


def test_set_input_refuses_bad_values_and_changes_nothing():
    eng = _engine()
    s = eng.session(seed=0)
    before = {n: t.clone() for n, t in s.buffers.items()}
    bad = eng.default_prompt().clone()
    bad[0, 3, 5] = float("nan")
    cases = [
        ("prompt_embeds", bad, "non-finite"),
        ("prompt_embeds", torch.randn(1, 16, 31), "must have shape"),
        ("prompt_embeds", torch.randn(2, 16, 32), "batch 2"),
        ("prompt_embeds", torch.ones(1, 16, 32, dtype=torch.int64), "floating point"),
        ("prompt_embeds", torch.empty(1, 16, 32, device="meta"), "device 'meta'"),
        ("keyboard", torch.zeros(1, 3, 4), "unknown"),
        ("prompt_embeds", [[0.0]], "must be a tensor"),
    ]
    for name, value, msg in cases:
        with pytest.raises(InvalidArgumentError, match=msg):
            s.set_input(name, value)
    assert all(torch.equal(before[n], t) for n, t in s.buffers.items())


def test_seeds_are_checked():
    eng = _engine()
    for seed in (-1, 2**63, 1.5, "3", True):
        with pytest.raises(InvalidArgumentError, match="seed"):
            eng.session(seed=seed)


def test_a_block_draws_from_seed_and_block_index():
    """A replayed block draws the same noise: block k of a session equals block k after a reset."""
    eng = _engine()
    a = eng.session(seed=5)
    lat = [a.step().latents.clone() for _ in range(3)]
    a.reset()
    assert torch.equal(a.step().latents, lat[0])
    b = eng.session(seed=6)
    assert not torch.equal(b.step().latents, lat[0])


def test_prefill_preset_needs_its_start_latent_and_reproduces_it():
    """Causal-Forcing I2V: block 0 hands out the start latent itself; later blocks depend on it."""
    preset = registry.get_preset("causal-forcing-i2v-framewise")
    tiny = registry.get_preset("tiny")
    preset = preset.replace(model=tiny.model, height=64, width=96, window_frames=8, sink_frames=1)
    model = registry.family("causal_wan").load(
        preset,
        flashdreams.models.family.LoadOptions(random_weights=True, decoder=None),
    )
    from flashdreams.backend import EagerBackend
    from flashdreams.engine import Engine

    eng = Engine(EagerBackend(model), model.plan, preset, "test")
    prompt = torch.randn(1, 16, 32)
    with pytest.raises(InvalidArgumentError, match="image_latent"):
        eng.session(prompt)
    img = torch.randn(1, 16, 1, 8, 12)
    s = eng.session(inputs={"prompt_embeds": prompt, "image_latent": img}, seed=0)
    assert model.plan.sequence == ["prefill_0", "first"]
    assert torch.equal(s.step().latents, img)
    nxt = s.step().latents.clone()
    s.reset(image_latent=torch.randn(1, 16, 1, 8, 12))
    s.step()
    assert not torch.equal(s.step().latents, nxt)


def test_without_decoder_keeps_the_denoise_and_commit():
    plan = flashdreams.load(device="cpu").plan
    bare = plan.without_decoder()
    assert "decode" not in bare.graphs and not any(n.startswith("dec_") for n in bare.state)
    assert all(op.get("frames") is None for op in bare.programs["steady"] if op["op"] == "emit")
    bare.validate()
    calls = lambda p: [op["graph"] for op in p.programs["steady"] if op["op"] == "call"]  # noqa: E731
    assert calls(bare) == [g for g in calls(plan) if not g.startswith("decode")]


def test_run_ops_lincomb_is_exact_in_float64_mode():
    bufs = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0, -1.0])}
    ops = [{"op": "lincomb", "out": "c", "terms": [[0.5, "a"], [-2.0, "b"]], "f64": True}]
    run_ops(ops, bufs, lambda *a: (), {})
    assert torch.equal(bufs["c"], torch.tensor([-5.5, 3.0]))
    addr = bufs["c"].data_ptr()
    run_ops(ops, bufs, lambda *a: (), {})
    assert bufs["c"].data_ptr() == addr  # a buffer keeps its address once made


def test_run_ops_keeps_a_buffer_of_another_shape_alive_and_reuses_it():
    """A first block's 9 frames, then 12: the 9-frame buffer a captured graph writes is never freed."""
    shelf: dict = {}
    bufs = {"a": torch.ones(2), "b": torch.ones(3)}
    copy = lambda src: [{"op": "copy", "src": src, "out": "v"}]  # noqa: E731
    run_ops(copy("a"), bufs, lambda *a: (), {}, shelf=shelf)
    two = bufs["v"]
    run_ops(copy("b"), bufs, lambda *a: (), {}, shelf=shelf)
    assert bufs["v"].shape == (3,) and any(t is two for t in shelf.values())
    run_ops(copy("a"), bufs, lambda *a: (), {}, shelf=shelf)
    assert bufs["v"] is two  # the same tensor (same address) is used again
