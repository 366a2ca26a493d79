"""The Wan2.1 DiT: bidirectional (`WanModel`) and causal streaming (`CausalWanModel`) forwards.

`model_type='i2v'` adds the image branch of Wan2.1-I2V: `img_emb` maps the 257 CLIP tokens
into the model width, each block's cross-attention attends to them with its own K/V
(`k_img`, `v_img`, `norm_k_img`) and adds that result to the text attention before `o`.
The cross-attention cache then holds [image rows; text rows], split at `CLIP_TOKENS`.

Both share one set of weights under the official key names (`blocks.0.self_attn.q.weight`,
...), so a Wan2.1 or Self-Forcing checkpoint loads as is. The causal forward is written
for static shapes: every value that changes between blocks (timestep, RoPE frame
positions, ring slots, valid cache length) is a device tensor, and nothing reads a
device value back to the host, so one traced graph serves every block.

Precision follows the reference where it matters for parity: the timestep sinusoid
and the RoPE angles in float64, norms and modulation arithmetic in float32, the
residual stream and the linears in the model's dtype.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from flashdreams.errors import InvalidArgumentError
from flashdreams.models import dit_ops
from flashdreams.models.rope import apply_rope, rope_tables
from flashdreams.models.wan_config import WanConfig

# The reference splits the I2V context at this hard-coded row: CLIP image tokens come first.
CLIP_TOKENS = 257
# The per-token linears `set_precision("fp8")` leaves in the model's dtype (a regex over their names): the
# cross-attention's output projection. In FP8 it alone took Self-Forcing's latents from rel. L2 0.020 to 0.034
# over 7 blocks against 0.03 allowed, while its query projection changed nothing (0.0335 either way;
# bench/fp8_layer_study.py, bench/results/fp8-layers-cpu/). Its input, text values averaged over the prompt, is
# nearly the same for every token, so its rounding error is too, and adds up instead of averaging out. It is 6%
# of the linears' FLOPs (2% of a Self-Forcing block's): ~2 ms a block in bf16 (not yet measured).
FP8_KEEP = r"cross_attn\.o$"


class RMSNorm(nn.Module):
    """RMSNorm over the last dim (all heads together), float32 math, weight after the cast."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dit_ops.rms_norm(x, self.weight, self.eps)


class WanAttention(nn.Module):
    """q/k/v/o projections with the across-heads q/k RMSNorm (self- and cross-attention)."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1))

    def fuse_qkv_(self) -> None:
        """Keep q/k/v as one [3D, D] projection too: one GEMM of N = 3D runs the tensor cores
        far better than three of N = D (a 4680x1536x1536 addmm reached ~290 TFLOP/s on the
        H100). Non-persistent, so checkpoints and state dicts keep the reference's keys."""
        with torch.no_grad():
            w = torch.cat([self.q.weight, self.k.weight, self.v.weight])
            b = torch.cat([self.q.bias, self.k.bias, self.v.bias])
        self.register_buffer("qkv_weight", w, persistent=False)
        self.register_buffer("qkv_bias", b, persistent=False)

    def qkv_takes_fp8_rows(self) -> bool:
        """Whether `project_qkv` runs FP8 linears only (see `takes_fp8_rows`)."""
        if getattr(self, "qkv_fp8", None) is not None:
            return dit_ops.takes_fp8_rows(self.qkv_fp8)
        return getattr(self, "qkv_weight", None) is None and dit_ops.takes_fp8_rows(self.q, self.k, self.v)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw q, k, v projections [B, L, D] (views of one fused GEMM when fuse_qkv_ ran)."""
        if getattr(self, "qkv_fp8", None) is not None:
            return self.qkv_fp8(x).chunk(3, dim=-1)
        if getattr(self, "qkv_weight", None) is not None:
            return F.linear(x, self.qkv_weight, self.qkv_bias).chunk(3, dim=-1)
        return self.q(x), self.k(x), self.v(x)

    def kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a context [B, T, D] as [B, T, N, d] (the cross-attention cache)."""
        return self.heads(self.norm_k(self.k(context))), self.heads(self.v(context))


class WanI2VCrossAttention(WanAttention):
    """Cross-attention with the extra image branch of Wan2.1-I2V (`k_img`, `v_img`, `norm_k_img`)."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__(dim, num_heads, eps)
        self.k_img = nn.Linear(dim, dim)
        self.v_img = nn.Linear(dim, dim)
        self.norm_k_img = RMSNorm(dim, eps)

    def kv_img(self, context_img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the embedded image tokens [B, 257, D] as [B, 257, N, d]."""
        return self.heads(self.norm_k_img(self.k_img(context_img))), self.heads(self.v_img(context_img))


class MLPProj(nn.Module):
    """`img_emb`: CLIP tokens [B, 257, clip_dim] -> [B, 257, D] (LN, Linear, exact GELU, Linear, LN)."""

    def __init__(self, clip_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(clip_dim, eps=1e-5),
            nn.Linear(clip_dim, clip_dim),
            nn.GELU(),
            nn.Linear(clip_dim, dim),
            nn.LayerNorm(dim, eps=1e-5),
        )

    def forward(self, clip_fea: torch.Tensor) -> torch.Tensor:
        return self.proj(clip_fea)


class TokenModulation(NamedTuple):
    """A per-token modulation of the residual right after the self-attention, x <- (1 + scale) * x +
    shift with scale/shift [B, L, D] (LingBot's camera). Given as a block's `after_self`, it is applied
    in the same row pass as the residual add and the cross-attention's pre-norm."""

    scale: torch.Tensor
    shift: torch.Tensor


class LayerModulations(Protocol):
    """A model's per-layer `TokenModulation`s, given as `forward_*`'s `after_self`."""

    def layer(self, i: int) -> TokenModulation: ...


def _layer_after_self(after_self: Any, layer: int) -> Any:
    """A block's `after_self` from the model's: `after_self.layer(i)` (a TokenModulation) where the
    model has per-layer modulations, else `after_self(i, x)` bound to the layer, or None."""
    if after_self is None:
        return None
    per_layer = getattr(after_self, "layer", None)
    return per_layer(layer) if callable(per_layer) else partial(after_self, layer)


class WanBlock(nn.Module):
    """One WanAttentionBlock; the self-attention's cache policy comes in as `attend`."""

    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.eps = cfg.eps
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)
        self.self_attn = WanAttention(d, cfg.num_heads, cfg.eps)
        self.norm3 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else None
        cross = WanI2VCrossAttention if cfg.model_type == "i2v" else WanAttention
        self.cross_attn = cross(d, cfg.num_heads, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))

    def forward(
        self, x, e0, attend, cross_k, cross_v, impl: str = "sdpa", after_cross=None, after_self=None,
        pending=None, defer_ffn: bool = False, modulated=None,
    ):  # fmt: skip
        """x [B, L, D]; e0 [B, F, 6, D] float32 (per-frame time projection); returns x. `modulated`, if
        given, is this block's `modulation + e0` already made (`WanDiT.layer_modulations`; e0 is then not read).

        `attend(q, k, v, self_attn)` turns the raw q/k/v projections into the
        self-attention output [B, L, N, d]; it owns RoPE and the cache policy.
        cross_k/v [B, T, N, d]; for an i2v block the first CLIP_TOKENS rows are the image's.
        `after_cross(x) -> x`, if given, runs between the cross-attention residual and the FFN
        (Matrix-Game's action module sits there). `after_self(x) -> x`, if given, runs between the
        self-attention residual and the cross-attention; a `TokenModulation` there (LingBot's camera
        scale/shift) is applied in the residual's and the pre-norm's pass.

        `defer_ffn` leaves the FFN's gated residual undone and returns (x, pending) instead of x,
        pending = (ffn output, gate); the next block, given `pending`, adds it in the same pass
        that normalises its input (one row pass per layer fewer; the caller resolves the last
        one with `dit_ops.gated_residual`). Same arithmetic, so the same numbers.
        """
        if modulated is None:
            modulated = self.modulation.float().unsqueeze(1) + e0
        shift1, scale1, gate1, shift2, scale2, gate2 = modulated.unbind(2)  # 6 x [B, F, D]
        sa, ca = self.self_attn, self.cross_attn
        # Each norm hands its h quantized where only FP8 linears read it.
        qkv8, q8, ffn8 = sa.qkv_takes_fp8_rows(), dit_ops.takes_fp8_rows(ca.q), dit_ops.takes_fp8_rows(self.ffn[0])
        if pending is None:
            h = dit_ops.adaln_modulate(x, shift1, scale1, self.eps, impl, fp8=qkv8)
        else:
            x, h = dit_ops.gated_residual_adaln(x, *pending, shift1, scale1, self.eps, impl, fp8=qkv8)
        attn = attend(*sa.project_qkv(h), sa)
        y = sa.o(dit_ops.flat_heads(attn))
        modulation = after_self if isinstance(after_self, TokenModulation) else None
        if after_self is None and self.norm3 is not None:  # residual and pre-norm in one pass
            x, h = dit_ops.gated_residual_layer_norm(
                x, y, gate1, self.norm3.weight, self.norm3.bias, self.eps, impl, fp8=q8
            )
        elif modulation is not None and self.norm3 is not None:  # residual, modulation and pre-norm in one
            x, h = dit_ops.gated_residual_modulate_layer_norm(
                x, y, gate1, *modulation, self.norm3.weight, self.norm3.bias, self.eps, impl, fp8=q8
            )
        else:
            x = dit_ops.gated_residual(x, y, gate1, impl)
            if modulation is not None:
                x = dit_ops.token_modulate(x, *modulation)
            elif after_self is not None:
                x = after_self(x)
            if self.norm3 is not None:
                h = dit_ops.layer_norm_affine(x, self.norm3.weight, self.norm3.bias, self.eps, impl, fp8=q8)
            else:
                h = x
        q = ca.heads(dit_ops.rms_norm(ca.q(h), ca.norm_q.weight, ca.norm_q.eps, impl))
        if isinstance(ca, WanI2VCrossAttention):
            n = CLIP_TOKENS
            out = dit_ops.attention(q, cross_k[:, n:], cross_v[:, n:])
            out = out + dit_ops.attention(q, cross_k[:, :n], cross_v[:, :n])
        else:
            out = dit_ops.attention(q, cross_k, cross_v)
        y = ca.o(out.flatten(2))
        if after_cross is None:  # residual and the FFN's modulated norm in one pass
            x, h = dit_ops.residual_adaln(x, y, shift2, scale2, self.eps, impl, fp8=ffn8)
        else:
            x = after_cross(x + y)
            h = dit_ops.adaln_modulate(x, shift2, scale2, self.eps, impl, fp8=ffn8)
        y = dit_ops.gelu_tanh_mlp(h, self.ffn[0], self.ffn[2], impl)
        if defer_ffn:
            return x, (y, gate2)
        return dit_ops.gated_residual(x, y, gate2, impl)


class WanHead(nn.Module):
    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.eps = cfg.eps
        self.head = nn.Linear(d, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, d) / d**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.float().unsqueeze(1) + e.float().unsqueeze(2)).unbind(2)
        return self.head(dit_ops.adaln_modulate(x, shift, scale, self.eps))


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[..., dim] = [cos(t w_j), sin(t w_j)], w_j = 10000^(-j/half); float64 like the reference."""
    half = dim // 2
    t64 = t.to(torch.float64)
    w = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    ang = t64.unsqueeze(-1) * w
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1).float()


class WanDiT(nn.Module):
    """Wan2.1 DiT weights plus the bidirectional forward; `forward_step` is the causal one."""

    fp8_keep: str | None = FP8_KEEP  # the linears precision "fp8" leaves in the model's dtype (a regex)

    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.img_emb = MLPProj(cfg.clip_dim, d) if cfg.model_type == "i2v" else None
        self.blocks = nn.ModuleList([WanBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = WanHead(cfg)
        self.attention_impl = "sdpa"
        self.ring_kernel = "triton"  # or "fa4": FlashAttention-4 for the KV ring (set_attention("fa4"))
        self.precision = "bf16"

    # -- shared pieces -------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def fuse_projections_(self) -> WanDiT:
        """Fuse each self-attention's q/k/v into one GEMM (after the weights are final)."""
        for blk in self.blocks:
            blk.self_attn.fuse_qkv_()
        return self

    def set_precision(self, precision: str, keep: str | None = None) -> None:
        """'bf16' (the model's dtype) or 'fp8': the blocks' per-token linears but `fp8_keep` (FP8_KEEP: the
        cross-attention's output; `keep`, a regex over the names, replaces it) and the self-attention in float8
        e4m3 (opt-in; its quality cost is measured in bench/). With attention 'fa4' the KV-ring attention stays
        bf16 (`dit_ops.ring_precision`). Irreversible: reload the weights to go back. Embeddings, the head,
        cross-attention K/V stay in bf16."""
        if precision not in ("bf16", "fp8"):
            raise InvalidArgumentError(f"precision '{precision}' is unknown; choose bf16 or fp8")
        if precision == "fp8" and self.precision != "fp8":
            if self.attention_impl != "triton":
                raise InvalidArgumentError("precision 'fp8' needs attention='triton'")
            self.quantize_fp8_(exclude=keep)
        self.precision = precision

    def quantize_fp8_(self, exclude: str | None = None) -> list[str]:
        """Swap the blocks' per-token linears (`is_dit_fp8_linear`) for FP8 ones, but those whose names match
        the regex `exclude` (None: the model's `fp8_keep`; "": none); returns the swapped names. The
        attention's precision is `set_precision`'s."""
        from flashdreams.kernels import Fp8Linear, quantize_linears_fp8_
        from flashdreams.kernels.fp8_linear import fp8_exclusion, is_dit_fp8_linear

        exclude = self.fp8_keep if exclude is None else exclude
        keep = fp8_exclusion(exclude)

        def wanted(name: str, linear: nn.Linear) -> bool:
            return is_dit_fp8_linear(name, linear) and not (keep is not None and keep.search(name))

        done = []
        for i, blk in enumerate(self.blocks):
            sa = blk.self_attn
            names = [f"blocks.{i}.self_attn.{p}" for p in ("q", "k", "v")]
            if not all(wanted(n, lin) for n, lin in zip(names, (sa.q, sa.k, sa.v))):
                continue
            fused = nn.Linear(
                sa.q.in_features, 3 * sa.q.out_features, device=sa.q.weight.device, dtype=sa.q.weight.dtype
            )
            with torch.no_grad():
                fused.weight.copy_(torch.cat([sa.q.weight, sa.k.weight, sa.v.weight]))
                fused.bias.copy_(torch.cat([sa.q.bias, sa.k.bias, sa.v.bias]))
            sa.qkv_fp8 = Fp8Linear.from_linear(fused)  # one FP8 GEMM for q, k and v
            for name in ("qkv_weight", "qkv_bias"):
                sa._buffers.pop(name, None)
            done += names
        # q/k/v run as the fused qkv_fp8 above; the rest of the blocks' linears go FP8 one by one.
        self_qkv = re.compile(r"self_attn\.(q|k|v)$")
        done += quantize_linears_fp8_(self, include=lambda n, lin: wanted(n, lin) and not self_qkv.search(n))
        return done

    def set_attention(self, impl: str) -> None:
        """'sdpa' (torch), 'triton' (FlashDreams kernels: ring attention, fused norms) or 'fa4' ('triton' with
        FlashAttention-4 for the KV-ring attention)."""
        self.attention_impl, self.ring_kernel = dit_ops.split_attention(impl)

    def layer_modulations(self, e0: torch.Tensor) -> torch.Tensor:
        """Every block's `modulation + e0`, [layers, B, F, 6, D] float32, as each block would make its own (the
        same adds) but in three launches a forward instead of two a block: at Self-Forcing's 30 layers that is
        57 fewer kernels a forward, each a graph node with its own launch gap. Made from the parameters on
        every call, so a reload of the weights is seen. For the streaming forward, whose t is per frame: a per-token
        t (the bidirectional forwards allow one) would make this [layers, B, L, 6, D], too large to hold at once."""
        table = torch.stack([blk.modulation for blk in self.blocks]).float()  # [layers, 1, 6, D]
        return table.unsqueeze(2) + e0

    def embed_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Latents [B, C, F, H, W] -> tokens [B, L, D] and the token grid (F', H', W')."""
        y = self.patch_embedding(x.to(self.dtype))
        grid = tuple(y.shape[2:])
        return y.flatten(2).transpose(1, 2).contiguous(), grid

    def time_embed(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B, F] -> e [B, F, D] and e0 [B, F, 6, D], both float32."""
        s = sinusoidal_embedding(t, self.cfg.freq_dim).to(self.dtype)
        e = self.time_embedding(s)
        e0 = self.time_projection(e).unflatten(-1, (6, self.cfg.dim))
        return e.float(), e0.float()

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings [B, T, text_dim], zero-padded to text_len, through text_embedding."""
        t = context.shape[1]
        if t < self.cfg.text_len:
            context = F.pad(context, (0, 0, 0, self.cfg.text_len - t))
        return self.text_embedding(context[:, : self.cfg.text_len].to(self.dtype))

    def cross_kv(
        self, context: torch.Tensor, clip_fea: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-attention cache of a prompt: K, V of shape [layers, B, text_len, N, d].

        An i2v model needs the CLIP tokens `clip_fea` [B, 257, clip_dim]; its cache is then
        [layers, B, 257 + text_len, N, d], the image rows first (the reference's context order).
        """
        c = self.embed_text(context)
        kvs = [blk.cross_attn.kv(c) for blk in self.blocks]
        k, v = torch.stack([k for k, _ in kvs]), torch.stack([v for _, v in kvs])
        if self.img_emb is None:
            if clip_fea is not None:
                raise InvalidArgumentError("clip_fea was given, but this is a t2v Wan model (model_type 't2v')")
            return k, v
        if clip_fea is None or clip_fea.dim() != 3 or tuple(clip_fea.shape[1:]) != (CLIP_TOKENS, self.cfg.clip_dim):
            got = None if clip_fea is None else tuple(clip_fea.shape)
            raise InvalidArgumentError(
                f"an i2v Wan model needs the CLIP image tokens clip_fea [B, {CLIP_TOKENS}, {self.cfg.clip_dim}]; "
                f"got {got}"
            )
        ci = self.img_emb(clip_fea.to(self.dtype))
        kvi = [blk.cross_attn.kv_img(ci) for blk in self.blocks]
        k = torch.cat([torch.stack([a for a, _ in kvi]), k], dim=2)
        v = torch.cat([torch.stack([b for _, b in kvi]), v], dim=2)
        return k, v

    def unpatchify(self, y: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Head output [B, L, pt*ph*pw*C] -> [B, C, F, H, W] float32 (channel-fastest token vectors)."""
        pt, ph, pw = self.cfg.patch_size
        f, h, w = grid
        b = y.shape[0]
        y = y.float().reshape(b, f, h, w, pt, ph, pw, self.cfg.out_dim)
        y = y.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return y.reshape(b, self.cfg.out_dim, f * pt, h * ph, w * pw)

    # -- bidirectional forward (WanModel) -------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        clip_fea: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Full attention over all tokens of each sample; t [B] (or [B, F]); returns flow [B, C, F, H, W].

        i2v: `clip_fea` [B, 257, clip_dim] CLIP tokens and `y` [B, 20, F, H, W] (mask + image
        latent), which is concatenated to x on channels before the patch embedding.
        """
        return self.forward_cached(x, t, *self.cross_kv(context, clip_fea), y=y)

    def forward_cached(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cross_k: torch.Tensor,
        cross_v: torch.Tensor,
        y: torch.Tensor | None = None,
        after_self: Callable[[int, torch.Tensor], torch.Tensor] | LayerModulations | None = None,
    ) -> torch.Tensor:
        """`forward` with the cross-attention cache given ([layers, B, T, N, d], from `cross_kv`).

        A sampler computes the prompt's K/V once and reuses them at every step; the result is
        the same as `forward` on the prompt the cache was made from.
        """
        if (self.img_emb is not None) != (y is not None):
            raise InvalidArgumentError(
                f"the conditioning y [B, 20, F, H, W] is needed by an i2v model and only by it "
                f"(model_type '{self.cfg.model_type}', y {'given' if y is not None else 'missing'})"
            )
        if y is not None:
            if y.shape[0] != x.shape[0] or tuple(y.shape[2:]) != tuple(x.shape[2:]):
                raise InvalidArgumentError(f"y {tuple(y.shape)} does not match the latent x {tuple(x.shape)}")
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        tokens, grid = self.embed_tokens(x)
        f, h, w = grid
        if t.dim() == 1:
            t = t[:, None].expand(-1, f)
        e, e0 = self.time_embed(t)
        cos, sin = rope_tables(torch.arange(f, device=x.device), h, w, self.cfg.head_dim)

        def attend(q, k, v, sa):
            q = apply_rope(sa.heads(sa.norm_q(q)), cos, sin)
            k = apply_rope(sa.heads(sa.norm_k(k)), cos, sin)
            return dit_ops.attention(q, k, sa.heads(v))

        for i, blk in enumerate(self.blocks):
            tokens = blk(tokens, e0, attend, cross_k[i], cross_v[i], after_self=_layer_after_self(after_self, i))
        return self.unpatchify(self.head(tokens, e), grid)

    # -- causal streaming forward (CausalWanModel with the KV ring) -------------------
    def forward_step(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cross_k: torch.Tensor,
        cross_v: torch.Tensor,
        ring_k: torch.Tensor,
        ring_v: torch.Tensor,
        frame_positions: torch.Tensor,
        slots: torch.Tensor,
        valid_len: torch.Tensor,
        valid_len_host: int | None = None,
        *,
        attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        shard: Any = None,
        after_cross: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        after_self: Callable[[int, torch.Tensor], torch.Tensor] | LayerModulations | None = None,
        fp8_shadow: tuple | None = None,
    ) -> torch.Tensor:
        """One forward of a block of frames against the KV ring.

        x [B, C, nf, H, W]; t [B, nf] float; cross_k/v [layers, B, T, N, d];
        ring_k/v [layers, B, S, N, d], written in place at the block's slots;
        frame_positions, slots: int64 [nf]; valid_len: int64 [1]. Returns the flow
        prediction [B, C, nf, H, W] in float32. `valid_len_host` optionally repeats
        valid_len as a host int: the torch attention path then slices the ring (see
        dit_ops.ring_attention), specialising the call to that fill level.

        Context-parallel hooks (flashdreams.parallel; both None on one GPU, which leaves this
        path exactly as it is): `shard` keeps this rank's token rows of every frame
        (`shard.take(x, frame_tokens, dim)`, applied to the tokens and the RoPE tables alike)
        and gathers the head's output back (`shard.gather(y, frame_tokens)`); `attend(layer,
        q, k, v)` replaces the self-attention's cache write and attention: it gets q and k
        after the q/k norm and RoPE and v, each [B, L, N, d] for this rank's tokens, and owns
        the ring (`ring_k/v` are then this rank's shard of it).

        `after_cross(layer, x) -> x` (None: nothing) runs inside every block between the
        cross-attention and the FFN on the block's tokens [B, L, D] (Matrix-Game's action modules);
        `after_self(layer, x) -> x` between the self-attention residual and the cross-attention,
        or an object whose `layer(i)` gives layer i's `TokenModulation` (LingBot's camera
        scale/shift). With `shard`, `after_self` gets this rank's token rows and must be
        token-local (LingBot's is: per-token scale and shift, taken the same way).

        `fp8_shadow` (FP8 attention only; models/fp8_ring_shadow.py): (k8, kt, v8t, vt, block_n), the
        first four per layer along dim 0, an fp8 copy of the ring kept in step with it: the key tiles
        holding this block's rows are re-quantized after they are written and the attention reads the
        shadow, instead of quantizing the whole ring in every call; the same numbers.
        """
        if fp8_shadow is not None and (attend is not None or shard is not None):
            raise InvalidArgumentError(
                "forward_step: context parallel runs the ring attention unquantized; load with precision 'bf16' "
                "(or attention 'fa4')"
            )
        if after_cross is not None and shard is not None:
            raise InvalidArgumentError(
                "forward_step: the action hooks need every token of a frame (no context parallel)"
            )
        tokens, grid = self.embed_tokens(x)
        f, h, w = grid
        fs = h * w
        e, e0 = self.time_embed(t)
        cos, sin = rope_tables(frame_positions, h, w, self.cfg.head_dim)
        impl = self.attention_impl
        ring_prec = dit_ops.ring_precision(self.precision, impl, self.ring_kernel)
        ring_len = dit_ops.ring_length_for(valid_len, impl, self.ring_kernel)
        shadowed = fp8_shadow is not None and ring_prec == "fp8"
        if shadowed:
            written = dit_ops.written_ring_rows(slots, fs)
        if shard is not None:
            tokens = shard.take(tokens, fs, 1)
            cos, sin = shard.take(cos, fs, 0), shard.take(sin, fs, 0)

        def cached_attend(q, k, v, sa, layer):
            qr = dit_ops.qk_norm_rope_cache_write(q, k, v, sa, cos, sin, ring_k[layer], ring_v[layer], slots, fs, impl)
            if shadowed:  # the FP8 output projection then takes the output quantized as the key splits merge
                rk, rv, rows = ring_k[layer], ring_v[layer], dit_ops.takes_fp8_rows(sa.o)
                return dit_ops.ring_attention_fp8_shadowed(qr, rk, rv, valid_len, written, fp8_shadow, layer, rows)
            return dit_ops.ring_attention(
                qr, ring_k[layer], ring_v[layer], ring_len, impl, valid_len_host, ring_prec, self.ring_kernel
            )

        def hooked_attend(q, k, v, sa, layer):
            qr = apply_rope(sa.heads(sa.norm_q(q)), cos, sin)
            kr = apply_rope(sa.heads(sa.norm_k(k)), cos, sin)
            return attend(layer, qr, kr, sa.heads(v).to(qr.dtype))

        layer_attend = cached_attend if attend is None else hooked_attend
        # With our kernels each block's FFN residual is added by the next block's first row pass,
        # unless something watches the blocks' outputs (a parity trace's forward hooks), which
        # must see each block's finished x.
        watched = any(blk._forward_hooks for blk in self.blocks)
        defer, pending = impl == "triton" and not watched, None
        mods = self.layer_modulations(e0)
        for i, blk in enumerate(self.blocks):
            hook = partial(after_cross, i) if after_cross is not None else None
            hook_self = _layer_after_self(after_self, i)
            args = (tokens, e0, partial(layer_attend, layer=i), cross_k[i], cross_v[i], impl, hook, hook_self)
            out = blk(*args, pending=pending, defer_ffn=defer, modulated=mods[i])
            tokens, pending = out if defer else (out, None)
        if pending is not None:
            tokens = dit_ops.gated_residual(tokens, *pending, impl)
        y = self.head(tokens, e)
        if shard is not None:
            y = shard.gather(y, fs)
        return self.unpatchify(y, grid)
