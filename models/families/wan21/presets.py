"""Wan2.1 T2V / I2V presets: a config with the release's sampling settings, size and decoder.

The settings are `generate.py`'s defaults of the Wan2.1 release: 50 UniPC steps for T2V and
40 for I2V, shift 5 (3 for I2V at 480p), guide scale 5, 81 frames (21 latent frames).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from flashdreams.models.preset_dict import preset_from_dict, preset_to_dict
from flashdreams.models.wan_config import WAN21_I2V_14B, WAN21_T2V_1_3B, WAN21_T2V_14B, WanConfig
from flashdreams.models.wan_i2v import latent_frames, latent_size, pixel_latent_size


@dataclass(frozen=True)
class Preset:
    """Everything that defines a Wan2.1 clip sampler, except its weights.

    One session block samples one whole clip of `num_frames` frames. For I2V, the start
    image comes in at `image_height` x `image_width` (default: the video size) and the latent
    size follows from it and `max_area` (default height*width) as in `WanI2V.generate`;
    (so a 480x832 image gives a 464x832 clip: the rule's float64 sqrt lands just below 480);
    `clip` / `vae` hold ClipVisionConfig / WanVAEConfig fields of the image encoders (None:
    the released sizes). `history` keeps every solver step's buffers in the session
    (parity debugging; memory grows with the step count).
    """

    name: str
    description: str
    model: WanConfig
    family: str = "wan21"
    num_frames: int = 81
    sampling_steps: int = 50
    shift: float = 5.0
    guide_scale: float = 5.0
    height: int = 480
    width: int = 832
    image_height: int | None = None
    image_width: int | None = None
    max_area: int | None = None
    clip: dict | None = None
    vae: dict | None = None
    decoder: str | None = "wan-vae"
    decode_chunk: int = 3  # latent frames the decoder takes per call inside the decode graph
    history: bool = False
    builtin: bool = False  # weights are made by the package (deterministic random), no checkpoint

    @property
    def i2v(self) -> bool:
        return self.model.model_type == "i2v"

    @property
    def latent_frames(self) -> int:
        return latent_frames(self.num_frames)

    def image_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """The start image's (h, w) for a session at `height` x `width` (I2V)."""
        if height is not None or width is not None:
            return height or self.height, width or self.width
        return self.image_height or self.height, self.image_width or self.width

    def latent_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """Latent (h, w): T2V: the pixel size / 8 (multiples of 16); I2V: from the image size and max_area."""
        if self.i2v:
            ih, iw = self.image_size(height, width)
            area = self.max_area if self.max_area and height is None and width is None else ih * iw
            return latent_size((ih, iw), area)
        return pixel_latent_size(height or self.height, width or self.width, self.model.patch_size[1], self.name)

    def replace(self, **changes) -> Preset:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return preset_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preset:
        """The inverse of `to_dict` (an engine manifest stores its preset this way)."""
        return preset_from_dict(cls, d, {"model": WanConfig})


# The tiny built-in model: the real architecture at toy size, so a CPU samples a clip in seconds.
TINY_WAN21 = WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, text_len=16)

PRESETS: list[Preset] = [
    Preset(
        name="wan2.1-t2v-tiny",
        description="built-in tiny Wan2.1 T2V with deterministic random weights: 9 frames at 64x96, 4 UniPC steps",
        model=TINY_WAN21,
        num_frames=9,
        sampling_steps=4,
        height=64,
        width=96,
        builtin=True,
    ),
    Preset(
        name="wan2.1-t2v-1.3b",
        description="Wan2.1-T2V-1.3B: 81 frames at 480x832, 50 UniPC steps, shift 5, guide scale 5",
        model=WAN21_T2V_1_3B,
    ),
    Preset(
        name="wan2.1-t2v-14b",
        description="Wan2.1-T2V-14B: 81 frames at 720x1280, 50 UniPC steps, shift 5, guide scale 5",
        model=WAN21_T2V_14B,
        height=720,
        width=1280,
    ),
    Preset(
        name="wan2.1-i2v-14b-480p",
        description="Wan2.1-I2V-14B-480P: 81 frames at 480x832 from a start image, 40 UniPC steps, shift 3, guide 5",
        model=WAN21_I2V_14B,
        sampling_steps=40,
        shift=3.0,
    ),
]
