/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* org.diskchain.DiskChain1.Image: properties, Check, Map, Resize, Delete. */

#include <errno.h>
#include <inttypes.h>
#include <fcntl.h>
#include <libgen.h>
#include <sys/stat.h>
#include <stdio.h>
#include <unistd.h>

#include "daemon.h"

int image_object_find(sd_bus *bus, const char *path, const char *iface, void *userdata, void **found,
                      sd_bus_error *error) {
        Image *img = image_from_object(userdata, path);
        if (!img)
                return 0;
        *found = img;
        return 1;
}

#define IMG ((Image *) userdata)

static int property_get_string(sd_bus *bus, const char *path, const char *iface, const char *prop,
                               sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        const char *v = "";
        if (strcmp(prop, "Path") == 0)
                v = IMG->path;
        else if (strcmp(prop, "Format") == 0)
                v = dc_format_name(IMG->format);
        else if (strcmp(prop, "Compat") == 0)
                v = IMG->compat;
        else if (strcmp(prop, "CompressionType") == 0)
                v = IMG->compression_type;
        else if (strcmp(prop, "BackingFile") == 0)
                v = IMG->backing_file;
        else if (strcmp(prop, "BackingFormat") == 0)
                v = IMG->backing_format;
        else if (strcmp(prop, "DataFile") == 0)
                v = IMG->data_file;
        else if (strcmp(prop, "InUse") == 0) {
                /* from the model: the jobs' table, and the last look at the locks (no file is touched here) */
                _cleanup_free_ char *f = NULL;
                v = image_in_use(IMG->mgr, IMG, &f);
                return sd_bus_message_append(reply, "s", v);
        }
        return sd_bus_message_append(reply, "s", v ? v : "");
}

static int property_get_u64(sd_bus *bus, const char *path, const char *iface, const char *prop,
                            sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "t", strcmp(prop, "VirtualSize") == 0 ? IMG->virtual_size
                                                                                   : IMG->actual_size);
}

static int property_get_bool(sd_bus *bus, const char *path, const char *iface, const char *prop,
                             sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        bool v = strcmp(prop, "Dirty") == 0       ? IMG->dirty
                 : strcmp(prop, "Corrupt") == 0   ? IMG->corrupt
                 : strcmp(prop, "Encrypted") == 0 ? IMG->encrypted
                                                  : IMG->read_only;
        return sd_bus_message_append(reply, "b", v);
}

static int property_get_cluster_size(sd_bus *bus, const char *path, const char *iface, const char *prop,
                                     sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "u", IMG->cluster_size);
}

static int property_get_backing(sd_bus *bus, const char *path, const char *iface, const char *prop,
                                sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        Image *b = IMG->backing_abs ? model_find(IMG->mgr, IMG->backing_abs) : NULL;
        return sd_bus_message_append(reply, "o", b ? b->object : "/");
}

static int property_get_objects(sd_bus *bus, const char *path, const char *iface, const char *prop,
                                sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        g_auto(GStrv) l = strcmp(prop, "Overlays") == 0 ? image_overlays(IMG->mgr, IMG) : image_chains(IMG->mgr, IMG);
        return append_objects(reply, l);
}

/* --- work shared by the methods ---------------------------------------------- */

typedef struct ImageOp {
        char *path;
        char **roots;
        unsigned max_depth;
        const struct dc_format_oracle *oracle;
        int repair;
        uint64_t a, b, max_extents;
        char *name;           /* a bitmap's */
        bool transient;       /* AddBitmap's persistent false */
        char **sources;       /* MergeBitmaps' */
        dc_disk *disk;        /* a bitmap change through the image's live export, or NULL */
        char *claim;          /* ... which claims the image meanwhile */
        Manager *mgr;
        struct dc_check_result check;
        GArray *extents;
} ImageOp;

static void image_op_free(void *p) {
        ImageOp *op = p;
        free(op->path);
        free(op->name);
        g_strfreev(op->sources);
        dc_disk_unref(op->disk);
        if (op->claim)
                (void) claims_release(op->mgr->claims, op->claim, (char *[]){ op->path, NULL }, NULL);
        free(op->claim);
        g_strfreev(op->roots);
        if (op->extents)
                g_array_unref(op->extents);
        free(op);
}

static ImageOp *image_op_new(Image *img) {
        ImageOp *op = calloc(1, sizeof *op);
        if (!op)
                return NULL;
        op->path = strdup(img->path);
        op->mgr = img->mgr;
        op->roots = g_strdupv(img->mgr->config.roots);
        op->max_depth = img->mgr->config.max_depth;
        op->oracle = &img->mgr->oracle;
        return op;
}

/* Queue OP's work for call M; WRITES: the image is opened read-write (held, read again after). */
static int image_op_start(Image *img, sd_bus_message *m, ImageOp *op, work_fn run, work_fn done, bool writes) {
        Work *w = work_new(img->mgr, run, done, op, image_op_free);
        int r;

        if (!w)
                return -ENOMEM;
        if (writes) {
                w->refresh = g_strdupv((char *[]){ op->path, NULL });
                w->holds = g_strdupv((char *[]){ op->path, NULL });
        }
        r = work_submit(w, m);
        return r < 0 ? r : 1;
}

static int refuse_busy(Image *img, sd_bus_error *error) {
        const char *job = claims_holder(img->mgr->claims, img->path);
        Image *of = image_data_file_of(img->mgr, img);
        const char *exp = claims_exporter(img->mgr->claims, img->path);
        if (job)
                return sd_bus_error_setf(error, ERROR_PREFIX "Busy", "'%s' is in use by job '%s'", img->path, job);
        if (exp)
                return sd_bus_error_setf(error, ERROR_PREFIX "Busy", "'%s' is exported over NBD as '%s'", img->path,
                                         exp);
        if (of)
                return sd_bus_error_setf(error, ERROR_PREFIX "Busy", "'%s' is the data file of '%s'", img->path,
                                         of->path);
        return 0;
}

static void reply_failed(Work *w) {
        (void) reply_error_errno(w->m, w->r, w->error);
}

/* Send REPLY, built with result R so far; on failure answer with an error. */
static void send_reply(Work *w, sd_bus_message *reply, int r) {
        if (r >= 0)
                r = sd_bus_send(NULL, reply, NULL);
        if (r < 0)
                (void) sd_bus_reply_method_errorf(w->m, SD_BUS_ERROR_FAILED, "cannot reply: %s", strerror(-r));
        sd_bus_message_unref(reply);
}

/* Make the model current for IMG (1), or wait for it (0). */
static int freshen(Image *img, sd_bus_message *m, sd_bus_error *error) {
        return model_freshen(img->mgr, m, (char *[]){ img->path, NULL }, error);
}

static int authorize(Image *img, sd_bus_message *m, const char *action, const char *operation,
                     sd_bus_error *error) {
        /* the image, and its data file, which holds its guest data */
        g_autofree char *images = paths_joined((char *[]){ img->path, img->data_file_abs, NULL });
        return polkit_verify(img->mgr, m, action,
                             (const char *const[]){ "path", img->path, "root", root_of(img->mgr, img->path),
                                                    "operation", operation, "images", images, NULL },
                             error);
}

/* Check */

static void check_run(Work *w) {
        ImageOp *op = w->data;
        struct dc_open_options o = { .roots = (const char *const *) op->roots, .oracle = op->oracle,
                                     .no_backing = true, .check_mode = true, .writable = op->repair != DC_REPAIR_NONE };
        dc_image *img = NULL;
        int r = dc_image_open(op->path, &o, &img);
        if (r >= 0)
                r = dc_image_check(img, op->repair, &op->check);
        work_capture_error(w, r);
        dc_image_close(img);
}

static void check_done(Work *w) {
        ImageOp *op = w->data;
        sd_bus_message *reply = NULL;
        int r;

        if (w->r < 0)
                return reply_failed(w);
        if (op->repair && (op->check.corruptions_fixed || op->check.leaks_fixed))
                log_fields(LOG_NOTICE, (const char *const[]){ "DISKCHAIN_IMAGE", op->path, NULL },
                           "repaired '%s': %" PRIu64 " corruption(s) and %" PRIu64 " leak(s) fixed", op->path,
                           op->check.corruptions_fixed, op->check.leaks_fixed);
        r = sd_bus_message_new_method_return(w->m, &reply);
        if (r >= 0)
                r = sd_bus_message_append(
                        reply, "a{sv}", 10, "check-errors", "t", op->check.check_errors, "corruptions", "t",
                        op->check.corruptions, "leaks", "t", op->check.leaks, "corruptions-fixed", "t",
                        op->check.corruptions_fixed, "leaks-fixed", "t", op->check.leaks_fixed, "image-end-offset",
                        "t", op->check.image_end_offset, "total-clusters", "t", op->check.total_clusters,
                        "allocated-clusters", "t", op->check.allocated_clusters, "fragmented-clusters", "t",
                        op->check.fragmented_clusters, "compressed-clusters", "t", op->check.compressed_clusters);
        send_reply(w, reply, r);
}

static int method_check(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        static const char *const allowed[] = { "repair", NULL };
        static const char *const repairs[] = { "none", "leaks", "all", NULL };
        g_autoptr(GHashTable) opts = NULL;
        ImageOp *op;
        int repair = 0, r;

        r = parse_options(m, allowed, &opts, error);
        if (r < 0)
                return r;
        r = opt_enum(opts, "repair", repairs, &repair, error);
        if (r < 0)
                return r;
        r = freshen(IMG, m, error);
        if (r <= 0)
                return r < 0 ? r : 1;
        if (IMG->format != DC_FORMAT_QCOW2)
                return sd_bus_error_setf(error, ERROR_PREFIX "NotSupported", "'%s': %s images have no metadata to check",
                                         IMG->path, dc_format_name(IMG->format));
        if (repair && (r = refuse_busy(IMG, error)) < 0)
                return r;
        r = authorize(IMG, m, repair ? "org.diskchain.modify" : "org.diskchain.inspect", repair ? "repair" : "check",
                      error);
        if (r <= 0)
                return r < 0 ? r : 1;
        op = image_op_new(IMG);
        if (!op)
                return -ENOMEM;
        op->repair = repair;
        return image_op_start(IMG, m, op, check_run, check_done, repair != 0);
}

/* Map */

#define MAP_EXTENTS_DEFAULT 4096
#define MAP_EXTENTS_MAX 65536

static int map_collect(const struct dc_extent *e, void *userdata) {
        ImageOp *op = userdata;
        g_array_append_val(op->extents, *e);
        /* enough for one reply: the caller asks again from where this ends */
        return op->extents->len >= op->max_extents ? -ECANCELED : 0;
}

static void map_run(Work *w) {
        ImageOp *op = w->data;
        struct dc_open_options o = { .roots = (const char *const *) op->roots, .oracle = op->oracle,
                                     .max_depth = op->max_depth, .no_lock = true };
        dc_image *img = NULL;
        int r = dc_image_open(op->path, &o, &img);

        op->extents = g_array_new(FALSE, FALSE, sizeof(struct dc_extent));
        if (r >= 0) {
                uint64_t size = dc_image_virtual_size(img), len = op->b ? op->b : size - MIN(op->a, size);
                r = dc_image_map(img, op->a, len, map_collect, op);
                if (r == -ECANCELED)
                        r = 0;
        }
        work_capture_error(w, r);
        dc_image_close(img);
}

static void map_done(Work *w) {
        ImageOp *op = w->data;
        sd_bus_message *reply = NULL;
        int r;

        if (w->r < 0)
                return reply_failed(w);
        r = sd_bus_message_new_method_return(w->m, &reply);
        if (r >= 0)
                r = sd_bus_message_open_container(reply, 'a', "(ttubbbbx)");
        for (guint i = 0; r >= 0 && i < op->extents->len; i++) {
                struct dc_extent *e = &g_array_index(op->extents, struct dc_extent, i);
                r = sd_bus_message_append(reply, "(ttubbbbx)", e->start, e->length, e->depth, e->present, e->zero,
                                          e->data, e->compressed, e->compressed ? (int64_t) -1 : e->host_offset);
        }
        if (r >= 0)
                r = sd_bus_message_close_container(reply);
        send_reply(w, reply, r);
}

static int method_map(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        static const char *const allowed[] = { "max-extents", NULL };
        g_autoptr(GHashTable) opts = NULL;
        uint64_t offset, length, max = MAP_EXTENTS_DEFAULT;
        ImageOp *op;
        int r;

        r = sd_bus_message_read(m, "tt", &offset, &length);
        if (r < 0)
                return r;
        r = parse_options(m, allowed, &opts, error);
        if (r < 0)
                return r;
        r = opt_uint(opts, "max-extents", &max, error);
        if (r < 0)
                return r;
        if (max < 1 || max > MAP_EXTENTS_MAX)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "max-extents must be 1..%u",
                                         MAP_EXTENTS_MAX);
        r = freshen(IMG, m, error);
        if (r <= 0)
                return r < 0 ? r : 1;
        if (offset > IMG->virtual_size || (length && length > IMG->virtual_size - offset))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "'%s': range %" PRIu64 "+%" PRIu64 " is beyond the virtual size %" PRIu64,
                                         IMG->path, offset, length, IMG->virtual_size);
        r = authorize(IMG, m, "org.diskchain.inspect", "map", error);
        if (r <= 0)
                return r < 0 ? r : 1;
        op = image_op_new(IMG);
        if (!op)
                return -ENOMEM;
        op->a = offset;
        op->b = length;
        op->max_extents = max;
        return image_op_start(IMG, m, op, map_run, map_done, false);
}

/* The image alone (not its backing files), for writing, on a worker. */
static int open_for_write(ImageOp *op, dc_image **ret) {
        struct dc_open_options o = { .roots = (const char *const *) op->roots, .oracle = op->oracle,
                                     .no_backing = true, .writable = true };
        *ret = NULL;
        return dc_image_open(op->path, &o, ret);
}

/* Resize */

static void resize_run(Work *w) {
        ImageOp *op = w->data;
        dc_image *img;
        int r = open_for_write(op, &img);
        if (r >= 0)
                r = dc_image_truncate(img, op->a);
        if (r >= 0)
                r = dc_image_flush(img);
        work_capture_error(w, r);
        dc_image_close(img);
}

static void reply_empty_done(Work *w) {
        if (w->r < 0)
                return reply_failed(w);
        (void) sd_bus_reply_method_return(w->m, NULL);
}

static int method_resize(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        g_autoptr(GHashTable) opts = NULL;
        uint64_t size;
        ImageOp *op;
        int r;

        r = sd_bus_message_read(m, "t", &size);
        if (r < 0)
                return r;
        r = parse_options(m, NULL, &opts, error);
        if (r < 0)
                return r;
        r = freshen(IMG, m, error);
        if (r <= 0)
                return r < 0 ? r : 1;
        if (size < IMG->virtual_size)
                return sd_bus_error_setf(error, ERROR_PREFIX "NotSupported",
                                         "'%s': shrinking from %" PRIu64 " to %" PRIu64 " bytes is not supported",
                                         IMG->path, IMG->virtual_size, size);
        if (size % 512 && IMG->format != DC_FORMAT_RAW)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "'%s': size %" PRIu64 " is not a multiple of 512", IMG->path, size);
        r = refuse_busy(IMG, error);
        if (r < 0)
                return r;
        r = authorize(IMG, m, "org.diskchain.modify", "resize", error);
        if (r <= 0)
                return r < 0 ? r : 1;
        op = image_op_new(IMG);
        if (!op)
                return -ENOMEM;
        op->a = size;
        return image_op_start(IMG, m, op, resize_run, reply_empty_done, true);
}

/* AddBitmap, RemoveBitmap, ClearBitmap, EnableBitmap, DisableBitmap, MergeBitmaps */

enum { BITMAP_ADD, BITMAP_REMOVE, BITMAP_CLEAR, BITMAP_ENABLE, BITMAP_DISABLE, BITMAP_MERGE };

static const char *const bitmap_operations[] = {
        [BITMAP_ADD] = "add-bitmap",         [BITMAP_REMOVE] = "remove-bitmap",
        [BITMAP_CLEAR] = "clear-bitmap",     [BITMAP_ENABLE] = "enable-bitmap",
        [BITMAP_DISABLE] = "disable-bitmap", [BITMAP_MERGE] = "merge-bitmaps",
};

static void bitmap_run(Work *w) {
        ImageOp *op = w->data;
        dc_image *img = NULL;
        /* through the live export: its open image, whose writes the bitmaps record */
        int r = op->disk ? 0 : open_for_write(op, &img);
        dc_image *on = op->disk ? dc_disk_active(op->disk) : img;

        if (r >= 0)
                switch (op->a) {
                case BITMAP_ADD:
                        r = dc_image_bitmap_add(on, op->name, (uint32_t) op->b,
                                                (op->repair ? DC_BITMAP_DISABLED : 0) |
                                                        (op->transient ? DC_BITMAP_TRANSIENT : 0));
                        break;
                case BITMAP_REMOVE:
                        r = dc_image_bitmap_remove(on, op->name);
                        break;
                case BITMAP_CLEAR:
                        r = dc_image_bitmap_clear(on, op->name);
                        break;
                case BITMAP_ENABLE:
                case BITMAP_DISABLE:
                        r = dc_image_bitmap_set_enabled(on, op->name, op->a == BITMAP_ENABLE);
                        break;
                case BITMAP_MERGE:
                        r = dc_image_bitmap_merge(on, op->name, (const char *const *) op->sources,
                                                  g_strv_length(op->sources));
                        break;
                }
        work_capture_error(w, r);
        dc_image_close(img);
}

static void bitmap_done(Work *w) {
        ImageOp *op = w->data;

        /* the claim goes before the answer: the caller's next call may use the chain */
        if (op->claim)
                (void) claims_release(op->mgr->claims, op->claim, (char *[]){ op->path, NULL }, NULL);
        free(op->claim);
        op->claim = NULL;
        reply_empty_done(w);
}

/* What the loop can judge without the file: the arguments, the format. */
static int bitmap_args(sd_bus_message *m, Image *img, int kind, ImageOp *op, sd_bus_error *error) {
        static const char *const allowed[] = { "granularity", "persistent", "disabled", NULL };
        const char *name;
        int r;

        r = sd_bus_message_read(m, "s", &name);
        if (r < 0)
                return r;
        if (!*name)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "'%s': a bitmap name cannot be empty",
                                         img->path);
        if (strlen(name) > 1023)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "'%s': a bitmap name is at most 1023 bytes (this one is %zu)", img->path,
                                         strlen(name));
        op->name = strdup(name);
        if (!op->name)
                return -ENOMEM;
        if (kind == BITMAP_ADD) {
                g_autoptr(GHashTable) opts = NULL;
                uint64_t gran = 0;
                bool persistent = true, disabled = false;

                r = parse_options(m, allowed, &opts, error);
                if (r >= 0)
                        r = opt_uint(opts, "granularity", &gran, error);
                if (r >= 0)
                        r = opt_bool(opts, "persistent", &persistent, error);
                if (r >= 0)
                        r = opt_bool(opts, "disabled", &disabled, error);
                if (r < 0)
                        return r;
                if (gran && (gran < 512 || gran > (UINT64_C(1) << 31) || (gran & (gran - 1))))
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                                 "'%s': granularity %" PRIu64 " is not a power of 2 from 512 to 2 GiB",
                                                 img->path, gran);
                op->b = gran;
                op->repair = disabled;
                op->transient = !persistent;
        }
        if (kind == BITMAP_MERGE) {
                r = sd_bus_message_read_strv(m, &op->sources);
                if (r < 0)
                        return r;
                if (!op->sources || !op->sources[0])
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                                 "'%s': merging into bitmap '%s' needs at least one source", img->path,
                                                 name);
        }
        /* a raw image has only the transient bitmaps of a live export */
        if (img->format != DC_FORMAT_QCOW2 && kind == BITMAP_ADD && !op->transient)
                return sd_bus_error_setf(error, ERROR_PREFIX "NotSupported",
                                         "'%s' is a %s image: only qcow2 images store persistent bitmaps (a transient "
                                         "one, persistent false, lives as long as a live export of its chain)",
                                         img->path, dc_format_name(img->format));
        if (img->format != DC_FORMAT_QCOW2 && kind != BITMAP_ADD && !image_bitmap(img, name))
                return sd_bus_error_setf(error, ERROR_PREFIX "NotFound", "'%s' has no bitmap named '%s'", img->path,
                                         name);
        return 0;
}

static int bitmap_method(sd_bus_message *m, Image *img, int kind, sd_bus_error *error) {
        ImageOp *op = image_op_new(img);
        int r;

        if (!op)
                return -ENOMEM;
        op->a = kind;
        r = bitmap_args(m, img, kind, op, error);
        if (r >= 0)
                r = freshen(img, m, error); /* 0: the image changed, the caller has been answered */
        if (r > 0) {
                /* the active layer of a live export: changed through it, the chain claimed meanwhile */
                Export *x = export_of_path(img->mgr, img->path);
                int b;
                if (x && !x->snapshot && x->state == EXPORT_LIVE && x->disk && strcmp(x->active, img->path) == 0 &&
                    !claims_holder(img->mgr->claims, img->path) && !image_data_file_of(img->mgr, img)) {
                        g_autofree char *busy = NULL;
                        op->claim = g_strdup_printf("bitmap-change:%s", x->name);
                        b = claims_take(img->mgr->claims, op->claim, (char *[]){ img->path, NULL }, NULL, x->name,
                                        &busy);
                        if (b < 0) {
                                free(op->claim);
                                op->claim = NULL;
                                b = sd_bus_error_set(error, ERROR_PREFIX "Busy", busy);
                        } else
                                op->disk = dc_disk_ref(x->disk);
                } else if (op->transient && !(x && x->state == EXPORT_LIVE && strcmp(x->active, img->path) == 0))
                        b = sd_bus_error_setf(error, ERROR_PREFIX "NotSupported",
                                              "'%s': a transient bitmap lives in the image as a live export of its chain "
                                              "holds it open, and as long as that export (as QEMU's live as long as "
                                              "their node): export the chain first, or add a persistent one (the "
                                              "default)", img->path);
                else
                        b = refuse_busy(img, error);
                r = b < 0 ? b : 1;
        }
        if (r > 0)
                r = authorize(img, m, "org.diskchain.modify", bitmap_operations[kind], error);
        if (r <= 0) {
                image_op_free(op);
                return r < 0 ? r : 1;
        }
        return image_op_start(img, m, op, bitmap_run, bitmap_done, true);
}

static int method_add_bitmap(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        return bitmap_method(m, IMG, BITMAP_ADD, error);
}
static int method_remove_bitmap(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        return bitmap_method(m, IMG, BITMAP_REMOVE, error);
}
static int method_clear_bitmap(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        return bitmap_method(m, IMG, BITMAP_CLEAR, error);
}
static int method_enable_bitmap(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        return bitmap_method(m, IMG, BITMAP_ENABLE, error);
}
static int method_disable_bitmap(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        return bitmap_method(m, IMG, BITMAP_DISABLE, error);
}
static int method_merge_bitmaps(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        return bitmap_method(m, IMG, BITMAP_MERGE, error);
}

/* Delete */

static void delete_run(Work *w) {
        ImageOp *op = w->data;
        int fd = dc_path_open(op->path, (const char *const *) op->roots, O_RDONLY, 0);
        struct stat st;
        int r = fd;

        /* the file as it is now: not in QEMU's hands, and the very file removed */
        if (fd >= 0 && fstat(fd, &st) < 0)
                r = dc_set_error(errno, "'%s': cannot stat: %m", op->path);
        else if (fd >= 0 && dc_fd_locked_by_writer(fd) > 0)
                r = dc_set_error(EBUSY, "'%s' is in use by another process", op->path);
        else if (fd >= 0)
                r = dc_path_unlink(op->path, (const char *const *) op->roots, &st);
        if (fd >= 0)
                close(fd);
        work_capture_error(w, r);
}

static void delete_done(Work *w) {
        ImageOp *op = w->data;
        if (w->r >= 0)
                log_fields(LOG_INFO, (const char *const[]){ "DISKCHAIN_IMAGE", op->path, NULL }, "deleted '%s'",
                           op->path);
        reply_empty_done(w);
}

static int method_delete(sd_bus_message *m, void *userdata, sd_bus_error *error) {
        g_autoptr(GHashTable) opts = NULL;
        g_auto(GStrv) overlays = NULL;
        ImageOp *op;
        int r;

        r = parse_options(m, NULL, &opts, error);
        if (r < 0)
                return r;
        r = freshen(IMG, m, error);
        if (r <= 0)
                return r < 0 ? r : 1;
        overlays = image_overlays(IMG->mgr, IMG);
        if (overlays[0])
                return sd_bus_error_setf(error, ERROR_PREFIX "Busy", "'%s' is the backing file of %u other image(s)",
                                         IMG->path, g_strv_length(overlays));
        r = refuse_busy(IMG, error);
        if (r < 0)
                return r;
        r = authorize(IMG, m, "org.diskchain.delete", "delete", error);
        if (r <= 0)
                return r < 0 ? r : 1;
        op = image_op_new(IMG);
        if (!op)
                return -ENOMEM;
        return image_op_start(IMG, m, op, delete_run, delete_done, true);
}

/* Bitmaps: (name, granularity, dirty bytes, recording, busy, persistent, inconsistent) */
static int property_get_bitmaps(sd_bus *bus, const char *path, const char *iface, const char *prop,
                                sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        int r = sd_bus_message_open_container(reply, 'a', "(sutbbbb)");

        for (size_t i = 0; r >= 0 && i < IMG->n_bitmaps; i++) {
                const struct dc_bitmap_info *b = &IMG->bitmaps[i];
                /* a name is whatever bytes the file holds: D-Bus strings are UTF-8 */
                g_autofree char *name = g_utf8_make_valid(b->name, -1);

                r = sd_bus_message_append(reply, "(sutbbbb)", name, b->granularity, b->dirty, b->enabled, b->busy,
                                          !b->transient, b->in_use);
        }
        return r < 0 ? r : sd_bus_message_close_container(reply);
}

#define PROP(name, sig, getter) \
        SD_BUS_PROPERTY(name, sig, getter, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE)

const sd_bus_vtable image_vtable[] = {
        SD_BUS_VTABLE_START(0),
        SD_BUS_PROPERTY("Path", "s", property_get_string, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        PROP("Format", "s", property_get_string),
        PROP("VirtualSize", "t", property_get_u64),
        PROP("ActualSize", "t", property_get_u64),
        PROP("ClusterSize", "u", property_get_cluster_size),
        PROP("Compat", "s", property_get_string),
        PROP("CompressionType", "s", property_get_string),
        PROP("BackingFile", "s", property_get_string),
        PROP("BackingFormat", "s", property_get_string),
        PROP("DataFile", "s", property_get_string),
        PROP("Backing", "o", property_get_backing),
        PROP("Overlays", "ao", property_get_objects),
        PROP("Chains", "ao", property_get_objects),
        PROP("Dirty", "b", property_get_bool),
        PROP("Corrupt", "b", property_get_bool),
        PROP("Encrypted", "b", property_get_bool),
        PROP("ReadOnly", "b", property_get_bool),
        PROP("InUse", "s", property_get_string),
        PROP("Bitmaps", "a(sutbbbb)", property_get_bitmaps),
        SD_BUS_METHOD_WITH_ARGS("Check", SD_BUS_ARGS("a{sv}", options), SD_BUS_RESULT("a{sv}", result),
                                method_check, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Map", SD_BUS_ARGS("t", offset, "t", length, "a{sv}", options),
                                SD_BUS_RESULT("a(ttubbbbx)", extents), method_map, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Resize", SD_BUS_ARGS("t", size, "a{sv}", options), SD_BUS_NO_RESULT,
                                method_resize, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Delete", SD_BUS_ARGS("a{sv}", options), SD_BUS_NO_RESULT, method_delete,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("AddBitmap", SD_BUS_ARGS("s", name, "a{sv}", options), SD_BUS_NO_RESULT,
                                method_add_bitmap, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("RemoveBitmap", SD_BUS_ARGS("s", name), SD_BUS_NO_RESULT, method_remove_bitmap,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("ClearBitmap", SD_BUS_ARGS("s", name), SD_BUS_NO_RESULT, method_clear_bitmap,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("EnableBitmap", SD_BUS_ARGS("s", name), SD_BUS_NO_RESULT, method_enable_bitmap,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("DisableBitmap", SD_BUS_ARGS("s", name), SD_BUS_NO_RESULT, method_disable_bitmap,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("MergeBitmaps", SD_BUS_ARGS("s", target, "as", sources), SD_BUS_NO_RESULT,
                                method_merge_bitmaps, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_VTABLE_END,
};
