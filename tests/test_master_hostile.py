"""Hostile input on the master port, against a real ``pccl-master`` process.

Each case must close that connection only, log why, and leave the run
going: a peer connected before keeps working and a new peer still joins.
"""

from __future__ import annotations

import random
import socket
import struct

import msgpack
import pytest

from pccl import _wire as protocol
from pccl.testing.master_client import MasterProcess, PeerClient

SECRET = b"correct horse battery staple"
# Long enough that the bystander is never lost for silence during a test.
ARGS = ["--heartbeat-interval", "1", "--heartbeat-timeout", "60"]
WAIT = 10.0


@pytest.fixture
def master(tmp_path):
    with MasterProcess(str(tmp_path), extra=ARGS) as proc:
        yield proc


@pytest.fixture
def secret_master(tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET + b"\n")
    with MasterProcess(str(tmp_path), extra=[*ARGS, "--secret-file", str(secret_file)]) as proc:
        yield proc


def bystander(master: MasterProcess, secret: bytes | None = None) -> PeerClient:
    """An admitted, ring-ready peer."""
    peer = PeerClient(master.address, timeout=WAIT)
    peer.join(secret)
    topo = peer.expect("topology")
    peer.send({"type": "ring_ready", "epoch": topo["epoch"], "ok": True})
    assert peer.expect("topology_ready")["ok"] is True
    return peer


def assert_run_goes_on(master: MasterProcess, peer: PeerClient, secret: bytes | None = None):
    peer.send({"type": "heartbeat"})
    assert peer.expect("heartbeat_ack", skip=()) == {"type": "heartbeat_ack"}
    with PeerClient(master.address, timeout=WAIT) as newcomer:
        assert newcomer.handshake(secret)["type"] == "welcome"
        peer.send({"type": "pending_query", "req": 1})
        assert peer.expect("pending_reply")["pending"] is True


def hostile(master: MasterProcess, data: bytes, *, shutdown: bool = False) -> list[dict]:
    """Open a connection, send data, return what the master said before it
    closed the connection."""
    with PeerClient(master.address, timeout=WAIT) as conn:
        assert conn.expect("challenge")["version"] == protocol.PROTOCOL_VERSION
        conn.send_raw(data)
        if shutdown:
            conn.sock.shutdown(socket.SHUT_WR)  # the master sees EOF mid-frame
        return conn.drain_until_closed()


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def test_random_bytes(master):
    peer = bystander(master)
    rng = random.Random(20261126)
    for _ in range(5):
        mark = master.log_mark()
        body = rng.randbytes(rng.randrange(1, 300))
        replies = hostile(master, frame(body))
        assert [m["type"] for m in replies] in ([], ["error"])
        master.wait_for_log(r"event=rejected .*reason=.*protocol violation", WAIT, mark)
    mark = master.log_mark()
    hostile(master, rng.randbytes(4096))  # unframed: the prefix is garbage too
    master.wait_for_log(r"event=rejected .*protocol violation", WAIT, mark)
    assert_run_goes_on(master, peer)


def test_truncated_frame(master):
    peer = bystander(master)
    mark = master.log_mark()
    hostile(master, struct.pack(">I", 100) + b"\x82" + b"x" * 9, shutdown=True)
    master.wait_for_log(r"event=rejected .*truncated frame: 10 of 100 body bytes", WAIT, mark)
    assert_run_goes_on(master, peer)


def test_four_gib_length(master):
    peer = bystander(master)
    mark = master.log_mark()
    replies = hostile(master, b"\xff\xff\xff\xff" + b"x" * 64)
    assert replies and "exceeds cap" in replies[-1]["reason"]
    master.wait_for_log(r"event=rejected .*frame length 4294967295 exceeds cap", WAIT, mark)
    assert_run_goes_on(master, peer)


def test_valid_msgpack_with_wrong_types(master):
    peer = bystander(master)
    mark = master.log_mark()
    hello = {
        "type": "hello",
        "version": 1,
        "nonce": b"n" * 32,
        "mac": b"",
        "peer_group": "zero",
        "p2p_address": "127.0.0.1:1",
        "p2p_connections": 1,
    }
    hostile(master, protocol.encode(hello))
    master.wait_for_log(r"event=rejected .*hello\.peer_group: expected int", WAIT, mark)
    # The same after the handshake: the welcomed peer is dropped, the run goes on.
    with PeerClient(master.address, timeout=WAIT) as bad:
        bad.join()
        mark = master.log_mark()
        bad.send_raw(
            frame(msgpack.packb({"type": "op_done", "epoch": "1", "tag": 0, "seq": 0, "ok": True}))
        )
        bad.drain_until_closed()
    master.wait_for_log(r"event=rejected .*op_done\.epoch: expected int", WAIT, mark)
    master.wait_for_log(r"event=lost .*protocol violation", WAIT, mark)
    assert_run_goes_on(master, peer)


def test_unknown_message_type(master):
    peer = bystander(master)
    mark = master.log_mark()
    hostile(master, protocol.encode({"type": "send_me_the_weights"}))
    master.wait_for_log(r"event=rejected .*unknown message type 'send_me_the_weights'", WAIT, mark)
    assert_run_goes_on(master, peer)


def test_wrong_secret(secret_master):
    peer = bystander(secret_master, SECRET)
    mark = secret_master.log_mark()
    with PeerClient(secret_master.address, timeout=WAIT) as intruder:
        reply = intruder.handshake(b"wrong secret")
        assert reply["type"] == "error" and "authentication failed" in reply["reason"]
        assert intruder.drain_until_closed() == []
    secret_master.wait_for_log(r"event=rejected .*authentication failed", WAIT, mark)
    # No secret at all fails the same way, and joins nothing.
    with PeerClient(secret_master.address, timeout=WAIT) as intruder:
        assert intruder.handshake(None)["type"] == "error"
    peer.send({"type": "pending_query", "req": 1})
    assert peer.expect("pending_reply")["pending"] is False
    assert_run_goes_on(secret_master, peer, SECRET)


def test_replayed_handshake(secret_master):
    peer = bystander(secret_master, SECRET)
    with PeerClient(secret_master.address, timeout=WAIT) as honest:
        assert honest.handshake(SECRET)["type"] == "welcome"
        recorded = protocol.encode(honest.hello)
    mark = secret_master.log_mark()
    replies = hostile(secret_master, recorded)  # under a new challenge
    assert [m["type"] for m in replies] == ["error"]
    secret_master.wait_for_log(r"event=rejected .*authentication failed", WAIT, mark)
    assert_run_goes_on(secret_master, peer, SECRET)


def test_second_hello_after_welcome(master):
    peer = bystander(master)
    with PeerClient(master.address, timeout=WAIT) as twice:
        twice.join()
        mark = master.log_mark()
        twice.send(twice.hello)
        twice.drain_until_closed()
    master.wait_for_log(r"event=rejected .*hello after welcome", WAIT, mark)
    assert_run_goes_on(master, peer)


def test_unsupported_version(master):
    peer = bystander(master)
    with PeerClient(master.address, timeout=WAIT) as old:
        old.expect("challenge")
        old.send(
            {
                "type": "hello",
                "version": 2,
                "nonce": b"n" * 32,
                "mac": b"",
                "peer_group": 0,
                "p2p_address": "127.0.0.1:1",
                "p2p_connections": 1,
            }
        )
        reply = old.recv()
        assert reply["type"] == "error" and "version" in reply["reason"]
    assert_run_goes_on(master, peer)
