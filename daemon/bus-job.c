/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * org.diskchain.DiskChain1.Job: one block job, its properties, verbs and the
 * signals that mirror QMP's events one to one.
 *
 * The job runs on its own thread (lib/job.c) and queues events; it wakes the
 * loop through an eventfd, and here, on the loop, each event becomes its
 * signal in the order the job produced it.  Status changes also refresh the
 * properties.  A 250 ms timer samples the progress, measures Rate and
 * ExpectedEndTime from it (job-rate.c) and announces whichever changed; when
 * the job ends, Rate becomes its average and ExpectedEndTime when it ended,
 * announced before BlockJobCompleted or BlockJobCancelled, so a client that
 * follows the signals has the final numbers when it learns the outcome.
 * A job whose status reaches null leaves the bus (InterfacesRemoved), and
 * the chain model is rescanned since its shape may have changed.
 */

#include <errno.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/eventfd.h>
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

void job_free_later(Manager *mgr, dc_job *dj) {
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
        if (claims_release(mgr->claims, j->id, j->paths, *j->target ? j->target : NULL))
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

int job_object_find(sd_bus *bus, const char *path, const char *iface, void *userdata, void **found,
                    sd_bus_error *error) {
        Manager *mgr = userdata;
        _cleanup_free_ char *id = NULL;
        Job *j;

        if (sd_bus_path_decode(path, JOB_PREFIX, &id) <= 0)
                return 0;
        j = g_hash_table_lookup(mgr->jobs, id);
        if (!j)
                return 0;
        *found = j;
        return 1;
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

char *job_new_id(Manager *mgr, const char *type) {
        for (;;) {
                char *id = g_strdup_printf("%s%u", type, mgr->job_counter++);
                if (!g_hash_table_contains(mgr->job_ids, id))
                        return id;
                g_free(id);
        }
}

int caller_uid(sd_bus_message *m, uid_t *ret) {
        sd_bus_creds *creds = NULL;
        int r = sd_bus_query_sender_creds(m, SD_BUS_CREDS_EUID, &creds);
        if (r >= 0)
                r = sd_bus_creds_get_euid(creds, ret);
        sd_bus_creds_unref(creds);
        return r;
}

static const char *io_status_name(int s) {
        return s == DC_IO_FAILED ? "failed" : s == DC_IO_NOSPACE ? "nospace" : "ok";
}

/* --- events -> signals ------------------------------------------------------ */

static void job_emit(Job *j, const struct dc_job_event *ev) {
        const char *type = dc_job_type_name(j->type);
        Manager *mgr = j->mgr;

        switch (ev->kind) {
        case DC_EV_STATUS:
                j->status = ev->status;
                (void) sd_bus_emit_signal(mgr->bus, j->object, IFACE_JOB, "JobStatusChange", "ss", j->id,
                                          dc_job_status_name(ev->status));
                (void) sd_bus_emit_properties_changed(mgr->bus, j->object, IFACE_JOB, "Status", "Paused", "Ready",
                                                      "Busy", "IoStatus", "Error", "ActivelySynced", NULL);
                break;
        case DC_EV_READY:
                (void) sd_bus_emit_signal(mgr->bus, j->object, IFACE_JOB, "BlockJobReady", "ssttt", type, j->id,
                                          ev->len, ev->offset, ev->speed);
                break;
        case DC_EV_PENDING:
                (void) sd_bus_emit_signal(mgr->bus, j->object, IFACE_JOB, "BlockJobPending", "ss", type, j->id);
                break;
        case DC_EV_COMPLETED:
                (void) sd_bus_emit_signal(mgr->bus, j->object, IFACE_JOB, "BlockJobCompleted", "ssttts", type, j->id,
                                          ev->len, ev->offset, ev->speed, ev->error);
                break;
        case DC_EV_CANCELLED:
                (void) sd_bus_emit_signal(mgr->bus, j->object, IFACE_JOB, "BlockJobCancelled", "ssttt", type, j->id,
                                          ev->len, ev->offset, ev->speed);
                break;
        case DC_EV_ERROR:
                (void) sd_bus_emit_signal(mgr->bus, j->object, IFACE_JOB, "BlockJobError", "sss", j->id,
                                          ev->operation, ev->action);
                (void) sd_bus_emit_properties_changed(mgr->bus, j->object, IFACE_JOB, "IoStatus", "Error", NULL);
                break;
        default:
                break;
        }
}

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
                (void) sd_bus_emit_properties_changed_strv(j->mgr->bus, j->object, IFACE_JOB,
                                                           (char **) changed);
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
                job_emit(j, &ev);
                if (ev.kind == DC_EV_COMPLETED || ev.kind == DC_EV_CANCELLED)
                        log_outcome(j, &ev);
                if (ev.kind == DC_EV_ERROR)
                        log_fields(LOG_WARNING, (const char *const[]){ "DISKCHAIN_JOB", j->id, NULL },
                                   "job '%s': I/O error on %s, action %s: %s", j->id, ev.operation, ev.action,
                                   j->last.error);
                if (ev.kind == DC_EV_STATUS && ev.status == DC_JOB_CONCLUDED)
                        job_release(j); /* the images are closed: free them for others, read them again */
                if (ev.kind == DC_EV_STATUS && ev.status == DC_JOB_NULL) {
                        (void) sd_bus_emit_object_removed(mgr->bus, j->object);
                        (void) sd_bus_emit_properties_changed(mgr->bus, j->chain_object, IFACE_CHAIN, "Jobs", NULL);
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
                        (void) sd_bus_emit_properties_changed(mgr->bus, j->object, IFACE_JOB, "ActivelySynced", NULL);
                job_measure(j, t);
        }
        /* tick only while there are jobs, so an idle daemon can time out */
        if (g_hash_table_size(mgr->jobs) > 0) {
                (void) sd_event_source_set_time_relative(s, 250000);
                (void) sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
        }
        return 0;
}

void job_notify(void *userdata) {
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
int job_register(Manager *mgr, dc_job *dj, uint64_t started, uid_t uid, const char *chain_object,
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
        (void) sd_bus_emit_object_added(mgr->bus, j->object);
        (void) sd_bus_emit_properties_changed(mgr->bus, chain_object, IFACE_CHAIN, "Jobs", NULL);
        model_changed(mgr, paths); /* InUse of the images */
        job_notify(mgr);
        *ret = j;
        return 0;
}

/* --- query-block-jobs ------------------------------------------------------- */

int append_job_infos(Manager *mgr, sd_bus_message *reply) {
        GHashTableIter it;
        Job *j;
        int r = sd_bus_message_open_container(reply, 'a', "a{sv}");

        g_hash_table_iter_init(&it, mgr->jobs);
        while (r >= 0 && g_hash_table_iter_next(&it, NULL, (void **) &j)) {
                struct dc_job_info i;
                dc_job_get_info(j->dj, &i);
                r = sd_bus_message_open_container(reply, 'a', "{sv}");
                if (r >= 0)
                        r = sd_bus_message_append(
                                reply, "{sv}{sv}{sv}{sv}{sv}{sv}{sv}{sv}{sv}{sv}{sv}{sv}", "type", "s",
                                dc_job_type_name(j->type), "device", "s", j->id, "len", "t", i.len, "offset", "t",
                                i.offset, "busy", "b", i.busy, "paused", "b", i.paused, "speed", "t", i.speed,
                                "io-status", "s", io_status_name(i.io_status), "ready", "b", i.ready, "status", "s",
                                dc_job_status_name(i.status), "auto-finalize", "b", i.auto_finalize, "auto-dismiss",
                                "b", i.auto_dismiss);
                if (r >= 0 && i.error[0] && (i.status == DC_JOB_CONCLUDED || i.status == DC_JOB_ABORTING))
                        r = sd_bus_message_append(reply, "{sv}", "error", "s", i.error);
                if (r >= 0)
                        r = sd_bus_message_close_container(reply);
        }
        if (r >= 0)
                r = sd_bus_message_close_container(reply);
        return r;
}

/* --- properties ------------------------------------------------------------- */

#define JOB ((Job *) userdata)

static int property_get_string(sd_bus *bus, const char *path, const char *iface, const char *prop,
                               sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        struct dc_job_info i;
        const char *v = "";

        dc_job_get_info(JOB->dj, &i);
        if (strcmp(prop, "Id") == 0 || strcmp(prop, "Device") == 0)
                v = JOB->id;
        else if (strcmp(prop, "Type") == 0)
                v = dc_job_type_name(JOB->type);
        else if (strcmp(prop, "Status") == 0)
                v = dc_job_status_name(JOB->status);
        else if (strcmp(prop, "Top") == 0)
                v = JOB->top;
        else if (strcmp(prop, "Base") == 0)
                v = JOB->base;
        else if (strcmp(prop, "Target") == 0)
                v = JOB->target;
        else if (strcmp(prop, "IoStatus") == 0)
                v = io_status_name(i.io_status);
        else if (strcmp(prop, "Error") == 0)
                return sd_bus_message_append(reply, "s",
                                             JOB->status == DC_JOB_CONCLUDED || JOB->status == DC_JOB_ABORTING ? i.error
                                                                                                               : "");
        return sd_bus_message_append(reply, "s", v);
}

static int property_get_u64(sd_bus *bus, const char *path, const char *iface, const char *prop,
                            sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        struct dc_job_info i;
        uint64_t v = 0;

        dc_job_get_info(JOB->dj, &i);
        if (strcmp(prop, "CurrentProgress") == 0)
                v = i.offset;
        else if (strcmp(prop, "TotalProgress") == 0)
                v = i.len;
        else if (strcmp(prop, "Speed") == 0)
                v = i.speed;
        return sd_bus_message_append(reply, "t", v);
}

static int property_get_bool(sd_bus *bus, const char *path, const char *iface, const char *prop,
                             sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        struct dc_job_info i;
        bool v = false;

        dc_job_get_info(JOB->dj, &i);
        if (strcmp(prop, "Busy") == 0)
                v = i.busy;
        else if (strcmp(prop, "Paused") == 0)
                v = i.paused;
        else if (strcmp(prop, "Ready") == 0)
                v = i.ready;
        else if (strcmp(prop, "AutoFinalize") == 0)
                v = i.auto_finalize;
        else if (strcmp(prop, "AutoDismiss") == 0)
                v = i.auto_dismiss;
        else if (strcmp(prop, "ActivelySynced") == 0)
                v = i.actively_synced;
        return sd_bus_message_append(reply, "b", v);
}

static int property_get_chain(sd_bus *bus, const char *path, const char *iface, const char *prop,
                              sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "o", JOB->chain_object);
}

static int property_get_uid(sd_bus *bus, const char *path, const char *iface, const char *prop,
                            sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "u", (uint32_t) JOB->uid);
}

/* --- verbs ---------------------------------------------------------------- */

static int verb_authorize(sd_bus_message *m, Job *j, const char *verb, sd_bus_error *error) {
        const char *const d[] = { "path", j->top, "job-id", j->id, "operation", verb, NULL };
        uid_t uid = 0;
        int r = caller_uid(m, &uid);
        if (r < 0)
                return r;
        return polkit_verify(j->mgr, m,
                             uid == j->uid ? "org.diskchain.manage-job" : "org.diskchain.manage-job-other-user", d,
                             error);
}

static int verb_result(sd_bus_message *m, int r, sd_bus_error *error) {
        if (r < 0)
                return bus_error_from_errno(error, r, dc_get_error());
        return sd_bus_reply_method_return(m, NULL);
}

#define VERB_METHOD(name, verb, call)                                                         \
        static int method_##name(sd_bus_message *m, void *userdata, sd_bus_error *error) {    \
                int r = verb_authorize(m, JOB, verb, error);                                  \
                if (r <= 0)                                                                   \
                        return r < 0 ? r : 1;                                                 \
                return verb_result(m, call, error);                                           \
        }

VERB_METHOD(pause, "pause", dc_job_pause(JOB->dj))
VERB_METHOD(resume, "resume", dc_job_resume(JOB->dj))
VERB_METHOD(complete, "complete", dc_job_complete(JOB->dj))
VERB_METHOD(finalize, "finalize", dc_job_finalize(JOB->dj))
VERB_METHOD(dismiss, "dismiss", dc_job_dismiss(JOB->dj))

static int method_set_speed(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        uint64_t speed;
        int r = sd_bus_message_read(m, "t", &speed);
        if (r < 0)
                return r;
        r = verb_authorize(m, JOB, "set-speed", error);
        if (r <= 0)
                return r < 0 ? r : 1;
        r = dc_job_set_speed(JOB->dj, speed);
        if (r >= 0)
                (void) sd_bus_emit_properties_changed(JOB->mgr->bus, JOB->object, IFACE_JOB, "Speed", NULL);
        return verb_result(m, r, error);
}

static int method_cancel(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        int force;
        int r = sd_bus_message_read(m, "b", &force);
        if (r < 0)
                return r;
        r = verb_authorize(m, JOB, "cancel", error);
        if (r <= 0)
                return r < 0 ? r : 1;
        return verb_result(m, dc_job_cancel(JOB->dj, force), error);
}

static int method_change(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        static const char *const allowed[] = { "copy-mode", NULL };
        static const char *const copy_modes[] = { "background", "write-blocking", NULL };
        g_autoptr(GHashTable) opts = NULL;
        int mode = -1;
        int r = parse_options(m, allowed, &opts, error);
        if (r < 0)
                return r;
        r = opt_enum(opts, "copy-mode", copy_modes, &mode, error);
        if (r < 0)
                return r;
        r = verb_authorize(m, JOB, "change", error);
        if (r <= 0)
                return r < 0 ? r : 1;
        if (JOB->type != DC_JOB_TYPE_MIRROR)
                return sd_bus_error_setf(error, ERROR_PREFIX "NotSupported",
                                         "Job '%s' of type '%s' has no options to change", JOB->id,
                                         dc_job_type_name(JOB->type));
        if (mode < 0)
                return sd_bus_reply_method_return(m, NULL); /* nothing asked */
        r = dc_job_change_copy_mode(JOB->dj, mode ? DC_COPY_MODE_WRITE_BLOCKING : DC_COPY_MODE_BACKGROUND);
        if (r == -EINVAL)
                return sd_bus_error_set(error, SD_BUS_ERROR_INVALID_ARGS, dc_get_error());
        return verb_result(m, r, error);
}

#define JPROP(name, sig, getter) SD_BUS_PROPERTY(name, sig, getter, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE)

const sd_bus_vtable job_vtable[] = {
        SD_BUS_VTABLE_START(0),
        SD_BUS_PROPERTY("Id", "s", property_get_string, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Type", "s", property_get_string, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        JPROP("Status", "s", property_get_string),
        SD_BUS_PROPERTY("Device", "s", property_get_string, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Chain", "o", property_get_chain, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Top", "s", property_get_string, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Base", "s", property_get_string, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Target", "s", property_get_string, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        JPROP("CurrentProgress", "t", property_get_u64),
        JPROP("TotalProgress", "t", property_get_u64),
        JPROP("Speed", "t", property_get_u64),
        JPROP("Busy", "b", property_get_bool),
        JPROP("Paused", "b", property_get_bool),
        JPROP("Ready", "b", property_get_bool),
        JPROP("IoStatus", "s", property_get_string),
        JPROP("Error", "s", property_get_string),
        SD_BUS_PROPERTY("AutoFinalize", "b", property_get_bool, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("AutoDismiss", "b", property_get_bool, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        JPROP("ActivelySynced", "b", property_get_bool),
        SD_BUS_PROPERTY("StartedByUID", "u", property_get_uid, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("StartTime", "t", NULL, offsetof(Job, start_time), SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Rate", "t", NULL, offsetof(Job, rate.rate), SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("ExpectedEndTime", "t", NULL, offsetof(Job, expected_end),
                        SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_METHOD("Pause", NULL, NULL, method_pause, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD("Resume", NULL, NULL, method_resume, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("SetSpeed", SD_BUS_ARGS("t", speed), SD_BUS_NO_RESULT, method_set_speed,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Change", SD_BUS_ARGS("a{sv}", options), SD_BUS_NO_RESULT, method_change,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD("Complete", NULL, NULL, method_complete, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Cancel", SD_BUS_ARGS("b", force), SD_BUS_NO_RESULT, method_cancel,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD("Finalize", NULL, NULL, method_finalize, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD("Dismiss", NULL, NULL, method_dismiss, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_SIGNAL_WITH_ARGS("JobStatusChange", SD_BUS_ARGS("s", id, "s", status), 0),
        SD_BUS_SIGNAL_WITH_ARGS("BlockJobReady", SD_BUS_ARGS("s", type, "s", device, "t", len, "t", offset, "t", speed),
                                0),
        SD_BUS_SIGNAL_WITH_ARGS("BlockJobPending", SD_BUS_ARGS("s", type, "s", id), 0),
        SD_BUS_SIGNAL_WITH_ARGS("BlockJobCompleted",
                                SD_BUS_ARGS("s", type, "s", device, "t", len, "t", offset, "t", speed, "s", error), 0),
        SD_BUS_SIGNAL_WITH_ARGS("BlockJobCancelled",
                                SD_BUS_ARGS("s", type, "s", device, "t", len, "t", offset, "t", speed), 0),
        SD_BUS_SIGNAL_WITH_ARGS("BlockJobError", SD_BUS_ARGS("s", device, "s", operation, "s", action), 0),
        SD_BUS_VTABLE_END,
};
