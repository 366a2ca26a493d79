"""What fd-run feeds a session block by block: key/mouse scripts (--actions, or the built-in loop),
a start image (--image), a camera path (--camera) and a scripted drive (--drive demo).

Everything here is found through the engine's input specs (units "keys", "mouse", "image",
"camera"; the input "hdmap_video"), never through a family's code, so any family whose inputs
have those units gets the same options. Files are read and checked before the model loads
where they can be (`read_action_script`, `read_image`); what depends on the model is checked
once it is loaded, before the first block.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flashdreams.errors import InvalidArgumentError, NotFoundError

ACTION_FIELDS = ("keys", "mouse")
MAX_ACTION_FRAMES = 1_000_000


def read_action_script(path: str) -> list[dict]:
    """A --actions file, checked whole (it exists, is JSON, a non-empty list of objects with a "keys" list of
    key-name strings and an optional "mouse" pair of finite numbers); the key names are checked against the
    model once it is loaded (`action_tensors`)."""
    import json

    p = Path(path)
    if not p.is_file():
        raise NotFoundError(
            f'--actions \'{path}\' does not exist (a JSON list of per-frame objects like {{"keys": ["d"]}})'
        )
    try:
        script = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidArgumentError(f"--actions '{path}' is not valid JSON ({exc})") from None
    if not isinstance(script, list) or not script:
        raise InvalidArgumentError(
            f"--actions '{path}' must hold a non-empty JSON list with one object per video frame, "
            f'like [{{"keys": ["d"]}}]; got {type(script).__name__ if script else "an empty list"}'
        )
    if len(script) > MAX_ACTION_FRAMES:
        raise InvalidArgumentError(f"--actions '{path}' has {len(script)} frames; at most {MAX_ACTION_FRAMES}")
    for i, item in enumerate(script):
        where = f"--actions '{path}' frame {i}"
        if not isinstance(item, dict):
            raise InvalidArgumentError(f'{where} must be an object like {{"keys": ["d"]}}, got {json.dumps(item)}')
        unknown = sorted(set(item) - set(ACTION_FIELDS))
        if unknown:
            raise InvalidArgumentError(f"{where} has unknown fields {unknown}; known: {list(ACTION_FIELDS)}")
        keys = item.get("keys", [])
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise InvalidArgumentError(f'{where}: "keys" must be a list of key names (strings), got {json.dumps(keys)}')
        if len(set(keys)) != len(keys):
            raise InvalidArgumentError(f'{where}: "keys" names a key twice: {json.dumps(keys)}')
        if "mouse" in item:
            m = item["mouse"]
            ok = isinstance(m, list) and len(m) == 2
            ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in m)
            if not ok:
                raise InvalidArgumentError(
                    f'{where}: "mouse" must be [pitch, yaw], two finite numbers; got {json.dumps(m)}'
                )
    return script


def control_spec(specs, units: str):
    """The input among `specs` (an engine's `input_specs()`) of these units (keys, mouse) with per-frame rows
    [B, F, C], or None."""
    for spec in specs:
        if spec.units == units and len(spec.shape) == 3 and spec.when == "block":
            return spec
    return None


def action_tensors(script: list[dict], specs, preset_name: str, path: str) -> dict[str, Any]:
    """The script as per-frame tensors {input name: [T, C]}; refuses keys or mouse the model does not take.
    `specs`: the model's inputs (`Engine.input_specs()`, or `flashdreams.input_specs` before the load)."""
    import torch

    keys, mouse = control_spec(specs, "keys"), control_spec(specs, "mouse")
    if keys is None:
        raise InvalidArgumentError(f"--actions: {preset_name} takes no keyboard input (it is not a world you steer)")
    labels = list(keys.labels)
    out = {keys.name: torch.zeros(len(script), keys.shape[-1])}
    if mouse is not None:
        out[mouse.name] = torch.zeros(len(script), mouse.shape[-1])
    for i, item in enumerate(script):
        for k in item.get("keys", []):
            if k not in labels:
                raise InvalidArgumentError(
                    f"--actions '{path}' frame {i}: key '{k}' is not one of {preset_name}'s keys {labels}"
                )
            out[keys.name][i, labels.index(k)] = 1.0
        if "mouse" in item:
            if mouse is None:
                raise InvalidArgumentError(
                    f"--actions '{path}' frame {i}: {preset_name} takes no mouse input; drop \"mouse\""
                )
            row = out[mouse.name][i] = torch.tensor(item["mouse"], dtype=torch.float32)
            low = -math.inf if mouse.low is None else mouse.low
            high = math.inf if mouse.high is None else mouse.high
            if not bool(((row >= low) & (row <= high)).all()):
                raise InvalidArgumentError(
                    f"--actions '{path}' frame {i}: mouse {item['mouse']} outside [{mouse.low}, {mouse.high}]"
                )
    return out


LOOP_SIDE_FRAMES = 20  # frames per side of the built-in loop


def loop_script(engine, frames: int) -> dict[str, Any] | None:
    """The built-in script for a keyboard world with w/a/s/d: d, s, a, w for 20 frames each, round and round."""
    import torch

    keys = control_spec(engine.input_specs(), "keys")
    if keys is None or not {"w", "a", "s", "d"} <= set(keys.labels):
        return None
    labels = list(keys.labels)
    out = torch.zeros(frames, keys.shape[-1])
    for t in range(frames):
        out[t, labels.index("dsaw"[(t // LOOP_SIDE_FRAMES) % 4])] = 1.0
    return {keys.name: out}


def block_frames(plan, rows: int, k: int) -> tuple[int, int, int]:
    """(start, count, lead): block k's video frames in a per-frame script.

    A plan may cover fewer video frames in its first block (meta "action_rows_first_block": Matrix-Game's
    block 0 makes frames 0..8 from rows 3..11 of its 12 action rows). Those frames fill the block's last
    rows; the `lead` rows before them stand before the video (the model ignores them) and repeat the first.
    """
    first = plan.meta.get("action_rows_first_block", rows)
    return (0, first, rows - first) if k == 0 else (first + (k - 1) * rows, rows, 0)


def script_blocks(plan, rows: int, frames: int) -> int:
    """Blocks that play a script of `frames` video frames to its end."""
    first = plan.meta.get("action_rows_first_block", rows)
    return 1 + math.ceil(max(0, frames - first) / rows)


def key_controls(
    actions: list[dict] | None, path: str | None, engine, blocks: int | None, controls: dict[str, Any] | None = None
) -> tuple[dict[str, Any], int]:
    """Per-frame control tensors ({input: [T, C]}) from a script or the built-in loop, and the block count.
    `controls`: the script's tensors made already (against the same inputs, before the load)."""
    if actions is not None:
        if controls is None:
            controls = action_tensors(actions, engine.input_specs(), engine.preset_name, path)
    else:
        loop = loop_script(engine, 1)
        rows = control_spec(engine.input_specs(), "keys").shape[1] if loop else 1
        blocks = blocks or (script_blocks(engine.plan, rows, 4 * LOOP_SIDE_FRAMES) if loop else 7)
        return (loop_script(engine, blocks * rows) or {}), blocks
    rows = control_spec(engine.input_specs(), "keys").shape[1]
    frames = next(iter(controls.values())).shape[0]
    return controls, blocks or script_blocks(engine.plan, rows, frames)


def read_image(path: str, height: int | None = None, width: int | None = None):
    """An image file as float [1, 3, H, W] in [0, 1]: centre-cropped to the aspect H:W and resized (bicubic),
    the way the I2V releases fit a start image. Without a size it is read as it is."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise NotFoundError(f"--image '{path}' does not exist (a PNG or JPEG start image)")
    try:
        from PIL import Image
    except ImportError:
        raise InvalidArgumentError("--image needs Pillow: pip install 'flashdreams[serve]' (or pillow)") from None
    try:
        img = Image.open(p).convert("RGB")
    except Exception as exc:  # PIL raises several types for unreadable files
        raise InvalidArgumentError(f"--image '{path}' cannot be read as an image ({exc})") from None
    if height is not None and width is not None:
        w, h = img.size
        scale = max(width / w, height / h)
        cw, ch = round(width / scale), round(height / scale)
        left, top = (w - cw) // 2, (h - ch) // 2
        img = img.crop((left, top, left + cw, top + ch)).resize((width, height), Image.BICUBIC)
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.size[1], img.size[0], 3)
    return data.permute(2, 0, 1)[None].float() / 255.0


def image_input(engine, path: str) -> dict[str, Any]:
    """--image as the engine's start-image input (units "image", shape [B, 3, H, W])."""
    for spec in engine.input_specs():
        if spec.units == "image" and len(spec.shape) == 4 and spec.shape[1] == 3:
            b, _, h, w = spec.shape
            return {spec.name: read_image(path, h, w).expand(b, -1, -1, -1)}
    raise InvalidArgumentError(f"--image: {engine.preset_name} takes no start image")


BlockFeed = Callable[[int], dict[str, Any]]  # block index -> the inputs to set before it; called once per block


def camera_feed(engine, path: str | None) -> BlockFeed | None:
    """A camera path file (or the built-in orbit) as per-block camera inputs, for models with a `poses`
    input of units "camera"; None for other models."""
    spec = engine.plan.inputs.get("poses")
    if spec is None or spec.units != "camera":
        if path is not None:
            raise InvalidArgumentError(f"--camera: {engine.preset_name} takes no camera poses")
        return None
    from flashdreams.models.camera_path import camera_inputs, load_camera_path

    meta = engine.plan.meta
    camera = load_camera_path(path, meta["height"], meta["width"]) if path is not None else None
    return lambda k: camera_inputs(engine.plan, camera, k)


def drive_feed(engine, name: str) -> BlockFeed:
    """--drive demo: the scripted route's HD map, rendered on the device chunk by chunk (input `hdmap_video`)."""
    from flashdreams.models.hdmap import HDMAP_INPUT, DemoDrive

    drive = DemoDrive.for_plan(engine.plan, engine.device, who=f"--drive: {engine.preset_name}")
    batch = engine.plan.inputs[HDMAP_INPUT].shape[0]
    return lambda k: {HDMAP_INPUT: drive.next_chunk().expand(batch, -1, -1, -1, -1)}


class Feeds:
    """The per-frame key/mouse rows and the per-block feeds fd-run sets before each block."""

    def __init__(self, controls: dict[str, Any], per_block: list[BlockFeed]) -> None:
        self.controls = controls
        self.per_block = per_block
        # The session's block index at this run's block 0 (fd-run --resume): the scripts play from their
        # start there, each block taking as many frames as its kind does.
        self.first_block = 0

    def start_inputs(self) -> dict[str, Any]:
        """Block 0's per-block inputs, for creating the session (some are required at creation)."""
        out: dict[str, Any] = {}
        for feed in self.per_block:
            out.update(feed(0))
        return out

    def step(self, session, k: int):
        """Block k: its rows of each control, block k's feeds (block 0's came with `start_inputs`), one step."""
        import torch

        for name, per_frame in self.controls.items():
            spec = session.plan.inputs[name]
            rows = spec.shape[1]
            start, count, lead = block_frames(session.plan, rows, self.first_block + k)
            start -= block_frames(session.plan, rows, self.first_block)[0]
            idx = torch.arange(start, start + count).clamp(max=per_frame.shape[0] - 1)
            chunk = per_frame[idx]
            if lead:
                chunk = torch.cat([chunk[:1].expand(lead, *chunk.shape[1:]), chunk])
            session.set_input(name, chunk[None].expand(spec.shape[0], *chunk.shape))
        if k:
            for feed in self.per_block:
                for name, value in feed(k).items():
                    session.set_input(name, value)
        return session.step()
