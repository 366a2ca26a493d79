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


def test_load_refuses_fa4_with_fp8(monkeypatch) -> None:
    """FP8 runs our FP8 attention: asking for FlashAttention-4 as well is refused by name, not ignored."""
    import flashdreams
    import flashdreams.kernels.fa4_attention as fa4

    monkeypatch.setattr(fa4, "fa4_unavailable_reason", lambda device: None)  # as on an H200 with the package
    with pytest.raises(InvalidArgumentError, match="precision 'fp8'"):
        flashdreams.load(attention="fa4", precision="fp8", device="cpu")


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
