"""Flow-splitting plans executed by pccl on a network-namespace leaf-spine
(issue 16, parts 3-4), measured against ECMP and packet spraying.

Root only (``pccl.testing.netns``).  One :mod:`pccl.testing.flowsplit_worker`
per host stays up for the whole run; each measurement sets a ring over a
placement of the ranks on the hosts, warms it up with a small all-reduce,
then times one all-reduce of ``nbytes`` float32 with the uplink byte
counters read around it.  Schemes, with the same ``K`` connections per ring
edge:

* ``minimal``: ``flowsplit.ring_connections`` plans each edge; every
  connection is pinned to its spine by a source port of
  ``LeafSpine.port_range(spine)`` and carries the plan's byte share;
* ``ecmp``: unpinned, equal striping; the leaves hash the 5-tuple
  (``fib_multipath_hash_policy=1``) onto a spine;
* ``spray``: unpinned, equal striping; the leaves spray per packet.

The model's prediction of a ring all-reduce is ``2(n-1)`` steps of
``flowsplit.step_time`` (every edge sends ``nbytes/n``): ``ideal`` with
``spray`` (fluid), and the ECMP expectation from ``monte_carlo`` of
``mp-K``.

    python benchmarks/flowsplit.py --testbed [--placements 10 --mib 64]
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence

from .. import flowsplit
from ..flowsplit import traffic
from .netns import LeafSpine, leaf_spine

SCHEMES = ("minimal", "ecmp", "spray")
WORKER = "pccl.testing.flowsplit_worker"


@dataclasses.dataclass
class Run:
    """One timed all-reduce."""

    placement: list[int]          # host index of every rank
    scheme: str
    nbytes: int
    seconds: float                # the slowest rank's all-reduce time
    ideal: float                  # model: 2(n-1) spray steps
    predicted: float              # model for this scheme (ecmp: mean over hashes)
    cross: int                    # ring edges from leaf 0 to leaf 1
    up_bytes: dict[tuple[int, int], int]     # (leaf, spine) -> bytes leaf->spine
    down_bytes: dict[tuple[int, int], int]   # (leaf, spine) -> bytes spine->leaf
    conns: list[list[str]]        # per rank, local address of each outbound connection
    cpu: float                    # worker CPU seconds, summed over ranks
    ok: bool                      # every rank got the right sum

    @property
    def ratio(self) -> float:
        return self.seconds / self.ideal

    def uplink_spread(self, leaf: int, spines: int, down: bool = False) -> float:
        """max |b - mean| / mean over the leaf's uplinks (0: equal)."""
        src = self.down_bytes if down else self.up_bytes
        b = [src[(leaf, k)] for k in range(spines)]
        mean = sum(b) / len(b)
        return max(abs(x - mean) for x in b) / mean if mean else 0.0

    def hot_uplink(self) -> float:
        """The busiest leaf-spine link's bytes (either direction) over the
        mean of its leaf's links in that direction (1: equal; what ECMP's
        hash actually did)."""
        worst = 0.0
        for src in (self.up_bytes, self.down_bytes):
            for leaf in {k[0] for k in src}:
                b = [v for k, v in src.items() if k[0] == leaf]
                mean = sum(b) / len(b)
                if mean:
                    worst = max(worst, max(b) / mean)
        return worst

    def shares(self, leaf: int, spines: int) -> list[float]:
        b = [self.up_bytes[(leaf, k)] for k in range(spines)]
        tot = sum(b) or 1
        return [x / tot for x in b]


class _Worker:
    def __init__(self, tb: LeafSpine, host: str, conns: int, timeout: float,
                 progress_timeout: float) -> None:
        self.host = host
        self.timeout = timeout
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.p = tb.popen(host, [sys.executable, "-m", WORKER, "--listen", tb.host_addr(host),
                                 "--conns", str(conns), "--timeout", str(timeout),
                                 "--progress-timeout", str(progress_timeout)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.address = self.read(30.0)["address"]

    def send(self, msg: dict) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(json.dumps(msg) + "\n")
        self.p.stdin.flush()

    def read(self, timeout: float | None = None, tolerate: bool = False) -> dict:
        assert self.p.stdout is not None
        t = self.timeout + 30 if timeout is None else timeout
        r, _, _ = select.select([self.p.stdout], [], [], t)
        if not r:
            raise TimeoutError(f"worker on {self.host}: no answer in {t:g} s")
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"worker on {self.host} exited ({self.p.poll()})")
        msg = json.loads(line)
        if "error" in msg and not tolerate:
            raise RuntimeError(f"worker on {self.host}: {msg['error']}")
        return msg


class FlowsplitBed:
    """The leaf-spine and its workers; ``with FlowsplitBed(...) as bed:
    bed.run(placement, scheme, nbytes)``."""

    def __init__(self, *, leaves: int = 2, hosts_per_leaf: int = 4, spines: int = 4,
                 host_mbit: float = 50, uplink_mbit: float = 25, conns: int = 4,
                 timeout: float = 120.0, progress_timeout: float = 30.0) -> None:
        self.conns = conns
        self.progress_timeout = progress_timeout
        self.timeout = timeout
        self.tb = leaf_spine(leaves, hosts_per_leaf, spines, host_mbit, uplink_mbit)
        self.topo = flowsplit.LeafSpine(leaves, spines, hosts_per_leaf,
                                        host_gbps=host_mbit / 1000, uplink_gbps=uplink_mbit / 1000)
        self.spines = spines
        self.leaves = leaves
        self.workers: list[_Worker] = []
        self.epoch = 0
        self.tag = 0

    def __enter__(self) -> FlowsplitBed:
        self.tb.up()
        try:
            self.workers = [_Worker(self.tb, h, self.conns, self.timeout, self.progress_timeout)
                            for h in self.tb.hosts]
        except BaseException:
            self.tb.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for w in self.workers:
            try:
                w.send({"cmd": "quit"})
            except OSError:
                pass
        for w in self.workers:
            try:
                w.p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.tb.down()

    # -- model ----------------------------------------------------------

    def step_flows(self, placement: Sequence[int], nbytes: int) -> list[flowsplit.Flow]:
        n = len(placement)
        return [flowsplit.Flow(placement[i], placement[(i + 1) % n], nbytes // n)
                for i in range(n)]

    def predict(self, placement: Sequence[int], nbytes: int, scheme: str) -> float:
        """Model time of a ring all-reduce of nbytes under scheme."""
        flows = self.step_flows(placement, nbytes)
        steps = 2 * (len(placement) - 1)
        if scheme == "ecmp":
            mc = flowsplit.monte_carlo(self.topo, flows, f"mp-{self.conns}", trials=500)
            return steps * mc.time_mean
        return steps * flowsplit.step_time(self.topo, flows, "spray" if scheme == "spray"
                                           else "minimal")

    def plan(self, placement: Sequence[int], nbytes: int) -> list[list[tuple[int | None, int]]]:
        n = len(placement)
        return flowsplit.ring_connections(self.topo, placement, nbytes // n, self.conns, align=4)

    # -- measuring ------------------------------------------------------

    def _all(self, msgs: Sequence[dict | None], tolerate: bool = False) -> list[dict]:
        for w, m in zip(self.workers, msgs, strict=True):
            if m is not None:
                w.send(m)
        return [w.read(tolerate=tolerate) if m is not None else {}
                for w, m in zip(self.workers, msgs, strict=True)]

    def set_ring(self, placement: Sequence[int], scheme: str, nbytes: int) -> list[list[str]]:
        """Set the ring of ``placement`` (host index per rank) for
        ``scheme``; returns each rank's outbound local addresses."""
        if scheme not in SCHEMES:
            raise ValueError(f"scheme is one of {SCHEMES}, got {scheme!r}")
        n = len(placement)
        if sorted(placement) != list(range(len(self.workers))):
            raise ValueError("a placement puts one rank on every host")
        self.tb.set_spraying(scheme == "spray")
        edges = self.plan(placement, nbytes) if scheme == "minimal" else None
        self.epoch += 1
        msgs: list[dict | None] = [None] * len(self.workers)
        for r, h in enumerate(placement):
            m: dict = {"cmd": "ring", "epoch": self.epoch, "rank": r, "world": n,
                       "next": self.workers[placement[(r + 1) % n]].address}
            if edges is not None:
                m.update(flowsplit.ring_pins(edges, r, self.tb.port_range))
            msgs[h] = m
        replies = self._all(msgs)
        return [replies[h]["conns"] for h in placement]

    def reduce(self, placement: Sequence[int], count: int, tolerate: bool = False) -> list[dict]:
        self.tag += 1
        msgs = [{"cmd": "reduce", "count": count, "tag": self.tag}] * len(self.workers)
        replies = self._all(msgs, tolerate)
        return [replies[h] for h in placement]

    def fault_run(self, placement: Sequence[int], scheme: str, nbytes: int,
                  link: tuple[int, int] = (0, 0), after: float = 1.0) -> dict:
        """An all-reduce with uplink ``link`` = (leaf, spine) black-holed
        ``after`` seconds in (restored at the end): what each rank saw."""
        import threading

        placement = [int(h) for h in placement]
        self.set_ring(placement, scheme, nbytes)
        self.reduce(placement, 4096)
        ln = self.tb.uplink(*link)
        timer = threading.Timer(after, self.tb.blackhole, args=(ln,))
        t0 = time.monotonic()
        timer.start()
        try:
            res = self.reduce(placement, nbytes // 4, tolerate=True)
        finally:
            timer.cancel()
            timer.join()
            self.tb.restore(ln)
        wall = time.monotonic() - t0
        errs = sorted({r["error"] for r in res if "error" in r})
        return {"scheme": scheme, "placement": placement, "link": link, "after": after,
                "wall": wall, "completed": not errs and all(r.get("ok") for r in res),
                "seconds": max((r.get("seconds", 0.0) for r in res), default=0.0),
                "ideal": self.predict(placement, nbytes, "spray"), "errors": errs}

    def run(self, placement: Sequence[int], scheme: str, nbytes: int) -> Run:
        placement = [int(h) for h in placement]
        n = len(placement)
        if nbytes % (4 * n * self.conns):
            raise ValueError(f"nbytes must be a multiple of {4 * n * self.conns}")
        conns = self.set_ring(placement, scheme, nbytes)
        self.reduce(placement, 4096)  # warm-up and barrier
        before = self.tb.uplink_bytes()
        res = self.reduce(placement, nbytes // 4)
        after = self.tb.uplink_bytes()
        up = {k: after[k][0] - before[k][0] for k in after}
        down = {k: after[k][1] - before[k][1] for k in after}
        cross = sum(1 for i in range(n) if self.topo.leaf_of(placement[i]) == 0
                    and self.topo.leaf_of(placement[(i + 1) % n]) == 1)
        return Run(placement=placement, scheme=scheme, nbytes=nbytes,
                   seconds=max(r["seconds"] for r in res),
                   ideal=self.predict(placement, nbytes, "spray"),
                   predicted=self.predict(placement, nbytes, scheme), cross=cross,
                   up_bytes=up, down_bytes=down, conns=conns,
                   cpu=sum(r["cpu"] for r in res), ok=all(r["ok"] for r in res))

    def pins_ok(self, run: Run) -> bool:
        """Every pinned connection of a ``minimal`` run bound a source port
        of its planned spine's range."""
        edges = self.plan(run.placement, run.nbytes)
        for r, addrs in enumerate(run.conns):
            for (path, _), addr in zip(edges[r], addrs, strict=True):
                port = int(addr.rsplit(":", 1)[1])
                if path is not None:
                    lo, hi = self.tb.port_range(path)
                    if not lo <= port <= hi:
                        return False
        return True


def placements(topo: flowsplit.LeafSpine, count: int, seed: int = 0) -> list[list[int]]:
    """``count`` distinct random placements (seeded)."""
    out: list[list[int]] = []
    s = seed
    while len(out) < count:
        p = traffic.place(topo, "random", s)
        s += 1
        if p not in out:
            out.append(p)
    return out


def table(runs: Sequence[Run], spines: int) -> str:
    """The measured table: per placement, ideal and each scheme's time (and
    ratio to ideal), the model's ECMP expectation, minimal's uplink shares."""
    by: dict[tuple[int, ...], dict[str, Run]] = {}
    for r in runs:
        by.setdefault(tuple(r.placement), {})[r.scheme] = r
    lines = ["| placement (host per rank) | cross | ideal s | minimal s (×) | ecmp s (×) | "
             "ecmp model × | ecmp hot uplink ÷ mean | spray s (×) | "
             "minimal uplink shares leaf0 / leaf1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for pl, d in by.items():
        any_run = next(iter(d.values()))
        cells = []
        for s in SCHEMES:
            r = d.get(s)
            cells.append("—" if r is None else f"{r.seconds:.2f} ({r.ratio:.2f})")
        e = d.get("ecmp")
        em = f"{e.predicted / e.ideal:.2f}" if e else "—"
        hot = f"{e.hot_uplink():.2f}" if e else "—"
        m = d.get("minimal")
        sh = "—" if m is None else " / ".join(
            ",".join(f"{x:.3f}" for x in m.shares(li, spines)) for li in range(2))
        lines.append(f"| {' '.join(map(str, pl))} | {any_run.cross} | {any_run.ideal:.2f} | "
                     f"{cells[0]} | {cells[1]} | {em} | {hot} | {cells[2]} | {sh} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pccl.testing.flowsplit_bed",
                                 description="pccl ring all-reduce on a namespace leaf-spine: "
                                             "minimal vs ECMP vs spraying (root)")
    ap.add_argument("--placements", type=int, default=10)
    ap.add_argument("--mib", type=int, default=64, help="tensor size in MiB")
    ap.add_argument("--host-mbit", type=float, default=50)
    ap.add_argument("--uplink-mbit", type=float, default=25)
    ap.add_argument("--conns", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the runs here")
    ap.add_argument("--fault", action="store_true",
                    help="also black-hole uplink leaf0-spine0 1 s into one all-reduce per scheme")
    ap.add_argument("--progress-timeout", type=float, default=15.0,
                    help="the peers' progress timeout, seconds (default 15)")
    a = ap.parse_args(argv)
    from .netns import unavailable_reason

    why = unavailable_reason()
    if why:
        print(f"testbed unavailable: {why}", file=sys.stderr)
        return 2
    runs: list[Run] = []
    nbytes = a.mib << 20
    with FlowsplitBed(host_mbit=a.host_mbit, uplink_mbit=a.uplink_mbit, conns=a.conns,
                      timeout=max(120.0, nbytes * 8 / (a.uplink_mbit * 1e6) * 8),
                      progress_timeout=a.progress_timeout) as bed:
        pls = placements(bed.topo, a.placements, a.seed)
        faults = []
        for s in SCHEMES if a.fault else ():
            f = bed.fault_run(pls[0], s, nbytes)
            faults.append(f)
            print(f"fault {s:8s} {pls[0]}: uplink leaf0-spine0 black-holed at 1 s -> "
                  f"{'completed' if f['completed'] else 'FAILED'} after {f['wall']:.1f} s "
                  f"(ideal {f['ideal']:.1f} s) {'; '.join(f['errors'])}", flush=True)
        for pl in pls:
            for s in SCHEMES:
                t0 = time.monotonic()
                r = bed.run(pl, s, nbytes)
                runs.append(r)
                print(f"{s:8s} {pl} cross={r.cross} {r.seconds:.2f} s ideal {r.ideal:.2f} "
                      f"(x{r.ratio:.2f}, model x{r.predicted / r.ideal:.2f}) ok={r.ok} "
                      f"cpu {r.cpu / r.seconds:.2f} cores, load {os.getloadavg()[0]:.1f} "
                      f"[{time.monotonic() - t0:.1f} s]", flush=True)
    print(table(runs, bed.spines))
    for f in faults:
        print(f"| fault | {f['scheme']} | {'completed' if f['completed'] else 'failed'} | "
              f"{f['wall']:.1f} s | {'; '.join(f['errors'])} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([dataclasses.asdict(r) | {"up_bytes": {f"{k[0]},{k[1]}": v for k, v in
                                                             r.up_bytes.items()},
                                                "down_bytes": {f"{k[0]},{k[1]}": v for k, v in
                                                               r.down_bytes.items()}}
                       for r in runs], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
