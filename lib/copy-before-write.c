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
 *   owner is told that its point in time is lost.  Copies
 *   are neither throttled nor paused (QEMU does not throttle them either):
 *   a guest write must not wait for the job's speed limit.
 * - Locking: runs on the writer's thread with the write's range lock held;
 *   takes the engine's and the images' locks through the engine.
 */

#include <stdio.h>

#include "block-copy.h"

struct dc_cbw {
        struct dc_disk_filter filter;
        dc_disk *disk;
        dc_block_copy *copy;
        char *owner;
        void (*broken)(void *userdata, const char *why); /* break-snapshot, else NULL */
        void *userdata;
};

static int cbw_before_write(struct dc_disk_filter *f, uint64_t off, uint64_t len) {
        dc_cbw *c = container_of(f, dc_cbw, filter);
        char why[512];
        int r;

        r = dc_block_copy_range(c->copy, off, len, true, NULL);
        if (r >= 0)
                return 0;
        snprintf(why, sizeof why, "%s", dc_get_error());
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
        r = dc_disk_attach_filter(disk, &c->filter);
        if (r < 0) {
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

dc_cbw *dc_cbw_detach(dc_cbw *c) {
        if (!c)
                return NULL;
        dc_disk_detach_filter(c->disk, &c->filter);
        free(c->owner);
        free(c);
        return NULL;
}
