/*
 * pccl.h - the one public header of the pccl native core.
 *
 * pccl moves tensors between training processes over plain TCP.  The core
 * knows bytes, sockets and rings; membership and votes live in the Python
 * control plane, which drives this API.
 *
 * Conventions (see docs/c-api.md):
 *  - every function returns a pccl_result: PCCL_OK (0) or a stable positive
 *    code; operating-system errors are PCCL_ESYSERR | errno.
 *  - out-parameters come last and are written only on success.
 *  - handles are opaque; "close" stops a handle and wakes every blocked
 *    caller with PCCL_ECLOSED, "free" releases its memory.
 *
 * This header is parsed by cffi at build time: keep it free of
 * function-like macros, and give every constant as an enum.
 */
#ifndef PCCL_H
#define PCCL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* pccl_result: 0 on success, otherwise one of enum pccl_error. */
typedef int pccl_result;

/* Result codes.  Stable: never renumber, only add. */
enum pccl_error {
    PCCL_OK = 0,
    PCCL_EINVAL = 1,        /* bad argument (dtype, size, address, ...) */
    PCCL_ENOMEM = 2,        /* out of memory */
    PCCL_ETIMEDOUT = 3,     /* a deadline or the progress timeout passed */
    PCCL_EABORTED = 4,      /* pccl_comm_abort() was called */
    PCCL_ECLOSED = 5,       /* the handle was closed */
    PCCL_EPEERLOST = 6,     /* a ring neighbour closed or reset a link */
    PCCL_EPROTO = 7,        /* malformed, out-of-range or stale frame */
    PCCL_EAUTH = 8,         /* handshake authentication failed */
    PCCL_ESTATE = 9,        /* call not valid now (e.g. no ring set) */
    PCCL_EBUSY = 10,        /* tag already in flight */
    PCCL_ENOTSUP = 11,      /* combination not supported */
    PCCL_EADDR = 12,        /* address cannot be parsed or bound */
    PCCL_ECONNREFUSED = 13, /* nobody listens at the neighbour address */
    PCCL_ERINGBROKEN = 14,  /* an earlier failure broke this ring */
    PCCL_ENOTFOUND = 15,    /* nothing is published under that key */
    PCCL_ESYSERR = 0x10000000 /* OR-ed with errno */
};

/* Element types.  Values are part of the wire format: never renumber. */
typedef enum pccl_dtype {
    PCCL_FLOAT32 = 0,
    PCCL_FLOAT64 = 1,
    PCCL_FLOAT16 = 2,
    PCCL_BFLOAT16 = 3,
    PCCL_INT8 = 4,
    PCCL_INT16 = 5,
    PCCL_INT32 = 6,
    PCCL_INT64 = 7,
    PCCL_UINT8 = 8,
    PCCL_DTYPE_COUNT = 9
} pccl_dtype;

/* Reduction operators.  AVG sums, then the owner of each chunk divides
 * once by the world size (integers: truncating division). */
typedef enum pccl_op {
    PCCL_SUM = 0,
    PCCL_AVG = 1,
    PCCL_MIN = 2,
    PCCL_MAX = 3,
    PCCL_PROD = 4,
    PCCL_OP_COUNT = 5
} pccl_op;

/* Wire quantization.  UINT8_MINMAX: per slice, q = round((x-min)/scale),
 * floating dtypes only. */
typedef enum pccl_quant {
    PCCL_QUANT_NONE = 0,
    PCCL_QUANT_UINT8_MINMAX = 1,
    PCCL_QUANT_COUNT = 2
} pccl_quant;

/* Limits and defaults. */
enum pccl_limits {
    PCCL_MAX_CONNECTIONS = 64,           /* K, connections per neighbour */
    PCCL_DEFAULT_CONNECTIONS = 4,
    PCCL_DEFAULT_SLICE_BYTES = 1048576,  /* largest slice on the wire */
    PCCL_MIN_SLICE_BYTES = 4096,
    PCCL_MAX_SLICE_BYTES = 16777216,
    PCCL_DEFAULT_PROGRESS_TIMEOUT_MS = 60000,
    PCCL_DEFAULT_HANDSHAKE_TIMEOUT_MS = 5000,
    PCCL_MAX_SECRET_BYTES = 1024,
    PCCL_ADDRSTRLEN = 64,                /* buffer for "host:port" */
    PCCL_MAX_XFER_SERVERS = 64           /* transfers served at once; more: PCCL_EBUSY */
};

/* Opaque handles. */
typedef struct pccl_comm pccl_comm;
typedef struct pccl_op_handle pccl_op_handle;

/* Settings of a communicator; fill with pccl_comm_config_init first. */
typedef struct pccl_comm_config {
    const char *listen_addr;      /* "host:port"; port 0 picks one. NULL: "0.0.0.0:0" */
    uint32_t p2p_connections;     /* K, 1..PCCL_MAX_CONNECTIONS */
    uint32_t slice_bytes;         /* largest slice, PCCL_MIN_..PCCL_MAX_SLICE_BYTES */
    int32_t progress_timeout_ms;  /* ring idle with an op in flight this long: ETIMEDOUT; <0: never */
    int32_t handshake_timeout_ms; /* per connection handshake */
    const uint8_t *secret;        /* shared secret for HMAC-SHA256 auth; NULL: none */
    size_t secret_len;            /* 0..PCCL_MAX_SECRET_BYTES, copied at create */
} pccl_comm_config;

/* Where this peer sits in a ring; see pccl_comm_set_ring. */
typedef struct pccl_ring_config {
    uint64_t epoch;               /* ring generation; frames of other epochs are refused */
    uint32_t rank;                /* this peer's position, 0..world-1 */
    uint32_t world;               /* peers in the ring, >= 1 */
    const char *next_addr;        /* "host:port" of rank (rank+1)%world; unused if world == 1 */
    const char *const *bind_addrs;/* connection k binds to bind_addrs[k % n_bind_addrs]; may be NULL */
    uint32_t n_bind_addrs;
    int32_t timeout_ms;           /* for connecting and for the previous rank to connect; <0: forever */
    /* Flow-splitting plan (docs/flowsplit.md).  Each array has K entries or
     * is NULL; all NULL (or all zero) is the default: no pin, equal striping.
     * out_port_lo/hi[k]: outbound connection k binds a free source port in
     * [lo, hi] (ports in use are skipped; lo == 0: any port), after the
     * address of bind_addrs, so policy routing on the source port pins it to
     * one path.  out_weights[k]: the share of every operation's slices that
     * outbound connection k carries (proportional; zero: none).
     * in_weights[k]: the previous rank's out_weights (the slices its
     * connection k carries to us); both ends must agree. */
    const uint16_t *out_port_lo;
    const uint16_t *out_port_hi;
    const uint32_t *out_weights;
    const uint32_t *in_weights;
} pccl_ring_config;

/* What one all-reduce moved. */
typedef struct pccl_reduce_info {
    uint32_t world;
    uint64_t tx_bytes;            /* payload + headers sent */
    uint64_t rx_bytes;            /* payload + headers received */
} pccl_reduce_info;

/* pccl_strerror returns a static, never-NULL description of a result. */
const char *pccl_strerror(pccl_result rv);

/* pccl_version returns the library version string (static, never NULL). */
const char *pccl_version(void);

/* pccl_dtype_size writes the size in bytes of one element of dtype. Pure. */
pccl_result pccl_dtype_size(pccl_dtype dtype, size_t *size);

/* pccl_comm_config_init fills cfg with defaults. Pure, any thread. */
pccl_result pccl_comm_config_init(pccl_comm_config *cfg);

/* pccl_comm_create binds the listener and starts the I/O thread.  The caller
 * owns *out and must pccl_comm_free it.  cfg is copied.  Does not block. */
pccl_result pccl_comm_create(const pccl_comm_config *cfg, pccl_comm **out);

/* pccl_comm_listen_address writes the bound "host:port" (NUL-terminated)
 * into buf of len bytes (PCCL_ADDRSTRLEN suffices).  Any thread. */
pccl_result pccl_comm_listen_address(pccl_comm *comm, char *buf, size_t len);

/* pccl_comm_set_ring replaces the ring: it drops the previous one (failing
 * its operations with PCCL_ERINGBROKEN), opens K connections to next_addr
 * and waits for K from the previous rank of the same epoch.  Blocks until
 * both are ready, ring->timeout_ms passes, or pccl_comm_abort/close.  One
 * caller at a time; operations must not be started meanwhile. */
pccl_result pccl_comm_set_ring(pccl_comm *comm, const pccl_ring_config *ring);

/* pccl_comm_ring_conn_address writes the local "host:port" of outbound
 * ring connection k (0..K-1) of the ring set last (NUL-terminated) into buf
 * of len bytes (PCCL_ADDRSTRLEN suffices): how a caller checks a path pin.
 * PCCL_ESTATE without a ring, PCCL_EINVAL for a bad k.  Any thread. */
pccl_result pccl_comm_ring_conn_address(pccl_comm *comm, uint32_t k, char *buf, size_t len);

/* pccl_comm_all_reduce_start starts an all-reduce of count elements from
 * src into dst (dst == src: in place) and writes a handle the caller owns
 * (pccl_op_free).  src and dst must stay valid until the op is waited
 * for.  The op is striped over all K connections.  On failure dst may hold
 * anything unless dst == src.  In place, results are written into src as
 * they arrive (the tensor holds partial values while the op runs), each
 * part saved first to a private backup; a failed op puts the input back
 * before pccl_op_wait returns its error (or in pccl_op_free).
 * tag tells concurrent ops apart: the n-th op with a tag on one peer meets
 * the n-th op with that tag on the others.  Does not block.  Thread-safe. */
pccl_result pccl_comm_all_reduce_start(pccl_comm *comm, const void *src, void *dst,
                                       size_t count, pccl_dtype dtype, pccl_op op,
                                       pccl_quant quant, uint64_t tag,
                                       pccl_op_handle **out);

/* pccl_op_wait blocks until the op ends or timeout_ms passes (<0: no limit;
 * the op itself still ends through failure detection, abort or close).  On
 * timeout it returns PCCL_ETIMEDOUT and the op continues; wait again or
 * abort.  Writes *info (may be NULL) on success.  Returns the op's result.
 * Any thread, one waiter at a time. */
pccl_result pccl_op_wait(pccl_op_handle *h, int32_t timeout_ms, pccl_reduce_info *info);

/* pccl_op_free releases a handle; if the op is still running it is aborted
 * and waited for first.  Not concurrently with pccl_op_wait on h. */
pccl_result pccl_op_free(pccl_op_handle *h);

/* pccl_comm_all_reduce is start + wait + free.  Blocks up to timeout_ms
 * (<0: no limit); on that timeout the ring is broken (PCCL_ETIMEDOUT). */
pccl_result pccl_comm_all_reduce(pccl_comm *comm, const void *src, void *dst,
                                 size_t count, pccl_dtype dtype, pccl_op op,
                                 pccl_quant quant, uint64_t tag, int32_t timeout_ms,
                                 pccl_reduce_info *info);

/* pccl_comm_publish makes len bytes at buf readable by authenticated peers
 * (pccl_comm_fetch) under key, read-only and without copying.  buf stays
 * the caller's and must stay valid and unchanged until pccl_comm_unpublish
 * returns.  PCCL_EBUSY if key is already published.  Does not block;
 * thread-safe. */
pccl_result pccl_comm_publish(pccl_comm *comm, uint64_t key, const void *buf, size_t len);

/* pccl_comm_unpublish withdraws key: transfers of it in flight are cut off
 * and waited for, so buf is the caller's alone once it returns.  Writes the
 * payload bytes served from it to *tx_bytes (may be NULL).  PCCL_ENOTFOUND
 * if key is not published.  Blocks only while in-flight sends stop;
 * thread-safe. */
pccl_result pccl_comm_unpublish(pccl_comm *comm, uint64_t key, uint64_t *tx_bytes);

/* pccl_comm_fetch copies bytes [offset, offset+len) of the buffer the peer
 * at addr ("host:port", its listen address) published under key into dst,
 * over one new authenticated connection.  Blocks until done, until no byte
 * moves for timeout_ms (<0: no limit; PCCL_ETIMEDOUT), or until
 * pccl_comm_close (PCCL_ECLOSED).  The peer's refusals come back as its
 * code (PCCL_ENOTFOUND, PCCL_EINVAL for a range outside the buffer,
 * PCCL_EBUSY).  *received (may be NULL) gets the bytes written to dst, a
 * prefix of the range, on failure too (unlike other out-parameters), so a
 * caller can fetch the rest elsewhere.  Thread-safe: run several at once. */
pccl_result pccl_comm_fetch(pccl_comm *comm, const char *addr, uint64_t key, uint64_t offset,
                            uint64_t len, void *dst, int32_t timeout_ms, uint64_t *received);

/* pccl_comm_link_stats writes the outbound ring link's counters as of the
 * last completed op: *busy_ns, the time during which frames waited for
 * the kernel to take them (the link to the successor was the limit), and
 * *bytes, the bytes written meanwhile; bytes / busy_ns is the link's
 * throughput.  Cumulative over the communicator's life.  Does not block;
 * thread-safe. */
pccl_result pccl_comm_link_stats(pccl_comm *comm, uint64_t *bytes, uint64_t *busy_ns);

/* ---- point-to-point send/recv (core/p2p.c) ------------------------------
 * A peer is named by a 32-bit peer number (the control plane's peer id)
 * and, for a sender, the "host:port" it listens on.  The n-th send with a
 * tag from A to B meets the n-th recv with that tag on B from A.  Frames
 * travel on K connections the sender opens on first use (HMAC handshake).
 * A handle keeps the comm's memory alive: pccl_comm_free closes the comm
 * (failing running ops with PCCL_ECLOSED) and the last pccl_p2p_free frees it. */
typedef struct pccl_p2p_handle pccl_p2p_handle;

/* pccl_comm_set_peer_id names this peer for point-to-point: run_token
 * (the same on every peer of the run) and its peer number (not
 * UINT32_MAX).  Needed before any send/recv or inbound p2p connection.
 * Setting other values (a rejoin) fails every p2p op with PCCL_EPEERLOST
 * and forgets lost peers.  Thread-safe. */
pccl_result pccl_comm_set_peer_id(pccl_comm *comm, uint64_t run_token, uint32_t peer_id);

/* pccl_comm_send_start sends len bytes at buf to peer_id, listening at
 * peer_addr, under tag, and writes a handle the caller owns.  buf is only
 * read and must stay valid and unchanged until the op ends.  The op
 * succeeds only once the receiver holds the whole message (its ack
 * arrived).  It fails with PCCL_ETIMEDOUT after timeout_ms (<0: never),
 * PCCL_EPEERLOST when the pair breaks, PCCL_EABORTED on pccl_comm_abort.
 * PCCL_EINVAL for peer_id == this peer.  Does not block; thread-safe. */
pccl_result pccl_comm_send_start(pccl_comm *comm, uint32_t peer_id, const char *peer_addr,
                                 const void *buf, size_t len, uint64_t tag, int32_t timeout_ms,
                                 pccl_p2p_handle **out);

/* pccl_comm_recv_start posts a receive of exactly len bytes from peer_id
 * under tag into buf (written in place, by offset, as slices arrive) and
 * writes a handle the caller owns.  A message of another size fails
 * both ends with PCCL_EINVAL (the receiver nacks it).  buf is unspecified after a failure.  Same deadlines and
 * failures as send.  Does not block; thread-safe. */
pccl_result pccl_comm_recv_start(pccl_comm *comm, uint32_t peer_id, void *buf, size_t len,
                                 uint64_t tag, int32_t timeout_ms, pccl_p2p_handle **out);

/* pccl_p2p_wait blocks until the op ends or timeout_ms passes (<0: no
 * limit; PCCL_ETIMEDOUT and the op goes on).  Returns the op's result;
 * *bytes (may be NULL) gets the message size on success.  Any thread. */
pccl_result pccl_p2p_wait(pccl_p2p_handle *h, int32_t timeout_ms, uint64_t *bytes);

/* pccl_p2p_free releases a handle; a running op is aborted first (its
 * pair is reset).  Not concurrently with pccl_p2p_wait on h. */
pccl_result pccl_p2p_free(pccl_p2p_handle *h);

/* pccl_comm_peer_lost tells the core the control plane lost peer_id: its
 * ops fail with PCCL_EPEERLOST now and later ones at once, and its
 * connections close.  Never blocks long; thread-safe. */
pccl_result pccl_comm_peer_lost(pccl_comm *comm, uint32_t peer_id);
/* ---- end of point-to-point ------------------------------------------------ */

/* pccl_comm_abort_ring is pccl_comm_abort for the ring alone: ring ops and
 * set_ring fail with PCCL_EABORTED, point-to-point ops go on.  Never
 * blocks; any thread. */
pccl_result pccl_comm_abort_ring(pccl_comm *comm);

/* pccl_comm_abort fails every op in flight (point-to-point too) and any
 * pccl_comm_set_ring in progress with PCCL_EABORTED and breaks the ring
 * (set_ring again to go on).  Never blocks; any thread, also while other calls block. */
pccl_result pccl_comm_abort(pccl_comm *comm);

/* pccl_comm_close stops the I/O thread and closes every socket; blocked
 * callers return PCCL_ECLOSED.  Idempotent; any thread. */
pccl_result pccl_comm_close(pccl_comm *comm);

/* pccl_comm_free closes comm if needed and frees it.  No call on comm may
 * be running or follow. */
pccl_result pccl_comm_free(pccl_comm *comm);


/* ---- Ring collectives besides the all-reduce (docs/collectives.md).
 * Each start call validates its arguments before any byte moves, writes a
 * handle the caller owns (wait with pccl_op_wait, release with
 * pccl_op_free), does not block and is thread-safe; buffers must stay
 * valid until the op is waited for.  tag and seq match ops across peers
 * as for the all-reduce (one seq counter per tag, shared by every kind of
 * op).  A failed op never modifies an input; output-only buffers hold
 * anything after a failure.  The blocking forms are start + wait + free
 * and break the ring when timeout_ms (<0: no limit) passes. */

/* pccl_comm_broadcast_start sends count elements of buf from rank root to
 * every rank's buf (root: read only, unchanged on failure; others: output
 * only, unspecified on failure).  Writes a handle the caller owns
 * (pccl_op_wait, pccl_op_free); buf stays valid until then.  Does not
 * block.  Thread-safe. */
pccl_result pccl_comm_broadcast_start(pccl_comm *comm, void *buf, size_t count,
                                      pccl_dtype dtype, uint32_t root, uint64_t tag,
                                      pccl_op_handle **out);

/* pccl_comm_broadcast is start + wait + free.  Blocks up to timeout_ms
 * (<0: no limit); on that timeout the ring is broken (PCCL_ETIMEDOUT). */
pccl_result pccl_comm_broadcast(pccl_comm *comm, void *buf, size_t count, pccl_dtype dtype,
                                uint32_t root, uint64_t tag, int32_t timeout_ms,
                                pccl_reduce_info *info);

/* pccl_comm_all_gather_start gathers count elements of src from every rank
 * into dst (world * count elements, rank order); src must not overlap dst
 * unless it is exactly dst's block for this rank.  src is never written;
 * dst is unspecified on failure.  Handle owned by the caller as above;
 * buffers valid until it is waited for.  Does not block.  Thread-safe. */
pccl_result pccl_comm_all_gather_start(pccl_comm *comm, const void *src, void *dst,
                                       size_t count, pccl_dtype dtype, uint64_t tag,
                                       pccl_op_handle **out);

/* pccl_comm_all_gather is start + wait + free.  Blocks up to timeout_ms (<0: no
 * limit); on that timeout the ring is broken (PCCL_ETIMEDOUT). */
pccl_result pccl_comm_all_gather(pccl_comm *comm, const void *src, void *dst, size_t count,
                                 pccl_dtype dtype, uint64_t tag, int32_t timeout_ms,
                                 pccl_reduce_info *info);

/* pccl_comm_reduce_scatter_start reduces src (count = world * m elements)
 * over every rank and writes chunk rank (m elements) to dst, which must
 * not overlap src.  Ops, dtypes and quantization as for the all-reduce
 * (AVG divides once); deterministic.  src is never written; dst is
 * unspecified on failure.  Handle owned by the caller; buffers valid until
 * it is waited for.  Does not block.  Thread-safe. */
pccl_result pccl_comm_reduce_scatter_start(pccl_comm *comm, const void *src, void *dst,
                                           size_t count, pccl_dtype dtype, pccl_op op,
                                           pccl_quant quant, uint64_t tag,
                                           pccl_op_handle **out);

/* pccl_comm_reduce_scatter is start + wait + free.  Blocks up to timeout_ms (<0: no
 * limit); on that timeout the ring is broken (PCCL_ETIMEDOUT). */
pccl_result pccl_comm_reduce_scatter(pccl_comm *comm, const void *src, void *dst, size_t count,
                                     pccl_dtype dtype, pccl_op op, pccl_quant quant,
                                     uint64_t tag, int32_t timeout_ms, pccl_reduce_info *info);

/* pccl_comm_barrier_start starts a barrier: its wait returns on a rank
 * only once every rank of the ring has started it.  Handle owned by the
 * caller (pccl_op_wait, pccl_op_free).  Does not block.  Thread-safe. */
pccl_result pccl_comm_barrier_start(pccl_comm *comm, uint64_t tag, pccl_op_handle **out);

/* pccl_comm_barrier is start + wait + free.  Blocks up to timeout_ms (<0: no
 * limit); on that timeout the ring is broken (PCCL_ETIMEDOUT). */
pccl_result pccl_comm_barrier(pccl_comm *comm, uint64_t tag, int32_t timeout_ms,
                              pccl_reduce_info *info);

#ifdef __cplusplus
}
#endif

#endif /* PCCL_H */
