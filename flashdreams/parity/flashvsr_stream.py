"""fd-parity kind `flashvsr_stream`: the FlashVSR Tiny pipeline loop, run as a session of the family.

The fixture set's flashvsr.md, "Kind flashvsr_stream". The fixture's models become a preset
(its LQ video is already at output size: scale 1; no TC decoder: the latents are compared),
its uint8 LQ video goes in block by block as `lq_frames` (25 frames, then 8 per block) and
its stored noise replaces the session's draws. Flows and block masks are read off the calls.
"""

from __future__ import annotations

import torch

from flashdreams.backend import EagerBackend
from flashdreams.engine import Engine
from flashdreams.models.families.flashvsr import FAMILY, Preset
from flashdreams.models.families.flashvsr.dit import ring_order
from flashdreams.models.families.flashvsr.lq_proj import LQProjConfig
from flashdreams.models.families.flashvsr.plan import cache_schedule, ring_slabs, valid_slabs
from flashdreams.models.family import LoadOptions
from flashdreams.models.wan_config import WanConfig
from flashdreams.parity.common import Check, Fixture, register
from flashdreams.parity.flashvsr_common import exact_check


def fixture_preset(fixture: Fixture) -> Preset:
    cfg, params = fixture.config, fixture.params
    return Preset(
        name=f"fixture:{fixture.path.name}",
        description="a flashvsr_stream fixture's models",
        model=WanConfig.from_dict({**cfg["dit"], "text_len": int(params["context_len"])}),
        lq_proj=LQProjConfig.from_dict(cfg["lq_proj"]),
        height=int(params["height"]),
        width=int(params["width"]),
        scale=1,
        topk_ratio=float(params["topk_ratio"]),
        kv_ratio=float(params["kv_ratio"]),
        local_range=int(params["local_range"]),
        decoder=None,
    )


@register("flashvsr_stream")
def run(fixture: Fixture, device: str = "cpu", attention: str = "sdpa", **_options) -> list[Check]:
    preset = fixture_preset(fixture)
    opts = LoadOptions(device=torch.device(device), attention=attention, decoder=None)
    model = FAMILY.load(preset, opts, weights=fixture.weights())
    engine = Engine(EagerBackend(model), model.plan, preset, model.source, None, False, model)
    frames = fixture["lq_video_u8"].permute(0, 2, 3, 4, 1).float()  # [1, F, H, W, 3] pixel values
    inputs = {"prompt_embeds": fixture["context"], "lq_frames": frames[:, :25]}
    session = engine.session(inputs=inputs, cuda_graphs=False)
    masks: list = []
    for name, graph in model.graphs.items():
        if name.startswith("dit_"):
            graph.masks = masks
    flows: list[torch.Tensor] = []
    session.probe = lambda block, i, graph, args, outs: graph.startswith("dit_") and flows.append(outs[0].clone())

    noise = fixture["noise"]
    chunks = (frames.shape[1] - 1) // 8 - 2
    latents = []
    for k in range(chunks):
        if k == 0:
            lq, x = frames[:, :25], noise[:, :, 0:6]
        else:
            lq, x = frames[:, 8 * k + 17 : 8 * k + 25], noise[:, :, 4 + 2 * k : 6 + 2 * k]
        draw = torch.zeros(model.plan.draws["noise"].shape)
        draw[:, :, : x.shape[2]] = x
        session.set_input("lq_frames", lq)
        latents.append(session.step(draws={"noise": draw}).latents.cpu())
    for graph in model.graphs.values():
        if hasattr(graph, "masks"):
            graph.masks = None
    checks = [fixture.check("latents", torch.cat(latents, dim=2))]
    layers = preset.model.num_layers
    for k, flow in enumerate(flows):
        if fixture.has(f"flow_{k}"):
            checks.append(fixture.check(f"flow_{k}", flow.cpu()))
    schedule = cache_schedule(preset.kv_ratio)
    ring, windows = ring_slabs(schedule), model.plan.meta["window_grid"][0] * model.plan.meta["window_grid"][1]
    for i, mask in enumerate(masks):
        chunk = i // layers
        name = f"blockmask_{chunk}_{i % layers}"
        if fixture.has(name):  # ring-slot order -> the reference's (oldest first)
            order = torch.tensor(ring_order(chunk, ring, valid_slabs(schedule)[min(chunk, len(schedule) - 1)]))
            cols = (order[:, None] * windows + torch.arange(windows)).reshape(-1)
            checks.append(exact_check(fixture, name, mask.cpu().index_select(-1, cols)))
    return checks
