/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Unit tests of libdiskchain's pure parts: path confinement and backing
 * resolution, compression round trips, refcount packing at every width,
 * per-thread error messages, and the chain read/write API on small images.
 */

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "dc-internal.h"

#define CHECK_DETAIL() dc_get_error()
#include "check.h"

static void test_path_resolve(void) {
        const char *const roots[] = { "/srv/images", "/data/vm/", NULL };
        char *abs = NULL;
        size_t idx = 99;

        CHECK(dc_path_resolve("a.qcow2", roots, &abs, &idx) == 0);
        CHECK(abs && strcmp(abs, "/srv/images/a.qcow2") == 0 && idx == 0);
        free(abs), abs = NULL;
        CHECK(dc_path_resolve("/data/vm/x/./y//z.raw", roots, &abs, &idx) == 0);
        CHECK(abs && strcmp(abs, "/data/vm/x/y/z.raw") == 0 && idx == 1);
        free(abs), abs = NULL;
        CHECK(dc_path_resolve("sub/../b.qcow2", roots, &abs, NULL) == 0);
        CHECK(abs && strcmp(abs, "/srv/images/b.qcow2") == 0);
        free(abs), abs = NULL;
        CHECK(dc_path_resolve("../etc/shadow", roots, &abs, NULL) == -EXDEV);
        CHECK(strstr(dc_get_error(), "outside the storage roots") != NULL);
        CHECK(dc_path_resolve("/srv/images/../../etc/passwd", roots, &abs, NULL) == -EXDEV);
        CHECK(dc_path_resolve("/srv/images", roots, &abs, NULL) == -EXDEV); /* the root itself */
        CHECK(dc_path_resolve("/srv/imagesX/a", roots, &abs, NULL) == -EXDEV);
        CHECK(dc_path_resolve("", roots, &abs, NULL) == -EINVAL);
        CHECK(abs == NULL);
}

static void test_backing_resolve(void) {
        char *abs = NULL;

        CHECK(dc_backing_resolve("/srv/images/vm/top.qcow2", "base.qcow2", &abs) == 0);
        CHECK(abs && strcmp(abs, "/srv/images/vm/base.qcow2") == 0);
        free(abs), abs = NULL;
        CHECK(dc_backing_resolve("/srv/images/vm/top.qcow2", "../b/base.raw", &abs) == 0);
        CHECK(abs && strcmp(abs, "/srv/images/b/base.raw") == 0);
        free(abs), abs = NULL;
        CHECK(dc_backing_resolve("/srv/images/top.qcow2", "/abs/./x", &abs) == 0);
        CHECK(abs && strcmp(abs, "/abs/x") == 0);
        free(abs), abs = NULL;
        CHECK(dc_backing_resolve("/srv/images/top.qcow2", "nbd://host/export", &abs) == -EXDEV);
        CHECK(dc_backing_resolve("/srv/images/top.qcow2", "json:{\"file\":1}", &abs) == -EXDEV);
        CHECK(abs == NULL);
}

static void test_compression(void) {
        for (int type = 0; type <= 1; type++) {
                size_t cs = 65536, clen = 0;
                uint8_t *in = malloc(cs), *out = malloc(cs), *back = malloc(cs);
                for (size_t i = 0; i < cs; i++)
                        in[i] = (uint8_t) ((i / 100) % 7);
                CHECK(dc_compress(type, in, cs, out, cs - 1, &clen) == 1);
                CHECK(clen > 0 && clen < cs / 4);
                /* trailing sector padding must be ignored */
                memset(out + clen, 0xee, MIN(cs - clen, (size_t) 511));
                CHECK(dc_decompress(type, out, MIN(clen + 511, cs), back, cs) == 0);
                CHECK(memcmp(in, back, cs) == 0);
                /* random data does not fit: stored uncompressed */
                for (size_t i = 0; i < cs; i++)
                        in[i] = (uint8_t) (rand() >> 7);
                CHECK(dc_compress(type, in, cs, out, cs - 1, &clen) == 0);
                /* garbage does not decompress */
                CHECK(dc_decompress(type, in, 100, back, cs) < 0);
                free(in), free(out), free(back);
        }
}

static void *other_thread(void *p) {
        (void) p;
        dc_error(ENOENT, "message of the other thread");
        return NULL;
}

static void test_thread_errors(void) {
        pthread_t t;

        dc_error(EINVAL, "mine: %d", 42);
        pthread_create(&t, NULL, other_thread, NULL);
        pthread_join(t, NULL);
        CHECK(strcmp(dc_get_error(), "mine: 42") == 0 && dc_get_errno() == EINVAL);
        /* wrapping the previous message is allowed */
        dc_error(EIO, "outer: %s", dc_get_error());
        CHECK(strcmp(dc_get_error(), "outer: mine: 42") == 0);
}

/* Every refcount width: allocate, write, read back, and let check count. */
static void test_refcount_widths(const char *dir) {
        static const uint32_t widths[] = { 1, 2, 4, 8, 16, 32, 64 };
        for (size_t w = 0; w < sizeof widths / sizeof widths[0]; w++) {
                char path[4096];
                struct dc_create_options o = { .cluster_size = 512, .refcount_bits = widths[w], .backing_format = -1 };
                struct dc_open_options oo = { .writable = true };
                struct dc_check_result c;
                dc_image *img = NULL;
                uint8_t buf[4096], back[4096];

                snprintf(path, sizeof path, "%s/rb%u.qcow2", dir, widths[w]);
                CHECK(dc_image_create(path, 1 << 20, &o, NULL) == 0);
                CHECK(dc_image_open(path, &oo, &img) == 0);
                if (!img)
                        continue;
                CHECK(dc_image_refcount_bits(img) == widths[w]);
                for (int i = 0; i < 64; i++) {
                        memset(buf, i + 1, sizeof buf);
                        CHECK(dc_image_write(img, buf, (uint64_t) i * 8192, sizeof buf) == 0);
                }
                for (int i = 0; i < 64; i++) {
                        memset(buf, i + 1, sizeof buf);
                        CHECK(dc_image_read(img, back, (uint64_t) i * 8192, sizeof back) == 0);
                        CHECK(memcmp(buf, back, sizeof buf) == 0);
                }
                CHECK(dc_image_check(img, DC_REPAIR_NONE, &c) == 0);
                CHECK(c.corruptions == 0 && c.leaks == 0 && c.check_errors == 0);
                CHECK(c.allocated_clusters == 64 * 8);
                dc_image_close(img);
                unlink(path);
        }
}

static void test_api_bounds(const char *dir) {
        char path[4096];
        struct dc_open_options ro = { 0 }, rw = { .writable = true };
        dc_image *img = NULL;
        uint8_t b[512] = { 0 };

        snprintf(path, sizeof path, "%s/b.qcow2", dir);
        CHECK(dc_image_create(path, 1 << 20, NULL, NULL) == 0);
        CHECK(dc_image_create(path, 1 << 20, NULL, NULL) == -EEXIST);
        CHECK(dc_image_create(path, (1ull << 63) + 512, NULL, NULL) == -EFBIG); /* beyond 2^63 - 1, as qemu-img */
        CHECK(dc_image_open(path, &ro, &img) == 0);
        CHECK(dc_image_write(img, b, 0, sizeof b) == -EROFS);
        CHECK(dc_image_read(img, b, (1 << 20) - 256, sizeof b) == -EINVAL);
        dc_image_close(img);
        CHECK(dc_image_open(path, &rw, &img) == 0);
        CHECK(dc_image_truncate(img, 1 << 19) == -ENOTSUP);
        CHECK(dc_image_truncate(img, (1 << 21) + 1) == -EINVAL);
        CHECK(dc_image_truncate(img, 1 << 21) == 0 && dc_image_virtual_size(img) == 1 << 21);
        dc_image_close(img);
        CHECK(dc_image_open("/nonexistent/x.qcow2", &ro, &img) == -ENOENT);
        unlink(path);
}

/* Writers of different bytes of the same fresh clusters at once: allocating
 * writes send their data without the image lock, and none may lose another's
 * bytes (the second writer of a cluster waits for the first one's entry). */
struct slice_writer {
        dc_image *img;
        unsigned t, failed; /* counted here: CHECK's counters are not for threads */
};

#define SW_THREADS 8
#define SW_CLUSTERS 64
#define SW_SLICE 8192

static void *slice_writer(void *p) {
        struct slice_writer *w = p;
        uint8_t *b = dc_io_buffer(SW_SLICE);
        for (unsigned k = 0; b && k < SW_CLUSTERS; k++) {
                unsigned c = (k * 7 + w->t * 5) % SW_CLUSTERS; /* each thread its own order */
                memset(b, (int) (w->t + 1), SW_SLICE);
                w->failed += dc_image_write(w->img, b, (uint64_t) c * 65536 + w->t * SW_SLICE, SW_SLICE) != 0;
        }
        w->failed += !b;
        free(b);
        return NULL;
}

static void test_concurrent_writers(const char *dir) {
        char path[4096];
        struct dc_open_options rw = { .writable = true };
        struct slice_writer w[SW_THREADS];
        pthread_t th[SW_THREADS];
        dc_image *img = NULL;
        uint8_t *b = malloc(65536);
        struct dc_check_result c = { 0 };

        snprintf(path, sizeof path, "%s/w.qcow2", dir);
        CHECK(dc_image_create(path, SW_CLUSTERS * 65536, NULL, NULL) == 0);
        CHECK(dc_image_open(path, &rw, &img) == 0);
        if (!img || !b) {
                free(b);
                return;
        }
        dc_image_job_cache(img, DC_CACHE_NONE, true); /* as during a job: whole clusters go around the cache */
        for (unsigned t = 0; t < SW_THREADS; t++) {
                w[t] = (struct slice_writer){ img, t, 0 };
                CHECK(pthread_create(&th[t], NULL, slice_writer, &w[t]) == 0);
        }
        for (unsigned t = 0; t < SW_THREADS; t++) {
                pthread_join(th[t], NULL);
                CHECK(w[t].failed == 0);
        }
        for (unsigned cl = 0; cl < SW_CLUSTERS; cl++) {
                bool ok = dc_image_read(img, b, (uint64_t) cl * 65536, 65536) == 0;
                for (unsigned i = 0; ok && i < 65536; i++)
                        ok = b[i] == (i / SW_SLICE < SW_THREADS ? i / SW_SLICE + 1 : 0);
                CHECK(ok);
        }
        CHECK(dc_image_check(img, DC_REPAIR_NONE, &c) == 0 && c.corruptions == 0 && c.leaks == 0);
        dc_image_close(img);
        unlink(path);
        free(b);
}

int main(void) {
        char dir[] = "/tmp/test-lib-XXXXXX";

        if (!mkdtemp(dir))
                return 1;
        test_path_resolve();
        test_backing_resolve();
        test_compression();
        test_thread_errors();
        test_refcount_widths(dir);
        test_api_bounds(dir);
        test_concurrent_writers(dir);
        rmdir(dir);
        return check_report("test-lib");
}
