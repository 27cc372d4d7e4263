"""``python -m pccl.flowsplit``: the flow-splitting model on the command line."""

from __future__ import annotations

import argparse
import sys

from .loads import SCHEMES
from .tables import FABRICS, compare, fabric, ratio_tables, render_tables
from .traffic import PATTERNS

DEFAULT_FABRICS = ("paper", "testbed", "testbed-2spine")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pccl.flowsplit",
        description="Single-path flow splitting (arXiv 2407.00550): compare ECMP, "
        "MP-x, single path, minimal splitting and ideal packet spraying on a "
        "leaf-spine fabric.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "table",
        help="print the comparison tables",
        description="For each fabric print three tables over the traffic patterns "
        f"({', '.join(PATTERNS)}) and the schemes ({', '.join(SCHEMES)}): the most "
        "loaded leaf-spine link divided by ideal spraying's, the predicted step time "
        "(max over all links of bytes/rate, host links included) divided by ideal, "
        "and the number of sub-flows (connections). Hashed schemes (ecmp, mp-x) show "
        "the Monte-Carlo mean and, in brackets, the 99th percentile.",
    )
    t.add_argument(
        "--fabric",
        action="append",
        choices=list(FABRICS),
        help=f"fabric to tabulate (repeatable; default: {', '.join(DEFAULT_FABRICS)}). "
        + "; ".join(f"{k}: {v[0]}" for k, v in FABRICS.items()),
    )
    t.add_argument(
        "--bytes",
        type=int,
        default=8 << 20,
        help="bytes per flow (default 8 MiB: one ring step of a 64 MiB all-reduce over "
        "8 ranks); the ratios do not depend on it",
    )
    t.add_argument("--trials", type=int, default=200,
                   help="Monte-Carlo seeds for ecmp and mp-x (default 200)")
    t.add_argument("--seed", type=int, default=0,
                   help="seed of random placements, permutations and the first hash")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.trials < 1:
        print("--trials must be at least 1", file=sys.stderr)
        return 2
    if args.bytes < 0 or args.seed < 0:
        print("--bytes and --seed must be non-negative", file=sys.stderr)
        return 2
    for name in args.fabric or DEFAULT_FABRICS:
        topo = fabric(name)
        rows = compare(topo, args.bytes, trials=args.trials, seed=args.seed)
        print(f"{FABRICS[name][0]}  [{topo!r}]")
        render_tables(ratio_tables(rows, name))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
