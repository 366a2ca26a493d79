"""The KV ring: a bounded self-attention cache of `sink + window` latent frames per layer.

Layout (the one place it is defined; kernels and model follow it):
  * K and V of every layer live in two tensors of shape [layers, B, S, N, d],
    S = (sink + window) * frame_seq_length tokens. Keys are stored after RoPE,
    at their absolute frame positions; values raw.
  * Frame f of the stream lives in frame-slot f if f < sink, otherwise in
    sink + (f - sink) % window: rows [slot*fs, (slot+1)*fs).
  * Slots fill in order, so the valid rows are always the prefix
    [0, min(frames_seen, sink + window) * fs).
A new block is written at its rotating slots instead of shifting the window left by
copy, as the reference does. Softmax attention does not depend on the order of the
keys, and stored keys already carry their rotation, so attention over the valid
prefix gives the reference's result for the rolling and the full-cache cases.
The reference keeps the sink plus the newest `local_attn_size - sink_size` frames
(the current block included), which is exactly `window` here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashdreams.errors import InvalidArgumentError


@dataclass(frozen=True)
class RingSpec:
    """Shape of the ring: how many frames are kept and how many tokens a frame has."""

    sink_frames: int
    window_frames: int
    frame_seq_length: int

    def __post_init__(self) -> None:
        if self.sink_frames < 0 or self.window_frames < 1 or self.frame_seq_length < 1:
            raise InvalidArgumentError(
                f"RingSpec: need sink >= 0, window >= 1 and frame_seq_length >= 1; got sink "
                f"{self.sink_frames}, window {self.window_frames}, frame_seq_length {self.frame_seq_length}"
            )

    @classmethod
    def from_reference(cls, local_attn_size: int, sink_size: int, frame_seq_length: int, max_frames: int) -> RingSpec:
        """The ring equivalent to the reference's cache settings.

        `local_attn_size == -1` is the reference's unbounded cache: a window of
        `max_frames` with no sink (the reference's own buffer holds 21 frames).
        """
        if local_attn_size == -1:
            return cls(0, max_frames, frame_seq_length)
        if not 0 <= sink_size < local_attn_size:
            raise InvalidArgumentError(
                f"cache: sink_size {sink_size} must be in [0, local_attn_size={local_attn_size})"
            )
        return cls(sink_size, local_attn_size - sink_size, frame_seq_length)

    @property
    def capacity_frames(self) -> int:
        return self.sink_frames + self.window_frames

    @property
    def capacity_tokens(self) -> int:
        return self.capacity_frames * self.frame_seq_length

    def slot_of(self, frame: int) -> int:
        """The frame-slot that absolute frame `frame` is written to."""
        if frame < self.sink_frames:
            return frame
        return self.sink_frames + (frame - self.sink_frames) % self.window_frames

    def block_slots(self, first_frame: int, num_frames: int) -> list[int]:
        if num_frames > self.window_frames:
            raise InvalidArgumentError(
                f"ring window of {self.window_frames} frames cannot hold a block of {num_frames} frames; "
                "use a window at least as large as num_frame_per_block"
            )
        return [self.slot_of(first_frame + i) for i in range(num_frames)]

    def valid_tokens(self, end_frame: int) -> int:
        """Valid prefix length (tokens) once frames [0, end_frame) have been written."""
        return min(end_frame, self.capacity_frames) * self.frame_seq_length

    def to_dict(self) -> dict:
        return {
            "sink_frames": self.sink_frames,
            "window_frames": self.window_frames,
            "frame_seq_length": self.frame_seq_length,
            "capacity_tokens": self.capacity_tokens,
        }


@dataclass
class BlockPositions:
    """Per-block device tensors the step graphs read: they change every block, the
    addresses never do. Filled from host-known block indices (no device read-back)."""

    frame_positions: torch.Tensor  # int64 [nf]: absolute latent-frame index of each frame (RoPE)
    slots: torch.Tensor  # int64 [nf]: frame-slot of each frame in the ring
    valid_len: torch.Tensor  # int64 [1]: valid ring rows after this block is written
    valid_tokens: int = 0  # the same on the host (known without a read-back), for shape-specialised paths

    @classmethod
    def allocate(cls, num_frames: int, device: torch.device | str) -> BlockPositions:
        z = lambda n: torch.zeros(n, dtype=torch.int64, device=device)  # noqa: E731
        return cls(z(num_frames), z(num_frames), z(1))

    def fill(self, spec: RingSpec, first_frame: int) -> None:
        """Write the values for the block starting at absolute frame `first_frame`."""
        nf = self.slots.shape[0]
        host = torch.tensor(
            [first_frame + i for i in range(nf)]
            + spec.block_slots(first_frame, nf)
            + [spec.valid_tokens(first_frame + nf)],
            dtype=torch.int64,
        )
        # One host-to-device copy each, enqueued on the stream: never a read-back.
        self.frame_positions.copy_(host[:nf], non_blocking=True)
        self.slots.copy_(host[nf : 2 * nf], non_blocking=True)
        self.valid_len.copy_(host[2 * nf :], non_blocking=True)
        self.valid_tokens = spec.valid_tokens(first_frame + nf)


class KVRing:
    """The ring's state tensors for all layers, allocated once per session."""

    def __init__(
        self,
        spec: RingSpec,
        num_layers: int,
        batch: int,
        num_heads: int,
        head_dim: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        self.spec = spec
        shape = (num_layers, batch, spec.capacity_tokens, num_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def clear(self) -> None:
        self.k.zero_()
        self.v.zero_()

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
