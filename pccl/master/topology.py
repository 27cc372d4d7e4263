"""The ring solver: the cyclic order of a peer group that a ring all-reduce
runs fastest on, from a directed bandwidth matrix.  Pure functions, no I/O;
the only clock read is the time limit.

A ring all-reduce of S bytes over n peers sends 2(n-1) chunks of S/n bytes
along every edge of the ring, all edges at once, each step waiting for the
slowest edge.  Its time is therefore 2(n-1)/n * S / b, where b is the
smallest directed bandwidth on the cycle (the *bottleneck*), and its bus
bandwidth (S * 2(n-1)/n / time) is b itself.  So the solver:

1. **maximises the bottleneck** over all Hamiltonian cycles of the directed
   graph whose edges are the usable links (bandwidth > 0);
2. among the cycles with that bottleneck, **minimises the sum of 1/bandwidth**
   (the time one byte spends crossing every edge: the latency-like term that
   still differs between rings with the same bottleneck);
3. returns the ring **rotated to start at the smallest peer id**, so equal
   inputs give equal rings.  Direction matters (edges are asymmetric), so a
   ring and its reverse are different rings.

Exact method (n <= ``exact_max_n``, default 16): two Held-Karp bitmask
dynamic programmes over paths that start at the first peer, vectorised with
numpy one layer (subset size) at a time.  The first runs in the (max, min)
semiring and gives the optimal bottleneck directly (no threshold search);
the second runs in (min, +) over 1/bandwidth with every edge below the
bottleneck removed and gives the tie-break.  A bottleneck of 0 proves that
no Hamiltonian cycle avoids the unusable edges.

Heuristic (larger n): an upper bound first (every peer needs an outgoing
and an incoming edge, and the edges at least as fast as the threshold must
keep the group strongly connected; the second also proves infeasibility
when it fails at the slowest usable edge).  Then a search over the distinct
bandwidths below that bound: for a threshold t, edges slower than t cost 1
each (a *violation*), the others cost their 1/bandwidth scaled far below 1,
and a local search minimises the total, so it first removes violations and
then shortens the ring.  The move is the direction-preserving segment swap
(A B C D -> A C B D, "or-3opt"), which contains or-opt (moving a segment of
any length) and never reverses a segment, so it is valid on an asymmetric
matrix; 2-opt is not used because it reverses a segment.  A local optimum
that still has violations is perturbed (a random segment swap) and searched
again.  The best threshold reached without violations is the bottleneck.
The heuristic is deterministic for a given seed unless the time limit cuts
it short (``reason`` then says so).
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError

__all__ = [
    "RingSolution",
    "bandwidth_matrix",
    "predicted_bus_bandwidth",
    "propose_ring",
    "ring_bottleneck",
    "solve_ring",
]

DEFAULT_TIME_LIMIT = 1.0
DEFAULT_EXACT_MAX_N = 16  # about 70 ms at n = 16 (docs/topology.md)
EXACT_HARD_MAX_N = 18  # the exact tables are 2^(n-1) * n floats
DEFAULT_IMPROVEMENT = 0.20

# Scale of the per-edge costs that break ties between violation-free rings:
# their sum over a ring stays below this, so one violation always costs more.
_TIEBREAK_SCALE = 0.25


@dataclass(frozen=True)
class RingSolution:
    """The result of :func:`solve_ring`.

    ``ring``: peer ids in send order (``ring[k]`` sends to ``ring[k+1]``, the
    last to ``ring[0]``), starting at the smallest id; ``None`` when no ring
    avoiding the unusable edges was found (``reason`` says why).
    ``bottleneck``: the smallest directed bandwidth on the ring (bytes/s).
    ``sum_inv``: the sum of 1/bandwidth over the ring's edges (s/byte).
    ``predicted_bus_bandwidth``: the ring all-reduce bus bandwidth the model
    predicts (bytes/s; equal to the bottleneck, see the module docstring).
    ``exact``: whether the ring is proven optimal (and, when ``ring`` is
    ``None``, whether infeasibility is proven).
    ``upper_bound``: no ring of this matrix has a larger bottleneck.
    ``reason``: a one-line explanation ("" when exact and feasible).

    A single peer has no edges: its ring is ``[id]`` with an infinite
    bottleneck and bus bandwidth and ``sum_inv`` 0.
    """

    ring: list[Hashable] | None
    bottleneck: float
    sum_inv: float
    predicted_bus_bandwidth: float
    exact: bool
    reason: str = ""
    upper_bound: float = math.inf


# ---------------------------------------------------------------------------
# input


def bandwidth_matrix(
    bw: Any, peers: Sequence[Hashable] | None = None
) -> tuple[list[Hashable], np.ndarray]:
    """Validate ``bw`` and return ``(ids, W)``: the peer ids in ascending
    order and an n x n float64 matrix over them (``W[i, j]`` is the
    bandwidth from ``ids[i]`` to ``ids[j]``, 0 where unusable, 0 on the
    diagonal).

    ``bw`` is a square array-like (rows send, columns receive; peer ids are
    the indices, or ``peers`` in row order) or a mapping
    ``{(from_id, to_id): bytes_per_s}`` (peer ids are the ends of its keys
    plus ``peers``).  0 or ``None`` means unreachable or unknown: never
    used.  Negative, NaN or infinite bandwidths, a non-square matrix and an
    empty group raise :class:`ValueError`.  Self-edges are ignored.
    """
    if isinstance(bw, Mapping):
        return _from_mapping(bw, peers)
    try:
        arr = np.asarray(bw, dtype=object)
    except Exception as exc:  # ragged nested sequences
        raise InvalidArgumentError(f"bandwidth matrix is not an array: {exc}") from exc
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise InvalidArgumentError(f"bandwidth matrix must be square, got shape {arr.shape}")
    n = arr.shape[0]
    if n == 0:
        raise InvalidArgumentError("bandwidth matrix is empty")
    if peers is None:
        ids: list[Hashable] = list(range(n))
    else:
        ids = list(peers)
        if len(ids) != n or len(set(ids)) != n:
            raise InvalidArgumentError(f"peers must be {n} distinct ids, got {ids!r}")
    mat = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        for j in range(n):
            mat[i, j] = _check_value(arr[i, j], ids[i], ids[j])
    np.fill_diagonal(mat, 0.0)
    order = _sorted_order(ids)
    return [ids[k] for k in order], mat[np.ix_(order, order)]


def _from_mapping(
    bw: Mapping, peers: Sequence[Hashable] | None
) -> tuple[list[Hashable], np.ndarray]:
    idset: set[Hashable] = set(peers) if peers is not None else set()
    for key in bw:
        if not (isinstance(key, tuple) and len(key) == 2):
            raise InvalidArgumentError(f"bandwidth key must be (from, to), got {key!r}")
        idset.update(key)
    if not idset:
        raise InvalidArgumentError("bandwidth mapping names no peers")
    ids = [x for _, x in sorted((_sort_key(x), x) for x in idset)]
    index = {x: k for k, x in enumerate(ids)}
    mat = np.zeros((len(ids), len(ids)), dtype=np.float64)
    for (src, dst), value in bw.items():
        v = _check_value(value, src, dst)
        if src != dst:
            mat[index[src], index[dst]] = v
    return ids, mat


def _check_value(value: Any, src: Hashable, dst: Hashable) -> float:
    if value is None:
        return 0.0
    if isinstance(value, (bool, np.bool_)):
        raise InvalidArgumentError(f"bandwidth {src!r}->{dst!r} is a bool, not a number")
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(
            f"bandwidth {src!r}->{dst!r} is not a number: {value!r}"
        ) from exc
    if not math.isfinite(v) or v < 0:
        raise InvalidArgumentError(
            f"bandwidth {src!r}->{dst!r} must be finite and >= 0, got {value!r}"
        )
    return v


def _sort_key(x: Hashable) -> tuple:
    # ids of one type sort naturally; mixed types sort by type name first
    return (type(x).__name__, x)


def _sorted_order(ids: Sequence[Hashable]) -> list[int]:
    try:
        return sorted(range(len(ids)), key=lambda k: _sort_key(ids[k]))
    except TypeError as exc:
        raise InvalidArgumentError(f"peer ids must be sortable: {exc}") from exc


# ---------------------------------------------------------------------------
# evaluation


def ring_bottleneck(ring: Sequence[Hashable], bw: Any) -> float:
    """The smallest directed bandwidth on ``ring`` (0 if an edge is unusable,
    infinite for a single peer).  ``bw`` as in :func:`bandwidth_matrix`."""
    ids, mat = bandwidth_matrix(bw, _peers_hint(bw, ring))
    idx = _ring_indices(ring, ids)
    if len(idx) == 1:
        return math.inf
    return float(min(mat[a, b] for a, b in _edges(idx)))


def predicted_bus_bandwidth(ring: Sequence[Hashable], bw: Any) -> float:
    """The bus bandwidth (bytes/s) of a pipelined ring all-reduce on ``ring``:
    the bottleneck edge's bandwidth.

    Model: S bytes in n chunks; reduce-scatter then all-gather move
    2(n-1) chunks along every edge, all edges concurrently, each step as
    slow as the slowest edge, so time = 2(n-1)/n * S / min_edge and the bus
    bandwidth S * 2(n-1)/n / time = min_edge.  Per-message latency and CPU
    are left out (large messages).  0 if the ring uses an unusable edge;
    infinite for a single peer (nothing moves)."""
    return ring_bottleneck(ring, bw)


def _edges(ring: Sequence[int]) -> list[tuple[int, int]]:
    ring = list(ring)
    return list(zip(ring, ring[1:] + ring[:1], strict=True))


def _peers_hint(bw: Any, ring: Sequence[Hashable]) -> Sequence[Hashable] | None:
    # a mapping may omit a peer whose edges are all unknown; the ring names it
    return list(ring) if isinstance(bw, Mapping) else None


def _ring_indices(ring: Sequence[Hashable], ids: Sequence[Hashable]) -> list[int]:
    index = {x: k for k, x in enumerate(ids)}
    ring = list(ring)
    if len(ring) != len(ids) or set(ring) != set(ids):
        raise InvalidArgumentError(
            f"ring {ring!r} must visit every peer of the matrix exactly once ({list(ids)!r})"
        )
    return [index[x] for x in ring]


def _solution(
    ids: list[Hashable],
    mat: np.ndarray,
    tour: Sequence[int],
    exact: bool,
    reason: str,
    upper_bound: float,
) -> RingSolution:
    tour = [int(v) for v in tour]
    start = tour.index(0)  # index 0 is the smallest id
    tour = tour[start:] + tour[:start]
    edges = _edges(tour)
    bottleneck = float(min(mat[a, b] for a, b in edges))
    assert bottleneck > 0, "solver produced a ring with an unusable edge"
    sum_inv = math.fsum(1.0 / mat[a, b] for a, b in edges)
    return RingSolution(
        ring=[ids[v] for v in tour],
        bottleneck=bottleneck,
        sum_inv=sum_inv,
        predicted_bus_bandwidth=bottleneck,
        exact=exact,
        reason=reason,
        upper_bound=max(upper_bound, bottleneck),
    )


def _infeasible(reason: str, exact: bool, upper_bound: float = 0.0) -> RingSolution:
    return RingSolution(
        ring=None,
        bottleneck=0.0,
        sum_inv=math.inf,
        predicted_bus_bandwidth=0.0,
        exact=exact,
        reason=reason,
        upper_bound=upper_bound,
    )


# ---------------------------------------------------------------------------
# solver entry point


def solve_ring(
    bw: Any,
    *,
    peers: Sequence[Hashable] | None = None,
    time_limit: float = DEFAULT_TIME_LIMIT,
    exact_max_n: int = DEFAULT_EXACT_MAX_N,
    seed: int = 0,
) -> RingSolution:
    """The ring over every peer of ``bw`` with the largest bottleneck, ties
    broken by the smallest sum of 1/bandwidth; see the module docstring.

    ``bw``: a square matrix or ``{(from, to): bytes/s}`` mapping (see
    :func:`bandwidth_matrix`); ``peers``: the ids (row order for a matrix;
    extra peers for a mapping).  Groups of at most ``exact_max_n`` peers
    (at most 18) are solved exactly; larger ones, or an exact solve that
    does not finish within half of ``time_limit`` (seconds), by the
    heuristic, which stops by ``time_limit``.  ``seed`` drives the heuristic's perturbations.
    """
    if not (time_limit > 0 and math.isfinite(time_limit)):
        raise InvalidArgumentError(f"time_limit must be a positive number, got {time_limit!r}")
    if not 0 <= exact_max_n <= EXACT_HARD_MAX_N:
        raise InvalidArgumentError(f"exact_max_n must be in [0, {EXACT_HARD_MAX_N}]")
    # a margin for the work after the last deadline check (one move at n = 256)
    start = time.monotonic()
    deadline = start + 0.95 * time_limit
    ids, mat = bandwidth_matrix(bw, peers)
    n = len(ids)
    if n == 1:
        return RingSolution(
            ring=list(ids),
            bottleneck=math.inf,
            sum_inv=0.0,
            predicted_bus_bandwidth=math.inf,
            exact=True,
            reason="single peer: no edges",
        )
    ub, proof = _upper_bound(mat)
    if ub == 0.0:
        return _infeasible(f"no ring avoids the unusable edges: {proof}", exact=True)
    if n <= max(exact_max_n, 3):  # n <= 3: at most two rings, exact is instant
        # half the time at most, so that the heuristic can still run after it
        result = _exact(mat, start + 0.5 * time_limit)
        if result is not None:
            bottleneck, tour = result
            if tour is None:
                return _infeasible("no Hamiltonian cycle avoids the unusable edges", exact=True)
            return _solution(ids, mat, tour, exact=True, reason="", upper_bound=bottleneck)
        fallback = "exact search did not finish in half the time limit; heuristic used"
    else:
        fallback = ""
    tour, timed_out = _heuristic(mat, ub, deadline, seed)
    if tour is None:
        why = "the heuristic found no ring that avoids the unusable edges"
        if timed_out:
            why += " before the time limit"
        why = "; ".join(r for r in (why, fallback) if r)
        return _infeasible(why, exact=False, upper_bound=ub)
    reasons = [r for r in (fallback, "time limit reached" if timed_out else "") if r]
    sol = _solution(ids, mat, tour, exact=False, reason="; ".join(reasons), upper_bound=ub)
    if sol.bottleneck >= ub:  # the bound is reached: the bottleneck is optimal
        reasons.insert(0, "bottleneck meets the upper bound (tie-break heuristic)")
        sol = replace(sol, reason="; ".join(reasons))
    return sol


def propose_ring(
    current_ring: Sequence[Hashable] | None,
    bw: Any,
    *,
    improvement: float = DEFAULT_IMPROVEMENT,
    time_limit: float = DEFAULT_TIME_LIMIT,
    exact_max_n: int = DEFAULT_EXACT_MAX_N,
    seed: int = 0,
) -> RingSolution | None:
    """Re-solve with the live estimates ``bw`` and return the new ring's
    solution if its bottleneck beats ``current_ring``'s by more than
    ``improvement`` (a fraction: 0.2 = 20 %), else ``None``.

    The current ring's bottleneck is taken from ``bw`` too (an edge of it
    that is unknown or unreachable makes it 0, so any feasible ring beats
    it).  ``current_ring`` ``None`` means there is no ring yet.  The peers of
    ``bw`` (and of ``current_ring``) are the group."""
    if not (improvement >= 0 and math.isfinite(improvement)):
        raise InvalidArgumentError(f"improvement must be >= 0, got {improvement!r}")
    peers = list(current_ring) if current_ring is not None else None
    if peers is not None and not isinstance(bw, Mapping):
        ids, _ = bandwidth_matrix(bw)
        _ring_indices(peers, ids)  # the ring must cover the matrix's peers
        peers = None
    sol = solve_ring(bw, peers=peers, time_limit=time_limit, exact_max_n=exact_max_n, seed=seed)
    if sol.ring is None:
        return None
    if current_ring is None:
        return sol
    current = ring_bottleneck(current_ring, bw)
    if current == 0.0 or sol.bottleneck > current * (1.0 + improvement):
        return sol
    return None


# ---------------------------------------------------------------------------
# bounds


def _upper_bound(mat: np.ndarray) -> tuple[float, str]:
    """A bottleneck no ring exceeds, and (when it is 0) why no ring exists.

    min over peers of its fastest outgoing and incoming edge, and the
    largest threshold at which the edges that fast still connect the group
    strongly (binary search over the distinct bandwidths)."""
    out_best = mat.max(axis=1)
    in_best = mat.max(axis=0)
    if out_best.min() == 0.0:
        return 0.0, f"peer index {int(out_best.argmin())} has no usable outgoing edge"
    if in_best.min() == 0.0:
        return 0.0, f"peer index {int(in_best.argmin())} has no usable incoming edge"
    degree_bound = float(min(out_best.min(), in_best.min()))
    values = np.unique(mat[mat > 0])
    values = values[values <= degree_bound]
    if not _strongly_connected(mat >= values[0]):
        return 0.0, "the usable edges do not connect the group strongly"
    lo, hi = 0, len(values) - 1  # values[lo] connects; find the largest that does
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _strongly_connected(mat >= values[mid]):
            lo = mid
        else:
            hi = mid - 1
    return float(values[lo]), ""


def _strongly_connected(adj: np.ndarray) -> bool:
    return _reaches_all(adj) and _reaches_all(adj.T)


def _reaches_all(adj: np.ndarray) -> bool:
    n = adj.shape[0]
    seen = np.zeros(n, dtype=bool)
    seen[0] = True
    frontier = seen.copy()
    while frontier.any():
        nxt = adj[frontier].any(axis=0) & ~seen
        seen |= nxt
        frontier = nxt
    return bool(seen.all())


# ---------------------------------------------------------------------------
# exact: Held-Karp over subsets of peers 1..n-1, paths start at peer 0


def _exact(mat: np.ndarray, deadline: float) -> tuple[float, list[int] | None] | None:
    """``(bottleneck, tour)``, ``(0, None)`` if no cycle exists, or ``None``
    if the deadline passed first."""
    n = mat.shape[0]
    m = n - 1
    size = 1 << m
    full = size - 1
    masks = np.arange(size, dtype=np.int64)
    popcount = np.zeros(size, dtype=np.int64)
    for b in range(m):
        popcount += (masks >> b) & 1
    # per layer k and end node u: the masks of size k containing u
    layers: list[list[tuple[int, np.ndarray]]] = []
    for k in range(2, m + 1):
        layer = masks[popcount == k]
        layers.append([(u, layer[((layer >> (u - 1)) & 1) == 1]) for u in range(1, n)])

    # 1. (max, min): best[mask, v] = largest bottleneck of a path 0 -> ... -> v
    #    through exactly {0} + mask.  0 = no such path (0 also means unusable).
    best = np.zeros((size, n), dtype=np.float64)
    for v in range(1, n):
        best[1 << (v - 1), v] = mat[0, v]
    for layer in layers:
        if time.monotonic() > deadline:
            return None
        for u, sel in layer:
            prev = sel ^ (1 << (u - 1))
            best[sel, u] = np.minimum(best[prev], mat[:, u]).max(axis=1)
    bottleneck = float(np.minimum(best[full], mat[:, 0]).max())
    if bottleneck == 0.0:
        return 0.0, None

    # 2. (min, +) over 1/bandwidth with edges below the bottleneck removed
    with np.errstate(divide="ignore"):
        cost = np.where(mat >= bottleneck, 1.0 / mat, np.inf)
    total = np.full((size, n), np.inf)
    parent = np.zeros((size, n), dtype=np.int8 if n < 128 else np.int16)
    for v in range(1, n):
        total[1 << (v - 1), v] = cost[0, v]
    for layer in layers:
        if time.monotonic() > deadline:
            return None
        for u, sel in layer:
            prev = sel ^ (1 << (u - 1))
            cand = total[prev] + cost[:, u]
            arg = cand.argmin(axis=1)
            total[sel, u] = cand[np.arange(len(sel)), arg]
            parent[sel, u] = arg
    closing = total[full] + cost[:, 0]
    last = int(closing.argmin())
    assert math.isfinite(closing[last])
    tour = []
    mask, v = full, last
    while v != 0:
        tour.append(v)
        pv = int(parent[mask, v])
        mask ^= 1 << (v - 1)
        v = pv
    tour.append(0)
    tour.reverse()
    return bottleneck, tour


# ---------------------------------------------------------------------------
# heuristic: threshold search + direction-preserving segment-swap local search


class _Search:
    """Local search on one threshold's cost matrix."""

    def __init__(self, mat: np.ndarray, seed: int, deadline: float):
        self.mat = mat
        self.n = mat.shape[0]
        self.rng = np.random.default_rng(seed)
        self.deadline = deadline
        self.timed_out = False
        with np.errstate(divide="ignore"):
            self.inv = np.where(mat > 0, 1.0 / np.where(mat > 0, mat, 1.0), 0.0)

    def costs(self, threshold: float) -> np.ndarray:
        ok = self.mat >= threshold
        scale = _TIEBREAK_SCALE / (self.n * float(self.inv[ok].max()))
        return np.where(ok, self.inv * scale, 1.0)

    def out_of_time(self) -> bool:
        if time.monotonic() > self.deadline:
            self.timed_out = True
        return self.timed_out

    def construct(self, threshold: float) -> np.ndarray:
        """Greedy walk from peer 0: to the unvisited peer with the fewest
        onward options over edges >= threshold (Warnsdorff), ties to the
        fastest edge; an edge below the threshold only when nothing else is
        left."""
        n, mat = self.n, self.mat
        ok = mat >= threshold
        np.fill_diagonal(ok, False)
        remaining_out = ok.sum(axis=1).astype(np.int64)
        unvisited = np.ones(n, dtype=bool)
        tour = [0]
        unvisited[0] = False
        remaining_out -= ok[:, 0]
        cur = 0
        for _ in range(n - 1):
            cand = ok[cur] & unvisited
            if cand.any():
                idx = np.flatnonzero(cand)
                key = np.lexsort((-mat[cur, idx], remaining_out[idx]))
                nxt = int(idx[key[0]])
            else:
                idx = np.flatnonzero(unvisited)
                nxt = int(idx[np.argmax(mat[cur, idx])])
            tour.append(nxt)
            unvisited[nxt] = False
            remaining_out -= ok[:, nxt]
            cur = nxt
        return np.array(tour, dtype=np.int64)

    def swap_deltas(self, tour: np.ndarray, cost: np.ndarray, pos: int):
        """Cost changes of every segment swap through the edge
        tour[pos] -> tour[pos+1]: ``(delta, a)`` with ``delta[j-1, k-1]``
        the change of turning ``a = B C D`` (the tour rotated so that the
        edge is ``a[-1] -> a[0]``, B = a[:j], C = a[j:k], D = a[k:]) into
        C B D; entries with j >= k are infinite."""
        n = self.n
        a = np.roll(tour, -(pos + 1))
        last, first = a[-1], a[0]
        term1 = cost[last, a[1:]] - cost[a[:-1], a[1:]]  # new a[-1] -> a[j]
        term2 = cost[a[:-1], first] - cost[a[:-1], a[1:]]  # new a[k-1] -> a[0]
        cross = cost[np.ix_(a[:-1], a[1:])]  # new a[j-1] -> a[k]
        delta = term1[:, None] + term2[None, :] + cross - cost[last, first]
        delta[np.tril_indices(n - 1)] = np.inf
        return delta, a

    @staticmethod
    def apply_swap(a: np.ndarray, flat: int) -> np.ndarray:
        j, k = divmod(flat, len(a) - 1)
        j, k = j + 1, k + 1
        return np.concatenate((a[j:k], a[:j], a[k:]))

    def best_swap(self, tour: np.ndarray, cost: np.ndarray, pos: int):
        """The best segment swap through the edge tour[pos] -> tour[pos+1]:
        ``(delta, new_tour)``."""
        delta, a = self.swap_deltas(tour, cost, pos)
        flat = int(np.argmin(delta))
        d = float(delta.flat[flat])
        if not math.isfinite(d):
            return 0.0, tour
        return d, self.apply_swap(a, flat)

    def sideways(self, tour: np.ndarray, cost: np.ndarray) -> np.ndarray:
        """A random segment swap through a random violated edge that adds no
        violation (a step on the plateau of equal violation counts)."""
        edge_cost = cost[tour, np.roll(tour, -1)]
        pos = int(self.rng.choice(np.flatnonzero(edge_cost >= 1.0)))
        delta, a = self.swap_deltas(tour, cost, pos)
        cand = np.flatnonzero(delta.ravel() < 0.5)
        if len(cand) == 0:
            return self.perturb(tour)
        return self.apply_swap(a, int(self.rng.choice(cand)))

    def descend(self, tour: np.ndarray, cost: np.ndarray, violations_only: bool):
        """Apply improving segment swaps until none is left (or time is up)."""
        eps = 1e-15
        while not self.out_of_time():
            edge_cost = cost[tour, np.roll(tour, -1)]
            if violations_only:
                anchors = np.flatnonzero(edge_cost >= 1.0)
                if len(anchors) == 0:
                    return tour
            else:
                anchors = np.argsort(-edge_cost, kind="stable")
            improved = False
            for pos in anchors:
                if self.out_of_time():
                    break
                d, new = self.best_swap(tour, cost, int(pos))
                if d < -eps:
                    tour, improved = new, True
                    break
            if not improved:
                return tour
        return tour

    def perturb(self, tour: np.ndarray) -> np.ndarray:
        n = self.n
        if n < 4:
            return tour
        i, j, k = sorted(self.rng.choice(np.arange(1, n), size=3, replace=False))
        return np.concatenate((tour[:i], tour[j:k], tour[i:j], tour[k:]))

    def violations(self, tour: np.ndarray, threshold: float) -> int:
        return int((self.mat[tour, np.roll(tour, -1)] < threshold).sum())

    def feasible_at(
        self, tour: np.ndarray, threshold: float, steps: int, budget: float
    ) -> np.ndarray | None:
        """Try to turn ``tour`` into a ring with every edge >= threshold:
        descend, then up to ``steps`` plateau steps (each followed by a
        descent) within ``budget`` seconds."""
        cost = self.costs(threshold)
        stop = time.monotonic() + budget
        best = self.descend(tour, cost, violations_only=True)
        best_v = self.violations(best, threshold)
        cur = best
        for _ in range(steps):
            if best_v == 0 or self.out_of_time() or time.monotonic() > stop:
                break
            cur = self.descend(self.sideways(cur, cost), cost, violations_only=True)
            v = self.violations(cur, threshold)
            if v < best_v:
                best, best_v = cur, v
        return best if best_v == 0 else None

    def backtrack(
        self, threshold: float, max_nodes: int, budget: float, noise: np.ndarray | None = None
    ) -> np.ndarray | None:
        """Depth-first search for a ring over edges >= threshold from peer 0,
        most constrained peer first (Warnsdorff), pruning a branch as soon
        as an unvisited peer has no way in or no way out; gives up after
        ``max_nodes`` expansions or ``budget`` seconds."""
        n = self.n
        ok = self.mat >= threshold
        np.fill_diagonal(ok, False)
        out_bits = [sum(1 << int(j) for j in np.flatnonzero(ok[i])) for i in range(n)]
        in_bits = [sum(1 << int(i) for i in np.flatnonzero(ok[:, j])) for j in range(n)]
        stop = time.monotonic() + budget
        all_bits = (1 << n) - 1
        path = [0]
        unvisited = all_bits ^ 1
        stack = [self._children(0, unvisited, out_bits, noise)]
        expanded = 0
        while stack:
            expanded += 1
            if expanded > max_nodes or (expanded & 63 == 0 and time.monotonic() > stop):
                return None
            if self.out_of_time():
                return None
            children = stack[-1]
            if not children:
                stack.pop()
                unvisited |= 1 << path.pop()
                continue
            v = children.pop()
            rest = unvisited & ~(1 << v)
            if rest == 0:
                if out_bits[v] & 1:
                    return np.array(path + [v], dtype=np.int64)
                continue
            # every peer left needs a way in (from v or the rest) and a way
            # out (to the rest or back to peer 0)
            ins, outs = rest | (1 << v), rest | 1
            dead = False
            r = rest
            while r:
                low = r & -r
                u = low.bit_length() - 1
                if not (in_bits[u] & ins) or not (out_bits[u] & outs):
                    dead = True
                    break
                r ^= low
            if dead:
                continue
            path.append(v)
            unvisited = rest
            stack.append(self._children(v, rest, out_bits, noise))
        return None

    @staticmethod
    def _children(
        v: int, unvisited: int, out_bits: list[int], noise: np.ndarray | None
    ) -> list[int]:
        """Unvisited successors of v, the most constrained last (popped first)."""
        cand = []
        r = out_bits[v] & unvisited
        while r:
            low = r & -r
            u = low.bit_length() - 1
            key = bin(out_bits[u] & unvisited).count("1")
            cand.append((key, 0.0 if noise is None else float(noise[u]), u))
            r ^= low
        cand.sort(reverse=True)
        return [u for _, _, u in cand]

    def polish(self, tour: np.ndarray, threshold: float, kicks: int) -> np.ndarray:
        """Shorten (sum of 1/bw) a violation-free ring, keeping it so."""
        cost = self.costs(threshold)

        def value(t: np.ndarray) -> float:
            return float(cost[t, np.roll(t, -1)].sum())

        best = self.descend(tour, cost, violations_only=False)
        best_val = value(best)
        for _ in range(kicks):
            if self.out_of_time():
                break
            cand = self.descend(self.perturb(best), cost, violations_only=False)
            val = value(cand)
            if val < best_val - 1e-15:
                best, best_val = cand, val
        return best


def _heuristic(
    mat: np.ndarray, upper_bound: float, deadline: float, seed: int
) -> tuple[list[int] | None, bool]:
    n = mat.shape[0]
    search = _Search(mat, seed, deadline)
    kicks = max(8, 4 * n) if n <= 32 else 8
    steps = 20 * n
    values = np.unique(mat[mat > 0])
    values = values[values <= upper_bound]

    def budget(tries_left: int) -> float:
        # keep a fifth of the time for the tie-break polish
        left = deadline - time.monotonic()
        return max(0.0, 0.8 * left / max(1, tries_left))

    def find(t: float, start: np.ndarray | None, tries_left: int) -> np.ndarray | None:
        # cheapest first: greedy walk + descent, bounded backtracking, then
        # the plateau walk from the best ring so far
        cand = search.feasible_at(search.construct(t), t, 0, 0.0)
        # backtracking: Warnsdorff order, then restarts with random tie-breaks
        stop = time.monotonic() + budget(tries_left) / 2
        for attempt in range(8):
            if cand is not None or time.monotonic() > stop:
                break
            noise = None if attempt == 0 else search.rng.random(n)
            cand = search.backtrack(t, 50 * n, stop - time.monotonic(), noise)
        if cand is None:
            cand = search.feasible_at(
                start if start is not None else search.construct(t), t, steps, budget(tries_left)
            )
        return cand

    # a first ring that avoids the unusable edges
    tour = find(values[0], None, 2 + math.ceil(math.log2(len(values) + 1)))
    if tour is None:
        return None, search.timed_out
    best_tour = tour
    lo = int(np.searchsorted(values, search.mat[tour, np.roll(tour, -1)].min()))
    hi = len(values) - 1
    # the top threshold first (often reached), then bisect
    first_try = True
    while lo < hi and not search.out_of_time():
        tries = 1 + math.ceil(math.log2(hi - lo + 1))
        mid = hi if first_try else (lo + hi + 1) // 2
        first_try = False
        t = values[mid]
        cand = find(t, best_tour, tries)
        if cand is not None:
            best_tour = cand
            got = search.mat[cand, np.roll(cand, -1)].min()
            lo = max(mid, int(np.searchsorted(values, got)))
        else:
            hi = mid - 1
    bottleneck = float(search.mat[best_tour, np.roll(best_tour, -1)].min())
    if not search.out_of_time():
        best_tour = search.polish(best_tour, bottleneck, kicks)
    return [int(v) for v in best_tour], search.timed_out
