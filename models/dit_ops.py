"""The DiT's elementwise, norm and attention steps, with a switch between torch and our kernels.

`impl="sdpa"` is plain torch (the reference, and what CPU tests use); `impl="triton"`
routes the same steps through `flashdreams.kernels` (ring attention, fused
RMSNorm + RoPE + cache write, fused AdaLN). Both compute the same function; the
kernels' own tests hold them to their torch twins.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from flashdreams.errors import InvalidArgumentError
from flashdreams.models.rope import apply_rope

IMPLS = ("sdpa", "triton")
# What a model's `set_attention` takes: IMPLS, or "fa4" = "triton" with FlashAttention-4's CuTe-DSL
# kernel for the KV-ring attention (an optional package; kernels/fa4_attention.py).
ATTENTIONS = (*IMPLS, "fa4")


def ring_precision(precision: str, impl: str, ring_kernel: str) -> str:
    """What the KV-ring attention computes in for a model at `precision` ("bf16" | "fp8"): FP8 only
    through our Triton kernel. With FlashAttention-4 ("fa4") the ring attention stays bf16 (its FP8
    forward is Blackwell-only) while the blocks' linears still run in FP8, and the torch path has no
    FP8 attention at all."""
    return "fp8" if precision == "fp8" and impl == "triton" and ring_kernel == "triton" else "bf16"


def ring_length_for(valid_len: torch.Tensor, impl: str, ring_kernel: str) -> torch.Tensor:
    """The ring's valid length as the ring kernel takes it: FlashAttention-4 wants int32, so a model
    converts it once per forward instead of once per layer (one small kernel each, ~0.8 ms of a
    Self-Forcing block's 150 calls)."""
    return valid_len.to(torch.int32) if impl == "triton" and ring_kernel == "fa4" else valid_len


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise InvalidArgumentError(f"attention implementation '{impl}' is unknown; choose one of {IMPLS}")


def split_attention(attention: str) -> tuple[str, str]:
    """An attention choice -> (impl for the norms and passes, kernel of the KV-ring attention)."""
    if attention not in ATTENTIONS:
        raise InvalidArgumentError(f"attention '{attention}' is unknown; choose one of {ATTENTIONS}")
    return ("triton", "fa4") if attention == "fa4" else (attention, "triton")


def _kernels():
    from flashdreams import kernels

    return kernels


# Where FP8 linears are a norm's only readers (a DiT block's q/k/v, cross-attention q, first MLP layer), the
# norm hands them h quantized (fp8=True below): the same numbers, and no quantization pass of their own.
# bench/block_fusion_bench.py times both forms; tests turn it off to compare whole models.
QUANTIZE_IN_NORMS = True


def takes_fp8_rows(*linears: torch.nn.Module) -> bool:
    """Whether every one of `linears` takes a pre-quantized `kernels.Fp8Rows` (an FP8 linear), so the
    norm feeding them may hand h out quantized (`fp8=` of the norms below)."""
    return QUANTIZE_IN_NORMS and all(getattr(lin, "takes_fp8_rows", False) for lin in linears)


def _h_dtype(fp8: bool) -> torch.dtype | None:
    """The norms' `fp8=True`: with impl="triton" their h comes back as `kernels.Fp8Rows`, quantized per
    row in the norm's own pass for an FP8 linear (`Fp8Linear` takes it as it is); the torch path hands
    h back in x's dtype either way, which an FP8 linear quantizes itself."""
    return torch.float8_e4m3fn if fp8 else None


def _per_frame(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """[B, L, D] -> [B, F, L/F, D] so that per-frame [B, F, 1, D] rows broadcast."""
    return x.unflatten(1, (num_frames, -1))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str = "sdpa") -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) over the last dim in float32, cast back, then times weight."""
    if impl == "triton":
        return _kernels().rms_norm(x, weight, eps)
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y * weight


def adaln_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, impl: str = "sdpa", *, fp8: bool = False
) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale) + shift with per-frame shift/scale [B, F, D] (float32 math)."""
    if impl == "triton":
        return _kernels().adaln_modulate(x, shift, scale, eps, _h_dtype(fp8))
    nf = shift.shape[1]
    xn = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    y = _per_frame(xn, nf) * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)
    return y.flatten(1, 2).to(x.dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, impl: str = "sdpa") -> torch.Tensor:
    """x + y * gate with a per-frame gate [B, F, D] (float32 math, x's dtype)."""
    if impl == "triton":
        return _kernels().gated_residual(x, y, gate)
    nf = gate.shape[1]
    out = _per_frame(x.float(), nf) + _per_frame(y.float(), nf) * gate.unsqueeze(2)
    return out.flatten(1, 2).to(x.dtype)


def layer_norm_affine(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, impl: str = "sdpa", *, fp8: bool = False
) -> torch.Tensor:
    """The cross-attention pre-norm (`norm3`): affine LayerNorm in float32."""
    if impl == "triton":
        return _kernels().layer_norm_affine(x, weight, bias, eps, _h_dtype(fp8))
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)


def gated_residual_layer_norm(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    impl: str = "sdpa",
    *,
    fp8: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x', h): x' = gated_residual(x, y, gate), h = layer_norm_affine(x') (one pass with impl="triton")."""
    if impl == "triton":
        return _kernels().gated_residual_layer_norm(x, y, gate, weight, bias, eps, _h_dtype(fp8))
    x = gated_residual(x, y, gate)
    return x, layer_norm_affine(x, weight, bias, eps)


def token_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x <- (1 + scale) * x + shift with per-token scale/shift [B, L, D] (LingBot's camera), float32
    arithmetic like the other modulations, x's dtype out."""
    return ((1 + scale.float()) * x.float() + shift.float()).to(x.dtype)


def gated_residual_modulate_layer_norm(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    impl: str = "sdpa",
    *,
    fp8: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x', h): x' = token_modulate(gated_residual(x, y, gate), scale, shift), h = layer_norm_affine(x')
    (one pass with impl="triton": 16 bytes an element moved instead of ~46 for the three)."""
    if impl == "triton":
        return _kernels().gated_residual_modulate_layer_norm(x, y, gate, scale, shift, weight, bias, eps, _h_dtype(fp8))
    x = token_modulate(gated_residual(x, y, gate), scale, shift)
    return x, layer_norm_affine(x, weight, bias, eps)


def gated_residual_adaln(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    impl: str = "sdpa",
    *,
    fp8: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x', h): x' = gated_residual(x, y, gate), h = adaln_modulate(x', shift, scale) (one pass with
    impl="triton")."""
    if impl == "triton":
        return _kernels().gated_residual_adaln(x, y, gate, shift, scale, eps, _h_dtype(fp8))
    x = gated_residual(x, y, gate)
    return x, adaln_modulate(x, shift, scale, eps)


def residual_adaln(
    x: torch.Tensor,
    y: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    impl: str = "sdpa",
    *,
    fp8: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x', h): x' = x + y, h = adaln_modulate(x', shift, scale) (one pass with impl="triton")."""
    if impl == "triton":
        return _kernels().residual_adaln(x, y, shift, scale, eps, _h_dtype(fp8))
    x = x + y
    return x, adaln_modulate(x, shift, scale, eps)


def gelu_tanh_mlp(h: torch.Tensor, first: torch.nn.Module, second: torch.nn.Module, impl: str = "sdpa") -> torch.Tensor:
    """second(GELU_tanh(first(h))): Wan's FFN. With impl="triton" the GELU rides along with a
    neighbour instead of costing its own pass over the [L, ffn_dim] hidden tensor (the largest
    activation of the block): inside an FP8 `second`'s activation quantization, or on CUDA in the
    bf16 GEMM's epilogue (cuBLASLt's GELU epilogue is the tanh form, applied to the fp32 accumulator
    before the one rounding; `torch._addmm_activation` on a CPU applies exact GELU, so the CPU keeps
    the unfused form). In Wan2.2 A14B's profiled block on the H200 the epilogue GEMM took 366 ms
    where the plain one and the GELU pass took 353 + 33 ms (bench/results/next7-h200/)."""
    if impl == "triton":
        if getattr(second, "takes_gelu", False):
            return second(first(h), gelu="tanh")
        if type(first) is torch.nn.Linear and h.is_cuda and first.bias is not None:  # (h may be Fp8Rows otherwise)
            lead = h.shape[:-1]
            hidden = torch._addmm_activation(first.bias, h.reshape(-1, h.shape[-1]), first.weight.t(), use_gelu=True)
            return second(hidden.view(*lead, -1))
    return second(F.gelu(first(h), approximate="tanh"))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked softmax(q k^T / sqrt(d)) v; q [B, Lq, N, d], k/v [B, Lk, N, d] -> [B, Lq, N, d]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def ring_rows(slots: torch.Tensor, frame_seq_length: int) -> torch.Tensor:
    """The ring rows of a block's tokens: token t of block-local frame f goes to slots[f]*fs + t % fs."""
    fs = frame_seq_length
    return (slots[:, None] * fs + torch.arange(fs, device=slots.device)).reshape(-1)


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [B, L, N, d]: channels i and i + d/2 turned by angle tables [L, d/2], in
    float32, x's dtype out (Cosmos' layout; Wan pairs adjacent channels, `apply_rope`)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def qk_norm_rope_cache_write(q, k, v, attn, cos, sin, ring_k, ring_v, slots, frame_seq_length, impl="sdpa"):
    """Normalise q and k across heads, rotate both, write k and v into the ring at `slots`.

    q, k, v: projections [B, L, D]; ring_k/v: one layer's ring [B, S, N, d]; slots:
    int64 [nf]. Returns the rotated q [B, L, N, d]. The ring rows of token t of
    block-local frame f are slots[f]*fs + t % fs.
    """
    if impl == "triton":
        return _kernels().qk_norm_rope_cache_write(
            q,
            k,
            v,
            attn.norm_q.weight,
            attn.norm_k.weight,
            attn.norm_q.eps,
            cos,
            sin,
            ring_k,
            ring_v,
            slots,
            frame_seq_length,
        )
    qr = apply_rope(attn.heads(attn.norm_q(q)), cos, sin)
    kr = apply_rope(attn.heads(attn.norm_k(k)), cos, sin)
    rows = ring_rows(slots, frame_seq_length)
    ring_k.index_copy_(1, rows, kr.to(ring_k.dtype))
    ring_v.index_copy_(1, rows, attn.heads(v).to(ring_v.dtype))
    return qr


def head_norm_rope_cache_write(
    q, k, v, norm_q_weight, norm_k_weight, eps, cos, sin, ring_k, ring_v, slots, frame_seq_length, impl="sdpa"
):
    """Cosmos' prologue: per-head RMSNorm of q and k [B, L, N, d] (weights [d]), rotate-half RoPE
    (channels i, i + d/2) by angle tables cos/sin [L, d/2], k and v written into the ring at `slots`.
    Returns the rotated q. The torch path is the DiT's unfused one, operation for operation."""
    if impl == "triton":
        return _kernels().head_norm_rope_cache_write(
            q, k, v, norm_q_weight, norm_k_weight, eps, cos, sin, ring_k, ring_v, slots, frame_seq_length
        )

    rows = ring_rows(slots, frame_seq_length)
    ring_k.index_copy_(1, rows, rotate_half(rms_norm(k, norm_k_weight, eps), cos, sin).to(ring_k.dtype))
    ring_v.index_copy_(1, rows, v.to(ring_v.dtype))
    return rotate_half(rms_norm(q, norm_q_weight, eps), cos, sin)


def ring_attention(
    q: torch.Tensor,
    ring_k: torch.Tensor,
    ring_v: torch.Tensor,
    valid_len: torch.Tensor,
    impl: str = "sdpa",
    valid_len_host: int | None = None,
    precision: str = "bf16",
    kernel: str = "triton",
) -> torch.Tensor:
    """The block's queries [B, L, N, d] against ring rows [0, valid_len) of [B, S, N, d].

    `precision="fp8"` runs both attention matmuls in float8 e4m3 (our Triton kernel only: a model
    asks for it through `ring_precision`). With impl="triton", `kernel` picks ours or
    FlashAttention-4's ("fa4") for bf16.

    With `valid_len_host` (the same length, known on the host) the torch path slices the
    ring instead of masking it, so SDPA can pick its fastest backend (cuDNN, flash); a
    graph traced that way is specialised to that fill level. The Triton kernel reads
    the length from device memory, so one graph serves every fill level.
    """
    if precision == "fp8":
        if impl != "triton" or kernel != "triton":
            raise InvalidArgumentError(
                "FP8 ring attention is our Triton kernel's: it needs attention='triton' (there is no torch or "
                "Hopper FlashAttention-4 FP8 attention)"
            )
        return _kernels().ring_attention_fp8(q, ring_k, ring_v, valid_len)
    if impl == "triton":
        if kernel == "fa4":
            from flashdreams.kernels.fa4_attention import ring_attention_fa4

            return ring_attention_fa4(q, ring_k, ring_v, valid_len)
        return _kernels().ring_attention(q, ring_k, ring_v, valid_len)
    if valid_len_host is not None:
        return attention(q, ring_k[:, :valid_len_host], ring_v[:, :valid_len_host])
    keep = torch.arange(ring_k.shape[1], device=q.device) < valid_len
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), ring_k.transpose(1, 2), ring_v.transpose(1, 2), attn_mask=keep[None, None, None, :]
    )
    return out.transpose(1, 2)


def written_ring_rows(slots: torch.Tensor, frame_tokens: int) -> torch.Tensor:
    """The ring rows a forward writes at its frame `slots` (consecutive frames: consecutive slots, or two
    runs where they wrap around the window's end), as two ranges in one device tensor [first0, end0,
    first1, end1]: from the first slot to the highest, and from the lowest to the last. Without a wrap
    both are the one run; with one, the rows between the runs (the rest of the window) stay as they are,
    where one range from the lowest slot to the highest would re-quantize the whole window."""
    first, last, low, high = slots[0], slots[-1], slots.min(), slots.max()
    return torch.stack([first, high + 1, low, last + 1]) * frame_tokens


def ring_attention_fp8_shadowed(
    q, ring_k, ring_v, valid_len, written, fp8_shadow, layer: int, rows_fp8: bool = False
) -> torch.Tensor | Any:
    """FP8 ring attention through the ring's fp8 shadow: first re-quantize the key tiles overlapping
    ring rows in `written` (`written_ring_rows`: just written into the bf16 ring), then attend on the shadow.
    fp8_shadow = (k8, kt, v8t, vt, block_n), the tensors per layer along dim 0. Equals
    `ring_attention(..., precision="fp8")` on the same ring, bit for bit. `rows_fp8` (where `ATTN_FP8_ROWS`):
    the output comes as the FP8 output projection's quantized input (`kernels.Fp8Rows`, values
    `[B, Lq, N * d]`), the same codes that linear would make of it, quantized as the key splits merge."""
    from flashdreams.kernels.ring_attention_fp8 import (
        Fp8KV,
        ring_attention_fp8_prequantized,
        ring_attention_fp8_rows,
        update_fp8_kv,
    )

    k8, kt, v8t, vt, block_n = fp8_shadow
    kv = Fp8KV(k8[layer], kt[layer], v8t[layer], vt[layer], block_n)
    update_fp8_kv(kv, ring_k, ring_v, valid_len, written)
    if rows_fp8 and ATTN_FP8_ROWS:
        return ring_attention_fp8_rows(q, kv, valid_len)
    return ring_attention_fp8_prequantized(q, kv, valid_len)


# The FP8 attention hands the output projection its input quantized (`ring_attention_fp8_shadowed`'s
# `rows_fp8`); False: a bf16 output that the linear quantizes (the same codes; tests compare the two).
ATTN_FP8_ROWS = True


def flat_heads(attn: torch.Tensor | Any) -> torch.Tensor | Any:
    """An attention's output `[B, L, N, d]` as the output projection's input `[B, L, N * d]`; a
    pre-quantized `kernels.Fp8Rows` (already `[B, L, N * d]`) as it is."""
    return attn.flatten(2) if isinstance(attn, torch.Tensor) else attn
