/*
 * ring_bench.c - all-reduce bandwidth of N in-process communicators over
 * loopback, next to a raw TCP ring that moves the same bytes and reduces
 * nothing (the ceiling for this machine).
 *
 * Not a ctest.  Build by hand against a Release build of the library:
 *   cmake -S native -B /tmp/build-core-rel -DCMAKE_BUILD_TYPE=Release
 *   cmake --build /tmp/build-core-rel -j2
 *   cc -O2 -std=c99 -D_POSIX_C_SOURCE=200809L -D_DEFAULT_SOURCE \
 *      -Inative/include -Inative/src -Inative/tests native/bench/ring_bench.c \
 *      /tmp/build-core-rel/libpccl_core.a -lcrypto -lpthread -lm -o /tmp/ring_bench
 *   /tmp/ring_bench [world] [MiB...]
 *
 * busbw = 2 (n-1)/n * bytes / time, the per-link rate every algorithm
 * that is bandwidth-optimal must sustain.
 */
#include <pthread.h>
#include <sys/resource.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "platform/plat.h"
#include "pccl.h"
#include "ringutil.h"
#include "testutil.h"

static int g_inplace;

/* CPU seconds this process used so far (all threads). */
static double
cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

/* CPU cost of the last timed run, in CPU-seconds per GB of busbw bytes:
 * load-independent, unlike GB/s on a shared 2-core machine. */
static double g_cpu_per_gb;

typedef struct bench {
    ru_cluster *cl;
    size_t count;
    int iters;
    pccl_quant quant;
    float *buf[RU_MAX_WORLD];
    float *out[RU_MAX_WORLD];
} bench;

static void
bench_rank(uint32_t r, void *arg)
{
    bench *b = arg;
    int i;
    for (i = 0; i < b->iters; i++) {
        CHECK_OK(pccl_comm_all_reduce(b->cl->comm[r], b->buf[r], g_inplace ? b->buf[r] : b->out[r], b->count,
                                      PCCL_FLOAT32, PCCL_SUM, b->quant, 0, 60000, NULL));
    }
}

static double
run_pccl(uint32_t world, uint32_t K, size_t bytes, pccl_quant quant)
{
    ru_cluster cl;
    pccl_comm_config cfg;
    bench b;
    uint32_t r;
    uint64_t t0, t1;
    double sec;

    CHECK_OK(pccl_comm_config_init(&cfg));
    cfg.p2p_connections = K;
    ru_create(&cl, world, &cfg);
    memset(&b, 0, sizeof(b));
    b.cl = &cl;
    b.count = bytes / 4;
    b.quant = quant;
    for (r = 0; r < world; r++) {
        b.buf[r] = malloc(bytes);
        b.out[r] = malloc(bytes);
        CHECK(b.buf[r] && b.out[r]);
        memset(b.buf[r], 0, bytes);
        memset(b.out[r], 0, bytes);
    }
    b.iters = 1; /* warm-up */
    ru_parallel(world, bench_rank, &b);
    b.iters = bytes >= (64u << 20) ? 2 : 20;
    {
        double c0 = cpu_s();
        t0 = pccl__clock_ns();
        ru_parallel(world, bench_rank, &b);
        t1 = pccl__clock_ns();
        g_cpu_per_gb = (cpu_s() - c0) / b.iters /
                       (2.0 * (world - 1) / world * (double)bytes * world / 1e9);
    }
    sec = (double)(t1 - t0) / 1e9 / b.iters;
    for (r = 0; r < world; r++) {
        free(b.buf[r]);
        free(b.out[r]);
    }
    ru_destroy(&cl);
    return 2.0 * (world - 1) / world * (double)bytes / sec / 1e9;
}

/* ----------------------------------------------------------- raw ring */

typedef struct raw {
    uint32_t world;
    size_t bytes;
    int iters;
    int send_fd[RU_MAX_WORLD];
    int recv_fd[RU_MAX_WORLD];
    uint8_t *sbuf[RU_MAX_WORLD];
    uint8_t *rbuf[RU_MAX_WORLD];
} raw;

/* Each rank streams 2(n-1)/n * bytes to the next while receiving as much
 * from the previous one, in 256 KiB pieces, one poller per rank. */
static void
raw_rank(uint32_t r, void *arg)
{
    raw *w = arg;
    size_t total = (size_t)(2.0 * (w->world - 1) / w->world * (double)w->bytes);
    pccl__poller p;
    int it;

    CHECK_OK(pccl__poller_init(&p));
    CHECK_OK(pccl__poller_add(&p, w->send_fd[r], PCCL__POLL_OUT, &w->send_fd[r]));
    CHECK_OK(pccl__poller_add(&p, w->recv_fd[r], PCCL__POLL_IN, &w->recv_fd[r]));
    for (it = 0; it < w->iters; it++) {
        size_t sent = 0, got = 0;
        while (sent < total || got < total) {
            pccl__poll_event ev[2];
            int n, i;
            CHECK_OK(pccl__poller_wait(&p, ev, 2, 1000, &n));
            for (i = 0; i < n; i++) {
                while (ev[i].ptr == &w->send_fd[r] && sent < total) {
                    size_t off = sent % w->bytes, len = total - sent, put;
                    pccl__iov iov;
                    if (len > 262144) {
                        len = 262144;
                    }
                    if (len > w->bytes - off) {
                        len = w->bytes - off;
                    }
                    iov.base = w->sbuf[r] + off;
                    iov.len = len;
                    CHECK_OK(pccl__sock_writev(w->send_fd[r], &iov, 1, &put));
                    sent += put;
                    if (sent == total) {
                        CHECK_OK(pccl__poller_mod(&p, w->send_fd[r], 0, &w->send_fd[r]));
                    }
                    if (put == 0) {
                        break;
                    }
                }
                while (ev[i].ptr == &w->recv_fd[r] && got < total) {
                    size_t off = got % w->bytes, len = total - got, n2;
                    if (len > w->bytes - off) {
                        len = w->bytes - off;
                    }
                    CHECK_OK(pccl__sock_read(w->recv_fd[r], w->rbuf[r] + off, len, &n2));
                    got += n2;
                    if (n2 == 0) {
                        break;
                    }
                }
            }
        }
        CHECK_OK(pccl__poller_mod(&p, w->send_fd[r], PCCL__POLL_OUT, &w->send_fd[r]));
    }
    pccl__poller_fini(&p);
}

/* The same with one blocking sender and one blocking receiver thread per
 * rank (often the better floor). */
typedef struct raw_half {
    raw *w;
    uint32_t r;
    int send;
} raw_half;

static void *
raw_half_main(void *p)
{
    raw_half *h = p;
    raw *w = h->w;
    size_t total = (size_t)(2.0 * (w->world - 1) / w->world * (double)w->bytes);
    int it;
    for (it = 0; it < w->iters; it++) {
        size_t done = 0;
        while (done < total) {
            size_t off = done % w->bytes, len = total - done;
            if (len > w->bytes - off) {
                len = w->bytes - off;
            }
            if (len > 262144) {
                len = 262144;
            }
            if (h->send) {
                CHECK_OK(pccl__sock_send_all(w->send_fd[h->r], w->sbuf[h->r] + off, len,
                                             PCCL__NO_DEADLINE, -1));
            } else {
                CHECK_OK(pccl__sock_recv_all(w->recv_fd[h->r], w->rbuf[h->r] + off, len,
                                             PCCL__NO_DEADLINE, -1));
            }
            done += len;
        }
    }
    return NULL;
}

static int g_raw_threads;

static void
raw_rank_threads(uint32_t r, void *arg)
{
    raw_half h[2];
    pthread_t t;
    h[0].w = h[1].w = arg;
    h[0].r = h[1].r = r;
    h[0].send = 1;
    h[1].send = 0;
    CHECK(pthread_create(&t, NULL, raw_half_main, &h[0]) == 0);
    raw_half_main(&h[1]);
    pthread_join(t, NULL);
}

static double
run_raw(uint32_t world, size_t bytes)
{
    raw w;
    pccl__sockaddr a;
    int lfd[RU_MAX_WORLD];
    pccl__sockaddr la[RU_MAX_WORLD];
    uint32_t r;
    uint64_t t0, t1;
    double sec;

    memset(&w, 0, sizeof(w));
    w.world = world;
    w.bytes = bytes;
    CHECK_OK(pccl__addr_parse("127.0.0.1:0", 1, &a));
    for (r = 0; r < world; r++) {
        CHECK_OK(pccl__sock_listen(&a, &lfd[r]));
        CHECK_OK(pccl__sock_local_addr(lfd[r], &la[r]));
        w.sbuf[r] = malloc(bytes);
        w.rbuf[r] = malloc(bytes);
        memset(w.sbuf[r], 1, bytes);
        memset(w.rbuf[r], 0, bytes);
    }
    for (r = 0; r < world; r++) {
        uint32_t nx = (r + 1) % world;
        CHECK_OK(pccl__sock_connect(&la[nx], NULL, pccl__deadline_ms(2000), -1, &w.send_fd[r]));
        CHECK_OK(pccl__sock_wait(lfd[nx], 0, pccl__deadline_ms(2000), -1));
        CHECK_OK(pccl__sock_accept(lfd[nx], &w.recv_fd[nx]));
    }
    w.iters = 1;
    ru_parallel(world, g_raw_threads ? raw_rank_threads : raw_rank, &w);
    w.iters = bytes >= (64u << 20) ? 2 : 20;
    {
        double c0 = cpu_s();
        t0 = pccl__clock_ns();
        ru_parallel(world, g_raw_threads ? raw_rank_threads : raw_rank, &w);
        t1 = pccl__clock_ns();
        g_cpu_per_gb = (cpu_s() - c0) / w.iters /
                       (2.0 * (world - 1) / world * (double)bytes * world / 1e9);
    }
    sec = (double)(t1 - t0) / 1e9 / w.iters;
    for (r = 0; r < world; r++) {
        pccl__sock_close(w.send_fd[r]);
        pccl__sock_close(w.recv_fd[r]);
        pccl__sock_close(lfd[r]);
        free(w.sbuf[r]);
        free(w.rbuf[r]);
    }
    return 2.0 * (world - 1) / world * (double)bytes / sec / 1e9;
}

static int
cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

enum { TRIALS = 5 };

/* Median of TRIALS runs: this machine is small and noisy. */
static double g_cpu_med;

static double
median_raw(uint32_t world, size_t bytes)
{
    double v[TRIALS], c[TRIALS];
    int i;
    for (i = 0; i < TRIALS; i++) {
        v[i] = run_raw(world, bytes);
        c[i] = g_cpu_per_gb;
    }
    qsort(v, TRIALS, sizeof(double), cmp_double);
    qsort(c, TRIALS, sizeof(double), cmp_double);
    g_cpu_med = c[TRIALS / 2];
    return v[TRIALS / 2];
}

static double
median_pccl(uint32_t world, uint32_t K, size_t bytes, pccl_quant q)
{
    double v[TRIALS], c[TRIALS];
    int i;
    for (i = 0; i < TRIALS; i++) {
        v[i] = run_pccl(world, K, bytes, q);
        c[i] = g_cpu_per_gb;
    }
    qsort(v, TRIALS, sizeof(double), cmp_double);
    qsort(c, TRIALS, sizeof(double), cmp_double);
    g_cpu_med = c[TRIALS / 2];
    return v[TRIALS / 2];
}

int
main(int argc, char **argv)
{
    uint32_t worlds[] = {2, 4};
    size_t sizes[] = {1, 64, 256};
    uint32_t ks[] = {1, 4, 16};
    size_t nsizes = 3, s;
    uint32_t nworlds = 2, wi, ki;
    int quant = getenv("PCCL_BENCH_QUANT") != NULL;
    g_inplace = getenv("PCCL_BENCH_INPLACE") != NULL;
    g_raw_threads = getenv("PCCL_BENCH_RAW_POLL") == NULL;

    if (argc > 1) {
        worlds[0] = (uint32_t)atoi(argv[1]);
        nworlds = 1;
    }
    if (argc > 2) {
        nsizes = 0;
        for (s = 2; s < (size_t)argc && nsizes < 3; s++) {
            sizes[nsizes++] = (size_t)atoi(argv[s]);
        }
    }
    printf("busbw GB/s / CPU-s per GB moved (all ranks)\n");
    printf("%-6s %-8s %-11s %-11s %-11s %-11s\n", "world", "MiB", "raw", "K=1", "K=4", "K=16");
    for (wi = 0; wi < nworlds; wi++) {
        for (s = 0; s < nsizes; s++) {
            size_t bytes = sizes[s] << 20;
            double rw = median_raw(worlds[wi], bytes);
            printf("%-6u %-8zu %5.2f/%-5.2f", worlds[wi], sizes[s], rw, g_cpu_med);
            fflush(stdout);
            for (ki = 0; ki < 3; ki++) {
                double pv = median_pccl(worlds[wi], ks[ki], bytes,
                                        quant ? PCCL_QUANT_UINT8_MINMAX : PCCL_QUANT_NONE);
                printf(" %5.2f/%-5.2f", pv, g_cpu_med);
                fflush(stdout);
            }
            printf("\n");
        }
    }
    return 0;
}
