"""fd-parity kind `matrixgame_action_module`: one Matrix-Game action module over a stream of cached calls.

Driven as block 0 of the pipeline drives it (the fixture set's matrixgame.md ($FD_FIXTURES), kind
`matrixgame_action_module`): per block b (f0 = 3b) `calls_per_block` calls with the action prefix
up to video frame 4(f0+2), caches persisting across all calls.
"""

from __future__ import annotations

import torch

from flashdreams.models.action_module import ActionConfig, ActionModule, window_index
from flashdreams.models.checkpoint import validate_and_load
from flashdreams.parity.common import Check, Fixture, register

PREFIX = "model.blocks.0.action_model."


def ring_order(valid: int, end: int, window: int) -> list[int]:
    """Ring slots of the frames a shifting cache holds after frame `end`-1, oldest first (its slot order)."""
    return [f % window for f in range(end - valid, end)]


def action_caches(cfg: ActionConfig, batch: int, tokens: int, frames: int, dtype=torch.float32, device="cpu"):
    """Zeroed (keyboard_k, keyboard_v, mouse_k, mouse_v) of one action layer (mouse None without mouse)."""
    kb = (batch, frames, cfg.heads_num, cfg.head_dim)
    ms = (batch, tokens, frames, cfg.heads_num, cfg.head_dim)
    z = lambda s: torch.zeros(s, dtype=dtype, device=device)  # noqa: E731
    return z(kb), z(kb), (z(ms) if cfg.enable_mouse else None), (z(ms) if cfg.enable_mouse else None)


@register("matrixgame_action_module")
def run(fixture: Fixture, device: str = "cpu", **_options) -> list[Check]:
    p = fixture.params
    cfg = ActionConfig.from_dict(fixture.config)
    window = int(fixture.config["local_attn_size"])
    module = ActionModule(cfg)
    sd = {k[len(PREFIX) :]: v for k, v in fixture.weights().items() if k.startswith(PREFIX)}
    validate_and_load(module, sd, str(fixture.weights_path))
    module = module.to(device).eval()
    nf, s = p["num_frame_per_block"], p["tokens_per_frame"]
    ratio, w = cfg.vae_time_compression_ratio, cfg.window
    kb_all = fixture["keyboard_cond"].to(device)
    ms_all = fixture["mouse_cond"].to(device) if cfg.enable_mouse else None
    kb_k, kb_v, ms_k, ms_v = action_caches(cfg, 1, s, window, device=device)
    call_x = fixture["call_x"].to(device)
    names = ("out", "mouse_windows", "keyboard_windows", "mouse_attn_out", "keyboard_attn_out")
    per_call = {n: [] for n in names}
    debug = {n: [] for n in ("mouse_mlp_out", "mouse_q_rope", "mouse_k_rope", "keyboard_q_rope", "keyboard_k_rope")}
    end = 0
    with torch.no_grad():
        for i, call in enumerate(p["calls"]):
            f0 = call["start_frame"]
            pos = torch.arange(f0, f0 + nf, device=device)
            idx = window_index(pos, ratio, w)  # rows of the prefix; never past video frame 4(f0+nf-1)
            end = f0 + nf
            trace: dict = {}
            kw = kb_all[:, idx]
            mw = ms_all[:, idx] if ms_all is not None else None
            out = module(
                call_x[i],
                pos,
                pos % window,
                torch.tensor(min(end, window), device=device),
                kw,
                mw,
                kb_k,
                kb_v,
                ms_k,
                ms_v,
                trace=trace,
            )
            per_call["out"].append(out)
            per_call["mouse_windows"].append(mw.flatten(2) if mw is not None else None)
            per_call["keyboard_windows"].append(trace["keyboard_windows"])
            per_call["mouse_attn_out"].append(trace.get("mouse_attn_out"))
            per_call["keyboard_attn_out"].append(trace["keyboard_attn_out"])
            if i in p.get("debug_calls", []):
                # Reference layouts: mouse tensors [S, T, ...] per token row, keyboard k [1, T, A, hd].
                if cfg.enable_mouse:
                    debug["mouse_mlp_out"].append(trace["mouse_mlp_out"][0].transpose(0, 1))
                    debug["mouse_q_rope"].append(trace["mouse_q_rope"][0].transpose(0, 1))
                    debug["mouse_k_rope"].append(trace["mouse_k_rope"][0].transpose(0, 1))
                debug["keyboard_q_rope"].append(trace["keyboard_q_rope"][0].transpose(0, 1))
                debug["keyboard_k_rope"].append(trace["keyboard_k_rope"])
    slots = ring_order(min(end, window), end, window)
    outputs = {n: (lambda v=v: torch.stack(v)) for n, v in per_call.items() if v and v[0] is not None}
    outputs |= {n: (lambda v=v: torch.stack(v)) for n, v in debug.items() if v}
    outputs["keyboard_cache_final_k"] = lambda: kb_k[:, slots]
    outputs["keyboard_cache_final_v"] = lambda: kb_v[:, slots]
    if ms_k is not None:
        outputs["mouse_cache_final_k"] = lambda: ms_k[0][:, slots]
        outputs["mouse_cache_final_v"] = lambda: ms_v[0][:, slots]
    return fixture.check_present(outputs)
