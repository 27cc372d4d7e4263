/*
 * kernels.c - element-wise reduce kernels and the 16-bit float conversions.
 *
 * pccl__reduce dispatches once per call on (dtype, op) to a plain counted
 * loop over typed pointers, so gcc/clang -O3 vectorise every combination:
 * no function pointer and no data-dependent branch per element, only
 * selects (ternaries) that become blend instructions.
 *
 * Semantics, chosen so that a result depends on nothing but the operands:
 *  - Integers: SUM/AVG/PROD wrap modulo 2^bits (computed in the unsigned
 *    type, converted back; gcc documents that conversion as modulo).
 *  - float32/float64 SUM/PROD: the IEEE operation in the default rounding
 *    mode.  float16/bfloat16: widen to float (exact), combine in float,
 *    narrow with round-to-nearest-even.  NaN stays NaN (the narrowing sets
 *    the quiet bit so a payload in the dropped bits cannot turn it into
 *    inf), overflow gives inf, subnormals are rounded like everything else.
 *  - MIN/MAX on floating dtypes follow IEEE 754-2019 minimum/maximum: a
 *    NaN operand wins (a's bits if a is NaN, else b's bits), otherwise the
 *    numerically smaller/larger, with -0 < +0.  They work on the bit
 *    patterns through an order-preserving integer key, so no bits are ever
 *    changed (NaN payloads and signalling NaNs pass through), and the
 *    result equals widen-compare-narrow for the 16-bit types.  The result is
 *    commutative except when both operands are NaN.
 *
 * Conversions are branch-free: every case is computed and one is selected.
 * Their float operations never produce a subnormal, and a subnormal float
 * input narrows to zero with or without denormals-are-zero, so they give
 * the same bits on a thread with FTZ/DAZ set (the float arithmetic of the
 * kernels does not: SUM of subnormals flushes there).  The one float
 * addition they use (rounding into the half subnormal range) assumes the
 * default round-to-nearest mode, as does all arithmetic here.
 */
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "coll/kernels.h"

/* Bit casts through memcpy: defined behaviour, compiled to plain moves. */
static inline uint32_t
float_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    return u;
}

static inline float
bits_float(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

/* pick returns a if cond (0 or 1) is 1, else b.  The conversions select
 * with masks rather than ?: because gcc would otherwise sink their float
 * operation into a branch and, with -ftrapping-math (the default), not
 * speculate it back, which stops the loops from vectorising. */
static inline uint32_t
pick(uint32_t cond, uint32_t a, uint32_t b)
{
    uint32_t mask = 0u - cond;
    return (a & mask) | (b & ~mask);
}

static inline float
half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    /* Exponent and mantissa moved to their float positions.  The value is
     * below 2^28, so signed compares (cheaper than unsigned on SSE2) are
     * exact; the same holds for |f| in float_to_half. */
    int32_t body = (int32_t)((uint32_t)(h & 0x7fffu) << 13);
    /* Normal: rebias the exponent from 15 to 127 by adding 112 << 23.
     * inf/NaN (exponent 31) get 112 << 23 once more to reach exponent 255;
     * the payload is kept. */
    uint32_t normal = (uint32_t)body + 0x38000000u +
                      ((0u - (uint32_t)(body >= 0x0f800000)) & 0x38000000u);
    /* Subnormal m * 2^-24: build (1 + m/1024) * 2^-14 and subtract 2^-14;
     * both operands and the (exact) result are normal floats. */
    uint32_t subnormal = float_bits(bits_float((uint32_t)body + 0x38800000u) - 0x1p-14f);
    return bits_float(sign | pick(body < 0x00800000, subnormal, normal));
}

/* The narrowing functions return the 16-bit pattern in a uint32_t; see
 * NARROW_LOOP for why. */
static inline uint32_t
float_to_half(float f)
{
    uint32_t x = float_bits(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7fffffffu;
    int32_t sax = (int32_t)ax;
    /* Half-normal range: rebias, then drop 13 bits rounding to nearest
     * even (add 0xfff plus the lowest kept bit).  A mantissa carry rolls
     * into the exponent, which is right, up to and including inf. */
    uint32_t normal = (ax - 0x38000000u + 0xfffu + ((ax >> 13) & 1u)) >> 13;
    /* Below 2^-14: in 0.5 + |f| the FPU rounds at 2^-24, the half
     * subnormal step, so the low bits are the rounded half mantissa (up to
     * 0x400, the smallest normal, when it rounds up). */
    uint32_t subnormal = float_bits(bits_float(ax) + 0.5f) - 0x3f000000u;
    /* NaN: keep the top payload bits and force the quiet bit. */
    uint32_t nan = 0x7e00u | ((ax >> 13) & 0x3ffu);
    uint32_t out = pick(sax < 0x38800000, subnormal,
                        pick(sax < 0x47800000, normal,
                             sax <= 0x7f800000 ? 0x7c00u : nan));
    return sign | out;
}

static inline float
bf16_to_float(uint16_t b)
{
    return bits_float((uint32_t)b << 16);
}

static inline uint32_t
float_to_bf16(float f)
{
    uint32_t x = float_bits(f);
    /* Round to nearest even on the dropped 16 bits; cannot wrap because
     * the largest non-NaN pattern is 0xff800000. */
    uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
    uint32_t nan = (x >> 16) | 0x0040u;
    return (x & 0x7fffffffu) > 0x7f800000u ? nan : rounded;
}

float
pccl__half_to_float(uint16_t h)
{
    return half_to_float(h);
}

uint16_t
pccl__float_to_half(float f)
{
    return (uint16_t)float_to_half(f);
}

float
pccl__bf16_to_float(uint16_t b)
{
    return bf16_to_float(b);
}

uint16_t
pccl__float_to_bf16(float f)
{
    return (uint16_t)float_to_bf16(f);
}

/*
 * NARROW_LOOP stores out[i] = (uint16_t)(EXPR) for i < n, EXPR a 32-bit
 * narrowing of element i.  It goes through a small uint32_t block: written
 * as one loop, gcc demotes parts of the narrowing to 16-bit lanes and
 * shuffles masks between widths, which on SSE2 costs about a third of the
 * speed.  EXPR reads element i (the caller's size_t i, set here) before
 * the block is stored, so out may still alias an input exactly.
 */
#define NARROW_BLOCK 256
#define NARROW_LOOP(out, n, EXPR)                                             \
    do {                                                                      \
        uint32_t wide_[NARROW_BLOCK];                                         \
        size_t off_, j_;                                                      \
        for (off_ = 0; off_ < (n); off_ += NARROW_BLOCK) {                    \
            size_t m_ = (n) - off_ < NARROW_BLOCK ? (n) - off_ : NARROW_BLOCK;\
            for (j_ = 0; j_ < m_; j_++) {                                     \
                i = off_ + j_;                                                \
                wide_[j_] = (EXPR);                                           \
            }                                                                 \
            for (j_ = 0; j_ < m_; j_++) {                                     \
                (out)[off_ + j_] = (uint16_t)wide_[j_];                       \
            }                                                                 \
        }                                                                     \
    } while (0)

void
pccl__halves_to_float(float *out, const uint16_t *in, size_t n, pccl_dtype dtype)
{
    size_t i;

    if (dtype == PCCL_BFLOAT16) {
        for (i = 0; i < n; i++) {
            out[i] = bf16_to_float(in[i]);
        }
    } else {
        for (i = 0; i < n; i++) {
            out[i] = half_to_float(in[i]);
        }
    }
}

void
pccl__float_to_halves(uint16_t *out, const float *in, size_t n, pccl_dtype dtype)
{
    size_t i;

    if (dtype == PCCL_BFLOAT16) {
        NARROW_LOOP(out, n, float_to_bf16(in[i]));
    } else {
        NARROW_LOOP(out, n, float_to_half(in[i]));
    }
}

int
pccl__dtype_is_float(pccl_dtype dtype)
{
    return dtype == PCCL_FLOAT32 || dtype == PCCL_FLOAT64 ||
           dtype == PCCL_FLOAT16 || dtype == PCCL_BFLOAT16;
}

/*
 * Floating MIN/MAX on bit patterns.  B is the unsigned type of the width,
 * TOP its sign bit, ONES all bits, INF the +inf pattern.  The key flips a
 * negative pattern entirely and sets the sign bit of a positive one, so
 * unsigned key order is numeric order (-0 < +0) for non-NaN values.
 */
#define MINMAX_LOOP(B, TOP, ONES, INF, BETTER)                                \
    for (i = 0; i < n; i++) {                                                 \
        B ua, ub, ka, kb, r;                                                  \
        memcpy(&ua, &a[i], sizeof(ua));                                      \
        memcpy(&ub, &b[i], sizeof(ub));                                      \
        ka = (B)(ua ^ ((ua & (TOP)) ? (ONES) : (TOP)));                       \
        kb = (B)(ub ^ ((ub & (TOP)) ? (ONES) : (TOP)));                       \
        r = (ua & (B) ~(TOP)) > (INF) ? ua                                    \
          : (ub & (B) ~(TOP)) > (INF) ? ub                                    \
          : kb BETTER ka ? ub : ua;                                           \
        memcpy(&out[i], &r, sizeof(r));                                       \
    }

/* The pointers are not restrict: out may equal a or b.  Reading a[i] and
 * b[i] before writing out[i] keeps that exact aliasing correct, and the
 * compilers' runtime overlap checks accept equal pointers. */
#define INT_REDUCE(fname, T, U)                                               \
    static void                                                               \
    fname(T *out, const T *a, const T *b, size_t n, pccl_op op)               \
    {                                                                         \
        size_t i;                                                             \
        switch (op) {                                                         \
        case PCCL_SUM:                                                        \
        case PCCL_AVG:                                                        \
            for (i = 0; i < n; i++) {                                         \
                out[i] = (T)((U)a[i] + (U)b[i]);                              \
            }                                                                 \
            break;                                                            \
        case PCCL_PROD:                                                       \
            for (i = 0; i < n; i++) {                                         \
                out[i] = (T)((U)a[i] * (U)b[i]);                              \
            }                                                                 \
            break;                                                            \
        case PCCL_MIN:                                                        \
            for (i = 0; i < n; i++) {                                         \
                out[i] = a[i] < b[i] ? a[i] : b[i];                           \
            }                                                                 \
            break;                                                            \
        case PCCL_MAX:                                                        \
            for (i = 0; i < n; i++) {                                         \
                out[i] = a[i] > b[i] ? a[i] : b[i];                           \
            }                                                                 \
            break;                                                            \
        default:                                                              \
            break;                                                            \
        }                                                                     \
    }

/* The unsigned type must not promote to int, or 16-bit products could
 * overflow int; unsigned int covers the 8- and 16-bit types. */
INT_REDUCE(reduce_i8, int8_t, unsigned int)
INT_REDUCE(reduce_i16, int16_t, unsigned int)
INT_REDUCE(reduce_i32, int32_t, uint32_t)
INT_REDUCE(reduce_i64, int64_t, uint64_t)
INT_REDUCE(reduce_u8, uint8_t, unsigned int)

#define FLOAT_REDUCE(fname, T, B, TOP, ONES, INF)                             \
    static void                                                               \
    fname(T *out, const T *a, const T *b, size_t n, pccl_op op)               \
    {                                                                         \
        size_t i;                                                             \
        switch (op) {                                                         \
        case PCCL_SUM:                                                        \
        case PCCL_AVG:                                                        \
            for (i = 0; i < n; i++) {                                         \
                out[i] = a[i] + b[i];                                         \
            }                                                                 \
            break;                                                            \
        case PCCL_PROD:                                                       \
            for (i = 0; i < n; i++) {                                         \
                out[i] = a[i] * b[i];                                         \
            }                                                                 \
            break;                                                            \
        case PCCL_MIN:                                                        \
            MINMAX_LOOP(B, TOP, ONES, INF, <)                                 \
            break;                                                            \
        case PCCL_MAX:                                                        \
            MINMAX_LOOP(B, TOP, ONES, INF, >)                                 \
            break;                                                            \
        default:                                                              \
            break;                                                            \
        }                                                                     \
    }

FLOAT_REDUCE(reduce_f32, float, uint32_t, 0x80000000u, 0xffffffffu, 0x7f800000u)
FLOAT_REDUCE(reduce_f64, double, uint64_t, UINT64_C(0x8000000000000000),
             UINT64_C(0xffffffffffffffff), UINT64_C(0x7ff0000000000000))

/* 16-bit floats: WIDEN/NARROW are the conversions above; INF the +inf
 * pattern (MIN/MAX never convert). */
#define HALF_REDUCE(fname, WIDEN, NARROW, INF)                                \
    static void                                                               \
    fname(uint16_t *out, const uint16_t *a, const uint16_t *b, size_t n,      \
          pccl_op op)                                                         \
    {                                                                         \
        size_t i;                                                             \
        switch (op) {                                                         \
        case PCCL_SUM:                                                        \
        case PCCL_AVG:                                                        \
            NARROW_LOOP(out, n, NARROW(WIDEN(a[i]) + WIDEN(b[i])));           \
            break;                                                            \
        case PCCL_PROD:                                                       \
            NARROW_LOOP(out, n, NARROW(WIDEN(a[i]) * WIDEN(b[i])));           \
            break;                                                            \
        case PCCL_MIN:                                                        \
            MINMAX_LOOP(uint16_t, 0x8000u, 0xffffu, INF, <)                   \
            break;                                                            \
        case PCCL_MAX:                                                        \
            MINMAX_LOOP(uint16_t, 0x8000u, 0xffffu, INF, >)                   \
            break;                                                            \
        default:                                                              \
            break;                                                            \
        }                                                                     \
    }

HALF_REDUCE(reduce_f16, half_to_float, float_to_half, 0x7c00u)
HALF_REDUCE(reduce_bf16, bf16_to_float, float_to_bf16, 0x7f80u)

void
pccl__reduce(void *out, const void *a, const void *b, size_t n,
             pccl_dtype dtype, pccl_op op)
{
    switch (dtype) {
    case PCCL_FLOAT32:
        reduce_f32(out, a, b, n, op);
        break;
    case PCCL_FLOAT64:
        reduce_f64(out, a, b, n, op);
        break;
    case PCCL_FLOAT16:
        reduce_f16(out, a, b, n, op);
        break;
    case PCCL_BFLOAT16:
        reduce_bf16(out, a, b, n, op);
        break;
    case PCCL_INT8:
        reduce_i8(out, a, b, n, op);
        break;
    case PCCL_INT16:
        reduce_i16(out, a, b, n, op);
        break;
    case PCCL_INT32:
        reduce_i32(out, a, b, n, op);
        break;
    case PCCL_INT64:
        reduce_i64(out, a, b, n, op);
        break;
    case PCCL_UINT8:
        reduce_u8(out, a, b, n, op);
        break;
    default:
        break;
    }
}

/* Signed integers divide in int64_t: world may not fit the element type
 * (int8_t and world 200), and int64 / (int64)world cannot overflow since
 * world >= 1. */
#define INT_DIVIDE(T, WIDE)                                                   \
    do {                                                                      \
        T *x = buf;                                                           \
        for (i = 0; i < n; i++) {                                             \
            x[i] = (T)((WIDE)x[i] / (WIDE)world);                             \
        }                                                                     \
    } while (0)

void
pccl__avg_finalize(void *buf, size_t n, pccl_dtype dtype, uint32_t world)
{
    size_t i;

    /* Dividing by one changes nothing except quieting signalling NaNs;
     * skipping it is cheaper and every peer skips alike. */
    if (world <= 1) {
        return;
    }
    switch (dtype) {
    case PCCL_FLOAT32: {
        float *x = buf;
        float w = (float)world;
        for (i = 0; i < n; i++) {
            x[i] = x[i] / w;
        }
        break;
    }
    case PCCL_FLOAT64: {
        double *x = buf;
        double w = (double)world;
        for (i = 0; i < n; i++) {
            x[i] = x[i] / w;
        }
        break;
    }
    case PCCL_FLOAT16: {
        uint16_t *x = buf;
        float w = (float)world;
        NARROW_LOOP(x, n, float_to_half(half_to_float(x[i]) / w));
        break;
    }
    case PCCL_BFLOAT16: {
        uint16_t *x = buf;
        float w = (float)world;
        NARROW_LOOP(x, n, float_to_bf16(bf16_to_float(x[i]) / w));
        break;
    }
    case PCCL_INT8:
        INT_DIVIDE(int8_t, int64_t);
        break;
    case PCCL_INT16:
        INT_DIVIDE(int16_t, int64_t);
        break;
    case PCCL_INT32:
        INT_DIVIDE(int32_t, int64_t);
        break;
    case PCCL_INT64:
        INT_DIVIDE(int64_t, int64_t);
        break;
    case PCCL_UINT8:
        INT_DIVIDE(uint8_t, uint32_t);
        break;
    default:
        break;
    }
}

/* ---- cache-bypassing copy -------------------------------------------- */

void
pccl__copy_nt(void *to, const void *from, size_t len)
{
#if defined(__SSE2__)
    uint8_t *d = to;
    const uint8_t *s = from;
    size_t head = (16u - ((uintptr_t)d & 15u)) & 15u;

    if (len < 128) {
        memcpy(to, from, len);
        return;
    }
    memcpy(d, s, head);         /* up to the first 16-byte boundary of to */
    d += head;
    s += head;
    len -= head;
    for (; len >= 64; d += 64, s += 64, len -= 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(const void *)s);
        __m128i b = _mm_loadu_si128((const __m128i *)(const void *)(s + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(const void *)(s + 32));
        __m128i e = _mm_loadu_si128((const __m128i *)(const void *)(s + 48));
        _mm_stream_si128((__m128i *)(void *)d, a);
        _mm_stream_si128((__m128i *)(void *)(d + 16), b);
        _mm_stream_si128((__m128i *)(void *)(d + 32), c);
        _mm_stream_si128((__m128i *)(void *)(d + 48), e);
    }
    memcpy(d, s, len);
#else
    memcpy(to, from, len);
#endif
}

void
pccl__copy_nt_fence(void)
{
#if defined(__SSE2__)
    _mm_sfence();
#endif
}
