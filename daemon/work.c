/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The daemon's work: everything that touches a file runs on the pool of
 * threads (pool.c, Workers= in diskchain.conf), never on the event loop.
 * This layer is what the daemon adds to the pool's items.
 *
 * Design notes
 * ------------
 * - A client's operation (a call that creates, checks, maps, resizes,
 *   deletes, starts a job ...) counts against MaxOperations (like
 *   machined's cap on operations) from submission until its done has run,
 *   and a call beyond it is refused with LimitsExceeded instead of piling
 *   up threads or memory.
 * - Internal work (reading files again for the model, the look at the
 *   locks, freeing a finished job) is never refused: it is bounded by how
 *   it is scheduled.  It is the pool's urgent kind, with a thread of its own
 *   besides the workers, so that calls waiting for the model to be read
 *   again never wait behind the clients' long operations (a 4 GiB
 *   preallocation on every worker).
 * - On the thread, after run: the paths the work changed are read again
 *   (refresh), and the registry's records are made durable.  The library's
 *   error message is per thread: run captures it (work_capture_error) for
 *   the reply.
 * - Back on the loop, in this order: the holds are given back, what was
 *   read is applied to the model, done answers the call, the operation
 *   stops counting.  So done sees the model as the work left it.
 * - Paths held (holds) are images our own work opens read-write: held from
 *   submission to done, they do not show as InUse "external" meanwhile
 *   (claims.c counts them).
 * - At exit the pool drops what waits: no done runs, the calls are not
 *   answered (the bus goes away with us).
 */

#include <errno.h>
#include <stddef.h>
#include <stdio.h>

#include "daemon.h"

#define WORK(it) ((Work *) ((char *) (it) - offsetof(Work, item)))

void work_capture_error(Work *w, int r) {
        w->r = r;
        if (r < 0) {
                free(w->error);
                w->error = strdup(dc_get_error());
        }
}

static void work_free(Work *w) {
        if (w->free_data)
                w->free_data(w->data);
        if (w->scan)
                g_ptr_array_unref(w->scan);
        g_strfreev(w->refresh);
        g_strfreev(w->holds);
        sd_bus_message_unref(w->m);
        free(w->error);
        free(w);
}

static void work_run(PoolItem *it) {
        Work *w = WORK(it);

        dc_error_clear();
        if (w->run)
                w->run(w);
        if (w->refresh)
                w->scan = model_read_paths(w->mgr, w->refresh);
        registry_sync(w->mgr->registry);
}

static void work_done(PoolItem *it) {
        Work *w = WORK(it);
        Manager *mgr = w->mgr;

        if (w->holds)
                claims_hold(mgr->claims, w->holds, -1);
        if (w->scan)
                model_apply(mgr, w->scan);
        if (w->done)
                w->done(w);
        if (w->operation)
                mgr->operations--;
        work_free(w);
}

static void work_drop(PoolItem *it) {
        work_free(WORK(it));
}

int workers_setup(Manager *mgr) {
        /* the workers, and one more thread for internal work only */
        return pool_new(mgr->event, mgr->config.workers, 1, &mgr->pool);
}

void workers_free(Manager *mgr) {
        mgr->pool = pool_free(mgr->pool);
}

Work *work_new(Manager *mgr, work_fn run, work_fn done, void *data, void (*free_data)(void *)) {
        Work *w = calloc(1, sizeof *w);

        if (!w) {
                if (free_data)
                        free_data(data);
                return NULL;
        }
        w->mgr = mgr;
        w->run = run;
        w->done = done;
        w->data = data;
        w->free_data = free_data;
        w->item = (PoolItem){ .run = work_run, .done = work_done, .drop = work_drop };
        return w;
}

int work_submit(Work *w, sd_bus_message *m) {
        Manager *mgr = w->mgr;

        if (m) {
                if (mgr->operations >= mgr->config.max_operations) {
                        log_debug("refusing a call: %u operations are queued or running (MaxOperations)",
                                  mgr->operations);
                        work_free(w);
                        return sd_bus_reply_method_errorf(m, ERROR_PREFIX "LimitsExceeded",
                                                          "%u operations are queued or running already "
                                                          "(MaxOperations); try again later", mgr->operations);
                }
                w->m = sd_bus_message_ref(m);
                w->operation = true;
                mgr->operations++;
        }
        if (w->holds)
                claims_hold(mgr->claims, w->holds, +1);
        pool_submit(mgr->pool, &w->item, !w->operation);
        return 0;
}

int work_submit_long(Work *w) {
        if (w->holds)
                claims_hold(w->mgr->claims, w->holds, +1);
        pool_submit(w->mgr->pool, &w->item, false);
        return 0;
}

int work_start(Manager *mgr, sd_bus_message *m, work_fn run, work_fn done, void *data, void (*free_data)(void *)) {
        Work *w = work_new(mgr, run, done, data, free_data);
        if (!w)
                return -ENOMEM;
        return work_submit(w, m);
}
