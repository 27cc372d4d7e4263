/*
 * frame.c - encode and decode the fixed 72-byte data frame header.
 *
 * Every field is written and read one byte at a time in little-endian
 * order, so the wire format does not depend on the host's byte order or
 * on struct layout and alignment.  Doubles travel as the little-endian
 * image of their IEEE-754 bits.
 *
 * The decoder is the trust boundary for bytes coming off a socket: it
 * checks the length before touching anything, never reads past len, and
 * rejects every header that is not exactly what the encoder would have
 * produced for a valid slice (wrong magic/version/kind, non-zero flags or
 * reserved bytes, enum values out of range, a payload length that does
 * not follow from count and dtype, non-finite quantization parameters).
 * Checks that need the operation (offset, step, epoch) belong to the ring.
 */
#include <math.h>
#include <string.h>

#include "net/frame.h"

/* Field offsets within the header; see the table in frame.h. */
enum frame_offsets {
    OFF_MAGIC = 0,
    OFF_VERSION = 4,
    OFF_KIND = 6,
    OFF_EPOCH = 8,
    OFF_TAG = 16,
    OFF_SEQ = 24,
    OFF_STEP = 28,
    OFF_OFFSET = 32,
    OFF_COUNT = 40,
    OFF_LENGTH = 44,
    OFF_DTYPE = 48,
    OFF_OP = 49,
    OFF_QUANT = 50,
    OFF_FLAGS = 51,
    OFF_RESERVED = 52,
    OFF_QMIN = 56,
    OFF_QSCALE = 64
};

void
pccl__put_u16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v & 0xffu);
    p[1] = (uint8_t)(v >> 8);
}

void
pccl__put_u32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v & 0xffu);
    p[1] = (uint8_t)((v >> 8) & 0xffu);
    p[2] = (uint8_t)((v >> 16) & 0xffu);
    p[3] = (uint8_t)(v >> 24);
}

void
pccl__put_u64(uint8_t *p, uint64_t v)
{
    pccl__put_u32(p, (uint32_t)(v & 0xffffffffu));
    pccl__put_u32(p + 4, (uint32_t)(v >> 32));
}

void
pccl__put_f64(uint8_t *p, double v)
{
    uint64_t bits;

    memcpy(&bits, &v, sizeof(bits));
    pccl__put_u64(p, bits);
}

uint16_t
pccl__get_u16(const uint8_t *p)
{
    return (uint16_t)((unsigned)p[0] | ((unsigned)p[1] << 8));
}

uint32_t
pccl__get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

uint64_t
pccl__get_u64(const uint8_t *p)
{
    return (uint64_t)pccl__get_u32(p) | ((uint64_t)pccl__get_u32(p + 4) << 32);
}

double
pccl__get_f64(const uint8_t *p)
{
    uint64_t bits = pccl__get_u64(p);
    double v;

    memcpy(&v, &bits, sizeof(v));
    return v;
}

static int
is_floating(uint8_t dtype)
{
    return dtype == PCCL_FLOAT32 || dtype == PCCL_FLOAT64 || dtype == PCCL_FLOAT16 ||
           dtype == PCCL_BFLOAT16;
}

void
pccl__frame_encode(const pccl__frame_header *h, uint8_t *out)
{
    pccl__put_u32(out + OFF_MAGIC, PCCL__FRAME_MAGIC);
    pccl__put_u16(out + OFF_VERSION, PCCL__FRAME_VERSION);
    pccl__put_u16(out + OFF_KIND, h->kind);
    pccl__put_u64(out + OFF_EPOCH, h->epoch);
    pccl__put_u64(out + OFF_TAG, h->tag);
    pccl__put_u32(out + OFF_SEQ, h->seq);
    pccl__put_u32(out + OFF_STEP, h->step);
    pccl__put_u64(out + OFF_OFFSET, h->offset);
    pccl__put_u32(out + OFF_COUNT, h->count);
    pccl__put_u32(out + OFF_LENGTH, h->length);
    out[OFF_DTYPE] = h->dtype;
    out[OFF_OP] = h->op;
    out[OFF_QUANT] = h->quant;
    out[OFF_FLAGS] = 0;
    pccl__put_u32(out + OFF_RESERVED, 0);
    pccl__put_f64(out + OFF_QMIN, h->qmin);
    if (h->kind == PCCL__FRAME_P2P_DATA || h->kind == PCCL__FRAME_P2P_ACK) {
        pccl__put_u64(out + OFF_QSCALE, h->total);
    } else {
        pccl__put_f64(out + OFF_QSCALE, h->qscale);
    }
}

pccl_result
pccl__frame_decode(const uint8_t *buf, size_t len, pccl__frame_header *out)
{
    pccl__frame_header h;
    size_t dsize;
    uint64_t want;

    if (len < PCCL__FRAME_HEADER_SIZE) {
        return PCCL_EPROTO;
    }
    if (buf == NULL || out == NULL) {
        return PCCL_EINVAL;
    }
    if (pccl__get_u32(buf + OFF_MAGIC) != PCCL__FRAME_MAGIC ||
        pccl__get_u16(buf + OFF_VERSION) != PCCL__FRAME_VERSION ||
        buf[OFF_FLAGS] != 0 || pccl__get_u32(buf + OFF_RESERVED) != 0) {
        return PCCL_EPROTO;
    }

    h.kind = pccl__get_u16(buf + OFF_KIND);
    h.epoch = pccl__get_u64(buf + OFF_EPOCH);
    h.tag = pccl__get_u64(buf + OFF_TAG);
    h.seq = pccl__get_u32(buf + OFF_SEQ);
    h.step = pccl__get_u32(buf + OFF_STEP);
    h.offset = pccl__get_u64(buf + OFF_OFFSET);
    h.count = pccl__get_u32(buf + OFF_COUNT);
    h.length = pccl__get_u32(buf + OFF_LENGTH);
    h.dtype = buf[OFF_DTYPE];
    h.op = buf[OFF_OP];
    h.quant = buf[OFF_QUANT];
    h.qmin = pccl__get_f64(buf + OFF_QMIN);
    h.qscale = pccl__get_f64(buf + OFF_QSCALE);

    h.total = 0;
    if (h.kind == PCCL__FRAME_P2P_DATA || h.kind == PCCL__FRAME_P2P_ACK) {
        /* point-to-point: raw bytes, the message size in place of qscale */
        if (h.dtype != PCCL_UINT8 || h.op != PCCL_SUM || h.quant != PCCL_QUANT_NONE ||
            pccl__get_u64(buf + OFF_QMIN) != 0 || h.length != h.count ||
            h.length > PCCL__FRAME_MAX_PAYLOAD ||
            (h.kind == PCCL__FRAME_P2P_ACK && h.length != 0)) {
            return PCCL_EPROTO;
        }
        h.total = pccl__get_u64(buf + OFF_QSCALE);
        h.qscale = 0;
        h.qmin = 0;
        *out = h;
        return PCCL_OK;
    }
    if (h.kind != PCCL__FRAME_DATA || h.dtype >= PCCL_DTYPE_COUNT ||
        h.op >= PCCL_OP_COUNT || h.quant >= PCCL_QUANT_COUNT ||
        h.length > PCCL__FRAME_MAX_PAYLOAD) {
        return PCCL_EPROTO;
    }
    if (pccl_dtype_size((pccl_dtype)h.dtype, &dsize) != PCCL_OK) {
        return PCCL_EPROTO;
    }

    if (h.quant == PCCL_QUANT_NONE) {
        /* Exact zero bits: one canonical encoding, and -0.0 is not 0 here. */
        if (pccl__get_u64(buf + OFF_QMIN) != 0 || pccl__get_u64(buf + OFF_QSCALE) != 0) {
            return PCCL_EPROTO;
        }
        want = (uint64_t)h.count * (uint64_t)dsize; /* no overflow: 2^32 * 8 */
    } else {
        if (!is_floating(h.dtype) || !isfinite(h.qmin) || !isfinite(h.qscale)) {
            return PCCL_EPROTO;
        }
        want = (uint64_t)h.count; /* one byte per element */
    }
    if (want != (uint64_t)h.length) {
        return PCCL_EPROTO;
    }

    *out = h;
    return PCCL_OK;
}
