"""One peer of the topology testbed, driven by JSON lines on stdin.

``python -m pccl.testing.topology_worker --master HOST:PORT --listen ADDR
--world N`` connects (listening on ``ADDR:0``), waits until the group has
N peers, prints ``{"event": "ready", ...}`` and then answers each command
line with one reply line:

* ``{"cmd": "allreduce", "bytes": B, "reps": R}`` -> ``seconds`` of each
  of R float32 all-reduces of B bytes, and the ring they ran on;
* ``{"cmd": "optimize"}`` -> ``optimize_topology()`` then
  ``update_topology()``: the TopologyInfo fields and the wall times;
* ``{"cmd": "train", "steps": S, "bytes": B}`` -> S steps of one
  all-reduce + ``update_topology()`` each; every step is also printed as
  an ``{"event": "step", ...}`` line as it ends (the driver throttles a
  link at a known step without sleeping);
* ``{"cmd": "quit"}`` -> closes the communicator and exits.

Used by ``tests/test_topology_testbed.py`` and ``benchmarks/topology.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import numpy as np

import pccl


def _out(msg: dict) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def _ring(comm: pccl.Communicator) -> list[str]:
    return list(comm._ring.order)  # the installed ring, in send order


def _allreduce(comm, nbytes: int, reps: int) -> dict:
    x = np.ones(nbytes // 4, dtype=np.float32)
    times = []
    for _ in range(reps):
        t0 = time.monotonic()
        comm.all_reduce(x)
        times.append(time.monotonic() - t0)
    return {"seconds": times, "ring": _ring(comm)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--master", required=True)
    ap.add_argument("--listen", required=True, help="host to listen on (port 0)")
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--connections", default="4")
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args(argv)
    k: int | str = args.connections if args.connections == "auto" else int(args.connections)
    comm = pccl.Communicator(args.master, p2p_connections=k, listen=f"{args.listen}:0")
    comm.connect(timeout=args.timeout)
    deadline = time.monotonic() + args.timeout
    while comm.group_world_size < args.world:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the group did not reach {args.world} peers")
        if not comm.are_peers_pending():
            time.sleep(0.02)  # polling the master, bounded by the deadline
            continue
        comm.update_topology(timeout=args.timeout)
    _out({"event": "ready", "peer_id": comm.peer_id, "ring": _ring(comm)})
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "quit":
                break
            if cmd["cmd"] == "allreduce":
                _out(dict(_allreduce(comm, cmd["bytes"], cmd.get("reps", 1)), ok=True))
            elif cmd["cmd"] == "optimize":
                t0 = time.monotonic()
                info = comm.optimize_topology(timeout=args.timeout)
                t1 = time.monotonic()
                comm.update_topology(timeout=args.timeout)
                _out({
                    "ok": True,
                    "optimize_s": t1 - t0,
                    "update_s": time.monotonic() - t1,
                    "ring": info.ring,
                    "installed": _ring(comm),
                    "bottleneck": info.bottleneck,
                    "predicted": info.predicted_bus_bandwidth,
                    "matrix": [[a, b, v] for (a, b), v in info.matrix.items()],
                    "probes": info.probes,
                    "probe_seconds": info.probe_seconds,
                    "feasible": info.feasible,
                    "reason": info.reason,
                })
            elif cmd["cmd"] == "train":
                x = np.ones(cmd["bytes"] // 4, dtype=np.float32)
                steps = []
                for s in range(cmd["steps"]):
                    t0 = time.monotonic()
                    comm.all_reduce(x)
                    took = time.monotonic() - t0
                    ring = _ring(comm)
                    comm.update_topology(timeout=args.timeout)
                    step = {"step": s, "seconds": took, "ring": ring, "next_ring": _ring(comm)}
                    steps.append(step)
                    _out(dict(step, event="step"))
                _out({"ok": True, "steps": steps})
            else:
                _out({"ok": False, "error": f"unknown command {cmd['cmd']!r}"})
        except Exception as exc:  # reported, not fatal: the driver decides
            _out({"ok": False, "error": f"{type(exc).__name__}: {exc}",
                  "trace": traceback.format_exc()})
    comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
