"""Gymnasium environments over batched worlds: `import flashdreams.gym` registers `flashdreams/World-v0`.

    import gymnasium, flashdreams.gym
    envs = gymnasium.make_vec("flashdreams/World-v0", num_envs=64, preset="arena")
    obs, info = envs.reset(seed=0)          # world i seeded with 0 + i
    obs, reward, terminated, truncated, info = envs.step(envs.action_space.sample())

`WorldVectorEnv` steps all its worlds in one batch (`flashdreams.batched.Worlds`): one forward
pass per step for every environment. Observations are a block's frames (uint8
[num_envs, T, H, W, 3] as numpy, or the device tensor with observation="torch"); actions are
the model's per-block named inputs as a `Dict` space built from their specs ("keys" inputs are
`MultiBinary`, the rest `Box` within their declared range). A camera world's per-frame poses are
driven by motion (camera="motion", the default): the action `<input>_motion` [F, 6] is each frame's
move in the camera's axes (camera_path.MOTION_LABELS) in [-1, 1], 1 being MOTION_MAX, integrated from where
the world's camera was, so any sample is a valid trajectory; camera="pose" takes the 4x4 poses
themselves (random samples of that Box are not rigid transforms and are refused). Inputs that configure
a world rather than steer it (a prompt, a camera's intrinsics and world scale) are not actions but
`settings={name: value}` (one world's shape for all, or one row per world; default the model's
stand-in), held for every episode. Autoreset is Gymnasium's
NEXT_STEP mode: the step after an episode ends resets that world and returns its first block.
An episode is truncated after `max_episode_steps` steps; `reward_fn(obs, actions, info)` and
`termination_fn(obs, info)` are the user's hooks. An action a world refuses (NaN, out of
range) ends that world's episode (truncated, with the reason in info["error"]); the other
worlds go on untouched. `WorldEnv` is the single-world environment (`gymnasium.make`). Both offer
`clone_state` / `restore_state` (`EnvState`) for planners that branch a world.

gymnasium is an optional dependency (`pip install "flashdreams[gym]"`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

try:
    import gymnasium
    from gymnasium import spaces
    from gymnasium.vector import AutoresetMode, VectorEnv
    from gymnasium.vector.utils import batch_space
except ModuleNotFoundError as exc:  # pragma: no cover - exercised only without gymnasium
    from flashdreams.errors import NotFoundError

    raise NotFoundError('flashdreams.gym needs gymnasium: pip install "flashdreams[gym]"') from exc

from flashdreams.batched import pad_front
from flashdreams.errors import InvalidArgumentError
from flashdreams.models.family import InputSpec
from flashdreams.session import to_host
from flashdreams.snapshot import Snapshot

ENV_ID = "flashdreams/World-v0"
RewardFn = Callable[[Any, dict, dict], Any]
TerminationFn = Callable[[Any, dict], Any]


# A camera-motion action is in [-1, 1] (the normalized range RL libraries expect); 1 is this much per video
# frame (camera_path.MOTION_LABELS): metres right / down / forward, degrees of pitch / yaw / roll.
MOTION_MAX = (0.5, 0.5, 0.5, 5.0, 5.0, 5.0)


def is_pose_input(spec: InputSpec) -> bool:
    """A per-frame camera pose ([B, F, 4, 4] rigid transforms), which the environments drive by motion."""
    return "rigid_transform" in spec.rules and len(spec.shape) == 4 and tuple(spec.shape[-2:]) == (4, 4)


def is_setting(spec: InputSpec) -> bool:
    """An input that configures a world rather than steers it (a prompt, a camera's intrinsics or world scale):
    held for the episode (the environments' `settings`), not part of the action space."""
    return spec.units == "embedding" or (spec.units == "camera" and not is_pose_input(spec))


def action_space_for(specs: list[InputSpec], motion: dict[str, str] | None = None) -> spaces.Dict:
    """One world's action space: its per-block inputs that are not settings (`is_setting`), without the batch
    dim. The pose inputs named in `motion` ({input: action name}) are driven by a per-frame camera motion
    instead: [F, 6] in [-1, 1], scaled by MOTION_MAX."""
    motion = motion or {}
    out = {}
    for s in specs:
        if s.when != "block" or is_setting(s):
            continue
        shape = tuple(s.shape[1:])
        if s.name in motion:
            out[motion[s.name]] = spaces.Box(-1.0, 1.0, (s.shape[1], len(MOTION_MAX)), np.float32)
        elif s.units == "keys":
            out[s.name] = spaces.MultiBinary(shape)
        else:
            low = -np.inf if s.low is None else s.low
            high = np.inf if s.high is None else s.high
            out[s.name] = spaces.Box(low, high, shape, np.float32)
    return spaces.Dict(out)


@dataclass(frozen=True)
class EnvState:
    """One environment's state for a planner to branch from (`clone_state` / `restore_state`, as Atari's
    environments offer): its world's snapshot (flashdreams.snapshot: state, inputs, block index, seed), the
    episode's step count (truncation), its seed stream and its camera (motion-driven pose worlds), and whether
    its next step starts a new episode (the vector environment's autoreset)."""

    world: Snapshot
    steps: int
    rng: dict
    cameras: dict[str, np.ndarray]
    autoreset: bool


class _Worlds:
    """What both environments share: the engine, the worlds, episodes and the observation."""

    def __init__(
        self,
        num_envs: int,
        preset: str | None,
        engine,
        max_episode_steps: int,
        reward_fn: RewardFn | None,
        termination_fn: TerminationFn | None,
        observation: str,
        camera: str,
        settings: dict | None,
        load_kwargs: dict,
    ) -> None:
        import flashdreams
        from flashdreams import presets

        if observation not in ("numpy", "torch"):
            raise InvalidArgumentError(f"observation must be 'numpy' or 'torch', got {observation!r}")
        if camera not in ("motion", "pose"):
            raise InvalidArgumentError(f"camera must be 'motion' or 'pose', got {camera!r}")
        if isinstance(max_episode_steps, bool) or not isinstance(max_episode_steps, int) or max_episode_steps < 1:
            raise InvalidArgumentError(f"max_episode_steps must be an integer >= 1, got {max_episode_steps!r}")
        cuda_graphs = load_kwargs.pop("cuda_graphs", None)
        default = getattr(presets, "DEFAULT_WORLD", "tiny")
        if engine is None:
            # A plan that is not row-independent has the batch it is loaded with: one row per environment.
            load_kwargs.setdefault("batch", num_envs)
            engine = flashdreams.load(preset=preset or default, **load_kwargs)
        self.engine = engine
        self.worlds = self.engine.worlds(num_envs, cuda_graphs=cuda_graphs)
        self.num_envs = num_envs
        self.max_episode_steps = max_episode_steps
        self.reward_fn, self.termination_fn, self.observation = reward_fn, termination_fn, observation
        self.specs = {s.name: s for s in self.worlds.input_specs() if s.when == "block"}
        # What a world holds when no action is given (a new episode, a row being reset): no keys, no
        # mouse; a required input gets the model's valid stand-in (a camera's identity pose and
        # intrinsics: zeros would be refused).
        stand_ins = self.engine.default_inputs(batch=1)
        self.neutral = {
            n: stand_ins[n] if n in stand_ins else torch.zeros(1, *s.shape[1:]) for n, s in self.specs.items()
        }
        # Camera worlds are driven by motion: random 4x4 matrices are not rigid transforms (a world would refuse
        # every sample of a pose Box), while any bounded motion integrates to valid poses.
        self.motion = {n: f"{n}_motion" for n, s in self.specs.items() if camera == "motion" and is_pose_input(s)}
        self.poses_at = {n: np.tile(np.eye(4), (num_envs, 1, 1)) for n in self.motion}  # each world's camera
        self.action_space = action_space_for(list(self.specs.values()), self.motion)
        self.fixed = self._settings(settings or {})
        # Dry blocks, one of each block kind, for the frames' shape (the worlds are reset before use):
        # an observation holds the longest block's frames, a shorter block (block 0 of a Wan VAE
        # decode) is padded in front with its first frame, and info["padding"] says how many.
        plan = self.engine.plan
        for name, value in self.neutral.items():
            value = self.fixed.get(name, value.expand(num_envs, *value.shape[1:]))
            refused = self.worlds.set_inputs(name, value)
            if refused:
                raise InvalidArgumentError(f"setting '{name}': {next(iter(refused.values()))}")
        dry = [self.worlds.step() for _ in range(len(plan.sequence) + 1)]
        if dry[0].frames is None:
            raise InvalidArgumentError(f"{self.engine.preset_name} has no decoder: an environment needs frames")
        longest = max(d.frames.shape[1] for d in dry)
        self.frame_shape = (longest, *dry[0].frames.shape[2:])
        self.observation_space = spaces.Box(0, 255, self.frame_shape, np.uint8)
        self.steps = [0] * num_envs
        self.rngs = [np.random.default_rng(i) for i in range(num_envs)]

    def reset_world(self, i: int, seed: int | None) -> None:
        if seed is not None:
            self.rngs[i] = np.random.default_rng(seed)
        else:  # an unseeded reset continues the world's own seed stream, as a Gymnasium env does
            seed = int(self.rngs[i].integers(2**62))
        held = {n: f[i : i + 1] for n, f in self.fixed.items()}
        self.worlds.reset(self.worlds.ids[i], seed=seed, **{**self.neutral, **held})
        self.steps[i] = 0
        for at in self.poses_at.values():
            at[i] = np.eye(4)  # a new episode starts at the identity, as the neutral poses do

    def clone_state(self, i: int) -> EnvState:
        """World i's state with the environment's own bookkeeping for it (see `EnvState`)."""
        world = self.worlds.snapshot(self.worlds.ids[i])
        cameras = {n: at[i].copy() for n, at in self.poses_at.items()}
        return EnvState(world, self.steps[i], self.rngs[i].bit_generator.state, cameras, False)

    def restore_state(self, i: int, state: EnvState) -> None:
        if not isinstance(state, EnvState):
            got = type(state).__name__
            raise InvalidArgumentError(f"restore_state: expected an EnvState (from clone_state()), got {got}")
        if set(state.cameras) != set(self.poses_at):
            raise InvalidArgumentError(
                f"restore_state: the state drives the cameras {sorted(state.cameras)} by motion, this environment "
                f"{sorted(self.poses_at)} (camera='motion' or 'pose' differs)"
            )
        self.worlds.restore(self.worlds.ids[i], state.world)  # checked whole first: nothing below runs if refused
        self.steps[i] = state.steps
        self.rngs[i] = np.random.default_rng()
        self.rngs[i].bit_generator.state = state.rng
        for n, pose in state.cameras.items():
            self.poses_at[n][i] = pose

    def set_actions(self, actions: dict | None, skip: set[int]) -> dict[int, str]:
        """Write every world's actions (rows in `skip`, and actions not given, get the neutral value);
        returns {world: why} for refused rows."""
        actions = actions or {}
        known = sorted(self.action_space.spaces)
        unknown = sorted(set(actions) - set(known))
        if unknown:
            raise InvalidArgumentError(f"unknown actions {unknown}; this world takes {known}")
        refused: dict[int, str] = {}
        for name, spec in self.specs.items():
            if name in self.fixed:
                t = self.fixed[name].clone()
            elif name in self.motion:
                t = self._poses_from_motion(name, actions.get(self.motion[name]), skip, refused)
            else:
                t = self._batched(name, (self.num_envs, *spec.shape[1:]), actions.get(name))
            for i in skip if name not in self.fixed else ():  # a setting holds through resets
                t[i] = self.neutral[name][0]
            refused.update(self.worlds.set_inputs(name, t))
        return refused

    def _settings(self, given: dict) -> dict[str, torch.Tensor]:
        """Every setting's value per world [num_envs, ...]: the one given (one world's shape, for all of them, or
        one row per world) or the model's stand-in."""
        names = [n for n, s in self.specs.items() if is_setting(s)]
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise InvalidArgumentError(f"unknown settings {unknown}; this world's settings are {names}")
        out = {}
        for name in names:
            one = tuple(self.specs[name].shape[1:])
            value = self.neutral[name] if name not in given else torch.as_tensor(np.asarray(given[name]))
            value = value.to(torch.float32)
            if tuple(value.shape) == one:
                value = value[None]
            if tuple(value.shape[1:]) != one or value.shape[0] not in (1, self.num_envs):
                raise InvalidArgumentError(
                    f"setting '{name}' must have shape {list(one)} or {[self.num_envs, *one]}, got {list(value.shape)}"
                )
            out[name] = value.expand(self.num_envs, *one).clone()
        return out

    def _batched(self, name: str, full: tuple[int, ...], value) -> torch.Tensor:
        if value is None:
            return self.neutral[name].expand(full).clone()  # [1, ...] -> one row per world
        t = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
        if tuple(t.shape) != full:
            raise InvalidArgumentError(f"action '{name}' must have shape {list(full)}, got {list(t.shape)}")
        return t.to(torch.float32)

    def _poses_from_motion(self, name: str, value, skip: set[int], refused: dict[int, str]) -> torch.Tensor:
        """Each world's poses for this block: its camera moved by its motion rows, one per frame, from where the
        last block left it (action 1 = MOTION_MAX). One not finite or outside [-1, 1] is refused for that world."""
        from flashdreams.models.camera_path import integrate_motion

        action = self.motion[name]
        frames = self.specs[name].shape[1]
        full = (self.num_envs, frames, len(MOTION_MAX))
        motion = torch.zeros(full) if value is None else self._batched(action, full, value)
        at = self.poses_at[name]
        poses = torch.empty(self.num_envs, frames, 4, 4)
        scale = torch.tensor(MOTION_MAX, dtype=torch.float64)
        for i in range(self.num_envs):
            m = motion[i].double()
            if i in skip:
                m = torch.zeros_like(m)
            elif not bool(torch.isfinite(m).all()) or bool((m.abs() > 1).any()):
                refused[self.worlds.ids[i]] = f"action '{action}': motion must be finite and within [-1, 1]"
                m = torch.zeros_like(m)  # the world is refused; keep its camera where it is
            m = m * scale
            path = integrate_motion(torch.from_numpy(at[i]), m)
            at[i] = path[-1].numpy()
            poses[i] = path.float()
        return poses

    def step(self) -> tuple[Any, dict]:
        out = self.worlds.step()
        t = out.frames.shape[1]
        padding = np.array([p[0] for p in out.padded] if out.padded else [0] * len(out.ids)) + self.frame_shape[0] - t
        frames = pad_front(out.frames, 1, self.frame_shape[0])
        frames = frames if self.observation == "torch" else to_host(frames).numpy()
        info: dict = {"block": np.array(out.blocks), "padding": padding}
        if out.failed:
            info["error"] = np.array([out.failed.get(w, "") for w in out.ids], dtype=object)
        return frames, info

    def rewards(self, obs, actions: dict, info: dict) -> np.ndarray:
        if self.reward_fn is None:
            return np.zeros(self.num_envs, dtype=np.float64)
        return np.asarray(self.reward_fn(obs, actions, info), dtype=np.float64).reshape(self.num_envs)

    def terminated(self, obs, info: dict) -> np.ndarray:
        if self.termination_fn is None:
            return np.zeros(self.num_envs, dtype=bool)
        return np.asarray(self.termination_fn(obs, info), dtype=bool).reshape(self.num_envs)


class WorldVectorEnv(VectorEnv):
    """num_envs worlds of one model, stepped in one batch; see the module docstring."""

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": ["rgb_array"]}

    def __init__(
        self,
        num_envs: int = 1,
        preset: str | None = None,
        engine=None,
        max_episode_steps: int = 100,
        reward_fn: RewardFn | None = None,
        termination_fn: TerminationFn | None = None,
        observation: str = "numpy",
        render_mode: str | None = None,
        camera: str = "motion",
        settings: dict | None = None,
        **load_kwargs,
    ) -> None:
        self.core = _Worlds(
            num_envs,
            preset,
            engine,
            max_episode_steps,
            reward_fn,
            termination_fn,
            observation,
            camera,
            settings,
            load_kwargs,
        )
        self.num_envs = num_envs
        self.render_mode = render_mode
        self.metadata = {**self.metadata, "render_fps": self.core.engine.plan.meta.get("fps")}
        self.single_observation_space = self.core.observation_space
        self.single_action_space = self.core.action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._autoreset = np.zeros(num_envs, dtype=bool)
        self._last = None

    def reset(self, *, seed: int | list[int] | None = None, options: dict | None = None):
        super().reset(seed=seed)
        seeds = seed if isinstance(seed, list) else [None if seed is None else seed + i for i in range(self.num_envs)]
        if len(seeds) != self.num_envs:
            raise InvalidArgumentError(f"reset: {len(seeds)} seeds for {self.num_envs} environments")
        for i, s in enumerate(seeds):
            self.core.reset_world(i, s)
        self.core.set_actions(None, set())
        obs, info = self.core.step()
        self._autoreset[:] = False
        self._last = obs
        return obs, info

    def step(self, actions: dict):
        n = self.num_envs
        resetting = set(np.flatnonzero(self._autoreset).tolist())
        for i in resetting:
            self.core.reset_world(i, None)
        refused = self.core.set_actions(actions, resetting)
        for w in refused:  # a refused action ends that world's episode; it restarts next step
            self.core.steps[self.core.worlds.row_of(w)] = self.core.max_episode_steps
        obs, info = self.core.step()
        for i in range(n):
            self.core.steps[i] += 0 if i in resetting else 1
        rewards = self.core.rewards(obs, actions, info)
        terminated = self.core.terminated(obs, info)
        truncated = np.array([s >= self.core.max_episode_steps for s in self.core.steps])
        if refused or "error" in info:
            errors = info.get("error", np.array([""] * n, dtype=object))
            for w, why in refused.items():
                errors[self.core.worlds.row_of(w)] = why
            info["error"] = errors
            truncated |= errors != ""
        for i in resetting:  # the first block of a new episode: nothing ended, nothing earned
            rewards[i], terminated[i], truncated[i] = 0.0, False, False
        self._autoreset = terminated | truncated
        self._last = obs
        return obs, rewards, terminated, truncated, info

    def clone_state(self, i: int) -> EnvState:
        """Environment i's state after its last step: `restore_state(j, state)` puts environment j there,
        the others go on. A planner branches a world this way (try actions, go back, try others)."""
        self._check_index(i)
        return replace(self.core.clone_state(i), autoreset=bool(self._autoreset[i]))

    def restore_state(self, i: int, state: EnvState) -> None:
        """Environment i back to `state` (from `clone_state`, of any environment of the same model): its next
        step continues from there. Refused by name for another model's state, nothing changed."""
        self._check_index(i)
        self.core.restore_state(i, state)
        self._autoreset[i] = state.autoreset

    def _check_index(self, i) -> None:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < self.num_envs:
            raise InvalidArgumentError(f"environment index must be in [0, {self.num_envs}), got {i!r}")

    def render(self):
        if self.render_mode != "rgb_array" or self._last is None:
            return None
        last = self._last if isinstance(self._last, np.ndarray) else self._last.cpu().numpy()
        return tuple(last[i, -1] for i in range(self.num_envs))


class WorldEnv(gymnasium.Env):
    """One world as a Gymnasium environment (no autoreset: call reset() when an episode ends)."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(
        self,
        preset: str | None = None,
        engine=None,
        max_episode_steps: int = 100,
        reward_fn: RewardFn | None = None,
        termination_fn: TerminationFn | None = None,
        observation: str = "numpy",
        render_mode: str | None = None,
        camera: str = "motion",
        settings: dict | None = None,
        **load_kwargs,
    ) -> None:
        self.core = _Worlds(
            1, preset, engine, max_episode_steps, reward_fn, termination_fn, observation, camera, settings, load_kwargs
        )
        self.observation_space = self.core.observation_space
        self.action_space = self.core.action_space
        self.render_mode = render_mode
        self.metadata = {**self.metadata, "render_fps": self.core.engine.plan.meta.get("fps")}
        self._last = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.core.reset_world(0, seed)
        self.core.set_actions(None, set())
        obs, info = self.core.step()
        self._last = obs[0]
        return obs[0], _first(info)

    def step(self, action: dict):
        batched = {k: np.asarray(v)[None] if not isinstance(v, torch.Tensor) else v[None] for k, v in action.items()}
        refused = self.core.set_actions(batched, set())
        obs, info = self.core.step()
        self.core.steps[0] += 1
        reward = float(self.core.rewards(obs, batched, info)[0])
        terminated = bool(self.core.terminated(obs, info)[0])
        truncated = self.core.steps[0] >= self.core.max_episode_steps
        info = _first(info)
        if refused:
            info["error"], truncated = next(iter(refused.values())), True
        self._last = obs[0]
        return obs[0], reward, terminated, truncated or bool(info.get("error")), info

    def clone_state(self) -> EnvState:
        """The environment's state after its last step, for `restore_state` (a planner's branch point)."""
        return self.core.clone_state(0)

    def restore_state(self, state: EnvState) -> None:
        """Back to `state` (from `clone_state`); refused by name for another model's state, nothing changed."""
        self.core.restore_state(0, state)

    def render(self):
        if self.render_mode != "rgb_array" or self._last is None:
            return None
        last = self._last if isinstance(self._last, np.ndarray) else self._last.cpu().numpy()
        return last[-1]


def _first(info: dict) -> dict:
    return {k: v[0] for k, v in info.items()}


if ENV_ID not in gymnasium.registry:
    gymnasium.register(
        id=ENV_ID,
        entry_point="flashdreams.gym:WorldEnv",
        vector_entry_point="flashdreams.gym:WorldVectorEnv",
        disable_env_checker=True,  # the worlds check their own inputs; the passive checker would copy frames
    )
