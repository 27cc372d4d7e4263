/*
 * kernels.h - element-wise reduce kernels, one per dtype x op.
 *
 * Plain loops over restrict-free pointers that gcc/clang vectorise at -O3.
 * float16/bfloat16 are widened to float, combined, and narrowed with
 * round-to-nearest-even, so a result depends only on the two inputs.
 */
#ifndef PCCL_COLL_KERNELS_H
#define PCCL_COLL_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "pccl.h"

/* pccl__reduce sets out[i] = a[i] op b[i] for i < n.  out may alias a or b
 * (exactly, not partially).  AVG combines like SUM here: the division is
 * pccl__avg_finalize's job.  Integer SUM/PROD wrap (computed unsigned).
 * MIN/MAX with a NaN operand return the NaN operand's bits of a.
 * dtype/op must be valid (checked by the caller). */
void pccl__reduce(void *out, const void *a, const void *b, size_t n,
                  pccl_dtype dtype, pccl_op op);

/* pccl__avg_finalize divides n elements of buf in place by world (>= 1).
 * Integers: C truncating division.  Halves: in float, then narrowed. */
void pccl__avg_finalize(void *buf, size_t n, pccl_dtype dtype, uint32_t world);

/* Conversions used by kernels, quantization and tests. */
float pccl__half_to_float(uint16_t h);
uint16_t pccl__float_to_half(float f);
float pccl__bf16_to_float(uint16_t b);
uint16_t pccl__float_to_bf16(float f);

/* Vectorised bulk forms of the conversions above for FLOAT16 or BFLOAT16
 * (dtype), used by quantization: pccl__halves_to_float widens n elements,
 * pccl__float_to_halves narrows n elements with the same rounding as the
 * kernels.  in and out must not overlap. */
void pccl__halves_to_float(float *out, const uint16_t *in, size_t n, pccl_dtype dtype);
void pccl__float_to_halves(uint16_t *out, const float *in, size_t n, pccl_dtype dtype);

/* pccl__copy_nt copies len bytes like memcpy (no overlap), with stores
 * that bypass the caches where the CPU has them (x86 SSE2 streaming
 * stores; elsewhere plain memcpy).  For data written once and read only
 * if something fails, like an in-place operation's backup of its input:
 * it then neither evicts the working set nor reads the destination lines
 * first.  Streaming stores are weakly ordered: call pccl__copy_nt_fence
 * after the last copy and before publishing the bytes to another thread
 * (e.g. by a release store). */
void pccl__copy_nt(void *to, const void *from, size_t len);
void pccl__copy_nt_fence(void);

/* pccl__dtype_is_float is 1 for FLOAT32/64/16 and BFLOAT16. */
int pccl__dtype_is_float(pccl_dtype dtype);

#endif
