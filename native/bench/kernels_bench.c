/*
 * kernels_bench.c - throughput of the reduce kernels and quantization.
 *
 * Not a test and not built by CMake; build against a Release pccl_core:
 *   cc -std=c99 -O3 -D_POSIX_C_SOURCE=200809L -Inative/include -Inative/src \
 *      native/bench/kernels_bench.c BUILD/libpccl_core.a -lm -o kernels_bench
 * Reports GB/s of input bytes (both operands for reduce: 2n elements read,
 * n written) on 64 MiB buffers, best of a few runs.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "coll/kernels.h"
#include "coll/quant.h"
#include "pccl.h"

#define BYTES (64u << 20)
#define SLICE (256u << 10) /* PCCL_DEFAULT_SLICE_BYTES */
#define RUNS 5

static double
now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void
fill(void *p, size_t n, pccl_dtype dt)
{
    size_t i;
    for (i = 0; i < n; i++) {
        float v = (float)((double)rand() / RAND_MAX * 2.0 - 1.0);
        switch (dt) {
        case PCCL_FLOAT32: ((float *)p)[i] = v; break;
        case PCCL_FLOAT16: ((uint16_t *)p)[i] = pccl__float_to_half(v); break;
        case PCCL_BFLOAT16: ((uint16_t *)p)[i] = pccl__float_to_bf16(v); break;
        default: break;
        }
    }
}

/* mode 0: out separate, 1: out == a */
static void
bench_reduce(const char *name, pccl_dtype dt, size_t es, int mode)
{
    size_t n = BYTES / es;
    void *a = malloc(BYTES), *b = malloc(BYTES), *out = malloc(BYTES);
    double best = 1e9;
    int r;

    fill(a, n, dt);
    fill(b, n, dt);
    memset(out, 0, BYTES);
    for (r = 0; r < RUNS; r++) {
        double t = now();
        pccl__reduce(mode ? a : out, a, b, n, dt, PCCL_SUM);
        t = now() - t;
        best = t < best ? t : best;
    }
    printf("%-10s SUM %-9s %6.2f GB/s (inputs %5.1f Gelem/s)\n", name,
           mode ? "out==a" : "separate", 2.0 * BYTES / best / 1e9, n / best / 1e9);
    free(a);
    free(b);
    free(out);
}

static void
bench_quant(const char *name, pccl_dtype dt, size_t es)
{
    size_t n = BYTES / es, per = SLICE / es, off;
    void *x = malloc(BYTES), *y = malloc(BYTES);
    uint8_t *q = malloc(n);
    double *meta = malloc(2 * sizeof(double) * (n / per + 1));
    double bq = 1e9, bd = 1e9, bdr = 1e9;
    int r;

    fill(x, n, dt);
    memcpy(y, x, BYTES);
    for (r = 0; r < RUNS; r++) {
        double t = now();
        for (off = 0; off < n; off += per) {
            size_t m = n - off < per ? n - off : per;
            pccl__quant_minmax((char *)x + off * es, m, dt, q + off,
                               &meta[2 * (off / per)], &meta[2 * (off / per) + 1]);
        }
        t = now() - t;
        bq = t < bq ? t : bq;
        t = now();
        for (off = 0; off < n; off += per) {
            size_t m = n - off < per ? n - off : per;
            pccl__dequant(q + off, m, meta[2 * (off / per)], meta[2 * (off / per) + 1],
                          dt, (char *)y + off * es);
        }
        t = now() - t;
        bd = t < bd ? t : bd;
        t = now();
        for (off = 0; off < n; off += per) {
            size_t m = n - off < per ? n - off : per;
            pccl__dequant_reduce((char *)y + off * es, q + off, (char *)y + off * es, m,
                                 meta[2 * (off / per)], meta[2 * (off / per) + 1], dt,
                                 PCCL_SUM);
        }
        t = now() - t;
        bdr = t < bdr ? t : bdr;
    }
    printf("%-10s quant %6.2f GB/s, dequant %6.2f GB/s, quant+dequant %6.2f GB/s, "
           "dequant_reduce %6.2f GB/s (of %s bytes, 256 KiB slices)\n",
           name, BYTES / bq / 1e9, BYTES / bd / 1e9, BYTES / (bq + bd) / 1e9,
           BYTES / bdr / 1e9, name);
    free(x);
    free(y);
    free(q);
    free(meta);
}

int
main(void)
{
    bench_reduce("float32", PCCL_FLOAT32, 4, 0);
    bench_reduce("float32", PCCL_FLOAT32, 4, 1);
    bench_reduce("bfloat16", PCCL_BFLOAT16, 2, 0);
    bench_reduce("bfloat16", PCCL_BFLOAT16, 2, 1);
    bench_reduce("float16", PCCL_FLOAT16, 2, 0);
    bench_quant("float32", PCCL_FLOAT32, 4);
    bench_quant("bfloat16", PCCL_BFLOAT16, 2);
    bench_quant("float16", PCCL_FLOAT16, 2);
    return 0;
}
