/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Copy-before-write: a filter on a disk's write path over a copy engine
 * (QEMU's block/copy-before-write.c, which backup inserts above its source).
 *
 * Design notes
 * ------------
 * - Before a guest write (or zero write, or discard) reaches the chain, the
 *   units it touches that the engine still marks are copied into the
 *   engine's target: their data as of the moment they were marked (a
 *   backup marks at its start, with the disk quiesced).  The engine clears
 *   them, so the background pass passes over them later.
 * - The filter's align is the engine's unit, so the write's range lock
 *   covers whole units: the background pass's request for the same units
 *   waits for the write, or the write for it, and a unit is never copied
 *   after the guest changed it.
 * - A failed copy fails the guest's write (QEMU's default on-cbw-error,
 *   break-guest-write): the target stays a true point in time, and the
 *   guest sees an I/O error instead of a silently wrong backup.  With
 *   break-snapshot (a fleecing export's choice) the write goes on and the
 *   owner is told that its point in time is lost.  With a time limit
 *   (cbw-timeout) the copy runs on a helper thread and the writer waits
 *   for it at most that long; a copy that takes longer counts as failed,
 *   and may still finish behind the writer's back (the detach waits).  Copies
 *   are neither throttled nor paused (QEMU does not throttle them either):
 *   a guest write must not wait for the job's speed limit.
 * - Locking: runs on the writer's thread with the write's range lock held;
 *   takes the engine's and the images' locks through the engine.
 */

#include <stdio.h>
#include <time.h>

#include "block-copy.h"

struct dc_cbw {
        struct dc_disk_filter filter;
        dc_disk *disk;
        dc_block_copy *copy;
        char *owner;
        void (*broken)(void *userdata, const char *why); /* break-snapshot, else NULL */
        void *userdata;
        unsigned timeout_ms;    /* cbw-timeout, 0 = none */
        pthread_mutex_t lock;   /* helpers, and each call's fields */
        pthread_cond_t cond;
        unsigned helpers;       /* copies on a helper thread not finished yet */
};

/* One copy under a time limit: on a helper thread, which may outlive the write that waited for it. */
struct cbw_call {
        dc_cbw *c;
        uint64_t off, len;
        int r, refs;
        bool done;
        char why[512];
};

static void call_unref_locked(struct cbw_call *k) {
        if (--k->refs == 0)
                free(k);
}

static void *cbw_helper(void *p) {
        struct cbw_call *k = p;
        dc_cbw *c = k->c;
        int r = dc_block_copy_range(c->copy, k->off, k->len, true, NULL);

        pthread_mutex_lock(&c->lock);
        k->r = r;
        if (r < 0)
                snprintf(k->why, sizeof k->why, "%s", dc_get_error());
        k->done = true;
        c->helpers--;
        pthread_cond_broadcast(&c->cond);
        call_unref_locked(k);
        pthread_mutex_unlock(&c->lock);
        return NULL;
}

/*
 * The copy of [OFF, OFF+LEN), given up after the time limit: the writer
 * goes on (its write fails, or the snapshot breaks) while the copy may
 * still finish on its helper (the filter's detach waits for it).  WHY gets
 * the reason of a failure.
 */
static int copy_timed(dc_cbw *c, uint64_t off, uint64_t len, char *why, size_t why_size) {
        struct cbw_call *k = calloc(1, sizeof *k);
        struct timespec deadline;
        pthread_attr_t a;
        pthread_t t;
        int r;

        if (!k)
                return snprintf(why, why_size, "out of memory"), -ENOMEM;
        *k = (struct cbw_call){ .c = c, .off = off, .len = len, .refs = 2 };
        pthread_mutex_lock(&c->lock);
        c->helpers++;
        pthread_mutex_unlock(&c->lock);
        pthread_attr_init(&a);
        pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
        r = -pthread_create(&t, &a, cbw_helper, k);
        pthread_attr_destroy(&a);
        if (r < 0) {
                /* no thread: the copy here, without the limit */
                free(k);
                pthread_mutex_lock(&c->lock);
                c->helpers--;
                pthread_mutex_unlock(&c->lock);
                r = dc_block_copy_range(c->copy, off, len, true, NULL);
                if (r < 0)
                        snprintf(why, why_size, "%s", dc_get_error());
                return r;
        }
        clock_gettime(CLOCK_MONOTONIC, &deadline);
        deadline.tv_sec += c->timeout_ms / 1000;
        deadline.tv_nsec += (long) (c->timeout_ms % 1000) * 1000000L;
        if (deadline.tv_nsec >= 1000000000L) {
                deadline.tv_sec++;
                deadline.tv_nsec -= 1000000000L;
        }
        pthread_mutex_lock(&c->lock);
        while (!k->done && pthread_cond_timedwait(&c->cond, &c->lock, &deadline) != ETIMEDOUT)
                ;
        if (k->done) {
                r = k->r;
                snprintf(why, why_size, "%s", k->why);
        } else {
                r = -ETIMEDOUT;
                snprintf(why, why_size, "it took longer than the %u ms of cbw-timeout", c->timeout_ms);
        }
        call_unref_locked(k);
        pthread_mutex_unlock(&c->lock);
        return r;
}

static int cbw_before_write(struct dc_disk_filter *f, uint64_t off, uint64_t len) {
        dc_cbw *c = container_of(f, dc_cbw, filter);
        char why[512];
        int r;

        if (c->timeout_ms)
                r = copy_timed(c, off, len, why, sizeof why);
        else {
                r = dc_block_copy_range(c->copy, off, len, true, NULL);
                if (r < 0)
                        snprintf(why, sizeof why, "%s", dc_get_error());
        }
        if (r >= 0)
                return 0;
        if (c->broken) {
                /* the guest's write goes on; the point in time is what breaks */
                c->broken(c->userdata, why);
                dc_error_clear();
                return 0;
        }
        return dc_error(-r, "copy-before-write for %s failed: %s", c->owner, why);
}

static const struct dc_disk_filter_ops cbw_ops = {
        .name = "copy-before-write",
        .before_write = cbw_before_write,
};

int dc_cbw_attach(dc_disk *disk, dc_block_copy *bc, uint64_t unit, const char *owner, dc_cbw **ret) {
        dc_cbw *c = calloc(1, sizeof *c);
        int r;

        if (!c || !(c->owner = strdup(owner))) {
                free(c);
                return dc_error(ENOMEM, "out of memory");
        }
        c->filter = (struct dc_disk_filter){ .ops = &cbw_ops, .align = unit };
        c->disk = disk;
        c->copy = bc;
        pthread_mutex_init(&c->lock, NULL);
        {
                pthread_condattr_t ca;
                pthread_condattr_init(&ca);
                pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
                pthread_cond_init(&c->cond, &ca);
                pthread_condattr_destroy(&ca);
        }
        r = dc_disk_attach_filter(disk, &c->filter);
        if (r < 0) {
                pthread_mutex_destroy(&c->lock);
                pthread_cond_destroy(&c->cond);
                free(c->owner);
                free(c);
                return r;
        }
        *ret = c;
        return 0;
}

void dc_cbw_set_break_snapshot(dc_cbw *c, void (*broken)(void *userdata, const char *why), void *userdata) {
        c->broken = broken;
        c->userdata = userdata;
}

void dc_cbw_set_timeout(dc_cbw *c, unsigned timeout_ms) {
        c->timeout_ms = timeout_ms;
}

dc_cbw *dc_cbw_detach(dc_cbw *c) {
        if (!c)
                return NULL;
        dc_disk_detach_filter(c->disk, &c->filter);
        /* copies given up on may still run: the engine must outlive them */
        pthread_mutex_lock(&c->lock);
        while (c->helpers)
                pthread_cond_wait(&c->cond, &c->lock);
        pthread_mutex_unlock(&c->lock);
        pthread_mutex_destroy(&c->lock);
        pthread_cond_destroy(&c->cond);
        free(c->owner);
        free(c);
        return NULL;
}
