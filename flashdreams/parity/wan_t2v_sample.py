"""fd-parity kind `wan_t2v_sample` (and the sampling part of `wan_i2v_sample`): `WanT2V.generate`'s
UniPC + CFG loop through a real Session of the `wan21` family.

The fixture becomes a preset of that family (its config, steps, shift, guide scale and size,
with `history=True` so the session keeps every step's solver buffers); its weights load
through `FAMILY.load`, its contexts are the session's prompt inputs, its stored noise is the
block's `noise` draw. the fixture set's wan21.md ($FD_FIXTURES), "Kind wan_t2v_sample".
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from flashdreams.backend import EagerBackend
from flashdreams.engine import Engine
from flashdreams.errors import InternalError
from flashdreams.models.families.wan21 import FAMILY, Preset
from flashdreams.models.family import LoadOptions
from flashdreams.models.samplers import unipc_schedule
from flashdreams.models.wan_config import WanConfig
from flashdreams.parity.common import Check, Fixture, register

CHECKED_ROLES = ("expected", "debug")


def fixture_preset(fixture: Fixture) -> Preset:
    """A wan21 preset with the fixture's model, schedule and size (no decoder, every step kept)."""
    p = fixture.params
    cfg = WanConfig.from_dict(fixture.config)
    common = {
        "name": f"fixture:{fixture.path.name}",
        "description": "parity fixture",
        "num_frames": int(p["frame_num"]),
        "sampling_steps": int(p["sampling_steps"]),
        "shift": float(p["shift"]),
        "guide_scale": float(p["guide_scale"]),
        "decoder": None,
        "history": True,
    }
    if cfg.model_type == "i2v":
        lh, lw = p["lat_hw"]
        ih, iw = p["image_hw"]
        clip = fixture.meta.get("clip_config", p.get("clip_config"))
        return Preset(
            model=cfg.replace(clip_dim=int(p["clip_dim"])),
            height=8 * lh,
            width=8 * lw,
            image_height=ih,
            image_width=iw,
            max_area=int(p["max_area"]),
            clip=dict(clip),
            vae=dict(p["vae_config"]),
            **common,
        )
    _, _, lh, lw = p["latent_shape"]
    return Preset(model=cfg, height=8 * lh, width=8 * lw, **common)


def engine_for_fixture(fixture: Fixture, device: str = "cpu", attention: str = "sdpa") -> Engine:
    """An eager engine of the wan21 family with the fixture's preset and weights."""
    preset = fixture_preset(fixture)
    opts = LoadOptions(device=torch.device(device), attention=attention, batch=1, decoder=None)
    model = FAMILY.load(preset, opts, weights=fixture.weights())
    if preset.i2v:  # the fixture states the latent statistics it encoded with
        model.graphs["encode_image"].vae.set_latent_stats(fixture["latent_mean"], fixture["latent_std"])
    return Engine(EagerBackend(model), model.plan, preset, preset.name, None, False, model)


def sample_session(fixture: Fixture, device: str = "cpu", attention: str = "sdpa") -> dict[str, torch.Tensor]:
    """One session block on the fixture's inputs and noise; every tensor the sampling kinds define.

    I2V: the image goes in as the `image` input, so the CLIP tokens and y come from the family
    (they are returned as `clip_context` and `y`).
    """
    engine = engine_for_fixture(fixture, device, attention)
    inputs = {"prompt_embeds": fixture["context"], "negative_prompt_embeds": fixture["context_null"]}
    if "image" in engine.plan.inputs:
        inputs["image"] = fixture["image"]
    session = engine.session(inputs=inputs, seed=0)
    result = session.step({"noise": fixture["noise"].to(device)[None]})
    p = fixture.params
    steps = int(p["sampling_steps"])
    timesteps, sigmas = unipc_schedule(steps, float(p["shift"]))
    buf = session.buffers
    per_step = lambda base: torch.stack([buf[f"{base}_{k}"][0] for k in range(steps)])  # noqa: E731
    out = {
        "latents": result.latents[0],
        "timesteps": buf_timesteps(session, steps),
        "sigmas": torch.tensor(engine.plan.meta["schedule"]["sigmas"], dtype=torch.float32),
        "step_latents": per_step("x"),
        "noise_pred_cond": per_step("cond"),
        "noise_pred_uncond": per_step("uncond"),
        "step_x0_pred": per_step("m"),
        "step_corrected": per_step("xc"),
    }
    if engine.plan.meta["schedule"]["timesteps"] != timesteps or engine.plan.meta["schedule"]["sigmas"] != sigmas:
        raise InternalError(f"fixture '{fixture.path.name}': the plan's schedule is not the fixture's")
    if "clip_fea" in buf:
        out["clip_context"] = buf["clip_fea"][0]
        out["y"] = buf["y"][0]
    return out


def buf_timesteps(session, steps: int) -> torch.Tensor:
    """The timesteps the session's calls were conditioned on (its `t_k` constants), as float32."""
    return torch.cat([session.buffers[f"t_{k}"] for k in range(steps)]).float()


def check_all(fixture: Fixture, outputs: Mapping[str, torch.Tensor]) -> list[Check]:
    """One Check per [expected] and [debug] tensor the fixture declares (all of them, or an error)."""
    wanted = [n for n, role in fixture.roles.items() if role in CHECKED_ROLES]
    missing = [n for n in wanted if n not in outputs]
    if missing:
        raise InternalError(f"fixture '{fixture.path.name}' ({fixture.kind}): the runner does not produce {missing}")
    return [fixture.check(n, outputs[n].detach().cpu()) for n in wanted]


@register("wan_t2v_sample")
def run(fixture: Fixture, device: str = "cpu", attention: str = "sdpa", **_options) -> list[Check]:
    return check_all(fixture, sample_session(fixture, device, attention))
