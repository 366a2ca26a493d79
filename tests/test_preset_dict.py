"""Every preset of every family survives the trip through JSON that engine manifests make, and a stored
preset with fields this version does not know is refused by name."""

from __future__ import annotations

import json

import pytest

from flashdreams.errors import InvalidArgumentError
from flashdreams.registry import get_preset, preset_from_dict, preset_names


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_round_trips_through_json(name):
    preset = get_preset(name)
    stored = json.loads(json.dumps(preset.to_dict()))
    assert preset_from_dict(stored) == preset
    assert stored["family"] == preset.family and stored["name"] == name


def test_unknown_and_missing_fields_are_refused():
    stored = json.loads(json.dumps(get_preset("matrix-game-2-tiny").to_dict()))
    with pytest.raises(InvalidArgumentError, match=r"matrixgame preset dict has unknown fields \['warp'\]"):
        preset_from_dict({**stored, "warp": 9})
    del stored["action"]
    with pytest.raises(InvalidArgumentError, match=r"lacks the fields \['action'\]"):
        preset_from_dict(stored)
