/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The NBD protocol, server side, without sockets or disks: the handshake
 * over two byte-stream callbacks, request checking, reply headers and block
 * status extents.  Everything a client's bytes reach before the disk does
 * is here, so that a unit test and a fuzzer can drive it from memory.
 *
 * Design notes
 * ------------
 * - Handshake ("Fixed newstyle negotiation"): we greet with FIXED_NEWSTYLE
 *   and NO_ZEROES and accept only clients that answer with FIXED_NEWSTYLE:
 *   an old (non-fixed) newstyle client cannot be told that an option is
 *   unknown, so it gets a close rather than a guess.  Unknown client flags
 *   close the connection, as the spec requires.
 * - Every option's data is read in full before it is answered, so a
 *   refused or malformed option never desynchronises the stream.  The only
 *   exception is data beyond NBD_MAX_OPTION (64 KiB: four times the longest
 *   legal GO, a name of 4096 bytes with 32 000 info requests would not
 *   fit, but no client sends that): reading it would let a client make us
 *   swallow gigabytes, so the connection is closed instead.
 * - One export: its name and "" (the default export) select it.  INFO and
 *   GO always send NBD_INFO_BLOCK_SIZE (min 1, preferred 4096, max 32 MiB)
 *   and NBD_INFO_EXPORT, and the name and description only when asked.
 *   INFO and GO with the same data say the same thing.
 * - Meta contexts ("Metadata querying"): base:allocation (id 1) and
 *   qemu:allocation-depth (id 2).  LIST takes "base:" and "qemu:" as
 *   wildcards and no query as "everything"; SET selects exact names only,
 *   needs structured replies, and replaces the selection even when it
 *   fails.  EXTENDED_HEADERS is an unknown option to us (ERR_UNSUP), which
 *   every client takes as "go on without".
 * - TLS ("TLS support"): a server either does not offer it (io->starttls
 *   is NULL: STARTTLS is unknown, ERR_UNSUP, "NOTLS") or requires it
 *   ("FORCEDTLS"): until STARTTLS succeeded, every option but STARTTLS and
 *   ABORT is answered with ERR_TLS_REQD, which tells the client nothing
 *   about the export, and EXPORT_NAME, which has no error reply, closes
 *   the connection.  STARTTLS is ACKed, then the TLS handshake runs over
 *   the same stream (nbd-server.c); nothing the client asked for before it
 *   carries over (structured replies, meta contexts), as the spec says.
 *   A second STARTTLS is ERR_INVALID.  Our reads never run ahead of the
 *   option being answered, so the TLS handshake starts exactly at the
 *   first byte after STARTTLS.
 * - Requests ("Request message"): only WRITE carries a payload with compact
 *   headers (we never agree to extended ones), so an unknown command can be
 *   answered with EINVAL and the stream stays in step.  A WRITE longer than
 *   NBD_MAX_PAYLOAD closes the connection at once rather than making us read
 *   up to 4 GiB to skip it; every other bad request gets its error and the
 *   connection goes on.
 */

#include <string.h>

#include "dc-internal.h"
#include "nbd-proto.h"

uint16_t nbd_transmission_flags(const struct nbd_export_info *x, bool structured) {
        /* MULTI_CONN: every connection writes through one dc_disk, and a
         * FLUSH flushes that disk, so a flush on one covers writes of all */
        uint16_t f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_CACHE |
                     NBD_FLAG_CAN_MULTI_CONN;

        if (x->writable)
                f |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
        else
                f |= NBD_FLAG_READ_ONLY;
        if (structured)
                f |= NBD_FLAG_SEND_DF;
        return f;
}

/* One option reply ("Option reply"): header and data in one write. */
static int send_rep(const struct nbd_io *io, uint32_t opt, uint32_t type, const void *data, size_t len) {
        uint8_t buf[20 + 2 + 2 * NBD_MAX_STRING + 8];
        uint8_t *p = buf;
        _cleanup_free_ uint8_t *big = NULL;

        if (len > sizeof buf - 20) {
                big = malloc(20 + len);
                if (!big)
                        return -ENOMEM;
                p = big;
        }
        put_be64(p, NBD_REP_MAGIC);
        put_be32(p + 8, opt);
        put_be32(p + 12, type);
        put_be32(p + 16, (uint32_t) len);
        if (len)
                memcpy(p + 20, data, len);
        return io->write(io->userdata, p, 20 + len);
}

static int send_err(const struct nbd_io *io, uint32_t opt, uint32_t type, const char *msg) {
        return send_rep(io, opt, type, msg, strlen(msg));
}

static int send_info(const struct nbd_io *io, uint32_t opt, uint16_t info, const void *data, size_t len) {
        uint8_t buf[2 + NBD_MAX_STRING];

        put_be16(buf, info);
        memcpy(buf + 2, data, len);
        return send_rep(io, opt, NBD_REP_INFO, buf, 2 + len);
}

static bool name_is_ours(const struct nbd_export_info *x, const uint8_t *name, uint32_t len) {
        return len == 0 || (strlen(x->name) == len && memcmp(x->name, name, len) == 0);
}

/* INFO and GO ("NBD_OPT_INFO and NBD_OPT_GO"); 1 when GO may start transmission. */
static int opt_info(const struct nbd_io *io, const struct nbd_export_info *x, struct nbd_session *s, uint32_t opt,
                    const uint8_t *d, uint32_t len) {
        bool want_name = false, want_desc = false;
        uint8_t buf[14];
        uint32_t namelen;
        uint16_t n;
        int r;

        if (len < 6)
                return send_err(io, opt, NBD_REP_ERR_INVALID, "option data too short");
        namelen = be32(d);
        if (namelen > len - 6)
                return send_err(io, opt, NBD_REP_ERR_INVALID, "export name longer than the option");
        n = be16(d + 4 + namelen);
        if ((uint64_t) len != 6 + (uint64_t) namelen + 2 * (uint64_t) n)
                return send_err(io, opt, NBD_REP_ERR_INVALID, "option length does not match its requests");
        if (namelen > NBD_MAX_STRING)
                return send_err(io, opt, NBD_REP_ERR_TOO_BIG, "export name too long");
        if (!name_is_ours(x, d + 4, namelen))
                return send_err(io, opt, NBD_REP_ERR_UNKNOWN, "no such export");
        if (x->stopping)
                return send_err(io, opt, NBD_REP_ERR_SHUTDOWN, "the export is stopping");
        for (uint16_t i = 0; i < n; i++) {
                uint16_t t = be16(d + 6 + namelen + 2 * i);
                want_name |= t == NBD_INFO_NAME;
                want_desc |= t == NBD_INFO_DESCRIPTION;
        }
        s->tflags = nbd_transmission_flags(x, s->structured);
        if (want_name && (r = send_info(io, opt, NBD_INFO_NAME, x->name, strlen(x->name))) < 0)
                return r;
        if (want_desc && x->description &&
            (r = send_info(io, opt, NBD_INFO_DESCRIPTION, x->description, strlen(x->description))) < 0)
                return r;
        put_be32(buf, 1);
        put_be32(buf + 4, NBD_PREFERRED_BLOCK);
        put_be32(buf + 8, NBD_MAX_PAYLOAD);
        if ((r = send_info(io, opt, NBD_INFO_BLOCK_SIZE, buf, 12)) < 0)
                return r;
        put_be64(buf, x->size);
        put_be16(buf + 8, s->tflags);
        if ((r = send_info(io, opt, NBD_INFO_EXPORT, buf, 10)) < 0)
                return r;
        if ((r = send_rep(io, opt, NBD_REP_ACK, NULL, 0)) < 0)
                return r;
        return opt == NBD_OPT_GO;
}

enum { META_BASE = 1, META_DEPTH = 2, META_BITMAP = 4 };
static const char base_name[] = "base:allocation", depth_name[] = "qemu:allocation-depth";

static bool query_is(const uint8_t *q, uint32_t len, const char *s) {
        return len == strlen(s) && !memcmp(q, s, len);
}

/* What query Q selects (SET) or lists (LIST, where "base:", "qemu:" and the bitmap prefix are namespaces). */
static unsigned meta_match(const struct nbd_export_info *x, const uint8_t *q, uint32_t len, bool list) {
        size_t pl = strlen(NBD_DIRTY_BITMAP_PREFIX);

        if (query_is(q, len, base_name) || (list && query_is(q, len, "base:")))
                return META_BASE;
        if (query_is(q, len, depth_name))
                return META_DEPTH;
        if (list && query_is(q, len, "qemu:"))
                return META_DEPTH | (x->bitmap ? META_BITMAP : 0);
        if (x->bitmap && len >= pl && !memcmp(q, NBD_DIRTY_BITMAP_PREFIX, pl) &&
            ((list && len == pl) || (len - pl == strlen(x->bitmap) && !memcmp(q + pl, x->bitmap, len - pl))))
                return META_BITMAP;
        return 0;
}

static int send_meta(const struct nbd_io *io, uint32_t opt, uint32_t id, const char *prefix, const char *name) {
        size_t p = strlen(prefix), n = strlen(name);
        _cleanup_free_ uint8_t *buf = malloc(4 + p + n);

        if (!buf)
                return -ENOMEM;
        put_be32(buf, id);
        memcpy(buf + 4, prefix, p);
        memcpy(buf + 4 + p, name, n);
        return send_rep(io, opt, NBD_REP_META_CONTEXT, buf, 4 + p + n);
}

/* LIST_META_CONTEXT and SET_META_CONTEXT ("NBD_OPT_LIST_META_CONTEXT"). */
static int opt_meta(const struct nbd_io *io, const struct nbd_export_info *x, struct nbd_session *s, uint32_t opt,
                    const uint8_t *d, uint32_t len) {
        bool list = opt == NBD_OPT_LIST_META_CONTEXT;
        unsigned found = 0;
        uint32_t namelen, nq, pos;
        int r;

        if (!list) {
                s->meta_base = s->meta_depth = s->meta_bitmap = false;
                if (!s->structured)
                        return send_err(io, opt, NBD_REP_ERR_INVALID, "structured replies come first");
        }
        if (len < 8)
                return send_err(io, opt, NBD_REP_ERR_INVALID, "option data too short");
        namelen = be32(d);
        if (namelen > len - 8)
                return send_err(io, opt, NBD_REP_ERR_INVALID, "export name longer than the option");
        nq = be32(d + 4 + namelen);
        pos = 8 + namelen;
        for (uint32_t i = 0; i < nq; i++) {
                uint32_t ql;
                if (len - pos < 4)
                        return send_err(io, opt, NBD_REP_ERR_INVALID, "queries run past the option");
                ql = be32(d + pos);
                pos += 4;
                if (ql > len - pos)
                        return send_err(io, opt, NBD_REP_ERR_INVALID, "queries run past the option");
                if (ql > NBD_MAX_STRING)
                        return send_err(io, opt, NBD_REP_ERR_TOO_BIG, "query too long");
                found |= meta_match(x, d + pos, ql, list);
                pos += ql;
        }
        if (pos != len)
                return send_err(io, opt, NBD_REP_ERR_INVALID, "option data after the queries");
        if (namelen > NBD_MAX_STRING)
                return send_err(io, opt, NBD_REP_ERR_TOO_BIG, "export name too long");
        if (!name_is_ours(x, d + 4, namelen))
                return send_err(io, opt, NBD_REP_ERR_UNKNOWN, "no such export");
        if (list && nq == 0)
                found = META_BASE | META_DEPTH | (x->bitmap ? META_BITMAP : 0);
        if ((found & META_BASE) && (r = send_meta(io, opt, list ? 0 : NBD_META_BASE_ALLOCATION, "", base_name)) < 0)
                return r;
        if ((found & META_DEPTH) &&
            (r = send_meta(io, opt, list ? 0 : NBD_META_ALLOCATION_DEPTH, "", depth_name)) < 0)
                return r;
        if ((found & META_BITMAP) &&
            (r = send_meta(io, opt, list ? 0 : NBD_META_DIRTY_BITMAP, NBD_DIRTY_BITMAP_PREFIX, x->bitmap)) < 0)
                return r;
        if (!list) {
                s->meta_base = found & META_BASE;
                s->meta_depth = found & META_DEPTH;
                s->meta_bitmap = found & META_BITMAP;
        }
        return send_rep(io, opt, NBD_REP_ACK, NULL, 0);
}

/* LIST ("NBD_REP_SERVER"): our one export, its description after the name. */
static int opt_list(const struct nbd_io *io, const struct nbd_export_info *x, uint32_t len) {
        uint8_t buf[4 + 2 * NBD_MAX_STRING];
        size_t n = strlen(x->name), d = x->description ? strlen(x->description) : 0;
        int r;

        if (len)
                return send_err(io, NBD_OPT_LIST, NBD_REP_ERR_INVALID, "LIST takes no data");
        put_be32(buf, (uint32_t) n);
        memcpy(buf + 4, x->name, n);
        if (d)
                memcpy(buf + 4 + n, x->description, d);
        r = send_rep(io, NBD_OPT_LIST, NBD_REP_SERVER, buf, 4 + n + d);
        if (r < 0)
                return r;
        return send_rep(io, NBD_OPT_LIST, NBD_REP_ACK, NULL, 0);
}

/* EXPORT_NAME ("NBD_OPT_EXPORT_NAME"): no error reply exists, a wrong name is a close. */
static int opt_export_name(const struct nbd_io *io, const struct nbd_export_info *x, struct nbd_session *s,
                           const uint8_t *d, uint32_t len) {
        uint8_t buf[10 + 124] = { 0 };

        if (len > NBD_MAX_STRING || !name_is_ours(x, d, len) || x->stopping)
                return -EPROTO;
        s->tflags = nbd_transmission_flags(x, s->structured);
        put_be64(buf, x->size);
        put_be16(buf + 8, s->tflags);
        return io->write(io->userdata, buf, s->no_zeroes ? 10 : sizeof buf);
}

int nbd_handshake(const struct nbd_io *io, const struct nbd_export_info *x, struct nbd_session *ret) {
        struct nbd_session s = { 0 };
        _cleanup_free_ uint8_t *data = NULL;
        uint8_t buf[18];
        uint32_t cflags;
        int r;

        put_be64(buf, NBD_MAGIC);
        put_be64(buf + 8, NBD_OPTS_MAGIC);
        put_be16(buf + 16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
        if ((r = io->write(io->userdata, buf, 18)) < 0)
                return r;
        if ((r = io->read(io->userdata, buf, 4)) < 0)
                return r;
        cflags = be32(buf);
        if (cflags & ~(uint32_t) (NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES))
                return -EPROTO;
        if (!(cflags & NBD_FLAG_C_FIXED_NEWSTYLE))
                return -EPROTO;
        s.no_zeroes = cflags & NBD_FLAG_C_NO_ZEROES;
        data = malloc(NBD_MAX_OPTION);
        if (!data)
                return -ENOMEM;

        for (;;) {
                uint32_t opt, len;

                if ((r = io->read(io->userdata, buf, 16)) < 0)
                        return r == -ECONNRESET ? -ECONNABORTED : r;
                if (be64(buf) != NBD_OPTS_MAGIC)
                        return -EPROTO;
                opt = be32(buf + 8);
                len = be32(buf + 12);
                if (len > NBD_MAX_OPTION)
                        return -E2BIG;
                if (len && (r = io->read(io->userdata, data, len)) < 0)
                        return r;
                s.options++;
                if (io->starttls && !s.tls && opt != NBD_OPT_STARTTLS && opt != NBD_OPT_ABORT) {
                        if (opt == NBD_OPT_EXPORT_NAME)
                                return -EPROTO;
                        r = send_err(io, opt, NBD_REP_ERR_TLS_REQD, "TLS is required: NBD_OPT_STARTTLS first");
                        if (r < 0)
                                return r;
                        continue;
                }
                switch (opt) {
                case NBD_OPT_EXPORT_NAME:
                        r = opt_export_name(io, x, &s, data, len);
                        if (r < 0)
                                return r;
                        *ret = s;
                        return 0;
                case NBD_OPT_ABORT:
                        /* the client may be gone already: its close is as good as our ACK */
                        (void) send_rep(io, opt, NBD_REP_ACK, NULL, 0);
                        return -ECONNABORTED;
                case NBD_OPT_LIST:
                        r = opt_list(io, x, len);
                        break;
                case NBD_OPT_STRUCTURED_REPLY:
                        if (len)
                                r = send_err(io, opt, NBD_REP_ERR_INVALID, "STRUCTURED_REPLY takes no data");
                        else {
                                s.structured = true;
                                r = send_rep(io, opt, NBD_REP_ACK, NULL, 0);
                        }
                        break;
                case NBD_OPT_INFO:
                case NBD_OPT_GO:
                        r = opt_info(io, x, &s, opt, data, len);
                        if (r > 0) {
                                *ret = s;
                                return 0;
                        }
                        break;
                case NBD_OPT_STARTTLS:
                        if (!io->starttls)
                                r = send_err(io, opt, NBD_REP_ERR_UNSUP, "TLS is not offered here");
                        else if (len)
                                r = send_err(io, opt, NBD_REP_ERR_INVALID, "STARTTLS takes no data");
                        else if (s.tls)
                                r = send_err(io, opt, NBD_REP_ERR_INVALID, "TLS is on already");
                        else {
                                if ((r = send_rep(io, opt, NBD_REP_ACK, NULL, 0)) < 0 ||
                                    (r = io->starttls(io->userdata)) < 0)
                                        return r;
                                /* a fresh negotiation: only the greeting's flags stay */
                                s = (struct nbd_session){ .no_zeroes = s.no_zeroes, .options = s.options,
                                                          .tls = true };
                        }
                        break;
                case NBD_OPT_LIST_META_CONTEXT:
                case NBD_OPT_SET_META_CONTEXT:
                        r = opt_meta(io, x, &s, opt, data, len);
                        break;
                default:
                        r = send_err(io, opt, NBD_REP_ERR_UNSUP, "unsupported option");
                        break;
                }
                if (r < 0)
                        return r;
        }
}

int nbd_request_decode(const uint8_t buf[NBD_REQUEST_SIZE], struct nbd_request *ret) {
        if (be32(buf) != NBD_REQUEST_MAGIC)
                return -EPROTO;
        *ret = (struct nbd_request){
                .flags = be16(buf + 4),
                .type = be16(buf + 6),
                .cookie = be64(buf + 8),
                .offset = be64(buf + 16),
                .length = be32(buf + 24),
        };
        return 0;
}

int nbd_request_check(const struct nbd_session *s, const struct nbd_export_info *x, const struct nbd_request *r) {
        /* FUA is taken on every command, as clients send it everywhere once SEND_FUA is out */
        uint16_t allowed = NBD_CMD_FLAG_FUA;
        bool past_end = r->offset > x->size || r->length > x->size - r->offset;

        if (r->type == NBD_CMD_WRITE && r->length > NBD_MAX_PAYLOAD)
                return -EPROTO;
        switch (r->type) {
        case NBD_CMD_READ:
                if (s->structured)
                        allowed |= NBD_CMD_FLAG_DF;
                break;
        case NBD_CMD_WRITE_ZEROES:
                allowed |= NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO;
                break;
        case NBD_CMD_BLOCK_STATUS:
                allowed |= NBD_CMD_FLAG_REQ_ONE;
                break;
        case NBD_CMD_WRITE:
        case NBD_CMD_DISC:
        case NBD_CMD_FLUSH:
        case NBD_CMD_TRIM:
        case NBD_CMD_CACHE:
                break;
        default:
                return NBD_EINVAL;
        }
        if (r->flags & ~allowed)
                return NBD_EINVAL;
        switch (r->type) {
        case NBD_CMD_READ:
                if (past_end)
                        return NBD_EINVAL;
                if (r->length > NBD_MAX_PAYLOAD)
                        return NBD_EOVERFLOW;
                break;
        case NBD_CMD_WRITE:
        case NBD_CMD_WRITE_ZEROES:
                if (!x->writable)
                        return NBD_EPERM;
                if (past_end)
                        return NBD_ENOSPC;
                break;
        case NBD_CMD_TRIM:
                if (!x->writable)
                        return NBD_EPERM;
                if (past_end)
                        return NBD_EINVAL;
                break;
        case NBD_CMD_CACHE:
                if (past_end)
                        return NBD_EINVAL;
                break;
        case NBD_CMD_BLOCK_STATUS:
                if (!s->meta_base && !s->meta_depth && !s->meta_bitmap)
                        return NBD_EINVAL;
                if (past_end || r->length == 0)
                        return NBD_EINVAL;
                break;
        default:
                break;
        }
        return 0;
}

uint32_t nbd_errno(int err) {
        switch (err < 0 ? -err : err) {
        case 0:
                return 0;
        case EROFS:
        case EPERM:
                return NBD_EPERM;
        case ENOSPC:
        case EDQUOT:
        case EFBIG:
                return NBD_ENOSPC;
        case EINVAL:
                return NBD_EINVAL;
        case ENOMEM:
                return NBD_ENOMEM;
        case ENOTSUP:
                return NBD_ENOTSUP;
        case EOVERFLOW:
                return NBD_EOVERFLOW;
        case ESHUTDOWN:
                return NBD_ESHUTDOWN;
        default:
                return NBD_EIO;
        }
}

void nbd_simple_reply(uint8_t out[16], uint32_t error, uint64_t cookie) {
        put_be32(out, NBD_SIMPLE_REPLY_MAGIC);
        put_be32(out + 4, error);
        put_be64(out + 8, cookie);
}

void nbd_chunk_header(uint8_t out[20], uint16_t flags, uint16_t type, uint64_t cookie, uint32_t length) {
        put_be32(out, NBD_STRUCTURED_MAGIC);
        put_be16(out + 4, flags);
        put_be16(out + 6, type);
        put_be64(out + 8, cookie);
        put_be32(out + 16, length);
}

struct extent_list {
        uint8_t *out;
        unsigned n, cap;
        bool full;
};

/* Append (LEN, FLAGS), merged into the last extent when equal; once one does not fit, nothing more. */
static void extent_add(struct extent_list *l, uint64_t len, uint32_t flags) {
        if (l->full)
                return;
        if (l->n) {
                uint8_t *last = l->out + 4 + 8 * (l->n - 1);
                if (be32(last + 4) == flags) {
                        put_be32(last, (uint32_t) (be32(last) + len));
                        return;
                }
        }
        if (l->n == l->cap) {
                l->full = true;
                return;
        }
        put_be32(l->out + 4 + 8 * l->n, (uint32_t) len);
        put_be32(l->out + 8 + 8 * l->n, flags);
        l->n++;
}

int nbd_block_status(const struct nbd_session *s, uint64_t offset, uint32_t length, bool req_one,
                     nbd_status_fn status, void *userdata, uint8_t *out_base, size_t *ret_base_len,
                     uint8_t *out_depth, size_t *ret_depth_len) {
        unsigned cap = req_one ? 1 : NBD_MAX_EXTENTS;
        struct extent_list base = { out_base, 0, cap, !s->meta_base };
        struct extent_list depth = { out_depth, 0, cap, !s->meta_depth };
        uint64_t off = offset, end = offset + length;

        while (off < end && !(base.full && depth.full)) {
                struct dc_extent e;
                int r = status(userdata, off, end - off, &e);
                if (r < 0)
                        return r;
                if (e.length == 0)
                        return -EIO; /* a status that covers nothing would never end the walk */
                e.length = MIN(e.length, end - off);
                extent_add(&base, e.length, nbd_extent_flags(&e));
                extent_add(&depth, e.length, nbd_extent_depth(&e));
                off += e.length;
        }
        put_be32(out_base, NBD_META_BASE_ALLOCATION);
        put_be32(out_depth, NBD_META_ALLOCATION_DEPTH);
        *ret_base_len = s->meta_base ? 4 + 8 * (size_t) base.n : 0;
        *ret_depth_len = s->meta_depth ? 4 + 8 * (size_t) depth.n : 0;
        return 0;
}

int nbd_bitmap_status(uint64_t offset, uint32_t length, bool req_one, nbd_run_fn run, void *userdata, uint8_t *out,
                      size_t *ret_len) {
        struct extent_list l = { out, 0, req_one ? 1 : NBD_MAX_EXTENTS, false };
        uint64_t off = offset, end = offset + length;

        while (off < end && !l.full) {
                bool dirty;
                uint64_t n = run(userdata, off, end - off, &dirty);
                if (n == 0)
                        return -EIO; /* a run that covers nothing would never end the walk */
                extent_add(&l, MIN(n, end - off), dirty ? NBD_STATE_DIRTY : 0);
                off += MIN(n, end - off);
        }
        put_be32(out, NBD_META_DIRTY_BITMAP);
        *ret_len = 4 + 8 * (size_t) l.n;
        return 0;
}
