/*
 * listener.c - accept thread: accept, authenticate, hand over.
 *
 * The thread sleeps in poll() on the listening socket and the wake event,
 * with a timeout from the owner's tick (e.g. the expiry of connections it
 * parked).  Each accepted connection's handshake runs on a detached worker
 * thread (counted, so stop can wait for them), bounded by the handshake
 * timeout and cut short by the wake event: K connections from a distant
 * neighbour authenticate in parallel, a silent client holds up nobody,
 * and nothing blocks shutdown.  Past PCCL__LISTENER_WORKERS concurrent
 * handshakes the accept thread serves inline, which throttles a flood.
 */
#include <stdlib.h>
#include <string.h>

#include "net/handshake.h"
#include "net/listener.h"

pccl_result
pccl__listener_open(pccl__listener *l, const pccl__sockaddr *addr, const uint8_t *secret,
                    size_t secret_len, int32_t handshake_timeout_ms,
                    const pccl__listener_ops *ops, void *arg)
{
    pccl_result rv;

    memset(l, 0, sizeof(*l));
    l->fd = -1;
    l->wake.fd = -1;
    l->kick.fd = -1;
    if ((rv = pccl__mutex_init(&l->mtx)) != 0) {
        return rv;
    }
    if ((rv = pccl__cond_init(&l->cv)) != 0) {
        pccl__mutex_fini(&l->mtx);
        return rv;
    }
    if ((rv = pccl__event_init(&l->wake)) != 0) {
        pccl__cond_fini(&l->cv);
        pccl__mutex_fini(&l->mtx);
        return rv;
    }
    if ((rv = pccl__event_init(&l->kick)) != 0) {
        pccl__event_fini(&l->wake);
        pccl__cond_fini(&l->cv);
        pccl__mutex_fini(&l->mtx);
        return rv;
    }
    if ((rv = pccl__sock_listen(addr, &l->fd)) != 0 ||
        (rv = pccl__sock_local_addr(l->fd, &l->addr)) != 0) {
        pccl__sock_close(l->fd);
        l->fd = -1;
        pccl__event_fini(&l->kick);
        pccl__event_fini(&l->wake);
        pccl__cond_fini(&l->cv);
        pccl__mutex_fini(&l->mtx);
        return rv;
    }
    l->secret = secret;
    l->secret_len = secret_len;
    l->handshake_timeout_ms = handshake_timeout_ms;
    l->ops = *ops;
    l->arg = arg;
    return PCCL_OK;
}

static void
serve_one(pccl__listener *l, int fd)
{
    pccl__hs_server st;
    uint64_t deadline = pccl__deadline_ms(l->handshake_timeout_ms);

    if (pccl__link_server_hello(fd, l->secret, l->secret_len, deadline, l->wake.fd, &st) != 0) {
        /* Bad MAC, malformed hello, timeout or stop: no answer. */
        pccl__sock_close(fd);
        return;
    }
    l->ops.on_hello(l->arg, fd, &st);
}

typedef struct worker {
    pccl__listener *l;
    int fd;
} worker;

static void
worker_main(void *arg)
{
    worker *w = arg;
    pccl__listener *l = w->l;

    serve_one(l, w->fd);
    free(w);
    pccl__hs_thread_done();
    pccl__mutex_lock(&l->mtx);
    l->nworkers--;
    pccl__cond_broadcast(&l->cv);
    pccl__mutex_unlock(&l->mtx);
}

/* Hand fd to a worker thread, or serve it here when there are too many. */
static void
dispatch(pccl__listener *l, int fd)
{
    worker *w = NULL;

    pccl__mutex_lock(&l->mtx);
    if (l->nworkers < PCCL__LISTENER_WORKERS && (w = malloc(sizeof(*w))) != NULL) {
        l->nworkers++;
    }
    pccl__mutex_unlock(&l->mtx);
    if (w != NULL) {
        w->l = l;
        w->fd = fd;
        if (pccl__thread_spawn(worker_main, w) == 0) {
            return;
        }
        free(w);
        pccl__mutex_lock(&l->mtx);
        l->nworkers--;
        pccl__mutex_unlock(&l->mtx);
    }
    serve_one(l, fd);
}

static void
accept_main(void *arg)
{
    pccl__listener *l = arg;

    for (;;) {
        uint64_t next = l->ops.tick(l->arg);
        int fds[3] = {l->fd, l->wake.fd, l->kick.fd};
        uint32_t ready = 0;
        pccl_result rv = pccl__wait_readable(fds, 3, next, &ready);
        int fd;

        if (rv == PCCL_ETIMEDOUT) {
            continue; /* tick again */
        }
        if (rv != 0) {
            pccl__sleep_ms(10);
            continue;
        }
        if (ready & 2u) {
            return; /* stop */
        }
        if (ready & 4u) {
            pccl__event_drain(&l->kick);
        }
        if (!(ready & 1u)) {
            continue;
        }
        for (;;) {
            rv = pccl__sock_accept(l->fd, &fd);
            if (rv == PCCL_ETIMEDOUT) {
                break; /* none pending */
            }
            if (rv != 0) {
                /* Out of descriptors or memory: back off instead of spinning. */
                if (pccl__sock_wait(l->wake.fd, 0, pccl__deadline_ms(50), -1) == PCCL_OK) {
                    return;
                }
                break;
            }
            dispatch(l, fd);
            if (pccl__sock_wait(l->wake.fd, 0, pccl__deadline_ms(0), -1) == PCCL_OK) {
                return;
            }
        }
    }
}

pccl_result
pccl__listener_start(pccl__listener *l)
{
    return pccl__thread_start(&l->thread, accept_main, l);
}

void
pccl__listener_kick(pccl__listener *l)
{
    pccl__event_signal(&l->kick);
}

void
pccl__listener_stop(pccl__listener *l)
{
    if (l->wake.fd < 0) {
        return; /* never opened, or closed */
    }
    pccl__event_signal(&l->wake);
    pccl__thread_join(&l->thread);
    /* Workers see the wake-up too and finish their handshakes early. */
    pccl__mutex_lock(&l->mtx);
    while (l->nworkers > 0) {
        pccl__cond_wait(&l->cv, &l->mtx);
    }
    pccl__mutex_unlock(&l->mtx);
}

void
pccl__listener_close(pccl__listener *l)
{
    if (l->wake.fd < 0) {
        return;
    }
    pccl__listener_stop(l);
    pccl__sock_close(l->fd);
    l->fd = -1;
    pccl__event_fini(&l->kick);
    pccl__event_fini(&l->wake);
    pccl__cond_fini(&l->cv);
    pccl__mutex_fini(&l->mtx);
}
