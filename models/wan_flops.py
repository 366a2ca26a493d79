"""FLOPs of a Wan DiT forward, counted from its shapes (matmuls and attention only)."""

from __future__ import annotations

from flashdreams.models.wan_config import WanConfig


def dit_forward_flops(cfg: WanConfig, query_tokens: int, kv_tokens: int) -> dict[str, float]:
    """One forward of a block of `query_tokens` against `kv_tokens` cached keys (the block included).

    Per layer: q/k/v/o (4 matmuls D x D), cross-attention q/o (2 x D x D; the prompt's
    K/V are cached), the FFN (2 x D x ffn), self-attention QK^T and PV (4 Lq Lkv D),
    cross-attention (4 Lq text_len D). Patch embedding and head are < 0.1% and left out.
    """
    d, f, lq = cfg.dim, cfg.ffn_dim, query_tokens
    linear = (6 * 2 * lq * d * d + 2 * 2 * lq * d * f) * cfg.num_layers
    attention = 4 * lq * kv_tokens * d * cfg.num_layers
    cross = 4 * lq * cfg.text_len * d * cfg.num_layers
    return {
        "linear": float(linear),
        "attention": float(attention),
        "cross_attention": float(cross),
        "total": float(linear + attention + cross),
    }
