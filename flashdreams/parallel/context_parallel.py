"""Context parallel: one session's block split over the GPUs of a host, tokens within each frame.

Rank r of P takes token rows [r*fs/P, (r+1)*fs/P) of every frame of the block (fs tokens a
frame), so its shard stays frame-major, [B, F*fs/P, D]: the per-frame modulation, the
norms, the linears, the cross-attention and the FFN run on it unchanged, with the RoPE
tables sliced the same way. Only the self-attention needs the other ranks' tokens:

* `ulysses` (DeepSpeed-Ulysses): after q/k norm + RoPE on the shard, one all-to-all turns
  q, k, v [B, L/P, N, d] into [B, L, N/P, d]: all tokens, N/P heads. The rank's ring keeps
  every token for its heads, [layers, B, S, N/P, d]; attention over the valid prefix is
  the single-GPU one; a second all-to-all brings the output back to the token shard.
  Needs N % P == 0.
* `ring`: the rank's ring keeps its token shard of every frame, [layers, B, S/P, N, d]
  (fs/P rows a frame-slot). Each rank attends to its own ring shard and the partial
  outputs are merged exactly by their log-sum-exp (fp32). Two ways to meet:
  `ring_pass="q"` (default) all-gathers the block's queries, every rank attends all of
  them to its shard, and one all-to-all returns each partial (+ LSE) to the rank that
  owns the query; `ring_pass="kv"` keeps the queries and rotates K/V shards around the
  ranks in P-1 send/recv rounds (the classic ring attention), overlapping each round with
  the attention of the previous one. A streaming step has few queries (one block) and
  many keys (the whole cache: 21 frames against 3), so passing q moves ~S/Lq times fewer
  bytes than passing K/V and needs two collectives instead of P-1 dependent rounds.

The head's output shards are all-gathered, so every rank returns the same full flow and
runs the same sampler math; with identically seeded session generators the ranks stay in
lock step (rank 0 alone decodes and hands out frames). Nothing reads a device value back
to the host: valid lengths stay device tensors, collectives are enqueued like kernels.
"""

from __future__ import annotations

import logging
from functools import partial

import torch

from flashdreams.errors import InvalidArgumentError
from flashdreams.models import dit_ops
from flashdreams.models.kv_ring import KVRing, RingSpec
from flashdreams.models.rope import apply_rope, rope_tables
from flashdreams.models.wan_dit import WanDiT
from flashdreams.parallel.comm import Comm

log = logging.getLogger(__name__)

MODES = ("ulysses", "ring")
RING_PASSES = ("q", "kv")
_SCORE_BYTES = 1 << 30  # the torch LSE attention works in query chunks of at most this many fp32 scores
_FLASH_LSE = True  # torch's CUDA flash attention (returns its LSE); switched off if this build refuses it


# ----------------------------------------------------------------------------- shape checks


def check_token_shardable(frame_seq_length: int, world_size: int) -> int:
    """Tokens per frame and rank; raises unless every rank gets the same rows of every frame."""
    if world_size < 1 or frame_seq_length % world_size:
        raise InvalidArgumentError(
            f"context parallel: a frame's {frame_seq_length} tokens cannot be split evenly over {world_size} "
            "ranks; pick a resolution whose (latent_h/2)*(latent_w/2) is divisible by the GPU count "
            "(480x832: 1560 tokens, fine for 1, 2, 3, 4, 5, 6, 8)"
        )
    return frame_seq_length // world_size


def check_head_shardable(num_heads: int, world_size: int, mode: str = "ulysses") -> int:
    """Heads per rank for Ulysses; raises unless the heads split evenly."""
    if world_size < 1 or num_heads % world_size:
        raise InvalidArgumentError(
            f"context parallel '{mode}': the model's {num_heads} attention heads cannot be split evenly over "
            f"{world_size} ranks; use a GPU count that divides {num_heads}, or mode='ring' (no head constraint)"
        )
    return num_heads // world_size


# ----------------------------------------------------------------------------- attention with LSE


def _torch_attention_lse(q, k, v, valid_len, valid_len_host=None, scale=None):
    """softmax(q k^T * scale) v over keys [0, valid_len), in fp32, with its natural-log LSE.

    q [B, Lq, N, d], k/v [B, S, N, d] -> out [B, Lq, N, d] float32, lse [B, N, Lq] float32.
    Plain torch (no custom ops): the CPU path and the reference for the others.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    keep = None
    if valid_len_host is not None:
        k, v = k[:, :valid_len_host], v[:, :valid_len_host]
    else:
        keep = torch.arange(k.shape[1], device=q.device) < valid_len.reshape(())  # [S], stays on the device
    kf = k.float().transpose(1, 2)  # [B, N, S, d]
    vf = v.float().transpose(1, 2)
    if keep is not None:  # rows past valid_len may hold anything: never let them into a product
        vf = torch.where(keep[:, None], vf, 0.0)
    qf = q.float().transpose(1, 2)  # [B, N, Lq, d]
    b, n, lq, _ = qf.shape
    step = max(1, _SCORE_BYTES // max(1, 4 * b * n * kf.shape[2]))
    outs, lses = [], []
    for lo in range(0, lq, step):
        s = torch.matmul(qf[:, :, lo : lo + step], kf.transpose(-1, -2)) * scale
        if keep is not None:
            s = s.masked_fill(~keep, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.matmul(torch.exp(s - lse[..., None]), vf))
        lses.append(lse)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    lse = lses[0] if len(lses) == 1 else torch.cat(lses, dim=2)
    return out.transpose(1, 2), lse


def attention_lse(q, k, v, valid_len, valid_len_host=None, impl="sdpa"):
    """Attention of q [B, Lq, N, d] over rows [0, valid_len) of k/v [B, S, N, d], plus its LSE [B, N, Lq].

    `impl="triton"` uses the FlashDreams ring-attention kernel (`return_lse=True`); on CUDA
    with a host-known length and half precision, torch's flash attention (which returns
    its LSE); otherwise the plain-torch version. Outputs: out (q's dtype or fp32), lse fp32.
    """
    if impl == "triton":
        from flashdreams import kernels

        return kernels.ring_attention(q, k, v, valid_len.reshape(1), return_lse=True)
    global _FLASH_LSE
    if (
        _FLASH_LSE
        and q.is_cuda
        and valid_len_host is not None
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] <= 256
        and q.shape[-1] % 8 == 0
    ):
        try:
            res = torch.ops.aten._scaled_dot_product_flash_attention(
                q.transpose(1, 2),
                k[:, :valid_len_host].transpose(1, 2),
                v[:, :valid_len_host].transpose(1, 2),
                scale=q.shape[-1] ** -0.5,
            )
            return res[0].transpose(1, 2), res[1][..., : q.shape[1]].float()
        except RuntimeError as exc:  # raised at the eager warm-up, before any graph capture
            _FLASH_LSE = False
            log.warning("torch flash attention with LSE unavailable (%s); using the plain torch path", exc)
    return _torch_attention_lse(q, k, v, valid_len, valid_len_host)


def merge_partials(parts: torch.Tensor, lses: torch.Tensor, impl: str = "sdpa") -> torch.Tensor:
    """Attention over the union of P disjoint key sets from each set's output and LSE.

    parts [P, B, Lq, N, d] (each normalised over its own keys), lses [P, B, N, Lq] fp32;
    returns [B, Lq, N, d] in the parts' dtype, merged in fp32.
    """
    if impl == "triton":
        from flashdreams import kernels

        return kernels.merge_attention(parts.contiguous(), lses.contiguous())[0]
    lse = torch.logsumexp(lses, dim=0)  # [B, N, Lq]
    w = torch.exp(lses - lse).transpose(2, 3).unsqueeze(-1)  # [P, B, Lq, N, 1]
    return (parts.float() * w).sum(0).to(parts.dtype)


def _merge_online(acc_out, acc_lse, out, lse):
    """Fold one partial (out [B, Lq, N, d], lse [B, N, Lq]) into the fp32 running pair."""
    out, lse = out.float(), lse.float()
    if acc_out is None:
        return out, lse
    new = torch.logaddexp(acc_lse, lse)
    wa = torch.exp(acc_lse - new).transpose(1, 2).unsqueeze(-1)
    wb = torch.exp(lse - new).transpose(1, 2).unsqueeze(-1)
    return acc_out * wa + out * wb, new


# ----------------------------------------------------------------------------- the backend


class ContextParallelBackend:
    """A StepBackend that runs each block split over the ranks of `group` (see the module doc).

    `model` must hold the same weights on every rank (`broadcast_weights()` makes sure).
    `mode` is "ulysses" or "ring"; `ring_pass` ("q" or "kv") picks how the ring mode's
    ranks meet. `slice_ring` (default: with torch attention) takes the host-known fill
    level per call, like `EagerBackend`; off, every call masks, so one graph serves all.
    """

    def __init__(
        self,
        model: WanDiT,
        group=None,
        mode: str = "ulysses",
        ring_pass: str = "q",
        all_to_all: str = "auto",
        slice_ring: bool | None = None,
    ) -> None:
        if mode not in MODES:
            raise InvalidArgumentError(f"context parallel mode '{mode}' is unknown; choose one of {MODES}")
        if ring_pass not in RING_PASSES:
            raise InvalidArgumentError(f"ring_pass '{ring_pass}' is unknown; choose one of {RING_PASSES}")
        self.comm = Comm(group, all_to_all)
        self.world_size, self.rank = self.comm.size, self.comm.rank
        cfg = model.cfg
        if mode == "ulysses":
            check_head_shardable(cfg.num_heads, self.world_size, mode)
        self.model = model
        self.mode, self.ring_pass = mode, ring_pass
        self.num_layers, self.num_heads, self.head_dim = cfg.num_layers, cfg.num_heads, cfg.head_dim
        self.text_len = cfg.text_len
        self.dtype = model.dtype
        self.device = model.patch_embedding.weight.device
        self.name = f"cp-{mode}" + (f"-{ring_pass}" if mode == "ring" else "") + f"x{self.world_size}"
        self._slice_ring = slice_ring

    # -- setup ----------------------------------------------------------------------------
    @property
    def shape_specialized(self) -> bool:
        """True when calls take the host-known fill level (torch attention slicing the ring)."""
        if self._slice_ring is not None:
            return self._slice_ring
        return self.model.attention_impl == "sdpa"

    def new_ring(self, spec: RingSpec, batch: int) -> KVRing:
        """This rank's part of the ring: all tokens of its heads (Ulysses) or its token rows (ring)."""
        c = check_token_shardable(spec.frame_seq_length, self.world_size)
        if self.mode == "ulysses":
            n = self.num_heads // self.world_size
            return KVRing(spec, self.num_layers, batch, n, self.head_dim, self.device, self.dtype)
        local = RingSpec(spec.sink_frames, spec.window_frames, c)
        return KVRing(local, self.num_layers, batch, self.num_heads, self.head_dim, self.device, self.dtype)

    @torch.no_grad()
    def broadcast_weights(self, src: int = 0) -> None:
        """Copy group rank `src`'s parameters and buffers to every rank (weights must agree)."""
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            self.comm.broadcast_(t.data, src)

    # -- steps ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-attention cache, from rank 0's prompt (so every rank attends to the same text)."""
        context = context.to(device=self.device, dtype=self.dtype).clone()  # broadcast writes in place
        shape = torch.tensor(context.shape, dtype=torch.int64, device=self.device)
        shapes = self.comm.all_gather(shape).cpu()  # setup, not a step: a host read is fine here
        if not bool((shapes == shapes[0]).all()):
            raise InvalidArgumentError(
                f"context parallel: the ranks were given prompts of different shapes {shapes.tolist()}; "
                "give every rank the same prompt_embeds"
            )
        self.comm.broadcast_(context, 0)
        return self.model.cross_kv(context)

    @torch.no_grad()
    def denoise(self, x, t, *state, valid_len_host: int | None = None) -> torch.Tensor:
        return self.forward_step(x, t, *state, valid_len_host=valid_len_host)

    @torch.no_grad()
    def commit(self, x, t, *state, valid_len_host: int | None = None) -> None:
        # The call only rewrites the block's K/V (this rank's part) with clean values: no head, no gather.
        self.forward_step(x, t, *state, valid_len_host=valid_len_host, need_output=False)

    def forward_step(
        self,
        x,
        t,
        cross_k,
        cross_v,
        ring_k,
        ring_v,
        frame_positions,
        slots,
        valid_len,
        valid_len_host=None,
        need_output: bool = True,
    ) -> torch.Tensor | None:
        """`WanDiT.forward_step` on this rank's token shard; returns the full flow [B, C, nf, H, W] fp32.

        With `need_output=False` (the commit) it stops after the blocks have written the ring.
        """
        m, p, r = self.model, self.world_size, self.rank
        tokens, grid = m.embed_tokens(x)
        nf, gh, gw = grid
        fs = gh * gw
        c = check_token_shardable(fs, p)
        self._check_ring(ring_k, ring_v, x.shape[0], fs)
        rows = slice(r * c, (r + 1) * c)
        tokens = tokens.unflatten(1, (nf, fs))[:, :, rows].flatten(1, 2)  # [B, nf*c, D], frame-major
        e, e0 = m.time_embed(t)
        cos, sin = rope_tables(frame_positions, gh, gw, m.cfg.head_dim)
        cos = cos.unflatten(0, (nf, fs))[:, rows].flatten(0, 1)
        sin = sin.unflatten(0, (nf, fs))[:, rows].flatten(0, 1)
        impl = m.attention_impl
        if self.mode == "ulysses":
            # Ring rows of the gathered tokens, in all-to-all order (source rank, frame, row).
            dev = slots.device
            src = torch.arange(p, device=dev).view(p, 1, 1) * c
            ring_rows = (slots.view(1, nf, 1) * fs + src + torch.arange(c, device=dev).view(1, 1, c)).reshape(-1)
            attend = partial(self._attend_ulysses, cos=cos, sin=sin, rows=ring_rows, valid=valid_len)
            host = valid_len_host
        else:
            # Every frame holds c rows on every rank, so the local valid prefix is valid_len / P.
            local_valid = torch.div(valid_len, p, rounding_mode="floor")
            host = None if valid_len_host is None else valid_len_host // p
            attend = partial(self._attend_ring, cos=cos, sin=sin, slots=slots, fs_local=c, valid=local_valid)
        for i, blk in enumerate(m.blocks):
            fn = partial(attend, ring_k=ring_k[i], ring_v=ring_v[i], host=host)
            tokens = blk(tokens, e0, fn, cross_k[i], cross_v[i], impl)
        if not need_output:
            return None
        y = self.comm.all_gather(m.head(tokens, e))  # [P, B, nf*c, O]
        y = y.unflatten(2, (nf, c)).permute(1, 2, 0, 3, 4).flatten(1, 3)  # [B, nf*fs, O] in (f, h, w) order
        return m.unpatchify(y, grid)

    def _check_ring(self, ring_k: torch.Tensor, ring_v: torch.Tensor, batch: int, fs: int) -> None:
        """The ring must be this backend's shard (from `new_ring`), not a full single-GPU ring."""
        p = self.world_size
        if self.mode == "ulysses":
            heads, rows_per_frame = self.num_heads // p, fs
        else:
            heads, rows_per_frame = self.num_heads, fs // p
        for name, ring in (("ring_k", ring_k), ("ring_v", ring_v)):
            ok = (
                ring.dim() == 5
                and ring.shape[0] == self.num_layers
                and ring.shape[1] == batch
                and ring.shape[2] % rows_per_frame == 0
                and ring.shape[3] == heads
                and ring.shape[4] == self.head_dim
            )
            if not ok:
                raise InvalidArgumentError(
                    f"context parallel '{self.mode}' x{p}: {name} has shape {tuple(ring.shape)}; expected "
                    f"[{self.num_layers}, {batch}, frames*{rows_per_frame}, {heads}, {self.head_dim}] "
                    "(allocate it with backend.new_ring)"
                )

    # -- self-attention, Ulysses ------------------------------------------------------------
    def _attend_ulysses(self, q, k, v, sa, *, ring_k, ring_v, host, cos, sin, rows, valid):
        p = self.world_size
        qr = apply_rope(sa.heads(sa.norm_q(q)), cos, sin)
        kr = apply_rope(sa.heads(sa.norm_k(k)), cos, sin)
        qkv = torch.stack([qr, kr, sa.heads(v).to(qr.dtype)])  # [3, B, Lc, N, d]
        _, b, lc, n, d = qkv.shape
        nl = n // p
        send = qkv.unflatten(3, (p, nl)).permute(3, 0, 1, 2, 4, 5)  # [P, 3, B, Lc, N/P, d]: row j to rank j
        got = self.comm.all_to_all(send)  # row i: rank i's tokens, this rank's heads
        qg, kg, vg = got.permute(1, 2, 0, 3, 4, 5).reshape(3, b, p * lc, nl, d).unbind(0)
        ring_k.index_copy_(1, rows, kg.to(ring_k.dtype))
        ring_v.index_copy_(1, rows, vg.to(ring_v.dtype))
        out = dit_ops.ring_attention(qg, ring_k, ring_v, valid, self.model.attention_impl, host)  # [B, P*Lc, N/P, d]
        back = self.comm.all_to_all(out.unflatten(1, (p, lc)).transpose(0, 1))  # row j: my tokens, heads of j
        return back.permute(1, 2, 0, 3, 4).reshape(b, lc, n, d)

    # -- self-attention, ring ---------------------------------------------------------------
    def _attend_ring(self, q, k, v, sa, *, ring_k, ring_v, host, cos, sin, slots, fs_local, valid):
        impl = self.model.attention_impl
        qr = dit_ops.qk_norm_rope_cache_write(q, k, v, sa, cos, sin, ring_k, ring_v, slots, fs_local, impl)
        if self.world_size == 1:
            return attention_lse(qr, ring_k, ring_v, valid, host, impl)[0].to(qr.dtype)
        if self.ring_pass == "q":
            return self._pass_q(qr, ring_k, ring_v, valid, host, impl)
        return self._pass_kv(qr, ring_k, ring_v, valid, host, impl)

    def _pass_q(self, q, ring_k, ring_v, valid, host, impl):
        """All queries meet this rank's keys; each partial (+ LSE) goes back to its query's rank."""
        p = self.world_size
        b, lc, n, d = q.shape
        q_all = self.comm.all_gather(q).transpose(0, 1).reshape(b, p * lc, n, d)  # [B, P*Lc, N, d], rank-major
        out, lse = attention_lse(q_all, ring_k, ring_v, valid, host, impl)
        parts = out.to(q.dtype).unflatten(1, (p, lc)).transpose(0, 1)  # [P, B, Lc, N, d]: row j = rank j's queries
        lses = lse.float().unflatten(2, (p, lc)).permute(2, 0, 1, 3)  # [P, B, N, Lc]
        return merge_partials(self.comm.all_to_all(parts), self.comm.all_to_all(lses), impl)

    def _pass_kv(self, q, ring_k, ring_v, valid, host, impl):
        """Classic ring attention: K/V shards travel rank to rank, merged online by their LSE."""
        if host is not None:
            ring_k, ring_v = ring_k[:, :host], ring_v[:, :host]
        kv = torch.stack([ring_k, ring_v])  # [2, B, S_valid, N, d]: the buffer that travels
        spare = torch.empty_like(kv)
        acc_out = acc_lse = None
        for step in range(self.world_size):
            works = self.comm.ring_shift_start(kv, spare) if step + 1 < self.world_size else []
            out, lse = attention_lse(q, kv[0], kv[1], valid, host, impl)
            acc_out, acc_lse = _merge_online(acc_out, acc_lse, out, lse)
            self.comm.wait(works)
            kv, spare = spare, kv
        return acc_out.to(q.dtype)


__all__ = [
    "MODES",
    "RING_PASSES",
    "ContextParallelBackend",
    "attention_lse",
    "check_head_shardable",
    "check_token_shardable",
    "merge_partials",
]
