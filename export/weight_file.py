"""Read a safetensors file onto a device in one stream: the engine's weights at load.

`safetensors.torch.load_file(device="cuda")` copies tensor by tensor from pageable
memory. An engine's weights are read at every cold start, so this reader streams the
file's data section through two pinned staging buffers (reading the next chunk while the
previous one is copied) into ONE device buffer, and hands out each tensor as a view of it.

Each tensor starts at a multiple of ALIGN bytes in that buffer. The format only aligns
its data section to 8 bytes, and Inductor's compiled graphs assume the 16-byte alignment
their build-time weights had: a misaligned weight input is copied on EVERY call (on the
H100 that was 2785 device-to-device copies, 17 ms, per 1.3B block before this layout).
"""

from __future__ import annotations

import json
import math
import os
import struct

import torch

from flashdreams.errors import EngineIncompatibleError

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

CHUNK = 64 << 20
ALIGN = 256


def _header(f, path: str) -> tuple[dict, int]:
    raw = f.read(8)
    if len(raw) != 8:
        raise EngineIncompatibleError(f"'{path}' is not a safetensors file (shorter than its header)")
    (n,) = struct.unpack("<Q", raw)
    try:
        header = json.loads(f.read(n))
    except ValueError as exc:
        raise EngineIncompatibleError(f"'{path}' has a corrupt safetensors header ({exc})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def _layout(header: dict) -> tuple[list[tuple[str, int, int, int]], int]:
    """[(name, begin, end, destination offset)] in file order, and the aligned buffer size."""
    items, pos = [], 0
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        begin, end = info["data_offsets"]
        items.append((name, begin, end, pos))
        pos += -(-(end - begin) // ALIGN) * ALIGN
    return items, pos


def _stream_to(f, size: int, items, total: int, device: torch.device) -> torch.Tensor:
    """The next `size` bytes of `f` (the data section), each tensor's bytes at its aligned offset."""
    cuda = device.type == "cuda"
    raw = torch.empty(total + ALIGN, dtype=torch.uint8, device=device)
    out = raw[(-raw.data_ptr()) % ALIGN :]  # allocators align less on some devices (64 B on CPU)
    chunk = max(1, min(CHUNK, size))
    staging = [torch.empty(chunk, dtype=torch.uint8, pin_memory=cuda) for _ in range(2 if cuda else 1)]
    done = [None] * len(staging)
    stream = torch.cuda.current_stream(device) if cuda else None
    first = 0  # the first tensor that may still overlap the current chunk
    for i, off in enumerate(range(0, size, chunk)):
        slot = i % len(staging)
        if done[slot] is not None:
            done[slot].synchronize()  # this staging buffer's last copies have left it
        n = min(chunk, size - off)
        if f.readinto(memoryview(staging[slot].numpy())[:n]) != n:
            raise EngineIncompatibleError(f"'{f.name}' is truncated")
        while first < len(items) and items[first][2] <= off:
            first += 1
        j = first
        while j < len(items) and items[j][1] < off + n:
            _, begin, end, dest = items[j]
            lo, hi = max(begin, off), min(end, off + n)
            if hi > lo:
                out[dest + lo - begin : dest + hi - begin].copy_(staging[slot][lo - off : hi - off], non_blocking=cuda)
            j += 1
        if cuda:
            done[slot] = stream.record_event()
    if cuda:
        stream.synchronize()
    return out


def read_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file on `device`: views of one buffer, each ALIGN-aligned."""
    device = torch.device(device)
    path = str(path)
    with open(path, "rb") as f:
        header, start = _header(f, path)
        size = os.fstat(f.fileno()).st_size - start
        for name, info in header.items():
            if info.get("dtype") not in _DTYPES:
                raise EngineIncompatibleError(f"'{path}': tensor '{name}' has unsupported dtype {info.get('dtype')}")
            begin, end = info["data_offsets"]
            esize = torch.empty((), dtype=_DTYPES[info["dtype"]]).element_size()
            if not 0 <= begin <= end <= size or (end - begin) != esize * math.prod(info["shape"]):
                raise EngineIncompatibleError(f"'{path}': tensor '{name}' lies outside the file or has the wrong size")
        items, total = _layout(header)
        buf = _stream_to(f, size, items, total, device)
    return {
        name: buf[dest : dest + end - begin].view(_DTYPES[header[name]["dtype"]]).reshape(header[name]["shape"])
        for name, begin, end, dest in items
    }
