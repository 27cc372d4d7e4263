"""optimize_topology(): how long probing takes, against PCCL's scheme.

Part 1 (loopback, any user): n peers in this process on 127.0.0.1 call
``optimize_topology()`` with nothing known; prints the probe phase and the
whole call per n, beside PCCL v1's probe-time formula (each peer measures
its n - 1 out-edges one after another, 10 s each, ``BENCHMARK_LENGTH_SECONDS``
in v1.0.0; 5 s on its main branch), i.e. at least 10 * (n - 1) s.  A second
call (nothing stale) shows the cost when every estimate is fresh.

Part 2 (root only, ``--testbed``): the acceptance test on the 6-namespace
full mesh (``tests/test_topology_testbed.py``): the all-reduce bus
bandwidth before/after, predicted against measured, and the steps until
passive measurement moves the ring off a throttled edge.  It runs that
test with ``-s`` and prints its report lines.

    .venv/bin/python benchmarks/topology.py                 # ~30 s
    .venv/bin/python benchmarks/topology.py --n 2 4 8 --testbed

Numbers go to ``benchmarks/out/topology.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pccl

PCCL_PROBE_S = 10.0  # v1.0.0 BENCHMARK_LENGTH_SECONDS


def _each(comms, fn):
    out = [None] * len(comms)

    def run(i):
        out[i] = fn(comms[i])

    ts = [threading.Thread(target=run, args=(i,)) for i in range(len(comms))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    return out


def probe_time(n: int, connections: int) -> dict:
    with pccl.MasterNode() as master:
        comms = [pccl.Communicator(master.address, p2p_connections=connections)
                 for _ in range(n)]

        def join(c):
            c.connect(timeout=60)
            while c.group_world_size < n:
                c.update_topology(timeout=60)

        _each(comms, join)
        try:
            t0 = time.monotonic()
            infos = _each(comms, lambda c: c.optimize_topology(timeout=120))
            call = time.monotonic() - t0
            t0 = time.monotonic()
            _each(comms, lambda c: c.optimize_topology(timeout=120))
            again = time.monotonic() - t0
        finally:
            for c in comms:
                c.close()
    info = infos[0]
    return {"n": n, "edges": n * (n - 1), "probes": info.probes,
            "probe_s": info.probe_seconds, "call_s": call, "fresh_call_s": again,
            "pccl_v1_min_s": PCCL_PROBE_S * (n - 1),
            "pccl_v1_sequential_s": PCCL_PROBE_S * n * (n - 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[2, 4, 6, 8])
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--testbed", action="store_true", help="also run the netns part (root)")
    args = ap.parse_args()
    rows = []
    print(f"{'n':>3} {'edges':>5} {'probe s':>8} {'call s':>7} {'fresh s':>8} "
          f"{'PCCL >= s':>10} {'PCCL seq s':>10} {'speed-up':>9}")
    for n in args.n:
        r = probe_time(n, args.connections)
        rows.append(r)
        print(f"{n:>3} {r['edges']:>5} {r['probe_s']:>8.2f} {r['call_s']:>7.2f} "
              f"{r['fresh_call_s']:>8.3f} {r['pccl_v1_min_s']:>10.0f} "
              f"{r['pccl_v1_sequential_s']:>10.0f} {r['pccl_v1_min_s'] / r['call_s']:>8.1f}x",
              flush=True)
    doc = {"loopback": rows}
    if args.testbed:
        root = Path(__file__).resolve().parent.parent
        proc = subprocess.run([str(root / ".venv/bin/pytest"), "-q", "-s", "-p", "no:cacheprovider",
                               str(root / "tests/test_topology_testbed.py")],
                              capture_output=True, text=True, timeout=600, cwd="/tmp")
        lines = [ln for ln in proc.stdout.splitlines()
                 if ln.startswith(("probe phase", "before:", "throttled", "{", "   "))
                 or "passed" in ln or "failed" in ln or "skipped" in ln]
        print("\n".join(lines))
        doc["testbed"] = lines
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    (out / "topology.json").write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
