"""LingBot-World presets: the Fast causal stream and the Base bidirectional two-expert sampler.

Fast (LingBot-World-Fast, one causal 14B network, as NVIDIA FlashDreams runs it): blocks of 3
latent frames, 4 warped steps [1000, 821, 642, 321] with shift 10 and sigma_max 0.999, the
timesteps cast to integers, a KV window of 63 frames (or the streaming window: 3 sink + 15
frames, with TAEHV), 464x832. Base (LingBot-World, two 14B experts as Wan2.2-I2V-A14B): one
clip per block, UniPC + classifier-free guidance, the high-noise expert while t >= 947, shift 10.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.lingbot_dit import LINGBOT_14B, LINGBOT_TINY
from flashdreams.models.preset_dict import preset_from_dict, preset_to_dict
from flashdreams.models.wan_config import WanConfig
from flashdreams.models.wan_i2v import pixel_latent_size

MODES = ("fast", "base")
FAST_STEPS = (1000, 821, 642, 321)


@dataclass(frozen=True)
class Preset:
    """Everything that defines a LingBot-World session, except its weights.

    `mode` "fast": a causal stream of `num_frame_per_block`-frame blocks against a KV ring of
    `sink_frames` + `window_frames` frames; the start image's conditioning y is encoded for the
    first `image_blocks` blocks (later blocks reuse the last one, as the Fast pipeline's streaming
    encoder does once its temporal context holds only black frames). `mode` "base": every block
    samples one clip of `num_frames` frames with `sampling_steps` UniPC steps and guidance,
    `boundary_ratio` * 1000 switching the high-noise expert to the low-noise one.
    `vae` holds WanVAEConfig fields of the image encoder (None: the released Wan2.1 VAE).
    """

    name: str
    description: str
    model: WanConfig
    family: str = "lingbot"
    mode: str = "fast"
    # fast
    denoising_step_list: tuple[int, ...] = FAST_STEPS
    timestep_shift: float = 10.0
    sigma_max: float = 0.999
    integer_timesteps: bool = True
    context_noise: float = 0.0
    num_frame_per_block: int = 3
    sink_frames: int = 0
    window_frames: int = 63
    image_blocks: int = 5
    # base
    num_frames: int = 81
    sampling_steps: int = 70
    guide_scale_high: float = 5.0
    guide_scale_low: float = 5.0
    boundary_ratio: float = 0.947
    # both
    vae: dict | None = None
    decoder: str | None = "wan-vae"
    height: int = 464
    width: int = 832
    builtin: bool = False  # weights are made by the package (deterministic random), no checkpoint

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidArgumentError(f"preset {self.name}: mode '{self.mode}' is not one of {MODES}")
        if self.num_frame_per_block < 1 or self.image_blocks < 1:
            raise InvalidArgumentError(f"preset {self.name}: num_frame_per_block and image_blocks must be >= 1")
        if self.sink_frames < 0 or self.window_frames < self.num_frame_per_block:
            raise InvalidArgumentError(
                f"preset {self.name}: a ring window of {self.window_frames} frames cannot hold a block of "
                f"{self.num_frame_per_block}; use a window at least that large"
            )
        if not 0.0 < self.boundary_ratio <= 1.0:
            raise InvalidArgumentError(f"preset {self.name}: boundary_ratio must lie in (0, 1]")

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


TINY_VAE = {"dim": 8}
_FAST = "LingBot-World-Fast (causal 14B, camera control): blocks of 3 latent frames, 4 warped steps, shift 10"

PRESETS: list[Preset] = [
    Preset(
        name="lingbot-world-fast-tiny",
        description="built-in tiny LingBot-World-Fast with deterministic random weights (no download): "
        "camera-controlled causal stream at 32x48, sink 1 + window 6 frames, TAEHV",
        model=LINGBOT_TINY,
        sink_frames=1,
        window_frames=6,
        image_blocks=2,
        vae=TINY_VAE,
        decoder="taehv",
        height=32,
        width=48,
        builtin=True,
    ),
    Preset(
        name="lingbot-world-base-tiny",
        description="built-in tiny LingBot-World Base: two random experts, 9 frames at 32x48, 4 UniPC steps",
        model=LINGBOT_TINY,
        mode="base",
        num_frames=9,
        sampling_steps=4,
        boundary_ratio=0.9,
        vae=TINY_VAE,
        height=32,
        width=48,
        builtin=True,
    ),
    Preset(
        name="lingbot-world-fast",
        description=_FAST + "; KV window 63 frames, 464x832, Wan VAE",
        model=LINGBOT_14B,
    ),
    Preset(
        name="lingbot-world-fast-stream",
        description=_FAST + "; streaming cache: 3 sink + 15 window frames, TAEHV, 464x832 (runs forever)",
        model=LINGBOT_14B,
        sink_frames=3,
        window_frames=15,
        decoder="taehv",
    ),
    Preset(
        name="lingbot-world-base-480p",
        description="LingBot-World Base: two 14B experts (boundary 0.947), 81 frames at 480x832, 70 UniPC steps, "
        "shift 10, guide scale 5",
        model=LINGBOT_14B,
        mode="base",
        height=480,
    ),
    Preset(
        name="lingbot-world-base-720p",
        description="LingBot-World Base at 720x1280: two 14B experts (boundary 0.947), 81 frames, 70 UniPC steps",
        model=LINGBOT_14B,
        mode="base",
        height=720,
        width=1280,
    ),
]
