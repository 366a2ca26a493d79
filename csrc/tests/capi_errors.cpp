// capi_errors: drives every error path of the C ABI and prints one line per case:
//   case=<name> expected=<FD_...> got=<FD_...> result=PASS|FAIL|SKIP message=<first line of fd_last_error()>
// A failing call must return its status with a non-empty message; a call that succeeds
// must leave an empty message. Nothing may crash. Exit code 0 only if every case passed.
//
//   capi_errors [--prompt-file FILE.safetensors] [--snapshot-dir DIR]   (the file: prompt_embeds [1, 16, 32];
//   DIR: where the snapshot cases write their files, default ".")
#include <flashdreams.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {

int g_failed = 0;

// Records one case; `must_contain` lists strings the message has to include.
bool expect(const char* name, fd_status got, fd_status want, std::vector<std::string> must_contain = {}) {
    const std::string msg = fd_last_error();
    bool good = got == want && (want == FD_OK ? msg.empty() : !msg.empty());
    for (const std::string& s : must_contain) good = good && msg.find(s) != std::string::npos;
    std::printf("case=%s expected=%s got=%s result=%s message=%s\n", name, fd_status_name(want), fd_status_name(got),
                good ? "PASS" : "FAIL", msg.substr(0, msg.find('\n')).c_str());
    if (!good) ++g_failed;
    return good;
}

void skip(const char* name, fd_status want, const char* why) {
    std::printf("case=%s expected=%s got=- result=SKIP message=%s\n", name, fd_status_name(want), why);
}

const int64_t kPrompt[3] = {1, 16, 32};  // the built-in model's prompt_embeds
const int64_t kWrongDim[3] = {1, 16, 31};

}  // namespace

int main(int argc, char** argv) {
    const char* prompt_file = nullptr;
    std::string snapshot_dir = ".";
    for (int i = 1; i + 1 < argc; i += 2) {
        if (std::strcmp(argv[i], "--prompt-file") == 0) prompt_file = argv[i + 1];
        if (std::strcmp(argv[i], "--snapshot-dir") == 0) snapshot_dir = argv[i + 1];
    }
    std::vector<float> prompt(16 * 32, 0.25f), wrong(16 * 31, 0.25f);
    std::vector<int32_t> ints(16 * 32, 1);
    const fd_tensor_view good_view = {prompt.data(), FD_DTYPE_FLOAT32, 3, kPrompt, FD_MEMORY_HOST, 0};

    // ---- versions
    expect("check_version_ok", fd_check_version(FD_API_VERSION), FD_OK);
    expect("check_version_wrong_major", fd_check_version(static_cast<uint32_t>(FD_API_VERSION_MAJOR + 1) << 16),
           FD_ENGINE_INCOMPATIBLE);
    expect("check_version_newer_minor", fd_check_version(FD_API_VERSION + 1), FD_ENGINE_INCOMPATIBLE);

    // ---- engines
    fd_engine_options cpu = FD_ENGINE_OPTIONS_INIT;
    cpu.device = "cpu";
    expect("engine_open_null_out", fd_engine_open(nullptr, &cpu, nullptr), FD_INVALID_ARGUMENT);
    fd_engine* engine = reinterpret_cast<fd_engine*>(&cpu);  // garbage that a failed open must clear
    expect("engine_open_empty_path", fd_engine_open("", &cpu, &engine), FD_INVALID_ARGUMENT);
    engine = reinterpret_cast<fd_engine*>(&cpu);
    const fd_status missing = fd_engine_open("/nonexistent/flashdreams_engine_dir", &cpu, &engine);
    expect("engine_open_missing_dir", engine == nullptr ? missing : FD_INTERNAL, FD_NOT_FOUND);
    fd_engine_options o = cpu;
    o.preset = "no-such-preset";
    expect("engine_open_unknown_preset", fd_engine_open(nullptr, &o, &engine), FD_NOT_FOUND);
    o = cpu;
    o.dtype = "float64";
    expect("engine_open_bad_dtype", fd_engine_open(nullptr, &o, &engine), FD_INVALID_ARGUMENT);
    o = cpu;
    o.struct_size = 0;
    expect("engine_open_struct_size_zero", fd_engine_open(nullptr, &o, &engine), FD_INVALID_ARGUMENT);
    o.struct_size = sizeof(fd_engine_options) + 8;
    expect("engine_open_struct_size_newer", fd_engine_open(nullptr, &o, &engine), FD_INVALID_ARGUMENT);
    if (!expect("engine_open", fd_engine_open(nullptr, &cpu, &engine), FD_OK)) {
        std::printf("cannot go on without an engine\n");
        return 1;
    }

    // ---- sessions
    fd_session* session = nullptr;
    fd_session_options so = FD_SESSION_OPTIONS_INIT;
    expect("session_create_null_engine", fd_session_create(nullptr, &so, &session), FD_INVALID_ARGUMENT);
    expect("session_create_null_out", fd_session_create(engine, &so, nullptr), FD_INVALID_ARGUMENT);
    int not_a_handle = 0;
    expect("session_create_foreign_handle",
           fd_session_create(reinterpret_cast<fd_engine*>(&not_a_handle), &so, &session), FD_INVALID_ARGUMENT);
    so.prompt_embeds_file = "/nonexistent/prompt.safetensors";
    expect("session_create_missing_prompt_file", fd_session_create(engine, &so, &session), FD_NOT_FOUND);
    so.prompt_embeds = &good_view;
    expect("session_create_prompt_and_file", fd_session_create(engine, &so, &session), FD_INVALID_ARGUMENT);
    so.prompt_embeds_file = nullptr;
    const fd_tensor_view wrong_view = {wrong.data(), FD_DTYPE_FLOAT32, 3, kWrongDim, FD_MEMORY_HOST, 0};
    so.prompt_embeds = &wrong_view;
    expect("session_create_prompt_wrong_dim", fd_session_create(engine, &so, &session), FD_INVALID_ARGUMENT, {"32"});
    so = FD_SESSION_OPTIONS_INIT;
    if (prompt_file != nullptr) {
        so.prompt_embeds_file = prompt_file;
        fd_session* from_file = nullptr;
        expect("session_create_prompt_file", fd_session_create(engine, &so, &from_file), FD_OK);
        expect("session_destroy_from_file", fd_session_destroy(from_file), FD_OK);
        so.prompt_embeds_file = nullptr;
    } else {
        skip("session_create_prompt_file", FD_OK, "no --prompt-file given");
    }
    if (!expect("session_create", fd_session_create(engine, &so, &session), FD_OK)) return 1;

    // ---- input discovery
    int32_t n_inputs = -5;
    expect("input_count_null_session", fd_session_input_count(nullptr, &n_inputs), FD_INVALID_ARGUMENT);
    expect("input_count_null_out", fd_session_input_count(session, nullptr), FD_INVALID_ARGUMENT);
    expect("input_count_engine_as_session",
           fd_session_input_count(reinterpret_cast<fd_session*>(engine), &n_inputs), FD_INVALID_ARGUMENT);
    const fd_status counted = fd_session_input_count(session, &n_inputs);
    expect("input_count", n_inputs >= 1 ? counted : FD_INTERNAL, FD_OK);
    fd_input_info in_info = FD_INPUT_INFO_INIT;
    expect("input_info_null_session", fd_session_input_info(nullptr, 0, &in_info), FD_INVALID_ARGUMENT);
    expect("input_info_null_out", fd_session_input_info(session, 0, nullptr), FD_INVALID_ARGUMENT);
    expect("input_info_dead_session", fd_session_input_info(reinterpret_cast<fd_session*>(&not_a_handle), 0, &in_info),
           FD_INVALID_ARGUMENT, {"not live"});
    fd_status st = fd_session_input_info(session, -1, &in_info);
    expect("input_info_index_negative", in_info.name == nullptr ? st : FD_INTERNAL, FD_INVALID_ARGUMENT, {"-1"});
    st = fd_session_input_info(session, n_inputs, &in_info);  // one past the end: *in_info must stay as it was
    expect("input_info_index_past_end", in_info.name == nullptr ? st : FD_INTERNAL, FD_INVALID_ARGUMENT,
           {"index " + std::to_string(n_inputs), "0.." + std::to_string(n_inputs - 1)});
    expect("input_info_index_max", fd_session_input_info(session, INT32_MAX, &in_info), FD_INVALID_ARGUMENT,
           {std::to_string(INT32_MAX)});
    in_info.struct_size = 0;
    expect("input_info_struct_size_zero", fd_session_input_info(session, 0, &in_info), FD_INVALID_ARGUMENT,
           {"FD_INPUT_INFO_INIT"});
    in_info.struct_size = sizeof(fd_input_info) + 8;
    expect("input_info_struct_size_newer", fd_session_input_info(session, 0, &in_info), FD_INVALID_ARGUMENT);
    in_info = FD_INPUT_INFO_INIT;
    st = fd_session_input_info(session, 0, &in_info);
    const bool filled = in_info.name != nullptr && in_info.name[0] != '\0' && in_info.dtype_name != nullptr &&
                        in_info.meaning != nullptr && in_info.units != nullptr && in_info.when != nullptr &&
                        in_info.ndim >= 0 && in_info.ndim <= FD_MAX_DIMS;
    expect("input_info", filled ? st : FD_INTERNAL, FD_OK);
    // A host compiled against a header whose fd_input_info ended after dtype_name: nothing past it is written.
    fd_input_info older = FD_INPUT_INFO_INIT;
    older.struct_size = offsetof(fd_input_info, dtype);
    older.ndim = -7;
    st = fd_session_input_info(session, 0, &older);
    expect("input_info_older_struct", older.name != nullptr && older.ndim == -7 ? st : FD_INTERNAL, FD_OK);
    int32_t index = 5;
    expect("input_find_null_session", fd_session_input_find(nullptr, "prompt_embeds", &index), FD_INVALID_ARGUMENT);
    expect("input_find_null_name", fd_session_input_find(session, nullptr, &index), FD_INVALID_ARGUMENT);
    expect("input_find_null_out", fd_session_input_find(session, "prompt_embeds", nullptr), FD_INVALID_ARGUMENT);
    index = 5;
    st = fd_session_input_find(session, "action", &index);
    expect("input_find_unknown", index == -1 ? st : FD_INTERNAL, FD_NOT_FOUND, {"'action'", "prompt_embeds"});
    st = fd_session_input_find(session, "prompt_embeds", &index);
    expect("input_find", index >= 0 && index < n_inputs ? st : FD_INTERNAL, FD_OK);

    // ---- inputs
    fd_tensor_view v = good_view;
    expect("set_input_null_session", fd_session_set_input(nullptr, "prompt_embeds", &v), FD_INVALID_ARGUMENT);
    expect("set_input_engine_as_session",
           fd_session_set_input(reinterpret_cast<fd_session*>(engine), "prompt_embeds", &v), FD_INVALID_ARGUMENT);
    expect("set_input_null_name", fd_session_set_input(session, nullptr, &v), FD_INVALID_ARGUMENT);
    expect("set_input_null_view", fd_session_set_input(session, "prompt_embeds", nullptr), FD_INVALID_ARGUMENT);
    expect("set_input_unknown_name", fd_session_set_input(session, "action", &v), FD_INVALID_ARGUMENT, {"action"});
    expect("set_input_wrong_last_dim", fd_session_set_input(session, "prompt_embeds", &wrong_view),
           FD_INVALID_ARGUMENT, {"31"});
    v = good_view;
    v.data = ints.data();
    v.dtype = FD_DTYPE_INT32;
    expect("set_input_int32", fd_session_set_input(session, "prompt_embeds", &v), FD_INVALID_ARGUMENT, {"int32"});
    v = good_view;
    v.dtype = static_cast<fd_dtype>(0);
    expect("set_input_bad_dtype_enum", fd_session_set_input(session, "prompt_embeds", &v), FD_INVALID_ARGUMENT);
    v = good_view;
    v.data = nullptr;
    expect("set_input_null_data", fd_session_set_input(session, "prompt_embeds", &v), FD_INVALID_ARGUMENT);
    v = good_view;
    v.ndim = -1;
    expect("set_input_negative_ndim", fd_session_set_input(session, "prompt_embeds", &v), FD_INVALID_ARGUMENT);
    v = good_view;
    v.memory = static_cast<fd_memory>(7);
    expect("set_input_bad_memory", fd_session_set_input(session, "prompt_embeds", &v), FD_INVALID_ARGUMENT);
    expect("set_input", fd_session_set_input(session, "prompt_embeds", &good_view), FD_OK);

    // ---- steps and reads
    int64_t t = 0, h = 0, w = 0, c = 0;
    expect("frame_info_before_step", fd_session_frame_info(session, &t, &h, &w, &c), FD_INVALID_ARGUMENT);
    expect("step_null", fd_session_step(nullptr), FD_INVALID_ARGUMENT);
    if (!expect("step", fd_session_step(session), FD_OK)) return 1;
    const fd_status info = fd_session_frame_info(session, &t, &h, &w, &c);
    const bool has_frames = info != FD_NOT_FOUND;  // an engine without a decoder has latents only
    if (has_frames) {
        expect("frame_info", info, FD_OK);
        expect("frame_info_null_out", fd_session_frame_info(session, &t, nullptr, &w, &c), FD_INVALID_ARGUMENT);
        const size_t need = static_cast<size_t>(t * h * w * c);
        std::vector<uint8_t> buf(need);
        expect("read_frames_null_dst", fd_session_read_frames(session, nullptr, need, FD_MEMORY_HOST),
               FD_INVALID_ARGUMENT);
        expect("read_frames_too_small", fd_session_read_frames(session, buf.data(), need - 1, FD_MEMORY_HOST),
               FD_INVALID_ARGUMENT, {std::to_string(need - 1), std::to_string(need)});
        expect("read_frames_bad_memory", fd_session_read_frames(session, buf.data(), need, static_cast<fd_memory>(7)),
               FD_INVALID_ARGUMENT);
        expect("read_frames", fd_session_read_frames(session, buf.data(), need, FD_MEMORY_HOST), FD_OK);
    } else {
        for (const char* name : {"frame_info", "frame_info_null_out", "read_frames_null_dst", "read_frames_too_small",
                                 "read_frames_bad_memory", "read_frames"}) {
            skip(name, FD_OK, "the engine has no decoder");
        }
    }
    int64_t lc = 0, lf = 0, lh = 0, lw = 0;
    expect("latent_info", fd_session_latent_info(session, &lc, &lf, &lh, &lw), FD_OK);
    const size_t lat_bytes = static_cast<size_t>(lc * lf * lh * lw) * sizeof(float);
    std::vector<float> lat(lat_bytes / sizeof(float));
    expect("read_latents_too_small", fd_session_read_latents(session, lat.data(), lat_bytes / 2, FD_MEMORY_HOST),
           FD_INVALID_ARGUMENT, {std::to_string(lat_bytes / 2), std::to_string(lat_bytes)});
    expect("read_latents", fd_session_read_latents(session, lat.data(), lat_bytes, FD_MEMORY_HOST), FD_OK);
    expect("warm_up_past_block_0", fd_session_warm_up(session, nullptr), FD_INVALID_ARGUMENT, {"block"});
    // renew (API 1.5): every refusal leaves the session as it was, its last block readable
    fd_session_options next = FD_SESSION_OPTIONS_INIT;
    next.seed = 3;
    expect("renew_null", fd_session_renew(nullptr, &next), FD_INVALID_ARGUMENT, {"session"});
    next.struct_size = 0;
    expect("renew_struct_size_zero", fd_session_renew(session, &next), FD_INVALID_ARGUMENT);
    next.struct_size = sizeof(fd_session_options);
    next.prompt_embeds = &good_view;
    next.prompt_embeds_file = "prompt.safetensors";
    expect("renew_prompt_and_file", fd_session_renew(session, &next), FD_INVALID_ARGUMENT, {"both"});
    next.prompt_embeds_file = nullptr;
    next.prompt_embeds = &wrong_view;
    expect("renew_prompt_wrong_dim", fd_session_renew(session, &next), FD_INVALID_ARGUMENT, {"prompt_embeds"});
    next.prompt_embeds = nullptr;
    next.prompt_embeds_file = "no_such_prompt.safetensors";
    expect("renew_missing_prompt_file", fd_session_renew(session, &next), FD_NOT_FOUND, {"no_such_prompt"});
    expect("renew_refused_keeps_last_block", fd_session_latent_info(session, &lc, &lf, &lh, &lw), FD_OK);
    next.prompt_embeds_file = nullptr;
    next.prompt_embeds = &good_view;
    expect("renew", fd_session_renew(session, &next), FD_OK);
    expect("latent_info_after_renew", fd_session_latent_info(session, &lc, &lf, &lh, &lw), FD_INVALID_ARGUMENT);
    expect("renew_null_options", fd_session_renew(session, nullptr), FD_OK);
    expect("step_after_renew", fd_session_step(session), FD_OK);
    expect("reset_null", fd_session_reset(nullptr, 1), FD_INVALID_ARGUMENT);
    expect("reset", fd_session_reset(session, 1), FD_OK);
    expect("latent_info_after_reset", fd_session_latent_info(session, &lc, &lf, &lh, &lw), FD_INVALID_ARGUMENT);
    expect("warm_up_null", fd_session_warm_up(nullptr, nullptr), FD_INVALID_ARGUMENT);
    double warm_s = -1.0;
    expect("warm_up", fd_session_warm_up(session, &warm_s), FD_OK);
    expect("warm_up_took_time", warm_s > 0.0 ? FD_OK : FD_INVALID_ARGUMENT, FD_OK);

    // ---- snapshots (API 1.4)
    const std::string snap = snapshot_dir + "/capi_errors_snapshot.safetensors";
    const std::string junk = snapshot_dir + "/capi_errors_junk.safetensors";
    if (FILE* f = std::fopen(junk.c_str(), "wb")) {
        std::fputs("not a safetensors file", f);
        std::fclose(f);
    }
    expect("save_null", fd_session_save(nullptr, snap.c_str()), FD_INVALID_ARGUMENT);
    expect("save_null_path", fd_session_save(session, nullptr), FD_INVALID_ARGUMENT, {"path"});
    expect("save_empty_path", fd_session_save(session, ""), FD_INVALID_ARGUMENT, {"path is empty"});
    expect("save", fd_session_save(session, snap.c_str()), FD_OK);
    expect("load_missing", fd_session_load(session, (snapshot_dir + "/no_such_snapshot").c_str()), FD_NOT_FOUND,
           {"no_such_snapshot"});
    expect("load_not_a_snapshot", fd_session_load(session, junk.c_str()), FD_INVALID_ARGUMENT, {"not a FlashDreams"});
    expect("load", fd_session_load(session, snap.c_str()), FD_OK);
    fd_snapshot* mem = reinterpret_cast<fd_snapshot*>(&cpu);  // garbage that a failed call must clear
    expect("snapshot_null_out", fd_session_snapshot(session, FD_MEMORY_HOST, nullptr), FD_INVALID_ARGUMENT);
    const fd_status bad_memory = fd_session_snapshot(session, static_cast<fd_memory>(7), &mem);
    expect("snapshot_bad_memory", mem == nullptr ? bad_memory : FD_INTERNAL, FD_INVALID_ARGUMENT);  // out cleared
    expect("snapshot_null_session", fd_session_snapshot(nullptr, FD_MEMORY_HOST, &mem), FD_INVALID_ARGUMENT);
    expect("snapshot", fd_session_snapshot(session, FD_MEMORY_DEVICE, &mem), FD_OK);
    int64_t snap_block = -1;
    uint64_t snap_bytes = 0;
    expect("snapshot_info", fd_snapshot_info(mem, &snap_block, &snap_bytes), FD_OK);
    expect("snapshot_info_values", snap_block == 0 && snap_bytes > 0 ? FD_OK : FD_INTERNAL, FD_OK);
    expect("snapshot_info_null_outs", fd_snapshot_info(mem, nullptr, nullptr), FD_OK);
    expect("restore_null_snapshot", fd_session_restore(session, nullptr), FD_INVALID_ARGUMENT, {"snapshot"});
    expect("restore", fd_session_restore(session, mem), FD_OK);
    expect("snapshot_destroy", fd_snapshot_destroy(mem), FD_OK);
    expect("snapshot_destroy_twice", fd_snapshot_destroy(mem), FD_INVALID_ARGUMENT, {"not live"});
    expect("restore_destroyed_snapshot", fd_session_restore(session, mem), FD_INVALID_ARGUMENT, {"not live"});
    expect("snapshot_info_destroyed", fd_snapshot_info(mem, nullptr, nullptr), FD_INVALID_ARGUMENT, {"not live"});
    expect("snapshot_destroy_null", fd_snapshot_destroy(nullptr), FD_OK);
    {  // a snapshot of another model (the arena) does not fit this session
        fd_engine_options arena = cpu;
        arena.preset = "arena";
        fd_engine* other_engine = nullptr;
        fd_session* arena_session = nullptr;
        const std::string arena_snap = snapshot_dir + "/capi_errors_arena.safetensors";
        fd_snapshot* arena_mem = nullptr;
        if (fd_engine_open(nullptr, &arena, &other_engine) == FD_OK &&
            fd_session_create(other_engine, nullptr, &arena_session) == FD_OK &&
            fd_session_save(arena_session, arena_snap.c_str()) == FD_OK &&
            fd_session_snapshot(arena_session, FD_MEMORY_HOST, &arena_mem) == FD_OK) {
            expect("load_other_model", fd_session_load(session, arena_snap.c_str()), FD_ENGINE_INCOMPATIBLE,
                   {"same preset"});
            expect("restore_other_model", fd_session_restore(session, arena_mem), FD_ENGINE_INCOMPATIBLE,
                   {"same preset"});
        } else {  // the setup failed: say so
            expect("load_other_model", FD_INTERNAL, FD_ENGINE_INCOMPATIBLE);
            expect("restore_other_model", FD_INTERNAL, FD_ENGINE_INCOMPATIBLE);
        }
        (void)fd_session_destroy(arena_session);
        expect("snapshot_outlives_its_session", fd_snapshot_info(arena_mem, nullptr, nullptr), FD_OK);
        (void)fd_snapshot_destroy(arena_mem);
        (void)fd_engine_destroy(other_engine);
    }

    // ---- an engine destroyed while a session lives; that session stepped on another thread
    fd_session* other = nullptr;
    expect("session_create_second", fd_session_create(engine, nullptr, &other), FD_OK);
    expect("engine_destroy", fd_engine_destroy(engine), FD_OK);
    expect("engine_destroy_twice", fd_engine_destroy(engine), FD_INVALID_ARGUMENT);
    fd_session* never = nullptr;
    expect("session_create_destroyed_engine", fd_session_create(engine, nullptr, &never), FD_INVALID_ARGUMENT);
    fd_status thread_status = FD_INTERNAL;
    std::string thread_error;
    std::thread worker([&] {
        thread_status = fd_session_step(other);
        thread_error = fd_last_error();
    });
    worker.join();
    std::printf("case=step_on_thread_after_engine_destroy expected=FD_OK got=%s result=%s message=%s\n",
                fd_status_name(thread_status), thread_status == FD_OK ? "PASS" : "FAIL",
                thread_error.substr(0, thread_error.find('\n')).c_str());
    if (thread_status != FD_OK) ++g_failed;

    // ---- destroyed sessions
    expect("session_destroy", fd_session_destroy(session), FD_OK);
    expect("step_after_destroy", fd_session_step(session), FD_INVALID_ARGUMENT, {"not live"});
    expect("frame_info_after_destroy", fd_session_frame_info(session, &t, &h, &w, &c), FD_INVALID_ARGUMENT);
    expect("set_input_after_destroy", fd_session_set_input(session, "prompt_embeds", &good_view),
           FD_INVALID_ARGUMENT);
    expect("input_count_after_destroy", fd_session_input_count(session, &n_inputs), FD_INVALID_ARGUMENT,
           {"not live"});
    expect("input_info_after_destroy", fd_session_input_info(session, 0, &in_info), FD_INVALID_ARGUMENT, {"not live"});
    expect("save_after_destroy", fd_session_save(session, snap.c_str()), FD_INVALID_ARGUMENT, {"not live"});
    expect("session_destroy_twice", fd_session_destroy(session), FD_INVALID_ARGUMENT);
    expect("session_destroy_other", fd_session_destroy(other), FD_OK);
    expect("session_destroy_null", fd_session_destroy(nullptr), FD_OK);
    expect("engine_destroy_null", fd_engine_destroy(nullptr), FD_OK);

    std::printf("%s: %d case(s) failed\n", g_failed == 0 ? "ALL PASSED" : "FAILED", g_failed);
    return g_failed == 0 ? 0 : 1;
}
