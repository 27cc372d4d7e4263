"""Broadcast, all-gather, reduce-scatter and barrier: real peers through
the master on 127.0.0.1, and StaticRing in one process.

Results are checked against numpy references computed from the inputs
(pccl.testing.peer_worker.make_input): broadcast and all-gather must be
bit-identical to the inputs on every peer; reduce-scatter equals the
float64 reduction within rounding.  A peer SIGKILLed while the others are
inside a collective (it withholds its part, so they certainly are) makes
every survivor raise PeerLostError within 2 s with its input unchanged;
the retry after update_topology() then succeeds among the survivors.
"""

from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest

import pccl
from pccl.testing.peer_worker import (
    ChildError,
    PeerProcess,
    PeerRun,
    digest,
    gather,
    join_all,
    make_input,
    request_all,
    send_all,
)

KILL_DEADLINE = 2.0


def _run(tmp_path) -> PeerRun:
    return PeerRun(str(tmp_path), heartbeat_timeout=2.0, heartbeat_interval=0.25,
                   vote_timeout=10.0)


def _by_rank(replies: list[dict]) -> dict[int, dict]:
    ranks = {r["rank"]: r for r in replies}
    assert sorted(ranks) == list(range(len(replies))), replies
    return ranks


def _check(kind: str, replies: list[dict], seed: int, n: int, **kw) -> None:
    """Every reply against the reference for the members that replied."""
    assert all(r["ok"] for r in replies), [r.get("message") for r in replies]
    ranks = _by_rank(replies)
    world = len(replies)
    assert {r["world"] for r in replies} == {world}
    index = [ranks[k]["index"] for k in range(world)]
    dtype = kw.get("dtype", "float32")
    if kind == "broadcast":
        want = digest(make_input(seed, index[kw.get("root", 0)], n, dtype))
        assert {r["hash"] for r in replies} == {want}
    elif kind == "all_gather":
        want = digest(np.concatenate([make_input(seed, i, n, dtype) for i in index]))
        assert {r["hash"] for r in replies} == {want}
    elif kind == "reduce_scatter":
        xs = np.stack([make_input(seed, i, world * n, dtype).astype(np.float64) for i in index])
        op = kw.get("op", "SUM")
        full = {"SUM": xs.sum(0), "AVG": xs.sum(0) / world, "MIN": xs.min(0),
                "MAX": xs.max(0), "PROD": xs.prod(0)}[op]
        if op == "AVG" and not dtype.startswith("float"):
            full = np.trunc(xs.sum(0) / world)
        for k, r in ranks.items():
            got = np.asarray(r["result"])
            ref = full[k * n:(k + 1) * n]
            if dtype.startswith("float"):
                tol = 2e-3 if kw.get("quantization", "NONE") == "NONE" else 0.1 * world
                np.testing.assert_allclose(got, ref, rtol=1e-4, atol=tol)
            else:
                np.testing.assert_array_equal(got, ref)
    for r in replies:
        assert r["x_unchanged_after"], r


def _join(run: PeerRun, world: int) -> list[PeerProcess]:
    """The peers, admitted, in ring order (rank = position in the list)."""
    peers = [run.peer(i) for i in range(world)]
    replies = join_all(peers, 60)
    rank_of = {p.index: r["rank"] for p, r in zip(peers, replies, strict=True)}
    return sorted(peers, key=lambda p: rank_of[p.index])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_collectives_match_references(tmp_path, world):
    cases = [
        ("broadcast", 1031, dict(root=world - 1)),
        ("broadcast", 3, dict(root=0, dtype="int64")),
        ("all_gather", 1031, {}),
        ("all_gather", 1, dict(dtype="int8")),
        ("reduce_scatter", 257, dict(op="SUM")),
        ("reduce_scatter", 1, dict(op="AVG")),
        ("reduce_scatter", 300, dict(op="MAX", dtype="int32")),
        ("reduce_scatter", 64, dict(op="SUM", quantization="UINT8_MINMAX")),
        ("barrier", 0, {}),
    ]
    if world == 8:
        cases = cases[::2]  # keep the 8-process run cheap
    with _run(tmp_path) as run:
        peers = _join(run, world)
        for seed, (kind, n, kw) in enumerate(cases):
            try:
                replies = request_all(peers, "collective", timeout=30, kind=kind, n=n,
                                      seed=seed, **kw)
            except ChildError as exc:
                tails = "\n".join(p.stderr_tail() for p in peers)
                raise AssertionError(f"{kind} n={n} {kw}: {exc}\n{tails}") from None
            if kind != "barrier":
                _check(kind, replies, seed, n, **kw)
            else:
                assert all(r["ok"] for r in replies)
        if world == 2:
            # Bad arguments: ValueError-derived pccl errors before any byte
            # moves; nothing is counted, so the next op still meets.
            for rep in request_all(peers, "collective_errors", timeout=30):
                for name, err in rep["raised"].items():
                    assert err is not None and err[1] and err[2], (name, err)
            replies = request_all(peers, "collective", timeout=30, kind="all_gather", n=5,
                                  seed=99)
            _check("all_gather", replies, 99, 5)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["broadcast", "all_gather", "reduce_scatter", "barrier"])
def test_sigkill_mid_collective(tmp_path, kind):
    world, victim_rank = 3, 1  # the broadcast's root (rank 0) survives
    n = 4096  # small: without the victim's part no survivor can finish anyway
    with _run(tmp_path) as run:
        peers = _join(run, world)
        victim = peers[victim_rank]
        survivors = [p for p in peers if p is not victim]
        kw = dict(root=0) if kind == "broadcast" else {}
        send_all(survivors, "collective", kind=kind, n=n, seed=7, retry=True, **kw)
        victim.send("collective", kind=kind, n=n, seed=7, withhold=True, **kw)
        for p in peers:
            p.wait_event("started", 30, seed=7)
        assert victim.reply(30)["withheld"]
        # Without the victim's part no survivor's collective can end.
        assert not any(p.replies.qsize() for p in survivors)
        t_kill = time.monotonic()
        victim.signal(signal.SIGKILL)
        replies = gather(survivors, 60, what=f"{kind} after SIGKILL")
        for r in replies:
            assert r["retries"] >= 1 and r["first_error"] == "PeerLostError", r
            assert r["t_error"] - t_kill < KILL_DEADLINE, (r["t_error"] - t_kill, r)
            if "x_unchanged" in r:
                assert r["x_unchanged"], r
        if kind == "broadcast":
            # the root (rank 0 of the old ring) kept its input
            (root,) = [r for r in replies if r["index"] == peers[0].index]
            assert root["x_unchanged"], root
        if kind != "barrier":
            _check(kind, replies, 7, n, **kw)
        else:
            assert {r["world"] for r in replies} == {2}


# ---------------------------------------------------------------------------
# StaticRing in one process: the same calls without a master, and argument
# errors before any byte moves.


def _static_rings(world: int) -> list[pccl.StaticRing]:
    rings = [pccl.StaticRing(r, world, p2p_connections=2) for r in range(world)]
    addrs = [r.address for r in rings]
    threads = [threading.Thread(target=r.connect, args=(addrs,), kwargs={"timeout": 20})
               for r in rings]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return rings


def _on_all(rings, fn) -> list:
    results: list = [None] * len(rings)

    def body(i):
        try:
            results[i] = fn(i, rings[i])
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            results[i] = exc

    threads = [threading.Thread(target=body, args=(i,)) for i in range(len(rings))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


@pytest.mark.timeout(60)
def test_static_ring_collectives_and_errors():
    world = 3
    rings = _static_rings(world)
    try:
        xs = [np.arange(10, dtype=np.float32) + 100 * r for r in range(world)]

        def bcast(i, ring):
            x = xs[i].copy()
            ring.broadcast_async(x, root=2).wait(20)
            return x

        for got in _on_all(rings, bcast):
            np.testing.assert_array_equal(got, xs[2])

        def gather_(i, ring):
            out = np.empty(world * 10, np.float32)
            ring.all_gather(xs[i], out)
            return out

        for got in _on_all(rings, gather_):
            np.testing.assert_array_equal(got, np.concatenate(xs))

        big = [np.arange(world * 5, dtype=np.int64) * (r + 1) for r in range(world)]

        def rs(i, ring):
            out = np.empty(5, np.int64)
            ring.reduce_scatter(big[i], out, op=pccl.ReduceOp.SUM)
            return out

        total = sum(big)
        for i, got in enumerate(_on_all(rings, rs)):
            np.testing.assert_array_equal(got, total[i * 5:(i + 1) * 5])
        _on_all(rings, lambda i, ring: ring.barrier(tag=3))

        r0 = rings[0]
        x = np.zeros(10, np.float32)
        bad = [
            lambda: r0.broadcast(x, root=3),
            lambda: r0.broadcast(x, root=-1),
            lambda: r0.all_gather(x, np.empty(29, np.float32)),
            lambda: r0.all_gather(x, np.empty(30, np.float64)),
            lambda: r0.reduce_scatter(np.zeros(31, np.float32), np.empty(10, np.float32)),
            lambda: r0.reduce_scatter(np.zeros(30, np.float32), np.empty(10, np.int32)),
            lambda: r0.reduce_scatter(np.zeros(30, np.int32), np.empty(10, np.int32),
                                      quantization=pccl.Quantization.UINT8_MINMAX),
        ]
        for call in bad:
            with pytest.raises(pccl.InvalidArgumentError) as info:
                call()
            assert isinstance(info.value, ValueError)
        # Nothing was sent: the ring still works.
        _on_all(rings, lambda i, ring: ring.barrier())
    finally:
        for r in rings:
            r.close()
