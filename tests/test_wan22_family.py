"""The wan22 family (causal Wan2.2 A14B, two experts): presets, the block program, positions, the
release's sharded two-expert layout, rolling forever, I2V's prefill, and the memory plan."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import flashdreams
from flashdreams import registry
from flashdreams.errors import CheckpointError, InvalidArgumentError, NotFoundError
from flashdreams.models.families.wan22 import FAMILY, Preset
from flashdreams.models.families.wan22.loader import drop_unused_cross_kv_, expert_state_dicts
from flashdreams.models.families.wan22.memory import (
    H200_BYTES,
    expert_param_count,
    memory_plan,
    plan_buffer_bytes,
)
from flashdreams.models.families.wan22.plan import build_plan, commit_ops
from flashdreams.models.families.wan22.steps import BlockPositionsStep, host_positions
from flashdreams.models.family import BlockPlan, LoadOptions, run_ops
from flashdreams.models.scheduler import flow_match_tables, sigma_of
from flashdreams.models.wan_config import WAN21_T2V_14B
from flashdreams.models.wan_dit import WanDiT
from flashdreams.models.wan_i2v import image_latent
from flashdreams.parity import rel_l2

TINY, TINY_I2V = "wan2.2-tiny", "wan2.2-i2v-tiny"


def _engine(name=TINY, **kw):
    return flashdreams.load(preset=name, device="cpu", dtype="float32", **kw)


def _dit_graphs(ops):
    return [op["graph"] for op in ops if op["op"] == "call"]


def test_presets_carry_the_reference_settings_and_round_trip():
    presets = {p.name: p for p in FAMILY.presets()}
    assert {TINY, TINY_I2V, "wan2.2-a14b-t2v", "wan2.2-a14b-t2v-rolling", "wan2.2-a14b-i2v"} <= set(presets)
    full = presets["wan2.2-a14b-t2v"]
    assert full.model == WAN21_T2V_14B and (full.model.dim, full.model.num_layers, full.model.num_heads) == (
        5120,
        40,
        40,
    )
    assert full.denoising_step_list == (1000, 850, 700, 550, 350, 275, 200, 125)
    assert (full.timestep_shift, full.boundary_ratio, full.num_frame_per_block) == (5.0, 0.875, 3)
    assert (full.sink_frames, full.window_frames) == (0, 21)
    rolling = presets["wan2.2-a14b-t2v-rolling"]
    assert rolling.sink_frames >= 1 and rolling.sink_frames + rolling.window_frames <= 21
    sched = full.schedule()
    assert [s.expert for s in sched.steps] == ["high"] * 3 + ["low"] * 5
    assert sched.timesteps[3] == pytest.approx(859.375) and sched.boundary == 875.0
    for p in presets.values():
        assert p.family == "wan22" and registry.get_preset(p.name) is p
        assert registry.preset_from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(InvalidArgumentError, match="unknown fields"):
        Preset.from_dict({**presets[TINY].to_dict(), "bogus": 1})
    with pytest.raises(InvalidArgumentError, match="cannot hold a block"):
        full.replace(window_frames=2)
    with pytest.raises(InvalidArgumentError, match="needs a checkpoint"):
        FAMILY.load(full, LoadOptions())


def test_schedule_coefficients_follow_the_boundary_rules():
    sched = registry.get_preset(TINY).schedule()
    sigmas, table = flow_match_tables(5.0)
    sb = sigma_of(875.0, sigmas, table)
    assert sched.sigma_boundary == sb
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    for i, step in enumerate(sched.steps):
        s = sched.sigmas[i]
        assert step.x0_coef == (s - sb if step.expert == "high" else s)
        if i == sched.num_high - 1:
            assert step.renoise == "copy"  # the boundary latent goes to the low-noise expert as is
        elif i == sched.num_steps - 1:
            assert step.renoise is None
        elif step.expert == "high":
            sg = f32(sched.sigmas[i + 1])
            a = (1 - sg) / (1 - f32(sb))
            assert step.renoise == (float(a), float(torch.sqrt(sg**2 - (a * f32(sb)) ** 2)))
        else:
            assert step.renoise == (float(1 - f32(sched.sigmas[i + 1])), sched.sigmas[i + 1])


def test_block_program_fixes_each_steps_expert_and_commits_both_rings():
    plan = _engine().plan
    back = BlockPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back.to_dict() == plan.to_dict()
    back.validate()
    assert plan.sequence == ["first"] and plan.kind_of(1) == plan.kind_of(9) == "steady"
    experts = ["dit_high"] * 3 + ["dit_low"] * 5
    first = [g + "_first" for g in experts]
    assert _dit_graphs(plan.programs["first"]) == [*first, "decode_first", "dit_low_first", "dit_high_first"]
    assert _dit_graphs(plan.programs["steady"]) == ["block_positions", *experts, "decode", "dit_low", "dit_high"]
    for ops in plan.programs.values():
        for op in ops:
            if op["op"] == "call" and op["graph"].startswith("dit_"):
                e = op["graph"].removeprefix("dit_").removesuffix("_first")
                # Each expert reads and writes only its own ring; both read the one shared prompt cache.
                assert (op["args"]["ring_k"], op["args"]["ring_v"]) == (f"ring_k_{e}", f"ring_v_{e}")
                assert (op["args"]["cross_k"], op["args"]["cross_v"]) == ("cross_k", "cross_v")
    # S-1 draws per block; the switch step's draw is made but nothing reads it (as the reference).
    read = {n for op in plan.programs["steady"] if op["op"] == "lincomb" for _, n in op["terms"]}
    assert [f"renoise_{i}" in read for i in range(7)] == [True, True, False, True, True, True, True]
    assert plan.draws["noise_first"].shape[2] == 1 and plan.draws["noise"].shape[2] == 3
    ca = plan.state["cross_k"]
    assert ca.shape[0] == 2 and "ring_k" not in plan.state  # one prompt cache, one ring per expert
    assert plan.state["ring_k_high"].shape == plan.state["ring_k_low"].shape


@pytest.mark.parametrize("sink,window", [(0, 21), (1, 6), (4, 5)])
def test_block_positions_graph_matches_the_host_rule_and_the_ring_layout(sink, window):
    fs, nf = 12, 3
    step = BlockPositionsStep(1, nf, sink, window, fs)
    held = {}  # slot -> absolute frame, simulated
    for block in range(12):
        pos = host_positions(block, 1, nf, sink, window, fs)
        if block:
            got = step(torch.tensor([block]))
            assert [t.tolist() for t in got] == [pos["frame_positions"], pos["slots"], pos["valid_len"]]
        frames = pos["frame_positions"]
        assert frames[0] == (0 if block == 0 else 1 + 3 * (block - 1))
        for f, s in zip(frames, pos["slots"]):
            held[s] = f
        # The valid rows are a prefix of whole slots, the sink frames never move, newest frames kept.
        assert pos["valid_len"][0] == len(held) * fs and sorted(held) == list(range(len(held)))
        assert all(held[s] == s for s in range(min(sink, len(held))))
        newest = set(range(max(sink, frames[-1] + 1 - window), frames[-1] + 1))
        assert newest <= set(held.values())


def test_rolling_tiny_runs_past_its_window_with_bounded_rings():
    eng = _engine(decoder=None)
    s = eng.session(seed=3)
    cap = eng.plan.state["ring_k_high"].shape[2]
    outs = [s.step().latents for _ in range(9)]  # 25 latent frames through a 7-frame ring
    assert all(torch.isfinite(o).all() for o in outs) and outs[0].shape[2] == 1
    assert s.buffers["frame_positions"].tolist() == [22, 23, 24]
    assert int(s.buffers["valid_len"]) == cap
    # Each block differs (new noise, new context), and re-running with the seed reproduces it.
    s.reset()
    again = [s.step().latents for _ in range(2)]
    assert torch.equal(again[1], outs[1]) and rel_l2(outs[1], outs[2]) > 0.1


def _release_folder(tmp_path, sd):
    """The release's layout: transformer/ and transformer_2/, each a two-shard diffusers index."""
    for folder in ("transformer", "transformer_2"):
        part = {k[len(folder) + 1 :]: v for k, v in sd.items() if k.startswith(folder + ".")}
        keys = sorted(part)
        shards = {"a.safetensors": keys[::2], "b.safetensors": keys[1::2]}
        (tmp_path / folder).mkdir()
        for name, ks in shards.items():
            save_file({k: part[k].contiguous() for k in ks}, str(tmp_path / folder / name))
        index = {"weight_map": {k: n for n, ks in shards.items() for k in ks}}
        (tmp_path / folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return tmp_path


def _random_release_sd(cfg):
    """Both experts of `cfg` with random weights, in the fixture's prefixed diffusers layout."""
    from flashdreams.models.wan_loader import _DIFFUSERS_BLOCK, _DIFFUSERS_TOP

    top = {v: k for k, v in _DIFFUSERS_TOP.items()}
    blk = {v: k for k, v in _DIFFUSERS_BLOCK.items()}
    out = {}
    for e, folder in ((0, "transformer"), (1, "transformer_2")):
        torch.manual_seed(e)
        model = WanDiT(cfg)
        for key, t in model.state_dict().items():
            if key.startswith("blocks."):
                _, i, rest = key.split(".", 2)
                name, _, leaf = rest.rpartition(".")
                new = f"blocks.{i}." + (f"{blk[name]}.{leaf}" if name in blk else blk[rest])
                t = t[0] if rest == "modulation" else t
            else:
                name, _, leaf = key.rpartition(".")
                new = f"{top[name]}.{leaf}" if name in top else top[key]
                t = t[0] if key == "head.modulation" else t
            out[f"{folder}.{new}"] = t.clone()
    return out


def test_release_folder_with_sharded_experts_loads_like_the_state_dict(tmp_path):
    preset = registry.get_preset(TINY).replace(name="t", builtin=False, decoder=None)
    sd = _random_release_sd(preset.model)
    opts = LoadOptions(decoder=None)
    a = FAMILY.load(preset, opts, weights=sd)
    b = FAMILY.load(preset, LoadOptions(source=str(_release_folder(tmp_path, sd)), decoder=None))
    for expert in ("high", "low"):
        wa, wb = a.weights[expert].state_dict(), b.weights[expert].state_dict()
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(a.weights["high"].blocks[0].ffn[0].weight, a.weights["low"].blocks[0].ffn[0].weight)
    # The low-noise expert's unused cross-attention K/V and text embedding are not kept.
    assert a.weights["low"].text_embedding is None and a.weights["low"].blocks[0].cross_attn.k is None
    assert a.weights["high"].blocks[0].cross_attn.k is not None
    # Refusals: a missing expert folder, stray keys, a wrong shape; each before anything loads.
    import shutil

    shutil.rmtree(tmp_path / "transformer_2")
    with pytest.raises(NotFoundError, match="transformer_2"):
        expert_state_dicts(tmp_path)
    with pytest.raises(CheckpointError, match="outside"):
        expert_state_dicts({**sd, "vae.x": torch.zeros(1)})
    bad = dict(sd)
    bad["transformer_2.proj_out.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match="transformer_2.*wrong shape"):
        FAMILY.load(preset, opts, weights=bad)


def _image(seed=0):
    return torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(seed))


def test_i2v_prefills_the_start_image_into_both_rings():
    """No reference fixture exists for I2V: block 0 must be the image's VAE latent, exactly; both rings
    must hold each expert's own clean commit of it; and the next block must be what the T2V session
    gives after a block 0 whose result was that latent (same experts: the presets share seeds)."""
    i2v = _engine(TINY_I2V, decoder=None)
    image = _image()
    s = i2v.session(inputs={"image": image}, seed=5)
    r0 = s.step()
    enc = i2v.model.graphs["encode_image"]
    want = image_latent(enc.vae, (image[0] - 0.5) / 0.5, (6, 8), 1)[None]
    assert r0.latents.shape == (1, 16, 1, 6, 8) and torch.equal(r0.latents, want)
    fs = 12
    for e in ("high", "low"):
        ring = torch.zeros_like(s.buffers[f"ring_k_{e}"]), torch.zeros_like(s.buffers[f"ring_v_{e}"])
        i2v.model.graphs[f"dit_{e}_first"](
            want, torch.zeros(1, 1), s.buffers["cross_k"], s.buffers["cross_v"], *ring,
            torch.tensor([0]), torch.tensor([0]), torch.tensor([fs]),
        )  # fmt: skip
        assert torch.equal(s.buffers[f"ring_k_{e}"][:, :, :fs], ring[0][:, :, :fs])
        assert torch.equal(s.buffers[f"ring_v_{e}"][:, :, :fs], ring[1][:, :, :fs])
    assert not torch.equal(s.buffers["ring_k_high"][:, :, :fs], s.buffers["ring_k_low"][:, :, :fs])
    draws = {n: torch.randn(d.shape, generator=torch.Generator().manual_seed(i)) for i, (n, d) in
             enumerate(i2v.plan.draws.items())}  # fmt: skip
    r1 = s.step(draws)

    t2v = _engine(TINY, decoder=None)
    assert t2v.plan.draws.keys() >= draws.keys()
    ts = t2v.session(inputs={"prompt_embeds": s.buffers["prompt_embeds"]}, seed=5)
    ts.step()
    ts.buffers["x0"].copy_(want)  # block 0's result replaced by the image latent, then committed again
    run_ops(commit_ops("first"), ts.buffers, ts._call, t2v.plan.graphs)
    assert torch.equal(ts.step(draws).latents, r1.latents)
    # A different image gives a different continuation; reset with it re-encodes and re-prefills.
    s.reset(image=_image(1))
    assert not torch.equal(s.step().latents, want)


def test_i2v_with_a_decoder_emits_the_first_frame_then_steady_blocks():
    s = _engine(TINY_I2V).session(inputs={"image": _image()}, seed=0)
    f0, f1 = s.step().frames, s.step().frames
    assert f0.shape == (1, 1, 48, 64, 3) and f1.shape == (1, 12, 48, 64, 3) and f0.dtype == torch.uint8
    with pytest.raises(InvalidArgumentError, match="outside"):
        s.set_input("image", _image() + 1.0)


def test_memory_plan_arithmetic_matches_the_modules_and_the_plan():
    eng = _engine()
    for cfg in (eng.spec.preset.model, WAN21_T2V_14B):
        with torch.device("meta"):
            m = WanDiT(cfg)
        counts = expert_param_count(cfg)
        assert counts["total"] == sum(p.numel() for p in m.parameters())
        assert counts["unused_in_low"] == drop_unused_cross_kv_(m)
    low = eng.model.weights["low"]
    tiny_counts = expert_param_count(eng.spec.preset.model)
    assert sum(p.numel() for p in low.parameters()) == tiny_counts["total"] - tiny_counts["unused_in_low"]
    # What the plan declares is exactly what a session allocates.
    s = eng.session(seed=0)
    declared = plan_buffer_bytes(eng.plan)
    allocated = sum(t.numel() * t.element_size() for t in s.buffers.values())
    assert sum(declared.values()) == allocated
    # Full size: two rings of 40 layers x 21 frames x 1560 tokens x 5120 channels, K and V, bf16.
    full = registry.get_preset("wan2.2-a14b-t2v")
    plan = build_plan(full, full.model, 1, full.latent_size(), "bfloat16", None)
    mp = memory_plan(plan, full.model)
    assert mp["persistent_bytes"]["buffers_rings"] == 2 * 2 * 40 * 21 * 1560 * 5120 * 2
    weights = mp["persistent_bytes"]["weights_high_expert"] + mp["persistent_bytes"]["weights_low_expert"]
    assert 52e9 < weights < 57.2e9  # two 14.3B experts in bf16, less the low expert's unused 2.1B
    assert mp["peak_bytes"] == mp["steady_bytes"] + max(mp["transient_bytes"].values())
    assert mp["fits_h200"] and mp["peak_bytes"] < H200_BYTES
    rolling = registry.get_preset("wan2.2-a14b-t2v-rolling")
    rp = memory_plan(build_plan(rolling, rolling.model, 1, rolling.latent_size(), "bfloat16", None), rolling.model)
    assert rp["peak_bytes"] < mp["peak_bytes"]
    # Block 5 (frames 13..15 against 16 cached frames), 10 forwards: about 2.1 PFLOP (the figure).
    assert plan.meta["block_flops"][5] == pytest.approx(2.1e15, rel=0.01)


@pytest.mark.gpu
def test_captured_graphs_replay_the_eager_blocks_on_cuda():
    eng = flashdreams.load(preset=TINY, device="cuda", dtype="float32")
    eager = eng.session(seed=1, cuda_graphs=False)
    graphs = eng.session(seed=1, cuda_graphs=True)
    for _ in range(5):
        a, b = eager.step(), graphs.step()
        assert torch.equal(a.latents, b.latents)
