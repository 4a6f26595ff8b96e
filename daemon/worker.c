/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Everything that touches a file runs on a bounded pool of worker threads
 * (Workers= in diskchain.conf), never on the event loop.  Work waits in a
 * queue; a client's operations (a call that creates, checks, maps,
 * resizes, deletes, starts a job ...) count against MaxOperations (like
 * machined's cap on operations), and a call beyond it is refused with
 * LimitsExceeded instead of piling up threads or memory.  Internal work
 * (reading files again for the model, the look at the locks, freeing a
 * finished job) is never refused: it is bounded by how it is scheduled.
 * It has a queue of its own and a thread of its own besides the workers,
 * so that calls waiting for the model to be read again never wait behind
 * the clients' long operations (a 4 GiB preallocation on every worker).
 *
 * A finished item comes back to the loop through an eventfd; only the loop
 * talks to the bus.  The loop never waits for a thread.
 */

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "daemon.h"

struct Pool {
        GMutex lock;
        GCond cond;
        GQueue queue;    /* clients' Work* waiting */
        GQueue internal; /* internal Work* waiting: taken first, and by a thread of its own */
        GQueue done;     /* Work* finished, for the loop */
        bool stop;
        unsigned n;
        pthread_t *threads;
};

typedef struct Thread {
        Manager *mgr;
        bool internal_only;
} Thread;

static Thread general = { 0 }, internal_thread = { 0 };

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

static void *worker_thread(void *p) {
        const Thread *t = p;
        Manager *mgr = t->mgr;
        struct Pool *pool = mgr->pool;
        uint64_t one = 1;

        for (;;) {
                Work *w;

                g_mutex_lock(&pool->lock);
                while (!pool->stop && g_queue_is_empty(&pool->internal) &&
                       (t->internal_only || g_queue_is_empty(&pool->queue)))
                        g_cond_wait(&pool->cond, &pool->lock);
                if (pool->stop) {
                        g_mutex_unlock(&pool->lock);
                        return NULL;
                }
                w = g_queue_pop_head(&pool->internal);
                if (!w)
                        w = g_queue_pop_head(&pool->queue);
                g_mutex_unlock(&pool->lock);

                dc_error_clear();
                if (w->run)
                        w->run(w);
                if (w->refresh)
                        w->scan = model_read_paths(mgr, w->refresh);
                registry_sync(mgr->registry);
                g_mutex_lock(&pool->lock);
                g_queue_push_tail(&pool->done, w);
                g_mutex_unlock(&pool->lock);
                (void) !write(mgr->notify_fd, &one, sizeof one);
        }
}

static int on_notify(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        Manager *mgr = userdata;
        uint64_t n;

        (void) !read(fd, &n, sizeof n);
        for (;;) {
                Work *w;
                g_mutex_lock(&mgr->pool->lock);
                w = g_queue_pop_head(&mgr->pool->done);
                g_mutex_unlock(&mgr->pool->lock);
                if (!w)
                        break;
                if (w->holds)
                        model_hold(mgr, w->holds, -1);
                if (w->scan)
                        model_apply(mgr, w->scan);
                if (w->done)
                        w->done(w);
                if (w->operation)
                        mgr->operations--;
                work_free(w);
        }
        return 0;
}

int workers_setup(Manager *mgr) {
        struct Pool *pool = calloc(1, sizeof *pool);
        int r;

        if (!pool)
                return -ENOMEM;
        mgr->pool = pool;
        g_mutex_init(&pool->lock);
        g_cond_init(&pool->cond);
        g_queue_init(&pool->queue);
        g_queue_init(&pool->internal);
        g_queue_init(&pool->done);
        mgr->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (mgr->notify_fd < 0)
                return -errno;
        r = sd_event_add_io(mgr->event, &mgr->notify_source, mgr->notify_fd, EPOLLIN, on_notify, mgr);
        if (r < 0)
                return r;
        pool->threads = calloc(mgr->config.workers + 1, sizeof *pool->threads);
        if (!pool->threads)
                return -ENOMEM;
        general = (Thread){ mgr, false };
        internal_thread = (Thread){ mgr, true };
        for (unsigned i = 0; i <= mgr->config.workers; i++) {
                r = pthread_create(&pool->threads[i], NULL, worker_thread,
                                   i == mgr->config.workers ? &internal_thread : &general);
                if (r != 0)
                        return -r;
                pool->n++;
        }
        return 0;
}

/* At exit: let the threads finish what they run (what waits is dropped), then join them. */
void workers_free(Manager *mgr) {
        struct Pool *pool = mgr->pool;
        Work *w;

        if (!pool)
                return;
        g_mutex_lock(&pool->lock);
        pool->stop = true;
        g_cond_broadcast(&pool->cond);
        g_mutex_unlock(&pool->lock);
        for (unsigned i = 0; i < pool->n; i++)
                pthread_join(pool->threads[i], NULL);
        while ((w = g_queue_pop_head(&pool->queue)))
                work_free(w);
        while ((w = g_queue_pop_head(&pool->internal)))
                work_free(w);
        while ((w = g_queue_pop_head(&pool->done)))
                work_free(w);
        free(pool->threads);
        g_mutex_clear(&pool->lock);
        g_cond_clear(&pool->cond);
        free(pool);
        mgr->pool = NULL;
        sd_event_source_disable_unref(mgr->notify_source);
        if (mgr->notify_fd >= 0)
                close(mgr->notify_fd);
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
        return w;
}

int work_submit(Work *w, sd_bus_message *m) {
        Manager *mgr = w->mgr;
        struct Pool *pool = mgr->pool;

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
                model_hold(mgr, w->holds, +1);
        g_mutex_lock(&pool->lock);
        g_queue_push_tail(w->operation ? &pool->queue : &pool->internal, w);
        g_cond_broadcast(&pool->cond);
        g_mutex_unlock(&pool->lock);
        return 0;
}

int work_start(Manager *mgr, sd_bus_message *m, work_fn run, work_fn done, void *data, void (*free_data)(void *)) {
        Work *w = work_new(mgr, run, done, data, free_data);
        if (!w)
                return -ENOMEM;
        return work_submit(w, m);
}
