/*
 * link.c - the handshake of one connection, blocking with a deadline.
 *
 * Client: connect, read SERVER_HELLO, answer CLIENT_HELLO, read SERVER_ACK.
 * Server: send SERVER_HELLO, read CLIENT_HELLO, decide, send SERVER_ACK.
 * A server that cannot verify the client's MAC closes the socket without
 * an answer, so a client that sees the connection end while waiting for the
 * verdict reports PCCL_EAUTH.
 */
#include <string.h>

#include "net/link.h"
#include "platform/plat.h"

pccl_result
pccl__link_client_handshake(int fd, const pccl__hs_client_hello *h, const uint8_t *secret,
                            size_t secret_len, uint64_t deadline, int wake_fd)
{
    uint8_t sh[PCCL__HS_SERVER_HELLO_SIZE];
    uint8_t ch[PCCL__HS_CLIENT_HELLO_SIZE];
    uint8_t ack[PCCL__HS_SERVER_ACK_SIZE];
    uint8_t nonce_s[PCCL__HS_NONCE_SIZE];
    pccl__hs_client_hello hello = *h;
    int auth_required;
    uint16_t status;
    pccl_result rv;

    if ((rv = pccl__sock_recv_all(fd, sh, sizeof(sh), deadline, wake_fd)) != 0) {
        return rv;
    }
    if ((rv = pccl__hs_server_hello_decode(sh, sizeof(sh), nonce_s, &auth_required)) != 0) {
        return rv;
    }
    if ((rv = pccl__hs_random_nonce(hello.nonce_c)) != 0) {
        return rv;
    }
    if ((rv = pccl__hs_client_hello_encode(&hello, nonce_s, auth_required, secret, secret_len,
                                           ch)) != 0) {
        return rv;
    }
    if ((rv = pccl__sock_send_all(fd, ch, sizeof(ch), deadline, wake_fd)) != 0) {
        return rv;
    }
    rv = pccl__sock_recv_all(fd, ack, sizeof(ack), deadline, wake_fd);
    if (rv == PCCL_EPEERLOST) {
        return PCCL_EAUTH;
    }
    if (rv != 0) {
        return rv;
    }
    if ((rv = pccl__hs_server_ack_decode(ack, sizeof(ack), hello.nonce_c, nonce_s, secret,
                                         secret_len, &status)) != 0) {
        return rv;
    }
    if (status != 0) {
        /* A refusal: the server's reason, kept within known codes. */
        return (status < PCCL_ERINGBROKEN + 1) ? (pccl_result)status : PCCL_EPROTO;
    }
    return PCCL_OK;
}

pccl_result
pccl__link_server_hello(int fd, const uint8_t *secret, size_t secret_len, uint64_t deadline,
                        int wake_fd, pccl__hs_server *st)
{
    uint8_t sh[PCCL__HS_SERVER_HELLO_SIZE];
    uint8_t ch[PCCL__HS_CLIENT_HELLO_SIZE];
    pccl__hs_server s;
    pccl_result rv;

    if ((rv = pccl__hs_random_nonce(s.nonce_s)) != 0) {
        return rv;
    }
    pccl__hs_server_hello_encode(s.nonce_s, secret_len > 0, sh);
    if ((rv = pccl__sock_send_all(fd, sh, sizeof(sh), deadline, wake_fd)) != 0) {
        return rv;
    }
    if ((rv = pccl__sock_recv_all(fd, ch, sizeof(ch), deadline, wake_fd)) != 0) {
        return rv;
    }
    if ((rv = pccl__hs_client_hello_decode(ch, sizeof(ch), s.nonce_s, secret, secret_len,
                                           &s.hello)) != 0) {
        return rv;
    }
    *st = s;
    return PCCL_OK;
}

pccl_result
pccl__link_server_ack(int fd, const pccl__hs_server *st, uint16_t status,
                      const uint8_t *secret, size_t secret_len, uint64_t deadline, int wake_fd)
{
    uint8_t ack[PCCL__HS_SERVER_ACK_SIZE];

    pccl__hs_server_ack_encode(status, st->hello.nonce_c, st->nonce_s, secret, secret_len, ack);
    return pccl__sock_send_all(fd, ack, sizeof(ack), deadline, wake_fd);
}
