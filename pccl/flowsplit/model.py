"""Fabrics, flows and sub-flows of the flow-splitting model.

A fabric is a two-tier leaf-spine (:class:`LeafSpine`) or a three-tier
fat-tree (:class:`FatTree`).  Hosts are numbered leaf-major (host ``h`` is on
leaf ``h // hosts_per_leaf``; in a fat-tree the "leaf" is the ToR and ToRs
are numbered pod-major).  Between two different leaves there are
``num_paths(a, b)`` equal-cost paths numbered from 0; in a leaf-spine the
path index is the spine index.  Every directed link has an integer id:

* ``0 .. H-1``: host ``h`` -> its leaf (``("host-up", h)``),
* ``H .. 2H-1``: leaf -> host ``h`` (``("host-down", h)``),
* then the fabric links (``("up", leaf, spine)``, ``("down", spine, leaf)``
  in a leaf-spine; ``("tor-agg", ...)``, ``("agg-core", ...)``,
  ``("core-agg", ...)``, ``("agg-tor", ...)`` in a fat-tree).

``link_names()`` gives the name tuple of every id and ``link_gbps()`` its
rate.  Loads are computed over these ids by :mod:`pccl.flowsplit.loads`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgumentError

__all__ = ["Flow", "SubFlow", "LeafSpine", "FatTree", "Topology", "check_flows"]


@dataclass(frozen=True)
class Flow:
    """``nbytes`` bytes sent from host ``src`` to host ``dst`` in one
    collective step (one ring edge, one exchange of a halving-doubling step,
    one pair of an all-to-all)."""

    src: int
    dst: int
    nbytes: int


@dataclass(frozen=True)
class SubFlow:
    """One piece of a planned flow: bytes ``[offset, offset + nbytes)`` of
    ``flows[flow]`` sent over path ``path`` (the spine index in a
    leaf-spine).  ``path`` is ``None`` when source and destination share a
    leaf: such a flow never reaches a spine and is never split."""

    flow: int
    offset: int
    nbytes: int
    path: int | None


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidArgumentError(f"{name} must be an integer, got {value!r}")
    if value <= 0:
        raise InvalidArgumentError(f"{name} must be positive, got {value}")
    return int(value)


def _positive_rate(name: str, value: object) -> float:
    try:
        rate = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{name} must be a number, got {value!r}") from None
    if not np.isfinite(rate) or rate <= 0:
        raise InvalidArgumentError(f"{name} must be a positive finite rate, got {value!r}")
    return rate


class Topology:
    """What the model and the planner need of a fabric (see the module
    docstring).  Subclasses set ``hosts``, ``hosts_per_leaf``, ``leaves`` and
    implement the path and link methods."""

    hosts: int
    hosts_per_leaf: int
    leaves: int
    host_gbps: float

    def leaf_of(self, host: int) -> int:
        """The leaf (ToR) of ``host``."""
        if isinstance(host, bool) or not isinstance(host, (int, np.integer)):
            raise InvalidArgumentError(f"host must be an integer, got {host!r}")
        if not 0 <= host < self.hosts:
            raise InvalidArgumentError(f"host {host} out of range [0, {self.hosts})")
        return int(host) // self.hosts_per_leaf

    # -- paths -----------------------------------------------------------------
    def num_paths(self, src_leaf: int, dst_leaf: int) -> int:
        """Equal-cost paths from ``src_leaf`` to a different ``dst_leaf``."""
        return int(self.num_paths_array(np.array([src_leaf]), np.array([dst_leaf]))[0])

    def num_paths_array(self, src_leaf: np.ndarray, dst_leaf: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def path_hops(
        self, src_leaf: np.ndarray, dst_leaf: np.ndarray, path: np.ndarray
    ) -> list[np.ndarray]:
        """Fabric link ids of each (source leaf, destination leaf, path), one
        int64 array per hop, ``-1`` where a path is shorter."""
        raise NotImplementedError

    def path_link_ids(
        self, src_leaf: np.ndarray, dst_leaf: np.ndarray, path: np.ndarray
    ) -> np.ndarray:
        """:meth:`path_hops` as one ``(m, hops)`` array."""
        return np.stack(self.path_hops(src_leaf, dst_leaf, path), axis=-1)

    # -- links -----------------------------------------------------------------
    @property
    def n_links(self) -> int:
        return len(self.link_names())

    @property
    def first_fabric_link(self) -> int:
        """Id of the first switch-to-switch link (host links come first)."""
        return 2 * self.hosts

    def link_names(self) -> list[tuple]:
        raise NotImplementedError

    def link_gbps(self) -> np.ndarray:
        raise NotImplementedError


class LeafSpine(Topology):
    """A two-tier leaf-spine fabric: ``leaves`` leaves, each with
    ``hosts_per_leaf`` hosts on ``host_gbps`` links and one ``uplink_gbps``
    link to each of ``spines`` spines.  The oversubscription ratio is
    ``hosts_per_leaf * host_gbps / (spines * uplink_gbps)``."""

    def __init__(
        self,
        leaves: int,
        spines: int,
        hosts_per_leaf: int,
        host_gbps: float = 1.0,
        uplink_gbps: float = 1.0,
    ) -> None:
        self.leaves = _positive_int("leaves", leaves)
        self.spines = _positive_int("spines", spines)
        self.hosts_per_leaf = _positive_int("hosts_per_leaf", hosts_per_leaf)
        self.host_gbps = _positive_rate("host_gbps", host_gbps)
        self.uplink_gbps = _positive_rate("uplink_gbps", uplink_gbps)
        self.hosts = self.leaves * self.hosts_per_leaf

    def __repr__(self) -> str:
        return (
            f"LeafSpine(leaves={self.leaves}, spines={self.spines}, "
            f"hosts_per_leaf={self.hosts_per_leaf}, host_gbps={self.host_gbps:g}, "
            f"uplink_gbps={self.uplink_gbps:g})"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LeafSpine) and repr(self) == repr(other)

    def __hash__(self) -> int:
        return hash(repr(self))

    @property
    def oversubscription(self) -> float:
        """Host bandwidth of a leaf over its uplink bandwidth (1.0 = 1:1)."""
        return self.hosts_per_leaf * self.host_gbps / (self.spines * self.uplink_gbps)

    def num_paths_array(self, src_leaf: np.ndarray, dst_leaf: np.ndarray) -> np.ndarray:
        return np.full(np.shape(src_leaf), self.spines, dtype=np.int64)

    def path_hops(
        self, src_leaf: np.ndarray, dst_leaf: np.ndarray, path: np.ndarray
    ) -> list[np.ndarray]:
        base = self.first_fabric_link
        path = np.asarray(path, dtype=np.int64)
        up = base + np.asarray(src_leaf, dtype=np.int64) * self.spines + path
        down = (base + self.leaves * self.spines) + path * self.leaves
        down += np.asarray(dst_leaf, dtype=np.int64)
        return [up, down]

    def link_names(self) -> list[tuple]:
        names: list[tuple] = [("host-up", h) for h in range(self.hosts)]
        names += [("host-down", h) for h in range(self.hosts)]
        names += [("up", leaf, sp) for leaf in range(self.leaves) for sp in range(self.spines)]
        names += [("down", sp, leaf) for sp in range(self.spines) for leaf in range(self.leaves)]
        return names

    def link_gbps(self) -> np.ndarray:
        fabric = 2 * self.leaves * self.spines
        return np.concatenate(
            [np.full(2 * self.hosts, self.host_gbps), np.full(fabric, self.uplink_gbps)]
        )


class FatTree(Topology):
    """A three-tier fat-tree (CLOS): ``pods`` pods, each with
    ``tors_per_pod`` ToRs and ``aggs_per_pod`` aggregation switches (every
    ToR links to every aggregation switch of its pod at ``tor_gbps``);
    aggregation switch ``a`` of every pod links to the same
    ``cores_per_agg`` core switches ``(a, 0..cores_per_agg-1)`` at
    ``core_gbps``.  ToRs are the leaves (numbered pod-major), each with
    ``hosts_per_tor`` hosts at ``host_gbps``.

    Paths: ``aggs_per_pod`` between two ToRs of one pod (path = aggregation
    switch); ``aggs_per_pod * cores_per_agg`` between pods (path ``p`` goes
    up through aggregation switch ``p // cores_per_agg`` and core
    ``p % cores_per_agg`` of that group).  The paper's fabric
    (arXiv 2407.00550 v2, 512 GPUs) is
    ``FatTree(8, 4, 4, 4, 16, 400, 1600, 1600)``.
    """

    def __init__(
        self,
        pods: int,
        tors_per_pod: int,
        aggs_per_pod: int,
        cores_per_agg: int,
        hosts_per_tor: int,
        host_gbps: float = 1.0,
        tor_gbps: float = 1.0,
        core_gbps: float = 1.0,
    ) -> None:
        self.pods = _positive_int("pods", pods)
        self.tors_per_pod = _positive_int("tors_per_pod", tors_per_pod)
        self.aggs_per_pod = _positive_int("aggs_per_pod", aggs_per_pod)
        self.cores_per_agg = _positive_int("cores_per_agg", cores_per_agg)
        self.hosts_per_leaf = _positive_int("hosts_per_tor", hosts_per_tor)
        self.host_gbps = _positive_rate("host_gbps", host_gbps)
        self.tor_gbps = _positive_rate("tor_gbps", tor_gbps)
        self.core_gbps = _positive_rate("core_gbps", core_gbps)
        self.leaves = self.pods * self.tors_per_pod
        self.hosts = self.leaves * self.hosts_per_leaf

    def __repr__(self) -> str:
        return (
            f"FatTree(pods={self.pods}, tors_per_pod={self.tors_per_pod}, "
            f"aggs_per_pod={self.aggs_per_pod}, cores_per_agg={self.cores_per_agg}, "
            f"hosts_per_tor={self.hosts_per_leaf}, host_gbps={self.host_gbps:g}, "
            f"tor_gbps={self.tor_gbps:g}, core_gbps={self.core_gbps:g})"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FatTree) and repr(self) == repr(other)

    def __hash__(self) -> int:
        return hash(repr(self))

    def num_paths_array(self, src_leaf: np.ndarray, dst_leaf: np.ndarray) -> np.ndarray:
        same_pod = np.asarray(src_leaf) // self.tors_per_pod == np.asarray(dst_leaf) // (
            self.tors_per_pod
        )
        return np.where(same_pod, self.aggs_per_pod, self.aggs_per_pod * self.cores_per_agg)

    def path_hops(
        self, src_leaf: np.ndarray, dst_leaf: np.ndarray, path: np.ndarray
    ) -> list[np.ndarray]:
        src_leaf = np.asarray(src_leaf, dtype=np.int64)
        dst_leaf = np.asarray(dst_leaf, dtype=np.int64)
        path = np.asarray(path, dtype=np.int64)
        T, A, C = self.leaves, self.aggs_per_pod, self.cores_per_agg
        base = self.first_fabric_link
        b_tor_agg = base  # (tor, agg): T*A
        b_agg_core = b_tor_agg + T * A  # (pod, agg, core): P*A*C
        b_core_agg = b_agg_core + self.pods * A * C  # (agg, core, pod)
        b_agg_tor = b_core_agg + self.pods * A * C  # (agg, tor): A*T
        src_pod = src_leaf // self.tors_per_pod
        dst_pod = dst_leaf // self.tors_per_pod
        same_pod = src_pod == dst_pod
        agg = np.where(same_pod, path, path // C)
        core = np.where(same_pod, 0, path % C)
        up1 = b_tor_agg + src_leaf * A + agg
        up2 = np.where(same_pod, -1, b_agg_core + (src_pod * A + agg) * C + core)
        down2 = np.where(same_pod, -1, b_core_agg + (agg * C + core) * self.pods + dst_pod)
        down1 = b_agg_tor + agg * T + dst_leaf
        return [up1, up2, down2, down1]

    def link_names(self) -> list[tuple]:
        T, A, C, P = self.leaves, self.aggs_per_pod, self.cores_per_agg, self.pods
        names: list[tuple] = [("host-up", h) for h in range(self.hosts)]
        names += [("host-down", h) for h in range(self.hosts)]
        names += [("tor-agg", t, a) for t in range(T) for a in range(A)]
        names += [("agg-core", p, a, c) for p in range(P) for a in range(A) for c in range(C)]
        names += [("core-agg", a, c, p) for a in range(A) for c in range(C) for p in range(P)]
        names += [("agg-tor", a, t) for a in range(A) for t in range(T)]
        return names

    def link_gbps(self) -> np.ndarray:
        T, A, C, P = self.leaves, self.aggs_per_pod, self.cores_per_agg, self.pods
        return np.concatenate(
            [
                np.full(2 * self.hosts, self.host_gbps),
                np.full(T * A, self.tor_gbps),
                np.full(2 * P * A * C, self.core_gbps),
                np.full(A * T, self.tor_gbps),
            ]
        )


def check_flows(topo: Topology, flows: Sequence[Flow]) -> None:
    """Raise :class:`pccl.InvalidArgumentError` (a ``ValueError``) unless
    every flow has hosts in range, distinct ends and a non-negative whole
    byte count."""
    if not isinstance(topo, Topology):
        raise InvalidArgumentError(f"topo must be a LeafSpine or FatTree, got {topo!r}")
    hosts = topo.hosts
    for i, f in enumerate(flows):
        if not isinstance(f, Flow):
            raise InvalidArgumentError(f"flows[{i}] is not a Flow: {f!r}")
        src, dst, nbytes = f.src, f.dst, f.nbytes
        if type(src) is int and type(dst) is int and type(nbytes) is int:
            # the fast path; anything unusual falls through to the checks below
            if 0 <= src < hosts and 0 <= dst < hosts and src != dst and nbytes >= 0:
                continue
        for name, host in (("src", src), ("dst", dst)):
            try:
                topo.leaf_of(host)
            except InvalidArgumentError as e:
                raise InvalidArgumentError(f"flows[{i}].{name}: {e}") from None
        if src == dst:
            raise InvalidArgumentError(f"flows[{i}] sends from host {src} to itself")
        if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)):
            raise InvalidArgumentError(f"flows[{i}].nbytes must be an integer, got {nbytes!r}")
        if nbytes < 0:
            raise InvalidArgumentError(f"flows[{i}].nbytes is negative ({nbytes})")
