/*
 * op.c - operations as the core keeps them: the seq table, handles, and
 * the state changes shared by the public calls (op_api.c) and the engine.
 * Calls nothing above it (no engine, no lifecycle); every function that
 * touches the communicator says which lock it expects.
 */
#include <stdlib.h>
#include <string.h>

#include "core/comm.h"
#include "core/op.h"

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

pccl_result
pccl__seq_take(pccl__seq_table *t, uint64_t tag, uint32_t *seq)
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

void
pccl__seq_clear(pccl__seq_table *t)
{
    free(t->tags);
    free(t->next);
    free(t->used);
    memset(t, 0, sizeof(*t));
}

/* ------------------------------------------------------------ op state */

pccl_op_handle *
pccl__op_new(pccl_comm *comm, size_t state_size)
{
    /* The algorithm's state follows the handle, aligned for any type. */
    size_t head = (sizeof(pccl_op_handle) + 15) & ~(size_t)15;
    pccl_op_handle *h = calloc(1, head + state_size);

    if (h == NULL) {
        return NULL;
    }
    h->comm = comm;
    h->op = (pccl__coll_op *)(void *)((uint8_t *)h + head);
    return h;
}

pccl_result
pccl__op_ring_locked(pccl_comm *comm, pccl__ring_geom *g, uint64_t *gen)
{
    pccl_result rv = comm->closing                          ? PCCL_ECLOSED
                     : comm->ring_state == PCCL__RING_READY  ? PCCL_OK
                     : comm->ring_state == PCCL__RING_BROKEN ? PCCL_ERINGBROKEN
                                                             : PCCL_ESTATE;
    *g = comm->geom;
    *gen = comm->ring_gen;
    return rv;
}

pccl_result
pccl__op_submit_locked(pccl_comm *comm, pccl_op_handle *h, int *wake)
{
    pccl_op_handle *a;
    uint32_t seq;
    pccl_result rv;

    *wake = 0;
    rv = comm->closing                          ? PCCL_ECLOSED
         : comm->ring_gen != h->ring_gen        ? PCCL_ERINGBROKEN
         : comm->ring_state == PCCL__RING_READY  ? PCCL_OK
         : comm->ring_state == PCCL__RING_BROKEN ? PCCL_ERINGBROKEN
                                                 : PCCL_ESTATE;
    for (a = comm->active; rv == 0 && a != NULL; a = a->active_next) {
        if (a->op->tag == h->op->tag) {
            rv = PCCL_EBUSY;
        }
    }
    if (rv == 0) {
        rv = pccl__seq_take(&comm->seqs, h->op->tag, &seq);
    }
    if (rv != 0) {
        return rv;
    }
    h->op->seq = seq;
    comm->nhandles++;
    if (h->op->vt->done(h->op)) {
        /* World 1 or nothing to move: already finished. */
        h->result = PCCL_OK;
        h->state = PCCL__OP_DONE;
        h->finished = 1;
        return PCCL_OK;
    }
    h->state = PCCL__OP_QUEUED;
    h->active_next = comm->active;
    if (comm->active != NULL) {
        comm->active->active_prev = h;
    }
    comm->active = h;
    if (comm->submit_tail != NULL) {
        comm->submit_tail->queue_next = h;
    } else {
        comm->submit_head = h;
        *wake = 1;
    }
    comm->submit_tail = h;
    return PCCL_OK;
}

void
pccl__op_finish_locked(pccl_comm *comm, pccl_op_handle *op, pccl_result rv)
{
    if (op->active_prev != NULL) {
        op->active_prev->active_next = op->active_next;
    } else if (comm->active == op) {
        comm->active = op->active_next;
    }
    if (op->active_next != NULL) {
        op->active_next->active_prev = op->active_prev;
    }
    op->active_next = op->active_prev = NULL;
    op->queue_next = NULL;
    op->result = rv;
    op->state = PCCL__OP_DONE;
    __atomic_store_n(&op->finished, 1, __ATOMIC_RELEASE);
}

void
pccl__op_restore(pccl_op_handle *h)
{
    if (h->result != 0 && !h->restored) {
        h->op->vt->restore(h->op);
        h->restored = 1;
    }
}
