/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Bitmap helpers (see bitmap.h).  Bits live in 64-bit words, bit I in word
 * I / 64 at position I % 64.  Runs, searches and range updates work a word
 * at a time, so a pass over a mostly clean bitmap of a large disk costs
 * NBITS / 64 word tests; tests/test-bitmap.c checks every function against
 * a bit-by-bit model.  The words past NBITS stay clear (assign clamps), so
 * searches need no masking at the end.
 */

#include <errno.h>
#include <stdlib.h>

#include "bitmap.h"

#define WORD_BITS 64u

int dc_bitmap_init(struct dc_bitmap *bm, uint64_t nbits) {
        uint64_t words = nbits / WORD_BITS + 1;

        *bm = (struct dc_bitmap){ .nbits = nbits };
        if (words > SIZE_MAX / sizeof *bm->words)
                return -ENOMEM;
        bm->words = calloc((size_t) words, sizeof *bm->words);
        return bm->words ? 0 : -ENOMEM;
}

void dc_bitmap_release(struct dc_bitmap *bm) {
        free(bm->words);
        *bm = (struct dc_bitmap){ 0 };
}

bool dc_bitmap_test(const struct dc_bitmap *bm, uint64_t i) {
        return bm->words[i / WORD_BITS] >> (i % WORD_BITS) & 1;
}

/* Bits [lo, hi) of one word (0 <= lo < hi <= 64). */
static uint64_t mask(unsigned lo, unsigned hi) {
        uint64_t m = hi == WORD_BITS ? ~0ull : (1ull << hi) - 1;
        return m & ~((1ull << lo) - 1);
}

uint64_t dc_bitmap_assign(struct dc_bitmap *bm, uint64_t first, uint64_t n, bool v) {
        uint64_t end, changed = 0;

        if (first >= bm->nbits)
                return 0;
        end = n > bm->nbits - first ? bm->nbits : first + n;
        while (first < end) {
                uint64_t w = first / WORD_BITS;
                unsigned lo = (unsigned) (first % WORD_BITS);
                unsigned hi = end - w * WORD_BITS >= WORD_BITS ? WORD_BITS : (unsigned) (end - w * WORD_BITS);
                uint64_t m = mask(lo, hi), old = bm->words[w];

                bm->words[w] = v ? old | m : old & ~m;
                changed += (uint64_t) __builtin_popcountll((old ^ bm->words[w]) & m);
                first = w * WORD_BITS + hi;
        }
        __atomic_store_n(&bm->count, v ? bm->count + changed : bm->count - changed, __ATOMIC_RELAXED);
        return changed;
}

uint64_t dc_bitmap_run(const struct dc_bitmap *bm, uint64_t i, uint64_t max, bool *ret_v) {
        bool v = dc_bitmap_test(bm, i);
        uint64_t n = 0;

        if (max > bm->nbits - i)
                max = bm->nbits - i;
        while (n < max) {
                uint64_t p = i + n, w = p / WORD_BITS;
                unsigned lo = (unsigned) (p % WORD_BITS);
                /* the bits that differ from V, from LO on */
                uint64_t diff = (v ? ~bm->words[w] : bm->words[w]) & mask(lo, WORD_BITS);

                if (diff) {
                        n += (unsigned) __builtin_ctzll(diff) - lo;
                        break;
                }
                n += WORD_BITS - lo;
        }
        *ret_v = v;
        return n < max ? n : max;
}

uint64_t dc_bitmap_next(const struct dc_bitmap *bm, uint64_t from) {
        for (uint64_t p = from; p < bm->nbits;) {
                uint64_t w = p / WORD_BITS;
                uint64_t set = bm->words[w] & mask((unsigned) (p % WORD_BITS), WORD_BITS);

                if (set) {
                        p = w * WORD_BITS + (unsigned) __builtin_ctzll(set);
                        return p < bm->nbits ? p : bm->nbits;
                }
                p = (w + 1) * WORD_BITS;
        }
        return bm->nbits;
}

uint64_t dc_bitmap_count(const struct dc_bitmap *bm) {
        return __atomic_load_n(&bm->count, __ATOMIC_RELAXED);
}
