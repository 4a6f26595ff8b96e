/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Per-thread error messages and full-length I/O helpers. */

#include <stdio.h>
#include <sys/stat.h>

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

DC_EXPORT int dc_set_error(int err, const char *fmt, ...) {
        char msg[sizeof last_error];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        return dc_error(err, "%s", msg);
}

DC_EXPORT void dc_error_clear(void) {
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
 * (tests/lib/test_crash.py uses it to cut the write stream everywhere).
 * Not thread-safe: for single-threaded tools only. */
long dc_fault_writes_left;

/*
 * Test hook: the I/O trace for power-loss tests (tests/lib/test_powerloss.py).
 *
 * A killed process loses nothing the kernel already has, so cutting the
 * write stream (above) proves the order of the writes but not that the
 * syncs between them are where they must be.  Power loss keeps only what a
 * completed fdatasync() covered, plus any part of the rest.  To let a test
 * rebuild such states, every write this file makes is recorded once it has
 * completed, and every sync twice: when it begins and when it ends.  All
 * records go to DC_TRACE_FD under one lock, so the trace is one total order
 * that respects what each thread did: a write recorded before the begin of
 * a sync of the same file had completed before that sync was asked for, and
 * is durable once the sync's end is recorded; a write recorded after the
 * begin is not (it may or may not have been caught).  Programs add their own
 * markers (dc_trace_mark) to say, for instance, that a flush was acknowledged.
 *
 * Files are named by (st_dev, st_ino), so a second descriptor on the same
 * file (the O_DIRECT twin of dc_image_job_cache) is the same file here, as
 * it is for the sync.  Only writes and syncs made through dc_pwrite_full()
 * and dc_fdatasync() are seen: ftruncate() and fallocate() are not.
 *
 * Off (the default, -1), the cost is one load and one compare per call.
 * The program sets the descriptor before it opens any image and leaves it
 * alone until the last is closed.
 */
int dc_trace_fd = -1;
static pthread_mutex_t trace_lock = PTHREAD_MUTEX_INITIALIZER;

static void trace_write_all(const void *buf, size_t len) {
        const uint8_t *p = buf;

        while (len > 0) {
                ssize_t n = write(dc_trace_fd, p, len);
                if (n < 0 && errno == EINTR)
                        continue;
                /* A trace with a hole would let a test pass on a lie. */
                if (n <= 0)
                        abort();
                p += n;
                len -= (size_t) n;
        }
}

static void trace_record(uint32_t type, int fd, int32_t result, uint64_t off, const void *data, uint64_t len) {
        struct dc_trace_record rec = {
                .type = type,
                .result = result,
                .offset = off,
                .length = len,
        };
        struct stat st;
        int saved = errno;

        if (fd >= 0) {
                if (fstat(fd, &st) < 0)
                        abort();
                rec.dev = st.st_dev;
                rec.ino = st.st_ino;
        }
        pthread_mutex_lock(&trace_lock);
        trace_write_all(&rec, sizeof rec);
        if (len > 0)
                trace_write_all(data, (size_t) len);
        pthread_mutex_unlock(&trace_lock);
        errno = saved;
}

void dc_trace_mark(const char *fmt, ...) {
        char text[256];
        va_list ap;
        int n;

        if (dc_trace_fd < 0)
                return;
        va_start(ap, fmt);
        n = vsnprintf(text, sizeof text, fmt, ap);
        va_end(ap);
        if (n < 0)
                abort();
        trace_record(DC_TRACE_MARK, -1, 0, 0, text, (uint64_t) MIN((size_t) n, sizeof text - 1));
}

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
                /* each piece as it completes: a short write followed by a
                 * failure still left that piece in the file */
                if (dc_trace_fd >= 0 && n > 0)
                        trace_record(DC_TRACE_WRITE, fd, 0, off, p, (uint64_t) n);
                p += n;
                off += (uint64_t) n;
                len -= (size_t) n;
        }
        return 0;
}

int dc_fdatasync(int fd) {
        static uint64_t syncs;
        uint64_t id = 0;
        int r = 0;

        /* syncs of one file may run side by side: a number pairs each end with its begin */
        if (dc_trace_fd >= 0) {
                id = __atomic_add_fetch(&syncs, 1, __ATOMIC_RELAXED);
                trace_record(DC_TRACE_SYNC_BEGIN, fd, 0, id, NULL, 0);
        }
        if (fdatasync(fd) < 0)
                r = -errno;
        if (dc_trace_fd >= 0)
                trace_record(DC_TRACE_SYNC_END, fd, r, id, NULL, 0);
        return r;
}
