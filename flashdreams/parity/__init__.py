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
