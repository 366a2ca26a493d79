"""Step backends: what a session calls to run the model's step graphs.

A backend exposes the steps of a streaming Wan model (`encode_prompt`, `denoise`,
`commit`) as functions of device tensors. `EagerBackend` runs the torch modules as
they are; compiled backends (flashdreams.export) replay built graphs with the same
signatures, so one session loop serves both.
"""

from __future__ import annotations

from typing import Protocol

import torch

from flashdreams.models.wan_dit import WanDiT


class StepBackend(Protocol):
    name: str
    num_layers: int
    num_heads: int
    head_dim: int
    text_len: int
    dtype: torch.dtype
    device: torch.device

    def encode_prompt(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def denoise(self, x, t, cross_k, cross_v, ring_k, ring_v, frame_positions, slots, valid_len) -> torch.Tensor: ...

    def commit(self, x, t, cross_k, cross_v, ring_k, ring_v, frame_positions, slots, valid_len) -> None: ...


class EagerBackend:
    """The torch modules as they are: the reference path and what CPU tests use."""

    name = "eager"

    def __init__(self, model: WanDiT) -> None:
        self.model = model
        cfg = model.cfg
        self.num_layers, self.num_heads, self.head_dim = cfg.num_layers, cfg.num_heads, cfg.head_dim
        self.text_len = cfg.text_len
        self.dtype = model.dtype
        self.device = model.patch_embedding.weight.device

    @torch.no_grad()
    def encode_prompt(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.cross_kv(context.to(self.device))

    @property
    def shape_specialized(self) -> bool:
        """True when calls depend on the host-known fill level (torch attention slices the ring);
        the session then keys its captured graphs by fill level."""
        return self.model.attention_impl == "sdpa"

    @torch.no_grad()
    def denoise(self, x, t, *state, valid_len_host: int | None = None) -> torch.Tensor:
        return self.model.forward_step(x, t, *state, valid_len_host=valid_len_host)

    @torch.no_grad()
    def commit(self, x, t, *state, valid_len_host: int | None = None) -> None:
        # The output is discarded: the call exists to rewrite the block's K/V with clean values.
        self.model.forward_step(x, t, *state, valid_len_host=valid_len_host)
