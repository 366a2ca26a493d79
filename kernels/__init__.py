"""Triton kernels of the engine, each beside its plain-torch reference twin.

Every kernel is also a torch custom op, `torch.ops.flashdreams.<name>`, so that
torch.export, Inductor and AOTInductor can carry it into engines (DESIGN.md, "Kernels");
see `_common.register_op` for why they are opaque ops by default. The twins (`*_reference`) define what
each kernel computes and run anywhere; the kernels run on CUDA, or on a CPU under
Triton's interpreter (`TRITON_INTERPRET=1` set before triton is imported).
"""

from ._common import require_triton, torch_twins_only, triton_available
from .action_attention import (
    action_norm_rope,
    action_norm_rope_cache_write,
    action_norm_rope_cache_write_reference,
    action_norm_rope_reference,
    short_ring_attention,
    short_ring_attention_reference,
)
from .adaln import (
    adaln_modulate,
    adaln_modulate_reference,
    gated_residual,
    gated_residual_adaln,
    gated_residual_adaln_reference,
    gated_residual_layer_norm,
    gated_residual_layer_norm_reference,
    gated_residual_modulate_layer_norm,
    gated_residual_modulate_layer_norm_reference,
    gated_residual_reference,
    layer_norm_affine,
    layer_norm_affine_reference,
    residual_adaln,
    residual_adaln_reference,
    residual_layer_norm,
    residual_layer_norm_reference,
)
from .attention_merge import merge_attention, merge_attention_reference
from .channel_rms_norm import channel_rms_norm, channel_rms_norm_reference
from .fp8_linear import Fp8Linear, Fp8Rows, fp8_linear, fp8_linear_reference, quantize_linears_fp8_
from .head_norm_rope import head_norm_rope_cache_write, head_norm_rope_cache_write_reference
from .qk_norm_rope import (
    qk_norm_rope_cache_write,
    qk_norm_rope_cache_write_reference,
    rms_norm,
    rms_norm_reference,
)
from .ring_attention import AttnConfig, ring_attention, ring_attention_reference
from .ring_attention_fp8 import ring_attention_fp8, ring_attention_fp8_reference
from .rope_cache_write import apply_rope_reference, rope_cache_write, rope_cache_write_reference

__all__ = [
    "AttnConfig",
    "Fp8Linear",
    "Fp8Rows",
    "fp8_linear",
    "fp8_linear_reference",
    "quantize_linears_fp8_",
    "action_norm_rope",
    "action_norm_rope_cache_write",
    "action_norm_rope_cache_write_reference",
    "action_norm_rope_reference",
    "ring_attention_fp8",
    "ring_attention_fp8_reference",
    "adaln_modulate",
    "adaln_modulate_reference",
    "apply_rope_reference",
    "channel_rms_norm",
    "channel_rms_norm_reference",
    "gated_residual",
    "gated_residual_adaln",
    "gated_residual_adaln_reference",
    "gated_residual_layer_norm",
    "gated_residual_layer_norm_reference",
    "gated_residual_modulate_layer_norm",
    "gated_residual_modulate_layer_norm_reference",
    "gated_residual_reference",
    "head_norm_rope_cache_write",
    "head_norm_rope_cache_write_reference",
    "layer_norm_affine",
    "layer_norm_affine_reference",
    "residual_layer_norm",
    "residual_layer_norm_reference",
    "merge_attention",
    "merge_attention_reference",
    "qk_norm_rope_cache_write",
    "qk_norm_rope_cache_write_reference",
    "require_triton",
    "residual_adaln",
    "residual_adaln_reference",
    "ring_attention",
    "ring_attention_reference",
    "short_ring_attention",
    "short_ring_attention_reference",
    "rms_norm",
    "rms_norm_reference",
    "rope_cache_write",
    "rope_cache_write_reference",
    "torch_twins_only",
    "triton_available",
]
