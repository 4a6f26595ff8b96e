/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Unit tests of lib/bitmap.c: every function against a model that keeps one
 * bool per bit, under random operations on bitmaps whose sizes straddle the
 * word boundaries, and the edges (empty ranges, ranges past the end, runs
 * across words, the last partial word).
 */

#include <stdlib.h>
#include <string.h>

#include "bitmap.h"
#include "check.h"

static uint64_t seed = 0x243f6a8885a308d3ull;
static uint64_t rnd(uint64_t n) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        return n ? seed % n : 0;
}

static void test_edges(void) {
        struct dc_bitmap bm;
        bool v;

        CHECK(dc_bitmap_init(&bm, 130) == 0);
        CHECK(dc_bitmap_count(&bm) == 0);
        CHECK(dc_bitmap_next(&bm, 0) == 130);
        CHECK(dc_bitmap_run(&bm, 0, 1000, &v) == 130 && !v);
        CHECK(dc_bitmap_assign(&bm, 5, 0, true) == 0);
        CHECK(dc_bitmap_assign(&bm, 63, 3, true) == 3); /* across the first word boundary */
        CHECK(dc_bitmap_test(&bm, 63) && dc_bitmap_test(&bm, 64) && dc_bitmap_test(&bm, 65));
        CHECK(!dc_bitmap_test(&bm, 62) && !dc_bitmap_test(&bm, 66));
        CHECK(dc_bitmap_assign(&bm, 60, 10, true) == 7); /* three were set already */
        CHECK(dc_bitmap_count(&bm) == 10);
        CHECK(dc_bitmap_next(&bm, 0) == 60 && dc_bitmap_next(&bm, 69) == 69 && dc_bitmap_next(&bm, 70) == 130);
        CHECK(dc_bitmap_run(&bm, 60, 100, &v) == 10 && v);
        CHECK(dc_bitmap_run(&bm, 60, 4, &v) == 4 && v);
        CHECK(dc_bitmap_run(&bm, 0, 1000, &v) == 60 && !v);
        CHECK(dc_bitmap_run(&bm, 70, 1000, &v) == 60 && !v); /* clear up to the end, not beyond */
        /* past the end: clamped, the words after NBITS stay clear */
        CHECK(dc_bitmap_assign(&bm, 128, 100, true) == 2);
        CHECK(dc_bitmap_assign(&bm, 130, 5, true) == 0);
        CHECK(dc_bitmap_run(&bm, 128, 1000, &v) == 2 && v);
        CHECK(dc_bitmap_next(&bm, 129) == 129);
        CHECK(dc_bitmap_count(&bm) == 12);
        CHECK(dc_bitmap_assign(&bm, 0, UINT64_MAX, false) == 12);
        CHECK(dc_bitmap_count(&bm) == 0 && dc_bitmap_next(&bm, 0) == 130);
        CHECK(dc_bitmap_assign(&bm, 0, UINT64_MAX, true) == 130);
        CHECK(dc_bitmap_run(&bm, 1, UINT64_MAX, &v) == 129 && v);
        dc_bitmap_release(&bm);
        CHECK(bm.words == NULL);

        CHECK(dc_bitmap_init(&bm, 0) == 0); /* an empty disk */
        CHECK(dc_bitmap_next(&bm, 0) == 0 && dc_bitmap_assign(&bm, 0, 10, true) == 0);
        dc_bitmap_release(&bm);
}

static void test_against_model(uint64_t nbits) {
        struct dc_bitmap bm;
        bool *model = calloc(nbits + 1, 1);
        uint64_t count = 0;

        CHECK(dc_bitmap_init(&bm, nbits) == 0);
        for (int op = 0; op < 4000; op++) {
                uint64_t first = rnd(nbits + 3), n = rnd(op % 7 ? 80 : nbits + 5), changed = 0, want;
                bool v = rnd(2), rv;

                for (uint64_t i = first; i < first + n && i < nbits; i++)
                        if (model[i] != v) {
                                model[i] = v;
                                changed++;
                        }
                count = v ? count + changed : count - changed;
                CHECK(dc_bitmap_assign(&bm, first, n, v) == changed);
                CHECK(dc_bitmap_count(&bm) == count);

                if (!nbits)
                        continue;
                /* a run from a random bit */
                first = rnd(nbits);
                n = rnd(200) + 1;
                want = 1;
                while (want < n && first + want < nbits && model[first + want] == model[first])
                        want++;
                CHECK(dc_bitmap_run(&bm, first, n, &rv) == want && rv == model[first]);
                CHECK(dc_bitmap_test(&bm, first) == model[first]);
                /* the next set bit */
                want = first;
                while (want < nbits && !model[want])
                        want++;
                CHECK(dc_bitmap_next(&bm, first) == want);
        }
        for (uint64_t i = 0; i < nbits; i++)
                if (dc_bitmap_test(&bm, i) != model[i]) {
                        CHECK(!"bitmap and model differ");
                        break;
                }
        dc_bitmap_release(&bm);
        free(model);
}

int main(void) {
        test_edges();
        for (uint64_t nbits = 1; nbits < 200; nbits += 21)
                test_against_model(nbits);
        test_against_model(64);
        test_against_model(128);
        test_against_model(4099);
        return check_report("test-bitmap");
}
