/*
 * colls_test.c - ring broadcast, all-gather, reduce-scatter and barrier,
 * in one process: N communicators on 127.0.0.1, one thread per rank.
 *
 * Broadcast and all-gather must equal the inputs byte for byte on every
 * rank.  The reduce-scatter's reference is computed sequentially in the
 * ring's own order (chunk c starts at rank c+1 and picks up ranks c+2, ...,
 * c as received-op-local, the owner finalizes, quantization per slice)
 * with the same kernels, so every dtype must match bit for bit.  Then:
 * the barrier holds every rank until the last one enters; an abort in
 * flight fails the op on every rank with its inputs unchanged and the
 * next ring works; frames out of schedule are refused by each receive
 * path without touching memory; bad arguments are PCCL_EINVAL.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coll/allgather_ring.h"
#include "coll/broadcast_ring.h"
#include "coll/kernels.h"
#include "coll/quant.h"
#include "coll/reducescatter_ring.h"
#include "pccl.h"
#include "ringutil.h"
#include "testutil.h"

enum { KIND_BCAST = 0, KIND_AG = 1, KIND_RS = 2 };

static const pccl_dtype all_dtypes[] = {PCCL_FLOAT32, PCCL_FLOAT64, PCCL_FLOAT16,
                                        PCCL_BFLOAT16, PCCL_INT8,  PCCL_INT16,
                                        PCCL_INT32,   PCCL_INT64,  PCCL_UINT8};

static size_t
esize_of(pccl_dtype d)
{
    size_t s = 0;
    CHECK_OK(pccl_dtype_size(d, &s));
    return s;
}

/* Values valid in every dtype: floats in [-2, 2), integers anything. */
static void
fill(uint8_t *p, size_t count, pccl_dtype d, uint64_t *seed)
{
    size_t i, es = esize_of(d);
    for (i = 0; i < count; i++) {
        uint64_t r = ru_rand(seed);
        float f = (float)((double)(r >> 11) / 9007199254740992.0 * 4.0 - 2.0);
        double v = (double)f;
        uint16_t h;
        switch (d) {
        case PCCL_FLOAT32:
            memcpy(p + 4 * i, &f, 4);
            break;
        case PCCL_FLOAT64:
            memcpy(p + 8 * i, &v, 8);
            break;
        case PCCL_FLOAT16:
            h = pccl__float_to_half(f);
            memcpy(p + 2 * i, &h, 2);
            break;
        case PCCL_BFLOAT16:
            h = pccl__float_to_bf16(f);
            memcpy(p + 2 * i, &h, 2);
            break;
        default:
            memcpy(p + es * i, &r, es);
            break;
        }
    }
}

typedef struct ccase {
    int kind;
    size_t count;       /* bcast: elements; ag: per rank; rs: total (world * m) */
    pccl_dtype dtype;
    pccl_op op;
    pccl_quant quant;
    uint32_t root;
    uint64_t tag;
    uint32_t K, slice_bytes, world;
    int inplace_ag;     /* all-gather from dst's own block */
    ru_cluster *cl;
    uint8_t *in[RU_MAX_WORLD], *orig[RU_MAX_WORLD], *out[RU_MAX_WORLD];
    pccl_result rv[RU_MAX_WORLD];
} ccase;

static void
run_rank(uint32_t r, void *arg)
{
    ccase *t = arg;
    pccl_comm *c = t->cl->comm[r];
    pccl_reduce_info info;
    size_t es = esize_of(t->dtype);

    switch (t->kind) {
    case KIND_BCAST:
        t->rv[r] = pccl_comm_broadcast(c, t->out[r], t->count, t->dtype, t->root, t->tag, 30000,
                                       &info);
        break;
    case KIND_AG:
        t->rv[r] = pccl_comm_all_gather(
            c, t->inplace_ag ? t->out[r] + (size_t)r * t->count * es : t->in[r], t->out[r],
            t->count, t->dtype, t->tag, 30000, &info);
        break;
    default:
        t->rv[r] = pccl_comm_reduce_scatter(c, t->in[r], t->out[r], t->count, t->dtype, t->op,
                                            t->quant, t->tag, 30000, &info);
        break;
    }
    if (t->rv[r] == PCCL_OK) {
        CHECK(info.world == t->world);
    }
}

static size_t
rs_slice_elems(const ccase *t, size_t m)
{
    size_t es = esize_of(t->dtype);
    size_t s = m / t->K + (m % t->K != 0);
    if (s < PCCL_MIN_SLICE_BYTES / es) {
        s = PCCL_MIN_SLICE_BYTES / es;
    }
    if (s > t->slice_bytes / es) {
        s = t->slice_bytes / es;
    }
    return s ? s : 1;
}

/* Chunk c (m elements) reduced in the ring's order into acc. */
static void
rs_reference(const ccase *t, uint32_t c, size_t m, uint8_t *acc)
{
    uint32_t n = t->world, i;
    size_t es = esize_of(t->dtype), se = rs_slice_elems(t, m), rel;
    uint8_t *q = malloc(se + 1);

    CHECK(q != NULL);
    for (rel = 0; rel < m; rel += se) {
        size_t len = m - rel < se ? m - rel : se, off = ((size_t)c * m + rel) * es;
        uint8_t *a = acc + rel * es;
        double mn, sc;
        memcpy(a, t->in[(c + 1) % n] + off, len * es);
        for (i = 2; i <= n; i++) {
            const uint8_t *local = t->in[(c + i) % n] + off;
            if (t->quant) {
                pccl__quant_minmax(a, len, t->dtype, q, &mn, &sc);
                pccl__dequant_reduce(a, q, local, len, mn, sc, t->dtype, t->op);
            } else {
                pccl__reduce(a, a, local, len, t->dtype, t->op);
            }
        }
        if (t->op == PCCL_AVG) {
            pccl__avg_finalize(a, len, t->dtype, n);
        }
        if (t->quant) {
            pccl__quant_minmax(a, len, t->dtype, q, &mn, &sc);
            pccl__dequant(q, len, mn, sc, t->dtype, a);
        }
    }
    free(q);
}

static void
run_case(ccase *t, uint64_t *seed)
{
    uint32_t n = t->world, r;
    size_t es = esize_of(t->dtype);
    size_t in_elems = t->kind == KIND_AG ? t->count : t->count;
    size_t out_elems = t->kind == KIND_BCAST ? t->count
                       : t->kind == KIND_AG  ? t->count * n
                                             : t->count / n;
    uint8_t *ref = malloc(out_elems * es + 1);

    CHECK(ref != NULL);
    for (r = 0; r < n; r++) {
        t->in[r] = malloc(in_elems * es + 1);
        t->orig[r] = malloc(in_elems * es + 1);
        t->out[r] = malloc(out_elems * es + 1);
        CHECK(t->in[r] && t->orig[r] && t->out[r]);
        fill(t->in[r], in_elems, t->dtype, seed);
        memcpy(t->orig[r], t->in[r], in_elems * es);
        memset(t->out[r], 0xa5, out_elems * es);
        if (t->kind == KIND_BCAST && r == t->root) {
            memcpy(t->out[r], t->in[r], in_elems * es);
        }
        if (t->kind == KIND_AG && t->inplace_ag) {
            memcpy(t->out[r] + (size_t)r * t->count * es, t->in[r], t->count * es);
        }
    }
    ru_parallel(n, run_rank, t);
    for (r = 0; r < n; r++) {
        CHECK_OK(t->rv[r]);
        CHECK(memcmp(t->in[r], t->orig[r], in_elems * es) == 0); /* inputs untouched */
        switch (t->kind) {
        case KIND_BCAST:
            CHECK(memcmp(t->out[r], t->in[t->root], t->count * es) == 0);
            break;
        case KIND_AG: {
            uint32_t b;
            for (b = 0; b < n; b++) {
                CHECK(memcmp(t->out[r] + (size_t)b * t->count * es, t->in[b], t->count * es) ==
                      0);
            }
            break;
        }
        default:
            rs_reference(t, r, out_elems, ref);
            if (memcmp(t->out[r], ref, out_elems * es) != 0) {
                fprintf(stderr, "reduce_scatter mismatch: world %u K %u rank %u m %zu dtype %d "
                                "op %d quant %d\n",
                        n, t->K, r, out_elems, t->dtype, t->op, t->quant);
                CHECK(0);
            }
            break;
        }
    }
    for (r = 0; r < n; r++) {
        free(t->in[r]);
        free(t->orig[r]);
        free(t->out[r]);
    }
    free(ref);
}

/* Every algorithm on one cluster: sizes 0, 1, fewer than ranks, primes,
 * several slices; every dtype; for the reduce-scatter every op, with and
 * without quantization. */
static void
sweep(uint32_t world, uint32_t K, uint32_t slice_bytes, uint64_t seed)
{
    static const size_t sizes[] = {0, 1, 2, 3, 7, 1009, 4099, 20011};
    ru_cluster cl;
    pccl_comm_config cfg;
    size_t si, di;
    int op, q;
    uint64_t tag = 0;

    CHECK_OK(pccl_comm_config_init(&cfg));
    cfg.p2p_connections = K;
    cfg.slice_bytes = slice_bytes;
    cfg.progress_timeout_ms = 20000;
    ru_create(&cl, world, &cfg);
    for (si = 0; si < sizeof(sizes) / sizeof(sizes[0]); si++) {
        for (di = 0; di < sizeof(all_dtypes) / sizeof(all_dtypes[0]); di++) {
            ccase t;
            memset(&t, 0, sizeof(t));
            t.world = world;
            t.K = K;
            t.slice_bytes = slice_bytes;
            t.cl = &cl;
            t.dtype = all_dtypes[di];
            t.count = sizes[si];
            t.tag = tag++ % 3;
            t.kind = KIND_BCAST;
            t.root = (uint32_t)(ru_rand(&seed) % world);
            run_case(&t, &seed);
            t.kind = KIND_AG;
            t.inplace_ag = (int)(ru_rand(&seed) % 2);
            run_case(&t, &seed);
            t.inplace_ag = 0;
            t.kind = KIND_RS;
            t.count = sizes[si] * world;
            for (op = 0; op < PCCL_OP_COUNT; op++) {
                /* all ops on small sizes; large ones once per dtype */
                if (sizes[si] > 1009 && op != (int)(di % PCCL_OP_COUNT)) {
                    continue;
                }
                for (q = 0; q < 2; q++) {
                    if (q && !pccl__dtype_is_float(t.dtype)) {
                        continue;
                    }
                    t.op = (pccl_op)op;
                    t.quant = (pccl_quant)q;
                    run_case(&t, &seed);
                }
            }
        }
    }
    ru_destroy(&cl);
}

/* ---- barrier ------------------------------------------------------------- */

static void
barrier_holds(uint32_t world)
{
    ru_cluster cl;
    pccl_op_handle *h[RU_MAX_WORLD];
    uint32_t r;
    int round;

    ru_create(&cl, world, NULL);
    for (round = 0; round < 3; round++) {
        for (r = 0; r + 1 < world; r++) {
            CHECK_OK(pccl_comm_barrier_start(cl.comm[r], 5, &h[r]));
        }
        /* The last rank has not entered: nobody may leave. */
        for (r = 0; r + 1 < world; r++) {
            CHECK_RV(pccl_op_wait(h[r], 100, NULL), PCCL_ETIMEDOUT);
        }
        CHECK_OK(pccl_comm_barrier_start(cl.comm[world - 1], 5, &h[world - 1]));
        for (r = 0; r < world; r++) {
            CHECK_OK(pccl_op_wait(h[r], 20000, NULL));
            CHECK_OK(pccl_op_free(h[r]));
        }
    }
    ru_destroy(&cl);
    /* world 1: returns at once */
    ru_create(&cl, 1, NULL);
    CHECK_OK(pccl_comm_barrier(cl.comm[0], 0, 1000, NULL));
    ru_destroy(&cl);
}

/* ---- abort in flight ---------------------------------------------------- */

/* World 3, rank 2 never joins: ranks 0 and 1 are certainly mid-operation.
 * Abort rank 0: every started op fails, inputs unchanged; after a new
 * ring the same op succeeds. */
static void
abort_in_flight(int kind)
{
    enum { M = 300000 };
    ru_cluster cl;
    pccl_op_handle *h[2];
    float *in[3], *orig[3], *out[3];
    ccase t;
    uint32_t r;
    uint64_t seed = 99;
    pccl_result rv;

    ru_create(&cl, 3, NULL);
    for (r = 0; r < 3; r++) {
        in[r] = malloc(3 * M * sizeof(float));
        orig[r] = malloc(3 * M * sizeof(float));
        out[r] = malloc(3 * M * sizeof(float));
        CHECK(in[r] && orig[r] && out[r]);
        fill((uint8_t *)in[r], 3 * M, PCCL_FLOAT32, &seed);
        memcpy(orig[r], in[r], 3 * M * sizeof(float));
    }
    for (r = 0; r < 2; r++) {
        pccl_comm *c = cl.comm[r];
        if (kind == KIND_BCAST) {
            /* root 2 (absent): both wait for data (a root that sends
             * could finish into the socket buffers) */
            CHECK_OK(pccl_comm_broadcast_start(c, out[r], M, PCCL_FLOAT32, 2, 1, &h[r]));
        } else if (kind == KIND_AG) {
            CHECK_OK(pccl_comm_all_gather_start(c, in[r], out[r], M, PCCL_FLOAT32, 1, &h[r]));
        } else {
            CHECK_OK(pccl_comm_reduce_scatter_start(c, in[r], out[r], 3 * M, PCCL_FLOAT32,
                                                    PCCL_SUM, PCCL_QUANT_NONE, 1, &h[r]));
        }
    }
    CHECK_RV(pccl_op_wait(h[0], 50, NULL), PCCL_ETIMEDOUT);
    CHECK_OK(pccl_comm_abort(cl.comm[0]));
    CHECK_RV(pccl_op_wait(h[0], 20000, NULL), PCCL_EABORTED);
    rv = pccl_op_wait(h[1], 20000, NULL);
    CHECK(rv == PCCL_EPEERLOST || rv == PCCL_EPROTO || rv == PCCL_ERINGBROKEN);
    CHECK_OK(pccl_op_free(h[0]));
    CHECK_OK(pccl_op_free(h[1]));
    for (r = 0; r < 3; r++) {
        CHECK(memcmp(in[r], orig[r], 3 * M * sizeof(float)) == 0);
    }
    /* Rank 2 is on the old ring; a new ring for all three works. */
    ru_set_ring(&cl);
    memset(&t, 0, sizeof(t));
    t.world = 3;
    t.K = PCCL_DEFAULT_CONNECTIONS;
    t.slice_bytes = PCCL_DEFAULT_SLICE_BYTES;
    t.cl = &cl;
    t.kind = kind;
    t.dtype = PCCL_FLOAT32;
    t.count = kind == KIND_RS ? 3 * 4099 : 4099;
    t.tag = 1;
    run_case(&t, &seed);
    for (r = 0; r < 3; r++) {
        free(in[r]);
        free(orig[r]);
        free(out[r]);
    }
    ru_destroy(&cl);
}

/* ---- receive paths: frames out of schedule ------------------------------ */

static pccl__frame_out *last_emit;
static uint32_t last_conn;

static void
emit_keep(void *arg, uint32_t conn_index, pccl__frame_out *f)
{
    (void)arg;
    last_emit = f;
    last_conn = conn_index;
}

/* h is a valid header for op; each mutation must be refused, memory
 * untouched; the valid one accepted once, then refused as a duplicate. */
static void
check_rejects(pccl__coll_op *op, pccl__frame_header h, const uint8_t *mem, size_t memlen)
{
    uint8_t scratch[PCCL_MIN_SLICE_BYTES];
    uint8_t *snap = malloc(memlen + 1), *dst = NULL;
    size_t len = 0;
    uint32_t unit = 0;
    int m;

    CHECK(snap != NULL);
    memcpy(snap, mem, memlen);
    for (m = 0; m < 9; m++) {
        pccl__frame_header b = h;
        switch (m) {
        case 0: b.epoch++; break;
        case 1: b.dtype = (uint8_t)((b.dtype + 1) % PCCL_DTYPE_COUNT); break;
        case 2: b.op = PCCL_MAX; break;
        case 3: b.quant = b.quant ? 0 : 1; break;
        case 4: b.step += 100; break;
        case 5: b.offset += 1; break;
        case 6: b.offset += 1u << 30; break;
        case 7: b.count += 1; b.length += (uint32_t)(b.length / (b.count - 1 ? b.count - 1 : 1)); break;
        default: b.count = 0; b.length = 0; break;
        }
        CHECK_RV(op->vt->accept(op, 0, &b, scratch, sizeof(scratch), &dst, &len, &unit),
                 PCCL_EPROTO);
    }
    CHECK(memcmp(snap, mem, memlen) == 0);
    CHECK_OK(op->vt->accept(op, 0, &h, scratch, sizeof(scratch), &dst, &len, &unit));
    CHECK(len == h.length);
    CHECK_RV(op->vt->accept(op, 0, &h, scratch, sizeof(scratch), &dst, &len, &unit),
             PCCL_EPROTO);
    free(snap);
}

static pccl__frame_header
data_header(uint64_t offset, uint32_t count, uint32_t length, pccl_dtype d, uint32_t step)
{
    pccl__frame_header h;
    memset(&h, 0, sizeof(h));
    h.kind = PCCL__FRAME_DATA;
    h.epoch = 3;
    h.step = step;
    h.offset = offset;
    h.count = count;
    h.length = length;
    h.dtype = (uint8_t)d;
    return h;
}

static void
malformed_frames(void)
{
    pccl__ring_geom g = {.epoch = 3, .rank = 1, .world = 3, .nconns = 2,
                         .slice_bytes = PCCL_MIN_SLICE_BYTES};
    enum { N = 3000 };
    static float buf[3 * N], in[3 * N], work[3 * N], out[N];
    pccl__bcast_op bc;
    pccl__ag_op ag;
    pccl__ring_op rs;
    size_t se = PCCL_MIN_SLICE_BYTES / 4; /* 1024 floats per slice */

    /* broadcast, root 0, this is rank 1: slice 1 of 3 */
    CHECK_OK(pccl__bcast_op_init(&bc, &g, buf, N, PCCL_FLOAT32, 0, 0, 0));
    check_rejects(&bc.base, data_header(se, (uint32_t)se, (uint32_t)se * 4, PCCL_FLOAT32, 0),
                  (const uint8_t *)buf, sizeof(buf));
    bc.base.vt->fini(&bc.base);
    /* the root receives nothing */
    {
        pccl__ring_geom g0 = g;
        uint8_t *dst;
        size_t len;
        uint32_t unit;
        pccl__frame_header h = data_header(0, (uint32_t)se, (uint32_t)se * 4, PCCL_FLOAT32, 0);
        g0.rank = 0;
        CHECK_OK(pccl__bcast_op_init(&bc, &g0, buf, N, PCCL_FLOAT32, 0, 0, 0));
        CHECK_RV(bc.base.vt->accept(&bc.base, 0, &h, NULL, 0, &dst, &len, &unit), PCCL_EPROTO);
        bc.base.vt->fini(&bc.base);
    }

    /* all-gather, rank 1 of 3, N per rank: step 0 brings block 0, step 1
     * block 2 (slice 2 of 3 is short: 952 elements) */
    CHECK_OK(pccl__ag_op_init(&ag, &g, in, buf, N, PCCL_FLOAT32, 0, 0));
    check_rejects(&ag.base, data_header(2 * N + 2 * se, N - 2 * (uint32_t)se,
                                        (N - 2 * (uint32_t)se) * 4, PCCL_FLOAT32, 1),
                  (const uint8_t *)buf, sizeof(buf));
    /* block 0 at step 1 is out of schedule */
    {
        uint8_t *dst;
        size_t len;
        uint32_t unit;
        pccl__frame_header h = data_header(0, (uint32_t)se, (uint32_t)se * 4, PCCL_FLOAT32, 1);
        CHECK_RV(ag.base.vt->accept(&ag.base, 0, &h, NULL, 0, &dst, &len, &unit), PCCL_EPROTO);
    }
    ag.base.vt->fini(&ag.base);

    /* reduce-scatter, rank 1 of 3, m = N: step 0 brings chunk 1-0-2 = 2,
     * step 1 chunk 1 (the owned one) */
    CHECK_OK(pccl__rs_op_init(&rs, &g, in, out, 3 * N, PCCL_FLOAT32, PCCL_SUM, PCCL_QUANT_NONE,
                              0, 0, (uint8_t *)work, NULL));
    check_rejects(&rs.base, data_header(2 * N, (uint32_t)se, (uint32_t)se * 4, PCCL_FLOAT32, 0),
                  (const uint8_t *)out, sizeof(out));
    {
        uint8_t *dst;
        size_t len;
        uint32_t unit;
        uint8_t scratch[PCCL_MIN_SLICE_BYTES];
        /* chunk 1 at step 0, and anything at step 2 (only world-1 steps) */
        pccl__frame_header h = data_header(N, (uint32_t)se, (uint32_t)se * 4, PCCL_FLOAT32, 0);
        CHECK_RV(rs.base.vt->accept(&rs.base, 0, &h, scratch, sizeof(scratch), &dst, &len, &unit),
                 PCCL_EPROTO);
        h = data_header(0, (uint32_t)se, (uint32_t)se * 4, PCCL_FLOAT32, 2);
        CHECK_RV(rs.base.vt->accept(&rs.base, 0, &h, scratch, sizeof(scratch), &dst, &len, &unit),
                 PCCL_EPROTO);
        /* a valid step-1 slice for chunk 1 is accepted: received writes
         * the owned chunk into out (not the work buffer) */
        memset(out, 0, sizeof(out));
        h = data_header(N, (uint32_t)se, (uint32_t)se * 4, PCCL_FLOAT32, 1);
        CHECK_OK(rs.base.vt->accept(&rs.base, 0, &h, scratch, sizeof(scratch), &dst, &len, &unit));
        CHECK(dst == scratch);
        memset(scratch, 0, sizeof(scratch));
        memset(work, 0, sizeof(work));
        in[N] = 2.0f;
        rs.base.vt->received(&rs.base, unit, &h, scratch, emit_keep, NULL);
        CHECK(out[0] == 2.0f);
    }
    rs.base.vt->fini(&rs.base);
    (void)last_emit;
    (void)last_conn;
}

/* ---- argument validation ------------------------------------------------ */

static void
invalid_args(void)
{
    ru_cluster cl;
    float a[64], b[256];
    pccl_op_handle *h;

    ru_create(&cl, 2, NULL);
    CHECK_RV(pccl_comm_broadcast_start(cl.comm[0], a, 4, PCCL_FLOAT32, 2, 0, &h), PCCL_EINVAL);
    CHECK_RV(pccl_comm_broadcast_start(cl.comm[0], a, 4, (pccl_dtype)9, 0, 0, &h), PCCL_EINVAL);
    CHECK_RV(pccl_comm_broadcast_start(cl.comm[0], NULL, 4, PCCL_FLOAT32, 0, 0, &h),
             PCCL_EINVAL);
    CHECK_RV(pccl_comm_broadcast_start(NULL, a, 4, PCCL_FLOAT32, 0, 0, &h), PCCL_EINVAL);
    /* src inside dst but not at this rank's block */
    CHECK_RV(pccl_comm_all_gather_start(cl.comm[0], b + 1, b, 4, PCCL_FLOAT32, 0, &h),
             PCCL_EINVAL);
    CHECK_RV(pccl_comm_all_gather_start(cl.comm[1], b, b, 4, PCCL_FLOAT32, 0, &h), PCCL_EINVAL);
    CHECK_RV(pccl_comm_all_gather_start(cl.comm[0], a, b, SIZE_MAX / 4, PCCL_FLOAT32, 0, &h),
             PCCL_EINVAL);
    CHECK_RV(pccl_comm_reduce_scatter_start(cl.comm[0], a, b, 5, PCCL_FLOAT32, PCCL_SUM, 0, 0,
                                            &h),
             PCCL_EINVAL); /* not a multiple of world */
    CHECK_RV(pccl_comm_reduce_scatter_start(cl.comm[0], b, b + 4, 8, PCCL_FLOAT32, PCCL_SUM, 0, 0,
                                            &h),
             PCCL_EINVAL); /* overlap */
    CHECK_RV(pccl_comm_reduce_scatter_start(cl.comm[0], a, b, 8, PCCL_INT32, PCCL_SUM,
                                            PCCL_QUANT_UINT8_MINMAX, 0, &h),
             PCCL_EINVAL);
    CHECK_RV(pccl_comm_reduce_scatter_start(cl.comm[0], a, b, 8, PCCL_FLOAT32, (pccl_op)5, 0, 0,
                                            &h),
             PCCL_EINVAL);
    CHECK_RV(pccl_comm_barrier_start(NULL, 0, &h), PCCL_EINVAL);
    /* A busy tag is refused whatever the kind of op. */
    CHECK_OK(pccl_comm_barrier_start(cl.comm[0], 9, &h));
    {
        pccl_op_handle *h2;
        CHECK_RV(pccl_comm_broadcast_start(cl.comm[0], a, 4, PCCL_FLOAT32, 0, 9, &h2),
                 PCCL_EBUSY);
    }
    {
        pccl_reduce_info bi;
        CHECK_OK(pccl_comm_barrier(cl.comm[1], 9, 20000, &bi));
        CHECK(bi.world == 2 && bi.tx_bytes == bi.rx_bytes && bi.tx_bytes == 73);
    }
    CHECK_OK(pccl_op_wait(h, 20000, NULL));
    CHECK_OK(pccl_op_free(h));
    ru_destroy(&cl);
}

/* ---- a send-only op finishes on the engine thread ----------------------- */

/* The root of a broadcast only sends.  Started with a wake-up of the
 * engine thread and waited for at once (as the Python bindings do), the
 * engine thread may write all its frames while handling the wake-up that
 * the waiter's own wake-up merged into; the op must be finished then,
 * not at the next socket event (there is none: nothing comes back to the
 * root).  A race: many rounds make it likely (it was hit in about 1 op
 * in 15 before the engine finished such ops in handle_requests). */
typedef struct sendonly_arg {
    ru_cluster *cl;
    float *buf[RU_MAX_WORLD];
} sendonly_arg;

static void
sendonly_rank(uint32_t r, void *p)
{
    sendonly_arg *a = p;
    pccl_op_handle *h;

    CHECK_OK(pccl_comm_broadcast_start(a->cl->comm[r], a->buf[r], 100, PCCL_FLOAT32, 0, 4, &h));
    CHECK_OK(pccl_op_wait(h, 5000, NULL));
    CHECK_OK(pccl_op_free(h));
}

static void
send_only_completes(void)
{
    ru_cluster cl;
    pccl_comm_config cfg;
    sendonly_arg a;
    float bufs[2][100];
    uint32_t r;
    int i, round;

    CHECK_OK(pccl_comm_config_init(&cfg));
    cfg.progress_timeout_ms = 30000; /* far beyond the wait above */
    ru_create(&cl, 2, &cfg);
    a.cl = &cl;
    for (round = 0; round < 300; round++) {
        for (r = 0; r < 2; r++) {
            a.buf[r] = bufs[r];
            for (i = 0; i < 100; i++) {
                bufs[r][i] = (float)(r * 1000 + i + round);
            }
        }
        ru_parallel(2, sendonly_rank, &a);
        CHECK(memcmp(bufs[1], bufs[0], sizeof(bufs[0])) == 0);
    }
    ru_destroy(&cl);
}

int
main(void)
{
    static const uint32_t Ks[] = {1, 4, 16};
    uint64_t t0 = ru_now_ms();
    uint32_t w, k;

    malformed_frames();
    invalid_args();
    send_only_completes();
    for (w = 1; w <= 4; w++) {
        for (k = 0; k < 3; k++) {
            sweep(w, Ks[k], k == 1 ? PCCL_MIN_SLICE_BYTES : PCCL_DEFAULT_SLICE_BYTES,
                  1234 + w * 7 + k);
        }
    }
    fprintf(stderr, "sweeps ok (%llu ms)\n", (unsigned long long)(ru_now_ms() - t0));
    for (w = 1; w <= 4; w++) {
        if (w > 1) {
            barrier_holds(w);
        }
    }
    abort_in_flight(KIND_BCAST);
    abort_in_flight(KIND_AG);
    abort_in_flight(KIND_RS);
    fprintf(stderr, "colls_test ok (%llu ms)\n", (unsigned long long)(ru_now_ms() - t0));
    return 0;
}
