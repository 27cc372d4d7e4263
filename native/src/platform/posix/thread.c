/*
 * thread.c - POSIX threads, locks, condition variables on CLOCK_MONOTONIC,
 * clocks, and eventfd wake-ups.
 *
 * Lock and condition failures on valid objects are broken invariants, not
 * network faults, so they are not turned into error values.
 */
#include <errno.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "platform/plat.h"

uint64_t
pccl__clock_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

uint64_t
pccl__clock_ms(void)
{
    return pccl__clock_ns() / 1000000u;
}

uint64_t
pccl__deadline_ms(int32_t ms)
{
    if (ms < 0) {
        return PCCL__NO_DEADLINE;
    }
    return pccl__clock_ns() + (uint64_t)ms * 1000000u;
}

int
pccl__poll_timeout_ms(uint64_t deadline)
{
    uint64_t now;
    uint64_t ms;

    if (deadline == PCCL__NO_DEADLINE) {
        return -1;
    }
    now = pccl__clock_ns();
    if (deadline <= now) {
        return 0;
    }
    ms = (deadline - now + 999999u) / 1000000u;
    return ms > INT32_MAX ? INT32_MAX : (int)ms;
}

void
pccl__sleep_ms(uint32_t ms)
{
    struct timespec ts;
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (long)(ms % 1000) * 1000000L;
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

void
pccl__thread_yield(void)
{
    (void)sched_yield();
}

pccl_result
pccl__mutex_init(pccl__mutex *m)
{
    int rv;
    if ((rv = pthread_mutex_init(&m->m, NULL)) != 0) {
        return rv == ENOMEM ? PCCL_ENOMEM : (PCCL_ESYSERR | rv);
    }
    return PCCL_OK;
}

void
pccl__mutex_fini(pccl__mutex *m)
{
    pthread_mutex_destroy(&m->m);
}

void
pccl__mutex_lock(pccl__mutex *m)
{
    pthread_mutex_lock(&m->m);
}

int
pccl__mutex_trylock(pccl__mutex *m)
{
    return pthread_mutex_trylock(&m->m) == 0;
}

void
pccl__mutex_unlock(pccl__mutex *m)
{
    pthread_mutex_unlock(&m->m);
}

pccl_result
pccl__cond_init(pccl__cond *c)
{
    pthread_condattr_t attr;
    int rv;

    if ((rv = pthread_condattr_init(&attr)) != 0) {
        return PCCL_ESYSERR | rv;
    }
    if ((rv = pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)) != 0 ||
        (rv = pthread_cond_init(&c->c, &attr)) != 0) {
        pthread_condattr_destroy(&attr);
        return rv == ENOMEM ? PCCL_ENOMEM : (PCCL_ESYSERR | rv);
    }
    pthread_condattr_destroy(&attr);
    return PCCL_OK;
}

void
pccl__cond_fini(pccl__cond *c)
{
    pthread_cond_destroy(&c->c);
}

void
pccl__cond_wait(pccl__cond *c, pccl__mutex *m)
{
    pthread_cond_wait(&c->c, &m->m);
}

pccl_result
pccl__cond_wait_until(pccl__cond *c, pccl__mutex *m, uint64_t deadline)
{
    struct timespec ts;

    if (deadline == PCCL__NO_DEADLINE) {
        pthread_cond_wait(&c->c, &m->m);
        return PCCL_OK;
    }
    if (pccl__clock_ns() >= deadline) {
        return PCCL_ETIMEDOUT;
    }
    ts.tv_sec = (time_t)(deadline / 1000000000u);
    ts.tv_nsec = (long)(deadline % 1000000000u);
    if (pthread_cond_timedwait(&c->c, &m->m, &ts) == ETIMEDOUT) {
        return PCCL_ETIMEDOUT;
    }
    return PCCL_OK;
}

void
pccl__cond_signal(pccl__cond *c)
{
    pthread_cond_signal(&c->c);
}

void
pccl__cond_broadcast(pccl__cond *c)
{
    pthread_cond_broadcast(&c->c);
}

static void *
thread_main(void *arg)
{
    pccl__thread *t = arg;
    t->fn(t->arg);
    return NULL;
}

pccl_result
pccl__thread_start(pccl__thread *t, void (*fn)(void *), void *arg)
{
    sigset_t all, old;
    int rv;

    t->fn = fn;
    t->arg = arg;
    t->started = 0;
    /* The new thread inherits this mask: library threads take no signals. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rv = pthread_create(&t->tid, NULL, thread_main, t);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rv != 0) {
        return rv == EAGAIN ? PCCL_ENOMEM : (PCCL_ESYSERR | rv);
    }
    t->started = 1;
    return PCCL_OK;
}

typedef struct spawn_arg {
    void (*fn)(void *);
    void *arg;
} spawn_arg;

static void *
spawn_main(void *p)
{
    spawn_arg a = *(spawn_arg *)p;
    free(p);
    a.fn(a.arg);
    return NULL;
}

pccl_result
pccl__thread_spawn(void (*fn)(void *), void *arg)
{
    pthread_attr_t attr;
    sigset_t all, old;
    pthread_t tid;
    spawn_arg *a = malloc(sizeof(*a));
    int rv;

    if (a == NULL) {
        return PCCL_ENOMEM;
    }
    a->fn = fn;
    a->arg = arg;
    if ((rv = pthread_attr_init(&attr)) != 0) {
        free(a);
        return PCCL_ESYSERR | rv;
    }
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rv = pthread_create(&tid, &attr, spawn_main, a);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    if (rv != 0) {
        free(a);
        return rv == EAGAIN ? PCCL_ENOMEM : (PCCL_ESYSERR | rv);
    }
    return PCCL_OK;
}

void
pccl__thread_join(pccl__thread *t)
{
    if (t->started) {
        pthread_join(t->tid, NULL);
        t->started = 0;
    }
}

pccl_result
pccl__event_init(pccl__event *e)
{
    int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fd < 0) {
        return PCCL_ESYSERR | errno;
    }
    e->fd = fd;
    return PCCL_OK;
}

void
pccl__event_fini(pccl__event *e)
{
    if (e->fd >= 0) {
        close(e->fd);
        e->fd = -1;
    }
}

void
pccl__event_signal(pccl__event *e)
{
    uint64_t one = 1;
    ssize_t n;
    /* EAGAIN means the counter is saturated: still readable, fine. */
    do {
        n = write(e->fd, &one, sizeof(one));
    } while (n < 0 && errno == EINTR);
}

void
pccl__event_drain(pccl__event *e)
{
    uint64_t v;
    ssize_t n;
    do {
        n = read(e->fd, &v, sizeof(v));
    } while (n < 0 && errno == EINTR);
}
