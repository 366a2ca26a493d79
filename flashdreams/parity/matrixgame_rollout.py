"""fd-parity kind `matrixgame_rollout`: Matrix-Game's streaming loop through a real Session.

The matrixgame family's block plan runs with the fixture's weights, CLIP tokens and cond_concat
as inputs (conditioning "tensors"), the stored random draws, and the actions fed per block as a
host does: block 0 gets video frames 0..8 (rows 3..11 of its `keyboard` / `mouse` input), block
b >= 1 frames 12b-3 .. 12b+8 (the fixture set's matrixgame.md ($FD_FIXTURES), kind `matrixgame_rollout`).
"""

from __future__ import annotations

import torch

from flashdreams import registry
from flashdreams.backend import EagerBackend
from flashdreams.engine import Engine
from flashdreams.models.action_module import ActionConfig
from flashdreams.models.families.matrixgame.actions import block_rows
from flashdreams.models.family import LoadOptions
from flashdreams.models.matrixgame_dit import wan_config_from_reference
from flashdreams.models.scheduler import flow_match_tables, sigma_of
from flashdreams.parity.common import Check, Fixture, register
from flashdreams.parity.matrixgame_action_module import ring_order

MODE_OF_KEYS = {4: "universal", 2: "gta_drive", 7: "templerun"}


def engine_for_fixture(fixture: Fixture, device: str = "cpu", attention: str = "sdpa") -> Engine:
    """An eager engine of the matrixgame family with the fixture's config, schedule and caches."""
    family = registry.family("matrixgame")
    p = fixture.params
    action = ActionConfig.from_dict(fixture.config["action_config"])
    lh, lw = p["latent_hw"]
    preset = family.preset_from_dict(
        {
            "name": f"fixture:{fixture.path.name}",
            "description": "parity fixture",
            "model": wan_config_from_reference(fixture.config),
            "action": action,
            "mode": p.get("mode", MODE_OF_KEYS[action.keyboard_dim_in]),
            "visual_context_dim": p["visual_context_dim"],
            "denoising_step_list": tuple(p["denoising_step_list"]),
            "timestep_shift": p["timestep_shift"],
            "warp_denoising_step": p["warp_denoising_step"],
            "context_noise": p["context_noise"],
            "num_frame_per_block": p["num_frame_per_block"],
            "local_attn_size": int(fixture.config["local_attn_size"]),
            "cond_frames": p["num_latent_frames"],
            "decoder": None,
            "height": lh * 8,
            "width": lw * 8,
        }
    )
    opts = LoadOptions(device=torch.device(device), attention=attention, batch=1, decoder=None)
    model = family.load(preset, opts, weights=fixture.weights(), conditioning="tensors")
    return Engine(EagerBackend(model), model.plan, preset, preset.name, None, False, model)


@register("matrixgame_rollout")
def run(fixture: Fixture, device: str = "cpu", attention: str = "sdpa", **_options) -> list[Check]:
    p = fixture.params
    engine = engine_for_fixture(fixture, device, attention)
    plan, preset = engine.plan, engine.spec.preset
    nf, num_blocks = p["num_frame_per_block"], p["num_blocks"]
    rows, first_rows = plan.meta["action_rows_per_block"], plan.meta["action_rows_first_block"]
    session = engine.session(
        inputs={"visual_context": fixture["visual_context"], "cond_concat": fixture["cond_concat"]}, seed=0
    )
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    session.probe = lambda blk, i, graph, args, outs: (
        calls.append((args["x"].clone(), args["t"].clone(), outs[0].clone())) if graph == "dit" else None
    )
    noise, renoise = fixture["noise"].to(device), fixture["renoise"].to(device)
    keyboard = fixture["keyboard_cond"]
    mouse = fixture["mouse_cond"] if preset.has_mouse else None
    outputs = []
    for b in range(num_blocks):
        session.set_input("keyboard", block_rows(keyboard, b, rows, first_rows))
        if mouse is not None:
            session.set_input("mouse", block_rows(mouse, b, rows, first_rows))
        draws = {"noise": noise[:, :, b * nf : (b + 1) * nf]}
        for s in range(renoise.shape[1]):
            draws[f"renoise_{s}"] = renoise[b, s].transpose(0, 1)[None]  # [nf, C, H, W] -> [1, C, nf, H, W]
        outputs.append(session.step(draws).latents)
    sigmas, table = flow_match_tables(p["timestep_shift"])
    x_in = torch.stack([c[0] for c in calls])
    ts = torch.stack([c[1][0, 0] for c in calls])
    flows = torch.stack([c[2] for c in calls])
    x0s = torch.stack(
        [(x.double() - sigma_of(float(t), sigmas, table) * f.double()).float() for x, t, f in zip(x_in, ts, flows)]
    )
    grid = lambda t: t.unflatten(0, (num_blocks, -1))  # noqa: E731
    outs = {
        "output_latents": lambda: torch.cat(outputs, dim=2),
        "call_input": lambda: grid(x_in),
        "call_timestep": lambda: grid(ts),
        "call_flow_pred": lambda: grid(flows),
        "call_x0_pred": lambda: grid(x0s),
        "flow_pred_first": lambda: grid(flows)[:, 0],
        "denoising_timesteps": lambda: torch.tensor(preset.schedule().timesteps),
        "scheduler_sigmas": lambda: sigmas,
        "scheduler_timesteps": lambda: table,
    }
    outs |= final_caches(session, preset, num_blocks * nf)
    return fixture.check_present(outs)


def final_caches(session, preset, end: int) -> dict:
    """Every cache's valid content in the reference's slot order (oldest frame first), by fixture name."""
    ring = session.plan.ring
    window, fs = ring.window, ring.frame_tokens
    slots = ring_order(min(end, window), end, window)
    rows = torch.cat([torch.arange(s * fs, (s + 1) * fs) for s in slots])
    buf = session.buffers
    out = {}
    for layer in range(preset.model.num_layers):
        out[f"kv_cache_final.{layer}.k"] = lambda i=layer: buf["ring_k"][i][:, rows]
        out[f"kv_cache_final.{layer}.v"] = lambda i=layer: buf["ring_v"][i][:, rows]
    for j, layer in enumerate(preset.action.blocks):
        for kv in ("k", "v"):
            out[f"keyboard_cache_final.{layer}.{kv}"] = lambda j=j, kv=kv: buf[f"keyboard_{kv}"][j][:, slots]
            if preset.has_mouse:
                out[f"mouse_cache_final.{layer}.{kv}"] = lambda j=j, kv=kv: buf[f"mouse_{kv}"][j][0][:, slots]
    return out
