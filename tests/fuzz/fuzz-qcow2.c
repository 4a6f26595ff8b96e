/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * libFuzzer target for everything a hostile qcow2 image reaches: the input
 * is an image file.  Built as a fuzzer with -Dfuzzing=true (clang, ASan and
 * UBSan), and always as fuzz-qcow2-replay, which runs the checked-in corpus
 * (tests/fuzz/corpus-qcow2) as an ordinary test.
 *
 * Each input goes through, in a private directory that is the only storage
 * root (with a data file d.raw, for the images that name one):
 *   1. a read-only open: block status over the image, map, reads, check;
 *   2. a writable open of a copy (which rebuilds the refcounts first when
 *      the dirty bit is set: the last byte of the input sets that bit on the
 *      copy of a v3 image, so that most inputs take that path too): guest
 *      writes, zero writes with and without unmap, a discard, a compressed
 *      write, a flush, a small resize, a check, and a bitmap added, merged,
 *      walked, cleared, disabled and removed, with a transient one beside it
 *      (the persistent bitmaps are stored at the close);
 *   3. a check-mode writable open of another copy: check with repair;
 *   4. a short backup job from the written copy onto a fresh qcow2 target,
 *      and a stream job on it, both waited for to the end.
 * Work per input is capped (extents walked, bytes read, the job only for
 * small images) so that one input stays well under a second.
 */

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "diskchain.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAX_EXTENTS 512
#define MAX_READ (4u << 20)
#define MAX_JOB_SIZE (16u << 20)

static char dir[64];
static const char *roots[2];

struct walk {
        unsigned n;
};

/* Stop a map after MAX_EXTENTS extents (an error return ends it). */
static int count_extent(const struct dc_extent *e, void *userdata) {
        struct walk *w = userdata;
        (void) e;
        return ++w->n >= MAX_EXTENTS ? -ECANCELED : 0;
}

static int write_file(const char *path, const uint8_t *data, size_t size) {
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        ssize_t n;

        if (fd < 0)
                return -1;
        n = write(fd, data, size);
        close(fd);
        return n == (ssize_t) size ? 0 : -1;
}

static int count_dirty(void *userdata, uint64_t off, uint64_t len) {
        (void) off;
        *(uint64_t *) userdata += len;
        return 0;
}

/* The persistent bitmaps: each one's dirty count, and its ranges. */
static void walk_bitmaps(dc_image *img) {
        struct dc_bitmap_info *v;
        size_t n;

        if (dc_image_bitmaps(img, &v, &n) < 0)
                return;
        for (size_t i = 0; i < n; i++) {
                uint64_t sum = 0;
                bool again = false;

                for (size_t k = 0; k < i; k++)
                        again |= !strcmp(v[k].name, v[i].name);
                if (!again && !v[i].in_use && dc_image_bitmap_extents(img, v[i].name, count_dirty, &sum) >= 0 && sum != v[i].dirty)
                        abort(); /* the two walks of one bitmap disagree */
        }
        dc_bitmap_info_free(v, n);
}

static void read_only_pass(const char *path) {
        struct dc_open_options o = { .roots = roots, .no_backing = true, .no_lock = true };
        struct dc_check_result c;
        struct walk w = { 0 };
        dc_image *img = NULL;
        uint64_t vs, off = 0;
        uint8_t *buf;

        if (dc_image_open(path, &o, &img) < 0)
                return;
        vs = dc_image_virtual_size(img);
        buf = malloc(65536);
        /* block status from the start, reading each extent's head */
        for (unsigned i = 0; buf && i < MAX_EXTENTS && off < vs; i++) {
                struct dc_extent e;
                if (dc_image_block_status(img, off, vs - off, &e) < 0 || e.length == 0)
                        break;
                (void) dc_image_read(img, buf, off, (size_t) (e.length < 65536 ? e.length : 65536));
                off += e.length;
        }
        (void) dc_image_map(img, 0, vs, count_extent, &w);
        walk_bitmaps(img);
        for (off = 0; buf && off < vs && off < MAX_READ; off += 65536)
                (void) dc_image_read(img, buf, off, (size_t) (vs - off < 65536 ? vs - off : 65536));
        if (buf && vs >= 4096)
                (void) dc_image_read(img, buf, vs - 4096, 4096);
        free(buf);
        (void) dc_image_check(img, DC_REPAIR_NONE, &c);
        dc_image_close(img);
}

static void write_pass(const char *path) {
        struct dc_open_options o = { .roots = roots, .no_backing = true, .no_lock = true, .writable = true };
        struct dc_check_result c;
        dc_image *img = NULL;
        uint64_t vs, cs;
        uint8_t *buf;

        if (dc_image_open(path, &o, &img) < 0)
                return;
        vs = dc_image_virtual_size(img);
        cs = dc_image_cluster_size(img);
        buf = malloc(cs > 65536 ? cs : 65536);
        if (buf && !dc_image_read_only(img)) {
                memset(buf, 0xa5, cs > 65536 ? cs : 65536);
                (void) dc_image_write(img, buf, 0, (size_t) (vs < 4096 ? vs : 4096));
                if (vs > 8192) {
                        (void) dc_image_write(img, buf, vs / 2 + 512, 4096);
                        (void) dc_image_write(img, buf, vs - 4096, 4096);
                        (void) dc_image_write_zeroes(img, vs / 3, vs / 3 < 65536 ? vs / 3 : 65536, 0);
                        (void) dc_image_write_zeroes(img, vs / 4, 3 * cs, DC_ZERO_MAY_UNMAP);
                        (void) dc_image_discard(img, 0, 2 * cs < vs ? 2 * cs : vs);
                        if (cs && vs >= 2 * cs)
                                (void) dc_image_write_compressed(img, buf, cs, (size_t) cs);
                }
                (void) dc_image_flush(img);
                (void) dc_image_truncate(img, vs + 65536);
                (void) dc_image_check(img, DC_REPAIR_NONE, &c);
                /* the bitmaps recorded, changed, and read back from memory */
                if (dc_image_bitmap_add(img, "fz", 0, 0) >= 0) {
                        /* a transient one beside it: merged both ways, never stored */
                        (void) dc_image_bitmap_add(img, "tz", 4096, DC_BITMAP_TRANSIENT);
                        (void) dc_image_write(img, buf, 0, 512);
                        (void) dc_image_bitmap_merge(img, "fz", (const char *const[]){ "fz", "tz" }, 2);
                        (void) dc_image_bitmap_merge(img, "tz", (const char *const[]){ "fz" }, 1);
                        walk_bitmaps(img);
                        (void) dc_image_bitmap_clear(img, "fz");
                        (void) dc_image_bitmap_set_enabled(img, "fz", false);
                        (void) dc_image_bitmap_remove(img, "tz");
                        (void) dc_image_bitmap_remove(img, "fz");
                }
        }
        free(buf);
        dc_image_close(img);
}

static void repair_pass(const char *path) {
        struct dc_open_options o = {
                .roots = roots, .no_backing = true, .no_lock = true, .writable = true, .check_mode = true
        };
        struct dc_check_result c;
        dc_image *img = NULL;

        if (dc_image_open(path, &o, &img) < 0)
                return;
        if (!dc_image_read_only(img))
                (void) dc_image_check(img, DC_REPAIR_ALL, &c);
        dc_image_close(img);
}

static void no_notify(void *u) {
        (void) u;
}

static void run_job(dc_job *j) {
        struct dc_job_event ev;
        struct dc_job_info info;

        for (;;) {
                while (dc_job_next_event(j, &ev) > 0)
                        ;
                dc_job_get_info(j, &info);
                if (info.status == DC_JOB_NULL)
                        break;
                if (info.status == DC_JOB_CONCLUDED) {
                        (void) dc_job_dismiss(j);
                        continue;
                }
                usleep(1000);
        }
        while (dc_job_next_event(j, &ev) > 0)
                ;
        dc_job_free(j);
}

static void job_pass(const char *path, const char *target) {
        struct dc_open_options o = { .roots = roots, .no_backing = true, .no_lock = true };
        struct dc_job_options jo = { .id = "fuzz", .auto_finalize = true, .auto_dismiss = true, .notify = no_notify };
        struct dc_create_options co = { .backing_format = -1 };
        struct dc_backup_options bo = { .sync = DC_SYNC_FULL, .max_workers = 1, .max_chunk = 65536 };
        dc_image *img = NULL;
        dc_job *j = NULL;
        uint64_t vs;

        if (dc_image_open(path, &o, &img) < 0)
                return;
        vs = dc_image_virtual_size(img);
        dc_image_close(img);
        if (vs == 0 || vs > MAX_JOB_SIZE)
                return;
        unlink(target);
        if (dc_image_create(target, vs, &co, roots) < 0)
                return;
        if (dc_job_backup(path, target, &bo, &o, &jo, &j) >= 0)
                run_job(j);
        jo.id = "fuzz-stream";
        if (dc_job_stream(path, NULL, NULL, &o, &jo, &j) >= 0)
                run_job(j);
        unlink(target);
}

static void remove_dir(void) {
        static const char *const names[] = { "a.qcow2", "b.qcow2", "c.qcow2", "d.raw", "target.qcow2" };
        char p[96];

        for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
                snprintf(p, sizeof p, "%s/%s", dir, names[i]);
                unlink(p);
        }
        rmdir(dir);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        char a[96], b[96], c[96], d[96], t[96];

        if (!dir[0]) {
                /* tmpfs when there is one: the library syncs a lot, and a
                 * sync there costs nothing */
                snprintf(dir, sizeof dir, "%s/fuzz-qcow2-XXXXXX", access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
                if (!mkdtemp(dir))
                        abort();
                roots[0] = dir;
                atexit(remove_dir);
        }
        /* a fresh data file for images that name one (the seeds say "d.raw") */
        snprintf(d, sizeof d, "%s/d.raw", dir);
        {
                int fd = open(d, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
                if (fd >= 0) {
                        (void) !ftruncate(fd, 1u << 20);
                        close(fd);
                }
        }
        snprintf(a, sizeof a, "%s/a.qcow2", dir);
        snprintf(b, sizeof b, "%s/b.qcow2", dir);
        snprintf(c, sizeof c, "%s/c.qcow2", dir);
        snprintf(t, sizeof t, "%s/target.qcow2", dir);
        if (write_file(a, data, size) == 0) {
                read_only_pass(a);
                if (write_file(b, data, size) == 0) {
                        /* the dirty bit (v3: incompatible_features at 72) */
                        if (size >= 104 && (data[size - 1] & 1) && data[7] == 3) {
                                uint8_t dirty = data[79] | 1;
                                int fd = open(b, O_WRONLY | O_CLOEXEC);
                                if (fd >= 0) {
                                        (void) !pwrite(fd, &dirty, 1, 79);
                                        close(fd);
                                }
                        }
                        write_pass(b);
                        job_pass(b, t);
                }
                if (write_file(c, data, size) == 0)
                        repair_pass(c);
        }
        unlink(a);
        unlink(b);
        unlink(c);
        return 0;
}
