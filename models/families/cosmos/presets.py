"""Cosmos-Predict2.5 presets: the network config with the release's sampler settings, size and decoder.

The settings are those of the released 2B inference config (the fixture set's cosmos.md): UniPC
with Karras sigmas (sigma_max 200, sigma_min 0.01, rho 7; 35 steps run 36 evaluations), guidance
7 as `c + 7(c - u)` with a negative prompt, conditioning frames at timestep 0.1, 93 frames
(24 latent frames) at 704x1280, the Wan2.1 VAE as tokenizer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.cosmos_dit import COSMOS_PREDICT25_2B, CosmosConfig
from flashdreams.models.preset_dict import preset_from_dict, preset_to_dict

VAE_STRIDE = (4, 8, 8)


@dataclass(frozen=True)
class Preset:
    """Everything that defines a Cosmos-Predict2.5 clip sampler, except its weights.

    One session block samples one clip of `num_frames` frames; its first `num_cond_frames`
    latent frames are given (`cond_latent`: 1 for image2world, 2 for video2world, 0 for
    text2world). `text_len` rows of `prompt_embeds` (a shorter prompt is zero-padded).
    `history` keeps every solver step's buffers in the session (parity debugging).
    """

    name: str
    description: str
    model: CosmosConfig
    family: str = "cosmos"
    num_frames: int = 93
    num_steps: int = 35
    guidance: float = 7.0
    sigma_max: float = 200.0
    sigma_min: float = 0.01
    rho: float = 7.0
    cond_timestep: float = 0.1
    num_cond_frames: int = 1
    text_len: int = 512
    height: int = 704
    width: int = 1280
    decoder: str | None = "wan-vae"
    decode_chunk: int = 3
    history: bool = False
    builtin: bool = False

    def __post_init__(self) -> None:
        if self.num_frames < 1 or (self.num_frames - 1) % VAE_STRIDE[0]:
            raise InvalidArgumentError(f"preset {self.name}: num_frames must be 1 + 4k; got {self.num_frames}")
        if not 0 <= self.num_cond_frames < self.latent_frames:
            raise InvalidArgumentError(
                f"preset {self.name}: num_cond_frames {self.num_cond_frames} must lie in [0, {self.latent_frames})"
            )

    @property
    def latent_frames(self) -> int:
        return 1 + (self.num_frames - 1) // VAE_STRIDE[0]

    def latent_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        height, width = height or self.height, width or self.width
        step = VAE_STRIDE[1] * 2
        if height <= 0 or width <= 0 or height % step or width % step:
            raise InvalidArgumentError(
                f"resolution {height}x{width}: height and width must be positive multiples of {step} for {self.name}"
            )
        return height // VAE_STRIDE[1], width // VAE_STRIDE[2]

    def replace(self, **changes) -> Preset:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return preset_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preset:
        """The inverse of `to_dict` (an engine manifest stores its preset this way)."""
        return preset_from_dict(cls, d, {"model": CosmosConfig})


# The real architecture at toy size (the fixtures' widths), so a CPU samples a clip in seconds.
TINY_COSMOS = CosmosConfig(dim=64, num_blocks=2, num_heads=2, adaln_lora_dim=16, text_dim=48, text_in_dim=80)

PRESETS: list[Preset] = [
    Preset(
        name="cosmos-predict2.5-tiny",
        description="built-in tiny Cosmos-Predict2.5 (random weights): 9 frames at 64x96 from 1 latent frame, "
        "3 Karras UniPC steps, guidance 7",
        model=TINY_COSMOS,
        num_frames=9,
        num_steps=3,
        text_len=8,
        height=64,
        width=96,
        builtin=True,
    ),
    Preset(
        name="cosmos-predict2.5-2b",
        description="Cosmos-Predict2.5-2B image2world: 93 frames at 704x1280, 35 Karras UniPC steps (36 evaluations), "
        "guidance 7 with a negative prompt",
        model=COSMOS_PREDICT25_2B,
    ),
    Preset(
        name="cosmos-predict2.5-2b-video2world",
        description="Cosmos-Predict2.5-2B video2world: as cosmos-predict2.5-2b, conditioned on 2 latent frames "
        "(the first 5 video frames)",
        model=COSMOS_PREDICT25_2B,
        num_cond_frames=2,
    ),
]
