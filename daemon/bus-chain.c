/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* org.diskchain.DiskChain1.Chain: a top image and its backing files, and the block jobs on them. */

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <sys/stat.h>
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


/* --- block jobs -------------------------------------------------------------------- */

/*
 * Starting a job, in order: the options are read and checked, the model is
 * made current for every file the job names (model_freshen), polkit is
 * asked with every image the job reads or writes in its details, and then
 * job_start (job.c), all on the loop without a pause in between, reserves
 * the job id (so a second call with the same id, or the MaxJobs+1st, is
 * refused), claims the images busy and sets a target aside, and hands the
 * rest to a worker.
 */

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

const char *const cache_modes[] = { "writeback", "none", NULL };

static int job_common_options(Manager *mgr, GHashTable *opts, JobStart *s, sd_bus_error *error) {
        static const char *const on_errors[] = { "report", "ignore", "stop", "enospc", NULL };
        const char *id = NULL;
        uint64_t speed = 0;
        bool af = true, ad = true;
        int on_error = 0, on_target = -1, cache = DC_CACHE_WRITEBACK, r;

        if ((r = opt_string(opts, "job-id", &id, error)) < 0 || (r = opt_uint(opts, "speed", &speed, error)) < 0 ||
            (r = opt_enum(opts, "cache", cache_modes, &cache, error)) < 0 ||
            (r = opt_enum(opts, "on-error", on_errors, &on_error, error)) < 0 ||
            (r = opt_enum(opts, "on-source-error", on_errors, &on_error, error)) < 0 ||
            (r = opt_enum(opts, "on-target-error", on_errors, &on_target, error)) < 0 ||
            (r = opt_bool(opts, "auto-finalize", &af, error)) < 0 ||
            (r = opt_bool(opts, "auto-dismiss", &ad, error)) < 0)
                return r;
        if (id && job_id_in_use(mgr, id))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Job ID '%s' already in use", id);
        s->id = id ? strdup(id) : job_new_id(mgr, dc_job_type_name(s->type));
        s->jo = (struct dc_job_options){ .speed = speed, .cache = cache, .on_error = on_error,
                                         .has_target_error = on_target >= 0,
                                         .on_target_error = on_target, .auto_finalize = af, .auto_dismiss = ad };
        return 0;
}

/*
 * Authorize (DETAILS name every image: IMAGES all it reads or writes, WRITES
 * those it writes), reserve, claim PATHS and start S off the loop.  Returns
 * 1 when S belongs to the work now (the call is answered later), 0 while
 * polkit is asked, < 0 on error; in the last two cases the caller frees S.
 */
/* polkit details into OUT (room for 32 entries): the pairs of BASE, then those of MORE that fit. */
static void details_of(const char **out, const char *const *base, const char *const *more) {
        size_t n = 0;

        for (const char *const *d = base; *d; d += 2) {
                out[n++] = d[0];
                out[n++] = d[1];
        }
        for (const char *const *d = more; d && *d && n + 3 < 32; d += 2) {
                out[n++] = d[0];
                out[n++] = d[1];
        }
        out[n] = NULL;
}

static int start_job_as(sd_bus_message *m, Image *active, JobStart *s, char **images, char **writes, char **paths,
                        const char *action, const char *const *more, sd_bus_error *error) {
        Manager *mgr = active->mgr;
        const char *details[32];
        int r;

        s->d_images = paths_joined(images);
        s->d_writes = paths_joined(writes);
        s->d_roots = roots_joined(mgr, images);
        details_of(details,
                   (const char *const[]){ "path", active->path, "root", root_of(mgr, active->path), "operation",
                                          dc_job_type_name(s->type), "job-id", s->id, "top", s->top, "base", s->base,
                                          "target", s->target, "images", s->d_images, "writes", s->d_writes, "roots",
                                          s->d_roots, NULL },
                   more);
        r = polkit_verify(mgr, m, action, details, error);
        if (r <= 0)
                return r;
        return job_start(mgr, m, s, paths, error);
}


/* start_job_as, S freed unless the work has it: 1 (*RET_ID: the job's id), 0 while M waits, < 0 with ERROR. */
static int finish_start_as(sd_bus_message *m, Image *active, JobStart *s, char **images, char **writes, char **paths,
                           const char *action, const char *const *more, char **ret_id, sd_bus_error *error) {
        _cleanup_free_ char *id = ret_id ? strdup(s->id) : NULL;
        int r = start_job_as(m, active, s, images, writes, paths, action, more, error);

        if (r <= 0)
                job_start_free(s);
        if (r < 0 && !sd_bus_error_is_set(error))
                return r;
        if (sd_bus_error_is_set(error))
                return -EINVAL;
        if (r > 0 && ret_id)
                *ret_id = TAKE_PTR(id);
        return r;
}

static int finish_start(sd_bus_message *m, Image *active, JobStart *s, char **images, char **writes, char **paths,
                        sd_bus_error *error) {
        const char *action = s->type == DC_JOB_TYPE_BACKUP || s->type == DC_JOB_TYPE_MIRROR ? "org.diskchain.copy"
                                                                                            : "org.diskchain.modify";
        int r = finish_start_as(m, active, s, images, writes, paths, action, NULL, NULL, error);
        return r < 0 ? r : 1;
}

/* Every layer of LAYERS from FIRST to LAST (inclusive; LAST < 0: to the end), with their data files, as paths. */
static char **layer_paths(GPtrArray *layers, int first, int last, const char *extra, const char *extra2) {
        GPtrArray *a = g_ptr_array_new();
        for (int i = first; i < (int) layers->len && (last < 0 || i <= last); i++) {
                Image *l = layers->pdata[i];
                g_ptr_array_add(a, g_strdup(l->path));
                if (l->data_file_abs)
                        g_ptr_array_add(a, g_strdup(l->data_file_abs));
        }
        if (extra)
                g_ptr_array_add(a, g_strdup(extra));
        if (extra2)
                g_ptr_array_add(a, g_strdup(extra2));
        g_ptr_array_add(a, NULL);
        return (char **) g_ptr_array_free(a, FALSE);
}

/* Make the model current for the chain of ACTIVE (and EXTRA): 1, or 0 while it waits. */
static int freshen_chain(sd_bus_message *m, Image *active, GPtrArray *layers, const char *extra,
                         sd_bus_error *error) {
        g_auto(GStrv) paths = layer_paths(layers, 0, -1, extra, NULL);
        return model_freshen(active->mgr, m, paths, error);
}

/*
 * The backing-file option of Stream and Commit: the name recorded in the
 * header of the image at OWNER, which must lead (as QEMU would resolve it)
 * to BASE, inside the roots, with no protocol prefix.
 */
static int check_backing_file(Manager *mgr, const char *owner, const char *bf, Image *base, sd_bus_error *error) {
        _cleanup_free_ char *babs = NULL, *inside = NULL;
        int r;

        if (!*bf || strlen(bf) > 1023)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "backing-file must be 1..1023 bytes");
        r = dc_backing_resolve(owner, bf, &babs);
        if (r < 0)
                return bus_error_from_errno(error, r, dc_get_error());
        if (dc_path_resolve(babs, (const char *const *) mgr->config.roots, &inside, NULL) < 0)
                return sd_bus_error_setf(error, ERROR_PREFIX "PathNotAllowed",
                                         "'%s': backing file '%s' is outside the storage roots", owner, bf);
        if (!base || strcmp(babs, base->path) != 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "backing-file '%s' (seen from '%s', that is '%s') is not the base '%s'", bf,
                                         owner, babs, base ? base->path : "");
        return 0;
}

/* A stream job of ACTIVE's chain into TOP with the common OPTS, or NULL with ERROR (or out of memory: *RET_R). */
static JobStart *stream_job_new(Image *active, GPtrArray *layers, Image *top, GHashTable *opts, int *ret_r,
                                sd_bus_error *error) {
        JobStart *s;

        if (top->format != DC_FORMAT_QCOW2) {
                *ret_r = sd_bus_error_setf(error, ERROR_PREFIX "NotSupported",
                                           "'%s': only qcow2 images can receive streamed data", top->path);
                return NULL;
        }
        s = job_start_new(active->mgr, DC_JOB_TYPE_STREAM, active, layers);
        *ret_r = s ? job_common_options(active->mgr, opts, s, error) : -ENOMEM;
        if (*ret_r < 0) {
                job_start_free(s);
                return NULL;
        }
        s->top = strdup(top->path);
        return s;
}

int stream_start_internal(sd_bus_message *m, Image *active, sd_bus_error *error) {
        Manager *mgr = active->mgr;
        g_autoptr(GPtrArray) layers = chain_layer_images(mgr, active);
        g_autoptr(GHashTable) opts = g_hash_table_new(g_str_hash, g_str_equal);
        g_auto(GStrv) paths = NULL;
        JobStart *s;
        int r;

        s = stream_job_new(active, layers, active, opts, &r, error);
        if (!s)
                return r;
        paths = layer_paths(layers, 0, -1, NULL, NULL);
        r = job_start(mgr, m, s, paths, error);
        if (r <= 0)
                job_start_free(s);
        if (r < 0 && !sd_bus_error_is_set(error))
                return r;
        return sd_bus_error_is_set(error) ? -EINVAL : 1;
}

static int method_stream(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        static const char *const allowed[] = { "job-id", "top", "base", "bottom", "backing-file", "speed", "on-error",
                                               "cache", "auto-finalize", "auto-dismiss", NULL };
        Image *active = ACTIVE, *top = ACTIVE, *base = NULL, *bottom = NULL;
        Manager *mgr = active->mgr;
        g_autoptr(GHashTable) opts = NULL;
        g_autoptr(GPtrArray) layers = chain_layer_images(mgr, active);
        g_auto(GStrv) images = NULL, writes = NULL, paths = NULL;
        const char *v = NULL, *bf = NULL;
        JobStart *s;
        int ti = 0, bi = -1, r;

        r = parse_options(m, allowed, &opts, error);
        if (r < 0)
                return r;
        r = freshen_chain(m, active, layers, NULL, error);
        if (r <= 0)
                return r < 0 ? r : 1;
        if (opt_string(opts, "top", &v, error) > 0 && (ti = find_layer_opt(mgr, layers, v, "top", &top, error)) < 0)
                return ti;
        if (opt_string(opts, "base", &v, error) > 0) {
                if (g_hash_table_contains(opts, "bottom"))
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "'base' and 'bottom' are mutually exclusive");
                if ((bi = find_layer_opt(mgr, layers, v, "base", &base, error)) < 0)
                        return bi;
        }
        if (opt_string(opts, "bottom", &v, error) > 0) {
                int bo = find_layer_opt(mgr, layers, v, "bottom", &bottom, error);
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
        if ((r = opt_string(opts, "backing-file", &bf, error)) < 0)
                return r;
        if (bf && !base)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "backing file specified, but streaming the entire chain");
        if (bf && (r = check_backing_file(mgr, top->path, bf, base, error)) < 0)
                return r;
        s = stream_job_new(active, layers, top, opts, &r, error);
        if (!s)
                return r;
        s->base = base ? strdup(base->path) : NULL;
        s->backing_file = bf ? strdup(bf) : NULL;
        /* reads top and every layer down to base; writes top (data and its header) */
        images = layer_paths(layers, ti, bi, NULL, NULL);
        writes = layer_paths(layers, ti, ti, NULL, NULL);
        paths = layer_paths(layers, ti, bi, NULL, NULL);
        return finish_start(m, active, s, images, writes, paths, error);
}

static int method_commit(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        static const char *const allowed[] = { "job-id", "top", "base", "backing-file", "speed", "on-error",
                                               "cache", "auto-finalize", "auto-dismiss", "force-shared-base", NULL };
        Image *active = ACTIVE, *top = ACTIVE, *base;
        Manager *mgr = active->mgr;
        g_autoptr(GHashTable) opts = NULL;
        g_autoptr(GPtrArray) layers = chain_layer_images(mgr, active);
        g_auto(GStrv) images = NULL, writes = NULL, paths = NULL;
        const char *v = NULL, *bf = NULL;
        bool force_shared = false;
        JobStart *s;
        int ti = 0, bi, r;

        r = parse_options(m, allowed, &opts, error);
        if (r < 0)
                return r;
        r = freshen_chain(m, active, layers, NULL, error);
        if (r <= 0)
                return r < 0 ? r : 1;
        if (opt_string(opts, "top", &v, error) > 0 && (ti = find_layer_opt(mgr, layers, v, "top", &top, error)) < 0)
                return ti;
        bi = (int) layers->len - 1;
        base = layers->pdata[bi];
        if (opt_string(opts, "base", &v, error) > 0 && (bi = find_layer_opt(mgr, layers, v, "base", &base, error)) < 0)
                return bi;
        if ((r = opt_string(opts, "backing-file", &bf, error)) < 0 ||
            (r = opt_bool(opts, "force-shared-base", &force_shared, error)) < 0)
                return r;
        if (bi == ti)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "cannot commit an image into itself");
        if (bi < ti)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "'%s' is not below '%s' in the chain",
                                         base->path, top->path);
        if (ti == 0 && bf)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "'backing-file' specified, but 'top' is the active layer");
        if (bf && (r = check_backing_file(mgr, ((Image *) layers->pdata[ti - 1])->path, bf, base, error)) < 0)
                return r;
        if (!force_shared) {
                g_auto(GStrv) users = image_chains(mgr, base);
                if (g_strv_length(users) > 1)
                        return sd_bus_error_setf(error, ERROR_PREFIX "Busy",
                                                 "'%s' is also the base of %u other chain(s); set force-shared-base to "
                                                 "commit into it anyway",
                                                 base->path, g_strv_length(users) - 1);
        }
        s = job_start_new(mgr, DC_JOB_TYPE_COMMIT, active, layers);
        if (!s)
                return -ENOMEM;
        r = job_common_options(mgr, opts, s, error);
        if (r < 0) {
                job_start_free(s);
                return r;
        }
        /* top the active layer: active commit, with a ready phase and a pivot to base */
        s->overlay = ti > 0 ? strdup(((Image *) layers->pdata[ti - 1])->path) : NULL;
        s->top = strdup(top->path);
        s->base = strdup(base->path);
        s->backing_file = bf ? strdup(bf) : NULL;
        /* reads top down to base; writes base (the data) and top's overlay (its header) */
        images = layer_paths(layers, ti > 0 ? ti - 1 : 0, bi, NULL, NULL);
        writes = layer_paths(layers, bi, bi, s->overlay, NULL);
        paths = layer_paths(layers, ti > 0 ? ti - 1 : 0, bi, NULL, NULL);
        return finish_start(m, active, s, images, writes, paths, error);
}

/*
 * The target of a backup or mirror: a path in the roots, not a layer of
 * the chain; new (absolute-paths), or an image that exists (existing) of
 * the source's size, that is no chain's backing file and not in use.
 */
static int target_check(Manager *mgr, Image *active, GPtrArray *layers, const char *abs, int mode,
                        const char *same_msg, Image **ret_tgt, sd_bus_error *error) {
        Image *tgt = g_hash_table_lookup(mgr->images, abs);

        *ret_tgt = NULL;
        if (strcmp(abs, active->path) == 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "%s", same_msg);
        if (mode == 0 && tgt)
                return sd_bus_error_setf(error, ERROR_PREFIX "Exists", "'%s' already exists (use mode 'existing')", abs);
        for (guint i = 1; i < layers->len; i++)
                if (strcmp(((Image *) layers->pdata[i])->path, abs) == 0)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                                 "'%s' is in the source's backing chain", abs);
        if (mode == 1) {
                _cleanup_free_ char *use = NULL;
                const char *in_use;
                if (!tgt)
                        return sd_bus_error_setf(error, ERROR_PREFIX "NotFound", "'%s': no such image", abs);
                if (tgt->error)
                        return bus_error_from_errno(error, tgt->error_errno, tgt->error);
                if (tgt->virtual_size != active->virtual_size)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                                 "Source and target image have different sizes ('%s' has %" PRIu64
                                                 " bytes, '%s' %" PRIu64 ")",
                                                 active->path, active->virtual_size, abs, tgt->virtual_size);
                if (image_in_any_chain(mgr, tgt))
                        return sd_bus_error_setf(error, ERROR_PREFIX "Busy",
                                                 "'%s' is the backing file of another image: it cannot be a target",
                                                 abs);
                in_use = image_in_use(mgr, tgt, &use);
                if (*in_use)
                        return sd_bus_error_setf(error, ERROR_PREFIX "Busy", "'%s' is in use (%s)", abs, in_use);
                *ret_tgt = tgt;
        }
        return 0;
}

/* Backup's and Mirror's sync values, indexed by DC_SYNC_* and beyond. */
static const char *const copy_syncs[] = { "full", "top", "none", "incremental", "bitmap", NULL };

/* Fill in S's target: made for the job (absolute-paths) over the right backing for SYNC, or existing. */
static int target_setup(JobStart *s, Image *active, const char *abs, int mode, int format, int sync,
                        sd_bus_error *error) {
        s->top = strdup(active->path);
        s->target = strdup(abs);
        s->create_target = mode == 0;
        s->co.format = format == 1 ? DC_FORMAT_RAW : DC_FORMAT_QCOW2;
        if (mode == 0 && sync == DC_SYNC_TOP && active->backing_abs)
                s->target_backing = strdup(active->backing_abs); /* top: valid over the same backing */
        else if (mode == 0 && sync == DC_SYNC_NONE)
                s->target_backing = strdup(active->path);         /* none: over the source itself */
        if (s->target_backing && format == 1)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "sync '%s' needs a target with a backing file: use format qcow2", copy_syncs[sync]);
        return 0;
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

/* A backup's or mirror's start into the file ABS: the target checked, the common options read, the target
 * set up; NULL with *RET_R (and ERROR) when refused. */
static JobStart *copy_start_new(Image *active, GPtrArray *layers, GHashTable *opts, int type, const char *abs,
                                int mode, int format, int sync, const char *same, Image **ret_tgt, int *ret_r,
                                sd_bus_error *error) {
        Manager *mgr = active->mgr;
        JobStart *s;

        *ret_r = target_check(mgr, active, layers, abs, mode, same, ret_tgt, error);
        if (*ret_r < 0)
                return NULL;
        s = job_start_new(mgr, type, active, layers);
        *ret_r = s ? job_common_options(mgr, opts, s, error) : -ENOMEM;
        if (*ret_r >= 0)
                *ret_r = target_setup(s, active, abs, mode, format, sync, error);
        if (*ret_r < 0) {
                job_start_free(s);
                return NULL;
        }
        return s;
}

/*
 * A backup or mirror into an NBD export (TARGET a URI): nothing to create
 * and no file in the roots, so no mode absolute-paths, no format, no
 * compress.  The normal form of the URI is what polkit sees as "target"
 * and what the job claims, so that two jobs never write one export; the
 * socket of an nbd+unix URI is connected with the caller's rights
 * (remote.c).
 */
static int remote_job_start_as(sd_bus_message *m, Image *active, GPtrArray *layers, GHashTable *opts,
                               const char *target, int type, int mode, const struct dc_backup_options *bo,
                               const struct dc_mirror_options *mo, uint64_t speed, const char *action,
                               const char *const *more, char **ret_id, sd_bus_error *error) {
        _cleanup_free_ char *uri = NULL;
        g_auto(GStrv) images = NULL;
        JobStart *s;
        int r;

        r = dc_nbd_uri_normalize(target, false, &uri, NULL);
        if (r < 0)
                return sd_bus_error_set(error, SD_BUS_ERROR_INVALID_ARGS, dc_get_error());
        if (g_hash_table_contains(opts, "mode") && mode == 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "'%s': the daemon cannot create an NBD export; make the target on the "
                                         "server and use mode 'existing' (what a URI means without 'mode')", uri);
        if (g_hash_table_contains(opts, "format"))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "'%s': an NBD export has no format to choose here (its server decides); "
                                         "drop 'format'", uri);
        if (bo && bo->compress)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "'%s': compress writes qcow2 compressed clusters, which an NBD export does "
                                         "not have", uri);
        r = freshen_chain(m, active, layers, NULL, error);
        if (r <= 0)
                return r < 0 ? r : 1;
        s = job_start_new(active->mgr, type, active, layers);
        if (!s)
                return -ENOMEM;
        r = job_common_options(active->mgr, opts, s, error);
        if (r < 0) {
                job_start_free(s);
                return r;
        }
        s->top = strdup(active->path);
        s->target = TAKE_PTR(uri);
        s->remote = true;
        if (action) /* the daemon's own start: its speed, not an option */
                s->jo.speed = speed;
        if (bo) {
                s->bo = *bo;
                s->bo.bitmap = s->bitmap = bo->bitmap ? strdup(bo->bitmap) : NULL;
                s->bo.checkpoint = s->checkpoint = bo->checkpoint ? strdup(bo->checkpoint) : NULL;
        }
        if (mo) {
                s->mo = *mo;
                s->mo.existing = true;
        }
        /* reads every layer; writes the export, which is no image of ours */
        images = layer_paths(layers, 0, -1, NULL, NULL);
        if (action)
                return finish_start_as(m, active, s, images, (char *[]){ s->target, NULL }, images, action, more,
                                       ret_id, error);
        return finish_start(m, active, s, images, (char *[]){ s->target, NULL }, images, error);
}

static int remote_job_start(sd_bus_message *m, Image *active, GPtrArray *layers, GHashTable *opts, const char *target,
                            int type, int mode, const struct dc_backup_options *bo, const struct dc_mirror_options *mo,
                            sd_bus_error *error) {
        return remote_job_start_as(m, active, layers, opts, target, type, mode, bo, mo, 0, NULL, NULL, NULL, error);
}

/*
 * The start of a backup or mirror, after its own options: the model made
 * current for the chain and the target, the target checked, the common
 * options read, the target set up, polkit asked, the job started.
 */
static int copy_job_start(sd_bus_message *m, Image *active, GPtrArray *layers, GHashTable *opts, const char *target,
                          int type, int mode, int format, int sync, const struct dc_backup_options *bo,
                          const struct dc_mirror_options *mo, sd_bus_error *error) {
        Manager *mgr = active->mgr;
        bool mirror = type == DC_JOB_TYPE_MIRROR;
        _cleanup_free_ char *abs = NULL;
        g_auto(GStrv) images = NULL, paths = NULL;
        Image *tgt = NULL;
        JobStart *s;
        int r;

        if (dc_nbd_uri_is(target))
                return remote_job_start(m, active, layers, opts, target, type, mode, bo, mo, error);
        r = manager_resolve_path(mgr, target, &abs, error);
        if (r < 0)
                return r;
        r = freshen_chain(m, active, layers, abs, error);
        if (r <= 0)
                return r < 0 ? r : 1;
        s = copy_start_new(active, layers, opts, type, abs, mode, format, sync,
                           mirror ? "Can't mirror node into itself" : "Source and target cannot be the same", &tgt,
                           &r, error);
        if (!s)
                return r;
        if (bo) {
                s->bo = *bo;
                s->bo.bitmap = s->bitmap = bo->bitmap ? strdup(bo->bitmap) : NULL;
                s->bo.checkpoint = s->checkpoint = bo->checkpoint ? strdup(bo->checkpoint) : NULL;
        }
        if (mo)
                s->mo = *mo;
        /* reads every layer (and, at a mirror's pivot, the existing target's backing); writes the target */
        images = layer_paths(layers, 0, -1, abs, tgt && tgt->backing_abs ? tgt->backing_abs : NULL);
        paths = layer_paths(layers, 0, -1, abs, NULL);
        return finish_start(m, active, s, images, (char *[]){ abs, NULL }, paths, error);
}

/*
 * A backup the daemon asks for on M's behalf (a plan's run, a restore):
 * SOURCE's chain (SOURCE need not be an active layer) into TARGET_ABS,
 * made for the job (over TARGET_BACKING, as the header names it, when not
 * NULL), at SPEED bytes/s (0: no limit), polkit ACTION with MORE details.  As Backup: 1 when the job is
 * starting (M answered with it later), 0 while M waits (it is dispatched
 * again), < 0 with ERROR.  *RET_ID: the job's id when 1.
 */
int backup_start_internal(sd_bus_message *m, Image *source, const char *target_abs, const char *target_backing,
                          int format, const struct dc_backup_options *bo, uint64_t speed, const char *action,
                          const char *const *more, char **ret_id, sd_bus_error *error) {
        Manager *mgr = source->mgr;
        g_autoptr(GPtrArray) layers = chain_layer_images(mgr, source);
        g_autoptr(GHashTable) opts = g_hash_table_new(g_str_hash, g_str_equal);
        g_auto(GStrv) images = NULL, paths = NULL;
        Image *tgt = NULL;
        JobStart *s;
        int r;

        if (dc_nbd_uri_is(target_abs)) /* a plan's replica: the export it updates */
                return remote_job_start_as(m, source, layers, opts, target_abs, DC_JOB_TYPE_BACKUP, 1, bo, NULL, speed,
                                           action, more, ret_id, error);
        r = freshen_chain(m, source, layers, target_abs, error);
        if (r <= 0)
                return r;
        s = copy_start_new(source, layers, opts, DC_JOB_TYPE_BACKUP, target_abs, 0, format, bo->sync,
                           "Source and target cannot be the same", &tgt, &r, error);
        if (!s)
                return r;
        if (target_backing) {
                free(s->target_backing);
                s->target_backing = strdup(target_backing);
        }
        s->jo.speed = speed;
        s->bo = *bo;
        s->bo.bitmap = s->bitmap = bo->bitmap ? strdup(bo->bitmap) : NULL;
        s->bo.checkpoint = s->checkpoint = bo->checkpoint ? strdup(bo->checkpoint) : NULL;
        images = layer_paths(layers, 0, -1, target_abs, NULL);
        paths = layer_paths(layers, 0, -1, target_abs, NULL);
        return finish_start_as(m, source, s, images, (char *[]){ (char *) target_abs, NULL }, paths, action, more,
                               ret_id, error);
}

/*
 * A restore of a replica: the NBD export URI (a plan's remote destination,
 * normalised), read-only, copied by a Backup job into TARGET_ABS, a new
 * image of SIZE bytes (FORMAT 1: raw), for M's caller as polkit ACTION
 * with MORE details allows.  The URI is claimed for the job, so no run of
 * the plan updates the replica while it is read.  Returns as
 * backup_start_internal.
 */
int restore_remote_start(Manager *mgr, sd_bus_message *m, const char *uri, uint64_t size, const char *target_abs,
                         int format, const char *action, const char *const *more, char **ret_id,
                         sd_bus_error *error) {
        _cleanup_free_ char *id = NULL;
        const char *details[32];
        JobStart *s;
        int r;

        r = model_freshen(mgr, m, (char *[]){ (char *) target_abs, NULL }, error);
        if (r <= 0)
                return r;
        if (model_find(mgr, target_abs))
                return sd_bus_error_setf(error, ERROR_PREFIX "Exists", "'%s' already exists", target_abs);
        s = calloc(1, sizeof *s);
        if (!s)
                return -ENOMEM;
        s->mgr = mgr;
        s->type = DC_JOB_TYPE_BACKUP;
        s->id = job_new_id(mgr, "backup");
        s->expect = g_strdupv((char *[]){ (char *) uri, NULL });
        s->chain_object = chain_object_path(target_abs); /* the chain the job makes */
        s->top = strdup(uri);
        s->target = strdup(target_abs);
        s->remote_source = true;
        s->create_target = true;
        s->target_size = size;
        s->co.format = format == 1 ? DC_FORMAT_RAW : DC_FORMAT_QCOW2;
        s->bo = (struct dc_backup_options){ .sync = DC_SYNC_FULL };
        s->jo = (struct dc_job_options){ .auto_finalize = true, .auto_dismiss = true };
        s->d_images = g_strdup_printf("%s\n%s", uri, target_abs);
        s->d_writes = g_strdup(target_abs);
        details_of(details,
                   (const char *const[]){ "path", uri, "operation", "backup", "job-id", s->id, "top", uri, "target",
                                          target_abs, "images", s->d_images, "writes", s->d_writes, "roots",
                                          root_of(mgr, target_abs), NULL },
                   more);
        r = polkit_verify(mgr, m, action, details, error);
        if (r <= 0) {
                job_start_free(s);
                return r;
        }
        id = strdup(s->id);
        r = job_start(mgr, m, s, (char *[]){ (char *) uri, NULL }, error);
        if (r < 0) {
                job_start_free(s);
                return sd_bus_error_is_set(error) ? -EINVAL : r;
        }
        if (ret_id)
                *ret_id = TAKE_PTR(id);
        return 1;
}

static int method_backup(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        static const char *const allowed[] = { "job-id", "sync", "mode", "format", "compress", "bitmap", "bitmap-mode",
                                               "checkpoint", "speed", "cache", "on-source-error", "on-target-error",
                                               "max-workers", "max-chunk", "auto-finalize", "auto-dismiss", NULL };
        Image *active = ACTIVE;
        g_autoptr(GHashTable) opts = NULL;
        g_autoptr(GPtrArray) layers = chain_layer_images(active->mgr, active);
        static const char *const bitmap_modes[] = { "on-success", "never", "always", NULL };
        const char *target, *bitmap = NULL, *checkpoint = NULL;
        int sync = 0, mode = 0, format = 0, bitmap_mode = -1, r;
        bool compress = false;
        uint64_t workers = 0, chunk = 0;
        struct dc_backup_options bo;

        if ((r = copy_job_options(m, allowed, &target, &opts, &sync, &mode, &format, error)) < 0 ||
            (r = opt_bool(opts, "compress", &compress, error)) < 0 ||
            (r = opt_uint(opts, "max-workers", &workers, error)) < 0 ||
            (r = opt_uint(opts, "max-chunk", &chunk, error)) < 0 ||
            (r = opt_string(opts, "bitmap", &bitmap, error)) < 0 ||
            (r = opt_enum(opts, "bitmap-mode", bitmap_modes, &bitmap_mode, error)) < 0 ||
            (r = opt_checkpoint(opts, active, &checkpoint, error)) < 0)
                return r;
        if (g_hash_table_contains(opts, "max-workers") && (workers < 1 || workers > 16))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "max-workers must be 1..16");
        if (compress && format == 1)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "Compression is not supported for this drive");
        bo = (struct dc_backup_options){ .sync = sync, .compress = compress, .max_workers = (unsigned) workers,
                                         .max_chunk = chunk, .bitmap = bitmap, .bitmap_mode = bitmap_mode + 1,
                                         .checkpoint = checkpoint };
        return copy_job_start(m, active, layers, opts, target, DC_JOB_TYPE_BACKUP, mode, format, sync, &bo, NULL,
                              error);
}

static int method_mirror(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        static const char *const allowed[] = { "job-id", "sync", "mode", "format", "granularity", "buf-size", "speed",
                                               "cache", "on-source-error", "on-target-error", "unmap", "copy-mode",
                                               "auto-finalize", "auto-dismiss", NULL };
        static const char *const copy_modes[] = { "background", "write-blocking", NULL };
        Image *active = ACTIVE;
        g_autoptr(GHashTable) opts = NULL;
        g_autoptr(GPtrArray) layers = chain_layer_images(active->mgr, active);
        const char *target;
        int sync = 0, mode = 0, format = active->format == DC_FORMAT_RAW ? 1 : 0, copy_mode = 0, r;
        uint64_t granularity = 0, buf_size = 0;
        bool unmap = true;
        struct dc_mirror_options mo;

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
        mo = (struct dc_mirror_options){ .sync = sync, .existing = mode == 1, .granularity = (uint32_t) granularity,
                                         .buf_size = buf_size, .unmap = unmap,
                                         .copy_mode = copy_mode ? DC_COPY_MODE_WRITE_BLOCKING : DC_COPY_MODE_BACKGROUND };
        return copy_job_start(m, active, layers, opts, target, DC_JOB_TYPE_MIRROR, mode, format, sync, NULL, &mo,
                              error);
}

/* --- Snapshot (blockdev-snapshot-sync) --------------------------------------- */

typedef struct SnapshotOp {
        char *overlay, *backing, **roots;
        const struct dc_format_oracle *oracle;
        uint64_t size;
        bool existing;
        dc_disk *disk;        /* the export's write path, when the chain is exported */
        char *export_name;
} SnapshotOp;

static void snapshot_op_free(void *p) {
        SnapshotOp *op = p;
        dc_disk_unref(op->disk); /* only when the work never ran */
        free(op->export_name);
        free(op->overlay);
        free(op->backing);
        g_strfreev(op->roots);
        free(op);
}

static void snapshot_run(Work *w) {
        SnapshotOp *op = w->data;
        struct dc_create_options o = { .backing = op->backing, .backing_format = -1, .oracle = op->oracle,
                                       .backing_ours = op->disk != NULL };
        int r;

        if (!op->existing)
                r = dc_image_create(op->overlay, 0, &o, (const char *const *) op->roots);
        else {
                /* an existing overlay of the right size, with no backing yet */
                struct dc_open_options oo = { .roots = (const char *const *) op->roots, .oracle = op->oracle,
                                              .writable = true, .no_backing = true };
                dc_image *img = NULL;
                r = dc_image_open(op->overlay, &oo, &img);
                if (r >= 0 && *dc_image_backing_file(img))
                        r = dc_set_error(EEXIST, "'%s' already has a backing file", op->overlay);
                else if (r >= 0 && dc_image_virtual_size(img) != op->size)
                        r = dc_set_error(EINVAL, "'%s' has %" PRIu64 " bytes, the active layer %" PRIu64, op->overlay,
                                         dc_image_virtual_size(img), op->size);
                if (r >= 0)
                        r = dc_image_set_backing(img, op->backing, "qcow2");
                dc_image_close(img);
        }
        if (r >= 0 && op->disk) {
                /* the export's clients move to the overlay: they wait at the disk's door meanwhile */
                r = dc_disk_snapshot(op->disk, op->overlay);
                if (r < 0 && !op->existing) {
                        char saved[512];
                        snprintf(saved, sizeof saved, "%s", dc_get_error());
                        (void) dc_path_unlink(op->overlay, (const char *const *) op->roots, NULL);
                        r = dc_set_error(-r, "%s", saved);
                }
        }
        op->disk = dc_disk_unref(op->disk); /* off the loop: it may be the last reference */
        work_capture_error(w, r);
}

static void snapshot_done(Work *w) {
        SnapshotOp *op = w->data;
        Export *e = op->export_name ? g_hash_table_lookup(w->mgr->exports, op->export_name) : NULL;
        if (w->r >= 0)
                log_fields(LOG_INFO, (const char *const[]){ "DISKCHAIN_IMAGE", op->overlay, NULL },
                           "snapshot: '%s' is the new active layer over '%s'", op->overlay, op->backing);
        if (e && e->state == EXPORT_LIVE)
                export_moved(e);
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
        g_autofree char *images = NULL;
        const char *overlay, *job;
        int fmt = 0, mode = 0, r;
        Export *exp;
        SnapshotOp *op;
        Image *ov;
        Work *w;

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
        r = model_freshen(mgr, m, (char *[]){ active->path, abs, NULL }, error);
        if (r <= 0)
                return r < 0 ? r : 1;
        ov = g_hash_table_lookup(mgr->images, abs);
        if (mode == 0 && ov)
                return sd_bus_error_setf(error, ERROR_PREFIX "Exists", "'%s' already exists", abs);
        if (mode == 1) {
                _cleanup_free_ char *use = NULL;
                const char *in_use;
                if (!ov)
                        return sd_bus_error_setf(error, ERROR_PREFIX "NotFound", "'%s': no such image", abs);
                if (ov->error)
                        return bus_error_from_errno(error, ov->error_errno, ov->error);
                if (ov->format != DC_FORMAT_QCOW2)
                        return sd_bus_error_setf(error, ERROR_PREFIX "NotSupported",
                                                 "'%s': only a qcow2 image can be an overlay", abs);
                if (ov->backing_abs)
                        return sd_bus_error_setf(error, ERROR_PREFIX "Exists", "'%s' already has a backing file", abs);
                if (image_in_any_chain(mgr, ov))
                        return sd_bus_error_setf(error, ERROR_PREFIX "Busy",
                                                 "'%s' is the backing file of another image: it cannot be an overlay",
                                                 abs);
                if (ov->virtual_size != active->virtual_size)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                                 "'%s' has %" PRIu64 " bytes, the active layer '%s' %" PRIu64, abs,
                                                 ov->virtual_size, active->path, active->virtual_size);
                in_use = image_in_use(mgr, ov, &use);
                if (*in_use)
                        return sd_bus_error_setf(error, ERROR_PREFIX "Busy", "'%s' is in use (%s)", abs, in_use);
        }
        job = claims_holder(mgr->claims, active->path);
        if (job)
                return sd_bus_error_setf(error, ERROR_PREFIX "Busy", "'%s' is in use by job '%s'", active->path, job);
        exp = export_of_path(mgr, active->path);
        if (exp && strcmp(exp->active, active->path) != 0)
                return sd_bus_error_setf(error, ERROR_PREFIX "Busy", "'%s' is exported over NBD as '%s'", active->path,
                                         exp->name);
        if (exp && exp->state != EXPORT_LIVE)
                return sd_bus_error_setf(error, ERROR_PREFIX "Busy", "'%s' is exported as '%s', which is %s",
                                         active->path, exp->name,
                                         exp->state == EXPORT_STARTING ? "starting" : "stopping");
        images = paths_joined((char *[]){ active->path, abs, NULL });
        /* a new overlay is a creation; rewriting an existing image's backing is a change to it */
        r = polkit_verify(mgr, m, mode == 1 ? "org.diskchain.modify" : "org.diskchain.create",
                          (const char *const[]){ "path", abs, "root", root_of(mgr, abs), "operation", "snapshot",
                                                 "backing", active->path, "images", images, "writes", abs, NULL },
                          error);
        if (r <= 0)
                return r < 0 ? r : 1;
        op = calloc(1, sizeof *op);
        if (!op)
                return -ENOMEM;
        op->overlay = TAKE_PTR(abs);
        op->existing = mode == 1;
        op->size = active->virtual_size;
        op->oracle = &mgr->oracle;
        {
                /* relative to the overlay's directory when the active image is below it */
                g_autofree char *dir = g_path_get_dirname(op->overlay);
                size_t l = strlen(dir);
                op->backing = strncmp(active->path, dir, l) == 0 && active->path[l] == '/'
                                      ? strdup(active->path + l + 1)
                                      : strdup(active->path);
        }
        op->roots = g_strdupv(mgr->config.roots);
        if (exp) {
                op->disk = dc_disk_ref(exp->disk);
                op->export_name = strdup(exp->name);
        }
        w = work_new(mgr, snapshot_run, snapshot_done, op, snapshot_op_free);
        if (!w)
                return -ENOMEM;
        w->refresh = g_strdupv((char *[]){ op->overlay, active->path, NULL });
        if (op->existing)
                w->holds = g_strdupv((char *[]){ op->overlay, NULL });
        r = work_submit(w, m);
        return r < 0 ? r : 1;
}

const sd_bus_vtable chain_vtable[] = {
        SD_BUS_VTABLE_START(0),
        SD_BUS_PROPERTY("Active", "o", property_get_active, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Layers", "ao", property_get_layers, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Depth", "u", property_get_depth, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("VirtualSize", "t", property_get_size, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Jobs", "ao", property_get_jobs, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Exports", "ao", property_get_chain_exports, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
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
        SD_BUS_METHOD_WITH_ARGS("Export", SD_BUS_ARGS("a{sv}", options), SD_BUS_RESULT("o", export),
                                method_chain_export, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("OpenNBD", SD_BUS_ARGS("a{sv}", options), SD_BUS_RESULT("h", fd),
                                method_chain_open_nbd, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_VTABLE_END,
};
