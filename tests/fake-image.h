/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/*
 * A fake image format for the unit tests of the write path, the copy
 * engine and the job model: layers in memory behind the library's table of
 * operations (struct dc_driver), with allocation per 512-byte sector,
 * counters, and faults on demand.  fake_image() builds a dc_image the
 * library reads through its chain (dc_chain_read), writes through its
 * driver, and closes with dc_image_close(); dc_disk_new() wraps a chain of
 * them in a write path.
 */

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dc-internal.h"

#define FAKE_SECTOR 512u

enum { FAKE_UNALLOCATED, FAKE_DATA, FAKE_ZERO };

struct fake {
        uint8_t *data;
        uint8_t *state;          /* FAKE_* per sector */
        /* counters and faults (under the image lock, as the driver is called) */
        unsigned long reads, writes, zero_writes, flushes;
        long fail_write_in;      /* > 0: the Nth write from now fails with fail_errno */
        long fail_read_in;       /* > 0: the Nth read from now fails with fail_errno */
        int fail_errno;
        unsigned read_delay_us;  /* each read takes this long: lets helpers start before the caller is done */
        unsigned write_delay_us; /* each write takes this long (before it touches the data) */
        unsigned in_read, max_in_read; /* reads by host offset running now, and at most at once (atomic) */
};

static inline struct fake *fake_of(dc_image *img) {
        return img->priv;
}

static int fake_block_status(dc_image *img, uint64_t off, uint64_t len, struct dc_layer_status *ret) {
        struct fake *f = fake_of(img);
        uint64_t s = off / FAKE_SECTOR, end = off + len, n = 0;
        uint8_t st = f->state[s];

        while (off + n < end && f->state[(off + n) / FAKE_SECTOR] == st)
                n += FAKE_SECTOR - (off + n) % FAKE_SECTOR;
        *ret = (struct dc_layer_status){
                .type = st == FAKE_DATA ? DC_LAYER_DATA : st == FAKE_ZERO ? DC_LAYER_ZERO : DC_LAYER_UNALLOCATED,
                .length = MIN(n, len),
                .host_offset = st == FAKE_DATA ? (int64_t) off : -1,
        };
        return 0;
}

static int fake_fault(long *in, int err, const char *what) {
        if (__atomic_load_n(in, __ATOMIC_SEQ_CST) > 0 && __atomic_sub_fetch(in, 1, __ATOMIC_SEQ_CST) == 0)
                return dc_error(err, "fake %s failure", what);
        return 0;
}

static int fake_read(dc_image *img, void *buf, uint64_t off, size_t len) {
        struct fake *f = fake_of(img);
        int r = fake_fault(&f->fail_read_in, f->fail_errno, "read");
        if (r < 0)
                return r;
        __atomic_add_fetch(&f->reads, 1, __ATOMIC_SEQ_CST);
        if (f->read_delay_us)
                usleep(f->read_delay_us);
        memcpy(buf, f->data + off, len);
        return 0;
}

/* Data lies at its guest offset ("host" = guest), read without the image lock as a real driver's is. */
static int fake_read_host(dc_image *img, void *buf, uint64_t host, size_t len) {
        struct fake *f = fake_of(img);
        unsigned now = __atomic_add_fetch(&f->in_read, 1, __ATOMIC_SEQ_CST), max = __atomic_load_n(&f->max_in_read, __ATOMIC_SEQ_CST);
        int r;

        while (now > max && !__atomic_compare_exchange_n(&f->max_in_read, &max, now, false, __ATOMIC_SEQ_CST,
                                                         __ATOMIC_SEQ_CST))
                ;
        r = fake_read(img, buf, host, len);
        __atomic_sub_fetch(&f->in_read, 1, __ATOMIC_SEQ_CST);
        return r;
}

static void fake_mark(struct fake *f, uint64_t off, uint64_t len, uint8_t st) {
        for (uint64_t s = off / FAKE_SECTOR; s < DIV_ROUND_UP(off + len, FAKE_SECTOR); s++)
                f->state[s] = st;
}

static int fake_write(dc_image *img, const void *buf, uint64_t off, size_t len) {
        struct fake *f = fake_of(img);
        int r = fake_fault(&f->fail_write_in, f->fail_errno, "write");
        if (r < 0)
                return r;
        if (f->write_delay_us)
                usleep(f->write_delay_us);
        f->writes++;
        memcpy(f->data + off, buf, len);
        fake_mark(f, off, len, FAKE_DATA);
        return 0;
}

static int fake_write_zeroes(dc_image *img, uint64_t off, uint64_t len, unsigned flags) {
        struct fake *f = fake_of(img);
        int r = fake_fault(&f->fail_write_in, f->fail_errno, "write");
        if (r < 0)
                return r;
        f->zero_writes++;
        memset(f->data + off, 0, len);
        fake_mark(f, off, len, FAKE_ZERO);
        return 0;
}

static int fake_discard(dc_image *img, uint64_t off, uint64_t len) {
        return fake_write_zeroes(img, off, len, 0);
}

static int fake_flush(dc_image *img) {
        fake_of(img)->flushes++;
        return 0;
}

static void fake_close(dc_image *img) {
        struct fake *f = fake_of(img);
        if (!f)
                return;
        free(f->data);
        free(f->state);
        free(f);
        img->priv = NULL;
}

static const struct dc_driver fake_driver = {
        .name = "fake",
        .format = -1,
        .block_status = fake_block_status,
        .read = fake_read,
        .read_host = fake_read_host,
        .write = fake_write,
        .write_zeroes = fake_write_zeroes,
        .discard = fake_discard,
        .flush = fake_flush,
        .close = fake_close,
};

/* A layer NAME of SIZE bytes (a multiple of 512) over BACKING (taken over: closed with it). */
static inline dc_image *fake_image(const char *name, uint64_t size, dc_image *backing, bool writable) {
        dc_image *img = calloc(1, sizeof *img);
        struct fake *f = calloc(1, sizeof *f);

        if (!img || !f)
                abort();
        f->data = calloc(1, size + 1);
        f->state = calloc(size / FAKE_SECTOR + 1, 1);
        if (!f->data || !f->state)
                abort();
        pthread_mutex_init(&img->lock, NULL);
        img->drv = &fake_driver;
        img->fd = img->dfd = -1;
        img->path = strdup(name);
        img->virtual_size = size;
        img->writable = writable;
        img->backing = backing;
        img->backing_file = backing ? strdup(backing->path) : NULL;
        img->priv = f;
        return img;
}

/* Fill [OFF, OFF+LEN) of one layer with data made from SEED (a guest write below the library). */
static inline void fake_fill(dc_image *img, uint64_t off, uint64_t len, unsigned seed) {
        struct fake *f = fake_of(img);
        for (uint64_t i = 0; i < len; i++)
                f->data[off + i] = (uint8_t) ((off + i) * 2654435761u >> 13 ^ seed) | 1; /* never zero */
        fake_mark(f, off, len, FAKE_DATA);
}

/* Mark [OFF, OFF+LEN) of one layer as a zero cluster. */
static inline void fake_zero(dc_image *img, uint64_t off, uint64_t len) {
        struct fake *f = fake_of(img);
        memset(f->data + off, 0, len);
        fake_mark(f, off, len, FAKE_ZERO);
}
