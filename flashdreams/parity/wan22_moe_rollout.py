"""fd-parity kind `wan22_moe_rollout` (FastVideo's causal Wan2.2 A14B): the two-expert streaming loop
through a real Session running the wan22 family's block plan, with the fixture's stored draws."""

from __future__ import annotations

import math

import torch

from flashdreams import registry
from flashdreams.backend import EagerBackend
from flashdreams.engine import Engine
from flashdreams.errors import InvalidArgumentError
from flashdreams.models.families.wan22.plan import draw_names
from flashdreams.models.families.wan22.steps import EXPERT_OF_GRAPH
from flashdreams.models.family import LoadOptions
from flashdreams.models.wan_config import WanConfig
from flashdreams.parity.common import Check, Fixture, register

# The fixture names experts by their release folder.
FOLDER_OF_GRAPH = {g: {"high": "transformer", "low": "transformer_2"}[e] for g, e in EXPERT_OF_GRAPH.items()}


def config_of(fixture: Fixture) -> WanConfig:
    c = fixture.config
    if c.get("qk_norm") not in ("rms_norm_across_heads", True):
        raise InvalidArgumentError(f"fixture qk_norm {c.get('qk_norm')!r} is not RMSNorm across heads")
    return WanConfig(
        dim=c["dim"],
        num_heads=c["num_heads"],
        ffn_dim=c["ffn_dim"],
        num_layers=c["num_layers"],
        text_dim=c["text_dim"],
        freq_dim=c["freq_dim"],
        text_len=c["text_len"],
        patch_size=tuple(c["patch_size"]),
        in_dim=c["in_dim"],
        out_dim=c["out_dim"],
        cross_attn_norm=c["cross_attn_norm"],
        eps=c["eps"],
    )


def engine_for_fixture(fixture: Fixture, device: str = "cpu", attention: str = "sdpa") -> Engine:
    """An eager wan22 engine with the fixture's experts, schedule and cache settings."""
    family = registry.family("wan22")
    c, p = fixture.config, fixture.params
    lh, lw = p["latent_hw"]
    if c.get("local_attn_size", -1) != -1:
        raise InvalidArgumentError("wan22 fixtures use the reference's full cache (local_attn_size -1)")
    preset = family.preset_from_dict(
        {
            "name": f"fixture:{fixture.path.name}",
            "description": "parity fixture",
            "model": config_of(fixture),
            "denoising_step_list": tuple(p["denoising_steps"]),
            "timestep_shift": p["shift"],
            "warp_denoising_step": p["warp"],
            "boundary_ratio": p["boundary_ratio"],
            "context_noise": p["context_noise"],
            "num_frame_per_block": c["num_frames_per_block"],
            "sink_frames": c.get("sink_size", 0),
            "window_frames": c["sliding_window_num_frames"],
            "decoder": None,
            "height": lh * 8,
            "width": lw * 8,
        }
    )
    opts = LoadOptions(device=torch.device(device), attention=attention, batch=p["batch"], decoder=None)
    model = family.load(preset, opts, weights=fixture.weights())
    return Engine(EagerBackend(model), model.plan, preset, preset.name, None, False, model)


def _bcthw(t: torch.Tensor) -> torch.Tensor:
    """A BTCHW draw (the reference's layout) as BCTHW (the model's)."""
    return t.transpose(1, 2)


@register("wan22_moe_rollout")
def run(fixture: Fixture, device: str = "cpu", attention: str = "sdpa", **_options) -> list[Check]:
    p = fixture.params
    engine = engine_for_fixture(fixture, device, attention)
    plan = engine.plan
    sched = engine.spec.preset.schedule()
    session = engine.session(inputs={"prompt_embeds": fixture["context"]}, seed=0)
    calls: list[tuple[int, str, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    session.probe = lambda blk, i, graph, args, outs: (
        calls.append((blk, graph, args["x"].clone(), args["t"].clone(), outs[0].clone()))
        if graph in FOLDER_OF_GRAPH
        else None
    )
    noise = fixture["noise"].to(device)
    finals, f0 = [], 0
    for b, n in enumerate(p["block_sizes"]):
        kind = plan.kind_of(b)
        noise_name, renoise_names = draw_names("steady" if kind == "steady" else "first", sched.num_steps)
        draws = {noise_name: noise[:, :, f0 : f0 + n]}
        renoise = fixture[f"block{b}_renoise"].to(device)
        draws.update({name: _bcthw(renoise[i]) for i, name in enumerate(renoise_names)})
        finals.append(session.step(draws).latents)
        f0 += n
    checks = [fixture.check("latents", torch.cat(finals, dim=2))]
    checks.append(fixture.check("timesteps", torch.tensor(sched.timesteps, dtype=torch.float32)))
    for b in range(len(p["block_sizes"])):
        mine = [c for c in calls if c[0] == b]
        checks.append(fixture.check(f"block{b}_final", finals[b]))
        for name, col in ((f"block{b}_call_input", 2), (f"block{b}_call_output", 4)):
            want = fixture[name].shape[0]
            if len(mine) != want:  # a plan with other calls: a failure with its reason, not an exception
                reason = f"block {b} made {len(mine)} DiT calls, the reference {want}"
                checks.append(Check(name, math.inf, fixture.tolerance, "debug", reason=reason))
            else:
                checks.append(fixture.check(name, torch.stack([c[col] for c in mine])))
    checks.append(_call_table_check(fixture, calls))
    return checks


def _call_table_check(fixture: Fixture, calls: list) -> Check:
    """The order of experts and timesteps of every DiT call against `params.call_table` (0 or inf)."""
    table = fixture.params["call_table"]
    ours = [(FOLDER_OF_GRAPH[g], float(t.reshape(-1)[0])) for _, g, _, t, _ in calls]
    ref = [(row["expert"], float(row["t"])) for row in table]
    same = len(ours) == len(ref) and all(
        a[0] == b[0] and math.isclose(a[1], b[1], abs_tol=1e-3) for a, b in zip(ours, ref)
    )
    return Check("call_table[expert, t per call]", 0.0 if same else math.inf, fixture.tolerance, "debug")


__all__ = ["engine_for_fixture", "run"]
