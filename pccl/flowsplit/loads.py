"""Link loads of one collective step under each load-balancing scheme.

Schemes (the ``scheme`` argument):

* ``"ecmp"``: every flow takes one path chosen by a seeded hash of
  (seed, flow index); a switch hashing the 5-tuple behaves like this when
  every flow has its own source port.
* ``"mp-x"`` (``"mp-2"``, ``"mp-4"``, ``"mp-8"``, any ``x >= 1``): every
  flow is cut into ``x`` equal sub-flows (whole bytes, the first ones one
  byte larger), each hashed on its own: the paper's MP-RDMA-x baseline.
* ``"spray"``: ideal fluid packet spraying; each flow's bytes are spread
  evenly over all its paths.  This is the reference ("ideal").
* ``"single"``: one path per flow, round-robin per source leaf, no split
  (:func:`pccl.flowsplit.plan_single`).
* ``"minimal"``: the paper's minimal splitting (:func:`pccl.flowsplit.plan`).

Loads are in bytes.  :func:`max_link_load` is the largest load of a
switch-to-switch link (host links carry the same bytes under every scheme);
:func:`step_time` is the predicted completion time of the step, the largest
``load / rate`` over *all* links, host links included (a fluid model: every
link busy at its full rate until its bytes are through).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from math import factorial

import numpy as np

from ..errors import InvalidArgumentError
from .model import Flow, Topology, check_flows
from .planner import _assign

__all__ = [
    "SCHEMES",
    "link_loads",
    "link_load_array",
    "max_link_load",
    "step_time",
    "subflow_count",
    "MonteCarlo",
    "monte_carlo",
    "expected_max_bin",
]

#: The schemes the tables compare, in their order.
SCHEMES = ("spray", "minimal", "single", "ecmp", "mp-2", "mp-4", "mp-8")

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser over a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return x ^ (x >> np.uint64(31))


def _parse_scheme(scheme: str) -> tuple[str, int]:
    if not isinstance(scheme, str):
        raise InvalidArgumentError(f"scheme must be a string, got {scheme!r}")
    if scheme in ("ecmp", "spray", "single", "minimal"):
        return scheme, 1
    if scheme.startswith("mp-"):
        try:
            x = int(scheme[3:])
        except ValueError:
            x = 0
        if x >= 1:
            return "mp", x
    raise InvalidArgumentError(
        f"unknown scheme {scheme!r}; expected one of {', '.join(SCHEMES)} (or mp-<x>)"
    )


def _is_random(scheme: str) -> bool:
    return _parse_scheme(scheme)[0] in ("ecmp", "mp")


class _Prepared:
    """Per-flow arrays of a step, computed once (Monte-Carlo reuses them)."""

    def __init__(self, topo: Topology, flows: Sequence[Flow]) -> None:
        check_flows(topo, flows)
        self.topo = topo
        self.flows = flows
        m = len(flows)
        self.src = np.fromiter((f.src for f in flows), dtype=np.int64, count=m)
        self.dst = np.fromiter((f.dst for f in flows), dtype=np.int64, count=m)
        self.nbytes = np.fromiter((f.nbytes for f in flows), dtype=np.int64, count=m)
        hpl = topo.hosts_per_leaf
        self.src_leaf = self.src // hpl
        self.dst_leaf = self.dst // hpl
        self.remote = np.flatnonzero(self.src_leaf != self.dst_leaf)
        self.paths = topo.num_paths_array(self.src_leaf, self.dst_leaf)
        host = np.zeros(topo.n_links)
        np.add.at(host, self.src, self.nbytes.astype(float))
        np.add.at(host, topo.hosts + self.dst, self.nbytes.astype(float))
        self.host_loads = host
        self.gbps = topo.link_gbps()
        self._static: dict[int, tuple] = {}
        self._plans: dict[str, list] = {}

    def loads(self, flow_idx: np.ndarray, nbytes: np.ndarray, path: np.ndarray) -> np.ndarray:
        """Host loads plus the fabric loads of the pieces
        (flow index, bytes, path) of remote flows."""
        loads = self.host_loads.copy()
        if len(flow_idx):
            w = np.asarray(nbytes, dtype=float)
            n = len(loads)
            hops = self.topo.path_hops(self.src_leaf[flow_idx], self.dst_leaf[flow_idx], path)
            for ids in hops:
                if ids.min() >= 0:
                    loads += np.bincount(ids, weights=w, minlength=n)
                else:
                    ok = ids >= 0
                    loads += np.bincount(ids[ok], weights=w[ok], minlength=n)
        return loads

    def _hashed_static(self, x: int):
        """The seed-independent arrays of the ``x``-way hashed pieces."""
        cached = self._static.get(x)
        if cached is None:
            rem = self.remote
            idx = np.repeat(rem, x)
            piece = np.tile(np.arange(x, dtype=np.int64), len(rem))
            base, extra = np.divmod(self.nbytes[idx], x)
            nbytes = (base + (piece < extra)).astype(float)
            key = (idx * x + piece).astype(np.uint64)
            paths = self.paths[idx].astype(np.uint64)
            cached = self._static[x] = (idx, nbytes, key, paths)
        return cached

    def pieces(self, scheme: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        kind, x = _parse_scheme(scheme)
        rem = self.remote
        if kind in ("minimal", "single"):
            sub = self.planned(kind)
            sub = [sf for sf in sub if sf.path is not None]
            return (
                np.array([sf.flow for sf in sub], dtype=np.int64),
                np.array([sf.nbytes for sf in sub], dtype=float),
                np.array([sf.path for sf in sub], dtype=np.int64),
            )
        if kind == "spray":
            counts = self.paths[rem]
            idx = np.repeat(rem, counts)
            starts = np.repeat(np.cumsum(counts) - counts, counts)
            path = np.arange(len(idx), dtype=np.int64) - starts
            return idx, self.nbytes[idx] / self.paths[idx], path
        # ecmp / mp-x: x pieces per flow, each hashed on (seed, flow, piece)
        idx, nbytes, key, paths = self._hashed_static(x)
        seed_mix = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
        h = _splitmix64(key ^ seed_mix)
        return idx, nbytes, (h % paths).astype(np.int64)

    def planned(self, kind: str) -> list:
        """The plan of ``minimal`` or ``single`` (computed once; the flows
        were checked already)."""
        if kind not in self._plans:
            split = kind == "minimal"
            self._plans[kind] = _assign(self.topo, self.flows, split=split, align=1)
        return self._plans[kind]

    def subflows(self, scheme: str) -> int:
        kind, x = _parse_scheme(scheme)
        if kind == "minimal":
            return len(self.planned("minimal"))
        if kind == "mp":
            return len(self.remote) * x + (len(self.flows) - len(self.remote))
        return len(self.flows)

    def scheme_loads(self, scheme: str, seed: int) -> np.ndarray:
        return self.loads(*self.pieces(scheme, seed))

    def max_fabric(self, loads: np.ndarray) -> float:
        fabric = loads[self.topo.first_fabric_link :]
        return float(fabric.max()) if len(fabric) else 0.0

    def time(self, loads: np.ndarray) -> float:
        return float((loads * 8.0 / (self.gbps * 1e9)).max()) if len(loads) else 0.0


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InvalidArgumentError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def link_load_array(
    topo: Topology, flows: Sequence[Flow], scheme: str, seed: int = 0
) -> np.ndarray:
    """Bytes on every link, indexed by link id (``topo.link_names()``)."""
    _parse_scheme(scheme)
    return _Prepared(topo, flows).scheme_loads(scheme, _check_seed(seed))


def link_loads(
    topo: Topology, flows: Sequence[Flow], scheme: str, seed: int = 0
) -> dict[tuple, float]:
    """Bytes on every link, keyed by link name (``("up", leaf, spine)``,
    ``("down", spine, leaf)``, ``("host-up", h)``, ...)."""
    loads = link_load_array(topo, flows, scheme, seed)
    return dict(zip(topo.link_names(), (float(v) for v in loads), strict=True))


def max_link_load(topo: Topology, flows: Sequence[Flow], scheme: str, seed: int = 0) -> float:
    """Bytes on the most loaded switch-to-switch link (uplinks and
    downlinks) of one step under ``scheme``; ``ecmp`` and ``mp-x`` draw one
    seeded hash per (sub-)flow (:func:`monte_carlo` averages over seeds)."""
    _parse_scheme(scheme)
    prep = _Prepared(topo, flows)
    return prep.max_fabric(prep.scheme_loads(scheme, _check_seed(seed)))


def step_time(topo: Topology, flows: Sequence[Flow], scheme: str, seed: int = 0) -> float:
    """Predicted completion time (seconds) of the step: the largest
    ``bytes * 8 / rate`` over all links, host links included."""
    _parse_scheme(scheme)
    prep = _Prepared(topo, flows)
    return prep.time(prep.scheme_loads(scheme, _check_seed(seed)))


def subflow_count(topo: Topology, flows: Sequence[Flow], scheme: str) -> int:
    """Connections (sub-flows) the scheme opens for the step: one per flow
    for ``ecmp``, ``single`` and ``spray`` (spraying splits packets, not
    connections), ``x`` per remote flow for ``mp-x`` (local flows need one),
    ``len(plan(...))`` for ``minimal``."""
    _parse_scheme(scheme)
    return _Prepared(topo, flows).subflows(scheme)


@dataclass(frozen=True)
class MonteCarlo:
    """Statistics over ``trials`` seeds of a hashed scheme: the maximum
    fabric link load (bytes) and the predicted step time (seconds)."""

    trials: int
    mean: float
    p99: float
    min: float
    max: float
    time_mean: float
    time_p99: float


def monte_carlo(
    topo: Topology,
    flows: Sequence[Flow],
    scheme: str = "ecmp",
    trials: int = 1000,
    seed: int = 0,
) -> MonteCarlo:
    """Mean and 99th percentile of :func:`max_link_load` (and of
    :func:`step_time`) over seeds ``seed .. seed + trials - 1``.  For a
    deterministic scheme every trial is the same."""
    _parse_scheme(scheme)
    if isinstance(trials, bool) or not isinstance(trials, (int, np.integer)) or trials < 1:
        raise InvalidArgumentError(f"trials must be a positive integer, got {trials!r}")
    return _monte_carlo(_Prepared(topo, flows), scheme, int(trials), _check_seed(seed))


def _monte_carlo(prep: _Prepared, scheme: str, trials: int, seed: int) -> MonteCarlo:
    n = trials if _is_random(scheme) else 1
    maxes = np.empty(n)
    times = np.empty(n)
    for t in range(n):
        loads = prep.scheme_loads(scheme, seed + t)
        maxes[t] = prep.max_fabric(loads)
        times[t] = prep.time(loads)
    return MonteCarlo(
        trials=int(trials),
        mean=float(maxes.mean()),
        p99=float(np.percentile(maxes, 99)),
        min=float(maxes.min()),
        max=float(maxes.max()),
        time_mean=float(times.mean()),
        time_p99=float(np.percentile(times, 99)),
    )


def expected_max_bin(balls: int, bins: int) -> float:
    """Exact expected size of the fullest bin when ``balls`` balls fall
    uniformly and independently into ``bins`` bins: the mean maximum load,
    in flows, of ``balls`` equal flows hashed onto ``bins`` paths.  (16 onto
    16 gives 3.0782...; ideal is 1.)  Computed from
    ``P(max <= k) = balls! [x^balls] (sum_{i<=k} x^i / i!)^bins / bins^balls``
    in exact rational arithmetic."""
    if balls < 0 or bins < 1:
        raise InvalidArgumentError("need balls >= 0 and bins >= 1")
    if balls == 0:
        return 0.0

    def p_max_at_most(k: int) -> Fraction:
        term = [Fraction(1, factorial(i)) for i in range(k + 1)]
        poly = [Fraction(1)]
        for _ in range(bins):
            new = [Fraction(0)] * min(len(poly) + k, balls + 1)
            for a, ca in enumerate(poly):
                if ca:
                    for b, cb in enumerate(term):
                        if a + b > balls:
                            break
                        new[a + b] += ca * cb
            poly = new
        if len(poly) <= balls:
            return Fraction(0)
        return poly[balls] * factorial(balls) / Fraction(bins) ** balls

    expected = Fraction(0)
    for k in range(balls):
        expected += 1 - p_max_at_most(k)
    return float(expected)
