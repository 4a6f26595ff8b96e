/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * dc-probe: one library call per run, reporting the errno *class* of a
 * failure as well as its message, which is what the hostile-header and
 * limit tests judge (dc-tool only prints messages).  Built by the tests
 * themselves (imgtest.probe) against the library of the build under test.
 *
 *   dc-probe open PATH [rw] [check]     open the chain (read-only by default)
 *   dc-probe create PATH SIZE [CLUSTER] create a qcow2 image
 *   dc-probe resize PATH SIZE
 *   dc-probe write PATH OFF LEN [PAT]   and flush
 *   dc-probe zero PATH OFF LEN [unmap]
 *   dc-probe discard PATH OFF LEN
 *   dc-probe compress PATH OFF LEN [PAT]
 *   dc-probe read PATH OFF LEN          prints nothing of the data
 *   dc-probe map PATH
 *   dc-probe check PATH [leaks|all]     prints the counts
 *   dc-probe datafile PATH              the stored and resolved data file names
 *
 * Prints "OK" or "ERR <ERRNO-NAME>: <message>"; exit status 0 or 1.
 */

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "diskchain.h"

/* internal getters (lib/qcow2.h) the library exports to its own tests */
const char *dc_image_data_file(dc_image *img) __attribute__((weak));
const char *dc_image_data_file_path(dc_image *img) __attribute__((weak));

static const char *roots[2];

static int report(int r) {
        if (r >= 0) {
                printf("OK\n");
                return 0;
        }
        printf("ERR %s: %s\n", strerrorname_np(-r) ? strerrorname_np(-r) : "?", dc_get_error());
        return 1;
}

static int ignore(const struct dc_extent *e, void *u) {
        (void) e;
        (void) u;
        return 0;
}

int main(int argc, char **argv) {
        struct dc_open_options o = { 0 };
        const char *cmd, *path;
        dc_image *img = NULL;
        int r;

        if (argc < 3)
                return fprintf(stderr, "usage: see tests/lib/dc-probe.c\n"), 2;
        roots[0] = getenv("DC_ROOT");
        o.roots = roots[0] ? roots : NULL;
        cmd = argv[1];
        path = argv[2];
        if (!strcmp(cmd, "create")) {
                struct dc_create_options c = { .backing_format = -1 };
                if (argc > 4)
                        c.cluster_size = (uint32_t) strtoul(argv[4], NULL, 0);
                return report(dc_image_create(path, strtoull(argv[3], NULL, 0), &c, o.roots));
        }
        for (int i = 3; i < argc; i++) {
                if (!strcmp(argv[i], "rw"))
                        o.writable = true;
                if (!strcmp(argv[i], "check"))
                        o.check_mode = true;
        }
        if (!strcmp(cmd, "write") || !strcmp(cmd, "zero") || !strcmp(cmd, "discard") || !strcmp(cmd, "resize") ||
            !strcmp(cmd, "compress"))
                o.writable = true;
        if (!strcmp(cmd, "check")) {
                o.check_mode = true;
                o.no_backing = true;
                o.writable = argc > 3;
        }
        r = dc_image_open(path, &o, &img);
        if (r < 0)
                return report(r);
        if (!strcmp(cmd, "open"))
                r = 0;
        else if (!strcmp(cmd, "resize"))
                r = dc_image_truncate(img, strtoull(argv[3], NULL, 0));
        else if (!strcmp(cmd, "write") || !strcmp(cmd, "compress") || !strcmp(cmd, "read")) {
                uint64_t off = strtoull(argv[3], NULL, 0);
                size_t len = (size_t) strtoull(argv[4], NULL, 0);
                uint8_t *b = malloc(len ? len : 1);
                memset(b, argc > 5 ? (int) strtoul(argv[5], NULL, 0) : 0x5a, len);
                if (!strcmp(cmd, "write"))
                        r = dc_image_write(img, b, off, len);
                else if (!strcmp(cmd, "read"))
                        r = dc_image_read(img, b, off, len);
                else
                        r = dc_image_write_compressed(img, b, off, len);
                free(b);
        } else if (!strcmp(cmd, "zero"))
                r = dc_image_write_zeroes(img, strtoull(argv[3], NULL, 0), strtoull(argv[4], NULL, 0),
                                          argc > 5 ? DC_ZERO_MAY_UNMAP : 0);
        else if (!strcmp(cmd, "discard"))
                r = dc_image_discard(img, strtoull(argv[3], NULL, 0), strtoull(argv[4], NULL, 0));
        else if (!strcmp(cmd, "map"))
                r = dc_image_map(img, 0, dc_image_virtual_size(img), ignore, NULL);
        else if (!strcmp(cmd, "check")) {
                struct dc_check_result c;
                int repair = argc > 3 ? (!strcmp(argv[3], "all") ? DC_REPAIR_ALL : DC_REPAIR_LEAKS) : DC_REPAIR_NONE;
                r = dc_image_check(img, repair, &c);
                if (r >= 0)
                        printf("corruptions=%" PRIu64 " leaks=%" PRIu64 " check-errors=%" PRIu64 " fixed=%" PRIu64 "\n",
                               c.corruptions, c.leaks, c.check_errors, c.corruptions_fixed + c.leaks_fixed);
        } else if (!strcmp(cmd, "datafile")) {
                if (dc_image_data_file)
                        printf("stored=%s\n", dc_image_data_file(img));
                if (dc_image_data_file_path)
                        printf("resolved=%s\n", dc_image_data_file_path(img));
                r = 0;
        } else {
                fprintf(stderr, "unknown command %s\n", cmd);
                return 2;
        }
        if (r >= 0 && o.writable)
                r = dc_image_flush(img);
        r = report(r);
        dc_image_close(img);
        return r;
}
