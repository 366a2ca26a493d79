"""The exceptions FlashDreams raises; each maps to one status code of the C ABI.

A message names the thing, the expected and the found value, and what to do.
"""

from __future__ import annotations


class FlashDreamsError(Exception):
    """Base class. `status` is the C ABI's `fd_status` value for this error."""

    status = "FD_INTERNAL"


class InvalidArgumentError(FlashDreamsError, ValueError):
    """Wrong shape, dtype, range or option."""

    status = "FD_INVALID_ARGUMENT"


class NotFoundError(FlashDreamsError, LookupError):
    """Missing file, key, preset or graph."""

    status = "FD_NOT_FOUND"


class CheckpointError(InvalidArgumentError):
    """Missing or unexpected keys, shape mismatches, corrupt or truncated files."""


class EngineIncompatibleError(FlashDreamsError):
    """Fingerprint mismatch, schema version, tampered manifest."""

    status = "FD_ENGINE_INCOMPATIBLE"


class OutOfMemoryError(FlashDreamsError, MemoryError):
    """The device cannot hold the session."""

    status = "FD_OUT_OF_MEMORY"


class DeviceError(FlashDreamsError, RuntimeError):
    """CUDA or driver failures."""

    status = "FD_DEVICE_ERROR"


class SessionFailedError(DeviceError):
    """A step failed where its effects could not be undone (inside a replayed CUDA graph): the
    session refuses every call until `reset()`."""


class InternalError(FlashDreamsError, RuntimeError):
    """A bug in FlashDreams; please report it."""

    status = "FD_INTERNAL"


# The C ABI's numbering. Append only: hosts compiled against an older header
# must keep reading the same numbers.
STATUS_CODES: dict[str, int] = {
    "FD_OK": 0,
    "FD_INVALID_ARGUMENT": 1,
    "FD_NOT_FOUND": 2,
    "FD_ENGINE_INCOMPATIBLE": 3,
    "FD_OUT_OF_MEMORY": 4,
    "FD_DEVICE_ERROR": 5,
    "FD_INTERNAL": 6,
}


def status_of(exc: BaseException) -> int:
    """The C status code for any exception (non-FlashDreams ones count as internal)."""
    if isinstance(exc, FlashDreamsError):
        return STATUS_CODES[exc.status]
    # torch.OutOfMemoryError (CUDA) is a RuntimeError, not a MemoryError: match it by name so
    # this module stays free of a torch import.
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return STATUS_CODES["FD_OUT_OF_MEMORY"]
    return STATUS_CODES["FD_INTERNAL"]
