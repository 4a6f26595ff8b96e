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

#define CHUNK (4u << 20) /* bytes read and written per step: few syncs, bounded memory */

struct event_node {
        struct dc_job_event ev;
        struct event_node *next;
};

struct dc_job {
        pthread_mutex_t lock;
        pthread_cond_t cond;
        pthread_t thread;
        bool thread_started;
        char *id;
        int type;
        int status;
        uint64_t len, offset, speed;
        bool user_paused, paused_now, cancelled, force_cancel, finalize_requested;
        bool auto_finalize, auto_dismiss, busy;
        int on_error, on_error_write, io_status;
        char error[512];
        struct event_node *head, *tail;
        void (*notify)(void *);
        void *userdata;

        /* the work */
        int (*run)(dc_job *j);
        int (*prepare)(dc_job *j);
        dc_image *img;            /* chain the job reads through */
        dc_image *target;         /* layer written (inside img) */
        dc_image *base;           /* layer where copying stops (inside img), NULL = none */
        dc_image *overlay;        /* commit: the image whose backing changes */
        dc_image *tgt;            /* backup: the target, a separate chain */
        int sync;
        bool compress;
        unsigned workers;
        uint64_t chunk;
        char *new_backing;        /* name recorded at the end */
        char *new_backing_fmt;
        uint64_t rate_start_ns, rate_bytes;
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

enum { VERB_CANCEL, VERB_PAUSE, VERB_RESUME, VERB_SET_SPEED, VERB_COMPLETE, VERB_FINALIZE, VERB_DISMISS };
static const char *const verb_names[] = { "cancel", "pause", "resume", "set-speed", "complete", "finalize", "dismiss" };
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
        (void) force; /* stream and commit have no ready phase: every cancel is hard */
        return VERB(j, VERB_CANCEL, {
                j->cancelled = true;
                j->force_cancel = true;
                j->user_paused = false;
        });
}

DC_EXPORT int dc_job_complete(dc_job *j) {
        return VERB(j, VERB_COMPLETE, {
                _r = dc_error(EPERM, "The active block job '%s' cannot be completed", j->id);
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
 * Returns -ECANCELED when cancelled.  Called without the lock.
 */
static int pause_point(dc_job *j, uint64_t bytes_done, uint64_t bytes_copied) {
        int r = 0;

        pthread_mutex_lock(&j->lock);
        j->offset += bytes_done;
        j->rate_bytes += bytes_copied; /* the limit counts data copied, not ranges skipped */
        for (;;) {
                if (j->cancelled) {
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

/* Parallel compression of the whole clusters of one chunk (backup compress). */
struct compress_task {
        dc_image *dst;
        const uint8_t *buf;
        uint8_t **out;
        size_t *clen;
        uint64_t first, step, n, cs, len;
        int r;
};

static void *compress_worker(void *p) {
        struct compress_task *t = p;
        for (uint64_t i = t->first; i < t->n && t->r >= 0; i += t->step) {
                size_t l = (size_t) MIN(t->cs, t->len - i * t->cs);
                t->r = dc_qcow2_compress_cluster(t->dst, t->buf + i * t->cs, l, t->out[i], &t->clen[i]);
        }
        return NULL;
}

static int write_compressed_run(dc_job *j, dc_image *dst, const uint8_t *buf, uint64_t off, uint64_t len) {
        uint64_t cs = dc_image_cluster_size(dst), n = DIV_ROUND_UP(len, cs);
        unsigned workers = (unsigned) MIN((uint64_t) j->workers, n);
        struct compress_task tasks[16];
        pthread_t th[16];
        uint8_t **out = calloc(n, sizeof *out);
        size_t *clen = calloc(n, sizeof *clen);
        int r = 0;

        if (!out || !clen) {
                free(out);
                free(clen);
                return dc_error(ENOMEM, "out of memory");
        }
        for (uint64_t i = 0; i < n && r >= 0; i++)
                if (!(out[i] = malloc(cs)))
                        r = dc_error(ENOMEM, "out of memory");
        /* workers-1 helper threads, and this one; a helper that cannot be
         * started has its share done here */
        {
                bool started[16] = { false };
                for (unsigned w = 0; r >= 0 && w < workers; w++) {
                        tasks[w] = (struct compress_task){ dst, buf, out, clen, w, workers, n, cs, len, 0 };
                        if (w > 0)
                                started[w] = pthread_create(&th[w], NULL, compress_worker, &tasks[w]) == 0;
                }
                for (unsigned w = 0; r >= 0 && w < workers; w++)
                        if (!started[w])
                                compress_worker(&tasks[w]);
                for (unsigned w = 1; w < workers; w++)
                        if (started[w])
                                pthread_join(th[w], NULL);
                for (unsigned w = 0; r >= 0 && w < workers; w++)
                        if (tasks[w].r < 0)
                                r = tasks[w].r;
        }
        pthread_mutex_lock(&dst->lock);
        for (uint64_t i = 0; i < n && r >= 0; i++)
                r = dc_qcow2_store_compressed(dst, buf + i * cs, off + i * cs, (size_t) MIN(cs, len - i * cs), out[i],
                                              clen[i]);
        pthread_mutex_unlock(&dst->lock);
        for (uint64_t i = 0; i < n; i++)
                free(out[i]);
        free(out);
        free(clen);
        return r;
}

/*
 * The copy loop shared by stream and commit: every range of the virtual size
 * that is allocated from SRC down to (not including) STOP is read through
 * SRC's chain and written into DST; ranges that read as zero become zero
 * writes.  Sparse-aware: nothing else is touched.  SKIP_DST_ALLOCATED skips
 * ranges DST already holds itself (stream).
 */
static int copy_loop(dc_job *j, dc_image *src, dc_image *stop, dc_image *dst, bool skip_dst_allocated) {
        uint64_t chunk = j->chunk ? j->chunk : CHUNK;
        uint8_t *buf = malloc(chunk);
        uint64_t size = src->virtual_size, off = 0;
        int r = 0;

        if (!buf)
                return dc_error(ENOMEM, "out of memory");
        while (off < size) {
                uint64_t n = MIN(chunk, size - off), run;
                bool copy, ignored = false;

                r = pause_point(j, 0, 0);
                if (r < 0)
                        break;
                if (skip_dst_allocated) {
                        struct dc_layer_status st;
                        pthread_mutex_lock(&dst->lock);
                        r = dst->drv->block_status(dst, off, n, &st);
                        pthread_mutex_unlock(&dst->lock);
                        if (r < 0)
                                goto io_error_read;
                        if (st.type != DC_LAYER_UNALLOCATED) {
                                r = pause_point(j, st.length, 0);
                                if (r < 0)
                                        break;
                                off += st.length;
                                continue;
                        }
                        n = MIN(n, st.length);
                }
                r = allocated_above(skip_dst_allocated ? src->backing : src, stop, off, n, &copy, &run);
                if (r < 0)
                        goto io_error_read;
                if (copy) {
                        r = dc_chain_read(src, buf, off, (size_t) run);
                        if (r < 0)
                                goto io_error_read;
                        if (off + run > dst->virtual_size)
                                r = dc_error(EINVAL, "'%s' is smaller than the data to copy", dst->path);
                        else if (all_zero(buf, (size_t) run)) {
                                pthread_mutex_lock(&dst->lock);
                                r = dst->drv->write_zeroes(dst, off, run, 0);
                                pthread_mutex_unlock(&dst->lock);
                        } else if (j->compress && off % dc_image_cluster_size(dst) == 0 &&
                                   ((off + run) % dc_image_cluster_size(dst) == 0 || off + run == dst->virtual_size)) {
                                r = write_compressed_run(j, dst, buf, off, run);
                        } else {
                                pthread_mutex_lock(&dst->lock);
                                r = dst->drv->write(dst, buf, off, (size_t) run);
                                pthread_mutex_unlock(&dst->lock);
                        }
                        if (r < 0) {
                                r = handle_io_error(j, r, false, &ignored);
                                if (r == 0)
                                        continue; /* stopped, resumed: retry */
                                if (r == 1) {
                                        r = 0;
                                        goto next;
                                }
                                break;
                        }
                }
        next:
                r = pause_point(j, run, copy ? run : 0);
                if (r < 0)
                        break;
                off += run;
                continue;
        io_error_read:
                r = handle_io_error(j, r, true, &ignored);
                if (r == 0)
                        continue;
                if (r == 1) {
                        r = pause_point(j, n, 0);
                        if (r < 0)
                                break;
                        off += n;
                        continue;
                }
                break;
        }
        free(buf);
        if (r >= 0)
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

static int backup_run(dc_job *j) {
        if (j->sync == DC_SYNC_NONE) {
                /* nothing to copy in the background: run until cancelled */
                for (;;) {
                        struct timespec ts = { 0, 100000000 };
                        int r = pause_point(j, 0, 0);
                        if (r < 0)
                                return r;
                        nanosleep(&ts, NULL);
                }
        }
        return copy_loop(j, j->img, j->sync == DC_SYNC_TOP ? j->img->backing : NULL, j->tgt, false);
}

static int set_backing_prepare(dc_job *j) {
        dc_image *img = j->type == DC_JOB_TYPE_STREAM ? j->target : j->overlay;
        return dc_image_set_backing(img, j->new_backing, j->new_backing_fmt);
}

static void *job_thread(void *p) {
        dc_job *j = p;
        int r;

        r = j->run(j);
        pthread_mutex_lock(&j->lock);
        j->busy = false;
        if (r >= 0 && !j->cancelled) {
                job_set_status(j, DC_JOB_WAITING);
                job_set_status(j, DC_JOB_PENDING);
                if (!j->auto_finalize) {
                        outcome_event(j, DC_EV_PENDING, NULL);
                        pthread_mutex_unlock(&j->lock);
                        wake_owner(j);
                        pthread_mutex_lock(&j->lock);
                        while (!j->finalize_requested && !j->cancelled)
                                pthread_cond_wait(&j->cond, &j->lock);
                }
                if (!j->cancelled) {
                        pthread_mutex_unlock(&j->lock);
                        r = j->prepare ? j->prepare(j) : 0;
                        pthread_mutex_lock(&j->lock);
                        if (r < 0)
                                snprintf(j->error, sizeof j->error, "%s", dc_get_error());
                }
        }
        if (r >= 0 && !j->cancelled)
                outcome_event(j, DC_EV_COMPLETED, "");
        else {
                job_set_status(j, DC_JOB_ABORTING);
                if (j->force_cancel && !j->error[0]) {
                        outcome_event(j, DC_EV_CANCELLED, NULL);
                        /* as QMP's query reports a cancelled job's ret */
                        snprintf(j->error, sizeof j->error, "%s", strerror(ECANCELED));
                }
                else {
                        if (!j->error[0])
                                snprintf(j->error, sizeof j->error, "%s",
                                         dc_get_error()[0] ? dc_get_error() : strerror(-r));
                        outcome_event(j, DC_EV_COMPLETED, j->error);
                }
        }
        job_set_status(j, DC_JOB_CONCLUDED);
        if (j->auto_dismiss)
                job_set_status(j, DC_JOB_NULL);
        /* the images are released before anyone hears of the end */
        j->img = dc_image_close(j->img);
        j->tgt = dc_image_close(j->tgt);
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
        j->on_error = jo->on_error;
        j->on_error_write = jo->has_target_error ? jo->on_target_error : jo->on_error;
        j->auto_finalize = jo->auto_finalize;
        j->auto_dismiss = jo->auto_dismiss;
        j->notify = jo->notify;
        j->userdata = jo->userdata;
        j->len = j->target->virtual_size;
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
        j = calloc(1, sizeof *j);
        if (!j)
                return dc_error(ENOMEM, "out of memory");
        pthread_mutex_init(&j->lock, NULL);
        pthread_cond_init(&j->cond, NULL);
        j->type = type;
        j->id = strdup(jo->id);
        *ret = j;
        return 0;
}

DC_EXPORT int dc_job_stream(const char *top_path, const char *base_path, const char *backing_file,
                            const struct dc_open_options *oo, const struct dc_job_options *jo, dc_job **ret) {
        struct dc_open_options o = *oo;
        dc_job *j;
        int r;

        if (!base_path && backing_file)
                return dc_error(EINVAL, "backing file specified, but streaming the entire chain");
        r = job_new(jo, DC_JOB_TYPE_STREAM, &j);
        if (r < 0)
                return r;
        o.writable = true;
        r = dc_image_open(top_path, &o, &j->img);
        if (r < 0)
                goto fail;
        j->target = j->img;
        if (base_path) {
                j->base = find_layer(j->img->backing, base_path);
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
        j->run = stream_run;
        j->prepare = set_backing_prepare;
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
        struct dc_open_options o = *oo;
        dc_job *j;
        int r;

        if (strcmp(top_path, base_path) == 0)
                return dc_error(EINVAL, "cannot commit an image into itself");
        r = job_new(jo, DC_JOB_TYPE_COMMIT, &j);
        if (r < 0)
                return r;
        /* one handle: the overlay read-write for its new backing pointer,
         * base read-write to receive the data */
        o.writable = true;
        o.writable_layer = base_path;
        r = dc_image_open(overlay_path, &o, &j->img);
        if (r < 0)
                goto fail;
        j->overlay = j->img;
        j->target = find_layer(j->img->backing, top_path);
        if (!j->target || j->overlay->backing != j->target) {
                r = dc_error(EINVAL, "'%s' is not the backing file of '%s'", top_path, overlay_path);
                goto fail;
        }
        j->base = find_layer(j->target->backing, base_path);
        if (!j->base) {
                r = dc_error(EINVAL, "'%s' is not in the backing chain of '%s'", base_path, top_path);
                goto fail;
        }
        if (!j->base->writable) {
                r = dc_error(EROFS, "'%s' cannot be written%s%s", base_path, j->base->read_only_reason ? ": " : "",
                             j->base->read_only_reason ? j->base->read_only_reason : "");
                goto fail;
        }
        j->new_backing = backing_file ? strdup(backing_file) : backing_name(j->overlay, j->base);
        j->new_backing_fmt = strdup(dc_format_name(dc_image_format(j->base)));
        j->run = commit_run;
        j->prepare = set_backing_prepare;
        r = job_start(j, jo, ret);
        if (r >= 0)
                return 0;
fail:
        dc_job_free(j);
        return r;
}

DC_EXPORT int dc_job_backup(const char *source_path, const char *target_path, const struct dc_backup_options *bo,
                            const struct dc_open_options *oo, const struct dc_job_options *jo, dc_job **ret) {
        struct dc_open_options so = *oo, to = *oo;
        dc_job *j;
        int r;

        if (strcmp(source_path, target_path) == 0)
                return dc_error(EINVAL, "Source and target cannot be the same");
        r = job_new(jo, DC_JOB_TYPE_BACKUP, &j);
        if (r < 0)
                return r;
        so.writable = false;
        r = dc_image_open(source_path, &so, &j->img);
        if (r < 0)
                goto fail;
        to.writable = true;
        r = dc_image_open(target_path, &to, &j->tgt);
        if (r < 0)
                goto fail;
        if (j->tgt->virtual_size != j->img->virtual_size) {
                r = dc_error(EINVAL, "Source and target image have different sizes");
                goto fail;
        }
        if (bo->compress && !j->tgt->drv->write_compressed) {
                r = dc_error(ENOTSUP, "Compression is not supported for this drive");
                goto fail;
        }
        if (bo->max_chunk && bo->max_chunk < MAX(dc_image_cluster_size(j->tgt), 512u)) {
                r = dc_error(EINVAL, "max-chunk must be at least the target's cluster size");
                goto fail;
        }
        j->target = j->tgt;
        j->sync = bo->sync;
        j->compress = bo->compress;
        j->workers = bo->max_workers ? MIN(bo->max_workers, 16u) : 2;
        j->chunk = bo->max_chunk ? MIN(ALIGN_DOWN(bo->max_chunk, 512), (uint64_t) CHUNK) : 0;
        j->run = backup_run;
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
        while (dc_job_next_event(j, &ev) > 0)
                ;
        dc_image_close(j->img);
        dc_image_close(j->tgt);
        pthread_mutex_destroy(&j->lock);
        pthread_cond_destroy(&j->cond);
        free(j->id);
        free(j->new_backing);
        free(j->new_backing_fmt);
        free(j);
        return NULL;
}
