"""Attention through FlashAttention-4's CuTe-DSL kernels (the optional `flash-attn-4` package).

Issue 22 weighs three routes to a Hopper-class attention (TMA loads, wgmma, warp-specialized
producer/consumer pipelines): our Triton kernel, a CUDA C++ kernel of our own, and
FlashAttention-4, whose package carries an sm90 forward written in NVIDIA's CuTe DSL. This
module is the third route, behind the same contract as `ring_attention`: q `[B, Lq, N, d]`
over ring rows `[0, valid_len)` of `[B, S, N, d]` K/V caches, `valid_len` a device tensor.

FlashAttention-4 takes per-sequence key counts on the device (`seqused_k`), so the ring's
length is read by the kernel and one CUDA graph serves every fill level, as with our kernel.
Its kernels are compiled by the CuTe DSL on the first call of each shape (seconds), on the host:
sessions warm up before they capture, so captures replay the compiled kernel.

`block_sparse_attention_fa4` is the same package's block-sparse kernel behind
`block_sparse_attention`'s contract (FlashVSR's windowed attention: 128-token windows = the
kernel's 128x128 tiles, every selected window a full block, the selection handed over as
per-query-window counts and index lists). It is written and checked on the CPU for its arguments
only: no GPU has run it yet, so FlashVSR does not route to it (`bench/flashvsr_bench.py` measures
it beside ours and its GPU test is in tests/kernels/test_fa4_attention.py).

It is an optional dependency (`pip install flash-attn-4`, sm90 or newer) and never the default:
`fa4_unavailable_reason` says why it cannot run, and the engine picks it only when asked
(`flashdreams.load(attention="fa4")`). The torch twins: `ring_attention_reference`,
`block_sparse_attention_reference`.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from flashdreams.errors import InvalidArgumentError

from .ring_attention import _check_attention_args, resolve_scale

PACKAGE = "flash_attn.cute"


@functools.cache
def _package_missing() -> str | None:
    try:
        found = importlib.util.find_spec(PACKAGE) is not None
    except ModuleNotFoundError:
        found = False
    return None if found else "the flash-attn-4 package is not installed (pip install flash-attn-4)"


def fa4_unavailable_reason(device: torch.device | str) -> str | None:
    """None when FlashAttention-4 can run on `device`, else a sentence saying why not."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return f"it needs a CUDA GPU (device is {dev})"
    major, _ = torch.cuda.get_device_capability(dev)
    if major < 9:
        return f"it needs compute capability 9.0 or newer (this GPU is {major}.x)"
    return _package_missing()


def _fa4_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, valid_len: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    from flash_attn.cute import flash_attn_varlen_func

    # One length per batch row, int32 and contiguous, as seqused_k wants; still on the device.
    used = valid_len.reshape(1).to(torch.int32).expand(q.shape[0]).contiguous()
    out, lse = flash_attn_varlen_func(q, k_cache, v_cache, seqused_k=used, softmax_scale=scale, return_lse=True)
    return out, lse


def _block_sparse_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: torch.Tensor, indices: torch.Tensor, block: int
) -> torch.Tensor:
    from flash_attn.cute import flash_attn_func
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    # Every selected window is attended whole: all of them are "full" blocks, none needs a mask.
    sparse = BlockSparseTensorsTorch(
        mask_block_cnt=torch.zeros_like(counts),
        mask_block_idx=indices,
        full_block_cnt=counts,
        full_block_idx=indices,
        block_size=(block, block),
    )
    return flash_attn_func(q, k, v, block_sparse_tensors=sparse)[0]


_ops: dict = {}


def _registered_op(name: str):
    """`torch.ops.flashdreams.<name>`: opaque to compilers (the CuTe DSL call cannot be traced)."""
    if name not in _ops:
        if name == "ring_attention_fa4":
            op = torch.library.custom_op("flashdreams::ring_attention_fa4", _fa4_op, mutates_args=())

            @op.register_fake
            def _(q, k_cache, v_cache, valid_len, scale):
                B, Lq, H, _ = q.shape
                return torch.empty_like(q), q.new_empty((B, H, Lq), dtype=torch.float32)

        else:
            op = torch.library.custom_op("flashdreams::block_sparse_attention_fa4", _block_sparse_op, mutates_args=())
            op.register_fake(lambda q, k, v, counts, indices, block: torch.empty_like(q))
        _ops[name] = op
    return _ops[name]


def _check_runnable(q: torch.Tensor, scale: float | None) -> float:
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise InvalidArgumentError(f"q: FlashAttention-4 takes bfloat16 or float16, found {q.dtype}")
    scale = resolve_scale(q, scale)
    reason = fa4_unavailable_reason(q.device)
    if reason:
        raise InvalidArgumentError(f"attention 'fa4' cannot run here: {reason}")
    return scale


def ring_attention_fa4(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    valid_len: torch.Tensor,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`ring_attention` computed by FlashAttention-4 (same arguments, outputs and lse layout)."""
    _check_attention_args(q, k_cache, v_cache, valid_len)
    scale = _check_runnable(q, scale)
    out, lse = _registered_op("ring_attention_fa4")(q, k_cache, v_cache, valid_len, scale)
    return (out, lse) if return_lse else out


def block_sparse_attention_fa4(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, block: int = 128
) -> torch.Tensor:
    """`block_sparse_attention` computed by FlashAttention-4 (same arguments and output; a query window
    that selects nothing gives zeros). Its sm90 tiles are 128 tokens: `block` must be 128."""
    from .block_sparse_attention import _check_args, mask_to_lists

    _check_args(q, k, v, mask, block)
    if block != 128:
        raise InvalidArgumentError(
            f"block: FlashAttention-4's block-sparse kernel takes 128-token windows, found {block}"
        )
    _check_runnable(q, None)
    counts, indices = mask_to_lists(mask.bool())
    return _registered_op("block_sparse_attention_fa4")(q, k, v, counts, indices, block)
