/*
 * stripe.c - weighted striping of a ring operation over its K connections
 * (see stripe.h).
 */
#include <string.h>

#include "coll/stripe.h"

static uint64_t
gcd64(uint64_t a, uint64_t b)
{
    while (b != 0) {
        uint64_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

pccl_result
pccl__stripe_build(const uint32_t *weights, uint32_t K, uint8_t *sched, uint16_t *len)
{
    uint64_t w[PCCL_MAX_CONNECTIONS], sum = 0, g = 0, slots = 0;
    int64_t cur[PCCL_MAX_CONNECTIONS];
    uint32_t k, s;

    *len = 0;
    if (K == 0 || K > PCCL_MAX_CONNECTIONS || K > 255) {
        return PCCL_EINVAL;
    }
    if (weights == NULL) {
        return PCCL_OK;
    }
    for (k = 0; k < K; k++) {
        w[k] = weights[k];
        sum += w[k];
        g = gcd64(g, w[k]);
    }
    if (sum == 0) {
        return PCCL_OK;
    }
    for (k = 0; k < K; k++) {
        w[k] /= g;
    }
    sum /= g;
    if (sum > PCCL__STRIPE_MAX) {
        /* Scale down; every non-zero weight keeps a slot.  Rounded to the
         * nearest, then trimmed from the largest until the sum fits. */
        uint64_t total = 0;
        for (k = 0; k < K; k++) {
            uint64_t v = (w[k] * PCCL__STRIPE_MAX + sum / 2) / sum;
            if (v == 0 && w[k] != 0) {
                v = 1;
            }
            w[k] = v;
            total += v;
        }
        while (total > PCCL__STRIPE_MAX) {
            uint32_t big = 0;
            for (k = 1; k < K; k++) {
                if (w[k] > w[big]) {
                    big = k;
                }
            }
            w[big]--;
            total--;
        }
        sum = total;
    }
    /* Smooth weighted round-robin: each slot, every connection gains its
     * weight, the richest (lowest index on ties) is picked and pays sum. */
    memset(cur, 0, sizeof(cur));
    for (s = 0; s < sum; s++) {
        uint32_t best = K;
        for (k = 0; k < K; k++) {
            if (w[k] == 0) {
                continue;
            }
            cur[k] += (int64_t)w[k];
            if (best == K || cur[k] > cur[best]) {
                best = k;
            }
        }
        cur[best] -= (int64_t)sum;
        sched[s] = (uint8_t)best;
        slots++;
    }
    *len = (uint16_t)slots;
    return PCCL_OK;
}

uint32_t
pccl__stripe_conn(const pccl__ring_geom *g, int outbound, uint64_t s, uint32_t t, uint32_t j)
{
    uint16_t len = outbound ? g->out_len : g->in_len;

    if (len == 0) {
        return (j + t) % g->nconns;
    }
    return outbound ? g->out_sched[s % len] : g->in_sched[s % len];
}
