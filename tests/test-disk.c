/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Unit tests of the write path's filter stack (lib/disk.c) on a fake
 * image: two filters with different units on one disk under four
 * concurrent writers, while a third is attached and detached over and over.
 * Each filter checks, inside its hooks, that it never runs twice at once
 * over the same unit (the write's range lock covers whole units of every
 * filter), that the hooks run in stack order (before_write top down,
 * after_write bottom up) once each per write, and that a detached filter is
 * never called.  Then: a failing before_write fails the write before the
 * filters below and the chain see it; attach refusals.
 */

#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <time.h>

#include "fake-image.h"

#define CHECK_DETAIL() dc_get_error()
#include "check.h"

#define SIZE (4u << 20)
#define WRITERS 4
#define WRITES 1500

struct tf {
        struct dc_disk_filter f;
        char name;
        pthread_mutex_t m;
        uint64_t busy[64][2];    /* units [lo, hi) of the hooks running now */
        unsigned nbusy;
        unsigned long before, after, overlaps;
        bool attached;           /* set before attach, cleared after detach returned */
        unsigned long stray;     /* hooks called while not attached */
        uint64_t fail_at;        /* before_write fails writes starting here (0: none) */
};

static __thread char trace[16];
static __thread unsigned ntrace;

static void note(char c) {
        if (ntrace < sizeof trace - 1)
                trace[ntrace++] = c;
}

static void busy_enter(struct tf *t, uint64_t off, uint64_t len) {
        uint64_t a = t->f.align, lo = off / a, hi = DIV_ROUND_UP(off + len, a);
        pthread_mutex_lock(&t->m);
        for (unsigned i = 0; i < t->nbusy; i++)
                if (t->busy[i][0] < hi && lo < t->busy[i][1])
                        t->overlaps++;
        if (t->nbusy < 64) {
                t->busy[t->nbusy][0] = lo;
                t->busy[t->nbusy][1] = hi;
                t->nbusy++;
        }
        pthread_mutex_unlock(&t->m);
}

static void busy_leave(struct tf *t, uint64_t off, uint64_t len) {
        uint64_t a = t->f.align, lo = off / a;
        pthread_mutex_lock(&t->m);
        for (unsigned i = 0; i < t->nbusy; i++)
                if (t->busy[i][0] == lo) {
                        t->busy[i][0] = t->busy[--t->nbusy][0];
                        t->busy[i][1] = t->busy[t->nbusy][1];
                        break;
                }
        pthread_mutex_unlock(&t->m);
}

static int tf_before(struct dc_disk_filter *f, uint64_t off, uint64_t len) {
        struct tf *t = container_of(f, struct tf, f);
        bool attached;

        pthread_mutex_lock(&t->m);
        attached = t->attached;
        if (!attached)
                t->stray++;
        t->before++;
        pthread_mutex_unlock(&t->m);
        note(t->name);
        if (t->fail_at && off == t->fail_at)
                return dc_error(EIO, "filter %c refuses the write", t->name);
        busy_enter(t, off, len);
        {
                /* linger, so that a conflicting writer gets in if it can */
                struct timespec ts = { 0, 20000 };
                nanosleep(&ts, NULL);
        }
        busy_leave(t, off, len);
        return 0;
}

static void tf_after(struct dc_disk_filter *f, uint64_t off, uint64_t len) {
        struct tf *t = container_of(f, struct tf, f);
        pthread_mutex_lock(&t->m);
        if (!t->attached)
                t->stray++;
        t->after++;
        pthread_mutex_unlock(&t->m);
        note((char) (t->name - 'A' + 'a'));
        busy_enter(t, off, len);
        busy_leave(t, off, len);
}

static const struct dc_disk_filter_ops tf_ops = { .name = "test", .before_write = tf_before, .after_write = tf_after };

static void tf_init(struct tf *t, char name, uint64_t align) {
        *t = (struct tf){ .f = { .ops = &tf_ops, .align = align }, .name = name };
        pthread_mutex_init(&t->m, NULL);
}

static dc_disk *disk;
static struct tf fa, fb, fc;
static unsigned long bad_order, write_failures;
static pthread_mutex_t order_lock = PTHREAD_MUTEX_INITIALIZER;
static bool stop_churn;

static uint64_t rnd(uint64_t *s) {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        return *s;
}

static void *writer(void *p) {
        uint64_t seed = 0x9e3779b97f4a7c15ull * ((uintptr_t) p + 1);
        uint8_t *buf = malloc(128 << 10);

        for (int n = 0; n < WRITES; n++) {
                uint64_t len = (rnd(&seed) % 256 + 1) * 512, off = rnd(&seed) % (SIZE / 512) * 512;
                int r;

                if (off + len > SIZE)
                        len = SIZE - off;
                memset(buf, n & 0xff, len);
                ntrace = 0;
                r = n % 7 ? dc_disk_write(disk, buf, off, len) : dc_disk_write_zeroes(disk, off, len, 0);
                trace[ntrace] = 0;
                if (r < 0) {
                        __atomic_add_fetch(&write_failures, 1, __ATOMIC_RELAXED);
                        continue;
                }
                /* B above A; C, when it was in this write's snapshot, above both */
                if (strcmp(trace, "BAab") != 0 && strcmp(trace, "CBAabc") != 0) {
                        pthread_mutex_lock(&order_lock);
                        if (!bad_order++)
                                fprintf(stderr, "hooks ran as '%s'\n", trace);
                        pthread_mutex_unlock(&order_lock);
                }
        }
        free(buf);
        return NULL;
}

/* Attach and detach C over and over while the writers run. */
static void *churn(void *p) {
        unsigned long rounds = 0;
        while (!__atomic_load_n(&stop_churn, __ATOMIC_RELAXED)) {
                pthread_mutex_lock(&fc.m);
                fc.attached = true;
                pthread_mutex_unlock(&fc.m);
                if (dc_disk_attach_filter(disk, &fc.f) < 0)
                        abort();
                sched_yield();
                dc_disk_detach_filter(disk, &fc.f);
                pthread_mutex_lock(&fc.m);
                fc.attached = false;
                pthread_mutex_unlock(&fc.m);
                rounds++;
        }
        return (void *) (uintptr_t) rounds;
}

static void test_two_filters_with_writers(void) {
        pthread_t w[WRITERS], c;
        void *rounds;

        CHECK(dc_disk_new(fake_image("/fake/top", SIZE, NULL, true), NULL, &disk) == 0);
        tf_init(&fa, 'A', 4096);
        tf_init(&fb, 'B', 65536);
        tf_init(&fc, 'C', 512);
        fa.attached = fb.attached = true;
        CHECK(dc_disk_attach_filter(disk, &fa.f) == 0);
        CHECK(dc_disk_attach_filter(disk, &fb.f) == 0);

        for (uintptr_t i = 0; i < WRITERS; i++)
                CHECK(pthread_create(&w[i], NULL, writer, (void *) i) == 0);
        CHECK(pthread_create(&c, NULL, churn, NULL) == 0);
        for (int i = 0; i < WRITERS; i++)
                pthread_join(w[i], NULL);
        __atomic_store_n(&stop_churn, true, __ATOMIC_RELAXED);
        pthread_join(c, &rounds);

        CHECK(write_failures == 0);
        CHECK(bad_order == 0);
        CHECK(fa.before == WRITERS * WRITES && fa.after == WRITERS * WRITES);
        CHECK(fb.before == WRITERS * WRITES && fb.after == WRITERS * WRITES);
        CHECK(fa.overlaps == 0 && fb.overlaps == 0 && fc.overlaps == 0);
        CHECK(fa.stray == 0 && fb.stray == 0 && fc.stray == 0);
        CHECK(fc.before == fc.after);
        CHECK((uintptr_t) rounds > 0);
        printf("two filters, %d writes, third filter attached %lu times and ran in %lu writes\n", WRITERS * WRITES,
               (unsigned long) (uintptr_t) rounds, fc.before);
}

static void test_failing_filter(void) {
        struct fake *f = fake_of(dc_disk_chain(disk));
        uint8_t buf[4096], back[4096];
        unsigned long writes = f->writes, a_before = fa.before, b_before = fb.before, a_after = fa.after;

        /* B is above A: A refuses, B saw the write, the chain did not, nobody's after_write ran */
        CHECK(dc_disk_read(disk, back, SIZE - 8192, sizeof back) == 0);
        fa.fail_at = SIZE - 8192;
        memset(buf, 0x77, sizeof buf);
        ntrace = 0;
        CHECK(dc_disk_write(disk, buf, SIZE - 8192, sizeof buf) == -EIO);
        trace[ntrace] = 0;
        CHECK(strcmp(trace, "BA") == 0);
        CHECK(strstr(dc_get_error(), "filter A refuses") != NULL);
        CHECK(f->writes == writes);
        CHECK(fa.before == a_before + 1 && fb.before == b_before + 1 && fa.after == a_after);
        CHECK(dc_disk_read(disk, buf, SIZE - 8192, sizeof buf) == 0 && memcmp(buf, back, sizeof buf) == 0);
        fa.fail_at = 0;

        /* taken off, A runs no more; B still does */
        dc_disk_detach_filter(disk, &fa.f);
        dc_disk_detach_filter(disk, &fa.f); /* twice: nothing */
        ntrace = 0;
        CHECK(dc_disk_write(disk, buf, 0, sizeof buf) == 0);
        trace[ntrace] = 0;
        CHECK(strcmp(trace, "Bb") == 0);
}

static void test_attach_refusals(void) {
        struct tf more[DC_DISK_MAX_FILTERS];
        unsigned n = 0;

        CHECK(dc_disk_attach_filter(disk, &fb.f) == -EBUSY); /* attached already */
        for (; n < DC_DISK_MAX_FILTERS; n++) {
                tf_init(&more[n], 'M', 512);
                if (dc_disk_attach_filter(disk, &more[n].f) < 0)
                        break;
        }
        CHECK(n == DC_DISK_MAX_FILTERS - 1); /* B and these: the stack is full */
        CHECK(strstr(dc_get_error(), "filters attached already") != NULL);
        while (n > 0)
                dc_disk_detach_filter(disk, &more[--n].f);
        dc_disk_detach_filter(disk, &fb.f);
}

int main(void) {
        test_two_filters_with_writers();
        test_failing_filter();
        test_attach_refusals();
        dc_disk_unref(disk);
        return check_report("test-disk");
}
