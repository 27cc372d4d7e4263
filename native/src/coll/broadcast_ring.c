/*
 * broadcast_ring.c - ring broadcast, pipelined per slice, striped over K
 * connections.
 *
 * The algorithm (world n, root q, this peer has rank r; it sends to r+1
 * and receives from r-1, ranks modulo n):
 *
 *  1. The buffer of `count` elements is cut into slices of slice_elems
 *     elements, computed alike on every peer:
 *         slice_elems = clamp(ceil(count / 2K), PCCL_MIN_SLICE_BYTES / esize,
 *                             slice_bytes / esize)
 *     so that even a small buffer keeps all K connections busy and a
 *     large one is a long pipeline of slices.
 *
 *  2. The root emits every slice at once; slice j travels on connection
 *     j % K.
 *
 *  3. Every other rank reads slice j straight into its buffer at the
 *     slice's offset and, the moment it is complete, forwards the same
 *     bytes to its successor on the same connection index - unless the
 *     successor is the root (rank q-1 ends the chain).  Slices flow along
 *     the ring without waiting for the whole buffer: the broadcast takes
 *     about one buffer time plus n-2 slice times.
 *
 *  4. There is only one step (0).  A received header must carry this
 *     ring's epoch, the broadcast's dtype, op SUM, no quantization, step
 *     0, an offset that starts a slice, exactly that slice's count, and a
 *     slice not received before.  Anything else is PCCL_EPROTO and
 *     touches no memory.
 *
 * Why nothing is overwritten while needed: the root never writes; every
 * other rank writes each region of its buffer exactly once (the receive)
 * and reads it afterwards only to forward it.  A failed broadcast leaves
 * the root's buffer as it was and the others' buffers unspecified (they
 * are output only: nothing is saved).
 */
#include <stdlib.h>
#include <string.h>

#include "coll/broadcast_ring.h"

static pccl__bcast_op *
bc_of(pccl__coll_op *b)
{
    return (pccl__bcast_op *)(void *)b;
}

static const pccl__bcast_op *
cbc_of(const pccl__coll_op *b)
{
    return (const pccl__bcast_op *)(const void *)b;
}

pccl_result
pccl__bcast_op_init(pccl__bcast_op *o, const pccl__ring_geom *g, void *buf, size_t count,
                    pccl_dtype dtype, uint32_t root, uint64_t tag, uint32_t seq)
{
    size_t s, lo, hi, ns;
    uint8_t *mem;

    memset(o, 0, sizeof(*o));
    o->base.vt = &pccl__broadcast_ring_vt;
    o->base.tag = tag;
    o->base.seq = seq;
    o->base.world = g->world;
    o->buf = buf;
    o->count = count;
    o->dtype = dtype;
    o->root = root;
    o->g = *g;
    (void)pccl_dtype_size(dtype, &o->esize);
    if (count == 0 || g->world == 1) {
        return PCCL_OK;
    }
    s = count / (2u * g->nconns) + (count % (2u * g->nconns) != 0);
    lo = PCCL_MIN_SLICE_BYTES / o->esize;
    hi = g->slice_bytes / o->esize;
    s = s < lo ? lo : s;
    s = s > hi ? hi : s;
    o->slice_elems = s == 0 ? 1 : s;
    ns = (count + o->slice_elems - 1) / o->slice_elems;
    if (ns > UINT32_MAX) {
        return PCCL_ENOMEM;
    }
    o->nslices = (uint32_t)ns;
    o->forwards = g->rank == root || (g->rank + 1) % g->world != root;
    if ((mem = calloc(ns, sizeof(pccl__frame_out) + 1)) == NULL) {
        return PCCL_ENOMEM;
    }
    o->units = (pccl__frame_out *)(void *)mem;
    o->recv_seen = mem + ns * sizeof(pccl__frame_out);
    o->sends_left = o->forwards ? ns : 0;
    o->recvs_left = g->rank == root ? 0 : ns;
    return PCCL_OK;
}

static void
bc_fini(pccl__coll_op *b)
{
    pccl__bcast_op *o = bc_of(b);

    free(o->units);
    o->units = NULL;
}

static size_t
slice_len(const pccl__bcast_op *o, uint32_t j)
{
    size_t rel = (size_t)j * o->slice_elems;

    return o->count - rel < o->slice_elems ? o->count - rel : o->slice_elems;
}

static void
send_slice(pccl__bcast_op *o, uint32_t j, pccl__emit_fn emit, void *arg)
{
    pccl__frame_out *f = &o->units[j];
    pccl__frame_header h;
    size_t off = (size_t)j * o->slice_elems, len = slice_len(o, j);

    memset(&h, 0, sizeof(h));
    h.kind = PCCL__FRAME_DATA;
    h.epoch = o->g.epoch;
    h.tag = o->base.tag;
    h.seq = o->base.seq;
    h.step = 0;
    h.offset = off;
    h.count = (uint32_t)len;
    h.dtype = (uint8_t)o->dtype;
    h.op = (uint8_t)PCCL_SUM;
    h.quant = (uint8_t)PCCL_QUANT_NONE;
    f->payload = o->buf + off * o->esize;
    f->len = (uint32_t)(len * o->esize);
    h.length = f->len;
    f->owner = &o->base;
    f->next = NULL;
    pccl__frame_encode(&h, f->hdr);
    emit(arg, j % o->g.nconns, f);
}

static void
bc_begin(pccl__coll_op *b, pccl__emit_fn emit, void *arg)
{
    pccl__bcast_op *o = bc_of(b);
    uint32_t j;

    if (o->g.rank != o->root) {
        return;
    }
    for (j = 0; j < o->nslices; j++) {
        send_slice(o, j, emit, arg);
    }
}

/* The receiver places slices by offset; the connection is not checked. */
static pccl_result
bc_accept(pccl__coll_op *b, uint32_t conn_index, const pccl__frame_header *h, uint8_t *scratch,
          size_t scratch_len, uint8_t **dst, size_t *len, uint32_t *unit)
{
    pccl__bcast_op *o = bc_of(b);
    uint32_t j;
    size_t want;

    (void)conn_index;
    (void)scratch;
    (void)scratch_len;
    if (o->recvs_left == 0 || h->epoch != o->g.epoch || h->dtype != (uint8_t)o->dtype ||
        h->op != (uint8_t)PCCL_SUM || h->quant != (uint8_t)PCCL_QUANT_NONE || h->step != 0 ||
        h->offset >= o->count || h->offset % o->slice_elems != 0) {
        return PCCL_EPROTO;
    }
    j = (uint32_t)(h->offset / o->slice_elems);
    want = slice_len(o, j);
    if (h->count != want || h->length != want * o->esize || o->recv_seen[j]) {
        return PCCL_EPROTO;
    }
    o->recv_seen[j] = 1;
    *dst = o->buf + h->offset * o->esize;
    *len = h->length;
    *unit = j;
    return PCCL_OK;
}

static void
bc_received(pccl__coll_op *b, uint32_t unit, const pccl__frame_header *h,
            const uint8_t *scratch, pccl__emit_fn emit, void *arg)
{
    pccl__bcast_op *o = bc_of(b);

    (void)scratch;
    o->recvs_left--;
    o->base.rx_bytes += PCCL__FRAME_HEADER_SIZE + (uint64_t)h->length;
    if (o->forwards) {
        send_slice(o, unit, emit, arg);
    }
}

static void
bc_sent(pccl__coll_op *b, const pccl__frame_out *f)
{
    pccl__bcast_op *o = bc_of(b);

    o->sends_left--;
    o->base.tx_bytes += PCCL__FRAME_HEADER_SIZE + (uint64_t)f->len;
}

static int
bc_needs_conn(const pccl__coll_op *b, uint32_t conn_index, int outbound)
{
    const pccl__bcast_op *o = cbc_of(b);
    uint32_t j;

    if (outbound) {
        return o->sends_left > 0;
    }
    if (o->recvs_left == 0) {
        return 0;
    }
    for (j = conn_index; j < o->nslices; j += o->g.nconns) {
        if (!o->recv_seen[j]) {
            return 1;
        }
    }
    return 0;
}

static int
bc_done(const pccl__coll_op *b)
{
    const pccl__bcast_op *o = cbc_of(b);

    return o->sends_left == 0 && o->recvs_left == 0;
}

static void
bc_restore(pccl__coll_op *b)
{
    (void)b; /* the root never writes; the others' buffers are output only */
}

const pccl__coll_vtable pccl__broadcast_ring_vt = {
    "broadcast_ring", bc_begin, bc_accept,  bc_received, bc_sent,
    bc_needs_conn,    bc_done,  NULL,       bc_restore,  bc_fini,
};
