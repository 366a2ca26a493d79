"""Fused RoPE + KV-ring write against its plain-torch twin, on fresh random inputs.

On a CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set below before
triton is imported). bf16 tolerances are loose there because the interpreter truncates
fp32 -> bf16 instead of rounding to nearest even (fp16 is exact and checked tightly).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402

from flashdreams.errors import InvalidArgumentError  # noqa: E402
from flashdreams.kernels import rope_cache_write, rope_cache_write_reference, triton_available  # noqa: E402
from flashdreams.kernels._common import poisoned_outputs  # noqa: E402
from flashdreams.numerics import rel_l2  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    not triton_available(DEVICE),
    reason="Triton kernels need CUDA, or TRITON_INTERPRET=1 set before triton is first imported",
)
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def rand(*shape, g, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


def angles(L, d, g):
    a = (torch.rand(L, d // 2, generator=g) * 2 * math.pi).to(DEVICE)
    return a.cos(), a.sin()


def written_rows(slots: list[int], fs: int) -> list[int]:
    return [s * fs + i for s in slots for i in range(fs)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "B,fs,H,d,cap_frames,slots",
    [
        (1, 15, 2, 32, 6, [4, 5, 1]),  # wrapped ring: slots out of order, L = 45
        (2, 15, 3, 48, 5, [0, 1, 2]),  # d padded to 64, first block
        (1, 8, 4, 64, 4, [3, 1]),
        (1, 4, 12, 128, 7, [6, 0, 3]),
    ],
)
def test_matches_twin(dtype, B, fs, H, d, cap_frames, slots):
    g = torch.Generator().manual_seed(hash((B, fs, H, d)) % 1000)
    L, S = len(slots) * fs, cap_frames * fs
    q, k, v = (rand(B, L, H, d, g=g, dtype=dtype) for _ in range(3))
    cos, sin = angles(L, d, g)
    k_cache, v_cache = rand(B, S, H, d, g=g, dtype=dtype), rand(B, S, H, d, g=g, dtype=dtype)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    k_twin, v_twin = k_cache.clone(), v_cache.clone()
    slot_t = torch.tensor(slots, device=DEVICE)

    with poisoned_outputs():
        q_rot = rope_cache_write(q, k, v, cos, sin, k_cache, v_cache, slot_t, fs)
    q_ref = rope_cache_write_reference(q, k, v, cos, sin, k_twin, v_twin, slot_t, fs)

    rows = torch.tensor(written_rows(slots, fs), device=DEVICE)
    untouched = torch.ones(S, dtype=torch.bool, device=DEVICE)
    untouched[rows] = False
    assert q_rot.shape == (B, L, H, d) and q_rot.dtype == dtype
    assert rel_l2(q_rot, q_ref) < TOL[dtype]
    assert rel_l2(k_cache[:, rows], k_twin[:, rows]) < TOL[dtype]
    assert torch.equal(v_cache[:, rows], v.reshape(B, L, H, d))  # values are copied bit for bit
    assert torch.equal(k_cache[:, untouched], k_before[:, untouched])
    assert torch.equal(v_cache[:, untouched], v_before[:, untouched])


def test_strided_inputs_and_stacked_caches():
    """q/k/v as views of a fused qkv projection; caches as one layer of [layers, B, S, N, d]."""
    g = torch.Generator().manual_seed(7)
    B, fs, H, d, layers = 2, 5, 3, 32, 3
    slots = [2, 0]
    L, S = len(slots) * fs, 4 * fs
    qkv = rand(B, L, 3, H, d, g=g)
    q, k, v = qkv.unbind(2)
    ks, vs = rand(layers, B, S, H, d, g=g), rand(layers, B, S, H, d, g=g)
    ks_twin, vs_twin = ks.clone(), vs.clone()
    cos, sin = angles(L, d, g)
    slot_t = torch.tensor(slots, dtype=torch.int32, device=DEVICE)
    q_rot = rope_cache_write(q, k, v, cos, sin, ks[1], vs[1], slot_t, fs)
    q_ref = rope_cache_write_reference(q, k, v, cos, sin, ks_twin[1], vs_twin[1], slot_t, fs)
    assert rel_l2(q_rot, q_ref) < 1e-6
    assert rel_l2(ks, ks_twin) < 1e-6 and torch.equal(vs, vs_twin)
    assert torch.equal(ks[0], ks_twin[0]) and torch.equal(ks[2], ks_twin[2])  # other layers untouched


def test_custom_op_export_and_compile_mutate_caches():
    g = torch.Generator().manual_seed(8)
    B, fs, H, d = 1, 6, 2, 32
    slots = torch.tensor([3, 1], device=DEVICE)
    L, S = 2 * fs, 4 * fs
    q, k, v = (rand(B, L, H, d, g=g) for _ in range(3))
    cos, sin = angles(L, d, g)
    kc0, vc0 = rand(B, S, H, d, g=g), rand(B, S, H, d, g=g)
    kt, vt = kc0.clone(), vc0.clone()
    q_ref = rope_cache_write_reference(q, k, v, cos, sin, kt, vt, slots, fs)

    kc, vc = kc0.clone(), vc0.clone()
    q_rot = torch.ops.flashdreams.rope_cache_write(q, k, v, cos, sin, kc, vc, slots, fs)
    assert rel_l2(q_rot, q_ref) < 1e-6 and rel_l2(kc, kt) < 1e-6 and torch.equal(vc, vt)

    class Write(torch.nn.Module):
        def forward(self, q, k, v, cos, sin, kc, vc, slots):
            return rope_cache_write(q, k, v, cos, sin, kc, vc, slots, fs) + 1.0

    kc, vc = kc0.clone(), vc0.clone()
    ep = torch.export.export(Write(), (q, k, v, cos, sin, kc.clone(), vc.clone(), slots))
    assert "flashdreams.rope_cache_write" in str(ep.graph)
    out = ep.module()(q, k, v, cos, sin, kc, vc, slots)
    assert rel_l2(out, q_ref + 1.0) < 1e-6
    assert rel_l2(kc, kt) < 1e-6 and torch.equal(vc, vt)  # the exported program still writes the ring

    kc, vc = kc0.clone(), vc0.clone()
    backend = "inductor" if DEVICE.type == "cuda" else "eager"  # Inductor needs a GPU for Triton
    out = torch.compile(Write(), backend=backend, fullgraph=True)(q, k, v, cos, sin, kc, vc, slots)
    assert rel_l2(out, q_ref + 1.0) < 1e-6
    assert rel_l2(kc, kt) < 1e-6 and torch.equal(vc, vt)


def test_bad_arguments_name_the_argument():
    g = torch.Generator().manual_seed(9)
    B, fs, H, d = 1, 4, 2, 32
    L, S = 2 * fs, 3 * fs
    q, k, v = (rand(B, L, H, d, g=g) for _ in range(3))
    cos, sin = angles(L, d, g)
    kc, vc = rand(B, S, H, d, g=g), rand(B, S, H, d, g=g)
    slots = torch.tensor([0, 1], device=DEVICE)
    with pytest.raises(InvalidArgumentError, match="cos"):
        rope_cache_write(q, k, v, cos.double(), sin, kc, vc, slots, fs)
    with pytest.raises(InvalidArgumentError, match="slots"):
        rope_cache_write(q, k, v, cos, sin, kc, vc, slots[:1], fs)
    with pytest.raises(InvalidArgumentError, match="frame"):
        rope_cache_write(q, k, v, cos, sin, kc, vc, slots, 3)
    with pytest.raises(InvalidArgumentError, match="k_cache"):
        rope_cache_write(q, k, v, cos, sin, kc.half(), vc, slots, fs)
    with pytest.raises(InvalidArgumentError, match="v"):
        rope_cache_write(q, k, v[:, :4], cos, sin, kc, vc, slots, fs)
