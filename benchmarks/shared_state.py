"""Shared-state sync: a joiner fetching 1 GiB from 1, 2 and 3 distributors.

For each number of distributors D, one run on 127.0.0.1: a real
``pccl-master`` subprocess, D peers holding the same state (four float32
tensors of 256 MiB, revision 1) and one joiner holding zeros.  Every peer
calls ``sync_shared_state``; the joiner is outdated, so it fetches all
1 GiB, each tensor's byte range striped across the D distributors, verifies
every hash and copies into its tensors.  Reported: the joiner's wall
time for the whole call (hashing its own state, waiting for every peer's
report at the master, transfer, verification, copy) and for the fetch part
alone (striped transfer, verification, copy: MiB/s); the striping speed-up
is the fetch rate relative to D = 1.
The joiner is reset to zeros and the sync repeated ``--repeats`` times; the
best is reported.

Also measured in this process: xxh3-128 hashing throughput (GB/s) over a
1 GiB float32 array, an unaligned float32 view and a bfloat16 torch tensor,
all without copying.

    .venv/bin/python benchmarks/shared_state.py            # about 2 minutes
    .venv/bin/python benchmarks/shared_state.py --quick    # 256 MiB of state

Numbers go to ``benchmarks/out/shared_state.json``.  On a machine with few
cores, loopback TCP is CPU-bound (every byte is copied by the kernel twice),
so striping gains less here than across real links, where one TCP flow is
limited by its window and the path.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import _common as c
import numpy as np

import pccl
from pccl.shared_state import hash_tensor
from pccl.testing.peer_worker import MasterProcess, gather, request_all, send_all
from pccl.testing.state_worker import StatePeer

MIB = 1 << 20


def hashing(total: int, repeats: int = 3) -> dict[str, float]:
    n = total // 4
    out = {}
    x = np.arange(n, dtype=np.float32)
    raw = bytearray(total + 1)
    view = np.frombuffer(raw, dtype=np.float32, count=n, offset=1)
    cases = {"float32": x, "float32 unaligned": view}
    try:
        import torch

        cases["bfloat16 (torch)"] = torch.zeros(total // 2, dtype=torch.bfloat16)
    except ImportError:
        pass
    for name, t in cases.items():
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            hash_tensor(t)
            best = min(best, time.perf_counter() - t0)
        out[name] = total / best / 1e9
    return out


def one_run(distributors: int, total: int, tensors: int, repeats: int) -> dict:
    spec = [{"name": f"t{i}", "kind": "float32", "n": total // tensors // 4, "fill": "iota",
             "seed": i} for i in range(tensors)]
    zeros = [dict(t, fill="zeros") for t in spec]
    with tempfile.TemporaryDirectory() as tmp:
        master = MasterProcess(tmp, vote_timeout=120.0)
        peers: list[StatePeer] = []
        try:
            peers = [StatePeer(tmp, master.address, i) for i in range(distributors)]
            send_all(peers, "connect", timeout=60)
            send_all(peers, "sync_world", n=distributors, timeout=60)
            gather(peers, 70, what="connect")
            gather(peers, 70, what="sync_world")
            request_all(peers, "make_state", timeout=300, tensors=spec, revision=1)
            request_all(peers, "sync", timeout=300)
            joiner = StatePeer(tmp, master.address, distributors)
            peers.append(joiner)
            joiner.send("connect", timeout=60)
            peers[0].request("wait_pending", timeout=30)
            request_all(peers[:-1], "update_topology")
            assert joiner.reply(30, "connect")["ok"]
            samples = []
            for _ in range(repeats):
                joiner.request("make_state", timeout=300, tensors=zeros, revision=0)
                for p in peers[:-1]:
                    p.send("sync")
                joiner.send("sync", bump=False)
                replies = gather(peers, 600, what="sync")
                assert replies[-1]["rx_bytes"] >= total
                assert all(r["digests"] == replies[0]["digests"] for r in replies)
                samples.append({"seconds": replies[-1]["seconds"],
                                "fetch_seconds": replies[-1]["timings"]["fetch"],
                                "timings": replies[-1]["timings"],
                                "tx": [r["tx_bytes"] for r in replies[:-1]]})
            return {"distributors": distributors, "samples": samples,
                    "best_seconds": min(s["seconds"] for s in samples),
                    "best_fetch_seconds": min(s["fetch_seconds"] for s in samples)}
        finally:
            for p in peers:
                p.kill()
            master.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="bytes of shared state (default 1G)")
    ap.add_argument("--tensors", type=int, default=4)
    ap.add_argument("--distributors", default="1,2,3")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="256 MiB, 2 repeats")
    args = ap.parse_args()
    total = c.parse_size("256M" if args.quick else args.size)
    repeats = 2 if args.quick else args.repeats
    hash_rates = hashing(min(total, 1 << 30))
    print_rows = [[k, f"{v:.2f}"] for k, v in hash_rates.items()]
    c.print_table("xxh3-128 over tensor memory (no copy)", ["tensor", "GB/s"], print_rows)
    runs = [one_run(d, total, args.tensors, repeats) for d in c.parse_list(args.distributors)]
    base = runs[0]["best_fetch_seconds"]
    rows = []
    for r in runs:
        rows.append([str(r["distributors"]), f"{r['best_seconds']:.3f}",
                     f"{total / r['best_seconds'] / MIB:.0f}",
                     f"{r['best_fetch_seconds']:.3f}",
                     f"{total / r['best_fetch_seconds'] / MIB:.0f}",
                     f"{base / r['best_fetch_seconds']:.2f}x",
                     " / ".join(f"{t / MIB:.0f} MiB" for t in r["samples"][-1]["tx"])])
    c.print_table(f"joiner sync of {c.fmt_size(total)} on 127.0.0.1 (pccl {pccl.version()})",
                  ["distributors", "call s", "call MB/s", "fetch s", "fetch MB/s",
                   "striping speed-up", "served by each"], rows,
                  caption=f"{c.machine_info().get('cpus', '?')} CPUs; best of {repeats}")
    path = c.write_json(c.OUT_DIR / "shared_state.json", {
        "machine": c.machine_info(), "state_bytes": total, "hash_gbps": hash_rates,
        "runs": runs})
    print(f"numbers: {path}")


if __name__ == "__main__":
    c.install_cleanup()
    main()
