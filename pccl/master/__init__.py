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

from .._wire import parse_hostport

__all__ = ["MasterNode"]

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


class MasterNode:
    """A master running on a background thread with its own event loop.

    ``secret`` (bytes or str) turns on HMAC-SHA256 authentication; ``status``
    ("host:port") serves /status and /metrics.  Times are in seconds.
    """

    def __init__(
        self,
        listen: str = "127.0.0.1:0",
        secret: bytes | str | None = None,
        heartbeat_interval: float = 0.5,
        heartbeat_timeout: float = 3.0,
        vote_timeout: float = 30.0,
        status: str | None = None,
    ):
        self._host, self._port = parse_hostport(listen, allow_port_zero=True)
        self._status = parse_hostport(status, allow_port_zero=True) if status else None
        if isinstance(secret, str):
            secret = secret.encode("utf-8")
        if secret is not None and not secret:
            raise ValueError("secret must not be empty")
        if not 0 < heartbeat_interval < heartbeat_timeout:
            raise ValueError("need 0 < heartbeat_interval < heartbeat_timeout")
        if vote_timeout <= 0:
            raise ValueError("vote_timeout must be positive")
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
                raise RuntimeError("MasterNode already started")
            self._thread = threading.Thread(target=self._run, name="pccl-master", daemon=True)
            self._thread.start()
        if not self._bound.wait(START_TIMEOUT):
            self.stop()
            raise TimeoutError("pccl-master did not start in time")
        if self._error is not None:
            self._thread.join(STOP_TIMEOUT)
            raise self._error
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
            raise TimeoutError("pccl-master thread did not stop in time")

    def __enter__(self) -> MasterNode:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"MasterNode(address={self.address!r})"

    def _run(self) -> None:
        from .server import MasterServer, new_event_loop

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
