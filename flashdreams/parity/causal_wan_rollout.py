"""fd-parity kinds `causal_wan_rollout` (Self-Forcing) and `causal_forcing_rollout` (Causal-Forcing
T2V/I2V/++): the streaming loop through a real Session running the causal Wan family's block plan."""

from __future__ import annotations

import torch

from flashdreams import registry
from flashdreams.backend import EagerBackend
from flashdreams.engine import Engine
from flashdreams.models.family import LoadOptions
from flashdreams.models.kv_ring import RingSpec
from flashdreams.models.scheduler import flow_match_tables, sigma_of
from flashdreams.models.wan_config import WanConfig
from flashdreams.parity.common import Check, Fixture, register, rel_l2


def engine_for_fixture(fixture: Fixture, device: str = "cpu", attention: str = "sdpa") -> Engine:
    """An eager engine with the fixture's config, schedule and cache settings."""
    family = registry.family("causal_wan")
    cfg = WanConfig.from_dict(fixture.config)
    p = fixture.params
    nf = p["num_frame_per_block"]
    lh, lw = p["latent_hw"]
    fs = (lh // cfg.patch_size[1]) * (lw // cfg.patch_size[2])
    total = p.get("num_latent_frames") or p["num_output_frames"]
    ring = RingSpec.from_reference(cfg.local_attn_size, cfg.sink_size, fs, total)
    first = p.get("denoising_step_list_first_chunk")
    preset = family.preset_from_dict(
        {
            "name": f"fixture:{fixture.path.name}",
            "description": "parity fixture",
            "model": cfg,
            "denoising_step_list": tuple(p["denoising_step_list"]),
            "denoising_step_list_first_chunk": tuple(first) if first else None,
            "num_input_frames": p.get("num_input_frames", 0),
            "timestep_shift": p["timestep_shift"],
            "warp_denoising_step": p["warp_denoising_step"],
            "context_noise": p["context_noise"],
            "num_frame_per_block": nf,
            "sink_frames": ring.sink_frames,
            "window_frames": ring.window_frames,
            "decoder": None,
            "height": lh * 8,
            "width": lw * 8,
        }
    )
    opts = LoadOptions(device=torch.device(device), attention=attention, batch=p["batch_size"], decoder=None)
    model = family.load(preset, opts, weights=fixture.weights())
    return Engine(EagerBackend(model), model.plan, preset, preset.name, None, False, model)


def _sigma(t: float, sigmas: torch.Tensor, table: torch.Tensor) -> float:
    return sigma_of(t, sigmas, table)


@register("causal_wan_rollout")
@register("causal_forcing_rollout")
def run(fixture: Fixture, device: str = "cpu", attention: str = "sdpa", **_options) -> list[Check]:
    p = fixture.params
    engine = engine_for_fixture(fixture, device, attention)
    plan = engine.plan
    nf, num_blocks = p["num_frame_per_block"], p["num_blocks"]
    n_in = p.get("num_input_frames", 0)
    grid = fixture.kind == "causal_wan_rollout"  # per-block tensors as [blocks, calls, ...] grids
    noise = fixture["noise"].to(device)  # [B, F, C, H, W], frame-major as the pipeline keeps it
    renoise = fixture["renoise"].to(device)
    if grid:  # [K, steps-1, B, nf, C, H, W] -> flat in use order
        renoise = renoise.flatten(0, 1)
    inputs = {"prompt_embeds": fixture["context"]}
    if n_in:
        inputs["image_latent"] = fixture["initial_latent"].transpose(1, 2)
    session = engine.session(inputs=inputs, seed=0)
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    session.probe = lambda blk, i, graph, args, outs: (
        calls.append((args["x"].clone(), args["t"].clone(), outs[0].clone())) if graph == "dit" else None
    )
    outputs, used = [], 0
    for b in range(len(plan.sequence) - 1 + num_blocks):
        kind = plan.kind_of(b)
        draws = {}
        if not kind.startswith("prefill"):
            k = b - (len(plan.sequence) - 1)
            draws["noise"] = noise[:, k * nf : (k + 1) * nf].transpose(1, 2)
            steps = sum(1 for op in plan.programs[kind] if op["op"] == "call" and op["graph"] == "dit") - 1
            for j in range(steps - 1):
                draws[f"renoise_{j}"] = renoise[used].transpose(1, 2)
                used += 1
        outputs.append(session.step(draws).latents)
    latents = torch.cat(outputs, dim=2).transpose(1, 2)  # back to [B, F, C, H, W]
    sigmas, table = flow_match_tables(p["timestep_shift"])
    fm = lambda x: x.transpose(1, 2)  # noqa: E731  [B, C, nf, H, W] -> [B, nf, C, H, W]
    x_in = torch.stack([fm(c[0]) for c in calls])
    ts = torch.stack([c[1][0, 0] for c in calls])
    flows = torch.stack([fm(c[2]) for c in calls])
    x0s = torch.stack(
        [(x.double() - _sigma(float(t), sigmas, table) * f.double()).float() for x, t, f in zip(x_in, ts, flows)]
    )
    if grid:
        regroup = lambda t: t.unflatten(0, (num_blocks, -1))  # noqa: E731
        x_in, ts, flows, x0s = (regroup(t) for t in (x_in, ts, flows, x0s))
    checks = [
        fixture.check("output_latents", latents),
        fixture.check("call_input", x_in),
        fixture.check("call_timestep", ts),
        fixture.check("call_flow_pred", flows),
        fixture.check("call_x0_pred", x0s),
        fixture.check("denoising_timesteps", torch.tensor(engine.spec.preset.schedule().timesteps)),
        fixture.check("scheduler_sigmas", sigmas),
        fixture.check("scheduler_timesteps", table),
    ]
    if "flow_pred_first" in fixture.tensors:
        checks.append(fixture.check("flow_pred_first", flows[:, 0] if grid else flows[0]))
    if "denoising_timesteps_first_chunk" in fixture.tensors:
        first = engine.spec.preset.schedule(first_chunk=True).timesteps
        checks.append(fixture.check("denoising_timesteps_first_chunk", torch.tensor(first)))
    checks += _cache_checks(fixture, session, n_in + num_blocks * nf)
    return checks


def _cache_checks(fixture: Fixture, session, end_frame: int) -> list[Check]:
    """The ring's valid content, reordered into the reference's slot order, against its final cache."""
    ring = session.plan.ring
    fs = ring.frame_tokens
    kept = fixture.params.get("final_cache_slot_frames")
    if kept is None:  # a cache that never rolled holds frames 0..end-1 in order
        kept = list(range(min(end_frame, ring.sink + ring.window)))
    rows = torch.cat([torch.arange(ring.slot_of(f) * fs, (ring.slot_of(f) + 1) * fs) for f in kept])
    checks = []
    for name in ("k", "v"):
        buf = session.buffers[f"ring_{name}"]
        for layer in range(buf.shape[0]):
            key = f"kv_cache_final.{layer}.{name}"
            if key in fixture.tensors:
                checks.append(fixture.check(key, buf[layer][:, rows.to(buf.device)]))
    return checks


__all__ = ["engine_for_fixture", "rel_l2", "run"]
