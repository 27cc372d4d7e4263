"""Network-namespace testbeds (root only): described networks of hosts,
routers and bridges joined by shaped veth links, addresses from
198.18.0.0/15, torn down in ``finally``, at exit and by a reaper even
after SIGKILL.  See ``docs/testbeds.md``.

* :class:`Testbed` - the declarative core (``host``, ``router``,
  ``bridge``, ``link``, ``attach``, ``dummy``, ``route``, ``rule``;
  ``up``/``down``; ``run``, ``popen``, ``counters``, ``set_rate``,
  ``blackhole``/``restore``, ``nft``);
* :func:`full_mesh`, :func:`leaf_spine`, :func:`two_clusters` - the
  testbeds of the topology, flow-splitting and Holmes work;
* :func:`tcp_transfer` - plain TCP traffic between hosts, measured;
* :func:`cleanup_stale` - delete what crashed runs left behind;
  :func:`unavailable_reason` - why testbeds cannot run here (or None).
"""

from ._core import (
    TESTNET,
    Link,
    NetnsError,
    NetnsUnavailable,
    Node,
    Testbed,
    cleanup_stale,
    ensure_nft,
    list_namespaces,
    unavailable_reason,
)
from .topologies import (
    FullMesh,
    LeafSpine,
    TwoClusters,
    full_mesh,
    leaf_spine,
    two_clusters,
)
from .traffic import Transfer, tcp_transfer

__all__ = [
    "TESTNET",
    "FullMesh",
    "LeafSpine",
    "Link",
    "NetnsError",
    "NetnsUnavailable",
    "Node",
    "Testbed",
    "Transfer",
    "TwoClusters",
    "cleanup_stale",
    "ensure_nft",
    "full_mesh",
    "leaf_spine",
    "list_namespaces",
    "tcp_transfer",
    "two_clusters",
    "unavailable_reason",
]
