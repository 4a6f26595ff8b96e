/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * diskchainctl: the command-line client of diskchaind (see diskchainctl(1)).
 * Talks to the system bus, allows interactive polkit authentication, and
 * exits non-zero with the D-Bus error's message when a call fails.
 */

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <systemd/sd-bus.h>
#include <time.h>
#include <unistd.h>

#define BUS_NAME "org.diskchain.DiskChain1"
#define MANAGER_PATH "/org/diskchain/DiskChain1"
#define IFACE(x) BUS_NAME "." x
#define LONG_CALL (24ULL * 3600 * 1000000)

static bool arg_json;
static const char *arg_repair;
static sd_bus *bus;

static int fail(const char *what, const sd_bus_error *e, int r) {
        fprintf(stderr, "diskchainctl: %s: %s\n", what, e && e->message ? e->message : strerror(-r));
        return 1;
}

static int call(const char *path, const char *iface, const char *method, sd_bus_message **reply,
                sd_bus_error *e, const char *types, ...) {
        sd_bus_message *m = NULL;
        va_list ap;
        int r;

        r = sd_bus_message_new_method_call(bus, &m, BUS_NAME, path, iface, method);
        if (r < 0)
                return r;
        va_start(ap, types);
        r = types ? sd_bus_message_appendv(m, types, ap) : 0;
        va_end(ap);
        if (r >= 0)
                r = sd_bus_call(bus, m, LONG_CALL, e, reply);
        sd_bus_message_unref(m);
        return r;
}

static int get_prop(const char *path, const char *iface, const char *prop, char type, void *ret) {
        sd_bus_error e = SD_BUS_ERROR_NULL;
        char sig[2] = { type, 0 };
        int r = sd_bus_get_property_trivial(bus, BUS_NAME, path, iface, prop, &e, type, ret);
        (void) sig;
        sd_bus_error_free(&e);
        return r;
}

static char *get_string(const char *path, const char *iface, const char *prop) {
        sd_bus_error e = SD_BUS_ERROR_NULL;
        char *s = NULL;
        (void) sd_bus_get_property_string(bus, BUS_NAME, path, iface, prop, &e, &s);
        sd_bus_error_free(&e);
        return s ? s : strdup("");
}

/* --- human units ------------------------------------------------------------ */

#define HUMAN_MAX 32

/* Sizes as qemu-img prints them: three significant digits, binary units ("8 MiB", "1.5 GiB", "512 B"). */
static const char *format_bytes(char buf[static HUMAN_MAX], uint64_t v) {
        static const char *const units[] = { "B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB" };
        double d = (double) v;
        unsigned i = 0;

        /* 999.5 and more would round to four digits: the next unit then */
        while (d >= 999.5 && i < sizeof units / sizeof units[0] - 1) {
                d /= 1024.0;
                i++;
        }
        snprintf(buf, HUMAN_MAX, "%.3g %s", d, units[i]);
        return buf;
}

/* A duration: "0.4s", "42s", "1m 20s", "2h 05m", "3d 04h". */
static const char *format_duration(char buf[static HUMAN_MAX], uint64_t usec) {
        uint64_t s = (usec + 500000) / 1000000;

        if (usec < 9950000)
                snprintf(buf, HUMAN_MAX, "%.1fs", (double) usec / 1e6);
        else if (s < 60)
                snprintf(buf, HUMAN_MAX, "%" PRIu64 "s", s);
        else if (s < 3600)
                snprintf(buf, HUMAN_MAX, "%" PRIu64 "m %02" PRIu64 "s", s / 60, s % 60);
        else if (s < 86400)
                snprintf(buf, HUMAN_MAX, "%" PRIu64 "h %02" PRIu64 "m", s / 3600, s % 3600 / 60);
        else
                snprintf(buf, HUMAN_MAX, "%" PRIu64 "d %02" PRIu64 "h", s / 86400, s % 86400 / 3600);
        return buf;
}

/* A Job's Rate: "3.81 MiB/s", "--" while it is unknown (0). */
static const char *format_rate(char buf[static HUMAN_MAX], uint64_t rate) {
        if (!rate)
                return strcpy(buf, "--");
        format_bytes(buf, rate); /* ten characters at most, "0.977 KiB" */
        return strcat(buf, "/s");
}

/* The time until a Job's ExpectedEndTime (µs since the epoch): "1m 20s", "--" when unknown (0). */
static const char *format_left(char buf[static HUMAN_MAX], uint64_t end) {
        struct timeval tv;
        uint64_t now;

        if (!end)
                return strcpy(buf, "--");
        gettimeofday(&tv, NULL);
        now = (uint64_t) tv.tv_sec * 1000000u + (uint64_t) tv.tv_usec;
        return format_duration(buf, end > now ? end - now : 0);
}

static int read_paths(sd_bus_message *reply, char ***ret) {
        char **v = NULL;
        size_t n = 0;
        const char *p;
        int r = sd_bus_message_enter_container(reply, 'a', "o");
        if (r < 0)
                return r;
        while ((r = sd_bus_message_read(reply, "o", &p)) > 0) {
                v = realloc(v, (n + 2) * sizeof *v);
                v[n++] = strdup(p);
                v[n] = NULL;
        }
        if (!v)
                v = calloc(1, sizeof *v);
        *ret = v;
        return r;
}

static void strv_free(char **v) {
        for (char **p = v; p && *p; p++)
                free(*p);
        free(v);
}

/* IMAGE_CREATED, _SNAPSHOT, _CLASSIFIED: a line saying what a call made of the image */
enum { IMAGE_ROW, IMAGE_LONG, IMAGE_CREATED, IMAGE_SNAPSHOT, IMAGE_CLASSIFIED };

/* S as a JSON string. */
static void print_json_string(const char *s) {
        putchar('"');
        for (; *s; s++) {
                unsigned char c = (unsigned char) *s;

                if (c == '"' || c == '\\')
                        printf("\\%c", c);
                else if (c < 0x20)
                        printf("\\u%04x", c);
                else
                        putchar(c);
        }
        putchar('"');
}

/* The image's persistent bitmaps: a "bitmaps" list in JSON, else a line each after "bitmaps:". */
static void print_bitmaps(const char *obj) {
        sd_bus_error e = SD_BUS_ERROR_NULL;
        sd_bus_message *reply = NULL;
        const char *name;
        uint32_t gran;
        uint64_t dirty;
        int rec, busy, persistent, inconsistent, n = 0;
        char h1[HUMAN_MAX], h2[HUMAN_MAX];

        if (sd_bus_get_property(bus, BUS_NAME, obj, IFACE("Image"), "Bitmaps", &e, &reply, "a(sutbbbb)") < 0 ||
            sd_bus_message_enter_container(reply, 'a', "(sutbbbb)") < 0)
                goto out;
        printf(arg_json ? ", \"bitmaps\": [" : "bitmaps:");
        while (sd_bus_message_read(reply, "(sutbbbb)", &name, &gran, &dirty, &rec, &busy, &persistent, &inconsistent) > 0) {
                if (arg_json) {
                        printf("%s{\"name\": ", n ? ", " : "");
                        print_json_string(name);
                        printf(", \"granularity\": %u, \"dirty\": %" PRIu64 ", \"recording\": %s, \"busy\": %s, "
                               "\"persistent\": %s, \"inconsistent\": %s}",
                               gran, dirty, rec ? "true" : "false", busy ? "true" : "false",
                               persistent ? "true" : "false", inconsistent ? "true" : "false");
                } else {
                        /* a name is bytes from the image file: no control characters reach the terminal */
                        printf("\n  ");
                        for (const char *c = name; *c; c++)
                                putchar((unsigned char) *c < 0x20 || *c == 0x7f ? '?' : *c);
                        if (inconsistent)
                                printf(": granularity %s, inconsistent (left in use by a writer: the next backup "
                                       "must be full)", format_bytes(h1, gran));
                        else
                                printf(": granularity %s, %s dirty%s, %s%s%s", format_bytes(h1, gran),
                                       format_bytes(h2, dirty), busy ? " or more" : "", rec ? "recording" : "disabled",
                                       busy ? ", busy (diskchain is writing the image)" : "",
                                       persistent ? "" : ", transient (gone when the export stops)");
                }
                n++;
        }
        printf(arg_json ? "]" : n ? "\n" : " (none)\n");
out:
        sd_bus_error_free(&e);
        sd_bus_message_unref(reply);
}

static int print_image(const char *obj, int form) {
        char *path = get_string(obj, IFACE("Image"), "Path"), *fmt = get_string(obj, IFACE("Image"), "Format");
        char *bf = get_string(obj, IFACE("Image"), "BackingFile");
        char *bfmt = get_string(obj, IFACE("Image"), "BackingFormat");
        char *compat = get_string(obj, IFACE("Image"), "Compat");
        char h1[HUMAN_MAX], h2[HUMAN_MAX], h3[HUMAN_MAX];
        uint64_t vs = 0, as = 0;
        uint32_t cs = 0;
        int dirty = 0, corrupt = 0, ro = 0;

        get_prop(obj, IFACE("Image"), "VirtualSize", 't', &vs);
        get_prop(obj, IFACE("Image"), "ActualSize", 't', &as);
        get_prop(obj, IFACE("Image"), "ClusterSize", 'u', &cs);
        get_prop(obj, IFACE("Image"), "Dirty", 'b', &dirty);
        get_prop(obj, IFACE("Image"), "Corrupt", 'b', &corrupt);
        get_prop(obj, IFACE("Image"), "ReadOnly", 'b', &ro);
        if (arg_json) {
                printf("{\"path\": \"%s\", \"format\": \"%s\", \"virtual-size\": %" PRIu64 ", \"actual-size\": %" PRIu64
                       ", \"cluster-size\": %u, \"compat\": \"%s\", \"backing-filename\": \"%s\", \"dirty\": %s, "
                       "\"corrupt\": %s, \"read-only\": %s, \"object\": \"%s\"",
                       path, fmt, vs, as, cs, compat, bf, dirty ? "true" : "false", corrupt ? "true" : "false",
                       ro ? "true" : "false", obj);
                if (form == IMAGE_LONG)
                        print_bitmaps(obj);
                printf("}\n");
        } else if (form == IMAGE_LONG) {
                printf("image: %s\nformat: %s\nvirtual size: %s (%" PRIu64 " bytes)\ndisk size: %s (%" PRIu64
                       " bytes)\ncluster size: %s\ncompat: %s\nbacking file: %s\ndirty: %s\ncorrupt: %s\n"
                       "read-only: %s\nobject: %s\n",
                       path, fmt, format_bytes(h1, vs), vs, format_bytes(h2, as), as,
                       cs ? format_bytes(h3, cs) : "(none)", compat, *bf ? bf : "(none)",
                       dirty ? "yes" : "no", corrupt ? "yes" : "no", ro ? "yes" : "no", obj);
                print_bitmaps(obj);
        } else if (form >= IMAGE_CREATED) {
                /* what the call made, in the words of the options that made it */
                printf("%s %s: %s, %s (%" PRIu64 " bytes)",
                       form == IMAGE_SNAPSHOT ? "new active layer" : form == IMAGE_CLASSIFIED ? "recorded" : "created",
                       path, fmt, format_bytes(h1, vs), vs);
                if (cs)
                        printf(", cluster size %s", format_bytes(h2, cs));
                if (*bf)
                        printf(", backing file %s%s%s%s", bf, *bfmt ? " (" : "", bfmt, *bfmt ? ")" : "");
                printf("\n");
        } else
                printf("%-6s %12s  %s%s%s\n", fmt, format_bytes(h1, vs), path, *bf ? "  <- " : "", bf);
        free(path);
        free(fmt);
        free(bf);
        free(bfmt);
        free(compat);
        return 0;
}

static int cmd_images(void) {
        sd_bus_error e = SD_BUS_ERROR_NULL;
        sd_bus_message *reply = NULL;
        char **v = NULL;
        int r = call(MANAGER_PATH, IFACE("Manager"), "ListImages", &reply, &e, NULL);
        if (r < 0)
                return fail("ListImages", &e, r);
        read_paths(reply, &v);
        if (!arg_json)
                printf("%-6s %12s  %s\n", "FORMAT", "VIRTUAL-SIZE", "PATH");
        for (char **p = v; *p; p++)
                print_image(*p, IMAGE_ROW);
        strv_free(v);
        sd_bus_message_unref(reply);
        return 0;
}

static int cmd_chains(void) {
        sd_bus_error e = SD_BUS_ERROR_NULL;
        sd_bus_message *reply = NULL;
        char **v = NULL;
        int r = call(MANAGER_PATH, IFACE("Manager"), "ListChains", &reply, &e, NULL);
        if (r < 0)
                return fail("ListChains", &e, r);
        read_paths(reply, &v);
        for (char **c = v; *c; c++) {
                sd_bus_message *lr = NULL;
                char **layers = NULL;
                r = sd_bus_get_property(bus, BUS_NAME, *c, IFACE("Chain"), "Layers", &e, &lr, "ao");
                if (r < 0)
                        return fail("Layers", &e, r);
                read_paths(lr, &layers);
                if (arg_json)
                        printf("{\"chain\": \"%s\", \"layers\": [", *c);
                for (char **l = layers; *l; l++) {
                        char *p = get_string(*l, IFACE("Image"), "Path");
                        if (arg_json)
                                printf("%s\"%s\"", l == layers ? "" : ", ", p);
                        else
                                printf("%s%s", l == layers ? "" : " <- ", p);
                        free(p);
                }
                printf(arg_json ? "]}\n" : "\n");
                strv_free(layers);
                sd_bus_message_unref(lr);
        }
        strv_free(v);
        sd_bus_message_unref(reply);
        return 0;
}

/* Ask the Manager for an object by path or id (GetImage, GetChain, GetJob);
 * on failure print the daemon's message. */
static int manager_lookup(const char *method, const char *arg, char **ret) {
        sd_bus_error e = SD_BUS_ERROR_NULL;
        sd_bus_message *reply = NULL;
        const char *o;
        int r = call(MANAGER_PATH, IFACE("Manager"), method, &reply, &e, "s", arg);
        if (r < 0) {
                fail(method, &e, r);
                sd_bus_error_free(&e);
                return r;
        }
        sd_bus_message_read(reply, "o", &o);
        *ret = strdup(o);
        sd_bus_message_unref(reply);
        return 0;
}

static int get_image(const char *path, char **ret) {
        return manager_lookup("GetImage", path, ret);
}

static int get_chain(const char *path, char **ret) {
        return manager_lookup("GetChain", path, ret);
}

static int get_job(const char *id, char **ret) {
        return manager_lookup("GetJob", id, ret);
}

static int cmd_info(const char *path) {
        char *o;
        if (get_image(path, &o) < 0)
                return 1;
        print_image(o, IMAGE_LONG);
        free(o);
        return 0;
}

static uint64_t parse_size(const char *s, bool *ok) {
        char *end;
        double v = strtod(s, &end);
        uint64_t mul = 1;
        switch (*end) {
        case 'k': case 'K': mul = 1ULL << 10; end++; break;
        case 'm': case 'M': mul = 1ULL << 20; end++; break;
        case 'g': case 'G': mul = 1ULL << 30; end++; break;
        case 't': case 'T': mul = 1ULL << 40; end++; break;
        default: break;
        }
        *ok = *end == 0 && v >= 0 && end != s;
        return (uint64_t) (v * (double) mul);
}

static int cmd_create(int argc, char **argv) {
        static const struct option opts[] = {
                { "backing", required_argument, NULL, 'b' },   { "backing-format", required_argument, NULL, 'F' },
                { "format", required_argument, NULL, 'f' },    { "cluster-size", required_argument, NULL, 'c' },
                { "compat", required_argument, NULL, 'C' },    { "compression-type", required_argument, NULL, 'z' },
                { "preallocation", required_argument, NULL, 'p' }, { "lazy-refcounts", no_argument, NULL, 'l' },
                { "refcount-bits", required_argument, NULL, 'r' }, {},
        };
        sd_bus_error e = SD_BUS_ERROR_NULL;
        sd_bus_message *m = NULL, *reply = NULL;
        const char *o;
        bool ok;
        uint64_t size;
        int c, r;

        r = sd_bus_message_new_method_call(bus, &m, BUS_NAME, MANAGER_PATH, IFACE("Manager"), "CreateImage");
        if (r < 0)
                return fail("CreateImage", NULL, r);
        optind = 1;
        if (argc < 3) {
                fprintf(stderr, "diskchainctl: create PATH SIZE [OPTIONS]\n");
                return 2;
        }
        size = parse_size(argv[2], &ok);
        if (!ok) {
                fprintf(stderr, "diskchainctl: invalid size '%s'\n", argv[2]);
                return 2;
        }
        sd_bus_message_append(m, "st", argv[1], size);
        sd_bus_message_open_container(m, 'a', "{sv}");
        while ((c = getopt_long(argc - 2, argv + 2, "", opts, NULL)) >= 0) {
                const char *key = NULL;
                switch (c) {
                case 'b': key = "backing"; break;
                case 'F': key = "backing-format"; break;
                case 'f': key = "format"; break;
                case 'C': key = "compat"; break;
                case 'z': key = "compression-type"; break;
                case 'p': key = "preallocation"; break;
                case 'l':
                        sd_bus_message_append(m, "{sv}", "lazy-refcounts", "b", 1);
                        continue;
                case 'c':
                case 'r': {
                        uint64_t v = parse_size(optarg, &ok);
                        if (!ok || v > UINT32_MAX) {
                                fprintf(stderr, "diskchainctl: invalid number '%s'\n", optarg);
                                return 2;
                        }
                        sd_bus_message_append(m, "{sv}", c == 'c' ? "cluster-size" : "refcount-bits", "u", (uint32_t) v);
                        continue;
                }
                default:
                        return 2;
                }
                sd_bus_message_append(m, "{sv}", key, "s", optarg);
        }
        sd_bus_message_close_container(m);
        r = sd_bus_call(bus, m, LONG_CALL, &e, &reply);
        sd_bus_message_unref(m);
        if (r < 0)
                return fail("CreateImage", &e, r);
        if (sd_bus_message_read(reply, "o", &o) >= 0)
                print_image(o, arg_json ? IMAGE_LONG : IMAGE_CREATED);
        sd_bus_message_unref(reply);
        return 0;
}

static int cmd_check(const char *path) {
        sd_bus_error e = SD_BUS_ERROR_NULL;
        sd_bus_message *reply = NULL;
        uint64_t corruptions = 0, leaks = 0, errors = 0;
        char *o;
        int r;

        if (get_image(path, &o) < 0)
                return 1;
        if (arg_repair)
                r = call(o, IFACE("Image"), "Check", &reply, &e, "a{sv}", 1, "repair", "s", arg_repair);
        else
                r = call(o, IFACE("Image"), "Check", &reply, &e, "a{sv}", 0);
        free(o);
        if (r < 0)
                return fail("Check", &e, r);
        sd_bus_message_enter_container(reply, 'a', "{sv}");
        if (arg_json)
                printf("{");
        for (int i = 0; sd_bus_message_enter_container(reply, 'e', "sv") > 0; i++) {
                const char *k;
                uint64_t v;
                sd_bus_message_read(reply, "s", &k);
                sd_bus_message_read(reply, "v", "t", &v);
                sd_bus_message_exit_container(reply);
                if (strcmp(k, "corruptions") == 0)
                        corruptions = v;
                else if (strcmp(k, "leaks") == 0)
                        leaks = v;
                else if (strcmp(k, "check-errors") == 0)
                        errors = v;
                if (arg_json)
                        printf("%s\"%s\": %" PRIu64, i ? ", " : "", k, v);
                else
                        printf("%s: %" PRIu64 "\n", k, v);
        }
        if (arg_json)
                printf("}\n");
        sd_bus_message_unref(reply);
        /* exit codes as qemu-img check: 0 clean, 1 errors, 2 corrupt, 3 leaks */
        return errors ? 1 : corruptions ? 2 : leaks ? 3 : 0;
}

static int cmd_map(const char *path) {
        uint64_t pos = 0, size = 0;
        int first = 1;
        char *o;

        if (get_image(path, &o) < 0)
                return 1;
        if (get_prop(o, IFACE("Image"), "VirtualSize", 't', &size) < 0) {
                free(o);
                return fail("VirtualSize", NULL, -EIO);
        }
        /* the daemon answers a bounded number of extents per call: ask on from where each reply ends */
        while (pos < size) {
                sd_bus_error e = SD_BUS_ERROR_NULL;
                sd_bus_message *reply = NULL;
                uint64_t start, length, end = pos;
                uint32_t depth;
                int present, zero, data, compressed;
                int64_t off;
                int r = call(o, IFACE("Image"), "Map", &reply, &e, "tta{sv}", pos, (uint64_t) 0, 0);
                if (r < 0) {
                        free(o);
                        return fail("Map", &e, r);
                }
                sd_bus_message_enter_container(reply, 'a', "(ttubbbbx)");
                while (sd_bus_message_read(reply, "(ttubbbbx)", &start, &length, &depth, &present, &zero, &data,
                                           &compressed, &off) > 0) {
                        printf("%s{ \"start\": %" PRIu64 ", \"length\": %" PRIu64 ", \"depth\": %u, \"present\": %s, "
                               "\"zero\": %s, \"data\": %s, \"compressed\": %s",
                               first ? "[" : ",\n", start, length, depth, present ? "true" : "false",
                               zero ? "true" : "false", data ? "true" : "false", compressed ? "true" : "false");
                        if (off >= 0)
                                printf(", \"offset\": %" PRId64, off);
                        printf("}");
                        first = 0;
                        end = start + length;
                }
                sd_bus_message_unref(reply);
                if (end <= pos)
                        break; /* nothing more (the image shrank meanwhile?) */
                pos = end;
        }
        free(o);
        printf(first ? "[]\n" : "]\n");
        return 0;
}

static int cmd_classify(const char *path, const char *format) {
        sd_bus_error e = SD_BUS_ERROR_NULL;
        sd_bus_message *reply = NULL;
        const char *o;
        int r = call(MANAGER_PATH, IFACE("Manager"), "ClassifyImage", &reply, &e, "ssa{sv}", path, format, 0);
        if (r < 0)
                return fail("ClassifyImage", &e, r);
        if (sd_bus_message_read(reply, "o", &o) >= 0)
                print_image(o, arg_json ? IMAGE_LONG : IMAGE_CLASSIFIED);
        sd_bus_message_unref(reply);
        return 0;
}

/* --- block jobs -------------------------------------------------------------- */

enum { READY_STOP, READY_COMPLETE, READY_COPY };

/* A job's progress as its properties hold it: one GetAll, then their PropertiesChanged. */
struct job_view {
        char status[32];
        uint64_t cur, total, speed, rate, start, end; /* end: ExpectedEndTime */
};

struct waiter {
        const char *job;      /* object path followed */
        char *id;
        sd_bus_slot *slots[2];
        bool done, ok, concluded_kept, ready, acted;
        int on_ready;         /* READY_*: what to do when a mirror or active commit is ready */
        struct job_view view; /* the daemon announces the final numbers before the outcome */
        char error[512];
};

/* The Job properties a view holds, from an a{sv}; the others are skipped. */
static int read_job_view(sd_bus_message *m, struct job_view *v) {
        static const struct {
                const char *name;
                size_t offset;
        } numbers[] = {
                { "CurrentProgress", offsetof(struct job_view, cur) },
                { "TotalProgress", offsetof(struct job_view, total) },
                { "Speed", offsetof(struct job_view, speed) },
                { "Rate", offsetof(struct job_view, rate) },
                { "StartTime", offsetof(struct job_view, start) },
                { "ExpectedEndTime", offsetof(struct job_view, end) },
        };
        int r = sd_bus_message_enter_container(m, 'a', "{sv}");

        while (r >= 0 && (r = sd_bus_message_enter_container(m, 'e', "sv")) > 0) {
                const char *name, *status;
                bool known = false;

                r = sd_bus_message_read(m, "s", &name);
                if (r >= 0 && strcmp(name, "Status") == 0) {
                        known = true;
                        r = sd_bus_message_read(m, "v", "s", &status);
                        if (r >= 0)
                                snprintf(v->status, sizeof v->status, "%s", status);
                }
                for (size_t i = 0; r >= 0 && !known && i < sizeof numbers / sizeof numbers[0]; i++)
                        if (strcmp(name, numbers[i].name) == 0) {
                                known = true;
                                r = sd_bus_message_read(m, "v", "t",
                                                        (uint64_t *) ((char *) v + numbers[i].offset));
                        }
                if (r >= 0 && !known)
                        r = sd_bus_message_skip(m, "v");
                if (r >= 0)
                        r = sd_bus_message_exit_container(m);
        }
        if (r >= 0)
                r = sd_bus_message_exit_container(m);
        return r;
}

static int get_job_view(const char *job, struct job_view *v) {
        sd_bus_error e = SD_BUS_ERROR_NULL;
        sd_bus_message *reply = NULL;
        int r = sd_bus_call_method(bus, BUS_NAME, job, "org.freedesktop.DBus.Properties", "GetAll", &e,
                                   &reply, "s", IFACE("Job"));
        if (r >= 0)
                r = read_job_view(reply, v);
        sd_bus_message_unref(reply);
        sd_bus_error_free(&e);
        return r;
}

/* "8 MiB in 2.1s (3.81 MiB/s)" from an ended job's properties: Rate is then its
 * average, ExpectedEndTime when it ended; empty when they are not known. */
static const char *job_summary(char buf[static 128], const struct job_view *v) {
        char b[HUMAN_MAX], t[HUMAN_MAX], r[HUMAN_MAX];

        if (v->start && v->end >= v->start)
                snprintf(buf, 128, "%s in %s (%s/s)", format_bytes(b, v->cur),
                         format_duration(t, v->end - v->start), format_bytes(r, v->rate));
        else
                snprintf(buf, 128, "%s", format_bytes(b, v->cur));
        return buf;
}

static int on_job_signal(sd_bus_message *m, void *userdata, sd_bus_error *ret_error) {
        struct waiter *w = userdata;
        const char *member = sd_bus_message_get_member(m);

        if (!w->job || strcmp(sd_bus_message_get_path(m), w->job) != 0)
                return 0;
        if (strcmp(member, "BlockJobCompleted") == 0) {
                const char *type, *dev, *err;
                uint64_t len, off, speed;
                if (sd_bus_message_read(m, "ssttts", &type, &dev, &len, &off, &speed, &err) >= 0) {
                        w->ok = !*err;
                        snprintf(w->error, sizeof w->error, "%s", err);
                }
        } else if (strcmp(member, "BlockJobReady") == 0) {
                w->ready = true;
        } else if (strcmp(member, "BlockJobCancelled") == 0) {
                w->ok = false;
                snprintf(w->error, sizeof w->error, "cancelled");
        } else if (strcmp(member, "JobStatusChange") == 0) {
                const char *id, *status;
                if (sd_bus_message_read(m, "ss", &id, &status) >= 0) {
                        if (strcmp(status, "null") == 0)
                                w->done = true;
                        else if (strcmp(status, "concluded") == 0)
                                w->concluded_kept = true;
                }
        }
        return 0;
}

static int on_job_properties(sd_bus_message *m, void *userdata, sd_bus_error *ret_error) {
        struct waiter *w = userdata;
        const char *iface;

        if (!w->job || strcmp(sd_bus_message_get_path(m), w->job) != 0)
                return 0;
        if (sd_bus_message_read(m, "s", &iface) >= 0)
                (void) read_job_view(m, &w->view);
        return 0;
}

/* Before the job is started or looked up, so that none of its signals is missed. */
static int waiter_subscribe(struct waiter *w) {
        int r = sd_bus_add_match(bus, &w->slots[0], "type='signal',interface='" IFACE("Job") "'",
                                 on_job_signal, w);
        if (r >= 0)
                r = sd_bus_add_match(bus, &w->slots[1],
                                     "type='signal',interface='org.freedesktop.DBus.Properties',"
                                     "member='PropertiesChanged',arg0='" IFACE("Job") "'",
                                     on_job_properties, w);
        return r;
}

static void waiter_follow(struct waiter *w, const char *job) {
        w->job = job;
        if (sd_bus_path_decode(job, MANAGER_PATH "/job", &w->id) <= 0)
                w->id = strdup(job);
        (void) get_job_view(job, &w->view);
}

static void waiter_done(struct waiter *w) {
        sd_bus_slot_unref(w->slots[0]);
        sd_bus_slot_unref(w->slots[1]);
        free(w->id);
}

static void clear_line(void) {
        fprintf(stderr, "\r%-79s\r", "");
}

/* The progress line: the job's own Rate and ExpectedEndTime, "--" while they are unknown. */
static void show_progress(const struct waiter *w) {
        const struct job_view *v = &w->view;
        char bar[31], rate[HUMAN_MAX], left[HUMAN_MAX], line[128];
        int pct, width = 30;

        if (!v->total)
                return;
        pct = v->cur >= v->total ? 100 : (int) (v->cur * 100 / v->total);
        for (int i = 0; i < width; i++)
                bar[i] = i < pct * width / 100 ? '#' : '.';
        bar[width] = 0;
        snprintf(line, sizeof line, "%-9s [%s] %3d%%  %10s  %s left", v->status, bar, pct,
                 format_rate(rate, v->rate), format_left(left, v->end));
        fprintf(stderr, "\r%-79s", line);
}

/* Follow JOB until it ends; print the outcome.  Exit status 0 only on success. */
static int wait_job(struct waiter *w) {
        bool tty = isatty(STDERR_FILENO);
        char summary[128];

        for (;;) {
                int r = sd_bus_process(bus, NULL);
                if (r < 0)
                        return fail("bus", NULL, r);
                if (w->done || (w->concluded_kept && (w->ok || w->error[0])))
                        break;
                if (r > 0)
                        continue;
                if (!w->ready && !w->acted) {
                        /* it may have become ready before we subscribed */
                        char *st = get_string(w->job, IFACE("Job"), "Status");
                        w->ready = strcmp(st, "ready") == 0 || strcmp(st, "standby") == 0;
                        free(st);
                }
                if (w->ready && !w->acted) {
                        sd_bus_error e = SD_BUS_ERROR_NULL;
                        w->acted = true;
                        if (tty)
                                clear_line();
                        if (w->on_ready == READY_STOP) {
                                printf("%s: ready (in sync); 'diskchainctl job complete %s' pivots to the "
                                       "new active layer, 'diskchainctl job cancel %s' keeps a point-in-time "
                                       "copy\n",
                                       w->id, w->id, w->id);
                                return 0;
                        }
                        r = w->on_ready == READY_COMPLETE ? call(w->job, IFACE("Job"), "Complete", NULL, &e, NULL)
                                                          : call(w->job, IFACE("Job"), "Cancel", NULL, &e, "b", 0);
                        if (r < 0)
                                return fail(w->on_ready == READY_COMPLETE ? "complete" : "cancel", &e, r);
                        continue;
                }
                if (tty)
                        show_progress(w);
                /* the job may have ended before we subscribed: a concluded
                 * job tells its outcome through its Error property */
                if (!w->done) {
                        char *st = get_string(w->job, IFACE("Job"), "Status");
                        bool gone = !*st, concluded = strcmp(st, "concluded") == 0;
                        free(st);
                        if (concluded && !w->ok && !w->error[0]) {
                                char *err = get_string(w->job, IFACE("Job"), "Error");
                                w->ok = !*err;
                                snprintf(w->error, sizeof w->error, "%s", err);
                                free(err);
                                (void) get_job_view(w->job, &w->view);
                                break;
                        }
                        if (gone && !w->ok && !w->error[0]) {
                                /* its signals were queued during our property
                                 * call, or are about to arrive: read them all */
                                for (int tries = 0; tries < 10 && !w->ok && !w->error[0]; tries++) {
                                        while (sd_bus_process(bus, NULL) > 0)
                                                ;
                                        if (!w->ok && !w->error[0])
                                                sd_bus_wait(bus, 100000);
                                }
                                if (!w->ok && !w->error[0])
                                        snprintf(w->error, sizeof w->error, "the job ended before its outcome was seen");
                                break;
                        }
                }
                sd_bus_wait(bus, 500000);
        }
        if (tty)
                clear_line();
        if (w->ok) {
                printf("%s: completed, %s\n", w->id, job_summary(summary, &w->view));
                return 0;
        }
        fprintf(stderr, "diskchainctl: %s: %s, after %s\n", w->id, w->error, job_summary(summary, &w->view));
        return 1;
}


/* stream|commit CHAIN [options]: start the job, then wait unless --no-wait. */
static int cmd_job_start(const char *method, int argc, char **argv) {
        static const struct option opts[] = {
                { "top", required_argument, NULL, 't' },      { "base", required_argument, NULL, 'b' },
                { "bottom", required_argument, NULL, 'B' },   { "backing-file", required_argument, NULL, 'f' },
                { "speed", required_argument, NULL, 's' },    { "on-error", required_argument, NULL, 'e' },
                { "job-id", required_argument, NULL, 'i' },   { "no-auto-finalize", no_argument, NULL, 'F' },
                { "no-auto-dismiss", no_argument, NULL, 'D' }, { "force-shared-base", no_argument, NULL, 'S' },
                { "no-wait", no_argument, NULL, 'n' },        { "sync", required_argument, NULL, 'y' },
                { "mode", required_argument, NULL, 'm' },     { "format", required_argument, NULL, 'o' },
                { "compress", no_argument, NULL, 'c' },       { "max-workers", required_argument, NULL, 'w' },
                { "max-chunk", required_argument, NULL, 'k' }, { "granularity", required_argument, NULL, 'g' },
                { "buf-size", required_argument, NULL, 'z' }, { "no-unmap", no_argument, NULL, 'U' },
                { "copy-mode", required_argument, NULL, 'M' }, { "complete", no_argument, NULL, 'C' },
                { "copy", no_argument, NULL, 'P' },           { "cache", required_argument, NULL, 'H' },
                { "bitmap", required_argument, NULL, 'a' },   { "bitmap-mode", required_argument, NULL, 'A' },
                { "checkpoint", required_argument, NULL, 'K' },
                {},
        };
        bool backup = strcmp(method, "Backup") == 0 || strcmp(method, "Mirror") == 0;
        sd_bus_error e = SD_BUS_ERROR_NULL;
        sd_bus_message *m = NULL, *reply = NULL;
        struct waiter w = { 0 };
        bool no_wait = false, ok;
        char *chain = NULL;
        const char *job;
        int c, r;

        if (argc < (backup ? 3 : 2)) {
                fprintf(stderr, "diskchainctl: %s CHAIN-ACTIVE-PATH %s[OPTIONS]\n", argv[0], backup ? "TARGET " : "");
                return 2;
        }
        if (get_chain(argv[1], &chain) < 0)
                return 1;
        r = sd_bus_message_new_method_call(bus, &m, BUS_NAME, chain, IFACE("Chain"), method);
        free(chain);
        if (r < 0)
                return fail(method, NULL, r);
        if (backup)
                sd_bus_message_append(m, "s", argv[2]);
        sd_bus_message_open_container(m, 'a', "{sv}");
        optind = 1;
        while ((c = getopt_long(argc - (backup ? 2 : 1), argv + (backup ? 2 : 1), "", opts, NULL)) >= 0) {
                switch (c) {
                case 't': sd_bus_message_append(m, "{sv}", "top", "s", optarg); break;
                case 'b': sd_bus_message_append(m, "{sv}", "base", "s", optarg); break;
                case 'B': sd_bus_message_append(m, "{sv}", "bottom", "s", optarg); break;
                case 'f': sd_bus_message_append(m, "{sv}", "backing-file", "s", optarg); break;
                case 'e': sd_bus_message_append(m, "{sv}", "on-error", "s", optarg); break;
                case 'i': sd_bus_message_append(m, "{sv}", "job-id", "s", optarg); break;
                case 'F': sd_bus_message_append(m, "{sv}", "auto-finalize", "b", 0); break;
                case 'D': sd_bus_message_append(m, "{sv}", "auto-dismiss", "b", 0); break;
                case 'S': sd_bus_message_append(m, "{sv}", "force-shared-base", "b", 1); break;
                case 'n': no_wait = true; break;
                case 'y': sd_bus_message_append(m, "{sv}", "sync", "s", optarg); break;
                case 'm': sd_bus_message_append(m, "{sv}", "mode", "s", optarg); break;
                case 'o': sd_bus_message_append(m, "{sv}", "format", "s", optarg); break;
                case 'c': sd_bus_message_append(m, "{sv}", "compress", "b", 1); break;
                case 'U': sd_bus_message_append(m, "{sv}", "unmap", "b", 0); break;
                case 'M': sd_bus_message_append(m, "{sv}", "copy-mode", "s", optarg); break;
                case 'a': sd_bus_message_append(m, "{sv}", "bitmap", "s", optarg); break;
                case 'A': sd_bus_message_append(m, "{sv}", "bitmap-mode", "s", optarg); break;
                case 'K': sd_bus_message_append(m, "{sv}", "checkpoint", "s", optarg); break;
                case 'H': sd_bus_message_append(m, "{sv}", "cache", "s", optarg); break;
                case 'C': w.on_ready = READY_COMPLETE; break;
                case 'P': w.on_ready = READY_COPY; break;
                case 'g':
                case 'z': {
                        uint64_t v = parse_size(optarg, &ok);
                        if (!ok || (c == 'g' && v > UINT32_MAX))
                                return fprintf(stderr, "diskchainctl: invalid number '%s'\n", optarg), 2;
                        if (c == 'g')
                                sd_bus_message_append(m, "{sv}", "granularity", "u", (uint32_t) v);
                        else
                                sd_bus_message_append(m, "{sv}", "buf-size", "t", v);
                        break;
                }
                case 'w':
                case 'k': {
                        uint64_t v = parse_size(optarg, &ok);
                        if (!ok || (c == 'w' && v > UINT32_MAX))
                                return fprintf(stderr, "diskchainctl: invalid number '%s'\n", optarg), 2;
                        if (c == 'w')
                                sd_bus_message_append(m, "{sv}", "max-workers", "u", (uint32_t) v);
                        else
                                sd_bus_message_append(m, "{sv}", "max-chunk", "t", v);
                        break;
                }
                case 's': {
                        uint64_t v = parse_size(optarg, &ok);
                        if (!ok)
                                return fprintf(stderr, "diskchainctl: invalid speed '%s'\n", optarg), 2;
                        sd_bus_message_append(m, "{sv}", "speed", "t", v);
                        break;
                }
                default:
                        return 2;
                }
        }
        sd_bus_message_close_container(m);
        if (!no_wait && (r = waiter_subscribe(&w)) < 0)
                return fail("subscribe", NULL, r);
        r = sd_bus_call(bus, m, LONG_CALL, &e, &reply);
        sd_bus_message_unref(m);
        if (r < 0)
                return fail(method, &e, r);
        sd_bus_message_read(reply, "o", &job);
        if (no_wait) {
                printf("%s\n", job);
                sd_bus_message_unref(reply);
                return 0;
        }
        waiter_follow(&w, job);
        r = wait_job(&w);
        waiter_done(&w);
        sd_bus_message_unref(reply);
        return r;
}

static int cmd_snapshot(int argc, char **argv) {
        sd_bus_error e = SD_BUS_ERROR_NULL;
        sd_bus_message *reply = NULL;
        char *chain = NULL;
        const char *o;
        int r;

        if (argc < 3)
                return fprintf(stderr, "diskchainctl: snapshot CHAIN-ACTIVE-PATH OVERLAY [--existing]\n"), 2;
        if (get_chain(argv[1], &chain) < 0)
                return 1;
        if (argc > 3 && strcmp(argv[3], "--existing") == 0)
                r = call(chain, IFACE("Chain"), "Snapshot", &reply, &e, "sa{sv}", argv[2], 1, "mode", "s", "existing");
        else
                r = call(chain, IFACE("Chain"), "Snapshot", &reply, &e, "sa{sv}", argv[2], 0);
        free(chain);
        if (r < 0)
                return fail("Snapshot", &e, r);
        if (sd_bus_message_read(reply, "o", &o) >= 0)
                print_image(o, arg_json ? IMAGE_LONG : IMAGE_SNAPSHOT);
        sd_bus_message_unref(reply);
        return 0;
}

static void print_export(const char *o) {
        char *name = get_string(o, IFACE("Export"), "Name"), *uri = get_string(o, IFACE("Export"), "Uri");
        char *cache = get_string(o, IFACE("Export"), "Cache");
        char *active = NULL, h1[HUMAN_MAX], h2[HUMAN_MAX];
        uint64_t rd = 0, wr = 0;
        uint32_t clients = 0;
        int writable = 0;
        sd_bus_error e = SD_BUS_ERROR_NULL;

        get_prop(o, IFACE("Export"), "Writable", 'b', &writable);
        get_prop(o, IFACE("Export"), "Clients", 'u', &clients);
        get_prop(o, IFACE("Export"), "BytesRead", 't', &rd);
        get_prop(o, IFACE("Export"), "BytesWritten", 't', &wr);
        {
                sd_bus_message *reply = NULL, *reply2 = NULL;
                const char *c = NULL, *a = NULL;
                if (sd_bus_get_property(bus, BUS_NAME, o, IFACE("Export"), "Chain", &e, &reply, "o") >= 0 &&
                    sd_bus_message_read(reply, "o", &c) >= 0 &&
                    sd_bus_get_property(bus, BUS_NAME, c, IFACE("Chain"), "Active", &e, &reply2, "o") >= 0 &&
                    sd_bus_message_read(reply2, "o", &a) >= 0)
                        active = get_string(a, IFACE("Image"), "Path");
                sd_bus_message_unref(reply);
                sd_bus_message_unref(reply2);
        }
        sd_bus_error_free(&e);
        if (arg_json)
                printf("{\"name\": \"%s\", \"uri\": \"%s\", \"active\": \"%s\", \"writable\": %s, \"cache\": \"%s\", "
                       "\"clients\": %u, \"bytes-read\": %" PRIu64 ", \"bytes-written\": %" PRIu64 ", \"object\": \"%s\"}\n",
                       name, uri, active ? active : "", writable ? "true" : "false", cache, clients, rd, wr, o);
        else
                printf("%-16s %-3s %7u %10s %10s  %s\n%16s %s\n", name, writable ? "rw" : "ro", clients,
                       format_bytes(h1, rd), format_bytes(h2, wr), active ? active : "", "", *uri ? uri : "(OpenNBD)");
        free(name), free(uri), free(cache), free(active);
}

static int cmd_export(int argc, char **argv) {
        static const struct option options[] = {
                { "writable", no_argument, NULL, 'w' },       { "name", required_argument, NULL, 'n' },
                { "socket", required_argument, NULL, 's' },   { "persistent", no_argument, NULL, 'p' },
                { "max-connections", required_argument, NULL, 'm' }, { "tcp", required_argument, NULL, 't' },
                { "cache", required_argument, NULL, 'H' },    { "bitmap", required_argument, NULL, 'b' },
                { "snapshot", no_argument, NULL, 'S' },        { "discard-after-read", no_argument, NULL, 'D' },
                { "on-cbw-error", required_argument, NULL, 'E' }, { "checkpoint", required_argument, NULL, 'C' },
                { "cbw-timeout", required_argument, NULL, 'T' },
                {},
        };
        const char *name = NULL, *sock = NULL, *tcp = NULL, *cache = NULL, *bitmap = NULL, *cbw = NULL, *ckpt = NULL;
        long cbw_timeout = -1;
        bool writable = false, persistent = false, snapshot = false, discard = false;
        uint32_t maxc = 0;
        sd_bus_error e = SD_BUS_ERROR_NULL;
        sd_bus_message *m = NULL, *reply = NULL;
        char *chain = NULL;
        const char *o;
        int c, r;

        if (argc < 2 || argv[1][0] == '-')
                return fprintf(stderr, "diskchainctl: export CHAIN [--writable] [--name N] [--socket PATH] "
                                       "[--tcp ADDRESS:PORT] [--persistent] [--max-connections N] "
                                       "[--cache writeback|none] [--bitmap NAME] [--snapshot [--discard-after-read] "
                                       "[--on-cbw-error MODE] [--cbw-timeout SECONDS] [--checkpoint NAME]]\n"), 2;
        while ((c = getopt_long(argc - 1, argv + 1, "", options, NULL)) >= 0)
                switch (c) {
                case 'w':
                        writable = true;
                        break;
                case 'p':
                        persistent = true;
                        break;
                case 'n':
                        name = optarg;
                        break;
                case 's':
                        sock = optarg;
                        break;
                case 't':
                        tcp = optarg;
                        break;
                case 'm':
                        maxc = (uint32_t) strtoul(optarg, NULL, 10);
                        break;
                case 'H':
                        cache = optarg;
                        break;
                case 'b':
                        bitmap = optarg;
                        break;
                case 'S':
                        snapshot = true;
                        break;
                case 'D':
                        discard = true;
                        break;
                case 'E':
                        cbw = optarg;
                        break;
                case 'C':
                        ckpt = optarg;
                        break;
                case 'T':
                        cbw_timeout = strtol(optarg, NULL, 10);
                        break;
                default:
                        return 2;
                }
        if (get_chain(argv[1], &chain) < 0)
                return 1;
        r = sd_bus_message_new_method_call(bus, &m, BUS_NAME, chain, IFACE("Chain"), "Export");
        free(chain);
        if (r >= 0)
                r = sd_bus_message_open_container(m, 'a', "{sv}");
        if (r >= 0 && writable)
                r = sd_bus_message_append(m, "{sv}", "writable", "b", 1);
        if (r >= 0 && persistent)
                r = sd_bus_message_append(m, "{sv}", "persistent", "b", 1);
        if (r >= 0 && name)
                r = sd_bus_message_append(m, "{sv}", "name", "s", name);
        if (r >= 0 && sock)
                r = sd_bus_message_append(m, "{sv}", "socket", "s", sock);
        if (r >= 0 && tcp)
                r = sd_bus_message_append(m, "{sv}", "tcp", "s", tcp);
        if (r >= 0 && maxc)
                r = sd_bus_message_append(m, "{sv}", "max-connections", "u", maxc);
        if (r >= 0 && cache)
                r = sd_bus_message_append(m, "{sv}", "cache", "s", cache);
        if (r >= 0 && bitmap)
                r = sd_bus_message_append(m, "{sv}", "bitmap", "s", bitmap);
        if (r >= 0 && snapshot)
                r = sd_bus_message_append(m, "{sv}", "snapshot", "b", 1);
        if (r >= 0 && discard)
                r = sd_bus_message_append(m, "{sv}", "discard-after-read", "b", 1);
        if (r >= 0 && cbw)
                r = sd_bus_message_append(m, "{sv}", "on-cbw-error", "s", cbw);
        if (r >= 0 && ckpt)
                r = sd_bus_message_append(m, "{sv}", "checkpoint", "s", ckpt);
        if (r >= 0 && cbw_timeout >= 0)
                r = sd_bus_message_append(m, "{sv}", "cbw-timeout", "u", (uint32_t) cbw_timeout);
        if (r >= 0)
                r = sd_bus_message_close_container(m);
        if (r >= 0)
                r = sd_bus_call(bus, m, LONG_CALL, &e, &reply);
        sd_bus_message_unref(m);
        if (r < 0)
                return fail("Export", &e, r);
        if (sd_bus_message_read(reply, "o", &o) >= 0) {
                if (!arg_json)
                        printf("NAME             RW  CLIENTS       READ    WRITTEN  CHAIN\n");
                print_export(o);
        }
        sd_bus_message_unref(reply);
        return 0;
}

static int cmd_exports(void) {
        sd_bus_error e = SD_BUS_ERROR_NULL;
        sd_bus_message *reply = NULL;
        char **v = NULL;
        int r = call(MANAGER_PATH, IFACE("Manager"), "ListExports", &reply, &e, NULL);
        if (r < 0)
                return fail("ListExports", &e, r);
        read_paths(reply, &v);
        if (!arg_json)
                printf("NAME             RW  CLIENTS       READ    WRITTEN  CHAIN\n");
        for (char **p = v; *p; p++)
                print_export(*p);
        strv_free(v);
        sd_bus_message_unref(reply);
        return 0;
}

static int cmd_unexport(const char *name) {
        sd_bus_error e = SD_BUS_ERROR_NULL;
        char *o = NULL;
        int r = sd_bus_path_encode(MANAGER_PATH "/export", name, &o);
        if (r < 0)
                return fail("unexport", NULL, r);
        r = call(o, IFACE("Export"), "Stop", NULL, &e, NULL);
        free(o);
        if (r < 0) {
                if (sd_bus_error_has_name(&e, SD_BUS_ERROR_UNKNOWN_OBJECT) ||
                    sd_bus_error_has_name(&e, SD_BUS_ERROR_UNKNOWN_METHOD)) {
                        fprintf(stderr, "diskchainctl: no export named '%s'\n", name);
                        sd_bus_error_free(&e);
                        return 1;
                }
                return fail("Stop", &e, r);
        }
        if (!arg_json)
                printf("stopped export %s\n", name);
        return 0;
}

#define BITMAP_USAGE                                                                                   \
        "diskchainctl: bitmap add IMAGE NAME [--granularity BYTES] [--disabled] [--transient]\n"      \
        "              bitmap remove|clear|enable|disable IMAGE NAME\n"                                \
        "              bitmap merge IMAGE TARGET SOURCE...\n"

/* bitmap VERB IMAGE NAME [...]: ARGV[0] is "bitmap" */
static int cmd_bitmap(int argc, char **argv) {
        static const struct {
                const char *verb, *method, *done;
        } verbs[] = {
                { "add", "AddBitmap", "added" },          { "remove", "RemoveBitmap", "removed" },
                { "clear", "ClearBitmap", "cleared" },    { "enable", "EnableBitmap", "recording" },
                { "disable", "DisableBitmap", "disabled" }, { "merge", "MergeBitmaps", "merged into" },
        };
        sd_bus_error e = SD_BUS_ERROR_NULL;
        sd_bus_message *m = NULL;
        uint64_t gran = 0;
        bool disabled = false, transient = false;
        size_t v = 0;
        char *o = NULL;
        int r;

        while (argc >= 4 && v < (sizeof verbs / sizeof verbs[0]) && strcmp(argv[1], verbs[v].verb) != 0)
                v++;
        if (argc < 4 || v == (sizeof verbs / sizeof verbs[0]) || (v == 5 && argc < 5))
                return fprintf(stderr, BITMAP_USAGE), 2;
        for (int i = 4; v == 0 && i < argc; i++)
                if (strcmp(argv[i], "--disabled") == 0)
                        disabled = true;
                else if (strcmp(argv[i], "--transient") == 0)
                        transient = true;
                else if (strcmp(argv[i], "--granularity") == 0 && i + 1 < argc)
                        gran = strtoull(argv[++i], NULL, 0);
                else if (strncmp(argv[i], "--granularity=", 14) == 0)
                        gran = strtoull(argv[i] + 14, NULL, 0);
                else
                        return fprintf(stderr, BITMAP_USAGE), 2;
        if (v != 0 && v != 5 && argc > 4)
                return fprintf(stderr, BITMAP_USAGE), 2;
        if (get_image(argv[2], &o) < 0)
                return 1;
        r = sd_bus_message_new_method_call(bus, &m, BUS_NAME, o, IFACE("Image"), verbs[v].method);
        free(o);
        if (r >= 0)
                r = sd_bus_message_append(m, "s", argv[3]);
        if (r >= 0 && v == 0) {
                /* granularity 0: the service's default; the service judges the value */
                r = sd_bus_message_append(m, "a{sv}", 3, "granularity", "t", gran, "disabled", "b", disabled,
                                          "persistent", "b", !transient);
        }
        if (r >= 0 && v == 5)
                r = sd_bus_message_append_strv(m, argv + 4);
        if (r >= 0)
                r = sd_bus_call(bus, m, LONG_CALL, &e, NULL);
        sd_bus_message_unref(m);
        if (r < 0)
                return fail(verbs[v].method, &e, r);
        if (!arg_json && v == 5)
                printf("bitmaps of %s: merged into %s\n", argv[2], argv[3]);
        else if (!arg_json)
                printf("bitmap %s of %s: %s\n", argv[3], argv[2], verbs[v].done);
        return 0;
}

/* --- plan ... ------------------------------------------------------------------------------------------ */

#define EXIT_PLAN_RUNNING 75 /* EX_TEMPFAIL: the previous run is still going */

static char *plan_object(const char *name) {
        char *o = NULL;
        if (sd_bus_path_encode(MANAGER_PATH "/plan", name, &o) < 0)
                return NULL;
        return o;
}

static void print_time_usec(uint64_t usec) {
        char b[64];
        time_t t = (time_t) (usec / 1000000);
        struct tm tm;
        if (!usec) {
                printf("never");
                return;
        }
        localtime_r(&t, &tm);
        strftime(b, sizeof b, "%Y-%m-%d %H:%M:%S %Z", &tm);
        printf("%s", b);
}

/* The plan's settings from command-line options into an a{sv} already opened on M. */
static int plan_settings_append(sd_bus_message *m, int argc, char **argv, int first) {
        static const struct {
                const char *opt, *key;
                char type; /* s, u, t, b (flag), n (flag: false) */
        } map[] = {
                { "--chain", "chain", 's' },          { "--destination", "destination", 's' },
                { "--schedule", "schedule", 's' },    { "--level", "level", 's' },
                { "--bitmap", "bitmap", 's' },        { "--full-every", "full-every", 'u' },
                { "--mode", "mode", 's' },
                { "--randomized-delay-sec", "randomized-delay-sec", 'u' },
                { "--speed", "speed", 't' },          { "--compress", "compress", 'b' },
                { "--no-compress", "compress", 'n' }, { "--prune-after-run", "prune-after-run", 'b' },
                { "--no-prune-after-run", "prune-after-run", 'n' },
                { "--keep-last", "keep-last", 'u' },  { "--keep-hourly", "keep-hourly", 'u' },
                { "--keep-daily", "keep-daily", 'u' }, { "--keep-weekly", "keep-weekly", 'u' },
                { "--keep-monthly", "keep-monthly", 'u' }, { "--keep-yearly", "keep-yearly", 'u' },
        };
        int r = 0;

        for (int i = first; r >= 0 && i < argc; i++) {
                size_t k = 0, n = sizeof map / sizeof map[0];
                const char *val = NULL;
                char opt[64];
                const char *eq = strchr(argv[i], '=');

                if (strcmp(argv[i], "--json") == 0)
                        continue;
                snprintf(opt, sizeof opt, "%.*s", eq ? (int) (eq - argv[i]) : (int) strlen(argv[i]), argv[i]);
                while (k < n && strcmp(map[k].opt, opt) != 0)
                        k++;
                if (k == n) {
                        fprintf(stderr, "diskchainctl: plan: unknown option %s\n", argv[i]);
                        return -EINVAL;
                }
                if (map[k].type == 'b' || map[k].type == 'n') {
                        r = sd_bus_message_append(m, "{sv}", map[k].key, "b", map[k].type == 'b');
                        continue;
                }
                val = eq ? eq + 1 : i + 1 < argc ? argv[++i] : NULL;
                if (!val) {
                        fprintf(stderr, "diskchainctl: plan: %s needs a value\n", opt);
                        return -EINVAL;
                }
                if (map[k].type == 's')
                        r = sd_bus_message_append(m, "{sv}", map[k].key, "s", val);
                else if (map[k].type == 'u')
                        r = sd_bus_message_append(m, "{sv}", map[k].key, "u", (uint32_t) strtoul(val, NULL, 0));
                else
                        r = sd_bus_message_append(m, "{sv}", map[k].key, "t", (uint64_t) strtoull(val, NULL, 0));
        }
        return r;
}

static int plan_show(const char *o, bool brief) {
        sd_bus_error e = SD_BUS_ERROR_NULL;
        sd_bus_message *reply = NULL;
        char *name = get_string(o, IFACE("Plan"), "Name"), *chain = get_string(o, IFACE("Plan"), "Chain");
        char *dest = get_string(o, IFACE("Plan"), "Destination"), *sched = get_string(o, IFACE("Plan"), "Schedule");
        char *level = get_string(o, IFACE("Plan"), "Level"), *result = get_string(o, IFACE("Plan"), "LastResult");
        uint64_t last = 0, next = 0, size;
        uint32_t full_every = 0;
        int running = 0, n = 0, r;
        const char *id, *lvl, *file, *state, *base;
        uint64_t t;
        char h[HUMAN_MAX];

        (void) get_prop(o, IFACE("Plan"), "LastRun", 't', &last);
        (void) get_prop(o, IFACE("Plan"), "NextRun", 't', &next);
        (void) get_prop(o, IFACE("Plan"), "FullEvery", 'u', &full_every);
        (void) get_prop(o, IFACE("Plan"), "Running", 'b', &running);
        r = sd_bus_get_property(bus, BUS_NAME, o, IFACE("Plan"), "RestorePoints", &e, &reply, "a(stsstss)");
        if (arg_json) {
                printf("{\"name\": ");
                print_json_string(name);
                printf(", \"chain\": ");
                print_json_string(chain);
                printf(", \"destination\": ");
                print_json_string(dest);
                printf(", \"schedule\": ");
                print_json_string(sched);
                printf(", \"level\": ");
                print_json_string(level);
                printf(", \"full_every\": %u, \"last_run\": %" PRIu64 ", \"next_run\": %" PRIu64
                       ", \"running\": %s, \"last_result\": ",
                       full_every, last, next, running ? "true" : "false");
                print_json_string(result);
                printf(", \"restore_points\": [");
        } else if (brief) {
                printf("%-20s %-12s %-16s last ", name, level, sched);
                print_time_usec(last);
                printf(": %s%s\n", *result ? result : "-", running ? " (running)" : "");
        } else {
                printf("plan: %s\nchain: %s\ndestination: %s\nschedule: %s (next ", name, chain, dest, sched);
                print_time_usec(next);
                printf(")\nlevel: %s (a full backup every %u runs when auto)\nlast run: ", level, full_every);
                print_time_usec(last);
                printf("%s\nlast result: %s\nrestore points:", running ? " (running now)" : "", *result ? result : "-");
        }
        if (r >= 0 && !brief && sd_bus_message_enter_container(reply, 'a', "(stsstss)") >= 0) {
                while (sd_bus_message_read(reply, "(stsstss)", &id, &t, &lvl, &file, &size, &state, &base) > 0) {
                        if (arg_json) {
                                printf("%s{\"id\": ", n ? ", " : "");
                                print_json_string(id);
                                printf(", \"time\": %" PRIu64 ", \"level\": \"%s\", \"file\": ", t, lvl);
                                print_json_string(file);
                                printf(", \"size\": %" PRIu64 ", \"state\": \"%s\", \"base\": ", size, state);
                                print_json_string(base);
                                printf("}");
                        } else {
                                printf("\n  %s  ", id);
                                print_time_usec(t);
                                printf("  %-12s %10s  %-10s %s", lvl, format_bytes(h, size), state, file);
                        }
                        n++;
                }
        }
        if (arg_json)
                printf("]}");
        else if (!brief)
                printf(n ? "\n" : " (none)\n");
        sd_bus_message_unref(reply);
        sd_bus_error_free(&e);
        free(name);
        free(chain);
        free(dest);
        free(sched);
        free(level);
        free(result);
        return 0;
}

/* plan run NAME: the job's progress, then the run's outcome once the plan is done with it (prune included). */
static int plan_run(const char *o, const char *name, bool wait) {
        sd_bus_error e = SD_BUS_ERROR_NULL;
        sd_bus_message *reply = NULL;
        struct waiter w = { 0 };
        const char *job;
        char *result, *before = get_string(o, IFACE("Plan"), "LastResult");
        int r = waiter_subscribe(&w), running = 1;

        if (r < 0) {
                free(before);
                return fail("subscribe", NULL, r);
        }
        r = call(o, IFACE("Plan"), "Run", &reply, &e, NULL);
        if (r < 0) {
                bool again = sd_bus_error_has_name(&e, BUS_NAME ".Error.PlanRunning");
                fail(name, &e, r);
                sd_bus_error_free(&e);
                waiter_done(&w);
                free(before);
                return again ? EXIT_PLAN_RUNNING : 1;
        }
        r = sd_bus_message_read(reply, "o", &job);
        if (r < 0 || !wait) {
                if (r >= 0)
                        printf("%s\n", job);
                sd_bus_message_unref(reply);
                waiter_done(&w);
                free(before);
                return r < 0 ? fail("Run", NULL, r) : 0;
        }
        waiter_follow(&w, job);
        (void) wait_job(&w);
        waiter_done(&w);
        sd_bus_message_unref(reply);
        /* the checksums and the prune come after the job */
        for (int i = 0; running && i < 36000; i++) {
                if (get_prop(o, IFACE("Plan"), "Running", 'b', &running) < 0)
                        break;
                if (running)
                        usleep(100000);
        }
        result = get_string(o, IFACE("Plan"), "LastResult");
        if (strcmp(result, before) == 0) {
                /* the service went away with the run (a crash): the next run starts over, full */
                fprintf(stderr, "diskchainctl: plan %s: the run ended without an outcome (the service stopped?)\n",
                        name);
                r = 1;
        } else {
                printf("plan %s: %s\n", name, result);
                r = strncmp(result, "success", 7) == 0 ? 0 : 1;
        }
        free(result);
        free(before);
        return r;
}

/* An instant recovery's export: the one serving TARGET's chain. */
static void print_live_export(const char *target, const char *job) {
        sd_bus_error e = SD_BUS_ERROR_NULL;
        sd_bus_message *reply = NULL;
        char *chain = NULL;
        const char *x;

        if (manager_lookup("GetChain", target, &chain) >= 0 &&
            call(MANAGER_PATH, IFACE("Manager"), "ListExports", &reply, &e, NULL) >= 0 &&
            sd_bus_message_enter_container(reply, 'a', "o") >= 0)
                while (sd_bus_message_read(reply, "o", &x) > 0) {
                        char *c = NULL, *uri;
                        sd_bus_error e2 = SD_BUS_ERROR_NULL;
                        sd_bus_message *cr = NULL;
                        if (sd_bus_get_property(bus, BUS_NAME, x, IFACE("Export"), "Chain", &e2, &cr, "o") >= 0 &&
                            sd_bus_message_read(cr, "o", &c) >= 0 && strcmp(c, chain) == 0) {
                                uri = get_string(x, IFACE("Export"), "Uri");
                                printf("%s: served at %s while the backup is copied in (%s)\n", target, uri, job);
                                free(uri);
                        }
                        sd_bus_message_unref(cr);
                        sd_bus_error_free(&e2);
                }
        sd_bus_message_unref(reply);
        sd_bus_error_free(&e);
        free(chain);
}

static int cmd_plan(int argc, char **argv) {
        const char *verb = argc > 1 ? argv[1] : "";
        sd_bus_error e = SD_BUS_ERROR_NULL;
        sd_bus_message *m = NULL, *reply = NULL;
        char *o = NULL;
        int r = 0;

        if (strcmp(verb, "list") == 0) {
                const char *p;
                int n = 0;
                r = call(MANAGER_PATH, IFACE("Manager"), "ListPlans", &reply, &e, NULL);
                if (r < 0)
                        return fail("ListPlans", &e, r);
                r = sd_bus_message_enter_container(reply, 'a', "o");
                if (arg_json)
                        printf("[");
                while (r >= 0 && sd_bus_message_read(reply, "o", &p) > 0) {
                        if (arg_json && n)
                                printf(", ");
                        plan_show(p, true);
                        n++;
                }
                if (arg_json)
                        printf("]\n");
                else if (!n)
                        printf("no plans\n");
                sd_bus_message_unref(reply);
                return 0;
        }
        if (argc < 3) {
                fprintf(stderr, "usage: diskchainctl plan list|show|run|verify|prune|restore|create|edit|delete NAME "
                                "...\n");
                return 2;
        }
        o = plan_object(argv[2]);
        if (strcmp(verb, "show") == 0) {
                char *n = get_string(o, IFACE("Plan"), "Name");
                if (!*n) {
                        fprintf(stderr, "diskchainctl: no plan named '%s'\n", argv[2]);
                        r = 1;
                } else {
                        plan_show(o, false);
                        if (arg_json)
                                printf("\n");
                }
                free(n);
        } else if (strcmp(verb, "run") == 0) {
                bool wait = !(argc > 3 && strcmp(argv[3], "--no-wait") == 0);
                r = plan_run(o, argv[2], wait);
        } else if (strcmp(verb, "verify") == 0) {
                const char *point = argc > 4 && strcmp(argv[3], "--point") == 0 ? argv[4] : NULL;
                const char *id, *detail;
                int ok;
                r = sd_bus_message_new_method_call(bus, &m, BUS_NAME, o, IFACE("Plan"), "Verify");
                if (r >= 0)
                        r = point ? sd_bus_message_append(m, "a{sv}", 1, "point", "s", point)
                                  : sd_bus_message_append(m, "a{sv}", 0);
                if (r >= 0)
                        r = sd_bus_call(bus, m, LONG_CALL, &e, &reply);
                if (r < 0)
                        r = fail(argv[2], &e, r);
                else {
                        r = sd_bus_message_enter_container(reply, 'a', "(sbs)");
                        while (r >= 0 && sd_bus_message_read(reply, "(sbs)", &id, &ok, &detail) > 0)
                                printf("%s: %s: %s\n", id, ok ? "ok" : "DAMAGED", detail);
                        r = 0;
                }
        } else if (strcmp(verb, "prune") == 0) {
                bool dry = argc > 3 && strcmp(argv[3], "--dry-run") == 0;
                const char *id, *what, *detail;
                r = call(o, IFACE("Plan"), "Prune", &reply, &e, "a{sv}", 1, "dry-run", "b", dry);
                if (r < 0)
                        r = fail(argv[2], &e, r);
                else {
                        int n = 0;
                        r = sd_bus_message_enter_container(reply, 'a', "(sss)");
                        while (r >= 0 && sd_bus_message_read(reply, "(sss)", &id, &what, &detail) > 0) {
                                printf("%s: %s%s%s%s\n", id, what, *detail ? " (" : "", detail, *detail ? ")" : "");
                                n++;
                        }
                        if (!n)
                                printf("nothing to prune\n");
                        r = 0;
                }
        } else if (strcmp(verb, "restore") == 0 && argc >= 5) {
                const char *format = NULL, *job = NULL, *name = NULL;
                bool wait = true, live = false, as_chain = false;
                for (int i = 5; i < argc; i++)
                        if (strcmp(argv[i], "--format") == 0 && i + 1 < argc)
                                format = argv[++i];
                        else if (strcmp(argv[i], "--name") == 0 && i + 1 < argc)
                                name = argv[++i];
                        else if (strcmp(argv[i], "--no-wait") == 0)
                                wait = false;
                        else if (strcmp(argv[i], "--live") == 0)
                                live = true;
                        else if (strcmp(argv[i], "--chain") == 0)
                                as_chain = true;
                r = sd_bus_message_new_method_call(bus, &m, BUS_NAME, o, IFACE("Plan"), "Restore");
                if (r >= 0)
                        r = sd_bus_message_append(m, "ss", argv[3], argv[4]);
                if (r >= 0)
                        r = sd_bus_message_open_container(m, 'a', "{sv}");
                if (r >= 0 && format)
                        r = sd_bus_message_append(m, "{sv}", "format", "s", format);
                if (r >= 0 && live)
                        r = sd_bus_message_append(m, "{sv}", "live", "b", 1);
                if (r >= 0 && name)
                        r = sd_bus_message_append(m, "{sv}", "name", "s", name);
                if (r >= 0 && as_chain)
                        r = sd_bus_message_append(m, "{sv}", "chain", "b", 1);
                if (r >= 0)
                        r = sd_bus_message_close_container(m);
                if (r >= 0) {
                        struct waiter w = { 0 };
                        (void) waiter_subscribe(&w);
                        r = sd_bus_call(bus, m, LONG_CALL, &e, &reply);
                        if (r < 0)
                                r = fail(argv[2], &e, r);
                        else if (sd_bus_message_read(reply, "o", &job) >= 0 && strcmp(job, "/") == 0) {
                                printf("%s: restored as an overlay of the backup (it stays a backing file)\n",
                                       argv[4]);
                                r = 0;
                        } else if (job) {
                                if (live)
                                        print_live_export(argv[4], job);
                                if (wait) {
                                        waiter_follow(&w, job);
                                        r = wait_job(&w);
                                } else {
                                        printf("%s\n", job);
                                        r = 0;
                                }
                        }
                        waiter_done(&w);
                }
        } else if (strcmp(verb, "create") == 0 || strcmp(verb, "edit") == 0) {
                bool create = strcmp(verb, "create") == 0;
                r = create ? sd_bus_message_new_method_call(bus, &m, BUS_NAME, MANAGER_PATH, IFACE("Manager"),
                                                            "CreatePlan")
                           : sd_bus_message_new_method_call(bus, &m, BUS_NAME, o, IFACE("Plan"), "Change");
                if (r >= 0 && create)
                        r = sd_bus_message_append(m, "s", argv[2]);
                if (r >= 0)
                        r = sd_bus_message_open_container(m, 'a', "{sv}");
                if (r >= 0)
                        r = plan_settings_append(m, argc, argv, 3);
                if (r == -EINVAL) {
                        sd_bus_message_unref(m);
                        free(o);
                        return 2;
                }
                if (r >= 0)
                        r = sd_bus_message_close_container(m);
                if (r >= 0)
                        r = sd_bus_call(bus, m, LONG_CALL, &e, &reply);
                if (r < 0)
                        r = fail(argv[2], &e, r);
                else {
                        printf("plan %s: %s\n", argv[2], create ? "created" : "changed");
                        r = 0;
                }
        } else if (strcmp(verb, "delete") == 0) {
                r = call(o, IFACE("Plan"), "Delete", NULL, &e, NULL);
                if (r < 0)
                        r = fail(argv[2], &e, r);
                else {
                        printf("plan %s: deleted (its backups stay)\n", argv[2]);
                        r = 0;
                }
        } else {
                fprintf(stderr, "diskchainctl: plan: unknown verb or missing argument: %s\n", verb);
                r = 2;
        }
        sd_bus_message_unref(m);
        sd_bus_message_unref(reply);
        sd_bus_error_free(&e);
        free(o);
        return r;
}

static void print_job(const char *o, bool long_form) {
        char *id = get_string(o, IFACE("Job"), "Id"), *type = get_string(o, IFACE("Job"), "Type");
        char *status = get_string(o, IFACE("Job"), "Status"), *err = get_string(o, IFACE("Job"), "Error");
        char *top = get_string(o, IFACE("Job"), "Top"), *base = get_string(o, IFACE("Job"), "Base");
        char *io = get_string(o, IFACE("Job"), "IoStatus");
        char h1[HUMAN_MAX], h2[HUMAN_MAX], h3[HUMAN_MAX], summary[128];
        struct job_view v = { 0 };
        uint64_t cur, total, speed;

        (void) get_job_view(o, &v);
        cur = v.cur, total = v.total, speed = v.speed;
        if (arg_json)
                printf("{\"id\": \"%s\", \"type\": \"%s\", \"status\": \"%s\", \"offset\": %" PRIu64
                       ", \"len\": %" PRIu64 ", \"speed\": %" PRIu64 ", \"io-status\": \"%s\", \"top\": \"%s\", "
                       "\"base\": \"%s\", \"error\": \"%s\"}\n",
                       id, type, status, cur, total, speed, io, top, base, err);
        else if (long_form) {
                printf("id: %s\ntype: %s\nstatus: %s\nprogress: %s of %s (%d%%)\nspeed limit: %s\n", id, type,
                       status, format_bytes(h1, cur), format_bytes(h2, total),
                       total ? (int) (cur * 100 / total) : 0, speed ? format_rate(h3, speed) : "none");
                if (strcmp(status, "concluded") == 0)
                        printf("done: %s\n", job_summary(summary, &v));
                else
                        printf("rate: %s\ntime left: %s\n", format_rate(h1, v.rate), format_left(h2, v.end));
                printf("io-status: %s\ntop: %s\nbase: %s\nerror: %s\nobject: %s\n", io, top,
                       *base ? base : "(none)", err, o);
        } else
                printf("%-12s %-7s %-10s %3d%%  %s\n", id, type, status, total ? (int) (cur * 100 / total) : 0, top);
        free(id), free(type), free(status), free(err), free(top), free(base), free(io);
}

static int cmd_jobs(void) {
        sd_bus_error e = SD_BUS_ERROR_NULL;
        sd_bus_message *reply = NULL;
        char **v = NULL;
        int r = call(MANAGER_PATH, IFACE("Manager"), "ListJobs", &reply, &e, NULL);
        if (r < 0)
                return fail("ListJobs", &e, r);
        read_paths(reply, &v);
        if (!arg_json)
                printf("ID           TYPE    STATUS     DONE  TOP\n");
        for (char **p = v; *p; p++)
                print_job(*p, false);
        strv_free(v);
        sd_bus_message_unref(reply);
        return 0;
}

static int cmd_job(int argc, char **argv) {
        static const struct {
                const char *verb, *method;
        } verbs[] = { { "pause", "Pause" }, { "resume", "Resume" }, { "complete", "Complete" },
                      { "finalize", "Finalize" }, { "dismiss", "Dismiss" } };
        sd_bus_message *m = NULL;
        sd_bus_error e = SD_BUS_ERROR_NULL;
        char *o = NULL;
        int r;

        if (argc < 3)
                return fprintf(stderr, "diskchainctl: job info|pause|resume|cancel|complete|finalize|dismiss|set-speed|change ID\n"), 2;
        if (get_job(argv[2], &o) < 0)
                return 1;
        if (strcmp(argv[1], "info") == 0) {
                print_job(o, true);
                free(o);
                return 0;
        }
        if (strcmp(argv[1], "cancel") == 0)
                r = call(o, IFACE("Job"), "Cancel", NULL, &e, "b", argc > 3 && strcmp(argv[3], "--force") == 0);
        else if (strcmp(argv[1], "set-speed") == 0) {
                bool ok;
                uint64_t v = argc > 3 ? parse_size(argv[3], &ok) : (ok = false, 0);
                if (!ok) {
                        free(o);
                        return fprintf(stderr, "diskchainctl: job set-speed ID BYTES-PER-SECOND\n"), 2;
                }
                r = call(o, IFACE("Job"), "SetSpeed", NULL, &e, "t", v);
        } else if (strcmp(argv[1], "change") == 0) {
                if (argc < 5 || strcmp(argv[3], "--copy-mode") != 0) {
                        free(o);
                        return fprintf(stderr, "diskchainctl: job change ID --copy-mode write-blocking\n"), 2;
                }
                r = sd_bus_message_new_method_call(bus, &m, BUS_NAME, o, IFACE("Job"), "Change");
                if (r >= 0)
                        r = sd_bus_message_append(m, "a{sv}", 1, "copy-mode", "s", argv[4]);
                if (r >= 0)
                        r = sd_bus_call(bus, m, LONG_CALL, &e, NULL);
                sd_bus_message_unref(m);
        } else {
                r = -EINVAL;
                for (size_t i = 0; i < sizeof verbs / sizeof verbs[0]; i++)
                        if (strcmp(argv[1], verbs[i].verb) == 0)
                                r = call(o, IFACE("Job"), verbs[i].method, NULL, &e, NULL);
                if (r == -EINVAL && !sd_bus_error_is_set(&e)) {
                        free(o);
                        return fprintf(stderr, "diskchainctl: unknown job verb '%s'\n", argv[1]), 2;
                }
        }
        free(o);
        if (r < 0)
                return fail(argv[1], &e, r);
        return 0;
}

static int cmd_wait(const char *id) {
        struct waiter w = { 0 };
        char *o = NULL;
        int r = waiter_subscribe(&w);

        if (r < 0)
                return fail("subscribe", NULL, r);
        if (get_job(id, &o) < 0) {
                waiter_done(&w);
                return 1;
        }
        waiter_follow(&w, o);
        r = wait_job(&w);
        waiter_done(&w);
        free(o);
        return r;
}

/* monitor: every job signal as one line of JSON in QMP's event shape. */
static int on_monitor_signal(sd_bus_message *m, void *userdata, sd_bus_error *ret_error) {
        const char *member = sd_bus_message_get_member(m), *a = "", *b = "", *c = "", *err = "";
        uint64_t len = 0, off = 0, speed = 0;
        struct timeval tv;

        gettimeofday(&tv, NULL);
        printf("{\"timestamp\": {\"seconds\": %ld, \"microseconds\": %ld}, ", (long) tv.tv_sec, (long) tv.tv_usec);
        if (strcmp(member, "JobStatusChange") == 0) {
                sd_bus_message_read(m, "ss", &a, &b);
                printf("\"event\": \"JOB_STATUS_CHANGE\", \"data\": {\"status\": \"%s\", \"id\": \"%s\"}}\n", b, a);
        } else if (strcmp(member, "BlockJobPending") == 0) {
                sd_bus_message_read(m, "ss", &a, &b);
                printf("\"event\": \"BLOCK_JOB_PENDING\", \"data\": {\"type\": \"%s\", \"id\": \"%s\"}}\n", a, b);
        } else if (strcmp(member, "BlockJobError") == 0) {
                sd_bus_message_read(m, "sss", &a, &b, &c);
                printf("\"event\": \"BLOCK_JOB_ERROR\", \"data\": {\"device\": \"%s\", \"operation\": \"%s\", "
                       "\"action\": \"%s\"}}\n", a, b, c);
        } else {
                const char *ev = strcmp(member, "BlockJobReady") == 0       ? "BLOCK_JOB_READY"
                                 : strcmp(member, "BlockJobCompleted") == 0 ? "BLOCK_JOB_COMPLETED"
                                                                            : "BLOCK_JOB_CANCELLED";
                sd_bus_message_read(m, "ssttt", &a, &b, &len, &off, &speed);
                if (strcmp(member, "BlockJobCompleted") == 0)
                        sd_bus_message_read(m, "s", &err);
                printf("\"event\": \"%s\", \"data\": {\"device\": \"%s\", \"len\": %" PRIu64 ", \"offset\": %" PRIu64
                       ", \"speed\": %" PRIu64 ", \"type\": \"%s\"",
                       ev, b, len, off, speed, a);
                if (*err)
                        printf(", \"error\": \"%s\"", err);
                printf("}}\n");
        }
        fflush(stdout);
        return 0;
}

static int cmd_monitor(void) {
        sd_bus_slot *slot = NULL;
        int r = sd_bus_add_match(bus, &slot, "type='signal',interface='" IFACE("Job") "'",
                                 on_monitor_signal, NULL);
        if (r < 0)
                return fail("subscribe", NULL, r);
        for (;;) {
                r = sd_bus_process(bus, NULL);
                if (r < 0)
                        return fail("bus", NULL, r);
                if (r == 0)
                        sd_bus_wait(bus, UINT64_MAX);
        }
}

static void help(void) {
        printf("diskchainctl [OPTIONS...] COMMAND ...\n\n"
               "Commands:\n"
               "  images                       List the images in the storage roots\n"
               "  chains                       List the chains (active layer first)\n"
               "  info PATH                    Show one image\n"
               "  create PATH SIZE [OPTIONS]   Create an image (--backing, --backing-format, --format,\n"
               "                               --cluster-size, --compat, --compression-type,\n"
               "                               --preallocation, --lazy-refcounts, --refcount-bits)\n"
               "  check PATH [--repair leaks|all]\n"
               "  map PATH                     Show allocation, as qemu-img map --output=json\n"
               "  classify PATH qcow2|raw      Record the format of an image file (polkit: classify)\n"
               "  stream CHAIN [--top P] [--base P|--bottom P] [--backing-file S] [--speed N]\n"
               "  commit CHAIN [--top P] [--base P] [--backing-file S] [--force-shared-base] [--speed N]\n"
               "                               Start a job on the chain whose active layer is CHAIN and\n"
               "                               follow it: rate and time left on a terminal, what it did\n"
               "                               (bytes, time, average rate) at the end; also --job-id ID,\n"
               "                               --on-error report|ignore|stop|enospc, --no-auto-finalize,\n"
               "                               --no-auto-dismiss, --no-wait (print the job and return),\n"
               "                               --cache writeback|none (how the written image takes data)\n"
               "  backup CHAIN TARGET [--sync full|top|none|bitmap|incremental] [--mode existing] [--format F]\n"
               "                               [--compress] [--max-workers N] [--max-chunk N]\n"
               "                               [--bitmap NAME --bitmap-mode on-success|never|always]\n"
               "                               [--checkpoint NAME]\n"
               "  mirror CHAIN TARGET [--sync full|top|none] [--mode existing] [--format F]\n"
               "                               [--granularity N] [--buf-size N] [--no-unmap]\n"
               "                               [--copy-mode background|write-blocking]\n"
               "                               mirror and active commit (no --top) wait until ready;\n"
               "                               --complete then pivots, --copy keeps a point-in-time copy;\n"
               "                               TARGET may be an NBD URI (nbd://HOST:PORT/NAME,\n"
               "                               nbd+unix:///NAME?socket=PATH, nbds:// for TLS)\n"
               "  snapshot CHAIN OVERLAY [--existing]\n"
               "  export CHAIN [--writable] [--name N] [--socket PATH] [--persistent] [--max-connections N]\n"
               "               [--tcp ADDRESS:PORT] [--cache writeback|none] [--bitmap NAME]\n"
               "               [--snapshot [--discard-after-read] [--on-cbw-error MODE] [--cbw-timeout SECONDS]\n"
               "                           [--checkpoint NAME]]\n"
               "                               Serve the chain over NBD (polkit: export); prints its URI\n"
               "  exports                      List the NBD exports\n"
               "  unexport NAME                Stop an export once its clients' requests are done\n"
               "  bitmap add IMAGE NAME [--granularity BYTES] [--disabled]\n"
               "  bitmap remove|clear|enable|disable IMAGE NAME\n"
               "  bitmap merge IMAGE TARGET SOURCE...\n"
               "                               Change the persistent dirty bitmaps of a qcow2 image\n"
               "  jobs                         List block jobs\n"
               "  job info|pause|resume|cancel [--force]|complete|finalize|dismiss|set-speed ID [N]\n"
               "  job change ID --copy-mode write-blocking\n"
               "  wait ID                      Wait for a job to end; non-zero unless it completed\n"
               "  monitor                      Print every job signal as a QMP event in JSON\n\n"
               "Options:\n"
               "  -h --help      Show this help\n"
               "     --json      JSON output for images, chains, info, create, check and job info\n"
               "     --no-ask-password  Do not ask for a password (no interactive authorization)\n");
}

int main(int argc, char **argv) {
        bool interactive = true;
        int i, r;

        /* global options first, the rest goes to the command */
        for (i = 1; i < argc && argv[i][0] == '-'; i++) {
                if (strcmp(argv[i], "--json") == 0)
                        arg_json = true;
                else if (strcmp(argv[i], "--no-ask-password") == 0)
                        interactive = false;
                else if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
                        help();
                        return 0;
                } else {
                        fprintf(stderr, "diskchainctl: unknown option %s\n", argv[i]);
                        return 2;
                }
        }
        if (i >= argc) {
                help();
                return 2;
        }
        r = sd_bus_open_system(&bus);
        if (r < 0)
                return fail("cannot connect to the system bus", NULL, r);
        sd_bus_set_allow_interactive_authorization(bus, interactive);
        argv += i;
        argc -= i;
        for (int j = 1; j < argc; j++) {
                if (strcmp(argv[j], "--json") == 0)
                        arg_json = true;
                else if (strcmp(argv[j], "--repair") == 0 && j + 1 < argc)
                        arg_repair = argv[j + 1];
        }
        if (strcmp(argv[0], "images") == 0)
                r = cmd_images();
        else if (strcmp(argv[0], "chains") == 0)
                r = cmd_chains();
        else if (strcmp(argv[0], "info") == 0 && argc >= 2)
                r = cmd_info(argv[1]);
        else if (strcmp(argv[0], "create") == 0)
                r = cmd_create(argc, argv);
        else if (strcmp(argv[0], "check") == 0 && argc >= 2)
                r = cmd_check(argv[1]);
        else if (strcmp(argv[0], "map") == 0 && argc >= 2)
                r = cmd_map(argv[1]);
        else if (strcmp(argv[0], "classify") == 0 && argc >= 3)
                r = cmd_classify(argv[1], argv[2]);
        else if (strcmp(argv[0], "stream") == 0)
                r = cmd_job_start("Stream", argc, argv);
        else if (strcmp(argv[0], "commit") == 0)
                r = cmd_job_start("Commit", argc, argv);
        else if (strcmp(argv[0], "backup") == 0)
                r = cmd_job_start("Backup", argc, argv);
        else if (strcmp(argv[0], "mirror") == 0)
                r = cmd_job_start("Mirror", argc, argv);
        else if (strcmp(argv[0], "snapshot") == 0)
                r = cmd_snapshot(argc, argv);
        else if (strcmp(argv[0], "export") == 0)
                r = cmd_export(argc, argv);
        else if (strcmp(argv[0], "exports") == 0)
                r = cmd_exports();
        else if (strcmp(argv[0], "bitmap") == 0)
                r = cmd_bitmap(argc, argv);
        else if (strcmp(argv[0], "unexport") == 0 && argc >= 2)
                r = cmd_unexport(argv[1]);
        else if (strcmp(argv[0], "jobs") == 0)
                r = cmd_jobs();
        else if (strcmp(argv[0], "job") == 0)
                r = cmd_job(argc, argv);
        else if (strcmp(argv[0], "wait") == 0 && argc >= 2)
                r = cmd_wait(argv[1]);
        else if (strcmp(argv[0], "monitor") == 0)
                r = cmd_monitor();
        else if (strcmp(argv[0], "plan") == 0)
                r = cmd_plan(argc, argv);
        else {
                fprintf(stderr, "diskchainctl: unknown command or missing argument: %s\n", argv[0]);
                r = 2;
        }
        sd_bus_flush_close_unref(bus);
        return r;
}
