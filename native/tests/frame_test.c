/*
 * frame_test.c - the data frame header codec.
 *
 * Checks the exact byte layout against a hand-written image (so the
 * encoding is little-endian on any host), round trips of random valid
 * headers, that every single-field corruption and every truncation is
 * refused, and that random garbage is never accepted and never read past
 * its end (run under ASan/UBSan; each decode gets a heap buffer of exactly
 * len bytes so an overread is caught).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "net/frame.h"
#include "testutil.h"

TEST_RNG(xorshift64s, 0x9e3779b97f4a7c15ull)

static int
is_floating(uint8_t dtype)
{
    return dtype == PCCL_FLOAT32 || dtype == PCCL_FLOAT64 || dtype == PCCL_FLOAT16 ||
           dtype == PCCL_BFLOAT16;
}

static size_t
dsize_of(uint8_t dtype)
{
    size_t s = 0;
    CHECK_OK(pccl_dtype_size((pccl_dtype)dtype, &s));
    return s;
}

/* A random header the decoder must accept. */
static pccl__frame_header
random_header(void)
{
    pccl__frame_header h;
    size_t ds;

    memset(&h, 0, sizeof(h));
    h.kind = PCCL__FRAME_DATA;
    h.epoch = rnd();
    h.tag = rnd();
    h.seq = (uint32_t)rnd();
    h.step = (uint32_t)rnd();
    h.offset = rnd();
    h.dtype = (uint8_t)(rnd() % PCCL_DTYPE_COUNT);
    h.op = (uint8_t)(rnd() % PCCL_OP_COUNT);
    h.quant = is_floating(h.dtype) && (rnd() & 1) ? PCCL_QUANT_UINT8_MINMAX : PCCL_QUANT_NONE;
    ds = dsize_of(h.dtype);
    if (h.quant == PCCL_QUANT_NONE) {
        h.count = (uint32_t)(rnd() % (PCCL__FRAME_MAX_PAYLOAD / ds + 1));
        h.length = (uint32_t)(h.count * ds);
    } else {
        h.count = (uint32_t)(rnd() % (PCCL__FRAME_MAX_PAYLOAD + 1));
        h.length = h.count;
        h.qmin = ((double)(int64_t)rnd()) / 1e9;
        h.qscale = ((double)(rnd() >> 11)) / 1e12;
    }
    return h;
}

static int
same_header(const pccl__frame_header *a, const pccl__frame_header *b)
{
    return a->kind == b->kind && a->epoch == b->epoch && a->tag == b->tag &&
           a->seq == b->seq && a->step == b->step && a->offset == b->offset &&
           a->count == b->count && a->length == b->length && a->dtype == b->dtype &&
           a->op == b->op && a->quant == b->quant &&
           memcmp(&a->qmin, &b->qmin, sizeof(double)) == 0 &&
           memcmp(&a->qscale, &b->qscale, sizeof(double)) == 0;
}

/* Decode from a heap copy of exactly len bytes; checks *out is untouched
 * on failure. */
static pccl_result
decode_exact(const uint8_t *buf, size_t len, pccl__frame_header *out)
{
    uint8_t *copy = malloc(len ? len : 1);
    pccl__frame_header sentinel, h;
    pccl_result rv;

    CHECK(copy != NULL);
    if (len) {
        memcpy(copy, buf, len);
    }
    memset(&sentinel, 0xa5, sizeof(sentinel));
    h = sentinel;
    rv = pccl__frame_decode(copy, len, &h);
    free(copy);
    if (rv != PCCL_OK) {
        T(memcmp(&h, &sentinel, sizeof(h)) == 0);
    } else if (out != NULL) {
        *out = h;
    }
    return rv;
}

static void
test_helpers(void)
{
    uint8_t b[8];
    double d = -1.5; /* 0xbff8000000000000 */

    pccl__put_u16(b, 0x1234);
    T(b[0] == 0x34 && b[1] == 0x12);
    T(pccl__get_u16(b) == 0x1234);
    pccl__put_u32(b, 0x89abcdefu);
    T(b[0] == 0xef && b[1] == 0xcd && b[2] == 0xab && b[3] == 0x89);
    T(pccl__get_u32(b) == 0x89abcdefu);
    pccl__put_u64(b, 0x0102030405060708ull);
    for (int i = 0; i < 8; i++) {
        T(b[i] == 8 - i);
    }
    T(pccl__get_u64(b) == 0x0102030405060708ull);
    pccl__put_f64(b, d);
    T(b[7] == 0xbf && b[6] == 0xf8 && b[0] == 0 && b[5] == 0);
    T(pccl__get_f64(b) == -1.5);
}

/* The wire image of a fixed header, written out byte by byte. */
static void
test_layout(void)
{
    static const uint8_t want[PCCL__FRAME_HEADER_SIZE] = {
        0x50, 0x43, 0x43, 0x4c,                         /* "PCCL" */
        0x01, 0x00,                                     /* version */
        0x01, 0x00,                                     /* kind DATA */
        0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, /* epoch */
        0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, /* tag */
        0x0d, 0x0c, 0x0b, 0x0a,                         /* seq */
        0x03, 0x00, 0x00, 0x00,                         /* step */
        0x00, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, /* offset */
        0x00, 0x04, 0x00, 0x00,                         /* count 1024 */
        0x00, 0x04, 0x00, 0x00,                         /* length 1024 */
        0x00, 0x01, 0x01, 0x00,                         /* f32, avg, u8mm, flags */
        0x00, 0x00, 0x00, 0x00,                         /* reserved */
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xf8, 0xbf, /* qmin -1.5 */
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xd0, 0x3f, /* qscale 0.25 */
    };
    pccl__frame_header h, got;
    uint8_t buf[PCCL__FRAME_HEADER_SIZE];

    memset(&h, 0, sizeof(h));
    h.kind = PCCL__FRAME_DATA;
    h.epoch = 0x0102030405060708ull;
    h.tag = 0x8877665544332211ull;
    h.seq = 0x0a0b0c0d;
    h.step = 3;
    h.offset = 0x0000000100000100ull;
    h.count = 1024;
    h.length = 1024;
    h.dtype = PCCL_FLOAT32;
    h.op = PCCL_AVG;
    h.quant = PCCL_QUANT_UINT8_MINMAX;
    h.qmin = -1.5;
    h.qscale = 0.25;
    memset(buf, 0xee, sizeof(buf));
    pccl__frame_encode(&h, buf);
    T(memcmp(buf, want, sizeof(want)) == 0);
    T_RV(decode_exact(want, sizeof(want), &got), PCCL_OK);
    T(same_header(&h, &got));
}

static void
test_round_trip(void)
{
    for (int i = 0; i < 20000; i++) {
        pccl__frame_header h = random_header(), got;
        uint8_t buf[PCCL__FRAME_HEADER_SIZE + 16];

        memset(buf, 0x5a, sizeof(buf));
        pccl__frame_encode(&h, buf);
        /* The header never spills past 72 bytes. */
        for (size_t j = PCCL__FRAME_HEADER_SIZE; j < sizeof(buf); j++) {
            CHECK(buf[j] == 0x5a);
        }
        T_RV(decode_exact(buf, PCCL__FRAME_HEADER_SIZE, &got), PCCL_OK);
        T(same_header(&h, &got));
        /* Trailing payload bytes are not the header's business. */
        T_RV(decode_exact(buf, sizeof(buf), &got), PCCL_OK);
    }
}

/* Encode a valid header, patch bytes, expect EPROTO. */
static void
expect_reject_patched(const pccl__frame_header *h, size_t off, const uint8_t *bytes, size_t n)
{
    uint8_t buf[PCCL__FRAME_HEADER_SIZE];

    pccl__frame_encode(h, buf);
    memcpy(buf + off, bytes, n);
    T_RV(decode_exact(buf, sizeof(buf), NULL), PCCL_EPROTO);
}

static void
expect_reject_header(const pccl__frame_header *h)
{
    uint8_t buf[PCCL__FRAME_HEADER_SIZE];

    pccl__frame_encode(h, buf);
    T_RV(decode_exact(buf, sizeof(buf), NULL), PCCL_EPROTO);
}

static void
test_corruptions(void)
{
    pccl__frame_header base, h, q;
    uint8_t b[8];

    memset(&base, 0, sizeof(base));
    base.kind = PCCL__FRAME_DATA;
    base.count = 100;
    base.length = 400;
    base.dtype = PCCL_FLOAT32;
    base.op = PCCL_SUM;
    base.quant = PCCL_QUANT_NONE;
    T_RV(pccl__frame_decode((const uint8_t *)"", 0, &h), PCCL_EPROTO);

    /* magic: each byte flipped, and the big-endian spelling */
    for (int i = 0; i < 4; i++) {
        uint8_t buf[PCCL__FRAME_HEADER_SIZE];
        pccl__frame_encode(&base, buf);
        buf[i] ^= 0x20;
        T_RV(decode_exact(buf, sizeof(buf), NULL), PCCL_EPROTO);
    }
    pccl__put_u32(b, 0x5043434c);
    expect_reject_patched(&base, 0, b, 4);

    /* version 0, 2, 0x100 */
    pccl__put_u16(b, 0);
    expect_reject_patched(&base, 4, b, 2);
    pccl__put_u16(b, 2);
    expect_reject_patched(&base, 4, b, 2);
    pccl__put_u16(b, 0x100);
    expect_reject_patched(&base, 4, b, 2);

    /* kind */
    h = base;
    h.kind = 0;
    expect_reject_header(&h);
    h.kind = 2;
    expect_reject_header(&h);
    h.kind = 0x0101;
    expect_reject_header(&h);

    /* flags: every bit */
    for (int bit = 0; bit < 8; bit++) {
        b[0] = (uint8_t)(1u << bit);
        expect_reject_patched(&base, 51, b, 1);
    }
    /* reserved: every byte */
    for (int i = 0; i < 4; i++) {
        b[0] = 1;
        expect_reject_patched(&base, 52 + (size_t)i, b, 1);
    }

    /* dtype / op / quant out of range (length kept consistent where possible) */
    for (unsigned v = PCCL_DTYPE_COUNT; v < 256; v++) {
        b[0] = (uint8_t)v;
        expect_reject_patched(&base, 48, b, 1);
    }
    for (unsigned v = PCCL_OP_COUNT; v < 256; v++) {
        b[0] = (uint8_t)v;
        expect_reject_patched(&base, 49, b, 1);
    }
    for (unsigned v = PCCL_QUANT_COUNT; v < 256; v++) {
        b[0] = (uint8_t)v;
        expect_reject_patched(&base, 50, b, 1);
    }

    /* oversized length, with count that would agree */
    h = base;
    h.dtype = PCCL_UINT8;
    h.count = PCCL__FRAME_MAX_PAYLOAD;
    h.length = PCCL__FRAME_MAX_PAYLOAD;
    {
        uint8_t buf[PCCL__FRAME_HEADER_SIZE];
        pccl__frame_encode(&h, buf);
        T_RV(decode_exact(buf, sizeof(buf), NULL), PCCL_OK);
    }
    h.count = PCCL__FRAME_MAX_PAYLOAD + 1;
    h.length = PCCL__FRAME_MAX_PAYLOAD + 1;
    expect_reject_header(&h);
    h.count = UINT32_MAX;
    h.length = UINT32_MAX;
    expect_reject_header(&h);
    /* count * size overflowing 32 bits must not wrap into agreement */
    h = base;
    h.dtype = PCCL_FLOAT64;
    h.count = 0x20000001u; /* * 8 = 0x100000008, low 32 bits 8 */
    h.length = 8;
    expect_reject_header(&h);

    /* length / count mismatch */
    h = base;
    h.length = 401;
    expect_reject_header(&h);
    h.length = 100; /* count bytes: right only when quantized */
    expect_reject_header(&h);
    h.length = 0;
    expect_reject_header(&h);
    for (unsigned dt = 0; dt < PCCL_DTYPE_COUNT; dt++) {
        h = base;
        h.dtype = (uint8_t)dt;
        h.count = 7;
        h.length = (uint32_t)(7 * dsize_of(h.dtype));
        {
            uint8_t buf[PCCL__FRAME_HEADER_SIZE];
            pccl__frame_encode(&h, buf);
            T_RV(decode_exact(buf, sizeof(buf), NULL), PCCL_OK);
        }
        h.length += 1;
        expect_reject_header(&h);
    }

    /* quantized: floating dtypes only, length == count, finite qmin/qscale */
    q = base;
    q.quant = PCCL_QUANT_UINT8_MINMAX;
    q.length = q.count;
    q.qmin = -3.0;
    q.qscale = 0.5;
    {
        uint8_t buf[PCCL__FRAME_HEADER_SIZE];
        pccl__frame_encode(&q, buf);
        T_RV(decode_exact(buf, sizeof(buf), NULL), PCCL_OK);
    }
    for (unsigned dt = 0; dt < PCCL_DTYPE_COUNT; dt++) {
        h = q;
        h.dtype = (uint8_t)dt;
        if (!is_floating(h.dtype)) {
            expect_reject_header(&h);
        }
    }
    h = q;
    h.length = q.count * 4;
    expect_reject_header(&h);
    {
        const double bad[] = {NAN, -NAN, INFINITY, -INFINITY};
        for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
            h = q;
            h.qmin = bad[i];
            expect_reject_header(&h);
            h = q;
            h.qscale = bad[i];
            expect_reject_header(&h);
        }
        /* a signalling-NaN bit pattern too */
        pccl__put_u64(b, 0x7ff0000000000001ull);
        expect_reject_patched(&q, 56, b, 8);
        expect_reject_patched(&q, 64, b, 8);
    }
    /* not quantized: qmin and qscale must be exactly 0 (not even -0.0) */
    h = base;
    h.qmin = 1.0;
    expect_reject_header(&h);
    h = base;
    h.qscale = 1e-300;
    expect_reject_header(&h);
    h = base;
    h.qmin = -0.0;
    expect_reject_header(&h);
    for (int i = 0; i < 16; i++) {
        b[0] = 1;
        expect_reject_patched(&base, 56 + (size_t)i, b, 1);
    }
}

static void
test_truncated(void)
{
    for (int i = 0; i < 200; i++) {
        pccl__frame_header h = random_header();
        uint8_t buf[PCCL__FRAME_HEADER_SIZE];

        pccl__frame_encode(&h, buf);
        for (size_t len = 0; len < PCCL__FRAME_HEADER_SIZE; len++) {
            T_RV(decode_exact(buf, len, NULL), PCCL_EPROTO);
        }
    }
    /* NULL with a zero length is just "too short", not a crash. */
    {
        pccl__frame_header h;
        T_RV(pccl__frame_decode(NULL, 0, &h), PCCL_EPROTO);
    }
}

static void
test_garbage(void)
{
    unsigned long accepted = 0;

    for (int i = 0; i < 100000; i++) {
        uint8_t buf[PCCL__FRAME_HEADER_SIZE + 8];
        size_t len = (size_t)(rnd() % (sizeof(buf) + 1));
        pccl__frame_header h;
        pccl_result rv;

        for (size_t j = 0; j < sizeof(buf); j += 8) {
            pccl__put_u64(buf + j, rnd());
        }
        /* Half the time give it a good magic and version and zero
         * flags/reserved, to reach the deeper checks. */
        if (i & 1) {
            pccl__put_u32(buf, PCCL__FRAME_MAGIC);
            pccl__put_u16(buf + 4, PCCL__FRAME_VERSION);
            if (i & 2) {
                buf[51] = 0;
                pccl__put_u32(buf + 52, 0);
                pccl__put_u16(buf + 6, PCCL__FRAME_DATA);
            }
        }
        rv = decode_exact(buf, len, &h);
        T(rv == PCCL_OK || rv == PCCL_EPROTO);
        if (rv == PCCL_OK) {
            uint8_t again[PCCL__FRAME_HEADER_SIZE];
            accepted++;
            T(len >= PCCL__FRAME_HEADER_SIZE);
            T(pccl__get_u32(buf) == PCCL__FRAME_MAGIC);
            /* An accepted header is canonical: it re-encodes to itself. */
            pccl__frame_encode(&h, again);
            T(memcmp(again, buf, sizeof(again)) == 0);
        }
        if (pccl__get_u32(buf) != PCCL__FRAME_MAGIC) {
            T(rv == PCCL_EPROTO);
        }
    }
    /* Random bytes essentially never satisfy length == f(count, dtype). */
    T(accepted < 100);
}

int
main(void)
{
    test_helpers();
    test_layout();
    test_round_trip();
    test_corruptions();
    test_truncated();
    test_garbage();
    printf("frame_test: %lu checks passed\n", checks);
    return 0;
}
