/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The copy engine (QEMU's block/block-copy.c): the one place where a job
 * reads a chain, writes a target and updates what is left to copy.
 *
 * Design notes
 * ------------
 * - An engine copies from a source view (a layer read through its chain;
 *   with skip_unallocated, only what is allocated from it down to a stop
 *   layer) into a target, and keeps a bitmap of what is still to copy, a
 *   bit per unit.  Every job is a use of it:
 *     stream     the top layer from itself down to base, into itself, not
 *                over what it holds (skip_target_allocated); all marked,
 *                unit = chunk;
 *     commit     top down to base, into base; all marked, unit = chunk;
 *     backup     the chain into a separate target, unit = the target's
 *                cluster; marked as the sync mode says at the job's start,
 *                the copy-before-write filter copies units before guest
 *                writes reach them (dc_block_copy_range under the writer's
 *                range lock);
 *     mirror     the chain into the target, unit = granularity; the
 *                mirror's filter marks what guests write, or copies it at
 *                once in write-blocking mode; active commit is a mirror
 *                into base.
 * - A background pass (dc_block_copy_pass) has up to `workers` requests in
 *   flight: the calling thread and helper threads claim the next marked
 *   units from one cursor, at most a chunk each, so the source is read
 *   nearly in order and no two requests overlap.  Each request takes the
 *   disk's range lock over its claim, looks again at the bitmap (and at
 *   the allocation, for stream and commit) under it, since a guest write
 *   may have changed both since the claim, copies, and clears the units it
 *   completed.  The owner's hooks make each request a pause point, give it
 *   a turn under a speed limit and decide about its errors (retry after a
 *   stop, skip, fail), so the job model stays out of this file.  Progress
 *   is reported as bytes of the disk handled (clean stretches the cursor
 *   jumps over included) and bytes copied.
 * - Zeros read are written as zero writes, and not at all where a target
 *   without a backing file holds nothing (it reads as zeros already).  With
 *   compress, whole target clusters are compressed on the requests'
 *   threads, side by side, and stored with one sync per request.
 * - Locking: the bitmap is under the engine's lock, a leaf taken alone
 *   (never with another lock held, never across I/O); its count may be
 *   read without it.  Copies hold the disk's range lock (taken here, or
 *   by the writer whose hook calls dc_block_copy_range) and then image
 *   locks, a layer before its backing file, the chain before the target.
 *   One pass at a time per engine; dc_block_copy_range may run beside it.
 */

#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>

#include "block-copy.h"

struct dc_block_copy {
        struct dc_block_copy_params p;
        uint64_t size;        /* the source's virtual size */
        pthread_mutex_t lock; /* the bitmap (a leaf) */
        struct dc_bitmap bitmap;
        uint8_t *buf;         /* the pass's calling thread's request buffer */
};

/*
 * How a job's written layer (a mirror's or backup's target, the layer a
 * stream or commit fills) takes gigabytes of data, the job option "cache"
 * in QEMU's words:
 *
 * - writeback (the default): through the page cache, as qemu-img and
 *   qemu-storage-daemon write by default, with the end made durable by the
 *   job's flush.  Measured on the realistic chain (bench/), buffered writes
 *   take half the time of direct ones: the kernel merges the scattered
 *   cluster writes into large requests and the copy never waits for the
 *   disk.  So that gigabytes of dirty pages neither pile up for the final
 *   flush nor push the machine's other pages out, every WRITEBACK_KICK
 *   bytes the job starts writeback of the file (sync_file_range, which does
 *   not wait) and drops the pages an earlier kick has written (they are
 *   clean by then; POSIX_FADV_DONTNEED leaves dirty ones alone).  The kick
 *   itself is in image.c (dc_image_pwrite_data), every img->wb_kick bytes.
 * - none: whole, aligned data writes go around the page cache (O_DIRECT)
 *   through a second descriptor on the same file (dc_image_direct_twin);
 *   metadata and unaligned pieces stay on the buffered one, and the kernel
 *   keeps the two coherent.  Where the file system has no direct I/O
 *   (tmpfs), this is writeback.
 *
 * Off (the job ended, its data flushed): the pages a writeback job left in
 * the cache are dropped, and writes are plain buffered ones again, for the
 * writers that keep the layer.
 */
#define WRITEBACK_KICK (32ull << 20)

void dc_image_job_cache(dc_image *img, int mode, bool on) {
        if (!img)
                return;
        pthread_mutex_lock(&img->lock);
        if (on && mode == DC_CACHE_NONE && img->writable)
                (void) dc_image_direct_twin(img);
        if (!on && img->writeback)
                /* what the job wrote is on disk now (its flush) and nobody reads it back soon */
                (void) posix_fadvise(img->fd, 0, 0, POSIX_FADV_DONTNEED);
        img->direct = on && mode == DC_CACHE_NONE && img->dfd >= 0;
        img->writeback = on && !img->direct;
        img->wb_kick = WRITEBACK_KICK;
        pthread_mutex_unlock(&img->lock);
}

/* --- the bitmap ------------------------------------------------------------------- */

uint64_t dc_block_copy_mark(dc_block_copy *bc, uint64_t off, uint64_t len) {
        uint64_t u = bc->p.unit, first = off / u, n;

        if (!len || off >= bc->size)
                return 0;
        pthread_mutex_lock(&bc->lock);
        n = dc_bitmap_assign(&bc->bitmap, first, DIV_ROUND_UP(MIN(off + len, bc->size), u) - first, true);
        pthread_mutex_unlock(&bc->lock);
        return n;
}

void dc_block_copy_unmark(dc_block_copy *bc, uint64_t off, uint64_t len) {
        uint64_t u = bc->p.unit, first = DIV_ROUND_UP(off, u), last;

        if (!len || off >= bc->size)
                return;
        /* whole units only (the last one may end at the end of the disk) */
        last = off + len >= bc->size ? bc->bitmap.nbits : (off + len) / u;
        if (last <= first)
                return;
        pthread_mutex_lock(&bc->lock);
        (void) dc_bitmap_assign(&bc->bitmap, first, last - first, false);
        pthread_mutex_unlock(&bc->lock);
}

uint64_t dc_block_copy_marked_run(dc_block_copy *bc, uint64_t off, uint64_t max, bool *ret_marked) {
        uint64_t u = bc->p.unit, i = off / u, n, end;

        if (off >= bc->size || !max)
                return 0;
        end = MIN(bc->size, off + MIN(max, bc->size - off));
        pthread_mutex_lock(&bc->lock);
        n = dc_bitmap_run(&bc->bitmap, i, DIV_ROUND_UP(end, u) - i, ret_marked);
        pthread_mutex_unlock(&bc->lock);
        return MIN((i + n) * u, end) - off;
}

void dc_block_copy_mark_all(dc_block_copy *bc) {
        (void) dc_block_copy_mark(bc, 0, bc->size);
}

uint64_t dc_block_copy_dirty(dc_block_copy *bc) {
        return dc_bitmap_count(&bc->bitmap) * bc->p.unit;
}

int dc_block_copy_dirty_ranges(dc_block_copy *bc, uint64_t **ret, size_t *ret_n) {
        uint64_t *v = NULL, i = 0;
        size_t n = 0;

        pthread_mutex_lock(&bc->lock);
        while ((i = dc_bitmap_next(&bc->bitmap, i)) < bc->bitmap.nbits) {
                bool set;
                uint64_t run = dc_bitmap_run(&bc->bitmap, i, bc->bitmap.nbits - i, &set);
                uint64_t *w = reallocarray(v, 2 * (n + 1), sizeof *v);
                if (!w) {
                        pthread_mutex_unlock(&bc->lock);
                        free(v);
                        return dc_error(ENOMEM, "out of memory");
                }
                v = w;
                v[2 * n] = i * bc->p.unit;
                v[2 * n + 1] = MIN(run * bc->p.unit, bc->size - i * bc->p.unit);
                n++;
                i += run;
        }
        pthread_mutex_unlock(&bc->lock);
        *ret = v;
        *ret_n = n;
        return 0;
}

/* The units a request at OFF completes by handling LEN bytes are done: those whose end it reached. */
static void units_done(dc_block_copy *bc, uint64_t off, uint64_t len) {
        uint64_t u = bc->p.unit, first = off / u, last = off + len >= bc->size ? bc->bitmap.nbits : (off + len) / u;

        if (last <= first)
                return;
        pthread_mutex_lock(&bc->lock);
        dc_bitmap_assign(&bc->bitmap, first, last - first, false);
        pthread_mutex_unlock(&bc->lock);
}

/* How many bytes from OFF (at most N) are uniformly marked or not. */
static uint64_t marked_run(dc_block_copy *bc, uint64_t off, uint64_t n, bool *ret_marked) {
        uint64_t u = bc->p.unit, first = off / u, bits;

        pthread_mutex_lock(&bc->lock);
        bits = dc_bitmap_run(&bc->bitmap, first, DIV_ROUND_UP(off + n, u) - first, ret_marked);
        pthread_mutex_unlock(&bc->lock);
        return MIN((first + bits) * u - off, n);
}

/* Is [off, off+len) allocated in a layer from FROM down to, not including, STOP?
 * Returns the length of the uniform run at OFF through *ret_len. */
static int allocated_above(dc_image *from, dc_image *stop, uint64_t off, uint64_t len, bool *ret, uint64_t *ret_len) {
        uint64_t run = len;
        *ret = false;
        for (dc_image *l = from; l && l != stop; l = l->backing) {
                struct dc_layer_status st;
                int r;
                if (off >= l->virtual_size)
                        continue;
                pthread_mutex_lock(&l->lock);
                r = l->drv->block_status(l, off, MIN(run, l->virtual_size - off), &st);
                pthread_mutex_unlock(&l->lock);
                if (r < 0)
                        return r;
                run = MIN(run, st.length ? st.length : run);
                if (st.type != DC_LAYER_UNALLOCATED) {
                        *ret = true;
                        break;
                }
        }
        *ret_len = run;
        return 0;
}

int dc_block_copy_mark_allocated(dc_block_copy *bc, dc_image *from, dc_image *stop) {
        uint64_t size = from->virtual_size, off = 0;

        while (off < size) {
                uint64_t run;
                bool alloc;
                int r = allocated_above(from, stop, off, size - off, &alloc, &run);
                if (r < 0)
                        return r;
                if (run == 0)
                        run = size - off;
                if (alloc)
                        (void) dc_block_copy_mark(bc, off, run);
                off += run;
        }
        return 0;
}

/* --- one copy --------------------------------------------------------------------- */

static bool all_zero(const uint8_t *b, size_t n) {
        for (size_t i = 0; i < n; i++)
                if (b[i])
                        return false;
        return true;
}

/* Compress the whole clusters of one request and store them with one sync
 * (backup compress).  The workers compress their requests side by side. */
static int write_compressed_run(dc_image *dst, const uint8_t *buf, uint64_t off, uint64_t len) {
        uint64_t cs = dc_image_cluster_size(dst), n = DIV_ROUND_UP(len, cs);
        uint8_t **out = calloc(n, sizeof *out);
        size_t *clen = calloc(n, sizeof *clen);
        int r = out && clen ? 0 : dc_error(ENOMEM, "out of memory");

        for (uint64_t i = 0; i < n && r >= 0; i++) {
                if (!(out[i] = malloc(cs)))
                        r = dc_error(ENOMEM, "out of memory");
                else
                        r = dc_qcow2_compress_cluster(dst, buf + i * cs, (size_t) MIN(cs, len - i * cs), out[i],
                                                      &clen[i]);
        }
        if (r >= 0) {
                pthread_mutex_lock(&dst->lock);
                r = dc_qcow2_store_compressed_batch(dst, buf, off, len, out, clen);
                pthread_mutex_unlock(&dst->lock);
        }
        for (uint64_t i = 0; out && i < n; i++)
                free(out[i]);
        free(out);
        free(clen);
        return r;
}

/* Write BUF (LEN bytes at OFF) into the target: zeros as zero writes, whole clusters compressed when asked. */
static int write_target(dc_block_copy *bc, const uint8_t *buf, uint64_t off, uint64_t len) {
        dc_image *dst = bc->p.target;
        int r;

        if (off + len > dst->virtual_size)
                return dc_error(EINVAL, "'%s' is smaller than the data to copy", dst->path);
        if (all_zero(buf, (size_t) len)) {
                struct dc_layer_status st = { 0 };
                pthread_mutex_lock(&dst->lock);
                /* a target with nothing below reads as zeros where it holds nothing */
                r = dst->backing_file ? 0 : dst->drv->block_status(dst, off, len, &st);
                if (r < 0 || dst->backing_file || st.type != DC_LAYER_UNALLOCATED || st.length < len)
                        r = dst->drv->write_zeroes(dst, off, len, bc->p.zero_flags);
                pthread_mutex_unlock(&dst->lock);
        } else if (bc->p.compress && off % dc_image_cluster_size(dst) == 0 &&
                   ((off + len) % dc_image_cluster_size(dst) == 0 || off + len == dst->virtual_size)) {
                r = write_compressed_run(dst, buf, off, len);
        } else {
                pthread_mutex_lock(&dst->lock);
                r = dst->drv->write(dst, buf, off, (size_t) len);
                pthread_mutex_unlock(&dst->lock);
        }
        return r;
}

/* Read [OFF, OFF+LEN) of the source view and write it into the target. */
static int copy(dc_block_copy *bc, uint8_t *buf, uint64_t off, uint64_t len, bool *ret_read_error) {
        int r;

        *ret_read_error = true;
        r = bc->p.read ? bc->p.read(bc->p.read_opaque, buf, off, (size_t) len)
                       : dc_chain_read(bc->p.source, buf, off, (size_t) len);
        if (r < 0)
                return r;
        *ret_read_error = false;
        return write_target(bc, buf, off, len);
}

struct step {
        uint64_t done;   /* bytes of the disk handled */
        bool copied;     /* data moved (counts for the speed limit) */
        bool read_error; /* the failure was a read */
};

/* One request at OFF, at most N bytes, under the range lock: the first uniform run there, copied or passed over. */
static int step(dc_block_copy *bc, uint8_t *buf, uint64_t off, uint64_t n, struct step *st) {
        uint64_t run;
        bool copy_it;
        int r;

        st->read_error = true;
        st->done = n;
        st->copied = false;
        if (bc->p.skip_target_allocated) {
                dc_image *dst = bc->p.target;
                struct dc_layer_status ls;
                pthread_mutex_lock(&dst->lock);
                r = dst->drv->block_status(dst, off, n, &ls);
                pthread_mutex_unlock(&dst->lock);
                if (r < 0)
                        return r;
                if (ls.type != DC_LAYER_UNALLOCATED) {
                        st->done = ls.length; /* a guest write or earlier data: never overwritten */
                        units_done(bc, off, st->done);
                        return 0;
                }
                n = MIN(n, ls.length);
        }
        run = marked_run(bc, off, n, &copy_it);
        if (copy_it && bc->p.skip_unallocated) {
                dc_image *from = bc->p.skip_target_allocated ? bc->p.source->backing : bc->p.source;
                r = allocated_above(from, bc->p.stop, off, run, &copy_it, &run);
                if (r < 0)
                        return r;
        }
        st->done = run;
        if (copy_it) {
                r = copy(bc, buf, off, run, &st->read_error);
                if (r < 0)
                        return r;
                st->copied = true;
        }
        units_done(bc, off, run);
        return 0;
}

/* --- a background pass --------------------------------------------------------------- */

struct pass {
        dc_block_copy *bc;
        uint64_t cursor; /* the first byte no worker has claimed (engine lock) */
        int r;           /* the first failure (engine lock) */
        bool stop;       /* a hook ended the pass (engine lock) */
        char why[512];   /* the failure's message, from the thread that met it */
};

/*
 * The next claim: the first marked unit at or after the cursor and the
 * marked ones after it, at most a chunk.  *RET_SKIPPED: the clean bytes the
 * cursor jumped over (to the end when nothing is left).  False when the
 * pass is over.
 */
static bool claim(struct pass *ps, uint64_t *ret_off, uint64_t *ret_end, uint64_t *ret_skipped) {
        dc_block_copy *bc = ps->bc;
        uint64_t u = bc->p.unit, i, n = 0;
        bool marked;

        *ret_skipped = 0;
        pthread_mutex_lock(&bc->lock);
        if (ps->r < 0 || ps->stop || ps->cursor >= bc->size) {
                pthread_mutex_unlock(&bc->lock);
                return false;
        }
        i = dc_bitmap_next(&bc->bitmap, ps->cursor / u);
        if (i < bc->bitmap.nbits)
                n = dc_bitmap_run(&bc->bitmap, i, MAX(bc->p.chunk / u, 1), &marked);
        *ret_off = MIN(i * u, bc->size);
        *ret_end = MIN((i + n) * u, bc->size);
        *ret_skipped = *ret_off - ps->cursor;
        ps->cursor = *ret_end;
        pthread_mutex_unlock(&bc->lock);
        return n > 0;
}

/* One request of a claim at *OFF (up to END), with the owner's hooks around it; advances *OFF.
 * < 0: failed, > 0: the owner ended the pass. */
static int request(struct pass *ps, uint8_t *buf, uint64_t *off, uint64_t end) {
        dc_block_copy *bc = ps->bc;
        const struct dc_block_copy_hooks *h = bc->p.hooks;
        struct dc_range_lock rl;
        struct step st = { 0 };
        bool turn = h->turn_take(bc->p.opaque);
        int r;

        r = h->pause(bc->p.opaque, 0, 0);
        if (r != 0)
                goto out;
        if (!bc->p.read)
                dc_disk_range_lock(bc->p.disk, &rl, *off, end - *off);
        r = step(bc, buf, *off, end - *off, &st);
        if (!bc->p.read)
                dc_disk_range_unlock(bc->p.disk, &rl);
        if (r < 0) {
                r = h->error(bc->p.opaque, r, st.read_error);
                if (r != 1)
                        goto out; /* 0: stopped and resumed, the request is tried again */
                st.copied = false; /* ignored: skipped, and done */
                units_done(bc, *off, st.done);
        }
        r = h->pause(bc->p.opaque, st.done, st.copied ? st.done : 0);
        if (r >= 0)
                *off += st.done;
out:
        h->turn_give(bc->p.opaque, turn);
        return r;
}

struct worker {
        struct pass *ps;
        uint8_t *buf; /* the engine's, or NULL: one of its own */
        pthread_t th;
};

/* Claim units and copy them until none is left, something failed, or the owner ended the pass. */
static void *worker(void *p) {
        struct worker *w = p;
        struct pass *ps = w->ps;
        dc_block_copy *bc = ps->bc;
        _cleanup_free_ uint8_t *own = w->buf ? NULL : dc_io_buffer(bc->p.chunk);
        uint8_t *buf = w->buf ? w->buf : own;
        int r = buf ? 0 : dc_error(ENOMEM, "out of memory");

        while (r == 0) {
                uint64_t off = 0, end = 0, skipped;
                bool more = claim(ps, &off, &end, &skipped);

                if (skipped)
                        r = bc->p.hooks->pause(bc->p.opaque, skipped, 0);
                if (!more)
                        break;
                while (off < end && r == 0)
                        r = request(ps, buf, &off, end);
        }
        if (r != 0) {
                pthread_mutex_lock(&bc->lock);
                if (r > 0)
                        ps->stop = true;
                else if (ps->r >= 0) {
                        ps->r = r;
                        snprintf(ps->why, sizeof ps->why, "%s", dc_get_error());
                }
                pthread_mutex_unlock(&bc->lock);
        }
        return NULL;
}

int dc_block_copy_pass(dc_block_copy *bc) {
        struct pass ps = { .bc = bc };
        struct worker w[DC_COPY_MAX_WORKERS];
        uint64_t marked = MIN(dc_block_copy_dirty(bc), bc->size);
        unsigned n = 0;

        if (!bc->buf && !(bc->buf = dc_io_buffer(bc->p.chunk)))
                return dc_error(ENOMEM, "out of memory");
        /* helpers only while there is a chunk for each */
        while (n + 1 < bc->p.workers && (uint64_t) (n + 1) * bc->p.chunk < marked) {
                w[n + 1] = (struct worker){ .ps = &ps };
                if (pthread_create(&w[n + 1].th, NULL, worker, &w[n + 1]) != 0)
                        break;
                n++;
        }
        w[0] = (struct worker){ .ps = &ps, .buf = bc->buf };
        worker(&w[0]);
        for (; n > 0; n--)
                pthread_join(w[n].th, NULL);
        if (ps.r < 0)
                return dc_error(-ps.r, "%s", ps.why);
        return 0;
}

/* --- copies outside a pass ----------------------------------------------------------- */

int dc_block_copy_range(dc_block_copy *bc, uint64_t off, uint64_t len, bool locked, bool *ret_read_error) {
        uint64_t u = bc->p.unit, i = off / u, end;
        _cleanup_free_ uint8_t *buf = NULL;
        int r = 0;

        if (!len || off >= bc->size)
                return 0;
        end = DIV_ROUND_UP(MIN(off + len, bc->size), u);
        while (i < end && r >= 0) {
                struct dc_range_lock rl;
                uint64_t n, a, l;
                bool marked, read_error;

                pthread_mutex_lock(&bc->lock);
                n = dc_bitmap_run(&bc->bitmap, i, MIN(end - i, MAX(bc->p.chunk / u, 1)), &marked);
                pthread_mutex_unlock(&bc->lock);
                if (marked) {
                        a = i * u;
                        l = MIN(n * u, bc->size - a);
                        if (!buf && !(buf = dc_io_buffer(MAX(bc->p.chunk, u))))
                                return dc_error(ENOMEM, "out of memory");
                        if (!locked && !bc->p.read)
                                dc_disk_range_lock(bc->p.disk, &rl, a, l);
                        r = copy(bc, buf, a, l, &read_error);
                        if (r >= 0)
                                units_done(bc, a, l);
                        if (!locked && !bc->p.read)
                                dc_disk_range_unlock(bc->p.disk, &rl);
                        if (r < 0 && ret_read_error)
                                *ret_read_error = read_error;
                }
                i += n;
        }
        return r;
}

int dc_block_copy_flush(dc_block_copy *bc) {
        return dc_image_flush(bc->p.target);
}

/* --- life ----------------------------------------------------------------------------- */

int dc_block_copy_new(const struct dc_block_copy_params *p, dc_block_copy **ret) {
        dc_block_copy *bc = calloc(1, sizeof *bc);

        if (!bc)
                return dc_error(ENOMEM, "out of memory");
        bc->p = *p;
        if (!bc->p.chunk)
                bc->p.chunk = DC_COPY_CHUNK;
        if (!bc->p.unit)
                bc->p.unit = bc->p.chunk;
        bc->p.workers = p->workers ? MIN(p->workers, DC_COPY_MAX_WORKERS) : DC_COPY_WORKERS;
        bc->size = p->source->virtual_size;
        if (dc_bitmap_init(&bc->bitmap, DIV_ROUND_UP(bc->size, bc->p.unit)) < 0) {
                free(bc);
                return dc_error(ENOMEM, "out of memory");
        }
        pthread_mutex_init(&bc->lock, NULL);
        /* the target takes the data as the cache option says, from now to the engine's end */
        dc_image_job_cache(bc->p.target, bc->p.cache, true);
        *ret = bc;
        return 0;
}

dc_block_copy *dc_block_copy_free(dc_block_copy *bc) {
        if (!bc)
                return NULL;
        dc_image_job_cache(bc->p.target, bc->p.cache, false); /* a layer the writers keep: as before */
        dc_bitmap_release(&bc->bitmap);
        pthread_mutex_destroy(&bc->lock);
        free(bc->buf);
        free(bc);
        return NULL;
}
