"""fd-parity kind `causal_wan_rollout`: Self-Forcing's streaming loop through a real Session."""

from __future__ import annotations

import torch

from flashdreams.backend import EagerBackend
from flashdreams.engine import Engine, EngineSpec
from flashdreams.models.kv_ring import RingSpec
from flashdreams.models.scheduler import flow_match_tables
from flashdreams.models.wan_config import WanConfig
from flashdreams.models.wan_loader import load_wan_dit
from flashdreams.parity.common import Check, Fixture, register, rel_l2
from flashdreams.presets import Preset


def engine_for_fixture(fixture: Fixture, device: str = "cpu", attention: str = "sdpa") -> Engine:
    """An eager engine with the fixture's config, schedule and cache settings."""
    cfg = WanConfig.from_dict(fixture.config)
    p = fixture.params
    nf = p["num_frame_per_block"]
    lh, lw = p["latent_hw"]
    fs = (lh // cfg.patch_size[1]) * (lw // cfg.patch_size[2])
    ring = RingSpec.from_reference(cfg.local_attn_size, cfg.sink_size, fs, p["num_latent_frames"])
    preset = Preset(
        name=f"fixture:{fixture.path.name}",
        description="parity fixture",
        model=cfg,
        denoising_step_list=tuple(p["denoising_step_list"]),
        timestep_shift=p["timestep_shift"],
        warp_denoising_step=p["warp_denoising_step"],
        context_noise=p["context_noise"],
        num_frame_per_block=nf,
        sink_frames=ring.sink_frames,
        window_frames=ring.window_frames,
        decoder=None,
        height=lh * 8,
        width=lw * 8,
    )
    model = load_wan_dit(fixture.weights(), cfg, device=device)
    model.fuse_projections_()
    model.set_attention(attention)
    return Engine(EagerBackend(model), EngineSpec.from_preset(preset), None, preset.name)


def _partial(fixture: Fixture, name: str, out: torch.Tensor, steps: int) -> Check:
    """Compare the denoising calls only: the commit call's output is discarded, so it is not kept."""
    ref = fixture[name][:, :steps]
    return Check(f"{name}[denoise calls]", rel_l2(out, ref), fixture.tolerance, fixture.roles.get(name, "debug"))


@register("causal_wan_rollout")
def run(fixture: Fixture, device: str = "cpu", attention: str = "sdpa", **_options) -> list[Check]:
    p = fixture.params
    engine = engine_for_fixture(fixture, device, attention)
    nf, num_blocks = p["num_frame_per_block"], p["num_blocks"]
    noise = fixture["noise"].to(device)  # [B, F, C, H, W], frame-major as the pipeline keeps it
    renoise = fixture["renoise"].to(device)  # [K, steps-1, B, nf, C, H, W]
    session = engine.session(fixture["context"], seed=0)
    calls: list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
    session.probe = lambda blk, call, x, t, flow: calls.append(
        (blk, call, x.clone(), t.clone(), None if flow is None else flow.clone())
    )
    outputs = []
    for k in range(num_blocks):
        block_noise = noise[:, k * nf : (k + 1) * nf].transpose(1, 2)  # -> [B, C, nf, H, W]
        block_renoise = renoise[k].transpose(2, 3)  # -> [steps-1, B, C, nf, H, W]
        outputs.append(session.step(block_noise, block_renoise).latents)
    latents = torch.cat(outputs, dim=2).transpose(1, 2)  # back to [B, F, C, H, W]
    sigmas, table = flow_match_tables(p["timestep_shift"])
    steps = engine.spec.schedule.num_steps
    fm = lambda x: x.transpose(1, 2)  # noqa: E731  [B, C, nf, H, W] -> [B, nf, C, H, W]
    per_block = lambda items: torch.stack([torch.stack(items[k::num_blocks]) for k in range(num_blocks)])  # noqa: E731
    by_call = sorted(calls, key=lambda c: (c[1], c[0]))  # call-major, then block: per_block regroups
    inputs = per_block([fm(c[2]) for c in by_call])
    flows = per_block([fm(c[4]) for c in by_call if c[4] is not None])
    x0s = flows.new_empty(flows.shape)
    for s_idx, sigma in enumerate(engine.spec.schedule.sigmas):
        x0s[:, s_idx] = (inputs[:, s_idx].double() - sigma * flows[:, s_idx].double()).float()
    checks = [
        fixture.check("output_latents", latents),
        fixture.check("flow_pred_first", flows[:, 0]),
        fixture.check("call_input", inputs),
        fixture.check("call_timestep", per_block([c[3][0, 0] for c in by_call])),
        _partial(fixture, "call_flow_pred", flows, steps),
        _partial(fixture, "call_x0_pred", x0s, steps),
        fixture.check("denoising_timesteps", torch.tensor(engine.spec.schedule.timesteps)),
        fixture.check("scheduler_sigmas", sigmas),
        fixture.check("scheduler_timesteps", table),
    ]
    # The ring's valid content, reordered into the reference's slot order, against its final cache.
    ring = engine.spec.ring
    end = num_blocks * nf
    kept = p.get("final_cache_slot_frames")
    if kept is not None:
        fs = ring.frame_seq_length
        rows = torch.cat([torch.arange(ring.slot_of(f) * fs, (ring.slot_of(f) + 1) * fs) for f in kept])
        assert len(kept) * fs == ring.valid_tokens(end)
        for layer in range(engine.backend.num_layers):
            for name, buf in (("k", session.ring.k), ("v", session.ring.v)):
                key = f"kv_cache_final.{layer}.{name}"
                if key in fixture.tensors:
                    checks.append(fixture.check(key, buf[layer][:, rows.to(buf.device)]))
    return checks
