/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Unit tests of the daemon's thread pool (daemon/pool.c) under a real
 * sd_event loop and its eventfd: every run on a pool thread and every done
 * on the loop thread after its run, the bound on threads (ordinary items on
 * the workers only, urgent ones also on the reserved threads), urgent items
 * first and each kind in submission order, done in the order the runs
 * finished (submission order on one thread), done arriving when the loop
 * starts after the runs ended, and freeing the pool with items waiting and
 * items finished but not handed back (dropped, never done).
 */

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "pool.h"

#define MS 1000u

typedef struct Item {
        PoolItem it;
        int n;
        bool urgent;
        useconds_t sleep;     /* in run */
        bool block;           /* run waits for the test's gate */
        bool ran_on_pool;     /* run: not the loop thread */
        bool ran;
        bool done_on_loop, done_after_run;
        int dones, drops;
} Item;

#define ITEM(p) ((Item *) ((char *) (p) - offsetof(Item, it)))

static pthread_t loop_thread;
static atomic_int running, running_ordinary, max_running, max_ordinary;
static GMutex order_lock;
static GArray *run_order, *done_order;
static int done_count;
static sd_event *event;

/* A gate that blocking items wait at (at most 5 s, so a broken pool fails instead of hanging). */
static GMutex gate_lock;
static GCond gate_cond;
static bool gate_open, blocker_started;

static void gate_reset(void) {
        g_mutex_lock(&gate_lock);
        gate_open = false;
        blocker_started = false;
        g_mutex_unlock(&gate_lock);
}

static void gate_release(void) {
        g_mutex_lock(&gate_lock);
        gate_open = true;
        g_cond_broadcast(&gate_cond);
        g_mutex_unlock(&gate_lock);
}

static void wait_blocker_started(void) {
        gint64 end = g_get_monotonic_time() + 5 * G_TIME_SPAN_SECOND;
        g_mutex_lock(&gate_lock);
        while (!blocker_started && g_cond_wait_until(&gate_cond, &gate_lock, end))
                ;
        g_mutex_unlock(&gate_lock);
}

static void max_update(atomic_int *max, int v) {
        int m = atomic_load(max);
        while (v > m && !atomic_compare_exchange_weak(max, &m, v))
                ;
}

static void item_run(PoolItem *p) {
        Item *i = ITEM(p);
        int now = atomic_fetch_add(&running, 1) + 1;

        max_update(&max_running, now);
        if (!i->urgent)
                max_update(&max_ordinary, atomic_fetch_add(&running_ordinary, 1) + 1);
        i->ran_on_pool = !pthread_equal(pthread_self(), loop_thread);
        g_mutex_lock(&order_lock);
        g_array_append_val(run_order, i->n);
        g_mutex_unlock(&order_lock);
        if (i->block) {
                gint64 end = g_get_monotonic_time() + 5 * G_TIME_SPAN_SECOND;
                g_mutex_lock(&gate_lock);
                blocker_started = true;
                g_cond_broadcast(&gate_cond);
                while (!gate_open && g_cond_wait_until(&gate_cond, &gate_lock, end))
                        ;
                g_mutex_unlock(&gate_lock);
        }
        if (i->sleep)
                usleep(i->sleep);
        if (!i->urgent)
                atomic_fetch_sub(&running_ordinary, 1);
        atomic_fetch_sub(&running, 1);
        i->ran = true;
}

static void item_done(PoolItem *p) {
        Item *i = ITEM(p);

        i->done_on_loop = pthread_equal(pthread_self(), loop_thread);
        i->done_after_run = i->ran;
        i->dones++;
        g_array_append_val(done_order, i->n);
        done_count++;
}

static void item_drop(PoolItem *p) {
        ITEM(p)->drops++;
}

static Item *items_new(int n) {
        Item *items = calloc(n, sizeof *items);
        for (int k = 0; k < n; k++) {
                items[k].n = k;
                items[k].it = (PoolItem){ .run = item_run, .done = item_done, .drop = item_drop };
        }
        return items;
}

/* Run the loop until EXPECT items are done (0), or 10 s passed (-ETIME). */
static int loop_until(int expect) {
        gint64 end = g_get_monotonic_time() + 10 * G_TIME_SPAN_SECOND;

        while (done_count < expect) {
                int r;
                if (g_get_monotonic_time() > end) {
                        fprintf(stderr, "timed out: %d of %d items done\n", done_count, expect);
                        return -ETIME;
                }
                r = sd_event_run(event, 100 * MS);
                if (r < 0)
                        return r;
        }
        return 0;
}

static void reset(void) {
        atomic_store(&running, 0);
        atomic_store(&running_ordinary, 0);
        atomic_store(&max_running, 0);
        atomic_store(&max_ordinary, 0);
        g_array_set_size(run_order, 0);
        g_array_set_size(done_order, 0);
        done_count = 0;
        gate_reset();
        CHECK(sd_event_new(&event) >= 0);
}

static void finish(void) {
        event = sd_event_unref(event);
}

/* Each run on a pool thread, each done once on the loop thread after its run. */
static void test_threads(void) {
        enum { N = 40 };
        Item *items = items_new(N);
        Pool *p = NULL;

        reset();
        CHECK(pool_new(event, 3, 1, &p) >= 0);
        for (int k = 0; k < N; k++) {
                items[k].urgent = k % 4 == 0;
                items[k].sleep = k % 3 == 0 ? 2 * MS : 0;
                pool_submit(p, &items[k].it, items[k].urgent);
        }
        CHECK(loop_until(N) == 0);
        for (int k = 0; k < N; k++) {
                CHECK(items[k].ran_on_pool);
                CHECK(items[k].dones == 1);
                CHECK(items[k].done_on_loop);
                CHECK(items[k].done_after_run);
                CHECK(items[k].drops == 0);
        }
        CHECK(done_order->len == N);
        p = pool_free(p);
        CHECK(!p);
        for (int k = 0; k < N; k++)
                CHECK(items[k].drops == 0); /* everything was handed back: nothing to drop */
        finish();
        free(items);
}

/* At most WORKERS ordinary runs at once, WORKERS + RESERVED in all; the bound is reached. */
static void test_bound(void) {
        enum { N = 12, U = 4 };
        Item *items = items_new(N + U);
        Pool *p = NULL;

        reset();
        CHECK(pool_new(event, 3, 1, &p) >= 0);
        for (int k = 0; k < N + U; k++) {
                items[k].urgent = k >= N;
                items[k].sleep = 30 * MS;
                pool_submit(p, &items[k].it, items[k].urgent);
        }
        CHECK(loop_until(N + U) == 0);
        CHECK(atomic_load(&max_ordinary) <= 3);
        CHECK(atomic_load(&max_running) <= 4);
        CHECK(atomic_load(&max_running) == 4); /* the urgent items ran beside three ordinary ones */
        p = pool_free(p);
        finish();
        free(items);
}

/* An urgent item runs on the reserved thread while every worker runs an ordinary one. */
static void test_urgent_not_behind(void) {
        Item *items = items_new(2);
        Pool *p = NULL;

        reset();
        CHECK(pool_new(event, 1, 1, &p) >= 0);
        items[0].block = true;
        pool_submit(p, &items[0].it, false);
        wait_blocker_started();
        items[1].urgent = true;
        pool_submit(p, &items[1].it, true);
        CHECK(loop_until(1) == 0);
        CHECK(items[1].dones == 1);
        CHECK(items[0].dones == 0); /* still blocked: the urgent item did not wait for it */
        gate_release();
        CHECK(loop_until(2) == 0);
        CHECK(items[0].dones == 1);
        p = pool_free(p);
        finish();
        free(items);
}

/* On one thread: urgent items before ordinary ones, each kind in submission order, done in run order. */
static void test_order(void) {
        enum { N = 9 };
        static const int want[N] = { 0, 5, 7, 1, 2, 3, 4, 6, 8 };
        Item *items = items_new(N);
        Pool *p = NULL;

        reset();
        CHECK(pool_new(event, 1, 0, &p) >= 0);
        items[0].block = true;
        pool_submit(p, &items[0].it, false);
        wait_blocker_started();
        for (int k = 1; k < N; k++) {
                items[k].urgent = k == 5 || k == 7;
                pool_submit(p, &items[k].it, items[k].urgent);
        }
        gate_release();
        CHECK(loop_until(N) == 0);
        CHECK(run_order->len == N && done_order->len == N);
        for (int k = 0; k < N && k < (int) run_order->len && k < (int) done_order->len; k++) {
                CHECK(g_array_index(run_order, int, k) == want[k]);
                CHECK(g_array_index(done_order, int, k) == want[k]);
        }
        p = pool_free(p);
        finish();
        free(items);
}

/* Runs that ended before the loop ran: the eventfd still says so, and every done comes. */
static void test_loop_late(void) {
        enum { N = 6 };
        Item *items = items_new(N);
        Pool *p = NULL;
        int ran = 0;

        reset();
        CHECK(pool_new(event, 2, 0, &p) >= 0);
        for (int k = 0; k < N; k++)
                pool_submit(p, &items[k].it, false);
        for (int tries = 0; tries < 500 && ran < N; tries++) {
                usleep(10 * MS);
                g_mutex_lock(&order_lock);
                ran = (int) run_order->len;
                g_mutex_unlock(&order_lock);
        }
        usleep(20 * MS);
        CHECK(ran == N);
        CHECK(done_count == 0); /* nothing is handed back before the loop runs */
        CHECK(loop_until(N) == 0);
        for (int k = 0; k < N; k++)
                CHECK(items[k].dones == 1 && items[k].done_on_loop);
        p = pool_free(p);
        finish();
        free(items);
}

static void *release_later(void *arg) {
        usleep(50 * MS);
        gate_release();
        return NULL;
}

/*
 * Freeing the pool while one item runs and others wait: the running one
 * finishes its run, the waiting ones never run, and every item is dropped
 * once, none done.  Items whose run ended but whose done has not run yet
 * (the loop did not get to them) are dropped too.
 */
static void test_free_with_queued(void) {
        enum { N = 6 };
        Item *items = items_new(N), *quick = items_new(3);
        pthread_t helper;
        Pool *p = NULL;
        int ran = 0;

        reset();
        CHECK(pool_new(event, 1, 0, &p) >= 0);
        items[0].block = true;
        pool_submit(p, &items[0].it, false);
        wait_blocker_started();
        for (int k = 1; k < N; k++)
                pool_submit(p, &items[k].it, k % 2 == 0);
        CHECK(pthread_create(&helper, NULL, release_later, NULL) == 0);
        p = pool_free(p); /* waits for the running item's run */
        pthread_join(helper, NULL);
        CHECK(items[0].ran);
        for (int k = 1; k < N; k++)
                CHECK(!items[k].ran);
        for (int k = 0; k < N; k++) {
                CHECK(items[k].dones == 0);
                CHECK(items[k].drops == 1);
        }
        finish();

        reset();
        CHECK(pool_new(event, 2, 1, &p) >= 0);
        for (int k = 0; k < 3; k++)
                pool_submit(p, &quick[k].it, k == 1);
        for (int tries = 0; tries < 500 && ran < 3; tries++) {
                usleep(10 * MS);
                g_mutex_lock(&order_lock);
                ran = (int) run_order->len;
                g_mutex_unlock(&order_lock);
        }
        CHECK(ran == 3);
        p = pool_free(p);
        for (int k = 0; k < 3; k++)
                CHECK(quick[k].ran && quick[k].dones == 0 && quick[k].drops == 1);
        finish();
        free(items);
        free(quick);
}

int main(void) {
        loop_thread = pthread_self();
        run_order = g_array_new(FALSE, FALSE, sizeof(int));
        done_order = g_array_new(FALSE, FALSE, sizeof(int));
        test_threads();
        test_bound();
        test_urgent_not_behind();
        test_order();
        test_loop_late();
        test_free_with_queued();
        g_array_unref(run_order);
        g_array_unref(done_order);
        return check_report("test-pool");
}
