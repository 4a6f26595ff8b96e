/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * libFuzzer target for what an NBD client's bytes reach (lib/nbd-proto.c):
 * the input is the whole byte stream a client sends, from its reply to the
 * greeting on.  The handshake runs over it from memory; if it reaches
 * transmission, every request is decoded and checked as the server's reader
 * does (payloads consumed, a close where the server closes), and block
 * status requests are answered from a fake chain, with the invariants of
 * the reply checked (abort() when broken): extents non-empty, within the
 * request, at most the cap.  The first byte also chooses whether TLS is
 * required; then STARTTLS "succeeds" in memory and transmission must not
 * be reached without it.  Built as a fuzzer with -Dfuzzing=true, and
 * always as fuzz-nbd-replay, which runs the corpus (tests/fuzz/corpus-nbd)
 * as an ordinary test.  The corpus was seeded with the streams qemu-img,
 * qemu-io, nbdinfo, nbdcopy and libnbd send.
 */

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dc-internal.h"
#include "nbd-proto.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

struct mem {
        const uint8_t *in;
        size_t len, pos;
        size_t written;
        unsigned tls_started;
};

static int mem_read(void *u, void *buf, size_t len) {
        struct mem *m = u;
        if (m->len - m->pos < len)
                return -ECONNRESET;
        memcpy(buf, m->in + m->pos, len);
        m->pos += len;
        return 0;
}

static int mem_write(void *u, const void *buf, size_t len) {
        struct mem *m = u;
        const uint8_t *b = buf;
        /* every write the handshake makes is the greeting, an option reply or EXPORT_NAME's answer */
        if (len == 0 || (len >= 20 && be64(b) != NBD_REP_MAGIC && be64(b) != NBD_MAGIC && len != 134))
                abort();
        m->written += len;
        return 0;
}

/* A fake chain whose extents change every 4 KiB to 1 MiB, by offset. */
static int fake_status(void *u, uint64_t off, uint64_t len, struct dc_extent *ret) {
        uint64_t i = off >> 12, h = (i * 0x9e3779b97f4a7c15ull) >> 60;
        uint64_t end = (i + 1 + h * 17) << 12;
        *ret = (struct dc_extent){ .start = off, .length = MIN(end - off, len), .depth = (unsigned) (h % 4),
                                   .present = h % 4 != 3, .data = h & 1, .zero = !(h & 1) };
        return 0;
}

/* runs of the fake bitmap: dirty and clean in turn, of hashed lengths */
static uint64_t fake_run(void *u, uint64_t off, uint64_t len, bool *ret_dirty) {
        uint64_t i = off >> 16, h = (i * 0x9e3779b97f4a7c15ull) >> 61;
        uint64_t end = (i + 1 + h * 5) << 16;
        *ret_dirty = h & 1;
        return MIN(end - off, len);
}

static void check_status_payload(const uint8_t *p, size_t len, uint32_t want_len, bool req_one) {
        uint64_t sum = 0;
        size_t n;

        if (len == 0)
                return;
        if (len < 12 || (len - 4) % 8)
                abort();
        n = (len - 4) / 8;
        if (n > (req_one ? 1 : NBD_MAX_EXTENTS))
                abort();
        for (size_t i = 0; i < n; i++) {
                uint32_t l = be32(p + 4 + 8 * i);
                if (l == 0)
                        abort();
                sum += l;
        }
        if (sum > want_len)
                abort();
}

/* TLS "started": the stream goes on in memory, as if decrypted. */
static int fake_starttls(void *u) {
        struct mem *m = u;
        m->tls_started++;
        return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct nbd_export_info x = { .name = "disk", .description = "fuzz", .size = UINT64_C(1) << 30 };
        struct mem m = { 0 };
        struct nbd_io io = { mem_read, mem_write, &m, NULL };
        struct nbd_session s;
        static uint8_t base[4 + 8 * NBD_MAX_EXTENTS], depth[4 + 8 * NBD_MAX_EXTENTS], bits[4 + 8 * NBD_MAX_EXTENTS];

        if (size < 1)
                return 0;
        /* the first byte chooses the export: writable, size not a multiple of 512, stopping, TLS, a bitmap */
        x.writable = data[0] & 1;
        if (data[0] & 2)
                x.size += 333;
        x.stopping = data[0] & 4;
        /* and whether TLS is required (FORCEDTLS) */
        if (data[0] & 8)
                io.starttls = fake_starttls;
        /* and whether it offers a bitmap (qemu:dirty-bitmap:b0) */
        if (data[0] & 16)
                x.bitmap = "b0";
        m.in = data + 1;
        m.len = size - 1;
        if (nbd_handshake(&io, &x, &s) < 0)
                return 0;
        if (s.tflags != nbd_transmission_flags(&x, s.structured))
                abort();
        /* transmission only after exactly one STARTTLS when it is required, and none when it is not */
        if (m.tls_started != (io.starttls ? 1u : 0u) || s.tls != !!io.starttls)
                abort();
        for (;;) {
                uint8_t h[NBD_REQUEST_SIZE];
                struct nbd_request r;
                size_t bl, dl;
                int c;

                if (mem_read(&m, h, sizeof h) < 0 || nbd_request_decode(h, &r) < 0)
                        break;
                c = nbd_request_check(&s, &x, &r);
                if (c < 0 || r.type == NBD_CMD_DISC)
                        break;
                if (nbd_request_payload(&r) > NBD_MAX_PAYLOAD)
                        abort();
                if (m.len - m.pos < nbd_request_payload(&r))
                        break;
                m.pos += nbd_request_payload(&r);
                if (c > 0)
                        continue;
                /* a request the checks let through must be inside the export (FLUSH's range is ignored) */
                if (r.type != NBD_CMD_FLUSH && (r.offset > x.size || r.length > x.size - r.offset))
                        abort();
                if (r.type == NBD_CMD_BLOCK_STATUS) {
                        bool one = r.flags & NBD_CMD_FLAG_REQ_ONE;
                        size_t xl = 0;
                        if (nbd_block_status(&s, r.offset, r.length, one, fake_status, NULL, base, &bl, depth, &dl) < 0)
                                abort();
                        if (s.meta_bitmap && nbd_bitmap_status(r.offset, r.length, one, fake_run, NULL, bits, &xl) < 0)
                                abort();
                        /* a bitmap is selected only when the export offers one */
                        if (s.meta_bitmap && !x.bitmap)
                                abort();
                        check_status_payload(base, bl, r.length, one);
                        check_status_payload(depth, dl, r.length, one);
                        check_status_payload(bits, xl, r.length, one);
                        if (bl + dl + xl == 0)
                                abort();
                }
        }
        return 0;
}
