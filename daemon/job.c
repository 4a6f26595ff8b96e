/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The block jobs of the daemon, as a model apart from their bus glue
 * (bus-job.c), the way machined splits machine.c from machine-dbus.c.
 *
 * Design notes
 * ------------
 * - A Job wraps the library's job (lib/job.c), which runs on its own thread
 *   and queues events; it wakes the loop through an eventfd, and here, on
 *   the loop, each event is handed to the bus glue in the order the job
 *   produced it (job_send_event: its signal, and the properties a status
 *   change refreshes).
 * - The model reaches the bus through four functions of bus-job.c only:
 *   job_send_event, job_send_changed (properties), job_send_added and
 *   job_send_removed (the object and its chain's Jobs).  Plain calls, not
 *   callbacks: there is one bus, and the calls name what the model wants
 *   announced, as machine.c calls machine_send_signal().
 * - A 250 ms timer samples the progress, measures Rate and ExpectedEndTime
 *   from it (job-rate.c) and announces whichever changed; it ticks only
 *   while there are jobs, so an idle daemon can time out.  When the job
 *   ends, Rate becomes its average and ExpectedEndTime when it ended,
 *   announced before BlockJobCompleted or BlockJobCancelled, so a client
 *   that follows the signals has the final numbers when it learns the
 *   outcome.
 * - Reservations, in order: a job id is reserved (job_ids) from the call
 *   that starts it until the job is gone, which also bounds MaxJobs; its
 *   images are claimed busy and its target set aside (claims.c) from the
 *   same moment until it concludes.  At conclusion the claims are given
 *   back and the images read again (the job may have changed the chain's
 *   shape); a job whose status reaches null leaves the bus.
 * - Starting (JobStart): a worker opens the chain, checks that it is still
 *   the chain polkit was asked about (ESTALE otherwise), creates the target
 *   if the job makes one, and starts the job.  Back on the loop the Job is
 *   published, or everything reserved is released; a target made for a
 *   job that did not start is removed (only if it is still the file we
 *   made).
 * - The library's job is freed (its thread joined) on a worker, never on
 *   the loop; only at exit is it cancelled and freed on the loop.
 */

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "daemon.h"

static uint64_t now_usec(clockid_t c) {
        struct timespec ts;
        clock_gettime(c, &ts);
        return (uint64_t) ts.tv_sec * 1000000u + (uint64_t) ts.tv_nsec / 1000u;
}

static void free_job_run(Work *w) {
        dc_job_free(w->data);
}

static void job_free_later(Manager *mgr, dc_job *dj) {
        Work *w;
        if (!dj)
                return;
        w = work_new(mgr, free_job_run, NULL, dj, NULL);
        if (w)
                (void) work_submit(w, NULL);
}

/* Give back the images the job held and the target's place; announce what that changes. */
static void job_release(Job *j) {
        Manager *mgr = j->mgr;
        g_autoptr(GPtrArray) changed = g_ptr_array_new();

        for (char **p = j->paths; p && *p; p++)
                g_ptr_array_add(changed, *p);
        /* a remote target (a URI) is no file of the model */
        if (claims_release(mgr->claims, j->id, j->paths, *j->target ? j->target : NULL) && !dc_nbd_uri_is(j->target))
                g_ptr_array_add(changed, j->target);
        g_ptr_array_add(changed, NULL);
        if (mgr->bus && changed->len > 1) {
                model_changed(mgr, (char **) changed->pdata);
                /* what the job wrote is read again */
                model_refresh(mgr, (char **) changed->pdata);
        }
        g_strfreev(j->paths);
        j->paths = NULL;
}

/* The Job's own memory (not the job, the id's reservation or the claims). */
static void job_struct_free(Job *j) {
        g_strfreev(j->paths);
        free(j->id);
        free(j->outcome);
        free(j->object);
        free(j->chain_object);
        free(j->top);
        free(j->base);
        free(j->target);
        free(j);
}

static void job_free(Job *j) {
        if (!j)
                return;
        job_release(j);
        g_hash_table_remove(j->mgr->job_ids, j->id);
        job_free_later(j->mgr, TAKE_PTR(j->dj));
        job_struct_free(j);
}

static void job_free_void(void *p) {
        job_free(p);
}

char **model_job_paths(Manager *mgr) {
        GPtrArray *a = g_ptr_array_new();
        GHashTableIter it;
        Job *j;

        g_hash_table_iter_init(&it, mgr->jobs);
        while (g_hash_table_iter_next(&it, NULL, (void **) &j))
                g_ptr_array_add(a, strdup(j->object));
        g_ptr_array_add(a, NULL);
        return (char **) g_ptr_array_free(a, FALSE);
}

bool job_id_in_use(Manager *mgr, const char *id) {
        return g_hash_table_contains(mgr->job_ids, id);
}

char *job_new_id(Manager *mgr, const char *type) {
        for (;;) {
                char *id = g_strdup_printf("%s%u", type, mgr->job_counter++);
                if (!g_hash_table_contains(mgr->job_ids, id))
                        return id;
                g_free(id);
        }
}

/* --- running jobs ------------------------------------------------------------ */

static void log_outcome(Job *j, const struct dc_job_event *ev) {
        g_autofree char *bytes = g_strdup_printf("%" PRIu64, ev->offset);
        g_autofree char *secs = g_strdup_printf("%.1f", (j->rate.end - j->rate.start) / 1e6);
        const char *result = ev->kind == DC_EV_CANCELLED ? "cancelled" : ev->error[0] ? "failed" : "completed";

        log_fields(ev->kind == DC_EV_COMPLETED && ev->error[0] ? LOG_WARNING : LOG_INFO,
                   (const char *const[]){ "DISKCHAIN_JOB", j->id, "DISKCHAIN_JOB_TYPE", dc_job_type_name(j->type),
                                          "DISKCHAIN_RESULT", result, "DISKCHAIN_BYTES", bytes, "DISKCHAIN_SECONDS",
                                          secs, "DISKCHAIN_ERROR", ev->error[0] ? ev->error : NULL, NULL },
                   "job '%s' %s after %s s, %s of %" PRIu64 " bytes done%s%s", j->id, result, secs, bytes, ev->len,
                   ev->error[0] ? ": " : "", ev->error);
}

/* ExpectedEndTime for a measurement at T: while the job runs, when it gets to its length
 * at the rate; once it ended, when it did.  From StartTime, so the two agree. */
static uint64_t job_expected_end(Job *j, uint64_t t) {
        uint64_t left;

        if (j->rate.end)
                return j->start_time + (j->rate.end - j->rate.start);
        if (j->last.status != DC_JOB_RUNNING || j->last.paused)
                return 0;
        left = job_rate_remaining(&j->rate, j->last.offset, j->last.len);
        return left == UINT64_MAX ? 0 : j->start_time + (t - j->rate.start) + left;
}

/* Measure at T from j->last; announce the progress properties that changed. */
static void job_measure(Job *j, uint64_t t) {
        const char *changed[5];
        uint64_t rate = j->rate.rate, end = j->expected_end;
        size_t n = 0;

        if (j->last.paused)
                job_rate_pause(&j->rate);
        else
                job_rate_sample(&j->rate, t, j->last.offset);
        j->expected_end = job_expected_end(j, t);
        if (j->last.offset != j->last_offset)
                changed[n++] = "CurrentProgress";
        if (j->last.len != j->last_len)
                changed[n++] = "TotalProgress";
        if (j->rate.rate != rate)
                changed[n++] = "Rate";
        if (j->expected_end != end)
                changed[n++] = "ExpectedEndTime";
        changed[n] = NULL;
        j->last_offset = j->last.offset;
        j->last_len = j->last.len;
        if (n > 0)
                job_send_changed(j, (char **) changed);
}

static void job_drain(Job *j) {
        struct dc_job_event ev;
        Manager *mgr = j->mgr;

        while (dc_job_next_event(j->dj, &ev) > 0) {
                uint64_t t = job_rate_now();
                dc_job_get_info(j->dj, &j->last);
                if (ev.kind == DC_EV_COMPLETED || ev.kind == DC_EV_CANCELLED)
                        job_rate_end(&j->rate, t, ev.offset);
                job_measure(j, t);
                if (ev.kind == DC_EV_STATUS)
                        j->status = ev.status;
                job_send_event(j, &ev);
                if (ev.kind == DC_EV_COMPLETED || ev.kind == DC_EV_CANCELLED) {
                        log_outcome(j, &ev);
                        free(j->outcome);
                        j->outcome = strdup(ev.kind == DC_EV_CANCELLED ? "cancelled" : ev.error);
                        j->cancelled = ev.kind == DC_EV_CANCELLED;
                        j->done_bytes = ev.copied; /* (not the offset: an incremental skips most) */
                }
                if (ev.kind == DC_EV_ERROR)
                        log_fields(LOG_WARNING, (const char *const[]){ "DISKCHAIN_JOB", j->id, NULL },
                                   "job '%s': I/O error on %s, action %s: %s", j->id, ev.operation, ev.action,
                                   j->last.error);
                if (ev.kind == DC_EV_STATUS && ev.status == DC_JOB_CONCLUDED) {
                        job_release(j); /* the images are closed: free them for others, read them again */
                        plans_job_concluded(mgr, j->id, j->outcome && *j->outcome ? j->outcome : NULL,
                                            j->cancelled, j->done_bytes);
                }
                if (ev.kind == DC_EV_STATUS && ev.status == DC_JOB_NULL) {
                        job_send_removed(j);
                        g_hash_table_remove(mgr->jobs, j->id); /* frees j */
                        return;
                }
        }
}

static int on_job_events(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        Manager *mgr = userdata;
        g_autoptr(GPtrArray) all = g_ptr_array_new();
        GHashTableIter it;
        uint64_t n;
        Job *j;

        (void) !read(fd, &n, sizeof n);
        g_hash_table_iter_init(&it, mgr->jobs);
        while (g_hash_table_iter_next(&it, NULL, (void **) &j))
                g_ptr_array_add(all, j);
        for (guint i = 0; i < all->len; i++)
                job_drain(all->pdata[i]);
        /* a pivot through an export's disk moved its clients to a new active layer */
        exports_follow(mgr);
        return 0;
}

static int on_progress(sd_event_source *s, uint64_t usec, void *userdata) {
        Manager *mgr = userdata;
        uint64_t t = job_rate_now();
        GHashTableIter it;
        Job *j;

        g_hash_table_iter_init(&it, mgr->jobs);
        while (g_hash_table_iter_next(&it, NULL, (void **) &j)) {
                bool synced = j->last.actively_synced;
                dc_job_get_info(j->dj, &j->last);
                if (synced != j->last.actively_synced)
                        job_send_changed(j, (char *[]){ "ActivelySynced", NULL });
                job_measure(j, t);
        }
        /* tick only while there are jobs, so an idle daemon can time out */
        if (g_hash_table_size(mgr->jobs) > 0) {
                (void) sd_event_source_set_time_relative(s, 250000);
                (void) sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
        }
        return 0;
}

static void job_notify(void *userdata) {
        Manager *mgr = userdata;
        uint64_t one = 1;
        (void) !write(mgr->job_fd, &one, sizeof one);
}

int jobs_setup(Manager *mgr) {
        int r;

        mgr->jobs = g_hash_table_new_full(g_str_hash, g_str_equal, NULL, job_free_void);
        mgr->job_ids = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
        mgr->job_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (mgr->job_fd < 0)
                return -errno;
        r = sd_event_add_io(mgr->event, &mgr->job_source, mgr->job_fd, EPOLLIN, on_job_events, mgr);
        if (r >= 0)
                r = sd_event_add_time_relative(mgr->event, &mgr->progress_timer, CLOCK_MONOTONIC, 250000, 50000,
                                               on_progress, mgr);
        if (r >= 0)
                r = sd_event_source_set_enabled(mgr->progress_timer, SD_EVENT_OFF);
        return r;
}

void jobs_free(Manager *mgr) {
        GHashTableIter it;
        Job *j;

        if (mgr->jobs) {
                /* shutting down: cancel what runs, then wait for each thread here (no workers any more) */
                g_hash_table_iter_init(&it, mgr->jobs);
                while (g_hash_table_iter_next(&it, NULL, (void **) &j)) {
                        (void) dc_job_cancel(j->dj, true);
                        j->dj = dc_job_free(j->dj);
                }
                g_hash_table_destroy(mgr->jobs);
        }
        if (mgr->job_ids)
                g_hash_table_destroy(mgr->job_ids);
        sd_event_source_disable_unref(mgr->job_source);
        sd_event_source_disable_unref(mgr->progress_timer);
        if (mgr->job_fd >= 0)
                close(mgr->job_fd);
}

/* Publish a started job: the id, the claims on PATHS and the target's place are the caller's reservations, now the Job's. */
static int job_register(Manager *mgr, dc_job *dj, uint64_t started, uid_t uid, const char *chain_object,
                 const char *top, const char *base, const char *target, char **paths, Job **ret) {
        Job *j = calloc(1, sizeof *j);
        int r;

        if (!j)
                return -ENOMEM;
        j->mgr = mgr;
        j->dj = dj;
        j->id = strdup(dc_job_id(dj));
        r = sd_bus_path_encode(JOB_PREFIX, j->id, &j->object);
        j->chain_object = strdup(chain_object);
        j->top = strdup(top ? top : "");
        j->base = strdup(base ? base : "");
        j->target = strdup(target ? target : "");
        j->paths = g_strdupv(paths);
        j->type = dc_job_type(dj);
        j->status = DC_JOB_CREATED;
        j->uid = uid;
        j->start_time = now_usec(CLOCK_REALTIME) - (job_rate_now() - started);
        job_rate_start(&j->rate, started);
        dc_job_get_info(dj, &j->last);
        if (r < 0) {
                /* not published: the reservations stay the caller's, the job too */
                job_struct_free(j);
                return r;
        }
        g_hash_table_insert(mgr->jobs, j->id, j);
        if (g_hash_table_size(mgr->jobs) == 1) {
                (void) sd_event_source_set_time_relative(mgr->progress_timer, 250000);
                (void) sd_event_source_set_enabled(mgr->progress_timer, SD_EVENT_ONESHOT);
        }
        job_send_added(j);
        model_changed(mgr, paths); /* InUse of the images */
        job_notify(mgr);
        *ret = j;
        return 0;
}

/* --- starting jobs ----------------------------------------------------------- */

JobStart *job_start_new(Manager *mgr, int type, Image *active, GPtrArray *layers) {
        JobStart *s = calloc(1, sizeof *s);
        GPtrArray *e;

        if (!s)
                return NULL;
        s->mgr = mgr;
        s->type = type;
        e = g_ptr_array_new();
        for (guint i = 0; i < layers->len; i++)
                g_ptr_array_add(e, g_strdup(((Image *) layers->pdata[i])->path));
        g_ptr_array_add(e, NULL);
        s->expect = (char **) g_ptr_array_free(e, FALSE);
        s->chain_object = chain_object_path(active->path);
        return s;
}

/* A pivot of the job's is recorded in the registry: that record is its commit point. */
static int job_pivoted(void *userdata, const char *new_top, const char *const *dropped) {
        Manager *mgr = userdata;
        return registry_pivoted(mgr->registry, new_top, dropped);
}
static void job_start_release(JobStart *s) {
        Manager *mgr = s->mgr;

        if (!s->reserved)
                return;
        if (claims_release(mgr->claims, s->id, s->paths, s->target) && !s->remote)
                model_changed(mgr, (char *[]){ s->target, NULL });
        g_hash_table_remove(mgr->job_ids, s->id);
        s->reserved = false;
}

void job_start_free(void *p) {
        JobStart *s = p;
        if (!s)
                return;
        job_start_release(s);
        job_free_later(s->mgr, TAKE_PTR(s->job));
        free(s->id);
        free(s->chain_object);
        free(s->overlay);
        free(s->top);
        free(s->base);
        free(s->backing_file);
        free(s->target);
        free(s->target_backing);
        free(s->bitmap);
        free(s->checkpoint);
        free(s->via);
        dc_disk_unref(s->jo.disk); /* only when the work never ran */
        g_strfreev(s->roots);
        g_strfreev(s->paths);
        g_strfreev(s->expect);
        g_free(s->d_images);
        g_free(s->d_writes);
        g_free(s->d_roots);
        free(s);
}

static int job_connect_unix(void *userdata, const char *path) {
        JobStart *s = userdata;
        return remote_connect_unix_as(s->uid, path);
}

static void job_start_run(Work *w) {
        JobStart *s = w->data;
        struct dc_open_options o = { .roots = (const char *const *) s->roots, .oracle = &w->mgr->oracle,
                                     .max_depth = s->max_depth };
        int r = 0;

        s->jo.id = s->id;
        s->jo.expect_chain = (const char *const *) s->expect;
        if (s->remote || s->remote_source) {
                /* an NBD target: its socket opened with the caller's rights, TLS with the daemon's credentials */
                s->nbd = (struct dc_nbd_client_options){ .connect_unix = job_connect_unix, .userdata = s,
                                                         .tls_certificates = w->mgr->config.remote_tls_certificates,
                                                         .tls_psk_file = w->mgr->config.remote_tls_psk_file };
                s->jo.nbd = &s->nbd;
        }
        if (s->create_target) {
                /* drive-backup and drive-mirror with mode absolute-paths make the target */
                dc_image *src = NULL;
                struct dc_open_options so = o;
                so.no_lock = true;
                r = s->remote_source ? 0 : dc_image_open(s->top, &so, &src);
                if (r >= 0 && s->remote_source) {
                        /* a replica's size as its plan recorded it (the job fails if the export's differs) */
                        s->co.oracle = &w->mgr->oracle;
                        s->co.backing_format = -1;
                        r = dc_image_create(s->target, s->target_size, &s->co, (const char *const *) s->roots);
                } else if (r >= 0) {
                        s->co.oracle = &w->mgr->oracle;
                        s->co.backing = s->target_backing;
                        s->co.backing_format = -1;
                        r = dc_image_create(s->target, dc_image_virtual_size(src), &s->co,
                                            (const char *const *) s->roots);
                        dc_image_close(src);
                }
                if (r >= 0) {
                        int fd = dc_path_open(s->target, (const char *const *) s->roots, O_PATH, 0);
                        s->target_made = fd >= 0 && fstat(fd, &s->target_st) == 0;
                        if (fd >= 0)
                                close(fd);
                }
        }
        if (r >= 0) {
                s->started = job_rate_now();
                if (s->type == DC_JOB_TYPE_STREAM)
                        r = dc_job_stream(s->top, s->base, s->backing_file, &o, &s->jo, &s->job);
                else if (s->type == DC_JOB_TYPE_COMMIT)
                        r = dc_job_commit(s->overlay, s->top, s->base, s->backing_file, &o, &s->jo, &s->job);
                else if (s->type == DC_JOB_TYPE_MIRROR)
                        r = dc_job_mirror(s->top, s->target, &s->mo, &o, &s->jo, &s->job);
                else
                        r = dc_job_backup(s->top, s->target, &s->bo, &o, &s->jo, &s->job);
        }
        /* the job took a reference of its own; ours goes here, off the loop (it may be the last) */
        s->jo.disk = dc_disk_unref(s->jo.disk);
        work_capture_error(w, r);
        if (r < 0 && s->target_made) {
                /* made for this job only: removed relative to its directory, and only if still ours */
                (void) dc_path_unlink(s->target, (const char *const *) s->roots, &s->target_st);
                s->target_made = false;
        }
}

static void job_start_done(Work *w) {
        JobStart *s = w->data;
        Manager *mgr = w->mgr;
        const char *target = s->type == DC_JOB_TYPE_STREAM ? s->top : s->target ? s->target : s->base;
        Job *j;
        int r;

        if (w->r < 0) {
                int e = -w->r;
                log_fields(e == EINVAL || e == ESTALE || e == EBUSY ? LOG_DEBUG : LOG_WARNING,
                           (const char *const[]){ "DISKCHAIN_JOB", s->id, "DISKCHAIN_IMAGE", s->top, NULL },
                           "job '%s' did not start: %s", s->id, w->error ? w->error : strerror(e));
                (void) reply_error_errno(w->m, w->r, w->error);
                return; /* job_start_free releases what was reserved */
        }
        r = job_register(mgr, s->job, s->started, s->uid, s->chain_object, s->top, s->base, target, s->paths,
                         &j);
        if (r < 0) {
                (void) dc_job_cancel(s->job, true);
                (void) sd_bus_reply_method_errorf(w->m, SD_BUS_ERROR_FAILED, "cannot publish the job: %s", strerror(-r));
                return;
        }
        /* the Job owns the job, the id, the claims and the target's place now */
        s->job = NULL;
        s->reserved = false;
        log_fields(LOG_INFO,
                   (const char *const[]){ "DISKCHAIN_JOB", s->id, "DISKCHAIN_JOB_TYPE", dc_job_type_name(s->type),
                                          "DISKCHAIN_IMAGE", s->top, "DISKCHAIN_TARGET", target, NULL },
                   "job '%s' started: %s of '%s'%s%s", s->id, dc_job_type_name(s->type), s->top,
                   target && strcmp(target, s->top) ? " into " : "", target && strcmp(target, s->top) ? target : "");
        (void) sd_bus_reply_method_return(w->m, "o", j->object);
}

/*
 * Reserve S's id, claim PATHS (and S's target) for it and start it off the
 * loop; M, the call that asked, is answered when it started or did not.
 * Returns 1 when S belongs to the work now, < 0 (ERROR set when the call is
 * refused) when it stays the caller's.  Nothing here waits, so no second
 * call can slip in between the checks and the claims.
 */
int job_start(Manager *mgr, sd_bus_message *m, JobStart *s, char **paths, sd_bus_error *error) {
        g_autofree char *busy = NULL;
        Export *exp;
        Work *w;
        int r;

        s->jo.notify = job_notify;
        s->jo.userdata = mgr;
        s->jo.pivoted = job_pivoted;

        /* from here to the work's queue, nothing waits: no second call can slip in between */
        if (job_id_in_use(mgr, s->id))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Job ID '%s' already in use", s->id);
        if (g_hash_table_size(mgr->job_ids) >= mgr->config.max_jobs)
                return sd_bus_error_setf(error, ERROR_PREFIX "LimitsExceeded",
                                         "%u jobs are running or starting already (MaxJobs)",
                                         g_hash_table_size(mgr->job_ids));
        /* a job on an exported chain writes through the export's disk, under its clients' writes */
        exp = export_of_path(mgr, s->expect[0]);
        if (exp && strcmp(exp->active, s->expect[0]) == 0) {
                if (exp->state != EXPORT_LIVE)
                        return sd_bus_error_setf(error, ERROR_PREFIX "Busy", "'%s' is exported as '%s', which is %s",
                                                 s->expect[0], exp->name,
                                                 exp->state == EXPORT_STARTING ? "starting" : "stopping");
                s->via = strdup(exp->name);
        }
        r = claims_take(mgr->claims, s->id, paths, s->target, s->via, &busy);
        if (r < 0)
                return sd_bus_error_set(error, ERROR_PREFIX "Busy", busy);
        w = work_new(mgr, job_start_run, job_start_done, s, NULL);
        if (!w) {
                (void) claims_release(mgr->claims, s->id, paths, s->target);
                return -ENOMEM;
        }
        w->free_data = job_start_free;
        (void) caller_uid(m, &s->uid);
        g_hash_table_add(mgr->job_ids, g_strdup(s->id));
        s->paths = g_strdupv(paths);
        if (s->target && !s->remote)
                model_changed(mgr, (char *[]){ s->target, NULL });
        s->reserved = true;
        if (exp && s->via)
                s->jo.disk = dc_disk_ref(exp->disk);
        s->roots = g_strdupv(mgr->config.roots);
        s->max_depth = mgr->config.max_depth;
        if (s->create_target)
                w->refresh = g_strdupv((char *[]){ s->target, NULL });
        r = work_submit(w, m);
        return r < 0 ? r : 1;
}
