"""Broadcast, all-gather and reduce-scatter on one machine: pccl vs torch.distributed (gloo).

For each collective, world size and size, in one run, this times

* **pccl**: ``pccl.StaticRing(rank, world, p2p_connections=K)`` and
  ``ring.broadcast(x, root=0)`` / ``ring.all_gather(x, out)`` /
  ``ring.reduce_scatter(x, out)`` on numpy float32 arrays;
* **gloo**: ``torch.distributed`` with the gloo backend (FileStore
  rendezvous, loopback interface): ``dist.broadcast(t, src=0)``,
  ``dist.all_gather_into_tensor(out, t)``, ``dist.reduce_scatter_tensor(out, t)``.

The size is the whole buffer, as in nccl-tests: the broadcast buffer, the
all-gather's output (world blocks), the reduce-scatter's input (world
chunks).  Bus bandwidth = factor * size / median time with factor 1 for
the broadcast and (n-1)/n for all-gather and reduce-scatter (the bytes
each link carries, over the time), so that it is comparable with the
all-reduce's 2(n-1)/n.  Every result is checked once per size against the
expected values before timing.  Contenders take turns within each size
(``_common.measure_interleaved``), so a change in the machine's load hits
them alike.  Numbers go to ``benchmarks/out/collectives.json``.

    python benchmarks/collectives.py            # full run, ~5 minutes
    python benchmarks/collectives.py --quick    # smoke test, ~1 minute
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import _common as c
import numpy as np

COLLECTIVES = ("broadcast", "all_gather", "reduce_scatter")
DEFAULT_SIZES = "64K,256K,1M,4M,16M,64M,256M"
QUICK_SIZES = "64K,1M,16M"
TARGET_GLOO = 1.0   # issue 14: pccl >= 1.0x gloo from 1 MiB up
TARGET_FROM = c.MIB


def bus_factor(coll: str, world: int) -> float:
    return 1.0 if coll == "broadcast" else (world - 1) / world


def _shapes(coll: str, nbytes: int, world: int) -> tuple[int, int]:
    """(input elements, output elements) of one rank for a size in bytes."""
    total = nbytes // 4 // world * world  # divisible into world blocks
    if coll == "broadcast":
        return nbytes // 4, 0
    if coll == "all_gather":
        return total // world, total
    return total, total // world


def _expected(coll: str, rank: int, world: int, n_in: int, n_out: int):
    """What the output must hold after one op with inputs filled by _fill."""
    if coll == "broadcast":
        return np.float32(1.0)  # root 0's value
    if coll == "all_gather":
        return np.repeat(np.arange(1, world + 1, dtype=np.float32), n_in)
    return np.float32(world * (world + 1) / 2)


class _Worker:
    def __init__(self, rank: int, world: int, options: dict):
        self.rank, self.world, self.coll = rank, world, options["coll"]
        self.x = self.out = None

    def _fill(self):
        self.n_in, self.n_out = _shapes(self.coll, self.nbytes, self.world)

    def verify(self) -> str | None:
        if self.coll == "broadcast" and self.rank != 0:
            self._x_np().fill(0.0)
        self.run(1)
        got = self._x_np() if self.coll == "broadcast" else self._out_np()
        want = _expected(self.coll, self.rank, self.world, self.n_in, self.n_out)
        if not np.array_equal(got, np.broadcast_to(want, got.shape)):
            return f"{self.coll}: wrong result on rank {self.rank}"
        return None

    def free(self) -> None:
        self.x = self.out = None


class PcclWorker(_Worker):
    def __init__(self, rank: int, world: int, options: dict):
        super().__init__(rank, world, options)
        import pccl

        self.pccl = pccl
        self.ring = pccl.StaticRing(rank, world, listen="127.0.0.1:0",
                                    p2p_connections=int(options["k"]), **c.slice_kwargs(options))

    def info(self) -> dict:
        return {"address": self.ring.address, "version": self.pccl.version()}

    def connect(self, infos: list[dict]) -> None:
        self.ring.connect([i["address"] for i in infos], timeout=60)

    def alloc(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self._fill()
        self.x = np.full(self.n_in, self.rank + 1, dtype=np.float32)
        self.out = np.empty(self.n_out, dtype=np.float32) if self.n_out else None

    def _x_np(self):
        return self.x

    def _out_np(self):
        return self.out

    def run(self, n: int) -> None:
        ring, x, out = self.ring, self.x, self.out
        if self.coll == "broadcast":
            for _ in range(n):
                ring.broadcast(x, root=0)
        elif self.coll == "all_gather":
            for _ in range(n):
                ring.all_gather(x, out)
        else:
            for _ in range(n):
                ring.reduce_scatter(x, out)

    def close(self) -> None:
        self.ring.close()


class GlooWorker(_Worker):
    def __init__(self, rank: int, world: int, options: dict):
        super().__init__(rank, world, options)
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        import warnings

        # torch 2.13 calls the *_tensor forms deprecated; they are still
        # the fused calls gloo implements (and exist on older torch).
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch")
        import torch
        import torch.distributed as dist

        self.torch, self.dist = torch, dist
        self.store_path = options["store"]

    def info(self) -> dict:
        return {"version": self.torch.__version__}

    def connect(self, infos: list[dict]) -> None:
        from datetime import timedelta

        store = self.dist.FileStore(self.store_path, self.world)
        self.dist.init_process_group("gloo", store=store, rank=self.rank,
                                     world_size=self.world, timeout=timedelta(seconds=120))

    def alloc(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self._fill()
        t = self.torch
        self.x = t.full((self.n_in,), float(self.rank + 1), dtype=t.float32)
        self.out = t.empty(self.n_out, dtype=t.float32) if self.n_out else None

    def _x_np(self):
        return self.x.numpy()

    def _out_np(self):
        return self.out.numpy()

    def run(self, n: int) -> None:
        d, x, out = self.dist, self.x, self.out
        if self.coll == "broadcast":
            for _ in range(n):
                d.broadcast(x, src=0)
        elif self.coll == "all_gather":
            for _ in range(n):
                d.all_gather_into_tensor(out, x)
        else:
            for _ in range(n):
                d.reduce_scatter_tensor(out, x)

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args) -> dict:
    policy = c.TimingPolicy(warmup=args.warmup, iters=args.iters, min_iters=args.min_iters,
                            target_sample_s=args.sample_ms / 1000, budget_s=args.budget)
    foreign = c.ForeignLoad()
    results: list[dict] = []
    versions: dict[str, str] = {}
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pccl-bench-") as tmpdir:
        for world in args.worlds:
            for coll in args.collectives:
                groups: list[tuple[str, c.WorkerGroup]] = []
                try:
                    groups.append(("pccl", c.WorkerGroup(
                        PcclWorker, world, {"coll": coll, "k": args.k, "slice": args.slice_bytes},
                        name=f"pccl {coll}", pin=args.pin)))
                    if "gloo" in args.backends:
                        store = os.path.join(tmpdir, f"gloo-{world}-{coll}-{time.monotonic_ns()}")
                        groups.append(("gloo", c.WorkerGroup(
                            GlooWorker, world, {"coll": coll, "store": store},
                            name=f"gloo {coll}", pin=args.pin)))
                    for name, g in groups:
                        versions[name] = g.infos[0]["version"]
                    for i, size in enumerate(args.sizes):
                        order = groups[i % len(groups):] + groups[:i % len(groups)]
                        ms = c.measure_interleaved([g for _, g in order], size, policy,
                                                   rounds=args.rounds, timeout=120)
                        for (name, _), m in zip(order, ms, strict=True):
                            row = {"collective": coll, "contender": name, "world": world,
                                   "bytes": size}
                            if isinstance(m, c.BenchmarkError):
                                row["error"] = str(m).splitlines()[-1]
                                log(f"[{coll} world {world}] {name} {c.fmt_size(size)}: "
                                    f"FAILED {row['error']}")
                            else:
                                row.update(m.as_dict())
                                row["busbw_GBps"] = (bus_factor(coll, world) * size
                                                     / m.median_s / 1e9)
                                log(f"[{coll} world {world}] {name:>4} {c.fmt_size(size):>8}: "
                                    f"{row['busbw_GBps']:6.2f} GB/s")
                            results.append(row)
                finally:
                    for _, g in groups:
                        g.close()
    return {
        "benchmark": "collectives",
        "dtype": "float32",
        "targets": {"pccl_over_gloo": TARGET_GLOO, "from_bytes": TARGET_FROM},
        "versions": versions,
        "machine": c.machine_info(),
        "args": {k: v for k, v in vars(args).items()},
        "elapsed_s": time.monotonic() - t_start,
        "foreign_load": foreign.report(),
        "results": results,
    }


def print_report(data: dict) -> list[dict]:
    by: dict[tuple, dict[str, dict]] = {}
    for r in data["results"]:
        by.setdefault((r["collective"], r["world"], r["bytes"]), {})[r["contender"]] = r
    rows, table, styles = [], [], []
    for (coll, world, size), cs in by.items():
        p = None if cs.get("pccl", {}).get("error") else cs.get("pccl", {}).get("busbw_GBps")
        g = None if cs.get("gloo", {}).get("error") else cs.get("gloo", {}).get("busbw_GBps")
        ratio = p / g if p and g else None
        rows.append({"collective": coll, "world": world, "bytes": size, "pccl_GBps": p,
                     "gloo_GBps": g, "pccl_over_gloo": ratio})
        table.append([coll, str(world), c.fmt_size(size),
                      "-" if p is None else f"{p:.2f}", "-" if g is None else f"{g:.2f}",
                      "-" if ratio is None else f"{ratio:.2f}x"])
        ok = ratio is not None and ratio >= TARGET_GLOO
        styles.append([None] * 5 + [None if size < TARGET_FROM or ratio is None
                                    else ("green" if ok else "red")])
    m = data["machine"]
    caption = (
        f"bus bandwidth GB/s = factor * size / median time (broadcast 1, all-gather and "
        f"reduce-scatter (n-1)/n); size = the whole buffer; float32 (reduce-scatter SUM). "
        f"Target from 1 MiB: pccl/gloo >= {TARGET_GLOO}.\n"
        f"pccl K={data['args']['k']}. {m.get('cpus')} CPUs, versions {data['versions']}; "
        f"{data['elapsed_s']:.0f} s; other processes used "
        f"{data['foreign_load'].get('foreign_share', 0):.0%} of the CPU meanwhile."
    )
    c.print_table("collectives on 127.0.0.1: bus bandwidth (GB/s)",
                  ["collective", "world", "size", "pccl", "gloo", "pccl/gloo"], table, styles,
                  caption)
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Time float32 broadcast, all-gather and reduce-scatter on 127.0.0.1: "
                    "pccl vs torch.distributed (gloo).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--worlds", default="2,4", help="world sizes (processes)")
    ap.add_argument("--sizes", default=None,
                    help=f"buffer sizes, K/M/G suffixes (default {DEFAULT_SIZES}; "
                         f"--quick: {QUICK_SIZES})")
    ap.add_argument("--collectives", default=",".join(COLLECTIVES), help="which to time")
    ap.add_argument("--backends", default="pccl,gloo", help="pccl alone, or pccl,gloo")
    ap.add_argument("-k", "--k", type=int, default=4, help="pccl p2p_connections")
    ap.add_argument("--slice-bytes", type=c.parse_size, default=None, metavar="BYTES",
                    help="pccl's largest slice on the wire (default: the library's)")
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="do not pin rank r to CPU r mod ncpu")
    ap.add_argument("--iters", type=int, default=None, help="timed samples at most (20; quick 5)")
    ap.add_argument("--min-iters", type=int, default=None, help="timed samples at least (5; 3)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up operations (3; 1)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of timed work per measurement (2.0; quick 0.3)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="split samples into rounds, contenders taking turns (3; quick 1)")
    ap.add_argument("--sample-ms", type=float, default=20.0,
                    help="batch fast operations so one sample lasts at least this long")
    ap.add_argument("--quick", action="store_true", help="smoke test: 3 sizes, few iterations")
    ap.add_argument("--out", type=Path, default=c.OUT_DIR / "collectives.json",
                    help="JSON output")
    ap.add_argument("--report", type=Path, default=None, metavar="JSON",
                    help="print the table of an earlier run's JSON and exit")
    args = ap.parse_args(argv)
    q = args.quick
    args.worlds = c.parse_list(args.worlds)
    args.sizes = c.parse_list(args.sizes or (QUICK_SIZES if q else DEFAULT_SIZES), c.parse_size)
    args.collectives = c.parse_list(args.collectives, str.strip)
    args.backends = c.parse_list(args.backends, str.strip)
    bad = [x for x in args.collectives if x not in COLLECTIVES]
    if bad:
        ap.error(f"unknown collective(s): {', '.join(bad)}")
    if "pccl" not in args.backends or any(b not in ("pccl", "gloo") for b in args.backends):
        ap.error("--backends takes pccl or pccl,gloo")
    if any(w < 2 for w in args.worlds):
        ap.error("world sizes must be >= 2")
    if any(s < 4 * max(args.worlds) for s in args.sizes):
        ap.error("every size must hold at least one float32 per rank")
    args.iters = args.iters or (5 if q else 20)
    args.min_iters = args.min_iters or (3 if q else 5)
    args.warmup = args.warmup or (1 if q else 3)
    args.budget = args.budget or (0.3 if q else 2.0)
    args.rounds = max(1, args.rounds or (1 if q else 3))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        import json

        print_report(json.loads(args.report.read_text()))
        return 0
    c.install_cleanup()
    try:
        data = run(args)
    except KeyboardInterrupt:
        log("interrupted")
        c.kill_all_workers()
        return 130
    data["summary"] = print_report(data)
    log(f"wrote {c.write_json(args.out, data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
