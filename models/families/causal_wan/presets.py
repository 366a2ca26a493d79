"""Causal Wan presets (Self-Forcing, CausVid, Causal-Forcing): a config with its schedule, cache and decoder.

The runtime finds them through `flashdreams.registry`; it never branches on a model's name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.preset_dict import preset_from_dict, preset_to_dict
from flashdreams.models.scheduler import FlowSchedule
from flashdreams.models.wan_config import WAN21_T2V_1_3B, WanConfig

VAE_STRIDE = (4, 8, 8)


@dataclass(frozen=True)
class Preset:
    """Everything that defines a streaming session of one model, except its weights."""

    name: str
    description: str
    model: WanConfig
    family: str = "causal_wan"
    denoising_step_list: tuple[int, ...] = (1000, 750, 500, 250)
    # Causal-Forcing++: block 0 is denoised with this list, later blocks with denoising_step_list.
    denoising_step_list_first_chunk: tuple[int, ...] | None = None
    # Causal-Forcing I2V: clean start latent frames written into the cache before the first block.
    num_input_frames: int = 0
    timestep_shift: float = 5.0
    warp_denoising_step: bool = True
    context_noise: float = 0.0
    num_frame_per_block: int = 3
    sink_frames: int = 0
    window_frames: int = 21  # non-sink frames the ring keeps, the current block included
    decoder: str | None = "wan-vae"
    checkpoint_layout: str = "auto"  # "wan" | "diffusers" | "auto"
    height: int = 480
    width: int = 832
    builtin: bool = False  # weights are made by the package (deterministic random), no checkpoint

    def schedule(self, first_chunk: bool = False) -> FlowSchedule:
        steps = self.denoising_step_list
        if first_chunk and self.denoising_step_list_first_chunk:
            steps = self.denoising_step_list_first_chunk
        return FlowSchedule.from_reference(steps, self.timestep_shift, self.warp_denoising_step, self.context_noise)

    def latent_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """Latent (h, w) for a pixel resolution; both must be multiples of 16 (VAE x8, patch x2)."""
        height, width = height or self.height, width or self.width
        step = VAE_STRIDE[1] * self.model.patch_size[1]
        if height % step or width % step:
            raise InvalidArgumentError(
                f"resolution {height}x{width}: height and width must be multiples of {step} for {self.name}"
            )
        return height // VAE_STRIDE[1], width // VAE_STRIDE[2]

    def replace(self, **changes) -> Preset:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return preset_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preset:
        """The inverse of `to_dict` (an engine manifest stores its preset this way)."""
        return preset_from_dict(cls, d, {"model": WanConfig})


# The tiny built-in model: the real architecture at toy size, so a fresh CPU machine
# plays a session in seconds. A rolling cache (sink 1 + window 8) lets it run forever.
TINY_WAN = WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, text_len=16)

PRESETS: list[Preset] = []


def register_preset(preset: Preset) -> Preset:
    PRESETS.append(preset)
    return preset


register_preset(
    Preset(
        name="tiny",
        description="built-in tiny causal Wan with deterministic random weights (no download)",
        model=TINY_WAN,
        sink_frames=1,
        window_frames=8,
        height=64,
        width=96,
        builtin=True,
    )
)
register_preset(
    Preset(
        name="self-forcing-1.3b",
        description="Self-Forcing Wan2.1-T2V-1.3B (inference.py): 4 warped steps, shift 5, full 21-frame cache",
        model=WAN21_T2V_1_3B,
    )
)
register_preset(
    Preset(
        name="self-forcing-1.3b-demo",
        description="Self-Forcing 1.3B with demo.py's shift 8 (timesteps 1000, 960, 888.9, 727.3)",
        model=WAN21_T2V_1_3B,
        timestep_shift=8.0,
    )
)
register_preset(
    Preset(
        name="self-forcing-1.3b-rolling",
        description="Self-Forcing 1.3B with a bounded cache: sink 1 + 8 history frames + the current 3 (runs forever)",
        model=WAN21_T2V_1_3B,
        sink_frames=1,
        window_frames=11,
    )
)
register_preset(
    Preset(
        name="causvid-1.3b",
        description="CausVid wan_causal_dmd: 3 unwarped steps [1000, 757, 522], shift 8",
        model=WAN21_T2V_1_3B,
        denoising_step_list=(1000, 757, 522),
        timestep_shift=8.0,
        warp_denoising_step=False,
    )
)
register_preset(
    Preset(
        name="causal-forcing-chunkwise",
        description="Causal-Forcing chunkwise T2V: blocks of 3 frames, 4 warped steps, shift 5",
        model=WAN21_T2V_1_3B,
    )
)
register_preset(
    Preset(
        name="causal-forcing-framewise",
        description="Causal-Forcing framewise T2V: blocks of 1 frame, 4 warped steps, shift 5",
        model=WAN21_T2V_1_3B,
        num_frame_per_block=1,
    )
)

register_preset(
    Preset(
        name="causal-forcing-i2v-framewise",
        description="Causal-Forcing framewise I2V: the start image latent prefilled into the cache, "
        "then blocks of 1 frame",
        model=WAN21_T2V_1_3B,
        num_frame_per_block=1,
        num_input_frames=1,
    )
)
register_preset(
    Preset(
        name="causal-forcing-pp-2step",
        description="Causal-Forcing++ 2-step framewise T2V: block 0 with [1000, 750, 500, 250], then [1000, 500]",
        model=WAN21_T2V_1_3B,
        num_frame_per_block=1,
        denoising_step_list=(1000, 500),
        denoising_step_list_first_chunk=(1000, 750, 500, 250),
    )
)
