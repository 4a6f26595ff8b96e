/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * dc-tool: drives libdiskchain from the command line for the interoperability
 * and crash tests, which judge the results with qemu-img.
 *
 *   dc-tool create PATH SIZE [key=value ...]   (format, backing, backing-format,
 *                                              cluster-size, compat, compression-type,
 *                                              preallocation, lazy-refcounts, refcount-bits)
 *   dc-tool io PATH CMD...                    CMD: write PAT OFF LEN | zero OFF LEN [unmap]
 *                                              | discard OFF LEN | compress PAT OFF LEN
 *                                              | writefile FILE OFF | resize SIZE
 *   dc-tool read PATH OUTFILE                 whole guest disk as raw
 *   dc-tool map PATH                          like qemu-img map --output=json
 *   dc-tool check PATH [leaks|all]            like qemu-img check --output=json
 *   dc-tool info PATH
 *   dc-tool bitmaps PATH [NAME]               the top's persistent bitmaps a line each
 *                                              (name granularity in-use enabled dirty);
 *                                              with NAME its dirty ranges, "OFFSET LENGTH"
 *   dc-tool bitmap OP PATH NAME [ARG...]      change the top's bitmaps: OP add [GRANULARITY]
 *                                              [disabled] | remove | clear | enable | disable
 *                                              | merge SOURCE...
 *
 * Environment: DC_ROOT confines paths; DC_FAULT_WRITES=N dies before the Nth write.
 */

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "diskchain.h"

extern long dc_fault_writes_left;

static const char *roots[2];

static int fail(const char *what) {
        fprintf(stderr, "dc-tool: %s: %s\n", what, dc_get_error());
        return 1;
}

static uint64_t num(const char *s) {
        char *end;
        uint64_t v = strtoull(s, &end, 0);
        switch (*end) {
        case 'k': case 'K': v <<= 10; break;
        case 'm': case 'M': v <<= 20; break;
        case 'g': case 'G': v <<= 30; break;
        default: break;
        }
        return v;
}

static int do_create(int argc, char **argv) {
        struct dc_create_options o = { .backing_format = -1 };
        for (int i = 4; i < argc; i++) {
                char *k = argv[i], *v = strchr(k, '=');
                if (!v)
                        return fprintf(stderr, "bad option %s\n", k), 2;
                *v++ = 0;
                if (!strcmp(k, "format"))
                        o.format = !strcmp(v, "raw") ? DC_FORMAT_RAW : DC_FORMAT_QCOW2;
                else if (!strcmp(k, "backing"))
                        o.backing = v;
                else if (!strcmp(k, "backing-format"))
                        o.backing_format = !strcmp(v, "raw") ? DC_FORMAT_RAW : DC_FORMAT_QCOW2;
                else if (!strcmp(k, "cluster-size"))
                        o.cluster_size = (uint32_t) num(v);
                else if (!strcmp(k, "compat"))
                        o.compat = !strcmp(v, "0.10") ? 2 : 3;
                else if (!strcmp(k, "compression-type"))
                        o.compression_type = !strcmp(v, "zstd");
                else if (!strcmp(k, "preallocation"))
                        o.preallocation = !strcmp(v, "metadata") ? DC_PREALLOC_METADATA
                                          : !strcmp(v, "falloc") ? DC_PREALLOC_FALLOC
                                          : !strcmp(v, "full")   ? DC_PREALLOC_FULL
                                                                 : DC_PREALLOC_OFF;
                else if (!strcmp(k, "lazy-refcounts"))
                        o.lazy_refcounts = !strcmp(v, "on");
                else if (!strcmp(k, "refcount-bits"))
                        o.refcount_bits = (uint32_t) num(v);
                else
                        return fprintf(stderr, "unknown option %s\n", k), 2;
        }
        if (dc_image_create(argv[2], num(argv[3]), &o, roots[0] ? roots : NULL) < 0)
                return fail("create");
        return 0;
}

static void pattern(uint8_t *b, size_t n, uint64_t pat, uint64_t off) {
        if (pat < 256) {
                memset(b, (int) pat, n);
                return;
        }
        /* pseudo-random but reproducible: depends on the offset */
        for (size_t i = 0; i < n; i++) {
                uint64_t x = (off + i) * 0x9E3779B97F4A7C15ull ^ pat;
                b[i] = (uint8_t) (x >> 29);
        }
}

static int print_dirty(void *userdata, uint64_t off, uint64_t len);

/* What this open's bitmaps, or (LOOK) another open's of the same file, hold: "bitmap NAME GRAN IN_USE ENABLED DIRTY TRANSIENT". */
static int list_bitmaps(dc_image *img, const char *look) {
        struct dc_open_options o = { .no_backing = true, .no_lock = true, .check_mode = true };
        struct dc_bitmap_info *v;
        dc_image *other = NULL;
        size_t n;
        int r = look ? dc_image_open(look, &o, &other) : 0;

        if (r >= 0)
                r = dc_image_bitmaps(other ? other : img, &v, &n);
        for (size_t k = 0; r >= 0 && k < n; k++)
                printf("bitmap %s %u %d %d %" PRIu64 " %d\n", v[k].name, v[k].granularity, v[k].in_use, v[k].enabled,
                       v[k].dirty, v[k].transient);
        if (r >= 0)
                dc_bitmap_info_free(v, n);
        dc_image_close(other);
        return r;
}

static int do_io(int argc, char **argv) {
        struct dc_open_options o = { .roots = roots[0] ? roots : NULL, .writable = true };
        dc_image *img;
        int i = 3, r = 0;

        if (dc_image_open(argv[2], &o, &img) < 0)
                return fail("open");
        while (i < argc && r >= 0) {
                const char *c = argv[i];
                if (!strcmp(c, "write") || !strcmp(c, "compress")) {
                        uint64_t pat = num(argv[i + 1]), off = num(argv[i + 2]), len = num(argv[i + 3]);
                        uint8_t *b = malloc(len);
                        pattern(b, len, pat, off);
                        if (!strcmp(c, "write"))
                                r = dc_image_write(img, b, off, len);
                        else {
                                uint32_t cs = dc_image_cluster_size(img);
                                for (uint64_t p = 0; p < len && r >= 0; p += cs)
                                        r = dc_image_write_compressed(img, b + p, off + p, (size_t) (len - p < cs ? len - p : cs));
                        }
                        free(b);
                        i += 4;
                } else if (!strcmp(c, "zero")) {
                        unsigned fl = 0;
                        uint64_t off = num(argv[i + 1]), len = num(argv[i + 2]);
                        i += 3;
                        if (i < argc && !strcmp(argv[i], "unmap"))
                                fl = DC_ZERO_MAY_UNMAP, i++;
                        r = dc_image_write_zeroes(img, off, len, fl);
                } else if (!strcmp(c, "discard")) {
                        r = dc_image_discard(img, num(argv[i + 1]), num(argv[i + 2]));
                        i += 3;
                } else if (!strcmp(c, "transient")) {
                        /* transient NAME GRANULARITY: a bitmap of this open only */
                        r = dc_image_bitmap_add(img, argv[i + 1], (uint32_t) num(argv[i + 2]), DC_BITMAP_TRANSIENT);
                        i += 3;
                } else if (!strcmp(c, "bm-disable") || !strcmp(c, "bm-enable")) {
                        r = dc_image_bitmap_set_enabled(img, argv[i + 1], !strcmp(c, "bm-enable"));
                        i += 2;
                } else if (!strcmp(c, "bm-remove")) {
                        r = dc_image_bitmap_remove(img, argv[i + 1]);
                        i += 2;
                } else if (!strcmp(c, "bm-clear")) {
                        r = dc_image_bitmap_clear(img, argv[i + 1]);
                        i += 2;
                } else if (!strcmp(c, "bm-merge")) {
                        r = dc_image_bitmap_merge(img, argv[i + 1], (const char *const[]){ argv[i + 2] }, 1);
                        i += 3;
                } else if (!strcmp(c, "extents")) {
                        /* extents NAME: "OFF LEN" lines, then "end" */
                        r = dc_image_bitmap_extents(img, argv[i + 1], print_dirty, NULL);
                        printf("end\n");
                        i += 2;
                } else if (!strcmp(c, "list") || !strcmp(c, "list-other")) {
                        r = list_bitmaps(img, !strcmp(c, "list") ? NULL : argv[2]);
                        i += 1;
                } else if (!strcmp(c, "resize")) {
                        r = dc_image_truncate(img, num(argv[i + 1]));
                        i += 2;
                } else if (!strcmp(c, "writefile")) {
                        FILE *f = fopen(argv[i + 1], "rb");
                        uint64_t off = num(argv[i + 2]);
                        static uint8_t b[1 << 20];
                        size_t n;
                        if (!f)
                                return perror(argv[i + 1]), 1;
                        while (r >= 0 && (n = fread(b, 1, sizeof b, f)) > 0) {
                                r = dc_image_write(img, b, off, n);
                                off += n;
                        }
                        fclose(f);
                        i += 3;
                } else {
                        fprintf(stderr, "unknown io command %s\n", c);
                        return 2;
                }
        }
        if (r >= 0)
                r = dc_image_flush(img);
        if (r < 0) {
                fail("io");
                dc_image_close(img);
                return 1;
        }
        dc_image_close(img);
        return 0;
}

static int do_read(int argc, char **argv) {
        struct dc_open_options o = { .roots = roots[0] ? roots : NULL };
        dc_image *img;
        static uint8_t b[4 << 20];
        FILE *f;

        if (dc_image_open(argv[2], &o, &img) < 0)
                return fail("open");
        f = fopen(argv[3], "wb");
        for (uint64_t off = 0; off < dc_image_virtual_size(img); off += sizeof b) {
                size_t n = (size_t) (dc_image_virtual_size(img) - off < sizeof b ? dc_image_virtual_size(img) - off : sizeof b);
                if (dc_image_read(img, b, off, n) < 0)
                        return fail("read");
                fwrite(b, 1, n, f);
        }
        fclose(f);
        dc_image_close(img);
        return 0;
}

static int print_extent(const struct dc_extent *e, void *userdata) {
        int *first = userdata;
        printf("%s{ \"start\": %" PRIu64 ", \"length\": %" PRIu64 ", \"depth\": %u, \"present\": %s, \"zero\": %s, \"data\": %s",
               *first ? "[" : ",\n", e->start, e->length, e->depth, e->present ? "true" : "false",
               e->zero ? "true" : "false", e->data ? "true" : "false");
        if (e->host_offset >= 0)
                printf(", \"offset\": %" PRId64, e->host_offset);
        printf("}");
        *first = 0;
        return 0;
}

static int do_map(int argc, char **argv) {
        struct dc_open_options o = { .roots = roots[0] ? roots : NULL };
        dc_image *img;
        int first = 1;

        if (dc_image_open(argv[2], &o, &img) < 0)
                return fail("open");
        if (dc_image_map(img, 0, dc_image_virtual_size(img), print_extent, &first) < 0)
                return fail("map");
        printf(first ? "[]\n" : "]\n");
        dc_image_close(img);
        return 0;
}

static int do_check(int argc, char **argv) {
        int repair = argc > 3 ? (!strcmp(argv[3], "all") ? DC_REPAIR_ALL : DC_REPAIR_LEAKS) : DC_REPAIR_NONE;
        struct dc_open_options o = { .roots = roots[0] ? roots : NULL, .writable = repair != DC_REPAIR_NONE,
                                     .check_mode = true, .no_backing = true };
        struct dc_check_result c;
        dc_image *img;

        if (dc_image_open(argv[2], &o, &img) < 0)
                return fail("open");
        if (dc_image_check(img, repair, &c) < 0)
                return fail("check");
        printf("{\"check-errors\": %" PRIu64 ", \"corruptions\": %" PRIu64 ", \"leaks\": %" PRIu64
               ", \"corruptions-fixed\": %" PRIu64 ", \"leaks-fixed\": %" PRIu64 ", \"image-end-offset\": %" PRIu64
               ", \"total-clusters\": %" PRIu64 ", \"allocated-clusters\": %" PRIu64
               ", \"fragmented-clusters\": %" PRIu64 ", \"compressed-clusters\": %" PRIu64 "}\n",
               c.check_errors, c.corruptions, c.leaks, c.corruptions_fixed, c.leaks_fixed, c.image_end_offset,
               c.total_clusters, c.allocated_clusters, c.fragmented_clusters, c.compressed_clusters);
        dc_image_close(img);
        return c.corruptions ? 2 : c.leaks ? 3 : 0;
}

static int do_info(int argc, char **argv) {
        struct dc_open_options o = { .roots = roots[0] ? roots : NULL,
                                     .max_depth = getenv("DC_MAX_DEPTH") ? (unsigned) atoi(getenv("DC_MAX_DEPTH")) : 0 };
        dc_image *img;

        if (dc_image_open(argv[2], &o, &img) < 0)
                return fail("open");
        for (dc_image *l = img; l; l = dc_image_backing(l))
                printf("%s format=%s size=%" PRIu64 " cluster=%u backing=%s backing-format=%s ro=%s\n", dc_image_path(l),
                       dc_format_name(dc_image_format(l)), dc_image_virtual_size(l), dc_image_cluster_size(l),
                       dc_image_backing_file(l), dc_image_backing_format(l), dc_image_read_only_reason(l));
        dc_image_close(img);
        return 0;
}

static int print_dirty(void *userdata, uint64_t off, uint64_t len) {
        (void) userdata;
        printf("%" PRIu64 " %" PRIu64 "\n", off, len);
        return 0;
}

static int do_bitmaps(int argc, char **argv) {
        struct dc_open_options o = { .roots = roots[0] ? roots : NULL, .no_backing = true };
        struct dc_bitmap_info *v;
        dc_image *img;
        size_t n;
        int r;

        if (dc_image_open(argv[2], &o, &img) < 0)
                return fail("open");
        if (argc > 3)
                r = dc_image_bitmap_extents(img, argv[3], print_dirty, NULL);
        else {
                r = dc_image_bitmaps(img, &v, &n);
                for (size_t i = 0; r >= 0 && i < n; i++)
                        printf("%s %u %d %d %" PRIu64 "\n", v[i].name, v[i].granularity, v[i].in_use, v[i].enabled,
                               v[i].dirty);
                if (r >= 0)
                        dc_bitmap_info_free(v, n);
        }
        dc_image_close(img);
        return r < 0 ? fail("bitmaps") : 0;
}

/* dc-tool bitmap add|remove|clear|enable|disable|merge PATH NAME [GRANULARITY|disabled|SOURCE...] */
static int do_bitmap(int argc, char **argv) {
        struct dc_open_options o = { .roots = roots[0] ? roots : NULL, .no_backing = true, .writable = true };
        const char *op = argv[2], *name = argv[4];
        dc_image *img;
        int r;

        if (argc < 5)
                return fprintf(stderr, "usage: dc-tool bitmap OP PATH NAME ...\n"), 2;
        if (dc_image_open(argv[3], &o, &img) < 0)
                return fail("open");
        if (strcmp(op, "add") == 0) {
                bool disabled = false;
                uint32_t gran = 0;
                for (int i = 5; i < argc; i++)
                        if (strcmp(argv[i], "disabled") == 0)
                                disabled = true;
                        else
                                gran = (uint32_t) strtoul(argv[i], NULL, 0);
                r = dc_image_bitmap_add(img, name, gran, disabled ? DC_BITMAP_DISABLED : 0);
        } else if (strcmp(op, "remove") == 0)
                r = dc_image_bitmap_remove(img, name);
        else if (strcmp(op, "clear") == 0)
                r = dc_image_bitmap_clear(img, name);
        else if (strcmp(op, "enable") == 0 || strcmp(op, "disable") == 0)
                r = dc_image_bitmap_set_enabled(img, name, strcmp(op, "enable") == 0);
        else if (strcmp(op, "merge") == 0)
                r = dc_image_bitmap_merge(img, name, (const char *const *) argv + 5, (size_t) (argc - 5));
        else {
                dc_image_close(img);
                return fprintf(stderr, "unknown bitmap operation %s\n", op), 2;
        }
        dc_image_close(img);
        return r < 0 ? fail(op) : 0;
}

static void no_notify(void *u) {
        (void) u;
}

/* dc-tool job stream TOP [BASE] | job commit OVERLAY TOP BASE: run to the end,
 * printing every event as a line; exit 0 only on success. */
static int do_job(int argc, char **argv) {
        struct dc_open_options o = { .roots = roots[0] ? roots : NULL };
        /* a tool run by its user on their own files: the URI may name TLS credential files */
        struct dc_nbd_client_options nbd = { .allow_uri_files = true };
        struct dc_job_options jo = { .id = "job0", .auto_finalize = true, .auto_dismiss = true, .notify = no_notify,
                                     .nbd = &nbd };
        struct dc_job_event ev;
        dc_job *j = NULL;
        int r, ok = 0, done = 0;

        if (getenv("DC_JOB_SPEED"))
                jo.speed = strtoull(getenv("DC_JOB_SPEED"), NULL, 0);
        if (getenv("DC_NBD_STALL_MS"))
                nbd.stall_ms = (unsigned) strtoul(getenv("DC_NBD_STALL_MS"), NULL, 0);
        if (!strcmp(argv[2], "stream"))
                r = dc_job_stream(argv[3], argc > 4 ? argv[4] : NULL, NULL, &o, &jo, &j);
        else if (!strcmp(argv[2], "backup") && argc > 5) {
                struct dc_backup_options bo = { .sync = !strcmp(argv[5], "top") ? DC_SYNC_TOP
                                                         : !strcmp(argv[5], "none") ? DC_SYNC_NONE
                                                                                    : DC_SYNC_FULL,
                                                .compress = argc > 6 && !strcmp(argv[6], "compress") };
                r = dc_job_backup(argv[3], argv[4], &bo, &o, &jo, &j);
        } else if (!strcmp(argv[2], "commit") && argc > 5)
                r = dc_job_commit(argv[3], argv[4], argv[5], NULL, &o, &jo, &j);
        else
                return fprintf(stderr, "bad job command\n"), 2;
        if (r < 0)
                return fail("job");
        while (!done) {
                while (dc_job_next_event(j, &ev) > 0) {
                        if (ev.kind == DC_EV_STATUS) {
                                printf("status %s\n", dc_job_status_name(ev.status));
                                if (ev.status == DC_JOB_NULL)
                                        done = 1;
                        } else if (ev.kind == DC_EV_COMPLETED) {
                                printf("completed %s\n", ev.error[0] ? ev.error : "ok");
                                ok = !ev.error[0];
                        } else if (ev.kind == DC_EV_CANCELLED)
                                printf("cancelled\n");
                        else if (ev.kind == DC_EV_ERROR)
                                printf("error %s %s\n", ev.operation, ev.action);
                }
                usleep(10000);
        }
        dc_job_free(j);
        return ok ? 0 : 1;
}

int main(int argc, char **argv) {
        const char *f = getenv("DC_FAULT_WRITES");
        roots[0] = getenv("DC_ROOT");
        if (f)
                dc_fault_writes_left = atol(f);
        if (argc < 3)
                return fprintf(stderr, "usage: see the comment in tests/dc-tool.c\n"), 2;
        if (!strcmp(argv[1], "create") && argc >= 4)
                return do_create(argc, argv);
        if (!strcmp(argv[1], "io"))
                return do_io(argc, argv);
        if (!strcmp(argv[1], "read") && argc >= 4)
                return do_read(argc, argv);
        if (!strcmp(argv[1], "map"))
                return do_map(argc, argv);
        if (!strcmp(argv[1], "check"))
                return do_check(argc, argv);
        if (!strcmp(argv[1], "job") && argc >= 4)
                return do_job(argc, argv);
        if (!strcmp(argv[1], "info"))
                return do_info(argc, argv);
        if (!strcmp(argv[1], "bitmaps"))
                return do_bitmaps(argc, argv);
        if (!strcmp(argv[1], "bitmap"))
                return do_bitmap(argc, argv);
        return fprintf(stderr, "unknown command %s\n", argv[1]), 2;
}
