/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/*
 * The NBD protocol without sockets or disks (lib/nbd-proto.c): the fixed
 * newstyle handshake over a pair of byte-stream callbacks, the decoding and
 * checking of transmission requests, and the building of replies and block
 * status extents.  nbd-server.c puts it on sockets and a dc_disk;
 * tests/test-nbd-proto.c and tests/fuzz/fuzz-nbd.c drive it from memory.
 * Section names refer to the NBD protocol (doc/proto.md of the nbd project).
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "diskchain.h"

/* "Protocol phases", "Values" */
#define NBD_MAGIC              UINT64_C(0x4e42444d41474943) /* "NBDMAGIC" */
#define NBD_OPTS_MAGIC         UINT64_C(0x49484156454f5054) /* "IHAVEOPT" */
#define NBD_REP_MAGIC          UINT64_C(0x0003e889045565a9)
#define NBD_REQUEST_MAGIC      UINT32_C(0x25609513)
#define NBD_SIMPLE_REPLY_MAGIC UINT32_C(0x67446698)
#define NBD_STRUCTURED_MAGIC   UINT32_C(0x668e33ef)

enum {
        NBD_FLAG_FIXED_NEWSTYLE = 1 << 0,
        NBD_FLAG_NO_ZEROES = 1 << 1,
        NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0,
        NBD_FLAG_C_NO_ZEROES = 1 << 1,
};

enum {
        NBD_OPT_EXPORT_NAME = 1,
        NBD_OPT_ABORT = 2,
        NBD_OPT_LIST = 3,
        NBD_OPT_STARTTLS = 5,
        NBD_OPT_INFO = 6,
        NBD_OPT_GO = 7,
        NBD_OPT_STRUCTURED_REPLY = 8,
        NBD_OPT_LIST_META_CONTEXT = 9,
        NBD_OPT_SET_META_CONTEXT = 10,
};

#define NBD_REP_ERR(n) (UINT32_C(0x80000000) | (n))
enum {
        NBD_REP_ACK = 1,
        NBD_REP_SERVER = 2,
        NBD_REP_INFO = 3,
        NBD_REP_META_CONTEXT = 4,
};
#define NBD_REP_ERR_UNSUP NBD_REP_ERR(1)
#define NBD_REP_ERR_POLICY NBD_REP_ERR(2)
#define NBD_REP_ERR_INVALID NBD_REP_ERR(3)
#define NBD_REP_ERR_TLS_REQD NBD_REP_ERR(5)
#define NBD_REP_ERR_UNKNOWN NBD_REP_ERR(6)
#define NBD_REP_ERR_SHUTDOWN NBD_REP_ERR(7)
#define NBD_REP_ERR_TOO_BIG NBD_REP_ERR(9)

enum {
        NBD_INFO_EXPORT = 0,
        NBD_INFO_NAME = 1,
        NBD_INFO_DESCRIPTION = 2,
        NBD_INFO_BLOCK_SIZE = 3,
};

/* "Transmission flags" */
enum {
        NBD_FLAG_HAS_FLAGS = 1 << 0,
        NBD_FLAG_READ_ONLY = 1 << 1,
        NBD_FLAG_SEND_FLUSH = 1 << 2,
        NBD_FLAG_SEND_FUA = 1 << 3,
        NBD_FLAG_SEND_TRIM = 1 << 5,
        NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6,
        NBD_FLAG_SEND_DF = 1 << 7,
        NBD_FLAG_CAN_MULTI_CONN = 1 << 8,
        NBD_FLAG_SEND_CACHE = 1 << 10,
        NBD_FLAG_SEND_FAST_ZERO = 1 << 11,
};

enum {
        NBD_CMD_READ = 0,
        NBD_CMD_WRITE = 1,
        NBD_CMD_DISC = 2,
        NBD_CMD_FLUSH = 3,
        NBD_CMD_TRIM = 4,
        NBD_CMD_CACHE = 5,
        NBD_CMD_WRITE_ZEROES = 6,
        NBD_CMD_BLOCK_STATUS = 7,
};

enum {
        NBD_CMD_FLAG_FUA = 1 << 0,
        NBD_CMD_FLAG_NO_HOLE = 1 << 1,
        NBD_CMD_FLAG_DF = 1 << 2,
        NBD_CMD_FLAG_REQ_ONE = 1 << 3,
        NBD_CMD_FLAG_FAST_ZERO = 1 << 4,
};

enum {
        NBD_REPLY_FLAG_DONE = 1 << 0,
        NBD_REPLY_TYPE_NONE = 0,
        NBD_REPLY_TYPE_OFFSET_DATA = 1,
        NBD_REPLY_TYPE_OFFSET_HOLE = 2,
        NBD_REPLY_TYPE_BLOCK_STATUS = 5,
        NBD_REPLY_TYPE_ERROR = 0x8001,
};

/* "Error values" */
enum {
        NBD_EPERM = 1,
        NBD_EIO = 5,
        NBD_ENOMEM = 12,
        NBD_EINVAL = 22,
        NBD_ENOSPC = 28,
        NBD_EOVERFLOW = 75,
        NBD_ENOTSUP = 95,
        NBD_ESHUTDOWN = 108,
};

/* "base:allocation" */
enum { NBD_STATE_HOLE = 1 << 0, NBD_STATE_ZERO = 1 << 1 };

/* The context ids we hand out in SET_META_CONTEXT (LIST answers with 0). */
enum { NBD_META_BASE_ALLOCATION = 1, NBD_META_ALLOCATION_DEPTH = 2, NBD_META_DIRTY_BITMAP = 3 };
/* qemu:dirty-bitmap:NAME: bit 0 of an extent's flags is "dirty" (QEMU's nbd.rst) */
#define NBD_DIRTY_BITMAP_PREFIX "qemu:dirty-bitmap:"
enum { NBD_STATE_DIRTY = 1 << 0 };

/* Our limits (README.md, "NBD server"). */
#define NBD_MAX_PAYLOAD   (UINT32_C(32) << 20) /* largest READ/WRITE, and the advertised maximum */
#define NBD_PREFERRED_BLOCK 4096u
#define NBD_MAX_OPTION    (64u << 10)          /* option data beyond it: the connection is closed */
#define NBD_MAX_STRING    4096u                /* the spec's string limit: names, queries */
#define NBD_MAX_EXTENTS   64u                  /* extents in one block status chunk (QEMU takes ≤ 1000 B) */
#define NBD_REQUEST_SIZE  28u

/* Reading and writing the client's byte stream: 0 when all of LEN moved, else -errno (-ECONNRESET at EOF). */
struct nbd_io {
        int (*read)(void *userdata, void *buf, size_t len);
        int (*write)(void *userdata, const void *buf, size_t len);
        void *userdata;
        /*
         * NULL: TLS is not offered, and NBD_OPT_STARTTLS is an unknown option
         * ("NOTLS").  Otherwise TLS is required ("FORCEDTLS"): called once the
         * STARTTLS ACK is out, it runs the TLS handshake and returns 0 when
         * read and write go over the TLS session from then on, else -errno
         * (the connection is to be closed).
         */
        int (*starttls)(void *userdata);
};

/* What the handshake offers. */
struct nbd_export_info {
        const char *name;        /* the export's name; "" also selects it (the default export) */
        const char *description; /* or NULL */
        uint64_t size;
        bool writable;
        bool stopping;           /* answer GO/INFO/EXPORT_NAME with ERR_SHUTDOWN / a close */
        const char *bitmap;      /* the bitmap offered as qemu:dirty-bitmap:BITMAP, or NULL */
};

/* What a handshake agreed. */
struct nbd_session {
        bool structured;     /* STRUCTURED_REPLY was acknowledged */
        bool no_zeroes;
        bool meta_base;      /* base:allocation selected (and bound to our export) */
        bool meta_depth;     /* qemu:allocation-depth selected */
        bool meta_bitmap;    /* qemu:dirty-bitmap:<the export's bitmap> selected */
        bool tls;            /* STARTTLS succeeded: everything after it went over TLS */
        uint16_t tflags;     /* the transmission flags sent */
        unsigned options;    /* options the client sent */
};

/* The transmission flags of INFO for a session (DF only once structured replies are on). */
uint16_t nbd_transmission_flags(const struct nbd_export_info *x, bool structured);

/*
 * The fixed newstyle handshake ("Fixed newstyle negotiation"), server
 * side, from the greeting to the start of transmission.  Returns 0 when
 * transmission starts (GO or EXPORT_NAME), -ECONNABORTED when the client
 * ended it (ABORT, or a close between options), -EPROTO on a protocol
 * violation or an unknown export named by EXPORT_NAME (the connection is
 * to be closed, and also EXPORT_NAME before a required STARTTLS), -E2BIG
 * for option data beyond NBD_MAX_OPTION, or the io's (or starttls's) error.
 */
int nbd_handshake(const struct nbd_io *io, const struct nbd_export_info *x, struct nbd_session *ret);

struct nbd_request {
        uint16_t flags, type;
        uint64_t cookie, offset;
        uint32_t length;
};

/* Decode a compact request header ("Request message"); -EPROTO on a bad magic. */
int nbd_request_decode(const uint8_t buf[NBD_REQUEST_SIZE], struct nbd_request *ret);

/* The payload that follows R on the wire: WRITE's length; 0 for every other command. */
static inline uint32_t nbd_request_payload(const struct nbd_request *r) {
        return r->type == NBD_CMD_WRITE ? r->length : 0;
}

/*
 * Check R against the session and the export.  Returns 0 when it is to be
 * served, an NBD error (> 0) to answer it with after consuming its payload,
 * or -EPROTO when the connection is to be closed at once (a WRITE payload
 * beyond NBD_MAX_PAYLOAD: the stream cannot be trusted to carry it).
 */
int nbd_request_check(const struct nbd_session *s, const struct nbd_export_info *x, const struct nbd_request *r);

/* Map a library errno onto the protocol's error values ("Error values"). */
uint32_t nbd_errno(int err);

/* Reply headers. */
void nbd_simple_reply(uint8_t out[16], uint32_t error, uint64_t cookie);
void nbd_chunk_header(uint8_t out[20], uint16_t flags, uint16_t type, uint64_t cookie, uint32_t length);

/*
 * Block status of [offset, offset+length) for the selected contexts, one
 * chunk payload each ("Metadata querying", "base:allocation", QEMU's
 * qemu:allocation-depth): STATUS is asked for extents from OFFSET on
 * (a dc_extent: depth 0 = top).  Each payload is u32 context id followed by
 * (u32 length, u32 flags) pairs, equal neighbours merged, at most
 * NBD_MAX_EXTENTS (1 with REQ_ONE), never past the request.  OUT_BASE and
 * OUT_DEPTH hold 4 + 8 * NBD_MAX_EXTENTS bytes; their lengths come back in
 * RET_BASE_LEN and RET_DEPTH_LEN (0 when that context is not selected).
 */
typedef int (*nbd_status_fn)(void *userdata, uint64_t offset, uint64_t length, struct dc_extent *ret);
/*
 * The same for qemu:dirty-bitmap: RUN gives, from OFFSET, the length of a
 * run that is all dirty or all clean (> 0 below the export's size).  OUT
 * holds 4 + 8 * NBD_MAX_EXTENTS bytes.
 */
typedef uint64_t (*nbd_run_fn)(void *userdata, uint64_t offset, uint64_t length, bool *ret_dirty);
int nbd_bitmap_status(uint64_t offset, uint32_t length, bool req_one, nbd_run_fn run, void *userdata, uint8_t *out,
                      size_t *ret_len);
int nbd_block_status(const struct nbd_session *s, uint64_t offset, uint32_t length, bool req_one,
                     nbd_status_fn status, void *userdata, uint8_t *out_base, size_t *ret_base_len,
                     uint8_t *out_depth, size_t *ret_depth_len);

/* The base:allocation flags and the allocation depth of an extent. */
static inline uint32_t nbd_extent_flags(const struct dc_extent *e) {
        return (e->data ? 0 : NBD_STATE_HOLE) | (e->zero ? NBD_STATE_ZERO : 0);
}
static inline uint32_t nbd_extent_depth(const struct dc_extent *e) {
        return e->present ? e->depth + 1 : 0;
}
