// sim_host: a small C++ "simulator" that drives a FlashDreams session through the C ABI.
//
//   sim_host [--ticks N] [--seed S] [--preset NAME] [--input NAME] [--out FRAMES.npy] [--latents LATENTS.npy]
//            [--rewind K [--snapshot FILE | --in-memory]] [--renew K [--renew-seed S]]
//
// It checks the API version, opens a built-in model (--preset; default the tiny causal Wan),
// creates a session, prints the inputs the session takes (one line each: "input I: NAME
// DTYPE [SHAPE] when=... units=... range=[LOW, HIGH]: MEANING"), and runs N ticks (default
// 6). Every 2nd tick (0, 2, 4, ...) it steers the world through one named input (--input;
// default "prompt_embeds"), of the shape and dtype the session reports, filled by
//   value[i] = ((7 * i + 13 * phase) % 17 - 8) / 8,   i = flat index, phase = tick / 2
// or, for an input with a range [LOW, HIGH] (keys, mouse), by
//   value[i] = (7 * i + 13 * phase) % 17 >= 9 ? HIGH : LOW
// (exact in float32, so a Python replay gets the same bits). The same calls drive a
// prompt-steered model and a keyboard world (--preset arena --input keyboard). Each tick it steps one
// block, reads the block's frames into a host buffer, and prints its timing. At the
// end it writes every frame to --out (default sim_host_frames.npy): uint8
// [frames, height, width, 3], readable with numpy.load. --latents also writes each
// block's latents, float32 [ticks, channels, frames, height, width]. --rewind K saves the
// session before tick K (fd_session_save, to --snapshot FILE), and after the last tick loads
// it back (fd_session_load) and runs ticks K.. again, checking that their frames and latents
// are the ones of the first run; with --in-memory through fd_session_snapshot / fd_session_restore.
// --renew K hands the world to a next user before tick K: fd_session_renew with seed S (default
// seed + 1) and the model's default prompt, after which ticks K.. are those a session created with
// seed S makes (the input schedule goes on by tick number).
#include <flashdreams.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace {

constexpr int kInputEvery = 2;  // ticks between input changes

struct EngineDeleter {
    void operator()(fd_engine* e) const { fd_engine_destroy(e); }
};
struct SessionDeleter {
    void operator()(fd_session* s) const { fd_session_destroy(s); }
};
using EnginePtr = std::unique_ptr<fd_engine, EngineDeleter>;
using SessionPtr = std::unique_ptr<fd_session, SessionDeleter>;

bool ok(fd_status st, const char* what) {
    if (st == FD_OK) return true;
    std::fprintf(stderr, "sim_host: %s failed: %s: %s\n", what, fd_status_name(st), fd_last_error());
    return false;
}

double ms_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// The value sim_host sends for phase `phase` (see the top of this file).
std::vector<float> input_for(int phase, size_t numel, const fd_input_info& info) {
    std::vector<float> v(numel);
    const bool ranged = info.has_low && info.has_high;
    for (size_t i = 0; i < v.size(); ++i) {
        const int k = static_cast<int>((7 * i + 13 * phase) % 17);
        v[i] = ranged ? static_cast<float>(k >= 9 ? info.high : info.low) : static_cast<float>(k - 8) / 8.0f;
    }
    return v;
}

// "[1, 16, 32]"
std::string shape_text(const int64_t* shape, int32_t ndim) {
    std::string s = "[";
    for (int32_t i = 0; i < ndim; ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

// Prints the inputs the session takes; returns false if the C ABI refused.
bool print_inputs(const fd_session* session) {
    int32_t n = 0;
    if (!ok(fd_session_input_count(session, &n), "fd_session_input_count")) return false;
    std::printf("session inputs: %d\n", n);
    for (int32_t i = 0; i < n; ++i) {
        fd_input_info in = FD_INPUT_INFO_INIT;
        if (!ok(fd_session_input_info(session, i, &in), "fd_session_input_info")) return false;
        char low[32] = "-inf", high[32] = "inf";
        if (in.has_low) std::snprintf(low, sizeof(low), "%g", in.low);
        if (in.has_high) std::snprintf(high, sizeof(high), "%g", in.high);
        std::printf("input %d: %s %s %s when=%s units=%s range=[%s, %s]: %s\n", i, in.name, in.dtype_name,
                    shape_text(in.shape, in.ndim).c_str(), in.when, in.units, low, high, in.meaning);
    }
    return true;
}

// A .npy file (format 1.0): magic, header length, a Python dict literal, the raw data.
bool write_npy(const std::string& path, const char* descr, const std::vector<int64_t>& shape, const void* data,
               size_t bytes) {
    std::string dims;
    for (int64_t d : shape) dims += std::to_string(d) + ", ";
    std::string header = "{'descr': '" + std::string(descr) + "', 'fortran_order': False, 'shape': (" + dims + "), }";
    header.append(63 - (10 + header.size()) % 64, ' ');  // pad so the data starts 64-byte aligned
    header += '\n';
    FILE* f = std::fopen(path.c_str(), "wb");
    if (f == nullptr) {
        std::fprintf(stderr, "sim_host: cannot write %s\n", path.c_str());
        return false;
    }
    const unsigned char magic[8] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0};
    const unsigned char len[2] = {static_cast<unsigned char>(header.size() & 0xff),
                                  static_cast<unsigned char>(header.size() >> 8)};
    bool good = std::fwrite(magic, 1, 8, f) == 8 && std::fwrite(len, 1, 2, f) == 2 &&
                std::fwrite(header.data(), 1, header.size(), f) == header.size() &&
                std::fwrite(data, 1, bytes, f) == bytes;
    good = (std::fclose(f) == 0) && good;
    return good;
}

}  // namespace

int main(int argc, char** argv) {
    int ticks = 6;
    uint64_t seed = 0;
    int rewind = -1, renew = -1;
    uint64_t renew_seed = 0;
    bool renew_seed_given = false;
    bool in_memory = false;
    std::string out = "sim_host_frames.npy", latents_out, preset, engine_dir, input = "prompt_embeds";
    std::string snapshot = "sim_host_snapshot.safetensors";
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        const bool has_value = i + 1 < argc;
        if (a == "--ticks" && has_value) {
            ticks = std::atoi(argv[++i]);
        } else if (a == "--seed" && has_value) {
            seed = std::strtoull(argv[++i], nullptr, 10);
        } else if (a == "--out" && has_value) {
            out = argv[++i];
        } else if (a == "--latents" && has_value) {
            latents_out = argv[++i];
        } else if (a == "--preset" && has_value) {
            preset = argv[++i];
        } else if (a == "--engine" && has_value) {
            engine_dir = argv[++i];
        } else if (a == "--input" && has_value) {
            input = argv[++i];
        } else if (a == "--rewind" && has_value) {
            rewind = std::atoi(argv[++i]);
        } else if (a == "--snapshot" && has_value) {
            snapshot = argv[++i];
        } else if (a == "--renew" && has_value) {
            renew = std::atoi(argv[++i]);
        } else if (a == "--renew-seed" && has_value) {
            renew_seed = std::strtoull(argv[++i], nullptr, 10);
            renew_seed_given = true;
        } else if (a == "--in-memory") {
            in_memory = true;
        } else {
            std::fprintf(stderr,
                         "usage: sim_host [--ticks N] [--seed S] [--preset NAME | --engine DIR] [--input NAME] "
                         "[--out FILE.npy] [--latents FILE.npy] [--rewind K [--snapshot FILE | --in-memory]] "
                         "[--renew K [--renew-seed S]]\n");
            return 2;
        }
    }

    if (renew >= 0 && rewind >= 0) {
        // The rewind replays ticks with the session it has then; a renew inside them would not be replayed.
        std::fprintf(stderr, "sim_host: --renew and --rewind do not combine; pass one\n");
        return 2;
    }
    if (!ok(fd_check_version(FD_API_VERSION), "fd_check_version")) return 1;
    const uint32_t v = fd_api_version();
    std::printf("libflashdreams API %u.%u\n", v >> 16, v & 0xffff);

    auto t0 = std::chrono::steady_clock::now();
    fd_engine* raw_engine = nullptr;
    fd_engine_options eopts = FD_ENGINE_OPTIONS_INIT;
    eopts.preset = preset.empty() ? nullptr : preset.c_str();
    // An engine directory built by fd-build, or (no --engine) a built-in model or --preset.
    const char* path = engine_dir.empty() ? nullptr : engine_dir.c_str();
    if (!ok(fd_engine_open(path, &eopts, &raw_engine), "fd_engine_open")) return 1;
    EnginePtr engine(raw_engine);
    fd_session_options sopts = FD_SESSION_OPTIONS_INIT;
    sopts.seed = seed;
    fd_session* raw_session = nullptr;
    if (!ok(fd_session_create(engine.get(), &sopts, &raw_session), "fd_session_create")) return 1;
    SessionPtr session(raw_session);
    std::printf("engine + session ready in %.1f ms (seed %llu)\n", ms_since(t0), static_cast<unsigned long long>(seed));

    // What the model takes: the input's shape and range come from the session, not from this file.
    if (!print_inputs(session.get())) return 1;
    int32_t input_index = -1;
    if (!ok(fd_session_input_find(session.get(), input.c_str(), &input_index), "fd_session_input_find")) return 1;
    fd_input_info info = FD_INPUT_INFO_INIT;
    if (!ok(fd_session_input_info(session.get(), input_index, &info), "fd_session_input_info")) return 1;
    if (info.dtype != FD_DTYPE_FLOAT32) {
        std::fprintf(stderr, "sim_host: %s is %s; this host sends float32\n", input.c_str(), info.dtype_name);
        return 1;
    }
    size_t input_numel = 1;
    for (int32_t i = 0; i < info.ndim; ++i) input_numel *= static_cast<size_t>(info.shape[i]);

    std::vector<uint8_t> frames, block;  // all frames so far; this tick's frames
    std::vector<float> latents, lat_block;
    int64_t total_frames = 0, height = 0, width = 0, lat_shape[4] = {0, 0, 0, 0};
    bool have_frames = true;
    // One tick: the input change on its schedule, one step, the block's frames (and latents) read
    // into `block` / `lat_block`. False if the C ABI refused.
    auto run_tick = [&](int tick, bool& change, double& step_ms, double& read_ms, int64_t* fthw) -> bool {
        change = tick % kInputEvery == 0;
        if (change) {
            std::vector<float> value = input_for(tick / kInputEvery, input_numel, info);
            fd_tensor_view view = {value.data(), FD_DTYPE_FLOAT32, info.ndim, info.shape, FD_MEMORY_HOST, 0};
            if (!ok(fd_session_set_input(session.get(), input.c_str(), &view), "fd_session_set_input")) return false;
        }
        auto t_step = std::chrono::steady_clock::now();
        if (!ok(fd_session_step(session.get()), "fd_session_step")) return false;
        step_ms = ms_since(t_step);
        auto t_read = std::chrono::steady_clock::now();
        int64_t& t = fthw[0];
        if (have_frames) {
            const fd_status st = fd_session_frame_info(session.get(), &fthw[0], &fthw[1], &fthw[2], &fthw[3]);
            if (st == FD_NOT_FOUND) {
                std::printf("note: %s\n", fd_last_error());  // an engine without a decoder: latents only
                have_frames = false;
            } else if (!ok(st, "fd_session_frame_info")) {
                return false;
            }
        }
        if (have_frames) {
            block.resize(static_cast<size_t>(t * fthw[1] * fthw[2] * fthw[3]));
            if (!ok(fd_session_read_frames(session.get(), block.data(), block.size(), FD_MEMORY_HOST),
                    "fd_session_read_frames")) {
                return false;
            }
        }
        if (!latents_out.empty() || rewind >= 0) {
            if (!ok(fd_session_latent_info(session.get(), &lat_shape[0], &lat_shape[1], &lat_shape[2], &lat_shape[3]),
                    "fd_session_latent_info")) {
                return false;
            }
            lat_block.resize(static_cast<size_t>(lat_shape[0] * lat_shape[1] * lat_shape[2] * lat_shape[3]));
            if (!ok(fd_session_read_latents(session.get(), lat_block.data(), lat_block.size() * sizeof(float),
                                            FD_MEMORY_HOST),
                    "fd_session_read_latents")) {
                return false;
            }
        }
        read_ms = ms_since(t_read);
        return true;
    };

    fd_snapshot* memory_snapshot = nullptr;  // --in-memory: the state before tick K, on the session's device
    struct SnapshotGuard {
        fd_snapshot*& s;
        ~SnapshotGuard() { (void)fd_snapshot_destroy(s); }
    } snapshot_guard{memory_snapshot};
    std::vector<std::vector<uint8_t>> after_frames;  // --rewind: each tick's frames and latents from tick K on
    std::vector<std::vector<float>> after_latents;
    for (int tick = 0; tick < ticks; ++tick) {
        if (tick == rewind) {
            const bool saved = in_memory ? ok(fd_session_snapshot(session.get(), FD_MEMORY_DEVICE, &memory_snapshot),
                                              "fd_session_snapshot")
                                         : ok(fd_session_save(session.get(), snapshot.c_str()), "fd_session_save");
            if (!saved) return 1;
        }
        if (tick == renew) {
            // The next user: this session's buffers and captured graphs, a fresh world.
            fd_session_options next = FD_SESSION_OPTIONS_INIT;
            next.seed = renew_seed_given ? renew_seed : seed + 1;
            if (!ok(fd_session_renew(session.get(), &next), "fd_session_renew")) return 1;
            std::printf("renew: before tick %d, seed %llu\n", tick, static_cast<unsigned long long>(next.seed));
        }
        auto t_tick = std::chrono::steady_clock::now();
        bool change = false;
        double step_ms = 0.0, read_ms = 0.0;
        int64_t fthw[4] = {0, 0, 0, 0};
        if (!run_tick(tick, change, step_ms, read_ms, fthw)) return 1;
        if (have_frames) {
            frames.insert(frames.end(), block.begin(), block.end());
            total_frames += fthw[0];
            height = fthw[1];
            width = fthw[2];
        }
        if (!latents_out.empty()) latents.insert(latents.end(), lat_block.begin(), lat_block.end());
        if (rewind >= 0 && tick >= rewind) {
            after_frames.push_back(block);
            after_latents.push_back(lat_block);
        }
        std::printf("tick %d:%s step %.1f ms, read %.2f ms, total %.1f ms, %lld frames %lldx%lld\n", tick,
                    change ? " new input," : "", step_ms, read_ms, ms_since(t_tick), static_cast<long long>(fthw[0]),
                    static_cast<long long>(fthw[1]), static_cast<long long>(fthw[2]));
    }
    if (rewind >= 0 && rewind < ticks) {
        // Back to the snapshot taken before tick K, and ticks K.. again with the same inputs: a host that
        // rewinds its simulation gets the same frames again.
        const bool back = in_memory ? ok(fd_session_restore(session.get(), memory_snapshot), "fd_session_restore")
                                    : ok(fd_session_load(session.get(), snapshot.c_str()), "fd_session_load");
        if (!back) return 1;
        for (int tick = rewind; tick < ticks; ++tick) {
            bool change = false;
            double step_ms = 0.0, read_ms = 0.0;
            int64_t fthw[4] = {0, 0, 0, 0};
            if (!run_tick(tick, change, step_ms, read_ms, fthw)) return 1;
            const size_t k = static_cast<size_t>(tick - rewind);
            if ((have_frames && block != after_frames[k]) || lat_block != after_latents[k]) {
                std::printf("rewind: tick %d differs from its first run\n", tick);
                return 1;
            }
        }
        std::printf("rewind: ticks %d..%d again from the %s snapshot before tick %d: identical\n", rewind,
                    ticks - 1, in_memory ? "in-memory" : "file", rewind);
    }

    if (have_frames && ticks > 0) {
        if (!write_npy(out, "|u1", {total_frames, height, width, 3}, frames.data(), frames.size())) return 1;
        std::printf("wrote %lld frames to %s\n", static_cast<long long>(total_frames), out.c_str());
    }
    if (!latents_out.empty() && ticks > 0) {
        const std::vector<int64_t> shape = {ticks, lat_shape[0], lat_shape[1], lat_shape[2], lat_shape[3]};
        if (!write_npy(latents_out, "<f4", shape, latents.data(), latents.size() * sizeof(float))) return 1;
        std::printf("wrote latents to %s\n", latents_out.c_str());
    }
    return 0;
}
