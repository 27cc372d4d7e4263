/*
 * quant.h - min-max uint8 quantization of one slice.
 *
 * q[i] = round((x[i] - min) / scale) clamped to 0..255, scale = (max-min)/255
 * (scale 0 when max == min).  dequant(q) = min + q * scale, computed in
 * double for FLOAT64 and in float for the other floating dtypes, then
 * narrowed.  Both are pure functions of their inputs, so every peer that
 * dequantizes the same bytes with the same (min, scale) gets the same bits;
 * the owner of a chunk overwrites its own copy with dequant(quant(x)).
 * Non-finite inputs never cause undefined behaviour: NaN quantizes to 0 and
 * +/-inf saturate; min/scale are then whatever the rule gives, identically
 * on every peer.
 */
#ifndef PCCL_COLL_QUANT_H
#define PCCL_COLL_QUANT_H

#include <stddef.h>
#include <stdint.h>

#include "pccl.h"

/* pccl__quant_minmax quantizes n elements of src (a floating dtype) into
 * q (n bytes) and writes the slice's min and scale.  n may be 0. */
void pccl__quant_minmax(const void *src, size_t n, pccl_dtype dtype,
                        uint8_t *q, double *qmin, double *qscale);

/* pccl__dequant writes out[i] = dequant(q[i]) for i < n. */
void pccl__dequant(const uint8_t *q, size_t n, double qmin, double qscale,
                   pccl_dtype dtype, void *out);

/* pccl__dequant_reduce writes out[i] = dequant(q[i]) op local[i]; the
 * same bits as pccl__dequant into a temporary followed by pccl__reduce
 * (temporary as a, local as b).  out may alias local. */
void pccl__dequant_reduce(void *out, const uint8_t *q, const void *local, size_t n,
                          double qmin, double qscale, pccl_dtype dtype, pccl_op op);

#endif
