"""Single-path transport with minimal application-layer flow splitting.

After arXiv 2407.00550 (Addanki, Goyal, Marinos, Schmid: "Challenging the
Need for Packet Spraying in Large-Scale Distributed Training", v2
"Ethereal"): in a leaf-spine fabric the flows of one collective step start
together and have equal sizes, so splitting only ``n mod s`` of the ``n``
flows between two leaves into ``s / gcd(n mod s, s)`` pieces, and pinning
every piece to one spine, gives every link exactly the load of ideal packet
spraying, with in-order single-path transport.

* Model: :class:`LeafSpine`, :class:`FatTree`, :class:`Flow`;
  :func:`max_link_load`, :func:`link_loads`, :func:`step_time`,
  :func:`subflow_count`, :func:`monte_carlo` for the schemes ``"ecmp"``,
  ``"mp-x"``, ``"spray"``, ``"single"`` and ``"minimal"``.
* Traffic: :mod:`pccl.flowsplit.traffic` (ring, halving-doubling,
  all-to-all, permutation).
* Planner: :func:`plan` -> :class:`SubFlow` list; :func:`flow_connections`
  and :func:`ring_connections` turn it into per-connection (path, bytes).
* ``python -m pccl.flowsplit table`` prints the comparison tables.

See ``docs/flowsplit.md``.
"""

from __future__ import annotations

from . import traffic
from .loads import (
    SCHEMES,
    MonteCarlo,
    expected_max_bin,
    link_load_array,
    link_loads,
    max_link_load,
    monte_carlo,
    step_time,
    subflow_count,
)
from .model import FatTree, Flow, LeafSpine, SubFlow, Topology
from .planner import (
    flow_connections,
    group_subflow_count,
    plan,
    plan_single,
    ring_connections,
    ring_pins,
    split_factor,
)

__all__ = [
    "SCHEMES",
    "FatTree",
    "Flow",
    "LeafSpine",
    "MonteCarlo",
    "SubFlow",
    "Topology",
    "expected_max_bin",
    "flow_connections",
    "group_subflow_count",
    "link_load_array",
    "link_loads",
    "max_link_load",
    "monte_carlo",
    "plan",
    "plan_single",
    "ring_connections",
    "ring_pins",
    "split_factor",
    "step_time",
    "subflow_count",
    "traffic",
]
