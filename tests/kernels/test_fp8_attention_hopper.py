"""The Gluon FP8 ring attention for Hopper (kernels/ring_attention_fp8_hopper.py) against the Triton FP8
kernel it can replace and the torch twin. Gluon has no CPU interpreter: the kernel tests need an sm_90
GPU; what the CPU can check (the switch and its refusal, the route rule, fake tensors, availability) runs
everywhere."""

from __future__ import annotations

import importlib

import pytest
import torch

from flashdreams.errors import InvalidArgumentError
from flashdreams.kernels.ring_attention_fp8_hopper import BLOCK_N, VARIANTS, hopper_fp8_available
from flashdreams.numerics import rel_l2

fp8mod = importlib.import_module("flashdreams.kernels.ring_attention_fp8")
ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def make_case(B, Lq, H, S, valid, seed=0):
    """RMS-normalised q/k (as Wan's norms make them), V ~ N(0, 1), d 128; the fp8 shadow of the ring."""
    g = torch.Generator().manual_seed(seed)

    def rms(*shape):
        x = torch.randn(*shape, generator=g)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))

    dev = torch.device("cuda")
    q = rms(B, Lq, H, 128).to(torch.bfloat16).to(dev)
    k = rms(B, S, H, 128).to(torch.bfloat16).to(dev)
    v = torch.randn(B, S, H, 128, generator=g).to(torch.bfloat16).to(dev)
    vl = torch.tensor([valid], dtype=torch.int32, device=dev)
    kv = fp8mod.quantize_kv_fp8(k, v, vl, BLOCK_N)
    return q, k, v, vl, kv


def run_kernel(q, kv, vl, splits, form):
    from flashdreams.kernels.ring_attention_fp8_hopper import launch_ring_attention_fp8_hopper

    qk_fac = q.shape[-1] ** -0.5 * fp8mod.LOG2E / fp8mod.E4M3_MAX
    return launch_ring_attention_fp8_hopper(q, kv, vl, qk_fac, splits, form)


def triton_kernel(q, kv, vl, splits):
    cfg = fp8mod.Fp8AttnConfig(64, 128, 4, 3, splits=splits, use_tma=True)
    return fp8mod.launch_ring_attention_fp8_quantized(q, kv, kv.v8t, vl, q.shape[-1] ** -0.5, cfg, True)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="the Gluon kernel is written for sm_90")
@pytest.mark.parametrize("form", list(VARIANTS))
@pytest.mark.parametrize("valid", [1, 128, 129, 1000, 4680])
@pytest.mark.parametrize("splits", [1, 2])
def test_matches_the_triton_kernel(form, valid, splits):
    """Same quantized operands, same formulas: the fresh-register forms agree with the Triton kernel to
    exp2/ordering noise; the tensor-core accumulation adds its ~14-bit rounding on top. LSE likewise."""
    precise = VARIANTS[form].precise_pv
    q, _, _, vl, kv = make_case(2, 200, 3, 5000, valid, seed=valid)
    out, lse = run_kernel(q, kv, vl, splits, form)
    want, want_lse = triton_kernel(q, kv, vl, splits)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert rel_l2(out.float(), want.float()) < (5e-3 if precise else 2e-2)
    assert (lse - want_lse).abs().max().item() < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="the Gluon kernel is written for sm_90")
def test_quality_against_exact_attention():
    """At a long ring (28080 keys, 220 tiles) both forms stay within the FP8 kernel's quality budget."""
    from flashdreams.kernels import ring_attention_reference

    q, k, v, vl, kv = make_case(1, 256, 2, 28160, 28080, seed=3)
    ref = ring_attention_reference(q.float(), k, v, vl, q.shape[-1] ** -0.5)
    base = rel_l2(triton_kernel(q, kv, vl, 1)[0].float(), ref)
    for form, variant in VARIANTS.items():
        err = rel_l2(run_kernel(q, kv, vl, 1, form)[0].float(), ref)
        assert err < 0.07 and err < base * (1.02 if variant.precise_pv else 1.2), (form, err, base)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="the Gluon kernel is written for sm_90")
def test_no_valid_keys_gives_zero_and_minus_inf_lse():
    q, _, _, vl, kv = make_case(1, 64, 2, 512, 0)
    out, lse = run_kernel(q, kv, vl, 1, "gluon-psmem")
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all() and (lse < 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="the Gluon kernel is written for sm_90")
@pytest.mark.parametrize("choice", list(VARIANTS))
def test_environment_switch_routes_the_shadowed_attention(monkeypatch, choice):
    """FD_FP8_ATTN_KERNEL sends the engine's route (the prequantized op) through the Gluon kernel."""
    q, _, _, vl, kv = make_case(1, 300, 4, 6000, 5555, seed=1)
    monkeypatch.setenv(fp8mod.KERNEL_ENV, choice)
    got = fp8mod.ring_attention_fp8_prequantized(q, kv, vl, return_lse=True)
    splits = fp8mod.fp8_splits_for(-(-300 // 64) * 4, torch.cuda.get_device_properties(0).multi_processor_count)
    direct = run_kernel(q, kv, vl, splits, choice)
    assert torch.equal(got[0], direct[0]) and torch.equal(got[1], direct[1])


def test_kernel_choice_is_refused_by_name(monkeypatch):
    """A value that names no kernel is refused before anything is launched (on any device); unset, the
    Gluon form measured fastest is chosen (used only where `hopper_fp8_available`)."""
    monkeypatch.setenv(fp8mod.KERNEL_ENV, "cutlass")
    with pytest.raises(InvalidArgumentError, match=fp8mod.KERNEL_ENV):
        fp8mod._kernel_choice()
    monkeypatch.setenv(fp8mod.KERNEL_ENV, "triton")
    assert fp8mod._kernel_choice() == "triton"
    monkeypatch.delenv(fp8mod.KERNEL_ENV)
    assert fp8mod._kernel_choice() == fp8mod.DEFAULT_HOPPER_FORM == "gluon-psmem"
    assert fp8mod.DEFAULT_HOPPER_FORM in VARIANTS and VARIANTS[fp8mod.DEFAULT_HOPPER_FORM].precise_pv


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="the Gluon kernel is written for sm_90")
def test_default_route_on_hopper_is_the_gluon_kernel(monkeypatch):
    """Unset, the engine's route on sm_90 is the default Gluon form; "triton" brings back the Triton kernel."""
    q, _, _, vl, kv = make_case(1, 300, 4, 6000, 5555, seed=2)
    monkeypatch.delenv(fp8mod.KERNEL_ENV, raising=False)
    got = fp8mod.ring_attention_fp8_prequantized(q, kv, vl, return_lse=True)
    splits = fp8mod.fp8_splits_for(-(-300 // 64) * 4, torch.cuda.get_device_properties(0).multi_processor_count)
    assert torch.equal(got[0], run_kernel(q, kv, vl, splits, fp8mod.DEFAULT_HOPPER_FORM)[0])
    monkeypatch.setenv(fp8mod.KERNEL_ENV, "triton")
    tri = fp8mod.ring_attention_fp8_prequantized(q, kv, vl, return_lse=True)
    assert torch.equal(tri[0], triton_kernel(q, kv, vl, splits)[0])


def test_availability_needs_hopper_head_dim_128_and_the_key_tile():
    assert not hopper_fp8_available(torch.zeros(1, 4, 2, 128), BLOCK_N)  # not on a GPU
    if ON_HOPPER:
        q = torch.zeros(1, 4, 2, 128, device="cuda", dtype=torch.bfloat16)
        assert hopper_fp8_available(q, BLOCK_N)
        assert not hopper_fp8_available(q, 64)
        assert not hopper_fp8_available(torch.zeros(1, 4, 2, 64, device="cuda"), BLOCK_N)


def test_fake_tensors_get_shapes_without_a_launch():
    """Under torch.export's fake tensors the op's body (its own fake implementation) only allocates: no
    descriptor is built from a fake pointer and nothing is launched; the shapes are the op's."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from flashdreams.kernels.ring_attention_fp8_hopper import launch_ring_attention_fp8_hopper

    with FakeTensorMode():
        q = torch.empty(2, 100, 3, 128, device="cuda", dtype=torch.bfloat16)
        kv = fp8mod.Fp8KV(
            torch.empty(2, 3, 512, 128, device="cuda", dtype=torch.float8_e4m3fn),
            torch.empty(2, 3, 4, device="cuda"),
            torch.empty(2, 3, 128, 512, device="cuda", dtype=torch.float8_e4m3fn),
            torch.empty(2, 3, 4, device="cuda"),
            BLOCK_N,
        )
        vl = torch.empty(1, device="cuda", dtype=torch.int32)
        out, lse = launch_ring_attention_fp8_hopper(q, kv, vl, 0.01, 2, "gluon-psmem")
        assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (2, 3, 100)


def test_route_rule(monkeypatch):
    """Which calls the Gluon kernel takes where it can serve (availability forced here): the picked config
    with fp8 P @ V only; not an explicit config, not bf16 P @ V, not with ops inlined into Inductor
    (FD_TRITON_OP_INLINE=1: Inductor takes Triton kernels into a graph, not Gluon ones), not "triton"."""
    monkeypatch.setattr(fp8mod, "hopper_fp8_available", lambda q, block_n: True)
    monkeypatch.delenv(fp8mod.KERNEL_ENV, raising=False)
    monkeypatch.delenv("FD_TRITON_OP_INLINE", raising=False)
    q, kv = torch.zeros(1, 4, 2, 128), fp8mod.Fp8KV(*[torch.zeros(1)] * 4, BLOCK_N)
    cfg = fp8mod.Fp8AttnConfig(64, 128, 4, 3, splits=1, use_tma=True)
    assert fp8mod._hopper_form(q, kv, None, True) == "gluon-psmem"
    assert fp8mod._hopper_form(q, kv, cfg, True) is None
    assert fp8mod._hopper_form(q, kv, None, False) is None
    monkeypatch.setenv(fp8mod.KERNEL_ENV, "gluon")
    assert fp8mod._hopper_form(q, kv, None, True) == "gluon"
    monkeypatch.setenv(fp8mod.KERNEL_ENV, "triton")
    assert fp8mod._hopper_form(q, kv, None, True) is None
    monkeypatch.delenv(fp8mod.KERNEL_ENV)
    monkeypatch.setenv("FD_TRITON_OP_INLINE", "1")
    assert fp8mod._hopper_form(q, kv, None, True) is None
    monkeypatch.setattr(fp8mod, "hopper_fp8_available", lambda q, block_n: False)
    monkeypatch.delenv("FD_TRITON_OP_INLINE")
    assert fp8mod._hopper_form(q, kv, None, True) is None
