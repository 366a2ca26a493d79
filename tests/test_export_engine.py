"""Engines built from the built-in tiny model on CPU: sessions match eager, bad engines are refused.

One engine per backend is built once per module (Inductor's CPU compile is the slow part):
inductor through the fd-build CLI with its decoder, aoti through build_engine without
one (latents only, to keep the file short), onnx through build_engine with its decoder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import flashdreams
from flashdreams.cli.build import main as fd_build
from flashdreams.errors import EngineIncompatibleError, InvalidArgumentError, NotFoundError
from flashdreams.export.build import build_engine
from flashdreams.export.build_config import BuildConfig
from flashdreams.export.manifest import read_manifest, validate_engine, write_manifest
from flashdreams.numerics import rel_l2

pytestmark = pytest.mark.slow

BLOCKS = 4
SEED = 7
TOL = 1e-5  # rel. L2 on each block's latents, float32


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="module")
def eager_blocks():
    """Latents and frames of the eager built-in model, the reference every engine must match."""
    session = flashdreams.load().session(seed=SEED)
    out = []
    for _ in range(BLOCKS):
        r = session.step()
        out.append((r.latents.clone(), r.frames.clone()))
    return out


@pytest.fixture(scope="module")
def inductor_dir(workdir) -> Path:
    out = workdir / "tiny-inductor"
    assert fd_build(["--backend", "inductor", "--device", "cpu", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def aoti_dir(workdir) -> Path:
    out = workdir / "tiny-aoti"
    build_engine(out, backend="aoti", device="cpu", decoder=None)
    return out


@pytest.fixture(scope="module")
def onnx_dir(workdir) -> Path:
    pytest.importorskip("onnxruntime")
    out = workdir / "tiny-onnx"
    build_engine(out, backend="onnx", device="cpu")
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _check_session(engine_dir: Path, eager_blocks, frames: bool) -> flashdreams.Engine:
    engine = flashdreams.load(engine_dir)
    assert set(engine.load_times) >= {"validate", "load_artifacts", "load_programs", "first_call", "total"}
    session = engine.session(seed=SEED)
    for b, (lat, fr) in enumerate(eager_blocks):
        r = session.step()
        err = rel_l2(r.latents, lat)
        assert err <= TOL, f"block {b}: latents differ from eager by rel. L2 {err:.3g}"
        if frames:
            assert r.frames is not None and r.frames.shape == fr.shape
            assert (r.frames.int() - fr.int()).abs().max() <= 1, f"block {b}: frames differ by more than 1 level"
        else:
            assert r.frames is None
    return engine


# -- sessions from engines --------------------------------------------------------------


def test_inductor_engine_session_matches_eager(inductor_dir, eager_blocks, monkeypatch):
    from flashdreams.export.backends.inductor import InductorBackend

    made, init = [], InductorBackend.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(InductorBackend, "__init__", recording_init)
    frames_before = sum(torch._dynamo.utils.counters["frames"].values())
    engine = _check_session(inductor_dir, eager_blocks, frames=True)
    # precompiled graphs: loading and running them never enters Dynamo
    assert sum(torch._dynamo.utils.counters["frames"].values()) == frames_before
    assert engine.backend.name == "inductor"
    # Each load gets its own backend object, and it keeps no engine's weights after the load.
    assert len(made) == 1 and made[0]._weights_future is None
    m = read_manifest(inductor_dir)
    assert m["build"]["config"] == BuildConfig().to_dict()  # fd-build's defaults, recorded
    assert set(m["graphs"]) == {"encode_prompt", "dit", "decode_first", "decode"}
    for name, g in m["graphs"].items():
        assert g["compile"]["mode"] == "precompiled"
        assert any(f["file"] == f"graphs/{name}.inductor" for f in g["files"]), name
    dit = m["graphs"]["dit"]
    assert dit["mutates"] == ["ring_k_0", "ring_k_1", "ring_v_0", "ring_v_1"]  # one input per layer
    assert dit["groups"]["ring_k"] == ["ring_k_0", "ring_k_1"] and "ring_k" in dit["call_inputs"]
    # Weights live once in weights.safetensors, and each graph takes only those it reads: the
    # DiT step gets cross-attention K/V as inputs and runs q/k/v as one fused GEMM.
    from safetensors import safe_open

    with safe_open(str(inductor_dir / m["artifacts"]["weights"]["file"]), "pt") as f:
        stored = set(f.keys())
    taken = [k for g in m["graphs"].values() for k in g["weights"]]
    assert set(taken) == stored
    assert not [k for k in dit["weights"] if "cross_attn.k." in k or "self_attn.q." in k]
    assert any(k.endswith("self_attn.qkv_weight") for k in dit["weights"])
    assert [k for k in m["graphs"]["encode_prompt"]["weights"] if k.endswith("layers.0.k.weight")]


def test_inductor_cache_mode_engine_matches_eager(workdir, eager_blocks, monkeypatch):
    """The older mode (Dynamo re-trace from the saved program, compiled from Inductor's cache)."""
    monkeypatch.setenv("FD_INDUCTOR_MODE", "precompiled")  # ignored: the mode comes with the config
    config = BuildConfig(backend="inductor", inductor_mode="cache")
    out = build_engine(workdir / "tiny-inductor-cache", backend="inductor", device="cpu", decoder=None, config=config)
    assert out["graphs"]["dit"]["compile"]["mode"] == "cache" and "inductor_cache" in out["artifacts"]
    assert out["build"]["config"] == config.to_dict()
    engine = _check_session(workdir / "tiny-inductor-cache", eager_blocks, frames=False)
    _refuses_other_strides(engine)


def _refuses_other_strides(engine) -> None:
    s = engine.session(seed=SEED)
    args = {n: s.buffers[n] for n in engine.plan.graphs["dit"].args if n in s.buffers}
    args["x"] = torch.randn(1, 16, 3, 12, 8).transpose(3, 4)  # the right shape, other strides
    args["t"] = s.buffers["t_steady_0"]
    with pytest.raises(InvalidArgumentError, match="contiguous"):
        engine.backend.call("dit", args, 0)


def test_inductor_engine_refuses_other_strides(inductor_dir):
    engine = flashdreams.load(inductor_dir)
    _refuses_other_strides(engine)


def test_inductor_load_reads_weights_beside_the_graphs_and_names_their_failure(inductor_dir, monkeypatch):
    """The weights are read on a thread of their own while the graphs load; the read's time is
    reported, and an error in it reaches the caller as it was raised (named, not a thread's)."""
    import threading

    import flashdreams.export.weight_file as weight_file

    real, readers = weight_file.read_safetensors, []

    def recording(path, device="cpu"):
        readers.append(threading.current_thread().name)
        return real(path, device)

    monkeypatch.setattr(weight_file, "read_safetensors", recording)
    engine = flashdreams.load(inductor_dir)
    assert len(readers) == 1 and readers[0].startswith("fd-weights")
    assert engine.load_times["load_artifacts.weights"] > 0

    def truncated(path, device="cpu"):
        raise EngineIncompatibleError(f"'{path}' is truncated")

    monkeypatch.setattr(weight_file, "read_safetensors", truncated)
    with pytest.raises(EngineIncompatibleError, match="weights.safetensors' is truncated"):
        flashdreams.load(inductor_dir)


def test_aoti_engine_session_matches_eager(aoti_dir, eager_blocks):
    engine = _check_session(aoti_dir, eager_blocks, frames=False)
    assert engine.backend.name == "aoti"
    assert engine.load_times["first_call"] < 5.0  # no compiler at load


def test_onnx_engine_session_matches_eager(onnx_dir, eager_blocks):
    m = read_manifest(onnx_dir)
    assert m["engine"]["graph_attention"] == "sdpa"
    for name, g in m["graphs"].items():  # each graph under onnxruntime vs eager, checked at build
        assert g["build_check"]["max_rel_l2"] <= TOL, name
    assert m["graphs"]["dit"]["state_outputs"]["ring_k_1_out"] == "ring_k_1"
    engine = _check_session(onnx_dir, eager_blocks, frames=True)
    assert engine.backend.name == "onnx"


def test_session_reset_replays_same_latents(aoti_dir):
    session = flashdreams.load(aoti_dir).session(seed=SEED)
    first = [session.step().latents.clone() for _ in range(2)]
    session.reset()
    again = [session.step().latents.clone() for _ in range(2)]
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_engine_refuses_other_batch(aoti_dir):
    engine = flashdreams.load(aoti_dir)
    with pytest.raises(InvalidArgumentError, match="batch 1"):
        engine.session(prompt_embeds=engine.default_prompt(batch=2))


# -- fd-build --check and refusals --------------------------------------------------------


def test_check_cli_accepts_good_engine(inductor_dir, capsys):
    assert fd_build(["--check", str(inductor_dir)]) == 0
    out = capsys.readouterr().out
    assert "sha256 verified" in out and "device_type" in out and "engine OK" in out


def test_tampered_manifest_is_refused(inductor_dir, workdir, capsys):
    d = _copy(inductor_dir, workdir / "tampered-manifest")
    m = json.loads((d / "manifest.json").read_text())
    m["plan"]["constants"]["t_steady_0"]["fill"] = 999.0  # a hand edit of the schedule, not re-sealed
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineIncompatibleError, match="modified after the build"):
        flashdreams.load(d)
    assert fd_build(["--check", str(d)]) == 1
    assert "modified after the build" in capsys.readouterr().err


def test_tampered_graph_file_is_refused(aoti_dir, workdir):
    d = _copy(aoti_dir, workdir / "tampered-graph")
    g = d / read_manifest(d)["graphs"]["dit"]["files"][0]["file"]
    data = bytearray(g.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    g.write_bytes(bytes(data))
    with pytest.raises(EngineIncompatibleError, match="sha256"):
        validate_engine(d)


def test_missing_graph_file_is_refused(aoti_dir, workdir):
    d = _copy(aoti_dir, workdir / "missing-graph")
    (d / read_manifest(d)["graphs"]["encode_prompt"]["files"][0]["file"]).unlink()
    with pytest.raises(NotFoundError, match="missing"):
        flashdreams.load(d)


def test_foreign_device_fingerprint_is_refused(aoti_dir, workdir, capsys):
    d = _copy(aoti_dir, workdir / "foreign-device")
    m = read_manifest(d)
    m["fingerprint"].update(device_type="cuda", device_name="NVIDIA H100 80GB HBM3", capability="sm_90")
    write_manifest(d, m)  # properly sealed: only the fingerprint is foreign
    with pytest.raises(EngineIncompatibleError, match=r"'NVIDIA H100 80GB HBM3' \(sm_90\), this machine has 'cpu'"):
        flashdreams.load(d)
    assert fd_build(["--check", str(d)]) == 1
    assert "NVIDIA H100 80GB HBM3" in capsys.readouterr().err


def test_foreign_torch_version_is_refused(aoti_dir, workdir):
    d = _copy(aoti_dir, workdir / "foreign-torch")
    m = read_manifest(d)
    m["fingerprint"]["torch"] = "2.11.0+cu130"
    write_manifest(d, m)
    with pytest.raises(EngineIncompatibleError, match="torch '2.11.0\\+cu130'"):
        flashdreams.load(d)


def test_schema_version_mismatch_is_refused(aoti_dir, workdir):
    d = _copy(aoti_dir, workdir / "schema")
    m = read_manifest(d)
    m["schema_version"] = 99
    write_manifest(d, m)
    with pytest.raises(EngineIncompatibleError, match="schema version 99"):
        validate_engine(d)


# -- the build's own guarantees ----------------------------------------------------------------


def _leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_interrupted_build_leaves_nothing(workdir):
    pytest.importorskip("onnxscript")
    out = workdir / "interrupted"

    def progress(phase, i, n):
        if phase == "compile dit":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_engine(out, backend="onnx", device="cpu", decoder=None, progress=progress)
    assert not out.exists()
    assert _leftovers(workdir, "interrupted") == []


def test_failed_build_leaves_nothing(workdir):
    pytest.importorskip("onnxscript")
    out = workdir / "failed"

    def progress(phase, i, n):
        if phase == "write manifest":
            raise RuntimeError("disk full (simulated)")

    with pytest.raises(RuntimeError, match="simulated"):
        build_engine(out, backend="onnx", device="cpu", decoder=None, progress=progress)
    assert not out.exists() and _leftovers(workdir, "failed") == []


def test_build_refuses_non_engine_dir_and_existing_engine(aoti_dir, workdir):
    other = workdir / "not-an-engine"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(InvalidArgumentError, match="not an engine directory"):
        build_engine(other, backend="aoti", device="cpu")
    assert (other / "notes.txt").read_text() == "mine"
    with pytest.raises(InvalidArgumentError, match="--force"):
        build_engine(aoti_dir, backend="aoti", device="cpu")
    assert fd_build(["--out", str(other), "--device", "cpu"]) == 2


def test_cli_usage_errors():
    assert fd_build([]) == 2
    assert fd_build(["--out", "x", "--backend", "nope", "--device", "cpu"]) == 2
    assert fd_build(["--help"]) == 0


def test_engine_of_a_channels_last_decoder_matches_eager(workdir, monkeypatch):
    """A decoder whose conv weights are NHWC (TAEHV and FlashVSR's TC decoder on CUDA; forced here on the
    CPU) builds into an engine whose decode graphs take those weights channels-last (weights.safetensors stores
    them contiguous; the load restores the layout), and its sessions equal eager."""
    from flashdreams.models import decoders

    wrap = decoders.TAEHVDecoder.__init__
    monkeypatch.setattr(
        decoders.TAEHVDecoder,
        "__init__",
        lambda self, model: wrap(self, model.to(memory_format=torch.channels_last)),
    )
    out = workdir / "tiny-taehv-nhwc"
    manifest = build_engine(out, backend="inductor", device="cpu", decoder="taehv")
    from flashdreams.export.backends.inductor import graph_ops

    decode = manifest["graphs"]["decode"]
    assert decode.get("channels_last"), "the decode graph traced NCHW copies"
    ep = torch.export.load(str(out / "graphs" / "decode.pt2"))
    ops = set(graph_ops(ep))
    assert ops == {"conv2d_nhwc", "bias_act", "memblock_join_update", "upsample_frames"}, ops
    assert "flashdreams.kernels.bias_act" in decode["kernel_modules"]
    eager = flashdreams.load(decoder="taehv")
    assert eager.model.decoder.model.decoder[1].weight.is_contiguous(memory_format=torch.channels_last)
    a, b = flashdreams.load(out).session(seed=SEED), eager.session(seed=SEED)
    frames = []
    for _ in range(3):
        got, want = a.step(), b.step()
        assert rel_l2(got.latents, want.latents) <= TOL
        assert (got.frames.int() - want.frames.int()).abs().max() <= 1
        frames.append(got.frames)

    # A fresh process has none of those ops until the load imports the modules the graphs' records name.
    import subprocess
    import sys

    from safetensors.torch import load_file

    got_file = workdir / "tiny-taehv-nhwc-frames.safetensors"
    code = (
        "import flashdreams; from safetensors.torch import save_file; "
        f"s = flashdreams.load({str(out)!r}).session(seed={SEED}); "
        f"save_file({{'frames': s.step().frames.contiguous()}}, {str(got_file)!r})"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.equal(load_file(got_file)["frames"], frames[0])


def test_onnx_engine_of_a_channels_last_decoder_traces_the_torch_twins(workdir, monkeypatch):
    """ONNX has no form for our Triton ops, so an exporter traces the torch twins of the kernels the models
    pick by device (TAEHV's bias/ReLU and frame-split passes on NHWC activations, as on CUDA; forced here on
    the CPU under the interpreter): the build succeeds (it failed with "No ONNX function found for
    flashdreams.bias_act"), its sessions equal eager (which runs the kernels), and the switch is off again
    after the export."""
    pytest.importorskip("onnxruntime")
    from flashdreams.kernels import torch_twins_only, triton_available
    from flashdreams.models import decoders

    wrap = decoders.TAEHVDecoder.__init__
    monkeypatch.setattr(
        decoders.TAEHVDecoder,
        "__init__",
        lambda self, model: wrap(self, model.to(memory_format=torch.channels_last)),
    )
    with torch_twins_only():
        assert not triton_available("cpu")
    assert triton_available("cpu")  # the tests' interpreter, back on
    out = workdir / "tiny-taehv-nhwc-onnx"
    build_engine(out, backend="onnx", device="cpu", decoder="taehv")
    assert triton_available("cpu")
    a, b = flashdreams.load(out).session(seed=SEED), flashdreams.load(decoder="taehv").session(seed=SEED)
    for _ in range(2):
        got, want = a.step(), b.step()
        assert rel_l2(got.latents, want.latents) <= TOL
        assert (got.frames.int() - want.frames.int()).abs().max() <= 1


def test_a_cold_cpu_load_compiles_no_kernel(inductor_dir, tmp_path):
    """A CPU engine carries Inductor's compiled C++ kernels: loading it in a fresh process with an
    empty Inductor cache installs them and compiles none (a cold load of this engine spent 28.5 of
    its 30.2 s compiling them before). Inductor's own per-machine ISA checks still compile."""
    import subprocess
    import sys
    import tarfile
    import time

    with tarfile.open(inductor_dir / "kernels.tar") as tar:
        bundled = {Path(n).name for n in tar.getnames() if n.startswith("inductor/") and n.endswith(".so")}
    assert len(bundled) >= 10  # every graph's kernels: the tiny model has dozens

    cache = tmp_path / "inductor-cache"
    start = time.time()
    code = f"import flashdreams, json; print(json.dumps(flashdreams.load({str(inductor_dir)!r}).load_times))"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["install_kernels"] > 0
    kernels = {p.name: p for p in cache.rglob("*.main.so")}  # one per generated kernel (the ISA checks are *.so)
    assert set(kernels) == bundled
    compiled_here = [n for n, p in kernels.items() if p.stat().st_mtime >= start]
    assert not compiled_here, f"{len(compiled_here)} kernels compiled at load"


def test_fd_run_on_an_engine_writes_its_frames(inductor_dir, eager_blocks, tmp_path):
    """An engine's decoder is one of its graphs: fd-run --checkpoint ENGINE writes the video (it wrote
    nothing before, reading the engine as latents-only), frame for frame what eager decodes."""
    from flashdreams.cli.run import main as run_main
    from flashdreams.video import read_video

    engine = flashdreams.load(inductor_dir)
    assert engine.makes_frames and engine.decoder is None
    assert not flashdreams.load(inductor_dir, decoder=None).makes_frames
    videos = {}
    for name, model in (("engine", ["--checkpoint", str(inductor_dir)]), ("eager", ["--preset", "tiny"])):
        out = tmp_path / f"{name}.mp4"
        assert run_main([*model, "--blocks", "2", "--seed", str(SEED), "--out", str(out), "--no-progress"]) == 0
        videos[name] = torch.from_numpy(read_video(out)).float()
    assert videos["engine"].shape == torch.cat([fr[0] for _, fr in eager_blocks[:2]]).shape
    err = (videos["engine"] - videos["eager"]).abs().mean()
    assert err < 1, f"mean |engine video - eager video| {err:.2f} levels"


def test_compile_workers_answer_after_warm_up():
    """A CUDA build starts Inductor's compile workers and waits for them first: until they answer,
    `use_process_pool` is False and Inductor compiles every kernel serially in the building process."""
    from torch._inductor import config
    from torch._inductor.async_compile import AsyncCompile

    from flashdreams.export.backends.inductor import warm_compile_workers

    with config.patch(compile_threads=2):
        warm_compile_workers(timeout_s=120)
        assert AsyncCompile.use_process_pool()


@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_weights_keep_their_layout_through_an_engine(tmp_path, dims):
    """A graph whose module holds a conv weight channels-last (an NHWC decoder's 2-D one, the NDHWC HD-map
    encoder's 3-D one) is traced with it so, stored contiguous, and loaded back channels-last: the compiled graph
    asserts its inputs' strides, so a weight fed back contiguous would be refused. The loaded graph gives the
    module's output."""
    from types import SimpleNamespace

    from torch import nn

    from flashdreams.export.backends.inductor import InductorBackend, channels_last_weight

    torch.manual_seed(0)
    conv, fmt = (nn.Conv2d, torch.channels_last) if dims == 2 else (nn.Conv3d, torch.channels_last_3d)
    net = nn.Sequential(conv(8, 8, 3, padding=1), nn.ReLU(), nn.Linear(6, 4)).eval()
    net[0].weight.data = net[0].weight.data.contiguous(memory_format=fmt)
    assert channels_last_weight(net[0].weight) and not channels_last_weight(net[2].weight)
    x = torch.randn(1, 8, *(4,) * (dims - 1), 6).contiguous(memory_format=fmt)
    prog = SimpleNamespace(name="g", module=net, fresh_inputs=lambda: (x.clone(),))
    cpu = torch.device("cpu")
    build = InductorBackend()
    build.begin_build(tmp_path, cpu)
    record, _ = build.build_graph(prog, tmp_path, cpu)
    assert record["channels_last"] == ["g.0.weight"]
    record["files"] = [{"file": f} for f in record["files"]]  # (as build_engine records them)
    produced = build.finish_build(tmp_path)
    load = InductorBackend()
    load.begin_load(tmp_path, {"engine": {}, "artifacts": {"weights": {"file": produced["weights"]}}}, cpu)
    fn = load.load_graph(tmp_path, "g", record, cpu)
    load.end_load()
    with torch.no_grad():
        torch.testing.assert_close(fn(x)[0], net(x))
