"""The C ABI (csrc/): status numbering, a C++ simulator host matching the Python API bit for bit,
every error path, a C program, and a Python host joining its own interpreter through ctypes.

The library and the hosts are built with CMake into a temporary folder (about a minute on a CPU).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import flashdreams
from flashdreams import errors

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
INPUT_EVERY = 2  # sim_host changes its input on ticks 0, 2, 4, ...


# ---- the status mapping (no build needed) ------------------------------------------------


def header_statuses() -> dict[str, int]:
    text = (CSRC / "include" / "flashdreams.h").read_text()
    enum = re.search(r"typedef enum fd_status \{(.*?)\} fd_status;", text, re.S).group(1)
    return {name: int(value) for name, value in re.findall(r"(FD_[A-Z_]+)\s*=\s*(\d+)\s*,", enum)}


def test_header_numbering_is_the_python_table():
    statuses = header_statuses()
    assert {k: statuses[k] for k in errors.STATUS_CODES} == errors.STATUS_CODES
    assert set(statuses) == set(errors.STATUS_CODES), "a status added in C must be added to STATUS_CODES too"


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (errors.InvalidArgumentError("x"), "FD_INVALID_ARGUMENT"),
        (errors.CheckpointError("x"), "FD_INVALID_ARGUMENT"),
        (errors.NotFoundError("x"), "FD_NOT_FOUND"),
        (errors.EngineIncompatibleError("x"), "FD_ENGINE_INCOMPATIBLE"),
        (errors.OutOfMemoryError("x"), "FD_OUT_OF_MEMORY"),
        (errors.DeviceError("x"), "FD_DEVICE_ERROR"),
        (errors.InternalError("x"), "FD_INTERNAL"),
        (errors.FlashDreamsError("x"), "FD_INTERNAL"),
        (MemoryError(), "FD_OUT_OF_MEMORY"),
        (ValueError("not ours"), "FD_INTERNAL"),
        (KeyError("not ours"), "FD_INTERNAL"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else v,
)
def test_each_exception_maps_to_its_c_status(exc, status):
    assert errors.status_of(exc) == errors.STATUS_CODES[status] == header_statuses()[status]


# ---- building ------------------------------------------------------------------------------


def _missing_tools() -> str | None:
    if shutil.which("cmake") is None and not (Path(sys.executable).parent / "cmake").is_file():
        return "cmake is not installed"
    if not any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++")):
        return "no C++ compiler (c++, g++, clang++)"
    if not any(shutil.which(c) for c in (os.environ.get("CC", "cc"), "gcc", "clang")):
        return "no C compiler (cc, gcc, clang)"
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return "pybind11 is not installed (pip install 'flashdreams[cabi]')"
    return None


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """libflashdreams installed into a prefix, then moved (the package must be relocatable),
    and sim_host / c_check built against the moved copy through find_package(flashdreams)."""
    why = _missing_tools()
    if why:
        pytest.skip(f"cannot build the C ABI: {why}")
    tmp = tmp_path_factory.mktemp("capi")
    _run([sys.executable, CSRC / "build.py", "--prefix", tmp / "prefix", "--build-dir", tmp / "lib", "--tests"])
    shutil.copytree(tmp / "prefix", tmp / "moved", symlinks=True)
    shutil.rmtree(tmp / "prefix")
    cmake = shutil.which("cmake") or str(Path(sys.executable).parent / "cmake")
    for host in ("sim_host", "c_check"):
        _run([cmake, "-S", CSRC / "examples" / host, "-B", tmp / host, f"-DCMAKE_PREFIX_PATH={tmp / 'moved'}"])
        _run([cmake, "--build", tmp / host])
    return {
        "dir": tmp,
        "lib": tmp / "moved" / "lib" / "libflashdreams.so",
        "sim_host": tmp / "sim_host" / "sim_host",
        "c_check": tmp / "c_check" / "c_check",
        "capi_errors": tmp / "lib" / "capi_errors",
    }


# ---- the hosts -----------------------------------------------------------------------------


def sim_host_prompt(phase: int) -> torch.Tensor:
    """sim_host's input for a phase: ((7 i + 13 phase) % 17 - 8) / 8 over the flat index i."""
    i = torch.arange(16 * 32)
    return ((((7 * i + 13 * phase) % 17) - 8).float() / 8).reshape(1, 16, 32)


@pytest.mark.slow
def test_sim_host_frames_are_identical_to_the_python_api(built):
    out, lat = built["dir"] / "frames.npy", built["dir"] / "latents.npy"
    p = _run([built["sim_host"], "--ticks", 4, "--seed", 0, "--out", out, "--latents", lat], cwd=built["dir"])
    assert len(re.findall(r"^tick \d+:.* step [\d.]+ ms", p.stdout, re.M)) == 4, p.stdout

    session = flashdreams.load().session(seed=0)
    frames, latents = [], []
    for tick in range(4):
        if tick % INPUT_EVERY == 0:
            session.set_input("prompt_embeds", sim_host_prompt(tick // INPUT_EVERY))
        result = session.step()
        latents.append(result.latents[0].cpu().numpy())
        frames.append(None if result.frames is None else result.frames_cpu()[0].numpy())
    assert np.array_equal(np.load(lat), np.stack(latents)), "latents differ from the Python API's"
    if frames[0] is None:
        pytest.skip("flashdreams.load() has no decoder in this build, so there are no frames to compare")
    got = np.load(out)
    assert got.dtype == np.uint8 and got.shape == np.concatenate(frames).shape
    assert np.array_equal(got, np.concatenate(frames)), "frames differ from the Python API's"


@pytest.mark.slow
def test_sim_host_rewinds_through_a_snapshot(built):
    """sim_host --rewind K: fd_session_save before tick K, then fd_session_load after the last tick and
    ticks K.. again, whose frames and latents the host checks against the first run's, byte for byte; the
    same through an in-memory snapshot handle (fd_session_snapshot / fd_session_restore)."""
    snap = built["dir"] / "sim_host_snapshot.safetensors"
    p = _run([built["sim_host"], "--ticks", 4, "--rewind", 2, "--snapshot", snap], cwd=built["dir"])
    assert "rewind: ticks 2..3 again from the file snapshot before tick 2: identical" in p.stdout, p.stdout
    assert snap.is_file()
    p = _run([built["sim_host"], "--ticks", 4, "--rewind", 1, "--in-memory"], cwd=built["dir"])  # no file
    assert "rewind: ticks 1..3 again from the in-memory snapshot before tick 1: identical" in p.stdout, p.stdout


@pytest.mark.slow
def test_sim_host_renews_its_session_for_the_next_user(built):
    """sim_host --renew 1 --renew-seed 5: after tick 0 with its own prompt, fd_session_renew hands the session
    to a next user; ticks 1..3 must be those of a session created with seed 5 (the model's default prompt until
    the schedule sets one at tick 2), bit for bit: the first user's prompt and seed are gone."""
    lat, out = built["dir"] / "renew-latents.npy", built["dir"] / "renew-frames.npy"
    p = _run(
        [built["sim_host"], "--ticks", 4, "--renew", 1, "--renew-seed", 5, "--latents", lat, "--out", out],
        cwd=built["dir"],
    )
    assert "renew: before tick 1, seed 5" in p.stdout, p.stdout
    both = subprocess.run(
        [str(built["sim_host"]), "--renew", "1", "--rewind", "1"], cwd=built["dir"], capture_output=True, text=True
    )
    assert both.returncode == 2 and "--renew and --rewind" in both.stderr, both.stderr
    engine = flashdreams.load()
    first, nxt = engine.session(seed=0), engine.session(seed=5)
    first.set_input("prompt_embeds", sim_host_prompt(0))
    results = [first.step()]
    for tick in range(1, 4):
        if tick % INPUT_EVERY == 0:
            nxt.set_input("prompt_embeds", sim_host_prompt(tick // INPUT_EVERY))
        results.append(nxt.step())
    want = np.stack([r.latents[0].cpu().numpy() for r in results])
    got = np.load(lat)
    assert np.array_equal(got, want), "the renewed session's latents differ from a new session's"
    # The test can fail: had the first user's prompt stayed, tick 1 would differ from the new session's.
    stale = engine.session(seed=5)
    stale.set_input("prompt_embeds", sim_host_prompt(0))
    assert not np.array_equal(stale.step().latents[0].cpu().numpy(), want[1])
    if results[0].frames is not None:
        frames = np.concatenate([r.frames_cpu()[0].numpy() for r in results])
        assert np.array_equal(np.load(out), frames), "the renewed session's frames differ from a new session's"


@pytest.mark.parametrize("preset", ["arena", "matrix-game-2-tiny"])
def test_the_same_calls_drive_a_keyboard_world(built, preset):
    """sim_host --input keyboard: the calls that steer the prompt model steer a keyboard world (the arena,
    Matrix-Game): each phase presses the keys (7 i + 13 phase) % 17 >= 9, bit for bit as in Python."""
    lat = built["dir"] / f"latents-{preset}.npy"
    args = ["--ticks", 3, "--preset", preset, "--input", "keyboard", "--latents", lat, "--out", built["dir"] / "f.npy"]
    _run([built["sim_host"], *args], cwd=built["dir"])
    session = flashdreams.load(preset=preset, device="cpu").session(seed=0)
    shape = session.plan.inputs["keyboard"].shape
    i = torch.arange(int(np.prod(shape)))
    latents = []
    for tick in range(3):
        if tick % INPUT_EVERY == 0:
            keys = ((7 * i + 13 * (tick // INPUT_EVERY)) % 17 >= 9).float().reshape(shape)
            session.set_input("keyboard", keys)
        latents.append(session.step().latents[0].numpy())
    assert np.array_equal(np.load(lat), np.stack(latents)), "latents differ from the Python API's"


@pytest.mark.slow
def test_sim_host_plays_a_built_engine(built):
    """sim_host --engine DIR: the host opens an fd-build engine (the arena's) by path and steps it as
    Python steps the same engine, bit for bit; a missing directory is FD_NOT_FOUND naming it."""
    from flashdreams.export.build import build_engine

    engine_dir = built["dir"] / "arena-engine"
    build_engine(engine_dir, preset="arena", backend="inductor", device="cpu")
    lat = built["dir"] / "latents-engine.npy"
    args = [
        "--ticks",
        3,
        "--engine",
        engine_dir,
        "--input",
        "keyboard",
        "--latents",
        lat,
        "--out",
        built["dir"] / "e.npy",
    ]
    _run([built["sim_host"], *args], cwd=built["dir"])
    session = flashdreams.load(engine_dir).session(seed=0)
    shape = session.plan.inputs["keyboard"].shape
    i = torch.arange(int(np.prod(shape)))
    latents = []
    for tick in range(3):
        if tick % INPUT_EVERY == 0:
            session.set_input("keyboard", ((7 * i + 13 * (tick // INPUT_EVERY)) % 17 >= 9).float().reshape(shape))
        latents.append(session.step().latents[0].numpy())
    assert np.array_equal(np.load(lat), np.stack(latents)), "latents differ from the Python API's"
    missing = subprocess.run(
        [str(built["sim_host"]), "--engine", str(built["dir"] / "nowhere")], capture_output=True, text=True
    )
    assert missing.returncode == 1 and "FD_NOT_FOUND" in missing.stderr and "nowhere" in missing.stderr


def test_sim_host_plays_an_fp8_engine_and_rewinds_it(built):
    """An FP8 engine (fd-build --precision fp8: the ring's e4m3 shadow is session state) through the C ABI: sim_host
    steps it as Python steps the same engine, bit for bit, and rewinds it through a file snapshot (the e4m3 state
    saved and loaded) to identical ticks."""
    from flashdreams.export.build import build_engine
    from flashdreams.kernels import triton_available

    if not triton_available("cpu"):
        pytest.skip("the FP8 kernels run on a CPU only under TRITON_INTERPRET=1")
    engine_dir = built["dir"] / "fp8-engine"
    build_engine(engine_dir, attention="triton", precision="fp8", backend="inductor", device="cpu", decoder=None)
    lat = built["dir"] / "latents-fp8.npy"
    _run([built["sim_host"], "--ticks", 3, "--engine", engine_dir, "--latents", lat, "--out", built["dir"] / "f8.npy"])
    engine = flashdreams.load(engine_dir)
    assert engine.precision == "fp8"
    session = engine.session(seed=0)
    latents = []
    for tick in range(3):
        if tick % INPUT_EVERY == 0:
            session.set_input("prompt_embeds", sim_host_prompt(tick // INPUT_EVERY))
        latents.append(session.step().latents[0].numpy())
    assert np.array_equal(np.load(lat), np.stack(latents)), "latents differ from the Python API's"
    snap = built["dir"] / "fp8-snapshot.safetensors"
    p = _run([built["sim_host"], "--engine", engine_dir, "--ticks", 3, "--rewind", 1, "--snapshot", snap])
    assert "rewind: ticks 1..2 again from the file snapshot before tick 1: identical" in p.stdout, p.stdout


def python_inputs(session) -> list[dict]:
    """What Python says the session takes: input_specs() (name, shape, dtype, when), or only the
    names from input_names() on a session that predates input_specs()."""
    if not hasattr(session, "input_specs"):
        return [{"name": n} for n in session.input_names()]
    return [{"name": s.name, "shape": tuple(s.shape), "dtype": s.dtype, "when": s.when} for s in session.input_specs()]


SIM_HOST_INPUT = re.compile(
    r"^input (?P<i>\d+): (?P<name>\S+) (?P<dtype>\S*) \[(?P<shape>[\d, ]*)\] when=(?P<when>\S*) ", re.M
)


@pytest.mark.slow
def test_sim_host_lists_the_inputs_python_reports(built):
    p = _run([built["sim_host"], "--ticks", 0], cwd=built["dir"])
    listed = [m.groupdict() for m in SIM_HOST_INPUT.finditer(p.stdout)]
    count = re.search(r"^session inputs: (\d+)$", p.stdout, re.M)
    assert count and int(count.group(1)) == len(listed) >= 1, p.stdout
    assert [int(m["i"]) for m in listed] == list(range(len(listed))), p.stdout

    session = flashdreams.load().session(seed=0)
    want = python_inputs(session)
    got = [
        {"name": m["name"], "shape": tuple(int(d) for d in m["shape"].split(",") if d.strip()), "dtype": m["dtype"],
         "when": m["when"]}
        for m in listed
    ]  # fmt: skip
    assert [g["name"] for g in got] == [w["name"] for w in want], p.stdout
    bounds = {s.name: (s.low, s.high) for s in session.input_specs()} if hasattr(session, "input_specs") else {}
    for g, w in zip(got, want):
        assert {k: g[k] for k in w} == w, f"sim_host lists {g}, Python says {w}"
        # Whatever the C ABI reports, the session must accept: a tensor of that shape and dtype.
        low, high = bounds.get(g["name"], (None, None))
        fill = min(max(0.0, low if low is not None else 0.0), high if high is not None else float("inf"))
        session.set_input(g["name"], torch.full(g["shape"], fill, dtype=getattr(torch, g["dtype"])))


# Every case capi_errors runs, with the status it must return (checked here, not only by the driver).
OK, BAD, MISSING, INCOMPATIBLE = "FD_OK", "FD_INVALID_ARGUMENT", "FD_NOT_FOUND", "FD_ENGINE_INCOMPATIBLE"
ERROR_CASES = {
    "check_version_ok": OK, "check_version_wrong_major": INCOMPATIBLE, "check_version_newer_minor": INCOMPATIBLE,
    "engine_open_null_out": BAD, "engine_open_empty_path": BAD, "engine_open_missing_dir": MISSING,
    "engine_open_unknown_preset": MISSING, "engine_open_bad_dtype": BAD, "engine_open_struct_size_zero": BAD,
    "engine_open_struct_size_newer": BAD, "engine_open": OK,
    "session_create_null_engine": BAD, "session_create_null_out": BAD, "session_create_foreign_handle": BAD,
    "session_create_missing_prompt_file": MISSING, "session_create_prompt_and_file": BAD,
    "session_create_prompt_wrong_dim": BAD, "session_create_prompt_file": OK, "session_destroy_from_file": OK,
    "session_create": OK,
    "input_count_null_session": BAD, "input_count_null_out": BAD, "input_count_engine_as_session": BAD,
    "input_count": OK, "input_info_null_session": BAD, "input_info_null_out": BAD, "input_info_dead_session": BAD,
    "input_info_index_negative": BAD, "input_info_index_past_end": BAD, "input_info_index_max": BAD,
    "input_info_struct_size_zero": BAD, "input_info_struct_size_newer": BAD, "input_info": OK,
    "input_info_older_struct": OK, "input_find_null_session": BAD, "input_find_null_name": BAD,
    "input_find_null_out": BAD, "input_find_unknown": MISSING, "input_find": OK,
    "set_input_null_session": BAD, "set_input_engine_as_session": BAD, "set_input_null_name": BAD,
    "set_input_null_view": BAD, "set_input_unknown_name": BAD, "set_input_wrong_last_dim": BAD,
    "set_input_int32": BAD, "set_input_bad_dtype_enum": BAD, "set_input_null_data": BAD,
    "set_input_negative_ndim": BAD, "set_input_bad_memory": BAD, "set_input": OK,
    "frame_info_before_step": BAD, "step_null": BAD, "step": OK, "frame_info": OK, "frame_info_null_out": BAD,
    "read_frames_null_dst": BAD, "read_frames_too_small": BAD, "read_frames_bad_memory": BAD, "read_frames": OK,
    "latent_info": OK, "read_latents_too_small": BAD, "read_latents": OK, "warm_up_past_block_0": BAD,
    "renew_null": BAD, "renew_struct_size_zero": BAD, "renew_prompt_and_file": BAD, "renew_prompt_wrong_dim": BAD,
    "renew_missing_prompt_file": MISSING, "renew_refused_keeps_last_block": OK, "renew": OK,
    "latent_info_after_renew": BAD, "renew_null_options": OK, "step_after_renew": OK,
    "reset_null": BAD, "reset": OK, "latent_info_after_reset": BAD, "warm_up_null": BAD, "warm_up": OK,
    "warm_up_took_time": OK,
    "save_null": BAD, "save_null_path": BAD, "save_empty_path": BAD, "save": OK, "load_missing": MISSING,
    "load_not_a_snapshot": BAD, "load": OK, "load_other_model": INCOMPATIBLE, "save_after_destroy": BAD,
    "snapshot_null_out": BAD, "snapshot_bad_memory": BAD,
    "snapshot_null_session": BAD, "snapshot": OK, "snapshot_info": OK, "snapshot_info_values": OK,
    "snapshot_info_null_outs": OK, "restore_null_snapshot": BAD, "restore": OK, "snapshot_destroy": OK,
    "snapshot_destroy_twice": BAD, "restore_destroyed_snapshot": BAD, "snapshot_info_destroyed": BAD,
    "snapshot_destroy_null": OK, "restore_other_model": INCOMPATIBLE, "snapshot_outlives_its_session": OK,
    "session_create_second": OK, "engine_destroy": OK, "engine_destroy_twice": BAD,
    "session_create_destroyed_engine": BAD, "step_on_thread_after_engine_destroy": OK,
    "session_destroy": OK, "step_after_destroy": BAD, "frame_info_after_destroy": BAD,
    "set_input_after_destroy": BAD, "input_count_after_destroy": BAD, "input_info_after_destroy": BAD,
    "session_destroy_twice": BAD, "session_destroy_other": OK,
    "session_destroy_null": OK, "engine_destroy_null": OK,
}  # fmt: skip


@pytest.mark.slow
def test_capi_errors_every_case_returns_its_status(built):
    from safetensors.torch import save_file

    prompt_file = built["dir"] / "prompt.safetensors"
    save_file({"prompt_embeds": sim_host_prompt(3)}, str(prompt_file))
    p = subprocess.run(
        [str(built["capi_errors"]), "--prompt-file", str(prompt_file), "--snapshot-dir", str(built["dir"])],
        capture_output=True,
        text=True,
        timeout=600,
    )
    cases = {
        m["name"]: m for m in re.finditer(r"^case=(?P<name>\S+) expected=(?P<want>\S+) got=(?P<got>\S+) "
                                          r"result=(?P<result>\S+) message=(?P<msg>.*)$", p.stdout, re.M)
    }  # fmt: skip
    assert set(cases) == set(ERROR_CASES), f"cases missing or unexpected:\n{p.stdout}\n{p.stderr}"
    no_decoder = flashdreams.load().decoder is None
    for name, want in ERROR_CASES.items():
        case = cases[name]
        if case["result"] == "SKIP":
            assert no_decoder and "frame" in name, f"{name} was skipped: {case['msg']}"
            continue
        assert case["got"] == want, f"{name}: expected {want}, got {case['got']}: {case['msg']}"
        assert case["result"] == "PASS", f"{name}: {case.group(0)}"
        assert (want == OK) == (case["msg"] == ""), f"{name}: message {case['msg']!r}"
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


@pytest.mark.slow
def test_c_program_checks_the_version_and_opens_an_engine(built):
    p = _run([built["c_check"]])
    assert "engine opened and destroyed" in p.stdout
    assert re.search(r"^c_check: input prompt_embeds \S+, rank \d+$", p.stdout, re.M), p.stdout


PYTHON_HOST = """
import ctypes, sys
import flashdreams  # the host is Python: the library must join this interpreter, not start one
lib = ctypes.CDLL(sys.argv[1])
lib.fd_last_error.restype = ctypes.c_char_p
assert lib.fd_check_version(ctypes.c_uint32(lib.fd_api_version())) == 0
eng, sess = ctypes.c_void_p(), ctypes.c_void_p()
assert lib.fd_engine_open(None, None, ctypes.byref(eng)) == 0, lib.fd_last_error()
assert lib.fd_session_create(eng, None, ctypes.byref(sess)) == 0, lib.fd_last_error()
assert lib.fd_session_step(sess) == 0, lib.fd_last_error()
dims = [ctypes.c_int64() for _ in range(4)]
assert lib.fd_session_latent_info(sess, *[ctypes.byref(d) for d in dims]) == 0, lib.fd_last_error()
n = dims[0].value * dims[1].value * dims[2].value * dims[3].value
host = (ctypes.c_float * n)()
assert lib.fd_session_read_latents(sess, host, ctypes.c_size_t(4 * n), 0) == 0, lib.fd_last_error()
if "--device" in sys.argv:  # FD_MEMORY_DEVICE: frames and latents into CUDA memory
    import torch
    dev = torch.empty(n, dtype=torch.float32, device="cuda")
    assert lib.fd_session_read_latents(sess, ctypes.c_void_p(dev.data_ptr()), ctypes.c_size_t(4 * n), 1) == 0
    assert torch.equal(dev.cpu(), torch.tensor(list(host))), "device read differs from host read"
    t = [ctypes.c_int64() for _ in range(4)]
    assert lib.fd_session_frame_info(sess, *[ctypes.byref(d) for d in t]) == 0, lib.fd_last_error()
    nb = t[0].value * t[1].value * t[2].value * t[3].value
    fh, fd = (ctypes.c_uint8 * nb)(), torch.empty(nb, dtype=torch.uint8, device="cuda")
    assert lib.fd_session_read_frames(sess, fh, ctypes.c_size_t(nb), 0) == 0, lib.fd_last_error()
    assert lib.fd_session_read_frames(sess, ctypes.c_void_p(fd.data_ptr()), ctypes.c_size_t(nb), 1) == 0
    assert torch.equal(fd.cpu(), torch.frombuffer(bytearray(fh), dtype=torch.uint8))
assert lib.fd_session_destroy(sess) == 0 and lib.fd_engine_destroy(eng) == 0
print("python host ok", n)
"""


INPUTS_HOST = """
import ctypes, re, sys
import flashdreams
from flashdreams.models.family import InputSpec

class InputInfo(ctypes.Structure):  # fd_input_info
    _fields_ = [("struct_size", ctypes.c_size_t), ("name", ctypes.c_char_p), ("dtype_name", ctypes.c_char_p),
                ("dtype", ctypes.c_int32), ("ndim", ctypes.c_int32), ("shape", ctypes.c_int64 * 8),
                ("meaning", ctypes.c_char_p), ("units", ctypes.c_char_p), ("has_low", ctypes.c_int32),
                ("low", ctypes.c_double), ("has_high", ctypes.c_int32), ("high", ctypes.c_double),
                ("when", ctypes.c_char_p)]

lib = ctypes.CDLL(sys.argv[1])
lib.fd_last_error.restype = ctypes.c_char_p
err = lambda: lib.fd_last_error().decode()
FD_OK, FD_INVALID_ARGUMENT, FD_NOT_FOUND, FD_ENGINE_INCOMPATIBLE = 0, 1, 2, 3
eng = ctypes.c_void_p()
assert lib.fd_engine_open(None, None, ctypes.byref(eng)) == FD_OK, err()

def new_session():
    s = ctypes.c_void_p()
    assert lib.fd_session_create(eng, None, ctypes.byref(s)) == FD_OK, err()
    return s

def c_inputs(s):
    n = ctypes.c_int32(-1)
    assert lib.fd_session_input_count(s, ctypes.byref(n)) == FD_OK, err()
    out = []
    for i in range(n.value):
        info = InputInfo(struct_size=ctypes.sizeof(InputInfo))
        assert lib.fd_session_input_info(s, i, ctypes.byref(info)) == FD_OK, err()
        assert err() == ""
        out.append({
            "name": info.name.decode(), "dtype": info.dtype_name.decode(), "fd_dtype": info.dtype,
            "shape": tuple(info.shape[:info.ndim]), "pad": tuple(info.shape[info.ndim:]),
            "meaning": info.meaning.decode(), "units": info.units.decode(),
            "low": info.low if info.has_low else None, "high": info.high if info.has_high else None,
            "low0": info.low, "high0": info.high, "when": info.when.decode()})
        index = ctypes.c_int32(-1)
        assert lib.fd_session_input_find(s, info.name, ctypes.byref(index)) == FD_OK and index.value == i, err()
    return out

# The layout ctypes uses here is the library's: a struct_size one past it names the size it knows.
info = InputInfo(struct_size=ctypes.sizeof(InputInfo) + 1)
s = new_session()
assert lib.fd_session_input_info(s, 0, ctypes.byref(info)) == FD_INVALID_ARGUMENT
assert f"knows {ctypes.sizeof(InputInfo)} bytes" in err(), err()

# 1. The built-in model: what Python reports.
session = flashdreams.load().session(seed=0)
got = c_inputs(s)
if hasattr(session, "input_specs"):
    want = [(p.name, tuple(p.shape), p.dtype, p.meaning, p.units, p.low, p.high, p.when) for p in session.input_specs()]
    assert [(g["name"], g["shape"], g["dtype"], g["meaning"], g["units"], g["low"], g["high"], g["when"])
            for g in got] == want, (got, want)
else:  # a session before input_specs(): the names
    assert [g["name"] for g in got] == session.input_names(), got
n = len(got)
for bad in (n, n + 7, -1):
    info = InputInfo(struct_size=ctypes.sizeof(InputInfo))
    assert lib.fd_session_input_info(s, bad, ctypes.byref(info)) == FD_INVALID_ARGUMENT
    assert f"index {bad} is out of range" in err() and info.name is None, err()

# 2. Every field, through a session whose model declares these inputs.
SPECS = [
    InputSpec("throttle", (1,), "float32", "pedal position", "fraction", low=0.0, high=1.0),
    InputSpec("steer", (2, 3), "bfloat16", "Lenkwinkel \u00b0", "rad", low=-0.5),
    InputSpec("gear", (), "int64", "", "", high=5.0),
    InputSpec("start", (1, 16, 1, 8, 8, 1, 1, 2), "float64", "start latents", "latent", when="reset"),
]
flashdreams.Session.input_specs = lambda self: SPECS
s2 = new_session()
got = c_inputs(s2)
codes = {"float32": 1, "bfloat16": 3, "int64": 6, "float64": 0}
assert [(g["name"], g["shape"], g["dtype"], g["fd_dtype"], g["meaning"], g["units"], g["low"], g["high"],
         g["when"]) for g in got] == [(p.name, p.shape, p.dtype, codes[p.dtype], p.meaning, p.units, p.low, p.high,
                                        p.when) for p in SPECS], got
assert all(set(g["pad"]) <= {0} for g in got) and got[1]["high0"] == 0.0 and got[2]["low0"] == 0.0, got
index = ctypes.c_int32(7)
assert lib.fd_session_input_find(s2, b"prompt_embeds", ctypes.byref(index)) == FD_NOT_FOUND and index.value == -1
assert "'prompt_embeds'" in err() and "throttle, steer, gear, start" in err(), err()
# Strings live as long as the session: the struct read before stays readable after more calls.
first = InputInfo(struct_size=ctypes.sizeof(InputInfo))
assert lib.fd_session_input_info(s2, 1, ctypes.byref(first)) == FD_OK
for _ in range(3):
    c_inputs(s2)
assert first.name == b"steer" and first.meaning.decode() == "Lenkwinkel \u00b0"

# 3. A model input of more than FD_MAX_DIMS dimensions cannot be described.
flashdreams.Session.input_specs = lambda self: [InputSpec("deep", (1,) * 9)]
s3 = new_session()
count = ctypes.c_int32(5)
assert lib.fd_session_input_count(s3, ctypes.byref(count)) == FD_ENGINE_INCOMPATIBLE and count.value == 0
assert "'deep'" in err() and "9 dimensions" in err(), err()

for h in (s, s2, s3):
    assert lib.fd_session_destroy(h) == FD_OK
assert lib.fd_engine_destroy(eng) == FD_OK
print("inputs host ok", n)
"""


WORLDS_HOST = """
import ctypes, sys
import numpy as np
import torch
import flashdreams

lib = ctypes.CDLL(sys.argv[1])
lib.fd_last_error.restype = ctypes.c_char_p
err = lambda: lib.fd_last_error().decode()
FD_OK, FD_INVALID_ARGUMENT, FD_NOT_FOUND, ALL = 0, 1, 2, -1

class EngineOptions(ctypes.Structure):  # fd_engine_options
    _fields_ = [("struct_size", ctypes.c_size_t), ("device", ctypes.c_char_p), ("dtype", ctypes.c_char_p),
                ("preset", ctypes.c_char_p), ("attention", ctypes.c_char_p)]

class WorldsOptions(ctypes.Structure):  # fd_worlds_options
    _fields_ = [("struct_size", ctypes.c_size_t), ("count", ctypes.c_int32), ("seeds", ctypes.POINTER(ctypes.c_uint64))]

class View(ctypes.Structure):  # fd_tensor_view
    _fields_ = [("data", ctypes.c_void_p), ("dtype", ctypes.c_int), ("ndim", ctypes.c_int32),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("memory", ctypes.c_int), ("device_index", ctypes.c_int32)]

def view(a):  # a float32 numpy array, kept alive by the caller
    shape = (ctypes.c_int64 * a.ndim)(*a.shape)
    v = View(a.ctypes.data, 1, a.ndim, shape, 0, 0)
    v._keep = (a, shape)
    return v

eng = ctypes.c_void_p()
opts = EngineOptions(ctypes.sizeof(EngineOptions), b"cpu", None, b"arena", None)
assert lib.fd_engine_open(None, ctypes.byref(opts), ctypes.byref(eng)) == FD_OK, err()
seeds = (ctypes.c_uint64 * 3)(5, 6, 7)
w = ctypes.c_void_p()
assert lib.fd_worlds_create(eng, ctypes.byref(WorldsOptions(ctypes.sizeof(WorldsOptions), 3, seeds)),
                            ctypes.byref(w)) == FD_OK, err()
count = ctypes.c_int32()
assert lib.fd_worlds_count(w, ctypes.byref(count)) == FD_OK and count.value == 3, err()
assert lib.fd_worlds_world_state(w, 0, None, None, None) == FD_INVALID_ARGUMENT and "no step yet" in err()

py = flashdreams.load(preset="arena", device="cpu").worlds(3, seeds=[5, 6, 7])  # the same calls in Python
shape = py.input_specs()[[s.name for s in py.input_specs()]. index("keyboard")].shape[1:]
g = np.random.default_rng(0)
keys = lambda n: (g.random((n, *shape)) < 0.3).astype(np.float32)

def c_frames(world, n):
    t = [ctypes.c_int64() for _ in range(4)]
    assert lib.fd_worlds_frame_info(w, *[ctypes.byref(d) for d in t]) == FD_OK, err()
    size = n * int(np.prod([d.value for d in t]))
    buf = (ctypes.c_uint8 * size)()
    assert lib.fd_worlds_read_frames(w, world, buf, ctypes.c_size_t(size), 0) == FD_OK, err()
    assert lib.fd_worlds_read_frames(w, world, buf, ctypes.c_size_t(size - 1), 0) == FD_INVALID_ARGUMENT
    assert "fd_worlds_frame_info" in err(), err()
    return np.frombuffer(buf, dtype=np.uint8).reshape(n, *[d.value for d in t]) if world == ALL else \
        np.frombuffer(buf, dtype=np.uint8).reshape(*[d.value for d in t])

def c_state(world):
    block, failed, pad = ctypes.c_int64(-1), ctypes.c_int32(-1), ctypes.c_int64(-1)
    assert lib.fd_worlds_world_state(w, world, ctypes.byref(block), ctypes.byref(failed), ctypes.byref(pad)) == FD_OK
    return block.value, failed.value, pad.value

# 1. All worlds' keys at once, two steps: every world's frames as Python's, bit for bit.
failed = ctypes.c_int32(-1)
for _ in range(2):
    k = keys(3)
    assert lib.fd_worlds_set_input(w, ALL, b"keyboard", ctypes.byref(view(k))) == FD_OK, err()
    py.set_inputs("keyboard", torch.from_numpy(k))
    assert lib.fd_worlds_step(w, ctypes.byref(failed)) == FD_OK and failed.value == 0, err()
    want = py.step().frames_cpu().numpy()
    assert np.array_equal(c_frames(ALL, 3), want)
assert [c_state(i) for i in range(3)] == [(1, 0, 0)] * 3

# 2. World 1 reset with a new seed while the others go on; world 2 alone gets new keys.
assert lib.fd_worlds_reset(w, 1, ctypes.c_uint64(9)) == FD_OK, err()
py.reset(py.ids[1], seed=9)
k = keys(1)
assert lib.fd_worlds_set_input(w, 2, b"keyboard", ctypes.byref(view(k))) == FD_OK, err()
py.set_input(py.ids[2], "keyboard", torch.from_numpy(k))
assert lib.fd_worlds_step(w, None) == FD_OK, err()
want = py.step().frames_cpu().numpy()
assert [c_state(i)[0] for i in range(3)] == [2, 0, 2]  # worlds at different blocks share the batch
for i in range(3):
    assert np.array_equal(c_frames(i, 1), want[i])

# 3. A bad row: the others take their keys, the call names the world that keeps its old ones.
k = keys(3)
k[1, 0, 0] = np.nan
assert lib.fd_worlds_set_input(w, ALL, b"keyboard", ctypes.byref(view(k))) == FD_INVALID_ARGUMENT
assert "world(s) [1]" in err() and "keyboard" in err(), err()
assert py.set_inputs("keyboard", torch.from_numpy(k)) and lib.fd_worlds_step(w, None) == FD_OK
assert np.array_equal(c_frames(ALL, 3), py.step().frames_cpu().numpy())

# 3b. Snapshots (API 1.4): world 0 saved to a file and loaded into world 2 (a branch), as Python's restore.
snap = sys.argv[2].encode()
assert lib.fd_worlds_save(w, 0, snap) == FD_OK, err()
assert lib.fd_worlds_load(w, 2, snap) == FD_OK, err()
py.restore(py.ids[2], py.snapshot(py.ids[0]))
assert lib.fd_worlds_step(w, None) == FD_OK, err()
want = py.step().frames_cpu().numpy()
assert np.array_equal(c_frames(ALL, 3), want) and c_state(2)[0] == c_state(0)[0]
assert lib.fd_worlds_load(w, 1, snap + b".missing") == FD_NOT_FOUND and "does not exist" in err(), err()
assert lib.fd_worlds_save(w, 5, snap) == FD_INVALID_ARGUMENT and "out of range" in err(), err()
assert lib.fd_worlds_save(w, 0, None) == FD_INVALID_ARGUMENT and "path" in err(), err()
# the same branch in memory: world 1's state into world 0 through a snapshot handle, freed after
mem = ctypes.c_void_p()
assert lib.fd_worlds_snapshot(w, 1, 1, ctypes.byref(mem)) == FD_OK and mem.value, err()
assert lib.fd_worlds_restore(w, 0, mem) == FD_OK, err()
py.restore(py.ids[0], py.snapshot(py.ids[1]))
assert lib.fd_snapshot_destroy(mem) == FD_OK and lib.fd_worlds_restore(w, 0, mem) == FD_INVALID_ARGUMENT
assert lib.fd_worlds_step(w, None) == FD_OK, err()
assert np.array_equal(c_frames(ALL, 3), py.step().frames_cpu().numpy())

# 4. Errors, each named, none of them changing anything.
assert lib.fd_worlds_set_input(w, ALL, b"keyboard", ctypes.byref(view(keys(2)))) == FD_INVALID_ARGUMENT
assert lib.fd_worlds_set_input(w, 3, b"keyboard", ctypes.byref(view(keys(1)))) == FD_INVALID_ARGUMENT
assert "world 3 is out of range: the worlds are 0..2" in err(), err()
assert lib.fd_worlds_set_input(w, 0, b"steering", ctypes.byref(view(keys(1)))) != FD_OK and "steering" in err()
assert lib.fd_worlds_reset(w, -2, ctypes.c_uint64(0)) == FD_INVALID_ARGUMENT and "out of range" in err()
assert lib.fd_worlds_set_input(None, 0, b"keyboard", None) == FD_INVALID_ARGUMENT and "worlds is NULL" in err()
bad = ctypes.c_void_p(1)
assert lib.fd_worlds_create(eng, ctypes.byref(WorldsOptions(ctypes.sizeof(WorldsOptions), 0, None)),
                            ctypes.byref(bad)) == FD_INVALID_ARGUMENT and bad.value is None and "count is 0" in err()
assert lib.fd_worlds_destroy(w) == FD_OK and lib.fd_worlds_destroy(None) == FD_OK
assert lib.fd_worlds_step(w, None) == FD_INVALID_ARGUMENT and "fd_worlds_create" in err(), err()
assert lib.fd_engine_destroy(eng) == FD_OK
print("worlds host ok")
"""


@pytest.mark.slow
def test_worlds_through_the_c_abi_match_the_python_worlds(built):
    """fd_worlds_*: N arena worlds stepped in one batch through the C ABI give Python's Worlds frames bit for bit,
    with a world reset mid-run (worlds at different blocks), per-world inputs, a refused row named, and errors."""
    script = built["dir"] / "worlds_host.py"
    script.write_text(textwrap.dedent(WORLDS_HOST))
    p = _run([sys.executable, script, built["lib"], built["dir"] / "world.safetensors"], timeout=600)
    assert "worlds host ok" in p.stdout


@pytest.mark.slow
def test_input_discovery_reports_every_field(built):
    script = built["dir"] / "inputs_host.py"
    script.write_text(textwrap.dedent(INPUTS_HOST))
    p = _run([sys.executable, script, built["lib"]], timeout=600)
    assert "inputs host ok" in p.stdout


@pytest.mark.slow
def test_python_host_joins_its_own_interpreter(built):
    p = _run([sys.executable, "-c", textwrap.dedent(PYTHON_HOST), built["lib"]], timeout=600)
    assert "python host ok" in p.stdout


@pytest.mark.gpu
@pytest.mark.slow
def test_device_memory_reads_match_host_reads(built):
    p = _run([sys.executable, "-c", textwrap.dedent(PYTHON_HOST), built["lib"], "--device"], timeout=600)
    assert "python host ok" in p.stdout
