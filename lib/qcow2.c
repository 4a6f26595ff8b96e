/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The qcow2 driver: open, guest reads and writes (docs/interop/qcow2.rst).
 *
 * Design notes
 * ------------
 * - The header is parsed once and never rewritten as a whole: every later
 *   change patches the field it concerns in place (sizes, table pointers,
 *   feature words).  Unknown header extensions, unknown trailing header
 *   fields and the feature name table are therefore preserved byte for byte.
 * - Nothing in the file is trusted.  At open every size and offset of the
 *   header, its extensions, the snapshot table, the bitmap directory and
 *   tables and the refcount table is checked against QEMU's limits (EFBIG),
 *   against the specification and the file (EUCLEAN, naming the field), and
 *   computed without overflow; check mode waives only "inside the file", so
 *   that check can count such references as qemu-img check does.  L2 tables
 *   are checked when they enter the cache, entries and compressed
 *   descriptors when they are used.  Before any data is written in place or
 *   into clusters just allocated, qcow2_overlap_check() makes sure it cannot
 *   land on metadata, as QEMU's overlap check does: a corrupt or hostile
 *   table gets EUCLEAN, never a damaged image.
 * - The active L1 table lives in memory; L2 tables and refcount blocks go
 *   through small caches (qcow2-refcount.c).  Refcount blocks are written
 *   through.  L2 entries of allocating writes into fresh clusters are not:
 *   they stay in the cache, marked, until the next sync makes their data
 *   durable (qcow2_l2_commit_pending: at a flush, before the slot is reused,
 *   after 1 GiB of such data, or when an entry of theirs is written at once);
 *   a close commits them, so a close can have entries to write back.
 * - Allocation order and the crash argument are in qcow2-refcount.c.  Here
 *   the rule is: new clusters get their refcount, their full contents and
 *   one fdatasync() before the L2 entry that makes them visible is written;
 *   old clusters are freed only after that entry is synced.
 * - A new L2 table is allocated, written in full (zeroes, or a copy of the
 *   shared table it replaces) and synced before its L1 entry is written.
 * - Extended L2 entries (incompatible bit 4, formats.md A.7): entries are
 *   16 bytes, the second word a bitmap of 32 subclusters (allocated / reads
 *   as zeros).  Status and reads go by subcluster: an unallocated subcluster
 *   falls through to the backing file, even in an allocated cluster.
 *   Writes follow QEMU: a write into an unallocated cluster allocates it and
 *   writes only the subclusters it touches (a partly touched one completed
 *   from what it showed), setting their allocation bits; a write into an
 *   allocated cluster writes in place and sets the bits it needs (after the
 *   next sync, like any entry that points at new data); a cluster whose old
 *   content cannot be kept per subcluster (compressed) is copied whole.  Zero
 *   writes and discards set and clear the bitmaps as QEMU's zero_in_l2_slice,
 *   zero_l2_subclusters and discard_in_l2_slice do; compressed clusters
 *   keep an empty bitmap.
 * - An external data file (incompatible bit 2) holds the guest data at host
 *   offset = guest offset, unrefcounted; every entry there has COPIED, so
 *   offset 0 with COPIED is allocated.  No compressed clusters, no internal
 *   snapshots.  Its name is resolved and confined like a backing file name
 *   (against the image's directory: QEMU takes its working directory), it is
 *   opened beneath its storage root and locked as the image is, and a sync
 *   makes it durable before the image file, so that data is durable before
 *   the entry that references it.  With data_file_raw (autoclear bit 1) the
 *   data file stays a valid raw image: whatever reads as zeros on the disk
 *   is zeroed there first, and writes copy whole clusters.
 * - Images with internal snapshots, encryption or an unsupported feature
 *   are opened read-only or refused with the reason; write-opens clear
 *   unknown autoclear bits and mark persistent bitmaps in-use (we do not
 *   track them yet, so they must not be trusted after our writes), and a
 *   dirty image has its refcounts rebuilt first, as QEMU does (refused as
 *   corrupt when its refcount structure itself is broken).
 */

#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>

#include "qcow2.h"

int qcow2_cluster_type(struct qcow2 *s, uint64_t e) {
        if (e & QCOW_OFLAG_COMPRESSED)
                return QC_COMPRESSED;
        /* with extended L2 entries the bitmap says what reads as zero */
        if ((e & QCOW_OFLAG_ZERO) && s->version >= 3 && !s->extl2)
                return (e & L2E_OFFSET_MASK) ? QC_ZERO_ALLOC : QC_ZERO_PLAIN;
        if ((e & L2E_OFFSET_MASK) == 0)
                /* offset 0 is a valid place in a data file; the COPIED flag,
                 * which every entry there carries, tells them apart */
                return s->has_data_file && (e & QCOW_OFLAG_COPIED) ? QC_NORMAL : QC_UNALLOCATED;
        return QC_NORMAL;
}

/* The type of subcluster SC of the cluster whose entry is E (and bitmap BM). */
int qcow2_subcluster_type(struct qcow2 *s, uint64_t e, uint64_t bm, unsigned sc) {
        int type = qcow2_cluster_type(s, e);

        if (!s->extl2)
                return type;
        switch (type) {
        case QC_COMPRESSED:
                return QC_COMPRESSED;
        case QC_NORMAL:
                if ((bm >> 32) & bm)
                        return QC_INVALID;
                if (bm & QCOW2_BM_ZERO(sc, sc + 1))
                        return QC_ZERO_ALLOC;
                return bm & QCOW2_BM_ALLOC(sc, sc + 1) ? QC_NORMAL : QC_UNALLOC_ALLOC;
        default:
                if (bm & QCOW2_BM_ALL_ALLOC)
                        return QC_INVALID;
                return bm & QCOW2_BM_ZERO(sc, sc + 1) ? QC_ZERO_PLAIN : QC_UNALLOCATED;
        }
}

void qcow2_compressed_range(struct qcow2 *s, uint64_t e, uint64_t *ret_off, uint64_t *ret_len) {
        unsigned shift = 62 - (s->cluster_bits - 8);
        uint64_t mask = (1ull << (s->cluster_bits - 8)) - 1;
        uint64_t off = e & ((1ull << shift) - 1);
        uint64_t nsect = ((e >> shift) & mask) + 1;

        *ret_off = off;
        *ret_len = nsect * 512 - (off & 511);
}

static const char *feature_name(struct qcow2 *s, int type, int bit) {
        static const char *const builtin[3][2] = {
                { "dirty bit", "corrupt bit" },
                { "lazy refcounts", NULL },
                { "bitmaps", "raw external data" },
        };
        if (s->feature_names[type][bit])
                return s->feature_names[type][bit];
        if (type == 0 && bit == 2)
                return "external data file";
        if (type == 0 && bit == 3)
                return "compression type";
        if (type == 0 && bit == 4)
                return "extended L2 entries";
        if (bit < 2 && builtin[type][bit])
                return builtin[type][bit];
        return NULL;
}

static int set_read_only(dc_image *img, bool writable, const char *reason) {
        if (!img->read_only_reason)
                img->read_only_reason = strdup(reason);
        if (writable)
                return dc_error(EROFS, "'%s': %s; it can only be opened read-only", img->path, reason);
        return 0;
}

int qcow2_header_write(dc_image *img, uint64_t field_off, const void *buf, size_t len) {
        int r = dc_pwrite_full(img->fd, buf, len, field_off);
        if (r >= 0)
                r = dc_fdatasync(img->fd);
        if (r < 0)
                return dc_error(r, "'%s': cannot update the header: %s", img->path, strerror(-r));
        return 0;
}

/* The size of the image file now. */
int qcow2_file_size(dc_image *img, uint64_t *ret) {
        struct stat st;

        if (fstat(img->fd, &st) < 0)
                return dc_error(errno, "'%s': cannot stat: %m", img->path);
        *ret = (uint64_t) st.st_size;
        return 0;
}

/*
 * A table that the header (or a table) points to, LEN bytes at OFF: cluster
 * aligned, past the header cluster, below 2^56 and inside the file.  Only
 * the last is waived in check mode, where qemu-img check counts a table past
 * the end as a corruption instead of refusing the image.  FIELD names the
 * field that holds OFF, so that the message says what is wrong where.
 */
static int check_table(dc_image *img, const char *what, const char *field, uint64_t off, uint64_t len,
                       uint64_t fsize) {
        struct qcow2 *s = QC(img);
        uint64_t cs = s->cluster_size;

        if (len == 0)
                return 0;
        if (off & (cs - 1))
                return dc_error(EUCLEAN, "'%s': %s %#llx (the %s) is not cluster aligned", img->path, field,
                                (unsigned long long) off, what);
        if (off < cs)
                return dc_error(EUCLEAN, "'%s': %s %#llx puts the %s inside the header cluster", img->path, field,
                                (unsigned long long) off, what);
        if (off >= QCOW2_MAX_HOST_OFFSET || len > QCOW2_MAX_HOST_OFFSET - off)
                return dc_error(EUCLEAN, "'%s': the %s (%s %#llx, %llu bytes) reaches past host offset 2^56",
                                img->path, what, field, (unsigned long long) off, (unsigned long long) len);
        if (!img->check_mode && off + len > fsize)
                return dc_error(EUCLEAN, "'%s': the %s (%s %#llx, %llu bytes) extends beyond the end of the file (%llu bytes)",
                                img->path, what, field, (unsigned long long) off, (unsigned long long) len,
                                (unsigned long long) fsize);
        return 0;
}

static bool overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen) {
        return alen && blen && a < b + blen && b < a + alen;
}

static int parse_extensions(dc_image *img, const uint8_t *h, uint64_t end) {
        struct qcow2 *s = QC(img);
        uint64_t p = s->header_length;

        while (p + 8 <= end) {
                uint32_t type = be32(h + p), len = be32(h + p + 4);
                const uint8_t *d = h + p + 8;

                if (type == QCOW2_EXT_END)
                        return 0;
                if (len > end - p - 8)
                        return dc_error(EUCLEAN, "'%s': header extension 0x%08x at offset %llu (length %u) overruns the "
                                                 "header area (%llu bytes)", img->path, type, (unsigned long long) p, len,
                                        (unsigned long long) end);
                switch (type) {
                case QCOW2_EXT_BACKING_FORMAT:
                        if (len == 0)
                                return dc_error(EUCLEAN, "'%s': the backing format extension is empty", img->path);
                        if (len >= 16)
                                return dc_error(EFBIG, "'%s': the backing format extension is %u bytes long; QEMU's "
                                                       "limit is 15", img->path, len);
                        free(img->backing_format);
                        img->backing_format = strndup((const char *) d, len);
                        if (!img->backing_format)
                                return dc_error(ENOMEM, "out of memory");
                        break;
                case QCOW2_EXT_FEATURE_TABLE:
                        for (uint32_t i = 0; i + 48 <= len; i += 48) {
                                unsigned t = d[i], bit = d[i + 1];
                                if (t > 2 || bit > 63 || s->feature_names[t][bit])
                                        continue;
                                s->feature_names[t][bit] = strndup((const char *) d + i + 2, 46);
                        }
                        break;
                case QCOW2_EXT_BITMAPS:
                        /* As QEMU: the extension means nothing unless autoclear
                         * bit 0 says that it is consistent (v3 only). */
                        if (!(s->autoclear & QCOW2_AUTOCLEAR_BITMAPS))
                                break;
                        if (len != 24)
                                return dc_error(EUCLEAN, "'%s': the bitmaps extension has length %u, not 24", img->path,
                                                len);
                        s->nb_bitmaps = be32(d);
                        s->bitmap_dir_size = be64(d + 8);
                        s->bitmap_dir_offset = be64(d + 16);
                        if (be32(d + 4) != 0)
                                return dc_error(EUCLEAN, "'%s': the bitmaps extension's reserved field is not zero",
                                                img->path);
                        if (s->nb_bitmaps == 0)
                                return dc_error(EUCLEAN, "'%s': the bitmaps extension has nb_bitmaps 0", img->path);
                        if (s->nb_bitmaps > QCOW2_MAX_BITMAPS)
                                return dc_error(EFBIG, "'%s': nb_bitmaps %u is more than QEMU's limit of %u", img->path,
                                                s->nb_bitmaps, QCOW2_MAX_BITMAPS);
                        if (s->bitmap_dir_size > QCOW2_MAX_BITMAP_DIR_BYTES)
                                return dc_error(EFBIG, "'%s': bitmap_directory_size %llu is over QEMU's limit of %llu",
                                                img->path, (unsigned long long) s->bitmap_dir_size,
                                                (unsigned long long) QCOW2_MAX_BITMAP_DIR_BYTES);
                        if (s->bitmap_dir_size < (uint64_t) s->nb_bitmaps * 24)
                                return dc_error(EUCLEAN, "'%s': bitmap_directory_size %llu is too small for %u bitmaps",
                                                img->path, (unsigned long long) s->bitmap_dir_size, s->nb_bitmaps);
                        s->has_bitmaps = true;
                        break;
                case QCOW2_EXT_FDE:
                        if (len != 16)
                                return dc_error(EUCLEAN, "'%s': the encryption header extension has length %u, not 16",
                                                img->path, len);
                        s->fde_offset = be64(d);
                        s->fde_length = be64(d + 8);
                        if (s->crypt_method != 2)
                                return dc_error(EUCLEAN, "'%s': an encryption header extension without LUKS "
                                                         "encryption (crypt_method %u)", img->path, s->crypt_method);
                        break;
                case QCOW2_EXT_DATA_FILE:
                        if (len == 0)
                                return dc_error(EUCLEAN, "'%s': the data file name extension is empty", img->path);
                        if (len > 4095)
                                return dc_error(EFBIG, "'%s': the data file name is %u bytes long, over 4095", img->path,
                                                len);
                        if (memchr(d, 0, len))
                                return dc_error(EUCLEAN, "'%s': the data file name contains a NUL byte", img->path);
                        free(s->data_file);
                        s->data_file = strndup((const char *) d, len);
                        if (!s->data_file)
                                return dc_error(ENOMEM, "out of memory");
                        break;
                default:
                        /* Unknown: skipped, and kept since we never rewrite cluster 0. */
                        break;
                }
                p += 8 + ALIGN_UP((uint64_t) len, 8);
        }
        return 0;
}

int dc_qcow2_probe_header(const uint8_t *buf, size_t len, uint64_t *ret_size) {
        if (len < 72 || be32(buf) != QCOW2_MAGIC)
                return 0;
        if (ret_size)
                *ret_size = be64(buf + 24);
        return 1;
}

/*
 * The snapshot table, as far as we need it: within QEMU's limits and the
 * file, and where each snapshot's L1 table lies, so that none of our writes
 * can land on one (qcow2_overlap_check).  Not read in check mode, as QEMU
 * does not: check walks it and counts what is wrong.
 */
static int read_snapshots(dc_image *img, uint64_t fsize) {
        struct qcow2 *s = QC(img);
        uint64_t p = s->snapshots_offset;
        int r;

        if (s->nb_snapshots == 0)
                return 0;
        r = check_table(img, "snapshot table", "snapshots_offset", p, (uint64_t) s->nb_snapshots * 40, fsize);
        if (r < 0)
                return r;
        s->sn_l1 = calloc((size_t) s->nb_snapshots * 2, sizeof(uint64_t));
        if (!s->sn_l1)
                return dc_error(ENOMEM, "out of memory");
        for (uint32_t i = 0; i < s->nb_snapshots; i++) {
                uint8_t e[40];
                uint64_t l1off, esize;
                uint32_t l1_size, extra;
                uint16_t id_len, name_len;
                char what[64];

                if (p + sizeof e > fsize)
                        return dc_error(EUCLEAN, "'%s': snapshot %u lies beyond the end of the file", img->path, i);
                r = dc_pread_full(img->fd, e, sizeof e, p);
                if (r < 0)
                        return dc_error(r, "'%s': cannot read the snapshot table: %s", img->path, strerror(-r));
                l1off = be64(e);
                l1_size = be32(e + 8);
                id_len = be16(e + 12);
                name_len = be16(e + 14);
                extra = be32(e + 36);
                if (extra > QCOW2_MAX_SNAPSHOT_EXTRA)
                        return dc_error(EFBIG, "'%s': snapshot %u: extra_data_size %u is over QEMU's limit of %u",
                                        img->path, i, extra, QCOW2_MAX_SNAPSHOT_EXTRA);
                esize = ALIGN_UP(40 + (uint64_t) extra + id_len + name_len, 8);
                if (p + esize - s->snapshots_offset > QCOW2_MAX_SNAPSHOTS_BYTES)
                        return dc_error(EFBIG, "'%s': the snapshot table is larger than QEMU's limit of %llu bytes",
                                        img->path, (unsigned long long) QCOW2_MAX_SNAPSHOTS_BYTES);
                /* (the padding of the last entry need not be in the file) */
                if (p + 40 + extra + id_len + name_len > fsize)
                        return dc_error(EUCLEAN, "'%s': snapshot %u (id_str_size %u, name_size %u, extra_data_size %u) "
                                                 "runs past the end of the file", img->path, i, id_len, name_len, extra);
                if (l1_size > QCOW2_MAX_L1_ENTRIES)
                        return dc_error(EFBIG, "'%s': snapshot %u: l1_size %u is over QEMU's limit of %u entries",
                                        img->path, i, l1_size, QCOW2_MAX_L1_ENTRIES);
                snprintf(what, sizeof what, "L1 table of snapshot %u", i);
                r = check_table(img, what, "l1_table_offset", l1off, (uint64_t) l1_size * 8, fsize);
                if (r < 0)
                        return r;
                s->sn_l1[2 * i] = l1off;
                s->sn_l1[2 * i + 1] = (uint64_t) l1_size * 8;
                p += esize;
        }
        s->snapshots_size = p - s->snapshots_offset;
        return 0;
}

int qcow2_read_bitmap_dir(dc_image *img, uint8_t **ret) {
        struct qcow2 *s = QC(img);
        _cleanup_free_ uint8_t *dir = malloc(MAX(s->bitmap_dir_size, 1u));
        int r;

        if (!dir)
                return dc_error(ENOMEM, "out of memory");
        r = dc_pread_full(img->fd, dir, s->bitmap_dir_size, s->bitmap_dir_offset);
        if (r < 0)
                return dc_error(r, "'%s': cannot read the bitmap directory: %s", img->path, strerror(-r));
        *ret = TAKE_PTR(dir);
        return 0;
}


/*
 * The bitmap directory and tables, checked as QEMU checks them when it
 * loads the bitmaps (block/qcow2-bitmap.c): the rules of the spec give
 * EUCLEAN, what the spec allows but QEMU refuses gives EFBIG or ENOTSUP.
 * VISIT (if not NULL) is called with each bitmap once it passed; a
 * negative return ends the walk with it.
 */
int qcow2_read_bitmaps(dc_image *img, uint64_t fsize,
                       int (*visit)(dc_image *img, const struct qcow2_bitmap_entry *b, void *userdata), void *userdata) {
        struct qcow2 *s = QC(img);
        uint64_t cs = s->cluster_size, p = 0;
        _cleanup_free_ uint8_t *dir = NULL;
        int r;

        r = check_table(img, "bitmap directory", "bitmap_directory_offset", s->bitmap_dir_offset, s->bitmap_dir_size,
                        fsize);
        if (r < 0)
                return r;
        r = qcow2_read_bitmap_dir(img, &dir);
        if (r < 0)
                return r;
        for (uint32_t i = 0; i < s->nb_bitmaps; i++) {
                const uint8_t *d = dir + p;
                uint64_t toff, esize;
                uint32_t tsize, flags, extra;
                uint16_t name_size;
                uint8_t gran;
                _cleanup_free_ uint8_t *t = NULL;

                if (s->bitmap_dir_size - p < 24)
                        return dc_error(EUCLEAN, "'%s': bitmap %u runs past bitmap_directory_size", img->path, i);
                toff = be64(d);
                tsize = be32(d + 8);
                flags = be32(d + 12);
                gran = d[17];
                name_size = be16(d + 18);
                extra = be32(d + 20);
                esize = ALIGN_UP(24 + (uint64_t) extra + name_size, 8);
                if (esize > s->bitmap_dir_size - p)
                        return dc_error(EUCLEAN, "'%s': bitmap %u (name_size %u, extra_data_size %u) runs past "
                                                 "bitmap_directory_size", img->path, i, name_size, extra);
                if (flags & ~3u)
                        return dc_error(EUCLEAN, "'%s': bitmap %u has reserved flags set (%#x)", img->path, i, flags);
                if (d[16] != 1)
                        return dc_error(ENOTSUP, "'%s': bitmap %u has the unknown type %u", img->path, i, d[16]);
                if (gran < 9 || gran > 31)
                        return dc_error(EFBIG, "'%s': bitmap %u: granularity_bits %u is outside QEMU's 9..31", img->path,
                                        i, gran);
                if (name_size == 0)
                        return dc_error(EUCLEAN, "'%s': bitmap %u has name_size 0", img->path, i);
                if (name_size > QCOW2_MAX_BITMAP_NAME)
                        return dc_error(EFBIG, "'%s': bitmap %u: name_size %u is over QEMU's limit of %u", img->path, i,
                                        name_size, QCOW2_MAX_BITMAP_NAME);
                if (extra)
                        return dc_error(ENOTSUP, "'%s': bitmap %u has extra data (extra_data_size %u), which QEMU does "
                                                 "not support either", img->path, i, extra);
                if (tsize == 0)
                        return dc_error(EUCLEAN, "'%s': bitmap %u has bitmap_table_size 0", img->path, i);
                if (tsize > QCOW2_MAX_BITMAP_TABLE || (uint64_t) tsize * cs > QCOW2_MAX_BITMAP_BYTES)
                        return dc_error(EFBIG, "'%s': bitmap %u: bitmap_table_size %u is over QEMU's limit", img->path, i,
                                        tsize);
                if (!(flags & 1) && img->virtual_size > (((uint64_t) tsize * cs * 8) << gran))
                        return dc_error(EUCLEAN, "'%s': bitmap %u: bitmap_table_size %u is too small for the virtual size",
                                        img->path, i, tsize);
                r = check_table(img, "bitmap table", "bitmap_table_offset", toff, (uint64_t) tsize * 8, fsize);
                if (r < 0)
                        return r;
                t = malloc((size_t) tsize * 8);
                if (!t)
                        return dc_error(ENOMEM, "out of memory");
                r = dc_pread_full(img->fd, t, (size_t) tsize * 8, toff);
                if (r < 0)
                        return dc_error(r, "'%s': cannot read a bitmap table: %s", img->path, strerror(-r));
                for (uint32_t j = 0; j < tsize; j++) {
                        uint64_t e = be64(t + (size_t) j * 8), o = e & 0x00fffffffffffe00ull;
                        if ((e & 0xff000000000001feull) || (o && (e & 1)))
                                return dc_error(EUCLEAN, "'%s': bitmap %u: table entry %u is invalid (%#llx)", img->path,
                                                i, j, (unsigned long long) e);
                        r = check_table(img, "bitmap data cluster", "bitmap table entry", o, o ? cs : 0, fsize);
                        if (r < 0)
                                return r;
                }
                if (visit) {
                        r = visit(img,
                                  &(struct qcow2_bitmap_entry){ .entry = p, .table_offset = toff, .name = (const char *) d + 24,
                                                          .name_size = name_size,
                                                          .flags = flags, .granularity_bits = gran, .table = t,
                                                          .table_size = tsize },
                                  userdata);
                        if (r < 0)
                                return r;
                }
                p += esize;
        }
        if (p != s->bitmap_dir_size)
                return dc_error(EUCLEAN, "'%s': bitmap_directory_size %llu does not match its %u entries (%llu bytes)",
                                img->path, (unsigned long long) s->bitmap_dir_size, s->nb_bitmaps,
                                (unsigned long long) p);
        return 0;
}

/*
 * Every refcount block the table points to: reserved bits clear, a whole
 * cluster inside the file and clear of the header, the L1 table and the
 * refcount table, which refcount updates would otherwise overwrite.
 */
static int check_reftable(dc_image *img, uint64_t fsize) {
        struct qcow2 *s = QC(img);
        uint64_t cs = s->cluster_size;

        for (uint64_t i = 0; i < s->rt_entries; i++) {
                uint64_t e = s->rt[i], off = e & REFT_OFFSET_MASK;
                char what[64];
                int r;

                if (e & REFT_RESERVED_MASK)
                        return dc_error(EUCLEAN, "'%s': refcount table entry %llu has reserved bits set (%#llx)",
                                        img->path, (unsigned long long) i, (unsigned long long) e);
                if (!off)
                        continue;
                snprintf(what, sizeof what, "refcount block %llu", (unsigned long long) i);
                r = check_table(img, what, "refcount table entry", off, cs, fsize);
                if (r < 0)
                        return r;
                if (overlaps(off, cs, s->l1_offset, (uint64_t) s->l1_size * 8) ||
                    overlaps(off, cs, s->rt_offset, (uint64_t) s->rt_clusters * cs))
                        return dc_error(EUCLEAN, "'%s': refcount table entry %llu points into the %s (%#llx)", img->path,
                                        (unsigned long long) i,
                                        overlaps(off, cs, s->rt_offset, (uint64_t) s->rt_clusters * cs)
                                                ? "refcount table" : "L1 table",
                                        (unsigned long long) off);
        }
        return 0;
}

/*
 * The external data file: its name is resolved as a backing file name is
 * (relative to the image's directory, where QEMU takes its working
 * directory; protocol names refused), must lie inside the storage roots,
 * and is opened beneath its root so that a symlink out of it fails in the
 * kernel.  Read-write when the image is.
 */
static int open_data_file(dc_image *img, bool writable) {
        struct qcow2 *s = QC(img);
        _cleanup_free_ char *abs = NULL;
        struct stat st;
        int r, fd;

        r = dc_backing_resolve(img->path, s->data_file, &abs);
        if (r < 0)
                return dc_error(r, "'%s': data file '%s': %s", img->path, s->data_file, dc_get_error());
        r = dc_path_resolve(abs, (const char *const *) img->roots, &s->data_file_abs, NULL);
        if (r < 0)
                return dc_error(r, "'%s': data file '%s': %s", img->path, s->data_file, dc_get_error());
        fd = dc_path_open(s->data_file_abs, (const char *const *) img->roots, writable ? O_RDWR : O_RDONLY, 0);
        if (fd < 0)
                return dc_error(fd, "'%s': cannot open its data file '%s': %s", img->path, s->data_file,
                                dc_get_error());
        s->data_fd = fd;
        if (fstat(fd, &st) < 0)
                return dc_error(errno, "'%s': cannot stat its data file: %m", img->path);
        if (!S_ISREG(st.st_mode))
                return dc_error(EMEDIUMTYPE, "'%s': its data file '%s' is not a regular file", img->path, s->data_file);
        {
                /* guest data written into the image file itself would land on
                 * its metadata (no overlap check guards a data file) */
                struct stat ist;
                if (fstat(img->fd, &ist) == 0 && ist.st_dev == st.st_dev && ist.st_ino == st.st_ino)
                        return dc_error(EUCLEAN, "'%s': the data file '%s' is the image file itself", img->path,
                                        s->data_file);
        }
        if (writable && st.st_nlink > 1 && img->roots)
                return dc_error(EMLINK, "'%s': its data file '%s' has %ju hard links; diskchain writes only files "
                                        "with one link", img->path, s->data_file, (uintmax_t) st.st_nlink);
        /* locked as the image is (QEMU locks both) */
        if (!img->no_lock && dc_lock_fd(fd, s->data_file_abs, writable) < 0)
                return dc_error(EBUSY, "'%s': its data file '%s' is in use by another process that holds a "
                                       "conflicting lock", img->path, s->data_file);
        return 0;
}

static int qcow2_open(dc_image *img, bool writable) {
        _cleanup_free_ uint8_t *h = NULL;
        struct qcow2 *s;
        uint64_t backing_off, end, need_l1, unknown, fsize = 0, max_size;
        uint32_t backing_len;
        int r;

        s = calloc(1, sizeof *s);
        if (!s)
                return dc_error(ENOMEM, "out of memory");
        img->priv = s;
        s->data_fd = -EBADF;
        s->metadata_prealloc = -1;
        pthread_cond_init(&s->inflight_done, NULL);

        h = malloc(4096); /* grown to the cluster size below: cluster 0 holds the header area */
        if (!h)
                return dc_error(ENOMEM, "out of memory");
        r = qcow2_file_size(img, &fsize);
        if (r < 0)
                return r;
        if (fsize < 72)
                return dc_error(EUCLEAN, "'%s': the file is %llu bytes long, too short for a qcow2 header", img->path,
                                (unsigned long long) fsize);
        r = dc_pread_full(img->fd, h, 4096, 0);
        if (r < 0)
                return dc_error(r, "'%s': cannot read the header: %s", img->path, strerror(-r));
        if (be32(h) != QCOW2_MAGIC)
                return dc_error(EMEDIUMTYPE, "'%s' is not a qcow2 image (bad magic)", img->path);

        s->version = be32(h + 4);
        if (s->version != 2 && s->version != 3)
                return dc_error(ENOTSUP, "'%s': unsupported qcow2 version %u", img->path, s->version);
        s->cluster_bits = be32(h + 20);
        if (s->cluster_bits < 9 || s->cluster_bits > 55)
                return dc_error(EUCLEAN, "'%s': cluster_bits %u is outside the 9..55 of the specification", img->path,
                                s->cluster_bits);
        if (s->cluster_bits > 21)
                return dc_error(EFBIG, "'%s': cluster_bits %u: clusters over 2 MiB are beyond QEMU's limit", img->path,
                                s->cluster_bits);
        s->cluster_size = 1u << s->cluster_bits;
        s->l2_entries = s->cluster_size / 8;
        if (s->cluster_size > 4096) {
                uint8_t *bigger = realloc(h, s->cluster_size);
                if (!bigger)
                        return dc_error(ENOMEM, "out of memory");
                h = bigger;
                r = dc_pread_full(img->fd, h, s->cluster_size, 0);
                if (r < 0)
                        return dc_error(r, "'%s': cannot read the header: %s", img->path, strerror(-r));
        }
        img->virtual_size = be64(h + 24);
        s->crypt_method = be32(h + 32);
        s->l1_size = be32(h + 36);
        s->l1_offset = be64(h + 40);
        s->rt_offset = be64(h + 48);
        s->rt_clusters = be32(h + 56);
        s->nb_snapshots = be32(h + 60);
        s->snapshots_offset = be64(h + 64);
        if (s->version == 2) {
                s->header_length = 72;
                s->refcount_order = 4;
        } else {
                if (fsize < 104)
                        return dc_error(EUCLEAN, "'%s': the qcow2 v3 header is truncated (%llu bytes)", img->path,
                                        (unsigned long long) fsize);
                s->incompat = be64(h + 72);
                s->compat = be64(h + 80);
                s->autoclear = be64(h + 88);
                s->refcount_order = be32(h + 96);
                s->header_length = be32(h + 100);
                if (s->header_length < 104 || s->header_length % 8 || s->header_length > s->cluster_size)
                        return dc_error(EUCLEAN, "'%s': header_length %u is not a multiple of 8 between 104 and the "
                                                 "cluster size", img->path, s->header_length);
                if (s->header_length > 104)
                        s->compression_type = h[104];
        }
        if (s->refcount_order > 6)
                return dc_error(EUCLEAN, "'%s': refcount_order %u is above 6 (64-bit refcounts)", img->path,
                                s->refcount_order);
        if (s->crypt_method > 2)
                return dc_error(ENOTSUP, "'%s': unknown crypt_method %u", img->path, s->crypt_method);
        s->refcount_bits = 1u << s->refcount_order;
        s->per_block = (uint64_t) s->cluster_size * 8 / s->refcount_bits;

        backing_off = be64(h + 8);
        backing_len = be32(h + 16);
        end = backing_off ? backing_off : s->cluster_size;
        if (backing_off > s->cluster_size)
                return dc_error(EUCLEAN, "'%s': backing_file_offset %llu is outside the header cluster", img->path,
                                (unsigned long long) backing_off);
        if (backing_off && backing_off < s->header_length)
                return dc_error(EUCLEAN, "'%s': backing_file_offset %llu overlaps the header (header_length %u)",
                                img->path, (unsigned long long) backing_off, s->header_length);
        if (backing_off && backing_len > QCOW2_MAX_BACKING_NAME)
                return dc_error(EFBIG, "'%s': backing_file_size %u is over QEMU's limit of %u bytes", img->path,
                                backing_len, QCOW2_MAX_BACKING_NAME);
        if (backing_off && backing_len > s->cluster_size - backing_off)
                return dc_error(EUCLEAN, "'%s': the backing file name (backing_file_offset %llu, backing_file_size %u) "
                                         "runs past the header cluster", img->path, (unsigned long long) backing_off,
                                backing_len);
        r = parse_extensions(img, h, end);
        if (r < 0)
                return r;
        if (backing_off && backing_len > 0) {
                img->backing_file = strndup((const char *) h + backing_off, backing_len);
                if (!img->backing_file)
                        return dc_error(ENOMEM, "out of memory");
                if (strlen(img->backing_file) != backing_len)
                        return dc_error(EUCLEAN, "'%s': the backing file name contains a NUL byte", img->path);
        }

        /* Incompatible features we do not know must stop us, named. */
        unknown = s->incompat & ~QCOW2_INCOMPAT_KNOWN;
        if (unknown) {
                char names[512] = "";
                size_t n = 0;
                for (int bit = 0; bit < 64; bit++) {
                        const char *name;
                        if (!(unknown & (1ull << bit)))
                                continue;
                        name = feature_name(s, 0, bit);
                        n += (size_t) snprintf(names + n, sizeof names - MIN(n, sizeof names), "%s%s%s",
                                               n ? ", " : "", name ? name : "unknown incompatible feature bit ",
                                               "");
                        if (!name && n < sizeof names)
                                n += (size_t) snprintf(names + n, sizeof names - n, "%d", bit);
                        if (n >= sizeof names)
                                break;
                }
                return dc_error(ENOTSUP, "'%s': unsupported qcow2 feature(s): %s", img->path, names);
        }
        if (!!(s->incompat & QCOW2_INCOMPAT_COMPRESSION) != (s->compression_type != 0))
                return dc_error(EUCLEAN, "'%s': compression_type %u and incompatible bit 3 disagree", img->path,
                                s->compression_type);
        if (s->compression_type > 1)
                return dc_error(ENOTSUP, "'%s': unknown compression_type %u", img->path, s->compression_type);

        s->extl2 = s->incompat & QCOW2_INCOMPAT_EXTL2;
        s->l2e_size = s->extl2 ? 16 : 8;
        s->l2_entries = s->cluster_size / s->l2e_size;
        s->sc_size = s->extl2 ? s->cluster_size / QCOW2_SUBCLUSTERS : s->cluster_size;
        if (s->sc_size < 512)
                return dc_error(ENOTSUP, "'%s': extended L2 entries with %u-byte clusters: subclusters under 512 bytes "
                                         "are not supported (nor by QEMU)", img->path, s->cluster_size);
        s->has_data_file = s->incompat & QCOW2_INCOMPAT_DATA_FILE;
        s->data_raw = s->autoclear & QCOW2_AUTOCLEAR_DATA_FILE_RAW;
        if (s->has_data_file && !s->data_file)
                return dc_error(EUCLEAN, "'%s': the external data file bit is set but the header names no data file",
                                img->path);
        if (s->data_raw && !s->has_data_file)
                return dc_error(EUCLEAN, "'%s': autoclear bit 1 (raw external data) is set without an external data "
                                         "file", img->path);

        /* The virtual size and the tables, against QEMU's limits and the file. */
        if (img->virtual_size % 512)
                return dc_error(EUCLEAN, "'%s': size %llu (the virtual size) is not a multiple of 512", img->path,
                                (unsigned long long) img->virtual_size);
        if (s->l1_size > QCOW2_MAX_L1_ENTRIES)
                return dc_error(EFBIG, "'%s': l1_size %u is over QEMU's limit of %u entries (32 MiB)", img->path,
                                s->l1_size, QCOW2_MAX_L1_ENTRIES);
        max_size = qcow2_max_virtual_size(s->cluster_bits, s->l2_entries);
        if (img->virtual_size > max_size)
                return dc_error(EFBIG, "'%s': size %llu is beyond QEMU's limit of %llu bytes for %u-byte clusters",
                                img->path, (unsigned long long) img->virtual_size, (unsigned long long) max_size,
                                s->cluster_size);
        need_l1 = qcow2_size_to_l1(s->cluster_bits, s->l2_entries, img->virtual_size);
        if (s->l1_size < need_l1)
                return dc_error(EUCLEAN, "'%s': l1_size %u is too small for size %llu (%llu entries needed)", img->path,
                                s->l1_size, (unsigned long long) img->virtual_size, (unsigned long long) need_l1);
        r = check_table(img, "L1 table", "l1_table_offset", s->l1_offset, (uint64_t) s->l1_size * 8, fsize);
        if (r < 0)
                return r;
        if ((uint64_t) s->rt_clusters * s->cluster_size > QCOW2_MAX_REFTABLE_BYTES)
                return dc_error(EFBIG, "'%s': refcount_table_clusters %u is over QEMU's limit of %u MiB", img->path,
                                s->rt_clusters, QCOW2_MAX_REFTABLE_BYTES >> 20);
        if (s->rt_clusters == 0 && !img->check_mode)
                return dc_error(EUCLEAN, "'%s': refcount_table_clusters is 0: the image has no refcount table",
                                img->path);
        r = check_table(img, "refcount table", "refcount_table_offset", s->rt_offset,
                        (uint64_t) s->rt_clusters * s->cluster_size, fsize);
        if (r < 0)
                return r;
        if (!img->check_mode && overlaps(s->l1_offset, (uint64_t) s->l1_size * 8, s->rt_offset,
                                         (uint64_t) s->rt_clusters * s->cluster_size))
                return dc_error(EUCLEAN, "'%s': the L1 table (l1_table_offset %#llx) and the refcount table "
                                         "(refcount_table_offset %#llx) overlap", img->path,
                                (unsigned long long) s->l1_offset, (unsigned long long) s->rt_offset);
        if (s->nb_snapshots > QCOW2_MAX_SNAPSHOTS)
                return dc_error(EFBIG, "'%s': nb_snapshots %u is over QEMU's limit of %u", img->path, s->nb_snapshots,
                                QCOW2_MAX_SNAPSHOTS);
        if (s->nb_snapshots && (s->snapshots_offset & (s->cluster_size - 1)))
                return dc_error(EUCLEAN, "'%s': snapshots_offset %#llx is not cluster aligned", img->path,
                                (unsigned long long) s->snapshots_offset);
        if (!img->check_mode) {
                r = read_snapshots(img, fsize);
                if (r < 0)
                        return r;
        }

        s->l1 = calloc(MAX(s->l1_size, 1u), sizeof(uint64_t));
        if (!s->l1)
                return dc_error(ENOMEM, "out of memory");
        if (s->l1_size) {
                _cleanup_free_ uint8_t *raw = malloc((size_t) s->l1_size * 8);
                if (!raw)
                        return dc_error(ENOMEM, "out of memory");
                r = dc_pread_full(img->fd, raw, (size_t) s->l1_size * 8, s->l1_offset);
                if (r < 0)
                        return dc_error(r, "'%s': cannot read the L1 table: %s", img->path, strerror(-r));
                for (uint32_t i = 0; i < s->l1_size; i++)
                        s->l1[i] = be64(raw + i * 8);
        }
        s->rt_entries = (uint64_t) s->rt_clusters * s->cluster_size / 8;
        s->rt = calloc(MAX(s->rt_entries, 1u), sizeof(uint64_t));
        if (!s->rt)
                return dc_error(ENOMEM, "out of memory");
        if (s->rt_entries) {
                _cleanup_free_ uint8_t *raw = malloc(s->rt_entries * 8);
                if (!raw)
                        return dc_error(ENOMEM, "out of memory");
                r = dc_pread_full(img->fd, raw, s->rt_entries * 8, s->rt_offset);
                if (r < 0)
                        return dc_error(r, "'%s': cannot read the refcount table: %s", img->path, strerror(-r));
                for (uint64_t i = 0; i < s->rt_entries; i++)
                        s->rt[i] = be64(raw + i * 8);
        }
        if (s->version == 2 && s->has_bitmaps)
                s->has_bitmaps = false; /* v2 cannot carry consistent bitmaps */
        {
                uint64_t ranges = DIV_ROUND_UP(qcow2_size_to_clusters(s->cluster_bits, fsize), s->per_block);
                for (uint64_t t = 0; t < ranges && !s->alloc_unsafe; t++)
                        if (t >= s->rt_entries || !(s->rt[t] & REFT_OFFSET_MASK)) {
                                s->alloc_unsafe = true;
                                s->alloc_unsafe_entry = t;
                        }
                if (img->check_mode && check_reftable(img, fsize) < 0) {
                        /* refcount blocks that check counts as corrupt must not be written */
                        s->alloc_unsafe = true;
                        dc_error_clear();
                }
        }
        if (!img->check_mode) {
                /* In check mode, check counts all of this instead. */
                r = check_reftable(img, fsize);
                if (r >= 0 && s->has_bitmaps)
                        r = qcow2_read_bitmaps(img, fsize, NULL, NULL);
                if (r >= 0 && s->fde_length)
                        r = check_table(img, "encryption header", "the encryption header extension",
                                        s->fde_offset, ALIGN_UP(s->fde_length, s->cluster_size), fsize);
                if (r < 0)
                        return r;
        }

        if (s->has_data_file) {
                r = open_data_file(img, writable);
                if (r < 0)
                        return r;
        }

        /* Conditions that make the image read-only. */
        if (s->crypt_method) {
                r = set_read_only(img, writable, s->crypt_method == 1 ? "image is encrypted (AES)"
                                                                       : "image is encrypted (LUKS)");
                if (r < 0)
                        return r;
        }
        if (s->nb_snapshots) {
                r = set_read_only(img, writable, "image has internal snapshots");
                if (r < 0)
                        return r;
        }
        if ((s->incompat & QCOW2_INCOMPAT_CORRUPT) && !img->check_mode) {
                r = set_read_only(img, writable, "image is marked corrupt");
                if (r < 0)
                        return r;
        }

        img->writable = writable;
        if (writable && (s->incompat & QCOW2_INCOMPAT_DIRTY) && !img->check_mode) {
                /* Refcounts may be stale: rebuild them from the tables. */
                struct dc_check_result res;
                uint8_t w[8];
                r = qcow2_check(img, DC_REPAIR_ALL, &res);
                if (r < 0)
                        return r;
                if (res.corruptions || res.check_errors)
                        return dc_error(EUCLEAN, "'%s': the dirty bit is set and the refcounts could not be repaired "
                                                 "(%llu corruptions left)", img->path,
                                        (unsigned long long) (res.corruptions + res.check_errors));
                s->incompat &= ~QCOW2_INCOMPAT_DIRTY;
                put_be64(w, s->incompat);
                r = qcow2_header_write(img, 72, w, 8);
                if (r < 0)
                        return r;
        }
        return 0;
}

/*
 * QEMU's overlap check: a write of LEN bytes at host offset OFF must not
 * land on metadata, whatever a table says (a corrupt or hostile L2 entry, or
 * a refcount that let a metadata cluster be allocated again).  It is refused
 * as corruption before anything is written, and the image is left as it
 * was (QEMU also sets the corrupt bit; we leave the header alone so that
 * qemu-img check sees the image exactly as before).  IGNORE names the kind
 * of metadata the caller means to write.  Inactive L2 tables (snapshots')
 * are not looked at, as in QEMU's default; the rest is in memory, so the
 * cost is a pass over the L1 and refcount tables.
 */
int qcow2_overlap_check(dc_image *img, uint64_t off, uint64_t len, unsigned ignore, const char *what) {
        struct qcow2 *s = QC(img);
        uint64_t cs = s->cluster_size, first, n, at = 0;
        const char *hit = NULL;

        if (len == 0)
                return 0;
        if (off >= QCOW2_MAX_HOST_OFFSET || len > QCOW2_MAX_HOST_OFFSET - off)
                return dc_error(EUCLEAN, "'%s': refusing to write %s at host offset %#llx: beyond 2^56", img->path, what,
                                (unsigned long long) off);
        first = ALIGN_DOWN(off, cs);
        n = ALIGN_UP(off + len, cs) - first;
        if (first < cs)
                hit = "the header";
        else if (overlaps(first, n, s->l1_offset, (uint64_t) s->l1_size * 8))
                hit = "the active L1 table";
        else if (overlaps(first, n, s->rt_offset, (uint64_t) s->rt_clusters * cs))
                hit = "the refcount table";
        else if (s->nb_snapshots && overlaps(first, n, s->snapshots_offset, MAX(s->snapshots_size, 1u)))
                hit = "the snapshot table";
        else if (s->has_bitmaps && overlaps(first, n, s->bitmap_dir_offset, s->bitmap_dir_size))
                hit = "the bitmap directory";
        for (uint64_t i = 0; !hit && !(ignore & QCOW2_OL_REFBLOCK) && i < s->rt_entries; i++) {
                uint64_t o = s->rt[i] & REFT_OFFSET_MASK;
                if (o && overlaps(first, n, ALIGN_DOWN(o, cs), cs))
                        hit = "a refcount block", at = o;
        }
        for (uint64_t i = 0; !hit && !(ignore & QCOW2_OL_ACTIVE_L2) && i < s->l1_size; i++) {
                uint64_t o = s->l1[i] & L1E_OFFSET_MASK;
                if (o && overlaps(first, n, ALIGN_DOWN(o, cs), cs))
                        hit = "an active L2 table", at = o;
        }
        for (uint32_t i = 0; !hit && s->sn_l1 && i < s->nb_snapshots; i++)
                if (overlaps(first, n, s->sn_l1[2 * i], s->sn_l1[2 * i + 1]))
                        hit = "a snapshot's L1 table", at = s->sn_l1[2 * i];
        if (hit) {
                char where[32] = "";
                if (at)
                        snprintf(where, sizeof where, " at %#llx", (unsigned long long) at);
                return dc_error(EUCLEAN, "'%s': refusing to write %s at host offset %#llx (%llu bytes): it overlaps %s%s "
                                         "(the metadata is corrupt)", img->path, what, (unsigned long long) off,
                                (unsigned long long) len, hit, where);
        }
        return 0;
}

static int data_sync(dc_image *img);

/*
 * Make the data of deferred writes durable (the data file's first: it is
 * where their data went), then write their L2 entries (rule 1 of
 * qcow2-refcount.c, batched).
 */
int qcow2_l2_commit_pending(dc_image *img) {
        struct qcow2 *s = QC(img);
        struct qcow2_cache *c = &s->l2_cache;
        int r;

        if (!s->l2_pending)
                return 0;
        r = data_sync(img);
        if (r >= 0)
                r = dc_fdatasync(img->fd);
        if (r < 0)
                return dc_error(r, "'%s': flush failed: %s", img->path, strerror(-r));
        for (size_t i = 0; i < QCOW2_CACHE_SLOTS; i++) {
                if (c->dirty_hi[i] <= c->dirty_lo[i])
                        continue;
                if (c->offset[i]) {
                        r = dc_pwrite_full(img->fd, c->buf[i] + c->dirty_lo[i], c->dirty_hi[i] - c->dirty_lo[i],
                                           c->offset[i] + c->dirty_lo[i]);
                        if (r < 0)
                                return dc_error(r, "'%s': cannot update an L2 table: %s", img->path, strerror(-r));
                }
                c->dirty_lo[i] = c->dirty_hi[i] = 0;
        }
        s->l2_pending = false;
        s->unsynced_bytes = 0;
        return 0;
}

/* Entries [first, first+n) of the cached L2 table at L2OFF wait for the next sync. */
static void l2_defer(dc_image *img, uint64_t l2off, uint64_t first, uint64_t n) {
        struct qcow2 *s = QC(img);
        struct qcow2_cache *c = &s->l2_cache;

        for (size_t i = 0; i < QCOW2_CACHE_SLOTS; i++)
                if (c->offset[i] == l2off) {
                        uint32_t lo = (uint32_t) (first * s->l2e_size), hi = (uint32_t) ((first + n) * s->l2e_size);
                        if (c->dirty_hi[i] <= c->dirty_lo[i]) {
                                c->dirty_lo[i] = lo;
                                c->dirty_hi[i] = hi;
                        } else {
                                c->dirty_lo[i] = MIN(c->dirty_lo[i], lo);
                                c->dirty_hi[i] = MAX(c->dirty_hi[i], hi);
                        }
                        s->l2_pending = true;
                        return;
                }
}

#define L2_DEFER_MAX (1024u << 20) /* data written before its L2 entries must be committed */

static void qcow2_close(dc_image *img) {
        struct qcow2 *s = QC(img);

        if (!s)
                return;
        (void) qcow2_l2_commit_pending(img);
        dc_bitmaps_close(img);
        qcow2_cache_free(&s->l2_cache);
        qcow2_cache_free(&s->rb_cache);
        for (int t = 0; t < 3; t++)
                for (int b = 0; b < 64; b++)
                        free(s->feature_names[t][b]);
        free(s->l1);
        free(s->rt);
        free(s->sn_l1);
        free(s->comp_cache);
        free(s->data_file);
        free(s->data_file_abs);
        if (s->data_fd >= 0)
                close(s->data_fd);
        pthread_cond_destroy(&s->inflight_done);
        free(s);
        img->priv = NULL;
}

/* --- guest data: in the image file, or in the external data file ------------ */

static int data_pread(dc_image *img, void *buf, size_t len, uint64_t host) {
        struct qcow2 *s = QC(img);
        int r = s->data_fd >= 0 ? dc_pread_full(s->data_fd, buf, len, host) : dc_image_pread_data(img, buf, len, host);

        if (r < 0)
                return dc_error(r, "'%s': read error at %shost offset %llu: %s", img->path,
                                s->data_fd >= 0 ? "data file " : "", (unsigned long long) host, strerror(-r));
        return 0;
}

/* UNLOCKED: the image lock is released for the write (see qcow2_write). */
static int data_pwrite(dc_image *img, const void *buf, size_t len, uint64_t host, bool unlocked) {
        struct qcow2 *s = QC(img);
        int r;

        if (s->data_fd < 0)
                r = dc_image_pwrite_data(img, buf, len, host, unlocked);
        else {
                if (unlocked)
                        pthread_mutex_unlock(&img->lock);
                r = dc_pwrite_full(s->data_fd, buf, len, host);
                if (unlocked)
                        pthread_mutex_lock(&img->lock);
        }
        if (r < 0)
                return dc_error(r, "'%s': write error at %shost offset %llu: %s", img->path,
                                s->data_fd >= 0 ? "data file " : "", (unsigned long long) host, strerror(-r));
        return 0;
}

/* The data file's part of a sync: before the image file's, so that data is
 * durable before the entries that point to it. */
static int data_sync(dc_image *img) {
        struct qcow2 *s = QC(img);
        return s->data_fd >= 0 ? dc_fdatasync(s->data_fd) : 0;
}

/*
 * A raw data file must read as the disk does: where the disk now reads as
 * zeros (zero writes, discards), so must the file, durably before the
 * entries that say so.  A hole is punched where the file system can.
 */
static int data_zero(dc_image *img, uint64_t off, uint64_t len) {
        struct qcow2 *s = QC(img);
        int r = 0;

        if (!s->data_raw || s->data_fd < 0 || len == 0)
                return 0;
        len = MIN(len, img->virtual_size - MIN(off, img->virtual_size));
        if (len && fallocate(s->data_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t) off, (off_t) len) < 0) {
                _cleanup_free_ uint8_t *z = calloc(1, (size_t) MIN(len, (uint64_t) (1u << 20)));
                if (!z)
                        return dc_error(ENOMEM, "out of memory");
                for (uint64_t p = 0; p < len && r >= 0; p += 1u << 20)
                        r = dc_pwrite_full(s->data_fd, z, (size_t) MIN(len - p, (uint64_t) (1u << 20)), off + p);
        }
        if (r >= 0)
                r = dc_fdatasync(s->data_fd);
        if (r < 0)
                return dc_error(r, "'%s': cannot zero its raw data file: %s", img->path, strerror(-r));
        return 0;
}

/* Whether the storage of entry E is freed when the entry goes (refcounted). */
static bool entry_owns_clusters(struct qcow2 *s, uint64_t e) {
        int type = qcow2_cluster_type(s, e);
        return type == QC_COMPRESSED || ((type == QC_NORMAL || type == QC_ZERO_ALLOC) && !s->has_data_file);
}

/*
 * The L2 table at L2OFF, from L1 entry L1I, through the cache.  A table is
 * checked when it comes into the cache (from then on it is ours): aligned,
 * past the header, inside the file, and clear of the other metadata, which
 * our entry updates would otherwise overwrite.
 */
static int l2_table_get(dc_image *img, uint64_t l1i, uint64_t l2off, uint8_t **ret) {
        struct qcow2 *s = QC(img);
        struct qcow2_cache *c = &s->l2_cache;
        uint64_t cs = s->cluster_size, fsize = 0;
        bool cached = false;
        int r;

        for (size_t i = 0; i < QCOW2_CACHE_SLOTS && !cached; i++)
                cached = c->offset[i] == l2off;
        if (!cached) {
                if (l2off & (cs - 1) || l2off < cs)
                        return dc_error(EUCLEAN, "'%s': L1 entry %llu: L2 table offset %#llx is %s", img->path,
                                        (unsigned long long) l1i, (unsigned long long) l2off,
                                        l2off < cs ? "inside the header cluster" : "not cluster aligned");
                r = qcow2_file_size(img, &fsize);
                if (r < 0)
                        return r;
                if (l2off > fsize || fsize - l2off < cs)
                        return dc_error(EUCLEAN, "'%s': L1 entry %llu: the L2 table at %#llx lies beyond the end of the "
                                                 "file (%llu bytes)", img->path, (unsigned long long) l1i,
                                        (unsigned long long) l2off, (unsigned long long) fsize);
                r = qcow2_overlap_check(img, l2off, cs, QCOW2_OL_ACTIVE_L2, "an L2 table");
                if (r < 0)
                        return r;
        }
        return qcow2_cache_get(img, c, l2off, false, ret);
}

/*
 * What every user of the L2 entry E (bitmap BM) of guest cluster GIDX relies
 * on: no reserved bits, an aligned offset, no COPIED flag on a compressed
 * cluster, no compressed cluster with a data file, and a subcluster bitmap
 * that does not contradict itself or the entry (formats.md A.7).
 */
static int l2e_check(dc_image *img, uint64_t gidx, uint64_t e, uint64_t bm) {
        struct qcow2 *s = QC(img);
        int type = qcow2_cluster_type(s, e);

        if (type != QC_COMPRESSED) {
                uint64_t reserved = L2E_RESERVED_MASK | (s->version < 3 ? QCOW_OFLAG_ZERO : 0);
                if (e & reserved)
                        return dc_error(EUCLEAN, "'%s': the L2 entry of guest cluster %llu has reserved bits set (%#llx)",
                                        img->path, (unsigned long long) gidx, (unsigned long long) e);
                if ((e & L2E_OFFSET_MASK) & (s->cluster_size - 1))
                        return dc_error(EUCLEAN, "'%s': guest cluster %llu: data cluster offset %#llx is not cluster "
                                                 "aligned", img->path, (unsigned long long) gidx,
                                        (unsigned long long) (e & L2E_OFFSET_MASK));
                if (s->extl2 && type == QC_NORMAL && ((bm >> 32) & bm))
                        return dc_error(EUCLEAN, "'%s': guest cluster %llu: corrupted subcluster allocation bitmap "
                                                 "(%#llx: subclusters both allocated and zero)", img->path,
                                        (unsigned long long) gidx, (unsigned long long) bm);
                if (s->extl2 && type == QC_UNALLOCATED && (bm & QCOW2_BM_ALL_ALLOC))
                        return dc_error(EUCLEAN, "'%s': guest cluster %llu: unallocated cluster with a non-zero "
                                                 "subcluster allocation bitmap (%#llx)", img->path,
                                        (unsigned long long) gidx, (unsigned long long) bm);
        } else if (e & QCOW_OFLAG_COPIED)
                return dc_error(EUCLEAN, "'%s': compressed guest cluster %llu has the COPIED flag", img->path,
                                (unsigned long long) gidx);
        else if (s->has_data_file)
                return dc_error(EUCLEAN, "'%s': guest cluster %llu is compressed, which an image with an external data "
                                         "file cannot be", img->path, (unsigned long long) gidx);
        return 0;
}

/*
 * The L2 entry (and subcluster bitmap) of guest cluster GIDX, checked by
 * l2e_check(); 0 when the L2 table is absent, and then *RET_NO_TABLE, if
 * given, is set.
 */
static int l2_entry_ex(dc_image *img, uint64_t gidx, uint64_t *ret, uint64_t *ret_bm, bool *ret_no_table) {
        struct qcow2 *s = QC(img);
        uint64_t l1i = gidx / s->l2_entries, l1e, l2off, e, bm;
        uint8_t *t;
        int r;

        if (ret_no_table)
                *ret_no_table = false;
        *ret = *ret_bm = 0;
        if (l1i >= s->l1_size) {
                if (ret_no_table)
                        *ret_no_table = true;
                return 0;
        }
        l1e = s->l1[l1i];
        if (l1e & L1E_RESERVED_MASK)
                return dc_error(EUCLEAN, "'%s': L1 entry %llu has reserved bits set (%#llx)", img->path,
                                (unsigned long long) l1i, (unsigned long long) l1e);
        l2off = l1e & L1E_OFFSET_MASK;
        if (l2off == 0) {
                if (ret_no_table)
                        *ret_no_table = true;
                return 0;
        }
        r = l2_table_get(img, l1i, l2off, &t);
        if (r < 0)
                return r;
        e = qcow2_l2_get(s, t, gidx % s->l2_entries);
        bm = qcow2_l2_bitmap(s, t, gidx % s->l2_entries);
        r = l2e_check(img, gidx, e, bm);
        if (r < 0)
                return r;
        *ret = e;
        *ret_bm = bm;
        return 0;
}

/*
 * Where the data of the compressed cluster GIDX (entry E) lies, checked: a
 * descriptor is only trusted below 2^56, past the header and with its last
 * sector starting inside the file (the sector count may run past the end of
 * the file by the padding of that last sector, as QEMU writes it).
 */
static int compressed_range(dc_image *img, uint64_t gidx, uint64_t e, uint64_t *ret_off, uint64_t *ret_len) {
        struct qcow2 *s = QC(img);
        uint64_t off, len, fsize = 0;
        int r;

        qcow2_compressed_range(s, e, &off, &len);
        r = qcow2_file_size(img, &fsize);
        if (r < 0)
                return r;
        if (off < s->cluster_size || off >= QCOW2_MAX_HOST_OFFSET || len > QCOW2_MAX_HOST_OFFSET - off ||
            off + len > ALIGN_UP(fsize, 512))
                return dc_error(EUCLEAN, "'%s': compressed guest cluster %llu: its data (host offset %#llx, %llu bytes) "
                                         "is %s", img->path, (unsigned long long) gidx, (unsigned long long) off,
                                (unsigned long long) len,
                                off < s->cluster_size ? "inside the header cluster" : "outside the file");
        *ret_off = off;
        *ret_len = len;
        return 0;
}

/* QEMU reports data in host-file holes as zero for metadata-preallocated
 * images only; it decides that once, by counting refcounted clusters. */
static bool detect_metadata_prealloc(dc_image *img) {
        struct qcow2 *s = QC(img);
        struct stat st;
        uint64_t real_clusters, threshold, end, count = 0;

        if (s->metadata_prealloc >= 0)
                return s->metadata_prealloc;
        s->metadata_prealloc = 0;
        if (fstat(img->fd, &st) < 0)
                return false;
        real_clusters = (uint64_t) st.st_blocks * 512 / s->cluster_size;
        threshold = MAX(real_clusters * 10 / 9, real_clusters + 2);
        end = DIV_ROUND_UP((uint64_t) st.st_size, s->cluster_size);
        for (uint64_t i = 0; i < end && count < threshold; i++) {
                uint64_t v;
                if (qcow2_refcount_get(img, i, &v) < 0)
                        return false;
                count += !!v;
        }
        s->metadata_prealloc = count >= threshold;
        return s->metadata_prealloc;
}

static bool has_host(int type) {
        return type == QC_NORMAL || type == QC_ZERO_ALLOC || type == QC_UNALLOC_ALLOC;
}

/*
 * The (sub)cluster type at guest offset OFF and how far from OFF, within
 * LEN, the same type goes on (with contiguous host offsets, where there are
 * any), the host offset of OFF (0 when none) and the entry of OFF's cluster.
 * Granularity is the subcluster; a missing L2 table counts as a whole
 * table's worth of unallocated clusters at once, so that a huge empty image
 * is walked in L1 entries, not clusters.
 */
static int status_at(dc_image *img, uint64_t off, uint64_t len, int *ret_type, uint64_t *ret_host,
                     uint64_t *ret_len, uint64_t *ret_entry) {
        struct qcow2 *s = QC(img);
        uint64_t cs = s->cluster_size, scs = s->sc_size, gidx = off / cs, e, bm, host = 0, done, cur, ce, cbm;
        bool no_table;
        int type, r;

        r = l2_entry_ex(img, gidx, &e, &bm, &no_table);
        if (r < 0)
                return r;
        type = qcow2_subcluster_type(s, e, bm, (unsigned) (off % cs / scs));
        if (type == QC_INVALID)
                return dc_error(EUCLEAN, "'%s': guest cluster %llu: invalid subcluster bitmap %#llx", img->path,
                                (unsigned long long) gidx, (unsigned long long) bm);
        if (has_host(type))
                host = (e & L2E_OFFSET_MASK) + off % cs;
        done = MIN(scs - off % scs, len);
        if (no_table)
                done = MIN((s->l2_entries - gidx % s->l2_entries) * cs - off % cs, len);
        cur = gidx;
        ce = e;
        cbm = bm;
        while (done < len) {
                uint64_t p = off + done, g = p / cs, step = scs;
                int t2;
                if (g != cur) {
                        r = l2_entry_ex(img, g, &ce, &cbm, &no_table);
                        if (r < 0)
                                return r;
                        cur = g;
                        if (no_table)
                                step = (s->l2_entries - g % s->l2_entries) * cs;
                }
                t2 = qcow2_subcluster_type(s, ce, cbm, (unsigned) (p % cs / scs));
                if (t2 != type)
                        break;
                if (has_host(type) && (ce & L2E_OFFSET_MASK) + p % cs != host + done)
                        break;
                done += MIN(step, len - done);
        }
        *ret_type = type;
        *ret_host = host;
        *ret_len = done;
        if (ret_entry)
                *ret_entry = e;
        return 0;
}

static int qcow2_block_status(dc_image *img, uint64_t off, uint64_t len, struct dc_layer_status *ret) {
        struct qcow2 *s = QC(img);
        uint64_t host, n;
        int type, r;

        r = status_at(img, off, len, &type, &host, &n, NULL);
        if (r < 0)
                return r;
        ret->compressed = type == QC_COMPRESSED;
        ret->host_offset = has_host(type) ? (int64_t) host : -1;
        ret->host_hole = false;
        ret->length = n;
        switch (type) {
        case QC_UNALLOCATED:
        case QC_UNALLOC_ALLOC:
                /* (an allocated cluster's unallocated subcluster keeps its host
                 * offset: qemu-img map shows it where nothing lies below) */
                ret->type = DC_LAYER_UNALLOCATED;
                break;
        case QC_ZERO_PLAIN:
        case QC_ZERO_ALLOC:
                ret->type = DC_LAYER_ZERO;
                break;
        case QC_COMPRESSED:
                ret->type = DC_LAYER_DATA;
                break;
        default:
                ret->type = DC_LAYER_DATA;
                /* (QEMU does not look for holes in a data file) */
                if (!s->crypt_method && !s->has_data_file && detect_metadata_prealloc(img)) {
                        off_t d = lseek(img->fd, (off_t) host, SEEK_DATA);
                        if (d < 0 || (uint64_t) d > host) {
                                uint64_t hole_end = d < 0 ? UINT64_MAX : (uint64_t) d;
                                ret->host_hole = true;
                                ret->length = MIN(ret->length, hole_end - host);
                        } else {
                                off_t hl = lseek(img->fd, (off_t) host, SEEK_HOLE);
                                if (hl > 0 && (uint64_t) hl > host)
                                        ret->length = MIN(ret->length, (uint64_t) hl - host);
                        }
                }
                break;
        }
        if (s->crypt_method)
                ret->host_offset = -1;
        return 0;
}

/* Decompress the cluster of entry E (guest cluster GIDX) into s->comp_cache,
 * unless it is there already. */
static int decompress_cluster(dc_image *img, uint64_t gidx, uint64_t e) {
        struct qcow2 *s = QC(img);
        uint64_t coff, clen;
        _cleanup_free_ uint8_t *in = NULL;
        int r;

        if (!s->comp_cache) {
                s->comp_cache = malloc(s->cluster_size);
                if (!s->comp_cache)
                        return dc_error(ENOMEM, "out of memory");
        }
        if (s->comp_cache_key == e)
                return 0;
        r = compressed_range(img, gidx, e, &coff, &clen);
        if (r < 0)
                return r;
        in = malloc(clen);
        if (!in)
                return dc_error(ENOMEM, "out of memory");
        r = dc_pread_full(img->fd, in, clen, coff);
        if (r < 0)
                return dc_error(r, "'%s': cannot read compressed data: %s", img->path, strerror(-r));
        s->comp_cache_key = 0;
        r = dc_decompress(s->compression_type, in, clen, s->comp_cache, s->cluster_size);
        if (r < 0)
                return dc_error(r, "'%s': compressed guest cluster %llu (host offset %#llx): %s", img->path,
                                (unsigned long long) gidx, (unsigned long long) coff, dc_get_error());
        s->comp_cache_key = e;
        return 0;
}

/*
 * [off, off+len) as this layer shows it: data, zeros, or (where nothing is
 * allocated here) the backing chain (WITH_BACKING), zeros past its end or
 * without it (the chain read asks this layer for its DATA pieces only).
 */
static int read_layer(dc_image *img, uint8_t *p, uint64_t off, size_t len, bool with_backing) {
        struct qcow2 *s = QC(img);
        uint64_t cs = s->cluster_size;
        int r;

        if (s->crypt_method)
                return dc_error(ENOTSUP, "'%s': reading encrypted images is not supported", img->path);
        while (len > 0) {
                uint64_t host, n, e;
                int type;

                r = status_at(img, off, len, &type, &host, &n, &e);
                if (r < 0)
                        return r;
                if (type == QC_COMPRESSED) {
                        /* one cluster at a time, through the decompressed copy */
                        n = MIN(n, cs - off % cs);
                        r = decompress_cluster(img, off / cs, e);
                        if (r >= 0)
                                memcpy(p, s->comp_cache + off % cs, (size_t) n);
                } else if (type == QC_NORMAL)
                        r = data_pread(img, p, (size_t) n, host);
                else if ((type == QC_UNALLOCATED || type == QC_UNALLOC_ALLOC) && with_backing && img->backing &&
                         off < img->backing->virtual_size) {
                        uint64_t b = MIN(n, img->backing->virtual_size - off);
                        r = dc_chain_read(img->backing, p, off, (size_t) b);
                        memset(p + b, 0, (size_t) (n - b));
                } else
                        memset(p, 0, (size_t) n);
                if (r < 0)
                        return r;
                p += n;
                off += n;
                len -= (size_t) n;
        }
        return 0;
}

static int qcow2_read(dc_image *img, void *buf, uint64_t off, size_t len) {
        return read_layer(img, buf, off, len, false);
}

static int qcow2_host_fd(dc_image *img, const void *buf, size_t len, uint64_t host) {
        struct qcow2 *s = QC(img);

        if (s->crypt_method)
                return -1;
        return s->data_fd >= 0 ? s->data_fd : dc_image_data_fd(img, buf, len, host);
}

/* Without the image lock (dc_driver.read_host): the image file's and the data file's descriptors are fixed. */
static int qcow2_read_host(dc_image *img, void *buf, uint64_t host, size_t len) {
        if (QC(img)->crypt_method)
                return dc_error(ENOTSUP, "'%s': reading encrypted images is not supported", img->path);
        return data_pread(img, buf, len, host);
}

/* The current guest content of [off, off+len), clipped to the virtual size
 * (zeros past it): what a copy-on-write keeps. */
static int read_guest(dc_image *img, uint8_t *dst, uint64_t off, uint64_t len) {
        uint64_t n = off < img->virtual_size ? MIN(len, img->virtual_size - off) : 0;

        memset(dst + n, 0, (size_t) (len - n));
        return n ? read_layer(img, dst, off, (size_t) n, true) : 0;
}

/*
 * read_guest for the copy-on-write of an allocating write, with the image
 * lock released while the data is read (dc_chain_read takes it only to look
 * up where each piece lies).  The clusters being written are registered in
 * s->inflight first, so no writer, zeroer or discarder changes their
 * entries meanwhile; other requests go on, and small random writes into a
 * backing file's data no longer wait for each other's reads of the layers
 * below, one at a time.
 */
static int read_guest_unlocked(dc_image *img, uint8_t *dst, uint64_t off, uint64_t len) {
        uint64_t n = off < img->virtual_size ? MIN(len, img->virtual_size - off) : 0;
        int r;

        memset(dst + n, 0, (size_t) (len - n));
        if (!n)
                return 0;
        pthread_mutex_unlock(&img->lock);
        r = dc_chain_read(img, dst, off, (size_t) n);
        pthread_mutex_lock(&img->lock);
        return r;
}

/* --- writing ------------------------------------------------------------- */

/* Before the first write: clear autoclear bits we do not maintain, and
 * load the enabled persistent bitmaps to record the writes, flagged in use
 * on disk until a clean close stores them (qcow2-bitmap.c). */
static int prepare_for_write(dc_image *img) {
        struct qcow2 *s = QC(img);
        int r;

        if (s->prepared_for_write)
                return 0;
        if (!img->writable)
                return dc_error(EROFS, "'%s': image is open read-only%s%s", img->path,
                                img->read_only_reason ? ": " : "", img->read_only_reason ? img->read_only_reason : "");
        if (s->autoclear & ~QCOW2_AUTOCLEAR_KNOWN) {
                uint8_t w[8];
                s->autoclear &= QCOW2_AUTOCLEAR_KNOWN;
                put_be64(w, s->autoclear);
                r = qcow2_header_write(img, 88, w, 8);
                if (r < 0)
                        return r;
        }
        r = qcow2_bitmaps_start_recording(img);
        if (r < 0)
                return r;
        s->prepared_for_write = true;
        return 0;
}

/*
 * Allocation, guarded.  qcow2-refcount.c puts the refblock of a range it
 * opens at the start of that range, and a larger refcount table at the
 * first cluster the old one does not cover: both assume that whatever the
 * refcount table does not cover is free.  That holds for every image QEMU
 * or we write (the table covers the whole file), not for a hostile one, so
 * open notes whether it holds (alloc_unsafe) and allocation is refused as
 * corruption when it does not, before anything could be overwritten.
 */
static int alloc_clusters(dc_image *img, uint64_t n, uint64_t *ret_first) {
        struct qcow2 *s = QC(img);

        if (s->alloc_unsafe)
                return dc_error(EUCLEAN, "'%s': the refcount table does not cover the whole file (refcount table entry "
                                         "%llu is missing): new refcount blocks could overwrite data", img->path,
                                (unsigned long long) s->alloc_unsafe_entry);
        return qcow2_alloc_clusters(img, n, ret_first);
}

/* Return a writable (COPIED) L2 table for L1 index L1I, allocating it. */
static int l2_for_write(dc_image *img, uint64_t l1i, uint8_t **ret, uint64_t *ret_off) {
        struct qcow2 *s = QC(img);
        uint64_t l1e, old, c;
        uint8_t *t, ent[8];
        int r;

        /* Requests stay inside the virtual size, which the L1 table covers
         * (checked at open and kept so by truncate): this is a last guard. */
        if (l1i >= s->l1_size)
                return dc_error(EUCLEAN, "'%s': L1 index %llu is beyond the L1 table (l1_size %u)", img->path,
                                (unsigned long long) l1i, s->l1_size);
        l1e = s->l1[l1i];
        old = l1e & L1E_OFFSET_MASK;
        if (l1e & L1E_RESERVED_MASK)
                return dc_error(EUCLEAN, "'%s': L1 entry %llu has reserved bits set (%#llx)", img->path,
                                (unsigned long long) l1i, (unsigned long long) l1e);
        if (old && (l1e & QCOW_OFLAG_COPIED)) {
                r = l2_table_get(img, l1i, old, ret);
                if (r >= 0)
                        *ret_off = old;
                return r;
        }
        if (old)
                /* Only internal snapshots share L2 tables, and those images
                 * are opened read-only: a writable one is inconsistent. */
                return dc_error(EUCLEAN, "'%s': L1 entry %llu: the L2 table at %#llx is shared (COPIED flag clear)",
                                img->path, (unsigned long long) l1i, (unsigned long long) old);
        r = alloc_clusters(img, 1, &c);
        if (r < 0)
                return r;
        r = qcow2_overlap_check(img, c * s->cluster_size, s->cluster_size, 0, "a new L2 table");
        if (r < 0)
                return r;
        r = qcow2_cache_get(img, &s->l2_cache, c * s->cluster_size, true, &t);
        if (r < 0)
                return r;
        r = dc_pwrite_full(img->fd, t, s->cluster_size, c * s->cluster_size);
        if (r >= 0)
                r = dc_fdatasync(img->fd);
        if (r < 0)
                return dc_error(r, "'%s': cannot write an L2 table: %s", img->path, strerror(-r));
        put_be64(ent, c * s->cluster_size | QCOW_OFLAG_COPIED);
        r = dc_pwrite_full(img->fd, ent, 8, s->l1_offset + l1i * 8);
        if (r < 0)
                return dc_error(r, "'%s': cannot update the L1 table: %s", img->path, strerror(-r));
        s->l1[l1i] = c * s->cluster_size | QCOW_OFLAG_COPIED;
        *ret = t;
        *ret_off = c * s->cluster_size;
        return 0;
}

/* Free what the L2 entry E of guest cluster GIDX referenced (after the
 * replacing entry is durable). */
static int free_entry(dc_image *img, uint64_t gidx, uint64_t e) {
        struct qcow2 *s = QC(img);
        int type = qcow2_cluster_type(s, e);

        if (!entry_owns_clusters(s, e))
                return 0;
        if (type == QC_COMPRESSED) {
                uint64_t coff, clen;
                int r = compressed_range(img, gidx, e, &coff, &clen);
                if (r < 0)
                        return r;
                return qcow2_free_bytes(img, coff, clen);
        }
        return qcow2_free_clusters(img, (e & L2E_OFFSET_MASK) / s->cluster_size, 1);
}

/* Write entries at once.  Deferred ones among them go first (with their
 * sync), so that no entry reaches the disk before its data. */
static int write_l2_entries(dc_image *img, uint8_t *t, uint64_t l2off, uint64_t first, uint64_t n) {
        struct qcow2 *s = QC(img);
        struct qcow2_cache *c = &s->l2_cache;
        uint64_t lo = first * s->l2e_size, hi = (first + n) * s->l2e_size;
        int r = 0;

        for (size_t i = 0; i < QCOW2_CACHE_SLOTS; i++)
                if (c->offset[i] == l2off && c->dirty_hi[i] > c->dirty_lo[i] && lo < c->dirty_hi[i] &&
                    c->dirty_lo[i] < hi)
                        r = qcow2_l2_commit_pending(img);
        if (r < 0)
                return r;
        r = dc_pwrite_full(img->fd, t + lo, hi - lo, l2off + lo);
        if (r < 0)
                return dc_error(r, "'%s': cannot update an L2 table: %s", img->path, strerror(-r));
        return 0;
}

/* Free the entries OLD[i] (0 = nothing) of guest clusters GIDX+i, once the
 * entries that replaced them are durable. */
static int free_entries(dc_image *img, const uint64_t *old, uint64_t n, uint64_t gidx) {
        bool any = false;
        int r;

        for (uint64_t i = 0; i < n; i++)
                if (old[i])
                        any = true;
        if (!any)
                return 0;
        r = dc_fdatasync(img->fd);
        if (r < 0)
                return dc_error(r, "'%s': flush failed: %s", img->path, strerror(-r));
        for (uint64_t i = 0; i < n; i++)
                if (old[i]) {
                        r = free_entry(img, gidx + i, old[i]);
                        if (r < 0)
                                return r;
                }
        return 0;
}

/*
 * An in-place write of LEN bytes at HOST into the data cluster(s) from guest
 * cluster GIDX on.  In the image file, what the L2 entry says must start
 * inside the file and must not be metadata (QEMU's overlap check), or the write
 * would damage the image; in a data file, host offset is guest offset, so
 * it must stay within the disk.
 */
static int data_write_check(dc_image *img, uint64_t gidx, uint64_t host, uint64_t len) {
        struct qcow2 *s = QC(img);
        uint64_t fsize = 0;
        int r;

        if (s->has_data_file) {
                if (host > ALIGN_UP(img->virtual_size, s->cluster_size) ||
                    len > ALIGN_UP(img->virtual_size, s->cluster_size) - host)
                        return dc_error(EUCLEAN, "'%s': guest cluster %llu: its data at %#llx in the data file lies "
                                                 "beyond the disk", img->path, (unsigned long long) gidx,
                                        (unsigned long long) host);
                return 0;
        }
        r = qcow2_overlap_check(img, host, len, 0, "guest data");
        if (r < 0)
                return r;
        r = qcow2_file_size(img, &fsize);
        if (r < 0)
                return r;
        /* (the end of the last cluster need not be in the file yet: with
         * extended L2 entries only the subclusters written so far are) */
        if (ALIGN_DOWN(host, s->cluster_size) >= fsize)
                return dc_error(EUCLEAN, "'%s': guest cluster %llu: its data cluster at %#llx lies beyond the end of the "
                                         "file (%llu bytes)", img->path, (unsigned long long) gidx,
                                (unsigned long long) host, (unsigned long long) fsize);
        return 0;
}

/* The subcluster bitmap of a cluster after [from, to) of it (bytes,
 * subcluster aligned) was written with data: allocated, not zero. */
static uint64_t bitmap_written(struct qcow2 *s, uint64_t bm, uint64_t from, uint64_t to) {
        unsigned a = (unsigned) (from / s->sc_size), b = (unsigned) DIV_ROUND_UP(to, s->sc_size);
        return (bm | QCOW2_BM_ALLOC(a, b)) & ~QCOW2_BM_ZERO(a, b);
}

#define MAX_RUN_BYTES (16u << 20) /* one sync per run: few syncs for jobs' large writes */

/* Wait (the image lock released meanwhile) until no allocating write of
 * guest clusters [FIRST, FIRST+N) is in flight; N = 0: of any cluster. */
static void inflight_wait(dc_image *img, uint64_t first, uint64_t n) {
        struct qcow2 *s = QC(img);

        for (;;) {
                struct qcow2_inflight *f = s->inflight;
                while (f && n && (f->first >= first + n || first >= f->first + f->n))
                        f = f->next;
                if (!f)
                        return;
                pthread_cond_wait(&s->inflight_done, &img->lock);
        }
}

static void inflight_end(dc_image *img, struct qcow2_inflight *me) {
        struct qcow2 *s = QC(img);

        for (struct qcow2_inflight **p = &s->inflight; *p; p = &(*p)->next)
                if (*p == me) {
                        *p = me->next;
                        break;
                }
        pthread_cond_broadcast(&s->inflight_done);
}

/*
 * Write [off, off+n) in place into clusters allocated here (COPIED, host
 * clusters contiguous from HOST, the host offset of OFF); L2I is the index
 * of OFF's cluster in the L2 table at L2OFF.  With extended L2 entries the
 * subclusters written become allocated: a partly written one that was not
 * is completed from what it showed (zeros, or the backing file), and the
 * bitmaps change in the cache at once (reads see them) but reach the file
 * after the next sync, like the entries of an allocating write: until then
 * the new data is not referenced, so a crash loses the write, not the image.
 */
static int write_in_place(dc_image *img, uint64_t l2off, uint64_t l2i, const uint8_t *p, uint64_t off, uint64_t n,
                          uint64_t host) {
        struct qcow2 *s = QC(img);
        uint64_t cs = s->cluster_size, scs = s->sc_size, gidx = off / cs, wfrom = off, wto = off + n;
        _cleanup_free_ uint8_t *nb = NULL;
        const uint8_t *src = p;
        uint8_t *t;
        int r;

        if (s->extl2) {
                r = qcow2_cache_get(img, &s->l2_cache, l2off, false, &t);
                if (r < 0)
                        return r;
                if (off % scs && qcow2_subcluster_type(s, qcow2_l2_get(s, t, l2i), qcow2_l2_bitmap(s, t, l2i),
                                                       (unsigned) (off % cs / scs)) != QC_NORMAL)
                        wfrom = ALIGN_DOWN(off, scs);
                if ((off + n) % scs) {
                        uint64_t last = off + n - 1, li = l2i + (last / cs - gidx);
                        if (qcow2_subcluster_type(s, qcow2_l2_get(s, t, li), qcow2_l2_bitmap(s, t, li),
                                                  (unsigned) (last % cs / scs)) != QC_NORMAL)
                                wto = ALIGN_UP(off + n, scs);
                }
                if (wfrom != off || wto != off + n) {
                        nb = malloc(wto - wfrom);
                        if (!nb)
                                return dc_error(ENOMEM, "out of memory");
                        r = read_guest(img, nb, wfrom, off - wfrom);
                        if (r >= 0)
                                r = read_guest(img, nb + (off + n - wfrom), off + n, wto - off - n);
                        if (r < 0)
                                return r;
                        memcpy(nb + (off - wfrom), p, n);
                        src = nb;
                }
        }
        host -= off - wfrom;
        r = data_write_check(img, gidx, host, wto - wfrom);
        if (r < 0)
                return r;
        r = data_pwrite(img, src, wto - wfrom, host, false);
        if (r < 0)
                return r;
        if (s->extl2) {
                uint64_t lo = UINT64_MAX, hi = 0;
                r = qcow2_cache_get(img, &s->l2_cache, l2off, false, &t);
                if (r < 0)
                        return r;
                for (uint64_t g = wfrom / cs; g <= (wto - 1) / cs; g++) {
                        uint64_t i = l2i + (g - gidx), e = qcow2_l2_get(s, t, i), bm = qcow2_l2_bitmap(s, t, i);
                        uint64_t nbm = bitmap_written(s, bm, MAX(wfrom, g * cs) - g * cs, MIN(wto, (g + 1) * cs) - g * cs);
                        if (nbm == bm)
                                continue;
                        qcow2_l2_set(s, t, i, e, nbm);
                        lo = MIN(lo, i);
                        hi = MAX(hi, i + 1);
                }
                if (hi) {
                        l2_defer(img, l2off, lo, hi - lo);
                        s->unsynced_bytes += wto - wfrom;
                        if (s->unsynced_bytes >= L2_DEFER_MAX)
                                return qcow2_l2_commit_pending(img);
                }
        }
        return 0;
}

/* Whether an allocating write must copy the whole cluster of entry E (its
 * content cannot be kept subcluster by subcluster). */
static bool cow_whole_cluster(struct qcow2 *s, uint64_t e) {
        int type = qcow2_cluster_type(s, e);
        return !s->extl2 || s->data_raw || type == QC_COMPRESSED || type == QC_NORMAL || type == QC_ZERO_ALLOC;
}

static int qcow2_write(dc_image *img, const void *buf, uint64_t off, size_t len) {
        struct qcow2 *s = QC(img);
        uint64_t cs = s->cluster_size;
        const uint8_t *p = buf;
        int r;

        r = prepare_for_write(img);
        if (r < 0)
                return r;
        dc_bitmaps_record(img, off, len);
        while (len > 0) {
                uint64_t gidx = off / cs, l1i = gidx / s->l2_entries, l2i = gidx % s->l2_entries, l2off, e;
                uint64_t max_run = MIN(MAX(1u, MAX_RUN_BYTES / cs), qcow2_max_run(s)), run = 0, first_host;
                uint8_t *t;
                int type;

                inflight_wait(img, gidx, DIV_ROUND_UP(off % cs + len, cs));
                r = l2_for_write(img, l1i, &t, &l2off);
                if (r < 0)
                        return r;
                e = qcow2_l2_get(s, t, l2i);
                r = l2e_check(img, gidx, e, qcow2_l2_bitmap(s, t, l2i));
                if (r < 0)
                        return r;
                type = qcow2_cluster_type(s, e);
                if (type == QC_NORMAL && (e & QCOW_OFLAG_COPIED)) {
                        /* In place, merging contiguous clusters. */
                        uint64_t host = (e & L2E_OFFSET_MASK) + off % cs, i = l2i;
                        size_t n = (size_t) MIN(len, cs - off % cs);
                        while (n < len && i + 1 < s->l2_entries) {
                                uint64_t e2 = qcow2_l2_get(s, t, i + 1);
                                if (qcow2_cluster_type(s, e2) != QC_NORMAL || !(e2 & QCOW_OFLAG_COPIED) ||
                                    (e2 & L2E_OFFSET_MASK) != (e & L2E_OFFSET_MASK) + cs ||
                                    l2e_check(img, gidx + (i + 1 - l2i), e2, qcow2_l2_bitmap(s, t, i + 1)) < 0)
                                        break;
                                e = e2;
                                i++;
                                n += (size_t) MIN(len - n, cs);
                        }
                        r = write_in_place(img, l2off, l2i, p, off, n, host);
                        if (r < 0)
                                return r;
                        p += n;
                        off += n;
                        len -= n;
                        continue;
                }

                /* Allocating write: gather a run of clusters needing new space. */
                {
                        uint64_t in = off % cs, bytes, wfrom, wto, g = s->sc_size;
                        _cleanup_free_ uint8_t *nb = NULL;
                        _cleanup_free_ uint64_t *old = NULL, *oldbm = NULL;
                        struct qcow2_inflight me;
                        bool replaces = false;

                        while (run < max_run && l2i + run < s->l2_entries && run * cs < in + len) {
                                uint64_t e2 = qcow2_l2_get(s, t, l2i + run);
                                if (run > 0 && qcow2_cluster_type(s, e2) == QC_NORMAL && (e2 & QCOW_OFLAG_COPIED))
                                        break;
                                r = l2e_check(img, gidx + run, e2, qcow2_l2_bitmap(s, t, l2i + run));
                                if (r < 0)
                                        return r;
                                run++;
                        }
                        bytes = MIN(run * cs - in, len);
                        old = calloc(run, sizeof(uint64_t));
                        oldbm = calloc(run, sizeof(uint64_t));
                        if (!old || !oldbm)
                                return dc_error(ENOMEM, "out of memory");
                        for (uint64_t i = 0; i < run; i++) {
                                old[i] = qcow2_l2_get(s, t, l2i + i);
                                oldbm[i] = qcow2_l2_bitmap(s, t, l2i + i);
                        }
                        /*
                         * What is written: whole subclusters (whole clusters
                         * without extended L2 entries, or where the old content
                         * cannot be kept per subcluster, or in a raw data file,
                         * which must hold the whole disk), the parts the request
                         * does not cover copied from what the clusters show.
                         */
                        wfrom = cow_whole_cluster(s, old[0]) ? 0 : ALIGN_DOWN(in, g);
                        wto = cow_whole_cluster(s, old[run - 1]) ? run * cs : ALIGN_UP(in + bytes, g);
                        /*
                         * From here the clusters are in flight: writers,
                         * zeroers and discarders of them wait (inflight_wait)
                         * while the copy-on-write reads and the data write run
                         * without the image lock.
                         */
                        me = (struct qcow2_inflight){ gidx, run, s->inflight };
                        s->inflight = &me;
                        if (wfrom < in || wto > in + bytes) {
                                nb = dc_io_buffer(wto - wfrom);
                                r = nb ? 0 : dc_error(ENOMEM, "out of memory");
                                /*
                                 * Head and tail around less than a cluster of
                                 * new data: one read of it all, as one request
                                 * on the disk.  Two reads of the same cluster
                                 * would each be small, and the kernel takes the
                                 * second for a sequential stream (its head is
                                 * cached right before it) and reads ahead
                                 * megabytes nobody asked for.
                                 */
                                if (r >= 0 && wfrom < in && wto > in + bytes && bytes < cs)
                                        r = read_guest_unlocked(img, nb, gidx * cs + wfrom, wto - wfrom);
                                else {
                                        if (r >= 0)
                                                r = read_guest_unlocked(img, nb, gidx * cs + wfrom, in - wfrom);
                                        if (r >= 0)
                                                r = read_guest_unlocked(img, nb + (in + bytes - wfrom),
                                                                        gidx * cs + in + bytes, wto - in - bytes);
                                }
                                if (r < 0) {
                                        inflight_end(img, &me);
                                        return r;
                                }
                                memcpy(nb + (in - wfrom), p, bytes);
                        }
                        if (s->has_data_file)
                                first_host = gidx; /* host offset = guest offset */
                        else {
                                r = alloc_clusters(img, run, &first_host);
                                if (r < 0) {
                                        inflight_end(img, &me);
                                        return r;
                                }
                                r = qcow2_overlap_check(img, first_host * cs, run * cs, 0, "new data clusters");
                                if (r < 0) {
                                        /* broken refcounts handed out metadata: give it back untouched */
                                        (void) qcow2_free_clusters(img, first_host, run);
                                        inflight_end(img, &me);
                                        return dc_error(EUCLEAN, "%s", dc_get_error());
                                }
                        }
                        /*
                         * The data is written straight from the caller's buffer
                         * when it covers it all, and without the image lock: the
                         * new clusters are nobody else's until their L2 entries
                         * exist, and a writer, zeroer or discarder of the same
                         * guest clusters waits for those entries (inflight_wait),
                         * so that other requests can be prepared and written
                         * meanwhile.
                         */
                        r = data_pwrite(img, nb ? nb : p, wto - wfrom, first_host * cs + wfrom, true);
                        if (r < 0) {
                                inflight_end(img, &me);
                                return r;
                        }
                        /* The L2 table may have been evicted by allocations: get it again. */
                        r = qcow2_cache_get(img, &s->l2_cache, l2off, false, &t);
                        if (r < 0) {
                                inflight_end(img, &me);
                                return r;
                        }
                        for (uint64_t i = 0; i < run; i++) {
                                uint64_t a = MAX(wfrom, i * cs) - i * cs, b = MIN(wto, (i + 1) * cs) - i * cs;
                                qcow2_l2_set(s, t, l2i + i, (first_host + i) * cs | QCOW_OFLAG_COPIED,
                                             bitmap_written(s, oldbm[i], a, b));
                                if (entry_owns_clusters(s, old[i]))
                                        replaces = true;
                                else
                                        old[i] = 0;
                        }
                        inflight_end(img, &me);
                        /* the entries are written after the sync that makes the data durable */
                        l2_defer(img, l2off, l2i, run);
                        s->unsynced_bytes += wto - wfrom;
                        if (replaces || s->unsynced_bytes >= L2_DEFER_MAX)
                                r = qcow2_l2_commit_pending(img);
                        if (r >= 0 && replaces)
                                r = free_entries(img, old, run, gidx);
                        if (r < 0)
                                return r;
                        p += bytes;
                        off += bytes;
                        len -= bytes;
                }
        }
        return 0;
}

/*
 * Whole clusters [gidx, gidx+n): make them read as zeros, or deallocate
 * them (DISCARD), with the entries QEMU writes (zero_in_l2_slice and
 * discard_in_l2_slice): v3 has the ZERO flag, or with extended L2 entries
 * an all-zero bitmap; v2 can only deallocate.  A raw data file is zeroed
 * first, so that it keeps reading as the disk does.
 */
static int zero_clusters(dc_image *img, uint64_t gidx, uint64_t n, unsigned flags, bool discard) {
        struct qcow2 *s = QC(img);

        inflight_wait(img, gidx, n);

        while (n > 0) {
                uint64_t l1i = gidx / s->l2_entries, l2i = gidx % s->l2_entries;
                uint64_t cnt = MIN(n, s->l2_entries - l2i), l2off, changed = 0, lo = UINT64_MAX, hi = 0;
                _cleanup_free_ uint64_t *old = NULL;
                uint8_t *t;
                int r;

                if (l1i >= s->l1_size)
                        return dc_error(EUCLEAN, "'%s': L1 index %llu is beyond the L1 table (l1_size %u)", img->path,
                                        (unsigned long long) l1i, s->l1_size);
                if ((s->l1[l1i] & L1E_OFFSET_MASK) == 0 && (!img->backing_file || (discard && s->version < 3))) {
                        /* No table and nothing below: already reads as zero. */
                        gidx += cnt;
                        n -= cnt;
                        continue;
                }
                r = l2_for_write(img, l1i, &t, &l2off);
                if (r < 0)
                        return r;
                old = calloc(cnt, sizeof(uint64_t));
                if (!old)
                        return dc_error(ENOMEM, "out of memory");
                /* all entries are judged before the cached table changes */
                for (uint64_t i = 0; i < cnt; i++) {
                        r = l2e_check(img, gidx + i, qcow2_l2_get(s, t, l2i + i), qcow2_l2_bitmap(s, t, l2i + i));
                        if (r < 0)
                                return r;
                }
                for (uint64_t i = 0; i < cnt; i++) {
                        uint64_t e = qcow2_l2_get(s, t, l2i + i), bm = qcow2_l2_bitmap(s, t, l2i + i), ne, nbm = 0;
                        int type = qcow2_cluster_type(s, e);
                        bool allocated = type == QC_NORMAL || type == QC_COMPRESSED || type == QC_ZERO_ALLOC;

                        if (s->version < 3)
                                ne = 0;
                        else if (s->extl2 && discard) {
                                ne = img->backing_file || allocated ? 0 : e;
                                nbm = img->backing_file || allocated ? QCOW2_BM_ALL_ZERO : bm;
                        } else if (s->extl2) {
                                bool unmap = type == QC_COMPRESSED || ((flags & DC_ZERO_MAY_UNMAP) && allocated);
                                ne = unmap ? 0 : e;
                                nbm = QCOW2_BM_ALL_ZERO;
                        } else if (!(flags & DC_ZERO_MAY_UNMAP) && !discard &&
                                   (type == QC_NORMAL || type == QC_ZERO_ALLOC) && (e & QCOW_OFLAG_COPIED))
                                ne = (e & L2E_OFFSET_MASK) | QCOW_OFLAG_COPIED | QCOW_OFLAG_ZERO;
                        else if (discard && !img->backing_file && type == QC_UNALLOCATED)
                                ne = 0;
                        else
                                ne = QCOW_OFLAG_ZERO;
                        if (ne == e && nbm == bm)
                                continue;
                        /* the storage goes unless the new entry keeps it */
                        if (entry_owns_clusters(s, e) &&
                            (type == QC_COMPRESSED || (ne & L2E_OFFSET_MASK) != (e & L2E_OFFSET_MASK) ||
                             qcow2_cluster_type(s, ne) == QC_UNALLOCATED))
                                old[i] = e;
                        qcow2_l2_set(s, t, l2i + i, ne, nbm);
                        changed++;
                        lo = MIN(lo, l2i + i);
                        hi = MAX(hi, l2i + i + 1);
                }
                if (changed) {
                        r = data_zero(img, (gidx + lo - l2i) * s->cluster_size, (hi - lo) * s->cluster_size);
                        if (r >= 0)
                                r = write_l2_entries(img, t, l2off, lo, hi - lo);
                        if (r < 0)
                                return r;
                        r = free_entries(img, old, cnt, gidx);
                        if (r < 0)
                                return r;
                }
                gidx += cnt;
                n -= cnt;
        }
        return 0;
}

static int write_zero_bytes(dc_image *img, uint64_t off, uint64_t len) {
        _cleanup_free_ uint8_t *z = calloc(1, (size_t) MIN(len, (uint64_t) MAX_RUN_BYTES));
        if (!z)
                return dc_error(ENOMEM, "out of memory");
        while (len > 0) {
                size_t n = (size_t) MIN(len, (uint64_t) MAX_RUN_BYTES);
                int r = qcow2_write(img, z, off, n);
                if (r < 0)
                        return r;
                off += n;
                len -= n;
        }
        return 0;
}

/*
 * Subclusters [off, off+len) of one cluster (extended L2 entries) read as
 * zeros: their zero bits set and allocation bits cleared, as QEMU's
 * zero_l2_subclusters does.  A compressed cluster has no bitmap to say it:
 * zeros are written instead, as QEMU falls back to.
 */
static int zero_subclusters(dc_image *img, uint64_t off, uint64_t len) {
        struct qcow2 *s = QC(img);
        uint64_t cs = s->cluster_size, gidx = off / cs, l2i = gidx % s->l2_entries, l2off, e, bm, nbm;
        unsigned a = (unsigned) (off % cs / s->sc_size), b = a + (unsigned) (len / s->sc_size);
        uint8_t *t;
        int r;

        inflight_wait(img, gidx, 1);
        r = l2_for_write(img, gidx / s->l2_entries, &t, &l2off);
        if (r < 0)
                return r;
        e = qcow2_l2_get(s, t, l2i);
        bm = qcow2_l2_bitmap(s, t, l2i);
        r = l2e_check(img, gidx, e, bm);
        if (r < 0)
                return r;
        if (qcow2_cluster_type(s, e) == QC_COMPRESSED)
                return write_zero_bytes(img, off, len);
        nbm = (bm | QCOW2_BM_ZERO(a, b)) & ~QCOW2_BM_ALLOC(a, b);
        if (nbm == bm)
                return 0;
        r = data_zero(img, off, len);
        if (r < 0)
                return r;
        qcow2_l2_set(s, t, l2i, e, nbm);
        return write_l2_entries(img, t, l2off, l2i, 1);
}

static int qcow2_write_zeroes(dc_image *img, uint64_t off, uint64_t len, unsigned flags) {
        struct qcow2 *s = QC(img);
        uint64_t g = s->sc_size, cs = s->cluster_size, first, last;
        int r;

        r = prepare_for_write(img);
        if (r < 0)
                return r;
        dc_bitmaps_record(img, off, len);
        /* v2 with a backing file has no way to say "zero": write zeroes. */
        if (s->version < 3 && img->backing_file)
                return write_zero_bytes(img, off, len);
        /* [first, last): what the metadata can say, in subclusters (in
         * clusters without extended L2 entries); the rest is written */
        first = DIV_ROUND_UP(off, g) * g;
        last = (off + len) / g * g;
        if (off + len == img->virtual_size)
                last = ALIGN_UP(img->virtual_size, g);
        if (first >= last)
                return write_zero_bytes(img, off, len);
        if (first > off) {
                r = write_zero_bytes(img, off, first - off);
                if (r < 0)
                        return r;
        }
        while (first < last) {
                uint64_t whole = MIN(last, ALIGN_DOWN(last, cs)) > ALIGN_UP(first, cs)
                                         ? ALIGN_DOWN(last, cs) - ALIGN_UP(first, cs) : 0;
                if (first % cs || !whole) {
                        uint64_t n = MIN(last, ALIGN_DOWN(first, cs) + cs) - first;
                        r = zero_subclusters(img, first, n);
                        first += n;
                } else {
                        r = zero_clusters(img, first / cs, whole / cs, flags, false);
                        first += whole;
                }
                if (r < 0)
                        return r;
        }
        if (off + len > last)
                return write_zero_bytes(img, last, off + len - last);
        return 0;
}

static int qcow2_discard(dc_image *img, uint64_t off, uint64_t len) {
        struct qcow2 *s = QC(img);
        uint64_t cs = s->cluster_size, first = DIV_ROUND_UP(off, cs), last = (off + len) / cs;
        int r;

        r = prepare_for_write(img);
        if (r < 0)
                return r;
        dc_bitmaps_record(img, off, len);
        if (off + len == img->virtual_size)
                last = DIV_ROUND_UP(img->virtual_size, cs);
        if (first >= last)
                return 0; /* discard is a hint: partial clusters are left alone */
        return zero_clusters(img, first, last - first, DC_ZERO_MAY_UNMAP, true);
}

/*
 * Store one cluster whose compressed form (OUT, CLEN bytes) was made by the
 * caller, possibly on another thread; CLEN 0 means "did not compress": the
 * cluster is stored plain.
 */
/*
 * Store the clusters of [OFF, OFF+LEN) (whole clusters; the last may end at
 * the end of the image), compressed where CLEN[i] says OUT[i] fits (0 =
 * store plain).  The compressed ones are allocated and written, then one
 * fdatasync() covers them all, then their L2 entries are written (rule 1
 * of qcow2-refcount.c), then what they replaced is freed; runs of
 * incompressible clusters go through the plain write path.  One sync per
 * batch instead of one per cluster.
 */
int dc_qcow2_store_compressed_batch(dc_image *img, const uint8_t *raw, uint64_t off, uint64_t len,
                                    uint8_t *const *out, const size_t *clen) {
        struct qcow2 *s = QC(img);
        uint64_t cs = s->cluster_size, n = DIV_ROUND_UP(len, cs), gidx0 = off / cs;
        unsigned shift = 62 - (s->cluster_bits - 8);
        _cleanup_free_ uint64_t *ne = NULL;
        bool any = false;
        int r;

        if (off % cs || (len % cs && off + len != img->virtual_size))
                return dc_error(EINVAL, "'%s': compressed writes must cover whole clusters", img->path);
        inflight_wait(img, gidx0, n);
        r = prepare_for_write(img);
        if (r < 0)
                return r;
        dc_bitmaps_record(img, off, len);
        ne = calloc(n, sizeof *ne);
        if (!ne)
                return dc_error(ENOMEM, "out of memory");
        for (uint64_t i = 0; i < n; i++) {
                uint64_t coff, start, field, l2off;
                uint8_t *t;

                /* (a data file holds no compressed clusters: all go plain) */
                if (clen[i] == 0 || clen[i] >= cs - 1 || s->has_data_file)
                        continue;
                /* the L2 table first (it is synced before L1 points to it) */
                r = l2_for_write(img, (gidx0 + i) / s->l2_entries, &t, &l2off);
                if (r < 0)
                        return r;
                if (s->comp_free_off && s->comp_free_off % cs + clen[i] <= cs) {
                        uint64_t v;
                        r = qcow2_refcount_get(img, s->comp_free_off / cs, &v);
                        if (r < 0)
                                return r;
                        if (s->refcount_bits < 64 && v >= (1ull << s->refcount_bits) - 1)
                                s->comp_free_off = 0;
                }
                if (s->comp_free_off && s->comp_free_off % cs + clen[i] <= cs) {
                        coff = s->comp_free_off;
                        r = qcow2_ref_bytes(img, coff, clen[i]);
                } else {
                        r = alloc_clusters(img, 1, &start);
                        coff = start * cs;
                }
                if (r < 0)
                        return r;
                s->comp_free_off = (coff + clen[i]) % cs ? coff + clen[i] : 0;
                if (coff + clen[i] > (1ull << shift))
                        return dc_error(EFBIG, "'%s': compressed data cannot be stored beyond host offset 2^%u with "
                                               "%u-byte clusters", img->path, shift, s->cluster_size);
                r = qcow2_overlap_check(img, coff, clen[i], 0, "compressed data");
                if (r < 0)
                        return r;
                r = dc_pwrite_full(img->fd, out[i], clen[i], coff);
                if (r < 0)
                        return dc_error(r, "'%s': write error: %s", img->path, strerror(-r));
                field = ((coff + clen[i] - 1) >> 9) - (coff >> 9);
                ne[i] = QCOW_OFLAG_COMPRESSED | (field << shift) | coff;
                any = true;
        }
        if (any) {
                r = dc_fdatasync(img->fd);
                if (r < 0)
                        return dc_error(r, "'%s': flush failed: %s", img->path, strerror(-r));
        }
        /* the references, a run per L2 table */
        for (uint64_t i = 0; i < n;) {
                uint64_t l1i = (gidx0 + i) / s->l2_entries, l2i = (gidx0 + i) % s->l2_entries, k = 0, l2off;
                uint64_t old[64];
                uint8_t *t;

                if (!ne[i]) {
                        i++;
                        continue;
                }
                while (i + k < n && ne[i + k] && l2i + k < s->l2_entries && k < 64)
                        k++;
                r = l2_for_write(img, l1i, &t, &l2off);
                if (r < 0)
                        return r;
                for (uint64_t j = 0; j < k; j++) {
                        r = l2e_check(img, gidx0 + i + j, qcow2_l2_get(s, t, l2i + j), qcow2_l2_bitmap(s, t, l2i + j));
                        if (r < 0)
                                return r;
                }
                for (uint64_t j = 0; j < k; j++) {
                        old[j] = qcow2_l2_get(s, t, l2i + j);
                        if (!entry_owns_clusters(s, old[j]))
                                old[j] = 0;
                        /* (a compressed cluster has an empty subcluster bitmap) */
                        qcow2_l2_set(s, t, l2i + j, ne[i + j], 0);
                }
                r = write_l2_entries(img, t, l2off, l2i, k);
                if (r >= 0)
                        r = free_entries(img, old, k, gidx0 + i);
                if (r < 0)
                        return r;
                i += k;
        }
        /* incompressible clusters, stored plain in runs */
        for (uint64_t i = 0; i < n;) {
                uint64_t k = 0;
                if (ne[i]) {
                        i++;
                        continue;
                }
                while (i + k < n && !ne[i + k])
                        k++;
                r = qcow2_write(img, raw + i * cs, off + i * cs, (size_t) (MIN((i + k) * cs, len) - i * cs));
                if (r < 0)
                        return r;
                i += k;
        }
        return 0;
}

/* One cluster (a qcow2 write_compressed): the batch of one. */
int dc_qcow2_store_compressed(dc_image *img, const void *raw, uint64_t off, size_t len, const void *out,
                              size_t clen) {
        uint8_t *o = (uint8_t *) out;
        if (off % QC(img)->cluster_size || len > QC(img)->cluster_size ||
            (len != QC(img)->cluster_size && off + len != img->virtual_size))
                return dc_error(EINVAL, "'%s': compressed writes must cover whole clusters", img->path);
        return dc_qcow2_store_compressed_batch(img, raw, off, len, &o, &clen);
}

/* Compress one cluster into OUT (capacity cs - 1); 0 = does not fit. */
int dc_qcow2_compress_cluster(dc_image *img, const void *buf, size_t len, void *out, size_t *ret_clen) {
        struct qcow2 *s = QC(img);
        _cleanup_free_ uint8_t *in = calloc(1, s->cluster_size);
        int r;

        if (!in)
                return dc_error(ENOMEM, "out of memory");
        *ret_clen = 0;
        if (s->has_data_file)
                return 0; /* stored plain: a data file holds no compressed clusters */
        memcpy(in, buf, len);
        r = dc_compress(s->compression_type, in, s->cluster_size, out, s->cluster_size - 1, ret_clen);
        if (r == 0)
                *ret_clen = 0;
        return r < 0 ? r : 0;
}

static int qcow2_write_compressed(dc_image *img, const void *buf, uint64_t off, size_t len) {
        _cleanup_free_ uint8_t *out = malloc(QC(img)->cluster_size);
        size_t clen = 0;
        int r;

        if (QC(img)->has_data_file)
                return dc_error(ENOTSUP, "'%s': an image with an external data file cannot hold compressed clusters",
                                img->path);
        if (!out)
                return dc_error(ENOMEM, "out of memory");
        r = dc_qcow2_compress_cluster(img, buf, len, out, &clen);
        if (r < 0)
                return r;
        return dc_qcow2_store_compressed(img, buf, off, len, out, clen);
}

static int qcow2_flush(dc_image *img) {
        int r = qcow2_l2_commit_pending(img);
        if (r < 0)
                return r;
        r = data_sync(img);
        if (r >= 0)
                r = dc_fdatasync(img->fd);
        if (r < 0)
                return dc_error(r, "'%s': flush failed: %s", img->path, strerror(-r));
        return 0;
}

/*
 * Room for a new L1 table of N clusters when that is more than
 * qcow2_alloc_clusters() can give in one run (each refcount range it opens
 * starts with its own refblock, so its runs stay inside one range): the L1
 * table of a large image with small clusters.  QEMU can grow such an image
 * (its refblocks may live outside the ranges they cover), and so must we.
 *
 * The run goes past everything in use, at the start of a range that no
 * refblock covers yet.  The refblocks for the ranges it spans go right in
 * front of it, counting themselves and the run; when the refcount table has
 * no entries for those ranges, a larger copy of the table goes between them
 * and the run, and the header is switched to it (then the old table is
 * freed).  Everything new is written and synced before anything points to
 * it, so a crash leaves at worst leaked clusters.
 */
static int alloc_l1_run(dc_image *img, uint64_t n, uint64_t *ret_first) {
        struct qcow2 *s = QC(img);
        uint64_t cs = s->cluster_size, pb = s->per_block, t0 = 0, nrb = 0, ntc = 0, new_entries = 0, fsize, base;
        uint64_t old_off = s->rt_offset, old_clusters = s->rt_clusters;
        _cleanup_free_ uint8_t *rb = NULL, *tbl = NULL;
        _cleanup_free_ uint64_t *new_rt = NULL;
        int r;

        if (n <= qcow2_max_run(s))
                return alloc_clusters(img, n, ret_first);
        r = qcow2_file_size(img, &fsize);
        if (r < 0)
                return r;
        for (uint64_t i = 0; i < s->rt_entries; i++)
                if (s->rt[i] & REFT_OFFSET_MASK)
                        t0 = i + 1;
        t0 = MAX(t0, DIV_ROUND_UP(qcow2_size_to_clusters(s->cluster_bits, fsize), pb));
        base = t0 * pb;
        /* nrb refblocks, ntc clusters of a new refcount table (if it must
         * grow), then the run: grow the counts until they cover themselves */
        for (;;) {
                uint64_t ranges = DIV_ROUND_UP(nrb + ntc + n, pb), tc = 0;
                if (t0 + ranges > s->rt_entries) {
                        new_entries = MAX(t0 + ranges, s->rt_entries * 2);
                        tc = DIV_ROUND_UP(new_entries, cs / 8);
                        new_entries = tc * (cs / 8);
                }
                if (ranges == nrb && tc == ntc)
                        break;
                nrb = ranges;
                ntc = tc;
        }
        if (ntc * cs > QCOW2_MAX_REFTABLE_BYTES)
                return dc_error(EFBIG, "'%s': the refcount table would exceed QEMU's limit of %u MiB", img->path,
                                QCOW2_MAX_REFTABLE_BYTES >> 20);
        if ((base + nrb + ntc + n) > (QCOW2_MAX_HOST_OFFSET >> s->cluster_bits))
                return dc_error(EFBIG, "'%s': the image would exceed the largest host offset", img->path);

        rb = calloc(1, cs);
        if (!rb)
                return dc_error(ENOMEM, "out of memory");
        for (uint64_t j = 0; j < nrb; j++) {
                uint64_t first = (t0 + j) * pb, end = base + nrb + ntc + n;
                memset(rb, 0, cs);
                for (uint64_t c = MAX(first, base); c < MIN(first + pb, end); c++)
                        qcow2_rb_set_one(rb, s->refcount_bits, c - first);
                qcow2_cache_drop(&s->rb_cache, (base + j) * cs);
                qcow2_cache_drop(&s->l2_cache, (base + j) * cs);
                r = dc_pwrite_full(img->fd, rb, cs, (base + j) * cs);
                if (r < 0)
                        return dc_error(r, "'%s': cannot write a refcount block: %s", img->path, strerror(-r));
        }
        if (ntc) {
                new_rt = calloc(new_entries, sizeof(uint64_t));
                tbl = calloc(ntc, cs);
                if (!new_rt || !tbl)
                        return dc_error(ENOMEM, "out of memory");
                memcpy(new_rt, s->rt, s->rt_entries * sizeof(uint64_t));
                for (uint64_t j = 0; j < nrb; j++)
                        new_rt[t0 + j] = (base + j) * cs;
                for (uint64_t i = 0; i < new_entries; i++)
                        put_be64(tbl + i * 8, new_rt[i]);
                r = dc_pwrite_full(img->fd, tbl, ntc * cs, (base + nrb) * cs);
                if (r < 0)
                        return dc_error(r, "'%s': cannot write the refcount table: %s", img->path, strerror(-r));
        }
        r = dc_fdatasync(img->fd);
        if (r < 0)
                return dc_error(r, "'%s': flush failed: %s", img->path, strerror(-r));
        if (ntc) {
                uint8_t hdr[12];
                put_be64(hdr, (base + nrb) * cs);
                put_be32(hdr + 8, (uint32_t) ntc);
                r = qcow2_header_write(img, 48, hdr, sizeof hdr);
                if (r < 0)
                        return r;
                free(s->rt);
                s->rt = TAKE_PTR(new_rt);
                s->rt_entries = new_entries;
                s->rt_offset = (base + nrb) * cs;
                s->rt_clusters = (uint32_t) ntc;
                r = qcow2_free_clusters(img, old_off / cs, old_clusters);
                if (r < 0)
                        return r;
        } else {
                tbl = calloc(nrb, 8);
                if (!tbl)
                        return dc_error(ENOMEM, "out of memory");
                for (uint64_t j = 0; j < nrb; j++)
                        put_be64(tbl + j * 8, (base + j) * cs);
                r = dc_pwrite_full(img->fd, tbl, nrb * 8, s->rt_offset + t0 * 8);
                if (r >= 0)
                        r = dc_fdatasync(img->fd);
                if (r < 0)
                        return dc_error(r, "'%s': cannot update the refcount table: %s", img->path, strerror(-r));
                for (uint64_t j = 0; j < nrb; j++)
                        s->rt[t0 + j] = (base + j) * cs;
        }
        *ret_first = base + nrb + ntc;
        return 0;
}

/*
 * Grow the virtual size.  The limits are QEMU's, so that we accept exactly
 * the sizes `qemu-img resize` accepts: a multiple of 512, at most what a
 * 32 MiB L1 table maps (EFBIG beyond, as QEMU's qcow2_grow_l1_table).
 */
static int qcow2_truncate(dc_image *img, uint64_t size) {
        struct qcow2 *s = QC(img);
        uint64_t cs = s->cluster_size, need, have_clusters, max = qcow2_max_virtual_size(s->cluster_bits, s->l2_entries);
        uint8_t hdr[24];
        int r;

        if (size < img->virtual_size)
                return dc_error(ENOTSUP, "'%s': shrinking is not supported", img->path);
        if (size % 512)
                return dc_error(EINVAL, "'%s': size %llu is not a multiple of 512", img->path,
                                (unsigned long long) size);
        if (size > max)
                return dc_error(EFBIG, "'%s': size %llu is beyond QEMU's limit of %llu bytes for %u-byte clusters (an "
                                       "L1 table of at most 32 MiB)", img->path, (unsigned long long) size,
                                (unsigned long long) max, s->cluster_size);
        need = qcow2_size_to_l1(s->cluster_bits, s->l2_entries, size);
        have_clusters = DIV_ROUND_UP((uint64_t) s->l1_size * 8, cs);
        inflight_wait(img, 0, 0);
        r = dc_bitmaps_resize(img, size);
        if (r < 0)
                return r;
        r = prepare_for_write(img);
        if (r < 0)
                return r;
        if (need > s->l1_size) {
                uint64_t ncl = DIV_ROUND_UP(need * 8, cs), new_off = s->l1_offset, first;
                _cleanup_free_ uint64_t *nl1 = calloc(need, sizeof(uint64_t));
                _cleanup_free_ uint8_t *raw = calloc(ncl, cs);

                if (!nl1 || !raw)
                        return dc_error(ENOMEM, "out of memory");
                memcpy(nl1, s->l1, (size_t) s->l1_size * 8);
                for (uint64_t i = 0; i < need; i++)
                        put_be64(raw + i * 8, nl1[i]);
                if (ncl > have_clusters || s->l1_size == 0) {
                        r = alloc_l1_run(img, ncl, &first);
                        if (r < 0)
                                return r;
                        new_off = first * cs;
                        r = qcow2_overlap_check(img, new_off, ncl * cs, 0, "a new L1 table");
                        if (r < 0)
                                return r;
                }
                r = dc_pwrite_full(img->fd, raw, ncl * cs, new_off);
                if (r >= 0)
                        r = dc_fdatasync(img->fd);
                if (r < 0)
                        return dc_error(r, "'%s': cannot write the L1 table: %s", img->path, strerror(-r));
                put_be64(hdr, size);
                put_be32(hdr + 8, s->crypt_method);
                put_be32(hdr + 12, (uint32_t) need);
                put_be64(hdr + 16, new_off);
                r = qcow2_header_write(img, 24, hdr, 24);
                if (r < 0)
                        return r;
                free(s->l1);
                s->l1 = TAKE_PTR(nl1);
                if (new_off != s->l1_offset && s->l1_size) {
                        uint64_t old_off = s->l1_offset;
                        s->l1_offset = new_off;
                        s->l1_size = (uint32_t) need;
                        r = qcow2_free_clusters(img, old_off / cs, have_clusters);
                        if (r < 0)
                                return r;
                }
                s->l1_offset = new_off;
                s->l1_size = (uint32_t) need;
        } else {
                put_be64(hdr, size);
                r = qcow2_header_write(img, 24, hdr, 8);
                if (r < 0)
                        return r;
        }
        /* the data file grows with the disk, as QEMU resizes it */
        if (s->data_fd >= 0) {
                struct stat st;
                if (fstat(s->data_fd, &st) < 0 ||
                    ((uint64_t) st.st_size < size && ftruncate(s->data_fd, (off_t) size) < 0))
                        return dc_error(errno, "'%s': cannot resize its data file: %m", img->path);
        }
        img->virtual_size = size;
        return 0;
}

const struct dc_driver dc_qcow2_driver = {
        .name = "qcow2",
        .format = DC_FORMAT_QCOW2,
        .open = qcow2_open,
        .close = qcow2_close,
        .block_status = qcow2_block_status,
        .read = qcow2_read,
        .read_host = qcow2_read_host,
        .host_fd = qcow2_host_fd,
        .write = qcow2_write,
        .write_zeroes = qcow2_write_zeroes,
        .write_compressed = qcow2_write_compressed,
        .discard = qcow2_discard,
        .flush = qcow2_flush,
        .truncate = qcow2_truncate,
        .check = qcow2_check,
};

/* Allocate every guest cluster (preallocation=metadata/falloc/full). */
int dc_qcow2_preallocate(dc_image *img, int mode) {
        struct qcow2 *s = QC(img);
        uint64_t cs = s->cluster_size, n = DIV_ROUND_UP(img->virtual_size, cs);
        _cleanup_free_ uint8_t *zeros = NULL;
        int r;

        r = prepare_for_write(img);
        if (r < 0)
                return r;
        if (mode == DC_PREALLOC_FULL) {
                zeros = calloc(1, MAX_RUN_BYTES);
                if (!zeros)
                        return dc_error(ENOMEM, "out of memory");
        }
        for (uint64_t g = 0; g < n;) {
                uint64_t l2i = g % s->l2_entries, cnt = MIN(MIN(s->l2_entries - l2i, n - g), qcow2_max_run(s)), l2off, first;
                uint8_t *t;

                r = l2_for_write(img, g / s->l2_entries, &t, &l2off);
                if (r < 0)
                        return r;
                r = alloc_clusters(img, cnt, &first);
                if (r < 0)
                        return r;
                if (mode == DC_PREALLOC_FULL) {
                        for (uint64_t o = 0; o < cnt * cs && r >= 0; o += MAX_RUN_BYTES)
                                r = dc_pwrite_full(img->fd, zeros, (size_t) MIN((uint64_t) MAX_RUN_BYTES, cnt * cs - o),
                                                   first * cs + o);
                } else if (mode == DC_PREALLOC_FALLOC) {
                        if (fallocate(img->fd, 0, (off_t) (first * cs), (off_t) (cnt * cs)) < 0)
                                r = -errno;
                } else {
                        struct stat st;
                        if (fstat(img->fd, &st) < 0)
                                r = -errno;
                        else if ((uint64_t) st.st_size < (first + cnt) * cs &&
                                 ftruncate(img->fd, (off_t) ((first + cnt) * cs)) < 0)
                                r = -errno;
                }
                if (r >= 0)
                        r = dc_fdatasync(img->fd);
                if (r < 0)
                        return dc_error(r, "'%s': preallocation failed: %s", img->path, strerror(-r));
                r = qcow2_cache_get(img, &s->l2_cache, l2off, false, &t);
                if (r < 0)
                        return r;
                for (uint64_t i = 0; i < cnt; i++)
                        qcow2_l2_set(s, t, l2i + i, (first + i) * cs | QCOW_OFLAG_COPIED, QCOW2_BM_ALL_ALLOC);
                r = write_l2_entries(img, t, l2off, l2i, cnt);
                if (r < 0)
                        return r;
                g += cnt;
        }
        return dc_fdatasync(img->fd);
}

/* --- properties of a qcow2 layer (neutral values for raw) ----------------- */

static struct qcow2 *qcow2_of(dc_image *img) {
        return img->drv == &dc_qcow2_driver ? QC(img) : NULL;
}

DC_EXPORT uint32_t dc_image_cluster_size(dc_image *img) {
        struct qcow2 *s = qcow2_of(img);
        return s ? s->cluster_size : 0;
}
DC_EXPORT const char *dc_image_compat(dc_image *img) {
        struct qcow2 *s = qcow2_of(img);
        return !s ? "" : s->version == 2 ? "0.10" : "1.1";
}
DC_EXPORT const char *dc_image_compression_type(dc_image *img) {
        struct qcow2 *s = qcow2_of(img);
        return !s ? "" : s->compression_type ? "zstd" : "zlib";
}
DC_EXPORT bool dc_image_dirty(dc_image *img) {
        struct qcow2 *s = qcow2_of(img);
        return s && (s->incompat & QCOW2_INCOMPAT_DIRTY);
}
DC_EXPORT bool dc_image_corrupt(dc_image *img) {
        struct qcow2 *s = qcow2_of(img);
        return s && (s->incompat & QCOW2_INCOMPAT_CORRUPT);
}
DC_EXPORT bool dc_image_encrypted(dc_image *img) {
        struct qcow2 *s = qcow2_of(img);
        return s && s->crypt_method != 0;
}
DC_EXPORT unsigned dc_image_refcount_bits(dc_image *img) {
        struct qcow2 *s = qcow2_of(img);
        return s ? s->refcount_bits : 0;
}
DC_EXPORT bool dc_image_lazy_refcounts(dc_image *img) {
        struct qcow2 *s = qcow2_of(img);
        return s && (s->compat & QCOW2_COMPAT_LAZY_REFCOUNTS);
}
DC_EXPORT const char *dc_image_data_file(dc_image *img) {
        struct qcow2 *s = qcow2_of(img);
        return s && s->data_file ? s->data_file : "";
}
DC_EXPORT const char *dc_image_data_file_path(dc_image *img) {
        struct qcow2 *s = qcow2_of(img);
        return s && s->data_file_abs ? s->data_file_abs : "";
}

/* A rebuild of cluster 0: what changes. */
struct header_edit {
        bool backing;             /* the backing name and format become these */
        const char *backing_file, *backing_fmt;
        bool bitmaps;             /* the bitmaps extension becomes BITMAPS_EXT (24 bytes), or goes when NULL */
        const uint8_t *bitmaps_ext;
};

/*
 * Cluster 0 rebuilt from the header as it is on disk: every extension is
 * kept in order except those being replaced; the new bitmaps extension
 * comes first (so that later updates of its 24 bytes stay inside sector 0),
 * a new backing format next; the backing name follows the end marker.  The
 * new cluster 0 is written in one write and synced.
 */
static int header_rebuild(dc_image *img, const struct header_edit *e) {
        struct qcow2 *s = QC(img);
        uint64_t cs = s->cluster_size, end, p, q, blen, autoclear = s->autoclear;
        _cleanup_free_ uint8_t *old = malloc(cs), *h = calloc(1, cs);
        const char *bname;
        int r;

        if (!old || !h)
                return dc_error(ENOMEM, "out of memory");
        r = dc_pread_full(img->fd, old, cs, 0);
        if (r < 0)
                return dc_error(r, "'%s': cannot read the header: %s", img->path, strerror(-r));
        end = be64(old + 8) ? MIN(be64(old + 8), cs) : cs;
        if (e->backing) {
                bname = e->backing_file;
                blen = bname ? strlen(bname) : 0;
        } else {
                /* the name as it is, bounded as the open bounded it */
                bname = be64(old + 8) ? (const char *) old + end : NULL;
                blen = bname ? MIN((uint64_t) be32(old + 16), cs - end) : 0;
        }
        if (blen > QCOW2_MAX_BACKING_NAME)
                return dc_error(EINVAL, "'%s': backing file name is longer than %u bytes", img->path,
                                QCOW2_MAX_BACKING_NAME);
        memcpy(h, old, s->header_length);
        p = q = s->header_length;
        if (e->bitmaps && e->bitmaps_ext) {
                put_be32(h + q, QCOW2_EXT_BITMAPS);
                put_be32(h + q + 4, 24);
                memcpy(h + q + 8, e->bitmaps_ext, 24);
                q += 32;
                autoclear |= QCOW2_AUTOCLEAR_BITMAPS;
        } else if (e->bitmaps)
                autoclear &= ~QCOW2_AUTOCLEAR_BITMAPS;
        if (e->backing && bname && e->backing_fmt) {
                put_be32(h + q, QCOW2_EXT_BACKING_FORMAT);
                put_be32(h + q + 4, (uint32_t) strlen(e->backing_fmt));
                memcpy(h + q + 8, e->backing_fmt, strlen(e->backing_fmt));
                q += 8 + ALIGN_UP(strlen(e->backing_fmt), 8);
        }
        while (p + 8 <= end) {
                uint32_t type = be32(old + p), len = be32(old + p + 4);
                uint64_t sz = 8 + ALIGN_UP((uint64_t) len, 8);
                if (type == QCOW2_EXT_END || sz > end - p)
                        break;
                if (!(e->backing && type == QCOW2_EXT_BACKING_FORMAT) && !(e->bitmaps && type == QCOW2_EXT_BITMAPS)) {
                        if (q + sz + 8 + blen > cs)
                                return dc_error(ENOSPC, "'%s': no room in the header cluster for its extensions and "
                                                        "the backing name", img->path);
                        memcpy(h + q, old + p, sz);
                        q += sz;
                }
                p += sz;
        }
        q += 8; /* end marker (zeroes) */
        if (q + blen > cs)
                return dc_error(ENOSPC, "'%s': no room for the backing name in the header", img->path);
        put_be64(h + 8, bname ? q : 0);
        put_be32(h + 16, (uint32_t) blen);
        if (bname)
                memmove(h + q, bname, blen);
        put_be64(h + 88, autoclear);
        /* cover the old backing name too, so no stale bytes stay behind */
        p = be64(old + 8) ? end + MIN((uint64_t) be32(old + 16), cs - end) : p + 8;
        r = dc_pwrite_full(img->fd, h, MIN(cs, ALIGN_UP(MAX(q + blen, p), 512)), 0);
        if (r >= 0)
                r = dc_fdatasync(img->fd);
        if (r < 0)
                return dc_error(r, "'%s': cannot rewrite the header: %s", img->path, strerror(-r));
        s->autoclear = autoclear;
        return 0;
}

/*
 * Change the backing file recorded in the header (what stream and commit do
 * when they finish).  Both the old and the new backing give the same guest
 * data at that moment (the job copied what differs), so either version
 * surviving a crash is correct.
 */
int dc_qcow2_set_backing(dc_image *img, const char *backing, const char *fmt) {
        int r;

        if (backing && strlen(backing) > QCOW2_MAX_BACKING_NAME)
                return dc_error(EINVAL, "'%s': backing file name is longer than %u bytes", img->path,
                                QCOW2_MAX_BACKING_NAME);
        r = prepare_for_write(img);
        if (r >= 0)
                r = header_rebuild(img, &(struct header_edit){ .backing = true, .backing_file = backing,
                                                               .backing_fmt = fmt });
        if (r < 0)
                return r;
        free(img->backing_file);
        free(img->backing_format);
        img->backing_file = backing ? strdup(backing) : NULL;
        img->backing_format = backing && fmt ? strdup(fmt) : NULL;
        return 0;
}

/* Where the bitmaps extension's 24 bytes are in cluster 0 (0: none). */
static int find_bitmaps_ext(dc_image *img, uint64_t *ret) {
        struct qcow2 *s = QC(img);
        uint64_t cs = s->cluster_size, end, p = s->header_length;
        _cleanup_free_ uint8_t *h = malloc(cs);
        int r;

        if (!h)
                return dc_error(ENOMEM, "out of memory");
        r = dc_pread_full(img->fd, h, cs, 0);
        if (r < 0)
                return dc_error(r, "'%s': cannot read the header: %s", img->path, strerror(-r));
        end = be64(h + 8) ? MIN(be64(h + 8), cs) : cs;
        *ret = 0;
        while (p + 8 <= end) {
                uint32_t type = be32(h + p), len = be32(h + p + 4);
                if (type == QCOW2_EXT_END || 8 + ALIGN_UP((uint64_t) len, 8) > end - p)
                        break;
                if (type == QCOW2_EXT_BITMAPS && len == 24) {
                        *ret = p + 8;
                        break;
                }
                p += 8 + ALIGN_UP((uint64_t) len, 8);
        }
        return 0;
}

/*
 * The header points at a new bitmap directory.  When the extension is in
 * force and its 24 bytes lie inside one sector, they are rewritten in
 * place: a write inside a sector is atomic, so a crash leaves the old
 * directory or the new one.  Otherwise (the first bitmap, the last one
 * gone, or an extension across a sector boundary) cluster 0 is rebuilt
 * in one write, the extension first.
 */
int qcow2_header_set_bitmaps(dc_image *img, uint32_t nb, uint64_t dir_size, uint64_t dir_offset) {
        struct qcow2 *s = QC(img);
        uint8_t ext[24] = { 0 };
        uint64_t at = 0;
        int r;

        put_be32(ext, nb);
        put_be64(ext + 8, dir_size);
        put_be64(ext + 16, dir_offset);
        if (nb && s->has_bitmaps && (s->autoclear & QCOW2_AUTOCLEAR_BITMAPS)) {
                r = find_bitmaps_ext(img, &at);
                if (r < 0)
                        return r;
        }
        if (at && at / 512 == (at + 23) / 512)
                r = qcow2_header_write(img, at, ext, sizeof ext);
        else
                r = header_rebuild(img, &(struct header_edit){ .bitmaps = true, .bitmaps_ext = nb ? ext : NULL });
        if (r < 0)
                return r;
        s->has_bitmaps = nb > 0;
        s->nb_bitmaps = nb;
        s->bitmap_dir_size = nb ? dir_size : 0;
        s->bitmap_dir_offset = nb ? dir_offset : 0;
        return 0;
}
