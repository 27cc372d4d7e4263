/*
 * testutil.h - a tiny assertion kit for the C tests.  Each test file is
 * one executable registered with CTest; a failed check prints where and
 * exits non-zero.
 */
#ifndef PCCL_TESTUTIL_H
#define PCCL_TESTUTIL_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define CHECK(cond)                                                        \
    do {                                                                   \
        if (!(cond)) {                                                     \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__,         \
                    __LINE__, #cond);                                      \
            exit(1);                                                       \
        }                                                                  \
    } while (0)

#define CHECK_RV(expr, want)                                               \
    do {                                                                   \
        int rv_ = (expr);                                                  \
        if (rv_ != (want)) {                                               \
            fprintf(stderr, "%s:%d: %s returned %d (%s), wanted %d\n",     \
                    __FILE__, __LINE__, #expr, rv_, pccl_strerror(rv_),    \
                    (int)(want));                                          \
            exit(1);                                                       \
        }                                                                  \
    } while (0)

#define CHECK_OK(expr) CHECK_RV(expr, PCCL_OK)

/* Counted checks: CHECK and CHECK_RV that also count in the including
 * file's `checks` (which TEST_RNG below defines). */
#define T(cond)                                                            \
    do {                                                                   \
        CHECK(cond);                                                       \
        checks++;                                                          \
    } while (0)
#define T_RV(expr, want)                                                   \
    do {                                                                   \
        CHECK_RV(expr, want);                                              \
        checks++;                                                          \
    } while (0)

/* Seedable generators for test data, deterministic so a failure
 * reproduces; each test file keeps its own state. */

/* xorshift64* */
static inline uint64_t
xorshift64s(uint64_t *state)
{
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return *state * 0x2545f4914f6cdd1dull;
}

/* splitmix64 */
static inline uint64_t
splitmix64(uint64_t *state)
{
    uint64_t z = (*state += UINT64_C(0x9e3779b97f4a7c15));
    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    return z ^ (z >> 31);
}

/* Uniform double in [-r, r) from 64 random bits. */
static inline double
real_of_bits(uint64_t bits, double r)
{
    return ((double)(bits >> 11) * 0x1p-53 * 2.0 - 1.0) * r;
}

/* A randomised test file's `checks` counter (for T and T_RV) and its
 * rnd(): `gen` (a generator above) seeded with `seed`.  rnd_real(r) is
 * uniform in [-r, r). */
#define TEST_RNG(gen, seed)                                                \
    static unsigned long checks;                                           \
    static uint64_t rng_state = (seed);                                    \
    static uint64_t rnd(void)                                              \
    {                                                                      \
        return gen(&rng_state);                                            \
    }
#define rnd_real(r) real_of_bits(rnd(), (r))

#endif
