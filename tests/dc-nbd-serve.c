/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * dc-nbd-serve: an NBD export of a chain (lib/nbd-server.c) for the tests,
 * with real NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy, libnbd) as
 * the judges.
 *
 *   dc-nbd-serve [--writable] [--root DIR]... [--name NAME] [--description TEXT]
 *                [--max-connections N] [--tls-dir DIR [--tls-verify-peer]] [--tls-psk FILE]
 *                [--cache-none] [--bitmap NAME]
 *                (--socket PATH | --tcp ADDR:PORT | --fd N)... IMAGE
 *
 * Opens IMAGE's chain as a dc_disk, listens on the unix socket PATH, on the
 * TCP address ADDR:PORT (an IPv4 or [IPv6] literal; port 0 picks one, and
 * "tcp PORT" is printed for each) and/or serves the connected socket N.
 * With --tls-dir (X.509: ca-cert.pem, server-cert.pem, server-key.pem)
 * and/or --tls-psk (a psktool keys file) every listener requires TLS; N is
 * served in plaintext.  --cache-none reads and writes data around the
 * page cache (dc_disk_set_cache).  --bitmap offers the top layer's bitmap
 * NAME, as it is at the start, as qemu:dirty-bitmap:NAME.  Prints "ready" once it listens, and serves
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
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "dc-internal.h" /* dc_disk_chain */

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

/* ADDR:PORT, ADDR an IPv4 literal or an IPv6 one in brackets; prints "tcp PORT". */
static int listen_tcp(const char *spec) {
        struct sockaddr_storage ss = { 0 };
        socklen_t len;
        char host[64];
        const char *colon = strrchr(spec, ':');
        size_t hl;
        int fd, port, one = 1;

        if (!colon || (hl = (size_t) (colon - spec)) >= sizeof host || (port = atoi(colon + 1)) < 0 || port > 65535) {
                fprintf(stderr, "dc-nbd-serve: --tcp %s: not ADDR:PORT\n", spec);
                exit(2);
        }
        memcpy(host, spec, hl);
        host[hl] = 0;
        if (host[0] == '[' && hl > 2 && host[hl - 1] == ']') {
                struct sockaddr_in6 *a = (struct sockaddr_in6 *) &ss;
                host[hl - 1] = 0;
                a->sin6_family = AF_INET6;
                a->sin6_port = htons((uint16_t) port);
                if (inet_pton(AF_INET6, host + 1, &a->sin6_addr) != 1)
                        port = -1;
                len = sizeof *a;
        } else {
                struct sockaddr_in *a = (struct sockaddr_in *) &ss;
                a->sin_family = AF_INET;
                a->sin_port = htons((uint16_t) port);
                if (inet_pton(AF_INET, host, &a->sin_addr) != 1)
                        port = -1;
                len = sizeof *a;
        }
        if (port < 0) {
                fprintf(stderr, "dc-nbd-serve: --tcp %s: not an address\n", spec);
                exit(2);
        }
        fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
            bind(fd, (struct sockaddr *) &ss, len) < 0 || listen(fd, 128) < 0 ||
            getsockname(fd, (struct sockaddr *) &ss, &len) < 0) {
                perror(spec);
                exit(1);
        }
        printf("tcp %u\n", ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *) &ss)->sin6_port
                                                          : ((struct sockaddr_in *) &ss)->sin_port));
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
                { "tcp", required_argument, NULL, 't' },
                { "tls-dir", required_argument, NULL, 'x' },
                { "tls-verify-peer", no_argument, NULL, 'v' },
                { "tls-psk", required_argument, NULL, 'p' },
                { "cache-none", no_argument, NULL, 'c' },
                { "bitmap", required_argument, NULL, 'b' },
                {},
        };
        struct dc_nbd_export_options eo = { .name = "", .changed = changed };
        struct dc_open_options oo = { 0 };
        const char *roots[16] = { 0 }, *sockets[8] = { 0 }, *tcps[8] = { 0 };
        int fds[8], nroots = 0, nsockets = 0, nfds = 0, ntcps = 0, c, sig;
        struct dc_nbd_tls_options to = { 0 };
        dc_nbd_tls *tls = NULL;
        struct dc_nbd_export_stats st;
        dc_nbd_export *e = NULL;
        dc_disk *disk = NULL;
        sigset_t mask;
        unsigned depth;
        bool cache_none = false;

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
                case 't':
                        if (ntcps < 8)
                                tcps[ntcps++] = optarg;
                        break;
                case 'x':
                        to.x509_dir = optarg;
                        break;
                case 'v':
                        to.verify_peer = true;
                        break;
                case 'p':
                        to.psk_file = optarg;
                        break;
                case 'c':
                        cache_none = true;
                        break;
                case 'b':
                        eo.bitmap_name = optarg;
                        break;
                default:
                        return 2;
                }
        }
        if (optind != argc - 1 || (nsockets == 0 && nfds == 0 && ntcps == 0)) {
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

        if (dc_disk_open(argv[optind], &oo, &disk) < 0) {
                fprintf(stderr, "dc-nbd-serve: %s\n", dc_get_error());
                return 1;
        }
        if (cache_none)
                dc_disk_set_cache(disk, DC_CACHE_NONE);
        if (eo.bitmap_name && dc_image_bitmap_copy(dc_disk_chain(disk), eo.bitmap_name, &eo.bitmap) < 0) {
                fprintf(stderr, "dc-nbd-serve: %s\n", dc_get_error());
                return 1;
        }
        if (dc_nbd_export_new(disk, &eo, &e) < 0) {
                fprintf(stderr, "dc-nbd-serve: %s\n", dc_get_error());
                return 1;
        }
        if ((to.x509_dir || to.psk_file) && dc_nbd_tls_new(&to, &tls) < 0) {
                fprintf(stderr, "dc-nbd-serve: %s\n", dc_get_error());
                return 1;
        }
        for (int i = 0; i < nsockets; i++)
                if (dc_nbd_export_listen_tls(e, listen_unix(sockets[i]), tls, NULL, NULL) < 0) {
                        fprintf(stderr, "dc-nbd-serve: %s\n", dc_get_error());
                        return 1;
                }
        for (int i = 0; i < ntcps; i++)
                if (dc_nbd_export_listen_tls(e, listen_tcp(tcps[i]), tls, NULL, NULL) < 0) {
                        fprintf(stderr, "dc-nbd-serve: %s\n", dc_get_error());
                        return 1;
                }
        /* the listeners hold their references */
        tls = dc_nbd_tls_unref(tls);
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
