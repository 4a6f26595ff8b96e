/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Unit tests of the job model (lib/job.c) with fake drivers: the transition
 * and verb tables as qapi/job.json and QEMU's job.c have them, the event
 * order and the driver operations called for success, manual finalize,
 * failure, a failed prepare and a hard cancel, user pause at pause points,
 * the verbs a driver gives meaning to (complete, soft cancel, change) and
 * their refusal without one, on-error stop/ignore/report, and the speed
 * limit.  No image is touched: a fake driver's run only passes pause points.
 */

#include <pthread.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

#include "job.h"

#define CHECK_DETAIL() dc_get_error()
#include "check.h"

/* --- the tables ------------------------------------------------------------------------ */

/* QEMU's JobSTT without undefined, columns in the order of the rows. */
static const bool stt[10][10] = {
        /*              C  R  P  Y  S  W  D  X  E  N */
        /* created */ { 0, 1, 0, 0, 0, 0, 0, 1, 0, 1 },
        /* running */ { 0, 0, 1, 1, 0, 1, 0, 1, 0, 0 },
        /* paused  */ { 0, 1, 0, 0, 0, 0, 0, 0, 0, 0 },
        /* ready   */ { 0, 0, 0, 0, 1, 1, 0, 1, 0, 0 },
        /* standby */ { 0, 0, 0, 1, 0, 0, 0, 0, 0, 0 },
        /* waiting */ { 0, 0, 0, 0, 0, 0, 1, 1, 0, 0 },
        /* pending */ { 0, 0, 0, 0, 0, 0, 0, 1, 1, 0 },
        /* aborting*/ { 0, 0, 0, 0, 0, 0, 0, 1, 1, 0 },
        /* concl.  */ { 0, 0, 0, 0, 0, 0, 0, 0, 0, 1 },
        /* null    */ { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0 },
};

/* QEMU's JobVerbTable (8.2 and later: complete in standby too, change). */
static const bool verbs[DC_VERB_COUNT][10] = {
        /*                C  R  P  Y  S  W  D  X  E  N */
        /* cancel   */  { 1, 1, 1, 1, 1, 1, 1, 0, 0, 0 },
        /* pause    */  { 1, 1, 1, 1, 1, 0, 0, 0, 0, 0 },
        /* resume   */  { 1, 1, 1, 1, 1, 0, 0, 0, 0, 0 },
        /* set-speed*/  { 1, 1, 1, 1, 1, 0, 0, 0, 0, 0 },
        /* complete */  { 0, 0, 0, 1, 1, 0, 0, 0, 0, 0 },
        /* finalize */  { 0, 0, 0, 0, 0, 0, 1, 0, 0, 0 },
        /* dismiss  */  { 0, 0, 0, 0, 0, 0, 0, 0, 1, 0 },
        /* change   */  { 1, 1, 1, 1, 1, 0, 0, 0, 0, 0 },
};

static void test_tables(void) {
        for (int from = 0; from <= DC_JOB_NULL; from++)
                for (int to = 0; to <= DC_JOB_NULL; to++)
                        if (dc_job_transition_allowed(from, to) != stt[from][to]) {
                                fprintf(stderr, "transition %s -> %s\n", dc_job_status_name(from),
                                        dc_job_status_name(to));
                                CHECK(!"transition table");
                        }
        for (int v = 0; v < DC_VERB_COUNT; v++)
                for (int s = 0; s <= DC_JOB_NULL; s++)
                        if (dc_job_verb_allowed(v, s) != verbs[v][s]) {
                                fprintf(stderr, "verb %d in %s\n", v, dc_job_status_name(s));
                                CHECK(!"verb table");
                        }
        CHECK(!dc_job_transition_allowed(-1, DC_JOB_RUNNING) && !dc_job_transition_allowed(DC_JOB_NULL + 1, 0));
        CHECK(!dc_job_verb_allowed(DC_VERB_COUNT, DC_JOB_RUNNING) && !dc_job_verb_allowed(DC_VERB_CANCEL, 99));
}

/* --- a fake driver ----------------------------------------------------------------------- */

enum { RUN_OK, RUN_FAIL, RUN_UNTIL_CANCEL, RUN_READY, RUN_IO_ERROR };

struct fake_job {
        dc_job job;
        int mode;
        int prepare_result;
        int io_errno, io_answer;      /* RUN_IO_ERROR: the error, and what the policy answered */
        bool should_complete;         /* job lock */
        int copy_mode;                /* job lock */
        pthread_mutex_t m;
        char ops[32];                 /* driver operations in the order they were called */
        unsigned nops;
};

static struct fake_job *fake_of_job(dc_job *j) {
        return container_of(j, struct fake_job, job);
}

static void op(dc_job *j, char c) {
        struct fake_job *f = fake_of_job(j);
        pthread_mutex_lock(&f->m);
        if (f->nops < sizeof f->ops - 1)
                f->ops[f->nops++] = c;
        pthread_mutex_unlock(&f->m);
}

static void sleep_ms(long ms) {
        struct timespec ts = { ms / 1000, ms % 1000 * 1000000 };
        nanosleep(&ts, NULL);
}

static int fake_run(dc_job *j) {
        struct fake_job *f = fake_of_job(j);
        int r;

        op(j, 'r');
        switch (f->mode) {
        case RUN_OK:
                /* as a copy's requests: a pause point before (the speed limit's clock starts), one after each */
                r = dc_job_pause_point(j, 0, 0);
                if (r >= 0)
                        r = dc_job_pause_point(j, j->len / 2, j->len / 2);
                return r < 0 ? r : dc_job_pause_point(j, j->len - j->len / 2, 0);
        case RUN_FAIL:
                return dc_error(EIO, "the fake job failed");
        case RUN_UNTIL_CANCEL:
                for (;;) {
                        r = dc_job_pause_point(j, 1, 1);
                        if (r < 0)
                                return r;
                        sleep_ms(1);
                }
        case RUN_READY:
                pthread_mutex_lock(&j->lock);
                dc_job_set_status(j, DC_JOB_READY);
                dc_job_event(j, DC_EV_READY, NULL);
                pthread_mutex_unlock(&j->lock);
                dc_job_wake(j);
                for (;;) {
                        bool done;
                        r = dc_job_pause_point(j, 0, 0);
                        if (r < 0)
                                return r;
                        pthread_mutex_lock(&j->lock);
                        done = f->should_complete || j->cancelled;
                        pthread_mutex_unlock(&j->lock);
                        if (done)
                                return 0;
                        sleep_ms(1);
                }
        case RUN_IO_ERROR:
                dc_error(-f->io_errno, "the fake disk failed");
                f->io_answer = dc_job_io_error(j, -f->io_errno, false);
                if (f->io_answer < 0)
                        return f->io_answer;
                r = dc_job_pause_point(j, j->len, j->len); /* a stop pauses here until resumed */
                pthread_mutex_lock(&j->lock);
                if (r >= 0 && f->io_answer == 1 && j->error[0])
                        r = -EIO; /* ignored: finish, but fail, as the copy jobs do */
                pthread_mutex_unlock(&j->lock);
                return r;
        default:
                return -EINVAL;
        }
}

static int fake_prepare(dc_job *j) {
        op(j, 'p');
        return fake_of_job(j)->prepare_result < 0 ? dc_error(-fake_of_job(j)->prepare_result, "the fake graph change failed")
                                                  : 0;
}
static void fake_commit(dc_job *j) {
        op(j, 'c');
}
static void fake_abort(dc_job *j) {
        op(j, 'a');
}
static unsigned cleans;
static void fake_clean(dc_job *j) {
        op(j, 'l');
        cleans++;
}
static int fake_complete(dc_job *j) {
        op(j, 'C');
        fake_of_job(j)->should_complete = true;
        return 0;
}
static bool fake_cancel(dc_job *j, bool force) {
        return force || !(j->status == DC_JOB_READY || j->status == DC_JOB_STANDBY);
}
static int fake_change(dc_job *j, int mode) {
        fake_of_job(j)->copy_mode = mode;
        return 0;
}
static void fake_query(dc_job *j, struct dc_job_info *ret) {
        ret->actively_synced = fake_of_job(j)->copy_mode == DC_COPY_MODE_WRITE_BLOCKING;
}

/* A type with nothing but the work and the graph change (stream's shape) */
static const struct dc_job_driver plain_driver = {
        .type = DC_JOB_TYPE_STREAM,
        .instance_size = sizeof(struct fake_job),
        .run = fake_run,
        .prepare = fake_prepare,
        .commit = fake_commit,
        .abort = fake_abort,
        .clean = fake_clean,
};
/* ... and one with the verbs of a mirror */
static const struct dc_job_driver ready_driver = {
        .type = DC_JOB_TYPE_MIRROR,
        .instance_size = sizeof(struct fake_job),
        .run = fake_run,
        .prepare = fake_prepare,
        .commit = fake_commit,
        .abort = fake_abort,
        .clean = fake_clean,
        .complete = fake_complete,
        .cancel = fake_cancel,
        .change = fake_change,
        .query = fake_query,
};

static void no_notify(void *u) {
}

/* A job of DRV whose run does MODE, not started yet. */
static dc_job *start(const struct dc_job_driver *drv, int mode, struct dc_job_options jo) {
        dc_job *j = NULL;

        if (!jo.id)
                jo.id = "fake0";
        jo.notify = no_notify;
        if (dc_job_new(drv, &jo, &j) < 0)
                return NULL;
        pthread_mutex_init(&fake_of_job(j)->m, NULL);
        fake_of_job(j)->mode = mode;
        j->len = 1 << 20;
        return j;
}

static dc_job *go(dc_job *j) {
        dc_job *ret = NULL;
        if (dc_job_start(j, &ret) < 0)
                return NULL;
        return ret;
}

/* The events so far, as "status running,ready,..." words joined by spaces. */
static void events(dc_job *j, char *out, size_t cap) {
        struct dc_job_event ev;
        size_t n = strlen(out);
        while (dc_job_next_event(j, &ev) > 0) {
                const char *w = ev.kind == DC_EV_STATUS      ? dc_job_status_name(ev.status)
                                : ev.kind == DC_EV_READY     ? "READY"
                                : ev.kind == DC_EV_PENDING   ? "PENDING"
                                : ev.kind == DC_EV_COMPLETED ? (ev.error[0] ? "COMPLETED(error)" : "COMPLETED")
                                : ev.kind == DC_EV_CANCELLED ? "CANCELLED"
                                                             : "ERROR";
                n += (size_t) snprintf(out + n, n < cap ? cap - n : 0, "%s%s", n ? " " : "", w);
        }
}

static bool wait_status(dc_job *j, int s) {
        for (int i = 0; i < 5000; i++) {
                if (dc_job_status(j) == s)
                        return true;
                sleep_ms(1);
        }
        fprintf(stderr, "waited for %s, the job is %s\n", dc_job_status_name(s), dc_job_status_name(dc_job_status(j)));
        return false;
}

static const char *ops(dc_job *j) {
        return fake_of_job(j)->ops;
}

/* --- the lifecycle ----------------------------------------------------------------------- */

static void test_success(void) {
        char ev[512] = "";
        struct dc_job_info info;
        dc_job *j = go(start(&plain_driver, RUN_OK, (struct dc_job_options){ .auto_finalize = true, .auto_dismiss = true }));

        CHECK(j && wait_status(j, DC_JOB_NULL));
        dc_job_get_info(j, &info);
        CHECK(info.offset == info.len && info.len == 1 << 20 && !info.error[0]);
        CHECK(dc_job_type(j) == DC_JOB_TYPE_STREAM && strcmp(dc_job_id(j), "fake0") == 0);
        events(j, ev, sizeof ev);
        CHECK(strcmp(ev, "created running waiting pending COMPLETED concluded null") == 0);
        CHECK(strcmp(ops(j), "rpcl") == 0);
        dc_job_free(j);
}

static void test_manual_finalize_and_dismiss(void) {
        char ev[512] = "";
        dc_job *j = go(start(&plain_driver, RUN_OK, (struct dc_job_options){ 0 }));

        CHECK(j && wait_status(j, DC_JOB_PENDING));
        CHECK(dc_job_dismiss(j) == -EPERM);
        CHECK(strstr(dc_get_error(), "Job 'fake0' in state 'pending' cannot accept command verb 'dismiss'") != NULL);
        CHECK(strcmp(ops(j), "r") == 0); /* nothing is prepared before finalize */
        CHECK(dc_job_finalize(j) == 0);
        CHECK(wait_status(j, DC_JOB_CONCLUDED));
        CHECK(dc_job_dismiss(j) == 0 && dc_job_status(j) == DC_JOB_NULL);
        events(j, ev, sizeof ev);
        CHECK(strcmp(ev, "created running waiting pending PENDING COMPLETED concluded null") == 0);
        CHECK(strcmp(ops(j), "rpcl") == 0);
        dc_job_free(j);
}

static void test_failures(void) {
        struct dc_job_info info;
        char ev[512] = "";
        dc_job *j = go(start(&plain_driver, RUN_FAIL, (struct dc_job_options){ .auto_finalize = true }));

        CHECK(j && wait_status(j, DC_JOB_CONCLUDED));
        dc_job_get_info(j, &info);
        CHECK(strcmp(info.error, "the fake job failed") == 0);
        events(j, ev, sizeof ev);
        CHECK(strcmp(ev, "created running aborting COMPLETED(error) concluded") == 0);
        CHECK(strcmp(ops(j), "ral") == 0);
        dc_job_dismiss(j);
        dc_job_free(j);

        /* the graph change fails: aborted after prepare */
        j = start(&plain_driver, RUN_OK, (struct dc_job_options){ .auto_finalize = true });
        fake_of_job(j)->prepare_result = -ESTALE;
        j = go(j);
        CHECK(j && wait_status(j, DC_JOB_CONCLUDED));
        dc_job_get_info(j, &info);
        CHECK(strcmp(info.error, "the fake graph change failed") == 0);
        ev[0] = 0;
        events(j, ev, sizeof ev);
        CHECK(strcmp(ev, "created running waiting pending aborting COMPLETED(error) concluded") == 0);
        CHECK(strcmp(ops(j), "rpal") == 0);
        dc_job_dismiss(j);
        dc_job_free(j);

        /* an id QMP would refuse */
        CHECK(dc_job_new(&plain_driver, &(struct dc_job_options){ .id = "1abc" }, &j) == -EINVAL);
        CHECK(strstr(dc_get_error(), "Invalid job ID '1abc'") != NULL);
        /* never started (its constructor failed later): cleaned all the same, nothing else */
        j = start(&plain_driver, RUN_OK, (struct dc_job_options){ 0 });
        {
                unsigned before = cleans;
                dc_job_free(j);
                CHECK(cleans == before + 1);
        }
}

static void test_pause_resume_cancel(void) {
        char ev[512] = "";
        struct dc_job_info info;
        dc_job *j = go(start(&plain_driver, RUN_UNTIL_CANCEL, (struct dc_job_options){ .auto_finalize = true, .auto_dismiss = true }));

        CHECK(j != NULL);
        CHECK(dc_job_resume(j) == -EPERM && strstr(dc_get_error(), "can't resume a job that was not paused"));
        CHECK(dc_job_pause(j) == 0);
        CHECK(dc_job_pause(j) == -EPERM && strstr(dc_get_error(), "already paused"));
        CHECK(wait_status(j, DC_JOB_PAUSED)); /* reported when the work reached a pause point */
        dc_job_get_info(j, &info);
        CHECK(info.paused && !info.busy);
        CHECK(dc_job_complete(j) == -EPERM && strstr(dc_get_error(), "in state 'paused' cannot accept command verb 'complete'"));
        CHECK(dc_job_resume(j) == 0);
        CHECK(wait_status(j, DC_JOB_RUNNING));
        CHECK(dc_job_change_copy_mode(j, DC_COPY_MODE_WRITE_BLOCKING) == -EINVAL); /* the driver has no change */
        CHECK(dc_job_cancel(j, false) == 0); /* the driver has no cancel: every cancel is hard */
        CHECK(wait_status(j, DC_JOB_NULL));
        events(j, ev, sizeof ev);
        CHECK(strcmp(ev, "created running paused running aborting CANCELLED concluded null") == 0);
        CHECK(strcmp(ops(j), "ral") == 0);
        dc_job_get_info(j, &info);
        CHECK(strcmp(info.error, strerror(ECANCELED)) == 0);
        dc_job_free(j);

        /* a paused job that is cancelled is resumed first, as in QEMU */
        ev[0] = 0;
        j = go(start(&plain_driver, RUN_UNTIL_CANCEL, (struct dc_job_options){ .auto_finalize = true, .auto_dismiss = true }));
        CHECK(dc_job_pause(j) == 0 && wait_status(j, DC_JOB_PAUSED));
        CHECK(dc_job_cancel(j, true) == 0 && wait_status(j, DC_JOB_NULL));
        events(j, ev, sizeof ev);
        CHECK(strcmp(ev, "created running paused running aborting CANCELLED concluded null") == 0);
        dc_job_free(j);
}

static void test_driver_verbs(void) {
        char ev[512] = "";
        struct dc_job_info info;
        dc_job *j = go(start(&ready_driver, RUN_READY, (struct dc_job_options){ .auto_finalize = true, .auto_dismiss = true }));

        CHECK(j && wait_status(j, DC_JOB_READY));
        CHECK(dc_job_change_copy_mode(j, DC_COPY_MODE_WRITE_BLOCKING) == 0);
        dc_job_get_info(j, &info);
        CHECK(info.ready && info.actively_synced); /* the driver's query */
        CHECK(dc_job_pause(j) == 0 && wait_status(j, DC_JOB_STANDBY));
        CHECK(dc_job_resume(j) == 0 && wait_status(j, DC_JOB_READY));
        CHECK(dc_job_complete(j) == 0);
        CHECK(wait_status(j, DC_JOB_NULL));
        events(j, ev, sizeof ev);
        CHECK(strcmp(ev, "created running ready READY standby ready waiting pending COMPLETED concluded null") == 0);
        CHECK(strcmp(ops(j), "rCpcl") == 0);
        dc_job_free(j);

        /* a soft cancel of a ready job is the driver's: it finishes, completed */
        ev[0] = 0;
        j = go(start(&ready_driver, RUN_READY, (struct dc_job_options){ .auto_finalize = true, .auto_dismiss = true }));
        CHECK(j && wait_status(j, DC_JOB_READY));
        CHECK(dc_job_cancel(j, false) == 0);
        CHECK(wait_status(j, DC_JOB_NULL));
        events(j, ev, sizeof ev);
        CHECK(strcmp(ev, "created running ready READY waiting pending COMPLETED concluded null") == 0);
        CHECK(strcmp(ops(j), "rpcl") == 0);
        dc_job_free(j);

        /* ... and a forced one abandons it */
        ev[0] = 0;
        j = go(start(&ready_driver, RUN_READY, (struct dc_job_options){ .auto_finalize = true, .auto_dismiss = true }));
        CHECK(j && wait_status(j, DC_JOB_READY));
        CHECK(dc_job_cancel(j, true) == 0);
        CHECK(dc_job_complete(j) == -EPERM); /* cancelled (or no longer ready) */
        CHECK(wait_status(j, DC_JOB_NULL));
        events(j, ev, sizeof ev);
        CHECK(strcmp(ev, "created running ready READY aborting CANCELLED concluded null") == 0);
        CHECK(strcmp(ops(j), "ral") == 0);
        dc_job_free(j);

        /* a driver without complete refuses it, in the status where the table allows it */
        j = go(start(&plain_driver, RUN_READY, (struct dc_job_options){ .auto_finalize = true, .auto_dismiss = true }));
        CHECK(j && wait_status(j, DC_JOB_READY));
        CHECK(dc_job_complete(j) == -EPERM);
        CHECK(strstr(dc_get_error(), "The active block job 'fake0' cannot be completed") != NULL);
        CHECK(dc_job_cancel(j, false) == 0 && wait_status(j, DC_JOB_NULL));
        dc_job_free(j);
}

static void test_error_policies(void) {
        static const struct {
                int policy, err;
                int answer;
                const char *events;
        } cases[] = {
                { DC_ON_ERROR_REPORT, EIO, -EIO, "created running ERROR aborting COMPLETED(error) concluded null" },
                { DC_ON_ERROR_IGNORE, EIO, 1, "created running ERROR aborting COMPLETED(error) concluded null" },
                { DC_ON_ERROR_ENOSPC, EIO, -EIO, "created running ERROR aborting COMPLETED(error) concluded null" },
                { DC_ON_ERROR_ENOSPC, ENOSPC, 0, "created running ERROR paused running waiting pending COMPLETED concluded null" },
                { DC_ON_ERROR_STOP, EIO, 0, "created running ERROR paused running waiting pending COMPLETED concluded null" },
        };

        for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
                struct dc_job_info info;
                char ev[512] = "";
                dc_job *j = start(&plain_driver, RUN_IO_ERROR,
                                  (struct dc_job_options){ .auto_finalize = true, .auto_dismiss = true,
                                                           .has_target_error = true,
                                                           .on_error = DC_ON_ERROR_REPORT, /* reads: not this */
                                                           .on_target_error = cases[c].policy });
                fake_of_job(j)->io_errno = cases[c].err;
                j = go(j);
                if (cases[c].answer == 0) {
                        CHECK(wait_status(j, DC_JOB_PAUSED));
                        dc_job_get_info(j, &info);
                        CHECK(info.io_status == (cases[c].err == ENOSPC ? DC_IO_NOSPACE : DC_IO_FAILED));
                        CHECK(dc_job_resume(j) == 0);
                        dc_job_get_info(j, &info);
                        CHECK(info.io_status == DC_IO_OK);
                }
                CHECK(wait_status(j, DC_JOB_NULL));
                CHECK(fake_of_job(j)->io_answer == cases[c].answer);
                events(j, ev, sizeof ev);
                if (strcmp(ev, cases[c].events) != 0) {
                        fprintf(stderr, "case %zu: %s\n", c, ev);
                        CHECK(!"error policy events");
                }
                dc_job_free(j);
        }
}

static void test_speed_limit(void) {
        struct timespec t0, t1;
        double s;
        dc_job *j = start(&plain_driver, RUN_OK, (struct dc_job_options){ .auto_finalize = true, .auto_dismiss = true,
                                                                           .speed = 4 << 20 });
        /* RUN_OK copies half of 1 MiB: at 4 MiB/s its second pause point waits 1/8 s */
        clock_gettime(CLOCK_MONOTONIC, &t0);
        j = go(j);
        CHECK(wait_status(j, DC_JOB_NULL));
        clock_gettime(CLOCK_MONOTONIC, &t1);
        s = (double) (t1.tv_sec - t0.tv_sec) + (double) (t1.tv_nsec - t0.tv_nsec) / 1e9;
        CHECK(s >= 0.12 && s < 2);
        CHECK(dc_job_set_speed(j, 0) == -EPERM); /* null */
        dc_job_free(j);
}

int main(void) {
        test_tables();
        test_success();
        test_manual_finalize_and_dismiss();
        test_failures();
        test_pause_resume_cancel();
        test_driver_verbs();
        test_error_policies();
        test_speed_limit();
        return check_report("test-job");
}
