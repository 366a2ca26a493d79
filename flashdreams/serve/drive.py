"""fd-serve --drive demo: a driving world (OmniDreams) steered from the page with steer and throttle.

The model is conditioned on an HD-map video, not on controls. Each session gets a `DemoDrive`
(models/hdmap.py): an ego car on the demo road whose HD map is rendered on the device chunk by
chunk. The client sends `drive` = [steer, throttle] (each in [-1, 1]; until it does, the scripted
route drives), and before every block the stepper renders the next chunk along the car's path
and sets it as the session's `hdmap_video`, which the drive owns (clients do not send it).
"""

from __future__ import annotations

import torch

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.family import InputSpec
from flashdreams.models.hdmap import HDMAP_INPUT, DemoDrive
from flashdreams.serve.stepper import BlockOut, Stepper

HDMAP = HDMAP_INPUT
DRIVE = InputSpec(
    "drive",
    (1, 2),
    "float32",
    "the demo car's controls, held until changed: steer (> 0 turns left) and throttle (> 0 speeds up, "
    "< 0 brakes); the HD map the model sees is rendered along the car's path every block",
    units="controls",
    low=-1.0,
    high=1.0,
    labels=("steer", "throttle"),
)


class DriveStepper(Stepper):
    """Wraps a stepper of an HD-map model: per-session demo drives feed `hdmap_video`; `drive` steers them."""

    def __init__(self, inner: Stepper) -> None:
        self.inner, self.engine = inner, inner.engine
        self._new_drive()  # refuses a model without an HD-map input, before any session opens
        self.drives: dict = {}
        self.fresh: set[str] = set()  # sessions whose next block uses the chunk they were opened/reset with

    def input_specs(self) -> list[InputSpec]:
        return [s for s in self.inner.input_specs() if s.name != HDMAP] + [DRIVE]

    def _new_drive(self) -> DemoDrive:
        return DemoDrive.for_plan(self.engine.plan, self.engine.device, who=f"--drive: {self.engine.preset_name}")

    def open(self, sid: str, seed: int, inputs: dict | None = None) -> None:
        drive = self._new_drive()
        self.inner.open(sid, seed, {**(inputs or {}), HDMAP: drive.next_chunk()})
        self.drives[sid] = drive
        self.fresh.add(sid)

    def close(self, sid: str) -> None:
        self.drives.pop(sid, None)
        self.fresh.discard(sid)
        self.inner.close(sid)

    def check_input(self, sid: str, name: str, value: torch.Tensor) -> torch.Tensor:
        if name == HDMAP:
            raise InvalidArgumentError(f"'{HDMAP}' comes from the demo drive here; steer it with 'drive'")
        if name != DRIVE.name:
            return self.inner.check_input(sid, name, value)
        if not isinstance(value, torch.Tensor) or value.numel() != 2:
            raise InvalidArgumentError(f"input 'drive' must be [steer, throttle] (shape [1, 2]); got {value!r}")
        v = value.detach().float().reshape(1, 2).cpu()  # host values from a client, not a device step
        if not bool(torch.isfinite(v).all()) or bool((v.abs() > 1).any()):
            raise InvalidArgumentError(f"input 'drive': steer and throttle must be finite and in [-1, 1]; got {v}")
        return v

    def set_input(self, sid: str, name: str, value: torch.Tensor) -> None:
        if name == DRIVE.name:
            self.drives[sid].set_controls(float(value[0, 0]), float(value[0, 1]))
        else:
            self.inner.set_input(sid, name, value)

    def reset(self, sid: str, seed: int | None) -> None:
        self.inner.reset(sid, seed)
        self.drives[sid] = drive = self._new_drive()
        self.inner.set_input(sid, HDMAP, drive.next_chunk())
        self.fresh.add(sid)

    def step(self, sids: list[str]) -> dict[str, BlockOut]:
        for sid in sids:
            if sid in self.drives and sid not in self.fresh:
                self.inner.set_input(sid, HDMAP, self.drives[sid].next_chunk())
            self.fresh.discard(sid)
        return self.inner.step(sids)

    def session_bytes(self) -> int:
        return self.inner.session_bytes()

    def parked(self) -> int:
        return self.inner.parked()
