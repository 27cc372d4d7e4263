"""The master's shared-state election and sync rounds, without I/O
(pccl.master.sync and the sync part of pccl.master.state)."""

from __future__ import annotations

import pytest

from pccl import _wire as protocol
from pccl.master.state import ADMITTED, Actions, MasterState
from pccl.master.sync import SyncReport, elect

VOTE_TIMEOUT = 30.0
SYNC_TIMEOUT = 100.0
H = {c: bytes([ord(c)]) * 16 for c in "abcdxyz"}


def tensors(**hashes: str) -> list[dict]:
    return [
        {"name": n, "dtype": "float32", "shape": [4], "nbytes": 16, "hash": H[h]}
        for n, h in sorted(hashes.items())
    ]


def report(serial: int, revision: int, strategy: str = "enforce_popular", **hashes) -> SyncReport:
    return SyncReport(f"p{serial}", serial, f"127.0.0.1:{9000 + serial}", serial, revision,
                      strategy, tensors(**hashes))


# --------------------------------------------------------------------------
# The election, pure.


def test_in_sync_group_fetches_nothing():
    rev, plans, elected = elect([report(i, 3, w="a", b="b") for i in (1, 2, 3)], 2)
    assert rev == 3 and elected == {"w": H["a"], "b": H["b"]}
    assert all(p.ok and not p.fetch and not p.serve for p in plans.values())


def test_per_tensor_majority_and_distributors():
    reps = [report(1, 3, w="a", b="x"), report(2, 3, w="y", b="b"), report(3, 3, w="a", b="b")]
    _, plans, elected = elect(reps, 2)
    assert elected == {"w": H["a"], "b": H["b"]}
    assert [f["name"] for f in plans["p1"].fetch] == ["b"]
    assert set(plans["p1"].fetch[0]["from"]) == {"127.0.0.1:9002", "127.0.0.1:9003"}
    assert [f["name"] for f in plans["p2"].fetch] == ["w"]
    assert not plans["p3"].fetch and plans["p3"].serve


def test_ties_go_to_the_earliest_peer_for_every_tensor():
    # Two halves that diverged: the result must be one half's state, not a mix.
    reps = [report(2, 1, w="a", b="b"), report(1, 1, w="x", b="y")]
    _, plans, elected = elect(reps, 0)
    assert elected == {"w": H["x"], "b": H["y"]}
    assert {f["name"] for f in plans["p2"].fetch} == {"w", "b"}


def test_first_sync_takes_the_highest_revision_and_outdated_do_not_vote():
    reps = [report(1, 7, w="a"), report(2, 0, w="x"), report(3, 0, w="x")]
    rev, plans, elected = elect(reps, None)
    assert rev == 7 and elected == {"w": H["a"]}
    assert plans["p2"].fetch and plans["p3"].fetch


def test_ahead_of_the_run_is_refused():
    rev, plans, _ = elect([report(1, 4, w="a"), report(2, 9, w="a")], 3)
    assert rev == 4 and plans["p1"].ok
    assert plans["p2"].error_kind == "state" and "ahead of the run" in plans["p2"].reason


def test_nobody_at_the_expected_revision_elects_among_the_newest():
    # Every peer repeated a revision: the newest content present votes and
    # the group still advances (PCCL does the same; nothing gets stuck).
    rev, plans, elected = elect([report(1, 4, w="a"), report(2, 5, w="b"),
                                 report(3, 5, w="b")], 5)
    assert rev == 6 and elected == {"w": H["b"]} and plans["p1"].fetch


def test_strategies():
    # RECEIVE_ONLY majority does not vote and never serves.
    reps = [report(1, 2, w="a"), report(2, 2, "receive_only", w="x"),
            report(3, 2, "receive_only", w="a")]
    _, plans, elected = elect(reps, 1)
    assert elected == {"w": H["a"]} and plans["p2"].fetch[0]["from"] == ["127.0.0.1:9001"]
    assert not plans["p3"].fetch and not plans["p3"].serve
    # SEND_ONLY wins against a majority; a disagreeing SEND_ONLY is refused.
    reps = [report(1, 2, w="x"), report(2, 2, w="x"), report(3, 2, "send_only", w="a")]
    _, plans, elected = elect(reps, 1)
    assert elected == {"w": H["a"]} and plans["p3"].serve and plans["p1"].fetch
    reps = [report(1, 2, "send_only", w="a"), report(2, 2, "send_only", w="x"), report(3, 2, w="x")]
    _, plans, elected = elect(reps, 1)
    assert elected == {"w": H["a"]} and plans["p2"].error_kind == "state"
    assert plans["p3"].fetch[0]["from"] == ["127.0.0.1:9001"]
    # SEND_ONLY while outdated: fine if its content is the group's, refused
    # if it would have to receive.
    _, plans, _ = elect([report(1, 2, w="a"), report(2, 1, "send_only", w="a")], 1)
    assert plans["p2"].ok and not plans["p2"].fetch and plans["p2"].serve is False
    _, plans, _ = elect([report(1, 2, w="a"), report(2, 1, "send_only", w="x")], 1)
    assert plans["p2"].error_kind == "state" and plans["p1"].ok
    # Nobody may send.
    _, plans, _ = elect([report(1, 2, "receive_only", w="a")], 1)
    assert "RECEIVE_ONLY" in plans["p1"].reason


def test_schema_mismatch_names_the_tensor():
    odd = report(3, 2, w="a")
    odd.tensors[0]["dtype"] = "float16"
    _, plans, _ = elect([report(1, 2, w="a"), report(2, 2, w="a"), odd], 1)
    assert plans["p3"].error_kind == "invalid" and "tensor 'w': dtype float16" in plans["p3"].reason
    dup = report(3, 2, w="a")
    dup.tensors.append(dict(dup.tensors[0]))
    _, plans, _ = elect([report(1, 2, w="a"), dup], 1)
    assert "appears twice" in plans["p3"].reason


# --------------------------------------------------------------------------
# Rounds in the state machine.


class Run:
    def __init__(self):
        self.state = MasterState(heartbeat_interval=0.5, heartbeat_timeout=3.0,
                                 vote_timeout=VOTE_TIMEOUT, sync_timeout=SYNC_TIMEOUT)
        self.now = 0.0
        self.inbox: dict[str, list[dict]] = {}
        self.closed: dict[str, str] = {}

    def apply(self, acts: Actions) -> None:
        for pid, msg in acts.sends:
            protocol.encode(protocol.validate(msg, protocol.TO_PEER))
            self.inbox.setdefault(pid, []).append(msg)
        self.closed.update(dict(acts.closes))

    def take(self, pid: str, kind: str) -> list[dict]:
        msgs = self.inbox.get(pid, [])
        self.inbox[pid] = [m for m in msgs if m["type"] != kind]
        return [m for m in msgs if m["type"] == kind]

    def send(self, pid: str, **msg) -> None:
        protocol.validate(msg, protocol.TO_MASTER)
        self.apply(self.state.handle(pid, msg, self.now))

    def tick(self, dt: float) -> None:
        self.now += dt
        # Heartbeats keep everyone alive while time passes.
        for p in list(self.state.peers):
            if p not in self.closed:
                self.state.peers[p].last_seen = self.now
        self.apply(self.state.tick(self.now))

    def form(self, n: int) -> list[str]:
        ids = []
        for _ in range(n):
            pid, acts = self.state.hello(remote="r", p2p_address=f"127.0.0.1:{9001 + len(ids)}",
                                         peer_group=0, p2p_connections=1, welcome_mac=b"",
                                         now=self.now)
            self.apply(acts)
            ids.append(pid)
            if self.state.ring_phase_epoch is not None:
                for p in ids:
                    self.send(p, type="ring_ready", epoch=self.state.ring_phase_epoch, ok=True)
            if self.state.pending():
                for p in ids[:-1]:
                    self.send(p, type="update_topology", req=1, ring_ok=True, admit=True)
                for p in ids:
                    self.send(p, type="ring_ready", epoch=self.state.epoch, ok=True)
        assert all(self.state.peers[p].state == ADMITTED for p in ids)
        return ids

    def sync(self, pid: str, req: int, revision: int, **hashes) -> None:
        self.send(pid, type="sync_state", req=req, revision=revision, strategy="enforce_popular",
                  tensors=tensors(**hashes))


@pytest.fixture
def run() -> Run:
    return Run()


def test_round_waits_for_every_member_then_transfers_then_releases(run):
    a, b, c = run.form(3)
    run.sync(a, 1, 1, w="a")
    run.sync(b, 1, 1, w="a")
    assert not run.take(a, "sync_plan")
    run.sync(c, 1, 0, w="x")
    plans = {p: run.take(p, "sync_plan")[0] for p in (a, b, c)}
    assert plans[c]["fetch"] and plans[a]["serve"] and plans[b]["serve"]
    assert plans[a]["revision"] == 1 and not plans[a]["fetch"]
    run.send(c, type="sync_done", revision=1, ok=True)
    assert run.take(a, "sync_end") == [{"type": "sync_end", "revision": 1, "ok": True}]
    assert run.take(b, "sync_end") and not run.take(c, "sync_end")
    assert run.state.sync_revisions[0] == 1 and not run.state.sync_rounds


def test_non_reporters_are_evicted_at_the_vote_timeout(run):
    a, b = run.form(2)
    run.sync(a, 1, 1, w="a")
    run.tick(VOTE_TIMEOUT + 0.1)
    assert b in run.closed and run.take(b, "evicted")
    assert run.take(a, "sync_plan")[0]["error"] == ""


def test_a_receiver_lost_or_silent_never_sticks_the_round(run):
    a, b, c = run.form(3)
    for p in (a, b):
        run.sync(p, 1, 1, w="a")
    run.sync(c, 1, 0, w="x")
    run.apply(run.state.disconnect(c, "killed", run.now))
    assert run.take(a, "sync_end")[0]["ok"] is False and not run.state.sync_rounds
    # A receiver that never reports: released at the sync timeout.
    run.sync(a, 2, 2, w="a")
    run.sync(b, 2, 2, w="y")
    plans = {p: run.take(p, "sync_plan")[0] for p in (a, b)}
    receiver = a if plans[a]["fetch"] else b
    distributor = b if receiver == a else a
    run.tick(SYNC_TIMEOUT + 0.1)
    assert run.take(distributor, "sync_end")[0]["ok"] is False
    # And the next round works.
    run.sync(a, 3, 3, w="a")
    run.sync(b, 3, 3, w="a")
    assert all(not m["error"] for p in (a, b) for m in run.take(p, "sync_plan"))


def test_a_sync_queued_during_a_transfer_starts_the_next_round(run):
    a, b = run.form(2)
    run.sync(a, 1, 1, w="a")
    run.sync(b, 1, 0, w="x")
    assert run.take(b, "sync_plan")[0]["fetch"] and run.take(a, "sync_plan")
    run.sync(b, 2, 2, w="a")  # b raced ahead (e.g. after its own sync_done)
    run.send(b, type="sync_done", revision=1, ok=True)
    assert run.take(a, "sync_end")
    run.sync(a, 2, 2, w="a")
    assert run.take(a, "sync_plan")[0]["revision"] == 2
    assert run.take(b, "sync_plan")[0]["revision"] == 2


def test_pending_peer_is_refused_and_an_emptied_group_forgets_its_revision(run):
    (a,) = run.form(1)
    pid, acts = run.state.hello(remote="r", p2p_address="127.0.0.1:9500", peer_group=0,
                                p2p_connections=1, welcome_mac=b"", now=run.now)
    run.apply(acts)
    run.sync(pid, 1, 0, w="a")
    assert "not admitted" in run.take(pid, "sync_plan")[0]["reason"]
    run.sync(a, 1, 4, w="a")
    assert run.state.sync_revisions[0] == 4
    run.apply(run.state.disconnect(a, "gone", run.now))
    # The pending peer is admitted alone now, but it never held the state.
    assert run.state.peers[pid].state == ADMITTED
    assert 0 not in run.state.sync_revisions


def test_election_is_not_quadratic_in_tensors():
    # 64 peers x 1000 tensors and one joiner that must fetch every tensor:
    # the master runs this on its only event loop, so it must stay far below
    # the heartbeat timeout (3 s).  An election that rebuilds a name index
    # per tensor and per sender takes several seconds here; one that indexes
    # each report once takes a few tens of milliseconds.  The bound is a
    # coarse sanity bound for a shared, noisy machine.
    import time

    n_tensors = 1000

    def big(serial: int, revision: int, h: str) -> SyncReport:
        ts = [
            {"name": f"t{i:04d}", "dtype": "float32", "shape": [4], "nbytes": 16, "hash": H[h]}
            for i in range(n_tensors)
        ]
        return SyncReport(f"p{serial}", serial, f"127.0.0.1:{9000 + serial}", serial,
                          revision, "enforce_popular", ts)

    reps = [big(i, 5, "a") for i in range(1, 65)] + [big(65, 0, "x")]
    t0 = time.perf_counter()
    rev, plans, elected = elect(reps, 4)
    took = time.perf_counter() - t0
    assert rev == 5 and len(elected) == n_tensors
    assert len(plans["p65"].fetch) == n_tensors
    assert all(p.ok for p in plans.values())
    assert took < 1.0, f"election of 64 peers x {n_tensors} tensors took {took:.2f} s"
