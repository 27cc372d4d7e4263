/*
 * p2p_api.c - the public point-to-point calls that start and free an op
 * (pccl_comm_send_start, pccl_comm_recv_start, pccl_p2p_free).  Each
 * handle counts in comm->nhandles, so pccl_comm_free leaves the memory to
 * the last pccl_p2p_free, as op_api.c does for collectives.  The rest
 * (wait, identity, peer lost) is in p2p.c.
 */
#include "core/comm.h"
#include "core/p2p.h"

static void
count_handle(pccl_comm *comm)
{
    pccl__mutex_lock(&comm->mtx);
    comm->nhandles++;
    pccl__mutex_unlock(&comm->mtx);
}

pccl_result
pccl_comm_send_start(pccl_comm *comm, uint32_t peer_id, const char *peer_addr, const void *buf,
                     size_t len, uint64_t tag, int32_t timeout_ms, pccl_p2p_handle **out)
{
    pccl_result rv = pccl__p2p_send_start(comm, peer_id, peer_addr, buf, len, tag, timeout_ms,
                                          out);
    if (rv == 0) {
        count_handle(comm);
    }
    return rv;
}

pccl_result
pccl_comm_recv_start(pccl_comm *comm, uint32_t peer_id, void *buf, size_t len, uint64_t tag,
                     int32_t timeout_ms, pccl_p2p_handle **out)
{
    pccl_result rv = pccl__p2p_recv_start(comm, peer_id, buf, len, tag, timeout_ms, out);
    if (rv == 0) {
        count_handle(comm);
    }
    return rv;
}

pccl_result
pccl_p2p_free(pccl_p2p_handle *h)
{
    pccl_comm *comm;
    int destroy;

    if (h == NULL) {
        return PCCL_EINVAL;
    }
    comm = pccl__p2p_release(h);
    pccl__mutex_lock(&comm->mtx);
    comm->nhandles--;
    destroy = comm->freed && comm->nhandles == 0;
    pccl__mutex_unlock(&comm->mtx);
    if (destroy) {
        pccl__comm_destroy(comm);
    }
    return PCCL_OK;
}
