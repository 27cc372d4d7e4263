"""The ring solver of ``pccl.master.topology``: time and quality.

Part 1, exact solver time at n = 8 .. 16 (uniform random asymmetric
matrices; median and max over the instances).

Part 2, heuristic time at n = 64 and 256 against its time limit, with the
gap between its bottleneck and the solver's upper bound (0 % means the
bottleneck is proven optimal).

Part 3, heuristic against exact at n = 10, 11, 12 over random instances of
four kinds (uniform, few distinct values, a third of the edges unusable,
three sites): the distribution of heuristic bottleneck / exact bottleneck
and how often the tie-break sum is also optimal.

    .venv/bin/python benchmarks/topology_solver.py            # about a minute
    .venv/bin/python benchmarks/topology_solver.py --quick    # about 15 s

Numbers go to ``benchmarks/out/topology_solver.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

from pccl.master.topology import solve_ring  # noqa: E402

KINDS = ("uniform", "few-values", "sparse", "sites")


def random_matrix(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    if kind == "uniform":
        mat = rng.uniform(1e6, 1e9, size=(n, n))
    elif kind == "few-values":
        mat = rng.choice([1e6, 2e6, 5e6, 1e7], size=(n, n)).astype(float)
    elif kind == "sparse":
        mat = rng.uniform(1e6, 1e9, size=(n, n)) * (rng.random((n, n)) > 0.35)
    elif kind == "sites":
        site = rng.integers(0, 3, size=n)
        same = site[:, None] == site[None, :]
        mat = np.where(same, rng.uniform(5e8, 1e9, (n, n)), rng.uniform(1e7, 1e8, (n, n)))
    else:
        raise ValueError(kind)
    np.fill_diagonal(mat, 0.0)
    return mat


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer instances")
    ap.add_argument("--time-limit", type=float, default=1.0, help="heuristic limit (s)")
    args = ap.parse_args()
    reps = 3 if args.quick else 10
    results: dict = {"exact": [], "heuristic": [], "quality": []}

    rows = []
    for n in (8, 10, 12, 14, 16):
        times = []
        for seed in range(reps):
            mat = random_matrix(np.random.default_rng([n, seed]), n, "uniform")
            sol, dt = timed(lambda m=mat: solve_ring(m, exact_max_n=16, time_limit=30.0))
            assert sol.exact
            times.append(dt)
        results["exact"].append({"n": n, "seconds": times})
        rows.append([str(n), f"{statistics.median(times) * 1e3:.1f}", f"{max(times) * 1e3:.1f}"])
    c.print_table("exact solver", ["n", "median ms", "max ms"], rows)

    rows = []
    for n in (64, 256):
        for kind in ("uniform", "sparse", "sites"):
            for seed in range(1 if args.quick else 3):
                mat = random_matrix(np.random.default_rng([n, seed, 7]), n, kind)
                sol, dt = timed(lambda m=mat: solve_ring(m, time_limit=args.time_limit))
                gap = 1 - sol.bottleneck / sol.upper_bound
                results["heuristic"].append(
                    {
                        "n": n,
                        "kind": kind,
                        "seconds": dt,
                        "gap_to_upper_bound": gap,
                        "reason": sol.reason,
                    }
                )
                rows.append(
                    [
                        str(n),
                        kind,
                        f"{dt * 1e3:.0f}",
                        f"{gap * 100:.2f} %",
                        "yes" if "time limit" in sol.reason else "no",
                    ]
                )
    c.print_table(
        f"heuristic (time limit {args.time_limit:g} s)",
        ["n", "kind", "ms", "below upper bound", "hit limit"],
        rows,
    )

    rows = []
    per_kind = 2 if args.quick else 10
    for n in (10, 11, 12):
        ratios, sums_equal, times = [], 0, []
        for kind in KINDS:
            for seed in range(per_kind):
                mat = random_matrix(np.random.default_rng([n, seed, 11]), n, kind)
                exact = solve_ring(mat)
                heur, dt = timed(
                    lambda m=mat: solve_ring(m, exact_max_n=0, time_limit=args.time_limit)
                )
                times.append(dt)
                ratio = heur.bottleneck / exact.bottleneck
                ratios.append(ratio)
                if ratio == 1 and heur.sum_inv <= exact.sum_inv * (1 + 1e-12):
                    sums_equal += 1
        results["quality"].append(
            {"n": n, "ratios": ratios, "tie_break_optimal": sums_equal, "seconds": times}
        )
        rows.append(
            [
                str(n),
                str(len(ratios)),
                f"{min(ratios):.3f}",
                f"{statistics.median(ratios):.3f}",
                f"{sum(r == 1 for r in ratios)}",
                f"{sums_equal}",
                f"{statistics.median(times) * 1e3:.0f} / {max(times) * 1e3:.0f}",
            ]
        )
    c.print_table(
        "heuristic / exact bottleneck",
        ["n", "instances", "min", "median", "optimal", "tie-break optimal", "ms med / max"],
        rows,
    )
    out = c.write_json(Path(__file__).resolve().parent / "out" / "topology_solver.json", results)
    print(f"numbers in {out}")


if __name__ == "__main__":
    main()
