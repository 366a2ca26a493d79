"""fd-parity runner for `taehv_decode`: TAEHV parallel, sequential and the demo's stream.

../shared/fixtures/README.md, "Kind taehv_decode". The float16 weights are computed in float32.
"""

from __future__ import annotations

from flashdreams.models.taehv import TAEHV, TAEHVConfig
from flashdreams.parity.common import Check, Fixture, register


@register("taehv_decode")
def run(fixture: Fixture, **_options) -> list[Check]:
    """Decode the fixture's latents three ways; one Check per expected video."""
    model = TAEHV(TAEHVConfig.from_dict(fixture.config))
    model.load_weights(fixture.weights(), source=str(fixture.weights_path))  # float16 -> float32 copy
    params = fixture.params
    latents = fixture["latents"].float()  # NTCHW, as is: TAEHV takes normalised latents
    stream = model.decode_demo(
        latents, block=int(params.get("stream_block", 3)), context=int(params.get("stream_context_frames", 3))
    )
    return [
        fixture.check("video_full", model.decode_full(latents)),
        fixture.check("video_sequential", model.decode_sequential(latents)),
        fixture.check("video_stream", stream),
    ]
