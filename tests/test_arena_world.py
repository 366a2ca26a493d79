"""The arena: renderer, detector and action scripts (ground truth for the quality tests), and the plan contract."""

from __future__ import annotations

import pytest
import torch

import flashdreams
from flashdreams.models.families.arena import world
from flashdreams.session import block_seed


def test_worlds_are_a_function_of_their_seed():
    a, b = world.new_worlds([3, 4]), world.new_worlds([3])
    assert torch.equal(world.render(a)[:1], world.render(b))
    assert not torch.equal(world.render(a)[0], world.render(a)[1])


def test_keys_move_the_agent_and_walls_stop_it():
    s = world.new_worlds([0])
    x0, y0 = s.pos[0].tolist()
    d = torch.tensor([[0.0, 0.0, 0.0, 1.0]])  # d: right
    moved = world.step(s, d)
    assert moved.pos[0].tolist() in ([x0 + world.SPEED, y0], [x0, y0])  # a block may stop it
    keys = d.expand(40, 4)[None]  # 40 frames right: the wall (or a block) must stop it
    _, pos = world.rollout(s, keys)
    assert pos[0, -1, 0] <= world.SIZE - world.WALL - world.AGENT
    assert pos[0, -1, 0] == pos[0, -2, 0]  # stopped
    ws = torch.tensor([[1.0, 1.0, 0.0, 0.0]])  # w and s cancel
    assert torch.equal(world.step(s, ws).pos, s.pos)


def test_detector_reads_the_renderers_position():
    s = world.new_worlds(list(range(10)))
    keys = world.random_actions(10, 30, seed=1)
    frames, pos = world.rollout(s, keys)
    found_pos, found = world.detect_agent(frames)
    assert bool(found.all())
    assert torch.allclose(found_pos, pos.float(), atol=1e-4)
    # Not found where there is no agent: a frame of floor only.
    empty = frames[:1, 0].clone()
    empty[...] = torch.tensor(world.FLOOR_TINTS[0][0]).view(3, 1, 1)
    assert not bool(world.detect_agent(empty)[1].any())


def test_random_actions_are_deterministic_and_persistent():
    a, b = world.random_actions(4, 200, seed=9), world.random_actions(4, 200, seed=9)
    assert torch.equal(a, b) and not torch.equal(a, world.random_actions(4, 200, seed=10))
    changes = (a[:, 1:] != a[:, :-1]).any(-1).float().mean()
    assert 0.03 < float(changes) < 0.3  # persistence 0.85: a key set lasts several frames


def test_plan_is_row_independent():
    engine = flashdreams.load(preset="arena", device="cpu")
    plan = engine.plan
    assert plan.row_independent and plan.sequence == [] and plan.steady == "step"
    assert plan.state["block_index"].dtype == "int64" and plan.state["block_index"].shape == (1,)
    kb = plan.inputs["keyboard"]
    assert kb.units == "keys" and kb.labels == ("w", "s", "a", "d") and kb.shape == (1, 4, 4) and not kb.required
    plan4 = plan.with_batch(4)  # every buffer has the batch as dim 0
    assert plan4.state["last_frame"].shape[0] == 4 and plan4.latents.shape[0] == 4
    with pytest.raises(flashdreams.errors.InvalidArgumentError, match="values outside"):
        engine.session().set_input("keyboard", torch.full((1, 4, 4), 2.0))


def test_rows_at_different_blocks_equal_single_runs():
    """Row i of a B=2 step depends only on row i, each row at its own block index."""
    engine = flashdreams.load(preset="arena", device="cpu")
    keys = world.loop_actions(40).view(10, 4, 4)
    start = world.render(world.new_worlds([10**9 + 50]))
    solo_a = engine.session(seed=7)  # row 0: built-in start from seed 7's draw, blocks 0..
    solo_b = engine.session(seed=1, inputs={"start_frame": start})  # row 1: its own start, 3 blocks ahead
    for k in range(3):
        solo_b.set_input("keyboard", keys[k][None])
        solo_b.step()
    step = engine.model.graphs["step"]
    last = torch.stack([torch.zeros(3, 64, 64), solo_b.buffers["last_frame"][0]])
    index = torch.tensor([0, 3])
    for k in range(3):
        gen = torch.Generator().manual_seed(block_seed(7, k))
        noise = torch.stack([torch.randn((1, 1), generator=gen)[0], torch.randn(1)])
        kb = torch.stack([keys[k], keys[k + 3]])
        sf = torch.stack([torch.zeros(3, 64, 64), start[0]])
        video, nxt, _ = step(last, index, kb, sf, noise)
        solo_a.set_input("keyboard", keys[k][None])
        solo_b.set_input("keyboard", keys[k + 3][None])
        ra, rb = solo_a.step(), solo_b.step()
        # Equal up to float rounding (a batched matmul may sum in another order than a single row's).
        assert torch.allclose(video[0], ra.latents[0].transpose(0, 1), atol=1e-4)
        assert torch.allclose(video[1], rb.latents[0].transpose(0, 1), atol=1e-4)
        last, index = nxt, index + 1


def test_batched_worlds_at_their_own_blocks_match_sessions():
    """flashdreams.batched over the arena: a world reset mid-run restarts alone; every world equals its own session."""
    engine = flashdreams.load(preset="arena", device="cpu")
    keys = world.loop_actions(40).view(10, 4, 4)
    worlds = engine.worlds(2, seeds=[4, 9])
    solo = [engine.session(seed=4), engine.session(seed=9)]
    ids = list(worlds.ids)
    for k in range(5):
        if k == 3:  # world 1 back to block 0; world 0 goes on at block 3
            worlds.reset(ids[1])
            solo[1].reset()
        for i, w in enumerate(ids):
            worlds.set_input(w, "keyboard", keys[k][None])
            solo[i].set_input("keyboard", keys[k][None])
        got = worlds.step()
        for i in range(2):
            want = solo[i].step().frames[0]
            assert (got.frames[i].int() - want.int()).abs().max() <= 1  # float rounding of batched GEMMs at most


def test_the_start_draw_is_made_at_block_0_only():
    """`start_noise` is read only at block 0 (first_block_only): later blocks draw nothing for it, so a batch
    of worlds past their start launches no per-world draw."""
    import flashdreams

    engine = flashdreams.load(preset="arena", device="cpu")
    assert engine.plan.draws["start_noise"].first_block_only
    s = engine.session(seed=3)
    s.step()
    first = s.buffers["start_noise"].clone()
    s.buffers["start_noise"].fill_(7.0)
    s.step()
    assert bool((s.buffers["start_noise"] == 7.0).all())  # block 1 did not draw it
    s.reset()
    s.step()
    assert torch.equal(s.buffers["start_noise"], first)  # block 0 draws it again, from the same seed
