/*
 * quant.c - min-max uint8 quantization of one slice (see quant.h).
 *
 * Exact rules, all pure functions of the input bits:
 *  - min and max are taken over the finite elements only, as a total order
 *    on the bit patterns (-0 < +0), so they do not depend on the order of
 *    the scan.  A slice without finite elements has min = max = +0.
 *  - scale = (max - min) / 255: computed in double and rounded once to
 *    float for FLOAT32/FLOAT16/BFLOAT16 (a float range wider than FLT_MAX
 *    cannot overflow); in double for FLOAT64, where a range that overflows
 *    double is taken as max/255 - min/255.  qmin/qscale hold the float
 *    values exactly for the float dtypes.
 *  - q = round((x - min) / scale) computed in float (double for FLOAT64);
 *    the quotient is clamped to [0, 255] before rounding, with NaN -> 0,
 *    -inf -> 0, +inf -> 255.  Rounding is half to even, done by adding and
 *    subtracting 2^23 (2^52), which relies on the default rounding mode.
 *    scale == 0 (max == min, or a range too small to scale) gives q = 0.
 *  - dequant = min + q * scale in float (double for FLOAT64), narrowed to
 *    the dtype with round-to-nearest-even; scale == 0 gives min itself (so
 *    a constant -0 slice stays -0).  A slice whose range exceeds the
 *    largest finite value may dequantize its top to inf.
 *  - Quantization is not idempotent in general: dequant(quant(x)) need not
 *    quantize to the same (min, scale) again.  Nothing relies on it.
 *
 * Integer dtypes are never passed here (the caller rejects them); the
 * functions do nothing for them.  FLOAT16/BFLOAT16 data are widened and
 * narrowed in blocks through the kernels' vectorised conversions.
 *
 * No multiply-add here may be fused into an FMA: peers built for different
 * CPUs must produce the same bits.  ISO C mode (-std=c99) already sets
 * -ffp-contract=off for gcc; clang needs the pragma.
 */
#include <float.h>
#include <math.h>
#include <string.h>

#include "coll/kernels.h"
#include "coll/quant.h"

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

/* Elements per block when 16-bit floats go through a float buffer. */
#define BLOCK 1024

/*
 * Order keys: unsigned order of the key equals numeric order of non-NaN
 * values, -0 below +0 (a negative pattern is flipped entirely, a positive
 * one gets its sign bit set).  Finite keys are never 0 or all-ones, which
 * therefore serve as the neutral starts of the max and min scans.
 */
#define KEY_BITS(k, TOP, ONES) (((k) & (TOP)) ? ((k) ^ (TOP)) : ((k) ^ (ONES)))

/* KEY_RANGE scans n elements of the W-bit unsigned type B at src for the
 * finite key range [*lo, *hi]; lo > hi afterwards when nothing is finite.
 * Non-finite elements are pushed to the neutral values with masks, not
 * ?:, so gcc sees two plain min/max reductions and vectorises them. */
#define KEY_RANGE(B, W, INF, src, n, lo, hi)                                 \
    do {                                                                     \
        const B top_ = (B)((B)1 << ((W) - 1));                               \
        const unsigned char *p_ = (const unsigned char *)(src);              \
        B lo_ = (B)~(B)0, hi_ = 0;                                           \
        size_t i_;                                                           \
        for (i_ = 0; i_ < (n); i_++) {                                       \
            B u_, k_, bad_, kl_, kh_;                                        \
            memcpy(&u_, p_ + i_ * sizeof(B), sizeof(B));                     \
            k_ = (B)(u_ ^ ((B)(0u - (B)(u_ >> ((W) - 1))) | top_));          \
            bad_ = (B)(0u - (B)((B)(u_ & (B)~top_) >= (INF)));               \
            kl_ = (B)(k_ | bad_);                                            \
            kh_ = (B)(k_ & (B)~bad_);                                        \
            lo_ = kl_ < lo_ ? kl_ : lo_;                                     \
            hi_ = kh_ > hi_ ? kh_ : hi_;                                     \
        }                                                                    \
        *(lo) = lo_;                                                         \
        *(hi) = hi_;                                                         \
    } while (0)

static float
float_of_bits(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

static double
double_of_bits(uint64_t u)
{
    double d;
    memcpy(&d, &u, sizeof(d));
    return d;
}

/* qmin/qscale come from the wire as doubles; converting a double outside
 * float's range is undefined in C, so saturate first.  Exact for values
 * we produced ourselves. */
static float
float_of_double(double d)
{
    if (d > FLT_MAX) {
        return INFINITY;
    }
    if (d < -FLT_MAX) {
        return -INFINITY;
    }
    return (float)d;
}

/* scale for float dtypes; see the top comment. */
static float
float_scale(float mn, float mx)
{
    return (float)(((double)mx - (double)mn) / 255.0);
}

static void
quantize_f32(const float *x, size_t n, float mn, float scale, uint8_t *q)
{
    size_t i;

    if (scale == 0.0f) {
        memset(q, 0, n);
        return;
    }
    for (i = 0; i < n; i++) {
        float v = (x[i] - mn) / scale;
        uint32_t u, c;
        /* Clamp to [0, 255] on the bits so that the conversion below is
         * always defined.  Float compares would block vectorisation (they
         * may trap on NaN); on the bits, every negative pattern and +NaN
         * compare above +inf and go to 0, everything else is clamped to
         * 255.0f (0x437f0000) by an unsigned min. */
        memcpy(&u, &v, sizeof(u));
        c = u < 0x437f0000u ? u : 0x437f0000u;
        c &= ~(0u - (uint32_t)(u > 0x7f800000u));
        memcpy(&v, &c, sizeof(v));
        /* Adding 2^23 leaves no fraction bits, so the FPU rounds to an
         * integer (half to even); subtracting it again is exact. */
        v = v + 0x1p23f;
        v = v - 0x1p23f;
        q[i] = (uint8_t)(int32_t)v;
    }
}

static void
quantize_f64(const double *x, size_t n, double mn, double scale, uint8_t *q)
{
    size_t i;

    if (scale == 0.0) {
        memset(q, 0, n);
        return;
    }
    for (i = 0; i < n; i++) {
        double v = (x[i] - mn) / scale;
        uint64_t u, c;
        const uint64_t max = UINT64_C(0x406fe00000000000); /* 255.0 */
        memcpy(&u, &v, sizeof(u));
        c = u < max ? u : max;
        c &= ~(0u - (uint64_t)(u > UINT64_C(0x7ff0000000000000)));
        memcpy(&v, &c, sizeof(v));
        v = v + 0x1p52;
        v = v - 0x1p52;
        q[i] = (uint8_t)(int32_t)v;
    }
}

static void
dequant_f32(const uint8_t *q, size_t n, float mn, float scale, float *out)
{
    size_t i;

    if (scale == 0.0f) {
        for (i = 0; i < n; i++) {
            out[i] = mn;
        }
        return;
    }
    for (i = 0; i < n; i++) {
        out[i] = mn + (float)q[i] * scale;
    }
}

static void
dequant_f64(const uint8_t *q, size_t n, double mn, double scale, double *out)
{
    size_t i;

    if (scale == 0.0) {
        for (i = 0; i < n; i++) {
            out[i] = mn;
        }
        return;
    }
    for (i = 0; i < n; i++) {
        out[i] = mn + (double)q[i] * scale;
    }
}

void
pccl__quant_minmax(const void *src, size_t n, pccl_dtype dtype,
                   uint8_t *q, double *qmin, double *qscale)
{
    switch (dtype) {
    case PCCL_FLOAT32: {
        uint32_t lo, hi;
        float mn = 0.0f, mx = 0.0f, scale;
        KEY_RANGE(uint32_t, 32, 0x7f800000u, src, n, &lo, &hi);
        if (lo <= hi) {
            mn = float_of_bits(KEY_BITS(lo, 0x80000000u, 0xffffffffu));
            mx = float_of_bits(KEY_BITS(hi, 0x80000000u, 0xffffffffu));
        }
        scale = float_scale(mn, mx);
        quantize_f32(src, n, mn, scale, q);
        *qmin = mn;
        *qscale = scale;
        break;
    }
    case PCCL_FLOAT64: {
        const uint64_t top = UINT64_C(0x8000000000000000);
        const uint64_t ones = UINT64_C(0xffffffffffffffff);
        uint64_t lo, hi;
        double mn = 0.0, mx = 0.0, range, scale;
        KEY_RANGE(uint64_t, 64, UINT64_C(0x7ff0000000000000), src, n, &lo, &hi);
        if (lo <= hi) {
            mn = double_of_bits(KEY_BITS(lo, top, ones));
            mx = double_of_bits(KEY_BITS(hi, top, ones));
        }
        range = mx - mn;
        /* range - range is NaN only when range overflowed to inf. */
        scale = range - range == 0.0 ? range / 255.0 : mx / 255.0 - mn / 255.0;
        quantize_f64(src, n, mn, scale, q);
        *qmin = mn;
        *qscale = scale;
        break;
    }
    case PCCL_FLOAT16:
    case PCCL_BFLOAT16: {
        const uint16_t *x = src;
        uint16_t lo, hi, inf = dtype == PCCL_FLOAT16 ? 0x7c00u : 0x7f80u;
        float mn = 0.0f, mx = 0.0f, scale, buf[BLOCK];
        size_t off;
        KEY_RANGE(uint16_t, 16, inf, src, n, &lo, &hi);
        if (lo <= hi) {
            uint16_t bmn = (uint16_t)KEY_BITS(lo, 0x8000u, 0xffffu);
            uint16_t bmx = (uint16_t)KEY_BITS(hi, 0x8000u, 0xffffu);
            mn = dtype == PCCL_FLOAT16 ? pccl__half_to_float(bmn) : pccl__bf16_to_float(bmn);
            mx = dtype == PCCL_FLOAT16 ? pccl__half_to_float(bmx) : pccl__bf16_to_float(bmx);
        }
        scale = float_scale(mn, mx);
        for (off = 0; off < n; off += BLOCK) {
            size_t m = n - off < BLOCK ? n - off : BLOCK;
            pccl__halves_to_float(buf, x + off, m, dtype);
            quantize_f32(buf, m, mn, scale, q + off);
        }
        *qmin = mn;
        *qscale = scale;
        break;
    }
    default:
        /* Integer dtypes are rejected by the caller. */
        break;
    }
}

void
pccl__dequant(const uint8_t *q, size_t n, double qmin, double qscale,
              pccl_dtype dtype, void *out)
{
    switch (dtype) {
    case PCCL_FLOAT32:
        dequant_f32(q, n, float_of_double(qmin), float_of_double(qscale), out);
        break;
    case PCCL_FLOAT64:
        dequant_f64(q, n, qmin, qscale, out);
        break;
    case PCCL_FLOAT16:
    case PCCL_BFLOAT16: {
        uint16_t *x = out;
        float mn = float_of_double(qmin), scale = float_of_double(qscale);
        float buf[BLOCK];
        size_t off;
        for (off = 0; off < n; off += BLOCK) {
            size_t m = n - off < BLOCK ? n - off : BLOCK;
            dequant_f32(q + off, m, mn, scale, buf);
            pccl__float_to_halves(x + off, buf, m, dtype);
        }
        break;
    }
    default:
        break;
    }
}

void
pccl__dequant_reduce(void *out, const uint8_t *q, const void *local, size_t n,
                     double qmin, double qscale, pccl_dtype dtype, pccl_op op)
{
    /* Literally dequant into a cache-resident temporary and reduce, block
     * by block: bit-identity with the unfused form holds by construction,
     * and the extra pass stays in L1. */
    union {
        double f64[BLOCK / 2];
        float f32[BLOCK];
        uint16_t f16[2 * BLOCK];
    } tmp;
    void *t;
    size_t esize, per_block, off;

    switch (dtype) {
    case PCCL_FLOAT32:
        t = tmp.f32;
        break;
    case PCCL_FLOAT64:
        t = tmp.f64;
        break;
    case PCCL_FLOAT16:
    case PCCL_BFLOAT16:
        t = tmp.f16;
        break;
    default:
        return;
    }
    (void)pccl_dtype_size(dtype, &esize);
    per_block = sizeof(tmp) / esize;
    for (off = 0; off < n; off += per_block) {
        size_t m = n - off < per_block ? n - off : per_block;
        pccl__dequant(q + off, m, qmin, qscale, dtype, t);
        pccl__reduce((unsigned char *)out + off * esize, t,
                     (const unsigned char *)local + off * esize, m, dtype, op);
    }
}
