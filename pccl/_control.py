"""The peer's connection to ``pccl-master``.

:class:`MasterLink` owns one TCP connection to the master.  The handshake
runs in the caller's thread (it is a strict request/response exchange);
after ``welcome`` a background thread runs an asyncio event loop (uvloop
when importable) that reads and dispatches every message, heartbeats every
``heartbeat_interval`` and watches the master's silence.

Threads:

* The **user thread** sends requests (:meth:`MasterLink.send`) and waits
  for replies on :class:`concurrent.futures.Future` objects registered
  under a key *before* the request goes out (:meth:`MasterLink.expect`).
* The **loop thread** resolves those futures, and calls the owner's
  ``on_abort`` callback directly for ``abort`` (and failed ``op_outcome``)
  messages, so a collective blocked in C (which released the GIL) is
  aborted at once.

Frames are written straight to the socket under a lock from whichever
thread sends: an ``op_done`` leaves the user thread in one system call
instead of a hop through the loop (this is on every collective's path).
The loop only reads.

When the link fails (``evicted``, the connection closes, a malformed
message, the master silent for ``heartbeat_timeout``), every waiter and
every later call gets a fresh exception of one class with one clear
message, and ``on_lost`` is called once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from . import errors
from .master import protocol

log = logging.getLogger("pccl.control")

# How long to keep a message that arrived before anybody waited for it.
_MAX_EARLY = 4096
# After the watchdog finds the master silent, give already-received bytes
# (an "evicted" or a close, e.g. right after this process was SIGCONTed)
# this long to be read first, so the error names the real cause.
_SILENCE_GRACE = 0.05


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


@dataclass(frozen=True)
class Welcome:
    """What the master said when it let this peer in."""

    peer_id: str
    heartbeat_interval: float
    heartbeat_timeout: float


class MasterLink:
    """One authenticated connection to the master (see the module doc).

    ``on_abort(epoch, reason)`` and ``on_lost(exc)`` run on the loop thread
    and must not block.
    """

    def __init__(
        self,
        on_abort: Callable[[int, str], None],
        on_lost: Callable[[errors.PcclError], None],
    ):
        self._on_abort = on_abort
        self._on_lost = on_lost
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # guards the maps and the failure below
        self._waiters: dict[Hashable, concurrent.futures.Future] = {}
        self._early: OrderedDict[Hashable, dict] = OrderedDict()
        self._failure: tuple[type[errors.PcclError], str] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._rx = bytearray()
        self._last_rx = 0.0
        self._leftover = b""
        self.address = ""
        self.welcome: Welcome | None = None

    # ------------------------------------------------------------------
    # Opening: TCP connect, then the handshake, both in the caller's thread.

    def open_socket(self, address: str, timeout: float) -> str:
        """Connect to the master at ``"host:port"``; return the local host
        this connection uses (the interface that reaches the master)."""
        try:
            host, port = protocol.parse_hostport(address)
        except ValueError as exc:
            raise errors.AddressError(f"master address: {exc}") from None
        self.address = address
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except TimeoutError:
            raise errors.MasterConnectionError(
                f"cannot reach the master at {address}: no answer within {timeout:g} s"
            ) from None
        except OSError as exc:
            raise errors.MasterConnectionError(
                f"cannot reach the master at {address}: {exc.strerror or exc}"
            ) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._sock = sock
        return sock.getsockname()[0]

    def handshake(
        self,
        *,
        peer_group: int,
        p2p_address: str,
        p2p_connections: int,
        secret: bytes | None,
        timeout: float,
    ) -> Welcome:
        """Authenticate (both ways when ``secret`` is set), then start the
        loop thread.  Raises AuthenticationError, MasterConnectionError or
        ProtocolError; the socket is closed on failure."""
        try:
            welcome = self._handshake(peer_group, p2p_address, p2p_connections, secret, timeout)
        except BaseException:
            self._close_socket()
            raise
        self.welcome = welcome
        self._last_rx = time.monotonic()
        self._rx = bytearray(self._leftover)
        # From here on, a send that cannot complete within the heartbeat
        # timeout means the master is gone.
        assert self._sock is not None
        self._sock.settimeout(welcome.heartbeat_timeout)
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(started,), name="pccl-master-link", daemon=True
        )
        self._thread.start()
        started.wait()
        return welcome

    def _handshake(self, peer_group, p2p_address, p2p_connections, secret, timeout) -> Welcome:
        deadline = time.monotonic() + timeout
        challenge = self._recv_one(deadline, "challenge")
        if challenge["type"] == "error":
            raise errors.MasterConnectionError(f"master refused: {challenge['reason']}")
        if challenge["type"] != "challenge":
            raise errors.ProtocolError(f"expected challenge, got {challenge['type']!r}")
        if challenge["version"] != protocol.PROTOCOL_VERSION:
            raise errors.ProtocolError(
                f"master speaks protocol version {challenge['version']}, "
                f"this peer {protocol.PROTOCOL_VERSION}"
            )
        if secret and not challenge["auth"]:
            raise errors.AuthenticationError(
                "this peer has a secret but the master does not authenticate; refusing it"
            )
        if challenge["auth"] and not secret:
            raise errors.AuthenticationError("the master requires a shared secret; none given")
        nonce_m = challenge["nonce"]
        nonce_p = protocol.new_nonce()
        hello = {
            "type": "hello",
            "version": protocol.PROTOCOL_VERSION,
            "nonce": nonce_p,
            "mac": protocol.hello_mac(secret, nonce_m, nonce_p, p2p_address, peer_group),
            "peer_group": peer_group,
            "p2p_address": p2p_address,
            "p2p_connections": p2p_connections,
        }
        protocol.validate(hello, protocol.TO_MASTER)
        self._send_blocking(protocol.encode(hello), deadline)
        reply = self._recv_one(deadline, "welcome")
        if reply["type"] == "error":
            reason = reply["reason"]
            cls = errors.AuthenticationError if secret else errors.MasterConnectionError
            raise cls(f"master refused this peer: {reason}")
        if reply["type"] != "welcome":
            raise errors.ProtocolError(f"expected welcome, got {reply['type']!r}")
        expected = protocol.welcome_mac(secret, nonce_p, nonce_m)
        if not protocol.macs_equal(reply["mac"], expected):
            raise errors.AuthenticationError("the master failed the shared-secret check")
        return Welcome(
            peer_id=reply["peer_id"],
            heartbeat_interval=float(reply["heartbeat_interval"]),
            heartbeat_timeout=float(reply["heartbeat_timeout"]),
        )

    def _send_blocking(self, data: bytes, deadline: float) -> None:
        assert self._sock is not None
        self._sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            self._sock.sendall(data)
        except TimeoutError:
            raise errors.MasterConnectionError("handshake with the master timed out") from None
        except OSError as exc:
            raise errors.MasterConnectionError(f"handshake with the master failed: {exc}") from None

    def _recv_one(self, deadline: float, what: str) -> dict:
        """Read exactly one frame (keeping any bytes past it) before ``deadline``."""
        assert self._sock is not None
        buf = bytearray(self._leftover)
        while True:
            if len(buf) >= protocol.HEADER.size:
                (length,) = protocol.HEADER.unpack_from(buf)
                if length == 0 or length > protocol.MAX_MESSAGE:
                    raise errors.ProtocolError(f"master sent a frame of length {length}")
                end = protocol.HEADER.size + length
                if len(buf) >= end:
                    self._leftover = bytes(buf[end:])
                    try:
                        msg = protocol.decode(bytes(buf[protocol.HEADER.size : end]))
                        return protocol.validate(msg, protocol.TO_PEER)
                    except protocol.ProtocolViolation as exc:
                        raise errors.ProtocolError(f"master sent a bad {what}: {exc}") from None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise errors.MasterConnectionError(
                    f"no {what} from the master at {self.address} in time"
                )
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                raise errors.MasterConnectionError(
                    f"connection to the master failed during the handshake: {exc}"
                ) from None
            if not chunk:
                raise errors.MasterConnectionError(
                    f"the master at {self.address} closed the connection during the handshake"
                )
            buf += chunk

    # ------------------------------------------------------------------
    # Requests and replies (user thread).

    def send(self, msg: dict) -> None:
        """Send one message; any thread.  Raises the link's error if it failed."""
        data = protocol.encode(msg)
        with self._send_lock:
            self._raise_if_failed()
            try:
                assert self._sock is not None
                self._sock.sendall(data)
            except (OSError, ValueError) as exc:
                err = exc
            else:
                return
        # Fail outside the send lock (fail() takes it to close the socket).
        self._fail(errors.MasterConnectionError, f"lost the connection to the master: {err}")
        self._raise_if_failed()

    def expect(self, key: Hashable) -> concurrent.futures.Future:
        """A future for the master's message filed under ``key``.  Register
        it before sending the request it answers."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._failure is not None:
                fut.set_exception(self._failure[0](self._failure[1]))
                return fut
            early = self._early.pop(key, None)
            if early is not None:
                fut.set_result(early)
            else:
                self._waiters[key] = fut
        return fut

    def wait(
        self, key: Hashable, fut: concurrent.futures.Future, timeout: float | None, what: str
    ) -> dict:
        """The message ``fut`` resolves to; raises the link's error, or
        PcclTimeoutError after ``timeout`` seconds (None: until the link
        fails, which the heartbeat watchdog bounds)."""
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            with self._lock:
                if self._waiters.get(key) is fut:
                    del self._waiters[key]
            if fut.done() and not fut.cancelled():
                return fut.result()
            raise errors.PcclTimeoutError(f"{what}: no answer within {timeout:g} s") from None

    def forget(self, key: Hashable) -> None:
        """Drop a waiter nobody will read (an abandoned request)."""
        with self._lock:
            self._waiters.pop(key, None)
            self._early.pop(key, None)

    @property
    def failed(self) -> bool:
        return self._failure is not None

    def error(self) -> errors.PcclError | None:
        """A fresh instance of the link's error, or None while it is up."""
        failure = self._failure
        return None if failure is None else failure[0](failure[1])

    def _raise_if_failed(self) -> None:
        failure = self._failure
        if failure is not None:
            raise failure[0](failure[1])

    # ------------------------------------------------------------------
    # Closing.

    def close(self, leave: bool = True, timeout: float = 1.0) -> None:
        """Stop the loop thread, say ``leave`` (when the link is up) and
        close the socket.  Idempotent; not from the loop thread."""
        self._stop_loop()
        if leave and self._failure is None and self._sock is not None:
            try:
                self.send({"type": "leave"})
                with self._send_lock:
                    if self._sock is not None:
                        self._sock.shutdown(socket.SHUT_WR)
            except (errors.PcclError, OSError):
                pass
            else:
                # Read until the master closes, so our close() cannot turn
                # into a reset that might destroy the queued "leave".
                self._drain(timeout)
        self._fail(errors.ClosedError, "the communicator was closed", notify=False)
        self._close_socket()

    def _drain(self, timeout: float) -> None:
        sock = self._sock
        if sock is None:
            return
        deadline = time.monotonic() + timeout
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                sock.settimeout(remaining)
                if not sock.recv(65536):
                    return
        except OSError:
            return

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None:
            if thread is threading.current_thread():
                # Closed from a callback (e.g. a finalizer): stop after it.
                self._detach_reader()
                loop.stop()
            else:
                try:
                    loop.call_soon_threadsafe(loop.stop)
                except RuntimeError:  # loop already closed
                    pass
                thread.join()
        self._thread = None

    def _close_socket(self) -> None:
        with self._send_lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    # ------------------------------------------------------------------
    # Failure: one place, any thread.

    def _fail(self, cls: type[errors.PcclError], message: str, notify: bool = True) -> None:
        with self._lock:
            if self._failure is not None:
                return
            self._failure = (cls, message)
            waiters, self._waiters = self._waiters, {}
            self._early.clear()
        if notify:
            log.warning("master link to %s failed: %s", self.address, message)
        for fut in waiters.values():
            if not fut.done():
                fut.set_exception(cls(message))
        loop = self._loop
        if loop is not None and self._thread is not None:
            if self._thread is threading.current_thread():
                self._detach_reader()
                loop.stop()
            else:
                try:
                    loop.call_soon_threadsafe(self._detach_and_stop)
                except RuntimeError:
                    pass
        if notify:
            try:
                self._on_lost(cls(message))
            except Exception:  # a callback bug must not hide the failure
                log.exception("on_lost callback failed")

    def _detach_and_stop(self) -> None:
        self._detach_reader()
        assert self._loop is not None
        self._loop.stop()

    def _detach_reader(self) -> None:
        loop, sock = self._loop, self._sock
        if loop is not None and sock is not None:
            try:
                loop.remove_reader(sock.fileno())
            except (OSError, ValueError):
                pass

    # ------------------------------------------------------------------
    # The loop thread: read, dispatch, heartbeat, watch for silence.

    def _run(self, started: threading.Event) -> None:
        loop = _new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        assert self._sock is not None and self.welcome is not None
        try:
            loop.add_reader(self._sock.fileno(), self._on_readable)
            loop.call_soon(self._tick)
            started.set()
            if self._rx:  # bytes that arrived with the welcome
                loop.call_soon(self._parse)
            loop.run_forever()
        finally:
            started.set()
            self._detach_reader()
            loop.close()

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None or self._failure is not None:
            return
        try:
            chunk = sock.recv(262144)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return
        except OSError as exc:
            self._fail(errors.MasterConnectionError, f"lost the connection to the master: {exc}")
            return
        if not chunk:
            self._fail(
                errors.MasterConnectionError,
                f"the master at {self.address} closed the connection "
                "(it may have declared this peer lost: silent for longer than the heartbeat "
                "timeout; connect() again to rejoin)",
            )
            return
        self._last_rx = time.monotonic()
        self._rx += chunk
        self._parse()

    def _parse(self) -> None:
        rx = self._rx
        header = protocol.HEADER.size
        while len(rx) >= header and self._failure is None:
            (length,) = protocol.HEADER.unpack_from(rx)
            if length == 0 or length > protocol.MAX_MESSAGE:
                self._fail(errors.ProtocolError, f"master sent a frame of length {length}")
                return
            end = header + length
            if len(rx) < end:
                return
            body = bytes(rx[header:end])
            del rx[:end]
            try:
                msg = protocol.validate(protocol.decode(body), protocol.TO_PEER)
            except protocol.ProtocolViolation as exc:
                self._fail(errors.ProtocolError, f"master sent a malformed message: {exc}")
                return
            self._dispatch(msg)

    def _dispatch(self, msg: dict) -> None:
        kind = msg["type"]
        if kind == "heartbeat_ack":
            return
        if kind == "op_outcome":
            if not msg["ok"]:
                # Another member failed: abort our copy of the ring now so
                # sibling operations of this epoch do not wait on it.
                self._call_abort(msg["epoch"], "an operation of this epoch failed")
            self._resolve(("op", msg["epoch"], msg["tag"], msg["seq"]), msg)
        elif kind == "abort":
            self._call_abort(msg["epoch"], msg["reason"])
        elif kind == "topology":
            req = msg["req"]
            self._resolve(("admit",) if req is None else ("req", req), msg)
        elif kind == "topology_ready":
            self._resolve(("ready", msg["epoch"]), msg)
        elif kind == "pending_reply":
            self._resolve(("req", msg["req"]), msg)
        elif kind == "sync_plan":  # shared state: pccl/shared_state.py
            self._resolve(("sync", msg["req"]), msg)
        elif kind == "sync_end":
            self._resolve(("sync_end", msg["revision"]), msg)
        elif kind == "evicted":
            self._fail(
                errors.EvictedError,
                f"the master evicted this peer: {msg['reason']} (connect() again to rejoin)",
            )
        elif kind == "error":
            self._fail(errors.MasterConnectionError, f"the master closed the link: {msg['reason']}")
        else:  # challenge / welcome after the handshake
            self._fail(errors.ProtocolError, f"unexpected {kind!r} from the master")

    def _call_abort(self, epoch: int, reason: str) -> None:
        try:
            self._on_abort(epoch, reason)
        except Exception:
            log.exception("on_abort callback failed")

    def _resolve(self, key: Hashable, msg: dict) -> None:
        with self._lock:
            fut = self._waiters.pop(key, None)
            if fut is None:
                self._early[key] = msg
                while len(self._early) > _MAX_EARLY:
                    self._early.popitem(last=False)
                return
        if not fut.done():
            fut.set_result(msg)

    def _tick(self) -> None:
        if self._failure is not None:
            return
        assert self._loop is not None and self.welcome is not None
        silent = time.monotonic() - self._last_rx
        if silent > self.welcome.heartbeat_timeout:
            self._loop.call_later(_SILENCE_GRACE, self._confirm_silence)
            return
        try:
            self.send({"type": "heartbeat"})
        except errors.PcclError:
            return
        self._loop.call_later(self.welcome.heartbeat_interval, self._tick)

    def _confirm_silence(self) -> None:
        if self._failure is not None:
            return
        assert self.welcome is not None
        silent = time.monotonic() - self._last_rx
        if silent > self.welcome.heartbeat_timeout:
            self._fail(
                errors.MasterConnectionError,
                f"no message from the master at {self.address} for {silent:.1f} s "
                f"(heartbeat timeout {self.welcome.heartbeat_timeout:g} s): the master is "
                "unreachable, or this process was suspended (connect() again to rejoin)",
            )
        else:
            self._tick()
