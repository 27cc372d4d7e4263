"""pccl.Communicator in this process: the API, outcome agreement, and every
way the master connection can fail (unreachable, killed, frozen, scripted
misbehaviour).  Multi-process membership and chaos tests are in
test_membership.py.

Communicators run in threads of this process (collectives release the
GIL); the master is a real ``pccl-master`` subprocess, or a scripted fake
speaking the wire protocol for the cases a real master never produces.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

import pccl
from pccl import _wire as protocol
from pccl.testing.peer_worker import MasterProcess

HEARTBEAT_TIMEOUT = 1.5
HEARTBEAT_INTERVAL = 0.25
VOTE_TIMEOUT = 5.0


# --------------------------------------------------------------------------
# Fixtures and helpers.


@pytest.fixture
def master(tmp_path) -> Iterator[MasterProcess]:
    with MasterProcess(
        str(tmp_path),
        heartbeat_timeout=HEARTBEAT_TIMEOUT,
        heartbeat_interval=HEARTBEAT_INTERVAL,
        vote_timeout=VOTE_TIMEOUT,
    ) as m:
        yield m  # killed on exit (SIGKILL also ends a stopped master)


@pytest.fixture
def comms() -> Iterator[list[pccl.Communicator]]:
    """A list the test appends communicators to; all closed afterwards."""
    made: list[pccl.Communicator] = []
    try:
        yield made
    finally:
        for c in made:
            c.close()


def parallel(fns: list[Callable[[], object]], timeout: float = 60.0) -> list:
    """Run each function in its own thread; return results (or raise the
    first exception).  Bounded: a stuck call fails the test."""
    with concurrent.futures.ThreadPoolExecutor(len(fns)) as pool:
        futures = [pool.submit(f) for f in fns]
        done, stuck = concurrent.futures.wait(futures, timeout=timeout)
        if stuck:
            pytest.fail(f"{len(stuck)} calls still running after {timeout} s")
        return [f.result() for f in futures]


def outcomes(fns: list[Callable[[], object]], timeout: float = 60.0) -> list:
    """Like :func:`parallel`, but each item is the result or the exception."""

    def wrap(f):
        def run():
            try:
                return f()
            except Exception as exc:
                return exc

        return run

    return parallel([wrap(f) for f in fns], timeout)


def join_all(comms_: list[pccl.Communicator], timeout: float = 30.0) -> None:
    """Connect every communicator and vote until all are admitted."""
    n = len(comms_)

    def run(c: pccl.Communicator) -> None:
        c.connect(timeout=timeout)
        deadline = time.monotonic() + timeout
        while c.world_size != n:
            assert time.monotonic() < deadline, f"world {c.world_size} != {n}"
            c.update_topology(timeout=timeout)

    parallel([lambda c=c: run(c) for c in comms_], timeout + 10)


def make_comms(master: MasterProcess, comms_: list, n: int, **kwargs) -> list[pccl.Communicator]:
    new = [pccl.Communicator(master.address, p2p_connections=2, **kwargs) for _ in range(n)]
    comms_.extend(new)
    return new


# --------------------------------------------------------------------------
# The happy path against a real master.


def test_single_peer_is_admitted_at_once(master, comms):
    (c,) = make_comms(master, comms, 1)
    c.connect(timeout=10)
    assert (c.world_size, c.group_world_size, c.rank) == (1, 1, 0)
    assert not c.are_peers_pending()
    x = np.arange(10, dtype=np.float32)
    info = c.all_reduce(x)
    assert info.world_size == 1
    np.testing.assert_array_equal(x, np.arange(10, dtype=np.float32))
    out = np.empty_like(x)
    c.all_reduce(x, out=out, op=pccl.ReduceOp.MAX, tag=3)
    np.testing.assert_array_equal(out, x)
    c.update_topology()  # a vote with nobody pending changes nothing
    assert c.epoch is not None and c.world_size == 1


def test_two_peers_reduce_bit_identically(master, comms):
    a, b = make_comms(master, comms, 2)
    join_all([a, b])
    assert a.world_size == b.world_size == 2
    assert {a.rank, b.rank} == {0, 1}
    xa = np.random.default_rng(1).standard_normal(100_003).astype(np.float32)
    xb = np.random.default_rng(2).standard_normal(100_003).astype(np.float32)
    expected = xa + xb  # two addends: exact in any order
    ya, yb = xa.copy(), xb.copy()
    infos = parallel([lambda: a.all_reduce(ya), lambda: b.all_reduce(yb)])
    assert [i.world_size for i in infos] == [2, 2]
    assert ya.tobytes() == yb.tobytes() == expected.tobytes()
    # out= leaves x alone
    oa, ob = np.empty_like(xa), np.empty_like(xb)
    parallel(
        [
            lambda: a.all_reduce(xa, out=oa, op=pccl.ReduceOp.MIN),
            lambda: b.all_reduce(xb, out=ob, op=pccl.ReduceOp.MIN),
        ]
    )
    assert oa.tobytes() == ob.tobytes() == np.minimum(xa, xb).tobytes()


def test_async_handles_and_many(master, comms):
    a, b = make_comms(master, comms, 2)
    join_all([a, b])

    def run_async(c: pccl.Communicator, seed: int):
        xs = [np.full(1000 * (t + 1), seed + t, dtype=np.float64) for t in range(3)]
        handles = [c.all_reduce_async(x, tag=t) for t, x in enumerate(xs)]
        infos = [h.wait() for h in reversed(handles)]  # any order
        assert all(h.done() for h in handles)
        assert handles[0].wait() == infos[-1]  # wait again: same result
        return xs

    xs_a, xs_b = parallel([lambda: run_async(a, 1), lambda: run_async(b, 10)])
    for t in range(3):
        assert np.all(xs_a[t] == 11 + 2 * t) and xs_a[t].tobytes() == xs_b[t].tobytes()

    # max_in_flight equal to and above the number of ops (PCCL v1 hung there).
    for max_in_flight in (1, 5, 64):
        ta = [np.full(257, i, dtype=np.float32) for i in range(5)]
        tb = [np.full(257, 2 * i, dtype=np.float32) for i in range(5)]
        ra, rb = parallel(
            [
                lambda ta=ta, m=max_in_flight: a.all_reduce_many(ta, max_in_flight=m),
                lambda tb=tb, m=max_in_flight: b.all_reduce_many(tb, max_in_flight=m),
            ]
        )
        assert len(ra) == len(rb) == 5
        for i in range(5):
            assert np.all(ta[i] == 3 * i) and ta[i].tobytes() == tb[i].tobytes()
    with pytest.raises(pccl.InvalidArgumentError):
        a.all_reduce_many(ta, max_in_flight=0)


def test_torch_tensors(master, comms):
    torch = pytest.importorskip("torch")
    a, b = make_comms(master, comms, 2)
    join_all([a, b])
    ta = torch.arange(64, dtype=torch.bfloat16)
    tb = torch.ones(64, dtype=torch.bfloat16)
    parallel([lambda: a.all_reduce(ta), lambda: b.all_reduce(tb)])
    assert torch.equal(ta, tb)
    assert torch.equal(ta, torch.arange(64, dtype=torch.bfloat16) + 1)


def test_close_is_idempotent_and_leaves_cleanly(master, comms):
    a, b = make_comms(master, comms, 2)
    join_all([a, b])
    with b:
        pass  # the context manager closes
    b.close()
    with pytest.raises(pccl.ClosedError):
        b.all_reduce(np.ones(4, dtype=np.float32))
    with pytest.raises(pccl.ClosedError):
        b.connect()
    # The survivor is told nothing failed; its next vote drops b.
    a.update_topology(timeout=10)
    assert a.world_size == 1
    x = np.ones(4, dtype=np.float32)
    assert a.all_reduce(x).world_size == 1


def test_usage_errors_are_value_errors(master, comms):
    (c,) = make_comms(master, comms, 1)
    with pytest.raises(pccl.StateError):
        c.all_reduce(np.ones(4, dtype=np.float32))
    c.connect(timeout=10)
    with pytest.raises(ValueError):
        c.all_reduce([1.0, 2.0])
    with pytest.raises(ValueError):
        c.all_reduce(np.ones(4, dtype=np.float32), tag=-1)
    with pytest.raises(ValueError):
        c.all_reduce(np.ones(4, dtype=np.float32), out=np.ones(5, dtype=np.float32))
    # The communicator still works afterwards.
    assert c.all_reduce(np.ones(4, dtype=np.float32)).world_size == 1
    with pytest.raises(pccl.AddressError):
        pccl.Communicator("no-port")


# --------------------------------------------------------------------------
# The master connection failing.


def test_unreachable_master_raises_quickly(comms):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    c = pccl.Communicator(f"127.0.0.1:{port}")
    comms.append(c)
    t0 = time.monotonic()
    with pytest.raises(pccl.MasterConnectionError) as info:
        c.connect(timeout=5)
    assert isinstance(info.value, ConnectionError)
    assert time.monotonic() - t0 < 5


def test_silent_listener_times_out(comms):
    """A port that accepts but never says a word (not a master)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        c = pccl.Communicator(f"127.0.0.1:{s.getsockname()[1]}", connect_timeout=1.0)
        comms.append(c)
        t0 = time.monotonic()
        with pytest.raises(pccl.MasterConnectionError):
            c.connect()
        assert time.monotonic() - t0 < 3


def test_killed_master_fails_every_call(master, comms):
    (c,) = make_comms(master, comms, 1)
    c.connect(timeout=10)
    master.signal(signal.SIGKILL)
    master.proc.wait(timeout=10)
    t0 = time.monotonic()
    with pytest.raises(pccl.MasterConnectionError):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until the link notices the close
            c.all_reduce(np.ones(4, dtype=np.float32))
    assert time.monotonic() - t0 < 5
    with pytest.raises(ConnectionError):
        c.are_peers_pending()
    with pytest.raises(ConnectionError):
        c.update_topology()


def test_frozen_master_is_detected_within_heartbeat_timeout(master, comms):
    (c,) = make_comms(master, comms, 1)
    c.connect(timeout=10)
    master.signal(signal.SIGSTOP)
    t0 = time.monotonic()
    with pytest.raises(pccl.MasterConnectionError) as info:
        c.all_reduce(np.ones(4, dtype=np.float32))
    elapsed = time.monotonic() - t0
    assert elapsed < HEARTBEAT_TIMEOUT + 2 * HEARTBEAT_INTERVAL + 0.5, elapsed
    assert "no message from the master" in str(info.value)


def test_connect_times_out_while_pending(master, comms):
    a, b = make_comms(master, comms, 2)
    a.connect(timeout=10)
    t0 = time.monotonic()
    with pytest.raises(pccl.PcclTimeoutError):
        b.connect(timeout=0.5)  # a never votes, so b stays pending
    assert time.monotonic() - t0 < 2
    assert not a.are_peers_pending()  # b left again


# --------------------------------------------------------------------------
# Authentication.


@pytest.fixture
def secret_master(tmp_path) -> Iterator[MasterProcess]:
    path = tmp_path / "secret"
    path.write_bytes(b"correct horse battery staple")
    os.chmod(path, 0o600)
    with MasterProcess(str(tmp_path), extra=["--secret-file", str(path)]) as m:
        yield m


def test_shared_secret(secret_master, comms):
    good = pccl.Communicator(secret_master.address, secret="correct horse battery staple")
    wrong = pccl.Communicator(secret_master.address, secret="wrong")
    none = pccl.Communicator(secret_master.address)
    comms.extend([good, wrong, none])
    with pytest.raises(pccl.AuthenticationError):
        wrong.connect(timeout=10)
    with pytest.raises(pccl.AuthenticationError):
        none.connect(timeout=10)
    good.connect(timeout=10)
    assert good.world_size == 1


def test_peer_with_secret_refuses_open_master(master, comms):
    c = pccl.Communicator(master.address, secret="s3cret")
    comms.append(c)
    with pytest.raises(pccl.AuthenticationError):
        c.connect(timeout=10)


# --------------------------------------------------------------------------
# A scripted master, for verdicts a real one gives only under races.


def _solo_topology(req: int | None, epoch: int) -> dict:
    """A topology message for a world of one (peer "p1")."""
    return {
        "type": "topology",
        "req": req,
        "epoch": epoch,
        "changed": True,
        "rank": 0,
        "world_size": 1,
        "group_world_size": 1,
        "next": None,
        "ring": ["p1"],
    }


class FakeMaster:
    """Speaks the master side of docs/protocol.md for one peer, from a
    thread: admits it alone in a world of one, acks heartbeats, and answers
    each op_done with the next verdict of ``verdicts`` (then ok)."""

    def __init__(self, verdicts=(), on_op_done: str = "reply"):
        self.verdicts = list(verdicts)
        self.on_op_done = on_op_done  # "reply", "evict", "close", "ignore" or "hold"
        self.received: list[dict] = []
        self.held: list[tuple[socket.socket, dict]] = []  # op_done kept by "hold"
        self.send_lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.error: BaseException | None = None
        self.thread.start()

    def _send(self, sock, msg):
        with self.send_lock:
            sock.sendall(protocol.encode(msg))

    def _outcome(self, sock, msg, ok: bool = True):
        self._send(
            sock,
            {"type": "op_outcome", "epoch": msg["epoch"], "tag": msg["tag"],
             "seq": msg["seq"], "ok": ok},
        )

    def release(self):
        """Answer the op_done messages "hold" kept (ok), from the caller's thread."""
        held, self.held = self.held, []
        for sock, msg in held:
            self._outcome(sock, msg)

    def _recv(self, sock, buf: bytearray) -> dict | None:
        while True:
            if len(buf) >= 4:
                (n,) = protocol.HEADER.unpack_from(buf)
                if len(buf) >= 4 + n:
                    msg = protocol.validate(
                        protocol.decode(bytes(buf[4 : 4 + n])), protocol.TO_MASTER
                    )
                    del buf[: 4 + n]
                    self.received.append(msg)
                    return msg
            chunk = sock.recv(65536)
            if not chunk:
                return None
            buf += chunk

    def _serve(self):
        try:
            sock, _ = self.listener.accept()
            with sock:
                sock.settimeout(30)
                buf = bytearray()
                self._send(
                    sock,
                    {
                        "type": "challenge",
                        "version": 1,
                        "nonce": protocol.new_nonce(),
                        "auth": False,
                    },
                )
                self._recv(sock, buf)
                self._send(
                    sock,
                    {
                        "type": "welcome",
                        "peer_id": "p1",
                        "mac": b"",
                        "heartbeat_interval": 0.2,
                        "heartbeat_timeout": 2.0,
                    },
                )
                self._send(sock, _solo_topology(None, 1))
                while (msg := self._recv(sock, buf)) is not None:
                    kind = msg["type"]
                    if kind == "heartbeat":
                        self._send(sock, {"type": "heartbeat_ack"})
                    elif kind == "ring_ready":
                        self._send(
                            sock, {"type": "topology_ready", "epoch": msg["epoch"], "ok": True}
                        )
                    elif kind == "update_topology":
                        self._send(sock, _solo_topology(msg["req"], 2))
                    elif kind == "op_done":
                        if self.on_op_done == "evict":
                            self._send(sock, {"type": "evicted", "reason": "scripted"})
                            return
                        if self.on_op_done == "close":
                            return
                        if self.on_op_done == "ignore":
                            continue
                        if self.on_op_done == "hold":
                            self.held.append((sock, msg))
                            continue
                        ok = self.verdicts.pop(0) if self.verdicts else True
                        self._send(
                            sock,
                            {
                                "type": "op_outcome",
                                "epoch": msg["epoch"],
                                "tag": msg["tag"],
                                "seq": msg["seq"],
                                "ok": ok,
                            },
                        )
                    elif kind == "leave":
                        return
        except BaseException as exc:  # reported by the test
            self.error = exc

    def close(self):
        self.listener.close()
        self.thread.join(timeout=10)


@pytest.fixture
def fake_master():
    made = []

    def make(**kwargs) -> FakeMaster:
        made.append(FakeMaster(**kwargs))
        return made[-1]

    yield make
    for m in made:
        m.close()


def test_in_place_input_is_unchanged_when_the_master_rules_failure(fake_master, comms):
    """The ring succeeded locally, but the master says another member
    failed: x must keep its old values (PCCL v1 left the result in it)."""
    fm = fake_master(verdicts=[False])
    c = pccl.Communicator(fm.address)
    comms.append(c)
    c.connect(timeout=10)
    x = np.arange(1000, dtype=np.float32)
    before = x.copy()
    assert c.epoch == 1
    with pytest.raises(pccl.PeerLostError):
        c.all_reduce(x, op=pccl.ReduceOp.AVG)
    assert x.tobytes() == before.tobytes()
    assert c.epoch is None  # no working ring until update_topology (not the stale 1)
    assert [m["ring_ok"] for m in fm.received if m["type"] == "update_topology"] == []
    c.update_topology(timeout=10)  # reports the broken ring, gets epoch 2
    assert fm.received[-2]["type"] == "update_topology" and not fm.received[-2]["ring_ok"]
    assert c.epoch == 2
    c.all_reduce(x)
    assert x.tobytes() == before.tobytes()  # world of one: the sum is x
    seqs = [(m["epoch"], m["tag"], m["seq"]) for m in fm.received if m["type"] == "op_done"]
    assert seqs == [(1, 0, 0), (2, 0, 0)]  # seq restarts with the ring
    assert fm.error is None


def test_seq_counts_per_tag(fake_master, comms):
    fm = fake_master()
    c = pccl.Communicator(fm.address)
    comms.append(c)
    c.connect(timeout=10)
    x = np.ones(8, dtype=np.float32)
    for tag in (0, 0, 5, 0, 5):
        c.all_reduce(x, tag=tag)
    c.all_reduce_many([x.copy(), x.copy()])
    seqs = [(m["tag"], m["seq"]) for m in fm.received if m["type"] == "op_done"]
    assert seqs == [(0, 0), (0, 1), (5, 0), (0, 2), (5, 1), (0, 3), (1, 0)]


@pytest.mark.parametrize("how", ["evict", "close"])
def test_eviction_and_lost_master_during_an_operation(fake_master, comms, how):
    fm = fake_master(on_op_done=how)
    c = pccl.Communicator(fm.address)
    comms.append(c)
    c.connect(timeout=10)
    x = np.ones(8, dtype=np.float32)
    cls = pccl.EvictedError if how == "evict" else pccl.MasterConnectionError
    with pytest.raises(cls) as info:
        c.all_reduce(x)
    assert isinstance(info.value, ConnectionError) and isinstance(info.value, pccl.PcclError)
    assert np.all(x == 1)
    with pytest.raises(cls):
        c.all_reduce(x)  # every later call too, until connect() again


def test_silent_master_bounds_the_outcome_wait(fake_master, comms):
    """The master acks heartbeats until op_done, then says nothing at all
    (its thread stops reading): the wait ends after the heartbeat timeout."""
    fm = fake_master(on_op_done="ignore")
    c = pccl.Communicator(fm.address)
    comms.append(c)
    c.connect(timeout=10)
    _freeze_fake(fm)
    t0 = time.monotonic()
    with pytest.raises(pccl.MasterConnectionError):
        c.all_reduce(np.ones(8, dtype=np.float32))
    assert time.monotonic() - t0 < 2.0 + 1.0  # the fake's heartbeat timeout is 2 s


def _freeze_fake(fm: FakeMaster) -> None:
    """Make the fake stop answering anything (it keeps the socket open)."""
    original = fm._send

    def silent(sock, msg):
        if msg["type"] in ("heartbeat_ack", "op_outcome"):
            return
        original(sock, msg)

    fm._send = silent  # type: ignore[method-assign]


def test_handle_wait_timeout_names_the_step_and_keeps_the_operation(fake_master, comms):
    """One handle type on both sides; a wait() that times out says which
    step it was in and after how long, and a later wait() still completes."""
    fm = fake_master(on_op_done="hold")
    c = pccl.Communicator(fm.address)
    comms.append(c)
    c.connect(timeout=10)
    x = np.arange(8, dtype=np.float32)
    before = x.copy()
    h = c.all_reduce_async(x)
    assert isinstance(h, pccl.ReduceHandle)
    for _ in range(2):
        with pytest.raises(pccl.PcclTimeoutError) as ei:
            h.wait(timeout=0.2)
        assert "verdict" in str(ei.value) and "0.2 s" in str(ei.value), str(ei.value)
        assert not h.done()
    deadline = time.monotonic() + 10
    while not fm.held and time.monotonic() < deadline:
        time.sleep(0.01)  # the fake's thread files the op_done it read
    assert fm.held
    fm.release()
    info = h.wait(timeout=10)
    assert info.world_size == 1 and h.done()
    assert x.tobytes() == before.tobytes()
    assert [m["type"] for m in fm.received].count("op_done") == 1  # reported once
    with pytest.raises(TypeError):
        c.all_reduce(x, None, pccl.ReduceOp.SUM)  # op is keyword-only


def test_finaliser_does_not_block_on_the_network(fake_master):
    """__del__ never says leave nor drains the socket: it closes it."""
    fm = fake_master()
    c = pccl.Communicator(fm.address)
    c.connect(timeout=10)
    t0 = time.monotonic()
    c.__del__()
    took = time.monotonic() - t0
    fm.thread.join(timeout=10)  # the fake sees the close and returns
    assert not fm.thread.is_alive()
    assert "leave" not in [m["type"] for m in fm.received]
    assert took < 0.9, took  # close() may drain the socket for up to 1 s
    c.close()  # then idempotent
