/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * drive-backup (QEMU's block/backup.c): a point-in-time copy of a chain
 * into a separate, existing target of the same size.
 *
 * Design notes
 * ------------
 * - The point in time is the moment the constructor returns: with the disk
 *   quiesced, the copy-before-write filter (copy-before-write.c) goes onto
 *   the disk and the engine marks what is to be copied: everything
 *   allocated in the chain (full), in the top layer (top), or every unit
 *   (none: nothing in the background, only what guests are about to
 *   overwrite).  The unit is the target's cluster (64 KiB for raw), or
 *   max-chunk when that is smaller, so a copy-before-write writes whole
 *   target clusters.
 * - From then on two things copy through the same engine: the filter,
 *   before a guest write, the marked units it touches; and the job's
 *   background pass, everything still marked.  Each clears what it copied,
 *   the range lock keeps them apart, so every unit is copied once and
 *   before any guest write reaches it.
 * - sync=none never ends by itself: its run waits at a pause point until
 *   cancelled (QEMU's fleecing backup).
 * - A pull backup (fleece, QEMU's backup with fleecing since 9.1) puts no
 *   filter of its own on the disk: a point-in-time view (snapshot-access.c)
 *   keeps the old data in the fleecing image, and the engine reads the
 *   view instead of the chain (its read hook; the view takes the range
 *   locks), dropping what it read from the image.  A guest write then
 *   waits on the fleecing image only, never on the target.
 * - sync=bitmap (and incremental) copies what a persistent bitmap of the
 *   source layer marks dirty, read at the point in time; QEMU's argument
 *   rules are kept, and an inconsistent bitmap is refused, since only a
 *   full backup is safe then.  With bitmap-mode on-success or always the
 *   bitmap is reset at the point in time and records the writes from then
 *   on, held in use on disk while the job runs (QEMU's successor,
 *   qcow2-bitmap.c); at the end a success keeps it so, a failure or cancel
 *   ORs back what it held (on-success) or what was not copied (always).
 *   The source layer is opened writable for that (its metadata changes).
 *   bitmap-mode never leaves the bitmap alone.  checkpoint adds a new
 *   bitmap at the point in time (the transaction of bitmap-add and backup).
 * - max-workers and max-chunk size the background pass (QEMU's x-perf);
 *   compress writes whole target clusters compressed, on the requests'
 *   threads side by side.
 * - clean takes the filter off (waiting for the writes inside it) before
 *   the engine and the target go.
 * - Locking: the job's own fields are set before the job's thread starts
 *   and read only by it afterwards; the filter runs on writers' threads
 *   and touches only the engine.
 */

#include <stdio.h>
#include <time.h>

#include "job.h"

struct backup {
        dc_job job;
        dc_image *source;       /* the layer copied, read through its chain */
        dc_image *tgt;          /* the target, a chain of its own (its top only) */
        int sync;
        dc_block_copy *copy;
        dc_cbw *cbw;
        dc_snapshot *view;      /* pull: the point-in-time view read instead of the chain, or NULL */
        char *bitmap;           /* held from the point in time to the end (bitmap-mode on-success, always) */
        int bitmap_mode;
        uint8_t *saved;         /* its bits at the point in time */
        uint64_t saved_bytes;
};

/* The end of a held bitmap: OK (success), else as the mode says. */
static void bitmap_end(struct backup *s, bool ok) {
        _cleanup_free_ uint64_t *ranges = NULL;
        size_t n = 0;

        if (!s->bitmap)
                return;
        if (!ok && s->bitmap_mode == DC_BITMAP_MODE_ALWAYS && dc_block_copy_dirty_ranges(s->copy, &ranges, &n) < 0) {
                /* what was left is unknown: all it held comes back, a superset */
                n = 0;
                s->bitmap_mode = DC_BITMAP_MODE_ON_SUCCESS;
        }
        /* a failure leaves the bitmap in use on disk, inconsistent: never missing a change */
        (void) dc_image_bitmap_backup_end(s->source, s->bitmap,
                                          ok || s->bitmap_mode == DC_BITMAP_MODE_ALWAYS ? NULL : TAKE_PTR(s->saved),
                                          s->saved_bytes, ranges, n);
        free(s->bitmap);
        free(s->saved);
        s->bitmap = NULL;
        s->saved = NULL;
}

static void backup_commit(dc_job *j) {
        bitmap_end(container_of(j, struct backup, job), true);
}

static void backup_abort(dc_job *j) {
        bitmap_end(container_of(j, struct backup, job), false);
}

static int backup_run(dc_job *j) {
        struct backup *s = container_of(j, struct backup, job);

        if (s->sync == DC_SYNC_NONE) {
                /* nothing to copy in the background: copy-before-write until cancelled */
                for (;;) {
                        struct timespec ts = { 0, 100000000 };
                        int r = dc_job_pause_point(j, 0, 0);
                        if (r < 0)
                                return r;
                        nanosleep(&ts, NULL);
                }
        }
        return dc_job_copy_run(j, s->copy);
}

static void backup_clean(dc_job *j) {
        struct backup *s = container_of(j, struct backup, job);
        bitmap_end(s, false); /* a job that never ran */
        s->view = dc_snapshot_free(s->view); /* its filter off, the fleecing image closed */
        s->cbw = dc_cbw_detach(s->cbw);
        s->copy = dc_block_copy_free(s->copy);
        s->tgt = dc_image_close(s->tgt);
}

static int mark_dirty(void *userdata, uint64_t off, uint64_t len) {
        (void) dc_block_copy_mark(userdata, off, len);
        return 0;
}

/* QEMU's rules for bitmap, bitmap-mode and sync (block/backup.c, blockdev.c), in its words: the mode, or < 0. */
static int check_bitmap_options(const struct dc_backup_options *bo) {
        static const char *const syncs[] = { "full", "top", "none", "incremental", "bitmap" };
        int mode = bo->bitmap_mode;

        if ((bo->sync == DC_SYNC_BITMAP || bo->sync == DC_SYNC_INCREMENTAL) && !bo->bitmap)
                return dc_error(EINVAL, "must provide a valid bitmap name for '%s' sync mode", syncs[bo->sync]);
        if (!bo->bitmap) {
                if (mode != DC_BITMAP_MODE_UNSET)
                        return dc_error(EINVAL, "Cannot specify bitmap sync mode without a bitmap");
                return 0;
        }
        if (bo->sync == DC_SYNC_INCREMENTAL) {
                if (mode != DC_BITMAP_MODE_UNSET && mode != DC_BITMAP_MODE_ON_SUCCESS)
                        return dc_error(EINVAL, "Bitmap sync mode must be 'on-success' when using sync mode "
                                                "'incremental'");
                mode = DC_BITMAP_MODE_ON_SUCCESS;
        } else if (mode == DC_BITMAP_MODE_UNSET)
                return dc_error(EINVAL, "Bitmap sync mode must be given when providing a bitmap");
        if (bo->sync == DC_SYNC_NONE)
                return dc_error(EINVAL, "sync mode 'none' does not produce meaningful bitmap outputs");
        if (mode == DC_BITMAP_MODE_NEVER && bo->sync != DC_SYNC_BITMAP)
                return dc_error(EINVAL, "Bitmap sync mode 'never' has no meaningful effect when combined with sync "
                                        "mode '%s'", syncs[bo->sync]);
        return mode;
}

static const struct dc_job_driver backup_driver = {
        .type = DC_JOB_TYPE_BACKUP,
        .instance_size = sizeof(struct backup),
        .run = backup_run,
        .commit = backup_commit,
        .abort = backup_abort,
        .clean = backup_clean,
};

/* Quiesced: the filter on, what is to be copied marked, the bitmap taken and the checkpoint added, at one point in time. */
static int view_read(void *opaque, void *buf, uint64_t off, size_t len) {
        return dc_snapshot_read(((struct backup *) opaque)->view, buf, off, len);
}

static int backup_setup(struct backup *s, uint64_t unit, const char *bitmap, int mode, const char *checkpoint,
                        bool replace, const char *fleece, const struct dc_open_options *oo) {
        dc_job *j = &s->job;
        char owner[300];
        int r;

        snprintf(owner, sizeof owner, "backup job '%s'", j->id);
        dc_disk_quiesce(j->disk);
        if (fleece)
                /* pull: the view's own filter keeps the old data in the fleecing image, the copy reads the view */
                r = dc_snapshot_new(j->disk,
                                    &(struct dc_snapshot_options){ .fleece = fleece, .open = oo,
                                                                   .discard_after_read = true },
                                    &s->view);
        else
                r = dc_cbw_attach(j->disk, s->copy, unit, owner, &s->cbw);
        if (r >= 0) {
                if (s->sync == DC_SYNC_NONE)
                        dc_block_copy_mark_all(s->copy); /* whatever guests are about to overwrite */
                else if (s->sync == DC_SYNC_BITMAP || s->sync == DC_SYNC_INCREMENTAL)
                        /* the bitmap as it is at this point in time */
                        r = dc_image_bitmap_extents(s->source, bitmap, mark_dirty, s->copy);
                else if (s->sync == DC_SYNC_FULL && dc_image_is_remote(s->tgt))
                        /* an export holds whatever it held: every unit, zeros where it does not read as zeros */
                        dc_block_copy_mark_all(s->copy);
                else
                        r = dc_job_mark_sync(s->copy, s->source, s->sync);
        }
        if (r >= 0 && (mode == DC_BITMAP_MODE_ON_SUCCESS || mode == DC_BITMAP_MODE_ALWAYS)) {
                r = dc_image_bitmap_backup_begin(s->source, bitmap, &s->saved, &s->saved_bytes);
                if (r >= 0) {
                        s->bitmap = strdup(bitmap);
                        s->bitmap_mode = mode;
                        if (!s->bitmap)
                                r = dc_error(ENOMEM, "out of memory");
                }
        }
        /* QEMU's transaction of block-dirty-bitmap-add with the backup: no write falls between them
         * (and of block-dirty-bitmap-remove before it, for a replacement) */
        if (r >= 0 && checkpoint && replace) {
                r = dc_image_bitmap_remove(s->source, checkpoint);
                if (r == -ENOENT) {
                        dc_error_clear();
                        r = 0;
                }
        }
        if (r >= 0 && checkpoint)
                r = dc_image_bitmap_add(s->source, checkpoint, 0, 0);
        dc_disk_unquiesce(j->disk);
        return r;
}

DC_EXPORT int dc_job_backup(const char *source_path, const char *target_path, const struct dc_backup_options *bo,
                            const struct dc_open_options *oo, const struct dc_job_options *jo, dc_job **ret) {
        _cleanup_(dc_job_freep) dc_job *j = NULL;
        struct backup *s;
        dc_image *source, *tgt;
        uint64_t cs, mb, unit, chunk;
        int r, mode;

        oo = oo ? oo : &dc_job_no_options;
        mode = check_bitmap_options(bo);
        if (mode < 0)
                return mode;

        r = dc_job_new_copy(&backup_driver, source_path,
                            mode == DC_BITMAP_MODE_ON_SUCCESS || mode == DC_BITMAP_MODE_ALWAYS || bo->checkpoint,
                            target_path, oo, jo, "Source and target cannot be the same", &j, &source, &tgt);
        if (r < 0)
                return r;
        s = container_of(j, struct backup, job);
        s->source = source;
        s->tgt = tgt;
        s->sync = bo->sync;
        if (s->tgt->virtual_size != s->source->virtual_size)
                return dc_error(EINVAL, "Source and target image have different sizes ('%s' has %llu bytes, '%s' %llu)",
                                s->source->path, (unsigned long long) s->source->virtual_size, s->tgt->path,
                                (unsigned long long) s->tgt->virtual_size);
        if (bo->compress && dc_image_is_remote(s->tgt))
                return dc_error(ENOTSUP, "'%s': compress writes qcow2 compressed clusters, and an NBD export has none "
                                         "of ours", s->tgt->path);
        if (bo->compress && !s->tgt->drv->write_compressed)
                return dc_error(ENOTSUP, "Compression is not supported for this drive");
        cs = dc_image_cluster_size(s->tgt);
        /* an NBD server's minimum block (a power of two up to 64 KiB): no request may be smaller */
        mb = MAX(dc_image_min_block(s->tgt), 512u);
        if (bo->max_chunk && bo->max_chunk < MAX(cs, mb))
                return dc_error(EINVAL, "max-chunk must be at least the target's cluster size (%llu bytes)",
                                (unsigned long long) MAX(cs, mb));
        chunk = bo->max_chunk ? MIN(ALIGN_DOWN(bo->max_chunk, mb), (uint64_t) DC_COPY_CHUNK) : 0;
        /* copy-before-write works in whole target clusters (64 KiB for raw) */
        unit = MAX(cs ? cs : 65536, mb);
        if (chunk && chunk < unit)
                unit = chunk;
        if (chunk)
                chunk = ALIGN_DOWN(chunk, unit);
        if (bo->fleece && bo->sync == DC_SYNC_NONE)
                return dc_error(EINVAL, "a pull backup (fleece) copies something: not with sync 'none'");
        r = dc_job_copy_new(j,
                            (struct dc_block_copy_params){ .source = s->source,
                                                           .target = s->tgt,
                                                           .unit = unit,
                                                           .chunk = chunk,
                                                           .workers = bo->max_workers,
                                                           .compress = bo->compress,
                                                           .read = bo->fleece ? view_read : NULL,
                                                           .read_opaque = s },
                            &s->copy);
        if (r >= 0)
                r = backup_setup(s, unit, bo->bitmap, mode, bo->checkpoint, bo->replace_checkpoint, bo->fleece, oo);
        if (r < 0)
                return r;
        j->len = s->source->virtual_size;
        return dc_job_start(TAKE_PTR(j), ret);
}
