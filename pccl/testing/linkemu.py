"""A user-space WAN link emulator: a TCP relay with delay, bandwidth,
per-flow windows, drops and black holes.

The kernel on the test machines has no ``netem``, so delay and the
long-fat-pipe effect (one TCP flow limited to window/RTT, far below the
link rate) are emulated here, in an asyncio relay (uvloop when installed)
that runs in a background thread::

    with LinkEmulator(delay=0.020, rate_bps=200e6, window=128 * 1024) as emu:
        front = emu.add_link("127.0.0.1:5000", name="0->1")
        # dial `front` instead of 127.0.0.1:5000
        emu.blackhole("0->1"); emu.heal("0->1"); emu.drop("0->1")

Model.  A *link* is one listening front address on 127.0.0.1 (port 0)
that forwards every connection it accepts to one target.  Each link has
two *directions* (client -> target and back); each direction has

* a one-way ``delay`` (seconds);
* a bandwidth limit ``rate_bps`` (bits/s) shared by every connection
  through the link: the direction is a FIFO transmitter - a chunk starts
  when the previous one has been sent, takes ``len * 8 / rate`` seconds,
  and arrives ``delay`` later (a router's output queue with zero burst);
  its queue holds at most ``queue_bytes``, beyond which the relay stops
  reading from the senders;
* a per-connection in-flight ``window`` (bytes): data read from the
  source and not yet *acknowledged* (delivered on the other side plus the
  reverse direction's delay, i.e. what a TCP sender would have
  unacknowledged) is capped, and the relay does not read from the source
  socket while the window is full.  One connection therefore moves at most
  ``window / (delay_fwd + delay_rev)`` = window/RTT, like a TCP flow whose
  congestion or receive window is ``window`` on a long fat pipe.

Commands: :meth:`LinkEmulator.drop` resets every connection of a link
(``SO_LINGER`` 0, so both ends see RST); :meth:`LinkEmulator.blackhole`
stops forwarding in both directions without closing anything (bytes in
flight are held, nothing is read; new connections are accepted but stay
silent) until :meth:`LinkEmulator.heal`, after which the held bytes move
on, as TCP would recover after a transient partition.

Pointing peers through it: a :class:`pccl.StaticRing` rank dials
``emu.add_link(addresses[rank + 1])`` instead of its successor's address
(:func:`ring_addresses`); a :class:`pccl.Communicator` is created with
``advertise=emu.add_link(lambda: comm.p2p_address)`` - a target may be a
zero-argument callable, evaluated when a connection arrives, for
listeners that only learn their port later.

Accuracy (see docs/testing.md for measured numbers): delivery times come
from a virtual clock, so timer lateness (event-loop granularity, about
0.1-1 ms; more under load) delays individual chunks but does not
accumulate into the rate.  Reads are cut to ``chunk`` bytes (default:
2 ms of link time, 4-256 KiB), which bounds burstiness.  The relay is one
Python thread: its throughput ceiling on the machine (``python -m
pccl.testing.linkemu --ceiling``) caps what it can emulate in total.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .._aio import new_event_loop

__all__ = ["LinkEmulator", "LinkStats", "Sink", "measure_flows", "parse_address", "ring_addresses"]

_READ_SOFT_CAP = 256 * 1024
_WRITE_HIGH = 256 * 1024  # destination transport buffer before we stop reading
_CALL_TIMEOUT = 10.0       # every cross-thread call is bounded


def parse_address(addr: Any) -> tuple[str, int]:
    """``"host:port"`` (``[v6]:port`` too) or ``(host, port)`` -> tuple."""
    if isinstance(addr, tuple):
        return str(addr[0]), int(addr[1])
    host, sep, port = str(addr).rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"not a host:port address: {addr!r}")
    return host.strip("[]"), int(port)


def _fmt(addr: tuple[str, int]) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


@dataclass
class DirectionStats:
    bytes: int = 0           # delivered to the destination
    chunks: int = 0
    max_queue_bytes: int = 0  # largest backlog seen in the transmitter


@dataclass
class LinkStats:
    name: str
    front: str
    connections_total: int = 0
    connections_open: int = 0
    forward: DirectionStats = field(default_factory=DirectionStats)   # client -> target
    reverse: DirectionStats = field(default_factory=DirectionStats)   # target -> client


class _Direction:
    """One direction of a link: a FIFO transmitter at ``rate`` plus delay."""

    def __init__(self, delay: float, rate_bps: float | None, queue_bytes: int):
        self.delay = delay
        self.rate = rate_bps / 8.0 if rate_bps else None   # bytes/s
        self.queue_bytes = queue_bytes
        self.next_free = 0.0      # when the transmitter is idle again
        self.stats = DirectionStats()

    def backlog(self, now: float) -> int:
        if self.rate is None:
            return 0
        return int(max(0.0, self.next_free - now) * self.rate)

    def transmit(self, now: float, nbytes: int) -> float:
        """Arrival time at the far end of ``nbytes`` handed over at ``now``."""
        if self.rate is None:
            return now + self.delay
        start = max(now, self.next_free)
        self.next_free = start + nbytes / self.rate
        self.stats.max_queue_bytes = max(self.stats.max_queue_bytes, self.backlog(now))
        return self.next_free + self.delay

    def chunk_limit(self) -> int:
        if self.rate is None:
            return _READ_SOFT_CAP
        return int(min(_READ_SOFT_CAP, max(4096, self.rate * 0.002)))


class _Link:
    def __init__(self, emu: LinkEmulator, name: str, target, delay: float,
                 reverse_delay: float, rate_bps, reverse_rate_bps, window, queue_bytes):
        self.emu = emu
        self.name = name
        self.target = target
        self.window = window
        self.fwd = _Direction(delay, rate_bps, queue_bytes)
        self.rev = _Direction(reverse_delay, reverse_rate_bps, queue_bytes)
        self.blackholed = False
        self.conns: set[_Conn] = set()
        self.server: asyncio.AbstractServer | None = None
        self.front: tuple[str, int] = ("", 0)
        self.connections_total = 0

    def resolve_target(self) -> tuple[str, int] | None:
        t = self.target
        if callable(t):
            t = t()
        return None if t is None else parse_address(t)

    def stats(self) -> LinkStats:
        return LinkStats(self.name, _fmt(self.front), self.connections_total, len(self.conns),
                         self.fwd.stats, self.rev.stats)


class _Pipe:
    """One direction of one relayed connection."""

    def __init__(self, conn: _Conn, direction: _Direction, back: _Direction):
        self.conn = conn
        self.dir = direction
        self.back = back               # its delay carries the acknowledgements
        self.src: _Side | None = None
        self.dst: _Side | None = None
        self.inflight = 0              # read, not yet acknowledged
        self.queue: collections.deque = collections.deque()   # (arrival, bytes | None=EOF)
        self.acks: collections.deque = collections.deque()    # (ack time, nbytes)
        self.timer: asyncio.TimerHandle | None = None
        self.ack_timer: asyncio.TimerHandle | None = None
        self.wake_timer: asyncio.TimerHandle | None = None
        self.reading = True
        self.eof_in = False            # source sent EOF
        self.eof_out = False           # EOF delivered

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.conn.loop

    def allowance(self) -> int:
        """Bytes the relay may read from the source now."""
        link = self.conn.link
        if link.blackholed or self.eof_in:
            return 0
        if self.dst is None or self.dst.transport is None or self.dst.write_paused:
            return 0
        now = self.loop.time()
        room = self.dir.chunk_limit()
        if link.window is not None:
            room = min(room, link.window - self.inflight)
        if self.dir.rate is not None:
            room = min(room, self.dir.queue_bytes - self.dir.backlog(now))
        return max(0, room)

    def unwanted_read_room(self) -> int:
        """Bytes to take when the loop reads although :meth:`allowance` is
        0 (uvloop starts reading a new connection right after
        ``connection_made``, whatever it was told): what the window still
        allows, at least one byte.  The bytes are held until the link may
        move them (target connected, black hole healed) and then leave as
        one write.  Taking a single byte would split the sender's first
        write into two deliveries, and some peers read their first message
        with one ``recv``: gloo's listener reads the 8-byte pair sequence
        number that way and silently drops a connection on a short read."""
        room = self.dir.chunk_limit()
        if self.conn.link.window is not None:
            room = min(room, self.conn.link.window - self.inflight)
        return max(1, room)

    def update_reading(self) -> None:
        if self.src is None or self.src.transport is None or self.conn.closed:
            return
        t = self.src.transport
        want = self.allowance() > 0
        # Ask the transport, not a flag of ours: uvloop starts reading on
        # its own after connection_made.
        reading = t.is_reading()
        if want and not reading:
            t.resume_reading()
        elif not want:
            if reading:
                t.pause_reading()
            self._arm_wake()
        self.reading = want

    def force_pause(self) -> None:
        self.update_reading()

    def _arm_wake(self) -> None:
        """Blocked by a full transmitter queue (no ack will wake us): retry
        when the backlog has drained below the limit."""
        d = self.dir
        if d.rate is None or self.wake_timer is not None:
            return
        excess = d.backlog(self.loop.time()) - d.queue_bytes + d.chunk_limit()
        if excess <= 0:
            return
        delay = excess / d.rate

        def wake() -> None:
            self.wake_timer = None
            self.update_reading()

        self.wake_timer = self.loop.call_later(max(delay, 0.0005), wake)

    def push(self, data: bytes) -> None:
        now = self.loop.time()
        arrival = self.dir.transmit(now, len(data))
        if self.queue and arrival < self.queue[-1][0]:
            arrival = self.queue[-1][0]     # the delay was lowered: keep order
        self.inflight += len(data)
        self.queue.append((arrival, data))
        self._arm_delivery()
        self.update_reading()

    def push_eof(self) -> None:
        self.eof_in = True
        arrival = self.loop.time() + self.dir.delay
        if self.queue:
            arrival = max(arrival, self.queue[-1][0])
        self.queue.append((arrival, None))
        self._arm_delivery()

    def _arm_delivery(self) -> None:
        if self.timer is None and self.queue and not self.conn.link.blackholed:
            self.timer = self.loop.call_at(self.queue[0][0], self._deliver)

    def _deliver(self) -> None:
        self.timer = None
        if self.conn.closed or self.conn.link.blackholed:
            return
        now = self.loop.time()
        dst = self.dst
        if dst is None or dst.transport is None:
            return        # not connected yet: connection_made re-arms
        while self.queue and self.queue[0][0] <= now + 0.0002:
            t, data = self.queue.popleft()
            if data is None:
                self.eof_out = True
                if dst is not None and dst.transport is not None and dst.transport.can_write_eof():
                    dst.transport.write_eof()
                self.conn.maybe_finish()
                continue
            if dst is not None and dst.transport is not None:
                dst.transport.write(data)
            st = self.dir.stats
            st.bytes += len(data)
            st.chunks += 1
            self.acks.append((t + self.back.delay, len(data)))
        self._arm_delivery()
        self._arm_ack()

    def _arm_ack(self) -> None:
        if self.ack_timer is None and self.acks:
            self.ack_timer = self.loop.call_at(self.acks[0][0], self._ack)

    def _ack(self) -> None:
        self.ack_timer = None
        now = self.loop.time()
        while self.acks and self.acks[0][0] <= now + 0.0002:
            self.inflight -= self.acks.popleft()[1]
        self._arm_ack()
        self.update_reading()

    def heal(self) -> None:
        self._arm_delivery()
        self.update_reading()

    def cancel(self) -> None:
        for h in (self.timer, self.ack_timer, self.wake_timer):
            if h is not None:
                h.cancel()
        self.timer = self.ack_timer = self.wake_timer = None
        self.queue.clear()
        self.acks.clear()


class _Side(asyncio.BufferedProtocol):
    """One socket of a relayed connection: it is the source of ``out`` and
    the destination of the other pipe."""

    def __init__(self, conn: _Conn, out: _Pipe):
        self.conn = conn
        self.out = out
        self.transport: asyncio.Transport | None = None
        self.write_paused = False
        self._buf = bytearray(_READ_SOFT_CAP)
        self._view = memoryview(self._buf)

    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.conn.closed:        # reset before the transport existed
            self.conn.reset(transport)
            self.transport = None
            return
        transport.set_write_buffer_limits(high=_WRITE_HIGH)
        try:
            transport.get_extra_info("socket").setsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass
        for pipe in (self.conn.up, self.conn.down):
            pipe.update_reading()
            pipe._arm_delivery()
        # uvloop starts reading after connection_made returns, whatever we
        # said: settle the reading state again right after.
        self.conn.loop.call_soon(self.out.force_pause)

    def get_buffer(self, sizehint: int):
        n = self.out.allowance()
        if n <= 0:
            # A read we did not want: the loop (re)started reading behind
            # our back (uvloop does after connection_made, typically before
            # the relay has reached the target).  Pause for real once this
            # read is over (pausing inside the read callback is not safe);
            # what this read takes is held and forwarded whole.
            self.conn.loop.call_soon(self.out.force_pause)
            return self._view[:self.out.unwanted_read_room()]
        return self._view[:n]

    def buffer_updated(self, nbytes: int) -> None:
        self.out.push(bytes(self._view[:nbytes]))

    def eof_received(self) -> bool:
        self.out.push_eof()
        return True   # keep our write side open: half-close is forwarded

    def pause_writing(self) -> None:
        self.write_paused = True
        self.conn.other_pipe(self.out).update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.conn.other_pipe(self.out).update_reading()

    def connection_lost(self, exc) -> None:
        self.transport = None
        if not self.conn.closed:
            # A reset (exc) travels at once, like an RST would; a clean
            # close waits until the bytes before it have been delivered.
            if exc is not None or not self.out.eof_in:
                self.conn.abort()
            else:
                self.conn.maybe_finish()


class _Conn:
    def __init__(self, link: _Link, loop: asyncio.AbstractEventLoop):
        self.link = link
        self.loop = loop
        self.closed = False
        self.up = _Pipe(self, link.fwd, link.rev)     # client -> target
        self.down = _Pipe(self, link.rev, link.fwd)   # target -> client
        self.client = _Side(self, self.up)
        self.server = _Side(self, self.down)
        self.up.src, self.up.dst = self.client, self.server
        self.down.src, self.down.dst = self.server, self.client

    def other_pipe(self, pipe: _Pipe) -> _Pipe:
        return self.down if pipe is self.up else self.up

    def maybe_finish(self) -> None:
        """Both directions ended with EOF and delivered: close quietly."""
        if self.up.eof_out and self.down.eof_out and not self.closed:
            self.closed = True
            for side in (self.client, self.server):
                if side.transport is not None:
                    side.transport.close()
            self._forget()

    def abort(self) -> None:
        """Reset both sockets (RST, not FIN)."""
        if self.closed:
            return
        self.closed = True
        for side in (self.client, self.server):
            if side.transport is not None:
                self.reset(side.transport)
        self._forget()

    @staticmethod
    def reset(transport) -> None:
        try:
            transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (OSError, AttributeError):
            pass
        transport.abort()

    def _forget(self) -> None:
        self.up.cancel()
        self.down.cancel()
        self.link.conns.discard(self)


class LinkEmulator:
    """Emulated WAN links on 127.0.0.1, relayed by a background thread.

    Defaults given here apply to every link added later (each can
    override them): ``delay`` one-way seconds (both directions),
    ``rate_bps`` bits/s per direction shared by a link's connections (None:
    unlimited), ``window`` bytes in flight per connection and direction
    (None: unlimited), ``queue_bytes`` the transmitter's queue (default:
    the bandwidth-delay product over 50 ms, at least 256 KiB).
    """

    def __init__(self, delay: float = 0.0, rate_bps: float | None = None,
                 window: int | None = None, queue_bytes: int | None = None,
                 host: str = "127.0.0.1"):
        self.defaults = {"delay": delay, "rate_bps": rate_bps, "window": window,
                         "queue_bytes": queue_bytes}
        self.host = host
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._links: dict[str, _Link] = {}
        self._by_front: dict[str, _Link] = {}
        self._names = itertools.count()
        self._lock = threading.Lock()

    # -- lifetime ---------------------------------------------------------

    def start(self) -> LinkEmulator:
        if self._thread is not None:
            return self
        loop = new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="pccl-linkemu", daemon=True)
        self._thread.start()
        if not ready.wait(_CALL_TIMEOUT):
            raise RuntimeError("link emulator thread did not start")
        return self

    def stop(self, timeout: float = _CALL_TIMEOUT) -> None:
        """Reset every connection, close every listener, end the thread.
        Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._call(self._shutdown(), timeout)
        except Exception:
            pass
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if not thread.is_alive():
            loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> LinkEmulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _shutdown(self) -> None:
        for link in list(self._links.values()):
            for c in list(link.conns):
                c.abort()
            if link.server is not None:
                link.server.close()
        for link in list(self._links.values()):
            if link.server is not None:
                try:
                    await asyncio.wait_for(link.server.wait_closed(), 2.0)
                except (asyncio.TimeoutError, OSError):
                    pass

    def _call(self, coro, timeout: float = _CALL_TIMEOUT):
        if self._loop is None:
            coro.close()
            raise RuntimeError("link emulator is not running (call start())")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- links --------------------------------------------------------------

    def add_link(self, target, name: str | None = None, *, delay: float | None = None,
                 reverse_delay: float | None = None, rate_bps: float | None = ...,
                 reverse_rate_bps: float | None = ..., window: int | None = ...,
                 queue_bytes: int | None = None, host: str | None = None,
                 port: int = 0) -> str:
        """Open a front address that relays to ``target`` ("host:port",
        (host, port), or a callable returning one, evaluated per
        connection); returns the front as "127.0.0.1:port".  Unset
        arguments take the emulator's defaults; the reverse direction
        mirrors the forward one unless given.  ``host``: the front's
        listening address (default: the emulator's, 127.0.0.1); ``port``:
        0 (the default) lets the kernel pick one."""
        d = self.defaults
        delay = d["delay"] if delay is None else delay
        reverse_delay = delay if reverse_delay is None else reverse_delay
        rate = d["rate_bps"] if rate_bps is ... else rate_bps
        rrate = rate if reverse_rate_bps is ... else reverse_rate_bps
        window = d["window"] if window is ... else window
        if queue_bytes is None:
            queue_bytes = d["queue_bytes"]
        if queue_bytes is None:
            queue_bytes = max(256 * 1024, int(max(rate or 0, rrate or 0) / 8 * 0.05))
        if window is not None and window < 1:
            raise ValueError("window must be >= 1 byte")
        if not callable(target):
            parse_address(target)
        with self._lock:
            name = name or f"link{next(self._names)}"
            if name in self._links:
                raise ValueError(f"a link named {name!r} exists")
            link = _Link(self, name, target, delay, reverse_delay, rate, rrate, window,
                         queue_bytes)
            self._links[name] = link
        try:
            self._call(self._listen(link, host or self.host, port))
        except BaseException:
            with self._lock:
                self._links.pop(name, None)
            raise
        front = _fmt(link.front)
        with self._lock:
            self._by_front[front] = link
        return front

    def address_for(self, target, **kwargs) -> str:
        """The front of the link to ``target``, created on first use."""
        key = target if callable(target) else _fmt(parse_address(target))
        with self._lock:
            for link in self._links.values():
                t = link.target if callable(link.target) else _fmt(parse_address(link.target))
                if t == key:
                    return _fmt(link.front)
        return self.add_link(target, **kwargs)

    def set_target(self, link: str, target) -> None:
        """Point the link at another target (new connections only)."""
        self._get(link).target = target

    async def _listen(self, link: _Link, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()

        def factory():
            conn = _Conn(link, loop)
            link.conns.add(conn)
            link.connections_total += 1
            loop.create_task(self._dial(conn))
            return conn.client

        link.server = await loop.create_server(factory, host, port, backlog=512)
        sock = link.server.sockets[0]
        link.front = sock.getsockname()[:2]

    async def _dial(self, conn: _Conn) -> None:
        link = conn.link
        try:
            target = link.resolve_target()
            if target is None:
                raise OSError("link has no target yet")
            loop = conn.loop
            await asyncio.wait_for(
                loop.create_connection(lambda: conn.server, target[0], target[1]), 10.0)
        except (OSError, asyncio.TimeoutError, ValueError):
            conn.abort()   # unreachable or unknown target: the client sees RST
            return

    def _get(self, link: str) -> _Link:
        with self._lock:
            if link in self._links:
                return self._links[link]
            if link in self._by_front:
                return self._by_front[link]
        raise KeyError(f"no link {link!r}")

    def _select(self, link: str | Sequence[str] | None) -> list[_Link]:
        if link is None:
            with self._lock:
                return list(self._links.values())
        if isinstance(link, str):
            return [self._get(link)]
        return [self._get(n) for n in link]

    # -- commands -----------------------------------------------------------

    def drop(self, link: str | Sequence[str] | None = None) -> int:
        """Reset every connection of ``link`` (a name or front; None: all);
        returns how many.  New connections are relayed as before."""
        links = self._select(link)

        async def go() -> int:
            n = 0
            for lk in links:
                for c in list(lk.conns):
                    c.abort()
                    n += 1
            return n

        return self._call(go())

    def blackhole(self, link: str | Sequence[str] | None = None) -> None:
        """Stop forwarding in both directions, closing nothing."""
        links = self._select(link)

        async def go() -> None:
            for lk in links:
                lk.blackholed = True
                for c in list(lk.conns):
                    for p in (c.up, c.down):
                        if p.timer is not None:
                            p.timer.cancel()
                            p.timer = None
                        p.update_reading()

        self._call(go())

    def heal(self, link: str | Sequence[str] | None = None) -> None:
        """End a black hole: held bytes move on, reading resumes."""
        links = self._select(link)

        async def go() -> None:
            for lk in links:
                lk.blackholed = False
                for c in list(lk.conns):
                    c.up.heal()
                    c.down.heal()

        self._call(go())

    def configure(self, link: str | Sequence[str] | None = None, *,
                  delay: float | None = None, rate_bps: float | None = ...,
                  window: int | None = ...) -> None:
        """Change delay (both directions), rate (both) or window of links
        in place; bytes already in flight keep their schedule."""
        links = self._select(link)

        async def go() -> None:
            for lk in links:
                if delay is not None:
                    lk.fwd.delay = lk.rev.delay = delay
                if rate_bps is not ...:
                    for d in (lk.fwd, lk.rev):
                        d.rate = rate_bps / 8.0 if rate_bps else None
                if window is not ...:
                    lk.window = window
                for c in list(lk.conns):
                    c.up.update_reading()
                    c.down.update_reading()

        self._call(go())

    def stats(self, link: str | None = None) -> LinkStats | dict[str, LinkStats]:
        """Counters of one link, or of every link by name."""

        async def go():
            if link is not None:
                return self._get(link).stats()
            return {lk.name: lk.stats() for lk in self._select(None)}

        return self._call(go())

    @property
    def thread_id(self) -> int | None:
        """The relay thread's native id (to read its CPU time from
        ``/proc``), or None when the emulator is not running."""
        t = self._thread
        return None if t is None else t.native_id

    @property
    def links(self) -> list[str]:
        with self._lock:
            return list(self._links)


def ring_addresses(emu: LinkEmulator, addresses: Sequence[str], **link_kwargs) -> list[list[str]]:
    """For a :class:`pccl.StaticRing` of ``len(addresses)`` ranks: one link
    per ring edge r -> r+1 (named ``"r->r+1"``).  Returns, per rank, the
    address list to pass to ``StaticRing.connect`` (its successor replaced
    by that link's front)."""
    n = len(addresses)
    out = []
    for r in range(n):
        nxt = (r + 1) % n
        front = emu.add_link(addresses[nxt], name=f"{r}->{nxt}", **link_kwargs)
        view = list(addresses)
        view[nxt] = front
        out.append(view)
    return out


# --------------------------------------------------------------------------
# Self-measurement: `python -m pccl.testing.linkemu`.


class LoopbackServer:
    """A blocking TCP server on 127.0.0.1:0 for measurements and tests: one
    thread accepts, one thread per connection hands every chunk received
    to :meth:`on_data` (index = accept order).  ``close()`` stops and joins
    every thread within a bound."""

    RECV_BYTES = 1 << 20

    def __init__(self, name: str = "loopback-server") -> None:
        self._srv = socket.create_server(("127.0.0.1", 0), backlog=64)
        self._srv.settimeout(0.1)
        self.address = _fmt(self._srv.getsockname()[:2])
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accepted = 0
        self._acceptor = threading.Thread(target=self._accept, name=name, daemon=True)
        self._acceptor.start()

    def on_connect(self, index: int) -> None:
        """Called on the acceptor thread before the connection's thread starts."""

    def on_data(self, conn: socket.socket, index: int, data: bytes) -> None:
        raise NotImplementedError

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            index, self._accepted = self._accepted, self._accepted + 1
            self.on_connect(index)
            t = threading.Thread(target=self._serve, args=(conn, index), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket, index: int) -> None:
        conn.settimeout(0.2)
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(self.RECV_BYTES)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                try:
                    self.on_data(conn, index, data)
                except OSError:
                    return

    def close(self) -> None:
        self._stop.set()
        self._srv.close()
        self._acceptor.join(5)
        for t in self._threads:
            t.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Sink(LoopbackServer):
    """Counts the bytes received per connection (in accept order)."""

    def __init__(self) -> None:
        self.counts: list[int] = []
        super().__init__("sink")

    def on_connect(self, index: int) -> None:
        self.counts.append(0)

    def on_data(self, conn: socket.socket, index: int, data: bytes) -> None:
        self.counts[index] += len(data)


def measure_flows(front: str, sink: Sink, flows: int, seconds: float,
                  warmup: float = 0.5) -> list[float]:
    """Push data into ``front`` (which leads to ``sink``) on ``flows``
    connections for ``warmup + seconds``; the bytes/s each flow delivered
    at the sink during the last ``seconds`` (the warm-up absorbs socket
    buffers filling and the first round trips)."""
    host, port = parse_address(front)
    payload = b"\0" * (64 * 1024)
    stop = threading.Event()
    first = len(sink.counts)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            with socket.create_connection((host, port), timeout=10) as s:
                s.settimeout(1.0)
                while not stop.is_set():
                    try:
                        s.sendall(payload)
                    except TimeoutError:
                        continue
        except OSError as e:
            if not stop.is_set():
                errors.append(e)

    threads = [threading.Thread(target=send, daemon=True) for _ in range(flows)]
    for t in threads:
        t.start()
    time.sleep(warmup)          # a measurement window, not synchronisation
    before = list(sink.counts[first:first + flows])
    t0 = time.monotonic()
    time.sleep(seconds)
    after = list(sink.counts[first:first + flows])
    dt = time.monotonic() - t0
    stop.set()
    for t in threads:
        t.join(10)
    if errors:
        raise errors[0]
    if len(before) < flows:
        raise RuntimeError(f"only {len(before)} of {flows} flows reached the sink")
    return [(a - b) / dt for a, b in zip(after, before, strict=True)]


def _selftest(args) -> int:
    mb = 1e6
    rtt = args.rtt_ms / 1000
    with Sink() as sink:
        if args.ceiling:
            with LinkEmulator() as emu:
                front = emu.add_link(sink.address)
                for n in (1, 4):
                    r = measure_flows(front, sink, n, args.seconds)
                    print(f"ceiling, no limits, {n} flow(s): {sum(r) / mb:8.1f} MB/s "
                          f"= {sum(r) * 8 / 1e6:7.0f} Mbit/s")
        with LinkEmulator(delay=rtt / 2, window=args.window) as emu:
            front = emu.add_link(sink.address)
            r = measure_flows(front, sink, 1, args.seconds)
            want = args.window / rtt
            print(f"one flow, window {args.window} B, RTT {args.rtt_ms:g} ms: "
                  f"{r[0] * 8 / 1e6:.2f} Mbit/s, window/RTT = {want * 8 / 1e6:.2f} Mbit/s "
                  f"({r[0] / want:.1%})")
        rate = args.rate_mbit * 1e6
        with LinkEmulator(delay=rtt / 2, rate_bps=rate, window=args.window) as emu:
            front = emu.add_link(sink.address)
            for n in (1, 4, 16):
                r = measure_flows(front, sink, n, args.seconds)
                cap = min(rate / 8, n * args.window / rtt)
                print(f"link {args.rate_mbit:g} Mbit/s, {n:2d} flows: total "
                      f"{sum(r) * 8 / 1e6:7.1f} Mbit/s ({sum(r) / cap:.1%} of "
                      f"min(link, n*window/RTT)), per flow min/max "
                      f"{min(r) * 8 / 1e6:.1f}/{max(r) * 8 / 1e6:.1f} Mbit/s")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pccl.testing.linkemu",
        description="Measure the link emulator on this machine: window/RTT accuracy, "
                    "sharing of a link's rate, and (--ceiling) the relay's top speed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--rtt-ms", type=float, default=40.0, help="round-trip time")
    ap.add_argument("--window", type=int, default=128 * 1024, help="bytes per flow in flight")
    ap.add_argument("--rate-mbit", type=float, default=200.0, help="link rate, Mbit/s")
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    ap.add_argument("--ceiling", action="store_true", help="also measure the relay's ceiling")
    return _selftest(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
