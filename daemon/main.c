/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * diskchaind: parse the command line, load the configuration, scan the
 * storage roots, register the objects, take the bus name, and serve until
 * idle for --idle-timeout.  The idle exit releases the name first, so a
 * call that arrives meanwhile activates a fresh instance instead of being
 * lost.
 */

#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>

#include "config.h"
#include "daemon.h"

static void help(void) {
        printf("diskchaind [OPTIONS...]\n\n"
               "Live block operations on qcow2/raw image chains, on the system bus.\n\n"
               "  -h --help              Show this help\n"
               "     --version           Show the version\n"
               "     --config FILE       Configuration file (default: %s)\n"
               "     --root DIR          Storage root (repeatable; overrides the configuration)\n"
               "     --state-dir DIR     Where the daemon keeps its records (default: %s)\n"
               "     --runtime-dir DIR   Where the NBD sockets go, in its nbd/ (default: %s)\n"
               "     --idle-timeout SEC  Exit after SEC seconds without work (default 30, 0 = never)\n"
               "     --log-level LEVEL   err, warning, notice, info or debug\n",
               DEFAULT_CONFIG_FILE, DEFAULT_STATE_DIR, DEFAULT_RUNTIME_DIR);
}

static int parse_level(const char *s) {
        static const char *const names[] = { "emerg", "alert", "crit", "err", "warning", "notice", "info", "debug" };
        for (int i = 0; i < 8; i++)
                if (strcmp(names[i], s) == 0)
                        return i;
        return -1;
}

static uint64_t now_usec(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000u + (uint64_t) ts.tv_nsec / 1000u;
}

/* Every call that reaches us is activity. */
static int on_call(sd_bus_message *m, void *userdata, sd_bus_error *ret_error) {
        Manager *mgr = userdata;
        if (sd_bus_message_get_type(m, NULL) == 0 || sd_bus_message_is_method_call(m, NULL, NULL))
                mgr->last_call = now_usec();
        return 0;
}

static int on_signal(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        return sd_event_exit(sd_event_source_get_event(s), 0);
}

int main(int argc, char **argv) {
        enum { ARG_VERSION = 0x100, ARG_CONFIG, ARG_ROOT, ARG_STATE, ARG_RUNTIME, ARG_IDLE, ARG_LOG };
        static const struct option options[] = {
                { "help", no_argument, NULL, 'h' },
                { "version", no_argument, NULL, ARG_VERSION },
                { "config", required_argument, NULL, ARG_CONFIG },
                { "root", required_argument, NULL, ARG_ROOT },
                { "state-dir", required_argument, NULL, ARG_STATE },
                { "runtime-dir", required_argument, NULL, ARG_RUNTIME },
                { "idle-timeout", required_argument, NULL, ARG_IDLE },
                { "log-level", required_argument, NULL, ARG_LOG },
                {},
        };
        const char *config_file = DEFAULT_CONFIG_FILE, *state_dir = NULL, *runtime_dir = NULL;
        g_autoptr(GPtrArray) roots = g_ptr_array_new_with_free_func(g_free);
        uint64_t idle_usec = 30ULL * 1000000ULL;
        Manager *mgr = NULL;
        Config config = { 0 };
        int c, r;

        log_setup();
        while ((c = getopt_long(argc, argv, "h", options, NULL)) >= 0)
                switch (c) {
                case 'h':
                        help();
                        return 0;
                case ARG_VERSION:
                        printf("diskchaind %s\n", PACKAGE_VERSION);
                        return 0;
                case ARG_CONFIG:
                        config_file = optarg;
                        break;
                case ARG_STATE:
                        state_dir = optarg;
                        break;
                case ARG_RUNTIME:
                        if (optarg[0] != '/') {
                                fprintf(stderr, "diskchaind: --runtime-dir needs an absolute path\n");
                                return 1;
                        }
                        runtime_dir = optarg;
                        break;
                case ARG_ROOT: {
                        g_autofree char *canon = NULL;
                        if (optarg[0] != '/') {
                                fprintf(stderr, "diskchaind: --root needs an absolute path\n");
                                return 1;
                        }
                        canon = g_canonicalize_filename(optarg, "/");
                        g_ptr_array_add(roots, TAKE_PTR(canon));
                        break;
                }
                case ARG_IDLE: {
                        char *end;
                        double sec = strtod(optarg, &end);
                        if (*end || sec < 0) {
                                fprintf(stderr, "diskchaind: invalid --idle-timeout '%s'\n", optarg);
                                return 1;
                        }
                        idle_usec = (uint64_t) (sec * 1e6);
                        break;
                }
                case ARG_LOG:
                        log_max_level = parse_level(optarg);
                        if (log_max_level < 0) {
                                fprintf(stderr, "diskchaind: unknown log level '%s'\n", optarg);
                                return 1;
                        }
                        break;
                default:
                        return 1;
                }
        g_ptr_array_add(roots, NULL);
        r = config_load(&config, config_file, (char **) roots->pdata, state_dir, runtime_dir);
        if (r < 0)
                return 1;
        config.idle_timeout_usec = idle_usec;
        for (char **rt = config.roots; *rt; rt++)
                if (g_mkdir_with_parents(*rt, 0700) < 0)
                        log_error("cannot create storage root '%s': %m", *rt);

        r = manager_new(&mgr, &config);
        if (r < 0) {
                log_error("cannot set up: %s", strerror(-r));
                return 1;
        }
        sigset_t ss;
        sigemptyset(&ss);
        sigaddset(&ss, SIGTERM);
        sigaddset(&ss, SIGINT);
        sigprocmask(SIG_BLOCK, &ss, NULL);
        /* a peer that goes away (an NBD target's server) is an error on the write, not the daemon's end */
        signal(SIGPIPE, SIG_IGN);
        (void) sd_event_add_signal(mgr->event, NULL, SIGTERM, on_signal, NULL);
        (void) sd_event_add_signal(mgr->event, NULL, SIGINT, on_signal, NULL);

        r = sd_bus_open_system(&mgr->bus);
        if (r < 0) {
                log_error("cannot connect to the system bus: %s", strerror(-r));
                manager_free(mgr);
                return 1;
        }
        /* Nobody can call us before the name is taken: read the roots now. */
        (void) model_scan_initial(mgr);
        exports_restore(mgr);
        plans_load(mgr);
        r = polkit_setup(mgr);
        if (r >= 0)
                r = bus_register(mgr);
        if (r >= 0)
                r = sd_bus_attach_event(mgr->bus, mgr->event, 0);
        if (r >= 0)
                r = sd_bus_request_name(mgr->bus, BUS_NAME, 0);
        if (r < 0) {
                log_error("cannot own %s: %s", BUS_NAME, strerror(-r));
                manager_free(mgr);
                return 1;
        }
        log_info("diskchaind %s: serving %u image(s) in %s%s (records in %s)", PACKAGE_VERSION,
                 g_hash_table_size(mgr->images),
                 config.roots[0], config.roots[1] ? " and more" : "", config.state_dir);

        /* Idle means: no work, no job, and no call for --idle-timeout.  Timers of our
         * own (the look at the locks) do not count, only calls do (on_call). */
        mgr->last_call = now_usec();
        (void) sd_bus_add_filter(mgr->bus, NULL, on_call, mgr);
        for (;;) {
                bool idle = manager_is_idle(mgr) && mgr->config.idle_timeout_usec > 0;
                uint64_t now = now_usec(), deadline = mgr->last_call + mgr->config.idle_timeout_usec;

                if (!manager_is_idle(mgr))
                        mgr->last_call = now;
                if (idle && now >= deadline) {
                        /* Give the name back, answer whatever was already
                         * queued for us, then go. */
                        (void) sd_bus_release_name(mgr->bus, BUS_NAME);
                        while (sd_bus_process(mgr->bus, NULL) > 0)
                                ;
                        if (!manager_is_idle(mgr)) {
                                (void) sd_bus_request_name(mgr->bus, BUS_NAME, 0);
                                continue;
                        }
                        log_info("idle, exiting");
                        break;
                }
                r = sd_event_run(mgr->event, idle ? deadline - now : UINT64_MAX);
                if (r < 0) {
                        log_error("event loop failed: %s", strerror(-r));
                        break;
                }
                if (sd_event_get_state(mgr->event) == SD_EVENT_FINISHED) {
                        log_info("terminated, exiting");
                        break;
                }
        }
        manager_free(mgr);
        return r < 0 ? 1 : 0;
}
