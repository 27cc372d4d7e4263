"""The ``pccl-master`` command line: flags, signals, the status endpoint."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pccl.testing.master_client import MasterProcess, PeerClient

FLAGS = [
    "--listen",
    "--secret-file",
    "--status",
    "--heartbeat-interval",
    "--heartbeat-timeout",
    "--vote-timeout",
    "--log-level",
]


def run_cli(args, cwd, timeout=30):
    return subprocess.run(
        [sys.executable, "-m", "pccl.master", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_documents_every_flag_and_default(tmp_path):
    result = run_cli(["--help"], tmp_path)
    assert result.returncode == 0
    for flag in FLAGS:
        assert flag in result.stdout
    for default in ("0.0.0.0:48148", "0.5", "3.0", "30.0", "INFO"):
        assert f"default: {default}" in result.stdout


@pytest.mark.parametrize(
    "args,error",
    [
        (["--heartbeat-interval", "2", "--heartbeat-timeout", "1"], "must be greater"),
        (["--vote-timeout", "-1"], "positive"),
        (["--listen", "nonsense"], "HOST:PORT"),
        (["--secret-file", "missing-file"], "secret-file"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, args, error):
    result = run_cli(
        [*args, "--listen", "127.0.0.1:0"] if "--listen" not in args else args, tmp_path
    )
    assert result.returncode == 2 and error in result.stderr


def test_empty_secret_file_is_refused(tmp_path):
    (tmp_path / "secret").write_bytes(b"\n")
    result = run_cli(["--listen", "127.0.0.1:0", "--secret-file", "secret"], tmp_path)
    assert result.returncode == 2 and "empty" in result.stderr


def test_secret_is_never_logged(tmp_path):
    (tmp_path / "secret").write_bytes(b"hunter2-very-secret\n")
    with MasterProcess(
        str(tmp_path), extra=["--secret-file", "secret", "--log-level", "DEBUG"]
    ) as master:
        with PeerClient(master.address, timeout=10) as peer:
            assert peer.handshake(b"hunter2-very-secret")["type"] == "welcome"
        with PeerClient(master.address, timeout=10) as peer:
            assert peer.handshake(b"hunter2")["type"] == "error"
        master.wait_for_log("authentication failed")
        master.signal(signal.SIGTERM)
        assert master.wait(10) == 0
    assert "auth=hmac-sha256" in "\n".join(master.stderr.lines)
    assert "hunter2" not in "\n".join(master.stderr.lines + master.stdout.lines)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_with_exit_code_zero(tmp_path, sig):
    with MasterProcess(str(tmp_path)) as master:
        peers = [PeerClient(master.address, timeout=10) for _ in range(3)]
        try:
            for peer in peers:
                assert peer.handshake()["type"] == "welcome"
            t0 = time.monotonic()
            master.signal(sig)
            assert master.wait(10) == 0
            assert time.monotonic() - t0 < 5
            for peer in peers:  # every connection was closed
                peer.drain_until_closed()
        finally:
            for peer in peers:
                peer.close()
        master.wait_for_log("event=stopped", 5)
        assert "Traceback" not in "\n".join(master.stderr.lines)


def http_get(address: str, path: str) -> tuple[int, str, str]:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type"), response.read().decode()
    finally:
        conn.close()


def test_status_endpoint_serves_json_and_prometheus(tmp_path):
    with MasterProcess(str(tmp_path), extra=["--status", "127.0.0.1:0"]) as master:
        assert master.status_address and master.status_address != master.address
        with (
            PeerClient(master.address, timeout=10) as a,
            PeerClient(master.address, timeout=10) as b,
        ):
            a.handshake(peer_group=0, p2p_address="127.0.0.1:7001")
            topo = a.expect("topology")
            a.send({"type": "ring_ready", "epoch": topo["epoch"], "ok": True})
            a.expect("topology_ready")
            b.handshake(peer_group=1, p2p_address="127.0.0.1:7002")
            a.send({"type": "pending_query", "req": 1})  # round trip: b is in the state
            a.expect("pending_reply")

            status, ctype, body = http_get(master.status_address, "/status")
            assert status == 200 and ctype == "application/json"
            doc = json.loads(body)
            assert doc["epoch"] == topo["epoch"] == 1
            assert doc["listen"] == master.address
            states = {p["peer_id"]: p for p in doc["peers"]}
            assert states[a.welcome["peer_id"]]["state"] == "admitted"
            assert states[b.welcome["peer_id"]]["state"] == "pending"
            assert states[b.welcome["peer_id"]]["group"] == 1
            assert states[a.welcome["peer_id"]]["last_heartbeat_age"] >= 0
            core = ("group", "ring", "broken", "edges")  # topology adds matrix, proposed_ring
            assert [{k: g[k] for k in core} for g in doc["groups"]] == [
                {"group": 0, "ring": [a.welcome["peer_id"]], "broken": False, "edges": []}
            ]
            assert [e["kind"] for e in doc["events"]][:2] == ["joined", "admitted"]

            status, ctype, body = http_get(master.status_address, "/metrics")
            assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(body)
                for s in family.samples
            }
            assert samples[("pccl_master_peers", (("state", "admitted"),))] == 1
            assert samples[("pccl_master_peers", (("state", "pending"),))] == 1
            assert samples[("pccl_master_epoch", ())] == 1
            assert samples[("pccl_master_ops_decided_total", (("outcome", "ok"),))] == 0
            assert ("pccl_master_messages_rejected_total", ()) in samples
            assert ("pccl_master_peers_lost_total", ()) in samples

        status, _, _ = http_get(master.status_address, "/nope")
        assert status == 404
        master.signal(signal.SIGTERM)
        assert master.wait(10) == 0


def test_status_endpoint_bounds_requests(tmp_path):
    import socket

    with MasterProcess(str(tmp_path), extra=["--status", "127.0.0.1:0"]) as master:
        host, port = master.status_address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"GET /status HTTP/1.1\r\n" + b"X: " + b"a" * 20000 + b"\r\n\r\n")
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 431")
        status, _, _ = http_get(master.status_address, "/status")
        assert status == 200
