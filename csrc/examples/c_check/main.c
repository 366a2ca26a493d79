/* c_check: a C99 program that uses flashdreams.h: checks the API version, opens
 * the built-in engine and destroys it. Exit code 0 on success. */
#include <flashdreams.h>
#include <stdio.h>

int main(void) {
    fd_engine* engine = NULL;
    fd_engine_options opts = FD_ENGINE_OPTIONS_INIT;
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
    st = fd_engine_destroy(engine);
    if (st != FD_OK || fd_engine_destroy(NULL) != FD_OK) {
        fprintf(stderr, "c_check: fd_engine_destroy: %s: %s\n", fd_status_name(st), fd_last_error());
        return 1;
    }
    printf("c_check: API %u.%u, engine opened and destroyed\n", (unsigned)(fd_api_version() >> 16),
           (unsigned)(fd_api_version() & 0xffffu));
    return 0;
}
