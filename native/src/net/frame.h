/*
 * frame.h - the data frame header: fixed size, little-endian.
 *
 *   off size field
 *     0    4 magic    "PCCL" (0x4c434350 read as u32 LE)
 *     4    2 version  PCCL__FRAME_VERSION
 *     6    2 kind     enum pccl__frame_kind
 *     8    8 epoch    ring generation
 *    16    8 tag      user tag of the operation
 *    24    4 seq      n-th operation with this tag on this ring
 *    28    4 step     ring step, 0 .. 2*world-3
 *    32    8 offset   first element of the slice within the operation
 *    40    4 count    elements in the slice
 *    44    4 length   payload bytes following the header
 *    48    1 dtype    pccl_dtype
 *    49    1 op       pccl_op
 *    50    1 quant    pccl_quant
 *    51    1 flags    0
 *    52    4 reserved 0
 *    56    8 qmin     f64, quantized slices only (else 0)
 *    64    8 qscale   f64, quantized slices only (else 0)
 *    72      payload
 *
 * Decoding checks everything that can be checked without knowing the
 * operation; the ring checks offset/count/step against its schedule.
 */
#ifndef PCCL_NET_FRAME_H
#define PCCL_NET_FRAME_H

#include <stddef.h>
#include <stdint.h>

#include "pccl.h"

enum pccl__frame_consts {
    PCCL__FRAME_MAGIC = 0x4c434350,
    PCCL__FRAME_VERSION = 1,
    PCCL__FRAME_HEADER_SIZE = 72,
    PCCL__FRAME_MAX_PAYLOAD = 16777216 /* == PCCL_MAX_SLICE_BYTES */
};

enum pccl__frame_kind {
    PCCL__FRAME_DATA = 1 /* one slice of an all-reduce */
};

typedef struct pccl__frame_header {
    uint16_t kind;
    uint64_t epoch;
    uint64_t tag;
    uint32_t seq;
    uint32_t step;
    uint64_t offset;
    uint32_t count;
    uint32_t length;
    uint8_t dtype;
    uint8_t op;
    uint8_t quant;
    double qmin;
    double qscale;
} pccl__frame_header;

/* A frame to send: the encoded header and a pointer to its payload,
 * which stays in the operation's buffers (nothing is copied).  Owned by
 * its operation, which keeps it alive (and its payload unchanged) until
 * the op's on-sent callback runs for it.  `next` belongs to the send
 * queue that holds it (net/conn.c). */
typedef struct pccl__frame_out {
    struct pccl__frame_out *next;
    void *owner;                       /* the operation (a pccl__coll_op) */
    const uint8_t *payload;
    uint32_t len;                      /* payload bytes */
    uint8_t hdr[PCCL__FRAME_HEADER_SIZE];
} pccl__frame_out;

/* pccl__frame_encode writes h as PCCL__FRAME_HEADER_SIZE bytes (magic,
 * version, flags and reserved filled in). */
void pccl__frame_encode(const pccl__frame_header *h, uint8_t *out);

/* pccl__frame_decode parses len bytes; PCCL_EPROTO when len is short, the
 * magic/version/kind is wrong, flags/reserved are not 0, dtype/op/quant are
 * out of range, length exceeds PCCL__FRAME_MAX_PAYLOAD, length disagrees
 * with count (count * dtype size, or count bytes when quantized), or
 * qmin/qscale are not finite.  *out written only on success. */
pccl_result pccl__frame_decode(const uint8_t *buf, size_t len, pccl__frame_header *out);

/* Little-endian helpers shared by the codecs. */
void pccl__put_u16(uint8_t *p, uint16_t v);
void pccl__put_u32(uint8_t *p, uint32_t v);
void pccl__put_u64(uint8_t *p, uint64_t v);
void pccl__put_f64(uint8_t *p, double v);
uint16_t pccl__get_u16(const uint8_t *p);
uint32_t pccl__get_u32(const uint8_t *p);
uint64_t pccl__get_u64(const uint8_t *p);
double pccl__get_f64(const uint8_t *p);

#endif
