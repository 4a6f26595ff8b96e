/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Unit test of lib/nbd-proto.c: handshakes played from memory (what the
 * client sends is a byte string, what the server answers is checked field
 * by field), the request checks command by command, block status extents
 * from a fake chain, and the errno mapping.
 */

#include <errno.h>
#include <string.h>

#include "check.h"
#include "dc-internal.h"
#include "nbd-proto.h"

struct mem {
        const uint8_t *in;
        size_t in_len, in_pos;
        uint8_t out[65536];
        size_t out_len, out_pos;
};

static int mem_read(void *u, void *buf, size_t len) {
        struct mem *m = u;
        if (m->in_len - m->in_pos < len)
                return -ECONNRESET;
        memcpy(buf, m->in + m->in_pos, len);
        m->in_pos += len;
        return 0;
}

static int mem_write(void *u, const void *buf, size_t len) {
        struct mem *m = u;
        if (sizeof m->out - m->out_len < len)
                return -ENOSPC;
        memcpy(m->out + m->out_len, buf, len);
        m->out_len += len;
        return 0;
}

/* A client's bytes. */
struct stream {
        uint8_t b[8192];
        size_t n;
};

static void s_u32(struct stream *s, uint32_t v) {
        put_be32(s->b + s->n, v);
        s->n += 4;
}
static void s_u64(struct stream *s, uint64_t v) {
        put_be64(s->b + s->n, v);
        s->n += 8;
}
static void s_bytes(struct stream *s, const char *p, size_t len) {
        if (len) /* an option without data passes NULL, which memcpy may not be given */
                memcpy(s->b + s->n, p, len);
        s->n += len;
}
static void s_opt(struct stream *s, uint32_t opt, const void *data, uint32_t len) {
        s_u64(s, NBD_OPTS_MAGIC);
        s_u32(s, opt);
        s_u32(s, len);
        s_bytes(s, data, len);
}

static const struct nbd_export_info export = { .name = "disk", .description = "d", .size = 1 << 20, .writable = true };

static unsigned tls_started;
static int tls_result;

/* The TLS handshake, as the server would run it after the ACK: here the stream just goes on. */
static int fake_starttls(void *u) {
        tls_started++;
        return tls_result;
}

static int play_tls(const struct stream *s, const struct nbd_export_info *x, struct mem *m, struct nbd_session *ret,
                    bool tls) {
        struct nbd_io io = { mem_read, mem_write, m, tls ? fake_starttls : NULL };
        tls_started = 0;
        memset(m, 0, sizeof *m);
        m->in = s->b;
        m->in_len = s->n;
        return nbd_handshake(&io, x, ret);
}

static int play(const struct stream *s, const struct nbd_export_info *x, struct mem *m, struct nbd_session *ret) {
        struct nbd_io io = { mem_read, mem_write, m, NULL };
        memset(m, 0, sizeof *m);
        m->in = s->b;
        m->in_len = s->n;
        return nbd_handshake(&io, x, ret);
}

/* The next option reply from the server: its type and data length; -1 when none. */
static int64_t next_reply(struct mem *m, uint32_t opt, uint32_t *ret_len) {
        const uint8_t *p = m->out + m->out_pos;
        if (m->out_len - m->out_pos < 20 || be64(p) != NBD_REP_MAGIC || be32(p + 8) != opt)
                return -1;
        *ret_len = be32(p + 16);
        m->out_pos += 20 + *ret_len;
        return be32(p + 12);
}

static void test_greeting_and_client_flags(void) {
        struct nbd_session ses;
        struct mem m;
        struct stream s = { .n = 0 };

        s_u32(&s, 0); /* not fixed newstyle */
        CHECK(play(&s, &export, &m, &ses) == -EPROTO);
        CHECK(m.out_len == 18 && be64(m.out) == NBD_MAGIC && be64(m.out + 8) == NBD_OPTS_MAGIC && be16(m.out + 16) == 3);
        s.n = 0;
        s_u32(&s, 1 | 4); /* an unknown bit */
        CHECK(play(&s, &export, &m, &ses) == -EPROTO);
        s.n = 0;
        s_u32(&s, 1); /* and then the client leaves */
        CHECK(play(&s, &export, &m, &ses) == -ECONNABORTED);
}

static void test_go_structured_meta(void) {
        struct nbd_session ses;
        struct mem m;
        struct stream s = { .n = 0 };
        uint8_t meta[64], go[32];
        uint32_t len;

        s_u32(&s, 3);
        s_opt(&s, NBD_OPT_STRUCTURED_REPLY, NULL, 0);
        put_be32(meta, 4);
        memcpy(meta + 4, "disk", 4);
        put_be32(meta + 8, 2);
        put_be32(meta + 12, 15);
        memcpy(meta + 16, "base:allocation", 15);
        put_be32(meta + 31, 9);
        memcpy(meta + 35, "qemu:nope", 9);
        s_opt(&s, NBD_OPT_SET_META_CONTEXT, meta, 44);
        s_opt(&s, 1234, "xyz", 3);
        put_be32(go, 4);
        memcpy(go + 4, "disk", 4);
        put_be16(go + 8, 2);
        put_be16(go + 10, NBD_INFO_NAME);
        put_be16(go + 12, NBD_INFO_DESCRIPTION);
        s_opt(&s, NBD_OPT_GO, go, 14);
        CHECK(play(&s, &export, &m, &ses) == 0);
        CHECK(m.in_pos == s.n);
        CHECK(ses.structured && ses.meta_base && !ses.meta_depth);
        CHECK(ses.tflags == (NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_CACHE |
                             NBD_FLAG_CAN_MULTI_CONN | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES |
                             NBD_FLAG_SEND_FAST_ZERO | NBD_FLAG_SEND_DF));
        m.out_pos = 18;
        CHECK(next_reply(&m, NBD_OPT_STRUCTURED_REPLY, &len) == NBD_REP_ACK && len == 0);
        CHECK(next_reply(&m, NBD_OPT_SET_META_CONTEXT, &len) == NBD_REP_META_CONTEXT && len == 4 + 15);
        CHECK(be32(m.out + m.out_pos - len) == NBD_META_BASE_ALLOCATION);
        CHECK(next_reply(&m, NBD_OPT_SET_META_CONTEXT, &len) == NBD_REP_ACK);
        CHECK(next_reply(&m, 1234, &len) == (int64_t) NBD_REP_ERR_UNSUP);
        CHECK(next_reply(&m, NBD_OPT_GO, &len) == NBD_REP_INFO && be16(m.out + m.out_pos - len) == NBD_INFO_NAME);
        CHECK(next_reply(&m, NBD_OPT_GO, &len) == NBD_REP_INFO && be16(m.out + m.out_pos - len) == NBD_INFO_DESCRIPTION);
        CHECK(next_reply(&m, NBD_OPT_GO, &len) == NBD_REP_INFO && len == 14 &&
              be16(m.out + m.out_pos - len) == NBD_INFO_BLOCK_SIZE && be32(m.out + m.out_pos - 12) == 1 &&
              be32(m.out + m.out_pos - 8) == 4096 && be32(m.out + m.out_pos - 4) == NBD_MAX_PAYLOAD);
        CHECK(next_reply(&m, NBD_OPT_GO, &len) == NBD_REP_INFO && len == 12 &&
              be64(m.out + m.out_pos - 10) == export.size);
        CHECK(next_reply(&m, NBD_OPT_GO, &len) == NBD_REP_ACK);
        CHECK(m.out_pos == m.out_len);
}

static void test_bad_options(void) {
        struct nbd_session ses;
        struct mem m;
        struct stream s = { .n = 0 };
        uint8_t meta[16];
        uint32_t len;

        /* SET before structured replies clears and refuses; a GO of another name is unknown */
        s_u32(&s, 1);
        put_be32(meta, 0);
        put_be32(meta + 4, 0);
        s_opt(&s, NBD_OPT_SET_META_CONTEXT, meta, 8);
        s_opt(&s, NBD_OPT_GO, "\0\0\0\1x\0\0", 7);
        s_opt(&s, NBD_OPT_GO, "\0\0\0\7x\0\0", 7);
        s_opt(&s, NBD_OPT_LIST, "x", 1);
        s_opt(&s, NBD_OPT_EXPORT_NAME, "other", 5);
        CHECK(play(&s, &export, &m, &ses) == -EPROTO);
        m.out_pos = 18;
        CHECK(next_reply(&m, NBD_OPT_SET_META_CONTEXT, &len) == (int64_t) NBD_REP_ERR_INVALID);
        CHECK(next_reply(&m, NBD_OPT_GO, &len) == (int64_t) NBD_REP_ERR_UNKNOWN);
        CHECK(next_reply(&m, NBD_OPT_GO, &len) == (int64_t) NBD_REP_ERR_INVALID);
        CHECK(next_reply(&m, NBD_OPT_LIST, &len) == (int64_t) NBD_REP_ERR_INVALID);
        CHECK(m.out_pos == m.out_len);

        /* option data beyond the cap: a close before reading it */
        s.n = 0;
        s_u32(&s, 1);
        s_u64(&s, NBD_OPTS_MAGIC);
        s_u32(&s, NBD_OPT_GO);
        s_u32(&s, NBD_MAX_OPTION + 1);
        CHECK(play(&s, &export, &m, &ses) == -E2BIG);

        /* EXPORT_NAME without NO_ZEROES pads with 124 zeroes; "" is the default export */
        s.n = 0;
        s_u32(&s, 1);
        s_opt(&s, NBD_OPT_EXPORT_NAME, "", 0);
        CHECK(play(&s, &export, &m, &ses) == 0);
        CHECK(m.out_len == 18 + 10 + 124 && be64(m.out + 18) == export.size);

        /* ABORT */
        s.n = 0;
        s_u32(&s, 3);
        s_opt(&s, NBD_OPT_ABORT, NULL, 0);
        CHECK(play(&s, &export, &m, &ses) == -ECONNABORTED);
        m.out_pos = 18;
        CHECK(next_reply(&m, NBD_OPT_ABORT, &len) == NBD_REP_ACK);
}

/* "TLS support": NOTLS without a starttls callback, FORCEDTLS with one. */
static void test_starttls(void) {
        struct nbd_session ses;
        struct mem m;
        struct stream s = { .n = 0 };
        uint8_t go6[10] = { 0, 0, 0, 4, 'd', 'i', 's', 'k', 0, 0 };
        uint32_t len;

        /* not offered: STARTTLS is an unknown option, and the rest goes on in plaintext */
        s_u32(&s, 1);
        s_opt(&s, NBD_OPT_STARTTLS, NULL, 0);
        s_opt(&s, NBD_OPT_GO, go6, 10);
        CHECK(play_tls(&s, &export, &m, &ses, false) == 0);
        CHECK(tls_started == 0 && !ses.tls);
        m.out_pos = 18;
        CHECK(next_reply(&m, NBD_OPT_STARTTLS, &len) == (int64_t) NBD_REP_ERR_UNSUP);

        /* required: everything but STARTTLS and ABORT gets TLS_REQD, the export is not told of */
        s.n = 0;
        s_u32(&s, 1);
        s_opt(&s, NBD_OPT_LIST, NULL, 0);
        s_opt(&s, NBD_OPT_STRUCTURED_REPLY, NULL, 0);
        s_opt(&s, NBD_OPT_GO, go6, 10);
        s_opt(&s, 1234, "x", 1);
        s_opt(&s, NBD_OPT_STARTTLS, "x", 1);
        s_opt(&s, NBD_OPT_STARTTLS, NULL, 0);
        s_opt(&s, NBD_OPT_STARTTLS, NULL, 0);
        s_opt(&s, NBD_OPT_GO, go6, 10);
        tls_result = 0;
        CHECK(play_tls(&s, &export, &m, &ses, true) == 0);
        CHECK(tls_started == 1 && ses.tls);
        /* what was asked before TLS does not carry over: no structured replies */
        CHECK(!ses.structured && m.in_pos == s.n);
        m.out_pos = 18;
        CHECK(next_reply(&m, NBD_OPT_LIST, &len) == (int64_t) NBD_REP_ERR_TLS_REQD);
        CHECK(next_reply(&m, NBD_OPT_STRUCTURED_REPLY, &len) == (int64_t) NBD_REP_ERR_TLS_REQD);
        CHECK(next_reply(&m, NBD_OPT_GO, &len) == (int64_t) NBD_REP_ERR_TLS_REQD);
        CHECK(next_reply(&m, 1234, &len) == (int64_t) NBD_REP_ERR_TLS_REQD);
        CHECK(next_reply(&m, NBD_OPT_STARTTLS, &len) == (int64_t) NBD_REP_ERR_INVALID);
        CHECK(next_reply(&m, NBD_OPT_STARTTLS, &len) == NBD_REP_ACK && len == 0);
        CHECK(next_reply(&m, NBD_OPT_STARTTLS, &len) == (int64_t) NBD_REP_ERR_INVALID); /* on already */
        CHECK(next_reply(&m, NBD_OPT_GO, &len) == NBD_REP_INFO);

        /* EXPORT_NAME before TLS cannot be refused with an error: the connection closes */
        s.n = 0;
        s_u32(&s, 1);
        s_opt(&s, NBD_OPT_EXPORT_NAME, "disk", 4);
        CHECK(play_tls(&s, &export, &m, &ses, true) == -EPROTO);
        CHECK(m.out_len == 18);

        /* ABORT is answered before TLS */
        s.n = 0;
        s_u32(&s, 1);
        s_opt(&s, NBD_OPT_ABORT, NULL, 0);
        CHECK(play_tls(&s, &export, &m, &ses, true) == -ECONNABORTED);
        m.out_pos = 18;
        CHECK(next_reply(&m, NBD_OPT_ABORT, &len) == NBD_REP_ACK);

        /* a failed TLS handshake ends it, after the ACK */
        s.n = 0;
        s_u32(&s, 1);
        s_opt(&s, NBD_OPT_STARTTLS, NULL, 0);
        s_opt(&s, NBD_OPT_GO, go6, 10);
        tls_result = -EACCES;
        CHECK(play_tls(&s, &export, &m, &ses, true) == -EACCES);
        tls_result = 0;
        m.out_pos = 18;
        CHECK(next_reply(&m, NBD_OPT_STARTTLS, &len) == NBD_REP_ACK && m.out_pos == m.out_len);
}

static void test_request_checks(void) {
        struct nbd_session st = { .structured = true, .meta_depth = true }, plain = { 0 };
        struct nbd_export_info ro = export;
        uint8_t h[NBD_REQUEST_SIZE] = { 0 };
        struct nbd_request r;
        uint64_t size = export.size;

        ro.writable = false;
        CHECK(nbd_request_decode(h, &r) == -EPROTO);
        put_be32(h, NBD_REQUEST_MAGIC);
        put_be16(h + 4, NBD_CMD_FLAG_FUA);
        put_be16(h + 6, NBD_CMD_WRITE);
        put_be64(h + 8, 0x1122334455667788);
        put_be64(h + 16, 4096);
        put_be32(h + 24, 512);
        CHECK(nbd_request_decode(h, &r) == 0 && r.type == NBD_CMD_WRITE && r.cookie == 0x1122334455667788 &&
              r.offset == 4096 && r.length == 512 && r.flags == NBD_CMD_FLAG_FUA);
        CHECK(nbd_request_payload(&r) == 512);
        CHECK(nbd_request_check(&st, &export, &r) == 0);
        CHECK(nbd_request_check(&st, &ro, &r) == NBD_EPERM);

#define REQ(t, f, o, l) (&(struct nbd_request){ .type = (t), .flags = (f), .offset = (o), .length = (l) })
        CHECK(nbd_request_check(&st, &export, REQ(NBD_CMD_WRITE, 0, 0, NBD_MAX_PAYLOAD + 1)) == -EPROTO);
        CHECK(nbd_request_check(&st, &export, REQ(NBD_CMD_WRITE, 0, size - 1, 2)) == NBD_ENOSPC);
        CHECK(nbd_request_check(&st, &export, REQ(NBD_CMD_WRITE_ZEROES, 0, UINT64_MAX, 2)) == NBD_ENOSPC);
        CHECK(nbd_request_check(&st, &export, REQ(NBD_CMD_READ, 0, size, 1)) == NBD_EINVAL);
        CHECK(nbd_request_check(&st, &export, REQ(NBD_CMD_READ, 0, size, 0)) == 0);
        CHECK(nbd_request_check(&st, &export, REQ(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 512)) == 0);
        CHECK(nbd_request_check(&plain, &export, REQ(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 512)) == NBD_EINVAL);
        CHECK(nbd_request_check(&st, &export, REQ(NBD_CMD_READ, NBD_CMD_FLAG_NO_HOLE, 0, 512)) == NBD_EINVAL);
        CHECK(nbd_request_check(&st, &export, REQ(NBD_CMD_READ, 1 << 12, 0, 512)) == NBD_EINVAL);
        CHECK(nbd_request_check(&st, &export, REQ(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO, 0, 512)) == 0);
        CHECK(nbd_request_check(&st, &ro, REQ(NBD_CMD_TRIM, 0, 0, 512)) == NBD_EPERM);
        CHECK(nbd_request_check(&st, &export, REQ(NBD_CMD_TRIM, 0, size, 1)) == NBD_EINVAL);
        CHECK(nbd_request_check(&st, &export, REQ(NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE, 0, 512)) == 0);
        CHECK(nbd_request_check(&st, &export, REQ(NBD_CMD_BLOCK_STATUS, 0, 0, 0)) == NBD_EINVAL);
        CHECK(nbd_request_check(&plain, &export, REQ(NBD_CMD_BLOCK_STATUS, 0, 0, 512)) == NBD_EINVAL);
        CHECK(nbd_request_check(&st, &export, REQ(NBD_CMD_FLUSH, NBD_CMD_FLAG_FUA, 0, 0)) == 0);
        CHECK(nbd_request_check(&st, &export, REQ(NBD_CMD_CACHE, NBD_CMD_FLAG_NO_HOLE, 0, 512)) == NBD_EINVAL);
        CHECK(nbd_request_check(&st, &export, REQ(99, 0, 0, 512)) == NBD_EINVAL);
        CHECK(nbd_request_payload(REQ(99, 0, 0, 512)) == 0);
        ro.size = UINT64_C(1) << 40;
        CHECK(nbd_request_check(&st, &ro, REQ(NBD_CMD_READ, 0, 0, NBD_MAX_PAYLOAD + 1)) == NBD_EOVERFLOW);
        CHECK(nbd_request_check(&st, &ro, REQ(NBD_CMD_CACHE, 0, 0, UINT32_MAX)) == 0);
#undef REQ
}

/* A fake chain: 64 KiB extents, data in even ones, depth (i % 3). */
static int fake_status(void *u, uint64_t off, uint64_t len, struct dc_extent *ret) {
        uint64_t i = off / 65536, end = (i + 1) * 65536;
        *ret = (struct dc_extent){ .start = off, .length = MIN(end - off, len), .depth = (unsigned) (i % 3),
                                   .present = i % 3 != 2, .data = i % 2 == 0, .zero = i % 2 == 1 };
        return 0;
}

static void test_block_status(void) {
        struct nbd_session s = { .meta_base = true, .meta_depth = true };
        uint8_t base[4 + 8 * NBD_MAX_EXTENTS], depth[4 + 8 * NBD_MAX_EXTENTS];
        size_t bl, dl;

        CHECK(nbd_block_status(&s, 1000, 200000, true, fake_status, NULL, base, &bl, depth, &dl) == 0);
        CHECK(bl == 12 && be32(base) == NBD_META_BASE_ALLOCATION && be32(base + 4) == 65536 - 1000 && be32(base + 8) == 0);
        CHECK(dl == 12 && be32(depth) == NBD_META_ALLOCATION_DEPTH && be32(depth + 8) == 1);

        CHECK(nbd_block_status(&s, 0, 5 * 65536 + 7, false, fake_status, NULL, base, &bl, depth, &dl) == 0);
        CHECK(bl == 4 + 8 * 6);
        CHECK(be32(base + 4 + 8 * 1 + 4) == (NBD_STATE_HOLE | NBD_STATE_ZERO));
        CHECK(be32(base + 4 + 8 * 5) == 7);
        /* depths 1,2,0,1,2,0: equal neighbours would merge, here none are */
        CHECK(dl == 4 + 8 * 6 && be32(depth + 4 + 8 * 2 + 4) == 0);

        /* a long range stops at NBD_MAX_EXTENTS, covering less than asked, never more */
        s.meta_depth = false;
        CHECK(nbd_block_status(&s, 0, UINT32_MAX, false, fake_status, NULL, base, &bl, depth, &dl) == 0);
        CHECK(bl == 4 + 8 * NBD_MAX_EXTENTS && dl == 0);
}

static void test_errno(void) {
        CHECK(nbd_errno(-EROFS) == NBD_EPERM && nbd_errno(-EPERM) == NBD_EPERM);
        CHECK(nbd_errno(-EDQUOT) == NBD_ENOSPC && nbd_errno(-EFBIG) == NBD_ENOSPC && nbd_errno(-ENOSPC) == NBD_ENOSPC);
        CHECK(nbd_errno(-EINVAL) == NBD_EINVAL && nbd_errno(-ENOMEM) == NBD_ENOMEM);
        CHECK(nbd_errno(-ENOTSUP) == NBD_ENOTSUP);
        CHECK(nbd_errno(-EUCLEAN) == NBD_EIO && nbd_errno(-EXDEV) == NBD_EIO);
}

int main(void) {
        test_greeting_and_client_flags();
        test_go_structured_meta();
        test_bad_options();
        test_starttls();
        test_request_checks();
        test_block_status();
        test_errno();
        return check_report("test-nbd-proto");
}
