/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Creating qcow2 images, laid out as QEMU lays them out: header in cluster
 * 0, then the refcount table, the refcount blocks that cover the metadata,
 * and the L1 table.  The header carries the backing format extension
 * whenever there is a backing file (QEMU refuses to probe raw), and the
 * feature name table on v3 when it fits in cluster 0.
 */

#include <fcntl.h>

#include "qcow2.h"

static const struct {
        uint8_t type, bit;
        const char *name;
} feature_table[] = {
        { 0, 0, "dirty bit" },         { 0, 1, "corrupt bit" },    { 0, 2, "external data file" },
        { 0, 3, "compression type" },  { 0, 4, "extended L2 entries" }, { 1, 0, "lazy refcounts" },
        { 2, 0, "bitmaps" },           { 2, 1, "raw external data" },
};

static size_t put_ext(uint8_t *h, size_t p, uint32_t type, const void *data, uint32_t len) {
        put_be32(h + p, type);
        put_be32(h + p + 4, len);
        memcpy(h + p + 8, data, len);
        return p + 8 + ALIGN_UP((size_t) len, 8);
}

int dc_qcow2_create(int fd, uint64_t size, const struct dc_create_options *o, const char *backing_fmt) {
        uint32_t cs = o->cluster_size ? o->cluster_size : 65536;
        uint32_t rbits = o->refcount_bits ? o->refcount_bits : 16;
        int version = o->compat ? o->compat : 3;
        unsigned cluster_bits = 0, order = 0;
        uint64_t l2_entries, l1_entries, l1c, rtc = 1, rbc = 1, total, per_block;
        size_t p, blen = o->backing ? strlen(o->backing) : 0, ftsize = sizeof feature_table / sizeof feature_table[0] * 48;
        _cleanup_free_ uint8_t *h = NULL, *buf = NULL;
        int r;

        while ((1u << cluster_bits) < cs)
                cluster_bits++;
        if ((1u << cluster_bits) != cs || cluster_bits < 9 || cluster_bits > 21)
                return dc_error(EINVAL, "cluster size %u is not a power of two between 512 and 2097152", cs);
        while ((1u << order) < rbits)
                order++;
        if ((1u << order) != rbits || order > 6)
                return dc_error(EINVAL, "refcount bits %u must be a power of two up to 64", rbits);
        if (version != 2 && version != 3)
                return dc_error(EINVAL, "compat must be 0.10 or 1.1");
        if (version == 2 && (rbits != 16 || o->lazy_refcounts || o->compression_type))
                return dc_error(EINVAL, "compat 0.10 supports neither lazy refcounts, refcount bits other than 16, "
                                        "nor zstd compression");
        if (o->compression_type < 0 || o->compression_type > 1)
                return dc_error(EINVAL, "unknown compression type");
        if (blen > QCOW2_MAX_BACKING_NAME)
                return dc_error(EINVAL, "backing file name is longer than %u bytes", QCOW2_MAX_BACKING_NAME);

        /*
         * The sizes qemu-img create accepts (measured with qemu-img 7.2 for
         * every cluster size): it rounds the size up to a multiple of 512
         * and refuses with EFBIG what needs more than a 32 MiB L1 table,
         * i.e. anything over cluster_size^2 * 2^19 bytes; qemu-img itself
         * takes no size above INT64_MAX.
         */
        l2_entries = cs / 8;
        if (size > INT64_MAX)
                return dc_error(EFBIG, "size %llu is over QEMU's limit of %lld bytes", (unsigned long long) size,
                                (long long) INT64_MAX);
        size = ALIGN_UP(size, 512);
        if (size > qcow2_max_virtual_size(cluster_bits, l2_entries))
                return dc_error(EFBIG, "size %llu is beyond QEMU's limit of %llu bytes for %u-byte clusters (an L1 "
                                       "table of at most 32 MiB)", (unsigned long long) size,
                                (unsigned long long) qcow2_max_virtual_size(cluster_bits, l2_entries), cs);
        l1_entries = qcow2_size_to_l1(cluster_bits, l2_entries, size);
        l1c = DIV_ROUND_UP(l1_entries * 8, cs);
        per_block = (uint64_t) cs * 8 / rbits;
        for (;;) {
                uint64_t nrbc, nrtc;
                total = 1 + rtc + rbc + l1c;
                nrbc = DIV_ROUND_UP(total, per_block);
                nrtc = DIV_ROUND_UP(nrbc * 8, cs);
                if (nrbc == rbc && nrtc == rtc)
                        break;
                rbc = nrbc;
                rtc = nrtc;
        }

        h = calloc(1, cs);
        if (!h)
                return dc_error(ENOMEM, "out of memory");
        put_be32(h, QCOW2_MAGIC);
        put_be32(h + 4, (uint32_t) version);
        put_be32(h + 20, cluster_bits);
        put_be64(h + 24, size);
        put_be32(h + 36, (uint32_t) l1_entries);
        put_be64(h + 40, l1_entries ? (1 + rtc + rbc) * cs : 0);
        put_be64(h + 48, (uint64_t) cs);
        put_be32(h + 56, (uint32_t) rtc);
        if (version == 3) {
                put_be64(h + 72, o->compression_type ? QCOW2_INCOMPAT_COMPRESSION : 0);
                put_be64(h + 80, o->lazy_refcounts ? QCOW2_COMPAT_LAZY_REFCOUNTS : 0);
                put_be32(h + 96, order);
                put_be32(h + 100, 112);
                h[104] = (uint8_t) o->compression_type;
                p = 112;
        } else
                p = 72;
        if (o->backing && backing_fmt)
                p = put_ext(h, p, QCOW2_EXT_BACKING_FORMAT, backing_fmt, (uint32_t) strlen(backing_fmt));
        if (version == 3 && p + 8 + ftsize + 8 + blen <= cs) {
                uint8_t ft[sizeof feature_table / sizeof feature_table[0] * 48] = { 0 };
                for (size_t i = 0; i < sizeof feature_table / sizeof feature_table[0]; i++) {
                        ft[i * 48] = feature_table[i].type;
                        ft[i * 48 + 1] = feature_table[i].bit;
                        memcpy(ft + i * 48 + 2, feature_table[i].name, strlen(feature_table[i].name));
                }
                p = put_ext(h, p, QCOW2_EXT_FEATURE_TABLE, ft, (uint32_t) ftsize);
        }
        p += 8; /* end of extensions */
        if (o->backing) {
                if (p + blen > cs)
                        return dc_error(EINVAL, "backing file name does not fit in the header cluster");
                put_be64(h + 8, p);
                put_be32(h + 16, (uint32_t) blen);
                memcpy(h + p, o->backing, blen);
        }

        r = dc_pwrite_full(fd, h, cs, 0);
        if (r < 0)
                return dc_error(r, "cannot write the header: %s", strerror(-r));

        /* Refcount table and blocks: every metadata cluster counts 1. */
        buf = calloc(rtc + rbc, cs);
        if (!buf)
                return dc_error(ENOMEM, "out of memory");
        for (uint64_t i = 0; i < rbc; i++)
                put_be64(buf + i * 8, (1 + rtc + i) * cs);
        for (uint64_t c = 0; c < total; c++)
                qcow2_rb_set_one(buf + (rtc + c / per_block) * cs, rbits, c % per_block);
        r = dc_pwrite_full(fd, buf, (rtc + rbc) * cs, cs);
        if (r < 0)
                return dc_error(r, "cannot write the refcount table: %s", strerror(-r));
        if (ftruncate(fd, (off_t) (total * cs)) < 0)
                return dc_error(errno, "cannot size the image: %m");
        r = dc_fdatasync(fd);
        if (r < 0)
                return dc_error(r, "cannot sync the image: %s", strerror(-r));
        return 0;
}
