/*
 * testutil.h - a tiny assertion kit for the C tests.  Each test file is
 * one executable registered with CTest; a failed check prints where and
 * exits non-zero.
 */
#ifndef PCCL_TESTUTIL_H
#define PCCL_TESTUTIL_H

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

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

/* Synchronisation for tests: wait on a condition, never on a sleep.  A
 * gate counts events (an op submitted, a server stalled); tu_gate_wait
 * blocks until it has seen n of them, and fails the test if that takes
 * longer than timeout_ms. */
typedef struct tu_gate {
    pthread_mutex_t m;
    pthread_cond_t c;
    int n;
} tu_gate;

static inline void
tu_gate_init(tu_gate *g)
{
    CHECK(pthread_mutex_init(&g->m, NULL) == 0);
    CHECK(pthread_cond_init(&g->c, NULL) == 0);
    g->n = 0;
}

static inline void
tu_gate_fini(tu_gate *g)
{
    pthread_cond_destroy(&g->c);
    pthread_mutex_destroy(&g->m);
}

static inline void
tu_gate_add(tu_gate *g)
{
    pthread_mutex_lock(&g->m);
    g->n++;
    pthread_cond_broadcast(&g->c);
    pthread_mutex_unlock(&g->m);
}

static inline void
tu_gate_wait(tu_gate *g, int n, int timeout_ms)
{
    struct timespec until;
    int rc = 0;

    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += timeout_ms / 1000;
    until.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&g->m);
    while (g->n < n && rc == 0) {
        rc = pthread_cond_timedwait(&g->c, &g->m, &until);
    }
    rc = g->n >= n;
    pthread_mutex_unlock(&g->m);
    if (!rc) {
        fprintf(stderr, "%s:%d: gate: %d events did not come within %d ms\n", __FILE__,
                __LINE__, n, timeout_ms);
        exit(1);
    }
}

static inline uint64_t
tu_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* TU_WAIT_UNTIL(cond, timeout_ms): re-check cond every millisecond until
 * it holds; fail the test at the deadline.  For conditions nobody can
 * signal (the state of a socket, bytes in a buffer, a probe call). */
#define TU_WAIT_UNTIL(cond, timeout_ms)                                    \
    do {                                                                   \
        struct timespec tu_ms_ = {0, 1000000L};                            \
        uint64_t tu_end_ = tu_now_ms() + (uint64_t)(timeout_ms);           \
        while (!(cond)) {                                                  \
            if (tu_now_ms() >= tu_end_) {                                  \
                fprintf(stderr, "%s:%d: not within %d ms: %s\n", __FILE__, \
                        __LINE__, (int)(timeout_ms), #cond);               \
                exit(1);                                                   \
            }                                                              \
            nanosleep(&tu_ms_, NULL);                                      \
        }                                                                  \
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
