/*
 * handshake_test.c - the handshake codec and its HMAC-SHA256 mutual auth.
 *
 * Known answers first (RFC 4231 through the HMAC helper, and a complete
 * CLIENT_HELLO / SERVER_ACK whose bytes and MACs were computed outside pccl
 * with Python's hmac module), then the protocol properties: the happy path
 * with and without a secret, a wrong secret, every tampered byte, a replay
 * against a fresh server nonce, downgrade in both directions, a forged
 * server ack, field validation, truncation, and random garbage.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "net/frame.h"
#include "net/handshake.h"
#include "testutil.h"

TEST_RNG(xorshift64s, 0x243f6a8885a308d3ull)

static const uint8_t secret[] = "pccl test secret";
static const size_t secret_len = sizeof(secret) - 1;
static const uint8_t other_secret[] = "pccl test secreT";

static void
unhex(const char *s, uint8_t *out, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        CHECK(sscanf(s + 2 * i, "%2x", &v) == 1);
        out[i] = (uint8_t)v;
    }
}

static pccl__hs_client_hello
sample_hello(void)
{
    pccl__hs_client_hello h;

    memset(&h, 0, sizeof(h));
    h.purpose = PCCL__PURPOSE_RING;
    h.epoch = 0x0102030405060708ull;
    h.from_rank = 1;
    h.to_rank = 2;
    h.world = 3;
    h.conn_index = 1;
    h.nconns = 4;
    h.slice_bytes = 262144;
    for (int i = 0; i < PCCL__HS_NONCE_SIZE; i++) {
        h.nonce_c[i] = (uint8_t)i;
    }
    return h;
}

static int
same_hello(const pccl__hs_client_hello *a, const pccl__hs_client_hello *b)
{
    return a->purpose == b->purpose && a->epoch == b->epoch &&
           a->from_rank == b->from_rank && a->to_rank == b->to_rank &&
           a->world == b->world && a->conn_index == b->conn_index &&
           a->nconns == b->nconns && a->slice_bytes == b->slice_bytes &&
           memcmp(a->nonce_c, b->nonce_c, PCCL__HS_NONCE_SIZE) == 0;
}

/* Decode a client hello from an exact-size heap copy; *out must stay
 * untouched on failure. */
static pccl_result
decode_hello(const uint8_t *buf, size_t len, const uint8_t *nonce_s, const uint8_t *key,
             size_t key_len, pccl__hs_client_hello *out)
{
    uint8_t *copy = malloc(len ? len : 1);
    pccl__hs_client_hello h, sentinel;
    pccl_result rv;

    CHECK(copy != NULL);
    if (len) {
        memcpy(copy, buf, len);
    }
    memset(&sentinel, 0xa5, sizeof(sentinel));
    h = sentinel;
    rv = pccl__hs_client_hello_decode(copy, len, nonce_s, key, key_len, &h);
    free(copy);
    if (rv != PCCL_OK) {
        T(memcmp(&h, &sentinel, sizeof(h)) == 0);
    } else if (out != NULL) {
        *out = h;
    }
    return rv;
}

static pccl_result
decode_ack(const uint8_t *buf, size_t len, const uint8_t *nonce_c, const uint8_t *nonce_s,
           const uint8_t *key, size_t key_len, uint16_t *status)
{
    uint8_t *copy = malloc(len ? len : 1);
    uint16_t st = 0xdead;
    pccl_result rv;

    CHECK(copy != NULL);
    if (len) {
        memcpy(copy, buf, len);
    }
    rv = pccl__hs_server_ack_decode(copy, len, nonce_c, nonce_s, key, key_len, &st);
    free(copy);
    if (rv != PCCL_OK) {
        T(st == 0xdead);
    } else if (status != NULL) {
        *status = st;
    }
    return rv;
}

static pccl_result
decode_server_hello(const uint8_t *buf, size_t len, uint8_t *nonce_s, int *auth)
{
    uint8_t *copy = malloc(len ? len : 1);
    uint8_t n[PCCL__HS_NONCE_SIZE];
    int a = -7;
    pccl_result rv;

    CHECK(copy != NULL);
    if (len) {
        memcpy(copy, buf, len);
    }
    memset(n, 0xa5, sizeof(n));
    rv = pccl__hs_server_hello_decode(copy, len, n, &a);
    free(copy);
    if (rv != PCCL_OK) {
        T(a == -7);
    } else {
        if (nonce_s != NULL) {
            memcpy(nonce_s, n, sizeof(n));
        }
        if (auth != NULL) {
            *auth = a;
        }
    }
    return rv;
}

/* Recompute mac_c of an edited hello, as a peer holding key would. */
static void
remac_hello(uint8_t *hello, const uint8_t *nonce_s, const uint8_t *key, size_t key_len)
{
    uint8_t msg[11 + PCCL__HS_NONCE_SIZE + 80];

    memcpy(msg, "pccl-client", 11);
    memcpy(msg + 11, nonce_s, PCCL__HS_NONCE_SIZE);
    memcpy(msg + 11 + PCCL__HS_NONCE_SIZE, hello, 80);
    CHECK_OK(pccl__hs_hmac_sha256(key, key_len, msg, sizeof(msg), hello + 80));
}

static void
test_hmac_kat(void)
{
    uint8_t key1[20], mac[PCCL__HS_MAC_SIZE], want[PCCL__HS_MAC_SIZE];

    /* RFC 4231 test case 1 */
    memset(key1, 0x0b, sizeof(key1));
    CHECK_OK(pccl__hs_hmac_sha256(key1, sizeof(key1), (const uint8_t *)"Hi There", 8, mac));
    unhex("b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7", want, 32);
    T(memcmp(mac, want, 32) == 0);
    /* RFC 4231 test case 2 */
    CHECK_OK(pccl__hs_hmac_sha256((const uint8_t *)"Jefe", 4,
                                  (const uint8_t *)"what do ya want for nothing?", 28, mac));
    unhex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843", want, 32);
    T(memcmp(mac, want, 32) == 0);
    T_RV(pccl__hs_hmac_sha256(NULL, 3, (const uint8_t *)"x", 1, mac), PCCL_EINVAL);
    T_RV(pccl__hs_hmac_sha256(key1, 1, NULL, 1, mac), PCCL_EINVAL);
}

/* The whole CLIENT_HELLO and SERVER_ACK against bytes computed with
 * Python: struct.pack('<IHHQIIIIIIQ', ...) + nonce_c, hmac.new(...). */
static void
test_message_kat(void)
{
    static const char hello_hex[] =
        "50434853" "0100" "0100" "0807060504030201" "01000000" "02000000"
        "03000000" "01000000" "04000000" "00000400" "0000000000000000"
        "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
        "6dac0514e993699f4a7d52d4fd22389d6483ca28826187b7e4fd07e5c59947e3";
    static const char ack_mac_hex[] =
        "0db58abbdf6783402c54e8ed7630e315b2a8a083be68952ebd72f835125be502";
    pccl__hs_client_hello h = sample_hello(), got;
    uint8_t nonce_s[PCCL__HS_NONCE_SIZE], want[PCCL__HS_CLIENT_HELLO_SIZE];
    uint8_t out[PCCL__HS_CLIENT_HELLO_SIZE], ack[PCCL__HS_SERVER_ACK_SIZE];
    uint16_t status = 99;

    for (int i = 0; i < PCCL__HS_NONCE_SIZE; i++) {
        nonce_s[i] = (uint8_t)(100 + i);
    }
    unhex(hello_hex, want, sizeof(want));
    CHECK_OK(pccl__hs_client_hello_encode(&h, nonce_s, 1, secret, secret_len, out));
    T(memcmp(out, want, sizeof(want)) == 0);
    T_RV(decode_hello(want, sizeof(want), nonce_s, secret, secret_len, &got), PCCL_OK);
    T(same_hello(&h, &got));

    pccl__hs_server_ack_encode(0, h.nonce_c, nonce_s, secret, secret_len, ack);
    T(pccl__get_u32(ack) == PCCL__HS_MAGIC && pccl__get_u16(ack + 4) == PCCL__HS_VERSION &&
      pccl__get_u16(ack + 6) == 0);
    unhex(ack_mac_hex, want, 32);
    T(memcmp(ack + 8, want, 32) == 0);
    T_RV(decode_ack(ack, sizeof(ack), h.nonce_c, nonce_s, secret, secret_len, &status),
         PCCL_OK);
    T(status == 0);
}

/* One full handshake between a client and a server with the given secrets;
 * returns the first failure, or PCCL_OK. */
static pccl_result
run_handshake(const uint8_t *client_key, size_t client_key_len, const uint8_t *server_key,
              size_t server_key_len, uint16_t verdict, uint16_t *status_out)
{
    uint8_t nonce_s[PCCL__HS_NONCE_SIZE], got_nonce_s[PCCL__HS_NONCE_SIZE];
    uint8_t sh[PCCL__HS_SERVER_HELLO_SIZE], ch[PCCL__HS_CLIENT_HELLO_SIZE];
    uint8_t ack[PCCL__HS_SERVER_ACK_SIZE];
    pccl__hs_client_hello h = sample_hello(), srv;
    int auth = -1;
    uint16_t status;
    pccl_result rv;

    /* server */
    CHECK_OK(pccl__hs_random_nonce(nonce_s));
    pccl__hs_server_hello_encode(nonce_s, server_key_len > 0, sh);
    /* client */
    T_RV(decode_server_hello(sh, sizeof(sh), got_nonce_s, &auth), PCCL_OK);
    T(memcmp(got_nonce_s, nonce_s, sizeof(nonce_s)) == 0);
    T(auth == (server_key_len > 0));
    CHECK_OK(pccl__hs_random_nonce(h.nonce_c));
    if ((rv = pccl__hs_client_hello_encode(&h, got_nonce_s, auth, client_key, client_key_len,
                                           ch)) != PCCL_OK) {
        return rv;
    }
    if (client_key_len == 0) {
        for (int i = 80; i < PCCL__HS_CLIENT_HELLO_SIZE; i++) {
            T(ch[i] == 0);
        }
    }
    /* server */
    if ((rv = decode_hello(ch, sizeof(ch), nonce_s, server_key, server_key_len, &srv)) !=
        PCCL_OK) {
        return rv;
    }
    T(same_hello(&h, &srv));
    pccl__hs_server_ack_encode(verdict, srv.nonce_c, nonce_s, server_key, server_key_len, ack);
    if (server_key_len == 0) {
        for (int i = 8; i < PCCL__HS_SERVER_ACK_SIZE; i++) {
            T(ack[i] == 0);
        }
    }
    /* client */
    if ((rv = decode_ack(ack, sizeof(ack), h.nonce_c, got_nonce_s, client_key, client_key_len,
                         &status)) != PCCL_OK) {
        return rv;
    }
    *status_out = status;
    return PCCL_OK;
}

static void
test_paths(void)
{
    uint16_t status = 1234;
    static const uint8_t one_byte[1] = {0};
    static uint8_t big[PCCL_MAX_SECRET_BYTES + 1];

    T_RV(run_handshake(NULL, 0, NULL, 0, 0, &status), PCCL_OK);
    T(status == 0);
    T_RV(run_handshake(secret, secret_len, secret, secret_len, 0, &status), PCCL_OK);
    T(status == 0);
    /* a refusal still arrives authenticated */
    T_RV(run_handshake(secret, secret_len, secret, secret_len, PCCL_EPROTO, &status), PCCL_OK);
    T(status == PCCL_EPROTO);
    T_RV(run_handshake(one_byte, 1, one_byte, 1, 0, &status), PCCL_OK);
    memset(big, 0x42, sizeof(big));
    T_RV(run_handshake(big, PCCL_MAX_SECRET_BYTES, big, PCCL_MAX_SECRET_BYTES, 0, &status),
         PCCL_OK);
    T_RV(run_handshake(big, PCCL_MAX_SECRET_BYTES + 1, big, PCCL_MAX_SECRET_BYTES, 0, &status),
         PCCL_EINVAL);
    T_RV(run_handshake(big, PCCL_MAX_SECRET_BYTES, big, PCCL_MAX_SECRET_BYTES + 1, 0, &status),
         PCCL_EINVAL);

    /* wrong secret: the server refuses */
    T_RV(run_handshake(other_secret, secret_len, secret, secret_len, 0, &status), PCCL_EAUTH);
    T_RV(run_handshake(secret, secret_len - 1, secret, secret_len, 0, &status), PCCL_EAUTH);
    /* downgrade: client with secret, server without -> client refuses */
    T_RV(run_handshake(secret, secret_len, NULL, 0, 0, &status), PCCL_EAUTH);
    /* server demands auth, client has no secret -> client refuses */
    T_RV(run_handshake(NULL, 0, secret, secret_len, 0, &status), PCCL_EAUTH);
}

static void
test_server_hello(void)
{
    uint8_t nonce[PCCL__HS_NONCE_SIZE], sh[PCCL__HS_SERVER_HELLO_SIZE], got[PCCL__HS_NONCE_SIZE];
    int auth = -1;

    for (int i = 0; i < PCCL__HS_NONCE_SIZE; i++) {
        nonce[i] = (uint8_t)(0xf0 ^ i);
    }
    pccl__hs_server_hello_encode(nonce, 1, sh);
    T(pccl__get_u32(sh) == PCCL__HS_MAGIC);
    T(sh[0] == 'P' && sh[1] == 'C' && sh[2] == 'H' && sh[3] == 'S');
    T(pccl__get_u16(sh + 4) == PCCL__HS_VERSION && pccl__get_u16(sh + 6) == 1);
    T(memcmp(sh + 8, nonce, sizeof(nonce)) == 0);
    T_RV(decode_server_hello(sh, sizeof(sh), got, &auth), PCCL_OK);
    T(auth == 1 && memcmp(got, nonce, sizeof(nonce)) == 0);
    pccl__hs_server_hello_encode(nonce, 0, sh);
    T_RV(decode_server_hello(sh, sizeof(sh), got, &auth), PCCL_OK);
    T(auth == 0);

    for (size_t len = 0; len < sizeof(sh); len++) {
        T_RV(decode_server_hello(sh, len, NULL, NULL), PCCL_EPROTO);
    }
    for (int i = 0; i < 8; i++) { /* magic, version, flags */
        for (int bit = 0; bit < 8; bit++) {
            uint8_t bad[PCCL__HS_SERVER_HELLO_SIZE];
            memcpy(bad, sh, sizeof(bad));
            bad[i] ^= (uint8_t)(1u << bit);
            if (i == 6 && bit == 0) {
                /* the auth bit itself is a legal flag; tampering with it is
                 * caught by the downgrade rule and the MACs */
                T_RV(decode_server_hello(bad, sizeof(bad), NULL, NULL), PCCL_OK);
            } else {
                T_RV(decode_server_hello(bad, sizeof(bad), NULL, NULL), PCCL_EPROTO);
            }
        }
    }
}

/* Flip each byte of an authenticated CLIENT_HELLO: always refused. */
static void
test_tamper_client_hello(void)
{
    pccl__hs_client_hello h = sample_hello();
    uint8_t nonce_s[PCCL__HS_NONCE_SIZE], ch[PCCL__HS_CLIENT_HELLO_SIZE];

    CHECK_OK(pccl__hs_random_nonce(nonce_s));
    CHECK_OK(pccl__hs_client_hello_encode(&h, nonce_s, 1, secret, secret_len, ch));
    T_RV(decode_hello(ch, sizeof(ch), nonce_s, secret, secret_len, NULL), PCCL_OK);
    for (size_t i = 0; i < sizeof(ch); i++) {
        static const uint8_t masks[] = {0x01, 0x80, 0xff};
        for (size_t m = 0; m < sizeof(masks); m++) {
            uint8_t bad[PCCL__HS_CLIENT_HELLO_SIZE];
            pccl_result rv;
            memcpy(bad, ch, sizeof(bad));
            bad[i] ^= masks[m];
            rv = decode_hello(bad, sizeof(bad), nonce_s, secret, secret_len, NULL);
            /* header damage is a protocol error, anything else fails the MAC */
            T(rv == (i < 6 ? PCCL_EPROTO : PCCL_EAUTH));
        }
    }
    /* the wrong server nonce (flip each byte) */
    for (size_t i = 0; i < sizeof(nonce_s); i++) {
        uint8_t n2[PCCL__HS_NONCE_SIZE];
        memcpy(n2, nonce_s, sizeof(n2));
        n2[i] ^= 0x01;
        T_RV(decode_hello(ch, sizeof(ch), n2, secret, secret_len, NULL), PCCL_EAUTH);
    }
}

/* A recorded CLIENT_HELLO replayed to a new connection (fresh nonce_s). */
static void
test_replay(void)
{
    pccl__hs_client_hello h = sample_hello();
    uint8_t n1[PCCL__HS_NONCE_SIZE], n2[PCCL__HS_NONCE_SIZE], ch[PCCL__HS_CLIENT_HELLO_SIZE];

    CHECK_OK(pccl__hs_random_nonce(n1));
    CHECK_OK(pccl__hs_random_nonce(n2));
    T(memcmp(n1, n2, sizeof(n1)) != 0);
    CHECK_OK(pccl__hs_client_hello_encode(&h, n1, 1, secret, secret_len, ch));
    T_RV(decode_hello(ch, sizeof(ch), n1, secret, secret_len, NULL), PCCL_OK);
    T_RV(decode_hello(ch, sizeof(ch), n2, secret, secret_len, NULL), PCCL_EAUTH);
}

/* Downgrade and mismatch cases spelled out at the codec level. */
static void
test_downgrade(void)
{
    pccl__hs_client_hello h = sample_hello();
    uint8_t nonce_s[PCCL__HS_NONCE_SIZE], ch[PCCL__HS_CLIENT_HELLO_SIZE];
    uint8_t sentinel[PCCL__HS_CLIENT_HELLO_SIZE];

    CHECK_OK(pccl__hs_random_nonce(nonce_s));
    memset(ch, 0x77, sizeof(ch));
    memcpy(sentinel, ch, sizeof(ch));
    /* server says "no auth": a client with a secret refuses */
    T_RV(pccl__hs_client_hello_encode(&h, nonce_s, 0, secret, secret_len, ch), PCCL_EAUTH);
    T(memcmp(ch, sentinel, sizeof(ch)) == 0);
    /* server says "auth", client has none: refuse */
    T_RV(pccl__hs_client_hello_encode(&h, nonce_s, 1, NULL, 0, ch), PCCL_EAUTH);
    T(memcmp(ch, sentinel, sizeof(ch)) == 0);
    /* a secret-less hello (mac all zero) to a server with a secret */
    CHECK_OK(pccl__hs_client_hello_encode(&h, nonce_s, 0, NULL, 0, ch));
    T_RV(decode_hello(ch, sizeof(ch), nonce_s, secret, secret_len, NULL), PCCL_EAUTH);
    /* a server without a secret does not look at the mac */
    CHECK_OK(pccl__hs_client_hello_encode(&h, nonce_s, 1, secret, secret_len, ch));
    T_RV(decode_hello(ch, sizeof(ch), nonce_s, NULL, 0, NULL), PCCL_OK);
    /* bad arguments */
    T_RV(pccl__hs_client_hello_encode(&h, NULL, 1, secret, secret_len, ch), PCCL_EINVAL);
    T_RV(pccl__hs_client_hello_encode(&h, nonce_s, 1, NULL, 5, ch), PCCL_EINVAL);
    T_RV(decode_hello(ch, sizeof(ch), NULL, secret, secret_len, NULL), PCCL_EINVAL);
}

static void
test_server_ack(void)
{
    uint8_t nc[PCCL__HS_NONCE_SIZE], ns[PCCL__HS_NONCE_SIZE], ack[PCCL__HS_SERVER_ACK_SIZE];
    uint16_t status = 0;

    CHECK_OK(pccl__hs_random_nonce(nc));
    CHECK_OK(pccl__hs_random_nonce(ns));
    pccl__hs_server_ack_encode(0, nc, ns, secret, secret_len, ack);
    T_RV(decode_ack(ack, sizeof(ack), nc, ns, secret, secret_len, &status), PCCL_OK);
    T(status == 0);

    /* every bit of the mac, the status, and the header */
    for (size_t i = 0; i < sizeof(ack); i++) {
        for (int bit = 0; bit < 8; bit++) {
            uint8_t bad[PCCL__HS_SERVER_ACK_SIZE];
            memcpy(bad, ack, sizeof(bad));
            bad[i] ^= (uint8_t)(1u << bit);
            T_RV(decode_ack(bad, sizeof(bad), nc, ns, secret, secret_len, NULL),
                 i < 6 ? PCCL_EPROTO : PCCL_EAUTH);
        }
    }
    /* wrong secret, an all-zero mac, swapped or other nonces */
    pccl__hs_server_ack_encode(0, nc, ns, other_secret, secret_len, ack);
    T_RV(decode_ack(ack, sizeof(ack), nc, ns, secret, secret_len, NULL), PCCL_EAUTH);
    pccl__hs_server_ack_encode(0, nc, ns, NULL, 0, ack);
    T_RV(decode_ack(ack, sizeof(ack), nc, ns, secret, secret_len, NULL), PCCL_EAUTH);
    T_RV(decode_ack(ack, sizeof(ack), nc, ns, NULL, 0, &status), PCCL_OK);
    pccl__hs_server_ack_encode(0, nc, ns, secret, secret_len, ack);
    T_RV(decode_ack(ack, sizeof(ack), ns, nc, secret, secret_len, NULL), PCCL_EAUTH);
    {
        uint8_t n3[PCCL__HS_NONCE_SIZE];
        CHECK_OK(pccl__hs_random_nonce(n3));
        T_RV(decode_ack(ack, sizeof(ack), nc, n3, secret, secret_len, NULL), PCCL_EAUTH);
        T_RV(decode_ack(ack, sizeof(ack), n3, ns, secret, secret_len, NULL), PCCL_EAUTH);
    }
    /* a client-direction mac cannot pass as a server one: labels differ */
    {
        uint8_t msg[11 + 2 * PCCL__HS_NONCE_SIZE + 2];
        memcpy(msg, "pccl-client", 11);
        memcpy(msg + 11, nc, PCCL__HS_NONCE_SIZE);
        memcpy(msg + 11 + PCCL__HS_NONCE_SIZE, ns, PCCL__HS_NONCE_SIZE);
        pccl__put_u16(msg + 11 + 2 * PCCL__HS_NONCE_SIZE, 0);
        CHECK_OK(pccl__hs_hmac_sha256(secret, secret_len, msg, sizeof(msg), ack + 8));
        T_RV(decode_ack(ack, sizeof(ack), nc, ns, secret, secret_len, NULL), PCCL_EAUTH);
        memcpy(msg, "pccl-server", 11);
        CHECK_OK(pccl__hs_hmac_sha256(secret, secret_len, msg, sizeof(msg), ack + 8));
        T_RV(decode_ack(ack, sizeof(ack), nc, ns, secret, secret_len, NULL), PCCL_OK);
    }
    for (size_t len = 0; len < sizeof(ack); len++) {
        T_RV(decode_ack(ack, len, nc, ns, secret, secret_len, NULL), PCCL_EPROTO);
    }
}

/* Field rules, with the mac recomputed so the field check is what fires. */
static void
test_client_fields(void)
{
    uint8_t ns[PCCL__HS_NONCE_SIZE], ch[PCCL__HS_CLIENT_HELLO_SIZE];
    pccl__hs_client_hello h = sample_hello(), got;
    struct patch {
        size_t off;
        unsigned width;
        uint64_t value;
        pccl_result want;
    };
    static const struct patch patches[] = {
        {6, 2, 0, PCCL_EPROTO},                            /* purpose 0 */
        {6, 2, 5, PCCL_EPROTO},                            /* purpose 5 */
        {6, 2, 4, PCCL_OK},                                /* purpose 4: P2P */
        {6, 2, 0x101, PCCL_EPROTO},
        {6, 2, PCCL__PURPOSE_XFER, PCCL_OK},
        {6, 2, PCCL__PURPOSE_PROBE, PCCL_OK},
        {40, 8, 1, PCCL_EPROTO},                           /* reserved */
        {40, 8, 0x8000000000000000ull, PCCL_EPROTO},
        {32, 4, 0, PCCL_EPROTO},                           /* nconns 0 */
        {32, 4, PCCL_MAX_CONNECTIONS + 1, PCCL_EPROTO},
        {32, 4, PCCL_MAX_CONNECTIONS, PCCL_OK},
        {32, 4, 1, PCCL_EPROTO},                           /* conn_index 1 >= 1 */
        {28, 4, 4, PCCL_EPROTO},                           /* conn_index == nconns */
        {28, 4, 3, PCCL_OK},
        {24, 4, 0, PCCL_EPROTO},                           /* world 0 */
        {24, 4, 2, PCCL_EPROTO},                           /* to_rank 2 >= 2 */
        {16, 4, 3, PCCL_EPROTO},                           /* from_rank == world */
        {20, 4, 3, PCCL_EPROTO},                           /* to_rank == world */
        {20, 4, 0xffffffffu, PCCL_EPROTO},
        {24, 4, 0xffffffffu, PCCL_OK},                     /* a large world is fine */
        {8, 8, 0xffffffffffffffffull, PCCL_OK},            /* any epoch */
        {36, 4, 0, PCCL_OK},                               /* slice_bytes unchecked */
    };

    CHECK_OK(pccl__hs_random_nonce(ns));
    for (size_t i = 0; i < sizeof(patches) / sizeof(patches[0]); i++) {
        const struct patch *p = &patches[i];
        for (int keyed = 0; keyed < 2; keyed++) {
            CHECK_OK(pccl__hs_client_hello_encode(&h, ns, keyed, keyed ? secret : NULL,
                                                  keyed ? secret_len : 0, ch));
            if (p->width == 2) {
                pccl__put_u16(ch + p->off, (uint16_t)p->value);
            } else if (p->width == 4) {
                pccl__put_u32(ch + p->off, (uint32_t)p->value);
            } else {
                pccl__put_u64(ch + p->off, p->value);
            }
            if (keyed) {
                remac_hello(ch, ns, secret, secret_len);
            }
            T_RV(decode_hello(ch, sizeof(ch), ns, keyed ? secret : NULL,
                              keyed ? secret_len : 0, &got),
                 p->want);
        }
    }
    /* the encoder refuses what the decoder would refuse */
    {
        pccl__hs_client_hello b = h;
        b.world = 0;
        T_RV(pccl__hs_client_hello_encode(&b, ns, 0, NULL, 0, ch), PCCL_EINVAL);
        b = h;
        b.conn_index = b.nconns;
        T_RV(pccl__hs_client_hello_encode(&b, ns, 0, NULL, 0, ch), PCCL_EINVAL);
        b = h;
        b.purpose = 9;
        T_RV(pccl__hs_client_hello_encode(&b, ns, 0, NULL, 0, ch), PCCL_EINVAL);
    }
    /* truncation at every length, with and without a secret */
    CHECK_OK(pccl__hs_client_hello_encode(&h, ns, 1, secret, secret_len, ch));
    for (size_t len = 0; len < sizeof(ch); len++) {
        T_RV(decode_hello(ch, len, ns, secret, secret_len, NULL), PCCL_EPROTO);
        T_RV(decode_hello(ch, len, ns, NULL, 0, NULL), PCCL_EPROTO);
    }
    T_RV(pccl__hs_client_hello_decode(NULL, 0, ns, NULL, 0, &got), PCCL_EPROTO);
}

static void
test_garbage(void)
{
    uint8_t ns[PCCL__HS_NONCE_SIZE], nc[PCCL__HS_NONCE_SIZE];

    CHECK_OK(pccl__hs_random_nonce(ns));
    CHECK_OK(pccl__hs_random_nonce(nc));
    for (int i = 0; i < 20000; i++) {
        uint8_t buf[PCCL__HS_CLIENT_HELLO_SIZE + 8];
        size_t len = (size_t)(rnd() % (sizeof(buf) + 1));
        pccl_result rv;
        int auth;

        for (size_t j = 0; j < sizeof(buf); j += 8) {
            pccl__put_u64(buf + j, rnd());
        }
        if (i & 1) {
            pccl__put_u32(buf, PCCL__HS_MAGIC);
            pccl__put_u16(buf + 4, PCCL__HS_VERSION);
        }
        rv = decode_server_hello(buf, len, NULL, &auth);
        T(rv == PCCL_OK || rv == PCCL_EPROTO);
        /* keyed: random bytes never carry a valid mac */
        rv = decode_hello(buf, len, ns, secret, secret_len, NULL);
        T(rv == PCCL_EPROTO || rv == PCCL_EAUTH);
        rv = decode_hello(buf, len, ns, NULL, 0, NULL);
        T(rv == PCCL_OK || rv == PCCL_EPROTO);
        rv = decode_ack(buf, len, nc, ns, secret, secret_len, NULL);
        T(rv == PCCL_EPROTO || rv == PCCL_EAUTH);
        rv = decode_ack(buf, len, nc, ns, NULL, 0, NULL);
        T(rv == PCCL_OK || rv == PCCL_EPROTO);
    }
}

int
main(void)
{
    test_hmac_kat();
    test_message_kat();
    test_paths();
    test_server_hello();
    test_tamper_client_hello();
    test_replay();
    test_downgrade();
    test_server_ack();
    test_client_fields();
    test_garbage();
    printf("handshake_test: %lu checks passed\n", checks);
    return 0;
}
