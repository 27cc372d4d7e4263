"""One pccl peer of the flow-splitting testbed (``tests/test_flowsplit_testbed.py``,
``benchmarks/flowsplit.py --testbed``), run inside a host's namespace:

    python -m pccl.testing.flowsplit_worker --listen 198.18.0.1 --conns 4

It prints ``{"address": "host:port"}`` and then answers one JSON line per
command line read from stdin:

* ``{"cmd": "ring", "epoch", "rank", "world", "next", "port_ranges",
  "out_weights", "in_weights"}`` sets the ring (the flow-splitting fields
  may be null) and answers ``{"conns": [local host:port of each outbound
  connection]}``;
* ``{"cmd": "reduce", "count", "tag"}`` all-reduces (SUM, in place) one
  float32 tensor of ``count`` elements holding ``rank + 1`` and answers
  ``{"seconds", "cpu", "ok"}`` (``ok``: every element is the expected sum);
* ``{"cmd": "quit"}`` ends it.

A failure answers ``{"error": "..."}`` and the worker goes on.  The parent
bounds every wait; the worker dies with its stdin.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pccl.testing.flowsplit_worker",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", required=True, help="address to listen on (port 0 is used)")
    ap.add_argument("--conns", type=int, default=4, help="K connections per ring edge")
    ap.add_argument("--progress-timeout", type=float, default=30.0,
                    help="seconds without progress before an op fails")
    ap.add_argument("--timeout", type=float, default=120.0, help="bound of one command")
    a = ap.parse_args(argv)

    from pccl._native import NativeComm  # after argparse: --help needs no extension

    comm = NativeComm(listen=f"{a.listen}:0", p2p_connections=a.conns,
                      progress_timeout=a.progress_timeout)
    _reply({"address": comm.address})
    rank = world = 0
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            msg = json.loads(line)
            cmd = msg.get("cmd")
            try:
                if cmd == "quit":
                    break
                if cmd == "ring":
                    rank, world = int(msg["rank"]), int(msg["world"])
                    pr = msg.get("port_ranges")
                    comm.set_ring(
                        int(msg["epoch"]), rank, world, msg["next"], timeout=a.timeout,
                        port_ranges=None if pr is None else [None if p is None else tuple(p)
                                                             for p in pr],
                        out_weights=msg.get("out_weights"),
                        in_weights=msg.get("in_weights"),
                    )
                    _reply({"conns": [comm.conn_address(k) for k in range(a.conns)]})
                elif cmd == "reduce":
                    x = np.full(int(msg["count"]), rank + 1, dtype=np.float32)
                    c0, t0 = _cpu(), time.perf_counter()
                    comm.all_reduce(x, tag=int(msg.get("tag", 0)), timeout=a.timeout)
                    t1, c1 = time.perf_counter(), _cpu()
                    want = np.float32(world * (world + 1) / 2)
                    _reply({"seconds": t1 - t0, "cpu": c1 - c0, "ok": bool(np.all(x == want))})
                else:
                    _reply({"error": f"unknown command {cmd!r}"})
            except Exception as e:  # reported to the parent, which decides
                _reply({"error": f"{type(e).__name__}: {e}"})
    finally:
        comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
