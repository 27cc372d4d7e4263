/*
 * broadcast_ring.h - one ring broadcast: schedule and state.
 *
 * An implementation of the operation interface (coll/coll.h); see
 * broadcast_ring.c for the algorithm.  init and fini run on the caller's
 * thread, the vtable's other functions on the thread holding the
 * progress lock.  No assist, nothing to restore: the root's buffer is
 * only read and every other rank's buffer is output only.
 */
#ifndef PCCL_COLL_BROADCAST_RING_H
#define PCCL_COLL_BROADCAST_RING_H

#include <stddef.h>
#include <stdint.h>

#include "coll/coll.h"
#include "net/frame.h"
#include "pccl.h"

typedef struct pccl__bcast_op {
    pccl__coll_op base;     /* first */
    uint8_t *buf;           /* root: read only; others: written */
    size_t count;
    size_t esize;
    pccl_dtype dtype;
    uint32_t root;
    pccl__ring_geom g;

    size_t slice_elems;
    uint32_t nslices;
    int forwards;           /* 1: this rank sends (root, or next is not the root) */
    pccl__frame_out *units; /* one per slice */
    uint8_t *recv_seen;
    size_t sends_left;
    size_t recvs_left;
} pccl__bcast_op;

extern const pccl__coll_vtable pccl__broadcast_ring_vt;

/* pccl__bcast_op_init prepares a broadcast of count elements of buf from
 * rank root (arguments validated by the caller: dtype in range, root <
 * world, count * esize without overflow).  World 1 and count 0 finish
 * here.  Allocates its tables; PCCL_ENOMEM. */
pccl_result pccl__bcast_op_init(pccl__bcast_op *o, const pccl__ring_geom *g, void *buf,
                                size_t count, pccl_dtype dtype, uint32_t root, uint64_t tag,
                                uint32_t seq);

#endif
