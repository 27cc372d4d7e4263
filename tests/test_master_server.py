"""The master service end to end, in-process (pccl.master.MasterNode)."""

from __future__ import annotations

import socket
import time

import pytest

from pccl.master import MasterNode
from pccl.testing.master_client import PeerClient


def admitted_peer(address: str, **hello) -> PeerClient:
    """The first peer of a run: welcomed, admitted at once, ring ready."""
    peer = PeerClient(address, timeout=10)
    peer.join(**hello)
    topo = peer.expect("topology")
    peer.send({"type": "ring_ready", "epoch": topo["epoch"], "ok": True})
    assert peer.expect("topology_ready")["ok"]
    return peer


def admitted_pair(address: str) -> tuple[PeerClient, PeerClient, int]:
    """The first peer, and a second one it voted in; both ring ready.
    Returns them and the epoch of their ring."""
    a = admitted_peer(address)
    b = PeerClient(address, timeout=10)
    b.join()
    a.send({"type": "update_topology", "req": 1, "ring_ok": True, "admit": True})
    epoch = a.expect("topology")["epoch"]
    b.expect("topology")
    for p in (a, b):
        p.send({"type": "ring_ready", "epoch": epoch, "ok": True})
    for p in (a, b):
        p.expect("topology_ready")
    return a, b, epoch


def test_master_node_lifecycle():
    node = MasterNode(listen="127.0.0.1:0", status="127.0.0.1:0")
    with node:
        host, port = node.address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        assert node.status_address and node.status_address != node.address
        with admitted_peer(node.address) as peer:
            peer.send({"type": "heartbeat"})
            assert peer.expect("heartbeat_ack", skip=()) == {"type": "heartbeat_ack"}
        with pytest.raises(RuntimeError):
            node.start()
    node.stop()  # idempotent
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(port)), timeout=5).close()


def test_master_node_stop_closes_connections():
    node = MasterNode().start()
    try:
        peer = admitted_peer(node.address)
    finally:
        node.stop()
    with peer:
        peer.drain_until_closed()


def test_master_node_reports_bind_failure():
    with MasterNode() as first:
        with pytest.raises(OSError):
            MasterNode(listen=first.address).start()


def test_master_node_checks_arguments():
    for kwargs in (
        {"listen": "nope"},
        {"secret": b""},
        {"heartbeat_interval": 2.0, "heartbeat_timeout": 1.0},
        {"vote_timeout": 0},
    ):
        with pytest.raises(ValueError):
            MasterNode(**kwargs)


def test_secret_handshake_is_mutual():
    with MasterNode(secret="s3cret") as node:
        with PeerClient(node.address, timeout=10) as peer:
            welcome = peer.handshake(b"s3cret")  # verifies the welcome MAC too
            assert welcome["type"] == "welcome" and len(welcome["mac"]) == 32
            assert peer.challenge["auth"] is True


def test_operation_outcome_over_the_wire():
    with MasterNode() as node, admitted_peer(node.address) as a:
        with PeerClient(node.address, timeout=10) as b:
            b.join()
            a.send({"type": "update_topology", "req": 1, "ring_ok": True, "admit": True})
            topo_b = b.expect("topology")
            topo_a = a.expect("topology")
            assert topo_a["req"] == 1 and topo_b["req"] is None
            assert topo_a["ring"] == topo_b["ring"] == [a.welcome["peer_id"], b.welcome["peer_id"]]
            assert topo_a["next"] == "127.0.0.1:1"
            epoch = topo_a["epoch"]
            for p in (a, b):
                p.send({"type": "ring_ready", "epoch": epoch, "ok": True})
            for p in (a, b):
                assert p.expect("topology_ready") == {
                    "type": "topology_ready",
                    "epoch": epoch,
                    "ok": True,
                }
            for p in (a, b):
                p.send({"type": "op_done", "epoch": epoch, "tag": 7, "seq": 0, "ok": True})
            for p in (a, b):
                assert p.expect("op_outcome")["ok"] is True


def test_silent_peer_is_lost_within_the_heartbeat_timeout():
    timeout = 0.6
    with MasterNode(heartbeat_interval=0.1, heartbeat_timeout=timeout) as node:
        a, b, epoch = admitted_pair(node.address)
        # From here b says nothing (a frozen process); a keeps heartbeating.
        t0 = time.monotonic()
        deadline = t0 + 10
        abort = None
        while abort is None and time.monotonic() < deadline:
            a.send({"type": "heartbeat"})
            msg = a.recv()
            if msg["type"] == "abort":
                abort = msg
            else:
                time.sleep(0.05)  # heartbeat pacing, not synchronisation
        elapsed = time.monotonic() - t0
        assert abort is not None and abort["epoch"] == epoch
        assert timeout <= elapsed < timeout + 1.0
        b.drain_until_closed()  # the master dropped b
        a.close()
        b.close()


def test_non_voter_is_evicted_over_the_wire():
    with MasterNode(vote_timeout=0.5, heartbeat_timeout=30) as node:
        a, b, epoch = admitted_pair(node.address)
        t0 = time.monotonic()
        # b never votes
        a.send({"type": "update_topology", "req": 2, "ring_ok": True, "admit": True})
        topo = a.expect("topology")
        assert 0.5 <= time.monotonic() - t0 < 2.0
        assert topo["ring"] == [a.welcome["peer_id"]] and topo["epoch"] == epoch + 1
        assert b.expect("evicted")["reason"].startswith("did not vote")
        b.drain_until_closed()
        a.close()
        b.close()
