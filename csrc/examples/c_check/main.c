/* c_check: a C99 program that uses flashdreams.h: checks the API version, opens
 * the built-in engine, lists its session's inputs, and destroys both. Exit code 0 on success. */
#include <flashdreams.h>
#include <stdio.h>

int main(void) {
    fd_engine* engine = NULL;
    fd_session* session = NULL;
    fd_engine_options opts = FD_ENGINE_OPTIONS_INIT;
    fd_input_info info = FD_INPUT_INFO_INIT;
    int32_t count = 0, i = 0;
    fd_status st = fd_check_version(FD_API_VERSION);
    if (st != FD_OK) {
        fprintf(stderr, "c_check: %s: %s\n", fd_status_name(st), fd_last_error());
        return 1;
    }
    opts.device = "cpu";
    st = fd_engine_open(NULL, &opts, &engine);
    if (st != FD_OK) {
        fprintf(stderr, "c_check: fd_engine_open: %s: %s\n", fd_status_name(st), fd_last_error());
        return 1;
    }
    st = fd_session_create(engine, NULL, &session);
    if (st == FD_OK) st = fd_session_input_count(session, &count);
    for (i = 0; st == FD_OK && i < count; ++i) {
        st = fd_session_input_info(session, i, &info);
        if (st == FD_OK) printf("c_check: input %s %s, rank %d\n", info.name, info.dtype_name, (int)info.ndim);
    }
    if (st != FD_OK || fd_session_destroy(session) != FD_OK) {
        fprintf(stderr, "c_check: session inputs: %s: %s\n", fd_status_name(st), fd_last_error());
        return 1;
    }
    st = fd_engine_destroy(engine);
    if (st != FD_OK || fd_engine_destroy(NULL) != FD_OK) {
        fprintf(stderr, "c_check: fd_engine_destroy: %s: %s\n", fd_status_name(st), fd_last_error());
        return 1;
    }
    printf("c_check: API %u.%u, engine opened and destroyed\n", (unsigned)(fd_api_version() >> 16),
           (unsigned)(fd_api_version() & 0xffffu));
    return 0;
}
