/*
 * conn.h - one non-blocking ring connection as the I/O engine sees it.
 *
 * A ring connection carries frames in one direction only.  The sending
 * end keeps a FIFO of frames (header bytes + a pointer to the payload,
 * which lives in the operation's buffers: nothing is copied); several
 * operations may interleave on one connection.  The receiving end reads
 * one 72-byte header, lets its owner decide where the payload goes, then
 * reads the payload straight there.
 *
 * A pccl__conn belongs to the engine thread; nothing here locks.
 */
#ifndef PCCL_NET_CONN_H
#define PCCL_NET_CONN_H

#include <stddef.h>
#include <stdint.h>

#include "net/frame.h"
#include "pccl.h"

enum pccl__rx_state {
    PCCL__RX_HEADER = 0,   /* reading a header */
    PCCL__RX_PAYLOAD = 1,  /* reading a payload into rdst */
    PCCL__RX_PARKED = 2    /* header decoded, its operation not started yet */
};

typedef struct pccl__conn {
    int fd;
    uint32_t index;          /* 0..K-1 */
    int outbound;            /* 1: we send, 0: we receive */
    uint32_t interest;       /* PCCL__POLL_* flags registered with the poller */
    int registered;          /* in the poller */
    int peer_closed;         /* the peer has hung up (cleanly, inbound) */
    int dirty;               /* on the engine's flush list */

    /* sending */
    pccl__frame_out *sq_head;
    pccl__frame_out *sq_tail;
    size_t sq_done;          /* bytes of sq_head (header + payload) written */
    int backlogged;          /* engine: a flush left frames queued (link stats) */

    /* receiving */
    int rstate;
    uint8_t rhdr[PCCL__FRAME_HEADER_SIZE];
    size_t rhdr_got;
    pccl__frame_header rh;   /* valid in PAYLOAD and PARKED */
    uint8_t *rdst;           /* where the payload goes */
    size_t rlen;
    size_t rgot;
    void *rop;               /* the operation the payload belongs to */
    uint32_t runit;          /* its receive unit */
    uint8_t *scratch;        /* one slice, for payloads that are reduced */
    size_t scratch_len;
} pccl__conn;

/* pccl__conn_init sets up c around fd (ownership passes to c). */
void pccl__conn_init(pccl__conn *c, int fd, uint32_t index, int outbound);
/* pccl__conn_fini closes the socket and forgets queued frames (their
 * owners are failed by the caller).  Does not free scratch. */
void pccl__conn_fini(pccl__conn *c);

/* pccl__conn_enqueue appends f to the send queue. */
void pccl__conn_enqueue(pccl__conn *c, pccl__frame_out *f);

/* pccl__conn_send writes queued frames with writev until the queue is
 * empty or the socket would block; calls sent(arg, f) for each frame
 * completely written, in order.  *moved: bytes written.  PCCL_EPEERLOST
 * when the peer is gone. */
pccl_result pccl__conn_send(pccl__conn *c, void (*sent)(void *, pccl__frame_out *), void *arg,
                            size_t *moved);

/* pccl__conn_recv_header reads toward the next header.  *ready is 1 when
 * c->rh holds a decoded header (state stays HEADER: the caller moves it
 * on with pccl__conn_expect or parks it).  *moved: bytes read.
 * PCCL_EPROTO on a malformed header, PCCL_EPEERLOST at end of stream. */
pccl_result pccl__conn_recv_header(pccl__conn *c, int *ready, size_t *moved);

/* pccl__conn_expect sets where the payload of c->rh goes. */
void pccl__conn_expect(pccl__conn *c, uint8_t *dst, size_t len, void *op, uint32_t unit);

/* pccl__conn_recv_payload reads toward the end of the payload; *done is 1
 * when it is complete (state back to HEADER). */
pccl_result pccl__conn_recv_payload(pccl__conn *c, int *done, size_t *moved);

#endif
