/*
 * quant_test.c - min-max uint8 quantization: error bound, determinism,
 * rounding, constant and non-finite slices, and the promise that
 * pccl__dequant_reduce equals pccl__dequant followed by pccl__reduce bit
 * for bit.
 *
 * Every floating dtype runs over slices of length 0, 1, 7, 1023 and 100003
 * of several kinds: ordinary values at various offsets and scales, a
 * constant, values with NaN and inf mixed in, nothing finite at all, the
 * full finite range, and subnormals only.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coll/kernels.h"
#include "coll/quant.h"
#include "pccl.h"
#include "testutil.h"

TEST_RNG(splitmix64, 0x243f6a8885a308d3u)

static const pccl_dtype fdtypes[] = { PCCL_FLOAT32, PCCL_FLOAT64, PCCL_FLOAT16, PCCL_BFLOAT16 };
static const char *const names[] = { "float32", "float64", "float16", "bfloat16" };
static const pccl_op all_ops[] = { PCCL_SUM, PCCL_AVG, PCCL_MIN, PCCL_MAX, PCCL_PROD };

enum kind { K_NORMAL, K_CONST, K_SPECIAL, K_NOFINITE, K_HUGE, K_TINY, K_COUNT };

static size_t
esize(pccl_dtype dt)
{
    size_t s = 0;
    CHECK_OK(pccl_dtype_size(dt, &s));
    return s;
}

/* Element i of a floating array as a double (exact for every dtype). */
static double
get(const void *p, size_t i, pccl_dtype dt)
{
    switch (dt) {
    case PCCL_FLOAT32: return ((const float *)p)[i];
    case PCCL_FLOAT64: return ((const double *)p)[i];
    case PCCL_FLOAT16: return pccl__half_to_float(((const uint16_t *)p)[i]);
    default: return pccl__bf16_to_float(((const uint16_t *)p)[i]);
    }
}

/* Stores v rounded to dt; v must be a float value unless dt is FLOAT64. */
static void
put(void *p, size_t i, pccl_dtype dt, double v)
{
    switch (dt) {
    case PCCL_FLOAT32: ((float *)p)[i] = (float)v; break;
    case PCCL_FLOAT64: ((double *)p)[i] = v; break;
    case PCCL_FLOAT16: ((uint16_t *)p)[i] = pccl__float_to_half((float)v); break;
    default: ((uint16_t *)p)[i] = pccl__float_to_bf16((float)v); break;
    }
}

static double
max_finite(pccl_dtype dt)
{
    switch (dt) {
    case PCCL_FLOAT32: return FLT_MAX;
    case PCCL_FLOAT64: return DBL_MAX;
    case PCCL_FLOAT16: return 65504.0;
    default: return 0x1.fep127;
    }
}

static double
min_subnormal(pccl_dtype dt)
{
    switch (dt) {
    case PCCL_FLOAT32: return 0x1p-149;
    case PCCL_FLOAT64: return 0x1p-1074;
    case PCCL_FLOAT16: return 0x1p-24;
    default: return 0x1p-133;
    }
}

static double
min_normal(pccl_dtype dt)
{
    switch (dt) {
    case PCCL_FLOAT32: return FLT_MIN;
    case PCCL_FLOAT64: return DBL_MIN;
    case PCCL_FLOAT16: return 0x1p-14;
    default: return FLT_MIN;
    }
}

static void
generate(void *x, size_t n, pccl_dtype dt, enum kind k)
{
    static const double offsets[] = { 0.0, 0.0, 0.0, 100.0, -5.0 };
    static const double ranges[] = { 1.0, 1e-3, 1e4, 1.0, 0.01 };
    size_t i, which = rnd() % 5;
    double big = max_finite(dt), c;

    switch (k) {
    case K_NORMAL:
        for (i = 0; i < n; i++) {
            double r = dt == PCCL_FLOAT16 && which == 2 ? 1e3 : ranges[which];
            put(x, i, dt, (float)(offsets[which] + rnd_real(r)));
        }
        break;
    case K_CONST: {
        const double cs[] = { 0.0, -0.0, 3.5, -1e-3, min_subnormal(dt), big, -big };
        c = cs[rnd() % 7];
        for (i = 0; i < n; i++) {
            put(x, i, dt, c);
        }
        break;
    }
    case K_SPECIAL:
    case K_NOFINITE:
        for (i = 0; i < n; i++) {
            uint64_t r = rnd() % 20;
            double v = r < 3 ? (r == 2 ? -NAN : NAN)
                     : r < 5 ? INFINITY : r < 7 ? -INFINITY
                     : k == K_NOFINITE ? NAN : (float)rnd_real(2.0);
            put(x, i, dt, v);
        }
        break;
    case K_HUGE:
        for (i = 0; i < n; i++) {
            double v = i == 0 ? big : i == 1 ? -big : rnd_real(1.0) * big;
            put(x, i, dt, dt == PCCL_FLOAT64 ? v : (float)v);
        }
        break;
    default: /* K_TINY: subnormals only */
        for (i = 0; i < n; i++) {
            double v = rnd_real(min_normal(dt));
            put(x, i, dt, dt == PCCL_FLOAT64 ? v : (float)v);
        }
        break;
    }
}

/* Tolerance beyond scale/2: a few roundings relative to the largest
 * magnitude (the output rounding dominates for the 16-bit types), a
 * little of the scale for the quotient's rounding, and an absolute floor
 * for subnormal scales. */
static double
tolerance(pccl_dtype dt, double maxabs, double scale)
{
    switch (dt) {
    case PCCL_FLOAT32: return 0x1p-21 * maxabs + 0x1p-12 * scale + 0x1p-140;
    case PCCL_FLOAT64: return 0x1p-50 * maxabs + 0x1p-40 * scale + 0x1p-1066;
    case PCCL_FLOAT16: return 0x1p-10 * maxabs + 0x1p-12 * scale + 0x1p-24;
    default: return 0x1p-7 * maxabs + 0x1p-12 * scale + 0x1p-132;
    }
}

static unsigned long parity_slices, parity_bytes_same, parity_meta_same;

static void
test_slice(pccl_dtype dt, size_t n, enum kind k)
{
    size_t es = esize(dt), bytes = n * es + 8, i, o;
    void *x = malloc(bytes), *y = malloc(bytes), *y2 = malloc(bytes);
    void *local = malloc(bytes), *want = malloc(bytes), *got = malloc(bytes);
    uint8_t *q = malloc(n + 1), *q2 = malloc(n + 1);
    double qmin, qscale, qmin2, qscale2, lo = INFINITY, hi = -INFINITY;
    int all_finite = 1;

    CHECK(x && y && y2 && local && want && got && q && q2);
    generate(x, n, dt, k);
    pccl__quant_minmax(x, n, dt, q, &qmin, &qscale);
    pccl__quant_minmax(x, n, dt, q2, &qmin2, &qscale2);
    /* Deterministic: same bytes and same metadata bits. */
    T(memcmp(q, q2, n) == 0);
    T(memcmp(&qmin, &qmin2, sizeof(qmin)) == 0);
    T(memcmp(&qscale, &qscale2, sizeof(qscale)) == 0);
    T(isfinite(qmin) && isfinite(qscale) && qscale >= 0.0);
    if (dt != PCCL_FLOAT64) {
        /* metadata holds float values exactly */
        T(fabs(qmin) <= FLT_MAX && (double)(float)qmin == qmin);
        T(qscale <= FLT_MAX && (double)(float)qscale == qscale);
    }

    pccl__dequant(q, n, qmin, qscale, dt, y);
    pccl__dequant(q, n, qmin, qscale, dt, y2);
    T(memcmp(y, y2, n * es) == 0);

    for (i = 0; i < n; i++) {
        double v = get(x, i, dt);
        if (isfinite(v)) {
            lo = v < lo ? v : lo;
            hi = v > hi ? v : hi;
        } else {
            all_finite = 0;
        }
    }
    if (lo > hi) {
        /* nothing finite: the rule gives min = scale = 0 */
        T(qmin == 0.0 && qscale == 0.0);
    } else {
        T(qmin == lo);
    }
    for (i = 0; i < n; i++) {
        double v = get(x, i, dt), d = get(y, i, dt);
        if (isnan(v) || v == -INFINITY || qscale == 0.0) {
            T(q[i] == 0);
        } else if (v == INFINITY) {
            T(q[i] == 255);
        } else if (k != K_HUGE || dt == PCCL_FLOAT16) {
            /* Error bound; a range wider than the largest finite value
             * (K_HUGE) may dequantize its top to inf, see quant.c. */
            double maxabs = fmax(fabs(lo), fabs(hi));
            double bound = qscale / 2 + tolerance(dt, maxabs, qscale);
            if (!(fabs(d - v) <= bound)) {
                fprintf(stderr, "%s kind %d n %zu [%zu]: x %a -> q %u -> %a (min %a scale %a)\n",
                        names[dt], (int)k, n, i, v, q[i], d, qmin, qscale);
            }
            T(fabs(d - v) <= bound);
        }
    }
    if (k == K_CONST) {
        /* A constant slice comes back bit-exact, -0 included. */
        T(memcmp(x, y, n * es) == 0);
    }

    /* dequant_reduce == dequant + reduce, for every op, out separate and
     * out == local. */
    for (o = 0; o < sizeof(all_ops) / sizeof(all_ops[0]); o++) {
        generate(local, n, dt, (rnd() & 1) ? K_SPECIAL : K_NORMAL);
        pccl__reduce(want, y, local, n, dt, all_ops[o]);
        memset(got, 0x77, bytes);
        pccl__dequant_reduce(got, q, local, n, qmin, qscale, dt, all_ops[o]);
        T(memcmp(got, want, n * es) == 0);
        T(((unsigned char *)got)[n * es] == 0x77);
        pccl__dequant_reduce(local, q, local, n, qmin, qscale, dt, all_ops[o]);
        T(memcmp(local, want, n * es) == 0);
    }

    /* Quantizing the dequantized slice again: measured, not asserted (it
     * is not guaranteed, see quant.c). */
    if (all_finite && k == K_NORMAL && n > 1) {
        pccl__quant_minmax(y, n, dt, q2, &qmin2, &qscale2);
        parity_slices++;
        parity_bytes_same += memcmp(q, q2, n) == 0;
        parity_meta_same += qmin == qmin2 && qscale == qscale2;
    }
    free(x);
    free(y);
    free(y2);
    free(local);
    free(want);
    free(got);
    free(q);
    free(q2);
}

/* scale is exactly 1 for a slice spanning [0, 255]: check rounding half to
 * even and the exact results. */
static void
test_rounding(void)
{
    static const double xs[] = { 0.0, 255.0, 0.5, 1.5, 2.5, 254.5, 127.5, 3.25, 200.75 };
    static const uint8_t want[] = { 0, 255, 0, 2, 2, 254, 128, 3, 201 };
    const size_t n = sizeof(xs) / sizeof(xs[0]);
    size_t d, i;

    for (d = 0; d < 3; d++) { /* bfloat16 cannot hold 254.5 */
        pccl_dtype dt = fdtypes[d];
        void *x = malloc(16 * 8), *y = malloc(16 * 8);
        double qmin, qscale;
        uint8_t q[16];
        CHECK(x && y);
        for (i = 0; i < n; i++) {
            put(x, i, dt, xs[i]);
        }
        pccl__quant_minmax(x, n, dt, q, &qmin, &qscale);
        T(qmin == 0.0 && qscale == 1.0);
        for (i = 0; i < n; i++) {
            T(q[i] == want[i]);
        }
        pccl__dequant(q, n, qmin, qscale, dt, y);
        for (i = 0; i < n; i++) {
            T(get(y, i, dt) == (double)want[i]);
        }
        free(x);
        free(y);
    }
}

/* Metadata from the wire outside float range must not be undefined
 * behaviour (the sanitizer build would abort) and must decode the same
 * way every time. */
static void
test_wild_metadata(void)
{
    static const double metas[][2] = {
        { 1e300, 1e300 }, { -1e300, 1e-300 }, { 0.0, 1e300 }, { 1e-300, 1e300 },
        { -DBL_MAX, DBL_MAX },
    };
    uint8_t q[4] = { 0, 1, 128, 255 };
    size_t d, m;

    for (d = 0; d < sizeof(fdtypes) / sizeof(fdtypes[0]); d++) {
        for (m = 0; m < sizeof(metas) / sizeof(metas[0]); m++) {
            void *a = calloc(4, 8), *b = malloc(4 * 8);
            CHECK(a && b);
            memset(b, 0xff, 4 * 8);
            pccl__dequant(q, 4, metas[m][0], metas[m][1], fdtypes[d], a);
            pccl__dequant(q, 4, metas[m][0], metas[m][1], fdtypes[d], b);
            T(memcmp(a, b, 4 * esize(fdtypes[d])) == 0);
            free(a);
            free(b);
        }
    }
    {
        /* scale that underflows float: every element is min */
        uint16_t h[4];
        pccl__dequant(q, 4, -1e300, 1e-300, PCCL_FLOAT16, h);
        T(h[0] == 0xfc00 && h[3] == 0xfc00);
    }
}

int
main(void)
{
    static const size_t lengths[] = { 0, 1, 7, 1023, 100003 };
    size_t d, l;
    int k, rep;

    test_rounding();
    test_wild_metadata();
    for (d = 0; d < sizeof(fdtypes) / sizeof(fdtypes[0]); d++) {
        for (l = 0; l < sizeof(lengths) / sizeof(lengths[0]); l++) {
            for (k = 0; k < K_COUNT; k++) {
                for (rep = 0; rep < 3; rep++) {
                    test_slice(fdtypes[d], lengths[l], (enum kind)k);
                }
            }
        }
    }
    printf("quant_test: %lu checks passed (re-quantizing a dequantized slice: "
           "same bytes %lu/%lu, same min/scale %lu/%lu)\n",
           checks, parity_bytes_same, parity_slices, parity_meta_same, parity_slices);
    return 0;
}
