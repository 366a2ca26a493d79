"""QK RMSNorm + RoPE + KV-ring write, and the standalone RMSNorm, against their torch twins.

On a CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set below before
triton is imported). The interpreter truncates fp32 -> bf16 instead of rounding to
nearest even; the norm chain rounds three times (norm, weight product, rotation), so bf16
is held to 2e-2 there, fp16 (exact in the interpreter) to 2e-3.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402

from flashdreams.errors import InvalidArgumentError  # noqa: E402
from flashdreams.kernels import (  # noqa: E402
    qk_norm_rope_cache_write,
    qk_norm_rope_cache_write_reference,
    rms_norm,
    rms_norm_reference,
    triton_available,
)
from flashdreams.kernels._common import poisoned_outputs  # noqa: E402
from flashdreams.numerics import rel_l2  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    not triton_available(DEVICE),
    reason="Triton kernels need CUDA, or TRITON_INTERPRET=1 set before triton is first imported",
)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def rand(*shape, g, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


@pytest.mark.parametrize(
    "dtype,w_dtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),  # Wan in bf16: the weight product rounds to bf16
        (torch.bfloat16, torch.float32),  # fp32 weights: the product stays fp32 until the end
        (torch.float16, torch.float16),
    ],
)
@pytest.mark.parametrize(
    "B,fs,H,d,cap_frames,slots",
    [
        (1, 15, 2, 32, 6, [4, 5, 1]),  # wrapped ring, L = 45
        (2, 15, 3, 48, 5, [2, 3, 4]),
        (1, 6, 5, 64, 3, [1]),
        (1, 4, 12, 128, 4, [3, 0]),  # Wan 1.3B's 12 x 128 heads
    ],
)
def test_matches_twin(dtype, w_dtype, B, fs, H, d, cap_frames, slots):
    g = torch.Generator().manual_seed(H * 1000 + d)
    L, S, D = len(slots) * fs, cap_frames * fs, H * d
    q, k, v = (rand(B, L, D, g=g, dtype=dtype, scale=3.0) for _ in range(3))
    wq, wk = rand(D, g=g, dtype=w_dtype), rand(D, g=g, dtype=w_dtype)
    ang = (torch.rand(L, d // 2, generator=g) * 2 * math.pi).to(DEVICE)
    cos, sin = ang.cos(), ang.sin()
    k_cache, v_cache = rand(B, S, H, d, g=g, dtype=dtype), rand(B, S, H, d, g=g, dtype=dtype)
    k_twin, v_twin = k_cache.clone(), v_cache.clone()
    slot_t = torch.tensor(slots, device=DEVICE)

    with poisoned_outputs():
        q_rot = qk_norm_rope_cache_write(q, k, v, wq, wk, 1e-6, cos, sin, k_cache, v_cache, slot_t, fs)
    q_ref = qk_norm_rope_cache_write_reference(q, k, v, wq, wk, 1e-6, cos, sin, k_twin, v_twin, slot_t, fs)

    rows = (slot_t[:, None] * fs + torch.arange(fs, device=DEVICE)).reshape(-1)
    untouched = torch.ones(S, dtype=torch.bool, device=DEVICE)
    untouched[rows] = False
    assert q_rot.shape == (B, L, H, d) and q_rot.dtype == dtype
    assert rel_l2(q_rot, q_ref) < TOL[dtype]
    assert rel_l2(k_cache[:, rows], k_twin[:, rows]) < TOL[dtype]
    assert torch.equal(v_cache, v_twin)  # raw values land bit for bit; other rows untouched
    assert torch.equal(k_cache[:, untouched], k_twin[:, untouched])


@pytest.mark.parametrize(
    "dtype,w_dtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float16),
    ],
)
@pytest.mark.parametrize("shape", [(2, 45, 96), (1, 7, 144), (3, 1536), (1, 5, 2, 100)])
def test_rms_norm_matches_twin(dtype, w_dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = rand(*shape, g=g, dtype=dtype, scale=2.0)
    w = rand(shape[-1], g=g, dtype=w_dtype)
    with poisoned_outputs():
        y = rms_norm(x, w, 1e-6)
    ref = rms_norm_reference(x, w, 1e-6)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert rel_l2(y, ref) < TOL[dtype]


def test_rms_norm_strided_rows():
    g = torch.Generator().manual_seed(11)
    x = rand(2, 9, 2, 64, g=g)[:, :, 1]  # rows with a stride of 128
    w = rand(64, g=g)
    assert rel_l2(rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5)) < 1e-6


def test_custom_ops_and_export():
    g = torch.Generator().manual_seed(12)
    B, fs, H, d = 1, 5, 2, 32
    L, S, D = 2 * fs, 4 * fs, 2 * 32
    q, k, v = (rand(B, L, D, g=g) for _ in range(3))
    wq, wk = rand(D, g=g), rand(D, g=g)
    ang = (torch.rand(L, d // 2, generator=g) * 2 * math.pi).to(DEVICE)
    cos, sin = ang.cos(), ang.sin()
    slots = torch.tensor([1, 3], device=DEVICE)
    kc0, vc0 = rand(B, S, H, d, g=g), rand(B, S, H, d, g=g)
    kt, vt = kc0.clone(), vc0.clone()
    q_ref = qk_norm_rope_cache_write_reference(q, k, v, wq, wk, 1e-6, cos, sin, kt, vt, slots, fs)
    kc, vc = kc0.clone(), vc0.clone()
    q_rot = torch.ops.flashdreams.qk_norm_rope_cache_write(q, k, v, wq, wk, 1e-6, cos, sin, kc, vc, slots, fs)
    assert rel_l2(q_rot, q_ref) < 1e-5 and rel_l2(kc, kt) < 1e-5 and torch.equal(vc, vt)
    assert rel_l2(torch.ops.flashdreams.rms_norm(q, wq, 1e-6), rms_norm_reference(q, wq, 1e-6)) < 1e-6

    class Prologue(torch.nn.Module):
        def forward(self, q, k, v, kc, vc, slots):
            return qk_norm_rope_cache_write(q, k, v, wq, wk, 1e-6, cos, sin, kc, vc, slots, fs), rms_norm(q, wq, 1e-6)

    ep = torch.export.export(Prologue(), (q, k, v, kc0.clone(), vc0.clone(), slots))
    assert "flashdreams.qk_norm_rope_cache_write" in str(ep.graph) and "flashdreams.rms_norm" in str(ep.graph)
    kc, vc = kc0.clone(), vc0.clone()
    out, _ = ep.module()(q, k, v, kc, vc, slots)
    assert rel_l2(out, q_ref) < 1e-5 and rel_l2(kc, kt) < 1e-5 and torch.equal(vc, vt)


def test_bad_arguments_name_the_argument():
    g = torch.Generator().manual_seed(13)
    B, fs, H, d = 1, 4, 2, 32
    L, S, D = 2 * fs, 3 * fs, H * d
    q, k, v = (rand(B, L, D, g=g) for _ in range(3))
    wq, wk = rand(D, g=g), rand(D, g=g)
    cos = sin = torch.ones(L, d // 2, device=DEVICE)
    kc, vc = rand(B, S, H, d, g=g), rand(B, S, H, d, g=g)
    slots = torch.tensor([0, 1], device=DEVICE)
    with pytest.raises(InvalidArgumentError, match="norm_k_weight"):
        qk_norm_rope_cache_write(q, k, v, wq, wk[:-1], 1e-6, cos, sin, kc, vc, slots, fs)
    with pytest.raises(InvalidArgumentError, match="k_cache"):
        qk_norm_rope_cache_write(q, k, v, wq, wk, 1e-6, cos, sin, kc[:, :, :1], vc, slots, fs)
    with pytest.raises(InvalidArgumentError, match="weight"):
        rms_norm(q, wq[:3], 1e-6)
    with pytest.raises(InvalidArgumentError, match="x"):
        rms_norm(q.int(), wq, 1e-6)
