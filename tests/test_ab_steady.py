"""``benchmarks/ab_steady.py``: contender parsing, and one short real run
(pccl, the floor and the reducing floor, world 3) that must check results
and print a row per contender; plus the reducing floor's own check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _ab():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import ab_steady
    finally:
        sys.path.remove(str(BENCHMARKS))
    return ab_steady


def test_parse_contender():
    ab = _ab()
    p = ab.parse_contender("pccl:k=8,oop=1,slice=262144,env.X=1,python=/x/bin/python")
    assert (p.kind, p.python, p.env) == ("pccl", "/x/bin/python", {"X": "1"})
    assert p.options == {"k": "8", "slice": "262144", "out_of_place": True}
    assert ab.parse_contender("pccl:").options == {"k": "4", "out_of_place": False}
    f = ab.parse_contender("floor:connections=2,engine=poll")
    assert f.options == {"connections": "2", "engine": "poll"}
    for bad in ("gloo:k=1", "pccl:connections=2", "floor:k=2", "pccl:k", "pccl:env.=1"):
        with pytest.raises(ValueError):
            ab.parse_contender(bad)


def test_short_run_prints_every_contender():
    # World 3 and 64 KiB + 3 floats: chunks and lanes of unequal length.
    # Each contender's result is checked before it is timed (the reducing
    # floor's too: every element must be the sum 1 + 2 + 3).
    labels = ["pccl:k=2,oop=1", "floor:connections=2", "floor:connections=3,engine=poll,reduce=1"]
    cmd = [sys.executable, str(BENCHMARKS / "ab_steady.py"), "--world", "3", "--size", "65548",
           "--rounds", "2", "--seconds", "0.002", *labels]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=100)
    assert r.returncode == 0, r.stderr
    for label in labels:
        row = [line for line in r.stdout.splitlines() if label in line]
        assert row, r.stdout
    bad = subprocess.run([*cmd[:2], "pccl:bogus=1"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown key 'bogus'" in bad.stderr


def test_same_contender_twice_keeps_two_sample_sets(tmp_path):
    """Giving one contender twice is how to see the noise; each must keep
    its own samples (they were merged under one label)."""
    out = tmp_path / "ab.json"
    cmd = [sys.executable, str(BENCHMARKS / "ab_steady.py"), "--world", "2", "--size", "64K",
           "--rounds", "2", "--seconds", "0.002", "--json", str(out),
           "floor:connections=1", "floor:connections=1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=100)
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())["contenders"]
    assert [c["label"] for c in got] == ["floor:connections=1"] * 2
    assert [len(c["wall_s"]) for c in got] == [2, 2]
    assert [len(c["cpu_s"]) for c in got] == [2, 2]
    odd = subprocess.run([sys.executable, str(BENCHMARKS / "ab_steady.py"), "--size", "65537",
                          "floor:"], capture_output=True, text=True, timeout=30)
    assert odd.returncode == 2 and "multiple of 4" in odd.stderr


def test_reducing_floor_sums(monkeypatch):
    """The reducing floor's result is checked by every rank (verify() runs
    in alloc: each element must be 1 + 2, else an error string)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))    # the workers import from there
    import _common as c
    from raw_tcp_ring import RawRingWorker

    with c.WorkerGroup(RawRingWorker, 2, {"connections": 2, "engine": "poll", "reduce": 1},
                       start_timeout=60) as g:
        assert g.call("alloc", 4 * 1001, timeout=60) == [None, None]
        g.call("run", 3, timeout=60)
    with pytest.raises(ValueError, match="engine=poll"):
        RawRingWorker(0, 2, {"engine": "threads", "reduce": 1})
