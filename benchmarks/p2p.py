"""Point-to-point throughput: pccl send/recv against a raw TCP stream on the
same pair (loopback).

Both sides run in this process: two native communicators, each with its
own I/O thread (the waits release the GIL), and for the raw stream two
Python threads over one TCP connection (blocking ``sendall`` /
``recv_into`` release the GIL; the bytes never pass through Python
objects).  One sample is one message: pccl's ``send`` returns when the
receiver's acknowledgement arrived, so the raw stream is timed the same
way: the receiver answers one byte once it holds the whole message, and
the sample ends when the sender has read it.

For each size the median of the samples (at least ``--min-samples``, until
``--min-seconds`` of samples; raw and pccl sampled in turn) is reported as GB/s (10^9 bytes/s), with
pccl's ratio to the raw stream for K = 1 and K = 4 connections.  The
machine may be shared: the load average is printed with the table.

    .venv/bin/python benchmarks/p2p.py                   # 1 MiB ... 256 MiB
    .venv/bin/python benchmarks/p2p.py --sizes 1M,16M --connections 1,4,8
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import threading
import time

import numpy as np

from pccl._native import NativeComm

MIB = 1 << 20


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1024, "M": MIB, "G": 1024 * MIB}.get(t[-1:], 1)
    return int(t[:-1] if mult != 1 else t) * mult


def interleaved(fns: list, min_samples: int, min_seconds: float) -> list[float]:
    """Median seconds of each of ``fns``, sampled round-robin (one sample of
    each in turn) so that a load change on a shared machine hits all of
    them alike."""
    for fn in fns:
        fn()  # warm-up (connections, page faults)
    out: list[list[float]] = [[] for _ in fns]
    t_end = time.perf_counter() + min_seconds
    while len(out[0]) < min_samples or time.perf_counter() < t_end:
        for i, fn in enumerate(fns):
            out[i].append(fn())
        if len(out[0]) >= 50:
            break
    return [statistics.median(o) for o in out]


# --------------------------------------------------------------------------
# pccl


class PcclPair:
    def __init__(self, connections: int):
        self.a = NativeComm(listen="127.0.0.1:0", p2p_connections=connections)
        self.b = NativeComm(listen="127.0.0.1:0", p2p_connections=connections)
        self.a.set_peer_id(1, 1)
        self.b.set_peer_id(1, 2)
        self.tag = 0

    def one(self, src: np.ndarray, dst: np.ndarray) -> float:
        self.tag = (self.tag + 1) % 8
        t0 = time.perf_counter()
        r = self.b.recv_async(dst, 1, self.tag)
        s = self.a.send_async(src, 2, self.b.address, self.tag)
        s.wait()
        dt = time.perf_counter() - t0
        r.wait()
        return dt

    def close(self) -> None:
        self.a.close()
        self.b.close()


# --------------------------------------------------------------------------
# the raw stream


class RawPair:
    def __init__(self):
        lst = socket.create_server(("127.0.0.1", 0))
        self.tx = socket.create_connection(lst.getsockname())
        self.rx, _ = lst.accept()
        lst.close()
        for s in (self.tx, self.rx):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def one(self, src: np.ndarray, dst: np.ndarray) -> float:
        view = memoryview(dst).cast("B")
        n = view.nbytes

        def receive() -> None:
            got = 0
            while got < n:
                k = self.rx.recv_into(view[got:], n - got)
                if k == 0:
                    raise ConnectionError("raw stream closed")
                got += k
            self.rx.sendall(b"!")

        t = threading.Thread(target=receive)
        t0 = time.perf_counter()
        t.start()
        self.tx.sendall(memoryview(src).cast("B"))
        if self.tx.recv(1) != b"!":
            raise ConnectionError("raw stream: no acknowledgement")
        dt = time.perf_counter() - t0
        t.join()
        return dt

    def close(self) -> None:
        self.tx.close()
        self.rx.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1M,4M,16M,64M,256M")
    ap.add_argument("--connections", default="1,4", help="K values for pccl")
    ap.add_argument("--min-samples", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=0.5)
    args = ap.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    ks = [int(k) for k in args.connections.split(",")]

    pairs = {k: PcclPair(k) for k in ks}
    raw = RawPair()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
          f"{os.cpu_count()} CPUs")
    head = f"{'size':>8} {'raw GB/s':>9}"
    for k in ks:
        head += f" {'K=' + str(k) + ' GB/s':>10} {'ratio':>6}"
    print(head)
    try:
        for n in sizes:
            src = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
            dst = np.empty_like(src)
            fns = [lambda s=src, d=dst: raw.one(s, d)]
            fns += [lambda k=k, s=src, d=dst: pairs[k].one(s, d) for k in ks]
            times = interleaved(fns, args.min_samples, args.min_seconds)
            assert np.array_equal(src, dst), "a transfer delivered other bytes"
            raw_t = times[0]
            line = f"{n // MIB:>5} MiB {n / raw_t / 1e9:>9.2f}"
            for t in times[1:]:
                line += f" {n / t / 1e9:>10.2f} {raw_t / t:>6.2f}"
            print(line, flush=True)
    finally:
        for p in pairs.values():
            p.close()
        raw.close()
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
