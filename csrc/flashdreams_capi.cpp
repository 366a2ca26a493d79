// The exported C functions of libflashdreams (see include/flashdreams.h). Each one
// checks its C arguments here, then calls the flashdreams package through the
// embedded interpreter (capi_runtime.cpp). No C++ exception leaves this file.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "capi_args.h"
#include "capi_runtime.h"

using namespace fdcapi;

static_assert(sizeof(fd_status) == 4 && sizeof(fd_dtype) == 4 && sizeof(fd_memory) == 4, "fd_* enums are 32-bit");

namespace {

// Looks a session up and checks it; `s` is set on FD_OK.
fd_status get_session(const char* fn, fd_session* handle, std::shared_ptr<SessionImpl>& s) {
    if (handle == nullptr) return null_arg(fn, "session");
    s = find_session(handle);
    return s ? FD_OK : dead_handle(fn, "session");
}

// Looks a session up and runs `body` on it in Python, holding the session's lock: the calls that
// move a session (step, reset, warm-up).
fd_status in_session(const char* fn, fd_session* handle, const std::function<fd_status(SessionImpl&)>& body) {
    std::shared_ptr<SessionImpl> s;
    fd_status st = get_session(fn, handle, s);
    if (st != FD_OK) return st;
    auto lock = lock_session(*s);
    return with_python([&] { return body(*s); });
}

// fd_session_save / fd_session_load: the session's snapshot written to or read from the file at `path`. A load
// replaces the state the last block belongs to, so it forgets that block (reads need the next step).
fd_status snapshot_file(const char* fn, fd_session* handle, const char* path, bool load) {
    if (path == nullptr) return null_arg(fn, "path");
    return in_session(fn, handle, [&](SessionImpl& s) {
        glue(load ? "session_load" : "session_save")(s.session, py::str(path));
        if (load) s.last = py::none();
        return FD_OK;
    });
}

// Looks a session up and reads its inputs from Python on first use; `s` is set on FD_OK.
// s->inputs never changes once read, so it may be used after the lock is let go.
fd_status session_inputs(const char* fn, const fd_session* handle, std::shared_ptr<SessionImpl>& s) {
    fd_status st = get_session(fn, const_cast<fd_session*>(handle), s);
    if (st != FD_OK) return st;
    auto lock = lock_session(*s);
    if (s->inputs_known) return FD_OK;
    return with_python([&]() -> fd_status {
        std::vector<InputInfo> inputs;
        for (py::handle item : glue("input_specs")(s->session)) {
            py::tuple spec = py::reinterpret_borrow<py::tuple>(item);
            InputInfo in;
            in.name = spec[0].cast<std::string>();
            in.dtype_name = spec[1].cast<std::string>();
            in.dtype = spec[2].cast<int32_t>();
            py::tuple shape = spec[3].cast<py::tuple>();
            if (shape.size() > FD_MAX_DIMS) {
                return fail(FD_ENGINE_INCOMPATIBLE, std::string(fn) + ": input '" + in.name + "' has " +
                                                        std::to_string(shape.size()) + " dimensions; the C ABI " +
                                                        "describes at most FD_MAX_DIMS = " +
                                                        std::to_string(FD_MAX_DIMS));
            }
            for (py::handle d : shape) in.shape.push_back(d.cast<int64_t>());
            in.meaning = spec[4].cast<std::string>();
            in.units = spec[5].cast<std::string>();
            in.has_low = !spec[6].is_none();
            in.low = in.has_low ? spec[6].cast<double>() : 0.0;
            in.has_high = !spec[7].is_none();
            in.high = in.has_high ? spec[7].cast<double>() : 0.0;
            in.when = spec[8].cast<std::string>();
            inputs.push_back(std::move(in));
        }
        if (inputs.size() > static_cast<size_t>(INT32_MAX)) {
            return fail(FD_INTERNAL, std::string(fn) + ": the session lists more than INT32_MAX inputs");
        }
        s->inputs = std::move(inputs);
        s->inputs_known = true;
        return FD_OK;
    });
}

std::string input_names(const SessionImpl& s) {
    std::string names;
    for (const InputInfo& in : s.inputs) names += (names.empty() ? "" : ", ") + in.name;
    return names.empty() ? "(none)" : names;
}

fd_status block_info(const char* fn, fd_session* handle, const char* what, int64_t* out[4]) {
    std::shared_ptr<SessionImpl> s;
    fd_status st = get_session(fn, handle, s);
    if (st != FD_OK) return st;
    for (int i = 0; i < 4; ++i) {
        if (out[i] == nullptr) return fail(FD_INVALID_ARGUMENT, std::string(fn) + ": an out pointer is NULL");
    }
    auto lock = lock_session(*s);
    return with_python([&] {
        py::tuple shape = glue("shape")(s->last, what);
        for (int i = 0; i < 4; ++i) *out[i] = shape[i].cast<int64_t>();
        return FD_OK;
    });
}

fd_status read_block(const char* fn, fd_session* handle, const char* what, void* dst, size_t bytes, fd_memory mem) {
    std::shared_ptr<SessionImpl> s;
    fd_status st = get_session(fn, handle, s);
    if (st != FD_OK) return st;
    if (dst == nullptr) return null_arg(fn, "dst");
    st = check_memory(fn, mem);
    if (st != FD_OK) return st;
    auto lock = lock_session(*s);
    return with_python([&] {
        glue("read")(s->last, what, reinterpret_cast<uintptr_t>(dst), bytes, static_cast<int>(mem));
        return FD_OK;
    });
}

}  // namespace

extern "C" {

FD_API uint32_t fd_api_version(void) { return FD_API_VERSION; }

FD_API fd_status fd_check_version(uint32_t compiled) {
    const uint32_t major = compiled >> 16, minor = compiled & 0xffffu;
    if (major == FD_API_VERSION_MAJOR && minor <= FD_API_VERSION_MINOR) return succeed();
    return fail(FD_ENGINE_INCOMPATIBLE,
                "the host was compiled against flashdreams.h API " + std::to_string(major) + "." +
                    std::to_string(minor) + ", but the loaded libflashdreams implements API " +
                    std::to_string(FD_API_VERSION_MAJOR) + "." + std::to_string(FD_API_VERSION_MINOR) +
                    "; rebuild the host against this library's header, or load the library it was built with");
}

FD_API const char* fd_last_error(void) { return last_error(); }

FD_API const char* fd_status_name(fd_status status) {
    static const char* const names[] = {"FD_OK",           "FD_INVALID_ARGUMENT", "FD_NOT_FOUND",
                                        "FD_ENGINE_INCOMPATIBLE", "FD_OUT_OF_MEMORY", "FD_DEVICE_ERROR",
                                        "FD_INTERNAL"};
    const int i = static_cast<int>(status);
    return i >= 0 && i < static_cast<int>(sizeof(names) / sizeof(names[0])) ? names[i] : "FD_UNKNOWN_STATUS";
}

FD_API fd_status fd_engine_open(const char* path, const fd_engine_options* opts, fd_engine** out) {
    static const char* fn = "fd_engine_open";
    return guarded([&]() -> fd_status {
        if (out == nullptr) return null_arg(fn, "out");
        *out = nullptr;
        if (path != nullptr && *path == '\0') {
            return fail(FD_INVALID_ARGUMENT, "fd_engine_open: path is empty; pass NULL for the built-in model");
        }
        fd_engine_options o = FD_ENGINE_OPTIONS_INIT;
        if (opts != nullptr) {
            fd_status st = check_struct_size(fn, "fd_engine_options", "FD_ENGINE_OPTIONS_INIT", opts->struct_size,
                                             sizeof(fd_engine_options));
            if (st != FD_OK) return st;
            if (FD_HAS_FIELD(opts, fd_engine_options, device)) o.device = opts->device;
            if (FD_HAS_FIELD(opts, fd_engine_options, dtype)) o.dtype = opts->dtype;
            if (FD_HAS_FIELD(opts, fd_engine_options, preset)) o.preset = opts->preset;
            if (FD_HAS_FIELD(opts, fd_engine_options, attention)) o.attention = opts->attention;
        }
        auto impl = std::make_shared<EngineImpl>();
        fd_status st = with_python([&] {
            impl->engine = glue("open_engine")(str_or_none(path), str_or_none(o.device), str_or_none(o.dtype),
                                               str_or_none(o.preset), str_or_none(o.attention));
            return FD_OK;
        });
        if (st == FD_OK) *out = register_engine(std::move(impl));
        return st;
    });
}

FD_API fd_status fd_engine_destroy(fd_engine* engine) {
    return guarded([&]() -> fd_status {
        if (engine == nullptr) return succeed();
        std::shared_ptr<EngineImpl> impl = remove_engine(engine);
        if (!impl) return dead_handle("fd_engine_destroy", "engine");
        impl.reset();  // sessions keep their own reference
        return succeed();
    });
}

namespace {

// fd_session_create's and fd_session_renew's options: the fields the host's struct has (its struct_size
// says which), checked before anything is made or changed: one prompt source at most, a well-formed view.
fd_status read_session_options(const char* fn, const fd_session_options* opts, fd_session_options& o) {
    o = FD_SESSION_OPTIONS_INIT;
    if (opts != nullptr) {
        fd_status st = check_struct_size(fn, "fd_session_options", "FD_SESSION_OPTIONS_INIT", opts->struct_size,
                                         sizeof(fd_session_options));
        if (st != FD_OK) return st;
        if (FD_HAS_FIELD(opts, fd_session_options, seed)) o.seed = opts->seed;
        if (FD_HAS_FIELD(opts, fd_session_options, prompt_embeds)) o.prompt_embeds = opts->prompt_embeds;
        if (FD_HAS_FIELD(opts, fd_session_options, prompt_embeds_file)) {
            o.prompt_embeds_file = opts->prompt_embeds_file;
        }
    }
    if (o.prompt_embeds_file != nullptr && *o.prompt_embeds_file == '\0') o.prompt_embeds_file = nullptr;
    if (o.prompt_embeds != nullptr && o.prompt_embeds_file != nullptr) {
        return fail(FD_INVALID_ARGUMENT,
                    std::string(fn) + ": both prompt_embeds and prompt_embeds_file are set; pass one");
    }
    if (o.prompt_embeds != nullptr) return check_view(fn, "prompt_embeds", o.prompt_embeds);
    return FD_OK;
}

// The prompt the options give, as a tensor, or None (the engine's default); call holding the interpreter.
py::object options_prompt(const fd_session_options& o) {
    if (o.prompt_embeds != nullptr) return view_to_tensor(o.prompt_embeds);
    if (o.prompt_embeds_file != nullptr) return glue("load_prompt_file")(o.prompt_embeds_file);
    return py::none();
}

}  // namespace

FD_API fd_status fd_session_create(fd_engine* engine, const fd_session_options* opts, fd_session** out) {
    static const char* fn = "fd_session_create";
    return guarded([&]() -> fd_status {
        if (out == nullptr) return null_arg(fn, "out");
        *out = nullptr;
        std::shared_ptr<EngineImpl> eng;
        fd_status found = get_engine(fn, engine, eng);
        if (found != FD_OK) return found;
        fd_session_options o;
        fd_status st = read_session_options(fn, opts, o);
        if (st != FD_OK) return st;
        auto impl = std::make_shared<SessionImpl>();
        impl->engine = eng;
        st = with_python([&] {
            impl->session = glue("create_session")(eng->engine, py::int_(o.seed), options_prompt(o));
            impl->last = py::none();
            return FD_OK;
        });
        if (st == FD_OK) *out = register_session(std::move(impl));
        return st;
    });
}

FD_API fd_status fd_session_renew(fd_session* session, const fd_session_options* opts) {
    static const char* fn = "fd_session_renew";
    return guarded([&]() -> fd_status {
        fd_session_options o;
        fd_status st = read_session_options(fn, opts, o);
        if (st != FD_OK) return st;
        return in_session(fn, session, [&](SessionImpl& s) {
            // Python checks every input before it changes anything, so a refusal keeps the last block too; a
            // renew that failed part-way (the session refuses to step until reset) leaves no block to read.
            try {
                glue("renew_session")(s.session, py::int_(o.seed), options_prompt(o));
            } catch (...) {
                if (!s.session.attr("failed").is_none()) s.last = py::none();
                throw;
            }
            s.last = py::none();
            return FD_OK;
        });
    });
}

FD_API fd_status fd_session_set_input(fd_session* session, const char* name, const fd_tensor_view* value) {
    static const char* fn = "fd_session_set_input";
    return guarded([&]() -> fd_status {
        std::shared_ptr<SessionImpl> s;
        fd_status st = get_session(fn, session, s);
        if (st != FD_OK) return st;
        if (name == nullptr) return null_arg(fn, "name");
        st = check_view(fn, name, value);
        if (st != FD_OK) return st;
        auto lock = lock_session(*s);
        return with_python([&] {
            s->session.attr("set_input")(name, view_to_tensor(value));
            return FD_OK;
        });
    });
}

FD_API fd_status fd_session_input_count(const fd_session* session, int32_t* count) {
    static const char* fn = "fd_session_input_count";
    return guarded([&]() -> fd_status {
        if (count == nullptr) return null_arg(fn, "count");
        *count = 0;
        std::shared_ptr<SessionImpl> s;
        fd_status st = session_inputs(fn, session, s);
        if (st != FD_OK) return st;
        *count = static_cast<int32_t>(s->inputs.size());
        return succeed();
    });
}

FD_API fd_status fd_session_input_info(const fd_session* session, int32_t index, fd_input_info* info) {
    static const char* fn = "fd_session_input_info";
    return guarded([&]() -> fd_status {
        if (info == nullptr) return null_arg(fn, "info");
        fd_status st = check_struct_size(fn, "fd_input_info", "FD_INPUT_INFO_INIT", info->struct_size,
                                         sizeof(fd_input_info));
        if (st != FD_OK) return st;
        std::shared_ptr<SessionImpl> s;
        st = session_inputs(fn, session, s);
        if (st != FD_OK) return st;
        const int32_t n = static_cast<int32_t>(s->inputs.size());
        if (index < 0 || index >= n) {
            return fail(FD_INVALID_ARGUMENT,
                        std::string(fn) + ": index " + std::to_string(index) + " is out of range: " +
                            (n == 0 ? std::string("the session has no inputs")
                                    : "valid indices are 0.." + std::to_string(n - 1) + " (the session has " +
                                          std::to_string(n) + (n == 1 ? " input" : " inputs") +
                                          "; see fd_session_input_count)"));
        }
        const InputInfo& in = s->inputs[static_cast<size_t>(index)];
        fd_input_info full = FD_INPUT_INFO_INIT;
        full.struct_size = info->struct_size;
        full.name = in.name.c_str();
        full.dtype_name = in.dtype_name.c_str();
        full.dtype = static_cast<fd_dtype>(in.dtype);
        full.ndim = static_cast<int32_t>(in.shape.size());
        for (size_t i = 0; i < in.shape.size(); ++i) full.shape[i] = in.shape[i];
        full.meaning = in.meaning.c_str();
        full.units = in.units.c_str();
        full.has_low = in.has_low ? 1 : 0;
        full.low = in.low;
        full.has_high = in.has_high ? 1 : 0;
        full.high = in.high;
        full.when = in.when.c_str();
        std::memcpy(info, &full, info->struct_size);  // the fields the host's struct has
        return succeed();
    });
}

FD_API fd_status fd_session_input_find(const fd_session* session, const char* name, int32_t* index) {
    static const char* fn = "fd_session_input_find";
    return guarded([&]() -> fd_status {
        if (index == nullptr) return null_arg(fn, "index");
        *index = -1;
        if (name == nullptr) return null_arg(fn, "name");
        std::shared_ptr<SessionImpl> s;
        fd_status st = session_inputs(fn, session, s);
        if (st != FD_OK) return st;
        for (size_t i = 0; i < s->inputs.size(); ++i) {
            if (s->inputs[i].name == name) {
                *index = static_cast<int32_t>(i);
                return succeed();
            }
        }
        return fail(FD_NOT_FOUND, std::string(fn) + ": the session has no input '" + name + "'; its inputs: " +
                                      input_names(*s));
    });
}

FD_API fd_status fd_session_step(fd_session* session) {
    return guarded([&] {
        return in_session("fd_session_step", session, [](SessionImpl& s) {
            s.last = py::none();  // a failed step leaves no stale block to read
            s.last = s.session.attr("step")();
            return FD_OK;
        });
    });
}

FD_API fd_status fd_session_frame_info(fd_session* session, int64_t* num_frames, int64_t* height, int64_t* width,
                                       int64_t* channels) {
    int64_t* out[4] = {num_frames, height, width, channels};
    return guarded([&] { return block_info("fd_session_frame_info", session, "frames", out); });
}

FD_API fd_status fd_session_read_frames(fd_session* session, void* dst, size_t dst_bytes, fd_memory memory) {
    return guarded([&] { return read_block("fd_session_read_frames", session, "frames", dst, dst_bytes, memory); });
}

FD_API fd_status fd_session_latent_info(fd_session* session, int64_t* channels, int64_t* num_frames, int64_t* height,
                                        int64_t* width) {
    int64_t* out[4] = {channels, num_frames, height, width};
    return guarded([&] { return block_info("fd_session_latent_info", session, "latents", out); });
}

FD_API fd_status fd_session_read_latents(fd_session* session, void* dst, size_t dst_bytes, fd_memory memory) {
    return guarded([&] { return read_block("fd_session_read_latents", session, "latents", dst, dst_bytes, memory); });
}

FD_API fd_status fd_session_reset(fd_session* session, uint64_t seed) {
    return guarded([&] {
        return in_session("fd_session_reset", session, [&](SessionImpl& s) {
            s.last = py::none();
            s.session.attr("reset")(py::arg("seed") = py::int_(seed));
            return FD_OK;
        });
    });
}

FD_API fd_status fd_session_warm_up(fd_session* session, double* seconds) {
    return guarded([&] {
        return in_session("fd_session_warm_up", session, [&](SessionImpl& s) {
            double took = s.session.attr("warm_up")().cast<double>();  // refused past block 0: the block stays
            s.last = py::none();
            if (seconds != nullptr) *seconds = took;
            return FD_OK;
        });
    });
}

FD_API fd_status fd_session_save(fd_session* session, const char* path) {
    return guarded([&] { return snapshot_file("fd_session_save", session, path, false); });
}

FD_API fd_status fd_session_load(fd_session* session, const char* path) {
    return guarded([&] { return snapshot_file("fd_session_load", session, path, true); });
}

FD_API fd_status fd_session_snapshot(fd_session* session, fd_memory where, fd_snapshot** out) {
    static const char* fn = "fd_session_snapshot";
    return guarded([&] {
        return new_snapshot(fn, where, out, [&](SnapshotImpl& snap) {
            return in_session(fn, session, [&](SessionImpl& s) {
                snap.snapshot = glue("session_snapshot")(s.session, where == FD_MEMORY_HOST);
                return FD_OK;
            });
        });
    });
}

FD_API fd_status fd_session_restore(fd_session* session, const fd_snapshot* snapshot) {
    static const char* fn = "fd_session_restore";
    return guarded([&]() -> fd_status {
        std::shared_ptr<SnapshotImpl> snap;
        fd_status st = get_snapshot(fn, snapshot, snap);
        if (st != FD_OK) return st;
        return in_session(fn, session, [&](SessionImpl& s) {
            glue("session_restore")(s.session, snap->snapshot);
            s.last = py::none();  // the last block belongs to the state the restore replaced
            return FD_OK;
        });
    });
}

FD_API fd_status fd_snapshot_info(const fd_snapshot* snapshot, int64_t* block, uint64_t* bytes) {
    static const char* fn = "fd_snapshot_info";
    return guarded([&]() -> fd_status {
        std::shared_ptr<SnapshotImpl> snap;
        fd_status st = get_snapshot(fn, snapshot, snap);
        if (st != FD_OK) return st;
        return with_python([&] {
            py::tuple info = glue("snapshot_info")(snap->snapshot);
            if (block != nullptr) *block = info[0].cast<int64_t>();
            if (bytes != nullptr) *bytes = info[1].cast<uint64_t>();
            return FD_OK;
        });
    });
}

FD_API fd_status fd_snapshot_destroy(fd_snapshot* snapshot) {
    return guarded([&]() -> fd_status {
        if (snapshot == nullptr) return succeed();
        std::shared_ptr<SnapshotImpl> impl = remove_snapshot(snapshot);
        if (!impl) {
            return fail(FD_INVALID_ARGUMENT, "fd_snapshot_destroy: the snapshot handle is not live (destroyed already, "
                                             "or not returned by fd_session_snapshot / fd_worlds_snapshot)");
        }
        impl.reset();  // frees the snapshot's memory (its destructor takes the GIL)
        return succeed();
    });
}

FD_API fd_status fd_session_destroy(fd_session* session) {
    return guarded([&]() -> fd_status {
        if (session == nullptr) return succeed();
        std::shared_ptr<SessionImpl> impl = remove_session(session);
        if (!impl) return dead_handle("fd_session_destroy", "session");
        impl.reset();  // frees the session's state (a call still running on another thread finishes first)
        return succeed();
    });
}

}  // extern "C"
