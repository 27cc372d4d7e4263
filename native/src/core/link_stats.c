/*
 * link_stats.c - passive measurement of the ring's outbound link.
 *
 * A ring edge is the bottleneck exactly when its sender has frames the
 * kernel will not take yet (the socket buffer is full because the link
 * drains it slower than the ring produces).  The engine counts, over all
 * outbound connections together, the time during which at least one of
 * them stayed backlogged after a flush, and the bytes written in that
 * time: their ratio is what the link carried while it was the limit.  An
 * edge that never backlogs reports no time: it was never the limit, and
 * its estimate stays what a probe measured.  The master turns these
 * counters into per-edge estimates (docs/topology.md, "Passive updates").
 */
#include "core/comm.h"

void
pccl__link_stats_flushed(pccl_comm *comm, pccl__conn *c, size_t moved, uint64_t now)
{
    if (comm->nbacklogged > 0) {
        comm->backlog_bytes += moved;
    }
    if (c->sq_head != NULL && !c->backlogged) {
        c->backlogged = 1;
        if (comm->nbacklogged++ == 0) {
            comm->backlog_since = now;
        }
    } else if (c->sq_head == NULL && c->backlogged) {
        c->backlogged = 0;
        if (--comm->nbacklogged == 0) {
            comm->backlog_ns += now - comm->backlog_since;
        }
    }
}

void
pccl__link_stats_reset(pccl_comm *comm, uint64_t now)
{
    if (comm->nbacklogged > 0) {
        comm->backlog_ns += now - comm->backlog_since;
    }
    comm->nbacklogged = 0;
}

pccl_result
pccl_comm_link_stats(pccl_comm *comm, uint64_t *bytes, uint64_t *busy_ns)
{
    uint64_t b, ns;

    if (comm == NULL || bytes == NULL || busy_ns == NULL) {
        return PCCL_EINVAL;
    }
    pccl__mutex_lock(&comm->mtx);
    b = comm->stats_bytes;
    ns = comm->stats_ns;
    pccl__mutex_unlock(&comm->mtx);
    *bytes = b;
    *busy_ns = ns;
    return PCCL_OK;
}
