/*
 * allreduce_ring.h - one ring all-reduce operation: schedule and state.
 *
 * The operation knows ranks, chunks, slices and buffers; it never touches
 * a socket.  The I/O engine feeds it decoded frame headers and completed
 * payloads, and it hands back frames to send through an emit callback
 * (connection index + frame).  See allreduce_ring.c for the algorithm.
 *
 * Threads: pccl__ring_op_init/fini/restore run on the caller's thread;
 * begin/accept/received/sent run on the engine thread only;
 * pccl__ring_op_save may run on any thread, beside the engine.
 */
#ifndef PCCL_COLL_ALLREDUCE_RING_H
#define PCCL_COLL_ALLREDUCE_RING_H

#include <stddef.h>
#include <stdint.h>

#include "net/conn.h"
#include "net/frame.h"
#include "pccl.h"

/* Where this peer sits, identical for all operations of one ring. */
typedef struct pccl__ring_geom {
    uint64_t epoch;
    uint32_t rank;
    uint32_t world;
    uint32_t nconns;       /* K */
    uint32_t slice_bytes;
} pccl__ring_geom;

/* emit queues frame f on outbound connection conn_index. */
typedef void (*pccl__emit_fn)(void *arg, uint32_t conn_index, pccl__frame_out *f);

typedef struct pccl__ring_op {
    /* what to reduce */
    const uint8_t *src;
    uint8_t *dst;
    size_t count;
    size_t esize;
    pccl_dtype dtype;
    pccl_op op;
    pccl_quant quant;
    uint64_t tag;
    uint32_t seq;
    pccl__ring_geom g;

    /* buffers */
    uint8_t *backup;        /* in place: the input's saved copy, else NULL */
    uint8_t *saved;         /* in place: per slice, BK_* (atomic) */
    uint32_t save_j;        /* the waiter's cursor (pccl__ring_op_save_next) */
    uint8_t *qbuf;          /* the caller's quantization buffer */
    double *qmin;           /* per slice of the whole tensor */
    double *qscale;

    /* schedule */
    size_t slice_elems;
    uint32_t nsteps;        /* 2 * world - 2 */
    uint32_t max_slices;    /* slices of the largest chunk */
    size_t *chunk_off;      /* per chunk, in elements */
    size_t *chunk_len;
    uint32_t *chunk_nslices;
    uint32_t *chunk_first;  /* index of the chunk's first slice overall */
    pccl__frame_out *units; /* send units, nsteps * max_slices */
    uint8_t *recv_seen;     /* receive units already claimed */
    void *mem;              /* one allocation behind the arrays above */

    /* progress */
    size_t sends_left;
    size_t recvs_left;
    uint64_t tx_bytes;
    uint64_t rx_bytes;
} pccl__ring_op;

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
 * pccl__ring_op_done is true at once.  PCCL_ENOMEM. */
pccl_result pccl__ring_op_init(pccl__ring_op *o, const pccl__ring_geom *g, const void *src,
                               void *dst, size_t count, pccl_dtype dtype, pccl_op op,
                               pccl_quant quant, uint64_t tag, uint32_t seq,
                               uint8_t *backup_buf, uint8_t *q_buf);
/* pccl__ring_op_fini frees what init allocated (not the caller's buffers). */
void pccl__ring_op_fini(pccl__ring_op *o);

/* pccl__ring_op_begin emits the frames of step 0 (engine thread). */
void pccl__ring_op_begin(pccl__ring_op *o, pccl__emit_fn emit, void *arg);

/* pccl__ring_op_accept checks a decoded header against the schedule and
 * says where its payload goes (*dst, *len) and which receive unit it is.
 * scratch (scratch_len bytes) is the receiving connection's slice buffer.
 * PCCL_EPROTO for anything that is not an expected, unclaimed slice. */
pccl_result pccl__ring_op_accept(pccl__ring_op *o, const pccl__frame_header *h,
                                 uint8_t *scratch, size_t scratch_len, uint8_t **dst,
                                 size_t *len, uint32_t *unit);

/* pccl__ring_op_received processes a complete payload of unit (reduce,
 * finalize, dequantize) and emits the frame that forwards it. */
void pccl__ring_op_received(pccl__ring_op *o, uint32_t unit, const pccl__frame_header *h,
                            const uint8_t *scratch, pccl__emit_fn emit, void *arg);

/* pccl__ring_op_sent accounts a frame completely written. */
void pccl__ring_op_sent(pccl__ring_op *o, const pccl__frame_out *f);

/* pccl__ring_op_expects_on: 1 if a unit not yet received is scheduled to
 * arrive on inbound connection conn_index. */
int pccl__ring_op_expects_on(const pccl__ring_op *o, uint32_t conn_index);

/* pccl__ring_op_done: every unit sent and received. */
int pccl__ring_op_done(const pccl__ring_op *o);

/* In place, results are written straight into the caller's tensor, and
 * every slice is saved to the backup buffer before its first write, so
 * that a failed operation can put the input back.  The reduce-scatter
 * saves the slices it writes as it reduces them (the local operand is
 * read once for both).  Chunk r, which this peer first writes when its
 * all-gather data arrives, is copied by pccl__ring_op_save: a thread that
 * would otherwise sleep (the waiter) calls it so the copy overlaps the
 * network; the engine copies a slice itself if it gets there first.
 * Safe to call any number of times, from any thread, while the op is
 * alive.  No-op out of place. */
void pccl__ring_op_save(pccl__ring_op *o);
/* pccl__ring_op_save_next saves the next slice of chunk r (one slice
 * copy at most); returns 0 once they are all saved.  The waiter's thread only
 * (it owns the cursor). */
int pccl__ring_op_save_next(pccl__ring_op *o);

/* pccl__ring_op_restore puts the input back after a failed in-place
 * operation: every saved slice is copied from the backup into dst (a
 * slice never saved was never written).  Only once the engine is done
 * with the op.  No-op out of place. */
void pccl__ring_op_restore(pccl__ring_op *o);

#endif
