"""fd-parity kind `flashvsr_dit_forward`: two streamed DiT calls with LQ features and LCSA attention.

The fixture set's flashvsr.md, "Kind flashvsr_dit_forward": call 0 (6 frames, no cache), then
call 1 (2 frames against the cached K/V windows, RoPE from frame 6). The block masks of every
block and call must match exactly; the flows within the tolerance.
"""

from __future__ import annotations

import torch

from flashdreams.kernels.block_sparse_attention import topk_budget
from flashdreams.models.families.flashvsr.dit import (
    WINDOW,
    chunk_frame_positions,
    chunk_slot,
    cross_kv,
    forward_chunk,
    ring_order,
)
from flashdreams.models.families.flashvsr.plan import cache_schedule, ring_slabs, valid_slabs
from flashdreams.parity.common import Check, Fixture, register
from flashdreams.parity.flashvsr_common import exact_check, load_dit


@register("flashvsr_dit_forward")
def run(fixture: Fixture, device: str = "cpu", attention: str = "sdpa", **_options) -> list[Check]:
    params = fixture.params
    model = load_dit(fixture.config, fixture.weights(), device, attention)
    cfg = model.cfg
    lh, lw = params["latent_hw"]
    gh, gw = lh // 2 // WINDOW[1], lw // 2 // WINDOW[2]
    topk = topk_budget(gh * gw, float(params["topk_ratio"]))
    lq_layers = int(params.get("lq_layers", 1))
    slab = gh * gw * 128
    schedule = cache_schedule(float(params["kv_ratio"]))
    ring = ring_slabs(schedule)
    cache_k = torch.zeros(cfg.num_layers, 1, ring * slab, cfg.num_heads, cfg.head_dim, device=device)
    cache_v = torch.zeros_like(cache_k)
    checks: list[Check] = []
    with torch.no_grad():
        ck, cv = cross_kv(model, fixture["context"].to(device))
        t = torch.full((1, 1), 1000.0, device=device)
        e, e0 = model.time_embed(t)
        checks += fixture.check_present({"t": lambda: e[:, 0], "t_mod": lambda: e0[:, 0]})
        for call in range(int(params.get("calls", 2))):
            x = fixture[f"x_{call}"].to(device)
            f = x.shape[2]
            lq = [fixture[f"lq_latents_{call}_{i}"].to(device) for i in range(lq_layers)]
            valid = valid_slabs(schedule)[min(call, len(schedule) - 1)]
            slot = None if call == 0 else torch.tensor([chunk_slot(call, ring)], device=device)
            masks: list = []
            flow = forward_chunk(
                model, x, lq, ck, cv, cache_k, cache_v, chunk_frame_positions(call, f, device),
                slot=slot, valid_slabs=valid, topk=topk, local_range=int(params["local_range"]), masks=masks,
            )  # fmt: skip
            checks.append(fixture.check(f"flow_{call}", flow))
            # Masks come in ring-slot order; the reference lists its keys oldest first.
            order = torch.tensor(ring_order(call, ring, valid), device=device)
            windows = (order[:, None] * gh * gw + torch.arange(gh * gw, device=device)).reshape(-1)
            for block, mask in enumerate(masks):
                name = f"blockmask_{call}_{block}"
                if fixture.has(name):
                    checks.append(exact_check(fixture, name, mask.index_select(-1, windows)))
            name = f"cache_windows_{call}"
            if fixture.has(
                name
            ):  # the slabs the reference keeps: ours hold them, plus the slot the next chunk overwrites
                kept = schedule[min(call, len(schedule) - 1)][1]
                checks.append(fixture.check(name, torch.full((cfg.num_layers,), float(kept * gh * gw))))
    return checks
