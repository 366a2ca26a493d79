"""The opt-in FP8 path on the tiny model: which layers go FP8, and what it costs in accuracy."""

from __future__ import annotations

import pytest
import torch

import flashdreams
from flashdreams.errors import InvalidArgumentError
from flashdreams.kernels import triton_available
from flashdreams.numerics import rel_l2

pytestmark = pytest.mark.skipif(
    not triton_available(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1",
)


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
    LingBot keeps none back (its FP8 quality was measured with every linear in FP8)."""
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
    assert LingBotDiT.fp8_keep is None
    dit = flashdreams.load(decoder=None).model.weights
    with pytest.raises(InvalidArgumentError, match="not a regular expression"):
        dit.quantize_fp8_(exclude="cross_attn.(")
    assert not [m for m in dit.modules() if type(m).__name__ == "Fp8Linear"]  # refused before anything changed


def test_fp8_needs_the_triton_kernels():
    with pytest.raises(InvalidArgumentError, match="attention='triton'"):
        flashdreams.load(decoder=None, attention="sdpa", precision="fp8")
    with pytest.raises(InvalidArgumentError, match="precision 'fp4' is unknown"):
        flashdreams.load(decoder=None, attention="triton", precision="fp4")


def test_fp8_norms_hand_their_linears_quantized_rows(monkeypatch):
    """In FP8, each block's three norms that feed only FP8 linears (q/k/v, the cross-attention's q, the
    FFN's first layer) quantize h in their own pass; the result is the linears quantizing h themselves
    (bit for bit on a GPU; on a CPU the interpreter truncates the bf16 h the unfused path stores)."""
    from flashdreams.kernels import adaln
    from flashdreams.models import dit_ops, wan_dit

    calls = {"quantizing norms": 0, "blocks": 0}
    quantizing_pass, block_forward = adaln._fp8_pass, wan_dit.WanBlock.forward

    def counted_pass(*args, **kwargs):
        calls["quantizing norms"] += 1
        return quantizing_pass(*args, **kwargs)

    def counted_block(*args, **kwargs):
        calls["blocks"] += 1
        return block_forward(*args, **kwargs)

    monkeypatch.setattr(adaln, "_fp8_pass", counted_pass)
    monkeypatch.setattr(wan_dit.WanBlock, "forward", counted_block)
    engine = flashdreams.load(decoder=None, attention="triton", precision="fp8")
    fused = [engine.session(seed=3).step().latents]
    assert calls["blocks"] > 0 and calls["quantizing norms"] == 3 * calls["blocks"]
    monkeypatch.setattr(dit_ops, "QUANTIZE_IN_NORMS", False)
    calls.update({"quantizing norms": 0, "blocks": 0})
    unfused = engine.session(seed=3).step().latents
    assert calls["blocks"] > 0 and calls["quantizing norms"] == 0
    assert rel_l2(fused[0], unfused) < 1e-2
