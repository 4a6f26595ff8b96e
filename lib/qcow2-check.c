/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * qcow2 consistency check and repair, counted as `qemu-img check` counts.
 *
 * Design notes
 * ------------
 * One pass builds an in-memory table of references per host cluster by
 * walking everything that owns clusters: the header, the active L1 and its
 * L2 tables and data (compressed data counts once per overlapped host
 * cluster and entry), the snapshot table and each snapshot's tables, the
 * refcount table and refblocks, the bitmap directory, tables and data, and
 * the encryption header.  Then every stored refcount is compared with it:
 * fewer than referenced is a corruption, more is a leak.  Last, COPIED flags
 * of the active tables are compared with the (possibly repaired) refcounts.
 *
 * Repair raises or lowers refcounts to the reference count (leaks only, or
 * all) and fixes COPIED flags, then a second pass reports what is left, as
 * qemu-img does.  Raising a refcount may create a refblock, which is why the
 * second pass is needed rather than trusting the first.
 */

#include <sys/stat.h>

#include "qcow2.h"

struct check {
        dc_image *img;
        struct qcow2 *s;
        uint32_t *refs;
        uint64_t nb;   /* clusters in the file */
        struct dc_check_result res;
        uint64_t next_contiguous;
};

static void inc_range(struct check *c, uint64_t off, uint64_t len) {
        uint64_t cs = c->s->cluster_size;

        if (len == 0)
                return;
        for (uint64_t i = off / cs; i <= (off + len - 1) / cs; i++) {
                if (i >= c->nb) {
                        /* A reference one cluster or more past the end. */
                        c->res.corruptions++;
                        return;
                }
                if (c->refs[i] < UINT32_MAX)
                        c->refs[i]++;
        }
}

static int read_table(struct check *c, uint64_t off, uint64_t len, uint8_t **ret) {
        uint8_t *b = malloc(MAX(len, 1u));
        if (!b)
                return -ENOMEM;
        if (dc_pread_full(c->img->fd, b, len, off) < 0) {
                free(b);
                c->res.check_errors++;
                return -EIO;
        }
        *ret = b;
        return 0;
}

static void walk_l2(struct check *c, uint64_t l2off, bool active) {
        struct qcow2 *s = c->s;
        _cleanup_free_ uint8_t *t = NULL;

        if (read_table(c, l2off, s->cluster_size, &t) < 0)
                return;
        for (uint64_t i = 0; i < s->l2_entries; i++) {
                uint64_t e = be64(t + i * 8), off, len;
                int type = qcow2_cluster_type(s, e);

                switch (type) {
                case QC_COMPRESSED:
                        if (e & QCOW_OFLAG_COPIED)
                                c->res.corruptions++;
                        qcow2_compressed_range(s, e, &off, &len);
                        inc_range(c, off, len);
                        if (active) {
                                c->res.allocated_clusters++;
                                c->res.compressed_clusters++;
                                c->res.fragmented_clusters++;
                        }
                        break;
                case QC_NORMAL:
                case QC_ZERO_ALLOC:
                        if (e & (L2E_RESERVED_MASK | (s->version < 3 ? QCOW_OFLAG_ZERO : 0))) {
                                c->res.corruptions++;
                                break;
                        }
                        off = e & L2E_OFFSET_MASK;
                        if (off & (s->cluster_size - 1)) {
                                c->res.corruptions++;
                                break;
                        }
                        inc_range(c, off, s->cluster_size);
                        if (active) {
                                c->res.allocated_clusters++;
                                if (c->next_contiguous && off != c->next_contiguous)
                                        c->res.fragmented_clusters++;
                                c->next_contiguous = off + s->cluster_size;
                        }
                        break;
                default:
                        if (e & L2E_RESERVED_MASK)
                                c->res.corruptions++;
                        break;
                }
        }
}

static void walk_l1(struct check *c, uint64_t l1off, uint64_t l1_size, bool active) {
        struct qcow2 *s = c->s;
        _cleanup_free_ uint8_t *t = NULL;

        if (l1_size == 0)
                return;
        if (l1off & (s->cluster_size - 1)) {
                c->res.corruptions++;
                return;
        }
        inc_range(c, l1off, l1_size * 8);
        if (read_table(c, l1off, l1_size * 8, &t) < 0)
                return;
        for (uint64_t i = 0; i < l1_size; i++) {
                uint64_t e = be64(t + i * 8), l2 = e & L1E_OFFSET_MASK;

                if (e & L1E_RESERVED_MASK) {
                        c->res.corruptions++;
                        continue;
                }
                if (!l2)
                        continue;
                if (l2 & (s->cluster_size - 1)) {
                        c->res.corruptions++;
                        continue;
                }
                inc_range(c, l2, s->cluster_size);
                if (l2 / s->cluster_size < c->nb)
                        walk_l2(c, l2, active);
        }
}

static void walk_snapshots(struct check *c) {
        struct qcow2 *s = c->s;
        uint64_t p = s->snapshots_offset;

        for (uint32_t i = 0; i < s->nb_snapshots; i++) {
                uint8_t h[40];
                uint64_t l1off;
                uint32_t l1_size, extra;
                uint16_t id_len, name_len;

                if (p / s->cluster_size >= c->nb) {
                        c->res.corruptions++; /* the table runs past the end of the file */
                        return;
                }
                if (dc_pread_full(c->img->fd, h, sizeof h, p) < 0) {
                        c->res.check_errors++;
                        return;
                }
                l1off = be64(h);
                l1_size = be32(h + 8);
                id_len = be16(h + 12);
                name_len = be16(h + 14);
                extra = be32(h + 36);
                if ((uint64_t) l1_size * 8 > QCOW2_MAX_L1_BYTES || (l1off & (s->cluster_size - 1))) {
                        c->res.corruptions++;
                } else
                        walk_l1(c, l1off, l1_size, false);
                p += ALIGN_UP(40 + (uint64_t) extra + id_len + name_len, 8);
        }
        if (s->nb_snapshots)
                inc_range(c, s->snapshots_offset, p - s->snapshots_offset);
}

static void walk_bitmaps(struct check *c) {
        struct qcow2 *s = c->s;
        _cleanup_free_ uint8_t *dir = NULL;
        uint64_t p = 0;

        if (!s->has_bitmaps)
                return;
        inc_range(c, s->bitmap_dir_offset, s->bitmap_dir_size);
        if (read_table(c, s->bitmap_dir_offset, s->bitmap_dir_size, &dir) < 0)
                return;
        for (uint32_t i = 0; i < s->nb_bitmaps && p + 24 <= s->bitmap_dir_size; i++) {
                uint64_t toff = be64(dir + p);
                uint32_t tsize = be32(dir + p + 8);
                uint16_t name_size = be16(dir + p + 18);
                uint32_t extra = be32(dir + p + 20);
                _cleanup_free_ uint8_t *t = NULL;

                if (tsize && !(toff & (s->cluster_size - 1)) && tsize <= 0x8000000) {
                        inc_range(c, toff, (uint64_t) tsize * 8);
                        if (read_table(c, toff, (uint64_t) tsize * 8, &t) == 0)
                                for (uint32_t j = 0; j < tsize; j++) {
                                        uint64_t d = be64(t + j * 8) & 0x00fffffffffffe00ull;
                                        if (d)
                                                inc_range(c, d, s->cluster_size);
                                }
                } else
                        c->res.corruptions++;
                p += ALIGN_UP(24 + (uint64_t) extra + name_size, 8);
        }
}

static void walk_reftable(struct check *c) {
        struct qcow2 *s = c->s;

        inc_range(c, s->rt_offset, (uint64_t) s->rt_clusters * s->cluster_size);
        for (uint64_t i = 0; i < s->rt_entries; i++) {
                uint64_t e = s->rt[i], off = e & REFT_OFFSET_MASK;
                if (e & REFT_RESERVED_MASK) {
                        c->res.corruptions++;
                        continue;
                }
                if (!off)
                        continue;
                if (off & (s->cluster_size - 1) || off / s->cluster_size >= c->nb) {
                        c->res.corruptions++;
                        continue;
                }
                inc_range(c, off, s->cluster_size);
        }
}

static int fix_copied(struct check *c, int repair) {
        struct qcow2 *s = c->s;
        dc_image *img = c->img;
        int r;

        for (uint64_t i = 0; i < s->l1_size; i++) {
                uint64_t e = s->l1[i], l2 = e & L1E_OFFSET_MASK, rc;
                _cleanup_free_ uint8_t *t = NULL;
                bool dirty = false;

                if (!l2 || (e & L1E_RESERVED_MASK) || (l2 & (s->cluster_size - 1)) || l2 / s->cluster_size >= c->nb)
                        continue;
                if (qcow2_refcount_get(img, l2 / s->cluster_size, &rc) < 0) {
                        c->res.check_errors++;
                        continue;
                }
                if ((rc == 1) != !!(e & QCOW_OFLAG_COPIED)) {
                        c->res.corruptions++;
                        if (repair == DC_REPAIR_ALL) {
                                uint8_t w[8];
                                s->l1[i] = rc == 1 ? e | QCOW_OFLAG_COPIED : e & ~QCOW_OFLAG_COPIED;
                                put_be64(w, s->l1[i]);
                                r = dc_pwrite_full(img->fd, w, 8, s->l1_offset + i * 8);
                                if (r < 0)
                                        return r;
                                c->res.corruptions_fixed++;
                        }
                }
                if (read_table(c, l2, s->cluster_size, &t) < 0)
                        continue;
                for (uint64_t j = 0; j < s->l2_entries; j++) {
                        uint64_t le = be64(t + j * 8), d = le & L2E_OFFSET_MASK;
                        int type = qcow2_cluster_type(s, le);
                        if ((type != QC_NORMAL && type != QC_ZERO_ALLOC) || (le & L2E_RESERVED_MASK) ||
                            (d & (s->cluster_size - 1)) || d / s->cluster_size >= c->nb)
                                continue;
                        if (qcow2_refcount_get(img, d / s->cluster_size, &rc) < 0) {
                                c->res.check_errors++;
                                continue;
                        }
                        if ((rc == 1) != !!(le & QCOW_OFLAG_COPIED)) {
                                c->res.corruptions++;
                                if (repair == DC_REPAIR_ALL) {
                                        le = rc == 1 ? le | QCOW_OFLAG_COPIED : le & ~QCOW_OFLAG_COPIED;
                                        put_be64(t + j * 8, le);
                                        dirty = true;
                                        c->res.corruptions_fixed++;
                                }
                        }
                }
                if (dirty) {
                        qcow2_cache_drop(&s->l2_cache, l2);
                        r = dc_pwrite_full(img->fd, t, s->cluster_size, l2);
                        if (r < 0)
                                return r;
                }
        }
        return 0;
}

static int check_pass(dc_image *img, int repair, struct dc_check_result *ret) {
        struct qcow2 *s = QC(img);
        struct check c = { .img = img, .s = s };
        uint64_t highest = 0;
        bool any = false;
        struct stat st;
        int r;

        if (fstat(img->fd, &st) < 0)
                return dc_error(errno, "'%s': cannot stat: %m", img->path);
        c.nb = DIV_ROUND_UP((uint64_t) st.st_size, s->cluster_size);
        c.refs = calloc(MAX(c.nb, 1u), sizeof(uint32_t));
        if (!c.refs)
                return dc_error(ENOMEM, "'%s': out of memory for %llu clusters", img->path,
                                (unsigned long long) c.nb);

        inc_range(&c, 0, s->cluster_size);
        walk_l1(&c, s->l1_offset, s->l1_size, true);
        walk_snapshots(&c);
        walk_reftable(&c);
        walk_bitmaps(&c);
        if (s->fde_length)
                inc_range(&c, s->fde_offset, s->fde_length);

        for (uint64_t i = 0; i < c.nb; i++) {
                uint64_t rc;
                if (qcow2_refcount_get(img, i, &rc) < 0) {
                        c.res.check_errors++;
                        continue;
                }
                if (rc || c.refs[i]) {
                        highest = i;
                        any = true;
                }
                if (rc == c.refs[i])
                        continue;
                if (rc < c.refs[i]) {
                        c.res.corruptions++;
                        if (repair == DC_REPAIR_ALL) {
                                r = qcow2_refcount_set(img, i, c.refs[i]);
                                if (r < 0)
                                        goto fail;
                                c.res.corruptions_fixed++;
                        }
                } else {
                        c.res.leaks++;
                        if (repair != DC_REPAIR_NONE) {
                                r = qcow2_refcount_set(img, i, c.refs[i]);
                                if (r < 0)
                                        goto fail;
                                c.res.leaks_fixed++;
                        }
                }
        }
        r = fix_copied(&c, repair);
        if (r < 0)
                goto fail;
        if (repair != DC_REPAIR_NONE && (c.res.corruptions_fixed || c.res.leaks_fixed)) {
                r = dc_fdatasync(img->fd);
                if (r < 0)
                        goto fail;
        }
        c.res.image_end_offset = any ? (highest + 1) * s->cluster_size : 0;
        c.res.total_clusters = DIV_ROUND_UP(img->virtual_size, s->cluster_size);
        free(c.refs);
        *ret = c.res;
        return 0;
fail:
        free(c.refs);
        return dc_error(r, "'%s': repair failed: %s", img->path, dc_get_error()[0] ? dc_get_error() : strerror(-r));
}

int qcow2_check(dc_image *img, int repair, struct dc_check_result *ret) {
        struct dc_check_result first, second;
        int r;

        if (repair != DC_REPAIR_NONE && !img->writable)
                return dc_error(EROFS, "'%s': repair needs the image open read-write", img->path);
        r = qcow2_l2_commit_pending(img); /* the check reads tables from the file */
        if (r < 0)
                return r;
        r = check_pass(img, repair, &first);
        if (r < 0)
                return r;
        if (repair == DC_REPAIR_NONE || (!first.corruptions_fixed && !first.leaks_fixed)) {
                *ret = first;
                return 0;
        }
        r = check_pass(img, DC_REPAIR_NONE, &second);
        if (r < 0)
                return r;
        second.corruptions_fixed = first.corruptions_fixed;
        second.leaks_fixed = first.leaks_fixed;
        *ret = second;
        return 0;
}
