"""A peer's own name (hello.name): validated on the wire, shown beside the
peer id in the master's log lines, events, abort reasons, /status and
/metrics."""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.request

import pytest

import pccl
from pccl import _control
from pccl import _wire as protocol
from pccl.master.state import MasterState
from pccl.testing.master_client import PeerClient


def _hello(**extra) -> dict:
    msg = {
        "type": "hello",
        "version": protocol.PROTOCOL_VERSION,
        "nonce": b"\0" * protocol.NONCE_LEN,
        "mac": b"",
        "peer_group": 0,
        "p2p_address": "127.0.0.1:1",
        "p2p_connections": 1,
    }
    msg.update(extra)
    return msg


def test_hello_name_is_optional_and_checked():
    protocol.validate(_hello(), protocol.TO_MASTER)
    protocol.validate(_hello(name="trainer-a"), protocol.TO_MASTER)
    protocol.validate(_hello(name="x" * protocol.MAX_PEER_NAME), protocol.TO_MASTER)
    for bad, error in (
        ("", "empty"),
        ("x" * (protocol.MAX_PEER_NAME + 1), "exceeds"),
        ("a\nb", "control character"),
        (7, "expected str"),
    ):
        with pytest.raises(protocol.ProtocolViolation, match=error):
            protocol.validate(_hello(name=bad), protocol.TO_MASTER)
    with pytest.raises(protocol.ProtocolViolation, match="unexpected field"):
        protocol.validate(_hello(nick="x"), protocol.TO_MASTER)
    # Only the hello has it.
    with pytest.raises(protocol.ProtocolViolation, match="unexpected field 'name'"):
        protocol.validate({"type": "heartbeat", "name": "x"}, protocol.TO_MASTER)


def test_pccl_name_environment_variable(monkeypatch, caplog):
    monkeypatch.delenv("PCCL_NAME", raising=False)
    assert _control._env_name() is None
    monkeypatch.setenv("PCCL_NAME", "peer7")
    assert _control._env_name() == "peer7"
    monkeypatch.setenv("PCCL_NAME", "bad\tname")
    with caplog.at_level(logging.WARNING, logger="pccl.control"):
        assert _control._env_name() is None
    assert "PCCL_NAME ignored" in caplog.text


def test_state_carries_the_name_into_events_snapshot_and_reasons():
    state = MasterState(heartbeat_interval=0.5, heartbeat_timeout=3.0, vote_timeout=30.0)
    ids = []
    for i, name in enumerate(("alpha", None)):
        peer_id, acts = state.hello(
            remote=f"127.0.0.1:{2000 + i}", p2p_address=f"127.0.0.1:{3000 + i}", peer_group=0,
            p2p_connections=1, welcome_mac=b"", now=0.0, name=name,
        )
        ids.append(peer_id)
        assert acts.events[0].kind == "joined" and acts.events[0].name == name
    snap = state.snapshot(0.0)
    by_id = {p["peer_id"]: p for p in snap["peers"]}
    assert by_id[ids[0]]["name"] == "alpha"
    assert "name" not in by_id[ids[1]]
    assert state.peers[ids[0]].label == f"{ids[0]} (alpha)"
    assert state.peers[ids[1]].label == ids[1]
    acts = state.disconnect(ids[0], "connection closed", 1.0)
    lost = [e for e in acts.events if e.kind == "lost"]
    assert lost and lost[0].name == "alpha" and lost[0].as_dict()["name"] == "alpha"


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


def test_master_shows_the_name_in_logs_status_and_metrics(caplog):
    caplog.set_level(logging.INFO, logger="pccl.master")
    with pccl.MasterNode(listen="127.0.0.1:0", status="127.0.0.1:0") as master:
        named = PeerClient(master.address)
        named.join(name="trainer-a")
        anon = PeerClient(master.address)
        anon.join()
        pid = named.welcome["peer_id"]
        doc = json.loads(_get(f"http://{master.status_address}/status"))
        peers = {p["peer_id"]: p for p in doc["peers"]}
        assert peers[pid]["name"] == "trainer-a"
        assert "name" not in peers[anon.welcome["peer_id"]]
        assert any(e.get("name") == "trainer-a" and e["kind"] == "joined" for e in doc["events"])
        metrics = _get(f"http://{master.status_address}/metrics").decode()
        assert f'peer="{pid}"' in metrics and 'name="trainer-a"' in metrics
        named.sock.close()
        deadline = time.monotonic() + 10
        while f"event=lost peer={pid} name=trainer-a" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.05)
        assert f"event=joined peer={pid} name=trainer-a" in caplog.text
        anon.sock.close()


def test_default_name_is_host_pid():
    name = _control._default_name()
    assert name.endswith(f"-{os.getpid()}") and len(name) <= 64
    assert protocol.SCHEMAS[protocol.TO_MASTER]["hello"]["name"](name) is None
