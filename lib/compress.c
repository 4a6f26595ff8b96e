/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Compressed clusters (qcow2 spec, "Compressed Clusters Descriptor").
 *
 * Type 0 is raw DEFLATE with a 4 KiB window and no zlib header, as QEMU
 * writes it; type 1 is one or more plain zstd frames.  The stored length is
 * only known to the sector, so decompression stops as soon as one full
 * cluster of output exists and ignores whatever follows.
 */

#include <zlib.h>
#include <zstd.h>

#include "dc-internal.h"

int dc_compress(int type, const void *src, size_t srclen, void *dst, size_t dstcap, size_t *ret_len) {
        if (type == 0) {
                z_stream s = { 0 };
                int r;

                if (deflateInit2(&s, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) != Z_OK)
                        return dc_error(ENOMEM, "cannot initialise deflate");
                s.next_in = (Bytef *) src;
                s.avail_in = (uInt) srclen;
                s.next_out = dst;
                s.avail_out = (uInt) dstcap;
                r = deflate(&s, Z_FINISH);
                deflateEnd(&s);
                if (r != Z_STREAM_END)
                        return 0; /* does not fit: store uncompressed */
                *ret_len = dstcap - s.avail_out;
                return 1;
        }
        if (type == 1) {
                size_t n = ZSTD_compress(dst, dstcap, src, srclen, ZSTD_CLEVEL_DEFAULT);
                if (ZSTD_isError(n))
                        return 0;
                *ret_len = n;
                return 1;
        }
        return dc_error(ENOTSUP, "unknown compression type %d", type);
}

int dc_decompress(int type, const void *src, size_t srclen, void *dst, size_t dstlen) {
        if (type == 0) {
                z_stream s = { 0 };
                int r;

                if (inflateInit2(&s, -12) != Z_OK)
                        return dc_error(ENOMEM, "cannot initialise inflate");
                s.next_in = (Bytef *) src;
                s.avail_in = (uInt) srclen;
                s.next_out = dst;
                s.avail_out = (uInt) dstlen;
                r = inflate(&s, Z_FINISH);
                inflateEnd(&s);
                if ((r != Z_STREAM_END && r != Z_BUF_ERROR) || s.avail_out != 0)
                        return dc_error(EUCLEAN, "the compressed cluster does not inflate to a full cluster");
                return 0;
        }
        if (type == 1) {
                ZSTD_DCtx *d = ZSTD_createDCtx();
                ZSTD_inBuffer in = { src, srclen, 0 };
                ZSTD_outBuffer out = { dst, dstlen, 0 };

                if (!d)
                        return dc_error(ENOMEM, "cannot initialise zstd");
                while (out.pos < out.size) {
                        size_t r = ZSTD_decompressStream(d, &out, &in);
                        if (ZSTD_isError(r)) {
                                ZSTD_freeDCtx(d);
                                return dc_error(EUCLEAN, "the zstd cluster does not decompress: %s", ZSTD_getErrorName(r));
                        }
                        if (in.pos == in.size && out.pos < out.size) {
                                ZSTD_freeDCtx(d);
                                return dc_error(EUCLEAN, "the zstd cluster decompresses to less than a cluster");
                        }
                }
                ZSTD_freeDCtx(d);
                return 0;
        }
        return dc_error(ENOTSUP, "unknown compression type %d", type);
}
