/*
 * allgather_ring.h - one ring all-gather: schedule and state.
 *
 * An implementation of the operation interface (coll/coll.h); see
 * allgather_ring.c for the algorithm.  init and fini run on the caller's
 * thread, the vtable's other functions on the thread holding the
 * progress lock.  No assist, nothing to restore: the input is only read
 * and the output is output only.  The barrier (barrier_ring.c) is an
 * all-gather of one byte.
 */
#ifndef PCCL_COLL_ALLGATHER_RING_H
#define PCCL_COLL_ALLGATHER_RING_H

#include <stddef.h>
#include <stdint.h>

#include "coll/coll.h"
#include "net/frame.h"
#include "pccl.h"

typedef struct pccl__ag_op {
    pccl__coll_op base;     /* first */
    const uint8_t *src;     /* this rank's block, count elements */
    uint8_t *dst;           /* world * count elements, rank order */
    size_t count;           /* elements per rank */
    size_t esize;
    pccl_dtype dtype;
    pccl__ring_geom g;

    size_t slice_elems;
    uint32_t nslices;       /* per block */
    uint32_t nsteps;        /* world - 1 */
    pccl__frame_out *units; /* nsteps * nslices */
    uint8_t *recv_seen;
    size_t sends_left;
    size_t recvs_left;
} pccl__ag_op;

extern const pccl__coll_vtable pccl__allgather_ring_vt;

/* pccl__ag_op_init prepares an all-gather of count elements per rank from
 * src into dst (world * count elements; arguments validated by the
 * caller: dtype in range, sizes without overflow, src either outside dst
 * or exactly at block rank of dst).  Copies src into its block of dst
 * here.  World 1 and count 0 finish here.  PCCL_ENOMEM. */
pccl_result pccl__ag_op_init(pccl__ag_op *o, const pccl__ring_geom *g, const void *src,
                             void *dst, size_t count, pccl_dtype dtype, uint64_t tag,
                             uint32_t seq);

/* The barrier: an all-gather of one byte per rank into out (world bytes
 * the caller keeps alive with the op).  Returns on a rank only once every
 * rank has started it. */
pccl_result pccl__barrier_op_init(pccl__ag_op *o, const pccl__ring_geom *g, uint8_t *out,
                                  uint64_t tag, uint32_t seq);

#endif
