"""All-reduce on one machine: pccl vs torch.distributed (gloo) vs the raw TCP floor.

For each world size and float32 tensor size, in one run, this times

* **pccl**: ``pccl.StaticRing(rank, world, p2p_connections=K)`` and
  ``ring.all_reduce(x)`` in place on a numpy array;
* **gloo**: ``torch.distributed`` with the gloo backend (FileStore
  rendezvous, loopback interface), ``dist.all_reduce(t)`` in place;
* **floor**: a raw TCP ring that moves exactly the bytes of a ring
  all-reduce and reduces nothing (``raw_tcp_ring.py``); the best of its
  configurations per size, i.e. the fastest this machine moves those bytes;
* **sum ring** (reference, not a target): the same raw ring that also
  sums for real (numpy adds each reduce-scatter arrival into the buffer,
  in place, no framing, no checks, no copy of the input kept).  It prices
  the reduction (and the Python loop's per-receive cost): pccl/sum is
  roughly what pccl's machinery and its input guarantee add to summing.

and reports bus bandwidth = 2(n-1)/n * bytes / time (median over timed
samples), the ratios pccl/gloo, pccl/floor, sum/floor and pccl/sum, and
the extra peak RSS per process during the operations (max over ranks;
"1.00x" = one tensor's size).
Every process runs on 127.0.0.1; listeners bind port 0.  Numbers go to
``benchmarks/out/allreduce_loopback.json`` (and a PNG plot when matplotlib
is installed).

    python benchmarks/allreduce_loopback.py            # full run, 3-5 minutes
    python benchmarks/allreduce_loopback.py --quick    # smoke test, < 1 minute
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
from raw_tcp_ring import RawRingWorker

DEFAULT_SIZES = "64K,256K,1M,4M,16M,64M,256M"
QUICK_SIZES = "64K,1M,16M"
DEFAULT_FLOOR = "poll:1,poll:4,threads:1"
DEFAULT_SUM_RING = "poll:1,poll:4"
DEFAULT_K_SWEEP = "1,4,8,16"
TARGET_GLOO = 1.0       # issue 2: pccl >= 1.0x gloo for sizes >= 1 MiB
TARGET_FLOOR = 0.85     # and >= 0.85x the floor
TARGET_FROM = c.MIB


# --------------------------------------------------------------------------
# Workers (instantiated in the child processes).


def _check_sum(x: np.ndarray, world: int) -> str | None:
    """Every element must be 1 + 2 + ... + world.  Checked in blocks: a
    whole-tensor comparison would allocate a quarter of the tensor's size
    inside the memory window."""
    want = np.float32(world * (world + 1) / 2)
    block = 1 << 16
    for start in range(0, x.size, block):
        part = x[start:start + block]
        if not (part == want).all():
            bad = start + int(np.flatnonzero(part != want)[0])
            return f"element {bad} is {x[bad]!r}, expected {want}"
    return None


class PcclWorker:
    """``pccl.StaticRing`` all-reduce, in place (or into ``out=`` with
    ``out_of_place``)."""

    def __init__(self, rank: int, world: int, options: dict):
        import pccl

        self.pccl = pccl
        self.rank = rank
        self.world = world
        self.out_of_place = bool(options.get("out_of_place"))
        self.ring = pccl.StaticRing(rank, world, listen="127.0.0.1:0",
                                    p2p_connections=int(options["k"]), **c.slice_kwargs(options))
        self.x = self.y = None

    def info(self) -> dict:
        return {"address": self.ring.address, "version": self.pccl.version()}

    def connect(self, infos: list[dict]) -> None:
        self.ring.connect([i["address"] for i in infos], timeout=60)

    def alloc(self, nbytes: int) -> None:
        self.x = np.empty(nbytes // 4, dtype=np.float32)
        self.x.fill(self.rank + 1)
        if self.out_of_place:
            self.y = np.empty_like(self.x)
            self.y.fill(0.0)

    def verify(self) -> str | None:
        self.ring.all_reduce(self.x, out=self.y, timeout=120)
        err = _check_sum(self.x if self.y is None else self.y, self.world)
        self.x.fill(0.0)    # sums of zeros stay finite however often we reduce
        return err

    def run(self, n: int) -> None:
        ring, x, y = self.ring, self.x, self.y
        for _ in range(n):
            ring.all_reduce(x, out=y)

    def free(self) -> None:
        self.x = self.y = None

    def close(self) -> None:
        self.ring.close()


class GlooWorker:
    """``torch.distributed`` with the gloo backend, in place."""

    def __init__(self, rank: int, world: int, options: dict):
        # Gloo picks the interface of the host name unless told otherwise.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        import torch
        import torch.distributed as dist

        self.torch = torch
        self.dist = dist
        self.rank = rank
        self.world = world
        self.store_path = options["store"]
        self.x = None

    def info(self) -> dict:
        return {"version": self.torch.__version__}

    def connect(self, infos: list[dict]) -> None:
        from datetime import timedelta

        store = self.dist.FileStore(self.store_path, self.world)
        self.dist.init_process_group("gloo", store=store, rank=self.rank,
                                     world_size=self.world, timeout=timedelta(seconds=120))

    def alloc(self, nbytes: int) -> None:
        self.x = self.torch.full((nbytes // 4,), float(self.rank + 1), dtype=self.torch.float32)

    def verify(self) -> str | None:
        self.dist.all_reduce(self.x)
        err = _check_sum(self.x.numpy(), self.world)
        self.x.zero_()
        return err

    def run(self, n: int) -> None:
        all_reduce, x = self.dist.all_reduce, self.x
        for _ in range(n):
            all_reduce(x)

    def free(self) -> None:
        self.x = None

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


# --------------------------------------------------------------------------
# The run.


class Contender:
    """One configuration of one library, alive as a worker group per world."""

    def __init__(self, name: str, kind: str, worker_cls, options: dict):
        self.name = name
        self.kind = kind            # "pccl", "gloo", "floor" or "sum" (reducing floor)
        self.worker_cls = worker_cls
        self.options = options
        self.group: c.WorkerGroup | None = None
        self.failures = 0
        self.error: str | None = None
        self.infos: list[dict] = []

    def start(self, world: int, tmpdir: str, pin: bool = True) -> None:
        opts = dict(self.options)
        if self.kind == "gloo":
            # A fresh FileStore per group: no ports to pick, nothing left over.
            opts["store"] = os.path.join(tmpdir, f"gloo-{world}-{time.monotonic_ns()}")
        self.group = c.WorkerGroup(self.worker_cls, world, opts, name=self.name, pin=pin)
        self.infos = self.group.infos

    def stop(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None


def build_contenders(args) -> list[Contender]:
    out = []
    if "pccl" in args.backends:
        ks = [args.k] + [k for k in args.k_sweep if k != args.k]
        for k in ks:
            out.append(Contender(f"pccl K={k}", "pccl", PcclWorker,
                                 {"k": k, "out_of_place": args.out_of_place,
                                  "slice": args.slice_bytes}))
    if "gloo" in args.backends:
        out.append(Contender("gloo", "gloo", GlooWorker, {}))
    if "floor" in args.backends:
        for spec in args.floor:
            engine, _, k = spec.partition(":")
            out.append(Contender(f"floor {engine} K={k or 1}", "floor", RawRingWorker,
                                 {"engine": engine, "connections": int(k or 1),
                                  "sockbuf": args.floor_sockbuf, "slice_bytes": args.floor_slice}))
    for spec in args.sum_ring if "floor" in args.backends else []:
        k = int(spec.partition(":")[2])
        out.append(Contender(f"sum ring poll K={k}", "sum", RawRingWorker,
                             {"engine": "poll", "connections": k, "reduce": 1,
                              "sockbuf": args.floor_sockbuf, "slice_bytes": args.floor_slice}))
    return out


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args) -> dict:
    policy = c.TimingPolicy(warmup=args.warmup, iters=args.iters, min_iters=args.min_iters,
                            target_sample_s=args.sample_ms / 1000, budget_s=args.budget)
    contenders = build_contenders(args)
    if args.wait_quiet > 0:
        busy = c.wait_for_quiet(args.wait_quiet, log=log)
        log(f"machine {busy:.0%} busy at start")
    foreign = c.ForeignLoad()
    results: list[dict] = []
    versions: dict[str, str] = {}
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pccl-bench-") as tmpdir:
        for world in args.worlds:
            for ct in contenders:
                ct.failures, ct.error = 0, None
                try:
                    ct.start(world, tmpdir, pin=args.pin)
                    if ct.infos and "version" in ct.infos[0]:
                        versions[ct.kind] = ct.infos[0]["version"]
                except c.BenchmarkError as e:
                    ct.error = _first_line(e)
                    log(f"[world {world}] {ct.name}: cannot start: {ct.error}")
            try:
                for i, size in enumerate(args.sizes):
                    # Contenders take turns within each size (rounds), and
                    # the order rotates from size to size, so changes in
                    # the machine's load hit them all alike.
                    shift = i % len(contenders)
                    order = contenders[shift:] + contenders[:shift]
                    results += _measure_size(order, world, size, policy, args.rounds, tmpdir,
                                             args.pin)
            finally:
                for ct in contenders:
                    ct.stop()
    return {
        "benchmark": "allreduce_loopback",
        "dtype": "float32",
        "op": "sum",
        "in_place": not args.out_of_place,
        "targets": {"pccl_over_gloo": TARGET_GLOO, "pccl_over_floor": TARGET_FLOOR,
                    "from_bytes": TARGET_FROM},
        "versions": versions,
        "machine": c.machine_info(),
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "policy": vars(policy),
        "elapsed_s": time.monotonic() - t_start,
        "foreign_load": foreign.report(),
        "results": results,
    }


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    # The last line of a worker traceback is the informative one.
    return (lines[-1] if len(lines) > 1 else lines[0]) if lines else type(e).__name__


def _measure_size(contenders: list[Contender], world: int, size: int, policy, rounds: int,
                  tmpdir: str, pin: bool = True) -> list[dict]:
    rows, live = [], []
    for ct in contenders:
        if ct.group is None and ct.error is None:
            try:
                ct.start(world, tmpdir, pin)    # restart after an earlier failure
            except c.BenchmarkError as e:
                ct.error = _first_line(e)
        if ct.group is not None:
            live.append(ct)
        else:
            rows.append({"contender": ct.name, "kind": ct.kind, "options": ct.options,
                         "world": world, "bytes": size, "error": ct.error})
    outcomes = c.measure_interleaved([ct.group for ct in live], size, policy,
                                     rounds=rounds, timeout=120)
    for ct, m in zip(live, outcomes, strict=True):
        row = {"contender": ct.name, "kind": ct.kind, "options": ct.options,
               "world": world, "bytes": size}
        if isinstance(m, c.BenchmarkError):
            # The group is out of step now: drop it, and restart it for the
            # next size unless it keeps failing.
            ct.stop()
            ct.failures += 1
            msg = _first_line(m)
            if ct.failures >= 2:
                ct.error = msg
            log(f"[world {world}] {ct.name:>18} {c.fmt_size(size):>8}: FAILED: {msg}")
            row["error"] = msg
        else:
            row.update(m.as_dict())
            log(f"[world {world}] {ct.name:>18} {c.fmt_size(size):>8}: {m.busbw:6.2f} GB/s "
                f"(median of {len(m.samples_s)} x {m.batch}), "
                f"extra {max(m.extra_mem, default=0) / c.MIB:7.1f} MiB")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------
# Report.


def summarize(data: dict, default_pccl: str) -> list[dict]:
    """One row per (world, size): the numbers of the table."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in data["results"]:
        by_key.setdefault((r["world"], r["bytes"]), {})[r["contender"]] = r
    rows = []
    for (world, size), cs in sorted(by_key.items()):
        def ok(r):
            return r is not None and not r.get("error") and r.get("busbw_GBps")

        pccl = cs.get(default_pccl)
        pccls = [r for r in cs.values() if r["kind"] == "pccl" and ok(r)]
        best_pccl = max(pccls, key=lambda r: r["busbw_GBps"], default=None)
        gloo = cs.get("gloo")
        floors = [r for r in cs.values() if r["kind"] == "floor" and ok(r)]
        floor = max(floors, key=lambda r: r["busbw_GBps"], default=None)
        sums = [r for r in cs.values() if r["kind"] == "sum" and ok(r)]
        best_sum = max(sums, key=lambda r: r["busbw_GBps"], default=None)
        row = {
            "world": world,
            "bytes": size,
            "pccl_GBps": pccl["busbw_GBps"] if ok(pccl) else None,
            "pccl_error": pccl.get("error") if pccl else None,
            "pccl_best_GBps": best_pccl["busbw_GBps"] if best_pccl else None,
            "pccl_best_k": best_pccl["options"]["k"] if best_pccl else None,
            "gloo_GBps": gloo["busbw_GBps"] if ok(gloo) else None,
            "floor_GBps": floor["busbw_GBps"] if floor else None,
            "floor_config": floor["contender"] if floor else None,
            "sum_ring_GBps": best_sum["busbw_GBps"] if best_sum else None,
            "sum_ring_config": best_sum["contender"] if best_sum else None,
            "pccl_extra_mem_over_tensor": pccl["extra_mem_over_tensor"] if ok(pccl) else None,
            "pccl_extra_mem_MiB": pccl["extra_mem_max_MiB"] if ok(pccl) else None,
            "pccl_retained_MiB": (max(pccl["retained_after_free_bytes_per_rank"]) / c.MIB
                                  if ok(pccl) else None),
            "gloo_extra_mem_over_tensor": gloo["extra_mem_over_tensor"] if ok(gloo) else None,
            "gloo_extra_mem_MiB": gloo["extra_mem_max_MiB"] if ok(gloo) else None,
            "floor_extra_mem_MiB": floor["extra_mem_max_MiB"] if floor else None,
        }
        p = row["pccl_GBps"]
        row["pccl_over_gloo"] = p / row["gloo_GBps"] if p and row["gloo_GBps"] else None
        row["pccl_over_floor"] = p / row["floor_GBps"] if p and row["floor_GBps"] else None
        b = row["pccl_best_GBps"]
        row["best_over_floor"] = b / row["floor_GBps"] if b and row["floor_GBps"] else None
        row["gloo_over_floor"] = (row["gloo_GBps"] / row["floor_GBps"]
                                  if row["gloo_GBps"] and row["floor_GBps"] else None)
        s = row["sum_ring_GBps"]
        row["sum_ring_over_floor"] = s / row["floor_GBps"] if s and row["floor_GBps"] else None
        row["pccl_over_sum_ring"] = p / s if p and s else None
        rows.append(row)
    return rows


def _num(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _mem(mib, ratio) -> str:
    if mib is None:
        return "-"
    return f"{mib:.1f} ({ratio:.2f}x)" if ratio is not None else f"{mib:.1f}"


def print_report(data: dict, rows: list[dict], args) -> None:
    sweep = len([k for k in args.k_sweep if k != args.k]) > 0
    cols = ["world", "size", f"pccl K={args.k}"]
    if sweep:
        cols.append("best K")
    cols += ["gloo", "floor", "pccl/gloo", "pccl/floor"]
    if sweep:
        cols.append("best/floor")
    cols.append("gloo/floor")
    sums = any(r["sum_ring_GBps"] for r in rows)
    if sums:
        cols += ["sum/floor", "pccl/sum"]
    cols += ["pccl +MiB", "pccl kept", "gloo +MiB"]
    table, styles = [], []
    for r in rows:
        cells = [str(r["world"]), c.fmt_size(r["bytes"]), _num(r["pccl_GBps"])]
        st: list[str | None] = [None, None, None]
        if r["pccl_GBps"] is None and r["pccl_error"]:
            cells[-1] = "error"
            st[-1] = "red"
        if sweep:
            cells.append(f"{_num(r['pccl_best_GBps'])} K={r['pccl_best_k']}"
                         if r["pccl_best_GBps"] else "-")
            st.append(None)
        cells += [_num(r["gloo_GBps"]), _num(r["floor_GBps"]),
                  _num(r["pccl_over_gloo"], "{:.2f}x"), _num(r["pccl_over_floor"], "{:.2f}x")]
        if sweep:
            cells.append(_num(r["best_over_floor"], "{:.2f}x"))
        cells.append(_num(r["gloo_over_floor"], "{:.2f}x"))
        if sums:
            cells += [_num(r["sum_ring_over_floor"], "{:.2f}x"),
                      _num(r["pccl_over_sum_ring"], "{:.2f}x")]
        cells += [_mem(r["pccl_extra_mem_MiB"], r["pccl_extra_mem_over_tensor"]),
                  _num(r["pccl_retained_MiB"], "{:.1f}"),
                  _mem(r["gloo_extra_mem_MiB"], r["gloo_extra_mem_over_tensor"])]
        st += [None] * (len(cells) - len(st))
        if r["bytes"] >= TARGET_FROM:
            for col, key, target in (("pccl/gloo", "pccl_over_gloo", TARGET_GLOO),
                                     ("pccl/floor", "pccl_over_floor", TARGET_FLOOR),
                                     ("best/floor", "best_over_floor", TARGET_FLOOR)):
                if col in cols and r[key] is not None:
                    st[cols.index(col)] = "green" if r[key] >= target else "red"
        table.append(cells)
        styles.append(st)
    m = data["machine"]
    methods = ", ".join(sorted({r["mem_method"] for r in data["results"] if r.get("mem_method")}))
    k_note = f"best K = fastest pccl of K in {sorted({args.k, *args.k_sweep})}. " if sweep else ""
    cpus = c.pin_cpus()
    pin_note = (f"Every contender's rank r runs pinned to CPU number r mod {len(cpus)} "
                f"(CPUs {', '.join(map(str, cpus))}; --no-pin: the scheduler places them)."
                if args.pin and cpus
                else "Ranks not pinned to CPUs.")
    sum_note = (f"sum = best of {', '.join(args.sum_ring)}: the same raw ring summing for real "
                f"(no framing, no checks, input not kept): what summing costs a minimal "
                f"Python ring; a reference, not a target.\n" if sums else "")
    caption = (
        f"bus bandwidth GB/s = 2(n-1)/n * bytes / median time; float32 SUM, "
        f"{'in place' if data['in_place'] else 'out of place (pccl)'}. "
        f"Targets for >= 1 MiB: pccl/gloo >= {TARGET_GLOO}, pccl/floor >= {TARGET_FLOOR}.\n"
        f"{k_note}floor = best of {', '.join(args.floor)} per size "
        f"(raw TCP ring, no reduction).\n"
        f"{sum_note}{pin_note}\n"
        f"+MiB = peak RSS during the ops minus RSS with the tensor resident, max over ranks "
        f"({methods or '-'}; 1.00x = one tensor); kept = pccl memory still resident after "
        f"the tensor is freed.\n"
        f"{m.get('cpus')} CPUs, Linux {m.get('kernel')}, Python {m.get('python')}, "
        f"versions {data['versions']}; {data['elapsed_s']:.0f} s; other processes used "
        f"{data['foreign_load'].get('foreign_share', 0):.0%} of the CPU meanwhile."
    )
    c.print_table("all-reduce on 127.0.0.1: bus bandwidth (GB/s)", cols, table, styles, caption)
    share = data["foreign_load"].get("foreign_share", 0.0)
    if share > 0.05:
        log(f"warning: other processes used {share:.0%} of the machine's CPU time while this "
            f"ran ({data['foreign_load']['foreign_cpu_s']:.0f} CPU-s): the numbers are "
            f"disturbed; rerun on a quiet machine (--wait-quiet helps)")


def plot(rows: list[dict], path: Path, args) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    worlds = sorted({r["world"] for r in rows})
    fig, axes = plt.subplots(1, len(worlds), figsize=(6 * len(worlds), 4.2), squeeze=False)
    for ax, world in zip(axes[0], worlds, strict=True):
        rs = [r for r in rows if r["world"] == world]
        xs = [r["bytes"] for r in rs]
        for key, label in (("pccl_GBps", f"pccl K={args.k}"), ("pccl_best_GBps", "pccl best K"),
                           ("gloo_GBps", "gloo"), ("floor_GBps", "raw TCP floor")):
            if key == "pccl_best_GBps" and not [k for k in args.k_sweep if k != args.k]:
                continue
            ys = [r[key] if r[key] is not None else float("nan") for r in rs]
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [c.fmt_size(x).replace(" ", "") for x in xs])
        ax.set_xlabel("tensor size (float32)")
        ax.set_ylabel("bus bandwidth (GB/s)")
        ax.set_title(f"all-reduce, world {world}, 127.0.0.1")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------
# Command line.


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the ones that depend on --quick (None here)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Time float32 all-reduce on 127.0.0.1: pccl vs torch.distributed (gloo) "
                    "vs a raw TCP ring that only moves the bytes (the data-movement floor).",
        formatter_class=_HelpFormatter,
    )
    ap.add_argument("--worlds", default="2,4", help="world sizes (processes)")
    ap.add_argument("--sizes", default=None,
                    help=f"tensor sizes in bytes, K/M/G suffixes [default: {DEFAULT_SIZES}; "
                         f"--quick: {QUICK_SIZES}]")
    ap.add_argument("--backends", default="pccl,gloo,floor", help="which contenders to run")
    ap.add_argument("-k", "--k", type=int, default=4,
                    help="pccl p2p_connections (TCP connections per ring neighbour)")
    ap.add_argument("--k-sweep", default=None,
                    help="also time pccl with these K and report the best; '' for none "
                         "[default: 1,4,8,16; --quick: none]")
    ap.add_argument("--slice-bytes", type=c.parse_size, default=None, metavar="BYTES",
                    help="pccl's largest slice on the wire (default: the library's)")
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="do not pin rank r of every contender to CPU r mod ncpu (pinning "
                    "keeps the scheduler from stacking both ends of a ring edge on one "
                    "CPU after a pause, which halves any contender's speed at random)")
    ap.add_argument("--out-of-place", action="store_true",
                    help="pccl reduces into a separate out= array instead of in place")
    ap.add_argument("--floor", default=DEFAULT_FLOOR,
                    help="floor configurations ENGINE:K (engine threads or poll); "
                         "the best per size is the floor")
    ap.add_argument("--sum-ring", default=None, metavar="poll:K,...",
                    help="also time the raw ring summing for real with these K connections "
                         "(the best per size is the reference for the reduction's own price; "
                         "runs with the floor; '' for none) "
                         f"[default: {DEFAULT_SUM_RING}; --quick: none]")
    ap.add_argument("--floor-sockbuf", type=c.parse_size, default=0,
                    help="floor SO_SNDBUF/SO_RCVBUF in bytes (0 = kernel autotuning)")
    ap.add_argument("--floor-slice", type=c.parse_size, default=256 * 1024,
                    help="floor forwarding granularity in bytes")
    ap.add_argument("--iters", type=int, default=None,
                    help="timed samples at most per measurement [default 20; --quick 5]")
    ap.add_argument("--min-iters", type=int, default=None,
                    help="timed samples at least [default 5; --quick 3]")
    ap.add_argument("--warmup", type=int, default=None,
                    help="warm-up operations [default 3; --quick 1]")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of timed work to aim for per measurement "
                         "[default 2.5; --quick 0.3]")
    ap.add_argument("--rounds", type=int, default=None,
                    help="split each measurement's samples into this many rounds, the "
                         "contenders taking turns [default 3; --quick 1]")
    ap.add_argument("--sample-ms", type=float, default=20.0,
                    help="batch fast operations so one timed sample lasts at least this long")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 3 sizes, few iterations, one floor configuration")
    ap.add_argument("--out", type=Path, default=c.OUT_DIR / "allreduce_loopback.json",
                    help="JSON output (a PNG plot is written beside it)")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="first wait up to this long for the machine's CPUs to be idle")
    args = ap.parse_args(argv)

    q = args.quick
    args.worlds = c.parse_list(args.worlds)
    args.sizes = c.parse_list(args.sizes or (QUICK_SIZES if q else DEFAULT_SIZES), c.parse_size)
    args.backends = c.parse_list(args.backends, str.strip)
    if args.k_sweep is None:
        args.k_sweep = "" if q else DEFAULT_K_SWEEP
    args.k_sweep = c.parse_list(args.k_sweep)
    args.floor = c.parse_list("poll:1" if q and args.floor == DEFAULT_FLOOR else args.floor,
                              str.strip)
    if args.sum_ring is None:
        args.sum_ring = "" if q else DEFAULT_SUM_RING
    args.sum_ring = c.parse_list(args.sum_ring, str.strip)
    for spec in args.sum_ring:
        engine, _, k = spec.partition(":")
        if engine != "poll" or not k.isdigit() or int(k) < 1:
            ap.error(f"--sum-ring takes poll:K with K >= 1, got {spec!r}")
    args.iters = args.iters or (5 if q else 20)
    args.min_iters = args.min_iters or (3 if q else 5)
    args.warmup = args.warmup or (1 if q else 3)
    args.budget = args.budget or (0.3 if q else 2.5)
    args.rounds = max(1, args.rounds or (1 if q else 3))
    if q:
        args.sample_ms = min(args.sample_ms, 10.0)
    bad = [b for b in args.backends if b not in ("pccl", "gloo", "floor")]
    if bad:
        ap.error(f"unknown backend(s): {', '.join(bad)}")
    if any(w < 2 for w in args.worlds):
        ap.error("world sizes must be >= 2")
    if any(s <= 0 or s % 4 for s in args.sizes):
        ap.error("sizes must be positive multiples of 4 bytes (float32)")
    for spec in args.floor:
        engine = spec.partition(":")[0]
        if engine not in ("threads", "poll"):
            ap.error(f"floor engine must be threads or poll, got {spec!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    c.install_cleanup()
    try:
        data = run(args)
    except KeyboardInterrupt:
        log("interrupted")
        c.kill_all_workers()
        return 130
    rows = summarize(data, f"pccl K={args.k}")
    data["summary"] = rows
    print_report(data, rows, args)
    path = c.write_json(args.out, data)
    log(f"wrote {path}")
    if not args.no_plot:
        png = plot(rows, args.out.with_suffix(".png"), args)
        if png:
            log(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
