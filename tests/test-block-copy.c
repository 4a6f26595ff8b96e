/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Unit tests of the copy engine (lib/block-copy.c) on fake images
 * (fake-image.h): what a pass copies for each way the jobs use it (a
 * chain's allocation into a separate target, a stream's view into the top
 * layer itself, a commit's into base), that its progress covers the disk
 * exactly once and counts only data as copied, that several requests really
 * run, zero detection, each answer of the error hook (retry, skip, fail), an
 * owner ending a pass early, copies outside a pass, and copy-before-write
 * keeping a point in time under concurrent guest writes.
 */

#include <pthread.h>
#include <stdio.h>

#include "block-copy.h"
#include "fake-image.h"

#define CHECK_DETAIL() dc_get_error()
#include "check.h"

#define MiB (1u << 20)
#define KiB 1024u

/* The owner's side of the hooks: a scripted job. */
struct owner {
        pthread_mutex_t m;
        uint64_t done, copied;
        pthread_t threads[32];
        unsigned nthreads, requests;
        int on_error;            /* what error() answers: 0 retry, 1 skip, < 0 fail */
        unsigned errors, read_errors;
        long stop_after;         /* > 0: pause() ends the pass after this many requests */
};

static int o_pause(void *opaque, uint64_t done, uint64_t copied) {
        struct owner *o = opaque;
        pthread_t me = pthread_self();
        bool known = false;
        int r = 0;

        pthread_mutex_lock(&o->m);
        o->done += done;
        o->copied += copied;
        for (unsigned i = 0; i < o->nthreads; i++)
                known |= pthread_equal(o->threads[i], me);
        if (!known && o->nthreads < 32)
                o->threads[o->nthreads++] = me;
        if (done || copied) {
                o->requests++;
                if (o->stop_after > 0 && o->requests >= (unsigned long) o->stop_after)
                        r = 1;
        }
        pthread_mutex_unlock(&o->m);
        return r;
}
static bool o_turn_take(void *opaque) {
        return false;
}
static void o_turn_give(void *opaque, bool taken) {
}
static int o_error(void *opaque, int err, bool is_read) {
        struct owner *o = opaque;
        int r;
        pthread_mutex_lock(&o->m);
        o->errors++;
        o->read_errors += is_read;
        r = o->on_error;
        pthread_mutex_unlock(&o->m);
        return r;
}
static const struct dc_block_copy_hooks owner_hooks = {
        .pause = o_pause, .turn_take = o_turn_take, .turn_give = o_turn_give, .error = o_error,
};

static void owner_init(struct owner *o) {
        *o = (struct owner){ 0 };
        pthread_mutex_init(&o->m, NULL);
}

/* A chain base <- mid <- top of SIZE bytes with data in each layer, a zero
 * cluster in mid over base's data, and a stretch of zeros written as data. */
static dc_image *test_chain(uint64_t size) {
        dc_image *base = fake_image("/fake/base", size, NULL, true);
        dc_image *mid = fake_image("/fake/mid", size, base, true);
        dc_image *top = fake_image("/fake/top", size, mid, true);

        fake_fill(base, 0, size / 2, 1);
        fake_fill(mid, size / 4, size / 8, 2);
        fake_zero(mid, size / 8, 64 * KiB);
        fake_fill(top, size - 3 * MiB, 1 * MiB + 4 * KiB, 3);
        fake_fill(top, 7 * 512, 512, 4); /* a single sector, mid-cluster */
        /* data that is all zeros: copied as a zero write */
        memset(fake_of(mid)->data + size / 2, 0, 128 * KiB);
        fake_of(mid)->state[size / 2 / FAKE_SECTOR] = FAKE_DATA;
        for (uint64_t s = size / 2 / FAKE_SECTOR; s < (size / 2 + 128 * KiB) / FAKE_SECTOR; s++)
                fake_of(mid)->state[s] = FAKE_DATA;
        return top;
}

/* The whole disk as the chain from IMG reads it. */
static uint8_t *read_all(dc_image *img) {
        uint8_t *b = malloc(img->virtual_size);
        if (!b || dc_chain_read(img, b, 0, img->virtual_size) < 0)
                abort();
        return b;
}

static bool same_as(dc_image *img, const uint8_t *want) {
        uint8_t *b = read_all(img);
        bool same = memcmp(b, want, img->virtual_size) == 0;
        free(b);
        return same;
}

/* Bytes of one layer in state ST. */
static uint64_t bytes_in(dc_image *img, uint8_t st) {
        uint64_t n = 0;
        for (uint64_t s = 0; s < img->virtual_size / FAKE_SECTOR; s++)
                n += fake_of(img)->state[s] == st;
        return n * FAKE_SECTOR;
}

/* Backup's and mirror's use: the chain's allocation into a separate target, several requests in flight. */
static void test_chain_into_target(void) {
        const uint64_t size = 16 * MiB;
        dc_image *top = test_chain(size), *tgt = fake_image("/fake/target", size, NULL, true);
        uint8_t *want = read_all(top);
        struct owner o;
        dc_block_copy *bc;
        dc_disk *d;

        owner_init(&o);
        for (dc_image *l = top; l; l = l->backing)
                fake_of(l)->read_delay_us = 500; /* the caller alone cannot finish before the helpers start */
        CHECK(dc_disk_new(top, NULL, &d) == 0);
        CHECK(dc_block_copy_new(&(struct dc_block_copy_params){ .disk = d, .source = top, .target = tgt,
                                                                 .unit = 64 * KiB, .chunk = 256 * KiB, .workers = 4,
                                                                 .hooks = &owner_hooks, .opaque = &o },
                                &bc) == 0);
        CHECK(dc_block_copy_dirty(bc) == 0);
        CHECK(dc_block_copy_mark_allocated(bc, top, NULL) == 0);
        /* base [0, 8M), mid's data and zero cluster inside it, top's 1M+4K and its sector at 3.5K */
        CHECK(dc_block_copy_dirty(bc) == 8 * MiB + 128 * KiB + 1 * MiB + 64 * KiB);
        CHECK(dc_block_copy_pass(bc) == 0);
        CHECK(dc_block_copy_dirty(bc) == 0);
        CHECK(same_as(tgt, want));
        CHECK(o.done == size);           /* every byte of the disk handled once */
        CHECK(o.copied == 8 * MiB + 128 * KiB + 1 * MiB + 64 * KiB);
        CHECK(o.nthreads >= 2);          /* helpers ran beside the caller */
        CHECK(fake_of(top->backing->backing)->max_in_read >= 2); /* their reads of the chain too, not one at a time */
        CHECK(o.errors == 0);
        /* zeros read are not written where the target reads zeros anyway: mid's zero data after base's */
        CHECK(bytes_in(tgt, FAKE_ZERO) == 0);
        CHECK(fake_of(tgt)->state[8 * MiB / FAKE_SECTOR] == FAKE_UNALLOCATED);
        CHECK(fake_of(tgt)->state[(8 * MiB + 128 * KiB - 1) / FAKE_SECTOR] == FAKE_UNALLOCATED);
        CHECK(fake_of(tgt)->state[(14 * MiB + 4 * KiB) / FAKE_SECTOR] == FAKE_DATA); /* a unit with some data */
        CHECK(dc_block_copy_flush(bc) == 0 && fake_of(tgt)->flushes == 1);
        bc = dc_block_copy_free(bc);
        CHECK(bc == NULL);
        dc_disk_unref(d);
        dc_image_close(tgt);
        free(want);
}

/* Stream's use: the top layer fills itself with what lies above base, never over its own data. */
static void test_stream_view(void) {
        const uint64_t size = 8 * MiB;
        dc_image *top = test_chain(size), *mid = top->backing, *base = mid->backing;
        uint8_t *want = read_all(top), *top_before = malloc(size), *top_state = malloc(size / FAKE_SECTOR);
        struct owner o;
        dc_block_copy *bc;
        dc_disk *d;

        memcpy(top_before, fake_of(top)->data, size);
        memcpy(top_state, fake_of(top)->state, size / FAKE_SECTOR);
        owner_init(&o);
        CHECK(dc_disk_new(top, NULL, &d) == 0);
        CHECK(dc_block_copy_new(&(struct dc_block_copy_params){ .disk = d, .source = top, .target = top,
                                                                 .skip_unallocated = true, .stop = base,
                                                                 .skip_target_allocated = true, .workers = 2,
                                                                 .hooks = &owner_hooks, .opaque = &o },
                                &bc) == 0);
        dc_block_copy_mark_all(bc);
        CHECK(dc_block_copy_dirty(bc) == size); /* unit = chunk = 2 MiB */
        CHECK(dc_block_copy_pass(bc) == 0);
        CHECK(dc_block_copy_dirty(bc) == 0);
        CHECK(o.done == size);
        CHECK(same_as(top, want));
        /* top holds now what it held and what mid held (its zero cluster as zeros), nothing of base's */
        for (uint64_t sct = 0; sct < size / FAKE_SECTOR; sct++) {
                bool was = top_state[sct] != FAKE_UNALLOCATED, in_mid = fake_of(mid)->state[sct] != FAKE_UNALLOCATED;
                if ((fake_of(top)->state[sct] != FAKE_UNALLOCATED) != (was || in_mid)) {
                        CHECK(!"top's allocation after the stream");
                        fprintf(stderr, "sector %llu\n", (unsigned long long) sct);
                        break;
                }
        }
        /* top's own sector stayed as it was */
        CHECK(memcmp(fake_of(top)->data + 7 * 512, top_before + 7 * 512, 512) == 0);
        dc_block_copy_free(bc);
        dc_disk_unref(d);
        free(want);
        free(top_before);
        free(top_state);
        (void) base;
}

/* Commit's use: top's view down to base, into base; afterwards base reads what top did. */
static void test_commit_view(void) {
        const uint64_t size = 8 * MiB;
        dc_image *top = test_chain(size), *mid = top->backing, *base = mid->backing;
        uint8_t *want = read_all(top);
        struct owner o;
        dc_block_copy *bc;
        dc_disk *d;

        owner_init(&o);
        CHECK(dc_disk_new(top, NULL, &d) == 0);
        CHECK(dc_block_copy_new(&(struct dc_block_copy_params){ .disk = d, .source = top, .target = base,
                                                                 .skip_unallocated = true, .stop = base,
                                                                 .hooks = &owner_hooks, .opaque = &o },
                                &bc) == 0);
        dc_block_copy_mark_all(bc);
        CHECK(dc_block_copy_pass(bc) == 0);
        CHECK(same_as(base, want));
        CHECK(o.done == size && o.copied < size);
        dc_block_copy_free(bc);
        dc_disk_unref(d);
        free(want);
}

/* The error hook: retried requests copy in the end; skipped ones are done but not copied; a failure ends the pass. */
static void test_errors(void) {
        const uint64_t size = 4 * MiB;
        struct {
                const char *what;
                int on_error;
                bool fail_read;
                int want_r;
        } cases[] = {
                { "retry a write", 0, false, 0 },
                { "retry a read", 0, true, 0 },
                { "skip", 1, false, 0 },
                { "fail", -ENOSPC, false, -ENOSPC },
        };

        for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
                dc_image *top = test_chain(size), *tgt = fake_image("/fake/target", size, NULL, true);
                uint8_t *want = read_all(top);
                struct owner o;
                dc_block_copy *bc;
                dc_disk *d;
                int r;

                owner_init(&o);
                o.on_error = cases[c].on_error;
                if (cases[c].fail_read) {
                        fake_of(top->backing->backing)->fail_read_in = 3;
                        fake_of(top->backing->backing)->fail_errno = EIO;
                } else {
                        fake_of(tgt)->fail_write_in = 3;
                        fake_of(tgt)->fail_errno = cases[c].on_error < 0 ? ENOSPC : EIO;
                }
                CHECK(dc_disk_new(top, NULL, &d) == 0);
                CHECK(dc_block_copy_new(&(struct dc_block_copy_params){ .disk = d, .source = top, .target = tgt,
                                                                         .unit = 64 * KiB, .chunk = 128 * KiB,
                                                                         .workers = 1, .hooks = &owner_hooks,
                                                                         .opaque = &o },
                                        &bc) == 0);
                dc_block_copy_mark_all(bc);
                r = dc_block_copy_pass(bc);
                CHECK(r == cases[c].want_r);
                CHECK(o.errors == 1); /* the fault fires once: a retry succeeds */
                CHECK(o.read_errors == (cases[c].fail_read ? 1u : 0u));
                if (cases[c].want_r < 0) {
                        CHECK(strstr(dc_get_error(), "fake write failure") != NULL);
                        CHECK(dc_block_copy_dirty(bc) > 0);
                } else if (cases[c].on_error == 1) {
                        /* the request's 128 KiB: done, not copied, not marked any more, not in the target */
                        CHECK(o.done == size && o.copied == size - 128 * KiB);
                        CHECK(dc_block_copy_dirty(bc) == 0);
                        CHECK(!same_as(tgt, want));
                } else {
                        CHECK(o.done == size && o.copied == size);
                        CHECK(same_as(tgt, want));
                }
                printf("errors: %s: %u error(s), pass %d\n", cases[c].what, o.errors, r);
                dc_block_copy_free(bc);
                dc_disk_unref(d);
                dc_image_close(tgt);
                free(want);
        }
}

/* The owner ends a pass early; what it did not get to stays marked for the next one; a range copy outside a pass. */
static void test_stop_and_range(void) {
        const uint64_t size = 4 * MiB;
        dc_image *top = test_chain(size), *tgt = fake_image("/fake/target", size, NULL, true);
        uint8_t *want = read_all(top);
        struct owner o;
        dc_block_copy *bc;
        dc_disk *d;
        bool read_error = true;

        owner_init(&o);
        o.stop_after = 3;
        CHECK(dc_disk_new(top, NULL, &d) == 0);
        CHECK(dc_block_copy_new(&(struct dc_block_copy_params){ .disk = d, .source = top, .target = tgt,
                                                                 .unit = 64 * KiB, .chunk = 64 * KiB, .workers = 1,
                                                                 .hooks = &owner_hooks, .opaque = &o },
                                &bc) == 0);
        dc_block_copy_mark_all(bc);
        CHECK(dc_block_copy_pass(bc) == 0);
        CHECK(o.requests == 3 && dc_block_copy_dirty(bc) == size - 3 * 64 * KiB);

        /* a range copy copies exactly the marked units it touches, and clears them */
        CHECK(dc_block_copy_mark(bc, 5 * 64 * KiB, 1) == 0); /* marked still: the pass stopped before it */
        CHECK(dc_block_copy_mark(bc, 100, 1) == 1);          /* copied by the pass: marked again */
        CHECK(dc_block_copy_dirty(bc) == size - 2 * 64 * KiB);
        CHECK(dc_block_copy_range(bc, 1 * MiB + 100, 200 * KiB, false, &read_error) == 0);
        CHECK(dc_block_copy_dirty(bc) == size - 6 * 64 * KiB);
        CHECK(memcmp(fake_of(tgt)->data + 1 * MiB, want + 1 * MiB, 256 * KiB) == 0);
        CHECK(fake_of(tgt)->state[(1 * MiB + 256 * KiB) / FAKE_SECTOR] == FAKE_UNALLOCATED);
        /* a failing range copy leaves its units marked and says what failed */
        fake_of(top->backing->backing)->fail_read_in = 1;
        fake_of(top->backing->backing)->fail_errno = EIO;
        CHECK(dc_block_copy_range(bc, 64 * KiB, 64 * KiB, false, &read_error) == 0); /* copied by the pass: nothing */
        CHECK(dc_block_copy_range(bc, 256 * KiB, 64 * KiB, false, &read_error) == -EIO); /* base's data, marked */
        CHECK(read_error && dc_block_copy_dirty(bc) == size - 6 * 64 * KiB);

        o.stop_after = 0;
        CHECK(dc_block_copy_pass(bc) == 0);
        CHECK(dc_block_copy_dirty(bc) == 0 && same_as(tgt, want));
        dc_block_copy_free(bc);
        dc_disk_unref(d);
        dc_image_close(tgt);
        free(want);
}

/* Copy-before-write under guest writes, beside the background pass: the target is the disk as it was at the start. */
static dc_disk *cbw_disk;
static uint64_t cbw_size;
static void *guest(void *p) {
        uint64_t seed = 0x2545f4914f6cdd1dull * ((uintptr_t) p + 1);
        uint8_t *buf = malloc(64 * KiB);
        for (int n = 0; n < 400; n++) {
                uint64_t len, off;
                seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
                len = (seed % 128 + 1) * 512;
                off = (seed >> 20) % (cbw_size / 512) * 512;
                if (off + len > cbw_size)
                        len = cbw_size - off;
                memset(buf, 0xe0 + (int) (uintptr_t) p, len);
                if ((n % 5 ? dc_disk_write(cbw_disk, buf, off, len) : dc_disk_discard(cbw_disk, off, len)) < 0)
                        abort();
        }
        free(buf);
        return NULL;
}

static void test_cbw_point_in_time(void) {
        const uint64_t size = cbw_size = 16 * MiB;
        dc_image *top = test_chain(size), *tgt = fake_image("/fake/backup", size, NULL, true);
        uint8_t *point = read_all(top);
        pthread_t g[3];
        struct owner o;
        dc_block_copy *bc;
        dc_cbw *cbw = NULL;

        owner_init(&o);
        CHECK(dc_disk_new(top, NULL, &cbw_disk) == 0);
        CHECK(dc_block_copy_new(&(struct dc_block_copy_params){ .disk = cbw_disk, .source = top, .target = tgt,
                                                                 .unit = 64 * KiB, .chunk = 256 * KiB, .workers = 4,
                                                                 .hooks = &owner_hooks, .opaque = &o },
                                &bc) == 0);
        dc_disk_quiesce(cbw_disk);
        CHECK(dc_cbw_attach(cbw_disk, bc, 64 * KiB, "backup job 'test'", &cbw) == 0);
        CHECK(dc_block_copy_mark_allocated(bc, top, NULL) == 0);
        dc_disk_unquiesce(cbw_disk);
        for (uintptr_t i = 0; i < 3; i++)
                pthread_create(&g[i], NULL, guest, (void *) i);
        CHECK(dc_block_copy_pass(bc) == 0);
        for (int i = 0; i < 3; i++)
                pthread_join(g[i], NULL);
        cbw = dc_cbw_detach(cbw);
        CHECK(dc_block_copy_dirty(bc) == 0);
        CHECK(same_as(tgt, point));
        CHECK(!same_as(top, point)); /* the guests did write */

        /* a failing copy fails the guest's write, with the job named */
        dc_block_copy_mark_all(bc);
        CHECK(dc_cbw_attach(cbw_disk, bc, 64 * KiB, "backup job 'nightly'", &cbw) == 0);
        fake_of(tgt)->fail_write_in = 1;
        fake_of(tgt)->fail_errno = ENOSPC;
        CHECK(dc_disk_write_zeroes(cbw_disk, 0, 512, 0) == -ENOSPC);
        CHECK(strstr(dc_get_error(), "copy-before-write for backup job 'nightly' failed: fake write failure") != NULL);
        cbw = dc_cbw_detach(cbw);
        dc_block_copy_free(bc);
        dc_disk_unref(cbw_disk);
        dc_image_close(tgt);
        free(point);
}

static void count_broken(void *u, const char *why) {
        (void) why;
        ++*(int *) u;
}

static void set_read_delay(dc_image *top, unsigned us) {
        for (dc_image *l = top; l; l = l->backing)
                fake_of(l)->read_delay_us = us;
}

/* cbw-timeout: a copy slower than the limit fails the guest's write, or (break-snapshot) breaks the view. */
static void test_cbw_timeout(void) {
        const uint64_t size = 4 * MiB;
        dc_image *top = test_chain(size), *tgt = fake_image("/fake/fleece", size, NULL, true);
        uint8_t buf[512];
        dc_block_copy *bc;
        dc_cbw *cbw = NULL;
        dc_disk *d;
        bool marked;
        int broken = 0;

        memset(buf, 7, sizeof buf);
        CHECK(dc_disk_new(top, NULL, &d) == 0);
        CHECK(dc_block_copy_new(&(struct dc_block_copy_params){ .disk = d, .source = top, .target = tgt,
                                                                 .unit = 64 * KiB },
                                &bc) == 0);
        dc_block_copy_mark_all(bc);
        set_read_delay(top, 200000);
        CHECK(dc_cbw_attach(d, bc, 64 * KiB, "the fleecing export", &cbw) == 0);
        dc_cbw_set_timeout(cbw, 50);
        CHECK(dc_disk_write(d, buf, 0, 512) == -ETIMEDOUT);
        CHECK(strstr(dc_get_error(), "the fleecing export failed: it took longer than the 50 ms of cbw-timeout"));
        cbw = dc_cbw_detach(cbw); /* waits for the copy given up on, which then finished */
        CHECK(dc_block_copy_marked_run(bc, 0, 64 * KiB, &marked) == 64 * KiB && !marked);
        /* a copy within the limit */
        set_read_delay(top, 0);
        CHECK(dc_cbw_attach(d, bc, 64 * KiB, "the fleecing export", &cbw) == 0);
        dc_cbw_set_timeout(cbw, 10000);
        CHECK(dc_disk_write(d, buf, 1 * MiB, 512) == 0);
        CHECK(dc_block_copy_marked_run(bc, 1 * MiB, 64 * KiB, &marked) == 64 * KiB && !marked);
        cbw = dc_cbw_detach(cbw);
        /* break-snapshot: the write goes on, the owner is told (the copy is slow to write into the fleecing
         * image, so the guest's write does not meet the copy's read of the same bytes) */
        fake_of(tgt)->write_delay_us = 200000;
        CHECK(dc_cbw_attach(d, bc, 64 * KiB, "the fleecing export", &cbw) == 0);
        dc_cbw_set_timeout(cbw, 50);
        dc_cbw_set_break_snapshot(cbw, count_broken, &broken);
        CHECK(dc_disk_write(d, buf, 2 * MiB, 512) == 0);
        CHECK(broken == 1);
        cbw = dc_cbw_detach(cbw);
        dc_block_copy_free(bc);
        dc_disk_unref(d);
        dc_image_close(tgt);
}

int main(void) {
        test_chain_into_target();
        test_stream_view();
        test_commit_view();
        test_errors();
        test_stop_and_range();
        test_cbw_point_in_time();
        test_cbw_timeout();
        return check_report("test-block-copy");
}
