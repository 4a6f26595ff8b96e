/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * dc-nbd-serve: an NBD export of a chain (lib/nbd-server.c) for the tests,
 * with real NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy, libnbd) as
 * the judges.
 *
 *   dc-nbd-serve [--writable] [--root DIR]... [--name NAME] [--description TEXT]
 *                [--max-connections N] (--socket PATH | --fd N)... IMAGE
 *
 * Opens IMAGE's chain as a dc_disk, listens on the unix socket PATH and/or
 * serves the connected socket N, prints "ready" once it listens, and serves
 * until SIGTERM or SIGINT.  Then it frees the export (which waits for the
 * requests in flight and flushes) and prints "stats clients=... requests=...
 * read=... written=... changed=N depth=LAYERS" before exiting 0.
 */

#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "diskchain.h"

static unsigned long changed_calls;

static void changed(void *userdata) {
        (void) userdata;
        __atomic_add_fetch(&changed_calls, 1, __ATOMIC_RELAXED);
}

static int listen_unix(const char *path) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        int fd;

        if (strlen(path) >= sizeof sa.sun_path) {
                fprintf(stderr, "dc-nbd-serve: socket path too long\n");
                exit(2);
        }
        strcpy(sa.sun_path, path);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0 || bind(fd, (struct sockaddr *) &sa, sizeof sa) < 0 || listen(fd, 128) < 0) {
                perror(path);
                exit(1);
        }
        return fd;
}

int main(int argc, char **argv) {
        static const struct option longopts[] = {
                { "writable", no_argument, NULL, 'w' },
                { "root", required_argument, NULL, 'r' },
                { "name", required_argument, NULL, 'n' },
                { "description", required_argument, NULL, 'd' },
                { "max-connections", required_argument, NULL, 'm' },
                { "socket", required_argument, NULL, 's' },
                { "fd", required_argument, NULL, 'f' },
                {},
        };
        struct dc_nbd_export_options eo = { .name = "", .changed = changed };
        struct dc_open_options oo = { 0 };
        const char *roots[16] = { 0 }, *sockets[8] = { 0 };
        int fds[8], nroots = 0, nsockets = 0, nfds = 0, c, sig;
        struct dc_nbd_export_stats st;
        dc_nbd_export *e = NULL;
        dc_disk *disk = NULL;
        sigset_t mask;
        unsigned depth;

        while ((c = getopt_long(argc, argv, "", longopts, NULL)) >= 0) {
                switch (c) {
                case 'w':
                        eo.writable = oo.writable = true;
                        break;
                case 'r':
                        if (nroots < 15)
                                roots[nroots++] = optarg;
                        break;
                case 'n':
                        eo.name = optarg;
                        break;
                case 'd':
                        eo.description = optarg;
                        break;
                case 'm':
                        eo.max_connections = (unsigned) atoi(optarg);
                        break;
                case 's':
                        if (nsockets < 8)
                                sockets[nsockets++] = optarg;
                        break;
                case 'f':
                        if (nfds < 8)
                                fds[nfds++] = atoi(optarg);
                        break;
                default:
                        return 2;
                }
        }
        if (optind != argc - 1 || (nsockets == 0 && nfds == 0)) {
                fprintf(stderr, "usage: see the comment at the top of dc-nbd-serve.c\n");
                return 2;
        }
        if (nroots)
                oo.roots = roots;

        /* the export's threads inherit the mask: only sigwait() below sees the signals */
        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        pthread_sigmask(SIG_BLOCK, &mask, NULL);

        if (dc_disk_open(argv[optind], &oo, &disk) < 0 || dc_nbd_export_new(disk, &eo, &e) < 0) {
                fprintf(stderr, "dc-nbd-serve: %s\n", dc_get_error());
                return 1;
        }
        for (int i = 0; i < nsockets; i++)
                if (dc_nbd_export_listen(e, listen_unix(sockets[i]), NULL, NULL) < 0) {
                        fprintf(stderr, "dc-nbd-serve: %s\n", dc_get_error());
                        return 1;
                }
        for (int i = 0; i < nfds; i++)
                if (dc_nbd_export_serve(e, fds[i]) < 0) {
                        fprintf(stderr, "dc-nbd-serve: %s\n", dc_get_error());
                        return 1;
                }
        printf("ready\n");
        fflush(stdout);

        while (sigwait(&mask, &sig) != 0 || (sig != SIGTERM && sig != SIGINT))
                ;
        dc_nbd_export_get_stats(e, &st);
        e = dc_nbd_export_free(e);
        depth = dc_disk_depth(disk);
        disk = dc_disk_unref(disk); /* the export dropped its own reference */
        for (int i = 0; i < nsockets; i++)
                unlink(sockets[i]);
        printf("stats clients=%u requests=%llu read=%llu written=%llu changed=%lu depth=%u\n", st.clients,
               (unsigned long long) st.requests, (unsigned long long) st.bytes_read,
               (unsigned long long) st.bytes_written, __atomic_load_n(&changed_calls, __ATOMIC_RELAXED), depth);
        return 0;
}
