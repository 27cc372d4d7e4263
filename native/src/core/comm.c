/*
 * comm.c - the public pccl_comm_* and pccl_op_* functions: communicator
 * lifecycle, ring setup, the accept-side decisions, and starting and
 * waiting for operations.  Bytes move in engine.c.
 *
 * Ring setup (pccl_comm_set_ring), in order:
 *   1. drop the previous ring: ask the engine to break it with
 *      PCCL_ERINGBROKEN and wait until it has;
 *   2. answer hellos parked for this epoch (they arrived early);
 *   3. open K connections to the next rank in parallel (one thread each),
 *      each authenticated with the client side of the handshake
 *      (connection k bound to bind_addrs[k % n]); refused connections are
 *      retried until the deadline, since the neighbour may not be
 *      listening yet;
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
#include <stdlib.h>
#include <string.h>

#include "coll/kernels.h"
#include "core/comm.h"

enum {
    RETRY_MS = 20,           /* pause between connection attempts */
    PARK_PER_CONN = 4        /* parked hellos allowed: 4 * K */
};

/* ------------------------------------------------------------ seq table */

static size_t
seq_slot(uint64_t tag, size_t cap)
{
    uint64_t h = tag * 0x9e3779b97f4a7c15ull;
    return (size_t)(h >> 17) & (cap - 1);
}

uint32_t
pccl__seq_peek(const pccl__seq_table *t, uint64_t tag)
{
    size_t i;
    if (t->cap == 0) {
        return 0;
    }
    for (i = seq_slot(tag, t->cap); t->used[i]; i = (i + 1) & (t->cap - 1)) {
        if (t->tags[i] == tag) {
            return t->next[i];
        }
    }
    return 0;
}

static pccl_result
seq_grow(pccl__seq_table *t)
{
    size_t cap = t->cap ? t->cap * 2 : 16, i, j;
    uint64_t *tags = calloc(cap, sizeof(*tags));
    uint32_t *next = calloc(cap, sizeof(*next));
    uint8_t *used = calloc(cap, 1);

    if (tags == NULL || next == NULL || used == NULL) {
        free(tags);
        free(next);
        free(used);
        return PCCL_ENOMEM;
    }
    for (i = 0; i < t->cap; i++) {
        if (t->used[i]) {
            for (j = seq_slot(t->tags[i], cap); used[j]; j = (j + 1) & (cap - 1)) {
            }
            used[j] = 1;
            tags[j] = t->tags[i];
            next[j] = t->next[i];
        }
    }
    free(t->tags);
    free(t->next);
    free(t->used);
    t->tags = tags;
    t->next = next;
    t->used = used;
    t->cap = cap;
    return PCCL_OK;
}

/* seq_take returns the next seq of tag and counts it. */
static pccl_result
seq_take(pccl__seq_table *t, uint64_t tag, uint32_t *seq)
{
    size_t i;
    pccl_result rv;

    if ((t->n + 1) * 2 > t->cap && (rv = seq_grow(t)) != 0) {
        return rv;
    }
    for (i = seq_slot(tag, t->cap); t->used[i]; i = (i + 1) & (t->cap - 1)) {
        if (t->tags[i] == tag) {
            *seq = t->next[i]++;
            return PCCL_OK;
        }
    }
    t->used[i] = 1;
    t->tags[i] = tag;
    t->next[i] = 1;
    t->n++;
    *seq = 0;
    return PCCL_OK;
}

static void
seq_clear(pccl__seq_table *t)
{
    free(t->tags);
    free(t->next);
    free(t->used);
    memset(t, 0, sizeof(*t));
}

/* ------------------------------------------------------------ op state */

void
pccl__op_finish_locked(pccl_comm *comm, pccl_op_handle *op, pccl_result rv)
{
    if (op->aprev != NULL) {
        op->aprev->anext = op->anext;
    } else if (comm->active == op) {
        comm->active = op->anext;
    }
    if (op->anext != NULL) {
        op->anext->aprev = op->aprev;
    }
    op->anext = op->aprev = NULL;
    op->qnext = NULL;
    op->result = rv;
    op->state = PCCL__OP_DONE;
    __atomic_store_n(&op->finished, 1, __ATOMIC_RELEASE);
}

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

/* -------------------------------------------------------- buffer cache */

/* In-place and quantized ops need a tensor-sized buffer.  Allocating it
 * per op costs a page fault per 4 KiB (glibc maps large blocks fresh each
 * time: 256 MiB in place ran at half speed that way), so finished ops
 * leave their buffers here for the next ones: at most four, the largest
 * kept, and never more than BUF_CACHE_BYTES in all, so an idle
 * communicator holds at most about one large tensor's worth. */

#define BUF_CACHE_BYTES ((size_t)1 << 30)

static size_t
buf_cached_locked(const pccl_comm *comm)
{
    size_t i, total = 0;

    for (i = 0; i < 4; i++) {
        total += comm->cache[i].size;
    }
    return total;
}

static uint8_t *
buf_take(pccl_comm *comm, size_t size, size_t *cap)
{
    uint8_t *p = NULL;
    size_t i, best = SIZE_MAX;

    if (size == 0) {
        *cap = 0;
        return NULL;
    }
    pccl__mutex_lock(&comm->mtx);
    for (i = 0; i < 4; i++) {
        if (comm->cache[i].p != NULL && comm->cache[i].size >= size &&
            (best == SIZE_MAX || comm->cache[i].size < comm->cache[best].size)) {
            best = i;
        }
    }
    if (best != SIZE_MAX) {
        p = comm->cache[best].p;
        *cap = comm->cache[best].size;
        comm->cache[best].p = NULL;
        comm->cache[best].size = 0;
    }
    pccl__mutex_unlock(&comm->mtx);
    if (p == NULL) {
        p = malloc(size);
        *cap = size;
    }
    return p;
}

/* Buffers cache updates dropped: the caller frees them outside the lock
 * (unmapping a large block takes a while).  One update drops at most 4
 * (evictions, or fewer evictions and the buffer itself); an op returns
 * two buffers. */
typedef struct buf_drop {
    uint8_t *p[8];
    size_t n;
} buf_drop;

/* mtx held.  Keep p if it is among the largest that fit: smaller cached
 * buffers are evicted to make room; p itself is dropped if every cached
 * buffer is at least as large and there is no room. */
static void
buf_give_locked(pccl_comm *comm, uint8_t *p, size_t cap, buf_drop *drop)
{
    size_t i, free_slot, small;

    if (p == NULL) {
        return;
    }
    if (cap > BUF_CACHE_BYTES) {
        drop->p[drop->n++] = p;
        return;
    }
    for (;;) {
        free_slot = 4;
        small = 4;
        for (i = 0; i < 4; i++) {
            if (comm->cache[i].p == NULL) {
                free_slot = i;
            } else if (small == 4 || comm->cache[i].size < comm->cache[small].size) {
                small = i;
            }
        }
        if (free_slot < 4 && buf_cached_locked(comm) + cap <= BUF_CACHE_BYTES) {
            comm->cache[free_slot].p = p;
            comm->cache[free_slot].size = cap;
            return;
        }
        if (small == 4 || comm->cache[small].size >= cap) {
            drop->p[drop->n++] = p;
            return;
        }
        drop->p[drop->n++] = comm->cache[small].p;
        comm->cache[small].p = NULL;
        comm->cache[small].size = 0;
    }
}

static void
buf_drop_free(buf_drop *drop)
{
    size_t i;
    for (i = 0; i < drop->n; i++) {
        free(drop->p[i]);
    }
    drop->n = 0;
}

/* ----------------------------------------------------------- lifecycle */

pccl_result
pccl_comm_config_init(pccl_comm_config *cfg)
{
    if (cfg == NULL) {
        return PCCL_EINVAL;
    }
    memset(cfg, 0, sizeof(*cfg));
    cfg->listen_addr = NULL;
    cfg->p2p_connections = PCCL_DEFAULT_CONNECTIONS;
    cfg->slice_bytes = PCCL_DEFAULT_SLICE_BYTES;
    cfg->progress_timeout_ms = PCCL_DEFAULT_PROGRESS_TIMEOUT_MS;
    cfg->handshake_timeout_ms = PCCL_DEFAULT_HANDSHAKE_TIMEOUT_MS;
    cfg->secret = NULL;
    cfg->secret_len = 0;
    return PCCL_OK;
}

pccl_result
pccl_comm_create(const pccl_comm_config *cfg, pccl_comm **out)
{
    static const pccl__listener_ops lops = {on_hello, on_tick};
    pccl__sockaddr addr;
    pccl_comm *comm;
    pccl_result rv;
    uint32_t k;

    if (cfg == NULL || out == NULL || cfg->p2p_connections < 1 ||
        cfg->p2p_connections > PCCL_MAX_CONNECTIONS || cfg->slice_bytes < PCCL_MIN_SLICE_BYTES ||
        cfg->slice_bytes > PCCL_MAX_SLICE_BYTES || cfg->handshake_timeout_ms <= 0 ||
        cfg->progress_timeout_ms == 0 || cfg->secret_len > PCCL_MAX_SECRET_BYTES ||
        (cfg->secret == NULL && cfg->secret_len > 0)) {
        return PCCL_EINVAL;
    }
    if ((rv = pccl__addr_parse(cfg->listen_addr ? cfg->listen_addr : "0.0.0.0:0", 1, &addr)) !=
        0) {
        return rv;
    }
    if ((comm = calloc(1, sizeof(*comm))) == NULL) {
        return PCCL_ENOMEM;
    }
    comm->nconns = cfg->p2p_connections;
    comm->slice_bytes = cfg->slice_bytes;
    comm->progress_timeout_ms = cfg->progress_timeout_ms;
    comm->handshake_timeout_ms = cfg->handshake_timeout_ms;
    comm->engine_wake.fd = -1;
    comm->setup_wake.fd = -1;
    comm->xfer_stop.fd = -1;
    for (k = 0; k < PCCL_MAX_CONNECTIONS; k++) {
        comm->in_fd[k] = -1;
    }
    if (cfg->secret_len > 0) {
        if ((comm->secret = malloc(cfg->secret_len)) == NULL) {
            free(comm);
            return PCCL_ENOMEM;
        }
        memcpy(comm->secret, cfg->secret, cfg->secret_len);
        comm->secret_len = cfg->secret_len;
    }
    if ((rv = pccl__mutex_init(&comm->mtx)) != 0) {
        goto fail_secret;
    }
    if ((rv = pccl__cond_init(&comm->cv)) != 0) {
        goto fail_mtx;
    }
    if ((rv = pccl__mutex_init(&comm->plock)) != 0) {
        pccl__cond_fini(&comm->cv);
        goto fail_mtx;
    }
    if ((rv = pccl__event_init(&comm->engine_wake)) != 0) {
        goto fail_cv;
    }
    if ((rv = pccl__event_init(&comm->setup_wake)) != 0) {
        goto fail_ev;
    }
    if ((rv = pccl__xfer_init(comm)) != 0) {
        pccl__event_fini(&comm->setup_wake);
        goto fail_ev;
    }
    if ((rv = pccl__listener_open(&comm->listener, &addr, comm->secret, comm->secret_len,
                                  comm->handshake_timeout_ms, &lops, comm)) != 0) {
        goto fail_ev2;
    }
    if ((rv = pccl__engine_start(comm)) != 0) {
        goto fail_listener;
    }
    if ((rv = pccl__listener_start(&comm->listener)) != 0) {
        pccl__mutex_lock(&comm->mtx);
        comm->closing = 1;
        pccl__mutex_unlock(&comm->mtx);
        pccl__engine_wake(comm);
        pccl__engine_join(comm);
        goto fail_listener;
    }
    *out = comm;
    return PCCL_OK;

fail_listener:
    pccl__listener_close(&comm->listener);
fail_ev2:
    pccl__xfer_fini(comm);
    pccl__event_fini(&comm->setup_wake);
fail_ev:
    pccl__event_fini(&comm->engine_wake);
fail_cv:
    pccl__mutex_fini(&comm->plock);
    pccl__cond_fini(&comm->cv);
fail_mtx:
    pccl__mutex_fini(&comm->mtx);
fail_secret:
    free(comm->secret);
    free(comm);
    return rv;
}

pccl_result
pccl_comm_listen_address(pccl_comm *comm, char *buf, size_t len)
{
    char tmp[PCCL_ADDRSTRLEN];
    pccl_result rv;

    if (comm == NULL || buf == NULL) {
        return PCCL_EINVAL;
    }
    if ((rv = pccl__addr_format(&comm->listener.addr, tmp, sizeof(tmp))) != 0) {
        return rv;
    }
    if (strlen(tmp) + 1 > len) {
        return PCCL_EINVAL;
    }
    memcpy(buf, tmp, strlen(tmp) + 1);
    return PCCL_OK;
}

pccl_result
pccl_comm_abort(pccl_comm *comm)
{
    if (comm == NULL) {
        return PCCL_EINVAL;
    }
    pccl__mutex_lock(&comm->mtx);
    if (!comm->closing) {
        comm->req_break = PCCL_EABORTED;
        if (comm->setup_active) {
            comm->setup_abort = 1;
            pccl__event_signal(&comm->setup_wake);
        }
        pccl__engine_wake(comm);
        pccl__cond_broadcast(&comm->cv);
    }
    pccl__mutex_unlock(&comm->mtx);
    return PCCL_OK;
}

pccl_result
pccl_comm_close(pccl_comm *comm)
{
    pccl__parked_hello *p;

    if (comm == NULL) {
        return PCCL_EINVAL;
    }
    pccl__mutex_lock(&comm->mtx);
    if (comm->closing) {
        while (!comm->closed) {
            pccl__cond_wait(&comm->cv, &comm->mtx);
        }
        pccl__mutex_unlock(&comm->mtx);
        return PCCL_OK;
    }
    comm->closing = 1;
    pccl__event_signal(&comm->setup_wake);
    pccl__engine_wake(comm);
    pccl__cond_broadcast(&comm->cv);
    pccl__mutex_unlock(&comm->mtx);

    pccl__listener_stop(&comm->listener);
    pccl__xfer_close(comm);
    pccl__engine_join(comm);

    pccl__mutex_lock(&comm->mtx);
    while ((p = comm->parked) != NULL) {
        comm->parked = p->next;
        pccl__sock_close(p->fd);
        free(p);
    }
    comm->nparked = 0;
    comm->closed = 1;
    pccl__cond_broadcast(&comm->cv);
    pccl__mutex_unlock(&comm->mtx);
    return PCCL_OK;
}

static void
comm_destroy(pccl_comm *comm)
{
    size_t i;

    pccl__listener_close(&comm->listener);
    pccl__xfer_fini(comm);
    pccl__event_fini(&comm->engine_wake);
    pccl__event_fini(&comm->setup_wake);
    seq_clear(&comm->seqs);
    for (i = 0; i < 4; i++) {
        free(comm->cache[i].p);
    }
    pccl__mutex_fini(&comm->plock);
    pccl__cond_fini(&comm->cv);
    pccl__mutex_fini(&comm->mtx);
    free(comm->secret);
    free(comm);
}

pccl_result
pccl_comm_free(pccl_comm *comm)
{
    int later;

    if (comm == NULL) {
        return PCCL_EINVAL;
    }
    pccl_comm_close(comm);
    pccl__mutex_lock(&comm->mtx);
    comm->freed = 1;
    later = comm->nhandles > 0; /* the last pccl_op_free destroys it */
    pccl__mutex_unlock(&comm->mtx);
    if (!later) {
        comm_destroy(comm);
    }
    return PCCL_OK;
}

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

/* Open and authenticate outbound connection k, retrying transient
 * refusals until the deadline. */
static pccl_result
connect_one(pccl_comm *comm, const pccl__sockaddr *next, const pccl__sockaddr *bind_to,
            const pccl__hs_client_hello *hello, uint64_t deadline, int *fd_out)
{
    int refused = 0;
    int fd = -1;
    pccl_result rv;

    for (;;) {
        rv = pccl__sock_connect(next, bind_to, deadline, comm->setup_wake.fd, &fd);
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
    j->rv = connect_one(j->comm, j->next, j->bind_to, &j->hello, j->deadline, &j->fd);
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
    for (k = 0; k < PCCL_MAX_CONNECTIONS; k++) {
        out_fds[k] = -1;
    }
    deadline = pccl__deadline_ms(ring->timeout_ms);
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
        inst->gen = ++comm->ring_gen;
        comm->req_install = inst;
        comm->engine_ring_live = 1;
        comm->geom = g;
        seq_clear(&comm->seqs);
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

/* ------------------------------------------------------------ all-reduce */

/* Start an op; wake: signal the engine thread (not when the caller is
 * about to wait and may drive the op itself). */
static pccl_result
start_op(pccl_comm *comm, const void *src, void *dst, size_t count, pccl_dtype dtype,
         pccl_op op, pccl_quant quant, uint64_t tag, int wake, pccl_op_handle **out)
{
    pccl_op_handle *h, *a;
    pccl__ring_geom g;
    uint64_t gen;
    size_t esize;
    uint32_t seq;
    pccl_result rv;

    if (comm == NULL || out == NULL || (unsigned)dtype >= PCCL_DTYPE_COUNT ||
        (unsigned)op >= PCCL_OP_COUNT || (unsigned)quant >= PCCL_QUANT_COUNT) {
        return PCCL_EINVAL;
    }
    (void)pccl_dtype_size(dtype, &esize);
    if (quant != PCCL_QUANT_NONE && !pccl__dtype_is_float(dtype)) {
        return PCCL_EINVAL;
    }
    if (count > SIZE_MAX / esize || (count > 0 && (src == NULL || dst == NULL))) {
        return PCCL_EINVAL;
    }
    if (count > 0 && dst != src) {
        /* Partial overlap would let the ring read its own output. */
        uintptr_t s = (uintptr_t)src, d = (uintptr_t)dst, n = count * esize;
        if (s < d + n && d < s + n) {
            return PCCL_EINVAL;
        }
    }

    pccl__mutex_lock(&comm->mtx);
    rv = comm->closing ? PCCL_ECLOSED
         : comm->ring_state == PCCL__RING_READY ? PCCL_OK
         : comm->ring_state == PCCL__RING_BROKEN ? PCCL_ERINGBROKEN
                                                  : PCCL_ESTATE;
    g = comm->geom;
    gen = comm->ring_gen;
    pccl__mutex_unlock(&comm->mtx);
    if (rv != 0) {
        return rv;
    }

    if ((h = calloc(1, sizeof(*h))) == NULL) {
        return PCCL_ENOMEM;
    }
    h->comm = comm;
    h->ring_gen = gen;
    {
        size_t wb, qb;
        pccl__ring_op_buffers(&g, count, dtype, dst == src, quant, &wb, &qb);
        h->backup_buf = buf_take(comm, wb, &h->backup_cap);
        h->q_buf = buf_take(comm, qb, &h->q_cap);
        if ((wb > 0 && h->backup_buf == NULL) || (qb > 0 && h->q_buf == NULL)) {
            rv = PCCL_ENOMEM;
        } else {
            /* seq is filled in below: only frame headers use it. */
            rv = pccl__ring_op_init(&h->ring, &g, src, dst, count, dtype, op, quant, tag, 0,
                                    h->backup_buf, h->q_buf);
        }
        if (rv != 0) {
            free(h->backup_buf);
            free(h->q_buf);
            free(h);
            return rv;
        }
    }

    pccl__mutex_lock(&comm->mtx);
    rv = comm->closing ? PCCL_ECLOSED
         : comm->ring_gen != gen ? PCCL_ERINGBROKEN
         : comm->ring_state == PCCL__RING_READY ? PCCL_OK
         : comm->ring_state == PCCL__RING_BROKEN ? PCCL_ERINGBROKEN
                                                  : PCCL_ESTATE;
    for (a = comm->active; rv == 0 && a != NULL; a = a->anext) {
        if (a->ring.tag == tag) {
            rv = PCCL_EBUSY;
        }
    }
    if (rv == 0) {
        rv = seq_take(&comm->seqs, tag, &seq);
    }
    if (rv != 0) {
        buf_drop drop = {{NULL}, 0};
        buf_give_locked(comm, h->backup_buf, h->backup_cap, &drop);
        buf_give_locked(comm, h->q_buf, h->q_cap, &drop);
        pccl__mutex_unlock(&comm->mtx);
        buf_drop_free(&drop);
        pccl__ring_op_fini(&h->ring);
        free(h);
        return rv;
    }
    h->ring.seq = seq;
    comm->nhandles++;
    if (pccl__ring_op_done(&h->ring)) {
        /* World 1 or nothing to reduce: already finished. */
        h->result = PCCL_OK;
        h->state = PCCL__OP_DONE;
        h->finished = 1;
    } else {
        h->state = PCCL__OP_QUEUED;
        h->anext = comm->active;
        if (comm->active != NULL) {
            comm->active->aprev = h;
        }
        comm->active = h;
        if (comm->subq_tail != NULL) {
            comm->subq_tail->qnext = h;
        } else {
            comm->subq_head = h;
            if (wake) {
                pccl__engine_wake(comm);
            }
        }
        comm->subq_tail = h;
    }
    pccl__mutex_unlock(&comm->mtx);
    *out = h;
    return PCCL_OK;
}

pccl_result
pccl_comm_all_reduce_start(pccl_comm *comm, const void *src, void *dst, size_t count,
                           pccl_dtype dtype, pccl_op op, pccl_quant quant, uint64_t tag,
                           pccl_op_handle **out)
{
    return start_op(comm, src, dst, count, dtype, op, quant, tag, 1, out);
}

/* A finished op failed: put an in-place input back (once). */
static void
restore_input(pccl_op_handle *h)
{
    if (h->result != 0 && !h->restored) {
        pccl__ring_op_restore(&h->ring);
        h->restored = 1;
    }
}

pccl_result
pccl_op_wait(pccl_op_handle *h, int32_t timeout_ms, pccl_reduce_info *info)
{
    pccl_comm *comm;
    uint64_t deadline;
    pccl_result rv;

    if (h == NULL) {
        return PCCL_EINVAL;
    }
    comm = h->comm;
    if (!__atomic_load_n(&h->finished, __ATOMIC_ACQUIRE)) {
        deadline = pccl__deadline_ms(timeout_ms);
        if (!pccl__engine_drive(comm, h, deadline)) {
            /* The engine thread runs the op: rather than sleep at once,
             * save the input ahead of it. */
            pccl__ring_op_save(&h->ring);
        }
        pccl__mutex_lock(&comm->mtx);
        while (h->state != PCCL__OP_DONE) {
            if (pccl__cond_wait_until(&comm->cv, &comm->mtx, deadline) == PCCL_ETIMEDOUT &&
                h->state != PCCL__OP_DONE) {
                pccl__mutex_unlock(&comm->mtx);
                return PCCL_ETIMEDOUT;
            }
        }
        pccl__mutex_unlock(&comm->mtx);
    }
    rv = h->result;
    if (rv != 0) {
        restore_input(h);
        return rv;
    }
    if (info != NULL) {
        info->world = h->ring.g.world;
        info->tx_bytes = h->ring.tx_bytes;
        info->rx_bytes = h->ring.rx_bytes;
    }
    return PCCL_OK;
}

/* Break the ring under op h unless it already ended. */
static void
break_for(pccl_op_handle *h, pccl_result code)
{
    pccl_comm *comm = h->comm;

    pccl__mutex_lock(&comm->mtx);
    if (h->state != PCCL__OP_DONE && !comm->closing) {
        comm->req_break = code;
        pccl__engine_wake(comm);
    }
    while (h->state != PCCL__OP_DONE) {
        pccl__cond_wait(&comm->cv, &comm->mtx);
    }
    pccl__mutex_unlock(&comm->mtx);
}

pccl_result
pccl_op_free(pccl_op_handle *h)
{
    pccl_comm *comm;
    buf_drop drop = {{NULL}, 0};
    int destroy;

    if (h == NULL) {
        return PCCL_EINVAL;
    }
    comm = h->comm;
    if (!__atomic_load_n(&h->finished, __ATOMIC_ACQUIRE)) {
        break_for(h, PCCL_EABORTED);
    }
    restore_input(h);
    pccl__ring_op_fini(&h->ring);
    pccl__mutex_lock(&comm->mtx);
    buf_give_locked(comm, h->backup_buf, h->backup_cap, &drop);
    buf_give_locked(comm, h->q_buf, h->q_cap, &drop);
    comm->nhandles--;
    destroy = comm->freed && comm->nhandles == 0;
    pccl__mutex_unlock(&comm->mtx);
    buf_drop_free(&drop);
    free(h);
    if (destroy) {
        comm_destroy(comm);
    }
    return PCCL_OK;
}

pccl_result
pccl_comm_all_reduce(pccl_comm *comm, const void *src, void *dst, size_t count,
                     pccl_dtype dtype, pccl_op op, pccl_quant quant, uint64_t tag,
                     int32_t timeout_ms, pccl_reduce_info *info)
{
    pccl_op_handle *h;
    pccl_result rv;

    /* No wake-up: pccl_op_wait drives the op on this thread if it can. */
    if ((rv = start_op(comm, src, dst, count, dtype, op, quant, tag, 0, &h)) != 0) {
        return rv;
    }
    rv = pccl_op_wait(h, timeout_ms, info);
    if (rv == PCCL_ETIMEDOUT && !__atomic_load_n(&h->finished, __ATOMIC_ACQUIRE)) {
        /* Frames may be half-sent: the ring cannot be reused. */
        break_for(h, PCCL_ETIMEDOUT);
        rv = pccl_op_wait(h, 0, info);
    }
    pccl_op_free(h);
    return rv;
}
