/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * How fast a job makes progress, for its Rate and ExpectedEndTime properties
 * (and so for diskchainctl's progress line, which shows those).
 *
 * Notes on the design
 * -------------------
 * The rate is measured from the job's progress (CurrentProgress, QMP's
 * offset: ranges skipped count as done, as they do for QMP), sampled on the
 * daemon's 250 ms progress tick.  Only samples where the progress moved are
 * kept, with the job's start as the first one.  With L the last of them, A
 * the newest kept sample at least JOB_RATE_WINDOW_USEC before now but older
 * than L, and k the number of steps from A to L:
 *
 *     span = L.t - A.t      gap = now - L.t      step = span / k
 *     rate = (L.offset - A.offset) / (span + max(0, gap - step))
 *
 * - A job that moves on every tick is measured over the last 5 s: the rate
 *   follows changes in speed within seconds and smooths the ticks' jitter.
 * - The first tick (250 ms after the start) already gives a rate, from the
 *   start; a job that ends before any tick gets its average (below).
 * - Under a low speed limit the job moves in steps further apart than the
 *   window (one 2 MiB request every 32 s at 64 KiB/s).  A is then the step
 *   before L, and the rate is one step over the time it took, the same all
 *   the way to the next step rather than zero between steps: a gap counts
 *   only where it is longer than the steps have been.
 * - When nothing moves (a disk that hangs, a ready mirror no guest writes
 *   to), the window slides past the last steps and the gap grows: the rate
 *   falls to about nothing within 5 s, and is 0 after four times the window
 *   (or the span, if longer).  A paused job's rate is 0 at once, and it is
 *   measured anew after it resumes, so the pause does not count against it.
 * - Progress that goes back (never today; a job that restarts a pass
 *   could) starts the measurement anew.
 * - When the job ends, the rate becomes its average over the whole run,
 *   start to end, pauses included: what diskchainctl's summary line says.
 *
 * The remaining time is (len - offset) / rate; the daemon adds it to the time
 * of the sample to make ExpectedEndTime.
 */

#include <string.h>
#include <time.h>

#include "job-rate.h"

uint64_t job_rate_now(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000u + (uint64_t) ts.tv_nsec / 1000u;
}

static void push(JobRate *r, uint64_t t, uint64_t offset) {
        if (r->n == JOB_RATE_SAMPLES) {
                memmove(r->s, r->s + 1, (JOB_RATE_SAMPLES - 1) * sizeof r->s[0]);
                r->n--;
        }
        r->s[r->n].t = t;
        r->s[r->n].offset = offset;
        r->n++;
}

void job_rate_start(JobRate *r, uint64_t t) {
        *r = (JobRate){ .start = t };
        push(r, t, 0);
}

void job_rate_sample(JobRate *r, uint64_t t, uint64_t offset) {
        uint64_t span, gap, step;
        unsigned a = 0, l;

        if (r->end)
                return;
        if (r->n > 0 && offset < r->s[r->n - 1].offset)
                r->n = 0;
        if (r->n == 0 || offset != r->s[r->n - 1].offset)
                push(r, t, offset);
        l = r->n - 1;
        if (l == 0 || t < r->s[l].t) {
                r->rate = 0;
                return;
        }
        for (unsigned i = l; i-- > 0;)
                if (r->s[i].t + JOB_RATE_WINDOW_USEC <= t) {
                        a = i;
                        break;
                }
        span = r->s[l].t - r->s[a].t;
        gap = t - r->s[l].t;
        if (span == 0 || gap > 4 * (span > JOB_RATE_WINDOW_USEC ? span : JOB_RATE_WINDOW_USEC)) {
                r->rate = 0;
                return;
        }
        step = span / (l - a);
        r->rate = (uint64_t) ((double) (r->s[l].offset - r->s[a].offset) * 1e6 /
                              (double) (span + (gap > step ? gap - step : 0)));
}

void job_rate_pause(JobRate *r) {
        if (r->end)
                return;
        r->n = 0;
        r->rate = 0;
}

void job_rate_end(JobRate *r, uint64_t t, uint64_t offset) {
        uint64_t elapsed;

        if (r->end)
                return;
        r->end = t > r->start ? t : r->start + 1;
        elapsed = r->end - r->start;
        r->rate = (uint64_t) ((double) offset * 1e6 / (double) elapsed);
}

uint64_t job_rate_remaining(const JobRate *r, uint64_t offset, uint64_t len) {
        if (!r->rate || len <= offset)
                return UINT64_MAX;
        return (uint64_t) ((double) (len - offset) * 1e6 / (double) r->rate);
}
