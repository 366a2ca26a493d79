"""The opt-in FP8 path on the tiny model: which layers go FP8, and what it costs in accuracy."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

import flashdreams
from flashdreams.errors import InvalidArgumentError
from flashdreams.kernels import triton_available
from flashdreams.numerics import rel_l2
from flashdreams.registry import get_preset

pytestmark = pytest.mark.skipif(
    not triton_available(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1",
)

# The ring-shadow tests are about which key tiles a DiT call re-quantizes, not about the sampler: the tiny
# preset with two denoising steps (three DiT calls a block, not five) keeps the interpreter's time down.
TWO_STEP_TINY = dataclasses.replace(get_preset("tiny"), denoising_step_list=(1000, 500))


def test_fp8_session_stays_close_to_full_precision():
    ref_engine = flashdreams.load(decoder=None, attention="triton")
    fp8_engine = flashdreams.load(decoder=None, attention="triton", precision="fp8")
    fp8_names = sorted(n for n, m in fp8_engine.model.weights.named_modules() if type(m).__name__ == "Fp8Linear")
    # The cross-attention's output stays in the model's dtype (WanDiT.fp8_keep): alone it took Self-Forcing past 3%.
    per_block = {"self_attn.qkv_fp8", "self_attn.o", "cross_attn.q", "ffn.0", "ffn.2"}
    assert fp8_names == sorted(f"blocks.{i}.{n}" for i in range(2) for n in per_block)
    a, b = ref_engine.session(seed=3), fp8_engine.session(seed=3)
    errs = [rel_l2(b.step().latents, a.step().latents) for _ in range(3)]
    # e4m3 keeps 3 mantissa bits: a few percent, never more (measured ~2% on this model).
    assert all(1e-4 < e < 5e-2 for e in errs), errs


def test_fp8_linears_can_be_chosen_by_name():
    """quantize_fp8_: None takes the model's own choice, "" every per-token linear, a regex keeps its matches;
    LingBot keeps its camera layers back (in FP8 they tripled its latents' error against bf16)."""
    from flashdreams.models.lingbot_dit import LingBotDiT
    from flashdreams.models.wan_dit import FP8_KEEP, WanDiT

    def fp8_names(exclude):
        dit = flashdreams.load(decoder=None).model.weights
        return {n for n in dit.quantize_fp8_(exclude=exclude)}

    everything, default, no_ffn = fp8_names(""), fp8_names(None), fp8_names(r"ffn\.")
    cross = {n for n in everything if "cross_attn" in n}
    assert cross == {f"blocks.{i}.cross_attn.{p}" for i in range(2) for p in "qo"}
    assert default == {n for n in everything if "cross_attn.o" not in n} and WanDiT.fp8_keep == FP8_KEEP
    assert no_ffn == {n for n in everything if ".ffn." not in n}
    assert LingBotDiT.fp8_keep == r"\.cam_"
    dit = flashdreams.load(decoder=None).model.weights
    with pytest.raises(InvalidArgumentError, match="not a regular expression"):
        dit.quantize_fp8_(exclude="cross_attn.(")
    assert not [m for m in dit.modules() if type(m).__name__ == "Fp8Linear"]  # refused before anything changed


def test_fp8_needs_the_triton_kernels():
    with pytest.raises(InvalidArgumentError, match="attention='triton'"):
        flashdreams.load(decoder=None, attention="sdpa", precision="fp8")
    with pytest.raises(InvalidArgumentError, match="precision 'fp4' is unknown"):
        flashdreams.load(decoder=None, attention="triton", precision="fp4")


def test_fp8_norms_hand_their_linears_quantized_rows(monkeypatch, count_calls):
    """In FP8, each block's three norms that feed only FP8 linears (q/k/v, the cross-attention's q, the
    FFN's first layer) quantize h in their own pass; the result is the linears quantizing h themselves
    (bit for bit on a GPU; on a CPU the interpreter truncates the bf16 h the unfused path stores)."""
    from flashdreams.kernels import adaln
    from flashdreams.models import dit_ops, wan_dit

    passes, blocks = count_calls(adaln, "_fp8_pass"), count_calls(wan_dit.WanBlock, "forward")
    engine = flashdreams.load(decoder=None, attention="triton", precision="fp8")
    fused = engine.session(seed=3).step().latents
    assert blocks and len(passes) == 3 * len(blocks)
    monkeypatch.setattr(dit_ops, "QUANTIZE_IN_NORMS", False)
    passes.clear()
    blocks.clear()
    unfused = engine.session(seed=3).step().latents
    assert blocks and not passes
    assert rel_l2(fused, unfused) < 1e-2


def test_fp8_ring_shadow_equals_quantizing_the_ring_every_call(monkeypatch):
    """FP8 attention keeps an fp8 shadow of the KV ring as session state and re-quantizes only the key
    tiles a DiT call writes; over more blocks than the ring holds, up to a block whose slots wrap around
    the window, and a reset, the latents equal, bit for bit, an engine that quantizes the whole ring in
    every call."""
    from flashdreams.models import dit_ops
    from flashdreams.models.families import causal_wan

    opts = dict(preset=TWO_STEP_TINY, decoder=None, attention="triton", precision="fp8")
    shadowed = flashdreams.load(**opts)
    state = shadowed.plan.state
    assert {"ring_k8", "ring_kt", "ring_v8t", "ring_vt"} <= set(state)
    assert state["ring_k8"].dtype == "float8_e4m3fn" and state["ring_k8"].batch_dim == 1
    assert "ring_k8" in shadowed.plan.graphs["dit"].args and "ring_k8" in shadowed.plan.graphs["dit"].mutates
    with monkeypatch.context() as m:
        m.setattr(causal_wan, "shadow_block_n", lambda *a: None)
        per_call = flashdreams.load(**opts)
    assert "ring_k8" not in per_call.plan.state and "ring_k8" not in per_call.plan.graphs["dit"].args
    assert "ring_k8" not in flashdreams.load(decoder=None, attention="triton").plan.state  # bf16: no shadow
    calls = []
    real = dit_ops.ring_attention_fp8_shadowed
    monkeypatch.setattr(dit_ops, "ring_attention_fp8_shadowed", lambda *a: calls.append(1) or real(*a))
    a, b = shadowed.session(seed=3), per_call.session(seed=3)
    ring = shadowed.plan.ring
    # up to the first block whose frame slots wrap around the window (two runs of rows to re-quantize)
    wraps = [blk for blk in range(16) if ring.values(blk)["slots"] != sorted(ring.values(blk)["slots"])]
    assert wraps, "the tiny preset's ring should wrap within 16 blocks"
    for _ in range(wraps[0] + 1):
        assert torch.equal(a.step().latents, b.step().latents)
    layers = shadowed.plan.meta["num_layers"]
    assert calls and len(calls) % layers == 0
    assert a.buffers["ring_k8"].float().abs().sum() > 0
    a.reset()
    b.reset()
    assert torch.equal(a.step().latents, b.step().latents)


def test_fp8_attention_hands_the_output_projection_quantized_rows(monkeypatch, count_calls):
    """With the ring's fp8 shadow, every layer's attention hands its FP8 output projection the output already
    quantized (with two key splits: quantized as the splits merge): the latents equal, bit for bit, the
    projection quantizing a bf16/fp32 attention output itself."""
    from flashdreams.models import dit_ops

    fp8_attention = importlib.import_module("flashdreams.kernels.ring_attention_fp8")
    monkeypatch.setenv("FD_FP8_ATTN_SPLITS", "2")
    engine = flashdreams.load(preset=TWO_STEP_TINY, decoder=None, attention="triton", precision="fp8")
    rows = count_calls(fp8_attention, "ring_attention_fp8_rows")
    merged = count_calls(importlib.import_module("flashdreams.kernels.attention_merge"), "merge_rows_fp8")
    fused = engine.session(seed=4).step().latents
    assert rows and len(rows) == len(merged) and len(rows) % engine.plan.meta["num_layers"] == 0
    monkeypatch.setattr(dit_ops, "ATTN_FP8_ROWS", False)
    rows.clear()
    unfused = engine.session(seed=4).step().latents
    assert not rows
    assert torch.equal(fused, unfused)


def test_fp8_ring_shadow_with_two_streams_in_a_batch(monkeypatch):
    """Batch 2: each row's shadow tiles are its own (the state's batch axis is dim 1, like the ring's)."""
    from flashdreams.models.families import causal_wan

    opts = dict(preset=TWO_STEP_TINY, decoder=None, attention="triton", precision="fp8", batch=2)
    shadowed = flashdreams.load(**opts)
    assert shadowed.plan.state["ring_k8"].shape[1] == 2 == shadowed.plan.state["ring_kt"].shape[1]
    with monkeypatch.context() as m:
        m.setattr(causal_wan, "shadow_block_n", lambda *a: None)
        per_call = flashdreams.load(**opts)
    g = torch.Generator().manual_seed(7)
    prompts = torch.randn(*shadowed.plan.inputs["prompt_embeds"].shape, generator=g)
    a = shadowed.session(inputs={"prompt_embeds": prompts}, seed=5)
    b = per_call.session(inputs={"prompt_embeds": prompts}, seed=5)
    for _ in range(2):
        la, lb = a.step().latents, b.step().latents
        assert torch.equal(la, lb) and not torch.equal(la[0], la[1])


def test_load_takes_the_linears_fp8_keeps_in_bf16(tmp_path):
    """flashdreams.load(fp8_keep=REGEX) replaces the model's own choice of linears kept in bf16; a bad regex, or
    fp8_keep without precision 'fp8', is refused before anything loads, and so is fd-build's."""
    from flashdreams.export.build import build_engine

    kept = flashdreams.load(decoder=None, attention="triton", precision="fp8", fp8_keep=r"ffn\.")
    names = {n for n, m in kept.model.weights.named_modules() if type(m).__name__ == "Fp8Linear"}
    # the regex replaces the default (which keeps cross_attn.o in bf16): only the FFN stays
    per_block = ("self_attn.qkv_fp8", "self_attn.o", "cross_attn.q", "cross_attn.o")
    assert names == {f"blocks.{i}.{n}" for i in range(2) for n in per_block}
    with pytest.raises(InvalidArgumentError, match="means nothing with precision 'bf16'"):
        flashdreams.load(decoder=None, attention="triton", fp8_keep=r"ffn\.")
    with pytest.raises(InvalidArgumentError, match="not a regular expression"):
        flashdreams.load(decoder=None, attention="triton", precision="fp8", fp8_keep="ffn(")
    with pytest.raises(InvalidArgumentError, match="not a regular expression"):
        build_engine(tmp_path / "e", attention="triton", precision="fp8", fp8_keep="ffn(", decoder=None)
    assert not (tmp_path / "e").exists()


def test_fast_accumulation_is_a_switch_read_when_linears_are_swapped(monkeypatch):
    """Every FP8 linear a model swaps in uses fast accumulation (the default, measured to cost nothing in
    quality), FD_FP8_FAST_ACCUM=0 none; a value other than 0 or 1 is refused by name before anything is swapped."""
    from flashdreams.kernels.fp8_linear import FAST_ACCUM_ENV

    def fast_flags():
        dit = flashdreams.load(decoder=None).model.weights
        dit.quantize_fp8_()
        return {m.use_fast_accum for m in dit.modules() if type(m).__name__ == "Fp8Linear"}

    monkeypatch.delenv(FAST_ACCUM_ENV, raising=False)
    assert fast_flags() == {True}
    monkeypatch.setenv(FAST_ACCUM_ENV, "0")
    assert fast_flags() == {False}
    monkeypatch.setenv(FAST_ACCUM_ENV, "1")
    assert fast_flags() == {True}
    monkeypatch.setenv(FAST_ACCUM_ENV, "yes")
    dit = flashdreams.load(decoder=None).model.weights
    with pytest.raises(InvalidArgumentError, match="FD_FP8_FAST_ACCUM: expected 0 or 1"):
        dit.quantize_fp8_()
    assert not [m for m in dit.modules() if type(m).__name__ == "Fp8Linear"]


def test_fp8_attention_knobs_are_checked_before_anything_loads(monkeypatch):
    """A malformed FD_FP8_ATTN_KERNEL or FD_FP8_ATTN_SPLITS is refused by name when an FP8 model is loaded (not
    in its first block's attention, after the ring was written); bf16 loads do not read them."""
    from flashdreams import registry

    def no_load(*_a, **_k):
        raise AssertionError("loading started before the environment was checked")

    for name, bad in (("FD_FP8_ATTN_KERNEL", "cutlass"), ("FD_FP8_ATTN_SPLITS", "two")):
        monkeypatch.setenv(name, bad)
        with monkeypatch.context() as m:
            m.setattr(registry, "get_preset", no_load)
            with pytest.raises(InvalidArgumentError, match=name):
                flashdreams.load(decoder=None, attention="triton", precision="fp8")
        assert flashdreams.load(decoder=None, attention="triton").model is not None  # bf16 ignores them
        monkeypatch.delenv(name)
