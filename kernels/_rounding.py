"""The roundings the kernels share (`@triton.jit` helpers): to e4m3, to bf16, to an output dtype.

Triton's interpreter (the CPU tests) converts fp32 to fp8 and bf16 with truncation and a broken carry;
there (only: `EMULATE`) values are first rounded to the target grid with integer arithmetic, after which
its conversion is exact and equals the GPU's round-to-nearest-even cast. The `*_f32` helpers return the
rounded value still in fp32. Every kernel that quantizes to e4m3 or stores a narrow dtype rounds through
here (the FP8 attention, K/V pre-pass, merge, linears' activation pass, AdaLN rows, bias + activation).
"""

from __future__ import annotations

from ._common import tl, triton


@triton.jit
def round_e4m3_f32(x):
    """x (fp32) rounded to the nearest e4m3 value, ties to even, saturated at +-448; still fp32."""
    a = tl.minimum(tl.abs(x), 448.0)
    bits = a.to(tl.int32, bitcast=True)
    normal = (((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) << 20).to(tl.float32, bitcast=True)
    sub = (a + 16384.0) - 16384.0  # below 2^-6 the e4m3 grid is 2^-9: fp32 addition rounds to it
    r = tl.where(a >= 0.015625, normal, sub)
    return tl.where(x < 0.0, -r, r)


@triton.jit
def round_bf16_f32(x):
    """x (fp32, finite) rounded to the nearest bf16 value, ties to even; still fp32."""
    a = tl.abs(x)
    bits = a.to(tl.int32, bitcast=True)
    r = (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
    return tl.where(x < 0.0, -r, r)


@triton.jit
def to_e4m3(x, EMULATE: tl.constexpr):
    if EMULATE:
        x = round_e4m3_f32(x)
    return x.to(tl.float8e4nv)  # round to nearest even, saturating (cvt.rn.satfinite on sm_90)


@triton.jit
def to_out(x, dtype: tl.constexpr, EMULATE: tl.constexpr):
    if EMULATE and dtype == tl.bfloat16:
        x = round_bf16_f32(x)
    return x.to(dtype)


@triton.jit
def round_to_f32(x, dtype: tl.constexpr, EMULATE: tl.constexpr):
    """fp32 x rounded to `dtype` (bf16 / fp16 / fp32) and back to fp32: what a tensor of that dtype
    would hold; under the interpreter (EMULATE) bf16 is rounded by hand, to nearest-even as the GPU's cast."""
    if dtype == tl.bfloat16:
        x = round_bf16_f32(x) if EMULATE else x.to(tl.bfloat16).to(tl.float32)
    elif dtype == tl.float16:
        x = x.to(tl.float16).to(tl.float32)
    return x
