/*
 * p2p_fuzz.c - libFuzzer harness for the receive path of point-to-point
 * recv (core/p2p.c), through a real communicator and its I/O thread.
 *
 * One communicator (peer number 1, run token 77, K = 1, slice 4 KiB) lives
 * for the whole run.  Per input: the first 3 bytes choose the recv's size
 * (0 .. 12 KiB, so up to 3 slices) and tag (0-3); a recv is posted from a
 * fresh sender number; a raw client authenticates as that sender
 * (PURPOSE_P2P handshake, no secret) and writes the rest of the input as
 * the frame stream, then half-closes.  The harness waits for the recv to
 * end and checks, besides "no crash / no UB / no overread": only
 * documented codes come back (OK, EPROTO, EINVAL, EPEERLOST), the guard
 * bytes around the recv buffer are untouched, and a recv that succeeded
 * holds exactly the payload bytes the stream carried for it (the stream is
 * then parsed here independently).
 *
 * Built with -DP2P_FUZZ_SEEDS it writes valid streams instead (see
 * README.md), so the fuzzer starts from frames that pass the schedule.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "net/frame.h"
#include "net/link.h"
#include "pccl.h"
#include "platform/plat.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

enum { SLICE = 4096, GUARD = 64, MAXLEN = 3 * SLICE };

#ifndef P2P_FUZZ_SEEDS

static void
die(const char *what, int rv)
{
    fprintf(stderr, "p2p_fuzz: %s: %d (%s)\n", what, rv, pccl_strerror(rv));
    abort();
}

static void
parse(const uint8_t *b, size_t *len, uint64_t *tag)
{
    *len = ((size_t)b[0] | (size_t)b[1] << 8) % (MAXLEN + 1);
    *tag = b[2] & 3;
}


static pccl_comm *comm;
static char addr[PCCL_ADDRSTRLEN];
static uint32_t next_sender = 2;

static void
setup(void)
{
    pccl_comm_config cfg;
    pccl_result rv;

    pccl_comm_config_init(&cfg);
    cfg.listen_addr = "127.0.0.1:0";
    cfg.p2p_connections = 1;
    cfg.slice_bytes = SLICE;
    cfg.handshake_timeout_ms = 2000;
    if ((rv = pccl_comm_create(&cfg, &comm)) != 0 ||
        (rv = pccl_comm_listen_address(comm, addr, sizeof(addr))) != 0 ||
        (rv = pccl_comm_set_peer_id(comm, 77, 1)) != 0) {
        die("setup", rv);
    }
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static uint8_t buf[GUARD + MAXLEN + GUARD];
    pccl__hs_client_hello hello;
    pccl__sockaddr sa;
    pccl_p2p_handle *h;
    uint32_t sender;
    uint64_t tag;
    size_t len, i;
    int fd = -1;
    pccl_result rv;

    if (size < 3) {
        return 0;
    }
    if (comm == NULL) {
        setup();
    }
    parse(data, &len, &tag);
    sender = next_sender;
    next_sender = next_sender >= 4096 ? 2 : next_sender + 1;
    memset(buf, 0xa5, sizeof(buf));
    if ((rv = pccl_comm_recv_start(comm, sender, buf + GUARD, len, tag, 5000, &h)) != 0) {
        die("recv_start", rv);
    }
    if ((rv = pccl__addr_parse(addr, 1, &sa)) != 0 ||
        (rv = pccl__sock_connect(&sa, NULL, pccl__deadline_ms(5000), -1, &fd)) != 0) {
        die("connect", rv);
    }
    memset(&hello, 0, sizeof(hello));
    hello.purpose = PCCL__PURPOSE_P2P;
    hello.epoch = 77;
    hello.from_rank = sender;
    hello.to_rank = 1;
    hello.world = UINT32_MAX;
    hello.nconns = 1;
    hello.slice_bytes = SLICE;
    if ((rv = pccl__link_client_handshake(fd, &hello, NULL, 0, pccl__deadline_ms(5000), -1)) !=
        0) {
        die("handshake", rv);
    }
    /* the stream; a write may fail once the core hung up on bad bytes */
    (void)pccl__sock_send_all(fd, data + 3, size - 3, pccl__deadline_ms(5000), -1);
    shutdown(fd, SHUT_WR);
    rv = pccl_p2p_wait(h, 10000, NULL);
    if (rv != PCCL_OK && rv != PCCL_EPROTO && rv != PCCL_EINVAL && rv != PCCL_EPEERLOST) {
        die("recv ended with an undocumented code", rv);
    }
    for (i = 0; i < GUARD; i++) {
        if (buf[i] != 0xa5 || buf[GUARD + len + i] != 0xa5) {
            die("a guard byte changed", (int)i);
        }
    }
    if (rv == PCCL_OK) {
        /* every byte must come from a slice of this message in the stream */
        size_t off = 3, covered = 0;
        while (off + PCCL__FRAME_HEADER_SIZE <= size && covered < (len ? len : 1)) {
            pccl__frame_header fh;
            if (pccl__frame_decode(data + off, size - off, &fh) != 0) {
                die("success although the stream has a bad header", 0);
            }
            off += PCCL__FRAME_HEADER_SIZE;
            if (fh.kind == PCCL__FRAME_P2P_DATA && fh.tag == tag && fh.seq == 0 &&
                off + fh.length <= size) {
                if (memcmp(buf + GUARD + fh.offset, data + off, fh.length) != 0) {
                    die("recv buffer differs from the payload", (int)fh.offset);
                }
                covered += fh.length ? fh.length : 1;
            }
            off += fh.length;
        }
        if (covered < (len ? len : 1)) {
            die("success without the whole message in the stream", (int)covered);
        }
    }
    pccl_p2p_free(h);
    close(fd);
    return 0;
}

#else /* P2P_FUZZ_SEEDS */

/* Valid streams for a few (size, tag) choices: the 3 config bytes, then
 * the slices of message seq 0 in order; one with a stray second message. */
int
main(int argc, char **argv)
{
    static const size_t lens[] = {0, 1, 100, SLICE, SLICE + 7, MAXLEN};
    uint8_t out[3 + 4 * (PCCL__FRAME_HEADER_SIZE + SLICE)];
    size_t i;

    if (argc != 2) {
        fprintf(stderr, "usage: %s CORPUS_DIR\n", argv[0]);
        return 2;
    }
    for (i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) {
        size_t len = lens[i], off = 0, n = 0;
        uint64_t tag = i & 3;
        char path[4096];
        FILE *f;

        out[0] = (uint8_t)(len & 0xff);
        out[1] = (uint8_t)(len >> 8);
        out[2] = (uint8_t)tag;
        n = 3;
        do {
            pccl__frame_header fh;
            size_t k = len - off < SLICE ? len - off : SLICE;
            memset(&fh, 0, sizeof(fh));
            fh.kind = PCCL__FRAME_P2P_DATA;
            fh.epoch = 77;
            fh.tag = tag;
            fh.offset = off;
            fh.count = fh.length = (uint32_t)k;
            fh.dtype = PCCL_UINT8;
            fh.total = len;
            pccl__frame_encode(&fh, out + n);
            n += PCCL__FRAME_HEADER_SIZE;
            memset(out + n, (int)(0x30 + off / SLICE), k);
            n += k;
            off += k;
        } while (off < len);
        snprintf(path, sizeof(path), "%s/seed-%zu", argv[1], i);
        if ((f = fopen(path, "wb")) == NULL || fwrite(out, 1, n, f) != n) {
            perror(path);
            return 1;
        }
        fclose(f);
    }
    return 0;
}

#endif
