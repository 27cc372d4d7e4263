/*
 * comm.h - the communicator's private structure, shared by the files of
 * the core:
 *
 *   comm.c        lifecycle: create, listen address, abort, close, free
 *   ring_setup.c  pccl_comm_set_ring and the accept-side decisions
 *   op_api.c      the public calls on operations: start, wait, free
 *   engine.c      the I/O engine: moves the bytes of the ops in flight
 *   op.c          op bookkeeping and the seq table (op.h)
 *   bufcache.c    big buffers kept between ops (bufcache.h)
 *   xfer.c        shared-state transfers
 *   p2p.c         point-to-point send/recv: its I/O thread, pairs, ops (p2p.h)
 *   p2p_api.c     the public p2p calls that start and free ops
 *
 * Calls go one way: comm/ring_setup/op_api -> engine -> op; none of
 * engine, op, bufcache calls back up (tools/include_graph.py checks the
 * includes and the calls).
 *
 * Locking: comm->mtx protects every field marked (mtx).  Fields marked
 * (progress) belong to whoever holds progress_lock: whoever holds it runs
 * the engine (the engine thread, or a caller driving its own op in
 * pccl__engine_drive), and only it touches the ring's sockets and the ops
 * in flight.  Constant fields are set at create and only read afterwards.
 * Lock order: progress_lock, then mtx; the engine takes mtx only to pick
 * up requests and to publish results.
 */
#ifndef PCCL_CORE_COMM_H
#define PCCL_CORE_COMM_H

#include <stddef.h>
#include <stdint.h>

#include "coll/coll.h"
#include "core/bufcache.h"
#include "core/op.h"
#include "net/conn.h"
#include "net/link.h"
#include "net/listener.h"
#include "platform/plat.h"
#include "pccl.h"

typedef struct pccl__p2p pccl__p2p;

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
    pccl__bufcache bufcache;

    /* requests to the engine (mtx), signalled through engine_wake */
    pccl__event engine_wake;
    pccl_op_handle *submit_head, *submit_tail;
    pccl_result req_break;       /* 0: none */
    pccl__ring_install *req_install;
    int engine_ring_live;        /* the engine holds a ring (dropped or not) */

    /* ring as callers see it (mtx) */
    int ring_state;
    uint64_t ring_gen;
    pccl__ring_geom geom;
    pccl__seq_table seqs;
    pccl_op_handle *active;      /* ops started and not done (active_next) */
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
    /* local addresses of the outbound connections of the ring set last
     * (mtx); pccl_comm_ring_conn_address */
    uint32_t out_local_n;
    char out_local[PCCL_MAX_CONNECTIONS][PCCL_ADDRSTRLEN];

    /* shared-state transfers (mtx) */
    pccl__xfer_entry *xfer_entries;
    uint32_t xfer_nservers;      /* serving threads alive */
    pccl__event xfer_stop;       /* signalled once, at close */

    /* the engine */
    pccl__thread engine;
    pccl__mutex progress_lock;   /* held by whoever runs the engine */
    pccl__poller poller;
    /* (progress) */
    pccl__ring_install *engine_ring; /* live ring or NULL */
    pccl_op_handle *inflight_ops;    /* ops in flight (inflight_next) */
    uint64_t last_progress;
    pccl_result engine_fail;     /* failure found inside a callback */
    uint32_t nparked_conns;
    uint32_t nclosed_conns;      /* hung up by the peer, ops still draining */
    uint32_t ndirty;             /* entries of engine_ring->dirty in use */

    /* point-to-point send/recv (p2p.c): its own thread and lock */
    struct pccl__p2p *p2p;
    /* link stats (link_stats.c): while some outbound connection of the
     * ring has frames a flush could not hand to the kernel, the link to
     * the successor is the limit; bytes moved meanwhile over that time is
     * its throughput.  Engine-owned, published under mtx as op ends. */
    uint32_t nbacklogged;        /* outbound connections backlogged */
    uint64_t backlog_since;      /* clock_ns when nbacklogged became > 0 */
    uint64_t backlog_bytes;      /* bytes written while backlogged */
    uint64_t backlog_ns;         /* closed backlogged time */
    uint64_t stats_bytes;        /* (mtx) last published backlog_bytes */
    uint64_t stats_ns;           /* (mtx) last published backlog_ns */
};

/* link_stats.c: account one flush of outbound connection c (engine). */
void pccl__link_stats_flushed(pccl_comm *comm, pccl__conn *c, size_t moved, uint64_t now);
/* link_stats.c: forget backlogs of a ring being dropped (engine). */
void pccl__link_stats_reset(pccl_comm *comm, uint64_t now);

/* comm.c: frees the communicator's memory (pccl_comm_free, or the last
 * pccl_op_free after it). */
void pccl__comm_destroy(pccl_comm *comm);

/* ring_setup.c: what the accept thread asks about each hello. */
extern const pccl__listener_ops pccl__ring_setup_listener_ops;

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
