/*
 * engine.c - the I/O engine of a communicator.
 *
 * Whoever holds comm->progress_lock runs the engine: the engine thread
 * (one per communicator), or a thread blocked in pccl_op_wait that found
 * the engine idle and drives its own op (pccl__engine_drive), which saves
 * a thread hand-off per blocking all-reduce.  Only the holder touches the
 * ring's sockets, the ops in flight and the other (progress) fields of
 * comm.h.  Other threads put requests (ops to start, a ring to install, a
 * break, close) under comm->mtx and signal the wake-up eventfd.  The
 * engine never busy-polls: it sleeps in epoll until a socket is ready, a
 * request arrives, or the progress deadline of the ops in flight passes.
 * Lock order: progress_lock, then mtx.
 *
 * The engine knows connections, not collectives: it calls each op only
 * through the operation interface (coll/coll.h: begin, accept, received,
 * sent, needs_conn, done, assist) and matches frames to ops by (tag, seq).
 *
 * Data path per readiness event:
 *   inbound connection readable -> read a header, find the op by (tag,
 *   seq), let the op check it and say where the payload goes (accept),
 *   read the payload there, let the op process it (received; its emit
 *   queues the next frame on an outbound connection), then flush the
 *   outbound queues with writev.  An outbound connection becomes writable -> continue its
 *   queue.  No allocation happens on this path.
 *
 * Failure: any error on a connection, a bad frame, the progress timeout,
 * abort, or close "breaks" the ring: every socket is closed (neighbours
 * notice at once and break theirs, so a failure travels around the ring
 * in milliseconds), then every op in flight or queued fails with the
 * cause.  Sockets are closed before ops are marked done, so no queued
 * frame can point into a buffer its owner has been told it may reuse.
 *
 * A frame for an op this peer has not started yet parks its connection:
 * the header is kept, the socket leaves the read set (TCP flow control
 * holds the sender back), and reading resumes when the op starts.
 */
#include <stdlib.h>
#include <string.h>

#include "core/comm.h"
#include "core/engine.h"
#include "core/op.h"

enum {
    RX_BUDGET = 8u << 20  /* bytes read from one connection per event */
};

static void complete_done_ops(pccl_comm *comm);
static void hung_up(pccl_comm *comm, pccl__conn *c);

static void
fail(pccl_comm *comm, pccl_result rv)
{
    if (comm->engine_fail == 0) {
        comm->engine_fail = rv;
    }
}

static void
set_interest(pccl_comm *comm, pccl__conn *c, uint32_t want)
{
    pccl_result rv;

    if (!c->registered || c->interest == want) {
        return;
    }
    if ((rv = pccl__poller_mod(&comm->poller, c->fd, want, c)) != 0) {
        fail(comm, rv);
        return;
    }
    c->interest = want;
}

static void
sent_cb(void *arg, pccl__frame_out *f)
{
    pccl__coll_op *op = f->owner;

    (void)arg;
    op->vt->sent(op, f);
}

static void
flush(pccl_comm *comm, pccl__conn *c)
{
    size_t moved = 0;
    pccl_result rv;

    if (c->fd < 0) {
        return;
    }
    rv = pccl__conn_send(c, sent_cb, comm, &moved);
    if (moved > 0) {
        comm->last_progress = pccl__clock_ns();
    }
    pccl__link_stats_flushed(comm, c, moved, moved > 0 ? comm->last_progress : pccl__clock_ns());
    if (rv != 0) {
        fail(comm, rv);
        return;
    }
    set_interest(comm, c, PCCL__POLL_IN | (c->sq_head != NULL ? PCCL__POLL_OUT : 0));
}

static void
emit_cb(void *arg, uint32_t idx, pccl__frame_out *f)
{
    pccl_comm *comm = arg;
    pccl__conn *c = &comm->engine_ring->out[idx];

    pccl__conn_enqueue(c, f);
    if (c->peer_closed) {
        fail(comm, PCCL_EPEERLOST);
        return;
    }
    /* Waiting for POLLOUT: the event flushes it.  Otherwise flush soon. */
    if (!c->dirty && !(c->interest & PCCL__POLL_OUT)) {
        c->dirty = 1;
        comm->engine_ring->dirty[comm->ndirty++] = c;
    }
}

static void
flush_dirty(pccl_comm *comm)
{
    uint32_t i;
    for (i = 0; i < comm->ndirty; i++) {
        pccl__conn *c = comm->engine_ring->dirty[i];
        c->dirty = 0;
        flush(comm, c);
    }
    comm->ndirty = 0;
}

static pccl_op_handle *
find_op(pccl_comm *comm, uint64_t tag, uint32_t seq)
{
    pccl_op_handle *op;
    for (op = comm->inflight_ops; op != NULL; op = op->inflight_next) {
        if (op->op->tag == tag && op->op->seq == seq) {
            return op;
        }
    }
    return NULL;
}

static void
finish_ops(pccl_comm *comm, pccl_op_handle *list, pccl_result rv)
{
    while (list != NULL) {
        pccl_op_handle *next = list->queue_next;
        pccl__op_finish_locked(comm, list, rv);
        list = next;
    }
}

/* Give the header parked on c to its op, if it has started. */
static void
try_unpark(pccl_comm *comm, pccl__conn *c)
{
    pccl_op_handle *op = find_op(comm, c->rh.tag, c->rh.seq);
    uint8_t *dst;
    size_t len;
    uint32_t unit;
    pccl_result rv;

    if (op == NULL) {
        return;
    }
    if ((rv = op->op->vt->accept(op->op, c->index, &c->rh, c->scratch, c->scratch_len, &dst,
                                 &len, &unit)) != 0) {
        fail(comm, rv);
        return;
    }
    pccl__conn_expect(c, dst, len, op->op, unit);
    comm->nparked_conns--;
    set_interest(comm, c, PCCL__POLL_IN);
}

static void
start_ops(pccl_comm *comm, pccl_op_handle *list)
{
    uint32_t k;

    while (list != NULL) {
        pccl_op_handle *op = list;
        list = list->queue_next;
        op->queue_next = NULL;
        if (comm->engine_ring == NULL || op->ring_gen != comm->engine_ring->gen) {
            pccl__mutex_lock(&comm->mtx);
            pccl__op_finish_locked(comm, op, PCCL_ERINGBROKEN);
            pccl__cond_broadcast(&comm->cv);
            pccl__mutex_unlock(&comm->mtx);
            continue;
        }
        if (comm->inflight_ops == NULL) {
            comm->last_progress = pccl__clock_ns();
        }
        op->inflight_prev = NULL;
        op->inflight_next = comm->inflight_ops;
        if (comm->inflight_ops != NULL) {
            comm->inflight_ops->inflight_prev = op;
        }
        comm->inflight_ops = op;
        op->op->vt->begin(op->op, emit_cb, comm);
    }
    if (comm->nparked_conns > 0 && comm->engine_ring != NULL) {
        for (k = 0; k < comm->engine_ring->nlinks; k++) {
            if (comm->engine_ring->in[k].rstate == PCCL__RX_PARKED) {
                try_unpark(comm, &comm->engine_ring->in[k]);
            }
        }
    }
}

/* Pick up queued ops; also report how many ops with tag were started. */
static void
pull_ops(pccl_comm *comm, uint64_t tag, uint32_t *started)
{
    pccl_op_handle *list;

    pccl__mutex_lock(&comm->mtx);
    list = comm->submit_head;
    comm->submit_head = comm->submit_tail = NULL;
    *started = pccl__seq_peek(&comm->seqs, tag);
    pccl__mutex_unlock(&comm->mtx);
    start_ops(comm, list);
}

/* A header is complete on c: route it. */
static void
dispatch(pccl_comm *comm, pccl__conn *c)
{
    pccl_op_handle *op;
    uint8_t *dst;
    size_t len;
    uint32_t unit, started;
    pccl_result rv;

    if (c->rh.epoch != comm->engine_ring->geom.epoch) {
        fail(comm, PCCL_EPROTO);
        return;
    }
    op = find_op(comm, c->rh.tag, c->rh.seq);
    if (op == NULL) {
        pull_ops(comm, c->rh.tag, &started);
        if (comm->engine_fail != 0 || comm->engine_ring == NULL) {
            return;
        }
        op = find_op(comm, c->rh.tag, c->rh.seq);
    }
    if (op == NULL) {
        if (c->rh.seq < started) {
            fail(comm, PCCL_EPROTO); /* an op that already ended */
            return;
        }
        c->rstate = PCCL__RX_PARKED;
        comm->nparked_conns++;
        set_interest(comm, c, PCCL__POLL_RDHUP); /* still hear a hang-up */
        return;
    }
    if ((rv = op->op->vt->accept(op->op, c->index, &c->rh, c->scratch, c->scratch_len, &dst,
                                 &len, &unit)) != 0) {
        fail(comm, rv);
        return;
    }
    pccl__conn_expect(c, dst, len, op->op, unit);
}

static void
rx(pccl_comm *comm, pccl__conn *c)
{
    size_t budget = RX_BUDGET;
    size_t moved;
    int ready;
    pccl_result rv;

    while (comm->engine_fail == 0) {
        if (c->rstate == PCCL__RX_HEADER) {
            int at_boundary = c->rhdr_got == 0;
            if ((rv = pccl__conn_recv_header(c, &ready, &moved)) != 0) {
                if (rv == PCCL_EPEERLOST && at_boundary && moved == 0) {
                    hung_up(comm, c);
                } else {
                    fail(comm, rv);
                }
                return;
            }
            if (moved > 0) {
                comm->last_progress = pccl__clock_ns();
            }
            if (!ready) {
                return;
            }
            dispatch(comm, c);
            if (c->rstate != PCCL__RX_PAYLOAD) {
                return; /* parked or failed */
            }
        } else if (c->rstate == PCCL__RX_PAYLOAD) {
            int done;
            pccl__coll_op *op = c->rop;
            if ((rv = pccl__conn_recv_payload(c, &done, &moved)) != 0) {
                fail(comm, rv);
                return;
            }
            if (moved > 0) {
                comm->last_progress = pccl__clock_ns();
            }
            if (done) {
                op->vt->received(op, c->runit, &c->rh, c->scratch, emit_cb, comm);
                flush_dirty(comm);
            } else if (moved == 0) {
                return;
            }
            if (moved >= budget) {
                return;
            }
            budget -= moved;
        } else {
            return;
        }
    }
}

/* The peer hung up c: an inbound connection between two frames (a peer
 * that finished its last op and closed does exactly that, and its FIN on
 * one connection can overtake data still queued on another), or an
 * outbound one (the peer never sends there).  c leaves the poller.  With
 * nothing in flight the ring is useless: it breaks at once; so it does if
 * an op still needs c (inbound: a unit scheduled on it; outbound: anything
 * left to send).  Otherwise the ops go on, and the ring breaks once they
 * are done (poll_once). */
static void
hung_up(pccl_comm *comm, pccl__conn *c)
{
    pccl_op_handle *op;

    c->peer_closed = 1;
    comm->nclosed_conns++;
    pccl__poller_del(&comm->poller, c->fd);
    c->registered = 0;
    if (comm->inflight_ops == NULL || (c->outbound && c->sq_head != NULL)) {
        fail(comm, PCCL_EPEERLOST);
        return;
    }
    for (op = comm->inflight_ops; op != NULL; op = op->inflight_next) {
        if (op->op->vt->needs_conn(op->op, c->index, c->outbound)) {
            fail(comm, PCCL_EPEERLOST);
            return;
        }
    }
}

/* An outbound connection is readable or errored: the peer never sends on
 * it, so this is a hang-up (or garbage). */
static void
probe_outbound(pccl_comm *comm, pccl__conn *c)
{
    uint8_t b;
    size_t got = 0;
    pccl_result rv = pccl__sock_read(c->fd, &b, 1, &got);

    if (rv == 0 && got == 1) {
        fail(comm, PCCL_EPROTO);
        return;
    }
    hung_up(comm, c);
}

static void
complete_done_ops(pccl_comm *comm)
{
    pccl_op_handle *op, *next, *done = NULL;

    for (op = comm->inflight_ops; op != NULL; op = next) {
        next = op->inflight_next;
        if (op->op->vt->done(op->op)) {
            if (op->inflight_prev != NULL) {
                op->inflight_prev->inflight_next = op->inflight_next;
            } else {
                comm->inflight_ops = op->inflight_next;
            }
            if (op->inflight_next != NULL) {
                op->inflight_next->inflight_prev = op->inflight_prev;
            }
            op->queue_next = done;
            done = op;
        }
    }
    if (done != NULL) {
        pccl__mutex_lock(&comm->mtx);
        comm->stats_bytes = comm->backlog_bytes;
        comm->stats_ns = comm->backlog_ns;
        finish_ops(comm, done, PCCL_OK);
        pccl__cond_broadcast(&comm->cv);
        pccl__mutex_unlock(&comm->mtx);
    }
}

static void
free_ring(pccl__ring_install *r)
{
    free(r->out);
    free(r->in);
    free(r->scratch);
    free(r->dirty);
    free(r);
}

static void
close_ring(pccl_comm *comm)
{
    pccl__ring_install *r = comm->engine_ring;
    uint32_t k;

    if (r == NULL) {
        return;
    }
    for (k = 0; k < r->nlinks; k++) {
        if (r->out[k].registered) {
            pccl__poller_del(&comm->poller, r->out[k].fd);
        }
        if (r->in[k].registered) {
            pccl__poller_del(&comm->poller, r->in[k].fd);
        }
        pccl__conn_fini(&r->out[k]);
        pccl__conn_fini(&r->in[k]);
    }
    free_ring(r);
    comm->engine_ring = NULL;
    comm->ndirty = 0;
    comm->nparked_conns = 0;
    comm->nclosed_conns = 0;
}

/* Break the ring: close sockets first, then fail ops in flight, ops still
 * queued, and `subs` (already taken from the queue). */
static void
engine_break(pccl_comm *comm, pccl_result code, pccl_op_handle *subs)
{
    pccl_op_handle *op, *next;

    complete_done_ops(comm); /* ops that got every byte still succeed */
    close_ring(comm);
    pccl__mutex_lock(&comm->mtx);
    for (op = comm->inflight_ops; op != NULL; op = next) {
        next = op->inflight_next;
        pccl__op_finish_locked(comm, op, code);
    }
    comm->inflight_ops = NULL;
    finish_ops(comm, subs, code);
    finish_ops(comm, comm->submit_head, code);
    comm->submit_head = comm->submit_tail = NULL;
    if (comm->ring_state == PCCL__RING_READY) {
        comm->ring_state = PCCL__RING_BROKEN;
    }
    comm->engine_ring_live = 0;
    pccl__cond_broadcast(&comm->cv);
    pccl__mutex_unlock(&comm->mtx);
    comm->engine_fail = 0;
}

static void
install(pccl_comm *comm, pccl__ring_install *r)
{
    uint32_t k;
    pccl_result rv;

    comm->engine_ring = r;
    pccl__link_stats_reset(comm, pccl__clock_ns());
    comm->ndirty = 0;
    comm->nparked_conns = 0;
    comm->nclosed_conns = 0;
    for (k = 0; k < r->nlinks; k++) {
        pccl__conn *cs[2] = {&r->out[k], &r->in[k]};
        int i;
        for (i = 0; i < 2; i++) {
            if ((rv = pccl__poller_add(&comm->poller, cs[i]->fd, PCCL__POLL_IN, cs[i])) != 0) {
                fail(comm, rv);
                return;
            }
            cs[i]->registered = 1;
            cs[i]->interest = PCCL__POLL_IN;
        }
    }
}

/* Handle requests; returns 1 when the engine must exit. */
static int
handle_requests(pccl_comm *comm)
{
    pccl__ring_install *inst;
    pccl_op_handle *subs;
    pccl_result brk;
    int closing;

    pccl__event_drain(&comm->engine_wake);
    pccl__mutex_lock(&comm->mtx);
    closing = comm->closing;
    inst = comm->req_install;
    comm->req_install = NULL;
    brk = comm->req_break;
    comm->req_break = 0;
    subs = comm->submit_head;
    comm->submit_head = comm->submit_tail = NULL;
    pccl__mutex_unlock(&comm->mtx);

    if (inst != NULL) {
        if (comm->engine_ring != NULL) {
            close_ring(comm); /* cannot happen: set_ring drops first */
        }
        install(comm, inst);
        if (comm->engine_fail != 0) {
            brk = brk ? brk : comm->engine_fail;
        }
    }
    if (closing) {
        engine_break(comm, PCCL_ECLOSED, subs);
        return 1;
    }
    if (brk != 0) {
        engine_break(comm, brk, subs);
        return 0;
    }
    start_ops(comm, subs);
    flush_dirty(comm);
    if (comm->engine_fail != 0) {
        engine_break(comm, comm->engine_fail, NULL);
    }
    /* An op that only sends (a broadcast's root) may be done once its
     * frames are written: finish it now, not at the next socket event. */
    complete_done_ops(comm);
    return 0;
}

/* One wait on the poller (at most until `deadline`, or the progress
 * deadline of the ops in flight) and the handling of what it reported:
 * socket events, finished ops, the progress timeout.  *wake is set when
 * the wake-up event fired (requests are waiting: handle_requests).
 * Returns the number of socket events handled.  progress_lock held. */
static int
poll_once(pccl_comm *comm, uint64_t deadline, int *wake)
{
    pccl__poll_event ev[64];
    pccl__ring_install *ring_at_start;
    int n, i, nsock = 0;

    *wake = 0;
    if (comm->inflight_ops != NULL && comm->progress_timeout_ms >= 0) {
        uint64_t pd = comm->last_progress + (uint64_t)comm->progress_timeout_ms * 1000000u;
        if (pd < deadline) {
            deadline = pd;
        }
    }
    if (pccl__poller_wait(&comm->poller, ev, 64, pccl__poll_timeout_ms(deadline), &n) != 0) {
        n = 0;
        pccl__sleep_ms(1);
    }
    ring_at_start = comm->engine_ring;
    for (i = 0; i < n; i++) {
        pccl__conn *c;
        if (ev[i].ptr == (void *)&comm->engine_wake) {
            *wake = 1;
            continue;
        }
        nsock++;
        if (comm->engine_ring == NULL || comm->engine_ring != ring_at_start) {
            continue; /* the ring broke during this batch */
        }
        c = ev[i].ptr;
        if (c->fd < 0 || !c->registered) {
            continue;
        }
        if (c->outbound) {
            if (ev[i].flags & PCCL__POLL_OUT) {
                flush(comm, c);
            }
            if (comm->engine_fail == 0 && (ev[i].flags & (PCCL__POLL_IN | PCCL__POLL_ERR))) {
                probe_outbound(comm, c);
            }
        } else if (c->rstate == PCCL__RX_PARKED) {
            if (ev[i].flags & PCCL__POLL_ERR) {
                fail(comm, PCCL_EPEERLOST);
            }
        } else {
            rx(comm, c);
        }
        if (comm->engine_fail == 0) {
            flush_dirty(comm);
        }
        if (comm->engine_fail != 0) {
            engine_break(comm, comm->engine_fail, NULL);
        }
    }
    complete_done_ops(comm);
    if (comm->nclosed_conns > 0 && comm->inflight_ops == NULL && comm->engine_ring != NULL) {
        /* the ops that could still finish on a hung-up ring did */
        engine_break(comm, PCCL_EPEERLOST, NULL);
    }
    if (comm->inflight_ops != NULL && comm->progress_timeout_ms >= 0 &&
        pccl__clock_ns() >= comm->last_progress +
                                (uint64_t)comm->progress_timeout_ms * 1000000u) {
        engine_break(comm, PCCL_ETIMEDOUT, NULL);
    }
    return nsock;
}

/* The ring's sockets the idle engine watches for hang-ups; returns n. */
static size_t
idle_fds(pccl_comm *comm, int *fds)
{
    pccl__ring_install *r = comm->engine_ring;
    size_t n = 0;
    uint32_t k;

    for (k = 0; r != NULL && k < r->nlinks && n + 2 <= PCCL__MAX_HANGUP_FDS; k++) {
        if (r->out[k].registered) {
            fds[n++] = r->out[k].fd;
        }
        if (r->in[k].registered) {
            fds[n++] = r->in[k].fd;
        }
    }
    return n;
}

/* With no op in flight or queued: if a socket of the ring is hung up,
 * break the ring now.  (With ops queued, they start first: a peer that
 * finished an op and closed may have sent all they need; if not, they
 * fail when they need what will never come.)  progress_lock held. */
static void
hangup_check(pccl_comm *comm)
{
    int fds[PCCL__MAX_HANGUP_FDS];
    size_t n;
    int queued;

    pccl__mutex_lock(&comm->mtx);
    queued = comm->submit_head != NULL;
    pccl__mutex_unlock(&comm->mtx);
    if (comm->inflight_ops != NULL || queued) {
        return;
    }
    n = idle_fds(comm, fds);
    if (n > 0 && pccl__poll_hangup(-1, fds, n, 0)) {
        engine_break(comm, PCCL_EPEERLOST, NULL);
    }
}

/* The engine thread.  Whoever holds progress_lock drives progress: this thread
 * whenever ops are in flight, or a thread blocked in pccl_op_wait that
 * found the engine idle (pccl__engine_drive).  With nothing in flight the
 * thread sleeps on the wake-up event and on hang-ups of the ring's
 * sockets, not on their data, so a waiter can take over without waking
 * it: a blocking all-reduce then costs no thread hand-off, and a peer
 * that hangs up while nothing is in flight still breaks the ring at
 * once.  (The socket list is copied under progress_lock; a driver that replaces
 * the ring wakes this thread so it watches the new one.) */
static void
engine_main(void *arg)
{
    pccl_comm *comm = arg;
    int requests = 1, idle = 0;
    int fds[PCCL__MAX_HANGUP_FDS];
    size_t nfds;

    for (;;) {
        pccl__mutex_lock(&comm->progress_lock);
        if (idle && comm->inflight_ops == NULL) {
            /* Woken while idle: a peer that hangs up on an idle ring
             * makes it useless; say so at once. */
            hangup_check(comm);
        }
        if (requests && handle_requests(comm)) {
            pccl__mutex_unlock(&comm->progress_lock);
            return;
        }
        if (comm->inflight_ops == NULL) {
            /* Idle.  handle_requests drained the event before it looked
             * at the requests, so none can be missed. */
            nfds = idle_fds(comm, fds);
            pccl__mutex_unlock(&comm->progress_lock);
            (void)pccl__poll_hangup(comm->engine_wake.fd, fds, nfds, 1);
            requests = 1;
            idle = 1;
            continue;
        }
        idle = 0;
        (void)poll_once(comm, PCCL__NO_DEADLINE, &requests);
        pccl__mutex_unlock(&comm->progress_lock);
    }
}

int
pccl__engine_drive(pccl_comm *comm, pccl_op_handle *h, uint64_t deadline)
{
    pccl_op_handle *list;
    pccl__ring_install *ring;
    int wake = 0, assist = h->op->assist, handoff;

    if (!pccl__mutex_trylock(&comm->progress_lock)) {
        /* The engine thread holds it: busy with other ops, or on its way
         * to sleep.  h may have been queued without a wake-up: wake it,
         * or h could wait forever. */
        pccl__engine_wake(comm);
        return 0;
    }
    ring = comm->engine_ring;
    pccl__mutex_lock(&comm->mtx);
    if (comm->closing || comm->req_install != NULL || comm->req_break != 0 ||
        h->state == PCCL__OP_DONE) {
        /* requests are the engine thread's business */
        pccl__mutex_unlock(&comm->mtx);
        pccl__mutex_unlock(&comm->progress_lock);
        pccl__engine_wake(comm);
        return 0;
    }
    list = comm->submit_head;
    comm->submit_head = comm->submit_tail = NULL;
    pccl__mutex_unlock(&comm->mtx);
    start_ops(comm, list);
    flush_dirty(comm);
    if (comm->engine_fail != 0) {
        engine_break(comm, comm->engine_fail, NULL);
    }
    complete_done_ops(comm);
    while (!__atomic_load_n(&h->finished, __ATOMIC_ACQUIRE) && pccl__clock_ns() < deadline) {
        /* While the network is quiet, do the op's own work ahead of the
         * engine (in place: save the input), one piece between two looks
         * at the sockets. */
        int nsock = poll_once(comm, assist ? 0 : deadline, &wake);
        if (wake) {
            break; /* requests from another thread: hand over */
        }
        if (assist && nsock == 0) {
            assist = h->op->vt->assist(h->op);
        }
    }
    /* Other ops, requests, or a broken ring (new sockets to watch) are
     * the engine thread's. */
    handoff = wake || comm->inflight_ops != NULL || comm->engine_ring != ring;
    pccl__mutex_unlock(&comm->progress_lock);
    if (handoff) {
        pccl__engine_wake(comm);
    }
    return 1;
}

pccl_result
pccl__engine_start(pccl_comm *comm)
{
    pccl_result rv;

    if ((rv = pccl__poller_init(&comm->poller)) != 0) {
        return rv;
    }
    if ((rv = pccl__poller_add(&comm->poller, comm->engine_wake.fd, PCCL__POLL_IN,
                               &comm->engine_wake)) != 0 ||
        (rv = pccl__thread_start(&comm->engine, engine_main, comm)) != 0) {
        pccl__poller_fini(&comm->poller);
        return rv;
    }
    return PCCL_OK;
}

void
pccl__engine_join(pccl_comm *comm)
{
    pccl__thread_join(&comm->engine);
    pccl__poller_fini(&comm->poller);
}

void
pccl__engine_wake(pccl_comm *comm)
{
    pccl__event_signal(&comm->engine_wake);
}
