"""Context parallel: one session's block split over the GPUs of a host, tokens within each frame.

A wrapper over a family's hooks (hooks.py), not a copy of its forward: the family's own
graph runs with a `TokenShard` and a sharded `attend`. Rank r of P takes token rows
[r*fs/P, (r+1)*fs/P) of every frame of the block (fs tokens a frame), so its shard stays
frame-major, [B, F*fs/P, D]: the per-frame modulation, the norms, the linears, the
cross-attention and the FFN run on it unchanged, with the RoPE tables sliced the same way.
Only the self-attention needs the other ranks' tokens:

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

import dataclasses
import logging

import torch

from flashdreams.errors import InvalidArgumentError
from flashdreams.models import dit_ops
from flashdreams.models.family import BlockPlan
from flashdreams.parallel.comm import Comm
from flashdreams.parallel.hooks import AttendFn, ParallelHooks, TokenShard

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


# ----------------------------------------------------------------------------- the plan of one rank


def shard_plan(plan: BlockPlan, hooks: ParallelHooks, mode: str, world_size: int) -> BlockPlan:
    """`plan` with each KV-ring state decl reshaped to one rank's shard, so a session allocates that.

    Ulysses keeps every token of N/P heads (the head dim divided), ring mode every head of
    frame_tokens/P rows per frame-slot (the token dim divided). Nothing else changes.
    """
    check_mode(mode)
    if not hooks.kv_rings:
        raise InvalidArgumentError(
            f"context parallel: the '{plan.family}' hooks name no KV ring; context parallel shards a streaming "
            "model's KV ring"
        )
    if plan.ring is not None and hooks.frame_tokens != plan.ring.frame_tokens:
        raise InvalidArgumentError(
            f"context parallel: the hooks say {hooks.frame_tokens} tokens a frame, the plan's ring "
            f"{plan.ring.frame_tokens}; the family's hooks and plan disagree"
        )
    check_token_shardable(hooks.frame_tokens, world_size)
    dim = hooks.head_dim if mode == "ulysses" else hooks.token_dim
    if mode == "ulysses":
        check_head_shardable(hooks.num_heads, world_size, mode)
    state = dict(plan.state)
    for name in hooks.kv_rings:
        decl = state.get(name)
        if decl is None:
            raise InvalidArgumentError(
                f"context parallel: the hooks name the KV ring '{name}', which is not a state buffer of the "
                f"'{plan.family}' plan (state: {sorted(state)})"
            )
        shape = list(decl.shape)
        if len(shape) <= dim or shape[dim] % world_size:
            raise InvalidArgumentError(
                f"context parallel '{mode}': KV ring '{name}' {list(decl.shape)} cannot be split over "
                f"{world_size} ranks along dim {dim}"
            )
        shape[dim] //= world_size
        what = "heads" if mode == "ulysses" else "token rows"
        state[name] = dataclasses.replace(
            decl, shape=tuple(shape), meaning=f"{decl.meaning} (this rank's {what}, 1/{world_size})"
        )
    meta = {**plan.meta, "context_parallel": {"mode": mode, "world_size": world_size}}
    return dataclasses.replace(plan, state=state, meta=meta)


def check_mode(mode: str, ring_pass: str = "q") -> None:
    if mode not in MODES:
        raise InvalidArgumentError(f"context parallel mode '{mode}' is unknown; choose one of {MODES}")
    if ring_pass not in RING_PASSES:
        raise InvalidArgumentError(f"ring_pass '{ring_pass}' is unknown; choose one of {RING_PASSES}")


# ----------------------------------------------------------------------------- the backend


class ContextParallelBackend:
    """A graph backend that runs the family's hooked graphs split over the ranks of `group`.

    `base` is the family's eager backend (the same graphs); `plan` is this rank's plan
    (`shard_plan`). Calls to a graph of `hooks.steps` run its step with this rank's `TokenShard`
    and the sharded attention; every other graph runs on `base` unchanged (rank 0's inputs first
    for the graphs in `hooks.broadcast`). `slice_ring` (default: as `base`, i.e. with torch
    attention) slices the ring to the host-known fill level where the plan's ring rule gives it
    (a plan without one, like Wan2.2's, always masks); off, every call masks.
    """

    def __init__(
        self,
        base,
        hooks: ParallelHooks,
        plan: BlockPlan,
        group=None,
        mode: str = "ulysses",
        ring_pass: str = "q",
        all_to_all: str = "auto",
        slice_ring: bool | None = None,
    ) -> None:
        check_mode(mode, ring_pass)
        self.comm = Comm(group, all_to_all)
        self.world_size, self.rank = self.comm.size, self.comm.rank
        self.base, self.hooks, self.plan = base, hooks, plan
        self.mode, self.ring_pass = mode, ring_pass
        self.ring = plan.ring  # the host-known fill level, where the plan has a ring rule
        if len(hooks.kv_args) != 2 or len(hooks.ring_args) != 2:
            raise InvalidArgumentError(
                f"context parallel: kv_args must name (keys, values) and ring_args (slots, valid_len); got "
                f"{hooks.kv_args}, {hooks.ring_args}"
            )
        self._sigs = {}
        for graph in hooks.steps:
            sig = plan.graphs.get(graph)
            if sig is None:
                raise InvalidArgumentError(f"context parallel: the plan has no graph '{graph}' the hooks name")
            missing = [n for n in (*hooks.kv_args, *hooks.ring_args) if n not in sig.args]
            if missing:
                raise InvalidArgumentError(f"context parallel: graph '{graph}' does not take {missing}")
            self._sigs[graph] = sig
        unsharded = [n for n in hooks.kv_rings if n not in plan.state]
        if unsharded:
            raise InvalidArgumentError(f"context parallel: no state buffer {unsharded}; use shard_plan's plan")
        # What a KV-ring argument may be: this rank's shard of one of the rings.
        self._ring_shapes = {tuple(plan.state[n].shape) for n in hooks.kv_rings}
        self._frame_rows = check_token_shardable(hooks.frame_tokens, self.world_size)
        self.shard = TokenShard(self.rank, self.world_size, self.comm.all_gather)
        self.device, self.dtype = base.device, base.dtype
        self.impl = hooks.attention
        self.name = f"cp-{mode}" + (f"-{ring_pass}" if mode == "ring" else "") + f"x{self.world_size}"
        self._slice_ring = slice_ring

    @property
    def shape_specialized(self) -> bool:
        """True when calls take the host-known fill level (torch attention slicing the ring)."""
        if self._slice_ring is not None:
            return self._slice_ring
        return bool(self.base.shape_specialized)

    @torch.no_grad()
    def broadcast_weights(self, module: torch.nn.Module, src: int = 0) -> None:
        """Copy group rank `src`'s parameters and buffers of `module` to every rank."""
        for t in list(module.parameters()) + list(module.buffers()):
            self.comm.broadcast_(t.data, src)

    @torch.no_grad()
    def call(self, graph: str, args: dict[str, torch.Tensor], block: int) -> tuple[torch.Tensor, ...]:
        step = self.hooks.steps.get(graph)
        if step is None:
            if graph in self.hooks.broadcast:  # the same call inputs everywhere (a session's buffers stay as given)
                args = {n: self.comm.broadcast_(args[n].clone()) for n in self.plan.graphs[graph].args}
            return self.base.call(graph, args, block)
        for name in self.hooks.kv_args:
            if tuple(args[name].shape) not in self._ring_shapes:
                raise InvalidArgumentError(
                    f"context parallel '{self.mode}' x{self.world_size}: {name} has shape {list(args[name].shape)}; "
                    f"this rank's shard is one of {sorted(map(list, self._ring_shapes))} (run sessions of the "
                    "context-parallel engine)"
                )
        host = self.ring.valid_tokens(block) if self.shape_specialized and self.ring is not None else None
        out = step(*[args[a] for a in self._sigs[graph].args], attend=self._attend(args, host), shard=self.shard)
        return (out,) if isinstance(out, torch.Tensor) else tuple(out)

    def _attend(self, args: dict[str, torch.Tensor], host: int | None) -> AttendFn:
        """The sharded self-attention of one call: the ring rows of the block, then per layer attend."""
        ring_k, ring_v = (args[n] for n in self.hooks.kv_args)
        slots, valid = (args[n] for n in self.hooks.ring_args)
        p, fs, c = self.world_size, self.hooks.frame_tokens, self._frame_rows
        nf, dev = slots.shape[0], slots.device
        if self.mode == "ulysses":
            # Ring rows of the gathered tokens, in all-to-all order (source rank, frame, row).
            src = torch.arange(p, device=dev).view(p, 1, 1) * c
            rows = (slots.view(1, nf, 1) * fs + src + torch.arange(c, device=dev).view(1, 1, c)).reshape(-1)
            return lambda layer, q, k, v: self._ulysses(q, k, v, ring_k[layer], ring_v[layer], rows, valid, host)
        # Every frame-slot holds c rows on every rank, so the local valid prefix is valid_len / P.
        rows = (slots.view(nf, 1) * c + torch.arange(c, device=dev).view(1, c)).reshape(-1)
        local = torch.div(valid, p, rounding_mode="floor")
        lhost = None if host is None else host // p
        return lambda layer, q, k, v: self._ring(q, k, v, ring_k[layer], ring_v[layer], rows, local, lhost)

    # -- self-attention, Ulysses ------------------------------------------------------------
    def _ulysses(self, q, k, v, ring_k, ring_v, rows, valid, host):
        p = self.world_size
        qkv = torch.stack([q, k, v])  # [3, B, Lc, N, d]
        _, b, lc, n, d = qkv.shape
        nl = n // p
        send = qkv.unflatten(3, (p, nl)).permute(3, 0, 1, 2, 4, 5)  # [P, 3, B, Lc, N/P, d]: row j to rank j
        got = self.comm.all_to_all(send)  # row i: rank i's tokens, this rank's heads
        qg, kg, vg = got.permute(1, 2, 0, 3, 4, 5).reshape(3, b, p * lc, nl, d).unbind(0)
        ring_k.index_copy_(1, rows, kg.to(ring_k.dtype))
        ring_v.index_copy_(1, rows, vg.to(ring_v.dtype))
        out = dit_ops.ring_attention(qg, ring_k, ring_v, valid, self.impl, host)  # [B, P*Lc, N/P, d]
        back = self.comm.all_to_all(out.unflatten(1, (p, lc)).transpose(0, 1))  # row j: my tokens, heads of j
        return back.permute(1, 2, 0, 3, 4).reshape(b, lc, n, d)

    # -- self-attention, ring ---------------------------------------------------------------
    def _ring(self, q, k, v, ring_k, ring_v, rows, valid, host):
        ring_k.index_copy_(1, rows, k.to(ring_k.dtype))
        ring_v.index_copy_(1, rows, v.to(ring_v.dtype))
        if self.world_size == 1:
            return attention_lse(q, ring_k, ring_v, valid, host, self.impl)[0].to(q.dtype)
        if self.ring_pass == "q":
            return self._pass_q(q, ring_k, ring_v, valid, host)
        return self._pass_kv(q, ring_k, ring_v, valid, host)

    def _pass_q(self, q, ring_k, ring_v, valid, host):
        """All queries meet this rank's keys; each partial (+ LSE) goes back to its query's rank."""
        p = self.world_size
        b, lc, n, d = q.shape
        q_all = self.comm.all_gather(q).transpose(0, 1).reshape(b, p * lc, n, d)  # [B, P*Lc, N, d], rank-major
        out, lse = attention_lse(q_all, ring_k, ring_v, valid, host, self.impl)
        parts = out.to(q.dtype).unflatten(1, (p, lc)).transpose(0, 1)  # [P, B, Lc, N, d]: row j = rank j's queries
        lses = lse.float().unflatten(2, (p, lc)).permute(2, 0, 1, 3)  # [P, B, N, Lc]
        return merge_partials(self.comm.all_to_all(parts), self.comm.all_to_all(lses), self.impl)

    def _pass_kv(self, q, ring_k, ring_v, valid, host):
        """Classic ring attention: K/V shards travel rank to rank, merged online by their LSE."""
        if host is not None:
            ring_k, ring_v = ring_k[:, :host], ring_v[:, :host]
        kv = torch.stack([ring_k, ring_v])  # [2, B, S_valid, N, d]: the buffer that travels
        spare = torch.empty_like(kv)
        acc_out = acc_lse = None
        for step in range(self.world_size):
            works = self.comm.ring_shift_start(kv, spare) if step + 1 < self.world_size else []
            out, lse = attention_lse(q, kv[0], kv[1], valid, host, self.impl)
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
    "check_mode",
    "check_token_shardable",
    "merge_partials",
    "shard_plan",
]
