/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/*
 * libdiskchain — the block layer of diskchain.
 *
 * Reads and writes raw and qcow2 (v2/v3) images and their backing chains,
 * confined to a set of storage roots.  No D-Bus, no polkit, no logging
 * above debug: callers get a negative errno from every function and can
 * fetch a human-readable reason with dc_get_error(), which is kept per
 * thread and stays valid until the next failing call on that thread.
 *
 * Conventions:
 *   - functions return >= 0 on success and -errno on failure; the errno
 *     says what kind of failure it is, so that a service can map it:
 *       EXDEV        a path leaves the storage roots (or goes through a symlink)
 *       EUCLEAN      an image's metadata is invalid or corrupt
 *       EMEDIUMTYPE  not an image, or not of the format it is recorded as
 *       ELOOP        a backing chain loops
 *       EFBIG        beyond a limit (sizes, chain depth, table sizes)
 *       EOVERFLOW    a refcount would overflow
 *       ENOTSUP      a feature that is not supported
 *       EMLINK       writing an image with more than one hard link (refused)
 *       EILSEQ       a write would put an image header into a raw image's first sector (refused)
 *       EBUSY        another process (such as QEMU) holds a conflicting lock
 *       ESTALE       a chain is no longer what the caller expected
 *       EPERM        a job verb the job's status does not allow (QMP's message)
 *       EINVAL       a caller's argument is wrong
 *     and the errno of the system call otherwise (EIO, ENOSPC, ENOENT, ...);
 *   - ret_* out-parameters are written only on success;
 *   - strings returned by getters live as long as the image handle;
 *   - an image handle may be used from several threads: every entry
 *     point takes the layer's lock.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct stat;

#ifdef __cplusplus
extern "C" {
#endif

typedef struct dc_image dc_image;

/* The reason for the last failure on this thread ("" when none). */
const char *dc_get_error(void);
/* The errno of the last failure on this thread (0 when none). */
int dc_get_errno(void);
/* Record a failure for this thread, as the library does (for callbacks such as
 * a format oracle); returns -ERR. */
int dc_set_error(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Forget the failure recorded for this thread. */
void dc_error_clear(void);

enum {
        DC_FORMAT_QCOW2 = 0, /* the default when options are zeroed */
        DC_FORMAT_RAW = 1,
};

/*
 * Who decides each layer's format.  Bytes a guest can write must never
 * decide it: a raw disk whose guest wrote a qcow2 header into its first
 * sector would otherwise name any file as its backing file (the
 * CVE-2008-2004 class of bug).  A service passes an oracle that answers
 * from its own records; without one the library trusts the overlay's
 * backing-format field and otherwise probes the content, which is only
 * right for tools run on files their user made.
 */
struct dc_format_oracle {
        /*
         * The format of the file ABS, open as FD, for a layer being opened.
         * HINT is what the overlay's backing-format field names for it
         * (-1 for the top layer or when the field is absent).  Returns 0
         * and the format, or a negative errno (with dc_error's message)
         * that fails the open.  Called on the opener's thread.
         */
        int (*format)(void *userdata, const char *abs, int fd, int hint, int *ret_format);
        /* A file was just created as FORMAT (dc_image_create): record it. */
        int (*created)(void *userdata, const char *abs, int fd, int format);
        void *userdata;
};

struct dc_open_options {
        const char *const *roots; /* NULL-terminated storage roots; NULL = no confinement */
        const struct dc_format_oracle *oracle; /* NULL: the overlay's backing-format field, else probing */
        unsigned max_depth;       /* longest chain accepted; 0 = default (64) */
        bool writable;            /* open the top layer read-write */
        bool no_backing;          /* open only this layer, not its backing chain */
        bool check_mode;          /* for check/repair: open despite the corrupt bit */
        bool no_lock;             /* skip QEMU-compatible image locking */
        const char *writable_layer; /* open this layer of the chain read-write instead of the top */
        const char *const *writable_layers; /* NULL-terminated: more layers to open read-write */
};

/* -EBUSY from dc_image_open() means another process (such as QEMU) holds a
 * conflicting QEMU-compatible lock on one of the files.  With roots, a
 * writable open of a file with more than one hard link fails with -EMLINK:
 * a link inside a root to a file elsewhere must not become a way to write
 * that file. */
/* True when another open file description holds QEMU's write lock on the open file FD. */
int dc_fd_locked_by_writer(int fd);

/*
 * The name of the image format whose magic the first sector BUF (LEN bytes)
 * carries ("qcow2", "qed", "vmdk", "vdi", "vhdx", "vpc", "luks", "parallels",
 * "bochs", "cloop", "dmg"), or NULL when none: what QEMU's probing would
 * take the file for.
 */
const char *dc_probe_magic(const uint8_t *buf, size_t len);

/* Open PATH (absolute, or relative to roots[0]) and its backing chain. */
int dc_image_open(const char *path, const struct dc_open_options *opts, dc_image **ret);
/* Close the image and its backing chain.  Returns NULL. */
dc_image *dc_image_close(dc_image *img);

struct dc_create_options {
        int format;                 /* DC_FORMAT_QCOW2 (default) or DC_FORMAT_RAW */
        const struct dc_format_oracle *oracle; /* told of the new file (created), asked for the backing file */
        const char *backing;        /* backing file name as it will be stored, or NULL */
        int backing_format;         /* -1 = probe the backing file */
        uint32_t cluster_size;      /* 0 = 65536 */
        int compat;                 /* 2 (0.10) or 3 (1.1); 0 = 3 */
        int compression_type;       /* 0 zlib, 1 zstd */
        int preallocation;          /* DC_PREALLOC_* */
        bool lazy_refcounts;
        uint32_t refcount_bits;     /* 0 = 16 */
        /*
         * The backing file is this process's own, open read-write elsewhere
         * (an NBD export's active layer, for a snapshot): read it without
         * QEMU's locks, which would conflict with our own.
         */
        bool backing_ours;
};

enum {
        DC_PREALLOC_OFF = 0,
        DC_PREALLOC_METADATA,
        DC_PREALLOC_FALLOC,
        DC_PREALLOC_FULL,
};

/* Create a new image at PATH (must not exist).  size 0 with a backing file
 * takes the backing file's virtual size.  The file is removed on failure. */
int dc_image_create(const char *path, uint64_t size, const struct dc_create_options *opts,
                    const char *const *roots);

/* Guest I/O on the chain: reads fall through the layers, writes go to the top. */
int dc_image_read(dc_image *img, void *buf, uint64_t offset, size_t length);
int dc_image_write(dc_image *img, const void *buf, uint64_t offset, size_t length);
/* DC_ZERO_MAY_UNMAP lets the driver deallocate instead of keeping clusters. */
#define DC_ZERO_MAY_UNMAP 1u
int dc_image_write_zeroes(dc_image *img, uint64_t offset, uint64_t length, unsigned flags);
/* Whole clusters only (the last may be short at the end of the image). */
int dc_image_write_compressed(dc_image *img, const void *buf, uint64_t offset, size_t length);
int dc_image_discard(dc_image *img, uint64_t offset, uint64_t length);
int dc_image_flush(dc_image *img);
/* Grow the virtual size (shrinking is refused with -ENOTSUP). */
int dc_image_truncate(dc_image *img, uint64_t size);

/* One extent of block status, for the chain or one layer. */
struct dc_extent {
        uint64_t start, length;
        unsigned depth;       /* 0 = top layer */
        bool present;         /* allocated in some layer (zero clusters count) */
        bool zero;            /* reads as zeros */
        bool data;            /* data stored (not a hole / zero cluster) */
        bool compressed;
        int64_t host_offset;  /* -1 when none */
};

/* Status of the chain at OFFSET, covering as much of LENGTH as is uniform. */
int dc_image_block_status(dc_image *img, uint64_t offset, uint64_t length, struct dc_extent *ret);

typedef int (*dc_map_cb)(const struct dc_extent *e, void *userdata);
/* Walk [offset, offset+length) as `qemu-img map` would, merging equal neighbours. */
int dc_image_map(dc_image *img, uint64_t offset, uint64_t length, dc_map_cb cb, void *userdata);

/* A persistent dirty bitmap of a qcow2 image (the bitmaps extension, as QEMU stores them). */
struct dc_bitmap_info {
        char *name;
        uint32_t granularity;   /* bytes per bit */
        bool in_use;            /* a writer has it (or had it, and stopped without saving it): inconsistent */
        bool enabled;           /* records writes ("auto") */
        uint64_t dirty;         /* bytes marked dirty (0 when in_use) */
        bool busy;              /* a backup holds it (the daemon also sets it: in use by its own writer) */
        bool transient;         /* in memory only, as long as the open that holds it (maybe another of this process) */
};
/* IMG's bitmaps as its file holds them now (none for raw images); free with dc_bitmap_info_free. */
int dc_image_bitmaps(dc_image *img, struct dc_bitmap_info **ret, size_t *ret_n);
void dc_bitmap_info_free(struct dc_bitmap_info *v, size_t n);
typedef int (*dc_bitmap_extent_cb)(void *userdata, uint64_t offset, uint64_t length);
/*
 * The dirty ranges of bitmap NAME in order, runs merged: -ENOENT when IMG
 * has none of that name, -ESTALE when it is in use (inconsistent).
 */
int dc_image_bitmap_extents(dc_image *img, const char *name, dc_bitmap_extent_cb cb, void *userdata);
/*
 * Changes of IMG's bitmaps (IMG open for writing; persistent ones need
 * qcow2 v3), each stored in the file before it returns, crash-safe (a
 * transient one's only in memory); while IMG is being written, the enabled
 * bitmaps record the writes and the persistent ones are stored at its
 * close.
 * -ENOENT: no bitmap of that name; -ESTALE: it is inconsistent (only
 * removal works).
 */
/* Recording of bitmap NAME on or off. */
int dc_image_bitmap_set_enabled(dc_image *img, const char *name, bool enabled);
/*
 * A new, empty bitmap; GRANULARITY 0: QEMU's default (the cluster size
 * within 4-64 KiB; 64 KiB for raw); -EEXIST.  DC_BITMAP_TRANSIENT: kept in
 * memory only, recording this open's writes until its close (any format,
 * as QEMU's non-persistent bitmaps); the file never holds it.
 */
enum { DC_BITMAP_DISABLED = 1u << 0, DC_BITMAP_TRANSIENT = 1u << 1 };
int dc_image_bitmap_add(dc_image *img, const char *name, uint32_t granularity, unsigned flags);
int dc_image_bitmap_remove(dc_image *img, const char *name);
/* Every bit of NAME reset. */
int dc_image_bitmap_clear(dc_image *img, const char *name);
/* TARGET |= each of the N SOURCES (granularities may differ); TARGET unchanged on failure. */
int dc_image_bitmap_merge(dc_image *img, const char *target, const char *const *sources, size_t n);
/*
 * A commit: BASE takes the place of the N LAYERS above it (the top-most
 * first), and their bitmaps move into its own, as libvirt merges them
 * around QEMU's block-commit.  Each name is ORed into base's bitmap of that
 * name (made when base has none, with the top-most layer's granularity),
 * which takes the top-most layer's recording state; an inconsistent one
 * makes base's inconsistent too.  One crash-safe store; nothing for a raw
 * or qcow2 v2 base.
 */
int dc_image_bitmaps_commit(dc_image *base, dc_image *const *layers, size_t n);
/* A copy of bitmap NAME's bits as they are now (-ENOENT, -ESTALE as above), for an export. */
typedef struct dc_bitmap_copy dc_bitmap_copy;
int dc_image_bitmap_copy(dc_image *img, const char *name, dc_bitmap_copy **ret);
/* Accepts NULL; returns NULL. */
dc_bitmap_copy *dc_bitmap_copy_free(dc_bitmap_copy *c);
/* From OFF (below the disk's size), the run of at most MAX bytes that is all dirty or all clean: its length (0 at the end). */
uint64_t dc_bitmap_copy_run(const dc_bitmap_copy *c, uint64_t off, uint64_t max, bool *ret_dirty);

enum {
        DC_REPAIR_NONE = 0,
        DC_REPAIR_LEAKS = 1,
        DC_REPAIR_ALL = 2,
};

struct dc_check_result {
        uint64_t check_errors, corruptions, leaks, corruptions_fixed, leaks_fixed;
        uint64_t image_end_offset, total_clusters, allocated_clusters;
        uint64_t fragmented_clusters, compressed_clusters;
};

/* Check the top layer (qcow2 only; raw gives -ENOTSUP).  Repairs need a
 * writable handle opened with check_mode. */
int dc_image_check(dc_image *img, int repair, struct dc_check_result *ret);

/* Properties of one layer. */
const char *dc_image_path(dc_image *img);
/* The layer's open file (valid while the image is open; do not close it). */
int dc_image_fd(dc_image *img);
/* A qcow2 layer's external data file: the name as stored, and as resolved
 * (absolute, inside the roots); "" when none. */
const char *dc_image_data_file(dc_image *img);
const char *dc_image_data_file_path(dc_image *img);
int dc_image_format(dc_image *img);
const char *dc_format_name(int format);
uint64_t dc_image_virtual_size(dc_image *img);
uint64_t dc_image_actual_size(dc_image *img);
uint32_t dc_image_cluster_size(dc_image *img);      /* 0 for raw */
const char *dc_image_compat(dc_image *img);          /* "0.10", "1.1" or "" */
const char *dc_image_compression_type(dc_image *img); /* "zlib", "zstd" or "" */
const char *dc_image_backing_file(dc_image *img);    /* as stored, "" when none */
const char *dc_image_backing_format(dc_image *img);  /* from the header extension, or "" */
dc_image *dc_image_backing(dc_image *img);           /* next layer, NULL at the base */
bool dc_image_dirty(dc_image *img);
bool dc_image_corrupt(dc_image *img);
bool dc_image_encrypted(dc_image *img);
bool dc_image_read_only(dc_image *img);
/* Why a writable open was refused or downgraded ("" when it was not). */
const char *dc_image_read_only_reason(dc_image *img);
unsigned dc_image_refcount_bits(dc_image *img);
bool dc_image_lazy_refcounts(dc_image *img);

/*
 * Path confinement.  Resolve PATH (absolute, or relative to roots[0]) to a
 * normalised absolute path inside one of ROOTS.  Returns -EPERM (with a
 * reason) for paths that leave the roots.
 */
int dc_path_resolve(const char *path, const char *const *roots, char **ret_abs, size_t *ret_root_index);
/*
 * Open ABS (already resolved) beneath its root, relative to the root's
 * directory, following no symlink at all (RESOLVE_NO_SYMLINKS) and, for a
 * file, not blocking on a FIFO (O_NONBLOCK, cleared again for regular files).
 */
int dc_path_open(const char *abs, const char *const *roots, int flags, mode_t mode);
/*
 * Remove ABS relative to its directory opened beneath the root; when
 * EXPECT is given, only if ABS is still that file (st_dev, st_ino), so a
 * file swapped in meanwhile is left alone (-ESTALE).
 */
int dc_path_unlink(const char *abs, const char *const *roots, const struct stat *expect);

/* Resolve a backing name stored in OVERLAY_ABS to an absolute normalised path. */
int dc_backing_resolve(const char *overlay_abs, const char *backing, char **ret_abs);

/* Record a new backing file in a qcow2 header (NULL = none). */
int dc_image_set_backing(dc_image *img, const char *backing, const char *backing_format);

/*
 * The write path of one open chain (QEMU's BlockBackend).  Writers go
 * through it and never hold the chain's images themselves, so that a job
 * attached to it can copy before writes (backup), track or copy them
 * (mirror, active commit), keep a stream correct under them, and switch the
 * writers to a new top at a pivot without losing a write.  Thread-safe.
 */
typedef struct dc_disk dc_disk;

/* Open PATH's chain; opts->writable for writers. */
int dc_disk_open(const char *path, const struct dc_open_options *opts, dc_disk **ret);
/* A disk over CHAIN (its top the active layer, opened with OPTS), which it owns from now on, also on failure. */
int dc_disk_new(dc_image *chain, const struct dc_open_options *opts, dc_disk **ret);
dc_disk *dc_disk_ref(dc_disk *d);
/* Drop a reference; the chain is closed with the last.  Returns NULL. */
dc_disk *dc_disk_unref(dc_disk *d);
int dc_disk_read(dc_disk *d, void *buf, uint64_t offset, size_t length);
int dc_disk_write(dc_disk *d, const void *buf, uint64_t offset, size_t length);
int dc_disk_write_zeroes(dc_disk *d, uint64_t offset, uint64_t length, unsigned flags);
int dc_disk_discard(dc_disk *d, uint64_t offset, uint64_t length);
int dc_disk_flush(dc_disk *d);
uint64_t dc_disk_size(dc_disk *d);
/* The path of the current active layer (changes at a pivot); free() it. */
char *dc_disk_top_path(dc_disk *d);
/*
 * The disk's active layer, owned by the disk, for a call on it while the
 * caller keeps the chain from changing (no job may pivot or reopen it).
 */
dc_image *dc_disk_active(dc_disk *d);
/*
 * blockdev-snapshot on a disk with writers: OVERLAY (an image whose backing
 * file is the disk's active layer) becomes the active layer.  The writers
 * wait at the door meanwhile; every layer is flushed first, and on failure
 * the chain is as it was.  -EBUSY while a job's filter is attached.
 */
int dc_disk_snapshot(dc_disk *d, const char *overlay);

/*
 * Status of the disk's chain at OFFSET (as dc_image_block_status), read
 * through the door so that it never sees a chain a pivot is replacing.
 */
int dc_disk_block_status(dc_disk *d, uint64_t offset, uint64_t length, struct dc_extent *ret);
/* The number of layers of the disk's chain (allocation depths run 1..this). */
unsigned dc_disk_depth(dc_disk *d);

/*
 * A point-in-time view of a live disk for pull backups (lib/snapshot-access.c):
 * image fleecing.  From dc_snapshot_new on, a guest write through the disk
 * first copies the old data it is about to change into the fleecing image,
 * and the view reads each area from where its point-in-time data is.
 */
typedef struct dc_snapshot dc_snapshot;
struct dc_snapshot_options {
        const char *fleece;              /* an empty qcow2 image of the disk's size, opened here read-write */
        const struct dc_open_options *open;
        bool discard_after_read;         /* whole units read once are dropped (reading them again fails) */
        bool break_snapshot;             /* on-cbw-error=break-snapshot (else break-guest-write) */
        unsigned cbw_timeout_ms;         /* a copy-before-write taking longer fails (cbw-timeout); 0: no limit */
        const char *bitmap;              /* a bitmap of the top layer, frozen at the point in time into *RET_BITMAP */
        dc_bitmap_copy **ret_bitmap;
        const char *checkpoint;          /* a bitmap added to the top layer (writable) at the point in time */
};
int dc_snapshot_new(dc_disk *disk, const struct dc_snapshot_options *o, dc_snapshot **ret);
/* Detach from the disk and close the fleecing image (the caller removes the file).  Returns NULL. */
dc_snapshot *dc_snapshot_free(dc_snapshot *s);
uint64_t dc_snapshot_size(dc_snapshot *s);
int dc_snapshot_read(dc_snapshot *s, void *buf, uint64_t off, size_t len);
int dc_snapshot_block_status(dc_snapshot *s, uint64_t off, uint64_t len, struct dc_extent *ret);

/*
 * An NBD server for one disk (lib/nbd-server.c), as qemu-storage-daemon's
 * NBD export: the fixed newstyle handshake, structured replies, block
 * status (base:allocation, qemu:allocation-depth), every request served on
 * the export's own threads through the disk's write path.  Nothing of it
 * runs on the caller's thread but dc_nbd_export_new/serve/free.
 */
typedef struct dc_nbd_export dc_nbd_export;

struct dc_nbd_export_options {
        const char *name;           /* the export name clients ask for */
        const char *description;    /* NBD_INFO_DESCRIPTION, or NULL */
        bool writable;
        unsigned max_connections;   /* 0 = 16; beyond it a new connection is closed at once */
        /* offered as the metadata context qemu:dirty-bitmap:BITMAP_NAME; the export owns BITMAP once made */
        const char *bitmap_name;
        dc_bitmap_copy *bitmap;
        /* serve this view of the disk instead (read-only; the caller frees it after the export) */
        dc_snapshot *snapshot;
        /*
         * Called on a server thread (with no lock of the export held) when a
         * client connects or leaves, and at most every 100 ms while
         * requests are served, so that the owner can publish statistics.
         */
        void (*changed)(void *userdata);
        void *userdata;
};

/* An export of DISK (it takes a reference of its own). */
int dc_nbd_export_new(dc_disk *disk, const struct dc_nbd_export_options *opts, dc_nbd_export **ret);
/*
 * Serve the connected stream socket FD (owned from now on, also on
 * failure) on a thread of the export: handshake, then requests until the
 * client disconnects or the export is freed.  -EBUSY at max_connections,
 * -ESHUTDOWN once the export is stopping.
 */
int dc_nbd_export_serve(dc_nbd_export *e, int fd);
/*
 * Accept connections on the listening socket LISTEN_FD (owned from now on)
 * on a thread of the export.  ALLOW (NULL: everyone) decides on the
 * peer's SO_PEERCRED credentials before a byte is read; a refused peer is
 * closed at once.  TLS is not offered (dc_nbd_export_listen_tls is).
 */
int dc_nbd_export_listen(dc_nbd_export *e, int listen_fd, bool (*allow)(void *userdata, uid_t uid, pid_t pid),
                         void *userdata);

/*
 * TLS credentials for NBD (GnuTLS), loaded once and shared by reference
 * among the listeners that require TLS.  At least one kind is given:
 *   - X.509: X509_DIR holds server-cert.pem and server-key.pem (PEM), and
 *     ca-cert.pem, the CA that client certificates must chain to, as QEMU's
 *     tls-creds-x509 lays a directory out.  With VERIFY_PEER a client must
 *     present a certificate that verifies against ca-cert.pem (which is then
 *     required); without it any client that completes the handshake is in,
 *     and only the server is authenticated.
 *   - PSK: PSK_FILE holds "identity:hexkey" lines, as psktool(1) writes
 *     them; a client is in when it proves one of the keys.
 * Both may be given: a client authenticates with either.  The files are
 * read here (a missing or unreadable file is -ENOENT/-EACCES, an invalid
 * one -EINVAL), so a later change to them takes effect only through new
 * credentials.  ret_* is the caller's reference.
 */
typedef struct dc_nbd_tls dc_nbd_tls;
struct dc_nbd_tls_options {
        const char *x509_dir;       /* or NULL */
        bool verify_peer;           /* X.509: require and verify a client certificate */
        const char *psk_file;       /* or NULL */
};
int dc_nbd_tls_new(const struct dc_nbd_tls_options *opts, dc_nbd_tls **ret);
dc_nbd_tls *dc_nbd_tls_ref(dc_nbd_tls *t);
/* Accepts NULL; returns NULL. */
dc_nbd_tls *dc_nbd_tls_unref(dc_nbd_tls *t);
/*
 * As dc_nbd_export_listen, on a socket of any family (unix, TCP): with TLS
 * non-NULL (the listener takes a reference) every connection accepted on
 * it must upgrade with NBD_OPT_STARTTLS before anything else (the
 * protocol's FORCEDTLS mode: every other option is answered with
 * NBD_REP_ERR_TLS_REQD, NBD_OPT_EXPORT_NAME closes the connection); a
 * client that fails the TLS handshake, or does not finish it within the
 * handshake timeout (10 s from the accept, for the whole NBD handshake),
 * is closed.  TLS is a listener's property, not the export's, so the same
 * export can be served over TLS on TCP and in plaintext on a unix socket
 * whose peers ALLOW checks by their credentials.  ALLOW gets uid
 * (uid_t) -1 and pid 0 for a peer that has no SO_PEERCRED (TCP).
 */
int dc_nbd_export_listen_tls(dc_nbd_export *e, int listen_fd, dc_nbd_tls *tls,
                             bool (*allow)(void *userdata, uid_t uid, pid_t pid), void *userdata);
struct dc_nbd_export_stats {
        unsigned clients;
        uint64_t bytes_read, bytes_written, requests;
};
void dc_nbd_export_get_stats(dc_nbd_export *e, struct dc_nbd_export_stats *ret);
/*
 * Stop: accept no more connections and no more requests, let the requests
 * in flight complete and their replies go out, disconnect every client,
 * wait for the export's threads, flush the disk and drop the reference.
 * Returns NULL.
 */
dc_nbd_export *dc_nbd_export_free(dc_nbd_export *e);

/*
 * Block jobs, with QEMU's job model (qapi/job.json, job.c): the statuses,
 * the transition and verb tables, auto-finalize/auto-dismiss, speed limits,
 * on-error policies and the event order.  A job runs on its own thread;
 * events are queued and the owner is woken through opts.notify (called on
 * the job's thread) to fetch them with dc_job_next_event() on its own.
 */
typedef struct dc_job dc_job;

enum {
        DC_JOB_CREATED, DC_JOB_RUNNING, DC_JOB_PAUSED, DC_JOB_READY, DC_JOB_STANDBY, DC_JOB_WAITING,
        DC_JOB_PENDING, DC_JOB_ABORTING, DC_JOB_CONCLUDED, DC_JOB_NULL,
};
enum { DC_JOB_TYPE_STREAM, DC_JOB_TYPE_COMMIT, DC_JOB_TYPE_MIRROR, DC_JOB_TYPE_BACKUP };
enum { DC_ON_ERROR_REPORT, DC_ON_ERROR_IGNORE, DC_ON_ERROR_STOP, DC_ON_ERROR_ENOSPC };
enum { DC_IO_OK, DC_IO_FAILED, DC_IO_NOSPACE };
enum { DC_EV_STATUS, DC_EV_READY, DC_EV_PENDING, DC_EV_COMPLETED, DC_EV_CANCELLED, DC_EV_ERROR };

struct dc_job_event {
        int kind;
        int status;                 /* DC_EV_STATUS */
        uint64_t len, offset, speed;
        uint64_t copied;            /* data the job copied so far (offset counts skipped ranges too) */
        char error[512];            /* DC_EV_COMPLETED: empty on success */
        const char *operation;      /* DC_EV_ERROR: "read" or "write" */
        const char *action;         /* DC_EV_ERROR: "report", "ignore" or "stop" */
};

/* How a job writes its data (QEMU's cache modes): through the page cache, or around it (O_DIRECT). */
enum { DC_CACHE_WRITEBACK, DC_CACHE_NONE };

/*
 * The cache mode of a disk's guest I/O, on every layer of its chain and of
 * the chains a pivot or a snapshot gives it later: DC_CACHE_NONE reads and
 * writes whole, aligned data around the page cache (qemu-nbd --cache=none),
 * where the file system allows it; DC_CACHE_WRITEBACK (the default) through
 * it.  Durability is the same either way: a flush makes writes durable.
 */
void dc_disk_set_cache(dc_disk *d, int mode);

struct dc_job_options {
        const char *id;
        int cache;                  /* DC_CACHE_*, for the layer the job writes; the end is durable either way */
        uint64_t speed;             /* bytes per second, 0 = unlimited */
        int on_error;               /* reads, and writes unless on_target_error is set */
        bool has_target_error;
        int on_target_error;        /* writes (backup's on-target-error) */
        bool auto_finalize, auto_dismiss;
        void (*notify)(void *userdata);
        void *userdata;
        dc_disk *disk;              /* the chain's write path when it has writers; NULL = the job opens its own */
        /*
         * The chain as the caller authorized it (absolute paths, active
         * layer first, NULL-terminated), or NULL: the job fails with
         * -ESTALE when the chain it opens is another one.
         */
        const char *const *expect_chain;
        /*
         * A pivot (mirror or active commit complete) makes NEW_TOP the
         * active layer and drops DROPPED (NULL-terminated, bottom first, the
         * old active layer last).  Called on the job's thread after the new
         * top is flushed and before the writers move: the caller records it
         * durably (that is the pivot's commit point) or fails it.  NULL = no
         * record.
         */
        int (*pivoted)(void *userdata, const char *new_top, const char *const *dropped);
        /* How a backup's or mirror's NBD URI target is reached (NULL: as the URI says, no URI files). */
        const struct dc_nbd_client_options *nbd;
};

/*
 * block-stream: copy into TOP_PATH what its backing files above BASE_PATH
 * hold (BASE_PATH NULL = flatten), then make BASE the backing file of top
 * (recorded as BACKING_FILE, or a name relative to top's directory).
 */
int dc_job_stream(const char *top_path, const char *base_path, const char *backing_file,
                  const struct dc_open_options *oo, const struct dc_job_options *jo, dc_job **ret);
/*
 * Intermediate block-commit: copy what TOP_PATH and the layers below it
 * hold above BASE_PATH into base, then point OVERLAY_PATH (top's overlay)
 * at base.  Base grows when it is smaller than top.
 * Active commit (OVERLAY_PATH NULL: TOP_PATH is the active layer): the
 * mirror engine copies into base until it is in sync (ready); complete
 * makes base the active layer, a soft cancel leaves the chain as it was.
 */
int dc_job_commit(const char *overlay_path, const char *top_path, const char *base_path,
                  const char *backing_file, const struct dc_open_options *oo,
                  const struct dc_job_options *jo, dc_job **ret);

/* BITMAP and INCREMENTAL: backup only (INCREMENTAL is BITMAP with DC_BITMAP_MODE_ON_SUCCESS). */
enum { DC_SYNC_FULL, DC_SYNC_TOP, DC_SYNC_NONE, DC_SYNC_INCREMENTAL, DC_SYNC_BITMAP };
/* What a backup does to its bitmap at the end (QEMU's BitmapSyncMode); UNSET: none given. */
enum { DC_BITMAP_MODE_UNSET, DC_BITMAP_MODE_ON_SUCCESS, DC_BITMAP_MODE_NEVER, DC_BITMAP_MODE_ALWAYS };
struct dc_backup_options {
        int sync;                   /* DC_SYNC_* */
        const char *bitmap;         /* a persistent bitmap of the source's top layer, or NULL */
        int bitmap_mode;            /* DC_BITMAP_MODE_* */
        const char *checkpoint;     /* a new bitmap added to the source at the point in time, or NULL */
        bool replace_checkpoint;    /* ... replacing one of that name (even an inconsistent one), if any */
        /*
         * A pull backup (QEMU's backup with fleecing): the copy reads a point-in-time view of the
         * disk whose copy-before-write data goes into FLEECE (an empty qcow2 of the disk's size,
         * made and removed by the caller), not into the target, so guest writes wait on that image
         * only, however slow the target; what was read is dropped from it.  NULL: push.
         */
        const char *fleece;
        bool compress;              /* write compressed clusters (qcow2 target) */
        unsigned max_workers;       /* copy requests in flight (they compress side by side); 0 = 8, at most 16 */
        uint64_t max_chunk;         /* largest request, at least the target's cluster size; 0 = 2 MiB, the most */
};
/*
 * drive-backup: a point-in-time copy of SOURCE_PATH's chain into the
 * existing image TARGET_PATH (same virtual size): everything (full), what
 * the top layer holds (top), what a bitmap of the top layer marks dirty
 * (bitmap, with bitmap-mode never), or nothing until cancelled (none).
 */
int dc_job_backup(const char *source_path, const char *target_path, const struct dc_backup_options *bo,
                  const struct dc_open_options *oo, const struct dc_job_options *jo, dc_job **ret);

enum { DC_COPY_MODE_BACKGROUND, DC_COPY_MODE_WRITE_BLOCKING };
struct dc_mirror_options {
        int sync;                   /* DC_SYNC_*: the chain, the top layer, or only new writes */
        bool existing;              /* the target was not created for this job: it may not read as zeros */
        uint32_t granularity;       /* dirty-tracking chunk, power of two 512 B..64 MiB; 0 = target cluster */
        uint64_t buf_size;          /* data in flight; 0 = 16 MiB */
        bool unmap;                 /* deallocate on the target where the source reads as zeros */
        int copy_mode;              /* DC_COPY_MODE_* */
};
/*
 * drive-mirror: copy SOURCE_PATH's chain (full), its top layer (top) or
 * only new writes (none) into TARGET_PATH, whose own backing is used at
 * the pivot.  The job reaches ready once in sync and keeps it so; complete
 * switches the chain's writers to the target; a soft cancel leaves a
 * point-in-time copy.  A target of another size fails the job at run time.
 */
int dc_job_mirror(const char *source_path, const char *target_path, const struct dc_mirror_options *mo,
                  const struct dc_open_options *oo, const struct dc_job_options *jo, dc_job **ret);
/* block-job-change: background -> write-blocking only. */
int dc_job_change_copy_mode(dc_job *j, int copy_mode);

/*
 * Remote targets (lib/nbd-client.c): the TARGET_PATH of dc_job_backup and
 * dc_job_mirror may be an NBD URI, nbd://HOST[:PORT]/EXPORT,
 * nbd+unix:///EXPORT?socket=PATH, or nbds:// / nbds+unix:// (TLS
 * required), reached with libnbd.  The export must be writable and of the
 * source's size; it is always treated as an existing target (a full mirror
 * copies every unit that does not read as zeros there).  A mirror onto it
 * is never completed (-ENOTSUP: its target cannot become a local chain's
 * active layer); its soft cancel once ready leaves a flushed point-in-time
 * copy.  Backup's compress is refused.  A URI is never a chain's layer or
 * backing file.
 * The SOURCE_PATH of dc_job_backup may be a URI too (restoring a replica):
 * the export, opened read-only, is the whole chain; no bitmap and no
 * checkpoint (it has none of ours), and nothing writes it meanwhile but
 * its own server's clients, which the backup does not see.
 */
struct dc_nbd_client_options {
        /*
         * Connect the Unix socket PATH (an nbd+unix URI's, normalised) and
         * return the connected socket, taken over by the library, or a
         * negative errno with dc_set_error's reason.  A service checks here
         * whom it connects to for whom.  NULL: the library connects.
         */
        int (*connect_unix)(void *userdata, const char *path);
        void *userdata;
        const char *tls_certificates; /* x509 directory (ca-cert.pem, client-cert.pem, client-key.pem), or NULL */
        const char *tls_psk_file;     /* PSK file (username:hexkey lines), or NULL */
        bool allow_uri_files;         /* honour the URI's tls-certificates= and tls-psk-file= (tools only) */
        /*
         * A server that answers no request for this long while some wait is
         * taken for gone: the connection is shut down and the requests fail
         * with ETIMEDOUT (0 = five minutes).
         */
        unsigned stall_ms;
};
/* Does S start like an NBD URI (nbd://, nbds://, nbd+unix://, nbds+unix://)? */
bool dc_nbd_uri_is(const char *s);
/*
 * Check URI and give its normal form (free() it): default port spelled
 * out, socket path normalised, one spelling per export, so that two
 * spellings of one export compare equal; *RET_SOCKET (may be NULL) the
 * socket path of an nbd+unix URI, or NULL.  -EINVAL with the reason for a
 * malformed URI or an unknown parameter, -EPERM for tls-certificates= or
 * tls-psk-file= unless ALLOW_FILES.
 */
int dc_nbd_uri_normalize(const char *uri, bool allow_files, char **ret_normal, char **ret_socket);
/*
 * An NBD export as an image of its own, for reading (WRITABLE false: a
 * read-only export is accepted; writes fail with EROFS) or, WRITABLE, as
 * the jobs' targets open it.  Reads, block status and flush as a job's
 * target has them; dc_image_close() disconnects.  A service reads a
 * replica back with it (a plan's checksums of what it stored).
 */
int dc_image_open_nbd(const char *uri, bool writable, const struct dc_nbd_client_options *o, dc_image **ret);

const char *dc_job_id(dc_job *j);
int dc_job_type(dc_job *j);
int dc_job_status(dc_job *j);
const char *dc_job_status_name(int status);
const char *dc_job_type_name(int type);
/* Progress, speed and state, read under the job's lock. */
struct dc_job_info {
        int status, io_status;
        uint64_t len, offset, speed;
        uint64_t copied;            /* data copied so far; OFFSET counts ranges found clean or skipped too */
        bool busy, paused, ready, auto_finalize, auto_dismiss, actively_synced;
        char error[512];
};
void dc_job_get_info(dc_job *j, struct dc_job_info *ret);
/* 1 and an event, or 0 when the queue is empty. */
int dc_job_next_event(dc_job *j, struct dc_job_event *ret);

/* Verbs: -EPERM with QMP's message when the status does not allow them. */
int dc_job_pause(dc_job *j);
int dc_job_resume(dc_job *j);
int dc_job_set_speed(dc_job *j, uint64_t speed);
int dc_job_cancel(dc_job *j, bool force);
int dc_job_complete(dc_job *j);
int dc_job_finalize(dc_job *j);
int dc_job_dismiss(dc_job *j);
/* Wait for the job's thread (after status null) and free it. */
dc_job *dc_job_free(dc_job *j);

#ifdef __cplusplus
}
#endif
