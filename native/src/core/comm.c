/*
 * comm.c - the communicator's lifecycle: pccl_comm_config_init, create,
 * listen_address, abort, close and free.  Ring setup is in ring_setup.c,
 * the calls on operations in op_api.c; bytes move in engine.c.
 */
#include <stdlib.h>
#include <string.h>

#include "core/comm.h"
#include "core/engine.h"

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
    if ((rv = pccl__mutex_init(&comm->progress_lock)) != 0) {
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
                                  comm->handshake_timeout_ms, &pccl__ring_setup_listener_ops, comm)) != 0) {
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
    pccl__mutex_fini(&comm->progress_lock);
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

void
pccl__comm_destroy(pccl_comm *comm)
{
    pccl__listener_close(&comm->listener);
    pccl__xfer_fini(comm);
    pccl__event_fini(&comm->engine_wake);
    pccl__event_fini(&comm->setup_wake);
    pccl__seq_clear(&comm->seqs);
    pccl__bufcache_fini(&comm->bufcache);
    pccl__mutex_fini(&comm->progress_lock);
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
        pccl__comm_destroy(comm);
    }
    return PCCL_OK;
}

