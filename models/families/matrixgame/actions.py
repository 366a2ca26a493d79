"""Action scripts: per-video-frame keys and mouse moves -> the `keyboard` / `mouse` input of each block.

A script is a JSON list with one object per video frame, `{"keys": ["w", "a"], "mouse": [pitch, yaw]}`:
`keys` by name, lower case, from the mode's keys (absent or [] = nothing pressed); `mouse` the camera
rotation of that frame in the units the model was trained on (pitch > 0 looks up, yaw > 0 turns
right; the demos use +-0.1), absent = [0, 0], refused for a mode without mouse. A script shorter
than the run repeats its last entry.

Blocks read the frames this way (the plan's `meta["action_rows_per_block"]` R and
`["action_rows_first_block"]` R0): block 0 takes frames [0, R0) as the last R0 rows of its input,
block b >= 1 the R frames after the previous block's (frames [R0 + R(b-1), R0 + Rb)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flashdreams.errors import InvalidArgumentError

_CAM = 0.1
# The built-in demo per mode (used when no script is given): one entry per 12 video frames.
_DEMO_STEPS = {
    "universal": [(["w"], [0, 0]), (["w"], [0, _CAM]), (["w", "a"], [0, 0]), ([], [_CAM, 0]), (["s"], [0, -_CAM])],
    "gta_drive": [(["w"], [0, 0]), (["w"], [0, _CAM]), (["w"], [0, -_CAM]), (["s"], [0, 0])],
    "templerun": [(["q"], None), (["w"], None), (["a"], None), (["s"], None), (["d"], None)],
}


def demo_script(mode: str, frames_per_step: int = 12) -> list[dict]:
    """The built-in demo action script of `mode` (forward, turns, strafes, back)."""
    if mode not in _DEMO_STEPS:
        raise InvalidArgumentError(f"no demo action script for mode '{mode}'")
    out = []
    for keys, mouse in _DEMO_STEPS[mode]:
        entry = {"keys": list(keys)} | ({"mouse": list(mouse)} if mouse is not None else {})
        out += [entry] * frames_per_step
    return out


def script_frames(
    script: Sequence, keys: Sequence[str], mouse: bool, num_frames: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(keyboard [num_frames, K], mouse [num_frames, 2] or None) from a script, checked whole first."""
    if not isinstance(script, list | tuple) or not script:
        raise InvalidArgumentError("action script: expected a non-empty JSON list of per-frame objects")
    col = {k: i for i, k in enumerate(keys)}
    kb = torch.zeros(len(script), len(keys))
    ms = torch.zeros(len(script), 2)
    for i, entry in enumerate(script):
        if not isinstance(entry, dict):
            raise InvalidArgumentError(f"action script frame {i}: expected an object, got {type(entry).__name__}")
        extra = sorted(set(entry) - {"keys", "mouse"})
        if extra:
            raise InvalidArgumentError(f"action script frame {i}: unknown fields {extra} (known: keys, mouse)")
        pressed = entry.get("keys", [])
        if not isinstance(pressed, list) or not all(isinstance(k, str) for k in pressed):
            raise InvalidArgumentError(f"action script frame {i}: 'keys' must be a list of key names")
        for k in pressed:
            if k not in col:
                raise InvalidArgumentError(f"action script frame {i}: key '{k}' is not a key of this mode {list(keys)}")
            kb[i, col[k]] = 1.0
        if "mouse" in entry:
            if not mouse:
                raise InvalidArgumentError(f"action script frame {i}: this mode has no mouse input")
            m = entry["mouse"]
            ok = isinstance(m, list) and len(m) == 2 and all(isinstance(v, int | float) for v in m)
            if not ok or not all(abs(float(v)) < float("inf") for v in m):
                raise InvalidArgumentError(f"action script frame {i}: 'mouse' must be two finite numbers [pitch, yaw]")
            ms[i] = torch.tensor([float(v) for v in m])
    idx = torch.arange(num_frames).clamp(max=len(script) - 1)  # a short script repeats its last entry
    return kb[idx], (ms[idx] if mouse else None)


def block_rows(per_frame: torch.Tensor, block: int, rows: int, first_rows: int) -> torch.Tensor:
    """The block's input rows [..., rows, C] from per-video-frame rows [..., N, C] (frames past N repeat
    the last). Block 0's leading rows - first_rows rows stand before the video: they repeat frame 0."""
    start = first_rows - rows + rows * block
    idx = torch.arange(start, start + rows).clamp(min=0, max=per_frame.shape[-2] - 1)
    return per_frame.index_select(-2, idx)


def video_frames(num_blocks: int, rows: int, first_rows: int) -> int:
    """Video frames of `num_blocks` blocks."""
    return 0 if num_blocks < 1 else first_rows + rows * (num_blocks - 1)
