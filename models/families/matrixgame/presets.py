"""Matrix-Game 2.0 presets: the three released modes at full size, and a tiny built-in one for tests.

Released settings (`configs/distilled_model/<mode>/config.json`, `configs/inference_yaml/*.yaml`):
352x640, 3 latent frames per block, shift 5 warped steps, `context_noise` 0, sink 0, caches of
`local_attn_size` frames (self-attention, mouse and keyboard alike). See the fixture set's
matrixgame.md ($FD_FIXTURES), "The released model".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.action_module import ActionConfig
from flashdreams.models.preset_dict import preset_from_dict, preset_to_dict
from flashdreams.models.scheduler import FlowSchedule
from flashdreams.models.wan_config import WanConfig
from flashdreams.models.wan_i2v import pixel_latent_size

# Key names of each mode's keyboard columns (lower case, as the action script names them).
MODE_KEYS = {
    "universal": ("w", "s", "a", "d"),
    "gta_drive": ("w", "s"),
    "templerun": ("q", "w", "s", "z", "c", "a", "d"),
}
MOUSE_LABELS = ("pitch", "yaw")
MODES = tuple(MODE_KEYS)


@dataclass(frozen=True)
class Preset:
    """Everything that defines a Matrix-Game session, except its weights.

    `cond_frames`: latent frames of the start image's `cond_concat` the session encodes once
    ([image; black frames] through the VAE encoder); later latent frames reuse the last one
    (the encoded black frames stop changing after ~30 latent frames, so the reference's values
    are kept for a session of any length). `clip` / `vae`: ClipVisionConfig / WanVAEConfig fields
    of the start-image encoders (None: the released sizes).
    """

    name: str
    description: str
    model: WanConfig
    action: ActionConfig
    mode: str = "universal"
    family: str = "matrixgame"
    visual_context_dim: int = 1280
    denoising_step_list: tuple[int, ...] = (1000, 666, 333)
    timestep_shift: float = 5.0
    warp_denoising_step: bool = True
    context_noise: float = 0.0
    num_frame_per_block: int = 3
    local_attn_size: int = 6
    cond_frames: int = 40
    decoder: str | None = "wan-vae"
    height: int = 352
    width: int = 640
    clip: dict | None = None
    vae: dict | None = None
    checkpoint: str = ""  # the release's file name (informational)
    builtin: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidArgumentError(f"Matrix-Game mode '{self.mode}' is unknown; modes: {MODES}")
        if self.action.keyboard_dim_in != len(MODE_KEYS[self.mode]):
            raise InvalidArgumentError(
                f"preset {self.name}: mode {self.mode} has {len(MODE_KEYS[self.mode])} keys, "
                f"the action config {self.action.keyboard_dim_in}"
            )
        if self.action.enable_mouse != (self.mode != "templerun"):
            raise InvalidArgumentError(f"preset {self.name}: mode {self.mode} and enable_mouse disagree")
        if self.num_frame_per_block > self.local_attn_size:
            raise InvalidArgumentError(
                f"preset {self.name}: a block of {self.num_frame_per_block} frames does not fit a cache of "
                f"{self.local_attn_size} frames"
            )
        if self.cond_frames < 1:
            raise InvalidArgumentError(f"preset {self.name}: cond_frames must be >= 1")

    @property
    def keys(self) -> tuple[str, ...]:
        return MODE_KEYS[self.mode]

    @property
    def has_mouse(self) -> bool:
        return self.action.enable_mouse

    def schedule(self) -> FlowSchedule:
        return FlowSchedule.from_reference(
            self.denoising_step_list, self.timestep_shift, self.warp_denoising_step, self.context_noise
        )

    def latent_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        return pixel_latent_size(height or self.height, width or self.width, self.model.patch_size[1], self.name)

    def replace(self, **changes) -> Preset:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return preset_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preset:
        """The inverse of `to_dict` (an engine manifest stores its preset this way)."""
        return preset_from_dict(cls, d, {"model": WanConfig, "action": ActionConfig})


# The released DiT: Wan2.1-1.3B shape with 36 input channels and no text branch (model_type
# "t2v" here means the plain cross-attention; the context is img_emb of the CLIP tokens).
MATRIX_GAME_DIT = WanConfig(model_type="t2v", in_dim=36, text_len=1, text_dim=1)


def released_action(mode: str) -> ActionConfig:
    keys = len(MODE_KEYS[mode])
    return ActionConfig(keyboard_dim_in=keys, enable_mouse=mode != "templerun")


TINY_DIT = WanConfig(
    model_type="t2v", in_dim=36, dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_len=1, text_dim=1
)
TINY_ACTION = ActionConfig(
    blocks=(0,), heads_num=1, hidden_size=8, img_hidden_size=64, keyboard_hidden_dim=64, mouse_hidden_dim=64
)
TINY_CLIP = {"image_size": 32, "patch_size": 2, "dim": 16, "num_heads": 2, "num_layers": 2, "out_dim": 8}
TINY_VAE = {"dim": 8}

PRESETS: list[Preset] = [
    Preset(
        name="matrix-game-2-tiny",
        description="built-in tiny Matrix-Game 2.0 (universal mode: W/S/A/D + mouse) with deterministic random "
        "weights, 64x96, no download",
        model=TINY_DIT,
        action=TINY_ACTION,
        visual_context_dim=16,
        cond_frames=8,
        height=64,
        width=96,
        clip=TINY_CLIP,
        vae=TINY_VAE,
        builtin=True,
    ),
    Preset(
        name="matrix-game-2-universal",
        description="Matrix-Game 2.0 universal (base_distill.safetensors): keys W/S/A/D + mouse, 352x640, "
        "3 warped steps, 6-frame caches",
        model=MATRIX_GAME_DIT,
        action=released_action("universal"),
        checkpoint="base_distilled_model/base_distill.safetensors",
    ),
    Preset(
        name="matrix-game-2-gta-drive",
        description="Matrix-Game 2.0 gta_drive (gta_keyboard2dim.safetensors): keys W/S + mouse yaw steering, "
        "352x640, 3 warped steps, 4-frame caches",
        model=MATRIX_GAME_DIT,
        action=released_action("gta_drive"),
        mode="gta_drive",
        local_attn_size=4,
        checkpoint="gta_distilled_model/gta_keyboard2dim.safetensors",
    ),
    Preset(
        name="matrix-game-2-templerun",
        description="Matrix-Game 2.0 templerun (templerun_7dim_onlykey.safetensors): 7 one-hot keys, no mouse, "
        "352x640, 4 warped steps, 6-frame caches",
        model=MATRIX_GAME_DIT,
        action=released_action("templerun"),
        mode="templerun",
        denoising_step_list=(1000, 750, 500, 250),
        checkpoint="templerun_distilled_model/templerun_7dim_onlykey.safetensors",
    ),
]
