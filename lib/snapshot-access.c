/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * A point-in-time view of a live disk, for pull backups: image fleecing
 * (QEMU's copy-before-write filter writing into a fleecing image, read
 * through block/snapshot-access.c).
 *
 * Design notes
 * ------------
 * - At the point in time (the disk quiesced) the copy engine marks every
 *   unit (the fleecing image's cluster) and the copy-before-write filter
 *   goes onto the disk's write path: before a guest write changes a marked
 *   unit, the unit's data goes into the fleecing image and the mark is
 *   cleared.  A marked unit therefore still holds its point-in-time data in
 *   the live chain, a clear one holds it in the fleecing image.
 * - A read takes the disk's range lock over the whole units it touches, so
 *   no guest write (whose range lock covers whole units of the filter, and
 *   which copies before it writes) runs on them meanwhile; then each run of
 *   units is read from where its data is.  Guest writes elsewhere go on at
 *   full speed; only one that hits a unit being read waits for that read.
 * - discard-after-read: once a read covered whole units, they are not
 *   needed again: a marked one is unmarked (a later guest write no longer
 *   copies it), a copied one is discarded from the fleecing image (its space
 *   comes back), and both read as an error afterwards (QEMU's snapshot-access
 *   refuses such areas too).  So a full pull backup needs scratch space only
 *   for what the guest overwrites before the reader got there.
 * - on-cbw-error: break-guest-write (the default) fails a guest write whose
 *   copy failed, so the view stays true; break-snapshot lets the write
 *   through and fails every read from then on (the view is lost).
 *   cbw-timeout makes a copy that takes too long such a failure, so a slow
 *   fleecing image cannot stall the guest for longer.
 * - Locking: the engine and the gone bitmap have their own locks; the
 *   broken flag is an atomic; reads run on the export's threads.
 */

#include <stdio.h>

#include "bitmap.h"
#include "block-copy.h"

struct dc_snapshot {
        dc_disk *disk;
        dc_image *source;       /* the chain's top at the point in time */
        dc_image *fleece;       /* the fleecing image, read-write, no backing */
        dc_block_copy *copy;    /* marked: the unit's data is still in the live chain */
        dc_cbw *cbw;
        uint64_t unit, size;
        bool discard_after_read;
        pthread_mutex_t lock;   /* gone, why */
        struct dc_bitmap gone;  /* units read and discarded */
        int broken;             /* atomic */
        char why[512];
};

static void broken_cb(void *userdata, const char *why) {
        dc_snapshot *s = userdata;

        pthread_mutex_lock(&s->lock);
        if (!s->why[0])
                snprintf(s->why, sizeof s->why, "%s", why);
        pthread_mutex_unlock(&s->lock);
        __atomic_store_n(&s->broken, 1, __ATOMIC_RELEASE);
}

static int check_broken(dc_snapshot *s) {
        char why[sizeof s->why];

        if (!__atomic_load_n(&s->broken, __ATOMIC_ACQUIRE))
                return 0;
        pthread_mutex_lock(&s->lock);
        memcpy(why, s->why, sizeof why);
        pthread_mutex_unlock(&s->lock);
        return dc_error(EIO, "the point-in-time view is lost (on-cbw-error break-snapshot): %s", why);
}

DC_EXPORT int dc_snapshot_new(dc_disk *disk, const struct dc_snapshot_options *o, dc_snapshot **ret) {
        struct dc_open_options fo = *o->open;
        dc_snapshot *s;
        int r;

        s = calloc(1, sizeof *s);
        if (!s)
                return dc_error(ENOMEM, "out of memory");
        pthread_mutex_init(&s->lock, NULL);
        s->disk = dc_disk_ref(disk);
        s->discard_after_read = o->discard_after_read;
        fo.writable = true;
        fo.no_backing = true;
        fo.writable_layer = NULL;
        fo.writable_layers = NULL;
        r = dc_image_open(o->fleece, &fo, &s->fleece);
        if (r >= 0 && s->fleece->drv != &dc_qcow2_driver)
                r = dc_error(EINVAL, "'%s': a fleecing image is qcow2", o->fleece);
        dc_disk_quiesce(disk);
        if (r >= 0) {
                s->source = dc_disk_chain(disk);
                s->size = s->source->virtual_size;
                s->unit = MAX(dc_image_cluster_size(s->fleece), 65536u);
                if (s->fleece->virtual_size != s->size)
                        r = dc_error(EINVAL, "'%s' has %llu bytes, the disk %llu", o->fleece,
                                     (unsigned long long) s->fleece->virtual_size, (unsigned long long) s->size);
        }
        if (r >= 0 && dc_bitmap_init(&s->gone, DIV_ROUND_UP(s->size, s->unit)) < 0)
                r = dc_error(ENOMEM, "out of memory");
        if (r >= 0)
                r = dc_block_copy_new(&(struct dc_block_copy_params){ .disk = disk, .source = s->source,
                                                                      .target = s->fleece, .unit = s->unit },
                                      &s->copy);
        /* the point in time: the bitmap frozen, the checkpoint started, every unit marked, the filter on */
        if (r >= 0 && o->bitmap)
                r = dc_image_bitmap_copy(s->source, o->bitmap, o->ret_bitmap);
        if (r >= 0 && o->checkpoint)
                r = dc_image_bitmap_add(s->source, o->checkpoint, 0, false);
        if (r >= 0) {
                dc_block_copy_mark_all(s->copy);
                r = dc_cbw_attach(disk, s->copy, s->unit, "the fleecing export", &s->cbw);
        }
        if (r >= 0 && o->break_snapshot)
                dc_cbw_set_break_snapshot(s->cbw, broken_cb, s);
        if (r >= 0)
                dc_cbw_set_timeout(s->cbw, o->cbw_timeout_ms);
        dc_disk_unquiesce(disk);
        if (r < 0) {
                if (o->bitmap && o->ret_bitmap)
                        *o->ret_bitmap = dc_bitmap_copy_free(*o->ret_bitmap);
                dc_snapshot_free(s);
                return r;
        }
        *ret = s;
        return 0;
}

DC_EXPORT dc_snapshot *dc_snapshot_free(dc_snapshot *s) {
        if (!s)
                return NULL;
        s->cbw = dc_cbw_detach(s->cbw);
        s->copy = dc_block_copy_free(s->copy);
        s->fleece = dc_image_close(s->fleece);
        dc_bitmap_release(&s->gone);
        dc_disk_unref(s->disk);
        pthread_mutex_destroy(&s->lock);
        free(s);
        return NULL;
}

DC_EXPORT uint64_t dc_snapshot_size(dc_snapshot *s) {
        return s->size;
}

/* After a read of [OFF, OFF+LEN) under the range lock: its whole units are not needed again. */
static int discard_read(dc_snapshot *s, uint64_t off, uint64_t len) {
        uint64_t u = s->unit, first = DIV_ROUND_UP(off, u), last = off + len >= s->size ? s->gone.nbits : (off + len) / u;
        int r = 0;

        for (uint64_t i = first; i < last && r >= 0;) {
                bool marked;
                uint64_t n = dc_block_copy_marked_run(s->copy, i * u, (last - i) * u, &marked);
                if (!n)
                        break;
                if (marked)
                        dc_block_copy_unmark(s->copy, i * u, n);
                else
                        r = dc_image_discard(s->fleece, i * u, n);
                i += DIV_ROUND_UP(n, u);
        }
        if (r >= 0 && last > first) {
                pthread_mutex_lock(&s->lock);
                (void) dc_bitmap_assign(&s->gone, first, last - first, true);
                pthread_mutex_unlock(&s->lock);
        }
        return r;
}

DC_EXPORT int dc_snapshot_read(dc_snapshot *s, void *buf, uint64_t off, size_t len) {
        uint64_t u = s->unit, lo = ALIGN_DOWN(off, u), hi, pos = off, end = off + len;
        struct dc_range_lock rl;
        int r = check_broken(s);

        if (r < 0 || !len)
                return r;
        if (off > s->size || len > s->size - off)
                return dc_error(EINVAL, "read of %zu bytes at %llu is beyond the end of the view", len,
                                (unsigned long long) off);
        hi = MIN(ALIGN_UP(end, u), s->size);
        dc_disk_range_lock(s->disk, &rl, lo, hi - lo);
        pthread_mutex_lock(&s->lock);
        for (uint64_t i = off / u; i < DIV_ROUND_UP(end, u) && r >= 0; i++)
                if (dc_bitmap_test(&s->gone, i))
                        r = dc_error(EACCES, "bytes %llu-%llu of the view were read and then discarded "
                                             "(discard-after-read): they cannot be read again",
                                     (unsigned long long) (i * u), (unsigned long long) MIN((i + 1) * u, s->size) - 1);
        pthread_mutex_unlock(&s->lock);
        while (r >= 0 && pos < end) {
                bool marked;
                uint64_t n = dc_block_copy_marked_run(s->copy, pos, end - pos, &marked);
                if (!n) {
                        r = dc_error(EIO, "the view's map covered nothing at %llu", (unsigned long long) pos);
                        break;
                }
                r = dc_image_read(marked ? s->source : s->fleece, (uint8_t *) buf + (pos - off), pos, (size_t) n);
                pos += n;
        }
        if (r >= 0 && s->discard_after_read)
                r = discard_read(s, off, len);
        dc_disk_range_unlock(s->disk, &rl);
        /* a copy that failed while we read (break-snapshot) may have let a write change what we read */
        return r < 0 ? r : check_broken(s);
}

DC_EXPORT int dc_snapshot_block_status(dc_snapshot *s, uint64_t off, uint64_t len, struct dc_extent *ret) {
        bool marked;
        uint64_t n;
        int r = check_broken(s);

        if (r < 0)
                return r;
        n = dc_block_copy_marked_run(s->copy, off, len, &marked);
        if (!n)
                return dc_error(EINVAL, "block status at %llu is beyond the end of the view", (unsigned long long) off);
        if (marked) {
                /* still in place: the live chain says (a later copy-before-write copies exactly that) */
                r = dc_image_block_status(s->source, off, n, ret);
                if (r >= 0)
                        ret->length = MIN(ret->length, n);
                return r;
        }
        /* copied: data, as far as a reader is concerned */
        *ret = (struct dc_extent){ .start = off, .length = n, .depth = 0, .present = true, .data = true,
                                   .host_offset = -1 };
        return 0;
}
