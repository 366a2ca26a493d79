"""The engine manifest's checks on a hand-made engine directory (fast: nothing is compiled)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flashdreams.errors import EngineIncompatibleError, InvalidArgumentError, NotFoundError
from flashdreams.export.backends import backend_names, get_backend
from flashdreams.export.backends.aoti import cuda_load_blocked
from flashdreams.export.build_config import BuildConfig
from flashdreams.export.manifest import (
    SCHEMA_VERSION,
    check_fingerprint,
    file_record,
    machine_fingerprint,
    read_manifest,
    required_fields,
    validate_engine,
    write_manifest,
)
from flashdreams.presets import get_preset, preset_from_dict, preset_names


@pytest.fixture
def engine_dir(tmp_path):
    (tmp_path / "graphs").mkdir()
    (tmp_path / "graphs" / "dit.pt2").write_bytes(b"not really a program" * 100)
    m = {
        "schema_version": SCHEMA_VERSION,
        "backend": "aoti",
        "graphs": {"dit": {"files": [file_record(tmp_path, "graphs/dit.pt2")]}},
        "artifacts": {},
        "fingerprint": machine_fingerprint("cpu"),
    }
    write_manifest(tmp_path, m)
    return tmp_path


def test_valid_engine_passes_and_reports_checks(engine_dir):
    val = validate_engine(engine_dir)
    assert val.device == torch.device("cpu")
    text = "\n".join(val.checks)
    assert "sha256 verified" in text and "device_type" in text and "torch" in text


def test_seal_detects_hand_edits(engine_dir):
    path = engine_dir / "manifest.json"
    m = json.loads(path.read_text())
    m["backend"] = "inductor"
    path.write_text(json.dumps(m))
    with pytest.raises(EngineIncompatibleError, match="modified after the build"):
        validate_engine(engine_dir)


def test_missing_manifest_and_file(engine_dir, tmp_path_factory):
    with pytest.raises(NotFoundError, match="manifest.json"):
        validate_engine(tmp_path_factory.mktemp("empty"))
    (engine_dir / "graphs" / "dit.pt2").unlink()
    with pytest.raises(NotFoundError, match="graphs/dit.pt2"):
        validate_engine(engine_dir)


def test_truncated_and_modified_files(engine_dir):
    f = engine_dir / "graphs" / "dit.pt2"
    data = f.read_bytes()
    f.write_bytes(data[:-1])
    with pytest.raises(EngineIncompatibleError, match="truncated"):
        validate_engine(engine_dir)
    f.write_bytes(data[:-1] + b"?")
    with pytest.raises(EngineIncompatibleError, match="sha256"):
        validate_engine(engine_dir)
    assert validate_engine(engine_dir, check_files=False).checks  # sizes only: passes


def test_unparseable_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(EngineIncompatibleError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_fingerprint_rules():
    here = machine_fingerprint("cpu")
    gpu = dict(here, device_type="cuda", device_name="NVIDIA H100 80GB HBM3", capability="sm_90", cuda="13.0")
    with pytest.raises(EngineIncompatibleError, match=r"'NVIDIA H100 80GB HBM3' \(sm_90\), this machine has 'cpu'"):
        check_fingerprint(gpu, here, "inductor")
    assert check_fingerprint(gpu, here, "onnx") == []  # ONNX graphs are portable
    other_isa = dict(here, capability="x86_64-scalar")
    with pytest.raises(EngineIncompatibleError, match="capability"):
        check_fingerprint(other_isa, here, "aoti")
    assert "triton" in required_fields("inductor", "cuda") and "triton" not in required_fields("inductor", "cpu")
    assert "tensorrt" in required_fields("tensorrt", "cuda") and "python_minor" in required_fields("inductor", "cpu")
    newer_cudnn = dict(here, cudnn="99999")
    check_fingerprint(newer_cudnn, here, "inductor")  # recorded, never enforced


def test_aoti_cuda_guard(monkeypatch):
    monkeypatch.setenv("FD_AOTI_FORCE", "1")  # the guard reads its config, never the environment
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert "segfault" in cuda_load_blocked(torch.device("cuda"))
    assert cuda_load_blocked(torch.device("cpu")) is None
    assert cuda_load_blocked(torch.device("cuda"), force=True) is None
    forced = get_backend("aoti", BuildConfig(backend="aoti", aoti_force=True))
    forced.begin_load(Path("/nowhere"), {}, torch.device("cuda"))  # not refused
    with pytest.raises(EngineIncompatibleError, match="--aoti-force"):
        get_backend("aoti").begin_load(Path("/nowhere"), {}, torch.device("cuda"))


def test_backends_are_new_objects_with_their_config():
    a, b = get_backend("inductor"), get_backend("inductor")
    assert a is not b and a.load_times is not b.load_times
    assert a.config == BuildConfig() and a.config.backend == "inductor"
    cfg = BuildConfig(backend="inductor", autotune=True, inductor_mode="cache")
    c = get_backend("inductor", cfg)
    assert c.config is cfg and c._mode == "cache"
    for name in backend_names():
        assert get_backend(name).name == name and get_backend(name).config.backend == name
    with pytest.raises(InvalidArgumentError, match="build config for backend 'aoti'"):
        get_backend("inductor", BuildConfig(backend="aoti"))


def test_build_config_record_and_environment_defaults():
    cfg = BuildConfig(backend="aoti", aoti_force=True)
    assert BuildConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(InvalidArgumentError, match="unknown fields"):
        BuildConfig.from_dict({**cfg.to_dict(), "color": "red"})
    with pytest.raises(InvalidArgumentError, match="inductor mode 'fast'"):
        BuildConfig(inductor_mode="fast")
    with pytest.raises(InvalidArgumentError, match="backend 'tvm' is unknown"):
        BuildConfig(backend="tvm")
    env = {"FD_INDUCTOR_AUTOTUNE": "1", "FD_INDUCTOR_MODE": "cache", "FD_AOTI_FORCE": "1"}
    assert BuildConfig.from_env("inductor", env) == BuildConfig("inductor", True, "cache", True)
    assert BuildConfig.from_env("inductor", {}) == BuildConfig()
    # a flag given on the command line wins over its environment default; None means "not given"
    assert BuildConfig.from_env("inductor", env, inductor_mode="precompiled", autotune=None).inductor_mode == (
        "precompiled"
    )
    with pytest.raises(InvalidArgumentError, match="FD_INDUCTOR_MODE='fast'"):
        BuildConfig.from_env("inductor", {"FD_INDUCTOR_MODE": "fast"})


def test_tensorrt_refuses_clearly_where_absent():
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is importable here; this test covers machines without it")
    except Exception:
        pass
    reason = get_backend("tensorrt").unavailable_reason(torch.device("cpu"))
    assert reason and "tensorrt" in reason.lower()
    from flashdreams.export.build import build_engine

    with pytest.raises(InvalidArgumentError, match="tensorrt"):
        build_engine("/tmp/fd-never-written", backend="tensorrt", device="cpu")


def test_unknown_backend():
    with pytest.raises(InvalidArgumentError, match="unknown"):
        get_backend("tvm")


@pytest.mark.parametrize("name", preset_names())
def test_preset_dict_roundtrip(name):
    p = get_preset(name)
    assert preset_from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_preset_from_dict_refuses_unknown_fields():
    d = get_preset("tiny").to_dict()
    d["warp_speed"] = 9
    with pytest.raises(InvalidArgumentError, match="warp_speed"):
        preset_from_dict(d)


def test_an_engine_directory_without_its_manifest_is_named(tmp_path):
    """Not mistaken for a checkpoint directory: the error says what is missing."""
    import flashdreams

    (tmp_path / "graphs").mkdir()
    (tmp_path / "graphs" / "dit.inductor").write_bytes(b"x")
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(NotFoundError, match="missing its manifest.json"):
        flashdreams.load(tmp_path)


def test_graphs_take_weights_as_held_unless_neither_contiguous_nor_channels_last():
    """An NHWC conv weight (the CUDA TAEHV decoder's) is traced as the module holds it (the build records it and
    the load restores the layout: test_export_engine.py), a contiguous weight likewise; a weight in any other
    layout (a transposed view) is traced as one contiguous copy, shared by every graph."""
    from flashdreams.export.backends.inductor import _module_tensors, channels_last_weight

    module = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.Linear(8, 8), torch.nn.Linear(8, 6))
    module[0].to(memory_format=torch.channels_last)
    module[2].weight = torch.nn.Parameter(torch.randn(8, 6).t())  # [6, 8], neither layout
    assert not module[0].weight.is_contiguous() and channels_last_weight(module[0].weight)
    first, second = _module_tensors(module), _module_tensors(module)
    assert first["0.weight"].data_ptr() == module[0].weight.data_ptr()  # no copy of a channels-last conv weight
    assert first["1.weight"].data_ptr() == module[1].weight.data_ptr()  # no copy of a contiguous weight
    odd = first["2.weight"]
    assert odd.is_contiguous() and torch.equal(odd, module[2].weight) and odd.data_ptr() != module[2].weight.data_ptr()
    assert second["2.weight"] is odd  # the same copy for every graph
