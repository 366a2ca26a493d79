"""exp2 and 1/x as single MUFU instructions (`@triton.jit` helpers), for passes bound by instruction issue.

Triton lowers an fp32 `/` to `div.full.f32`, and `tl.sigmoid`'s exp to `ex2.approx.f32` without `.ftz`;
ptxas wraps both in fix-ups for the denormal range (a compare, a select and scaling multiplies around the
MUFU). sm_90 SASS of the FP8 activation pass with the tanh GELU had 32 instructions an element, 10 of them
FMUL (cross-compiled here: bench/results/NOTES.md, session of 2026-12-07 second). `rcp.approx.ftz.f32` and
`ex2.approx.ftz.f32` are one MUFU each (`tl.math.exp2` already lowers to the latter; `exp2_ftz` says so
where it matters). They differ from the wrapped forms only where an input or result is an fp32 denormal
(flushed to 0 here), which the GELUs never hand on: e = 2^z is only added to 1, and 1 / (1 + ...) >= 2^-126
unless the sum overflows, when both forms give 0. Measured on an H100 (next97): the same e4m3 codes and
scales as the forms before on 42-58 M elements.

Under the interpreter (`EMULATE`, the CPU tests) there is no PTX: the plain `tl.math.exp2` and division run.
"""

from __future__ import annotations

from ._common import tl, triton


@triton.jit
def exp2_ftz(x, EMULATE: tl.constexpr):
    """2^x in fp32 by one MUFU.EX2 (denormal results flushed to 0)."""
    if EMULATE:
        return tl.math.exp2(x)
    else:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )


@triton.jit
def rcp_ftz(x, EMULATE: tl.constexpr):
    """1/x in fp32 by one MUFU.RCP (relative error <= 2^-23; denormal inputs and results flushed to 0)."""
    if EMULATE:
        return 1.0 / x
    else:
        return tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
