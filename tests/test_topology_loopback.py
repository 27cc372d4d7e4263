"""optimize_topology() end to end on loopback: every peer calls it, every
directed edge gets measured, the ring is installed at the next
update_topology() and all-reduce still works on it; /status and /metrics
show the matrix, the ring and its bottleneck."""

from __future__ import annotations

import json
import threading
import urllib.request

import numpy as np
import pytest

import pccl

pytestmark = pytest.mark.timeout(120)


def _each(comms, fn, timeout: float = 60.0) -> list:
    out: list = [None] * len(comms)
    errs: list = []

    def run(i: int) -> None:
        try:
            out[i] = fn(i, comms[i])
        except BaseException as exc:  # reported below
            errs.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(comms))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a peer hung"
    if errs:
        raise errs[0]
    return out


def _form(master: pccl.MasterNode, n: int) -> list[pccl.Communicator]:
    comms = [pccl.Communicator(master.address, p2p_connections=2) for _ in range(n)]

    def join(i, c):
        c.connect(timeout=30)
        while c.group_world_size < n:
            c.update_topology(timeout=30)

    _each(comms, join)
    return comms


def _get(addr: str, path: str) -> bytes:
    with urllib.request.urlopen(f"http://{addr}{path}", timeout=10) as r:
        return r.read()


def test_optimize_topology_on_loopback():
    with pccl.MasterNode(status="127.0.0.1:0") as master:
        comms = _form(master, 4)
        try:
            infos = _each(comms, lambda i, c: c.optimize_topology(timeout=60))
            info = infos[0]
            assert isinstance(info, pccl.TopologyInfo)
            ids = [c.peer_id for c in comms]
            assert set(info.matrix) == {(a, b) for a in ids for b in ids if a != b}
            assert all(v > 0 for v in info.matrix.values())
            assert set(info.rtt) == set(info.matrix)
            assert info.feasible and sorted(info.ring) == sorted(ids)
            ring_edges = [(a, info.ring[(i + 1) % 4]) for i, a in enumerate(info.ring)]
            assert info.bottleneck == pytest.approx(min(info.matrix[e] for e in ring_edges),
                                                    rel=1e-3)
            assert info.predicted_bus_bandwidth == pytest.approx(info.bottleneck, rel=1e-6)
            assert info.probes == 12 and 0 < info.probe_seconds < 30
            for other in infos[1:]:
                assert other.ring == info.ring and other.matrix == info.matrix
            _each(comms, lambda i, c: c.update_topology(timeout=30))
            for c in comms:  # every peer sits where the ring says
                assert c.rank == info.ring.index(c.peer_id)
            xs = [np.full(1 << 16, float(i + 1), dtype=np.float32) for i in range(4)]
            _each(comms, lambda i, c: c.all_reduce(xs[i]))
            for x in xs:
                assert np.all(x == 10.0)

            doc = json.loads(_get(master.status_address, "/status"))
            (group,) = doc["groups"]
            assert group["ring"] == info.ring
            assert len(group["matrix"]) == 12
            assert all("bytes_per_s" in e for e in group["edges"])
            assert group["topology"]["feasible"] is True
            assert group["bottleneck"] == pytest.approx(info.bottleneck, rel=1e-3)
            metrics = _get(master.status_address, "/metrics").decode()
            assert "pccl_master_edge_bytes_per_second{" in metrics
            assert "pccl_master_ring_bottleneck_bytes_per_second{" in metrics
            assert "pccl_master_topology_probe_seconds{" in metrics

            # Nothing stale: a second call probes nothing and keeps the ring.
            again = _each(comms, lambda i, c: c.optimize_topology(timeout=60))
            assert again[0].probes == 0 and not again[0].install
            assert again[0].ring == info.ring or set(again[0].ring) == set(info.ring)
        finally:
            for c in comms:
                c.close()


def test_optimize_topology_alone_and_before_connect():
    with pccl.MasterNode() as master:
        c = pccl.Communicator(master.address)
        with pytest.raises(pccl.PcclError):
            c.optimize_topology()
        c.connect(timeout=30)
        try:
            info = c.optimize_topology(timeout=30)
            assert info.ring == [c.peer_id] and info.matrix == {}
            assert info.bottleneck == float("inf")
        finally:
            c.close()
