"""fd-parity kind `omnidreams_dit_forward`: the OmniDreams DiT over a sequence of cached chunk calls.

The family's own graphs run every call (`dit_first` at chunk 0, `dit` after) against one KV ring
whose per-chunk positions, slots and fill come from the plan's ring rule; the fixture's K window
is compared in its buffer order (oldest chunk first) (the fixture set's omnidreams.md
($FD_FIXTURES), "Kind omnidreams_dit_forward").
"""

from __future__ import annotations

import torch

from flashdreams.parity.common import Check, Fixture, register
from flashdreams.parity.omnidreams_common import fixture_engine, from_session, to_session


def window_rows(ring, chunk: int, device) -> torch.Tensor:
    """Ring rows of the frames visible at `chunk`, oldest frame first (the reference's buffer order)."""
    end = (chunk + 1) * ring.frames_per_block
    first = max(ring.sink, end - ring.window)
    frames = list(range(min(ring.sink, end))) + list(range(first, end))
    fs = ring.frame_tokens
    return torch.cat([torch.arange(ring.slot_of(f) * fs, (ring.slot_of(f) + 1) * fs) for f in frames]).to(device)


@register("omnidreams_dit_forward")
def run(fixture: Fixture, device: str = "cpu", attention: str = "sdpa", **_options) -> list[Check]:
    engine = fixture_engine(fixture, device, attention)
    model, plan = engine.model, engine.plan
    ring = plan.ring
    buffers = {n: d.allocate(device) for n, d in plan.state.items()}
    with torch.no_grad():
        k, v = model.graphs["encode_prompt"](fixture["text_embeddings"][:, 0].to(device))
        buffers["cross_k"].copy_(k)
        buffers["cross_v"].copy_(v)
        image = to_session(fixture["image_latent"]).to(device)
        checks = []
        for i, (chunk, t) in enumerate(fixture.params["calls"]):
            for name, vals in ring.values(int(chunk)).items():
                buffers[name].copy_(torch.tensor(vals, dtype=torch.int64))
            first = int(chunk) == 0
            args = [to_session(fixture[f"x_{i}"]).to(device), torch.tensor([float(t)], device=device)]
            args += [buffers["cross_k"], buffers["cross_v"], to_session(fixture[f"hdmap_{chunk}"]).to(device)]
            if first:
                args.append(image)
            args += [buffers[n] for n in ("ring_k", "ring_v", "frame_positions", "slots", "valid_len")]
            flow = model.graphs["dit_first" if first else "dit"](*args)
            checks.append(fixture.check(f"flow_{i}", from_session(flow).cpu()))
            name = f"debug_cache_k0_{i}"
            if fixture.has(name):
                visible = buffers["ring_k"][0].index_select(1, window_rows(ring, int(chunk), device))
                checks.append(fixture.check(name, visible.float().cpu()))
    return checks
