"""Test helpers: ``pccl-master`` as a subprocess and a minimal blocking client.

Used by the master's own tests and by multi-process tests that need a real
master.  Every wait is bounded; :class:`MasterProcess` (the one of
:mod:`pccl.testing.procs`) kills its process on exit whatever happened.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

from .. import _wire as protocol
from .procs import MasterProcess

__all__ = ["MasterProcess", "PeerClient"]


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

    def expect(self, kind: str, skip: Sequence[str] = ("heartbeat_ack", "peer_lost")) -> dict:
        """The next message, which must be of type ``kind`` (``skip`` types
        are passed over: by default the notifications a peer may get at any
        time)."""
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
        name: str | None = None,
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
        if name is not None:
            self.hello["name"] = name
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
