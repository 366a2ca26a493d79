"""The cosmos family on the seam: presets, the plan as data, the batched guidance graph, video2world
conditioning, the loader's two key layouts and what it refuses."""

from __future__ import annotations

import json

import pytest
import torch

import flashdreams
from flashdreams import registry
from flashdreams.errors import CheckpointError, InvalidArgumentError
from flashdreams.models import dit_ops
from flashdreams.models.cosmos_dit import CosmosBlock, CosmosDiT, patchify, unpatchify
from flashdreams.models.cosmos_loader import load_cosmos_dit, official_state_dict
from flashdreams.models.families.cosmos import FAMILY
from flashdreams.models.families.cosmos.plan import build_plan
from flashdreams.models.families.cosmos.presets import TINY_COSMOS
from flashdreams.models.family import BlockPlan
from flashdreams.models.random_init import init_random_
from flashdreams.models.samplers import unipc_cfg_ops
from flashdreams.parity import rel_l2

TINY = "cosmos-predict2.5-tiny"


def _inputs(seed: int = 0, rows: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "prompt_embeds": torch.randn(1, rows, 80, generator=g),
        "negative_prompt_embeds": torch.randn(1, rows, 80, generator=g),
        "cond_latent": torch.randn(1, 16, 3, 8, 12, generator=g),
    }


def _tiny_model(seed: int = 0) -> CosmosDiT:
    return init_random_(CosmosDiT(TINY_COSMOS), seed).eval().requires_grad_(False)


def test_presets_carry_the_release_settings_and_round_trip():
    presets = {p.name: p for p in FAMILY.presets()}
    real = presets["cosmos-predict2.5-2b"]
    assert (real.num_steps, real.guidance, real.sigma_max, real.sigma_min, real.rho) == (35, 7.0, 200.0, 0.01, 7.0)
    assert (real.latent_frames, real.latent_size(), real.cond_timestep) == (24, (88, 160), 0.1)
    cfg = real.model
    assert (cfg.dim, cfg.num_blocks, cfg.num_heads, cfg.rope_dims, cfg.text_in_dim) == (
        2048,
        28,
        16,
        (44, 42, 42),
        100352,
    )
    assert presets["cosmos-predict2.5-2b-video2world"].num_cond_frames == 2
    for p in presets.values():
        assert registry.get_preset(p.name) is p
        assert registry.preset_from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_full_size_plan_is_data_with_36_evaluations():
    real = registry.get_preset("cosmos-predict2.5-2b")
    plan = build_plan(real, 1, real.latent_size(), "bfloat16", None)
    sched = plan.meta["schedule"]
    assert sched["evaluations"] == 36 and len(sched["sigmas"]) == 37 and sched["sigmas"][-1] == 0.0
    calls = [op for op in plan.programs["clip"] if op["op"] == "call"]
    assert len(calls) == 36 and {c["graph"] for c in calls} == {"dit_cfg"}
    assert plan.inputs["prompt_embeds"].shape == (1, 512, 100352)
    assert plan.inputs["cond_latent"].shape == (1, 16, 24, 88, 160)
    assert BlockPlan.from_dict(json.loads(json.dumps(plan.to_dict()))).to_dict() == plan.to_dict()


def test_tiny_session_is_deterministic_and_decodes():
    engine = flashdreams.load(preset=TINY, device="cpu", dtype="float32", decoder=None)
    a = engine.session(inputs=_inputs(), seed=3).step()
    b = engine.session(inputs=_inputs(), seed=3).step()
    assert torch.equal(a.latents, b.latents) and a.frames is None
    c = engine.session(inputs=_inputs(), seed=4).step()
    assert rel_l2(a.latents, c.latents) > 1e-2
    decoded = flashdreams.load(preset=TINY, device="cpu", dtype="float32").session(inputs=_inputs(), seed=3).step()
    assert torch.equal(decoded.latents, a.latents) and decoded.frames.shape == (1, 9, 64, 96, 3)


def test_guidance_pair_is_two_forwards_and_given_frames_move_with_the_noise():
    """The batched graph equals two separate forwards; on the given frame the velocity is noise - cond."""
    engine = flashdreams.load(preset=TINY, device="cpu", dtype="float32")
    step = engine.model.graphs["dit_cfg"]
    inp = _inputs(1, rows=8)
    k, v = engine.model.graphs["encode_prompt"](inp["prompt_embeds"], inp["negative_prompt_embeds"])
    g = torch.Generator().manual_seed(2)
    x, noise = torch.randn(1, 16, 3, 8, 12, generator=g), torch.randn(1, 16, 3, 8, 12, generator=g)
    t = torch.tensor([593])
    cond, uncond = step(x, t, k, v, inp["cond_latent"], noise)
    net = step.model
    mask = torch.zeros(1, 1, 3, 8, 12)
    mask[:, :, 0] = 1
    x_in = torch.cat([inp["cond_latent"][:, :, :1], x[:, :, 1:]], dim=2)
    ts = torch.tensor([[0.1, 593.0, 593.0]])
    ref_c = net(x_in, ts, inp["prompt_embeds"], mask)
    ref_u = net(x_in, ts, inp["negative_prompt_embeds"], mask)
    assert rel_l2(cond[:, :, 1:], ref_c[:, :, 1:]) < 1e-5 and rel_l2(uncond[:, :, 1:], ref_u[:, :, 1:]) < 1e-5
    given = noise[:, :, :1] - inp["cond_latent"][:, :, :1]
    assert torch.allclose(cond[:, :, :1], given) and torch.allclose(uncond[:, :, :1], given)
    assert rel_l2(cond, uncond) > 1e-3  # the prompts differ, so do the branches


def test_session_refuses_bad_inputs_before_anything_changes():
    engine = flashdreams.load(preset=TINY, device="cpu", dtype="float32")
    session = engine.session(inputs=_inputs(), seed=0)
    before = session.buffers["cross_k"].clone()
    with pytest.raises(InvalidArgumentError):
        session.set_input("prompt_embeds", torch.randn(1, 9, 80))  # more rows than text_len 8
    with pytest.raises(InvalidArgumentError):
        session.set_input("prompt_embeds", torch.full((1, 4, 80), float("nan")))
    with pytest.raises(InvalidArgumentError):
        session.set_input("cond_latent", torch.randn(1, 16, 2, 8, 12))
    assert torch.equal(session.buffers["cross_k"], before)


def test_patchify_is_channel_slowest_and_unpatchify_channel_fastest():
    x = torch.arange(2 * 3 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 3, 1, 4, 4)
    p = patchify(x)
    assert p.shape == (2, 4, 12)
    assert p[0, 1, 1 * 4 + 1 * 2 + 0].item() == x[0, 1, 0, 1, 2].item()  # token (0, 0, 1), vector (c=1, kh=1, kw=0)
    y = torch.arange(1 * 4 * 12, dtype=torch.float32).reshape(1, 4, 12)  # 4 tokens, [p1, p2, C=3]
    out = unpatchify(y, 1, 2, 2, 3)
    assert out[0, 2, 0, 2 + 1, 0 + 0].item() == y[0, 2, (1 * 2 + 0) * 3 + 2].item()


def test_loader_reads_both_layouts_and_drops_weightless_entries():
    model = _tiny_model()
    sd = {f"net.{k}": v for k, v in model.state_dict().items()}
    sd |= {"net.pos_embedder.seq": torch.zeros(3), "net.blocks.0.self_attn.q_norm._extra_state": torch.zeros(1)}
    sd |= {"net.accum_iteration": torch.zeros(()), "net.t_embedding_norm._extra_state": torch.zeros(1)}
    loaded = load_cosmos_dit(sd, TINY_COSMOS)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match="missing"):
        load_cosmos_dit({k: v for k, v in sd.items() if "mlp.layer2" not in k}, TINY_COSMOS)
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_cosmos_dit(sd, TINY_COSMOS.replace(text_in_dim=96))
    assert "x_embedder.proj.1.weight" in official_state_dict({"net.x_embedder.proj.1.weight": torch.zeros(1)})


def test_unipc_guidance_forms():
    ops = unipc_cfg_ops([0.9, 0.5, 0.0], 7.0, guidance_base="cond", keep_velocity=True)
    guided = [op for op in ops[0] if op["op"] == "lincomb" and op["out"] == "v_0"][0]
    assert guided["terms"] == [[1.0, "cond_0"], [7.0, "cfg_delta"]]
    wan = unipc_cfg_ops([0.9, 0.5, 0.0], 5.0)
    assert [op for op in wan[0] if op.get("out") == "cfg_v"][0]["terms"] == [[1.0, "uncond_0"], [5.0, "cfg_delta"]]
    with pytest.raises(InvalidArgumentError):
        unipc_cfg_ops([0.9, 0.0], 7.0, guidance_base="both")


def _separate_passes(
    self, x, emb, lora, attend, cross_k, cross_v, impl="sdpa", pending=None, defer_ffn=False, mods=None
):
    """CosmosBlock.forward as it was before the fusion: each gated residual and the modulated norm after
    it as two calls, and the block finishes its own MLP residual (the modulations as the model gives them)."""
    assert pending is None and not defer_ffn and mods is not None
    sa, ca = self.self_attn, self.cross_attn
    shift, scale, gate = mods[0].chunk(3, dim=-1)
    h = dit_ops.adaln_modulate(x, shift, scale, self.eps, impl)
    y = attend(sa, sa.heads(sa.q_proj(h)), sa.heads(sa.k_proj(h)), sa.heads(sa.v_proj(h)))
    x = dit_ops.gated_residual(x, sa.output_proj(y.flatten(2)), gate, impl)
    shift, scale, gate = mods[1].chunk(3, dim=-1)
    h = dit_ops.adaln_modulate(x, shift, scale, self.eps, impl)
    q = dit_ops.rms_norm(ca.heads(ca.q_proj(h)), ca.q_norm.weight, ca.q_norm.eps, impl)
    y = dit_ops.attention(q, cross_k.to(h.dtype), cross_v.to(h.dtype))
    x = dit_ops.gated_residual(x, ca.output_proj(y.flatten(2)), gate, impl)
    shift, scale, gate = mods[2].chunk(3, dim=-1)
    h = dit_ops.adaln_modulate(x, shift, scale, self.eps, impl)
    return dit_ops.gated_residual(x, self.mlp(h), gate, impl)


@pytest.mark.parametrize("impl", ["sdpa", "triton"])
def test_fused_residual_norms_and_deferred_mlp_residual_change_no_number(monkeypatch, impl):
    """Each block's gated residuals ride in the next modulated norm's row pass (`gated_residual_adaln`)
    and, with the Triton kernels, its MLP residual in the next block's first pass (`defer_ffn`): the
    velocity and every block's debug output equal, bit for bit, blocks that make two calls per pair and
    finish their own residual; a forward hook on a block turns the deferral off."""
    from flashdreams.kernels import triton_available

    if impl == "triton" and not triton_available(torch.device("cpu")):
        pytest.skip("Triton kernels on the CPU need TRITON_INTERPRET=1 set before triton is imported")
    net = init_random_(CosmosDiT(TINY_COSMOS.replace(num_blocks=3)), 0).eval().requires_grad_(False)
    net = net.to(torch.bfloat16)  # the fused pass must round x' exactly as the separate one does
    net.set_attention(impl)
    g = torch.Generator().manual_seed(7)
    x, text = torch.randn(1, 16, 2, 8, 12, generator=g), torch.randn(1, 5, 80, generator=g)
    mask = torch.zeros(1, 1, 2, 8, 12)
    mask[:, :, 0] = 1
    ts = torch.tensor([[0.1, 593.0]])
    calls = []
    real = dit_ops.gated_residual_adaln
    monkeypatch.setattr(dit_ops, "gated_residual_adaln", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run() -> tuple[torch.Tensor, dict]:
        debug: dict = {}
        return net(x, ts, text, mask, debug=debug), debug

    fused, fused_debug = run()
    # two fused pairs per block, and with Triton the first pass of every block but the first
    assert len(calls) == 2 * 3 + (2 if impl == "triton" else 0)
    handle = net.blocks[1].register_forward_hook(lambda *_: None)
    try:
        calls.clear()
        hooked, hooked_debug = run()
        assert len(calls) == 2 * 3  # watched blocks finish their own residual
        with monkeypatch.context() as m:
            m.setattr(CosmosBlock, "forward", _separate_passes)
            separate, separate_debug = run()
    finally:
        handle.remove()
    assert torch.equal(fused, hooked) and torch.equal(fused, separate)
    assert fused_debug.keys() == separate_debug.keys() and any(k.startswith("block_") for k in fused_debug)
    for k, v in separate_debug.items():
        assert torch.equal(fused_debug[k], v) and torch.equal(hooked_debug[k], v), k


@pytest.mark.gpu
def test_cuda_graph_clip_matches_eager():
    """The captured clip (36 ops of UniPC + CFG, decode) replays what the eager session computes."""
    engine = flashdreams.load(preset=TINY, device="cuda", dtype="float32")
    inputs = {k: v.cuda() for k, v in _inputs().items()}
    eager = engine.session(inputs=inputs, seed=5, cuda_graphs=False)
    graphs = engine.session(inputs=inputs, seed=5, cuda_graphs=True)
    for _ in range(3):  # eager warm-up, capture, replay
        a, b = eager.step(), graphs.step()
        assert rel_l2(a.latents, b.latents) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_modulations_equal_each_branch_computed_alone(dtype):
    """`block_modulations` (every block's AdaLN-LoRA branches as one GEMM and one batched GEMM) gives what
    each branch gives alone (SiLU, its two linears, float32 + lora), block by block and branch by branch,
    and a block handed them computes what it computes without them."""
    net = init_random_(CosmosDiT(TINY_COSMOS.replace(num_blocks=3)), 0).eval().requires_grad_(False).to(dtype)
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([[0.1, 593.0]])
    emb, lora = net.time_embed(t)
    mods = net.block_modulations(emb, lora)
    d = net.cfg.dim
    assert mods.shape == (3, 3, 1, 2, 3 * d) and mods.dtype == torch.float32
    tol = 0.0 if dtype == torch.float32 else 2.0**-8  # bf16 GEMMs may sum in another order: within an ulp
    for blk, got in zip(net.blocks, mods):
        for which, m in zip(blk.modulations(), got):
            want = which(emb).float() + lora
            assert torch.allclose(m, want, rtol=tol, atol=1e-6), (m - want).abs().max()
    # the branches differ from each other, so a mix-up of blocks or branches cannot pass the loop above
    assert not torch.allclose(mods[0, 0], mods[0, 1]) and not torch.allclose(mods[0, 0], mods[1, 0])
    x = torch.randn(1, 2 * 4 * 6, d, generator=g).to(dtype)
    cross = torch.randn(1, 5, net.cfg.num_heads, d // net.cfg.num_heads, generator=g).to(dtype)

    def attend(attn, q, k, v):
        return dit_ops.attention(q, k, v)

    blk = net.blocks[1]
    given = blk(x, emb, lora, attend, cross, cross, mods=mods[1])
    alone = blk(x, emb, lora, attend, cross, cross)
    assert torch.allclose(given.float(), alone.float(), rtol=tol, atol=1e-5)
