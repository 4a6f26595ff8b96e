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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <systemd/sd-bus.h>

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

static int print_image(const char *obj, bool long_form) {
        char *path = get_string(obj, IFACE("Image"), "Path"), *fmt = get_string(obj, IFACE("Image"), "Format");
        char *bf = get_string(obj, IFACE("Image"), "BackingFile");
        char *compat = get_string(obj, IFACE("Image"), "Compat");
        uint64_t vs = 0, as = 0;
        uint32_t cs = 0;
        int dirty = 0, corrupt = 0, ro = 0;

        get_prop(obj, IFACE("Image"), "VirtualSize", 't', &vs);
        get_prop(obj, IFACE("Image"), "ActualSize", 't', &as);
        get_prop(obj, IFACE("Image"), "ClusterSize", 'u', &cs);
        get_prop(obj, IFACE("Image"), "Dirty", 'b', &dirty);
        get_prop(obj, IFACE("Image"), "Corrupt", 'b', &corrupt);
        get_prop(obj, IFACE("Image"), "ReadOnly", 'b', &ro);
        if (arg_json)
                printf("{\"path\": \"%s\", \"format\": \"%s\", \"virtual-size\": %" PRIu64 ", \"actual-size\": %" PRIu64
                       ", \"cluster-size\": %u, \"compat\": \"%s\", \"backing-filename\": \"%s\", \"dirty\": %s, "
                       "\"corrupt\": %s, \"read-only\": %s, \"object\": \"%s\"}\n",
                       path, fmt, vs, as, cs, compat, bf, dirty ? "true" : "false", corrupt ? "true" : "false",
                       ro ? "true" : "false", obj);
        else if (long_form)
                printf("image: %s\nformat: %s\nvirtual size: %" PRIu64 " bytes\ndisk size: %" PRIu64
                       " bytes\ncluster size: %u\ncompat: %s\nbacking file: %s\ndirty: %s\ncorrupt: %s\nread-only: %s\n"
                       "object: %s\n",
                       path, fmt, vs, as, cs, compat, *bf ? bf : "(none)", dirty ? "yes" : "no", corrupt ? "yes" : "no",
                       ro ? "yes" : "no", obj);
        else
                printf("%-6s %14" PRIu64 "  %s%s%s\n", fmt, vs, path, *bf ? "  <- " : "", bf);
        free(path);
        free(fmt);
        free(bf);
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
                printf("FORMAT   VIRTUAL-SIZE  PATH\n");
        for (char **p = v; *p; p++)
                print_image(*p, false);
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

static int get_image(const char *path, char **ret) {
        sd_bus_error e = SD_BUS_ERROR_NULL;
        sd_bus_message *reply = NULL;
        const char *o;
        int r = call(MANAGER_PATH, IFACE("Manager"), "GetImage", &reply, &e, "s", path);
        if (r < 0) {
                fail("GetImage", &e, r);
                sd_bus_error_free(&e);
                return r;
        }
        sd_bus_message_read(reply, "o", &o);
        *ret = strdup(o);
        sd_bus_message_unref(reply);
        return 0;
}

static int cmd_info(const char *path) {
        char *o;
        if (get_image(path, &o) < 0)
                return 1;
        print_image(o, true);
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
        sd_bus_message_read(reply, "o", &o);
        printf("%s\n", o);
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
        sd_bus_error e = SD_BUS_ERROR_NULL;
        sd_bus_message *reply = NULL;
        uint64_t start, length;
        uint32_t depth;
        int present, zero, data, compressed, first = 1;
        int64_t off;
        char *o;
        int r;

        if (get_image(path, &o) < 0)
                return 1;
        r = call(o, IFACE("Image"), "Map", &reply, &e, "tta{sv}", 0, 0, 0);
        free(o);
        if (r < 0)
                return fail("Map", &e, r);
        sd_bus_message_enter_container(reply, 'a', "(ttubbbbx)");
        while (sd_bus_message_read(reply, "(ttubbbbx)", &start, &length, &depth, &present, &zero, &data, &compressed,
                                   &off) > 0) {
                printf("%s{ \"start\": %" PRIu64 ", \"length\": %" PRIu64 ", \"depth\": %u, \"present\": %s, \"zero\": %s, "
                       "\"data\": %s, \"compressed\": %s",
                       first ? "[" : ",\n", start, length, depth, present ? "true" : "false", zero ? "true" : "false",
                       data ? "true" : "false", compressed ? "true" : "false");
                if (off >= 0)
                        printf(", \"offset\": %" PRId64, off);
                printf("}");
                first = 0;
        }
        printf(first ? "[]\n" : "]\n");
        sd_bus_message_unref(reply);
        return 0;
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
               "  map PATH                     Show allocation, as qemu-img map --output=json\n\n"
               "Options:\n"
               "  -h --help      Show this help\n"
               "     --json      JSON output for images, chains, info and check\n"
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
        else {
                fprintf(stderr, "diskchainctl: unknown command or missing argument: %s\n", argv[0]);
                r = 2;
        }
        sd_bus_flush_close_unref(bus);
        return r;
}
