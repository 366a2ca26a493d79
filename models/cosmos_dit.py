"""The Cosmos-Predict2.5 DiT (`MinimalV1LVGDiT`), bidirectional and as OmniDreams' streaming network.

One module serves both models (the fixture set's cosmos.md and omnidreams.md):
AdaLN-LoRA modulation of the self-attention, the cross-attention and the MLP (all three
modulated and gated), a D-channel timestep sinusoid (cosines first) whose RMSNorm feeds the
modulations and whose raw value feeds the LoRA path, per-head q/k RMSNorm, a rotate-half 3-D
RoPE with NTK-scaled h/w bases, exact GELU, no biases except the text projection. The patch
embedding is a bias-free Linear on channel-slowest 2x2 patches of [latent, condition mask,
(padding mask)]; the output head is read channel-fastest. OmniDreams adds
`additional_patch_embedding` (the HD-map latent, added to the token embedding) and runs each
chunk against a KV ring (models/kv_ring.py layout) with global RoPE frame positions.

Parameter names are those of the official checkpoint after its `net.` prefix, so the released
`.pt` loads as is (models/cosmos_loader.py also maps the diffusers layout). Precision follows the
reference where parity needs it: sinusoid, RoPE angles, norms and modulation in float32; the
residual stream and the linears in the model's dtype.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from flashdreams.errors import InvalidArgumentError
from flashdreams.models import dit_ops

LATENT_CHANNELS = 16
PATCH = (1, 2, 2)
# The linears that run per token per forward: the ones `set_precision("fp8")` quantizes.
_FP8_LINEARS = re.compile(
    r"(^|\.)blocks\.\d+\.(self_attn\.(q|k|v|output)_proj|cross_attn\.(q|output)_proj|mlp\.layer[12])$"
)
# Of those, the ones `set_precision("fp8")` leaves in the model's dtype (a regex over their names): none. In
# OmniDreams no one linear dominates FP8's error (bench/results/fp8-layers-cpu/: the self-attention output ~37%,
# the MLP's first linear ~27%); reaching 0.03 would take a quarter of the GEMM FLOPs out of FP8.
FP8_KEEP: str | None = None


@dataclass(frozen=True)
class CosmosConfig:
    """`MinimalV1LVGDiT` constructor values that shape the network (the reference's names in comments).

    `padding_channel`: the patch embedding takes the padding-mask channel (Cosmos; OmniDreams'
    loader drops those columns). `hdmap_channels`: width of the extra HD-map patch embedding
    (OmniDreams' `additional_concat_ch`; 0 for Cosmos).
    """

    dim: int = 2048  # model_channels
    num_blocks: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    adaln_lora_dim: int = 256
    text_dim: int = 1024  # crossattn_emb_channels
    text_in_dim: int = 100352  # crossattn_proj_in_channels (28 x 3584 Reason1 hidden states)
    in_channels: int = LATENT_CHANNELS
    out_channels: int = LATENT_CHANNELS
    padding_channel: bool = True
    hdmap_channels: int = 0
    rope_h_ratio: float = 3.0
    rope_w_ratio: float = 3.0
    rope_t_ratio: float = 1.0
    timestep_scale: float = 0.001
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise InvalidArgumentError(f"Cosmos DiT: dim {self.dim} is not a multiple of num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise InvalidArgumentError(f"Cosmos DiT: head_dim {self.head_dim} must be even and >= 6 (3-D RoPE)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Per-head channels of the (t, h, w) RoPE axes: dh = dw = 2*floor(d/6), dt = d - 2*dh."""
        dh = 2 * (self.head_dim // 6)
        return self.head_dim - 2 * dh, dh, dh

    @property
    def embed_in(self) -> int:
        """Patch-embedding input columns: (latent + condition mask [+ padding mask]) x 2 x 2."""
        return (self.in_channels + 1 + int(self.padding_channel)) * PATCH[1] * PATCH[2]

    def replace(self, **changes) -> CosmosConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CosmosConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InvalidArgumentError(f"Cosmos config has unknown fields {unknown}")
        return cls(**d)

    @classmethod
    def from_reference(cls, cfg: dict) -> CosmosConfig:
        """From `MinimalV1LVGDiT` / OmniDreams `CosmosDiTNetworkConfig` arguments (their own names)."""
        return cls(
            dim=int(cfg["model_channels"]),
            num_blocks=int(cfg["num_blocks"]),
            num_heads=int(cfg["num_heads"]),
            mlp_ratio=float(cfg.get("mlp_ratio", 4.0)),
            adaln_lora_dim=int(cfg["adaln_lora_dim"]),
            text_dim=int(cfg["crossattn_emb_channels"]),
            text_in_dim=int(cfg["crossattn_proj_in_channels"]),
            in_channels=int(cfg.get("in_channels", LATENT_CHANNELS)),
            out_channels=int(cfg.get("out_channels", LATENT_CHANNELS)),
            padding_channel=bool(cfg.get("concat_padding_mask", True)),
            hdmap_channels=int(cfg.get("additional_concat_ch", 0) or 0),
            rope_h_ratio=float(cfg.get("rope_h_extrapolation_ratio", 3.0)),
            rope_w_ratio=float(cfg.get("rope_w_extrapolation_ratio", 3.0)),
            rope_t_ratio=float(cfg.get("rope_t_extrapolation_ratio", 1.0)),
            timestep_scale=float(cfg.get("timestep_scale", 0.001)),
        )


# Cosmos-Predict2.5-2B (net `cosmos_v1_2B`, the released experiment's overrides).
COSMOS_PREDICT25_2B = CosmosConfig()


# -- functional pieces ---------------------------------------------------------------------------


def patchify(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, T*H'*W', C*4]: tokens (t, h', w') row-major, vector (c, kh, kw) (channel slowest)."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // 2, 2, w // 2, 2).permute(0, 2, 3, 5, 1, 4, 6)
    return x.reshape(b, t * (h // 2) * (w // 2), c * 4)


def unpatchify(y: torch.Tensor, t: int, h: int, w: int, channels: int) -> torch.Tensor:
    """[B, L, 4*C] read as (p1, p2, C) channel fastest -> [B, C, T, 2h', 2w'] (h, w: the token grid)."""
    b = y.shape[0]
    y = y.reshape(b, t, h, w, 2, 2, channels).permute(0, 6, 1, 2, 4, 3, 5)
    return y.reshape(b, channels, t, 2 * h, 2 * w)


def timestep_sinusoid(t: torch.Tensor, dim: int, scale: float) -> torch.Tensor:
    """[..] timesteps (0..1000 scale) -> [.., dim] float32 `[cos(s f), sin(s f)]` with s = t*scale."""
    half = dim // 2
    s = t.float() * scale
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    ang = s[..., None] * torch.exp(exponent)
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1)


def rope_frequencies(cfg: CosmosConfig, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 per-axis frequencies (w_t [dt/2], w_h [dh/2], w_w [dw/2]) with the NTK-scaled bases."""
    dt, dh, dw = cfg.rope_dims

    def axis(n: int, ratio: float) -> torch.Tensor:
        theta = 10000.0 * ratio ** (n / (n - 2))
        expo = torch.arange(0, n, 2, dtype=torch.float32, device=device)[: n // 2] / n
        return 1.0 / (theta**expo)

    return axis(dt, cfg.rope_t_ratio), axis(dh, cfg.rope_h_ratio), axis(dw, cfg.rope_w_ratio)


def rope_angles(cfg: CosmosConfig, frame_positions: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """float32 [F*grid_h*grid_w, d]: per token `[a, a]`, a = [t*w_t, h'*w_h, w'*w_w].

    The temporal angle is `j*w_t + p0*w_t` (j local to the call, p0 = its first position), the
    float32 order of OmniDreams' global-time RoPE; for Cosmos p0 = 0 and this is exactly t*w_t.
    Positions may be a device tensor that changes per block (no host sync).
    """
    device = frame_positions.device
    w_t, w_h, w_w = rope_frequencies(cfg, device)
    pos = frame_positions.to(torch.float32)
    p0 = pos[:1]
    ang_t = (pos - p0)[:, None] * w_t + p0[:, None] * w_t
    ang_h = torch.arange(grid_h, dtype=torch.float32, device=device)[:, None] * w_h
    ang_w = torch.arange(grid_w, dtype=torch.float32, device=device)[:, None] * w_w
    nf = pos.shape[0]
    a = torch.cat(
        [
            ang_t[:, None, None, :].expand(nf, grid_h, grid_w, -1),
            ang_h[None, :, None, :].expand(nf, grid_h, grid_w, -1),
            ang_w[None, None, :, :].expand(nf, grid_h, grid_w, -1),
        ],
        dim=-1,
    ).reshape(nf * grid_h * grid_w, -1)
    return torch.cat([a, a], dim=-1)


def rope_rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, N, d] turned by the reference's angle tables [L, d] (= [a, a]): x*cos + [-x2, x1]*sin,
    float32 math, x's dtype (`dit_ops.rotate_half` on the tables' first halves: the same numbers)."""
    half = cos.shape[-1] // 2
    return dit_ops.rotate_half(x, cos[:, :half], sin[:, :half])


# -- modules (parameter names = the official checkpoint's) -----------------------------------------


class HeadNorm(nn.Module):
    """RMSNorm over each head's d channels (weights [d]), float32 math."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dit_ops.rms_norm(x, self.weight, self.eps)


class PatchEmbed(nn.Module):
    """`x_embedder` / `additional_patch_embedding`: `proj.1` is a bias-free Linear on patch vectors."""

    def __init__(self, cols: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Identity(), nn.Linear(cols, dim, bias=False))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj(patches)


class _TimeMLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim, dim, bias=False)
        self.linear_2 = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def _adaln(dim: int, rank: int, n: int) -> nn.Sequential:
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, rank, bias=False), nn.Linear(rank, n * dim, bias=False))


class CosmosAttention(nn.Module):
    """q/k/v/output projections, per-head q/k RMSNorm (self- or cross-attention)."""

    def __init__(self, dim: int, kv_dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        hd = dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(kv_dim, dim, bias=False)
        self.v_proj = nn.Linear(kv_dim, dim, bias=False)
        self.output_proj = nn.Linear(dim, dim, bias=False)
        self.q_norm = HeadNorm(hd, eps)
        self.k_norm = HeadNorm(hd, eps)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1))

    def kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K (normed) and V of a context [B, L, kv_dim] as [B, L, N, d]: the cross-attention cache."""
        return self.k_norm(self.heads(self.k_proj(context))), self.heads(self.v_proj(context))


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.layer1 = nn.Linear(dim, hidden, bias=False)
        self.layer2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer1(x)
        if getattr(self.layer2, "takes_gelu", False):  # an FP8 layer: GELU inside its quantization pass
            return self.layer2(h, gelu="exact")
        return self.layer2(F.gelu(h))  # exact (erf) GELU


class CosmosBlock(nn.Module):
    def __init__(self, cfg: CosmosConfig) -> None:
        super().__init__()
        d, r = cfg.dim, cfg.adaln_lora_dim
        self.eps = cfg.eps
        self.self_attn = CosmosAttention(d, d, cfg.num_heads, cfg.eps)
        self.cross_attn = CosmosAttention(d, cfg.text_dim, cfg.num_heads, cfg.eps)
        self.mlp = _MLP(d, int(d * cfg.mlp_ratio))
        self.adaln_modulation_self_attn = _adaln(d, r, 3)
        self.adaln_modulation_cross_attn = _adaln(d, r, 3)
        self.adaln_modulation_mlp = _adaln(d, r, 3)

    def modulations(self) -> tuple[nn.Sequential, nn.Sequential, nn.Sequential]:
        """The three AdaLN-LoRA branches in the order the block uses them (self-attention, cross-attention, MLP)."""
        return self.adaln_modulation_self_attn, self.adaln_modulation_cross_attn, self.adaln_modulation_mlp

    def forward(
        self,
        x,
        emb,
        lora,
        attend: Callable,
        cross_k,
        cross_v,
        impl: str = "sdpa",
        pending=None,
        defer_ffn=False,
        mods: torch.Tensor | None = None,
    ):
        """x [B, L, D]; emb/lora [B, F, D]/[B, F, 3D] float32 per frame; `attend(attn, q, k, v)` -> [B, L, N, d]
        takes the raw projections and owns the q/k norms, RoPE and the cache policy; cross_k/v [B, Lt, N, d].

        Each gated residual and the modulated norm after it are one call (`gated_residual_adaln`):
        with impl="triton" one row pass over x instead of two per pair (at OmniDreams' 7040-token
        chunk a bf16 [L, D] pass is ~29 MB), the torch composition otherwise, the same numbers.
        `defer_ffn` leaves the MLP's gated residual undone and returns (x, pending) instead of x,
        pending = (MLP output, gate); the next block, given `pending`, adds it in the pass that
        normalises its input (the caller resolves the last one with `dit_ops.gated_residual`).
        `mods` [3, B, F, 3D] float32: this block's three modulations computed already
        (`block_modulations`); None computes them here."""
        sa, ca = self.self_attn, self.cross_attn
        # Each norm hands its h quantized where only FP8 linears read it (dit_ops.takes_fp8_rows).
        qkv8 = dit_ops.takes_fp8_rows(sa.q_proj, sa.k_proj, sa.v_proj)
        q8, mlp8 = dit_ops.takes_fp8_rows(ca.q_proj), dit_ops.takes_fp8_rows(self.mlp.layer1)
        if mods is None:
            mods = [which(emb).float() + lora for which in self.modulations()]
        shift, scale, gate_sa = mods[0].chunk(3, dim=-1)
        if pending is None:
            h = dit_ops.adaln_modulate(x, shift, scale, self.eps, impl, fp8=qkv8)
        else:
            x, h = dit_ops.gated_residual_adaln(x, *pending, shift, scale, self.eps, impl, fp8=qkv8)
        q, k, v = sa.heads(sa.q_proj(h)), sa.heads(sa.k_proj(h)), sa.heads(sa.v_proj(h))
        y = attend(sa, q, k, v)
        shift, scale, gate_ca = mods[1].chunk(3, dim=-1)
        y = sa.output_proj(y.flatten(2))
        x, h = dit_ops.gated_residual_adaln(x, y, gate_sa, shift, scale, self.eps, impl, fp8=q8)
        q = dit_ops.rms_norm(ca.heads(ca.q_proj(h)), ca.q_norm.weight, ca.q_norm.eps, impl)
        y = dit_ops.attention(q, cross_k.to(q.dtype), cross_v.to(q.dtype))
        shift, scale, gate_mlp = mods[2].chunk(3, dim=-1)
        y = ca.output_proj(y.flatten(2))
        x, h = dit_ops.gated_residual_adaln(x, y, gate_ca, shift, scale, self.eps, impl, fp8=mlp8)
        y = self.mlp(h)
        if defer_ffn:
            return x, (y, gate_mlp)
        return dit_ops.gated_residual(x, y, gate_mlp, impl)


class FinalLayer(nn.Module):
    def __init__(self, cfg: CosmosConfig) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.adaln_modulation = _adaln(cfg.dim, cfg.adaln_lora_dim, 2)
        self.linear = nn.Linear(cfg.dim, 4 * cfg.out_channels, bias=False)

    def forward(self, x, emb, lora, impl: str = "sdpa") -> torch.Tensor:
        d = x.shape[-1]
        m = self.adaln_modulation(emb).float() + lora[..., : 2 * d]
        shift, scale = m.chunk(2, dim=-1)
        return self.linear(dit_ops.adaln_modulate(x, shift, scale, self.eps, impl))


class CosmosDiT(nn.Module):
    """The network; `forward` is the bidirectional call, `forward_chunk` OmniDreams' cached one.

    `debug` (a dict, or None) collects the fixture's intermediate tensors when given.
    """

    def __init__(self, cfg: CosmosConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.x_embedder = PatchEmbed(cfg.embed_in, d)
        if cfg.hdmap_channels:
            self.additional_patch_embedding = PatchEmbed(cfg.hdmap_channels * 4, d)
        self.t_embedder = nn.Sequential(nn.Identity(), _TimeMLP(d))
        self.t_embedding_norm = HeadNorm(d, cfg.eps)
        self.crossattn_proj = nn.Sequential(nn.Linear(cfg.text_in_dim, cfg.text_dim), nn.GELU())
        self.blocks = nn.ModuleList([CosmosBlock(cfg) for _ in range(cfg.num_blocks)])
        self.final_layer = FinalLayer(cfg)
        self.attention_impl = "sdpa"
        self.ring_kernel = "triton"  # or "fa4": FlashAttention-4 for the KV ring (set_attention("fa4"))
        self.precision = "bf16"

    @property
    def dtype(self) -> torch.dtype:
        return self.final_layer.linear.weight.dtype

    def set_attention(self, impl: str) -> None:
        """'sdpa', 'triton' or 'fa4' (see WanDiT.set_attention)."""
        self.attention_impl, self.ring_kernel = dit_ops.split_attention(impl)

    def set_precision(self, precision: str, keep: str | None = None) -> None:
        """'bf16' (the model's dtype) or 'fp8': the blocks' per-token linears (self-attention q/k/v/output,
        cross-attention q/output, MLP) but `FP8_KEEP` in float8 e4m3, and with attention='triton' (not 'fa4')
        also the KV-ring attention.
        Opt-in and irreversible (reload to go back); embeddings, modulation, text K/V and the head stay.
        `keep` (a regex over the linears' names) replaces FP8_KEEP."""
        if precision not in ("bf16", "fp8"):
            raise InvalidArgumentError(f"precision '{precision}' is unknown; choose bf16 or fp8")
        if precision == "fp8" and self.precision != "fp8":
            self.quantize_fp8_(exclude=keep)
        self.precision = precision

    def quantize_fp8_(self, exclude: str | None = None) -> list[str]:
        """Swap the blocks' per-token linears for FP8 ones, but those whose names match the regex `exclude`
        (None: FP8_KEEP; "": none); returns the swapped names. The attention's precision is `set_precision`'s."""
        from flashdreams.kernels import quantize_linears_fp8_
        from flashdreams.kernels.fp8_linear import fp8_exclusion

        exclude = FP8_KEEP if exclude is None else exclude
        keep = fp8_exclusion(exclude)
        return quantize_linears_fp8_(
            self,
            include=lambda n, lin: (
                bool(_FP8_LINEARS.search(n))
                and lin.in_features % 16 == 0
                and lin.out_features % 16 == 0
                and not (keep is not None and keep.search(n))
            ),
        )

    # -- pieces ---------------------------------------------------------------------------------
    def embed_text(self, crossattn_emb: torch.Tensor) -> torch.Tensor:
        """[B, L, text_in_dim] -> [B, L, text_dim]: Linear (with bias) + exact GELU."""
        return self.crossattn_proj(crossattn_emb.to(self.dtype))

    def cross_kv(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-layer cross-attention K/V [layers, B, L, N, d] of projected text [B, L, text_dim]."""
        kvs = [blk.cross_attn.kv(text) for blk in self.blocks]
        return torch.stack([k for k, _ in kvs]), torch.stack([v for _, v in kvs])

    def time_embed(self, t: torch.Tensor, debug: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps [B, F] (0..1000) -> emb [B, F, D] (normalised sinusoid), lora [B, F, 3D], float32."""
        sin = timestep_sinusoid(t, self.cfg.dim, self.cfg.timestep_scale)
        emb = self.t_embedding_norm(sin)
        lora = self.t_embedder(sin.to(self.dtype)).float()
        if debug is not None:
            debug.update(t_sinusoid=sin, t_emb=emb, adaln_lora=lora)
        return emb.to(self.dtype), lora

    def block_modulations(self, emb: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
        """Every block's three AdaLN-LoRA modulations, [blocks, 3, B, F, 3D] float32, in three kernels: the
        per-block form is five small launches a branch (SiLU, two skinny GEMMs, a cast, the add), 420 a
        forward at 28 blocks (~4 ms of an OmniDreams chunk's three forwards on an H200, next77's profile); here the
        branches' first linears run as one GEMM over their weights concatenated and the second ones as
        one batched GEMM, with the same products in the same dtype (the weights are gathered every call:
        ~350 MB copied at 2B, cheaper than the launches, and never stale)."""
        branches = [m for blk in self.blocks for m in blk.modulations()]
        r = branches[0][1].out_features
        b, f, d = emb.shape
        down = F.linear(F.silu(emb), torch.cat([m[1].weight for m in branches]))  # [B, F, branches * r]
        down = down.reshape(b * f, len(branches), r).transpose(0, 1)  # [branches, B*F, r]
        up = torch.bmm(down, torch.stack([m[2].weight for m in branches]).transpose(1, 2))  # [branches, B*F, 3D]
        mods = torch.add(up, lora.reshape(b * f, -1))  # bf16 + float32 -> float32: the cast inside the add
        return mods.reshape(len(self.blocks), 3, b, f, -1)

    def embed_tokens(self, x, condition_mask, padding_mask=None, hdmap=None) -> torch.Tensor:
        """x [B, 16, T, H, W], condition_mask [B, 1, T, H, W], padding_mask [B, 1, H, W] (Cosmos),
        hdmap [B, 16, T, H, W] (OmniDreams) -> tokens [B, T*H'*W', D]."""
        parts = [x, condition_mask.to(x.dtype)]
        if self.cfg.padding_channel:
            b, _, t, h, w = x.shape
            pm = padding_mask if padding_mask is not None else x.new_zeros(b, 1, h, w)
            parts.append(pm.to(x.dtype)[:, :, None].expand(b, 1, t, h, w))
        e = self.x_embedder(patchify(torch.cat(parts, dim=1).to(self.dtype)))
        if self.cfg.hdmap_channels:
            if hdmap is None:
                raise InvalidArgumentError("this network embeds an HD-map latent; pass hdmap [B, 16, T, H, W]")
            e = e + self.additional_patch_embedding(patchify(hdmap.to(self.dtype)))
        return e

    def _check_grid(self, x: torch.Tensor) -> tuple[int, int, int]:
        if x.dim() != 5 or x.shape[1] != self.cfg.in_channels or x.shape[3] % 2 or x.shape[4] % 2:
            raise InvalidArgumentError(
                f"Cosmos DiT: x must be [B, {self.cfg.in_channels}, T, H, W] with even H and W; got {list(x.shape)}"
            )
        return x.shape[2], x.shape[3] // 2, x.shape[4] // 2

    def _run(self, tokens, grid, t, cross_k, cross_v, attend_of, debug, gather=None):
        """The blocks and the final layer over `tokens`; `gather` (context parallel) turns this rank's
        rows of the output back into every row before unpatchify."""
        nt, gh, gw = grid
        emb, lora = self.time_embed(t, debug)
        impl = self.attention_impl
        x = tokens
        # With our kernels each block's MLP residual is added by the next block's first row pass (one
        # pass over x per block fewer), unless forward hooks watch the blocks' outputs (a probe or a
        # parity trace), which must see each block's finished x. `debug` records the finished x
        # itself (an extra pass, only when debugging), so the path under test is the deferred one.
        watched = any(blk._forward_hooks or blk._forward_pre_hooks for blk in self.blocks)
        defer, pending = impl == "triton" and not watched, None
        mods = self.block_modulations(emb, lora)
        for i, blk in enumerate(self.blocks):
            out = blk(
                x, emb, lora, attend_of(i), cross_k[i], cross_v[i], impl, pending=pending, defer_ffn=defer, mods=mods[i]
            )
            x, pending = out if defer else (out, None)
            if debug is not None:
                done = x if pending is None else dit_ops.gated_residual(x, *pending, impl)
                debug[f"block_{i}"] = done.float().reshape(x.shape[0], nt, gh, gw, -1)
        if pending is not None:
            x = dit_ops.gated_residual(x, *pending, impl)
        y = self.final_layer(x, emb, lora, impl)
        if gather is not None:
            y = gather(y)
        if debug is not None:
            debug["final_layer"] = y.float().reshape(y.shape[0], nt, gh, gw, -1)
        return unpatchify(y.float(), nt, gh, gw, self.cfg.out_channels)

    # -- the two calls --------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        crossattn_emb: torch.Tensor,
        condition_mask: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        debug: dict | None = None,
    ) -> torch.Tensor:
        """`MinimalV1LVGDiT.forward` for video: x [B, 16, T, H, W], timesteps [B, T] (0..1000),
        crossattn_emb [B, L, text_in_dim], condition_mask [B, 1, T, H, W], padding_mask [B, 1, H, W]
        -> velocity [B, 16, T, H, W] float32."""
        text = self.embed_text(crossattn_emb)
        if debug is not None:
            debug["crossattn_emb"] = text.float()
        cross_k, cross_v = self.cross_kv(text)
        return self.forward_cached(x, timesteps, cross_k, cross_v, condition_mask, padding_mask, debug=debug)

    def forward_cached(self, x, timesteps, cross_k, cross_v, condition_mask, padding_mask=None, debug=None):
        """`forward` with the cross-attention K/V given ([layers, B, L, N, d], from `cross_kv`)."""
        grid = self._check_grid(x)
        nt, gh, gw = grid
        tokens = self.embed_tokens(x, condition_mask, padding_mask)
        positions = torch.arange(nt, device=x.device)
        ang = rope_angles(self.cfg, positions, gh, gw)
        cos, sin = torch.cos(ang), torch.sin(ang)
        if debug is not None:
            debug["x_embed"] = tokens.float().reshape(x.shape[0], nt, gh, gw, -1)
            debug["rope_angles"] = ang[:, None, None, :]

        def attend(sa, q, k, v):
            q, k = rope_rotate_half(sa.q_norm(q), cos, sin), rope_rotate_half(sa.k_norm(k), cos, sin)
            return dit_ops.attention(q, k, v)

        def attend_of(_i):
            return attend

        return self._run(tokens, grid, timesteps, cross_k, cross_v, attend_of, debug)

    def forward_chunk(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cross_k: torch.Tensor,
        cross_v: torch.Tensor,
        condition_mask: torch.Tensor,
        hdmap: torch.Tensor,
        ring_k,
        ring_v,
        frame_positions: torch.Tensor,
        slots: torch.Tensor,
        valid_len: torch.Tensor,
        valid_len_host: int | None = None,
        debug: dict | None = None,
        fp8_shadow: tuple | None = None,
        *,
        attend: Callable | None = None,
        shard=None,
    ) -> torch.Tensor:
        """OmniDreams' cached call: x/hdmap [B, 16, nf, H, W], t [B] (one timestep per sample),
        frame_positions/slots int64 [nf], valid_len int64 [1]; ring_k/v [layers, B, S, N, d] (or a list
        of per-layer tensors) receive this chunk's rotated K and V at `slots` in place; attention
        runs over ring rows [0, valid_len). Returns the flow [B, 16, nf, H, W] float32.

        `fp8_shadow` (FP8 attention only): (k8, kt, v8t, vt, block_n), the first four per layer along
        dim 0 (`kernels.ring_attention_fp8.Fp8KV`): an fp8 copy of the ring kept in step with it. The
        tiles holding this chunk's rows are re-quantized after they are written and the attention
        reads the shadow, instead of quantizing the whole window in every call; the same numbers.

        Context parallel (flashdreams.parallel) passes `shard` (a TokenShard: this rank keeps its rows
        of every frame, the output rows are gathered back) and `attend(layer, q, k, v)`, which gets q
        and k after the head norms and RoPE and owns the ring write and the attention."""
        grid = self._check_grid(x)
        nt, gh, gw = grid
        fs = gh * gw
        if (shard is not None or attend is not None) and (fp8_shadow is not None or debug is not None):
            raise InvalidArgumentError(
                "Cosmos DiT: context parallel runs the ring attention unquantized and without debug records; "
                "load with precision 'bf16' (or attention 'fa4')"
            )
        tokens = self.embed_tokens(x, condition_mask, hdmap=hdmap)
        ang = rope_angles(self.cfg, frame_positions, gh, gw)
        half = ang[:, : ang.shape[1] // 2]  # the tables are [a, a]: one angle per rotate-half pair
        cos, sin = torch.cos(half), torch.sin(half)
        if shard is not None:
            tokens = shard.take(tokens, fs, 1)
            cos, sin = shard.take(cos, fs, 0), shard.take(sin, fs, 0)
        impl = self.attention_impl
        precision = dit_ops.ring_precision(self.precision, impl, self.ring_kernel)
        shadowed = fp8_shadow is not None and precision == "fp8"
        ring_len = dit_ops.ring_length_for(valid_len, impl, self.ring_kernel)
        if shadowed:  # the ring rows this chunk writes: one run of its frame slots, or two where they wrap
            written = dit_ops.written_ring_rows(slots, fs)

        def cached_attend_of(i):
            def cached(sa, q, k, v):
                rk, rv = ring_k[i], ring_v[i]
                # One fused pass (norms, RoPE, ring write) where the ring holds what the torch path writes.
                w_dtype = torch.promote_types(k.dtype, sa.k_norm.weight.dtype)
                fused = impl == "triton" and rk.dtype == w_dtype and rv.dtype == v.dtype
                qr = dit_ops.head_norm_rope_cache_write(
                    q, k, v, sa.q_norm.weight, sa.k_norm.weight, sa.q_norm.eps, cos, sin, rk, rv, slots, fs,
                    "triton" if fused else "sdpa",
                )  # fmt: skip
                if debug is not None and i == 0:
                    debug["cache_k0"] = rk
                if shadowed:
                    return dit_ops.ring_attention_fp8_shadowed(qr, rk, rv, valid_len, written, fp8_shadow, i)
                return dit_ops.ring_attention(qr, rk, rv, ring_len, impl, valid_len_host, precision, self.ring_kernel)

            return cached

        def hooked_attend_of(i):  # context parallel: the norms and RoPE here, the ring and attention in `attend`
            def hooked(sa, q, k, v):
                qr = dit_ops.rotate_half(dit_ops.rms_norm(q, sa.q_norm.weight, sa.q_norm.eps), cos, sin)
                kr = dit_ops.rotate_half(dit_ops.rms_norm(k, sa.k_norm.weight, sa.k_norm.eps), cos, sin)
                return attend(i, qr, kr, v)

            return hooked

        attend_of = cached_attend_of if attend is None else hooked_attend_of
        tb = t.reshape(-1, 1).float().expand(x.shape[0], nt)  # one timestep for every frame of the chunk
        gather = None if shard is None else (lambda y: shard.gather(y, fs))
        return self._run(tokens, grid, tb, cross_k, cross_v, attend_of, debug, gather)


def forward_flops(cfg: CosmosConfig, q_tokens: int, kv_tokens: int, text_len: int) -> float:
    """Matmul FLOPs of one forward over `q_tokens` tokens attending to `kv_tokens` (cross K/V cached)."""
    d = cfg.dim
    per_token = 2 * (4 * d * d + 2 * d * d + 2 * cfg.mlp_ratio * d * d) + 4 * kv_tokens * d + 4 * text_len * d
    embed = 2 * q_tokens * d * (cfg.embed_in + 4 * cfg.hdmap_channels + 4 * cfg.out_channels)
    return float(cfg.num_blocks * q_tokens * per_token + embed)
