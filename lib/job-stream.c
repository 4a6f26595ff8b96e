/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * block-stream (QEMU's block/stream.c): fill the top layer with what its
 * backing files above base hold, then make base its backing file.
 *
 * Design notes
 * ------------
 * - The copy is the engine's (block-copy.c) with the top layer as source
 *   and target: everything marked, unit = chunk, and per request only what
 *   is allocated below top down to, not including, base
 *   (skip_unallocated), and nothing top holds itself
 *   (skip_target_allocated).  Each request looks at top under the disk's
 *   range lock, so a guest write to the same clusters either lands before
 *   (and the request passes over it) or waits (and lands over the copy):
 *   a stream never copies backing data over a newer write.
 * - The data a stream copies is the same data top already reads, so every
 *   image stays a valid point in time whatever happens; a cancelled or
 *   failed stream leaves top with its backing file and some clusters
 *   copied up.
 * - prepare records the new backing file (BACKING_FILE as given, or base's
 *   name relative to top's directory; none when flattening): the graph
 *   change, after the data and its flush.
 * - Locking: the job's own fields are set before the job's thread starts
 *   and read only by it afterwards; nothing here takes the job lock.
 */

#include "job.h"

struct stream {
        struct dc_rebase_job rj; /* the copy, and what top's header names at the end */
        dc_image *top;          /* the layer filled, in the job's chain */
        dc_image *base;         /* where the copy stops; NULL: flatten */
};

static const struct dc_job_driver stream_driver = {
        .type = DC_JOB_TYPE_STREAM,
        .instance_size = sizeof(struct stream),
        .run = dc_rebase_job_run,
        .prepare = dc_rebase_job_prepare,
        .clean = dc_rebase_job_clean,
};

DC_EXPORT int dc_job_stream(const char *top_path, const char *base_path, const char *backing_file,
                            const struct dc_open_options *oo, const struct dc_job_options *jo, dc_job **ret) {
        _cleanup_free_ char *top = NULL, *base = NULL;
        _cleanup_(dc_job_freep) dc_job *j = NULL;
        struct stream *s;
        int r;

        oo = oo ? oo : &dc_job_no_options;

        if (!base_path && backing_file)
                return dc_error(EINVAL, "backing file specified, but streaming the entire chain");
        r = dc_job_path(top_path, oo, &top);
        if (r >= 0 && base_path)
                r = dc_job_path(base_path, oo, &base);
        if (r < 0)
                return r;
        r = dc_job_new(&stream_driver, jo, &j);
        if (r < 0)
                return r;
        s = container_of(j, struct stream, rj.job);
        r = dc_job_open_chain(j, top, oo, jo, (const char *const[]){ top, NULL });
        if (r < 0)
                return r;
        s->top = dc_job_find_layer(dc_disk_chain(j->disk), top);
        if (base && !(s->base = dc_job_find_layer(s->top->backing, base)))
                return dc_error(EINVAL, "'%s' is not a backing image of '%s'", base_path, top_path);
        r = dc_job_rebase_init(&s->rj.rebase, s->top, s->base, backing_file);
        if (r < 0)
                return r;
        if (s->top->drv != &dc_qcow2_driver)
                return dc_error(ENOTSUP, "'%s': only qcow2 images can receive streamed data", top_path);
        r = dc_job_writable_check(s->top);
        if (r < 0)
                return r;
        r = dc_job_copy_new(j,
                            (struct dc_block_copy_params){ .source = s->top,
                                                           .target = s->top,
                                                           .skip_unallocated = true,
                                                           .stop = s->base,
                                                           .skip_target_allocated = true },
                            &s->rj.copy);
        if (r < 0)
                return r;
        dc_block_copy_mark_all(s->rj.copy);
        j->len = s->top->virtual_size;
        return dc_job_start(TAKE_PTR(j), ret);
}
