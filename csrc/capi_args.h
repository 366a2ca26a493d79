// Argument checks and call guards shared by the C ABI's source files (flashdreams_capi.cpp,
// capi_worlds.cpp): C-level checks of handles, option structs and tensor views before Python
// sees them. Not installed; not part of the ABI.
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
#include <functional>
#include <string>

#include "capi_runtime.h"

namespace fdcapi {

// Runs a call's body; whatever it throws becomes a status. Never throws.
template <class F>
fd_status guarded(F&& body) noexcept {
    try {
        return body();
    } catch (const std::bad_alloc&) {
        return fail(FD_OUT_OF_MEMORY, "out of host memory");
    } catch (const std::exception& e) {
        return fail(FD_INTERNAL, std::string("internal error: ") + e.what());
    } catch (...) {
        return fail(FD_INTERNAL, "internal error: unknown C++ exception");
    }
}

inline fd_status null_arg(const char* fn, const char* arg) {
    return fail(FD_INVALID_ARGUMENT, std::string(fn) + ": " + arg + " is NULL");
}

inline fd_status dead_handle(const char* fn, const char* kind) {
    return fail(FD_INVALID_ARGUMENT, std::string(fn) + ": the " + kind + " handle is not live (destroyed already, or " +
                                         "not returned by fd_" + kind + (kind[0] == 'e' ? "_open)" : "_create)"));
}

// struct_size must cover at least the size field and at most what this library knows.
inline fd_status check_struct_size(const char* fn, const char* type, const char* init, size_t given, size_t known) {
    if (given >= sizeof(size_t) && given <= known) return FD_OK;
    if (given > known) {
        return fail(FD_INVALID_ARGUMENT, std::string(fn) + ": " + type + ".struct_size is " + std::to_string(given) +
                                             " but this library knows " + std::to_string(known) +
                                             " bytes; the host was compiled against a newer flashdreams.h "
                                             "(check fd_check_version)");
    }
    return fail(FD_INVALID_ARGUMENT, std::string(fn) + ": " + type + ".struct_size is " + std::to_string(given) +
                                         "; initialise it with " + init);
}

// True when the host's struct (of struct_size bytes) has this field.
#define FD_HAS_FIELD(opts, type, field) ((opts)->struct_size >= offsetof(type, field) + sizeof((opts)->field))

inline py::object str_or_none(const char* s) { return s != nullptr && *s != '\0' ? py::object(py::str(s)) : py::none(); }

// Checks a view's C-level fields (pointer, dtype, rank, sizes) before Python sees it.
inline fd_status check_view(const char* fn, const char* what, const fd_tensor_view* v) {
    const std::string where = std::string(fn) + ": " + what;
    if (v == nullptr) return fail(FD_INVALID_ARGUMENT, where + " view is NULL");
    if (v->dtype < FD_DTYPE_FLOAT32 || v->dtype > FD_DTYPE_INT64) {
        return fail(FD_INVALID_ARGUMENT, where + ": dtype " + std::to_string(static_cast<int>(v->dtype)) +
                                             " is not an fd_dtype (FD_DTYPE_FLOAT32 = 1 ... FD_DTYPE_INT64 = 6)");
    }
    if (v->memory != FD_MEMORY_HOST && v->memory != FD_MEMORY_DEVICE) {
        return fail(FD_INVALID_ARGUMENT, where + ": memory " + std::to_string(static_cast<int>(v->memory)) +
                                             " is neither FD_MEMORY_HOST nor FD_MEMORY_DEVICE");
    }
    if (v->ndim < 0 || v->ndim > FD_MAX_DIMS) {
        return fail(FD_INVALID_ARGUMENT, where + ": ndim " + std::to_string(v->ndim) + " is outside 0.." +
                                             std::to_string(FD_MAX_DIMS));
    }
    if (v->ndim > 0 && v->shape == nullptr) return fail(FD_INVALID_ARGUMENT, where + ": shape is NULL, ndim > 0");
    int64_t numel = 1;
    for (int32_t i = 0; i < v->ndim; ++i) {
        const int64_t d = v->shape[i];
        if (d < 0 || d > (int64_t{1} << 40)) {
            return fail(FD_INVALID_ARGUMENT, where + ": shape[" + std::to_string(i) + "] is " + std::to_string(d));
        }
        numel = (numel > 0 && d > (int64_t{1} << 42) / numel) ? -1 : numel * d;
        if (numel < 0) return fail(FD_INVALID_ARGUMENT, where + ": the shape holds more than 2^42 elements");
    }
    if (v->data == nullptr && numel > 0) return fail(FD_INVALID_ARGUMENT, where + ": data is NULL");
    return FD_OK;
}

// A read's destination memory kind.
inline fd_status check_memory(const char* fn, fd_memory mem) {
    if (mem == FD_MEMORY_HOST || mem == FD_MEMORY_DEVICE) return FD_OK;
    return fail(FD_INVALID_ARGUMENT, std::string(fn) + ": memory " + std::to_string(static_cast<int>(mem)) +
                                         " is neither FD_MEMORY_HOST nor FD_MEMORY_DEVICE");
}

// Looks a snapshot up and checks it; `snap` is set on FD_OK.
inline fd_status get_snapshot(const char* fn, const fd_snapshot* handle, std::shared_ptr<SnapshotImpl>& snap) {
    if (handle == nullptr) return null_arg(fn, "snapshot");
    snap = find_snapshot(handle);
    if (snap) return FD_OK;
    return fail(FD_INVALID_ARGUMENT, std::string(fn) + ": the snapshot handle is not live (destroyed already, or " +
                                         "not returned by fd_session_snapshot / fd_worlds_snapshot)");
}

// fd_session_snapshot / fd_worlds_snapshot: checks `out` and `where`, then `take` fills a new snapshot (in Python,
// under its handle's lock), which is registered and returned in *out.
inline fd_status new_snapshot(const char* fn, fd_memory where, fd_snapshot** out,
                              const std::function<fd_status(SnapshotImpl&)>& take) {
    if (out == nullptr) return null_arg(fn, "out");
    *out = nullptr;
    fd_status st = check_memory(fn, where);
    if (st != FD_OK) return st;
    auto impl = std::make_shared<SnapshotImpl>();
    st = take(*impl);
    if (st != FD_OK) return st;
    *out = register_snapshot(std::move(impl));
    return succeed();
}

// Looks an engine up and checks it; `eng` is set on FD_OK.
inline fd_status get_engine(const char* fn, fd_engine* handle, std::shared_ptr<EngineImpl>& eng) {
    if (handle == nullptr) return null_arg(fn, "engine");
    eng = find_engine(handle);
    return eng ? FD_OK : dead_handle(fn, "engine");
}

// The Python tensor (a copy) of a checked view. With the GIL held.
inline py::object view_to_tensor(const fd_tensor_view* v) {
    py::tuple shape(v->ndim);
    for (int32_t i = 0; i < v->ndim; ++i) shape[i] = py::int_(v->shape[i]);
    return glue("tensor_from_view")(reinterpret_cast<uintptr_t>(v->data), static_cast<int>(v->dtype), shape,
                                    static_cast<int>(v->memory), v->device_index);
}

}  // namespace fdcapi
