/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The job model of QEMU (qapi/job.json, job.c, blockjob.c), alone: what a
 * job is and how it moves, whatever it does.  What it does is its driver's
 * (job.h: run, prepare, commit/abort, clean, and the verbs complete,
 * cancel and change a type may give meaning to): job-stream.c,
 * job-commit.c, job-mirror.c (mirror and active commit), job-backup.c.
 * They copy with the one engine of block-copy.c, whose pause points,
 * speed limit and error policy are this file's (dc_job_copy_hooks).
 *
 * Design notes — the state machine
 * --------------------------------
 * Statuses and the allowed transitions are QEMU's table (JobSTT):
 *
 *   created   -> running, aborting, null
 *   running   -> paused, ready, waiting, aborting
 *   paused    -> running
 *   ready     -> standby, waiting, aborting
 *   standby   -> ready
 *   waiting   -> pending, aborting
 *   pending   -> aborting, concluded
 *   aborting  -> aborting, concluded
 *   concluded -> null
 *
 * dc_job_set_status() asserts that table; every change queues a STATUS
 * event.  Verbs are checked against QEMU's verb table (JobVerbTable) and
 * refused with QMP's own message; tests/test-job.c holds both tables as
 * qapi/job.json documents them.  The job's work runs on its own thread and
 * passes dc_job_pause_point() between requests: that is where a pause
 * requested by the user (or by on-error=stop) takes effect, so "paused" is
 * reported when the job really stops, as in QEMU.  After the work:
 *
 *   success: waiting -> pending [PENDING event if !auto-finalize, then wait
 *            for finalize] -> prepare() (the graph change) -> commit() ->
 *            clean() -> COMPLETED -> concluded -> null (if auto-dismiss)
 *   failure or cancel: aborting -> abort() -> clean() -> CANCELLED (hard
 *            cancel) or COMPLETED with the error -> concluded -> null (if
 *            auto-dismiss)
 *
 * A cancel is hard unless the driver says otherwise (a ready mirror's soft
 * cancel); complete and change are refused unless the driver has them.
 *
 * Events are queued under the job lock in emission order and the owner is
 * woken through notify(); it drains them on its own thread (the daemon's
 * event loop), so no signal is ever sent from a job thread.
 *
 * Locking: the job lock guards the fields of struct dc_job (job.h) and a
 * driver's fields that verbs touch; it is taken alone or under the locks
 * of dc-internal.h's order, never held across I/O, and never held while
 * calling a driver's run, prepare, commit, abort or clean.  The rate gate
 * is held by one request at a time under a speed limit.
 */

#include <stdio.h>
#include <time.h>

#include "job.h"

struct event_node {
        struct dc_job_event ev;
        struct event_node *next;
};

static const char *const status_names[] = { "created", "running", "paused", "ready", "standby",
                                            "waiting", "pending", "aborting", "concluded", "null" };
static const char *const type_names[] = { "stream", "commit", "mirror", "backup" };

DC_EXPORT const char *dc_job_status_name(int s) {
        return s >= 0 && s <= DC_JOB_NULL ? status_names[s] : "undefined";
}
DC_EXPORT const char *dc_job_type_name(int t) {
        return t >= 0 && t <= DC_JOB_TYPE_BACKUP ? type_names[t] : "unknown";
}
DC_EXPORT const char *dc_job_id(dc_job *j) {
        return j->id;
}
DC_EXPORT int dc_job_type(dc_job *j) {
        return j->drv->type;
}

/* QEMU's transition table: allowed[from] is a bit set of targets. */
static const unsigned allowed[] = {
        [DC_JOB_CREATED] = 1u << DC_JOB_RUNNING | 1u << DC_JOB_ABORTING | 1u << DC_JOB_NULL,
        [DC_JOB_RUNNING] = 1u << DC_JOB_PAUSED | 1u << DC_JOB_READY | 1u << DC_JOB_WAITING | 1u << DC_JOB_ABORTING,
        [DC_JOB_PAUSED] = 1u << DC_JOB_RUNNING,
        [DC_JOB_READY] = 1u << DC_JOB_STANDBY | 1u << DC_JOB_WAITING | 1u << DC_JOB_ABORTING,
        [DC_JOB_STANDBY] = 1u << DC_JOB_READY,
        [DC_JOB_WAITING] = 1u << DC_JOB_PENDING | 1u << DC_JOB_ABORTING,
        [DC_JOB_PENDING] = 1u << DC_JOB_ABORTING | 1u << DC_JOB_CONCLUDED,
        [DC_JOB_ABORTING] = 1u << DC_JOB_ABORTING | 1u << DC_JOB_CONCLUDED,
        [DC_JOB_CONCLUDED] = 1u << DC_JOB_NULL,
        [DC_JOB_NULL] = 0,
};

static const char *const verb_names[] = { "cancel", "pause", "resume", "set-speed", "complete", "finalize", "dismiss",
                                          "change" };
/* QEMU's verb table: statuses in which each verb is accepted. */
static const unsigned verb_ok[] = {
        [DC_VERB_CANCEL] = 1u << DC_JOB_CREATED | 1u << DC_JOB_RUNNING | 1u << DC_JOB_PAUSED | 1u << DC_JOB_READY |
                           1u << DC_JOB_STANDBY | 1u << DC_JOB_WAITING | 1u << DC_JOB_PENDING,
        [DC_VERB_PAUSE] = 1u << DC_JOB_CREATED | 1u << DC_JOB_RUNNING | 1u << DC_JOB_PAUSED | 1u << DC_JOB_READY |
                          1u << DC_JOB_STANDBY,
        [DC_VERB_RESUME] = 1u << DC_JOB_CREATED | 1u << DC_JOB_RUNNING | 1u << DC_JOB_PAUSED | 1u << DC_JOB_READY |
                           1u << DC_JOB_STANDBY,
        [DC_VERB_SET_SPEED] = 1u << DC_JOB_CREATED | 1u << DC_JOB_RUNNING | 1u << DC_JOB_PAUSED |
                              1u << DC_JOB_READY | 1u << DC_JOB_STANDBY,
        [DC_VERB_COMPLETE] = 1u << DC_JOB_READY | 1u << DC_JOB_STANDBY,
        [DC_VERB_FINALIZE] = 1u << DC_JOB_PENDING,
        [DC_VERB_DISMISS] = 1u << DC_JOB_CONCLUDED,
        [DC_VERB_CHANGE] = 1u << DC_JOB_CREATED | 1u << DC_JOB_RUNNING | 1u << DC_JOB_PAUSED | 1u << DC_JOB_READY |
                           1u << DC_JOB_STANDBY,
};

bool dc_job_transition_allowed(int from, int to) {
        return from >= 0 && from <= DC_JOB_NULL && to >= 0 && to <= DC_JOB_NULL && (allowed[from] & (1u << to));
}

bool dc_job_verb_allowed(int verb, int status) {
        return verb >= 0 && verb < DC_VERB_COUNT && status >= 0 && status <= DC_JOB_NULL &&
               (verb_ok[verb] & (1u << status));
}

/* --- events ------------------------------------------------------------------------- */

static void queue_event(dc_job *j, const struct dc_job_event *ev) {
        struct event_node *n = calloc(1, sizeof *n);
        if (!n)
                return;
        n->ev = *ev;
        if (j->tail)
                j->tail->next = n;
        else
                j->head = n;
        j->tail = n;
}

void dc_job_set_status(dc_job *j, int s) {
        struct dc_job_event ev = { .kind = DC_EV_STATUS, .status = s };

        if (s == j->status)
                return;
        if (!dc_job_transition_allowed(j->status, s)) {
                fprintf(stderr, "libdiskchain: BUG: job '%s' transition %s -> %s\n", j->id,
                        status_names[j->status], status_names[s]);
                abort();
        }
        j->status = s;
        queue_event(j, &ev);
}

void dc_job_event(dc_job *j, int kind, const char *error) {
        struct dc_job_event ev = { .kind = kind, .len = j->len, .offset = j->offset, .speed = j->speed,
                                   .copied = j->copied };
        if (error)
                snprintf(ev.error, sizeof ev.error, "%s", error);
        queue_event(j, &ev);
}

void dc_job_wake(dc_job *j) {
        if (j->notify)
                j->notify(j->userdata);
}

DC_EXPORT int dc_job_next_event(dc_job *j, struct dc_job_event *ret) {
        struct event_node *n;

        pthread_mutex_lock(&j->lock);
        n = j->head;
        if (n) {
                j->head = n->next;
                if (!j->head)
                        j->tail = NULL;
        }
        pthread_mutex_unlock(&j->lock);
        if (!n)
                return 0;
        *ret = n->ev;
        free(n);
        return 1;
}

DC_EXPORT int dc_job_status(dc_job *j) {
        int s;
        pthread_mutex_lock(&j->lock);
        s = j->status;
        pthread_mutex_unlock(&j->lock);
        return s;
}

DC_EXPORT void dc_job_get_info(dc_job *j, struct dc_job_info *ret) {
        pthread_mutex_lock(&j->lock);
        *ret = (struct dc_job_info){
                .status = j->status,
                .io_status = j->io_status,
                .len = j->len,
                .offset = j->offset,
                .copied = j->copied,
                .speed = j->speed,
                .busy = j->busy,
                .paused = j->user_paused || j->paused_now,
                .ready = j->status == DC_JOB_READY || j->status == DC_JOB_STANDBY,
                .auto_finalize = j->auto_finalize,
                .auto_dismiss = j->auto_dismiss,
        };
        if (j->drv->query)
                j->drv->query(j, ret);
        memcpy(ret->error, j->error, sizeof ret->error);
        pthread_mutex_unlock(&j->lock);
}

/* --- verbs ---------------------------------------------------------------------------- */

static int verb_check(dc_job *j, int verb) {
        if (!dc_job_verb_allowed(verb, j->status))
                return dc_error(EPERM, "Job '%s' in state '%s' cannot accept command verb '%s'", j->id,
                                status_names[j->status], verb_names[verb]);
        return 0;
}

#define VERB(j, verb, body)                                   \
        ({                                                    \
                int _r;                                       \
                pthread_mutex_lock(&(j)->lock);               \
                _r = verb_check(j, verb);                     \
                if (_r >= 0) {                                \
                        body;                                 \
                }                                             \
                pthread_cond_broadcast(&(j)->cond);           \
                pthread_mutex_unlock(&(j)->lock);             \
                dc_job_wake(j);                               \
                _r;                                           \
        })

DC_EXPORT int dc_job_pause(dc_job *j) {
        return VERB(j, DC_VERB_PAUSE, {
                if (j->user_paused)
                        _r = dc_error(EPERM, "Job '%s': job is already paused", j->id);
                else
                        j->user_paused = true;
        });
}

DC_EXPORT int dc_job_resume(dc_job *j) {
        return VERB(j, DC_VERB_RESUME, {
                if (!j->user_paused)
                        _r = dc_error(EPERM, "Job '%s': can't resume a job that was not paused", j->id);
                else {
                        j->user_paused = false;
                        j->io_status = DC_IO_OK;
                }
        });
}

DC_EXPORT int dc_job_set_speed(dc_job *j, uint64_t speed) {
        return VERB(j, DC_VERB_SET_SPEED, {
                j->speed = speed;
                j->rate_start_ns = 0;
        });
}

DC_EXPORT int dc_job_cancel(dc_job *j, bool force) {
        return VERB(j, DC_VERB_CANCEL, {
                j->cancelled = true;
                /* a driver may know a soft cancel (a ready mirror finishes without pivot);
                 * for everything else a cancel abandons the job */
                if (!j->drv->cancel || j->drv->cancel(j, force))
                        j->force_cancel = true;
                j->user_paused = false;
        });
}

DC_EXPORT int dc_job_complete(dc_job *j) {
        return VERB(j, DC_VERB_COMPLETE, {
                if (j->cancelled || !j->drv->complete)
                        _r = dc_error(EPERM, "The active block job '%s' cannot be completed", j->id);
                else
                        _r = j->drv->complete(j);
        });
}

DC_EXPORT int dc_job_change_copy_mode(dc_job *j, int mode) {
        return VERB(j, DC_VERB_CHANGE, {
                if (!j->drv->change)
                        _r = dc_error(EINVAL, "Job '%s': only a mirror job's copy-mode can be changed", j->id);
                else
                        _r = j->drv->change(j, mode);
        });
}

DC_EXPORT int dc_job_finalize(dc_job *j) {
        return VERB(j, DC_VERB_FINALIZE, { j->finalize_requested = true; });
}

DC_EXPORT int dc_job_dismiss(dc_job *j) {
        return VERB(j, DC_VERB_DISMISS, { dc_job_set_status(j, DC_JOB_NULL); });
}

/* --- pause points, speed limit, error policy --------------------------------------------- */

static uint64_t now_ns(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000000ull + (uint64_t) ts.tv_nsec;
}

int dc_job_pause_point(dc_job *j, uint64_t bytes_done, uint64_t bytes_copied) {
        int r = 0;

        pthread_mutex_lock(&j->lock);
        j->offset += bytes_done;
        j->rate_bytes += bytes_copied; /* the limit counts data copied, not ranges skipped */
        j->copied += bytes_copied;
        for (;;) {
                if (j->force_cancel) {
                        /* a cancelled paused job is resumed first, as QEMU does */
                        if (j->paused_now) {
                                j->paused_now = false;
                                dc_job_set_status(j, j->status == DC_JOB_STANDBY ? DC_JOB_READY : DC_JOB_RUNNING);
                        }
                        r = -ECANCELED;
                        break;
                }
                if (j->user_paused) {
                        if (!j->paused_now) {
                                j->paused_now = true;
                                j->busy = false;
                                dc_job_set_status(j, j->status == DC_JOB_READY ? DC_JOB_STANDBY : DC_JOB_PAUSED);
                                pthread_mutex_unlock(&j->lock);
                                dc_job_wake(j);
                                pthread_mutex_lock(&j->lock);
                                continue;
                        }
                        pthread_cond_wait(&j->cond, &j->lock);
                        continue;
                }
                if (j->paused_now) {
                        j->paused_now = false;
                        j->busy = true;
                        dc_job_set_status(j, j->status == DC_JOB_STANDBY ? DC_JOB_READY : DC_JOB_RUNNING);
                        j->rate_start_ns = 0;
                        pthread_mutex_unlock(&j->lock);
                        dc_job_wake(j);
                        pthread_mutex_lock(&j->lock);
                        continue;
                }
                if (j->speed) {
                        uint64_t t = now_ns(), due;
                        if (!j->rate_start_ns) {
                                j->rate_start_ns = t;
                                j->rate_bytes = 0;
                        }
                        due = j->rate_start_ns + (uint64_t) ((double) j->rate_bytes * 1e9 / (double) j->speed);
                        if (due > t) {
                                struct timespec ts;
                                uint64_t wait = MIN(due - t, 100000000ull); /* re-check every 100 ms */
                                clock_gettime(CLOCK_REALTIME, &ts);
                                ts.tv_sec += (time_t) ((ts.tv_nsec + (long) wait) / 1000000000l);
                                ts.tv_nsec = (ts.tv_nsec + (long) wait) % 1000000000l;
                                pthread_cond_timedwait(&j->cond, &j->lock, &ts);
                                continue;
                        }
                }
                break;
        }
        pthread_mutex_unlock(&j->lock);
        return r;
}

/*
 * The speed limit counts a request's data after it: requests that started
 * side by side would all pass it at once (eight of them, 16 MiB, before a
 * limit of a few KiB/s took hold).  Under a limit the job's requests
 * therefore take turns, each holding the gate from before its request to
 * after the pause that pays for it.
 */
bool dc_job_turn_take(dc_job *j) {
        bool limited;

        pthread_mutex_lock(&j->lock);
        limited = j->speed != 0;
        pthread_mutex_unlock(&j->lock);
        if (limited)
                pthread_mutex_lock(&j->rate_gate);
        return limited;
}

void dc_job_turn_give(dc_job *j, bool taken) {
        if (taken)
                pthread_mutex_unlock(&j->rate_gate);
}

int dc_job_io_error(dc_job *j, int err, bool is_read) {
        struct dc_job_event ev = { .kind = DC_EV_ERROR, .operation = is_read ? "read" : "write" };
        int policy = is_read ? j->on_error : j->on_error_write;
        bool stop = policy == DC_ON_ERROR_STOP || (policy == DC_ON_ERROR_ENOSPC && err == -ENOSPC);
        char msg[512];

        snprintf(msg, sizeof msg, "%s", dc_get_error()[0] ? dc_get_error() : strerror(-err));
        pthread_mutex_lock(&j->lock);
        ev.action = stop ? "stop" : policy == DC_ON_ERROR_IGNORE ? "ignore" : "report";
        queue_event(j, &ev);
        if (stop) {
                if (j->io_status == DC_IO_OK)
                        j->io_status = err == -ENOSPC ? DC_IO_NOSPACE : DC_IO_FAILED;
                j->user_paused = true; /* as if by the user: Resume() retries */
        } else
                snprintf(j->error, sizeof j->error, "%s", msg);
        pthread_mutex_unlock(&j->lock);
        dc_job_wake(j);
        if (stop)
                return 0;
        if (policy == DC_ON_ERROR_IGNORE)
                return 1;
        return err;
}

static int hook_pause(void *opaque, uint64_t done, uint64_t copied) {
        return dc_job_pause_point(opaque, done, copied);
}
static bool hook_turn_take(void *opaque) {
        return dc_job_turn_take(opaque);
}
static void hook_turn_give(void *opaque, bool taken) {
        dc_job_turn_give(opaque, taken);
}
static int hook_error(void *opaque, int err, bool is_read) {
        return dc_job_io_error(opaque, err, is_read);
}

const struct dc_block_copy_hooks dc_job_copy_hooks = {
        .pause = hook_pause,
        .turn_take = hook_turn_take,
        .turn_give = hook_turn_give,
        .error = hook_error,
};

int dc_job_copy_new(dc_job *j, struct dc_block_copy_params p, dc_block_copy **ret) {
        p.disk = j->disk;
        p.cache = j->cache;
        if (!p.hooks) {
                p.hooks = &dc_job_copy_hooks;
                p.opaque = j;
        }
        return dc_block_copy_new(&p, ret);
}

int dc_job_copy_run(dc_job *j, dc_block_copy *bc) {
        int r = dc_block_copy_pass(bc);

        if (r >= 0)
                r = dc_block_copy_flush(bc);
        if (r >= 0) {
                pthread_mutex_lock(&j->lock);
                if (j->error[0])
                        r = -EIO; /* on-error=ignore: finish the copy, but fail */
                pthread_mutex_unlock(&j->lock);
        }
        return r;
}

/* --- life ------------------------------------------------------------------------------ */

static void *job_thread(void *p) {
        dc_job *j = p;
        bool ok;
        int r;

        r = j->drv->run(j);
        pthread_mutex_lock(&j->lock);
        j->busy = false;
        if (r >= 0 && !j->force_cancel) {
                dc_job_set_status(j, DC_JOB_WAITING);
                dc_job_set_status(j, DC_JOB_PENDING);
                if (!j->auto_finalize) {
                        dc_job_event(j, DC_EV_PENDING, NULL);
                        pthread_mutex_unlock(&j->lock);
                        dc_job_wake(j);
                        pthread_mutex_lock(&j->lock);
                        while (!j->finalize_requested && !j->force_cancel)
                                pthread_cond_wait(&j->cond, &j->lock);
                }
                if (!j->force_cancel) {
                        pthread_mutex_unlock(&j->lock);
                        r = j->drv->prepare ? j->drv->prepare(j) : 0;
                        pthread_mutex_lock(&j->lock);
                        if (r < 0)
                                snprintf(j->error, sizeof j->error, "%s", dc_get_error());
                }
        }
        ok = r >= 0 && !j->force_cancel;
        if (!ok) {
                dc_job_set_status(j, DC_JOB_ABORTING);
                if (!j->force_cancel && !j->error[0])
                        snprintf(j->error, sizeof j->error, "%s", dc_get_error()[0] ? dc_get_error() : strerror(-r));
        }
        pthread_mutex_unlock(&j->lock);

        /* unhooked and the images released before anyone hears of the end */
        if (ok && j->drv->commit)
                j->drv->commit(j);
        if (!ok && j->drv->abort)
                j->drv->abort(j);
        if (j->drv->clean)
                j->drv->clean(j);
        dc_job_restore_chain(j);
        j->disk = dc_disk_unref(j->disk);

        pthread_mutex_lock(&j->lock);
        if (ok)
                dc_job_event(j, DC_EV_COMPLETED, "");
        else if (j->force_cancel && !j->error[0]) {
                dc_job_event(j, DC_EV_CANCELLED, NULL);
                /* as QMP's query reports a cancelled job's ret */
                snprintf(j->error, sizeof j->error, "%s", strerror(ECANCELED));
        } else
                dc_job_event(j, DC_EV_COMPLETED, j->error);
        dc_job_set_status(j, DC_JOB_CONCLUDED);
        if (j->auto_dismiss)
                dc_job_set_status(j, DC_JOB_NULL);
        pthread_mutex_unlock(&j->lock);
        dc_job_wake(j);
        return NULL;
}

static bool id_wellformed(const char *id) {
        if (!id || !((id[0] >= 'a' && id[0] <= 'z') || (id[0] >= 'A' && id[0] <= 'Z')))
                return false;
        for (const char *c = id; *c; c++)
                if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') ||
                      *c == '-' || *c == '.' || *c == '_'))
                        return false;
        return true;
}

int dc_job_new(const struct dc_job_driver *drv, const struct dc_job_options *jo, dc_job **ret) {
        dc_job *j;

        if (!id_wellformed(jo->id))
                return dc_error(EINVAL, "Invalid job ID '%s'", jo->id ? jo->id : "");
        if (jo->cache != DC_CACHE_WRITEBACK && jo->cache != DC_CACHE_NONE)
                return dc_error(EINVAL, "Invalid cache mode %d", jo->cache);
        j = calloc(1, drv->instance_size);
        if (!j)
                return dc_error(ENOMEM, "out of memory");
        pthread_mutex_init(&j->lock, NULL);
        pthread_cond_init(&j->cond, NULL);
        pthread_mutex_init(&j->rate_gate, NULL);
        j->drv = drv;
        j->id = strdup(jo->id);
        j->speed = jo->speed;
        j->cache = jo->cache;
        j->on_error = jo->on_error;
        j->on_error_write = jo->has_target_error ? jo->on_target_error : jo->on_error;
        j->auto_finalize = jo->auto_finalize;
        j->auto_dismiss = jo->auto_dismiss;
        j->notify = jo->notify;
        j->pivoted = jo->pivoted;
        j->userdata = jo->userdata;
        j->status = DC_JOB_CREATED;
        *ret = j;
        return 0;
}

int dc_job_start(dc_job *j, dc_job **ret) {
        struct dc_job_event ev = { .kind = DC_EV_STATUS, .status = DC_JOB_CREATED };
        int r;

        queue_event(j, &ev);
        dc_job_set_status(j, DC_JOB_RUNNING);
        j->busy = true;
        r = pthread_create(&j->thread, NULL, job_thread, j);
        if (r != 0) {
                r = dc_error(r, "cannot start a thread for job '%s'", j->id);
                dc_job_free(j);
                return r;
        }
        j->thread_started = true;
        *ret = j;
        return 0;
}

DC_EXPORT dc_job *dc_job_free(dc_job *j) {
        struct dc_job_event ev;

        if (!j)
                return NULL;
        if (j->thread_started)
                pthread_join(j->thread, NULL);
        else {
                /* never started: undo what the constructor did */
                if (j->drv->clean)
                        j->drv->clean(j);
                dc_job_restore_chain(j);
        }
        while (dc_job_next_event(j, &ev) > 0)
                ;
        dc_disk_unref(j->disk);
        pthread_mutex_destroy(&j->lock);
        pthread_cond_destroy(&j->cond);
        pthread_mutex_destroy(&j->rate_gate);
        free(j->id);
        free(j);
        return NULL;
}
