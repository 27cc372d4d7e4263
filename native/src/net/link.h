/*
 * link.h - running the connection handshake over a socket.
 *
 * These helpers block the calling thread (never the I/O engine) with a
 * deadline and an optional wake descriptor: they return PCCL_ETIMEDOUT at
 * the deadline and PCCL_EABORTED when wake_fd becomes readable.  The
 * message formats and MACs are the codec's (handshake.h); this file only
 * moves them.
 */
#ifndef PCCL_NET_LINK_H
#define PCCL_NET_LINK_H

#include <stddef.h>
#include <stdint.h>

#include "net/handshake.h"
#include "pccl.h"

/* Server-side state between the client's hello and the verdict. */
typedef struct pccl__hs_server {
    uint8_t nonce_s[PCCL__HS_NONCE_SIZE];
    pccl__hs_client_hello hello;    /* what the authenticated client asks for */
} pccl__hs_server;

/* pccl__link_client_handshake runs the client side on a connected fd:
 * reads SERVER_HELLO, sends CLIENT_HELLO for *h (nonce filled in here),
 * reads SERVER_ACK.  Returns PCCL_OK when the server accepted, the
 * server's status (a pccl_result) when it refused, PCCL_EAUTH when the
 * server hung up after our hello (what a server does on a bad MAC) or
 * its MAC is wrong, PCCL_EPROTO on malformed messages.  fd stays the
 * caller's. */
pccl_result pccl__link_client_handshake(int fd, const pccl__hs_client_hello *h,
                                        const uint8_t *secret, size_t secret_len,
                                        uint64_t deadline, int wake_fd);

/* pccl__link_server_hello runs the server side up to the verdict: sends
 * SERVER_HELLO, reads and verifies CLIENT_HELLO into *st.  PCCL_EAUTH on a
 * bad MAC (the caller closes without answering). */
pccl_result pccl__link_server_hello(int fd, const uint8_t *secret, size_t secret_len,
                                    uint64_t deadline, int wake_fd, pccl__hs_server *st);

/* pccl__link_server_ack sends the verdict (0: accepted). */
pccl_result pccl__link_server_ack(int fd, const pccl__hs_server *st, uint16_t status,
                                  const uint8_t *secret, size_t secret_len,
                                  uint64_t deadline, int wake_fd);

#endif
