"""FlashAttention-4 as the KV-ring attention (attention="fa4"): its contract, its refusals, its routing.

The kernel itself needs the optional flash-attn-4 package and an sm90+ GPU (gpu-marked tests, which
skip without them); everywhere else the refusals are checked: a named error before anything loads,
and the process-wide kernel choice left as it was.
"""

from __future__ import annotations

import pytest
import torch

from flashdreams.errors import InvalidArgumentError
from flashdreams.kernels.block_sparse_attention import block_sparse_attention_reference
from flashdreams.kernels.fa4_attention import block_sparse_attention_fa4, fa4_unavailable_reason, ring_attention_fa4
from flashdreams.kernels.ring_attention import ring_attention_reference
from flashdreams.models import dit_ops
from flashdreams.numerics import rel_l2

GPU_REASON = fa4_unavailable_reason("cuda") if torch.cuda.is_available() else "no CUDA GPU"


def _ring(B=1, Lq=64, S=320, H=2, d=64, dtype=torch.bfloat16, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, n, H, d, generator=g).to(device, dtype) for n in (Lq, S, S))
    return q, k, v


def test_unavailable_reason_names_what_is_missing() -> None:
    assert "CUDA" in fa4_unavailable_reason("cpu")


def test_refused_on_cpu_with_a_named_error() -> None:
    q, k, v = _ring()
    with pytest.raises(InvalidArgumentError, match="fa4"):
        ring_attention_fa4(q, k, v, torch.tensor([100]))


def test_bad_arguments_are_refused_before_the_device_check() -> None:
    q, k, v = _ring()
    with pytest.raises(InvalidArgumentError, match="k_cache"):
        ring_attention_fa4(q, k[:, :, :1], v, torch.tensor([100]))
    with pytest.raises(InvalidArgumentError, match="float16"):
        ring_attention_fa4(q.float(), k.float(), v.float(), torch.tensor([100]))
    with pytest.raises(InvalidArgumentError, match="scale"):
        ring_attention_fa4(q, k, v, torch.tensor([100]), scale=-1.0)


def test_block_sparse_form_checks_its_arguments() -> None:
    q, k, v = _ring(Lq=256, S=512)
    mask = torch.ones(1, 2, 2, 4, dtype=torch.bool)
    with pytest.raises(InvalidArgumentError, match="mask"):
        block_sparse_attention_fa4(q, k, v, mask[:, :, :, :3])
    with pytest.raises(InvalidArgumentError, match="128-token windows"):
        block_sparse_attention_fa4(q, k, v, torch.ones(1, 2, 4, 8, dtype=torch.bool), block=64)
    with pytest.raises(InvalidArgumentError, match="cannot run here"):
        block_sparse_attention_fa4(q, k, v, mask)


def test_attention_choices_split_into_impl_and_ring_kernel() -> None:
    assert dit_ops.split_attention("fa4") == ("triton", "fa4")
    assert dit_ops.split_attention("triton") == ("triton", "triton")
    assert dit_ops.split_attention("sdpa") == ("sdpa", "triton")
    with pytest.raises(InvalidArgumentError, match="choose one of"):
        dit_ops.split_attention("flash3")


def test_load_with_fa4_refuses_before_loading() -> None:
    import flashdreams

    with pytest.raises(InvalidArgumentError, match="attention 'fa4' cannot run here"):
        flashdreams.load(attention="fa4", device="cpu")


def test_fp8_linears_with_fa4_keep_the_ring_attention_in_bf16(monkeypatch) -> None:
    """precision="fp8" with attention="fa4": the blocks' linears go FP8 and FlashAttention-4 (its FP8
    forward is Blackwell-only) runs every layer's ring attention in bf16. Standing in for it with our
    bf16 kernel, the rollout equals, bit for bit, the FP8 model whose FP8 ring attention is swapped for
    that same bf16 kernel, and our FP8 attention never runs."""
    import flashdreams
    import flashdreams.kernels.fa4_attention as fa4
    from flashdreams import kernels

    if not kernels.triton_available(torch.device("cpu")):
        pytest.skip("Triton kernels on the CPU need TRITON_INTERPRET=1 set before triton is imported")
    monkeypatch.setattr(fa4, "fa4_unavailable_reason", lambda device: None)  # as on an H200 with the package
    fa4_calls = []

    def stand_in(q, k, v, valid_len, scale=None, return_lse=False):
        fa4_calls.append(q.dtype)
        return kernels.ring_attention(q, k, v, valid_len)

    monkeypatch.setattr(fa4, "ring_attention_fa4", stand_in)
    opts = dict(device="cpu", dtype="float32", decoder=None, precision="fp8")
    mixed = flashdreams.load(attention="fa4", **opts)
    with monkeypatch.context() as m:  # no fp8 ring shadow: the FP8 attention goes through the one swapped below
        from flashdreams.models.families import causal_wan

        m.setattr(causal_wan, "shadow_block_n", lambda *a: None)
        fp8 = flashdreams.load(attention="triton", **opts)
    names = {n for n, m in mixed.model.weights.named_modules() if type(m).__name__ == "Fp8Linear"}
    assert names and names == {n for n, m in fp8.model.weights.named_modules() if type(m).__name__ == "Fp8Linear"}

    def rollout(engine) -> list[torch.Tensor]:
        session = engine.session(seed=4)
        return [session.step().latents.clone() for _ in range(3)]

    monkeypatch.setattr(kernels, "ring_attention_fp8", lambda *a, **k: pytest.fail("FP8 attention ran"))
    got = rollout(mixed)
    layers = len(mixed.model.weights.blocks)
    assert fa4_calls and len(fa4_calls) % layers == 0 and set(fa4_calls) == {torch.float32}
    monkeypatch.setattr(kernels, "ring_attention_fp8", lambda q, k, v, n: kernels.ring_attention(q, k, v, n))
    want = rollout(fp8)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_fp8_with_fa4_keeps_no_fp8_ring_shadow(monkeypatch) -> None:
    """OmniDreams keeps an fp8 shadow of its ring only for our FP8 attention: with fa4 the plan has none,
    and a chunk sends every ring attention to FlashAttention-4 with the length as int32."""
    import flashdreams
    import flashdreams.kernels.fa4_attention as fa4
    from flashdreams import kernels

    if not kernels.triton_available(torch.device("cpu")):
        pytest.skip("Triton kernels on the CPU need TRITON_INTERPRET=1 set before triton is imported")
    monkeypatch.setattr(fa4, "fa4_unavailable_reason", lambda device: None)
    opts = dict(preset="omnidreams-sv-tiny-latent", device="cpu", dtype="float32", decoder=None, precision="fp8")
    assert "ring_k8" in flashdreams.load(attention="triton", **opts).plan.state
    mixed = flashdreams.load(attention="fa4", **opts)
    assert "ring_k8" not in mixed.plan.state and "ring_k8" not in mixed.plan.graphs["dit"].args
    assert type(mixed.model.weights.blocks[0].mlp.layer2).__name__ == "Fp8Linear"
    lengths = []

    def stand_in(q, k, v, valid_len, scale=None, return_lse=False):
        lengths.append(valid_len.dtype)
        return kernels.ring_attention(q, k, v, valid_len)

    monkeypatch.setattr(fa4, "ring_attention_fa4", stand_in)
    monkeypatch.setattr(kernels, "ring_attention_fp8", lambda *a, **k: pytest.fail("FP8 attention ran"))
    latents = mixed.session(inputs=_omnidreams_inputs(mixed), seed=1).step().latents
    assert torch.isfinite(latents).all()
    assert len(lengths) == 3 * len(mixed.model.weights.blocks) and set(lengths) == {torch.int32}


def test_fp8_ring_attention_refuses_a_kernel_without_it() -> None:
    q, k, v = _ring(dtype=torch.float32)
    with pytest.raises(InvalidArgumentError, match="FP8 ring attention"):
        dit_ops.ring_attention(q, k, v, torch.tensor([100]), "triton", precision="fp8", kernel="fa4")
    assert dit_ops.ring_precision("fp8", "triton", "fa4") == "bf16"
    assert dit_ops.ring_precision("fp8", "triton", "triton") == "fp8"
    assert dit_ops.ring_precision("bf16", "triton", "triton") == "bf16"


def test_a_built_engine_refuses_fa4(tmp_path) -> None:
    import flashdreams

    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(InvalidArgumentError, match="eager sessions only"):
        flashdreams.load(tmp_path, attention="fa4")


def test_engine_build_refuses_fa4(tmp_path) -> None:
    from flashdreams.export.build import build_engine

    with pytest.raises(InvalidArgumentError, match="eager sessions"):
        build_engine(tmp_path / "eng", attention="fa4", device="cpu")
    assert not (tmp_path / "eng").exists()


def test_dit_ops_routes_the_ring_to_the_chosen_kernel(monkeypatch) -> None:
    """kernel="fa4" sends impl="triton" ring attention to FlashAttention-4's entry point (replaced here by
    the torch twin, which the GPU test holds the real kernel to)."""
    import flashdreams.kernels.fa4_attention as fa4

    calls = []

    def twin(q, k, v, valid_len, scale=None, return_lse=False):
        calls.append(int(valid_len.reshape(-1)[0]))
        return ring_attention_reference(q.float(), k, v, valid_len).to(q.dtype)

    monkeypatch.setattr(fa4, "ring_attention_fa4", twin)
    q, k, v = _ring(dtype=torch.float32)
    out = dit_ops.ring_attention(q, k, v, torch.tensor([200]), impl="triton", kernel="fa4")
    assert calls == [200]
    ref = ring_attention_reference(q, k, v, torch.tensor([200]))
    assert rel_l2(out, ref) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(GPU_REASON is not None, reason=f"FlashAttention-4 cannot run: {GPU_REASON}")
def test_fa4_block_sparse_equals_the_twin() -> None:
    q, k, v = _ring(B=1, Lq=4 * 128, S=6 * 128, H=3, d=128, device="cuda")
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(1, 3, 4, 6, generator=g) < 0.5).to("cuda")
    mask[0, 1, 2] = False  # a query window that selects nothing: zeros
    out = block_sparse_attention_fa4(q, k, v, mask)
    ref = block_sparse_attention_reference(q, k, v, mask)
    assert rel_l2(out.float(), ref.float()) < 1e-2
    assert torch.all(out[0, 256:384, 1] == 0)


@pytest.mark.gpu
@pytest.mark.skipif(GPU_REASON is not None, reason=f"FlashAttention-4 cannot run: {GPU_REASON}")
@pytest.mark.parametrize("valid", [1, 129, 640, 1000])
def test_fa4_equals_the_twin(valid: int) -> None:
    q, k, v = _ring(B=2, Lq=300, S=1024, H=4, d=128, device="cuda")
    k[:, valid:] = float("nan")  # rows past the ring's length never count
    v[:, valid:] = float("nan")
    vl = torch.tensor([valid], device="cuda", dtype=torch.int32)
    out, lse = ring_attention_fa4(q, k, v, vl, return_lse=True)
    ref, ref_lse = ring_attention_reference(q.float(), k.float(), v.float(), vl, return_lse=True)
    assert out.shape == q.shape and lse.shape == (2, 4, 300)
    assert rel_l2(out.float(), ref) < 1e-2
    assert torch.allclose(lse, ref_lse, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(GPU_REASON is not None, reason=f"FlashAttention-4 cannot run: {GPU_REASON}")
def test_fa4_reads_the_length_on_the_device_inside_a_cuda_graph() -> None:
    q, k, v = _ring(B=1, Lq=256, S=2048, H=2, d=128, device="cuda")
    vl = torch.tensor([512], device="cuda", dtype=torch.int32)
    ring_attention_fa4(q, k, v, vl)  # compile before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ring_attention_fa4(q, k, v, vl)
    for valid in (512, 1800, 77):
        vl.fill_(valid)
        graph.replay()
        ref = ring_attention_reference(q.float(), k.float(), v.float(), vl)
        assert rel_l2(out.float(), ref) < 1e-2, valid


def _omnidreams_inputs(engine) -> dict[str, torch.Tensor]:
    """Seeded values at each named input's shape (a tiny latent-input preset takes latents only)."""
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(spec.shape, generator=g) for name, spec in engine.plan.inputs.items()}
