/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* The rate a job makes progress at: its Rate and ExpectedEndTime properties (job-rate.c). */

#include <stdbool.h>
#include <stdint.h>

#define JOB_RATE_WINDOW_USEC 5000000u /* measure over about the last 5 s */
#define JOB_RATE_SAMPLES 32u          /* progress changes kept: 8 s of the 250 ms ticks */

typedef struct JobRate {
        struct {
                uint64_t t, offset; /* CLOCK_MONOTONIC µs, bytes of progress */
        } s[JOB_RATE_SAMPLES];
        unsigned n;                 /* samples held, oldest first */
        uint64_t start, end;        /* when the job started and ended (0 while it runs), µs */
        uint64_t rate;              /* bytes/s; 0 = unknown or nothing moving */
} JobRate;

/* CLOCK_MONOTONIC in µs: the clock of every time passed here. */
uint64_t job_rate_now(void);

/* The job started at T with no progress yet. */
void job_rate_start(JobRate *r, uint64_t t);
/* At T the job's progress is OFFSET (called about every 250 ms, and on every status change). */
void job_rate_sample(JobRate *r, uint64_t t, uint64_t offset);
/* The job is paused: nothing moves, and the measurement starts again when it resumes. */
void job_rate_pause(JobRate *r);
/* The job ended at T with OFFSET: the rate becomes its average over the whole run. */
void job_rate_end(JobRate *r, uint64_t t, uint64_t offset);
/* µs from the last sample until OFFSET reaches LEN at the rate, or UINT64_MAX when unknown. */
uint64_t job_rate_remaining(const JobRate *r, uint64_t offset, uint64_t len);
