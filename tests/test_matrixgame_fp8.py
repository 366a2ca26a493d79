"""Matrix-Game 2.0 in FP8 (the tiny universal-controls preset): which layers go FP8, the ring's fp8 shadow,
lockstep worlds that stay independent, and what it costs against the model's dtype."""

from __future__ import annotations

import pytest
import torch

import flashdreams
from flashdreams.errors import InvalidArgumentError
from flashdreams.kernels import triton_available
from flashdreams.models.families.matrixgame.actions import block_rows, video_frames
from flashdreams.numerics import rel_l2

pytestmark = pytest.mark.skipif(
    not triton_available(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1",
)

TINY = dict(preset="matrix-game-2-tiny", decoder=None, height=32, width=32, attention="triton")
BLOCKS = 3  # 3 latent frames a block against a 6-frame ring: block 2 writes over block 0's slots


def _actions(batch: int, seed: int = 8) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    frames = video_frames(BLOCKS, 12, 9)
    kb = (torch.rand(batch, frames, 4, generator=gen) > 0.5).float()
    ms = torch.randn(batch, frames, 2, generator=gen) * 0.1
    return [{"keyboard": block_rows(kb, k, 12, 9), "mouse": block_rows(ms, k, 12, 9)} for k in range(BLOCKS)]


def _play(engine, images: torch.Tensor, actions, seed: int = 3) -> list[torch.Tensor]:
    s = engine.session(inputs={"image": images}, seed=seed)
    out = []
    for block in actions:
        for name, value in block.items():
            s.set_input(name, value)
        out.append(s.step().latents)
    return out


def _images(batch: int) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def fp8_engine():
    return flashdreams.load(**TINY, precision="fp8")


def test_fp8_swaps_the_dit_linears_and_leaves_the_action_modules(fp8_engine):
    """The Wan blocks' per-token linears go FP8 (the cross-attention output kept, as for Self-Forcing); the
    action modules, the image embedding and the head keep the model's dtype; the ring's shadow is state."""
    dit = fp8_engine.model.weights["dit"]
    fp8 = {n for n, m in dit.named_modules() if type(m).__name__ == "Fp8Linear"}
    per_block = {"self_attn.qkv_fp8", "self_attn.o", "cross_attn.q", "ffn.0", "ffn.2"}
    assert fp8 == {f"blocks.{i}.{n}" for i in range(len(dit.blocks)) for n in per_block}
    kinds = [(n, type(m).__name__) for n, m in dit.named_modules()]
    action = [kind for n, kind in kinds if ".action_model." in n and kind.endswith("Linear")]
    assert action and set(action) == {"Linear"}
    plan = fp8_engine.plan
    assert plan.state["ring_k8"].dtype == "float8_e4m3fn" and plan.state["ring_k8"].batch_dim == 1
    assert plan.state["ring_k8"].shape[3] == plan.state["ring_k"].shape[2]  # [layers, B, N, S, d]: every ring row
    assert "ring_k8" in plan.graphs["dit"].args and "ring_vt" in plan.graphs["dit"].mutates
    assert "ring_k8" not in flashdreams.load(**TINY).plan.state  # bf16: no shadow


def test_fp8_refuses_attention_other_than_triton():
    with pytest.raises(InvalidArgumentError, match="attention='triton'"):
        flashdreams.load(**{**TINY, "attention": "sdpa"}, precision="fp8")


def test_fp8_rollout_stays_close_to_the_model_dtype(fp8_engine):
    """Steered by keys and mouse past the ring's wrap: a percent or two from the float32 rollout, never
    more (e4m3 keeps 3 mantissa bits; measured ~1.2-1.4% on this model), and never equal to it."""
    ref = flashdreams.load(**TINY)
    actions = _actions(1)
    want, got = _play(ref, _images(1), actions), _play(fp8_engine, _images(1), actions)
    errs = [rel_l2(g, w) for g, w in zip(got, want, strict=True)]
    assert all(1e-4 < e < 5e-2 for e in errs), errs


def test_fp8_ring_shadow_equals_quantizing_the_ring_every_call(monkeypatch, fp8_engine):
    """The shadow re-quantizes only the key tiles a call writes; through the block that overwrites the
    oldest frames' slots, the latents equal, bit for bit, an engine without the shadow that quantizes the
    whole ring every call."""
    from flashdreams.models.families import matrixgame

    with monkeypatch.context() as m:
        m.setattr(matrixgame, "shadow_block_n", lambda *a: None)
        per_call = flashdreams.load(**TINY, precision="fp8")
    assert "ring_k8" not in per_call.plan.state and "ring_k8" not in per_call.plan.graphs["dit"].args
    ring = fp8_engine.plan.ring
    assert ring.values(BLOCKS - 1)["slots"] == ring.values(0)["slots"]  # the last block writes over block 0
    actions = _actions(1)
    for a, b in zip(_play(fp8_engine, _images(1), actions), _play(per_call, _images(1), actions), strict=True):
        assert torch.equal(a, b)


def _lockstep(pair, images, actions, seeds) -> list[torch.Tensor]:
    worlds = pair.worlds(2, seeds=seeds, inputs={"image": images[:1]})
    worlds.set_input(1, "image", images[1:])
    out = []
    for block in actions:
        for w in worlds.ids:
            for name, value in block.items():
                worlds.set_input(w, name, value[w : w + 1])
        out.append(worlds.step().latents)
    return out


def test_fp8_lockstep_worlds_do_not_see_each_other(fp8_engine):
    """Two worlds in one batch (engine.worlds over a batch-2 load). The FP8 scales are per row (linears) and
    per row's key tiles (attention), so world 1 is bit for bit the same whatever world 0 does (another seed,
    image and actions). Against world 1 run alone it is equal up to FP8's rounding: the two batch sizes sum
    float32 products in other orders (~1e-7 apart, as without FP8), and a value that lands on an e4m3 rounding
    boundary then takes the other code (1 of 768 in a layer of block 2 here: rel. L2 4.6e-3 at the block's
    end, against ~1.3e-2 for FP8 against the model's dtype). The float32 path's bound (1e-6) is
    tests/test_batched_worlds.py's."""
    pair = flashdreams.load(**TINY, precision="fp8", batch=2)
    images, actions = _images(2), _actions(2)
    base = _lockstep(pair, images, actions, [4, 5])
    other_images = images.clone()
    other_images[0] = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(9))
    other_actions = [{n: torch.cat([v[1:2].flip(1), v[1:2]]) for n, v in b.items()} for b in actions]
    changed = _lockstep(pair, other_images, other_actions, [7, 5])
    for a, b in zip(base, changed, strict=True):
        assert torch.equal(a[1], b[1]) and not torch.equal(a[0], b[0])
    mine = [{n: v[1:2] for n, v in b.items()} for b in actions]
    alone = _play(fp8_engine, images[1:2], mine, seed=5)
    assert rel_l2(base[0][1:2], alone[0]) <= 1e-6  # block 0: no code flipped
    assert all(rel_l2(t[1:2], a) <= 1e-2 for t, a in zip(base, alone, strict=True))
