"""Shared fixtures: rings inside this process (world 1 and 2, for API
checks) and a pool of multi-process rings (pccl.testing.RingCluster).

Helpers that child processes need live in ``pccl.testing`` (this directory
is not importable: pytest runs with --import-mode=importlib).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence

import pytest

import pccl
from pccl.testing import RingCluster, WorkerError


def _connect_concurrently(
    rings: Sequence[pccl.StaticRing], addresses: Sequence[str], timeout: float, epoch: int = 0
) -> tuple[list[BaseException | None], float]:
    """Call ``connect`` on every ring at once (each blocks until its
    neighbours connect); returns each call's exception (or None) and the
    elapsed seconds.  Every thread is joined with a deadline."""
    errors: list[BaseException | None] = [None] * len(rings)

    def run(i: int) -> None:
        try:
            rings[i].connect(addresses, timeout=timeout, epoch=epoch)
        except BaseException as e:  # handed to the test
            errors[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(rings))]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    elapsed = time.monotonic() - t0
    stuck = [i for i, t in enumerate(threads) if t.is_alive()]
    if stuck:
        for r in rings:
            r.abort()
        pytest.fail(
            f"connect of ranks {stuck} still blocked {timeout + 10} s after a {timeout} s timeout"
        )
    return errors, elapsed


@pytest.fixture
def connect_concurrently() -> Callable:
    return _connect_concurrently


@pytest.fixture
def ring1() -> Iterator[pccl.StaticRing]:
    """A connected ring of one rank."""
    with pccl.StaticRing(0, 1, p2p_connections=1) as ring:
        ring.connect([ring.address], timeout=10)
        yield ring


@pytest.fixture
def ring_pair() -> Iterator[list[pccl.StaticRing]]:
    """Two ranks of one ring in this process (I/O runs on the core's
    threads; the calls release the GIL)."""
    rings = [pccl.StaticRing(r, 2, p2p_connections=2) for r in range(2)]
    try:
        errors, _ = _connect_concurrently(rings, [r.address for r in rings], timeout=10)
        for e in errors:
            if e is not None:
                raise e
        yield rings
    finally:
        for r in rings:
            r.close()


class ClusterPool:
    """One RingCluster kept for the whole session and reconfigured for each
    test that asks for a ring (starting processes and importing torch is
    the slow part); a cluster that saw a failure is replaced."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.cluster: RingCluster | None = None

    def get(self, world: int, connections: int = 4, slice_bytes: int | None = None) -> RingCluster:
        key = (world, connections, slice_bytes)
        if self.cluster is not None:
            try:
                if self.key == key:
                    self.cluster.request({"cmd": "ping"}, timeout=10)
                else:
                    self.key = None
                    self.cluster.reconfigure(world, connections, slice_bytes)
                    self.key = key
                return self.cluster
            except WorkerError:
                self.close()
        self.cluster = RingCluster(world, connections=connections, slice_bytes=slice_bytes)
        self.key = key
        return self.cluster

    def discard(self) -> None:
        self.close()

    def close(self) -> None:
        cluster, self.cluster, self.key = self.cluster, None, None
        if cluster is not None:
            cluster.close()


@pytest.fixture(scope="session")
def cluster_pool() -> Iterator[ClusterPool]:
    pool = ClusterPool()
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def pooled_cluster(cluster_pool: ClusterPool, request) -> Iterator[Callable[..., RingCluster]]:
    """``pooled_cluster(world, connections, slice_bytes)``: a running
    ring, shared with the neighbouring tests of the same configuration;
    dropped if the test fails."""
    yield cluster_pool.get
    rep = getattr(request.node, "rep_call", None)
    if rep is None or rep.failed:
        cluster_pool.discard()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if rep.when == "call":
        item.rep_call = rep
    return rep
