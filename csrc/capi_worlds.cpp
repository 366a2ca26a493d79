// The fd_worlds_* functions of libflashdreams (API 1.3; see include/flashdreams.h): N worlds of
// one engine stepped in one batch, over flashdreams.batched.Worlds. Each function checks its C
// arguments here, then calls the glue (capi_runtime.cpp) with the worlds' lock held.
#include <cstdint>
#include <functional>
#include <string>

#include "capi_args.h"
#include "capi_runtime.h"

using namespace fdcapi;

namespace {

fd_status get_worlds(const char* fn, const fd_worlds* handle, std::shared_ptr<WorldsImpl>& w) {
    if (handle == nullptr) return null_arg(fn, "worlds");
    w = find_worlds(const_cast<fd_worlds*>(handle));
    return w ? FD_OK : dead_handle(fn, "worlds");
}

// Runs `body` in Python on worlds already looked up, with their lock held.
fd_status locked(WorldsImpl& w, const std::function<fd_status(WorldsImpl&)>& body) {
    auto lock = lock_without_gil(w.mu);
    return with_python([&] { return body(w); });
}

// Looks the worlds up and runs `body` on them (see `locked`).
fd_status in_worlds(const char* fn, const fd_worlds* handle, const std::function<fd_status(WorldsImpl&)>& body) {
    std::shared_ptr<WorldsImpl> w;
    fd_status st = get_worlds(fn, handle, w);
    return st != FD_OK ? st : locked(*w, body);
}

// fd_worlds_save / fd_worlds_load: world `world`'s snapshot written to or read from the file at `path`.
fd_status snapshot_file(const char* fn, fd_worlds* handle, int32_t world, const char* path, bool load) {
    if (path == nullptr) return null_arg(fn, "path");
    return in_worlds(fn, handle, [&](WorldsImpl& w) {
        glue(load ? "worlds_load" : "worlds_save")(w.worlds, world, py::str(path));
        return FD_OK;
    });
}

}  // namespace

extern "C" {

FD_API fd_status fd_worlds_create(fd_engine* engine, const fd_worlds_options* opts, fd_worlds** out) {
    static const char* fn = "fd_worlds_create";
    return guarded([&]() -> fd_status {
        if (out == nullptr) return null_arg(fn, "out");
        *out = nullptr;
        std::shared_ptr<EngineImpl> eng;
        fd_status found = get_engine(fn, engine, eng);
        if (found != FD_OK) return found;
        fd_worlds_options o = FD_WORLDS_OPTIONS_INIT;
        if (opts != nullptr) {
            fd_status st = check_struct_size(fn, "fd_worlds_options", "FD_WORLDS_OPTIONS_INIT", opts->struct_size,
                                             sizeof(fd_worlds_options));
            if (st != FD_OK) return st;
            if (FD_HAS_FIELD(opts, fd_worlds_options, count)) o.count = opts->count;
            if (FD_HAS_FIELD(opts, fd_worlds_options, seeds)) o.seeds = opts->seeds;
        }
        if (o.count < 1) {
            return fail(FD_INVALID_ARGUMENT, std::string(fn) + ": count is " + std::to_string(o.count) +
                                                 "; ask for at least 1 world");
        }
        auto impl = std::make_shared<WorldsImpl>();
        impl->engine = eng;
        fd_status st = with_python([&] {
            py::list seeds;
            for (int32_t i = 0; i < o.count; ++i) {
                seeds.append(py::int_(o.seeds != nullptr ? o.seeds[i] : static_cast<uint64_t>(i)));
            }
            impl->worlds = glue("create_worlds")(eng->engine, seeds);
            impl->last = py::none();
            return FD_OK;
        });
        if (st == FD_OK) *out = register_worlds(std::move(impl));
        return st;
    });
}

FD_API fd_status fd_worlds_count(const fd_worlds* worlds, int32_t* count) {
    static const char* fn = "fd_worlds_count";
    return guarded([&]() -> fd_status {
        if (count == nullptr) return null_arg(fn, "count");
        *count = 0;
        return in_worlds(fn, worlds, [&](WorldsImpl& w) {
            *count = w.worlds.attr("n").cast<int32_t>();
            return FD_OK;
        });
    });
}

FD_API fd_status fd_worlds_set_input(fd_worlds* worlds, int32_t world, const char* name, const fd_tensor_view* value) {
    static const char* fn = "fd_worlds_set_input";
    return guarded([&]() -> fd_status {
        std::shared_ptr<WorldsImpl> w;
        fd_status st = get_worlds(fn, worlds, w);
        if (st != FD_OK) return st;
        if (name == nullptr) return null_arg(fn, "name");
        st = check_view(fn, name, value);
        if (st != FD_OK) return st;
        return locked(*w, [&](WorldsImpl& impl) {
            glue("worlds_set_input")(impl.worlds, world, name, view_to_tensor(value));
            return FD_OK;
        });
    });
}

FD_API fd_status fd_worlds_step(fd_worlds* worlds, int32_t* failed) {
    static const char* fn = "fd_worlds_step";
    return guarded([&]() -> fd_status {
        if (failed != nullptr) *failed = 0;
        return in_worlds(fn, worlds, [&](WorldsImpl& w) {
            w.last = py::none();  // a failed step leaves no stale block to read
            py::tuple r = glue("worlds_step")(w.worlds);
            w.last = r[0];
            if (failed != nullptr) *failed = r[1].cast<int32_t>();
            return FD_OK;
        });
    });
}

FD_API fd_status fd_worlds_world_state(fd_worlds* worlds, int32_t world, int64_t* block, int32_t* failed,
                                       int64_t* padding_frames) {
    static const char* fn = "fd_worlds_world_state";
    return guarded([&]() -> fd_status {
        return in_worlds(fn, worlds, [&](WorldsImpl& w) {
            py::tuple s = glue("world_state")(w.worlds, w.last, world);
            if (block != nullptr) *block = s[0].cast<int64_t>();
            if (failed != nullptr) *failed = s[1].cast<int32_t>();
            if (padding_frames != nullptr) *padding_frames = s[2].cast<int64_t>();
            return FD_OK;
        });
    });
}

FD_API fd_status fd_worlds_frame_info(fd_worlds* worlds, int64_t* num_frames, int64_t* height, int64_t* width,
                                      int64_t* channels) {
    static const char* fn = "fd_worlds_frame_info";
    int64_t* out[4] = {num_frames, height, width, channels};
    return guarded([&]() -> fd_status {
        for (int64_t* p : out) {
            if (p == nullptr) return fail(FD_INVALID_ARGUMENT, std::string(fn) + ": an out pointer is NULL");
        }
        return in_worlds(fn, worlds, [&](WorldsImpl& w) {
            py::tuple shape = glue("worlds_frame_shape")(w.last);
            for (int i = 0; i < 4; ++i) *out[i] = shape[i].cast<int64_t>();
            return FD_OK;
        });
    });
}

FD_API fd_status fd_worlds_read_frames(fd_worlds* worlds, int32_t world, void* dst, size_t dst_bytes,
                                       fd_memory memory) {
    static const char* fn = "fd_worlds_read_frames";
    return guarded([&]() -> fd_status {
        std::shared_ptr<WorldsImpl> w;
        fd_status st = get_worlds(fn, worlds, w);
        if (st != FD_OK) return st;
        if (dst == nullptr) return null_arg(fn, "dst");
        st = check_memory(fn, memory);
        if (st != FD_OK) return st;
        return locked(*w, [&](WorldsImpl& impl) {
            glue("worlds_read")(impl.worlds, impl.last, world, reinterpret_cast<uintptr_t>(dst), dst_bytes,
                                static_cast<int>(memory));
            return FD_OK;
        });
    });
}

FD_API fd_status fd_worlds_reset(fd_worlds* worlds, int32_t world, uint64_t seed) {
    return guarded([&] {
        return in_worlds("fd_worlds_reset", worlds, [&](WorldsImpl& w) {
            glue("worlds_reset")(w.worlds, world, py::int_(seed));
            return FD_OK;
        });
    });
}

FD_API fd_status fd_worlds_save(fd_worlds* worlds, int32_t world, const char* path) {
    return guarded([&] { return snapshot_file("fd_worlds_save", worlds, world, path, false); });
}

FD_API fd_status fd_worlds_load(fd_worlds* worlds, int32_t world, const char* path) {
    return guarded([&] { return snapshot_file("fd_worlds_load", worlds, world, path, true); });
}

FD_API fd_status fd_worlds_snapshot(fd_worlds* worlds, int32_t world, fd_memory where, fd_snapshot** out) {
    static const char* fn = "fd_worlds_snapshot";
    return guarded([&] {
        return new_snapshot(fn, where, out, [&](SnapshotImpl& snap) {
            return in_worlds(fn, worlds, [&](WorldsImpl& w) {
                snap.snapshot = glue("worlds_snapshot")(w.worlds, world, where == FD_MEMORY_HOST);
                return FD_OK;
            });
        });
    });
}

FD_API fd_status fd_worlds_restore(fd_worlds* worlds, int32_t world, const fd_snapshot* snapshot) {
    static const char* fn = "fd_worlds_restore";
    return guarded([&]() -> fd_status {
        std::shared_ptr<SnapshotImpl> snap;
        fd_status st = get_snapshot(fn, snapshot, snap);
        if (st != FD_OK) return st;
        return in_worlds(fn, worlds, [&](WorldsImpl& w) {
            glue("worlds_restore")(w.worlds, world, snap->snapshot);
            return FD_OK;
        });
    });
}

FD_API fd_status fd_worlds_destroy(fd_worlds* worlds) {
    return guarded([&]() -> fd_status {
        if (worlds == nullptr) return succeed();
        std::shared_ptr<WorldsImpl> impl = remove_worlds(worlds);
        if (!impl) return dead_handle("fd_worlds_destroy", "worlds");
        impl.reset();  // frees the worlds' state (a call still running on another thread finishes first)
        return succeed();
    });
}

}  // extern "C"
