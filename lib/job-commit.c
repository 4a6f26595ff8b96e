/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * block-commit (QEMU's block/commit.c): copy what top and the layers below
 * it hold above base into base, then point top's overlay at base.  Active
 * commit (top is the active layer) is a mirror into base and lives in
 * job-mirror.c, as QEMU's commit_active_start lives in mirror.c.
 *
 * Design notes
 * ------------
 * - The copy is the engine's (block-copy.c) from top's view down to, not
 *   including, base, into base: everything marked, unit = chunk, per
 *   request only what is allocated (skip_unallocated).  Guest writes go to
 *   the active layer above top and never reach these layers, but the
 *   requests take the disk's range lock all the same.
 * - Base grows to top's size first when it is smaller, never shrinks.
 * - The overlay and base are open read-write for the job (the caller's
 *   disk is reopened so, and back at the end: job-chain.c).
 * - A cancelled or failed commit leaves base changed: the layers between
 *   overlay and base no longer form a point in time (as in QEMU), but the
 *   overlay still reads what it read, through top.
 * - Before the copy, the bitmaps of top and the layers down to base are
 *   merged into base's (dc_image_bitmaps_commit): they do not change
 *   during the job, and base's enabled ones record the copy on top.
 * - prepare records base as the overlay's backing file (BACKING_FILE as
 *   given, or base's name relative to the overlay's directory).
 * - Locking: the job's own fields are set before the job's thread starts
 *   and read only by it afterwards; nothing here takes the job lock.
 */

#include "job.h"

struct commit {
        struct dc_rebase_job rj; /* the copy, and what the overlay's header names at the end */
        dc_image *overlay;      /* whose backing file changes */
        dc_image *top;          /* the overlay's backing file: where the copy reads from */
        dc_image *base;         /* written */
};

static int commit_run(dc_job *j) {
        struct commit *s = container_of(j, struct commit, rj.job);
        int r;

        /* base grows when smaller than top, never shrinks */
        if (s->base->virtual_size < s->top->virtual_size) {
                r = dc_image_truncate(s->base, s->top->virtual_size);
                if (r < 0)
                        return r;
        }
        r = dc_job_commit_bitmaps(s->top, s->base);
        if (r < 0)
                return r;
        return dc_rebase_job_run(j);
}

static const struct dc_job_driver commit_driver = {
        .type = DC_JOB_TYPE_COMMIT,
        .instance_size = sizeof(struct commit),
        .run = commit_run,
        .prepare = dc_rebase_job_prepare,
        .clean = dc_rebase_job_clean,
};

DC_EXPORT int dc_job_commit(const char *overlay_path, const char *top_path, const char *base_path,
                            const char *backing_file, const struct dc_open_options *oo,
                            const struct dc_job_options *jo, dc_job **ret) {
        _cleanup_free_ char *overlay = NULL, *top = NULL, *base = NULL;
        _cleanup_(dc_job_freep) dc_job *j = NULL;
        struct commit *s;
        int r;

        oo = oo ? oo : &dc_job_no_options;

        r = dc_job_path(top_path, oo, &top);
        if (r >= 0)
                r = dc_job_path(base_path, oo, &base);
        if (r >= 0 && overlay_path)
                r = dc_job_path(overlay_path, oo, &overlay);
        if (r < 0)
                return r;
        if (strcmp(top, base) == 0)
                return dc_error(EINVAL, "cannot commit an image into itself");
        if (!overlay && backing_file)
                return dc_error(EINVAL, "'backing-file' specified, but 'top' is the active layer");
        if (!overlay)
                return dc_job_commit_active(top, base, top_path, base_path, oo, jo, ret);

        r = dc_job_new(&commit_driver, jo, &j);
        if (r < 0)
                return r;
        s = container_of(j, struct commit, rj.job);
        /* the overlay read-write for its new backing pointer, base to receive the data */
        r = dc_job_open_chain(j, overlay, oo, jo, (const char *const[]){ overlay, base, NULL });
        if (r < 0)
                return r;
        s->overlay = dc_job_find_layer(dc_disk_chain(j->disk), overlay);
        s->top = dc_job_find_layer(s->overlay->backing, top);
        if (!s->top || s->overlay->backing != s->top)
                return dc_error(EINVAL, "'%s' is not the backing file of '%s'", top_path, overlay_path);
        r = dc_job_find_base(s->top, base, base_path, top_path, &s->base);
        if (r >= 0)
                r = dc_job_rebase_init(&s->rj.rebase, s->overlay, s->base, backing_file);
        if (r >= 0)
                r = dc_job_copy_new(j,
                                    (struct dc_block_copy_params){ .source = s->top,
                                                                   .target = s->base,
                                                                   .skip_unallocated = true,
                                                                   .stop = s->base },
                                    &s->rj.copy);
        if (r < 0)
                return r;
        dc_block_copy_mark_all(s->rj.copy);
        j->len = s->top->virtual_size;
        return dc_job_start(TAKE_PTR(j), ret);
}
