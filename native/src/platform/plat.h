/*
 * plat.h - the platform layer: threads, locks, clocks, sockets, poller.
 *
 * Everything above this layer (net/, coll/, core/) calls these functions
 * and never includes an operating-system header for sockets or polling.
 * The POSIX implementation lives in platform/posix/.  Sockets are plain
 * int descriptors (-1: none); every socket this layer creates is
 * non-blocking and close-on-exec, and blocking behaviour is emulated with
 * pccl__sock_wait and a deadline, so a blocked call can always be woken
 * through a "wake" descriptor (a pccl__event) or end at its deadline.
 *
 * Times are CLOCK_MONOTONIC.  A deadline is an absolute time in ns;
 * PCCL__NO_DEADLINE means "never".
 */
#ifndef PCCL_PLATFORM_PLAT_H
#define PCCL_PLATFORM_PLAT_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "pccl.h"

/* ---------------------------------------------------------------- time */

#define PCCL__NO_DEADLINE UINT64_MAX

/* pccl__clock_ns: monotonic time in ns.  Any thread. */
uint64_t pccl__clock_ns(void);
/* pccl__clock_ms: monotonic time in ms.  Any thread. */
uint64_t pccl__clock_ms(void);
/* pccl__deadline_ms: now + ms as a deadline; ms < 0 gives PCCL__NO_DEADLINE. */
uint64_t pccl__deadline_ms(int32_t ms);
/* pccl__poll_timeout_ms: milliseconds from now until deadline, rounded up,
 * clamped to INT32_MAX; -1 for PCCL__NO_DEADLINE; 0 when passed. */
int pccl__poll_timeout_ms(uint64_t deadline);
/* pccl__sleep_ms sleeps the calling thread (tests, retry back-off). */
void pccl__sleep_ms(uint32_t ms);
/* pccl__thread_yield gives the CPU to another runnable thread. */
void pccl__thread_yield(void);

/* ------------------------------------------------------------- threads */

typedef struct pccl__mutex {
    pthread_mutex_t m;
} pccl__mutex;

typedef struct pccl__cond {
    pthread_cond_t c;
} pccl__cond;

typedef struct pccl__thread {
    pthread_t tid;
    void (*fn)(void *);
    void *arg;
    int started;
} pccl__thread;

pccl_result pccl__mutex_init(pccl__mutex *m);
void pccl__mutex_fini(pccl__mutex *m);
void pccl__mutex_lock(pccl__mutex *m);
/* pccl__mutex_trylock takes m if it is free: 1, else 0 at once. */
int pccl__mutex_trylock(pccl__mutex *m);
void pccl__mutex_unlock(pccl__mutex *m);

/* pccl__cond_init makes a condition variable timed on CLOCK_MONOTONIC. */
pccl_result pccl__cond_init(pccl__cond *c);
void pccl__cond_fini(pccl__cond *c);
void pccl__cond_wait(pccl__cond *c, pccl__mutex *m);
/* pccl__cond_wait_until waits until signalled (may be spurious) or the
 * deadline passes: PCCL_OK or PCCL_ETIMEDOUT. */
pccl_result pccl__cond_wait_until(pccl__cond *c, pccl__mutex *m, uint64_t deadline);
void pccl__cond_signal(pccl__cond *c);
void pccl__cond_broadcast(pccl__cond *c);

/* pccl__thread_start runs fn(arg) on a new thread (all signals blocked on
 * it, so SIGPIPE or SIGINT never land in library threads). */
pccl_result pccl__thread_start(pccl__thread *t, void (*fn)(void *), void *arg);
/* pccl__thread_spawn runs fn(arg) on a detached thread (never joined; the
 * caller tracks its end itself).  Signals blocked as above. */
pccl_result pccl__thread_spawn(void (*fn)(void *), void *arg);
/* pccl__thread_join waits for a started thread; no-op if never started. */
void pccl__thread_join(pccl__thread *t);

/* -------------------------------------------------------------- events */

/* A wake-up descriptor (eventfd): readable once signalled, until drained. */
typedef struct pccl__event {
    int fd;
} pccl__event;

pccl_result pccl__event_init(pccl__event *e);
void pccl__event_fini(pccl__event *e);
/* pccl__event_signal makes fd readable.  Any thread, async-safe. */
void pccl__event_signal(pccl__event *e);
/* pccl__event_drain makes fd non-readable again. */
void pccl__event_drain(pccl__event *e);

/* ------------------------------------------------------------ addresses */

typedef struct pccl__sockaddr {
    uint32_t len;               /* 0: unset */
    uint8_t data[128];          /* a struct sockaddr_storage */
} pccl__sockaddr;

/* pccl__addr_parse resolves "host:port", "[v6]:port", and when
 * port_required is 0 also "host", "[v6]" and a bare IPv6 literal (port 0).
 * host may be a name (resolved with getaddrinfo, first result).
 * PCCL_EADDR when it cannot be parsed or resolved. */
pccl_result pccl__addr_parse(const char *s, int port_required, pccl__sockaddr *out);
/* pccl__addr_format writes "a.b.c.d:port" or "[v6]:port"; PCCL_EINVAL if
 * buf is too small. */
pccl_result pccl__addr_format(const pccl__sockaddr *a, char *buf, size_t len);

/* -------------------------------------------------------------- sockets */

typedef struct pccl__iov {
    const void *base;
    size_t len;
} pccl__iov;

/* The most iov entries pccl__sock_writev accepts. */
enum { PCCL__MAX_IOV = 64 };

/* pccl__sock_listen binds a non-blocking listening TCP socket. */
pccl_result pccl__sock_listen(const pccl__sockaddr *a, int *fd_out);
/* pccl__sock_local_addr reports the address fd is bound to. */
pccl_result pccl__sock_local_addr(int fd, pccl__sockaddr *out);
/* pccl__sock_accept takes one pending connection (non-blocking, tuned
 * like pccl__sock_tune).  PCCL_ETIMEDOUT when none is pending. */
pccl_result pccl__sock_accept(int lfd, int *fd_out);
/* pccl__sock_connect opens a non-blocking TCP connection to `to`, bound
 * first to bind_to when not NULL, waiting until deadline or until wake_fd
 * (may be -1) is readable (PCCL_EABORTED).  PCCL_ECONNREFUSED,
 * PCCL_ETIMEDOUT, PCCL_EADDR (bind failed).  The socket is tuned. */
pccl_result pccl__sock_connect(const pccl__sockaddr *to, const pccl__sockaddr *bind_to,
                               uint64_t deadline, int wake_fd, int *fd_out);
/* pccl__sock_tune sets TCP_NODELAY, keepalive (idle/interval/count) and,
 * when bufsize > 0, SO_SNDBUF/SO_RCVBUF. */
pccl_result pccl__sock_tune(int fd, int bufsize);
/* pccl__sock_wait blocks until fd is readable (want_write 0) or writable
 * (1), the deadline passes (PCCL_ETIMEDOUT) or wake_fd is readable
 * (PCCL_EABORTED).  Error/hang-up count as ready. */
pccl_result pccl__sock_wait(int fd, int want_write, uint64_t deadline, int wake_fd);
/* pccl__poll_hangup looks for a hang-up or error on the n sockets in fds
 * (n <= PCCL__MAX_HANGUP_FDS; data arriving on them does not count):
 * block 0 looks without waiting, block 1 waits until there is one or
 * wake_fd (>= 0) is readable.  Returns 1 if a socket is hung up. */
enum { PCCL__MAX_HANGUP_FDS = 128 };
int pccl__poll_hangup(int wake_fd, const int *fds, size_t n, int block);
/* pccl__wait_readable waits until one of n (<= 8) descriptors is
 * readable (or errored) or the deadline passes (PCCL_ETIMEDOUT); *ready
 * gets bit i set for each ready fds[i]. */
pccl_result pccl__wait_readable(const int *fds, int n, uint64_t deadline, uint32_t *ready);
/* pccl__sock_read reads up to len bytes; *got 0 means "would block".
 * End of stream or reset: PCCL_EPEERLOST. */
pccl_result pccl__sock_read(int fd, void *buf, size_t len, size_t *got);
/* pccl__sock_writev writes from n (<= PCCL__MAX_IOV) buffers without
 * raising SIGPIPE; *put 0 means "would block".  Reset: PCCL_EPEERLOST. */
pccl_result pccl__sock_writev(int fd, const pccl__iov *iov, int n, size_t *put);
/* pccl__sock_recv_all / send_all move exactly len bytes, waiting with
 * pccl__sock_wait semantics.  For handshakes, not the data path. */
pccl_result pccl__sock_recv_all(int fd, void *buf, size_t len, uint64_t deadline, int wake_fd);
pccl_result pccl__sock_send_all(int fd, const void *buf, size_t len, uint64_t deadline,
                                int wake_fd);
/* pccl__sock_close closes fd if >= 0. */
void pccl__sock_close(int fd);

/* --------------------------------------------------------------- poller */

enum pccl__poll_flags {
    PCCL__POLL_IN = 1,
    PCCL__POLL_OUT = 2,
    PCCL__POLL_ERR = 4,  /* error or hang-up; reported whatever was asked */
    PCCL__POLL_RDHUP = 8 /* ask for peer hang-up alone (reported as ERR) */
};

typedef struct pccl__poll_event {
    void *ptr;
    uint32_t flags;
} pccl__poll_event;

/* A level-triggered readiness poller (epoll).  One thread waits on it;
 * add/mod/del from that thread. */
typedef struct pccl__poller {
    int fd;
} pccl__poller;

pccl_result pccl__poller_init(pccl__poller *p);
void pccl__poller_fini(pccl__poller *p);
pccl_result pccl__poller_add(pccl__poller *p, int fd, uint32_t flags, void *ptr);
pccl_result pccl__poller_mod(pccl__poller *p, int fd, uint32_t flags, void *ptr);
void pccl__poller_del(pccl__poller *p, int fd);
/* pccl__poller_wait waits up to timeout_ms (-1: forever) and writes at
 * most max events; *n may be 0 (timeout or EINTR). */
pccl_result pccl__poller_wait(pccl__poller *p, pccl__poll_event *ev, int max, int timeout_ms,
                              int *n);

#endif
