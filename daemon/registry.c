/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The daemon's own records of the files in its storage roots: which format
 * each image is, and which layers a pivot replaced.
 *
 * Design notes
 * ------------
 * - A file's format is never taken from bytes a guest could have written
 *   since diskchain first saw the file.  The first time a file is opened
 *   (by a scan or by a call that names it) its format is decided by its
 *   name and its content as they are then, and recorded; from then on the
 *   record decides.  Rules for that first look: a name ending in ".raw" is
 *   raw whatever the content (a header in it is logged); ".qcow2" must have
 *   a qcow2 header; ".img" is qcow2 with a header and raw without; any
 *   other name is an image only when an overlay's backing-format field
 *   names it (and its content agrees), or when diskchain created it or a
 *   caller classified it (ClassifyImage, polkit-checked).
 * - A raw image whose first sector later holds an image header stays raw
 *   (logged once); a qcow2 image whose header is gone is refused, not read
 *   as something else; an overlay that names a recorded file with another
 *   backing format is refused.
 * - The records live in the daemon's state directory, which only root can
 *   write, so whoever can write an image file cannot forge them (extended
 *   attributes in the user namespace, used before, can be set by any writer
 *   of the file).
 * - A record belongs to a path and a file: (st_dev, st_ino, birth time).  A
 *   file replaced at the same path is a new file and is looked at anew; a
 *   file renamed keeps its record (found by its identity).  The daemon may
 *   notice the old name gone before it looks at the new one, so the record
 *   of a name that disappeared stays findable by its identity for a while
 *   (ORPHAN_TTL_US) before it is dropped.  A layer a pivot
 *   dropped stays superseded only as long as nobody changes it (its ctime
 *   then): a file written in place afterwards is somebody's image again.
 * - The file is a log of lines, each the whole new state of one record
 *   ("R\tpath\tdev\tino\tbtime\tformat\tsource\tsuperseded-by\tctime") or a removal
 *   ("-\tpath"); paths hold no control characters (refused everywhere), so
 *   tabs and newlines separate safely.  Each change is one write() followed
 *   by fdatasync(), except the records of first looks, which a scan of ten
 *   thousand files makes by the thousand: they are synced once at the end of
 *   the worker's item (lost in a crash, the same look decides again).  A
 *   torn last line is dropped when the log is read.  A
 *   pivot's lines (every dropped layer, the new top) are one write, which is
 *   what makes the pivot atomic on disk.  The log is compacted at start-up
 *   when it has grown to more than twice what it describes.
 * - Worker threads and job threads call in (the format oracle, the pivot
 *   record); one mutex guards everything, and nothing else is locked while
 *   it is held.
 */

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "daemon.h"

typedef struct Record {
        char *path;
        uint64_t dev, ino, btime; /* btime 0: unknown (the file system does not say) */
        int format;
        char *source;             /* how the format was decided */
        char *superseded_by;      /* NULL: none */
        uint64_t mark_ctime;      /* the file's ctime (ns) when the pivot dropped it; 0: not checked */
        int64_t orphaned_at;      /* monotonic µs when its name disappeared; 0: it has one */
        bool magic_logged;
} Record;

/* How long the record of a name that disappeared waits for its file to turn up under another name. */
#define ORPHAN_TTL_US (60 * G_USEC_PER_SEC)

struct Registry {
        GMutex lock;
        char *file;
        int fd;
        char **roots;
        GHashTable *by_path; /* path -> Record* (owned) */
        GHashTable *by_id;   /* "dev:ino" -> Record* (also an orphan's) */
        GQueue orphans;      /* Records whose name disappeared (owned), oldest first */
        unsigned lines;
        bool unsynced;       /* lines written since the last fdatasync() */
};

static void record_free(void *p) {
        Record *rec = p;
        if (!rec)
                return;
        free(rec->path);
        free(rec->source);
        free(rec->superseded_by);
        free(rec);
}

static char *id_key(uint64_t dev, uint64_t ino) {
        return g_strdup_printf("%" PRIu64 ":%" PRIu64, dev, ino);
}

static void index_add(Registry *r, Record *rec) {
        Record *old = g_hash_table_lookup(r->by_path, rec->path);
        if (old && old != rec) {
                g_autofree char *k = id_key(old->dev, old->ino);
                if (g_hash_table_lookup(r->by_id, k) == old)
                        g_hash_table_remove(r->by_id, k);
        }
        g_hash_table_replace(r->by_path, rec->path, rec);
        g_hash_table_replace(r->by_id, id_key(rec->dev, rec->ino), rec);
}

static void index_remove(Registry *r, const char *path) {
        Record *rec = g_hash_table_lookup(r->by_path, path);
        if (!rec)
                return;
        {
                g_autofree char *k = id_key(rec->dev, rec->ino);
                if (g_hash_table_lookup(r->by_id, k) == rec)
                        g_hash_table_remove(r->by_id, k);
        }
        g_hash_table_remove(r->by_path, path);
}

/* Drop the orphans that waited long enough (NOW 0: all of them). */
static void orphans_purge(Registry *r, int64_t now) {
        Record *rec;

        while ((rec = g_queue_peek_head(&r->orphans)) && (!now || now - rec->orphaned_at > ORPHAN_TTL_US)) {
                g_autofree char *k = id_key(rec->dev, rec->ino);
                g_queue_pop_head(&r->orphans);
                if (g_hash_table_lookup(r->by_id, k) == rec)
                        g_hash_table_remove(r->by_id, k);
                record_free(rec);
        }
}

/* PATH's name is gone; its record stays findable by identity until orphans_purge() drops it. */
static void index_orphan(Registry *r, const char *path) {
        Record *rec = g_hash_table_lookup(r->by_path, path);
        g_autofree char *k = NULL;
        int64_t now = g_get_monotonic_time();

        if (!rec)
                return;
        g_hash_table_steal(r->by_path, path);
        k = id_key(rec->dev, rec->ino);
        /* without a birth time a reused inode number would look like the same file */
        if (!rec->btime || g_hash_table_lookup(r->by_id, k) != rec) {
                if (g_hash_table_lookup(r->by_id, k) == rec)
                        g_hash_table_remove(r->by_id, k);
                record_free(rec);
                return;
        }
        rec->orphaned_at = now ? now : 1;
        g_queue_push_tail(&r->orphans, rec);
        orphans_purge(r, now);
}

static void append_line(GString *s, const Record *rec) {
        g_string_append_printf(s, "R\t%s\t%" PRIu64 "\t%" PRIu64 "\t%" PRIu64 "\t%s\t%s\t%s\t%" PRIu64 "\n",
                               rec->path, rec->dev, rec->ino, rec->btime,
                               rec->format < 0 ? "-" : dc_format_name(rec->format), rec->source ? rec->source : "-",
                               rec->superseded_by ? rec->superseded_by : "", rec->mark_ctime);
}

/* Write S at the end of the log and make it durable. */
static int log_append(Registry *r, GString *s, bool sync) {
        ssize_t n = write(r->fd, s->str, s->len);
        if (n < 0 || (size_t) n != s->len) {
                int err = n < 0 ? errno : EIO;
                /* a torn line is dropped when the log is read; nothing else to undo */
                log_error("cannot write the records in '%s': %s", r->file, strerror(err));
                return dc_set_error(err, "cannot write the records in '%s': %s", r->file, strerror(err));
        }
        r->lines += 1;
        r->unsynced = true;
        if (sync) {
                if (fdatasync(r->fd) < 0) {
                        int err = errno;
                        log_error("cannot sync the records in '%s': %s", r->file, strerror(err));
                        return dc_set_error(err, "cannot sync the records in '%s': %s", r->file, strerror(err));
                }
                r->unsynced = false;
        }
        return 0;
}

void registry_sync(Registry *r) {
        g_mutex_lock(&r->lock);
        if (r->unsynced && fdatasync(r->fd) < 0)
                log_error("cannot sync the records in '%s': %m", r->file);
        else
                r->unsynced = false;
        g_mutex_unlock(&r->lock);
}

static int identity(int fd, uint64_t *dev, uint64_t *ino, uint64_t *btime) {
        struct statx sx;

        if (statx(fd, "", AT_EMPTY_PATH, STATX_INO | STATX_BTIME, &sx) < 0)
                return -errno;
        *dev = (uint64_t) makedev(sx.stx_dev_major, sx.stx_dev_minor);
        *ino = sx.stx_ino;
        *btime = (sx.stx_mask & STATX_BTIME) ? (uint64_t) sx.stx_btime.tv_sec * 1000000000u + sx.stx_btime.tv_nsec : 0;
        return 0;
}

static bool same_file(const Record *rec, uint64_t dev, uint64_t ino, uint64_t btime) {
        return rec->dev == dev && rec->ino == ino && (!rec->btime || !btime || rec->btime == btime);
}

static void parse_line(Registry *r, char *line) {
        g_auto(GStrv) f = g_strsplit(line, "\t", -1);
        guint n = g_strv_length(f);

        if (n == 2 && strcmp(f[0], "-") == 0) {
                /* the file may have been renamed: its new name can still find it (until compaction or the TTL) */
                index_orphan(r, f[1]);
                return;
        }
        if (n == 9 && strcmp(f[0], "R") == 0 && f[1][0] == '/') {
                Record *rec = calloc(1, sizeof *rec);
                if (!rec)
                        return;
                rec->path = strdup(f[1]);
                rec->dev = g_ascii_strtoull(f[2], NULL, 10);
                rec->ino = g_ascii_strtoull(f[3], NULL, 10);
                rec->btime = g_ascii_strtoull(f[4], NULL, 10);
                rec->format = strcmp(f[5], "qcow2") == 0 ? DC_FORMAT_QCOW2 : strcmp(f[5], "raw") == 0 ? DC_FORMAT_RAW : -1;
                rec->source = strdup(f[6]);
                rec->superseded_by = *f[7] ? strdup(f[7]) : NULL;
                rec->mark_ctime = g_ascii_strtoull(f[8], NULL, 10);
                index_add(r, rec);
                return;
        }
        log_warning("'%s': ignoring a malformed line", r->file);
}

/* Rewrite the log with one line per record (at start-up, before anyone calls in). */
static int compact(Registry *r) {
        g_autofree char *tmp = g_strdup_printf("%s.new", r->file);
        g_autofree char *dir = g_path_get_dirname(r->file);
        GString *s = g_string_new("# diskchain records v1\n");
        GHashTableIter it;
        Record *rec;
        int fd, dfd, err = 0;

        g_hash_table_iter_init(&it, r->by_path);
        while (g_hash_table_iter_next(&it, NULL, (void **) &rec))
                append_line(s, rec);
        fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd < 0 || write(fd, s->str, s->len) != (ssize_t) s->len || fsync(fd) < 0 || rename(tmp, r->file) < 0)
                err = errno ? errno : EIO;
        if (fd >= 0)
                close(fd);
        g_string_free(s, TRUE);
        if (err) {
                (void) unlink(tmp);
                log_warning("cannot compact '%s': %s", r->file, strerror(err));
                return -err;
        }
        dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0) {
                (void) fsync(dfd);
                close(dfd);
        }
        r->lines = g_hash_table_size(r->by_path) + 1;
        return 0;
}

int registry_open(const char *state_dir, char **roots, Registry **ret) {
        g_autofree char *text = NULL;
        g_autoptr(GError) err = NULL;
        gsize len = 0;
        Registry *r;
        char *p, *nl;

        if (g_mkdir_with_parents(state_dir, 0700) < 0) {
                log_error("cannot create the state directory '%s': %m", state_dir);
                return -errno;
        }
        r = calloc(1, sizeof *r);
        if (!r)
                return -ENOMEM;
        g_mutex_init(&r->lock);
        r->file = g_build_filename(state_dir, "records", NULL);
        r->roots = g_strdupv(roots);
        r->by_path = g_hash_table_new_full(g_str_hash, g_str_equal, NULL, record_free);
        r->by_id = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
        g_queue_init(&r->orphans);
        r->fd = -1;
        if (g_file_get_contents(r->file, &text, &len, &err)) {
                for (p = text; (nl = memchr(p, '\n', len - (size_t) (p - text))); p = nl + 1) {
                        *nl = 0;
                        r->lines++;
                        if (*p && *p != '#')
                                parse_line(r, p);
                }
                /* what follows the last newline is a line a crash cut short: dropped */
        } else if (!g_error_matches(err, G_FILE_ERROR, G_FILE_ERROR_NOENT)) {
                log_error("cannot read '%s': %s", r->file, err->message);
                registry_free(r);
                return -EIO;
        }
        if (!text || r->lines > 2 * g_hash_table_size(r->by_path) + 64 || (len && text[len - 1] != '\n'))
                (void) compact(r);
        r->fd = open(r->file, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
        if (r->fd < 0) {
                int e = errno;
                log_error("cannot open '%s': %s", r->file, strerror(e));
                registry_free(r);
                return -e;
        }
        log_debug("%u image record(s) in '%s'", g_hash_table_size(r->by_path), r->file);
        *ret = r;
        return 0;
}

Registry *registry_free(Registry *r) {
        if (!r)
                return NULL;
        if (r->fd >= 0)
                close(r->fd);
        orphans_purge(r, 0);
        g_hash_table_destroy(r->by_id);
        g_hash_table_destroy(r->by_path);
        g_strfreev(r->roots);
        g_free(r->file);
        g_mutex_clear(&r->lock);
        free(r);
        return NULL;
}

unsigned registry_size(Registry *r) {
        unsigned n;
        g_mutex_lock(&r->lock);
        n = g_hash_table_size(r->by_path);
        g_mutex_unlock(&r->lock);
        return n;
}

static bool has_suffix(const char *s, const char *suffix) {
        size_t a = strlen(s), b = strlen(suffix);
        return a >= b && g_ascii_strcasecmp(s + a - b, suffix) == 0;
}

/*
 * The first look at a file nobody recorded: by its name, and its content
 * now.  Returns the format and how it was decided, or -EMEDIUMTYPE.
 */
static int classify(const char *abs, const char *magic, int hint, int *ret_format, const char **ret_source) {
        const char *name = strrchr(abs, '/') ? strrchr(abs, '/') + 1 : abs;
        bool qcow2 = magic && strcmp(magic, "qcow2") == 0;

        if (has_suffix(name, ".raw")) {
                if (magic)
                        log_warning("'%s' is named as a raw image but starts with a %s header: recorded as raw, the "
                                    "header is not followed", abs, magic);
                *ret_format = DC_FORMAT_RAW;
                *ret_source = "name";
        } else if (has_suffix(name, ".qcow2")) {
                if (!qcow2)
                        return dc_set_error(EMEDIUMTYPE, "'%s' has no qcow2 header", abs);
                *ret_format = DC_FORMAT_QCOW2;
                *ret_source = "name";
        } else if (has_suffix(name, ".img")) {
                *ret_format = qcow2 ? DC_FORMAT_QCOW2 : DC_FORMAT_RAW;
                *ret_source = "name";
        } else if (hint >= 0) {
                if (hint == DC_FORMAT_QCOW2 && !qcow2)
                        return dc_set_error(EMEDIUMTYPE, "'%s' is named as a qcow2 backing file but has no qcow2 header",
                                        abs);
                *ret_format = hint;
                *ret_source = "backing-format";
        } else
                return dc_set_error(EMEDIUMTYPE,
                                "'%s' is not recognised as an image: its name does not end in .qcow2, .img or .raw "
                                "(ClassifyImage records the format of such a file)", abs);
        return 0;
}

static Record *record_new(Registry *r, const char *abs, uint64_t dev, uint64_t ino, uint64_t btime, int format,
                          const char *source) {
        Record *rec = calloc(1, sizeof *rec);
        if (!rec)
                return NULL;
        rec->path = strdup(abs);
        rec->dev = dev;
        rec->ino = ino;
        rec->btime = btime;
        rec->format = format;
        rec->source = strdup(source);
        index_add(r, rec);
        return rec;
}

/* The record for ABS with this identity: its own, or one it had under another name (moved or linked). */
static Record *find_record(Registry *r, const char *abs, uint64_t dev, uint64_t ino, uint64_t btime) {
        Record *rec = g_hash_table_lookup(r->by_path, abs), *other;
        g_autofree char *k = NULL;

        if (rec && same_file(rec, dev, ino, btime) && rec->format >= 0)
                return rec;
        k = id_key(dev, ino);
        orphans_purge(r, g_get_monotonic_time());
        other = g_hash_table_lookup(r->by_id, k);
        if (!other || !same_file(other, dev, ino, btime) || other->format < 0)
                return NULL;
        /* the same file under a new name: it keeps what it is */
        {
                g_autofree char *src = g_strdup_printf("moved-from:%s", other->path);
                rec = record_new(r, abs, dev, ino, btime, other->format, src);
        }
        if (rec && other->superseded_by) {
                rec->superseded_by = strdup(other->superseded_by);
                rec->mark_ctime = other->mark_ctime;
        }
        return rec;
}


int registry_format(void *userdata, const char *abs, int fd, int hint, int *ret_format) {
        Registry *r = userdata;
        uint8_t sector[512] = { 0 };
        uint64_t dev, ino, btime;
        const char *magic, *source = NULL;
        bool fresh = false;
        Record *rec;
        int format = -1, ret = 0;

        if (identity(fd, &dev, &ino, &btime) < 0)
                return dc_set_error(errno, "'%s': cannot stat: %m", abs);
        if (pread(fd, sector, sizeof sector, 0) < 0)
                return dc_set_error(errno, "'%s': cannot read its first sector: %m", abs);
        magic = dc_probe_magic(sector, sizeof sector);

        g_mutex_lock(&r->lock);
        rec = find_record(r, abs, dev, ino, btime);
        if (!rec) {
                ret = classify(abs, magic, hint, &format, &source);
                if (ret < 0)
                        goto out;
                rec = record_new(r, abs, dev, ino, btime, format, source);
                if (!rec) {
                        ret = dc_set_error(ENOMEM, "out of memory");
                        goto out;
                }
                fresh = true;
        }
        if (fresh || strncmp(rec->source, "moved-from:", 11) == 0) {
                GString *s = g_string_new(NULL);
                append_line(s, rec);
                /* synced with the others of this batch (registry_sync): lost in a crash, the same first
                 * look decides again */
                ret = log_append(r, s, false);
                g_string_free(s, TRUE);
                if (ret < 0) {
                        index_remove(r, abs);
                        goto out;
                }
                if (fresh)
                        log_fields(LOG_INFO, (const char *const[]){ "DISKCHAIN_IMAGE", abs, "DISKCHAIN_FORMAT",
                                                                    dc_format_name(rec->format), NULL },
                                   "recorded '%s' as %s (by its %s)", abs, dc_format_name(rec->format), rec->source);
                else {
                        free(rec->source);
                        rec->source = strdup("moved");
                }
        }
        if (rec->format == DC_FORMAT_QCOW2 && !(magic && strcmp(magic, "qcow2") == 0)) {
                ret = dc_set_error(EMEDIUMTYPE,
                               "'%s' is recorded as a qcow2 image but no longer starts with a qcow2 header; it is not "
                               "read as anything else (ClassifyImage records another format)", abs);
                goto out;
        }
        if (rec->format == DC_FORMAT_RAW && magic && !rec->magic_logged) {
                log_fields(LOG_WARNING, (const char *const[]){ "DISKCHAIN_IMAGE", abs, NULL },
                           "'%s' is a raw image whose first sector now holds a %s header (written by its guest?); "
                           "it stays raw", abs, magic);
                rec->magic_logged = true;
        }
        if (hint >= 0 && hint != rec->format) {
                ret = dc_set_error(EMEDIUMTYPE, "'%s' is named as a %s backing file, but it is recorded as a %s image",
                               abs, dc_format_name(hint), dc_format_name(rec->format));
                goto out;
        }
        *ret_format = rec->format;
out:
        g_mutex_unlock(&r->lock);
        return ret;
}

static int set_format(Registry *r, const char *abs, int fd, int format, const char *source) {
        uint64_t dev, ino, btime;
        Record *rec;
        GString *s;
        int ret;

        if (identity(fd, &dev, &ino, &btime) < 0)
                return dc_set_error(errno, "'%s': cannot stat: %m", abs);
        g_mutex_lock(&r->lock);
        rec = record_new(r, abs, dev, ino, btime, format, source);
        if (!rec) {
                g_mutex_unlock(&r->lock);
                return dc_set_error(ENOMEM, "out of memory");
        }
        s = g_string_new(NULL);
        append_line(s, rec);
        ret = log_append(r, s, true);
        g_string_free(s, TRUE);
        if (ret < 0)
                index_remove(r, abs);
        g_mutex_unlock(&r->lock);
        if (ret >= 0)
                log_fields(LOG_INFO, (const char *const[]){ "DISKCHAIN_IMAGE", abs, "DISKCHAIN_FORMAT",
                                                            dc_format_name(format), NULL },
                           "recorded '%s' as %s (%s)", abs, dc_format_name(format), source);
        return ret;
}

int registry_created(void *userdata, const char *abs, int fd, int format) {
        return set_format(userdata, abs, fd, format, "created");
}

int registry_classify(Registry *r, const char *abs, int fd, int format) {
        return set_format(r, abs, fd, format, "classified");
}

static uint64_t ctime_ns(const struct stat *st) {
        return (uint64_t) st->st_ctim.tv_sec * 1000000000u + (uint64_t) st->st_ctim.tv_nsec;
}

int registry_pivoted(void *userdata, const char *new_top, const char *const *dropped) {
        Registry *r = userdata;
        GString *s = g_string_new(NULL);
        GPtrArray *changed = g_ptr_array_new();
        int ret = 0;

        g_mutex_lock(&r->lock);
        for (size_t i = 0; dropped && dropped[i]; i++) {
                Record *rec = g_hash_table_lookup(r->by_path, dropped[i]);
                struct stat st;
                int fd = dc_path_open(dropped[i], (const char *const *) r->roots, O_PATH, 0);

                if (fd < 0 || fstat(fd, &st) < 0) {
                        /* gone already: nothing to set aside */
                        if (fd >= 0)
                                close(fd);
                        continue;
                }
                close(fd);
                if (!rec || rec->dev != (uint64_t) st.st_dev || rec->ino != (uint64_t) st.st_ino)
                        rec = record_new(r, dropped[i], (uint64_t) st.st_dev, (uint64_t) st.st_ino, 0,
                                         rec ? rec->format : -1, "pivot");
                if (!rec)
                        continue;
                free(rec->superseded_by);
                rec->superseded_by = strdup(new_top);
                rec->mark_ctime = ctime_ns(&st);
                g_ptr_array_add(changed, rec);
        }
        {
                Record *top = g_hash_table_lookup(r->by_path, new_top);
                if (top && top->superseded_by) {
                        free(top->superseded_by);
                        top->superseded_by = NULL;
                        top->mark_ctime = 0;
                        g_ptr_array_add(changed, top);
                }
        }
        for (guint i = 0; i < changed->len; i++)
                append_line(s, changed->pdata[i]);
        if (s->len)
                ret = log_append(r, s, true);
        g_mutex_unlock(&r->lock);
        if (ret >= 0)
                log_fields(LOG_INFO, (const char *const[]){ "DISKCHAIN_IMAGE", new_top, NULL },
                           "pivot recorded: '%s' is the active layer, %u layer(s) superseded", new_top,
                           dropped ? g_strv_length((char **) dropped) : 0);
        g_string_free(s, TRUE);
        g_ptr_array_free(changed, TRUE);
        return ret;
}

char *registry_superseded_by(Registry *r, const char *abs, const struct stat *st) {
        Record *rec;
        char *v = NULL;

        g_mutex_lock(&r->lock);
        rec = g_hash_table_lookup(r->by_path, abs);
        if (rec && rec->superseded_by && rec->dev == (uint64_t) st->st_dev && rec->ino == (uint64_t) st->st_ino &&
            (!rec->mark_ctime || rec->mark_ctime == ctime_ns(st)))
                v = strdup(rec->superseded_by);
        g_mutex_unlock(&r->lock);
        return v;
}

void registry_forget(Registry *r, const char *abs) {
        g_mutex_lock(&r->lock);
        if (g_hash_table_contains(r->by_path, abs)) {
                GString *s = g_string_new(NULL);
                g_string_append_printf(s, "-\t%s\n", abs);
                /* no sync: a lost removal leaves a record no file matches */
                (void) log_append(r, s, false);
                g_string_free(s, TRUE);
                index_orphan(r, abs);
        }
        g_mutex_unlock(&r->lock);
}
