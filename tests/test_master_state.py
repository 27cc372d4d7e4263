"""pccl.master.state: the membership state machine, driven without I/O."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pccl import _wire as protocol
from pccl.master.state import ADMITTED, PENDING, Actions, MasterState

HB_TIMEOUT = 3.0
VOTE_TIMEOUT = 30.0


class Run:
    """A MasterState plus a fake clock and a log of what every peer received."""

    def __init__(self):
        self.state = MasterState(
            heartbeat_interval=0.5, heartbeat_timeout=HB_TIMEOUT, vote_timeout=VOTE_TIMEOUT
        )
        self.now = 0.0
        self.inbox: dict[str, list[dict]] = {}
        self.closed: dict[str, str] = {}
        self.events: list[tuple[str, str | None]] = []
        self.next_port = 9000

    def apply(self, acts: Actions) -> Actions:
        for peer_id, msg in acts.sends:
            protocol.validate(msg, protocol.TO_PEER)  # everything sent is well-formed
            protocol.encode(msg)
            self.inbox.setdefault(peer_id, []).append(msg)
        for peer_id, reason in acts.closes:
            self.closed[peer_id] = reason
        self.events += [(e.kind, e.peer_id) for e in acts.events]
        return acts

    def take(self, peer_id: str, kind: str | None = None) -> list[dict]:
        """Remove and return the messages (of one type) a peer received."""
        msgs = self.inbox.get(peer_id, [])
        taken = [m for m in msgs if kind is None or m["type"] == kind]
        self.inbox[peer_id] = [m for m in msgs if m not in taken]
        return taken

    def join(self, group: int = 0) -> str:
        self.next_port += 1
        peer_id, acts = self.state.hello(
            remote=f"127.0.0.1:{self.next_port + 1000}",
            p2p_address=f"127.0.0.1:{self.next_port}",
            peer_group=group,
            p2p_connections=4,
            welcome_mac=b"",
            now=self.now,
        )
        self.apply(acts)
        assert self.inbox[peer_id][0]["type"] == "welcome"
        return peer_id

    def send(self, peer_id: str, **msg) -> Actions:
        protocol.validate(msg, protocol.TO_MASTER)
        return self.apply(self.state.handle(peer_id, msg, self.now))

    def tick(self, dt: float = 0.0) -> Actions:
        self.now += dt
        return self.apply(self.state.tick(self.now))

    def ring_ready_all(self, epoch: int, peers=None) -> None:
        for p in peers or [p.peer_id for p in self.state.admitted()]:
            self.send(p, type="ring_ready", epoch=epoch, ok=True)

    def vote_all(self, req: int = 1, peers=None) -> None:
        for p in peers or [p.peer_id for p in self.state.admitted()]:
            self.send(p, type="update_topology", req=req, ring_ok=True, admit=True)

    def form(self, *groups: int) -> list[str]:
        """Join peers (one per entry of groups) and admit them all."""
        ids = []
        for g in groups:
            ids.append(self.join(g))
            if self.state.ring_phase_epoch is not None:
                self.ring_ready_all(self.state.ring_phase_epoch)
            if self.state.pending():
                self.vote_all()
                self.ring_ready_all(self.state.epoch)
        for p in ids:
            self.take(p)
        assert all(self.state.peers[p].state == ADMITTED for p in ids)
        return ids

    def admit_third(self) -> tuple[str, str, str, int]:
        """Two admitted peers vote a third in: the new epoch's ring phase
        has begun.  Returns the three peers and that epoch."""
        a, b = self.form(0, 0)
        c = self.join()
        self.vote_all()
        return a, b, c, self.state.epoch


@pytest.fixture
def run() -> Run:
    return Run()


def test_first_peer_is_admitted_at_once(run):
    a = run.join()
    assert run.state.peers[a].state == ADMITTED
    welcome, topo = run.take(a)
    assert welcome["peer_id"] == a and welcome["heartbeat_timeout"] == HB_TIMEOUT
    assert topo == {
        "type": "topology",
        "req": None,
        "epoch": 1,
        "changed": True,
        "rank": 0,
        "world_size": 1,
        "group_world_size": 1,
        "next": None,
        "ring": [a],
        "run": run.state.run_token,
        "peers": [{"peer_id": a, "num": 1, "name": "", "group": 0, "rank": 0,
                   "address": run.state.peers[a].p2p_address}],
    }
    run.send(a, type="ring_ready", epoch=1, ok=True)
    assert run.take(a) == [{"type": "topology_ready", "epoch": 1, "ok": True}]
    assert ("admitted", a) in run.events


def test_newcomer_waits_for_a_unanimous_vote(run):
    a, b = run.form(0, 0)
    c = run.join()
    assert run.state.peers[c].state == PENDING
    assert run.take(c, "topology") == []
    run.send(a, type="pending_query", req=5)
    assert run.take(a) == [{"type": "pending_reply", "req": 5, "pending": True}]
    run.send(a, type="update_topology", req=6, ring_ok=True, admit=True)
    assert run.state.peers[c].state == PENDING  # b has not voted
    # a pending peer has no vote:
    run.send(c, type="update_topology", req=1, ring_ok=True, admit=True)
    assert run.state.peers[c].state == PENDING
    run.send(b, type="update_topology", req=9, ring_ok=True, admit=True)
    assert run.state.peers[c].state == ADMITTED
    topo = {p: run.take(p, "topology")[0] for p in (a, b, c)}
    assert [topo[p]["req"] for p in (a, b, c)] == [6, 9, None]
    assert {t["epoch"] for t in topo.values()} == {3}
    assert all(t["changed"] and t["world_size"] == 3 for t in topo.values())
    # Ring in join order; next is the successor's advertised address.
    assert topo[a]["ring"] == [a, b, c]
    assert [topo[p]["rank"] for p in (a, b, c)] == [0, 1, 2]
    assert topo[a]["next"] == run.state.peers[b].p2p_address
    assert topo[c]["next"] == run.state.peers[a].p2p_address
    # topology_ready only once everyone reported.
    run.send(a, type="ring_ready", epoch=3, ok=True)
    run.send(b, type="ring_ready", epoch=3, ok=True)
    assert run.take(a, "topology_ready") == []
    run.send(c, type="ring_ready", epoch=3, ok=True)
    for p in (a, b, c):
        assert run.take(p, "topology_ready") == [{"type": "topology_ready", "epoch": 3, "ok": True}]
    run.send(a, type="pending_query", req=7)
    assert run.take(a)[0]["pending"] is False


def test_vote_without_change_keeps_the_epoch(run):
    a, b = run.form(0, 0)
    epoch = run.state.epoch
    run.vote_all(req=4)
    for p in (a, b):
        (topo,) = run.take(p)
        assert topo["type"] == "topology" and topo["changed"] is False
        assert topo["epoch"] == epoch and topo["req"] == 4
    assert run.state.ring_phase_epoch is None  # no topology_ready round


def test_a_vote_without_admit_keeps_newcomers_pending(run):
    # A retry after a loss must not pull a newcomer into the retried
    # collective: one voter saying admit=False defers admission.
    a, b = run.form(0, 0)
    c = run.join()
    run.send(a, type="update_topology", req=1, ring_ok=False, admit=False)
    run.send(b, type="update_topology", req=1, ring_ok=True, admit=True)
    assert run.state.peers[c].state == PENDING
    topo = {p: run.take(p, "topology")[0] for p in (a, b)}
    assert all(t["world_size"] == 2 and t["changed"] for t in topo.values())
    assert run.take(c, "topology") == []
    run.ring_ready_all(run.state.epoch, [a, b])
    run.vote_all(req=2, peers=[a, b])
    assert run.state.peers[c].state == ADMITTED


def test_ring_ok_false_bumps_the_epoch(run):
    a, b = run.form(0, 0)
    epoch = run.state.epoch
    run.send(a, type="update_topology", req=1, ring_ok=False, admit=True)
    run.send(b, type="update_topology", req=1, ring_ok=True, admit=True)
    topo = run.take(a, "topology")[0]
    assert topo["changed"] and topo["epoch"] == epoch + 1


def test_ring_ready_failure_is_reported_to_everyone(run):
    a, b, c, e = run.admit_third()
    run.send(a, type="ring_ready", epoch=e, ok=True)
    run.send(b, type="ring_ready", epoch=e, ok=False)
    run.send(c, type="ring_ready", epoch=e, ok=True)
    for p in (a, b, c):
        assert run.take(p, "topology_ready") == [
            {"type": "topology_ready", "epoch": e, "ok": False}
        ]
    # Operations on a ring that never got ready fail.
    run.send(a, type="op_done", epoch=e, tag=0, seq=0, ok=True)
    assert run.take(a, "op_outcome")[0]["ok"] is False


def test_groups_share_votes_but_have_their_own_rings(run):
    a, b, c, d = run.form(0, 1, 0, 1)
    e = run.state.epoch
    assert run.state.rings == {0: [a, c], 1: [b, d]}
    run.vote_all(req=2)
    topo = {p: run.take(p, "topology")[0] for p in (a, b, c, d)}
    assert topo[b]["ring"] == [b, d] and topo[b]["group_world_size"] == 2
    assert topo[b]["world_size"] == 4 and topo[b]["epoch"] == e
    # Each group agrees on its own operations, with the same tag and seq.
    for p in (a, c):
        run.send(p, type="op_done", epoch=e, tag=0, seq=0, ok=True)
    assert run.take(a, "op_outcome")[0]["ok"] is True
    run.send(b, type="op_done", epoch=e, tag=0, seq=0, ok=True)
    assert run.take(b, "op_outcome") == []  # d has not reported
    run.send(d, type="op_done", epoch=e, tag=0, seq=0, ok=True)
    assert run.take(b, "op_outcome")[0]["ok"] is True


def test_op_ok_only_when_every_member_reported_ok(run):
    a, b, c = run.form(0, 0, 0)
    e = run.state.epoch
    run.send(a, type="op_done", epoch=e, tag=1, seq=5, ok=True)
    run.send(b, type="op_done", epoch=e, tag=1, seq=5, ok=True)
    assert run.take(a, "op_outcome") == [] and run.take(b, "op_outcome") == []
    run.send(c, type="op_done", epoch=e, tag=1, seq=5, ok=True)
    expected = {"type": "op_outcome", "epoch": e, "tag": 1, "seq": 5, "ok": True}
    for p in (a, b, c):
        assert run.take(p, "op_outcome") == [expected]
    # A duplicate report gets the same verdict.
    run.send(a, type="op_done", epoch=e, tag=1, seq=5, ok=False)
    assert run.take(a, "op_outcome") == [expected]
    assert run.state.counters["ops_ok"] == 1


def test_one_failure_decides_not_ok_for_everyone_and_aborts_the_group(run):
    a, b, c = run.form(0, 0, 0)
    e = run.state.epoch
    run.send(a, type="op_done", epoch=e, tag=0, seq=1, ok=True)
    run.send(b, type="op_done", epoch=e, tag=0, seq=1, ok=False)
    assert run.take(a, "op_outcome")[0]["ok"] is False
    assert run.take(b, "op_outcome")[0]["ok"] is False
    assert run.take(c, "abort")[0]["epoch"] == e
    run.send(c, type="op_done", epoch=e, tag=0, seq=1, ok=True)  # late, but agrees
    assert run.take(c, "op_outcome")[0]["ok"] is False
    # The ring is broken for the rest of the epoch.
    for p in (a, b, c):
        run.send(p, type="op_done", epoch=e, tag=0, seq=2, ok=True)
        assert run.take(p, "op_outcome")[-1]["ok"] is False


def test_lost_peer_aborts_its_group_and_decides_open_ops(run):
    a, b, c, x = run.form(0, 0, 0, 1)
    e = run.state.epoch
    run.send(a, type="op_done", epoch=e, tag=0, seq=0, ok=True)
    run.apply(run.state.disconnect(c, "connection reset", run.now))
    assert run.take(a, "op_outcome") == [
        {"type": "op_outcome", "epoch": e, "tag": 0, "seq": 0, "ok": False}
    ]
    assert run.take(a, "abort")[0]["epoch"] == e
    assert run.take(b, "abort") and not run.take(x, "abort")  # other group untouched
    run.send(b, type="op_done", epoch=e, tag=0, seq=0, ok=True)
    assert run.take(b, "op_outcome")[0]["ok"] is False
    assert ("lost", c) in run.events and c not in run.state.peers
    # Survivors vote and get a new ring without c.
    run.vote_all()
    topo = run.take(a, "topology")[0]
    assert topo["changed"] and topo["epoch"] == e + 1 and topo["ring"] == [a, b]
    assert topo["world_size"] == 3


def test_silent_peer_is_lost_after_the_heartbeat_timeout(run):
    a, b = run.form(0, 0)
    for _ in range(10):  # a heartbeats, b is frozen
        run.tick(0.5)
        run.send(a, type="heartbeat")
        assert run.take(a, "heartbeat_ack")
        if b not in run.state.peers:
            break
    assert b not in run.state.peers
    assert HB_TIMEOUT < run.now <= HB_TIMEOUT + 0.5
    assert "silent" in run.closed[b]
    assert run.take(a, "abort")


def test_pending_peer_is_lost_when_silent_too(run):
    run.form(0)
    c = run.join()
    run.tick(HB_TIMEOUT + 0.1)
    assert c not in run.state.peers and ("lost", c) in run.events


def test_non_voter_is_evicted_after_the_vote_timeout(run):
    a, b, c = run.form(0, 0, 0)
    e = run.state.epoch
    run.send(a, type="update_topology", req=1, ring_ok=True, admit=True)
    run.now += 1
    run.send(b, type="update_topology", req=1, ring_ok=True, admit=True)
    for _ in range(int(VOTE_TIMEOUT) - 2):  # heartbeats keep everyone alive
        run.tick(1.0)
        for p in (a, b, c):
            run.send(p, type="heartbeat")
    assert c in run.state.peers
    run.tick(1.5)
    assert c not in run.state.peers
    assert run.take(c, "evicted")[0]["reason"].startswith("did not vote")
    assert ("evicted", c) in run.events
    topo = run.take(a, "topology")[0]
    assert topo["epoch"] == e + 1 and topo["ring"] == [a, b] and topo["req"] == 1
    assert run.take(a, "abort") == []  # voters are idle: no abort


def test_round_closes_when_its_only_voter_is_lost(run):
    a, b = run.form(0, 0)
    run.send(a, type="update_topology", req=1, ring_ok=True, admit=True)
    run.apply(run.state.disconnect(a, "closed", run.now))
    assert run.state.vote_deadline is None
    run.now += VOTE_TIMEOUT + 1
    run.send(b, type="heartbeat")
    run.tick()
    assert b in run.state.peers  # nobody was waiting for b's vote


def test_missing_ring_ready_is_evicted_after_the_vote_timeout(run):
    a, b, c, e = run.admit_third()
    run.ring_ready_all(e, [a, c])
    run.now += VOTE_TIMEOUT
    for p in (a, b, c):  # b is alive but its ring never gets ready
        run.send(p, type="heartbeat")
    run.tick(0.01)
    assert b not in run.state.peers and run.take(b, "evicted")
    assert run.take(a, "topology_ready") == [{"type": "topology_ready", "epoch": e, "ok": False}]


def test_peer_lost_during_ring_phase_fails_it_at_once(run):
    a, b, c, e = run.admit_third()
    run.ring_ready_all(e, [a, c])
    run.apply(run.state.disconnect(c, "closed", run.now))  # c already reported
    run.apply(run.state.disconnect(b, "closed", run.now))
    assert run.take(a, "topology_ready") == [{"type": "topology_ready", "epoch": e, "ok": False}]


def test_leave_between_operations_fails_nothing(run):
    a, b, c = run.form(0, 0, 0)
    e = run.state.epoch
    for p in (a, b):
        run.send(p, type="op_done", epoch=e, tag=0, seq=0, ok=True)
    run.send(c, type="op_done", epoch=e, tag=0, seq=0, ok=True)
    run.send(c, type="op_done", epoch=e, tag=0, seq=1, ok=True)  # c finished seq 1 too
    run.take(a)
    run.send(c, type="leave")
    assert ("left", c) in run.events and c in run.closed
    assert run.take(a, "abort") == []
    run.send(a, type="op_done", epoch=e, tag=0, seq=1, ok=True)
    run.send(b, type="op_done", epoch=e, tag=0, seq=1, ok=True)
    assert run.take(a, "op_outcome")[0]["ok"] is True
    run.vote_all()
    assert run.take(a, "topology")[0]["ring"] == [a, b]


def test_leave_mid_operation_fails_that_operation(run):
    a, b = run.form(0, 0)
    e = run.state.epoch
    run.send(a, type="op_done", epoch=e, tag=0, seq=0, ok=True)
    run.send(b, type="leave")
    assert run.take(a, "op_outcome")[0]["ok"] is False
    assert run.take(a, "abort")


def test_all_admitted_gone_admits_pending_at_once(run):
    a = run.form(0)[0]
    b = run.join()
    assert run.state.peers[b].state == PENDING
    run.apply(run.state.disconnect(a, "closed", run.now))
    assert run.state.peers[b].state == ADMITTED
    assert run.take(b, "topology")[0]["ring"] == [b]


def test_stale_and_foreign_reports_get_not_ok(run):
    a, b = run.form(0, 0)
    e = run.state.epoch
    run.send(a, type="op_done", epoch=e + 5, tag=0, seq=0, ok=True)
    assert run.take(a, "op_outcome")[0]["ok"] is False
    c = run.join()
    run.send(c, type="op_done", epoch=e, tag=0, seq=0, ok=True)  # pending peer
    assert run.take(c, "op_outcome")[0]["ok"] is False
    run.send(a, type="ring_ready", epoch=e - 1, ok=True)  # stale: ignored
    assert run.take(a) == []


def test_outcomes_are_remembered_across_one_epoch(run):
    a, b = run.form(0, 0)
    e = run.state.epoch
    for p in (a, b):
        run.send(p, type="op_done", epoch=e, tag=0, seq=0, ok=True)
    run.join()
    run.vote_all()
    run.take(a)
    run.send(a, type="op_done", epoch=e, tag=0, seq=0, ok=False)
    assert run.take(a, "op_outcome")[0]["ok"] is True


def test_too_many_open_ops_drops_the_peer(run):
    run.state.max_open_ops = 8
    a, b = run.form(0, 0)
    e = run.state.epoch
    for seq in range(9):
        run.send(a, type="op_done", epoch=e, tag=0, seq=seq, ok=True)
    assert a not in run.state.peers and "too many" in run.closed[a]


def test_snapshot_is_json_ready(run):
    import json

    a, b = run.form(0, 1)
    run.join()
    snap = run.state.snapshot(run.now)
    json.dumps(snap)
    assert snap["epoch"] == run.state.epoch
    assert {p["state"] for p in snap["peers"]} == {PENDING, ADMITTED}
    assert snap["groups"] == [
        {"group": 0, "ring": [a], "broken": False, "matrix": [], "proposed_ring": None},
        {"group": 1, "ring": [b], "broken": False, "matrix": [], "proposed_ring": None},
    ]
    assert [e["kind"] for e in snap["events"]].count("joined") == 3


def test_events_are_bounded(run):
    run.form(0)
    for _ in range(200):
        c = run.join()
        run.send(c, type="leave")
    assert len(run.state.snapshot(run.now)["events"]) == 100


def test_constructor_checks_timeouts():
    with pytest.raises(ValueError):
        MasterState(heartbeat_interval=3, heartbeat_timeout=3)
    with pytest.raises(ValueError):
        MasterState(vote_timeout=0)


# ---------------------------------------------------------------- random runs


EVENT = st.one_of(
    st.tuples(st.just("join"), st.integers(0, 1)),
    st.tuples(st.just("vote"), st.integers(0, 7), st.booleans()),
    st.tuples(st.just("ready"), st.integers(0, 7), st.booleans()),
    st.tuples(st.just("op"), st.integers(0, 7), st.integers(0, 2), st.booleans()),
    st.tuples(st.just("op_old"), st.integers(0, 7), st.integers(0, 2)),
    st.tuples(st.just("heartbeat"), st.integers(0, 7)),
    st.tuples(st.just("query"), st.integers(0, 7)),
    st.tuples(st.just("leave"), st.integers(0, 7)),
    st.tuples(st.just("disconnect"), st.integers(0, 7)),
    st.tuples(st.just("tick"), st.sampled_from([0.1, 1.0, 3.5, 31.0])),
    # Whole-run steps, so rounds, ring phases and operations complete often.
    st.tuples(st.just("vote_all"), st.booleans()),
    st.tuples(st.just("ready_all"), st.booleans()),
    st.tuples(st.just("op_all"), st.integers(0, 2)),
    st.tuples(st.just("wait"), st.sampled_from([1.0, 31.0])),  # heartbeats, then time passes
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 1), min_size=1, max_size=4), st.lists(EVENT, max_size=80))
def test_random_event_sequences_keep_the_invariants(first_groups, events):
    events = [("join", g) for g in first_groups] + events
    run = Run()
    ids: list[str] = []
    verdicts: dict[tuple, bool] = {}
    ring_at: dict[tuple[int, int], set[str]] = {}
    groups: dict[str, int] = {}
    for event in events:
        kind = event[0]
        live = [p for p in ids if p in run.state.peers]
        pick = live[event[1] % len(live)] if live and isinstance(event[1], int) else None
        if kind == "join":
            ids.append(run.join(event[1]))
            groups[ids[-1]] = event[1]
        elif kind == "tick":
            run.tick(event[1])
        elif kind == "vote_all":
            for p in live[:-1] if event[1] else live:  # sometimes one abstains
                if p in run.state.peers:
                    run.send(p, type="update_topology", req=2, ring_ok=True, admit=True)
        elif kind == "ready_all":
            for p in live:
                if p in run.state.peers:
                    epoch = run.state.ring_phase_epoch or run.state.epoch
                    run.send(p, type="ring_ready", epoch=epoch, ok=event[1] or p != live[0])
        elif kind == "op_all":
            for p in live:
                if p in run.state.peers:
                    run.send(p, type="op_done", epoch=run.state.epoch, tag=1, seq=event[1], ok=True)
        elif kind == "wait":
            for p in live:
                if p in run.state.peers:
                    run.send(p, type="heartbeat")
            run.now += event[1]
            for p in live:
                if p in run.state.peers:
                    run.send(p, type="heartbeat")
            run.tick()
        elif pick is None:
            continue
        elif kind == "vote":
            run.send(pick, type="update_topology", req=event[1], ring_ok=event[2], admit=True)
        elif kind == "ready":
            epoch = run.state.ring_phase_epoch or run.state.epoch
            run.send(pick, type="ring_ready", epoch=epoch, ok=event[2])
        elif kind == "op":
            run.send(pick, type="op_done", epoch=run.state.epoch, tag=0, seq=event[2], ok=event[3])
        elif kind == "op_old":
            epoch = max(0, run.state.epoch - 1)
            run.send(pick, type="op_done", epoch=epoch, tag=0, seq=event[2], ok=True)
        elif kind == "heartbeat":
            run.send(pick, type="heartbeat")
        elif kind == "query":
            run.send(pick, type="pending_query", req=1)
        elif kind == "leave":
            run.send(pick, type="leave")
        elif kind == "disconnect":
            run.apply(run.state.disconnect(pick, "closed", run.now))

        state = run.state
        # Every peer that is gone had its connection closed; no message to
        # a gone peer is queued after it was closed.
        for peer_id in ids:
            if peer_id not in state.peers:
                assert peer_id in run.closed
        # Rings only hold peers admitted at that epoch, in join order.
        for ring in state.rings.values():
            serials = [int(p[1:]) for p in ring]
            assert serials == sorted(serials)
        if state.ring_phase_epoch is not None:
            assert state.ring_phase_epoch == state.epoch
            assert state.ring_waiting <= set(state.peers)
        # Every admitted peer of a fresh epoch is in its group's ring.
        if state.ring_phase_epoch is None and not state._membership_changed:
            for peer in state.admitted():
                assert peer.peer_id in state.rings.get(peer.group, [])
        # All members of an epoch's ring hear the same verdict for an operation.
        for group, ring in state.rings.items():
            ring_at.setdefault((group, state.epoch), set(ring))
        for peer_id in ids:
            for msg in run.take(peer_id, "op_outcome"):
                group = groups[peer_id]
                if peer_id not in ring_at.get((group, msg["epoch"]), ()):
                    continue  # not a member: its answer is "not ok", nothing to agree on
                key = (group, msg["epoch"], msg["tag"], msg["seq"])
                assert verdicts.setdefault(key, msg["ok"]) == msg["ok"], key
        assert all(n >= 0 for n in state._open_ops.values())
