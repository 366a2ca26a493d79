"""Parity against the reference implementations' fixtures (`fd-parity DIR`)."""

from __future__ import annotations

import importlib
import os

from flashdreams.errors import InvalidArgumentError
from flashdreams.parity.common import (
    RUNNERS,
    Check,
    Fixture,
    fixtures_root,
    load_fixture,
    rel_l2,
    uncompared_expected,
)

# One module per fixture kind; each registers its runner on import.
_KIND_MODULES = {
    "causal_wan_rollout": "flashdreams.parity.causal_wan_rollout",
    "causal_forcing_rollout": "flashdreams.parity.causal_wan_rollout",
    "wan_dit_forward": "flashdreams.parity.wan_dit_forward",
    "wan_vae_decode": "flashdreams.parity.wan_vae_decode",
    "taehv_decode": "flashdreams.parity.taehv_decode",
    "wan_vae_encode": "flashdreams.parity.wan_vae_encode",
    "wan_t2v_sample": "flashdreams.parity.wan_t2v_sample",
    "wan_i2v_forward": "flashdreams.parity.wan_i2v",
    "wan_i2v_sample": "flashdreams.parity.wan_i2v",
    "lingbot_camera_embed": "flashdreams.parity.lingbot_camera_embed",
    "lingbot_dit_forward": "flashdreams.parity.lingbot_dit_forward",
    "matrixgame_action_module": "flashdreams.parity.matrixgame_action_module",
    "matrixgame_dit_forward": "flashdreams.parity.matrixgame_dit_forward",
    "matrixgame_rollout": "flashdreams.parity.matrixgame_rollout",
    "wan22_moe_rollout": "flashdreams.parity.wan22_moe_rollout",
    "flashvsr_lq_projector": "flashdreams.parity.flashvsr_lq_projector",
    "flashvsr_dit_forward": "flashdreams.parity.flashvsr_dit_forward",
    "flashvsr_tcdecoder": "flashdreams.parity.flashvsr_tcdecoder",
    "flashvsr_stream": "flashdreams.parity.flashvsr_stream",
    "cosmos_dit_forward": "flashdreams.parity.cosmos_dit_forward",
    "cosmos_sample": "flashdreams.parity.cosmos_sample",
    "omnidreams_dit_forward": "flashdreams.parity.omnidreams_dit_forward",
    "omnidreams_rollout": "flashdreams.parity.omnidreams_rollout",
}


def supported_kinds() -> list[str]:
    return sorted(_KIND_MODULES)


def run_fixture(path: str | os.PathLike, **options) -> tuple[Fixture, list[Check]]:
    """Run one fixture directory; returns the fixture and one Check per compared tensor.

    What the fixture declares is enforced here, for every kind: each `[expected]` tensor that the
    runner did not compare is added as a failed Check named after the tensor, with a reason.
    """
    fixture = load_fixture(path)
    module = _KIND_MODULES.get(fixture.kind)
    if module is None:
        raise InvalidArgumentError(
            f"fixture '{fixture.path.name}' is of kind '{fixture.kind}', which fd-parity does not "
            f"run yet (supported: {', '.join(supported_kinds())})"
        )
    importlib.import_module(module)
    checks = list(RUNNERS[fixture.kind](fixture, **options))
    return fixture, checks + uncompared_expected(fixture, checks)


__all__ = ["Check", "Fixture", "fixtures_root", "load_fixture", "rel_l2", "run_fixture", "supported_kinds"]
