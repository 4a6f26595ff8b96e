/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* org.diskchain.DiskChain1.Manager. */

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config.h"
#include "daemon.h"

/*
 * Read the path argument and find its image, the files as they are now:
 * 1 with the image, 0 when the call waits for the model to catch up (it
 * is dispatched again), < 0 with ERROR saying what is there instead.
 */
static int read_image_arg(Manager *mgr, sd_bus_message *m, Image **ret, sd_bus_error *error) {
        _cleanup_free_ char *abs = NULL;
        const char *path;
        Image *img;
        int r;

        r = sd_bus_message_read(m, "s", &path);
        if (r < 0)
                return r;
        r = manager_resolve_path(mgr, path, &abs, error);
        if (r < 0)
                return r;
        r = model_freshen(mgr, m, (char *[]){ abs, NULL }, error);
        if (r <= 0)
                return r;
        img = g_hash_table_lookup(mgr->images, abs);
        if (!img)
                return sd_bus_error_setf(error, ERROR_PREFIX "NotFound", "'%s': no such image", abs);
        if (img->error)
                return bus_error_from_errno(error, img->error_errno, img->error);
        *ret = img;
        return 1;
}

static int method_get_image(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        Image *img;
        int r = read_image_arg(userdata, m, &img, error);
        if (r <= 0)
                return r < 0 ? r : 1;
        return sd_bus_reply_method_return(m, "o", img->object);
}

static int method_get_chain(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        _cleanup_free_ char *p = NULL;
        Image *img;
        int r = read_image_arg(userdata, m, &img, error);
        if (r <= 0)
                return r < 0 ? r : 1;
        if (img->superseded_by)
                return sd_bus_error_setf(error, ERROR_PREFIX "NotFound",
                                         "'%s' was replaced by '%s' when a job pivoted; it is no chain's active layer",
                                         img->path, img->superseded_by);
        if (!image_is_active(userdata, img))
                return sd_bus_error_setf(error, ERROR_PREFIX "NotFound",
                                         "'%s' is a backing file, not the active layer of a chain", img->path);
        p = chain_object_path(img->path);
        return sd_bus_reply_method_return(m, "o", p);
}

static int method_list(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        Manager *mgr = userdata;
        const char *member = sd_bus_message_get_member(m);
        g_auto(GStrv) l = NULL;
        sd_bus_message *reply = NULL;
        int r;

        if (strcmp(member, "ListJobs") != 0 && strcmp(member, "ListExports") != 0) {
                r = model_freshen(mgr, m, NULL, error);
                if (r <= 0)
                        return r < 0 ? r : 1;
        }
        if (strcmp(member, "ListImages") == 0)
                l = model_image_paths(mgr);
        else if (strcmp(member, "ListChains") == 0)
                l = model_chain_paths(mgr);
        else if (strcmp(member, "ListExports") == 0)
                l = model_export_paths(mgr);
        else
                l = model_job_paths(mgr);
        r = sd_bus_message_new_method_return(m, &reply);
        if (r >= 0)
                r = append_objects(reply, l);
        if (r >= 0)
                r = sd_bus_send(NULL, reply, NULL);
        sd_bus_message_unref(reply);
        return r;
}

static int method_get_job(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        Manager *mgr = userdata;
        const char *id;
        Job *j;
        int r = sd_bus_message_read(m, "s", &id);
        if (r < 0)
                return r;
        j = g_hash_table_lookup(mgr->jobs, id);
        if (!j)
                return sd_bus_error_setf(error, ERROR_PREFIX "NotFound", "no job '%s'", id);
        return sd_bus_reply_method_return(m, "o", j->object);
}

static int method_query_block_jobs(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        sd_bus_message *reply = NULL;
        int r = sd_bus_message_new_method_return(m, &reply);
        if (r >= 0)
                r = append_job_infos(userdata, reply);
        if (r >= 0)
                r = sd_bus_send(NULL, reply, NULL);
        sd_bus_message_unref(reply);
        return r;
}

/* CreateImage and ClassifyImage */

typedef struct CreateOp {
        char *path;
        char **roots;
        uint64_t size;
        struct dc_create_options o;
        char *backing;
        Registry *registry;
        int format;           /* ClassifyImage */
} CreateOp;

static void create_op_free(void *p) {
        CreateOp *op = p;
        free(op->path);
        free(op->backing);
        g_strfreev(op->roots);
        free(op);
}

static void create_run(Work *w) {
        CreateOp *op = w->data;
        work_capture_error(w, dc_image_create(op->path, op->size, &op->o, (const char *const *) op->roots));
}

static void create_done(Work *w) {
        CreateOp *op = w->data;
        if (w->r >= 0)
                log_fields(LOG_INFO, (const char *const[]){ "DISKCHAIN_IMAGE", op->path, NULL },
                           "created '%s' (%s, %" PRIu64 " bytes%s%s)", op->path, dc_format_name(op->o.format), op->size,
                           op->backing ? ", backing file " : "", op->backing ? op->backing : "");
        reply_new_image(w, op->path);
}

static Work *create_work(Manager *mgr, CreateOp *op, work_fn run, work_fn done) {
        Work *w = work_new(mgr, run, done, op, create_op_free);
        if (w)
                w->refresh = g_strdupv((char *[]){ op->path, NULL });
        return w;
}

static int method_create_image(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        static const char *const allowed[] = { "format", "backing", "backing-format", "cluster-size", "compat",
                                               "compression-type", "preallocation", "lazy-refcounts",
                                               "refcount-bits", NULL };
        static const char *const formats[] = { "qcow2", "raw", NULL };
        static const char *const compats[] = { "0.10", "1.1", NULL };
        static const char *const ctypes[] = { "zlib", "zstd", NULL };
        static const char *const preallocs[] = { "off", "metadata", "falloc", "full", NULL };
        Manager *mgr = userdata;
        g_autoptr(GHashTable) opts = NULL;
        _cleanup_free_ char *abs = NULL, *babs = NULL;
        const char *path, *backing = NULL;
        uint64_t size, v;
        int format = 0, bformat = -1, compat = 1, ctype = 0, prealloc = 0, r;
        bool lazy = false;
        CreateOp *op;
        Work *w;

        r = sd_bus_message_read(m, "st", &path, &size);
        if (r < 0)
                return r;
        r = parse_options(m, allowed, &opts, error);
        if (r < 0)
                return r;
        if ((r = opt_enum(opts, "format", formats, &format, error)) < 0 ||
            (r = opt_enum(opts, "backing-format", formats, &bformat, error)) < 0 ||
            (r = opt_enum(opts, "compat", compats, &compat, error)) < 0 ||
            (r = opt_enum(opts, "compression-type", ctypes, &ctype, error)) < 0 ||
            (r = opt_enum(opts, "preallocation", preallocs, &prealloc, error)) < 0 ||
            (r = opt_bool(opts, "lazy-refcounts", &lazy, error)) < 0 ||
            (r = opt_string(opts, "backing", &backing, error)) < 0)
                return r;
        r = manager_resolve_path(mgr, path, &abs, error);
        if (r < 0)
                return r;
        if (backing && !*backing)
                backing = NULL;
        if (backing) {
                _cleanup_free_ char *inside = NULL;
                r = dc_backing_resolve(abs, backing, &babs);
                if (r < 0)
                        return bus_error_from_errno(error, r, dc_get_error());
                if (dc_path_resolve(babs, (const char *const *) mgr->config.roots, &inside, NULL) < 0)
                        return sd_bus_error_setf(error, ERROR_PREFIX "PathNotAllowed",
                                                 "'%s': backing file '%s' is outside the storage roots", abs, backing);
        }
        r = model_freshen(mgr, m, (char *[]){ abs, babs, NULL }, error);
        if (r <= 0)
                return r < 0 ? r : 1;
        if (g_hash_table_lookup(mgr->images, abs))
                return sd_bus_error_setf(error, ERROR_PREFIX "Exists", "'%s' already exists", abs);

        r = polkit_verify(mgr, m, "org.diskchain.create",
                          (const char *const[]){ "path", abs, "root", root_of(mgr, abs), "operation", "create",
                                                 "images", abs, "backing", babs, NULL },
                          error);
        if (r <= 0)
                return r < 0 ? r : 1;

        op = calloc(1, sizeof *op);
        if (!op)
                return -ENOMEM;
        op->path = TAKE_PTR(abs);
        op->roots = g_strdupv(mgr->config.roots);
        op->size = size;
        op->backing = backing ? strdup(backing) : NULL;
        op->o.format = format == 1 ? DC_FORMAT_RAW : DC_FORMAT_QCOW2;
        op->o.oracle = &mgr->oracle;
        op->o.backing = op->backing;
        op->o.backing_format = bformat < 0 ? -1 : bformat == 1 ? DC_FORMAT_RAW : DC_FORMAT_QCOW2;
        op->o.compat = compat == 0 ? 2 : 3;
        op->o.compression_type = ctype;
        op->o.preallocation = prealloc;
        op->o.lazy_refcounts = lazy;
        if (opt_uint(opts, "cluster-size", &v, error) > 0)
                op->o.cluster_size = v > UINT32_MAX ? 3 : (uint32_t) v;
        if (opt_uint(opts, "refcount-bits", &v, error) > 0)
                op->o.refcount_bits = v > 64 ? 3 : (uint32_t) v;
        if (sd_bus_error_is_set(error)) {
                create_op_free(op);
                return -EINVAL;
        }
        w = create_work(mgr, op, create_run, create_done);
        if (!w)
                return -ENOMEM;
        r = work_submit(w, m);
        return r < 0 ? r : 1;
}

static void classify_run(Work *w) {
        CreateOp *op = w->data;
        int fd = dc_path_open(op->path, (const char *const *) op->roots, O_RDONLY, 0);
        struct stat st;
        int r = fd;

        if (fd >= 0 && (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)))
                r = dc_set_error(EMEDIUMTYPE, "'%s' is not a regular file", op->path);
        else if (fd >= 0 && op->format == DC_FORMAT_QCOW2) {
                uint8_t sector[512] = { 0 };
                const char *magic;
                r = pread(fd, sector, sizeof sector, 0) < 0 ? dc_set_error(errno, "'%s': cannot read: %m", op->path) : 0;
                magic = r >= 0 ? dc_probe_magic(sector, sizeof sector) : NULL;
                if (r >= 0 && !(magic && strcmp(magic, "qcow2") == 0))
                        r = dc_set_error(EMEDIUMTYPE, "'%s' has no qcow2 header: it cannot be a qcow2 image", op->path);
        }
        if (r >= 0)
                r = registry_classify(op->registry, op->path, fd, op->format);
        if (fd >= 0)
                close(fd);
        work_capture_error(w, r);
}

static void classify_done(Work *w) {
        reply_new_image(w, ((CreateOp *) w->data)->path);
}

static int method_classify_image(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        static const char *const formats[] = { "qcow2", "raw", NULL };
        Manager *mgr = userdata;
        g_autoptr(GHashTable) opts = NULL;
        _cleanup_free_ char *abs = NULL;
        const char *path, *format, *job;
        int fmt = -1, r;
        CreateOp *op;
        Work *w;

        r = sd_bus_message_read(m, "ss", &path, &format);
        if (r < 0)
                return r;
        r = parse_options(m, NULL, &opts, error);
        if (r < 0)
                return r;
        for (int i = 0; formats[i]; i++)
                if (strcmp(formats[i], format) == 0)
                        fmt = i == 0 ? DC_FORMAT_QCOW2 : DC_FORMAT_RAW;
        if (fmt < 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "format '%s' is not one of 'qcow2', 'raw'",
                                         format);
        r = manager_resolve_path(mgr, path, &abs, error);
        if (r < 0)
                return r;
        r = model_freshen(mgr, m, (char *[]){ abs, NULL }, error);
        if (r <= 0)
                return r < 0 ? r : 1;
        job = claims_holder(mgr->claims, abs);
        if (job)
                return sd_bus_error_setf(error, ERROR_PREFIX "Busy", "'%s' is in use by job '%s'", abs, job);
        if ((job = claims_exporter(mgr->claims, abs)))
                return sd_bus_error_setf(error, ERROR_PREFIX "Busy", "'%s' is exported over NBD as '%s'", abs, job);
        r = polkit_verify(mgr, m, "org.diskchain.classify",
                          (const char *const[]){ "path", abs, "root", root_of(mgr, abs), "operation", "classify",
                                                 "images", abs, "format", format, NULL },
                          error);
        if (r <= 0)
                return r < 0 ? r : 1;
        op = calloc(1, sizeof *op);
        if (!op)
                return -ENOMEM;
        op->path = TAKE_PTR(abs);
        op->roots = g_strdupv(mgr->config.roots);
        op->registry = mgr->registry;
        op->format = fmt;
        w = create_work(mgr, op, classify_run, classify_done);
        if (!w)
                return -ENOMEM;
        r = work_submit(w, m);
        return r < 0 ? r : 1;
}

static int property_get_version(sd_bus *bus, const char *path, const char *iface, const char *prop,
                                sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "s", PACKAGE_VERSION);
}

static int property_get_roots(sd_bus *bus, const char *path, const char *iface, const char *prop,
                              sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        Manager *mgr = userdata;
        return sd_bus_message_append_strv(reply, mgr->config.roots);
}

static int property_get_features(sd_bus *bus, const char *path, const char *iface, const char *prop,
                                 sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "as", 4, "qcow2", "raw", "zstd", "nbd");
}

static int property_get_max_jobs(sd_bus *bus, const char *path, const char *iface, const char *prop,
                                 sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        Manager *mgr = userdata;
        return sd_bus_message_append(reply, "u", mgr->config.max_jobs);
}

const sd_bus_vtable manager_vtable[] = {
        SD_BUS_VTABLE_START(0),
        SD_BUS_PROPERTY("Version", "s", property_get_version, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("StorageRoots", "as", property_get_roots, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("Features", "as", property_get_features, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_PROPERTY("MaxJobs", "u", property_get_max_jobs, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_METHOD_WITH_ARGS("GetImage", SD_BUS_ARGS("s", path), SD_BUS_RESULT("o", image), method_get_image,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("CreateImage", SD_BUS_ARGS("s", path, "t", size, "a{sv}", options),
                                SD_BUS_RESULT("o", image), method_create_image, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("ClassifyImage", SD_BUS_ARGS("s", path, "s", format, "a{sv}", options),
                                SD_BUS_RESULT("o", image), method_classify_image, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("ListImages", SD_BUS_NO_ARGS, SD_BUS_RESULT("ao", images), method_list,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("ListChains", SD_BUS_NO_ARGS, SD_BUS_RESULT("ao", chains), method_list,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("ListJobs", SD_BUS_NO_ARGS, SD_BUS_RESULT("ao", jobs), method_list,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("ListExports", SD_BUS_NO_ARGS, SD_BUS_RESULT("ao", exports), method_list,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("ListPlans", SD_BUS_NO_ARGS, SD_BUS_RESULT("ao", plans), method_list_plans,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("CreatePlan", SD_BUS_ARGS("s", name, "a{sv}", settings), SD_BUS_RESULT("o", plan),
                                method_create_plan, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("GetChain", SD_BUS_ARGS("s", active_path), SD_BUS_RESULT("o", chain),
                                method_get_chain, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("GetJob", SD_BUS_ARGS("s", id), SD_BUS_RESULT("o", job), method_get_job,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("QueryBlockJobs", SD_BUS_NO_ARGS, SD_BUS_RESULT("aa{sv}", jobs),
                                method_query_block_jobs, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_VTABLE_END,
};
