/*
 * flashdreams.h: the C ABI of FlashDreams, for simulators and other native hosts.
 *
 * A host opens an engine once, creates one session per rollout, and each tick
 * sets its inputs, steps one block, and reads the block's frames (check every
 * returned status in real code; examples/sim_host/sim_host.cpp shows how):
 *
 *     if (fd_check_version(FD_API_VERSION) != FD_OK) { puts(fd_last_error()); return 1; }
 *     fd_engine* eng = NULL;   fd_session* s = NULL;
 *     fd_engine_open(NULL, NULL, &eng);             // NULL path: the built-in tiny model
 *     fd_session_create(eng, NULL, &s);             // seed 0, default prompt
 *     int32_t n;  fd_input_info in = FD_INPUT_INFO_INIT;
 *     fd_session_input_count(s, &n);                // what the model takes: name, dtype, shape, ...
 *     for (int32_t i = 0; i < n; ++i) fd_session_input_info(s, i, &in);
 *     for (;;) {
 *         fd_session_set_input(s, "prompt_embeds", &view);   // optional, any tick
 *         fd_session_step(s);
 *         int64_t t, h, w, c;
 *         fd_session_frame_info(s, &t, &h, &w, &c);
 *         fd_session_read_frames(s, buf, (size_t)(t * h * w * c), FD_MEMORY_HOST);
 *     }
 *     fd_session_destroy(s);  fd_engine_destroy(eng);
 *
 * Errors. Every call that can fail returns an fd_status; FD_OK is 0. On failure,
 * fd_last_error() holds a message for the calling thread: it names the thing, the
 * expected and the found value, and what to do. No call crashes on a NULL or a
 * destroyed handle: those return FD_INVALID_ARGUMENT.
 *
 * Threads. An engine may be shared between threads (sessions of one engine may
 * run on different threads). A session is used from one thread at a time; calls
 * on one session from two threads are serialised, never interleaved. The Python
 * runtime runs one thread at a time outside torch's kernels, so sessions on several
 * threads overlap only in device and kernel time.
 *
 * Runtime. This version runs the Python implementation inside the process: the
 * library starts one Python interpreter on first use (or joins the host's, when
 * the host is itself Python) and never shuts it down. It finds the `flashdreams`
 * package like this:
 *   1. $FLASHDREAMS_PYTHON, else the Python the library was built with, names the
 *      interpreter whose environment (virtualenv included) is used;
 *   2. $PYTHONHOME and $PYTHONPATH are honoured as by `python` itself;
 *   3. if `import flashdreams` still fails, the site-packages folder of the build
 *      is added to sys.path.
 * So a host built against the package's CMake files runs as is; a host moved to
 * another machine sets FLASHDREAMS_PYTHON=/path/to/venv/bin/python (or PYTHONPATH).
 * The interpreter does not install signal handlers: Ctrl-C stays the host's.
 *
 * Build. `python csrc/build.py` installs this header, libflashdreams and a CMake
 * package into `python -c 'import flashdreams; print(flashdreams.cmake_prefix_path)'`;
 * a host's CMakeLists.txt then says:
 *     find_package(flashdreams REQUIRED)
 *     target_link_libraries(app PRIVATE flashdreams::flashdreams)
 */
#ifndef FLASHDREAMS_H_
#define FLASHDREAMS_H_

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#  if defined(FD_BUILDING_LIBRARY)
#    define FD_API __declspec(dllexport)
#  else
#    define FD_API __declspec(dllimport)
#  endif
#elif defined(__GNUC__) || defined(__clang__)
#  define FD_API __attribute__((visibility("default")))
#else
#  define FD_API
#endif

#if defined(__GNUC__) || defined(__clang__)
#  define FD_MUST_USE __attribute__((warn_unused_result))
#else
#  define FD_MUST_USE
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Status and errors -------------------------------------------------- */

/* Numbering shared with flashdreams.errors.STATUS_CODES; append only. */
typedef enum fd_status {
    FD_OK = 0,
    FD_INVALID_ARGUMENT = 1,    /* wrong shape, dtype, range, option, handle, buffer size */
    FD_NOT_FOUND = 2,           /* missing file, key, preset, graph, decoder, package */
    FD_ENGINE_INCOMPATIBLE = 3, /* engine built for another machine or schema; API version */
    FD_OUT_OF_MEMORY = 4,       /* the device (or host) cannot hold the session */
    FD_DEVICE_ERROR = 5,        /* CUDA or driver failure */
    FD_INTERNAL = 6,            /* a bug in FlashDreams: the message has a traceback, report it */
    FD_STATUS_MAX_ENUM_ = 0x7fffffff /* not a status: keeps every fd_* enum 32-bit, any int32 valid */
} fd_status;

/* The message of the calling thread's last call: empty after a call that returned
 * FD_OK. Valid until this thread's next fd_* call; copy it to keep it. Never NULL. */
FD_API const char* fd_last_error(void);

/* "FD_OK", "FD_INVALID_ARGUMENT", ...; "FD_UNKNOWN_STATUS" for other values. */
FD_API const char* fd_status_name(fd_status status);

/* ---- Version ------------------------------------------------------------ */

/* The API this header describes. Same major: compatible; a newer minor only adds. */
#define FD_API_VERSION_MAJOR 1
#define FD_API_VERSION_MINOR 5 /* 1.1: fd_session_input_count, fd_session_input_info, fd_session_input_find;
                                  1.2: fd_session_warm_up; 1.3: fd_worlds_* (many worlds, one batch);
                                  1.4: snapshots: fd_session_save/_load, fd_worlds_save/_load (files);
                                  fd_session_snapshot/_restore, fd_worlds_snapshot/_restore, fd_snapshot_*;
                                  1.5: fd_session_renew */
#define FD_API_VERSION ((uint32_t)((FD_API_VERSION_MAJOR << 16) | FD_API_VERSION_MINOR))

/* The API version of the loaded library, (major << 16) | minor. */
FD_API uint32_t fd_api_version(void);

/* FD_OK if a host compiled against `compiled_version` (pass FD_API_VERSION) can use
 * the loaded library: same major, and the library's minor is at least the host's.
 * Otherwise FD_ENGINE_INCOMPATIBLE, naming both versions. Call it once at start. */
FD_API FD_MUST_USE fd_status fd_check_version(uint32_t compiled_version);

/* ---- Tensors ------------------------------------------------------------ */

typedef enum fd_dtype {
    FD_DTYPE_FLOAT32 = 1,
    FD_DTYPE_FLOAT16 = 2,
    FD_DTYPE_BFLOAT16 = 3, /* passed as uint16_t bit patterns */
    FD_DTYPE_UINT8 = 4,
    FD_DTYPE_INT32 = 5,
    FD_DTYPE_INT64 = 6,
    FD_DTYPE_MAX_ENUM_ = 0x7fffffff
} fd_dtype;

typedef enum fd_memory {
    FD_MEMORY_HOST = 0,  /* ordinary (or pinned) CPU memory */
    FD_MEMORY_DEVICE = 1, /* CUDA device memory */
    FD_MEMORY_MAX_ENUM_ = 0x7fffffff
} fd_memory;

#define FD_MAX_DIMS 8

/* A borrowed view of caller memory: dense, C order (last dimension fastest).
 * The library copies what it needs before the call returns; it never keeps `data`.
 * Device data must be ready when the call starts (synchronise the host's stream). */
typedef struct fd_tensor_view {
    void* data;           /* may be NULL only when a dimension is 0 */
    fd_dtype dtype;
    int32_t ndim;         /* 0 .. FD_MAX_DIMS */
    const int64_t* shape; /* ndim sizes, each >= 0 */
    fd_memory memory;
    int32_t device_index; /* CUDA device of `data` when memory == FD_MEMORY_DEVICE; else ignored */
} fd_tensor_view;

/* ---- Engines ------------------------------------------------------------ */

typedef struct fd_engine fd_engine;   /* opaque */
typedef struct fd_session fd_session; /* opaque */
typedef struct fd_worlds fd_worlds;   /* opaque; API 1.3 */
typedef struct fd_snapshot fd_snapshot; /* opaque; API 1.4 */

/* Options for fd_engine_open. Start from FD_ENGINE_OPTIONS_INIT: struct_size tells
 * the library which fields the host knows, so the struct can grow. NULL or "" in a
 * string field means its default. */
typedef struct fd_engine_options {
    size_t struct_size;    /* sizeof(fd_engine_options) */
    const char* device;    /* "cpu", "cuda", "cuda:1"; default: the GPU if any, else the CPU */
    const char* dtype;     /* "float32", "bfloat16", "float16"; default: bfloat16 on GPU, float32 on CPU */
    const char* preset;    /* preset name; default: "tiny" for the built-in model, else "self-forcing-1.3b" */
    const char* attention; /* attention implementation; default: "sdpa" */
} fd_engine_options;

#define FD_ENGINE_OPTIONS_INIT {sizeof(fd_engine_options), NULL, NULL, NULL, NULL}

/* Open an engine. `path`:
 *   NULL                      the built-in tiny model (deterministic weights, no download);
 *   a .safetensors file/dir   a checkpoint, run eagerly (opts->preset names its model);
 *   a directory with manifest.json   an engine built by fd-build.
 * `opts` may be NULL (all defaults). On success *out is a new handle; on failure
 * *out is NULL and the status says why: FD_NOT_FOUND for a missing path or preset,
 * FD_ENGINE_INCOMPATIBLE for an engine built for another machine, FD_INVALID_ARGUMENT
 * for a bad option. Loading takes seconds: do it before the main loop. */
FD_API FD_MUST_USE fd_status fd_engine_open(const char* path, const fd_engine_options* opts, fd_engine** out);

/* Release the host's handle. Sessions created from the engine stay valid and keep
 * what they need alive. NULL: FD_OK, nothing done. A handle already destroyed:
 * FD_INVALID_ARGUMENT (its memory is never touched). */
FD_API fd_status fd_engine_destroy(fd_engine* engine);

/* ---- Sessions ----------------------------------------------------------- */

/* Options for fd_session_create. Start from FD_SESSION_OPTIONS_INIT. */
typedef struct fd_session_options {
    size_t struct_size;                  /* sizeof(fd_session_options) */
    uint64_t seed;                       /* seeds the session's noise; default 0 */
    const fd_tensor_view* prompt_embeds; /* [B, T, text_dim] or [T, text_dim], floating point, copied */
    const char* prompt_embeds_file;      /* or: a .safetensors file holding tensor "prompt_embeds" (or one tensor) */
} fd_session_options;

#define FD_SESSION_OPTIONS_INIT {sizeof(fd_session_options), 0, NULL, NULL}

/* Create a session: its own state (caches, noise generator, block counter) on the
 * engine's device. `opts` may be NULL (seed 0; the built-in model's default
 * prompt). A model other than the built-in one needs prompt embeddings (from its
 * text encoder): pass a view or a file, not both. The batch B of the prompt is the
 * session's batch; frames and latents are read for batch 0. */
FD_API FD_MUST_USE fd_status fd_session_create(fd_engine* engine, const fd_session_options* opts, fd_session** out);

/* Set a named input; it takes effect at the next fd_session_step (an input whose
 * `when` is "reset": at the next fd_session_reset) and stays until set again. The
 * inputs a session takes, with their shapes and dtypes, are listed by
 * fd_session_input_count / fd_session_input_info below; for the built-in tiny model
 * "prompt_embeds" [1, 16, 32] float32. An unknown name, wrong shape or dtype, or a
 * value outside the input's bounds: FD_INVALID_ARGUMENT, naming the input. */
FD_API FD_MUST_USE fd_status fd_session_set_input(fd_session* session, const char* name, const fd_tensor_view* value);

/* ---- Input discovery (API 1.1) ------------------------------------------- */

/* One input a session takes, as the model declares it. Start from FD_INPUT_INFO_INIT:
 * struct_size tells the library which fields the host knows (it fills only those), so
 * the struct can grow. Every string is owned by the session: never NULL (possibly ""),
 * and valid until fd_session_destroy of that session; copy it to keep it longer. */
typedef struct fd_input_info {
    size_t struct_size;       /* sizeof(fd_input_info) */
    const char* name;         /* the name fd_session_set_input takes, e.g. "prompt_embeds" */
    const char* dtype_name;   /* "float32", "bfloat16", "int64", ... (what the model declares) */
    fd_dtype dtype;           /* the same as an fd_dtype; 0 when it has none (e.g. "float64", "bool") */
    int32_t ndim;             /* rank: 0 .. FD_MAX_DIMS */
    int64_t shape[FD_MAX_DIMS]; /* exact sizes, batch included; shape[ndim..] are 0 */
    const char* meaning;      /* what the input is, in words */
    const char* units;        /* its units ("embedding", "latent", "m/s", ...); "" when none */
    int32_t has_low;          /* 1: every value must be >= low; 0: no lower bound (low is 0) */
    double low;
    int32_t has_high;         /* 1: every value must be <= high; 0: no upper bound (high is 0) */
    double high;
    const char* when;         /* "block": read by every step; "reset": takes effect at the next reset */
} fd_input_info;

#define FD_INPUT_INFO_INIT \
    {sizeof(fd_input_info), NULL, NULL, (fd_dtype)0, 0, {0, 0, 0, 0, 0, 0, 0, 0}, NULL, NULL, 0, 0.0, 0, 0.0, NULL}

/* The number of inputs the session takes (set with fd_session_set_input), in *count;
 * their indices are 0 .. count-1, in the model's order, fixed for the session's life.
 * A NULL pointer or a dead session: FD_INVALID_ARGUMENT (and *count, if given, is 0). */
FD_API FD_MUST_USE fd_status fd_session_input_count(const fd_session* session, int32_t* count);

/* Describe input `index` (0 .. count-1) in *info, whose struct_size the host has set
 * (FD_INPUT_INFO_INIT). An index outside that range, a NULL or a dead handle, or a
 * struct_size this library does not know: FD_INVALID_ARGUMENT, and *info is unchanged. */
FD_API FD_MUST_USE fd_status fd_session_input_info(const fd_session* session, int32_t index, fd_input_info* info);

/* The index of the input called `name` in *index (then fd_session_input_info describes
 * it). No input of that name: FD_NOT_FOUND, the message listing the names there are;
 * a NULL or dead argument: FD_INVALID_ARGUMENT. On failure *index (if given) is -1. */
FD_API FD_MUST_USE fd_status fd_session_input_find(const fd_session* session, const char* name, int32_t* index);

/* Generate the next block: denoise, decode, commit it to the cache. On a CPU it
 * returns when the block is done; on a GPU when its work is queued (the reads below
 * wait for the decode, not for the commit after it). The block's frames and latents
 * stay readable until the next step or reset; a failed step leaves none. */
FD_API FD_MUST_USE fd_status fd_session_step(fd_session* session);

/* Size of the last block's frames: uint8 RGB [num_frames, height, width, channels]
 * (channels is 3; the first block has fewer frames than later ones, so query each
 * tick). FD_INVALID_ARGUMENT before the first step; FD_NOT_FOUND when the engine has
 * no decoder (read the latents instead). Every out pointer must be non-NULL. */
FD_API FD_MUST_USE fd_status fd_session_frame_info(fd_session* session, int64_t* num_frames, int64_t* height,
                                                   int64_t* width, int64_t* channels);

/* Copy the last block's frames (batch 0, uint8, [T, H, W, 3], C order) into `dst`.
 * memory == FD_MEMORY_HOST: `dst` is CPU memory; FD_MEMORY_DEVICE: CUDA memory on
 * any device (the copy has finished when the call returns). `dst_bytes` smaller than
 * T*H*W*3: FD_INVALID_ARGUMENT naming both sizes, and nothing is written. */
FD_API FD_MUST_USE fd_status fd_session_read_frames(fd_session* session, void* dst, size_t dst_bytes, fd_memory memory);

/* Size of the last block's latents (the final denoised x0, batch 0): float32
 * [channels, num_frames, height, width], channels before frames as in the model. */
FD_API FD_MUST_USE fd_status fd_session_latent_info(fd_session* session, int64_t* channels, int64_t* num_frames,
                                                    int64_t* height, int64_t* width);

/* Copy the last block's latents (batch 0, float32, C order) into `dst`; as
 * fd_session_read_frames, with dst_bytes at least 4*C*F*H*W. */
FD_API FD_MUST_USE fd_status fd_session_read_latents(fd_session* session, void* dst, size_t dst_bytes,
                                                     fd_memory memory);

/* Back to block 0 with a new seed: caches cleared, inputs kept, buffers reused. */
FD_API FD_MUST_USE fd_status fd_session_reset(fd_session* session, uint64_t seed);

/* Make the session the one fd_session_create(its engine, opts) would make, on the same buffers:
 * every input set so far is dropped (back to zeros), the prompt of `opts` (or the model's default;
 * opts may be NULL) and its seed are taken, and the rollout starts at block 0. On a GPU the CUDA
 * graphs the session captured stay valid, so its first steps replay them at steady speed where a new
 * session runs its first blocks eagerly: a host that hands its world to the next user (a new episode,
 * a new player) renews instead of destroying and creating. Everything is checked first (the options
 * as fd_session_create checks them, the prompt's shape, dtype and values); a refused renew changes
 * nothing, the last block stays readable. Since 1.5. */
FD_API FD_MUST_USE fd_status fd_session_renew(fd_session* session, const fd_session_options* opts);

/* Run every kind of block once (on a GPU a second time, capturing it as CUDA graphs) and go
 * back to block 0 with the same seed and inputs, so the first fd_session_step calls already
 * run at steady speed; the frames that follow are those a fresh session makes. Call it right
 * after fd_session_create or fd_session_reset (a session past block 0: FD_INVALID_ARGUMENT).
 * `seconds` (may be NULL) receives the time it took. Since 1.2. */
FD_API FD_MUST_USE fd_status fd_session_warm_up(fd_session* session, double* seconds);

/* Snapshots (API 1.4). Write the session's state after its last block (KV caches, decoder
 * caches, inputs, block index, seed) to a file, one safetensors file (Python's
 * flashdreams.snapshot.Snapshot); load one back into a session of the same engine preset and
 * dtype, after which the next fd_session_step continues as the saved session did (bit for bit
 * on the same machine): rewind a simulation, save it, branch it (load one file into several
 * sessions). A load is checked whole first and changes nothing when it fails: a missing file
 * FD_NOT_FOUND, a file that is not a snapshot FD_INVALID_ARGUMENT, a snapshot of another
 * preset, dtype or shape FD_ENGINE_INCOMPATIBLE. After a load there is no last block to read
 * until the next step. The file holds the whole KV cache (e.g. ~5.7 GiB for Self-Forcing
 * 1.3B in bf16). */
FD_API FD_MUST_USE fd_status fd_session_save(fd_session* session, const char* path);
FD_API FD_MUST_USE fd_status fd_session_load(fd_session* session, const char* path);

/* The same in memory, for a host that branches often (a planner): fd_session_snapshot takes the
 * state into a new snapshot handle, on the session's device (FD_MEMORY_DEVICE: a copy that stays
 * on the GPU; the CPU for a CPU engine) or in host memory (FD_MEMORY_HOST), and
 * fd_session_restore puts it back (checked as fd_session_load is). A snapshot outlives the
 * session it came from, restores into any session or world of the same preset and dtype, as many
 * times as wanted, and holds its memory until fd_snapshot_destroy. */
FD_API FD_MUST_USE fd_status fd_session_snapshot(fd_session* session, fd_memory where, fd_snapshot** out);
FD_API FD_MUST_USE fd_status fd_session_restore(fd_session* session, const fd_snapshot* snapshot);

/* A snapshot's block index (the blocks its world had made) and its size in bytes; either
 * pointer may be NULL. */
FD_API FD_MUST_USE fd_status fd_snapshot_info(const fd_snapshot* snapshot, int64_t* block, uint64_t* bytes);

/* Release a snapshot's memory. NULL: FD_OK. A handle already destroyed: FD_INVALID_ARGUMENT. */
FD_API fd_status fd_snapshot_destroy(fd_snapshot* snapshot);

/* Release a session and its device memory. NULL: FD_OK. A handle already destroyed:
 * FD_INVALID_ARGUMENT (its memory is never touched). */
FD_API fd_status fd_session_destroy(fd_session* session);

/* ---- Many worlds in one batch (API 1.3) ----------------------------------
 *
 * N independent worlds of one engine, stepped together in one forward pass per tick
 * (for policy evaluation or RL: hundreds of rollouts on one GPU). Each world has its
 * own seed, inputs, caches and block index; worlds at different block indices share
 * the batch, so one world can be reset while the others go on. A world whose output
 * is not finite is reset by itself at that step (fd_worlds_world_state says so); the
 * others are untouched. Worlds are numbered 0 .. N-1 for the life of the handle.
 *
 *     fd_worlds_options wo = FD_WORLDS_OPTIONS_INIT;  wo.count = 64;   // seeds 0..63
 *     fd_worlds* w = NULL;
 *     fd_worlds_create(eng, &wo, &w);
 *     for (;;) {
 *         fd_worlds_set_input(w, FD_ALL_WORLDS, "keyboard", &keys);   // [64, ...]: one row per world
 *         fd_worlds_step(w, NULL);
 *         fd_worlds_frame_info(w, &t, &h, &wd, &c);                   // one world's block
 *         fd_worlds_read_frames(w, FD_ALL_WORLDS, buf, 64 * t * h * wd * c, FD_MEMORY_HOST);
 *     }
 *     fd_worlds_destroy(w);
 *
 * An input's shape for one world is what fd_session_input_info reports with batch 1. */

#define FD_ALL_WORLDS (-1)

typedef struct fd_worlds_options {
    size_t struct_size;    /* sizeof(fd_worlds_options) */
    int32_t count;         /* N >= 1 worlds */
    const uint64_t* seeds; /* N seeds, or NULL: world i is seeded with i */
} fd_worlds_options;

#define FD_WORLDS_OPTIONS_INIT {sizeof(fd_worlds_options), 1, NULL}

/* Create N worlds at block 0, every input at its default (zeros; a required input its
 * model's valid stand-in). An engine built by fd-build runs the batch it was built for
 * (fd-build --batch N): more worlds than that is FD_INVALID_ARGUMENT, saying so. */
FD_API FD_MUST_USE fd_status fd_worlds_create(fd_engine* engine, const fd_worlds_options* opts, fd_worlds** out);

/* The number of worlds N, in *count. */
FD_API FD_MUST_USE fd_status fd_worlds_count(const fd_worlds* worlds, int32_t* count);

/* Set world `world`'s input (its one-world shape, batch 1 or no batch dimension), or with
 * FD_ALL_WORLDS every world's at once (shape [N, ...], one row per world). Checked first:
 * a single world's bad value changes nothing; with FD_ALL_WORLDS the rows that pass are
 * written and the call returns FD_INVALID_ARGUMENT naming the worlds that keep their old
 * value. Takes effect at the next fd_worlds_step. */
FD_API FD_MUST_USE fd_status fd_worlds_set_input(fd_worlds* worlds, int32_t world, const char* name,
                                                 const fd_tensor_view* value);

/* One block of every world, in one batch. *failed (may be NULL) receives how many worlds
 * produced non-finite output and were reset by themselves. Frames stay readable until the
 * next step. */
FD_API FD_MUST_USE fd_status fd_worlds_step(fd_worlds* worlds, int32_t* failed);

/* World `world` in the last step: *block its block index (0 right after a reset), *failed
 * 1 if its output was not finite and it was reset (its frames of that step are not
 * meaningful), *padding_frames how many leading frames of its block are padding (a model
 * whose worlds step in lockstep groups pads a shorter block with its first frame; else 0).
 * Any out pointer may be NULL. */
FD_API FD_MUST_USE fd_status fd_worlds_world_state(fd_worlds* worlds, int32_t world, int64_t* block, int32_t* failed,
                                                   int64_t* padding_frames);

/* Size of one world's frames in the last step: uint8 RGB [num_frames, height, width, 3]. */
FD_API FD_MUST_USE fd_status fd_worlds_frame_info(fd_worlds* worlds, int64_t* num_frames, int64_t* height,
                                                  int64_t* width, int64_t* channels);

/* Copy world `world`'s frames of the last step ([T, H, W, 3]), or with FD_ALL_WORLDS every
 * world's ([N, T, H, W, 3]), into `dst`; as fd_session_read_frames otherwise. */
FD_API FD_MUST_USE fd_status fd_worlds_read_frames(fd_worlds* worlds, int32_t world, void* dst, size_t dst_bytes,
                                                   fd_memory memory);

/* World `world` back to block 0 with a new seed (caches cleared, inputs kept); the other
 * worlds go on where they are. */
FD_API FD_MUST_USE fd_status fd_worlds_reset(fd_worlds* worlds, int32_t world, uint64_t seed);

/* Snapshots of one world (API 1.4), as fd_session_save / fd_session_load: a world's file loads
 * into any world of the same engine preset (or into a session of batch 1, and back), so
 * saving world i and loading the file into world j branches world i; the other worlds go on
 * untouched. */
FD_API FD_MUST_USE fd_status fd_worlds_save(fd_worlds* worlds, int32_t world, const char* path);
FD_API FD_MUST_USE fd_status fd_worlds_load(fd_worlds* worlds, int32_t world, const char* path);
FD_API FD_MUST_USE fd_status fd_worlds_snapshot(fd_worlds* worlds, int32_t world, fd_memory where,
                                                fd_snapshot** out);
FD_API FD_MUST_USE fd_status fd_worlds_restore(fd_worlds* worlds, int32_t world, const fd_snapshot* snapshot);

/* Release the worlds and their device memory. NULL: FD_OK. A handle already destroyed:
 * FD_INVALID_ARGUMENT (its memory is never touched). */
FD_API fd_status fd_worlds_destroy(fd_worlds* worlds);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* FLASHDREAMS_H_ */
