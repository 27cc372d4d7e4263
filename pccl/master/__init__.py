"""pccl-master: membership, ring order, epochs and outcome agreement.

The master of a run keeps who is in it (pending and admitted peers, by peer
group), the ring order of each group, the epoch, and the verdict of every
collective.  It never sees tensor bytes.  Run it as the ``pccl-master``
console script (docs/operations.md) or in-process::

    with pccl.MasterNode(listen="127.0.0.1:0") as master:
        comm = pccl.Communicator(master=master.address)

Modules: :mod:`.protocol` (framing, schema, MACs), :mod:`.state` (the state
machine, no I/O), :mod:`.server` (asyncio service), :mod:`.status`
(/status and /metrics), :mod:`.__main__` (command line), :mod:`.testing`
(the master as a subprocess and a minimal blocking client, for tests).
"""

from __future__ import annotations

import asyncio
import threading

from .. import errors
from .._wire import parse_hostport

__all__ = ["MasterNode"]

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


class MasterNode:
    """A master running on a background thread with its own event loop.

    ``secret`` (bytes or str) turns on HMAC-SHA256 authentication; ``status``
    ("host:port") serves /status and /metrics.  Times are in seconds.

    Errors are :class:`pccl.PcclError` subclasses: ``AddressError`` (an
    address that does not parse), ``InvalidArgumentError`` (a bad setting),
    ``PcclOSError`` (the port cannot be bound), ``StateError`` (started
    twice), ``PcclTimeoutError`` (the thread did not start or stop in time).
    """

    def __init__(
        self,
        listen: str = "127.0.0.1:0",
        secret: bytes | str | None = None,
        heartbeat_interval: float = 0.5,
        heartbeat_timeout: float = 3.0,
        vote_timeout: float = 30.0,
        status: str | None = None,
    ) -> None:
        try:
            self._host, self._port = parse_hostport(listen, allow_port_zero=True)
            self._status = parse_hostport(status, allow_port_zero=True) if status else None
        except ValueError as exc:
            raise errors.AddressError(str(exc)) from None
        if isinstance(secret, str):
            secret = secret.encode("utf-8")
        if secret is not None and not secret:
            raise errors.InvalidArgumentError("secret must not be empty")
        if not 0 < heartbeat_interval < heartbeat_timeout:
            raise errors.InvalidArgumentError(
                "need 0 < heartbeat_interval < heartbeat_timeout, got "
                f"{heartbeat_interval!r} and {heartbeat_timeout!r}"
            )
        if vote_timeout <= 0:
            raise errors.InvalidArgumentError(
                f"vote_timeout must be positive, got {vote_timeout!r}"
            )
        self._secret = secret
        self._timeouts = (heartbeat_interval, heartbeat_timeout, vote_timeout)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None
        self._bound = threading.Event()
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._stop_requested = False
        self.address: str | None = None
        self.status_address: str | None = None

    def start(self) -> MasterNode:
        """Start serving; returns once the port is bound (raises if it cannot be)."""
        with self._lock:
            if self._thread is not None:
                raise errors.StateError("MasterNode already started")
            self._thread = threading.Thread(target=self._run, name="pccl-master", daemon=True)
            self._thread.start()
        if not self._bound.wait(START_TIMEOUT):
            self.stop()
            raise errors.PcclTimeoutError(
                f"MasterNode.start: the master's thread did not bind within {START_TIMEOUT:g} s"
            )
        if self._error is not None:
            self._thread.join(STOP_TIMEOUT)
            raise _as_pccl_error(self._error, f"{self._host}:{self._port}")
        return self

    def stop(self) -> None:
        """Stop serving, close every connection and join the thread (idempotent)."""
        with self._lock:
            self._stop_requested = True
            thread, loop, server = self._thread, self._loop, self._server
        if thread is None:
            return
        if loop is not None and server is not None:
            try:
                loop.call_soon_threadsafe(server.request_stop)
            except RuntimeError:  # loop already closed
                pass
        thread.join(STOP_TIMEOUT)
        if thread.is_alive():
            raise errors.PcclTimeoutError(
                f"MasterNode.stop: the master's thread did not stop within {STOP_TIMEOUT:g} s"
            )

    def __enter__(self) -> MasterNode:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"MasterNode(address={self.address!r})"

    def _run(self) -> None:
        from .._aio import new_event_loop
        from .server import MasterServer

        loop = new_event_loop()
        server = MasterServer(
            host=self._host,
            port=self._port,
            secret=self._secret,
            heartbeat_interval=self._timeouts[0],
            heartbeat_timeout=self._timeouts[1],
            vote_timeout=self._timeouts[2],
            status=self._status,
        )
        with self._lock:
            self._loop, self._server = loop, server
        try:
            try:
                loop.run_until_complete(server.start())
            except BaseException as exc:
                self._error = exc
                loop.run_until_complete(server.stop())
                return
            finally:
                self.address, self.status_address = server.address, server.status_address
                self._bound.set()
            with self._lock:
                if self._stop_requested:
                    server.request_stop()
            loop.run_until_complete(server.run())
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


def _as_pccl_error(exc: BaseException, where: str) -> BaseException:
    """The :class:`pccl.PcclError` for what stopped the master starting."""
    if isinstance(exc, errors.PcclError) or not isinstance(exc, Exception):
        return exc
    if isinstance(exc, OSError):
        err = errors.PcclOSError(f"pccl-master cannot listen on {where}: {exc.strerror or exc}")
        err.errno = exc.errno
        err.__cause__ = exc
        return err
    err = errors.PcclError(f"pccl-master failed to start on {where}: {exc}")
    err.__cause__ = exc
    return err
