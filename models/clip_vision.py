"""The CLIP vision tower Wan2.1-I2V conditions on (open-clip ViT-H/14 layout, `visual.*` keys).

Only the image path the I2V pipeline uses is computed: bicubic resize to the tower's input
size, CLIP normalisation, patch embedding, cls + position embedding, pre-norm, then every
transformer block but the last. The post-norm and the pooled head are loaded (so the
checkpoint's keys match) but never applied. The result is [B, 257, dim] tokens.
the fixture set's wan21.md ($FD_FIXTURES), "CLIP tokens".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.checkpoint import validate_and_load

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipVisionConfig:
    """`VisionTransformer` arguments; defaults are the released tower (open-clip xlm-roberta ViT-H/14)."""

    image_size: int = 224
    patch_size: int = 14
    dim: int = 1280
    mlp_ratio: float = 4
    out_dim: int = 1024
    num_heads: int = 16
    num_layers: int = 32
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise InvalidArgumentError(
                f"ClipVisionConfig: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.dim % self.num_heads:
            raise InvalidArgumentError(f"ClipVisionConfig: dim {self.dim} is not divisible by num_heads")
        if self.num_layers < 2:
            raise InvalidArgumentError(
                "ClipVisionConfig: the I2V tokens skip the last block, so num_layers must be >= 2"
            )

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_dict(cls, d: Mapping) -> ClipVisionConfig:
        """From the reference's constructor arguments; settings this path does not support are refused."""
        unsupported = {
            "pool_type": "token",
            "pre_norm": True,
            "post_norm": False,
            "activation": "gelu",
        }
        for key, want in unsupported.items():
            if key in d and d[key] != want:
                raise InvalidArgumentError(f"ClipVisionConfig: {key}={d[key]!r} is not supported (only {want!r})")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _layer_norm(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm in float32, cast back (the reference's LayerNorm subclass)."""
    return F.layer_norm(x.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps).to(x.dtype)


class ClipAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        # q, k, v in that order, each with the heads contiguous: [B, S, 3, N, d].
        q, k, v = self.to_qkv(x).view(b, s, 3, self.num_heads, -1).unbind(2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(b, s, c))


class ClipBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)) (exact GELU)."""

    def __init__(self, cfg: ClipVisionConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.attn = ClipAttention(d, cfg.num_heads)
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps)
        hidden = int(d * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(_layer_norm(self.norm1, x))
        return x + self.mlp(_layer_norm(self.norm2, x))


class ClipVision(nn.Module):
    """The `visual` module of the CLIP checkpoint; `encode_image` gives the I2V tokens."""

    def __init__(self, cfg: ClipVisionConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or ClipVisionConfig()
        d = cfg.dim
        gain = 1.0 / math.sqrt(d)
        self.patch_embedding = nn.Conv2d(3, d, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.cls_embedding = nn.Parameter(gain * torch.randn(1, 1, d))
        self.pos_embedding = nn.Parameter(gain * torch.randn(1, cfg.num_tokens, d))
        self.pre_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.transformer = nn.Sequential(*[ClipBlock(cfg) for _ in range(cfg.num_layers)])
        # Loaded so the checkpoint matches; the I2V path stops before them.
        self.post_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.head = nn.Parameter(gain * torch.randn(d, cfg.out_dim))

    def load_weights(self, sd: Mapping[str, torch.Tensor], source: str = "state dict", prefix: str = "visual.") -> None:
        """Load the tower from CLIP checkpoint keys (`visual.*`; other keys, e.g. `textual.*`, are ignored)."""
        own = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        validate_and_load(self, own, source, hint=f"expected the CLIP vision tower under '{prefix}' for {self.cfg}")

    def preprocess(self, img: torch.Tensor) -> torch.Tensor:
        """img [B, 3, h, w] in [-1, 1] -> [B, 3, S, S]: bicubic resize, back to [0, 1], CLIP normalisation."""
        size = (self.cfg.image_size, self.cfg.image_size)
        x = F.interpolate(img.float(), size=size, mode="bicubic", align_corners=False)
        x = x * 0.5 + 0.5
        mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B, 3, S, S] -> tokens [B, 257, dim] after all but the last block."""
        dt = self.patch_embedding.weight.dtype
        x = self.patch_embedding(pixels.to(dt)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_embedding.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        x = _layer_norm(self.pre_norm, x)
        for blk in self.transformer[:-1]:
            x = blk(x)
        return x

    def encode_image(self, img: torch.Tensor) -> torch.Tensor:
        """img [B, 3, h, w] (or [3, h, w]) in [-1, 1] -> CLIP tokens [B, 257, dim] float32."""
        if img.dim() == 3:
            img = img[None]
        if img.dim() != 4 or img.shape[1] != 3:
            raise InvalidArgumentError(f"CLIP: image must be [B, 3, h, w] (or [3, h, w]); got {tuple(img.shape)}")
        with torch.no_grad():
            return self.forward(self.preprocess(img)).float()
