"""The DiT steps' kernel routes against their torch forms: Wan's FFN with its GELU fused away."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from flashdreams.kernels import Fp8Linear, triton_available  # noqa: E402
from flashdreams.models import dit_ops  # noqa: E402
from flashdreams.numerics import rel_l2  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not triton_available(DEVICE), reason="needs CUDA or TRITON_INTERPRET=1")


def _ffn(d: int, hidden: int, dtype: torch.dtype, seed: int) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    ffn = nn.Sequential(nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d))
    with torch.no_grad():
        for p in ffn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return ffn.to(DEVICE, dtype)


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2).to(DEVICE, dtype)


def test_torch_route_is_the_sequential():
    ffn = _ffn(64, 160, torch.float32, 0)
    h = _inputs((2, 30, 64), torch.float32, 1)
    assert torch.equal(dit_ops.gelu_tanh_mlp(h, ffn[0], ffn[2], "sdpa"), ffn(h))


@needs_triton
def test_fp8_route_fuses_the_tanh_gelu_into_the_quantization():
    """With FP8 linears the GELU happens inside the second layer's activation quantization (that the
    kernel applies the tanh form is tested in tests/kernels/test_fp8_linear.py)."""
    ffn = _ffn(64, 256, torch.bfloat16, 2)
    first, second = Fp8Linear.from_linear(ffn[0]), Fp8Linear.from_linear(ffn[2])
    h = _inputs((1, 48, 64), torch.bfloat16, 3)
    got = dit_ops.gelu_tanh_mlp(h, first, second, "triton")
    hidden = first(h)
    want = second(F.gelu(hidden, approximate="tanh"))
    assert got.shape == (1, 48, 64)
    assert rel_l2(got, want) < 1e-2
    assert rel_l2(got, ffn(h)) < 0.08  # and still the bf16 FFN, within FP8's error


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_route_puts_the_tanh_gelu_in_the_gemm_epilogue():
    """On CUDA the bf16 route is cuBLASLt's GELU epilogue: the tanh form on the fp32 accumulator, so it
    is at least as close to an fp32 evaluation of the FFN as the unfused bf16 path is."""
    ffn = _ffn(1536, 8960, torch.bfloat16, 4)
    h = _inputs((1, 520, 1536), torch.bfloat16, 5)
    fused = dit_ops.gelu_tanh_mlp(h, ffn[0], ffn[2], "triton")
    unfused = ffn(h)
    w1, b1, w2, b2 = (t.float() for t in (ffn[0].weight, ffn[0].bias, ffn[2].weight, ffn[2].bias))
    exact32 = F.linear(F.gelu(F.linear(h.float(), w1, b1), approximate="tanh"), w2, b2)
    assert fused.dtype == torch.bfloat16 and fused.shape == unfused.shape
    assert rel_l2(fused, unfused) < 1e-2
    assert rel_l2(fused, exact32) <= rel_l2(unfused, exact32) * 1.05
    # The epilogue's form: against GELU-exact hidden activations it is off where the forms differ.
    pre = F.linear(h.float(), w1, b1)
    hidden = torch._addmm_activation(ffn[0].bias, h.view(-1, 1536), ffn[0].weight.t(), use_gelu=True).float()
    tanh_err = (hidden - F.gelu(pre, approximate="tanh").view_as(hidden)).abs().mean()
    exact_err = (hidden - F.gelu(pre).view_as(hidden)).abs().mean()
    assert tanh_err < exact_err


@needs_triton
def test_deferred_ffn_residual_changes_no_number(monkeypatch):
    """With our kernels each Wan block's FFN residual is added by the next block's first row pass
    (`defer_ffn`): the rollout is bit-identical to blocks that finish their own residual, which is
    what they do when a forward hook watches their outputs."""
    import flashdreams

    engine = flashdreams.load(device="cpu", dtype="float32", decoder=None, attention="triton")
    dit = engine.model.weights  # the causal_wan family's weights are the DiT itself
    fused = []
    real = dit_ops.gated_residual_adaln
    monkeypatch.setattr(dit_ops, "gated_residual_adaln", lambda *a, **k: fused.append(1) or real(*a, **k))

    def rollout() -> list[torch.Tensor]:
        session = engine.session(seed=5)
        return [session.step().latents.clone() for _ in range(3)]

    deferred = rollout()
    # every DiT forward hands each block but the first its predecessor's FFN residual
    assert fused and len(fused) % (len(dit.blocks) - 1) == 0
    handle = dit.blocks[0].register_forward_hook(lambda *_: None)
    try:
        fused.clear()
        finished = rollout()
    finally:
        handle.remove()
    assert not fused  # watched blocks finish their own residual
    assert all(torch.equal(a, b) for a, b in zip(deferred, finished))


def test_blocks_modulations_are_made_in_one_batch_a_forward(monkeypatch):
    """forward_step makes every block's `modulation + e0` at once (`WanDiT.layer_modulations`: three launches a
    forward, not two a block): the rollout is bit-identical to each block making its own."""
    import flashdreams
    from flashdreams.models.wan_dit import WanDiT

    engine = flashdreams.load(device="cpu", dtype="float32", decoder=None)
    dit = engine.model.weights
    assert not torch.equal(dit.blocks[0].modulation, dit.blocks[1].modulation)  # a swapped layer would show
    made = []
    real = WanDiT.layer_modulations
    monkeypatch.setattr(WanDiT, "layer_modulations", lambda self, e0: made.append(1) or real(self, e0))

    def rollout() -> list[torch.Tensor]:
        session = engine.session(seed=3)
        return [session.step().latents.clone() for _ in range(3)]

    batched = rollout()
    assert made  # one batch per DiT forward
    monkeypatch.setattr(WanDiT, "layer_modulations", lambda self, e0: [None] * len(self.blocks))
    per_block = rollout()
    assert all(torch.equal(a, b) for a, b in zip(batched, per_block))


@needs_triton
def test_fa4_choice_sends_every_ring_attention_of_the_model_there(monkeypatch):
    """set_attention("fa4") keeps our norm passes and hands each layer's KV-ring attention to
    FlashAttention-4's entry point (replaced by our kernel here, so the rollout must not change);
    another model in the same process keeps its own choice."""
    import flashdreams
    import flashdreams.kernels.fa4_attention as fa4
    from flashdreams import kernels

    engine = flashdreams.load(device="cpu", dtype="float32", decoder=None, attention="triton")
    other = flashdreams.load(device="cpu", dtype="float32", decoder=None, attention="triton")
    dit = engine.model.weights

    def rollout(e) -> list[torch.Tensor]:
        session = e.session(seed=5)
        return [session.step().latents.clone() for _ in range(2)]

    ours = rollout(engine)
    calls = []

    def stand_in(q, k, v, valid_len, scale=None, return_lse=False):
        calls.append(valid_len.dtype)
        return kernels.ring_attention(q, k, v, valid_len)

    monkeypatch.setattr(fa4, "ring_attention_fa4", stand_in)
    dit.set_attention("fa4")
    assert (dit.attention_impl, dit.ring_kernel) == ("triton", "fa4")
    routed = rollout(engine)
    assert calls and len(calls) % len(dit.blocks) == 0
    assert set(calls) == {torch.int32}  # converted once per forward, as seqused_k takes it
    assert all(torch.equal(a, b) for a, b in zip(ours, routed))
    calls.clear()
    rollout(other)
    assert not calls
