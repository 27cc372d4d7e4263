/*
 * coll_fuzz.c - libFuzzer harness for the receive paths of the ring
 * broadcast, all-gather and reduce-scatter, through the operation
 * interface (coll/coll.h) exactly as the engine calls it.
 *
 * The first 4 input bytes choose an operation: the algorithm (broadcast,
 * all-gather, reduce-scatter), world 2-5, rank, root, K 1-4, dtype, op,
 * quantization and element count; the rest is the byte stream that
 * arrives on an inbound ring connection.  As in rx_fuzz.c, the harness
 * writes it into one end of a socketpair and drives the other end as the
 * engine does: pccl__conn_recv_header, vt->accept (epoch 0, tag 0, seq 0),
 * pccl__conn_recv_payload into the place accept chose, vt->received.
 * Frames the op emits are accounted as sent at once.  Checked besides "no
 * crash / no UB / no overread": only EPROTO/EPEERLOST come back, a unit is
 * never received twice, and the op's input (the root's broadcast buffer,
 * the all-gather's and reduce-scatter's source) is bit for bit unchanged
 * whatever arrived.
 *
 * Built with -DCOLL_FUZZ_SEEDS it is instead a seed generator: it runs
 * every rank of a spread of configurations in memory and writes the exact
 * stream one rank receives, so fuzzing starts from valid frames.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "coll/allgather_ring.h"
#include "coll/broadcast_ring.h"
#include "coll/coll.h"
#include "coll/reducescatter_ring.h"
#include "net/conn.h"
#include "net/frame.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

enum { ALG_BCAST = 0, ALG_AG = 1, ALG_RS = 2 };

typedef struct cfg {
    int alg;
    uint32_t world, rank, root, nconns;
    pccl_dtype dtype;
    pccl_op op;
    pccl_quant quant;
    size_t count; /* bcast: elements; ag: per rank; rs: per rank of the output */
} cfg;

static const size_t esizes[PCCL_DTYPE_COUNT] = {4, 8, 2, 2, 1, 2, 4, 8, 1};

static void
parse_cfg(const uint8_t *b, cfg *c)
{
    c->alg = (b[0] & 3) % 3;
    c->world = 2 + ((b[0] >> 2) & 3);
    c->rank = (uint32_t)(b[0] >> 4) % c->world;
    c->root = (uint32_t)(b[1] >> 5) % c->world;
    c->nconns = 1 + (b[1] & 3);
    c->dtype = (pccl_dtype)((b[1] >> 2 & 7) % PCCL_DTYPE_COUNT);
    c->op = (pccl_op)(b[2] % PCCL_OP_COUNT);
    c->quant = c->alg == ALG_RS && (b[2] & 0x80) && c->dtype <= PCCL_BFLOAT16
                   ? PCCL_QUANT_UINT8_MINMAX
                   : PCCL_QUANT_NONE;
    /* A few 4 KiB slices per block for the widest type. */
    c->count = 1 + (size_t)b[3] * 12;
}

typedef struct rank_state {
    union {
        pccl__bcast_op bc;
        pccl__ag_op ag;
        pccl__ring_op rs;
    } u;
    pccl__coll_op *op;
    uint8_t *in, *out, *work, *qbuf, *orig;
    size_t in_bytes;
} rank_state;

static int
rank_init(rank_state *s, const cfg *c, uint32_t rank)
{
    pccl__ring_geom g = {.epoch = 0, .rank = rank, .world = c->world, .nconns = c->nconns,
                         .slice_bytes = PCCL_MIN_SLICE_BYTES};
    size_t es = esizes[c->dtype], out_bytes, i, wb = 0, qb = 0;
    pccl_result rv;

    memset(s, 0, sizeof(*s));
    s->in_bytes = c->alg == ALG_RS ? c->count * c->world * es : c->count * es;
    out_bytes = c->alg == ALG_AG ? c->count * c->world * es : c->count * es;
    s->in = malloc(s->in_bytes);
    s->orig = malloc(s->in_bytes);
    s->out = malloc(out_bytes);
    if (c->alg == ALG_RS) {
        pccl__rs_op_buffers(&g, c->count * c->world, c->dtype, c->quant, &wb, &qb);
        s->work = wb ? malloc(wb) : NULL;
        s->qbuf = qb ? malloc(qb) : NULL;
    }
    if (!s->in || !s->orig || !s->out || (wb && !s->work) || (qb && !s->qbuf)) {
        return -1;
    }
    for (i = 0; i < s->in_bytes; i++) {
        s->in[i] = (uint8_t)((i * 7 + rank) & 0x3f); /* finite in every dtype */
    }
    memcpy(s->orig, s->in, s->in_bytes);
    switch (c->alg) {
    case ALG_BCAST:
        /* The root broadcasts its input; the others receive into out. */
        s->op = &s->u.bc.base;
        rv = pccl__bcast_op_init(&s->u.bc, &g, rank == c->root ? s->in : s->out, c->count,
                                 c->dtype, c->root, 0, 0);
        break;
    case ALG_AG:
        s->op = &s->u.ag.base;
        rv = pccl__ag_op_init(&s->u.ag, &g, s->in, s->out, c->count, c->dtype, 0, 0);
        break;
    default:
        s->op = &s->u.rs.base;
        rv = pccl__rs_op_init(&s->u.rs, &g, s->in, s->out, c->count * c->world, c->dtype, c->op,
                              c->quant, 0, 0, s->work, s->qbuf);
        break;
    }
    if (rv != PCCL_OK) {
        s->op = NULL;
        return -1;
    }
    return 0;
}

static size_t
recvs_left(const rank_state *s, const cfg *c)
{
    return c->alg == ALG_BCAST ? s->u.bc.recvs_left
           : c->alg == ALG_AG  ? s->u.ag.recvs_left
                               : s->u.rs.recvs_left;
}

static void
rank_fini(rank_state *s)
{
    if (s->op != NULL) {
        s->op->vt->fini(s->op);
    }
    free(s->in);
    free(s->orig);
    free(s->out);
    free(s->work);
    free(s->qbuf);
}

/* ---- the fuzz target ---------------------------------------------------- */

static pccl__frame_out *sent_q[8192];
static size_t sent_n;

static void
emit_sent(void *arg, uint32_t conn_index, pccl__frame_out *f)
{
    (void)arg;
    (void)conn_index;
    if (sent_n < sizeof(sent_q) / sizeof(sent_q[0])) {
        sent_q[sent_n++] = f;
    }
}

static void
flush_sent(void)
{
    size_t i;
    for (i = 0; i < sent_n; i++) {
        pccl__coll_op *op = sent_q[i]->owner;
        op->vt->sent(op, sent_q[i]);
    }
    sent_n = 0;
}

static void
pump(int fd, const uint8_t *data, size_t size, size_t *off)
{
    while (fd >= 0 && *off < size) {
        ssize_t n = send(fd, data + *off, size - *off, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n <= 0) {
            return;
        }
        *off += (size_t)n;
    }
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    cfg c;
    rank_state s;
    pccl__conn conn;
    uint8_t *scratch;
    int sv[2];
    size_t off = 0, expected;
    pccl_result rv = PCCL_OK;

    if (size < 4 || size > (1u << 20)) {
        return 0;
    }
    parse_cfg(data, &c);
    data += 4;
    size -= 4;
    if (rank_init(&s, &c, c.rank) != 0) {
        rank_fini(&s);
        return 0;
    }
    expected = recvs_left(&s, &c);
    scratch = malloc(PCCL_MIN_SLICE_BYTES);
    if (scratch == NULL || socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) {
        free(scratch);
        rank_fini(&s);
        return 0;
    }
    fcntl(sv[1], F_SETFL, fcntl(sv[1], F_GETFL) | O_NONBLOCK);
    pccl__conn_init(&conn, sv[1], 0, 0);
    conn.scratch = scratch;
    conn.scratch_len = PCCL_MIN_SLICE_BYTES;
    sent_n = 0;
    s.op->vt->begin(s.op, emit_sent, NULL);
    flush_sent();

    while (!s.op->vt->done(s.op)) {
        size_t moved = 0;
        int ready = 0, done = 0;

        pump(sv[0], data, size, &off);
        if (off == size && sv[0] >= 0) {
            close(sv[0]);
            sv[0] = -1;
        }
        if (conn.rstate == PCCL__RX_HEADER) {
            if ((rv = pccl__conn_recv_header(&conn, &ready, &moved)) != PCCL_OK) {
                break;
            }
            if (ready) {
                uint8_t *dst;
                size_t len;
                uint32_t unit;
                if (conn.rh.epoch != 0) {
                    rv = PCCL_EPROTO;
                    break;
                }
                if ((rv = s.op->vt->accept(s.op, conn.index, &conn.rh, conn.scratch,
                                           conn.scratch_len, &dst, &len, &unit)) != PCCL_OK) {
                    break;
                }
                pccl__conn_expect(&conn, dst, len, s.op, unit);
            }
        } else {
            if ((rv = pccl__conn_recv_payload(&conn, &done, &moved)) != PCCL_OK) {
                break;
            }
            if (done) {
                pccl__coll_op *op = conn.rop;
                op->vt->received(op, conn.runit, &conn.rh, conn.scratch, emit_sent, NULL);
                flush_sent();
            }
        }
    }
    if (rv != PCCL_OK && rv != PCCL_EPROTO && rv != PCCL_EPEERLOST) {
        __builtin_trap();
    }
    if (recvs_left(&s, &c) > expected) {
        __builtin_trap(); /* a unit received twice (the count wrapped) */
    }
    s.op->vt->restore(s.op);
    if (memcmp(s.in, s.orig, s.in_bytes) != 0) {
        __builtin_trap(); /* an input was written */
    }
    pccl__conn_fini(&conn);
    if (sv[0] >= 0) {
        close(sv[0]);
    }
    free(scratch);
    rank_fini(&s);
    return 0;
}

/* ---- seed generator ------------------------------------------------------ */
#ifdef COLL_FUZZ_SEEDS

typedef struct pending {
    uint32_t from;
    pccl__frame_out *f;
} pending;

static pending *q;
static size_t qhead, qtail, qcap;

static void
sim_emit(void *arg, uint32_t conn_index, pccl__frame_out *f)
{
    (void)conn_index;
    if (qtail == qcap) {
        qcap = qcap ? qcap * 2 : 64;
        q = realloc(q, qcap * sizeof(*q));
    }
    q[qtail].from = (uint32_t)(uintptr_t)arg;
    q[qtail].f = f;
    qtail++;
}

static int
simulate(const uint8_t cfgb[4], const char *path)
{
    cfg c;
    rank_state *ranks;
    uint8_t *scratch = malloc(PCCL_MIN_SLICE_BYTES);
    FILE *fp;
    uint32_t r;
    int bad = 0;

    parse_cfg(cfgb, &c);
    qhead = qtail = 0;
    ranks = calloc(c.world, sizeof(*ranks));
    if ((fp = fopen(path, "wb")) == NULL) {
        return -1;
    }
    fwrite(cfgb, 1, 4, fp);
    for (r = 0; r < c.world; r++) {
        if (rank_init(&ranks[r], &c, r) != 0) {
            return -1;
        }
    }
    for (r = 0; r < c.world; r++) {
        ranks[r].op->vt->begin(ranks[r].op, sim_emit, (void *)(uintptr_t)r);
    }
    while (qhead < qtail) {
        uint32_t from = q[qhead].from, to = (from + 1) % c.world;
        pccl__frame_out *f = q[qhead].f;
        pccl__frame_header h;
        uint8_t *dst;
        size_t len;
        uint32_t unit;
        qhead++;
        if (to == c.rank) {
            fwrite(f->hdr, 1, sizeof(f->hdr), fp);
            fwrite(f->payload, 1, f->len, fp);
        }
        if (pccl__frame_decode(f->hdr, sizeof(f->hdr), &h) != PCCL_OK ||
            ranks[to].op->vt->accept(ranks[to].op, 0, &h, scratch, PCCL_MIN_SLICE_BYTES, &dst,
                                     &len, &unit) != PCCL_OK) {
            fprintf(stderr, "seed simulation: frame rejected\n");
            return -1;
        }
        memcpy(dst, f->payload, len);
        ranks[from].op->vt->sent(ranks[from].op, f);
        ranks[to].op->vt->received(ranks[to].op, unit, &h, scratch, sim_emit,
                                   (void *)(uintptr_t)to);
    }
    fclose(fp);
    for (r = 0; r < c.world; r++) {
        bad |= !ranks[r].op->vt->done(ranks[r].op);
        rank_fini(&ranks[r]);
    }
    free(ranks);
    free(scratch);
    return bad ? -1 : 0;
}

int
main(int argc, char **argv)
{
    /* Every algorithm with a spread of worlds, ranks, roots, K, dtypes,
     * ops, quantization and sizes. */
    static const uint8_t cfgs[][4] = {
        {0x00, 0x00, 0x00, 0x01}, {0x14, 0x21, 0x00, 0x20}, {0x2c, 0x46, 0x01, 0x40},
        {0x01, 0x00, 0x00, 0x02}, {0x15, 0x0b, 0x00, 0x30}, {0x3d, 0x1e, 0x00, 0x55},
        {0x02, 0x00, 0x00, 0x01}, {0x16, 0x05, 0x81, 0x20}, {0x2e, 0x1a, 0x02, 0x44},
        {0x3a, 0x0c, 0x83, 0x10}, {0x06, 0x13, 0x04, 0x60}, {0x1a, 0x00, 0x80, 0xff},
    };
    const char *dir = argc > 1 ? argv[1] : ".";
    char path[4096];
    size_t i;

    for (i = 0; i < sizeof(cfgs) / sizeof(cfgs[0]); i++) {
        snprintf(path, sizeof(path), "%s/seed-%02zu", dir, i);
        if (simulate(cfgs[i], path) != 0) {
            fprintf(stderr, "seed %zu failed\n", i);
            return 1;
        }
    }
    free(q);
    printf("wrote %zu seeds to %s\n", i, dir);
    return 0;
}
#endif
