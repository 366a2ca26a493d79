"""Cosmos' per-head QK RMSNorm + rotate-half RoPE + KV-ring write, against its torch twin and the DiT's own path.

On a CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set below before
triton is imported). The interpreter truncates fp32 -> bf16 instead of rounding to nearest
even, and the chain rounds three times (norm, weight product, rotation), so bf16 is held to
2e-2 there; fp32 and fp16 are held tighter.
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
    head_norm_rope_cache_write,
    head_norm_rope_cache_write_reference,
    triton_available,
)
from flashdreams.kernels._common import poisoned_outputs  # noqa: E402
from flashdreams.models import cosmos_dit, dit_ops  # noqa: E402
from flashdreams.numerics import rel_l2  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    not triton_available(DEVICE),
    reason="Triton kernels need CUDA, or TRITON_INTERPRET=1 set before triton is first imported",
)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def rand(*shape, g, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def angles(L: int, d: int, g) -> tuple[torch.Tensor, torch.Tensor]:
    ang = (torch.rand(L, d // 2, generator=g) * 2 * math.pi).to(DEVICE)
    return ang.cos(), ang.sin()


@pytest.mark.parametrize(
    "dtype,w_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)],
)
@pytest.mark.parametrize(
    "B,fs,H,d,cap_frames,slots",
    [
        (1, 15, 2, 32, 6, [4, 5, 1]),  # wrapped ring, L = 45
        (2, 15, 3, 48, 5, [2, 3, 4]),  # head_dim 48: half 24 is padded to 32
        (1, 4, 16, 128, 4, [3, 0]),  # Cosmos 2B's 16 x 128 heads
    ],
)
def test_matches_twin(dtype, w_dtype, B, fs, H, d, cap_frames, slots):
    g = torch.Generator().manual_seed(H * 1000 + d)
    L, S = len(slots) * fs, cap_frames * fs
    q, k, v = (rand(B, L, H, d, g=g, dtype=dtype, scale=3.0) for _ in range(3))
    wq, wk = rand(d, g=g, dtype=w_dtype), rand(d, g=g, dtype=w_dtype)
    cos, sin = angles(L, d, g)
    k_cache, v_cache = rand(B, S, H, d, g=g, dtype=dtype), rand(B, S, H, d, g=g, dtype=dtype)
    k_twin, v_twin = k_cache.clone(), v_cache.clone()
    slot_t = torch.tensor(slots, device=DEVICE)

    with poisoned_outputs():
        q_rot = head_norm_rope_cache_write(q, k, v, wq, wk, 1e-6, cos, sin, k_cache, v_cache, slot_t, fs)
    q_ref = head_norm_rope_cache_write_reference(q, k, v, wq, wk, 1e-6, cos, sin, k_twin, v_twin, slot_t, fs)

    rows = (slot_t[:, None] * fs + torch.arange(fs, device=DEVICE)).reshape(-1)
    untouched = torch.ones(S, dtype=torch.bool, device=DEVICE)
    untouched[rows] = False
    assert q_rot.shape == (B, L, H, d) and q_rot.dtype == dtype
    assert rel_l2(q_rot, q_ref) < TOL[dtype]
    assert rel_l2(k_cache[:, rows], k_twin[:, rows]) < TOL[dtype]
    assert torch.equal(v_cache, v_twin)  # raw values land bit for bit; other rows untouched
    assert torch.equal(k_cache[:, untouched], k_twin[:, untouched])


def test_twin_is_the_dit_path():
    """The twin is what cosmos_dit's unfused path computes: HeadNorm, then rope_rotate_half on the
    [a, a] angle tables, then the index copy. A rotate-half twin that paired the wrong channels
    (adjacent, as Wan's) would fail here."""
    g = torch.Generator().manual_seed(5)
    B, fs, H, d = 1, 6, 2, 32
    L, S = 2 * fs, 4 * fs
    q, k, v = (rand(B, L, H, d, g=g) for _ in range(3))
    norm_q, norm_k = cosmos_dit.HeadNorm(d, 1e-6).to(DEVICE), cosmos_dit.HeadNorm(d, 1e-6).to(DEVICE)
    with torch.no_grad():
        norm_q.weight.copy_(rand(d, g=g))
        norm_k.weight.copy_(rand(d, g=g))
    cos_h, sin_h = angles(L, d, g)
    cos, sin = torch.cat([cos_h, cos_h], -1), torch.cat([sin_h, sin_h], -1)  # the DiT's [a, a] tables
    slots = torch.tensor([2, 0], device=DEVICE)
    kc, vc = torch.zeros(B, S, H, d, device=DEVICE), torch.zeros(B, S, H, d, device=DEVICE)
    rows = (slots[:, None] * fs + torch.arange(fs, device=DEVICE)).reshape(-1)
    kc.index_copy_(1, rows, cosmos_dit.rope_rotate_half(norm_k(k), cos, sin))
    vc.index_copy_(1, rows, v)
    q_dit = cosmos_dit.rope_rotate_half(norm_q(q), cos, sin)

    kt, vt = torch.zeros_like(kc), torch.zeros_like(vc)
    w = (norm_q.weight.detach(), norm_k.weight.detach())
    q_twin = head_norm_rope_cache_write_reference(q, k, v, *w, 1e-6, cos_h, sin_h, kt, vt, slots, fs)
    assert rel_l2(q_twin, q_dit) < 1e-6 and rel_l2(kt, kc) < 1e-6 and torch.equal(vt, vc)
    kf, vf = torch.zeros_like(kc), torch.zeros_like(vc)
    q_kernel = dit_ops.head_norm_rope_cache_write(q, k, v, *w, 1e-6, cos_h, sin_h, kf, vf, slots, fs, impl="triton")
    assert rel_l2(q_kernel, q_dit) < 1e-5 and rel_l2(kf, kc) < 1e-5 and torch.equal(vf, vc)


def test_custom_op_exports():
    g = torch.Generator().manual_seed(12)
    B, fs, H, d = 1, 5, 2, 32
    L, S = 2 * fs, 4 * fs
    q, k, v = (rand(B, L, H, d, g=g) for _ in range(3))
    wq, wk = rand(d, g=g), rand(d, g=g)
    cos, sin = angles(L, d, g)
    slots = torch.tensor([1, 3], device=DEVICE)
    kc0, vc0 = rand(B, S, H, d, g=g), rand(B, S, H, d, g=g)
    kt, vt = kc0.clone(), vc0.clone()
    q_ref = head_norm_rope_cache_write_reference(q, k, v, wq, wk, 1e-6, cos, sin, kt, vt, slots, fs)

    class Prologue(torch.nn.Module):
        def forward(self, q, k, v, kc, vc, slots):
            return head_norm_rope_cache_write(q, k, v, wq, wk, 1e-6, cos, sin, kc, vc, slots, fs)

    ep = torch.export.export(Prologue(), (q, k, v, kc0.clone(), vc0.clone(), slots))
    assert "flashdreams.head_norm_rope_cache_write" in str(ep.graph)
    kc, vc = kc0.clone(), vc0.clone()
    out = ep.module()(q, k, v, kc, vc, slots)
    assert rel_l2(out, q_ref) < 1e-5 and rel_l2(kc, kt) < 1e-5 and torch.equal(vc, vt)


def test_bad_arguments_name_the_argument():
    g = torch.Generator().manual_seed(13)
    B, fs, H, d = 1, 4, 2, 32
    L, S = 2 * fs, 3 * fs
    q, k, v = (rand(B, L, H, d, g=g) for _ in range(3))
    wq, wk = rand(d, g=g), rand(d, g=g)
    cos = sin = torch.ones(L, d // 2, device=DEVICE)
    kc, vc = rand(B, S, H, d, g=g), rand(B, S, H, d, g=g)
    slots = torch.tensor([0, 1], device=DEVICE)
    kc_before = kc.clone()
    with pytest.raises(InvalidArgumentError, match="norm_k_weight"):
        head_norm_rope_cache_write(q, k, v, wq, wk[:-1], 1e-6, cos, sin, kc, vc, slots, fs)
    with pytest.raises(InvalidArgumentError, match="k_cache"):
        head_norm_rope_cache_write(q, k, v, wq, wk, 1e-6, cos, sin, kc[:, :, :1], vc, slots, fs)
    with pytest.raises(InvalidArgumentError, match="cos"):
        head_norm_rope_cache_write(q, k, v, wq, wk, 1e-6, torch.ones(L, d, device=DEVICE), sin, kc, vc, slots, fs)
    with pytest.raises(InvalidArgumentError, match="v"):
        head_norm_rope_cache_write(q, k, v[..., :16], wq, wk, 1e-6, cos, sin, kc, vc, slots, fs)
    assert torch.equal(kc, kc_before)  # refused before anything was written
