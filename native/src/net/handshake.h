/*
 * handshake.h - connection handshake codec with HMAC-SHA256 mutual auth.
 *
 * The connecting side is the client.  Three messages, fixed size, LE:
 *
 *   1. server -> client  SERVER_HELLO (PCCL__HS_SERVER_HELLO_SIZE)
 *        u32 magic "PCHS" | u16 version | u16 flags (bit 0: auth required)
 *        | nonce_s[32]
 *   2. client -> server  CLIENT_HELLO (PCCL__HS_CLIENT_HELLO_SIZE)
 *        u32 magic | u16 version | u16 purpose | u64 epoch | u32 from_rank
 *        | u32 to_rank | u32 world | u32 conn_index | u32 nconns
 *        | u32 slice_bytes | u64 reserved(0) | nonce_c[32] | mac_c[32]
 *      mac_c = HMAC-SHA256(secret, "pccl-client" | nonce_s | every byte of
 *      CLIENT_HELLO before mac_c)   (all zero without a secret)
 *   3. server -> client  SERVER_ACK (PCCL__HS_SERVER_ACK_SIZE)
 *        u32 magic | u16 version | u16 status (0 ok, else a pccl_result)
 *        | mac_s[32]
 *      mac_s = HMAC-SHA256(secret, "pccl-server" | nonce_c | nonce_s | status)
 *
 * The secret never crosses the wire; nonces are fresh per connection, so a
 * recorded CLIENT_HELLO is useless against a new SERVER_HELLO.  A client
 * with a secret refuses a server that does not require auth (no downgrade);
 * a server with a secret refuses a client whose mac does not verify.
 * MACs are compared in constant time.
 */
#ifndef PCCL_NET_HANDSHAKE_H
#define PCCL_NET_HANDSHAKE_H

#include <stddef.h>
#include <stdint.h>

#include "pccl.h"

enum pccl__hs_consts {
    PCCL__HS_MAGIC = 0x53484350, /* "PCHS" */
    PCCL__HS_VERSION = 1,
    PCCL__HS_NONCE_SIZE = 32,
    PCCL__HS_MAC_SIZE = 32,
    PCCL__HS_SERVER_HELLO_SIZE = 40,
    PCCL__HS_CLIENT_HELLO_SIZE = 112,
    PCCL__HS_SERVER_ACK_SIZE = 40
};

/* What a connection is for. */
enum pccl__hs_purpose {
    PCCL__PURPOSE_RING = 1,  /* ring link: from_rank -> to_rank */
    PCCL__PURPOSE_XFER = 2,  /* shared-state transfer (core/xfer.c) */
    PCCL__PURPOSE_PROBE = 3, /* bandwidth probe (reserved) */
    PCCL__PURPOSE_P2P = 4    /* point-to-point (core/p2p.c): epoch = run token, from_rank /
                              * to_rank = sender's / receiver's peer number, world =
                              * UINT32_MAX, conn_index of nconns */
};

typedef struct pccl__hs_client_hello {
    uint16_t purpose;
    uint64_t epoch;
    uint32_t from_rank;
    uint32_t to_rank;
    uint32_t world;
    uint32_t conn_index;
    uint32_t nconns;
    uint32_t slice_bytes;
    uint8_t nonce_c[PCCL__HS_NONCE_SIZE];
} pccl__hs_client_hello;

/* pccl__hs_random_nonce fills out with PCCL__HS_NONCE_SIZE random bytes
 * (OpenSSL RAND_bytes); PCCL_ESYSERR-style error if the RNG fails. */
pccl_result pccl__hs_random_nonce(uint8_t *out);

/* pccl__hs_thread_done frees this thread's OpenSSL state (nonce RNG,
 * HMAC contexts).  A detached thread that ran handshakes calls it before
 * it reports itself finished, so nothing of it outlives the owner's stop. */
void pccl__hs_thread_done(void);

/* SERVER_HELLO */
void pccl__hs_server_hello_encode(const uint8_t *nonce_s, int auth_required, uint8_t *out);
/* PCCL_EPROTO on short buffer, bad magic/version, unknown flag bits. */
pccl_result pccl__hs_server_hello_decode(const uint8_t *buf, size_t len,
                                         uint8_t *nonce_s, int *auth_required);

/* CLIENT_HELLO: encode computes mac_c when secret_len > 0 (zeros otherwise).
 * PCCL_EAUTH when the client has a secret but the server does not require
 * auth, or the server requires it and the client has none. */
pccl_result pccl__hs_client_hello_encode(const pccl__hs_client_hello *h,
                                         const uint8_t *nonce_s, int server_auth_required,
                                         const uint8_t *secret, size_t secret_len,
                                         uint8_t *out);
/* decode + verify: PCCL_EPROTO on short buffer, bad magic/version/purpose,
 * reserved != 0, nconns outside 1..PCCL_MAX_CONNECTIONS, conn_index >=
 * nconns, world == 0, ranks >= world; PCCL_EAUTH when the server has a
 * secret and mac_c does not verify.  *out written only on success. */
pccl_result pccl__hs_client_hello_decode(const uint8_t *buf, size_t len,
                                         const uint8_t *nonce_s,
                                         const uint8_t *secret, size_t secret_len,
                                         pccl__hs_client_hello *out);

/* SERVER_ACK */
void pccl__hs_server_ack_encode(uint16_t status, const uint8_t *nonce_c,
                                const uint8_t *nonce_s, const uint8_t *secret,
                                size_t secret_len, uint8_t *out);
/* PCCL_EPROTO on short/bad message, PCCL_EAUTH when the client has a secret
 * and mac_s does not verify; on success *status is the server's verdict. */
pccl_result pccl__hs_server_ack_decode(const uint8_t *buf, size_t len,
                                       const uint8_t *nonce_c, const uint8_t *nonce_s,
                                       const uint8_t *secret, size_t secret_len,
                                       uint16_t *status);

/* pccl__hs_hmac_sha256 writes HMAC-SHA256(key, msg) (PCCL__HS_MAC_SIZE
 * bytes) into out; the primitive behind mac_c and mac_s, exposed for the
 * known-answer test.  PCCL_EINVAL on bad arguments, PCCL_ESYSERR | EIO if
 * libcrypto fails.  Pure, any thread. */
pccl_result pccl__hs_hmac_sha256(const uint8_t *key, size_t key_len,
                                 const uint8_t *msg, size_t msg_len, uint8_t *out);

#endif
