/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * dc-powerloss: the workload of the power-loss test (tests/lib/test_powerloss.py).
 *
 *   dc-powerloss TRACE IMAGE [key=value ...]   (numbers plain, defaults in brackets)
 *     threads=N      writers, 1..16 (8)
 *     ops=N          requests per writer (60)
 *     seed=N         for the writers' choices (1)
 *     api=disk|image through dc_disk_* (the service's write path) or dc_image_* (the tools') (disk)
 *     flush=N        a writer flushes after about every N of its requests (8)
 *     hot=BYTES      half of the requests fall into the first BYTES, so that writers
 *                    meet on the same clusters (an eighth of the disk)
 *     max-len=BYTES  the longest write (8 clusters)
 *     resize=BYTES   grow the disk to BYTES halfway through (one writer, api=image)
 *     direct=on      data writes through the O_DIRECT descriptor where they are aligned
 *
 * The library's trace (dc_trace_fd, lib/util.c) goes to TRACE, with these
 * marks of ours in between:
 *   BEGIN SIZE           the image is open and its content read into the model
 *   S ID KIND OFF LEN    request ID starts: KIND w (write), z (zero), u (zero, may
 *                        unmap), d (discard), r (grow the disk to LEN)
 *   C ID                 ... and returned success
 *   F ID                 flush ID is asked for
 *   A ID                 ... and acknowledged
 *   END                  the last flush is acknowledged and the disk matched the model
 *
 * The program keeps its own range lock: requests whose bytes overlap are
 * never in flight together, so for every byte the requests touching it are
 * ordered as their marks are, and the test can replay them.  Requests on
 * different bytes of the same clusters do run together, which is what makes
 * the library's allocating writes meet (copy-on-write of one cluster from
 * two sides, deferred L2 entries of one table, a flush among them).  Guest
 * sector S written by request ID holds the 16 bytes ID, S (little-endian
 * 64-bit each) 32 times, so any sector says which request put it there.
 * Discards are whole clusters, which the qcow2 v3 images of the test read
 * back as zeros.  Any failing request fails the program.
 */

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dc-internal.h"

#define MAX_THREADS 16

static unsigned nthreads = 8, ops = 60, flush_every = 8;
static uint64_t seed = 1, hot, max_len, resize_to, cs;
static bool use_disk = true, direct;
static dc_disk *disk;
static dc_image *img;

static pthread_mutex_t mtx = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static struct {
        bool busy;
        uint64_t off, end;
} active[MAX_THREADS];
static uint64_t next_id = 1, next_flush = 1, size;
static uint8_t *model;

static void die(const char *what) {
        fprintf(stderr, "dc-powerloss: %s: %s\n", what, dc_get_error());
        exit(1);
}

static uint64_t num(const char *s) {
        return strtoull(s, NULL, 0);
}

/* The whole disk as the library reads it now. */
static uint8_t *read_disk(void) {
        uint8_t *buf = malloc(size);
        int r;

        if (!buf)
                abort();
        r = use_disk ? dc_disk_read(disk, buf, 0, size) : dc_image_read(img, buf, 0, size);
        if (r < 0)
                die("read");
        return buf;
}

static uint64_t rnd(uint64_t *s) {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        return *s;
}

static void put_le64(uint8_t *p, uint64_t v) {
        for (int i = 0; i < 8; i++)
                p[i] = (uint8_t) (v >> (8 * i));
}

/* The data request ID writes at OFF (sector aligned). */
static void fill(uint8_t *buf, uint64_t id, uint64_t off, uint64_t len) {
        for (uint64_t s = 0; s < len / 512; s++)
                for (unsigned k = 0; k < 32; k++) {
                        put_le64(buf + s * 512 + k * 16, id);
                        put_le64(buf + s * 512 + k * 16 + 8, off / 512 + s);
                }
}

/* Wait until no other writer has a request on [off, end), then hold it.
 * Returns the request's number (mtx held by the caller). */
static uint64_t claim(unsigned me, uint64_t off, uint64_t end) {
        for (;;) {
                bool clash = false;
                for (unsigned i = 0; i < nthreads; i++)
                        if (i != me && active[i].busy && active[i].off < end && off < active[i].end)
                                clash = true;
                if (!clash)
                        break;
                pthread_cond_wait(&cond, &mtx);
        }
        active[me].busy = true;
        active[me].off = off;
        active[me].end = end;
        return next_id++;
}

static void release(unsigned me) {
        active[me].busy = false;
        pthread_cond_broadcast(&cond);
}

static int do_flush(void) {
        uint64_t id;
        int r;

        pthread_mutex_lock(&mtx);
        id = next_flush++;
        pthread_mutex_unlock(&mtx);
        dc_trace_mark("F %" PRIu64, id);
        r = use_disk ? dc_disk_flush(disk) : dc_image_flush(img);
        if (r < 0)
                return r;
        /* only now may the guest count on what it wrote before asking */
        dc_trace_mark("A %" PRIu64, id);
        return 0;
}

static int do_resize(unsigned me) {
        uint64_t id;
        uint8_t *m;
        int r;

        pthread_mutex_lock(&mtx);
        id = claim(me, 0, UINT64_MAX);
        dc_trace_mark("S %" PRIu64 " r 0 %" PRIu64, id, resize_to);
        pthread_mutex_unlock(&mtx);
        r = dc_image_truncate(img, resize_to);
        if (r < 0)
                return r;
        pthread_mutex_lock(&mtx);
        m = realloc(model, resize_to);
        if (!m)
                abort();
        memset(m + size, 0, resize_to - size);
        model = m;
        size = resize_to;
        dc_trace_mark("C %" PRIu64, id);
        release(me);
        pthread_mutex_unlock(&mtx);
        return 0;
}

static void *writer(void *arg) {
        unsigned me = (unsigned) (uintptr_t) arg;
        uint64_t st = seed * 0x9E3779B97F4A7C15ull + me * 0xD1B54A32D192ED03ull + 1;
        uint8_t *buf = dc_io_buffer(max_len);
        unsigned since_flush = 0;

        if (!buf)
                abort();
        for (unsigned n = 0; n < ops; n++) {
                uint64_t pick = rnd(&st) % 100, off, len, id, sectors, span;
                char kind = 'w';
                int r;

                if (resize_to && me == 0 && n == ops / 2 && do_resize(me) < 0)
                        die("resize");
                if (since_flush >= flush_every / 2 && rnd(&st) % flush_every < 2) {
                        if (do_flush() < 0)
                                die("flush");
                        since_flush = 0;
                        continue;
                }
                since_flush++;

                pthread_mutex_lock(&mtx);
                span = rnd(&st) % 2 ? MIN(hot, size) : size;
                pthread_mutex_unlock(&mtx);
                sectors = span / 512;
                if (pick < 10) {
                        kind = rnd(&st) % 2 ? 'z' : 'u';
                        off = rnd(&st) % sectors * 512;
                        len = (rnd(&st) % (2 * cs / 512 + 16) + 1) * 512;
                } else if (pick < 15) {
                        kind = 'd';
                        off = rnd(&st) % (span / cs) * cs;
                        len = (rnd(&st) % 4 + 1) * cs;
                } else if (pick < 45) {
                        /* a few sectors: copy-on-write, or a rewrite in place */
                        off = rnd(&st) % sectors * 512;
                        len = (rnd(&st) % MIN(16, cs / 512) + 1) * 512;
                } else if (pick < 70) {
                        /* whole clusters: no copy, straight from our buffer */
                        off = rnd(&st) % (span / cs) * cs;
                        len = (rnd(&st) % (max_len / cs) + 1) * cs;
                } else {
                        off = rnd(&st) % sectors * 512;
                        len = (rnd(&st) % (max_len / 512) + 1) * 512;
                }
                len = MIN(len, span - off);
                if (kind == 'w')
                        len = MIN(len, max_len);

                pthread_mutex_lock(&mtx);
                id = claim(me, off, off + len);
                dc_trace_mark("S %" PRIu64 " %c %" PRIu64 " %" PRIu64, id, kind, off, len);
                pthread_mutex_unlock(&mtx);

                switch (kind) {
                case 'w':
                        fill(buf, id, off, len);
                        r = use_disk ? dc_disk_write(disk, buf, off, (size_t) len)
                                     : dc_image_write(img, buf, off, (size_t) len);
                        break;
                case 'd':
                        r = use_disk ? dc_disk_discard(disk, off, len) : dc_image_discard(img, off, len);
                        break;
                default: {
                        unsigned fl = kind == 'u' ? DC_ZERO_MAY_UNMAP : 0;
                        r = use_disk ? dc_disk_write_zeroes(disk, off, len, fl)
                                     : dc_image_write_zeroes(img, off, len, fl);
                        break;
                }
                }
                if (r < 0)
                        die("request");

                pthread_mutex_lock(&mtx);
                if (kind == 'w')
                        memcpy(model + off, buf, len);
                else
                        memset(model + off, 0, len);
                dc_trace_mark("C %" PRIu64, id);
                release(me);
                pthread_mutex_unlock(&mtx);
        }
        free(buf);
        return NULL;
}

int main(int argc, char **argv) {
        struct dc_open_options o = { .writable = true };
        pthread_t tids[MAX_THREADS];
        uint8_t *back;

        if (argc < 3)
                return fprintf(stderr, "usage: see the comment in tests/dc-powerloss.c\n"), 2;
        for (int i = 3; i < argc; i++) {
                char *k = argv[i], *v = strchr(k, '=');
                if (!v)
                        return fprintf(stderr, "bad option %s\n", k), 2;
                *v++ = 0;
                if (!strcmp(k, "threads"))
                        nthreads = (unsigned) num(v);
                else if (!strcmp(k, "ops"))
                        ops = (unsigned) num(v);
                else if (!strcmp(k, "seed"))
                        seed = num(v);
                else if (!strcmp(k, "api"))
                        use_disk = !strcmp(v, "disk");
                else if (!strcmp(k, "flush"))
                        flush_every = (unsigned) num(v);
                else if (!strcmp(k, "hot"))
                        hot = num(v);
                else if (!strcmp(k, "max-len"))
                        max_len = num(v);
                else if (!strcmp(k, "resize"))
                        resize_to = num(v);
                else if (!strcmp(k, "direct"))
                        direct = !strcmp(v, "on");
                else
                        return fprintf(stderr, "unknown option %s\n", k), 2;
        }
        if (nthreads < 1 || nthreads > MAX_THREADS || flush_every < 2 ||
            (resize_to && (nthreads != 1 || use_disk)))
                return fprintf(stderr, "bad options\n"), 2;

        /* before the open: opening for writing may write the header already */
        dc_trace_fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (dc_trace_fd < 0)
                return perror(argv[1]), 1;
        if (use_disk) {
                if (dc_disk_open(argv[2], &o, &disk) < 0)
                        die("open");
                img = dc_disk_chain(disk);
        } else if (dc_image_open(argv[2], &o, &img) < 0)
                die("open");
        if (direct)
                dc_image_job_cache(img, DC_CACHE_NONE, true);
        size = dc_image_virtual_size(img);
        cs = dc_image_cluster_size(img);
        if (cs < 512 || size % cs)
                return fprintf(stderr, "the test wants a qcow2 image of whole clusters\n"), 2;
        if (!hot)
                hot = MAX(size / 8, cs);
        if (!max_len)
                max_len = 8 * cs;
        max_len = MAX(ALIGN_DOWN(max_len, cs), cs);
        model = read_disk();
        dc_trace_mark("BEGIN %" PRIu64, size);

        for (unsigned i = 0; i < nthreads; i++)
                if (pthread_create(&tids[i], NULL, writer, (void *) (uintptr_t) i) != 0)
                        abort();
        for (unsigned i = 0; i < nthreads; i++)
                pthread_join(tids[i], NULL);
        if (do_flush() < 0)
                die("flush");

        back = read_disk();
        for (uint64_t s = 0; s < size / 512; s++)
                if (memcmp(back + s * 512, model + s * 512, 512) != 0) {
                        fprintf(stderr, "dc-powerloss: the disk differs from the model at sector %" PRIu64 "\n", s);
                        return 1;
                }
        dc_trace_mark("END");
        if (use_disk)
                dc_disk_unref(disk);
        else
                dc_image_close(img);
        close(dc_trace_fd);
        free(back);
        free(model);
        return 0;
}
