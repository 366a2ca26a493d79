"""Snapshots (flashdreams.snapshot): a restored session or world continues exactly as the original did,
saved snapshots restore in another session, forks branch a world, and a snapshot that does not fit is
refused whole."""

from __future__ import annotations

import os

import pytest
import torch
from toy_world import FRAMES, KEYS, toy_engine

import flashdreams
from flashdreams.errors import EngineIncompatibleError, InvalidArgumentError, NotFoundError
from flashdreams.snapshot import Snapshot


@pytest.fixture(scope="module")
def engine():
    return flashdreams.load(device="cpu")  # the tiny causal Wan with its decoder: ring, shadowless, decoder caches


def blocks(session, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(r.latents.clone(), r.frames.clone()) for r in (session.step() for _ in range(n))]


def same(a, b) -> bool:
    return all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))


def other_prompt(session) -> torch.Tensor:
    shape = session.plan.inputs["prompt_embeds"].shape
    return torch.randn(shape, generator=torch.Generator().manual_seed(5))


def test_a_restored_session_continues_bit_for_bit(engine):
    s = engine.session(seed=3)
    blocks(s, 2)
    snap = s.snapshot()
    assert (snap.block, snap.seed, snap.batch) == (2, 3, 1)
    assert snap.nbytes == sum(t.numel() * t.element_size() for t in snap.tensors.values()) > 0
    ahead = blocks(s, 2)
    # wander off: another prompt (state derived from an input: the cross-attention cache) and a reset
    s.set_prompt(other_prompt(s))
    blocks(s, 1)
    s.reset(seed=8)
    s.restore(snap)
    assert (s.block, s.seed) == (2, 3)
    assert same(blocks(s, 2), ahead)


def test_a_saved_snapshot_restores_in_another_session(engine, tmp_path):
    s = engine.session(seed=4)
    blocks(s, 2)
    path = tmp_path / "world.safetensors"
    s.snapshot(device="cpu").save(path)
    assert path.is_file() and not os.path.exists(f"{path}.partial")
    ahead = blocks(s, 2)
    other = engine.session(seed=11)  # another seed and a fresh ring: all replaced by the snapshot's
    blocks(other, 1)
    loaded = Snapshot.load(path)
    assert all(t.device.type == "cpu" for t in loaded.tensors.values())
    moved = loaded.to("meta")  # a copy on another device; the loaded one keeps its tensors
    assert all(t.device.type == "meta" for t in moved.tensors.values()) and moved.block == loaded.block == 2
    other.restore(loaded)
    assert other.block == 2
    assert same(blocks(other, 2), ahead)


def test_a_snapshot_that_does_not_fit_is_refused_and_changes_nothing(engine, tmp_path):
    s = engine.session(seed=2)
    blocks(s, 1)
    before = {n: b.clone() for n, b in s.buffers.items()}
    toy = toy_engine().session(seed=1)
    with pytest.raises(EngineIncompatibleError, match="same preset"):
        s.restore(toy.snapshot())
    snap = s.snapshot()
    snap.tensors["ring_k"] = snap.tensors["ring_k"][..., :-1]  # a tensor of another shape
    with pytest.raises(EngineIncompatibleError, match="ring_k"):
        s.restore(snap)
    snap = s.snapshot()
    del snap.tensors["prompt_embeds"]
    with pytest.raises(EngineIncompatibleError, match="missing"):
        s.restore(snap)
    with pytest.raises(InvalidArgumentError, match="Snapshot"):
        s.restore({"ring_k": torch.zeros(1)})
    assert s.block == 1
    assert all(torch.equal(before[n], b) for n, b in s.buffers.items())
    # files: missing, not a snapshot
    with pytest.raises(NotFoundError):
        Snapshot.load(tmp_path / "nothing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(InvalidArgumentError, match="not a FlashDreams snapshot"):
        Snapshot.load(junk)


def test_a_snapshot_into_an_earlier_one_reuses_its_memory(engine):
    s = engine.session(seed=5)
    blocks(s, 1)
    held = s.snapshot(device="cpu")
    addresses = {n: t.data_ptr() for n, t in held.tensors.items()}
    blocks(s, 1)
    fresh = s.snapshot(device="cpu")
    got = s.snapshot(into=held)
    assert got is held and held.block == 2 == fresh.block
    assert {n: t.data_ptr() for n, t in held.tensors.items()} == addresses  # overwritten, not reallocated
    assert all(torch.equal(held.tensors[n], t) for n, t in fresh.tensors.items())
    ahead = blocks(s, 2)
    s.restore(held)
    assert same(blocks(s, 2), ahead)
    pinned = s.snapshot(device="cpu", pinned=True)  # no GPU here: plain host memory, the same values
    assert pinned.block == 4 and all(t.device.type == "cpu" for t in pinned.tensors.values())


def test_a_snapshot_into_one_that_does_not_fit_is_refused_and_writes_nothing(engine):
    s = engine.session(seed=5)
    blocks(s, 1)
    toy = toy_engine().session(seed=1)
    theirs = toy.snapshot()
    kept = {n: t.clone() for n, t in theirs.tensors.items()}
    with pytest.raises(EngineIncompatibleError, match="same preset"):
        s.snapshot(into=theirs)
    assert theirs.block == 0 and all(torch.equal(kept[n], t) for n, t in theirs.tensors.items())
    mine = s.snapshot()
    mine.tensors["ring_k"] = mine.tensors["ring_k"][..., :-1]
    before = {n: t.clone() for n, t in mine.tensors.items()}
    with pytest.raises(EngineIncompatibleError, match="ring_k"):
        s.snapshot(into=mine)
    assert all(torch.equal(before[n], t) for n, t in mine.tensors.items())
    with pytest.raises(InvalidArgumentError, match="into= snapshot is on"):
        s.snapshot(device="meta", into=s.snapshot())
    with pytest.raises(InvalidArgumentError, match="into= takes"):
        s.snapshot(into={"ring_k": torch.zeros(1)})


def test_restore_is_refused_while_recording(engine):
    s = engine.session(seed=1)
    snap = s.snapshot()
    s.start_recording()
    s.step()
    with pytest.raises(InvalidArgumentError, match="stop_recording"):
        s.restore(snap)
    assert s.block == 1
    assert s.stop_recording() is not None and s.recording is None
    s.restore(snap)
    assert s.block == 0


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def keys(world: int, block: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(world * 100 + block)
    return (torch.rand(1, FRAMES, KEYS, generator=g) > 0.5).float()


def test_a_fork_branches_a_world():
    worlds = toy_engine().worlds(2, seeds=[5, 6], capacity=4)
    for b in range(2):
        for w in (0, 1):
            worlds.set_input(w, "keyboard", keys(w, b))
        worlds.step()
    same_noise = worlds.fork(0)
    own_noise = worlds.fork(0, seed=77)
    assert worlds.blocks[worlds.row_of(same_noise)] == 2 and worlds.seeds[worlds.row_of(own_noise)] == 77
    for w in (0, same_noise, own_noise):
        worlds.set_input(w, "keyboard", keys(0, 2))
    out = worlds.step()
    lat = {w: out.latents[i] for i, w in enumerate(out.ids)}
    assert rel_l2(lat[same_noise], lat[0]) <= 1e-6  # same state, inputs and noise: the same block
    assert rel_l2(lat[own_noise], lat[0]) > 1e-2  # its own noise from here on
    # a branch given other actions goes its own way; world 0 is untouched by its branches
    worlds.set_input(0, "keyboard", keys(0, 3))
    worlds.set_input(same_noise, "keyboard", 1 - keys(0, 3))
    out = worlds.step()
    assert rel_l2(out.latents[out.ids.index(same_noise)], out.latents[out.ids.index(0)]) > 1e-2


def test_a_world_snapshot_restores_into_a_session_and_back():
    engine = toy_engine()
    worlds = engine.worlds(3, seeds=[1, 2, 3])
    for _ in range(2):
        worlds.step()
    snap = worlds.snapshot(1)
    assert (snap.block, snap.seed, snap.batch) == (2, 2, 1)
    # into a lone session: it continues as world 1 does in the batch
    s = engine.session(seed=0)
    s.restore(snap)
    worlds.set_input(1, "keyboard", keys(1, 2))
    s.set_input("keyboard", keys(1, 2))
    want = worlds.step()
    got = s.step()
    row = want.ids.index(1)
    assert rel_l2(got.latents[0], want.latents[row]) <= 1e-6
    # and a session's snapshot into a world, the others untouched
    before = {w: worlds.snapshot(w) for w in (0, 2)}
    worlds.restore(2, s.snapshot())
    assert worlds.blocks[worlds.row_of(2)] == 3 and worlds.seeds[worlds.row_of(2)] == 2
    after = worlds.snapshot(0)
    assert all(torch.equal(after.tensors[n], t) for n, t in before[0].tensors.items())
    # a snapshot of another model is refused for that world, which keeps its state
    with pytest.raises(EngineIncompatibleError):
        worlds.restore(0, flashdreams.load(device="cpu").session().snapshot())
    assert worlds.blocks[worlds.row_of(0)] == 3
    full = toy_engine().worlds(1, capacity=1)
    with pytest.raises(InvalidArgumentError, match="remove one"):
        full.fork(0)


def test_a_world_snapshot_into_an_earlier_one():
    worlds = toy_engine().worlds(2, seeds=[1, 2])
    worlds.step()
    held = worlds.snapshot(0, device="cpu")
    address = held.tensors["keyboard"].data_ptr()
    worlds.set_input(1, "keyboard", keys(1, 1))
    worlds.step()
    assert worlds.snapshot(1, into=held) is held
    assert (held.block, held.seed) == (2, 2) and held.tensors["keyboard"].data_ptr() == address
    assert torch.equal(held.tensors["keyboard"][0], keys(1, 1)[0])
    with pytest.raises(EngineIncompatibleError, match="same preset"):
        worlds.snapshot(0, into=flashdreams.load(device="cpu").session().snapshot())
    assert held.seed == 2


def test_a_fork_of_a_lockstep_world_runs_with_it():
    """Matrix-Game's plan is not row-independent (worlds run in lockstep groups): a fork sits at its
    origin's block index, so the two share a batch, and its snapshot continues in a batch-1 session."""
    from test_batched_worlds import _mg_actions

    preset = "matrix-game-2-tiny"
    worlds_engine = flashdreams.load(preset=preset, device="cpu", batch=3)
    image = worlds_engine.default_inputs(seed=1)["image"][:1]
    worlds = worlds_engine.worlds(2, seeds=[4, 5], inputs={"image": image})
    for block in range(2):
        for w in worlds.ids:
            for name, value in _mg_actions(4 + w, block).items():
                worlds.set_input(w, name, value)
        worlds.step()
    branch = worlds.fork(0)
    session = flashdreams.load(preset=preset, device="cpu").session(inputs={"image": image}, seed=0)
    session.restore(worlds.snapshot(0))
    for w in worlds.ids:
        for name, value in _mg_actions(4, 2).items():
            worlds.set_input(w, name, value)
    for name, value in _mg_actions(4, 2).items():
        session.set_input(name, value)
    out = worlds.step()
    assert out.blocks == [2, 2, 2]  # one group: the fork is at its origin's block
    lat = {w: out.latents[i] for i, w in enumerate(out.ids)}
    assert rel_l2(lat[branch], lat[0]) <= 1e-6
    assert rel_l2(session.step().latents[0], lat[0]) <= 1e-6


@pytest.mark.slow
def test_an_eager_snapshot_restores_into_a_built_engine(tmp_path):
    """The backend is not part of a snapshot's identity: an eager session's snapshot continues in a session
    of the engine fd-build made from the same preset, within the engine's tolerance of eager."""
    from flashdreams.export.build import build_engine

    build_engine(tmp_path / "e", preset="tiny", backend="inductor", device="cpu", decoder=None)
    built = flashdreams.load(tmp_path / "e")
    eager = flashdreams.load(preset="tiny", device="cpu", decoder=None)
    s = eager.session(seed=5)
    for _ in range(2):
        s.step()
    snap = s.snapshot()
    want = [s.step().latents.clone() for _ in range(2)]
    b = built.session(seed=0)
    b.restore(snap)
    assert b.block == 2
    for w in want:
        assert rel_l2(b.step().latents, w) <= 1e-5
