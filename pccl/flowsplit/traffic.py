"""Traffic of one collective step, as a list of :class:`Flow`.

Every generator takes the fabric and a per-flow byte count and returns the
flows of one step; ranks are mapped onto hosts by a *placement*:
``"contiguous"`` (rank ``i`` on host ``i``, so neighbouring ranks share a
leaf) or ``"random"`` (a seeded random permutation of the hosts).

* :func:`ring`: rank ``i`` sends to rank ``i + 1`` (one step of a ring
  reduce-scatter or all-gather; ``nbytes`` is the chunk).
* :func:`halving_doubling`: the exchange of one recursive halving /
  doubling step, rank ``i`` and rank ``i XOR 2**step`` send each other
  ``nbytes``; :func:`halving_doubling_steps` gives every step of a
  recursive-halving reduce-scatter of a ``nbytes`` buffer.
* :func:`all_to_all`: every rank sends ``nbytes`` to every other rank.
* :func:`permutation`: every host sends to one other host, a seeded
  random derangement (no host sends to itself).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import InvalidArgumentError
from .model import Flow, Topology

__all__ = [
    "place",
    "ring",
    "halving_doubling",
    "halving_doubling_steps",
    "all_to_all",
    "permutation",
    "PATTERNS",
    "pattern",
]


def _check_nbytes(nbytes: object) -> int:
    if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)) or nbytes < 0:
        raise InvalidArgumentError(f"nbytes must be a non-negative integer, got {nbytes!r}")
    return int(nbytes)


def place(topo: Topology, how: str = "contiguous", seed: int = 0) -> list[int]:
    """Host of every rank: ``"contiguous"`` (identity) or ``"random"``."""
    if how == "contiguous":
        return list(range(topo.hosts))
    if how == "random":
        rng = np.random.default_rng(seed)
        return [int(h) for h in rng.permutation(topo.hosts)]
    raise InvalidArgumentError(f"placement must be 'contiguous' or 'random', got {how!r}")


def ring(topo: Topology, nbytes: int, placement: str = "contiguous", seed: int = 0) -> list[Flow]:
    """One ring step over all hosts: rank ``i`` sends ``nbytes`` to rank
    ``i + 1`` (the last to rank 0)."""
    nbytes = _check_nbytes(nbytes)
    hosts = place(topo, placement, seed)
    if len(hosts) < 2:
        raise InvalidArgumentError("a ring needs at least two hosts")
    n = len(hosts)
    return [Flow(hosts[i], hosts[(i + 1) % n], nbytes) for i in range(n)]


def halving_doubling(
    topo: Topology, nbytes: int, step: int, placement: str = "contiguous", seed: int = 0
) -> list[Flow]:
    """The exchange of one halving-doubling step: ranks ``i`` and
    ``i XOR 2**step`` send each other ``nbytes``.  Needs a power-of-two
    host count and ``0 <= step < log2(hosts)``."""
    nbytes = _check_nbytes(nbytes)
    n = topo.hosts
    if n < 2 or n & (n - 1):
        raise InvalidArgumentError(f"halving-doubling needs a power-of-two host count, not {n}")
    log = n.bit_length() - 1
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step < log:
        raise InvalidArgumentError(f"step must be in [0, {log}), got {step!r}")
    hosts = place(topo, placement, seed)
    d = 1 << int(step)
    return [Flow(hosts[i], hosts[i ^ d], nbytes) for i in range(n)]


def halving_doubling_steps(
    topo: Topology, nbytes: int, placement: str = "contiguous", seed: int = 0
) -> list[list[Flow]]:
    """Every step of a recursive-halving reduce-scatter of an ``nbytes``
    buffer: step ``k`` exchanges ``nbytes / 2**(k+1)`` (whole bytes, rounded
    down) with the rank at distance ``hosts / 2**(k+1)``."""
    nbytes = _check_nbytes(nbytes)
    n = topo.hosts
    if n < 2 or n & (n - 1):
        raise InvalidArgumentError(f"halving-doubling needs a power-of-two host count, not {n}")
    log = n.bit_length() - 1
    return [
        halving_doubling(topo, nbytes >> (k + 1), log - 1 - k, placement, seed)
        for k in range(log)
    ]


def all_to_all(topo: Topology, nbytes: int) -> list[Flow]:
    """Every host sends ``nbytes`` to every other host."""
    nbytes = _check_nbytes(nbytes)
    n = topo.hosts
    return [Flow(a, b, nbytes) for a in range(n) for b in range(n) if a != b]


def permutation(topo: Topology, nbytes: int, seed: int = 0) -> list[Flow]:
    """Every host sends ``nbytes`` to one other host: a seeded random
    derangement (rejection sampling, bounded)."""
    nbytes = _check_nbytes(nbytes)
    n = topo.hosts
    if n < 2:
        raise InvalidArgumentError("a permutation needs at least two hosts")
    rng = np.random.default_rng(seed)
    for _ in range(10_000):  # P(derangement) ~ 1/e: this never runs out
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return [Flow(h, int(perm[h]), nbytes) for h in range(n)]
    raise RuntimeError("no derangement found")  # pragma: no cover


def _hd_cross(topo: Topology, nbytes: int, seed: int, how: str) -> list[Flow]:
    # the first step whose partner is on another leaf under contiguous placement
    n = topo.hosts
    log = n.bit_length() - 1
    step = min(max(topo.hosts_per_leaf.bit_length() - 1, 0), log - 1)
    return halving_doubling(topo, nbytes, step, how, seed)


#: name -> generator(topo, nbytes, seed) for the tables.
PATTERNS: dict[str, Callable[[Topology, int, int], list[Flow]]] = {
    "ring (contiguous)": lambda t, b, s: ring(t, b, "contiguous", s),
    "ring (random)": lambda t, b, s: ring(t, b, "random", s),
    "halving-doubling (cross-leaf step)": lambda t, b, s: _hd_cross(t, b, s, "contiguous"),
    "halving-doubling (random, same step)": lambda t, b, s: _hd_cross(t, b, s, "random"),
    "all-to-all": lambda t, b, s: all_to_all(t, b),
    "permutation": lambda t, b, s: permutation(t, b, s),
}


def pattern(name: str, topo: Topology, nbytes: int, seed: int = 0) -> list[Flow]:
    """The flows of the named pattern (a key of :data:`PATTERNS`)."""
    try:
        gen = PATTERNS[name]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown pattern {name!r}; expected one of {', '.join(PATTERNS)}"
        ) from None
    return gen(topo, nbytes, seed)
