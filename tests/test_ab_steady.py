"""``benchmarks/ab_steady.py``: contender parsing, and one short real run
(pccl and the floor, world 2) that must check results and print a row per
contender."""

from __future__ import annotations

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
    cmd = [sys.executable, str(BENCHMARKS / "ab_steady.py"), "--world", "2", "--size", "64K",
           "--rounds", "2", "--seconds", "0.002", "pccl:k=2,oop=1", "floor:connections=2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=100)
    assert r.returncode == 0, r.stderr
    for label in ("pccl:k=2,oop=1", "floor:connections=2"):
        row = [line for line in r.stdout.splitlines() if label in line]
        assert row, r.stdout
    bad = subprocess.run([*cmd[:2], "pccl:bogus=1"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown key 'bogus'" in bad.stderr
