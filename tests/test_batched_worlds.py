"""Batched worlds (flashdreams.batched) on the toy row-independent world: worlds stepped together
equal the same worlds stepped alone, also at different block indices; faults stay in their world."""

from __future__ import annotations

import pytest
import torch
from toy_world import FRAMES, KEYS, toy_engine

from flashdreams.batched import bucket_for
from flashdreams.errors import InvalidArgumentError


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def keys_for(world: int, block: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(world * 100 + block)
    return (torch.rand(1, FRAMES, KEYS, generator=g) > 0.5).float()


def alone(engine, seed: int, world: int, schedule: list[str]) -> list[torch.Tensor]:
    """One world stepped by a lone session: 's' steps (with that world's keys), 'r' resets."""
    s = engine.session(seed=seed)
    out, block = [], 0
    for ev in schedule:
        if ev == "r":
            s.reset()
            block = 0
            continue
        s.set_input("keyboard", keys_for(world, block))
        out.append(s.step().latents[0])
        block += 1
    return out


def test_worlds_together_equal_worlds_alone_at_different_block_indices():
    engine = toy_engine()
    seeds = [11, 12, 13]
    worlds = engine.worlds(3, seeds=seeds)
    # world 1 is reset after 2 blocks, world 2 after 3: from then on the batch holds three block indices
    schedules = {0: ["s"] * 6, 1: ["s", "s", "r", "s", "s", "s", "s"], 2: ["s", "s", "s", "r", "s", "s", "s"]}
    together = {w: [] for w in range(3)}
    resets = {1: 2, 2: 3}
    for t in range(6):
        for w, after in resets.items():
            if t == after:
                worlds.reset(w)
        for w in range(3):
            worlds.set_input(w, "keyboard", keys_for(w, worlds.blocks[worlds.row_of(w)]))
        step = worlds.step()
        for row, w in enumerate(step.ids):
            together[w].append(step.latents[row])
    assert worlds.blocks == [6, 4, 3]
    for w in range(3):
        ref = alone(engine, seeds[w], w, schedules[w])
        assert len(ref) == len(together[w]) == 6
        for a, b in zip(together[w], ref):
            assert rel_l2(a, b) <= 1e-6


def test_nan_input_is_refused_for_that_world_only():
    engine = toy_engine()
    base = engine.worlds(4, seeds=[1, 2, 3, 4])
    hit = engine.worlds(4, seeds=[1, 2, 3, 4])
    for _ in range(2):
        base.step(), hit.step()
    keys = torch.stack([keys_for(w, 2)[0] for w in range(4)])
    bad = keys.clone()
    bad[2, 0, 1] = float("nan")
    assert base.set_inputs("keyboard", keys) == {}
    refused = hit.set_inputs("keyboard", bad)
    assert list(refused) == [2] and "non-finite" in refused[2]
    with pytest.raises(InvalidArgumentError):
        hit.set_input(2, "keyboard", bad[2:3])
    a, b = base.step(), hit.step()
    for row in (0, 1, 3):  # untouched worlds: bit for bit
        assert torch.equal(a.frames[row], b.frames[row]) and torch.equal(a.latents[row], b.latents[row])
    assert not torch.equal(a.latents[2], b.latents[2])  # world 2 kept its old keys


def test_non_finite_output_resets_that_world_alone():
    engine = toy_engine()
    base = engine.worlds(3, seeds=[4, 5, 6])
    hit = engine.worlds(3, seeds=[4, 5, 6])
    for _ in range(2):
        base.step(), hit.step()
    hit.buffers["ring"][1, 0, 0] = float("nan")  # a fault inside world 1's state
    a, b = base.step(), hit.step()
    assert list(b.failed) == [1] and not a.failed
    assert hit.blocks == [3, 0, 3]  # world 1 was reset; the others went on
    for row in (0, 2):
        assert torch.equal(a.frames[row], b.frames[row])
    a, b = base.step(), hit.step()
    for row in (0, 2):
        assert torch.equal(a.latents[row], b.latents[row])
    # world 1 restarted from block 0 with its seed: equal to a fresh world of that seed
    fresh = engine.session(seed=5).step().latents[0]
    assert rel_l2(b.latents[1], fresh) <= 1e-6


def test_add_remove_and_buckets():
    engine = toy_engine()
    worlds = engine.worlds(3, seeds=[1, 2, 3], capacity=8)
    assert bucket_for(3, 8) == 4 and bucket_for(5, 8) == 8 and bucket_for(1, 8) == 1
    worlds.step()
    ring_of_2 = worlds.buffers["ring"][2].clone()
    worlds.remove(0)  # the last world (id 2) moves into row 0 with its state
    assert worlds.ids == [2, 1] and worlds.seeds == [3, 2]
    assert torch.equal(worlds.buffers["ring"][0], ring_of_2)
    new = worlds.add(seed=9)
    assert worlds.ids == [2, 1, new] and worlds.blocks == [1, 1, 0]
    step = worlds.step()
    assert step.latents.shape[0] == 3 and step.blocks == [1, 1, 0]
    # the added world equals a fresh world of its seed
    assert rel_l2(step.latents[2], engine.session(seed=9).step().latents[0]) <= 1e-6
    for _ in range(5):
        worlds.add()
    with pytest.raises(InvalidArgumentError, match="rows hold worlds"):
        worlds.add()
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        worlds.remove(0)


def test_refusals():
    engine = toy_engine()
    with pytest.raises(InvalidArgumentError):
        engine.worlds(0)
    with pytest.raises(InvalidArgumentError, match="seeds"):
        engine.worlds(2, seeds=[1])
    with pytest.raises(InvalidArgumentError, match="capacity"):
        engine.worlds(4, capacity=2)
    worlds = engine.worlds(2)
    with pytest.raises(InvalidArgumentError, match="unknown"):
        worlds.set_input(0, "mouse", torch.zeros(1, 2, 2))
    with pytest.raises(InvalidArgumentError, match="one row per live world"):
        worlds.set_inputs("keyboard", torch.zeros(3, FRAMES, KEYS))


def _mg_actions(world: int, block: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * world + block)
    return {
        "keyboard": (torch.rand(1, 12, 4, generator=g) > 0.5).float(),
        "mouse": torch.randn(1, 12, 2, generator=g) * 0.1,
    }


def test_lockstep_worlds_equal_worlds_alone_at_different_block_indices(monkeypatch):
    """A plan that is not row-independent (Matrix-Game: one RoPE/ring table per batch) runs one batch
    per distinct block index: in step, one batch; after a world's own reset, two, each world equal to
    itself stepped alone, the reset world's shorter block 0 (9 frames) padded in front to 12."""
    import flashdreams
    from flashdreams.batched import Worlds

    preset = "matrix-game-2-tiny"
    batched = flashdreams.load(preset=preset, device="cpu", batch=3)
    single = flashdreams.load(preset=preset, device="cpu")
    image = batched.default_inputs(seed=1)["image"][:1]
    worlds = batched.worlds(3, seeds=[4, 5, 6], inputs={"image": image})
    batches = []
    run = Worlds._step_rows
    monkeypatch.setattr(Worlds, "_step_rows", lambda self, rows: batches.append(list(rows)) or run(self, rows))
    got: dict[int, list] = {4: [], 5: [], 6: [], 9: []}
    for k in range(4):
        if k == 2:
            worlds.reset(1, seed=9)  # world 1 starts again at block 0; the others are at block 2
        for w in worlds.ids:
            seed = [4, 9 if k >= 2 else 5, 6][w]
            for name, value in _mg_actions(seed, worlds.blocks[worlds.row_of(w)]).items():
                worlds.set_input(w, name, value)
        out = worlds.step()
        for i, w in enumerate(out.ids):
            seed = [4, 9 if k >= 2 else 5, 6][w]
            pad = out.padded[i] if out.padded else (0, 0)
            got[seed].append((out.blocks[i], out.latents[i, :, pad[1] :], out.frames[i, pad[0] :], pad, out.frames[i]))
    assert batches == [[0, 1, 2], [0, 1, 2], [1], [0, 2], [1], [0, 2]]  # lowest block index first
    for seed, blocks in got.items():
        s = single.session(inputs={"image": image}, seed=seed)
        for block, lat, frames, pad, padded in blocks:
            for name, value in _mg_actions(seed, block).items():
                s.set_input(name, value)
            want = s.step()
            assert rel_l2(lat, want.latents[0]) <= 1e-6, (seed, block)
            assert (frames.int() - want.frames[0].int()).abs().max() <= 1, (seed, block)
            if seed == 9 and block == 0:  # stepped beside block-2 worlds: 3 copies of its first frame in front
                assert (
                    pad == (3, 0)
                    and padded.shape[0] == 12
                    and torch.equal(padded[:3], padded[3:4].expand(3, -1, -1, -1))
                )
            else:
                assert pad == (0, 0)


def test_lockstep_worlds_need_the_batch_they_were_loaded_with_and_one_row_each():
    import flashdreams

    engine = flashdreams.load()  # the tiny causal Wan, batch 1: not row-independent
    with pytest.raises(InvalidArgumentError, match=r"batch=N"):
        engine.worlds(2)
    with pytest.raises(InvalidArgumentError, match="not row-independent"):
        engine.plan.with_batch(2)
    cfg = flashdreams.load(preset="wan2.1-t2v-tiny", batch=2)  # guidance: two rows per world in its caches
    with pytest.raises(InvalidArgumentError, match="one row per world"):
        cfg.worlds(2)


def test_step_only_some_worlds_holds_the_others():
    engine = toy_engine()
    worlds = engine.worlds(0, capacity=4)
    a, b, c = worlds.add(1), worlds.add(2), worlds.add(3)
    ref = engine.worlds(3, seeds=[1, 2, 3])
    worlds.step(), ref.step()
    held_ring = worlds.buffers["ring"][1].clone()
    out = worlds.step(only=[a, c])  # b is paused
    assert out.ids == [a, c] and worlds.blocks == [2, 1, 2]
    assert torch.equal(worlds.buffers["ring"][1], held_ring)
    full = ref.step()
    assert torch.equal(out.latents[0], full.latents[0]) and torch.equal(out.latents[1], full.latents[2])
    # b resumes where it paused: equal to a world that never paused
    out = worlds.step(only=[b])
    assert rel_l2(out.latents[0], full.latents[1]) <= 1e-6


@pytest.mark.slow
def test_lockstep_worlds_of_a_built_engine_equal_eager_worlds(tmp_path):
    """The compiled path: an engine built at batch 2 (fd-build --batch 2) runs lockstep worlds, one out
    of step, equal to the eager engine's worlds."""
    import flashdreams
    from flashdreams.export.build import build_engine

    build_engine(tmp_path / "e", preset="tiny", backend="inductor", device="cpu", batch=2, decoder=None)
    built = flashdreams.load(tmp_path / "e")
    eager = flashdreams.load(preset="tiny", device="cpu", batch=2, decoder=None)
    with pytest.raises(InvalidArgumentError, match="fd-build --batch"):
        built.worlds(3)
    a, b = built.worlds(2, seeds=[3, 4]), eager.worlds(2, seeds=[3, 4])
    for k in range(4):
        if k == 2:
            a.reset(0, seed=7), b.reset(0, seed=7)
        x, y = a.step(), b.step()
        assert x.blocks == y.blocks == ([k, k] if k < 2 else [k - 2, k])
        assert rel_l2(x.latents, y.latents) <= 1e-5
