"""fd-parity kind `lingbot_dit_forward`: one bidirectional forward of LingBot-World's camera-controlled I2V DiT.

Three cases of the fixture set's lingbot.md, "Kind lingbot_dit_forward": with the camera, without it
(the camera branch skipped), and with per-token timesteps; plus the debug tensors of the camera
path and every block's output.
"""

from __future__ import annotations

import torch

from flashdreams.models.camera_rays import patch_tokens
from flashdreams.models.lingbot_dit import load_lingbot_dit
from flashdreams.models.wan_config import WanConfig
from flashdreams.parity.common import Check, Fixture, register


@register("lingbot_dit_forward")
def run(fixture: Fixture, device: str = "cpu", attention: str = "sdpa", **_options) -> list[Check]:
    model = load_lingbot_dit(fixture.weights(), WanConfig.from_dict(fixture.config), device=device)
    model.set_attention(attention)
    x, y = fixture["x"].to(device), fixture["y"].to(device)
    ctx = fixture["context"].to(device)
    patch = tuple(fixture.config.get("patch_size", (1, 2, 2)))
    tokens = patch_tokens(fixture["c2ws_plucker_emb"].to(device), patch)
    debug: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        ck, cv = model.cross_kv(ctx)
        outs = {
            "output": model.forward_camera(x, fixture["timestep"].to(device), ck, cv, y, tokens, debug=debug),
            "output_nocam": model.forward_camera(x, fixture["timestep"].to(device), ck, cv, y, None),
        }
        if fixture.has("timestep_per_token"):
            t_tok = fixture["timestep_per_token"].to(device)
            outs["output_per_token_t"] = model.forward_camera(x, t_tok, ck, cv, y, tokens)
    outs["cam_tokens_in"] = tokens
    outs.update(debug)
    return [fixture.check(name, value) for name, value in outs.items() if fixture.has(name)]
