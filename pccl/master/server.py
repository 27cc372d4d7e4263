"""The pccl-master network service: handshakes, framing, timers, logging.

One asyncio event loop (uvloop when importable) runs everything.  Each
connection is an :class:`asyncio.Protocol`: bytes are cut into frames,
decoded and validated in ``data_received`` and handed to the state machine
in the same callback, and the frames the state machine answers with go
straight to the transport.  No task, queue or timeout object sits between
a peer's message and the master's reply, so an operation's verdict leaves
in the loop iteration that received the last ``op_done`` (this is on every
collective's path; see docs/protocol.md).  One ticking task drives
heartbeat and vote deadlines; the optional status endpoint runs beside.
All membership logic lives in :mod:`pccl.master.state`; this module only
moves validated messages in and the state machine's actions out.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import logging
import socket
import time
from typing import Any

import msgpack

from .. import _wire as protocol
from .._wire import ProtocolViolation
from .probing import SolveRequest
from .state import Actions, Event, MasterState
from .topology import propose_ring, solve_ring

log = logging.getLogger("pccl.master")

HANDSHAKE_TIMEOUT = 5.0
# A peer that does not read: once this much output waits for it at the
# master, or its output has not moved for WRITE_TIMEOUT, it is dropped as
# lost (it cannot follow the run).
SEND_BUFFER_MAX = 4 << 20
WRITE_TIMEOUT = 5.0
WRITE_HIGH_WATER = 256 * 1024  # buffered bytes above which the stall clock runs
CLOSE_FLUSH_TIMEOUT = 1.0  # for a final error/evicted message to leave
MAX_CONNECTIONS = 4096

_HEADER = protocol.HEADER.size
_MAX_MESSAGE = protocol.MAX_MESSAGE
_unpack_header = protocol.HEADER.unpack_from


class Histogram:
    """A fixed-bucket histogram of durations in seconds (Prometheus
    semantics: bucket ``le`` counts observations <= ``le``), cheap enough to
    observe on the message path."""

    BOUNDS = (
        25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3,
        100e-3, 250e-3, 500e-3, 1.0, 2.5, 5.0, 10.0,
    )

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BOUNDS) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.BOUNDS, seconds)] += 1
        self.sum += seconds

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative ``(le, count)`` pairs, ``+Inf`` last."""
        out, total = [], 0
        for bound, count in zip((*self.BOUNDS, float("inf")), self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out


def _quote(value: Any) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'
    return text


def logline(**fields: Any) -> str:
    """A ``key=value`` log line (values with spaces are quoted)."""
    return " ".join(f"{k}={_quote(v)}" for k, v in fields.items() if v is not None)


def _peername(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return protocol.format_hostport(str(peer[0]), int(peer[1]))
    return str(peer)


class Connection(asyncio.Protocol):
    """One TCP connection to the master: frames in, frames out.

    Until ``hello`` is verified (within the handshake timeout) the only
    thing it can do is be welcomed; afterwards every validated message goes
    to the server as it is cut from the stream.
    """

    def __init__(self, server: MasterServer):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.remote = "?"
        self.peer_id: str | None = None
        self.name: str | None = None  # hello.name, for log lines
        self.closing = False
        self.reason = "connection closed"  # why it ends, for the state machine
        self._rx = bytearray()
        self._nonce_m = b""
        self._timer: asyncio.TimerHandle | None = None  # handshake, stall or flush deadline
        self._stalled = False

    # -- asyncio.Protocol ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.remote = _peername(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Every message is small and answered: never let Nagle hold one.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if not self.server._accept(self):
            self.closing = True
            transport.abort()
            return
        self._nonce_m = protocol.new_nonce()
        self.send(
            protocol.encode(
                {
                    "type": "challenge",
                    "version": protocol.PROTOCOL_VERSION,
                    "nonce": self._nonce_m,
                    "auth": self.server.secret is not None,
                }
            )
        )
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.server.handshake_timeout, self._handshake_expired)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        rx = self._rx
        rx += data
        start = 0
        try:
            while not self.closing and len(rx) - start >= _HEADER:
                (length,) = _unpack_header(rx, start)
                if length > _MAX_MESSAGE:
                    raise ProtocolViolation(f"frame length {length} exceeds cap {_MAX_MESSAGE}")
                if length == 0:
                    raise ProtocolViolation("empty frame")
                end = start + _HEADER + length
                if len(rx) < end:
                    break
                msg = protocol.validate(
                    protocol.decode(bytes(rx[start + _HEADER : end])), protocol.TO_MASTER
                )
                start = end
                if self.peer_id is None:
                    self.server._hello(self, msg)
                else:
                    self.server._message(self, msg)
        except ProtocolViolation as exc:
            self.server._reject(self, f"protocol violation: {exc}")
        except Exception as exc:  # a bug: drop this connection, keep the run
            self.reason = f"internal error: {type(exc).__name__}"
            log.exception(
                logline(event="bug", remote=self.remote, peer=self.peer_id, name=self.name)
            )
            self.close_soon()
        if self.closing:
            rx.clear()
        elif start:
            del rx[:start]

    def eof_received(self) -> bool:
        if self.closing:
            return False
        rx = self._rx
        if rx:
            if len(rx) < _HEADER:
                why = f"truncated frame: {len(rx)} of {_HEADER} prefix bytes"
            else:
                length = int.from_bytes(rx[:_HEADER], "big")
                why = f"truncated frame: {len(rx) - _HEADER} of {length} body bytes"
            self.server._reject(self, f"protocol violation: {why}")
            return True  # the error still goes out on our half; close_soon closes
        if self.peer_id is None:
            log.info(logline(event="closed", remote=self.remote, reason="closed in handshake"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._cancel_timer()
        if exc is not None and self.reason == "connection closed":
            self.reason = f"connection error: {exc}"
        self.server._lost(self)

    def pause_writing(self) -> None:
        # The peer stopped reading: give it WRITE_TIMEOUT to resume.
        if not self.closing and not self._stalled:
            self._stalled = True
            self._cancel_timer()
            self._timer = asyncio.get_running_loop().call_later(WRITE_TIMEOUT, self._write_stalled)

    def resume_writing(self) -> None:
        if self._stalled:
            self._stalled = False
            if not self.closing:  # else the timer is close_soon's
                self._cancel_timer()

    # -- sending and closing ----------------------------------------------

    def send(self, frame: bytes) -> bool:
        """Write a frame; False when the peer is too slow to keep up."""
        if self.closing:
            return True
        transport = self.transport
        assert transport is not None
        transport.write(frame)
        return transport.get_write_buffer_size() <= SEND_BUFFER_MAX

    def close_soon(self) -> None:
        """Close once what is written is flushed (at most CLOSE_FLUSH_TIMEOUT)."""
        if self.closing:
            return
        self.closing = True
        self._cancel_timer()
        transport = self.transport
        if transport is None:
            return
        transport.close()
        self._timer = asyncio.get_running_loop().call_later(CLOSE_FLUSH_TIMEOUT, self.abort)

    def abort(self) -> None:
        self.closing = True
        self._cancel_timer()
        if self.transport is not None:
            with contextlib.suppress(Exception):
                self.transport.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _handshake_expired(self) -> None:
        self._timer = None
        if self.peer_id is None and not self.closing:
            reason = f"timeout: no hello within {self.server.handshake_timeout:g} s"
            self.server.counters["handshakes_failed"] += 1
            log.warning(logline(event="rejected", remote=self.remote, reason=reason))
            self.reason = reason
            self.abort()

    def _write_stalled(self) -> None:
        self._timer = None
        if not self.closing:
            self.reason = f"timeout: output not read for {WRITE_TIMEOUT:g} s"
            self.abort()


_SHARED_RING_MIN = 16  # rings shorter than this are cheap to validate and pack per message


def _encode_outgoing(msg: dict, rings: dict[int, tuple[list, bytes]]) -> bytes:
    """Validate and encode one outgoing message, byte for byte what
    ``protocol.encode(protocol.validate(msg, TO_PEER))`` returns.

    A vote round sends every member a ``topology`` that carries its group's
    whole ring, one list object shared by all of them (state.py): that ring
    is validated and packed once per call of :meth:`MasterServer._apply`
    (``rings``, keyed by the list's id, holding the list so the id stays
    valid), so the round costs O(n) Python work instead of O(n^2)."""
    ring = msg.get("ring") if msg["type"] == "topology" else None
    if not isinstance(ring, list) or len(ring) < _SHARED_RING_MIN:
        return protocol.encode(protocol.validate(msg, protocol.TO_PEER))
    cached = rings.get(id(ring))
    if cached is None or cached[0] is not ring:
        protocol.validate(msg, protocol.TO_PEER)
        cached = rings[id(ring)] = (ring, msgpack.packb(ring, use_bin_type=True))
    rest = dict(msg, ring=[])
    protocol.validate(rest, protocol.TO_PEER)  # everything but the (validated) ring
    if next(reversed(rest)) == "ring":
        # A msgpack map is its header, then each key and value in order: the
        # last value, the empty array (one byte, 0x90), becomes the ring.
        body = msgpack.packb(rest, use_bin_type=True)[:-1] + cached[1]
    else:
        parts = [_map_header(len(msg))]
        for key, value in msg.items():
            parts.append(msgpack.packb(key, use_bin_type=True))
            parts.append(cached[1] if key == "ring" else msgpack.packb(value, use_bin_type=True))
        body = b"".join(parts)
    if len(body) > protocol.MAX_MESSAGE:
        raise ValueError(f"message of {len(body)} bytes exceeds MAX_MESSAGE")
    return protocol.HEADER.pack(len(body)) + body


def _map_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x80 | n,))  # fixmap
    return b"\xde" + n.to_bytes(2, "big")  # map 16 (no message has 65536 fields)


class MasterServer:
    """The master service on the current event loop.

    ``await start()`` binds; ``await run()`` serves until :meth:`request_stop`
    (thread-unsafe: call it on the loop) and then shuts down cleanly.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        secret: bytes | None = None,
        heartbeat_interval: float = 0.5,
        heartbeat_timeout: float = 3.0,
        vote_timeout: float = 30.0,
        sync_timeout: float = 600.0,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        status: tuple[str, int] | None = None,
        max_connections: int = MAX_CONNECTIONS,
        probe_seconds: float = 0.2,
        topology_max_age: float = 300.0,
    ):
        self.host = host
        self.port = port
        self.secret = secret or None
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.state = MasterState(
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
            vote_timeout=vote_timeout,
            sync_timeout=sync_timeout,
            probe_seconds=probe_seconds,
            topology_max_age=topology_max_age,
        )
        # Silence is detected by the ticker (state.tick): a welcomed peer is
        # lost between heartbeat_timeout and heartbeat_timeout + tick_interval
        # after its last complete message.
        self.tick_interval = max(0.01, min(0.1, heartbeat_timeout / 20))
        self.status_bind = status
        self.address: str | None = None
        self.status_address: str | None = None
        self.counters = {
            "connections_accepted": 0,
            "messages_received": 0,
            "messages_rejected": 0,
            "handshakes_failed": 0,
        }
        # Master-side latency of the two fan-outs on every step's path: from
        # reading the message that completes an operation (its last op_done)
        # or a vote round (its last update_topology) to having written every
        # answer to the transports.  Time spent in the socket before the
        # read is not included.
        self.verdict_seconds = Histogram()
        self.vote_seconds = Histogram()
        self._server: asyncio.base_events.Server | None = None
        self._status = None
        self._tasks: set[asyncio.Task] = set()  # the ticker
        self._connections: set[Connection] = set()
        self._by_peer: dict[str, Connection] = {}
        self._stop: asyncio.Event | None = None
        self._stopped = False

    # ------------------------------------------------------------------
    # Lifecycle.

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def start(self) -> None:
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Connection(self), self.host, self.port, reuse_address=True
        )
        sockname = self._server.sockets[0].getsockname()
        self.address = protocol.format_hostport(str(sockname[0]), int(sockname[1]))
        self._spawn(self._tick_loop(), "pccl-master-ticker")
        if self.status_bind is not None:
            from .status import StatusServer

            self._status = StatusServer(self, *self.status_bind)
            self.status_address = await self._status.start()
        log.info(
            logline(
                event="started",
                listen=self.address,
                status=self.status_address,
                auth="hmac-sha256" if self.secret else "none",
                heartbeat_interval=self.state.heartbeat_interval,
                heartbeat_timeout=self.state.heartbeat_timeout,
                vote_timeout=self.state.vote_timeout,
            )
        )

    def request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def run(self) -> None:
        """Serve until request_stop(), then stop."""
        if self._server is None:
            await self.start()
        assert self._stop is not None
        try:
            await self._stop.wait()
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Close the listener, every connection and every task (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        if self._server is not None:
            self._server.close()
        if self._status is not None:
            await self._status.stop()
        for conn in list(self._connections):
            conn.abort()
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        await asyncio.sleep(0)  # let the aborted transports report connection_lost
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)
        if self.address is not None:
            log.info(logline(event="stopped", listen=self.address))

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------
    # Connections (called by Connection on the loop).

    def _accept(self, conn: Connection) -> bool:
        if self._stopped or len(self._connections) >= self.max_connections:
            log.warning(
                logline(event="rejected", remote=conn.remote, reason="too many connections")
            )
            return False
        self.counters["connections_accepted"] += 1
        self._connections.add(conn)
        return True

    def _hello(self, conn: Connection, hello: dict) -> None:
        if hello["type"] != "hello":
            raise ProtocolViolation(f"expected hello, got {hello['type']!r}")
        if hello["version"] != protocol.PROTOCOL_VERSION:
            self._reject(conn, f"unsupported protocol version {hello['version']}")
            return
        nonce_m = conn._nonce_m
        if self.secret is not None:
            expected = protocol.hello_mac(
                self.secret, nonce_m, hello["nonce"], hello["p2p_address"], hello["peer_group"]
            )
            if not protocol.macs_equal(hello["mac"], expected):
                self._reject(conn, "authentication failed: hello MAC does not verify")
                return
        conn._cancel_timer()  # the handshake deadline
        peer_id, acts = self.state.hello(
            remote=conn.remote,
            p2p_address=hello["p2p_address"],
            peer_group=hello["peer_group"],
            p2p_connections=hello["p2p_connections"],
            welcome_mac=protocol.welcome_mac(self.secret, hello["nonce"], nonce_m),
            now=self.now(),
            name=hello.get("name"),
        )
        conn.peer_id = peer_id
        conn.name = hello.get("name")
        self._by_peer[peer_id] = conn
        self._apply(acts)

    def _message(self, conn: Connection, msg: dict) -> None:
        self.counters["messages_received"] += 1
        if msg["type"] == "hello":
            raise ProtocolViolation("hello after welcome")
        assert conn.peer_id is not None
        kind = msg["type"]
        if kind != "op_done" and kind != "update_topology":
            self._apply(self.state.handle(conn.peer_id, msg, self.now()))
            return
        counters = self.state.counters
        decided = counters["ops_ok"] + counters["ops_aborted"]
        start = time.perf_counter()
        acts = self.state.handle(conn.peer_id, msg, self.now())
        self._apply(acts)
        elapsed = time.perf_counter() - start
        if kind == "op_done":
            if counters["ops_ok"] + counters["ops_aborted"] != decided:
                self.verdict_seconds.observe(elapsed)
        elif acts.sends and acts.sends[-1][1]["type"] == "topology":
            self.vote_seconds.observe(elapsed)

    def _reject(self, conn: Connection, reason: str) -> None:
        """Log and close one connection that broke the protocol."""
        self.counters["messages_rejected"] += 1
        if conn.peer_id is None:
            self.counters["handshakes_failed"] += 1
        log.warning(
            logline(
                event="rejected", remote=conn.remote, peer=conn.peer_id, name=conn.name,
                reason=reason,
            )
        )
        conn.send(protocol.encode({"type": "error", "reason": reason[: protocol.MAX_REASON]}))
        conn.reason = reason
        conn.close_soon()

    def _lost(self, conn: Connection) -> None:
        self._connections.discard(conn)
        if conn.peer_id is not None and not self._stopped:
            if self._by_peer.get(conn.peer_id) is conn:
                del self._by_peer[conn.peer_id]
            self._apply(self.state.disconnect(conn.peer_id, conn.reason, self.now()))

    # ------------------------------------------------------------------
    # Timers and actions.

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.tick_interval)
            try:
                self._apply(self.state.tick(self.now()))
            except Exception:  # a bug must not stop liveness checking
                log.exception(logline(event="bug", reason="tick failed"))

    def _apply(self, acts: Actions) -> None:
        """Carry out the state machine's actions; a peer that does not read
        what the master sends is dropped as lost.

        A message object sent to several peers (one operation's verdict, an
        abort) is validated and encoded once; every frame is written in this
        call, without waiting for any peer."""
        work = [acts]
        while work:
            acts = work.pop(0)
            for event in acts.events:
                self._log_event(event)
            for request in acts.solves:
                self._spawn(self._solve(request), f"solve-ring-{request.group}")
            overflowed: list[str] = []
            frames: dict[int, bytes] = {}
            rings: dict[int, tuple[list, bytes]] = {}
            for peer_id, msg in acts.sends:
                conn = self._by_peer.get(peer_id)
                if conn is None:
                    continue
                frame = frames.get(id(msg))
                if frame is None:
                    try:
                        frame = _encode_outgoing(msg, rings)
                    except ValueError:
                        log.exception(
                            logline(
                                event="bug", peer=peer_id, name=conn.name,
                                reason="invalid outgoing",
                            )
                        )
                        continue
                    frames[id(msg)] = frame
                if not conn.send(frame):
                    overflowed.append(peer_id)
            for peer_id, reason in acts.closes:
                conn = self._by_peer.pop(peer_id, None)
                if conn is not None:
                    conn.reason = reason
                    conn.close_soon()
            for peer_id in overflowed:
                conn = self._by_peer.pop(peer_id, None)
                if conn is not None:
                    conn.abort()
                reason = "output buffer full (not reading)"
                work.append(self.state.disconnect(peer_id, reason, self.now()))

    async def _solve(self, request: SolveRequest) -> None:
        """Run the ring solver in a worker thread (it may take its whole
        time limit) and feed the result back to the state machine."""
        loop = asyncio.get_running_loop()
        try:
            if request.passive:
                fn = functools.partial(propose_ring, list(request.current_ring), request.matrix,
                                       improvement=self.state.topology_improvement)
            else:
                fn = functools.partial(solve_ring, request.matrix, peers=list(request.peers))
            solution = await loop.run_in_executor(None, fn)
        except Exception:
            log.exception(logline(event="bug", group=request.group, reason="ring solver failed"))
            solution = None
        if not self._stopped:
            self._apply(self.state.topology_solved(request, solution, self.now()))
            if solution is not None and not request.passive:
                res = self.state.topology_results.get(request.group, {})
                log.info(logline(event="topology", group=request.group,
                                 ring=" ".join(res.get("ring", [])),
                                 bottleneck=res.get("bottleneck"),
                                 probes=res.get("probes"), probe_s=res.get("probe_seconds"),
                                 reason=res.get("reason") or None))

    def _log_event(self, event: Event) -> None:
        if event.kind == "epoch":
            log.info(logline(event="epoch", epoch=event.epoch, reason=event.reason))
            return
        level = logging.INFO if event.kind in ("joined", "admitted", "left") else logging.WARNING
        log.log(
            level,
            logline(
                event=event.kind,
                peer=event.peer_id,
                name=event.name,
                address=event.remote,
                p2p=event.p2p_address,
                group=event.group,
                epoch=event.epoch,
                reason=event.reason,
            ),
        )

    def status(self) -> dict[str, Any]:
        """The JSON document /status serves."""
        doc = self.state.snapshot(self.now())
        doc["listen"] = self.address
        doc["auth"] = self.secret is not None
        doc["connections"] = len(self._connections)
        doc["counters"].update(self.counters)
        return doc
