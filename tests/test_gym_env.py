"""The Gymnasium environments over batched worlds (flashdreams.gym)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

gymnasium = pytest.importorskip("gymnasium")

from gymnasium.utils.env_checker import check_env  # noqa: E402
from toy_world import toy_engine  # noqa: E402

import flashdreams.gym  # noqa: E402,F401  (registers flashdreams/World-v0)


def actions_at(step: int, n: int) -> dict:
    g = np.random.default_rng(step)
    return {"keyboard": g.integers(0, 2, size=(n, 2, 4)).astype(np.int8)}


def test_single_world_env_passes_gymnasiums_checker():
    env = gymnasium.make("flashdreams/World-v0", engine=toy_engine(), max_episode_steps=4, render_mode="rgb_array")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checker's warnings count as failures
        check_env(env.unwrapped)
    obs, _ = env.reset(seed=3)
    assert env.observation_space.contains(obs)
    assert env.render().shape == obs.shape[1:]


def test_vector_env_world_i_equals_a_single_env_seeded_s_plus_i():
    engine = toy_engine()
    n, s = 3, 40
    venv = gymnasium.make_vec("flashdreams/World-v0", num_envs=n, engine=engine, max_episode_steps=3)
    assert isinstance(venv, flashdreams.gym.WorldVectorEnv)
    assert venv.action_space == gymnasium.vector.utils.batch_space(venv.single_action_space, n)
    obs, _ = venv.reset(seed=s)
    assert venv.observation_space.contains(obs)
    trace = [obs]
    for t in range(6):  # crosses an autoreset (episodes of 3 steps)
        obs, _, _, truncated, info = venv.step(actions_at(t, n))
        trace.append(obs)
        if t == 2:
            assert truncated.all()
        if t == 3:
            assert (info["block"] == 0).all()  # NEXT_STEP autoreset: the first block of the new episode
    for i in range(n):
        env = flashdreams.gym.WorldEnv(engine=engine, max_episode_steps=3)
        ref = [env.reset(seed=s + i)[0]]
        for t in range(6):
            if t == 3:  # the vector env reset this world here, drawing its seed from the world's own stream
                ref.append(env.reset()[0])
                continue
            ref.append(env.step({"keyboard": actions_at(t, n)["keyboard"][i]})[0])
        for a, b in zip(trace, ref):
            assert np.abs(a[i].astype(int) - b.astype(int)).max() <= 1


def test_refused_action_ends_only_that_worlds_episode():
    engine = toy_engine()
    venv = flashdreams.gym.WorldVectorEnv(num_envs=3, engine=engine, max_episode_steps=10)
    base = flashdreams.gym.WorldVectorEnv(num_envs=3, engine=engine, max_episode_steps=10)
    venv.reset(seed=1), base.reset(seed=1)
    good = {"keyboard": np.ones((3, 2, 4), dtype=np.float32)}
    bad = {"keyboard": good["keyboard"].copy()}
    bad["keyboard"][1, 0, 0] = np.nan
    a = base.step(good)
    b = venv.step(bad)
    assert b[3].tolist() == [False, True, False] and "non-finite" in b[4]["error"][1]
    for row in (0, 2):
        assert np.array_equal(a[0][row], b[0][row])
    b = venv.step(good)  # the refused world starts a new episode; the others go on
    assert b[4]["block"].tolist() == [2, 0, 2]


def test_reward_and_termination_hooks():
    def reward(obs, actions, info):
        return obs.reshape(obs.shape[0], -1).float().mean(1)

    def done(obs, info):
        return info["block"] >= 1

    venv = flashdreams.gym.WorldVectorEnv(
        num_envs=2, engine=toy_engine(), reward_fn=reward, termination_fn=done, observation="torch"
    )
    obs, _ = venv.reset(seed=0)
    assert isinstance(obs, torch.Tensor) and obs.dtype == torch.uint8
    obs, rew, term, trunc, _ = venv.step({"keyboard": np.zeros((2, 2, 4))})
    assert np.allclose(rew, obs.reshape(2, -1).float().mean(1).numpy())
    assert term.all() and not trunc.any()
    with pytest.raises(flashdreams.errors.InvalidArgumentError, match="unknown actions"):
        venv.step({"mouse": np.zeros((2, 2, 2))})


@pytest.mark.slow
def test_a_lockstep_world_is_an_environment_too():
    """Matrix-Game (not row-independent: its worlds step in lockstep groups) as a vector environment:
    one batch per step while the worlds are in step, observations padded to the longest block (block
    0 has 9 frames, the others 12; info["padding"] says how many are padding), a world whose episode
    ended early resets alone and equals a single environment seeded the same, and the single-world
    environment passes Gymnasium's checker with random keys and mouse."""
    preset = "matrix-game-2-tiny"
    single = gymnasium.make("flashdreams/World-v0", preset=preset, device="cpu", max_episode_steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(single.unwrapped, skip_render_check=True)

    venv = gymnasium.make_vec(
        "flashdreams/World-v0",
        num_envs=2,
        preset=preset,
        device="cpu",
        max_episode_steps=4,
        termination_fn=lambda obs, info: np.array([info["block"][0] >= 1, False]),  # world 0 ends after block 1
    )
    assert venv.unwrapped.core.engine.plan.batch == 2 and venv.single_observation_space.shape[0] == 12
    obs, info = venv.reset(seed=7)
    assert obs.shape[1] == 12 and info["padding"].tolist() == [3, 3]
    assert (obs[:, :3] == obs[:, 3:4]).all()  # block 0's first frame, held
    keys = np.zeros((2, 12, 4), dtype=np.int8)
    mouse = np.zeros((2, 12, 2), dtype=np.float32)
    trace, infos = [obs], []
    for _ in range(3):
        obs, _, term, _, info = venv.step({"keyboard": keys, "mouse": mouse})
        trace.append(obs)
        infos.append(info)
    assert infos[1]["block"].tolist() == [0, 2] and infos[1]["padding"].tolist() == [3, 0]  # world 0 restarted alone
    assert infos[2]["block"].tolist() == [1, 3]

    env = flashdreams.gym.WorldEnv(preset=preset, device="cpu", max_episode_steps=4)
    ref = [env.reset(seed=8)[0]]  # world 1 of the vector env: seed 7 + 1
    for _ in range(3):
        ref.append(env.step({"keyboard": keys[1], "mouse": mouse[1]})[0])
    for a, b in zip(trace, ref):
        assert np.abs(a[1].astype(int) - b.astype(int)).max() <= 1
