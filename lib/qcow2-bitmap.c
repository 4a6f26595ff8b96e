/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Dirty bitmaps.  Persistent ones: the qcow2 bitmaps extension (qcow2.rst,
 * "Bitmaps"), read, recorded and written the way QEMU's
 * block/qcow2-bitmap.c does, so that either program can pick up what the
 * other left.  Transient ones (QEMU's non-persistent bitmaps), of any
 * format, live in the same set in memory only.
 *
 * Design notes
 * ------------
 * - While nobody writes an image, its bitmaps are read from the file when
 *   asked for (dc_image_bitmaps, dc_image_bitmap_extents).
 * - The first guest write of an open (prepare_for_write in qcow2.c) loads
 *   every enabled ("auto"), consistent bitmap into memory and flags it in
 *   use on disk.  Writes, zeroes and discards set its bits
 *   (qcow2_bitmaps_record), and a clean close stores it and clears the
 *   flag.  A crash leaves the flag: the bitmap is inconsistent, as after a
 *   QEMU crash, and is refused for backups ("a full backup is needed").
 *   Disabled bitmaps are not flagged: nothing changes them.
 * - A change of the set (add, remove, clear, merge, enable, disable) is
 *   stored at once.  The order keeps qcow2-refcount.c's rules: new data
 *   clusters, tables and a new directory go into freshly allocated
 *   clusters; one fdatasync; then the header points at the new directory
 *   (qcow2_header_set_bitmaps: an atomic in-sector write, or one rebuild of
 *   cluster 0); then the old directory, tables and data clusters are freed.
 *   A crash at any point leaves the old set or the new one, at worst with
 *   leaked clusters.
 * - The set hangs off the image (dc_image.bitmaps), whatever its format.
 *   A transient bitmap is in it from its add to the image's close: never
 *   in the directory, never stored, recording whenever enabled (the raw
 *   driver records too).  The opens that hold transient ones are listed
 *   (holders), so that another open of the same file in this process, a
 *   scan reading it afresh, lists them as well.
 * - Bits are kept as QEMU stores them: bit k covers guest bytes
 *   [k << granularity_bits, (k + 1) << granularity_bits) and is bit k % 8 of
 *   byte k / 8, the bytes cut into clusters; a table entry of 0 is a cluster
 *   of zeros (QEMU writes no other shortcut), 1 one of ones.
 */

#include <sys/stat.h>

#include "qcow2.h"

/* What one image may hold in memory for its bitmaps: a hostile directory
 * can name many large bitmaps sharing one table. */
#define BITS_MAX_TOTAL (1ull << 30)
#define TABLE_MAX_TOTAL (16ull << 20) /* entries */

struct qbm {
        char *name;              /* NAME_SIZE bytes and a NUL */
        uint16_t name_size;
        uint32_t flags;          /* QCOW2_BME_AUTO as stored; IN_USE only while inconsistent */
        uint8_t gran;            /* granularity bits */
        bool inconsistent;       /* in use when found: kept as it is, good only for removal */
        bool removed;            /* its clusters are freed at the next store */
        bool changed;            /* BITS differ from the table on disk */
        bool held;               /* in use on disk until the close stores it (recorded, or resized) */
        bool busy;               /* a backup took its bits (dc_image_bitmap_backup_begin): in use on disk */
        bool transient;          /* in memory only, as long as this open of the image (never stored) */
        uint64_t table_offset;   /* on disk, 0 for a new bitmap */
        uint32_t table_size;
        uint64_t *table;         /* host order */
        uint8_t *bits;           /* NULL until loaded */
        uint64_t bytes;          /* allocated in BITS */
};

struct dc_bitmap_set {
        pthread_mutex_t lock;    /* the bits, against recording writers */
        struct qbm *v;
        size_t n;
        bool recording;          /* enabled bitmaps record writes (persistent ones in use on disk, stored at close) */
        bool registered;         /* in the holders' list: it has held transient bitmaps */
        uint64_t vsize;          /* the disk's size the bits cover (under LOCK) */
        uint64_t bits_total, table_total;
};

/*
 * The opens of this process that hold transient bitmaps, so that another
 * open of the same file (a scan reading it afresh) lists them too.  Taken
 * before a set's bits lock, never while holding it.
 */
struct holder {
        dev_t dev;
        ino_t ino;
        dc_image *img;
        struct holder *next;
};
static pthread_mutex_t holders_lock = PTHREAD_MUTEX_INITIALIZER;
static struct holder *holders;

static bool persistent_ok(dc_image *img) {
        return img->drv == &dc_qcow2_driver && QC(img)->version >= 3;
}

static uint64_t bytes_for(uint64_t vsize, uint8_t gran) {
        return DIV_ROUND_UP(DIV_ROUND_UP(vsize, UINT64_C(1) << gran), 8);
}

static void qbm_done(struct qbm *q) {
        free(q->name);
        free(q->table);
        free(q->bits);
}

static void bitmaps_free(struct dc_bitmap_set *B) {
        if (!B)
                return;
        for (size_t i = 0; i < B->n; i++)
                qbm_done(&B->v[i]);
        free(B->v);
        pthread_mutex_destroy(&B->lock);
        free(B);
}

static bool name_is(const struct qbm *q, const char *name) {
        return !q->removed && strlen(name) == q->name_size && memcmp(q->name, name, q->name_size) == 0;
}

static struct qbm *find(struct dc_bitmap_set *B, const char *name) {
        for (size_t i = 0; i < B->n; i++)
                if (name_is(&B->v[i], name))
                        return &B->v[i];
        return NULL;
}

/* --- loading -------------------------------------------------------------- */

static int load_visit(dc_image *img, const struct qcow2_bitmap_entry *b, void *userdata) {
        struct dc_bitmap_set *B = userdata;
        struct qbm *v, *q;

        (void) img;
        if (B->table_total + b->table_size > TABLE_MAX_TOTAL)
                return dc_error(EFBIG, "'%s': the bitmap tables hold more than %llu entries together", img->path,
                                (unsigned long long) TABLE_MAX_TOTAL);
        v = reallocarray(B->v, B->n + 1, sizeof *v);
        if (!v)
                return dc_error(ENOMEM, "out of memory");
        B->v = v;
        q = &v[B->n];
        *q = (struct qbm){ .name = strndup(b->name, b->name_size), .name_size = b->name_size,
                           .flags = b->flags, .gran = b->granularity_bits,
                           .inconsistent = b->flags & QCOW2_BME_IN_USE, .table_offset = b->table_offset,
                           .table_size = b->table_size, .table = malloc((size_t) b->table_size * 8) };
        if (!q->name || !q->table || strlen(q->name) != b->name_size) {
                bool nul = q->name && strlen(q->name) != b->name_size;
                qbm_done(q);
                return nul ? dc_error(EUCLEAN, "'%s': a bitmap name contains a NUL byte", img->path)
                           : dc_error(ENOMEM, "out of memory");
        }
        for (uint32_t j = 0; j < b->table_size; j++)
                q->table[j] = be64(b->table + (size_t) j * 8);
        B->table_total += b->table_size;
        B->n++;
        return 0;
}

/* The directory as the file holds it, into memory (bits not yet read). */
static int load_into(dc_image *img, struct dc_bitmap_set **ret) {
        struct qcow2 *s = img->drv == &dc_qcow2_driver ? QC(img) : NULL;
        struct dc_bitmap_set *B = calloc(1, sizeof *B);
        uint64_t fsize;
        int r = 0;

        if (!B)
                return dc_error(ENOMEM, "out of memory");
        pthread_mutex_init(&B->lock, NULL);
        B->vsize = img->virtual_size;
        if (img->drv == &dc_qcow2_driver && s->has_bitmaps && s->version >= 3 &&
            (s->autoclear & QCOW2_AUTOCLEAR_BITMAPS)) {
                r = qcow2_file_size(img, &fsize);
                if (r >= 0)
                        r = qcow2_read_bitmaps(img, fsize, load_visit, B);
        }
        if (r < 0) {
                bitmaps_free(B);
                return r;
        }
        *ret = B;
        return 0;
}

/* ... kept with the image: it is being written, or its set is changing */
static int load(dc_image *img) {
        return img->bitmaps ? 0 : load_into(img, &img->bitmaps);
}

/* Q's bits in memory, at least as many as the virtual size needs. */
static int load_bits(dc_image *img, struct dc_bitmap_set *B, struct qbm *q) {
        uint64_t cs, need = bytes_for(img->virtual_size, q->gran);
        uint8_t *bits;
        int r;

        if (q->bits)
                return 0; /* (a transient one's always are) */
        cs = QC(img)->cluster_size;
        if (q->inconsistent)
                return dc_error(ESTALE, "'%s': bitmap '%s' is inconsistent (in use by a writer, or left in use by one "
                                        "that stopped without saving it): it cannot say what changed, a full backup "
                                        "is needed; it can only be removed", img->path, q->name);
        if (need > BITS_MAX_TOTAL - B->bits_total)
                return dc_error(EFBIG, "'%s': the bitmaps need more than the %llu MiB diskchain keeps in memory for one "
                                       "image", img->path, (unsigned long long) (BITS_MAX_TOTAL >> 20));
        bits = calloc(1, MAX(need, 1u));
        if (!bits)
                return dc_error(ENOMEM, "out of memory");
        for (uint64_t j = 0; q->table && j < q->table_size && j * cs < need; j++) {
                uint64_t e = q->table[j], o = e & 0x00fffffffffffe00ull, n = MIN(cs, need - j * cs);
                if (o) {
                        r = dc_pread_full(img->fd, bits + j * cs, n, o);
                        if (r < 0) {
                                free(bits);
                                return dc_error(r, "'%s': cannot read bitmap data: %s", img->path, strerror(-r));
                        }
                } else if (e & 1)
                        memset(bits + j * cs, 0xff, n);
        }
        /* bits past the end of the disk are not the disk's */
        if (need && img->virtual_size % (UINT64_C(8) << q->gran)) {
                uint64_t used = DIV_ROUND_UP(img->virtual_size, UINT64_C(1) << q->gran) % 8;
                if (used)
                        bits[need - 1] &= (uint8_t) ((1u << used) - 1);
        }
        pthread_mutex_lock(&B->lock);
        q->bits = bits;
        q->bytes = need;
        B->bits_total += need;
        pthread_mutex_unlock(&B->lock);
        return 0;
}

/* --- walking the bits ---------------------------------------------------------- */

/* The set bits of BITS (NBYTES) as guest byte ranges, runs merged, clipped to VSIZE. */
static int walk_bits(const uint8_t *bits, uint64_t nbytes, uint8_t gran, uint64_t vsize,
                     int (*cb)(void *userdata, uint64_t off, uint64_t len), void *userdata) {
        uint64_t nbits = MIN(DIV_ROUND_UP(vsize, UINT64_C(1) << gran), nbytes * 8), run = 0, start = 0;
        int r;

        for (uint64_t k = 0; k < nbits; k++) {
                bool set;

                /* a whole byte that continues what is going on: the next byte */
                if (k % 8 == 0 && k + 8 <= nbits && bits[k / 8] == (run ? 0xff : 0)) {
                        run += run ? 8 : 0;
                        k += 7;
                        continue;
                }
                set = bits[k / 8] >> (k % 8) & 1;
                if (set && !run++)
                        start = k;
                if (!set && run) {
                        r = cb(userdata, start << gran, run << gran);
                        if (r < 0)
                                return r;
                        run = 0;
                }
        }
        if (run) {
                uint64_t off = start << gran;
                return cb(userdata, off, MIN(run << gran, vsize - off));
        }
        return 0;
}

static void set_range(uint8_t *bits, uint64_t nbytes, uint8_t gran, uint64_t off, uint64_t len) {
        uint64_t first = off >> gran, last = (off + len - 1) >> gran;

        if (!len || first >= nbytes * 8)
                return;
        last = MIN(last, nbytes * 8 - 1);
        while (first <= last && first % 8) {
                bits[first / 8] |= (uint8_t) (1u << (first % 8));
                first++;
        }
        if (first + 7 <= last) {
                memset(bits + first / 8, 0xff, (last + 1 - first) / 8);
                first += (last + 1 - first) / 8 * 8;
        }
        for (; first <= last; first++)
                bits[first / 8] |= (uint8_t) (1u << (first % 8));
}

static int count_cb(void *userdata, uint64_t off, uint64_t len) {
        (void) off;
        *(uint64_t *) userdata += len;
        return 0;
}

/* --- storing ---------------------------------------------------------------------- */

struct run {
        uint64_t first, n; /* clusters */
};

struct runs {
        struct run *v;
        size_t n;
};

static int runs_add(struct runs *R, uint64_t off, uint64_t n, uint64_t cs) {
        struct run *v;

        if (!off || !n)
                return 0;
        v = reallocarray(R->v, R->n + 1, sizeof *v);
        if (!v)
                return dc_error(ENOMEM, "out of memory");
        R->v = v;
        R->v[R->n++] = (struct run){ off / cs, n };
        return 0;
}

/* The clusters of Q's table on disk, and the data clusters it points to. */
static int runs_add_table(struct runs *R, const struct qbm *q, uint64_t cs) {
        int r = runs_add(R, q->table_offset, DIV_ROUND_UP((uint64_t) q->table_size * 8, cs), cs);

        for (uint32_t j = 0; r >= 0 && j < q->table_size; j++)
                r = runs_add(R, q->table[j] & 0x00fffffffffffe00ull, 1, cs);
        return r;
}

static int alloc(dc_image *img, uint64_t n, struct runs *fresh, uint64_t *ret) {
        struct qcow2 *s = QC(img);
        uint64_t c;
        int r;

        if (s->alloc_unsafe)
                return dc_error(EUCLEAN, "'%s': the refcount table does not cover the whole file: new refcount blocks "
                                         "could overwrite data", img->path);
        r = qcow2_alloc_clusters(img, n, &c);
        if (r < 0)
                return r;
        *ret = c * s->cluster_size;
        return runs_add(fresh, *ret, n, s->cluster_size);
}

static int write_at(dc_image *img, const void *buf, size_t len, uint64_t off, const char *what) {
        int r = dc_pwrite_full(img->fd, buf, len, off);
        if (r < 0)
                return dc_error(r, "'%s': cannot write %s: %s", img->path, what, strerror(-r));
        return 0;
}

/* Q's bits into fresh data clusters and a fresh table: *RET_TABLE (TSIZE entries, host order). */
static int write_table(dc_image *img, const struct qbm *q, struct runs *fresh, uint64_t **ret_table,
                       uint32_t *ret_tsize, uint64_t *ret_toff) {
        struct qcow2 *s = QC(img);
        uint64_t cs = s->cluster_size, need = bytes_for(img->virtual_size, q->gran), tsize = DIV_ROUND_UP(need, cs);
        _cleanup_free_ uint64_t *t = calloc(MAX(tsize, 1u), sizeof *t);
        _cleanup_free_ uint8_t *buf = malloc(MAX(ALIGN_UP(tsize * 8, cs), cs));
        uint64_t toff;
        int r;

        if (!t || !buf)
                return dc_error(ENOMEM, "out of memory");
        if (tsize > QCOW2_MAX_BITMAP_TABLE || tsize * cs > QCOW2_MAX_BITMAP_BYTES)
                return dc_error(EFBIG, "'%s': bitmap '%s' would be over QEMU's size limit", img->path, q->name);
        for (uint64_t j = 0; j < tsize; j++) {
                uint64_t n = MIN(cs, need - j * cs), c;
                const uint8_t *p = q->bits && j * cs < q->bytes ? q->bits + j * cs : NULL;
                bool zero = true;

                n = p ? MIN(n, q->bytes - j * cs) : 0;
                for (uint64_t k = 0; k < n && zero; k++)
                        zero = !p[k];
                if (zero)
                        continue;
                r = alloc(img, 1, fresh, &c);
                if (r < 0)
                        return r;
                memset(buf, 0, cs);
                memcpy(buf, p, n);
                r = write_at(img, buf, cs, c, "bitmap data");
                if (r < 0)
                        return r;
                t[j] = c;
        }
        memset(buf, 0, ALIGN_UP(tsize * 8, cs));
        for (uint64_t j = 0; j < tsize; j++)
                put_be64(buf + j * 8, t[j]);
        r = alloc(img, DIV_ROUND_UP(tsize * 8, cs), fresh, &toff);
        if (r >= 0)
                r = write_at(img, buf, ALIGN_UP(tsize * 8, cs), toff, "a bitmap table");
        if (r < 0)
                return r;
        *ret_table = TAKE_PTR(t);
        *ret_tsize = (uint32_t) tsize;
        *ret_toff = toff;
        return 0;
}

/*
 * Store the set: changed bitmaps get new tables, every bitmap a new
 * directory entry (in use when held or inconsistent), then the header
 * switches and the old clusters are freed.  On failure nothing on disk
 * changed but leaked clusters, and memory is as it was.  The caller holds
 * the bits' lock throughout, so that no write is recorded into bits that a
 * failure takes back: writes wait for the store.
 */
static int store(dc_image *img) {
        struct qcow2 *s = QC(img);
        struct dc_bitmap_set *B = img->bitmaps;
        uint64_t cs = s->cluster_size, dsize = 0, doff = 0, p = 0;
        struct runs fresh = { 0 }, old = { 0 };
        struct { uint64_t *table, off; uint32_t size; } *nt = calloc(MAX(B->n, 1u), sizeof *nt);
        _cleanup_free_ uint8_t *dir = NULL;
        uint32_t nb = 0;
        int r = 0;

        if (!nt)
                return dc_error(ENOMEM, "out of memory");
        for (size_t i = 0; i < B->n && r >= 0; i++) {
                struct qbm *q = &B->v[i];
                if (q->transient)
                        continue;
                if (q->removed) {
                        r = runs_add_table(&old, q, cs);
                        continue;
                }
                nb++;
                dsize += ALIGN_UP(24 + (uint64_t) q->name_size, 8);
                if (!q->changed && q->table_offset &&
                    (q->inconsistent || bytes_for(img->virtual_size, q->gran) <= (uint64_t) q->table_size * cs))
                        continue;
                r = write_table(img, q, &fresh, &nt[i].table, &nt[i].size, &nt[i].off);
                if (r >= 0)
                        r = runs_add_table(&old, q, cs);
        }
        if (r >= 0 && nb > QCOW2_MAX_BITMAPS)
                r = dc_error(EFBIG, "'%s': more than QEMU's %u bitmaps", img->path, QCOW2_MAX_BITMAPS);
        if (r >= 0 && dsize > QCOW2_MAX_BITMAP_DIR_BYTES)
                r = dc_error(EFBIG, "'%s': the bitmap directory would be over QEMU's limit of %llu bytes", img->path,
                             (unsigned long long) QCOW2_MAX_BITMAP_DIR_BYTES);
        if (r >= 0 && nb) {
                dir = calloc(1, ALIGN_UP(dsize, cs));
                if (!dir)
                        r = dc_error(ENOMEM, "out of memory");
        }
        for (size_t i = 0; r >= 0 && nb && i < B->n; i++) {
                struct qbm *q = &B->v[i];
                uint32_t flags = q->flags & QCOW2_BME_AUTO;
                if (q->removed || q->transient)
                        continue;
                if (q->inconsistent || q->held || q->busy)
                        flags |= QCOW2_BME_IN_USE;
                put_be64(dir + p, nt[i].table ? nt[i].off : q->table_offset);
                put_be32(dir + p + 8, nt[i].table ? nt[i].size : q->table_size);
                put_be32(dir + p + 12, flags);
                dir[p + 16] = 1; /* type: dirty tracking bitmap */
                dir[p + 17] = q->gran;
                put_be16(dir + p + 18, q->name_size);
                memcpy(dir + p + 24, q->name, q->name_size);
                p += ALIGN_UP(24 + (uint64_t) q->name_size, 8);
        }
        if (r >= 0 && nb)
                r = alloc(img, DIV_ROUND_UP(dsize, cs), &fresh, &doff);
        if (r >= 0 && nb)
                r = write_at(img, dir, ALIGN_UP(dsize, cs), doff, "the bitmap directory");
        if (r >= 0)
                r = dc_fdatasync(img->fd) < 0 ? dc_error(EIO, "'%s': cannot sync: %m", img->path) : 0;
        if (r >= 0 && s->has_bitmaps)
                r = runs_add(&old, s->bitmap_dir_offset, DIV_ROUND_UP(s->bitmap_dir_size, cs), cs);
        if (r >= 0)
                r = qcow2_header_set_bitmaps(img, nb, dsize, doff);
        if (r < 0) {
                /* nothing refers to what was written: give it back (a crash would only leak it) */
                for (size_t i = 0; i < fresh.n; i++)
                        (void) qcow2_free_clusters(img, fresh.v[i].first, fresh.v[i].n);
        } else {
                size_t k = 0;
                for (size_t i = 0; i < old.n; i++)
                        (void) qcow2_free_clusters(img, old.v[i].first, old.v[i].n);
                for (size_t i = 0; i < B->n; i++) {
                        struct qbm *q = &B->v[i];
                        if (q->removed) {
                                B->bits_total -= q->bits ? q->bytes : 0;
                                B->table_total -= q->table_size;
                                qbm_done(q);
                                continue;
                        }
                        if (nt[i].table) {
                                free(q->table);
                                B->table_total += nt[i].size - q->table_size;
                                q->table = TAKE_PTR(nt[i].table);
                                q->table_offset = nt[i].off;
                                q->table_size = nt[i].size;
                                q->changed = false;
                        }
                        B->v[k++] = *q;
                }
                B->n = k;
        }
        for (size_t i = 0; i < B->n; i++)
                free(nt[i].table);
        free(nt);
        free(fresh.v);
        free(old.v);
        return r;
}

/* The removed ones of B gone from memory (nothing of theirs on disk). */
static void drop_removed(struct dc_bitmap_set *B) {
        size_t k = 0;

        for (size_t i = 0; i < B->n; i++) {
                struct qbm *q = &B->v[i];
                if (q->removed) {
                        B->bits_total -= q->bits ? q->bytes : 0;
                        qbm_done(q);
                        continue;
                }
                B->v[k++] = *q;
        }
        B->n = k;
}

/* A change of Q made lasting: stored with the file's set, or (transient) only in memory.  The bits' lock is held. */
static int save(dc_image *img, const struct qbm *q) {
        if (!q->transient)
                return store(img);
        drop_removed(img->bitmaps);
        return 0;
}

/* IMG holds transient bitmaps: listed for the other opens of its file.  The image lock is held. */
static void hold(dc_image *img, struct dc_bitmap_set *B) {
        struct holder *h;
        struct stat st;

        if (B->registered || fstat(img->fd, &st) < 0 || !(h = calloc(1, sizeof *h)))
                return; /* (only the listing through other opens misses them) */
        *h = (struct holder){ .dev = st.st_dev, .ino = st.st_ino, .img = img };
        pthread_mutex_lock(&holders_lock);
        h->next = holders;
        holders = h;
        pthread_mutex_unlock(&holders_lock);
        B->registered = true;
}

static void unhold(dc_image *img) {
        pthread_mutex_lock(&holders_lock);
        for (struct holder **p = &holders; *p; p = &(*p)->next)
                if ((*p)->img == img) {
                        struct holder *h = *p;
                        *p = h->next;
                        free(h);
                        break;
                }
        pthread_mutex_unlock(&holders_lock);
}

/* --- the write path ------------------------------------------------------------------ */

int qcow2_bitmaps_start_recording(dc_image *img) {
        struct qcow2 *s = QC(img);
        struct dc_bitmap_set *B;
        bool any = false;
        int r;

        /* (a repair changes no guest data: nothing to record) */
        if (!s->has_bitmaps || !(s->autoclear & QCOW2_AUTOCLEAR_BITMAPS) || s->version < 3 || img->check_mode)
                return 0;
        r = load(img);
        if (r < 0)
                return r;
        B = img->bitmaps;
        for (size_t i = 0; i < B->n; i++) {
                struct qbm *q = &B->v[i];
                if (q->removed || q->inconsistent || q->transient || !(q->flags & QCOW2_BME_AUTO))
                        continue;
                r = load_bits(img, B, q);
                if (r < 0)
                        return r;
                q->held = any = true;
        }
        if (!any)
                return 0;
        /* in use on disk before the first write reaches it: a crash from here on leaves them inconsistent */
        pthread_mutex_lock(&B->lock);
        r = store(img);
        B->recording = r >= 0;
        pthread_mutex_unlock(&B->lock);
        return r;
}

void dc_bitmaps_record(dc_image *img, uint64_t off, uint64_t len) {
        struct dc_bitmap_set *B = img->bitmaps;

        if (!B || !len)
                return;
        pthread_mutex_lock(&B->lock);
        for (size_t i = 0; B->recording && i < B->n; i++) {
                struct qbm *q = &B->v[i];
                if (q->bits && !q->removed && (q->flags & QCOW2_BME_AUTO)) {
                        set_range(q->bits, q->bytes, q->gran, off, len);
                        q->changed = true;
                }
        }
        pthread_mutex_unlock(&B->lock);
}

/*
 * Before the disk grows to SIZE: every bitmap grows with it (the new part
 * clean, as QEMU grows them) and is in use until the close stores it.  An
 * inconsistent one stops the resize, as in QEMU.
 */
int dc_bitmaps_resize(dc_image *img, uint64_t size) {
        struct qcow2 *s = img->drv == &dc_qcow2_driver ? QC(img) : NULL;
        bool file = s && s->has_bitmaps && (s->autoclear & QCOW2_AUTOCLEAR_BITMAPS) && s->version >= 3;
        struct dc_bitmap_set *B;
        uint64_t grow = 0;
        size_t held = 0;
        int r;

        if (!file && !img->bitmaps)
                return 0;
        r = load(img);
        if (r < 0)
                return r;
        B = img->bitmaps;
        for (size_t i = 0; i < B->n; i++) {
                struct qbm *q = &B->v[i];
                if (q->removed)
                        continue;
                if (q->inconsistent)
                        return dc_error(ESTALE, "'%s': bitmap '%s' is inconsistent and stops the resize: remove it "
                                                "first", img->path, q->name);
                r = load_bits(img, B, q);
                if (r < 0)
                        return r;
                if (bytes_for(size, q->gran) > q->bytes)
                        grow += bytes_for(size, q->gran) - q->bytes;
        }
        if (grow > BITS_MAX_TOTAL - B->bits_total)
                return dc_error(EFBIG, "'%s': the bitmaps would need more than the %llu MiB diskchain keeps in memory "
                                       "for one image", img->path, (unsigned long long) (BITS_MAX_TOTAL >> 20));
        /* in use on disk until the close writes the grown tables: a crash cannot leave them too small */
        pthread_mutex_lock(&B->lock);
        for (size_t i = 0; i < B->n; i++) {
                B->v[i].held = !B->v[i].removed && !B->v[i].transient;
                held += B->v[i].held;
        }
        r = held ? store(img) : 0;
        B->recording |= r >= 0 && held;
        pthread_mutex_unlock(&B->lock);
        if (r < 0)
                return r;
        for (size_t i = 0; i < B->n; i++) {
                struct qbm *q = &B->v[i];
                uint64_t need = bytes_for(size, q->gran);
                uint8_t *bits;

                if (need <= q->bytes)
                        continue;
                pthread_mutex_lock(&B->lock);
                bits = realloc(q->bits, need);
                if (bits) {
                        memset(bits + q->bytes, 0, need - q->bytes);
                        B->bits_total += need - q->bytes;
                        q->bits = bits;
                        q->bytes = need;
                        q->changed = true;
                }
                pthread_mutex_unlock(&B->lock);
                if (!bits)
                        return dc_error(ENOMEM, "out of memory");
        }
        pthread_mutex_lock(&B->lock);
        B->vsize = size;
        pthread_mutex_unlock(&B->lock);
        return 0;
}

/*
 * A clean close: what was recorded (or grown) into the file's bitmaps is
 * stored, no longer in use; transient ones end here.
 */
void dc_bitmaps_close(dc_image *img) {
        struct dc_bitmap_set *B = img->bitmaps;
        bool file = false;

        if (!B)
                return;
        if (B->registered)
                unhold(img);
        for (size_t i = 0; i < B->n; i++)
                file |= !B->v[i].transient && (B->v[i].held || B->v[i].changed);
        if (file && B->recording && img->writable && img->drv == &dc_qcow2_driver) {
                pthread_mutex_lock(&B->lock);
                for (size_t i = 0; i < B->n; i++)
                        B->v[i].held = false;
                /* a failure leaves them in use: inconsistent, never wrong */
                (void) store(img);
                pthread_mutex_unlock(&B->lock);
        }
        bitmaps_free(B);
        img->bitmaps = NULL;
}

/* --- the library's interface ------------------------------------------------------------ */

/* IMG's bitmaps, locked: those kept with the image, or a fresh read of the file into *TMP. */
static int begin(dc_image *img, struct dc_bitmap_set **tmp, struct dc_bitmap_set **ret) {
        int r;

        *tmp = NULL;
        pthread_mutex_lock(&img->lock);
        if (img->bitmaps) {
                *ret = img->bitmaps;
                return 0;
        }
        r = load_into(img, tmp);
        if (r < 0) {
                pthread_mutex_unlock(&img->lock);
                return r;
        }
        *ret = *tmp;
        return 0;
}

static int end(dc_image *img, struct dc_bitmap_set *tmp, int r) {
        bitmaps_free(tmp);
        pthread_mutex_unlock(&img->lock);
        return r;
}

static int busy(dc_image *img, const struct qbm *q) {
        return dc_error(EBUSY, "'%s': bitmap '%s' is in use by a backup and cannot be changed until it ends",
                        img->path, q->name);
}

static int stale(dc_image *img, const struct qbm *q) {
        return dc_error(ESTALE, "'%s': bitmap '%s' is inconsistent (in use by a writer, or left in use by one that "
                                "stopped without saving it): it cannot say what changed, a full backup is needed; it "
                                "can only be removed", img->path, q->name);
}

/*
 * The transient bitmaps that other opens of IMG's file hold (a live
 * export's, say), appended to *V: a fresh open of the file lists what the
 * process's writers record into.
 */
static int others(dc_image *img, struct dc_bitmap_info **v, size_t *n) {
        struct stat st;
        int r = 0;

        if (fstat(img->fd, &st) < 0)
                return 0;
        pthread_mutex_lock(&holders_lock);
        for (struct holder *h = holders; h && r >= 0; h = h->next) {
                struct dc_bitmap_set *B = h->img->bitmaps;
                if (h->img == img || h->dev != st.st_dev || h->ino != st.st_ino || !B)
                        continue;
                pthread_mutex_lock(&B->lock);
                for (size_t i = 0; i < B->n && r >= 0; i++) {
                        struct qbm *q = &B->v[i];
                        struct dc_bitmap_info *x;
                        if (!q->transient || q->removed)
                                continue;
                        x = reallocarray(*v, *n + 1, sizeof *x);
                        if (!x) {
                                r = dc_error(ENOMEM, "out of memory");
                                break;
                        }
                        *v = x;
                        x = &x[*n];
                        *x = (struct dc_bitmap_info){ .name = strdup(q->name), .granularity = UINT32_C(1) << q->gran,
                                                      .enabled = q->flags & QCOW2_BME_AUTO, .busy = q->busy,
                                                      .transient = true };
                        if (!x->name) {
                                r = dc_error(ENOMEM, "out of memory");
                                break;
                        }
                        (*n)++;
                        (void) walk_bits(q->bits, q->bytes, q->gran, B->vsize, count_cb, &x->dirty);
                }
                pthread_mutex_unlock(&B->lock);
        }
        pthread_mutex_unlock(&holders_lock);
        return r;
}

DC_EXPORT int dc_image_bitmaps(dc_image *img, struct dc_bitmap_info **ret, size_t *ret_n) {
        struct dc_bitmap_set *B, *tmp;
        struct dc_bitmap_info *v = NULL;
        size_t n = 0;
        int r;

        *ret = NULL;
        *ret_n = 0;
        r = begin(img, &tmp, &B);
        if (r < 0)
                return r;
        v = calloc(MAX(B->n, 1u), sizeof *v);
        if (!v)
                return end(img, tmp, dc_error(ENOMEM, "out of memory"));
        for (size_t i = 0; i < B->n && r >= 0; i++) {
                struct qbm *q = &B->v[i];
                struct dc_bitmap_info *b = &v[n];
                if (q->removed)
                        continue;
                *b = (struct dc_bitmap_info){ .name = strdup(q->name), .granularity = UINT32_C(1) << q->gran,
                                              .in_use = q->inconsistent, .enabled = q->flags & QCOW2_BME_AUTO,
                                              .transient = q->transient };
                if (!b->name) {
                        r = dc_error(ENOMEM, "out of memory");
                        break;
                }
                n++;
                /* an inconsistent bitmap's data is whatever was stored last: its count means nothing */
                if (q->inconsistent)
                        continue;
                r = load_bits(img, B, q);
                if (r < 0)
                        break;
                pthread_mutex_lock(&B->lock);
                r = walk_bits(q->bits, q->bytes, q->gran, img->virtual_size, count_cb, &b->dirty);
                pthread_mutex_unlock(&B->lock);
        }
        r = end(img, tmp, r);
        if (r >= 0)
                r = others(img, &v, &n);
        if (r < 0) {
                dc_bitmap_info_free(v, n);
                return r;
        }
        *ret = v;
        *ret_n = n;
        return 0;
}

DC_EXPORT void dc_bitmap_info_free(struct dc_bitmap_info *v, size_t n) {
        for (size_t i = 0; i < n; i++)
                free(v[i].name);
        free(v);
}

/* NAME's bits to read, IMG locked: consistent, in memory (of the image's set, or a fresh read in *TMP). */
static int begin_read(dc_image *img, const char *name, struct dc_bitmap_set **tmp, struct dc_bitmap_set **ret,
                      struct qbm **ret_q) {
        int r;

        r = begin(img, tmp, ret);
        if (r < 0)
                return r;
        *ret_q = find(*ret, name);
        if (!*ret_q)
                return end(img, *tmp, dc_error(ENOENT, "'%s' has no bitmap named '%s'", img->path, name));
        if ((*ret_q)->inconsistent)
                return end(img, *tmp, stale(img, *ret_q));
        r = load_bits(img, *ret, *ret_q);
        return r < 0 ? end(img, *tmp, r) : 0;
}

DC_EXPORT int dc_image_bitmap_extents(dc_image *img, const char *name, dc_bitmap_extent_cb cb, void *userdata) {
        struct dc_bitmap_set *B, *tmp;
        struct qbm *q;
        int r = begin_read(img, name, &tmp, &B, &q);

        if (r < 0)
                return r;
        pthread_mutex_lock(&B->lock);
        r = walk_bits(q->bits, q->bytes, q->gran, img->virtual_size, cb, userdata);
        pthread_mutex_unlock(&B->lock);
        return end(img, tmp, r);
}

/* Why IMG cannot store persistent bitmaps (-ENOTSUP), or 0. */
static int no_persistent(dc_image *img) {
        if (img->drv != &dc_qcow2_driver)
                return dc_error(ENOTSUP, "'%s' is a %s image: only qcow2 images store persistent bitmaps", img->path,
                                img->drv->name);
        if (QC(img)->version < 3)
                return dc_error(ENOTSUP, "'%s': cannot store dirty bitmaps in qcow2 v2 (compat=0.10) files",
                                img->path);
        return 0;
}

/* For a change of the set: IMG writable, its bitmaps loaded and kept, locked. */
static int begin_change(dc_image *img, const char *name, struct dc_bitmap_set **ret, struct qbm **ret_q) {
        int r;

        if (!img->writable)
                return dc_error(EROFS, "'%s' is open read-only%s%s", img->path, img->read_only_reason ? ": " : "",
                                img->read_only_reason ? img->read_only_reason : "");
        pthread_mutex_lock(&img->lock);
        r = load(img);
        if (r < 0) {
                pthread_mutex_unlock(&img->lock);
                return r;
        }
        *ret = img->bitmaps;
        /* an image already being written (it had no enabled bitmap at its first write): a bitmap
         * enabled from now on records from now on, and is stored at the close */
        if (img->drv == &dc_qcow2_driver && QC(img)->prepared_for_write && !(*ret)->recording) {
                pthread_mutex_lock(&(*ret)->lock);
                (*ret)->recording = true;
                pthread_mutex_unlock(&(*ret)->lock);
        }
        if (ret_q) {
                *ret_q = find(*ret, name);
                if (!*ret_q) {
                        pthread_mutex_unlock(&img->lock);
                        return dc_error(ENOENT, "'%s' has no bitmap named '%s'", img->path, name);
                }
        }
        return 0;
}

/* ... and NAME usable: consistent, not held by a backup, its bits in memory. */
static int begin_bits(dc_image *img, const char *name, struct dc_bitmap_set **ret, struct qbm **ret_q) {
        int r = begin_change(img, name, ret, ret_q);

        if (r < 0)
                return r;
        if ((*ret_q)->inconsistent)
                return end(img, NULL, stale(img, *ret_q));
        if ((*ret_q)->busy)
                return end(img, NULL, busy(img, *ret_q));
        r = load_bits(img, *ret, *ret_q);
        return r < 0 ? end(img, NULL, r) : 0;
}

DC_EXPORT int dc_image_bitmap_set_enabled(dc_image *img, const char *name, bool enabled) {
        struct dc_bitmap_set *B;
        struct qbm *q;
        uint32_t flags;
        bool held;
        int r = begin_change(img, name, &B, &q);

        if (r < 0)
                return r;
        if (q->inconsistent)
                return end(img, NULL, stale(img, q));
        if (q->busy)
                return end(img, NULL, busy(img, q));
        if (!!(q->flags & QCOW2_BME_AUTO) == enabled)
                return end(img, NULL, 0);
        if (enabled && B->recording) {
                r = load_bits(img, B, q);
                if (r < 0)
                        return end(img, NULL, r);
        }
        flags = q->flags;
        held = q->held;
        pthread_mutex_lock(&B->lock);
        q->flags = enabled ? flags | QCOW2_BME_AUTO : flags & ~QCOW2_BME_AUTO;
        /* recorded from now on, or no longer: stored now, and in use while recorded */
        q->held = enabled && B->recording && !q->transient;
        r = save(img, q);
        if (r < 0) {
                q->flags = flags;
                q->held = held;
        }
        pthread_mutex_unlock(&B->lock);
        return end(img, NULL, r);
}

DC_EXPORT int dc_image_bitmap_add(dc_image *img, const char *name, uint32_t granularity, unsigned flags) {
        bool disabled = flags & DC_BITMAP_DISABLED, transient = flags & DC_BITMAP_TRANSIENT;
        struct dc_bitmap_set *B;
        struct qbm *v, *q;
        uint32_t cs;
        size_t len = strlen(name);
        uint64_t need;
        int r;

        if (!len)
                return dc_error(EINVAL, "Bitmap name cannot be empty");
        if (len > QCOW2_MAX_BITMAP_NAME)
                return dc_error(EINVAL, "bitmap name is %zu bytes long, over the %u bytes %s", len,
                                QCOW2_MAX_BITMAP_NAME, transient ? "QEMU takes" : "qcow2 stores");
        if (granularity && (granularity < 512 || (granularity & (granularity - 1))))
                return dc_error(EINVAL, "Granularity must be power of 2 and at least 512");
        if (granularity > (UINT32_C(1) << 31))
                return dc_error(EINVAL, "granularity %u is over 2 GiB, the largest qcow2 stores", granularity);
        if (!transient && (r = no_persistent(img)) < 0)
                return r;
        r = begin_change(img, name, &B, NULL);
        if (r < 0)
                return r;
        if (find(B, name))
                return end(img, NULL, dc_error(EEXIST, "Bitmap already exists: %s", name));
        /* QEMU's default: the cluster size, at least 4 KiB and at most 64 KiB; 64 KiB without clusters */
        cs = img->drv == &dc_qcow2_driver ? QC(img)->cluster_size : 65536;
        if (!granularity)
                granularity = MIN(MAX(cs, UINT32_C(4096)), UINT32_C(65536));
        pthread_mutex_lock(&B->lock);
        v = reallocarray(B->v, B->n + 1, sizeof *v);
        if (v)
                B->v = v;
        pthread_mutex_unlock(&B->lock);
        if (!v)
                return end(img, NULL, dc_error(ENOMEM, "out of memory"));
        q = &v[B->n];
        *q = (struct qbm){ .name = strdup(name), .name_size = (uint16_t) len, .gran = (uint8_t) __builtin_ctz(granularity),
                           .flags = disabled ? 0 : QCOW2_BME_AUTO, .changed = true, .transient = transient };
        need = bytes_for(img->virtual_size, q->gran);
        if (need > BITS_MAX_TOTAL - B->bits_total)
                r = dc_error(EFBIG, "'%s': the bitmaps would need more than the %llu MiB diskchain keeps in memory for "
                                    "one image", img->path, (unsigned long long) (BITS_MAX_TOTAL >> 20));
        else if (!q->name || !(q->bits = calloc(1, MAX(need, 1u))))
                r = dc_error(ENOMEM, "out of memory");
        if (r < 0) {
                qbm_done(q);
                return end(img, NULL, r);
        }
        q->bytes = need;
        if (transient)
                hold(img, B); /* (before the lock: the holders' list is taken before it) */
        pthread_mutex_lock(&B->lock);
        /* a transient one records every write of this open from now on, whatever the format */
        if (transient)
                B->recording = true;
        q->held = !disabled && B->recording && !transient;
        B->bits_total += need;
        B->n++;
        r = save(img, q);
        if (r < 0) {
                B->n--;
                B->bits_total -= need;
                qbm_done(q);
        }
        pthread_mutex_unlock(&B->lock);
        return end(img, NULL, r);
}

DC_EXPORT int dc_image_bitmap_remove(dc_image *img, const char *name) {
        struct dc_bitmap_set *B;
        struct qbm *q;
        int r = begin_change(img, name, &B, &q);

        if (r < 0)
                return r;
        if (q->busy)
                return end(img, NULL, busy(img, q));
        pthread_mutex_lock(&B->lock);
        q->removed = true;
        r = save(img, q);
        if (r < 0)
                q->removed = false;
        pthread_mutex_unlock(&B->lock);
        return end(img, NULL, r);
}

/* BITS becomes Q's content, stored; on failure Q is as it was.  The bits' lock is held. */
static int replace_bits(dc_image *img, struct qbm *q, uint8_t *bits) {
        uint8_t *was = q->bits;
        bool changed = q->changed;
        int r;

        q->bits = bits;
        q->changed = true;
        r = save(img, q);
        if (r < 0) {
                q->bits = was;
                q->changed = changed;
                was = bits;
        }
        free(was);
        return r;
}

DC_EXPORT int dc_image_bitmap_clear(dc_image *img, const char *name) {
        struct dc_bitmap_set *B;
        struct qbm *q;
        uint8_t *bits;
        int r = begin_bits(img, name, &B, &q);

        if (r < 0)
                return r;
        bits = calloc(1, MAX(q->bytes, 1u));
        if (!bits)
                return end(img, NULL, dc_error(ENOMEM, "out of memory"));
        pthread_mutex_lock(&B->lock);
        r = replace_bits(img, q, bits);
        pthread_mutex_unlock(&B->lock);
        return end(img, NULL, r);
}

struct merge {
        uint8_t *bits;
        uint64_t bytes;
        uint8_t gran;
};

static int merge_cb(void *userdata, uint64_t off, uint64_t len) {
        struct merge *m = userdata;
        set_range(m->bits, m->bytes, m->gran, off, len);
        return 0;
}

DC_EXPORT int dc_image_bitmap_merge(dc_image *img, const char *target, const char *const *sources, size_t n) {
        struct dc_bitmap_set *B;
        struct qbm *q;
        struct merge m;
        int r = begin_bits(img, target, &B, &q);

        if (r < 0)
                return r;
        for (size_t i = 0; r >= 0 && i < n; i++) {
                struct qbm *src = find(B, sources[i]);
                if (!src)
                        r = dc_error(ENOENT, "'%s' has no bitmap named '%s'", img->path, sources[i]);
                else if (src->inconsistent)
                        r = stale(img, src);
                else
                        r = load_bits(img, B, src);
        }
        if (r < 0)
                return end(img, NULL, r);
        /* the sources ORed into a copy: the target stays as it was on any failure */
        m = (struct merge){ .bits = malloc(MAX(q->bytes, 1u)), .bytes = q->bytes, .gran = q->gran };
        if (!m.bits)
                return end(img, NULL, dc_error(ENOMEM, "out of memory"));
        pthread_mutex_lock(&B->lock);
        memcpy(m.bits, q->bits, q->bytes);
        for (size_t i = 0; i < n; i++) {
                struct qbm *src = find(B, sources[i]);
                (void) walk_bits(src->bits, src->bytes, src->gran, img->virtual_size, merge_cb, &m);
        }
        r = replace_bits(img, q, m.bits);
        pthread_mutex_unlock(&B->lock);
        return end(img, NULL, r);
}

/* --- a backup's bitmap (QEMU's successor, for bitmap-mode on-success and always) ------------- */

/*
 * At the backup's point in time (the disk quiesced): NAME is reset and
 * records only writes from now on, while the backup holds it (busy, and in
 * use on disk, so that a crash before the end leaves it inconsistent
 * rather than missing what the unfinished backup did not copy).  *RET gets
 * the bits it held, for dc_image_bitmap_backup_end.
 */
int dc_image_bitmap_backup_begin(dc_image *img, const char *name, uint8_t **ret, uint64_t *ret_bytes) {
        struct dc_bitmap_set *B;
        struct qbm *q;
        uint8_t *bits, *was;
        int r = begin_bits(img, name, &B, &q);

        if (r < 0)
                return r;
        bits = calloc(1, MAX(q->bytes, 1u));
        if (!bits)
                return end(img, NULL, dc_error(ENOMEM, "out of memory"));
        pthread_mutex_lock(&B->lock);
        was = q->bits;
        q->bits = bits;
        q->changed = true;
        q->busy = true;
        r = save(img, q);
        if (r < 0) {
                q->bits = was;
                q->busy = false;
                was = bits;
        } else {
                *ret = was;
                *ret_bytes = q->bytes;
                was = NULL;
        }
        pthread_mutex_unlock(&B->lock);
        free(was);
        return end(img, NULL, r);
}

/*
 * The backup ended: NAME keeps what it recorded since the start, plus the
 * SAVED bits (its content at the start: a failed backup with on-success)
 * and the N (offset, length) RANGES (what a failed backup with always did
 * not copy); then it is stored, no longer busy.  SAVED is freed.
 */
int dc_image_bitmap_backup_end(dc_image *img, const char *name, uint8_t *saved, uint64_t saved_bytes,
                               const uint64_t *ranges, size_t n) {
        struct dc_bitmap_set *B;
        struct qbm *q;
        int r = begin_change(img, name, &B, &q);

        if (r < 0) {
                free(saved);
                return r;
        }
        pthread_mutex_lock(&B->lock);
        for (uint64_t i = 0; saved && i < MIN(saved_bytes, q->bytes); i++)
                q->bits[i] |= saved[i];
        for (size_t i = 0; i < n; i++)
                set_range(q->bits, q->bytes, q->gran, ranges[2 * i], ranges[2 * i + 1]);
        q->changed = true;
        q->busy = false;
        /* a failure leaves it in use on disk: inconsistent, never missing a change */
        r = save(img, q);
        pthread_mutex_unlock(&B->lock);
        free(saved);
        return end(img, NULL, r);
}

/* --- a frozen copy, for an export's qemu:dirty-bitmap context ------------------------------- */

struct dc_bitmap_copy {
        uint8_t *bits;
        uint64_t bytes, size;
        uint8_t gran;
};

DC_EXPORT int dc_image_bitmap_copy(dc_image *img, const char *name, dc_bitmap_copy **ret) {
        struct dc_bitmap_set *B, *tmp;
        dc_bitmap_copy *c;
        struct qbm *q;
        int r = begin_read(img, name, &tmp, &B, &q);

        if (r < 0)
                return r;
        c = calloc(1, sizeof *c);
        if (c)
                c->bits = malloc(MAX(q->bytes, 1u));
        if (!c || !c->bits) {
                free(c);
                return end(img, tmp, dc_error(ENOMEM, "out of memory"));
        }
        pthread_mutex_lock(&B->lock);
        memcpy(c->bits, q->bits, q->bytes);
        c->bytes = q->bytes;
        pthread_mutex_unlock(&B->lock);
        c->gran = q->gran;
        c->size = img->virtual_size;
        *ret = c;
        return end(img, tmp, 0);
}

DC_EXPORT dc_bitmap_copy *dc_bitmap_copy_free(dc_bitmap_copy *c) {
        if (c)
                free(c->bits);
        free(c);
        return NULL;
}

static bool copy_bit(const dc_bitmap_copy *c, uint64_t k) {
        return k / 8 < c->bytes && (c->bits[k / 8] >> (k % 8) & 1);
}

DC_EXPORT uint64_t dc_bitmap_copy_run(const dc_bitmap_copy *c, uint64_t off, uint64_t max, bool *ret_dirty) {
        uint64_t k = off >> c->gran, end, next;
        bool v;

        if (off >= c->size || !max)
                return 0;
        end = MIN(c->size, off + MIN(max, c->size - off));
        v = copy_bit(c, k);
        next = (k + 1) << c->gran;
        /* whole bytes of equal bits at a time */
        while (next < end) {
                k = next >> c->gran;
                if (k % 8 == 0 && k / 8 < c->bytes && c->bits[k / 8] == (v ? 0xff : 0)) {
                        next += UINT64_C(8) << c->gran;
                        continue;
                }
                if (copy_bit(c, k) != v)
                        break;
                next += UINT64_C(1) << c->gran;
        }
        *ret_dirty = v;
        return MIN(next, end) - off;
}

/* --- a commit: base takes the place of the layers above it --------------------------------- */

struct taken {                  /* one bitmap of a committed layer */
        char *name;
        uint8_t gran;
        bool enabled, inconsistent, transient;
        bool first;             /* the top-most layer's of its name: its granularity, recording and kind win */
        uint8_t *bits;          /* a copy (NULL when inconsistent) */
        uint64_t bytes, vsize;
};

static void taken_free(struct taken *t, size_t n) {
        for (size_t i = 0; i < n; i++) {
                free(t[i].name);
                free(t[i].bits);
        }
        free(t);
}

/* LAYER's bitmaps, their bits copied, appended to *T. */
static int take_layer(dc_image *layer, struct taken **t, size_t *n) {
        struct dc_bitmap_set *B, *tmp;
        int r;

        r = begin(layer, &tmp, &B);
        if (r < 0)
                return r;
        for (size_t i = 0; r >= 0 && i < B->n; i++) {
                struct qbm *q = &B->v[i];
                struct taken *v, *e;

                if (q->removed)
                        continue;
                if (q->busy) {
                        r = busy(layer, q);
                        break;
                }
                if (!q->inconsistent && (r = load_bits(layer, B, q)) < 0)
                        break;
                v = reallocarray(*t, *n + 1, sizeof *v);
                if (!v) {
                        r = dc_error(ENOMEM, "out of memory");
                        break;
                }
                *t = v;
                e = &v[*n];
                *e = (struct taken){ .name = strdup(q->name), .gran = q->gran, .enabled = q->flags & QCOW2_BME_AUTO,
                                     .inconsistent = q->inconsistent, .transient = q->transient, .first = true,
                                     .vsize = layer->virtual_size };
                if (e->name && !q->inconsistent && (e->bits = malloc(MAX(q->bytes, 1u)))) {
                        pthread_mutex_lock(&B->lock);
                        memcpy(e->bits, q->bits, q->bytes);
                        e->bytes = q->bytes;
                        pthread_mutex_unlock(&B->lock);
                }
                if (!e->name || (!q->inconsistent && !e->bits)) {
                        free(e->name);
                        free(e->bits);
                        r = dc_error(ENOMEM, "out of memory");
                        break;
                }
                for (size_t k = 0; k < *n; k++)
                        e->first &= strcmp(v[k].name, e->name) != 0;
                (*n)++;
        }
        return end(layer, tmp, r);
}

/* The bits of every consistent bitmap named NAME in T, ORed into BITS (BYTES, granularity GRAN). */
static void take_bits(const struct taken *t, size_t n, const char *name, uint8_t *bits, uint64_t bytes, uint8_t gran) {
        struct merge m = { .bits = bits, .bytes = bytes, .gran = gran };

        for (size_t i = 0; i < n; i++)
                if (t[i].bits && strcmp(t[i].name, name) == 0)
                        (void) walk_bits(t[i].bits, t[i].bytes, t[i].gran, t[i].vsize, merge_cb, &m);
}

struct undo {
        size_t i;               /* B->v[i] */
        uint8_t *bits;
        uint32_t flags;
        bool inconsistent, held, changed;
};

DC_EXPORT int dc_image_bitmaps_commit(dc_image *base, dc_image *const *layers, size_t n_layers) {
        struct dc_bitmap_set *B;
        struct taken *t = NULL;
        struct undo *u = NULL;
        size_t n = 0, nu = 0, n0, adds = 0;
        int r = 0;

        bool file = false, transient = false;

        for (size_t l = 0; r >= 0 && l < n_layers; l++)
                r = take_layer(layers[l], &t, &n);
        if (r < 0 || !n) {
                taken_free(t, n);
                return r;
        }
        r = begin_change(base, NULL, &B, NULL);
        if (r < 0) {
                taken_free(t, n);
                return r;
        }
        for (size_t i = 0; i < n; i++)
                adds += t[i].first && !find(B, t[i].name);
        u = calloc(n + 1, sizeof *u);
        pthread_mutex_lock(&B->lock);
        if (u && adds) {
                struct qbm *v = reallocarray(B->v, B->n + adds, sizeof *v);
                if (v)
                        B->v = v;
                else
                        r = dc_error(ENOMEM, "out of memory");
        } else if (!u)
                r = dc_error(ENOMEM, "out of memory");
        pthread_mutex_unlock(&B->lock);
        n0 = B->n;

        for (size_t i = 0; r >= 0 && i < n; i++) {
                struct qbm *q = find(B, t[i].name);
                bool bad = false;
                uint64_t need;
                uint8_t *bits;

                if (!t[i].first)
                        continue;
                for (size_t k = i; k < n; k++)
                        bad |= t[k].inconsistent && strcmp(t[k].name, t[i].name) == 0;
                if (q && q->busy) {
                        r = busy(base, q);
                        break;
                }
                if (q && q->inconsistent)
                        continue; /* stays good only for removal */
                /* a raw or v2 base cannot keep persistent bitmaps: they stay in the layers' files only */
                if (!q && !t[i].transient && !persistent_ok(base))
                        continue;
                if (bad) {
                        /* what the layer's bitmap missed is missing from the whole name: base's is
                         * no longer to be trusted either (a base without one just has none) */
                        if (q) {
                                u[nu++] = (struct undo){ .i = (size_t) (q - B->v), .flags = q->flags,
                                                         .inconsistent = false, .held = q->held, .changed = q->changed };
                                file |= !q->transient;
                                pthread_mutex_lock(&B->lock);
                                q->inconsistent = true;
                                q->held = false;
                                q->changed = true; /* a table of the disk's size, whatever it says */
                                pthread_mutex_unlock(&B->lock);
                        }
                        continue;
                }
                if (q) {
                        r = load_bits(base, B, q);
                        if (r < 0)
                                break;
                        bits = malloc(MAX(q->bytes, 1u));
                        if (!bits) {
                                r = dc_error(ENOMEM, "out of memory");
                                break;
                        }
                        pthread_mutex_lock(&B->lock);
                        memcpy(bits, q->bits, q->bytes);
                        take_bits(t, n, t[i].name, bits, q->bytes, q->gran);
                        u[nu++] = (struct undo){ .i = (size_t) (q - B->v), .bits = q->bits, .flags = q->flags,
                                                 .held = q->held, .changed = q->changed };
                        file |= !q->transient;
                        q->bits = bits;
                        q->changed = true;
                        /* base takes the top-most layer's place: and its recording, too */
                        q->flags = t[i].enabled ? q->flags | QCOW2_BME_AUTO : q->flags & ~QCOW2_BME_AUTO;
                        q->held = t[i].enabled && B->recording && !q->transient;
                        pthread_mutex_unlock(&B->lock);
                        continue;
                }
                need = bytes_for(base->virtual_size, t[i].gran);
                if (need > BITS_MAX_TOTAL - B->bits_total) {
                        r = dc_error(EFBIG, "'%s': the bitmaps would need more than the %llu MiB diskchain keeps in "
                                            "memory for one image", base->path,
                                     (unsigned long long) (BITS_MAX_TOTAL >> 20));
                        break;
                }
                pthread_mutex_lock(&B->lock);
                q = &B->v[B->n];
                *q = (struct qbm){ .name = strdup(t[i].name), .name_size = (uint16_t) strlen(t[i].name),
                                   .gran = t[i].gran, .flags = t[i].enabled ? QCOW2_BME_AUTO : 0, .changed = true,
                                   .transient = t[i].transient, .bits = calloc(1, MAX(need, 1u)), .bytes = need };
                if (q->name && q->bits) {
                        take_bits(t, n, t[i].name, q->bits, q->bytes, q->gran);
                        B->bits_total += need;
                        B->n++;
                        /* a transient one: base records from now on, as the layer did */
                        B->recording |= q->transient;
                        q->held = t[i].enabled && B->recording && !q->transient;
                        file |= !q->transient;
                        transient |= q->transient;
                } else {
                        qbm_done(q);
                        r = dc_error(ENOMEM, "out of memory");
                }
                pthread_mutex_unlock(&B->lock);
        }
        pthread_mutex_lock(&B->lock);
        if (r >= 0 && file)
                r = store(base);
        if (r < 0) {
                /* as it was: the new ones gone, the old ones back */
                for (size_t i = n0; i < B->n; i++) {
                        B->bits_total -= B->v[i].bytes;
                        qbm_done(&B->v[i]);
                }
                B->n = n0;
                for (size_t k = 0; k < nu; k++) {
                        struct qbm *q = &B->v[u[k].i];
                        if (u[k].bits) {
                                free(q->bits);
                                q->bits = u[k].bits;
                        }
                        q->flags = u[k].flags;
                        q->inconsistent = u[k].inconsistent;
                        q->held = u[k].held;
                        q->changed = u[k].changed;
                }
        } else
                for (size_t k = 0; k < nu; k++)
                        free(u[k].bits);
        pthread_mutex_unlock(&B->lock);
        if (r >= 0 && transient)
                hold(base, B);
        free(u);
        taken_free(t, n);
        return end(base, NULL, r);
}
