/*
 * handshake.c - the three fixed-size handshake messages and their MACs.
 *
 * The server speaks first with a fresh nonce and says whether it demands
 * authentication.  The client answers with what the connection is for
 * (purpose, epoch, ranks, which of the K connections) and its own nonce,
 * and, when it holds the shared secret, an HMAC-SHA256 over a label, the
 * server's nonce and every byte of its hello before the MAC.  The server
 * answers with a status and an HMAC over both nonces and that status, so
 * the client knows the verdict came from someone holding the secret.
 *
 * Why each piece is there:
 *  - the labels "pccl-client" / "pccl-server" keep a MAC made for one
 *    direction from being accepted in the other;
 *  - the server nonce in mac_c makes a recorded CLIENT_HELLO worthless
 *    against any later SERVER_HELLO (no replay);
 *  - a client with a secret refuses a server that does not ask for one,
 *    so an attacker cannot downgrade the link to unauthenticated;
 *  - MACs are compared with CRYPTO_memcmp (constant time).
 *
 * Decoders check size, magic and version first (PCCL_EPROTO), then the
 * MAC when a secret is configured (PCCL_EAUTH), and only then the fields
 * of an authenticated message (PCCL_EPROTO).  Unauthenticated bytes are
 * thus never interpreted beyond the header.  All functions are pure and
 * thread-safe; HMAC and randomness come from OpenSSL libcrypto.
 */
#include <errno.h>
#include <limits.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include "net/frame.h"
#include "net/handshake.h"

/* Byte offsets of the three messages; see the layout in handshake.h. */
enum hs_offsets {
    SH_MAGIC = 0,
    SH_VERSION = 4,
    SH_FLAGS = 6,
    SH_NONCE = 8,

    CH_MAGIC = 0,
    CH_VERSION = 4,
    CH_PURPOSE = 6,
    CH_EPOCH = 8,
    CH_FROM = 16,
    CH_TO = 20,
    CH_WORLD = 24,
    CH_CONN_INDEX = 28,
    CH_NCONNS = 32,
    CH_SLICE_BYTES = 36,
    CH_RESERVED = 40,
    CH_NONCE = 48,
    CH_MAC = 80,

    SA_MAGIC = 0,
    SA_VERSION = 4,
    SA_STATUS = 6,
    SA_MAC = 8
};

enum hs_flags {
    FLAG_AUTH_REQUIRED = 1
};

static const char client_label[] = "pccl-client";
static const char server_label[] = "pccl-server";
enum hs_label_sizes {
    LABEL_SIZE = 11 /* both labels, without the NUL */
};

pccl_result
pccl__hs_hmac_sha256(const uint8_t *key, size_t key_len, const uint8_t *msg, size_t msg_len,
                     uint8_t *out)
{
    static const uint8_t empty = 0;
    uint8_t mac[EVP_MAX_MD_SIZE];
    unsigned int mac_len = 0;

    if ((key == NULL && key_len > 0) || (msg == NULL && msg_len > 0) || out == NULL ||
        key_len > INT_MAX) {
        return PCCL_EINVAL;
    }
    /* Some libcrypto versions refuse a NULL key even when its length is 0. */
    if (key == NULL) {
        key = &empty;
    }
    if (msg == NULL) {
        msg = &empty;
    }
    if (HMAC(EVP_sha256(), key, (int)key_len, msg, msg_len, mac, &mac_len) == NULL ||
        mac_len != PCCL__HS_MAC_SIZE) {
        return PCCL_ESYSERR | EIO;
    }
    memcpy(out, mac, PCCL__HS_MAC_SIZE);
    return PCCL_OK;
}

void
pccl__hs_thread_done(void)
{
    OPENSSL_thread_stop();
}

pccl_result
pccl__hs_random_nonce(uint8_t *out)
{
    uint8_t nonce[PCCL__HS_NONCE_SIZE];

    if (out == NULL) {
        return PCCL_EINVAL;
    }
    if (RAND_bytes(nonce, (int)sizeof(nonce)) != 1) {
        return PCCL_ESYSERR | EIO;
    }
    memcpy(out, nonce, sizeof(nonce));
    return PCCL_OK;
}

/* A usable secret: none at all, or 1..PCCL_MAX_SECRET_BYTES real bytes. */
static int
secret_valid(const uint8_t *secret, size_t secret_len)
{
    return secret_len <= PCCL_MAX_SECRET_BYTES && (secret_len == 0 || secret != NULL);
}

/* mac_c over "pccl-client" | nonce_s | the hello up to (not including) mac_c. */
static pccl_result
client_mac(const uint8_t *secret, size_t secret_len, const uint8_t *nonce_s,
           const uint8_t *hello, uint8_t *mac)
{
    uint8_t msg[LABEL_SIZE + PCCL__HS_NONCE_SIZE + CH_MAC];

    memcpy(msg, client_label, LABEL_SIZE);
    memcpy(msg + LABEL_SIZE, nonce_s, PCCL__HS_NONCE_SIZE);
    memcpy(msg + LABEL_SIZE + PCCL__HS_NONCE_SIZE, hello, CH_MAC);
    return pccl__hs_hmac_sha256(secret, secret_len, msg, sizeof(msg), mac);
}

/* mac_s over "pccl-server" | nonce_c | nonce_s | status (u16 LE). */
static pccl_result
server_mac(const uint8_t *secret, size_t secret_len, const uint8_t *nonce_c,
           const uint8_t *nonce_s, uint16_t status, uint8_t *mac)
{
    uint8_t msg[LABEL_SIZE + 2 * PCCL__HS_NONCE_SIZE + 2];

    memcpy(msg, server_label, LABEL_SIZE);
    memcpy(msg + LABEL_SIZE, nonce_c, PCCL__HS_NONCE_SIZE);
    memcpy(msg + LABEL_SIZE + PCCL__HS_NONCE_SIZE, nonce_s, PCCL__HS_NONCE_SIZE);
    pccl__put_u16(msg + LABEL_SIZE + 2 * PCCL__HS_NONCE_SIZE, status);
    return pccl__hs_hmac_sha256(secret, secret_len, msg, sizeof(msg), mac);
}

/* The field rules of a CLIENT_HELLO, shared by encoder and decoder. */
static int
client_fields_valid(const pccl__hs_client_hello *h)
{
    if (h->purpose != PCCL__PURPOSE_RING && h->purpose != PCCL__PURPOSE_XFER &&
        h->purpose != PCCL__PURPOSE_PROBE && h->purpose != PCCL__PURPOSE_P2P) {
        return 0;
    }
    if (h->nconns < 1 || h->nconns > PCCL_MAX_CONNECTIONS || h->conn_index >= h->nconns) {
        return 0;
    }
    if (h->world == 0 || h->from_rank >= h->world || h->to_rank >= h->world) {
        return 0;
    }
    return 1;
}

void
pccl__hs_server_hello_encode(const uint8_t *nonce_s, int auth_required, uint8_t *out)
{
    pccl__put_u32(out + SH_MAGIC, PCCL__HS_MAGIC);
    pccl__put_u16(out + SH_VERSION, PCCL__HS_VERSION);
    pccl__put_u16(out + SH_FLAGS, auth_required ? FLAG_AUTH_REQUIRED : 0);
    memcpy(out + SH_NONCE, nonce_s, PCCL__HS_NONCE_SIZE);
}

pccl_result
pccl__hs_server_hello_decode(const uint8_t *buf, size_t len, uint8_t *nonce_s,
                             int *auth_required)
{
    uint16_t flags;

    if (len < PCCL__HS_SERVER_HELLO_SIZE) {
        return PCCL_EPROTO;
    }
    if (buf == NULL || nonce_s == NULL || auth_required == NULL) {
        return PCCL_EINVAL;
    }
    flags = pccl__get_u16(buf + SH_FLAGS);
    if (pccl__get_u32(buf + SH_MAGIC) != PCCL__HS_MAGIC ||
        pccl__get_u16(buf + SH_VERSION) != PCCL__HS_VERSION ||
        (flags & ~(unsigned)FLAG_AUTH_REQUIRED) != 0) {
        return PCCL_EPROTO;
    }
    memcpy(nonce_s, buf + SH_NONCE, PCCL__HS_NONCE_SIZE);
    *auth_required = (flags & FLAG_AUTH_REQUIRED) != 0;
    return PCCL_OK;
}

pccl_result
pccl__hs_client_hello_encode(const pccl__hs_client_hello *h, const uint8_t *nonce_s,
                             int server_auth_required, const uint8_t *secret,
                             size_t secret_len, uint8_t *out)
{
    uint8_t msg[PCCL__HS_CLIENT_HELLO_SIZE];
    pccl_result rv;

    if (h == NULL || out == NULL || !secret_valid(secret, secret_len) ||
        (secret_len > 0 && nonce_s == NULL)) {
        return PCCL_EINVAL;
    }
    /* Both sides must agree on auth; a client with a secret never lets a
     * server talk it out of authenticating (downgrade). */
    if ((secret_len > 0) != (server_auth_required != 0)) {
        return PCCL_EAUTH;
    }
    /* Refuse to send what the peer's decoder would refuse anyway. */
    if (!client_fields_valid(h)) {
        return PCCL_EINVAL;
    }

    pccl__put_u32(msg + CH_MAGIC, PCCL__HS_MAGIC);
    pccl__put_u16(msg + CH_VERSION, PCCL__HS_VERSION);
    pccl__put_u16(msg + CH_PURPOSE, h->purpose);
    pccl__put_u64(msg + CH_EPOCH, h->epoch);
    pccl__put_u32(msg + CH_FROM, h->from_rank);
    pccl__put_u32(msg + CH_TO, h->to_rank);
    pccl__put_u32(msg + CH_WORLD, h->world);
    pccl__put_u32(msg + CH_CONN_INDEX, h->conn_index);
    pccl__put_u32(msg + CH_NCONNS, h->nconns);
    pccl__put_u32(msg + CH_SLICE_BYTES, h->slice_bytes);
    pccl__put_u64(msg + CH_RESERVED, 0);
    memcpy(msg + CH_NONCE, h->nonce_c, PCCL__HS_NONCE_SIZE);
    memset(msg + CH_MAC, 0, PCCL__HS_MAC_SIZE);
    if (secret_len > 0 &&
        (rv = client_mac(secret, secret_len, nonce_s, msg, msg + CH_MAC)) != PCCL_OK) {
        return rv;
    }
    memcpy(out, msg, sizeof(msg));
    return PCCL_OK;
}

pccl_result
pccl__hs_client_hello_decode(const uint8_t *buf, size_t len, const uint8_t *nonce_s,
                             const uint8_t *secret, size_t secret_len,
                             pccl__hs_client_hello *out)
{
    pccl__hs_client_hello h;
    uint8_t want[PCCL__HS_MAC_SIZE];
    pccl_result rv;

    if (len < PCCL__HS_CLIENT_HELLO_SIZE) {
        return PCCL_EPROTO;
    }
    if (buf == NULL || out == NULL || !secret_valid(secret, secret_len) ||
        (secret_len > 0 && nonce_s == NULL)) {
        return PCCL_EINVAL;
    }
    if (pccl__get_u32(buf + CH_MAGIC) != PCCL__HS_MAGIC ||
        pccl__get_u16(buf + CH_VERSION) != PCCL__HS_VERSION) {
        return PCCL_EPROTO;
    }
    if (secret_len > 0) {
        if ((rv = client_mac(secret, secret_len, nonce_s, buf, want)) != PCCL_OK) {
            return rv;
        }
        if (CRYPTO_memcmp(want, buf + CH_MAC, PCCL__HS_MAC_SIZE) != 0) {
            return PCCL_EAUTH;
        }
    }

    h.purpose = pccl__get_u16(buf + CH_PURPOSE);
    h.epoch = pccl__get_u64(buf + CH_EPOCH);
    h.from_rank = pccl__get_u32(buf + CH_FROM);
    h.to_rank = pccl__get_u32(buf + CH_TO);
    h.world = pccl__get_u32(buf + CH_WORLD);
    h.conn_index = pccl__get_u32(buf + CH_CONN_INDEX);
    h.nconns = pccl__get_u32(buf + CH_NCONNS);
    h.slice_bytes = pccl__get_u32(buf + CH_SLICE_BYTES);
    memcpy(h.nonce_c, buf + CH_NONCE, PCCL__HS_NONCE_SIZE);
    if (pccl__get_u64(buf + CH_RESERVED) != 0 || !client_fields_valid(&h)) {
        return PCCL_EPROTO;
    }
    *out = h;
    return PCCL_OK;
}

void
pccl__hs_server_ack_encode(uint16_t status, const uint8_t *nonce_c, const uint8_t *nonce_s,
                           const uint8_t *secret, size_t secret_len, uint8_t *out)
{
    pccl__put_u32(out + SA_MAGIC, PCCL__HS_MAGIC);
    pccl__put_u16(out + SA_VERSION, PCCL__HS_VERSION);
    pccl__put_u16(out + SA_STATUS, status);
    memset(out + SA_MAC, 0, PCCL__HS_MAC_SIZE);
    if (secret_len > 0 && secret_valid(secret, secret_len) && nonce_c != NULL &&
        nonce_s != NULL) {
        /* This function cannot report errors; on failure the MAC stays
         * zero and the client refuses it, which is the safe outcome. */
        if (server_mac(secret, secret_len, nonce_c, nonce_s, status, out + SA_MAC) !=
            PCCL_OK) {
            memset(out + SA_MAC, 0, PCCL__HS_MAC_SIZE);
        }
    }
}

pccl_result
pccl__hs_server_ack_decode(const uint8_t *buf, size_t len, const uint8_t *nonce_c,
                           const uint8_t *nonce_s, const uint8_t *secret, size_t secret_len,
                           uint16_t *status)
{
    uint8_t want[PCCL__HS_MAC_SIZE];
    uint16_t st;
    pccl_result rv;

    if (len < PCCL__HS_SERVER_ACK_SIZE) {
        return PCCL_EPROTO;
    }
    if (buf == NULL || status == NULL || !secret_valid(secret, secret_len) ||
        (secret_len > 0 && (nonce_c == NULL || nonce_s == NULL))) {
        return PCCL_EINVAL;
    }
    if (pccl__get_u32(buf + SA_MAGIC) != PCCL__HS_MAGIC ||
        pccl__get_u16(buf + SA_VERSION) != PCCL__HS_VERSION) {
        return PCCL_EPROTO;
    }
    st = pccl__get_u16(buf + SA_STATUS);
    if (secret_len > 0) {
        if ((rv = server_mac(secret, secret_len, nonce_c, nonce_s, st, want)) != PCCL_OK) {
            return rv;
        }
        if (CRYPTO_memcmp(want, buf + SA_MAC, PCCL__HS_MAC_SIZE) != 0) {
            return PCCL_EAUTH;
        }
    }
    *status = st;
    return PCCL_OK;
}
