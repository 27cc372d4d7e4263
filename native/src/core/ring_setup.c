/*
 * ring_setup.c - pccl_comm_set_ring and the accept-side decisions.
 *
 * Ring setup (pccl_comm_set_ring), in order:
 *   1. drop the previous ring: ask the engine to break it with
 *      PCCL_ERINGBROKEN and wait until it has;
 *   2. answer hellos parked for this epoch (they arrived early);
 *   3. open K connections to the next rank in parallel (one thread each),
 *      each authenticated with the client side of the handshake
 *      (connection k bound to bind_addrs[k % n], and to the first free
 *      source port of [out_port_lo[k], out_port_hi[k]] when pinned);
 *      refused connections are retried until the deadline, since the
 *      neighbour may not be listening yet;
 *   4. wait until the accept thread has accepted K connections from the
 *      previous rank of this epoch;
 *   5. hand all 2K sockets to the engine.
 * Each blocking step ends at the ring deadline, on abort, or on close.
 *
 * The accept thread (net/listener.c) authenticates each client and asks
 * on_hello what to do: accept a ring connection of the epoch being set up
 * into its slot, park one of a future epoch (bounded, expires after the
 * handshake timeout), or refuse anything else with a status.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coll/stripe.h"
#include "core/comm.h"
#include "core/engine.h"
#include "core/p2p.h"

enum {
    RETRY_MS = 20,           /* pause between connection attempts */
    PARK_PER_CONN = 4        /* parked hellos allowed: 4 * K */
};

/* ------------------------------------------------------ accept decisions */

static uint64_t
hs_deadline(pccl_comm *comm)
{
    return pccl__deadline_ms(comm->handshake_timeout_ms);
}

/* Is a hello of this epoch for a ring not yet being set up?  mtx held. */
static int
is_future_epoch(pccl_comm *comm, uint64_t epoch)
{
    if (comm->setup_active) {
        return epoch > comm->setup_epoch;
    }
    return !comm->has_ring_epoch || epoch > comm->last_epoch;
}

/* Check a ring hello of the epoch being set up; reserves its slot when it
 * fits.  Returns the status to answer with.  mtx held. */
static uint16_t
check_hello_locked(pccl_comm *comm, const pccl__hs_client_hello *h)
{
    uint32_t w = comm->setup_world;

    if (w < 2 || h->world != w || h->to_rank != comm->setup_rank ||
        h->from_rank != (comm->setup_rank + w - 1) % w || h->nconns != comm->nconns ||
        h->slice_bytes != comm->slice_bytes || h->conn_index >= comm->nconns) {
        return PCCL_EPROTO;
    }
    if (comm->in_slot[h->conn_index] != PCCL__SLOT_EMPTY) {
        return PCCL_EBUSY;
    }
    comm->in_slot[h->conn_index] = PCCL__SLOT_RESERVED;
    return 0;
}

/* Send the verdict; on acceptance put fd into its reserved slot (if that
 * setup is still running).  Takes fd.  Called without mtx. */
static void
answer(pccl_comm *comm, int fd, const pccl__hs_server *st, uint16_t status, uint64_t setup_id)
{
    pccl_result rv = pccl__link_server_ack(fd, st, status, comm->secret, comm->secret_len,
                                           hs_deadline(comm), -1);
    uint32_t idx = st->hello.conn_index;

    if (status != 0) {
        pccl__sock_close(fd);
        return;
    }
    pccl__mutex_lock(&comm->mtx);
    if (comm->setup_active && comm->setup_id == setup_id &&
        comm->in_slot[idx] == PCCL__SLOT_RESERVED) {
        if (rv == 0) {
            comm->in_fd[idx] = fd;
            comm->in_slot[idx] = PCCL__SLOT_FILLED;
            comm->in_have++;
            fd = -1;
            pccl__cond_broadcast(&comm->cv);
        } else {
            comm->in_slot[idx] = PCCL__SLOT_EMPTY;
        }
    }
    pccl__mutex_unlock(&comm->mtx);
    pccl__sock_close(fd);
}

static void
on_hello(void *arg, int fd, const pccl__hs_server *st)
{
    pccl_comm *comm = arg;
    const pccl__hs_client_hello *h = &st->hello;
    uint16_t status;
    uint64_t id;

    if (h->purpose == PCCL__PURPOSE_XFER) {
        pccl__xfer_on_hello(comm, fd, st); /* shared-state transfer: xfer.c */
        return;
    }
    if (h->purpose == PCCL__PURPOSE_P2P) {
        pccl__p2p_on_hello(comm, fd, st); /* point-to-point: p2p.c */
        return;
    }
    if (h->purpose != PCCL__PURPOSE_RING) {
        answer(comm, fd, st, PCCL_ENOTSUP, 0); /* PROBE: reserved */
        return;
    }
    pccl__mutex_lock(&comm->mtx);
    id = comm->setup_id;
    if (comm->closing) {
        status = PCCL_ECLOSED;
    } else if (comm->setup_active && h->epoch == comm->setup_epoch) {
        status = check_hello_locked(comm, h);
    } else if (is_future_epoch(comm, h->epoch)) {
        pccl__parked_hello *p;
        if (comm->nparked < PARK_PER_CONN * comm->nconns &&
            (p = calloc(1, sizeof(*p))) != NULL) {
            p->fd = fd;
            p->st = *st;
            p->expiry = hs_deadline(comm);
            p->next = comm->parked;
            comm->parked = p;
            comm->nparked++;
            pccl__mutex_unlock(&comm->mtx);
            pccl__listener_kick(&comm->listener); /* a new expiry to watch */
            return;
        }
        status = PCCL_EBUSY;
    } else {
        status = PCCL_ESTATE; /* an epoch that is over */
    }
    pccl__mutex_unlock(&comm->mtx);
    answer(comm, fd, st, status, id);
}

/* Refuse parked hellos that waited longer than the handshake timeout. */
static uint64_t
on_tick(void *arg)
{
    pccl_comm *comm = arg;
    pccl__parked_hello **pp, *p, *expired = NULL;
    uint64_t now = pccl__clock_ns(), next = PCCL__NO_DEADLINE;

    pccl__mutex_lock(&comm->mtx);
    for (pp = &comm->parked; (p = *pp) != NULL;) {
        if (p->expiry <= now) {
            *pp = p->next;
            comm->nparked--;
            p->next = expired;
            expired = p;
        } else {
            if (p->expiry < next) {
                next = p->expiry;
            }
            pp = &p->next;
        }
    }
    pccl__mutex_unlock(&comm->mtx);
    while (expired != NULL) {
        p = expired;
        expired = p->next;
        answer(comm, p->fd, &p->st, PCCL_ETIMEDOUT, 0);
        free(p);
    }
    return next;
}

const pccl__listener_ops pccl__ring_setup_listener_ops = {on_hello, on_tick};

/* ------------------------------------------------------------ set_ring */

/* Why a setup step was woken: close wins over abort.  mtx not held. */
static pccl_result
setup_interrupted(pccl_comm *comm)
{
    pccl_result rv = PCCL_EABORTED;
    pccl__mutex_lock(&comm->mtx);
    if (comm->closing) {
        rv = PCCL_ECLOSED;
    }
    pccl__mutex_unlock(&comm->mtx);
    return rv;
}

/* ------------------------------------------------------------ path pins */

/* addr with its port replaced by port, through the text form (the core
 * does not look into socket addresses).  base NULL: the wildcard address
 * of next's family. */
static pccl_result
with_port(const pccl__sockaddr *base, const pccl__sockaddr *next, uint16_t port,
          pccl__sockaddr *out)
{
    char txt[PCCL_ADDRSTRLEN], buf[PCCL_ADDRSTRLEN + 8];
    char *colon;
    pccl_result rv;

    if ((rv = pccl__addr_format(base != NULL ? base : next, txt, sizeof(txt))) != 0) {
        return rv;
    }
    if (base == NULL) {
        (void)snprintf(txt, sizeof(txt), "%s", txt[0] == '[' ? "[::]:0" : "0.0.0.0:0");
    }
    if ((colon = strrchr(txt, ':')) == NULL) {
        return PCCL_EADDR;
    }
    *colon = '\0';
    (void)snprintf(buf, sizeof(buf), "%s:%u", txt, (unsigned)port);
    return pccl__addr_parse(buf, 1, out);
}

/* Connect from the first free source port of [lo, hi] (lo == 0: any):
 * a port some other socket holds fails bind() or connect() with
 * PCCL_EADDR, and the next one is tried. */
static pccl_result
connect_pinned(pccl_comm *comm, const pccl__sockaddr *next, const pccl__sockaddr *bind_to,
               uint16_t lo, uint16_t hi, uint64_t deadline, int *fd)
{
    pccl__sockaddr b;
    uint32_t p;
    pccl_result rv = PCCL_EADDR;

    if (lo == 0) {
        return pccl__sock_connect(next, bind_to, deadline, comm->setup_wake.fd, fd);
    }
    for (p = lo; p <= hi; p++) {
        if ((rv = with_port(bind_to, next, (uint16_t)p, &b)) != 0) {
            return rv;
        }
        rv = pccl__sock_connect(next, &b, deadline, comm->setup_wake.fd, fd);
        if (rv != PCCL_EADDR) {
            return rv;
        }
    }
    return rv; /* every port of the range is taken */
}

/* Open and authenticate outbound connection k, retrying transient
 * refusals until the deadline. */
static pccl_result
connect_one(pccl_comm *comm, const pccl__sockaddr *next, const pccl__sockaddr *bind_to,
            uint16_t port_lo, uint16_t port_hi, const pccl__hs_client_hello *hello,
            uint64_t deadline, int *fd_out)
{
    int refused = 0;
    int fd = -1;
    pccl_result rv;

    for (;;) {
        rv = connect_pinned(comm, next, bind_to, port_lo, port_hi, deadline, &fd);
        if (rv == 0) {
            rv = pccl__link_client_handshake(fd, hello, comm->secret, comm->secret_len,
                                             deadline, comm->setup_wake.fd);
            if (rv == 0) {
                *fd_out = fd;
                return PCCL_OK;
            }
            pccl__sock_close(fd);
        }
        if (rv == PCCL_EABORTED) {
            return setup_interrupted(comm);
        }
        refused = (rv == PCCL_ECONNREFUSED);
        /* Retry what can be transient: nobody listening yet, the peer's
         * parked hello expired (ETIMEDOUT status), a full park list, a
         * connection reset mid-handshake. */
        if (rv != PCCL_ECONNREFUSED && rv != PCCL_ETIMEDOUT && rv != PCCL_EBUSY &&
            rv != PCCL_EPEERLOST) {
            return rv;
        }
        if (deadline != PCCL__NO_DEADLINE && pccl__clock_ns() >= deadline) {
            return refused ? PCCL_ECONNREFUSED : PCCL_ETIMEDOUT;
        }
        {
            uint64_t pause = pccl__deadline_ms(RETRY_MS);
            if (pause > deadline) {
                pause = deadline;
            }
            if (pccl__sock_wait(comm->setup_wake.fd, 0, pause, -1) == PCCL_OK) {
                return setup_interrupted(comm);
            }
        }
    }
}

/* One outbound connection, run on its own thread so the K connections
 * to a distant neighbour cost one round trip set, not K. */
typedef struct connect_job {
    pccl_comm *comm;
    const pccl__sockaddr *next;
    const pccl__sockaddr *bind_to;
    uint16_t port_lo, port_hi;   /* source-port pin; 0: none */
    pccl__hs_client_hello hello;
    uint64_t deadline;
    int fd;
    pccl_result rv;
    pccl__thread thread;
} connect_job;

static void
connect_main(void *arg)
{
    connect_job *j = arg;
    j->rv = connect_one(j->comm, j->next, j->bind_to, j->port_lo, j->port_hi, &j->hello,
                        j->deadline, &j->fd);
}

/* Open all K connections in parallel; out_fds[k] on success.  The result
 * is the most telling failure: close, then abort, then the first one. */
static pccl_result
connect_all(pccl_comm *comm, const pccl_ring_config *ring, const pccl__sockaddr *next,
            const pccl__sockaddr *binds, uint32_t nb, uint64_t deadline, int *out_fds)
{
    uint32_t K = comm->nconns, k;
    connect_job *jobs = calloc(K, sizeof(*jobs));
    pccl_result rv = PCCL_OK;

    if (jobs == NULL) {
        return PCCL_ENOMEM;
    }
    for (k = 0; k < K; k++) {
        connect_job *j = &jobs[k];
        j->comm = comm;
        j->next = next;
        j->bind_to = nb > 0 ? &binds[k % nb] : NULL;
        if (ring->out_port_lo != NULL) {
            j->port_lo = ring->out_port_lo[k];
            j->port_hi = ring->out_port_hi != NULL ? ring->out_port_hi[k] : ring->out_port_lo[k];
        }
        j->hello.purpose = PCCL__PURPOSE_RING;
        j->hello.epoch = ring->epoch;
        j->hello.from_rank = ring->rank;
        j->hello.to_rank = (ring->rank + 1) % ring->world;
        j->hello.world = ring->world;
        j->hello.conn_index = k;
        j->hello.nconns = K;
        j->hello.slice_bytes = comm->slice_bytes;
        j->deadline = deadline;
        j->fd = -1;
        if (k > 0 && pccl__thread_start(&j->thread, connect_main, j) == 0) {
            continue;
        }
        if (k > 0) {
            connect_main(j); /* no thread: do it here */
        }
    }
    connect_main(&jobs[0]);
    for (k = 0; k < K; k++) {
        pccl__thread_join(&jobs[k].thread);
    }
    for (k = 0; k < K; k++) {
        pccl_result r = jobs[k].rv;
        if (r == PCCL_ECLOSED) {
            rv = r;
        } else if (r == PCCL_EABORTED && rv != PCCL_ECLOSED) {
            rv = r;
        } else if (r != 0 && rv == 0) {
            rv = r;
        }
    }
    for (k = 0; k < K; k++) {
        if (rv == 0) {
            out_fds[k] = jobs[k].fd;
        } else {
            pccl__sock_close(jobs[k].fd);
        }
    }
    free(jobs);
    return rv;
}

static pccl_result
build_install(pccl_comm *comm, const pccl__ring_geom *g, const int *out_fds,
              pccl__ring_install **out)
{
    pccl__ring_install *r = calloc(1, sizeof(*r));
    uint32_t k, K = g->world > 1 ? comm->nconns : 0;

    if (r == NULL) {
        return PCCL_ENOMEM;
    }
    r->geom = *g;
    r->nlinks = K;
    if (K > 0) {
        r->out = calloc(K, sizeof(*r->out));
        r->in = calloc(K, sizeof(*r->in));
        r->dirty = calloc(K, sizeof(*r->dirty));
        r->scratch = malloc((size_t)K * comm->slice_bytes);
        if (r->out == NULL || r->in == NULL || r->dirty == NULL || r->scratch == NULL) {
            free(r->out);
            free(r->in);
            free(r->dirty);
            free(r->scratch);
            free(r);
            return PCCL_ENOMEM;
        }
        for (k = 0; k < K; k++) {
            pccl__conn_init(&r->out[k], out_fds[k], k, 1);
            pccl__conn_init(&r->in[k], comm->in_fd[k], k, 0);
            r->in[k].scratch = r->scratch + (size_t)k * comm->slice_bytes;
            r->in[k].scratch_len = comm->slice_bytes;
        }
    }
    *out = r;
    return PCCL_OK;
}

pccl_result
pccl_comm_set_ring(pccl_comm *comm, const pccl_ring_config *ring)
{
    pccl__sockaddr next, binds[PCCL_MAX_CONNECTIONS];
    int out_fds[PCCL_MAX_CONNECTIONS];
    pccl__parked_hello *mine = NULL, **pp, *p;
    pccl__ring_install *inst = NULL;
    pccl__ring_geom g;
    uint64_t deadline, id;
    uint32_t k, K, nb = 0;
    pccl_result rv = PCCL_OK;

    if (comm == NULL || ring == NULL || ring->world < 1 || ring->rank >= ring->world ||
        (ring->n_bind_addrs > 0 && ring->bind_addrs == NULL)) {
        return PCCL_EINVAL;
    }
    K = comm->nconns;
    memset(&next, 0, sizeof(next));
    if (ring->world > 1) {
        if (ring->next_addr == NULL) {
            return PCCL_EINVAL;
        }
        if ((rv = pccl__addr_parse(ring->next_addr, 1, &next)) != 0) {
            return rv;
        }
        /* Only the first K bind addresses can ever be used. */
        nb = ring->n_bind_addrs < K ? ring->n_bind_addrs : K;
        for (k = 0; k < nb; k++) {
            if (ring->bind_addrs[k] == NULL) {
                return PCCL_EINVAL;
            }
            if ((rv = pccl__addr_parse(ring->bind_addrs[k], 0, &binds[k])) != 0) {
                return rv;
            }
        }
    }
    if (ring->out_port_lo != NULL) {
        for (k = 0; k < K; k++) {
            uint16_t lo = ring->out_port_lo[k];
            uint16_t hi = ring->out_port_hi != NULL ? ring->out_port_hi[k] : lo;
            if ((lo == 0 && hi != 0) || hi < lo) {
                return PCCL_EINVAL;
            }
        }
    }
    for (k = 0; k < PCCL_MAX_CONNECTIONS; k++) {
        out_fds[k] = -1;
    }
    deadline = pccl__deadline_ms(ring->timeout_ms);
    memset(&g, 0, sizeof(g));
    if ((rv = pccl__stripe_build(ring->out_weights, K, g.out_sched, &g.out_len)) != 0 ||
        (rv = pccl__stripe_build(ring->in_weights, K, g.in_sched, &g.in_len)) != 0) {
        return rv;
    }
    g.epoch = ring->epoch;
    g.rank = ring->rank;
    g.world = ring->world;
    g.nconns = K;
    g.slice_bytes = comm->slice_bytes;

    /* 1. Claim the setup and drop the previous ring. */
    pccl__mutex_lock(&comm->mtx);
    if (comm->closing) {
        pccl__mutex_unlock(&comm->mtx);
        return PCCL_ECLOSED;
    }
    if (comm->setup_active) {
        pccl__mutex_unlock(&comm->mtx);
        return PCCL_ESTATE;
    }
    comm->setup_active = 1;
    comm->setup_abort = 0;
    id = ++comm->setup_id;
    comm->setup_epoch = ring->epoch;
    comm->setup_rank = ring->rank;
    comm->setup_world = ring->world;
    comm->in_have = 0;
    for (k = 0; k < PCCL_MAX_CONNECTIONS; k++) {
        comm->in_fd[k] = -1;
        comm->in_slot[k] = PCCL__SLOT_EMPTY;
    }
    pccl__event_drain(&comm->setup_wake);
    comm->ring_state = PCCL__RING_SETTING;
    if (comm->engine_ring_live && comm->req_break == 0) {
        comm->req_break = PCCL_ERINGBROKEN;
        pccl__engine_wake(comm);
    }
    while ((comm->engine_ring_live || comm->req_break != 0) && !comm->closing) {
        pccl__cond_wait(&comm->cv, &comm->mtx);
    }
    if (comm->closing) {
        rv = PCCL_ECLOSED;
    } else if (comm->setup_abort) {
        rv = PCCL_EABORTED;
    }

    /* 2. Hellos that arrived before us. */
    for (pp = &comm->parked; rv == 0 && (p = *pp) != NULL;) {
        if (p->st.hello.epoch <= ring->epoch) {
            *pp = p->next;
            comm->nparked--;
            p->status = p->st.hello.epoch == ring->epoch ? check_hello_locked(comm, &p->st.hello)
                                                         : PCCL_ESTATE;
            p->next = mine;
            mine = p;
        } else {
            pp = &p->next;
        }
    }
    pccl__mutex_unlock(&comm->mtx);
    while (mine != NULL) {
        p = mine;
        mine = p->next;
        answer(comm, p->fd, &p->st, p->status, id);
        free(p);
    }

    /* 3. Outbound connections. */
    if (rv == 0 && ring->world > 1) {
        rv = connect_all(comm, ring, &next, binds, nb, deadline, out_fds);
    }

    /* 4. Inbound connections, then 5. hand over. */
    pccl__mutex_lock(&comm->mtx);
    while (rv == 0 && ring->world > 1 && comm->in_have < K) {
        if (comm->closing) {
            rv = PCCL_ECLOSED;
        } else if (comm->setup_abort) {
            rv = PCCL_EABORTED;
        } else if (pccl__cond_wait_until(&comm->cv, &comm->mtx, deadline) == PCCL_ETIMEDOUT &&
                   comm->in_have < K) {
            rv = PCCL_ETIMEDOUT;
        }
    }
    if (rv == 0) {
        rv = comm->closing ? PCCL_ECLOSED : comm->setup_abort ? PCCL_EABORTED : PCCL_OK;
    }
    if (rv == 0) {
        rv = build_install(comm, &g, out_fds, &inst);
    }
    if (rv == 0) {
        comm->out_local_n = ring->world > 1 ? K : 0;
        for (k = 0; k < comm->out_local_n; k++) {
            pccl__sockaddr la;
            comm->out_local[k][0] = '\0';
            if (pccl__sock_local_addr(out_fds[k], &la) == 0) {
                (void)pccl__addr_format(&la, comm->out_local[k], sizeof(comm->out_local[k]));
            }
        }
        inst->gen = ++comm->ring_gen;
        comm->req_install = inst;
        comm->engine_ring_live = 1;
        comm->geom = g;
        pccl__seq_clear(&comm->seqs);
        comm->ring_state = PCCL__RING_READY;
        comm->has_ring_epoch = 1;
        comm->last_epoch = ring->epoch;
        pccl__engine_wake(comm);
    } else {
        for (k = 0; k < PCCL_MAX_CONNECTIONS; k++) {
            if (comm->in_slot[k] == PCCL__SLOT_FILLED) {
                pccl__sock_close(comm->in_fd[k]);
            }
            pccl__sock_close(out_fds[k]);
        }
        if (!comm->closing) {
            comm->ring_state = PCCL__RING_BROKEN;
        }
    }
    for (k = 0; k < PCCL_MAX_CONNECTIONS; k++) {
        comm->in_fd[k] = -1;
        comm->in_slot[k] = PCCL__SLOT_EMPTY;
    }
    comm->in_have = 0;
    comm->setup_active = 0;
    pccl__cond_broadcast(&comm->cv);
    pccl__mutex_unlock(&comm->mtx);
    return rv;
}


pccl_result
pccl_comm_ring_conn_address(pccl_comm *comm, uint32_t k, char *buf, size_t len)
{
    pccl_result rv = PCCL_OK;

    if (comm == NULL || buf == NULL || len == 0) {
        return PCCL_EINVAL;
    }
    pccl__mutex_lock(&comm->mtx);
    if (comm->ring_state != PCCL__RING_READY && comm->ring_state != PCCL__RING_BROKEN) {
        rv = PCCL_ESTATE;
    } else if (k >= comm->out_local_n) {
        rv = comm->out_local_n == 0 ? PCCL_ESTATE : PCCL_EINVAL;
    } else if (strlen(comm->out_local[k]) >= len) {
        rv = PCCL_EINVAL;
    } else {
        memcpy(buf, comm->out_local[k], strlen(comm->out_local[k]) + 1);
    }
    pccl__mutex_unlock(&comm->mtx);
    return rv;
}
