/*
 * reducescatter_ring.h - one ring reduce-scatter.
 *
 * The op is a pccl__ring_op (allreduce_ring.h) run with the reduce-scatter
 * schedule; see reducescatter_ring.c.  Threads as for the all-reduce.
 */
#ifndef PCCL_COLL_REDUCESCATTER_RING_H
#define PCCL_COLL_REDUCESCATTER_RING_H

#include <stddef.h>
#include <stdint.h>

#include "coll/allreduce_ring.h"

/* pccl__rs_op_buffers says which buffers a reduce-scatter of count =
 * world * m elements needs from its caller: a work buffer for the partial
 * sums (count * esize bytes, world > 1) and a quantization buffer (count
 * bytes, quantized only).  0 means none.  Pure. */
void pccl__rs_op_buffers(const pccl__ring_geom *g, size_t count, pccl_dtype dtype,
                         pccl_quant quant, size_t *work_bytes, size_t *q_bytes);

/* pccl__rs_op_init prepares a reduce-scatter of src (count = world * m
 * elements) into out (m elements: chunk rank, reduced over every rank).
 * Arguments validated by the caller (as for the all-reduce, plus count a
 * multiple of world, out not overlapping src).  work_buf and q_buf are
 * what pccl__rs_op_buffers asked for.  World 1 and count 0 finish here.
 * PCCL_ENOMEM. */
pccl_result pccl__rs_op_init(pccl__ring_op *o, const pccl__ring_geom *g, const void *src,
                             void *out, size_t count, pccl_dtype dtype, pccl_op op,
                             pccl_quant quant, uint64_t tag, uint32_t seq, uint8_t *work_buf,
                             uint8_t *q_buf);

#endif
