"""Flow-splitting plans reach the sockets (issue 16 part 3), on loopback:
``StaticRing.connect(port_ranges=, out_weights=, in_weights=)`` binds each
outbound connection to a source port of its range and stripes every
operation over the connections in proportion to the weights.  The bytes
each connection carried are read from the kernel (``ss -tin``)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading

import numpy as np
import pytest

from pccl import StaticRing, errors, flowsplit

pytestmark = pytest.mark.timeout(120)

K = 4
WORLD = 3


def _base() -> int:
    # Above the default ephemeral range; by pid so parallel runs differ.
    return 61000 + (os.getpid() * 97) % 3500


def _ring(port_ranges, out_w, in_w, count: int) -> list[StaticRing]:
    rings = [StaticRing(r, WORLD, p2p_connections=K) for r in range(WORLD)]
    addrs = [r.address for r in rings]
    errs: list[BaseException] = []

    def connect(r: int) -> None:
        try:
            rings[r].connect(addrs, timeout=20, port_ranges=port_ranges(r),
                             out_weights=out_w(r), in_weights=in_w(r))
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errs.append(e)

    ts = [threading.Thread(target=connect, args=(r,)) for r in range(WORLD)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    if errs:
        for r in rings:
            r.close()
        raise errs[0]
    return rings


def _reduce_all(rings: list[StaticRing], count: int) -> None:
    xs = [np.full(count, r + 1, dtype=np.float32) for r in range(WORLD)]
    ts = [threading.Thread(target=rings[r].all_reduce, args=(xs[r],), kwargs={"timeout": 60})
          for r in range(WORLD)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(90)
    for x in xs:
        assert np.all(x == 6.0)


def _bytes_acked(port: int) -> int:
    out = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, timeout=10).stdout
    m = re.findall(r"bytes_acked:(\d+)", out)
    assert len(m) == 1, out
    return int(m[0])


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs `ss` (iproute2) to read bytes")
def test_pins_and_weights_reach_the_sockets():
    base = _base()
    weights = [[3, 1, 0, 0], [1, 1, 1, 1], [0, 2, 0, 6]]

    def pr(r):  # connection k of rank r: 8 ports of its own
        return [(base + 40 * r + 8 * k, base + 40 * r + 8 * k + 7) for k in range(K)]

    rings = _ring(pr, lambda r: weights[r], lambda r: weights[(r - 1) % WORLD], 0)
    try:
        ports = [[int(rings[r].conn_address(k).rsplit(":", 1)[1]) for k in range(K)]
                 for r in range(WORLD)]
        for r in range(WORLD):
            for k in range(K):
                lo, hi = pr(r)[k]
                assert lo <= ports[r][k] <= hi
        before = [[_bytes_acked(p) for p in ports[r]] for r in range(WORLD)]
        count = 3 << 20  # 12 MiB: 8 MiB per edge over the op
        _reduce_all(rings, count)
        for r in range(WORLD):
            moved = [_bytes_acked(p) - b for p, b in zip(ports[r], before[r], strict=True)]
            total = sum(moved)
            assert total > 2 * 4 * count * (WORLD - 1) / WORLD * 0.99
            want = [w / sum(weights[r]) for w in weights[r]]
            got = [m / total for m in moved]
            print(f"rank {r}: weights {weights[r]} -> shares {[round(g, 3) for g in got]}")
            for g, w in zip(got, want, strict=True):
                assert abs(g - w) < 0.03, (got, want)
    finally:
        for r in rings:
            r.close()


def test_ring_pins_from_a_plan():
    topo = flowsplit.LeafSpine(2, 4, 4, host_gbps=0.1, uplink_gbps=0.05)
    ring = [2, 4, 3, 6, 5, 0, 1, 7]
    edges = flowsplit.ring_connections(topo, ring, 1 << 20, K, align=4)
    for r in range(len(ring)):
        p = flowsplit.ring_pins(edges, r, lambda s: (40000 + 1000 * s, 40999 + 1000 * s))
        assert p["out_weights"] == [b for _, b in edges[r]]
        assert p["in_weights"] == [b for _, b in edges[r - 1]]
        for (path, _), rng in zip(edges[r], p["port_ranges"], strict=True):
            assert rng == (None if path is None else (40000 + 1000 * path, 40999 + 1000 * path))
    with pytest.raises(errors.InvalidArgumentError):
        flowsplit.ring_pins(edges, 8, lambda s: (1, 2))


def test_bad_pins_are_refused():
    ring = StaticRing(0, 2, p2p_connections=K)
    try:
        addrs = [ring.address, "127.0.0.1:9"]
        with pytest.raises(errors.InvalidArgumentError):
            ring.connect(addrs, port_ranges=[(5, 4)] * K, timeout=1)
        with pytest.raises(errors.InvalidArgumentError):
            ring.connect(addrs, port_ranges=[(1, 2)] * (K - 1), timeout=1)
        with pytest.raises(errors.InvalidArgumentError):
            ring.connect(addrs, out_weights=[1, -1, 0, 0], timeout=1)
        with pytest.raises(errors.InvalidArgumentError):
            ring.connect(addrs, in_weights=[1, 1], timeout=1)
        with pytest.raises(errors.PcclError):
            ring.conn_address(0)  # no ring yet
    finally:
        ring.close()
