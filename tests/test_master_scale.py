"""The master at scale, the short CI form of ``benchmarks/master_scale.py``.

The per-message cost of the state machine must not grow with the number of
peers: a collective costs the master O(n) (n reports, n verdicts), so one
report must cost O(1).  Each test times the same per-message work at a small
and a large n on the pure state machine (no sockets) and compares the two:
the best of several interleaved repeats, so the load of a shared machine
hits both alike.  A handler that scans the peers or the ring per message is
n_large / n_small = 64 times slower per message at the large n; the bound is
4x.  The last test runs the benchmark itself against a real master at
n = 64 for a few seconds and checks that every verdict reached every peer.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pccl import _wire as protocol
from pccl.master.server import MasterServer, _encode_outgoing
from pccl.master.state import MasterState

pytestmark = pytest.mark.timeout(120)

SMALL, LARGE = 16, 1024
MAX_RATIO = 4.0
REPEATS = 5
SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "master_scale.py"


def admitted_run(n: int) -> tuple[MasterState, list[str]]:
    """A state machine with ``n`` admitted peers in group 0, rings ready."""
    state = MasterState(heartbeat_timeout=1e6, heartbeat_interval=1.0, vote_timeout=1e6)
    ids = []
    for i in range(n):
        pid, _ = state.hello(remote="127.0.0.1:1", p2p_address=f"127.0.0.1:{10000 + i}",
                             peer_group=0, p2p_connections=1, welcome_mac=b"", now=0.0)
        ids.append(pid)
    for _ in range(2):  # the first peer alone, then a vote admits the others
        state.handle(ids[0], {"type": "update_topology", "req": 1, "ring_ok": True,
                              "admit": True}, 0.0)
        for pid in ids:
            state.handle(pid, {"type": "ring_ready", "epoch": state.epoch, "ok": True}, 0.0)
    assert len(state.admitted()) == n and state.ring_phase_epoch is None
    return state, ids


def per_message(setup, messages_per_run: int) -> float:
    """Seconds per message: the best of REPEATS runs of ``setup()()``."""
    best = float("inf")
    for _ in range(REPEATS):
        run = setup()
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return best / messages_per_run


def compare(make_setup, messages: dict[int, int]) -> tuple[float, float]:
    small = per_message(make_setup(SMALL), messages[SMALL])
    large = per_message(make_setup(LARGE), messages[LARGE])
    return small, large


def test_op_done_costs_the_same_per_report_at_any_n():
    collectives = {SMALL: 400, LARGE: 8}  # about the same number of reports

    def make(n):
        state, ids = admitted_run(n)
        seq = iter(range(10**9))

        def setup():
            def run():
                for _ in range(collectives[n]):
                    s = next(seq)
                    for pid in ids:
                        acts = state.handle(pid, {"type": "op_done", "epoch": state.epoch,
                                                  "tag": 0, "seq": s, "ok": True}, 0.0)
                    assert len(acts.sends) == n  # the last report decides: n verdicts
            return run
        return setup

    small, large = compare(make, {n: collectives[n] * n for n in collectives})
    assert large < MAX_RATIO * small, (
        f"op_done: {small * 1e6:.2f} us per report at n={SMALL}, "
        f"{large * 1e6:.2f} us at n={LARGE}"
    )


def test_a_vote_costs_the_same_per_voter_at_any_n():
    rounds = {SMALL: 64, LARGE: 1}

    def make(n):
        state, ids = admitted_run(n)

        def setup():
            def run():
                for r in range(rounds[n]):
                    for pid in ids:
                        acts = state.handle(pid, {"type": "update_topology", "req": r,
                                                  "ring_ok": True, "admit": True}, 0.0)
                    assert [m["type"] for _, m in acts.sends] == ["topology"] * n
            return run
        return setup

    small, large = compare(make, {n: rounds[n] * n for n in rounds})
    assert large < MAX_RATIO * small, (
        f"vote: {small * 1e6:.2f} us per voter at n={SMALL}, {large * 1e6:.2f} us at n={LARGE}"
    )


def test_pending_query_and_heartbeat_cost_the_same_at_any_n():
    queries = 2000

    def make(n):
        state, ids = admitted_run(n)
        state.hello(remote="127.0.0.1:1", p2p_address="127.0.0.1:9", peer_group=0,
                    p2p_connections=1, welcome_mac=b"", now=0.0)  # one pending peer

        def setup():
            def run():
                for i in range(queries):
                    pid = ids[i % n]
                    acts = state.handle(pid, {"type": "pending_query", "req": i}, 0.0)
                    assert acts.sends[0][1]["pending"] is True
                    state.handle(pid, {"type": "heartbeat"}, 0.0)
            return run
        return setup

    small, large = compare(make, {SMALL: 2 * queries, LARGE: 2 * queries})
    assert large < MAX_RATIO * small, (
        f"pending_query: {small * 1e6:.2f} us at n={SMALL}, {large * 1e6:.2f} us at n={LARGE}"
    )


def test_sync_reports_cost_the_same_per_report_at_any_n():
    rounds = {SMALL: 64, LARGE: 1}
    tensors = [{"name": "w", "dtype": "float32", "shape": [4], "nbytes": 16,
                "hash": bytes(16)}]

    def make(n):
        state, ids = admitted_run(n)
        revision = iter(range(1, 10**9))

        def setup():
            def run():
                for _ in range(rounds[n]):
                    rev = next(revision)
                    for pid in ids:
                        acts = state.handle(pid, {"type": "sync_state", "req": rev,
                                                  "revision": rev, "strategy": "enforce_popular",
                                                  "tensors": tensors}, 0.0)
                    plans = [m for _, m in acts.sends if m["type"] == "sync_plan"]
                    assert len(plans) == n and not any(p["error"] for p in plans)
            return run
        return setup

    small, large = compare(make, {n: rounds[n] * n for n in rounds})
    assert large < MAX_RATIO * small, (
        f"sync_state: {small * 1e6:.2f} us per report at n={SMALL}, "
        f"{large * 1e6:.2f} us at n={LARGE}"
    )


def test_shared_rings_are_encoded_exactly_like_the_reference_encoder():
    """The server encodes a ring shared by a round's topology messages once;
    every frame must still be byte-identical to protocol.encode(msg)."""
    state, ids = admitted_run(300)
    server = MasterServer()
    server.state = state
    written: dict[str, list[bytes]] = {pid: [] for pid in ids}

    class Conn:
        def __init__(self, pid):
            self.pid = pid

        def send(self, frame):
            written[self.pid].append(frame)
            return True

    server._by_peer = {pid: Conn(pid) for pid in ids}
    acts = None
    for pid in ids:
        acts = state.handle(pid, {"type": "update_topology", "req": 7, "ring_ok": False,
                                  "admit": True}, 0.0)
    assert acts is not None and len(acts.sends) == len(ids)
    server._apply(acts)
    for pid, msg in acts.sends:
        assert msg["type"] == "topology" and len(msg["ring"]) == len(ids)
        assert written[pid] == [protocol.encode(msg)]
    # Whatever the field order (the ring spliced in the middle of the map).
    msg = acts.sends[0][1]
    reordered = {"ring": msg["ring"], **{k: v for k, v in msg.items() if k != "ring"}}
    rings: dict = {}
    for m in (reordered, dict(reordered, rank=1)):  # packed once, reused
        assert _encode_outgoing(m, rings) == protocol.encode(m)
    assert len(rings) == 1


def test_benchmark_at_n64_delivers_every_verdict(tmp_path):
    out = tmp_path / "scale.json"
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--sizes", "64", "--duration", "2", "--tensors", "100",
         "--topology-rounds", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=100,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(out.read_text())
    (res,) = doc["results"]
    steady = res["steady"]
    assert steady["complete"] and steady["missing_verdicts"] == 0, steady
    assert steady["failed_ops"] == 0 and not steady["worker_errors"], steady
    assert steady["verdict_ms"]["samples"] == 64 * steady["collectives"] > 0
    # The master's own histogram saw each collective decided exactly once.
    assert steady["master_verdict_ms"]["count"] == steady["collectives"]
    (rnd,) = res["topology"]["rounds"]
    assert rnd["peers"] == 65 and not rnd["errors"]
    assert res["sync"]["distributors"] >= 1 and not res["sync"]["plan_errors"]
    assert not res["master_warnings"]
    assert "verdict p99" in r.stdout  # the table


def test_election_with_many_receivers_costs_the_same_per_tensor_at_any_n():
    """Half the group outdated (they receive every tensor): the plans are
    O(peers x tensors), not O(receivers x tensors x holders).  Both sizes
    have more holders than a fetch lists (MAX_SOURCES), so a fetch costs
    the same at both."""
    from pccl.master import sync

    n_tensors, small_n, large_n = 8, 64, 2048

    def reports(n):
        out = []
        for i in range(n):
            stale = i % 2 == 1
            tensors = [{"name": f"t{k}", "dtype": "float32", "shape": [4], "nbytes": 16,
                        "hash": bytes([1 + stale]) + k.to_bytes(15, "big")}
                       for k in range(n_tensors)]
            out.append(sync.SyncReport(peer_id=f"p{i}", serial=i, p2p_address=f"h:{1000 + i}",
                                       req=1, revision=1 if not stale else 0,
                                       strategy="enforce_popular", tensors=tensors))
        return out

    def make(n):
        def setup():
            rs = reports(n)
            for r in rs:
                r.prepare()  # done at arrival by the state machine

            def run():
                _, plans, _ = sync.elect(rs, None)
                fetches = [f for p in plans.values() for f in p.fetch]
                assert len(fetches) == n // 2 * n_tensors
                assert all(len(f["from"]) == sync.MAX_SOURCES for f in fetches)
            return run
        return setup

    small = per_message(make(small_n), small_n * n_tensors)
    large = per_message(make(large_n), large_n * n_tensors)
    assert large < MAX_RATIO * small, (
        f"election: {small * 1e6:.2f} us per peer x tensor at n={small_n}, "
        f"{large * 1e6:.2f} us at n={large_n}"
    )
