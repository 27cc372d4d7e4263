"""Test helpers: ``pccl-master`` as a subprocess and a minimal blocking client.

Used by the master's own tests and by multi-process tests that need a real
master.  Every wait is bounded; :class:`MasterProcess` kills its process on
exit whatever happened.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from . import protocol

LISTENING = re.compile(r"^pccl-master listening on (\S+)$")
STATUS = re.compile(r"^pccl-master status on (\S+)$")


class _Lines:
    """Lines of a pipe, collected by a thread, waited for with a deadline."""

    def __init__(self, pipe):
        self.lines: list[str] = []
        self.closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._pump, args=(pipe,), daemon=True)
        self._thread.start()

    def _pump(self, pipe) -> None:
        try:
            for line in pipe:
                with self._cond:
                    self.lines.append(line.rstrip("\n"))
                    self._cond.notify_all()
        finally:
            with self._cond:
                self.closed = True
                self._cond.notify_all()

    def wait_for(self, pattern: str | re.Pattern, timeout: float, start: int = 0) -> re.Match:
        """The first line at index >= start matching pattern (re.search)."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    match = regex.search(line)
                    if match:
                        return match
                start = len(self.lines)
                remaining = deadline - time.monotonic()
                if self.closed or remaining <= 0:
                    raise TimeoutError(
                        f"no line matching {regex.pattern!r} within {timeout:g} s; "
                        f"last lines: {self.lines[-5:]}"
                    )
                self._cond.wait(remaining)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class MasterProcess:
    """``python -m pccl.master ARGS`` in ``cwd``; a context manager.

    ``cwd`` should not be the repository root, whose ``pccl/`` source tree
    would shadow the installed package.
    """

    def __init__(self, args: Sequence[str] = (), *, cwd: str, start_timeout: float = 30.0):
        self.args = ["--listen", "127.0.0.1:0", *args] if "--listen" not in args else list(args)
        self.cwd = cwd
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.address: str = ""
        self.status_address: str | None = None

    def start(self) -> MasterProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pccl.master", *self.args],
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.stdout = _Lines(self.proc.stdout)
        self.stderr = _Lines(self.proc.stderr)
        try:
            self.address = self.stdout.wait_for(LISTENING, self.start_timeout).group(1)
            if "--status" in self.args:
                self.status_address = self.stdout.wait_for(STATUS, self.start_timeout).group(1)
        except BaseException:
            self.kill()
            raise
        return self

    def log_mark(self) -> int:
        """The current end of the log, to wait only for lines after it."""
        return len(self.stderr.lines)

    def wait_for_log(self, pattern: str, timeout: float = 10.0, start: int = 0) -> str:
        return self.stderr.wait_for(pattern, timeout, start).string

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(10)
        finally:
            for lines in (getattr(self, "stdout", None), getattr(self, "stderr", None)):
                if lines is not None:
                    lines.join(5)

    def __enter__(self) -> MasterProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


class PeerClient:
    """A blocking client that speaks the peer side of the protocol, one
    message at a time (tests only: no heartbeat thread)."""

    def __init__(self, address: str, timeout: float = 10.0):
        host, port = protocol.parse_hostport(address)
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.challenge: dict | None = None
        self.hello: dict | None = None
        self.welcome: dict | None = None

    def send(self, msg: dict) -> None:
        self.sock.sendall(protocol.encode(msg))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv_exact(self, n: int) -> bytes:
        chunks, got = [], 0
        while got < n:
            chunk = self.sock.recv(n - got)
            if not chunk:
                raise EOFError("connection closed by the master")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def recv(self) -> dict:
        (length,) = protocol.HEADER.unpack(self._recv_exact(4))
        if length > protocol.MAX_MESSAGE:
            raise protocol.ProtocolViolation(f"master sent a {length}-byte frame")
        return protocol.validate(protocol.decode(self._recv_exact(length)), protocol.TO_PEER)

    def expect(self, kind: str, skip: Sequence[str] = ("heartbeat_ack",)) -> dict:
        """The next message, which must be of type ``kind`` (``skip`` types
        are passed over)."""
        while True:
            msg = self.recv()
            if msg["type"] == kind:
                return msg
            if msg["type"] not in skip:
                raise AssertionError(f"expected {kind!r}, got {msg}")

    def handshake(
        self,
        secret: bytes | None = None,
        peer_group: int = 0,
        p2p_address: str = "127.0.0.1:1",
        p2p_connections: int = 1,
    ) -> dict:
        """Answer the challenge; return the master's reply (welcome or error)."""
        self.challenge = self.expect("challenge")
        nonce_p = protocol.new_nonce()
        self.hello = {
            "type": "hello",
            "version": protocol.PROTOCOL_VERSION,
            "nonce": nonce_p,
            "mac": protocol.hello_mac(
                secret, self.challenge["nonce"], nonce_p, p2p_address, peer_group
            ),
            "peer_group": peer_group,
            "p2p_address": p2p_address,
            "p2p_connections": p2p_connections,
        }
        self.send(self.hello)
        reply = self.recv()
        if reply["type"] == "welcome":
            expected = protocol.welcome_mac(secret, nonce_p, self.challenge["nonce"])
            if not protocol.macs_equal(reply["mac"], expected):
                raise AssertionError("welcome MAC does not verify")
            self.welcome = reply
        return reply

    def join(self, secret: bytes | None = None, **hello) -> dict:
        """Handshake and insist on being welcomed; returns the welcome."""
        welcome = self.handshake(secret, **hello)
        if welcome["type"] != "welcome":
            raise AssertionError(f"not welcomed: {welcome}")
        return welcome

    def drain_until_closed(self) -> list[dict]:
        """Read until the master closes the connection; returns what came
        before.  Raises TimeoutError if it stays open past the timeout."""
        msgs = []
        while True:
            try:
                msgs.append(self.recv())
            except (EOFError, ConnectionResetError):
                return msgs
            except protocol.ProtocolViolation:
                continue

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> PeerClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
