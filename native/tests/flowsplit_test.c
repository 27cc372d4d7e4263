/*
 * flowsplit_test.c - flow-splitting plans in the data plane: weighted
 * striping schedules (coll/stripe.c) and per-connection source-port pins
 * (ring_setup.c), end to end on 127.0.0.1.
 */
#include <unistd.h>

#include "coll/stripe.h"
#include "ringutil.h"

enum { K = 4, WORLD = 3 };

static void
count_slots(const uint32_t *w, uint32_t k, uint16_t want_len, const uint32_t *want)
{
    uint8_t sched[PCCL__STRIPE_MAX];
    uint32_t cnt[PCCL_MAX_CONNECTIONS] = {0}, i;
    uint16_t len = 99;

    CHECK_OK(pccl__stripe_build(w, k, sched, &len));
    CHECK(len == want_len);
    for (i = 0; i < len; i++) {
        CHECK(sched[i] < k);
        cnt[sched[i]]++;
    }
    for (i = 0; i < k; i++) {
        CHECK(cnt[i] == want[i]);
    }
}

static void
test_schedule(void)
{
    static const uint32_t z[4] = {0, 0, 0, 0}, one[4] = {1, 0, 0, 0}, w31[4] = {3, 1, 0, 0};
    static const uint32_t c1[4] = {1, 0, 0, 0}, c31[4] = {3, 1, 0, 0};
    static const uint32_t big[4] = {3u << 20, 1u << 20, 1u << 20, 1u << 20}, cb[4] = {3, 1, 1, 1};
    static const uint32_t odd[3] = {1000, 999, 1}, codd[3] = {127, 128, 1};
    uint8_t sched[PCCL__STRIPE_MAX];
    uint16_t len = 7;

    CHECK_OK(pccl__stripe_build(NULL, K, sched, &len));
    CHECK(len == 0);
    CHECK_OK(pccl__stripe_build(z, K, sched, &len));
    CHECK(len == 0);
    count_slots(one, 4, 1, c1);
    count_slots(w31, 4, 4, c31);
    count_slots(big, 4, 6, cb); /* gcd first */
    count_slots(odd, 3, 256, codd); /* scaled to 256 slots, the 1 kept */
    /* Smooth: 3:1 interleaves as a a b a, never b b. */
    CHECK_OK(pccl__stripe_build(w31, 4, sched, &len));
    CHECK(sched[0] == 0 && sched[1] == 0 && sched[2] == 1 && sched[3] == 0);
    CHECK_RV(pccl__stripe_build(one, 0, sched, &len), PCCL_EINVAL);
}

/* One weighted ring: rank r sends with W[r], so it receives with W[r-1]. */
typedef struct wcase {
    ru_cluster cl;
    const uint32_t *w[WORLD];
    uint16_t lo[WORLD][K], hi[WORLD][K];
    int pinned;
    size_t count;
    int32_t *src[WORLD], *dst[WORLD];
} wcase;

typedef struct set_arg {
    wcase *c;
    uint32_t rank;
    pccl_result rv;
} set_arg;

static void *
set_main(void *p)
{
    set_arg *a = p;
    wcase *c = a->c;
    uint32_t r = a->rank;
    pccl_ring_config rc;

    memset(&rc, 0, sizeof(rc));
    rc.epoch = c->cl.epoch;
    rc.rank = r;
    rc.world = WORLD;
    rc.next_addr = c->cl.addr[(r + 1) % WORLD];
    rc.timeout_ms = 20000;
    rc.out_weights = c->w[r];
    rc.in_weights = c->w[(r + WORLD - 1) % WORLD];
    if (c->pinned) {
        rc.out_port_lo = c->lo[r];
        rc.out_port_hi = c->hi[r];
    }
    a->rv = pccl_comm_set_ring(c->cl.comm[r], &rc);
    return NULL;
}

static void
set_all(wcase *c)
{
    pthread_t t[WORLD];
    set_arg a[WORLD];
    uint32_t r;

    c->cl.epoch++;
    for (r = 0; r < WORLD; r++) {
        a[r].c = c;
        a[r].rank = r;
        CHECK(pthread_create(&t[r], NULL, set_main, &a[r]) == 0);
    }
    for (r = 0; r < WORLD; r++) {
        pthread_join(t[r], NULL);
    }
    for (r = 0; r < WORLD; r++) {
        if (a[r].rv != 0) {
            fprintf(stderr, "set_ring rank %u: %s\n", r, pccl_strerror(a[r].rv));
        }
    }
    for (r = 0; r < WORLD; r++) {
        CHECK_OK(a[r].rv);
    }
}

static void
reduce_main(uint32_t r, void *arg)
{
    wcase *c = arg;
    int in_place = (r == 1);
    void *dst = in_place ? (void *)c->src[r] : (void *)c->dst[r];
    CHECK_OK(pccl_comm_all_reduce(c->cl.comm[r], c->src[r], dst, c->count, PCCL_INT32,
                                  PCCL_SUM, PCCL_QUANT_NONE, 7, 30000, NULL));
}

static void
run_reduce(wcase *c, size_t count)
{
    uint32_t r;
    size_t i;

    c->count = count;
    for (r = 0; r < WORLD; r++) {
        c->src[r] = malloc(count * 4 + 4);
        c->dst[r] = malloc(count * 4 + 4);
        CHECK(c->src[r] != NULL && c->dst[r] != NULL);
        for (i = 0; i < count; i++) {
            c->src[r][i] = (int32_t)(i * 7 + r * 1000003u);
        }
    }
    ru_parallel(WORLD, reduce_main, c);
    for (r = 0; r < WORLD; r++) {
        const int32_t *out = r == 1 ? c->src[r] : c->dst[r];
        for (i = 0; i < count; i++) {
            int32_t want = (int32_t)(3 * (i * 7) + 1000003u * 3u);
            CHECK(out[i] == want);
        }
        free(c->src[r]);
        free(c->dst[r]);
    }
}

static void
make_cluster(wcase *c)
{
    pccl_comm_config cfg;
    uint32_t r;

    CHECK_OK(pccl_comm_config_init(&cfg));
    cfg.p2p_connections = K;
    cfg.slice_bytes = 64 * 1024;
    cfg.listen_addr = "127.0.0.1:0";
    c->cl.world = WORLD;
    for (r = 0; r < WORLD; r++) {
        CHECK_OK(pccl_comm_create(&cfg, &c->cl.comm[r]));
        CHECK_OK(pccl_comm_listen_address(c->cl.comm[r], c->cl.addr[r], sizeof(c->cl.addr[r])));
    }
}

static void
test_weighted(void)
{
    static const uint32_t w1[K] = {1, 0, 0, 0}, w31[K] = {3, 1, 0, 0}, w0[K] = {0, 0, 0, 0};
    static const uint32_t wodd[K] = {0, 5, 2, 9};
    static const size_t counts[] = {1, 3, 1000, 4097, (1u << 20) + 7};
    wcase *c = calloc(1, sizeof(*c));
    size_t i;

    CHECK(c != NULL);
    make_cluster(c);
    /* Every rank a different plan: each end must use its predecessor's. */
    c->w[0] = w1;
    c->w[1] = w31;
    c->w[2] = wodd;
    set_all(c);
    for (i = 0; i < sizeof(counts) / sizeof(counts[0]); i++) {
        run_reduce(c, counts[i]);
    }
    /* All ranks [1,0,0,0]: one connection of four carries everything. */
    c->w[1] = w1;
    c->w[2] = w1;
    set_all(c);
    run_reduce(c, (1u << 20) + 7);
    /* All zero is the default rotation. */
    c->w[0] = c->w[1] = c->w[2] = w0;
    set_all(c);
    run_reduce(c, 100003);
    ru_destroy(&c->cl);
    free(c);
}

static uint16_t
port_of(const char *hostport)
{
    const char *colon = strrchr(hostport, ':');
    CHECK(colon != NULL);
    return (uint16_t)atoi(colon + 1);
}

/* A base for the test's port ranges: above the default ephemeral range
 * (32768-60999), so ports bound to 0 elsewhere do not collide; by pid, so
 * concurrent runs (and TIME_WAIT of earlier ones) rarely meet. */
static uint16_t
free_range(void)
{
    return (uint16_t)(61000 + (unsigned)getpid() % 4000);
}

static void
test_pins(void)
{
    static const uint32_t w[K] = {1, 1, 2, 0};
    wcase *c = calloc(1, sizeof(*c));
    uint16_t base = free_range();
    uint32_t r, k, j;
    char buf[PCCL_ADDRSTRLEN];
    uint16_t got[WORLD][K];
    pccl_ring_config bad;

    CHECK(c != NULL);
    make_cluster(c);
    CHECK_RV(pccl_comm_ring_conn_address(c->cl.comm[0], 0, buf, sizeof(buf)), PCCL_ESTATE);
    for (r = 0; r < WORLD; r++) {
        c->w[r] = w;
        for (k = 0; k < K; k++) {
            /* Connections 0 and 1 share one range (two paths' worth of
             * ports), 2 and 3 have their own; 3 has two ports. */
            uint16_t lo = (uint16_t)(base + (k < 2 ? 0 : 16 * k) + 64 * r);
            c->lo[r][k] = lo;
            c->hi[r][k] = (uint16_t)(k == 3 ? lo + 1 : lo + 7);
        }
    }
    c->pinned = 1;
    set_all(c);
    for (r = 0; r < WORLD; r++) {
        for (k = 0; k < K; k++) {
            CHECK_OK(pccl_comm_ring_conn_address(c->cl.comm[r], k, buf, sizeof(buf)));
            got[r][k] = port_of(buf);
            CHECK(got[r][k] >= c->lo[r][k] && got[r][k] <= c->hi[r][k]);
            for (j = 0; j < k; j++) {
                CHECK(got[r][j] != got[r][k]);
            }
        }
        CHECK_RV(pccl_comm_ring_conn_address(c->cl.comm[r], K, buf, sizeof(buf)), PCCL_EINVAL);
    }
    run_reduce(c, 300001);
    /* Bad ranges are refused before anything happens. */
    memset(&bad, 0, sizeof(bad));
    bad.world = WORLD;
    bad.next_addr = c->cl.addr[1];
    c->hi[0][2] = (uint16_t)(c->lo[0][2] - 1);
    bad.out_port_lo = c->lo[0];
    bad.out_port_hi = c->hi[0];
    CHECK_RV(pccl_comm_set_ring(c->cl.comm[0], &bad), PCCL_EINVAL);
    ru_destroy(&c->cl);
    free(c);
}

int
main(void)
{
    test_schedule();
    test_weighted();
    test_pins();
    printf("flowsplit_test: ok\n");
    return 0;
}
