/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * drive-mirror and active commit (QEMU's block/mirror.c, where
 * commit_active_start lives too): copy the active layer's chain (all of
 * it, its top layer, or only new writes) into a target, keep the target in
 * sync with guest writes, and at complete make the target the active
 * layer (the pivot).  Active commit is the same job with base as the
 * target and the layers above base dropped at the pivot.
 *
 * Design notes
 * ------------
 * - At the job's creation (so that its start is the caller's return) the
 *   mirror's filter (QEMU's mirror_top) goes onto the disk, with the disk
 *   quiesced, and the engine marks what is to be copied: the chain's
 *   allocation (full; every unit for an existing target, which may not
 *   read as zeros), the top layer's (top), nothing (none), or for active
 *   commit what is allocated above base.  The unit is the granularity.
 * - The filter marks every unit a guest writes (background mode), or
 *   copies it at once under the write's range lock (write-blocking: the
 *   guest's write returns when the target has it too; a failure leaves the
 *   unit marked and the job no longer actively synced).
 * - run: engine passes (block-copy.c) with as many requests in flight as
 *   buf-size holds chunks, until nothing is marked; then the target is
 *   flushed and the job is ready.  Ready, it copies what guests mark, pass
 *   after pass, and waits (for a write, a verb, or 100 ms) when nothing is.
 *   On complete or a soft cancel the disk is quiesced and everything still
 *   marked copied (the drain): a point in time.  A soft cancel takes the
 *   filter off then, so later writes stay out of the copy.
 * - prepare (complete): drain again what was written since, then pivot
 *   (below): the target becomes the disk's active layer, writers move to
 *   it while the disk is quiesced, and the filter goes.  abort (failure or
 *   hard cancel) takes the filter off; the target is left as it is.
 * - Only a ready job knows a soft cancel (QEMU's mirror_cancel): before
 *   ready, or with force, a cancel abandons it.
 * - Locking: copy_mode, should_complete and actively_synced are under the
 *   job lock (verbs and the filter touch them); the rest is set before the
 *   job's thread starts.  The filter runs on writers' threads with their
 *   range lock held; it takes the engine's lock, then the job lock alone.
 */

#include <stdio.h>
#include <time.h>

#include "job.h"

struct mirror {
        dc_job job;
        struct dc_disk_filter filter;   /* mirror_top: marks or copies guest writes */
        struct dc_block_copy_hooks hooks; /* the job's, with the mirror's pause point */
        dc_image *source;       /* the active layer, read through its chain */
        dc_image *target;       /* written: the target, or base for active commit */
        dc_image *tgt;          /* a mirror's target while the job owns it (the disk's after the pivot) */
        dc_image *base;         /* active commit: base */
        bool active_commit;
        int sync;
        bool existing, unmap;
        uint64_t unit, buf_size; /* granularity; data in flight */
        int copy_mode;          /* job lock */
        bool should_complete, actively_synced; /* job lock */
        dc_block_copy *copy;
};

static struct mirror *mirror_of(dc_job *j) {
        return container_of(j, struct mirror, job);
}

/* len follows what is left to copy (QEMU's mirror: offset plus the dirty bytes).  Job lock held. */
static void mirror_progress(struct mirror *s) {
        s->job.len = s->job.offset + dc_block_copy_dirty(s->copy);
}

/* --- the filter ------------------------------------------------------------------------ */

/* After a guest write: write-blocking copies it to the target at once, background marks it. */
static void mirror_after_write(struct dc_disk_filter *f, uint64_t off, uint64_t len) {
        struct mirror *s = container_of(f, struct mirror, filter);
        dc_job *j = &s->job;
        bool wb;
        int r = 0;

        if (!len || off >= s->source->virtual_size)
                return;
        dc_block_copy_mark(s->copy, off, len);
        pthread_mutex_lock(&j->lock);
        wb = s->copy_mode == DC_COPY_MODE_WRITE_BLOCKING;
        pthread_mutex_unlock(&j->lock);
        if (wb)
                /* the guest holds the range lock over these whole units */
                r = dc_block_copy_range(s->copy, off, len, true, NULL);
        pthread_mutex_lock(&j->lock);
        if (r < 0)
                s->actively_synced = false;
        mirror_progress(s);
        pthread_cond_broadcast(&j->cond);
        pthread_mutex_unlock(&j->lock);
}

static const struct dc_disk_filter_ops mirror_filter_ops = {
        .name = "mirror_top",
        .after_write = mirror_after_write,
};

/* --- the work -------------------------------------------------------------------------- */

/* The engine's pause point: progress counts data copied; a ready job about to complete ends the pass. */
static int mirror_pause(void *opaque, uint64_t done, uint64_t copied) {
        dc_job *j = opaque;
        struct mirror *s = mirror_of(j);
        bool completing;
        int r;

        r = dc_job_pause_point(j, copied, copied);
        pthread_mutex_lock(&j->lock);
        mirror_progress(s);
        completing = j->status == DC_JOB_READY && (s->should_complete || j->cancelled);
        pthread_mutex_unlock(&j->lock);
        return r < 0 ? r : completing;
}

/* Copy everything marked (the disk is quiesced: nothing new comes), then flush the target. */
static int mirror_drain(struct mirror *s, bool *ret_read_error) {
        int r;

        *ret_read_error = false;
        r = dc_block_copy_range(s->copy, 0, s->source->virtual_size, false, ret_read_error);
        pthread_mutex_lock(&s->job.lock);
        mirror_progress(s);
        pthread_mutex_unlock(&s->job.lock);
        if (r < 0)
                return r;
        return dc_block_copy_flush(s->copy);
}

/* In sync: wait for a write, a verb, or 100 ms. */
static void mirror_wait(struct mirror *s) {
        dc_job *j = &s->job;

        pthread_mutex_lock(&j->lock);
        if (s->copy_mode == DC_COPY_MODE_WRITE_BLOCKING && !dc_block_copy_dirty(s->copy))
                s->actively_synced = true; /* also after a change to write-blocking */
        if (!dc_block_copy_dirty(s->copy) && !s->should_complete && !j->cancelled && !j->user_paused) {
                struct timespec ts;
                clock_gettime(CLOCK_REALTIME, &ts);
                ts.tv_nsec += 100000000l;
                if (ts.tv_nsec >= 1000000000l) {
                        ts.tv_sec++;
                        ts.tv_nsec -= 1000000000l;
                }
                pthread_cond_timedwait(&j->cond, &j->lock, &ts);
        }
        pthread_mutex_unlock(&j->lock);
}

static int mirror_run(dc_job *j) {
        struct mirror *s = mirror_of(j);
        int r;

        if (s->active_commit) {
                /* base grows when smaller than top, never shrinks */
                if (s->base->virtual_size < s->source->virtual_size) {
                        r = dc_image_truncate(s->base, s->source->virtual_size);
                        if (r < 0)
                                return r;
                }
                /* before the first copy: what the layers' bitmaps hold now moves into base's, and
                 * every later guest write is marked by the filter, copied into base, recorded there */
                r = dc_job_commit_bitmaps(s->source, s->base);
                if (r < 0)
                        return r;
        } else if (s->target->virtual_size != s->source->virtual_size)
                return dc_error(EINVAL, "Source and target image have different sizes ('%s' has %llu bytes, '%s' %llu)",
                                s->source->path, (unsigned long long) s->source->virtual_size, s->target->path,
                                (unsigned long long) s->target->virtual_size);
        for (;;) {
                bool ready, completing, read_error = false;

                r = dc_job_pause_point(j, 0, 0);
                if (r < 0)
                        break;
                pthread_mutex_lock(&j->lock);
                ready = j->status == DC_JOB_READY;
                completing = ready && (s->should_complete || j->cancelled);
                pthread_mutex_unlock(&j->lock);

                if (completing) {
                        /* no guest write from here to the end of the copy: a point in time */
                        dc_disk_quiesce(j->disk);
                        r = mirror_drain(s, &read_error);
                        if (r >= 0 && j->cancelled)
                                dc_disk_detach_filter(j->disk, &s->filter); /* soft cancel: later writes stay out */
                        dc_disk_unquiesce(j->disk);
                        if (r < 0) {
                                r = dc_job_io_error(j, r, read_error);
                                if (r == 0)
                                        continue;
                                if (r == 1)
                                        r = -EIO;
                        }
                        break;
                }
                if (dc_block_copy_dirty(s->copy)) {
                        /* errors met their policy inside; what is left is the job's end */
                        r = dc_block_copy_pass(s->copy);
                        if (r < 0)
                                break;
                        continue;
                }
                if (!ready) {
                        r = dc_block_copy_flush(s->copy);
                        if (r < 0) {
                                r = dc_job_io_error(j, r, false);
                                if (r == 0 || r == 1)
                                        continue;
                                break;
                        }
                        pthread_mutex_lock(&j->lock);
                        if (j->error[0]) {
                                /* on-error=ignore skipped data: in sync it is not */
                                pthread_mutex_unlock(&j->lock);
                                r = -EIO;
                                break;
                        }
                        mirror_progress(s);
                        dc_job_set_status(j, DC_JOB_READY);
                        dc_job_event(j, DC_EV_READY, NULL);
                        s->actively_synced = s->copy_mode == DC_COPY_MODE_WRITE_BLOCKING;
                        pthread_mutex_unlock(&j->lock);
                        dc_job_wake(j);
                        continue;
                }
                mirror_wait(s);
        }
        return r;
}

/*
 * The pivot: the target (mirror) or base (active commit) becomes the active
 * layer of the disk.  The target keeps its own backing: a layer of the old
 * chain (top, none) or a chain opened now (existing).  The owner records
 * the layers dropped (bottom first, the old top last) through pivoted():
 * that record, made after the target was flushed, is the moment the pivot
 * is done on disk — before it the old chain is the disk, after it the new.
 */
static int pivot(struct mirror *s) {
        dc_job *j = &s->job;
        dc_image *old = dc_disk_chain(j->disk), *top = s->target;
        dc_image *keep = s->active_commit ? s->base : NULL, *extra = NULL, *above = NULL;
        dc_image *dropped[256];
        const char *names[257];
        size_t n = 0;
        int r;

        if (!s->active_commit && top->backing_file) {
                _cleanup_free_ char *babs = NULL;
                r = dc_backing_resolve(top->path, top->backing_file, &babs);
                if (r < 0)
                        return r;
                keep = dc_job_find_layer(old, babs);
                if (!keep) {
                        struct dc_open_options o = *dc_disk_open_options(j->disk);
                        o.writable = false;
                        r = dc_image_open(babs, &o, &extra);
                        if (r < 0)
                                return r;
                }
        }
        for (dc_image *l = old; l && l != keep && n < sizeof dropped / sizeof *dropped; l = l->backing) {
                dropped[n++] = l;
                if (l->backing == keep)
                        above = l;
        }
        for (size_t i = 0; i < n; i++) {
                /* nothing of ours changes them after the record (their ctime is part of it) */
                r = dc_image_flush(dropped[i]);
                if (r < 0) {
                        dc_image_close(extra);
                        return r;
                }
                names[i] = dropped[n - 1 - i]->path;
        }
        names[n] = NULL;
        if (j->pivoted) {
                r = j->pivoted(j->userdata, top->path, names);
                if (r < 0) {
                        char why[512];
                        snprintf(why, sizeof why, "%s", dc_get_error());
                        dc_image_close(extra);
                        return dc_error(-r, "cannot record the pivot to '%s': %s", top->path, why);
                }
        }
        if (!s->active_commit) {
                top->backing = keep ? keep : extra;
                s->tgt = NULL; /* the disk's now */
        }
        if (above)
                above->backing = NULL;
        dc_disk_swap_chain(j->disk, top);
        s->source = top;
        if (keep != old)
                dc_image_close(old);
        return 0;
}

static int mirror_prepare(dc_job *j) {
        struct mirror *s = mirror_of(j);
        bool read_error;
        int r;

        if (j->cancelled)
                return 0; /* soft cancel: the target is a point-in-time copy, nothing moves */
        dc_disk_quiesce(j->disk);
        r = mirror_drain(s, &read_error); /* what was written since the job left its loop */
        if (r >= 0)
                r = pivot(s);
        dc_disk_detach_filter(j->disk, &s->filter);
        dc_disk_unquiesce(j->disk);
        return r;
}

/* Failed, or cancelled without a pivot: the writers go on without the mirror. */
static void mirror_abort(dc_job *j) {
        struct mirror *s = mirror_of(j);
        if (j->disk)
                dc_disk_detach_filter(j->disk, &s->filter);
}

static void mirror_clean(dc_job *j) {
        struct mirror *s = mirror_of(j);
        mirror_abort(j); /* also for a job that never started */
        s->copy = dc_block_copy_free(s->copy);
        s->tgt = dc_image_close(s->tgt);
}

/* --- verbs ---------------------------------------------------------------------------- */

static int mirror_complete(dc_job *j) {
        struct mirror *s = mirror_of(j);

        /* A remote export cannot become a layer of a local chain: storage migration
         * ends with the soft cancel, and the destination's side takes over the copy. */
        if (dc_image_is_remote(s->target))
                return dc_error(ENOTSUP,
                                "Job '%s': a mirror onto the NBD target '%s' cannot become the chain's active "
                                "layer; cancel it once ready for a consistent copy",
                                j->id, s->target->path);
        s->should_complete = true;
        return 0;
}

/* Only a ready job finishes without pivot on a soft cancel; anything else is abandoned. */
static bool mirror_cancel(dc_job *j, bool force) {
        return force || !(j->status == DC_JOB_READY || j->status == DC_JOB_STANDBY);
}

/* block-job-change: background -> write-blocking only. */
static int mirror_change(dc_job *j, int mode) {
        struct mirror *s = mirror_of(j);
        if (mode != s->copy_mode && mode != DC_COPY_MODE_WRITE_BLOCKING)
                return dc_error(EINVAL, "Job '%s': copy-mode can only change from background to write-blocking", j->id);
        s->copy_mode = mode;
        return 0;
}

static void mirror_query(dc_job *j, struct dc_job_info *ret) {
        ret->actively_synced = mirror_of(j)->actively_synced;
}

/* Mirror and active commit: one driver but for the type and copy-mode changes. */
#define MIRROR_OPERATIONS                                                                                          \
        .instance_size = sizeof(struct mirror), .run = mirror_run, .prepare = mirror_prepare, .abort = mirror_abort, \
        .clean = mirror_clean, .complete = mirror_complete, .cancel = mirror_cancel, .query = mirror_query

static const struct dc_job_driver mirror_driver = {
        .type = DC_JOB_TYPE_MIRROR,
        .change = mirror_change,
        MIRROR_OPERATIONS,
};

static const struct dc_job_driver commit_active_driver = {
        .type = DC_JOB_TYPE_COMMIT,
        MIRROR_OPERATIONS,
};

/* --- creation -------------------------------------------------------------------------- */

/*
 * The engine, the filter on the disk and what is to be copied marked, at
 * one point in time (the disk quiesced), before the caller gets the job.
 */
static int mirror_setup(struct mirror *s) {
        dc_job *j = &s->job;
        uint64_t chunk = MAX(s->unit, ALIGN_DOWN(MIN(s->buf_size, (uint64_t) DC_COPY_CHUNK), s->unit));
        int r;

        s->hooks = dc_job_copy_hooks;
        s->hooks.pause = mirror_pause;
        r = dc_job_copy_new(
                j,
                (struct dc_block_copy_params){
                        .source = s->source,
                        .target = s->target,
                        .unit = s->unit,
                        .chunk = chunk,
                        /* as many requests in flight as buf-size holds chunks */
                        .workers = (unsigned) MIN(MAX(s->buf_size / chunk, 1), (uint64_t) DC_COPY_MAX_WORKERS),
                        .zero_flags = s->unmap ? DC_ZERO_MAY_UNMAP : 0,
                        .hooks = &s->hooks,
                        .opaque = j,
                },
                &s->copy);
        if (r < 0)
                return r;
        s->filter = (struct dc_disk_filter){ .ops = &mirror_filter_ops, .align = s->unit };
        dc_disk_quiesce(j->disk);
        r = dc_disk_attach_filter(j->disk, &s->filter);
        if (r >= 0) {
                if (s->sync == DC_SYNC_FULL && s->existing && !s->active_commit)
                        dc_block_copy_mark_all(s->copy); /* it may not read as zeros */
                else if (s->active_commit)
                        r = dc_block_copy_mark_allocated(s->copy, s->source, s->base);
                else
                        r = dc_job_mark_sync(s->copy, s->source, s->sync);
        }
        pthread_mutex_lock(&j->lock);
        mirror_progress(s);
        pthread_mutex_unlock(&j->lock);
        dc_disk_unquiesce(j->disk);
        return r;
}

DC_EXPORT int dc_job_mirror(const char *source_path, const char *target_path, const struct dc_mirror_options *mo,
                            const struct dc_open_options *oo, const struct dc_job_options *jo, dc_job **ret) {
        _cleanup_(dc_job_freep) dc_job *j = NULL;
        struct mirror *s;
        dc_image *source, *tgt;
        uint32_t cs, gran;
        uint64_t mb;
        int r;

        oo = oo ? oo : &dc_job_no_options;

        if (mo->granularity && (mo->granularity < 512 || mo->granularity > (64u << 20) ||
                                (mo->granularity & (mo->granularity - 1))))
                return dc_error(EINVAL, "Granularity must be a power of 2 between 512 and 64 MiB");
        if (mo->sync != DC_SYNC_FULL && mo->sync != DC_SYNC_TOP && mo->sync != DC_SYNC_NONE)
                return dc_error(EINVAL, "Sync mode not supported");
        r = dc_job_new_copy(&mirror_driver, source_path, false, target_path, oo, jo, "Can't mirror node into itself", &j,
                            &source, &tgt);
        if (r < 0)
                return r;
        s = mirror_of(j);
        s->source = source;
        s->target = s->tgt = tgt;
        if (dc_disk_chain(j->disk) != s->source)
                return dc_error(EINVAL, "'%s' is not the active layer of '%s'", source_path, dc_disk_chain(j->disk)->path);
        s->sync = mo->sync;
        /* a remote export was not made for the job: it may hold anything */
        s->existing = mo->existing || dc_image_is_remote(tgt);
        s->unmap = mo->unmap;
        s->copy_mode = mo->copy_mode == DC_COPY_MODE_WRITE_BLOCKING ? DC_COPY_MODE_WRITE_BLOCKING
                                                                     : DC_COPY_MODE_BACKGROUND;
        /* QEMU's default granularity: the target's cluster size within 4 KiB..64 KiB; the
         * chunk copied is never smaller than a target cluster, so no write needs its backing */
        cs = dc_image_cluster_size(s->tgt);
        gran = mo->granularity ? mo->granularity : cs ? MIN(MAX(cs, 4096u), 65536u) : 65536u;
        /* an NBD server refuses requests smaller than its minimum block (a power of two, 64 KiB at most) */
        mb = dc_image_min_block(s->tgt);
        if (mo->granularity && mo->granularity < mb)
                return dc_error(EINVAL, "Granularity %u is below the minimum block size of '%s' (%llu bytes)",
                                mo->granularity, s->tgt->path, (unsigned long long) mb);
        gran = MAX(gran, (uint32_t) mb);
        s->unit = MAX(gran, cs);
        s->buf_size = mo->buf_size ? mo->buf_size : DC_COPY_MIRROR_BUF;
        r = mirror_setup(s);
        if (r < 0)
                return r;
        return dc_job_start(TAKE_PTR(j), ret);
}

int dc_job_commit_active(const char *top, const char *base, const char *top_path, const char *base_path,
                         const struct dc_open_options *oo, const struct dc_job_options *jo, dc_job **ret) {
        _cleanup_(dc_job_freep) dc_job *j = NULL;
        struct mirror *s;
        dc_image *chain;
        uint32_t cs;
        int r;

        r = dc_job_new(&commit_active_driver, jo, &j);
        if (r < 0)
                return r;
        s = mirror_of(j);
        r = dc_job_open_chain(j, top, oo, jo, (const char *const[]){ base, NULL });
        if (r < 0)
                return r;
        chain = dc_disk_chain(j->disk);
        if (strcmp(chain->path, top) != 0)
                return dc_error(EINVAL, "'%s' is not the active layer of '%s'", top_path, chain->path);
        s->source = chain;
        r = dc_job_find_base(chain, base, base_path, top_path, &s->base);
        if (r < 0)
                return r;
        s->active_commit = true;
        s->target = s->base;
        cs = dc_image_cluster_size(s->base);
        s->unit = MAX(MIN(MAX(cs, 4096u), 65536u), cs ? cs : 1u);
        s->buf_size = DC_COPY_MIRROR_BUF;
        s->copy_mode = DC_COPY_MODE_BACKGROUND;
        r = mirror_setup(s);
        if (r < 0)
                return r;
        return dc_job_start(TAKE_PTR(j), ret);
}
