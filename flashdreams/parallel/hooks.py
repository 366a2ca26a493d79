"""The hooks a model family exposes so context parallelism can wrap it without knowing it.

A family that supports context parallel sets `LoadedModel.parallel` to a `ParallelHooks`:
which step graphs run the token-parallel forward (`steps`: graph name -> the graph's forward,
taking the graph's call inputs in order plus the keywords `attend` and `shard`; a model of two
experts has one graph per expert), how many tokens a latent frame has, how many attention heads
there are, which arguments of those graphs take a KV ring and the block's ring positions, and
which state buffers are KV rings (laid out as models/kv_ring.py says: [layers, B, S, N, d],
frame-slot s at rows [s*frame_tokens, (s+1)*frame_tokens), valid rows a prefix). The wrapper
(context_parallel.py) supplies the two hooks:

* `shard` (a `TokenShard`): the forward keeps this rank's rows of every frame of its tokens
  and RoPE tables (`take`), and gathers the head's output back (`gather`);
* `attend(layer, q, k, v) -> out`: q and k after the family's q/k norm and RoPE, v, each
  [B, L, N, d] for this rank's tokens; it writes the block's K/V into this rank's shard of the
  layer's ring and attends (Ulysses: all-to-all over heads; ring: LSE-merged partials).

Nothing here imports torch.distributed, the runtime or a family: families import this module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

# attend(layer, q, k, v) -> out: all [B, L, N, d] (see the module doc).
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ParallelHooks:
    """What a family gives context parallelism (see the module doc).

    `steps[g](*args, attend=..., shard=...)` runs graph `g` with the hooks. In every such graph the
    arguments `kv_args` = (keys, values) take a KV ring and `ring_args` = (slots, valid_len) the
    block's frame slots and the ring's valid length (device tensors). `kv_rings` names every state
    buffer the plan passes there (one pair per expert), each sharded along `token_dim` (ring mode:
    each frame-slot keeps frame_tokens/P rows) or `head_dim` (Ulysses: N/P heads).
    `broadcast` names graphs whose call inputs rank 0 sends to all (the prompt encoder: every
    rank must attend to the same text). `attention` is the family's attention implementation
    ("sdpa" or "triton", as models/dit_ops names them). Rank 0's `LoadedModel.weights` are
    broadcast, so all ranks hold the same weights.
    """

    steps: Mapping[str, Callable[..., torch.Tensor]] = field(repr=False)
    frame_tokens: int
    num_heads: int
    kv_rings: tuple[str, ...]
    kv_args: tuple[str, str] = ("ring_k", "ring_v")
    ring_args: tuple[str, str] = ("slots", "valid_len")
    broadcast: tuple[str, ...] = ()
    attention: str = "sdpa"
    token_dim: int = 2
    head_dim: int = 3


@dataclass(frozen=True)
class TokenShard:
    """Rank `index` of `count`: rows [index*c, (index+1)*c) of every frame, c = frame_tokens / count.

    `gather_fn(y)` all-gathers a local tensor [*s] into [count, *s] (rank i's in row i).
    """

    index: int
    count: int
    gather_fn: Callable[[torch.Tensor], torch.Tensor]

    def take(self, x: torch.Tensor, frame_tokens: int, dim: int = 1) -> torch.Tensor:
        """This rank's rows of every frame of x, whose `dim` holds frames * frame_tokens tokens (frame-major)."""
        c = frame_tokens // self.count
        return x.unflatten(dim, (-1, frame_tokens)).narrow(dim + 1, self.index * c, c).flatten(dim, dim + 1)

    def gather(self, y: torch.Tensor, frame_tokens: int) -> torch.Tensor:
        """y [B, F*c, O] on every rank -> [B, F*frame_tokens, O], every frame's rows back in order."""
        c = frame_tokens // self.count
        g = self.gather_fn(y)  # [P, B, F*c, O]
        return g.unflatten(2, (-1, c)).permute(1, 2, 0, 3, 4).flatten(1, 3)
