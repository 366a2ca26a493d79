"""Presets by name, from every registered family (see flashdreams.registry)."""

from flashdreams.registry import get_preset, preset_from_dict, preset_names

__all__ = ["get_preset", "preset_from_dict", "preset_names"]
