/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * A plan's run, its end, pruning, verification and restores (the design
 * notes are in plan.c).  Everything here is on the loop but the *_run
 * functions, which are on workers and touch only their own item.
 */

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "daemon.h"

static void plan_changed(Plan *p, const char *a, const char *b, const char *c) {
        plan_send_changed(p, (char *[]){ (char *) a, (char *) b, (char *) c, NULL });
}

static char *str_printf(const char *fmt, ...) _printf_(1, 2);
static char *str_printf(const char *fmt, ...) {
        va_list ap;
        char *s;
        va_start(ap, fmt);
        s = g_strdup_vprintf(fmt, ap);
        va_end(ap);
        return s;
}

/* The newest point whose file the model has as a usable image (of LEVEL, or any: -1); a replica's one point. */
static Point *newest_point(Plan *p, int level) {
        for (guint i = p->points->len; i > 0; i--) {
                Point *x = p->points->pdata[i - 1];
                Image *img = plan_replica(&p->set) ? NULL : model_find(p->mgr, x->file);
                if ((level < 0 || x->level == level) && (plan_replica(&p->set) || (img && !img->error)))
                        return x;
        }
        return NULL;
}

/* The point X's file has as its backing file now (the model's word; the catalog's when it has none). */
static Point *point_base(Plan *p, Point *x) {
        Image *img = model_find(p->mgr, x->file);

        if (plan_replica(&p->set))
                return NULL; /* one point, no chain */
        if (img && !img->error) {
                for (guint i = 0; img->backing_abs && i < p->points->len; i++) {
                        Point *y = p->points->pdata[i];
                        if (strcmp(y->file, img->backing_abs) == 0)
                                return y;
                }
                return NULL;
        }
        return x->base ? plan_point(p, x->base) : NULL;
}

/* --- a run ------------------------------------------------------------------------------------------- */

typedef struct RunPrep {
        char *name, *dest, *leftover, **roots;
        char *fleece;         /* pull: the fleecing image to make, of SIZE bytes */
        bool fleece_leftover; /* an interrupted run's may be in its place: ours to remove */
        uint64_t size;
        const struct dc_format_oracle *oracle;
        void *catalog;
} RunPrep;

static void run_prep_free(void *d) {
        RunPrep *r = d;
        free(r->name);
        free(r->fleece);
        free(r->dest);
        free(r->leftover);
        g_strfreev(r->roots);
        plan_catalog_snapshot_free(r->catalog); /* (not written: the run did not get that far) */
        free(r);
}

static void run_prep_run(Work *w) {
        RunPrep *rp = w->data;
        _cleanup_free_ char *inside = NULL;
        int r = 0;

        /* the destination, inside the roots also through any symbolic link on the way (a replica: none) */
        if (!rp->dest)
                ;
        else if (g_mkdir_with_parents(rp->dest, 0750) < 0)
                r = dc_set_error(errno, "cannot make the destination '%s': %m", rp->dest);
        else if (dc_path_resolve(rp->dest, (const char *const *) rp->roots, &inside, NULL) < 0 ||
                 strcmp(inside, rp->dest) != 0)
                r = dc_set_error(EPERM, "the destination '%s' leads outside the storage roots", rp->dest);
        if (r >= 0 && rp->leftover) {
                /* an interrupted run's file: never a point */
                int u = dc_path_unlink(rp->leftover, (const char *const *) rp->roots, NULL);
                if (u < 0 && u != -ENOENT)
                        log_warning("cannot remove '%s', left by an interrupted run: %s", rp->leftover, dc_get_error());
                dc_error_clear();
        }
        if (r >= 0 && rp->fleece) {
                /* pull: an empty fleecing image beside the disk (an interrupted run's goes first; any
                 * other file of that name is somebody's, and stays: the run fails, saying so) */
                struct dc_create_options co = { .format = DC_FORMAT_QCOW2, .backing_format = -1, .oracle = rp->oracle };
                int u = rp->fleece_leftover ? dc_path_unlink(rp->fleece, (const char *const *) rp->roots, NULL)
                                            : -ENOENT;
                if (u < 0 && u != -ENOENT)
                        r = u;
                else
                        r = dc_image_create(rp->fleece, rp->size, &co, (const char *const *) rp->roots);
                dc_error_clear();
                if (r == -EEXIST)
                        r = dc_set_error(EEXIST, "'%s' exists: it is in the way of the plan's fleecing image "
                                                 "(move it, or use Mode=push)", rp->fleece);
                else if (r < 0)
                        r = dc_set_error(-r, "cannot make the fleecing image '%s'", rp->fleece);
                w->refresh = g_strdupv((char *[]){ rp->fleece, NULL });
        }
        if (r >= 0) {
                /* the run's file is pending before the job can make it */
                plan_catalog_write(rp->catalog);
                rp->catalog = NULL;
        }
        work_capture_error(w, r);
}

static void run_fail(Plan *p, int r, const char *error);
static int run_continue(Plan *p, sd_bus_message *m, sd_bus_error *error);

static void run_prep_done(Work *w) {
        Plan *p = g_hash_table_lookup(w->mgr->plans, ((RunPrep *) w->data)->name);
        sd_bus_error e = SD_BUS_ERROR_NULL;
        int r;

        /* (a plan is not deleted while it runs) */
        if (!p || !p->start_msg)
                return;
        if (w->r < 0) {
                /* the caller hears why (run_fail lets go of the call) */
                sd_bus_message *m = sd_bus_message_ref(p->start_msg);
                run_fail(p, w->r, w->error);
                (void) reply_error_errno(m, w->r, w->error);
                sd_bus_message_unref(m);
                return;
        }
        p->prepared = true;
        r = run_continue(p, p->start_msg, &e);
        if (r < 0) {
                sd_bus_message *m = sd_bus_message_ref(p->start_msg);
                run_fail(p, r, e.message ? e.message : strerror(-r));
                if (sd_bus_error_is_set(&e))
                        (void) sd_bus_reply_method_error(m, &e);
                else
                        (void) reply_error_errno(m, r, NULL);
                sd_bus_message_unref(m);
        }
        sd_bus_error_free(&e);
}

/* The run ended before its job did anything: no point, the pending file forgotten. */
/* A file a run made and no job will use: removed on a worker. */
typedef struct Leftover {
        char *path, **roots;
} Leftover;

static void leftover_free(void *d) {
        Leftover *l = d;
        free(l->path);
        g_strfreev(l->roots);
        free(l);
}

static void leftover_run(Work *w) {
        Leftover *l = w->data;
        int r = dc_path_unlink(l->path, (const char *const *) l->roots, NULL);

        if (r < 0 && r != -ENOENT)
                log_warning("cannot remove '%s': %s", l->path, dc_get_error());
        dc_error_clear();
        w->refresh = g_strdupv((char *[]){ l->path, NULL });
}

void plan_remove_later(Manager *mgr, const char *path) {
        Leftover *l = calloc(1, sizeof *l);
        Work *w;

        l->path = strdup(path);
        l->roots = g_strdupv(mgr->config.roots);
        w = work_new(mgr, leftover_run, NULL, l, leftover_free);
        if (w)
                (void) work_submit(w, NULL);
}

static void run_fail(Plan *p, int r, const char *error) {
        if (p->prepared && p->run_fleece)
                plan_remove_later(p->mgr, p->run_fleece); /* made by the preparation, for a job that never ran */
        if (p->run_replaced) {
                /* the job never started: the replica still holds its point */
                g_ptr_array_add(p->points, p->run_replaced);
                p->run_replaced = NULL;
        }
        free(p->last_result);
        p->last_result = str_printf("failed: %s", error ? error : strerror(-r));
        p->last_run = p->run_time;
        free(p->pending);
        p->pending = NULL;
        p->running = p->prepared = false;
        p->start_msg = sd_bus_message_unref(p->start_msg);
        log_fields(LOG_WARNING,
                   (const char *const[]){ "DISKCHAIN_PLAN", p->name, "DISKCHAIN_CHAIN", p->set.chain,
                                          "DISKCHAIN_LEVEL", plan_level_name(p->run_level), "DISKCHAIN_RESULT",
                                          "failed", NULL },
                   "plan '%s': the run did not start: %s", p->name, p->last_result + 8);
        plan_catalog_save_async(p);
        plan_changed(p, "Running", "LastRun", "LastResult");
}

/* After the preparation, and each time M is dispatched again: the backup job. */
static int run_continue(Plan *p, sd_bus_message *m, sd_bus_error *error) {
        Manager *mgr = p->mgr;
        Image *active = model_find(mgr, p->set.chain);
        Point *base = p->run_base ? plan_point(p, p->run_base) : NULL;
        struct dc_backup_options bo = { .compress = p->set.compress,
                                        .fleece = p->set.pull ? p->run_fleece : NULL };
        _cleanup_free_ char *backing = NULL, *id = NULL, *dir = NULL;
        int r;

        if (!active || active->error)
                return sd_bus_error_setf(error, ERROR_PREFIX "NotFound", "plan '%s': '%s' is no usable image", p->name,
                                         p->set.chain);
        if (p->run_level != LEVEL_FULL && !base && !plan_replica(&p->set))
                return sd_bus_error_setf(error, ERROR_PREFIX "NotFound",
                                         "plan '%s': the point the %s backup builds on is gone", p->name,
                                         plan_level_name(p->run_level));
        if (base && !plan_replica(&p->set)) {
                /* the name the overlay's header records: relative within the destination */
                dir = g_path_get_dirname(base->file);
                backing = strcmp(dir, p->set.destination) == 0 ? g_path_get_basename(base->file) : strdup(base->file);
        }
        if (p->run_level == LEVEL_FULL) {
                bo.sync = DC_SYNC_FULL;
                /* the plan's bitmap starts at this point in time, replacing what was there */
                if (active->format == DC_FORMAT_QCOW2 && active->compat && strcmp(active->compat, "1.1") == 0) {
                        bo.checkpoint = p->set.bitmap;
                        bo.replace_checkpoint = true;
                }
        } else if (p->run_level == LEVEL_INCREMENTAL) {
                bo.sync = DC_SYNC_INCREMENTAL;
                bo.bitmap = p->set.bitmap;
                bo.bitmap_mode = DC_BITMAP_MODE_ON_SUCCESS;
        } else {
                bo.sync = DC_SYNC_BITMAP;
                bo.bitmap = p->set.bitmap;
                bo.bitmap_mode = DC_BITMAP_MODE_NEVER;
        }
        r = backup_start_internal(m, active, p->run_file, backing, 0, &bo, p->set.speed, "org.diskchain.plan-run",
                                  (const char *const[]){ "plan", p->name, "destination", p->set.destination, "level",
                                                         plan_level_name(p->run_level), NULL },
                                  &id, error);
        if (r <= 0)
                return r; /* 0: M waits (polkit, a model refresh) and comes back */
        /* a replica's point is being overwritten: it is no point until the run ends well */
        point_free(p->run_replaced);
        p->run_replaced = NULL;
        free(p->job_id);
        p->job_id = TAKE_PTR(id);
        p->run_mono = g_get_monotonic_time();
        p->start_msg = sd_bus_message_unref(p->start_msg);
        log_fields(LOG_INFO,
                   (const char *const[]){ "DISKCHAIN_PLAN", p->name, "DISKCHAIN_CHAIN", p->set.chain, "DISKCHAIN_LEVEL",
                                          plan_level_name(p->run_level), "DISKCHAIN_JOB", p->job_id, NULL },
                   "plan '%s': %s backup of '%s' into '%s' started (job '%s')", p->name, plan_level_name(p->run_level),
                   p->set.chain, p->run_file, p->job_id);
        plan_changed(p, "Running", "Job", NULL);
        return 1;
}

/* Which level this run is, and over which point; *WHY says why a full one when another was asked for. */
static int run_choose(Plan *p, Image *active, Point **ret_base, char **why) {
        bool v3 = active->format == DC_FORMAT_QCOW2 && active->compat && strcmp(active->compat, "1.1") == 0;
        const struct dc_bitmap_info *bm = v3 ? image_bitmap(active, p->set.bitmap) : NULL;
        Point *last = newest_point(p, -1), *last_full = newest_point(p, LEVEL_FULL);
        int level = p->set.level;
        bool usable = bm && !bm->in_use && !p->force_full;

        *why = NULL;
        if (!v3)
                *why = str_printf("'%s' cannot hold the plan's bitmap (it is no qcow2 v3 image)", active->path);
        else if (!bm)
                *why = str_printf("'%s' has no bitmap '%s' (yet)", active->path, p->set.bitmap);
        else if (bm->in_use)
                *why = str_printf("bitmap '%s' is inconsistent (a writer stopped without saving it)", p->set.bitmap);
        else if (p->force_full)
                *why = strdup("the previous run was interrupted");
        if (last && last->state == POINT_DAMAGED) {
                /* the changes since then would land on (or over) bytes that are no longer the point's */
                usable = false;
                if (!*why)
                        *why = str_printf("the newest point, %s, is damaged", last->id);
        }
        if (level == LEVEL_AUTO) {
                level = LEVEL_INCREMENTAL;
                if (usable && last && p->runs_since_full + 1 >= p->set.full_every) {
                        level = LEVEL_FULL;
                        *why = str_printf("a full backup every %u runs", p->set.full_every);
                }
        }
        if (level == LEVEL_INCREMENTAL && (!usable || !last)) {
                if (!*why)
                        *why = strdup("there is no earlier point");
                level = LEVEL_FULL;
        }
        if (level == LEVEL_DIFFERENTIAL && (!usable || !last_full)) {
                if (!*why)
                        *why = strdup("there is no full point");
                level = LEVEL_FULL;
        }
        *ret_base = level == LEVEL_INCREMENTAL ? last : level == LEVEL_DIFFERENTIAL ? last_full : NULL;
        return level;
}

int plan_run(Plan *p, sd_bus_message *m, sd_bus_error *error) {
        Manager *mgr = p->mgr;
        g_autofree char *why = NULL;
        char stamp[32], *id;
        Point *base = NULL;
        Image *active;
        RunPrep *rp;
        time_t t;
        struct tm tm;
        int r;

        if (p->start_msg == m) {
                /* dispatched again (after polkit, a model refresh): a refusal now ends the run */
                r = run_continue(p, m, error);
                if (r < 0)
                        run_fail(p, r, sd_bus_error_is_set(error) ? error->message : NULL);
                return r;
        }
        if (p->running || p->busy)
                return sd_bus_error_setf(error, ERROR_PREFIX "PlanRunning",
                                         "plan '%s': the previous run%s%s%s is still going", p->name,
                                         p->job_id ? " (job '" : "", p->job_id ? p->job_id : "",
                                         p->job_id ? "')" : (p->running ? "" : " (or a prune or verify)"));
        if (plan_replica(&p->set) && claims_holder(mgr->claims, p->set.destination))
                return sd_bus_error_setf(error, ERROR_PREFIX "Busy",
                                         "plan '%s': job '%s' is reading the replica %s (a restore): run when it is "
                                         "done", p->name, claims_holder(mgr->claims, p->set.destination),
                                         p->set.destination);
        /* the chain as it is now (0: M waits for the model and comes back) */
        r = model_freshen(mgr, m, (char *[]){ p->set.chain, NULL }, error);
        if (r <= 0)
                return r;
        active = model_find(mgr, p->set.chain);
        if (!active || active->error)
                return sd_bus_error_setf(error, ERROR_PREFIX "NotFound", "plan '%s': '%s' is %s", p->name,
                                         p->set.chain, active ? active->error : "not an image in the storage roots");
        if (!image_is_active(mgr, active))
                return sd_bus_error_setf(error, ERROR_PREFIX "NotSupported",
                                         "plan '%s': '%s' is no longer the active layer of its chain (a snapshot "
                                         "was taken on top of it?): change the plan's Chain", p->name, p->set.chain);
        p->run_level = run_choose(p, active, &base, &why);
        p->run_time = plan_now();
        t = (time_t) (p->run_time / 1000000);
        gmtime_r(&t, &tm);
        strftime(stamp, sizeof stamp, "%Y%m%dT%H%M%SZ", &tm);
        /* a new name: no point's, no file's (a replica's file is its export) */
        for (int n = 1;; n++) {
                g_autofree char *file = NULL;
                id = n == 1 ? strdup(stamp) : g_strdup_printf("%s-%d", stamp, n);
                file = plan_replica(&p->set) ? strdup(p->set.destination)
                                             : g_strdup_printf("%s/%s-%s-%s.qcow2", p->set.destination, p->name, id,
                                                               plan_level_name(p->run_level));
                if (!plan_point(p, id) && (plan_replica(&p->set) || !model_find(mgr, file))) {
                        free(p->run_file);
                        p->run_file = g_steal_pointer(&file);
                        break;
                }
                free(id);
        }
        free(p->run_id);
        p->run_id = id;
        free(p->run_base);
        p->run_base = base ? strdup(base->id) : NULL;
        rp = calloc(1, sizeof *rp);
        rp->name = strdup(p->name);
        rp->dest = plan_replica(&p->set) ? NULL : strdup(p->set.destination);
        rp->roots = g_strdupv(mgr->config.roots);
        rp->oracle = &mgr->oracle;
        free(p->run_fleece);
        p->run_fleece = NULL;
        if (p->set.pull) {
                /* beside the active layer, as a point-in-time export's: the guest's old data goes there */
                g_autofree char *stem = g_strdup(active->path);
                char *dot = strrchr(stem, '.');
                if (dot && !strchr(dot, '/'))
                        *dot = 0;
                p->run_fleece = g_strdup_printf("%s.fleece-plan-%s.qcow2", stem, p->name);
                rp->fleece = strdup(p->run_fleece);
                rp->fleece_leftover = p->pending != NULL;
                rp->size = active->virtual_size;
        }
        /* an interrupted run's file goes; the bitmap may have lost what it held: this run is full (above) */
        rp->leftover = p->pending && !plan_point(p, p->pending) && !dc_nbd_uri_is(p->pending) ? strdup(p->pending)
                                                                                               : NULL;
        free(p->pending);
        p->pending = strdup(p->run_file);
        if (plan_replica(&p->set) && p->points->len) {
                /* the export changes under its point from the job's start: the catalog forgets it first
                 * (if the daemon dies meanwhile, the pending run makes the next one full) */
                point_free(p->run_replaced);
                p->run_replaced = g_ptr_array_steal_index(p->points, p->points->len - 1);
                g_ptr_array_set_size(p->points, 0);
        }
        rp->catalog = plan_catalog_snapshot(p);
        p->running = true;
        p->prepared = false;
        p->start_msg = sd_bus_message_ref(m);
        log_fields(LOG_INFO,
                   (const char *const[]){ "DISKCHAIN_PLAN", p->name, "DISKCHAIN_LEVEL", plan_level_name(p->run_level),
                                          NULL },
                   "plan '%s': run %s: %s backup%s%s", p->name, p->run_id, plan_level_name(p->run_level),
                   why && p->run_level == LEVEL_FULL && p->set.level != LEVEL_FULL ? ", full because " : "",
                   why && p->run_level == LEVEL_FULL && p->set.level != LEVEL_FULL ? why : "");
        plan_changed(p, "Running", NULL, NULL);
        if (work_start(mgr, NULL, run_prep_run, run_prep_done, rp, run_prep_free) < 0) {
                run_fail(p, -ENOMEM, NULL);
                return -ENOMEM;
        }
        return 1;
}

/* --- the end of a run ------------------------------------------------------------------------------- */

typedef struct RunEnd {
        char *name, *file, **roots, *error;
        struct dc_nbd_client_options nbd; /* a replica read back */
        char *fleece;         /* pull: removed at the end */
        bool ok;
        uint64_t bytes, size;
        char *sums;
} RunEnd;

static void run_end_free(void *d) {
        RunEnd *e = d;
        free(e->name);
        free(e->fleece);
        free(e->file);
        g_strfreev(e->roots);
        free(e->error);
        free(e->sums);
        free(e);
}

static void run_end_run(Work *w) {
        RunEnd *e = w->data;
        int r = 0;

        if (e->fleece) {
                int u = dc_path_unlink(e->fleece, (const char *const *) e->roots, NULL);
                if (u < 0 && u != -ENOENT)
                        log_warning("cannot remove the fleecing image '%s': %s", e->fleece, dc_get_error());
                dc_error_clear();
        }
        if (e->ok)
                r = plan_sums(e->file, e->roots, &e->nbd, &e->sums, &e->size);
        else if (!dc_nbd_uri_is(e->file)) {
                r = dc_path_unlink(e->file, (const char *const *) e->roots, NULL);
                r = r == -ENOENT ? 0 : r;
        }
        w->refresh = dc_nbd_uri_is(e->file) ? g_strdupv((char *[]){ e->fleece, NULL })
                                            : g_strdupv((char *[]){ e->file, e->fleece, NULL });
        work_capture_error(w, r);
}

static void plan_prune_start(Plan *p, sd_bus_message *m);

static void run_end_done(Work *w) {
        RunEnd *e = w->data;
        Plan *p = g_hash_table_lookup(w->mgr->plans, e->name);
        double secs;
        char bytes[32], dur[32];

        if (!p)
                return;
        secs = (g_get_monotonic_time() - p->run_mono) / 1e6;
        snprintf(bytes, sizeof bytes, "%" PRIu64, e->ok ? e->size : 0);
        snprintf(dur, sizeof dur, "%.1f", secs);
        free(p->last_result);
        p->last_run = p->run_time;
        free(p->pending);
        p->pending = NULL;
        if (e->ok && w->r >= 0) {
                Point *x = calloc(1, sizeof *x);
                *x = (Point){ .id = strdup(p->run_id), .time = p->run_time, .level = p->run_level,
                              .file = strdup(p->run_file),
                              .base = p->run_base && !plan_replica(&p->set) ? strdup(p->run_base) : NULL,
                              .size = e->size, .bytes = e->bytes, .sums = TAKE_PTR(e->sums),
                              .state = POINT_UNVERIFIED };
                g_ptr_array_add(p->points, x);
                p->runs_since_full = p->run_level == LEVEL_FULL ? 0 : p->runs_since_full + 1;
                p->force_full = false;
                p->last_result = str_printf("success: %s backup %s, %" PRIu64 " bytes copied, %" PRIu64
                                            " bytes %s, in %.1f s",
                                            plan_level_name(p->run_level), p->run_id, e->bytes, e->size,
                                            plan_replica(&p->set) ? "in the replica" : "stored", secs);
        } else {
                const char *why = !e->ok ? e->error : w->error;
                p->last_result = str_printf("failed: %s", why ? why : "unknown error");
                /* a failed incremental gave the bitmap its bits back: the next one can build on the last point */
        }
        log_fields(strncmp(p->last_result, "success", 7) == 0 ? LOG_INFO : LOG_ERR,
                   (const char *const[]){ "DISKCHAIN_PLAN", p->name, "DISKCHAIN_CHAIN", p->set.chain,
                                          "DISKCHAIN_LEVEL", plan_level_name(p->run_level), "DISKCHAIN_BYTES", bytes,
                                          "DISKCHAIN_SECONDS", dur, "DISKCHAIN_RESULT",
                                          strncmp(p->last_result, "success", 7) == 0 ? "success" : "failed",
                                          "DISKCHAIN_TARGET", p->run_file, NULL },
                   "plan '%s': %s", p->name, p->last_result);
        free(p->job_id);
        p->job_id = NULL;
        p->running = false;
        plan_next_run_refresh(p);
        if (strncmp(p->last_result, "success", 7) == 0 && p->set.prune) {
                p->busy = true;
                plan_changed(p, "LastRun", "LastResult", "RestorePoints");
                plan_prune_start(p, NULL); /* saves the catalog; Running goes false at its end */
                return;
        }
        plan_catalog_save_async(p);
        plan_send_changed(p, (char *[]){ "Running", "Job", "LastRun", "LastResult", "RestorePoints", NULL });
}

void plans_job_concluded(Manager *mgr, const char *id, const char *error, bool cancelled, uint64_t bytes) {
        GHashTableIter it;
        Plan *p;

        if (!mgr->plans)
                return;
        g_hash_table_iter_init(&it, mgr->plans);
        while (g_hash_table_iter_next(&it, NULL, (void **) &p)) {
                RunEnd *e;
                if (!p->job_id || strcmp(p->job_id, id) != 0)
                        continue;
                e = calloc(1, sizeof *e);
                *e = (RunEnd){ .name = strdup(p->name), .file = strdup(p->run_file), .nbd = plan_nbd_options(mgr),
                               .fleece = p->run_fleece ? strdup(p->run_fleece) : NULL,
                               .roots = g_strdupv(mgr->config.roots), .ok = !error && !cancelled, .bytes = bytes,
                               .error = cancelled ? strdup("the job was cancelled") : error ? strdup(error) : NULL };
                if (!e->ok)
                        log_fields(LOG_DEBUG, (const char *const[]){ "DISKCHAIN_PLAN", p->name, NULL },
                                   "plan '%s': job '%s' ended without a point", p->name, id);
                /* the checksums take a while: a client worker */
                Work *w = work_new(mgr, run_end_run, run_end_done, e, run_end_free);
                if (w)
                        work_submit_long(w);
                return;
        }
}

/* --- pruning ----------------------------------------------------------------------------------------- */

typedef struct PruneStep {
        char *id, *file;      /* the point that goes */
        char *base_file;      /* its backing file, or NULL (a full point) */
        char *base_id;
        GPtrArray *deps;      /* char* ids of the points streamed into (their files in dep_files) */
        GPtrArray *dep_files;
        /* results */
        GPtrArray *dep_sums;  /* char*, per dep */
        GArray *dep_sizes;    /* uint64_t */
        bool done;
} PruneStep;

typedef struct Prune {
        char *name, **roots, *claim;
        char **paths;
        const struct dc_format_oracle *oracle;
        GPtrArray *steps;     /* PruneStep*, newest first */
        void *catalog_after;  /* unused: the catalog is written on the loop's word */
        char *error;
        unsigned removed;
} Prune;

static void prune_step_free(void *d) {
        PruneStep *s = d;
        free(s->id);
        free(s->file);
        free(s->base_file);
        free(s->base_id);
        g_ptr_array_free(s->deps, TRUE);
        g_ptr_array_free(s->dep_files, TRUE);
        g_ptr_array_free(s->dep_sums, TRUE);
        g_array_free(s->dep_sizes, TRUE);
        free(s);
}

static void prune_free(void *d) {
        Prune *pr = d;
        free(pr->name);
        g_strfreev(pr->roots);
        free(pr->claim);
        g_strfreev(pr->paths);
        g_ptr_array_free(pr->steps, TRUE);
        free(pr->error);
        free(pr);
}

typedef struct SyncJob {
        GMutex lock;
        GCond cond;
        bool kicked;
} SyncJob;

static void sync_job_notify(void *u) {
        SyncJob *s = u;
        g_mutex_lock(&s->lock);
        s->kicked = true;
        g_cond_signal(&s->cond);
        g_mutex_unlock(&s->lock);
}

/* A library stream of TOP down to BASE (NULL: everything), run to its end here: 0, or -errno with the reason. */
static int stream_sync(const char *top, const char *base, const char *backing_name, char **roots,
                       const struct dc_format_oracle *oracle) {
        struct dc_open_options oo = { .roots = (const char *const *) roots, .oracle = oracle };
        SyncJob sj = { 0 };
        struct dc_job_options jo = { .id = "plan-prune", .auto_finalize = true, .auto_dismiss = true,
                                     .notify = sync_job_notify, .userdata = &sj };
        g_autofree char *err = NULL;
        struct dc_job_event ev;
        bool done = false, ok = false;
        dc_job *j = NULL;
        int r;

        g_mutex_init(&sj.lock);
        g_cond_init(&sj.cond);
        r = dc_job_stream(top, base, backing_name, &oo, &jo, &j);
        while (r >= 0 && !done) {
                g_mutex_lock(&sj.lock);
                if (!sj.kicked)
                        (void) g_cond_wait_until(&sj.cond, &sj.lock, g_get_monotonic_time() + 100000);
                sj.kicked = false;
                g_mutex_unlock(&sj.lock);
                while (dc_job_next_event(j, &ev) > 0) {
                        if (ev.kind == DC_EV_COMPLETED) {
                                ok = !ev.error[0];
                                if (!ok)
                                        err = g_strdup(ev.error);
                        } else if (ev.kind == DC_EV_CANCELLED)
                                err = g_strdup("cancelled");
                        else if (ev.kind == DC_EV_STATUS && ev.status == DC_JOB_NULL)
                                done = true;
                }
        }
        if (j)
                dc_job_free(j);
        g_cond_clear(&sj.cond);
        g_mutex_clear(&sj.lock);
        if (r < 0)
                return r;
        return ok ? 0 : dc_set_error(EIO, "streaming into '%s' failed: %s", top, err ? err : "unknown error");
}

static void prune_run(Work *w) {
        Prune *pr = w->data;
        int r = 0;

        for (guint i = 0; r >= 0 && i < pr->steps->len; i++) {
                PruneStep *s = pr->steps->pdata[i];
                g_autofree char *bname = NULL, *bdir = NULL;

                for (guint k = 0; r >= 0 && k < s->dep_files->len; k++) {
                        const char *dep = s->dep_files->pdata[k];
                        g_autofree char *ddir = g_path_get_dirname(dep);
                        uint64_t size = 0;
                        char *sums = NULL;

                        if (s->base_file) {
                                bdir = bdir ? bdir : g_path_get_dirname(s->base_file);
                                bname = strcmp(bdir, ddir) == 0 ? g_path_get_basename(s->base_file)
                                                                : g_strdup(s->base_file);
                        }
                        /* what the going point holds moves into the one built on it */
                        r = stream_sync(dep, s->base_file, bname, pr->roots, pr->oracle);
                        g_clear_pointer(&bname, g_free);
                        if (r >= 0)
                                r = plan_file_sums(dep, pr->roots, &sums, &size);
                        g_ptr_array_add(s->dep_sums, sums);
                        g_array_append_val(s->dep_sizes, size);
                }
                if (r >= 0) {
                        r = dc_path_unlink(s->file, (const char *const *) pr->roots, NULL);
                        r = r == -ENOENT ? 0 : r;
                }
                s->done = r >= 0;
        }
        w->refresh = g_strdupv(pr->paths);
        work_capture_error(w, r);
}

static void prune_done(Work *w) {
        Prune *pr = w->data;
        Plan *p = g_hash_table_lookup(w->mgr->plans, pr->name);
        unsigned removed = 0;

        (void) claims_release(w->mgr->claims, pr->claim, pr->paths, NULL);
        model_changed(w->mgr, pr->paths);
        if (!p)
                return;
        for (guint i = 0; i < pr->steps->len; i++) {
                PruneStep *s = pr->steps->pdata[i];
                for (guint k = 0; k < s->dep_sums->len; k++) {
                        Point *d = plan_point(p, s->deps->pdata[k]);
                        if (!d)
                                continue;
                        free(d->base);
                        d->base = s->base_id ? strdup(s->base_id) : NULL;
                        if (s->dep_sums->pdata[k]) {
                                free(d->sums);
                                d->sums = strdup(s->dep_sums->pdata[k]);
                                d->size = g_array_index(s->dep_sizes, uint64_t, k);
                                d->state = POINT_UNVERIFIED; /* rewritten: a new verify */
                                free(d->error);
                                d->error = NULL;
                        }
                }
                if (s->done) {
                        for (guint k = 0; k < p->points->len; k++)
                                if (strcmp(((Point *) p->points->pdata[k])->id, s->id) == 0) {
                                        g_ptr_array_remove_index(p->points, k);
                                        break;
                                }
                        removed++;
                }
        }
        if (removed || w->r < 0) {
                char n[16];
                snprintf(n, sizeof n, "%u", removed);
                log_fields(w->r < 0 ? LOG_ERR : LOG_INFO,
                           (const char *const[]){ "DISKCHAIN_PLAN", p->name, "DISKCHAIN_PRUNED", n, NULL },
                           "plan '%s': pruned %u point%s%s%s", p->name, removed, removed == 1 ? "" : "s",
                           w->r < 0 ? "; then failed: " : "", w->r < 0 ? w->error : "");
        }
        p->busy = false;
        p->running = false;
        plan_catalog_save_async(p);
        plan_send_changed(p, (char *[]){ "Running", "Job", "RestorePoints", NULL });
        if (w->m && w->r < 0)
                (void) reply_error_errno(w->m, w->r, w->error);
        else if (w->m) {
                _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
                int r = sd_bus_message_new_method_return(w->m, &reply);
                if (r >= 0)
                        r = sd_bus_message_open_container(reply, 'a', "(sss)");
                for (guint i = 0; r >= 0 && i < pr->steps->len; i++) {
                        PruneStep *s = pr->steps->pdata[i];
                        GString *g = g_string_new(NULL);
                        g_autofree char *deps = NULL;
                        for (guint d = 0; d < s->deps->len; d++)
                                g_string_append_printf(g, "%s%s", d ? ", " : "merged into ", (char *) s->deps->pdata[d]);
                        deps = g_string_free(g, FALSE);
                        r = sd_bus_message_append(reply, "(sss)", s->id, s->done ? "removed" : "kept", deps);
                }
                if (r >= 0)
                        r = sd_bus_message_close_container(reply);
                if (r >= 0)
                        (void) sd_bus_send(NULL, reply, NULL);
        }
}

/* The plan of what retention removes: the steps, newest first; *RET_KEEP etc. per point for a dry run. */
static GPtrArray *prune_plan(Plan *p, bool **ret_keep, char ***ret_why) {
        guint n = p->points->len;
        bool *keep = calloc(MAX(n, 1u), sizeof *keep);
        char **why = calloc(MAX(n, 1u) + 1, sizeof *why);
        GPtrArray *steps = g_ptr_array_new_with_free_func(prune_step_free);
        g_autofree Point **base = calloc(MAX(n, 1u), sizeof *base);

        plan_retention(p->points, p->set.keep, keep, why);
        for (guint i = 0; i < n; i++) {
                Point *x = p->points->pdata[i];
                GPtrArray *ov = g_hash_table_lookup(p->mgr->overlays, x->file);
                base[i] = point_base(p, x);
                /* an image of somebody's built on a point (a restore as a chain, say) keeps it */
                for (guint k = 0; !keep[i] && ov && k < ov->len; k++) {
                        Image *o = ov->pdata[k];
                        bool ours = false;
                        for (guint j = 0; j < n && !ours; j++)
                                ours = strcmp(((Point *) p->points->pdata[j])->file, o->path) == 0;
                        if (!ours) {
                                keep[i] = true;
                                free(why[i]);
                                why[i] = g_strdup_printf("the backing file of '%s'", o->path);
                        }
                }
        }
        for (guint i = n; i > 0; i--) {
                Point *x = p->points->pdata[i - 1];
                PruneStep *s;
                if (keep[i - 1])
                        continue;
                s = calloc(1, sizeof *s);
                *s = (PruneStep){ .id = strdup(x->id), .file = strdup(x->file),
                                  .deps = g_ptr_array_new_with_free_func(free),
                                  .dep_files = g_ptr_array_new_with_free_func(free),
                                  .dep_sums = g_ptr_array_new_with_free_func(free),
                                  .dep_sizes = g_array_new(FALSE, FALSE, sizeof(uint64_t)) };
                if (base[i - 1]) {
                        s->base_file = strdup(base[i - 1]->file);
                        s->base_id = strdup(base[i - 1]->id);
                }
                /* the points on it (newer ones that go were merged into theirs already) take its base */
                for (guint k = i; k < n; k++)
                        if (base[k] == x) {
                                g_ptr_array_add(s->deps, strdup(((Point *) p->points->pdata[k])->id));
                                g_ptr_array_add(s->dep_files, strdup(((Point *) p->points->pdata[k])->file));
                                base[k] = base[i - 1];
                        }
                g_ptr_array_add(steps, s);
        }
        if (ret_keep)
                *ret_keep = keep;
        else
                free(keep);
        if (ret_why)
                *ret_why = why;
        else
                g_strfreev(why);
        return steps;
}

/* Start pruning P (M: a Prune() call to answer, or NULL after a run); P is busy meanwhile. */
static void plan_prune_start(Plan *p, sd_bus_message *m) {
        Manager *mgr = p->mgr;
        g_autofree char *busy = NULL;
        GPtrArray *paths = g_ptr_array_new();
        Prune *pr;
        Work *w;

        pr = calloc(1, sizeof *pr);
        pr->name = strdup(p->name);
        pr->roots = g_strdupv(mgr->config.roots);
        pr->oracle = &mgr->oracle;
        pr->claim = g_strdup_printf("plan:%s", p->name);
        pr->steps = prune_plan(p, NULL, NULL);
        for (guint i = 0; i < p->points->len; i++)
                g_ptr_array_add(paths, g_strdup(((Point *) p->points->pdata[i])->file));
        g_ptr_array_add(paths, NULL);
        pr->paths = (char **) g_ptr_array_free(paths, FALSE);
        p->busy = true;
        if (pr->steps->len == 0 || claims_take(mgr->claims, pr->claim, pr->paths, NULL, NULL, &busy) < 0) {
                if (busy)
                        log_fields(LOG_WARNING, (const char *const[]){ "DISKCHAIN_PLAN", p->name, NULL },
                                   "plan '%s': not pruned now: %s", p->name, busy);
                p->busy = false;
                p->running = false;
                plan_catalog_save_async(p);
                plan_send_changed(p, (char *[]){ "Running", "Job", "RestorePoints", NULL });
                if (m && busy)
                        (void) sd_bus_reply_method_errorf(m, ERROR_PREFIX "Busy", "plan '%s': %s", p->name, busy);
                else if (m)
                        (void) sd_bus_reply_method_return(m, "a(sss)", 0);
                prune_free(pr);
                return;
        }
        model_changed(mgr, pr->paths);
        w = work_new(mgr, prune_run, prune_done, pr, prune_free);
        if (!w)
                return;
        if (m)
                w->m = sd_bus_message_ref(m);
        work_submit_long(w);
}

int plan_prune(Plan *p, sd_bus_message *m, bool dry_run, sd_bus_error *error) {
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        bool *keep = NULL;
        char **why = NULL;
        GPtrArray *steps;
        int r;

        if (!dry_run) {
                if (p->running || p->busy)
                        return sd_bus_error_setf(error, ERROR_PREFIX "PlanRunning",
                                                 "plan '%s' is running (or pruning, or verifying)", p->name);
                plan_prune_start(p, m);
                return 1;
        }
        steps = prune_plan(p, &keep, &why);
        r = sd_bus_message_new_method_return(m, &reply);
        if (r >= 0)
                r = sd_bus_message_open_container(reply, 'a', "(sss)");
        for (guint i = 0; r >= 0 && i < p->points->len; i++) {
                Point *x = p->points->pdata[i];
                g_autofree char *what = NULL;
                if (keep[i])
                        what = g_strdup(why[i]); /* the rules that keep it */
                else {
                        /* the points it is merged into first */
                        GString *g = g_string_new(NULL);
                        for (guint k = 0; k < steps->len; k++) {
                                PruneStep *s = steps->pdata[k];
                                for (guint d = 0; strcmp(s->id, x->id) == 0 && d < s->deps->len; d++)
                                        g_string_append_printf(g, "%s%s", d ? ", " : "merged into ",
                                                               (char *) s->deps->pdata[d]);
                        }
                        what = g_string_free(g, FALSE);
                }
                r = sd_bus_message_append(reply, "(sss)", x->id, keep[i] ? "keep" : "remove", what);
        }
        if (r >= 0)
                r = sd_bus_message_close_container(reply);
        if (r >= 0)
                r = sd_bus_send(NULL, reply, NULL);
        g_ptr_array_free(steps, TRUE);
        free(keep);
        g_strfreev(why);
        return r < 0 ? r : 1;
}

/* --- verification --------------------------------------------------------------------------------------- */

typedef struct VerifyItem {
        char *id, *file, *sums;
        uint64_t size;
        bool ok;
        char *detail;
} VerifyItem;

typedef struct Verify {
        char *name, **roots;
        struct dc_nbd_client_options nbd;
        const struct dc_format_oracle *oracle;
        GPtrArray *items;
} Verify;

static void verify_item_free(void *d) {
        VerifyItem *v = d;
        free(v->id);
        free(v->file);
        free(v->sums);
        free(v->detail);
        free(v);
}

static void verify_free(void *d) {
        Verify *v = d;
        free(v->name);
        g_strfreev(v->roots);
        g_ptr_array_free(v->items, TRUE);
        free(v);
}

static void verify_run(Work *w) {
        Verify *v = w->data;

        for (guint i = 0; i < v->items->len; i++) {
                VerifyItem *it = v->items->pdata[i];
                struct dc_open_options oo = { .roots = (const char *const *) v->roots, .oracle = v->oracle,
                                              .no_backing = true, .no_lock = true, .check_mode = true };
                g_autofree char *now = NULL, *diff = NULL;
                struct dc_check_result c = { 0 };
                uint64_t size = 0;
                dc_image *img = NULL;
                int r;

                r = plan_sums(it->file, v->roots, &v->nbd, &now, &size);
                if (r < 0) {
                        it->detail = g_strdup_printf("'%s' cannot be read: %s", it->file, dc_get_error());
                        dc_error_clear();
                        continue;
                }
                diff = plan_sums_differ(it->sums, now, it->size, size);
                if (dc_nbd_uri_is(it->file)) {
                        /* a replica: its server's format is not ours to check; the checksums are the word */
                        it->ok = !*diff;
                        it->detail = *diff ? g_strdup_printf("'%s' is not what the backup stored: %s", it->file, diff)
                                           : g_strdup_printf("checksums agree (%" PRIu64 " bytes read back over NBD)",
                                                             size);
                        continue;
                }
                r = dc_image_open(it->file, &oo, &img);
                if (r >= 0 && dc_image_format(img) == DC_FORMAT_QCOW2)
                        r = dc_image_check(img, DC_REPAIR_NONE, &c);
                dc_image_close(img);
                if (r < 0) {
                        it->detail = g_strdup_printf("'%s' is no sound image: %s%s%s", it->file, dc_get_error(),
                                                     *diff ? "; " : "", diff);
                        dc_error_clear();
                } else if (c.corruptions || c.check_errors)
                        it->detail = g_strdup_printf("'%s': the image check finds %" PRIu64 " corruption%s%s%s",
                                                     it->file, c.corruptions + c.check_errors,
                                                     c.corruptions + c.check_errors == 1 ? "" : "s", *diff ? "; " : "",
                                                     diff);
                else if (*diff)
                        it->detail = g_strdup_printf("'%s' is not what the backup stored: %s", it->file, diff);
                else {
                        it->ok = true;
                        it->detail = g_strdup_printf("checksums agree (%" PRIu64 " bytes), image check clean", size);
                }
        }
}

static void verify_done(Work *w) {
        Verify *v = w->data;
        Plan *p = g_hash_table_lookup(w->mgr->plans, v->name);
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *reply = NULL;
        g_autoptr(GString) bad = g_string_new(NULL);
        int r;

        if (p) {
                for (guint i = 0; i < v->items->len; i++) {
                        VerifyItem *it = v->items->pdata[i];
                        Point *x = plan_point(p, it->id);
                        if (!x)
                                continue;
                        x->state = it->ok ? POINT_VERIFIED : POINT_DAMAGED;
                        free(x->error);
                        x->error = it->ok ? NULL : strdup(it->detail);
                        if (!it->ok)
                                log_fields(LOG_ERR,
                                           (const char *const[]){ "DISKCHAIN_PLAN", p->name, "DISKCHAIN_POINT", it->id,
                                                                  "DISKCHAIN_IMAGE", it->file, NULL },
                                           "plan '%s': restore point %s is damaged: %s", p->name, it->id, it->detail);
                }
                p->busy = false;
                plan_catalog_save_async(p);
                plan_send_changed(p, (char *[]){ "Running", "RestorePoints", NULL });
        }
        for (guint i = 0; i < v->items->len; i++) {
                VerifyItem *it = v->items->pdata[i];
                if (!it->ok)
                        g_string_append_printf(bad, "%spoint %s: %s", bad->len ? "; " : "", it->id, it->detail);
        }
        if (bad->len) {
                (void) sd_bus_reply_method_errorf(w->m, ERROR_PREFIX "Corrupt", "plan '%s': damaged: %s", v->name,
                                                  bad->str);
                return;
        }
        r = sd_bus_message_new_method_return(w->m, &reply);
        if (r >= 0)
                r = sd_bus_message_open_container(reply, 'a', "(sbs)");
        for (guint i = 0; r >= 0 && i < v->items->len; i++) {
                VerifyItem *it = v->items->pdata[i];
                r = sd_bus_message_append(reply, "(sbs)", it->id, it->ok, it->detail);
        }
        if (r >= 0)
                r = sd_bus_message_close_container(reply);
        if (r >= 0)
                (void) sd_bus_send(NULL, reply, NULL);
}

int plan_verify(Plan *p, sd_bus_message *m, const char *point, sd_bus_error *error) {
        Verify *v;
        Work *w;

        if (p->running || p->busy)
                return sd_bus_error_setf(error, ERROR_PREFIX "PlanRunning",
                                         "plan '%s' is running (or pruning, or verifying)", p->name);
        if (point && !plan_point(p, point))
                return sd_bus_error_setf(error, ERROR_PREFIX "NotFound", "plan '%s' has no restore point '%s'",
                                         p->name, point);
        v = calloc(1, sizeof *v);
        v->name = strdup(p->name);
        v->roots = g_strdupv(p->mgr->config.roots);
        v->oracle = &p->mgr->oracle;
        v->nbd = plan_nbd_options(p->mgr);
        v->items = g_ptr_array_new_with_free_func(verify_item_free);
        for (guint i = 0; i < p->points->len; i++) {
                Point *x = p->points->pdata[i];
                VerifyItem *it;
                if (point && strcmp(point, x->id) != 0)
                        continue;
                it = calloc(1, sizeof *it);
                *it = (VerifyItem){ .id = strdup(x->id), .file = strdup(x->file),
                                    .sums = x->sums ? strdup(x->sums) : NULL, .size = x->size };
                g_ptr_array_add(v->items, it);
        }
        p->busy = true;
        plan_changed(p, "Running", NULL, NULL);
        w = work_new(p->mgr, verify_run, verify_done, v, verify_free);
        if (!w)
                return -ENOMEM;
        w->m = sd_bus_message_ref(m);
        work_submit_long(w);
        return 1;
}

/* --- restore ------------------------------------------------------------------------------------------ */

/*
 * Instant recovery: TARGET, a new qcow2 overlay of the point's file, is
 * exported writable at once (its writes stay in it) and a stream job then
 * copies the point's data into it under the clients' writes; once the job
 * ends the image stands alone and the clients go on with it.  Restore()
 * is answered with that job.
 */
typedef struct LiveRestore {
        Manager *mgr;
        sd_bus_message *m;
        char *plan, *point, *file, *target, *backing, *export_name, **roots;
        const struct dc_format_oracle *oracle;
        uint64_t size;
} LiveRestore;

static void live_restore_free(void *d) {
        LiveRestore *l = d;
        if (!l)
                return; /* (the export's hook took it) */
        sd_bus_message_unref(l->m);
        free(l->plan);
        free(l->point);
        free(l->file);
        free(l->target);
        free(l->backing);
        free(l->export_name);
        g_strfreev(l->roots);
        free(l);
}

static void live_create_run(Work *w) {
        LiveRestore *l = w->data;
        struct dc_create_options co = { .format = DC_FORMAT_QCOW2, .backing = l->backing, .backing_format = -1,
                                        .oracle = l->oracle };
        int r = dc_image_create(l->target, 0, &co, (const char *const *) l->roots);

        w->refresh = g_strdupv((char *[]){ l->target, NULL });
        work_capture_error(w, r);
}

static void live_on_export(Manager *mgr, const char *name, int r, const char *error, void *userdata) {
        LiveRestore *l = userdata;
        sd_bus_error e = SD_BUS_ERROR_NULL;
        Image *img;

        if (r >= 0) {
                img = model_find(mgr, l->target);
                r = img && !img->error ? stream_start_internal(l->m, img, &e)
                                       : sd_bus_error_setf(&e, ERROR_PREFIX "NotFound", "'%s' is gone", l->target);
        }
        if (r < 0) {
                log_fields(LOG_ERR, (const char *const[]){ "DISKCHAIN_PLAN", l->plan, "DISKCHAIN_POINT", l->point, NULL },
                           "plan '%s': instant recovery of point %s into '%s' did not start: %s", l->plan, l->point,
                           l->target, e.message ? e.message : error ? error : strerror(-r));
                if (sd_bus_error_is_set(&e))
                        (void) sd_bus_reply_method_error(l->m, &e);
                else
                        (void) reply_error_errno(l->m, r, error);
        } else
                log_fields(LOG_INFO,
                           (const char *const[]){ "DISKCHAIN_PLAN", l->plan, "DISKCHAIN_POINT", l->point,
                                                  "DISKCHAIN_TARGET", l->target, "DISKCHAIN_EXPORT", name, NULL },
                           "plan '%s': point %s is served as '%s' from '%s' while it is copied in", l->plan, l->point,
                           name, l->target);
        sd_bus_error_free(&e);
        live_restore_free(l);
}

static void live_create_done(Work *w) {
        LiveRestore *l = w->data;
        Manager *mgr = w->mgr;
        _cleanup_(export_start_clear) ExportStart es = { .fd = -1, .client_fd = -1 };
        g_autoptr(GPtrArray) layers = NULL;
        sd_bus_error e = SD_BUS_ERROR_NULL;
        Image *img = model_find(mgr, l->target);
        int r;

        if (w->r < 0) {
                (void) reply_error_errno(l->m, w->r, w->error);
                return;
        }
        if (!img || img->error) {
                (void) sd_bus_reply_method_errorf(l->m, ERROR_PREFIX "NotFound", "'%s' is %s", l->target,
                                                  img ? img->error : "gone");
                return;
        }
        layers = chain_layer_images(mgr, img);
        export_chain_lists(layers, &es.paths, &es.expect);
        es.name = strdup(l->export_name);
        es.active = strdup(l->target);
        es.socket = g_build_filename(mgr->config.runtime_dir, "nbd", es.name, NULL);
        es.writable = true;
        (void) caller_uid(l->m, &es.uid);
        es.on_live = live_on_export;
        es.on_live_userdata = l;
        r = export_start(mgr, NULL, &es, &e);
        if (r < 0 || sd_bus_error_is_set(&e)) {
                plan_remove_later(mgr, l->target); /* the overlay made for it serves nobody */
                if (sd_bus_error_is_set(&e))
                        (void) sd_bus_reply_method_error(l->m, &e);
                else
                        (void) reply_error_errno(l->m, r, NULL);
                sd_bus_error_free(&e);
                return;
        }
        w->data = NULL; /* the export's hook has it now */
}

static void chain_create_done(Work *w) {
        LiveRestore *l = w->data;

        if (w->r < 0)
                (void) reply_error_errno(l->m, w->r, w->error);
        else {
                log_fields(LOG_INFO,
                           (const char *const[]){ "DISKCHAIN_PLAN", l->plan, "DISKCHAIN_POINT", l->point,
                                                  "DISKCHAIN_TARGET", l->target, NULL },
                           "plan '%s': point %s restored as the chain '%s' over the backup", l->plan, l->point,
                           l->target);
                (void) sd_bus_reply_method_return(l->m, "o", "/");
        }
}

/* A thin restore: TARGET, a new qcow2 overlay of the point's file (its chain the backup's), ready at once. */
static int restore_as_chain(Plan *p, sd_bus_message *m, Point *x, const char *abs, int format, sd_bus_error *error) {
        _cleanup_free_ char *dir = NULL, *tdir = NULL;
        LiveRestore *l;
        Work *w;
        int r;

        if (format != 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "plan '%s': a restore as a chain is a qcow2 overlay of the backup: format raw "
                                         "does not go with chain", p->name);
        if (model_find(p->mgr, abs))
                return sd_bus_error_setf(error, ERROR_PREFIX "Exists", "'%s' already exists", abs);
        r = polkit_verify(p->mgr, m, "org.diskchain.plan-restore",
                          (const char *const[]){ "plan", p->name, "point", x->id, "target", abs, "chain", "true", NULL },
                          error);
        if (r <= 0)
                return r < 0 ? r : 1;
        l = calloc(1, sizeof *l);
        l->mgr = p->mgr;
        l->m = sd_bus_message_ref(m);
        l->plan = strdup(p->name);
        l->point = strdup(x->id);
        l->file = strdup(x->file);
        l->target = strdup(abs);
        dir = g_path_get_dirname(x->file);
        tdir = g_path_get_dirname(abs);
        l->backing = strcmp(dir, tdir) == 0 ? g_path_get_basename(x->file) : strdup(x->file);
        l->roots = g_strdupv(p->mgr->config.roots);
        l->oracle = &p->mgr->oracle;
        w = work_new(p->mgr, live_create_run, chain_create_done, l, live_restore_free);
        if (!w)
                return -ENOMEM;
        r = work_submit(w, m);
        return r < 0 ? r : 1;
}

/* A replica's point: its export copied into TARGET (flattened only: a URI is no image's backing file). */
static int restore_replica(Plan *p, sd_bus_message *m, Point *x, const char *target, int format, bool live,
                           bool chain, sd_bus_error *error) {
        _cleanup_free_ char *abs = NULL, *id = NULL;
        int r;

        if (p->running)
                return sd_bus_error_setf(error, ERROR_PREFIX "PlanRunning",
                                         "plan '%s': a run is updating the replica %s: restore when it is done",
                                         p->name, x->file);
        if (live || chain)
                return sd_bus_error_setf(error, ERROR_PREFIX "NotSupported",
                                         "plan '%s': restore point %s is the NBD export %s, which no image can have as "
                                         "its backing file: restore it flattened (without %s), then export the copy",
                                         p->name, x->id, x->file, live ? "live" : "chain");
        r = manager_resolve_path(p->mgr, target, &abs, error);
        if (r < 0)
                return r;
        r = restore_remote_start(p->mgr, m, x->file, x->size, abs, format, "org.diskchain.plan-restore",
                                 (const char *const[]){ "plan", p->name, "point", x->id, "live", "false", NULL }, &id,
                                 error);
        if (r > 0)
                log_fields(LOG_INFO,
                           (const char *const[]){ "DISKCHAIN_PLAN", p->name, "DISKCHAIN_POINT", x->id,
                                                  "DISKCHAIN_TARGET", abs, "DISKCHAIN_JOB", id, NULL },
                           "plan '%s': restoring point %s from %s into '%s' (job '%s')", p->name, x->id, x->file, abs,
                           id);
        return r < 0 ? r : 1;
}

int plan_restore(Plan *p, sd_bus_message *m, const char *point, const char *target, int format, bool live,
                 bool chain, const char *export_name, sd_bus_error *error) {
        Manager *mgr = p->mgr;
        Point *x = plan_point(p, point);
        _cleanup_free_ char *abs = NULL, *id = NULL, *dir = NULL, *tdir = NULL;
        struct dc_backup_options bo = { .sync = DC_SYNC_FULL };
        LiveRestore *l;
        Image *img;
        Work *w;
        int r;

        if (!x)
                return sd_bus_error_setf(error, ERROR_PREFIX "NotFound", "plan '%s' has no restore point '%s'",
                                         p->name, point);
        if (x->state == POINT_DAMAGED)
                return sd_bus_error_setf(error, ERROR_PREFIX "Corrupt",
                                         "plan '%s': restore point %s is damaged (%s); verify it again once repaired",
                                         p->name, point, x->error ? x->error : "see Verify");
        if (p->busy)
                return sd_bus_error_setf(error, ERROR_PREFIX "PlanRunning",
                                         "plan '%s' is pruning or verifying: restore when it is done", p->name);
        if (plan_replica(&p->set))
                return restore_replica(p, m, x, target, format, live, chain, error);
        img = model_find(mgr, x->file);
        if (!img || img->error)
                return sd_bus_error_setf(error, ERROR_PREFIX "NotFound",
                                         "plan '%s': restore point %s's file '%s' is %s", p->name, point, x->file,
                                         img ? img->error : "gone");
        r = manager_resolve_path(mgr, target, &abs, error);
        if (r < 0)
                return r;
        if (chain)
                return restore_as_chain(p, m, x, abs, format, error);
        if (!live) {
                r = backup_start_internal(m, img, abs, NULL, format, &bo, 0, "org.diskchain.plan-restore",
                                          (const char *const[]){ "plan", p->name, "point", point, "live", "false",
                                                                 NULL },
                                          &id, error);
                if (r > 0)
                        log_fields(LOG_INFO,
                                   (const char *const[]){ "DISKCHAIN_PLAN", p->name, "DISKCHAIN_POINT", point,
                                                          "DISKCHAIN_TARGET", abs, "DISKCHAIN_JOB", id, NULL },
                                   "plan '%s': restoring point %s into '%s' (job '%s')", p->name, point, abs, id);
                return r < 0 ? r : 1;
        }
        if (format != 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "plan '%s': an instant recovery writes a qcow2 overlay of the backup: format "
                                         "raw does not go with live", p->name);
        if (model_find(mgr, abs))
                return sd_bus_error_setf(error, ERROR_PREFIX "Exists", "'%s' already exists", abs);
        if (export_name && !export_name_valid(export_name))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "name '%s' must be 1..64 characters of A-Z a-z 0-9 . _ - (not starting with . "
                                         "or -)", export_name);
        l = calloc(1, sizeof *l);
        l->export_name = export_name ? strdup(export_name) : export_default_name(mgr, abs, "");
        if (g_hash_table_contains(mgr->exports, l->export_name)) {
                r = sd_bus_error_setf(error, ERROR_PREFIX "Exists", "an export named '%s' exists already",
                                      l->export_name);
                live_restore_free(l);
                return r;
        }
        r = polkit_verify(mgr, m, "org.diskchain.plan-restore",
                          (const char *const[]){ "plan", p->name, "point", point, "target", abs, "live", "true",
                                                 "name", l->export_name, NULL },
                          error);
        if (r <= 0) {
                live_restore_free(l);
                return r < 0 ? r : 1;
        }
        l->mgr = mgr;
        l->m = sd_bus_message_ref(m);
        l->plan = strdup(p->name);
        l->point = strdup(point);
        l->file = strdup(x->file);
        l->target = strdup(abs);
        /* the overlay names the backup relative to itself where they share a directory */
        dir = g_path_get_dirname(x->file);
        tdir = g_path_get_dirname(abs);
        l->backing = strcmp(dir, tdir) == 0 ? g_path_get_basename(x->file) : strdup(x->file);
        l->roots = g_strdupv(mgr->config.roots);
        l->oracle = &mgr->oracle;
        w = work_new(mgr, live_create_run, live_create_done, l, live_restore_free);
        if (!w)
                return -ENOMEM;
        r = work_submit(w, m);
        return r < 0 ? r : 1;
}
