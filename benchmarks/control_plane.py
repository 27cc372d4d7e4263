"""The control plane's cost: small all-reduces and recovery from a SIGKILL.

Part 1, small-message latency.  For worlds 2 and 4 and float32 all-reduces
of 4 B to 64 KiB, in one run on 127.0.0.1, it times

* **pccl Communicator**: ``pccl.Communicator`` joined through a real
  ``pccl-master`` subprocess; every operation ends with the outcome
  agreement (``op_done`` -> ``op_outcome``, one master round trip);
* **pccl StaticRing**: the same native ring without a master (the data
  plane alone), so ``Communicator - StaticRing`` is the control plane's
  cost per operation;
* **gloo**: ``torch.distributed`` with the gloo backend.

It also measures one master round trip (``are_peers_pending()``, median)
so the overhead can be read in round trips (target: at most one), and
reports Communicator / gloo (target: at most 2x).

Part 2, recovery.  ``--kill-trials`` times, four peers run a 16 MiB
all-reduce in a loop that retries after ``update_topology()`` (the loop of
examples/allreduce_dynamic.py); one peer is SIGKILLed while every peer is
inside the operation.  Reported: SIGKILL -> PeerLostError on the
survivors, and SIGKILL -> the survivors' next successful all-reduce.

    .venv/bin/python benchmarks/control_plane.py           # about 2 minutes
    .venv/bin/python benchmarks/control_plane.py --quick   # under a minute

Numbers go to ``benchmarks/out/control_plane.json``.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common as c
import numpy as np
from allreduce_loopback import GlooWorker, PcclWorker

DEFAULT_SIZES = "4,64,1K,4K,16K,64K"
TARGET_GLOO_RATIO = 2.0


class CommWorker:
    """``pccl.Communicator`` through a master; all-reduce in place."""

    def __init__(self, rank: int, world: int, options: dict):
        import pccl

        self.pccl = pccl
        self.rank = rank
        self.world = world
        self.comm = pccl.Communicator(options["master"], p2p_connections=int(options["k"]))
        self.x = None

    def info(self) -> dict:
        return {"version": self.pccl.version()}

    def connect(self, infos: list[dict]) -> None:
        self.comm.connect(timeout=60)
        deadline = time.monotonic() + 60
        while self.comm.world_size != self.world:  # every admitted peer votes
            if time.monotonic() > deadline:
                raise TimeoutError(f"world {self.comm.world_size}, expected {self.world}")
            self.comm.update_topology(timeout=60)

    def alloc(self, nbytes: int) -> None:
        self.x = np.full(max(1, nbytes // 4), float(self.rank + 1), dtype=np.float32)

    def verify(self) -> str | None:
        self.comm.all_reduce(self.x)
        want = self.world * (self.world + 1) / 2
        err = None if (self.x == want).all() else f"got {self.x[:4]}, expected {want}"
        self.x.fill(0.0)
        return err

    def run(self, n: int) -> None:
        all_reduce, x = self.comm.all_reduce, self.x
        for _ in range(n):
            all_reduce(x)

    def free(self) -> None:
        self.x = None

    def close(self) -> None:
        self.comm.close()


def master_round_trip(master: str, samples: int) -> float:
    """Median seconds of ``are_peers_pending()`` (one request, one reply)."""
    import pccl

    with pccl.Communicator(master) as comm:
        comm.connect(timeout=30)
        for _ in range(20):
            comm.are_peers_pending()
        times = []
        for _ in range(samples):
            t0 = time.perf_counter()
            comm.are_peers_pending()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def latency(args, master: str, tmpdir: str) -> tuple[list[dict], float]:
    policy = c.TimingPolicy(
        warmup=20, iters=args.iters, min_iters=5, target_sample_s=0.02, budget_s=args.budget
    )
    rows: list[dict] = []
    rtt = master_round_trip(master, 500)
    log(f"master round trip (are_peers_pending): {rtt * 1e6:.0f} us")
    import os

    for world in args.worlds:
        groups = {
            "comm": lambda w=world: c.WorkerGroup(
                CommWorker, w, {"master": master, "k": args.k}, name="comm"
            ),
            "static": lambda w=world: c.WorkerGroup(PcclWorker, w, {"k": args.k}, name="static"),
            "gloo": lambda w=world: c.WorkerGroup(
                GlooWorker,
                w,
                {"store": os.path.join(tmpdir, f"gloo-{w}-{time.monotonic_ns()}")},
                name="gloo",
            ),
        }
        live = {}
        try:
            for name, make in groups.items():
                live[name] = make()
            for i, size in enumerate(args.sizes):
                row = {"world": world, "bytes": size}
                names = list(live)
                names = names[i % len(names) :] + names[: i % len(names)]  # rotate the order
                for name in names:
                    m = c.measure(live[name], size, policy, timeout=120)
                    row[name] = m.median_s
                rows.append(row)
                log(
                    f"[world {world}] {c.fmt_size(size):>8}: comm {row['comm'] * 1e6:8.1f} us, "
                    f"static {row['static'] * 1e6:8.1f} us, gloo {row['gloo'] * 1e6:8.1f} us"
                )
        finally:
            for g in live.values():
                g.close()
    return rows, rtt


def recovery(args, tmpdir: str) -> list[dict]:
    from pccl.testing.peer_worker import MasterProcess, PeerProcess, gather, send_all

    trials = []
    n = 4 << 20  # 16 MiB of float32
    for trial in range(args.kill_trials):
        master = MasterProcess(tmpdir)
        peers: list[PeerProcess] = []
        try:
            peers = [PeerProcess(tmpdir, master.address, i, connections=args.k) for i in range(4)]
            send_all(peers, "connect", timeout=60)
            send_all(peers, "sync_world", n=4, timeout=60)
            gather(peers, 90)
            gather(peers, 90)
            send_all(peers, "all_reduce", n=n, seed=trial, retry=True)
            for p in peers:
                p.wait_event("started", 60, seed=trial)
            victim, survivors = peers[trial % 4], [p for p in peers if p is not peers[trial % 4]]
            t_kill = time.monotonic()
            victim.signal(signal.SIGKILL)
            replies = gather(survivors, 60)
            errors = [r["t_error"] - t_kill for r in replies if "t_error" in r]
            if len(errors) != len(survivors):
                log(f"trial {trial}: the operation completed before the kill; not counted")
                continue
            trials.append(
                {
                    "to_error_s": max(errors),
                    "to_success_s": max(r["t_done"] - t_kill for r in replies),
                }
            )
            log(
                f"trial {trial}: SIGKILL -> PeerLostError {max(errors) * 1e3:.0f} ms, "
                f"-> next success {trials[-1]['to_success_s'] * 1e3:.0f} ms"
            )
        finally:
            for p in peers:
                p.kill()
            master.kill()
    return trials


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=c.parse_list, default=[2, 4])
    parser.add_argument(
        "--sizes",
        type=lambda s: c.parse_list(s, c.parse_size),
        default=c.parse_list(DEFAULT_SIZES, c.parse_size),
        help="float32 all-reduce sizes in bytes (K/M suffixes)",
    )
    parser.add_argument("--k", type=int, default=4, help="p2p connections (pccl)")
    parser.add_argument("--iters", type=int, default=15, help="timed samples per size")
    parser.add_argument("--budget", type=float, default=1.5, help="seconds of timing per size")
    parser.add_argument("--kill-trials", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and trials")
    args = parser.parse_args()
    if args.quick:
        args.sizes = c.parse_list("4,4K,64K", c.parse_size)
        args.kill_trials, args.iters, args.budget = 2, 7, 0.5
    c.install_cleanup()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pccl-cp-bench-") as tmpdir:
        from pccl.testing.peer_worker import MasterProcess

        master = MasterProcess(tmpdir)
        try:
            rows, rtt = latency(args, master.address, tmpdir)
        finally:
            master.kill()
        trials = recovery(args, tmpdir)

    table = []
    for r in rows:
        ratio = r["comm"] / r["gloo"]
        overhead = r["comm"] - r["static"]
        table.append(
            [
                str(r["world"]),
                c.fmt_size(r["bytes"]),
                f"{r['comm'] * 1e6:.0f}",
                f"{r['static'] * 1e6:.0f}",
                f"{r['gloo'] * 1e6:.0f}",
                f"{ratio:.2f}x",
                f"{overhead * 1e6:.0f}",
                f"{overhead / rtt:.2f}",
            ]
        )
    styles = [
        [None] * 5
        + ["green" if float(t[5][:-1]) <= TARGET_GLOO_RATIO else "red"]
        + [None, "green" if float(t[7]) <= 1.3 else "red"]
        for t in table
    ]
    c.print_table(
        "Small all-reduce latency (float32, in place, median per op, microseconds)",
        [
            "world",
            "size",
            "Communicator",
            "StaticRing",
            "gloo",
            "Comm/gloo",
            "control overhead",
            "in master RTTs",
        ],
        table,
        styles,
        caption=f"master round trip (are_peers_pending) = {rtt * 1e6:.0f} us; "
        f"target Comm/gloo <= {TARGET_GLOO_RATIO:g}x, overhead <= 1 round trip",
    )
    if trials:
        err = [t["to_error_s"] * 1e3 for t in trials]
        ok = [t["to_success_s"] * 1e3 for t in trials]
        c.print_table(
            f"Recovery from SIGKILL, world 4 -> 3, 16 MiB all-reduce ({len(trials)} trials, ms)",
            ["", "median", "max"],
            [
                ["SIGKILL -> PeerLostError", f"{statistics.median(err):.0f}", f"{max(err):.0f}"],
                [
                    "SIGKILL -> next successful all_reduce",
                    f"{statistics.median(ok):.0f}",
                    f"{max(ok):.0f}",
                ],
            ],
        )
    out = c.write_json(
        Path(c.OUT_DIR) / "control_plane.json",
        {
            "benchmark": "control_plane",
            "machine": c.machine_info(),
            "args": vars(args),
            "master_rtt_s": rtt,
            "latency": rows,
            "recovery": trials,
            "elapsed_s": time.monotonic() - t0,
        },
    )
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
