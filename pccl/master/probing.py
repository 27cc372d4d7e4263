"""The master's topology bookkeeping: measured edges, probe schedules and
the ring proposed for the next epoch.  Plain Python, no I/O, no clock
(``now`` comes from the caller), like :mod:`pccl.master.state`, which
drives it.

* :class:`EdgeStore` keeps one estimate per directed edge (from probes and
  from the traffic of completed collectives) with the time it was taken.
* :func:`probe_rounds` schedules the edges to measure in rounds in which
  every peer sends to at most one peer and receives from at most one, so
  no two probes share a NIC.
* :class:`OptimizeRound` is one ``optimize_topology()`` call of a group:
  collect every member's call, run the probe rounds, hand the matrix to
  the solver (in a worker thread of the server), answer every caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PROBE = "probe"
PASSIVE = "passive"
UNREACHABLE = "unreachable"


@dataclass
class Edge:
    """What is known of one directed edge ``src -> dst``."""

    bytes_per_s: float  # 0 when unreachable
    rtt_s: float
    at: float  # when measured (monotonic seconds)
    source: str  # PROBE | PASSIVE | UNREACHABLE


class EdgeStore:
    """Directed edge estimates of the whole run, keyed ``(src, dst)``.

    Probes replace an estimate; passive samples (one completed collective's
    bytes over busy time on the edge it received on) are blended in with
    weight ``passive_weight`` so one noisy step cannot swing the ring, and
    refresh its age.  An estimate older than ``max_age`` seconds is stale:
    the next ``optimize_topology()`` probes it again.
    """

    def __init__(self, max_age: float = 300.0, passive_weight: float = 0.5):
        if max_age <= 0:
            raise ValueError("max_age must be positive")
        if not 0 < passive_weight <= 1:
            raise ValueError("passive_weight must be in (0, 1]")
        self.max_age = max_age
        self.passive_weight = passive_weight
        self.edges: dict[tuple[str, str], Edge] = {}

    def probed(self, src: str, dst: str, bytes_per_s: float, rtt_s: float, now: float) -> None:
        self.edges[(src, dst)] = Edge(float(bytes_per_s), float(rtt_s), now, PROBE)

    def unreachable(self, src: str, dst: str, now: float) -> None:
        self.edges[(src, dst)] = Edge(0.0, 0.0, now, UNREACHABLE)

    def passive(self, src: str, dst: str, bytes_per_s: float, now: float) -> None:
        old = self.edges.get((src, dst))
        if old is None or old.source == UNREACHABLE:
            self.edges[(src, dst)] = Edge(float(bytes_per_s), 0.0, now, PASSIVE)
            return
        w = self.passive_weight
        old.bytes_per_s = (1 - w) * old.bytes_per_s + w * float(bytes_per_s)
        old.at = now
        old.source = PASSIVE

    def forget_peer(self, peer_id: str) -> None:
        for key in [k for k in self.edges if peer_id in k]:
            del self.edges[key]

    def needs_probe(self, src: str, dst: str, now: float) -> bool:
        """Unknown, stale, or known only from live traffic: a passive
        sample of an edge that was not the ring's limit reads low (its
        sender also waits when the receiver is slow to read), so a probe
        re-measures it."""
        edge = self.edges.get((src, dst))
        return edge is None or edge.source == PASSIVE or now - edge.at > self.max_age

    def matrix(self, peers: list[str]) -> dict[tuple[str, str], float]:
        """``{(src, dst): bytes/s}`` among ``peers``; unknown and unreachable
        edges are left out (the solver never uses them)."""
        members = set(peers)
        return {
            k: e.bytes_per_s
            for k, e in self.edges.items()
            if k[0] in members and k[1] in members and e.bytes_per_s > 0
        }

    def as_list(self, peers: list[str], now: float) -> list[dict[str, Any]]:
        members = set(peers)
        return [
            {
                "from": k[0],
                "to": k[1],
                "bytes_per_s": round(e.bytes_per_s, 1),
                "rtt_s": round(e.rtt_s, 6),
                "age_s": round(max(0.0, now - e.at), 3),
                "source": e.source,
            }
            for k, e in sorted(self.edges.items())
            if k[0] in members and k[1] in members
        ]


def probe_rounds(peers: list[str], wanted: set[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """The edges of ``wanted`` (pairs of ``peers``) in rounds of disjoint
    directed pairs: round r holds ``peers[i] -> peers[(i + r) % n]``, so
    each peer sends once and receives once per round and n - 1 rounds
    cover all n(n - 1) edges.  Rounds with nothing wanted are skipped."""
    n = len(peers)
    rounds = []
    for r in range(1, n):
        pairs = [(peers[i], peers[(i + r) % n]) for i in range(n)]
        pairs = [p for p in pairs if p in wanted]
        if pairs:
            rounds.append(pairs)
    return rounds


@dataclass
class OptimizeRound:
    """One ``optimize_topology()`` of a group, from the first call to the
    answer.  ``phase``: collect -> probe -> solve."""

    group: int
    deadline: float
    reqs: dict[str, int] = field(default_factory=dict)  # caller -> its req
    steps: dict[str, int] = field(default_factory=dict)  # next step number per caller
    phase: str = "collect"
    members: list[str] = field(default_factory=list)
    rounds: list[list[tuple[str, str]]] = field(default_factory=list)
    outstanding: dict[str, str] = field(default_factory=dict)  # receiver -> sender
    started_at: float = 0.0
    probe_started_at: float = 0.0
    probes: int = 0
    token: int = 0  # tells solver answers apart

    def next_step(self, peer_id: str) -> int:
        step = self.steps.get(peer_id, 0)
        self.steps[peer_id] = step + 1
        return step


@dataclass(frozen=True)
class SolveRequest:
    """An action for the server: run ``solve_ring(matrix, peers=peers)`` in
    a worker thread and hand the result to ``MasterState.topology_solved``."""

    group: int
    token: int
    peers: tuple[str, ...]
    matrix: dict[tuple[str, str], float]
    current_ring: tuple[str, ...]
    passive: bool = False  # a re-solve from live estimates (propose_ring)
