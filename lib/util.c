/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Per-thread error messages and full-length I/O helpers. */

#include <stdio.h>

#include "dc-internal.h"

static __thread char last_error[1024];
static __thread int last_errno;

int dc_error(int err, const char *fmt, ...) {
        char msg[sizeof last_error];
        va_list ap;

        if (err < 0)
                err = -err;
        if (err == 0)
                err = EIO;
        /* Format aside first: callers may wrap the previous message,
         * passing dc_get_error() itself as an argument. */
        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        memcpy(last_error, msg, sizeof msg);
        last_errno = err;
        return -err;
}

void dc_error_clear(void) {
        last_error[0] = 0;
        last_errno = 0;
}

DC_EXPORT const char *dc_get_error(void) {
        return last_error;
}

DC_EXPORT int dc_get_errno(void) {
        return last_errno;
}

char **dc_strv_copy(const char *const *v) {
        size_t n = 0;
        char **c;

        if (!v)
                return NULL;
        while (v[n])
                n++;
        c = calloc(n + 1, sizeof *c);
        if (!c)
                return NULL;
        for (size_t i = 0; i < n; i++)
                if (!(c[i] = strdup(v[i]))) {
                        dc_strv_free(c);
                        return NULL;
                }
        return c;
}

void dc_strv_free(char **v) {
        for (size_t i = 0; v && v[i]; i++)
                free(v[i]);
        free(v);
}

int dc_pread_full(int fd, void *buf, size_t len, uint64_t off) {
        uint8_t *p = buf;

        while (len > 0) {
                ssize_t n = pread(fd, p, len, (off_t) off);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (n == 0) {
                        /* Past the end of the file reads as zeros. */
                        memset(p, 0, len);
                        return 0;
                }
                p += n;
                off += (uint64_t) n;
                len -= (size_t) n;
        }
        return 0;
}

/* Test hook: when > 0, the process dies just before that many-th write
 * (tests/test-crash.py uses it to cut the write stream everywhere). */
long dc_fault_writes_left;

int dc_pwrite_full(int fd, const void *buf, size_t len, uint64_t off) {
        const uint8_t *p = buf;

        if (dc_fault_writes_left > 0 && --dc_fault_writes_left == 0)
                _exit(99);

        while (len > 0) {
                ssize_t n = pwrite(fd, p, len, (off_t) off);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                p += n;
                off += (uint64_t) n;
                len -= (size_t) n;
        }
        return 0;
}

int dc_fdatasync(int fd) {
        if (fdatasync(fd) < 0)
                return -errno;
        return 0;
}
