"""Reading model weights from safetensors: single files, sharded indexes, both key layouts.

Everything is validated before anything is loaded into a module: a checkpoint with
missing keys, unexpected keys, wrong shapes, non-floating-point weights (int, bool,
complex) for floating-point parameters, or NaN/inf values is refused whole with a
`CheckpointError` that lists them, so no model is ever half-loaded.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from flashdreams.errors import CheckpointError, NotFoundError

# Prefixes that training wrappers put in front of the model's own keys.
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "model.", "module.", "_orig_mod.")
EMA_ROOTS = ("generator_ema.", "generator.")


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise NotFoundError(f"checkpoint file '{path}' does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        size = path.stat().st_size
        raise CheckpointError(
            f"checkpoint '{path}' ({size} bytes) cannot be read as safetensors: {exc}; "
            "is it truncated or not a safetensors file? (.pt/.pth files: convert them with fd-convert)"
        ) from None


def _read_index(path: Path) -> dict[str, torch.Tensor]:
    try:
        index = json.loads(path.read_text())
        weight_map: dict[str, str] = index["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"sharded checkpoint index '{path}' is malformed ({exc!r})") from None
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (path.parent / s).is_file()]
    if missing:
        raise NotFoundError(
            f"sharded checkpoint '{path}': {len(missing)} of {len(shards)} shard files are missing "
            f"({', '.join(missing[:4])}); download or copy them next to the index"
        )
    out: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors = _read_file(path.parent / shard)
        wanted = {k for k, v in weight_map.items() if v == shard}
        absent = sorted(wanted - tensors.keys())
        if absent:
            raise CheckpointError(
                f"shard '{shard}' lacks {len(absent)} keys its index assigns to it ({', '.join(absent[:4])}, ...)"
            )
        out.update({k: tensors[k] for k in wanted})
    return out


def find_weights(path: str | os.PathLike) -> Path:
    """The weights file of a path: the file itself, or the single index/safetensors in a directory."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise NotFoundError(f"checkpoint '{p}' does not exist")
    for sub in ("", "transformer"):
        d = p / sub if sub else p
        indexes = sorted(d.glob("*.safetensors.index.json"))
        if len(indexes) == 1:
            return indexes[0]
        files = sorted(d.glob("*.safetensors"))
        if len(files) == 1:
            return files[0]
        if len(indexes) > 1 or len(files) > 1:
            names = [f.name for f in indexes + files]
            raise CheckpointError(
                f"checkpoint directory '{d}' holds several weight files ({', '.join(names[:6])}); "
                "pass the file (or its .index.json) itself"
            )
    raise NotFoundError(f"checkpoint directory '{p}' holds no .safetensors file or .safetensors.index.json")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint: a .safetensors file, a sharded index, or a directory of one."""
    p = find_weights(path)
    if p.name.endswith(".index.json"):
        return _read_index(p)
    if p.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        raise CheckpointError(
            f"'{p}' is a PyTorch pickle checkpoint; FlashDreams reads safetensors only. "
            f"Convert it once with: fd-convert {p} {p.with_suffix('.safetensors')}"
        )
    return _read_file(p)


def strip_prefixes(sd: Mapping[str, torch.Tensor], prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """Remove the roots and wrapper prefixes of distilled checkpoints (`generator_ema.model.` ...).

    With both `generator_ema.` and `generator.` present, the EMA weights are taken
    (Self-Forcing inference uses them) unless `prefer_ema` is False.
    """
    roots = [r for r in EMA_ROOTS if any(k.startswith(r) for k in sd)]
    if roots:
        root = roots[0] if prefer_ema else roots[-1]
        sd = {k[len(root) :]: v for k, v in sd.items() if k.startswith(root)}
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                changed = True
        # FSDP inserts its wrapper name in the middle of keys too (blocks.0._fsdp_wrapped_module.x).
        if any("._fsdp_wrapped_module." in k for k in sd):
            sd = {k.replace("._fsdp_wrapped_module.", "."): v for k, v in sd.items()}
            changed = True
    return dict(sd)


_SHOWN = 5  # keys named in an error before "..."


def _some(items: list[str]) -> str:
    """The first few items, comma-separated, with '...' when there are more."""
    return ", ".join(items[:_SHOWN]) + (", ..." if len(items) > _SHOWN else "")


def nonfinite_keys(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of the floating-point tensors that hold a NaN or an infinity, sorted.

    One `isfinite().all()` reduction per tensor on the tensor's own device; the flags are
    read back once per device at the end, not with one host sync per tensor.
    """
    flags: dict[torch.device, tuple[list[str], list[torch.Tensor]]] = {}
    for k, t in sd.items():
        if not t.is_floating_point() or t.device.type == "meta" or t.numel() == 0:
            continue
        if t.dtype.itemsize == 1:
            t = t.to(torch.float16)  # isfinite is not implemented for every float8 format
        keys, found = flags.setdefault(t.device, ([], []))
        keys.append(k)
        found.append(torch.isfinite(t).all())
    bad: list[str] = []
    for keys, found in flags.values():
        bad.extend(k for k, ok in zip(keys, torch.stack(found).tolist()) if not ok)
    return sorted(bad)


def _check_values(expected: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse integer/bool/complex weights for floating-point parameters, then NaN/inf weights."""
    wrong_kind = sorted(
        f"{k} ({str(sd[k].dtype).removeprefix('torch.')})"
        for k, t in expected.items()
        if t.is_floating_point() and not sd[k].is_floating_point()
    )
    if wrong_kind:
        raise CheckpointError(
            f"checkpoint '{source}': {len(wrong_kind)} keys hold non-floating-point weights where the model "
            f"expects floating point ({_some(wrong_kind)}); this looks like a quantized or corrupt checkpoint. "
            "FlashDreams loads float16/bfloat16/float32 weights: dequantize it (or use the unquantized release) "
            "first. Nothing was loaded."
        )
    bad = nonfinite_keys({k: sd[k] for k in expected})
    if bad:
        counts = [f"{k} ({int((~torch.isfinite(sd[k].float())).sum())} of {sd[k].numel()})" for k in bad[:_SHOWN]]
        shown = ", ".join(counts) + (", ..." if len(bad) > _SHOWN else "")
        raise CheckpointError(
            f"checkpoint '{source}': {len(bad)} weights hold NaN or infinite values ({shown}); the file is "
            "corrupt or was saved from a diverged run: re-download or re-export it. Nothing was loaded."
        )


def validate_and_load(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], source: str, hint: str = "") -> None:
    """Load `sd` into `module` only if it is fully valid; else raise CheckpointError and load nothing.

    Valid: keys and shapes match exactly, every floating-point parameter/buffer gets a
    floating-point tensor (a cast of int8/bool/complex data would silently give garbage),
    and no weight holds NaN or infinity.
    """
    expected = module.state_dict()
    missing = sorted(expected.keys() - sd.keys())
    unexpected = sorted(sd.keys() - expected.keys())
    wrong = sorted(
        f"{k} (checkpoint {tuple(sd[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected.keys() & sd.keys()
        if tuple(sd[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("with wrong shape", wrong)):
            if items:
                parts.append(f"{len(items)} keys {label} ({_some(items)})")
        raise CheckpointError(f"checkpoint '{source}': " + "; ".join(parts) + (f"; {hint}" if hint else ""))
    _check_values(expected, sd, source)
    with torch.no_grad():
        for k, t in expected.items():
            t.copy_(sd[k])


def max_index(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    """1 + the largest integer captured by `pattern` in the keys (e.g. the number of blocks)."""
    rx = re.compile(pattern)
    found = [int(m.group(1)) for k in sd if (m := rx.match(k))]
    return max(found) + 1 if found else 0
