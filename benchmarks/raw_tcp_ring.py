"""The data-movement floor: a TCP ring that moves exactly the bytes of a ring
all-reduce and reduces nothing.

Rank ``r`` of ``n`` cuts its buffer into ``n`` chunks and runs the
2(n-1) steps of reduce-scatter + all-gather: at step ``s`` it sends chunk
``(r - s) mod n`` to rank ``r + 1`` and receives chunk ``(r - s - 1) mod n``
from rank ``r - 1``.  What it sends at step ``s >= 1`` is what it received
at step ``s - 1``; here the bytes are forwarded verbatim (no sum, no scratch
buffer: received bytes land straight in the buffer and are sent on from
there), so the dependency pattern and the byte count per link,
2(n-1)/n * size, are those of a real ring all-reduce, and everything above
this floor is what reduction and the library's own machinery cost.

Pipelining: a received slice is forwarded as soon as it has arrived; the
receiver publishes its progress in bytes and the sender sends everything
already available (at least ``slice_bytes`` at a time, or up to the end of
the step).  Sending and receiving run concurrently, each on its own thread
(blocking ``sendall`` / ``recv_into`` release the GIL; the data never
passes through Python objects).

Striping: with ``connections = K`` each chunk is split into K contiguous
lanes and lane ``k`` travels on connection ``k`` to the next rank, each lane
an independent pipeline with its own sender and receiver thread.

Reducing variant (``reduce=1``, poll engine only): the reduce-scatter
receives land in a scratch buffer and numpy adds each arrival into the
buffer in place (``x += received``, whole float32s, forwarded as soon as
added), so the result is a real SUM.  That is about the least a reducing
ring can do (in place, no copy of the input kept, no framing): its
distance from the plain floor is the price of the reduction itself on
this machine.

Run alone for a quick look: ``python benchmarks/raw_tcp_ring.py --help``.
"""

from __future__ import annotations

import queue
import select
import socket
import struct
import threading

import numpy as np

# Bounded waits without Python's timeout mode (which would add a poll()
# before every recv): the kernel fails a blocked call after this long.
IO_TIMEOUT_S = 60.0

_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


def _tune(sock: socket.socket, bufsize: int) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if bufsize > 0:
        # A fixed size turns receive autotuning off; root may exceed rmem_max.
        for force, plain in ((_SO_SNDBUFFORCE, socket.SO_SNDBUF),
                             (_SO_RCVBUFFORCE, socket.SO_RCVBUF)):
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, bufsize)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, plain, bufsize)
    tv = struct.pack("ll", int(IO_TIMEOUT_S), 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = sock.recv(n - len(data))
        if not part:
            raise ConnectionError("peer closed during handshake")
        data += part
    return data


def split(start: int, length: int, parts: int, align: int) -> list[tuple[int, int]]:
    """``parts`` contiguous (offset, length) pieces of a range, cut on
    ``align``-byte boundaries and as even as possible."""
    units = length // align
    out = []
    for i in range(parts):
        a = units * i // parts
        b = units * (i + 1) // parts
        out.append((start + a * align, (b - a) * align))
    # Any tail that is not a multiple of align goes to the last piece.
    off, ln = out[-1]
    out[-1] = (off, ln + length - units * align)
    return out


def ring_plan(nbytes: int, rank: int, world: int, lanes: int,
              align: int = 4) -> list[tuple[list, list]]:
    """Per lane: (send segments, receive segments), each a list of
    (offset, length) in stream order, for one all-reduce's byte movement."""
    chunks = split(0, nbytes, world, align)
    lane_chunks = [split(off, ln, lanes, align) for off, ln in chunks]
    plan = []
    for k in range(lanes):
        sends = [lane_chunks[(rank - s) % world][k] for s in range(2 * (world - 1))]
        recvs = [lane_chunks[(rank - s - 1) % world][k] for s in range(2 * (world - 1))]
        plan.append((sends, recvs))
    return plan


class _Lane:
    """One connection pair of the ring (to next, from prev) with a sender
    thread; the receive side runs on whichever thread calls :meth:`recv`."""

    def __init__(self, tx: socket.socket, rx: socket.socket, slice_bytes: int):
        self.tx = tx
        self.rx = rx
        self.slice_bytes = slice_bytes
        self.cond = threading.Condition(threading.Lock())
        self.progress = 0          # bytes received in the current operation
        self.want = 1 << 62        # progress the sender waits for
        self.error: BaseException | None = None

    def reset(self) -> None:
        self.progress = 0
        self.want = 1 << 62
        self.error = None

    def recv(self, mv: memoryview, segs: list) -> None:
        rx = self.rx
        cond = self.cond
        got = 0
        for off, ln in segs:
            end = off + ln
            while off < end:
                n = rx.recv_into(mv[off:end])
                if n == 0:
                    raise ConnectionError("previous rank closed the connection")
                off += n
                got += n
                # Publish first, then look at what the sender waits for: the
                # sender sets ``want`` before it reads ``progress``, so one of
                # the two always sees the other (no lost wake-up).
                self.progress = got
                if got >= self.want:
                    with cond:
                        cond.notify()

    def send(self, mv: memoryview, sends: list, recvs: list) -> None:
        tx = self.tx
        cond = self.cond
        step = self.slice_bytes
        recv_before = 0            # receive-stream bytes before send segment s's source
        for s, (off, ln) in enumerate(sends):
            if s == 0:
                tx.sendall(mv[off:off + ln])
                continue
            pos = 0
            while pos < ln:
                need = recv_before + pos + min(step, ln - pos)
                if self.progress < need:
                    with cond:
                        self.want = need
                        while self.progress < need:
                            if not cond.wait(IO_TIMEOUT_S):
                                raise TimeoutError("receiver made no progress")
                        self.want = 1 << 62
                avail = min(ln, self.progress - recv_before)
                tx.sendall(mv[off + pos:off + avail])
                pos = avail
            recv_before += recvs[s - 1][1]


class _PollState:
    """Progress of one lane in the single-threaded engine."""

    __slots__ = ("lane", "sends", "recvs", "si", "spos", "ri", "rpos", "got", "recv_before",
                 "scratch", "nreduce", "done")

    def __init__(self, lane: _Lane, sends: list, recvs: list, scratch: memoryview | None = None,
                 nreduce: int = 0):
        self.lane = lane
        self.sends = sends
        self.recvs = recvs
        self.si = self.spos = 0     # send segment, bytes sent in it
        self.ri = self.rpos = 0     # receive segment, bytes received in it
        self.got = 0                # receive-stream bytes so far
        self.done = 0               # of which reduced (not reducing: all of them)
        self.recv_before = 0        # receive-stream offset of send segment si's source
        # Reducing variant: the first nreduce receive segments (the
        # reduce-scatter) land in scratch and are added into the buffer.
        self.scratch = scratch
        self.nreduce = nreduce if scratch is not None else 0

    def finished(self) -> bool:
        return self.si == len(self.sends) and self.ri == len(self.recvs)

    def pump(self, mv: memoryview, want: dict) -> bool:
        """Move what can move without blocking; note in ``want`` what to
        poll for.  True when any byte moved."""
        moved = False
        rx, tx = self.lane.rx, self.lane.tx
        while self.ri < len(self.recvs):
            off, ln = self.recvs[self.ri]
            reducing = self.ri < self.nreduce
            into = self.scratch if reducing else mv
            try:
                n = rx.recv_into(into[off + self.rpos:off + ln])
            except BlockingIOError:
                want[rx.fileno()] = select.POLLIN
                break
            if n == 0:
                raise ConnectionError("previous rank closed the connection")
            moved = True
            if reducing:
                # Add the whole float32s now complete: [a, b) of the segment
                # (a float split across two reads is added after the second).
                a = self.rpos - self.rpos % 4
                b = ln if self.rpos + n == ln else (self.rpos + n) // 4 * 4
                if b > a:
                    x = np.frombuffer(mv[off + a:off + b], dtype=np.float32)
                    np.add(x, np.frombuffer(into[off + a:off + b], dtype=np.float32), out=x)
                self.done = self.got - self.rpos + b
            self.got += n
            self.rpos += n
            if not reducing:
                self.done = self.got
            if self.rpos == ln:
                self.ri += 1
                self.rpos = 0
        while self.si < len(self.sends):
            off, ln = self.sends[self.si]
            avail = ln if self.si == 0 else min(ln, self.done - self.recv_before)
            if avail <= self.spos:
                break               # waiting for the previous rank
            try:
                n = tx.send(mv[off + self.spos:off + avail])
            except BlockingIOError:
                want[tx.fileno()] = select.POLLOUT
                break
            moved = True
            self.spos += n
            if self.spos == ln:
                if self.si > 0:
                    self.recv_before += self.recvs[self.si - 1][1]
                self.si += 1
                self.spos = 0
        return moved


class RawRingWorker:
    """Benchmark worker (see ``_common``): the data-movement floor.

    options: ``connections`` (K lanes), ``sockbuf`` (SO_SNDBUF/SO_RCVBUF in
    bytes, 0 = kernel autotuning), ``slice_bytes`` (forwarding granularity),
    ``engine`` (threads or poll), ``reduce`` (1: sum float32 for real,
    poll engine only).
    """

    def __init__(self, rank: int, world: int, options: dict):
        self.rank = rank
        self.world = world
        self.k = int(options.get("connections", 1))
        self.sockbuf = int(options.get("sockbuf", 0))
        self.slice_bytes = int(options.get("slice_bytes", 256 * 1024))
        self.engine = options.get("engine", "threads")
        if self.engine not in ("threads", "poll"):
            raise ValueError(f"unknown engine {self.engine!r}")
        self.reduce = str(options.get("reduce", "0")) not in ("0", "", "False")
        if self.reduce and self.engine != "poll":
            raise ValueError("reduce=1 needs engine=poll")
        self.scratch: memoryview | None = None
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(self.k + 8)
        self.lanes: list[_Lane] = []
        self.threads: list[threading.Thread] = []
        self.jobs: list[queue.SimpleQueue] = []
        self.done: queue.SimpleQueue = queue.SimpleQueue()
        self.x: np.ndarray | None = None
        self.plan: list = []

    def info(self) -> dict:
        return {"address": self.listener.getsockname()}

    def connect(self, infos: list[dict]) -> None:
        nxt = tuple(infos[(self.rank + 1) % self.world]["address"])
        tx = []
        for lane in range(self.k):
            s = socket.create_connection(nxt, timeout=IO_TIMEOUT_S)
            s.sendall(struct.pack("<I", lane))
            tx.append(s)
        rx: list[socket.socket | None] = [None] * self.k
        self.listener.settimeout(IO_TIMEOUT_S)
        for _ in range(self.k):
            c, _ = self.listener.accept()
            c.settimeout(IO_TIMEOUT_S)
            (lane,) = struct.unpack("<I", _recv_exact(c, 4))
            rx[lane] = c
        for s in tx + rx:
            s.settimeout(None)
            _tune(s, self.sockbuf)
        self.lanes = [_Lane(t, r, self.slice_bytes) for t, r in zip(tx, rx, strict=True)]
        if self.engine == "poll":
            # Non-blocking mode: Python adds no poll() of its own, and the
            # engine's own poll() is bounded by IO_TIMEOUT_S.
            for sock in tx + rx:
                sock.setblocking(False)
            return
        # Lane 0 receives on the calling thread; every other receive side
        # and every send side has a thread of its own.
        for i, lane in enumerate(self.lanes):
            roles = ["send"] if i == 0 else ["send", "recv"]
            for role in roles:
                q: queue.SimpleQueue = queue.SimpleQueue()
                t = threading.Thread(target=self._serve, args=(lane, i, role, q),
                                     name=f"lane{i}-{role}", daemon=True)
                t.start()
                self.jobs.append(q)
                self.threads.append(t)

    def _serve(self, lane: _Lane, i: int, role: str, q: queue.SimpleQueue) -> None:
        while True:
            job = q.get()
            if job is None:
                return
            mv = job
            sends, recvs = self.plan[i]
            try:
                if role == "send":
                    lane.send(mv, sends, recvs)
                else:
                    lane.recv(mv, recvs)
                self.done.put(None)
            except BaseException as e:  # reported to the calling thread
                self.done.put(e)

    def alloc(self, nbytes: int) -> None:
        self.x = np.empty(nbytes // 4, dtype=np.float32)
        self.x.fill(0.0)
        self.mv = memoryview(self.x).cast("B")
        self.plan = ring_plan(self.mv.nbytes, self.rank, self.world, self.k)
        if self.reduce:
            self.scratch = memoryview(np.zeros(nbytes // 4, dtype=np.float32)).cast("B")

    def verify(self) -> str | None:
        """Chunk c starts at rank c and is forwarded verbatim around the
        ring, so afterwards every rank holds rank c's chunk c: with rank r
        contributing the value r + 1 everywhere, chunk c must be all c + 1."""
        x = self.x
        x.fill(self.rank + 1)
        self.run(1)
        err = None
        block = 1 << 16     # compare in blocks: no tensor-sized temporaries
        if self.reduce:     # a real sum: every element is 1 + 2 + ... + world
            want = self.world * (self.world + 1) // 2
            if not all((x[b:b + block] == want).all() for b in range(0, x.size, block)):
                err = f"not every element is the sum {want}"
            x.fill(0.0)
            return err
        for c, (off, ln) in enumerate(split(0, x.size, self.world, 1)):
            if not all((x[b:min(b + block, off + ln)] == c + 1).all()
                       for b in range(off, off + ln, block)):
                err = f"chunk {c} does not hold rank {c}'s data"
                break
        x.fill(0.0)
        return err

    def one(self) -> None:
        mv = self.mv
        for lane in self.lanes:
            lane.reset()
        for q in self.jobs:
            q.put(mv)
        first: BaseException | None = None
        try:
            self.lanes[0].recv(mv, self.plan[0][1])
        except BaseException as e:
            first = e
        for _ in self.jobs:
            r = self.done.get(timeout=IO_TIMEOUT_S * 2)
            if r is not None and first is None:
                first = r
        if first is not None:
            raise first

    def one_polling(self) -> None:
        """The same byte movement on one thread with non-blocking sockets:
        no thread hand-offs, so less latency for small buffers."""
        mv = self.mv
        states = [_PollState(lane, sends, recvs, self.scratch, self.world - 1)
                  for lane, (sends, recvs) in zip(self.lanes, self.plan, strict=True)]
        poller = select.poll()
        registered: dict[int, int] = {}
        while True:
            moved = False
            want: dict[int, int] = {}
            for st in states:
                moved |= st.pump(mv, want)
            if not want:
                if all(st.finished() for st in states):
                    break
                continue
            if moved:
                continue
            for fd, ev in want.items():
                if registered.get(fd) != ev:
                    if fd in registered:
                        poller.modify(fd, ev)
                    else:
                        poller.register(fd, ev)
                    registered[fd] = ev
            for fd in [fd for fd in registered if fd not in want]:
                poller.unregister(fd)
                del registered[fd]
            if not poller.poll(IO_TIMEOUT_S * 1000):
                raise TimeoutError("no progress on the ring")

    def run(self, n: int) -> None:
        op = self.one_polling if self.engine == "poll" else self.one
        for _ in range(n):
            op()

    def free(self) -> None:
        self.x = None
        self.mv = None
        self.scratch = None
        self.plan = []

    def close(self) -> None:
        for q in self.jobs:
            q.put(None)
        for lane in self.lanes:
            for s in (lane.tx, lane.rx):
                try:
                    s.close()
                except OSError:
                    pass
        self.listener.close()


def _main() -> None:
    import argparse
    import itertools

    import _common as c

    ap = argparse.ArgumentParser(description="Time the raw TCP ring floor alone.")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--sizes", default="1M,16M,64M")
    ap.add_argument("--connections", default="1,2,4", help="K values to compare")
    ap.add_argument("--sockbuf", default="0", help="socket buffer sizes to compare (0 = auto)")
    ap.add_argument("--slice", default="256K", help="forwarding granularity(ies)")
    ap.add_argument("--engine", default="threads", help="threads, poll or both")
    ap.add_argument("--budget", type=float, default=2.0)
    args = ap.parse_args()
    c.install_cleanup()
    policy = c.TimingPolicy(budget_s=args.budget)
    rows = []
    engines = ["threads", "poll"] if args.engine == "both" else [args.engine]
    for engine, k, sb, sl in itertools.product(
            engines, c.parse_list(args.connections), c.parse_list(args.sockbuf, c.parse_size),
            c.parse_list(args.slice, c.parse_size)):
        opts = {"connections": k, "sockbuf": sb, "slice_bytes": sl, "engine": engine}
        with c.WorkerGroup(RawRingWorker, args.world, opts, name="floor") as g:
            for size in c.parse_list(args.sizes, c.parse_size):
                m = c.measure(g, size, policy)
                rows.append([str(args.world), engine, str(k), c.fmt_size(sb) if sb else "auto",
                             c.fmt_size(sl), c.fmt_size(size), f"{m.busbw:.2f}",
                             f"{c.bus_bandwidth(size, args.world, m.min_s):.2f}"])
                print(*rows[-1], flush=True)
    c.print_table("raw TCP ring floor", ["world", "engine", "K", "sockbuf", "slice", "size",
                                         "busbw GB/s", "best GB/s"], rows)


if __name__ == "__main__":
    _main()
