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


def test_camera_motion_integrates_in_the_cameras_own_axes():
    from flashdreams.models.camera_path import MOTION_LABELS, integrate_motion, moves_path

    forward = torch.zeros(3, 6)
    forward[:, MOTION_LABELS.index("forward")] = 0.5
    poses = integrate_motion(torch.eye(4), forward)
    assert torch.allclose(poses[:, 2, 3], torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64))
    turn_then_go = torch.zeros(2, 6)
    turn_then_go[0, MOTION_LABELS.index("yaw")] = 90.0  # positive yaw turns right (OpenCV: x right, z forward)
    turn_then_go[1, MOTION_LABELS.index("forward")] = 1.0
    end = integrate_motion(torch.eye(4), turn_then_go)[-1]
    assert torch.allclose(end[:3, 3], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), atol=1e-12)
    # The same vocabulary as a path file's moves: "yaw 10 deg in 2 frames" = two frames of 5 degrees.
    yaw = torch.zeros(2, 6)
    yaw[:, MOTION_LABELS.index("yaw")] = 5.0
    assert torch.allclose(integrate_motion(torch.eye(4), yaw).float(), moves_path(["yaw 10 deg in 2 frames"])[1:])
    with pytest.raises(flashdreams.errors.InvalidArgumentError, match="frames, 6"):
        integrate_motion(torch.eye(4), torch.zeros(3, 4))


@pytest.mark.slow
def test_a_camera_world_is_driven_by_motion():
    """LingBot (camera poses per frame): random samples of the motion action are valid trajectories (the
    checker's random rollout is not refused), a motion equals the poses it integrates to given directly
    (camera="pose"), block after block from where the camera was, and a motion out of bounds is refused."""
    from flashdreams.models.camera_path import integrate_motion

    engine = flashdreams.load(preset="lingbot-world-fast-tiny", device="cpu")
    env = flashdreams.gym.WorldEnv(engine=engine, max_episode_steps=3)
    assert set(env.action_space.spaces) == {"poses_motion"}  # the prompt, intrinsics, world scale are settings
    space = env.action_space["poses_motion"]
    frames = engine.plan.inputs["poses"].shape[1]
    assert space.shape == (frames, 6) and (space.low == -1).all() and (space.high == 1).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env, skip_render_check=True)
    env.reset(seed=1)
    for _ in range(2):
        _, _, _, truncated, info = env.step(env.action_space.sample())
        assert "error" not in info and not truncated

    by_pose = flashdreams.gym.WorldEnv(engine=engine, max_episode_steps=3, camera="pose")
    assert by_pose.action_space["poses"].shape == (frames, 4, 4)
    g = np.random.default_rng(0)
    moves = [g.uniform(-1, 1, (frames, 6)).astype(np.float32) for _ in range(2)]
    scale = torch.tensor(flashdreams.gym.MOTION_MAX, dtype=torch.float64)  # action 1 = this much per frame
    a, b = env.reset(seed=5)[0], by_pose.reset(seed=5)[0]
    assert np.array_equal(a, b)
    at = torch.eye(4, dtype=torch.float64)
    for m in moves:
        poses = integrate_motion(at, torch.from_numpy(m).double() * scale)
        at = poses[-1]
        a = env.step({"poses_motion": m})[0]
        b = by_pose.step({"poses": poses.float().numpy()})[0]
        assert np.array_equal(a, b)

    # a branch point holds the camera the motion has integrated to: the same motion from it, the same block
    from flashdreams.errors import InvalidArgumentError

    state = env.clone_state()
    step = g.uniform(-1, 1, (frames, 6)).astype(np.float32)
    first = env.step({"poses_motion": step})[0]
    env.step({"poses_motion": step})  # the camera moves on
    env.restore_state(state)
    assert np.array_equal(env.step({"poses_motion": step})[0], first)
    with pytest.raises(InvalidArgumentError, match="camera"):  # a pose-driven environment has no integrated camera
        by_pose.restore_state(state)

    too_far = np.zeros((frames, 6), np.float32)
    too_far[0, 4] = 1.5
    _, _, _, truncated, info = env.step({"poses_motion": too_far})
    assert truncated and "poses_motion" in info["error"]


@pytest.mark.slow
def test_settings_configure_every_world_and_are_checked_first():
    """A camera world's intrinsics are a setting: one value for all worlds or one row per world, checked when
    the environment is made (a bad one is named then, not refused later), and they change what is seen."""
    engine = flashdreams.load(preset="lingbot-world-fast-tiny", device="cpu", batch=2)  # lockstep: one batch
    k = engine.default_inputs(batch=1)["intrinsics"][0]
    wide = k * torch.tensor([0.5, 0.5, 1.0, 1.0])
    plain = flashdreams.gym.WorldVectorEnv(num_envs=2, engine=engine, max_episode_steps=3)
    mixed = flashdreams.gym.WorldVectorEnv(
        num_envs=2, engine=engine, max_episode_steps=3, settings={"intrinsics": torch.stack([k, wide])}
    )
    a, b = plain.reset(seed=4)[0], mixed.reset(seed=4)[0]
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[1], b[1])  # world 1 sees through other optics
    move = {"poses_motion": np.full((2, *plain.single_action_space["poses_motion"].shape), 0.5, np.float32)}
    for _ in range(3):  # the third step ends the episodes (max_episode_steps=3)
        a, b = plain.step(move)[0], mixed.step(move)[0]
        assert np.array_equal(a[0], b[0]) and not np.array_equal(a[1], b[1])
    (a, _, _, _, info_a), (b, _, _, _, info_b) = plain.step(move), mixed.step(move)
    assert info_a["block"].tolist() == info_b["block"].tolist() == [0, 0]  # the autoreset step
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[1], b[1])  # the setting held through the reset
    errors = flashdreams.errors.InvalidArgumentError
    with pytest.raises(errors, match="unknown settings"):
        flashdreams.gym.WorldEnv(engine=engine, settings={"focal": 1.0})
    with pytest.raises(errors, match="setting 'intrinsics' must have shape"):
        flashdreams.gym.WorldEnv(engine=engine, settings={"intrinsics": [1.0, 2.0]})
    with pytest.raises(errors, match="setting 'intrinsics'"):
        flashdreams.gym.WorldEnv(engine=engine, settings={"intrinsics": [0.0, 0.0, 8.0, 8.0]})  # fx, fy must be > 0


def test_a_planner_branches_an_environment_with_clone_and_restore_state():
    """clone_state / restore_state: environment 1 goes back to its branch point and takes the same steps
    again (same observations, same truncation step, same autoreset seed stream); the others go on."""
    from flashdreams.errors import EngineIncompatibleError, InvalidArgumentError

    n = 3
    venv = gymnasium.make_vec("flashdreams/World-v0", num_envs=n, engine=toy_engine(), max_episode_steps=3)
    venv.reset(seed=7)
    venv.step(actions_at(0, n))
    branch = venv.clone_state(1)
    first = []
    for t in range(1, 5):  # crosses world 1's truncation (step 3) and its autoreset
        obs, _, _, truncated, info = venv.step(actions_at(t, n))
        first.append((obs[1].copy(), bool(truncated[1]), int(info["block"][1])))
    assert [f[1] for f in first] == [False, True, False, False]
    for steps in (2, 4):  # back from a pending autoreset (after step 2), then from a new episode (after 4)
        venv.restore_state(1, branch)
        for t in range(1, 1 + steps):
            obs, _, _, truncated, info = venv.step(actions_at(t, n))
            assert np.array_equal(obs[1], first[t - 1][0]), (steps, t)
            assert (bool(truncated[1]), int(info["block"][1])) == first[t - 1][1:], (steps, t)
    # another environment's branch point restores into this one; a foreign state is refused by name
    venv.restore_state(2, venv.clone_state(0))
    with pytest.raises(InvalidArgumentError, match="index"):
        venv.clone_state(n)
    env = flashdreams.gym.WorldEnv(preset="tiny", device="cpu")
    env.reset(seed=1)
    with pytest.raises(EngineIncompatibleError):
        venv.restore_state(0, env.clone_state())
    with pytest.raises(InvalidArgumentError, match="EnvState"):
        env.restore_state(branch.world)
