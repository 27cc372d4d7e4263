"""The comparison tables of ``python -m pccl.flowsplit table`` and of
``benchmarks/flowsplit.py``: every traffic pattern under every scheme on a
named fabric, normalised to ideal spraying."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InvalidArgumentError
from .loads import SCHEMES, _is_random, _monte_carlo, _Prepared
from .model import FatTree, LeafSpine, Topology
from .traffic import PATTERNS, pattern

__all__ = ["FABRICS", "fabric", "Row", "compare", "ratio_tables", "render_tables"]

#: name -> (description, constructor).  Testbed rates are what the 2-core
#: test machine can forward in network namespaces (200 Mbit/s links).
FABRICS: dict[str, tuple[str, object]] = {
    "paper": (
        "paper leaf-spine: 16 leaves x 16 spines, 256 hosts, 400G everywhere (1:1)",
        lambda: LeafSpine(16, 16, 16, 400.0, 400.0),
    ),
    "testbed": (
        "testbed: 2 leaves x 4 hosts, 4 spines, 0.2G links (1:1)",
        lambda: LeafSpine(2, 4, 4, 0.2, 0.2),
    ),
    "testbed-2spine": (
        "testbed, oversubscribed: 2 leaves x 4 hosts, 2 spines, 0.2G links (2:1)",
        lambda: LeafSpine(2, 2, 4, 0.2, 0.2),
    ),
    "fattree": (
        "paper fat-tree: 8 pods x 4 ToRs x 16 hosts (512), 4 aggs/pod x 4 cores, "
        "400G hosts, 1600G fabric",
        lambda: FatTree(8, 4, 4, 4, 16, 400.0, 1600.0, 1600.0),
    ),
}


def fabric(name: str) -> Topology:
    """The named fabric of :data:`FABRICS`."""
    try:
        return FABRICS[name][1]()  # type: ignore[operator]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown fabric {name!r}; expected one of {', '.join(FABRICS)}"
        ) from None


@dataclass(frozen=True)
class Row:
    """One (pattern, scheme) cell.  For hashed schemes ``max_load`` and
    ``step_time`` are Monte-Carlo means and the ``*_p99`` fields are set."""

    pattern: str
    scheme: str
    flows: int
    max_load: float
    max_load_p99: float | None
    spray_load: float
    step_time: float
    step_time_p99: float | None
    ideal_time: float
    subflows: int

    @property
    def load_ratio(self) -> float:
        return self.max_load / self.spray_load if self.spray_load else math.nan

    @property
    def time_ratio(self) -> float:
        return self.step_time / self.ideal_time if self.ideal_time else math.nan


def compare(
    topo: Topology,
    nbytes: int,
    patterns: Sequence[str] | None = None,
    schemes: Sequence[str] = SCHEMES,
    trials: int = 200,
    seed: int = 0,
) -> list[Row]:
    """Rows for every pattern x scheme on ``topo`` with ``nbytes`` per flow
    (random placements and permutations drawn with ``seed``; hashed schemes
    over ``trials`` seeds)."""
    rows = []
    for name in patterns if patterns is not None else list(PATTERNS):
        flows = pattern(name, topo, nbytes, seed)
        prep = _Prepared(topo, flows)
        spray = prep.scheme_loads("spray", 0)
        spray_load, ideal = prep.max_fabric(spray), prep.time(spray)
        for scheme in schemes:
            if _is_random(scheme):
                mc = _monte_carlo(prep, scheme, trials, seed)
                load, load99, t, t99 = mc.mean, mc.p99, mc.time_mean, mc.time_p99
            else:
                loads = prep.scheme_loads(scheme, seed)
                load, load99, t, t99 = prep.max_fabric(loads), None, prep.time(loads), None
            rows.append(
                Row(name, scheme, len(flows), load, load99, spray_load, t, t99, ideal,
                    prep.subflows(scheme))
            )
    return rows


def _fmt_ratio(value: float, p99: float | None, ref: float) -> str:
    if not ref:
        return "-"
    text = f"{value / ref:.2f}"
    if p99 is not None:
        text += f" ({p99 / ref:.2f})"
    return text


def _fmt_time(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def ratio_tables(rows: Sequence[Row], title: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, body) of the three tables of one fabric: maximum
    leaf-spine link load / spray, predicted step time / ideal, sub-flows."""
    schemes = list(dict.fromkeys(r.scheme for r in rows))
    names = list(dict.fromkeys(r.pattern for r in rows))
    cell = {(r.pattern, r.scheme): r for r in rows}
    head = ["pattern", "flows"]
    load_body, time_body, count_body = [], [], []
    for name in names:
        first = cell[(name, schemes[0])]
        load_body.append(
            [name, str(first.flows)]
            + [_fmt_ratio(cell[(name, s)].max_load, cell[(name, s)].max_load_p99,
                          first.spray_load) for s in schemes]
        )
        time_body.append(
            [name, _fmt_time(first.ideal_time)]
            + [_fmt_ratio(cell[(name, s)].step_time, cell[(name, s)].step_time_p99,
                          first.ideal_time) for s in schemes]
        )
        count_body.append([name, str(first.flows)] + [str(cell[(name, s)].subflows)
                                                        for s in schemes])
    return [
        (f"{title}: max leaf-spine link load / spray (hashed: mean (p99))",
         head + schemes, load_body),
        (f"{title}: predicted step time / ideal (hashed: mean (p99))",
         ["pattern", "ideal time"] + schemes, time_body),
        (f"{title}: sub-flows (connections)", head + schemes, count_body),
    ]


def render_tables(tables: Sequence[tuple[str, list[str], list[list[str]]]], file=None) -> None:
    """Print tables with ``rich`` (plain aligned text without it)."""
    import sys

    out = file if file is not None else sys.stdout
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is in the bench/dev extras
        for title, head, body in tables:
            widths = [max(len(x) for x in col) for col in zip(head, *body, strict=False)]
            print(title, file=out)
            for line in [head] + body:
                print("  ".join(x.ljust(w) for x, w in zip(line, widths, strict=False)), file=out)
            print(file=out)
        return
    console = Console(file=out, width=200)
    for title, head, body in tables:
        table = Table(title=title, title_justify="left")
        for i, h in enumerate(head):
            table.add_column(h, justify="left" if i == 0 else "right")
        for line in body:
            table.add_row(*line)
        console.print(table)
