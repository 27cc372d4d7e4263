/*
 * listener.h - the accept thread of a communicator.
 *
 * One thread per listener accepts TCP connections; the server side of the
 * handshake of each runs on a short-lived worker thread (up to
 * PCCL__LISTENER_WORKERS at once, beyond that on the accept thread
 * itself), bounded by the handshake timeout, so K connections over a
 * long path authenticate in parallel and a silent client holds up no one.  A connection whose client authenticated is handed,
 * with the decoded hello, to the owner's on_hello callback, which decides
 * (accept, refuse, or keep it for later).  A failed handshake just closes
 * the socket.  pccl__listener_stop wakes and joins the thread.
 */
#ifndef PCCL_NET_LISTENER_H
#define PCCL_NET_LISTENER_H

#include <stddef.h>
#include <stdint.h>

#include "net/link.h"
#include "platform/plat.h"

typedef struct pccl__listener_ops {
    /* on_hello owns fd from now on.  Runs on the accept thread or a
     * handshake worker: several may run at once. */
    void (*on_hello)(void *arg, int fd, const pccl__hs_server *st);
    /* tick does the owner's housekeeping and returns the next deadline at
     * which it wants to run again (PCCL__NO_DEADLINE: none).  Runs on the
     * accept thread before every wait. */
    uint64_t (*tick)(void *arg);
} pccl__listener_ops;

enum { PCCL__LISTENER_WORKERS = 32 };

typedef struct pccl__listener {
    int fd;
    pccl__mutex mtx;
    pccl__cond cv;
    uint32_t nworkers;           /* (mtx) handshakes running on workers */
    pccl__sockaddr addr;         /* actually bound */
    pccl__event wake;            /* signalled once, to stop */
    pccl__event kick;            /* run tick again (its deadline changed) */
    pccl__thread thread;
    const uint8_t *secret;       /* owned by the caller, outlives the listener */
    size_t secret_len;
    int32_t handshake_timeout_ms;
    pccl__listener_ops ops;
    void *arg;
} pccl__listener;

/* pccl__listener_open binds addr (port 0 allowed) without starting the
 * thread; l->addr is the bound address. */
pccl_result pccl__listener_open(pccl__listener *l, const pccl__sockaddr *addr,
                                const uint8_t *secret, size_t secret_len,
                                int32_t handshake_timeout_ms,
                                const pccl__listener_ops *ops, void *arg);
/* pccl__listener_start starts the accept thread. */
pccl_result pccl__listener_start(pccl__listener *l);
/* pccl__listener_kick makes the accept thread call tick again soon (e.g.
 * after on_hello parked something with a new expiry).  Any thread. */
void pccl__listener_kick(pccl__listener *l);
/* pccl__listener_stop stops and joins the thread (idempotent). */
void pccl__listener_stop(pccl__listener *l);
/* pccl__listener_close stops the thread and closes the socket. */
void pccl__listener_close(pccl__listener *l);

#endif
