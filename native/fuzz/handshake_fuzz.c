/*
 * handshake_fuzz.c - libFuzzer harness for the three handshake decoders.
 *
 * The first input byte picks the decoder (bits 0-1) and whether a secret
 * is configured (bit 2); the rest is the message, passed with its exact
 * length so ASan catches any overread.  Without a secret the fuzzer can
 * reach every field check; with one it exercises the MAC path, which it
 * must never get past (it cannot forge HMAC-SHA256).  Accepted messages
 * must re-encode to the same bytes (the MAC aside).  Invariant breaks
 * trap.  Not part of the CMake build; see README.md in this folder.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "net/handshake.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const uint8_t secret[] = "fuzz secret";
static const uint8_t nonce_s[PCCL__HS_NONCE_SIZE] = {1, 2, 3, 4, 5, 6, 7, 8};
static const uint8_t nonce_c[PCCL__HS_NONCE_SIZE] = {8, 7, 6, 5, 4, 3, 2, 1};

static void
fuzz_server_hello(const uint8_t *msg, size_t len)
{
    uint8_t nonce[PCCL__HS_NONCE_SIZE], again[PCCL__HS_SERVER_HELLO_SIZE];
    int auth = -1;
    pccl_result rv = pccl__hs_server_hello_decode(msg, len, nonce, &auth);

    if (rv != PCCL_OK) {
        if (rv != PCCL_EPROTO) {
            __builtin_trap();
        }
        return;
    }
    pccl__hs_server_hello_encode(nonce, auth, again);
    if (memcmp(again, msg, sizeof(again)) != 0) {
        __builtin_trap();
    }
}

static void
fuzz_client_hello(const uint8_t *msg, size_t len, int keyed)
{
    size_t key_len = keyed ? sizeof(secret) - 1 : 0;
    pccl__hs_client_hello h;
    uint8_t again[PCCL__HS_CLIENT_HELLO_SIZE];
    pccl_result rv = pccl__hs_client_hello_decode(msg, len, nonce_s, keyed ? secret : NULL,
                                                  key_len, &h);

    if (rv != PCCL_OK) {
        if (rv != PCCL_EPROTO && !(keyed && rv == PCCL_EAUTH)) {
            __builtin_trap();
        }
        return;
    }
    if (pccl__hs_client_hello_encode(&h, nonce_s, keyed, keyed ? secret : NULL, key_len,
                                     again) != PCCL_OK) {
        __builtin_trap();
    }
    /* Keyed: the whole message, MAC included; unkeyed: all but the MAC. */
    if (memcmp(again, msg, keyed ? sizeof(again) : 80) != 0) {
        __builtin_trap();
    }
}

static void
fuzz_server_ack(const uint8_t *msg, size_t len, int keyed)
{
    size_t key_len = keyed ? sizeof(secret) - 1 : 0;
    uint16_t status = 0;
    uint8_t again[PCCL__HS_SERVER_ACK_SIZE];
    pccl_result rv = pccl__hs_server_ack_decode(msg, len, nonce_c, nonce_s,
                                                keyed ? secret : NULL, key_len, &status);

    if (rv != PCCL_OK) {
        if (rv != PCCL_EPROTO && !(keyed && rv == PCCL_EAUTH)) {
            __builtin_trap();
        }
        return;
    }
    pccl__hs_server_ack_encode(status, nonce_c, nonce_s, keyed ? secret : NULL, key_len,
                               again);
    if (memcmp(again, msg, keyed ? sizeof(again) : 8) != 0) {
        __builtin_trap();
    }
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t *msg;
    size_t len;
    int which, keyed;

    if (size < 1) {
        return 0;
    }
    which = data[0] & 3;
    keyed = (data[0] >> 2) & 1;
    len = size - 1;
    /* An exact-size copy so a read past len lands outside the allocation. */
    msg = (uint8_t *)malloc(len ? len : 1);
    if (msg == NULL) {
        return 0;
    }
    memcpy(msg, data + 1, len);
    switch (which) {
    case 0:
        fuzz_server_hello(msg, len);
        break;
    case 1:
    case 3:
        fuzz_client_hello(msg, len, keyed);
        break;
    default:
        fuzz_server_ack(msg, len, keyed);
        break;
    }
    free(msg);
    return 0;
}
