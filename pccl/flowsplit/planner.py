"""The minimal-split planner (arXiv 2407.00550, Theorem 1's construction).

For each pair (source leaf, destination leaf) with ``n`` flows of one size
over ``s`` equal-cost paths, let ``q, r = divmod(n, s)`` and
``g = gcd(r, s)``:

1. ``q * s`` flows go whole, round-robin over the paths (``q`` per path);
2. each of the other ``r`` flows is cut into ``s / g`` equal pieces, and the
   ``r * s / g`` pieces continue the round-robin (``r / g`` per path).

Every path then carries ``n * f / s`` bytes, exactly what ideal spraying
puts on it, so every fabric link carries what spraying puts on it; only
``r`` flows are split and ``(n - r) + r * s / g`` sub-flows are used.

Determinism: the plan depends only on the topology's numbers and on the
flows (their order included).  Groups are visited in sorted order of
(source leaf, destination leaf, size); within a group flows keep their index
order; no dict or set order and no hash randomisation is involved, so every
rank computes the same plan.

Rules this module adds where the paper is silent:

* **Unequal sizes.**  The theorem is about equal-size flows.  Flows of one
  leaf pair are grouped by exact size and the construction runs once per
  size class.  Every class is then balanced exactly, so the plan still
  matches spraying on every link, at the price of more splits when sizes
  differ (a pair whose flows all differ in size has every flow cut ``s``
  ways).
* **Round-robin start.**  Each source leaf keeps one counter across its
  destination leaves and size classes, starting at the leaf's own index, so
  different leaves start on different paths (this matters only for the
  ``single`` scheme; any start gives ``minimal`` its exact balance).
* **Whole bytes.**  A flow of ``units = nbytes // align`` elements cut into
  ``k`` pieces gives every piece ``units // k`` elements and the first
  ``units % k`` pieces one more; pieces are contiguous (offsets in order,
  sizes summing to ``nbytes``).  ``nbytes`` must be a multiple of
  ``align``.  So a path's load can exceed the spray load by at most
  ``(r / g) * align`` bytes per group.  Pieces that would be empty (a flow
  of fewer than ``k`` elements) are left out; a zero-byte flow is one
  zero-byte sub-flow.
* **Same leaf.**  A flow whose ends share a leaf never reaches a spine: one
  sub-flow with ``path=None``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from math import gcd

import numpy as np

from ..errors import InvalidArgumentError
from .model import Flow, SubFlow, Topology, check_flows

__all__ = [
    "plan",
    "plan_single",
    "split_factor",
    "group_subflow_count",
    "flow_connections",
    "ring_connections",
]


def split_factor(n: int, s: int) -> int:
    """Pieces each split flow is cut into for ``n`` equal flows over ``s``
    paths: ``s / gcd(n mod s, s)``, or 1 when ``s`` divides ``n`` (nothing
    is split)."""
    if s <= 0:
        raise InvalidArgumentError(f"paths must be positive, got {s}")
    if n < 0:
        raise InvalidArgumentError(f"flow count must be non-negative, got {n}")
    r = n % s
    return 1 if r == 0 else s // gcd(r, s)


def group_subflow_count(n: int, s: int) -> int:
    """Sub-flows the construction uses for ``n`` equal flows over ``s``
    paths: ``(n - r) + r * s / gcd(r, s)`` with ``r = n mod s``."""
    r = n % s if s > 0 else 0
    return (n - r) + r * split_factor(n, s)


def _check_align(align: object, flows: Sequence[Flow]) -> int:
    if isinstance(align, bool) or not isinstance(align, (int, np.integer)) or align <= 0:
        raise InvalidArgumentError(f"align must be a positive integer, got {align!r}")
    for i, f in enumerate(flows):
        if f.nbytes % align:
            raise InvalidArgumentError(
                f"flows[{i}].nbytes = {f.nbytes} is not a multiple of align = {align}"
            )
    return int(align)


def _pieces(nbytes: int, k: int, align: int) -> list[tuple[int, int]]:
    """(offset, nbytes) of the ``k`` contiguous pieces of a flow (empty ones
    left out, but a zero-byte flow keeps one zero-byte piece)."""
    units = nbytes // align
    base, extra = divmod(units, k)
    out = []
    offset = 0
    for i in range(k):
        size = (base + (1 if i < extra else 0)) * align
        if size or (i == 0 and nbytes == 0):
            out.append((offset, size))
        offset += size
    return out


def _groups(topo: Topology, flows: Sequence[Flow], by_size: bool):
    """Yield (src_leaf, dst_leaf, [flow indices]) for the remote flows, in
    sorted order; local flow indices are returned separately."""
    local: list[int] = []
    keyed: dict[tuple[int, int, int], list[int]] = {}
    hpl = topo.hosts_per_leaf
    for i, f in enumerate(flows):
        a, b = int(f.src) // hpl, int(f.dst) // hpl  # checked by check_flows
        if a == b:
            local.append(i)
            continue
        keyed.setdefault((a, b, f.nbytes if by_size else 0), []).append(i)
    groups = [(a, b, keyed[(a, b, size)]) for (a, b, size) in sorted(keyed)]
    return local, groups


def _assign(topo: Topology, flows: Sequence[Flow], split: bool, align: int) -> list[SubFlow]:
    local, groups = _groups(topo, flows, by_size=split)
    out = [SubFlow(i, 0, flows[i].nbytes, None) for i in local]
    counter: dict[int, int] = {}
    paths: dict[tuple[int, int], int] = {}
    for a, b, members in groups:
        s = paths.get((a, b)) or paths.setdefault((a, b), topo.num_paths(a, b))
        c = counter.get(a, a)
        n = len(members)
        whole = n - n % s if split else n
        for i in members[:whole]:
            out.append(SubFlow(i, 0, flows[i].nbytes, c % s))
            c += 1
        if whole < n:
            k = split_factor(n, s)
            for i in members[whole:]:
                for offset, size in _pieces(flows[i].nbytes, k, align):
                    out.append(SubFlow(i, offset, size, c % s))
                    c += 1
        counter[a] = c
    out.sort(key=lambda sf: (sf.flow, sf.offset))
    return out


def plan(topo: Topology, flows: Sequence[Flow], *, align: int = 1) -> list[SubFlow]:
    """The minimal-split plan of one collective step (see the module
    docstring for the rules).  Returns the sub-flows sorted by
    ``(flow, offset)``; the sub-flows of each flow cover its bytes exactly.
    ``align`` is the element size: every piece is a whole number of
    elements.  Raises :class:`pccl.InvalidArgumentError` (a ``ValueError``)
    for hosts out of range, a host sending to itself, negative or fractional
    byte counts, or sizes that are not multiples of ``align``."""
    check_flows(topo, flows)
    align = _check_align(align, flows)
    return _assign(topo, flows, split=True, align=align)


def plan_single(topo: Topology, flows: Sequence[Flow]) -> list[SubFlow]:
    """One path per flow, no split: the flows of each source leaf take the
    paths round-robin (the ``single`` scheme)."""
    check_flows(topo, flows)
    return _assign(topo, flows, split=False, align=1)


def _apportion(weights: Sequence[int], total: int) -> list[int]:
    """``total`` whole shares over ``weights``: at least one each, the rest
    by largest remainder (ties to the earlier entry)."""
    n = len(weights)
    counts = [1] * n
    spare = total - n
    wsum = sum(weights)
    if spare <= 0 or wsum == 0:
        for i in range(spare if spare > 0 else 0):
            counts[i % n] += 1
        return counts
    quotas = [spare * w / wsum for w in weights]
    floors = [int(q) for q in quotas]
    for i in range(n):
        counts[i] += floors[i]
    left = spare - sum(floors)
    order = sorted(range(n), key=lambda i: (-(quotas[i] - floors[i]), i))
    for i in order[:left]:
        counts[i] += 1
    return counts


def flow_connections(
    subflows: Sequence[SubFlow],
    flow: int,
    connections: int | None = None,
    *,
    align: int = 1,
) -> list[tuple[int | None, int]]:
    """The connections that carry flow ``flow`` of a plan, as
    ``(path, nbytes)`` in offset order (their bytes sum to the flow's).

    With ``connections=None`` every sub-flow is one connection.  With
    ``connections=K`` the flow's link has ``K`` connections: each sub-flow
    gets at least one, the spare ones go to the largest sub-flows (largest
    remainder of a byte-proportional share), and a sub-flow over several
    connections is cut evenly in whole ``align``-byte elements.  ``K``
    smaller than the number of sub-flows raises ``ValueError`` (two paths
    cannot share a pinned connection)."""
    mine = sorted((sf for sf in subflows if sf.flow == flow), key=lambda sf: sf.offset)
    if not mine:
        raise InvalidArgumentError(f"the plan has no sub-flow of flow {flow}")
    if connections is None:
        return [(sf.path, sf.nbytes) for sf in mine]
    if isinstance(connections, bool) or not isinstance(connections, (int, np.integer)):
        raise InvalidArgumentError(f"connections must be an integer, got {connections!r}")
    if connections < len(mine):
        raise InvalidArgumentError(
            f"flow {flow} has {len(mine)} sub-flows on distinct paths; "
            f"{connections} connections cannot carry them"
        )
    if isinstance(align, bool) or not isinstance(align, (int, np.integer)) or align <= 0:
        raise InvalidArgumentError(f"align must be a positive integer, got {align!r}")
    counts = _apportion([sf.nbytes for sf in mine], int(connections))
    out: list[tuple[int | None, int]] = []
    for sf, c in zip(mine, counts, strict=True):
        if sf.nbytes % align:
            raise InvalidArgumentError(f"sub-flow of {sf.nbytes} B is not a multiple of {align}")
        units = sf.nbytes // align
        base, extra = divmod(units, c)
        out += [(sf.path, (base + (1 if j < extra else 0)) * align) for j in range(c)]
    return out


def ring_connections(
    topo: Topology,
    ring: Sequence[int],
    nbytes: int,
    connections: int | None = None,
    *,
    align: int = 1,
) -> list[list[tuple[int | None, int]]]:
    """Plan one ring step (host ``ring[i]`` sends ``nbytes`` to
    ``ring[i+1]``, the last to ``ring[0]``) and return, per edge ``i``, its
    connections as ``(path, nbytes)`` (see :func:`flow_connections`).  This
    is what the master will hand each peer with the ring: ``K`` connections
    of the link, each pinned to a path and carrying its byte share."""
    ring = list(ring)
    if len(ring) < 2:
        raise InvalidArgumentError("a ring needs at least two hosts")
    if len(set(ring)) != len(ring):
        raise InvalidArgumentError("a ring visits every host once")
    flows = [Flow(ring[i], ring[(i + 1) % len(ring)], nbytes) for i in range(len(ring))]
    subflows = plan(topo, flows, align=align)
    return [
        flow_connections(subflows, i, connections, align=align) for i in range(len(flows))
    ]


def ring_pins(
    edges: Sequence[Sequence[tuple[int | None, int]]],
    rank: int,
    port_range: Callable[[int], tuple[int, int]],
) -> dict[str, list]:
    """The flow-splitting arguments of ``StaticRing.connect`` /
    ``set_ring`` for ring position ``rank``, from :func:`ring_connections`'
    per-edge lists: its outbound edge ``rank`` gives the source-port pins
    (``port_range(path)``; a local edge, path None, stays unpinned) and the
    out-weights (bytes per connection), its inbound edge ``rank - 1`` the
    in-weights."""
    n = len(edges)
    if not 0 <= rank < n:
        raise InvalidArgumentError(f"rank {rank} is not in a ring of {n}")
    out, inn = edges[rank], edges[(rank - 1) % n]
    if len(out) != len(inn):
        raise InvalidArgumentError("every edge must have the same number of connections")
    return {
        "port_ranges": [None if p is None else tuple(port_range(p)) for p, _ in out],
        "out_weights": [int(b) for _, b in out],
        "in_weights": [int(b) for _, b in inn],
    }
