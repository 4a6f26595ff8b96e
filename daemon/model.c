/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The model: every image file in the storage roots, and the chains they
 * form, with their bus objects.
 *
 * Design notes
 * ------------
 * - Files are read only on worker threads (scan_one, model_read_paths);
 *   the loop applies what they found (model_apply) and announces the
 *   difference: InterfacesAdded/Removed for images and chains that come and
 *   go, PropertiesChanged for images whose header changed and for what
 *   depends on them (their backing files' Overlays and Chains, the Layers
 *   of chains through them).
 * - Changes are applied per file.  The daemon has its own inotify watch on
 *   every directory of the roots; an event marks its path dirty, and after
 *   a short pause the dirty paths (only those) are read again.  A call that
 *   names paths first drains the inotify queue and, when something is
 *   dirty or unknown, waits for that refresh (model_freshen), so that
 *   `qemu-img create x.qcow2` followed at once by a call naming x.qcow2
 *   sees the file.  Only an overflowing inotify queue reads everything.
 * - Everything is linear in the number of images: an index from each
 *   backing path to the images naming it answers "overlays of", the set of
 *   active layers is kept and compared after each change, a chain's layers
 *   are a walk down, an image's chains a walk up.  10 000 images answer
 *   GetManagedObjects in well under a second.
 * - An image is the active layer of exactly one chain when nothing names it
 *   as backing file, except images set aside: the layers a pivot replaced
 *   (recorded in the registry) and the targets of running jobs.  A set-aside
 *   image is not active and does not count as an overlay of its backing.
 * - InUse "external" (another process holds QEMU's write lock) comes from
 *   the last look: each read of a file, and a look at /proc/locks every two
 *   seconds on a worker (a lock taken by QEMU touches no directory, so no
 *   inotify event tells us).
 */

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "daemon.h"

#define REFRESH_DELAY_USEC 50000
#define LOCKS_INTERVAL_USEC 1000000
#define MAX_DIR_DEPTH 16
#define WATCH_MASK                                                                                           \
        (IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_CLOSE_WRITE | IN_ATTRIB | IN_DELETE_SELF | \
         IN_MOVE_SELF | IN_ONLYDIR)

/* What a worker found at a path: an image (or a file refused as one), no file
 * at all (maybe a directory that went away), a file that is no image, a directory. */
enum { FOUND_IMAGE, FOUND_GONE, FOUND_NOT_IMAGE, FOUND_DIR };

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
        free(img->data_file);
        free(img->data_file_abs);
        free(img->superseded_by);
        free(img->error);
        dc_bitmap_info_free(img->bitmaps, img->n_bitmaps);
        free(img);
        return NULL;
}

void image_free_void(void *p) {
        image_free(p);
}

static void message_unref(void *m) {
        sd_bus_message_unref(m);
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

/* --- reading files (worker threads) ------------------------------------------- */

/* The entries of a worker's findings carry their kind in error_errno/object: */
static Image *found_new(const char *abs, int kind) {
        Image *img = calloc(1, sizeof *img);
        if (!img)
                return NULL;
        img->path = strdup(abs);
        img->error_errno = kind == FOUND_GONE ? ENOENT : kind == FOUND_NOT_IMAGE ? EMEDIUMTYPE : kind == FOUND_DIR ? EISDIR : 0;
        if (kind != FOUND_IMAGE)
                img->error = strdup("-");
        return img;
}

/* No image at that path (any more). */
static bool found_gone(const Image *img) {
        return !img->object && (img->error_errno == ENOENT || img->error_errno == EMEDIUMTYPE);
}

static bool found_dir(const Image *img) {
        return !img->object && img->error_errno == EISDIR;
}

static bool image_named(const char *abs) {
        const char *dot = strrchr(abs, '.');
        return dot && (strcmp(dot, ".raw") == 0 || strcmp(dot, ".img") == 0 || strcmp(dot, ".qcow2") == 0);
}

Image *scan_one(Manager *mgr, const char *abs) {
        struct dc_open_options o = { .roots = (const char *const *) mgr->config.roots, .oracle = &mgr->oracle,
                                     .no_backing = true, .no_lock = true, .check_mode = true };
        dc_image *d = NULL;
        struct stat st;
        Image *img;
        int r;

        r = dc_image_open(abs, &o, &d);
        if (r == -ENOENT) {
                /* the file itself, or something it names (its data file)? */
                int fd = dc_path_open(abs, o.roots, O_PATH, 0);
                if (fd < 0)
                        return found_new(abs, FOUND_GONE);
                close(fd);
        }
        img = found_new(abs, FOUND_IMAGE);
        if (!img) {
                dc_image_close(d);
                return NULL;
        }
        img->mgr = mgr;
        img->object = image_object_path(abs);
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
        if (fstat(dc_image_fd(d), &st) == 0) {
                img->dev = st.st_dev;
                img->ino = st.st_ino;
                /* diskchain writes no image with a second link (dc_image_open) */
                img->read_only |= st.st_nlink > 1;
                img->superseded_by = registry_superseded_by(mgr->registry, abs, &st);
        }
        img->external = dc_fd_locked_by_writer(dc_image_fd(d)) > 0;
        if (*img->backing_file && dc_backing_resolve(abs, img->backing_file, &img->backing_abs) < 0)
                img->backing_abs = NULL;
        if (*dc_image_data_file(d)) {
                img->data_file = strdup(dc_image_data_file(d));
                img->data_file_abs = strdup(dc_image_data_file_path(d));
        }
        if (dc_image_bitmaps(d, &img->bitmaps, &img->n_bitmaps) < 0) {
                /* the directory passed the open's checks: this is I/O or memory, and the next look may do better */
                img->bitmaps = NULL;
                img->n_bitmaps = 0;
                dc_error_clear();
        }
        dc_image_close(d);
        return img;
}

static bool name_ok(const char *name) {
        if (name[0] == '.')
                return false; /* hidden: a file being copied in under a temporary name, say */
        for (const char *c = name; *c; c++)
                if ((unsigned char) *c < 0x20 || *c == 0x7f)
                        return false; /* unreachable through the API, which refuses such paths */
        return true;
}

/* Watch DIR (open as DFD) for changes; the table is shared with the loop. */
static void watch_dir(Manager *mgr, int dfd, const char *dir) {
        char proc[64];
        int wd;

        snprintf(proc, sizeof proc, "/proc/self/fd/%d", dfd);
        wd = inotify_add_watch(mgr->inotify_fd, proc, WATCH_MASK);
        if (wd < 0) {
                log_warning("cannot watch '%s' for changes: %m", dir);
                return;
        }
        g_mutex_lock(&mgr->watch_lock);
        {
                char *was = g_hash_table_lookup(mgr->watches, GINT_TO_POINTER(wd));
                if (was && strcmp(was, dir) != 0)
                        g_hash_table_remove(mgr->watched, was);
                g_hash_table_replace(mgr->watches, GINT_TO_POINTER(wd), g_strdup(dir));
                g_hash_table_replace(mgr->watched, g_strdup(dir), GINT_TO_POINTER(wd));
        }
        g_mutex_unlock(&mgr->watch_lock);
}

/* Every file below the directory DFD (named DIR), read; DFD is consumed. */
static void walk_dir(Manager *mgr, int dfd, const char *dir, GPtrArray *out, unsigned depth) {
        DIR *d;
        struct dirent *de;

        if (depth > MAX_DIR_DEPTH) {
                log_warning("'%s' is nested more than %u directories deep in its root: not looked into", dir,
                            MAX_DIR_DEPTH);
                close(dfd);
                return;
        }
        watch_dir(mgr, dfd, dir);
        d = fdopendir(dfd);
        if (!d) {
                close(dfd);
                return;
        }
        while ((de = readdir(d))) {
                g_autofree char *abs = NULL;
                struct stat st;

                if (!name_ok(de->d_name))
                        continue;
                if (fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0)
                        continue;
                abs = g_build_filename(dir, de->d_name, NULL);
                if (S_ISDIR(st.st_mode)) {
                        int sub = openat(dirfd(d), de->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
                        if (sub >= 0)
                                walk_dir(mgr, sub, abs, out, depth + 1);
                } else if (S_ISREG(st.st_mode)) {
                        Image *img = scan_one(mgr, abs);
                        if (img)
                                g_ptr_array_add(out, img);
                }
        }
        closedir(d);
}

static unsigned depth_in_root(Manager *mgr, const char *abs) {
        const char *root = root_of(mgr, abs);
        unsigned n = 0;
        for (const char *c = abs + strlen(root); *c; c++)
                n += *c == '/';
        return n;
}

/* Read PATHS (files or directories; NULL = every root) as they are now. */
GPtrArray *model_read_paths(Manager *mgr, char **paths) {
        GPtrArray *out = g_ptr_array_new_with_free_func(image_free_void);

        if (!paths) {
                for (char **r = mgr->config.roots; *r; r++) {
                        int dfd = open(*r, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
                        if (dfd < 0) {
                                log_error("cannot read the storage root '%s': %m", *r);
                                continue;
                        }
                        walk_dir(mgr, dfd, *r, out, 0);
                }
                return out;
        }
        for (char **p = paths; *p; p++) {
                struct stat st;
                int fd;
                bool root = false;

                for (char **r = mgr->config.roots; *r; r++)
                        root |= strcmp(*r, *p) == 0;
                fd = root ? open(*p, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
                          : dc_path_open(*p, (const char *const *) mgr->config.roots, O_PATH, 0);
                if (fd < 0 || fstat(fd, &st) < 0) {
                        if (fd >= 0)
                                close(fd);
                        g_ptr_array_add(out, found_new(*p, FOUND_GONE));
                        if (!root)
                                registry_forget(mgr->registry, *p);
                        continue;
                }
                if (S_ISDIR(st.st_mode)) {
                        int dfd = root ? fd : dc_path_open(*p, (const char *const *) mgr->config.roots,
                                                           O_RDONLY | O_DIRECTORY, 0);
                        if (!root)
                                close(fd);
                        g_ptr_array_add(out, found_new(*p, FOUND_DIR));
                        if (dfd >= 0)
                                walk_dir(mgr, dfd, *p, out, root ? 0 : depth_in_root(mgr, *p));
                        continue;
                }
                close(fd);
                if (S_ISREG(st.st_mode)) {
                        Image *img = scan_one(mgr, *p);
                        if (img)
                                g_ptr_array_add(out, img);
                } else
                        g_ptr_array_add(out, found_new(*p, FOUND_NOT_IMAGE));
        }
        return out;
}

/* --- the indexes ------------------------------------------------------------------ */

static void overlay_link(Manager *mgr, Image *img) {
        GPtrArray *a;

        if (!img->error && img->object)
                g_hash_table_insert(mgr->image_objects, img->object, img);
        if (!img->error && img->data_file_abs)
                g_hash_table_insert(mgr->data_files, img->data_file_abs, img);
        if (img->error || !img->backing_abs)
                return;
        a = g_hash_table_lookup(mgr->overlays, img->backing_abs);
        if (!a) {
                a = g_ptr_array_new();
                g_hash_table_insert(mgr->overlays, g_strdup(img->backing_abs), a);
        }
        g_ptr_array_add(a, img);
}

static void overlay_unlink(Manager *mgr, Image *img) {
        GPtrArray *a;

        if (img->object && g_hash_table_lookup(mgr->image_objects, img->object) == img)
                g_hash_table_remove(mgr->image_objects, img->object);
        if (img->data_file_abs && g_hash_table_lookup(mgr->data_files, img->data_file_abs) == img)
                g_hash_table_remove(mgr->data_files, img->data_file_abs);
        if (img->error || !img->backing_abs)
                return;
        a = g_hash_table_lookup(mgr->overlays, img->backing_abs);
        if (!a)
                return;
        g_ptr_array_remove_fast(a, img);
        if (a->len == 0)
                g_hash_table_remove(mgr->overlays, img->backing_abs);
}

Image *model_find(Manager *mgr, const char *abs) {
        Image *img = g_hash_table_lookup(mgr->images, abs);
        return img && !img->error ? img : NULL;
}

/* Dropped by a pivot, the target of a job that runs now, or another image's data file. */
static bool set_aside(Manager *mgr, Image *img) {
        return img->superseded_by || claims_target_of(mgr->claims, img->path) ||
               g_hash_table_contains(mgr->data_files, img->path);
}

Image *image_data_file_of(Manager *mgr, Image *img) {
        return g_hash_table_lookup(mgr->data_files, img->path);
}

static bool compute_active(Manager *mgr, Image *img) {
        GPtrArray *ov;

        if (img->error || set_aside(mgr, img))
                return false;
        ov = g_hash_table_lookup(mgr->overlays, img->path);
        for (guint i = 0; ov && i < ov->len; i++)
                if (!set_aside(mgr, ov->pdata[i]))
                        return false;
        return true;
}

bool image_is_active(Manager *mgr, Image *img) {
        return !img->error && g_hash_table_contains(mgr->active, img->path);
}

/* Is IMG some chain's backing file (an image that is not set aside names it)? */
bool image_in_any_chain(Manager *mgr, Image *img) {
        GPtrArray *ov = g_hash_table_lookup(mgr->overlays, img->path);
        for (guint i = 0; ov && i < ov->len; i++)
                if (!set_aside(mgr, ov->pdata[i]))
                        return true;
        return false;
}

const char *image_in_use(Manager *mgr, Image *img, char **ret_free) {
        const char *job = claims_holder(mgr->claims, img->path);
        Image *of = image_data_file_of(mgr, img);
        *ret_free = NULL;
        const char *exp = claims_exporter(mgr->claims, img->path);
        if (job)
                return *ret_free = g_strdup_printf("job:%s", job);
        if (exp)
                return *ret_free = g_strdup_printf("export:%s", exp);
        if (of)
                return *ret_free = g_strdup_printf("data-file:%s", of->path);
        return img->external && !claims_held(mgr->claims, img->path) ? "external" : "";
}

/* --- applying what was read ------------------------------------------------------ */

const struct dc_bitmap_info *image_bitmap(const Image *img, const char *name) {
        for (size_t i = 0; i < img->n_bitmaps; i++)
                if (strcmp(img->bitmaps[i].name, name) == 0)
                        return &img->bitmaps[i];
        return NULL;
}

static bool str_eq(const char *a, const char *b) {
        return strcmp(a ? a : "", b ? b : "") == 0;
}

static bool bitmaps_equal(const Image *a, const Image *b) {
        if (a->n_bitmaps != b->n_bitmaps)
                return false;
        for (size_t i = 0; i < a->n_bitmaps; i++) {
                const struct dc_bitmap_info *x = &a->bitmaps[i], *y = &b->bitmaps[i];

                if (strcmp(x->name, y->name) != 0 || x->granularity != y->granularity || x->in_use != y->in_use ||
                    x->enabled != y->enabled || x->dirty != y->dirty || x->busy != y->busy)
                        return false;
        }
        return true;
}

static bool image_equal(const Image *a, const Image *b) {
        if (!!a->error != !!b->error)
                return false;
        if (a->error)
                return a->error_errno == b->error_errno && str_eq(a->error, b->error);
        return a->format == b->format && a->virtual_size == b->virtual_size && a->actual_size == b->actual_size &&
               a->cluster_size == b->cluster_size && str_eq(a->compat, b->compat) &&
               str_eq(a->compression_type, b->compression_type) && str_eq(a->backing_file, b->backing_file) &&
               str_eq(a->backing_format, b->backing_format) && str_eq(a->backing_abs, b->backing_abs) &&
               a->dirty == b->dirty && a->corrupt == b->corrupt && a->encrypted == b->encrypted &&
               a->read_only == b->read_only && str_eq(a->superseded_by, b->superseded_by) &&
               str_eq(a->data_file_abs, b->data_file_abs) && a->dev == b->dev &&
               a->ino == b->ino && a->external == b->external && bitmaps_equal(a, b);
}

/*
 * While our own work holds an image open for writing (an export, a job),
 * its enabled bitmaps are in use on disk because we record into them: the
 * file cannot tell them from bitmaps a crash left in use.  One that was
 * consistent before (or appeared meanwhile: only we could have added it)
 * is busy, with the count last read; one that was inconsistent stays so.
 */
static void bitmaps_while_ours(const Image *old, Image *n) {
        for (size_t i = 0; i < n->n_bitmaps; i++) {
                struct dc_bitmap_info *y = &n->bitmaps[i];
                const struct dc_bitmap_info *x = NULL;

                if (!y->in_use)
                        continue;
                for (size_t k = 0; old && k < old->n_bitmaps && !x; k++)
                        if (strcmp(old->bitmaps[k].name, y->name) == 0)
                                x = &old->bitmaps[k];
                if (x && x->in_use && !x->busy)
                        continue;
                y->in_use = false;
                y->busy = true;
                y->dirty = x ? x->dirty : 0;
        }
}

/* An image refused for what its file holds is worth an operator's attention. */
static void log_refused(const Image *img) {
        int e = img->error_errno;
        bool hostile;

        if (e == EMEDIUMTYPE && !image_named(img->path) && strstr(img->error, "not recognised"))
                return; /* a file that is no image and does not claim to be one */
        hostile = e == EUCLEAN || e == EXDEV || e == ELOOP || e == EFBIG || e == EMEDIUMTYPE || e == ENOTSUP;
        log_fields(hostile ? LOG_WARNING : LOG_INFO,
                   (const char *const[]){ "DISKCHAIN_IMAGE", img->path, "DISKCHAIN_ERROR", bus_error_name(e), NULL },
                   "not publishing '%s': %s", img->path, img->error);
}

/* Add the layers below BACKING (by path) to SET. */
static void add_below(Manager *mgr, const char *backing, GHashTable *set) {
        for (unsigned depth = 0; backing && depth < mgr->config.max_depth; depth++) {
                Image *b = g_hash_table_lookup(mgr->images, backing);
                if (!b || g_hash_table_contains(set, b->path))
                        return;
                g_hash_table_add(set, g_strdup(b->path));
                backing = b->error ? NULL : b->backing_abs;
        }
}

/* The active layers above PATH (PATH itself when active), into SET. */
static void tops_above(Manager *mgr, const char *path, GHashTable *set, GHashTable *seen) {
        GPtrArray *ov;

        if (g_hash_table_contains(seen, path))
                return;
        g_hash_table_add(seen, g_strdup(path));
        if (g_hash_table_contains(mgr->active, path))
                g_hash_table_add(set, g_strdup(path));
        ov = g_hash_table_lookup(mgr->overlays, path);
        for (guint i = 0; ov && i < ov->len; i++)
                tops_above(mgr, ((Image *) ov->pdata[i])->path, set, seen);
}

static GHashTable *path_set(void) {
        return g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
}

/* path -> its chain's object path */
static GHashTable *active_set(void) {
        return g_hash_table_new_full(g_str_hash, g_str_equal, g_free, g_free);
}

/* Take IMG (in the table) out of the model; it is freed with GONE. */
static void unlink_image(Manager *mgr, Image *img, GHashTable *touched, GHashTable *was_valid, GHashTable *below,
                         GPtrArray *gone) {
        if (!g_hash_table_contains(touched, img->path)) {
                g_hash_table_add(touched, g_strdup(img->path));
                if (!img->error)
                        g_hash_table_add(was_valid, g_strdup(img->path));
        }
        if (!img->error && img->backing_abs)
                add_below(mgr, img->backing_abs, below);
        if (!img->error && img->data_file_abs)
                g_hash_table_add(below, g_strdup(img->data_file_abs));
        overlay_unlink(mgr, img);
        g_hash_table_steal(mgr->images, img->path);
        g_ptr_array_add(gone, img);
}

/*
 * Apply FOUND (a worker's findings; FULL: everything there is) and the
 * set-aside changes of TOUCHED_PATHS, and announce the difference.
 */
static void apply(Manager *mgr, GPtrArray *found, bool full, char **touched_paths) {
        g_autoptr(GHashTable) touched = path_set(), was_valid = path_set(), below = path_set(), tops = path_set(),
                              seen = path_set(), new_active = active_set();
        g_autoptr(GHashTable) present = full ? g_hash_table_new(g_str_hash, g_str_equal) : NULL;
        g_autoptr(GPtrArray) gone = g_ptr_array_new_with_free_func(image_free_void);
        GHashTableIter it;
        const char *path;
        Image *img;

        for (char **p = touched_paths; p && *p; p++)
                if (!g_hash_table_contains(touched, *p)) {
                        g_hash_table_add(touched, g_strdup(*p));
                        if (model_find(mgr, *p))
                                g_hash_table_add(was_valid, g_strdup(*p));
                }

        for (guint i = 0; found && i < found->len; i++) {
                Image *n = found->pdata[i], *old;

                if (!n || found_dir(n))
                        continue;
                if (present)
                        g_hash_table_add(present, n->path);
                old = g_hash_table_lookup(mgr->images, n->path);
                if (found_gone(n)) {
                        /* a file, or a directory and everything that was below it */
                        g_autofree char *prefix = g_strconcat(n->path, "/", NULL);
                        g_autoptr(GPtrArray) doomed = g_ptr_array_new();
                        if (old)
                                g_ptr_array_add(doomed, old);
                        else if (n->error_errno == ENOENT) {
                                g_hash_table_iter_init(&it, mgr->images);
                                while (g_hash_table_iter_next(&it, NULL, (void **) &img))
                                        if (g_str_has_prefix(img->path, prefix))
                                                g_ptr_array_add(doomed, img);
                        }
                        for (guint k = 0; k < doomed->len; k++)
                                unlink_image(mgr, doomed->pdata[k], touched, was_valid, below, gone);
                        continue;
                }
                if (!n->error && (claims_held(mgr->claims, n->path) || claims_holder(mgr->claims, n->path)))
                        bitmaps_while_ours(old && !old->error ? old : NULL, n);
                if (old && image_equal(old, n))
                        continue;
                if (n->error && (!old || !old->error || strcmp(old->error, n->error) != 0))
                        log_refused(n);
                if (old)
                        unlink_image(mgr, old, touched, was_valid, below, gone);
                else
                        g_hash_table_add(touched, g_strdup(n->path));
                found->pdata[i] = NULL; /* the model's now */
                g_hash_table_insert(mgr->images, n->path, n);
                overlay_link(mgr, n);
                if (!n->error && n->backing_abs)
                        add_below(mgr, n->backing_abs, below);
                if (!n->error && n->data_file_abs)
                        g_hash_table_add(below, g_strdup(n->data_file_abs));
        }
        if (present) {
                /* a full read: what it did not find is gone */
                g_autoptr(GPtrArray) doomed = g_ptr_array_new();
                g_hash_table_iter_init(&it, mgr->images);
                while (g_hash_table_iter_next(&it, NULL, (void **) &img))
                        if (!g_hash_table_contains(present, img->path))
                                g_ptr_array_add(doomed, img);
                for (guint k = 0; k < doomed->len; k++)
                        unlink_image(mgr, doomed->pdata[k], touched, was_valid, below, gone);
        }
        if (g_hash_table_size(touched) == 0)
                return;
        /* images set aside or not: the layers below them change too */
        g_hash_table_iter_init(&it, touched);
        while (g_hash_table_iter_next(&it, (void **) &path, NULL)) {
                Image *n = model_find(mgr, path);
                if (n && n->backing_abs)
                        add_below(mgr, n->backing_abs, below);
        }

        /* the active layers now */
        g_hash_table_iter_init(&it, mgr->images);
        while (g_hash_table_iter_next(&it, NULL, (void **) &img))
                if (compute_active(mgr, img)) {
                        char *obj = g_hash_table_lookup(mgr->active, img->path);
                        g_hash_table_insert(new_active, g_strdup(img->path),
                                            obj ? g_strdup(obj) : chain_object_path(img->path));
                }

        /* removals first (the objects are gone already, so the interface is named) */
        {
                const char *obj;
                g_hash_table_iter_init(&it, mgr->active);
                while (g_hash_table_iter_next(&it, (void **) &path, (void **) &obj))
                        if (!g_hash_table_contains(new_active, path))
                                (void) sd_bus_emit_interfaces_removed(mgr->bus, obj, IFACE_CHAIN, NULL);
        }
        g_hash_table_iter_init(&it, touched);
        while (g_hash_table_iter_next(&it, (void **) &path, NULL))
                if (g_hash_table_contains(was_valid, path) && !model_find(mgr, path)) {
                        g_autofree char *p = image_object_path(path);
                        (void) sd_bus_emit_interfaces_removed(mgr->bus, p, IFACE_IMAGE, NULL);
                }

        {
                GHashTable *old_active = mgr->active;
                const char *obj;
                mgr->active = TAKE_PTR(new_active);
                new_active = old_active; /* freed on return; now the old set */
                g_hash_table_remove_all(mgr->chain_objects);
                g_hash_table_iter_init(&it, mgr->active);
                while (g_hash_table_iter_next(&it, (void **) &path, (void **) &obj))
                        g_hash_table_insert(mgr->chain_objects, (char *) obj, (char *) path);
        }

        /* additions, then changes */
        g_hash_table_iter_init(&it, touched);
        while (g_hash_table_iter_next(&it, (void **) &path, NULL)) {
                Image *n = model_find(mgr, path);
                if (!n)
                        continue;
                if (!g_hash_table_contains(was_valid, path))
                        (void) sd_bus_emit_object_added(mgr->bus, n->object);
                else
                        (void) sd_bus_emit_properties_changed_strv(mgr->bus, n->object, IFACE_IMAGE, NULL);
                tops_above(mgr, path, tops, seen);
        }
        {
                const char *obj;
                g_hash_table_iter_init(&it, mgr->active);
                while (g_hash_table_iter_next(&it, (void **) &path, (void **) &obj))
                        if (!g_hash_table_contains(new_active, path))
                                (void) sd_bus_emit_object_added(mgr->bus, obj);
        }
        g_hash_table_iter_init(&it, below);
        while (g_hash_table_iter_next(&it, (void **) &path, NULL)) {
                Image *n = model_find(mgr, path);
                if (n && !g_hash_table_contains(touched, path))
                        (void) sd_bus_emit_properties_changed(mgr->bus, n->object, IFACE_IMAGE, "Overlays", "Chains",
                                                              NULL);
                tops_above(mgr, path, tops, seen);
        }
        g_hash_table_iter_init(&it, tops);
        while (g_hash_table_iter_next(&it, (void **) &path, NULL)) {
                const char *obj = g_hash_table_lookup(mgr->active, path);
                if (obj && g_hash_table_contains(new_active, path))
                        (void) sd_bus_emit_properties_changed_strv(mgr->bus, obj, IFACE_CHAIN, NULL);
        }
}

void model_apply(Manager *mgr, GPtrArray *found) {
        apply(mgr, found, false, NULL);
        /* the chains the exports serve may be known better now */
        exports_follow(mgr);
}

void model_changed(Manager *mgr, char **paths) {
        apply(mgr, NULL, false, paths);
}

/* --- refreshing: inotify, the dirty paths, calls that wait for them -------------- */

typedef struct Refresh {
        char **paths;     /* NULL: everything */
        GPtrArray *found;
} Refresh;

static void refresh_free(void *p) {
        Refresh *rf = p;
        g_strfreev(rf->paths);
        if (rf->found)
                g_ptr_array_unref(rf->found);
        free(rf);
}

static void refresh_run(Work *w) {
        Refresh *rf = w->data;
        rf->found = model_read_paths(w->mgr, rf->paths);
}

static void dispatch_again(Manager *mgr, GPtrArray *waiters) {
        for (guint i = 0; i < waiters->len; i++) {
                sd_bus_message *m = waiters->pdata[i];
                (void) sd_bus_message_rewind(m, true);
                if (sd_bus_enqueue_for_read(mgr->bus, m) < 0)
                        (void) sd_bus_reply_method_errorf(m, SD_BUS_ERROR_FAILED, "cannot dispatch the call again");
        }
        g_ptr_array_set_size(waiters, 0);
}

static void refresh_start(Manager *mgr);

static void refresh_done(Work *w) {
        Manager *mgr = w->mgr;
        Refresh *rf = w->data;

        log_debug("read %s again: %u path(s), %u found", rf->paths ? "what changed" : "every root",
                  rf->paths ? g_strv_length(rf->paths) : 0, rf->found ? rf->found->len : 0);
        apply(mgr, rf->found, rf->paths == NULL, NULL);
        mgr->refresh_running = false;
        dispatch_again(mgr, mgr->waiters_now);
        if (mgr->rescan_all || g_hash_table_size(mgr->dirty) || mgr->waiters_next->len)
                refresh_start(mgr);
}

/* Read what is dirty now (everything after an overflow); the waiters for it go along. */
static void refresh_start(Manager *mgr) {
        Refresh *rf;
        Work *w;

        if (mgr->refresh_running)
                return;
        rf = calloc(1, sizeof *rf);
        if (!rf)
                return;
        if (!mgr->rescan_all) {
                GHashTableIter it;
                char *path;
                GPtrArray *a = g_ptr_array_new();
                g_hash_table_iter_init(&it, mgr->dirty);
                while (g_hash_table_iter_next(&it, (void **) &path, NULL))
                        g_ptr_array_add(a, g_strdup(path));
                g_ptr_array_add(a, NULL);
                rf->paths = (char **) g_ptr_array_free(a, FALSE);
        }
        mgr->rescan_all = false;
        g_hash_table_remove_all(mgr->dirty);
        w = work_new(mgr, refresh_run, refresh_done, rf, refresh_free);
        if (!w)
                return;
        mgr->refresh_running = true;
        g_ptr_array_extend_and_steal(mgr->waiters_now, mgr->waiters_next);
        mgr->waiters_next = g_ptr_array_new_with_free_func(message_unref);
        (void) work_submit(w, NULL);
}

static int on_refresh_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        refresh_start(userdata);
        return 0;
}

static void refresh_soon(Manager *mgr) {
        if (!mgr->refresh_timer)
                (void) sd_event_add_time_relative(mgr->event, &mgr->refresh_timer, CLOCK_MONOTONIC, REFRESH_DELAY_USEC,
                                                  10000, on_refresh_timer, mgr);
        else {
                (void) sd_event_source_set_time_relative(mgr->refresh_timer, REFRESH_DELAY_USEC);
                (void) sd_event_source_set_enabled(mgr->refresh_timer, SD_EVENT_ONESHOT);
        }
}

void model_refresh(Manager *mgr, char **paths) {
        for (char **p = paths; p && *p; p++)
                g_hash_table_add(mgr->dirty, g_strdup(*p));
        refresh_soon(mgr);
}

/* Read the inotify queue dry; returns true when something became dirty. */
static bool inotify_drain(Manager *mgr) {
        char buf[16384] __attribute__((aligned(__alignof__(struct inotify_event))));
        bool any = false;

        for (;;) {
                ssize_t n = read(mgr->inotify_fd, buf, sizeof buf);
                if (n <= 0)
                        break;
                for (char *p = buf; p < buf + n;) {
                        struct inotify_event *ev = (struct inotify_event *) p;
                        const char *dir;

                        p += sizeof *ev + ev->len;
                        if (ev->mask & IN_Q_OVERFLOW) {
                                mgr->rescan_all = true;
                                any = true;
                                continue;
                        }
                        g_mutex_lock(&mgr->watch_lock);
                        dir = g_hash_table_lookup(mgr->watches, GINT_TO_POINTER(ev->wd));
                        if (dir) {
                                if (ev->mask & IN_IGNORED) {
                                        if (g_hash_table_lookup(mgr->watched, dir) == GINT_TO_POINTER(ev->wd))
                                                g_hash_table_remove(mgr->watched, dir);
                                        g_hash_table_remove(mgr->watches, GINT_TO_POINTER(ev->wd));
                                } else if (ev->len && ev->name[0] && name_ok(ev->name)) {
                                        g_hash_table_add(mgr->dirty, g_build_filename(dir, ev->name, NULL));
                                        any = true;
                                } else if (ev->mask & (IN_DELETE_SELF | IN_MOVE_SELF)) {
                                        g_hash_table_add(mgr->dirty, g_strdup(dir));
                                        any = true;
                                }
                        }
                        g_mutex_unlock(&mgr->watch_lock);
                }
        }
        return any;
}

static int on_inotify(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        Manager *mgr = userdata;
        if (inotify_drain(mgr))
                refresh_soon(mgr);
        return 0;
}

int model_freshen(Manager *mgr, sd_bus_message *m, char **paths, sd_bus_error *error) {
        uint64_t now;
        bool need;

        (void) sd_event_now(mgr->event, CLOCK_MONOTONIC, &now);
        if (g_hash_table_remove(mgr->freshened, m))
                return 1; /* made fresh for this call already: no second wait */
        (void) inotify_drain(mgr);
        need = mgr->rescan_all || g_hash_table_size(mgr->dirty) > 0;
        for (char **p = paths; p && *p; p++)
                if (!g_hash_table_contains(mgr->images, *p)) {
                        g_hash_table_add(mgr->dirty, g_strdup(*p));
                        need = true;
                }
        if (!need && !mgr->refresh_running)
                return 1;
        /* nothing new is dirty, but a refresh runs that may hold what this call must see: wait for it */
        {
                /* forget marks of calls that never came back (their object vanished meanwhile) */
                GHashTableIter it;
                void *k, *v;
                g_hash_table_iter_init(&it, mgr->freshened);
                while (g_hash_table_iter_next(&it, &k, &v))
                        if ((uint64_t) (uintptr_t) v < now)
                                g_hash_table_iter_remove(&it);
        }
        g_hash_table_insert(mgr->freshened, sd_bus_message_ref(m), (void *) (uintptr_t) (now + 60 * 1000000ull));
        g_ptr_array_add(need ? mgr->waiters_next : mgr->waiters_now, sd_bus_message_ref(m));
        if (need)
                refresh_start(mgr);
        return 0;
}

/* --- who holds QEMU's write lock --------------------------------------------------- */

typedef struct LockLook {
        GHashTable *locked; /* inode number -> device (major << 32 | minor), of files with QEMU's write lock */
} LockLook;

static void lock_look_free(void *p) {
        LockLook *l = p;
        if (l->locked)
                g_hash_table_destroy(l->locked);
        free(l);
}

/* /proc/locks: every lock on the machine; QEMU's write permission is a lock covering byte 101. */
static void locks_run(Work *w) {
        LockLook *l = w->data;
        g_autofree char *text = NULL;
        g_auto(GStrv) lines = NULL;

        l->locked = g_hash_table_new_full(g_int64_hash, g_int64_equal, g_free, g_free);
        if (!g_file_get_contents("/proc/locks", &text, NULL, NULL))
                return;
        lines = g_strsplit(text, "\n", -1);
        for (char **line = lines; *line; line++) {
                char type[16], start[32], end[32];
                unsigned maj, min;
                unsigned long long ino;

                /* "1: OFDLCK ADVISORY  READ  -1 fd:01:1314 100 100"; a " -> " line is a waiter */
                if (strstr(*line, "->"))
                        continue;
                if (sscanf(*line, "%*u: %15s %*s %*s %*d %x:%x:%llu %31s %31s", type, &maj, &min, &ino, start,
                           end) != 6)
                        continue;
                if (strcmp(type, "POSIX") != 0 && strcmp(type, "OFDLCK") != 0)
                        continue; /* flock() and leases are not QEMU's */
                if (strtoull(start, NULL, 10) <= 101 && (strcmp(end, "EOF") == 0 || strtoull(end, NULL, 10) >= 101))
                        g_hash_table_insert(l->locked, g_memdup2(&(gint64){ (gint64) ino }, sizeof(gint64)),
                                            g_memdup2(&(guint64){ (guint64) maj << 32 | min }, sizeof(guint64)));
        }
}

static void locks_done(Work *w) {
        Manager *mgr = w->mgr;
        LockLook *l = w->data;
        GHashTableIter it;
        Image *img;

        mgr->locks_running = false;
        g_hash_table_iter_init(&it, mgr->images);
        while (g_hash_table_iter_next(&it, NULL, (void **) &img)) {
                gint64 ino = (gint64) img->ino;
                const guint64 *dev;
                bool ext;
                if (img->error)
                        continue;
                dev = g_hash_table_lookup(l->locked, &ino);
                ext = dev && *dev == ((guint64) major(img->dev) << 32 | minor(img->dev));
                if (ext != img->external) {
                        img->external = ext;
                        if (!claims_held(mgr->claims, img->path) && !claims_holder(mgr->claims, img->path))
                                (void) sd_bus_emit_properties_changed(mgr->bus, img->object, IFACE_IMAGE, "InUse",
                                                                      NULL);
                }
        }
}

static int on_locks_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        Manager *mgr = userdata;
        LockLook *l;
        Work *w;

        (void) sd_event_source_set_time_relative(s, LOCKS_INTERVAL_USEC);
        (void) sd_event_source_set_enabled(s, SD_EVENT_ON);
        if (mgr->locks_running || g_hash_table_size(mgr->images) == 0)
                return 0;
        l = calloc(1, sizeof *l);
        if (!l)
                return 0;
        w = work_new(mgr, locks_run, locks_done, l, lock_look_free);
        if (!w)
                return 0;
        mgr->locks_running = true;
        (void) work_submit(w, NULL);
        return 0;
}

/* --- set-up ---------------------------------------------------------------------------- */

int model_setup(Manager *mgr) {
        int r;

        mgr->images = g_hash_table_new_full(g_str_hash, g_str_equal, NULL, image_free_void);
        mgr->overlays = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, (GDestroyNotify) g_ptr_array_unref);
        mgr->active = active_set();
        mgr->image_objects = g_hash_table_new(g_str_hash, g_str_equal);
        mgr->data_files = g_hash_table_new(g_str_hash, g_str_equal);
        mgr->chain_objects = g_hash_table_new(g_str_hash, g_str_equal);
        mgr->dirty = path_set();
        mgr->watches = g_hash_table_new_full(g_direct_hash, g_direct_equal, NULL, g_free);
        mgr->watched = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
        mgr->freshened = g_hash_table_new_full(g_direct_hash, g_direct_equal,
                                               message_unref, NULL);
        mgr->waiters_now = g_ptr_array_new_with_free_func(message_unref);
        mgr->waiters_next = g_ptr_array_new_with_free_func(message_unref);
        g_mutex_init(&mgr->watch_lock);
        mgr->inotify_fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
        if (mgr->inotify_fd < 0)
                return -errno;
        r = sd_event_add_io(mgr->event, &mgr->inotify_source, mgr->inotify_fd, EPOLLIN, on_inotify, mgr);
        if (r >= 0)
                r = sd_event_add_time_relative(mgr->event, &mgr->locks_timer, CLOCK_MONOTONIC, LOCKS_INTERVAL_USEC,
                                               500000, on_locks_timer, mgr);
        if (r >= 0)
                r = sd_event_source_set_enabled(mgr->locks_timer, SD_EVENT_ON);
        return r;
}

void model_free(Manager *mgr) {
        sd_event_source_disable_unref(mgr->inotify_source);
        sd_event_source_disable_unref(mgr->refresh_timer);
        sd_event_source_disable_unref(mgr->locks_timer);
        if (mgr->inotify_fd >= 0)
                close(mgr->inotify_fd);
        if (mgr->freshened)
                g_hash_table_destroy(mgr->freshened);
        if (mgr->waiters_now)
                g_ptr_array_unref(mgr->waiters_now);
        if (mgr->waiters_next)
                g_ptr_array_unref(mgr->waiters_next);
        if (mgr->overlays)
                g_hash_table_destroy(mgr->overlays);
        if (mgr->image_objects)
                g_hash_table_destroy(mgr->image_objects);
        if (mgr->data_files)
                g_hash_table_destroy(mgr->data_files);
        if (mgr->chain_objects)
                g_hash_table_destroy(mgr->chain_objects);
        if (mgr->active)
                g_hash_table_destroy(mgr->active);
        if (mgr->images)
                g_hash_table_destroy(mgr->images);
        if (mgr->dirty)
                g_hash_table_destroy(mgr->dirty);
        if (mgr->watches)
                g_hash_table_destroy(mgr->watches);
        if (mgr->watched)
                g_hash_table_destroy(mgr->watched);
        g_mutex_clear(&mgr->watch_lock);
}

/* Before the bus name is taken nobody can call: read everything once, here. */
int model_scan_initial(Manager *mgr) {
        g_autoptr(GPtrArray) found = model_read_paths(mgr, NULL);
        registry_sync(mgr->registry);
        apply(mgr, found, true, NULL);
        return 0;
}

/* --- queries (the loop) ---------------------------------------------------------------- */

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
        GPtrArray *a = g_ptr_array_new();
        GHashTableIter it;
        const char *obj;

        g_hash_table_iter_init(&it, mgr->active);
        while (g_hash_table_iter_next(&it, NULL, (void **) &obj))
                g_ptr_array_add(a, strdup(obj));
        g_ptr_array_add(a, NULL);
        return (char **) g_ptr_array_free(a, FALSE);
}

Image *chain_active_from_object(Manager *mgr, const char *object) {
        const char *abs = g_hash_table_lookup(mgr->chain_objects, object);
        return abs ? model_find(mgr, abs) : NULL;
}

Image *image_from_object(Manager *mgr, const char *object) {
        return g_hash_table_lookup(mgr->image_objects, object);
}

char **image_overlays(Manager *mgr, Image *img) {
        GPtrArray *ov = g_hash_table_lookup(mgr->overlays, img->path);
        GPtrArray *a = g_ptr_array_new();

        for (guint i = 0; ov && i < ov->len; i++)
                g_ptr_array_add(a, strdup(((Image *) ov->pdata[i])->object));
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
                for (guint i = 0; cur && i < a->len; i++)
                        if (a->pdata[i] == cur)
                                cur = NULL; /* a loop: the open will say so */
        }
        return a;
}

char **chain_layers(Manager *mgr, Image *active) {
        g_autoptr(GPtrArray) l = chain_layer_images(mgr, active);
        GPtrArray *a = g_ptr_array_new();

        for (guint i = 0; i < l->len; i++)
                g_ptr_array_add(a, strdup(((Image *) l->pdata[i])->object));
        g_ptr_array_add(a, NULL);
        return (char **) g_ptr_array_free(a, FALSE);
}

char **image_chains(Manager *mgr, Image *img) {
        GPtrArray *a = g_ptr_array_new();
        const char *path = img->path;
        GPtrArray *ov;

        /* most images have one overlay above another up to the top: walk that
         * straight; a fan-out (or a loop) takes the general walk */
        for (unsigned depth = 0; depth <= mgr->config.max_depth; depth++) {
                const char *obj = g_hash_table_lookup(mgr->active, path);
                ov = g_hash_table_lookup(mgr->overlays, path);
                if (obj && !ov) {
                        g_ptr_array_add(a, strdup(obj));
                        break;
                }
                if (!ov || ov->len != 1 || obj) {
                        g_autoptr(GHashTable) tops = path_set(), seen = path_set();
                        GHashTableIter it;
                        const char *top;
                        g_ptr_array_set_size(a, 0);
                        tops_above(mgr, img->path, tops, seen);
                        g_hash_table_iter_init(&it, tops);
                        while (g_hash_table_iter_next(&it, (void **) &top, NULL))
                                g_ptr_array_add(a, strdup(g_hash_table_lookup(mgr->active, top)));
                        break;
                }
                path = ((Image *) ov->pdata[0])->path;
        }
        g_ptr_array_add(a, NULL);
        return (char **) g_ptr_array_free(a, FALSE);
}
