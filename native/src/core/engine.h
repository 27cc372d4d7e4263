/*
 * engine.h - the I/O engine of a communicator (engine.c): called by the
 * lifecycle (comm.c), ring setup (ring_setup.c) and the public op calls
 * (op_api.c).  The engine itself calls only down: op.c and the operation
 * interface (coll/coll.h).
 */
#ifndef PCCL_CORE_ENGINE_H
#define PCCL_CORE_ENGINE_H

#include <stdint.h>

#include "pccl.h"

/* pccl__engine_start / join: the engine thread, from create to close. */
pccl_result pccl__engine_start(pccl_comm *comm);
void pccl__engine_join(pccl_comm *comm);

/* pccl__engine_drive lets a thread about to wait for h run the engine
 * itself until h finishes or deadline passes, if the engine thread is
 * idle (progress_lock free) and no requests other than ops are pending.
 * Returns 0 when it did not (the caller then waits as usual; the engine
 * thread has been woken).  mtx not held. */
int pccl__engine_drive(pccl_comm *comm, pccl_op_handle *h, uint64_t deadline);

/* pccl__engine_wake signals the engine (caller may hold mtx). */
void pccl__engine_wake(pccl_comm *comm);

#endif
