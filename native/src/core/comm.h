/*
 * comm.h - the communicator's private structure, shared by comm.c (the
 * public API, ring setup, accept decisions) and engine.c (the I/O thread).
 *
 * Locking: comm->mtx protects every field marked (mtx).  Fields marked
 * (engine) belong to the engine thread alone.  Constant fields are set at
 * create and only read afterwards.  The engine takes the lock only to
 * pick up requests (after an eventfd wake-up) and to publish results.
 */
#ifndef PCCL_CORE_COMM_H
#define PCCL_CORE_COMM_H

#include <stddef.h>
#include <stdint.h>

#include "coll/allreduce_ring.h"
#include "net/conn.h"
#include "net/link.h"
#include "net/listener.h"
#include "platform/plat.h"
#include "pccl.h"

enum pccl__op_state {
    PCCL__OP_QUEUED = 0,  /* started, not yet picked up by the engine */
    PCCL__OP_RUNNING = 1, /* in the engine */
    PCCL__OP_DONE = 2     /* result set; the engine no longer touches it */
};

struct pccl_op_handle {
    pccl_comm *comm;
    pccl__ring_op ring;
    uint64_t ring_gen;          /* the ring it was started on */
    int state;                  /* (mtx) enum pccl__op_state */
    int finished;               /* atomic mirror of state == DONE */
    pccl_result result;         /* (mtx) valid when DONE */
    int restored;               /* failed in place: input put back */
    uint8_t *backup_buf;        /* from the comm's buffer cache, or NULL */
    size_t backup_cap;
    uint8_t *q_buf;
    size_t q_cap;
    struct pccl_op_handle *qnext;              /* (mtx) submit queue */
    struct pccl_op_handle *anext, *aprev;      /* (mtx) active ops, by tag */
    struct pccl_op_handle *enext, *eprev;      /* (engine) ops in flight */
};

enum pccl__ring_state {
    PCCL__RING_NONE = 0,    /* never set: ESTATE */
    PCCL__RING_SETTING = 1, /* set_ring running: ESTATE */
    PCCL__RING_READY = 2,
    PCCL__RING_BROKEN = 3   /* ERINGBROKEN until set again */
};

/* A ring handed from set_ring to the engine, which takes ownership. */
typedef struct pccl__ring_install {
    uint64_t gen;
    pccl__ring_geom geom;
    uint32_t nlinks;        /* K, or 0 for a world of one */
    pccl__conn *out;        /* K outbound connections */
    pccl__conn *in;         /* K inbound connections */
    uint8_t *scratch;       /* K * slice_bytes */
    pccl__conn **dirty;     /* K entries: flush list */
} pccl__ring_install;

/* An authenticated hello waiting for set_ring of its (future) epoch. */
typedef struct pccl__parked_hello {
    struct pccl__parked_hello *next;
    int fd;
    pccl__hs_server st;
    uint64_t expiry;
    uint16_t status;        /* set_ring's verdict when it takes the hello */
} pccl__parked_hello;

/* tag -> number of ops started with it on the current ring. */
typedef struct pccl__seq_table {
    uint64_t *tags;
    uint32_t *next;
    uint8_t *used;
    size_t cap;             /* power of two or 0 */
    size_t n;
} pccl__seq_table;

enum pccl__slot_state {
    PCCL__SLOT_EMPTY = 0,
    PCCL__SLOT_RESERVED = 1, /* hello accepted, ack being sent */
    PCCL__SLOT_FILLED = 2
};

/* A buffer published for shared-state transfers (xfer.c). */
typedef struct pccl__xfer_entry {
    struct pccl__xfer_entry *next;  /* (mtx) */
    uint64_t key;
    const uint8_t *buf;             /* the caller's, read-only */
    size_t len;
    uint32_t users;                 /* (mtx) serving threads reading buf */
    int revoked;                    /* (mtx) unpublish started: serve no more */
    uint64_t tx_bytes;              /* (mtx) payload bytes sent from buf */
    pccl__event revoke;             /* signalled at unpublish/close: wakes senders */
} pccl__xfer_entry;

struct pccl_comm {
    /* constant after create */
    uint32_t nconns;
    uint32_t slice_bytes;
    int32_t progress_timeout_ms;
    int32_t handshake_timeout_ms;
    uint8_t *secret;
    size_t secret_len;
    pccl__listener listener;

    pccl__mutex mtx;
    pccl__cond cv;               /* every state change; waiters re-check */

    /* lifecycle (mtx) */
    int closing;
    int closed;                  /* close finished */
    int freed;                   /* pccl_comm_free called; memory waits for handles */
    uint32_t nhandles;           /* op handles not yet freed */

    /* big buffers of finished ops, kept for the next ones (mtx) */
    struct {
        uint8_t *p;
        size_t size;
    } cache[4];

    /* requests to the engine (mtx), signalled through engine_wake */
    pccl__event engine_wake;
    pccl_op_handle *subq_head, *subq_tail;
    pccl_result req_break;       /* 0: none */
    pccl__ring_install *req_install;
    int engine_ring_live;        /* the engine holds a ring (dropped or not) */

    /* ring as callers see it (mtx) */
    int ring_state;
    uint64_t ring_gen;
    pccl__ring_geom geom;
    pccl__seq_table seqs;
    pccl_op_handle *active;      /* ops started and not done */
    int has_ring_epoch;
    uint64_t last_epoch;

    /* set_ring in progress (mtx) */
    pccl__event setup_wake;
    int setup_active;
    int setup_abort;
    uint64_t setup_id;
    uint64_t setup_epoch;
    uint32_t setup_rank;
    uint32_t setup_world;
    int in_fd[PCCL_MAX_CONNECTIONS];
    uint8_t in_slot[PCCL_MAX_CONNECTIONS];
    uint32_t in_have;
    pccl__parked_hello *parked;
    uint32_t nparked;

    /* shared-state transfers (mtx) */
    pccl__xfer_entry *xfer_entries;
    uint32_t xfer_nservers;      /* serving threads alive */
    pccl__event xfer_stop;       /* signalled once, at close */

    /* the engine */
    pccl__thread engine;
    pccl__mutex plock;           /* held by whoever drives the engine */
    pccl__poller poller;
    /* (engine) */
    pccl__ring_install *ering;   /* live ring or NULL */
    pccl_op_handle *eops;        /* ops in flight */
    uint64_t last_progress;
    pccl_result efail;           /* failure found inside a callback */
    uint32_t nparked_conns;
    uint32_t nclosed_conns;      /* hung up by the peer, ops still draining */
    uint32_t ndirty;             /* entries of ering->dirty in use */
};

/* engine.c */
pccl_result pccl__engine_start(pccl_comm *comm);
void pccl__engine_join(pccl_comm *comm);
/* pccl__engine_drive lets a thread about to wait for h run the engine
 * itself until h finishes or deadline passes, if the engine thread is
 * idle (plock free) and no requests other than ops are pending.  Returns
 * 0 when it did not (the caller then waits as usual; the engine thread
 * has been woken).  mtx not held. */
int pccl__engine_drive(pccl_comm *comm, pccl_op_handle *h, uint64_t deadline);
/* pccl__engine_wake signals the engine (caller may hold mtx). */
void pccl__engine_wake(pccl_comm *comm);

/* comm.c: used by the engine */
/* pccl__seq_peek: ops started with tag on the current ring; mtx held. */
uint32_t pccl__seq_peek(const pccl__seq_table *t, uint64_t tag);
/* pccl__op_finish marks op done with rv and wakes waiters; mtx held. */
void pccl__op_finish_locked(pccl_comm *comm, pccl_op_handle *op, pccl_result rv);

/* xfer.c */
/* pccl__xfer_init / fini: the transfer part of create and destroy. */
pccl_result pccl__xfer_init(pccl_comm *comm);
void pccl__xfer_fini(pccl_comm *comm);
/* pccl__xfer_on_hello takes an authenticated PURPOSE_XFER connection and
 * serves it on a thread of its own (or refuses it).  Takes fd. */
void pccl__xfer_on_hello(pccl_comm *comm, int fd, const pccl__hs_server *st);
/* pccl__xfer_close cuts off every transfer and waits for the serving
 * threads; close calls it after the listener stopped. */
void pccl__xfer_close(pccl_comm *comm);

#endif
