/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * A bounded pool of threads for an sd_event loop (like systemd's
 * operation.c, it knows nothing of what its items are for).
 *
 * Design notes
 * ------------
 * - Two queues: ordinary items, and urgent ones.  A thread takes an urgent
 *   item first.  WORKERS threads take either; RESERVED threads take only
 *   urgent items, so an urgent item starts at once even when every worker
 *   runs a long ordinary one.  At most WORKERS + RESERVED runs at a time,
 *   at most WORKERS of them ordinary.
 * - Each queue is first in, first out: items of one kind start in the
 *   order they were submitted.  They may finish in another order on more
 *   than one thread; done runs in the order the runs finished (a third
 *   queue, drained in order), which on one thread is submission order.
 * - A finished item comes back to the loop through an eventfd; done runs
 *   on the loop thread, never on a pool thread, and the loop never waits
 *   for a thread.  done may submit more items.
 * - Items carry their own queue link, so submitting cannot fail.
 * - Freeing the pool lets the runs under way finish, joins the threads,
 *   and drops every item whose done did not run (queued, or finished but
 *   not handed back yet): drop runs on the freeing thread, done never.
 * - One mutex guards the three queues and the stop flag; it is never held
 *   while an item runs, nor while done or drop runs.
 */

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "pool.h"

struct Pool {
        GMutex lock;
        GCond cond;
        GQueue queue;    /* ordinary PoolItem* waiting */
        GQueue urgent;   /* urgent PoolItem* waiting: taken first, also by the reserved threads */
        GQueue done;     /* PoolItem* finished, for the loop */
        bool stop;
        unsigned workers, n;
        pthread_t *threads;
        int fd;          /* eventfd: something is in done */
        sd_event_source *source;
};

typedef struct Thread {
        Pool *pool;
        bool urgent_only;
} Thread;

static void *pool_thread(void *p) {
        Thread *t = p;
        Pool *pool = t->pool;
        bool urgent_only = t->urgent_only;
        uint64_t one = 1;

        free(t);
        for (;;) {
                GList *l;
                PoolItem *it;

                g_mutex_lock(&pool->lock);
                while (!pool->stop && g_queue_is_empty(&pool->urgent) &&
                       (urgent_only || g_queue_is_empty(&pool->queue)))
                        g_cond_wait(&pool->cond, &pool->lock);
                if (pool->stop) {
                        g_mutex_unlock(&pool->lock);
                        return NULL;
                }
                l = g_queue_pop_head_link(&pool->urgent);
                if (!l)
                        l = g_queue_pop_head_link(&pool->queue);
                g_mutex_unlock(&pool->lock);

                it = l->data;
                it->run(it);
                g_mutex_lock(&pool->lock);
                g_queue_push_tail_link(&pool->done, &it->link);
                g_mutex_unlock(&pool->lock);
                (void) !write(pool->fd, &one, sizeof one);
        }
}

static int on_done(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        Pool *pool = userdata;
        uint64_t n;

        (void) !read(fd, &n, sizeof n);
        for (;;) {
                GList *l;
                PoolItem *it;

                g_mutex_lock(&pool->lock);
                l = g_queue_pop_head_link(&pool->done);
                g_mutex_unlock(&pool->lock);
                if (!l)
                        break;
                it = l->data;
                if (it->done)
                        it->done(it);
        }
        return 0;
}

int pool_new(sd_event *event, unsigned workers, unsigned reserved, Pool **ret) {
        Pool *pool = calloc(1, sizeof *pool);
        int r;

        if (!pool)
                return -ENOMEM;
        g_mutex_init(&pool->lock);
        g_cond_init(&pool->cond);
        g_queue_init(&pool->queue);
        g_queue_init(&pool->urgent);
        g_queue_init(&pool->done);
        pool->workers = workers;
        pool->fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (pool->fd < 0) {
                r = -errno;
                goto fail;
        }
        r = sd_event_add_io(event, &pool->source, pool->fd, EPOLLIN, on_done, pool);
        if (r < 0)
                goto fail;
        pool->threads = calloc(workers + reserved, sizeof *pool->threads);
        if (!pool->threads) {
                r = -ENOMEM;
                goto fail;
        }
        for (unsigned i = 0; i < workers + reserved; i++) {
                Thread *t = malloc(sizeof *t);
                if (!t) {
                        r = -ENOMEM;
                        goto fail;
                }
                *t = (Thread){ pool, i >= workers };
                r = pthread_create(&pool->threads[i], NULL, pool_thread, t);
                if (r != 0) {
                        free(t);
                        r = -r;
                        goto fail;
                }
                pool->n++;
        }
        *ret = pool;
        return 0;
fail:
        pool_free(pool);
        return r;
}

void pool_submit(Pool *pool, PoolItem *it, bool urgent) {
        it->link = (GList){ .data = it };
        g_mutex_lock(&pool->lock);
        g_queue_push_tail_link(urgent ? &pool->urgent : &pool->queue, &it->link);
        g_cond_broadcast(&pool->cond);
        g_mutex_unlock(&pool->lock);
}

static void drop_all(GQueue *q) {
        GList *l;
        while ((l = g_queue_pop_head_link(q))) {
                PoolItem *it = l->data;
                if (it->drop)
                        it->drop(it);
        }
}

Pool *pool_free(Pool *pool) {
        if (!pool)
                return NULL;
        g_mutex_lock(&pool->lock);
        pool->stop = true;
        g_cond_broadcast(&pool->cond);
        g_mutex_unlock(&pool->lock);
        for (unsigned i = 0; i < pool->n; i++)
                pthread_join(pool->threads[i], NULL);
        /* the threads are gone: no lock needed any more */
        drop_all(&pool->queue);
        drop_all(&pool->urgent);
        drop_all(&pool->done);
        free(pool->threads);
        sd_event_source_disable_unref(pool->source);
        if (pool->fd >= 0)
                close(pool->fd);
        g_mutex_clear(&pool->lock);
        g_cond_clear(&pool->cond);
        free(pool);
        return NULL;
}
