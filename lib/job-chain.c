/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The chain a block job works on (QEMU's blockdev.c checks and the
 * BlockBackend a block job holds): resolving the caller's paths inside the
 * roots, opening the chain or taking the caller's disk, reopening layers
 * read-write for the job and back at its end, checking that the chain is
 * the one the caller authorized, and opening a separate target (a file in
 * the roots, or an NBD export when the target is a URI: nbd-client.c).  Shared by
 * every driver; nothing here knows a job type.
 *
 * Locking: called on the caller's thread while the job is being created,
 * and on the job's thread at its end (dc_job_restore_chain); the disk is
 * quiesced around every reopen.
 */

#include "job.h"

const struct dc_open_options dc_job_no_options;

int dc_job_path(const char *path, const struct dc_open_options *oo, char **ret) {
        return dc_path_resolve(path, oo->roots, ret, NULL);
}

dc_image *dc_job_find_layer(dc_image *chain, const char *abs) {
        for (dc_image *l = chain; l; l = l->backing)
                if (strcmp(l->path, abs) == 0)
                        return l;
        return NULL;
}

char *dc_job_backing_name(dc_image *img, dc_image *base) {
        const char *slash = strrchr(img->path, '/');
        size_t dl = slash ? (size_t) (slash - img->path) : 0;
        if (strncmp(base->path, img->path, dl) == 0 && base->path[dl] == '/')
                return strdup(base->path + dl + 1);
        return strdup(base->path);
}

int dc_job_writable_check(dc_image *l) {
        if (!l->writable)
                return dc_error(EROFS, "'%s' cannot be written%s%s", l->path, l->read_only_reason ? ": " : "",
                                l->read_only_reason ? l->read_only_reason : "");
        return 0;
}

int dc_job_find_base(dc_image *top, const char *base_abs, const char *base_path, const char *top_path, dc_image **ret) {
        dc_image *base = dc_job_find_layer(top->backing, base_abs);
        int r;

        if (!base)
                return dc_error(EINVAL, "'%s' is not in the backing chain of '%s'", base_path, top_path);
        r = dc_job_writable_check(base);
        if (r < 0)
                return r;
        *ret = base;
        return 0;
}

int dc_job_commit_bitmaps(dc_image *top, dc_image *base) {
        _cleanup_free_ dc_image **layers = NULL;
        size_t n = 0;

        for (dc_image *l = top; l && l != base; l = l->backing)
                n++;
        layers = calloc(MAX(n, 1u), sizeof *layers);
        if (!layers)
                return dc_error(ENOMEM, "out of memory");
        n = 0;
        for (dc_image *l = top; l && l != base; l = l->backing)
                layers[n++] = l;
        return dc_image_bitmaps_commit(base, layers, n);
}

int dc_job_mark_sync(dc_block_copy *bc, dc_image *source, int sync) {
        if (sync == DC_SYNC_NONE)
                return 0;
        return dc_block_copy_mark_allocated(bc, source, sync == DC_SYNC_TOP ? source->backing : NULL);
}

int dc_job_rebase_init(struct dc_job_rebase *rb, dc_image *layer, dc_image *base, const char *backing_file) {
        rb->layer = layer;
        if (!base)
                return 0; /* none */
        rb->backing = backing_file ? strdup(backing_file) : dc_job_backing_name(layer, base);
        rb->backing_fmt = strdup(dc_format_name(dc_image_format(base)));
        return rb->backing && rb->backing_fmt ? 0 : dc_error(ENOMEM, "out of memory");
}

int dc_job_rebase_apply(struct dc_job_rebase *rb) {
        return dc_image_set_backing(rb->layer, rb->backing, rb->backing_fmt);
}

void dc_job_rebase_release(struct dc_job_rebase *rb) {
        free(rb->backing);
        free(rb->backing_fmt);
        *rb = (struct dc_job_rebase){ 0 };
}

int dc_rebase_job_run(dc_job *j) {
        return dc_job_copy_run(j, container_of(j, struct dc_rebase_job, job)->copy);
}

int dc_rebase_job_prepare(dc_job *j) {
        return dc_job_rebase_apply(&container_of(j, struct dc_rebase_job, job)->rebase);
}

void dc_rebase_job_clean(dc_job *j) {
        struct dc_rebase_job *s = container_of(j, struct dc_rebase_job, job);
        s->copy = dc_block_copy_free(s->copy);
        dc_job_rebase_release(&s->rebase);
}

/*
 * Is CHAIN (from its active layer down) the one the caller authorized?
 * Between the caller's look at the files and our open, a header may have
 * been rewritten to name other backing files.
 */
static int chain_expected(dc_image *chain, const char *const *expect) {
        size_t i = 0;

        if (!expect)
                return 0;
        /* the job may work from a layer below the active one: compare from there */
        while (expect[i] && strcmp(expect[i], chain->path) != 0)
                i++;
        if (!expect[i])
                return dc_error(ESTALE, "'%s' is no longer in the backing chain that was authorized; try again",
                                chain->path);
        for (dc_image *l = chain; l; l = l->backing, i++)
                if (!expect[i] || strcmp(expect[i], l->path) != 0)
                        return dc_error(ESTALE, "the backing chain of '%s' changed after the job was authorized "
                                                "('%s' is not what was checked); try again", chain->path, l->path);
        if (expect[i])
                return dc_error(ESTALE, "the backing chain of '%s' changed after the job was authorized "
                                        "('%s' is no longer in it); try again", chain->path, expect[i]);
        return 0;
}

int dc_job_open_chain(dc_job *j, const char *top_abs, const struct dc_open_options *oo,
                      const struct dc_job_options *jo, const char *const *writable) {
        struct dc_open_options o = *oo;
        int r;

        if (jo->disk) {
                dc_image *chain = dc_disk_chain(jo->disk);
                bool reopen = false;
                if (!dc_job_find_layer(chain, top_abs))
                        return dc_error(EINVAL, "'%s' is not in the chain of '%s'", top_abs, chain->path);
                for (size_t i = 0; writable && writable[i]; i++) {
                        dc_image *l = dc_job_find_layer(chain, writable[i]);
                        if (!l)
                                return dc_error(EINVAL, "'%s' is not in the chain of '%s'", writable[i], chain->path);
                        reopen |= !l->writable;
                }
                r = chain_expected(chain, jo->expect_chain);
                if (r < 0)
                        return r;
                j->disk = dc_disk_ref(jo->disk);
                if (reopen) {
                        dc_disk_quiesce(j->disk);
                        r = dc_disk_reopen(j->disk, writable);
                        dc_disk_unquiesce(j->disk);
                        if (r < 0)
                                return r;
                        j->disk_reopened = true;
                }
                return 0;
        }
        o.writable = false;
        o.writable_layer = NULL;
        o.no_backing = false;
        o.writable_layers = writable;
        r = dc_disk_open(top_abs, &o, &j->disk);
        if (r < 0)
                return r;
        return chain_expected(dc_disk_chain(j->disk), jo->expect_chain);
}

void dc_job_restore_chain(dc_job *j) {
        if (!j->disk_reopened)
                return;
        dc_disk_quiesce(j->disk);
        (void) dc_disk_reopen(j->disk, NULL);
        dc_disk_unquiesce(j->disk);
        j->disk_reopened = false;
}

/* Open a backup or mirror target: its top only, read-write.  SAME: QMP's message for a target that is the source. */
static int open_target(dc_image *source, const char *target, const struct dc_open_options *oo, const char *same,
                       dc_image **ret) {
        struct dc_open_options o = *oo;
        dc_image *img = NULL;
        int r;

        if (dc_job_find_layer(source, target))
                return dc_error(EINVAL, "%s", same);
        o.writable = true;
        o.no_backing = true; /* its backing is read at the pivot, not before (it may be the source) */
        o.writable_layer = NULL;
        o.writable_layers = NULL;
        r = dc_image_open(target, &o, &img);
        if (r < 0)
                return r;
        r = dc_job_writable_check(img);
        if (r < 0) {
                dc_image_close(img);
                return r;
        }
        *ret = img;
        return 0;
}

int dc_job_new_copy(const struct dc_job_driver *drv, const char *source_path, bool source_writable, const char *target_path,
                    const struct dc_open_options *oo, const struct dc_job_options *jo, const char *same,
                    dc_job **ret, dc_image **ret_source, dc_image **ret_target) {
        _cleanup_free_ char *source = NULL, *target = NULL;
        dc_image *src = NULL, *tgt = NULL;
        dc_job *j;
        int r;

        /* an NBD URI is a remote target (nbd-client.c), never a path in the roots */
        bool remote = dc_nbd_uri_is(target_path);
        /* or a backup's remote source (a replica restored): the read-only export is the whole chain */
        bool remote_source = dc_nbd_uri_is(source_path);

        if (remote_source && (remote || source_writable || jo->disk || drv->type != DC_JOB_TYPE_BACKUP))
                return dc_error(EINVAL, "'%s': an NBD export is a backup's source only into a file, with no bitmap "
                                        "or checkpoint", source_path);
        r = remote_source ? 0 : dc_job_path(source_path, oo, &source);
        if (r >= 0 && !remote)
                r = dc_job_path(target_path, oo, &target);
        if (r < 0)
                return r;
        if (!remote && !remote_source && strcmp(source, target) == 0)
                return dc_error(EINVAL, "%s", same);
        r = dc_job_new(drv, jo, &j);
        if (r < 0)
                return r;
        if (remote_source) {
                r = dc_nbd_image_open(source_path, false, jo->nbd, &src);
                if (r >= 0) {
                        r = dc_disk_new(src, oo, &j->disk); /* (closes SRC when it fails) */
                        if (r < 0)
                                src = NULL;
                }
                if (r >= 0)
                        r = open_target(src, target, oo, same, &tgt);
                if (r < 0) {
                        dc_job_free(j);
                        return r;
                }
                *ret = j;
                *ret_source = src;
                *ret_target = tgt;
                return 0;
        }
        /* a backup that changes a bitmap of the source writes its metadata */
        r = dc_job_open_chain(j, source, oo, jo, source_writable ? (const char *const[]){ source, NULL } : NULL);
        if (r >= 0) {
                src = dc_job_find_layer(dc_disk_chain(j->disk), source);
                r = remote ? dc_nbd_target_open(target_path, jo->nbd, &tgt) : open_target(src, target, oo, same, &tgt);
        }
        if (r < 0) {
                dc_job_free(j);
                return r;
        }
        *ret = j;
        *ret_source = src;
        *ret_target = tgt;
        return 0;
}
