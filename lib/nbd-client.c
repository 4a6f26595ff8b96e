/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * A remote target: an NBD export reached through libnbd, as a struct
 * dc_driver, so that a backup or mirror writes into it through the one copy
 * engine (block-copy.c) like into a file.  QEMU's storage migration is the
 * use: mirror a chain to the destination's NBD server (qemu-storage-daemon,
 * qemu-nbd, another diskchaind), wait for ready, soft-cancel.
 *
 * Design notes
 * ------------
 * - Only a job's target is ever opened here (dc_job_new_copy, when the
 *   target names an NBD URI).  A URI is never a layer of a chain: backing
 *   names that look like URIs stay refused by dc_backing_resolve, and a
 *   path given to dc_image_open is a path.
 * - URIs (the NBD project's doc/uri.md, as libnbd reads them): nbd:// and
 *   nbds:// (TCP, port 10809 by default), nbd+unix:// and nbds+unix://
 *   (?socket=PATH); the path after the authority is the export name; a
 *   user@ names the TLS username.  nbds schemes require TLS.  The query
 *   parameters tls-certificates= and tls-psk-file= make the client read
 *   files, so they are accepted only when the caller says so (tools run by
 *   the files' owner, never a service acting for others), and no other
 *   parameter is accepted.  The URI is parsed here rather than by
 *   nbd_connect_uri so that the owner can connect the Unix socket itself
 *   (a service checks who may reach which socket: connect_unix) and so
 *   that one normal form names one export (a service's claims).
 * - Concurrency: one connection, many requests in flight.  A job's copy
 *   runs up to 16 requests side by side; libnbd serializes the calls on a
 *   handle (a synchronous call holds the handle for its whole round trip),
 *   and a pool of connections is no answer for the servers that matter:
 *   qemu-nbd serves one connection unless told otherwise (--shared), and
 *   without CAN_MULTI_CONN a flush on one connection says nothing of the
 *   writes on another.  So each request is issued with libnbd's aio calls
 *   (holding the handle only to queue and start sending it) and waits for
 *   its completion callback, while one I/O thread per target polls the
 *   socket and lets libnbd read replies and finish sending.  Requests
 *   pipeline on the connection; the server sees one client.
 * - The image lock: the engine calls the driver with the target's image
 *   lock held (for qcow2 it guards metadata).  A remote target has no
 *   metadata of ours, so every request releases the image lock while it
 *   waits for the server, as an allocating qcow2 write does for its data;
 *   the engine's range locks already keep concurrent requests apart.
 * - Limits: requests are split at the server's maximum block size (32 MiB
 *   when it advertises none) and must respect its minimum (EINVAL
 *   otherwise).  Block status asks base:allocation when the server offers
 *   it: a range that reads as zeros there is not written again with zeros
 *   (the engine's unallocated case); without it everything is data, so
 *   zeros are always written.  Zero writes without SEND_WRITE_ZEROES are
 *   written as zero-filled data.
 * - A read-only export is refused at open (EROFS, with the reason), so is a
 *   size of 0 or one the export cannot report.  The virtual size is the
 *   export's size; the jobs compare it with the source's as for files.
 * - Durability: flush is NBD_CMD_FLUSH when the server offers it (a job
 *   flushes at ready, at the drain of a soft cancel and at its end); a
 *   server without it writes through.  Close sends NBD_CMD_DISC after the
 *   requests in flight and waits at most two seconds for the server.
 * - Failure: a connection that dies fails every request in flight and
 *   every later one (ENOTCONN from libnbd), which the job's on-target-error
 *   policy then handles; nothing here retries or reconnects.  A server that
 *   stops answering without closing the connection (stopped, or a network
 *   that drops packets) would hold the job, its cancel and the daemon's exit
 *   forever: when requests are in flight and no reply came for stall_ms
 *   (dc_nbd_client_options; five minutes by default, longer than any flush
 *   of a sane server takes), the I/O thread shuts the socket down, and the
 *   requests fail with ETIMEDOUT.
 */

#include <poll.h>
#include <stdio.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>

#include <libnbd.h>

#include "dc-internal.h"

#define NBD_DEFAULT_PORT "10809"
#define NBD_DEFAULT_MAX_REQUEST (32u << 20)
#define NBD_DEFAULT_STALL_MS (5u * 60u * 1000u)

/* --- URIs ----------------------------------------------------------------------- */

struct nbd_uri {
        bool tls, unix_socket;
        char *user, *host, *port, *socket, *export_name;
        char *tls_certificates, *tls_psk_file;
};

static void nbd_uri_release(struct nbd_uri *u) {
        free(u->user);
        free(u->host);
        free(u->port);
        free(u->socket);
        free(u->export_name);
        free(u->tls_certificates);
        free(u->tls_psk_file);
        *u = (struct nbd_uri){ 0 };
}

static const struct {
        const char *prefix;
        bool tls, unix_socket;
} schemes[] = {
        { "nbd://", false, false },
        { "nbds://", true, false },
        { "nbd+unix://", false, true },
        { "nbds+unix://", true, true },
};

DC_EXPORT bool dc_nbd_uri_is(const char *s) {
        for (size_t i = 0; s && i < sizeof schemes / sizeof *schemes; i++)
                if (strncmp(s, schemes[i].prefix, strlen(schemes[i].prefix)) == 0)
                        return true;
        return false;
}

static int hexval(char c) {
        return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* Percent-decode [S, S+N): a new string, or NULL (ENOMEM, or EINVAL for a bad escape or a control character). */
static char *pct_decode(const char *s, size_t n, int *ret_err) {
        char *out = malloc(n + 1), *o = out;

        *ret_err = ENOMEM;
        if (!out)
                return NULL;
        *ret_err = EINVAL;
        for (size_t i = 0; i < n; i++) {
                char c = s[i];
                if (c == '%') {
                        int hi = i + 2 < n ? hexval(s[i + 1]) : -1, lo = hi >= 0 ? hexval(s[i + 2]) : -1;
                        if (hi < 0 || lo < 0) {
                                free(out);
                                return NULL;
                        }
                        c = (char) (hi << 4 | lo);
                        i += 2;
                }
                if ((unsigned char) c < 0x20 || c == 0x7f) {
                        free(out);
                        return NULL;
                }
                *o++ = c;
        }
        *o = 0;
        return out;
}

static int nbd_uri_parse(const char *uri, bool allow_files, struct nbd_uri *ret) {
        _cleanup_(nbd_uri_release) struct nbd_uri u = { 0 };
        const char *p = NULL, *auth, *auth_end, *path_end, *at;
        int err;

        if (strlen(uri) > 4096)
                return dc_error(EINVAL, "NBD URI is too long");
        for (size_t i = 0; i < sizeof schemes / sizeof *schemes; i++)
                if (strncmp(uri, schemes[i].prefix, strlen(schemes[i].prefix)) == 0) {
                        p = uri + strlen(schemes[i].prefix);
                        u.tls = schemes[i].tls;
                        u.unix_socket = schemes[i].unix_socket;
                }
        if (!p)
                return dc_error(EINVAL, "'%s' is not an NBD URI (nbd://, nbds://, nbd+unix://, nbds+unix://)", uri);
        if (strchr(uri, '#'))
                return dc_error(EINVAL, "'%s': an NBD URI has no fragment", uri);
        auth = p;
        auth_end = auth + strcspn(auth, "/?");
        path_end = auth_end + strcspn(auth_end, "?");

        /* authority: [user@]host[:port] (TCP), [user@] (Unix) */
        at = memchr(auth, '@', (size_t) (auth_end - auth));
        if (at) {
                u.user = pct_decode(auth, (size_t) (at - auth), &err);
                if (!u.user)
                        return dc_error(err, "'%s': bad user name", uri);
                auth = at + 1;
        }
        if (u.unix_socket) {
                if (auth != auth_end)
                        return dc_error(EINVAL, "'%s': an nbd+unix URI has no host (nbd+unix:///EXPORT?socket=PATH)", uri);
        } else {
                const char *colon;
                if (*auth == '[') {
                        const char *close = memchr(auth, ']', (size_t) (auth_end - auth));
                        if (!close)
                                return dc_error(EINVAL, "'%s': unterminated IPv6 address", uri);
                        u.host = strndup(auth + 1, (size_t) (close - auth - 1));
                        colon = close + 1 < auth_end && close[1] == ':' ? close + 1 : NULL;
                        if (!colon && close + 1 != auth_end)
                                return dc_error(EINVAL, "'%s': bad host", uri);
                } else {
                        colon = memchr(auth, ':', (size_t) (auth_end - auth));
                        u.host = strndup(auth, (size_t) ((colon ? colon : auth_end) - auth));
                }
                if (!u.host)
                        return dc_error(ENOMEM, "out of memory");
                if (!*u.host)
                        return dc_error(EINVAL, "'%s': an %s URI needs a host", uri, u.tls ? "nbds" : "nbd");
                for (const char *c = u.host; *c; c++)
                        if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') ||
                              strchr("-._:", *c)))
                                return dc_error(EINVAL, "'%s': bad host name", uri);
                if (colon) {
                        char *end;
                        unsigned long port;
                        u.port = strndup(colon + 1, (size_t) (auth_end - colon - 1));
                        if (!u.port)
                                return dc_error(ENOMEM, "out of memory");
                        errno = 0;
                        port = strtoul(u.port, &end, 10);
                        if (!*u.port || *end || errno || port == 0 || port > 65535)
                                return dc_error(EINVAL, "'%s': bad port '%s'", uri, u.port);
                } else if (!(u.port = strdup(NBD_DEFAULT_PORT)))
                        return dc_error(ENOMEM, "out of memory");
        }

        /* path: "/" + export name, or nothing (the default export) */
        if (auth_end < path_end) {
                u.export_name = pct_decode(auth_end + 1, (size_t) (path_end - auth_end - 1), &err);
                if (!u.export_name)
                        return dc_error(err, "'%s': bad export name", uri);
        } else if (!(u.export_name = strdup("")))
                return dc_error(ENOMEM, "out of memory");
        if (strlen(u.export_name) > 4096)
                return dc_error(EINVAL, "'%s': the export name is longer than 4096 bytes", uri);

        /* query */
        if (*path_end == '?') {
                _cleanup_free_ char *q = strdup(path_end + 1);
                char *save = NULL;
                if (!q)
                        return dc_error(ENOMEM, "out of memory");
                for (char *kv = strtok_r(q, "&", &save); kv; kv = strtok_r(NULL, "&", &save)) {
                        char *eq = strchr(kv, '='), **slot;
                        if (!eq)
                                return dc_error(EINVAL, "'%s': query parameter '%s' has no value", uri, kv);
                        *eq = 0;
                        if (strcmp(kv, "socket") == 0)
                                slot = &u.socket;
                        else if (strcmp(kv, "tls-certificates") == 0 || strcmp(kv, "tls-psk-file") == 0) {
                                if (!allow_files)
                                        return dc_error(EPERM, "'%s': the parameter '%s' would make the service read "
                                                               "a file of the caller's choice; its TLS credentials are "
                                                               "configured instead", uri, kv);
                                slot = kv[4] == 'c' ? &u.tls_certificates : &u.tls_psk_file;
                        } else
                                return dc_error(EINVAL, "'%s': unknown query parameter '%s'", uri, kv);
                        if (*slot)
                                return dc_error(EINVAL, "'%s': query parameter '%s' given twice", uri, kv);
                        *slot = pct_decode(eq + 1, strlen(eq + 1), &err);
                        if (!*slot)
                                return dc_error(err, "'%s': bad value of '%s'", uri, kv);
                }
        }
        if (u.unix_socket) {
                char *n;
                if (!u.socket || u.socket[0] != '/')
                        return dc_error(EINVAL, "'%s': an nbd+unix URI needs ?socket=ABSOLUTE-PATH", uri);
                n = dc_path_normalize(u.socket);
                if (!n)
                        return dc_error(ENOMEM, "out of memory");
                free(u.socket);
                u.socket = n;
        } else if (u.socket)
                return dc_error(EINVAL, "'%s': socket= is for nbd+unix URIs", uri);
        if (!u.tls && (u.user || u.tls_certificates || u.tls_psk_file))
                return dc_error(EINVAL, "'%s': TLS parameters need an nbds:// or nbds+unix:// URI", uri);
        *ret = u;
        u = (struct nbd_uri){ 0 };
        return 0;
}

/* Append S to *BUF percent-encoding all but unreserved characters and those in KEEP. */
static int pct_append(char **buf, size_t *len, size_t *cap, const char *s, const char *keep) {
        for (; *s; s++) {
                unsigned char c = (unsigned char) *s;
                bool plain = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                             strchr("-._~", c) || (keep && strchr(keep, c));
                if (*len + 4 > *cap) {
                        char *n = realloc(*buf, *cap * 2 + 16);
                        if (!n)
                                return -ENOMEM;
                        *buf = n;
                        *cap = *cap * 2 + 16;
                }
                *len += (size_t) sprintf(*buf + *len, plain ? "%c" : "%%%02X", c);
        }
        return 0;
}

/* The normal form: scheme, [user@], host:port (TCP), /export, ?socket= (Unix), then the TLS file parameters. */
static char *nbd_uri_format(const struct nbd_uri *u) {
        size_t len = 0, cap = 64;
        char *buf = malloc(cap);
        int r = 0;

        if (!buf)
                return NULL;
        buf[0] = 0;
        r = pct_append(&buf, &len, &cap, u->tls ? "nbds" : "nbd", NULL);
        if (r >= 0)
                r = pct_append(&buf, &len, &cap, u->unix_socket ? "+unix://" : "://", "+:/");
        if (r >= 0 && u->user) {
                r = pct_append(&buf, &len, &cap, u->user, NULL);
                if (r >= 0)
                        r = pct_append(&buf, &len, &cap, "@", "@");
        }
        if (r >= 0 && !u->unix_socket) {
                bool v6 = strchr(u->host, ':') != NULL;
                if (v6)
                        r = pct_append(&buf, &len, &cap, "[", "[");
                if (r >= 0)
                        r = pct_append(&buf, &len, &cap, u->host, ":");
                if (r >= 0 && v6)
                        r = pct_append(&buf, &len, &cap, "]", "]");
                if (r >= 0)
                        r = pct_append(&buf, &len, &cap, ":", ":");
                if (r >= 0)
                        r = pct_append(&buf, &len, &cap, u->port, NULL);
        }
        if (r >= 0)
                r = pct_append(&buf, &len, &cap, "/", "/");
        if (r >= 0)
                r = pct_append(&buf, &len, &cap, u->export_name, NULL);
        if (r >= 0 && u->socket) {
                r = pct_append(&buf, &len, &cap, "?socket=", "?=");
                if (r >= 0)
                        r = pct_append(&buf, &len, &cap, u->socket, "/");
        }
        if (r >= 0 && u->tls_certificates) {
                r = pct_append(&buf, &len, &cap, u->socket ? "&tls-certificates=" : "?tls-certificates=", "?&=");
                if (r >= 0)
                        r = pct_append(&buf, &len, &cap, u->tls_certificates, "/");
        }
        if (r >= 0 && u->tls_psk_file) {
                r = pct_append(&buf, &len, &cap, u->socket || u->tls_certificates ? "&tls-psk-file=" : "?tls-psk-file=",
                               "?&=");
                if (r >= 0)
                        r = pct_append(&buf, &len, &cap, u->tls_psk_file, "/");
        }
        if (r < 0) {
                free(buf);
                return NULL;
        }
        return buf;
}

DC_EXPORT int dc_nbd_uri_normalize(const char *uri, bool allow_files, char **ret_normal, char **ret_socket) {
        _cleanup_(nbd_uri_release) struct nbd_uri u = { 0 };
        _cleanup_free_ char *normal = NULL;
        int r = nbd_uri_parse(uri, allow_files, &u);

        if (r < 0)
                return r;
        normal = nbd_uri_format(&u);
        if (!normal)
                return dc_error(ENOMEM, "out of memory");
        if (ret_socket) {
                *ret_socket = u.socket ? strdup(u.socket) : NULL;
                if (u.socket && !*ret_socket)
                        return dc_error(ENOMEM, "out of memory");
        }
        *ret_normal = TAKE_PTR(normal);
        return 0;
}

/* --- the connection ----------------------------------------------------------------- */

struct nbd_target {
        struct nbd_handle *h;
        pthread_t io;
        bool io_started;
        int wake_fd;              /* eventfd: a request was queued, or stop */
        pthread_mutex_t mu;       /* completions and stop; a leaf */
        pthread_cond_t cv;
        bool stop;
        unsigned in_flight;       /* requests waited for */
        uint64_t last_reply_ms;   /* when the last one completed (or the first was issued) */
        bool stalled;             /* the server stopped answering: the socket was shut down */
        uint64_t stall_ms;
        uint64_t max_request, min_block;
        bool can_flush, can_zero, can_trim, base_allocation;
};

/* One request of a caller, on its stack until its completion. */
struct request {
        struct nbd_target *t;
        bool done;
        int err;
        bool have_extent;         /* block status: the first base:allocation extent */
        uint64_t extent_len;
        uint32_t extent_flags;
};

static uint64_t now_ms(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000u + (uint64_t) ts.tv_nsec / 1000000u;
}

static void wake(struct nbd_target *t) {
        uint64_t one = 1;
        (void) !write(t->wake_fd, &one, sizeof one);
}

/* Poll the socket for libnbd and let it read replies (which runs the completions) and send the rest. */
static void *io_thread(void *p) {
        struct nbd_target *t = p;
        bool disconnecting = false;
        uint64_t deadline = 0;

        for (;;) {
                struct pollfd pf[2] = { { .fd = t->wake_fd, .events = POLLIN }, { .fd = -1 } };
                bool stop, gone = nbd_aio_is_dead(t->h) || nbd_aio_is_closed(t->h);
                uint64_t stall_at = 0;
                unsigned dir;
                int timeout = -1;

                pthread_mutex_lock(&t->mu);
                stop = t->stop;
                if (t->in_flight && !gone && !t->stalled) {
                        stall_at = t->last_reply_ms + t->stall_ms;
                        if (now_ms() >= stall_at) {
                                /* no answer for minutes: end the connection, failing what waits */
                                t->stalled = true;
                                (void) shutdown(nbd_aio_get_fd(t->h), SHUT_RDWR);
                                stall_at = 0;
                        }
                }
                pthread_mutex_unlock(&t->mu);
                if (stall_at)
                        timeout = (int) MIN(stall_at - now_ms(), (uint64_t) INT32_MAX);
                if (stop && !disconnecting) {
                        /* after what is in flight, NBD_CMD_DISC; the server then closes */
                        disconnecting = true;
                        deadline = now_ms() + 2000;
                        if (!gone)
                                (void) nbd_aio_disconnect(t->h, 0);
                }
                if (disconnecting && (gone || now_ms() >= deadline))
                        break;
                if (disconnecting)
                        timeout = (int) (deadline > now_ms() ? deadline - now_ms() : 0);
                if (!gone) {
                        /* a dead connection: only the wake-up is watched until the target is closed */
                        pf[1].fd = nbd_aio_get_fd(t->h);
                        dir = nbd_aio_get_direction(t->h);
                        pf[1].events = (short) (((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
                                                ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0));
                }
                if (poll(pf, 2, timeout) < 0 && errno != EINTR)
                        break;
                if (pf[0].revents & POLLIN) {
                        uint64_t n;
                        (void) !read(t->wake_fd, &n, sizeof n);
                }
                if (pf[1].fd >= 0 && (pf[1].revents & (POLLIN | POLLHUP | POLLERR)))
                        (void) nbd_aio_notify_read(t->h);
                else if (pf[1].fd >= 0 && (pf[1].revents & POLLOUT))
                        (void) nbd_aio_notify_write(t->h);
        }
        return NULL;
}

static int complete_cb(void *user_data, int *error) {
        struct request *q = user_data;

        pthread_mutex_lock(&q->t->mu);
        q->err = *error;
        q->done = true;
        q->t->last_reply_ms = now_ms();
        pthread_cond_broadcast(&q->t->cv);
        pthread_mutex_unlock(&q->t->mu);
        return 1; /* retired here */
}

static int extent_cb(void *user_data, const char *context, uint64_t offset, uint32_t *entries, size_t n,
                     int *error) {
        struct request *q = user_data;

        if (strcmp(context, LIBNBD_CONTEXT_BASE_ALLOCATION) == 0 && n >= 2 && !q->have_extent && !*error) {
                q->have_extent = true;
                q->extent_len = entries[0];
                q->extent_flags = entries[1];
        }
        return 0;
}

/*
 * Wait for the request issued as COOKIE (< 0: it was refused at once).
 * WHAT and OFF name it in the error.  Called without the image lock.
 */
static int wait_request(dc_image *img, struct request *q, int64_t cookie, const char *what, uint64_t off) {
        struct nbd_target *t = img->priv;

        if (cookie < 0) {
                int e = nbd_get_errno();
                bool stalled;
                pthread_mutex_lock(&t->mu);
                stalled = t->stalled;
                pthread_mutex_unlock(&t->mu);
                if (stalled)
                        return dc_error(ETIMEDOUT, "'%s': %s at offset %llu: the NBD server did not answer for %llu s",
                                        img->path, what, (unsigned long long) off,
                                        (unsigned long long) t->stall_ms / 1000);
                return dc_error(e > 0 ? e : EIO, "'%s': %s at offset %llu: %s", img->path, what,
                                (unsigned long long) off, nbd_get_error() ? nbd_get_error() : "refused");
        }
        pthread_mutex_lock(&t->mu);
        if (!t->in_flight++)
                t->last_reply_ms = now_ms();
        pthread_mutex_unlock(&t->mu);
        wake(t);
        pthread_mutex_lock(&t->mu);
        while (!q->done)
                pthread_cond_wait(&t->cv, &t->mu);
        t->in_flight--;
        if (q->err && t->stalled)
                q->err = ETIMEDOUT;
        pthread_mutex_unlock(&t->mu);
        if (q->err == ETIMEDOUT)
                return dc_error(ETIMEDOUT, "'%s': %s at offset %llu: the NBD server did not answer for %llu s",
                                img->path, what, (unsigned long long) off, (unsigned long long) t->stall_ms / 1000);
        if (q->err)
                return dc_error(q->err, "'%s': %s at offset %llu failed: %s", img->path, what,
                                (unsigned long long) off, strerror(q->err));
        return 0;
}

#define CB(q) ((nbd_completion_callback){ .callback = complete_cb, .user_data = (q) })

static int check_aligned(dc_image *img, uint64_t off, uint64_t len) {
        struct nbd_target *t = img->priv;

        if (t->min_block > 1 && (off % t->min_block || (len % t->min_block && off + len != img->virtual_size)))
                return dc_error(EINVAL, "'%s': request %llu+%llu is not aligned to the server's minimum block size %llu",
                                img->path, (unsigned long long) off, (unsigned long long) len,
                                (unsigned long long) t->min_block);
        return 0;
}

/*
 * The operations below are called with the image lock held (dc_driver's
 * rule); they release it while they wait for the server (see the notes).
 */

/* A read (RBUF) or a write (WBUF) in requests of at most the server's maximum block size, one after the other. */
static int transfer(dc_image *img, void *rbuf, const void *wbuf, uint64_t off, size_t len) {
        struct nbd_target *t = img->priv;
        int r = check_aligned(img, off, len);
        size_t done = 0;

        pthread_mutex_unlock(&img->lock);
        while (r >= 0 && done < len) {
                struct request q = { .t = t };
                size_t n = (size_t) MIN((uint64_t) (len - done), t->max_request);
                int64_t cookie = rbuf ? nbd_aio_pread(t->h, (uint8_t *) rbuf + done, n, off + done, CB(&q), 0)
                                      : nbd_aio_pwrite(t->h, (const uint8_t *) wbuf + done, n, off + done, CB(&q), 0);
                r = wait_request(img, &q, cookie, rbuf ? "read" : "write", off + done);
                done += n;
        }
        pthread_mutex_lock(&img->lock);
        return r;
}

static int nbd_target_read(dc_image *img, void *buf, uint64_t off, size_t len) {
        return transfer(img, buf, NULL, off, len);
}

static int nbd_target_write(dc_image *img, const void *buf, uint64_t off, size_t len) {
        return transfer(img, NULL, buf, off, len);
}

static int nbd_target_write_zeroes(dc_image *img, uint64_t off, uint64_t len, unsigned flags) {
        struct nbd_target *t = img->priv;
        _cleanup_free_ uint8_t *zeros = NULL;
        int r = check_aligned(img, off, len);

        if (r >= 0 && !t->can_zero && !(zeros = calloc(1, (size_t) MIN(len, t->max_request))))
                r = dc_error(ENOMEM, "out of memory");
        pthread_mutex_unlock(&img->lock);
        while (r >= 0 && len > 0) {
                struct request q = { .t = t };
                uint64_t n = MIN(len, t->max_request);
                if (zeros)
                        /* no SEND_WRITE_ZEROES: zeros as data */
                        r = wait_request(img, &q, nbd_aio_pwrite(t->h, zeros, (size_t) n, off, CB(&q), 0), "write", off);
                else
                        r = wait_request(img, &q,
                                         nbd_aio_zero(t->h, n, off, CB(&q),
                                                      (flags & DC_ZERO_MAY_UNMAP) ? 0 : LIBNBD_CMD_FLAG_NO_HOLE),
                                         "zero write", off);
                off += n;
                len -= n;
        }
        pthread_mutex_lock(&img->lock);
        return r;
}

static int nbd_target_discard(dc_image *img, uint64_t off, uint64_t len) {
        struct nbd_target *t = img->priv;
        int r = 0;

        if (!t->can_trim || check_aligned(img, off, len) < 0)
                return 0; /* a hint */
        pthread_mutex_unlock(&img->lock);
        while (r >= 0 && len > 0) {
                struct request q = { .t = t };
                uint64_t n = MIN(len, t->max_request);
                r = wait_request(img, &q, nbd_aio_trim(t->h, n, off, CB(&q), 0), "trim", off);
                off += n;
                len -= n;
        }
        pthread_mutex_lock(&img->lock);
        return r;
}

static int nbd_target_flush(dc_image *img) {
        struct nbd_target *t = img->priv;
        struct request q = { .t = t };
        int r;

        if (!t->can_flush)
                return 0; /* the server writes through */
        pthread_mutex_unlock(&img->lock);
        r = wait_request(img, &q, nbd_aio_flush(t->h, CB(&q), 0), "flush", 0);
        pthread_mutex_lock(&img->lock);
        return r;
}

/* What base:allocation says: zeros (nothing to write there again), else data. */
static int nbd_target_block_status(dc_image *img, uint64_t off, uint64_t len, struct dc_layer_status *ret) {
        struct nbd_target *t = img->priv;
        struct request q = { .t = t };
        uint64_t n = MIN(len, (uint64_t) 1 << 30);
        int r;

        if (!t->base_allocation) {
                *ret = (struct dc_layer_status){ DC_LAYER_DATA, len, -1, false, false };
                return 0;
        }
        pthread_mutex_unlock(&img->lock);
        r = wait_request(img, &q,
                         nbd_aio_block_status(t->h, n, off,
                                              (nbd_extent_callback){ .callback = extent_cb, .user_data = &q },
                                              CB(&q), LIBNBD_CMD_FLAG_REQ_ONE),
                         "block status", off);
        pthread_mutex_lock(&img->lock);
        if (r < 0)
                return r;
        if (!q.have_extent || q.extent_len == 0)
                *ret = (struct dc_layer_status){ DC_LAYER_DATA, n, -1, false, false };
        else
                *ret = (struct dc_layer_status){ (q.extent_flags & LIBNBD_STATE_ZERO) ? DC_LAYER_UNALLOCATED
                                                                                      : DC_LAYER_DATA,
                                                 MIN(q.extent_len, n), -1, false, false };
        return 0;
}

static int nbd_target_truncate(dc_image *img, uint64_t size) {
        return dc_error(ENOTSUP, "'%s': an NBD export cannot be resized from here", img->path);
}

static void nbd_target_free(struct nbd_target *t) {
        if (!t)
                return;
        if (t->io_started) {
                pthread_mutex_lock(&t->mu);
                t->stop = true;
                pthread_mutex_unlock(&t->mu);
                wake(t);
                pthread_join(t->io, NULL);
        }
        if (t->h)
                nbd_close(t->h);
        if (t->wake_fd >= 0)
                close(t->wake_fd);
        pthread_mutex_destroy(&t->mu);
        pthread_cond_destroy(&t->cv);
        free(t);
}

static void nbd_target_close(dc_image *img) {
        nbd_target_free(img->priv);
        img->priv = NULL;
}

static int nbd_target_open_unused(dc_image *img, bool writable) {
        return dc_error(EINVAL, "'%s': an NBD export is opened by its URI, as a job's target only", img->path);
}

const struct dc_driver dc_nbd_driver = {
        .name = "nbd",
        .format = DC_FORMAT_RAW, /* the bytes of the export */
        .open = nbd_target_open_unused,
        .close = nbd_target_close,
        .block_status = nbd_target_block_status,
        .read = nbd_target_read,
        .write = nbd_target_write,
        .write_zeroes = nbd_target_write_zeroes,
        .discard = nbd_target_discard,
        .flush = nbd_target_flush,
        .truncate = nbd_target_truncate,
};

/* libnbd's reason for the last failure on this thread, with its errno (EIO when it has none). */
static int nbd_fail(const char *uri, const char *what) {
        int e = nbd_get_errno();
        return dc_error(e > 0 ? e : EIO, "'%s': %s: %s", uri, what, nbd_get_error() ? nbd_get_error() : "failed");
}

static int connect_handle(struct nbd_target *t, const struct nbd_uri *u, const char *normal,
                          const struct dc_nbd_client_options *o) {
        const char *certs = u->tls_certificates ? u->tls_certificates : o ? o->tls_certificates : NULL;
        const char *psk = u->tls_psk_file ? u->tls_psk_file : o ? o->tls_psk_file : NULL;
        int r;

        if (u->tls && !nbd_supports_tls(t->h))
                return dc_error(ENOTSUP, "'%s': this libnbd was built without TLS", normal);
        if (nbd_set_export_name(t->h, u->export_name) < 0 ||
            nbd_set_tls(t->h, u->tls ? LIBNBD_TLS_REQUIRE : LIBNBD_TLS_DISABLE) < 0 ||
            (u->tls && certs && nbd_set_tls_certificates(t->h, certs) < 0) ||
            (u->tls && psk && nbd_set_tls_psk_file(t->h, psk) < 0) ||
            (u->tls && u->user && nbd_set_tls_username(t->h, u->user) < 0) ||
            nbd_add_meta_context(t->h, LIBNBD_CONTEXT_BASE_ALLOCATION) < 0)
                return nbd_fail(normal, "cannot set up the connection");
        if (u->unix_socket && o && o->connect_unix) {
                int fd = o->connect_unix(o->userdata, u->socket);
                if (fd < 0)
                        return fd; /* the owner's reason */
                r = nbd_connect_socket(t->h, fd); /* takes the socket */
        } else if (u->unix_socket)
                r = nbd_connect_unix(t->h, u->socket);
        else
                r = nbd_connect_tcp(t->h, u->host, u->port);
        if (r < 0)
                return nbd_fail(normal, "cannot connect to the NBD server");
        return 0;
}

int dc_nbd_target_open(const char *uri, const struct dc_nbd_client_options *o, dc_image **ret) {
        return dc_nbd_image_open(uri, true, o, ret);
}

DC_EXPORT int dc_image_open_nbd(const char *uri, bool writable, const struct dc_nbd_client_options *o,
                                dc_image **ret) {
        return dc_nbd_image_open(uri, writable, o, ret);
}

int dc_nbd_image_open(const char *uri, bool writable, const struct dc_nbd_client_options *o, dc_image **ret) {
        _cleanup_(nbd_uri_release) struct nbd_uri u = { 0 };
        _cleanup_free_ char *normal = NULL;
        struct nbd_target *t;
        dc_image *img;
        int64_t size, v;
        int r;

        r = nbd_uri_parse(uri, o && o->allow_uri_files, &u);
        if (r < 0)
                return r;
        normal = nbd_uri_format(&u);
        if (!normal)
                return dc_error(ENOMEM, "out of memory");
        t = calloc(1, sizeof *t);
        if (!t)
                return dc_error(ENOMEM, "out of memory");
        pthread_mutex_init(&t->mu, NULL);
        pthread_cond_init(&t->cv, NULL);
        t->stall_ms = o && o->stall_ms ? o->stall_ms : NBD_DEFAULT_STALL_MS;
        t->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        t->h = nbd_create();
        if (t->wake_fd < 0 || !t->h) {
                r = t->h ? dc_error(errno, "cannot make an eventfd: %m") : nbd_fail(normal, "cannot create a handle");
                nbd_target_free(t);
                return r;
        }
        r = connect_handle(t, &u, normal, o);
        if (r >= 0) {
                size = nbd_get_size(t->h);
                if (size < 0)
                        r = nbd_fail(normal, "the server did not tell the export's size");
                else if (size == 0)
                        r = dc_error(EINVAL, "'%s': the export is empty", normal);
                else if (writable && nbd_is_read_only(t->h) == 1)
                        r = dc_error(EROFS, "'%s': the NBD server exports it read-only; a backup or mirror target "
                                            "must be writable", normal);
        }
        if (r < 0) {
                nbd_target_free(t);
                return r;
        }
        t->can_flush = nbd_can_flush(t->h) == 1;
        t->can_zero = nbd_can_zero(t->h) == 1;
        t->can_trim = nbd_can_trim(t->h) == 1;
        t->base_allocation = nbd_can_meta_context(t->h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1;
        v = nbd_get_block_size(t->h, LIBNBD_SIZE_MAXIMUM);
        t->max_request = v > 0 ? MIN((uint64_t) v, (uint64_t) NBD_DEFAULT_MAX_REQUEST) : NBD_DEFAULT_MAX_REQUEST;
        v = nbd_get_block_size(t->h, LIBNBD_SIZE_MINIMUM);
        t->min_block = v > 0 ? (uint64_t) v : 1;
        /* the protocol's rule, which the jobs' alignment relies on */
        if (t->min_block > 65536 || (t->min_block & (t->min_block - 1))) {
                r = dc_error(EPROTO, "'%s': the server's minimum block size %llu is not a power of two up to 64 KiB",
                             normal, (unsigned long long) t->min_block);
                nbd_target_free(t);
                return r;
        }
        t->max_request = MAX(ALIGN_DOWN(t->max_request, t->min_block), t->min_block);
        r = pthread_create(&t->io, NULL, io_thread, t);
        if (r != 0) {
                nbd_target_free(t);
                return dc_error(r, "cannot start a thread for '%s'", normal);
        }
        t->io_started = true;

        img = calloc(1, sizeof *img);
        if (!img) {
                nbd_target_free(t);
                return dc_error(ENOMEM, "out of memory");
        }
        pthread_mutex_init(&img->lock, NULL);
        img->fd = -EBADF;
        img->dfd = -EBADF;
        img->drv = &dc_nbd_driver;
        img->priv = t;
        img->path = TAKE_PTR(normal);
        img->virtual_size = (uint64_t) size;
        img->writable = writable;
        img->no_lock = true;
        *ret = img;
        return 0;
}

bool dc_image_is_remote(dc_image *img) {
        return img && img->drv == &dc_nbd_driver;
}

uint64_t dc_image_min_block(dc_image *img) {
        return dc_image_is_remote(img) ? ((struct nbd_target *) img->priv)->min_block : 1;
}
