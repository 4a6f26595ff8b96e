/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* Shared between the qcow2 driver files (qcow2.c, qcow2-refcount.c, qcow2-check.c, qcow2-create.c). */

#include "dc-internal.h"

#define QCOW2_MAGIC 0x514649fbu

#define QCOW2_INCOMPAT_DIRTY (1ull << 0)
#define QCOW2_INCOMPAT_CORRUPT (1ull << 1)
#define QCOW2_INCOMPAT_DATA_FILE (1ull << 2)
#define QCOW2_INCOMPAT_COMPRESSION (1ull << 3)
#define QCOW2_INCOMPAT_EXTL2 (1ull << 4)
#define QCOW2_INCOMPAT_KNOWN 0x1full
#define QCOW2_COMPAT_LAZY_REFCOUNTS (1ull << 0)
#define QCOW2_AUTOCLEAR_BITMAPS (1ull << 0)
#define QCOW2_AUTOCLEAR_DATA_FILE_RAW (1ull << 1)
#define QCOW2_AUTOCLEAR_KNOWN 0x3ull

#define QCOW2_EXT_END 0x00000000u
#define QCOW2_EXT_BACKING_FORMAT 0xe2792acau
#define QCOW2_EXT_FEATURE_TABLE 0x6803f857u
#define QCOW2_EXT_BITMAPS 0x23852875u
#define QCOW2_EXT_FDE 0x0537be77u
#define QCOW2_EXT_DATA_FILE 0x44415441u

#define L1E_OFFSET_MASK 0x00fffffffffffe00ull
#define L1E_RESERVED_MASK 0x7f000000000001ffull
#define L2E_OFFSET_MASK 0x00fffffffffffe00ull
#define L2E_RESERVED_MASK 0x3f000000000001feull
#define REFT_OFFSET_MASK 0xfffffffffffffe00ull
#define REFT_RESERVED_MASK 0x1ffull
#define QCOW_OFLAG_COPIED (1ull << 63)
#define QCOW_OFLAG_COMPRESSED (1ull << 62)
#define QCOW_OFLAG_ZERO (1ull << 0)

/* QEMU's limits (block/qcow2.h, block/qcow2-bitmap.c): images beyond them
 * are refused with EFBIG, as QEMU refuses them. */
#define QCOW2_MAX_L1_BYTES (32u << 20)
#define QCOW2_MAX_L1_ENTRIES (QCOW2_MAX_L1_BYTES / 8)
#define QCOW2_MAX_REFTABLE_BYTES (8u << 20)
#define QCOW2_MAX_SNAPSHOTS 65536u
#define QCOW2_MAX_SNAPSHOT_EXTRA 1024u
#define QCOW2_MAX_SNAPSHOTS_BYTES (1024ull * QCOW2_MAX_SNAPSHOTS)
#define QCOW2_MAX_BITMAPS 65535u
#define QCOW2_MAX_BITMAP_DIR_BYTES (1024ull * QCOW2_MAX_BITMAPS)
#define QCOW2_MAX_BITMAP_TABLE 0x8000000u  /* entries */
#define QCOW2_MAX_BITMAP_BYTES 0x20000000u /* table entries times cluster size */
#define QCOW2_MAX_BITMAP_NAME 1023u
#define QCOW2_MAX_BACKING_NAME 1023u
/* Offsets in tables have bits 9..55: nothing can live at or above this. */
#define QCOW2_MAX_HOST_OFFSET (1ull << 56)

/* Cluster types, and with extended L2 entries subcluster types (QEMU's
 * QCow2SubclusterType): UNALLOC_ALLOC is an unallocated subcluster of an
 * allocated cluster, INVALID a bitmap that contradicts itself. */
enum {
        QC_UNALLOCATED,
        QC_ZERO_PLAIN,
        QC_ZERO_ALLOC,
        QC_NORMAL,
        QC_COMPRESSED,
        QC_UNALLOC_ALLOC,
        QC_INVALID,
};

/* Extended L2 entries: a 64-bit subcluster bitmap after each entry. */
#define QCOW2_SUBCLUSTERS 32u
#define QCOW2_BM_ALLOC(from, to) ((1ull << (to)) - (1ull << (from))) /* subclusters [from, to) allocated */
#define QCOW2_BM_ZERO(from, to) (QCOW2_BM_ALLOC(from, to) << 32)      /* ... read as zeros */
#define QCOW2_BM_ALL_ALLOC QCOW2_BM_ALLOC(0, 32)
#define QCOW2_BM_ALL_ZERO QCOW2_BM_ZERO(0, 32)

#define QCOW2_CACHE_SLOTS 32

struct qcow2_cache {
        uint64_t offset[QCOW2_CACHE_SLOTS]; /* 0 = slot free */
        uint64_t used[QCOW2_CACHE_SLOTS];
        uint8_t *buf[QCOW2_CACHE_SLOTS];
        uint32_t dirty_lo[QCOW2_CACHE_SLOTS], dirty_hi[QCOW2_CACHE_SLOTS]; /* bytes awaiting a sync, then a write */
        uint64_t clock;
};

struct qcow2 {
        uint32_t version;
        uint32_t cluster_bits, cluster_size;
        uint32_t header_length;
        bool extl2;               /* extended L2 entries (incompatible bit 4): 16 bytes, 32 subclusters */
        uint32_t l2e_size;        /* bytes per L2 entry: 8, or 16 with extl2 */
        uint32_t sc_size;         /* subcluster size (the cluster size without extl2) */
        uint64_t incompat, compat, autoclear;
        uint32_t crypt_method;
        uint8_t compression_type;

        uint64_t l1_offset;
        uint32_t l1_size;
        uint64_t *l1; /* host order, l1_size entries */
        uint64_t l2_entries;

        uint64_t rt_offset;
        uint32_t rt_clusters;
        uint64_t rt_entries;
        uint64_t *rt; /* host order */
        uint32_t refcount_order, refcount_bits;
        uint64_t per_block; /* refcounts per refblock */

        uint32_t nb_snapshots;
        uint64_t snapshots_offset;
        uint64_t snapshots_size;  /* bytes of the table (0 when not read: check mode) */
        uint64_t *sn_l1;          /* each snapshot's L1 table: offset, bytes (pairs) */

        bool has_bitmaps;
        uint32_t nb_bitmaps;
        uint64_t bitmap_dir_offset, bitmap_dir_size;

        uint64_t fde_offset, fde_length;

        /* External data file (incompatible bit 2): guest data at host offset
         * = guest offset in another file; raw (autoclear bit 1): that file
         * is kept a valid raw image of the disk. */
        bool has_data_file, data_raw;
        char *data_file;          /* as stored in the header extension */
        char *data_file_abs;      /* resolved and confined */
        int data_fd;              /* -1 when none */

        char *feature_names[3][64]; /* from the feature name table, for messages */

        struct qcow2_cache l2_cache, rb_cache;

        uint64_t free_hint;       /* no free cluster below this index */
        bool alloc_unsafe;        /* the refcount table does not cover the file (alloc_clusters) */
        uint64_t alloc_unsafe_entry;
        uint64_t comp_free_off;   /* next free byte for compressed data, 0 = none */
        bool prepared_for_write;  /* header fixed up before the first write */
        bool l2_pending;          /* some L2 entries wait for the next sync (qcow2_l2_commit_pending) */
        uint64_t unsynced_bytes;  /* data written for them since */
        int metadata_prealloc;    /* -1 unknown, 0, 1 */

        uint8_t *comp_cache;      /* last decompressed cluster */
        uint64_t comp_cache_key;  /* its L2 entry, 0 = none */

        /* Allocating writes whose data goes out without the image lock
         * (qcow2_write): their guest clusters, not yet in the L2 tables.
         * Whoever would read or change those entries waits (inflight_wait). */
        struct qcow2_inflight *inflight;
        pthread_cond_t inflight_done;
};

struct qcow2_inflight {
        uint64_t first, n; /* guest clusters */
        struct qcow2_inflight *next;
};

static inline struct qcow2 *QC(dc_image *img) {
        return img->priv;
}

/* Clusters, and L1 entries, that SIZE bytes need; no overflow for any SIZE. */
static inline uint64_t qcow2_size_to_clusters(unsigned cluster_bits, uint64_t size) {
        return (size >> cluster_bits) + !!(size & ((1ull << cluster_bits) - 1));
}
static inline uint64_t qcow2_size_to_l1(unsigned cluster_bits, uint64_t l2_entries, uint64_t size) {
        uint64_t c = qcow2_size_to_clusters(cluster_bits, size);
        return c / l2_entries + !!(c % l2_entries);
}
/*
 * The largest virtual size QEMU creates, opens or grows to: as many
 * clusters as a 32 MiB L1 table maps (qemu-img create and resize refuse a
 * byte more with EFBIG; measured with qemu-img 7.2 for every cluster size).
 */
static inline uint64_t qcow2_max_virtual_size(unsigned cluster_bits, uint64_t l2_entries) {
        return ((uint64_t) QCOW2_MAX_L1_ENTRIES * l2_entries) << cluster_bits;
}

/* Refcount entry I of the refblock RB (BITS wide) becomes 1; RB was zeroed.
 * Entries narrower than a byte are packed from its least significant bit. */
static inline void qcow2_rb_set_one(uint8_t *rb, unsigned bits, uint64_t i) {
        if (bits >= 8)
                rb[(i + 1) * (bits / 8) - 1] = 1;
        else
                rb[i * bits / 8] |= (uint8_t) (1u << (i * bits % 8));
}

/* The longest run of clusters qcow2_alloc_clusters() can always satisfy. */
static inline uint64_t qcow2_max_run(struct qcow2 *s) {
        return MAX(1u, s->per_block / 2);
}

int qcow2_cluster_type(struct qcow2 *s, uint64_t e);
int qcow2_subcluster_type(struct qcow2 *s, uint64_t e, uint64_t bm, unsigned sc);

static inline uint64_t qcow2_l2_get(const struct qcow2 *s, const uint8_t *t, uint64_t i) {
        return be64(t + i * s->l2e_size);
}
static inline uint64_t qcow2_l2_bitmap(const struct qcow2 *s, const uint8_t *t, uint64_t i) {
        return s->extl2 ? be64(t + i * 16 + 8) : 0;
}
static inline void qcow2_l2_set(const struct qcow2 *s, uint8_t *t, uint64_t i, uint64_t e, uint64_t bm) {
        put_be64(t + i * s->l2e_size, e);
        if (s->extl2)
                put_be64(t + i * 16 + 8, bm);
}
void qcow2_compressed_range(struct qcow2 *s, uint64_t e, uint64_t *ret_off, uint64_t *ret_len);

int qcow2_cache_get(dc_image *img, struct qcow2_cache *c, uint64_t offset, bool fresh, uint8_t **ret);
void qcow2_cache_drop(struct qcow2_cache *c, uint64_t offset);
void qcow2_cache_free(struct qcow2_cache *c);
int qcow2_l2_commit_pending(dc_image *img);

int qcow2_refcount_get(dc_image *img, uint64_t cluster, uint64_t *ret);
int qcow2_refcount_set(dc_image *img, uint64_t cluster, uint64_t value);
int qcow2_alloc_clusters(dc_image *img, uint64_t n, uint64_t *ret_first);
int qcow2_free_clusters(dc_image *img, uint64_t first, uint64_t n);
int qcow2_free_bytes(dc_image *img, uint64_t off, uint64_t len);
int qcow2_ref_bytes(dc_image *img, uint64_t off, uint64_t len);

int qcow2_check(dc_image *img, int repair, struct dc_check_result *ret);
int qcow2_overlap_check(dc_image *img, uint64_t off, uint64_t len, unsigned ignore, const char *what);
int qcow2_file_size(dc_image *img, uint64_t *ret);

/* What qcow2_overlap_check() may ignore: the kind of metadata being written. */
enum {
        QCOW2_OL_ACTIVE_L2 = 1u << 0,
        QCOW2_OL_REFBLOCK = 1u << 1,
};
int qcow2_header_write(dc_image *img, uint64_t field_off, const void *buf, size_t len);

/* --- persistent dirty bitmaps (qcow2-bitmap.c) --- */

#define QCOW2_BME_IN_USE 1u
#define QCOW2_BME_AUTO 2u

/* One bitmap of the directory, checked: its entry and its table (TABLE_SIZE big-endian entries). */
struct qcow2_bitmap_entry {
        uint64_t entry;           /* where the entry starts in the directory */
        uint64_t table_offset;
        const char *name;         /* NAME_SIZE bytes, not terminated */
        uint16_t name_size;
        uint32_t flags;           /* QCOW2_BME_* */
        uint8_t granularity_bits;
        const uint8_t *table;
        uint32_t table_size;
};
int qcow2_read_bitmap_dir(dc_image *img, uint8_t **ret);
/*
 * The bitmap directory and tables, checked as QEMU checks them when it
 * loads the bitmaps (block/qcow2-bitmap.c): the rules of the spec give
 * EUCLEAN, what the spec allows but QEMU refuses gives EFBIG or ENOTSUP.
 * VISIT (if not NULL) is called with each bitmap once it passed; a
 * negative return ends the walk with it.
 */
int qcow2_read_bitmaps(dc_image *img, uint64_t fsize,
                       int (*visit)(dc_image *img, const struct qcow2_bitmap_entry *b, void *userdata), void *userdata);
/* Point the header at a new bitmap directory (NB 0: none), durably (qcow2.c). */
int qcow2_header_set_bitmaps(dc_image *img, uint32_t nb, uint64_t dir_size, uint64_t dir_offset);

/* The image lock is held (the rest of the write path is in dc-internal.h). */
int qcow2_bitmaps_start_recording(dc_image *img);    /* from the first write's preparation */
