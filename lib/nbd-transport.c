/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The byte stream of an NBD connection (nbd-transport.h): plaintext on the
 * socket, or TLS with GnuTLS after NBD_OPT_STARTTLS, and the credentials
 * (dc_nbd_tls, diskchain.h) that TLS is run with.
 *
 * Design notes
 * ------------
 * - One deadline for everything ("Timeouts" in nbd-server.c): GnuTLS
 *   reads and writes the socket through our pull and push functions, which
 *   wait with poll() against the transport's deadline like the plaintext
 *   path does.  So the 10 s handshake timeout covers the TLS handshake and
 *   the options sent over TLS after it together, and a client that stalls
 *   in the middle of either, or trickles bytes, is cut off all the same.
 *   GnuTLS's own handshake timeout is switched off: ours is the one.
 * - Threads: the reader receives, and one sender at a time (the server's
 *   send mutex) sends; GnuTLS allows a session to be received on by one
 *   thread while another sends.  We never renegotiate (TLS 1.2 renegotiation
 *   from the client ends the connection) and issue no session tickets (no
 *   resumption: a connection is long-lived, a handshake is cheap beside it).
 * - A reply goes out as one corked write: GnuTLS packs the reply's header
 *   and data into full records instead of one record per piece.
 * - Failures close the connection; they are never reported beyond the
 *   -errno, since a client failing its TLS handshake is an ordinary event
 *   the library does not log.  The session is freed with the connection,
 *   whatever state the handshake ended in.
 * - Client authentication is the credentials' (dc_nbd_tls): a certificate
 *   verified against the CA when verify_peer is set (verified within the
 *   handshake, so that the client is told with an alert, and checked again
 *   after it), or a pre-shared key.  PSK keys are looked up in the file by
 *   GnuTLS at each handshake.
 */

#include <fcntl.h>
#include <gnutls/gnutls.h>
#include <poll.h>
#include <stdio.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "dc-internal.h"
#include "nbd-transport.h"

#define NBD_BYE_TIMEOUT_NS (INT64_C(1) * 1000000000)

struct dc_nbd_tls {
        unsigned refs;
        gnutls_certificate_credentials_t x509; /* or NULL */
        gnutls_psk_server_credentials_t psk;   /* or NULL */
        gnutls_priority_t priority;
        bool verify_peer;
};

int64_t nbd_now_ns(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (int64_t) ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* --- the socket ------------------------------------------------------------------ */

static int fd_wait(int fd, short events, int64_t deadline) {
        struct pollfd p = { .fd = fd, .events = events };
        int64_t left;
        int n;

        if (!deadline)
                return 0;
        for (;;) {
                left = deadline - nbd_now_ns();
                if (left <= 0)
                        return -ETIMEDOUT;
                n = poll(&p, 1, (int) MIN(left / 1000000 + 1, 60000));
                if (n > 0)
                        return 0;
                if (n < 0 && errno != EINTR)
                        return -errno;
        }
}

/* Some bytes: > 0, 0 at EOF, or -errno. */
static ssize_t fd_recv(struct nbd_transport *t, void *buf, size_t len) {
        for (;;) {
                ssize_t n;
                int r = fd_wait(t->fd, POLLIN, t->deadline);
                if (r < 0)
                        return r;
                n = recv(t->fd, buf, len, t->deadline ? MSG_DONTWAIT : 0);
                if (n >= 0)
                        return n;
                if (errno != EINTR && errno != EAGAIN)
                        return -errno;
        }
}

/* Some bytes of IOV (at most 1024 pieces): >= 0, or -errno. */
static ssize_t fd_sendv(struct nbd_transport *t, const struct iovec *iov, int n) {
        for (;;) {
                struct msghdr m = { .msg_iov = (struct iovec *) iov, .msg_iovlen = (size_t) MIN(n, 1024) };
                ssize_t k;
                int r = fd_wait(t->fd, POLLOUT, t->deadline);
                if (r < 0)
                        return r;
                k = sendmsg(t->fd, &m, MSG_NOSIGNAL | (t->deadline ? MSG_DONTWAIT : 0));
                if (k >= 0)
                        return k;
                if (errno != EINTR && errno != EAGAIN)
                        return -errno;
        }
}

static int plain_read(struct nbd_transport *t, uint8_t *p, size_t len) {
        while (len > 0) {
                ssize_t n = fd_recv(t, p, len);
                if (n < 0)
                        return (int) n;
                if (n == 0)
                        return -ECONNRESET;
                p += n;
                len -= (size_t) n;
        }
        return 0;
}

static int plain_writev(struct nbd_transport *t, struct iovec *iov, int n) {
        while (n > 0) {
                ssize_t k = fd_sendv(t, iov, n);
                if (k < 0)
                        return (int) k;
                while (n > 0 && (size_t) k >= iov->iov_len) {
                        k -= (ssize_t) iov->iov_len;
                        iov++;
                        n--;
                }
                if (n > 0) {
                        iov->iov_base = (uint8_t *) iov->iov_base + k;
                        iov->iov_len -= (size_t) k;
                }
        }
        return 0;
}

/* --- TLS over the socket ---------------------------------------------------------- */

static ssize_t tls_pull(gnutls_transport_ptr_t p, void *buf, size_t len) {
        struct nbd_transport *t = p;
        ssize_t n = fd_recv(t, buf, len);

        if (n < 0) {
                t->error = (int) -n;
                gnutls_transport_set_errno(t->tls, t->error);
                return -1;
        }
        return n;
}

static ssize_t tls_push(gnutls_transport_ptr_t p, const giovec_t *iov, int n) {
        struct nbd_transport *t = p;
        ssize_t k = fd_sendv(t, (const struct iovec *) iov, n);

        if (k < 0) {
                t->error = (int) -k;
                gnutls_transport_set_errno(t->tls, t->error);
                return -1;
        }
        return k;
}

/* Data to read within MS (or the deadline, if sooner): 1, 0 when MS passed, -1 past the deadline. */
static int tls_pull_timeout(gnutls_transport_ptr_t p, unsigned ms) {
        struct nbd_transport *t = p;
        struct pollfd pfd = { .fd = t->fd, .events = POLLIN };
        int64_t until = t->deadline;

        if (ms != GNUTLS_INDEFINITE_TIMEOUT) {
                int64_t then = nbd_now_ns() + (int64_t) ms * 1000000;
                if (!until || then < until)
                        until = then;
        }
        for (;;) {
                int64_t left = until ? until - nbd_now_ns() : -1;
                int n = poll(&pfd, 1, left < 0 ? (until ? 0 : -1) : (int) MIN(left / 1000000 + 1, 60000));
                if (n > 0)
                        return 1;
                if (n < 0 && errno != EINTR) {
                        t->error = errno;
                        gnutls_transport_set_errno(t->tls, t->error);
                        return -1;
                }
                if (n == 0 && until && nbd_now_ns() >= until)
                        break;
        }
        if (t->deadline && nbd_now_ns() >= t->deadline) {
                t->error = ETIMEDOUT;
                gnutls_transport_set_errno(t->tls, t->error);
                return -1;
        }
        return 0;
}

static int tls_errno(struct nbd_transport *t, ssize_t r) {
        if (t->error)
                return -t->error;
        if (r == GNUTLS_E_PREMATURE_TERMINATION)
                return -ECONNRESET;
        if (r == GNUTLS_E_MEMORY_ERROR)
                return -ENOMEM;
        return -EPROTO;
}

static int tls_read(struct nbd_transport *t, uint8_t *p, size_t len) {
        while (len > 0) {
                ssize_t n = gnutls_record_recv(t->tls, p, len);
                if (n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED)
                        continue;
                if (n == 0)
                        return -ECONNRESET; /* close_notify */
                if (n < 0)
                        return tls_errno(t, n);
                p += n;
                len -= (size_t) n;
        }
        return 0;
}

static int tls_writev(struct nbd_transport *t, const struct iovec *iov, int n) {
        ssize_t r;

        gnutls_record_cork(t->tls);
        for (int i = 0; i < n; i++) {
                const uint8_t *p = iov[i].iov_base;
                size_t len = iov[i].iov_len;
                while (len > 0) {
                        r = gnutls_record_send(t->tls, p, len);
                        if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED)
                                continue;
                        if (r < 0)
                                return tls_errno(t, r);
                        p += r;
                        len -= (size_t) r;
                }
        }
        do
                r = gnutls_record_uncork(t->tls, GNUTLS_RECORD_WAIT);
        while (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED);
        return r < 0 ? tls_errno(t, r) : 0;
}

/* --- the transport ------------------------------------------------------------------ */

void nbd_transport_init(struct nbd_transport *t, int fd, dc_nbd_tls *creds) {
        *t = (struct nbd_transport){ .fd = fd, .creds = creds ? dc_nbd_tls_ref(creds) : NULL };
}

void nbd_transport_done(struct nbd_transport *t) {
        if (t->tls)
                gnutls_deinit(t->tls);
        t->tls = NULL;
        t->creds = dc_nbd_tls_unref(t->creds);
}

int nbd_transport_read(struct nbd_transport *t, void *buf, size_t len) {
        return t->tls ? tls_read(t, buf, len) : plain_read(t, buf, len);
}

int nbd_transport_writev(struct nbd_transport *t, struct iovec *iov, int n) {
        return t->tls ? tls_writev(t, iov, n) : plain_writev(t, iov, n);
}

int nbd_transport_starttls(struct nbd_transport *t) {
        gnutls_session_t s;
        int r;

        if (!t->creds || t->tls)
                return -EINVAL;
        if (gnutls_init(&s, GNUTLS_SERVER | GNUTLS_NO_TICKETS) < 0)
                return -ENOMEM;
        t->tls = s;
        r = gnutls_priority_set(s, t->creds->priority);
        if (r >= 0 && t->creds->x509) {
                r = gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, t->creds->x509);
                if (t->creds->verify_peer) {
                        gnutls_certificate_server_set_request(s, GNUTLS_CERT_REQUIRE);
                        gnutls_session_set_verify_cert(s, NULL, 0);
                }
        }
        if (r >= 0 && t->creds->psk)
                r = gnutls_credentials_set(s, GNUTLS_CRD_PSK, t->creds->psk);
        if (r < 0)
                return -ENOMEM;
        gnutls_transport_set_ptr(s, t);
        gnutls_transport_set_pull_function(s, tls_pull);
        gnutls_transport_set_vec_push_function(s, tls_push);
        gnutls_transport_set_pull_timeout_function(s, tls_pull_timeout);
        gnutls_handshake_set_timeout(s, 0);
        do
                r = gnutls_handshake(s);
        while (r < 0 && !gnutls_error_is_fatal(r));
        if (r < 0) {
                /* tell the client why (an untrusted certificate, an unknown key), if the socket is still fine */
                if (!t->error)
                        (void) gnutls_alert_send_appropriate(s, r);
                return tls_errno(t, r);
        }
        if (t->creds->verify_peer && gnutls_auth_get_type(s) == GNUTLS_CRD_CERTIFICATE) {
                unsigned status = 0;
                if (gnutls_certificate_verify_peers2(s, &status) < 0 || status != 0)
                        return -EACCES;
        }
        t->established = true;
        return 0;
}

void nbd_transport_bye(struct nbd_transport *t) {
        if (!t->established || t->error)
                return;
        t->deadline = nbd_now_ns() + NBD_BYE_TIMEOUT_NS;
        (void) gnutls_bye(t->tls, GNUTLS_SHUT_WR);
}

/* --- credentials ---------------------------------------------------------------------- */

static void tls_free(dc_nbd_tls *t) {
        if (!t)
                return;
        if (t->x509)
                gnutls_certificate_free_credentials(t->x509);
        if (t->psk)
                gnutls_psk_free_server_credentials(t->psk);
        if (t->priority)
                gnutls_priority_deinit(t->priority);
        free(t);
}

static inline void tls_freep(dc_nbd_tls **t) {
        tls_free(*t);
}

static char *file_in(const char *dir, const char *name) {
        char *p;
        return asprintf(&p, "%s/%s", dir, name) < 0 ? NULL : p;
}

static int check_readable(const char *path, const char *what) {
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
                return dc_error(errno, "TLS %s '%s': %s", what, path, strerror(errno));
        close(fd);
        return 0;
}

static int load_x509(dc_nbd_tls *t, const char *dir, bool verify_peer) {
        _cleanup_free_ char *crl = file_in(dir, "ca-crl.pem");
        _cleanup_free_ char *ca = file_in(dir, "ca-cert.pem");
        _cleanup_free_ char *cert = file_in(dir, "server-cert.pem");
        _cleanup_free_ char *key = file_in(dir, "server-key.pem");
        int r;

        if (!crl || !ca || !cert || !key)
                return dc_error(ENOMEM, "out of memory");
        if ((r = check_readable(cert, "certificate")) < 0 || (r = check_readable(key, "key")) < 0)
                return r;
        if (gnutls_certificate_allocate_credentials(&t->x509) < 0)
                return dc_error(ENOMEM, "out of memory");
        /* the CA is what client certificates are verified against: needed only then */
        if (verify_peer || access(ca, F_OK) == 0) {
                if ((r = check_readable(ca, "CA certificate")) < 0)
                        return r;
                r = gnutls_certificate_set_x509_trust_file(t->x509, ca, GNUTLS_X509_FMT_PEM);
                if (r <= 0)
                        return dc_error(EINVAL, "TLS CA certificate '%s': %s", ca,
                                        r < 0 ? gnutls_strerror(r) : "no certificate in it");
                /* the CA's revocation list, when there is one (as QEMU's tls-creds-x509 reads it) */
                if (access(crl, F_OK) == 0) {
                        if ((r = check_readable(crl, "CRL")) < 0)
                                return r;
                        r = gnutls_certificate_set_x509_crl_file(t->x509, crl, GNUTLS_X509_FMT_PEM);
                        if (r < 0)
                                return dc_error(EINVAL, "TLS CRL '%s': %s", crl, gnutls_strerror(r));
                }
        }
        r = gnutls_certificate_set_x509_key_file(t->x509, cert, key, GNUTLS_X509_FMT_PEM);
        if (r < 0)
                return dc_error(EINVAL, "TLS certificate '%s' with key '%s': %s", cert, key, gnutls_strerror(r));
        return 0;
}

/* Lines "identity:hexkey" (psktool's format), at least one; blank lines are skipped. */
static int check_psk_file(const char *path) {
        _cleanup_free_ char *line = NULL;
        size_t cap = 0;
        unsigned keys = 0, n = 0;
        ssize_t len;
        FILE *f = fopen(path, "re");

        if (!f)
                return dc_error(errno, "TLS PSK file '%s': %s", path, strerror(errno));
        while ((len = getline(&line, &cap, f)) >= 0) {
                char *colon;
                size_t hex;
                n++;
                while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
                        line[--len] = 0;
                if (len == 0)
                        continue;
                colon = strchr(line, ':');
                hex = colon ? strlen(colon + 1) : 0;
                if (!colon || colon == line || hex == 0 || hex % 2 || strspn(colon + 1, "0123456789abcdefABCDEF") != hex) {
                        fclose(f);
                        return dc_error(EINVAL, "TLS PSK file '%s', line %u: not \"identity:hexkey\"", path, n);
                }
                keys++;
        }
        fclose(f);
        if (keys == 0)
                return dc_error(EINVAL, "TLS PSK file '%s' holds no key", path);
        return 0;
}

static int load_psk(dc_nbd_tls *t, const char *path) {
        int r = check_psk_file(path);

        if (r < 0)
                return r;
        if (gnutls_psk_allocate_server_credentials(&t->psk) < 0)
                return dc_error(ENOMEM, "out of memory");
        r = gnutls_psk_set_server_credentials_file(t->psk, path);
        if (r < 0)
                return dc_error(EINVAL, "TLS PSK file '%s': %s", path, gnutls_strerror(r));
        return 0;
}

DC_EXPORT int dc_nbd_tls_new(const struct dc_nbd_tls_options *opts, dc_nbd_tls **ret) {
        _cleanup_(tls_freep) dc_nbd_tls *t = NULL;
        int r;

        if (!opts || (!opts->x509_dir && !opts->psk_file))
                return dc_error(EINVAL, "TLS credentials need an X.509 directory or a PSK file");
        t = calloc(1, sizeof *t);
        if (!t)
                return dc_error(ENOMEM, "out of memory");
        t->refs = 1;
        t->verify_peer = opts->x509_dir && opts->verify_peer;
        if (opts->x509_dir && (r = load_x509(t, opts->x509_dir, t->verify_peer)) < 0)
                return r;
        if (opts->psk_file && (r = load_psk(t, opts->psk_file)) < 0)
                return r;
        /* GnuTLS's defaults, with the PSK key exchanges added when there are keys */
        r = gnutls_priority_init(&t->priority, t->psk ? "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK" : "NORMAL", NULL);
        if (r < 0)
                return dc_error(EINVAL, "TLS priorities: %s", gnutls_strerror(r));
        *ret = TAKE_PTR(t);
        return 0;
}

DC_EXPORT dc_nbd_tls *dc_nbd_tls_ref(dc_nbd_tls *t) {
        if (t)
                __atomic_add_fetch(&t->refs, 1, __ATOMIC_RELAXED);
        return t;
}

DC_EXPORT dc_nbd_tls *dc_nbd_tls_unref(dc_nbd_tls *t) {
        if (t && __atomic_sub_fetch(&t->refs, 1, __ATOMIC_ACQ_REL) == 0)
                tls_free(t);
        return NULL;
}
