"""fd-parity kind `omnidreams_rollout`: the OmniDreams streaming loop through a real Session of the
`omnidreams` family: one block per chunk, `hdmap` set before each step, the fixture's recorded draws
(unpatchified) as the block's draws; a probe records every DiT call for the debug tensors
(the fixture set's omnidreams.md ($FD_FIXTURES), "Kind omnidreams_rollout").
"""

from __future__ import annotations

import torch

from flashdreams.parity.common import Check, Fixture, register
from flashdreams.parity.omnidreams_common import fixture_engine, from_session, to_session, unpatchify_draw

DIT_GRAPHS = ("dit", "dit_first")


def rollout(fixture: Fixture, device: str = "cpu", attention: str = "sdpa") -> dict[str, torch.Tensor]:
    engine = fixture_engine(fixture, device, attention)
    plan = engine.plan
    _, _, t, _, h, w = fixture["hdmap_0"].shape
    steps = len(plan.meta["schedule"]["timesteps"])
    draw_names = ["noise", *(f"renoise_{s}" for s in range(steps - 1)), "renoise_ctx"]  # the reference's order
    session = engine.session(
        inputs={
            "prompt_embeds": fixture["text_embeddings"][:, 0],
            "image_latent": to_session(fixture["image_latent"]),
            "hdmap": to_session(fixture["hdmap_0"]),
        },
        seed=0,
    )
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def probe(block, index, graph, args, outs):
        if graph in DIT_GRAPHS:
            calls.append((args["x"].clone(), args["t"].clone(), outs[0].clone()))

    session.probe = probe
    out = {}
    for c in range(int(fixture.params["num_chunks"])):
        session.set_input("hdmap", to_session(fixture[f"hdmap_{c}"]))
        draws = {n: unpatchify_draw(fixture[f"noise_{c}_{j}"], t, h, w).to(device) for j, n in enumerate(draw_names)}
        out[f"latent_{c}"] = from_session(session.step(draws).latents)
    for k, (x, ts, flow) in enumerate(calls):
        out[f"debug_net_input_{k}"] = from_session(x)
        out[f"debug_timestep_{k}"] = ts[:1].float()
        out[f"debug_flow_{k}"] = from_session(flow)
    return out


@register("omnidreams_rollout")
def run(fixture: Fixture, device: str = "cpu", attention: str = "sdpa", **_options) -> list[Check]:
    outputs = rollout(fixture, device, attention)
    wanted = [n for n, r in fixture.roles.items() if r in ("expected", "debug")]
    return [fixture.check(n, outputs[n].detach().cpu()) for n in wanted if n in outputs]
