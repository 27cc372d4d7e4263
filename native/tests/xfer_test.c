/*
 * xfer_test.c - shared-state transfers: publish/fetch of whole and partial
 * ranges, refusals (unknown key, range outside the buffer, duplicate key),
 * authentication, a server that dies mid-transfer (the receiver learns how
 * much arrived), malformed replies and requests, unpublish cutting off a
 * send in flight, close waking a blocked fetch, and concurrent fetches.
 */
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

#include "net/frame.h"
#include "net/link.h"
#include "pccl.h"
#include "platform/plat.h"
#include "testutil.h"

static pccl_comm *
make_comm(const char *secret, char *addr)
{
    pccl_comm_config cfg;
    pccl_comm *c;

    CHECK_OK(pccl_comm_config_init(&cfg));
    cfg.listen_addr = "127.0.0.1:0";
    cfg.p2p_connections = 1;
    cfg.handshake_timeout_ms = 2000;
    cfg.progress_timeout_ms = 10000;
    if (secret != NULL) {
        cfg.secret = (const uint8_t *)secret;
        cfg.secret_len = strlen(secret);
    }
    CHECK_OK(pccl_comm_create(&cfg, &c));
    CHECK_OK(pccl_comm_listen_address(c, addr, PCCL_ADDRSTRLEN));
    return c;
}

static uint8_t *
pattern(size_t n, uint32_t seed)
{
    uint8_t *p = malloc(n ? n : 1);
    size_t i;
    CHECK(p != NULL);
    for (i = 0; i < n; i++) {
        p[i] = (uint8_t)((i * 2654435761u + seed) >> 13);
    }
    return p;
}

/* ------------------------------------------------------------ basics */

static void
test_publish_fetch(void)
{
    char sa[PCCL_ADDRSTRLEN], ca[PCCL_ADDRSTRLEN];
    pccl_comm *srv = make_comm("s3cret", sa), *cli = make_comm("s3cret", ca);
    size_t n = (3u << 20) + 17; /* not a multiple of anything */
    uint8_t *src = pattern(n, 1), *dst = malloc(n);
    uint64_t got = 99, tx = 0;

    CHECK(dst != NULL);
    CHECK_OK(pccl_comm_publish(srv, 42, src, n));
    CHECK_RV(pccl_comm_publish(srv, 42, src, n), PCCL_EBUSY);
    CHECK_OK(pccl_comm_publish(srv, 7, NULL, 0)); /* an empty tensor */

    memset(dst, 0, n);
    CHECK_OK(pccl_comm_fetch(cli, sa, 42, 0, n, dst, 5000, &got));
    CHECK(got == n && memcmp(dst, src, n) == 0);

    memset(dst, 0, n);
    CHECK_OK(pccl_comm_fetch(cli, sa, 42, 1000, 12345, dst, 5000, &got));
    CHECK(got == 12345 && memcmp(dst, src + 1000, 12345) == 0);
    CHECK_OK(pccl_comm_fetch(cli, sa, 42, n, 0, dst, 5000, &got)); /* empty range at the end */
    CHECK(got == 0);
    CHECK_OK(pccl_comm_fetch(cli, sa, 7, 0, 0, NULL, 5000, NULL));

    /* Refusals. */
    CHECK_RV(pccl_comm_fetch(cli, sa, 43, 0, 1, dst, 5000, &got), PCCL_ENOTFOUND);
    CHECK(got == 0);
    CHECK_RV(pccl_comm_fetch(cli, sa, 42, 0, n + 1, dst, 5000, &got), PCCL_EINVAL);
    CHECK_RV(pccl_comm_fetch(cli, sa, 42, n + 1, 0, dst, 5000, &got), PCCL_EINVAL);
    CHECK_RV(pccl_comm_fetch(cli, sa, 42, n - 1, 2, dst, 5000, &got), PCCL_EINVAL);
    CHECK_RV(pccl_comm_fetch(cli, sa, 42, UINT64_MAX, 2, dst, 5000, &got), PCCL_EINVAL);
    CHECK_RV(pccl_comm_fetch(cli, sa, 42, 0, 1, NULL, 5000, &got), PCCL_EINVAL);
    CHECK_RV(pccl_comm_fetch(cli, "no-port", 42, 0, 1, dst, 5000, &got), PCCL_EADDR);

    CHECK_OK(pccl_comm_unpublish(srv, 42, &tx));
    CHECK(tx == n + 12345);
    CHECK_RV(pccl_comm_unpublish(srv, 42, &tx), PCCL_ENOTFOUND);
    CHECK_RV(pccl_comm_fetch(cli, sa, 42, 0, 1, dst, 5000, &got), PCCL_ENOTFOUND);
    CHECK_OK(pccl_comm_unpublish(srv, 7, NULL));
    /* A key can be published again after unpublish. */
    CHECK_OK(pccl_comm_publish(srv, 42, src, 10));

    CHECK_OK(pccl_comm_free(cli));
    CHECK_OK(pccl_comm_free(srv)); /* frees what is still published */
    free(src);
    free(dst);
}

static void
test_auth(void)
{
    char sa[PCCL_ADDRSTRLEN], ca[PCCL_ADDRSTRLEN], na[PCCL_ADDRSTRLEN];
    pccl_comm *srv = make_comm("right", sa), *wrong = make_comm("wrong", ca);
    pccl_comm *none = make_comm(NULL, na);
    uint8_t src[64] = {1, 2, 3}, dst[64];
    uint64_t got = 5;

    CHECK_OK(pccl_comm_publish(srv, 1, src, sizeof(src)));
    CHECK_RV(pccl_comm_fetch(wrong, sa, 1, 0, sizeof(src), dst, 5000, &got), PCCL_EAUTH);
    CHECK(got == 0);
    CHECK_RV(pccl_comm_fetch(none, sa, 1, 0, sizeof(src), dst, 5000, &got), PCCL_EAUTH);
    /* And a client with a secret refuses a server without one. */
    CHECK_OK(pccl_comm_publish(none, 1, src, sizeof(src)));
    CHECK_RV(pccl_comm_fetch(wrong, na, 1, 0, sizeof(src), dst, 5000, &got), PCCL_EAUTH);
    CHECK_OK(pccl_comm_free(srv));
    CHECK_OK(pccl_comm_free(wrong));
    CHECK_OK(pccl_comm_free(none));
}

/* ------------------------------------------------------ a fake server */

enum { FAKE_SHORT = 1, FAKE_BAD_MAGIC = 2, FAKE_BAD_LEN = 3, FAKE_STALL = 4 };

typedef struct fake_server {
    int lfd;
    int mode;
    char addr[PCCL_ADDRSTRLEN];
    uint64_t announce;      /* payload length it claims */
    uint64_t send;          /* payload bytes it really sends */
    pccl__event stop;
    pthread_t thread;
    int cfd;                /* its end of the connection, once served */
    tu_gate served;         /* reply and payload written */
} fake_server;

/* Bytes waiting to be read on fd, and bytes written on fd the peer has
 * not acknowledged yet. */
static int
inq(int fd)
{
    int n = -1;
    CHECK(ioctl(fd, FIONREAD, &n) == 0);
    return n;
}

static int
outq(int fd)
{
    int n = -1;
    CHECK(ioctl(fd, TIOCOUTQ, &n) == 0);
    return n;
}

/* The descriptor of this process that is the other end of TCP socket fd
 * (a connection from one part of the test to another), or -1. */
static int
other_end(int fd)
{
    struct sockaddr_storage peer, mine;
    socklen_t pl = sizeof(peer), ml;
    int i;

    CHECK(getpeername(fd, (struct sockaddr *)&peer, &pl) == 0);
    for (i = 0; i < 4096; i++) {
        ml = sizeof(mine);
        if (i != fd && getsockname(i, (struct sockaddr *)&mine, &ml) == 0 && ml == pl &&
            memcmp(&mine, &peer, pl) == 0) {
            return i;
        }
    }
    return -1;
}

static void *
fake_main(void *p)
{
    fake_server *f = p;
    uint8_t req[32], rep[24];
    pccl__hs_server st;
    uint64_t deadline = pccl__deadline_ms(5000), i;
    uint8_t chunk[4096];
    int fd = -1;

    while (pccl__sock_accept(f->lfd, &fd) == PCCL_ETIMEDOUT) {
        CHECK(pccl__sock_wait(f->lfd, 0, deadline, -1) == PCCL_OK);
    }
    CHECK_OK(pccl__link_server_hello(fd, NULL, 0, deadline, -1, &st));
    CHECK(st.hello.purpose == 2);
    CHECK_OK(pccl__link_server_ack(fd, &st, 0, NULL, 0, deadline, -1));
    CHECK_OK(pccl__sock_recv_all(fd, req, sizeof(req), deadline, -1));
    CHECK(pccl__get_u32(req) == 0x51584350 && pccl__get_u16(req + 4) == 1);
    pccl__put_u32(rep, f->mode == FAKE_BAD_MAGIC ? 0xdeadbeef : 0x41584350);
    pccl__put_u16(rep + 4, 1);
    pccl__put_u16(rep + 6, 0);
    pccl__put_u64(rep + 8, f->announce);
    pccl__put_u64(rep + 16, f->announce);
    CHECK_OK(pccl__sock_send_all(fd, rep, sizeof(rep), deadline, -1));
    memset(chunk, 0xab, sizeof(chunk));
    for (i = 0; i < f->send; i += sizeof(chunk)) {
        size_t n = f->send - i < sizeof(chunk) ? (size_t)(f->send - i) : sizeof(chunk);
        if (pccl__sock_send_all(fd, chunk, n, deadline, -1) != 0) {
            break;
        }
    }
    f->cfd = fd;
    tu_gate_add(&f->served);
    if (f->mode == FAKE_STALL) {
        /* Hold the connection open, silent, until told to stop. */
        (void)pccl__sock_wait(f->stop.fd, 0, pccl__deadline_ms(20000), -1);
    }
    pccl__sock_close(fd); /* "dies": the stream ends early */
    return NULL;
}

static void
fake_start(fake_server *f, int mode, uint64_t announce, uint64_t send)
{
    pccl__sockaddr a;

    memset(f, 0, sizeof(*f));
    f->mode = mode;
    f->announce = announce;
    f->send = send;
    f->cfd = -1;
    tu_gate_init(&f->served);
    CHECK_OK(pccl__event_init(&f->stop));
    CHECK_OK(pccl__addr_parse("127.0.0.1:0", 1, &a));
    CHECK_OK(pccl__sock_listen(&a, &f->lfd));
    CHECK_OK(pccl__sock_local_addr(f->lfd, &a));
    CHECK_OK(pccl__addr_format(&a, f->addr, sizeof(f->addr)));
    CHECK(pthread_create(&f->thread, NULL, fake_main, f) == 0);
}

static void
fake_stop(fake_server *f)
{
    pccl__event_signal(&f->stop);
    CHECK(pthread_join(f->thread, NULL) == 0);
    pccl__sock_close(f->lfd);
    pccl__event_fini(&f->stop);
    tu_gate_fini(&f->served);
}

static void
test_server_dies_mid_transfer(void)
{
    char ca[PCCL_ADDRSTRLEN];
    pccl_comm *cli = make_comm(NULL, ca);
    size_t n = 1u << 20;
    uint8_t *dst = malloc(n);
    uint64_t got = 0;
    fake_server f;
    size_t i;

    CHECK(dst != NULL);
    memset(dst, 0, n);
    fake_start(&f, FAKE_SHORT, n, 300000);
    CHECK_RV(pccl_comm_fetch(cli, f.addr, 1, 0, n, dst, 5000, &got), PCCL_EPEERLOST);
    CHECK(got == 300000); /* exactly the prefix that arrived */
    for (i = 0; i < got; i++) {
        CHECK(dst[i] == 0xab);
    }
    CHECK(dst[got] == 0);
    fake_stop(&f);

    fake_start(&f, FAKE_BAD_MAGIC, 16, 16);
    CHECK_RV(pccl_comm_fetch(cli, f.addr, 1, 0, 16, dst, 5000, &got), PCCL_EPROTO);
    CHECK(got == 0);
    fake_stop(&f);

    fake_start(&f, FAKE_BAD_LEN, 1u << 30, 0); /* announces more than asked: refused */
    CHECK_RV(pccl_comm_fetch(cli, f.addr, 1, 0, 16, dst, 5000, &got), PCCL_EPROTO);
    fake_stop(&f);

    /* A distributor that stalls (frozen process): the idle timeout ends it. */
    fake_start(&f, FAKE_STALL, n, 1000);
    {
        uint64_t t0 = pccl__clock_ms();
        CHECK_RV(pccl_comm_fetch(cli, f.addr, 1, 0, n, dst, 300, &got), PCCL_ETIMEDOUT);
        CHECK(got == 1000);
        CHECK(pccl__clock_ms() - t0 < 3000);
    }
    fake_stop(&f);
    CHECK_OK(pccl_comm_free(cli));
    free(dst);
}

typedef struct fetch_arg {
    pccl_comm *comm;
    const char *addr;
    uint64_t key, off, len;
    uint8_t *dst;
    int32_t timeout_ms;
    pccl_result rv;
    uint64_t got;
} fetch_arg;

static void *
fetch_main(void *p)
{
    fetch_arg *a = p;
    a->rv = pccl_comm_fetch(a->comm, a->addr, a->key, a->off, a->len, a->dst, a->timeout_ms,
                            &a->got);
    return NULL;
}

static void
test_close_wakes_fetch(void)
{
    char ca[PCCL_ADDRSTRLEN];
    pccl_comm *cli = make_comm(NULL, ca);
    uint8_t dst[4096];
    fake_server f;
    fetch_arg a;
    pthread_t t;
    uint64_t t0;

    fake_start(&f, FAKE_STALL, sizeof(dst), 100);
    memset(&a, 0, sizeof(a));
    a.comm = cli;
    a.addr = f.addr;
    a.key = 1;
    a.len = sizeof(dst);
    a.dst = dst;
    a.timeout_ms = -1; /* only close can end it */
    CHECK(pthread_create(&t, NULL, fetch_main, &a) == 0);
    /* Close once the fetch has read all the server sent and waits for
     * more: the reply and 100 bytes written, acknowledged by the client's
     * kernel, and read by the client (its socket's queue empty). */
    tu_gate_wait(&f.served, 1, 10000);
    TU_WAIT_UNTIL(outq(f.cfd) == 0, 10000);
    {
        int cli_fd = other_end(f.cfd);
        CHECK(cli_fd >= 0);
        TU_WAIT_UNTIL(inq(cli_fd) == 0, 10000);
    }
    t0 = pccl__clock_ms();
    CHECK_OK(pccl_comm_close(cli));
    CHECK(pthread_join(t, NULL) == 0);
    CHECK(pccl__clock_ms() - t0 < 2000);
    CHECK_RV(a.rv, PCCL_ECLOSED);
    CHECK(a.got == 100);
    CHECK_RV(pccl_comm_fetch(cli, f.addr, 1, 0, 1, dst, 100, NULL), PCCL_ECLOSED);
    CHECK_RV(pccl_comm_publish(cli, 3, dst, 1), PCCL_ECLOSED);
    fake_stop(&f);
    CHECK_OK(pccl_comm_free(cli));
}

/* --------------------------------------------------- a raw slow client */

/* Connect, authenticate and send a request by hand; returns the fd. */
static int
raw_request(const char *addr, uint32_t magic, uint64_t key, uint64_t off, uint64_t len)
{
    pccl__sockaddr to;
    pccl__hs_client_hello h;
    uint8_t req[32];
    uint64_t deadline = pccl__deadline_ms(5000);
    int fd;

    CHECK_OK(pccl__addr_parse(addr, 1, &to));
    CHECK_OK(pccl__sock_connect(&to, NULL, deadline, -1, &fd));
    memset(&h, 0, sizeof(h));
    h.purpose = 2;
    h.world = 1;
    h.nconns = 1;
    CHECK_OK(pccl__link_client_handshake(fd, &h, NULL, 0, deadline, -1));
    pccl__put_u32(req, magic);
    pccl__put_u16(req + 4, 1);
    pccl__put_u16(req + 6, 0);
    pccl__put_u64(req + 8, key);
    pccl__put_u64(req + 16, off);
    pccl__put_u64(req + 24, len);
    CHECK_OK(pccl__sock_send_all(fd, req, sizeof(req), deadline, -1));
    return fd;
}

/* Read until end of stream; returns the bytes read after the header and
 * the reply status in *status. */
static uint64_t
raw_drain(int fd, uint16_t *status)
{
    uint8_t rep[24], buf[65536];
    uint64_t total = 0;
    size_t n;

    CHECK_OK(pccl__sock_recv_all(fd, rep, sizeof(rep), pccl__deadline_ms(5000), -1));
    *status = pccl__get_u16(rep + 6);
    for (;;) {
        pccl_result rv = pccl__sock_read(fd, buf, sizeof(buf), &n);
        if (rv != 0) {
            break; /* end of stream */
        }
        if (n == 0) {
            CHECK_OK(pccl__sock_wait(fd, 0, pccl__deadline_ms(5000), -1));
            continue;
        }
        total += n;
    }
    return total;
}

static void
test_unpublish_cuts_off_sends(void)
{
    char sa[PCCL_ADDRSTRLEN];
    pccl_comm *srv = make_comm(NULL, sa);
    size_t n = 64u << 20; /* far more than the socket buffers hold */
    uint8_t *src = pattern(n, 3);
    uint64_t tx = 0, t0, got;
    uint16_t status = 99;
    int fd;

    CHECK_OK(pccl_comm_publish(srv, 5, src, n));
    fd = raw_request(sa, 0x51584350, 5, 0, n); /* and then do not read */
    /* The server is sending: payload bytes (beyond the 24-byte reply) have
     * arrived; it fills the socket buffers and blocks. */
    TU_WAIT_UNTIL(inq(fd) > 24, 10000);
    t0 = pccl__clock_ms();
    CHECK_OK(pccl_comm_unpublish(srv, 5, &tx));
    CHECK(pccl__clock_ms() - t0 < 2000); /* the blocked send was cut off */
    CHECK(tx > 0 && tx < n);
    memset(src, 0, n); /* the buffer is ours again: nothing reads it */
    got = raw_drain(fd, &status);
    CHECK(status == 0 && got == tx); /* every byte sent arrived, then the end */
    pccl__sock_close(fd);

    /* A malformed request gets PCCL_EPROTO and no payload. */
    CHECK_OK(pccl_comm_publish(srv, 6, src, 100));
    fd = raw_request(sa, 0x12345678, 6, 0, 10);
    CHECK(raw_drain(fd, &status) == 0 && status == PCCL_EPROTO);
    pccl__sock_close(fd);
    CHECK_OK(pccl_comm_free(srv));
    free(src);
}

/* ------------------------------------------------------- concurrency */

enum { NFETCH = 8 };

static void
test_concurrent_fetches(void)
{
    char sa[PCCL_ADDRSTRLEN], ca[PCCL_ADDRSTRLEN];
    pccl_comm *srv = make_comm("k", sa), *cli = make_comm("k", ca);
    size_t n = 16u << 20, part = n / NFETCH;
    uint8_t *src = pattern(n, 9), *dst = malloc(n);
    fetch_arg a[NFETCH];
    pthread_t t[NFETCH];
    uint64_t tx = 0;
    int i;

    CHECK(dst != NULL);
    memset(dst, 0, n);
    CHECK_OK(pccl_comm_publish(srv, 11, src, n));
    for (i = 0; i < NFETCH; i++) {
        memset(&a[i], 0, sizeof(a[i]));
        a[i].comm = cli;
        a[i].addr = sa;
        a[i].key = 11;
        a[i].off = (uint64_t)i * part;
        a[i].len = part;
        a[i].dst = dst + (size_t)i * part;
        a[i].timeout_ms = 10000;
        CHECK(pthread_create(&t[i], NULL, fetch_main, &a[i]) == 0);
    }
    for (i = 0; i < NFETCH; i++) {
        CHECK(pthread_join(t[i], NULL) == 0);
        CHECK_OK(a[i].rv);
        CHECK(a[i].got == part);
    }
    CHECK(memcmp(src, dst, n) == 0);
    CHECK_OK(pccl_comm_unpublish(srv, 11, &tx));
    CHECK(tx == n);
    CHECK_OK(pccl_comm_free(cli));
    CHECK_OK(pccl_comm_free(srv));
    free(src);
    free(dst);
}

int
main(void)
{
    test_publish_fetch();
    test_auth();
    test_server_dies_mid_transfer();
    test_close_wakes_fetch();
    test_unpublish_cuts_off_sends();
    test_concurrent_fetches();
    printf("xfer_test: ok\n");
    return 0;
}
