"""Steady A/B timing of all-reduce configurations, or of two builds of pccl.

``allreduce_loopback.py`` sweeps sizes and contenders once; this script
answers a narrower question with less noise: is configuration A faster
than B at one world size and one tensor size?  Every contender's worker
group stays alive for the whole run, ranks pinned to CPUs, and the
contenders take turns round after round, so a slow phase of the machine
hits all of them alike.  Each turn is many back-to-back operations; the
result is the median turn per contender, with the machine's CPU time per
operation beside it (on a CPU-bound host that is what a change moves).

A contender is ``KIND:key=value,...``:

* ``pccl:k=4,oop=1,slice=262144``: ``pccl.StaticRing`` with
  ``p2p_connections=k``, in place unless ``oop=1``, ``slice`` = the largest
  slice in bytes;
* ``floor:connections=4,engine=threads``: the raw TCP ring of
  ``raw_tcp_ring.py`` (keys as its worker takes them);

and, for any kind, ``python=/path/to/venv/bin/python`` runs the workers
under another virtual environment of the same Python version (its own
installed pccl: build the old commit into a copy of ``.venv`` and compare
builds in one run) and ``env.NAME=VALUE`` sets an environment variable in
the workers (for experiment switches).  The last contender is the
reference of the ratio column.

    .venv/bin/python benchmarks/ab_steady.py --world 2 --size 4M \\
        pccl:k=4,python=/tmp/old/bin/python pccl:k=4 floor:connections=4
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import _common as c

# Workers started under another venv's interpreter inherit this process's
# sys.path (multiprocessing's spawn sends it along); point the entries of
# the parent's environment at their own before anything imports pccl.
_PARENT_PREFIX_ENV = "PCCL_AB_PARENT_PREFIX"
_parent_prefix = os.environ.get(_PARENT_PREFIX_ENV)
if _parent_prefix and _parent_prefix != sys.prefix:
    sys.path[:] = [p.replace(_parent_prefix, sys.prefix, 1) if p.startswith(_parent_prefix)
                   else p for p in sys.path]

from allreduce_loopback import PcclWorker  # noqa: E402
from raw_tcp_ring import RawRingWorker  # noqa: E402

KINDS = {"pccl": PcclWorker, "floor": RawRingWorker}
PCCL_KEYS = {"k", "oop", "slice"}
FLOOR_KEYS = {"connections", "sockbuf", "slice_bytes", "engine", "reduce"}


@dataclass
class Contender:
    label: str
    kind: str
    options: dict
    python: str = sys.executable
    env: dict = field(default_factory=dict)


def parse_contender(text: str) -> Contender:
    """``KIND:key=value,...`` -> Contender; ValueError on anything unknown."""
    kind, _, rest = text.partition(":")
    if kind not in KINDS:
        raise ValueError(f"{text!r}: kind must be one of {', '.join(KINDS)}")
    allowed = PCCL_KEYS if kind == "pccl" else FLOOR_KEYS
    out = Contender(label=text, kind=kind, options={})
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"{text!r}: {item!r} is not key=value")
        if key == "python":
            out.python = value
        elif key.startswith("env.") and len(key) > 4:
            out.env[key[4:]] = value
        elif key in allowed:
            out.options[key] = value
        else:
            raise ValueError(f"{text!r}: unknown key {key!r} for {kind} "
                             f"(known: {', '.join(sorted(allowed))}, python, env.NAME)")
    if kind == "pccl":
        out.options.setdefault("k", "4")
        out.options["out_of_place"] = out.options.pop("oop", "0") not in ("0", "")
    else:
        out.options.setdefault("connections", "1")
    return out


def start_group(ct: Contender, world: int) -> c.WorkerGroup:
    """The contender's workers, under its interpreter and environment."""
    saved = {k: os.environ.get(k) for k in [*ct.env, _PARENT_PREFIX_ENV]}
    os.environ.update(ct.env)
    os.environ[_PARENT_PREFIX_ENV] = sys.prefix
    c.CTX.set_executable(ct.python)
    try:
        return c.WorkerGroup(KINDS[ct.kind], world, ct.options, name=ct.label, pin=True)
    finally:
        c.CTX.set_executable(sys.executable)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def busy_cpu() -> float:
    got = c.machine_cpu_seconds()
    return got[0] if got else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="A contender: pccl:k=4,oop=1,slice=BYTES or floor:connections=4,engine=threads; "
               "any kind also takes python=INTERPRETER and env.NAME=VALUE.  "
               "The last contender is the reference of the ratio column.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("contenders", nargs="+", metavar="CONTENDER")
    ap.add_argument("--world", type=int, default=2, help="ranks per contender (default 2)")
    ap.add_argument("--size", default="4M", help="tensor bytes, e.g. 1M, 64M (default 4M)")
    ap.add_argument("--rounds", type=int, default=7, help="turns per contender (default 7)")
    ap.add_argument("--seconds", type=float, default=0.25,
                    help="approximate length of one turn at 5 GB/s (default 0.25)")
    ap.add_argument("--json", type=Path, metavar="PATH",
                    help="also write every turn's time and CPU per op, per contender")
    args = ap.parse_args(argv)
    try:
        size = c.parse_size(args.size)
        contenders = [parse_contender(t) for t in args.contenders]
    except ValueError as e:
        ap.error(str(e))
    if args.world < 2 or size < 4 or size % 4 or args.rounds < 1 or args.seconds <= 0:
        ap.error("need --world >= 2, --size >= 4 bytes and a multiple of 4 (float32), "
                 "--rounds >= 1, --seconds > 0")

    c.install_cleanup()
    iters = max(3, int(args.seconds * 5e9 / size))
    groups: list[c.WorkerGroup] = []
    try:
        for ct in contenders:
            g = start_group(ct, args.world)
            groups.append(g)
            errors = [e for e in g.call("alloc", size, timeout=300) if e]   # allocs, checks
            if errors:
                raise c.BenchmarkError(f"{ct.label}: wrong result: {errors[0]}")
            g.call("run", max(1, iters // 5), timeout=300)   # warm up
        # Per contender by position: the same contender may be given twice.
        wall: list[list[float]] = [[] for _ in contenders]
        cpu: list[list[float]] = [[] for _ in contenders]
        for r in range(args.rounds):
            print(f"\rround {r + 1}/{args.rounds}", end="", file=sys.stderr, flush=True)
            for i, g in enumerate(groups):
                c0, t0 = busy_cpu(), time.perf_counter()
                g.call("run", iters, timeout=600)
                wall[i].append((time.perf_counter() - t0) / iters)
                cpu[i].append((busy_cpu() - c0) / iters)
        print(file=sys.stderr)
    finally:
        for g in groups:
            g.close()

    ref = statistics.median(wall[-1])
    rows = []
    for ct, w, u in zip(contenders, wall, cpu, strict=True):
        med = statistics.median(w)
        rows.append([ct.label, f"{med * 1e6:.1f}", f"{min(w) * 1e6:.1f}",
                     f"{c.bus_bandwidth(size, args.world, med):.2f}",
                     f"{statistics.median(u) * 1e6:.0f}", f"{ref / med:.2f}"])
    c.print_table(f"world {args.world}, {c.fmt_size(size)} float32, {iters} ops per turn, "
                  f"{args.rounds} turns",
                  ["contender", "median µs/op", "min µs/op", "bus GB/s", "CPU µs/op",
                   "speed vs last"], rows)
    if args.json:
        c.write_json(args.json, {
            "world": args.world, "bytes": size, "ops_per_turn": iters,
            "contenders": [{"label": ct.label, "wall_s": w, "cpu_s": u}
                           for ct, w, u in zip(contenders, wall, cpu, strict=True)]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
