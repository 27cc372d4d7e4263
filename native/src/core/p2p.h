/*
 * p2p.h - point-to-point send/recv (p2p.c): the hooks the lifecycle
 * (comm.c) and the accept thread (ring_setup.c) call, and the op calls
 * behind the public ones of p2p_api.c (which also keeps the comm's memory
 * alive for each handle, as op_api.c does for collectives).
 */
#ifndef PCCL_CORE_P2P_H
#define PCCL_CORE_P2P_H

#include "net/link.h"
#include "pccl.h"

/* pccl__p2p_init starts the p2p I/O thread (create). */
pccl_result pccl__p2p_init(pccl_comm *comm);
/* pccl__p2p_close fails every p2p op with PCCL_ECLOSED, closes every p2p
 * connection and joins the thread and the dials (close, after the
 * listener stopped).  Idempotent. */
void pccl__p2p_close(pccl_comm *comm);
/* pccl__p2p_fini frees the state (destroy). */
void pccl__p2p_fini(pccl_comm *comm);
/* pccl__p2p_abort fails every p2p op with PCCL_EABORTED and resets every
 * pair.  Never blocks long; any thread. */
void pccl__p2p_abort(pccl_comm *comm);
/* pccl__p2p_on_hello takes an authenticated PURPOSE_P2P connection
 * (accepts it as one of the K from its sender, or refuses it).  Takes fd. */
void pccl__p2p_on_hello(pccl_comm *comm, int fd, const pccl__hs_server *st);

/* pccl__p2p_send_start / recv_start: pccl_comm_send_start /
 * pccl_comm_recv_start without the handle count. */
pccl_result pccl__p2p_send_start(pccl_comm *comm, uint32_t peer_id, const char *peer_addr,
                                 const void *buf, size_t len, uint64_t tag, int32_t timeout_ms,
                                 pccl_p2p_handle **out);
pccl_result pccl__p2p_recv_start(pccl_comm *comm, uint32_t peer_id, void *buf, size_t len,
                                 uint64_t tag, int32_t timeout_ms, pccl_p2p_handle **out);
/* pccl__p2p_release aborts h if it is running (resetting its pair), frees
 * it, and returns its communicator. */
pccl_comm *pccl__p2p_release(pccl_p2p_handle *h);

#endif
