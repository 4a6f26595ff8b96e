/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* org.diskchain.DiskChain1.Manager. */

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>

#include "config.h"
#include "daemon.h"

/* Read the path argument and find its image; errors say what is there instead. */
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
        img = g_hash_table_lookup(mgr->images, abs);
        if (!img)
                return sd_bus_error_setf(error, ERROR_PREFIX "NotFound", "'%s': no such image", abs);
        if (img->error)
                return bus_error_from_errno(error, img->error_errno, img->error, ERROR_PREFIX "NotAnImage");
        *ret = img;
        return 0;
}

static int method_get_image(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        Image *img;
        int r = read_image_arg(userdata, m, &img, error);
        if (r < 0)
                return r;
        return sd_bus_reply_method_return(m, "o", img->object);
}

static int method_get_chain(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        _cleanup_free_ char *p = NULL;
        Image *img;
        int r = read_image_arg(userdata, m, &img, error);
        if (r < 0)
                return r;
        if (img->superseded_by && *img->superseded_by)
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

        if (strcmp(member, "ListImages") == 0)
                l = model_image_paths(mgr);
        else if (strcmp(member, "ListChains") == 0)
                l = model_chain_paths(mgr);
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

/* CreateImage */

typedef struct CreateOp {
        char *path;
        char **roots;
        uint64_t size;
        struct dc_create_options o;
        char *backing;
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
        reply_new_image(w, op->path);
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
        _cleanup_free_ char *abs = NULL;
        const char *path, *backing = NULL, *d[10];
        uint64_t size, v;
        int format = 0, bformat = -1, compat = 1, ctype = 0, prealloc = 0, r;
        bool lazy = false;
        CreateOp *op;

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
        if (g_hash_table_lookup(mgr->images, abs))
                return sd_bus_error_setf(error, ERROR_PREFIX "Exists", "'%s' already exists", abs);
        if (backing && !*backing)
                backing = NULL;
        if (backing) {
                _cleanup_free_ char *babs = NULL, *inside = NULL;
                r = dc_backing_resolve(abs, backing, &babs);
                if (r < 0)
                        return bus_error_from_errno(error, r, dc_get_error(), NULL);
                if (dc_path_resolve(babs, (const char *const *) mgr->config.roots, &inside, NULL) < 0)
                        return sd_bus_error_setf(error, ERROR_PREFIX "PathNotAllowed",
                                                 "'%s': backing file '%s' is outside the storage roots", abs, backing);
        }
        if (size % 512)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "'%s': size %" PRIu64 " is not a multiple of 512", abs, size);

        d[0] = "path", d[1] = abs, d[2] = "root", d[3] = root_of(mgr, abs), d[4] = "operation", d[5] = "create";
        d[6] = backing ? "backing" : NULL, d[7] = backing, d[8] = NULL;
        r = polkit_verify(mgr, m, "org.diskchain.create", d, error);
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
        r = work_start(mgr, m, create_run, create_done, op, create_op_free, true);
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
        return sd_bus_message_append(reply, "as", 3, "qcow2", "raw", "zstd");
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
        SD_BUS_METHOD_WITH_ARGS("ListImages", SD_BUS_NO_ARGS, SD_BUS_RESULT("ao", images), method_list,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("ListChains", SD_BUS_NO_ARGS, SD_BUS_RESULT("ao", chains), method_list,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("ListJobs", SD_BUS_NO_ARGS, SD_BUS_RESULT("ao", jobs), method_list,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("GetChain", SD_BUS_ARGS("s", active_path), SD_BUS_RESULT("o", chain),
                                method_get_chain, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("GetJob", SD_BUS_ARGS("s", id), SD_BUS_RESULT("o", job), method_get_job,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("QueryBlockJobs", SD_BUS_NO_ARGS, SD_BUS_RESULT("aa{sv}", jobs),
                                method_query_block_jobs, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_VTABLE_END,
};
