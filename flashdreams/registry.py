"""The model-family registry: the one place the runtime learns which families exist.

Each entry names a family's module (imported on first use, so `import flashdreams` loads no
model code); the module exposes `FAMILY`, a `flashdreams.models.family.Family`. Adding a
family is one line here plus its own package under `models/families/`.
"""

from __future__ import annotations

import importlib
from typing import Any

from flashdreams.errors import NotFoundError

FAMILIES: dict[str, str] = {
    "causal_wan": "flashdreams.models.families.causal_wan",
    "wan21": "flashdreams.models.families.wan21",
    "wan22": "flashdreams.models.families.wan22",
    "arena": "flashdreams.models.families.arena",
    "matrixgame": "flashdreams.models.families.matrixgame",
    "flashvsr": "flashdreams.models.families.flashvsr",
    "cosmos": "flashdreams.models.families.cosmos",
    "omnidreams": "flashdreams.models.families.omnidreams",
    "lingbot": "flashdreams.models.families.lingbot",
}


def family(name: str):
    """The family called `name` (its module is imported on first use)."""
    try:
        module = FAMILIES[name]
    except KeyError:
        raise NotFoundError(
            f"model family '{name}' is unknown; known families: {', '.join(sorted(FAMILIES))}"
        ) from None
    return importlib.import_module(module).FAMILY


def _available():
    for name in FAMILIES:
        try:
            yield family(name)
        except ModuleNotFoundError as e:  # a family whose package is not there yet
            if not e.name or not e.name.startswith("flashdreams.models.families"):
                raise


def all_presets() -> dict[str, Any]:
    """Every preset of every family, by name."""
    out = {}
    for fam in _available():
        for p in fam.presets():
            out[p.name] = p
    return out


def get_preset(name: str):
    presets = all_presets()
    try:
        return presets[name]
    except KeyError:
        raise NotFoundError(f"preset '{name}' is unknown; known presets: {', '.join(sorted(presets))}") from None


def preset_names() -> list[str]:
    return sorted(all_presets())


def preset_from_dict(d: dict):
    """A preset stored in an engine manifest (it names its family)."""
    return family(d.get("family", "causal_wan")).preset_from_dict(d)
