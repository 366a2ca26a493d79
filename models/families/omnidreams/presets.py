"""OmniDreams single-view presets: the Cosmos network with the HD-map embedding, the streaming window
and the few-step sampler of the public preset `omnidreams-sv-2steps-chunk2-loc6-lightvae-lighttae`.

Per chunk: `len_t` = 2 latent frames (8 video frames at 30 fps), 2 flow-matching steps
[1000, 450] (warped, shift 5), then a finalize forward at context noise 128 that writes the
chunk's K/V; the KV window holds 6 latent frames (the current chunk and the two before it),
no sink. 704x1280 gives 88x160 latents, 3520 tokens per latent frame.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.cosmos_dit import COSMOS_PREDICT25_2B, CosmosConfig
from flashdreams.models.preset_dict import preset_from_dict, preset_to_dict
from flashdreams.models.scheduler import FlowSchedule

VAE_STRIDE = (4, 8, 8)
HDMAP_CHANNELS = 16

OMNIDREAMS_2B = COSMOS_PREDICT25_2B.replace(padding_channel=False, hdmap_channels=HDMAP_CHANNELS)


@dataclass(frozen=True)
class Preset:
    """Everything that defines an OmniDreams stream, except its weights (`history`: keep per-step buffers)."""

    name: str
    description: str
    model: CosmosConfig
    family: str = "omnidreams"
    len_t: int = 2
    window_t: int = 6
    sink_t: int = 0
    denoising_timesteps: tuple[int, ...] = (1000, 450)
    shift: float = 5.0
    context_noise: float = 128.0
    text_len: int = 512
    height: int = 704
    width: int = 1280
    fps: int = 30
    decoder: str | None = "taehv"
    hdmap_input: str = "pixels"  # "pixels": rendered HD-map frames, encoded in the block; "latent": the latent
    hdmap_vae: dict | None = None  # WanVAEConfig fields of the HD-map encoder (None: LightVAE, dim 24)
    builtin: bool = False

    def __post_init__(self) -> None:
        if self.len_t < 1 or self.window_t < self.len_t or self.window_t % self.len_t:
            raise InvalidArgumentError(
                f"preset {self.name}: window_t ({self.window_t}) must be a positive multiple of len_t ({self.len_t})"
            )
        if self.hdmap_input not in ("pixels", "latent"):
            raise InvalidArgumentError(f"preset {self.name}: hdmap_input must be 'pixels' or 'latent'")
        if not self.model.hdmap_channels:
            raise InvalidArgumentError(f"preset {self.name}: the network needs the HD-map patch embedding")

    def schedule(self) -> FlowSchedule:
        return FlowSchedule.from_reference(list(self.denoising_timesteps), self.shift, True, self.context_noise)

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


TINY_OMNIDREAMS = CosmosConfig(
    dim=64,
    num_blocks=2,
    num_heads=2,
    adaln_lora_dim=16,
    text_dim=48,
    text_in_dim=80,
    padding_channel=False,
    hdmap_channels=HDMAP_CHANNELS,
)

PRESETS: list[Preset] = [
    Preset(
        name="omnidreams-sv-tiny",
        description="built-in tiny OmniDreams single view (random weights): chunks of 2 latent frames at 64x96, "
        "2 steps [1000, 450] shift 5, window 6, finalize at context noise 128",
        model=TINY_OMNIDREAMS,
        text_len=8,
        height=64,
        width=96,
        hdmap_vae={"dim": 8},
        builtin=True,
    ),
    Preset(
        name="omnidreams-sv-tiny-latent",
        description="built-in tiny OmniDreams single view taking the HD map as its latent (input `hdmap`)",
        model=TINY_OMNIDREAMS,
        text_len=8,
        height=64,
        width=96,
        hdmap_input="latent",
        builtin=True,
    ),
    Preset(
        name="omnidreams-sv",
        description="OmniDreams single view (omnidreams-sv-2steps-chunk2-loc6-lightvae-lighttae): 8 frames per chunk "
        "at 704x1280, 30 fps, steered by the rendered HD map (hdmap_video), 2 steps [1000, 450] shift 5, KV window "
        "6 latent frames, finalize at context noise 128",
        model=OMNIDREAMS_2B,
    ),
]
