"""The KV ring's fp8 shadow: what a streaming family declares to keep one beside its bf16 ring.

With FP8 attention (our Triton kernel) each attention call needs the ring's keys and values as e4m3 with
one scale per key tile. Quantizing the whole valid ring in every call is a pass over all of it per layer
and forward (Self-Forcing's block 5 on the H200: 37.6 ms of a 329.0 ms FP8 block in next39-h200, 7.2 ms
with the shadow in next40-h200). The shadow keeps those operands as session state instead: each forward
re-quantizes only the key tiles holding the rows it has just written (`dit_ops.ring_attention_fp8_shadowed`),
and the attention reads the shadow. The numbers are the same, bit for bit.

A family opts in at load (`shadow_block_n`), adds the four tensors to its session state (`shadow_state`)
and to its DiT graph's signature and calls (`with_fp8_shadow`, `add_shadow_args`), and hands the model the
tensors with the tile size (`fp8_shadow=(*tensors, block_n)`).
"""

from __future__ import annotations

import torch

from flashdreams.models import dit_ops
from flashdreams.models.family import GraphSig, TensorDecl

# Per layer (dim 0), the `kernels.ring_attention_fp8.Fp8KV` fields k8, kt, v8t, vt.
FP8_SHADOW = ("ring_k8", "ring_kt", "ring_v8t", "ring_vt")


def shadow_block_n(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> int | None:
    """The key tile of the ring's fp8 shadow when `model`'s ring attention runs in FP8 (our Triton
    kernel), else None (no shadow: bf16 attention, FlashAttention-4, or the torch path)."""
    if dit_ops.ring_precision(model.precision, model.attention_impl, model.ring_kernel) != "fp8":
        return None
    from flashdreams.kernels.ring_attention_fp8 import fp8_kv_block_n

    probe = torch.empty(1, 1, model.cfg.num_heads, model.cfg.head_dim, device=device, dtype=dtype)
    return fp8_kv_block_n(probe)


def shadow_state(layers: int, batch: int, capacity: int, heads: int, head_dim: int, block_n: int) -> dict:
    """The shadow's session state: per layer, an e4m3 copy of K and of V (transposed) and their per-tile
    scales, for a ring of `capacity` rows ([layers, B, S, N, d])."""
    from flashdreams.kernels.ring_attention_fp8 import fp8_kv_shapes

    shapes = fp8_kv_shapes(batch, capacity, heads, head_dim, block_n)
    state = {}
    for name, field in zip(FP8_SHADOW, ("k8", "kt", "v8t", "vt")):
        fp8 = field in ("k8", "v8t")
        what = "e4m3 copy" if fp8 else "per-tile scales"
        state[name] = TensorDecl(
            name,
            (layers, *shapes[field]),
            "float8_e4m3fn" if fp8 else "float32",
            f"the ring's fp8 shadow: {what} of {'K' if field.startswith('k') else 'V'} ({block_n}-row tiles)",
            batch_dim=1,  # [layers, B, ...] like the ring itself
        )
    return state


def with_fp8_shadow(sig: GraphSig) -> GraphSig:
    """A DiT forward's signature that also takes (and updates in place) the ring's fp8 shadow."""
    written = (*sig.mutates, *FP8_SHADOW)
    return GraphSig(sig.name, (*sig.args, *FP8_SHADOW), sig.outs, written, (*sig.groups, *FP8_SHADOW))


def add_shadow_args(programs: dict[str, list[dict]], graphs: tuple[str, ...]) -> None:
    """Pass the shadow to every call of `graphs` in the block programs (in place)."""
    for ops in programs.values():
        for op in ops:
            if op["op"] == "call" and op["graph"] in graphs:
                op["args"].update({name: name for name in FP8_SHADOW})
