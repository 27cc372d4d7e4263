/*
 * bufcache.c - large buffers kept between operations (bufcache.h says
 * why and how many).  The caller holds the communicator's mutex.
 */
#include <stdlib.h>

#include "core/bufcache.h"

static size_t
cached_bytes(const pccl__bufcache *c)
{
    size_t i, total = 0;

    for (i = 0; i < 4; i++) {
        total += c->size[i];
    }
    return total;
}

uint8_t *
pccl__bufcache_take_locked(pccl__bufcache *c, size_t size, size_t *cap)
{
    uint8_t *p;
    size_t i, best = SIZE_MAX;

    for (i = 0; i < 4; i++) {
        if (c->p[i] != NULL && c->size[i] >= size &&
            (best == SIZE_MAX || c->size[i] < c->size[best])) {
            best = i;
        }
    }
    if (best == SIZE_MAX) {
        return NULL;
    }
    p = c->p[best];
    *cap = c->size[best];
    c->p[best] = NULL;
    c->size[best] = 0;
    return p;
}

void
pccl__bufcache_give_locked(pccl__bufcache *c, uint8_t *p, size_t cap, pccl__bufdrop *drop)
{
    size_t i, free_slot, small;

    if (p == NULL) {
        return;
    }
    if (cap > PCCL__BUFCACHE_BYTES) {
        drop->p[drop->n++] = p;
        return;
    }
    for (;;) {
        free_slot = 4;
        small = 4;
        for (i = 0; i < 4; i++) {
            if (c->p[i] == NULL) {
                free_slot = i;
            } else if (small == 4 || c->size[i] < c->size[small]) {
                small = i;
            }
        }
        if (free_slot < 4 && cached_bytes(c) + cap <= PCCL__BUFCACHE_BYTES) {
            c->p[free_slot] = p;
            c->size[free_slot] = cap;
            return;
        }
        if (small == 4 || c->size[small] >= cap) {
            drop->p[drop->n++] = p;
            return;
        }
        drop->p[drop->n++] = c->p[small];
        c->p[small] = NULL;
        c->size[small] = 0;
    }
}

void
pccl__bufdrop_free(pccl__bufdrop *drop)
{
    size_t i;
    for (i = 0; i < drop->n; i++) {
        free(drop->p[i]);
    }
    drop->n = 0;
}

void
pccl__bufcache_fini(pccl__bufcache *c)
{
    size_t i;

    for (i = 0; i < 4; i++) {
        free(c->p[i]);
        c->p[i] = NULL;
        c->size[i] = 0;
    }
}
