/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* org.diskchain.DiskChain1.Chain: a top image and its backing files, and the block jobs on them. */

#include <errno.h>
#include <stdio.h>
#include <unistd.h>

#include "daemon.h"

int chain_object_find(sd_bus *bus, const char *path, const char *iface, void *userdata, void **found,
                      sd_bus_error *error) {
        Image *img = chain_active_from_object(userdata, path);
        if (!img)
                return 0;
        *found = img;
        return 1;
}

#define ACTIVE ((Image *) userdata)

static int property_get_active(sd_bus *bus, const char *path, const char *iface, const char *prop,
                               sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "o", ACTIVE->object);
}

static int property_get_layers(sd_bus *bus, const char *path, const char *iface, const char *prop,
                               sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        g_auto(GStrv) l = chain_layers(ACTIVE->mgr, ACTIVE);
        return append_objects(reply, l);
}

static int property_get_depth(sd_bus *bus, const char *path, const char *iface, const char *prop,
                              sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        g_auto(GStrv) l = chain_layers(ACTIVE->mgr, ACTIVE);
        return sd_bus_message_append(reply, "u", g_strv_length(l));
}

static int property_get_size(sd_bus *bus, const char *path, const char *iface, const char *prop,
                             sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "t", ACTIVE->virtual_size);
}

static int property_get_jobs(sd_bus *bus, const char *path, const char *iface, const char *prop,
                             sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        g_autofree char *me = chain_object_path(ACTIVE->path);
        GHashTableIter it;
        Job *j;
        int r = sd_bus_message_open_container(reply, 'a', "o");

        g_hash_table_iter_init(&it, ACTIVE->mgr->jobs);
        while (r >= 0 && g_hash_table_iter_next(&it, NULL, (void **) &j))
                if (strcmp(j->chain_object, me) == 0)
                        r = sd_bus_message_append(reply, "o", j->object);
        if (r >= 0)
                r = sd_bus_message_close_container(reply);
        return r;
}

/* This version has no NBD server, so no chain is ever exported: the empty
 * list is the real state. */
static int property_get_none(sd_bus *bus, const char *path, const char *iface, const char *prop,
                             sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "ao", 0);
}


/* --- block jobs: Stream, Commit -------------------------------------------- */

typedef struct JobStart {
        int type;
        char *id, *chain_object, *overlay, *top, *base, *backing_file;
        /* backup */
        char *target, *target_backing;
        bool create_target;
        struct dc_create_options co;
        struct dc_backup_options bo;
        struct dc_mirror_options mo;
        char **roots, **paths;
        unsigned max_depth;
        struct dc_job_options jo;
        dc_job *job;
} JobStart;

static void job_start_free(void *p) {
        JobStart *s = p;
        free(s->id);
        free(s->chain_object);
        free(s->overlay);
        free(s->top);
        free(s->base);
        free(s->backing_file);
        free(s->target);
        free(s->target_backing);
        g_strfreev(s->roots);
        g_strfreev(s->paths);
        dc_job_free(s->job); /* only set when the start failed after creating it */
        free(s);
}

static void job_start_run(Work *w) {
        JobStart *s = w->data;
        struct dc_open_options o = { .roots = (const char *const *) s->roots, .max_depth = s->max_depth };
        int r;

        s->jo.id = s->id;
        if (s->type == DC_JOB_TYPE_STREAM)
                r = dc_job_stream(s->top, s->base, s->backing_file, &o, &s->jo, &s->job);
        else if (s->type == DC_JOB_TYPE_COMMIT)
                r = dc_job_commit(s->overlay, s->top, s->base, s->backing_file, &o, &s->jo, &s->job);
        else {
                /* drive-backup and drive-mirror with mode absolute-paths create the target first */
                r = 0;
                if (s->create_target) {
                        dc_image *src = NULL;
                        struct dc_open_options so = o;
                        so.no_lock = true;
                        r = dc_image_open(s->top, &so, &src);
                        if (r >= 0) {
                                s->co.backing = s->target_backing;
                                s->co.backing_format = -1;
                                r = dc_image_create(s->target, dc_image_virtual_size(src), &s->co, (const char *const *) s->roots);
                                dc_image_close(src);
                        }
                }
                if (r >= 0) {
                        if (s->type == DC_JOB_TYPE_MIRROR)
                                r = dc_job_mirror(s->top, s->target, &s->mo, &o, &s->jo, &s->job);
                        else
                                r = dc_job_backup(s->top, s->target, &s->bo, &o, &s->jo, &s->job);
                        if (r < 0 && s->create_target) {
                                char msg[1024];
                                snprintf(msg, sizeof msg, "%s", dc_get_error());
                                (void) unlink(s->target); /* we made it for this job only */
                                work_capture_error(w, r);
                                free(w->error);
                                w->error = strdup(msg);
                                return;
                        }
                }
                w->rescan = s->create_target;
        }
        work_capture_error(w, r);
}

static void job_start_done(Work *w) {
        JobStart *s = w->data;
        Job *j;
        int r;

        if (w->r < 0) {
                for (char **p = s->paths; p && *p; p++)
                        g_hash_table_remove(w->mgr->busy, *p);
                (void) reply_error_errno(w->m, w->r, w->error, NULL);
                return;
        }
        r = job_register(w->mgr, s->job, w->m, s->chain_object, s->top, s->base,
                         s->type == DC_JOB_TYPE_STREAM ? s->top
                         : s->target                   ? s->target
                                                       : s->base,
                         s->paths, &j);
        if (r < 0) {
                (void) dc_job_cancel(s->job, true);
                (void) sd_bus_reply_method_errorf(w->m, SD_BUS_ERROR_FAILED, "cannot publish the job: %s", strerror(-r));
                return;
        }
        s->job = NULL; /* owned by the Job object now */
        (void) sd_bus_reply_method_return(w->m, "o", j->object);
}

/* An image named by path or object path, which must be a layer of the chain. */
static int find_layer_opt(Manager *mgr, GPtrArray *layers, const char *v, const char *what, Image **ret,
                          sd_bus_error *error) {
        _cleanup_free_ char *abs = NULL;
        int r;

        if (v[0] == '/' && g_str_has_prefix(v, IMAGE_PREFIX "/")) {
                if (sd_bus_path_decode(v, IMAGE_PREFIX, &abs) <= 0)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "%s: invalid object '%s'", what, v);
        } else {
                r = manager_resolve_path(mgr, v, &abs, error);
                if (r < 0)
                        return r;
        }
        for (guint i = 0; i < layers->len; i++) {
                Image *img = layers->pdata[i];
                if (strcmp(img->path, abs) == 0) {
                        *ret = img;
                        return (int) i;
                }
        }
        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "%s: '%s' is not in this backing file chain", what,
                                 abs);
}

static int job_common_options(Manager *mgr, GHashTable *opts, const char *type, JobStart *s, sd_bus_error *error) {
        static const char *const on_errors[] = { "report", "ignore", "stop", "enospc", NULL };
        const char *id = NULL;
        uint64_t speed = 0;
        bool af = true, ad = true;
        int on_error = 0, r;

        int on_target = -1;
        if ((r = opt_string(opts, "job-id", &id, error)) < 0 || (r = opt_uint(opts, "speed", &speed, error)) < 0 ||
            (r = opt_enum(opts, "on-error", on_errors, &on_error, error)) < 0 ||
            (r = opt_enum(opts, "on-source-error", on_errors, &on_error, error)) < 0 ||
            (r = opt_enum(opts, "on-target-error", on_errors, &on_target, error)) < 0 ||
            (r = opt_bool(opts, "auto-finalize", &af, error)) < 0 ||
            (r = opt_bool(opts, "auto-dismiss", &ad, error)) < 0)
                return r;
        if (id && g_hash_table_contains(mgr->jobs, id))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Job ID '%s' already in use", id);
        s->id = id ? strdup(id) : job_new_id(mgr, type);
        s->jo = (struct dc_job_options){ .speed = speed, .on_error = on_error, .has_target_error = on_target >= 0,
                                         .on_target_error = on_target, .auto_finalize = af, .auto_dismiss = ad,
                                         .notify = job_notify, .userdata = mgr };
        return 0;
}

/* Mark PATHS busy for the new job, or say which job holds one of them. */
static int claim(Manager *mgr, JobStart *s, GPtrArray *paths, sd_bus_error *error) {
        for (guint i = 0; i < paths->len; i++) {
                const char *holder = busy_job(mgr, paths->pdata[i]);
                if (holder)
                        return sd_bus_error_setf(error, ERROR_PREFIX "Busy", "'%s' is in use by job '%s'",
                                                 (char *) paths->pdata[i], holder);
        }
        g_ptr_array_add(paths, NULL);
        s->paths = g_strdupv((char **) paths->pdata);
        for (char **p = s->paths; *p; p++)
                g_hash_table_replace(mgr->busy, g_strdup(*p), g_strdup(s->id));
        return 0;
}

/* Authorize, claim the images and start the job off the loop.  Returns 1
 * when S now belongs to the work, 0 while polkit is asked, < 0 on error;
 * in the last two cases the caller still owns S. */
static int start_job(sd_bus_message *m, Image *active, JobStart *s, GPtrArray *paths, sd_bus_error *error) {
        Manager *mgr = active->mgr;
        const char *d[12] = { "path", active->path, "root", root_of(mgr, active->path), "operation",
                              dc_job_type_name(s->type), "job-id", s->id, NULL };
        int r;

        if (s->type == DC_JOB_TYPE_BACKUP || s->type == DC_JOB_TYPE_MIRROR) {
                d[8] = "target", d[9] = s->target, d[10] = NULL;
                r = polkit_verify(mgr, m, "org.diskchain.copy", d, error);
        } else
                r = polkit_verify(mgr, m, "org.diskchain.modify", d, error);
        if (r <= 0)
                return r;
        if (g_hash_table_size(mgr->jobs) >= mgr->config.max_jobs)
                return sd_bus_error_setf(error, ERROR_PREFIX "LimitsExceeded", "%u jobs are running already (MaxJobs)",
                                         g_hash_table_size(mgr->jobs));
        r = claim(mgr, s, paths, error);
        if (r < 0)
                return r;
        s->chain_object = chain_object_path(active->path);
        s->roots = g_strdupv(mgr->config.roots);
        s->max_depth = mgr->config.max_depth;
        r = work_start(mgr, m, job_start_run, job_start_done, s, job_start_free, false);
        if (r < 0) {
                /* work_start freed S; the claimed paths are still in PATHS */
                for (guint i = 0; i < paths->len && paths->pdata[i]; i++)
                        g_hash_table_remove(mgr->busy, paths->pdata[i]);
                sd_bus_error_set_errnof(error, -r, "cannot start the job: %s", strerror(-r));
                return 1;
        }
        return 1;
}

static int finish_start(sd_bus_message *m, Image *active, JobStart *s, GPtrArray *paths, sd_bus_error *error) {
        int r = start_job(m, active, s, paths, error);
        if (r <= 0)
                job_start_free(s);
        if (sd_bus_error_is_set(error))
                return -EINVAL;
        return 1;
}

static int method_stream(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        static const char *const allowed[] = { "job-id", "top", "base", "bottom", "backing-file", "speed", "on-error",
                                               "auto-finalize", "auto-dismiss", NULL };
        Image *active = ACTIVE, *top = ACTIVE, *base = NULL, *bottom = NULL;
        g_autoptr(GHashTable) opts = NULL;
        g_autoptr(GPtrArray) layers = chain_layer_images(active->mgr, active);
        g_autoptr(GPtrArray) paths = g_ptr_array_new_with_free_func(g_free);
        const char *v = NULL, *bf = NULL;
        JobStart *s;
        int ti = 0, bi = -1, r;

        r = parse_options(m, allowed, &opts, error);
        if (r < 0)
                return r;
        if (opt_string(opts, "top", &v, error) > 0 && (ti = find_layer_opt(active->mgr, layers, v, "top", &top, error)) < 0)
                return ti;
        if (opt_string(opts, "base", &v, error) > 0) {
                if (g_hash_table_contains(opts, "bottom"))
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "'base' and 'bottom' are mutually exclusive");
                if ((bi = find_layer_opt(active->mgr, layers, v, "base", &base, error)) < 0)
                        return bi;
        }
        if (opt_string(opts, "bottom", &v, error) > 0) {
                int bo = find_layer_opt(active->mgr, layers, v, "bottom", &bottom, error);
                if (bo < 0)
                        return bo;
                if (bo < ti)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "'%s' is not below '%s'", bottom->path,
                                                 top->path);
                bi = bo + 1 < (int) layers->len ? bo + 1 : -1;
                base = bi >= 0 ? layers->pdata[bi] : NULL;
        }
        if (base && bi <= ti)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Node '%s' is not a backing image of '%s'",
                                         base->path, top->path);
        (void) opt_string(opts, "backing-file", &bf, error);
        if (bf && !base)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "backing file specified, but streaming the entire chain");
        if (top->format != DC_FORMAT_QCOW2)
                return sd_bus_error_setf(error, ERROR_PREFIX "NotSupported", "'%s': only qcow2 images can receive streamed data",
                                         top->path);
        if (sd_bus_error_is_set(error))
                return -EINVAL;
        s = calloc(1, sizeof *s);
        if (!s)
                return -ENOMEM;
        s->type = DC_JOB_TYPE_STREAM;
        r = job_common_options(active->mgr, opts, "stream", s, error);
        if (r < 0) {
                job_start_free(s);
                return r;
        }
        s->top = strdup(top->path);
        s->base = base ? strdup(base->path) : NULL;
        s->backing_file = bf ? strdup(bf) : NULL;
        for (int i = ti; i < (int) layers->len && (bi < 0 || i <= bi); i++)
                g_ptr_array_add(paths, g_strdup(((Image *) layers->pdata[i])->path));
        return finish_start(m, active, s, paths, error);
}

static int method_commit(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        static const char *const allowed[] = { "job-id", "top", "base", "backing-file", "speed", "on-error",
                                               "auto-finalize", "auto-dismiss", "force-shared-base", NULL };
        Image *active = ACTIVE, *top = ACTIVE, *base;
        g_autoptr(GHashTable) opts = NULL;
        g_autoptr(GPtrArray) layers = chain_layer_images(active->mgr, active);
        g_autoptr(GPtrArray) paths = g_ptr_array_new_with_free_func(g_free);
        const char *v = NULL, *bf = NULL;
        bool force_shared = false;
        JobStart *s;
        int ti = 0, bi, r;

        r = parse_options(m, allowed, &opts, error);
        if (r < 0)
                return r;
        if (opt_string(opts, "top", &v, error) > 0 && (ti = find_layer_opt(active->mgr, layers, v, "top", &top, error)) < 0)
                return ti;
        bi = (int) layers->len - 1;
        base = layers->pdata[bi];
        if (opt_string(opts, "base", &v, error) > 0 && (bi = find_layer_opt(active->mgr, layers, v, "base", &base, error)) < 0)
                return bi;
        (void) opt_string(opts, "backing-file", &bf, error);
        (void) opt_bool(opts, "force-shared-base", &force_shared, error);
        if (sd_bus_error_is_set(error))
                return -EINVAL;
        if (bi == ti)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "cannot commit an image into itself");
        if (bi < ti)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "'%s' is not below '%s' in the chain",
                                         base->path, top->path);
        if (ti == 0 && bf)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "'backing-file' specified, but 'top' is the active layer");
        if (!force_shared) {
                g_auto(GStrv) users = image_chains(active->mgr, base);
                if (g_strv_length(users) > 1)
                        return sd_bus_error_setf(error, ERROR_PREFIX "Busy",
                                                 "'%s' is also the base of %u other chain(s); set force-shared-base to "
                                                 "commit into it anyway",
                                                 base->path, g_strv_length(users) - 1);
        }
        s = calloc(1, sizeof *s);
        if (!s)
                return -ENOMEM;
        s->type = DC_JOB_TYPE_COMMIT;
        r = job_common_options(active->mgr, opts, "commit", s, error);
        if (r < 0) {
                job_start_free(s);
                return r;
        }
        /* top the active layer: active commit, with a ready phase and a pivot to base */
        s->overlay = ti > 0 ? strdup(((Image *) layers->pdata[ti - 1])->path) : NULL;
        s->top = strdup(top->path);
        s->base = strdup(base->path);
        s->backing_file = bf ? strdup(bf) : NULL;
        for (int i = ti > 0 ? ti - 1 : 0; i <= bi; i++)
                g_ptr_array_add(paths, g_strdup(((Image *) layers->pdata[i])->path));
        return finish_start(m, active, s, paths, error);
}
/*
 * The target of a backup or mirror: a path in the roots, not a layer of
 * the chain, new (absolute-paths) or an image that exists (existing).
 * SIZE_CHECK: refuse another size now (backup); a mirror fails at run time.
 */
static int target_check(Manager *mgr, Image *active, GPtrArray *layers, const char *target, int mode,
                        const char *same_msg, bool size_check, char **ret_abs, sd_bus_error *error) {
        _cleanup_free_ char *abs = NULL;
        Image *tgt;
        int r = manager_resolve_path(mgr, target, &abs, error);
        if (r < 0)
                return r;
        if (strcmp(abs, active->path) == 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "%s", same_msg);
        tgt = g_hash_table_lookup(mgr->images, abs);
        if (mode == 0 && tgt)
                return sd_bus_error_setf(error, ERROR_PREFIX "Exists", "'%s' already exists (use mode 'existing')", abs);
        for (guint i = 1; i < layers->len; i++)
                if (strcmp(((Image *) layers->pdata[i])->path, abs) == 0)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                                 "'%s' is in the source's backing chain", abs);
        if (mode == 1) {
                if (!tgt || tgt->error)
                        return sd_bus_error_setf(error, ERROR_PREFIX "NotFound", "'%s': no such image", abs);
                if (size_check && tgt->virtual_size != active->virtual_size)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                                 "Source and target image have different sizes");
        }
        *ret_abs = TAKE_PTR(abs);
        return 0;
}

/* Backup's and Mirror's sync values, indexed by DC_SYNC_* and beyond. */
static const char *const copy_syncs[] = { "full", "top", "none", "incremental", "bitmap", NULL };

/* Fill in S's target: made for the job (absolute-paths) over the right backing for SYNC, or existing.
 * Frees S on error. */
static int target_setup(JobStart *s, Image *active, char *abs, int mode, int format, int sync, sd_bus_error *error) {
        s->top = strdup(active->path);
        s->target = abs;
        s->create_target = mode == 0;
        s->co.format = format == 1 ? DC_FORMAT_RAW : DC_FORMAT_QCOW2;
        if (mode == 0 && sync == DC_SYNC_TOP && active->backing_abs)
                s->target_backing = strdup(active->backing_abs); /* top: valid over the same backing */
        else if (mode == 0 && sync == DC_SYNC_NONE)
                s->target_backing = strdup(active->path);         /* none: over the source itself */
        if (s->target_backing && format == 1) {
                job_start_free(s);
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "sync '%s' needs a target with a backing file: use format qcow2", copy_syncs[sync]);
        }
        return 0;
}

/* The start of a backup or mirror: the target checked, the job's options read, the target set up. */
static int copy_job_start_new(Manager *mgr, Image *active, GPtrArray *layers, GHashTable *opts, const char *target,
                              int type, int mode, int format, int sync, JobStart **ret, sd_bus_error *error) {
        _cleanup_free_ char *abs = NULL;
        bool mirror = type == DC_JOB_TYPE_MIRROR;
        JobStart *s;
        int r;

        r = target_check(mgr, active, layers, target, mode,
                         mirror ? "Can't mirror node into itself" : "Source and target cannot be the same", !mirror,
                         &abs, error);
        if (r < 0)
                return r;
        s = calloc(1, sizeof *s);
        if (!s)
                return -ENOMEM;
        s->type = type;
        r = job_common_options(mgr, opts, dc_job_type_name(type), s, error);
        if (r < 0) {
                job_start_free(s);
                return r;
        }
        r = target_setup(s, active, TAKE_PTR(abs), mode, format, sync, error);
        if (r < 0)
                return r;
        *ret = s;
        return 0;
}

/* A backup or mirror holds every layer of the chain and the target. */
static int copy_job_finish(sd_bus_message *m, Image *active, GPtrArray *layers, JobStart *s, sd_bus_error *error) {
        g_autoptr(GPtrArray) paths = g_ptr_array_new_with_free_func(g_free);

        for (guint i = 0; i < layers->len; i++)
                g_ptr_array_add(paths, g_strdup(((Image *) layers->pdata[i])->path));
        g_ptr_array_add(paths, g_strdup(s->target));
        return finish_start(m, active, s, paths, error);
}

/* What Backup and Mirror read alike: the target, the options (ALLOWED
 * only), sync (an index into copy_syncs), mode and format. */
static int copy_job_options(sd_bus_message *m, const char *const *allowed, const char **target, GHashTable **opts,
                            int *sync, int *mode, int *format, sd_bus_error *error) {
        static const char *const modes[] = { "absolute-paths", "existing", NULL };
        static const char *const formats[] = { "qcow2", "raw", NULL };
        int r;

        r = sd_bus_message_read(m, "s", target);
        if (r < 0)
                return r;
        r = parse_options(m, allowed, opts, error);
        if (r < 0)
                return r;
        if ((r = opt_enum(*opts, "sync", copy_syncs, sync, error)) < 0 ||
            (r = opt_enum(*opts, "mode", modes, mode, error)) < 0)
                return r;
        return opt_enum(*opts, "format", formats, format, error);
}

static int method_backup(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        static const char *const allowed[] = { "job-id", "sync", "mode", "format", "compress", "bitmap", "bitmap-mode",
                                               "speed", "on-source-error", "on-target-error", "max-workers",
                                               "max-chunk", "auto-finalize", "auto-dismiss", NULL };
        Image *active = ACTIVE;
        Manager *mgr = active->mgr;
        g_autoptr(GHashTable) opts = NULL;
        g_autoptr(GPtrArray) layers = chain_layer_images(mgr, active);
        const char *target;
        int sync = 0, mode = 0, format = 0, r;
        bool compress = false;
        uint64_t workers = 0, chunk = 0;
        JobStart *s;

        if ((r = copy_job_options(m, allowed, &target, &opts, &sync, &mode, &format, error)) < 0 ||
            (r = opt_bool(opts, "compress", &compress, error)) < 0 ||
            (r = opt_uint(opts, "max-workers", &workers, error)) < 0 ||
            (r = opt_uint(opts, "max-chunk", &chunk, error)) < 0)
                return r;
        if (sync >= 3 || g_hash_table_contains(opts, "bitmap") || g_hash_table_contains(opts, "bitmap-mode"))
                return sd_bus_error_setf(error, ERROR_PREFIX "NotSupported",
                                         "incremental and bitmap backups need persistent dirty bitmaps, which this "
                                         "version does not have");
        if (g_hash_table_contains(opts, "max-workers") && (workers < 1 || workers > 16))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "max-workers must be 1..16");
        if (compress && format == 1)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Compression is not supported for this drive");
        r = copy_job_start_new(mgr, active, layers, opts, target, DC_JOB_TYPE_BACKUP, mode, format, sync, &s, error);
        if (r < 0)
                return r;
        s->bo = (struct dc_backup_options){ .sync = sync, .compress = compress, .max_workers = (unsigned) workers,
                                            .max_chunk = chunk };
        return copy_job_finish(m, active, layers, s, error);
}

static int method_mirror(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        static const char *const allowed[] = { "job-id", "sync", "mode", "format", "granularity", "buf-size", "speed",
                                               "on-source-error", "on-target-error", "unmap", "copy-mode",
                                               "auto-finalize", "auto-dismiss", NULL };
        static const char *const copy_modes[] = { "background", "write-blocking", NULL };
        Image *active = ACTIVE;
        Manager *mgr = active->mgr;
        g_autoptr(GHashTable) opts = NULL;
        g_autoptr(GPtrArray) layers = chain_layer_images(mgr, active);
        const char *target;
        int sync = 0, mode = 0, format = active->format == DC_FORMAT_RAW ? 1 : 0, copy_mode = 0, r;
        uint64_t granularity = 0, buf_size = 0;
        bool unmap = true;
        JobStart *s;

        if ((r = copy_job_options(m, allowed, &target, &opts, &sync, &mode, &format, error)) < 0 ||
            (r = opt_uint(opts, "granularity", &granularity, error)) < 0 ||
            (r = opt_uint(opts, "buf-size", &buf_size, error)) < 0 || (r = opt_bool(opts, "unmap", &unmap, error)) < 0 ||
            (r = opt_enum(opts, "copy-mode", copy_modes, &copy_mode, error)) < 0)
                return r;
        if (sync >= 3)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Sync mode '%s' not supported", copy_syncs[sync]);
        if (g_hash_table_contains(opts, "granularity") &&
            (granularity < 512 || granularity > (64u << 20) || (granularity & (granularity - 1))))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "Granularity must be a power of 2 between 512 and 64 MiB");
        if (g_hash_table_contains(opts, "buf-size") && (buf_size == 0 || buf_size > (1ull << 30)))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Invalid parameter 'buf-size'");
        r = copy_job_start_new(mgr, active, layers, opts, target, DC_JOB_TYPE_MIRROR, mode, format, sync, &s, error);
        if (r < 0)
                return r;
        s->mo = (struct dc_mirror_options){ .sync = sync, .existing = mode == 1, .granularity = (uint32_t) granularity,
                                            .buf_size = buf_size, .unmap = unmap,
                                            .copy_mode = copy_mode ? DC_COPY_MODE_WRITE_BLOCKING
                                                                   : DC_COPY_MODE_BACKGROUND };
        return copy_job_finish(m, active, layers, s, error);
}

/* --- Snapshot (blockdev-snapshot-sync) --------------------------------------- */

typedef struct SnapshotOp {
        char *overlay, *backing, **roots;
        bool existing;
} SnapshotOp;

static void snapshot_op_free(void *p) {
        SnapshotOp *op = p;
        free(op->overlay);
        free(op->backing);
        g_strfreev(op->roots);
        free(op);
}

static void snapshot_run(Work *w) {
        SnapshotOp *op = w->data;
        struct dc_create_options o = { .backing = op->backing, .backing_format = -1 };
        int r;

        if (!op->existing)
                r = dc_image_create(op->overlay, 0, &o, (const char *const *) op->roots);
        else {
                /* an existing overlay of the right size, with no backing yet */
                struct dc_open_options oo = { .roots = (const char *const *) op->roots, .writable = true,
                                              .no_backing = true };
                dc_image *img = NULL;
                r = dc_image_open(op->overlay, &oo, &img);
                if (r >= 0 && *dc_image_backing_file(img)) {
                        r = -EEXIST;
                        w->error = g_strdup_printf("'%s' already has a backing file", op->overlay);
                }
                if (r >= 0)
                        r = dc_image_set_backing(img, op->backing, "qcow2");
                dc_image_close(img);
        }
        if (r < 0 && !w->error)
                work_capture_error(w, r);
        w->r = r;
}

static void snapshot_done(Work *w) {
        SnapshotOp *op = w->data;
        reply_new_image(w, op->overlay);
}

static int method_snapshot(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        static const char *const allowed[] = { "format", "mode", NULL };
        static const char *const formats[] = { "qcow2", NULL };
        static const char *const modes[] = { "absolute-paths", "existing", NULL };
        Image *active = ACTIVE;
        Manager *mgr = active->mgr;
        g_autoptr(GHashTable) opts = NULL;
        _cleanup_free_ char *abs = NULL;
        const char *overlay, *d[8], *job;
        int fmt = 0, mode = 0, r;
        SnapshotOp *op;

        r = sd_bus_message_read(m, "s", &overlay);
        if (r < 0)
                return r;
        r = parse_options(m, allowed, &opts, error);
        if (r < 0)
                return r;
        if ((r = opt_enum(opts, "format", formats, &fmt, error)) < 0 || (r = opt_enum(opts, "mode", modes, &mode, error)) < 0)
                return r;
        r = manager_resolve_path(mgr, overlay, &abs, error);
        if (r < 0)
                return r;
        if (mode == 0 && g_hash_table_lookup(mgr->images, abs))
                return sd_bus_error_setf(error, ERROR_PREFIX "Exists", "'%s' already exists", abs);
        job = busy_job(mgr, active->path);
        if (job)
                return sd_bus_error_setf(error, ERROR_PREFIX "Busy", "'%s' is in use by job '%s'", active->path, job);
        d[0] = "path", d[1] = abs, d[2] = "root", d[3] = root_of(mgr, abs), d[4] = "operation", d[5] = "snapshot";
        d[6] = NULL;
        r = polkit_verify(mgr, m, "org.diskchain.create", d, error);
        if (r <= 0)
                return r < 0 ? r : 1;
        op = calloc(1, sizeof *op);
        if (!op)
                return -ENOMEM;
        op->overlay = TAKE_PTR(abs);
        op->existing = mode == 1;
        {
                /* relative to the overlay's directory when the active image is below it */
                g_autofree char *dir = g_path_get_dirname(op->overlay);
                size_t l = strlen(dir);
                op->backing = strncmp(active->path, dir, l) == 0 && active->path[l] == '/'
                                      ? strdup(active->path + l + 1)
                                      : strdup(active->path);
        }
        op->roots = g_strdupv(mgr->config.roots);
        r = work_start(mgr, m, snapshot_run, snapshot_done, op, snapshot_op_free, true);
        return r < 0 ? r : 1;
}

const sd_bus_vtable chain_vtable[] = {
        SD_BUS_VTABLE_START(0),
        SD_BUS_PROPERTY("Active", "o", property_get_active, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Layers", "ao", property_get_layers, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Depth", "u", property_get_depth, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("VirtualSize", "t", property_get_size, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Jobs", "ao", property_get_jobs, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Exports", "ao", property_get_none, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_METHOD_WITH_ARGS("Stream", SD_BUS_ARGS("a{sv}", options), SD_BUS_RESULT("o", job), method_stream,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Commit", SD_BUS_ARGS("a{sv}", options), SD_BUS_RESULT("o", job), method_commit,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Mirror", SD_BUS_ARGS("s", target, "a{sv}", options), SD_BUS_RESULT("o", job),
                                method_mirror, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Backup", SD_BUS_ARGS("s", target, "a{sv}", options), SD_BUS_RESULT("o", job),
                                method_backup, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Snapshot", SD_BUS_ARGS("s", overlay, "a{sv}", options), SD_BUS_RESULT("o", image),
                                method_snapshot, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_VTABLE_END,
};
