/*
 * p2p.c - point-to-point send/recv between any two peers of a run.
 *
 * Connections.  A sender opens K connections (the communicator's
 * p2p_connections) to the receiver's listen address the first time it
 * sends to it, on a dial thread of its own, with the ring's HMAC
 * handshake under PCCL__PURPOSE_P2P: the hello names the run (epoch =
 * run token), the sender's and the receiver's peer numbers, K and the
 * slice size, and the receiver refuses anything that is not addressed to
 * it in this run.  Each side sends data only on the connections it
 * dialled and reads acknowledgements back on them; so two peers that
 * send to each other hold 2K connections, and no dial ever races another.
 *
 * Matching.  The n-th send with tag t from A to B meets the n-th recv
 * with tag t on B from A: each side counts (peer, tag) on its own, the
 * frame carries (tag, seq).  A message of `total` bytes is cut into
 * slices of slice_bytes; slice i travels on connection i % K, so the
 * receiver knows for every connection which slice comes next and places
 * it by offset straight into the recv buffer.  Anything else (a slice
 * out of that schedule, a size that is not the recv buffer's, a frame for
 * a message that already ended, an ack for a send that is not complete)
 * is PCCL_EPROTO and touches no memory.  A frame for a recv not posted
 * yet parks its connection (TCP flow control holds the sender back).
 *
 * Completion.  When every slice is in, the receiver sends an ACK frame on
 * connection 0 and its recv completes once the ACK is written; the send
 * completes when the ACK arrives.  So send returning OK means the receiver
 * holds the whole message.
 *
 * Failure.  Any error with a peer (hang-up, bad frame, a deadline, the
 * control plane reporting it lost) resets the pair: every connection to
 * it is closed (the other side sees the hang-up at once and resets too),
 * then its ops fail: the one that saw the error with its cause, the rest
 * with PCCL_EPEERLOST; the (peer, tag) counters start over.  A send buffer
 * is only ever read; a recv buffer holds unspecified bytes after a
 * failure.  pccl_comm_abort fails every p2p op with PCCL_EABORTED.
 *
 * Threads.  One I/O thread per communicator runs this file's poller and
 * is the only one touching the sockets; the state is under p->mtx, which
 * the thread drops only while it sleeps in the poller.  Callers queue
 * ops, signal the wake-up event and wait on p->cv.  No busy polling.
 */
#include <stdlib.h>
#include <string.h>

#include "core/comm.h"
#include "core/p2p.h"

enum {
    DIAL_RETRY_MS = 20 /* pause between attempts to reach a receiver */
};

typedef struct p2p_tagseq {
    struct p2p_tagseq *next;
    uint64_t tag;
    uint32_t send_next;
    uint32_t recv_next;
} p2p_tagseq;

typedef struct p2p_peer p2p_peer;

typedef struct p2p_conn {
    pccl__conn c;            /* c.outbound: 1 = we dialled it, we send DATA on it */
    p2p_peer *peer;
    struct p2p_conn *dirty_next; /* on p->dirty while c.dirty */
} p2p_conn;

struct p2p_peer {
    p2p_peer *next;
    uint32_t id;
    int lost;                /* reported lost: ops fail with EPEERLOST */
    int dialing;             /* a dial thread runs for it */
    uint64_t dial_gen;       /* bumped at reset: dials and accepts of an older one are stale */
    char addr[PCCL_ADDRSTRLEN];
    uint32_t nout;           /* 0 or K */
    p2p_conn *out[PCCL_MAX_CONNECTIONS];
    p2p_conn *in[PCCL_MAX_CONNECTIONS];
    p2p_tagseq *seqs;
};

struct pccl_p2p_handle {
    pccl__p2p *p;
    pccl_p2p_handle *next, *prev;  /* (mtx) in p->ops while not done */
    int is_send;
    uint32_t peer;
    uint64_t tag;
    uint32_t seq;
    uint8_t *buf;
    size_t len;
    uint64_t deadline;
    int started;             /* send: frames queued; recv: matching */
    int done;                /* (mtx) */
    pccl_result result;      /* (mtx) valid when done */
    uint32_t nslices;
    /* send */
    uint32_t nsent;
    pccl__frame_out *frames;
    /* recv */
    uint32_t nrecv;
    uint32_t *next_slice;    /* per connection: index of the slice due next */
    pccl__frame_out ack;
    int ack_queued;
};

struct pccl__p2p {
    pccl_comm *comm;
    pccl__mutex mtx;
    pccl__cond cv;
    pccl__poller poller;
    pccl__event wake;
    pccl__event stop;        /* signalled at close: dials give up */
    pccl__thread thread;
    int thread_started;
    int closing;
    uint64_t token;          /* the run */
    uint32_t self;           /* this peer's number */
    int has_identity;
    uint32_t ndials;         /* dial threads alive */
    p2p_peer *peers;
    pccl_p2p_handle *ops;    /* not done, oldest first */
    pccl_p2p_handle *ops_tail;
    p2p_conn *dirty;         /* connections with frames to flush (dirty_next) */
};

/* ------------------------------------------------------------ helpers */

static p2p_peer *
find_peer(pccl__p2p *p, uint32_t id, int create)
{
    p2p_peer *pe;

    for (pe = p->peers; pe != NULL; pe = pe->next) {
        if (pe->id == id) {
            return pe;
        }
    }
    if (!create || (pe = calloc(1, sizeof(*pe))) == NULL) {
        return NULL;
    }
    pe->id = id;
    pe->next = p->peers;
    p->peers = pe;
    return pe;
}

static p2p_tagseq *
find_seq(p2p_peer *pe, uint64_t tag, int create)
{
    p2p_tagseq *s;

    for (s = pe->seqs; s != NULL; s = s->next) {
        if (s->tag == tag) {
            return s;
        }
    }
    if (!create || (s = calloc(1, sizeof(*s))) == NULL) {
        return NULL;
    }
    s->tag = tag;
    s->next = pe->seqs;
    pe->seqs = s;
    return s;
}

static void
unlink_op(pccl__p2p *p, pccl_p2p_handle *h)
{
    if (h->prev != NULL) {
        h->prev->next = h->next;
    } else {
        p->ops = h->next;
    }
    if (h->next != NULL) {
        h->next->prev = h->prev;
    } else {
        p->ops_tail = h->prev;
    }
    h->next = h->prev = NULL;
}

/* Mark h done with rv; mtx held. */
static void
finish(pccl__p2p *p, pccl_p2p_handle *h, pccl_result rv)
{
    if (h->done) {
        return;
    }
    unlink_op(p, h);
    h->done = 1;
    h->result = rv;
    pccl__cond_broadcast(&p->cv);
}

static void
conn_close(pccl__p2p *p, p2p_conn *pc)
{
    p2p_conn **pp;

    if (pc == NULL) {
        return;
    }
    for (pp = &p->dirty; pc->c.dirty && *pp != NULL; pp = &(*pp)->dirty_next) {
        if (*pp == pc) {
            *pp = pc->dirty_next;
            break;
        }
    }
    if (pc->c.registered) {
        pccl__poller_del(&p->poller, pc->c.fd);
    }
    pccl__conn_fini(&pc->c);
    free(pc->c.scratch);
    free(pc);
}

/* Reset the pair with pe: close every connection first (no queued frame
 * survives), then fail its ops; `first` (may be NULL) gets rv, the others
 * EPEERLOST (rv itself for abort, close and a bad frame).  mtx held. */
static void
reset_peer(pccl__p2p *p, p2p_peer *pe, pccl_p2p_handle *first, pccl_result rv)
{
    pccl_p2p_handle *h, *next;
    p2p_tagseq *s;
    uint32_t k;

    for (k = 0; k < PCCL_MAX_CONNECTIONS; k++) {
        conn_close(p, pe->out[k]);
        conn_close(p, pe->in[k]);
        pe->out[k] = pe->in[k] = NULL;
    }
    pe->nout = 0;
    pe->dial_gen++;     /* a dial still running is stale now */
    pe->dialing = 0;
    while ((s = pe->seqs) != NULL) {
        pe->seqs = s->next;
        free(s);
    }
    if (first != NULL) {
        finish(p, first, rv);
    }
    for (h = p->ops; h != NULL; h = next) {
        next = h->next;
        if (h->peer == pe->id) {
            int keep = rv == PCCL_EABORTED || rv == PCCL_ECLOSED || rv == PCCL_EPROTO;
            finish(p, h, keep ? rv : PCCL_EPEERLOST);
        }
    }
}

static void
mark_dirty(pccl__p2p *p, p2p_conn *pc)
{
    if (!pc->c.dirty && !(pc->c.interest & PCCL__POLL_OUT)) {
        pc->c.dirty = 1;
        pc->dirty_next = p->dirty;
        p->dirty = pc;
    }
}

/* What pc waits for: data (or only a hang-up while parked), and room to
 * write while frames are queued. */
static void
update_interest(pccl__p2p *p, p2p_conn *pc)
{
    uint32_t want = pc->c.rstate == PCCL__RX_PARKED ? PCCL__POLL_RDHUP : PCCL__POLL_IN;

    if (pc->c.sq_head != NULL) {
        want |= PCCL__POLL_OUT;
    }
    if (pc->c.registered && pc->c.interest != want &&
        pccl__poller_mod(&p->poller, pc->c.fd, want, pc) == 0) {
        pc->c.interest = want;
    }
}

static void
sent_cb(void *arg, pccl__frame_out *f)
{
    pccl_p2p_handle *h = f->owner;

    (void)arg;
    if (h->is_send) {
        h->nsent++;
    } else {
        finish(h->p, h, PCCL_OK); /* the ack is written: the receiver is done */
    }
}

/* Write what is queued on pc; a failure resets its peer.  mtx held. */
static pccl_result
flush(pccl__p2p *p, p2p_conn *pc)
{
    size_t moved = 0;
    pccl_result rv;

    if (pc->c.fd < 0) {
        return PCCL_OK;
    }
    rv = pccl__conn_send(&pc->c, sent_cb, p, &moved);
    if (rv != 0) {
        reset_peer(p, pc->peer, NULL, PCCL_EPEERLOST);
        return rv;
    }
    update_interest(p, pc);
    return PCCL_OK;
}

static void
flush_dirty(pccl__p2p *p)
{
    while (p->dirty != NULL) {
        p2p_conn *pc = p->dirty;
        p->dirty = pc->dirty_next;
        pc->c.dirty = 0;
        (void)flush(p, pc); /* a reset takes its peer's others off the list */
    }
}

static p2p_conn *
conn_new(pccl__p2p *p, p2p_peer *pe, int fd, uint32_t index, int outbound)
{
    p2p_conn *pc = calloc(1, sizeof(*pc));

    if (pc == NULL) {
        pccl__sock_close(fd);
        return NULL;
    }
    pccl__conn_init(&pc->c, fd, index, outbound);
    pc->peer = pe;
    if (pccl__poller_add(&p->poller, fd, PCCL__POLL_IN, pc) != 0) {
        pccl__conn_fini(&pc->c);
        free(pc);
        return NULL;
    }
    pc->c.registered = 1;
    pc->c.interest = PCCL__POLL_IN;
    return pc;
}

/* ------------------------------------------------------------- dialling */

typedef struct dial_job {
    pccl__p2p *p;
    uint32_t peer;
    uint64_t gen;
    pccl__sockaddr addr;
    pccl__hs_client_hello hello;
} dial_job;

static void
dial_main(void *arg)
{
    dial_job *j = arg;
    pccl__p2p *p = j->p;
    pccl_comm *comm = p->comm;
    int fds[PCCL_MAX_CONNECTIONS];
    uint64_t deadline = pccl__deadline_ms(comm->handshake_timeout_ms);
    pccl_result rv = PCCL_OK;
    p2p_peer *pe;
    uint32_t k, K = comm->nconns;

    for (k = 0; k < K; k++) {
        fds[k] = -1;
    }
    for (k = 0; k < K && rv == 0; k++) {
        j->hello.conn_index = k;
        for (;;) {
            rv = pccl__sock_connect(&j->addr, NULL, deadline, p->stop.fd, &fds[k]);
            if (rv == 0) {
                rv = pccl__link_client_handshake(fds[k], &j->hello, comm->secret,
                                                 comm->secret_len, deadline, p->stop.fd);
            }
            if (rv == 0) {
                break;
            }
            pccl__sock_close(fds[k]);
            fds[k] = -1;
            /* Retry what can be transient until the deadline: nobody
             * listening yet, the receiver has not learnt its identity yet
             * (ESTATE), still holds the connections of a pair it has not
             * seen break (EBUSY), or reset us mid-handshake. */
            if ((rv != PCCL_ECONNREFUSED && rv != PCCL_ESTATE && rv != PCCL_EBUSY &&
                 rv != PCCL_EPEERLOST) ||
                pccl__clock_ns() >= deadline) {
                break;
            }
            {
                uint64_t pause = pccl__deadline_ms(DIAL_RETRY_MS);
                if (pccl__sock_wait(p->stop.fd, 0, pause < deadline ? pause : deadline, -1) ==
                    PCCL_OK) {
                    rv = PCCL_ECLOSED;
                    break;
                }
            }
        }
    }
    pccl__hs_thread_done();
    pccl__mutex_lock(&p->mtx);
    pe = find_peer(p, j->peer, 0);
    if (pe != NULL && pe->dial_gen == j->gen) {
        pe->dialing = 0;
    }
    if (pe != NULL && pe->dial_gen != j->gen) {
        pe = NULL; /* the pair was reset meanwhile: these connections are stale */
    }
    if (p->closing || pe == NULL) {
        rv = rv ? rv : PCCL_ECLOSED;
    } else if (pe->lost) {
        rv = PCCL_EPEERLOST;
    }
    if (rv == 0) {
        for (k = 0; k < K; k++) {
            pe->out[k] = conn_new(p, pe, fds[k], k, 1);
            fds[k] = -1;
            if (pe->out[k] == NULL) {
                rv = PCCL_ENOMEM;
            }
        }
        if (rv == 0) {
            pe->nout = K;
        } else {
            reset_peer(p, pe, NULL, rv);
        }
    } else if (pe != NULL) {
        /* the sends waiting for these connections fail with the cause */
        pccl_p2p_handle *h, *next;
        for (h = p->ops; h != NULL; h = next) {
            next = h->next;
            if (h->peer == pe->id && h->is_send && !h->started) {
                finish(p, h, rv == PCCL_EABORTED ? PCCL_ECLOSED : rv);
            }
        }
    }
    for (k = 0; k < K; k++) {
        pccl__sock_close(fds[k]);
    }
    p->ndials--;
    pccl__cond_broadcast(&p->cv);
    pccl__mutex_unlock(&p->mtx);
    pccl__event_signal(&p->wake);
    free(j);
}

/* Start dialling pe; mtx held.  Failures fail the waiting sends. */
static void
start_dial(pccl__p2p *p, p2p_peer *pe)
{
    dial_job *j = calloc(1, sizeof(*j));
    pccl_result rv;

    if (j == NULL) {
        rv = PCCL_ENOMEM;
    } else if ((rv = pccl__addr_parse(pe->addr, 1, &j->addr)) == 0) {
        j->p = p;
        j->peer = pe->id;
        j->gen = pe->dial_gen;
        j->hello.purpose = PCCL__PURPOSE_P2P;
        j->hello.epoch = p->token;
        j->hello.from_rank = p->self;
        j->hello.to_rank = pe->id;
        j->hello.world = UINT32_MAX;
        j->hello.nconns = p->comm->nconns;
        j->hello.slice_bytes = p->comm->slice_bytes;
        pe->dialing = 1;
        p->ndials++;
        if ((rv = pccl__thread_spawn(dial_main, j)) == 0) {
            return;
        }
        pe->dialing = 0;
        p->ndials--;
    }
    free(j);
    {
        pccl_p2p_handle *h, *next;
        for (h = p->ops; h != NULL; h = next) {
            next = h->next;
            if (h->peer == pe->id && h->is_send && !h->started) {
                finish(p, h, rv);
            }
        }
    }
}

/* ------------------------------------------------------------ the ops */

static void
try_unpark(pccl__p2p *p, p2p_peer *pe);

/* Queue the frames of send h on pe's connections; mtx held. */
static void
queue_send(pccl__p2p *p, p2p_peer *pe, pccl_p2p_handle *h)
{
    uint32_t i, K = pe->nout;
    size_t slice = p->comm->slice_bytes;

    h->started = 1;
    for (i = 0; i < h->nslices; i++) {
        pccl__frame_header fh;
        pccl__frame_out *f = &h->frames[i];
        size_t off = (size_t)i * slice;
        size_t n = h->len - off < slice ? h->len - off : slice;
        p2p_conn *pc = pe->out[i % K];

        memset(&fh, 0, sizeof(fh));
        fh.kind = PCCL__FRAME_P2P_DATA;
        fh.epoch = p->token;
        fh.tag = h->tag;
        fh.seq = h->seq;
        fh.offset = off;
        fh.count = (uint32_t)n;
        fh.length = (uint32_t)n;
        fh.dtype = PCCL_UINT8;
        fh.total = h->len;
        pccl__frame_encode(&fh, f->hdr);
        f->owner = h;
        f->payload = h->buf + off;
        f->len = (uint32_t)n;
        f->next = NULL;
        pccl__conn_enqueue(&pc->c, f);
        mark_dirty(p, pc);
    }
}

/* Start what can start: sends whose connections are up (dialling the
 * others), recvs (parked frames may now have their match).  mtx held. */
static void
start_ops(pccl__p2p *p)
{
    pccl_p2p_handle *h, *next;
    p2p_peer *pe;

    for (h = p->ops; h != NULL; h = next) {
        next = h->next;
        if (h->started) {
            continue;
        }
        if ((pe = find_peer(p, h->peer, 0)) == NULL) {
            finish(p, h, PCCL_ENOMEM);
            continue;
        }
        if (pe->lost) {
            finish(p, h, PCCL_EPEERLOST);
            continue;
        }
        if (!h->is_send) {
            h->started = 1;
            try_unpark(p, pe);
        } else if (pe->nout > 0) {
            queue_send(p, pe, h);
        } else if (!pe->dialing) {
            start_dial(p, pe);
        }
    }
}

static pccl_p2p_handle *
find_op(pccl__p2p *p, uint32_t peer, int is_send, uint64_t tag, uint32_t seq)
{
    pccl_p2p_handle *h;

    for (h = p->ops; h != NULL; h = h->next) {
        /* a recv matches from the moment it is posted (it may not have
         * been through start_ops yet); a send once its frames are queued */
        if (h->peer == peer && h->is_send == is_send && h->tag == tag && h->seq == seq &&
            (h->started || !is_send)) {
            return h;
        }
    }
    return NULL;
}

/* A DATA header is complete on inbound pc: check it against the recv's
 * schedule and say where its payload goes.  Returns 0 and sets *park when
 * no recv is posted for it yet.  mtx held. */
static pccl_result
match_data(pccl__p2p *p, p2p_conn *pc, int *park)
{
    const pccl__frame_header *fh = &pc->c.rh;
    p2p_peer *pe = pc->peer;
    pccl_p2p_handle *h;
    size_t slice = p->comm->slice_bytes;
    uint64_t idx;
    size_t want;
    p2p_tagseq *s;

    *park = 0;
    if (fh->kind != PCCL__FRAME_P2P_DATA || fh->epoch != p->token || fh->step != 0) {
        return PCCL_EPROTO;
    }
    h = find_op(p, pe->id, 0, fh->tag, fh->seq);
    if (h == NULL) {
        s = find_seq(pe, fh->tag, 0);
        if (s != NULL && fh->seq < s->recv_next) {
            return PCCL_EPROTO; /* a recv that already ended, or one not started yet */
        }
        *park = 1;
        return PCCL_OK;
    }
    if (fh->total != h->len) {
        finish(p, h, PCCL_EINVAL); /* sizes differ: both ends learn it (nack) */
        return PCCL_EINVAL;
    }
    if (fh->offset % slice != 0 || fh->offset > h->len) {
        finish(p, h, PCCL_EPROTO); /* this recv sees the cause; the reset fails the rest */
        return PCCL_EPROTO;
    }
    idx = fh->offset / slice;
    want = h->len - fh->offset < slice ? h->len - fh->offset : slice;
    if (idx >= h->nslices || idx % p->comm->nconns != pc->c.index ||
        h->next_slice[pc->c.index] != idx || fh->length != want) {
        finish(p, h, PCCL_EPROTO);
        return PCCL_EPROTO;
    }
    h->next_slice[pc->c.index] += p->comm->nconns;
    pccl__conn_expect(&pc->c, h->buf + fh->offset, want, h, (uint32_t)idx);
    return PCCL_OK;
}

/* The payload of a slice is in: when it was the last, acknowledge. */
static void
data_done(pccl__p2p *p, p2p_conn *pc, pccl_p2p_handle *h)
{
    pccl__frame_header fh;
    p2p_peer *pe = pc->peer;

    if (++h->nrecv < h->nslices) {
        return;
    }
    memset(&fh, 0, sizeof(fh));
    fh.kind = PCCL__FRAME_P2P_ACK;
    fh.epoch = p->token;
    fh.tag = h->tag;
    fh.seq = h->seq;
    fh.dtype = PCCL_UINT8;
    fh.total = h->len;
    pccl__frame_encode(&fh, h->ack.hdr);
    h->ack.owner = h;
    h->ack.payload = NULL;
    h->ack.len = 0;
    h->ack.next = NULL;
    h->ack_queued = 1;
    /* slice 0 arrived on connection 0: the ack goes back on it */
    pccl__conn_enqueue(&pe->in[0]->c, &h->ack);
    mark_dirty(p, pe->in[0]);
}

/* A message whose size is not the recv buffer's: tell the sender with an
 * ack carrying PCCL_EINVAL in `step`, written at once on connection 0 when
 * nothing else is queued there (best effort: the reset that follows
 * closes the connections, and the sender then fails with EPEERLOST). */
static void
nack_size(pccl__p2p *p, p2p_peer *pe, const pccl__frame_header *data)
{
    pccl__frame_header fh;
    uint8_t hdr[PCCL__FRAME_HEADER_SIZE];
    pccl__iov iov;
    size_t put = 0, budget = (size_t)64 << 20;
    uint8_t sink[16384];
    uint32_t k;

    if (pe->in[0] == NULL || pe->in[0]->c.sq_head != NULL) {
        return;
    }
    memset(&fh, 0, sizeof(fh));
    fh.kind = PCCL__FRAME_P2P_ACK;
    fh.epoch = p->token;
    fh.tag = data->tag;
    fh.seq = data->seq;
    fh.step = PCCL_EINVAL;
    fh.dtype = PCCL_UINT8;
    fh.total = data->total;
    pccl__frame_encode(&fh, hdr);
    iov.base = hdr;
    iov.len = sizeof(hdr);
    (void)pccl__sock_writev(pe->in[0]->c.fd, &iov, 1, &put);
    /* Read away what already arrived: a socket closed with unread bytes
     * sends a reset, which may overtake the nack at the sender. */
    for (k = 0; k < PCCL_MAX_CONNECTIONS && budget > 0; k++) {
        size_t got;
        while (pe->in[k] != NULL && budget > 0 &&
               pccl__sock_read(pe->in[k]->c.fd, sink, sizeof(sink), &got) == 0 && got > 0) {
            budget = got < budget ? budget - got : 0;
        }
    }
}

/* Read what pc has; errors reset its peer.  mtx held. */
static void
rx(pccl__p2p *p, p2p_conn *pc)
{
    p2p_peer *pe = pc->peer;
    size_t budget = 8u << 20, moved;
    int ready, park, done;
    pccl_result rv;

    for (;;) {
        if (pc->c.rstate == PCCL__RX_HEADER) {
            if ((rv = pccl__conn_recv_header(&pc->c, &ready, &moved)) != 0) {
                reset_peer(p, pe, NULL, rv == PCCL_EPROTO ? PCCL_EPROTO : PCCL_EPEERLOST);
                return;
            }
            if (!ready) {
                return;
            }
            if (pc->c.outbound) {
                /* an ack for one of our sends */
                const pccl__frame_header *fh = &pc->c.rh;
                pccl_p2p_handle *h = NULL;
                if (fh->kind == PCCL__FRAME_P2P_ACK && fh->epoch == p->token &&
                    (fh->step == 0 || fh->step == PCCL_EINVAL)) {
                    h = find_op(p, pe->id, 1, fh->tag, fh->seq);
                }
                pc->c.rhdr_got = 0;
                if (h != NULL && fh->step == PCCL_EINVAL && fh->total == h->len) {
                    reset_peer(p, pe, h, PCCL_EINVAL); /* the receiver's buffer differs */
                    return;
                }
                if (h == NULL || h->nsent != h->nslices || fh->total != h->len) {
                    reset_peer(p, pe, h, PCCL_EPROTO);
                    return;
                }
                finish(p, h, PCCL_OK);
                continue;
            }
            if ((rv = match_data(p, pc, &park)) != 0) {
                if (rv == PCCL_EINVAL) {
                    nack_size(p, pe, &pc->c.rh);
                    rv = PCCL_EPEERLOST;
                }
                reset_peer(p, pe, NULL, rv);
                return;
            }
            if (park) {
                pc->c.rstate = PCCL__RX_PARKED;
                update_interest(p, pc);
                return;
            }
        } else if (pc->c.rstate == PCCL__RX_PAYLOAD) {
            pccl_p2p_handle *h = pc->c.rop;
            if ((rv = pccl__conn_recv_payload(&pc->c, &done, &moved)) != 0) {
                reset_peer(p, pe, h, rv == PCCL_EPROTO ? PCCL_EPROTO : PCCL_EPEERLOST);
                return;
            }
            if (done) {
                data_done(p, pc, h);
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

static void
try_unpark(pccl__p2p *p, p2p_peer *pe)
{
    uint32_t k;
    int park;

    for (k = 0; k < PCCL_MAX_CONNECTIONS; k++) {
        p2p_conn *pc = pe->in[k];
        if (pc == NULL || pc->c.rstate != PCCL__RX_PARKED) {
            continue;
        }
        pc->c.rstate = PCCL__RX_HEADER;
        if (match_data(p, pc, &park) != 0) {
            reset_peer(p, pe, NULL, PCCL_EPROTO);
            return;
        }
        if (park) {
            pc->c.rstate = PCCL__RX_PARKED;
            continue;
        }
        update_interest(p, pc);
        rx(p, pc);
        if (pe->in[k] != pc) {
            return; /* reset */
        }
    }
}

/* Fail ops whose deadline passed; returns the next deadline.  mtx held. */
static uint64_t
check_deadlines(pccl__p2p *p)
{
    uint64_t now = pccl__clock_ns(), next = PCCL__NO_DEADLINE;
    pccl_p2p_handle *h;
    int again = 1;

    while (again) {
        again = 0;
        for (h = p->ops; h != NULL; h = h->next) {
            if (h->deadline <= now) {
                p2p_peer *pe = find_peer(p, h->peer, 0);
                if (pe != NULL && h->started) {
                    reset_peer(p, pe, h, PCCL_ETIMEDOUT);
                } else {
                    finish(p, h, PCCL_ETIMEDOUT);
                }
                again = 1;
                break;
            }
            if (h->deadline < next) {
                next = h->deadline;
            }
        }
    }
    return next;
}

static void
p2p_main(void *arg)
{
    pccl__p2p *p = arg;
    pccl__poll_event ev[64];
    int n, i;

    pccl__mutex_lock(&p->mtx);
    while (!p->closing) {
        uint64_t deadline;
        start_ops(p);
        flush_dirty(p);
        deadline = check_deadlines(p);
        pccl__mutex_unlock(&p->mtx);
        if (pccl__poller_wait(&p->poller, ev, 64, pccl__poll_timeout_ms(deadline), &n) != 0) {
            n = 0;
            pccl__sleep_ms(1);
        }
        pccl__mutex_lock(&p->mtx);
        for (i = 0; i < n && !p->closing; i++) {
            p2p_conn *pc = ev[i].ptr;
            if (ev[i].ptr == (void *)&p->wake) {
                pccl__event_drain(&p->wake);
                continue;
            }
            /* a connection of this batch may have been closed by a reset */
            {
                p2p_peer *pe;
                uint32_t k;
                int live = 0;
                for (pe = p->peers; pe != NULL && !live; pe = pe->next) {
                    for (k = 0; k < PCCL_MAX_CONNECTIONS && !live; k++) {
                        live = pe->out[k] == pc || pe->in[k] == pc;
                    }
                }
                if (!live) {
                    continue;
                }
            }
            if (ev[i].flags & PCCL__POLL_OUT) {
                if (flush(p, pc) != 0) {
                    continue;
                }
            }
            if (pc->c.rstate == PCCL__RX_PARKED) {
                if (ev[i].flags & PCCL__POLL_ERR) {
                    reset_peer(p, pc->peer, NULL, PCCL_EPEERLOST);
                }
            } else if (ev[i].flags & (PCCL__POLL_IN | PCCL__POLL_ERR)) {
                rx(p, pc);
            }
            flush_dirty(p);
        }
    }
    pccl__mutex_unlock(&p->mtx);
}

/* ---------------------------------------------------------- lifecycle */

pccl_result
pccl__p2p_init(pccl_comm *comm)
{
    pccl__p2p *p = calloc(1, sizeof(*p));
    pccl_result rv;

    if (p == NULL) {
        return PCCL_ENOMEM;
    }
    p->comm = comm;
    p->wake.fd = -1;
    p->stop.fd = -1;
    if ((rv = pccl__mutex_init(&p->mtx)) != 0) {
        free(p);
        return rv;
    }
    if ((rv = pccl__cond_init(&p->cv)) != 0) {
        goto fail_mtx;
    }
    if ((rv = pccl__event_init(&p->wake)) != 0) {
        goto fail_cv;
    }
    if ((rv = pccl__event_init(&p->stop)) != 0) {
        goto fail_wake;
    }
    if ((rv = pccl__poller_init(&p->poller)) != 0) {
        goto fail_stop;
    }
    if ((rv = pccl__poller_add(&p->poller, p->wake.fd, PCCL__POLL_IN, &p->wake)) != 0 ||
        (rv = pccl__thread_start(&p->thread, p2p_main, p)) != 0) {
        pccl__poller_fini(&p->poller);
        goto fail_stop;
    }
    p->thread_started = 1;
    comm->p2p = p;
    return PCCL_OK;

fail_stop:
    pccl__event_fini(&p->stop);
fail_wake:
    pccl__event_fini(&p->wake);
fail_cv:
    pccl__cond_fini(&p->cv);
fail_mtx:
    pccl__mutex_fini(&p->mtx);
    free(p);
    return rv;
}

void
pccl__p2p_close(pccl_comm *comm)
{
    pccl__p2p *p = comm->p2p;
    p2p_peer *pe;

    if (p == NULL) {
        return;
    }
    pccl__mutex_lock(&p->mtx);
    if (p->closing) {
        pccl__mutex_unlock(&p->mtx);
        return;
    }
    p->closing = 1;
    pccl__event_signal(&p->stop);
    pccl__event_signal(&p->wake);
    pccl__mutex_unlock(&p->mtx);
    if (p->thread_started) {
        pccl__thread_join(&p->thread);
        p->thread_started = 0;
    }
    pccl__mutex_lock(&p->mtx);
    while (p->ndials > 0) {
        pccl__cond_wait(&p->cv, &p->mtx);
    }
    for (pe = p->peers; pe != NULL; pe = pe->next) {
        reset_peer(p, pe, NULL, PCCL_ECLOSED);
    }
    while (p->ops != NULL) {
        finish(p, p->ops, PCCL_ECLOSED);
    }
    pccl__mutex_unlock(&p->mtx);
}

void
pccl__p2p_fini(pccl_comm *comm)
{
    pccl__p2p *p = comm->p2p;
    p2p_peer *pe;

    if (p == NULL) {
        return;
    }
    pccl__p2p_close(comm);
    while ((pe = p->peers) != NULL) {
        p->peers = pe->next;
        free(pe);
    }
    pccl__poller_fini(&p->poller);
    pccl__event_fini(&p->stop);
    pccl__event_fini(&p->wake);
    pccl__cond_fini(&p->cv);
    pccl__mutex_fini(&p->mtx);
    free(p);
    comm->p2p = NULL;
}

void
pccl__p2p_abort(pccl_comm *comm)
{
    pccl__p2p *p = comm->p2p;
    p2p_peer *pe;

    if (p == NULL) {
        return;
    }
    pccl__mutex_lock(&p->mtx);
    for (pe = p->peers; pe != NULL; pe = pe->next) {
        reset_peer(p, pe, NULL, PCCL_EABORTED);
    }
    while (p->ops != NULL) {
        finish(p, p->ops, PCCL_EABORTED);
    }
    pccl__mutex_unlock(&p->mtx);
    pccl__event_signal(&p->wake);
}

void
pccl__p2p_on_hello(pccl_comm *comm, int fd, const pccl__hs_server *st)
{
    pccl__p2p *p = comm->p2p;
    const pccl__hs_client_hello *h = &st->hello;
    uint16_t status = 0;
    p2p_peer *pe = NULL;
    uint64_t gen = 0;
    pccl_result rv;

    pccl__mutex_lock(&p->mtx);
    if (p->closing) {
        status = PCCL_ECLOSED;
    } else if (!p->has_identity) {
        status = PCCL_ESTATE;
    } else if (h->epoch != p->token || h->to_rank != p->self || h->from_rank == p->self ||
               h->world != UINT32_MAX || h->nconns != comm->nconns ||
               h->slice_bytes != comm->slice_bytes) {
        status = PCCL_EPROTO;
    } else if ((pe = find_peer(p, h->from_rank, 1)) == NULL) {
        status = PCCL_ENOMEM;
    } else if (pe->lost) {
        status = PCCL_EPEERLOST;
    } else if (pe->in[h->conn_index] != NULL) {
        status = PCCL_EBUSY;
    } else {
        gen = pe->dial_gen;
    }
    pccl__mutex_unlock(&p->mtx);
    rv = pccl__link_server_ack(fd, st, status, comm->secret, comm->secret_len,
                               pccl__deadline_ms(comm->handshake_timeout_ms), -1);
    if (status != 0 || rv != 0) {
        pccl__sock_close(fd);
        return;
    }
    pccl__mutex_lock(&p->mtx);
    if (p->closing || pe->lost || pe->in[h->conn_index] != NULL || pe->dial_gen != gen) {
        /* the pair was reset while we answered: this connection belongs
         * to the set that broke (its sender has reset or will) */
        pccl__sock_close(fd);
    } else {
        pe->in[h->conn_index] = conn_new(p, pe, fd, h->conn_index, 0);
    }
    pccl__mutex_unlock(&p->mtx);
    pccl__event_signal(&p->wake);
}

/* ---------------------------------------------------------- public API */

pccl_result
pccl_comm_set_peer_id(pccl_comm *comm, uint64_t run_token, uint32_t peer_id)
{
    pccl__p2p *p;

    if (comm == NULL || comm->p2p == NULL || peer_id == UINT32_MAX) {
        return PCCL_EINVAL;
    }
    p = comm->p2p;
    pccl__mutex_lock(&p->mtx);
    if (p->has_identity && (p->token != run_token || p->self != peer_id)) {
        /* a new identity (rejoined the run): the old pairs are over */
        p2p_peer *pe;
        for (pe = p->peers; pe != NULL; pe = pe->next) {
            reset_peer(p, pe, NULL, PCCL_EPEERLOST);
            pe->lost = 0;
        }
    }
    p->token = run_token;
    p->self = peer_id;
    p->has_identity = 1;
    pccl__mutex_unlock(&p->mtx);
    return PCCL_OK;
}

pccl_result
pccl_comm_peer_lost(pccl_comm *comm, uint32_t peer_id)
{
    pccl__p2p *p;
    p2p_peer *pe;

    if (comm == NULL || comm->p2p == NULL) {
        return PCCL_EINVAL;
    }
    p = comm->p2p;
    pccl__mutex_lock(&p->mtx);
    if ((pe = find_peer(p, peer_id, 1)) != NULL) {
        pe->lost = 1;
        reset_peer(p, pe, NULL, PCCL_EPEERLOST);
    }
    pccl__mutex_unlock(&p->mtx);
    pccl__event_signal(&p->wake);
    return pe == NULL ? PCCL_ENOMEM : PCCL_OK;
}

static pccl_result
start(pccl_comm *comm, int is_send, uint32_t peer, const char *addr, void *buf, size_t len,
      uint64_t tag, int32_t timeout_ms, pccl_p2p_handle **out)
{
    pccl__p2p *p;
    pccl_p2p_handle *h;
    p2p_peer *pe;
    p2p_tagseq *s;
    size_t slice, nslices;
    pccl_result rv = PCCL_OK;

    if (comm == NULL || comm->p2p == NULL || out == NULL || (buf == NULL && len > 0) ||
        (is_send && (addr == NULL || strlen(addr) >= PCCL_ADDRSTRLEN))) {
        return PCCL_EINVAL;
    }
    p = comm->p2p;
    slice = comm->slice_bytes;
    nslices = len == 0 ? 1 : (len + slice - 1) / slice;
    if (nslices > UINT32_MAX) {
        return PCCL_EINVAL;
    }
    if ((h = calloc(1, sizeof(*h))) == NULL) {
        return PCCL_ENOMEM;
    }
    h->p = p;
    h->is_send = is_send;
    h->peer = peer;
    h->tag = tag;
    h->buf = buf;
    h->len = len;
    h->nslices = (uint32_t)nslices;
    h->deadline = pccl__deadline_ms(timeout_ms);
    if (is_send) {
        h->frames = calloc(nslices, sizeof(*h->frames));
    } else {
        h->next_slice = calloc(comm->nconns, sizeof(*h->next_slice));
    }
    if ((is_send && h->frames == NULL) || (!is_send && h->next_slice == NULL)) {
        free(h->frames);
        free(h);
        return PCCL_ENOMEM;
    }
    if (!is_send) {
        uint32_t k;
        for (k = 0; k < comm->nconns; k++) {
            h->next_slice[k] = k;
        }
    }
    pccl__mutex_lock(&p->mtx);
    if (p->closing) {
        rv = PCCL_ECLOSED;
    } else if (!p->has_identity) {
        rv = PCCL_ESTATE;
    } else if (peer == p->self || peer == UINT32_MAX) {
        rv = PCCL_EINVAL;
    } else if ((pe = find_peer(p, peer, 1)) == NULL || (s = find_seq(pe, tag, 1)) == NULL) {
        rv = PCCL_ENOMEM;
    } else if (pe->lost) {
        rv = PCCL_EPEERLOST;
    } else {
        if (is_send) {
            if (pe->nout == 0 && !pe->dialing) {
                memcpy(pe->addr, addr, strlen(addr) + 1);
            }
            h->seq = s->send_next++;
        } else {
            h->seq = s->recv_next++;
        }
        h->prev = p->ops_tail;
        if (p->ops_tail != NULL) {
            p->ops_tail->next = h;
        } else {
            p->ops = h;
        }
        p->ops_tail = h;
    }
    pccl__mutex_unlock(&p->mtx);
    if (rv != 0) {
        free(h->frames);
        free(h->next_slice);
        free(h);
        return rv;
    }
    pccl__event_signal(&p->wake);
    *out = h;
    return PCCL_OK;
}

pccl_result
pccl__p2p_send_start(pccl_comm *comm, uint32_t peer_id, const char *peer_addr, const void *buf,
                     size_t len, uint64_t tag, int32_t timeout_ms, pccl_p2p_handle **out)
{
    /* the buffer is only ever read */
    return start(comm, 1, peer_id, peer_addr, (void *)(uintptr_t)buf, len, tag, timeout_ms, out);
}

pccl_result
pccl__p2p_recv_start(pccl_comm *comm, uint32_t peer_id, void *buf, size_t len, uint64_t tag,
                     int32_t timeout_ms, pccl_p2p_handle **out)
{
    return start(comm, 0, peer_id, NULL, buf, len, tag, timeout_ms, out);
}

pccl_result
pccl_p2p_wait(pccl_p2p_handle *h, int32_t timeout_ms, uint64_t *bytes)
{
    pccl__p2p *p;
    uint64_t deadline = pccl__deadline_ms(timeout_ms);
    pccl_result rv;

    if (h == NULL) {
        return PCCL_EINVAL;
    }
    p = h->p;
    pccl__mutex_lock(&p->mtx);
    while (!h->done) {
        if (pccl__cond_wait_until(&p->cv, &p->mtx, deadline) == PCCL_ETIMEDOUT && !h->done) {
            pccl__mutex_unlock(&p->mtx);
            return PCCL_ETIMEDOUT;
        }
    }
    rv = h->result;
    pccl__mutex_unlock(&p->mtx);
    if (rv == 0 && bytes != NULL) {
        *bytes = h->len;
    }
    return rv;
}

pccl_comm *
pccl__p2p_release(pccl_p2p_handle *h)
{
    pccl__p2p *p = h->p;
    pccl_comm *comm = p->comm;
    p2p_peer *pe;

    pccl__mutex_lock(&p->mtx);
    if (!h->done) {
        /* still running: its frames may be queued; reset the pair */
        if ((pe = find_peer(p, h->peer, 0)) != NULL && h->started) {
            reset_peer(p, pe, h, PCCL_EABORTED);
        } else {
            finish(p, h, PCCL_EABORTED);
        }
    }
    pccl__mutex_unlock(&p->mtx);
    free(h->frames);
    free(h->next_slice);
    free(h);
    return comm;
}
