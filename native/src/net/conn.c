/*
 * conn.c - send queue and receive state of one ring connection.
 *
 * Sending gathers as many queued frames as fit in one writev (header and
 * payload of each frame are separate iov entries, so payloads go from the
 * operation's buffers to the socket without a copy) and resumes a partial
 * write where it stopped.  Receiving reads the header into a small buffer
 * and the payload wherever pccl__conn_expect says.
 */
#include <string.h>

#include "net/conn.h"
#include "platform/plat.h"

void
pccl__conn_init(pccl__conn *c, int fd, uint32_t index, int outbound)
{
    memset(c, 0, sizeof(*c));
    c->fd = fd;
    c->index = index;
    c->outbound = outbound;
    c->rstate = PCCL__RX_HEADER;
}

void
pccl__conn_fini(pccl__conn *c)
{
    pccl__sock_close(c->fd);
    c->fd = -1;
    c->sq_head = c->sq_tail = NULL;
    c->sq_done = 0;
    c->rstate = PCCL__RX_HEADER;
    c->rhdr_got = 0;
    c->rop = NULL;
}

void
pccl__conn_enqueue(pccl__conn *c, pccl__frame_out *f)
{
    f->next = NULL;
    if (c->sq_tail != NULL) {
        c->sq_tail->next = f;
    } else {
        c->sq_head = f;
    }
    c->sq_tail = f;
}

pccl_result
pccl__conn_send(pccl__conn *c, void (*sent)(void *, pccl__frame_out *), void *arg,
                size_t *moved)
{
    pccl__iov iov[PCCL__MAX_IOV];
    size_t total = 0;
    pccl_result rv;

    while (c->sq_head != NULL) {
        pccl__frame_out *f = c->sq_head;
        size_t skip = c->sq_done;
        size_t put;
        int n = 0;

        /* Gather frames from the head, skipping what is already written. */
        for (; f != NULL && n + 2 <= PCCL__MAX_IOV; f = f->next) {
            if (skip < PCCL__FRAME_HEADER_SIZE) {
                iov[n].base = f->hdr + skip;
                iov[n].len = PCCL__FRAME_HEADER_SIZE - skip;
                n++;
                skip = 0;
            } else {
                skip -= PCCL__FRAME_HEADER_SIZE;
            }
            if (f->len > skip) {
                iov[n].base = f->payload + skip;
                iov[n].len = f->len - skip;
                n++;
            }
            skip = 0;
        }
        if ((rv = pccl__sock_writev(c->fd, iov, n, &put)) != 0) {
            *moved = total;
            return rv;
        }
        if (put == 0) {
            break;
        }
        total += put;
        /* Retire the frames this write finished. */
        put += c->sq_done;
        while (c->sq_head != NULL) {
            size_t flen = PCCL__FRAME_HEADER_SIZE + (size_t)c->sq_head->len;
            if (put < flen) {
                break;
            }
            put -= flen;
            f = c->sq_head;
            c->sq_head = f->next;
            if (c->sq_head == NULL) {
                c->sq_tail = NULL;
            }
            f->next = NULL;
            sent(arg, f);
        }
        c->sq_done = put;
    }
    *moved = total;
    return PCCL_OK;
}

pccl_result
pccl__conn_recv_header(pccl__conn *c, int *ready, size_t *moved)
{
    size_t got = 0;
    pccl_result rv;

    *ready = 0;
    *moved = 0;
    if (c->rhdr_got < PCCL__FRAME_HEADER_SIZE) {
        if ((rv = pccl__sock_read(c->fd, c->rhdr + c->rhdr_got,
                                  PCCL__FRAME_HEADER_SIZE - c->rhdr_got, &got)) != 0) {
            return rv;
        }
        c->rhdr_got += got;
        *moved = got;
    }
    if (c->rhdr_got < PCCL__FRAME_HEADER_SIZE) {
        return PCCL_OK;
    }
    if ((rv = pccl__frame_decode(c->rhdr, sizeof(c->rhdr), &c->rh)) != 0) {
        return PCCL_EPROTO;
    }
    *ready = 1;
    return PCCL_OK;
}

void
pccl__conn_expect(pccl__conn *c, uint8_t *dst, size_t len, void *op, uint32_t unit)
{
    c->rstate = PCCL__RX_PAYLOAD;
    c->rdst = dst;
    c->rlen = len;
    c->rgot = 0;
    c->rop = op;
    c->runit = unit;
}

pccl_result
pccl__conn_recv_payload(pccl__conn *c, int *done, size_t *moved)
{
    size_t got = 0;
    pccl_result rv;

    *done = 0;
    *moved = 0;
    if (c->rgot < c->rlen) {
        if ((rv = pccl__sock_read(c->fd, c->rdst + c->rgot, c->rlen - c->rgot, &got)) != 0) {
            return rv;
        }
        c->rgot += got;
        *moved = got;
    }
    if (c->rgot == c->rlen) {
        *done = 1;
        c->rstate = PCCL__RX_HEADER;
        c->rhdr_got = 0;
    }
    return PCCL_OK;
}
