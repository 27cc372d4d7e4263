"""optimize_topology() in the master's state machine (no I/O): probe
scheduling in disjoint rounds, lost peers, unreachable edges, the solve
action, and the ring installed at the next update_topology()."""

from __future__ import annotations

import pytest

from pccl.master import probing
from pccl.master.topology import solve_ring

from .test_master_state import Run


@pytest.fixture
def run() -> Run:
    return Run()


def _call_all(run: Run, ids, req: int = 7) -> list:
    solves = []
    for p in ids:
        solves += run.send(p, type="optimize_topology", req=req).solves
    return solves


def _probes(run: Run, ids) -> dict[str, dict]:
    out = {}
    for p in ids:
        msgs = run.take(p, "probe")
        assert len(msgs) <= 1, "a peer receives from at most one peer per round"
        if msgs:
            out[p] = msgs[0]
    return out


def _report(run: Run, dst: str, msg: dict, rates: dict, ok: bool = True) -> None:
    bw = rates.get((msg["src"], dst), 0.0)
    run.send(dst, type="probe_result", req=msg["req"], src=msg["src"], ok=ok and bw > 0,
             bytes_per_s=float(bw), rtt_s=0.001, bytes=1000, seconds=0.2, reason="")


def _drive(run: Run, ids, rates, fail=()) -> tuple[list[list[tuple[str, str]]], list]:
    """Answer every probe round; return the rounds seen and the solve requests."""
    rounds, solves = [], []
    while True:
        probes = _probes(run, ids)
        if not probes:
            break
        pairs = [(m["src"], dst) for dst, m in probes.items()]
        senders = [s for s, _ in pairs]
        assert len(set(senders)) == len(senders), "a peer sends to at most one peer per round"
        rounds.append(pairs)
        for dst, m in probes.items():
            acts = run.state.handle(dst, {
                "type": "probe_result", "req": m["req"], "src": m["src"],
                "ok": (m["src"], dst) not in fail and rates.get((m["src"], dst), 0) > 0,
                "bytes_per_s": float(rates.get((m["src"], dst), 0.0)), "rtt_s": 0.001,
                "bytes": 1000, "seconds": 0.2, "reason": "test"}, run.now)
            run.apply(acts)
            solves += acts.solves
    return rounds, solves


def _solve(run: Run, request: probing.SolveRequest):
    solution = solve_ring(request.matrix, peers=list(request.peers))
    return run.apply(run.state.topology_solved(request, solution, run.now))


def test_full_probe_schedule_then_install(run):
    ids = run.form(0, 0, 0, 0)
    n = len(ids)
    # The join-order ring p1 p2 p3 p4 crosses the slow edge p2 -> p3.
    rates = {(a, b): 100e6 for a in ids for b in ids if a != b}
    rates[(ids[1], ids[2])] = 10e6
    _call_all(run, ids[:-1])
    assert _probes(run, ids) == {}, "probing starts once every member called"
    _call_all(run, ids[-1:])
    rounds, solves = _drive(run, ids, rates)
    assert len(rounds) == n - 1
    assert sorted(p for r in rounds for p in r) == sorted(rates)
    assert len(solves) == 1
    _solve(run, solves[0])
    infos = {p: run.take(p, "topology_info") for p in ids}
    for p in ids:
        (info,) = infos[p]
        assert info["step"] == n - 1  # after its n - 1 probes
        assert info["feasible"] and info["install"]
        assert info["bottleneck"] == 100e6 == info["predicted_bus_bandwidth"]
        assert len(info["edges"]) == n * (n - 1)
    ring = infos[ids[0]][0]["ring"]
    assert (ids[1], ids[2]) not in {(a, ring[(i + 1) % n]) for i, a in enumerate(ring)}
    assert run.state.proposed_rings[0] == ring
    # Installed at the next update_topology: a new epoch with that ring.
    epoch = run.state.epoch
    run.vote_all(req=9)
    assert run.state.epoch == epoch + 1
    assert run.state.rings[0] == ring
    for p in ids:
        (topo,) = run.take(p, "topology")
        assert topo["changed"] and topo["ring"] == ring
        assert topo["rank"] == ring.index(p)
    run.ring_ready_all(run.state.epoch)
    # A second optimize_topology probes nothing (every estimate is fresh).
    solves = _call_all(run, ids, req=11)
    rounds, later = _drive(run, ids, rates)
    assert rounds == [] and later == [] and len(solves) == 1
    _solve(run, solves[0])
    info = run.take(ids[0], "topology_info")[0]
    assert info["step"] == 0 and info["probes"] == 0 and not info["install"]
    # ... until the estimates are stale.
    run.now += run.state.topology.max_age + 1
    for p in ids:
        run.state.peers[p].last_seen = run.now
    _call_all(run, ids, req=12)
    rounds, _ = _drive(run, ids, rates)
    assert len(rounds) == n - 1


def test_unreachable_edges_are_never_used_and_infeasible_is_reported(run):
    a, b, c = run.form(0, 0, 0)
    rates = {(x, y): 50e6 for x in (a, b, c) for y in (a, b, c) if x != y}
    # With 3 peers there are two rings: a b c and a c b.  Kill one edge of each.
    fail = {(a, b), (a, c)}
    _call_all(run, (a, b, c))
    _, solves = _drive(run, (a, b, c), rates, fail)
    assert ("unreachable", b) in run.events
    _solve(run, solves[0])
    info = run.take(a, "topology_info")[0]
    assert not info["feasible"] and info["ring"] == []
    assert "no ring avoids" in info["reason"]
    unreachable = {(e["from"], e["to"]) for e in info["edges"] if e["source"] == "unreachable"}
    assert unreachable == fail
    assert 0 not in run.state.proposed_rings
    doc = run.state.snapshot(run.now)
    assert doc["groups"][0]["topology"]["feasible"] is False
    assert "no ring avoids" in doc["groups"][0]["topology"]["reason"]


def test_a_peer_lost_while_probing_costs_only_its_edges(run):
    ids = run.form(0, 0, 0, 0)
    rates = {(x, y): 80e6 for x in ids for y in ids if x != y}
    _call_all(run, ids)
    probes = _probes(run, ids)  # round 1 in flight
    lost = ids[2]
    run.apply(run.state.disconnect(lost, "killed", run.now))
    for dst, m in probes.items():
        if dst != lost:
            _report(run, dst, m, rates)
    survivors = [p for p in ids if p != lost]
    rounds, solves = _drive(run, survivors, rates)
    assert all(lost not in pair for r in rounds for pair in r)
    (req,) = solves
    assert set(req.peers) == set(survivors)
    assert set(req.matrix) == {(x, y) for x in survivors for y in survivors if x != y}
    _solve(run, req)
    info = run.take(survivors[0], "topology_info")[0]
    assert info["feasible"] and set(info["ring"]) == set(survivors)


def test_probe_without_answer_times_out_as_unreachable(run):
    a, b = run.form(0, 0)
    _call_all(run, (a, b))
    probes = _probes(run, (a, b))
    assert len(probes) == 2
    _report(run, a, probes[a], {(b, a): 10e6})
    for p in (a, b):
        run.state.peers[p].last_seen = run.now + run.state.probe_timeout
    acts = run.tick(run.state.probe_timeout + 0.01)
    assert len(acts.solves) == 1
    assert run.state.topology.edges[(a, b)].source == probing.UNREACHABLE


def test_probe_rounds_are_disjoint_and_cover_every_edge():
    peers = [f"p{i}" for i in range(8)]
    wanted = {(x, y) for x in peers for y in peers if x != y}
    rounds = probing.probe_rounds(peers, wanted)
    assert len(rounds) == 7
    for r in rounds:
        assert len({s for s, _ in r}) == len(r) == len({d for _, d in r})
    assert sorted(p for r in rounds for p in r) == sorted(wanted)
    # Only what is wanted, rounds with nothing wanted skipped.
    assert probing.probe_rounds(peers, {("p0", "p3")}) == [[("p0", "p3")]]


def test_single_peer_optimize_answers_at_once(run):
    (a,) = run.form(0)
    acts = run.send(a, type="optimize_topology", req=1)
    assert len(acts.solves) == 1
    _solve(run, acts.solves[0])
    info = run.take(a, "topology_info")[0]
    assert info["ring"] == [a] and info["feasible"] and not info["install"]


def test_passive_samples_reroute_a_degraded_ring_edge(run):
    from pccl.master.topology import propose_ring

    ids = run.form(0, 0, 0, 0)
    rates = {(x, y): 100e6 for x in ids for y in ids if x != y}
    _call_all(run, ids)
    _, solves = _drive(run, ids, rates)
    _solve(run, solves[0])
    ring = list(run.state.rings[0])
    assert 0 not in run.state.proposed_rings  # uniform: the join-order ring is optimal
    epoch = run.state.epoch
    a, b = ring[0], ring[1]
    # a -> b degrades to 10 MB/s: its op_done reports 1 MB over 0.1 s busy.
    acts = run.send(a, type="op_done", epoch=epoch, tag=0, seq=1, ok=True,
                    link_bytes=10**6, link_busy_ns=10**8)
    (req,) = acts.solves
    assert req.passive and req.current_ring == tuple(ring)
    assert run.state.topology.edges[(a, b)].source == probing.PASSIVE
    assert run.state.topology.edges[(a, b)].bytes_per_s < 60e6  # blended toward 10 MB/s
    # Too short a busy time says nothing; a second solve waits for the first.
    acts = run.send(b, type="op_done", epoch=epoch, tag=0, seq=1, ok=True,
                    link_bytes=10**3, link_busy_ns=10**6)
    assert acts.solves == []
    solution = propose_ring(list(req.current_ring), req.matrix)
    assert solution is not None
    run.apply(run.state.topology_solved(req, solution, run.now))
    assert ("reroute", None) in run.events
    new = run.state.proposed_rings[0]
    assert (a, b) not in {(x, new[(i + 1) % 4]) for i, x in enumerate(new)}
    run.vote_all(req=20)
    assert run.state.rings[0] == new and run.state.epoch == epoch + 1
