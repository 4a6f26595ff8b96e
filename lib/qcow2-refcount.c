/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * qcow2 cluster allocation and refcounts (qcow2.rst, "Host cluster management").
 *
 * Design notes — why a crash cannot corrupt an image
 * ---------------------------------------------------
 * qemu-img check calls an image corrupt when some cluster is referenced more
 * often than its refcount says (it could be handed out twice), when a
 * reference points past the end of the file, or when a COPIED flag lies.
 * A refcount that is too high is only a leak.  Every metadata update below is
 * therefore ordered so that, at every instant, what is durable on disk has
 * refcounts >= references:
 *
 *  1. Allocation raises refcounts first (qcow2_alloc_clusters), and the
 *     caller issues one fdatasync() after writing the new clusters' contents
 *     and before it writes any L1/L2 entry that references them.  The sync
 *     covers both the refblock update and the data, so the reference never
 *     points at a cluster that is free or past the end of the file, and the
 *     guest never sees a cluster whose data did not reach the disk.
 *     Data that a job writes with O_DIRECT (dc_image_job_cache, cache=none) is no
 *     exception: the write has returned before the entry is written, and
 *     fdatasync() on the buffered descriptor flushes the whole file and the
 *     device's cache, whichever descriptor wrote.  An allocating write sends
 *     its data without the image lock (qcow2_write), but puts its L2 entries
 *     into the cache only after the data write returned: a sync by another
 *     thread in between never makes them durable ahead of their data.
 *     Allocating writes of fresh clusters batch the sync: their L2 entries
 *     are updated in the cache at once (reads see them) but written only
 *     after the next fdatasync (qcow2_l2_commit_pending), which comes at a
 *     flush, before a cache slot with such entries is reused, before one of
 *     those entries is written at once, before a check, at a close, or after
 *     1 GiB of such data.  A crash before that leaks the clusters.
 *  2. A new refblock is written in full and synced before the refcount-table
 *     entry that points to it, and it counts itself (it sits in the first
 *     cluster of the range it covers, which was uncovered, hence free).
 *  3. A larger refcount table is written, with the refblocks that cover it,
 *     into fresh clusters at the end of the covered range; after a sync the
 *     header is switched with one 12-byte write inside one sector, synced,
 *     and only then is the old table freed.
 *  4. Freeing goes the other way: the caller makes the metadata that dropped
 *     the reference durable (fdatasync) before qcow2_free_clusters() lowers
 *     the refcount.  A crash in between leaks the cluster.  So an
 *     allocating write that replaces an existing mapping does not wait for
 *     the batch of rule 1: it commits at once, since freeing the old
 *     cluster must wait for the new entry to be durable.
 *  5. Every refcount is strict: we never use lazy refcounts (the compat bit
 *     may be set by the creator; we simply do not rely on it), so the dirty
 *     bit is never needed for our own writes.
 *
 * Two tests hold the library to this, with qemu-img check as the judge.
 * tests/lib/test_crash.py kills the process before each of its writes: that
 * proves the order of the writes, but the page cache survives a killed
 * process, so it cannot tell whether the syncs are where they must be.
 * tests/lib/test_powerloss.py models power loss: from an I/O trace of
 * writes and syncs (dc_trace_fd, lib/util.c) it rebuilds the file as it may
 * be found after a cut, with only what a completed sync covered plus any
 * part of the rest, and also requires every flushed guest write to read
 * back.
 */

#include "qcow2.h"

/* --- metadata cache: whole clusters; refblocks written through, L2 entries may wait (rule 1) --- */

/*
 * A cache holds at most 4 MiB of tables (and at least two): 32 tables of
 * 64 KiB clusters, two of 2 MiB.  A chain of 64 layers of 2 MiB clusters
 * would otherwise hold 8 GiB of tables while a job reads it.
 */
static size_t cache_slots(const struct qcow2 *s) {
        return MIN((size_t) QCOW2_CACHE_SLOTS, MAX((size_t) 2, (size_t) ((4u << 20) / s->cluster_size)));
}

int qcow2_cache_get(dc_image *img, struct qcow2_cache *c, uint64_t offset, bool fresh, uint8_t **ret) {
        struct qcow2 *s = QC(img);
        size_t victim = 0, n = cache_slots(s);
        int r;

        for (size_t i = 0; i < n; i++) {
                if (c->offset[i] == offset) {
                        c->used[i] = ++c->clock;
                        if (fresh)
                                memset(c->buf[i], 0, s->cluster_size);
                        *ret = c->buf[i];
                        return 0;
                }
                if (c->offset[i] == 0 || c->used[i] < c->used[victim])
                        victim = i;
                if (c->offset[i] == 0)
                        break;
        }
        if (c->dirty_hi[victim] > c->dirty_lo[victim]) {
                /* entries waiting for a sync live in this slot: sync and write them first */
                r = qcow2_l2_commit_pending(img);
                if (r < 0)
                        return r;
        }
        if (!c->buf[victim]) {
                c->buf[victim] = malloc(s->cluster_size);
                if (!c->buf[victim])
                        return dc_error(ENOMEM, "out of memory");
        }
        c->offset[victim] = 0;
        if (fresh)
                memset(c->buf[victim], 0, s->cluster_size);
        else {
                r = dc_pread_full(img->fd, c->buf[victim], s->cluster_size, offset);
                if (r < 0)
                        return dc_error(r, "'%s': cannot read metadata at offset %llu: %s", img->path,
                                        (unsigned long long) offset, strerror(-r));
        }
        c->offset[victim] = offset;
        c->used[victim] = ++c->clock;
        *ret = c->buf[victim];
        return 0;
}

/* Forget a table (it was freed: its entries waiting for a sync no longer matter). */
void qcow2_cache_drop(struct qcow2_cache *c, uint64_t offset) {
        for (size_t i = 0; i < QCOW2_CACHE_SLOTS; i++)
                if (c->offset[i] == offset) {
                        c->offset[i] = 0;
                        c->dirty_lo[i] = c->dirty_hi[i] = 0;
                }
}

void qcow2_cache_free(struct qcow2_cache *c) {
        for (size_t i = 0; i < QCOW2_CACHE_SLOTS; i++) {
                free(c->buf[i]);
                c->buf[i] = NULL;
                c->offset[i] = 0;
                c->dirty_lo[i] = c->dirty_hi[i] = 0;
        }
}

/* --- refcount entries ----------------------------------------------------- */

static uint64_t rb_entry_get(struct qcow2 *s, const uint8_t *rb, uint64_t i) {
        uint32_t bits = s->refcount_bits;

        switch (bits) {
        case 64:
                return be64(rb + i * 8);
        case 32:
                return be32(rb + i * 4);
        case 16:
                return be16(rb + i * 2);
        case 8:
                return rb[i];
        default: {
                uint64_t bit = i * bits;
                return (rb[bit / 8] >> (bit % 8)) & ((1u << bits) - 1);
        }
        }
}

/* Store V and return the byte range touched, for a minimal write. */
static void rb_entry_set(struct qcow2 *s, uint8_t *rb, uint64_t i, uint64_t v, uint64_t *ret_byte, unsigned *ret_len) {
        uint32_t bits = s->refcount_bits;

        switch (bits) {
        case 64:
                put_be64(rb + i * 8, v);
                *ret_byte = i * 8, *ret_len = 8;
                return;
        case 32:
                put_be32(rb + i * 4, (uint32_t) v);
                *ret_byte = i * 4, *ret_len = 4;
                return;
        case 16:
                put_be16(rb + i * 2, (uint16_t) v);
                *ret_byte = i * 2, *ret_len = 2;
                return;
        case 8:
                rb[i] = (uint8_t) v;
                *ret_byte = i, *ret_len = 1;
                return;
        default: {
                uint64_t bit = i * bits;
                uint8_t mask = (uint8_t) (((1u << bits) - 1) << (bit % 8));
                rb[bit / 8] = (uint8_t) ((rb[bit / 8] & ~mask) | ((v << (bit % 8)) & mask));
                *ret_byte = bit / 8, *ret_len = 1;
                return;
        }
        }
}

static uint64_t refcount_max(struct qcow2 *s) {
        return s->refcount_bits == 64 ? UINT64_MAX : (1ull << s->refcount_bits) - 1;
}

int qcow2_refcount_get(dc_image *img, uint64_t cluster, uint64_t *ret) {
        struct qcow2 *s = QC(img);
        uint64_t t = cluster / s->per_block, off;
        uint8_t *rb;
        int r;

        if (t >= s->rt_entries) {
                *ret = 0;
                return 0;
        }
        off = s->rt[t] & REFT_OFFSET_MASK;
        if (off == 0) {
                *ret = 0;
                return 0;
        }
        if (off & (s->cluster_size - 1))
                return dc_error(EUCLEAN, "'%s': refcount block at %llu is not cluster aligned", img->path,
                                (unsigned long long) off);
        r = qcow2_cache_get(img, &s->rb_cache, off, false, &rb);
        if (r < 0)
                return r;
        *ret = rb_entry_get(s, rb, cluster % s->per_block);
        return 0;
}

/*
 * Replace the refcount table by a larger one that has at least NEED entries
 * (rule 3 above).  The new table and the refblocks covering it go at the
 * first cluster that the old table cannot describe.
 */
static int grow_reftable(dc_image *img, uint64_t need) {
        struct qcow2 *s = QC(img);
        uint64_t cs = s->cluster_size, entries_per_cluster = cs / 8;
        uint64_t start = s->rt_entries * s->per_block; /* first uncovered cluster */
        uint64_t nrb = 1, ntc, new_entries;
        _cleanup_free_ uint8_t *tbl = NULL, *rbbuf = NULL;
        uint64_t *new_rt;
        uint8_t hdr[12];
        uint64_t old_off = s->rt_offset, old_clusters = s->rt_clusters;
        int r;

        /* Find k refblocks + T table clusters that cover themselves. */
        for (;;) {
                new_entries = MAX(need, s->rt_entries + nrb);
                new_entries = MAX(new_entries, s->rt_entries * 2);
                ntc = DIV_ROUND_UP(new_entries, entries_per_cluster);
                new_entries = ntc * entries_per_cluster;
                if (nrb * s->per_block >= nrb + ntc)
                        break;
                nrb++;
        }
        if (ntc * cs > QCOW2_MAX_REFTABLE_BYTES)
                return dc_error(EFBIG, "'%s': refcount table would exceed %u MiB", img->path,
                                QCOW2_MAX_REFTABLE_BYTES >> 20);
        if ((start + nrb + ntc) * cs >= (1ull << 56))
                return dc_error(EFBIG, "'%s': image would exceed the largest host offset", img->path);

        rbbuf = calloc(1, cs);
        tbl = calloc(ntc, cs);
        new_rt = calloc(new_entries, sizeof(uint64_t));
        if (!rbbuf || !tbl || !new_rt) {
                free(new_rt);
                return dc_error(ENOMEM, "out of memory");
        }
        memcpy(new_rt, s->rt, s->rt_entries * sizeof(uint64_t));

        /* Refblocks at start .. start+nrb-1, the table right after them. */
        r = qcow2_overlap_check(img, start * cs, (nrb + ntc) * cs, 0, "a new refcount table");
        if (r < 0) {
                free(new_rt);
                return r;
        }
        for (uint64_t j = 0; j < nrb; j++) {
                uint64_t first = start + j * s->per_block, b;
                unsigned l;
                memset(rbbuf, 0, cs);
                for (uint64_t c = first; c < first + s->per_block && c < start + nrb + ntc; c++)
                        rb_entry_set(s, rbbuf, c - first, 1, &b, &l);
                qcow2_cache_drop(&s->rb_cache, (start + j) * cs);
                r = dc_pwrite_full(img->fd, rbbuf, cs, (start + j) * cs);
                if (r < 0)
                        goto fail;
                new_rt[s->rt_entries + j] = (start + j) * cs;
        }
        for (uint64_t i = 0; i < new_entries; i++)
                put_be64(tbl + i * 8, new_rt[i]);
        r = dc_pwrite_full(img->fd, tbl, ntc * cs, (start + nrb) * cs);
        if (r < 0)
                goto fail;
        r = dc_fdatasync(img->fd);
        if (r < 0)
                goto fail;

        put_be64(hdr, (start + nrb) * cs);
        put_be32(hdr + 8, (uint32_t) ntc);
        r = dc_pwrite_full(img->fd, hdr, sizeof hdr, 48);
        if (r < 0)
                goto fail;
        r = dc_fdatasync(img->fd);
        if (r < 0)
                goto fail;

        free(s->rt);
        s->rt = new_rt;
        s->rt_entries = new_entries;
        s->rt_offset = (start + nrb) * cs;
        s->rt_clusters = (uint32_t) ntc;

        /* The old table is unreferenced now: free it. */
        return qcow2_free_clusters(img, old_off / cs, old_clusters);
fail:
        free(new_rt);
        return dc_error(r, "'%s': cannot grow the refcount table: %s", img->path, strerror(-r));
}

/* Make sure a refblock covers CLUSTER (rule 2). */
static int ensure_refblock(dc_image *img, uint64_t cluster) {
        struct qcow2 *s = QC(img);
        uint64_t t = cluster / s->per_block, off, b;
        uint8_t *rb, ent[8];
        unsigned l;
        int r;

        if (t >= s->rt_entries) {
                r = grow_reftable(img, t + 1);
                if (r < 0)
                        return r;
        }
        if ((s->rt[t] & REFT_OFFSET_MASK) != 0)
                return 0;

        off = t * s->per_block * s->cluster_size;
        /* the first cluster of a range nothing covered yet: metadata there means the tables lie */
        r = qcow2_overlap_check(img, off, s->cluster_size, 0, "a new refcount block");
        if (r < 0)
                return r;
        r = qcow2_cache_get(img, &s->rb_cache, off, true, &rb);
        if (r < 0)
                return r;
        rb_entry_set(s, rb, 0, 1, &b, &l);
        r = dc_pwrite_full(img->fd, rb, s->cluster_size, off);
        if (r >= 0)
                r = dc_fdatasync(img->fd);
        if (r < 0) {
                qcow2_cache_drop(&s->rb_cache, off);
                return dc_error(r, "'%s': cannot write a refcount block: %s", img->path, strerror(-r));
        }
        put_be64(ent, off);
        r = dc_pwrite_full(img->fd, ent, 8, s->rt_offset + t * 8);
        if (r < 0)
                return dc_error(r, "'%s': cannot update the refcount table: %s", img->path, strerror(-r));
        s->rt[t] = off;
        return 0;
}

int qcow2_refcount_set(dc_image *img, uint64_t cluster, uint64_t value) {
        struct qcow2 *s = QC(img);
        uint64_t off, b;
        uint8_t *rb;
        unsigned l;
        int r;

        if (value > refcount_max(s))
                return dc_error(EOVERFLOW, "'%s': refcount of cluster %llu would overflow", img->path,
                                (unsigned long long) cluster);
        r = ensure_refblock(img, cluster);
        if (r < 0)
                return r;
        off = s->rt[cluster / s->per_block] & REFT_OFFSET_MASK;
        r = qcow2_cache_get(img, &s->rb_cache, off, false, &rb);
        if (r < 0)
                return r;
        rb_entry_set(s, rb, cluster % s->per_block, value, &b, &l);
        r = dc_pwrite_full(img->fd, rb + b, l, off + b);
        if (r < 0)
                return dc_error(r, "'%s': cannot update a refcount block: %s", img->path, strerror(-r));
        if (value == 0) {
                if (cluster < s->free_hint)
                        s->free_hint = cluster;
                qcow2_cache_drop(&s->l2_cache, cluster * s->cluster_size);
                qcow2_cache_drop(&s->rb_cache, cluster * s->cluster_size);
                if (s->comp_free_off / s->cluster_size == cluster)
                        s->comp_free_off = 0;
                if (s->comp_cache_key)
                        s->comp_cache_key = 0;
        }
        return 0;
}

/* Raise refcounts of N contiguous clusters starting at FIRST by one, batching
 * the writes per refblock. */
static int refcount_inc_run(dc_image *img, uint64_t first, uint64_t n) {
        struct qcow2 *s = QC(img);

        while (n > 0) {
                uint64_t off, lo = UINT64_MAX, hi = 0, b;
                uint64_t in_block = MIN(n, s->per_block - first % s->per_block);
                uint8_t *rb;
                unsigned l;
                int r;

                r = ensure_refblock(img, first);
                if (r < 0)
                        return r;
                off = s->rt[first / s->per_block] & REFT_OFFSET_MASK;
                r = qcow2_cache_get(img, &s->rb_cache, off, false, &rb);
                if (r < 0)
                        return r;
                for (uint64_t i = 0; i < in_block; i++) {
                        uint64_t idx = (first + i) % s->per_block;
                        uint64_t v = rb_entry_get(s, rb, idx);
                        if (v >= refcount_max(s))
                                return dc_error(EOVERFLOW, "'%s': refcount overflow", img->path);
                        rb_entry_set(s, rb, idx, v + 1, &b, &l);
                        lo = MIN(lo, b);
                        hi = MAX(hi, b + l);
                }
                r = dc_pwrite_full(img->fd, rb + lo, hi - lo, off + lo);
                if (r < 0)
                        return dc_error(r, "'%s': cannot update a refcount block: %s", img->path, strerror(-r));
                first += in_block;
                n -= in_block;
        }
        return 0;
}

/*
 * Allocate N contiguous free clusters and give each refcount 1.  The caller
 * must fdatasync() before referencing them (rule 1).
 */
int qcow2_alloc_clusters(dc_image *img, uint64_t n, uint64_t *ret_first) {
        struct qcow2 *s = QC(img);
        uint64_t start = s->free_hint, i = 0;
        int r;

        /* Every refcount range begins with its own refblock, so a run can
         * never be longer than one range minus that cluster. */
        if (n > qcow2_max_run(s))
                return dc_error(EFBIG, "'%s': cannot allocate %llu contiguous clusters with %u-bit refcounts and "
                                       "%u-byte clusters", img->path, (unsigned long long) n, s->refcount_bits,
                                s->cluster_size);
        while (i < n) {
                uint64_t c = start + i, v;

                if ((c + 1) * s->cluster_size >= (1ull << 56))
                        return dc_error(EFBIG, "'%s': image is full (host offsets exhausted)", img->path);
                /* Create the covering refblock before judging C: it may
                 * take the first cluster of the range itself. */
                r = ensure_refblock(img, c);
                if (r < 0)
                        return r;
                r = qcow2_refcount_get(img, c, &v);
                if (r < 0)
                        return r;
                if (v != 0) {
                        if (start == s->free_hint && i == 0)
                                s->free_hint = c + 1;
                        start = c + 1;
                        i = 0;
                        continue;
                }
                i++;
        }
        r = refcount_inc_run(img, start, n);
        if (r < 0)
                return r;
        if (start == s->free_hint)
                s->free_hint = start + n;
        *ret_first = start;
        return 0;
}

int qcow2_free_clusters(dc_image *img, uint64_t first, uint64_t n) {
        for (uint64_t c = first; c < first + n; c++) {
                uint64_t v;
                int r = qcow2_refcount_get(img, c, &v);
                if (r < 0)
                        return r;
                if (v == 0)
                        return dc_error(EUCLEAN, "'%s': freeing cluster %llu whose refcount is already 0", img->path,
                                        (unsigned long long) c);
                r = qcow2_refcount_set(img, c, v - 1);
                if (r < 0)
                        return r;
        }
        return 0;
}

/* Byte ranges (compressed data): one reference per host cluster overlapped. */
int qcow2_free_bytes(dc_image *img, uint64_t off, uint64_t len) {
        uint64_t cs = QC(img)->cluster_size;
        uint64_t first = off / cs, last = (off + len - 1) / cs;
        return qcow2_free_clusters(img, first, last - first + 1);
}

int qcow2_ref_bytes(dc_image *img, uint64_t off, uint64_t len) {
        uint64_t cs = QC(img)->cluster_size;
        uint64_t first = off / cs, last = (off + len - 1) / cs;
        return refcount_inc_run(img, first, last - first + 1);
}
