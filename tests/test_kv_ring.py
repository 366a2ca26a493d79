"""The KV ring against a plain-list model of the reference's cache bookkeeping."""

from __future__ import annotations

import pytest
import torch

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.kv_ring import BlockPositions, KVRing, RingSpec


def reference_cache_frames(local_attn_size: int, sink: int, nf: int, num_blocks: int, calls_per_block: int = 5):
    """Yield, after each block, the frames the reference's buffer holds, in buffer order.

    The README's algorithm with frames instead of tokens: G (global end), E (local end),
    roll by shifting the non-sink part left when a new block would overflow the buffer.
    """
    cap = local_attn_size
    buf: list[int | None] = [None] * cap
    g = e = 0
    for k in range(num_blocks):
        f0 = k * nf
        for _ in range(calls_per_block):
            end = f0 + nf
            if end > g and e + nf > cap:
                ev = e + nf - cap
                keep = e - ev - sink
                buf[sink : sink + keep] = buf[sink + ev : sink + ev + keep]
                e_new = e + (end - g) - ev
            else:
                e_new = e + (end - g)
            buf[e_new - nf : e_new] = list(range(f0, f0 + nf))
            g, e = end, e_new
        yield buf[:e]


@pytest.mark.parametrize(
    "local_attn_size,sink,nf",
    [(7, 1, 3), (12, 0, 3), (9, 2, 1), (21, 0, 3), (11, 1, 3), (6, 3, 3), (10, 1, 2), (4, 0, 4)],
)
def test_ring_holds_the_reference_frames(local_attn_size, sink, nf):
    spec = RingSpec.from_reference(local_attn_size, sink, frame_seq_length=5, max_frames=0)
    slot_frame: dict[int, int] = {}
    blocks = 3 * local_attn_size + 7  # wraps the window many times
    for k, ref in enumerate(reference_cache_frames(local_attn_size, sink, nf, blocks)):
        slots = spec.block_slots(k * nf, nf)
        assert len(set(slots)) == nf and all(0 <= s < spec.capacity_frames for s in slots)
        for i, s in enumerate(slots):
            slot_frame[s] = k * nf + i
        valid = spec.valid_tokens((k + 1) * nf) // spec.frame_seq_length
        assert valid == len(ref), f"block {k}: valid {valid} frames, reference holds {len(ref)}"
        # The valid prefix of slots holds exactly the reference's frames (order is free).
        assert sorted(slot_frame[s] for s in range(valid)) == sorted(ref), f"block {k}"
        # Sink frames never move.
        for s in range(min(sink, valid)):
            assert slot_frame[s] == s


def test_full_cache_is_a_window_as_large_as_the_rollout():
    spec = RingSpec.from_reference(-1, 0, frame_seq_length=4, max_frames=12)
    assert (spec.sink_frames, spec.window_frames) == (0, 12)
    assert [spec.block_slots(k * 3, 3) for k in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert spec.valid_tokens(6) == 24 and spec.valid_tokens(12) == 48 and spec.valid_tokens(99) == 48


def test_ring_rejects_bad_shapes():
    with pytest.raises(InvalidArgumentError, match="window"):
        RingSpec(1, 2, 4).block_slots(0, 3)
    with pytest.raises(InvalidArgumentError, match="sink_size"):
        RingSpec.from_reference(4, 4, 16, 0)
    with pytest.raises(InvalidArgumentError):
        RingSpec(0, 0, 16)


def test_block_positions_fill_device_tensors():
    spec = RingSpec(1, 6, 10)
    pos = BlockPositions.allocate(3, "cpu")
    ptrs = [pos.frame_positions.data_ptr(), pos.slots.data_ptr(), pos.valid_len.data_ptr()]
    pos.fill(spec, 6)  # frames 6, 7, 8 -> slots 6, 1, 2; all 7 slots valid
    assert pos.frame_positions.tolist() == [6, 7, 8]
    assert pos.slots.tolist() == [6, 1, 2]
    assert pos.valid_len.tolist() == [70]
    pos.fill(spec, 0)
    assert pos.slots.tolist() == [0, 1, 2] and pos.valid_len.tolist() == [30]
    assert ptrs == [pos.frame_positions.data_ptr(), pos.slots.data_ptr(), pos.valid_len.data_ptr()]


def test_kv_ring_allocation():
    ring = KVRing(
        RingSpec(1, 8, 16), num_layers=3, batch=2, num_heads=4, head_dim=8, device="cpu", dtype=torch.bfloat16
    )
    assert ring.k.shape == (3, 2, 144, 4, 8) and ring.k.dtype == torch.bfloat16
    assert ring.nbytes == 2 * 3 * 2 * 144 * 4 * 8 * 2
    k0, _ = ring.layer(1)
    k0.fill_(1.0)
    assert ring.k[1].sum() > 0 and ring.k[0].sum() == 0
    ring.clear()
    assert ring.k.abs().sum() == 0
