"""Flow-splitting model tables and chart (pccl.flowsplit; arXiv 2407.00550).

For each fabric, every traffic pattern of one collective step (ring with
contiguous and random placement, the cross-leaf halving-doubling step with
contiguous and random placement, all-to-all, a random permutation) under
every scheme (spray = ideal, minimal, single, ecmp, mp-2/4/8):

* the most loaded leaf-spine link divided by spraying's (hashed schemes:
  Monte-Carlo mean and 99th percentile over --trials seeds),
* the predicted step time (max over all links of bytes/rate, host links
  included) divided by the ideal,
* the sub-flow (connection) count.

Also the balls-into-bins check: 16 flows hashed onto 16 paths, exact
expected maximum vs the model's Monte-Carlo mean.

This is a model, not a measurement: nothing goes on a network.  Output: the
tables on stdout, ``flowsplit.json`` (every number) and ``flowsplit.png``
(max link load and step time per pattern and scheme, log scale) in --out.

    .venv/bin/python benchmarks/flowsplit.py                 # paper + testbed fabrics
    .venv/bin/python benchmarks/flowsplit.py --fabric testbed --trials 20 --out /tmp/fs

``--testbed`` measures instead (root; pccl.testing.flowsplit_bed): a pccl
ring all-reduce on the namespace leaf-spine (2 leaves x 4 hosts, 4 spines)
over random placements under minimal (pinned, weighted), ecmp and spray,
printing measured vs predicted times and minimal's uplink byte shares;
``--fault`` adds one black-holed uplink mid all-reduce per scheme:

    sudo .venv/bin/python benchmarks/flowsplit.py --testbed --placements 10 --mib 64
    sudo .venv/bin/python benchmarks/flowsplit.py --testbed --placements 1 --mib 16 --fault
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from pccl import flowsplit
from pccl.flowsplit.tables import FABRICS, compare, fabric, ratio_tables, render_tables

DEFAULT_FABRICS = ("paper", "testbed", "testbed-2spine")


def _plot(results: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(len(names), 2, figsize=(15, 4.2 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        rows = results[name]["rows"]
        patterns = list(dict.fromkeys(r["pattern"] for r in rows))
        schemes = list(dict.fromkeys(r["scheme"] for r in rows))
        cell = {(r["pattern"], r["scheme"]): r for r in rows}
        width = 0.8 / len(schemes)
        for col, (key, p99, label) in enumerate(
            [
                ("load_ratio", "load_p99_ratio", "max leaf-spine link load / spray"),
                ("time_ratio", "time_p99_ratio", "predicted step time / ideal"),
            ]
        ):
            ax = axes[row][col]
            for j, scheme in enumerate(schemes):
                xs = [i + (j - (len(schemes) - 1) / 2) * width for i in range(len(patterns))]
                ys = [cell[(p, scheme)][key] for p in patterns]
                tops = [cell[(p, scheme)][p99] for p in patterns]
                err = [
                    [0.0] * len(ys),
                    [max(t - y, 0.0) if t is not None and not math.isnan(y) else 0.0
                     for t, y in zip(tops, ys, strict=True)],
                ]
                ax.bar(xs, ys, width, label=scheme, yerr=err, capsize=2)
            ax.set_yscale("log")
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks(range(len(patterns)))
            ax.set_xticklabels([p.replace(" (", "\n(") for p in patterns], fontsize=7)
            ax.set_ylabel(label)
            ax.set_title(f"{name}: {label} (bars: mean; whiskers: p99)", fontsize=9)
            if row == 0 and col == 0:
                ax.legend(fontsize=7, ncol=len(schemes))
    fig.tight_layout()
    path = out / "flowsplit.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--testbed" in argv:
        from pccl.testing import flowsplit_bed

        return flowsplit_bed.main([a for a in argv if a != "--testbed"])
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--fabric", action="append", choices=list(FABRICS),
                   help=f"repeatable; default {', '.join(DEFAULT_FABRICS)}")
    p.add_argument("--bytes", type=int, default=8 << 20, help="bytes per flow (default 8 MiB)")
    p.add_argument("--trials", type=int, default=200, help="Monte-Carlo seeds (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("build/flowsplit"),
                   help="directory for flowsplit.png and flowsplit.json (default build/flowsplit)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--testbed", action="store_true",
                   help="measure on the namespace leaf-spine instead (root; see --testbed --help)")
    args = p.parse_args(argv)
    if args.trials < 1 or args.bytes < 0 or args.seed < 0:
        p.error("--trials must be >= 1; --bytes and --seed >= 0")
    args.out.mkdir(parents=True, exist_ok=True)

    results: dict = {}
    for name in args.fabric or DEFAULT_FABRICS:
        topo = fabric(name)
        t0 = time.perf_counter()
        rows = compare(topo, args.bytes, trials=args.trials, seed=args.seed)
        elapsed = time.perf_counter() - t0
        print(f"{FABRICS[name][0]}  [{topo!r}]  ({elapsed:.1f} s)")
        render_tables(ratio_tables(rows, name))
        print()
        results[name] = {
            "topology": repr(topo),
            "rows": [
                {
                    "pattern": r.pattern,
                    "scheme": r.scheme,
                    "flows": r.flows,
                    "subflows": r.subflows,
                    "max_load_bytes": r.max_load,
                    "max_load_p99_bytes": r.max_load_p99,
                    "spray_load_bytes": r.spray_load,
                    "step_time_s": r.step_time,
                    "step_time_p99_s": r.step_time_p99,
                    "ideal_time_s": r.ideal_time,
                    "load_ratio": r.load_ratio,
                    "load_p99_ratio": (r.max_load_p99 / r.spray_load
                                       if r.max_load_p99 is not None and r.spray_load else None),
                    "time_ratio": r.time_ratio,
                    "time_p99_ratio": (r.step_time_p99 / r.ideal_time
                                       if r.step_time_p99 is not None and r.ideal_time else None),
                }
                for r in rows
            ],
        }

    # balls into bins: one leaf pair, 16 flows, 16 spines
    topo = flowsplit.LeafSpine(2, 16, 16, 1.0, 1.0)
    flows = [flowsplit.Flow(h, 16 + h, 1) for h in range(16)]
    trials = max(args.trials, 2000)
    mc = flowsplit.monte_carlo(topo, flows, "ecmp", trials=trials, seed=args.seed)
    exact = flowsplit.expected_max_bin(16, 16)
    print(f"16 flows hashed onto 16 paths: exact E[max] = {exact:.4f} flows; "
          f"model Monte-Carlo mean = {mc.mean:.4f}, p99 = {mc.p99:.0f} ({trials} seeds); "
          "ideal (spray, minimal) = 1")
    results["balls_into_bins_16_16"] = {"exact": exact, "mc_mean": mc.mean, "mc_p99": mc.p99,
                                        "trials": trials}

    (args.out / "flowsplit.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out / 'flowsplit.json'}")
    if not args.no_plot:
        print(f"wrote {_plot({k: v for k, v in results.items() if 'rows' in v}, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
