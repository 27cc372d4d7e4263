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
import contextlib
import logging
import socket
from typing import Any

from .. import _wire as protocol
from .._wire import ProtocolViolation
from .state import Actions, Event, MasterState

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
        self._apply(self.state.handle(conn.peer_id, msg, self.now()))

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
            overflowed: list[str] = []
            frames: dict[int, bytes] = {}
            for peer_id, msg in acts.sends:
                conn = self._by_peer.get(peer_id)
                if conn is None:
                    continue
                frame = frames.get(id(msg))
                if frame is None:
                    try:
                        frame = protocol.encode(protocol.validate(msg, protocol.TO_PEER))
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
