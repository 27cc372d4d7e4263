"""The user-space link emulator (pccl.testing.linkemu): delay, window/RTT,
shared link rate, drop, black hole, and a pccl ring through it.

Rates are measured over about a second, so the bounds are loose enough for
a shared 2-CPU machine yet tight enough to catch a wrong model (a window
released after one-way delay instead of RTT would double the rate; a
per-connection instead of a shared bucket would multiply it by the flow
count)."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from pccl.testing.linkemu import (
    LinkEmulator,
    LoopbackServer,
    Sink,
    measure_flows,
    parse_address,
    ring_addresses,
)

pytestmark = pytest.mark.timeout(120)


class EchoServer(LoopbackServer):
    """Echoes every byte back; closes its side after the client's EOF."""

    RECV_BYTES = 65536

    def on_data(self, conn: socket.socket, index: int, data: bytes) -> None:
        conn.sendall(data)


@pytest.fixture
def echo():
    srv = EchoServer()
    yield srv
    srv.close()


@pytest.fixture
def sink():
    with Sink() as s:
        yield s


def _dial(front: str) -> socket.socket:
    s = socket.create_connection(parse_address(front), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _recv_exactly(s: socket.socket, n: int, timeout: float = 10.0) -> bytes:
    s.settimeout(timeout)
    buf = b""
    while len(buf) < n:
        b = s.recv(n - len(buf))
        if not b:
            break
        buf += b
    return buf


def test_delay_adds_one_rtt(echo):
    with LinkEmulator(delay=0.025) as emu:
        front = emu.add_link(echo.address)
        with _dial(front) as s:
            s.sendall(b"w")                   # warm: the relay dials the target
            assert _recv_exactly(s, 1) == b"w"
            rtts = []
            for i in range(5):
                t0 = time.monotonic()
                s.sendall(bytes([i]))
                assert _recv_exactly(s, 1) == bytes([i])
                rtts.append(time.monotonic() - t0)
    assert 0.0485 <= min(rtts) < 0.065, rtts


def test_asymmetric_delay(echo):
    with LinkEmulator() as emu:
        front = emu.add_link(echo.address, delay=0.030, reverse_delay=0.005)
        with _dial(front) as s:
            s.sendall(b"w")
            assert _recv_exactly(s, 1) == b"w"
            t0 = time.monotonic()
            s.sendall(b"x")
            assert _recv_exactly(s, 1) == b"x"
            rtt = time.monotonic() - t0
    assert 0.0335 <= rtt < 0.050   # uvloop timers have 1 ms resolution


def test_window_caps_one_flow_at_window_over_rtt(sink):
    window, rtt = 64 * 1024, 0.020
    with LinkEmulator(delay=rtt / 2, window=window) as emu:
        front = emu.add_link(sink.address)
        (rate,) = measure_flows(front, sink, 1, seconds=1.0)
    expected = window / rtt
    assert 0.85 * expected <= rate <= 1.08 * expected, (rate, expected)


def test_link_rate_is_shared_by_flows(sink):
    link = 40e6  # bits/s: each flow's window alone would allow 100 Mbit/s
    with LinkEmulator(delay=0.005, rate_bps=link, window=128 * 1024) as emu:
        front = emu.add_link(sink.address)
        rates = measure_flows(front, sink, 4, seconds=1.0)
    total = sum(rates) * 8
    assert 0.85 * link <= total <= 1.08 * link, rates  # sink reads are bursty
    assert min(rates) * 8 >= 0.5 * link / 4, rates   # roughly fair


def test_windows_add_up_below_link_rate(sink):
    window, rtt = 32 * 1024, 0.020
    with LinkEmulator(delay=rtt / 2, rate_bps=400e6, window=window) as emu:
        front = emu.add_link(sink.address)
        rates = measure_flows(front, sink, 4, seconds=1.0)
    expected = 4 * window / rtt
    assert 0.85 * expected <= sum(rates) <= 1.08 * expected, (rates, expected)


def test_drop_resets_connections(echo):
    with LinkEmulator() as emu:
        front = emu.add_link(echo.address, name="a")
        with _dial(front) as s1, _dial(front) as s2:
            for s in (s1, s2):
                s.sendall(b"ping")
                assert _recv_exactly(s, 4) == b"ping"
            assert emu.drop("a") == 2
            for s in (s1, s2):
                s.settimeout(5)
                with pytest.raises(ConnectionResetError):
                    s.sendall(b"x")
                    s.recv(1)
        # The link still relays new connections.
        with _dial(front) as s:
            s.sendall(b"again")
            assert _recv_exactly(s, 5) == b"again"
        assert emu.stats("a").connections_total == 3


def test_blackhole_holds_bytes_until_healed(echo):
    with LinkEmulator(delay=0.001) as emu:
        front = emu.add_link(echo.address, name="a")
        with _dial(front) as s:
            s.sendall(b"1")
            assert _recv_exactly(s, 1) == b"1"
            emu.blackhole("a")
            s.sendall(b"2")
            s.settimeout(0.3)   # bounded: nothing may arrive while black-holed
            with pytest.raises(TimeoutError):
                s.recv(1)
            # A connection made during the black hole stays silent too.
            with _dial(front) as s2:
                s2.sendall(b"3")
                s2.settimeout(0.2)
                with pytest.raises(TimeoutError):
                    s2.recv(1)
                emu.heal("a")
                assert _recv_exactly(s, 1) == b"2"
                assert _recv_exactly(s2, 1) == b"3"


class FirstRead(LoopbackServer):
    """Records how many bytes the first ``recv`` of each connection got."""

    def __init__(self) -> None:
        self.first: dict[int, int] = {}
        super().__init__("first-read")

    def on_data(self, conn: socket.socket, index: int, data: bytes) -> None:
        self.first.setdefault(index, len(data))


@pytest.mark.parametrize("blackholed", [False, True])
def test_first_write_arrives_in_one_piece(blackholed):
    """A message written right after connect reaches the target whole,
    although the relay may read it before it has reached the target (uvloop
    reads a new connection at once) or while the link is black-holed.
    gloo's pair handshake needs this: the listener reads the dialer's 8-byte
    sequence number with one recv and drops the connection on a short read
    (the relay used to forward a lone first byte).  The old failure was a
    race, so many connections are tried."""
    n, msg = 30, b"12345678"
    with FirstRead() as srv, LinkEmulator(delay=0.01, rate_bps=200e6, window=125_000) as emu:
        front = emu.add_link(srv.address, name="a")
        if blackholed:
            emu.blackhole("a")
        socks = []
        try:
            for _ in range(n):
                socks.append(_dial(front))
                socks[-1].sendall(msg)
            if blackholed:
                time.sleep(0.1)     # let the relay take what it will
                emu.heal("a")
            deadline = time.monotonic() + 10
            while len(srv.first) < n and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            for s in socks:
                s.close()
    assert sorted(srv.first.values()) == [len(msg)] * n, srv.first


def test_half_close_is_forwarded_after_the_data(echo):
    with LinkEmulator(delay=0.01) as emu:
        front = emu.add_link(echo.address)
        with _dial(front) as s:
            data = bytes(range(256)) * 1000
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            got = _recv_exactly(s, len(data) + 1)   # +1: must end with EOF
            assert got == data


def test_callable_target_and_missing_target(echo):
    box: list[str | None] = [None]
    with LinkEmulator() as emu:
        front = emu.add_link(lambda: box[0])
        # No target yet: the relay resets, which the client may already see
        # while connecting.
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            with _dial(front) as s:
                s.settimeout(5)
                s.sendall(b"x")
                if not s.recv(1):
                    raise ConnectionResetError
        box[0] = echo.address
        with _dial(front) as s:
            s.sendall(b"ok")
            assert _recv_exactly(s, 2) == b"ok"
        assert emu.address_for(echo.address) != front   # callables are not matched


def test_stop_is_idempotent_and_closes_listeners(echo):
    emu = LinkEmulator().start()
    front = emu.add_link(echo.address)
    assert emu.address_for(echo.address) == front
    emu.stop()
    emu.stop()
    with pytest.raises(OSError):
        socket.create_connection(parse_address(front), timeout=2).close()


def test_static_ring_all_reduce_through_emulator():
    import pccl

    world, n = 3, 1 << 18
    rings = [pccl.StaticRing(r, world, p2p_connections=2) for r in range(world)]
    try:
        with LinkEmulator(delay=0.002, rate_bps=800e6, window=256 * 1024) as emu:
            views = ring_addresses(emu, [r.address for r in rings])
            errors: list[BaseException] = []
            xs = [np.full(n, r + 1, dtype=np.float32) for r in range(world)]

            def run(r: int) -> None:
                try:
                    rings[r].connect(views[r], timeout=30)
                    rings[r].all_reduce(xs[r], timeout=60)
                except BaseException as e:  # reported below
                    errors.append(e)

            threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(90)
            assert not any(t.is_alive() for t in threads)
            assert not errors, errors
            for x in xs:
                assert (x == 6).all()
            stats = emu.stats()
            # Every ring edge carried 2(n-1)/n of the tensor, through the relay.
            want = 2 * (world - 1) / world * n * 4
            for name in ("0->1", "1->2", "2->0"):
                assert stats[name].forward.bytes >= want
                assert stats[name].connections_total == 2
    finally:
        for r in rings:
            r.close()
