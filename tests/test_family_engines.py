"""Every model family builds into an engine (fd-build, inductor, CPU) whose sessions equal eager.

One built-in preset per family, on the family's default inputs. Families with their own engine
test (its inputs chosen for what the family does) are listed in COVERED_ELSEWHERE; the first
test makes sure no registered family is in neither list.
"""

from __future__ import annotations

import pytest
import torch

import flashdreams
from flashdreams import registry
from flashdreams.export.build import build_engine
from flashdreams.export.manifest import read_manifest
from flashdreams.numerics import rel_l2

pytestmark = pytest.mark.slow  # one Inductor build per family (10-65 s each on a 2-core CPU)

# family -> (its built-in preset, decoder): decoders shared by several families (TAEHV, the Wan VAE)
# are built in tests/test_export_engine.py; a family's own pixel output or decoder is built here.
BUILT_HERE = {
    "arena": ("arena", "preset"),  # the network draws its pixels: a decoder without weights
    "wan22": ("wan2.2-tiny", None),
    "flashvsr": ("flashvsr-tiny", "preset"),  # FlashVSR's own TC decoder
    "cosmos": ("cosmos-predict2.5-tiny", None),
    "omnidreams": ("omnidreams-sv-tiny", None),
    "lingbot": ("lingbot-world-fast-tiny", None),
    "lingbot-base": ("lingbot-world-base-tiny", None),  # the same family's bidirectional MoE form
}
COVERED_ELSEWHERE = {
    "causal_wan": "tests/test_export_engine.py",
    "wan21": "tests/test_wan21_family.py::test_inductor_engine_matches_eager",
    "matrixgame": "tests/test_matrixgame_family.py::test_inductor_engine_session_equals_eager",
}
BLOCKS = 2
TOL = 1e-5  # rel. L2 of each block's latents, float32


def test_every_family_has_an_engine_test():
    families_here = {registry.get_preset(p).family for p, _ in BUILT_HERE.values()}
    assert families_here | set(COVERED_ELSEWHERE) == set(registry.FAMILIES)


@pytest.mark.parametrize("case", sorted(BUILT_HERE))
def test_engine_session_equals_eager(case, tmp_path):
    preset, decoder = BUILT_HERE[case]
    build_engine(tmp_path / "engine", preset=preset, backend="inductor", device="cpu", decoder=decoder)
    built = flashdreams.load(tmp_path / "engine", device="cpu")
    eager = flashdreams.load(preset=preset, device="cpu", decoder=decoder)
    assert built.plan.to_dict() == eager.plan.to_dict()
    assert read_manifest(tmp_path / "engine")["family"] == registry.get_preset(preset).family

    inputs = eager.default_inputs(seed=5)
    a, b = built.session(inputs=inputs, seed=3), eager.session(inputs=inputs, seed=3)
    firsts = []
    for block in range(BLOCKS):
        got, want = a.step(), b.step()
        err = rel_l2(got.latents, want.latents)
        assert err <= TOL, f"{preset} block {block}: latents differ from eager by rel. L2 {err:.3g}"
        if decoder is None:
            assert got.frames is None
        else:
            assert got.frames is not None and got.frames.shape == want.frames.shape
            assert (got.frames.int() - want.frames.int()).abs().max() <= 1, f"{preset} block {block}: frames"
        firsts.append(got.latents.clone())
    assert not torch.equal(firsts[0], firsts[1])  # the blocks move on: not one output replayed
