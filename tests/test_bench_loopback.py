"""``benchmarks/allreduce_loopback.py`` end to end at smoke size: every
contender (pccl, gloo, the floor and the summing ring) runs, checks its
result before it is timed, and lands in the table and the JSON summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "allreduce_loopback.py"


def test_quick_run_reports_every_ratio(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--worlds", "2", "--sizes", "64K",
                        "--sum-ring", "poll:1,poll:2", "--out", str(out), "--no-plot"],
                       capture_output=True, text=True, timeout=100)
    assert r.returncode == 0, r.stderr
    for col in ("pccl/gloo", "pccl/floor", "sum/floor", "pccl/sum"):
        assert col in r.stdout, r.stdout
    (row,) = json.loads(out.read_text())["summary"]
    assert (row["world"], row["bytes"]) == (2, 65536)
    for key in ("pccl_GBps", "gloo_GBps", "floor_GBps", "sum_ring_GBps",
                "pccl_over_floor", "sum_ring_over_floor", "pccl_over_sum_ring"):
        assert row[key] and row[key] > 0, (key, row)
    assert row["sum_ring_config"] in ("sum ring poll K=1", "sum ring poll K=2")  # best of both
    kinds = {x["kind"] for x in json.loads(out.read_text())["results"] if not x.get("error")}
    assert kinds == {"pccl", "gloo", "floor", "sum"}


def test_bad_sum_ring_is_a_usage_error():
    r = subprocess.run([sys.executable, str(SCRIPT), "--sum-ring", "threads:2"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--sum-ring takes poll:K" in r.stderr
