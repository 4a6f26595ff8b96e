/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * org.diskchain.DiskChain1.Plan objects (/org/diskchain/DiskChain1/plan/NAME)
 * and the Manager's plan methods: the bus side of plan.c and plan-run.c.
 * Creating, changing and deleting a plan writes its file on a worker and
 * then asks systemd (when it runs) to reload, so that the generator gives
 * the plan's timer its new schedule.
 */

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <unistd.h>

#include "daemon.h"

#define PLAN ((Plan *) userdata)

int plan_object_find(sd_bus *bus, const char *path, const char *iface, void *userdata, void **found,
                     sd_bus_error *error) {
        Manager *mgr = userdata;
        _cleanup_free_ char *name = NULL;
        Plan *p;

        if (sd_bus_path_decode(path, PLAN_PREFIX, &name) <= 0)
                return 0;
        p = g_hash_table_lookup(mgr->plans, name);
        if (!p)
                return 0;
        *found = p;
        return 1;
}

void plan_send_changed(Plan *p, char **props) {
        char *v[8];
        size_t n = 0;

        for (char **x = props; x && *x && n < 7; x++)
                v[n++] = *x;
        v[n] = NULL;
        if (n)
                (void) sd_bus_emit_properties_changed_strv(p->mgr->bus, p->object, IFACE_PLAN, v);
}

void plan_send_added(Plan *p) {
        (void) sd_bus_emit_object_added(p->mgr->bus, p->object);
}

void plan_send_removed(Plan *p) {
        (void) sd_bus_emit_object_removed(p->mgr->bus, p->object);
}

/* --- properties ---------------------------------------------------------------------------------------- */

static int get_string(sd_bus *bus, const char *path, const char *iface, const char *prop, sd_bus_message *reply,
                      void *userdata, sd_bus_error *error) {
        Plan *p = PLAN;
        const char *v = strcmp(prop, "Name") == 0          ? p->name
                        : strcmp(prop, "Chain") == 0       ? p->set.chain
                        : strcmp(prop, "Destination") == 0 ? p->set.destination
                        : strcmp(prop, "Schedule") == 0    ? p->set.schedule
                        : strcmp(prop, "Level") == 0       ? plan_level_name(p->set.level)
                        : strcmp(prop, "Bitmap") == 0      ? p->set.bitmap
                        : strcmp(prop, "Mode") == 0        ? (p->set.pull ? "pull" : "push")
                                                           : p->last_result;
        return sd_bus_message_append(reply, "s", v ? v : "");
}

static int get_u32(sd_bus *bus, const char *path, const char *iface, const char *prop, sd_bus_message *reply,
                   void *userdata, sd_bus_error *error) {
        Plan *p = PLAN;
        return sd_bus_message_append(reply, "u", strcmp(prop, "FullEvery") == 0 ? p->set.full_every
                                                                                 : p->set.randomized_delay);
}

static int get_u64(sd_bus *bus, const char *path, const char *iface, const char *prop, sd_bus_message *reply,
                   void *userdata, sd_bus_error *error) {
        Plan *p = PLAN;
        return sd_bus_message_append(reply, "t", strcmp(prop, "Speed") == 0     ? p->set.speed
                                                 : strcmp(prop, "LastRun") == 0 ? p->last_run
                                                                                : p->next_run);
}

static int get_bool(sd_bus *bus, const char *path, const char *iface, const char *prop, sd_bus_message *reply,
                    void *userdata, sd_bus_error *error) {
        Plan *p = PLAN;
        return sd_bus_message_append(reply, "b", strcmp(prop, "Compress") == 0        ? p->set.compress
                                                 : strcmp(prop, "PruneAfterRun") == 0 ? p->set.prune
                                                                                      : p->running || p->busy);
}

static int get_job(sd_bus *bus, const char *path, const char *iface, const char *prop, sd_bus_message *reply,
                   void *userdata, sd_bus_error *error) {
        Plan *p = PLAN;
        _cleanup_free_ char *o = NULL;

        if (p->job_id && sd_bus_path_encode(JOB_PREFIX, p->job_id, &o) < 0)
                return -ENOMEM;
        return sd_bus_message_append(reply, "o", o ? o : "/");
}

static int get_retention(sd_bus *bus, const char *path, const char *iface, const char *prop, sd_bus_message *reply,
                         void *userdata, sd_bus_error *error) {
        Plan *p = PLAN;
        int r = sd_bus_message_open_container(reply, 'a', "{su}");

        for (int i = 0; r >= 0 && i < KEEP_N; i++)
                if (p->set.keep[i])
                        r = sd_bus_message_append(reply, "{su}", plan_keep_keys[i], p->set.keep[i]);
        return r < 0 ? r : sd_bus_message_close_container(reply);
}

/* (id, time µs, level, file, size, state, base id) */
static int get_points(sd_bus *bus, const char *path, const char *iface, const char *prop, sd_bus_message *reply,
                      void *userdata, sd_bus_error *error) {
        Plan *p = PLAN;
        int r = sd_bus_message_open_container(reply, 'a', "(stsstss)");

        for (guint i = 0; r >= 0 && i < p->points->len; i++) {
                Point *x = p->points->pdata[i];
                r = sd_bus_message_append(reply, "(stsstss)", x->id, x->time, plan_level_name(x->level), x->file,
                                          x->size, plan_state_name(x->state), x->base ? x->base : "");
        }
        return r < 0 ? r : sd_bus_message_close_container(reply);
}

/* --- settings from a{sv} -------------------------------------------------------------------------------- */

static const char *const setting_keys[] = { "chain", "destination", "schedule", "randomized-delay-sec", "level",
                                            "full-every", "compress", "bitmap", "speed", "prune-after-run",
                                            "keep-last", "keep-hourly", "keep-daily", "keep-weekly", "keep-monthly",
                                            "keep-yearly", "mode", NULL };

/* OPTS over S (what they name changes); paths resolved in the roots. */
static int settings_apply(Manager *mgr, const char *name, GHashTable *opts, PlanSettings *s, sd_bus_error *error) {
        const char *v = NULL;
        uint64_t u;
        bool b;
        int r;

        if ((r = opt_string(opts, "chain", &v, error)) < 0)
                return r;
        if (r > 0) {
                _cleanup_free_ char *abs = NULL;
                r = manager_resolve_path(mgr, v, &abs, error);
                if (r < 0)
                        return r;
                free(s->chain);
                s->chain = TAKE_PTR(abs);
        }
        if ((r = opt_string(opts, "destination", &v, error)) < 0)
                return r;
        if (r > 0) {
                free(s->destination);
                if (dc_nbd_uri_is(v))
                        s->destination = strdup(v); /* a replica's export (checked, normalised later) */
                else if (v[0] == '/')
                        s->destination = g_canonicalize_filename(v, "/");
                else /* relative to the first root */
                        s->destination = g_canonicalize_filename(v, mgr->config.roots[0]);
        }
        if ((r = opt_string(opts, "schedule", &v, error)) < 0)
                return r;
        if (r > 0) {
                free(s->schedule);
                s->schedule = strdup(v);
        }
        if ((r = opt_string(opts, "bitmap", &v, error)) < 0)
                return r;
        if (r > 0) {
                free(s->bitmap);
                s->bitmap = strdup(v);
        }
        if ((r = opt_string(opts, "mode", &v, error)) < 0)
                return r;
        if (r > 0 && strcmp(v, "push") != 0 && strcmp(v, "pull") != 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "plan '%s': mode '%s' is not push or pull",
                                         name, v);
        if (r > 0)
                s->pull = strcmp(v, "pull") == 0;
        if ((r = opt_string(opts, "level", &v, error)) < 0)
                return r;
        if (r > 0 && (s->level = plan_level_from(v)) < 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "plan '%s': level '%s' is not one of full, incremental, differential, auto",
                                         name, v);
        if ((r = opt_uint(opts, "full-every", &u, error)) < 0)
                return r;
        if (r > 0)
                s->full_every = (unsigned) MIN(u, (uint64_t) UINT32_MAX);
        if ((r = opt_uint(opts, "randomized-delay-sec", &u, error)) < 0)
                return r;
        if (r > 0)
                s->randomized_delay = (unsigned) MIN(u, (uint64_t) UINT32_MAX);
        if ((r = opt_uint(opts, "speed", &u, error)) < 0)
                return r;
        if (r > 0)
                s->speed = u;
        if ((r = opt_bool(opts, "compress", &b, error)) < 0)
                return r;
        if (r > 0)
                s->compress = b;
        if ((r = opt_bool(opts, "prune-after-run", &b, error)) < 0)
                return r;
        if (r > 0)
                s->prune = b;
        for (int i = 0; i < KEEP_N; i++) {
                if ((r = opt_uint(opts, setting_keys[10 + i], &u, error)) < 0)
                        return r;
                if (r > 0)
                        s->keep[i] = (unsigned) MIN(u, (uint64_t) 1000000);
        }
        return 0;
}

static void settings_copy(const PlanSettings *from, PlanSettings *to) {
        *to = *from;
        to->chain = from->chain ? strdup(from->chain) : NULL;
        to->destination = from->destination ? strdup(from->destination) : NULL;
        to->schedule = from->schedule ? strdup(from->schedule) : NULL;
        to->bitmap = from->bitmap ? strdup(from->bitmap) : NULL;
}

/* --- writing the plan file (a worker) -------------------------------------------------------------------- */

typedef struct PlanWrite {
        char *name, *dir, *path, *text, *schedule, *catalog;
        char *catalog_text;   /* a new plan's catalog as its file holds it (read on the worker) */
        PlanSettings set;
        bool remove;
        uint64_t next_run;
} PlanWrite;

static void plan_write_free(void *d) {
        PlanWrite *w = d;
        free(w->name);
        free(w->dir);
        free(w->path);
        free(w->text);
        free(w->schedule);
        free(w->catalog);
        free(w->catalog_text);
        plan_settings_clear(&w->set);
        free(w);
}

/*
 * When SPEC next elapses after now (µs since the epoch), as systemd reads
 * it (systemd-analyze calendar): 0 when it cannot say; -EINVAL when SPEC
 * is no calendar event.
 */
static int64_t calendar_next(const char *spec) {
        g_autofree char *out = NULL;
        const char *argv[] = { "systemd-analyze", "calendar", "--iterations=1", spec, NULL };
        g_autoptr(GDateTime) dt = NULL;
        int status = 0;
        char *l;
        int y, mo, d, h, mi, s;

        if (!g_spawn_sync(NULL, (char **) argv, NULL, G_SPAWN_SEARCH_PATH | G_SPAWN_STDERR_TO_DEV_NULL, NULL, NULL,
                          &out, NULL, &status, NULL))
                return 0; /* no systemd-analyze here */
        if (!g_spawn_check_wait_status(status, NULL))
                return -EINVAL;
        /* "(in UTC): ..." follows "Next elapse: ..." unless the local time is UTC already */
        l = out ? strstr(out, "(in UTC): ") : NULL;
        if (l)
                l += 10;
        else if (out && (l = strstr(out, "Next elapse: ")) && strstr(l, " UTC\n"))
                l += 13;
        if (!l || sscanf(l, "%*s %d-%d-%d %d:%d:%d", &y, &mo, &d, &h, &mi, &s) != 6)
                return 0;
        dt = g_date_time_new_utc(y, mo, d, h, mi, s);
        return dt ? g_date_time_to_unix(dt) * 1000000 : 0;
}

static void plan_write_run(Work *w) {
        PlanWrite *pw = w->data;
        g_autoptr(GError) err = NULL;
        int64_t next = 0;
        int r = 0;

        if (!pw->remove) {
                next = calendar_next(pw->schedule);
                if (next == -EINVAL)
                        r = dc_set_error(EINVAL, "plan '%s': Schedule=%s is no calendar event systemd understands (see "
                                             "systemd.time(7), systemd-analyze calendar)", pw->name, pw->schedule);
                else if (g_mkdir_with_parents(pw->dir, 0755) < 0)
                        r = dc_set_error(errno, "cannot make '%s': %m", pw->dir);
                else if (!g_file_set_contents_full(pw->path, pw->text, -1,
                                                   G_FILE_SET_CONTENTS_CONSISTENT | G_FILE_SET_CONTENTS_DURABLE, 0644,
                                                   &err))
                        r = dc_set_error(EIO, "cannot write '%s': %s", pw->path, err->message);
                pw->next_run = next > 0 ? (uint64_t) next : 0;
                if (r >= 0 && pw->catalog)
                        (void) g_file_get_contents(pw->catalog, &pw->catalog_text, NULL, NULL);
        } else {
                if (unlink(pw->path) < 0 && errno != ENOENT)
                        r = dc_set_error(errno, "cannot remove '%s': %m", pw->path);
                else
                        (void) unlink(pw->catalog);
        }
        work_capture_error(w, r);
}

/* systemd re-runs the generator, so the plan's timer has its new schedule (nothing when systemd is not there). */
static void systemd_reload(Manager *mgr) {
        (void) sd_bus_call_method_async(mgr->bus, NULL, "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                                        "org.freedesktop.systemd1.Manager", "Reload", NULL, NULL, NULL);
}

static void next_run_done(Work *w) {
        PlanWrite *pw = w->data;
        Plan *p = g_hash_table_lookup(w->mgr->plans, pw->name);
        if (p && p->next_run != pw->next_run) {
                p->next_run = pw->next_run;
                plan_send_changed(p, (char *[]){ "NextRun", NULL });
        }
}

static void next_run_run(Work *w) {
        PlanWrite *pw = w->data;
        int64_t next = calendar_next(pw->schedule);
        pw->next_run = next > 0 ? (uint64_t) next : 0;
}

/* NextRun from the schedule, on a worker. */
void plan_next_run_refresh(Plan *p) {
        PlanWrite *pw = calloc(1, sizeof *pw);
        pw->name = strdup(p->name);
        pw->schedule = strdup(p->set.schedule);
        (void) work_start(p->mgr, NULL, next_run_run, next_run_done, pw, plan_write_free);
}

static void create_done(Work *w) {
        PlanWrite *pw = w->data;
        Plan *p;

        if (w->r < 0) {
                (void) reply_error_errno(w->m, w->r, w->error);
                return;
        }
        p = g_hash_table_lookup(w->mgr->plans, pw->name);
        if (p) {
                /* changed */
                plan_settings_clear(&p->set);
                p->set = pw->set;
                pw->set = (PlanSettings){ 0 };
                p->next_run = pw->next_run;
                plan_send_changed(p, (char *[]){ "Chain", "Destination", "Schedule", "Level", "Retention", "NextRun",
                                                 NULL });
                plan_send_changed(p, (char *[]){ "FullEvery", "Compress", "Bitmap", "Speed", "PruneAfterRun",
                                                 "RandomizedDelaySec", "Mode", NULL });
                (void) sd_bus_reply_method_return(w->m, NULL);
        } else {
                p = plan_new(w->mgr, pw->name, &pw->set, pw->catalog_text);
                p->next_run = pw->next_run;
                g_hash_table_insert(w->mgr->plans, strdup(p->name), p);
                plan_send_added(p);
                (void) sd_bus_reply_method_return(w->m, "o", p->object);
        }
        log_fields(LOG_INFO, (const char *const[]){ "DISKCHAIN_PLAN", pw->name, NULL }, "plan '%s' written to '%s'",
                   pw->name, pw->path);
        systemd_reload(w->mgr);
}

static int plan_write_start(Manager *mgr, sd_bus_message *m, const char *name, PlanSettings *set, work_fn done) {
        PlanWrite *pw = calloc(1, sizeof *pw);

        pw->name = strdup(name);
        pw->dir = strdup(mgr->config.plans_dir);
        pw->path = g_strdup_printf("%s/%s.conf", mgr->config.plans_dir, name);
        pw->text = plan_settings_format(name, set);
        pw->schedule = strdup(set->schedule);
        pw->catalog = g_hash_table_contains(mgr->plans, name) ? NULL : plan_catalog_path(mgr, name);
        pw->set = *set;
        *set = (PlanSettings){ 0 };
        return work_start(mgr, m, plan_write_run, done, pw, plan_write_free);
}

static int settings_from_call(Manager *mgr, sd_bus_message *m, const char *name, PlanSettings *s,
                              sd_bus_error *error) {
        g_autoptr(GHashTable) opts = NULL;
        g_autofree char *err = NULL;
        Image *img;
        int r;

        r = parse_options(m, setting_keys, &opts, error);
        if (r < 0)
                return r;
        r = settings_apply(mgr, name, opts, s, error);
        if (r < 0)
                return r;
        r = plan_settings_check(mgr, name, s, &err);
        if (r < 0)
                return sd_bus_error_set(error, r == -EPERM ? ERROR_PREFIX "PathNotAllowed" : SD_BUS_ERROR_INVALID_ARGS,
                                        err);
        /* the chain as it is now: an image (0: M waits for the model and comes back) */
        r = model_freshen(mgr, m, (char *[]){ s->chain, NULL }, error);
        if (r <= 0)
                return r < 0 ? r : 0;
        img = model_find(mgr, s->chain);
        if (!img || img->error)
                return sd_bus_error_setf(error, ERROR_PREFIX "NotFound", "plan '%s': '%s' is %s", name, s->chain,
                                         img ? img->error : "not an image in the storage roots");
        return 1;
}

int method_create_plan(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        Manager *mgr = userdata;
        PlanSettings s;
        const char *name;
        int r;

        r = sd_bus_message_read(m, "s", &name);
        if (r < 0)
                return r;
        if (!plan_name_valid(name))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "plan name '%s' must be 1..64 of A-Z a-z 0-9 . _ - (not starting with . or -)",
                                         name);
        if (g_hash_table_contains(mgr->plans, name))
                return sd_bus_error_setf(error, ERROR_PREFIX "Exists", "plan '%s' exists already", name);
        plan_settings_defaults(name, &s);
        r = settings_from_call(mgr, m, name, &s, error);
        if (r > 0)
                r = polkit_verify(mgr, m, "org.diskchain.plan-create",
                                  (const char *const[]){ "plan", name, "chain", s.chain, "destination",
                                                         s.destination, NULL },
                                  error);
        if (r <= 0) {
                plan_settings_clear(&s);
                return r < 0 ? r : 1;
        }
        r = plan_write_start(mgr, m, name, &s, create_done);
        return r < 0 ? r : 1;
}

static int method_change(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        Plan *p = PLAN;
        PlanSettings s;
        int r;

        settings_copy(&p->set, &s);
        r = settings_from_call(p->mgr, m, p->name, &s, error);
        if (r > 0)
                r = polkit_verify(p->mgr, m, "org.diskchain.plan-change",
                                  (const char *const[]){ "plan", p->name, "chain", s.chain, "destination",
                                                         s.destination, NULL },
                                  error);
        if (r <= 0) {
                plan_settings_clear(&s);
                return r < 0 ? r : 1;
        }
        r = plan_write_start(p->mgr, m, p->name, &s, create_done);
        return r < 0 ? r : 1;
}

static void delete_done(Work *w) {
        PlanWrite *pw = w->data;
        Plan *p = g_hash_table_lookup(w->mgr->plans, pw->name);

        if (w->r < 0) {
                (void) reply_error_errno(w->m, w->r, w->error);
                return;
        }
        if (p) {
                plan_send_removed(p);
                g_hash_table_remove(w->mgr->plans, pw->name);
        }
        log_fields(LOG_INFO, (const char *const[]){ "DISKCHAIN_PLAN", pw->name, NULL },
                   "plan '%s' deleted (its backups stay)", pw->name);
        (void) sd_bus_reply_method_return(w->m, NULL);
        systemd_reload(w->mgr);
}

static int method_delete(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        Plan *p = PLAN;
        PlanWrite *pw;
        int r;

        if (p->running || p->busy || p->start_msg)
                return sd_bus_error_setf(error, ERROR_PREFIX "PlanRunning",
                                         "plan '%s' is running (or pruning, or verifying): delete it when it is done",
                                         p->name);
        r = polkit_verify(p->mgr, m, "org.diskchain.plan-delete", (const char *const[]){ "plan", p->name, NULL },
                          error);
        if (r <= 0)
                return r < 0 ? r : 1;
        pw = calloc(1, sizeof *pw);
        pw->name = strdup(p->name);
        pw->path = strdup(p->file);
        pw->catalog = strdup(p->catalog);
        pw->remove = true;
        r = work_start(p->mgr, m, plan_write_run, delete_done, pw, plan_write_free);
        return r < 0 ? r : 1;
}

/* --- the verbs ---------------------------------------------------------------------------------------- */

static int method_run(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        Plan *p = PLAN;
        int r;

        if (p->start_msg != m) {
                r = polkit_verify(p->mgr, m, "org.diskchain.plan-run",
                                  (const char *const[]){ "plan", p->name, "chain", p->set.chain, "destination",
                                                         p->set.destination, NULL },
                                  error);
                if (r <= 0)
                        return r < 0 ? r : 1;
        }
        r = plan_run(p, m, error);
        return r < 0 ? r : 1;
}

static int method_verify(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        static const char *const allowed[] = { "point", NULL };
        g_autoptr(GHashTable) opts = NULL;
        const char *point = NULL;
        Plan *p = PLAN;
        int r;

        if ((r = parse_options(m, allowed, &opts, error)) < 0 || (r = opt_string(opts, "point", &point, error)) < 0)
                return r;
        r = polkit_verify(p->mgr, m, "org.diskchain.plan-verify",
                          (const char *const[]){ "plan", p->name, "point", point ? point : "", NULL }, error);
        if (r <= 0)
                return r < 0 ? r : 1;
        r = plan_verify(p, m, point, error);
        return r < 0 ? r : 1;
}

static int method_prune(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        static const char *const allowed[] = { "dry-run", NULL };
        g_autoptr(GHashTable) opts = NULL;
        bool dry = false;
        Plan *p = PLAN;
        int r;

        if ((r = parse_options(m, allowed, &opts, error)) < 0 || (r = opt_bool(opts, "dry-run", &dry, error)) < 0)
                return r;
        if (!dry) {
                r = polkit_verify(p->mgr, m, "org.diskchain.plan-prune", (const char *const[]){ "plan", p->name, NULL },
                                  error);
                if (r <= 0)
                        return r < 0 ? r : 1;
        }
        r = plan_prune(p, m, dry, error);
        return r < 0 ? r : 1;
}

static int method_restore(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        static const char *const allowed[] = { "format", "live", "name", "chain", NULL };
        static const char *const formats[] = { "qcow2", "raw", NULL };
        g_autoptr(GHashTable) opts = NULL;
        const char *point, *target, *name = NULL;
        int format = 0, r;
        bool live = false, chain = false;
        Plan *p = PLAN;

        r = sd_bus_message_read(m, "ss", &point, &target);
        if (r < 0)
                return r;
        if ((r = parse_options(m, allowed, &opts, error)) < 0 ||
            (r = opt_enum(opts, "format", formats, &format, error)) < 0 ||
            (r = opt_bool(opts, "live", &live, error)) < 0 || (r = opt_string(opts, "name", &name, error)) < 0 ||
            (r = opt_bool(opts, "chain", &chain, error)) < 0)
                return r;
        if (live && chain)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "live and chain do not go together: live copies the backup in, chain leaves "
                                         "it below the new image");
        if (name && !live)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "'name' (of the export) goes with live true");
        r = plan_restore(p, m, point, target, format, live, chain, name, error);
        return r < 0 ? r : 1;
}

int method_list_plans(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        Manager *mgr = userdata;
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        g_auto(GStrv) paths = model_plan_paths(mgr);
        int r = sd_bus_message_new_method_return(m, &reply);

        if (r >= 0)
                r = append_objects(reply, paths);
        return r < 0 ? r : sd_bus_send(NULL, reply, NULL);
}

#define P(name, sig, getter) SD_BUS_PROPERTY(name, sig, getter, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE)

const sd_bus_vtable plan_vtable[] = {
        SD_BUS_VTABLE_START(0),
        SD_BUS_PROPERTY("Name", "s", get_string, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        P("Chain", "s", get_string),
        P("Destination", "s", get_string),
        P("Schedule", "s", get_string),
        P("RandomizedDelaySec", "u", get_u32),
        P("Level", "s", get_string),
        P("FullEvery", "u", get_u32),
        P("Compress", "b", get_bool),
        P("Mode", "s", get_string),
        P("Bitmap", "s", get_string),
        P("Speed", "t", get_u64),
        P("PruneAfterRun", "b", get_bool),
        P("Retention", "a{su}", get_retention),
        P("LastRun", "t", get_u64),
        P("LastResult", "s", get_string),
        P("NextRun", "t", get_u64),
        P("Running", "b", get_bool),
        P("Job", "o", get_job),
        P("RestorePoints", "a(stsstss)", get_points),
        SD_BUS_METHOD_WITH_ARGS("Run", SD_BUS_NO_ARGS, SD_BUS_RESULT("o", job), method_run,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Verify", SD_BUS_ARGS("a{sv}", options), SD_BUS_RESULT("a(sbs)", results),
                                method_verify, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Prune", SD_BUS_ARGS("a{sv}", options), SD_BUS_RESULT("a(sss)", points),
                                method_prune, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Restore", SD_BUS_ARGS("s", point, "s", target, "a{sv}", options),
                                SD_BUS_RESULT("o", job), method_restore, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Change", SD_BUS_ARGS("a{sv}", settings), SD_BUS_NO_RESULT, method_change,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Delete", SD_BUS_NO_ARGS, SD_BUS_NO_RESULT, method_delete,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_VTABLE_END,
};
