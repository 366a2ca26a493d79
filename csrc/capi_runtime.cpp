// The embedded Python runtime behind the C ABI: one interpreter per process,
// started on first use (or the host's own, if the host is Python), never
// finalized (importing torch makes teardown crash; see engine_anchors.md, B.12).
// The GIL is taken only while calling into Python.
#include "capi_runtime.h"

#include "capi_args.h"

#include <pybind11/eval.h>

#include <cstdint>
#include <cstdlib>
#include <new>
#include <unordered_map>

#ifndef _WIN32
#include <dlfcn.h>
#include <unistd.h>
#endif

#ifndef FD_DEFAULT_PYTHON
#define FD_DEFAULT_PYTHON ""
#endif
#ifndef FD_DEFAULT_SITE_PACKAGES
#define FD_DEFAULT_SITE_PACKAGES ""
#endif

namespace fdcapi {

namespace {

// Runs inside the interpreter as module `flashdreams._capi_glue`: turns caller
// memory into tensors and back, and exceptions into (status, message).
const char* const kGlueSource = R"PY(
import ctypes
import math
import traceback
from pathlib import Path

import torch

import flashdreams
from flashdreams import errors
from flashdreams.errors import InvalidArgumentError, NotFoundError

DTYPES = {1: torch.float32, 2: torch.float16, 3: torch.bfloat16, 4: torch.uint8, 5: torch.int32, 6: torch.int64}
HOST, DEVICE = 0, 1
_side_streams = {}


class _CudaBytes:
    """Raw CUDA memory, in the form torch.as_tensor wraps without a copy."""

    def __init__(self, ptr, nbytes):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3}


def _raw(ptr, nbytes, memory, device_index=None):
    """`nbytes` of caller memory at `ptr` as a uint8 tensor (no copy)."""
    if memory == HOST:
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(ptr), dtype=torch.uint8)
    if not torch.cuda.is_available():
        raise InvalidArgumentError(
            "FD_MEMORY_DEVICE was given, but torch sees no CUDA device in this process; pass FD_MEMORY_HOST memory"
        )
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8, device=f"cuda:{device_index or 0}")
    t = torch.as_tensor(_CudaBytes(ptr, nbytes))
    if device_index is not None and t.device.index != device_index:
        raise InvalidArgumentError(f"the view says device_index={device_index}, but its memory is on {t.device}")
    return t


def tensor_from_view(ptr, dtype, shape, memory, device_index):
    """A copy of a host or device view, so the caller may reuse its buffer at once."""
    dt = DTYPES[dtype]
    t = _raw(ptr, math.prod(shape) * dt.itemsize, memory, device_index).view(dt).reshape(shape).clone()
    if t.is_cuda:
        torch.cuda.current_stream(t.device).synchronize()
    return t


def load_prompt_file(path):
    p = Path(path)
    if not p.is_file():
        raise NotFoundError(f"prompt embeddings file '{p}' does not exist")
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(p))
    except Exception as e:
        raise InvalidArgumentError(f"prompt embeddings file '{p}' is not a readable .safetensors file ({e})") from e
    if "prompt_embeds" in tensors:
        return tensors["prompt_embeds"]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise InvalidArgumentError(
        f"prompt embeddings file '{p}' holds {sorted(tensors)}; name the tensor to use 'prompt_embeds'"
    )


def open_engine(path, device, dtype, preset, attention):
    kwargs = {k: v for k, v in (("device", device), ("dtype", dtype), ("preset", preset)) if v is not None}
    return flashdreams.load(path, attention=attention or "sdpa", **kwargs)


def create_session(engine, seed, prompt):
    return engine.session(prompt_embeds=prompt, seed=seed)


def renew_session(session, seed, prompt):
    session.renew(seed=seed, inputs=None if prompt is None else {"prompt_embeds": prompt})


FD_DTYPE_CODES = {"float32": 1, "float16": 2, "bfloat16": 3, "uint8": 4, "int32": 5, "int64": 6}


def _legacy_input_specs(session):
    """A session without input_specs() lists names only; prompt_embeds is the one input it had."""
    from types import SimpleNamespace

    specs = []
    for name in session.input_names():
        shape, dtype, meaning, units = (), "", "", ""
        if name == "prompt_embeds":
            try:
                shape = (session.batch, session.engine.backend.text_len, session.engine.spec.text_dim)
                dtype, units = "float32", "embedding"
                meaning = "text embeddings of the prompt (umT5-XXL output); fewer rows are zero-padded"
            except AttributeError:
                pass
        specs.append(
            SimpleNamespace(
                name=name, shape=shape, dtype=dtype, meaning=meaning, units=units, low=None, high=None, when="block"
            )
        )
    return specs


def input_specs(session):
    """(name, dtype, fd_dtype or 0, shape, meaning, units, low, high, when) of each input, in order."""
    specs = session.input_specs() if hasattr(session, "input_specs") else _legacy_input_specs(session)
    out = []
    for s in specs:
        dtype = str(s.dtype)
        out.append(
            (
                str(s.name),
                dtype,
                FD_DTYPE_CODES.get(dtype, 0),
                tuple(int(d) for d in s.shape),
                str(s.meaning or ""),
                str(s.units or ""),
                None if s.low is None else float(s.low),
                None if s.high is None else float(s.high),
                str(s.when),
            )
        )
    return out


def _block(result, what):
    if result is None:
        raise InvalidArgumentError("the session has no block yet: call fd_session_step first (a reset clears it)")
    if what == "frames" and result.frames is None:
        raise NotFoundError(
            "this engine has no decoder: its blocks have latents but no frames (use fd_session_read_latents)"
        )
    return getattr(result, what)[0]


def _frames_before_commit(result, what):
    """Batch 0 of the session's frame buffer while it still holds this block (read after `frames_ready`);
    None when the copy in the result must be read instead (it is ready only after the commit)."""
    buf = getattr(result, "frames_buffer", None)
    session = getattr(result, "_session", None)
    if what != "frames" or buf is None or result.frames_ready is None or session is None:
        return None
    return buf[0] if session.block == result.block + 1 else None


def shape(result, what):
    return tuple(_block(result, what).shape)


def read(result, what, ptr, nbytes, memory):
    """Copy batch 0 of the last block's frames or latents into caller memory; done when it returns."""
    src = _block(result, what)
    need = src.numel() * src.element_size()
    if nbytes < need:
        info = "fd_session_frame_info" if what == "frames" else "fd_session_latent_info"
        raise InvalidArgumentError(
            f"read {what}: the buffer holds {nbytes} bytes but the {what} need {need} "
            f"({str(src.dtype).replace('torch.', '')} {list(src.shape)}); size it from {info}"
        )
    dst = _raw(ptr, need, memory).view(src.dtype).view(src.shape)
    early = _frames_before_commit(result, what)
    if early is not None:
        src = early
    if src.is_cuda:
        # A side stream waits for the decode only, not for the commit queued after it: it reads the
        # session's output buffer, written inside the decode stage, right after `frames_ready`.
        side = _side_streams.get(src.device)
        if side is None:
            side = _side_streams[src.device] = torch.cuda.Stream(src.device)
        if early is not None:
            side.wait_event(result.frames_ready)
        else:
            side.wait_stream(torch.cuda.current_stream(src.device))
        with torch.cuda.stream(side):
            dst.copy_(src)
        side.synchronize()
    else:
        dst.copy_(src)
        if dst.is_cuda:
            torch.cuda.current_stream(dst.device).synchronize()


def create_worlds(engine, seeds):
    return engine.worlds(len(seeds), seeds=[int(s) for s in seeds])


def _world_id(worlds, index):
    if not 0 <= index < worlds.n:
        raise InvalidArgumentError(f"world {index} is out of range: the worlds are 0..{worlds.n - 1}")
    return worlds.ids[index]


def worlds_set_input(worlds, index, name, value):
    """One world's input (index >= 0), or every world's at once (index -1: value [N, ...], one row per world)."""
    if index != -1:
        worlds.set_input(_world_id(worlds, index), name, value)
        return
    refused = {worlds.row_of(w): why for w, why in worlds.set_inputs(name, value).items()}
    if refused:
        first = min(refused)
        raise InvalidArgumentError(
            f"input '{name}' was refused for world(s) {sorted(refused)}, which keep their previous value (the other "
            f"worlds took it); world {first}: {refused[first]}"
        )


def worlds_step(worlds):
    result = worlds.step()
    return result, len(result.failed)


def _step_row(worlds, step, index):
    world = _world_id(worlds, index)
    if step is None:
        raise InvalidArgumentError("the worlds have no step yet: call fd_worlds_step first")
    return step.ids.index(world), world


def world_state(worlds, step, index):
    """(block index, failed 0/1, leading padding frames) of world `index` in the last step."""
    row, world = _step_row(worlds, step, index)
    padding = step.padded[row][0] if step.padded else 0
    return int(step.blocks[row]), int(world in step.failed), int(padding)


def worlds_frame_shape(step):
    if step is None:
        raise InvalidArgumentError("the worlds have no step yet: call fd_worlds_step first")
    if step.frames is None:
        raise NotFoundError("this engine has no decoder: its worlds' blocks have latents but no frames")
    return tuple(step.frames.shape[1:])


def worlds_read(worlds, step, index, ptr, nbytes, memory):
    """Copy world `index`'s frames of the last step, or every world's (index -1), into caller memory."""
    worlds_frame_shape(step)
    src = step.frames if index == -1 else step.frames[_step_row(worlds, step, index)[0]]
    need = src.numel()
    if nbytes < need:
        raise InvalidArgumentError(
            f"read frames: the buffer holds {nbytes} bytes but the frames need {need} (uint8 {list(src.shape)}); "
            "size it from fd_worlds_frame_info"
        )
    dst = _raw(ptr, need, memory).view(src.shape)
    dst.copy_(src)
    for t in (src, dst):
        if t.is_cuda:
            torch.cuda.current_stream(t.device).synchronize()


def worlds_reset(worlds, index, seed):
    worlds.reset(_world_id(worlds, index), seed=seed)


def _snapshot_file(path, verb):
    if not path:
        raise InvalidArgumentError(f"{verb} a snapshot: the path is empty; name the file")
    return path


def session_save(session, path):
    session.snapshot(device="cpu").save(_snapshot_file(path, "save"))


def session_load(session, path):
    from flashdreams.snapshot import Snapshot

    session.restore(Snapshot.load(_snapshot_file(path, "load")))


def worlds_save(worlds, index, path):
    worlds.snapshot(_world_id(worlds, index), device="cpu").save(_snapshot_file(path, "save"))


def worlds_load(worlds, index, path):
    from flashdreams.snapshot import Snapshot

    world = _world_id(worlds, index)
    worlds.restore(world, Snapshot.load(_snapshot_file(path, "load")))


def session_snapshot(session, host):
    # page-locked: a host that keeps snapshots in memory restores them at the link's speed
    return session.snapshot(device="cpu" if host else None, pinned=host)


def session_restore(session, snap):
    session.restore(snap)


def worlds_snapshot(worlds, index, host):
    return worlds.snapshot(_world_id(worlds, index), device="cpu" if host else None, pinned=host)


def worlds_restore(worlds, index, snap):
    world = _world_id(worlds, index)
    worlds.restore(world, snap)


def snapshot_info(snap):
    return int(snap.block), int(snap.nbytes)


def describe(exc):
    """(C status, message) of an exception; internal errors carry their traceback."""
    status = errors.status_of(exc)
    text = f"{type(exc).__name__}: {exc}"
    if status == errors.STATUS_CODES["FD_INTERNAL"]:
        text += "\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return status, text
)PY";

thread_local std::string t_error;

// Leaked on purpose: Python objects must outlive static destructors (no DECREF at exit).
py::object* g_glue = nullptr;

std::mutex& start_mutex() {
    static std::mutex* mu = new std::mutex();
    return *mu;
}

std::string env_or(const char* name, const char* fallback) {
    const char* v = std::getenv(name);
    return v && *v ? std::string(v) : std::string(fallback);
}

// A host that dlopen()ed us with RTLD_LOCAL would hide libpython's symbols from the
// extension modules (torch) that Python loads later; make them global.
void make_python_symbols_global() {
#ifndef _WIN32
    Dl_info info;
    if (dladdr(reinterpret_cast<void*>(&Py_IsInitialized), &info) != 0 && info.dli_fname != nullptr) {
        dlopen(info.dli_fname, RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD);  // handle kept for the process
    }
#endif
}

fd_status start_python() {
    if (Py_IsInitialized()) return FD_OK;
    std::lock_guard<std::mutex> lock(start_mutex());
    if (Py_IsInitialized()) return FD_OK;
    make_python_symbols_global();
    PyConfig config;
    PyConfig_InitPythonConfig(&config);  // honours PYTHONHOME, PYTHONPATH
    config.parse_argv = 0;
    config.install_signal_handlers = 0;  // Ctrl-C and friends stay the host's
    const std::string exe = env_or("FLASHDREAMS_PYTHON", FD_DEFAULT_PYTHON);
    bool use_exe = !exe.empty();
#ifndef _WIN32
    use_exe = use_exe && access(exe.c_str(), X_OK) == 0;
#endif
    if (use_exe) {
        // Python finds its prefix (and a virtualenv's pyvenv.cfg) from the executable;
        // sys.executable is what torch uses to start helper processes.
        PyStatus s = PyConfig_SetBytesString(&config, &config.program_name, exe.c_str());
        if (!PyStatus_Exception(s)) s = PyConfig_SetBytesString(&config, &config.executable, exe.c_str());
        if (PyStatus_Exception(s)) {
            PyConfig_Clear(&config);
            return fail(FD_INTERNAL, "could not configure the embedded Python for '" + exe + "'");
        }
    }
    try {
        py::initialize_interpreter(&config, 0, nullptr, false);
    } catch (const std::exception& e) {
        return fail(FD_INTERNAL, std::string("could not start the embedded Python (") + (use_exe ? exe : "default") +
                                     "): " + e.what() + "; check PYTHONHOME / FLASHDREAMS_PYTHON");
    }
    PyEval_SaveThread();  // let go of the GIL for good; every call takes it when it needs it
    return FD_OK;
}

// Imports flashdreams and the glue; with the GIL held.
fd_status import_flashdreams() {
    if (g_glue != nullptr) return FD_OK;
    try {
        py::module_::import("flashdreams");
    } catch (py::error_already_set& e) {
        if (!e.matches(PyExc_ImportError)) throw;
        const std::string site = FD_DEFAULT_SITE_PACKAGES;
        if (!site.empty()) py::module_::import("site").attr("addsitedir")(site);
        try {
            py::module_::import("flashdreams");
        } catch (py::error_already_set& e2) {
            if (!e2.matches(PyExc_ImportError)) throw;
            const std::string where = py::str(py::module_::import("sys").attr("executable"));
            return fail(FD_NOT_FOUND,
                        "the embedded Python (" + where + ") cannot import flashdreams (" + e2.what() +
                            "); set FLASHDREAMS_PYTHON to the python of the environment where flashdreams is "
                            "installed, or add its site-packages to PYTHONPATH (build default: '" + site + "')");
        }
    }
    py::object mod = py::module_::import("types").attr("ModuleType")("flashdreams._capi_glue");
    py::exec(kGlueSource, mod.attr("__dict__"));
    g_glue = new py::object(std::move(mod));
    return FD_OK;
}

fd_status from_python(py::error_already_set& e) {
    if (g_glue != nullptr) {
        try {
            py::tuple r = glue("describe")(e.value());
            return fail(static_cast<fd_status>(r[0].cast<int>()), r[1].cast<std::string>());
        } catch (...) {  // describing failed: fall back to the raw text below
        }
    }
    return fail(FD_INTERNAL, std::string("internal error: ") + e.what());
}

struct Registry {
    std::mutex mu;
    uintptr_t next = 0;
    std::unordered_map<uintptr_t, std::shared_ptr<EngineImpl>> engines;
    std::unordered_map<uintptr_t, std::shared_ptr<SessionImpl>> sessions;
    std::unordered_map<uintptr_t, std::shared_ptr<WorldsImpl>> worlds;
    std::unordered_map<uintptr_t, std::shared_ptr<SnapshotImpl>> snapshots;
    uintptr_t new_id() { return (++next) << 4; }  // never reused; never 0
};

Registry& registry() {
    static Registry* r = new Registry();  // leaked: see g_glue
    return *r;
}

template <class Map>
typename Map::mapped_type find_in(Map& map, const void* handle) {
    std::lock_guard<std::mutex> lock(registry().mu);
    auto it = map.find(reinterpret_cast<uintptr_t>(handle));
    return it == map.end() ? nullptr : it->second;
}

template <class Map>
typename Map::mapped_type remove_from(Map& map, const void* handle) {
    std::lock_guard<std::mutex> lock(registry().mu);
    auto it = map.find(reinterpret_cast<uintptr_t>(handle));
    if (it == map.end()) return nullptr;
    auto impl = std::move(it->second);
    map.erase(it);
    return impl;  // dropped by the caller, outside the registry lock (its destructor takes the GIL)
}

}  // namespace

fd_status fail(fd_status status, std::string message) {
    t_error = std::move(message);
    return status;
}

fd_status succeed() {
    t_error.clear();
    return FD_OK;
}

const char* last_error() { return t_error.c_str(); }

py::object glue(const char* name) { return g_glue->attr(name); }

fd_status with_python(const std::function<fd_status()>& body) noexcept {
    return guarded([&] {
        fd_status st = start_python();
        if (st != FD_OK) return st;
        py::gil_scoped_acquire gil;
        try {
            st = import_flashdreams();
            if (st == FD_OK) st = body();
            return st == FD_OK ? succeed() : st;
        } catch (py::error_already_set& e) {
            return from_python(e);
        }
    });
}

void release_py(py::object& obj) noexcept {
    if (!obj) return;
    if (!Py_IsInitialized()) {  // cannot happen while we never finalize; never DECREF without Python
        obj.release();
        return;
    }
    py::gil_scoped_acquire gil;
    obj = py::object();
}

fd_engine* register_engine(std::shared_ptr<EngineImpl> impl) {
    std::lock_guard<std::mutex> lock(registry().mu);
    const uintptr_t id = registry().new_id();
    registry().engines.emplace(id, std::move(impl));
    return reinterpret_cast<fd_engine*>(id);
}

fd_session* register_session(std::shared_ptr<SessionImpl> impl) {
    std::lock_guard<std::mutex> lock(registry().mu);
    const uintptr_t id = registry().new_id();
    registry().sessions.emplace(id, std::move(impl));
    return reinterpret_cast<fd_session*>(id);
}

fd_worlds* register_worlds(std::shared_ptr<WorldsImpl> impl) {
    std::lock_guard<std::mutex> lock(registry().mu);
    const uintptr_t id = registry().new_id();
    registry().worlds.emplace(id, std::move(impl));
    return reinterpret_cast<fd_worlds*>(id);
}

std::shared_ptr<EngineImpl> find_engine(fd_engine* h) { return find_in(registry().engines, h); }
std::shared_ptr<SessionImpl> find_session(fd_session* h) { return find_in(registry().sessions, h); }
std::shared_ptr<EngineImpl> remove_engine(fd_engine* h) { return remove_from(registry().engines, h); }
std::shared_ptr<SessionImpl> remove_session(fd_session* h) { return remove_from(registry().sessions, h); }
std::shared_ptr<WorldsImpl> find_worlds(fd_worlds* h) { return find_in(registry().worlds, h); }
std::shared_ptr<WorldsImpl> remove_worlds(fd_worlds* h) { return remove_from(registry().worlds, h); }

fd_snapshot* register_snapshot(std::shared_ptr<SnapshotImpl> impl) {
    std::lock_guard<std::mutex> lock(registry().mu);
    const uintptr_t id = registry().new_id();
    registry().snapshots.emplace(id, std::move(impl));
    return reinterpret_cast<fd_snapshot*>(id);
}

std::shared_ptr<SnapshotImpl> find_snapshot(const fd_snapshot* h) { return find_in(registry().snapshots, h); }
std::shared_ptr<SnapshotImpl> remove_snapshot(fd_snapshot* h) { return remove_from(registry().snapshots, h); }

std::unique_lock<std::mutex> lock_without_gil(std::mutex& mu) {
    std::unique_lock<std::mutex> lock(mu, std::try_to_lock);
    if (lock.owns_lock()) return lock;
    if (Py_IsInitialized() && PyGILState_Check()) {  // a Python host calling with the GIL: do not wait holding it
        PyThreadState* ts = PyEval_SaveThread();
        lock.lock();
        PyEval_RestoreThread(ts);
    } else {
        lock.lock();
    }
    return lock;
}

}  // namespace fdcapi
