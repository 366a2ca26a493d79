"""fd-parity kind `matrixgame_dit_forward`: the action-conditioned causal DiT over a stream of cached calls.

Per block b (f0 = 3b): a denoising call at the fixture's timestep, then the cache-write call at
t = 0, each on its own input, with `cond_concat[:, :, f0:f0+3]`, the CLIP tokens and the action
prefix up to video frame 4(f0+2); all caches persist (the fixture set's matrixgame.md ($FD_FIXTURES),
kind `matrixgame_dit_forward`).
"""

from __future__ import annotations

import torch

from flashdreams.models.action_module import ActionConfig, window_index
from flashdreams.models.families.matrixgame.loader import load_matrixgame_dit
from flashdreams.models.matrixgame_dit import MatrixGameDiT, wan_config_from_reference
from flashdreams.parity.common import Check, Fixture, register
from flashdreams.parity.matrixgame_action_module import action_caches, ring_order


def load_model(fixture: Fixture, device: str = "cpu", attention: str = "sdpa") -> MatrixGameDiT:
    cfg = wan_config_from_reference(fixture.config)
    action = ActionConfig.from_dict(fixture.config["action_config"])
    model = load_matrixgame_dit(fixture.weights(), cfg, action, int(fixture.params["visual_context_dim"]), device)
    model.fuse_projections_()
    model.set_attention(attention)
    return model


class Caches:
    """Every cache of a Matrix-Game DiT for one stream (self-attention ring, keyboard, mouse)."""

    def __init__(self, model: MatrixGameDiT, batch: int, frame_tokens: int, window: int, device) -> None:
        cfg = model.cfg
        shape = (cfg.num_layers, batch, window * frame_tokens, cfg.num_heads, cfg.head_dim)
        self.ring_k, self.ring_v = torch.zeros(shape, device=device), torch.zeros(shape, device=device)
        per = [action_caches(model.action_cfg, batch, frame_tokens, window, device=device) for _ in model.action_layers]
        self.kb_k, self.kb_v = torch.stack([p[0] for p in per]), torch.stack([p[1] for p in per])
        mouse = model.action_cfg.enable_mouse
        self.ms_k = torch.stack([p[2] for p in per]) if mouse else None
        self.ms_v = torch.stack([p[3] for p in per]) if mouse else None

    def args(self) -> tuple:
        return self.ring_k, self.ring_v, self.kb_k, self.kb_v, self.ms_k, self.ms_v


def final_cache_outputs(model: MatrixGameDiT, caches: Caches, end: int, window: int, fs: int) -> dict:
    """The valid cache contents in the reference's slot order (oldest frame first), by fixture name."""
    slots = ring_order(min(end, window), end, window)
    rows = torch.cat([torch.arange(s * fs, (s + 1) * fs) for s in slots])
    out = {}
    for layer in range(model.cfg.num_layers):
        out[f"kv_cache_final.{layer}.k"] = lambda i=layer: caches.ring_k[i][:, rows]
        out[f"kv_cache_final.{layer}.v"] = lambda i=layer: caches.ring_v[i][:, rows]
    for j, layer in enumerate(model.action_layers):
        out[f"keyboard_cache_final.{layer}.k"] = lambda j=j: caches.kb_k[j][:, slots]
        out[f"keyboard_cache_final.{layer}.v"] = lambda j=j: caches.kb_v[j][:, slots]
        if caches.ms_k is not None:
            out[f"mouse_cache_final.{layer}.k"] = lambda j=j: caches.ms_k[j][0][:, slots]
            out[f"mouse_cache_final.{layer}.v"] = lambda j=j: caches.ms_v[j][0][:, slots]
    return out


def action_windows(model: MatrixGameDiT, fixture: Fixture, pos: torch.Tensor):
    """(keyboard, mouse) windows [1, T, W, .] of latent frames `pos` from the whole-clip action inputs."""
    a = model.action_cfg
    idx = window_index(pos, a.vae_time_compression_ratio, a.window)
    kb = fixture["keyboard_cond"].to(pos.device)[:, idx]
    ms = fixture["mouse_cond"].to(pos.device)[:, idx] if a.enable_mouse else None
    return kb, ms


@register("matrixgame_dit_forward")
def run(fixture: Fixture, device: str = "cpu", attention: str = "sdpa", **_options) -> list[Check]:
    p = fixture.params
    model = load_model(fixture, device, attention)
    nf, fs, window = p["num_frame_per_block"], p["frame_seq_length"], int(fixture.config["local_attn_size"])
    caches = Caches(model, 1, fs, window, device)
    cond = fixture["cond_concat"].to(device)
    flows, debug, end = [], {}, 0
    with torch.no_grad():
        cross_k, cross_v = model.context_kv(fixture["visual_context"].to(device))
        visual = model.img_emb(fixture["visual_context"].to(device))
        for i, call in enumerate(p["calls"]):
            f0 = call["start_frame"]
            pos = torch.arange(f0, f0 + nf, device=device)
            end = f0 + nf
            kb, ms = action_windows(model, fixture, pos)
            t = fixture["call_timestep"][i].to(device).expand(1, nf)
            trace = {} if i == p.get("debug_call") else None
            hooks = []
            if trace is not None:
                hooks.append(
                    model.time_embedding.register_forward_hook(lambda m, a, o, tr=trace: tr.__setitem__("time", o))
                )
                for b, blk in enumerate(model.blocks):
                    hooks.append(blk.register_forward_hook(lambda m, a, o, b=b, tr=trace: tr.__setitem__(f"out{b}", o)))
            flows.append(
                model.step(
                    fixture["call_x"][i].to(device),
                    t,
                    cond,  # all frames: the step picks the call's own
                    cross_k,
                    cross_v,
                    *caches.args(),
                    pos,
                    torch.remainder(pos, window),
                    torch.tensor([min(end, window) * fs], device=device),
                    kb,
                    ms,
                    trace=trace,
                )
            )
            for h in hooks:
                h.remove()
            if trace is not None:
                debug = trace
    outputs = {"call_flow": lambda: torch.stack(flows)}
    if debug:
        outputs["debug.visual_tokens"] = lambda: visual
        outputs["debug.time_embed"] = lambda: debug["time"].reshape(-1, model.cfg.dim)
        for b in range(model.cfg.num_layers):
            outputs[f"debug.block{b}.out"] = lambda b=b: debug[f"out{b}"]
        for layer in model.action_layers:
            outputs[f"debug.block{layer}.action_in"] = lambda b=layer: debug[f"block{b}"]["action_in"]
            outputs[f"debug.block{layer}.action_out"] = lambda b=layer: debug[f"block{b}"]["action_out"]
    outputs |= final_cache_outputs(model, caches, end, window, fs)
    return fixture.check_present(outputs)
