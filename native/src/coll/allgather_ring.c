/*
 * allgather_ring.c - ring all-gather, pipelined per slice, striped over K
 * connections.
 *
 * The algorithm (world n, this peer has rank r, it sends to r+1 and
 * receives from r-1, ranks modulo n; every rank contributes one block of
 * `count` elements and ends with all n blocks in rank order):
 *
 *  1. init copies this rank's input into block r of the output (nothing
 *     when the input already is that block).  Each block is cut into
 *     slices of slice_elems elements, computed alike on every peer:
 *         slice_elems = clamp(ceil(count / K), PCCL_MIN_SLICE_BYTES / esize,
 *                             slice_bytes / esize)
 *
 *  2. There are n-1 steps t = 0 .. n-2.  At step t rank r sends block
 *     (r - t) and receives block (r - t - 1).  Step-0 slices come
 *     straight from the input.
 *
 *  3. A received slice is read straight into the output at its place and
 *     forwarded, the same bytes, as slice j of step t+1 (the block received
 *     at step t is the block sent at step t+1), the moment it is complete:
 *     slices flow around the ring without waiting for whole blocks.  Every
 *     block is copied verbatim, so all peers end bit-identical.
 *
 *  4. Striping: slice j of step t travels on connection (j + t) % K.
 *
 *  5. A received header must carry this ring's epoch, the all-gather's
 *     dtype, op SUM, no quantization, a step < n-1, an offset that starts
 *     a slice of the block expected at that step, exactly that slice's
 *     count, and a unit not received before.  Anything else is
 *     PCCL_EPROTO and touches no memory.
 *
 * Why nothing is overwritten while needed: every region of the output
 * other than block r is written once (its receive) and read afterwards
 * only to forward it; block r is written by init before any frame leaves.
 * The input is never written.  A failed all-gather leaves the input as
 * it was and the output unspecified (output only: nothing is saved).
 */
#include <stdlib.h>
#include <string.h>

#include "coll/allgather_ring.h"

static pccl__ag_op *
ag_of(pccl__coll_op *b)
{
    return (pccl__ag_op *)(void *)b;
}

static const pccl__ag_op *
cag_of(const pccl__coll_op *b)
{
    return (const pccl__ag_op *)(const void *)b;
}

static uint32_t
ring_sub(uint32_t a, uint32_t b, uint32_t n)
{
    uint64_t v = (uint64_t)a + (uint64_t)n * 2u - (uint64_t)(b % n);
    return (uint32_t)(v % n);
}

static uint32_t
send_block(const pccl__ag_op *o, uint32_t t)
{
    return ring_sub(o->g.rank, t % o->g.world, o->g.world);
}

static uint32_t
recv_block(const pccl__ag_op *o, uint32_t t)
{
    return ring_sub(o->g.rank, (t + 1) % o->g.world, o->g.world);
}

pccl_result
pccl__ag_op_init(pccl__ag_op *o, const pccl__ring_geom *g, const void *src, void *dst,
                 size_t count, pccl_dtype dtype, uint64_t tag, uint32_t seq)
{
    size_t s, lo, hi, ns, nunits;
    uint8_t *mem, *mine;

    memset(o, 0, sizeof(*o));
    o->base.vt = &pccl__allgather_ring_vt;
    o->base.tag = tag;
    o->base.seq = seq;
    o->base.world = g->world;
    o->src = src;
    o->dst = dst;
    o->count = count;
    o->dtype = dtype;
    o->g = *g;
    (void)pccl_dtype_size(dtype, &o->esize);
    if (count == 0) {
        return PCCL_OK;
    }
    mine = o->dst + (size_t)g->rank * count * o->esize;
    if (mine != o->src) {
        memcpy(mine, o->src, count * o->esize);
    }
    if (g->world == 1) {
        return PCCL_OK;
    }
    s = count / g->nconns + (count % g->nconns != 0);
    lo = PCCL_MIN_SLICE_BYTES / o->esize;
    hi = g->slice_bytes / o->esize;
    s = s < lo ? lo : s;
    s = s > hi ? hi : s;
    o->slice_elems = s == 0 ? 1 : s;
    ns = (count + o->slice_elems - 1) / o->slice_elems;
    o->nsteps = g->world - 1;
    nunits = ns * o->nsteps;
    if (nunits > UINT32_MAX) {
        return PCCL_ENOMEM;
    }
    o->nslices = (uint32_t)ns;
    if ((mem = calloc(nunits, sizeof(pccl__frame_out) + 1)) == NULL) {
        return PCCL_ENOMEM;
    }
    o->units = (pccl__frame_out *)(void *)mem;
    o->recv_seen = mem + nunits * sizeof(pccl__frame_out);
    o->sends_left = nunits;
    o->recvs_left = nunits;
    return PCCL_OK;
}

pccl_result
pccl__barrier_op_init(pccl__ag_op *o, const pccl__ring_geom *g, uint8_t *out, uint64_t tag,
                      uint32_t seq)
{
    static const uint8_t token = 1;

    return pccl__ag_op_init(o, g, &token, out, 1, PCCL_UINT8, tag, seq);
}

static void
ag_fini(pccl__coll_op *b)
{
    pccl__ag_op *o = ag_of(b);

    free(o->units);
    o->units = NULL;
}

static size_t
slice_len(const pccl__ag_op *o, uint32_t j)
{
    size_t rel = (size_t)j * o->slice_elems;

    return o->count - rel < o->slice_elems ? o->count - rel : o->slice_elems;
}

static void
send_unit(pccl__ag_op *o, uint32_t t, uint32_t j, pccl__emit_fn emit, void *arg)
{
    uint32_t blk = send_block(o, t);
    pccl__frame_out *f = &o->units[(size_t)t * o->nslices + j];
    pccl__frame_header h;
    size_t rel = (size_t)j * o->slice_elems, len = slice_len(o, j);
    size_t off = (size_t)blk * o->count + rel;

    memset(&h, 0, sizeof(h));
    h.kind = PCCL__FRAME_DATA;
    h.epoch = o->g.epoch;
    h.tag = o->base.tag;
    h.seq = o->base.seq;
    h.step = t;
    h.offset = off;
    h.count = (uint32_t)len;
    h.dtype = (uint8_t)o->dtype;
    h.op = (uint8_t)PCCL_SUM;
    h.quant = (uint8_t)PCCL_QUANT_NONE;
    f->payload = (t == 0 ? o->src + rel * o->esize : o->dst + off * o->esize);
    f->len = (uint32_t)(len * o->esize);
    h.length = f->len;
    f->owner = &o->base;
    f->next = NULL;
    pccl__frame_encode(&h, f->hdr);
    emit(arg, (j + t) % o->g.nconns, f);
}

static void
ag_begin(pccl__coll_op *b, pccl__emit_fn emit, void *arg)
{
    pccl__ag_op *o = ag_of(b);
    uint32_t j;

    for (j = 0; j < o->nslices && o->nsteps > 0; j++) {
        send_unit(o, 0, j, emit, arg);
    }
}

static pccl_result
ag_accept(pccl__coll_op *b, uint32_t conn_index, const pccl__frame_header *h, uint8_t *scratch,
          size_t scratch_len, uint8_t **dst, size_t *len, uint32_t *unit)
{
    pccl__ag_op *o = ag_of(b);
    uint64_t start, rel;
    uint32_t j;
    size_t want, u;

    (void)conn_index;
    (void)scratch;
    (void)scratch_len;
    if (o->recvs_left == 0 || h->epoch != o->g.epoch || h->dtype != (uint8_t)o->dtype ||
        h->op != (uint8_t)PCCL_SUM || h->quant != (uint8_t)PCCL_QUANT_NONE ||
        h->step >= o->nsteps) {
        return PCCL_EPROTO;
    }
    start = (uint64_t)recv_block(o, h->step) * o->count;
    if (h->offset < start || h->offset - start >= o->count) {
        return PCCL_EPROTO;
    }
    rel = h->offset - start;
    if (rel % o->slice_elems != 0) {
        return PCCL_EPROTO;
    }
    j = (uint32_t)(rel / o->slice_elems);
    want = slice_len(o, j);
    u = (size_t)h->step * o->nslices + j;
    if (h->count != want || h->length != want * o->esize || o->recv_seen[u]) {
        return PCCL_EPROTO;
    }
    o->recv_seen[u] = 1;
    *dst = o->dst + h->offset * o->esize;
    *len = h->length;
    *unit = (uint32_t)u;
    return PCCL_OK;
}

static void
ag_received(pccl__coll_op *b, uint32_t unit, const pccl__frame_header *h,
            const uint8_t *scratch, pccl__emit_fn emit, void *arg)
{
    pccl__ag_op *o = ag_of(b);
    uint32_t t = unit / o->nslices, j = unit % o->nslices;

    (void)scratch;
    o->recvs_left--;
    o->base.rx_bytes += PCCL__FRAME_HEADER_SIZE + (uint64_t)h->length;
    if (t + 1 < o->nsteps) {
        send_unit(o, t + 1, j, emit, arg);
    }
}

static void
ag_sent(pccl__coll_op *b, const pccl__frame_out *f)
{
    pccl__ag_op *o = ag_of(b);

    o->sends_left--;
    o->base.tx_bytes += PCCL__FRAME_HEADER_SIZE + (uint64_t)f->len;
}

static int
ag_needs_conn(const pccl__coll_op *b, uint32_t conn_index, int outbound)
{
    const pccl__ag_op *o = cag_of(b);
    uint32_t t, j;

    if (outbound) {
        return o->sends_left > 0;
    }
    if (o->recvs_left == 0) {
        return 0;
    }
    for (t = 0; t < o->nsteps; t++) {
        for (j = 0; j < o->nslices; j++) {
            if ((j + t) % o->g.nconns == conn_index && !o->recv_seen[(size_t)t * o->nslices + j]) {
                return 1;
            }
        }
    }
    return 0;
}

static int
ag_done(const pccl__coll_op *b)
{
    const pccl__ag_op *o = cag_of(b);

    return o->sends_left == 0 && o->recvs_left == 0;
}

static void
ag_restore(pccl__coll_op *b)
{
    (void)b; /* the input is never written; the output is output only */
}

const pccl__coll_vtable pccl__allgather_ring_vt = {
    "allgather_ring", ag_begin, ag_accept, ag_received, ag_sent,
    ag_needs_conn,    ag_done,  NULL,      ag_restore,  ag_fini,
};
