/*
 * p2p_test.c - point-to-point send/recv between in-process communicators:
 * sizes 0, 1, primes and 256 MiB, K = 1, 4, 16, three comms, many small
 * tagged messages interleaved in both directions, a size mismatch, abort
 * in flight, malformed frames from a raw authenticated connection, a
 * wrong secret refused, argument checks.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "net/frame.h"
#include "net/link.h"
#include "pccl.h"
#include "platform/plat.h"
#include "testutil.h"

static int checks;

typedef struct peer {
    pccl_comm *c;
    char addr[PCCL_ADDRSTRLEN];
    uint32_t id;
} peer;

static void
make_peer(peer *p, uint32_t id, uint32_t K, const char *secret)
{
    pccl_comm_config cfg;

    CHECK_OK(pccl_comm_config_init(&cfg));
    cfg.listen_addr = "127.0.0.1:0";
    cfg.p2p_connections = K;
    cfg.handshake_timeout_ms = 2000;
    if (secret != NULL) {
        cfg.secret = (const uint8_t *)secret;
        cfg.secret_len = strlen(secret);
    }
    CHECK_OK(pccl_comm_create(&cfg, &p->c));
    CHECK_OK(pccl_comm_listen_address(p->c, p->addr, sizeof(p->addr)));
    CHECK_OK(pccl_comm_set_peer_id(p->c, 77, id));
    p->id = id;
}

static uint8_t *
pattern(size_t n, uint32_t seed)
{
    uint8_t *b = malloc(n ? n : 1);
    size_t i;

    CHECK(b != NULL);
    for (i = 0; i < n; i++) {
        b[i] = (uint8_t)((i * 2654435761u + seed) >> 11);
    }
    return b;
}

/* One message a -> b of n bytes; both ends OK and the bytes equal. */
static void
one(peer *a, peer *b, size_t n, uint64_t tag)
{
    uint8_t *src = pattern(n, (uint32_t)n + (uint32_t)tag);
    uint8_t *copy = malloc(n ? n : 1);
    uint8_t *dst = malloc(n ? n : 1);
    pccl_p2p_handle *hs, *hr;
    uint64_t bytes = 1234;

    CHECK(copy != NULL && dst != NULL);
    memcpy(copy, src, n);
    memset(dst, 0xee, n);
    T_RV(pccl_comm_recv_start(b->c, a->id, dst, n, tag, 5000, &hr), 0);
    T_RV(pccl_comm_send_start(a->c, b->id, b->addr, src, n, tag, 5000, &hs), 0);
    T_RV(pccl_p2p_wait(hs, 60000, &bytes), 0);
    T(bytes == n);
    T_RV(pccl_p2p_wait(hr, 60000, NULL), 0);
    T(memcmp(dst, copy, n) == 0);
    T(memcmp(src, copy, n) == 0);
    pccl_p2p_free(hs);
    pccl_p2p_free(hr);
    free(src);
    free(copy);
    free(dst);
}

static void
test_sizes(uint32_t K)
{
    static const size_t sizes[] = {0, 1, 2, 7, 4099, 65537, 1048573, 1048576, 3145739};
    peer a, b;
    size_t i;

    make_peer(&a, 1, K, "s");
    make_peer(&b, 2, K, "s");
    for (i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        one(&a, &b, sizes[i], i);
        one(&b, &a, sizes[i], i); /* the other way: its own connections */
    }
    pccl_comm_free(a.c);
    pccl_comm_free(b.c);
}

static void
test_big(void)
{
    peer a, b;

    make_peer(&a, 1, 4, NULL);
    make_peer(&b, 2, 4, NULL);
    one(&a, &b, (size_t)256 << 20, 5);
    pccl_comm_free(a.c);
    pccl_comm_free(b.c);
}

/* Three comms, every ordered pair, many small tagged messages in flight
 * at once in both directions. */
static void
test_many(void)
{
    enum { N = 3, M = 40 };
    peer p[N];
    pccl_p2p_handle *h[N][N][M][2];
    uint8_t *src[N][N][M], *dst[N][N][M];
    int i, j, m;

    for (i = 0; i < N; i++) {
        make_peer(&p[i], (uint32_t)(10 + i), 4, "k");
    }
    for (i = 0; i < N; i++) {
        for (j = 0; j < N; j++) {
            if (i == j) {
                continue;
            }
            for (m = 0; m < M; m++) {
                size_t n = (size_t)(m * 37 + i * 5 + j) % 3000;
                src[i][j][m] = pattern(n, (uint32_t)(i * 1000 + j * 100 + m));
                dst[i][j][m] = malloc(n ? n : 1);
                /* tags 0..4 repeat: matched by (peer, tag, seq) */
                T_RV(pccl_comm_recv_start(p[j].c, p[i].id, dst[i][j][m], n, (uint64_t)(m % 5),
                                          30000, &h[i][j][m][1]),
                     0);
            }
        }
    }
    for (i = 0; i < N; i++) {
        for (j = 0; j < N; j++) {
            for (m = 0; i != j && m < M; m++) {
                size_t n = (size_t)(m * 37 + i * 5 + j) % 3000;
                T_RV(pccl_comm_send_start(p[i].c, p[j].id, p[j].addr, src[i][j][m], n,
                                          (uint64_t)(m % 5), 30000, &h[i][j][m][0]),
                     0);
            }
        }
    }
    for (i = 0; i < N; i++) {
        for (j = 0; j < N; j++) {
            for (m = 0; i != j && m < M; m++) {
                size_t n = (size_t)(m * 37 + i * 5 + j) % 3000;
                T_RV(pccl_p2p_wait(h[i][j][m][0], 30000, NULL), 0);
                T_RV(pccl_p2p_wait(h[i][j][m][1], 30000, NULL), 0);
                T(memcmp(src[i][j][m], dst[i][j][m], n) == 0);
                pccl_p2p_free(h[i][j][m][0]);
                pccl_p2p_free(h[i][j][m][1]);
                free(src[i][j][m]);
                free(dst[i][j][m]);
            }
        }
    }
    for (i = 0; i < N; i++) {
        pccl_comm_free(p[i].c);
    }
}

/* A recv of another size: both ends fail with EINVAL;
 * the pair works again afterwards. */
static void
test_size_mismatch(void)
{
    peer a, b;
    uint8_t src[100], dst[50];
    pccl_p2p_handle *hs, *hr;
    pccl_result rs;

    make_peer(&a, 1, 2, NULL);
    make_peer(&b, 2, 2, NULL);
    memset(src, 1, sizeof(src));
    T_RV(pccl_comm_recv_start(b.c, 1, dst, sizeof(dst), 0, 10000, &hr), 0);
    T_RV(pccl_comm_send_start(a.c, 2, b.addr, src, sizeof(src), 0, 10000, &hs), 0);
    T_RV(pccl_p2p_wait(hr, 10000, NULL), PCCL_EINVAL);
    rs = pccl_p2p_wait(hs, 10000, NULL);
    T(rs == PCCL_EINVAL); /* the receiver's nack: both ends know why */
    pccl_p2p_free(hs);
    pccl_p2p_free(hr);
    one(&a, &b, 1000, 0);
    pccl_comm_free(a.c);
    pccl_comm_free(b.c);
}

/* Abort wakes a send and a recv that can never complete. */
static void
test_abort(void)
{
    peer a, b;
    uint8_t *big = pattern((size_t)64 << 20, 1), small[10];
    pccl_p2p_handle *hs, *hr;

    make_peer(&a, 1, 4, NULL);
    make_peer(&b, 2, 4, NULL);
    /* nobody receives the 64 MiB: it stalls in flow control */
    T_RV(pccl_comm_send_start(a.c, 2, b.addr, big, (size_t)64 << 20, 3, -1, &hs), 0);
    T_RV(pccl_comm_recv_start(a.c, 2, small, sizeof(small), 9, -1, &hr), 0);
    T_RV(pccl_p2p_wait(hs, 200, NULL), PCCL_ETIMEDOUT); /* still running */
    T_RV(pccl_comm_abort(a.c), 0);
    T_RV(pccl_p2p_wait(hs, 5000, NULL), PCCL_EABORTED);
    T_RV(pccl_p2p_wait(hr, 5000, NULL), PCCL_EABORTED);
    pccl_p2p_free(hs);
    pccl_p2p_free(hr);
    /* the peer reported lost: fails at once from now on */
    T_RV(pccl_comm_peer_lost(b.c, 1), 0);
    T_RV(pccl_comm_recv_start(b.c, 1, small, sizeof(small), 0, 1000, &hr), PCCL_EPEERLOST);
    pccl_comm_free(a.c);
    pccl_comm_free(b.c);
    free(big);
}

/* The control plane reports the receiver lost while a send stalls in
 * flow control: the send fails with EPEERLOST at once, later sends to it
 * fail at start, and ops with a third peer go on. */
static void
test_peer_lost_in_flight(void)
{
    peer a, b, c;
    size_t n = (size_t)64 << 20;
    uint8_t *big = pattern(n, 3), *dst = malloc(n), small[64];
    pccl_p2p_handle *hs, *hr, *hc, *hcr;

    CHECK(dst != NULL);
    make_peer(&a, 1, 4, NULL);
    make_peer(&b, 2, 4, NULL);
    make_peer(&c, 3, 4, NULL);
    T_RV(pccl_comm_send_start(a.c, 2, b.addr, big, n, 0, -1, &hs), 0);
    T_RV(pccl_comm_recv_start(c.c, 1, small, sizeof(small), 0, 10000, &hcr), 0);
    T_RV(pccl_comm_send_start(a.c, 3, c.addr, big, sizeof(small), 0, 10000, &hc), 0);
    T_RV(pccl_p2p_wait(hs, 200, NULL), PCCL_ETIMEDOUT); /* stalled: b posts nothing */
    T_RV(pccl_comm_peer_lost(a.c, 2), 0);
    T_RV(pccl_p2p_wait(hs, 5000, NULL), PCCL_EPEERLOST);
    T_RV(pccl_p2p_wait(hc, 10000, NULL), 0); /* the other pair is untouched */
    T_RV(pccl_p2p_wait(hcr, 10000, NULL), 0);
    T(memcmp(small, big, sizeof(small)) == 0);
    T_RV(pccl_comm_send_start(a.c, 2, b.addr, big, 1, 0, 1000, &hr), PCCL_EPEERLOST);
    pccl_p2p_free(hs);
    pccl_p2p_free(hc);
    pccl_p2p_free(hcr);
    pccl_comm_free(a.c);
    pccl_comm_free(b.c);
    pccl_comm_free(c.c);
    free(big);
    free(dst);
}

/* A deadline: a recv nobody sends to. */
static void
test_deadline(void)
{
    peer a;
    uint8_t buf[4];
    pccl_p2p_handle *h;

    make_peer(&a, 1, 1, NULL);
    T_RV(pccl_comm_recv_start(a.c, 2, buf, sizeof(buf), 0, 100, &h), 0);
    T_RV(pccl_p2p_wait(h, 5000, NULL), PCCL_ETIMEDOUT);
    pccl_p2p_free(h);
    pccl_comm_free(a.c);
}

static void
test_args(void)
{
    peer a;
    uint8_t buf[4];
    pccl_p2p_handle *h;
    pccl_comm_config cfg;
    pccl_comm *c;

    make_peer(&a, 1, 1, NULL);
    T_RV(pccl_comm_send_start(a.c, 1, a.addr, buf, 4, 0, 100, &h), PCCL_EINVAL); /* self */
    T_RV(pccl_comm_send_start(a.c, 2, NULL, buf, 4, 0, 100, &h), PCCL_EINVAL);
    T_RV(pccl_comm_recv_start(a.c, 2, NULL, 4, 0, 100, &h), PCCL_EINVAL);
    T_RV(pccl_comm_set_peer_id(a.c, 77, 3), 0); /* a new identity */
    T_RV(pccl_comm_set_peer_id(a.c, 77, UINT32_MAX), PCCL_EINVAL);
    T_RV(pccl_comm_send_start(a.c, 3, a.addr, buf, 4, 0, 100, &h), PCCL_EINVAL); /* self */
    T_RV(pccl_comm_set_peer_id(a.c, 77, 1), 0);
    CHECK_OK(pccl_comm_config_init(&cfg));
    cfg.listen_addr = "127.0.0.1:0";
    CHECK_OK(pccl_comm_create(&cfg, &c));
    T_RV(pccl_comm_recv_start(c, 2, buf, 4, 0, 100, &h), PCCL_ESTATE); /* no identity */
    pccl_comm_free(c);
    pccl_comm_free(a.c);
}

/* The wrong secret, the wrong run, the wrong receiver: refused. */
static void
test_refused(void)
{
    peer a, b, c, d;
    uint8_t buf[16];
    pccl_p2p_handle *h;
    pccl_result rv;

    make_peer(&a, 1, 2, "right");
    make_peer(&b, 2, 2, "wrong");
    memset(buf, 3, sizeof(buf));
    T_RV(pccl_comm_send_start(a.c, 2, b.addr, buf, sizeof(buf), 0, 5000, &h), 0);
    rv = pccl_p2p_wait(h, 10000, NULL);
    T(rv == PCCL_EAUTH);
    pccl_p2p_free(h);
    /* c thinks it talks to peer 5 at d's address, but d is peer 4 */
    make_peer(&c, 3, 2, NULL);
    make_peer(&d, 4, 2, NULL);
    T_RV(pccl_comm_send_start(c.c, 5, d.addr, buf, sizeof(buf), 0, 5000, &h), 0);
    T_RV(pccl_p2p_wait(h, 10000, NULL), PCCL_EPROTO);
    pccl_p2p_free(h);
    pccl_comm_free(a.c);
    pccl_comm_free(b.c);
    pccl_comm_free(c.c);
    pccl_comm_free(d.c);
}

/* A receiver that learns its identity after the sender started dialling:
 * the dial retries (ESTATE is transient) and the send goes through. */
static void
test_late_identity(void)
{
    peer a, b;
    pccl_comm_config cfg;
    uint8_t src[5000], dst[5000];
    pccl_p2p_handle *hs, *hr;

    make_peer(&a, 1, 2, NULL);
    CHECK_OK(pccl_comm_config_init(&cfg));
    cfg.listen_addr = "127.0.0.1:0";
    cfg.p2p_connections = 2;
    cfg.handshake_timeout_ms = 2000;
    CHECK_OK(pccl_comm_create(&cfg, &b.c));
    CHECK_OK(pccl_comm_listen_address(b.c, b.addr, sizeof(b.addr)));
    memset(src, 7, sizeof(src));
    T_RV(pccl_comm_send_start(a.c, 2, b.addr, src, sizeof(src), 0, 10000, &hs), 0);
    T_RV(pccl_p2p_wait(hs, 100, NULL), PCCL_ETIMEDOUT); /* refused so far: retrying */
    T_RV(pccl_comm_set_peer_id(b.c, 77, 2), 0);
    T_RV(pccl_comm_recv_start(b.c, 1, dst, sizeof(dst), 0, 10000, &hr), 0);
    T_RV(pccl_p2p_wait(hs, 10000, NULL), 0);
    T_RV(pccl_p2p_wait(hr, 10000, NULL), 0);
    T(memcmp(src, dst, sizeof(src)) == 0);
    pccl_p2p_free(hs);
    pccl_p2p_free(hr);
    pccl_comm_free(a.c);
    pccl_comm_free(b.c);
}

/* A raw authenticated client sends malformed frames: the recv fails with
 * EPROTO and its buffer beyond the schedule is untouched. */
static int
raw_connect(const peer *to, uint32_t from, uint32_t index, uint32_t K)
{
    pccl__sockaddr sa;
    pccl__hs_client_hello hello;
    int fd = -1;

    CHECK_OK(pccl__addr_parse(to->addr, 1, &sa));
    CHECK_OK(pccl__sock_connect(&sa, NULL, pccl__deadline_ms(5000), -1, &fd));
    memset(&hello, 0, sizeof(hello));
    hello.purpose = 4; /* PCCL__PURPOSE_P2P */
    hello.epoch = 77;
    hello.from_rank = from;
    hello.to_rank = to->id;
    hello.world = UINT32_MAX;
    hello.conn_index = index;
    hello.nconns = K;
    hello.slice_bytes = PCCL_DEFAULT_SLICE_BYTES;
    CHECK_OK(pccl__link_client_handshake(fd, &hello, NULL, 0, pccl__deadline_ms(5000), -1));
    return fd;
}

static void
bad_frame(int variant)
{
    peer b;
    uint8_t dst[64], hdr[PCCL__FRAME_HEADER_SIZE], pay[64];
    pccl__frame_header fh;
    pccl_p2p_handle *h;
    int fd;
    size_t i;

    make_peer(&b, 2, 1, NULL);
    memset(dst, 0x5a, sizeof(dst));
    memset(pay, 0x11, sizeof(pay));
    T_RV(pccl_comm_recv_start(b.c, 1, dst, 32, 0, 10000, &h), 0);
    fd = raw_connect(&b, 1, 0, 1);
    memset(&fh, 0, sizeof(fh));
    fh.kind = PCCL__FRAME_P2P_DATA;
    fh.epoch = 77;
    fh.dtype = PCCL_UINT8;
    fh.count = fh.length = 32;
    fh.total = 32;
    switch (variant) {
    case 0: fh.epoch = 78; break;              /* another run */
    case 1: fh.total = 64; fh.count = fh.length = 64; break; /* larger than the buffer */
    case 2: fh.offset = 8; break;              /* off the slice grid */
    case 3: fh.kind = PCCL__FRAME_P2P_ACK; fh.count = fh.length = 0; break; /* ack inbound */
    case 4: fh.seq = 0; fh.step = 1; break;    /* step must be 0 */
    default: break;
    }
    pccl__frame_encode(&fh, hdr);
    CHECK_OK(pccl__sock_send_all(fd, hdr, sizeof(hdr), pccl__deadline_ms(5000), -1));
    (void)pccl__sock_send_all(fd, pay, fh.length, pccl__deadline_ms(5000), -1);
    /* a size that is not the buffer's is a usage error (EINVAL), the rest EPROTO */
    T_RV(pccl_p2p_wait(h, 10000, NULL), variant == 1 ? PCCL_EINVAL : PCCL_EPROTO);
    for (i = 32; i < sizeof(dst); i++) {
        T(dst[i] == 0x5a);
    }
    for (i = 0; i < 32; i++) {
        T(dst[i] == 0x5a); /* rejected at the header: nothing written */
    }
    pccl_p2p_free(h);
    pccl__sock_close(fd);
    pccl_comm_free(b.c);
}

/* A well-formed raw sender completes the recv, then gets the ack. */
static void
test_raw_good(void)
{
    peer b;
    uint8_t dst[32], hdr[PCCL__FRAME_HEADER_SIZE], pay[32], ack[PCCL__FRAME_HEADER_SIZE];
    pccl__frame_header fh, ah;
    pccl_p2p_handle *h;
    int fd;

    make_peer(&b, 2, 1, NULL);
    memset(pay, 0x42, sizeof(pay));
    fd = raw_connect(&b, 1, 0, 1);
    memset(&fh, 0, sizeof(fh));
    fh.kind = PCCL__FRAME_P2P_DATA;
    fh.epoch = 77;
    fh.tag = 9;
    fh.dtype = PCCL_UINT8;
    fh.count = fh.length = 32;
    fh.total = 32;
    pccl__frame_encode(&fh, hdr);
    /* the frame arrives before the recv is posted: it waits */
    CHECK_OK(pccl__sock_send_all(fd, hdr, sizeof(hdr), pccl__deadline_ms(5000), -1));
    CHECK_OK(pccl__sock_send_all(fd, pay, sizeof(pay), pccl__deadline_ms(5000), -1));
    T_RV(pccl_comm_recv_start(b.c, 1, dst, 32, 9, 10000, &h), 0);
    T_RV(pccl_p2p_wait(h, 10000, NULL), 0);
    T(memcmp(dst, pay, 32) == 0);
    CHECK_OK(pccl__sock_recv_all(fd, ack, sizeof(ack), pccl__deadline_ms(5000), -1));
    T_RV(pccl__frame_decode(ack, sizeof(ack), &ah), 0);
    T(ah.kind == PCCL__FRAME_P2P_ACK && ah.tag == 9 && ah.seq == 0 && ah.total == 32);
    pccl_p2p_free(h);
    pccl__sock_close(fd);
    pccl_comm_free(b.c);
}

int
main(void)
{
    int v;

    test_args();
    test_sizes(1);
    test_sizes(4);
    test_sizes(16);
    test_many();
    test_size_mismatch();
    test_deadline();
    test_abort();
    test_peer_lost_in_flight();
    test_refused();
    test_late_identity();
    for (v = 0; v < 5; v++) {
        bad_frame(v);
    }
    test_raw_good();
    test_big();
    printf("p2p_test: %d checks passed\n", checks);
    return 0;
}
