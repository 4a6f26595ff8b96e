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
 * The image may be hostile, so the walk is bounded by the file: a table
 * that reaches past the end is a corruption and is not read, and a table
 * met again (snapshots share L1 and L2 tables with the active one, and a
 * crafted image may point every L1 entry at one table) is walked once and
 * counted as often as it is referenced, which gives the same counts as
 * walking it each time.  The work is thus bounded by the size of the file.
 *
 * Repair raises or lowers refcounts to the reference count (leaks only, or
 * all) and fixes COPIED flags, then a second pass reports what is left, as
 * qemu-img does.  Raising a refcount may create a refblock, which is why the
 * second pass is needed rather than trusting the first.  Repair needs a
 * sound refcount structure: every refblock referenced once and only by the
 * table, and room for any refblock it must create (a new refblock goes at
 * the start of the range it covers, see qcow2-refcount.c).  QEMU rebuilds
 * a broken structure from scratch; we do not, and leave such an image
 * alone rather than write refcounts into clusters that hold something else.
 */

#include <sys/stat.h>

#include "qcow2.h"

struct check {
        dc_image *img;
        struct qcow2 *s;
        uint32_t *refs;
        uint32_t *l2_more; /* per cluster: references to it as an L2 table not yet walked */
        uint64_t nb;       /* clusters in the file */
        uint64_t fsize;
        struct dc_check_result res;
        uint64_t next_contiguous;
};

static uint32_t sat_add(uint32_t a, uint64_t b) {
        return a + b >= UINT32_MAX ? UINT32_MAX : (uint32_t) (a + b);
}

/* Count MULT references to the clusters of [off, off+len). */
static void inc_range(struct check *c, uint64_t off, uint64_t len, uint64_t mult) {
        uint64_t cs = c->s->cluster_size;

        if (len == 0)
                return;
        if (off >= QCOW2_MAX_HOST_OFFSET || len > QCOW2_MAX_HOST_OFFSET - off) {
                c->res.corruptions += mult;
                return;
        }
        for (uint64_t i = off / cs; i <= (off + len - 1) / cs; i++) {
                if (i >= c->nb) {
                        /* A reference one cluster or more past the end. */
                        c->res.corruptions += mult;
                        return;
                }
                c->refs[i] = sat_add(c->refs[i], mult);
        }
}

/* Read a table of LEN bytes at OFF, which must lie inside the file. */
static int read_table(struct check *c, uint64_t off, uint64_t len, uint8_t **ret) {
        uint8_t *b;

        if (off > c->fsize || len > c->fsize - off)
                return -EUCLEAN; /* counted by inc_range() as past the end */
        b = malloc(MAX(len, 1u));
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

/* The L2 table at L2OFF, referenced MULT times; ACTIVE: from the active L1
 * (walked in order, once, for the allocation statistics).  With extended L2
 * entries the bitmaps are judged as QEMU's check_refcounts_l2 judges them;
 * with a data file, data clusters are not in this file and not counted. */
static void walk_l2(struct check *c, uint64_t l2off, bool active, uint64_t mult) {
        struct qcow2 *s = c->s;
        _cleanup_free_ uint8_t *t = NULL;

        if (read_table(c, l2off, s->cluster_size, &t) < 0)
                return;
        for (uint64_t i = 0; i < s->l2_entries; i++) {
                uint64_t e = qcow2_l2_get(s, t, i), bm = qcow2_l2_bitmap(s, t, i), off, len;
                int type = qcow2_cluster_type(s, e);

                switch (type) {
                case QC_COMPRESSED:
                        if (e & QCOW_OFLAG_COPIED)
                                c->res.corruptions += mult;
                        if (s->has_data_file || bm) {
                                /* not allowed: counted, and its data is not */
                                c->res.corruptions += mult;
                                break;
                        }
                        qcow2_compressed_range(s, e, &off, &len);
                        inc_range(c, off, len, mult);
                        if (active) {
                                c->res.allocated_clusters++;
                                c->res.compressed_clusters++;
                                c->res.fragmented_clusters++;
                        }
                        break;
                case QC_NORMAL:
                case QC_ZERO_ALLOC:
                        if (s->extl2 && ((bm >> 32) & bm))
                                c->res.corruptions += mult; /* corrupted subcluster allocation bitmap */
                        if (e & (L2E_RESERVED_MASK | (s->version < 3 ? QCOW_OFLAG_ZERO : 0))) {
                                c->res.corruptions += mult;
                                break;
                        }
                        off = e & L2E_OFFSET_MASK;
                        if (off & (s->cluster_size - 1)) {
                                c->res.corruptions += mult;
                                break;
                        }
                        if (!s->has_data_file)
                                inc_range(c, off, s->cluster_size, mult);
                        if (active) {
                                c->res.allocated_clusters++;
                                if (c->next_contiguous && off != c->next_contiguous)
                                        c->res.fragmented_clusters++;
                                c->next_contiguous = off + s->cluster_size;
                        }
                        break;
                default:
                        if (e & L2E_RESERVED_MASK)
                                c->res.corruptions += mult;
                        if (s->extl2 && (bm & QCOW2_BM_ALL_ALLOC))
                                c->res.corruptions += mult; /* unallocated cluster with allocation bits */
                        break;
                }
        }
}

/* An L1 table referenced MULT times.  The active one walks its L2 tables at
 * once (the first time each is met); the others only note them in l2_more. */
static void walk_l1(struct check *c, uint64_t l1off, uint64_t l1_size, bool active, uint64_t mult) {
        struct qcow2 *s = c->s;
        _cleanup_free_ uint8_t *t = NULL;

        if (l1_size == 0)
                return;
        if (l1off & (s->cluster_size - 1)) {
                c->res.corruptions += mult;
                return;
        }
        inc_range(c, l1off, l1_size * 8, mult);
        if (read_table(c, l1off, l1_size * 8, &t) < 0)
                return;
        for (uint64_t i = 0; i < l1_size; i++) {
                uint64_t e = be64(t + i * 8), l2 = e & L1E_OFFSET_MASK, k;

                if (e & L1E_RESERVED_MASK) {
                        c->res.corruptions += mult;
                        continue;
                }
                if (!l2)
                        continue;
                if (l2 & (s->cluster_size - 1)) {
                        c->res.corruptions += mult;
                        continue;
                }
                inc_range(c, l2, s->cluster_size, mult);
                k = l2 / s->cluster_size;
                if (k >= c->nb)
                        continue;
                if (active && c->refs[k] == 1 && !c->l2_more[k])
                        walk_l2(c, l2, true, 1);
                else
                        c->l2_more[k] = sat_add(c->l2_more[k], mult);
        }
}

static int cmp_pair(const void *a, const void *b) {
        const uint64_t *x = a, *y = b;
        if (x[0] != y[0])
                return x[0] < y[0] ? -1 : 1;
        return x[1] < y[1] ? -1 : x[1] > y[1];
}

static void walk_snapshots(struct check *c) {
        struct qcow2 *s = c->s;
        uint64_t p = s->snapshots_offset, n = 0;
        _cleanup_free_ uint64_t *l1s = NULL;

        if (!s->nb_snapshots)
                return;
        l1s = calloc(s->nb_snapshots, 2 * sizeof(uint64_t));
        if (!l1s) {
                c->res.check_errors++;
                return;
        }
        for (uint32_t i = 0; i < s->nb_snapshots; i++) {
                uint8_t h[40];
                uint64_t l1off;
                uint32_t l1_size, extra;
                uint16_t id_len, name_len;

                if (p / s->cluster_size >= c->nb || p + sizeof h > c->fsize) {
                        c->res.corruptions++; /* the table runs past the end of the file */
                        break;
                }
                if (dc_pread_full(c->img->fd, h, sizeof h, p) < 0) {
                        c->res.check_errors++;
                        break;
                }
                l1off = be64(h);
                l1_size = be32(h + 8);
                id_len = be16(h + 12);
                name_len = be16(h + 14);
                extra = be32(h + 36);
                if (l1_size > QCOW2_MAX_L1_ENTRIES || (l1off & (s->cluster_size - 1)))
                        c->res.corruptions++;
                else if (l1_size) {
                        l1s[2 * n] = l1off;
                        l1s[2 * n + 1] = l1_size;
                        n++;
                }
                p += ALIGN_UP(40 + (uint64_t) extra + id_len + name_len, 8);
        }
        inc_range(c, s->snapshots_offset, p - s->snapshots_offset, 1);
        /* the same L1 table named by several snapshots is walked once */
        qsort(l1s, n, 2 * sizeof(uint64_t), cmp_pair);
        for (uint64_t i = 0; i < n;) {
                uint64_t k = 1;
                while (i + k < n && l1s[2 * (i + k)] == l1s[2 * i] && l1s[2 * (i + k) + 1] == l1s[2 * i + 1])
                        k++;
                walk_l1(c, l1s[2 * i], l1s[2 * i + 1], false, k);
                i += k;
        }
}

/* The L2 tables referenced again (by snapshots, or twice by the active L1). */
static void walk_more_l2(struct check *c) {
        for (uint64_t k = 0; k < c->nb; k++)
                if (c->l2_more[k])
                        walk_l2(c, k * c->s->cluster_size, false, c->l2_more[k]);
}

static void walk_bitmaps(struct check *c) {
        struct qcow2 *s = c->s;
        _cleanup_free_ uint8_t *dir = NULL;
        uint64_t p = 0;

        if (!s->has_bitmaps)
                return;
        inc_range(c, s->bitmap_dir_offset, s->bitmap_dir_size, 1);
        if (read_table(c, s->bitmap_dir_offset, s->bitmap_dir_size, &dir) < 0)
                return;
        for (uint32_t i = 0; i < s->nb_bitmaps && p + 24 <= s->bitmap_dir_size; i++) {
                uint64_t toff = be64(dir + p);
                uint32_t tsize = be32(dir + p + 8);
                uint16_t name_size = be16(dir + p + 18);
                uint32_t extra = be32(dir + p + 20);
                _cleanup_free_ uint8_t *t = NULL;

                if (tsize && !(toff & (s->cluster_size - 1)) && tsize <= QCOW2_MAX_BITMAP_TABLE) {
                        inc_range(c, toff, (uint64_t) tsize * 8, 1);
                        if (read_table(c, toff, (uint64_t) tsize * 8, &t) == 0)
                                for (uint32_t j = 0; j < tsize; j++) {
                                        uint64_t d = be64(t + (size_t) j * 8) & 0x00fffffffffffe00ull;
                                        if (d)
                                                inc_range(c, d, s->cluster_size, 1);
                                }
                } else
                        c->res.corruptions++;
                p += ALIGN_UP(24 + (uint64_t) extra + name_size, 8);
        }
}

static void walk_reftable(struct check *c) {
        struct qcow2 *s = c->s;

        inc_range(c, s->rt_offset, (uint64_t) s->rt_clusters * s->cluster_size, 1);
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
                inc_range(c, off, s->cluster_size, 1);
        }
}

/*
 * Whether repair may write refcounts: every refblock is a valid cluster of
 * the file referenced by nothing but the table, and every refblock that
 * setting a refcount would create (at the start of an uncovered range) and
 * every growth of the table (past the covered ranges) lands on a cluster
 * that nothing references.
 */
static const char *repair_unsafe(struct check *c) {
        struct qcow2 *s = c->s;
        uint64_t pb = s->per_block, covered = s->rt_entries * pb;

        for (uint64_t i = 0; i < s->rt_entries; i++) {
                uint64_t e = s->rt[i], off = e & REFT_OFFSET_MASK;
                if (!e)
                        continue;
                if ((e & REFT_RESERVED_MASK) || (off & (s->cluster_size - 1)) || off / s->cluster_size >= c->nb)
                        return "a refcount table entry is invalid";
                if (c->refs[off / s->cluster_size] != 1)
                        return "a refcount block is shared with other metadata or data";
        }
        for (uint64_t i = 0; i < c->nb; i++) {
                uint64_t t = i / pb;
                if (!c->refs[i])
                        continue;
                if (i >= covered)
                        return "referenced clusters lie beyond what the refcount table can cover";
                if (!(s->rt[t] & REFT_OFFSET_MASK) && c->refs[t * pb])
                        return "a refcount block would have to go where something is stored";
        }
        return NULL;
}

static int fix_copied(struct check *c, int repair) {
        struct qcow2 *s = c->s;
        dc_image *img = c->img;
        uint64_t cs = s->cluster_size;
        _cleanup_free_ uint8_t *seen = calloc(MAX(c->nb, 1u), 1);
        int r;

        if (!seen)
                return -ENOMEM;
        for (uint64_t i = 0; i < s->l1_size; i++) {
                uint64_t e = s->l1[i], l2 = e & L1E_OFFSET_MASK, rc, nfix = 0;
                _cleanup_free_ uint8_t *t = NULL;

                if (!l2 || (e & L1E_RESERVED_MASK) || (l2 & (cs - 1)) || l2 / cs >= c->nb)
                        continue;
                if (qcow2_refcount_get(img, l2 / cs, &rc) < 0) {
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
                /* the entries of a table met again were judged the first time */
                if (seen[l2 / cs])
                        continue;
                seen[l2 / cs] = 1;
                if (read_table(c, l2, cs, &t) < 0)
                        continue;
                for (uint64_t j = 0; j < s->l2_entries; j++) {
                        uint64_t le = qcow2_l2_get(s, t, j), d = le & L2E_OFFSET_MASK;
                        int type = qcow2_cluster_type(s, le);
                        if ((type != QC_NORMAL && type != QC_ZERO_ALLOC) || (le & L2E_RESERVED_MASK) ||
                            (d & (cs - 1)) || (!s->has_data_file && d / cs >= c->nb))
                                continue;
                        /* data in a data file is not refcounted: as if always 1 */
                        if (s->has_data_file)
                                rc = 1;
                        else if (qcow2_refcount_get(img, d / cs, &rc) < 0) {
                                c->res.check_errors++;
                                continue;
                        }
                        if ((rc == 1) != !!(le & QCOW_OFLAG_COPIED)) {
                                c->res.corruptions++;
                                if (repair == DC_REPAIR_ALL) {
                                        le = rc == 1 ? le | QCOW_OFLAG_COPIED : le & ~QCOW_OFLAG_COPIED;
                                        qcow2_l2_set(s, t, j, le, qcow2_l2_bitmap(s, t, j));
                                        nfix++;
                                }
                        }
                }
                /* the table is rewritten only where it cannot be other metadata */
                if (nfix && qcow2_overlap_check(img, l2, cs, QCOW2_OL_ACTIVE_L2, "an L2 table") == 0) {
                        qcow2_cache_drop(&s->l2_cache, l2);
                        r = dc_pwrite_full(img->fd, t, cs, l2);
                        if (r < 0)
                                return r;
                        c->res.corruptions_fixed += nfix;
                }
        }
        return 0;
}

static int check_pass(dc_image *img, int repair, struct dc_check_result *ret) {
        struct qcow2 *s = QC(img);
        struct check c = { .img = img, .s = s };
        uint64_t highest = 0;
        bool any = false;
        int r;

        r = qcow2_file_size(img, &c.fsize);
        if (r < 0)
                return r;
        c.nb = DIV_ROUND_UP(c.fsize, s->cluster_size);
        c.refs = calloc(MAX(c.nb, 1u), sizeof(uint32_t));
        c.l2_more = calloc(MAX(c.nb, 1u), sizeof(uint32_t));
        if (!c.refs || !c.l2_more) {
                free(c.refs);
                free(c.l2_more);
                return dc_error(ENOMEM, "'%s': out of memory for %llu clusters", img->path,
                                (unsigned long long) c.nb);
        }

        inc_range(&c, 0, s->cluster_size, 1);
        walk_l1(&c, s->l1_offset, s->l1_size, true, 1);
        walk_snapshots(&c);
        walk_more_l2(&c);
        walk_reftable(&c);
        walk_bitmaps(&c);
        if (s->fde_length)
                inc_range(&c, s->fde_offset, s->fde_length, 1);

        if (repair != DC_REPAIR_NONE) {
                const char *why = repair_unsafe(&c);
                if (why) {
                        r = -EUCLEAN;
                        dc_error(r, "'%s': the refcount structure is damaged (%s); it cannot be repaired in place",
                                 img->path, why);
                        goto fail;
                }
        }
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
        c.res.total_clusters = qcow2_size_to_clusters(s->cluster_bits, img->virtual_size);
        free(c.refs);
        free(c.l2_more);
        *ret = c.res;
        return 0;
fail:
        free(c.refs);
        free(c.l2_more);
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
