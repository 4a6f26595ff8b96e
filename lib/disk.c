/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The write path of one open chain: what QEMU calls the BlockBackend, with
 * an ordered stack of filters above the chain (QEMU's filter nodes:
 * copy-before-write for backup, mirror_top for mirror and active commit,
 * later dirty bitmaps and whatever an NBD export needs).
 *
 * Design notes
 * ------------
 * - Writers (the NBD exports of a later issue, the library tests' in-process
 *   writer) call dc_disk_read/write/write_zeroes/discard/flush.  They never
 *   hold a dc_image of the chain themselves, so a job can swap the chain
 *   under them at a pivot.
 * - Every guest request is counted in flight; dc_disk_quiesce() stops new
 *   requests at the door and waits for the ones inside (QEMU's drain).  A
 *   pivot and a reopen happen quiesced, and so does whatever must see the
 *   disk at one point in time (a backup attaching its filter and measuring
 *   what it will copy).
 * - Filters form a stack, the last attached on top.  A write passes down
 *   through every filter's before_write (top first), reaches the chain, and
 *   passes back up through every after_write (bottom first), as a request
 *   passes a stack of QEMU filter nodes.  A before_write that fails fails
 *   the write: the filters below it and the chain never see it, and no
 *   after_write runs.  after_write runs only for writes that succeeded.
 * - Attach and detach do not drain the disk: writers keep running.  Each
 *   write takes a snapshot of the stack when it enters and counts itself a
 *   user of every filter in it; a write that entered before an attach does
 *   not run the new filter (who needs it to, quiesces around the attach),
 *   and dc_disk_detach_filter() returns only when no write is running the
 *   filter's hooks any more, so its owner may free it then.  Detach must
 *   not be called from a hook, nor while holding a range lock.
 * - Guest writes take a range lock over their range, widened to whole units
 *   of every filter in their snapshot (the filter's align: a backup's
 *   cluster, a mirror's granularity), for the time of the hooks and the
 *   write.  Jobs take the same lock over each chunk they read and write, so
 *   a chunk of a job and a guest write to the same units never interleave:
 *   copy-before-write sees the old data of whole clusters, a stream never
 *   copies backing data over a newer guest write, and a mirror's background
 *   copy never lands after a synchronous (write-blocking) copy of newer data.
 *   Hooks run on the writer's thread with that range lock held.
 */

#include <fcntl.h>
#include <stdio.h>

#include "dc-internal.h"

struct dc_disk {
        pthread_mutex_t lock;
        pthread_cond_t cond;
        unsigned refs;
        dc_image *img;           /* the chain; top is the active layer */
        struct dc_open_options oo;
        char **roots;            /* owned copy of oo.roots */
        unsigned in_flight;      /* guest requests inside */
        unsigned quiesced;       /* > 0: new guest requests wait at the door */
        struct dc_range *ranges; /* held range locks */
        struct dc_disk_filter *filters; /* the stack, top first */
        unsigned nfilters;
        int cache;               /* DC_CACHE_*, for every layer of img */
};

/* The disk's cache mode on every layer of IMG. */
static void chain_cache(dc_image *img, int mode) {
        for (dc_image *l = img; l; l = l->backing)
                if (!dc_image_is_remote(l))
                        dc_image_cache_none(l, mode == DC_CACHE_NONE);
}

DC_EXPORT void dc_disk_set_cache(dc_disk *d, int mode) {
        pthread_mutex_lock(&d->lock);
        d->cache = mode;
        chain_cache(d->img, mode);
        pthread_mutex_unlock(&d->lock);
}

DC_EXPORT int dc_disk_new(dc_image *chain, const struct dc_open_options *opts, dc_disk **ret) {
        dc_disk *d = calloc(1, sizeof *d);

        if (!d) {
                dc_image_close(chain);
                return dc_error(ENOMEM, "out of memory");
        }
        if (opts)
                d->oo = *opts;
        if (d->oo.roots) {
                d->roots = dc_strv_copy(d->oo.roots);
                if (!d->roots) {
                        dc_image_close(chain);
                        free(d);
                        return dc_error(ENOMEM, "out of memory");
                }
                d->oo.roots = (const char *const *) d->roots;
        }
        /* only the layer list of the first open is the caller's; later reopens choose their own */
        d->oo.writable_layer = NULL;
        d->oo.writable_layers = NULL;
        d->img = chain;
        pthread_mutex_init(&d->lock, NULL);
        pthread_cond_init(&d->cond, NULL);
        d->refs = 1;
        *ret = d;
        return 0;
}

DC_EXPORT int dc_disk_open(const char *path, const struct dc_open_options *opts, dc_disk **ret) {
        dc_image *img = NULL;
        int r;

        r = dc_image_open(path, opts, &img);
        if (r < 0)
                return r;
        return dc_disk_new(img, opts, ret);
}

DC_EXPORT dc_disk *dc_disk_ref(dc_disk *d) {
        pthread_mutex_lock(&d->lock);
        d->refs++;
        pthread_mutex_unlock(&d->lock);
        return d;
}

DC_EXPORT dc_disk *dc_disk_unref(dc_disk *d) {
        unsigned left;

        if (!d)
                return NULL;
        pthread_mutex_lock(&d->lock);
        left = --d->refs;
        pthread_mutex_unlock(&d->lock);
        if (left)
                return NULL;
        dc_image_close(d->img);
        dc_strv_free(d->roots);
        pthread_mutex_destroy(&d->lock);
        pthread_cond_destroy(&d->cond);
        free(d);
        return NULL;
}

DC_EXPORT uint64_t dc_disk_size(dc_disk *d) {
        uint64_t s;
        pthread_mutex_lock(&d->lock);
        s = d->img ? d->img->virtual_size : 0;
        pthread_mutex_unlock(&d->lock);
        return s;
}

DC_EXPORT char *dc_disk_top_path(dc_disk *d) {
        char *p;
        pthread_mutex_lock(&d->lock);
        /* NULL (as out of memory) while a reopen or a snapshot has no chain open */
        p = d->img ? strdup(d->img->path) : NULL;
        pthread_mutex_unlock(&d->lock);
        return p;
}

/* --- the door: in-flight counting and quiescing ------------------------------- */

static void enter(dc_disk *d) {
        pthread_mutex_lock(&d->lock);
        while (d->quiesced)
                pthread_cond_wait(&d->cond, &d->lock);
        d->in_flight++;
        pthread_mutex_unlock(&d->lock);
}

static void leave(dc_disk *d) {
        pthread_mutex_lock(&d->lock);
        d->in_flight--;
        pthread_cond_broadcast(&d->cond);
        pthread_mutex_unlock(&d->lock);
}

void dc_disk_quiesce(dc_disk *d) {
        pthread_mutex_lock(&d->lock);
        d->quiesced++;
        while (d->in_flight)
                pthread_cond_wait(&d->cond, &d->lock);
        pthread_mutex_unlock(&d->lock);
}

void dc_disk_unquiesce(dc_disk *d) {
        pthread_mutex_lock(&d->lock);
        d->quiesced--;
        pthread_cond_broadcast(&d->cond);
        pthread_mutex_unlock(&d->lock);
}

/* --- range locks ---------------------------------------------------------------- */

void dc_disk_range_lock(dc_disk *d, struct dc_range_lock *rl, uint64_t off, uint64_t len) {
        struct dc_range *me = &rl->r;
        bool busy;

        me->off = off;
        me->end = off + len;
        pthread_mutex_lock(&d->lock);
        do {
                busy = false;
                for (struct dc_range *o = d->ranges; o; o = o->next)
                        if (o->off < me->end && me->off < o->end) {
                                busy = true;
                                break;
                        }
                if (busy)
                        pthread_cond_wait(&d->cond, &d->lock);
        } while (busy);
        me->next = d->ranges;
        d->ranges = me;
        pthread_mutex_unlock(&d->lock);
}

void dc_disk_range_unlock(dc_disk *d, struct dc_range_lock *rl) {
        pthread_mutex_lock(&d->lock);
        for (struct dc_range **p = &d->ranges; *p; p = &(*p)->next)
                if (*p == &rl->r) {
                        *p = rl->r.next;
                        break;
                }
        pthread_cond_broadcast(&d->cond);
        pthread_mutex_unlock(&d->lock);
}

/* --- jobs ----------------------------------------------------------------------- */

dc_image *dc_disk_chain(dc_disk *d) {
        return d->img;
}

DC_EXPORT dc_image *dc_disk_active(dc_disk *d) {
        return d->img;
}

const struct dc_open_options *dc_disk_open_options(dc_disk *d) {
        return &d->oo;
}

/* --- filters --------------------------------------------------------------------- */

int dc_disk_attach_filter(dc_disk *d, struct dc_disk_filter *f) {
        int r = 0;

        pthread_mutex_lock(&d->lock);
        if (f->disk)
                r = dc_error(EBUSY, "the filter '%s' is attached already", f->ops->name);
        else if (d->nfilters >= DC_DISK_MAX_FILTERS)
                r = dc_error(EBUSY, "'%s' has %u filters attached already", d->img ? d->img->path : "",
                             d->nfilters);
        else {
                f->disk = d;
                f->users = 0;
                f->next = d->filters;
                d->filters = f;
                d->nfilters++;
        }
        pthread_mutex_unlock(&d->lock);
        return r;
}

void dc_disk_detach_filter(dc_disk *d, struct dc_disk_filter *f) {
        pthread_mutex_lock(&d->lock);
        if (f->disk == d) {
                for (struct dc_disk_filter **p = &d->filters; *p; p = &(*p)->next)
                        if (*p == f) {
                                *p = f->next;
                                break;
                        }
                d->nfilters--;
                /* the writes that took it in their snapshot finish with it first */
                while (f->users)
                        pthread_cond_wait(&d->cond, &d->lock);
                f->disk = NULL;
                f->next = NULL;
        }
        pthread_mutex_unlock(&d->lock);
}

/* Replace the chain (quiesced by the caller).  The old chain is the caller's. */
dc_image *dc_disk_swap_chain(dc_disk *d, dc_image *img) {
        dc_image *old;
        pthread_mutex_lock(&d->lock);
        old = d->img;
        d->img = img;
        chain_cache(img, d->cache);
        pthread_mutex_unlock(&d->lock);
        return old;
}

/*
 * Reopen the chain with WRITABLE (NULL-terminated absolute paths) read-write
 * besides the top, as QEMU reopens base for a commit.  Quiesced by the
 * caller.  Every layer is closed and opened again: a second descriptor on a
 * file we already hold read-only would conflict with our own lock.  On
 * failure the chain is opened as it was.
 */
int dc_disk_reopen(dc_disk *d, const char *const *writable) {
        struct dc_open_options o = d->oo;
        _cleanup_free_ char *top = strdup(d->img->path);
        dc_image *img = NULL;
        int r;

        if (!top)
                return dc_error(ENOMEM, "out of memory");
        for (dc_image *l = d->img; l; l = l->backing)
                if ((r = dc_image_flush(l)) < 0)
                        return r;
        o.writable_layers = writable;
        pthread_mutex_lock(&d->lock);
        d->img = dc_image_close(d->img);
        pthread_mutex_unlock(&d->lock);
        r = dc_image_open(top, &o, &img);
        if (r < 0) {
                char saved[512];
                int rr;
                snprintf(saved, sizeof saved, "%s", dc_get_error());
                rr = dc_image_open(top, &d->oo, &img);
                if (rr < 0)
                        return rr; /* the chain is gone: every request fails from now on */
                (void) dc_disk_swap_chain(d, img);
                return dc_error(-r, "%s", saved);
        }
        (void) dc_disk_swap_chain(d, img);
        return 0;
}

DC_EXPORT int dc_disk_snapshot(dc_disk *d, const char *overlay) {
        _cleanup_free_ char *old_top = NULL;
        dc_image *img = NULL, *old;
        int r = 0;

        dc_disk_quiesce(d);
        pthread_mutex_lock(&d->lock);
        if (d->nfilters)
                r = dc_error(EBUSY, "'%s' has a job's filter attached", d->img ? d->img->path : "");
        pthread_mutex_unlock(&d->lock);
        if (r >= 0 && !d->img)
                r = dc_error(EIO, "the disk's chain could not be reopened");
        if (r >= 0 && !(old_top = strdup(d->img->path)))
                r = dc_error(ENOMEM, "out of memory");
        for (dc_image *l = r >= 0 ? d->img : NULL; l; l = l->backing)
                if ((r = dc_image_flush(l)) < 0)
                        break;
        if (r < 0) {
                dc_disk_unquiesce(d);
                return r;
        }
        /* our own descriptors on the old top would conflict with the overlay's open of it: close first */
        old = dc_disk_swap_chain(d, NULL);
        dc_image_close(old);
        r = dc_image_open(overlay, &d->oo, &img);
        if (r >= 0 && (!img->backing || strcmp(img->backing->path, old_top) != 0)) {
                r = dc_error(ESTALE, "'%s' is not an overlay of '%s'", overlay, old_top);
                img = dc_image_close(img);
        }
        if (r < 0) {
                char saved[512];
                int rr;
                snprintf(saved, sizeof saved, "%s", dc_get_error());
                rr = dc_image_open(old_top, &d->oo, &img);
                if (rr >= 0)
                        (void) dc_disk_swap_chain(d, img);
                dc_disk_unquiesce(d);
                return rr < 0 ? rr : dc_error(-r, "%s", saved);
        }
        (void) dc_disk_swap_chain(d, img);
        dc_disk_unquiesce(d);
        return 0;
}

/* --- guest I/O ------------------------------------------------------------------ */

enum { OP_WRITE, OP_ZERO, OP_DISCARD };

/* The filters a write runs, in stack order, each counted as in use until filters_put(). */
static unsigned filters_get(dc_disk *d, struct dc_disk_filter **v) {
        unsigned n = 0;

        pthread_mutex_lock(&d->lock);
        for (struct dc_disk_filter *f = d->filters; f; f = f->next) {
                f->users++;
                v[n++] = f;
        }
        pthread_mutex_unlock(&d->lock);
        return n;
}

static void filters_put(dc_disk *d, struct dc_disk_filter **v, unsigned n) {
        if (!n)
                return;
        pthread_mutex_lock(&d->lock);
        for (unsigned i = 0; i < n; i++)
                v[i]->users--;
        pthread_cond_broadcast(&d->cond);
        pthread_mutex_unlock(&d->lock);
}

static int guest_modify(dc_disk *d, int op, const void *buf, uint64_t off, uint64_t len, unsigned flags) {
        struct dc_disk_filter *f[DC_DISK_MAX_FILTERS];
        struct dc_range_lock rl;
        uint64_t lo = off, hi = off + len;
        unsigned n;
        int r = 0;

        enter(d);
        if (!d->img) {
                leave(d);
                return dc_error(EIO, "the disk's chain could not be reopened");
        }
        n = filters_get(d, f);
        /* whole units of every filter: each sees whole clusters of its own, and no copy of a job in between */
        for (unsigned i = 0; i < n; i++) {
                uint64_t a = f[i]->align ? f[i]->align : 1;
                lo = MIN(lo, ALIGN_DOWN(off, a));
                hi = MAX(hi, ALIGN_UP(off + len, a));
        }
        hi = MIN(hi, MAX(d->img->virtual_size, off + len));
        dc_disk_range_lock(d, &rl, lo, hi - lo);
        for (unsigned i = 0; i < n && r >= 0; i++)
                if (f[i]->ops->before_write)
                        r = f[i]->ops->before_write(f[i], off, len);
        if (r >= 0) {
                if (op == OP_WRITE)
                        r = dc_image_write(d->img, buf, off, (size_t) len);
                else if (op == OP_ZERO)
                        r = dc_image_write_zeroes(d->img, off, len, flags);
                else
                        r = dc_image_discard(d->img, off, len);
        }
        for (unsigned i = n; r >= 0 && i-- > 0;)
                if (f[i]->ops->after_write)
                        f[i]->ops->after_write(f[i], off, len);
        dc_disk_range_unlock(d, &rl);
        filters_put(d, f, n);
        leave(d);
        return r;
}

DC_EXPORT int dc_disk_write(dc_disk *d, const void *buf, uint64_t off, size_t len) {
        return guest_modify(d, OP_WRITE, buf, off, len, 0);
}

DC_EXPORT int dc_disk_write_zeroes(dc_disk *d, uint64_t off, uint64_t len, unsigned flags) {
        return guest_modify(d, OP_ZERO, NULL, off, len, flags);
}

DC_EXPORT int dc_disk_discard(dc_disk *d, uint64_t off, uint64_t len) {
        return guest_modify(d, OP_DISCARD, NULL, off, len, 0);
}

DC_EXPORT int dc_disk_read(dc_disk *d, void *buf, uint64_t off, size_t len) {
        int r;
        enter(d);
        r = d->img ? dc_image_read(d->img, buf, off, len) : dc_error(EIO, "the disk's chain could not be reopened");
        leave(d);
        return r;
}

/*
 * dc_chain_map through the door: how many pieces, with the disk entered
 * (as a guest read is, so that a pivot waits for the reads;
 * dc_disk_unmap_read once they are done), or 0 when the range is to be
 * read with dc_disk_read instead, which includes a disk quiesced or
 * quiescing: this never waits at the door, so a caller with mapped reads
 * outstanding cannot hold a quiesce up by waiting behind it.
 */
int dc_disk_map_read(dc_disk *d, const void *buf, uint64_t off, size_t len, struct dc_read_map *ret, unsigned max) {
        int r;

        pthread_mutex_lock(&d->lock);
        r = !d->quiesced && d->img && len && off <= d->img->virtual_size && len <= d->img->virtual_size - off;
        if (r)
                d->in_flight++;
        pthread_mutex_unlock(&d->lock);
        if (!r)
                return 0;
        r = dc_chain_map(d->img, buf, off, len, ret, max);
        if (r <= 0)
                leave(d);
        return r;
}

void dc_disk_unmap_read(dc_disk *d) {
        leave(d);
}

DC_EXPORT int dc_disk_flush(dc_disk *d) {
        int r;
        enter(d);
        r = d->img ? dc_image_flush(d->img) : dc_error(EIO, "the disk's chain could not be reopened");
        leave(d);
        return r;
}

DC_EXPORT int dc_disk_block_status(dc_disk *d, uint64_t off, uint64_t len, struct dc_extent *ret) {
        int r;
        enter(d);
        r = d->img ? dc_image_block_status(d->img, off, len, ret)
                   : dc_error(EIO, "the disk's chain could not be reopened");
        leave(d);
        return r;
}

DC_EXPORT unsigned dc_disk_depth(dc_disk *d) {
        unsigned n = 0;
        /* through the door, so that the count never mixes two chains around a pivot */
        enter(d);
        for (dc_image *l = d->img; l; l = l->backing)
                n++;
        leave(d);
        return n;
}
