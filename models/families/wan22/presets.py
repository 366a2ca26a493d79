"""Causal Wan2.2 A14B presets (FastVideo's two-expert streaming model): configs, schedule, cache, decoder.

Both experts share one architecture (Wan2.1-T2V-14B's: dim 5120, 40 layers, 40 heads). A
block runs the 8 warped steps [1000, 850, 700, 550, 350, 275, 200, 125] with shift 5; the
high-noise expert takes the steps whose timestep is >= `boundary_ratio * 1000`, the
low-noise expert the rest. The first block is one latent frame (FIRST_BLOCK_FRAMES), later
blocks `num_frame_per_block` (3), as FastVideo's MoE path hard-codes it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.families.wan22.schedule import MoESchedule
from flashdreams.models.preset_dict import preset_from_dict, preset_to_dict
from flashdreams.models.wan_config import WAN21_T2V_14B, WanConfig
from flashdreams.models.wan_i2v import pixel_latent_size

WAN22_STEPS = (1000, 850, 700, 550, 350, 275, 200, 125)
FIRST_BLOCK_FRAMES = 1  # FastVideo's MoE path makes block 0 a single latent frame


@dataclass(frozen=True)
class Preset:
    """Everything that defines a streaming session of the two-expert model, except its weights.

    `sink_frames` + `window_frames` size each expert's KV ring (frames; the current block is
    part of the window). `i2v` prefills a start image's latent into both caches as block 0
    instead of generating that frame; `vae` holds WanVAEConfig fields of its encoder (None:
    the released Wan2.1 VAE, which Wan2.2 A14B uses).
    """

    name: str
    description: str
    model: WanConfig
    family: str = "wan22"
    denoising_step_list: tuple[int, ...] = WAN22_STEPS
    timestep_shift: float = 5.0
    warp_denoising_step: bool = True
    boundary_ratio: float = 0.875
    context_noise: float = 0.0
    num_frame_per_block: int = 3
    sink_frames: int = 0
    window_frames: int = 21
    i2v: bool = False
    vae: dict | None = None
    decoder: str | None = "wan-vae"
    height: int = 480
    width: int = 832
    builtin: bool = False  # weights are made by the package (deterministic random), no checkpoint

    def __post_init__(self) -> None:
        nf, first = self.num_frame_per_block, FIRST_BLOCK_FRAMES
        if nf < 1:
            raise InvalidArgumentError(f"preset {self.name}: num_frame_per_block must be >= 1, got {nf}")
        if self.sink_frames < 0 or self.window_frames < max(nf, first):
            raise InvalidArgumentError(
                f"preset {self.name}: a ring of sink {self.sink_frames} + window {self.window_frames} frames "
                f"cannot hold a block of {max(nf, first)} frames; use a window at least that large"
            )
        if self.sink_frames > first and self.sink_frames != first + nf * ((self.sink_frames - first) // nf):
            raise InvalidArgumentError(
                f"preset {self.name}: sink_frames {self.sink_frames} must cover whole blocks "
                f"({first} frame(s), then {nf} per block)"
            )
        if not 0.0 < self.boundary_ratio <= 1.0:
            raise InvalidArgumentError(f"preset {self.name}: boundary_ratio must lie in (0, 1]")

    def schedule(self) -> MoESchedule:
        return MoESchedule.from_reference(
            self.denoising_step_list,
            self.timestep_shift,
            self.warp_denoising_step,
            self.boundary_ratio,
            self.context_noise,
        )

    def latent_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """Latent (h, w) for a pixel resolution; both must be positive multiples of 16 (VAE x8, patch x2)."""
        return pixel_latent_size(height or self.height, width or self.width, self.model.patch_size[1], self.name)

    def replace(self, **changes) -> Preset:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return preset_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preset:
        """The inverse of `to_dict` (an engine manifest stores its preset this way)."""
        return preset_from_dict(cls, d, {"model": WanConfig})


# Both A14B experts: Wan2.1-T2V-14B's shape (the T2V experts take the 16 latent channels only).
WAN22_A14B_EXPERT = WAN21_T2V_14B
# The toy size of the parity fixture (dim 64, 2 heads, 2 layers), for tests and a CPU session in seconds.
TINY_WAN22 = WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, text_len=16)
TINY_VAE = {"dim": 8}

_T2V = "FastVideo causal Wan2.2-T2V-A14B: two 14B experts (boundary 0.875), 8 warped steps, shift 5"
PRESETS: list[Preset] = [
    Preset(
        name="wan2.2-tiny",
        description="built-in tiny two-expert causal Wan2.2 T2V, deterministic random weights (no download); "
        "sink 1 + window 6 frames, runs forever",
        model=TINY_WAN22,
        sink_frames=1,
        window_frames=6,
        height=48,
        width=64,
        builtin=True,
    ),
    Preset(
        name="wan2.2-i2v-tiny",
        description="built-in tiny two-expert causal Wan2.2 I2V: the start image's latent prefilled into both "
        "caches as block 0; sink 1 + window 6 frames",
        model=TINY_WAN22,
        sink_frames=1,
        window_frames=6,
        i2v=True,
        vae=TINY_VAE,
        height=48,
        width=64,
        builtin=True,
    ),
    Preset(
        name="wan2.2-a14b-t2v",
        description=_T2V + "; the reference's full 21-frame cache (7 blocks = 19 latent frames as FastVideo "
        "runs it; later blocks overwrite the oldest frames, no sink)",
        model=WAN22_A14B_EXPERT,
    ),
    Preset(
        name="wan2.2-a14b-t2v-rolling",
        description=_T2V + "; rolling cache: sink 1 (block 0's frame) + 18 frames (the reference's "
        "longest span), runs forever in bounded memory",
        model=WAN22_A14B_EXPERT,
        sink_frames=1,
        window_frames=18,
    ),
    Preset(
        name="wan2.2-a14b-i2v",
        description=_T2V + "; I2V: the start image (Wan2.1 VAE latent) prefilled into both experts' caches as "
        "block 0, then generated blocks; rolling cache sink 1 + 18",
        model=WAN22_A14B_EXPERT,
        sink_frames=1,
        window_frames=18,
        i2v=True,
    ),
]
