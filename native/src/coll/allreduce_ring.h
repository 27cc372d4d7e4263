/*
 * allreduce_ring.h - one ring all-reduce operation: schedule and state.
 *
 * An implementation of the operation interface (coll/coll.h): init fills
 * in base.vt = &pccl__allreduce_ring_vt and the engine drives the rest
 * through it.  See allreduce_ring.c for the algorithm.
 *
 * Threads: pccl__ring_op_buffers/init, vt->restore and vt->fini run on the
 * caller's thread; begin/accept/received/sent/needs_conn/done on the
 * thread holding the progress lock; vt->assist (saving the in-place
 * input ahead of the engine) on a waiting thread, beside the engine.
 */
#ifndef PCCL_COLL_ALLREDUCE_RING_H
#define PCCL_COLL_ALLREDUCE_RING_H

#include <stddef.h>
#include <stdint.h>

#include "coll/coll.h"
#include "net/frame.h"
#include "pccl.h"

typedef struct pccl__ring_op {
    pccl__coll_op base;     /* first: tag, seq, world, byte counts */

    /* what to reduce */
    const uint8_t *src;
    uint8_t *dst;
    size_t count;
    size_t esize;
    pccl_dtype dtype;
    pccl_op op;
    pccl_quant quant;
    pccl__ring_geom g;
    uint32_t shift;         /* 0; reduce-scatter: 1 (rank r owns chunk r) */
    uint8_t *own_out;       /* reduce-scatter: where the owned chunk goes, else NULL */

    /* buffers */
    uint8_t *backup;        /* in place: the input's saved copy, else NULL */
    uint8_t *saved;         /* in place: per slice, BK_* (atomic) */
    uint32_t save_j;        /* the waiter's cursor (vt->assist) */
    uint8_t *qbuf;          /* the caller's quantization buffer */
    double *qmin;           /* per slice of the whole tensor */
    double *qscale;

    /* schedule */
    size_t slice_elems;
    uint32_t nsteps;        /* 2 * world - 2; reduce-scatter: world - 1 */
    uint32_t max_slices;    /* slices of the largest chunk */
    size_t *chunk_off;      /* per chunk, in elements */
    size_t *chunk_len;
    uint32_t *chunk_nslices;
    uint32_t *chunk_first;  /* index of the chunk's first slice overall */
    pccl__frame_out *units; /* send units, nsteps * max_slices */
    uint8_t *recv_seen;     /* receive units already claimed */
    uint32_t *send_base;    /* per step: slices sent on the edge before it */
    uint32_t *recv_base;    /* per step: slices received before it */
    void *mem;              /* one allocation behind the arrays above */

    /* progress */
    size_t sends_left;
    size_t recvs_left;
} pccl__ring_op;

/* The all-reduce's entry in the operation interface. */
extern const pccl__coll_vtable pccl__allreduce_ring_vt;

/* pccl__ring_op_buffers says which big buffers an operation needs from
 * its caller: a backup buffer (in place, world > 1: count * esize bytes)
 * and a quantization buffer.  0 means none.  Pure. */
void pccl__ring_op_buffers(const pccl__ring_geom *g, size_t count, pccl_dtype dtype,
                           int in_place, pccl_quant quant, size_t *backup_bytes,
                           size_t *q_bytes);

/* pccl__ring_op_init prepares an operation (arguments already validated by
 * the caller: dtype/op/quant in range, quant only with floating dtypes,
 * count * esize without overflow).  backup_buf and q_buf are the buffers
 * pccl__ring_op_buffers asked for (NULL when it said 0); they stay the
 * caller's and must outlive the op.  Allocates its small tables (no
 * allocation happens later).  World 1 and count 0 finish right here: then
 * vt->done is true at once.  PCCL_ENOMEM. */
pccl_result pccl__ring_op_init(pccl__ring_op *o, const pccl__ring_geom *g, const void *src,
                               void *dst, size_t count, pccl_dtype dtype, pccl_op op,
                               pccl_quant quant, uint64_t tag, uint32_t seq,
                               uint8_t *backup_buf, uint8_t *q_buf);

/* pccl__ring_sched_init is pccl__ring_op_init with the schedule's two
 * knobs, shared with the reduce-scatter (reducescatter_ring.c): rs = 1
 * runs only the first world-1 steps, shifted so that rank r finalizes
 * chunk r, which it writes to own_out (the other chunks' partial sums go
 * to dst, a work buffer of count elements); rs = 0 is the all-reduce
 * (own_out unused).  vt is the entry the op reports. */
pccl_result pccl__ring_sched_init(pccl__ring_op *o, const pccl__coll_vtable *vt, int rs,
                                  const pccl__ring_geom *g, const void *src, void *dst,
                                  void *own_out, size_t count, pccl_dtype dtype, pccl_op op,
                                  pccl_quant quant, uint64_t tag, uint32_t seq,
                                  uint8_t *backup_buf, uint8_t *q_buf);

/* The reduce-scatter's entry: the same functions as the all-reduce's
 * (they follow nsteps, shift and own_out), under its own name. */
extern const pccl__coll_vtable pccl__reducescatter_ring_vt;

/* What the vtable's functions do for the all-reduce:
 *
 * begin emits the frames of step 0.  accept checks a decoded header
 * against the schedule and says where its payload goes: the receiving
 * connection's slice scratch for a reduce-scatter slice (it is reduced
 * from there), dst (or the quantization buffer) for an all-gather slice.
 * received reduces, finalizes or dequantizes the unit and emits the frame
 * that forwards it.  sent counts a frame written.  needs_conn: inbound, a
 * unit not yet received is scheduled on that connection; outbound,
 * anything is left to send.  done: every unit sent and received.
 *
 * In place, results are written straight into the caller's tensor, and
 * every slice is saved to the backup buffer before its first write, so
 * that a failed operation can put the input back.  The reduce-scatter
 * saves the slices it writes as it reduces them (the local operand is
 * read once for both).  Chunk r, which this peer first writes when its
 * all-gather data arrives, is saved by assist: a thread that would
 * otherwise sleep (the waiter) calls it so the copy overlaps the network;
 * the engine copies a slice itself if it gets there first.  assist copies
 * one slice at most per call and returns 0 once they are all saved; one
 * waiting thread at a time (it owns the cursor).  base.assist is 1 in
 * place, 0 out of place.
 *
 * restore puts the input back after a failed in-place operation: every
 * saved slice is copied from the backup into dst (a slice never saved was
 * never written).  Only once the engine is done with the op.  No-op out
 * of place.  fini frees what init allocated (not the caller's buffers). */

#endif
