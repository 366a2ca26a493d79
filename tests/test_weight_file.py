"""The engine's one-stream safetensors reader gives exactly what safetensors itself reads."""

from __future__ import annotations

import json
import struct

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


# ---- malformed headers: crafted byte by byte, each refused with the file and tensor named ----

_A = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def _craft(path, header, data: bytes = b"", length: int | None = None):
    """A safetensors file: 8-byte little-endian header length, the header, the data section."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def test_crafted_valid_file_reads(tmp_path):
    data = struct.pack("<2f", 1.5, -2.0) + b"\x07"
    head = {"__metadata__": {"k": "v"}, "a": _A, "b": {"dtype": "U8", "shape": [1], "data_offsets": [8, 9]}}
    got = read_safetensors(_craft(tmp_path / "w.safetensors", head, data))
    assert got["a"].tolist() == [1.5, -2.0] and got["b"].tolist() == [7]


_BAD_HEADERS = {
    "header_list": ([_A], b"", r"header is a JSON list, expected an object"),
    "header_string": (b'"abc"', b"", r"header is a JSON str"),
    "header_not_json": (b"{nope", b"", r"corrupt safetensors header"),
    "entry_not_object": ({"a": [0, 8]}, b"\0" * 8, r"tensor 'a' is a JSON list, expected an object"),
    "no_data_offsets": ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, r"tensor 'a' lacks data_offsets"),
    "no_dtype": ({"a": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, r"tensor 'a' lacks dtype"),
    "no_shape": ({"a": {"dtype": "F32", "data_offsets": [0, 8]}}, b"\0" * 8, r"tensor 'a' lacks shape"),
    "bad_dtype": ({"a": {**_A, "dtype": ["F32"]}}, b"\0" * 8, r"tensor 'a' has unsupported dtype \['F32'\]"),
    "bad_shape": ({"a": {**_A, "shape": [-1, -8]}}, b"\0" * 8, r"tensor 'a' has shape \[-1, -8\]"),
    "shape_not_list": ({"a": {**_A, "shape": "2"}}, b"\0" * 8, r"tensor 'a' has shape '2'"),
    "offsets_not_pair": ({"a": {**_A, "data_offsets": [0, 4, 8]}}, b"\0" * 8, r"tensor 'a' has data_offsets"),
    "offsets_float": ({"a": {**_A, "data_offsets": [0, 8.0]}}, b"\0" * 8, r"tensor 'a' has data_offsets"),
    "offsets_past_end": ({"a": {**_A, "data_offsets": [8, 16]}}, b"\0" * 8, r"tensor 'a' lies outside the file's data"),
    "offsets_negative": ({"a": {**_A, "data_offsets": [-8, 0]}}, b"\0" * 8, r"tensor 'a' lies outside"),
    "offsets_reversed": ({"a": {**_A, "shape": [0], "data_offsets": [8, 0]}}, b"\0" * 8, r"tensor 'a' lies outside"),
    "size_mismatch": (
        {"a": {**_A, "shape": [3]}},
        b"\0" * 12,
        r"tensor 'a' has 8 bytes, but shape \[3\] of F32 needs 12",
    ),
    "overlap": (
        {"a": _A, "b": {**_A, "data_offsets": [4, 12]}},
        b"\0" * 12,
        r"tensors 'a' and 'b' overlap \(bytes \[4, 8\)",
    ),
    "overlap_contained": (
        {"big": {**_A, "shape": [4], "data_offsets": [0, 16]}, "in": {**_A, "data_offsets": [4, 12]}},
        b"\0" * 16,
        r"tensors 'big' and 'in' overlap",
    ),
}


@pytest.mark.parametrize("case", sorted(_BAD_HEADERS))
def test_malformed_header_is_refused_naming_file_and_tensor(tmp_path, case):
    header, data, match = _BAD_HEADERS[case]
    path = _craft(tmp_path / f"{case}.safetensors", header, data)
    with pytest.raises(EngineIncompatibleError, match=match) as info:
        read_safetensors(path)
    assert str(path) in str(info.value) and "fd-build" in str(info.value)


@pytest.mark.parametrize("length", [4096, 1 << 62, (1 << 64) - 1])
def test_header_length_beyond_the_file_is_refused_before_reading(tmp_path, length):
    path = _craft(tmp_path / "w.safetensors", {"a": _A}, b"\0" * 8, length=length)
    with pytest.raises(EngineIncompatibleError, match=rf"header claims {length} bytes") as info:
        read_safetensors(path)
    assert str(path) in str(info.value)


def test_header_length_over_the_limit_is_refused(tmp_path, monkeypatch):
    """A file can be large enough to back a huge header: the absolute limit still applies."""
    path = _craft(tmp_path / "w.safetensors", {"a": _A}, b"\0" * 8)
    assert set(read_safetensors(path)) == {"a"}
    monkeypatch.setattr(weight_file, "MAX_HEADER", 16)
    with pytest.raises(EngineIncompatibleError, match=r"header claims \d+ bytes.*header limit 16"):
        read_safetensors(path)


def test_empty_tensors_beside_others_are_not_overlaps(tmp_path):
    head = {
        "a": _A,
        "e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [4, 4]},
        "z": {**_A, "data_offsets": [8, 16]},
    }
    got = read_safetensors(_craft(tmp_path / "w.safetensors", head, b"\0" * 16))
    assert got["e"].shape == (0, 3) and got["z"].shape == (2,)
