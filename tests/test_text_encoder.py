"""The umT5 text encoder wrapper, on a tiny random-config UMT5 built here (no download)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flashdreams.models.text_encoder import TextEncoder, clean_prompt, wan_t5_to_hf  # noqa: E402


def _tiny_umt5():
    cfg = transformers.UMT5Config(
        vocab_size=97,
        d_model=24,
        d_kv=6,
        d_ff=40,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
    )
    torch.manual_seed(0)
    return transformers.UMT5EncoderModel(cfg).eval()


def test_pad_rows_are_zero_and_real_rows_match_the_model():
    model = _tiny_umt5()
    enc = TextEncoder(model, text_len=12)
    ids = torch.randint(2, 97, (2, 12))
    lens = torch.tensor([5, 9])
    mask = (torch.arange(12)[None] < lens[:, None]).long()
    out = enc.encode_ids(ids, mask)
    assert out.shape == (2, 12, 24) and out.dtype == torch.float32
    for b, n in enumerate(lens.tolist()):
        assert torch.count_nonzero(out[b, n:]) == 0, "pad rows must be exactly zero"
        assert torch.count_nonzero(out[b, :n].abs() > 0) > 0
    ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(out[0, :5], ref[0, :5], atol=1e-6)
    # The real rows do not depend on what follows the prompt (the mask hides it).
    ids2 = ids.clone()
    ids2[0, 5:] = 1
    assert torch.allclose(enc.encode_ids(ids2, mask)[0, :5], out[0, :5], atol=1e-5)


def test_wan_layout_keys_map_onto_transformers():
    model = _tiny_umt5()
    hf = model.state_dict()
    inv = {"shared.weight": "token_embedding.weight", "encoder.final_layer_norm.weight": "norm.weight"}
    wan = {}
    for k, v in hf.items():
        if k == "encoder.embed_tokens.weight":
            continue
        if k in inv:
            wan[inv[k]] = v
            continue
        parts = k.split(".")
        i, layer = parts[2], parts[4]
        tail = ".".join(parts[5:])
        table = {
            "SelfAttention.relative_attention_bias.weight": f"blocks.{i}.pos_embedding.embedding.weight",
            "layer_norm.weight": f"blocks.{i}.norm{int(layer) + 1}.weight",
            "DenseReluDense.wi_0.weight": f"blocks.{i}.ffn.gate.0.weight",
            "DenseReluDense.wi_1.weight": f"blocks.{i}.ffn.fc1.weight",
            "DenseReluDense.wo.weight": f"blocks.{i}.ffn.fc2.weight",
        }
        wan[table.get(tail, f"blocks.{i}.attn.{parts[6]}.weight")] = v
    back = wan_t5_to_hf(wan)
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_prompt_cleaning():
    assert clean_prompt("  a &amp;amp; b\n\n c  ") == "a & b c"
