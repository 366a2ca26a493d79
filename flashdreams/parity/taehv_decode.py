"""fd-parity runner for `taehv_decode`: TAEHV parallel, sequential and the demo's stream.

the fixture set's README.md ($FD_FIXTURES), "Kind taehv_decode". The float16 weights are computed in float32.
"""

from __future__ import annotations

from flashdreams.models.taehv import TAEHV, TAEHVConfig
from flashdreams.parity.common import Check, Fixture, register


@register("taehv_decode")
def run(fixture: Fixture, **_options) -> list[Check]:
    """Decode the fixture's latents each way it holds a video for; one Check per video."""
    model = TAEHV(TAEHVConfig.from_dict(fixture.config))
    model.load_weights(fixture.weights(), source=str(fixture.weights_path))  # float16 -> float32 copy
    params = fixture.params
    latents = fixture["latents"].float()  # NTCHW, as is: TAEHV takes normalised latents
    block, context = int(params.get("stream_block", 3)), int(params.get("stream_context_frames", 3))
    return fixture.check_present(
        {
            "video_full": lambda: model.decode_full(latents),
            "video_sequential": lambda: model.decode_sequential(latents),
            "video_stream": lambda: model.decode_demo(latents, block=block, context=context),
        }
    )
