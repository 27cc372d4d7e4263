/*
 * op.h - an operation as the core keeps it: the handle the caller holds,
 * the seq table, and the bookkeeping shared by the public calls
 * (op_api.c) and the engine (engine.c).  The algorithm itself sits behind
 * h->op (the operation interface, coll/coll.h); nothing here knows which
 * collective it is.
 *
 * Locking: fields marked (mtx) are protected by comm->mtx; (progress)
 * belong to whoever holds comm->progress_lock (the one running the
 * engine); the rest are written before the op is queued and only read
 * afterwards, or by the handle's owner once the op is done.
 */
#ifndef PCCL_CORE_OP_H
#define PCCL_CORE_OP_H

#include <stddef.h>
#include <stdint.h>

#include "coll/coll.h"
#include "pccl.h"

enum pccl__op_state {
    PCCL__OP_QUEUED = 0,  /* started, not yet picked up by the engine */
    PCCL__OP_RUNNING = 1, /* in the engine */
    PCCL__OP_DONE = 2     /* result set; the engine no longer touches it */
};

/* Big buffers an op takes from the comm's buffer cache (bufcache.h) and
 * gives back when it is freed; the algorithm says which (e.g. an in-place
 * backup, a quantization buffer). */
enum { PCCL__OP_MAX_BUFS = 2 };

struct pccl_op_handle {
    pccl_comm *comm;
    pccl__coll_op *op;          /* the algorithm's state, right after the handle */
    uint64_t ring_gen;          /* the ring it was started on */
    int state;                  /* (mtx) enum pccl__op_state */
    int finished;               /* atomic mirror of state == DONE */
    pccl_result result;         /* (mtx) valid when DONE */
    int restored;               /* failed in place: input put back */
    uint8_t *buf[PCCL__OP_MAX_BUFS];   /* from the buffer cache, or NULL */
    size_t buf_cap[PCCL__OP_MAX_BUFS];
    struct pccl_op_handle *queue_next;                 /* (mtx) submit queue */
    struct pccl_op_handle *active_next, *active_prev;  /* (mtx) ops not done, by tag */
    struct pccl_op_handle *inflight_next, *inflight_prev; /* (progress) in the engine */
};

/* tag -> number of ops started with it on the current ring. */
typedef struct pccl__seq_table {
    uint64_t *tags;
    uint32_t *next;
    uint8_t *used;
    size_t cap;             /* power of two or 0 */
    size_t n;
} pccl__seq_table;

/* pccl__seq_peek: ops started with tag on the current ring; mtx held. */
uint32_t pccl__seq_peek(const pccl__seq_table *t, uint64_t tag);
/* pccl__seq_take returns the next seq of tag and counts it; mtx held.
 * PCCL_ENOMEM. */
pccl_result pccl__seq_take(pccl__seq_table *t, uint64_t tag, uint32_t *seq);
/* pccl__seq_clear forgets every tag (a new ring starts at seq 0). */
void pccl__seq_clear(pccl__seq_table *t);

/* pccl__op_new allocates a handle with state_size bytes for the
 * algorithm's operation right after it (h->op points there, zeroed): one
 * allocation per op.  NULL when out of memory. */
pccl_op_handle *pccl__op_new(pccl_comm *comm, size_t state_size);

/* pccl__op_ring_locked: may an op start on the current ring?  PCCL_OK
 * with its geometry and generation, or ECLOSED/ERINGBROKEN/ESTATE.  mtx
 * held. */
pccl_result pccl__op_ring_locked(pccl_comm *comm, pccl__ring_geom *g, uint64_t *gen);

/* pccl__op_submit_locked checks that the ring h was prepared for is still
 * there and no op with its tag is active, gives it its seq, and queues it
 * for the engine (or marks it done at once if the algorithm finished in
 * init).  *wake is set when the submit queue was empty: the caller may
 * then have to wake the engine.  On failure h is untouched (not counted,
 * not queued).  mtx held. */
pccl_result pccl__op_submit_locked(pccl_comm *comm, pccl_op_handle *h, int *wake);

/* pccl__op_finish_locked marks op done with rv (waiters are woken by the
 * caller's broadcast); mtx held. */
void pccl__op_finish_locked(pccl_comm *comm, pccl_op_handle *op, pccl_result rv);

/* pccl__op_restore: a finished op failed: let the algorithm put its
 * inputs back (once).  The handle's owner only. */
void pccl__op_restore(pccl_op_handle *h);

#endif
