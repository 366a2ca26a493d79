"""Camera paths for camera-controlled sessions: a built-in orbit, and path files (`fd-run --camera path.json`).

A path file is JSON with per-frame poses or a small list of moves:

    {"intrinsics": [fx, fy, cx, cy],          # pixels; optional (default: a ~60 degree field of view)
     "intrinsics_hw": [480, 832],             # the size they are given at (default: the session's)
     "world_scale": 1.0,                      # optional (default: computed from the path, camera_rays.world_scale_of)
     "poses": [[[...4x4...]], ...]}           # camera-to-world, OpenCV axes (x right, y down, z forward)

or, in place of "poses", "moves": ["forward 2 m", "yaw 30 deg in 24 frames", "hold in 12 frames", ...]:
each move is `<verb> <amount> <unit> [in N frames]` (default 12 frames, one block), applied in the
camera's own axes and spread evenly over its frames. Verbs: forward, back, left, right, up, down
(units m), yaw (positive turns right), pitch (positive looks up), roll (units deg), and `hold`.
The path starts at the identity; only relative motion matters to the model.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.camera_rays import VAE_TIME, check_intrinsics, check_poses, world_scale_of

DEFAULT_MOVE_FRAMES = 12
_MOVE = re.compile(r"^\s*(\w+)(?:\s+(-?\d+(?:\.\d+)?)\s*(m|deg)?)?(?:\s+in\s+(\d+)\s+frames?)?\s*$")
_TRANSLATE = {
    "forward": (2, 1.0),
    "back": (2, -1.0),
    "right": (0, 1.0),
    "left": (0, -1.0),
    "down": (1, 1.0),
    "up": (1, -1.0),
}
# OpenCV camera axes: yaw turns about y (down), so turning right is a positive angle; pitch up is about -x.
_ROTATE = {"yaw": (1, 1.0), "pitch": (0, -1.0), "roll": (2, 1.0)}


def _rotation(axis: int, radians: float) -> torch.Tensor:
    c, s = math.cos(radians), math.sin(radians)
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    r = torch.eye(4, dtype=torch.float64)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def orbit_path(num_frames: int, radius: float = 2.0, degrees_per_frame: float = 1.0) -> torch.Tensor:
    """The built-in path [num_frames, 4, 4]: the camera circles a point `radius` m ahead, always facing it."""
    if num_frames < 1:
        raise InvalidArgumentError(f"camera path: need at least one frame, got {num_frames}")
    out = []
    for i in range(num_frames):
        rot = _rotation(1, math.radians(degrees_per_frame * i))
        centre = torch.tensor([0.0, 0.0, radius], dtype=torch.float64)
        pose = rot.clone()
        pose[:3, 3] = centre - rot[:3, :3] @ centre  # the point `radius` ahead stays ahead
        out.append(pose)
    return torch.stack(out).float()


def moves_path(moves: list[str]) -> torch.Tensor:
    """Poses [1 + sum(frames), 4, 4] of a list of moves (see the module docstring)."""
    pose = torch.eye(4, dtype=torch.float64)
    out = [pose]
    for text in moves:
        m = _MOVE.match(str(text))
        if not m:
            raise InvalidArgumentError(f"camera path: cannot read the move '{text}' (e.g. 'forward 2 m in 24 frames')")
        verb, amount, unit, frames = m.group(1).lower(), m.group(2), m.group(3), m.group(4)
        n = int(frames) if frames else DEFAULT_MOVE_FRAMES
        if n < 1:
            raise InvalidArgumentError(f"camera path: the move '{text}' needs at least 1 frame")
        step = torch.eye(4, dtype=torch.float64)
        if verb in _TRANSLATE:
            if amount is None or unit not in (None, "m"):
                raise InvalidArgumentError(f"camera path: '{text}' needs a distance in m")
            axis, sign = _TRANSLATE[verb]
            step[axis, 3] = sign * float(amount) / n
        elif verb in _ROTATE:
            if amount is None or unit not in (None, "deg"):
                raise InvalidArgumentError(f"camera path: '{text}' needs an angle in deg")
            axis, sign = _ROTATE[verb]
            step = _rotation(axis, sign * math.radians(float(amount)) / n)
        elif verb != "hold":
            known = sorted([*_TRANSLATE, *_ROTATE, "hold"])
            raise InvalidArgumentError(f"camera path: unknown move '{verb}' in '{text}'; known: {known}")
        for _ in range(n):
            pose = pose @ step  # in the camera's own axes
            out.append(pose)
    return torch.stack(out).float()


# A camera motion per video frame, in the camera's own axes and the units of a path file's moves: metres
# right / down / forward, degrees of pitch (positive looks up) / yaw (positive turns right) / roll.
MOTION_LABELS = ("right", "down", "forward", "pitch", "yaw", "roll")


def motion_step(motion: torch.Tensor) -> torch.Tensor:
    """One frame's motion [6] (MOTION_LABELS) -> the relative transform [4, 4] float64 it applies.

    The rotation is yaw, then pitch, then roll about the camera's axes; the translation is in the
    camera's axes before the turn (pose_next = pose @ step)."""
    m = [float(v) for v in motion.reshape(6).tolist()]
    step = torch.eye(4, dtype=torch.float64)
    for label in ("yaw", "pitch", "roll"):
        axis, sign = _ROTATE[label]
        step = step @ _rotation(axis, sign * math.radians(m[MOTION_LABELS.index(label)]))
    step[:3, 3] = torch.tensor(m[:3], dtype=torch.float64)
    return step


def integrate_motion(start: torch.Tensor, motions: torch.Tensor) -> torch.Tensor:
    """Poses [F, 4, 4] (float64) of a camera at `start` [4, 4] that makes motions [F, 6], one per frame:
    pose f = start @ step(m_0) @ ... @ step(m_f)."""
    if motions.dim() != 2 or motions.shape[1] != len(MOTION_LABELS):
        raise InvalidArgumentError(f"camera motion: expected [frames, 6] {MOTION_LABELS}, got {list(motions.shape)}")
    pose = start.to(torch.float64)
    out = []
    for m in motions:
        pose = pose @ motion_step(m)
        out.append(pose)
    return torch.stack(out)


def default_intrinsics(height: int, width: int) -> torch.Tensor:
    """A pinhole camera of about 60 degrees horizontal field of view, centred, at height x width."""
    f = 0.866 * width
    return torch.tensor([f, f, width / 2, height / 2], dtype=torch.float32)


def load_camera_path(path: str | os.PathLike, height: int, width: int) -> dict[str, torch.Tensor]:
    """A path file -> {'poses' [N, 4, 4], 'intrinsics' [4] at height x width, 'world_scale' []}; validated."""
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidArgumentError(f"camera path '{path}' cannot be read as JSON: {exc}") from None
    if not isinstance(spec, dict) or ("poses" in spec) == ("moves" in spec):
        raise InvalidArgumentError(f"camera path '{path}': give exactly one of 'poses' or 'moves'")
    poses = torch.tensor(spec["poses"], dtype=torch.float32) if "poses" in spec else moves_path(spec["moves"])
    check_poses(poses, f"camera path '{path}' poses")
    k = default_intrinsics(height, width)
    if "intrinsics" in spec:
        k = torch.tensor(spec["intrinsics"], dtype=torch.float32)
        h0, w0 = spec.get("intrinsics_hw", (height, width))
        k = k * torch.tensor([width / w0, height / h0, width / w0, height / h0])
    check_intrinsics(k, f"camera path '{path}' intrinsics")
    scale = spec.get("world_scale")
    ws = torch.tensor(float(scale)) if scale is not None else world_scale_of(poses)
    if not bool(torch.isfinite(ws)) or float(ws) < 0:
        raise InvalidArgumentError(f"camera path '{path}': world_scale must be a finite number >= 0")
    return {"poses": poses, "intrinsics": k, "world_scale": ws}


def block_poses(path: torch.Tensor, block: int, frames_per_block: int) -> torch.Tensor:
    """The poses [4nf, 4, 4] a causal block takes from a per-video-frame path [N, 4, 4].

    Block 0: video frames 0 .. 4nf-1; block k >= 1: 4nf*k - 3 .. 4nf*k + 4nf - 4 (its latent
    frame j is video frame 4*(nf*k + j), the last of its group of 4). Past the end of the path
    the last pose is held.
    """
    chunk = VAE_TIME * frames_per_block
    start = 0 if block == 0 else chunk * block - (VAE_TIME - 1)
    idx = torch.arange(start, start + chunk).clamp(max=path.shape[0] - 1)
    return path[idx]


def camera_inputs(plan, camera: dict[str, torch.Tensor] | None, block: int) -> dict[str, torch.Tensor]:
    """The camera inputs to set before `block` of a session of `plan` from a loaded path (None: the orbit).

    A causal plan (poses [B, 4nf, 4, 4]) gets the block's chunk of the path (`block_poses`); a clip
    plan (poses [B, N, 4, 4]) the path's first N poses (the last held past its end). Intrinsics and
    the world scale go with every block; the batch rows share the path.
    """
    spec = plan.inputs["poses"]
    b, n = spec.shape[0], spec.shape[1]
    height, width = plan.meta["height"], plan.meta["width"]
    if camera is None:
        path = orbit_path(4 * n * (block + 2))
        camera = {"poses": path, "intrinsics": default_intrinsics(height, width), "world_scale": world_scale_of(path)}
    path = camera["poses"]
    if plan.ring is not None:
        poses = block_poses(path, block, plan.ring.frames_per_block)
    else:
        poses = path[torch.arange(n).clamp(max=path.shape[0] - 1)]
    out = {"poses": poses.expand(b, -1, -1, -1), "intrinsics": camera["intrinsics"].reshape(1, 4).expand(b, -1)}
    if "world_scale" in plan.inputs:
        out["world_scale"] = camera["world_scale"].reshape(1).expand(b)
    return out
