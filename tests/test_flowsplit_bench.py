"""Smoke test of benchmarks/flowsplit.py (small fabric, few seeds)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_flowsplit_benchmark_smoke(tmp_path):
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "flowsplit.py"), "--fabric", "testbed",
         "--trials", "5", "--bytes", "4096", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
    )
    assert res.returncode == 0, res.stderr
    assert "max leaf-spine link load / spray" in res.stdout
    assert "16 flows hashed onto 16 paths" in res.stdout
    png = tmp_path / "flowsplit.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "flowsplit.json").read_text())
    rows = data["testbed"]["rows"]
    assert {r["scheme"] for r in rows} >= {"spray", "minimal", "ecmp", "mp-8", "single"}
    for r in rows:
        if r["scheme"] == "minimal":
            assert abs(r["load_ratio"] - 1.0) < 1e-9
        assert r["load_ratio"] >= 1.0 - 1e-9
    assert abs(data["balls_into_bins_16_16"]["exact"] - 3.0782) < 1e-3
