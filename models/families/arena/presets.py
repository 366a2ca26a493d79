"""The arena preset: the project's own small world model (trained by train/train_arena.py), built in."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.families.arena.model import ArenaConfig
from flashdreams.models.preset_dict import preset_from_dict, preset_to_dict

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = "arena.safetensors"


@dataclass(frozen=True)
class Preset:
    """A trained arena world: its architecture, the built-in start arenas and its weights file."""

    name: str
    description: str
    model: ArenaConfig = field(default_factory=ArenaConfig)
    family: str = "arena"
    builtin: bool = True  # the weights ship in the package
    weights: str = WEIGHTS_FILE  # under models/families/arena/weights/
    settle: float = 0.02  # palette projection of settled pixels (model.ArenaStep.project); 0: off
    start_seeds: int = 8  # built-in start arenas: world seeds 0 .. start_seeds - 1
    fps: float = 16.0
    height: int = 64
    width: int = 64

    @property
    def weights_path(self) -> Path:
        return WEIGHTS_DIR / self.weights

    def latent_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """The arena has one resolution; anything else is refused (fd-run checks this before loading)."""
        height, width = height or self.height, width or self.width
        if (height, width) != (self.height, self.width):
            raise InvalidArgumentError(
                f"resolution {height}x{width}: the {self.name} world is trained at {self.height}x{self.width} only"
            )
        return height, width

    def to_dict(self) -> dict:
        return preset_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preset:
        """The inverse of `to_dict` (an engine manifest stores its preset this way)."""
        return preset_from_dict(cls, d, {"model": ArenaConfig})


PRESETS: list[Preset] = [
    Preset(
        name="arena",
        description="the project's trained 64x64 arena world: move the yellow agent with W/A/S/D (built in, "
        "real time on a CPU)",
    )
]
