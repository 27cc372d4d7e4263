/*
 * abort_test.c - failures: abort from another thread, a neighbour closed
 * mid-operation, progress and call timeouts, set_ring that cannot
 * complete, close while blocked.  Every failure must come back quickly,
 * with the caller's input untouched, and set_ring must bring the ring back.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pccl.h"
#include "ringutil.h"
#include "testutil.h"

enum { N = 1 << 16 };

/* A thread that aborts (or closes) comm once a gate has seen n events:
 * the ops it must interrupt have been submitted, and, with a predicate,
 * once that also holds.  No sleeps: every wait is on a condition with a
 * deadline. */
typedef struct delayed {
    pccl_comm *comm;
    tu_gate *gate;
    int n;
    int (*ready)(void *);   /* NULL, or polled until it returns 1 */
    void *ready_arg;
    int do_close;
} delayed;

static void *
delayed_main(void *p)
{
    delayed *d = p;
    tu_gate_wait(d->gate, d->n, 10000);
    if (d->ready != NULL) {
        TU_WAIT_UNTIL(d->ready(d->ready_arg), 10000);
    }
    if (d->do_close) {
        CHECK_OK(pccl_comm_close(d->comm));
    } else {
        CHECK_OK(pccl_comm_abort(d->comm));
    }
    return NULL;
}

static pthread_t
later(delayed *d, pccl_comm *comm, tu_gate *gate, int n, int do_close)
{
    pthread_t t;
    d->comm = comm;
    d->gate = gate;
    d->n = n;
    d->ready = NULL;
    d->ready_arg = NULL;
    d->do_close = do_close;
    CHECK(pthread_create(&t, NULL, delayed_main, d) == 0);
    return t;
}

/* An all-reduce that says on gate when it has been submitted, then waits
 * for it (what pccl_comm_all_reduce does, with a signal in between). */
static pccl_result
all_reduce_signalled(pccl_comm *comm, const float *src, float *dst, size_t count,
                     int32_t timeout_ms, tu_gate *gate)
{
    pccl_op_handle *h;
    pccl_result rv = pccl_comm_all_reduce_start(comm, src, dst, count, PCCL_FLOAT32, PCCL_SUM,
                                                PCCL_QUANT_NONE, 0, &h);
    if (rv != PCCL_OK) {
        return rv;
    }
    tu_gate_add(gate);
    rv = pccl_op_wait(h, timeout_ms, NULL);
    CHECK_OK(pccl_op_free(h));
    return rv;
}

static float *
make_input(uint32_t seed)
{
    float *p = malloc(N * sizeof(float));
    uint32_t i;
    CHECK(p != NULL);
    for (i = 0; i < N; i++) {
        p[i] = (float)((i * 2654435761u + seed) % 1000) / 7.0f;
    }
    return p;
}

/* Everyone runs one all-reduce of ones and checks the sum is world. */
static void
healthy_rank(uint32_t r, void *arg)
{
    ru_cluster *cl = arg;
    int32_t v[100];
    int i;
    for (i = 0; i < 100; i++) {
        v[i] = 1;
    }
    CHECK_OK(pccl_comm_all_reduce(cl->comm[r], v, v, 100, PCCL_INT32, PCCL_SUM,
                                  PCCL_QUANT_NONE, 0, 10000, NULL));
    for (i = 0; i < 100; i++) {
        CHECK(v[i] == (int32_t)cl->world);
    }
}

static void
check_healthy(ru_cluster *cl)
{
    ru_parallel(cl->world, healthy_rank, cl);
}

/* Wait until starting an op on comm reports the broken ring. */
static void
expect_broken(pccl_comm *comm)
{
    int32_t v = 1;
    uint64_t t0 = ru_now_ms();
    for (;;) {
        pccl_result rv = pccl_comm_all_reduce(comm, &v, &v, 1, PCCL_INT32, PCCL_SUM,
                                              PCCL_QUANT_NONE, 0, 5000, NULL);
        if (rv == PCCL_ERINGBROKEN) {
            return;
        }
        /* EPROTO: frames the peer sent before it broke the ring can still
         * be queued here, and this op (other parameters, same tag and
         * seq) may read one before the hang-up arrives. */
        if (!(rv == PCCL_EPEERLOST || rv == PCCL_EABORTED || rv == PCCL_ETIMEDOUT ||
              rv == PCCL_EPROTO)) {
            fprintf(stderr, "expect_broken: %s\n", pccl_strerror(rv));
            exit(1);
        }
        CHECK(ru_now_ms() - t0 < 5000); /* retried until the break shows */
        {
            struct timespec ts = {0, 5000000L};
            nanosleep(&ts, NULL);
        }
    }
}

/* abort() wakes a blocked op with EABORTED, src untouched (in place too). */
static void
abort_wakes(int inplace)
{
    ru_cluster cl;
    float *src = make_input(1), *orig = make_input(1);
    float *dst = malloc(N * sizeof(float));
    delayed d;
    pthread_t t;
    uint64_t t0;
    tu_gate gate;

    tu_gate_init(&gate);
    ru_create(&cl, 2, NULL);
    /* rank 1 never joins the op, so rank 0 blocks; abort once it is in */
    t = later(&d, cl.comm[0], &gate, 1, 0);
    t0 = ru_now_ms();
    CHECK_RV(all_reduce_signalled(cl.comm[0], src, inplace ? src : dst, N, 20000, &gate),
             PCCL_EABORTED);
    CHECK(ru_now_ms() - t0 < 3000);
    pthread_join(t, NULL);
    tu_gate_fini(&gate);
    CHECK(memcmp(src, orig, N * sizeof(float)) == 0);
    /* rank 0's ring is broken; rank 1 sees its links close. */
    expect_broken(cl.comm[0]);
    expect_broken(cl.comm[1]);
    ru_set_ring(&cl);
    check_healthy(&cl);
    ru_destroy(&cl);
    free(src);
    free(orig);
    free(dst);
}

/* In place, results are written into the input as they arrive, and a
 * failure puts the input back.  World 3, rank 2 never starts the op:
 * rank 1 still receives and reduces rank 0's first chunk into its tensor,
 * then blocks until the abort. */
typedef struct restore_arg {
    ru_cluster *cl;
    float *src[2];
    float *orig[2];
    tu_gate gate;           /* both ops submitted */
    int written;            /* rank 1's tensor was seen written (atomic) */
} restore_arg;

/* Rank 1 has reduced rank 0's first slices into its tensor (read while
 * the engine may write it: only ever compared, never relied on). */
static int
rank1_written(void *arg)
{
    restore_arg *a = arg;
    /* Latched: once one rank aborts, rank 1's op fails and its tensor is
     * put back, while the other aborter may not have looked yet. */
    if (!__atomic_load_n(&a->written, __ATOMIC_ACQUIRE) &&
        memcmp(a->src[1], a->orig[1], N * sizeof(float)) != 0) {
        __atomic_store_n(&a->written, 1, __ATOMIC_RELEASE);
    }
    return __atomic_load_n(&a->written, __ATOMIC_ACQUIRE);
}

static void
restore_rank(uint32_t r, void *arg)
{
    restore_arg *a = arg;
    delayed d;
    pthread_t t;
    pccl_result rv;

    d.comm = a->cl->comm[r];
    d.gate = &a->gate;
    d.n = 2;
    d.ready = rank1_written; /* so that there is something to put back */
    d.ready_arg = a;
    d.do_close = 0;
    CHECK(pthread_create(&t, NULL, delayed_main, &d) == 0);
    rv = all_reduce_signalled(a->cl->comm[r], a->src[r], a->src[r], N, 20000, &a->gate);

    CHECK(rv == PCCL_EABORTED || rv == PCCL_EPEERLOST);
    pthread_join(t, NULL);
    CHECK(memcmp(a->src[r], a->orig[r], N * sizeof(float)) == 0);
}

static void
inplace_restored(void)
{
    ru_cluster cl;
    restore_arg a;
    uint32_t r;

    ru_create(&cl, 3, NULL);
    a.cl = &cl;
    a.written = 0;
    tu_gate_init(&a.gate);
    for (r = 0; r < 2; r++) {
        a.src[r] = make_input(r + 1);
        a.orig[r] = make_input(r + 1);
    }
    ru_parallel(2, restore_rank, &a);
    ru_destroy(&cl);
    tu_gate_fini(&a.gate);
    for (r = 0; r < 2; r++) {
        free(a.src[r]);
        free(a.orig[r]);
    }
}

/* A neighbour closed mid-operation: the others fail with EPEERLOST fast. */
typedef struct closing_arg {
    ru_cluster *cl;
    uint32_t victim;
    int idle_victim;    /* victim never starts the op */
    float *src[8];
    float *orig[8];
    float *dst[8];
    size_t count;
    tu_gate gate;           /* ops submitted */
} closing_arg;

static void
closing_rank(uint32_t r, void *arg)
{
    closing_arg *c = arg;
    pccl_result rv;
    uint64_t t0;

    if (r == c->victim) {
        uint32_t others = c->cl->world - 1;
        if (c->idle_victim) {
            /* close once the others are in their op */
            tu_gate_wait(&c->gate, (int)others, 10000);
            CHECK_OK(pccl_comm_close(c->cl->comm[r]));
            return;
        }
        {
            /* close once every op, its own included, is in */
            delayed d;
            pthread_t t = later(&d, c->cl->comm[r], &c->gate, (int)others + 1, 1);
            rv = all_reduce_signalled(c->cl->comm[r], c->src[r], c->dst[r], c->count, 20000,
                                      &c->gate);
            CHECK(rv == PCCL_ECLOSED || rv == PCCL_OK);
            pthread_join(t, NULL);
        }
        return;
    }
    t0 = ru_now_ms();
    rv = all_reduce_signalled(c->cl->comm[r], c->src[r], c->dst[r], c->count, 20000, &c->gate);
    if (c->idle_victim) {
        CHECK_RV(rv, PCCL_EPEERLOST);
    } else {
        CHECK(rv == PCCL_EPEERLOST || rv == PCCL_OK);
    }
    CHECK(ru_now_ms() - t0 < 5000);
    CHECK(memcmp(c->src[r], c->orig[r], c->count * sizeof(float)) == 0);
}

static void
neighbour_closed(uint32_t world, int idle_victim, size_t count)
{
    ru_cluster cl;
    closing_arg c;
    uint32_t r;

    ru_create(&cl, world, NULL);
    memset(&c, 0, sizeof(c));
    c.cl = &cl;
    c.victim = world - 1;
    c.idle_victim = idle_victim;
    c.count = count;
    tu_gate_init(&c.gate);
    for (r = 0; r < world; r++) {
        c.src[r] = malloc(count * sizeof(float));
        c.orig[r] = malloc(count * sizeof(float));
        c.dst[r] = malloc(count * sizeof(float));
        memset(c.src[r], 0, count * sizeof(float));
        memset(c.orig[r], 0, count * sizeof(float));
    }
    ru_parallel(world, closing_rank, &c);
    for (r = 0; r < world; r++) {
        free(c.src[r]);
        free(c.orig[r]);
        free(c.dst[r]);
    }
    ru_destroy(&cl);
    tu_gate_fini(&c.gate);
}

/* The progress timeout ends an op whose neighbour never takes part; a
 * call timeout breaks the ring; a wait timeout does not. */
static void
timeouts(void)
{
    ru_cluster cl;
    pccl_comm_config cfg;
    float *src = make_input(2), *orig = make_input(2), *dst = malloc(N * sizeof(float));
    float *src1 = make_input(3), *dst1 = malloc(N * sizeof(float));
    pccl_op_handle *h0, *h1;
    uint64_t t0;

    CHECK_OK(pccl_comm_config_init(&cfg));
    cfg.progress_timeout_ms = 300;
    ru_create(&cl, 2, &cfg);
    t0 = ru_now_ms();
    CHECK_RV(pccl_comm_all_reduce(cl.comm[0], src, src, N, PCCL_FLOAT32, PCCL_SUM,
                                  PCCL_QUANT_NONE, 0, -1, NULL),
             PCCL_ETIMEDOUT);
    CHECK(ru_now_ms() - t0 >= 250 && ru_now_ms() - t0 < 3000);
    CHECK(memcmp(src, orig, N * sizeof(float)) == 0);
    expect_broken(cl.comm[0]);
    expect_broken(cl.comm[1]);
    ru_destroy(&cl);

    CHECK_OK(pccl_comm_config_init(&cfg));
    ru_create(&cl, 2, &cfg);
    /* the call's own timeout breaks the ring */
    t0 = ru_now_ms();
    CHECK_RV(pccl_comm_all_reduce(cl.comm[0], src, dst, N, PCCL_FLOAT32, PCCL_SUM,
                                  PCCL_QUANT_NONE, 0, 100, NULL),
             PCCL_ETIMEDOUT);
    CHECK(ru_now_ms() - t0 < 3000);
    CHECK_RV(pccl_comm_all_reduce(cl.comm[0], src, dst, N, PCCL_FLOAT32, PCCL_SUM,
                                  PCCL_QUANT_NONE, 0, 100, NULL),
             PCCL_ERINGBROKEN);
    expect_broken(cl.comm[1]);
    ru_set_ring(&cl);

    /* pccl_op_wait's timeout leaves the op running */
    CHECK_OK(pccl_comm_all_reduce_start(cl.comm[0], src, dst, N, PCCL_FLOAT32, PCCL_SUM,
                                        PCCL_QUANT_NONE, 3, &h0));
    CHECK_RV(pccl_op_wait(h0, 50, NULL), PCCL_ETIMEDOUT);
    CHECK_OK(pccl_comm_all_reduce_start(cl.comm[1], src1, dst1, N, PCCL_FLOAT32, PCCL_SUM,
                                        PCCL_QUANT_NONE, 3, &h1));
    CHECK_OK(pccl_op_wait(h0, 10000, NULL));
    CHECK_OK(pccl_op_wait(h1, 10000, NULL));
    CHECK_OK(pccl_op_free(h0));
    CHECK_OK(pccl_op_free(h1));
    CHECK(memcmp(dst, dst1, N * sizeof(float)) == 0);
    CHECK(dst[5] == src[5] + src1[5]);

    /* freeing a running op aborts it (and the ring) */
    CHECK_OK(pccl_comm_all_reduce_start(cl.comm[0], src, dst, N, PCCL_FLOAT32, PCCL_SUM,
                                        PCCL_QUANT_NONE, 4, &h0));
    CHECK_OK(pccl_op_free(h0));
    expect_broken(cl.comm[0]);
    ru_destroy(&cl);
    free(src);
    free(orig);
    free(dst);
    free(src1);
    free(dst1);
}

/* Is a set_ring running on comm?  An op started meanwhile says ESTATE
 * (and starts nothing); before, the ring was broken (ERINGBROKEN) or a
 * world of one (the op just runs). */
static int
setting_up(pccl_comm *comm)
{
    float v = 1;
    pccl_result rv =
        pccl_comm_all_reduce(comm, &v, &v, 1, PCCL_FLOAT32, PCCL_SUM, PCCL_QUANT_NONE, 0, -1, NULL);
    CHECK(rv == PCCL_ESTATE || rv == PCCL_ERINGBROKEN || rv == PCCL_OK);
    return rv == PCCL_ESTATE;
}

/* set_ring that cannot complete: timeout, refused, abort, close. */
typedef struct setring_arg {
    pccl_comm *comm;
    pccl_ring_config rc;
    pccl_result rv;
    uint64_t ms;
} setring_arg;

static void *
setring_main(void *p)
{
    setring_arg *a = p;
    uint64_t t0 = ru_now_ms();
    a->rv = pccl_comm_set_ring(a->comm, &a->rc);
    a->ms = ru_now_ms() - t0;
    return NULL;
}

static void
set_ring_failures(void)
{
    pccl_comm_config cfg;
    pccl_comm *a, *b;
    char addr_b[PCCL_ADDRSTRLEN], addr_a[PCCL_ADDRSTRLEN];
    setring_arg s;
    pthread_t t;
    uint64_t t0;

    CHECK_OK(pccl_comm_config_init(&cfg));
    cfg.listen_addr = "127.0.0.1:0";
    cfg.handshake_timeout_ms = 200;
    CHECK_OK(pccl_comm_create(&cfg, &a));
    CHECK_OK(pccl_comm_create(&cfg, &b));
    CHECK_OK(pccl_comm_listen_address(a, addr_a, sizeof(addr_a)));
    CHECK_OK(pccl_comm_listen_address(b, addr_b, sizeof(addr_b)));

    /* b exists but never sets its ring: a times out */
    memset(&s, 0, sizeof(s));
    s.comm = a;
    s.rc.epoch = 1;
    s.rc.rank = 0;
    s.rc.world = 2;
    s.rc.next_addr = addr_b;
    s.rc.timeout_ms = 700;
    t0 = ru_now_ms();
    CHECK_RV(pccl_comm_set_ring(a, &s.rc), PCCL_ETIMEDOUT);
    CHECK(ru_now_ms() - t0 >= 650 && ru_now_ms() - t0 < 3000);

    /* nobody listens at next_addr */
    {
        pccl_comm *c;
        char addr_c[PCCL_ADDRSTRLEN];
        CHECK_OK(pccl_comm_create(&cfg, &c));
        CHECK_OK(pccl_comm_listen_address(c, addr_c, sizeof(addr_c)));
        CHECK_OK(pccl_comm_free(c));
        s.rc.next_addr = addr_c;
        s.rc.timeout_ms = 300;
        s.rc.epoch = 2;
        CHECK_RV(pccl_comm_set_ring(a, &s.rc), PCCL_ECONNREFUSED);
    }

    /* abort wakes a set_ring in progress */
    s.rc.next_addr = addr_b;
    s.rc.timeout_ms = 20000;
    s.rc.epoch = 3;
    CHECK(pthread_create(&t, NULL, setring_main, &s) == 0);
    TU_WAIT_UNTIL(setting_up(a), 10000);
    CHECK_OK(pccl_comm_abort(a));
    pthread_join(t, NULL);
    CHECK_RV(s.rv, PCCL_EABORTED);
    CHECK(s.ms < 3000);
    {
        float v = 1;
        CHECK_RV(pccl_comm_all_reduce(a, &v, &v, 1, PCCL_FLOAT32, PCCL_SUM, 0, 0, -1, NULL),
                 PCCL_ERINGBROKEN);
    }

    /* a world of one needs nobody */
    {
        pccl_ring_config one;
        float v[3] = {1, 2, 3}, w[3];
        memset(&one, 0, sizeof(one));
        one.epoch = 4;
        one.world = 1;
        one.timeout_ms = 100;
        CHECK_OK(pccl_comm_set_ring(a, &one));
        CHECK_OK(pccl_comm_all_reduce(a, v, w, 3, PCCL_FLOAT32, PCCL_AVG, 0, 0, -1, NULL));
        CHECK(w[0] == 1 && w[1] == 2 && w[2] == 3);
    }

    /* close wakes a set_ring in progress */
    s.rc.epoch = 5;
    CHECK(pthread_create(&t, NULL, setring_main, &s) == 0);
    TU_WAIT_UNTIL(setting_up(a), 10000);
    CHECK_OK(pccl_comm_close(a));
    pthread_join(t, NULL);
    CHECK_RV(s.rv, PCCL_ECLOSED);
    CHECK(s.ms < 3000);
    CHECK_OK(pccl_comm_free(a));
    CHECK_OK(pccl_comm_free(b));
}

/* Different secrets: the handshake refuses, set_ring reports EAUTH. */
static void
wrong_secret(void)
{
    pccl_comm_config ca, cb;
    pccl_comm *a, *b;
    char addr_a[PCCL_ADDRSTRLEN], addr_b[PCCL_ADDRSTRLEN];
    setring_arg sa, sb;
    pthread_t ta, tb;

    CHECK_OK(pccl_comm_config_init(&ca));
    ca.listen_addr = "127.0.0.1:0";
    cb = ca;
    ca.secret = (const uint8_t *)"alpha";
    ca.secret_len = 5;
    cb.secret = (const uint8_t *)"bravo";
    cb.secret_len = 5;
    CHECK_OK(pccl_comm_create(&ca, &a));
    CHECK_OK(pccl_comm_create(&cb, &b));
    CHECK_OK(pccl_comm_listen_address(a, addr_a, sizeof(addr_a)));
    CHECK_OK(pccl_comm_listen_address(b, addr_b, sizeof(addr_b)));
    memset(&sa, 0, sizeof(sa));
    sa.comm = a;
    sa.rc.epoch = 1;
    sa.rc.world = 2;
    sa.rc.rank = 0;
    sa.rc.next_addr = addr_b;
    sa.rc.timeout_ms = 2000;
    sb = sa;
    sb.comm = b;
    sb.rc.rank = 1;
    sb.rc.next_addr = addr_a;
    CHECK(pthread_create(&ta, NULL, setring_main, &sa) == 0);
    CHECK(pthread_create(&tb, NULL, setring_main, &sb) == 0);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    CHECK_RV(sa.rv, PCCL_EAUTH);
    CHECK_RV(sb.rv, PCCL_EAUTH);
    CHECK(sa.ms < 2000 && sb.ms < 2000);
    CHECK_OK(pccl_comm_free(a));
    CHECK_OK(pccl_comm_free(b));

    /* the same secret works */
    {
        ru_cluster cl;
        ru_create(&cl, 3, &ca);
        check_healthy(&cl);
        ru_destroy(&cl);
    }
}

/* close while an op is blocked: ECLOSED. */
static void
close_wakes(void)
{
    ru_cluster cl;
    float *src = make_input(4), *orig = make_input(4);
    delayed d;
    pthread_t t;
    tu_gate gate;

    tu_gate_init(&gate);
    ru_create(&cl, 2, NULL);
    t = later(&d, cl.comm[0], &gate, 1, 1);
    CHECK_RV(all_reduce_signalled(cl.comm[0], src, src, N, 20000, &gate), PCCL_ECLOSED);
    pthread_join(t, NULL);
    tu_gate_fini(&gate);
    CHECK(memcmp(src, orig, N * sizeof(float)) == 0);
    expect_broken(cl.comm[1]);
    ru_destroy(&cl);

    /* handles may outlive their communicator: freeing the comm closes it
     * (ops fail with ECLOSED) and its memory waits for the last handle */
    ru_create(&cl, 2, NULL);
    {
        pccl_op_handle *h;
        CHECK_OK(pccl_comm_all_reduce_start(cl.comm[0], src, src, N, PCCL_FLOAT32, PCCL_SUM,
                                            PCCL_QUANT_NONE, 0, &h));
        CHECK_OK(pccl_comm_free(cl.comm[0]));
        CHECK_RV(pccl_op_wait(h, 1000, NULL), PCCL_ECLOSED);
        CHECK_OK(pccl_op_free(h));
        CHECK_OK(pccl_comm_free(cl.comm[1]));
    }
    CHECK(memcmp(src, orig, N * sizeof(float)) == 0);
    free(src);
    free(orig);
}

int
main(void)
{
    uint64_t t0 = ru_now_ms();
    abort_wakes(0);
    abort_wakes(1);
    inplace_restored();
    fprintf(stderr, "abort ok (%llu ms)\n", (unsigned long long)(ru_now_ms() - t0));
    neighbour_closed(3, 1, 1 << 16);
    neighbour_closed(2, 1, 1 << 16);
    neighbour_closed(4, 0, 4u << 20);
    fprintf(stderr, "neighbour closed ok (%llu ms)\n", (unsigned long long)(ru_now_ms() - t0));
    timeouts();
    fprintf(stderr, "timeouts ok (%llu ms)\n", (unsigned long long)(ru_now_ms() - t0));
    set_ring_failures();
    fprintf(stderr, "set_ring failures ok (%llu ms)\n", (unsigned long long)(ru_now_ms() - t0));
    wrong_secret();
    close_wakes();
    fprintf(stderr, "abort_test ok (%llu ms)\n", (unsigned long long)(ru_now_ms() - t0));
    return 0;
}
