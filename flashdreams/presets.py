"""Presets by name, from every registered family (see flashdreams.registry)."""

from flashdreams.registry import get_preset, preset_from_dict, preset_names

# The world a new user meets: fd-run with no model options, and fd-serve by default, play this preset
# (the project's trained arena). `flashdreams.load()` with no arguments still loads the tiny model.
DEFAULT_WORLD = "arena"

__all__ = ["DEFAULT_WORLD", "get_preset", "preset_from_dict", "preset_names"]
