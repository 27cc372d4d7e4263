/*
 * bufcache.h - large buffers of finished operations, kept for the next.
 *
 * In-place and quantized ops need a tensor-sized buffer.  Allocating it
 * per op costs a page fault per 4 KiB (glibc maps large blocks fresh each
 * time: 256 MiB in place ran at half speed that way), so finished ops
 * leave their buffers here for the next ones: at most four, the largest
 * kept, and never more than PCCL__BUFCACHE_BYTES in all, so an idle
 * communicator holds at most about one large tensor's worth.
 *
 * No lock of its own: the communicator calls it under comm->mtx.
 * Allocation and freeing of large blocks happen outside that lock
 * (pccl__bufcache_take's malloc, pccl__bufdrop_free).
 */
#ifndef PCCL_CORE_BUFCACHE_H
#define PCCL_CORE_BUFCACHE_H

#include <stddef.h>
#include <stdint.h>

#define PCCL__BUFCACHE_BYTES ((size_t)1 << 30)

typedef struct pccl__bufcache {
    uint8_t *p[4];
    size_t size[4];
} pccl__bufcache;

/* Buffers a give dropped: the caller frees them outside the lock
 * (unmapping a large block takes a while).  One give drops at most 4
 * (evictions, or fewer evictions and the buffer itself); an op returns
 * two buffers. */
typedef struct pccl__bufdrop {
    uint8_t *p[8];
    size_t n;
} pccl__bufdrop;

/* pccl__bufcache_take_locked removes and returns the smallest cached
 * buffer of at least size bytes (its capacity in *cap), or NULL. */
uint8_t *pccl__bufcache_take_locked(pccl__bufcache *c, size_t size, size_t *cap);

/* pccl__bufcache_give_locked keeps p (cap bytes) if it is among the
 * largest that fit: smaller cached buffers are evicted to make room; p
 * itself is dropped if every cached buffer is at least as large and there
 * is no room.  p NULL: nothing. */
void pccl__bufcache_give_locked(pccl__bufcache *c, uint8_t *p, size_t cap, pccl__bufdrop *drop);

/* pccl__bufdrop_free frees what gives dropped (no lock needed). */
void pccl__bufdrop_free(pccl__bufdrop *drop);

/* pccl__bufcache_fini frees every cached buffer. */
void pccl__bufcache_fini(pccl__bufcache *c);

#endif
