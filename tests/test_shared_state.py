"""Shared state across processes: a joiner brought up to date, a flipped bit
repaired, a distributor SIGKILLed mid-transfer, every dtype and layout,
revision rules and strategies (one test each, error cases included).

Peers are ``pccl.testing.state_worker`` processes with a real
``pccl-master``; every wait is bounded and every process is killed in
teardown.  "Bit-identical" is checked twice: pccl's xxh3-128 and an
independent SHA-256 of each tensor's bytes must agree on every peer.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import numpy as np
import pytest

import pccl
from pccl.shared_state import hash_tensor, key_of
from pccl.testing.peer_worker import PeerRun, admit, gather, join_all, request_all
from pccl.testing.state_worker import StatePeer, make_tensor

# Every dtype and layout the issue names, a large tensor (striped across
# distributors) and empty ones.
MIXED = [
    {"name": "big", "kind": "float32", "n": 3 << 20, "seed": 1},
    {"name": "half", "kind": "float16", "n": 100_003, "seed": 2},
    {"name": "bf16", "kind": "torch_bf16", "n": 65_537, "seed": 3},
    {"name": "steps", "kind": "int64", "n": 1_001, "seed": 4},
    {"name": "unaligned", "kind": "unaligned_f32", "n": 77_777, "seed": 5},
    {"name": "empty", "kind": "float32", "n": 0, "seed": 6},
    {"name": "empty_bf16", "kind": "torch_bf16", "n": 0, "seed": 7},
]
SMALL = [
    {"name": "w", "kind": "float32", "n": 50_000, "seed": 11},
    {"name": "b", "kind": "float64", "n": 4_099, "seed": 12},
    {"name": "m", "kind": "torch_f32", "n": 20_000, "seed": 13},
]


def zeros(spec: list[dict]) -> list[dict]:
    return [dict(t, fill="zeros") for t in spec]


def nbytes(spec: list[dict], names=None) -> int:
    size = {"float32": 4, "float64": 8, "float16": 2, "int64": 8, "torch_bf16": 2,
            "unaligned_f32": 4, "torch_f32": 4}
    return sum(t["n"] * size[t["kind"]] for t in spec if names is None or t["name"] in names)


@pytest.fixture
def run(tmp_path) -> Iterator[PeerRun]:
    with PeerRun(
        str(tmp_path),
        StatePeer,
        heartbeat_timeout=3.0,
        heartbeat_interval=0.25,
        vote_timeout=20.0,
    ) as r:
        yield r


def start(run: PeerRun, n: int, spec: list[dict], revision: int = 1) -> list[StatePeer]:
    """``n`` admitted peers holding the same state at ``revision``."""
    peers = [run.peer(i) for i in range(n)]
    join_all(peers, timeout=60)
    request_all(peers, "make_state", tensors=spec, revision=revision)
    return peers


def sync(peers: list[StatePeer], check: bool = True, **per_peer) -> list[dict]:
    """One sync on every peer at once; ``per_peer[label]`` overrides the
    arguments of one peer."""
    for p in peers:
        p.send("sync", **per_peer.get(p.label, {}))
    return gather(peers, 120, check=check, what="sync")


def assert_identical(replies: list[dict]) -> None:
    first = replies[0]["digests"]
    for r in replies[1:]:
        assert r["digests"] == first, "shared state differs between peers"
    for d in first.values():  # the two hashes agree with each other too
        assert len(d["xxh3"]) == 32 and len(d["sha256"]) == 64


def test_in_sync_peers_move_nothing_and_a_joiner_gets_everything(run, record_property):
    peers = start(run, 3, MIXED)
    replies = sync(peers)
    assert [(r["tx_bytes"], r["rx_bytes"]) for r in replies] == [(0, 0)] * 3
    assert {r["info_revision"] for r in replies} == {2}
    assert_identical(replies)

    joiner = run.peer(3)
    assert admit(peers, joiner)["ok"]
    joiner.request("make_state", tensors=zeros(MIXED), revision=0)
    replies = sync(peers + [joiner], **{joiner.label: {"bump": False}})
    assert_identical(replies)
    *old, new = replies
    total = nbytes(MIXED) - nbytes(MIXED, {"empty", "empty_bf16"})
    assert new["rx_bytes"] == total and new["tx_bytes"] == 0
    assert new["revision"] == new["info_revision"] == 3  # the outdated joiner caught up
    assert all(r["rx_bytes"] == 0 for r in old)
    assert sum(r["tx_bytes"] for r in old) == total
    # The big tensor was striped: every distributor served part of it.
    assert all(r["tx_bytes"] > 0 for r in old), [r["tx_bytes"] for r in old]
    record_property("joiner_sync_s", new["seconds"])

    # Everyone in sync now: one more round moves nothing.
    replies = sync(peers + [joiner])
    assert [(r["tx_bytes"], r["rx_bytes"]) for r in replies] == [(0, 0)] * 4
    assert {r["revision"] for r in replies} == {4}
    assert_identical(replies)


def test_a_flipped_bit_is_repaired_and_only_that_tensor_moves(run):
    peers = start(run, 3, SMALL)
    sync(peers)
    before = peers[1].request("digests")["digests"]
    after = peers[1].request("flip", name="b", byte=1234, bit=5)["digests"]
    assert after["b"] != before["b"] and after["w"] == before["w"]
    replies = sync(peers)
    assert_identical(replies)
    assert replies[0]["digests"]["b"] == before["b"]
    assert replies[1]["rx_bytes"] == nbytes(SMALL, {"b"})  # that tensor, nothing else
    assert replies[0]["rx_bytes"] == replies[2]["rx_bytes"] == 0
    assert replies[0]["tx_bytes"] + replies[2]["tx_bytes"] == nbytes(SMALL, {"b"})


def test_joiner_completes_when_a_distributor_is_killed_mid_transfer(run):
    spec = [
        {"name": "a", "kind": "float32", "n": 32 << 20, "seed": 21},  # 128 MiB
        {"name": "b", "kind": "float32", "n": 16 << 20, "seed": 22},  # 64 MiB
    ]
    peers = start(run, 3, spec)
    joiner = run.peer(3)
    assert admit(peers, joiner)["ok"]
    joiner.request("make_state", tensors=zeros(spec), revision=0)
    for p in peers:
        p.send("sync")
    joiner.send("sync", bump=False, pause_after_first_chunk=True)
    joiner.wait_event("chunk", 120)
    victim = peers[1]
    victim.signal(signal.SIGKILL)
    victim.proc.wait(10)
    joiner.send("go")  # any line releases the paused fetch threads
    survivors = [peers[0], peers[2]]
    replies = gather(survivors + [joiner], 120, what="sync after SIGKILL")
    assert_identical(replies)
    assert replies[-1]["revision"] == 2
    # Bytes the victim sent before dying plus what the others re-sent.
    assert replies[-1]["rx_bytes"] >= nbytes(spec)


def test_revision_ahead_of_the_run_is_refused_and_can_be_retried(run):
    peers = start(run, 2, SMALL, revision=5)
    sync(peers)  # the group is at revision 6
    replies = sync(peers, check=False, **{peers[1].label: {"revision": 9}})
    assert replies[0]["ok"] and replies[0]["revision"] == 7
    assert not replies[1]["ok"] and replies[1]["error"] == "StateError"
    assert "ahead of the run" in replies[1]["message"] and "expects 7" in replies[1]["message"]
    # The refused peer retries with the right revision at the next sync.
    replies = sync(peers, **{peers[1].label: {"revision": 8}})
    assert {r["revision"] for r in replies} == {8}
    assert_identical(replies)


def test_outdated_peer_is_brought_up_to_date(run):
    peers = start(run, 3, SMALL)
    sync(peers)
    peers[2].request("set_tensor", name="w", kind="float32", n=50_000, seed=99)
    # peers[2] did not advance its revision: it is outdated, so its content
    # does not vote even where it differs, and it ends at the group's revision.
    replies = sync(peers, **{peers[2].label: {"bump": False}})
    assert_identical(replies)
    assert replies[2]["rx_bytes"] == nbytes(SMALL, {"w"})
    assert {r["revision"] for r in replies} == {3}


def test_receive_only_peers_never_vote_or_send(run):
    peers = start(run, 3, SMALL)
    sync(peers)
    # Two RECEIVE_ONLY peers hold other content: a majority that must not win.
    for p in peers[1:]:
        p.request("set_tensor", name="w", kind="float32", n=50_000, seed=77)
    want = peers[0].request("digests")["digests"]
    replies = sync(peers, **{p.label: {"strategy": "RECEIVE_ONLY"} for p in peers[1:]})
    assert_identical(replies)
    assert replies[0]["digests"] == want
    assert [r["tx_bytes"] for r in replies[1:]] == [0, 0]
    assert [r["rx_bytes"] for r in replies] == [0] + [nbytes(SMALL, {"w"})] * 2


def test_all_receive_only_is_refused(run):
    peers = start(run, 2, SMALL)
    replies = sync(peers, check=False, **{p.label: {"strategy": "RECEIVE_ONLY"} for p in peers})
    assert all(not r["ok"] and r["error"] == "StateError" for r in replies)
    assert all("RECEIVE_ONLY" in r["message"] for r in replies)
    replies = sync(peers)  # nothing stuck: a normal sync works next
    assert_identical(replies)


def test_send_only_content_wins_and_disagreeing_send_only_is_refused(run):
    peers = start(run, 3, SMALL)
    sync(peers)
    peers[0].request("set_tensor", name="w", kind="float32", n=50_000, seed=55)
    want = peers[0].request("digests")["digests"]
    # One SEND_ONLY peer against a majority: its content is the group's.
    replies = sync(peers, **{peers[0].label: {"strategy": "SEND_ONLY"}})
    assert_identical(replies)
    assert replies[0]["digests"] == want and replies[0]["rx_bytes"] == 0
    assert replies[1]["rx_bytes"] == replies[2]["rx_bytes"] == nbytes(SMALL, {"w"})

    # Two SEND_ONLY peers that disagree on 'b': a tie, which the
    # earlier-joined one wins; the other is refused (it may not receive).
    peers[1].request("set_tensor", name="b", kind="float64", n=4_099, seed=66)
    replies = sync(peers, check=False, **{p.label: {"strategy": "SEND_ONLY"} for p in peers[:2]})
    refused = [r for r in replies[:2] if not r["ok"]]
    assert len(refused) == 1 and refused[0]["error"] == "StateError"
    assert "SEND_ONLY" in refused[0]["message"] and "'b'" in refused[0]["message"]
    winner = next(r for r in replies[:2] if r["ok"])
    assert replies[2]["ok"] and replies[2]["digests"] == winner["digests"]


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"cmd": "set_tensor", "name": "b", "kind": "float32", "n": 4_099}, "tensor 'b': dtype"),
        ({"cmd": "set_tensor", "name": "b", "kind": "float64", "n": 4_098}, "tensor 'b': shape"),
        ({"cmd": "drop_tensor", "name": "m"}, "tensor 'm' is missing"),
        ({"cmd": "set_tensor", "name": "extra", "kind": "int8", "n": 3}, "tensor 'extra' is not"),
    ],
    ids=["dtype", "shape", "missing", "extra"],
)
def test_schema_mismatch_names_the_tensor(run, change, needle):
    peers = start(run, 3, SMALL)
    sync(peers)
    change = dict(change)
    peers[2].request(change.pop("cmd"), **change)
    replies = sync(peers, check=False)
    assert replies[0]["ok"] and replies[1]["ok"]
    assert not replies[2]["ok"] and replies[2]["error"] == "InvalidArgumentError"
    assert needle in replies[2]["message"], replies[2]["message"]


# --------------------------------------------------------------------------
# In-process: hashing every dtype and layout without copying.


def test_hash_is_over_the_bytes_for_every_dtype_and_layout():
    torch = pytest.importorskip("torch")
    x = np.arange(1000, dtype=np.float32)
    raw = bytearray(4001)
    view = np.frombuffer(raw, dtype=np.float32, count=1000, offset=1)
    view[:] = x
    assert view.ctypes.data % 4 == 1
    assert hash_tensor(view) == hash_tensor(x) == hash_tensor(torch.from_numpy(x))
    bf = make_tensor("torch_bf16", 513, "seed", 1)
    assert hash_tensor(bf) == hash_tensor(bf.view(torch.int16).numpy())
    h16 = make_tensor("float16", 513, "seed", 1)
    assert hash_tensor(h16) == hash_tensor(h16.view(np.uint8))
    assert hash_tensor(np.zeros(0, np.float32)) == hash_tensor(torch.zeros(0, dtype=torch.bfloat16))
    flipped = x.copy()
    flipped.view(np.uint8)[17] ^= 1
    assert hash_tensor(flipped) != hash_tensor(x)
    assert key_of(hash_tensor(x)) != key_of(hash_tensor(flipped))
    with pytest.raises(pccl.InvalidArgumentError):
        hash_tensor(x[::2])  # not contiguous


def test_shared_state_validates_its_arguments():
    with pytest.raises(pccl.InvalidArgumentError):
        pccl.SharedState({"w": np.zeros(3)}, revision=-1)
    with pytest.raises(pccl.InvalidArgumentError):
        pccl.SharedState({1: np.zeros(3)})
    with pytest.raises(pccl.InvalidArgumentError):
        pccl.SharedState([np.zeros(3)])
    s = pccl.SharedState({"w": np.zeros(3)}, revision=4)
    assert s.revision == 4 and list(s.tensors) == ["w"]
