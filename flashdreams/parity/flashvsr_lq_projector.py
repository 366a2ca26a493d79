"""fd-parity kind `flashvsr_lq_projector`: FlashVSR's LQ projector, clip by clip and whole-video.

The fixture set's flashvsr.md, "Kind flashvsr_lq_projector". The two forms are one computation
here (clips are independent in the reference), so both expected tensors come from one run.
"""

from __future__ import annotations

import torch

from flashdreams.models.checkpoint import validate_and_load
from flashdreams.models.families.flashvsr.lq_proj import LQProjConfig, LQProjector
from flashdreams.parity.common import Check, Fixture, register


@register("flashvsr_lq_projector")
def run(fixture: Fixture, device: str = "cpu", **_options) -> list[Check]:
    proj = LQProjector(LQProjConfig.from_dict(fixture.config))
    validate_and_load(proj, fixture.weights(), str(fixture.weights_path))
    proj = proj.to(device).eval()
    video = fixture["lq_video"].to(device)
    with torch.no_grad():
        whole = proj.video_features(video)
        # The pipeline's stream: clip 0 (frame 0) gives nothing, then one call per clip.
        clips = [
            proj.stream_features(video[:, :, 4 * i - 3 : 4 * i + 1]) for i in range(1, (video.shape[2] - 1) // 4 + 1)
        ]
        stream = [torch.cat([c[layer] for c in clips], dim=1) for layer in range(len(whole))]
    outputs = {}
    for layer in range(len(whole)):
        outputs[f"lq_latents_stream_{layer}"] = lambda layer=layer: stream[layer]
        outputs[f"lq_latents_forward_{layer}"] = lambda layer=layer: whole[layer]
    return fixture.check_present(outputs)
