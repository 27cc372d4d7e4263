/*
 * reducescatter_ring.c - ring reduce-scatter: the first half of the ring
 * all-reduce (allreduce_ring.c) as a collective of its own.
 *
 * The algorithm (world n, this peer has rank r, it sends to r+1 and
 * receives from r-1, ranks modulo n; the input has count = n * m
 * elements, rank r ends with chunk r = elements [r*m, (r+1)*m) reduced
 * over all ranks):
 *
 *  1. Chunks and slices exactly as in the all-reduce (count is a multiple
 *     of n, so the n chunks are equal); the same slice_elems formula.
 *
 *  2. The schedule is the all-reduce's reduce-scatter, n-1 steps t = 0 ..
 *     n-2, shifted by one chunk: at step t rank r sends chunk (r - t - 1)
 *     and receives chunk (r - t - 2).  In the all-reduce, the chunk a
 *     rank receives at step n-2 and finalizes is r+1; with the shift it
 *     is r, the chunk the reduce-scatter's contract gives rank r.
 *
 *  3. A slice received at step t is combined with the local input
 *     (partial = received op input) into a work buffer of count elements
 *     and sent on from there at step t+1, slice by slice (the same
 *     pipelining and striping, slice j of step t on connection
 *     (j + t) % K).  Step-0 slices come straight from the input.
 *
 *  4. At step n-2 the received chunk is r, now reduced over all n inputs:
 *     it is written to the caller's output (m elements) instead of the
 *     work buffer and finalized once (AVG divides by n once; with
 *     UINT8_MINMAX quantization it is replaced by dequant(quant(x)), as
 *     in the all-reduce, so that a reduce-scatter followed by an
 *     all-gather of quantized data sees the same values everywhere).
 *     Every slice on the wire is quantized as it leaves, like the
 *     all-reduce's reduce-scatter slices.
 *
 *  5. The operand order of every chunk is fixed by the ring (chunk c is
 *     reduced in rank order c+1, c+2, ..., c): the result is
 *     deterministic; it may differ in the last bits of floats from the
 *     same chunk of an all-reduce, whose order starts one rank earlier.
 *
 * Every received header is checked by the all-reduce's accept against
 * this schedule (step < n-1 here); anything out of schedule is
 * PCCL_EPROTO and touches no memory.
 *
 * Why nothing is overwritten while needed: the input is only read; each
 * region of the work buffer is written once (the reduce of its receive)
 * and then only read by the send of the next step; the output is written
 * once per slice at the last step.  A failed reduce-scatter leaves the
 * input as it was and the output unspecified (output only: no backup).
 */
#include "coll/reducescatter_ring.h"

void
pccl__rs_op_buffers(const pccl__ring_geom *g, size_t count, pccl_dtype dtype, pccl_quant quant,
                    size_t *work_bytes, size_t *q_bytes)
{
    size_t backup;

    /* The all-reduce's answer out of place (no backup), plus the work
     * buffer the partial sums live in. */
    pccl__ring_op_buffers(g, count, dtype, 0, quant, &backup, q_bytes);
    *work_bytes = 0;
    if (count > 0 && g->world > 1) {
        size_t esize = 1;
        (void)pccl_dtype_size(dtype, &esize);
        *work_bytes = count * esize;
    }
}

pccl_result
pccl__rs_op_init(pccl__ring_op *o, const pccl__ring_geom *g, const void *src, void *out,
                 size_t count, pccl_dtype dtype, pccl_op op, pccl_quant quant, uint64_t tag,
                 uint32_t seq, uint8_t *work_buf, uint8_t *q_buf)
{
    return pccl__ring_sched_init(o, &pccl__reducescatter_ring_vt, 1, g, src, work_buf, out,
                                 count, dtype, op, quant, tag, seq, NULL, q_buf);
}
