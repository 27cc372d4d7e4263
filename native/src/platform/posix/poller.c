/*
 * poller.c - level-triggered epoll behind pccl__poller.
 */
#include <errno.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "platform/plat.h"

static uint32_t
to_epoll(uint32_t flags)
{
    uint32_t ev = 0;
    if (flags & PCCL__POLL_IN) {
        ev |= EPOLLIN | EPOLLRDHUP;
    }
    if (flags & PCCL__POLL_OUT) {
        ev |= EPOLLOUT;
    }
    if (flags & PCCL__POLL_RDHUP) {
        ev |= EPOLLRDHUP;
    }
    return ev;
}

pccl_result
pccl__poller_init(pccl__poller *p)
{
    int fd = epoll_create1(EPOLL_CLOEXEC);
    if (fd < 0) {
        return PCCL_ESYSERR | errno;
    }
    p->fd = fd;
    return PCCL_OK;
}

void
pccl__poller_fini(pccl__poller *p)
{
    if (p->fd >= 0) {
        close(p->fd);
        p->fd = -1;
    }
}

static pccl_result
ctl(pccl__poller *p, int op, int fd, uint32_t flags, void *ptr)
{
    struct epoll_event ev;
    ev.events = to_epoll(flags);
    ev.data.ptr = ptr;
    if (epoll_ctl(p->fd, op, fd, &ev) != 0) {
        return errno == ENOMEM ? PCCL_ENOMEM : (PCCL_ESYSERR | errno);
    }
    return PCCL_OK;
}

pccl_result
pccl__poller_add(pccl__poller *p, int fd, uint32_t flags, void *ptr)
{
    return ctl(p, EPOLL_CTL_ADD, fd, flags, ptr);
}

pccl_result
pccl__poller_mod(pccl__poller *p, int fd, uint32_t flags, void *ptr)
{
    return ctl(p, EPOLL_CTL_MOD, fd, flags, ptr);
}

void
pccl__poller_del(pccl__poller *p, int fd)
{
    struct epoll_event ev = {0};
    (void)epoll_ctl(p->fd, EPOLL_CTL_DEL, fd, &ev);
}

pccl_result
pccl__poller_wait(pccl__poller *p, pccl__poll_event *out, int max, int timeout_ms, int *n)
{
    struct epoll_event ev[64];
    int i, got;

    if (max > 64) {
        max = 64;
    }
    got = epoll_wait(p->fd, ev, max, timeout_ms);
    if (got < 0) {
        if (errno == EINTR) {
            *n = 0;
            return PCCL_OK;
        }
        return PCCL_ESYSERR | errno;
    }
    for (i = 0; i < got; i++) {
        uint32_t f = 0;
        if (ev[i].events & EPOLLIN) {
            f |= PCCL__POLL_IN;
        }
        if (ev[i].events & EPOLLOUT) {
            f |= PCCL__POLL_OUT;
        }
        if (ev[i].events & (EPOLLERR | EPOLLHUP | EPOLLRDHUP)) {
            f |= PCCL__POLL_ERR;
        }
        out[i].ptr = ev[i].data.ptr;
        out[i].flags = f;
    }
    *n = got;
    return PCCL_OK;
}
