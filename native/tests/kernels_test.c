/*
 * kernels_test.c - the reduce kernels and 16-bit float conversions against
 * straightforward reference implementations.
 *
 * The references are written differently on purpose: halves and bfloat16
 * are decoded with ldexp and rounded with nearbyint in double, float32
 * results are computed in double and rounded once to float (exact for +
 * and * because double has more than 2*24+2 bits), and MIN/MAX use plain
 * branches.  Every dtype x op runs on random data mixed with edge values,
 * at lengths 0, 1, 7, 1023 and 100003, with out separate, out == a,
 * out == b and out == a == b; bytes past n must stay untouched.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coll/kernels.h"
#include "pccl.h"
#include "testutil.h"

TEST_RNG(splitmix64, 0x9e3779b97f4a7c15u)

static float
f32_of(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

static uint32_t
bits_of_f32(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    return u;
}

/* ---- reference conversions ------------------------------------------ */

/* Decodes a 16-bit float with exponent bits EB; exponent all-ones is
 * inf/NaN unless as_finite (used to get the value "after" the largest). */
static double
ref_small_to_double(uint16_t h, int eb, int as_finite)
{
    int mb = 15 - eb;
    int bias = (1 << (eb - 1)) - 1;
    int e = (h >> mb) & ((1 << eb) - 1);
    int m = h & ((1 << mb) - 1);
    double v;

    if (e == (1 << eb) - 1 && !as_finite) {
        v = m ? NAN : INFINITY;
    } else if (e == 0) {
        v = ldexp((double)m, 1 - bias - mb);
    } else {
        v = ldexp((double)(m + (1 << mb)), e - bias - mb);
    }
    return (h & 0x8000) ? -v : v;
}

static double
ref_half(uint16_t h)
{
    return ref_small_to_double(h, 5, 0);
}

static double
ref_bf16(uint16_t h)
{
    return ref_small_to_double(h, 8, 0);
}

/* Rounds the float value f to the 16-bit format with EB exponent bits,
 * nearest even.  NaN gives the canonical quiet NaN (callers compare NaN by
 * NaN-ness only). */
static uint16_t
ref_double_to_small(double f, int eb)
{
    int mb = 15 - eb;
    int bias = (1 << (eb - 1)) - 1;
    int emin = 1 - bias;
    uint16_t sign = signbit(f) ? 0x8000 : 0;
    uint16_t inf = (uint16_t)(((1 << eb) - 1) << mb);
    double a = fabs(f);
    /* Largest finite plus half its ulp: from there on, inf. */
    double limit = ldexp((double)(2 << mb) - 0.5, (1 << eb) - 2 - bias - mb);
    double m;
    int e;

    if (isnan(f)) {
        return (uint16_t)(inf | (1 << (mb - 1)));
    }
    if (a >= limit) {
        return sign | inf;
    }
    if (a < ldexp(1.0, emin)) {
        /* subnormal step 2^(emin - mb); m may round up to the smallest normal */
        m = nearbyint(ldexp(a, mb - emin));
        return (uint16_t)(sign | (uint16_t)m);
    }
    e = ilogb(a);
    m = nearbyint(ldexp(a, mb - e));
    if (m == (double)(2 << mb)) {
        m /= 2;
        e++;
    }
    return (uint16_t)(sign | ((e + bias) << mb) | ((int)m - (1 << mb)));
}

static uint16_t
ref_to_half(float f)
{
    return ref_double_to_small(f, 5);
}

static uint16_t
ref_to_bf16(float f)
{
    return ref_double_to_small(f, 8);
}

/* Rounds a double to float without the undefined out-of-range conversion. */
static float
ref_to_float(double d)
{
    if (isnan(d)) {
        return NAN;
    }
    if (fabs(d) > FLT_MAX) {
        float big = fabs(d) >= 0x1.ffffffp127 ? INFINITY : FLT_MAX;
        return d < 0 ? -big : big;
    }
    return (float)d;
}

/* ---- conversion tests ------------------------------------------------ */

static void
check_same_value(double got, double want)
{
    if (isnan(want)) {
        T(isnan(got));
    } else {
        T(got == want && !signbit(got) == !signbit(want));
    }
}

static void
test_all_halves(void)
{
    uint32_t i;

    for (i = 0; i < 65536; i++) {
        uint16_t h = (uint16_t)i;
        float f = pccl__half_to_float(h);
        float g = pccl__bf16_to_float(h);
        uint16_t back = pccl__float_to_half(f);
        uint16_t gback = pccl__float_to_bf16(g);

        check_same_value(f, ref_half(h));
        check_same_value(g, ref_bf16(h));
        if (isnan(f)) {
            /* NaN stays NaN; a quiet NaN keeps its exact bits. */
            T((back & 0x7c00) == 0x7c00 && (back & 0x3ff) != 0);
            T(!(h & 0x200) || back == h);
        } else {
            T(back == h);
        }
        if (isnan(g)) {
            T((gback & 0x7f80) == 0x7f80 && (gback & 0x7f) != 0);
            T(!(h & 0x40) || gback == h);
        } else {
            T(gback == h);
        }
    }
}

/* Exact midpoints between neighbouring finite values round to the even
 * one; one float ulp either side rounds to the nearer one. */
static void
test_ties(int eb, uint16_t last_finite, uint16_t (*narrow)(float))
{
    uint32_t h;

    for (h = 0; h <= last_finite; h++) {
        double lo = ref_small_to_double((uint16_t)h, eb, 1);
        double hi = ref_small_to_double((uint16_t)(h + 1), eb, 1);
        float mid = (float)((lo + hi) / 2);
        uint16_t even = (h & 1) ? (uint16_t)(h + 1) : (uint16_t)h;

        T((double)mid == (lo + hi) / 2); /* midpoint is a float */
        T(narrow(mid) == even);
        T(narrow(-mid) == (even | 0x8000));
        T(narrow(nextafterf(mid, 0.0f)) == h);
        T(narrow(nextafterf(mid, INFINITY)) == h + 1);
    }
}

static void
check_narrow(float f)
{
    uint16_t h = pccl__float_to_half(f), rh = ref_to_half(f);
    uint16_t b = pccl__float_to_bf16(f), rb = ref_to_bf16(f);

    if (isnan(f)) {
        T(isnan(pccl__half_to_float(h)) && isnan(pccl__bf16_to_float(b)));
        return;
    }
    if (h != rh || b != rb) {
        fprintf(stderr, "narrow %a (0x%08x): half 0x%04x want 0x%04x, bf16 0x%04x want 0x%04x\n",
                (double)f, (unsigned)bits_of_f32(f), h, rh, b, rb);
    }
    T(h == rh);
    T(b == rb);
}

static void
test_narrowing(void)
{
    uint64_t u;
    int i;

    /* A stride through every float pattern, then random ones. */
    for (u = 0; u < UINT64_C(0x100000000); u += 4093) {
        check_narrow(f32_of((uint32_t)u));
    }
    for (i = 0; i < 1000000; i++) {
        check_narrow(f32_of((uint32_t)rnd()));
    }
    /* Boundaries of the half range. */
    T(pccl__float_to_half(65504.0f) == 0x7bff);
    T(pccl__float_to_half(nextafterf(65520.0f, 0.0f)) == 0x7bff);
    T(pccl__float_to_half(65520.0f) == 0x7c00);
    T(pccl__float_to_half(1e30f) == 0x7c00);
    T(pccl__float_to_half(-INFINITY) == 0xfc00);
    T(pccl__float_to_half(0x1p-25f) == 0x0000);              /* tie to even 0 */
    T(pccl__float_to_half(nextafterf(0x1p-25f, 1.0f)) == 0x0001);
    T(pccl__float_to_half(0x1.8p-24f) == 0x0002);            /* tie to even 2 */
    T(pccl__float_to_half(-0.0f) == 0x8000);
    T(pccl__float_to_half(f32_of(1)) == 0x0000);
    T(pccl__float_to_bf16(FLT_MAX) == 0x7f80);                  /* rounds up to inf */
    T(pccl__float_to_bf16(f32_of(1)) == 0x0000);
    T(pccl__float_to_bf16(f32_of(0x00008000u)) == 0x0000);      /* tie to even */
    T(pccl__float_to_bf16(f32_of(0x00018000u)) == 0x0002);
    /* A NaN whose payload sits only in dropped bits is still a NaN. */
    T(isnan(pccl__half_to_float(pccl__float_to_half(f32_of(0x7f800001u)))));
    T(isnan(pccl__bf16_to_float(pccl__float_to_bf16(f32_of(0xff800001u)))));
}

/* ---- reduce tests ---------------------------------------------------- */

static const pccl_dtype all_dtypes[] = {
    PCCL_FLOAT32, PCCL_FLOAT64, PCCL_FLOAT16, PCCL_BFLOAT16,
    PCCL_INT8, PCCL_INT16, PCCL_INT32, PCCL_INT64, PCCL_UINT8,
};
static const pccl_op all_ops[] = { PCCL_SUM, PCCL_AVG, PCCL_MIN, PCCL_MAX, PCCL_PROD };
static const char *const dtype_names[] = {
    "float32", "float64", "float16", "bfloat16", "int8", "int16", "int32", "int64", "uint8",
};

static size_t
esize(pccl_dtype dt)
{
    size_t s = 0;
    CHECK_OK(pccl_dtype_size(dt, &s));
    return s;
}

static int
is_signed_int(pccl_dtype dt)
{
    return dt == PCCL_INT8 || dt == PCCL_INT16 || dt == PCCL_INT32 || dt == PCCL_INT64;
}

/* An element as raw little-endian-agnostic bits in the low bytes. */
static uint64_t
load_bits(const void *p, size_t i, size_t es)
{
    uint64_t v = 0;
    switch (es) {
    case 1: { uint8_t x; memcpy(&x, (const char *)p + i, 1); v = x; break; }
    case 2: { uint16_t x; memcpy(&x, (const char *)p + 2 * i, 2); v = x; break; }
    case 4: { uint32_t x; memcpy(&x, (const char *)p + 4 * i, 4); v = x; break; }
    default: memcpy(&v, (const char *)p + 8 * i, 8); break;
    }
    return v;
}

static void
store_bits(void *p, size_t i, size_t es, uint64_t v)
{
    switch (es) {
    case 1: { uint8_t x = (uint8_t)v; memcpy((char *)p + i, &x, 1); break; }
    case 2: { uint16_t x = (uint16_t)v; memcpy((char *)p + 2 * i, &x, 2); break; }
    case 4: { uint32_t x = (uint32_t)v; memcpy((char *)p + 4 * i, &x, 4); break; }
    default: memcpy((char *)p + 8 * i, &v, 8); break;
    }
}

/* Value of a floating element held in bits. */
static double
float_value(pccl_dtype dt, uint64_t bits)
{
    double d;
    switch (dt) {
    case PCCL_FLOAT32:
        return f32_of((uint32_t)bits);
    case PCCL_FLOAT64:
        memcpy(&d, &bits, sizeof(d));
        return d;
    case PCCL_FLOAT16:
        return ref_half((uint16_t)bits);
    default:
        return ref_bf16((uint16_t)bits);
    }
}

/* Bits of a double result rounded to dt the reference way: once to float
 * (exact double ops on float inputs make this the correctly rounded float
 * result), then, for 16-bit types, to the target format. */
static uint64_t
float_bits_of(pccl_dtype dt, double v)
{
    uint64_t u;
    switch (dt) {
    case PCCL_FLOAT32:
        return bits_of_f32(ref_to_float(v));
    case PCCL_FLOAT64:
        memcpy(&u, &v, sizeof(u));
        return u;
    case PCCL_FLOAT16:
        return ref_to_half(ref_to_float(v));
    default:
        return ref_to_bf16(ref_to_float(v));
    }
}

/* Signed value of the low `bytes` bytes of v. */
static int64_t
sign_extend(uint64_t v, size_t bytes)
{
    unsigned bits = (unsigned)(8 * bytes);
    uint64_t mask = bits == 64 ? ~UINT64_C(0) : (UINT64_C(1) << bits) - 1;
    v &= mask;
    if ((v >> (bits - 1)) & 1) {
        return -(int64_t)(~v & mask) - 1;
    }
    return (int64_t)v;
}

/* MIN/MAX reference: a NaN operand wins (a first), else the smaller/larger
 * value, -0 below +0. */
static uint64_t
ref_minmax(pccl_dtype dt, pccl_op op, uint64_t a, uint64_t b)
{
    double x = float_value(dt, a), y = float_value(dt, b);
    int a_first;

    if (isnan(x)) {
        return a;
    }
    if (isnan(y)) {
        return b;
    }
    if (x == y) {
        /* equal values differ only as -0 / +0 */
        a_first = op == PCCL_MIN ? signbit(x) != 0 : signbit(x) == 0;
    } else {
        a_first = op == PCCL_MIN ? x < y : x > y;
    }
    return a_first ? a : b;
}

static uint64_t
ref_reduce(pccl_dtype dt, pccl_op op, uint64_t a, uint64_t b)
{
    size_t es = esize(dt);

    if (pccl__dtype_is_float(dt)) {
        double x = float_value(dt, a), y = float_value(dt, b);
        switch (op) {
        case PCCL_SUM:
        case PCCL_AVG:
            return float_bits_of(dt, x + y);
        case PCCL_PROD:
            return float_bits_of(dt, x * y);
        default:
            return ref_minmax(dt, op, a, b);
        }
    }
    if (is_signed_int(dt)) {
        int64_t x = sign_extend(a, es), y = sign_extend(b, es);
        switch (op) {
        case PCCL_SUM:
        case PCCL_AVG:
            return (uint64_t)x + (uint64_t)y;
        case PCCL_PROD:
            return (uint64_t)x * (uint64_t)y;
        case PCCL_MIN:
            return x < y ? a : b;
        default:
            return x > y ? a : b;
        }
    }
    switch (op) {
    case PCCL_SUM:
    case PCCL_AVG:
        return a + b;
    case PCCL_PROD:
        return a * b;
    case PCCL_MIN:
        return a < b ? a : b;
    default:
        return a > b ? a : b;
    }
}

/* Edge patterns per dtype, as bits. */
static size_t
edges(pccl_dtype dt, const uint64_t **out)
{
    static const uint64_t f32[] = {
        0x00000000, 0x80000000, 0x7f800000, 0xff800000, 0x7fc00000, 0xffc00001,
        0x7f800001, 0x7fa00000, 0x00000001, 0x80000001, 0x007fffff, 0x00800000,
        0x7f7fffff, 0xff7fffff, 0x3f800000, 0xbf800000, 0x4b000001,
    };
    static const uint64_t f64[] = {
        0, UINT64_C(0x8000000000000000), UINT64_C(0x7ff0000000000000),
        UINT64_C(0xfff0000000000000), UINT64_C(0x7ff8000000000000),
        UINT64_C(0xfff8000000000123), UINT64_C(0x7ff0000000000001), 1,
        UINT64_C(0x8000000000000001), UINT64_C(0x000fffffffffffff),
        UINT64_C(0x7fefffffffffffff), UINT64_C(0xffefffffffffffff),
        UINT64_C(0x3ff0000000000000), UINT64_C(0xbff0000000000000),
    };
    static const uint64_t f16[] = {
        0x0000, 0x8000, 0x7c00, 0xfc00, 0x7e00, 0xfe01, 0x7c01, 0x7d00, 0x0001,
        0x8001, 0x03ff, 0x0400, 0x7bff, 0xfbff, 0x3c00, 0xbc00, 0x3c01,
    };
    static const uint64_t bf16[] = {
        0x0000, 0x8000, 0x7f80, 0xff80, 0x7fc0, 0xffc1, 0x7f81, 0x7fa0, 0x0001,
        0x8001, 0x007f, 0x0080, 0x7f7f, 0xff7f, 0x3f80, 0xbf80, 0x3f81,
    };
    static const uint64_t i8[] = { 0, 1, 0xff, 0x80, 0x7f, 0x81, 0x7e, 2, 0xfe };
    static const uint64_t i16[] = { 0, 1, 0xffff, 0x8000, 0x7fff, 0x8001, 0x7ffe, 0x100, 0xff };
    static const uint64_t i32[] = { 0, 1, 0xffffffff, 0x80000000, 0x7fffffff, 0x80000001,
                                    0x7ffffffe, 0x10000, 0xffff };
    static const uint64_t i64[] = { 0, 1, ~UINT64_C(0), UINT64_C(0x8000000000000000),
                                    UINT64_C(0x7fffffffffffffff), UINT64_C(0x8000000000000001),
                                    UINT64_C(0x100000000), 0xffffffff };
#define EDGES(arr)                                                            \
    do {                                                                      \
        *out = arr;                                                           \
        return sizeof(arr) / sizeof(arr[0]);                                  \
    } while (0)
    switch (dt) {
    case PCCL_FLOAT32: EDGES(f32);
    case PCCL_FLOAT64: EDGES(f64);
    case PCCL_FLOAT16: EDGES(f16);
    case PCCL_BFLOAT16: EDGES(bf16);
    case PCCL_INT8: case PCCL_UINT8: EDGES(i8);
    case PCCL_INT16: EDGES(i16);
    case PCCL_INT32: EDGES(i32);
    default: EDGES(i64);
    }
#undef EDGES
}

/* One random element: 10% edges, 30% arbitrary bits, else a moderate
 * value (floats) or a small integer, so SUM/PROD see ordinary cases too. */
static uint64_t
random_elem(pccl_dtype dt)
{
    const uint64_t *e;
    size_t ne = edges(dt, &e);
    uint64_t r = rnd() % 10;
    uint64_t bits = rnd();

    if (r == 0) {
        return e[rnd() % ne];
    }
    if (r <= 3) {
        return bits;
    }
    switch (dt) {
    case PCCL_FLOAT32:
        return bits_of_f32((float)rnd_real(100.0));
    case PCCL_FLOAT64: {
        double d = rnd_real(100.0);
        memcpy(&bits, &d, sizeof(d));
        return bits;
    }
    case PCCL_FLOAT16:
        return ref_to_half((float)rnd_real(8.0));
    case PCCL_BFLOAT16:
        return ref_to_bf16((float)rnd_real(100.0));
    default:
        return (uint64_t)(int64_t)(rnd() % 201) - 100;
    }
}

static void
fill(void *p, size_t n, pccl_dtype dt)
{
    size_t i, es = esize(dt);
    for (i = 0; i < n; i++) {
        store_bits(p, i, es, random_elem(dt));
    }
}

/* NaN results of SUM/PROD may carry any payload; everything else must be
 * bit-exact. */
static int
same_result(pccl_dtype dt, pccl_op op, uint64_t got, uint64_t want)
{
    size_t es = esize(dt);
    uint64_t mask = es == 8 ? ~UINT64_C(0) : (UINT64_C(1) << (8 * es)) - 1;
    got &= mask;
    want &= mask;
    if (pccl__dtype_is_float(dt) && op != PCCL_MIN && op != PCCL_MAX &&
        isnan(float_value(dt, want))) {
        return isnan(float_value(dt, got));
    }
    return got == want;
}

enum alias { SEPARATE, OUT_IS_A, OUT_IS_B, ALL_SAME, ALIAS_COUNT };

static void
test_reduce_case(pccl_dtype dt, pccl_op op, size_t n, enum alias mode)
{
    const size_t guard = 16;
    size_t es = esize(dt), bytes = (n + guard) * es, i;
    unsigned char *a = malloc(bytes + 1), *b = malloc(bytes + 1);
    unsigned char *out = malloc(bytes + 1), *want = malloc(bytes + 1);
    const void *pa, *pb;

    CHECK(a && b && out && want);
    fill(a, n, dt);
    fill(b, n, dt);
    memset(a + n * es, 0xa5, guard * es);
    memset(b + n * es, 0x5a, guard * es);
    memset(out + n * es, 0xc3, guard * es);
    if (mode == ALL_SAME) {
        memcpy(b, a, n * es);
    }
    for (i = 0; i < n; i++) {
        store_bits(want, i, es,
                   ref_reduce(dt, op, load_bits(a, i, es), load_bits(b, i, es)));
    }
    switch (mode) {
    case SEPARATE:
        pa = a;
        pb = b;
        break;
    case OUT_IS_A:
        memcpy(out, a, n * es);
        pa = out;
        pb = b;
        break;
    case OUT_IS_B:
        memcpy(out, b, n * es);
        pa = a;
        pb = out;
        break;
    default:
        memcpy(out, a, n * es);
        pa = out;
        pb = out;
        break;
    }
    pccl__reduce(out, pa, pb, n, dt, op);
    for (i = 0; i < n; i++) {
        uint64_t got = load_bits(out, i, es), w = load_bits(want, i, es);
        if (!same_result(dt, op, got, w)) {
            fprintf(stderr, "%s op %d n %zu alias %d [%zu]: a 0x%llx b 0x%llx got 0x%llx want 0x%llx\n",
                    dtype_names[dt], (int)op, n, (int)mode, i,
                    (unsigned long long)load_bits(a, i, es),
                    (unsigned long long)load_bits(mode == ALL_SAME ? a : b, i, es),
                    (unsigned long long)got, (unsigned long long)w);
        }
        T(same_result(dt, op, got, w));
    }
    for (i = n * es; i < bytes; i++) {
        T(out[i] == 0xc3);
    }
    free(a);
    free(b);
    free(out);
    free(want);
}

static void
test_reduce(void)
{
    static const size_t lengths[] = { 0, 1, 7, 1023, 100003 };
    size_t d, o, l;
    int m;

    for (d = 0; d < sizeof(all_dtypes) / sizeof(all_dtypes[0]); d++) {
        for (o = 0; o < sizeof(all_ops) / sizeof(all_ops[0]); o++) {
            for (l = 0; l < sizeof(lengths) / sizeof(lengths[0]); l++) {
                for (m = 0; m < ALIAS_COUNT; m++) {
                    test_reduce_case(all_dtypes[d], all_ops[o], lengths[l], (enum alias)m);
                }
            }
        }
    }
}

/* Every pair of edge values, all dtypes and ops: the corners at once. */
static void
test_edge_pairs(void)
{
    size_t d, o, i, j;

    for (d = 0; d < sizeof(all_dtypes) / sizeof(all_dtypes[0]); d++) {
        pccl_dtype dt = all_dtypes[d];
        size_t es = esize(dt);
        const uint64_t *e;
        size_t ne = edges(dt, &e);
        unsigned char a[8], b[8], out[8];

        for (o = 0; o < sizeof(all_ops) / sizeof(all_ops[0]); o++) {
            for (i = 0; i < ne; i++) {
                for (j = 0; j < ne; j++) {
                    uint64_t got, want = ref_reduce(dt, all_ops[o], e[i], e[j]);
                    store_bits(a, 0, es, e[i]);
                    store_bits(b, 0, es, e[j]);
                    pccl__reduce(out, a, b, 1, dt, all_ops[o]);
                    got = load_bits(out, 0, es);
                    if (!same_result(dt, all_ops[o], got, want)) {
                        fprintf(stderr, "%s op %d: 0x%llx, 0x%llx -> 0x%llx, want 0x%llx\n",
                                dtype_names[dt], (int)all_ops[o],
                                (unsigned long long)e[i], (unsigned long long)e[j],
                                (unsigned long long)got, (unsigned long long)want);
                    }
                    T(same_result(dt, all_ops[o], got, want));
                }
            }
        }
    }
}

/* MIN/MAX documented corners, spelled out. */
static void
test_minmax_rules(void)
{
    float a[4] = { -0.0f, 0.0f, NAN, 1.0f };
    float b[4] = { 0.0f, -0.0f, 1.0f, -NAN };
    float out[4];
    uint32_t nan_a = bits_of_f32(a[2]), nan_b = bits_of_f32(b[3]);

    pccl__reduce(out, a, b, 4, PCCL_FLOAT32, PCCL_MIN);
    T(bits_of_f32(out[0]) == 0x80000000u && bits_of_f32(out[1]) == 0x80000000u);
    T(bits_of_f32(out[2]) == nan_a && bits_of_f32(out[3]) == nan_b);
    pccl__reduce(out, a, b, 4, PCCL_FLOAT32, PCCL_MAX);
    T(bits_of_f32(out[0]) == 0 && bits_of_f32(out[1]) == 0);
    T(bits_of_f32(out[2]) == nan_a && bits_of_f32(out[3]) == nan_b);
    /* both NaN: a's bits */
    a[0] = f32_of(0x7fc00001u);
    b[0] = f32_of(0xffc00002u);
    pccl__reduce(out, a, b, 1, PCCL_FLOAT32, PCCL_MAX);
    T(bits_of_f32(out[0]) == 0x7fc00001u);
}

/* ---- AVG finalize ---------------------------------------------------- */

static uint64_t
ref_divide(pccl_dtype dt, uint64_t x, uint32_t world)
{
    size_t es = esize(dt);

    if (world == 1) {
        return x;
    }
    if (pccl__dtype_is_float(dt)) {
        double v = float_value(dt, x);
        if (dt == PCCL_FLOAT64) {
            return float_bits_of(dt, v / (double)world);
        }
        /* the kernel divides by (float)world in float */
        return float_bits_of(dt, v / (double)(float)world);
    }
    if (is_signed_int(dt)) {
        return (uint64_t)(sign_extend(x, es) / (int64_t)world);
    }
    return x / world;
}

static void
test_avg_finalize(void)
{
    static const uint32_t worlds[] = { 1, 2, 3, 7, 200, 65537, 16777217, UINT32_MAX };
    const size_t n = 1023;
    size_t d, w, i;

    for (d = 0; d < sizeof(all_dtypes) / sizeof(all_dtypes[0]); d++) {
        pccl_dtype dt = all_dtypes[d];
        size_t es = esize(dt);
        unsigned char *buf = malloc(n * es), *orig = malloc(n * es);
        CHECK(buf && orig);
        for (w = 0; w < sizeof(worlds) / sizeof(worlds[0]); w++) {
            fill(orig, n, dt);
            memcpy(buf, orig, n * es);
            pccl__avg_finalize(buf, n, dt, worlds[w]);
            for (i = 0; i < n; i++) {
                uint64_t got = load_bits(buf, i, es);
                uint64_t want = ref_divide(dt, load_bits(orig, i, es), worlds[w]);
                if (!same_result(dt, PCCL_SUM, got, want)) {
                    fprintf(stderr, "avg %s world %u: 0x%llx -> 0x%llx want 0x%llx\n",
                            dtype_names[dt], (unsigned)worlds[w],
                            (unsigned long long)load_bits(orig, i, es),
                            (unsigned long long)got, (unsigned long long)want);
                }
                T(same_result(dt, PCCL_SUM, got, want));
            }
        }
        pccl__avg_finalize(buf, 0, dt, 3); /* n == 0 is a no-op */
        free(buf);
        free(orig);
    }
    {
        int8_t x[3] = { -128, 127, -7 };
        pccl__avg_finalize(x, 3, PCCL_INT8, 2);
        T(x[0] == -64 && x[1] == 63 && x[2] == -3); /* truncation toward 0 */
    }
}

/* ---- cache-bypassing copy -------------------------------------------- */

/* pccl__copy_nt == memcpy for every length class (below the streaming
 * threshold, head, 64-byte body, tail) and every alignment of both ends,
 * and writes nothing outside the destination. */
static void
test_copy_nt(void)
{
    static const size_t lengths[] = { 0, 1, 15, 127, 128, 129, 191, 255, 256, 1000, 4099,
                                      70001 };
    const size_t cap = 70001 + 64;
    uint8_t *src = malloc(cap), *dst = malloc(cap);
    size_t l, sa, da, i;

    T(src != NULL && dst != NULL);
    for (i = 0; i < cap; i++) {
        src[i] = (uint8_t)(rnd() >> 56);
    }
    for (l = 0; l < sizeof(lengths) / sizeof(lengths[0]); l++) {
        for (sa = 0; sa < 17; sa += 3) {
            for (da = 0; da < 17; da++) {
                size_t n = lengths[l];
                memset(dst, 0xa5, cap);
                pccl__copy_nt(dst + 8 + da, src + sa, n);
                pccl__copy_nt_fence();
                T(memcmp(dst + 8 + da, src + sa, n) == 0);
                for (i = 0; i < 8 + da; i++) {
                    T(dst[i] == 0xa5);
                }
                for (i = 8 + da + n; i < cap; i++) {
                    if (dst[i] != 0xa5) {
                        T(dst[i] == 0xa5);
                        break;
                    }
                }
            }
        }
    }
    free(src);
    free(dst);
}

int
main(void)
{
    size_t d;

    for (d = 0; d < sizeof(all_dtypes) / sizeof(all_dtypes[0]); d++) {
        pccl_dtype dt = all_dtypes[d];
        T(pccl__dtype_is_float(dt) == (dt <= PCCL_BFLOAT16));
    }
    test_all_halves();
    test_ties(5, 0x7bff, pccl__float_to_half);
    test_ties(8, 0x7f7f, pccl__float_to_bf16);
    test_narrowing();
    test_minmax_rules();
    test_edge_pairs();
    test_reduce();
    test_avg_finalize();
    test_copy_nt();
    printf("kernels_test: %lu checks passed\n", checks);
    return 0;
}
