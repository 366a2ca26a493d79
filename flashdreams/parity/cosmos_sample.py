"""fd-parity kind `cosmos_sample`: video2world sampling through a real Session of the `cosmos` family.

The fixture becomes a preset of that family (its network, step count, guidance, Karras sigmas,
conditioning frames and size, with `history=True` so the session keeps every evaluation's
buffers); its weights load through `FAMILY.load`, its Reason1 features are the session's prompt
inputs, `gt_latent` is `cond_latent` and the stored noise the block's `noise` draw
(the fixture set's cosmos.md ($FD_FIXTURES), "Kind cosmos_sample").
"""

from __future__ import annotations

import torch

from flashdreams.backend import EagerBackend
from flashdreams.engine import Engine
from flashdreams.models.families.cosmos import FAMILY, Preset
from flashdreams.models.families.cosmos.steps import frame_timesteps
from flashdreams.models.family import LoadOptions
from flashdreams.parity.common import Check, Fixture, register
from flashdreams.parity.cosmos_dit_forward import fixture_config


def fixture_preset(fixture: Fixture) -> Preset:
    p = fixture.params
    t, h, w = p["latent_thw"]
    k = p["karras"]
    return Preset(
        name=f"fixture:{fixture.path.name}",
        description="parity fixture",
        model=fixture_config(fixture),
        num_frames=1 + 4 * (t - 1),
        num_steps=int(p["num_steps"]),
        guidance=float(p["guidance"]),
        sigma_max=float(k["sigma_max"]),
        sigma_min=float(k["sigma_min"]),
        rho=float(k["rho"]),
        cond_timestep=float(p["conditional_frame_timestep"]),
        num_cond_frames=int(p["num_cond_frames"]),
        text_len=int(p["text_len"]),
        height=8 * h,
        width=8 * w,
        decoder=None,
        history=True,
    )


def sample_session(fixture: Fixture, device: str = "cpu", attention: str = "sdpa") -> dict[str, torch.Tensor]:
    """One session block on the fixture's inputs and noise; every tensor the kind defines, by name."""
    preset = fixture_preset(fixture)
    opts = LoadOptions(device=torch.device(device), attention=attention, batch=1, decoder=None)
    model = FAMILY.load(preset, opts, weights=fixture.weights())
    engine = Engine(EagerBackend(model), model.plan, preset, preset.name, None, False, model)
    inputs = {
        "prompt_embeds": fixture["crossattn_emb"],
        "negative_prompt_embeds": fixture["neg_crossattn_emb"],
        "cond_latent": fixture["gt_latent"],
    }
    session = engine.session(inputs=inputs, seed=0)
    result = session.step({"noise": fixture["noise"].to(device)})
    sched = model.plan.meta["schedule"]
    evals = sched["evaluations"]
    buf = session.buffers
    step = model.graphs["dit_cfg"]
    net_t = [
        frame_timesteps(buf[f"t_{k}"], step.mask, 1, preset.cond_timestep)[0].cpu()
        for k in range(evals)
        for _ in (0, 1)
    ]
    out = {
        "output": result.latents,
        "sample_timesteps": torch.tensor(sched["timesteps"], dtype=torch.float32),
        "sample_sigmas": torch.tensor(sched["sigmas"], dtype=torch.float32),
        "net_timesteps": torch.stack(net_t),
    }
    for k in range(evals):
        out[f"debug_cond_velocity_{k}"] = buf[f"cond_{k}"]
        out[f"debug_uncond_velocity_{k}"] = buf[f"uncond_{k}"]
        out[f"debug_velocity_{k}"] = buf[f"v_{k}"]
        out[f"debug_latents_{k}"] = buf[f"x_{k + 1}"] if k + 1 < evals else buf["latents"]
    return out


@register("cosmos_sample")
def run(fixture: Fixture, device: str = "cpu", attention: str = "sdpa", **_options) -> list[Check]:
    outputs = sample_session(fixture, device, attention)
    wanted = [n for n, r in fixture.roles.items() if r in ("expected", "debug")]
    return [fixture.check(n, outputs[n].detach().cpu()) for n in wanted if n in outputs]
