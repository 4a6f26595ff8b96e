/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/*
 * A plain bitmap of NBITS bits with a count of the set ones (nbdkit's
 * common/bitmap, QEMU's HBitmap without the hierarchy).  The copy engine
 * keeps what is still to be copied in one, a bit per unit of the disk.
 *
 * Not thread-safe: the owner serializes every call (the copy engine under
 * its lock).  dc_bitmap_count() may be read without it (a relaxed atomic
 * load) for progress reports that need no exact value.
 */

#include <stdbool.h>
#include <stdint.h>

struct dc_bitmap {
        uint64_t *words;
        uint64_t nbits;
        uint64_t count; /* set bits (written under the owner's lock, read atomically) */
};

/* All bits clear.  -ENOMEM (no message recorded). */
int dc_bitmap_init(struct dc_bitmap *bm, uint64_t nbits);
void dc_bitmap_release(struct dc_bitmap *bm);

bool dc_bitmap_test(const struct dc_bitmap *bm, uint64_t i);
/* Set (V) or clear bits [FIRST, FIRST+N), clamped to NBITS; returns how many changed. */
uint64_t dc_bitmap_assign(struct dc_bitmap *bm, uint64_t first, uint64_t n, bool v);
/* The length (>= 1) of the run of equal bits starting at I < NBITS, at most MAX (>= 1), and its value. */
uint64_t dc_bitmap_run(const struct dc_bitmap *bm, uint64_t i, uint64_t max, bool *ret_v);
/* The first set bit at or after FROM, or NBITS when there is none. */
uint64_t dc_bitmap_next(const struct dc_bitmap *bm, uint64_t from);
/* How many bits are set. */
uint64_t dc_bitmap_count(const struct dc_bitmap *bm);
