"""FlashVSR's DiT: the Wan2.1 DiT with LQ features added before blocks and LCSA sparse self-attention.

One call per chunk (`forward_chunk`), one step, t = 1000 for every token. The weights and the
blocks are `WanDiT`'s (the released `diffusion_pytorch_model_streaming_dmd.safetensors` uses
Wan keys); only the self-attention's policy differs, and it comes in through `WanBlock`'s
`attend` hook: tokens live in windows of 2 frames x 8 x 8 (128) for the whole chunk (reordered
once after the patch embedding, back once before the head), so after the q/k RMSNorm and RoPE the
keys are the cached windows plus the current ones as they are, the block mask is chosen per head
from window means (kernels/block_sparse_attention.py), and attention runs over the selected
windows only.

The K/V cache is a ring of R = C + 1 slabs per layer (a slab = the windows of one frame pair;
C = the slabs the reference keeps, `kv_ratio` as it trims its `pre_cache_k/v`): chunk 0 writes
slabs 0..2, chunk k >= 1 writes its slab at slot (k + 2) mod R, over the oldest, and attends to
the slots filled so far. The reference concatenates [cache (oldest first), current] and drops
the oldest slab afterwards; attention and the top-k selection (a threshold on values) do not
depend on the key order, so the ring computes the same thing without moving the cache, and a
retried chunk rewrites exactly the slot it wrote before (no snapshot needed). `ring_order`
gives the reference's key order of a chunk's slots (to compare block masks).
"""

from __future__ import annotations

from functools import partial

import torch

from flashdreams.errors import InvalidArgumentError
from flashdreams.kernels.block_sparse_attention import (
    block_sparse_attention,
    block_sparse_attention_reference,
    select_blocks,
)
from flashdreams.models import dit_ops
from flashdreams.models.rope import rope_tables
from flashdreams.models.wan_dit import WanDiT

WINDOW = (2, 8, 8)  # frames, token rows, token columns of one attention window
WINDOW_TOKENS = WINDOW[0] * WINDOW[1] * WINDOW[2]
TIMESTEP = 1000.0  # the one-step model is always conditioned on t = 1000
ATTENTION_MODES = ("sparse", "dense")


def to_windows(x: torch.Tensor, f: int, h: int, w: int) -> torch.Tensor:
    """Tokens [B, f*h*w, N, d] in (frame, row, col) order -> window order, same shape."""
    b, _, n, d = x.shape
    wf, wh, ww = WINDOW
    x = x.reshape(b, f // wf, wf, h // wh, wh, w // ww, ww, n * d).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, f * h * w, n, d)


def from_windows(x: torch.Tensor, f: int, h: int, w: int) -> torch.Tensor:
    """The inverse of `to_windows`."""
    b, _, n, d = x.shape
    wf, wh, ww = WINDOW
    x = x.reshape(b, f // wf, h // wh, w // ww, wf, wh, ww, n * d).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, f * h * w, n, d)


def _window_rows(x: torch.Tensor, f: int, h: int, w: int) -> torch.Tensor:
    """Per-token rows [B, L, D] or a table [L, D] in (frame, row, col) order -> window order."""
    if x.dim() == 2:
        return to_windows(x[None, :, None], f, h, w)[0, :, 0]
    return to_windows(x.unsqueeze(2), f, h, w).squeeze(2)


def cache_slabs_after(cache_in: int, new_slabs: int, kv_len: int) -> int:
    """Slabs the reference keeps after a call: all of them, less the oldest once more than kv_len."""
    total = cache_in + new_slabs
    return total - 1 if total > kv_len else total


FIRST_SLABS = 3  # chunk 0: 6 latent frames


def chunk_slot(chunk: int, ring_slabs: int) -> int:
    """The ring slot chunk k >= 1 writes (chunk 0 fills slots 0, 1, 2)."""
    return (chunk + FIRST_SLABS - 1) % ring_slabs


def ring_order(chunk: int, ring_slabs: int, valid_slabs: int) -> list[int]:
    """The slots of chunk `chunk`'s keys in the reference's order: cached slabs oldest first, then its own."""
    if chunk == 0 or valid_slabs < ring_slabs:  # the ring has not wrapped: slot order is time order
        return list(range(valid_slabs))
    newest = chunk_slot(chunk, ring_slabs)
    return [(newest + 1 + i) % ring_slabs for i in range(ring_slabs)]


def lcsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid_hw: tuple[int, int],
    topk: int,
    local_range: int,
    mode: str,
    impl: str,
    record: list | None = None,
    kernel: str = "triton",
) -> torch.Tensor:
    """Window-ordered q [B, Lq, N, d] over window-ordered k/v [B, Lk, N, d]: LCSA or dense.
    With impl "triton", `kernel` "fa4" runs the selected windows through FlashAttention-4's
    block-sparse kernel instead of ours (the model's `set_attention("fa4")`)."""
    if mode == "dense":  # full attention over every cached and current token (the reference's 'dense')
        return dit_ops.attention(q, k, v)
    mask = select_blocks(q, k, WINDOW_TOKENS, grid_hw, local_range, topk)
    if record is not None:
        record.append(mask)
    if impl == "triton" and kernel == "fa4":
        from flashdreams.kernels import fa4_attention

        return fa4_attention.block_sparse_attention_fa4(q, k, v, mask, WINDOW_TOKENS)
    if impl == "triton":
        return block_sparse_attention(q, k, v, mask, WINDOW_TOKENS)
    return block_sparse_attention_reference(q, k, v, mask, WINDOW_TOKENS)


def forward_chunk(
    model: WanDiT,
    x: torch.Tensor,
    lq_features: list[torch.Tensor],
    cross_k: torch.Tensor,
    cross_v: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    frame_positions: torch.Tensor,
    *,
    slot: torch.Tensor | None,
    valid_slabs: int,
    topk: int,
    local_range: int,
    mode: str = "sparse",
    masks: list | None = None,
) -> torch.Tensor:
    """One chunk through the DiT; returns the flow [B, 16, f, H, W] float32.

    x [B, 16, f, H, W] (f even, H/2 and W/2 multiples of 8); lq_features: one [B, L, D] per fed
    block (added before it); cross_k/v [layers, B, T, N, d]; cache_k/v [layers, B, R*slab, N, d]
    (or a list of per-layer [B, R*slab, N, d]): the ring. `slot` None is chunk 0 (its slabs go
    to slots 0..2); else an int64 tensor [1] with the slot this chunk's slab goes to. Attention
    reads ring slots [0, valid_slabs) (host-known per block kind). frame_positions int64 [f].
    `masks`, if a list, receives every block's selection [B, N, nq, nk] in ring slot order.
    """
    if mode not in ATTENTION_MODES:
        raise InvalidArgumentError(f"attention mode '{mode}' is unknown; choose one of {ATTENTION_MODES}")
    tokens, (f, h, w) = model.embed_tokens(x)
    if f % WINDOW[0] or h % WINDOW[1] or w % WINDOW[2]:
        raise InvalidArgumentError(
            f"FlashVSR DiT: the token grid {f}x{h}x{w} must split into 2x8x8 windows "
            "(an even frame count, output height and width multiples of 128)"
        )
    b = x.shape[0]
    t = torch.full((b, 1), TIMESTEP, device=x.device)
    e, e0 = model.time_embed(t)
    # The blocks run on tokens in window order, so attention needs no reordering per layer (four
    # layout copies a layer otherwise: 56 ms of a 768x1408 chunk on the H200). Every per-token
    # operation of a block is order-free, and one timestep for every token makes the modulation one
    # row for all of them; only RoPE's tables, the LQ features and the head see positions.
    e, e0 = e.expand(b, f, -1), e0[:, :1]
    cos, sin = (_window_rows(table, f, h, w) for table in rope_tables(frame_positions, h, w, model.cfg.head_dim))
    slab = (h // WINDOW[1]) * (w // WINDOW[2]) * WINDOW_TOKENS
    n_new = f * h * w
    # The ring slots this chunk's slabs go to (a slab's windows are consecutive in window order).
    slots = torch.arange(f // WINDOW[0], device=x.device) if slot is None else slot.reshape(1)
    keys = n_new if slot is None else valid_slabs * slab
    impl = model.attention_impl
    grid = (h // WINDOW[1], w // WINDOW[2])

    def attend(q, k, v, sa, layer):
        ring_k, ring_v = cache_k[layer], cache_v[layer]
        # q/k RMSNorm, RoPE and the ring write of k and v in one pass (our kernel with impl "triton").
        qr = dit_ops.qk_norm_rope_cache_write(q, k, v, sa, cos, sin, ring_k, ring_v, slots, slab, impl)
        return lcsa_attention(
            qr, ring_k[:, :keys], ring_v[:, :keys], grid, topk, local_range, mode, impl, masks, model.ring_kernel
        )

    tokens = _window_rows(tokens, f, h, w)
    for i, blk in enumerate(model.blocks):
        if i < len(lq_features):
            tokens = tokens + _window_rows(lq_features[i], f, h, w).to(tokens.dtype)
        tokens = blk(tokens, e0, partial(attend, layer=i), cross_k[i], cross_v[i], impl)
    tokens = from_windows(tokens.unsqueeze(2), f, h, w).squeeze(2)
    return model.unpatchify(model.head(tokens, e), (f, h, w))


def cross_kv(model: WanDiT, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-attention cache of the fixed prompt tensor, used as given (FlashVSR does not pad it)."""
    c = model.text_embedding(context.to(model.dtype))
    kvs = [blk.cross_attn.kv(c) for blk in model.blocks]
    return torch.stack([k for k, _ in kvs]), torch.stack([v for _, v in kvs])


def chunk_frame_positions(chunk: int, frames: int, device=None) -> torch.Tensor:
    """RoPE frame positions of chunk `chunk`: 0..5 for chunk 0, then 4+2k, 5+2k (the reference's offsets)."""
    start = 0 if chunk == 0 else 4 + 2 * chunk
    return torch.arange(start, start + frames, device=device)
