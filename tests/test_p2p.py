"""Point-to-point send/recv across processes through a real pccl-master:
``peers()`` content, a 256 MiB message and many small tagged messages in
both directions between peers that are not ring neighbours, usage errors
raised before any byte moves, and a peer SIGKILLed mid-transfer (the other
end raises within 2 s).  docs/p2p.md describes the protocol.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest

from pccl.testing.peer_worker import (
    PeerProcess,
    PeerRun,
    digest,
    gather,
    join_all,
    p2p_payload,
)

BIG = 256 << 20


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[tuple[PeerRun, list[PeerProcess], dict]]:
    """Four admitted peers (2 connections each) and their peers() views."""
    with PeerRun(
        str(tmp_path_factory.mktemp("p2p")),
        heartbeat_timeout=2.0,
        heartbeat_interval=0.25,
        vote_timeout=10.0,
    ) as run:
        peers = [run.peer(i) for i in range(4)]
        join_all(peers, 60)
        views = {p.index: p.request("peers", timeout=10) for p in peers}
        yield run, peers, views


def by_rank(peers: list[PeerProcess], views: dict) -> dict[int, tuple[PeerProcess, str]]:
    """rank -> (process, peer id)."""
    return {views[p.index]["rank"]: (p, views[p.index]["self"]) for p in peers}


def test_peers_lists_every_admitted_peer(world):
    _, peers, views = world
    ids = {v["self"] for v in views.values()}
    assert len(ids) == 4
    for p in peers:
        v = views[p.index]
        listed = {q["peer_id"]: q for q in v["peers"]}
        assert set(listed) == ids  # this peer included
        me = listed[v["self"]]
        assert me["name"] == f"peer{p.index}"
        assert me["rank"] == v["rank"]
        assert me["group"] == 0
        assert set(me["addresses"]) == {"default"}
        host, port = me["addresses"]["default"].rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
    # every peer sees the same table, with ranks 0..3
    tables = [sorted((q["peer_id"], q["rank"], q["name"]) for q in v["peers"])
              for v in views.values()]
    assert all(t == tables[0] for t in tables)
    assert sorted(q["rank"] for q in views[0]["peers"]) == [0, 1, 2, 3]


def test_big_and_many_small_between_non_neighbours(world):
    _, peers, views = world
    r = by_rank(peers, views)
    (p0, id0), (p2, id2) = r[0], r[2]  # not ring neighbours in a world of 4
    (p1, id1), (p3, id3) = r[1], r[3]
    # 0 -> 2: one 256 MiB message; 1 <-> 3: many small ones, tags 0..6
    # reused, sizes varied, interleaved in both directions.
    small = [(m % 7, (m * 977) % 5000, 1000 + m) for m in range(120)]
    ops = {
        p0: [{"op": "send", "peer": id2, "tag": 9, "n": BIG, "seed": 1}],
        p2: [{"op": "recv", "peer": id0, "tag": 9, "n": BIG, "seed": 1}],
        p1: [], p3: [],
    }
    for tag, n, seed in small:
        ops[p1].append({"op": "send", "peer": id3, "tag": tag, "n": n, "seed": seed})
        ops[p1].append({"op": "recv", "peer": id3, "tag": tag, "n": n, "seed": seed + 5000})
        ops[p3].append({"op": "recv", "peer": id1, "tag": tag, "n": n, "seed": seed})
        ops[p3].append({"op": "send", "peer": id1, "tag": tag, "n": n, "seed": seed + 5000})
    order = [p0, p1, p2, p3]
    for p in order:
        p.send("p2p", ops=ops[p], timeout=60)
    replies = dict(zip(order, gather(order, 120, what="p2p"), strict=True))
    for p in order:
        for op, res in zip(ops[p], replies[p]["results"], strict=True):
            assert res["ok"], (p.label, op, res)
            if op["op"] == "recv":
                assert res["hash"] == digest(p2p_payload(op["seed"], op["n"])), (p.label, op)


def test_usage_errors(world):
    _, peers, views = world
    p = peers[0]
    me = views[p.index]["self"]
    other = next(q["peer_id"] for q in views[p.index]["peers"] if q["peer_id"] != me)
    for peer, what in ((me, "oneself"), ("p999", "unknown peer")):
        reply = p.request("p2p", check=False,
                          ops=[{"op": "send", "peer": peer, "tag": 0, "n": 4, "seed": 0}])
        assert not reply["ok"] and reply["error"] == "InvalidArgumentError", (what, reply)
    # sizes that differ: both ends raise the ValueError-derived error
    q = next(x for x in peers if views[x.index]["self"] == other)
    p.send("p2p", ops=[{"op": "send", "peer": other, "tag": 3, "n": 100, "seed": 0}], timeout=10)
    q.send("p2p", ops=[{"op": "recv", "peer": me, "tag": 3, "n": 50, "seed": 0}], timeout=10)
    rp, rq = gather([p, q], 30, what="mismatched p2p")
    assert rp["results"][0]["error"] == "InvalidArgumentError", rp
    assert rq["results"][0]["error"] == "InvalidArgumentError", rq
    # and the pair works again afterwards
    p.send("p2p", ops=[{"op": "send", "peer": other, "tag": 3, "n": 100, "seed": 4}], timeout=10)
    q.send("p2p", ops=[{"op": "recv", "peer": me, "tag": 3, "n": 100, "seed": 4}], timeout=10)
    rp, rq = gather([p, q], 30, what="p2p after a mismatch")
    assert rp["results"][0]["ok"] and rq["results"][0]["ok"], (rp, rq)
    assert rq["results"][0]["hash"] == digest(p2p_payload(4, 100))


def test_peer_killed_mid_transfer(world):
    """Runs last in the module: it kills a peer of the shared world."""
    _, peers, views = world
    r = by_rank(peers, views)
    (victim, vid), (other, _) = r[1], r[3]
    # The victim withholds its part (it posts neither the send the other
    # end waits for nor the recv the other end's send needs), so both of the
    # other end's operations are certainly in flight when it dies; a 256 MiB
    # transfer that is merely large can finish first on a quiet machine.
    victim.send("p2p", ops=[], label="kill")
    other.send("p2p", ops=[{"op": "recv", "peer": vid, "tag": 1, "n": BIG, "seed": 2},
                           {"op": "send", "peer": vid, "tag": 2, "n": BIG, "seed": 3}],
               label="kill")
    victim.wait_event("started", 30, label="kill")
    other.wait_event("started", 30, label="kill")
    t_kill = time.monotonic()
    victim.signal(signal.SIGKILL)
    (reply,) = gather([other], 30, what="p2p after SIGKILL")
    results = reply["results"]
    assert all(not res["ok"] for res in results), results
    assert {res["error"] for res in results} == {"PeerLostError"}, results
    worst = max(res["t_error"] for res in results) - t_kill
    assert worst < 2.0, f"the other end raised {worst:.2f} s after the kill"
    # later calls to the lost peer fail at once, as PeerLostError
    deadline = time.monotonic() + 10
    while True:
        again = other.request("p2p", check=False, timeout=15,
                              ops=[{"op": "send", "peer": vid, "tag": 5, "n": 8, "seed": 0}])
        err = again.get("error") or again["results"][0].get("error")
        if err == "PeerLostError" or time.monotonic() > deadline:
            break
    assert err == "PeerLostError", again
