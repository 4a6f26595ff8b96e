/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Unit tests of the daemon's job rate (daemon/job-rate.c), the numbers behind
 * a Job's Rate and ExpectedEndTime: fed with made-up progress on a made-up
 * clock, sampled every 250 ms as the daemon's progress tick samples it.
 */

#include <stdint.h>

#include "check.h"
#include "job-rate.h"

#define MS 1000u
#define SEC 1000000u
#define KIB 1024u
#define MIB (1024u * 1024u)
#define TICK (250 * MS)
#define T0 (1000 * SEC) /* the monotonic clock is not 0 when a job starts */

/* within 2 % of WANT */
static int near(uint64_t v, uint64_t want) {
        return v * 100 >= want * 98 && v * 100 <= want * 102;
}

/* Progress at RATE bytes/s from (*t, *off) for DUR, sampled every tick. */
static void run(JobRate *r, uint64_t *t, uint64_t *off, uint64_t rate, uint64_t dur) {
        for (uint64_t end = *t + dur; *t < end;) {
                *t += TICK;
                *off += rate * TICK / SEC;
                job_rate_sample(r, *t, *off);
        }
}

static void test_first_tick(void) {
        JobRate r;

        job_rate_start(&r, T0);
        CHECK(r.rate == 0);
        CHECK(job_rate_remaining(&r, 0, 8 * MIB) == UINT64_MAX);
        job_rate_sample(&r, T0 + TICK, 0); /* nothing yet */
        CHECK(r.rate == 0);
        job_rate_sample(&r, T0 + 2 * TICK, 256 * KIB);
        CHECK(near(r.rate, 512 * KIB)); /* from the start: 256 KiB in 500 ms */
        CHECK(near(job_rate_remaining(&r, 256 * KIB, 768 * KIB), SEC));
        CHECK(job_rate_remaining(&r, 8 * MIB, 8 * MIB) == UINT64_MAX);
}

static void test_follows_changes(void) {
        JobRate r;
        uint64_t t = T0, off = 0;

        job_rate_start(&r, t);
        run(&r, &t, &off, 10 * MIB, 10 * SEC);
        CHECK(near(r.rate, 10 * MIB));
        run(&r, &t, &off, 40 * MIB, 2 * SEC);
        CHECK(r.rate > 15 * MIB && r.rate < 35 * MIB); /* on its way */
        run(&r, &t, &off, 40 * MIB, 4 * SEC);
        CHECK(near(r.rate, 40 * MIB)); /* the window is 5 s */
        run(&r, &t, &off, 40 * MIB, 60 * SEC);
        CHECK(near(r.rate, 40 * MIB)); /* the samples kept are bounded */
}

/* Under a low speed limit progress moves in steps further apart than the window. */
static void test_steps(void) {
        JobRate r;
        uint64_t t = T0, off = 0, lo = UINT64_MAX, hi = 0;

        job_rate_start(&r, t);
        for (int step = 1; step <= 6; step++) {
                for (int i = 0; i < 32 * 4; i++) { /* one 2 MiB step every 32 s: 64 KiB/s */
                        t += TICK;
                        job_rate_sample(&r, t, off);
                        if (step > 2) {
                                lo = r.rate < lo ? r.rate : lo;
                                hi = r.rate > hi ? r.rate : hi;
                        }
                }
                off += 2 * MIB;
        }
        CHECK(near(lo, 64 * KIB) && near(hi, 64 * KIB)); /* never 0 between the steps */
}

static void test_pause_and_stall(void) {
        JobRate r;
        uint64_t t = T0, off = 0;

        job_rate_start(&r, t);
        run(&r, &t, &off, 8 * MIB, 10 * SEC);
        job_rate_pause(&r);
        CHECK(r.rate == 0);
        t += 60 * SEC;
        job_rate_pause(&r);
        job_rate_sample(&r, t, off); /* resumed: measured anew, the pause does not count */
        CHECK(r.rate == 0);
        run(&r, &t, &off, 8 * MIB, 2 * SEC);
        CHECK(near(r.rate, 8 * MIB));

        /* nothing moves without a pause: the rate falls at once, and is 0 after four windows */
        run(&r, &t, &off, 8 * MIB, 10 * SEC);
        run(&r, &t, &off, 0, SEC);
        CHECK(r.rate > 6 * MIB && r.rate < 7 * MIB); /* 4 s of the last 5 moved, about */
        run(&r, &t, &off, 0, 4 * SEC);
        CHECK(r.rate > 0 && r.rate <= 512 * KIB);
        run(&r, &t, &off, 0, 15 * SEC);
        CHECK(r.rate > 0);
        run(&r, &t, &off, 0, SEC);
        CHECK(r.rate == 0);
}

static void test_backwards(void) {
        JobRate r;
        uint64_t t = T0, off = 0;

        job_rate_start(&r, t);
        run(&r, &t, &off, 8 * MIB, 3 * SEC);
        off = 0;
        job_rate_sample(&r, t, off);
        CHECK(r.rate == 0);
        run(&r, &t, &off, 2 * MIB, 3 * SEC);
        CHECK(near(r.rate, 2 * MIB));
}

static void test_end_average(void) {
        JobRate r;
        uint64_t t = T0, off = 0;

        /* a job too quick for any tick: its average */
        job_rate_start(&r, t);
        job_rate_end(&r, t + 80 * MS, 8 * MIB);
        CHECK(near(r.rate, 100 * MIB));
        CHECK(r.end - r.start == 80 * MS);
        job_rate_sample(&r, t + TICK, 9 * MIB); /* ended: the numbers stay */
        job_rate_pause(&r);
        job_rate_end(&r, t + SEC, 9 * MIB);
        CHECK(near(r.rate, 100 * MIB) && r.end - r.start == 80 * MS);

        /* pauses count in the average: it is bytes over the whole run */
        job_rate_start(&r, t);
        run(&r, &t, &off, 4 * MIB, 2 * SEC);
        job_rate_pause(&r);
        t += 2 * SEC;
        job_rate_end(&r, t, off);
        CHECK(near(r.rate, 2 * MIB));

        /* an end at the start itself still divides by something */
        job_rate_start(&r, T0);
        job_rate_end(&r, T0, 0);
        CHECK(r.rate == 0 && r.end > r.start);
}

int main(void) {
        test_first_tick();
        test_follows_changes();
        test_steps();
        test_pause_and_stall();
        test_backwards();
        test_end_average();
        return check_report("test-job-rate");
}
