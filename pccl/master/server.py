"""The pccl-master network service: handshakes, framing, timers, logging.

One asyncio event loop (uvloop when importable) runs everything: a task per
connection that authenticates the peer and then reads its messages, a writer
task per connection draining a bounded queue, one ticking task that drives
heartbeat and vote deadlines, and the optional status endpoint.  All
membership logic lives in :mod:`pccl.master.state`; this module only moves
validated messages in and the state machine's actions out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from . import protocol
from .protocol import ConnectionClosed, ProtocolViolation
from .state import Actions, Event, MasterState

log = logging.getLogger("pccl.master")

SEND_QUEUE = 1024  # frames waiting for a slow peer before it is dropped
HANDSHAKE_TIMEOUT = 5.0
WRITE_TIMEOUT = 5.0
DRAIN_ABOVE = 256 * 1024  # bytes buffered for one peer before the writer waits
MAX_CONNECTIONS = 4096


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when uvloop is installed, else the default loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _quote(value: Any) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'
    return text


def logline(**fields: Any) -> str:
    """A ``key=value`` log line (values with spaces are quoted)."""
    return " ".join(f"{k}={_quote(v)}" for k, v in fields.items() if v is not None)


def _peername(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return protocol.format_hostport(str(peer[0]), int(peer[1]))
    return str(peer)


class Connection:
    """One TCP connection: its streams, its send queue and its writer task."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.remote = _peername(writer)
        self.peer_id: str | None = None
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(SEND_QUEUE)
        self.closing = False
        self.writer_task: asyncio.Task | None = None

    def send(self, frame: bytes) -> bool:
        """Queue a frame; False when the peer is too slow to keep up."""
        if self.closing:
            return True
        try:
            self.queue.put_nowait(frame)
        except asyncio.QueueFull:
            return False
        return True

    def close_soon(self) -> None:
        """Close after the frames already queued are written."""
        if self.closing:
            return
        self.closing = True
        try:
            self.queue.put_nowait(None)
        except asyncio.QueueFull:
            self.abort()

    def abort(self) -> None:
        self.closing = True
        with contextlib.suppress(Exception):
            self.writer.transport.abort()

    async def write_loop(self) -> None:
        transport = self.writer.transport
        try:
            while not transport.is_closing():
                frame = await self.queue.get()
                if frame is None:
                    break
                self.writer.write(frame)
                if transport.get_write_buffer_size() > DRAIN_ABOVE:
                    await asyncio.wait_for(self.writer.drain(), WRITE_TIMEOUT)
        except (asyncio.TimeoutError, OSError):
            self.abort()
        finally:
            # close() flushes what is buffered, then closes the socket.
            self.closing = True
            if not self.writer.is_closing():
                self.writer.close()


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
        # Past the heartbeat timeout the ticker has already declared the peer
        # lost; this read timeout only backs it up.
        self.read_timeout = 2 * heartbeat_timeout + 1.0
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
        self._tasks: set[asyncio.Task] = set()  # connection handlers and the ticker
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
        self._server = await asyncio.start_server(
            self._on_connect, self.host, self.port, reuse_address=True, limit=64 * 1024
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
            with contextlib.suppress(asyncio.QueueFull):
                conn.queue.put_nowait(None)  # wakes the writer even if a cancel is lost
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        writers = [c.writer_task for c in self._connections if c.writer_task]
        for task in writers:
            task.cancel()
        if tasks or writers:
            await asyncio.wait(tasks + writers, timeout=5.0)
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
    # Connections.

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback: the connection's task is created (and owned) here,
        # so shutdown can cancel it without asyncio reporting the cancellation.
        conn = Connection(reader, writer)
        if self._stopped or len(self._connections) >= self.max_connections:
            log.warning(
                logline(event="rejected", remote=conn.remote, reason="too many connections")
            )
            conn.abort()
            return
        self.counters["connections_accepted"] += 1
        self._connections.add(conn)
        self._spawn(self._serve_connection(conn), f"pccl-master-conn-{conn.remote}")

    async def _serve_connection(self, conn: Connection) -> None:
        conn.writer_task = asyncio.get_running_loop().create_task(
            conn.write_loop(), name=f"pccl-master-writer-{conn.remote}"
        )
        reason = "connection closed"
        try:
            if await self._handshake(conn):
                reason = await self._read_loop(conn)
        except ProtocolViolation as exc:
            reason = f"protocol violation: {exc}"
            self._reject(conn, reason)
        except ConnectionClosed:
            reason = "connection closed"
            if conn.peer_id is None:
                log.info(logline(event="closed", remote=conn.remote, reason="closed in handshake"))
        except (asyncio.TimeoutError, TimeoutError) as exc:
            reason = f"timeout: {exc}"
            if conn.peer_id is None:
                self.counters["handshakes_failed"] += 1
                log.warning(logline(event="rejected", remote=conn.remote, reason=reason))
        except OSError as exc:
            reason = f"connection error: {exc}"
        except Exception as exc:  # a bug: drop this connection, keep the run
            reason = f"internal error: {type(exc).__name__}"
            log.exception(logline(event="bug", remote=conn.remote, peer=conn.peer_id))
        finally:
            await self._teardown(conn, reason)

    async def _teardown(self, conn: Connection, reason: str) -> None:
        if conn.peer_id is not None and not self._stopped:
            if self._by_peer.get(conn.peer_id) is conn:
                del self._by_peer[conn.peer_id]
            self._apply(self.state.disconnect(conn.peer_id, reason, self.now()))
        conn.close_soon()
        if conn.writer_task is not None and not self._stopped:
            # Let the writer flush a final error/evicted message, briefly.
            done, _ = await asyncio.wait({conn.writer_task}, timeout=1.0)
            if not done:
                conn.abort()
                conn.writer_task.cancel()
        self._connections.discard(conn)

    def _reject(self, conn: Connection, reason: str) -> None:
        """Log and close one connection that broke the protocol."""
        self.counters["messages_rejected"] += 1
        if conn.peer_id is None:
            self.counters["handshakes_failed"] += 1
        log.warning(logline(event="rejected", remote=conn.remote, peer=conn.peer_id, reason=reason))
        conn.send(protocol.encode({"type": "error", "reason": reason[: protocol.MAX_REASON]}))
        conn.close_soon()

    async def _handshake(self, conn: Connection) -> bool:
        nonce_m = protocol.new_nonce()
        conn.send(
            protocol.encode(
                {
                    "type": "challenge",
                    "version": protocol.PROTOCOL_VERSION,
                    "nonce": nonce_m,
                    "auth": self.secret is not None,
                }
            )
        )
        hello = await protocol.read_message(conn.reader, self.handshake_timeout, protocol.TO_MASTER)
        if hello["type"] != "hello":
            raise ProtocolViolation(f"expected hello, got {hello['type']!r}")
        if hello["version"] != protocol.PROTOCOL_VERSION:
            self._reject(conn, f"unsupported protocol version {hello['version']}")
            return False
        if self.secret is not None:
            expected = protocol.hello_mac(
                self.secret, nonce_m, hello["nonce"], hello["p2p_address"], hello["peer_group"]
            )
            if not protocol.macs_equal(hello["mac"], expected):
                self._reject(conn, "authentication failed: hello MAC does not verify")
                return False
        peer_id, acts = self.state.hello(
            remote=conn.remote,
            p2p_address=hello["p2p_address"],
            peer_group=hello["peer_group"],
            p2p_connections=hello["p2p_connections"],
            welcome_mac=protocol.welcome_mac(self.secret, hello["nonce"], nonce_m),
            now=self.now(),
        )
        conn.peer_id = peer_id
        self._by_peer[peer_id] = conn
        self._apply(acts)
        return True

    async def _read_loop(self, conn: Connection) -> str:
        assert conn.peer_id is not None
        while not conn.closing:
            try:
                msg = await protocol.read_message(
                    conn.reader, self.read_timeout, protocol.TO_MASTER
                )
            except (asyncio.TimeoutError, TimeoutError):
                return f"silent for {self.read_timeout:g} s"
            self.counters["messages_received"] += 1
            if msg["type"] == "hello":
                raise ProtocolViolation("hello after welcome")
            self._apply(self.state.handle(conn.peer_id, msg, self.now()))
        return "closed by master"

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
        """Carry out the state machine's actions; a peer whose send queue is
        full is too slow to follow the run and is dropped as lost."""
        work = [acts]
        while work:
            acts = work.pop(0)
            for event in acts.events:
                self._log_event(event)
            overflowed: list[str] = []
            for peer_id, msg in acts.sends:
                conn = self._by_peer.get(peer_id)
                if conn is None:
                    continue
                try:
                    frame = protocol.encode(protocol.validate(msg, protocol.TO_PEER))
                except ValueError:
                    log.exception(logline(event="bug", peer=peer_id, reason="invalid outgoing"))
                    continue
                if not conn.send(frame):
                    overflowed.append(peer_id)
            for peer_id, _reason in acts.closes:
                conn = self._by_peer.pop(peer_id, None)
                if conn is not None:
                    conn.close_soon()
            for peer_id in overflowed:
                conn = self._by_peer.pop(peer_id, None)
                if conn is not None:
                    conn.abort()
                work.append(self.state.disconnect(peer_id, "send queue full", self.now()))

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
