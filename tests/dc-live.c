/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * dc-live: runs a block job on a chain while an in-process writer keeps
 * writing through the chain's write path (dc_disk), and keeps a model of
 * what the guest must see.  The Python tests judge the files it leaves
 * with qemu-img.
 *
 *   dc-live OUTDIR backup SRC TGT full|top|none
 *   dc-live OUTDIR mirror SRC TGT full|top|none background|write-blocking complete|cancel
 *   dc-live OUTDIR commit TOP BASE complete|cancel          (active commit)
 *   dc-live OUTDIR stream TOP [BASE]
 *
 * Leaves OUTDIR/model.raw (the guest's disk at the end, from the model),
 * OUTDIR/point.raw (the disk at the job's start for backup, at the soft
 * cancel for mirror/commit, with the writer held until the job is over) and prints the events and the final top.
 * It fails itself when the disk read back differs from the model.
 */

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "diskchain.h"

static dc_disk *disk;
static uint8_t *model;
static uint64_t size;
static pthread_mutex_t mtx = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static bool stop, pause_req, paused;
static unsigned long writes, failures;
static const char *outdir;

static void die(const char *what) {
        fprintf(stderr, "dc-live: %s: %s\n", what, dc_get_error());
        exit(1);
}

static uint64_t rnd(uint64_t *s) {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        return *s;
}

/* Random writes and zero writes, 512 B .. 192 KiB, each stamped with its number. */
static void *writer(void *p) {
        uint64_t seed = 0x9e3779b97f4a7c15ull;
        uint8_t *buf = malloc(192 << 10);
        (void) p;
        for (unsigned long n = 1;; n++) {
                uint64_t off, len;
                bool zero;
                int r;

                pthread_mutex_lock(&mtx);
                while (pause_req && !stop) {
                        paused = true;
                        pthread_cond_broadcast(&cond);
                        pthread_cond_wait(&cond, &mtx);
                }
                paused = false;
                if (stop) {
                        pthread_mutex_unlock(&mtx);
                        break;
                }
                pthread_mutex_unlock(&mtx);
                len = (rnd(&seed) % 384 + 1) * 512;
                off = rnd(&seed) % (size / 512) * 512;
                if (off + len > size)
                        len = size - off;
                zero = rnd(&seed) % 10 == 0;
                if (zero)
                        r = dc_disk_write_zeroes(disk, off, len, 0);
                else {
                        memset(buf, (int) (n % 251) + 1, len);
                        for (uint64_t k = 0; k < len; k += 512)
                                memcpy(buf + k, &n, sizeof n);
                        r = dc_disk_write(disk, buf, off, len);
                }
                if (r < 0) {
                        fprintf(stderr, "dc-live: write failed: %s\n", dc_get_error());
                        failures++;
                        continue;
                }
                if (zero)
                        memset(model + off, 0, len);
                else
                        memcpy(model + off, buf, len);
                writes++;
                {
                        /* a busy guest, but one a mirror can catch up with */
                        struct timespec ts = { 0, 1000000 };
                        nanosleep(&ts, NULL);
                }
        }
        free(buf);
        return NULL;
}

static void writer_pause(bool on) {
        pthread_mutex_lock(&mtx);
        pause_req = on;
        pthread_cond_broadcast(&cond);
        while (on && !paused)
                pthread_cond_wait(&cond, &mtx);
        pthread_mutex_unlock(&mtx);
}

static void save(const char *name, const uint8_t *data) {
        char path[4096];
        FILE *f;
        snprintf(path, sizeof path, "%s/%s", outdir, name);
        f = fopen(path, "w");
        if (!f || fwrite(data, 1, size, f) != size || fclose(f) != 0) {
                perror(path);
                exit(1);
        }
}

static void notify(void *u) {
        (void) u;
        pthread_mutex_lock(&mtx);
        pthread_cond_broadcast(&cond);
        pthread_mutex_unlock(&mtx);
}

/* Print events until one of kind KIND (or the job's end); returns 1 if KIND came. */
static int wait_event(dc_job *j, int kind) {
        struct dc_job_event ev;
        for (;;) {
                while (dc_job_next_event(j, &ev) > 0) {
                        if (ev.kind == DC_EV_STATUS)
                                printf("status %s\n", dc_job_status_name(ev.status));
                        else if (ev.kind == DC_EV_READY)
                                printf("ready\n");
                        else if (ev.kind == DC_EV_COMPLETED)
                                printf("completed %s\n", ev.error[0] ? ev.error : "ok");
                        else if (ev.kind == DC_EV_CANCELLED)
                                printf("cancelled\n");
                        else if (ev.kind == DC_EV_ERROR)
                                printf("error %s %s\n", ev.operation, ev.action);
                        fflush(stdout);
                        if (ev.kind == kind)
                                return 1;
                        if (ev.kind == DC_EV_STATUS && ev.status == DC_JOB_NULL)
                                return 0;
                }
                pthread_mutex_lock(&mtx);
                {
                        struct timespec ts;
                        clock_gettime(CLOCK_REALTIME, &ts);
                        ts.tv_nsec += 50000000;
                        if (ts.tv_nsec >= 1000000000) {
                                ts.tv_sec++;
                                ts.tv_nsec -= 1000000000;
                        }
                        pthread_cond_timedwait(&cond, &mtx, &ts);
                }
                pthread_mutex_unlock(&mtx);
        }
}

/* The library tells its owner of a pivot: dc-live prints it ("pivot NEW dropped..."). */
static int pivoted(void *userdata, const char *new_top, const char *const *dropped) {
        printf("pivot %s", new_top);
        for (size_t i = 0; dropped[i]; i++)
                printf(" %s", dropped[i]);
        printf("\n");
        fflush(stdout);
        return 0;
}

static int sync_mode(const char *s) {
        return !strcmp(s, "top") ? DC_SYNC_TOP : !strcmp(s, "none") ? DC_SYNC_NONE : DC_SYNC_FULL;
}

static void sleep_ms(long ms) {
        struct timespec ts = { ms / 1000, ms % 1000 * 1000000 };
        nanosleep(&ts, NULL);
}

int main(int argc, char **argv) {
        struct dc_open_options oo = { .writable = true };
        /* a tool run by its user on their own files: the URI may name TLS credential files */
        static const struct dc_nbd_client_options nbd = { .allow_uri_files = true };
        struct dc_job_options jo = { .id = "live0", .auto_finalize = true, .auto_dismiss = true, .notify = notify,
                                     .speed = 16u << 20, .pivoted = pivoted, .nbd = &nbd };
        const char *op;
        pthread_t th;
        dc_job *j = NULL;
        uint8_t *point, *back;
        char *top;
        int r;

        if (argc < 4)
                return fprintf(stderr, "usage: see the comment at the top of dc-live.c\n"), 2;
        outdir = argv[1];
        op = argv[2];
        if (dc_disk_open(argv[3], &oo, &disk) < 0)
                die("open");
        size = dc_disk_size(disk);
        model = malloc(size);
        point = calloc(1, size); /* saved in every mode, filled in some */
        back = malloc(size);
        if (dc_disk_read(disk, model, 0, size) < 0)
                die("read");
        jo.disk = disk;
        if (pthread_create(&th, NULL, writer, NULL) != 0)
                return 1;
        sleep_ms(100);

        if (!strcmp(op, "backup") && argc == 6) {
                /* DC_LIVE_FLEECE: a pull backup through a point-in-time view whose old data goes there */
                struct dc_backup_options bo = { .sync = sync_mode(argv[5]), .fleece = getenv("DC_LIVE_FLEECE") };
                /* the point in time is the call's return: nothing is written during it */
                writer_pause(true);
                memcpy(point, model, size);
                r = dc_job_backup(argv[3], argv[4], &bo, NULL, &jo, &j);
                writer_pause(false);
                if (r < 0)
                        die("backup");
                if (bo.sync == DC_SYNC_NONE) {
                        sleep_ms(1500);
                        dc_job_cancel(j, true);
                }
                wait_event(j, -1);
        } else if ((!strcmp(op, "mirror") && argc == 8) || (!strcmp(op, "commit") && argc == 6)) {
                bool mirror = !strcmp(op, "mirror");
                const char *action = argv[argc - 1];
                jo.speed = 0;
                if (mirror) {
                        struct dc_mirror_options mo = {
                                .sync = sync_mode(argv[5]),
                                .copy_mode = !strcmp(argv[6], "write-blocking") ? DC_COPY_MODE_WRITE_BLOCKING
                                                                                 : DC_COPY_MODE_BACKGROUND,
                                .unmap = true,
                        };
                        r = dc_job_mirror(argv[3], argv[4], &mo, NULL, &jo, &j);
                } else
                        r = dc_job_commit(NULL, argv[3], argv[4], NULL, NULL, &jo, &j);
                if (r < 0)
                        die(op);
                if (!wait_event(j, DC_EV_READY))
                        return fprintf(stderr, "dc-live: the job ended before it was ready\n"), 1;
                sleep_ms(700); /* ready, and writes keep coming: it must stay in sync */
                if (!strcmp(action, "cancel")) {
                        /* the copy is of the moment the job drains after the cancel,
                         * as in QEMU: hold the writer until the job is over */
                        writer_pause(true);
                        memcpy(point, model, size);
                        if (dc_job_cancel(j, false) < 0)
                                die("cancel");
                        wait_event(j, -1);
                        writer_pause(false);
                } else {
                        if (dc_job_complete(j) < 0)
                                die("complete");
                        wait_event(j, -1);
                }
        } else if (!strcmp(op, "stream") && (argc == 4 || argc == 5)) {
                r = dc_job_stream(argv[3], argc == 5 ? argv[4] : NULL, NULL, NULL, &jo, &j);
                if (r < 0)
                        die("stream");
                wait_event(j, -1);
        } else
                return fprintf(stderr, "dc-live: bad arguments\n"), 2;

        sleep_ms(300); /* writes after the end go to whatever is the top now */
        pthread_mutex_lock(&mtx);
        stop = true;
        pthread_cond_broadcast(&cond);
        pthread_mutex_unlock(&mtx);
        pthread_join(th, NULL);
        dc_job_free(j);

        if (dc_disk_flush(disk) < 0 || dc_disk_read(disk, back, 0, size) < 0)
                die("read back");
        top = dc_disk_top_path(disk);
        printf("top %s\nwrites %lu\nfailures %lu\n", top, writes, failures);
        save("model.raw", model);
        save("point.raw", point);
        if (memcmp(back, model, size) != 0) {
                for (uint64_t i = 0; i < size; i++)
                        if (back[i] != model[i]) {
                                fprintf(stderr, "dc-live: the disk differs from the model at %llu\n",
                                        (unsigned long long) i);
                                break;
                        }
                return 1;
        }
        free(top);
        free(model);
        free(point);
        free(back);
        dc_disk_unref(disk);
        return failures ? 1 : 0;
}
