/*
 * socket.c - TCP sockets and addresses on POSIX.
 *
 * Every socket is non-blocking and close-on-exec.  Writes use sendmsg
 * with MSG_NOSIGNAL, so a reset peer yields EPIPE instead of SIGPIPE.
 * Blocking helpers (connect, recv_all, send_all) wait with poll() on the
 * socket and an optional wake descriptor, so they end at a deadline or
 * when another thread signals the wake-up.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* accept4 */
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "platform/plat.h"

/* Keepalive: first probe after 10 s idle, then every 5 s, 3 probes.  The
 * ring's own progress timeout catches stalls while data should flow. */
enum { KEEP_IDLE_S = 10, KEEP_INTVL_S = 5, KEEP_CNT = 3 };

static pccl_result
syserr(int e)
{
    switch (e) {
    case ENOMEM:
    case ENOBUFS:
        return PCCL_ENOMEM;
    case ECONNREFUSED:
        return PCCL_ECONNREFUSED;
    case ECONNRESET:
    case EPIPE:
    case ECONNABORTED:
    case ENOTCONN:
    case ETIMEDOUT:   /* keepalive or retransmission gave up */
    case EHOSTUNREACH:
    case ENETUNREACH:
    case ENETDOWN:
        return PCCL_EPEERLOST;
    default:
        return PCCL_ESYSERR | e;
    }
}

/* ----------------------------------------------------------- addresses */

pccl_result
pccl__addr_parse(const char *s, int port_required, pccl__sockaddr *out)
{
    char host[256];
    const char *port = NULL;
    const char *colon;
    struct addrinfo hints, *res = NULL;
    size_t hlen;
    char *end;
    unsigned long pnum = 0;

    if (s == NULL || *s == '\0') {
        return PCCL_EADDR;
    }
    if (s[0] == '[') {
        const char *close = strchr(s, ']');
        if (close == NULL) {
            return PCCL_EADDR;
        }
        hlen = (size_t)(close - s - 1);
        if (hlen == 0 || hlen >= sizeof(host)) {
            return PCCL_EADDR;
        }
        memcpy(host, s + 1, hlen);
        host[hlen] = '\0';
        if (close[1] == ':') {
            port = close + 2;
        } else if (close[1] != '\0') {
            return PCCL_EADDR;
        }
    } else {
        colon = strchr(s, ':');
        if (colon != NULL && strchr(colon + 1, ':') != NULL) {
            /* Several colons without brackets: a bare IPv6 literal. */
            hlen = strlen(s);
        } else {
            hlen = colon ? (size_t)(colon - s) : strlen(s);
            port = colon ? colon + 1 : NULL;
        }
        if (hlen == 0 || hlen >= sizeof(host)) {
            return PCCL_EADDR;
        }
        memcpy(host, s, hlen);
        host[hlen] = '\0';
    }
    if (port != NULL) {
        if (*port == '\0' || *port == '-' || *port == '+') {
            return PCCL_EADDR;
        }
        errno = 0;
        pnum = strtoul(port, &end, 10);
        if (errno != 0 || *end != '\0' || pnum > 65535) {
            return PCCL_EADDR;
        }
    } else if (port_required) {
        return PCCL_EADDR;
    }

    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_ADDRCONFIG;
    if (getaddrinfo(host, NULL, &hints, &res) != 0 || res == NULL) {
        /* AI_ADDRCONFIG hides loopback-only families on some hosts. */
        hints.ai_flags = 0;
        if (getaddrinfo(host, NULL, &hints, &res) != 0 || res == NULL) {
            return PCCL_EADDR;
        }
    }
    if (res->ai_addrlen > sizeof(out->data) ||
        (res->ai_family != AF_INET && res->ai_family != AF_INET6)) {
        freeaddrinfo(res);
        return PCCL_EADDR;
    }
    memset(out, 0, sizeof(*out));
    memcpy(out->data, res->ai_addr, res->ai_addrlen);
    out->len = (uint32_t)res->ai_addrlen;
    if (res->ai_family == AF_INET) {
        ((struct sockaddr_in *)(void *)out->data)->sin_port = htons((uint16_t)pnum);
    } else {
        ((struct sockaddr_in6 *)(void *)out->data)->sin6_port = htons((uint16_t)pnum);
    }
    freeaddrinfo(res);
    return PCCL_OK;
}

pccl_result
pccl__addr_format(const pccl__sockaddr *a, char *buf, size_t len)
{
    char host[INET6_ADDRSTRLEN];
    const struct sockaddr *sa = (const struct sockaddr *)(const void *)a->data;
    unsigned port;
    int n;

    if (a->len == 0) {
        return PCCL_EINVAL;
    }
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const void *)a->data;
        inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
        port = ntohs(in->sin_port);
        n = snprintf(buf, len, "%s:%u", host, port);
    } else if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const void *)a->data;
        inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
        port = ntohs(in6->sin6_port);
        n = snprintf(buf, len, "[%s]:%u", host, port);
    } else {
        return PCCL_EINVAL;
    }
    if (n < 0 || (size_t)n >= len) {
        return PCCL_EINVAL;
    }
    return PCCL_OK;
}

/* ------------------------------------------------------------- sockets */

static int
family_of(const pccl__sockaddr *a)
{
    return ((const struct sockaddr *)(const void *)a->data)->sa_family;
}

static pccl_result
new_socket(int family, int *fd_out)
{
    int fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        return syserr(errno);
    }
    *fd_out = fd;
    return PCCL_OK;
}

pccl_result
pccl__sock_tune(int fd, int bufsize)
{
    int one = 1;
    int idle = KEEP_IDLE_S, intvl = KEEP_INTVL_S, cnt = KEEP_CNT;

    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) != 0 ||
        setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one)) != 0) {
        return syserr(errno);
    }
#ifdef TCP_KEEPIDLE
    (void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
    (void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl));
    (void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
#else
    (void)idle;
    (void)intvl;
    (void)cnt;
#endif
    if (bufsize > 0) {
        /* Best effort: the kernel caps these at net.core.*mem_max. */
        (void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bufsize, sizeof(bufsize));
        (void)setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bufsize, sizeof(bufsize));
    }
    return PCCL_OK;
}

pccl_result
pccl__sock_listen(const pccl__sockaddr *a, int *fd_out)
{
    int fd, one = 1;
    pccl_result rv;

    if (a->len == 0) {
        return PCCL_EADDR;
    }
    if ((rv = new_socket(family_of(a), &fd)) != 0) {
        return rv;
    }
    (void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, (const struct sockaddr *)(const void *)a->data, a->len) != 0) {
        int e = errno;
        close(fd);
        return (e == EADDRINUSE || e == EADDRNOTAVAIL || e == EACCES) ? PCCL_EADDR
                                                                      : syserr(e);
    }
    if (listen(fd, 256) != 0) {
        int e = errno;
        close(fd);
        return syserr(e);
    }
    *fd_out = fd;
    return PCCL_OK;
}

pccl_result
pccl__sock_local_addr(int fd, pccl__sockaddr *out)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);

    if (getsockname(fd, (struct sockaddr *)&ss, &len) != 0) {
        return syserr(errno);
    }
    if (len > sizeof(out->data)) {
        return PCCL_EADDR;
    }
    memset(out, 0, sizeof(*out));
    memcpy(out->data, &ss, len);
    out->len = (uint32_t)len;
    return PCCL_OK;
}

pccl_result
pccl__sock_accept(int lfd, int *fd_out)
{
    int fd;
    pccl_result rv;

    for (;;) {
        fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0) {
            break;
        }
        if (errno == EINTR) {
            continue;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ECONNABORTED) {
            return PCCL_ETIMEDOUT;
        }
        return syserr(errno);
    }
    if ((rv = pccl__sock_tune(fd, 0)) != 0) {
        close(fd);
        return rv;
    }
    *fd_out = fd;
    return PCCL_OK;
}

pccl_result
pccl__sock_wait(int fd, int want_write, uint64_t deadline, int wake_fd)
{
    struct pollfd pfd[2];
    int n, nfds = 1;

    pfd[0].fd = fd;
    pfd[0].events = want_write ? POLLOUT : POLLIN;
    if (wake_fd >= 0) {
        pfd[1].fd = wake_fd;
        pfd[1].events = POLLIN;
        nfds = 2;
    }
    for (;;) {
        pfd[0].revents = 0;
        if (nfds == 2) {
            pfd[1].revents = 0;
        }
        n = poll(pfd, (nfds_t)nfds, pccl__poll_timeout_ms(deadline));
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return syserr(errno);
        }
        if (nfds == 2 && pfd[1].revents != 0) {
            return PCCL_EABORTED;
        }
        if (pfd[0].revents != 0) {
            return PCCL_OK;
        }
        if (deadline != PCCL__NO_DEADLINE && pccl__clock_ns() >= deadline) {
            return PCCL_ETIMEDOUT;
        }
    }
}

int
pccl__poll_hangup(int wake_fd, const int *fds, size_t n, int block)
{
    struct pollfd pfd[PCCL__MAX_HANGUP_FDS + 1];
    size_t i, m = 0;
    int rv;

    if (n > PCCL__MAX_HANGUP_FDS) {
        n = PCCL__MAX_HANGUP_FDS;
    }
    for (i = 0; i < n; i++) {
        pfd[m].fd = fds[i];
#ifdef POLLRDHUP
        pfd[m].events = POLLRDHUP;
#else
        pfd[m].events = 0; /* POLLHUP and POLLERR are always reported */
#endif
        pfd[m++].revents = 0;
    }
    if (wake_fd >= 0) {
        pfd[m].fd = wake_fd;
        pfd[m].events = POLLIN;
        pfd[m++].revents = 0;
    }
    while ((rv = poll(pfd, (nfds_t)m, block ? -1 : 0)) < 0 && errno == EINTR) {
    }
    for (i = 0; rv > 0 && i < n; i++) {
        if (pfd[i].revents != 0) {
            return 1;
        }
    }
    return 0;
}

pccl_result
pccl__wait_readable(const int *fds, int n, uint64_t deadline, uint32_t *ready)
{
    struct pollfd pfd[8];
    int i, got;

    if (n < 1 || n > 8) {
        return PCCL_EINVAL;
    }
    for (i = 0; i < n; i++) {
        pfd[i].fd = fds[i];
        pfd[i].events = POLLIN;
    }
    for (;;) {
        for (i = 0; i < n; i++) {
            pfd[i].revents = 0;
        }
        got = poll(pfd, (nfds_t)n, pccl__poll_timeout_ms(deadline));
        if (got < 0) {
            if (errno == EINTR) {
                continue;
            }
            return syserr(errno);
        }
        if (got > 0) {
            *ready = 0;
            for (i = 0; i < n; i++) {
                if (pfd[i].revents != 0) {
                    *ready |= 1u << i;
                }
            }
            return PCCL_OK;
        }
        if (deadline != PCCL__NO_DEADLINE && pccl__clock_ns() >= deadline) {
            return PCCL_ETIMEDOUT;
        }
    }
}

pccl_result
pccl__sock_connect(const pccl__sockaddr *to, const pccl__sockaddr *bind_to, uint64_t deadline,
                   int wake_fd, int *fd_out)
{
    int fd, err = 0;
    socklen_t elen = sizeof(err);
    pccl_result rv;

    if (to->len == 0) {
        return PCCL_EADDR;
    }
    if ((rv = new_socket(family_of(to), &fd)) != 0) {
        return rv;
    }
    if (bind_to != NULL && bind_to->len != 0) {
#ifdef IP_BIND_ADDRESS_NO_PORT
        int one = 1;
        /* Port 0: let connect() pick the port, so the 4-tuple stays unique. */
        (void)setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
#endif
        if (bind(fd, (const struct sockaddr *)(const void *)bind_to->data, bind_to->len) != 0) {
            close(fd);
            return PCCL_EADDR;
        }
    }
    if (connect(fd, (const struct sockaddr *)(const void *)to->data, to->len) != 0) {
        if (errno != EINPROGRESS && errno != EINTR) {
            int e = errno;
            close(fd);
            return e == EADDRNOTAVAIL ? PCCL_EADDR : syserr(e);
        }
        if ((rv = pccl__sock_wait(fd, 1, deadline, wake_fd)) != 0) {
            close(fd);
            return rv;
        }
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen) != 0) {
            err = errno;
        }
        if (err != 0) {
            close(fd);
            return syserr(err);
        }
    }
    if ((rv = pccl__sock_tune(fd, 0)) != 0) {
        close(fd);
        return rv;
    }
    *fd_out = fd;
    return PCCL_OK;
}

/* The result of a nonblocking recv/sendmsg that returned n < 0: 1 to retry
 * (EINTR), else *moved = 0 and PCCL_OK for "would block", or the error. */
static int
io_failed(size_t *moved, pccl_result *rv)
{
    if (errno == EINTR) {
        return 1;
    }
    *moved = 0;
    *rv = (errno == EAGAIN || errno == EWOULDBLOCK) ? PCCL_OK : syserr(errno);
    return 0;
}

pccl_result
pccl__sock_read(int fd, void *buf, size_t len, size_t *got)
{
    ssize_t n;
    pccl_result rv;

    for (;;) {
        n = recv(fd, buf, len, 0);
        if (n > 0) {
            *got = (size_t)n;
            return PCCL_OK;
        }
        if (n == 0) {
            return len == 0 ? (*got = 0, PCCL_OK) : PCCL_EPEERLOST;
        }
        if (!io_failed(got, &rv)) {
            return rv;
        }
    }
}

pccl_result
pccl__sock_writev(int fd, const pccl__iov *iov, int n, size_t *put)
{
    struct iovec v[PCCL__MAX_IOV];
    struct msghdr msg;
    ssize_t w;
    pccl_result rv;
    int i;

    if (n > PCCL__MAX_IOV) {
        n = PCCL__MAX_IOV;
    }
    for (i = 0; i < n; i++) {
        v[i].iov_base = (void *)(uintptr_t)iov[i].base;
        v[i].iov_len = iov[i].len;
    }
    memset(&msg, 0, sizeof(msg));
    msg.msg_iov = v;
    msg.msg_iovlen = (size_t)n;
    for (;;) {
        w = sendmsg(fd, &msg, MSG_NOSIGNAL);
        if (w >= 0) {
            *put = (size_t)w;
            return PCCL_OK;
        }
        if (!io_failed(put, &rv)) {
            return rv;
        }
    }
}

pccl_result
pccl__sock_recv_all(int fd, void *buf, size_t len, uint64_t deadline, int wake_fd)
{
    uint8_t *p = buf;
    size_t got;
    pccl_result rv;

    while (len > 0) {
        if ((rv = pccl__sock_read(fd, p, len, &got)) != 0) {
            return rv;
        }
        if (got == 0) {
            if ((rv = pccl__sock_wait(fd, 0, deadline, wake_fd)) != 0) {
                return rv;
            }
            continue;
        }
        p += got;
        len -= got;
    }
    return PCCL_OK;
}

pccl_result
pccl__sock_send_all(int fd, const void *buf, size_t len, uint64_t deadline, int wake_fd)
{
    const uint8_t *p = buf;
    pccl__iov iov;
    size_t put;
    pccl_result rv;

    while (len > 0) {
        iov.base = p;
        iov.len = len;
        if ((rv = pccl__sock_writev(fd, &iov, 1, &put)) != 0) {
            return rv;
        }
        if (put == 0) {
            if ((rv = pccl__sock_wait(fd, 1, deadline, wake_fd)) != 0) {
                return rv;
            }
            continue;
        }
        p += put;
        len -= put;
    }
    return PCCL_OK;
}

void
pccl__sock_close(int fd)
{
    if (fd >= 0) {
        close(fd);
    }
}
