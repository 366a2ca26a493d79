"""FlashVSR presets: the DiT, LQ projector and TC decoder shapes, the output size and the sparse attention.

Sizes are of the *output* video (multiples of 128: one attention window is 8x8 tokens of 16x16
pixels); the host sends LQ frames of (height/scale) x (width/scale). `sparse_ratio` is the
release's knob (2.0 "stable", 1.5 "faster"); the top-k budget follows the reference:
`topk_ratio = sparse_ratio * 768 * 1280 / (H * W)`, `topk = int(S*S*topk_ratio) - 1`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from flashdreams.errors import InvalidArgumentError
from flashdreams.kernels.block_sparse_attention import topk_budget, topk_ratio_for
from flashdreams.models.families.flashvsr.lq_proj import LQProjConfig
from flashdreams.models.families.flashvsr.tcdecoder import RELEASED_CHANNELS
from flashdreams.models.preset_dict import preset_from_dict, preset_to_dict
from flashdreams.models.wan_config import WAN21_T2V_1_3B, WanConfig

PIXELS_PER_WINDOW = 128  # 8 tokens x 2 (patch) x 8 (VAE) pixels per side of one attention window


@dataclass(frozen=True)
class Preset:
    """Everything that defines a FlashVSR session except its weights."""

    name: str
    description: str
    model: WanConfig = WAN21_T2V_1_3B
    lq_proj: LQProjConfig = LQProjConfig()
    tc_channels: tuple[int, ...] = RELEASED_CHANNELS
    family: str = "flashvsr"
    height: int = 768  # output
    width: int = 1408
    scale: int = 4  # output / LQ input size; 1 = the host sends frames already upsampled
    sparse_ratio: float = 2.0
    topk_ratio: float | None = None  # overrides sparse_ratio's value when given
    kv_ratio: float = 3.0  # cached slabs (frame pairs) kept after each chunk
    local_range: int = 11  # windows per side of the spatial neighbourhood a query window may see
    attention_mode: str = "sparse"  # "sparse" (LCSA) or "dense" (full attention over the cache)
    decoder: str | None = "tcdecoder"
    fps: int = 24
    builtin: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "tc_channels", tuple(self.tc_channels))

    def size_for_input(self, height: int, width: int) -> tuple[int, int]:
        """The output size for LQ frames of height x width: `scale` times larger, floored to whole
        attention windows (at least one); the host's frames are centre-cropped to it (`stage.fit_frames`)."""
        step = PIXELS_PER_WINDOW
        return tuple(max(step, n * self.scale // step * step) for n in (height, width))

    def check_size(self, height: int, width: int) -> None:
        step = PIXELS_PER_WINDOW
        if height <= 0 or width <= 0 or height % step or width % step:
            raise InvalidArgumentError(
                f"FlashVSR output {height}x{width}: height and width must be positive multiples of {step} "
                f"(one attention window is 8x8 tokens of 16 pixels); e.g. {max(step, height // step * step)}x"
                f"{max(step, width // step * step)}"
            )
        if height % self.scale or width % self.scale or (height // self.scale) % 2 or (width // self.scale) % 2:
            raise InvalidArgumentError(f"FlashVSR output {height}x{width} is not {self.scale}x an even LQ size")

    def resolved_topk_ratio(self, height: int, width: int) -> float:
        if self.topk_ratio is not None:
            return float(self.topk_ratio)
        return topk_ratio_for(self.sparse_ratio, height, width)

    def topk(self, height: int, width: int) -> int:
        """Selected key windows per head and query slab."""
        slab = (height // PIXELS_PER_WINDOW) * (width // PIXELS_PER_WINDOW)
        return topk_budget(slab, self.resolved_topk_ratio(height, width))

    def replace(self, **changes) -> Preset:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return preset_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preset:
        """The inverse of `to_dict` (an engine manifest stores its preset this way)."""
        return preset_from_dict(cls, d, {"model": WanConfig, "lq_proj": LQProjConfig})


TINY_DIT = WanConfig(dim=48, ffn_dim=96, num_heads=2, num_layers=2, text_dim=24, text_len=8)
TINY_LQ = LQProjConfig(out_dim=48, layer_num=1, hidden_dim1=4, hidden_dim2=8)

PRESETS: list[Preset] = [
    Preset(
        name="flashvsr-tiny",
        description="built-in tiny FlashVSR (deterministic random weights): 4x from 32x64 to 128x256 on a CPU",
        model=TINY_DIT,
        lq_proj=TINY_LQ,
        tc_channels=(12, 8, 8, 8),
        height=128,
        width=256,
        local_range=3,
        builtin=True,
    ),
    Preset(
        name="flashvsr",
        description="FlashVSR v1 Tiny (Wan2.1-1.3B DiT, LCSA sparse ratio 2.0 'stable', TC decoder): 4x to 768x1408",
    ),
    Preset(
        name="flashvsr-faster",
        description="FlashVSR v1 Tiny with sparse ratio 1.5 ('faster'): 4x to 768x1408",
        sparse_ratio=1.5,
    ),
    Preset(
        name="flashvsr-1080p",
        description="FlashVSR v1 Tiny, 4x to 1152x1920 (1080p rounded up to 128-multiples; crop rows for 1080)",
        height=1152,
        width=1920,
    ),
]
