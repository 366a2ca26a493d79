"""fd-parity kind `flashvsr_tcdecoder`: the LQ-conditioned TAEHV decoder and the AdaIN colour fix.

The fixture set's flashvsr.md, "Kind flashvsr_tcdecoder": parallel and sequential decodes on
fresh memory (first 3 frames dropped), the chunked stream (6 latents with 21 LQ frames, then 2
with 8 each, memory kept) and the colour fix of the sequential decode.
"""

from __future__ import annotations

import torch

from flashdreams.models.families.flashvsr.tcdecoder import (
    TCDecoder,
    adain_colorfix,
    decoder_input,
    tc_config,
    to_signed,
)
from flashdreams.parity.common import Check, Fixture, register


@register("flashvsr_tcdecoder")
def run(fixture: Fixture, device: str = "cpu", **_options) -> list[Check]:
    model = TCDecoder(tc_config(tuple(fixture.config["channels"])))
    model.load_weights(fixture.weights(), str(fixture.weights_path))
    model = model.to(device).eval()
    latents, cond = fixture["latents"].to(device), fixture["cond"].to(device)
    trim = model.config.frames_to_trim
    inp = decoder_input(latents, cond)
    with torch.no_grad():
        sequential = model.decode_sequential(inp)[:, trim:]

    def chunked() -> torch.Tensor:
        b, t, _, h, w = latents.shape
        state = model.new_decode_state(b, h, w, device)
        outs = [model.decode_stream(decoder_input(latents[:, :6], cond[:, :, :21]), state)]
        for i, start in enumerate(range(6, t, 2)):
            lq = cond[:, :, 21 + 8 * i : 29 + 8 * i]
            outs.append(model.decode_stream(decoder_input(latents[:, start : start + 2], lq), state))
        return torch.cat(outs, dim=1)

    return fixture.check_present(
        {
            "video_parallel": lambda: model.decode_full(inp)[:, trim:],
            "video_sequential": lambda: sequential,
            "video_chunked": chunked,
            "video_colorfix": lambda: adain_colorfix(to_signed(sequential), cond),
        }
    )
