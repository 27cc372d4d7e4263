/*
 * stripe.h - which connection carries which slice of a ring operation.
 *
 * By default slice j of step t travels on connection (j + t) % K: equal
 * striping.  A flow-splitting plan (docs/flowsplit.md) gives each of the K
 * connections of an edge a byte weight instead; then the s-th slice sent
 * on the edge in an operation (counted over all steps, in step order) goes
 * on sched[s % len], a smooth weighted round-robin table both ends build
 * from the same weights.  The sender builds it from its out_weights, the
 * receiver from its in_weights (the sender's out_weights), so the receiver
 * knows which inbound connection each slice comes on.
 */
#ifndef PCCL_COLL_STRIPE_H
#define PCCL_COLL_STRIPE_H

#include <stdint.h>

#include "coll/coll.h"

/* pccl__stripe_build fills sched (PCCL__STRIPE_MAX entries) from K
 * weights (NULL or all zero: *len = 0, the default rotation).  Weights are
 * divided by their gcd and, when their sum is still above
 * PCCL__STRIPE_MAX, scaled down to it (a non-zero weight keeps at least
 * one slot).  Deterministic.  PCCL_EINVAL when K is 0 or above 255. */
pccl_result pccl__stripe_build(const uint32_t *weights, uint32_t K, uint8_t *sched,
                               uint16_t *len);

/* pccl__stripe_conn is the connection of slice j of step t, the s-th
 * slice of the edge in this operation, by the outbound (sender) or the
 * inbound (receiver) schedule of g. */
uint32_t pccl__stripe_conn(const pccl__ring_geom *g, int outbound, uint64_t s, uint32_t t,
                           uint32_t j);

#endif
