"""The churn stress test (pccl.testing.stress) as CI runs it: 75 s, 4 peers,
at least 5 SIGKILLs, 2 SIGSTOPs (one longer than the heartbeat timeout) and
5 newcomers, every revision checked for bit-parity and exact sums."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

SEED = 20261126
HARD_TIMEOUT = 240  # 75 s of faults + start, final steps and shutdown, on a busy 2-core box


def _summary(stdout: str) -> dict:
    for line in reversed(stdout.splitlines()):
        if line.startswith("STRESS-SUMMARY "):
            return json.loads(line[len("STRESS-SUMMARY "):])
    raise AssertionError(f"no STRESS-SUMMARY line in the output:\n{stdout[-4000:]}")


@pytest.mark.timeout(HARD_TIMEOUT + 30)
def test_stress_churn_with_parity():
    argv = [
        sys.executable, "-m", "pccl.testing.stress",
        "--duration", "75", "--peers", "4",
        "--min-kills", "5", "--min-stops", "2", "--min-joins", "5", "--min-cuts", "2",
        "--seed", str(SEED), "--tensor-elems", "4096", "--no-progress",
    ]
    with tempfile.TemporaryDirectory(prefix="pccl-stress-test-") as cwd:
        # A scratch cwd: the repository's pccl/ has no compiled extension.
        proc = subprocess.Popen(
            argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            out, err = proc.communicate(timeout=HARD_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.terminate()  # SIGTERM: it SIGCONTs and kills its children, then exits
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate(timeout=30)
            pytest.fail(f"stress run exceeded {HARD_TIMEOUT} s:\n{out[-4000:]}\n{err[-4000:]}")
    report = f"\n--- stdout ---\n{out[-6000:]}\n--- stderr ---\n{err[-4000:]}"
    assert proc.returncode == 0, f"exit code {proc.returncode}{report}"
    s = _summary(out)
    assert s["ok"], report
    assert s["kills"] >= 5, report
    assert s["stops"] >= 2, report
    assert s["long_stops"] >= 1, report  # at least one stopped peer was evicted
    assert s["joins"] >= 5, report
    assert s["parity_checks"] > 0, report
    assert s["value_checks"] > 0, report
    assert s["quant_checks"] > 0, report
