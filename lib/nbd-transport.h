/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/*
 * The byte stream of one NBD connection (lib/nbd-transport.c): the socket
 * itself, or a GnuTLS session over it once NBD_OPT_STARTTLS succeeded.
 * nbd-server.c reads and writes through it and knows nothing of TLS; the
 * TLS credentials (dc_nbd_tls, diskchain.h) live here too.
 */

#include <stdint.h>
#include <sys/uio.h>

#include "diskchain.h"

struct nbd_transport {
        int fd;
        /*
         * CLOCK_MONOTONIC ns bounding every wait (-ETIMEDOUT past it), or 0:
         * block as long as it takes.  Set by the reader for the handshake
         * only; it is 0 before any other thread writes.
         */
        int64_t deadline;
        dc_nbd_tls *creds;   /* TLS is required (our reference), or NULL */
        void *tls;           /* the gnutls_session_t after STARTTLS, or NULL */
        bool established;    /* its handshake succeeded */
        int error;           /* the socket's last failure under TLS, for the -errno returned */
};

/* A connection on FD (not owned: the caller closes it) that requires TLS with CREDS, or plaintext (NULL). */
void nbd_transport_init(struct nbd_transport *t, int fd, dc_nbd_tls *creds);
/* Free the TLS session and drop the credentials; the fd stays open. */
void nbd_transport_done(struct nbd_transport *t);

/* Read all of LEN: 0, or -errno (-ECONNRESET at EOF, -ETIMEDOUT past the deadline). */
int nbd_transport_read(struct nbd_transport *t, void *buf, size_t len);
/* Write all of IOV (which is consumed): 0 or -errno.  One caller at a time (the send mutex). */
int nbd_transport_writev(struct nbd_transport *t, struct iovec *iov, int n);
/* The TLS handshake after the STARTTLS ACK, within the deadline: 0 when the stream is encrypted from now on. */
int nbd_transport_starttls(struct nbd_transport *t);
/* Tell a TLS peer we are done (close_notify), waiting at most a moment for room to send it; nothing in plaintext. */
void nbd_transport_bye(struct nbd_transport *t);

int64_t nbd_now_ns(void);
