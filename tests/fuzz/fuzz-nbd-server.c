/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * libFuzzer target for the NBD server as a client meets it
 * (lib/nbd-server.c), where fuzz-nbd covers the parser alone: the input is
 * a client's byte stream in fuzz-nbd's form (the first byte chooses the
 * export, bit 0 the writable one; the rest is what the client sends from
 * its reply to the greeting on), sent over a socketpair, in pieces of 1 to
 * 97 bytes, to a real export of a small chain: a base and an overlay of
 * 4 KiB clusters where data of both layers, zero clusters, compressed
 * clusters and unallocated ranges alternate.  So the reader's look-ahead
 * meets requests split across receives, its ring reads in one piece and in
 * several, the workers everything else, and the replies go back while the
 * client is still sending.  The server must close the connection once the
 * client's stream has ended and its requests are answered: a hang is a
 * failure (libFuzzer's timeout; the test's).  Built as a fuzzer with
 * -Dfuzzing=true, and always as fuzz-nbd-server-replay, which runs
 * fuzz-nbd's corpus as an ordinary test (under valgrind the workers serve
 * every read: see lib/nbd-server.c).
 */

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "dc-internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define SIZE (UINT64_C(2) << 20)
#define CLUSTER 4096u

static char dir[] = "/tmp/fuzz-nbd-server.XXXXXX";
static dc_nbd_export *exports[2]; /* read-only, writable */

static void die(const char *what) {
        fprintf(stderr, "fuzz-nbd-server: %s: %s\n", what, dc_get_error());
        abort();
}

/* LAYER's clusters: data, zeros, compressed or nothing, by a hash of the cluster's index. */
static void fill(const char *path, unsigned layer) {
        const char *const roots[] = { dir, NULL };
        struct dc_open_options oo = { .roots = roots, .writable = true, .no_backing = true };
        static uint8_t buf[CLUSTER];
        dc_image *img;

        if (dc_image_open(path, &oo, &img) < 0)
                die(path);
        for (uint64_t i = 0; i < SIZE / CLUSTER; i++) {
                unsigned h = (unsigned) (((i * 2 + layer) * 0x9e3779b97f4a7c15ull) >> 61);
                int r = 0;

                memset(buf, (int) (i * 7 + layer + 1), sizeof buf);
                if (h < 3)
                        r = dc_image_write(img, buf, i * CLUSTER, CLUSTER);
                else if (h == 3)
                        r = dc_image_write_zeroes(img, i * CLUSTER, CLUSTER, 0);
                else if (h == 4)
                        r = dc_image_write_compressed(img, buf, i * CLUSTER, CLUSTER);
                if (r < 0)
                        die(path);
        }
        if (dc_image_flush(img) < 0)
                die(path);
        dc_image_close(img);
}

static void teardown(void) {
        char path[sizeof dir + 32];
        uint64_t requests = 0, bytes_read = 0;

        for (int i = 0; i < 2; i++) {
                struct dc_nbd_export_stats st;

                dc_nbd_export_get_stats(exports[i], &st);
                requests += st.requests;
                bytes_read += st.bytes_read;
                exports[i] = dc_nbd_export_free(exports[i]);
        }
        for (const char *const *f = (const char *const[]){ "base.qcow2", "ro.qcow2", "rw.qcow2", NULL }; *f; f++) {
                snprintf(path, sizeof path, "%s/%s", dir, *f);
                unlink(path);
        }
        rmdir(dir);
#ifndef FUZZING_ENGINE
        /* a replay of the corpus that never got a read served tested nothing */
        fprintf(stderr, "fuzz-nbd-server: %llu requests served, %llu bytes read\n", (unsigned long long) requests,
                (unsigned long long) bytes_read);
        if (requests == 0 || bytes_read == 0)
                _exit(1);
#endif
}

static void setup(void) {
        const char *const roots[] = { dir, NULL };
        char path[sizeof dir + 32];

        if (!mkdtemp(dir)) {
                perror("mkdtemp");
                abort();
        }
        atexit(teardown);
        snprintf(path, sizeof path, "%s/base.qcow2", dir);
        if (dc_image_create(path, SIZE, &(struct dc_create_options){ .cluster_size = CLUSTER }, roots) < 0)
                die(path);
        fill(path, 0);
        for (int i = 0; i < 2; i++) {
                struct dc_create_options co = { .backing = "base.qcow2", .backing_format = -1, .cluster_size = CLUSTER };
                dc_disk *disk;

                snprintf(path, sizeof path, "%s/%s", dir, i ? "rw.qcow2" : "ro.qcow2");
                if (dc_image_create(path, 0, &co, roots) < 0)
                        die(path);
                fill(path, 1);
                if (dc_disk_open(path, &(struct dc_open_options){ .roots = roots, .writable = i }, &disk) < 0)
                        die(path);
                if (dc_nbd_export_new(disk, &(struct dc_nbd_export_options){ .name = "disk", .writable = i },
                                      &exports[i]) < 0)
                        die("export");
                dc_disk_unref(disk); /* the export holds its own */
        }
}

struct sender {
        int fd;
        const uint8_t *data;
        size_t size;
};

/* The client's stream in pieces, then the end of it; a server that closed first ends it early. */
static void *send_main(void *userdata) {
        struct sender *s = userdata;
        size_t pos = 0, step = s->size;

        while (pos < s->size) {
                ssize_t k;

                step = step * 31 + 7;
                k = send(s->fd, s->data + pos, MIN(s->size - pos, 1 + step % 97), MSG_NOSIGNAL);

                if (k <= 0 && errno != EINTR)
                        break;
                pos += (size_t) MAX(k, 0);
        }
        shutdown(s->fd, SHUT_WR);
        return NULL;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        static bool ready;
        struct sender s;
        pthread_t t;
        uint8_t buf[65536];
        int sv[2], r;

        if (!ready) {
                setup();
                ready = true;
        }
        if (size < 1)
                return 0;
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
                abort();
        /* the connections of earlier inputs may still be leaving: max_connections is 16 */
        while ((r = dc_nbd_export_serve(exports[data[0] & 1], sv[0])) == -EBUSY) {
                close(sv[1]); /* sv[0] is the export's, also on failure */
                usleep(1000);
                if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
                        abort();
        }
        if (r < 0)
                die("serve");
        s = (struct sender){ .fd = sv[1], .data = data + 1, .size = size - 1 };
        if (pthread_create(&t, NULL, send_main, &s) != 0)
                abort();
        /* the replies, until the server closes */
        while ((r = (int) recv(sv[1], buf, sizeof buf, 0)) != 0)
                if (r < 0 && errno != EINTR && errno != ECONNRESET)
                        abort();
        pthread_join(t, NULL);
        close(sv[1]);
        return 0;
}
