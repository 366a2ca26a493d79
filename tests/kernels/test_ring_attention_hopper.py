"""The Gluon bf16/fp16 ring attention for Hopper (kernels/ring_attention_hopper.py) against our Triton kernel and
exact attention. Gluon has no CPU interpreter: the kernel tests need an sm_90 GPU (58 passed on an H100,
h1-h100); the CPU checks the switch, its refusal, the route rule and fake tensors."""

from __future__ import annotations

import importlib

import pytest
import torch

from flashdreams.errors import InvalidArgumentError
from flashdreams.kernels.ring_attention_hopper import VARIANTS, hopper_bf16_available, launch_ring_attention_hopper
from flashdreams.numerics import rel_l2

ra = importlib.import_module("flashdreams.kernels.ring_attention")
ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def make_case(B, Lq, H, S, valid, dtype=torch.bfloat16, seed=0):
    """RMS-normalised q/k, V ~ N(0, 1), d 128; NaN in every ring row >= valid (never to be read into a sum)."""
    g = torch.Generator().manual_seed(seed)

    def rms(*shape):
        x = torch.randn(*shape, generator=g)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))

    dev = torch.device("cuda")
    q = rms(B, Lq, H, 128).to(dtype).to(dev)
    k = rms(B, S, H, 128).to(dtype).to(dev)
    v = torch.randn(B, S, H, 128, generator=g).to(dtype).to(dev)
    k[:, valid:] = float("nan")
    v[:, valid:] = float("nan")
    return q, k, v, torch.tensor([valid], dtype=torch.int32, device=dev)


def triton_kernel(q, k, v, vl, splits):
    cfg = ra.AttnConfig(128, 128, 8, 3, splits=splits, use_tma=True)
    return ra.launch_ring_attention(q, k, v, vl, q.shape[-1] ** -0.5, cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="the Gluon kernel is written for sm_90")
@pytest.mark.parametrize("form", list(VARIANTS))
@pytest.mark.parametrize("valid", [1, 64, 129, 1000, 4680])
@pytest.mark.parametrize("splits", [1, 2])
def test_matches_the_triton_kernel(form, valid, splits):
    """Same math (fp32 softmax, 16-bit P @ V): equal to our Triton kernel to summation order, exact attention
    to bf16 rounding; NaN rows past valid never reach the output (the descriptors stop at valid)."""
    q, k, v, vl = make_case(2, 200, 3, 5000, valid, seed=valid)
    out, lse = launch_ring_attention_hopper(q, k, v, vl, q.shape[-1] ** -0.5, splits, form)
    want, want_lse = triton_kernel(q, k, v, vl, splits)
    exact = ra.ring_attention_reference(q.float(), k, v, vl, q.shape[-1] ** -0.5)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert rel_l2(out.float(), want.float()) < 5e-3
    assert rel_l2(out.float(), exact) < 1e-2
    assert (lse - want_lse).abs().max().item() < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="the Gluon kernel is written for sm_90")
def test_fp16_and_no_valid_keys():
    q, k, v, vl = make_case(1, 70, 2, 600, 333, dtype=torch.float16, seed=4)
    out, _ = launch_ring_attention_hopper(q, k, v, vl, q.shape[-1] ** -0.5)
    assert out.dtype == torch.float16 and rel_l2(out.float(), triton_kernel(q, k, v, vl, 1)[0].float()) < 5e-3
    q, k, v, vl = make_case(1, 64, 2, 512, 0)
    out, lse = launch_ring_attention_hopper(q, k, v, vl, q.shape[-1] ** -0.5)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all() and (lse < 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="the Gluon kernel is written for sm_90")
def test_one_cuda_graph_serves_every_ring_length(monkeypatch):
    """The engine's use: captured once, replayed with the ring's length changed on the device between replays
    (the descriptors are made per program from it), each replay equal to a fresh call at that length."""
    monkeypatch.setenv(ra.KERNEL_ENV, "gluon")
    q, k, v, vl = make_case(1, 300, 2, 3000, 3000, seed=5)
    k, v = k.nan_to_num(), v.nan_to_num()
    vl.fill_(700)
    ra.ring_attention(q, k, v, vl)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ra.ring_attention(q, k, v, vl)
    for n in (700, 1800, 2999, 129):
        vl.fill_(n)
        graph.replay()
        torch.cuda.synchronize()
        fresh = launch_ring_attention_hopper(q, k, v, vl, q.shape[-1] ** -0.5)[0]
        assert torch.equal(out, fresh), n


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="the Gluon kernel is written for sm_90")
def test_environment_switch_routes_the_op(monkeypatch):
    q, k, v, vl = make_case(1, 300, 4, 6000, 5555, seed=1)
    monkeypatch.setenv(ra.KERNEL_ENV, "gluon-m64")
    got = ra.ring_attention(q, k, v, vl, return_lse=True)
    splits = ra.pick_config(q, k.shape[1]).splits or 1
    direct = launch_ring_attention_hopper(q, k, v, vl, q.shape[-1] ** -0.5, splits, "gluon-m64")
    assert torch.equal(got[0], direct[0]) and torch.equal(got[1], direct[1])


def test_kernel_choice_is_refused_by_name(monkeypatch):
    monkeypatch.delenv(ra.KERNEL_ENV, raising=False)
    assert ra.kernel_choice() == "triton"  # opt-in: slower than the Triton kernel on an H100 (h1-h100)
    monkeypatch.setenv(ra.KERNEL_ENV, "cutlass")
    with pytest.raises(InvalidArgumentError, match=ra.KERNEL_ENV):
        ra.kernel_choice()
    monkeypatch.setenv(ra.KERNEL_ENV, "gluon-n128")
    assert ra.kernel_choice() == "gluon-n128"


def test_route_rule(monkeypatch):
    """The Gluon kernel runs a picked-config call only when chosen, ops are opaque and it can serve q."""
    monkeypatch.setattr(ra, "hopper_bf16_available", lambda q: True)
    monkeypatch.delenv("FD_TRITON_OP_INLINE", raising=False)
    q = torch.zeros(1, 4, 2, 128, dtype=torch.bfloat16)
    monkeypatch.delenv(ra.KERNEL_ENV, raising=False)
    assert ra.hopper_form(q) is None
    monkeypatch.setenv(ra.KERNEL_ENV, "gluon")
    assert ra.hopper_form(q) == "gluon"
    monkeypatch.setenv("FD_TRITON_OP_INLINE", "1")
    assert ra.hopper_form(q) is None
    monkeypatch.delenv("FD_TRITON_OP_INLINE")
    monkeypatch.setattr(ra, "hopper_bf16_available", lambda q: False)
    assert ra.hopper_form(q) is None


def test_availability_rule():
    assert not hopper_bf16_available(torch.zeros(1, 4, 2, 128, dtype=torch.bfloat16))  # not on a GPU
    if ON_HOPPER:
        assert hopper_bf16_available(torch.zeros(1, 4, 2, 128, device="cuda", dtype=torch.bfloat16))
        assert not hopper_bf16_available(torch.zeros(1, 4, 2, 128, device="cuda", dtype=torch.float32))
        assert not hopper_bf16_available(torch.zeros(1, 4, 2, 64, device="cuda", dtype=torch.bfloat16))


def test_fake_tensors_get_shapes_without_a_launch():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 100, 3, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.empty(2, 512, 3, 128, device="cuda", dtype=torch.bfloat16)
        vl = torch.empty(1, device="cuda", dtype=torch.int32)
        out, lse = launch_ring_attention_hopper(q, k, k, vl, 0.1, 2, "gluon")
        assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (2, 3, 100)


def test_load_refuses_a_bad_choice_before_anything_loads(monkeypatch):
    import flashdreams
    from flashdreams import registry

    def no_load(*_a, **_k):
        raise AssertionError("loading started before the environment was checked")

    monkeypatch.setenv(ra.KERNEL_ENV, "cutlass")
    monkeypatch.setattr(registry, "get_preset", no_load)
    with pytest.raises(InvalidArgumentError, match=ra.KERNEL_ENV):
        flashdreams.load(decoder=None, attention="triton")
