/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The write path of one open chain: what QEMU calls the BlockBackend, with
 * room for the one filter a block job inserts above it (copy-before-write
 * for backup, mirror_top for mirror and active commit).
 *
 * Design notes
 * ------------
 * - Writers (the NBD exports of a later issue, the library tests' in-process
 *   writer) call dc_disk_read/write/write_zeroes/discard/flush.  They never
 *   hold a dc_image of the chain themselves, so a job can swap the chain
 *   under them at a pivot.
 * - Every guest request is counted in flight; dc_disk_quiesce() stops new
 *   requests at the door and waits for the ones inside (QEMU's drain).  A
 *   pivot, a reopen and attaching/detaching a job happen quiesced.
 * - Guest writes take a range lock over their range, widened to the job's
 *   alignment (its cluster size), for the time of the hook and the write.
 *   Jobs take the same lock over each chunk they read and write, so a
 *   chunk of a job and a guest write to the same clusters never interleave:
 *   copy-before-write sees the old data of whole clusters, a stream never
 *   copies backing data over a newer guest write, and a mirror's background
 *   copy never lands after a synchronous (write-blocking) copy of newer data.
 * - One job at a time is attached (the daemon refuses overlapping jobs as
 *   Busy); its hooks run on the writer's thread with the range lock held.
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
        const struct dc_disk_hooks *hooks;
        void *hook_data;
        uint64_t align;          /* range-lock granularity of guest writes */
};

DC_EXPORT int dc_disk_open(const char *path, const struct dc_open_options *opts, dc_disk **ret) {
        dc_disk *d = calloc(1, sizeof *d);
        int r;

        if (!d)
                return dc_error(ENOMEM, "out of memory");
        if (opts)
                d->oo = *opts;
        if (d->oo.roots) {
                d->roots = dc_strv_copy(d->oo.roots);
                if (!d->roots) {
                        free(d);
                        return dc_error(ENOMEM, "out of memory");
                }
                d->oo.roots = (const char *const *) d->roots;
        }
        /* only the layer list of the first open is the caller's; later reopens choose their own */
        d->oo.writable_layer = NULL;
        d->oo.writable_layers = NULL;
        r = dc_image_open(path, opts, &d->img);
        if (r < 0) {
                dc_strv_free(d->roots);
                free(d);
                return r;
        }
        pthread_mutex_init(&d->lock, NULL);
        pthread_cond_init(&d->cond, NULL);
        d->refs = 1;
        d->align = 1;
        *ret = d;
        return 0;
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
        s = d->img->virtual_size;
        pthread_mutex_unlock(&d->lock);
        return s;
}

DC_EXPORT char *dc_disk_top_path(dc_disk *d) {
        char *p;
        pthread_mutex_lock(&d->lock);
        p = strdup(d->img->path);
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

const struct dc_open_options *dc_disk_open_options(dc_disk *d) {
        return &d->oo;
}

int dc_disk_attach(dc_disk *d, const struct dc_disk_hooks *hooks, void *data, uint64_t align) {
        int r = 0;

        dc_disk_quiesce(d);
        pthread_mutex_lock(&d->lock);
        if (d->hooks)
                r = dc_error(EBUSY, "'%s' already has a job attached", d->img->path);
        else {
                d->hooks = hooks;
                d->hook_data = data;
                d->align = align ? align : 1;
        }
        pthread_mutex_unlock(&d->lock);
        dc_disk_unquiesce(d);
        return r;
}

void dc_disk_detach(dc_disk *d, void *data) {
        dc_disk_quiesce(d);
        pthread_mutex_lock(&d->lock);
        if (d->hook_data == data) {
                d->hooks = NULL;
                d->hook_data = NULL;
                d->align = 1;
        }
        pthread_mutex_unlock(&d->lock);
        dc_disk_unquiesce(d);
}

/* Replace the chain (quiesced by the caller).  The old chain is the caller's. */
dc_image *dc_disk_swap_chain(dc_disk *d, dc_image *img) {
        dc_image *old;
        pthread_mutex_lock(&d->lock);
        old = d->img;
        d->img = img;
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
                d->img = img;
                return dc_error(-r, "%s", saved);
        }
        d->img = img;
        return 0;
}

/* --- guest I/O ------------------------------------------------------------------ */

enum { OP_WRITE, OP_ZERO, OP_DISCARD };

static int guest_modify(dc_disk *d, int op, const void *buf, uint64_t off, uint64_t len, unsigned flags) {
        struct dc_range_lock rl;
        const struct dc_disk_hooks *h;
        void *hd;
        uint64_t a, lo, hi;
        int r = 0;

        enter(d);
        pthread_mutex_lock(&d->lock);
        h = d->hooks;
        hd = d->hook_data;
        a = d->align;
        pthread_mutex_unlock(&d->lock);
        if (!d->img) {
                leave(d);
                return dc_error(EIO, "the disk's chain could not be reopened");
        }
        lo = ALIGN_DOWN(off, a);
        hi = MIN(ALIGN_UP(off + len, a), MAX(d->img->virtual_size, off + len));
        dc_disk_range_lock(d, &rl, lo, hi - lo);
        if (h && h->before_write)
                r = h->before_write(hd, off, len);
        if (r >= 0) {
                if (op == OP_WRITE)
                        r = dc_image_write(d->img, buf, off, (size_t) len);
                else if (op == OP_ZERO)
                        r = dc_image_write_zeroes(d->img, off, len, flags);
                else
                        r = dc_image_discard(d->img, off, len);
        }
        if (r >= 0 && h && h->after_write)
                h->after_write(hd, off, len);
        dc_disk_range_unlock(d, &rl);
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

DC_EXPORT int dc_disk_flush(dc_disk *d) {
        int r;
        enter(d);
        r = d->img ? dc_image_flush(d->img) : dc_error(EIO, "the disk's chain could not be reopened");
        leave(d);
        return r;
}
