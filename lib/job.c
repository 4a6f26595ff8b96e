/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Block jobs with QEMU's job model (qapi/job.json, job.c, blockjob.c).
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
 * job_set_status() asserts that table; every change queues a STATUS event.
 * Verbs are checked against QEMU's verb table (JobVerbTable) and refused
 * with QMP's own message.  The job's work runs on its own thread and checks
 * pause_point() between chunks: that is where a pause requested by the user
 * (or by on-error=stop) takes effect, so "paused" is reported when the job
 * really stops, as in QEMU.  After the work:
 *
 *   success: waiting -> pending [PENDING event if !auto-finalize, then wait
 *            for finalize] -> prepare() (the graph change) -> COMPLETED ->
 *            concluded -> null (if auto-dismiss)
 *   failure or cancel: aborting -> abort() -> CANCELLED (hard cancel) or
 *            COMPLETED with the error -> concluded -> null (if auto-dismiss)
 *
 * Events are queued under the job lock in emission order and the owner is
 * woken through notify(); it drains them on its own thread (the daemon's
 * event loop), so no signal is ever sent from a job thread.
 */

#include <stdio.h>
#include <time.h>

#include "dc-internal.h"

/*
 * A job copies with WORKERS requests in flight, each of at most CHUNK bytes:
 * 16 MiB of buffers in all.  One request at a time leaves the disk idle
 * while it reads and while it computes; direct writes from eight at once keep
 * a disk busy (a 4 GiB chain's full backup: 2 MiB x 8 takes two thirds of the
 * time 8 MiB x 2 takes).
 */
#define CHUNK (2u << 20)
#define WORKERS 8u
#define MAX_WORKERS 16u

struct event_node {
        struct dc_job_event ev;
        struct event_node *next;
};

struct dc_job {
        pthread_mutex_t lock;
        pthread_cond_t cond;
        pthread_mutex_t rate_gate; /* under a speed limit, one request at a time (rate_gate_enter) */
        pthread_t thread;
        bool thread_started;
        char *id;
        int type;
        int status;
        uint64_t len, offset, speed;
        bool user_paused, paused_now, cancelled, force_cancel, finalize_requested;
        bool auto_finalize, auto_dismiss, busy;
        int on_error, on_error_write, io_status;
        int cache;                 /* DC_CACHE_*: how the written layer takes the data */
        char error[512];
        struct event_node *head, *tail;
        void (*notify)(void *);
        int (*pivoted)(void *, const char *, const char *const *);
        void *userdata;

        /* the work */
        int (*run)(dc_job *j);
        int (*prepare)(dc_job *j);
        void (*clean)(dc_job *j); /* always, last: unhook from the disk */
        dc_disk *disk;            /* the chain's write path (a reference) */
        bool disk_reopened;       /* the caller's disk was reopened with layers read-write */
        dc_image *img;            /* chain the job reads through (the disk's, or a layer of it) */
        dc_image *target;         /* layer written (inside img) */
        dc_image *base;           /* layer where copying stops (inside img), NULL = none */
        dc_image *overlay;        /* commit: the image whose backing changes */
        dc_image *tgt;            /* backup: the target, a separate chain */
        int sync;
        bool compress;
        unsigned workers;         /* copy requests in flight (copy_loop); 0 = WORKERS */
        uint64_t chunk;           /* largest request; 0 = CHUNK (a mirror: set by mirror_setup) */
        char *new_backing;        /* name recorded at the end */
        char *new_backing_fmt;
        uint64_t rate_start_ns, rate_bytes;

        /* backup: clusters still to copy (copy-before-write clears them too) */
        uint64_t *uncopied, cbw_unit, cbw_bits;
        /* mirror and active commit */
        bool active_commit, existing, unmap;
        int copy_mode;
        uint64_t unit, buf_size;  /* dirty-tracking chunk; data in flight */
        uint64_t *dirty, nbits, ndirty;
        uint8_t *buf;
        bool should_complete, actively_synced;
        bool helper_stop;         /* mirror: the first pass's helper threads are to stop */
};

/* --- bitmaps (callers hold the job lock) --- */
static bool bit_test(const uint64_t *bm, uint64_t i) {
        return bm[i / 64] >> (i % 64) & 1;
}
/* Set or clear bits [first, first+n); returns how many changed. */
static uint64_t bits_assign(uint64_t *bm, uint64_t first, uint64_t n, bool v) {
        uint64_t changed = 0;
        for (uint64_t i = first; i < first + n; i++)
                if (bit_test(bm, i) != v) {
                        bm[i / 64] ^= 1ull << (i % 64);
                        changed++;
                }
        return changed;
}
/* The length of the run of equal bits at I, at most MAX. */
static uint64_t bits_run(const uint64_t *bm, uint64_t i, uint64_t max, bool *ret_v) {
        bool v = bit_test(bm, i);
        uint64_t n = 1;
        while (n < max && bit_test(bm, i + n) == v)
                n++;
        *ret_v = v;
        return n;
}
/* The first set bit at or after FROM (wrapping around), or NBITS when none. */
static uint64_t bits_next(const uint64_t *bm, uint64_t nbits, uint64_t from) {
        for (uint64_t k = 0; k < nbits; k++) {
                uint64_t i = (from + k) % nbits;
                if (!(i % 64) && !bm[i / 64] && nbits - i >= 64 && k + 63 < nbits) {
                        k += 63;
                        continue;
                }
                if (bit_test(bm, i))
                        return i;
        }
        return nbits;
}

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
        return j->type;
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

enum { VERB_CANCEL, VERB_PAUSE, VERB_RESUME, VERB_SET_SPEED, VERB_COMPLETE, VERB_FINALIZE, VERB_DISMISS, VERB_CHANGE };
static const char *const verb_names[] = { "cancel", "pause", "resume", "set-speed", "complete", "finalize", "dismiss",
                                          "change" };
/* QEMU's verb table: statuses in which each verb is accepted. */
static const unsigned verb_ok[] = {
        [VERB_CANCEL] = 1u << DC_JOB_CREATED | 1u << DC_JOB_RUNNING | 1u << DC_JOB_PAUSED | 1u << DC_JOB_READY |
                        1u << DC_JOB_STANDBY | 1u << DC_JOB_WAITING | 1u << DC_JOB_PENDING,
        [VERB_PAUSE] = 1u << DC_JOB_CREATED | 1u << DC_JOB_RUNNING | 1u << DC_JOB_PAUSED | 1u << DC_JOB_READY |
                       1u << DC_JOB_STANDBY,
        [VERB_RESUME] = 1u << DC_JOB_CREATED | 1u << DC_JOB_RUNNING | 1u << DC_JOB_PAUSED | 1u << DC_JOB_READY |
                        1u << DC_JOB_STANDBY,
        [VERB_SET_SPEED] = 1u << DC_JOB_CREATED | 1u << DC_JOB_RUNNING | 1u << DC_JOB_PAUSED | 1u << DC_JOB_READY |
                           1u << DC_JOB_STANDBY,
        [VERB_COMPLETE] = 1u << DC_JOB_READY | 1u << DC_JOB_STANDBY,
        [VERB_FINALIZE] = 1u << DC_JOB_PENDING,
        [VERB_DISMISS] = 1u << DC_JOB_CONCLUDED,
        [VERB_CHANGE] = 1u << DC_JOB_CREATED | 1u << DC_JOB_RUNNING | 1u << DC_JOB_PAUSED | 1u << DC_JOB_READY |
                        1u << DC_JOB_STANDBY,
};

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

/* Called with the lock held. */
static void job_set_status(dc_job *j, int s) {
        struct dc_job_event ev = { .kind = DC_EV_STATUS, .status = s };

        if (s == j->status)
                return;
        if (!(allowed[j->status] & (1u << s))) {
                fprintf(stderr, "libdiskchain: BUG: job '%s' transition %s -> %s\n", j->id,
                        status_names[j->status], status_names[s]);
                abort();
        }
        j->status = s;
        queue_event(j, &ev);
}

static void outcome_event(dc_job *j, int kind, const char *error) {
        struct dc_job_event ev = { .kind = kind, .len = j->len, .offset = j->offset, .speed = j->speed };
        if (error)
                snprintf(ev.error, sizeof ev.error, "%s", error);
        queue_event(j, &ev);
}

static void wake_owner(dc_job *j) {
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
                .speed = j->speed,
                .busy = j->busy,
                .paused = j->user_paused || j->paused_now,
                .ready = j->status == DC_JOB_READY || j->status == DC_JOB_STANDBY,
                .auto_finalize = j->auto_finalize,
                .auto_dismiss = j->auto_dismiss,
                .actively_synced = j->actively_synced,
        };
        memcpy(ret->error, j->error, sizeof ret->error);
        pthread_mutex_unlock(&j->lock);
}

static int verb_check(dc_job *j, int verb) {
        if (!(verb_ok[verb] & (1u << j->status)))
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
                wake_owner(j);                                \
                _r;                                           \
        })

DC_EXPORT int dc_job_pause(dc_job *j) {
        return VERB(j, VERB_PAUSE, {
                if (j->user_paused)
                        _r = dc_error(EPERM, "Job '%s': job is already paused", j->id);
                else
                        j->user_paused = true;
        });
}

DC_EXPORT int dc_job_resume(dc_job *j) {
        return VERB(j, VERB_RESUME, {
                if (!j->user_paused)
                        _r = dc_error(EPERM, "Job '%s': can't resume a job that was not paused", j->id);
                else {
                        j->user_paused = false;
                        j->io_status = DC_IO_OK;
                }
        });
}

DC_EXPORT int dc_job_set_speed(dc_job *j, uint64_t speed) {
        return VERB(j, VERB_SET_SPEED, {
                j->speed = speed;
                j->rate_start_ns = 0;
        });
}

DC_EXPORT int dc_job_cancel(dc_job *j, bool force) {
        return VERB(j, VERB_CANCEL, {
                j->cancelled = true;
                /* only a ready mirror or active commit knows a soft cancel:
                 * it finishes without pivot; everything else is abandoned */
                if (force || !(j->status == DC_JOB_READY || j->status == DC_JOB_STANDBY))
                        j->force_cancel = true;
                j->user_paused = false;
        });
}

DC_EXPORT int dc_job_complete(dc_job *j) {
        return VERB(j, VERB_COMPLETE, {
                if (j->cancelled || (j->type != DC_JOB_TYPE_MIRROR && !j->active_commit))
                        _r = dc_error(EPERM, "The active block job '%s' cannot be completed", j->id);
                else
                        j->should_complete = true;
        });
}

DC_EXPORT int dc_job_change_copy_mode(dc_job *j, int mode) {
        return VERB(j, VERB_CHANGE, {
                if (j->type != DC_JOB_TYPE_MIRROR || j->active_commit)
                        _r = dc_error(EINVAL, "Job '%s': only a mirror job's copy-mode can be changed", j->id);
                else if (mode != j->copy_mode && mode != DC_COPY_MODE_WRITE_BLOCKING)
                        _r = dc_error(EINVAL, "Job '%s': copy-mode can only change from background to write-blocking",
                                      j->id);
                else
                        j->copy_mode = mode;
        });
}

DC_EXPORT int dc_job_finalize(dc_job *j) {
        return VERB(j, VERB_FINALIZE, { j->finalize_requested = true; });
}

DC_EXPORT int dc_job_dismiss(dc_job *j) {
        return VERB(j, VERB_DISMISS, { job_set_status(j, DC_JOB_NULL); });
}

static uint64_t now_ns(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000000ull + (uint64_t) ts.tv_nsec;
}

/*
 * Between chunks: account progress (BYTES_DONE) and the data moved for the
 * speed limit (BYTES_COPIED), take a requested pause (reporting paused/standby only now,
 * as QEMU does), honour the speed limit, and tell whether to stop.
 * Returns -ECANCELED when hard-cancelled (a soft cancel is the mirror's to
 * act on).  Called without the lock.
 */
static int pause_point(dc_job *j, uint64_t bytes_done, uint64_t bytes_copied) {
        int r = 0;

        pthread_mutex_lock(&j->lock);
        j->offset += bytes_done;
        j->rate_bytes += bytes_copied; /* the limit counts data copied, not ranges skipped */
        for (;;) {
                if (j->force_cancel) {
                        /* a cancelled paused job is resumed first, as QEMU does */
                        if (j->paused_now) {
                                j->paused_now = false;
                                job_set_status(j, j->status == DC_JOB_STANDBY ? DC_JOB_READY : DC_JOB_RUNNING);
                        }
                        r = -ECANCELED;
                        break;
                }
                if (j->user_paused) {
                        if (!j->paused_now) {
                                j->paused_now = true;
                                j->busy = false;
                                job_set_status(j, j->status == DC_JOB_READY ? DC_JOB_STANDBY : DC_JOB_PAUSED);
                                pthread_mutex_unlock(&j->lock);
                                wake_owner(j);
                                pthread_mutex_lock(&j->lock);
                                continue;
                        }
                        pthread_cond_wait(&j->cond, &j->lock);
                        continue;
                }
                if (j->paused_now) {
                        j->paused_now = false;
                        j->busy = true;
                        job_set_status(j, j->status == DC_JOB_STANDBY ? DC_JOB_READY : DC_JOB_RUNNING);
                        j->rate_start_ns = 0;
                        pthread_mutex_unlock(&j->lock);
                        wake_owner(j);
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
 * limit of a few KiB/s took hold).  Under a limit the job's workers
 * therefore take turns, each holding the gate from before its request to
 * after the pause that pays for it.  Returns whether the gate is held.
 */
static bool rate_gate_enter(dc_job *j) {
        bool limited;

        pthread_mutex_lock(&j->lock);
        limited = j->speed != 0;
        pthread_mutex_unlock(&j->lock);
        if (limited)
                pthread_mutex_lock(&j->rate_gate);
        return limited;
}

static void rate_gate_leave(dc_job *j, bool held) {
        if (held)
                pthread_mutex_unlock(&j->rate_gate);
}

/*
 * An I/O error during the work, under the job's on-error policy.  Returns 0
 * to retry the chunk (after a stop and resume), 1 to skip it (ignore), or
 * the error to fail with.
 */
static int handle_io_error(dc_job *j, int err, bool is_read, bool *ret_ignored) {
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
        } else if (policy == DC_ON_ERROR_IGNORE) {
                *ret_ignored = true;
                snprintf(j->error, sizeof j->error, "%s", msg);
        } else
                snprintf(j->error, sizeof j->error, "%s", msg);
        pthread_mutex_unlock(&j->lock);
        wake_owner(j);
        if (stop)
                return 0;
        if (policy == DC_ON_ERROR_IGNORE)
                return 1;
        return err;
}

/* Is [off, off+len) allocated in a layer from FROM down to, not including, STOP?
 * Returns the length of the uniform run at OFF through *ret_len. */
static int allocated_above(dc_image *from, dc_image *stop, uint64_t off, uint64_t len, bool *ret, uint64_t *ret_len) {
        uint64_t run = len;
        *ret = false;
        for (dc_image *l = from; l && l != stop; l = l->backing) {
                struct dc_layer_status st;
                int r;
                if (off >= l->virtual_size)
                        continue;
                pthread_mutex_lock(&l->lock);
                r = l->drv->block_status(l, off, MIN(run, l->virtual_size - off), &st);
                pthread_mutex_unlock(&l->lock);
                if (r < 0)
                        return r;
                run = MIN(run, st.length ? st.length : run);
                if (st.type != DC_LAYER_UNALLOCATED) {
                        *ret = true;
                        break;
                }
        }
        *ret_len = run;
        return 0;
}

static bool all_zero(const uint8_t *b, size_t n) {
        for (size_t i = 0; i < n; i++)
                if (b[i])
                        return false;
        return true;
}

/* Compress the whole clusters of one chunk and store them with one sync
 * (backup compress).  The job's workers compress their chunks side by side. */
static int write_compressed_run(dc_image *dst, const uint8_t *buf, uint64_t off, uint64_t len) {
        uint64_t cs = dc_image_cluster_size(dst), n = DIV_ROUND_UP(len, cs);
        uint8_t **out = calloc(n, sizeof *out);
        size_t *clen = calloc(n, sizeof *clen);
        int r = out && clen ? 0 : dc_error(ENOMEM, "out of memory");

        for (uint64_t i = 0; i < n && r >= 0; i++) {
                if (!(out[i] = malloc(cs)))
                        r = dc_error(ENOMEM, "out of memory");
                else
                        r = dc_qcow2_compress_cluster(dst, buf + i * cs, (size_t) MIN(cs, len - i * cs), out[i],
                                                      &clen[i]);
        }
        if (r >= 0) {
                pthread_mutex_lock(&dst->lock);
                r = dc_qcow2_store_compressed_batch(dst, buf, off, len, out, clen);
                pthread_mutex_unlock(&dst->lock);
        }
        for (uint64_t i = 0; out && i < n; i++)
                free(out[i]);
        free(out);
        free(clen);
        return r;
}

/* Write BUF (RUN bytes at OFF) into DST as a job does: zeros as zero writes
 * (deallocating when MAY_UNMAP), whole clusters compressed when asked. */
static int job_write(dc_job *j, dc_image *dst, const uint8_t *buf, uint64_t off, uint64_t run, unsigned zero_flags) {
        int r;
        if (off + run > dst->virtual_size)
                return dc_error(EINVAL, "'%s' is smaller than the data to copy", dst->path);
        if (all_zero(buf, (size_t) run)) {
                struct dc_layer_status st = { 0 };
                pthread_mutex_lock(&dst->lock);
                /* a target with nothing below reads as zeros where it holds nothing */
                r = dst->backing_file ? 0 : dst->drv->block_status(dst, off, run, &st);
                if (r < 0 || dst->backing_file || st.type != DC_LAYER_UNALLOCATED || st.length < run)
                        r = dst->drv->write_zeroes(dst, off, run, zero_flags);
                pthread_mutex_unlock(&dst->lock);
        } else if (j->compress && off % dc_image_cluster_size(dst) == 0 &&
                   ((off + run) % dc_image_cluster_size(dst) == 0 || off + run == dst->virtual_size)) {
                r = write_compressed_run(dst, buf, off, run);
        } else {
                pthread_mutex_lock(&dst->lock);
                r = dst->drv->write(dst, buf, off, (size_t) run);
                pthread_mutex_unlock(&dst->lock);
        }
        return r;
}

struct step {
        uint64_t done;   /* bytes of the virtual size handled */
        bool copied;     /* data moved (counts for the speed limit) */
        bool read_error; /* the failure was a read */
};

/* One step of copy_loop at OFF, at most N bytes, under the range lock. */
static int copy_step(dc_job *j, uint8_t *buf, dc_image *src, dc_image *stop, dc_image *dst, bool skip_dst_allocated,
                     uint64_t off, uint64_t n, struct step *st) {
        uint64_t run = n;
        bool copy = true;
        int r;

        st->read_error = true;
        st->done = n;
        if (skip_dst_allocated) {
                struct dc_layer_status ls;
                pthread_mutex_lock(&dst->lock);
                r = dst->drv->block_status(dst, off, n, &ls);
                pthread_mutex_unlock(&dst->lock);
                if (r < 0)
                        return r;
                if (ls.type != DC_LAYER_UNALLOCATED) {
                        st->done = ls.length; /* a guest write or earlier data: never overwritten */
                        return 0;
                }
                n = MIN(n, ls.length);
        }
        if (j->uncopied) {
                /* backup: what is left to copy as of the job's start */
                uint64_t u = j->cbw_unit, first = off / u;
                bool set;
                pthread_mutex_lock(&j->lock);
                run = MIN(bits_run(j->uncopied, first, DIV_ROUND_UP(n, u), &set) * u, n);
                pthread_mutex_unlock(&j->lock);
                copy = set;
        } else {
                r = allocated_above(skip_dst_allocated ? src->backing : src, stop, off, n, &copy, &run);
                if (r < 0)
                        return r;
        }
        st->done = run;
        st->copied = copy;
        if (!copy)
                return 0;
        r = dc_chain_read(src, buf, off, (size_t) run);
        if (r < 0)
                return r;
        st->read_error = false;
        r = job_write(j, dst, buf, off, run, 0);
        if (r < 0)
                return r;
        if (j->uncopied) {
                pthread_mutex_lock(&j->lock);
                bits_assign(j->uncopied, off / j->cbw_unit, DIV_ROUND_UP(run, j->cbw_unit), false);
                pthread_mutex_unlock(&j->lock);
        }
        return 0;
}

struct copy_ctx {
        dc_job *j;
        dc_image *src, *stop, *dst;
        bool skip_dst_allocated;
        uint64_t chunk, size, next; /* next: the first offset no worker has claimed (job lock) */
        int r;                      /* the first failure (job lock) */
        char why[512];
};

/* One request of a worker at *OFF (at most up to END), under the range lock
 * and the error policy; advances *OFF past what it handled. */
static int copy_request(struct copy_ctx *c, uint8_t *buf, uint64_t *off, uint64_t end) {
        dc_job *j = c->j;
        struct dc_range_lock rl;
        struct step st = { 0 };
        bool ignored = false, gate = rate_gate_enter(j);
        int r;

        r = pause_point(j, 0, 0);
        if (r < 0)
                goto out;
        dc_disk_range_lock(j->disk, &rl, *off, end - *off);
        r = copy_step(j, buf, c->src, c->stop, c->dst, c->skip_dst_allocated, *off, end - *off, &st);
        dc_disk_range_unlock(j->disk, &rl);
        if (r < 0) {
                r = handle_io_error(j, r, st.read_error, &ignored);
                if (r != 1)
                        goto out; /* 0: stopped and resumed, the request is tried again */
                st.copied = false; /* ignored: skipped */
        }
        r = pause_point(j, st.done, st.copied ? st.done : 0);
        if (r >= 0)
                *off += st.done;
out:
        rate_gate_leave(j, gate);
        return r;
}

/* Claim chunks and copy them until none is left or something failed. */
static void *copy_worker(void *p) {
        struct copy_ctx *c = p;
        dc_job *j = c->j;
        uint8_t *buf = dc_io_buffer(c->chunk);
        int r = buf ? 0 : dc_error(ENOMEM, "out of memory");

        while (r >= 0) {
                uint64_t off, end;

                pthread_mutex_lock(&j->lock);
                if (c->r < 0 || c->next >= c->size) {
                        pthread_mutex_unlock(&j->lock);
                        break;
                }
                off = c->next;
                end = c->next = MIN(off + c->chunk, c->size);
                pthread_mutex_unlock(&j->lock);
                while (off < end && r >= 0)
                        r = copy_request(c, buf, &off, end);
        }
        if (r < 0) {
                pthread_mutex_lock(&j->lock);
                if (c->r >= 0) {
                        c->r = r;
                        snprintf(c->why, sizeof c->why, "%s", dc_get_error());
                }
                pthread_mutex_unlock(&j->lock);
        }
        free(buf);
        return NULL;
}

/*
 * The copy loop of stream, intermediate commit and backup: every range of
 * the virtual size that is allocated from SRC down to (not including) STOP
 * (backup: still to copy) is read through SRC's chain and written into DST;
 * ranges that read as zero become zero writes.  Sparse-aware: nothing else
 * is touched.  SKIP_DST_ALLOCATED skips ranges DST already holds itself
 * (stream).  Each step holds the disk's range lock, so guest writes to the
 * same clusters wait for it and it never copies over them.  The job's
 * workers (this thread and helpers) take chunks in turn, so that some read
 * while others write.
 */
static int copy_loop(dc_job *j, dc_image *src, dc_image *stop, dc_image *dst, bool skip_dst_allocated) {
        struct copy_ctx c = { .j = j, .src = src, .stop = stop, .dst = dst, .skip_dst_allocated = skip_dst_allocated,
                              .chunk = j->chunk ? j->chunk : CHUNK, .size = src->virtual_size };
        pthread_t helper[MAX_WORKERS];
        unsigned n = 0, workers = j->workers ? j->workers : WORKERS;
        int r;

        while (n + 1 < workers && (uint64_t) (n + 1) * c.chunk < c.size &&
               pthread_create(&helper[n], NULL, copy_worker, &c) == 0)
                n++;
        copy_worker(&c);
        while (n > 0)
                pthread_join(helper[--n], NULL);
        r = c.r;
        if (r < 0)
                return dc_error(-r, "%s", c.why);
        r = dc_image_flush(dst);
        if (r >= 0) {
                pthread_mutex_lock(&j->lock);
                if (j->error[0])
                        r = -EIO; /* on-error=ignore: finish the copy, but fail */
                pthread_mutex_unlock(&j->lock);
        }
        return r;
}

static int stream_run(dc_job *j) {
        return copy_loop(j, j->target, j->base, j->target, true);
}

static int commit_run(dc_job *j) {
        /* Base grows when smaller than top, never shrinks. */
        if (j->base->virtual_size < j->target->virtual_size) {
                int r = dc_image_truncate(j->base, j->target->virtual_size);
                if (r < 0)
                        return r;
        }
        return copy_loop(j, j->target, j->base, j->base, false);
}

static dc_image *find_layer(dc_image *chain, const char *abs);

/* Set the bits of BM (UNIT bytes each) over what is allocated from FROM down to STOP. */
static int mark_allocated(dc_job *j, uint64_t *bm, uint64_t unit, dc_image *from, dc_image *stop, uint64_t *ret_set) {
        uint64_t size = from->virtual_size, off = 0, set = 0;

        while (off < size) {
                uint64_t run;
                bool alloc;
                int r = allocated_above(from, stop, off, size - off, &alloc, &run);
                if (r < 0)
                        return r;
                if (run == 0)
                        run = size - off;
                if (alloc) {
                        pthread_mutex_lock(&j->lock);
                        set += bits_assign(bm, off / unit, DIV_ROUND_UP(off + run, unit) - off / unit, true);
                        pthread_mutex_unlock(&j->lock);
                }
                off += run;
        }
        *ret_set = set;
        return 0;
}

/* --- backup: copy-before-write ----------------------------------------------- */

/*
 * Before a guest write, copy the clusters it touches that the backup has
 * not copied yet (their data as of the job's start) into the target.  On
 * failure the guest's write fails and the backup stays a true point in
 * time (QEMU's default on-cbw-error=break-guest-write).
 */
static int backup_cbw(void *data, uint64_t off, uint64_t len) {
        dc_job *j = data;
        uint64_t u = j->cbw_unit, i = off / u, end = MIN(DIV_ROUND_UP(off + len, u), j->cbw_bits);
        uint8_t *buf = NULL;
        int r = 0;

        while (i < end && r >= 0) {
                uint64_t n, a, l;
                bool set;

                pthread_mutex_lock(&j->lock);
                n = bits_run(j->uncopied, i, MIN(end - i, MAX(CHUNK / u, 1)), &set);
                pthread_mutex_unlock(&j->lock);
                if (set) {
                        a = i * u;
                        l = MIN(n * u, j->img->virtual_size - a);
                        if (!buf && !(buf = dc_io_buffer(MAX((uint64_t) CHUNK, u))))
                                r = dc_error(ENOMEM, "out of memory");
                        if (r >= 0)
                                r = dc_chain_read(j->img, buf, a, (size_t) l);
                        if (r >= 0)
                                r = job_write(j, j->tgt, buf, a, l, 0);
                        if (r >= 0) {
                                pthread_mutex_lock(&j->lock);
                                bits_assign(j->uncopied, i, n, false);
                                pthread_mutex_unlock(&j->lock);
                        }
                }
                i += n;
        }
        free(buf);
        if (r < 0) {
                char why[512];
                snprintf(why, sizeof why, "%s", dc_get_error());
                return dc_error(-r, "copy-before-write for backup job '%s' failed: %s", j->id, why);
        }
        return 0;
}

static const struct dc_disk_hooks backup_hooks = { .before_write = backup_cbw };

/* At the job's creation, so that the copy is of the moment the caller gets the job:
 * quiesced, hooked, and what is to be copied measured. */
static int backup_setup(dc_job *j) {
        uint64_t set;
        int r;

        dc_disk_quiesce(j->disk);
        r = dc_disk_attach(j->disk, &backup_hooks, j, j->cbw_unit);
        if (r >= 0) {
                if (j->sync == DC_SYNC_NONE)
                        bits_assign(j->uncopied, 0, j->cbw_bits, true);
                else
                        r = mark_allocated(j, j->uncopied, j->cbw_unit, j->img,
                                           j->sync == DC_SYNC_TOP ? j->img->backing : NULL, &set);
        }
        dc_disk_unquiesce(j->disk);
        return r;
}

static int backup_run(dc_job *j) {
        int r;

        if (j->sync == DC_SYNC_NONE) {
                /* nothing to copy in the background: copy-before-write until cancelled */
                for (;;) {
                        struct timespec ts = { 0, 100000000 };
                        r = pause_point(j, 0, 0);
                        if (r < 0)
                                return r;
                        nanosleep(&ts, NULL);
                }
        }
        return copy_loop(j, j->img, NULL, j->tgt, false);
}

static void backup_clean(dc_job *j) {
        dc_disk_detach(j->disk, j);
}

/* --- mirror and active commit ------------------------------------------------- */

static void mirror_progress(dc_job *j) {
        j->len = j->offset + j->ndirty * j->unit;
}

static unsigned mirror_zero_flags(dc_job *j) {
        return j->unmap ? DC_ZERO_MAY_UNMAP : 0;
}

/*
 * Copy bits [FIRST, FIRST+N) from the source chain to the target under the
 * range lock; on failure they are dirty again.
 */
static int mirror_copy(dc_job *j, uint8_t *buf, uint64_t first, uint64_t n, bool *ret_read_err) {
        uint64_t a = first * j->unit, l = MIN((first + n) * j->unit, j->img->virtual_size) - a;
        struct dc_range_lock rl;
        int r;

        dc_disk_range_lock(j->disk, &rl, a, l);
        pthread_mutex_lock(&j->lock);
        j->ndirty -= bits_assign(j->dirty, first, n, false);
        pthread_mutex_unlock(&j->lock);
        *ret_read_err = true;
        r = dc_chain_read(j->img, buf, a, (size_t) l);
        if (r >= 0) {
                *ret_read_err = false;
                r = job_write(j, j->target, buf, a, l, mirror_zero_flags(j));
        }
        pthread_mutex_lock(&j->lock);
        if (r < 0)
                j->ndirty += bits_assign(j->dirty, first, n, true);
        mirror_progress(j);
        pthread_mutex_unlock(&j->lock);
        dc_disk_range_unlock(j->disk, &rl);
        return r;
}

/* After a guest write: write-blocking copies it to the target at once, background marks it dirty. */
static void mirror_after_write(void *data, uint64_t off, uint64_t len) {
        dc_job *j = data;
        uint64_t u = j->unit, size = j->img->virtual_size, first = off / u;
        uint64_t last = DIV_ROUND_UP(MIN(off + len, size), u);
        bool wb;

        if (first >= last)
                return;
        pthread_mutex_lock(&j->lock);
        wb = j->copy_mode == DC_COPY_MODE_WRITE_BLOCKING;
        pthread_mutex_unlock(&j->lock);
        if (wb) {
                /* the guest holds the range lock over these whole chunks */
                uint64_t a = first * u, l = MIN(last * u, size) - a;
                uint8_t *buf = dc_io_buffer(l);
                int r = buf ? dc_chain_read(j->img, buf, a, (size_t) l) : -ENOMEM;
                if (r >= 0)
                        r = job_write(j, j->target, buf, a, l, mirror_zero_flags(j));
                free(buf);
                pthread_mutex_lock(&j->lock);
                if (r >= 0)
                        j->ndirty -= bits_assign(j->dirty, first, last - first, false);
                else {
                        j->actively_synced = false;
                        j->ndirty += bits_assign(j->dirty, first, last - first, true);
                }
        } else {
                pthread_mutex_lock(&j->lock);
                j->ndirty += bits_assign(j->dirty, first, last - first, true);
        }
        mirror_progress(j);
        pthread_cond_broadcast(&j->cond);
        pthread_mutex_unlock(&j->lock);
}

static const struct dc_disk_hooks mirror_hooks = { .after_write = mirror_after_write };

/* Copy everything dirty (the disk is quiesced: nothing new comes), then flush the target. */
static int mirror_drain(dc_job *j, bool *ret_read_err) {
        uint64_t max = MAX(j->chunk / j->unit, 1);
        int r;

        for (;;) {
                uint64_t i, n;
                bool set;
                pthread_mutex_lock(&j->lock);
                i = bits_next(j->dirty, j->nbits, 0);
                n = i < j->nbits ? bits_run(j->dirty, i, MIN(max, j->nbits - i), &set) : 0;
                pthread_mutex_unlock(&j->lock);
                if (!n)
                        break;
                r = mirror_copy(j, j->buf, i, n, ret_read_err);
                if (r < 0)
                        return r;
        }
        *ret_read_err = false;
        return dc_image_flush(j->target);
}

/*
 * At the job's creation, so that its start is the caller's return: the
 * dirty bitmap, hooked into the disk, holding what is to be copied.
 */
static int mirror_setup(dc_job *j) {
        uint64_t set = 0;
        int r;

        j->nbits = DIV_ROUND_UP(j->img->virtual_size, j->unit);
        j->dirty = calloc(j->nbits / 64 + 1, sizeof *j->dirty);
        j->chunk = MAX(j->unit, ALIGN_DOWN(MIN(j->buf_size, (uint64_t) CHUNK), j->unit));
        j->buf = dc_io_buffer(j->chunk);
        if (!j->dirty || !j->buf)
                return dc_error(ENOMEM, "out of memory");
        dc_disk_quiesce(j->disk);
        r = dc_disk_attach(j->disk, &mirror_hooks, j, j->unit);
        if (r >= 0) {
                if (j->sync == DC_SYNC_FULL && j->existing && !j->active_commit)
                        set = bits_assign(j->dirty, 0, j->nbits, true); /* it may not read as zeros */
                else if (j->active_commit)
                        r = mark_allocated(j, j->dirty, j->unit, j->img, j->base, &set);
                else if (j->sync != DC_SYNC_NONE)
                        r = mark_allocated(j, j->dirty, j->unit, j->img,
                                           j->sync == DC_SYNC_TOP ? j->img->backing : NULL, &set);
        }
        pthread_mutex_lock(&j->lock);
        j->ndirty += set;
        mirror_progress(j);
        pthread_mutex_unlock(&j->lock);
        dc_disk_unquiesce(j->disk);
        return r;
}

/*
 * The first pass of a mirror has as many copiers as buf-size holds chunks
 * (up to MAX_WORKERS): the job's thread starts at the beginning, helpers at
 * even intervals after it.  A run either picks is copied under the range
 * lock, so a run picked by two is merely copied twice.  A helper leaves at
 * the end of the bitmap, on a failure (the run is dirty again and the job's
 * thread meets it under the error policy), on a hard cancel, or when told.
 */
struct mirror_helper {
        dc_job *j;
        uint64_t cursor;
        pthread_t th;
};

static void *mirror_helper(void *p) {
        struct mirror_helper *h = p;
        dc_job *j = h->j;
        uint64_t cursor = h->cursor, max = MAX(j->chunk / j->unit, 1);
        uint8_t *buf = dc_io_buffer(j->chunk);

        while (buf) {
                uint64_t i, n = 0;
                bool set, read_err, gate;
                int r;

                if (pause_point(j, 0, 0) < 0)
                        break;
                pthread_mutex_lock(&j->lock);
                if (j->helper_stop) {
                        pthread_mutex_unlock(&j->lock);
                        break;
                }
                i = bits_next(j->dirty, j->nbits, cursor);
                if (i < j->nbits)
                        n = bits_run(j->dirty, i, MIN(max, j->nbits - i), &set);
                pthread_mutex_unlock(&j->lock);
                if (!n)
                        break;
                gate = rate_gate_enter(j);
                r = mirror_copy(j, buf, i, n, &read_err);
                if (r >= 0) {
                        uint64_t bytes = MIN((i + n) * j->unit, j->img->virtual_size) - i * j->unit;
                        r = pause_point(j, bytes, bytes);
                }
                rate_gate_leave(j, gate);
                if (r < 0)
                        break;
                cursor = i + n;
        }
        free(buf);
        return NULL;
}

/* Start the first pass's helpers; returns how many run. */
static unsigned mirror_helpers_start(dc_job *j, struct mirror_helper *h) {
        uint64_t copiers = MIN(MAX(j->buf_size / j->chunk, 1), (uint64_t) MAX_WORKERS);
        unsigned n = 0;

        j->helper_stop = false;
        for (uint64_t k = 1; k < copiers && k < j->nbits; k++) {
                h[n] = (struct mirror_helper){ .j = j, .cursor = j->nbits * k / copiers };
                if (pthread_create(&h[n].th, NULL, mirror_helper, &h[n]) != 0)
                        break;
                n++;
        }
        return n;
}

static void mirror_helpers_stop(dc_job *j, struct mirror_helper *h, unsigned *n) {
        if (!*n)
                return;
        pthread_mutex_lock(&j->lock);
        j->helper_stop = true;
        pthread_mutex_unlock(&j->lock);
        while (*n > 0)
                pthread_join(h[--*n].th, NULL);
}

static int mirror_run(dc_job *j) {
        struct mirror_helper helper[MAX_WORKERS];
        uint64_t cursor = 0;
        unsigned helping;
        int r;

        if (j->active_commit) {
                /* base grows when smaller than top, never shrinks */
                if (j->base->virtual_size < j->img->virtual_size) {
                        r = dc_image_truncate(j->base, j->img->virtual_size);
                        if (r < 0)
                                return r;
                }
        } else if (j->tgt->virtual_size != j->img->virtual_size)
                return dc_error(EINVAL, "Source and target image have different sizes");
        helping = mirror_helpers_start(j, helper);
        for (;;) {
                uint64_t i, n = 0;
                bool ready, completing, set_bit, read_err = false, ignored = false, gate;

                r = pause_point(j, 0, 0);
                if (r < 0)
                        break;
                pthread_mutex_lock(&j->lock);
                ready = j->status == DC_JOB_READY;
                completing = ready && (j->should_complete || j->cancelled);
                i = bits_next(j->dirty, j->nbits, cursor);
                if (i < j->nbits)
                        n = bits_run(j->dirty, i, MIN(MAX(j->chunk / j->unit, 1), j->nbits - i), &set_bit);
                pthread_mutex_unlock(&j->lock);

                if (completing) {
                        /* no guest write from here to the end of the copy: a point in time */
                        dc_disk_quiesce(j->disk);
                        r = mirror_drain(j, &read_err);
                        if (r >= 0 && j->cancelled)
                                dc_disk_detach(j->disk, j); /* soft cancel: later writes stay out */
                        dc_disk_unquiesce(j->disk);
                        if (r < 0) {
                                r = handle_io_error(j, r, read_err, &ignored);
                                if (r == 0)
                                        continue;
                                if (r == 1)
                                        r = -EIO;
                        }
                        break;
                }
                if (n == 0) {
                        if (!ready && helping) {
                                /* helpers may still be copying what they picked */
                                mirror_helpers_stop(j, helper, &helping);
                                continue;
                        }
                        if (!ready) {
                                r = dc_image_flush(j->target);
                                if (r < 0) {
                                        r = handle_io_error(j, r, false, &ignored);
                                        if (r == 0 || r == 1)
                                                continue;
                                        break;
                                }
                                pthread_mutex_lock(&j->lock);
                                if (j->error[0]) {
                                        /* on-error=ignore skipped data: in sync it is not */
                                        pthread_mutex_unlock(&j->lock);
                                        r = -EIO;
                                        break;
                                }
                                mirror_progress(j);
                                job_set_status(j, DC_JOB_READY);
                                outcome_event(j, DC_EV_READY, NULL);
                                j->actively_synced = j->copy_mode == DC_COPY_MODE_WRITE_BLOCKING;
                                pthread_mutex_unlock(&j->lock);
                                wake_owner(j);
                                continue;
                        }
                        /* in sync: wait for a write, a verb, or 100 ms */
                        pthread_mutex_lock(&j->lock);
                        if (j->copy_mode == DC_COPY_MODE_WRITE_BLOCKING && !j->ndirty)
                                j->actively_synced = true; /* also after a change to write-blocking */
                        if (!j->ndirty && !j->should_complete && !j->cancelled && !j->user_paused) {
                                struct timespec ts;
                                clock_gettime(CLOCK_REALTIME, &ts);
                                ts.tv_nsec += 100000000l;
                                if (ts.tv_nsec >= 1000000000l) {
                                        ts.tv_sec++;
                                        ts.tv_nsec -= 1000000000l;
                                }
                                pthread_cond_timedwait(&j->cond, &j->lock, &ts);
                        }
                        pthread_mutex_unlock(&j->lock);
                        continue;
                }
                gate = rate_gate_enter(j);
                r = mirror_copy(j, j->buf, i, n, &read_err);
                cursor = i + n;
                if (r < 0) {
                        rate_gate_leave(j, gate);
                        r = handle_io_error(j, r, read_err, &ignored);
                        if (r == 0)
                                continue;
                        if (r != 1)
                                break;
                        /* ignored: skipped, and the job fails when it would be in sync */
                        pthread_mutex_lock(&j->lock);
                        j->ndirty -= bits_assign(j->dirty, i, n, false);
                        pthread_mutex_unlock(&j->lock);
                        r = pause_point(j, 0, 0);
                        if (r < 0)
                                break;
                        continue;
                }
                {
                        uint64_t bytes = MIN((i + n) * j->unit, j->img->virtual_size) - i * j->unit;
                        r = pause_point(j, bytes, bytes);
                        rate_gate_leave(j, gate);
                        if (r < 0)
                                break;
                }
        }
        mirror_helpers_stop(j, helper, &helping);
        return r;
}

/*
 * The pivot: the target (mirror) or base (active commit) becomes the active
 * layer of the disk.  The target keeps its own backing: a layer of the old
 * chain (top, none) or a chain opened now (existing).  The owner records
 * the layers dropped (bottom first, the old top last) through pivoted():
 * that record, made after the target was flushed, is the moment the pivot
 * is done on disk — before it the old chain is the disk, after it the new.
 */
static int pivot(dc_job *j) {
        dc_image *old = dc_disk_chain(j->disk), *top = j->active_commit ? j->base : j->tgt;
        dc_image *keep = j->active_commit ? j->base : NULL, *extra = NULL, *above = NULL;
        dc_image *dropped[256];
        const char *names[257];
        size_t n = 0;
        int r;

        if (!j->active_commit && top->backing_file) {
                _cleanup_free_ char *babs = NULL;
                r = dc_backing_resolve(top->path, top->backing_file, &babs);
                if (r < 0)
                        return r;
                keep = find_layer(old, babs);
                if (!keep) {
                        struct dc_open_options o = *dc_disk_open_options(j->disk);
                        o.writable = false;
                        r = dc_image_open(babs, &o, &extra);
                        if (r < 0)
                                return r;
                }
        }
        for (dc_image *l = old; l && l != keep && n < sizeof dropped / sizeof *dropped; l = l->backing) {
                dropped[n++] = l;
                if (l->backing == keep)
                        above = l;
        }
        for (size_t i = 0; i < n; i++) {
                /* nothing of ours changes them after the record (their ctime is part of it) */
                r = dc_image_flush(dropped[i]);
                if (r < 0) {
                        dc_image_close(extra);
                        return r;
                }
                names[i] = dropped[n - 1 - i]->path;
        }
        names[n] = NULL;
        if (j->pivoted) {
                r = j->pivoted(j->userdata, top->path, names);
                if (r < 0) {
                        char why[512];
                        snprintf(why, sizeof why, "%s", dc_get_error());
                        dc_image_close(extra);
                        return dc_error(-r, "cannot record the pivot to '%s': %s", top->path, why);
                }
        }
        if (!j->active_commit) {
                top->backing = keep ? keep : extra;
                j->tgt = NULL; /* the disk's now */
        }
        if (above)
                above->backing = NULL;
        dc_disk_swap_chain(j->disk, top);
        j->img = top;
        if (keep != old)
                dc_image_close(old);
        return 0;
}

static int mirror_prepare(dc_job *j) {
        bool read_err;
        int r;

        if (j->cancelled)
                return 0; /* soft cancel: the target is a point-in-time copy, nothing moves */
        dc_disk_quiesce(j->disk);
        r = mirror_drain(j, &read_err); /* what was written since the job left its loop */
        if (r >= 0)
                r = pivot(j);
        dc_disk_detach(j->disk, j);
        dc_disk_unquiesce(j->disk);
        return r;
}

static void mirror_clean(dc_job *j) {
        dc_disk_detach(j->disk, j);
}

static int set_backing_prepare(dc_job *j) {
        dc_image *img = j->type == DC_JOB_TYPE_STREAM ? j->target : j->overlay;
        return dc_image_set_backing(img, j->new_backing, j->new_backing_fmt);
}

/* Put the caller's disk back as it was (its layers read-only again). */
static void disk_restore(dc_job *j) {
        if (!j->disk_reopened)
                return;
        dc_disk_quiesce(j->disk);
        (void) dc_disk_reopen(j->disk, NULL);
        dc_disk_unquiesce(j->disk);
        j->disk_reopened = false;
}

/* The image the job's copy writes into. */
static dc_image *written_layer(dc_job *j) {
        return j->type == DC_JOB_TYPE_COMMIT ? j->base : j->target;
}

static void *job_thread(void *p) {
        dc_job *j = p;
        bool ok;
        int r;

        /* the image the job writes takes its data as the cache option says (see dc_image_job_cache) */
        dc_image_job_cache(written_layer(j), j->cache, true);
        r = j->run(j);
        pthread_mutex_lock(&j->lock);
        j->busy = false;
        if (r >= 0 && !j->force_cancel) {
                job_set_status(j, DC_JOB_WAITING);
                job_set_status(j, DC_JOB_PENDING);
                if (!j->auto_finalize) {
                        outcome_event(j, DC_EV_PENDING, NULL);
                        pthread_mutex_unlock(&j->lock);
                        wake_owner(j);
                        pthread_mutex_lock(&j->lock);
                        while (!j->finalize_requested && !j->force_cancel)
                                pthread_cond_wait(&j->cond, &j->lock);
                }
                if (!j->force_cancel) {
                        pthread_mutex_unlock(&j->lock);
                        r = j->prepare ? j->prepare(j) : 0;
                        pthread_mutex_lock(&j->lock);
                        if (r < 0)
                                snprintf(j->error, sizeof j->error, "%s", dc_get_error());
                }
        }
        ok = r >= 0 && !j->force_cancel;
        if (!ok) {
                job_set_status(j, DC_JOB_ABORTING);
                if (!j->force_cancel && !j->error[0])
                        snprintf(j->error, sizeof j->error, "%s", dc_get_error()[0] ? dc_get_error() : strerror(-r));
        }
        pthread_mutex_unlock(&j->lock);
        dc_image_job_cache(written_layer(j), j->cache, false); /* a layer the writers keep: as before */

        /* unhooked and the images released before anyone hears of the end */
        if (j->clean)
                j->clean(j);
        disk_restore(j);
        j->img = NULL;
        j->disk = dc_disk_unref(j->disk);
        j->tgt = dc_image_close(j->tgt);

        pthread_mutex_lock(&j->lock);
        if (ok)
                outcome_event(j, DC_EV_COMPLETED, "");
        else if (j->force_cancel && !j->error[0]) {
                outcome_event(j, DC_EV_CANCELLED, NULL);
                /* as QMP's query reports a cancelled job's ret */
                snprintf(j->error, sizeof j->error, "%s", strerror(ECANCELED));
        } else
                outcome_event(j, DC_EV_COMPLETED, j->error);
        job_set_status(j, DC_JOB_CONCLUDED);
        if (j->auto_dismiss)
                job_set_status(j, DC_JOB_NULL);
        pthread_mutex_unlock(&j->lock);
        wake_owner(j);
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

static dc_image *find_layer(dc_image *chain, const char *abs) {
        for (dc_image *l = chain; l; l = l->backing)
                if (strcmp(l->path, abs) == 0)
                        return l;
        return NULL;
}

/* Name of BASE as seen from the directory of IMG: relative when below it. */
static char *backing_name(dc_image *img, dc_image *base) {
        const char *slash = strrchr(img->path, '/');
        size_t dl = slash ? (size_t) (slash - img->path) : 0;
        if (strncmp(base->path, img->path, dl) == 0 && base->path[dl] == '/')
                return strdup(base->path + dl + 1);
        return strdup(base->path);
}

static int job_start(dc_job *j, const struct dc_job_options *jo, dc_job **ret) {
        int r;

        j->speed = jo->speed;
        j->cache = jo->cache;
        j->on_error = jo->on_error;
        j->on_error_write = jo->has_target_error ? jo->on_target_error : jo->on_error;
        j->auto_finalize = jo->auto_finalize;
        j->auto_dismiss = jo->auto_dismiss;
        j->notify = jo->notify;
        j->pivoted = jo->pivoted;
        j->userdata = jo->userdata;
        if (!j->len && !j->dirty)
                j->len = j->img->virtual_size;
        j->status = DC_JOB_CREATED;
        {
                struct dc_job_event ev = { .kind = DC_EV_STATUS, .status = DC_JOB_CREATED };
                queue_event(j, &ev);
        }
        job_set_status(j, DC_JOB_RUNNING);
        j->busy = true;
        r = pthread_create(&j->thread, NULL, job_thread, j);
        if (r != 0)
                return dc_error(r, "cannot start a thread for job '%s'", j->id);
        j->thread_started = true;
        *ret = j;
        return 0;
}

/* A new job object with a well-formed id (QMP's rule), not started yet. */
static int job_new(const struct dc_job_options *jo, int type, dc_job **ret) {
        dc_job *j;

        if (!id_wellformed(jo->id))
                return dc_error(EINVAL, "Invalid job ID '%s'", jo->id ? jo->id : "");
        if (jo->cache != DC_CACHE_WRITEBACK && jo->cache != DC_CACHE_NONE)
                return dc_error(EINVAL, "Invalid cache mode %d", jo->cache);
        j = calloc(1, sizeof *j);
        if (!j)
                return dc_error(ENOMEM, "out of memory");
        pthread_mutex_init(&j->lock, NULL);
        pthread_cond_init(&j->cond, NULL);
        pthread_mutex_init(&j->rate_gate, NULL);
        j->type = type;
        j->id = strdup(jo->id);
        *ret = j;
        return 0;
}

/*
 * Is CHAIN (from its active layer down) the one the caller authorized?
 * Between the caller's look at the files and our open, a header may have
 * been rewritten to name other backing files.
 */
static int chain_expected(dc_image *chain, const char *const *expect) {
        size_t i = 0;

        if (!expect)
                return 0;
        /* the job may work from a layer below the active one: compare from there */
        while (expect[i] && strcmp(expect[i], chain->path) != 0)
                i++;
        if (!expect[i])
                return dc_error(ESTALE, "'%s' is no longer in the backing chain that was authorized; try again",
                                chain->path);
        for (dc_image *l = chain; l; l = l->backing, i++)
                if (!expect[i] || strcmp(expect[i], l->path) != 0)
                        return dc_error(ESTALE, "the backing chain of '%s' changed after the job was authorized "
                                                "('%s' is not what was checked); try again", chain->path, l->path);
        if (expect[i])
                return dc_error(ESTALE, "the backing chain of '%s' changed after the job was authorized "
                                        "('%s' is no longer in it); try again", chain->path, expect[i]);
        return 0;
}

/*
 * The chain a job works on, with TOP_ABS in it and the layers in WRITABLE
 * (NULL-terminated absolute paths) read-write: the caller's disk (reopened
 * when one of them is read-only in it), or a disk of the job's own.
 */
static int job_disk(dc_job *j, const char *top_abs, const struct dc_open_options *oo, const struct dc_job_options *jo,
                    const char *const *writable) {
        struct dc_open_options o = *oo;
        int r;

        if (jo->disk) {
                dc_image *chain = dc_disk_chain(jo->disk);
                bool reopen = false;
                if (!find_layer(chain, top_abs))
                        return dc_error(EINVAL, "'%s' is not in the chain of '%s'", top_abs, chain->path);
                for (size_t i = 0; writable && writable[i]; i++) {
                        dc_image *l = find_layer(chain, writable[i]);
                        if (!l)
                                return dc_error(EINVAL, "'%s' is not in the chain of '%s'", writable[i], chain->path);
                        reopen |= !l->writable;
                }
                r = chain_expected(chain, jo->expect_chain);
                if (r < 0)
                        return r;
                j->disk = dc_disk_ref(jo->disk);
                if (reopen) {
                        dc_disk_quiesce(j->disk);
                        r = dc_disk_reopen(j->disk, writable);
                        dc_disk_unquiesce(j->disk);
                        if (r < 0)
                                return r;
                        j->disk_reopened = true;
                }
                return 0;
        }
        o.writable = false;
        o.writable_layer = NULL;
        o.no_backing = false;
        o.writable_layers = writable;
        r = dc_disk_open(top_abs, &o, &j->disk);
        if (r < 0)
                return r;
        return chain_expected(dc_disk_chain(j->disk), jo->expect_chain);
}

static const struct dc_open_options no_options;

/* Resolve PATH to an absolute path inside the roots; free() it. */
static int job_path(const char *path, const struct dc_open_options *oo, char **ret) {
        return dc_path_resolve(path, oo->roots, ret, NULL);
}

static int writable_check(dc_image *l) {
        if (!l->writable)
                return dc_error(EROFS, "'%s' cannot be written%s%s", l->path, l->read_only_reason ? ": " : "",
                                l->read_only_reason ? l->read_only_reason : "");
        return 0;
}

DC_EXPORT int dc_job_stream(const char *top_path, const char *base_path, const char *backing_file,
                            const struct dc_open_options *oo, const struct dc_job_options *jo, dc_job **ret) {
        _cleanup_free_ char *top = NULL, *base = NULL;
        dc_job *j;
        int r;

        oo = oo ? oo : &no_options;

        if (!base_path && backing_file)
                return dc_error(EINVAL, "backing file specified, but streaming the entire chain");
        r = job_path(top_path, oo, &top);
        if (r >= 0 && base_path)
                r = job_path(base_path, oo, &base);
        if (r < 0)
                return r;
        r = job_new(jo, DC_JOB_TYPE_STREAM, &j);
        if (r < 0)
                return r;
        r = job_disk(j, top, oo, jo, (const char *const[]){ top, NULL });
        if (r < 0)
                goto fail;
        j->img = j->target = find_layer(dc_disk_chain(j->disk), top);
        if (base) {
                j->base = find_layer(j->img->backing, base);
                if (!j->base) {
                        r = dc_error(EINVAL, "'%s' is not a backing image of '%s'", base_path, top_path);
                        goto fail;
                }
                j->new_backing = backing_file ? strdup(backing_file) : backing_name(j->target, j->base);
                j->new_backing_fmt = strdup(dc_format_name(dc_image_format(j->base)));
        }
        if (j->target->drv != &dc_qcow2_driver) {
                r = dc_error(ENOTSUP, "'%s': only qcow2 images can receive streamed data", top_path);
                goto fail;
        }
        r = writable_check(j->target);
        if (r < 0)
                goto fail;
        j->run = stream_run;
        j->prepare = set_backing_prepare;
        j->clean = NULL;
        r = job_start(j, jo, ret);
        if (r >= 0)
                return 0;
fail:
        dc_job_free(j);
        return r;
}

DC_EXPORT int dc_job_commit(const char *overlay_path, const char *top_path, const char *base_path,
                            const char *backing_file, const struct dc_open_options *oo,
                            const struct dc_job_options *jo, dc_job **ret) {
        _cleanup_free_ char *overlay = NULL, *top = NULL, *base = NULL;
        dc_image *chain;
        dc_job *j;
        int r;

        oo = oo ? oo : &no_options;

        r = job_path(top_path, oo, &top);
        if (r >= 0)
                r = job_path(base_path, oo, &base);
        if (r >= 0 && overlay_path)
                r = job_path(overlay_path, oo, &overlay);
        if (r < 0)
                return r;
        if (strcmp(top, base) == 0)
                return dc_error(EINVAL, "cannot commit an image into itself");
        if (!overlay && backing_file)
                return dc_error(EINVAL, "'backing-file' specified, but 'top' is the active layer");
        r = job_new(jo, DC_JOB_TYPE_COMMIT, &j);
        if (r < 0)
                return r;
        if (overlay) {
                /* the overlay read-write for its new backing pointer, base to receive the data */
                r = job_disk(j, overlay, oo, jo, (const char *const[]){ overlay, base, NULL });
                if (r < 0)
                        goto fail;
                chain = dc_disk_chain(j->disk);
                j->overlay = find_layer(chain, overlay);
                j->img = j->target = find_layer(j->overlay->backing, top);
                if (!j->target || j->overlay->backing != j->target) {
                        r = dc_error(EINVAL, "'%s' is not the backing file of '%s'", top_path, overlay_path);
                        goto fail;
                }
        } else {
                r = job_disk(j, top, oo, jo, (const char *const[]){ base, NULL });
                if (r < 0)
                        goto fail;
                chain = dc_disk_chain(j->disk);
                if (strcmp(chain->path, top) != 0) {
                        r = dc_error(EINVAL, "'%s' is not the active layer of '%s'", top_path, chain->path);
                        goto fail;
                }
                j->img = j->target = chain;
                j->active_commit = true;
        }
        j->base = find_layer(j->target->backing, base);
        if (!j->base) {
                r = dc_error(EINVAL, "'%s' is not in the backing chain of '%s'", base_path, top_path);
                goto fail;
        }
        r = writable_check(j->base);
        if (r < 0)
                goto fail;
        if (j->active_commit) {
                uint32_t cs = dc_image_cluster_size(j->base);
                j->target = j->base;
                j->unit = MAX(MIN(MAX(cs, 4096u), 65536u), cs ? cs : 1u);
                j->buf_size = 16u << 20;
                j->copy_mode = DC_COPY_MODE_BACKGROUND;
                j->run = mirror_run;
                j->prepare = mirror_prepare;
                j->clean = mirror_clean;
                r = mirror_setup(j);
                if (r < 0)
                        goto fail;
        } else {
                j->new_backing = backing_file ? strdup(backing_file) : backing_name(j->overlay, j->base);
                j->new_backing_fmt = strdup(dc_format_name(dc_image_format(j->base)));
                j->run = commit_run;
                j->prepare = set_backing_prepare;
        }
        r = job_start(j, jo, ret);
        if (r >= 0)
                return 0;
fail:
        dc_job_free(j);
        return r;
}

/* Open a backup or mirror target: its top only, read-write, marked as a job's target. */
static int open_target(dc_job *j, const char *target, const struct dc_open_options *oo) {
        struct dc_open_options o = *oo;
        int r;

        if (find_layer(j->img, target))
                return dc_error(EINVAL, j->type == DC_JOB_TYPE_MIRROR ? "Can't mirror node into itself"
                                                                      : "Source and target cannot be the same");
        o.writable = true;
        o.no_backing = true; /* its backing is read at the pivot, not before (it may be the source) */
        o.writable_layer = NULL;
        o.writable_layers = NULL;
        r = dc_image_open(target, &o, &j->tgt);
        if (r < 0)
                return r;
        return writable_check(j->tgt);
}

/* A backup or mirror job: source and target resolved and different, the
 * source's chain (j->img its layer SOURCE_PATH) and the target open. */
static int copy_job_new(int type, const char *source_path, const char *target_path, const struct dc_open_options *oo,
                        const struct dc_job_options *jo, dc_job **ret) {
        _cleanup_free_ char *source = NULL, *target = NULL;
        dc_job *j;
        int r;

        r = job_path(source_path, oo, &source);
        if (r >= 0)
                r = job_path(target_path, oo, &target);
        if (r < 0)
                return r;
        if (strcmp(source, target) == 0)
                return dc_error(EINVAL, type == DC_JOB_TYPE_MIRROR ? "Can't mirror node into itself"
                                                                   : "Source and target cannot be the same");
        r = job_new(jo, type, &j);
        if (r < 0)
                return r;
        r = job_disk(j, source, oo, jo, NULL);
        if (r >= 0) {
                j->img = find_layer(dc_disk_chain(j->disk), source);
                r = open_target(j, target, oo);
        }
        if (r < 0) {
                dc_job_free(j);
                return r;
        }
        *ret = j;
        return 0;
}

DC_EXPORT int dc_job_backup(const char *source_path, const char *target_path, const struct dc_backup_options *bo,
                            const struct dc_open_options *oo, const struct dc_job_options *jo, dc_job **ret) {
        uint64_t cs;
        dc_job *j;
        int r;

        oo = oo ? oo : &no_options;

        r = copy_job_new(DC_JOB_TYPE_BACKUP, source_path, target_path, oo, jo, &j);
        if (r < 0)
                return r;
        if (j->tgt->virtual_size != j->img->virtual_size) {
                r = dc_error(EINVAL, "Source and target image have different sizes");
                goto fail;
        }
        if (bo->compress && !j->tgt->drv->write_compressed) {
                r = dc_error(ENOTSUP, "Compression is not supported for this drive");
                goto fail;
        }
        cs = dc_image_cluster_size(j->tgt);
        if (bo->max_chunk && bo->max_chunk < MAX(cs, 512u)) {
                r = dc_error(EINVAL, "max-chunk must be at least the target's cluster size");
                goto fail;
        }
        j->target = j->tgt;
        j->sync = bo->sync;
        j->compress = bo->compress;
        j->workers = bo->max_workers ? MIN(bo->max_workers, MAX_WORKERS) : WORKERS;
        j->chunk = bo->max_chunk ? MIN(ALIGN_DOWN(bo->max_chunk, 512), (uint64_t) CHUNK) : 0;
        /* copy-before-write works in whole target clusters (64 KiB for raw) */
        j->cbw_unit = cs ? cs : 65536;
        if (j->chunk && j->chunk < j->cbw_unit)
                j->cbw_unit = j->chunk;
        if (j->chunk)
                j->chunk = ALIGN_DOWN(j->chunk, j->cbw_unit);
        j->cbw_bits = DIV_ROUND_UP(j->img->virtual_size, j->cbw_unit);
        j->uncopied = calloc(j->cbw_bits / 64 + 1, sizeof *j->uncopied);
        if (!j->uncopied) {
                r = dc_error(ENOMEM, "out of memory");
                goto fail;
        }
        j->run = backup_run;
        j->clean = backup_clean;
        r = backup_setup(j);
        if (r >= 0)
                r = job_start(j, jo, ret);
        if (r >= 0)
                return 0;
fail:
        dc_job_free(j);
        return r;
}

DC_EXPORT int dc_job_mirror(const char *source_path, const char *target_path, const struct dc_mirror_options *mo,
                            const struct dc_open_options *oo, const struct dc_job_options *jo, dc_job **ret) {
        uint32_t cs, gran;
        dc_image *chain;
        dc_job *j;
        int r;

        oo = oo ? oo : &no_options;

        if (mo->granularity && (mo->granularity < 512 || mo->granularity > (64u << 20) ||
                                (mo->granularity & (mo->granularity - 1))))
                return dc_error(EINVAL, "Granularity must be a power of 2 between 512 and 64 MiB");
        if (mo->sync != DC_SYNC_FULL && mo->sync != DC_SYNC_TOP && mo->sync != DC_SYNC_NONE)
                return dc_error(EINVAL, "Sync mode not supported");
        r = copy_job_new(DC_JOB_TYPE_MIRROR, source_path, target_path, oo, jo, &j);
        if (r < 0)
                return r;
        chain = dc_disk_chain(j->disk);
        if (chain != j->img) {
                r = dc_error(EINVAL, "'%s' is not the active layer of '%s'", source_path, chain->path);
                goto fail;
        }
        j->target = j->tgt;
        j->sync = mo->sync;
        j->existing = mo->existing;
        j->unmap = mo->unmap;
        j->copy_mode = mo->copy_mode == DC_COPY_MODE_WRITE_BLOCKING ? DC_COPY_MODE_WRITE_BLOCKING
                                                                     : DC_COPY_MODE_BACKGROUND;
        /* QEMU's default granularity: the target's cluster size within 4 KiB..64 KiB; the
         * chunk copied is never smaller than a target cluster, so no write needs its backing */
        cs = dc_image_cluster_size(j->tgt);
        gran = mo->granularity ? mo->granularity : cs ? MIN(MAX(cs, 4096u), 65536u) : 65536u;
        j->unit = MAX(gran, cs);
        j->buf_size = mo->buf_size ? mo->buf_size : 16u << 20;
        j->run = mirror_run;
        j->prepare = mirror_prepare;
        j->clean = mirror_clean;
        r = mirror_setup(j);
        if (r >= 0)
                r = job_start(j, jo, ret);
        if (r >= 0)
                return 0;
fail:
        dc_job_free(j);
        return r;
}

DC_EXPORT dc_job *dc_job_free(dc_job *j) {
        struct dc_job_event ev;

        if (!j)
                return NULL;
        if (j->thread_started)
                pthread_join(j->thread, NULL);
        else if (j->disk) {
                /* never started: undo what the constructor did */
                if (j->clean)
                        j->clean(j);
                disk_restore(j);
        }
        while (dc_job_next_event(j, &ev) > 0)
                ;
        dc_disk_unref(j->disk);
        dc_image_close(j->tgt);
        pthread_mutex_destroy(&j->lock);
        pthread_cond_destroy(&j->cond);
        pthread_mutex_destroy(&j->rate_gate);
        free(j->id);
        free(j->new_backing);
        free(j->new_backing_fmt);
        free(j->uncopied);
        free(j->dirty);
        free(j->buf);
        free(j);
        return NULL;
}
