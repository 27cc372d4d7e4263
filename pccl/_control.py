"""The peer's connection to ``pccl-master``.

:class:`MasterLink` owns one TCP connection to the master.  The handshake
runs in the caller's thread (it is a strict request/response exchange);
after ``welcome`` a background thread runs an asyncio event loop (uvloop
when importable) that reads and dispatches every message, heartbeats every
``heartbeat_interval`` and watches the master's silence.

Threads:

* The **user thread** sends requests (:meth:`MasterLink.send`) and waits
  for replies on waiters registered under a key *before* the request goes
  out (:meth:`MasterLink.expect`, :meth:`MasterLink.wait`).
* The **loop thread** fills those waiters, and calls the owner's
  ``on_abort`` callback directly for ``abort`` (and failed ``op_outcome``)
  messages, so a collective blocked in C (which released the GIL) is
  aborted at once.

Every collective waits for its verdict, so that wait is on the critical
path of every operation.  A thread waiting for a reply therefore reads the
socket *itself* (Linux): it disarms the loop thread's one-shot epoll watch
on the socket, polls the socket, parses and dispatches what arrives (its
own reply, and anything else, in order) and re-arms the watch when its
reply is there.  The reply wakes the waiting thread directly, and the
loop thread (heartbeats, the silence watchdog) sleeps through it: no
thread hand-off per operation.  While nobody waits (a collective blocked
in C), the loop thread reads, so an ``abort`` acts at once.  One lock
serialises the reading; a second waiting thread sleeps on its waiter (a
pre-acquired lock), filled by whichever thread reads its reply.

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
import logging
import os
import select
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from . import _wire as protocol
from . import errors
from ._aio import new_event_loop

log = logging.getLogger("pccl.control")

# How long to keep a message that arrived before anybody waited for it.
_MAX_EARLY = 4096
# After the watchdog finds the master silent, give already-received bytes
# (an "evicted" or a close, e.g. right after this process was SIGCONTed)
# this long to be read first, so the error names the real cause.
_SILENCE_GRACE = 0.05
# A thread reading the socket for its reply re-checks the link's state (a
# failure the loop thread found) this often.
_DIRECT_SLICE = 0.05
_RECV_BYTES = 262144



def _env_name() -> str | None:
    """The peer's name for the master's logs and /status, from the
    ``PCCL_NAME`` environment variable (a stopgap until the Communicator
    passes its own; None when unset or not a valid name)."""
    name = os.environ.get("PCCL_NAME")
    if not name:
        return None
    error = protocol.SCHEMAS[protocol.TO_MASTER]["hello"]["name"](name)
    if error:
        log.warning("PCCL_NAME ignored: %s", error)
        return None
    return name



def _default_name() -> str:
    """``host-pid``: what a peer is called when it names itself neither with
    ``Communicator(name=...)`` nor with ``PCCL_NAME``."""
    host = "".join(c for c in socket.gethostname() if c.isprintable() and not c.isspace())
    suffix = f"-{os.getpid()}"
    return (host or "peer")[: protocol.MAX_PEER_NAME - len(suffix)] + suffix


class Waiter:
    """One expected message: filled once (by the loop thread, or with the
    link's error), awaited by one user thread."""

    __slots__ = ("_ready", "_filled", "msg", "error")

    def __init__(self) -> None:
        self._ready = threading.Lock()
        self._ready.acquire()  # released by fill(): the waiter's wake-up
        self._filled = False
        self.msg: dict | None = None
        self.error: errors.PcclError | None = None

    def fill(self, msg: dict | None = None, error: errors.PcclError | None = None) -> None:
        """Exactly once per waiter (the link's lock guarantees it)."""
        self.msg = msg
        self.error = error
        self._filled = True
        self._ready.release()

    def done(self) -> bool:
        return self._filled

    def wait(self, timeout: float | None) -> bool:
        """Whether it was filled within ``timeout`` seconds (None: no limit)."""
        if not self._ready.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            return False
        self._ready.release()  # stays filled for anyone asking again
        return True


@dataclass(frozen=True)
class Welcome:
    """What the master said when it let this peer in."""

    peer_id: str
    heartbeat_interval: float
    heartbeat_timeout: float


class MasterLink:
    """One authenticated connection to the master (see the module doc).

    ``on_abort(epoch, reason)``, ``on_lost(exc)`` and ``on_peer_lost(peer_id,
    reason)`` (point-to-point: a peer left the run) run on the loop thread
    and must not block.
    """

    def __init__(
        self,
        on_abort: Callable[[int, str], None],
        on_lost: Callable[[errors.PcclError], None],
        on_peer_lost: Callable[[str, str], None] | None = None,
    ):
        self._on_abort = on_abort
        self._on_lost = on_lost
        self._on_peer_lost = on_peer_lost
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # guards the maps and the failure below
        self._waiters: dict[Hashable, Waiter] = {}
        self._early: OrderedDict[Hashable, dict] = OrderedDict()
        self._failure: tuple[type[errors.PcclError], str] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._rx = bytearray()
        self._last_rx = 0.0
        self._leftover = b""
        # Reading (see the module doc): _rx_lock guards recv, _rx and the
        # parse; _watch is the loop thread's one-shot epoll watch on the
        # socket (None without epoll: then the loop thread alone reads);
        # _direct says a waiting thread reads and the watch is disarmed.
        self._rx_lock = threading.Lock()
        self._watch: select.epoll | None = None
        self._direct = False
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
        name: str | None = None,
    ) -> Welcome:
        """Authenticate (both ways when ``secret`` is set), then start the
        loop thread.  Raises AuthenticationError, MasterConnectionError or
        ProtocolError; the socket is closed on failure."""
        try:
            welcome = self._handshake(peer_group, p2p_address, p2p_connections, secret, timeout,
                                      name)
        except BaseException:
            self._close_socket()
            raise
        self.welcome = welcome
        self._last_rx = time.monotonic()
        self._rx = bytearray(self._leftover)
        # From here on, a send that cannot complete within the heartbeat
        # timeout means the master is gone.
        assert self._sock is not None
        self._sock.settimeout(welcome.heartbeat_timeout)  # also: fd non-blocking
        if hasattr(select, "epoll"):
            self._watch = select.epoll(1)
            self._watch.register(self._sock.fileno(), select.EPOLLIN | select.EPOLLONESHOT)
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(started,), name="pccl-master-link", daemon=True
        )
        self._thread.start()
        started.wait()
        return welcome

    def _handshake(self, peer_group, p2p_address, p2p_connections, secret, timeout,
                   name=None) -> Welcome:
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
        name = name or _env_name() or _default_name()
        if name:
            hello["name"] = name
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

    def expect(self, key: Hashable) -> Waiter:
        """A waiter for the master's message filed under ``key``.  Register
        it before sending the request it answers."""
        waiter = Waiter()
        with self._lock:
            if self._failure is not None:
                waiter.fill(error=self._failure[0](self._failure[1]))
                return waiter
            early = self._early.pop(key, None)
            if early is not None:
                waiter.fill(early)
            else:
                self._waiters[key] = waiter
        return waiter

    def wait(self, key: Hashable, waiter: Waiter, timeout: float | None, what: str) -> dict:
        """The message ``waiter`` receives; raises the link's error, or
        PcclTimeoutError after ``timeout`` seconds (None: until the link
        fails, which the heartbeat watchdog bounds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not waiter.done() and self._watch is not None:
            if self._become_reader():
                try:
                    self._read_until(waiter, deadline)
                finally:
                    self._stop_reading()
                break
            # Another thread reads: it fills this waiter when the reply
            # comes, or re-arms the loop's watch when it stops.
            if self._failure is not None or self._sock is None:
                break
            remaining = _DIRECT_SLICE
            if deadline is not None:
                remaining = min(remaining, deadline - time.monotonic())
                if remaining <= 0:
                    break
            waiter.wait(remaining)
        return self._result(key, waiter, deadline, timeout, what)

    def request(self, key: Hashable, msg: dict, timeout: float | None, what: str) -> dict:
        """Send ``msg`` and wait for the master's message filed under
        ``key`` (expect, send, wait), reading from before the send so that
        even an immediate reply wakes this thread directly."""
        deadline = None if timeout is None else time.monotonic() + timeout
        waiter = self.expect(key)
        reading = self._become_reader()
        try:
            self.send(msg)
            if reading:
                self._read_until(waiter, deadline)
        finally:
            if reading:
                self._stop_reading()
        if not waiter.done():
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            return self.wait(key, waiter, remaining, what)
        return self._result(key, waiter, deadline, timeout, what)

    def _result(
        self,
        key: Hashable,
        waiter: Waiter,
        deadline: float | None,
        timeout: float | None,
        what: str,
    ) -> dict:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not waiter.wait(remaining):
            with self._lock:
                if self._waiters.get(key) is waiter:
                    del self._waiters[key]
            if not waiter.done():
                raise errors.PcclTimeoutError(f"{what}: no answer within {timeout:g} s")
            waiter.wait(None)  # filled while we gave up: it is released already
        if waiter.error is not None:
            raise waiter.error
        assert waiter.msg is not None
        return waiter.msg

    def _become_reader(self) -> bool:
        """Take over reading from the loop thread (see the module doc);
        False when another thread reads or the link is down."""
        with self._lock:
            if self._direct or self._failure is not None or self._sock is None:
                return False
            if self._watch is None:
                return False
            self._direct = True
            self._set_watch(select.EPOLLONESHOT)  # errors only, once
        with self._rx_lock:
            pass  # a read the loop thread began has dispatched (see _on_readable)
        return True

    def _stop_reading(self) -> None:
        with self._lock:
            self._direct = False
            self._set_watch(select.EPOLLIN | select.EPOLLONESHOT)

    def _read_until(self, waiter: Waiter, deadline: float | None) -> None:
        """As the reader, read the socket until ``waiter`` is filled, the
        link fails or ``deadline`` passes."""
        sock = self._sock
        if sock is None:
            return
        try:
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
            while not waiter.done() and self._failure is None:
                remaining = _DIRECT_SLICE
                if deadline is not None:
                    remaining = min(remaining, deadline - time.monotonic())
                    if remaining <= 0:
                        return
                if poller.poll(remaining * 1000.0):
                    with self._rx_lock:
                        self._read_available()
        except (OSError, ValueError):  # the socket was closed under us
            return

    def _set_watch(self, events: int) -> None:
        """Arm (EPOLLIN) or disarm the loop's watch; under self._lock."""
        watch, sock = self._watch, self._sock
        if watch is None or sock is None or self._failure is not None:
            return
        try:
            watch.modify(sock.fileno(), events)
        except (OSError, ValueError):  # closed meanwhile
            pass

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
        with self._lock, self._send_lock:
            sock, self._sock = self._sock, None
            watch, self._watch = self._watch, None
        if watch is not None:
            watch.close()
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
        for waiter in waiters.values():
            waiter.fill(error=cls(message))
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
        loop, sock, watch = self._loop, self._sock, self._watch
        if loop is not None and sock is not None:
            try:
                loop.remove_reader(watch.fileno() if watch is not None else sock.fileno())
            except (OSError, ValueError):
                pass

    # ------------------------------------------------------------------
    # The loop thread: read, dispatch, heartbeat, watch for silence.

    def _run(self, started: threading.Event) -> None:
        loop = new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        assert self._sock is not None and self.welcome is not None
        try:
            watched = self._watch.fileno() if self._watch is not None else self._sock.fileno()
            loop.add_reader(watched, self._on_readable)
            loop.call_soon(self._tick)
            started.set()
            if self._rx:  # bytes that arrived with the welcome
                loop.call_soon(self._parse_locked)
            loop.run_forever()
        finally:
            started.set()
            self._detach_reader()
            loop.close()

    def _on_readable(self) -> None:
        watch = self._watch
        if watch is not None:
            try:
                watch.poll(0)  # take the event: the one-shot watch is now disarmed
            except (OSError, ValueError):
                return
        with self._rx_lock:
            # _direct is set under self._lock, and the thread that sets it
            # then waits for this lock: a read that starts here completes
            # before that thread looks at its waiter.
            if self._direct:
                return  # a waiting thread reads; it re-arms the watch
            self._read_available()
        if watch is not None:
            with self._lock:
                if not self._direct:
                    self._set_watch(select.EPOLLIN | select.EPOLLONESHOT)

    def _parse_locked(self) -> None:
        with self._rx_lock:
            self._parse()

    def _read_available(self) -> None:
        """Read what the socket holds and dispatch every whole message;
        any thread, under self._rx_lock."""
        sock = self._sock
        if sock is None or self._failure is not None:
            return
        try:
            # The fd is non-blocking (the socket has a timeout); os.read
            # returns at once when another thread took the bytes first.
            chunk = os.read(sock.fileno(), _RECV_BYTES)
        except (BlockingIOError, InterruptedError):
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
        start = 0
        while len(rx) - start >= header and self._failure is None:
            (length,) = protocol.HEADER.unpack_from(rx, start)
            if length == 0 or length > protocol.MAX_MESSAGE:
                self._fail(errors.ProtocolError, f"master sent a frame of length {length}")
                return
            end = start + header + length
            if len(rx) < end:
                break
            body = bytes(rx[start + header : end])
            start = end
            try:
                msg = protocol.validate(protocol.decode(body), protocol.TO_PEER)
            except protocol.ProtocolViolation as exc:
                self._fail(errors.ProtocolError, f"master sent a malformed message: {exc}")
                return
            self._dispatch(msg)
        if start:
            del rx[:start]

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
        elif kind == "peer_lost":  # point-to-point (docs/p2p.md)
            if self._on_peer_lost is not None:
                try:
                    self._on_peer_lost(msg["peer_id"], msg["reason"])
                except Exception:
                    log.exception("on_peer_lost callback failed")
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
        elif kind in ("probe", "topology_info"):  # optimize_topology: pccl/_probe.py
            self._resolve(("topo", msg["req"], msg["step"]), msg)
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
            waiter = self._waiters.pop(key, None)
            if waiter is None:
                self._early[key] = msg
                while len(self._early) > _MAX_EARLY:
                    self._early.popitem(last=False)
                return
        waiter.fill(msg)

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
