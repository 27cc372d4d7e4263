"""The three testbeds of the topology, flow-splitting and Holmes work.

* :func:`full_mesh` - n hosts, one shaped veth per pair, a per-host "peer"
  address routed over the direct links (topology optimisation);
* :func:`leaf_spine` - hosts under leaf routers, spine routers, ECMP with
  the L4 hash, per-spine source-port pinning and nftables spraying (flow
  splitting);
* :func:`two_clusters` - two clusters on fast bridges of their own, all
  hosts on one slow shared bridge, two labelled addresses per host
  (Holmes).

Each returns a described, not yet started, :class:`Testbed` subclass: use
it as ``with full_mesh(6) as tb: ...`` (or call ``up()``/``down()``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ._core import Link, Testbed

PIN_PORT_BASE = 40000
PIN_PORT_SPAN = 1000
EPHEMERAL_PORTS = (50000, 60999)
"""Hosts of a leaf-spine take ephemeral (and port-0 listening) ports from
here, so an unpinned connection never falls into a pinned range."""

SPRAY_TABLE = "pcclspray"


class FullMesh(Testbed):
    """Hosts ``h0..h{n-1}``; ``edge(i, j)`` is the link between i and j,
    shaped i->j at ``rate(i, j)``.  ``peer(i)`` is host i's one address
    (a /32 on a dummy) that every other host reaches over the direct
    link."""

    def __init__(self, n: int, default_mbit: float | None,
                 overrides: Mapping[tuple[int, int], float | None], prefix: str | None) -> None:
        super().__init__(prefix)
        if n < 2:
            raise ValueError("a full mesh needs at least 2 hosts")
        for (i, j) in overrides:
            if not (0 <= i < n and 0 <= j < n) or i == j:
                raise ValueError(f"override {(i, j)} is not an edge of a {n}-host mesh")
        self.n = n
        self.hosts = [f"h{i}" for i in range(n)]
        self._peer = [""] * n
        self._edges: dict[tuple[int, int], Link] = {}
        for i, h in enumerate(self.hosts):
            self.host(h)
            self._peer[i] = self.dummy(h, "peer")
        for i in range(n):
            for j in range(i + 1, n):
                ln = self.link(self.hosts[i], self.hosts[j],
                               overrides.get((i, j), default_mbit),
                               overrides.get((j, i), default_mbit))
                self._edges[(i, j)] = self._edges[(j, i)] = ln
        for i in range(n):
            for j in range(n):
                if i != j:
                    self.route(self.hosts[i], f"{self._peer[j]}/32", self._edges[(i, j)],
                               src=self._peer[i])

    def peer(self, i: int) -> str:
        return self._peer[i]

    def edge(self, i: int, j: int) -> Link:
        return self._edges[(i, j)]

    def rate(self, i: int, j: int) -> float | None:
        """The configured rate i->j in Mbit/s."""
        ln = self._edges[(i, j)]
        return ln.rate_ab if ln.a == self.hosts[i] else ln.rate_ba

    def _dir(self, i: int, j: int) -> str:
        return "ab" if self._edges[(i, j)].a == self.hosts[i] else "ba"

    def set_edge_rate(self, i: int, j: int, mbit: float | None) -> None:
        """Change the rate i->j only (e.g. throttle one ring edge mid-run)."""
        self.set_rate(self._edges[(i, j)], mbit, self._dir(i, j))

    def edge_bytes(self) -> dict[tuple[int, int], int]:
        """Bytes sent i->j so far, for every ordered pair."""
        per = {h: self.counters(h) for h in self.hosts}
        out = {}
        for (i, j), ln in self._edges.items():
            ifn = ln.a_if if ln.a == self.hosts[i] else ln.b_if
            out[(i, j)] = per[self.hosts[i]][ifn]["tx_bytes"]
        return out

    def rate_matrix(self) -> list[list[float | None]]:
        return [[None if i == j else self.rate(i, j) for j in range(self.n)]
                for i in range(self.n)]


def full_mesh(n: int = 6, default_mbit: float | None = 400,
              overrides: Mapping[tuple[int, int], float | None] | None = None,
              *, prefix: str | None = None) -> FullMesh:
    """``n`` hosts joined pairwise by veth pairs shaped with tbf; edge
    i->j runs at ``overrides[(i, j)]`` if given, else ``default_mbit``
    (so ``{(0, 1): 50}`` makes 0->1 slow and leaves 1->0 fast)."""
    return FullMesh(n, default_mbit, dict(overrides or {}), prefix)


class LeafSpine(Testbed):
    """Hosts ``h0..`` (``hosts_per_leaf`` per leaf, in leaf order), routers
    ``leaf0..`` and ``spine0..``; every leaf has one uplink to every
    spine.  Between leaves traffic takes

    * the spine chosen by the leaf's 5-tuple ECMP hash, by default;
    * spine k when its source (or, for the reverse direction, destination)
      port is in ``port_range(k)`` (``ip rule`` -> table ``100 + k``);
    * a spine per packet, round robin, while ``set_spraying(True)``
      (nftables ``numgen`` marks + fwmark rules); pinned ports stay pinned.
    """

    def __init__(self, leaves: int, hosts_per_leaf: int, spines: int,
                 host_mbit: float | None, uplink_mbit: float | None,
                 gso_max_segs: int | None, prefix: str | None) -> None:
        super().__init__(prefix)
        if leaves < 1 or hosts_per_leaf < 1 or spines < 1:
            raise ValueError("leaves, hosts_per_leaf and spines must be >= 1")
        if spines * PIN_PORT_SPAN > EPHEMERAL_PORTS[0] - PIN_PORT_BASE:
            raise ValueError(f"at most {(EPHEMERAL_PORTS[0] - PIN_PORT_BASE) // PIN_PORT_SPAN}"
                             " spines (pinned port ranges)")
        self.leaves = [f"leaf{l_}" for l_ in range(leaves)]
        self.spines = [f"spine{k}" for k in range(spines)]
        self.hosts = [f"h{i}" for i in range(leaves * hosts_per_leaf)]
        self.hosts_per_leaf = hosts_per_leaf
        self.spraying = False
        for r in self.leaves + self.spines:
            self.router(r)
        self._host_link: dict[str, Link] = {}
        for i, h in enumerate(self.hosts):
            self.host(h)
            self.sysctl(h, "net.ipv4.ip_local_port_range",
                        f"{EPHEMERAL_PORTS[0]} {EPHEMERAL_PORTS[1]}")
            ln = self.link(h, self.leaves[i // hosts_per_leaf], host_mbit,
                           gso_max_segs=gso_max_segs)
            self._host_link[h] = ln
            self.nodes[h].labels["peer"] = ln.a_addr
            self.route(h, "198.18.0.0/15", ln)
        self._uplinks: dict[tuple[int, int], Link] = {}
        for li, leaf in enumerate(self.leaves):
            for k, spine in enumerate(self.spines):
                self._uplinks[(li, k)] = self.link(leaf, spine, uplink_mbit)
        for li, leaf in enumerate(self.leaves):
            ups = [self._uplinks[(li, k)] for k in range(spines)]
            for h in self.hosts:
                if self.leaf_of(h) == li:
                    continue
                dst = f"{self.host_addr(h)}/32"
                self.route(leaf, dst, ups if spines > 1 else ups[0])
                for k in range(spines):
                    self.route(leaf, dst, ups[k], table=100 + k)
            for k in range(spines):
                self.rule(leaf, 100 + k, sport=self.port_range(k), ipproto="tcp", priority=100)
                self.rule(leaf, 100 + k, dport=self.port_range(k), ipproto="tcp", priority=101)
                self.rule(leaf, 100 + k, fwmark=k + 1, priority=200)
        for k, spine in enumerate(self.spines):
            for h in self.hosts:
                self.route(spine, f"{self.host_addr(h)}/32",
                           self._uplinks[(self.leaf_of(h), k)])

    def host_addr(self, host: str) -> str:
        return self._host_link[host].a_addr

    def host_link(self, host: str) -> Link:
        return self._host_link[host]

    def leaf_of(self, host: str) -> int:
        return self.hosts.index(host) // self.hosts_per_leaf

    @staticmethod
    def port_range(spine: int) -> tuple[int, int]:
        """Source ports (inclusive) that pin a TCP connection to ``spine``
        in both directions."""
        lo = PIN_PORT_BASE + PIN_PORT_SPAN * spine
        return lo, lo + PIN_PORT_SPAN - 1

    def uplink(self, leaf: int, spine: int) -> Link:
        return self._uplinks[(leaf, spine)]

    def uplink_bytes(self) -> dict[tuple[int, int], tuple[int, int]]:
        """``{(leaf, spine): (bytes leaf->spine, bytes spine->leaf)}``."""
        per = {r: self.counters(r) for r in self.leaves + self.spines}
        return {(li, k): (per[ln.a][ln.a_if]["tx_bytes"], per[ln.b][ln.b_if]["tx_bytes"])
                for (li, k), ln in self._uplinks.items()}

    def _spray_ruleset(self, leaf: int, mode: str) -> str:
        ifs = ", ".join(f'"{self._host_link[h].b_if}"' for h in self.hosts
                        if self.leaf_of(h) == leaf)
        return (
            f"table ip {SPRAY_TABLE} {{\n"
            "  chain pre {\n"
            "    type filter hook prerouting priority mangle; policy accept;\n"
            f"    iifname {{ {ifs} }} meta mark set numgen {mode} mod {len(self.spines)}"
            " offset 1\n"
            "  }\n"
            "}\n")

    def set_spraying(self, on: bool, mode: str = "inc") -> None:
        """Per-packet spraying over the spines in every leaf (``mode``
        "inc": round robin, "random"); off restores ECMP."""
        if mode not in ("inc", "random"):
            raise ValueError("mode is 'inc' or 'random'")
        for li, leaf in enumerate(self.leaves):
            self.nft_delete_table(leaf, "ip", SPRAY_TABLE)
            if on:
                self.nft(leaf, self._spray_ruleset(li, mode))
        self.spraying = on


def leaf_spine(leaves: int = 2, hosts_per_leaf: int = 4, spines: int = 4,
               host_mbit: float | None = 100, uplink_mbit: float | None = 50,
               *, gso_max_segs: int | None = 4, prefix: str | None = None) -> LeafSpine:
    """A two-tier leaf-spine fabric of routers; the oversubscription is
    ``hosts_per_leaf * host_mbit / (spines * uplink_mbit)`` (defaults:
    400/200, 2:1; ``spines=2`` makes it 4:1).

    ``gso_max_segs`` caps what a host sends as one packet (default 4
    segments, ~6 KB): spraying moves whole packets, and 64 KB GSO packets
    sprayed over 50 Mbit/s uplinks arrive so far out of order that four
    TCP flows reach ~60 % of the fabric (measured), against ~90 % with 4
    segments.  None keeps the kernel's 64 KB."""
    return LeafSpine(leaves, hosts_per_leaf, spines, host_mbit, uplink_mbit, gso_max_segs,
                     prefix)


class TwoClusters(Testbed):
    """Hosts ``h0..`` in clusters of ``per_cluster``; cluster c's hosts are
    on bridge ``fast{c}`` (address label ``"fast"`` and the cluster's NIC
    kind, e.g. ``"ib"``) and every host on bridge ``eth`` (label
    ``"ethernet"``).  The fast subnets are not routed to each other: only
    the ethernet bridge joins the clusters."""

    def __init__(self, fast_mbit: Sequence[float | None], slow_mbit: float | None,
                 per_cluster: int, kinds: Sequence[str], prefix: str | None) -> None:
        super().__init__(prefix)
        if len(fast_mbit) != len(kinds):
            raise ValueError("one fast rate and one NIC kind per cluster")
        if per_cluster < 1:
            raise ValueError("per_cluster must be >= 1")
        self.clusters = len(fast_mbit)
        self.per_cluster = per_cluster
        self.kinds = list(kinds)
        self.hosts = [f"h{i}" for i in range(self.clusters * per_cluster)]
        self.fast_bridges = [f"fast{c}" for c in range(self.clusters)]
        for b in self.fast_bridges:
            self.bridge(b)
        self.bridge("eth")
        self._fast: dict[str, Link] = {}
        self._eth: dict[str, Link] = {}
        for i, h in enumerate(self.hosts):
            c = i // per_cluster
            self.host(h)
            self._fast[h] = self.attach(h, self.fast_bridges[c], fast_mbit[c], label="fast")
            self.nodes[h].labels[self.kinds[c]] = self._fast[h].a_addr
            self._eth[h] = self.attach(h, "eth", slow_mbit, label="ethernet")

    def cluster_of(self, host: str) -> int:
        return self.hosts.index(host) // self.per_cluster

    def kind_of(self, host: str) -> str:
        return self.kinds[self.cluster_of(host)]

    def fast_link(self, host: str) -> Link:
        return self._fast[host]

    def eth_link(self, host: str) -> Link:
        return self._eth[host]

    def nic_bytes(self) -> dict[str, dict[str, tuple[int, int]]]:
        """``{host: {"fast": (tx, rx), "ethernet": (tx, rx)}}`` at the
        host's own interfaces."""
        out = {}
        for h in self.hosts:
            c = self.counters(h)
            f, e = c[self._fast[h].a_if], c[self._eth[h].a_if]
            out[h] = {"fast": (f["tx_bytes"], f["rx_bytes"]),
                      "ethernet": (e["tx_bytes"], e["rx_bytes"])}
        return out


def two_clusters(fast_mbit: Sequence[float | None] = (800, 400), slow_mbit: float | None = 100,
                 per_cluster: int = 4, *, kinds: Sequence[str] = ("ib", "roce"),
                 prefix: str | None = None) -> TwoClusters:
    """Two (or ``len(fast_mbit)``) clusters of ``per_cluster`` hosts, each
    on a fast bridge of its own, all on one slow shared bridge; per-host
    rates in Mbit/s (the NIC's, both directions)."""
    return TwoClusters(fast_mbit, slow_mbit, per_cluster, kinds, prefix)
