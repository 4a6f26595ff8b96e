/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "diskchain.h"

/*
 * Lock order of the library.  Locks are taken in this order and never the
 * other way round; the last three are leaves.
 *
 *   1. a job's rate gate (dc_job.rate_gate, job.h): under a speed limit,
 *      held by one copy request from before it starts to after the pause
 *      that pays for it;
 *   2. a disk's door and range locks (dc_disk_quiesce, dc_disk_range_lock):
 *      not mutexes held across I/O but admissions, taken by guest requests and
 *      by a job's request before any image lock; the filters on the write
 *      path (copy-before-write, the mirror's write-through) run with the
 *      writer's range held;
 *   3. image locks (dc_image.lock), a layer before its backing file, and
 *      the layers of a chain before a job's separate target; dc_chain_read
 *      holds a layer's lock only to look up where data lies (and to read
 *      what a driver cannot read by host offset), not while it reads the
 *      data or the layer below; an allocating
 *      qcow2 write releases its image lock while its data goes out and
 *      while it waits for another's in-flight clusters (inflight_wait waits
 *      on the image lock's condition, holding nothing else);
 *   4. a job's state lock (dc_job.lock): taken alone or under the above,
 *      never held while taking another but the leaves below;
 *   5. a copy engine's bitmap lock (block-copy.c): taken alone, never across
 *      I/O (its count is read without it);
 *   6. a disk's own mutex (dc_disk.lock), which only guards its counters and
 *      lists (filters, ranges) and is released before anything waits.
 *
 * A job's thread joins its copy workers holding none of them, and takes a
 * filter off a disk (waiting for the writes inside it) holding none.
 */

#define DC_DEFAULT_MAX_DEPTH 64
#define DC_EXPORT __attribute__((visibility("default")))

#define _cleanup_(f) __attribute__((cleanup(f)))
#define _unused_ __attribute__((unused))
#define _printf_(a, b) __attribute__((format(printf, a, b)))

static inline void freep(void *p) {
        free(*(void **) p);
}
#define _cleanup_free_ _cleanup_(freep)
static inline void closep(int *fd) {
        if (*fd >= 0)
                close(*fd);
}
#define _cleanup_close_ _cleanup_(closep)

#define TAKE_PTR(p)                          \
        ({                                   \
                __typeof__(p) _tp_ = (p);    \
                (p) = NULL;                  \
                _tp_;                        \
        })
#define TAKE_FD(fd)                          \
        ({                                   \
                int _tfd_ = (fd);            \
                (fd) = -EBADF;               \
                _tfd_;                       \
        })

#define container_of(ptr, type, member) ((type *) (void *) ((char *) (ptr) - offsetof(type, member)))

#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#define DIV_ROUND_UP(a, b) (((a) + (b) - 1) / (b))
#define ALIGN_UP(a, b) (DIV_ROUND_UP(a, b) * (b))
#define ALIGN_DOWN(a, b) ((a) / (b) * (b))

/* Record the reason of a failure for this thread and return -err. */
int dc_error(int err, const char *fmt, ...) _printf_(2, 3);
void dc_error_clear(void);

/* Lexical normalisation of an absolute path: no ".", "..", "//" (free() it; NULL when out of memory). */
char *dc_path_normalize(const char *abs);

/* NULL-terminated string arrays (storage roots): a copy, and its release (NULL-safe). */
char **dc_strv_copy(const char *const *v);
void dc_strv_free(char **v);

/* Take QEMU's OFD image locks on FD (a reader, or a WRITABLE user); -EBUSY when another holds a conflicting one. */
int dc_lock_fd(int fd, const char *path, bool writable);

int dc_pread_full(int fd, void *buf, size_t len, uint64_t off);
int dc_pwrite_full(int fd, const void *buf, size_t len, uint64_t off);
int dc_fdatasync(int fd);
extern long dc_fault_writes_left;

/* Test hook for power-loss tests (util.c): when DC_TRACE_FD >= 0, completed
 * writes, syncs and the program's marks are appended to it as records in
 * one order, each a struct dc_trace_record (native byte order) followed by
 * LENGTH bytes for writes and marks. */
enum {
        DC_TRACE_WRITE = 'W',      /* LENGTH bytes at OFFSET reached the file; they follow */
        DC_TRACE_SYNC_BEGIN = 'B', /* fdatasync() number OFFSET of the file is asked for */
        DC_TRACE_SYNC_END = 'E',   /* ... and returned RESULT (0 or -errno) */
        DC_TRACE_MARK = 'M',       /* LENGTH bytes of the program's text follow */
};
struct dc_trace_record {
        uint32_t type;
        int32_t result;
        uint64_t dev, ino; /* the file (st_dev, st_ino); 0 for marks */
        uint64_t offset, length;
};
extern int dc_trace_fd;
void dc_trace_mark(const char *fmt, ...) _printf_(1, 2);

static inline uint16_t be16(const void *p) {
        const uint8_t *b = p;
        return (uint16_t) (b[0] << 8 | b[1]);
}
static inline uint32_t be32(const void *p) {
        const uint8_t *b = p;
        return (uint32_t) b[0] << 24 | (uint32_t) b[1] << 16 | (uint32_t) b[2] << 8 | b[3];
}
static inline uint64_t be64(const void *p) {
        const uint8_t *b = p;
        return (uint64_t) be32(b) << 32 | be32(b + 4);
}
static inline void put_be16(void *p, uint16_t v) {
        uint8_t *b = p;
        b[0] = v >> 8;
        b[1] = v;
}
static inline void put_be32(void *p, uint32_t v) {
        uint8_t *b = p;
        b[0] = v >> 24;
        b[1] = v >> 16;
        b[2] = v >> 8;
        b[3] = v;
}
static inline void put_be64(void *p, uint64_t v) {
        put_be32(p, v >> 32);
        put_be32((uint8_t *) p + 4, (uint32_t) v);
}

/* Status of one layer at an offset. */
enum {
        DC_LAYER_UNALLOCATED, /* fall through to the backing file */
        DC_LAYER_ZERO,        /* reads as zeros, allocated in this layer */
        DC_LAYER_DATA,        /* data stored in this layer */
};

struct dc_layer_status {
        int type;
        uint64_t length;
        int64_t host_offset; /* -1 when none */
        bool compressed;
        bool host_hole;      /* DATA stored in a hole of the host file (reads zero) */
};

/*
 * The operations of one format, for one layer (nbdcopy's rw_ops idea).
 * Offsets and lengths given to them are inside the virtual size; the layer
 * lock is held by the caller.
 */
struct dc_driver {
        const char *name;
        int format;
        int (*open)(dc_image *img, bool writable);
        void (*close)(dc_image *img);
        int (*block_status)(dc_image *img, uint64_t off, uint64_t len, struct dc_layer_status *ret);
        /* Read a range whose status is DATA. */
        int (*read)(dc_image *img, void *buf, uint64_t off, size_t len);
        /*
         * Read LEN bytes of guest data stored at HOST (a DATA range's
         * host_offset, not compressed) without the image lock: the
         * descriptors it reads are the image's for its whole life.  NULL:
         * reads go through read() under the lock.
         */
        int (*read_host)(dc_image *img, void *buf, uint64_t host, size_t len);
        /*
         * The descriptor read_host would read LEN bytes at HOST into BUF
         * from, for a caller that does the read itself (dc_chain_map), or
         * -1 when read_host does more than one read of one descriptor.
         * NULL: never.
         */
        int (*host_fd)(dc_image *img, const void *buf, size_t len, uint64_t host);
        int (*write)(dc_image *img, const void *buf, uint64_t off, size_t len);
        int (*write_zeroes)(dc_image *img, uint64_t off, uint64_t len, unsigned flags);
        int (*write_compressed)(dc_image *img, const void *buf, uint64_t off, size_t len);
        int (*discard)(dc_image *img, uint64_t off, uint64_t len);
        int (*flush)(dc_image *img);
        int (*truncate)(dc_image *img, uint64_t size);
        int (*check)(dc_image *img, int repair, struct dc_check_result *ret);
};

extern const struct dc_driver dc_raw_driver;
extern const struct dc_driver dc_qcow2_driver;
extern const struct dc_driver dc_nbd_driver;

/* A job's target: the NBD export URI names, connected, writable (nbd-client.c). */
int dc_nbd_target_open(const char *uri, const struct dc_nbd_client_options *o, dc_image **ret);
/* The same, read-only when !WRITABLE (a read-only export accepted). */
int dc_nbd_image_open(const char *uri, bool writable, const struct dc_nbd_client_options *o, dc_image **ret);
/* Is IMG an NBD export (no file, no backing, never a chain's layer)? */
bool dc_image_is_remote(dc_image *img);
/* The smallest block IMG takes a request of (an NBD server's minimum block size; 1 for files). */
uint64_t dc_image_min_block(dc_image *img);

struct dc_image {
        const struct dc_driver *drv;
        pthread_mutex_t lock;
        int fd;
        int dfd;               /* O_DIRECT twin of fd (dc_image_direct_twin), kept to the close */
        bool direct;           /* data writes go through dfd when aligned (a job's cache=none) */
        bool cache_none;       /* data reads and writes go through dfd when aligned (the disk's cache=none; atomic) */
        bool writeback;        /* a job's cache=writeback: kick writeback as data piles up */
        uint64_t wb_bytes;     /* buffered job data written (atomic) */
        uint64_t wb_kick;      /* writeback is started every this many bytes of them (dc_image_job_cache) */
        uint32_t dio_mem_align, dio_off_align;
        char *path;            /* absolute */
        char **roots;          /* the storage roots it was opened under (a copy; NULL = no confinement) */
        uint64_t virtual_size;
        bool writable;
        bool check_mode;
        bool no_lock;          /* opened without QEMU's image locks: files the driver opens too */
        char *read_only_reason;
        char *backing_file;    /* as stored */
        char *backing_format;  /* from the extension */
        dc_image *backing;
        void *priv;            /* driver state */
        struct dc_bitmap_set *bitmaps; /* loaded for writing, for a change of the set, or holding transient ones; else NULL (qcow2-bitmap.c) */
};

/* Dirty bitmaps on the write path of any format (qcow2-bitmap.c); the image lock is held for all but the record. */
void dc_bitmaps_record(dc_image *img, uint64_t off, uint64_t len); /* any thread */
int dc_bitmaps_resize(dc_image *img, uint64_t size); /* before the disk grows to SIZE */
void dc_bitmaps_close(dc_image *img);                /* stores what a qcow2 file keeps, frees the rest */

/* --- the write path (disk.c) --- */
struct dc_range {
        uint64_t off, end;
        struct dc_range *next;
};
struct dc_range_lock {
        struct dc_range r;
};
void dc_disk_quiesce(dc_disk *d);
void dc_disk_unquiesce(dc_disk *d);
void dc_disk_range_lock(dc_disk *d, struct dc_range_lock *rl, uint64_t off, uint64_t len);
void dc_disk_range_unlock(dc_disk *d, struct dc_range_lock *rl);
dc_image *dc_disk_chain(dc_disk *d);
const struct dc_open_options *dc_disk_open_options(dc_disk *d);

/*
 * A filter on a disk's write path (see the notes in disk.c): embedded in its
 * owner's state, which finds itself again with container_of().  Both hooks
 * run on the writer's thread with the write's range lock held, over the
 * guest's own range (OFF, LEN), for writes, zero writes and discards.
 */
struct dc_disk_filter;
struct dc_disk_filter_ops {
        const char *name;
        /* Before the write reaches the filters below and the chain; < 0 fails the write. */
        int (*before_write)(struct dc_disk_filter *f, uint64_t off, uint64_t len);
        /* After the write succeeded. */
        void (*after_write)(struct dc_disk_filter *f, uint64_t off, uint64_t len);
};
struct dc_disk_filter {
        const struct dc_disk_filter_ops *ops;
        uint64_t align;               /* a write's range lock covers whole units of this size (0 = 1) */
        /* the disk's, under its mutex */
        dc_disk *disk;                /* attached to, or NULL */
        struct dc_disk_filter *next;  /* the one below */
        unsigned users;               /* writes that may run its hooks */
};
#define DC_DISK_MAX_FILTERS 8
/* Put F on top of D's stack (no drain: writes already inside do not run it).  -EBUSY when attached or full. */
int dc_disk_attach_filter(dc_disk *d, struct dc_disk_filter *f);
/* Take F off D's stack; returns once no write runs its hooks.  Not from a hook or under a range lock. */
void dc_disk_detach_filter(dc_disk *d, struct dc_disk_filter *f);
dc_image *dc_disk_swap_chain(dc_disk *d, dc_image *img);
int dc_disk_reopen(dc_disk *d, const char *const *writable);

/* Read [off, off+len) of IMG's chain into BUF (no lock held on IMG). */
int dc_chain_read(dc_image *img, void *buf, uint64_t off, size_t len);
/* Where a read lies, for a reader that does the I/O itself (dc_disk_map_read). */
struct dc_read_map {
        int fd;        /* LEN bytes at HOST of this descriptor, or -1: they read as zeros */
        uint64_t host;
        size_t len;
};
int dc_chain_map(dc_image *img, const void *buf, uint64_t off, size_t len, struct dc_read_map *ret, unsigned max);
int dc_disk_map_read(dc_disk *d, const void *buf, uint64_t off, size_t len, struct dc_read_map *ret, unsigned max);
void dc_disk_unmap_read(dc_disk *d);
/* How IMG takes a job's data while ON (DC_CACHE_*), and back to normal after (block-copy.c). */
void dc_image_job_cache(dc_image *img, int mode, bool on);
int dc_image_pwrite_data(dc_image *img, const void *buf, size_t len, uint64_t off, bool unlocked);
int dc_image_pread_data(dc_image *img, void *buf, size_t len, uint64_t off);
int dc_image_data_fd(dc_image *img, const void *buf, size_t len, uint64_t off);
bool dc_image_direct_twin(dc_image *img);
void dc_image_cache_none(dc_image *img, bool on);
void *dc_io_buffer(size_t len);

int dc_qcow2_create(int fd, uint64_t size, const struct dc_create_options *o, const char *backing_fmt);
int dc_qcow2_probe_header(const uint8_t *buf, size_t len, uint64_t *ret_size);
int dc_qcow2_preallocate(dc_image *img, int mode);
int dc_qcow2_set_backing(dc_image *img, const char *backing, const char *fmt);
/* A backup's bitmap with bitmap-mode on-success or always (qcow2-bitmap.c). */
int dc_image_bitmap_backup_begin(dc_image *img, const char *name, uint8_t **ret, uint64_t *ret_bytes);
int dc_image_bitmap_backup_end(dc_image *img, const char *name, uint8_t *saved, uint64_t saved_bytes,
                               const uint64_t *ranges, size_t n);
int dc_qcow2_compress_cluster(dc_image *img, const void *buf, size_t len, void *out, size_t *ret_clen);
int dc_qcow2_store_compressed_batch(dc_image *img, const uint8_t *raw, uint64_t off, uint64_t len,
                                    uint8_t *const *out, const size_t *clen);
int dc_qcow2_store_compressed(dc_image *img, const void *raw, uint64_t off, size_t len, const void *out,
                              size_t clen);

/* Compression of one cluster: returns the compressed size, or 0 if it does not fit. */
int dc_compress(int type, const void *src, size_t srclen, void *dst, size_t dstcap, size_t *ret_len);
int dc_decompress(int type, const void *src, size_t srclen, void *dst, size_t dstlen);
