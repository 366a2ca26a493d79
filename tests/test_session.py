"""Session behaviour on the built-in tiny model: the loop, determinism, long rollouts, prompts."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import flashdreams
from flashdreams.errors import InvalidArgumentError
from flashdreams.models.dit_ops import attention
from flashdreams.models.rope import apply_rope, rope_tables
from flashdreams.models.scheduler import renoise, x0_from_flow
from flashdreams.numerics import rel_l2


def _engine(**kw):
    return flashdreams.load(device="cpu", dtype="float32", decoder=None, **kw)


def test_same_seed_is_bit_identical_and_seeds_differ():
    eng = _engine()
    runs = []
    for seed in (3, 3, 4):
        s = eng.session(seed=seed)
        runs.append(torch.cat([s.step().latents for _ in range(4)], dim=2))
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])
    # Two engines built independently also agree: the built-in weights are deterministic.
    s = _engine().session(seed=3)
    assert torch.equal(torch.cat([s.step().latents for _ in range(4)], dim=2), runs[0])


def test_reset_replays_the_rollout_in_the_same_buffers():
    s = _engine().session(seed=7)
    first = [s.step().latents.clone() for _ in range(3)]
    ptrs = {n: t.data_ptr() for n, t in s.buffers.items()}
    s.reset()
    again = [s.step().latents.clone() for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert ptrs == {n: t.data_ptr() for n, t in s.buffers.items() if n in ptrs}


@pytest.mark.parametrize(
    "preset, decoder",
    [
        ("tiny", "preset"),  # the decoder's streaming memory is session state too
        ("lingbot-world-fast-tiny", None),
        ("omnidreams-sv-tiny-latent", None),
        ("wan2.2-tiny", None),
        ("matrix-game-2-tiny", None),
    ],
)
def test_warm_up_leaves_a_session_that_rolls_out_like_a_fresh_one(preset, decoder):
    """warm_up() runs every block kind before the first repeat (LingBot: two image blocks, then steady)
    and resets: the rollout after it is bit-identical to a fresh session's, in the same buffers."""
    eng = flashdreams.load(preset=preset, device="cpu", dtype="float32", decoder=decoder)
    inputs = eng.default_inputs()

    def outputs(result):
        return [result.latents.clone()] + ([result.frames.clone()] if result.frames is not None else [])

    fresh = eng.session(seed=5, inputs=inputs)
    want = [outputs(fresh.step()) for _ in range(5)]
    warmed = eng.session(seed=5, inputs=inputs)
    ptrs = {n: t.data_ptr() for n, t in warmed.buffers.items()}
    kinds = {eng.plan.kind_of(b) for b in range(5)}
    stepped = []
    real_step = warmed.step
    warmed.step = lambda *a, **k: stepped.append(warmed.block) or real_step(*a, **k)
    assert warmed.warm_up() > 0
    assert {eng.plan.kind_of(b) for b in stepped} == kinds and warmed.block == 0
    got = [outputs(real_step()) for _ in range(5)]
    assert len(got[0]) == (2 if decoder else 1)
    assert all(torch.equal(a, b) for g, w in zip(got, want) for a, b in zip(g, w))
    assert all(warmed.buffers[n].data_ptr() == p for n, p in ptrs.items())  # the session's own buffers, kept
    with pytest.raises(InvalidArgumentError, match="at block 5"):
        warmed.warm_up()


def test_a_failing_warm_up_leaves_the_session_at_block_0(monkeypatch):
    eng = _engine()
    s = eng.session(seed=2)
    want = [eng.session(seed=2).step().latents]
    calls = []
    real = s._run_block

    def fail_on_second(given):
        calls.append(s.block)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return real(given)

    monkeypatch.setattr(s, "_run_block", fail_on_second)
    with pytest.raises(RuntimeError, match="device lost"):
        s.warm_up()
    monkeypatch.setattr(s, "_run_block", real)
    assert s.block == 0 and calls == [0, 1]
    assert torch.equal(s.step().latents, want[0])


def _mg_inputs(eng, seed: int, keys: bool) -> dict:
    """Matrix-Game tiny's start image, with keys held (or none: the optional inputs left at zero)."""
    inputs = eng.default_inputs(seed)
    if keys:
        keyboard = torch.zeros(eng.plan.inputs["keyboard"].shape)
        keyboard[..., 0] = 1.0
        inputs |= {"keyboard": keyboard, "mouse": torch.full(eng.plan.inputs["mouse"].shape, 0.1)}
    return inputs


def test_a_renewed_session_rolls_out_as_a_new_one_in_its_own_buffers():
    """renew() after another player's rollout (its keys, mouse, image and seed) gives a new session's
    rollout bit for bit: the keys and mouse it does not give are back at zero, the image is the new one."""
    eng = flashdreams.load(preset="matrix-game-2-tiny", device="cpu", dtype="float32", decoder=None)
    fresh = eng.session(seed=2, inputs=_mg_inputs(eng, 1, keys=False))
    want = [fresh.step().latents.clone() for _ in range(3)]
    used = eng.session(seed=9, inputs=_mg_inputs(eng, 7, keys=True))
    for _ in range(4):
        used.step()
    ptrs = {n: t.data_ptr() for n, t in used.buffers.items()}
    used.renew(seed=2, inputs=_mg_inputs(eng, 1, keys=False))
    assert used.block == 0
    got = [used.step().latents.clone() for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert all(used.buffers[n].data_ptr() == p for n, p in ptrs.items())


def test_renew_checks_every_input_before_it_changes_anything():
    eng = flashdreams.load(preset="matrix-game-2-tiny", device="cpu", dtype="float32", decoder=None)
    s = eng.session(seed=3, inputs=_mg_inputs(eng, 4, keys=True))
    s.step()
    before = {n: t.clone() for n, t in s.buffers.items()}
    bad_mouse = _mg_inputs(eng, 5, keys=True) | {"mouse": torch.full(eng.plan.inputs["mouse"].shape, float("nan"))}
    with pytest.raises(InvalidArgumentError, match="non-finite"):
        s.renew(seed=1, inputs=bad_mouse)
    with pytest.raises(InvalidArgumentError, match="unknown"):
        s.renew(seed=1, inputs={"wheel": torch.zeros(1)})
    with pytest.raises(InvalidArgumentError, match="seed"):
        s.renew(seed=-1)
    assert s.block == 1
    assert all(torch.equal(s.buffers[n], t) for n, t in before.items())


def test_prompt_switch_changes_the_following_blocks_only():
    eng = _engine()
    p0, p1 = eng.default_prompt(seed=0), eng.default_prompt(seed=1)
    a, b = eng.session(p0, seed=0), eng.session(p0, seed=0)
    assert torch.equal(a.step().latents, b.step().latents)
    b.set_prompt(p1)
    la, lb = a.step().latents, b.step().latents
    assert (la - lb).abs().max() > 1e-3
    # Switching back restores the cross-attention cache exactly.
    b.set_prompt(p0)
    k_ref, _ = eng.model.graphs["encode_prompt"](p0)
    assert torch.equal(b.buffers["cross_k"], k_ref)


def test_bad_inputs_are_named():
    eng = _engine()
    with pytest.raises(InvalidArgumentError, match=r"prompt_embeds' must have shape \[1, 16, 32\]"):
        eng.session(torch.randn(1, 4, 31))
    with pytest.raises(InvalidArgumentError, match="at most 16"):
        eng.session(torch.randn(1, 17, 32))
    s = eng.session(seed=0)
    with pytest.raises(InvalidArgumentError, match="draw 'noise' must have shape"):
        s.step({"noise": torch.randn(1, 16, 2, 8, 12)})
    with pytest.raises(InvalidArgumentError, match="batch"):
        s.set_prompt(torch.randn(2, 16, 32))
    with pytest.raises(InvalidArgumentError, match="needs a checkpoint"):
        flashdreams.load(preset="self-forcing-1.3b", device="cpu", decoder=None)


# --- a literal implementation of the reference cache, to check the ring over a long rollout ----


def _reference_forward(model, x, t, cross_k, cross_v, caches, f0, cap_tokens, sink_tokens):
    """CausalWanModel's call with the reference's shift-left KV cache (README, "KV cache")."""
    tokens, (f, h, w) = model.embed_tokens(x)
    n = tokens.shape[1]
    e, e0 = model.time_embed(t)
    cos, sin = rope_tables(torch.arange(f0, f0 + f), h, w, model.cfg.head_dim)
    end = f0 * h * w + n

    def attend(q, k, v, sa, layer):
        c = caches[layer]
        q = apply_rope(sa.heads(sa.norm_q(q)), cos, sin)
        k = apply_rope(sa.heads(sa.norm_k(k)), cos, sin)
        if end > c["G"] and c["E"] + n > cap_tokens:
            ev = c["E"] + n - cap_tokens
            keep = c["E"] - ev - sink_tokens
            for buf in (c["k"], c["v"]):
                buf[:, sink_tokens : sink_tokens + keep] = buf[:, sink_tokens + ev : sink_tokens + ev + keep].clone()
            e_new = c["E"] + (end - c["G"]) - ev
        else:
            e_new = c["E"] + (end - c["G"])
        c["k"][:, e_new - n : e_new] = k
        c["v"][:, e_new - n : e_new] = sa.heads(v)
        c["G"], c["E"] = end, e_new
        return attention(q, c["k"][:, :e_new], c["v"][:, :e_new])

    for i, blk in enumerate(model.blocks):
        tokens = blk(tokens, e0, partial(attend, layer=i), cross_k[i], cross_v[i])
    return model.unpatchify(model.head(tokens, e), (f, h, w))


@pytest.mark.slow
def test_200_block_rollout_matches_the_reference_cache_with_flat_memory():
    eng = _engine()
    spec = eng.spec
    ring = eng.plan.ring
    model = eng.model.weights
    s = eng.session(seed=11)
    b, nf = 1, spec.num_frame_per_block
    shape = (b, spec.latent_channels, nf, spec.latent_h, spec.latent_w)
    fs, cfg = ring.frame_tokens, model.cfg
    capacity_tokens = (ring.sink + ring.window) * fs
    caches = [
        {
            "k": torch.zeros(b, capacity_tokens, cfg.num_heads, cfg.head_dim),
            "v": torch.zeros(b, capacity_tokens, cfg.num_heads, cfg.head_dim),
            "G": 0,
            "E": 0,
        }
        for _ in range(cfg.num_layers)
    ]
    sched = spec.preset.schedule()
    gen = torch.Generator().manual_seed(0)
    state = lambda: {n: s.buffers[n].data_ptr() for n in ("ring_k", "ring_v", "cross_k")}  # noqa: E731
    state_ptrs = state()
    worst = 0.0
    with torch.no_grad():
        for k in range(200):
            noise = torch.randn(shape, generator=gen)
            draws = torch.randn((sched.num_steps - 1, *shape), generator=gen)
            given = {"noise": noise} | {f"renoise_{i}": d for i, d in enumerate(draws)}
            got = s.step(given).latents
            x = noise
            for i, (tt, sigma) in enumerate(zip(sched.timesteps, sched.sigmas)):
                tv = torch.full((b, nf), tt)
                flow = _reference_forward(
                    model,
                    x,
                    tv,
                    s.buffers["cross_k"],
                    s.buffers["cross_v"],
                    caches,
                    k * nf,
                    capacity_tokens,
                    ring.sink * fs,
                )
                x0 = x0_from_flow(x, flow, sigma)
                if i + 1 < sched.num_steps:
                    x = renoise(x0, draws[i], sched.sigmas[i + 1])
            _reference_forward(
                model,
                x0,
                torch.full((b, nf), sched.context_noise),
                s.buffers["cross_k"],
                s.buffers["cross_v"],
                caches,
                k * nf,
                capacity_tokens,
                ring.sink * fs,
            )
            err = rel_l2(got, x0)
            worst = max(worst, err)
            assert err < 1e-5, f"block {k}: rel err {err:.2e}"
    assert k * nf > 20 * (ring.sink + ring.window)  # the ring wrapped many times
    assert state_ptrs == state()
    assert s.buffers["ring_k"].shape[2] == capacity_tokens  # memory stays at sink + window frames
