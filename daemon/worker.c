/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Work that touches image data runs on its own thread; the result comes back
 * to the event loop through an eventfd, and only the loop talks to the bus.
 * The loop never waits for a thread.
 */

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "daemon.h"

void work_capture_error(Work *w, int r) {
        w->r = r;
        if (r < 0) {
                free(w->error);
                w->error = strdup(dc_get_error());
        }
}

static void *work_thread(void *p) {
        Work *w = p;
        uint64_t one = 1;

        if (w->run)
                w->run(w);
        if (w->rescan)
                w->scan = scan_roots(w->mgr);
        g_mutex_lock(&w->mgr->done_lock);
        g_queue_push_tail(w->mgr->done, w);
        g_mutex_unlock(&w->mgr->done_lock);
        (void) !write(w->mgr->notify_fd, &one, sizeof one);
        return NULL;
}

static void work_free(Work *w) {
        if (w->free_data)
                w->free_data(w->data);
        if (w->scan)
                g_ptr_array_unref(w->scan);
        sd_bus_message_unref(w->m);
        free(w->error);
        free(w);
}

static int on_notify(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        Manager *mgr = userdata;
        uint64_t n;

        (void) !read(fd, &n, sizeof n);
        for (;;) {
                Work *w;
                g_mutex_lock(&mgr->done_lock);
                w = g_queue_pop_head(mgr->done);
                g_mutex_unlock(&mgr->done_lock);
                if (!w)
                        break;
                if (w->scan)
                        model_apply_scan(mgr, TAKE_PTR(w->scan));
                if (w->done)
                        w->done(w);
                mgr->work_in_flight--;
                work_free(w);
        }
        return 0;
}

int worker_setup(Manager *mgr) {
        mgr->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (mgr->notify_fd < 0)
                return -errno;
        mgr->done = g_queue_new();
        g_mutex_init(&mgr->done_lock);
        return sd_event_add_io(mgr->event, &mgr->notify_source, mgr->notify_fd, EPOLLIN, on_notify, mgr);
}

int work_start(Manager *mgr, sd_bus_message *m, work_fn run, work_fn done, void *data, void (*free_data)(void *),
               bool rescan) {
        pthread_attr_t attr;
        pthread_t t;
        Work *w;
        int r;

        w = calloc(1, sizeof *w);
        if (!w) {
                if (free_data)
                        free_data(data);
                return -ENOMEM;
        }
        w->mgr = mgr;
        w->m = sd_bus_message_ref(m);
        w->run = run;
        w->done = done;
        w->data = data;
        w->free_data = free_data;
        w->rescan = rescan;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        r = pthread_create(&t, &attr, work_thread, w);
        pthread_attr_destroy(&attr);
        if (r != 0) {
                work_free(w);
                return -r;
        }
        mgr->work_in_flight++;
        return 0;
}
