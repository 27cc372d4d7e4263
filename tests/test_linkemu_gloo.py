"""Real gloo (torch.distributed ProcessGroupGloo) through the link emulator,
the way ``benchmarks/wan.py`` runs it: three rank processes, each with its
own relay and a store wrapper that points every gloo pair at an emulated
link (``GlooWanWorker``).

Regression for gloo's pairing stalling at three or more ranks: the relay
forwarded the first byte of a new connection on its own, and gloo's
listener, which reads the dialer's 8-byte pair sequence number with a
single ``recv``, dropped the connection on the short read and waited for
it forever.  Checked here: the all-reduce result, one relayed connection
per pair (all three, not only ring neighbours), and that every ring edge
moved its share of the tensor through an emulated link."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")

pytestmark = pytest.mark.timeout(90)

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
WORLD = 3
NBYTES = 1 << 20
DEADLINE_S = 30.0          # all ranks, including the torch import

# One rank: the benchmark's own worker, so the test covers its routing.
RANK = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import wan
rank, world, store, nbytes = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
w = wan.GlooWanWorker(rank, world, {"store": store, "delay": 0.002, "link_bps": 400e6,
                                    "window": 256 * 1024, "timeout": 10})
try:
    w.connect([])
    w.alloc(nbytes)
    r = w.verify()
finally:
    w.close()
print(json.dumps({"error": r["error"], "links": r["links"]}))
"""


def _run_ranks(tmp_path: Path) -> list[dict]:
    store = tmp_path / "store"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK, str(BENCHMARKS), str(r), str(WORLD), str(store),
             str(NBYTES)],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(WORLD)
    ]
    deadline = time.monotonic() + DEADLINE_S
    outs: list[tuple[str, str]] = []
    try:
        for p in procs:
            try:
                outs.append(p.communicate(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                pytest.fail(f"gloo ranks did not finish within {DEADLINE_S:.0f} s "
                            "(pairing through the relay stalled?)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
    results = []
    for r, (p, (out, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{err[-3000:]}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_gloo_three_ranks_through_emulated_links(tmp_path):
    results = _run_ranks(tmp_path)
    for r, res in enumerate(results):
        assert res["error"] is None, f"rank {r}: {res['error']}"

    moved: dict[tuple[int, int], int] = {}
    conns: dict[frozenset, int] = {}
    for res in results:
        for name, (fwd, rev, n) in res["links"].items():
            a, b = (int(x) for x in name.split()[-1].split("->"))
            moved[(a, b)] = moved.get((a, b), 0) + fwd
            moved[(b, a)] = moved.get((b, a), 0) + rev
            conns[frozenset((a, b))] = conns.get(frozenset((a, b)), 0) + n
    # Every pair of the full mesh was dialled exactly once, through a relay.
    assert len(conns) == WORLD * (WORLD - 1) // 2
    assert all(n == 1 for n in conns.values()), conns
    # Gloo's ring sends one way round (which way is gloo's choice): each of
    # its edges carried 2(n-1)/n of the tensor through an emulated link.
    want = 2 * (WORLD - 1) / WORLD * NBYTES
    rings = [[(r, (r + step) % WORLD) for r in range(WORLD)] for step in (1, -1)]
    least = max(min(moved.get(e, 0) for e in ring) for ring in rings)
    assert least >= 0.9 * want, (moved, want)
