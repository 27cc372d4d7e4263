/*
 * coll.h - the operation interface: what a collective algorithm
 * implements and the I/O engine (core/engine.c) calls.
 *
 * An algorithm knows ranks, chunks, slices and buffers; it never touches
 * a socket, a thread or a lock.  The engine owns the connections.  It
 * matches each decoded frame header to an operation by (tag, seq), asks
 * the operation where the payload goes, reads it there, and tells the
 * operation when it is complete; the operation hands back frames to send
 * through an emit callback (outbound connection index + frame), and the
 * engine tells it when a frame has been completely written.  No callback
 * may block or allocate: they run on the byte path.
 *
 * An operation is a struct whose first member is a pccl__coll_op; the
 * vtable's functions receive a pointer to that member.  Its life:
 *
 *   init       (caller's thread, algorithm-specific: fills base.vt, tag,
 *               world; seq is set by the core before the op is queued)
 *   done?      true at once: the op finished in init (world 1, 0 bytes)
 *              and never reaches the engine
 *   begin      engine: emit the frames that need no input from peers
 *   accept     engine: a header for this op arrived on inbound connection
 *              conn_index; check it against the schedule (anything out of
 *              schedule is PCCL_EPROTO and touches no memory) and say
 *              where its payload goes and which receive unit it is
 *   received   engine: the payload of unit is complete; process it and
 *              emit what follows from it
 *   sent       engine: frame f has been completely written
 *   needs_conn engine, when a peer hung up connection conn_index: may the
 *              op still need it (outbound: something left to send on it;
 *              inbound: a unit scheduled to arrive on it)?  0 lets ops
 *              that no longer need a closed connection finish
 *   done       engine: every unit sent and received; the core then marks
 *              the op finished and the engine forgets it
 *   assist     a thread waiting for the op (not the engine) may do work
 *              ahead of the engine (e.g. save an in-place input while the
 *              network is busy): one bounded piece per call, returns 0
 *              when nothing is left.  May run beside the engine; NULL if
 *              the algorithm has nothing to offer.  base.assist says
 *              whether it is worth calling at all
 *   restore    caller's thread, once the engine is done with a failed op:
 *              put back every input the op promised to leave unchanged
 *   fini       caller's thread: free what init allocated
 *
 * Frames the op emits live in the op's own memory (pccl__frame_out, with
 * owner = the pccl__coll_op) until `sent` runs for them or the op fails
 * (the engine closes the sockets, dropping every queued frame, before it
 * marks an op failed).  An op need not use every connection, may send
 * without receiving and the other way round; `done` alone says when it
 * is over.
 *
 * Threads: begin/accept/received/sent/needs_conn/done run on whichever
 * thread holds the communicator's progress lock (the engine thread, or a
 * caller driving the engine while it waits); never two at once.
 */
#ifndef PCCL_COLL_COLL_H
#define PCCL_COLL_COLL_H

#include <stddef.h>
#include <stdint.h>

#include "net/frame.h"
#include "pccl.h"

/* Longest weighted-striping schedule: weights are scaled down to sum to
 * at most this many slots (a share is exact to 1/256 of an operation). */
enum { PCCL__STRIPE_MAX = 256 };

/* Where this peer sits, identical for all operations of one ring. */
typedef struct pccl__ring_geom {
    uint64_t epoch;
    uint32_t rank;
    uint32_t world;
    uint32_t nconns;       /* K */
    uint32_t slice_bytes;
    /* Weighted striping (coll/stripe.h), from the ring's out_weights and
     * in_weights: the s-th slice an op sends on this edge goes on outbound
     * connection out_sched[s % out_len]; the s-th it receives comes on
     * inbound connection in_sched[s % in_len].  Length 0: the default
     * rotation (slice j of step t on connection (j + t) % K). */
    uint16_t out_len;
    uint16_t in_len;
    uint8_t out_sched[PCCL__STRIPE_MAX];
    uint8_t in_sched[PCCL__STRIPE_MAX];
} pccl__ring_geom;

typedef struct pccl__coll_op pccl__coll_op;

/* emit queues frame f on outbound connection conn_index. */
typedef void (*pccl__emit_fn)(void *arg, uint32_t conn_index, pccl__frame_out *f);

typedef struct pccl__coll_vtable {
    const char *name;
    void (*begin)(pccl__coll_op *op, pccl__emit_fn emit, void *arg);
    pccl_result (*accept)(pccl__coll_op *op, uint32_t conn_index, const pccl__frame_header *h,
                          uint8_t *scratch, size_t scratch_len, uint8_t **dst, size_t *len,
                          uint32_t *unit);
    void (*received)(pccl__coll_op *op, uint32_t unit, const pccl__frame_header *h,
                     const uint8_t *scratch, pccl__emit_fn emit, void *arg);
    void (*sent)(pccl__coll_op *op, const pccl__frame_out *f);
    int (*needs_conn)(const pccl__coll_op *op, uint32_t conn_index, int outbound);
    int (*done)(const pccl__coll_op *op);
    int (*assist)(pccl__coll_op *op);
    void (*restore)(pccl__coll_op *op);
    void (*fini)(pccl__coll_op *op);
} pccl__coll_vtable;

/* The part of every operation the core reads. */
struct pccl__coll_op {
    const pccl__coll_vtable *vt;
    uint64_t tag;           /* frames carry (tag, seq); the engine matches on them */
    uint32_t seq;           /* n-th op with this tag on this ring (set by the core) */
    uint32_t world;         /* reported in pccl_reduce_info */
    int assist;             /* 1: vt->assist has work for a waiting thread */
    uint64_t tx_bytes;      /* frame bytes (header + payload) sent and received */
    uint64_t rx_bytes;
};

/* What an algorithm may call from its host besides the frame codec and
 * the kernels: give the CPU to another runnable thread (while another
 * thread finishes a copy of a few microseconds).  Implemented by the
 * platform layer (platform/posix/thread.c); declared here so that coll/
 * includes no thread header. */
void pccl__thread_yield(void);

#endif
