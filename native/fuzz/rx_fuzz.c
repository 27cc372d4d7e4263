/*
 * rx_fuzz.c - libFuzzer harness for the whole receive path of a ring
 * all-reduce, through the operation interface (coll/coll.h) exactly as
 * the engine calls it.
 *
 * The first 4 input bytes choose an operation (world 2-5, rank, K 1-4,
 * dtype, op, quantization, element count); the rest is the byte stream
 * that arrives on an inbound ring connection.  The harness writes it into
 * one end of a socketpair and drives the other end as the I/O engine does:
 * pccl__conn_recv_header (frame decoding), vt->accept (the schedule
 * check: epoch 0, tag 0, seq 0), pccl__conn_recv_payload into the place
 * accept chose, vt->received (reduce, dequantize, finalize, forward).  Frames the op emits are accounted as sent at once.
 * Checked besides "no crash / no UB / no overread": only documented codes
 * come back, a frame is never accepted twice (the op never finishes with
 * more receives than it expects), and an in-place op that does not finish
 * gives the input back exactly (vt->restore) whatever it wrote.
 *
 * Built with -DRX_FUZZ_SEEDS it is instead a seed generator: it runs every
 * rank of the same configurations in memory and writes the exact stream
 * rank r receives from rank r-1, so the fuzzer starts from valid frames
 * deep in the schedule (see README.md).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "coll/allreduce_ring.h"
#include "coll/coll.h"
#include "net/conn.h"
#include "net/frame.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

typedef struct cfg {
    uint32_t world, rank, nconns;
    pccl_dtype dtype;
    pccl_op op;
    pccl_quant quant;
    size_t count;
} cfg;

static const size_t esizes[PCCL_DTYPE_COUNT] = {4, 8, 2, 2, 1, 2, 4, 8, 1};

static void
parse_cfg(const uint8_t *b, cfg *c)
{
    c->world = 2 + (b[0] & 3);
    c->rank = (uint32_t)(b[0] >> 2) % c->world;
    c->nconns = 1 + (b[1] & 3);
    c->dtype = (pccl_dtype)((b[1] >> 2) % PCCL_DTYPE_COUNT);
    c->op = (pccl_op)(b[2] % PCCL_OP_COUNT);
    c->quant = (b[2] & 0x80) && c->dtype <= PCCL_BFLOAT16 ? PCCL_QUANT_UINT8_MINMAX
                                                            : PCCL_QUANT_NONE;
    /* Up to ~3 slices of 4 KiB per chunk for the widest type. */
    c->count = 1 + (size_t)b[3] * 24;
}

typedef struct rank_state {
    pccl__ring_op ring;
    pccl__coll_op *op;      /* &ring.base: what the engine sees */
    uint8_t *src, *dst, *backup, *qbuf;
} rank_state;

static int
rank_init(rank_state *s, const cfg *c, uint32_t rank, int in_place)
{
    pccl__ring_geom g = {.epoch = 0, .rank = rank, .world = c->world, .nconns = c->nconns,
                         .slice_bytes = PCCL_MIN_SLICE_BYTES};
    size_t nbytes = c->count * esizes[c->dtype], backup_b = 0, q_b = 0, i;

    memset(s, 0, sizeof(*s));
    pccl__ring_op_buffers(&g, c->count, c->dtype, in_place, c->quant, &backup_b, &q_b);
    s->src = malloc(nbytes);
    s->dst = in_place ? s->src : malloc(nbytes);
    s->backup = backup_b ? malloc(backup_b) : NULL;
    s->qbuf = q_b ? malloc(q_b) : NULL;
    if (s->src == NULL || s->dst == NULL || (backup_b && !s->backup) || (q_b && !s->qbuf)) {
        return -1;
    }
    /* Small integers: valid in every dtype (for floats the bit patterns
     * are just some finite numbers). */
    for (i = 0; i < nbytes; i++) {
        s->src[i] = (uint8_t)((i * 7 + rank) & 0x3f);
    }
    s->op = &s->ring.base;
    if (pccl__ring_op_init(&s->ring, &g, s->src, s->dst, c->count, c->dtype, c->op, c->quant, 0,
                           0, s->backup, s->qbuf) != PCCL_OK) {
        return -1;
    }
    return 0;
}

static void
rank_fini(rank_state *s)
{
    if (s->op != NULL) {
        s->op->vt->fini(s->op);
    }
    if (s->dst != s->src) {
        free(s->dst);
    }
    free(s->src);
    free(s->backup);
    free(s->qbuf);
}

/* ---- the fuzz target ---------------------------------------------------- */

/* Emitted frames are "sent" once the call that emitted them returns, as
 * the engine would (never from inside the op's own callback). */
static pccl__frame_out *sent_q[4096];
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

/* Feed as much of the stream as the socket takes; close when done. */
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
    size_t off = 0, expected_recvs, nbytes;
    uint8_t *orig;
    pccl_result rv = PCCL_OK;

    if (size < 4 || size > (1u << 20)) {
        return 0;
    }
    parse_cfg(data, &c);
    data += 4;
    size -= 4;
    if (rank_init(&s, &c, c.rank, c.op == PCCL_PROD) != 0) {
        rank_fini(&s);
        return 0;
    }
    expected_recvs = s.ring.recvs_left;
    nbytes = c.count * esizes[c.dtype];
    orig = malloc(nbytes);
    if (orig == NULL) {
        rank_fini(&s);
        return 0;
    }
    memcpy(orig, s.src, nbytes);
    scratch = malloc(PCCL_MIN_SLICE_BYTES);
    if (scratch == NULL || socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) {
        free(scratch);
        free(orig);
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

    for (;;) {
        size_t moved = 0;
        int ready = 0, done = 0;

        pump(sv[0], data, size, &off);
        if (off == size && sv[0] >= 0) {
            close(sv[0]); /* end of stream after the input */
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
                    rv = PCCL_EPROTO; /* the engine's epoch check */
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
                if (op->vt->done(op)) {
                    break;
                }
            }
        }
        if (moved == 0 && !ready && !done && sv[0] < 0) {
            /* Nothing moved with the writer closed: the next read sees EOF. */
            continue;
        }
    }
    if (rv != PCCL_OK && rv != PCCL_EPROTO && rv != PCCL_EPEERLOST) {
        __builtin_trap();
    }
    if (s.ring.recvs_left > expected_recvs) {
        __builtin_trap();
    }
    if (s.dst == s.src && !s.op->vt->done(s.op)) {
        /* Failed in place: the input comes back bit for bit. */
        s.op->vt->restore(s.op);
        if (memcmp(s.src, orig, nbytes) != 0) {
            __builtin_trap();
        }
    }
    free(orig);
    pccl__conn_fini(&conn);
    if (sv[0] >= 0) {
        close(sv[0]);
    }
    free(scratch);
    rank_fini(&s);
    return 0;
}

/* ---- seed generator ------------------------------------------------------ */
#ifdef RX_FUZZ_SEEDS

typedef struct sim {
    rank_state *ranks;
    uint32_t world, target;
    uint8_t *out;
    size_t out_len, out_cap;
    struct pending {
        uint32_t from;
        pccl__frame_out *f;
    } *q;
    size_t qhead, qtail, qcap;
    uint32_t emitter;
} sim;

static sim *g_sim;

static void
sim_emit(void *arg, uint32_t conn_index, pccl__frame_out *f)
{
    sim *m = g_sim;
    (void)conn_index;
    if (m->qtail == m->qcap) {
        m->qcap = m->qcap ? m->qcap * 2 : 64;
        m->q = realloc(m->q, m->qcap * sizeof(*m->q));
    }
    m->q[m->qtail].from = (uint32_t)(uintptr_t)arg;
    m->q[m->qtail].f = f;
    m->qtail++;
}

static void
append(sim *m, const uint8_t *p, size_t n)
{
    if (m->out_len + n > m->out_cap) {
        m->out_cap = (m->out_len + n) * 2;
        m->out = realloc(m->out, m->out_cap);
    }
    memcpy(m->out + m->out_len, p, n);
    m->out_len += n;
}

static int
simulate(const uint8_t cfgb[4], const char *path)
{
    cfg c;
    sim m;
    uint32_t r;
    uint8_t *scratch = malloc(PCCL_MIN_SLICE_BYTES);
    FILE *fp;
    int ok = 0;

    parse_cfg(cfgb, &c);
    memset(&m, 0, sizeof(m));
    g_sim = &m;
    m.world = c.world;
    m.target = c.rank;
    m.ranks = calloc(c.world, sizeof(rank_state));
    for (r = 0; r < c.world; r++) {
        if (rank_init(&m.ranks[r], &c, r, c.op == PCCL_PROD) != 0) {
            return -1;
        }
    }
    append(&m, cfgb, 4);
    for (r = 0; r < c.world; r++) {
        m.ranks[r].op->vt->begin(m.ranks[r].op, sim_emit, (void *)(uintptr_t)r);
    }
    while (m.qhead < m.qtail) {
        uint32_t from = m.q[m.qhead].from, to = (from + 1) % c.world;
        pccl__frame_out *f = m.q[m.qhead].f;
        pccl__frame_header h;
        uint8_t *dst;
        size_t len;
        uint32_t unit;
        m.qhead++;
        if (to == m.target) {
            append(&m, f->hdr, sizeof(f->hdr));
            append(&m, f->payload, f->len);
        }
        if (pccl__frame_decode(f->hdr, sizeof(f->hdr), &h) != PCCL_OK ||
            m.ranks[to].op->vt->accept(m.ranks[to].op, 0, &h, scratch, PCCL_MIN_SLICE_BYTES,
                                       &dst, &len, &unit) != PCCL_OK) {
            fprintf(stderr, "seed simulation: frame rejected\n");
            return -1;
        }
        memcpy(dst, f->payload, len);
        m.ranks[from].op->vt->sent(m.ranks[from].op, f);
        m.ranks[to].op->vt->received(m.ranks[to].op, unit, &h, scratch, sim_emit,
                                     (void *)(uintptr_t)to);
    }
    for (r = 0; r < c.world; r++) {
        ok |= !m.ranks[r].op->vt->done(m.ranks[r].op);
        rank_fini(&m.ranks[r]);
    }
    if ((fp = fopen(path, "wb")) == NULL) {
        return -1;
    }
    fwrite(m.out, 1, m.out_len, fp);
    fclose(fp);
    free(m.out);
    free(m.q);
    free(m.ranks);
    free(scratch);
    return ok ? -1 : 0;
}

int
main(int argc, char **argv)
{
    /* A spread of configurations: every dtype, op and quantization, a few
     * worlds, ranks, K and sizes. */
    static const uint8_t cfgs[][4] = {
        {0x00, 0x00, 0x00, 0x01}, {0x05, 0x01, 0x80, 0x20}, {0x0a, 0x06, 0x01, 0x40},
        {0x03, 0x0b, 0x82, 0x10}, {0x0e, 0x0c, 0x83, 0x30}, {0x01, 0x13, 0x04, 0x08},
        {0x06, 0x16, 0x00, 0x50}, {0x0b, 0x1a, 0x01, 0x02}, {0x02, 0x1f, 0x03, 0x60},
        {0x07, 0x21, 0x02, 0x80}, {0x0c, 0x04, 0x80, 0xff}, {0x0f, 0x08, 0x81, 0x05},
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
    printf("wrote %zu seeds to %s\n", i, dir);
    return 0;
}
#endif
