/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/*
 * The copy engine every block job uses (QEMU's block/block-copy.c): copies
 * what a bitmap marks from a source view of a chain into a target, with
 * several requests in flight.  The design notes are at the top of
 * block-copy.c.
 */

#include "bitmap.h"
#include "dc-internal.h"

/*
 * Tuning: the one place.  A job copies with DC_COPY_WORKERS requests in
 * flight, each of at most DC_COPY_CHUNK bytes: 16 MiB of buffers in all.
 * One request at a time leaves the disk idle while it reads and while it
 * computes; direct writes from eight at once keep a disk busy (a 4 GiB
 * chain's full backup: 2 MiB x 8 takes two thirds of the time 8 MiB x 2
 * takes).  A mirror's data in flight (buf-size) is DC_COPY_MIRROR_BUF by
 * default, in as many requests of a chunk as it holds.  How the target
 * takes the data (the job option cache) is set in block-copy.c
 * (dc_image_job_cache, with its open flags and writeback kick).
 */
#define DC_COPY_CHUNK (2u << 20)
#define DC_COPY_WORKERS 8u
#define DC_COPY_MAX_WORKERS 16u
#define DC_COPY_MIRROR_BUF (16u << 20)

typedef struct dc_block_copy dc_block_copy;

/*
 * What the engine asks its owner (a job) during a background pass, with
 * the owner's OPAQUE.  Never called with a lock of the engine or a range
 * lock held; never called by dc_block_copy_range().
 */
struct dc_block_copy_hooks {
        /*
         * A pause point before and after every request: DONE bytes of the
         * disk were handled (copied, found clean or unallocated, or skipped
         * after an ignored error), COPIED of them were data moved (what a
         * speed limit counts).  May sleep (pause, speed limit).  < 0 ends
         * the pass with that error (a hard cancel), > 0 ends it early
         * without one (a mirror about to complete).
         */
        int (*pause)(void *opaque, uint64_t done, uint64_t copied);
        /* Under a speed limit requests take turns: take the turn before a request, give it back after its pause. */
        bool (*turn_take)(void *opaque);
        void (*turn_give)(void *opaque, bool taken);
        /* An I/O error of a request (IS_READ: of the source): 0 retries it, 1 skips it, < 0 fails the pass. */
        int (*error)(void *opaque, int err, bool is_read);
};

struct dc_block_copy_params {
        dc_disk *disk;              /* whose range locks the copies take */
        dc_image *source;           /* read through its chain */
        dc_image *target;           /* written, the image lock taken per write */
        /* copy only what is allocated from source (or the layer below it, with
         * skip_target_allocated) down to, not including, stop: stream, commit */
        bool skip_unallocated;
        dc_image *stop;
        /* leave what the target holds itself: a stream, whose target is the top */
        bool skip_target_allocated;
        uint64_t unit;              /* bytes per bit of the bitmap; 0 = the chunk */
        uint64_t chunk;             /* the largest request, a multiple of unit; 0 = DC_COPY_CHUNK */
        unsigned workers;           /* requests in flight in a pass; 0 = DC_COPY_WORKERS, at most DC_COPY_MAX_WORKERS */
        bool compress;              /* whole target clusters compressed */
        unsigned zero_flags;        /* for zeros written to the target (DC_ZERO_MAY_UNMAP) */
        int cache;                  /* DC_CACHE_*: how the target takes the data while the engine exists */
        const struct dc_block_copy_hooks *hooks;
        void *opaque;
        /* the source read through a view of its own (a pull backup's point-in-time view) instead of
         * the chain; the view takes the disk's range locks itself, so the engine takes none */
        int (*read)(void *read_opaque, void *buf, uint64_t off, size_t len);
        void *read_opaque;
};

/* A new engine with a clear bitmap over the source's virtual size. */
int dc_block_copy_new(const struct dc_block_copy_params *p, dc_block_copy **ret);
/* Stop using the target (its cache mode back to normal) and free.  Returns NULL. */
dc_block_copy *dc_block_copy_free(dc_block_copy *bc);

/* Mark [OFF, OFF+LEN) to be copied (whole units); returns how many units were clean. */
uint64_t dc_block_copy_mark(dc_block_copy *bc, uint64_t off, uint64_t len);
/* Mark the whole disk. */
void dc_block_copy_mark_all(dc_block_copy *bc);
/* Clear the whole units inside [OFF, OFF+LEN) (the last may end at the end of the disk). */
void dc_block_copy_unmark(dc_block_copy *bc, uint64_t off, uint64_t len);
/* From OFF, the bytes (at most MAX) whose units are all marked or all clear, and which. */
uint64_t dc_block_copy_marked_run(dc_block_copy *bc, uint64_t off, uint64_t max, bool *ret_marked);
/* Mark what is allocated from FROM down to, not including, STOP. */
int dc_block_copy_mark_allocated(dc_block_copy *bc, dc_image *from, dc_image *stop);
/* Bytes still marked (units times the unit size). */
uint64_t dc_block_copy_dirty(dc_block_copy *bc);
/* What is still marked, as *RET_N (offset, length) pairs in *RET (freed by the caller). */
int dc_block_copy_dirty_ranges(dc_block_copy *bc, uint64_t **ret, size_t *ret_n);

/*
 * A background pass: from the start of the disk to its end, the workers
 * (this thread and helpers) claim the next marked units in turn, at most a
 * chunk each, and copy them under the disk's range lock, with the owner's
 * pause point, speed limit and error policy around every request.  Units
 * marked behind the claims while it runs are left for the next pass.
 * Returns 0 when the pass got to the end or a hook ended it, else the error.
 */
int dc_block_copy_pass(dc_block_copy *bc);
/*
 * Copy the marked units of [OFF, OFF+LEN) now, without the owner's hooks:
 * copy-before-write and write-blocking under the writer's range lock
 * (LOCKED), a mirror's drain on a quiesced disk taking it (!LOCKED).
 * Units that failed stay marked; *RET_READ_ERROR (may be NULL) tells whether
 * the failure was a read of the source.
 */
int dc_block_copy_range(dc_block_copy *bc, uint64_t off, uint64_t len, bool locked, bool *ret_read_error);
/* Flush the target. */
int dc_block_copy_flush(dc_block_copy *bc);

/*
 * Copy-before-write (copy-before-write.c, QEMU's block/copy-before-write.c):
 * a filter on DISK's write path that, before a guest write reaches the
 * chain, copies the units it touches that BC still marks (their data as of
 * the moment they were marked) into BC's target.  If that copy fails, the
 * guest's write fails (QEMU's on-cbw-error=break-guest-write), so the copy
 * stays a true point in time; OWNER names the job in the message.
 */
typedef struct dc_cbw dc_cbw;
int dc_cbw_attach(dc_disk *disk, dc_block_copy *bc, uint64_t unit, const char *owner, dc_cbw **ret);
/*
 * on-cbw-error=break-snapshot instead: a failed copy lets the guest's write
 * through, and BROKEN(USERDATA, message) is called (on the writer's thread,
 * with its range lock held): the point in time is lost from then on.
 */
void dc_cbw_set_break_snapshot(dc_cbw *c, void (*broken)(void *userdata, const char *why), void *userdata);
/* cbw-timeout: a copy taking longer than TIMEOUT_MS (0: no limit) fails as above.  Set with no writer running. */
void dc_cbw_set_timeout(dc_cbw *c, unsigned timeout_ms);
/* Detach (waiting for the writes inside it) and free.  Returns NULL. */
dc_cbw *dc_cbw_detach(dc_cbw *c);
