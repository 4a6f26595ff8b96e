/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The NBD exports of the daemon, as a model apart from their bus glue
 * (bus-export.c), the way job.c is apart from bus-job.c.
 *
 * Design notes
 * ------------
 * - An export is a chain's write path (dc_disk) with the library's NBD
 *   server over it (lib/nbd-server.c).  Everything that touches a file --
 *   opening the chain, binding the socket, serving requests, writing the
 *   record -- happens on the pool's workers or on the server's own
 *   threads; the loop keeps the table and announces.
 * - Lifecycle: STARTING from the call that asks for it (the name is
 *   reserved and the images claimed on the loop, with nothing waiting in
 *   between, so a second call cannot slip in) until a worker has opened the
 *   chain, bound the socket and started the server; LIVE while it serves;
 *   STOPPING while a worker frees the server (the requests in flight
 *   complete and their replies go out, then every client is disconnected),
 *   removes the socket and drops the chain.  Only a LIVE export is on the
 *   bus; a stopping one leaves it when it is gone.
 * - Who may connect: the socket is made under a temporary name, given to
 *   the export's creator with mode 0600, and only then renamed into place,
 *   so at no moment can another user connect to it; the server checks the
 *   peer's SO_PEERCRED again on each connection (root and the creator).
 *   Anyone else goes through Chain.OpenNBD, which polkit decides.
 * - A job on an exported chain writes through the export's disk
 *   (JobStart.via): the clients' writes meet its filters, and a pivot
 *   moves the disk, not the clients, to the new active layer.
 *   exports_follow() then moves the export's claims, its Chain and its
 *   record after it.  A snapshot of an exported chain goes through the
 *   disk the same way (bus-chain.c).
 * - Persistent exports are recorded in STATE_DIR/exports/NAME, a key file
 *   written on a worker (g_file_set_contents: a new file renamed over the
 *   old), and recreated when the daemon starts.  A record whose chain
 *   cannot be opened is kept and reported: the files may come back.
 * - TCP (issue 10): off unless [NBD] TCPListen= names the addresses an
 *   export may listen on (diskchain.conf(5)).  A TCP peer has no
 *   SO_PEERCRED, so TLS is what lets it in: the listener requires
 *   STARTTLS, and whoever completes the TLS handshake is served -- a client
 *   certificate the configured CA signed (TLSVerifyPeer=, the default) or
 *   a key of the PSK file.  Without credentials a TCP export is refused,
 *   but on a loopback address when TCPPlaintextLoopback=yes says that any
 *   local user may connect in plaintext.  The credentials are loaded on the
 *   worker for each export, so renewed certificates take effect with the
 *   next export.  'tcp' without 'socket' makes no unix socket; with both,
 *   both listen (the unix one for its owner, in plaintext).  Port 0 lets
 *   the kernel choose; the port bound is what Uri and the record show.
 * - The server calls back on its threads when clients come and go and at
 *   most every 100 ms while serving; the callback only writes an eventfd,
 *   and on the loop the counters that changed are announced.
 */

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <stdio.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "daemon.h"

/* --- the table -------------------------------------------------------------------- */

static void message_unref(void *m) {
        sd_bus_message_unref(m);
}

static void export_struct_free(Export *e) {
        if (!e)
                return;
        free(e->name);
        free(e->object);
        free(e->active);
        free(e->chain_object);
        free(e->socket);
        free(e->tcp);
        free(e->bitmap);
        free(e->claim);
        free(e->via);
        free(e->fleece);
        free(e->checkpoint);
        g_strfreev(e->paths);
        if (e->stop_waiters)
                g_ptr_array_free(e->stop_waiters, TRUE);
        free(e);
}

char **model_export_paths(Manager *mgr) {
        GPtrArray *a = g_ptr_array_new();
        GHashTableIter it;
        Export *e;

        g_hash_table_iter_init(&it, mgr->exports);
        while (g_hash_table_iter_next(&it, NULL, (void **) &e))
                if (e->state != EXPORT_STARTING)
                        g_ptr_array_add(a, g_strdup(e->object));
        g_ptr_array_add(a, NULL);
        return (char **) g_ptr_array_free(a, FALSE);
}

Export *export_of_path(Manager *mgr, const char *path) {
        const char *name = claims_exporter(mgr->claims, path);
        return name ? g_hash_table_lookup(mgr->exports, name) : NULL;
}

bool export_name_valid(const char *name) {
        return dc_name_valid(name);
}

/* The active layer's file name without its extension, in the characters a name may have; unique. */
char *export_default_name(Manager *mgr, const char *active, const char *suffix) {
        g_autofree char *base = g_path_get_basename(active);
        g_autofree char *stem = NULL;
        char *dot = strrchr(base, '.');
        GString *s;

        if (dot && dot != base)
                *dot = 0;
        s = g_string_new(NULL);
        for (const char *c = base; *c && s->len < 48; c++)
                g_string_append_c(s, g_ascii_isalnum(*c) || strchr("_-", *c) ? *c : '_');
        if (s->len == 0 || s->str[0] == '-')
                g_string_prepend(s, "disk");
        g_string_append(s, suffix);
        stem = g_string_free(s, FALSE);
        if (!g_hash_table_contains(mgr->exports, stem))
                return TAKE_PTR(stem);
        for (unsigned i = 2; i < 100000; i++) {
                char *n = g_strdup_printf("%s-%u", stem, i);
                if (!g_hash_table_contains(mgr->exports, n))
                        return n;
                g_free(n);
        }
        return NULL;
}

/* --- the socket -------------------------------------------------------------------- */

/*
 * The directory of PATH, opened without following a symlink as its last
 * component, and trusted to hold a socket for UID: ours (the nbd
 * directory), or UID's own and writable by nobody else.  Root's
 * directories are root's alone: a user polkit lets export must not
 * become a way to put a file where only root may (/etc/cron.d, say).
 */
static int socket_dir_open(const char *path, const char *own_dir, uid_t uid, char **ret_base) {
        g_autofree char *dir = g_path_get_dirname(path);
        g_autofree char *base = g_path_get_basename(path);
        struct stat st;
        int dfd;

        if (!export_name_valid(base))
                return dc_set_error(EINVAL, "socket name '%s' must be 1..64 characters of A-Z a-z 0-9 . _ -", base);
        dfd = open(dir, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (dfd < 0)
                return dc_set_error(errno, "socket directory '%s': %s", dir, strerror(errno));
        if (fstat(dfd, &st) < 0) {
                int e = errno;
                close(dfd);
                return dc_set_error(e, "socket directory '%s': %s", dir, strerror(e));
        }
        if (strcmp(dir, own_dir) != 0 && (st.st_uid != uid || (st.st_mode & 022))) {
                close(dfd);
                return dc_set_error(EPERM, "socket directory '%s' must belong to the caller and be writable by nobody else",
                                    dir);
        }
        *ret_base = TAKE_PTR(base);
        return dfd;
}

/* Is the socket NAME in DFD one nobody listens on any more (left by a daemon that died)? */
static bool socket_stale(int dfd, const char *name) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        struct stat st;
        int fd, r;

        if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0 || !S_ISSOCK(st.st_mode))
                return false;
        snprintf(sa.sun_path, sizeof sa.sun_path, "/proc/self/fd/%d/%s", dfd, name);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
                return false;
        r = connect(fd, (struct sockaddr *) &sa, sizeof sa);
        r = r < 0 ? errno : 0;
        close(fd);
        return r == ECONNREFUSED;
}

/* A listening socket at PATH for UID (0600, owned by UID), appearing there only once it is so. */
static int socket_make(const char *path, const char *own_dir, uid_t uid, struct stat *ret_st) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        _cleanup_free_ char *base = NULL;
        g_autofree char *tmp = NULL;
        int dfd, fd = -1, r;

        dfd = socket_dir_open(path, own_dir, uid, &base);
        if (dfd < 0)
                return dfd;
        tmp = g_strdup_printf(".%s.%d.new", base, (int) gettid());
        (void) unlinkat(dfd, tmp, 0);
        if (snprintf(sa.sun_path, sizeof sa.sun_path, "/proc/self/fd/%d/%s", dfd, tmp) >= (int) sizeof sa.sun_path) {
                r = dc_set_error(ENAMETOOLONG, "socket name '%s' is too long", base);
                goto out;
        }
        if (faccessat(dfd, base, F_OK, AT_SYMLINK_NOFOLLOW) == 0 && !socket_stale(dfd, base)) {
                r = dc_set_error(EEXIST, "'%s' exists already", path);
                goto out;
        }
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0 || bind(fd, (struct sockaddr *) &sa, sizeof sa) < 0) {
                r = dc_set_error(errno, "cannot make the socket '%s': %s", path, strerror(errno));
                goto out;
        }
        if (fchownat(dfd, tmp, uid, (gid_t) -1, AT_SYMLINK_NOFOLLOW) < 0 || fchmodat(dfd, tmp, 0600, 0) < 0 ||
            listen(fd, 64) < 0 || renameat(dfd, tmp, dfd, base) < 0 ||
            fstatat(dfd, base, ret_st, AT_SYMLINK_NOFOLLOW) < 0) {
                r = dc_set_error(errno, "cannot set up the socket '%s': %s", path, strerror(errno));
                (void) unlinkat(dfd, tmp, 0);
                goto out;
        }
        close(dfd);
        return fd;
out:
        if (fd >= 0)
                close(fd);
        close(dfd);
        return r;
}

/* Remove the socket at PATH if it is still the one we made (ST). */
static void socket_remove(const char *path, const struct stat *st) {
        g_autofree char *dir = g_path_get_dirname(path);
        g_autofree char *base = g_path_get_basename(path);
        struct stat now;
        int dfd = open(dir, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);

        if (dfd < 0)
                return;
        if (fstatat(dfd, base, &now, AT_SYMLINK_NOFOLLOW) == 0 && now.st_dev == st->st_dev &&
            now.st_ino == st->st_ino)
                (void) unlinkat(dfd, base, 0);
        close(dfd);
}

/* --- TCP ---------------------------------------------------------------------------- */

int tcp_address_parse(const char *str, bool need_port, struct sockaddr_storage *ret, socklen_t *ret_len,
                      bool *ret_has_port) {
        g_autofree char *host = NULL;
        const char *port = NULL;
        unsigned long p = 0;
        char *end;

        if (str[0] == '[') {
                const char *close = strchr(str, ']');
                if (!close || (close[1] && close[1] != ':'))
                        return -EINVAL;
                host = g_strndup(str + 1, (gsize) (close - str - 1));
                port = close[1] ? close + 2 : NULL;
                if (!strchr(host, ':'))
                        return -EINVAL; /* brackets are for IPv6 */
        } else if (strchr(str, ':') && strchr(str, ':') == strrchr(str, ':')) {
                const char *colon = strchr(str, ':');
                host = g_strndup(str, (gsize) (colon - str));
                port = colon + 1;
        } else
                host = g_strdup(str); /* IPv4, or IPv6 without a port */
        if (port) {
                if (!*port || !g_ascii_isdigit(*port))
                        return -EINVAL;
                errno = 0;
                p = strtoul(port, &end, 10);
                if (errno || *end || p > 65535)
                        return -EINVAL;
        } else if (need_port)
                return -EINVAL;
        memset(ret, 0, sizeof *ret);
        if (inet_pton(AF_INET, host, &((struct sockaddr_in *) ret)->sin_addr) == 1) {
                struct sockaddr_in *a = (struct sockaddr_in *) ret;
                a->sin_family = AF_INET;
                a->sin_port = htons((uint16_t) p);
                *ret_len = sizeof *a;
        } else if (inet_pton(AF_INET6, host, &((struct sockaddr_in6 *) ret)->sin6_addr) == 1) {
                struct sockaddr_in6 *a = (struct sockaddr_in6 *) ret;
                if (port && str[0] != '[')
                        return -EINVAL;
                a->sin6_family = AF_INET6;
                a->sin6_port = htons((uint16_t) p);
                *ret_len = sizeof *a;
        } else
                return -EINVAL;
        if (ret_has_port)
                *ret_has_port = port != NULL;
        return 0;
}

static bool tcp_loopback(const struct sockaddr_storage *ss) {
        if (ss->ss_family == AF_INET)
                return (ntohl(((const struct sockaddr_in *) ss)->sin_addr.s_addr) >> 24) == 127;
        const struct in6_addr *a = &((const struct sockaddr_in6 *) ss)->sin6_addr;
        return IN6_IS_ADDR_LOOPBACK(a) || (IN6_IS_ADDR_V4MAPPED(a) && a->s6_addr[12] == 127);
}

static uint16_t tcp_port(const struct sockaddr_storage *ss) {
        return ntohs(ss->ss_family == AF_INET ? ((const struct sockaddr_in *) ss)->sin_port
                                              : ((const struct sockaddr_in6 *) ss)->sin6_port);
}

static bool tcp_same_host(const struct sockaddr_storage *a, const struct sockaddr_storage *b) {
        if (a->ss_family != b->ss_family)
                return false;
        if (a->ss_family == AF_INET)
                return ((const struct sockaddr_in *) a)->sin_addr.s_addr == ((const struct sockaddr_in *) b)->sin_addr.s_addr;
        return memcmp(&((const struct sockaddr_in6 *) a)->sin6_addr, &((const struct sockaddr_in6 *) b)->sin6_addr,
                      sizeof(struct in6_addr)) == 0;
}

/* "ADDR:PORT", with IPv6 in brackets. */
static char *tcp_format(const struct sockaddr_storage *ss) {
        char host[INET6_ADDRSTRLEN];

        if (ss->ss_family == AF_INET) {
                inet_ntop(AF_INET, &((const struct sockaddr_in *) ss)->sin_addr, host, sizeof host);
                return g_strdup_printf("%s:%u", host, tcp_port(ss));
        }
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *) ss)->sin6_addr, host, sizeof host);
        return g_strdup_printf("[%s]:%u", host, tcp_port(ss));
}

int export_tcp_check(Manager *mgr, const char *tcp, bool *ret_tls, sd_bus_error *error) {
        const Config *c = &mgr->config;
        struct sockaddr_storage want;
        socklen_t len;
        bool allowed = false;

        if (!c->tcp_listen)
                return sd_bus_error_setf(error, ERROR_PREFIX "NotSupported",
                                         "exports over TCP are off: [NBD] TCPListen= in diskchain.conf names the "
                                         "addresses they may listen on");
        if (tcp_address_parse(tcp, true, &want, &len, NULL) < 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "tcp '%s' must be ADDRESS:PORT, an IPv4 address or an IPv6 one in brackets",
                                         tcp);
        for (char **a = c->tcp_listen; *a && !allowed; a++) {
                struct sockaddr_storage ok;
                bool has_port;
                if (tcp_address_parse(*a, false, &ok, &len, &has_port) >= 0)
                        allowed = tcp_same_host(&ok, &want) && (!has_port || tcp_port(&ok) == tcp_port(&want));
        }
        if (!allowed)
                return sd_bus_error_setf(error, ERROR_PREFIX "NotSupported",
                                         "tcp '%s' is not an address [NBD] TCPListen= in diskchain.conf allows", tcp);
        if (tcp_loopback(&want) && c->tcp_plaintext_loopback) {
                *ret_tls = false;
                return 0;
        }
        if (!c->tls_dir && !c->tls_psk_file)
                return sd_bus_error_setf(error, ERROR_PREFIX "NotSupported",
                                         "an export on TCP '%s' needs TLS, and no credentials are configured: "
                                         "[NBD] TLSCredentials= or TLSPSKFile= in diskchain.conf%s",
                                         tcp,
                                         tcp_loopback(&want) ? " (or TCPPlaintextLoopback=yes, for loopback addresses)"
                                                             : "");
        *ret_tls = true;
        return 0;
}

/* A listening TCP socket on TCP ("ADDR:PORT"); the address bound, port included, in *RET_BOUND. */
static int tcp_make(const char *tcp, char **ret_bound) {
        struct sockaddr_storage ss;
        socklen_t len;
        int fd, one = 1, r;

        if (tcp_address_parse(tcp, true, &ss, &len, NULL) < 0)
                return dc_set_error(EINVAL, "tcp '%s' is not ADDRESS:PORT", tcp);
        fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return dc_set_error(errno, "cannot make a TCP socket: %s", strerror(errno));
        /* "::" means IPv6 only: an IPv4 address is an entry of TCPListen= of its own */
        if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
            (ss.ss_family == AF_INET6 && setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one) < 0) ||
            bind(fd, (struct sockaddr *) &ss, len) < 0 || listen(fd, 64) < 0 ||
            getsockname(fd, (struct sockaddr *) &ss, &len) < 0) {
                r = dc_set_error(errno, "cannot listen on %s: %s", tcp, strerror(errno));
                close(fd);
                return r;
        }
        *ret_bound = tcp_format(&ss);
        return fd;
}

/* --- records of persistent exports ----------------------------------------------- */

static char *record_path(Manager *mgr, const char *name) {
        return g_build_filename(mgr->config.state_dir, "exports", name, NULL);
}

/* On a worker. */
static int record_write(Manager *mgr, const Export *e, const char *active, const char *tcp) {
        g_autoptr(GKeyFile) kf = g_key_file_new();
        g_autoptr(GError) err = NULL;
        g_autofree char *dir = g_build_filename(mgr->config.state_dir, "exports", NULL);
        g_autofree char *path = record_path(mgr, e->name);
        g_autofree char *data = NULL;
        gsize len;

        g_key_file_set_string(kf, "Export", "Name", e->name);
        g_key_file_set_string(kf, "Export", "Active", active);
        g_key_file_set_boolean(kf, "Export", "Writable", e->writable);
        if (e->socket)
                g_key_file_set_string(kf, "Export", "Socket", e->socket);
        if (tcp)
                g_key_file_set_string(kf, "Export", "TCP", tcp);
        g_key_file_set_uint64(kf, "Export", "MaxConnections", e->max_connections);
        g_key_file_set_string(kf, "Export", "Cache", cache_modes[e->cache]);
        g_key_file_set_uint64(kf, "Export", "Owner", e->uid);
        data = g_key_file_to_data(kf, &len, NULL);
        if (g_mkdir_with_parents(dir, 0700) < 0)
                return dc_set_error(errno, "cannot make '%s': %s", dir, strerror(errno));
        if (!g_file_set_contents_full(path, data, (gssize) len, G_FILE_SET_CONTENTS_CONSISTENT, 0600, &err))
                return dc_set_error(EIO, "cannot record the export '%s': %s", e->name, err->message);
        return 0;
}

/* --- starting ------------------------------------------------------------------------ */

/* What a worker needs to open an export, and what it made. */
typedef struct OpenOp {
        Export *e;            /* only its immutable fields are read off the loop */
        char *active, *socket, *own_dir;
        char *tcp, *tcp_bound;   /* as asked, and as bound */
        struct dc_nbd_tls_options tls; /* what TLS needs, when it is required (else zeroed) */
        char *tls_dir, *tls_psk_file;
        char **expect, **roots;
        unsigned max_depth;
        int fd, client_fd;
        dc_disk *disk;
        dc_disk *via_disk;    /* the live export's disk, for a point-in-time view */
        dc_snapshot *view;
        bool fleece_made;
        dc_nbd_export *nbd;
        struct stat socket_st;
} OpenOp;

static void open_op_free(void *p) {
        OpenOp *op = p;
        free(op->active);
        free(op->socket);
        free(op->own_dir);
        free(op->tcp);
        free(op->tcp_bound);
        free(op->tls_dir);
        free(op->tls_psk_file);
        g_strfreev(op->expect);
        g_strfreev(op->roots);
        if (op->fd >= 0)
                close(op->fd);
        if (op->client_fd >= 0)
                close(op->client_fd);
        dc_nbd_export_free(op->nbd);
        dc_snapshot_free(op->view);
        dc_disk_unref(op->disk);
        dc_disk_unref(op->via_disk);
        free(op);
}

static bool export_allow(void *userdata, uid_t uid, pid_t pid) {
        Export *e = userdata;
        return uid == 0 || uid == e->uid;
}

static void export_changed_cb(void *userdata) {
        Manager *mgr = userdata;
        uint64_t one = 1;
        (void) !write(mgr->export_fd, &one, sizeof one);
}

/*
 * A point-in-time view: the fleecing image made next to the active layer,
 * then the view on the disk (the live export's, or IMG's own), the bitmap
 * frozen and the checkpoint added at its point in time.
 */
static int open_view(OpenOp *op, dc_image *img, const struct dc_open_options *oo, dc_bitmap_copy **ret_bitmap) {
        Export *e = op->e;
        int r;

        if (op->via_disk)
                op->disk = dc_disk_ref(op->via_disk);
        else {
                r = dc_disk_new(img, oo, &op->disk); /* IMG is the disk's, also on failure */
                if (r < 0)
                        return r;
        }
        r = dc_image_create(e->fleece, dc_disk_size(op->disk),
                            &(struct dc_create_options){ .backing_format = -1 }, oo->roots);
        if (r < 0)
                return r;
        op->fleece_made = true;
        return dc_snapshot_new(op->disk,
                               &(struct dc_snapshot_options){ .fleece = e->fleece, .open = oo,
                                                              .discard_after_read = e->discard_after_read,
                                                              .break_snapshot = e->break_snapshot,
                                                              .cbw_timeout_ms = e->cbw_timeout_ms,
                                                              .bitmap = e->bitmap, .ret_bitmap = ret_bitmap,
                                                              .checkpoint = e->checkpoint },
                               &op->view);
}

static void export_open_run(Work *w) {
        OpenOp *op = w->data;
        Export *e = op->e;
        struct dc_open_options oo = { .roots = (const char *const *) op->roots, .oracle = &w->mgr->oracle,
                                      .max_depth = op->max_depth, .writable = e->writable };
        dc_image *img = NULL;
        dc_nbd_tls *tls = NULL;
        dc_bitmap_copy *bits = NULL;
        unsigned i = 0;
        int lfd = -1, tfd = -1, r;

        /* a view adding a checkpoint writes the active layer's bitmaps */
        if (e->snapshot && e->checkpoint)
                oo.writable = true;
        /* a view of a live export uses its disk: the export's chain, claimed since (nothing to check) */
        r = op->via_disk ? 0 : dc_image_open(op->active, &oo, &img);
        /* the chain polkit was asked about, and nothing else */
        for (dc_image *l = r >= 0 ? img : NULL; l; l = dc_image_backing(l), i++)
                if (!op->expect[i] || strcmp(dc_image_path(l), op->expect[i]) != 0) {
                        r = dc_set_error(ESTALE, "the chain of '%s' changed while the export was asked for",
                                         op->active);
                        break;
                }
        if (r >= 0 && op->expect[i] && !op->via_disk)
                r = dc_set_error(ESTALE, "the chain of '%s' changed while the export was asked for", op->active);
        if (r < 0) {
                dc_image_close(img);
                goto out;
        }
        if (e->snapshot) {
                r = open_view(op, TAKE_PTR(img), &oo, e->bitmap ? &bits : NULL);
                if (r < 0)
                        goto out;
        } else {
                /* the bitmap as it is now: the export's point in time (also what a failed start reports) */
                if (e->bitmap) {
                        r = dc_image_bitmap_copy(img, e->bitmap, &bits);
                        if (r < 0) {
                                dc_image_close(img);
                                goto out;
                        }
                }
                r = dc_disk_new(img, &oo, &op->disk);
                if (r < 0)
                        goto out;
                dc_disk_set_cache(op->disk, e->cache);
        }
        if (op->socket) {
                lfd = socket_make(op->socket, op->own_dir, e->uid, &op->socket_st);
                if (lfd < 0) {
                        r = lfd;
                        goto out;
                }
        }
        r = dc_nbd_export_new(op->disk,
                              &(struct dc_nbd_export_options){ .name = e->name, .description = op->active,
                                                               .writable = e->writable,
                                                               .max_connections = e->max_connections,
                                                               .bitmap_name = e->bitmap, .bitmap = bits,
                                                               .snapshot = op->view,
                                                               .changed = export_changed_cb, .userdata = w->mgr },
                              &op->nbd);
        if (r >= 0)
                bits = NULL; /* the export's */
        if (r >= 0 && lfd >= 0)
                r = dc_nbd_export_listen(op->nbd, TAKE_FD(lfd), export_allow, e);
        if (r >= 0 && op->tcp && e->tls)
                r = dc_nbd_tls_new(&op->tls, &tls);
        if (r >= 0 && op->tcp) {
                tfd = tcp_make(op->tcp, &op->tcp_bound);
                /* no peer credentials on TCP: TLS (or the administrator's plaintext loopback) decides */
                r = tfd < 0 ? tfd : dc_nbd_export_listen_tls(op->nbd, TAKE_FD(tfd), tls, NULL, NULL);
        }
        tls = dc_nbd_tls_unref(tls); /* the listener holds its own */
        if (r >= 0 && op->fd >= 0)
                r = dc_nbd_export_serve(op->nbd, TAKE_FD(op->fd));
        if (r >= 0 && e->persistent)
                r = record_write(w->mgr, e, op->active, op->tcp_bound);
out:
        dc_bitmap_copy_free(bits);
        if (lfd >= 0)
                close(lfd);
        work_capture_error(w, r);
        if (r < 0) {
                op->nbd = dc_nbd_export_free(op->nbd);
                if (op->socket && op->socket_st.st_ino)
                        socket_remove(op->socket, &op->socket_st);
                op->view = dc_snapshot_free(op->view);
                if (op->fleece_made)
                        (void) dc_path_unlink(e->fleece, (const char *const *) op->roots, NULL);
                op->disk = dc_disk_unref(op->disk);
        }
}

static void export_release(Export *e) {
        if (e->snapshot) {
                (void) claims_release(e->mgr->claims, e->claim, e->paths, e->fleece);
                model_changed(e->mgr, (char *[]){ e->fleece, NULL });
        } else
                claims_unexport(e->mgr->claims, e->name, e->paths);
        model_changed(e->mgr, e->paths);
}

static void export_open_done(Work *w) {
        OpenOp *op = w->data;
        Export *e = op->e;
        Manager *mgr = w->mgr;

        if (w->r < 0) {
                log_fields(LOG_WARNING, (const char *const[]){ "DISKCHAIN_EXPORT", e->name, "DISKCHAIN_IMAGE", e->active, NULL },
                           "export '%s' of '%s' did not start: %s", e->name, e->active,
                           w->error ? w->error : strerror(-w->r));
                if (w->m)
                        (void) reply_error_errno(w->m, w->r, w->error);
                if (e->on_live)
                        e->on_live(mgr, e->name, w->r, w->error ? w->error : strerror(-w->r), e->on_live_userdata);
                export_release(e);
                g_hash_table_remove(mgr->exports, e->name);
                return;
        }
        e->disk = TAKE_PTR(op->disk);
        e->nbd = TAKE_PTR(op->nbd);
        e->view = TAKE_PTR(op->view);
        e->socket_st = op->socket_st;
        if (op->tcp_bound) {
                free(e->tcp);
                e->tcp = TAKE_PTR(op->tcp_bound);
        }
        e->served = e->anonymous;
        e->state = EXPORT_LIVE;
        /* a view may have added a checkpoint bitmap: the active layer's file changed */
        if (e->snapshot)
                model_refresh(mgr, e->paths);
        e->chain_object = chain_object_path(e->active);
        export_send_added(e);
        log_fields(LOG_INFO, (const char *const[]){ "DISKCHAIN_EXPORT", e->name, "DISKCHAIN_IMAGE", e->active, NULL },
                   "export '%s' of '%s' is live (%s%s%s%s%s%s)", e->name, e->active,
                   e->writable ? "writable" : "read-only", e->socket ? ", socket " : "", e->socket ? e->socket : "",
                   e->tcp ? ", TCP " : "", e->tcp ? e->tcp : "", e->tcp ? (e->tls ? " with TLS" : " in plaintext") : "");
        if (e->on_live) {
                void (*cb)(Manager *, const char *, int, const char *, void *) = e->on_live;
                e->on_live = NULL;
                cb(mgr, e->name, 0, NULL, e->on_live_userdata);
        }
        /* its client may have come and gone already: look at the counters soon in any case */
        (void) sd_event_source_set_time_relative(mgr->export_timer, 200000);
        (void) sd_event_source_set_enabled(mgr->export_timer, SD_EVENT_ONESHOT);
        if (w->m && op->client_fd >= 0)
                (void) sd_bus_reply_method_return(w->m, "h", op->client_fd);
        else if (w->m)
                (void) sd_bus_reply_method_return(w->m, "o", e->object);
}

void export_start_clear(ExportStart *es) {
        free(es->name);
        free(es->active);
        free(es->socket);
        free(es->tcp);
        free(es->bitmap);
        free(es->checkpoint);
        g_strfreev(es->paths);
        g_strfreev(es->expect);
        if (es->fd >= 0)
                close(es->fd);
        if (es->client_fd >= 0)
                close(es->client_fd);
        es->fd = es->client_fd = -1;
}

/* The live, not-a-view export of the chain whose active layer is ACTIVE, or NULL. */
static Export *live_export_of(Manager *mgr, const char *active) {
        GHashTableIter it;
        Export *x;

        g_hash_table_iter_init(&it, mgr->exports);
        while (g_hash_table_iter_next(&it, NULL, (void **) &x))
                if (!x->snapshot && x->state == EXPORT_LIVE && x->disk && strcmp(x->active, active) == 0)
                        return x;
        return NULL;
}

int export_start(Manager *mgr, sd_bus_message *m, ExportStart *es, sd_bus_error *error) {
        g_autofree char *busy = NULL, *claim = NULL, *fleece = NULL;
        Export *e, *via = NULL;
        OpenOp *op;
        Work *w;
        int r;

        if (g_hash_table_contains(mgr->exports, es->name))
                return sd_bus_error_setf(error, ERROR_PREFIX "Exists", "an export named '%s' exists already", es->name);
        if (g_hash_table_size(mgr->exports) >= mgr->config.max_exports)
                return sd_bus_error_setf(error, ERROR_PREFIX "LimitsExceeded", "%u exports exist already (MaxExports)",
                                         g_hash_table_size(mgr->exports));
        if (es->snapshot) {
                /* the view's claim: the chain as a job's (through its live export), the fleecing image as its target */
                _cleanup_free_ char *stem = strdup(es->active);
                char *dot = stem ? strrchr(stem, '.') : NULL;
                if (!stem)
                        return -ENOMEM;
                if (dot && !strchr(dot, '/'))
                        *dot = 0;
                via = live_export_of(mgr, es->active);
                claim = g_strdup_printf("fleecing:%s", es->name);
                fleece = g_strdup_printf("%s.fleece-%s.qcow2", stem, es->name);
                r = claims_take(mgr->claims, claim, es->paths, fleece, via ? via->name : NULL, &busy);
        } else
                r = claims_export(mgr->claims, es->name, es->paths, &busy);
        if (r < 0)
                return sd_bus_error_set(error, ERROR_PREFIX "Busy", busy);
        e = calloc(1, sizeof *e);
        op = calloc(1, sizeof *op);
        if (!e || !op) {
                free(e);
                free(op);
                if (es->snapshot)
                        (void) claims_release(mgr->claims, claim, es->paths, fleece);
                else
                        claims_unexport(mgr->claims, es->name, es->paths);
                return -ENOMEM;
        }
        e->snapshot = es->snapshot;
        e->discard_after_read = es->discard_after_read;
        e->break_snapshot = es->break_snapshot;
        e->cbw_timeout_ms = es->cbw_timeout_ms;
        e->checkpoint = es->checkpoint ? strdup(es->checkpoint) : NULL;
        e->on_live = es->on_live;
        e->on_live_userdata = es->on_live_userdata;
        e->claim = TAKE_PTR(claim);
        e->fleece = TAKE_PTR(fleece);
        e->via = via ? strdup(via->name) : NULL;
        if (via)
                op->via_disk = dc_disk_ref(via->disk);
        e->mgr = mgr;
        e->name = strdup(es->name);
        (void) sd_bus_path_encode(EXPORT_PREFIX, e->name, &e->object);
        e->active = strdup(es->active);
        e->paths = g_strdupv(es->paths);
        e->socket = es->socket ? strdup(es->socket) : NULL;
        e->tcp = es->tcp ? strdup(es->tcp) : NULL;
        e->tls = es->tcp && es->tls;
        e->writable = es->writable;
        e->persistent = es->persistent;
        e->cache = es->cache;
        e->bitmap = es->bitmap ? strdup(es->bitmap) : NULL;
        e->anonymous = es->anonymous;
        e->max_connections = es->max_connections ? es->max_connections : mgr->config.max_connections;
        e->uid = es->uid;
        e->state = EXPORT_STARTING;
        e->stop_waiters = g_ptr_array_new_with_free_func(message_unref);
        op->e = e;
        op->active = strdup(es->active);
        op->socket = es->socket ? strdup(es->socket) : NULL;
        op->tcp = es->tcp ? strdup(es->tcp) : NULL;
        if (e->tls) {
                op->tls_dir = mgr->config.tls_dir ? strdup(mgr->config.tls_dir) : NULL;
                op->tls_psk_file = mgr->config.tls_psk_file ? strdup(mgr->config.tls_psk_file) : NULL;
                op->tls = (struct dc_nbd_tls_options){ .x509_dir = op->tls_dir, .psk_file = op->tls_psk_file,
                                                       .verify_peer = mgr->config.tls_verify_peer };
        }
        op->own_dir = g_build_filename(mgr->config.runtime_dir, "nbd", NULL);
        op->expect = g_strdupv(es->expect);
        op->roots = g_strdupv(mgr->config.roots);
        op->max_depth = mgr->config.max_depth;
        op->fd = TAKE_FD(es->fd);
        op->client_fd = TAKE_FD(es->client_fd);
        g_hash_table_insert(mgr->exports, e->name, e);
        model_changed(mgr, e->paths);
        w = work_new(mgr, export_open_run, export_open_done, op, open_op_free);
        if (!w) {
                export_release(e);
                g_hash_table_remove(mgr->exports, e->name);
                return -ENOMEM;
        }
        r = work_submit(w, m);
        return r < 0 ? r : 1;
}

/* --- stopping ------------------------------------------------------------------------ */

typedef struct StopOp {
        Export *e;
        dc_nbd_export *nbd;
        dc_snapshot *view;
        dc_disk *disk;
        char **roots;
        bool remove_record;
} StopOp;

static void stop_op_free(void *p) {
        StopOp *op = p;
        dc_nbd_export_free(op->nbd);
        dc_snapshot_free(op->view);
        dc_disk_unref(op->disk);
        g_strfreev(op->roots);
        free(op);
}

static void export_stop_run(Work *w) {
        StopOp *op = w->data;
        Export *e = op->e;

        /* the requests in flight complete and their replies go out; then the clients are disconnected */
        op->nbd = dc_nbd_export_free(op->nbd);
        if (op->view) {
                /* the filter off the disk, then the fleecing image goes */
                op->view = dc_snapshot_free(op->view);
                if (dc_path_unlink(e->fleece, (const char *const *) op->roots, NULL) < 0)
                        log_warning("export '%s': cannot remove the fleecing image '%s': %s", e->name, e->fleece,
                                    dc_get_error());
        }
        if (e->socket)
                socket_remove(e->socket, &e->socket_st);
        if (op->remove_record) {
                g_autofree char *rec = record_path(w->mgr, e->name);
                (void) unlink(rec);
        }
        op->disk = dc_disk_unref(op->disk);
}

static void export_stop_done(Work *w) {
        StopOp *op = w->data;
        Export *e = op->e;
        Manager *mgr = w->mgr;

        log_fields(LOG_INFO, (const char *const[]){ "DISKCHAIN_EXPORT", e->name, NULL }, "export '%s' stopped", e->name);
        export_release(e);
        model_refresh(mgr, e->paths);
        export_send_removed(e);
        for (guint i = 0; i < e->stop_waiters->len; i++)
                (void) sd_bus_reply_method_return(e->stop_waiters->pdata[i], NULL);
        g_hash_table_remove(mgr->exports, e->name);
}

void export_stop(Export *e, sd_bus_message *m, bool forget) {
        StopOp *op;
        Work *w;

        if (m)
                g_ptr_array_add(e->stop_waiters, sd_bus_message_ref(m));
        if (forget)
                e->forget = true;
        if (e->state != EXPORT_LIVE)
                return;
        op = calloc(1, sizeof *op);
        if (!op)
                return;
        e->state = EXPORT_STOPPING;
        op->e = e;
        op->nbd = TAKE_PTR(e->nbd);
        op->view = TAKE_PTR(e->view);
        op->disk = TAKE_PTR(e->disk);
        op->roots = g_strdupv(e->mgr->config.roots);
        op->remove_record = e->persistent && e->forget;
        w = work_new(e->mgr, export_stop_run, export_stop_done, op, stop_op_free);
        if (w)
                (void) work_submit(w, NULL);
}

int export_serve_fd(Export *e, int fd) {
        int r;

        if (e->state != EXPORT_LIVE) {
                close(fd);
                return -ESHUTDOWN;
        }
        /* no file is touched: the server takes the socket onto a thread of its own */
        r = dc_nbd_export_serve(e->nbd, fd);
        if (r >= 0)
                e->served = true;
        return r;
}

/* --- following the chain ------------------------------------------------------------ */

typedef struct RecordOp {
        Export *e;
        char *active;
} RecordOp;

static void record_op_free(void *p) {
        RecordOp *op = p;
        free(op->active);
        free(op);
}

static void record_run(Work *w) {
        RecordOp *op = w->data;
        work_capture_error(w, record_write(w->mgr, op->e, op->active, op->e->tcp));
}

static void record_done(Work *w) {
        RecordOp *op = w->data;
        if (w->r < 0)
                log_warning("export '%s': %s", op->e->name, w->error ? w->error : strerror(-w->r));
}

void export_chain_lists(GPtrArray *layers, char ***ret_paths, char ***ret_expect) {
        GPtrArray *p = g_ptr_array_new(), *x = g_ptr_array_new();

        for (guint i = 0; i < layers->len; i++) {
                Image *l = layers->pdata[i];
                g_ptr_array_add(p, g_strdup(l->path));
                g_ptr_array_add(x, g_strdup(l->path));
                if (l->data_file_abs)
                        g_ptr_array_add(p, g_strdup(l->data_file_abs));
        }
        g_ptr_array_add(p, NULL);
        g_ptr_array_add(x, NULL);
        *ret_paths = (char **) g_ptr_array_free(p, FALSE);
        if (ret_expect)
                *ret_expect = (char **) g_ptr_array_free(x, FALSE);
        else
                g_strfreev((char **) g_ptr_array_free(x, FALSE));
}

/* The images of ACTIVE's chain as the model knows them (with data files), or NULL when it does not yet. */
static char **chain_paths(Manager *mgr, const char *active) {
        Image *img = model_find(mgr, active);
        g_autoptr(GPtrArray) layers = img ? chain_layer_images(mgr, img) : NULL;
        char **paths = NULL;

        if (layers)
                export_chain_lists(layers, &paths, NULL);
        return paths;
}

/* E's active layer is ACTIVE now: claims, properties, record. */
static void export_move(Export *e, const char *active) {
        Manager *mgr = e->mgr;
        g_auto(GStrv) old = TAKE_PTR(e->paths);
        g_autofree char *old_chain = TAKE_PTR(e->chain_object);

        e->paths = chain_paths(mgr, active);
        if (!e->paths)
                e->paths = g_strdupv((char *[]){ (char *) active, NULL });
        claims_export_move(mgr->claims, e->name, old, e->paths);
        free(e->active);
        e->active = strdup(active);
        e->chain_object = chain_object_path(active);
        log_fields(LOG_INFO, (const char *const[]){ "DISKCHAIN_EXPORT", e->name, "DISKCHAIN_IMAGE", active, NULL },
                   "export '%s' serves '%s' now", e->name, active);
        model_changed(mgr, old);
        model_changed(mgr, e->paths);
        if (old_chain && strcmp(old_chain, e->chain_object) != 0)
                (void) sd_bus_emit_properties_changed(mgr->bus, old_chain, IFACE_CHAIN, "Exports", NULL);
        export_send_changed(e, (char *[]){ "Chain", NULL });
        if (e->persistent) {
                RecordOp *op = calloc(1, sizeof *op);
                Work *w;
                if (!op)
                        return;
                op->e = e;
                op->active = strdup(active);
                w = work_new(mgr, record_run, record_done, op, record_op_free);
                if (w)
                        (void) work_submit(w, NULL);
        }
}

void exports_follow(Manager *mgr) {
        GHashTableIter it;
        Export *e;

        g_hash_table_iter_init(&it, mgr->exports);
        while (g_hash_table_iter_next(&it, NULL, (void **) &e)) {
                _cleanup_free_ char *top = NULL;
                /* a point-in-time view stays where it is (its chain is claimed: nothing moves it) */
                if (e->state != EXPORT_LIVE || e->snapshot)
                        continue;
                /* the disk's mutex only: no file is touched */
                top = dc_disk_top_path(e->disk);
                if (top && strcmp(top, e->active) != 0)
                        export_move(e, top);
                else if (top) {
                        /* the same top, but the model may know its chain better now (after a refresh) */
                        g_auto(GStrv) now = chain_paths(mgr, top);
                        if (now && !g_strv_equal((const char *const *) now, (const char *const *) e->paths))
                                export_move(e, top);
                }
        }
}

void export_moved(Export *e) {
        _cleanup_free_ char *top = e->disk ? dc_disk_top_path(e->disk) : NULL;
        if (top)
                export_move(e, top);
}

/* --- counters ------------------------------------------------------------------------ */

/* Announce what changed of E's counters; true when something did. */
static bool export_look(Export *e) {
        struct dc_nbd_export_stats st;
        const char *changed[4];
        unsigned n = 0;

        if (e->state != EXPORT_LIVE)
                return false;
        dc_nbd_export_get_stats(e->nbd, &st);
        if (st.clients != e->last.clients)
                changed[n++] = "Clients";
        if (st.bytes_read != e->last.bytes_read)
                changed[n++] = "BytesRead";
        if (st.bytes_written != e->last.bytes_written)
                changed[n++] = "BytesWritten";
        changed[n] = NULL;
        e->last = st;
        if (n)
                export_send_changed(e, (char **) changed);
        /* an export made for OpenNBD lives as long as its connections */
        if (e->anonymous && e->served && st.clients == 0)
                export_stop(e, NULL, true);
        return n > 0;
}

static bool exports_look(Manager *mgr) {
        g_autoptr(GPtrArray) all = g_ptr_array_new();
        GHashTableIter it;
        bool any = false;
        Export *e;

        g_hash_table_iter_init(&it, mgr->exports);
        while (g_hash_table_iter_next(&it, NULL, (void **) &e))
                g_ptr_array_add(all, e);
        for (guint i = 0; i < all->len; i++)
                any |= export_look(all->pdata[i]);
        return any;
}

/*
 * The server calls back at most every 100 ms while it serves: the counters
 * of the last requests of a burst are announced by a look 200 ms later,
 * repeated as long as they change.
 */
static int on_export_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        if (exports_look(userdata)) {
                (void) sd_event_source_set_time_relative(s, 200000);
                (void) sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
        }
        return 0;
}

static int on_export_events(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        Manager *mgr = userdata;
        uint64_t n;

        (void) !read(fd, &n, sizeof n);
        (void) exports_look(mgr);
        (void) sd_event_source_set_time_relative(mgr->export_timer, 200000);
        (void) sd_event_source_set_enabled(mgr->export_timer, SD_EVENT_ONESHOT);
        return 0;
}

static void export_free_void(void *p) {
        export_struct_free(p);
}

int exports_setup(Manager *mgr) {
        g_autofree char *dir = g_build_filename(mgr->config.runtime_dir, "nbd", NULL);
        int r;

        mgr->exports = g_hash_table_new_full(g_str_hash, g_str_equal, NULL, export_free_void);
        mgr->export_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (mgr->export_fd < 0)
                return -errno;
        /* root's, readable by all: each socket in it is its owner's alone */
        if (g_mkdir_with_parents(dir, 0755) < 0)
                log_warning("cannot make '%s': %m", dir);
        r = sd_event_add_io(mgr->event, &mgr->export_source, mgr->export_fd, EPOLLIN, on_export_events, mgr);
        if (r >= 0)
                r = sd_event_add_time_relative(mgr->event, &mgr->export_timer, CLOCK_MONOTONIC, 200000, 50000,
                                               on_export_timer, mgr);
        if (r >= 0)
                r = sd_event_source_set_enabled(mgr->export_timer, SD_EVENT_OFF);
        return r;
}

void exports_free(Manager *mgr) {
        GHashTableIter it;
        Export *e;

        if (!mgr->exports)
                return;
        /* at exit, on the loop: every export stops here and now, its clients' requests completed */
        g_hash_table_iter_init(&it, mgr->exports);
        while (g_hash_table_iter_next(&it, NULL, (void **) &e)) {
                e->nbd = dc_nbd_export_free(e->nbd);
                if (e->socket && e->state != EXPORT_STARTING)
                        socket_remove(e->socket, &e->socket_st);
                e->disk = dc_disk_unref(e->disk);
        }
        g_hash_table_destroy(mgr->exports);
        mgr->exports = NULL;
        sd_event_source_disable_unref(mgr->export_source);
        sd_event_source_disable_unref(mgr->export_timer);
        if (mgr->export_fd >= 0)
                close(mgr->export_fd);
}

/* --- restoring persistent exports ---------------------------------------------------- */

static void restore_one(Manager *mgr, const char *file) {
        g_autoptr(GKeyFile) kf = g_key_file_new();
        g_autoptr(GError) err = NULL;
        g_autoptr(GPtrArray) layers = NULL;
        __attribute__((cleanup(export_start_clear))) ExportStart es = { .fd = -1, .client_fd = -1 };
        sd_bus_error error = SD_BUS_ERROR_NULL;
        g_autofree char *cache = NULL;
        Image *img;
        int r;

        if (!g_key_file_load_from_file(kf, file, G_KEY_FILE_NONE, &err)) {
                log_warning("export record '%s': %s", file, err->message);
                return;
        }
        es.name = g_key_file_get_string(kf, "Export", "Name", NULL);
        es.active = g_key_file_get_string(kf, "Export", "Active", NULL);
        es.socket = g_key_file_get_string(kf, "Export", "Socket", NULL);
        es.tcp = g_key_file_get_string(kf, "Export", "TCP", NULL);
        es.writable = g_key_file_get_boolean(kf, "Export", "Writable", NULL);
        es.max_connections = (unsigned) g_key_file_get_uint64(kf, "Export", "MaxConnections", NULL);
        es.uid = (uid_t) g_key_file_get_uint64(kf, "Export", "Owner", NULL);
        es.persistent = true;
        cache = g_key_file_get_string(kf, "Export", "Cache", NULL);
        es.cache = cache ? (int) g_strv_length((char **) cache_modes) : DC_CACHE_WRITEBACK; /* none: an older record */
        for (unsigned k = 0; cache && cache_modes[k]; k++)
                if (strcmp(cache, cache_modes[k]) == 0)
                        es.cache = (int) k;
        if (!es.name || !export_name_valid(es.name) || !es.active || es.max_connections > 1024 ||
            es.cache >= (int) g_strv_length((char **) cache_modes)) {
                log_warning("export record '%s' is not valid: ignored", file);
                return;
        }
        if (!es.socket && !es.tcp)
                es.socket = g_build_filename(mgr->config.runtime_dir, "nbd", es.name, NULL);
        /* what diskchain.conf says now decides, as it would for a new export */
        if (es.tcp && export_tcp_check(mgr, es.tcp, &es.tls, &error) < 0) {
                log_warning("persistent export '%s' on TCP %s does not start: %s; the record stays", es.name, es.tcp,
                            error.message);
                sd_bus_error_free(&error);
                return;
        }
        img = model_find(mgr, es.active);
        if (!img || img->error) {
                log_warning("persistent export '%s': '%s' is %s; the record stays", es.name, es.active,
                            img ? img->error : "gone");
                return;
        }
        layers = chain_layer_images(mgr, img);
        export_chain_lists(layers, &es.paths, &es.expect);
        r = export_start(mgr, NULL, &es, &error);
        if (r < 0 || sd_bus_error_is_set(&error))
                log_warning("persistent export '%s' of '%s' could not start: %s", es.name, es.active,
                            error.message ? error.message : strerror(-r));
        sd_bus_error_free(&error);
}

void exports_restore(Manager *mgr) {
        g_autofree char *dir = g_build_filename(mgr->config.state_dir, "exports", NULL);
        g_autoptr(GDir) d = g_dir_open(dir, 0, NULL);
        const char *n;

        while (d && (n = g_dir_read_name(d))) {
                g_autofree char *file = NULL;
                if (!export_name_valid(n))
                        continue;
                file = g_build_filename(dir, n, NULL);
                restore_one(mgr, file);
        }
}
