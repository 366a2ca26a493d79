// Internals of libflashdreams shared by its two source files: the embedded Python
// runtime (start once, never finalize, GIL only while calling in), the thread-local
// last error, and the registry of live handles. Not installed; not part of the ABI.
#pragma once

#include <pybind11/embed.h>

#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "flashdreams.h"

namespace fdcapi {

namespace py = pybind11;

// The calling thread's last error. fail() stores the message and returns the status.
fd_status fail(fd_status status, std::string message);
fd_status succeed();
const char* last_error();

// Runs `body` with the interpreter started, flashdreams imported and the GIL held.
// A Python exception becomes its status (flashdreams.errors.status_of) and message;
// a C++ exception becomes FD_INTERNAL (FD_OUT_OF_MEMORY for bad_alloc). Never throws.
fd_status with_python(const std::function<fd_status()>& body) noexcept;

// A function of the glue module (see capi_runtime.cpp). Only with the GIL held.
py::object glue(const char* name);

// Drops a Python reference, taking the GIL for it (safe with or without the GIL held).
void release_py(py::object& obj) noexcept;

struct EngineImpl {
    py::object engine;  // flashdreams.Engine
    ~EngineImpl() { release_py(engine); }
};

// One input of a session, copied out of Python once: fd_input_info points into it.
struct InputInfo {
    std::string name, dtype_name, meaning, units, when;
    int32_t dtype = 0;  // fd_dtype, or 0
    std::vector<int64_t> shape;
    bool has_low = false, has_high = false;
    double low = 0.0, high = 0.0;
};

struct SessionImpl {
    std::shared_ptr<EngineImpl> engine;  // keeps the engine alive after fd_engine_destroy
    py::object session;                  // flashdreams.Session
    py::object last;                     // the last StepResult, or None
    std::mutex mu;                       // one call at a time on a session
    // The session's inputs, read on first use (under mu) and never changed after, so the
    // strings handed out stay valid until the session is destroyed.
    bool inputs_known = false;
    std::vector<InputInfo> inputs;
    ~SessionImpl() {
        release_py(last);
        release_py(session);
    }
};

struct WorldsImpl {
    std::shared_ptr<EngineImpl> engine;  // keeps the engine alive after fd_engine_destroy
    py::object worlds;                   // flashdreams.batched.Worlds
    py::object last;                     // the last WorldsStep, or None
    std::mutex mu;                       // one call at a time on a set of worlds
    ~WorldsImpl() {
        release_py(last);
        release_py(worlds);
    }
};

struct SnapshotImpl {
    py::object snapshot;  // flashdreams.snapshot.Snapshot
    ~SnapshotImpl() { release_py(snapshot); }
};

// Live handles. A handle is an id that is never reused, not an address, so a
// destroyed or foreign handle is refused without touching any memory.
fd_engine* register_engine(std::shared_ptr<EngineImpl> impl);
fd_session* register_session(std::shared_ptr<SessionImpl> impl);
std::shared_ptr<EngineImpl> find_engine(fd_engine* handle);
std::shared_ptr<SessionImpl> find_session(fd_session* handle);
std::shared_ptr<EngineImpl> remove_engine(fd_engine* handle);
std::shared_ptr<SessionImpl> remove_session(fd_session* handle);
fd_worlds* register_worlds(std::shared_ptr<WorldsImpl> impl);
std::shared_ptr<WorldsImpl> find_worlds(fd_worlds* handle);
std::shared_ptr<WorldsImpl> remove_worlds(fd_worlds* handle);
fd_snapshot* register_snapshot(std::shared_ptr<SnapshotImpl> impl);
std::shared_ptr<SnapshotImpl> find_snapshot(const fd_snapshot* handle);
std::shared_ptr<SnapshotImpl> remove_snapshot(fd_snapshot* handle);

// Locks a session's (or worlds') mutex; if this thread holds the GIL (a Python host), lets it go while waiting.
std::unique_lock<std::mutex> lock_without_gil(std::mutex& mu);
inline std::unique_lock<std::mutex> lock_session(SessionImpl& s) { return lock_without_gil(s.mu); }

}  // namespace fdcapi
