/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Allocating writes that meet in the same clusters of an overlay, on real
 * files: qcow2.c reads the copy-on-write part of a cluster from the backing
 * file with the image lock released, the cluster registered as in flight.
 * Three threads write three disjoint pieces of every cluster (head, tail,
 * zeroed middle) in different orders while a fourth reads; the first to
 * reach a cluster allocates it, the others must wait for its L2 entry and
 * then write in place.  A lost piece (two allocations of one cluster, the
 * later one copying the backing file's bytes over the earlier's write), a
 * torn read or a leaked or doubly referenced cluster fails the test.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "diskchain.h"

#define CHECK_DETAIL() dc_get_error()
#include "check.h"

#define CS 65536u
#define CLUSTERS 192u
#define SIZE ((uint64_t) CLUSTERS * CS)
#define ROUNDS 4
#define HEAD 4096u /* [0, HEAD): the head writer's */
#define TAIL 4096u /* [CS - TAIL, CS): the tail writer's */

static const uint64_t mid_off = 16384, mid_len = 16384; /* zeroed by the zeroer */

static char dir[] = "/tmp/dc-qcow2-race-XXXXXX";
static dc_image *top;
static unsigned long torn;
static volatile int done_writing;

static uint8_t backing_byte(uint64_t off) {
        return (uint8_t) ((off / 512) * 37 + 11);
}

/* The value a byte of cluster C may show at offset IN: its backing byte, or what its writer writes. */
static int piece_of(uint64_t in) {
        if (in < HEAD)
                return 'H';
        if (in >= CS - TAIL)
                return 'T';
        if (in >= mid_off && in < mid_off + mid_len)
                return 'Z';
        return 0;
}

static uint8_t written_byte(int piece, unsigned c) {
        return piece == 'H' ? (uint8_t) (0xa0 | (c & 15)) : piece == 'T' ? (uint8_t) (0xb0 | (c & 15)) : 0;
}

static void shuffle(unsigned *v, unsigned n, uint64_t seed) {
        for (unsigned i = 0; i < n; i++)
                v[i] = i;
        for (unsigned i = n - 1; i > 0; i--) {
                seed = seed * 6364136223846793005ull + 1442695040888963407ull;
                unsigned j = (unsigned) ((seed >> 33) % (i + 1));
                unsigned t = v[i];
                v[i] = v[j];
                v[j] = t;
        }
}

static void *piece_writer(void *p) {
        int piece = (int) (intptr_t) p;
        unsigned order[CLUSTERS];
        uint8_t buf[HEAD];
        int r = 0;

        shuffle(order, CLUSTERS, (uint64_t) piece * 7919);
        for (unsigned i = 0; i < CLUSTERS && r >= 0; i++) {
                unsigned c = order[i];
                uint64_t base = (uint64_t) c * CS;
                if (piece == 'Z')
                        r = dc_image_write_zeroes(top, base + mid_off, mid_len, 0);
                else {
                        memset(buf, written_byte(piece, c), sizeof buf);
                        r = dc_image_write(top, buf, base + (piece == 'H' ? 0 : CS - TAIL), sizeof buf);
                }
        }
        return (void *) (intptr_t) r;
}

static void *reader(void *p) {
        uint8_t *buf = malloc(CS);
        uint64_t seed = 42;
        (void) p;

        while (buf && !__atomic_load_n(&done_writing, __ATOMIC_ACQUIRE)) {
                seed = seed * 6364136223846793005ull + 1442695040888963407ull;
                unsigned c = (unsigned) ((seed >> 33) % CLUSTERS);
                if (dc_image_read(top, buf, (uint64_t) c * CS, CS) < 0) {
                        __atomic_add_fetch(&torn, 1, __ATOMIC_RELAXED);
                        continue;
                }
                for (uint64_t in = 0; in < CS; in++) {
                        uint8_t b = buf[in], old = backing_byte((uint64_t) c * CS + in);
                        int piece = piece_of(in);
                        if (b != old && (!piece || b != written_byte(piece, c))) {
                                __atomic_add_fetch(&torn, 1, __ATOMIC_RELAXED);
                                break;
                        }
                }
        }
        free(buf);
        return NULL;
}

static void make_base(const char *path) {
        struct dc_open_options oo = { .writable = true };
        uint8_t *buf = malloc(CS);
        dc_image *img = NULL;

        CHECK(buf != NULL);
        CHECK(dc_image_create(path, SIZE, &(struct dc_create_options){ .backing_format = -1 }, NULL) == 0);
        CHECK(dc_image_open(path, &oo, &img) == 0);
        for (unsigned c = 0; buf && img && c < CLUSTERS; c++) {
                for (uint64_t in = 0; in < CS; in++)
                        buf[in] = backing_byte((uint64_t) c * CS + in);
                CHECK(dc_image_write(img, buf, (uint64_t) c * CS, CS) == 0);
        }
        CHECK(img && dc_image_flush(img) == 0);
        dc_image_close(img);
        free(buf);
}

static void one_round(const char *base, const char *path, int round) {
        struct dc_open_options oo = { .writable = true };
        struct dc_check_result cr = { 0 };
        pthread_t w[3], rd;
        const int pieces[3] = { 'H', 'T', 'Z' };
        uint8_t *buf = malloc(CS);
        void *ret;

        (void) unlink(path);
        CHECK(dc_image_create(path, SIZE,
                              &(struct dc_create_options){ .backing = base, .backing_format = DC_FORMAT_QCOW2 },
                              NULL) == 0);
        CHECK(dc_image_open(path, &oo, &top) == 0);
        if (!top || !buf) {
                free(buf);
                return;
        }
        __atomic_store_n(&done_writing, 0, __ATOMIC_RELEASE);
        CHECK(pthread_create(&rd, NULL, reader, NULL) == 0);
        for (int i = 0; i < 3; i++)
                CHECK(pthread_create(&w[i], NULL, piece_writer, (void *) (intptr_t) pieces[(i + round) % 3]) == 0);
        for (int i = 0; i < 3; i++) {
                pthread_join(w[i], &ret);
                CHECK((intptr_t) ret == 0);
        }
        __atomic_store_n(&done_writing, 1, __ATOMIC_RELEASE);
        pthread_join(rd, NULL);
        CHECK(torn == 0);
        CHECK(dc_image_flush(top) == 0);

        /* every piece of every cluster, and the backing file's bytes between them */
        for (unsigned c = 0; c < CLUSTERS; c++) {
                unsigned bad = 0;
                CHECK(dc_image_read(top, buf, (uint64_t) c * CS, CS) == 0);
                for (uint64_t in = 0; in < CS; in++) {
                        int piece = piece_of(in);
                        uint8_t want = piece ? written_byte(piece, c) : backing_byte((uint64_t) c * CS + in);
                        bad += buf[in] != want;
                }
                if (bad)
                        fprintf(stderr, "round %d, cluster %u: %u bytes wrong\n", round, c, bad);
                CHECK(bad == 0);
        }
        CHECK(dc_image_check(top, 0, &cr) == 0);
        CHECK(cr.corruptions == 0 && cr.leaks == 0 && cr.check_errors == 0);
        /* one cluster each: allocated once, whoever came first */
        CHECK(cr.allocated_clusters >= CLUSTERS);
        top = dc_image_close(top);
        free(buf);
}

int main(void) {
        char base[64], path[64];

        if (!mkdtemp(dir)) {
                perror("mkdtemp");
                return 1;
        }
        snprintf(base, sizeof base, "%s/base.qcow2", dir);
        snprintf(path, sizeof path, "%s/top.qcow2", dir);
        make_base(base);
        for (int round = 0; round < ROUNDS; round++)
                one_round(base, path, round);
        if (access("/usr/bin/qemu-img", X_OK) == 0) {
                char cmd[256];
                snprintf(cmd, sizeof cmd, "qemu-img check -q '%s'", path);
                CHECK(system(cmd) == 0);
        }
        (void) unlink(path);
        (void) unlink(base);
        (void) rmdir(dir);
        printf("%d rounds of 3 writers meeting in %u clusters\n", ROUNDS, CLUSTERS);
        return check_report("test-qcow2-race");
}
