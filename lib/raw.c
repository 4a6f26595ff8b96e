/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The raw driver: the guest disk is the host file, holes read as zeros. */

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>

#include "dc-internal.h"

static int raw_open(dc_image *img, bool writable) {
        struct stat st;

        (void) writable;
        if (fstat(img->fd, &st) < 0)
                return dc_error(errno, "'%s': cannot stat: %m", img->path);
        img->virtual_size = (uint64_t) st.st_size;
        return 0;
}

static void raw_close(dc_image *img) {
        dc_bitmaps_close(img); /* transient ones only */
}

static int raw_block_status(dc_image *img, uint64_t off, uint64_t len, struct dc_layer_status *ret) {
        off_t data, hole;

        data = lseek(img->fd, (off_t) off, SEEK_DATA);
        if (data < 0 && errno == ENXIO)
                data = (off_t) img->virtual_size;
        else if (data < 0) {
                /* No SEEK_DATA: everything is data. */
                *ret = (struct dc_layer_status){ DC_LAYER_DATA, len, (int64_t) off, false, false };
                return 0;
        }
        if ((uint64_t) data > off) {
                /* A hole in the host file: allocated, reads as zeros. */
                uint64_t n = MIN((uint64_t) data - off, len);
                *ret = (struct dc_layer_status){ DC_LAYER_ZERO, n, (int64_t) off, false, true };
                return 0;
        }
        hole = lseek(img->fd, (off_t) off, SEEK_HOLE);
        if (hole < 0)
                hole = (off_t) img->virtual_size;
        *ret = (struct dc_layer_status){ DC_LAYER_DATA, MIN((uint64_t) hole - off, len), (int64_t) off, false,
                                         false };
        if (ret->length == 0)
                ret->length = len;
        return 0;
}

static int raw_read(dc_image *img, void *buf, uint64_t off, size_t len) {
        int r = dc_image_pread_data(img, buf, len, off);
        if (r < 0)
                return dc_error(r, "'%s': read error at offset %llu: %s", img->path, (unsigned long long) off,
                                strerror(-r));
        return 0;
}

/*
 * QEMU refuses writes that would make a probed raw image start with another
 * format's header: the next program to probe the file would take a guest's
 * bytes for metadata (a backing file of its choice, say).  diskchain never
 * probes a recorded raw image, but others may, so no write of ours (a job's
 * copy, an export's client) puts such a header into the first sector.
 * BUF NULL: zeroes.
 */
static int guard_first_sector(dc_image *img, const void *buf, uint64_t off, uint64_t len) {
        uint8_t sector[512] = { 0 };
        const char *fmt;
        int r;

        if (off >= sizeof sector)
                return 0;
        r = dc_pread_full(img->fd, sector, sizeof sector, 0);
        if (r < 0)
                return dc_error(r, "'%s': read error at offset 0: %s", img->path, strerror(-r));
        if (buf)
                memcpy(sector + off, buf, (size_t) MIN(len, sizeof sector - off));
        else
                memset(sector + off, 0, (size_t) MIN(len, sizeof sector - off));
        fmt = dc_probe_magic(sector, sizeof sector);
        if (fmt)
                return dc_error(EILSEQ, "'%s': refusing to write a %s header into the first sector of a raw image "
                                        "(whoever probes the file would take it for a %s image)",
                                img->path, fmt, fmt);
        return 0;
}

static int raw_write(dc_image *img, const void *buf, uint64_t off, size_t len) {
        int r = guard_first_sector(img, buf, off, len);
        if (r < 0)
                return r;
        dc_bitmaps_record(img, off, len);
        r = dc_image_pwrite_data(img, buf, len, off, false);
        if (r < 0)
                return dc_error(r, "'%s': write error at offset %llu: %s", img->path, (unsigned long long) off,
                                strerror(-r));
        return 0;
}

static int raw_write_zeroes(dc_image *img, uint64_t off, uint64_t len, unsigned flags) {
        int mode = (flags & DC_ZERO_MAY_UNMAP) ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE : FALLOC_FL_ZERO_RANGE;
        static const uint8_t zeros[65536];
        int r = guard_first_sector(img, NULL, off, len);

        if (r < 0)
                return r;
        dc_bitmaps_record(img, off, len);
        if (fallocate(img->fd, mode, (off_t) off, (off_t) len) == 0)
                return 0;
        while (len > 0) {
                size_t n = (size_t) MIN(len, sizeof zeros);
                r = raw_write(img, zeros, off, n);
                if (r < 0)
                        return r;
                off += n;
                len -= n;
        }
        return 0;
}

static int raw_discard(dc_image *img, uint64_t off, uint64_t len) {
        /* A hint: failure to punch is not an error, nor is a discard
         * skipped because the first sector would turn into a header. */
        if (guard_first_sector(img, NULL, off, len) < 0)
                return 0;
        dc_bitmaps_record(img, off, len);
        (void) fallocate(img->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t) off, (off_t) len);
        return 0;
}

static int raw_flush(dc_image *img) {
        int r = dc_fdatasync(img->fd);
        if (r < 0)
                return dc_error(r, "'%s': flush failed: %s", img->path, strerror(-r));
        return 0;
}

static int raw_truncate(dc_image *img, uint64_t size) {
        int r = dc_bitmaps_resize(img, size);

        if (r < 0)
                return r;
        if (ftruncate(img->fd, (off_t) size) < 0)
                return dc_error(errno, "'%s': cannot resize: %m", img->path);
        img->virtual_size = size;
        return 0;
}

const struct dc_driver dc_raw_driver = {
        .name = "raw",
        .format = DC_FORMAT_RAW,
        .open = raw_open,
        .close = raw_close,
        .block_status = raw_block_status,
        .read = raw_read,
        .read_host = raw_read, /* host offset = guest offset */
        .host_fd = dc_image_data_fd,
        .write = raw_write,
        .write_zeroes = raw_write_zeroes,
        .discard = raw_discard,
        .flush = raw_flush,
        .truncate = raw_truncate,
};
