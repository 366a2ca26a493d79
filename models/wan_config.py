"""Configuration of the Wan2.1 DiT, under the reference's own constructor names.

A checkpoint's `config.json` (Wan layout) loads without a mapping table; the
diffusers `WanTransformer3DModel` names are translated by `from_diffusers`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from flashdreams.errors import InvalidArgumentError

MODEL_TYPES = ("t2v", "i2v")
# I2V conditioning `y`: 4 mask channels + the 16-channel VAE latent of the start image.
I2V_COND_CHANNELS = 20


@dataclass(frozen=True)
class WanConfig:
    """Wan2.1 DiT shape. Defaults are Wan2.1-T2V-1.3B."""

    model_type: str = "t2v"
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    in_dim: int = 16
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int = 12
    num_layers: int = 30
    window_size: tuple[int, int] = (-1, -1)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    # Causal (Self-Forcing / CausVid / Causal-Forcing) extras.
    local_attn_size: int = -1
    sink_size: int = 0
    num_frame_per_block: int = 1
    # I2V: width of the CLIP image tokens fed to `img_emb` (the released model hard-codes 1280).
    clip_dim: int = 1280
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        object.__setattr__(self, "window_size", tuple(self.window_size))
        if self.dim % self.num_heads:
            raise InvalidArgumentError(f"WanConfig: dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise InvalidArgumentError(f"WanConfig: head_dim {self.head_dim} must be even for RoPE")
        if self.model_type not in MODEL_TYPES:
            raise InvalidArgumentError(
                f"WanConfig: model_type '{self.model_type}' is not supported (choose one of {MODEL_TYPES})"
            )
        if self.model_type == "i2v" and self.in_dim != self.out_dim + I2V_COND_CHANNELS:
            raise InvalidArgumentError(
                f"WanConfig: an i2v model takes the latent plus {I2V_COND_CHANNELS} conditioning channels, "
                f"so in_dim must be {self.out_dim + I2V_COND_CHANNELS}; got {self.in_dim}"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_dict(cls, d: dict) -> WanConfig:
        """Build from a Wan-layout config dict; unknown keys are kept in `extra`."""
        if "num_attention_heads" in d:
            return cls.from_diffusers(d)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and not k.startswith("_")}
        return cls(**known, extra=extra)

    @classmethod
    def from_diffusers(cls, d: dict) -> WanConfig:
        """Translate `WanTransformer3DModel` constructor names into Wan names."""
        if d.get("image_dim") or d.get("added_kv_proj_dim"):
            raise InvalidArgumentError("diffusers config: image-conditioned (I2V) Wan models are not supported yet")
        qk = d.get("qk_norm", "rms_norm_across_heads")
        if qk not in ("rms_norm_across_heads", True):
            raise InvalidArgumentError(
                f"diffusers config: qk_norm '{qk}' is not supported (need rms_norm_across_heads)"
            )
        heads, head_dim = int(d["num_attention_heads"]), int(d["attention_head_dim"])
        return cls(
            patch_size=tuple(d.get("patch_size", (1, 2, 2))),
            in_dim=int(d.get("in_channels", 16)),
            out_dim=int(d.get("out_channels", 16)),
            dim=heads * head_dim,
            num_heads=heads,
            ffn_dim=int(d["ffn_dim"]),
            freq_dim=int(d.get("freq_dim", 256)),
            text_dim=int(d.get("text_dim", 4096)),
            num_layers=int(d["num_layers"]),
            cross_attn_norm=bool(d.get("cross_attn_norm", True)),
            eps=float(d.get("eps", 1e-6)),
            text_len=int(d.get("text_len", 512)),
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("extra")
        if self.model_type == "t2v":
            d.pop("clip_dim")  # unused by t2v; left out so t2v identities (hash) stay as they were
        d["patch_size"] = list(self.patch_size)
        d["window_size"] = list(self.window_size)
        return d

    def hash(self) -> str:
        """A stable hash of the shape-defining fields (part of an engine's identity)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def replace(self, **changes) -> WanConfig:
        return dataclasses.replace(self, **changes)


WAN21_T2V_1_3B = WanConfig()
WAN21_T2V_14B = WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
WAN21_I2V_14B = WanConfig(model_type="i2v", in_dim=36, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
