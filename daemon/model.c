/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The model: every image file in the storage roots, and the chains they
 * form.  A scan runs on a worker thread (it reads image headers) and builds
 * a fresh table; the event loop swaps it in and announces the difference
 * with InterfacesAdded / InterfacesRemoved / PropertiesChanged.  Scans are
 * triggered at start-up, after every change the daemon makes, and by
 * inotify when something else changes a root.
 *
 * An image is a file with the qcow2 magic, or with the extension .raw or
 * .img.  An image that no other image uses as its backing file is the
 * active layer of exactly one chain; the chain's object path is derived
 * from the active image's path.
 *
 * Two marks that jobs leave on files (extended attributes, see libdiskchain)
 * take images out of that reckoning: the layers a pivot dropped (the old
 * chain of a completed mirror or active commit), and the target of a
 * running mirror or backup, until the job ends or pivots to it.  Neither
 * is an active layer, nor does it count as an overlay of its backing file.
 * Both stay Image objects.
 */

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <unistd.h>

#include "daemon.h"

Image *image_free(Image *img) {
        if (!img)
                return NULL;
        free(img->path);
        free(img->object);
        free(img->compat);
        free(img->compression_type);
        free(img->backing_file);
        free(img->backing_format);
        free(img->backing_abs);
        free(img->superseded_by);
        free(img->job_target);
        free(img->error);
        free(img);
        return NULL;
}

void image_free_void(void *p) {
        image_free(p);
}

char *image_object_path(const char *abs) {
        char *p = NULL;
        if (sd_bus_path_encode(IMAGE_PREFIX, abs, &p) < 0)
                return NULL;
        return p;
}

char *chain_object_path(const char *abs) {
        char *p = NULL;
        if (sd_bus_path_encode(CHAIN_PREFIX, abs, &p) < 0)
                return NULL;
        return p;
}

static bool looks_like_image(int dfd, const char *name) {
        const char *dot = strrchr(name, '.');
        uint8_t magic[4];
        int fd;
        ssize_t n;

        if (dot && (strcmp(dot, ".raw") == 0 || strcmp(dot, ".img") == 0 || strcmp(dot, ".qcow2") == 0))
                return true;
        fd = openat(dfd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
        if (fd < 0)
                return false;
        n = pread(fd, magic, 4, 0);
        close(fd);
        return n == 4 && magic[0] == 'Q' && magic[1] == 'F' && magic[2] == 'I' && magic[3] == 0xfb;
}

static Image *scan_one(Manager *mgr, const char *abs) {
        struct dc_open_options o = { .roots = (const char *const *) mgr->config.roots, .no_backing = true,
                                     .no_lock = true, .check_mode = true };
        dc_image *d = NULL;
        Image *img = calloc(1, sizeof *img);
        int r;

        if (!img)
                return NULL;
        img->mgr = mgr;
        img->path = strdup(abs);
        img->object = image_object_path(abs);
        r = dc_image_open(abs, &o, &d);
        if (r < 0) {
                img->error = strdup(dc_get_error());
                img->error_errno = -r;
                return img;
        }
        img->format = dc_image_format(d);
        img->virtual_size = dc_image_virtual_size(d);
        img->actual_size = dc_image_actual_size(d);
        img->cluster_size = dc_image_cluster_size(d);
        img->compat = strdup(dc_image_compat(d));
        img->compression_type = strdup(dc_image_compression_type(d));
        img->backing_file = strdup(dc_image_backing_file(d));
        img->backing_format = strdup(dc_image_backing_format(d));
        img->dirty = dc_image_dirty(d);
        img->corrupt = dc_image_corrupt(d);
        img->encrypted = dc_image_encrypted(d);
        img->read_only = *dc_image_read_only_reason(d) != 0 || img->corrupt;
        if (*img->backing_file && dc_backing_resolve(abs, img->backing_file, &img->backing_abs) < 0)
                img->backing_abs = NULL;
        dc_image_close(d);
        if (dc_path_marks(abs, o.roots, &img->superseded_by, &img->job_target) < 0) {
                img->superseded_by = NULL;
                img->job_target = NULL;
        }
        return img;
}

static void scan_dir(Manager *mgr, const char *dir, GPtrArray *out, GPtrArray *dirs, unsigned depth) {
        DIR *d;
        struct dirent *de;

        if (depth > 16)
                return;
        d = opendir(dir);
        if (!d)
                return;
        g_ptr_array_add(dirs, g_strdup(dir));
        while ((de = readdir(d))) {
                g_autofree char *abs = NULL;
                struct stat st;

                if (de->d_name[0] == '.')
                        continue;
                if (fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0)
                        continue;
                abs = g_build_filename(dir, de->d_name, NULL);
                if (S_ISDIR(st.st_mode))
                        scan_dir(mgr, abs, out, dirs, depth + 1);
                else if (S_ISREG(st.st_mode) && looks_like_image(dirfd(d), de->d_name)) {
                        Image *img = scan_one(mgr, abs);
                        if (img)
                                g_ptr_array_add(out, img);
                }
        }
        closedir(d);
}

/* Runs on a worker thread.  The directories scanned ride along at the end,
 * as Image entries with a NULL object path, so the loop can watch them. */
GPtrArray *scan_roots(Manager *mgr) {
        GPtrArray *out = g_ptr_array_new_with_free_func(image_free_void);
        g_autoptr(GPtrArray) dirs = g_ptr_array_new_with_free_func(g_free);

        for (char **r = mgr->config.roots; *r; r++)
                scan_dir(mgr, *r, out, dirs, 0);
        for (guint i = 0; i < dirs->len; i++) {
                Image *d = calloc(1, sizeof *d);
                if (!d)
                        break;
                d->path = strdup(dirs->pdata[i]);
                g_ptr_array_add(out, d);
        }
        return out;
}

Image *model_find(Manager *mgr, const char *abs) {
        Image *img = g_hash_table_lookup(mgr->images, abs);
        return img && !img->error ? img : NULL;
}

static bool str_eq(const char *a, const char *b) {
        return strcmp(a ? a : "", b ? b : "") == 0;
}

static bool image_props_equal(const Image *a, const Image *b) {
        return a->format == b->format && a->virtual_size == b->virtual_size && a->actual_size == b->actual_size &&
               a->cluster_size == b->cluster_size && str_eq(a->compat, b->compat) &&
               str_eq(a->compression_type, b->compression_type) && str_eq(a->backing_file, b->backing_file) &&
               str_eq(a->backing_format, b->backing_format) && str_eq(a->backing_abs, b->backing_abs) &&
               a->dirty == b->dirty && a->corrupt == b->corrupt && a->encrypted == b->encrypted &&
               a->read_only == b->read_only && str_eq(a->superseded_by, b->superseded_by) &&
               str_eq(a->job_target, b->job_target);
}

/* Dropped by a pivot, or the target of a job that runs now. */
static bool image_set_aside(Manager *mgr, Image *img) {
        return (img->superseded_by && *img->superseded_by) ||
               (img->job_target && *img->job_target && g_hash_table_contains(mgr->jobs, img->job_target));
}

bool image_is_active(Manager *mgr, Image *img) {
        GHashTableIter it;
        Image *o;

        if (image_set_aside(mgr, img))
                return false;
        g_hash_table_iter_init(&it, mgr->images);
        while (g_hash_table_iter_next(&it, NULL, (void **) &o))
                if (!o->error && o->backing_abs && strcmp(o->backing_abs, img->path) == 0 && !image_set_aside(mgr, o))
                        return false;
        return true;
}

static GPtrArray *active_set(Manager *mgr) {
        GPtrArray *a = g_ptr_array_new_with_free_func(g_free);
        GHashTableIter it;
        Image *img;

        g_hash_table_iter_init(&it, mgr->images);
        while (g_hash_table_iter_next(&it, NULL, (void **) &img))
                if (!img->error && image_is_active(mgr, img))
                        g_ptr_array_add(a, g_strdup(img->path));
        return a;
}

static bool in_set(GPtrArray *a, const char *s) {
        for (guint i = 0; i < a->len; i++)
                if (strcmp(a->pdata[i], s) == 0)
                        return true;
        return false;
}

void model_apply_scan(Manager *mgr, GPtrArray *scan) {
        g_autoptr(GPtrArray) old_active = active_set(mgr), new_active = NULL;
        GHashTable *old = mgr->images, *nt;
        GHashTableIter it;
        Image *img;

        nt = g_hash_table_new_full(g_str_hash, g_str_equal, NULL, image_free_void);
        for (guint i = 0; i < scan->len; i++) {
                img = scan->pdata[i];
                if (!img->object) {
                        (void) model_watch_dir(mgr, img->path);
                        continue;
                }
                scan->pdata[i] = NULL;
                g_hash_table_replace(nt, img->path, img);
        }
        g_ptr_array_unref(scan);

        mgr->images = nt;
        new_active = active_set(mgr);
        mgr->images = old;

        /* Removals are announced while the objects can still be found. */
        for (guint i = 0; i < old_active->len; i++)
                if (!in_set(new_active, old_active->pdata[i])) {
                        g_autofree char *p = chain_object_path(old_active->pdata[i]);
                        (void) sd_bus_emit_object_removed(mgr->bus, p);
                }
        g_hash_table_iter_init(&it, old);
        while (g_hash_table_iter_next(&it, NULL, (void **) &img)) {
                Image *n = g_hash_table_lookup(nt, img->path);
                if (!img->error && (!n || n->error))
                        (void) sd_bus_emit_object_removed(mgr->bus, img->object);
        }

        mgr->images = nt;
        g_hash_table_iter_init(&it, nt);
        while (g_hash_table_iter_next(&it, NULL, (void **) &img)) {
                Image *o = g_hash_table_lookup(old, img->path);
                if (img->error)
                        continue;
                if (!o || o->error)
                        (void) sd_bus_emit_object_added(mgr->bus, img->object);
                else if (!image_props_equal(o, img))
                        (void) sd_bus_emit_properties_changed_strv(mgr->bus, img->object, IFACE_IMAGE, NULL);
        }
        for (guint i = 0; i < new_active->len; i++) {
                g_autofree char *p = chain_object_path(new_active->pdata[i]);
                if (!in_set(old_active, new_active->pdata[i]))
                        (void) sd_bus_emit_object_added(mgr->bus, p);
                else
                        (void) sd_bus_emit_properties_changed_strv(mgr->bus, p, IFACE_CHAIN, NULL);
        }
        g_hash_table_destroy(old);
}

char **model_image_paths(Manager *mgr) {
        GPtrArray *a = g_ptr_array_new();
        GHashTableIter it;
        Image *img;

        g_hash_table_iter_init(&it, mgr->images);
        while (g_hash_table_iter_next(&it, NULL, (void **) &img))
                if (!img->error)
                        g_ptr_array_add(a, strdup(img->object));
        g_ptr_array_add(a, NULL);
        return (char **) g_ptr_array_free(a, FALSE);
}

char **model_chain_paths(Manager *mgr) {
        g_autoptr(GPtrArray) act = active_set(mgr);
        GPtrArray *a = g_ptr_array_new();

        for (guint i = 0; i < act->len; i++)
                g_ptr_array_add(a, chain_object_path(act->pdata[i]));
        g_ptr_array_add(a, NULL);
        return (char **) g_ptr_array_free(a, FALSE);
}

Image *chain_active_from_object(Manager *mgr, const char *object) {
        _cleanup_free_ char *abs = NULL;
        Image *img;

        if (sd_bus_path_decode(object, CHAIN_PREFIX, &abs) <= 0)
                return NULL;
        img = model_find(mgr, abs);
        if (!img || !image_is_active(mgr, img))
                return NULL;
        return img;
}

char **image_overlays(Manager *mgr, Image *img) {
        GPtrArray *a = g_ptr_array_new();
        GHashTableIter it;
        Image *o;

        g_hash_table_iter_init(&it, mgr->images);
        while (g_hash_table_iter_next(&it, NULL, (void **) &o))
                if (!o->error && o->backing_abs && strcmp(o->backing_abs, img->path) == 0)
                        g_ptr_array_add(a, strdup(o->object));
        g_ptr_array_add(a, NULL);
        return (char **) g_ptr_array_free(a, FALSE);
}

/* Layers of the chain whose active image is ACTIVE, as object paths. */
char **chain_layers(Manager *mgr, Image *active) {
        GPtrArray *a = g_ptr_array_new();
        Image *cur = active;

        for (unsigned depth = 0; cur && depth < mgr->config.max_depth; depth++) {
                g_ptr_array_add(a, strdup(cur->object));
                cur = cur->backing_abs ? model_find(mgr, cur->backing_abs) : NULL;
                if (cur == active)
                        break;
        }
        g_ptr_array_add(a, NULL);
        return (char **) g_ptr_array_free(a, FALSE);
}

/* Layers of the chain whose active image is ACTIVE, active first. */
GPtrArray *chain_layer_images(Manager *mgr, Image *active) {
        GPtrArray *a = g_ptr_array_new();
        Image *cur = active;

        for (unsigned depth = 0; cur && depth < mgr->config.max_depth; depth++) {
                g_ptr_array_add(a, cur);
                cur = cur->backing_abs ? model_find(mgr, cur->backing_abs) : NULL;
                if (cur == active)
                        break;
        }
        return a;
}

char **image_chains(Manager *mgr, Image *img) {
        g_autoptr(GPtrArray) act = active_set(mgr);
        GPtrArray *a = g_ptr_array_new();

        for (guint i = 0; i < act->len; i++) {
                Image *top = model_find(mgr, act->pdata[i]);
                g_auto(GStrv) layers = top ? chain_layers(mgr, top) : NULL;
                for (char **l = layers; l && *l; l++)
                        if (strcmp(*l, img->object) == 0) {
                                g_ptr_array_add(a, chain_object_path(top->path));
                                break;
                        }
        }
        g_ptr_array_add(a, NULL);
        return (char **) g_ptr_array_free(a, FALSE);
}

/* --- rescans ------------------------------------------------------------- */

static void scan_done(Work *w) {
        Manager *mgr = w->mgr;
        mgr->scan_running = false;
        if (mgr->scan_again) {
                mgr->scan_again = false;
                (void) model_request_rescan(mgr);
        }
}

int model_request_rescan(Manager *mgr) {
        int r;

        if (mgr->scan_running) {
                mgr->scan_again = true;
                return 0;
        }
        r = work_start(mgr, NULL, NULL, scan_done, NULL, NULL, true);
        if (r < 0)
                return r;
        mgr->scan_running = true;
        return 0;
}

static int on_rescan_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        Manager *mgr = userdata;
        (void) model_request_rescan(mgr);
        return 0;
}

static int on_inotify(sd_event_source *s, const struct inotify_event *ev, void *userdata) {
        Manager *mgr = userdata;
        uint64_t now;

        if (ev->mask & (IN_DELETE_SELF | IN_IGNORED)) {
                /* the directory itself went away: forget its watch */
                GHashTableIter it;
                sd_event_source *w;
                g_hash_table_iter_init(&it, mgr->watches);
                while (g_hash_table_iter_next(&it, NULL, (void **) &w))
                        if (w == s) {
                                g_hash_table_iter_remove(&it);
                                break;
                        }
        }
        /* Debounce: one rescan 200 ms after the last burst of changes. */
        (void) sd_event_now(mgr->event, CLOCK_MONOTONIC, &now);
        if (!mgr->rescan_timer)
                (void) sd_event_add_time(mgr->event, &mgr->rescan_timer, CLOCK_MONOTONIC, now + 200000, 50000,
                                         on_rescan_timer, mgr);
        else {
                (void) sd_event_source_set_time(mgr->rescan_timer, now + 200000);
                (void) sd_event_source_set_enabled(mgr->rescan_timer, SD_EVENT_ONESHOT);
        }
        return 0;
}

int model_watch_dir(Manager *mgr, const char *dir) {
        sd_event_source *s = NULL;
        int r;

        if (g_hash_table_contains(mgr->watches, dir))
                return 0;
        r = sd_event_add_inotify(mgr->event, &s, dir,
                                 IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_CLOSE_WRITE | IN_ATTRIB |
                                         IN_DELETE_SELF | IN_ONLYDIR,
                                 on_inotify, mgr);
        if (r < 0)
                return r;
        g_hash_table_insert(mgr->watches, g_strdup(dir), s);
        return 0;
}
