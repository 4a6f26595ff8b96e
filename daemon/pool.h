/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/*
 * pool.c — a bounded pool of threads whose results come back to an sd_event
 * loop.  It knows nothing of what the items do (the daemon's work layer,
 * work.c, is built on it); it depends on glib and sd-event only.
 */

#include <glib.h>
#include <stdbool.h>
#include <systemd/sd-event.h>

typedef struct Pool Pool;
typedef struct PoolItem PoolItem;
typedef void (*pool_fn)(PoolItem *item);

/* Embedded in the caller's own item (recovered with container_of). */
struct PoolItem {
        pool_fn run;     /* on a pool thread */
        pool_fn done;    /* then on the loop thread (may be NULL) */
        pool_fn drop;    /* instead of done when the pool is freed first (may be NULL) */
        GList link;      /* the pool's */
};

/*
 * A pool of WORKERS threads that take any item, and RESERVED threads that
 * take urgent items only, so that urgent items never wait behind a full
 * pool of ordinary ones.  Finished items are handed back on EVENT's loop
 * through an eventfd.
 */
int pool_new(sd_event *event, unsigned workers, unsigned reserved, Pool **ret);
/* Queue ITEM (never fails: the item carries its own link). */
void pool_submit(Pool *p, PoolItem *item, bool urgent);
/*
 * Wait for the items that run to finish their run, join the threads, and
 * drop (item->drop, on the calling thread) every item whose done did not
 * run: those that waited (never run) and those finished but not yet handed
 * back.  No done runs from here.  Accepts NULL; returns NULL.
 */
Pool *pool_free(Pool *p);
