"""Matrix-Game 2.0's DiT: a causal Wan2.1-1.3B with action modules, conditioned on an image.

What differs from the causal Wan DiT (models/wan_dit.py), per the fixture set's matrixgame.md
($FD_FIXTURES), "The DiT: what differs":
  * the latent is concatenated with `cond_concat` (4 first-frame mask channels + the start
    image's 16-channel latent), so the patch embedding takes 36 channels;
  * there is no text branch: the cross-attention context is `img_emb` of the 257 CLIP tokens
    (the whole context; no separate k_img/v_img branch, unlike Wan2.1-I2V), so the Wan blocks
    are built with the plain cross-attention (WanConfig model_type "t2v", in_dim 36);
  * blocks listed in `action_config["blocks"]` run an ActionModule (models/action_module.py)
    after the cross-attention, with its own mouse and keyboard caches.
Checkpoint keys are the released ones without the `model.` prefix: the Wan keys minus
`text_embedding.*`, plus `img_emb.proj.*` and `blocks.i.action_model.*`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.action_module import ActionConfig, ActionModule
from flashdreams.models.wan_config import I2V_COND_CHANNELS, WanConfig
from flashdreams.models.wan_dit import MLPProj, WanDiT


def wan_config_from_reference(d: Mapping) -> WanConfig:
    """The Wan shape of a Matrix-Game `CausalWanModel` config (model_type 'i2v' there means in_dim 36
    and img_emb, not Wan2.1-I2V's image cross-attention branch)."""
    names = ("patch_size", "in_dim", "dim", "ffn_dim", "freq_dim", "out_dim", "num_heads", "num_layers", "eps")
    known = {k: d[k] for k in names if k in d}
    for flag in ("qk_norm", "cross_attn_norm"):
        if not d.get(flag, True):
            raise InvalidArgumentError(f"Matrix-Game config: {flag}=False is not supported (every release has it)")
    cfg = WanConfig(model_type="t2v", text_len=1, text_dim=1, **known)
    if cfg.in_dim != cfg.out_dim + I2V_COND_CHANNELS:
        raise InvalidArgumentError(f"Matrix-Game config: in_dim must be {cfg.out_dim + I2V_COND_CHANNELS}")
    return cfg


class MatrixGameDiT(WanDiT):
    """WanDiT weights without the text branch, with `img_emb` and the action modules."""

    def __init__(self, cfg: WanConfig, action: ActionConfig, visual_context_dim: int) -> None:
        super().__init__(cfg)
        del self.text_embedding
        self.img_emb = MLPProj(visual_context_dim, cfg.dim)
        if action.img_hidden_size != cfg.dim:
            raise InvalidArgumentError(f"action_config img_hidden_size {action.img_hidden_size} != dim {cfg.dim}")
        bad = [b for b in action.blocks if not 0 <= b < cfg.num_layers]
        if bad:
            raise InvalidArgumentError(f"action_config blocks {bad} are not blocks of a {cfg.num_layers}-layer model")
        self.action_cfg = action
        self.visual_context_dim = visual_context_dim
        for i in action.blocks:
            self.blocks[i].action_model = ActionModule(action)

    @property
    def action_layers(self) -> tuple[int, ...]:
        return self.action_cfg.blocks

    def context_kv(self, visual_context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP tokens [B, T, visual_context_dim] -> cross-attention K, V [layers, B, T, N, d]."""
        c = self.img_emb(visual_context.to(self.dtype))
        kvs = [blk.cross_attn.kv(c) for blk in self.blocks]
        return torch.stack([k for k, _ in kvs]), torch.stack([v for _, v in kvs])

    def step(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        cross_k: torch.Tensor,
        cross_v: torch.Tensor,
        ring_k: torch.Tensor,
        ring_v: torch.Tensor,
        keyboard_k: torch.Tensor,
        keyboard_v: torch.Tensor,
        mouse_k: torch.Tensor | None,
        mouse_v: torch.Tensor | None,
        frame_positions: torch.Tensor,
        slots: torch.Tensor,
        valid_len: torch.Tensor,
        keyboard_win: torch.Tensor,
        mouse_win: torch.Tensor | None,
        valid_len_host: int | None = None,
        trace: dict | None = None,
        fp8_shadow: tuple | None = None,
    ) -> torch.Tensor:
        """One causal forward of a block against all caches (denoising call or cache write).

        x [B, 16, T, h, w]; t [B, T]; cond [B, 20, Nc, h, w], the conditioning of latent frames
        0..Nc-1 (frames past Nc-1 reuse the last one); ring_k/v as WanDiT.forward_step;
        keyboard_k/v [n_action, B, L, A, hd] and mouse_k/v [n_action, B, S, L, A, hd] (one
        entry per action block, or lists), written in place at `slots`; keyboard_win
        [B, T, W, K] and mouse_win [B, T, W, 2]: each latent frame's action window. `fp8_shadow`: the
        ring's fp8 shadow with its key tile (FP8 attention; WanDiT.forward_step).
        Returns the flow [B, 16, T, h, w] float32.
        """
        nc = cond.shape[2]
        c = cond.index_select(2, frame_positions.clamp(max=nc - 1))
        xin = torch.cat([x.to(c.dtype), c], dim=1)
        fs = (x.shape[3] // self.cfg.patch_size[1]) * (x.shape[4] // self.cfg.patch_size[2])
        valid_frames = valid_len // fs
        where = {layer: j for j, layer in enumerate(self.action_layers)}

        def act(layer: int, h: torch.Tensor) -> torch.Tensor:
            j = where.get(layer)
            if j is None:
                return h
            sub = None
            if trace is not None:
                sub = trace.setdefault(f"block{layer}", {})
                sub["action_in"] = h
            out = self.blocks[layer].action_model(
                h,
                frame_positions,
                slots,
                valid_frames,
                keyboard_win,
                mouse_win,
                keyboard_k[j],
                keyboard_v[j],
                mouse_k[j] if mouse_k is not None else None,
                mouse_v[j] if mouse_v is not None else None,
                trace=sub,
                impl=self.attention_impl,
            )
            if sub is not None:
                sub["action_out"] = out
            return out

        return self.forward_step(
            xin,
            t,
            cross_k,
            cross_v,
            ring_k,
            ring_v,
            frame_positions,
            slots,
            valid_len,
            valid_len_host,
            after_cross=act,
            fp8_shadow=fp8_shadow,
        )
