"""Checkpoint loading: files, shards, layouts, prefixes, and a named error for every bad case."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from flashdreams.cli.convert import main as convert_main
from flashdreams.convert import convert_checkpoint
from flashdreams.errors import CheckpointError, NotFoundError
from flashdreams.models.checkpoint import nonfinite_keys, validate_and_load
from flashdreams.models.random_init import init_random_
from flashdreams.models.wan_config import WanConfig
from flashdreams.models.wan_dit import WanDiT
from flashdreams.models.wan_loader import _DIFFUSERS_BLOCK, _DIFFUSERS_TOP, load_wan_dit

CFG = WanConfig(dim=32, ffn_dim=48, num_heads=2, num_layers=2, text_dim=8, text_len=4, freq_dim=16)


@pytest.fixture(scope="module")
def reference():
    return init_random_(WanDiT(CFG), seed=5).eval()


def _same(model, ref):
    sd, rd = model.state_dict(), ref.state_dict()
    return sd.keys() == rd.keys() and all(torch.equal(sd[k], rd[k]) for k in sd)


def _to_diffusers(sd):
    inv_top = {v: k for k, v in _DIFFUSERS_TOP.items()}
    inv_blk = {v: k for k, v in _DIFFUSERS_BLOCK.items()}
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            name, _, suffix = rest.rpartition(".")
            if rest == "modulation":
                out[f"blocks.{i}.scale_shift_table"] = v
            else:
                out[f"blocks.{i}.{inv_blk[name]}.{suffix}"] = v
        else:
            name, _, suffix = k.rpartition(".")
            if k == "head.modulation":
                out["scale_shift_table"] = v
            else:
                out[f"{inv_top.get(name, name)}.{suffix}"] = v
    return out


def test_single_file_sharded_and_prefixed(tmp_path, reference):
    sd = reference.state_dict()
    save_file(sd, str(tmp_path / "one.safetensors"))
    assert _same(load_wan_dit(tmp_path / "one.safetensors", CFG), reference)
    # Sharded, addressed through the directory that holds the index.
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    keys = sorted(sd)
    halves = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2 :]}
    for name, ks in halves.items():
        save_file({k: sd[k] for k in ks}, str(shard_dir / name))
    index = {"weight_map": {k: n for n, ks in halves.items() for k in ks}}
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    assert _same(load_wan_dit(shard_dir, CFG), reference)
    # Self-Forcing's distilled layout: generator_ema.model.<key>, with a stale generator beside it.
    pre = {f"generator_ema.model.{k}": v for k, v in sd.items()}
    pre.update({f"generator.model.{k}": torch.zeros_like(v) for k, v in sd.items()})
    assert _same(load_wan_dit(pre, CFG), reference)
    fsdp = {f"model._fsdp_wrapped_module.{k}": v for k, v in sd.items()}
    assert _same(load_wan_dit(fsdp, CFG), reference)


def test_diffusers_layout_and_config_inference(tmp_path, reference):
    d = _to_diffusers(reference.state_dict())
    assert "blocks.0.attn2.to_out.0.weight" in d and "blocks.0.norm2.weight" in d
    model = load_wan_dit(d, CFG)
    assert _same(model, reference)
    # Without a config, shapes give everything but the head count (head_dim 128 assumed).
    save_file(d, str(tmp_path / "m.safetensors"))
    cfg = {
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 8,
        "freq_dim": 16,
        "ffn_dim": 48,
        "num_layers": 2,
        "text_len": 4,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert _same(load_wan_dit(tmp_path), reference)


def test_bad_checkpoints_are_named(tmp_path, reference):
    sd = reference.state_dict()
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_wan_dit(tmp_path / "trunc.safetensors", CFG)
    wrong_layout = {k.replace("blocks.", "layers."): v for k, v in sd.items()}
    with pytest.raises(CheckpointError, match=r"keys missing \(blocks\.0\..*keys unexpected \(layers\."):
        load_wan_dit(wrong_layout, CFG)
    with pytest.raises(
        CheckpointError,
        match=r"6 keys with wrong shape \(blocks\.0\.ffn\.0\.bias \(checkpoint \(48,\), model \(64,\)\)",
    ):
        load_wan_dit(sd, CFG.replace(ffn_dim=64))
    missing = dict(sd)
    missing.pop("blocks.1.norm3.weight")
    with pytest.raises(CheckpointError, match=r"1 keys missing \(blocks\.1\.norm3\.weight\)"):
        load_wan_dit(missing, CFG)
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    save_file({k: sd[k] for k in list(sd)[:3]}, str(shard_dir / "a.safetensors"))
    index = {"weight_map": {k: ("a.safetensors" if i < 3 else "b.safetensors") for i, k in enumerate(sd)}}
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(NotFoundError, match=r"1 of 2 shard files are missing \(b\.safetensors\)"):
        load_wan_dit(shard_dir, CFG)
    torch.save(sd, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="fd-convert"):
        load_wan_dit(tmp_path / "m.pt", CFG)
    with pytest.raises(NotFoundError):
        load_wan_dit(tmp_path / "nowhere", CFG)


def test_convert_pt_to_safetensors(tmp_path, reference):
    sd = reference.state_dict()
    ckpt = {
        "generator": {f"model.{k}": v + 1 for k, v in sd.items()},
        "generator_ema": {f"model.{k}": v for k, v in sd.items()},
        "step": 1200,
    }
    torch.save(ckpt, tmp_path / "sf.pt")
    info = convert_checkpoint(tmp_path / "sf.pt", tmp_path / "sf.safetensors")
    assert info["tensors"] == 2 * len(sd) and info["skipped"] == ["step"]
    assert _same(load_wan_dit(tmp_path / "sf.safetensors", CFG), reference)  # EMA weights chosen
    assert convert_main([str(tmp_path / "sf.pt"), str(tmp_path / "g.safetensors"), "--key", "generator"]) == 0
    assert not _same(load_wan_dit(tmp_path / "g.safetensors", CFG), reference)


class _Evil:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_convert_refuses_arbitrary_objects_and_leaves_nothing(tmp_path, capsys):
    torch.save({"w": torch.ones(2), "obj": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        convert_checkpoint(tmp_path / "evil.pt", tmp_path / "out.safetensors")
    assert "arbitrary code ran" not in capsys.readouterr().out
    assert not any(p.name.endswith(".safetensors") or p.name.endswith(".tmp") for p in tmp_path.iterdir())
    assert convert_main([str(tmp_path / "missing.pt"), str(tmp_path / "x.safetensors")]) == 2


# A late key in the model's order: a loader that checked while copying would already have
# overwritten the earlier parameters when it met this one.
_LATE = "blocks.1.ffn.2.weight"


def _as(t, dtype):
    return (t * 50).to(dtype) if dtype == torch.int8 else (t > 0).to(dtype) if dtype == torch.bool else t.to(dtype)


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.complex64])
def test_non_float_weights_are_refused_naming_the_key(tmp_path, reference, dtype):
    sd = dict(reference.state_dict())
    sd[_LATE] = _as(sd[_LATE], dtype)
    path = tmp_path / "q.safetensors"
    save_file(sd, str(path))
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(CheckpointError, match=rf"1 keys hold non-floating-point .*\({_LATE} \({name}\)\).*float16"):
        load_wan_dit(path, CFG)
    # Nothing is loaded: every other tensor differs from the model's, and none was copied.
    model = copy.deepcopy(reference)
    shifted = {k: (v + 1 if k != _LATE else v) for k, v in sd.items()}
    with pytest.raises(CheckpointError, match=_LATE):
        validate_and_load(model, shifted, "shifted")
    assert _same(model, reference)


def test_many_non_float_weights_are_counted(reference):
    sd = {k: v.to(torch.int8) if k.startswith("blocks.") else v for k, v in reference.state_dict().items()}
    n = sum(k.startswith("blocks.") for k in sd)
    with pytest.raises(CheckpointError, match=rf"{n} keys hold non-floating-point .*\(int8\), \.\.\.\)"):
        load_wan_dit(sd, CFG)


def test_nan_and_inf_weights_are_refused_naming_the_keys(tmp_path, reference):
    sd = {k: v.clone() for k, v in reference.state_dict().items()}
    sd["blocks.0.self_attn.q.weight"][0, 0] = float("nan")
    sd[_LATE][1, 2] = float("-inf")
    path = tmp_path / "nan.safetensors"
    save_file(sd, str(path))
    with pytest.raises(
        CheckpointError,
        match=rf"2 weights hold NaN or infinite values \(blocks\.0\.self_attn\.q\.weight \(1 of 1024\), "
        rf"{_LATE} \(1 of 1536\)\).*Nothing was loaded",
    ):
        load_wan_dit(path, CFG)
    model = copy.deepcopy(reference)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        validate_and_load(model, {k: v + 1 for k, v in sd.items()}, "shifted")
    assert _same(model, reference)
    # Half-precision and float8 files are checked too (isfinite has no float8_e4m3fn kernel on CPU).
    half = {k: v.half() for k, v in sd.items()}
    with pytest.raises(CheckpointError, match=r"2 weights hold NaN"):
        load_wan_dit(half, CFG)
    fp8 = {
        "ok": torch.ones(4).to(torch.float8_e4m3fn),
        "bad": torch.tensor([1.0, float("nan")]).to(torch.float8_e4m3fn),
    }
    assert nonfinite_keys(fp8) == ["bad"]


def test_finite_check_reads_the_flags_back_once(monkeypatch, reference):
    """One host sync for the whole checkpoint, not one per tensor (bool()/item() on each flag)."""

    def no_sync(self, *args):
        raise AssertionError("a per-tensor host sync in the finite check")

    sd = {k: v.clone() for k, v in reference.state_dict().items()}
    sd[_LATE][0, 0] = float("inf")
    monkeypatch.setattr(torch.Tensor, "__bool__", no_sync)
    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    assert nonfinite_keys(sd) == [_LATE]
    assert nonfinite_keys({"i": torch.arange(3), "e": torch.empty(0)}) == []  # non-float and empty: skipped
