/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * An NBD export of one dc_disk (diskchain.h, dc_nbd_export_*): the
 * protocol of nbd-proto.c put on stream sockets and threads.
 *
 * Design notes
 * ------------
 * - Threads.  Each connection has a reader thread, which runs the
 *   handshake and then reads requests (header and payload), and up to
 *   NBD_WORKERS worker threads that serve them from a queue.  The reader
 *   starts one worker with the connection and another whenever it queues a
 *   request while no worker is idle, so a client with one request at a time
 *   costs one thread and a client with 16 in flight has 16 served side by
 *   side (each may wait on the disk: a copy-on-write read, a flush).
 *   Workers wait on their own condition variable and are woken one per
 *   queued request; the reader waits for room on another.  On a plaintext
 *   connection the reader serves small reads that lie in one piece itself,
 *   through an io_uring (see "the reader's own reads" below): no worker is
 *   woken for the commonest request.  Requests of
 *   one connection run side by side and complete in any order; a reply goes
 *   out whole under the connection's send mutex, so chunks of two requests
 *   never interleave on the wire.  A listener thread per listening socket
 *   accepts connections.  The caller's thread runs nothing but new, serve,
 *   listen, get_stats and free.
 * - Back-pressure.  A connection has at most NBD_MAX_IN_FLIGHT (16)
 *   requests queued or running, and at most NBD_MAX_IN_FLIGHT_BYTES
 *   (64 MiB) of READ and WRITE data among them; beyond that the reader
 *   stops reading and the client's own sends block.  A client that never
 *   reads its replies stalls its own workers on the send mutex and nothing
 *   else: every connection has its own workers.
 * - Timeouts.  The handshake must be over within NBD_HANDSHAKE_TIMEOUT
 *   (10 s) from the accept, reads and writes alike (poll against one
 *   deadline, so a client trickling a byte at a time does not extend it),
 *   the TLS handshake after STARTTLS included.  Transmission has no
 *   timeout: an idle client is a normal client.
 * - Transport (nbd-transport.c).  Every byte goes through the connection's
 *   nbd_transport: the socket, or the TLS session over it once STARTTLS
 *   succeeded.  A listener made with TLS credentials requires TLS of every
 *   connection it accepts (nbd-proto.c, "FORCEDTLS"); other listeners and
 *   dc_nbd_export_serve() do not offer it.  At the end of a connection that
 *   went well, a TLS peer gets a close_notify before the socket is shut.
 * - Stop (dc_nbd_export_free).  Listeners are woken through a pipe and
 *   joined.  Every connection's socket is shut down for reading, which ends
 *   its reader at the next request (and any handshake at once); requests
 *   already read are served and their replies sent.  A client that does not
 *   take its replies gets NBD_STOP_GRACE (10 s), then its socket is shut down
 *   entirely, which fails the blocked sends.  Then every thread is joined,
 *   the disk is flushed and our reference dropped.  A connection's fd is
 *   closed only by whoever joins its reader, never by the reader itself, so
 *   a shutdown() from free can never hit a descriptor number reused meanwhile.
 * - Semantics (README.md, "NBD server").  Every request goes through the
 *   dc_disk, so jobs' filters see writes and a pivot is invisible.  FLUSH
 *   is dc_disk_flush(): the qcow2 layer's deferred L2 entries are written
 *   and the files fdatasync'ed, so every write completed before it, on any
 *   connection, is durable; hence CAN_MULTI_CONN.  FUA is the write
 *   followed by the same flush before the reply.  FAST_ZERO succeeds only
 *   when block status shows the range reads as zeros already (a metadata
 *   lookup, no data written); otherwise it fails at once with NBD_ENOTSUP
 *   and changes nothing, since a zero write may have to write data (partial
 *   clusters, compat 0.10, a raw file without fallocate).  WRITE_ZEROES
 *   without NO_HOLE may deallocate (DC_ZERO_MAY_UNMAP).
 * - Structured READs ("Structured reply chunk message"): block status
 *   splits the range into OFFSET_HOLE chunks for what reads as zeros and
 *   OFFSET_DATA chunks for the rest (at most NBD_MAX_READ_CHUNKS; what is
 *   left after them goes out as data), all read before the first byte is
 *   sent, so that a failing read is one ERROR chunk and never a reply cut
 *   in the middle.  With DF, or simple replies, the range is one piece.
 */

#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>

#include <netinet/in.h>
#include <netinet/tcp.h>

#include <liburing.h>
#ifdef HAVE_VALGRIND_MEMCHECK_H
#include <valgrind/memcheck.h>
#else
#define VALGRIND_MAKE_MEM_DEFINED(p, n) ((void) 0)
#define RUNNING_ON_VALGRIND 0
#endif

#include "dc-internal.h"
#include "nbd-proto.h"
#include "nbd-transport.h"

#define NBD_WORKERS 16u
#define NBD_MAX_IN_FLIGHT 16u
#define NBD_MAX_IN_FLIGHT_BYTES (UINT64_C(64) << 20)
#define NBD_HANDSHAKE_TIMEOUT_NS (INT64_C(10) * 1000000000)
#define NBD_STOP_GRACE_NS (INT64_C(10) * 1000000000)
#define NBD_CHANGED_INTERVAL_NS (INT64_C(100) * 1000000)
#define NBD_DEFAULT_MAX_CONNECTIONS 16u
#define NBD_MAX_READ_CHUNKS 128u
#define NBD_MAX_ERROR_MESSAGE 256u

struct request {
        struct nbd_request r;
        uint8_t *payload;
        uint32_t error;   /* decided by the reader: answer with it and do nothing */
        uint64_t cost;    /* bytes counted against the in-flight budget */
        struct request *next;
};

struct conn {
        dc_nbd_export *e;
        int fd;
        struct nbd_transport t;     /* over fd: reads on the reader, writes under send_lock */
        pthread_t reader;
        pthread_t workers[NBD_WORKERS];
        unsigned nworkers;
        struct nbd_session s;
        struct nbd_export_info x;

        pthread_mutex_t lock;       /* the queue and the counters below */
        pthread_cond_t cond;        /* room in the budget, or the stop: the reader waits */
        pthread_cond_t work;        /* a queued request, or closing: workers wait */
        struct request *head, *tail;
        unsigned queued;            /* requests in the queue */
        unsigned idle;              /* workers waiting for a request */
        unsigned in_flight;
        uint64_t in_flight_bytes;
        bool closing;               /* no more requests: workers leave once the queue is empty */
        bool stop;                  /* the export is stopping: read no more */

        pthread_mutex_t send_lock;  /* one reply at a time on the wire */
        bool dead;                  /* a send failed (under send_lock) */

        /* the export's, under its lock */
        bool done;                  /* the reader is about to return: join it */
        struct conn *next;
};

struct listener {
        dc_nbd_export *e;
        int fd;
        bool peercred;              /* a unix socket: ALLOW gets the peer's SO_PEERCRED */
        dc_nbd_tls *tls;            /* required of every connection (a reference), or NULL */
        pthread_t thread;
        bool (*allow)(void *userdata, uid_t uid, pid_t pid);
        void *userdata;
        struct listener *next;
};

struct dc_nbd_export {
        dc_disk *disk;
        char *name, *description;
        char *bitmap_name;          /* offered as qemu:dirty-bitmap:NAME, with BITMAP's bits */
        dc_bitmap_copy *bitmap;
        dc_snapshot *snapshot;      /* served instead of the disk (read-only), or NULL */
        bool writable;
        unsigned max_connections;
        void (*changed)(void *userdata);
        void *userdata;

        pthread_mutex_t lock;       /* the lists and counters below */
        pthread_cond_t cond;
        bool stopping;
        struct conn *conns;         /* running and done-but-not-joined */
        unsigned nconns;            /* not done */
        struct listener *listeners;
        int wake[2];                /* written at stop: listeners leave */

        /* atomics */
        unsigned clients;
        uint64_t bytes_read, bytes_written, requests;
        int64_t last_changed;
};

static void notify(dc_nbd_export *e) {
        if (e->changed)
                e->changed(e->userdata);
}

/* At most every NBD_CHANGED_INTERVAL_NS while requests are served. */
static void notify_throttled(dc_nbd_export *e) {
        int64_t now = nbd_now_ns(), last = __atomic_load_n(&e->last_changed, __ATOMIC_RELAXED);

        if (now - last < NBD_CHANGED_INTERVAL_NS)
                return;
        if (__atomic_compare_exchange_n(&e->last_changed, &last, now, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                notify(e);
}

/* --- the handshake's byte stream ------------------------------------------------------ */

static int conn_read(void *userdata, void *buf, size_t len) {
        return nbd_transport_read(userdata, buf, len);
}

static int conn_write(void *userdata, const void *buf, size_t len) {
        struct iovec iov = { (void *) buf, len };
        return nbd_transport_writev(userdata, &iov, 1);
}

static int conn_starttls(void *userdata) {
        return nbd_transport_starttls(userdata);
}

/* --- replies ---------------------------------------------------------------------- */

/* Send one whole reply; a failure kills the connection (the reader wakes up from the shutdown). */
static void send_reply(struct conn *c, struct iovec *iov, int n) {
        pthread_mutex_lock(&c->send_lock);
        if (!c->dead && nbd_transport_writev(&c->t, iov, n) < 0) {
                c->dead = true;
                shutdown(c->fd, SHUT_RDWR);
        }
        pthread_mutex_unlock(&c->send_lock);
}

static void reply_ok(struct conn *c, const struct request *q) {
        uint8_t h[16];
        struct iovec iov = { h, sizeof h };

        nbd_simple_reply(h, 0, q->r.cookie);
        send_reply(c, &iov, 1);
}

/* An error: an ERROR chunk with MSG once structured replies are on, else a simple reply. */
static void reply_error(struct conn *c, const struct request *q, uint32_t error, const char *msg) {
        uint8_t h[20 + 6 + NBD_MAX_ERROR_MESSAGE];
        size_t len = strnlen(msg, NBD_MAX_ERROR_MESSAGE);
        struct iovec iov = { h, 16 };

        if (!c->s.structured) {
                nbd_simple_reply(h, error, q->r.cookie);
        } else {
                nbd_chunk_header(h, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, q->r.cookie, (uint32_t) (6 + len));
                put_be32(h + 20, error);
                put_be16(h + 24, (uint16_t) len);
                memcpy(h + 26, msg, len);
                iov.iov_len = 26 + len;
        }
        send_reply(c, &iov, 1);
}

static void reply_errno(struct conn *c, const struct request *q, int r) {
        reply_error(c, q, nbd_errno(r), dc_get_error());
}

static const char *request_error_message(uint32_t error) {
        switch (error) {
        case NBD_EPERM:
                return "the export is read-only";
        case NBD_ENOSPC:
                return "the request reaches beyond the end of the export";
        case NBD_EOVERFLOW:
                return "the request is longer than the maximum payload (32 MiB)";
        default:
                return "invalid request: unknown command or flag, out of range, or no metadata context";
        }
}

/* --- request buffers -------------------------------------------------------------- */

/*
 * Request data is page-aligned, so that an export with cache=none reads and
 * writes it around the page cache (dc_disk_set_cache), and comes from the
 * heap: glibc serves every posix_memalign() of more than its mmap threshold
 * with a fresh mmap(), which on this workload (a 256 KiB buffer per request)
 * cost more CPU in page faults and munmap()s than the reads themselves, where
 * malloc() reuses freed blocks once the first is freed.  So: malloc() with a
 * page to spare, the block's own address kept right before the aligned one.
 */
#define BUFFER_ALIGN 4096

static void *buffer_new(size_t len) {
        uint8_t *raw = malloc(MAX(len, (size_t) 1) + BUFFER_ALIGN), *p;

        if (!raw)
                return NULL;
        p = raw + BUFFER_ALIGN - (uintptr_t) raw % BUFFER_ALIGN; /* at least sizeof(void *) past raw */
        memcpy(p - sizeof raw, &raw, sizeof raw);
        return p;
}

static void buffer_free(void *p) {
        void *raw;

        if (!p)
                return;
        memcpy(&raw, (uint8_t *) p - sizeof raw, sizeof raw);
        free(raw);
}

static void buffer_freep(uint8_t **p) {
        buffer_free(*p);
}

/* --- commands --------------------------------------------------------------------- */

/* What clients read: the disk, or a point-in-time view of it. */
static int view_read(dc_nbd_export *e, void *buf, uint64_t off, size_t len) {
        return e->snapshot ? dc_snapshot_read(e->snapshot, buf, off, len) : dc_disk_read(e->disk, buf, off, len);
}

static int view_status(dc_nbd_export *e, uint64_t off, uint64_t len, struct dc_extent *ret) {
        return e->snapshot ? dc_snapshot_block_status(e->snapshot, off, len, ret)
                           : dc_disk_block_status(e->disk, off, len, ret);
}

static int status_cb(void *userdata, uint64_t off, uint64_t len, struct dc_extent *ret) {
        return view_status(userdata, off, len, ret);
}

struct segment {
        uint64_t off, len;
        bool hole;
        uint8_t hdr[20 + 12];
};

static void cmd_read(struct conn *c, const struct request *q) {
        dc_nbd_export *d = c->e;
        uint64_t off = q->r.offset, end = off + q->r.length;
        _cleanup_(buffer_freep) uint8_t *buf = buffer_new(q->r.length);
        _cleanup_free_ struct segment *seg = NULL;
        _cleanup_free_ struct iovec *iov = NULL;
        unsigned nseg = 0;
        int r, n = 0;

        if (!buf)
                return reply_errno(c, q, dc_error(ENOMEM, "out of memory"));

        if (!c->s.structured || (q->r.flags & NBD_CMD_FLAG_DF) || q->r.length == 0) {
                uint8_t h[20 + 8];
                struct iovec v[2] = { { h, 16 }, { buf, q->r.length } };

                r = q->r.length ? view_read(d, buf, off, q->r.length) : 0;
                if (r < 0)
                        return reply_errno(c, q, r);
                if (!c->s.structured)
                        nbd_simple_reply(h, 0, q->r.cookie);
                else if (q->r.length == 0) {
                        nbd_chunk_header(h, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, q->r.cookie, 0);
                        v[0].iov_len = 20;
                } else {
                        nbd_chunk_header(h, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, q->r.cookie,
                                         8 + q->r.length);
                        put_be64(h + 20, off);
                        v[0].iov_len = 28;
                }
                send_reply(c, v, 2);
                __atomic_add_fetch(&c->e->bytes_read, q->r.length, __ATOMIC_RELAXED);
                return;
        }

        seg = calloc(NBD_MAX_READ_CHUNKS, sizeof *seg);
        iov = calloc(2 * NBD_MAX_READ_CHUNKS, sizeof *iov);
        if (!seg || !iov)
                return reply_errno(c, q, dc_error(ENOMEM, "out of memory"));
        while (off < end) {
                struct dc_extent e;
                bool hole;

                if (nseg == NBD_MAX_READ_CHUNKS - 1) {
                        /* the rest as one data chunk */
                        e = (struct dc_extent){ .length = end - off };
                        hole = false;
                } else {
                        r = view_status(d, off, end - off, &e);
                        if (r < 0)
                                return reply_errno(c, q, r);
                        if (e.length == 0)
                                return reply_errno(c, q, dc_error(EIO, "block status covered nothing"));
                        e.length = MIN(e.length, end - off);
                        hole = e.zero;
                }
                if (nseg && seg[nseg - 1].hole == hole)
                        seg[nseg - 1].len += e.length;
                else
                        seg[nseg++] = (struct segment){ .off = off, .len = e.length, .hole = hole };
                off += e.length;
        }
        for (unsigned i = 0; i < nseg; i++) {
                struct segment *s = &seg[i];
                uint16_t done = i == nseg - 1 ? NBD_REPLY_FLAG_DONE : 0;

                if (s->hole) {
                        nbd_chunk_header(s->hdr, done, NBD_REPLY_TYPE_OFFSET_HOLE, q->r.cookie, 12);
                        put_be64(s->hdr + 20, s->off);
                        put_be32(s->hdr + 28, (uint32_t) s->len);
                        iov[n++] = (struct iovec){ s->hdr, 32 };
                        continue;
                }
                r = view_read(d, buf + (s->off - q->r.offset), s->off, s->len);
                if (r < 0)
                        return reply_errno(c, q, r);
                nbd_chunk_header(s->hdr, done, NBD_REPLY_TYPE_OFFSET_DATA, q->r.cookie, (uint32_t) (8 + s->len));
                put_be64(s->hdr + 20, s->off);
                iov[n++] = (struct iovec){ s->hdr, 28 };
                iov[n++] = (struct iovec){ buf + (s->off - q->r.offset), s->len };
        }
        send_reply(c, iov, n);
        __atomic_add_fetch(&c->e->bytes_read, q->r.length, __ATOMIC_RELAXED);
}

/* WRITE_ZEROES with FAST_ZERO: 1 when the range reads as zeros already, 0 when it does not. */
static int reads_as_zeros(dc_disk *d, uint64_t off, uint64_t len) {
        while (len > 0) {
                struct dc_extent e;
                int r = dc_disk_block_status(d, off, len, &e);
                if (r < 0)
                        return r;
                if (!e.zero || e.length == 0)
                        return 0;
                e.length = MIN(e.length, len);
                off += e.length;
                len -= e.length;
        }
        return 1;
}

static uint64_t bitmap_run_cb(void *userdata, uint64_t off, uint64_t len, bool *ret_dirty) {
        return dc_bitmap_copy_run(userdata, off, len, ret_dirty);
}

static void cmd_block_status(struct conn *c, const struct request *q) {
        uint8_t base[4 + 8 * NBD_MAX_EXTENTS], depth[4 + 8 * NBD_MAX_EXTENTS], bits[4 + 8 * NBD_MAX_EXTENTS];
        uint8_t h[3][20];
        size_t len[3] = { 0 };
        uint8_t *payload[3] = { base, depth, bits };
        struct iovec iov[6];
        int r = 0, n = 0, last = -1;

        if (c->s.meta_base || c->s.meta_depth)
                r = nbd_block_status(&c->s, q->r.offset, q->r.length, q->r.flags & NBD_CMD_FLAG_REQ_ONE, status_cb,
                                     c->e, base, &len[0], depth, &len[1]);
        if (r >= 0 && c->s.meta_bitmap)
                r = nbd_bitmap_status(q->r.offset, q->r.length, q->r.flags & NBD_CMD_FLAG_REQ_ONE, bitmap_run_cb,
                                      c->e->bitmap, bits, &len[2]);
        if (r < 0)
                return reply_errno(c, q, r);
        /* one chunk per selected context, the last one flagged done */
        for (int i = 0; i < 3; i++)
                if (len[i])
                        last = i;
        for (int i = 0; i < 3; i++) {
                if (!len[i])
                        continue;
                nbd_chunk_header(h[i], i == last ? NBD_REPLY_FLAG_DONE : 0, NBD_REPLY_TYPE_BLOCK_STATUS, q->r.cookie,
                                 (uint32_t) len[i]);
                iov[n++] = (struct iovec){ h[i], 20 };
                iov[n++] = (struct iovec){ payload[i], len[i] };
        }
        send_reply(c, iov, n);
}

static void serve_request(struct conn *c, const struct request *q) {
        dc_disk *d = c->e->disk;
        bool fua = q->r.flags & NBD_CMD_FLAG_FUA;
        int r = 0;

        dc_error_clear();
        if (q->error)
                return reply_error(c, q, q->error, request_error_message(q->error));
        switch (q->r.type) {
        case NBD_CMD_READ:
                return cmd_read(c, q);
        case NBD_CMD_BLOCK_STATUS:
                return cmd_block_status(c, q);
        case NBD_CMD_WRITE:
                r = q->r.length ? dc_disk_write(d, q->payload, q->r.offset, q->r.length) : 0;
                if (r >= 0)
                        __atomic_add_fetch(&c->e->bytes_written, q->r.length, __ATOMIC_RELAXED);
                break;
        case NBD_CMD_WRITE_ZEROES:
                if (q->r.flags & NBD_CMD_FLAG_FAST_ZERO) {
                        r = reads_as_zeros(d, q->r.offset, q->r.length);
                        if (r == 0)
                                return reply_error(c, q, NBD_ENOTSUP,
                                                   "a fast zero is only answered where the disk reads as zeros already");
                        fua = false; /* nothing was written */
                        break;
                }
                if (q->r.length)
                        r = dc_disk_write_zeroes(d, q->r.offset, q->r.length,
                                                 q->r.flags & NBD_CMD_FLAG_NO_HOLE ? 0 : DC_ZERO_MAY_UNMAP);
                break;
        case NBD_CMD_TRIM:
                if (q->r.length)
                        r = dc_disk_discard(d, q->r.offset, q->r.length);
                break;
        case NBD_CMD_FLUSH:
                r = dc_disk_flush(d);
                fua = false;
                break;
        case NBD_CMD_CACHE:
                /* a hint; the chain's data comes through the page cache anyway */
                fua = false;
                break;
        default:
                r = dc_error(EINVAL, "unknown command %u", q->r.type);
                break;
        }
        if (r >= 0 && fua)
                r = dc_disk_flush(d);
        if (r < 0)
                return reply_errno(c, q, r);
        reply_ok(c, q);
}

static void *worker_main(void *userdata) {
        struct conn *c = userdata;

        for (;;) {
                struct request *q;

                pthread_mutex_lock(&c->lock);
                while (!c->head && !c->closing) {
                        c->idle++;
                        pthread_cond_wait(&c->work, &c->lock);
                        c->idle--;
                }
                q = c->head;
                if (!q) {
                        pthread_mutex_unlock(&c->lock);
                        break;
                }
                c->head = q->next;
                if (!c->head)
                        c->tail = NULL;
                c->queued--;
                pthread_mutex_unlock(&c->lock);

                serve_request(c, q);
                __atomic_add_fetch(&c->e->requests, 1, __ATOMIC_RELAXED);

                pthread_mutex_lock(&c->lock);
                c->in_flight--;
                c->in_flight_bytes -= q->cost;
                pthread_cond_signal(&c->cond);
                pthread_mutex_unlock(&c->lock);
                buffer_free(q->payload);
                free(q);
                notify_throttled(c->e);
        }
        return NULL;
}

/* --- a connection ------------------------------------------------------------------ */

/* Wait for room for a request of COST bytes; false when the connection is to stop reading. */
static bool wait_room(struct conn *c, uint64_t cost) {
        bool ok;

        pthread_mutex_lock(&c->lock);
        while (!c->stop && c->in_flight > 0 &&
               (c->in_flight >= NBD_MAX_IN_FLIGHT || c->in_flight_bytes + cost > NBD_MAX_IN_FLIGHT_BYTES))
                pthread_cond_wait(&c->cond, &c->lock);
        ok = !c->stop;
        if (ok) {
                c->in_flight++;
                c->in_flight_bytes += cost;
        }
        pthread_mutex_unlock(&c->lock);
        return ok;
}

/* Queue Q for a worker; start one more when more requests wait than workers
 * (the reader's thread only: it alone starts and joins workers). */
static void enqueue(struct conn *c, struct request *q) {
        bool more;

        pthread_mutex_lock(&c->lock);
        if (c->tail)
                c->tail->next = q;
        else
                c->head = q;
        c->tail = q;
        /* idle counts a worker until it runs again, woken or not: compare with the queue */
        more = ++c->queued > c->idle && c->nworkers < NBD_WORKERS;
        pthread_cond_signal(&c->work);
        pthread_mutex_unlock(&c->lock);
        /* without it the request waits for a running worker */
        if (more && pthread_create(&c->workers[c->nworkers], NULL, worker_main, c) == 0)
                c->nworkers++;
}

/* Take an in-flight slot for a request of COST bytes whatever the budget says (a ring read handed to the workers). */
static void enqueue_over(struct conn *c, struct request *q) {
        pthread_mutex_lock(&c->lock);
        c->in_flight++;
        c->in_flight_bytes += q->cost;
        pthread_mutex_unlock(&c->lock);
        enqueue(c, q);
}

struct ring;
static bool ring_room(struct conn *c, struct ring *g, uint64_t cost);
static int ring_payload(struct conn *c, struct ring *g, uint8_t *buf, size_t len);

/*
 * Queue request R (CHECK: what nbd_request_check said of it) for a worker,
 * after reading its payload: through the ring connection's look-ahead G
 * first when there is one.  False when the connection is to end.
 */
static bool queue_request(struct conn *c, struct ring *g, const struct nbd_request *r, int check) {
        uint32_t payload = nbd_request_payload(r);
        struct request *q = calloc(1, sizeof *q);

        if (!q)
                return false;
        q->r = *r;
        q->error = (uint32_t) check;
        q->cost = r->type == NBD_CMD_READ && !check ? r->length : payload;
        if (!(g ? ring_room(c, g, q->cost) : wait_room(c, q->cost))) {
                free(q);
                return false;
        }
        if (payload) {
                q->payload = buffer_new(payload);
                if (!q->payload ||
                    (g ? ring_payload(c, g, q->payload, payload) : nbd_transport_read(&c->t, q->payload, payload)) < 0) {
                        /* the client left in the middle of its payload: nothing to answer */
                        pthread_mutex_lock(&c->lock);
                        c->in_flight--;
                        c->in_flight_bytes -= q->cost;
                        pthread_mutex_unlock(&c->lock);
                        buffer_free(q->payload);
                        free(q);
                        return false;
                }
        }
        enqueue(c, q);
        return true;
}

/* Read and queue requests until DISC, EOF, a protocol violation or the stop. */
static void transmission(struct conn *c) {
        for (;;) {
                uint8_t h[NBD_REQUEST_SIZE];
                struct nbd_request r;
                int check;

                if (nbd_transport_read(&c->t, h, sizeof h) < 0 || nbd_request_decode(h, &r) < 0)
                        return;
                check = nbd_request_check(&c->s, &c->x, &r);
                if (check < 0 || r.type == NBD_CMD_DISC || !queue_request(c, NULL, &r, check))
                        return;
        }
}

/* --- the reader's own reads: io_uring --------------------------------------------- */

/*
 * A plaintext connection's reader serves the common READ itself, without a
 * worker: a request of at most RING_MAX_READ bytes whose range lies in at
 * most RING_PIECES pieces (dc_disk_map_read: runs of one layer's data, or
 * zeros) is read through the connection's io_uring, a read per piece into
 * the slot's own buffer, and the reader sends the reply when the last
 * piece completes.  Waking a worker for each request cost more CPU than the read
 * (a 4 KiB random read: a futex wake, two context switches and a blocking
 * pread on the worker); with the ring, one io_uring_enter submits the reads
 * that came in and collects what completed, and requests are taken from
 * the socket through the same ring into a look-ahead buffer, several at a
 * time.  Everything else (writes, flushes, block status, reads in more
 * pieces, compressed data, a disk quiescing, a read that failed or came
 * back short) goes to the workers as before, whose errors and messages are
 * the ones a client gets.  The slots' buffers stay with the connection: a
 * fresh 256 KiB block per request cost the reader a page fault per 4 KiB
 * whenever the heap gave its top back.
 *
 * A mapped read holds the disk's door open (a pivot waits for it), so the
 * reader never blocks on anything but the ring while one is outstanding:
 * before it waits for room in the budget, for the rest of a payload, or on
 * a send that does not go out at once, it settles the ring (waits for every
 * read in it, which is disk I/O and always ends, and closes their doors).
 * A client that stops taking replies thus holds up nothing but itself.
 */
#define RING_READS 32u
#define RING_PIECES 8u
#define RING_ENTRIES 256u         /* its completion queue holds every piece of every read, and the RECV */
#define RING_MAX_READ (UINT32_C(256) << 10)
#define RING_LOOKAHEAD (UINT32_C(64) << 10)

struct ring_read;

struct ring_piece {
        struct ring_read *rr;
        size_t len;
};

struct ring_read {
        struct nbd_request r;
        uint8_t *buf;             /* RING_MAX_READ bytes, the slot's own for the connection's life */
        unsigned pending;         /* pieces in the ring */
        bool failed;              /* a piece failed or came back short */
        bool zero;                /* the range reads as zeros: nothing was read */
        struct ring_read *next;   /* on the free or the done list */
        struct ring_piece pieces[RING_PIECES];
};

struct ring {
        struct io_uring u;
        unsigned busy;            /* reads in the ring */
        bool recv_busy;           /* a RECV into in[have, RING_LOOKAHEAD) is in the ring */
        bool eof;                 /* the socket gave its last byte, or failed */
        size_t pos, have;         /* in[pos, have): read from the socket, not yet taken */
        struct ring_read *free, *done, **done_tail;
        struct ring_read reads[RING_READS];
        uint8_t in[RING_LOOKAHEAD];
};

/* Collect completions; with ALL, until no read is left in the ring. */
static void ring_reap(struct conn *c, struct ring *g, bool all) {
        for (;;) {
                struct io_uring_cqe *cqe;
                void *data;
                int res;

                if (io_uring_peek_cqe(&g->u, &cqe) != 0) {
                        if (!all || !g->busy)
                                return;
                        /* with reads in the ring, this returns when one completes (or a signal came) */
                        (void) io_uring_submit_and_wait(&g->u, 1);
                        continue;
                }
                data = io_uring_cqe_get_data(cqe);
                res = cqe->res;
                io_uring_cqe_seen(&g->u, cqe);
                if (data == g) {
                        g->recv_busy = false;
                        if (res > 0) {
                                VALGRIND_MAKE_MEM_DEFINED(g->in + g->have, res);
                                g->have += (size_t) res;
                        }
                        else if (res != -EINTR && res != -EAGAIN)
                                g->eof = true;
                } else if (data) {
                        struct ring_piece *piece = data;
                        struct ring_read *rr = piece->rr;

                        if (res != (int) piece->len)
                                rr->failed = true;
                        if (--rr->pending)
                                continue;
                        g->busy--;
                        dc_disk_unmap_read(c->e->disk);
                        VALGRIND_MAKE_MEM_DEFINED(rr->buf, rr->r.length);
                        rr->next = NULL;
                        *g->done_tail = rr;
                        g->done_tail = &rr->next;
                }
        }
}

static void ring_settle(struct conn *c, struct ring *g) {
        if (g->busy)
                ring_reap(c, g, true);
}

/* Room in the budget for a worker's request: waited for with nothing of the ring's outstanding. */
static bool ring_room(struct conn *c, struct ring *g, uint64_t cost) {
        bool now;

        pthread_mutex_lock(&c->lock);
        now = c->in_flight == 0 ||
              (c->in_flight < NBD_MAX_IN_FLIGHT && c->in_flight_bytes + cost <= NBD_MAX_IN_FLIGHT_BYTES);
        pthread_mutex_unlock(&c->lock);
        if (!now)
                ring_settle(c, g);
        return wait_room(c, cost);
}

/* A payload: what the look-ahead holds, then the rest from the socket with nothing of the ring's outstanding. */
static int ring_payload(struct conn *c, struct ring *g, uint8_t *buf, size_t len) {
        size_t n = MIN(len, g->have - g->pos);

        memcpy(buf, g->in + g->pos, n);
        g->pos += n;
        if (n == len)
                return 0;
        ring_settle(c, g);
        return nbd_transport_read(&c->t, buf + n, len - n);
}

/* Send a reply; if the socket does not take it at once, settle the ring before waiting for the client. */
static void ring_send(struct conn *c, struct ring *g, struct iovec *iov, int n) {
        size_t total = 0;
        ssize_t k;

        for (int i = 0; i < n; i++)
                total += iov[i].iov_len;
        pthread_mutex_lock(&c->send_lock);
        if (c->dead)
                goto out;
        k = sendmsg(c->fd, &(struct msghdr){ .msg_iov = iov, .msg_iovlen = (size_t) n }, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                goto dead;
        if ((size_t) MAX(k, 0) == total)
                goto out;
        for (k = MAX(k, 0); n > 0 && (size_t) k >= iov->iov_len; iov++, n--)
                k -= (ssize_t) iov->iov_len;
        iov->iov_base = (uint8_t *) iov->iov_base + k;
        iov->iov_len -= (size_t) k;
        ring_settle(c, g);
        if (nbd_transport_writev(&c->t, iov, n) >= 0)
                goto out;
dead:
        c->dead = true;
        shutdown(c->fd, SHUT_RDWR);
out:
        pthread_mutex_unlock(&c->send_lock);
}

/* Answer the reads that completed; hand those that failed or came back short to the workers. */
static void ring_reply(struct conn *c, struct ring *g) {
        struct ring_read *rr;

        while ((rr = g->done)) {
                g->done = rr->next;
                if (!g->done)
                        g->done_tail = &g->done;
                if (!rr->failed) {
                        uint32_t len = rr->r.length;
                        bool hole = rr->zero && c->s.structured && !(rr->r.flags & NBD_CMD_FLAG_DF);
                        uint8_t h[20 + 12];
                        struct iovec v[2] = { { h, 16 }, { rr->buf, len } };

                        if (rr->zero && !hole)
                                memset(rr->buf, 0, len);
                        if (!c->s.structured)
                                nbd_simple_reply(h, 0, rr->r.cookie);
                        else if (hole) {
                                nbd_chunk_header(h, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_HOLE, rr->r.cookie, 12);
                                put_be64(h + 20, rr->r.offset);
                                put_be32(h + 28, len);
                                v[0].iov_len = 32;
                        } else {
                                nbd_chunk_header(h, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, rr->r.cookie, 8 + len);
                                put_be64(h + 20, rr->r.offset);
                                v[0].iov_len = 28;
                        }
                        ring_send(c, g, v, hole ? 1 : 2);
                        __atomic_add_fetch(&c->e->bytes_read, len, __ATOMIC_RELAXED);
                        __atomic_add_fetch(&c->e->requests, 1, __ATOMIC_RELAXED);
                        notify_throttled(c->e);
                } else {
                        /* an error, a short read, a direct read refused: the worker's read says what happened */
                        struct request *q = calloc(1, sizeof *q);

                        if (q) {
                                q->r = rr->r;
                                q->cost = rr->r.length;
                                enqueue_over(c, q);
                        } else {
                                ring_settle(c, g); /* reply_error may wait for the client */
                                reply_error(c, &(struct request){ .r = rr->r }, NBD_ENOMEM, "out of memory");
                        }
                }
                rr->next = g->free;
                g->free = rr;
        }
}

/* Put READ request R in the ring (a free slot is there); false when the connection is to end. */
static bool ring_read(struct conn *c, struct ring *g, const struct nbd_request *r) {
        struct ring_read *rr = g->free;
        struct dc_read_map m[RING_PIECES];
        uint8_t *p;
        int n;

        if (!rr->buf)
                rr->buf = buffer_new(RING_MAX_READ); /* pages are touched as reads need them */
        /* a point-in-time view is read by the workers (dc_snapshot_read) */
        n = rr->buf && !c->e->snapshot ? dc_disk_map_read(c->e->disk, rr->buf, r->offset, r->length, m, RING_PIECES)
                                       : 0;
        if (n <= 0)
                return queue_request(c, g, r, 0);
        g->free = rr->next;
        rr->r = *r;
        rr->pending = 0;
        rr->failed = false;
        rr->zero = n == 1 && m[0].fd < 0;
        rr->next = NULL;
        if (rr->zero) {
                dc_disk_unmap_read(c->e->disk);
                *g->done_tail = rr;
                g->done_tail = &rr->next;
                return true;
        }
        p = rr->buf;
        for (int i = 0; i < n; p += m[i].len, i++) {
                struct io_uring_sqe *sqe;

                if (m[i].fd < 0) {
                        memset(p, 0, m[i].len);
                        continue;
                }
                /* the queue may be full of pieces not submitted yet: submit them (the CQ has room for all) */
                while (!(sqe = io_uring_get_sqe(&g->u)))
                        (void) io_uring_submit(&g->u);
                rr->pieces[rr->pending] = (struct ring_piece){ .rr = rr, .len = m[i].len };
                io_uring_prep_read(sqe, m[i].fd, p, (unsigned) m[i].len, m[i].host);
                io_uring_sqe_set_data(sqe, &rr->pieces[rr->pending]);
                rr->pending++;
        }
        g->busy++;
        return true;
}

/* Take the whole requests of the look-ahead while there are slots for reads; false when the connection is to end. */
static bool ring_parse(struct conn *c, struct ring *g) {
        while (g->have - g->pos >= NBD_REQUEST_SIZE) {
                struct nbd_request r;
                int check;

                if (nbd_request_decode(g->in + g->pos, &r) < 0)
                        return false;
                check = nbd_request_check(&c->s, &c->x, &r);
                if (check < 0 || r.type == NBD_CMD_DISC)
                        return false;
                if (r.type == NBD_CMD_READ && !check && r.length && r.length <= RING_MAX_READ) {
                        if (!g->free)
                                return true;
                        g->pos += NBD_REQUEST_SIZE;
                        if (!ring_read(c, g, &r))
                                return false;
                        continue;
                }
                g->pos += NBD_REQUEST_SIZE;
                if (!queue_request(c, g, &r, check))
                        return false;
        }
        return true;
}

/* Ask the ring for more of the socket, after what is left of the look-ahead. */
static void ring_recv(struct conn *c, struct ring *g) {
        struct io_uring_sqe *sqe;

        memmove(g->in, g->in + g->pos, g->have - g->pos);
        g->have -= g->pos;
        g->pos = 0;
        sqe = io_uring_get_sqe(&g->u);
        io_uring_prep_recv(sqe, c->fd, g->in + g->have, RING_LOOKAHEAD - g->have, 0);
        io_uring_sqe_set_data(sqe, g);
        g->recv_busy = true;
}

/* transmission() through a ring; false when no ring could be set up (nothing was read then). */
static bool transmission_ring(struct conn *c) {
        struct ring *g = calloc(1, sizeof *g);
        struct io_uring_params p = { .flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN };
        bool more = true;

        /*
         * Valgrind (3.19 and others) keeps its lock across a blocking
         * io_uring_enter, so that no other thread of ours runs while the reader
         * waits on its ring (KDE bug 463859): there, the workers serve everything.
         */
        if (!g || RUNNING_ON_VALGRIND) {
                free(g);
                return false;
        }
        if (io_uring_queue_init_params(RING_ENTRIES, &g->u, &p) < 0 &&
            io_uring_queue_init(RING_ENTRIES, &g->u, 0) < 0) {
                /* no io_uring here (an old kernel, a seccomp filter, kernel.io_uring_disabled) */
                free(g);
                return false;
        }
        g->done_tail = &g->done;
        for (unsigned i = 0; i < RING_READS; i++) {
                g->reads[i].next = g->free;
                g->free = &g->reads[i];
        }
        for (;;) {
                bool whole;
                int r;

                if (more && !g->recv_busy)
                        more = ring_parse(c, g);
                ring_reply(c, g);
                if (!more)
                        break;
                whole = g->have - g->pos >= NBD_REQUEST_SIZE; /* a request waits for a slot */
                if (!g->recv_busy && !whole) {
                        if (!g->eof)
                                ring_recv(c, g);
                        else if (!g->busy)
                                break;
                }
                if (!g->recv_busy && !g->busy)
                        continue;
                r = io_uring_submit_and_wait(&g->u, 1);
                if (r < 0 && r != -EINTR && r != -EAGAIN && !g->busy)
                        break;
                ring_reap(c, g, false);
        }
        if (g->recv_busy) {
                struct io_uring_sqe *sqe = io_uring_get_sqe(&g->u);

                io_uring_prep_cancel(sqe, g, 0);
                io_uring_sqe_set_data(sqe, NULL);
                while (g->recv_busy || g->busy) {
                        (void) io_uring_submit_and_wait(&g->u, 1);
                        ring_reap(c, g, false);
                }
        }
        ring_settle(c, g);
        ring_reply(c, g);
        io_uring_queue_exit(&g->u);
        for (unsigned i = 0; i < RING_READS; i++)
                buffer_free(g->reads[i].buf);
        free(g);
        return true;
}

static void *conn_main(void *userdata) {
        struct conn *c = userdata;
        dc_nbd_export *e = c->e;
        struct nbd_io io = { conn_read, conn_write, &c->t, c->t.creds ? conn_starttls : NULL };
        int r;

        /* counted by dc_nbd_export_serve already: a caller's look right after it sees the client */
        notify(e);

        pthread_mutex_lock(&e->lock);
        c->x.stopping = e->stopping;
        pthread_mutex_unlock(&e->lock);
        c->x.size = e->snapshot ? dc_snapshot_size(e->snapshot) : dc_disk_size(e->disk);
        c->t.deadline = nbd_now_ns() + NBD_HANDSHAKE_TIMEOUT_NS;
        r = nbd_handshake(&io, &c->x, &c->s);
        c->t.deadline = 0; /* before any worker sends */
        if (r >= 0) {
                /* replies of 16 requests of up to 256 KiB go out without waiting for the client */
                int sndbuf = 4 << 20;

                (void) setsockopt(c->fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
                if (pthread_create(&c->workers[0], NULL, worker_main, c) == 0) {
                        c->nworkers = 1;
                        if (c->t.tls || !transmission_ring(c))
                                transmission(c);
                }
                /* what was read is served and answered, then the workers leave */
                pthread_mutex_lock(&c->lock);
                c->closing = true;
                pthread_cond_broadcast(&c->work);
                pthread_mutex_unlock(&c->lock);
                for (unsigned i = 0; i < c->nworkers; i++)
                        pthread_join(c->workers[i], NULL);
                if (!c->dead)
                        nbd_transport_bye(&c->t);
        }
        shutdown(c->fd, SHUT_RDWR);

        __atomic_sub_fetch(&e->clients, 1, __ATOMIC_RELAXED);
        notify(e);
        pthread_mutex_lock(&e->lock);
        c->done = true;
        e->nconns--;
        pthread_cond_broadcast(&e->cond);
        pthread_mutex_unlock(&e->lock);
        return NULL;
}

static void conn_free(struct conn *c) {
        pthread_join(c->reader, NULL);
        for (struct request *q = c->head, *next; q; q = next) {
                next = q->next;
                buffer_free(q->payload);
                free(q);
        }
        nbd_transport_done(&c->t);
        if (c->fd >= 0)
                close(c->fd);
        pthread_mutex_destroy(&c->lock);
        pthread_cond_destroy(&c->cond);
        pthread_cond_destroy(&c->work);
        pthread_mutex_destroy(&c->send_lock);
        free(c);
}

/* Join and free the connections that ended (under the export's lock). */
static void reap_locked(dc_nbd_export *e) {
        for (struct conn **p = &e->conns; *p;) {
                struct conn *c = *p;
                if (c->done) {
                        *p = c->next;
                        conn_free(c);
                } else
                        p = &c->next;
        }
}

/* Serve FD (owned), requiring TLS with TLS when it is not NULL. */
static int serve_conn(dc_nbd_export *e, int fd, dc_nbd_tls *tls) {
        struct conn *c;
        int r;

        pthread_mutex_lock(&e->lock);
        reap_locked(e);
        if (e->stopping) {
                r = dc_error(ESHUTDOWN, "the NBD export '%s' is stopping", e->name);
                goto fail;
        }
        if (e->nconns >= e->max_connections) {
                r = dc_error(EBUSY, "the NBD export '%s' has %u connections already", e->name, e->nconns);
                goto fail;
        }
        c = calloc(1, sizeof *c);
        if (!c) {
                r = dc_error(ENOMEM, "out of memory");
                goto fail;
        }
        c->e = e;
        c->fd = fd;
        nbd_transport_init(&c->t, fd, tls);
        c->x = (struct nbd_export_info){ .name = e->name, .description = e->description, .writable = e->writable,
                                         .bitmap = e->bitmap_name };
        pthread_mutex_init(&c->lock, NULL);
        pthread_cond_init(&c->cond, NULL);
        pthread_cond_init(&c->work, NULL);
        pthread_mutex_init(&c->send_lock, NULL);
        __atomic_add_fetch(&e->clients, 1, __ATOMIC_RELAXED);
        r = pthread_create(&c->reader, NULL, conn_main, c);
        if (r != 0) {
                __atomic_sub_fetch(&e->clients, 1, __ATOMIC_RELAXED);
                nbd_transport_done(&c->t);
                pthread_mutex_destroy(&c->lock);
                pthread_cond_destroy(&c->cond);
                pthread_cond_destroy(&c->work);
                pthread_mutex_destroy(&c->send_lock);
                free(c);
                r = dc_error(r, "cannot start a thread for an NBD connection");
                goto fail;
        }
        c->next = e->conns;
        e->conns = c;
        e->nconns++;
        pthread_mutex_unlock(&e->lock);
        return 0;

fail:
        pthread_mutex_unlock(&e->lock);
        close(fd);
        return r;
}

DC_EXPORT int dc_nbd_export_serve(dc_nbd_export *e, int fd) {
        return serve_conn(e, fd, NULL);
}

/* --- listening ---------------------------------------------------------------------- */

static void *listener_main(void *userdata) {
        struct listener *l = userdata;
        dc_nbd_export *e = l->e;

        for (;;) {
                struct pollfd p[2] = { { .fd = l->fd, .events = POLLIN }, { .fd = e->wake[0], .events = POLLIN } };
                int fd;

                if (poll(p, 2, -1) < 0) {
                        if (errno == EINTR)
                                continue;
                        break;
                }
                if (p[1].revents)
                        break;
                fd = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC);
                if (fd < 0) {
                        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                                /* out of descriptors or memory: wait instead of spinning on poll */
                                struct timespec ts = { 0, 100000000 };
                                nanosleep(&ts, NULL);
                        }
                        continue;
                }
                if (l->allow && l->peercred) {
                        struct ucred cred;
                        socklen_t len = sizeof cred;
                        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0 ||
                            !l->allow(l->userdata, cred.uid, cred.pid)) {
                                close(fd);
                                continue;
                        }
                } else if (l->allow && !l->allow(l->userdata, (uid_t) -1, 0)) {
                        close(fd);
                        continue;
                }
                if (!l->peercred) {
                        /* TCP: a reply's pieces go out as they come, not after a delayed ACK */
                        int one = 1;
                        (void) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                }
                (void) serve_conn(e, fd, l->tls);
        }
        return NULL;
}

DC_EXPORT int dc_nbd_export_listen(dc_nbd_export *e, int listen_fd,
                                   bool (*allow)(void *userdata, uid_t uid, pid_t pid), void *userdata) {
        return dc_nbd_export_listen_tls(e, listen_fd, NULL, allow, userdata);
}

DC_EXPORT int dc_nbd_export_listen_tls(dc_nbd_export *e, int listen_fd, dc_nbd_tls *tls,
                                       bool (*allow)(void *userdata, uid_t uid, pid_t pid), void *userdata) {
        struct sockaddr_storage sa;
        socklen_t salen = sizeof sa;
        struct listener *l;
        int r, flags;

        if (getsockname(listen_fd, (struct sockaddr *) &sa, &salen) < 0) {
                r = dc_error(errno, "the listening socket: %s", strerror(errno));
                close(listen_fd);
                return r;
        }

        flags = fcntl(listen_fd, F_GETFL);
        /* a connection that goes away between poll and accept must not block the listener */
        if (flags < 0 || fcntl(listen_fd, F_SETFL, flags | O_NONBLOCK) < 0) {
                r = dc_error(errno, "the listening socket: %s", strerror(errno));
                close(listen_fd);
                return r;
        }
        pthread_mutex_lock(&e->lock);
        if (e->stopping) {
                pthread_mutex_unlock(&e->lock);
                close(listen_fd);
                return dc_error(ESHUTDOWN, "the NBD export '%s' is stopping", e->name);
        }
        l = calloc(1, sizeof *l);
        if (!l) {
                pthread_mutex_unlock(&e->lock);
                close(listen_fd);
                return dc_error(ENOMEM, "out of memory");
        }
        *l = (struct listener){ .e = e, .fd = listen_fd, .peercred = sa.ss_family == AF_UNIX,
                                .tls = dc_nbd_tls_ref(tls), .allow = allow, .userdata = userdata };
        r = pthread_create(&l->thread, NULL, listener_main, l);
        if (r != 0) {
                pthread_mutex_unlock(&e->lock);
                close(listen_fd);
                dc_nbd_tls_unref(l->tls);
                free(l);
                return dc_error(r, "cannot start the NBD listener thread");
        }
        l->next = e->listeners;
        e->listeners = l;
        pthread_mutex_unlock(&e->lock);
        return 0;
}

/* --- the export ---------------------------------------------------------------------- */

DC_EXPORT int dc_nbd_export_new(dc_disk *disk, const struct dc_nbd_export_options *opts,
                                dc_nbd_export **ret) {
        dc_nbd_export *e;

        if (!disk || !opts || !opts->name)
                return dc_error(EINVAL, "an NBD export needs a disk and a name");
        if (strlen(opts->name) > NBD_MAX_STRING || (opts->description && strlen(opts->description) > NBD_MAX_STRING))
                return dc_error(EINVAL, "an NBD export's name and description are at most %u bytes", NBD_MAX_STRING);
        if (opts->bitmap && (!opts->bitmap_name || !*opts->bitmap_name || strlen(opts->bitmap_name) > 1023))
                return dc_error(EINVAL, "an exported bitmap needs a name of 1..1023 bytes");
        if (opts->snapshot && opts->writable)
                return dc_error(EINVAL, "a point-in-time view is exported read-only");
        e = calloc(1, sizeof *e);
        if (!e)
                return dc_error(ENOMEM, "out of memory");
        e->name = strdup(opts->name);
        e->description = opts->description ? strdup(opts->description) : NULL;
        e->bitmap_name = opts->bitmap ? strdup(opts->bitmap_name) : NULL;
        if (!e->name || (opts->description && !e->description) || (opts->bitmap && !e->bitmap_name)) {
                free(e->name);
                free(e->description);
                free(e->bitmap_name);
                free(e);
                return dc_error(ENOMEM, "out of memory");
        }
        if (pipe2(e->wake, O_CLOEXEC) < 0) {
                int r = dc_error(errno, "cannot create a pipe: %s", strerror(errno));
                free(e->name);
                free(e->description);
                free(e->bitmap_name);
                free(e);
                return r;
        }
        e->bitmap = opts->bitmap;
        e->snapshot = opts->snapshot;
        e->writable = opts->writable;
        e->max_connections = opts->max_connections ? opts->max_connections : NBD_DEFAULT_MAX_CONNECTIONS;
        e->changed = opts->changed;
        e->userdata = opts->userdata;
        pthread_mutex_init(&e->lock, NULL);
        pthread_condattr_t ca;
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&e->cond, &ca);
        pthread_condattr_destroy(&ca);
        e->disk = dc_disk_ref(disk);
        *ret = e;
        return 0;
}

DC_EXPORT void dc_nbd_export_get_stats(dc_nbd_export *e, struct dc_nbd_export_stats *ret) {
        *ret = (struct dc_nbd_export_stats){
                .clients = __atomic_load_n(&e->clients, __ATOMIC_RELAXED),
                .bytes_read = __atomic_load_n(&e->bytes_read, __ATOMIC_RELAXED),
                .bytes_written = __atomic_load_n(&e->bytes_written, __ATOMIC_RELAXED),
                .requests = __atomic_load_n(&e->requests, __ATOMIC_RELAXED),
        };
}

/* Under the export's lock: shut every running connection's socket down (HOW), waking its reader. */
static void shutdown_conns_locked(dc_nbd_export *e, int how) {
        for (struct conn *c = e->conns; c; c = c->next) {
                if (c->done)
                        continue;
                pthread_mutex_lock(&c->lock);
                c->stop = true;
                pthread_cond_broadcast(&c->cond);
                pthread_mutex_unlock(&c->lock);
                shutdown(c->fd, how);
        }
}

DC_EXPORT dc_nbd_export *dc_nbd_export_free(dc_nbd_export *e) {
        struct listener *l;
        struct timespec deadline;

        if (!e)
                return NULL;
        pthread_mutex_lock(&e->lock);
        e->stopping = true;
        l = TAKE_PTR(e->listeners);
        pthread_mutex_unlock(&e->lock);

        /* no more connections: the listeners see the pipe and leave */
        (void) !write(e->wake[1], "x", 1);
        while (l) {
                struct listener *next = l->next;
                pthread_join(l->thread, NULL);
                close(l->fd);
                dc_nbd_tls_unref(l->tls);
                free(l);
                l = next;
        }

        /* no more requests; what was read is answered, within the grace period */
        clock_gettime(CLOCK_MONOTONIC, &deadline);
        deadline.tv_sec += NBD_STOP_GRACE_NS / 1000000000;
        pthread_mutex_lock(&e->lock);
        shutdown_conns_locked(e, SHUT_RD);
        while (e->nconns > 0)
                if (pthread_cond_timedwait(&e->cond, &e->lock, &deadline) == ETIMEDOUT) {
                        /* clients that do not take their replies: fail their sends */
                        shutdown_conns_locked(e, SHUT_RDWR);
                        while (e->nconns > 0)
                                pthread_cond_wait(&e->cond, &e->lock);
                }
        reap_locked(e);
        pthread_mutex_unlock(&e->lock);

        (void) dc_disk_flush(e->disk);
        dc_disk_unref(e->disk);
        close(e->wake[0]);
        close(e->wake[1]);
        pthread_mutex_destroy(&e->lock);
        pthread_cond_destroy(&e->cond);
        free(e->name);
        free(e->description);
        free(e->bitmap_name);
        dc_bitmap_copy_free(e->bitmap);
        free(e);
        return NULL;
}
