"""The collectives a context-parallel step needs, bound to one process group, for NCCL and gloo.

Every helper moves whole tensors with a fixed shape and never reads a device value back to
the host, so a step stays free of host syncs (a collective on NCCL is enqueued on the
stream like a kernel; gloo runs on the CPU anyway). Each works on any torch build:
`all_to_all_single` is used where the backend has it, with an isend/irecv fallback (some
gloo builds lack it), and the all-gather uses `all_gather_single` or its older name.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from flashdreams.errors import InvalidArgumentError

log = logging.getLogger(__name__)

ALL_TO_ALL_IMPLS = ("auto", "native", "p2p")


class Comm:
    """Collectives over one process group (None: the default group); `size` ranks, this one `rank`.

    `all_to_all` is "auto" (native `all_to_all_single`, falling back to isend/irecv once if
    the backend refuses it), "native" or "p2p" (the fallback, forced; for tests).
    """

    def __init__(self, group: dist.ProcessGroup | None = None, all_to_all: str = "auto") -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise InvalidArgumentError(
                "context parallel needs torch.distributed initialised: launch with torchrun and call "
                "flashdreams.parallel.init_from_env() first"
            )
        if all_to_all not in ALL_TO_ALL_IMPLS:
            raise InvalidArgumentError(f"all_to_all '{all_to_all}' is unknown; choose one of {ALL_TO_ALL_IMPLS}")
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise InvalidArgumentError("this process is not a member of the context-parallel group it was given")
        self.backend = str(dist.get_backend(group))
        self._a2a = all_to_all
        self._peers = [dist.get_global_rank(group, r) if group is not None else r for r in range(self.size)]

    def global_rank(self, group_rank: int) -> int:
        """The default-group rank of `group_rank` (what point-to-point calls address)."""
        return self._peers[group_rank]

    # -- gathers -----------------------------------------------------------------------
    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[*s] on every rank -> [P, *s], row i from rank i."""
        x = x.contiguous()
        if self.size == 1:
            return x.unsqueeze(0)
        flat = x.reshape(1, -1)  # gloo takes only the concatenated form: [P * n] rows out of [n] rows in
        out = torch.empty((self.size, flat.shape[1]), dtype=x.dtype, device=x.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, flat, group=self.group)
        return out.view(self.size, *x.shape)

    def broadcast_(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite x on every rank with group rank `src`'s x (in place; returns x)."""
        if self.size > 1:
            dist.broadcast(x, self.global_rank(src), group=self.group)
        return x

    # -- all-to-all ----------------------------------------------------------------------
    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """x [P, *s]: row j goes to rank j; returns [P, *s] whose row i came from rank i."""
        if x.shape[0] != self.size:
            raise InvalidArgumentError(f"all_to_all: leading dim must be the group size {self.size}, got {x.shape[0]}")
        x = x.contiguous()
        if self.size == 1:
            return x
        out = torch.empty_like(x)
        if self._a2a != "p2p":
            try:
                dist.all_to_all_single(out, x, group=self.group)
                return out
            except (RuntimeError, NotImplementedError) as exc:
                if self._a2a == "native":
                    raise
                # Decided once; every rank of a group runs the same build, so all fall back together.
                log.info("all_to_all_single unavailable on %s (%s): using isend/irecv", self.backend, exc)
                self._a2a = "p2p"
        self._p2p_exchange([(j, x[j], out[j]) for j in range(self.size) if j != self.rank])
        out[self.rank].copy_(x[self.rank])
        return out

    # -- point to point ----------------------------------------------------------------
    def _p2p_ops(self, pairs) -> list:
        ops = []
        for peer, send, recv in pairs:
            ops.append(dist.P2POp(dist.isend, send, self.global_rank(peer), self.group))
            ops.append(dist.P2POp(dist.irecv, recv, self.global_rank(peer), self.group))
        return ops

    def _p2p_exchange(self, pairs) -> None:
        """Send `send` to and receive `recv` from each `peer` of (peer, send, recv), all at once."""
        for work in dist.batch_isend_irecv(self._p2p_ops(pairs)):
            work.wait()

    def ring_shift_start(self, send: torch.Tensor, recv: torch.Tensor) -> list:
        """Start sending `send` to rank+1 and receiving rank-1's into `recv`; wait on the returned works.

        Starting the next shift before computing on the current buffer overlaps the two.
        """
        if self.size == 1:
            recv.copy_(send)
            return []
        nxt, prv = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        ops = [
            dist.P2POp(dist.isend, send, self.global_rank(nxt), self.group),
            dist.P2POp(dist.irecv, recv, self.global_rank(prv), self.group),
        ]
        return dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(works: list) -> None:
        for work in works:
            work.wait()
