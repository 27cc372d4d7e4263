"""Peers that die or freeze in the middle of an all-reduce.

A SUM is started on every rank but the victim, which withholds its part
(it starts no operation, or the same one under another tag), so the
survivors are certainly mid-operation when, once all ranks report
"started", the parent sends the victim SIGKILL.  (The SIGSTOP test freezes
a peer whose operation runs.)  Every survivor's call must
fail quickly with a ConnectionError subclass (PeerLostError / AbortedError
/ RingBrokenError) and leave its input as it was, so the survivors can
rebuild a ring among themselves and reduce the same inputs again.
"""

from __future__ import annotations

import signal
import time

import pytest

from pccl.testing import RingCluster

KILL_DEADLINE = 2.0  # seconds from SIGKILL to every survivor's failure
ELEMENTS = 1 << 20  # 4 MiB of float32; the survivors cannot finish without the victim
FROZEN_ELEMENTS = 4 * 2**20  # 16 MiB: still running when SIGSTOP lands


def _survivors_rebuild_and_reduce(cluster: RingCluster, survivors: list[int]) -> None:
    """A new ring (epoch 1) among the survivors reduces the same inputs:
    proof that the failed call left them unchanged."""
    addrs = [cluster.addresses[r] for r in survivors]
    cluster.send({"cmd": "try_reduce"}, survivors)
    broken = cluster.gather(20, survivors, what="reply to try_reduce")
    for r, rep in broken.items():
        assert not rep["ok"] and rep["connection_error"], (
            f"rank {r}: an all-reduce on the broken ring gave {rep}"
        )
    for i, r in enumerate(survivors):
        cluster.send(
            {"cmd": "rebuild", "addresses": addrs, "rank": i, "epoch": 1, "timeout": 20}, [r]
        )
    cluster.gather(30, survivors, what="the rebuilt ring")
    replies = cluster.request(
        {"cmd": "reduce_again", "members": survivors}, timeout=60, ranks=survivors
    )
    for r, rep in replies.items():
        assert rep["error"] is None, f"rank {r} after rebuilding: {rep['error']}"
    assert len({rep["hash"] for rep in replies.values()}) == 1


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "world, victim, in_place, withhold",
    [
        (2, 1, True, "other_tag"),
        (3, 0, False, "other_tag"),
        (4, 2, True, "other_tag"),  # rank 0 is no neighbour of rank 2
        (4, 1, True, "never"),  # the victim dies before it joins the op
    ],
    ids=["world2", "world3-out-of-place", "world4-non-neighbour", "world4-victim-not-joined"],
)
def test_sigkill_mid_operation(world, victim, in_place, withhold):
    survivors = [r for r in range(world) if r != victim]
    with RingCluster(world, connections=4) as cluster:
        for r in range(world):
            cluster.send(
                {
                    "cmd": "inflight",
                    "elements": ELEMENTS,
                    "in_place": in_place,
                    **({"withhold": withhold} if r == victim else {}),
                    "timeout": 15,
                },
                [r],
            )
        started = cluster.gather(60, what="started")
        assert all(m["event"] == "started" for m in started.values()), started
        # Without the victim's part no survivor's operation can end: none has.
        assert not any(cluster.workers[r].replies.qsize() for r in survivors)
        t_kill = time.monotonic()
        cluster.kill(victim, signal.SIGKILL)
        outcomes = cluster.gather(30, survivors, what="the outcome of the op")
        report = {
            r: (
                f"{m.get('type')} after {m['t'] - t_kill:.3f} s: {m.get('message')}"
                if not m["ok"]
                else "succeeded"
            )
            for r, m in outcomes.items()
        }
        for r, m in outcomes.items():
            assert not m["ok"], (
                f"rank {r}'s op succeeded although rank {victim} was killed mid-operation: {report}"
            )
            assert m["connection_error"], f"rank {r}: not a ConnectionError: {report}"
            assert m["t"] - t_kill < KILL_DEADLINE, f"rank {r} failed too late: {report}"
            assert m["input_unchanged"], f"rank {r}'s input was modified: {report}"
        _survivors_rebuild_and_reduce(cluster, survivors)


@pytest.mark.timeout(120)
def test_sigstop_frozen_peer_times_out():
    """A stopped process's kernel keeps its sockets open: only the progress
    timeout detects it."""
    progress = 2.0
    world, victim = 3, 1
    survivors = [0, 2]
    with RingCluster(world, connections=2, progress_timeout=progress) as cluster:
        cluster.send({"cmd": "inflight", "elements": FROZEN_ELEMENTS, "timeout": 20})
        cluster.gather(60, what="started")
        t_stop = time.monotonic()
        cluster.kill(victim, signal.SIGSTOP)
        try:
            outcomes = cluster.gather(30, survivors, what="the outcome of the op")
        finally:
            cluster.kill(victim, signal.SIGKILL)
        for r, m in outcomes.items():
            assert not m["ok"], f"rank {r}: op succeeded with a frozen peer"
            assert m["timeout_error"] or m["connection_error"], m
            assert m["t"] - t_stop < progress + 2.0, (
                f"rank {r} failed {m['t'] - t_stop:.2f} s after SIGSTOP "
                f"(progress timeout {progress} s): {m}"
            )
            assert m["input_unchanged"], f"rank {r}'s input was modified"


@pytest.mark.timeout(120)
def test_mismatched_sizes_fail_cleanly():
    """Ranks disagreeing on the element count: frames out of range for one
    side.  Every rank gets an error (never a silent result), nobody
    crashes, and the ring can be rebuilt."""
    with RingCluster(2, connections=2, progress_timeout=3.0) as cluster:
        replies = cluster.request(
            {"cmd": "mismatch", "sizes": [1000, 3000], "timeout": 10}, timeout=30
        )
        for r, rep in replies.items():
            assert not rep["ok"], f"rank {r}: mismatched all-reduce succeeded: {rep}"
            assert rep["seconds"] < 10.0 + 1.0, rep
        cluster.request({"cmd": "ping"}, timeout=10)
        for r in range(2):
            cluster.send(
                {
                    "cmd": "rebuild",
                    "addresses": cluster.addresses,
                    "rank": r,
                    "epoch": 1,
                    "timeout": 20,
                },
                [r],
            )
        cluster.gather(30, what="the rebuilt ring")
        replies = cluster.request({"cmd": "big", "elements": 100_003}, timeout=60)
        assert all(rep["error"] is None for rep in replies.values()), replies
