/*
 * ringutil.h - helpers for the in-process ring tests: N communicators in
 * one process on 127.0.0.1 port 0, each driven by its own thread.
 */
#ifndef PCCL_RINGUTIL_H
#define PCCL_RINGUTIL_H

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pccl.h"
#include "testutil.h"

enum { RU_MAX_WORLD = 16 };

typedef struct ru_cluster {
    uint32_t world;
    uint64_t epoch;
    pccl_comm *comm[RU_MAX_WORLD];
    char addr[RU_MAX_WORLD][PCCL_ADDRSTRLEN];
    int32_t set_timeout_ms;
    const char *const *bind_addrs;  /* optional, for every rank */
    uint32_t n_bind_addrs;
    const char *listen;             /* default "127.0.0.1:0" */
} ru_cluster;

typedef struct ru_set_arg {
    ru_cluster *cl;
    uint32_t rank;
    pccl_result rv;
} ru_set_arg;

static void *
ru_set_main(void *p)
{
    ru_set_arg *a = p;
    pccl_ring_config rc;
    memset(&rc, 0, sizeof(rc));
    rc.epoch = a->cl->epoch;
    rc.rank = a->rank;
    rc.world = a->cl->world;
    rc.next_addr = a->cl->addr[(a->rank + 1) % a->cl->world];
    rc.timeout_ms = a->cl->set_timeout_ms;
    rc.bind_addrs = a->cl->bind_addrs;
    rc.n_bind_addrs = a->cl->n_bind_addrs;
    a->rv = pccl_comm_set_ring(a->cl->comm[a->rank], &rc);
    return NULL;
}

/* ru_set_ring sets the ring on every member in parallel (epoch++). */
static inline void
ru_set_ring(ru_cluster *cl)
{
    pthread_t t[RU_MAX_WORLD];
    ru_set_arg a[RU_MAX_WORLD];
    uint32_t r;

    cl->epoch++;
    for (r = 0; r < cl->world; r++) {
        a[r].cl = cl;
        a[r].rank = r;
        a[r].rv = -1;
        CHECK(pthread_create(&t[r], NULL, ru_set_main, &a[r]) == 0);
    }
    for (r = 0; r < cl->world; r++) {
        pthread_join(t[r], NULL);
    }
    for (r = 0; r < cl->world; r++) {
        CHECK_OK(a[r].rv);
    }
}

/* ru_create_at makes world communicators listening at `listen` (cfg may
 * be NULL for defaults), sets bind addresses if given, and sets the ring. */
static inline void
ru_create_at(ru_cluster *cl, uint32_t world, const pccl_comm_config *base, const char *listen,
             const char *const *bind_addrs, uint32_t n_bind_addrs)
{
    pccl_comm_config cfg;
    uint32_t r;

    memset(cl, 0, sizeof(*cl));
    cl->bind_addrs = bind_addrs;
    cl->n_bind_addrs = n_bind_addrs;
    CHECK(world <= RU_MAX_WORLD);
    cl->world = world;
    cl->set_timeout_ms = 20000;
    if (base != NULL) {
        cfg = *base;
    } else {
        CHECK_OK(pccl_comm_config_init(&cfg));
    }
    cfg.listen_addr = listen;
    for (r = 0; r < world; r++) {
        CHECK_OK(pccl_comm_create(&cfg, &cl->comm[r]));
        CHECK_OK(pccl_comm_listen_address(cl->comm[r], cl->addr[r], sizeof(cl->addr[r])));
    }
    ru_set_ring(cl);
}

/* ru_create: the same on 127.0.0.1:0 without bind addresses. */
static inline void
ru_create(ru_cluster *cl, uint32_t world, const pccl_comm_config *base)
{
    ru_create_at(cl, world, base, "127.0.0.1:0", NULL, 0);
}

static inline void
ru_destroy(ru_cluster *cl)
{
    uint32_t r;
    for (r = 0; r < cl->world; r++) {
        CHECK_OK(pccl_comm_free(cl->comm[r]));
        cl->comm[r] = NULL;
    }
}

/* Per-rank worker threads running fn(rank, arg). */
typedef struct ru_run {
    void (*fn)(uint32_t rank, void *arg);
    void *arg;
    uint32_t rank;
} ru_run;

static void *
ru_run_main(void *p)
{
    ru_run *r = p;
    r->fn(r->rank, r->arg);
    return NULL;
}

static inline void
ru_parallel(uint32_t world, void (*fn)(uint32_t, void *), void *arg)
{
    pthread_t t[RU_MAX_WORLD];
    ru_run a[RU_MAX_WORLD];
    uint32_t r;
    for (r = 0; r < world; r++) {
        a[r].fn = fn;
        a[r].arg = arg;
        a[r].rank = r;
        CHECK(pthread_create(&t[r], NULL, ru_run_main, &a[r]) == 0);
    }
    for (r = 0; r < world; r++) {
        pthread_join(t[r], NULL);
    }
}

/* xorshift64* */
static inline uint64_t
ru_rand(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545f4914f6cdd1dull;
}

static inline uint64_t
ru_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

#endif
