"""A preset as plain data and back: engine manifests and fd-bench results store presets this way.

Every family's preset is a frozen dataclass whose nested configs (the network's, an action
module's, ...) have their own `to_dict`; tuples become JSON lists and come back as tuples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flashdreams.errors import InvalidArgumentError


def _plain(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def preset_to_dict(preset: Any) -> dict:
    """Every field of a preset dataclass as JSON-ready data (nested configs through their own `to_dict`)."""
    return {f.name: _plain(getattr(preset, f.name)) for f in dataclasses.fields(preset)}


def preset_from_dict(cls: type, d: Mapping, nested: Mapping[str, type]) -> Any:
    """The inverse of `preset_to_dict` for preset class `cls`; `nested` names the fields that hold a config
    (rebuilt by its `from_dict`, or its constructor). Unknown or missing fields raise InvalidArgumentError."""
    family = next((f.default for f in dataclasses.fields(cls) if f.name == "family"), cls.__name__)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise InvalidArgumentError(
            f"{family} preset dict has unknown fields {unknown}; was it written by a newer FlashDreams?"
        )
    missing = sorted(n for n in ("name", "description", *nested) if n not in d)
    if missing:
        raise InvalidArgumentError(f"{family} preset dict lacks the fields {missing}")
    fields = {}
    for key, value in d.items():
        if key in nested and isinstance(value, Mapping):
            typ = nested[key]
            value = typ.from_dict(dict(value)) if hasattr(typ, "from_dict") else typ(**value)
        fields[key] = _tuples(value)
    return cls(**fields)
