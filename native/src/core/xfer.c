/*
 * xfer.c - shared-state transfers: buffers published read-only by one
 * peer, byte ranges of them fetched by others.
 *
 * A distributor publishes each tensor under a 64-bit key (the Python layer
 * derives it from the tensor's content hash, so a key names one content).
 * A receiver opens one connection per range: the usual authenticated
 * handshake with purpose PCCL__PURPOSE_XFER, then one request and one
 * reply, then the connection closes.  Little-endian, fixed size:
 *
 *   request  (XFER_REQ_SIZE = 32)  u32 magic "PCXQ" | u16 version | u16 0
 *                                  | u64 key | u64 offset | u64 len
 *   reply    (XFER_REP_SIZE = 24)  u32 magic "PCXA" | u16 version
 *                                  | u16 status (0 or a pccl_result)
 *                                  | u64 len (payload bytes that follow)
 *                                  | u64 total (size of the published buffer)
 *   payload  len bytes, only when status is 0
 *
 * The server validates everything before it touches a buffer: a malformed
 * request gets PCCL_EPROTO, an unknown key PCCL_ENOTFOUND, a range outside
 * the buffer PCCL_EINVAL; it never reads past the buffer.  The payload is
 * sent straight from the caller's buffer (no copy).  Each accepted
 * connection is served on a detached thread of its own (at most
 * PCCL_MAX_XFER_SERVERS at once; beyond that the handshake is refused
 * with PCCL_EBUSY), so a slow receiver holds up nobody else.
 *
 * Unpublish and close are safe against sends in flight: a serving thread
 * counts itself as a user of its entry while it sends; unpublish marks the
 * entry revoked (no new user), signals the entry's revoke event (which
 * every send waits on besides the socket), and waits until the users are
 * gone.  Close does the same for every entry and waits for every serving
 * thread.  Bytes already handed to the kernel are copies, so the caller's
 * buffer is free once unpublish returns.
 */
#include <stdlib.h>
#include <string.h>

#include "core/comm.h"
#include "net/frame.h"

enum {
    XFER_REQ_MAGIC = 0x51584350, /* "PCXQ" */
    XFER_REP_MAGIC = 0x41584350, /* "PCXA" */
    XFER_VERSION = 1,
    XFER_REQ_SIZE = 32,
    XFER_REP_SIZE = 24,
    XFER_REFUSE_MS = 1000        /* sending a refusal: best effort, briefly */
};

/* ------------------------------------------------------------ lifecycle */

pccl_result
pccl__xfer_init(pccl_comm *comm)
{
    comm->xfer_entries = NULL;
    comm->xfer_nservers = 0;
    return pccl__event_init(&comm->xfer_stop);
}

void
pccl__xfer_fini(pccl_comm *comm)
{
    pccl__xfer_entry *e;

    while ((e = comm->xfer_entries) != NULL) {
        comm->xfer_entries = e->next;
        pccl__event_fini(&e->revoke);
        free(e);
    }
    pccl__event_fini(&comm->xfer_stop);
}

void
pccl__xfer_close(pccl_comm *comm)
{
    pccl__xfer_entry *e;

    pccl__mutex_lock(&comm->mtx);
    pccl__event_signal(&comm->xfer_stop);
    for (e = comm->xfer_entries; e != NULL; e = e->next) {
        pccl__event_signal(&e->revoke);
    }
    while (comm->xfer_nservers > 0) {
        pccl__cond_wait(&comm->cv, &comm->mtx);
    }
    pccl__mutex_unlock(&comm->mtx);
}

/* mtx held. */
static pccl__xfer_entry *
find_locked(pccl_comm *comm, uint64_t key)
{
    pccl__xfer_entry *e;

    for (e = comm->xfer_entries; e != NULL; e = e->next) {
        if (e->key == key) {
            return e;
        }
    }
    return NULL;
}

/* ---------------------------------------------------------- publishing */

pccl_result
pccl_comm_publish(pccl_comm *comm, uint64_t key, const void *buf, size_t len)
{
    pccl__xfer_entry *e;
    pccl_result rv;

    if (comm == NULL || (buf == NULL && len > 0)) {
        return PCCL_EINVAL;
    }
    if ((e = calloc(1, sizeof(*e))) == NULL) {
        return PCCL_ENOMEM;
    }
    e->key = key;
    e->buf = buf;
    e->len = len;
    e->revoke.fd = -1;
    if ((rv = pccl__event_init(&e->revoke)) != 0) {
        free(e);
        return rv;
    }
    pccl__mutex_lock(&comm->mtx);
    rv = comm->closing ? PCCL_ECLOSED : find_locked(comm, key) != NULL ? PCCL_EBUSY : PCCL_OK;
    if (rv == 0) {
        e->next = comm->xfer_entries;
        comm->xfer_entries = e;
    }
    pccl__mutex_unlock(&comm->mtx);
    if (rv != 0) {
        pccl__event_fini(&e->revoke);
        free(e);
    }
    return rv;
}

pccl_result
pccl_comm_unpublish(pccl_comm *comm, uint64_t key, uint64_t *tx_bytes)
{
    pccl__xfer_entry *e, **pp;
    uint64_t tx;

    if (comm == NULL) {
        return PCCL_EINVAL;
    }
    pccl__mutex_lock(&comm->mtx);
    e = find_locked(comm, key);
    if (e == NULL || e->revoked) {
        /* Revoked: another unpublish of the same key is under way. */
        pccl__mutex_unlock(&comm->mtx);
        return PCCL_ENOTFOUND;
    }
    e->revoked = 1;
    pccl__event_signal(&e->revoke);
    while (e->users > 0) {
        pccl__cond_wait(&comm->cv, &comm->mtx);
    }
    for (pp = &comm->xfer_entries; *pp != e; pp = &(*pp)->next) {
    }
    *pp = e->next;
    tx = e->tx_bytes;
    pccl__mutex_unlock(&comm->mtx);
    pccl__event_fini(&e->revoke);
    free(e);
    if (tx_bytes != NULL) {
        *tx_bytes = tx;
    }
    return PCCL_OK;
}

/* ------------------------------------------------------------- serving */

static void
encode_reply(uint8_t *out, uint16_t status, uint64_t len, uint64_t total)
{
    pccl__put_u32(out, XFER_REP_MAGIC);
    pccl__put_u16(out + 4, XFER_VERSION);
    pccl__put_u16(out + 6, status);
    pccl__put_u64(out + 8, len);
    pccl__put_u64(out + 16, total);
}

/* Send the reply header and len payload bytes from buf, waking on revoke.
 * Each wait for the socket is bounded by the progress timeout. */
static pccl_result
send_range(pccl_comm *comm, int fd, const uint8_t *hdr, const uint8_t *buf, uint64_t len,
           int revoke_fd, uint64_t *sent_payload)
{
    size_t hdr_done = 0;
    uint64_t done = 0;
    pccl_result rv;

    while (hdr_done < XFER_REP_SIZE || done < len) {
        pccl__iov iov[2];
        int n = 0;
        size_t put;

        if (hdr_done < XFER_REP_SIZE) {
            iov[n].base = hdr + hdr_done;
            iov[n].len = XFER_REP_SIZE - hdr_done;
            n++;
        }
        if (done < len) {
            uint64_t left = len - done;
            iov[n].base = buf + done;
            iov[n].len = left > (uint64_t)(SIZE_MAX / 2) ? SIZE_MAX / 2 : (size_t)left;
            n++;
        }
        if ((rv = pccl__sock_writev(fd, iov, n, &put)) != 0) {
            *sent_payload = done;
            return rv;
        }
        if (put == 0) {
            rv = pccl__sock_wait(fd, 1, pccl__deadline_ms(comm->progress_timeout_ms), revoke_fd);
            if (rv != 0) {
                *sent_payload = done;
                return rv;
            }
            continue;
        }
        if (hdr_done < XFER_REP_SIZE) {
            size_t h = XFER_REP_SIZE - hdr_done;
            if (put < h) {
                hdr_done += put;
                continue;
            }
            hdr_done = XFER_REP_SIZE;
            put -= h;
        }
        done += put;
    }
    *sent_payload = done;
    return PCCL_OK;
}

/* Serve the one request of an accepted connection.  fd stays the caller's. */
static void
serve(pccl_comm *comm, int fd)
{
    uint8_t req[XFER_REQ_SIZE];
    uint8_t rep[XFER_REP_SIZE];
    uint64_t key, offset, len, sent = 0;
    pccl__xfer_entry *e = NULL;
    uint16_t status = 0;

    if (pccl__sock_recv_all(fd, req, sizeof(req), pccl__deadline_ms(comm->handshake_timeout_ms),
                            comm->xfer_stop.fd) != 0) {
        return;
    }
    key = pccl__get_u64(req + 8);
    offset = pccl__get_u64(req + 16);
    len = pccl__get_u64(req + 24);
    if (pccl__get_u32(req) != XFER_REQ_MAGIC || pccl__get_u16(req + 4) != XFER_VERSION ||
        pccl__get_u16(req + 6) != 0) {
        status = PCCL_EPROTO;
    } else {
        pccl__mutex_lock(&comm->mtx);
        e = find_locked(comm, key);
        if (e == NULL || e->revoked || comm->closing) {
            status = PCCL_ENOTFOUND;
            e = NULL;
        } else if (offset > e->len || len > e->len - offset) {
            status = PCCL_EINVAL;
            e = NULL;
        } else {
            e->users++;
        }
        pccl__mutex_unlock(&comm->mtx);
    }
    if (e == NULL) {
        encode_reply(rep, status, 0, 0);
        (void)pccl__sock_send_all(fd, rep, sizeof(rep), pccl__deadline_ms(XFER_REFUSE_MS),
                                  comm->xfer_stop.fd);
        return;
    }
    /* e->buf and e->len stay valid while we are counted as a user. */
    encode_reply(rep, 0, len, e->len);
    (void)send_range(comm, fd, rep, e->buf + offset, len, e->revoke.fd, &sent);
    pccl__mutex_lock(&comm->mtx);
    e->tx_bytes += sent;
    if (--e->users == 0 && e->revoked) {
        pccl__cond_broadcast(&comm->cv);
    }
    pccl__mutex_unlock(&comm->mtx);
}

typedef struct xfer_job {
    pccl_comm *comm;
    int fd;
    pccl__hs_server st;
} xfer_job;

static void
serve_main(void *arg)
{
    xfer_job *j = arg;
    pccl_comm *comm = j->comm;

    if (pccl__link_server_ack(j->fd, &j->st, 0, comm->secret, comm->secret_len,
                              pccl__deadline_ms(comm->handshake_timeout_ms),
                              comm->xfer_stop.fd) == 0) {
        serve(comm, j->fd);
    }
    pccl__sock_close(j->fd);
    free(j);
    pccl__mutex_lock(&comm->mtx);
    comm->xfer_nservers--;
    pccl__cond_broadcast(&comm->cv);
    pccl__mutex_unlock(&comm->mtx);
}

void
pccl__xfer_on_hello(pccl_comm *comm, int fd, const pccl__hs_server *st)
{
    xfer_job *j = NULL;
    uint16_t status;

    pccl__mutex_lock(&comm->mtx);
    status = comm->closing                                ? PCCL_ECLOSED
             : comm->xfer_nservers >= PCCL_MAX_XFER_SERVERS ? PCCL_EBUSY
                                                            : 0;
    if (status == 0) {
        comm->xfer_nservers++;
    }
    pccl__mutex_unlock(&comm->mtx);
    if (status == 0) {
        if ((j = malloc(sizeof(*j))) != NULL) {
            j->comm = comm;
            j->fd = fd;
            j->st = *st;
            if (pccl__thread_spawn(serve_main, j) == 0) {
                return;
            }
            free(j);
        }
        pccl__mutex_lock(&comm->mtx);
        comm->xfer_nservers--;
        pccl__cond_broadcast(&comm->cv);
        pccl__mutex_unlock(&comm->mtx);
        status = PCCL_ENOMEM;
    }
    (void)pccl__link_server_ack(fd, st, status, comm->secret, comm->secret_len,
                                pccl__deadline_ms(XFER_REFUSE_MS), -1);
    pccl__sock_close(fd);
}

/* ------------------------------------------------------------ fetching */

/* Why a wait on xfer_stop ended: only close signals it. */
static pccl_result
woken(pccl_result rv)
{
    return rv == PCCL_EABORTED ? PCCL_ECLOSED : rv;
}

static pccl_result
fetch_on(pccl_comm *comm, int fd, uint64_t key, uint64_t offset, uint64_t len, uint8_t *dst,
         int32_t timeout_ms, uint64_t *got_out)
{
    pccl__hs_client_hello hello;
    uint8_t req[XFER_REQ_SIZE];
    uint8_t rep[XFER_REP_SIZE];
    uint64_t got = 0, rlen, total;
    uint16_t status;
    pccl_result rv;

    memset(&hello, 0, sizeof(hello));
    hello.purpose = PCCL__PURPOSE_XFER;
    hello.world = 1;
    hello.nconns = 1;
    if ((rv = pccl__link_client_handshake(fd, &hello, comm->secret, comm->secret_len,
                                          pccl__deadline_ms(timeout_ms),
                                          comm->xfer_stop.fd)) != 0) {
        return woken(rv);
    }
    pccl__put_u32(req, XFER_REQ_MAGIC);
    pccl__put_u16(req + 4, XFER_VERSION);
    pccl__put_u16(req + 6, 0);
    pccl__put_u64(req + 8, key);
    pccl__put_u64(req + 16, offset);
    pccl__put_u64(req + 24, len);
    if ((rv = pccl__sock_send_all(fd, req, sizeof(req), pccl__deadline_ms(timeout_ms),
                                  comm->xfer_stop.fd)) != 0) {
        return woken(rv);
    }
    if ((rv = pccl__sock_recv_all(fd, rep, sizeof(rep), pccl__deadline_ms(timeout_ms),
                                  comm->xfer_stop.fd)) != 0) {
        return woken(rv);
    }
    status = pccl__get_u16(rep + 6);
    rlen = pccl__get_u64(rep + 8);
    total = pccl__get_u64(rep + 16);
    if (pccl__get_u32(rep) != XFER_REP_MAGIC || pccl__get_u16(rep + 4) != XFER_VERSION) {
        return PCCL_EPROTO;
    }
    if (status != 0) {
        /* The server's refusal, kept within codes that exist. */
        return status <= PCCL_ENOTFOUND ? (pccl_result)status : PCCL_EPROTO;
    }
    if (rlen != len || total < offset || total - offset < len) {
        return PCCL_EPROTO;
    }
    while (got < len) {
        uint64_t left = len - got;
        size_t n;
        rv = pccl__sock_read(fd, dst + got,
                             left > (uint64_t)(SIZE_MAX / 2) ? SIZE_MAX / 2 : (size_t)left, &n);
        if (rv != 0) {
            *got_out = got;
            return rv;
        }
        if (n == 0) {
            rv = pccl__sock_wait(fd, 0, pccl__deadline_ms(timeout_ms), comm->xfer_stop.fd);
            if (rv != 0) {
                *got_out = got;
                return woken(rv);
            }
            continue;
        }
        got += n;
        *got_out = got;
    }
    return PCCL_OK;
}

pccl_result
pccl_comm_fetch(pccl_comm *comm, const char *addr, uint64_t key, uint64_t offset, uint64_t len,
                void *dst, int32_t timeout_ms, uint64_t *received)
{
    pccl__sockaddr to;
    uint64_t got = 0;
    int closing, fd = -1;
    pccl_result rv;

    if (received != NULL) {
        *received = 0;
    }
    if (comm == NULL || addr == NULL || (dst == NULL && len > 0) ||
        offset > UINT64_MAX - len || len > (uint64_t)SIZE_MAX) {
        return PCCL_EINVAL;
    }
    if ((rv = pccl__addr_parse(addr, 1, &to)) != 0) {
        return rv;
    }
    pccl__mutex_lock(&comm->mtx);
    closing = comm->closing;
    pccl__mutex_unlock(&comm->mtx);
    if (closing) {
        return PCCL_ECLOSED;
    }
    rv = pccl__sock_connect(&to, NULL, pccl__deadline_ms(timeout_ms), comm->xfer_stop.fd, &fd);
    if (rv != 0) {
        return woken(rv);
    }
    rv = fetch_on(comm, fd, key, offset, len, dst, timeout_ms, &got);
    pccl__sock_close(fd);
    if (received != NULL) {
        *received = got;
    }
    return rv;
}
