/*
 * allreduce_ring.c - ring all-reduce, pipelined per slice, striped over K
 * connections.
 *
 * The algorithm, step by step (world n, this peer has rank r, it sends to
 * rank r+1 and receives from rank r-1, all ranks modulo n):
 *
 *  1. The tensor of `count` elements is cut into n chunks; the first
 *     count % n chunks get one element more than the others.  Each chunk
 *     is cut into slices of slice_elems elements, a number every peer
 *     computes alike:
 *         slice_elems = clamp(ceil(ceil(count / n) / K),
 *                             PCCL_MIN_SLICE_BYTES / esize,
 *                             slice_bytes / esize)
 *     so that one chunk spreads over all K connections unless it is huge.
 *
 *  2. There are 2n-2 global steps t = 0 .. 2n-3.  At step t rank r sends
 *     chunk (r - t) and receives chunk (r - t - 1).  Steps t < n-1 are the
 *     reduce-scatter, steps t >= n-1 the all-gather.
 *
 *  3. Reduce-scatter.  A slice received at step t < n-1 is combined with
 *     the local input: dst = received op src.  (Each chunk other than r
 *     is received exactly once in this phase, so src is read, never
 *     written, and the operand order is the same on every peer.)  At step
 *     n-2 the chunk received is r+1, now reduced over all n inputs: this
 *     peer owns it and finalizes it (AVG divides by n once).
 *
 *  4. All-gather.  The owner forwards its finished chunk; every later hop
 *     stores the slice verbatim (reading it straight into dst)
 *     and forwards it.  Because exactly one peer finalizes each chunk and
 *     everybody else copies those bits, all peers end bit-identical.
 *
 *  5. Pipelining.  The chunk received at step t is the chunk sent at step
 *     t+1, so slice j of step t+1 becomes ready the moment slice j of step
 *     t has been received and processed: slices flow around the ring
 *     without waiting for whole chunks.  Step-0 slices come straight from
 *     src (no copy).
 *
 *  6. Striping.  Slice j of step t travels on connection (j + t) % K; the
 *     receiver places slices by their offset, so arrival order across
 *     connections does not matter, and one operation uses all K.  With a
 *     flow-splitting plan the connections carry weighted shares instead
 *     (coll/stripe.h): the s-th slice of the edge, counted over the steps
 *     in order, goes where the ring's schedule says, the same on both
 *     ends.
 *
 *  7. Quantization (UINT8_MINMAX, floating dtypes).  A reduce-scatter
 *     slice is quantized just before it is sent (min and scale travel in
 *     the frame header), and the receiver computes dst = dequant(q) op
 *     src.  The owner, after finalizing, quantizes its chunk and replaces
 *     its own copy with dequant(quant(x)), exactly what the others will
 *     decode.  All-gather slices are forwarded as the same bytes with the
 *     same min/scale (never re-quantized) and decoded into dst.
 *
 *  8. Buffers.  Results are written straight into dst.  Out of place
 *     nothing else is needed.  In place, dst is the input, and a failed
 *     operation must leave it as it was: each slice is saved to a backup
 *     buffer before its first write and restored from it on failure
 *     (with cache-bypassing stores: the backup is read only on failure,
 *     and this way it does not push the working set out of the caches;
 *     3-7 % faster from 16 MiB up on the 2-core development machine).  The
 *     reduce-scatter saves the slices it writes while it reduces them
 *     (block by block, so the local operand is read from memory once);
 *     chunk r, first written by the all-gather, is copied ahead of time
 *     by the waiting thread (the interface's assist) while the network is
 *     busy, or by the engine if it gets there first.  A per-slice atomic
 *     state (not saved / being copied / claimed for the fused save /
 *     saved) settles who copies.  In place, dst aliases src: the
 *     reduce-scatter computes dst = received op dst, which the kernels
 *     allow.  Reduce-scatter payloads land in a per-connection slice
 *     scratch buffer and are reduced at once.
 *
 * Every received header is checked against this schedule: right dtype, op
 * and quantization, a step in range, an offset and count that are exactly
 * one slice of the chunk expected at that step, and a slice not received
 * before.  Anything else is PCCL_EPROTO and never touches memory.
 *
 * Why no slice is overwritten while still needed: a buffer region written
 * at an all-gather receive was last read by a reduce-scatter send of the
 * same slice, and the all-gather data causally follows the owner having
 * received that send in full, i.e. after our write of it completed.
 */
#include <stdlib.h>
#include <string.h>

#include "coll/allreduce_ring.h"
#include "coll/kernels.h"
#include "coll/quant.h"
#include "coll/stripe.h"

/* Backup state of one slice (in-place operations): not saved, being
 * copied by some thread, claimed by the engine to be saved by the reduce
 * that writes it (reduce-scatter), saved. */
enum { BK_NONE = 0, BK_BUSY = 1, BK_FUSE = 2, BK_DONE = 3 };

/* Bytes saved and reduced per step of the fused loop: small enough that
 * the local operand is still in L1 when the reduce reads it again. */
enum { FUSE_BLOCK = 8192 };

/* (a - b) mod n for a, b < 2^32 and n >= 1. */
static uint32_t
ring_sub(uint32_t a, uint32_t b, uint32_t n)
{
    uint64_t v = (uint64_t)a + (uint64_t)n * 2u - (uint64_t)(b % n);
    return (uint32_t)(v % n);
}

/* The chunk sent at step t and received at step t. */
static uint32_t
send_chunk(const pccl__ring_op *o, uint32_t t)
{
    return ring_sub(o->g.rank, (t + o->shift) % o->g.world, o->g.world);
}

static uint32_t
recv_chunk(const pccl__ring_op *o, uint32_t t)
{
    return ring_sub(o->g.rank, (t + 1 + o->shift) % o->g.world, o->g.world);
}

static size_t
compute_slice_elems(size_t count, size_t esize, uint32_t world, uint32_t nconns,
                    uint32_t slice_bytes)
{
    size_t per_chunk = count / world + (count % world != 0);
    size_t s = per_chunk / nconns + (per_chunk % nconns != 0);
    size_t lo = PCCL_MIN_SLICE_BYTES / esize;
    size_t hi = slice_bytes / esize;

    if (s < lo) {
        s = lo;
    }
    if (s > hi) {
        s = hi;
    }
    return s == 0 ? 1 : s;
}

/* World 1: the result is the input, finalized the same way the owner of a
 * chunk would finalize it. */
static void
finish_alone(pccl__ring_op *o)
{
    size_t off;

    if (o->dst != o->src) {
        memcpy(o->dst, o->src, o->count * o->esize);
    }
    if (o->op == PCCL_AVG) {
        pccl__avg_finalize(o->dst, o->count, o->dtype, 1);
    }
    if (o->quant == PCCL_QUANT_UINT8_MINMAX) {
        for (off = 0; off < o->count; off += o->slice_elems) {
            size_t n = o->count - off < o->slice_elems ? o->count - off : o->slice_elems;
            uint8_t *x = o->dst + off * o->esize;
            double mn, sc;
            pccl__quant_minmax(x, n, o->dtype, o->qbuf, &mn, &sc);
            pccl__dequant(o->qbuf, n, mn, sc, o->dtype, x);
        }
    }
}

void
pccl__ring_op_buffers(const pccl__ring_geom *g, size_t count, pccl_dtype dtype, int in_place,
                      pccl_quant quant, size_t *backup_bytes, size_t *q_bytes)
{
    size_t esize = 1, se;

    (void)pccl_dtype_size(dtype, &esize);
    *backup_bytes = 0;
    *q_bytes = 0;
    if (count == 0) {
        return;
    }
    if (g->world > 1 && in_place) {
        *backup_bytes = count * esize;
    }
    if (quant != PCCL_QUANT_NONE) {
        se = compute_slice_elems(count, esize, g->world, g->nconns, g->slice_bytes);
        *q_bytes = g->world > 1 ? count : (count < se ? count : se);
    }
}

pccl_result
pccl__ring_op_init(pccl__ring_op *o, const pccl__ring_geom *g, const void *src, void *dst,
                   size_t count, pccl_dtype dtype, pccl_op op, pccl_quant quant, uint64_t tag,
                   uint32_t seq, uint8_t *backup_buf, uint8_t *q_buf)
{
    return pccl__ring_sched_init(o, &pccl__allreduce_ring_vt, 0, g, src, dst, NULL, count, dtype,
                                 op, quant, tag, seq, backup_buf, q_buf);
}

pccl_result
pccl__ring_sched_init(pccl__ring_op *o, const pccl__coll_vtable *vt, int rs,
                      const pccl__ring_geom *g, const void *src, void *dst, void *own_out,
                      size_t count, pccl_dtype dtype, pccl_op op, pccl_quant quant,
                      uint64_t tag, uint32_t seq, uint8_t *backup_buf, uint8_t *q_buf)
{
    uint32_t n = g->world, c, t;
    size_t base, extra, total_slices = 0, nunits, sz;
    uint8_t *p;

    memset(o, 0, sizeof(*o));
    o->src = src;
    o->dst = dst;
    o->count = count;
    o->dtype = dtype;
    o->op = op;
    o->quant = quant;
    o->base.vt = vt;
    o->base.tag = tag;
    o->base.seq = seq;
    o->base.world = g->world;
    o->g = *g;
    if (rs) {
        o->shift = 1;
        o->own_out = own_out;
        if (n == 1) {
            o->dst = own_out; /* alone, the owned chunk is the whole tensor */
        }
    }
    (void)pccl_dtype_size(dtype, &o->esize);
    if (count == 0) {
        return PCCL_OK;
    }
    o->slice_elems = compute_slice_elems(count, o->esize, n, g->nconns, g->slice_bytes);
    o->qbuf = q_buf;
    if (n == 1) {
        finish_alone(o);
        return PCCL_OK;
    }

    o->nsteps = rs ? n - 1 : 2 * n - 2;
    base = count / n;
    extra = count % n;
    o->max_slices = (uint32_t)((base + (extra != 0) + o->slice_elems - 1) / o->slice_elems);
    nunits = (size_t)o->nsteps * o->max_slices;
    if (nunits > UINT32_MAX) {
        return PCCL_ENOMEM; /* unit ids are 32-bit; a smaller tensor fits */
    }

    /* One block: chunk tables, per-step slice bases, send units, receive
     * bitmap, backup states, quant meta. */
    sz = n * (2 * sizeof(size_t) + 2 * sizeof(uint32_t)) +
         2 * (size_t)o->nsteps * sizeof(uint32_t);
    sz = (sz + 15) & ~(size_t)15;
    {
        size_t units_off = sz;
        size_t seen_off = units_off + nunits * sizeof(pccl__frame_out);
        size_t all_slices = (count + o->slice_elems - 1) / o->slice_elems + n;
        size_t saved_off = seen_off + nunits;
        size_t meta_off = (saved_off + all_slices + 15) & ~(size_t)15;
        size_t total = meta_off + (quant ? 2 * all_slices * sizeof(double) : 0);

        if ((o->mem = calloc(1, total)) == NULL) {
            return PCCL_ENOMEM;
        }
        p = o->mem;
        o->chunk_off = (size_t *)(void *)p;
        o->chunk_len = o->chunk_off + n;
        o->chunk_nslices = (uint32_t *)(void *)(o->chunk_len + n);
        o->chunk_first = o->chunk_nslices + n;
        o->send_base = o->chunk_first + n;
        o->recv_base = o->send_base + o->nsteps;
        o->units = (pccl__frame_out *)(void *)(p + units_off);
        o->recv_seen = p + seen_off;
        o->saved = p + saved_off;
        if (quant) {
            o->qmin = (double *)(void *)(p + meta_off);
            o->qscale = o->qmin + all_slices;
        }
    }
    for (c = 0; c < n; c++) {
        o->chunk_len[c] = base + (c < extra);
        o->chunk_off[c] = (size_t)c * base + (c < extra ? c : extra);
        o->chunk_nslices[c] =
            (uint32_t)((o->chunk_len[c] + o->slice_elems - 1) / o->slice_elems);
        o->chunk_first[c] = (uint32_t)total_slices;
        total_slices += o->chunk_nslices[c];
    }
    for (t = 0; t < o->nsteps; t++) {
        o->send_base[t] = (uint32_t)o->sends_left;
        o->recv_base[t] = (uint32_t)o->recvs_left;
        o->sends_left += o->chunk_nslices[send_chunk(o, t)];
        o->recvs_left += o->chunk_nslices[recv_chunk(o, t)];
    }
    if (dst == src) {
        o->backup = backup_buf;
        o->base.assist = backup_buf != NULL;
    }
    return PCCL_OK;
}

/* The vtable's functions get the base; the op is the struct around it. */
static pccl__ring_op *
ring_of(pccl__coll_op *b)
{
    return (pccl__ring_op *)(void *)b;
}

static const pccl__ring_op *
cring_of(const pccl__coll_op *b)
{
    return (const pccl__ring_op *)(const void *)b;
}

static void
ring_fini(pccl__coll_op *b)
{
    pccl__ring_op *o = ring_of(b);

    free(o->mem);
    o->mem = NULL;
}

/* A unit not yet received is scheduled on inbound connection conn_index. */
static int
expects_on(const pccl__ring_op *o, uint32_t conn_index)
{
    uint32_t t, j;

    if (o->recvs_left == 0) {
        return 0;
    }
    for (t = 0; t < o->nsteps; t++) {
        uint32_t ns = o->chunk_nslices[recv_chunk(o, t)];
        for (j = 0; j < ns; j++) {
            uint32_t k = pccl__stripe_conn(&o->g, 0, (uint64_t)o->recv_base[t] + j, t, j);
            if (k == conn_index && !o->recv_seen[(size_t)t * o->max_slices + j]) {
                return 1;
            }
        }
    }
    return 0;
}

static int
ring_needs_conn(const pccl__coll_op *b, uint32_t conn_index, int outbound)
{
    const pccl__ring_op *o = cring_of(b);

    return outbound ? o->sends_left > 0 : expects_on(o, conn_index);
}

static int
ring_done(const pccl__coll_op *b)
{
    const pccl__ring_op *o = cring_of(b);

    return o->sends_left == 0 && o->recvs_left == 0;
}

/* Byte range of slice j of chunk c. */
static void
slice_range(const pccl__ring_op *o, uint32_t c, uint32_t j, size_t *off, size_t *len)
{
    size_t rel = (size_t)j * o->slice_elems;
    size_t n = o->chunk_len[c] - rel < o->slice_elems ? o->chunk_len[c] - rel : o->slice_elems;

    *off = (o->chunk_off[c] + rel) * o->esize;
    *len = n * o->esize;
}

/* Save slice j of chunk c unless somebody did or does; 1 if this call
 * copied it. */
static int
try_save(pccl__ring_op *o, uint32_t c, uint32_t j)
{
    uint8_t *st = &o->saved[o->chunk_first[c] + j];
    uint8_t expect = BK_NONE;
    size_t off, len;

    if (__atomic_load_n(st, __ATOMIC_ACQUIRE) != BK_NONE ||
        !__atomic_compare_exchange_n(st, &expect, BK_BUSY, 0, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE)) {
        return 0;
    }
    slice_range(o, c, j, &off, &len);
    pccl__copy_nt(o->backup + off, o->dst + off, len);
    pccl__copy_nt_fence();
    __atomic_store_n(st, BK_DONE, __ATOMIC_RELEASE);
    return 1;
}

/* Engine: slice j of chunk c is about to be written at step t.  A
 * reduce-scatter slice (t < n-1) is claimed for the fused save in
 * ring_received (the payload lands in scratch, so dst is not
 * written before that); any other is copied now unless done already. */
static void
ensure_saved(pccl__ring_op *o, uint32_t t, uint32_t c, uint32_t j)
{
    uint8_t *st = &o->saved[o->chunk_first[c] + j];
    uint8_t expect = BK_NONE;

    if (o->backup == NULL) {
        return;
    }
    if (t < o->g.world - 1 &&
        __atomic_compare_exchange_n(st, &expect, BK_FUSE, 0, __ATOMIC_ACQ_REL,
                                    __ATOMIC_ACQUIRE)) {
        return;
    }
    if (try_save(o, c, j)) {
        return;
    }
    /* Another thread is copying it: one slice, a few microseconds. */
    while (__atomic_load_n(st, __ATOMIC_ACQUIRE) == BK_BUSY) {
        pccl__thread_yield();
    }
}

/* Reduce-scatter into an in-place tensor, saving the input on the way:
 * backup = local; out = received op local, block by block so the local
 * operand is read from memory once.  The backup is written with streaming
 * stores (never read unless the op fails); the caller fences. */
static void
reduce_saving(pccl__ring_op *o, uint8_t *out, const uint8_t *scratch, const uint8_t *local,
              size_t len, size_t byte_off)
{
    size_t per = FUSE_BLOCK / o->esize, done;

    for (done = 0; done < len; done += per) {
        size_t n = len - done < per ? len - done : per;
        pccl__copy_nt(o->backup + byte_off + done * o->esize, local + done * o->esize,
                      n * o->esize);
        pccl__reduce(out + done * o->esize, scratch + done * o->esize, local + done * o->esize,
                     n, o->dtype, o->op);
    }
}

/* assist: save the next slice of chunk r (one slice copy at most);
 * 0 once they are all saved. */
static int
ring_assist(pccl__coll_op *b)
{
    pccl__ring_op *o = ring_of(b);
    /* Only chunk r, which the engine first writes at all-gather step n-1
     * without reducing into it; the others are saved by the fused
     * reduce-scatter. */
    uint32_t c = recv_chunk(o, o->g.world - 1);

    while (o->backup != NULL && o->save_j < o->chunk_nslices[c]) {
        if (try_save(o, c, o->save_j++)) {
            return 1;
        }
    }
    return 0;
}

static void
ring_restore(pccl__coll_op *b)
{
    pccl__ring_op *o = ring_of(b);
    uint32_t c, j;
    size_t off, len;

    if (o->backup == NULL) {
        return;
    }
    for (c = 0; c < o->g.world; c++) {
        for (j = 0; j < o->chunk_nslices[c]; j++) {
            if (__atomic_load_n(&o->saved[o->chunk_first[c] + j], __ATOMIC_ACQUIRE) == BK_DONE) {
                slice_range(o, c, j, &off, &len);
                memcpy(o->dst + off, o->backup + off, len);
            }
        }
    }
}

/* Fill and emit send unit (t, j). */
static void
send_unit(pccl__ring_op *o, uint32_t t, uint32_t j, pccl__emit_fn emit, void *arg)
{
    uint32_t c = send_chunk(o, t);
    size_t rel = (size_t)j * o->slice_elems;
    size_t off = o->chunk_off[c] + rel;
    size_t len = o->chunk_len[c] - rel < o->slice_elems ? o->chunk_len[c] - rel : o->slice_elems;
    pccl__frame_out *f = &o->units[(size_t)t * o->max_slices + j];
    pccl__frame_header h;
    const uint8_t *from = (t == 0) ? o->src : o->dst;

    memset(&h, 0, sizeof(h));
    h.kind = PCCL__FRAME_DATA;
    h.epoch = o->g.epoch;
    h.tag = o->base.tag;
    h.seq = o->base.seq;
    h.step = t;
    h.offset = off;
    h.count = (uint32_t)len;
    h.dtype = (uint8_t)o->dtype;
    h.op = (uint8_t)o->op;
    h.quant = (uint8_t)o->quant;
    if (o->quant == PCCL_QUANT_NONE) {
        f->payload = from + off * o->esize;
        f->len = (uint32_t)(len * o->esize);
    } else {
        size_t gs = o->chunk_first[c] + j;
        if (t < o->g.world - 1) {
            /* Reduce-scatter: quantize the partial sum as it leaves. */
            pccl__quant_minmax(from + off * o->esize, len, o->dtype, o->qbuf + off,
                               &o->qmin[gs], &o->qscale[gs]);
        }
        h.qmin = o->qmin[gs];
        h.qscale = o->qscale[gs];
        f->payload = o->qbuf + off;
        f->len = (uint32_t)len;
    }
    h.length = f->len;
    f->owner = &o->base;
    f->next = NULL;
    pccl__frame_encode(&h, f->hdr);
    emit(arg, pccl__stripe_conn(&o->g, 1, (uint64_t)o->send_base[t] + j, t, j), f);
}

static void
ring_begin(pccl__coll_op *b, pccl__emit_fn emit, void *arg)
{
    pccl__ring_op *o = ring_of(b);
    uint32_t j, ns;

    if (o->nsteps == 0) {
        return;
    }
    ns = o->chunk_nslices[send_chunk(o, 0)];
    for (j = 0; j < ns; j++) {
        send_unit(o, 0, j, emit, arg);
    }
}

/* Which inbound connection a slice came on does not matter (the receiver
 * places slices by offset), so conn_index is not checked. */
static pccl_result
ring_accept(pccl__coll_op *b, uint32_t conn_index, const pccl__frame_header *h,
            uint8_t *scratch, size_t scratch_len, uint8_t **dst, size_t *len, uint32_t *unit)
{
    pccl__ring_op *o = ring_of(b);
    uint32_t c, j;
    size_t rel, want, u;

    (void)conn_index;
    if (h->epoch != o->g.epoch || h->dtype != (uint8_t)o->dtype || h->op != (uint8_t)o->op ||
        h->quant != (uint8_t)o->quant || h->step >= o->nsteps) {
        return PCCL_EPROTO;
    }
    c = recv_chunk(o, h->step);
    if (h->offset < o->chunk_off[c]) {
        return PCCL_EPROTO;
    }
    rel = (size_t)(h->offset - o->chunk_off[c]);
    if (h->offset - o->chunk_off[c] >= o->chunk_len[c] || rel % o->slice_elems != 0) {
        return PCCL_EPROTO;
    }
    j = (uint32_t)(rel / o->slice_elems);
    want = o->chunk_len[c] - rel < o->slice_elems ? o->chunk_len[c] - rel : o->slice_elems;
    if (h->count != want) {
        return PCCL_EPROTO;
    }
    u = (size_t)h->step * o->max_slices + j;
    if (o->recv_seen[u]) {
        return PCCL_EPROTO;
    }
    /* The decoder tied length to count, dtype and quant; checked again
     * here because it bounds the write below. */
    if (h->length != (o->quant ? want : want * o->esize)) {
        return PCCL_EPROTO;
    }
    if (h->step < o->g.world - 1) {
        if (h->length > scratch_len) {
            return PCCL_EPROTO;
        }
        *dst = scratch;
    } else if (o->quant) {
        size_t gs = o->chunk_first[c] + j;
        o->qmin[gs] = h->qmin;
        o->qscale[gs] = h->qscale;
        *dst = o->qbuf + h->offset;
    } else {
        *dst = o->dst + h->offset * o->esize;
    }
    ensure_saved(o, h->step, c, j); /* before the first write to this slice */
    o->recv_seen[u] = 1;
    *len = h->length;
    *unit = (uint32_t)u;
    return PCCL_OK;
}

static void
ring_received(pccl__coll_op *b, uint32_t unit, const pccl__frame_header *h,
              const uint8_t *scratch, pccl__emit_fn emit, void *arg)
{
    pccl__ring_op *o = ring_of(b);
    uint32_t t = unit / o->max_slices;
    uint32_t j = unit % o->max_slices;
    uint32_t n = o->g.world;
    uint32_t c = recv_chunk(o, t);
    size_t rel = (size_t)j * o->slice_elems;
    size_t off = o->chunk_off[c] + rel;
    size_t len = o->chunk_len[c] - rel < o->slice_elems ? o->chunk_len[c] - rel : o->slice_elems;
    size_t gs = o->chunk_first[c] + j;
    /* The reduce-scatter's owned chunk goes to its own output. */
    uint8_t *out = (o->own_out != NULL && t == n - 2) ? o->own_out + rel * o->esize
                                                       : o->dst + off * o->esize;

    if (t < n - 1) {
        const uint8_t *local = o->src + off * o->esize;
        int fuse = o->backup != NULL &&
                   __atomic_load_n(&o->saved[gs], __ATOMIC_ACQUIRE) == BK_FUSE;
        if (fuse && o->quant) {
            pccl__copy_nt(o->backup + off * o->esize, local, len * o->esize);
        }
        if (o->quant) {
            pccl__dequant_reduce(out, scratch, local, len, h->qmin, h->qscale, o->dtype, o->op);
        } else if (fuse) {
            reduce_saving(o, out, scratch, local, len, off * o->esize);
        } else {
            pccl__reduce(out, scratch, local, len, o->dtype, o->op);
        }
        if (fuse) {
            pccl__copy_nt_fence();
            __atomic_store_n(&o->saved[gs], BK_DONE, __ATOMIC_RELEASE);
        }
        if (t == n - 2) {
            /* This peer owns chunk c: finalize it once, for everybody. */
            if (o->op == PCCL_AVG) {
                pccl__avg_finalize(out, len, o->dtype, n);
            }
            if (o->quant) {
                pccl__quant_minmax(out, len, o->dtype, o->qbuf + off, &o->qmin[gs],
                                   &o->qscale[gs]);
                pccl__dequant(o->qbuf + off, len, o->qmin[gs], o->qscale[gs], o->dtype, out);
            }
        }
    } else if (o->quant) {
        pccl__dequant(o->qbuf + off, len, o->qmin[gs], o->qscale[gs], o->dtype, out);
    }
    o->recvs_left--;
    o->base.rx_bytes += PCCL__FRAME_HEADER_SIZE + (uint64_t)h->length;
    if (t + 1 < o->nsteps) {
        send_unit(o, t + 1, j, emit, arg);
    }
}

static void
ring_sent(pccl__coll_op *b, const pccl__frame_out *f)
{
    pccl__ring_op *o = ring_of(b);

    o->sends_left--;
    o->base.tx_bytes += PCCL__FRAME_HEADER_SIZE + (uint64_t)f->len;
}

const pccl__coll_vtable pccl__allreduce_ring_vt = {
    "allreduce_ring", ring_begin,  ring_accept, ring_received, ring_sent,
    ring_needs_conn,  ring_done,   ring_assist, ring_restore,  ring_fini,
};

/* The reduce-scatter (reducescatter_ring.c) runs the same schedule code:
 * its steps are the all-reduce's first world-1, shifted by one chunk. */
const pccl__coll_vtable pccl__reducescatter_ring_vt = {
    "reducescatter_ring", ring_begin,  ring_accept, ring_received, ring_sent,
    ring_needs_conn,      ring_done,   ring_assist, ring_restore,  ring_fini,
};
