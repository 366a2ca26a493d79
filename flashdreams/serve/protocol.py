"""The fd-serve wire protocol (docs/PROTOCOL.md): message kinds, the binary envelope, frame codecs, input decoding.

Text messages are JSON objects whose "t" names the kind. Binary messages are an envelope:
a 4-byte big-endian header length, that many bytes of a JSON header (with its "t"), then the
payload (an encoded video frame from the server, raw little-endian tensor bytes from a client).
Everything a client sends is decoded here into plain Python values or a CPU tensor, and every
malformed message becomes an `InvalidArgumentError` with a message a user can act on; the
session's own spec check (`Session.check_input`) runs after this, before any input is set.
"""

from __future__ import annotations

import io
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flashdreams.errors import InvalidArgumentError

PROTOCOL_VERSION = 1

# Client -> server kinds, and server -> client kinds (docs/PROTOCOL.md describes each).
CLIENT_KINDS = ("start", "input", "stand_in", "prompt", "reset", "save", "load", "pause", "resume", "ack", "ping")
SERVER_KINDS = ("hello", "started", "busy", "frame", "error", "ended", "pong", "saved", "loaded")

# dtypes a binary input may carry, with their numpy names (little-endian on the wire).
WIRE_DTYPES = {"float32": "<f4", "float16": "<f2", "int64": "<i8", "int32": "<i4", "uint8": "u1"}

_HEADER_LEN = struct.Struct(">I")
MAX_HEADER_BYTES = 16 * 1024  # an envelope's JSON header; real ones are ~200 bytes


def pack(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """A binary message: header length, JSON header, payload."""
    head = json.dumps(header, separators=(",", ":")).encode()
    return _HEADER_LEN.pack(len(head)) + head + payload


def unpack(message: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, payload) of a binary message; a malformed envelope is an InvalidArgumentError."""
    if len(message) < _HEADER_LEN.size:
        raise InvalidArgumentError(f"binary message of {len(message)} bytes is shorter than its 4-byte header length")
    (n,) = _HEADER_LEN.unpack_from(message)
    if n > MAX_HEADER_BYTES or n > len(message) - _HEADER_LEN.size:
        raise InvalidArgumentError(
            f"binary message header length {n} is over {MAX_HEADER_BYTES} bytes or past the message's end"
        )
    header = parse_json(message[_HEADER_LEN.size : _HEADER_LEN.size + n])
    return header, bytes(message[_HEADER_LEN.size + n :])


def parse_json(data: str | bytes) -> dict[str, Any]:
    """A JSON object with a string "t"; NaN/Infinity literals are refused (they are not JSON)."""

    def no_constants(name: str):
        raise InvalidArgumentError(f"message holds {name}, which is not a JSON number; send finite values")

    try:
        obj = json.loads(data, parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"message is not valid JSON ({exc})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("t"), str):
        raise InvalidArgumentError('a message must be a JSON object with a string "t" naming its kind')
    return obj


def field_int(msg: dict, key: str, default: int | None = None, low: int = 0, high: int = 2**63 - 1) -> int:
    """An integer field in [low, high]; missing gives `default` (None: required)."""
    v = msg.get(key, default)
    if v is None:
        raise InvalidArgumentError(f"message '{msg.get('t')}' needs an integer \"{key}\"")
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise InvalidArgumentError(
            f"message '{msg.get('t')}': \"{key}\" must be an integer in [{low}, {high}], got {v!r}"
        )
    return v


def input_tensor(header: dict, payload: bytes | None, max_elements: int) -> torch.Tensor:
    """The tensor of an "input" message: from JSON "value" (nested lists of numbers) or, in a binary
    message, from the payload described by the header's "dtype" and "shape"."""
    if payload is None:
        if "value" not in header:
            raise InvalidArgumentError('an "input" text message needs "value" (nested lists of numbers)')
        value = header["value"]
        count = _count_numbers(value, max_elements)
        if count == 0:
            raise InvalidArgumentError('input "value" holds no numbers')
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (ValueError, TypeError):
            raise InvalidArgumentError(
                'input "value" must be nested lists of numbers of one rectangular shape '
                "(no nulls, strings or ragged rows)"
            ) from None
        return torch.from_numpy(arr.astype(np.float32))
    dtype = header.get("dtype")
    if dtype not in WIRE_DTYPES:
        raise InvalidArgumentError(f'binary input "dtype" must be one of {sorted(WIRE_DTYPES)}, got {dtype!r}')
    shape = header.get("shape")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        raise InvalidArgumentError(f'binary input "shape" must be a list of positive integers, got {shape!r}')
    numel = math.prod(shape)
    if numel > max_elements:
        raise InvalidArgumentError(f"binary input of {numel} elements is over this server's {max_elements}")
    want = numel * np.dtype(WIRE_DTYPES[dtype]).itemsize
    if len(payload) != want:
        raise InvalidArgumentError(f"binary input {dtype} {shape} needs {want} payload bytes, got {len(payload)}")
    arr = np.frombuffer(payload, dtype=WIRE_DTYPES[dtype]).reshape(shape)
    return torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))


def _count_numbers(value: Any, limit: int) -> int:
    """Numbers in nested lists, refusing more than `limit` before building anything from them."""
    stack, n = [value], 0
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
            continue
        n += 1
        if n > limit:
            raise InvalidArgumentError(f'input "value" holds more than this server\'s {limit} numbers')
    return n


@dataclass(frozen=True)
class FrameCodec:
    """How frames travel: "jpeg" (PIL; small, decoded by every browser), "png" (lossless) or "raw" RGB."""

    name: str = "jpeg"
    quality: int = 85

    @classmethod
    def choose(cls, want: str = "auto", quality: int = 85) -> FrameCodec:
        """`auto` is JPEG when PIL is installed, else raw RGB (no encoder needed)."""
        if want not in ("auto", "jpeg", "png", "raw"):
            raise InvalidArgumentError(f"frame encoding '{want}' is unknown; use auto, jpeg, png or raw")
        if want in ("auto", "jpeg", "png"):
            try:
                import PIL.Image  # noqa: F401
            except ImportError:
                if want != "auto":
                    raise InvalidArgumentError(f"frame encoding '{want}' needs Pillow (pip install pillow)") from None
                return cls("raw", quality)
            return cls("jpeg" if want == "auto" else want, quality)
        return cls("raw", quality)

    def encode(self, frame: np.ndarray) -> bytes:
        """One uint8 [H, W, 3] frame as bytes of this codec."""
        if self.name == "raw":
            return np.ascontiguousarray(frame).tobytes()
        from PIL import Image

        buf = io.BytesIO()
        img = Image.fromarray(np.ascontiguousarray(frame))
        if self.name == "jpeg":
            img.save(buf, format="JPEG", quality=self.quality)
        else:
            img.save(buf, format="PNG", compress_level=1)
        return buf.getvalue()

    def decode(self, data: bytes, height: int, width: int) -> np.ndarray:
        """Bytes of this codec back to uint8 [H, W, 3] (the Python client uses it)."""
        if self.name == "raw":
            return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def spec_to_wire(spec) -> dict[str, Any]:
    """What a client needs of an InputSpec to build a control for it (no programs or internals)."""
    return {
        "name": spec.name,
        "shape": list(spec.shape),
        "dtype": spec.dtype,
        "units": spec.units,
        "labels": list(spec.labels),
        "low": spec.low,
        "high": spec.high,
        "meaning": spec.meaning,
        "when": spec.when,
        "required": spec.required,
        "pad_dim": spec.pad_dim,
    }
