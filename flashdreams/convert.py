"""Converting PyTorch pickle checkpoints (.pt/.pth) to safetensors.

The only place FlashDreams unpickles anything, and it does so with
`torch.load(weights_only=True)`: tensors, containers and primitive values only,
never arbitrary objects. Nested dicts are flattened with '.' (the layout of
Self-Forcing's {'generator': ..., 'generator_ema': ...} files is kept as key
prefixes, which the loaders strip).
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from flashdreams.errors import CheckpointError, InvalidArgumentError, NotFoundError

log = logging.getLogger(__name__)


def flatten_tensors(obj, prefix: str = "") -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors of a nested dict/list structure under dotted keys, and the keys of skipped non-tensors."""
    tensors: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    if isinstance(obj, torch.Tensor):
        tensors[prefix.rstrip(".")] = obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            t, s = flatten_tensors(v, f"{prefix}{k}.")
            tensors.update(t)
            skipped.extend(s)
    elif isinstance(obj, (list, tuple)) and any(isinstance(v, (torch.Tensor, Mapping)) for v in obj):
        for i, v in enumerate(obj):
            t, s = flatten_tensors(v, f"{prefix}{i}.")
            tensors.update(t)
            skipped.extend(s)
    else:
        skipped.append(prefix.rstrip("."))
    return tensors, skipped


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, key: str | None = None) -> dict:
    """Write the tensors of a .pt/.pth file to a safetensors file; returns a summary.

    `key` picks one top-level entry (e.g. 'generator_ema'). The output appears
    atomically: a failed conversion leaves no file at `dst`.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise NotFoundError(f"fd-convert: '{src}' does not exist")
    if dst.suffix != ".safetensors":
        raise InvalidArgumentError(f"fd-convert: the output '{dst}' should end in .safetensors")
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"'{src}' holds objects other than tensors and plain containers, which fd-convert refuses to "
            f"unpickle (weights_only=True): {str(exc).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"'{src}' cannot be read as a PyTorch checkpoint: {exc}") from None
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            have = list(obj.keys())[:10] if isinstance(obj, Mapping) else type(obj).__name__
            raise NotFoundError(f"fd-convert: '{src}' has no top-level entry '{key}' (has {have})")
        obj = obj[key]
    tensors, skipped = flatten_tensors(obj)
    if not tensors:
        raise CheckpointError(f"'{src}' contains no tensors")
    # safetensors refuses tensors that share storage; give each its own contiguous copy.
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"converted_from": src.name})
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"tensors": len(tensors), "bytes": nbytes, "skipped": skipped, "output": str(dst)}
