"""The engine's one-stream safetensors reader gives exactly what safetensors itself reads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from flashdreams.errors import EngineIncompatibleError
from flashdreams.export import weight_file
from flashdreams.export.weight_file import read_safetensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.bf16": torch.randn(3, 5, generator=g).bfloat16(),  # 30 bytes: the next tensor is unaligned
        "b.f32": torch.randn(7, generator=g),
        "c.i64": torch.arange(5),
        "d.flag": torch.tensor([True, False, True]),
        "e.empty": torch.empty(0, 4),
        "f.f16": torch.randn(2, 2, 2, generator=g).half(),
    }


@pytest.mark.parametrize("chunk", [weight_file.CHUNK, 16])
def test_read_matches_safetensors(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(weight_file, "CHUNK", chunk)
    path = tmp_path / "w.safetensors"
    save_file(_tensors(), str(path))
    ref = load_file(str(path))
    got = read_safetensors(path)
    assert set(got) == set(ref)
    for k, t in ref.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape, k
        assert torch.equal(got[k], t), k


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(_tensors(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(EngineIncompatibleError, match="truncated|outside"):
        read_safetensors(path)
    path.write_bytes(b"\x05\x00")
    with pytest.raises(EngineIncompatibleError, match="not a safetensors"):
        read_safetensors(path)


@pytest.mark.gpu
def test_read_to_cuda_streams_through_pinned_chunks(tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    monkeypatch.setattr(weight_file, "CHUNK", 1 << 10)  # many chunks: both staging buffers reused
    big = {"w": torch.randn(300, 100), **_tensors()}
    path = tmp_path / "w.safetensors"
    save_file(big, str(path))
    got = read_safetensors(path, "cuda")
    for k, t in big.items():
        assert got[k].device.type == "cuda" and torch.equal(got[k].cpu(), t), k


def test_every_tensor_is_aligned(tmp_path):
    """Inductor copies a misaligned weight input on every call: the reader must align them all."""
    path = tmp_path / "w.safetensors"
    save_file(_tensors(), str(path))
    for name, t in read_safetensors(path).items():
        if t.numel():
            assert t.data_ptr() % weight_file.ALIGN == 0, name
