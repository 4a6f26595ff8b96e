/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * libFuzzer target for qcow2 header and metadata parsing: the input is an
 * image file; it is opened, read through, mapped and checked.  Built as a
 * fuzzer with -Dfuzzing=true (clang), and always as fuzz-qcow2-replay, which
 * runs the checked-in corpus as an ordinary test.
 */

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "diskchain.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int ignore_extent(const struct dc_extent *e, void *u) {
        (void) e;
        (void) u;
        return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        char path[] = "/tmp/fuzz-qcow2-XXXXXX";
        struct dc_open_options o = { .no_backing = true, .no_lock = true, .check_mode = true };
        struct dc_check_result c;
        dc_image *img = NULL;
        int fd = mkstemp(path);

        if (fd < 0)
                return 0;
        if (write(fd, data, size) != (ssize_t) size) {
                close(fd);
                unlink(path);
                return 0;
        }
        close(fd);
        if (dc_image_open(path, &o, &img) >= 0) {
                uint64_t vs = dc_image_virtual_size(img), n = vs < (8u << 20) ? vs : (8u << 20);
                uint8_t *buf = malloc(65536);
                for (uint64_t off = 0; buf && off < n; off += 65536)
                        (void) dc_image_read(img, buf, off, (size_t) (n - off < 65536 ? n - off : 65536));
                free(buf);
                (void) dc_image_map(img, 0, n, ignore_extent, NULL);
                (void) dc_image_check(img, DC_REPAIR_NONE, &c);
                dc_image_close(img);
        }
        unlink(path);
        return 0;
}

#ifndef FUZZING_ENGINE
int main(int argc, char **argv) {
        int n = 0;
        for (int i = 1; i < argc; i++) {
                FILE *f = fopen(argv[i], "rb");
                uint8_t *buf;
                long len;
                if (!f) {
                        perror(argv[i]);
                        return 1;
                }
                fseek(f, 0, SEEK_END);
                len = ftell(f);
                fseek(f, 0, SEEK_SET);
                buf = malloc(len > 0 ? (size_t) len : 1);
                if (fread(buf, 1, (size_t) len, f) != (size_t) len) {
                        fclose(f);
                        free(buf);
                        return 1;
                }
                fclose(f);
                LLVMFuzzerTestOneInput(buf, (size_t) len);
                free(buf);
                n++;
        }
        printf("fuzz-qcow2: replayed %d inputs\n", n);
        return 0;
}
#endif
