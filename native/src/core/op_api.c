/*
 * op_api.c - the public calls on operations: starting an all-reduce
 * (pccl_comm_all_reduce_start, pccl_comm_all_reduce), waiting for an op
 * and freeing it (pccl_op_wait, pccl_op_free).
 *
 * Starting any collective is the same four steps, of which only the
 * second knows the algorithm:
 *   1. validate the arguments (before any byte moves) and read the ring
 *      (pccl__op_ring_locked);
 *   2. allocate the handle with the algorithm's state behind it
 *      (pccl__op_new), take the big buffers it asks for from the buffer
 *      cache, and init the algorithm's op;
 *   3. submit it (pccl__op_submit_locked: tag check, seq, queue);
 *   4. wake the engine, unless the caller is about to wait and may drive
 *      the op itself (pccl_op_wait -> pccl__engine_drive).
 * Wait, free and the failure path (restore, buffers back to the cache)
 * go through the operation interface and are the same for every op.
 */
#include <stdlib.h>
#include <string.h>

#include "coll/allreduce_ring.h"
#include "coll/kernels.h"
#include "core/comm.h"
#include "core/engine.h"

/* Take n bytes for buffer i of h from the cache (or malloc them). */
static pccl_result
take_buf(pccl_comm *comm, pccl_op_handle *h, int i, size_t n)
{
    uint8_t *p = NULL;

    if (n == 0) {
        return PCCL_OK;
    }
    pccl__mutex_lock(&comm->mtx);
    p = pccl__bufcache_take_locked(&comm->bufcache, n, &h->buf_cap[i]);
    pccl__mutex_unlock(&comm->mtx);
    if (p == NULL) {
        p = malloc(n);
        h->buf_cap[i] = n;
    }
    h->buf[i] = p;
    return p == NULL ? PCCL_ENOMEM : PCCL_OK;
}

/* Give h's buffers back to the cache; mtx held.  The caller frees drop. */
static void
give_bufs_locked(pccl_comm *comm, pccl_op_handle *h, pccl__bufdrop *drop)
{
    int i;

    for (i = 0; i < PCCL__OP_MAX_BUFS; i++) {
        pccl__bufcache_give_locked(&comm->bufcache, h->buf[i], h->buf_cap[i], drop);
        h->buf[i] = NULL;
    }
}

/* A handle that was never submitted: its buffers back, its op freed. */
static void
discard(pccl_comm *comm, pccl_op_handle *h, int op_initialized)
{
    pccl__bufdrop drop = {{NULL}, 0};

    pccl__mutex_lock(&comm->mtx);
    give_bufs_locked(comm, h, &drop);
    pccl__mutex_unlock(&comm->mtx);
    pccl__bufdrop_free(&drop);
    if (op_initialized) {
        h->op->vt->fini(h->op);
    }
    free(h);
}

/* Steps 3 and 4 for an initialized op. */
static pccl_result
submit(pccl_comm *comm, pccl_op_handle *h, int wake, pccl_op_handle **out)
{
    pccl_result rv;
    int queued_first;

    pccl__mutex_lock(&comm->mtx);
    rv = pccl__op_submit_locked(comm, h, &queued_first);
    if (rv == 0 && queued_first && wake) {
        pccl__engine_wake(comm);
    }
    pccl__mutex_unlock(&comm->mtx);
    if (rv != 0) {
        discard(comm, h, 1);
        return rv;
    }
    *out = h;
    return PCCL_OK;
}

/* Start an all-reduce; wake: signal the engine thread (not when the
 * caller is about to wait and may drive the op itself). */
static pccl_result
start_all_reduce(pccl_comm *comm, const void *src, void *dst, size_t count, pccl_dtype dtype,
                 pccl_op op, pccl_quant quant, uint64_t tag, int wake, pccl_op_handle **out)
{
    pccl_op_handle *h;
    pccl__ring_geom g;
    uint64_t gen;
    size_t esize, wb, qb;
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
    rv = pccl__op_ring_locked(comm, &g, &gen);
    pccl__mutex_unlock(&comm->mtx);
    if (rv != 0) {
        return rv;
    }

    if ((h = pccl__op_new(comm, sizeof(pccl__ring_op))) == NULL) {
        return PCCL_ENOMEM;
    }
    h->ring_gen = gen;
    pccl__ring_op_buffers(&g, count, dtype, dst == src, quant, &wb, &qb);
    if ((rv = take_buf(comm, h, 0, wb)) != 0 || (rv = take_buf(comm, h, 1, qb)) != 0) {
        discard(comm, h, 0);
        return rv;
    }
    /* seq is filled in by the submit: only frame headers use it. */
    if ((rv = pccl__ring_op_init((pccl__ring_op *)(void *)h->op, &g, src, dst, count, dtype, op,
                                 quant, tag, 0, h->buf[0], h->buf[1])) != 0) {
        discard(comm, h, 0);
        return rv;
    }
    return submit(comm, h, wake, out);
}

pccl_result
pccl_comm_all_reduce_start(pccl_comm *comm, const void *src, void *dst, size_t count,
                           pccl_dtype dtype, pccl_op op, pccl_quant quant, uint64_t tag,
                           pccl_op_handle **out)
{
    return start_all_reduce(comm, src, dst, count, dtype, op, quant, tag, 1, out);
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
        if (!pccl__engine_drive(comm, h, deadline) && h->op->assist) {
            /* The engine thread runs the op: rather than sleep at once,
             * do the op's work ahead of it (e.g. save an in-place input). */
            while (h->op->vt->assist(h->op)) {
            }
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
        pccl__op_restore(h);
        return rv;
    }
    if (info != NULL) {
        info->world = h->op->world;
        info->tx_bytes = h->op->tx_bytes;
        info->rx_bytes = h->op->rx_bytes;
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
    pccl__bufdrop drop = {{NULL}, 0};
    int destroy;

    if (h == NULL) {
        return PCCL_EINVAL;
    }
    comm = h->comm;
    if (!__atomic_load_n(&h->finished, __ATOMIC_ACQUIRE)) {
        break_for(h, PCCL_EABORTED);
    }
    pccl__op_restore(h);
    h->op->vt->fini(h->op);
    pccl__mutex_lock(&comm->mtx);
    give_bufs_locked(comm, h, &drop);
    comm->nhandles--;
    destroy = comm->freed && comm->nhandles == 0;
    pccl__mutex_unlock(&comm->mtx);
    pccl__bufdrop_free(&drop);
    free(h);
    if (destroy) {
        pccl__comm_destroy(comm);
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
    if ((rv = start_all_reduce(comm, src, dst, count, dtype, op, quant, tag, 0, &h)) != 0) {
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
