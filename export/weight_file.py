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
MAX_HEADER = 100_000_000  # bytes; the safetensors library's own limit on the JSON header
_FIELDS = ("dtype", "shape", "data_offsets")
_FIX = "the weights file is corrupt or not the one this engine wrote: rebuild the engine with fd-build"


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _header(f, path: str, file_size: int) -> tuple[dict, int]:
    """The header's tensor entries (metadata dropped) and where the data section starts.

    The declared header length is bounded by the file and by MAX_HEADER before anything is
    read, so a corrupt length cannot make the reader allocate gigabytes.
    """
    raw = f.read(8)
    if len(raw) != 8:
        raise EngineIncompatibleError(f"'{path}' is not a safetensors file (shorter than its header)")
    (n,) = struct.unpack("<Q", raw)
    if n > min(MAX_HEADER, file_size - 8):
        raise EngineIncompatibleError(
            f"'{path}': the safetensors header claims {n} bytes, but at most {min(MAX_HEADER, file_size - 8)} "
            f"are possible (file of {file_size} bytes, header limit {MAX_HEADER}); {_FIX}"
        )
    try:
        header = json.loads(f.read(n))
    except ValueError as exc:
        raise EngineIncompatibleError(f"'{path}' has a corrupt safetensors header ({exc}); {_FIX}") from None
    if not isinstance(header, dict):
        raise EngineIncompatibleError(
            f"'{path}': the safetensors header is a JSON {type(header).__name__}, expected an object "
            f"of tensor entries; {_FIX}"
        )
    header.pop("__metadata__", None)
    return header, 8 + n


def _entries(header: dict, path: str, size: int) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """Every tensor entry checked against the `size`-byte data section: {name: (dtype, shape, begin, end)}.

    Refuses, naming the file and the tensor: an entry that is not an object or lacks a field,
    an unknown dtype, a malformed shape or offsets, bytes outside the data section, a byte
    count that is not shape x dtype, and tensors whose bytes overlap.
    """
    out: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
    for name, info in header.items():
        where = f"'{path}': tensor '{name}'"
        if not isinstance(info, dict):
            raise EngineIncompatibleError(f"{where} is a JSON {type(info).__name__}, expected an object; {_FIX}")
        absent = [k for k in _FIELDS if k not in info]
        if absent:
            raise EngineIncompatibleError(f"{where} lacks {', '.join(absent)} in the header; {_FIX}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise EngineIncompatibleError(
                f"{where} has unsupported dtype {dtype!r} (expected one of {', '.join(_DTYPES)}); {_FIX}"
            )
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise EngineIncompatibleError(f"{where} has shape {shape!r}, expected a list of sizes >= 0; {_FIX}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
            raise EngineIncompatibleError(f"{where} has data_offsets {offsets!r}, expected [begin, end]; {_FIX}")
        begin, end = offsets
        if not 0 <= begin <= end <= size:
            raise EngineIncompatibleError(
                f"{where} lies outside the file's data: bytes [{begin}, {end}) of a {size}-byte data section "
                f"(the file is truncated or its header corrupt); {_FIX}"
            )
        want = _DTYPES[dtype].itemsize * math.prod(shape)
        if end - begin != want:
            raise EngineIncompatibleError(
                f"{where} has {end - begin} bytes, but shape {shape} of {dtype} needs {want}; {_FIX}"
            )
        out[name] = (_DTYPES[dtype], shape, begin, end)
    spans = sorted((begin, end, name) for name, (_, _, begin, end) in out.items() if end > begin)
    for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise EngineIncompatibleError(
                f"'{path}': tensors '{prev}' and '{name}' overlap (bytes [{begin}, {prev_end}) of the data); {_FIX}"
            )
    return out


def _layout(entries: dict[str, tuple[torch.dtype, list[int], int, int]]) -> tuple[list[tuple[str, int, int, int]], int]:
    """[(name, begin, end, destination offset)] in file order, and the aligned buffer size."""
    items, pos = [], 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2]):
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
    """Every tensor of a safetensors file on `device`: views of one buffer, each ALIGN-aligned.

    The whole header is validated before the device buffer is allocated: a malformed file is
    refused with an EngineIncompatibleError naming the file and the tensor.
    """
    device = torch.device(device)
    path = str(path)
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        header, start = _header(f, path, file_size)
        entries = _entries(header, path, file_size - start)
        items, total = _layout(entries)
        buf = _stream_to(f, file_size - start, items, total, device)
    return {
        name: buf[dest : dest + end - begin].view(entries[name][0]).reshape(entries[name][1])
        for name, begin, end, dest in items
    }
