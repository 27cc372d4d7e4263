"""The declarative network-namespace testbed: nodes, links, addresses,
routes, rules; up/down; commands, counters, rates and black holes.

A :class:`Testbed` is first *described* (every call allocates names and
addresses at once, so a builder can read ``link.a_addr`` immediately),
then brought up in one go by :meth:`Testbed.up`, which issues one
``ip -batch`` and one ``tc -batch`` per namespace.  :meth:`Testbed.down`
kills every process in the run's namespaces and deletes them, which
deletes every veth, bridge and dummy with them (nothing of a testbed
lives in the root namespace).

Names.  Every run has a prefix ``pt`` + 6 hex digits; namespace
``<prefix>-<node>``; interface ``<prefix><tag>`` (at most 15 bytes).
A registry file ``/run/pccl-netns/<prefix>`` records the owner's pid so
:func:`cleanup_stale` can tell a crashed run's leftovers from a live
run of another process.

Teardown paths: ``finally`` of the context manager, :mod:`atexit`,
SIGTERM turned into :class:`SystemExit` (when no other handler is set),
and a reaper child that outlives a SIGKILLed owner: it waits for EOF on a
pipe only the owner holds and then deletes the run's namespaces.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence

from pccl.errors import PcclError

TESTNET = ipaddress.ip_network("198.18.0.0/15")
"""Every address a testbed hands out is inside this network (RFC 2544)."""

P2P_POOL = ipaddress.ip_network("198.18.0.0/16")  # /30 per point-to-point link
BRIDGE_POOL = ipaddress.ip_network("198.19.0.0/17")  # /24 per bridge
HOST_POOL = ipaddress.ip_network("198.19.128.0/17")  # /32 per dummy ("peer") address

REGISTRY = "/run/pccl-netns"
PREFIX_STEM = "pt"
IFNAMSIZ = 15
RUN_NAME = re.compile(r"^pt[0-9a-f]{6}$")
"""A run prefix; :func:`cleanup_stale` touches nothing else."""

_CMD_TIMEOUT = 30.0


class NetnsError(PcclError, RuntimeError):
    """A testbed command failed (the message carries the command and its
    stderr)."""


class NetnsUnavailable(PcclError, RuntimeError):
    """Network namespaces cannot be used here (not root, no ``ip netns``)."""


def unavailable_reason() -> str | None:
    """None when testbeds can be built here, else a one-line reason (for
    ``pytest.skip``)."""
    if sys.platform != "linux":
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "network-namespace testbeds need root (run the tests as root)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    probe = f"{PREFIX_STEM}probe{os.getpid()}"
    r = subprocess.run(
        ["ip", "netns", "add", probe], capture_output=True, text=True, timeout=_CMD_TIMEOUT
    )
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip() or r.returncode}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=_CMD_TIMEOUT)
    return None


def ensure_nft() -> str | None:
    """Make ``nft`` available, installing Debian's ``nftables`` with apt
    when it is missing (``apt-get update`` first); None on success, else
    a one-line reason."""
    if shutil.which("nft"):
        return None
    if shutil.which("apt-get") is None:
        return "`nft` is missing and there is no apt-get to install nftables"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "nftables"]):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(argv)}` took more than 600 s"
        if r.returncode != 0:
            tail = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
            return f"`{' '.join(argv)}` failed while installing nftables: {tail}"
    if shutil.which("nft") is None:
        return "nftables was installed but `nft` is not on PATH"
    return None


def _run(argv: Sequence[str], *, input: str | None = None, check: bool = True,
         timeout: float = _CMD_TIMEOUT) -> subprocess.CompletedProcess:
    r = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        shown = " ".join(argv)
        if input:
            shown += " <<< " + input.strip().replace("\n", " ; ")[:2000]
        raise NetnsError(f"`{shown}` failed ({r.returncode}): {r.stderr.strip()}")
    return r


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_start(pid: int) -> str | None:
    """Start time of ``pid`` (field 22 of /proc/pid/stat), to tell a live
    owner from a recycled pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def list_namespaces() -> list[str]:
    """Every network namespace name on the machine (``ip netns list``)."""
    try:
        r = _run(["ip", "netns", "list"], check=False)
    except FileNotFoundError:  # no iproute2: there can be none of ours
        return []
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def _kill_namespace_pids(ns: str) -> None:
    r = _run(["ip", "netns", "pids", ns], check=False)
    for tok in r.stdout.split():
        try:
            os.kill(int(tok), signal.SIGKILL)
        except (ValueError, ProcessLookupError, PermissionError):
            pass


def _delete_namespaces(names: Iterable[str]) -> None:
    names = list(names)
    for ns in names:
        _kill_namespace_pids(ns)
    if names:
        # one batch; a name already gone is not an error worth stopping for
        _run(["ip", "-force", "-batch", "-"],
             input="".join(f"netns del {ns}\n" for ns in names), check=False)


def _root_links_with(prefix: str) -> list[str]:
    r = _run(["ip", "-j", "link", "show"], check=False)
    try:
        links = json.loads(r.stdout or "[]")
    except ValueError:
        return []
    return [x["ifname"] for x in links if x.get("ifname", "").startswith(prefix)]


def _registry_owner(run_prefix: str) -> tuple[int, str | None] | None:
    try:
        with open(os.path.join(REGISTRY, run_prefix)) as f:
            d = json.load(f)
        return int(d["pid"]), d.get("start")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _run_alive(run_prefix: str) -> bool:
    owner = _registry_owner(run_prefix)
    if owner is None:
        return False
    pid, start = owner
    return _pid_alive(pid) and (start is None or _pid_start(pid) == start)


def cleanup_stale(prefix: str = PREFIX_STEM, *, force: bool = False) -> list[str]:
    """Delete the namespaces (and any root-namespace links) left behind by
    runs whose names start with ``prefix``; returns what was deleted.

    A run whose owner process is still alive is left alone unless
    ``force`` (other processes on the machine may be running testbeds of
    their own); a run prefix (``pt`` + 6 hex digits) names one run.  Only
    names of that shape are ever touched."""
    doomed: list[str] = []
    runs: set[str] = set()
    for ns in list_namespaces():
        run = ns.split("-", 1)[0]
        if not ns.startswith(prefix) or "-" not in ns or not RUN_NAME.match(run):
            continue
        if force or not _run_alive(run):
            doomed.append(ns)
            runs.add(run)
    _delete_namespaces(doomed)
    gone = list(doomed)
    if force and RUN_NAME.match(prefix):
        runs.add(prefix)
    for run in runs:
        for ifname in _root_links_with(run):
            _run(["ip", "link", "del", ifname], check=False)
            gone.append(ifname)
        if force or not _run_alive(run):
            try:
                os.unlink(os.path.join(REGISTRY, run))
            except OSError:
                pass
    # registry files of dead runs that left nothing behind
    try:
        entries = os.listdir(REGISTRY)
    except OSError:
        entries = []
    for run in entries:
        if run.startswith(prefix) and RUN_NAME.match(run) and not _run_alive(run):
            try:
                os.unlink(os.path.join(REGISTRY, run))
            except OSError:
                pass
    return gone


_counter = 0
_counter_lock = threading.Lock()


def new_prefix() -> str:
    """``pt`` + 6 hex digits from the pid, the clock and a counter; never
    equal to a prefix with namespaces or a registry entry on the machine."""
    global _counter
    existing = {ns.split("-", 1)[0] for ns in list_namespaces()}
    while True:
        with _counter_lock:
            _counter += 1
            n = _counter
        h = hashlib.sha1(f"{os.getpid()}:{time.time_ns()}:{n}".encode()).hexdigest()[:6]
        p = PREFIX_STEM + h
        if p not in existing and not os.path.exists(os.path.join(REGISTRY, p)):
            return p


def _mac(ifname: str) -> str:
    """A fixed, locally administered MAC from an interface's run-unique
    number (set at creation, so neighbours can be static: no ARP)."""
    n = int(re.search(r"(\d+)$", ifname).group(1))
    return f"02:50:00:{(n >> 16) & 255:02x}:{(n >> 8) & 255:02x}:{n & 255:02x}"


@dataclasses.dataclass
class Node:
    name: str
    kind: str  # "host" | "router" | "bridge"
    ns: str
    sysctls: dict[str, str] = dataclasses.field(default_factory=dict)
    dummies: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (addr, label)
    labels: dict[str, str] = dataclasses.field(default_factory=dict)  # label -> address


@dataclasses.dataclass
class Link:
    """A veth pair between nodes ``a`` and ``b`` (for a bridge port, ``b``
    is the bridge and has no address).  Rates in Mbit/s per direction;
    None = unshaped.  Addresses are strings without the prefix length."""

    name: str
    a: str
    b: str
    a_if: str
    b_if: str
    rate_ab: float | None
    rate_ba: float | None
    burst: int | None
    limit: int | None
    a_addr: str | None
    b_addr: str | None
    prefixlen: int
    label: str | None = None
    blackholed: bool = False
    gso_max_segs: int | None = None
    buckets: dict[str, int] = dataclasses.field(default_factory=dict)  # direction -> bytes now

    @property
    def a_mac(self) -> str:
        return _mac(self.a_if)

    @property
    def b_mac(self) -> str:
        return _mac(self.b_if)

    @property
    def is_port(self) -> bool:
        return self.b_addr is None

    def end(self, node: str) -> tuple[str, str | None]:
        """(interface, address) of this link at ``node``."""
        if node == self.a:
            return self.a_if, self.a_addr
        if node == self.b:
            return self.b_if, self.b_addr
        raise ValueError(f"link {self.name!r} does not touch node {node!r}")

    def other(self, node: str) -> str:
        if node == self.a:
            return self.b
        if node == self.b:
            return self.a
        raise ValueError(f"link {self.name!r} does not touch node {node!r}")


@dataclasses.dataclass
class _Route:
    node: str
    dst: str
    hops: list[tuple[str, str | None]]  # (dev, gateway)
    table: int | None
    src: str | None
    weights: list[int] | None


@dataclasses.dataclass
class _Rule:
    node: str
    table: int
    priority: int | None
    selector: str


_live: set[Testbed] = set()  # strong: a testbed dropped while up is still torn down at exit
_hooks_installed = False


def _down_all_live() -> None:
    for tb in list(_live):
        try:
            tb.down()
        except Exception:  # pragma: no cover - best effort at exit
            pass


def _install_exit_hooks() -> None:
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_down_all_live)
    if threading.current_thread() is threading.main_thread():
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            # SIGTERM -> SystemExit, so `finally` blocks and atexit run
            def _term(signum, frame):  # noqa: ARG001
                raise SystemExit(128 + signum)

            signal.signal(signal.SIGTERM, _term)


def _fmt_rate(mbit: float) -> str:
    return f"{int(round(mbit * 1e6))}bit"


GSO_BUCKET = 131072
"""A bucket above one 64 KiB GSO packet with its headers (~67 KB counted):
with a smaller one tbf cuts every such packet into MTU segments."""

SEGMENT_BELOW_MBIT = 150.0


def tbf_bucket(mbit: float, burst: int | None = None, limit: int | None = None,
               at_least: int = 0) -> tuple[int, int]:
    """The ``burst``/``limit`` part of a tbf for ``mbit`` (bytes given win).

    Fast links (>= 150 Mbit/s) get a 128 KiB bucket so GSO packets pass
    whole (segmenting them costs 3-5x the CPU per byte, and 2 cores run out
    near 1 Gbit/s in total); slower links get 2 ms of the rate (>= 16 KiB):
    tbf segments there, which is cheap at that rate and paces like a
    real NIC.  The queue holds the bucket plus 5 ms at the rate: a deep
    queue delays the ACKs of reverse traffic behind data and costs two-way
    TCP up to 40 % of the rate.

    ``at_least`` is the bucket of the tbf being replaced: a rate change
    never shrinks the bucket, because a packet queued under the old one
    that is larger than the new bucket can never be sent (tbf caps its
    tokens at the bucket) and stalls the link for good - measured: a
    200 -> 50 Mbit/s change with a 16 KiB bucket left two 68 KB packets
    queued forever.  Returns ``(burst, limit)`` in bytes."""
    rate_bytes = mbit * 1e6 / 8
    if burst is None:
        burst = GSO_BUCKET if mbit >= SEGMENT_BELOW_MBIT else max(16384, int(rate_bytes * 0.002))
        burst = max(burst, at_least)
    if limit is None:
        limit = burst + max(16384, int(rate_bytes * 0.005))
    return burst, limit


class Testbed:
    """A described network of namespaces; see the module docstring and
    ``docs/testbeds.md``.  Use as a context manager (``up`` on enter,
    ``down`` on exit, also when the body raises)."""

    __test__ = False  # not a pytest class, whatever its name

    def __init__(self, prefix: str | None = None) -> None:
        if prefix is not None and not RUN_NAME.match(prefix):
            raise ValueError(f"prefix must be 'pt' + 6 lowercase hex digits, got {prefix!r}")
        self.prefix = prefix
        self.nodes: dict[str, Node] = {}
        self.links: dict[str, Link] = {}
        self.bridges: dict[str, tuple[str, ipaddress.IPv4Network, list[str]]] = {}
        self._routes: list[_Route] = []
        self._rules: list[_Rule] = []
        self._nft: dict[str, list[str]] = {}
        self._n_p2p = 0
        self._n_if = 0
        self._n_host = 0
        self._procs: list[subprocess.Popen] = []
        self._reaper: subprocess.Popen | None = None
        self._is_up = False
        self._lock = threading.RLock()
        self.timings: dict[str, float] = {}
        self.workdir: str | None = None
        if self.prefix is None:
            # allocated now so names can be read while describing; checked again at up()
            self.prefix = new_prefix()

    # -- description ----------------------------------------------------

    def _check_name(self, name: str) -> None:
        if not name or not all(c.isalnum() or c in "_." for c in name):
            raise ValueError(f"node name {name!r}: use letters, digits, '_' and '.'")
        if name in self.nodes:
            raise ValueError(f"node {name!r} already exists")
        if self._is_up:
            raise RuntimeError("describe the testbed before up()")

    def _ifname(self, tag: str) -> str:
        self._n_if += 1
        name = f"{self.prefix}{tag}{self._n_if}"
        if len(name) > IFNAMSIZ:
            raise ValueError(f"interface name {name!r} longer than {IFNAMSIZ} bytes")
        return name

    def _add_node(self, name: str, kind: str) -> Node:
        self._check_name(name)
        node = Node(name, kind, f"{self.prefix}-{name}")
        # counters must only see our traffic: no IPv6 chatter (RS, MLD, DAD)
        node.sysctls.update({
            "net.ipv6.conf.all.disable_ipv6": "1",
            "net.ipv6.conf.default.disable_ipv6": "1",
            "net.ipv4.conf.all.rp_filter": "0",
            "net.ipv4.conf.default.rp_filter": "0",
        })
        if kind == "router":
            node.sysctls.update({
                "net.ipv4.ip_forward": "1",
                "net.ipv4.fib_multipath_hash_policy": "1",
            })
        self.nodes[name] = node
        return node

    def host(self, name: str) -> Node:
        """A namespace that does not forward."""
        return self._add_node(name, "host")

    def router(self, name: str) -> Node:
        """A namespace that forwards, with the L4 (5-tuple) multipath hash."""
        return self._add_node(name, "router")

    def bridge(self, name: str) -> Node:
        """A learning bridge in a namespace of its own, with a /24 from
        198.19.0.0/17; hosts join it with :meth:`attach`."""
        node = self._add_node(name, "bridge")
        idx = len(self.bridges)
        subnets = list(BRIDGE_POOL.subnets(new_prefix=24))
        if idx >= len(subnets):
            raise ValueError("out of bridge subnets")
        self.bridges[name] = (self._ifname("br"), subnets[idx], [])
        return node

    def sysctl(self, node: str, key: str, value: str | int) -> None:
        self.nodes[node].sysctls[key] = str(value)

    def dummy(self, node: str, label: str = "peer") -> str:
        """A /32 on ``node``'s loopback (from 198.19.128.0/17):
        an address that does not belong to any one link (what a peer
        advertises); route it with :meth:`route`.  Returns the address."""
        n = self.nodes[node]
        self._n_host += 1
        addr = str(HOST_POOL.network_address + self._n_host)
        n.dummies.append((addr, label))
        n.labels[label] = addr
        return addr

    def _check_rate(self, mbit: float | None) -> None:
        if mbit is not None and not (mbit > 0):
            raise ValueError(f"rate must be > 0 Mbit/s or None, got {mbit!r}")

    def link(self, a: str, b: str, mbit: float | None = None, mbit_ba: float | None = ...,
             *, burst: int | None = None, limit: int | None = None,
             name: str | None = None, gso_max_segs: int | None = None) -> Link:
        """A veth pair between nodes ``a`` and ``b`` with a /30 from
        198.18.0.0/16 (``a`` gets .1, ``b`` .2).  ``mbit`` shapes a->b,
        ``mbit_ba`` b->a (default: same as ``mbit``); ``burst`` and
        ``limit`` (bytes) are the tbf bucket and queue (default:
        :func:`tbf_bucket`); ``gso_max_segs`` caps the segments per packet
        sent into the link (small packets for per-packet spraying)."""
        if mbit_ba is ...:
            mbit_ba = mbit
        for x in (a, b):
            if x not in self.nodes:
                raise ValueError(f"unknown node {x!r}")
            if self.nodes[x].kind == "bridge":
                raise ValueError(f"{x!r} is a bridge: use attach()")
        if a == b:
            raise ValueError("a link needs two different nodes")
        self._check_rate(mbit)
        self._check_rate(mbit_ba)
        name = name or f"{a}-{b}"
        if name in self.links:
            raise ValueError(f"link {name!r} already exists")
        nets = P2P_POOL.num_addresses // 4
        if self._n_p2p >= nets:
            raise ValueError("out of point-to-point subnets")
        base = P2P_POOL.network_address + 4 * self._n_p2p
        self._n_p2p += 1
        if gso_max_segs is not None and not 1 <= gso_max_segs <= 65535:
            raise ValueError("gso_max_segs is 1..65535")
        ln = Link(name, a, b, self._ifname("l"), self._ifname("l"), mbit, mbit_ba, burst, limit,
                  str(base + 1), str(base + 2), 30, gso_max_segs=gso_max_segs)
        self.links[name] = ln
        return ln

    def attach(self, host: str, bridge: str, mbit: float | None = None,
               mbit_down: float | None = ..., *, label: str | None = None,
               burst: int | None = None, limit: int | None = None,
               name: str | None = None) -> Link:
        """Connect ``host`` to ``bridge`` with a veth whose host end gets
        the next address of the bridge's /24.  ``mbit`` shapes host->bridge
        (the NIC's upload), ``mbit_down`` bridge->host (default: same);
        ``label`` names the address in ``addr(host, label)``."""
        if mbit_down is ...:
            mbit_down = mbit
        if bridge not in self.bridges:
            raise ValueError(f"unknown bridge {bridge!r}")
        if host not in self.nodes or self.nodes[host].kind == "bridge":
            raise ValueError(f"unknown host {host!r}")
        self._check_rate(mbit)
        self._check_rate(mbit_down)
        _, subnet, ports = self.bridges[bridge]
        if len(ports) >= 253:
            raise ValueError(f"bridge {bridge!r} is full")
        name = name or f"{host}-{bridge}"
        if name in self.links:
            raise ValueError(f"link {name!r} already exists")
        addr = str(subnet.network_address + len(ports) + 1)
        ln = Link(name, host, bridge, self._ifname("p"), self._ifname("p"), mbit, mbit_down,
                  burst, limit, addr, None, 24, label=label)
        ports.append(name)
        self.links[name] = ln
        if label:
            self.nodes[host].labels[label] = addr
        return ln

    def route(self, node: str, dst: str, via: Link | tuple[Link, str] | Sequence,
              *, table: int | None = None, src: str | None = None,
              weights: Sequence[int] | None = None) -> None:
        """A route on ``node`` to ``dst`` (prefix or address).  ``via`` is a
        link (next hop: its other end) or ``(link, gateway)``, or a list of
        those for an ECMP multipath route (hashed on the 5-tuple in
        routers)."""
        hops_in = list(via) if isinstance(via, list | tuple) and not (
            isinstance(via, tuple) and len(via) == 2 and isinstance(via[1], str)) else [via]
        hops: list[tuple[str, str | None]] = []
        for h in hops_in:
            if isinstance(h, tuple):
                ln, gw = h
            else:
                ln, gw = h, None
            dev, _ = ln.end(node)
            if gw is None:
                if ln.is_port:
                    raise ValueError(f"{ln.name} is a bridge port: give (link, gateway)")
                gw = ln.end(ln.other(node))[1]
            hops.append((dev, gw))
        if weights is not None and len(weights) != len(hops):
            raise ValueError("one weight per next hop")
        net = ipaddress.ip_network(dst, strict=False)
        if not net.subnet_of(TESTNET):
            raise ValueError(f"{dst} is outside {TESTNET}")
        self._routes.append(_Route(node, str(net), hops, table, src,
                                   list(weights) if weights else None))

    def rule(self, node: str, table: int, *, sport: tuple[int, int] | None = None,
             dport: tuple[int, int] | None = None, fwmark: int | None = None,
             ipproto: str | None = None, priority: int | None = None) -> None:
        """An ``ip rule`` on ``node`` sending matching packets to ``table``
        (e.g. a source-port range pinned to one path)."""
        parts = []
        if ipproto:
            parts.append(f"ipproto {ipproto}")
        if sport:
            parts.append(f"sport {sport[0]}-{sport[1]}")
        if dport:
            parts.append(f"dport {dport[0]}-{dport[1]}")
        if fwmark is not None:
            parts.append(f"fwmark {fwmark}")
        if not parts:
            raise ValueError("a rule needs a selector")
        self._rules.append(_Rule(node, table, priority, " ".join(parts)))

    # -- lookups --------------------------------------------------------

    def ns(self, node: str) -> str:
        return self.nodes[node].ns

    def addr(self, node: str, label: str = "peer") -> str:
        """The address of ``node`` labelled ``label`` (a dummy's label or a
        bridge port's label)."""
        try:
            return self.nodes[node].labels[label]
        except KeyError:
            raise KeyError(f"node {node!r} has no address labelled {label!r}") from None

    def link_between(self, a: str, b: str) -> Link:
        for ln in self.links.values():
            if {ln.a, ln.b} == {a, b}:
                return ln
        raise KeyError(f"no link between {a!r} and {b!r}")

    def links_of(self, node: str) -> list[Link]:
        return [ln for ln in self.links.values() if node in (ln.a, ln.b)]

    # -- up / down ------------------------------------------------------

    def __enter__(self) -> Testbed:
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    @property
    def is_up(self) -> bool:
        return self._is_up

    def _register(self) -> None:
        os.makedirs(REGISTRY, exist_ok=True)
        with open(os.path.join(REGISTRY, self.prefix), "w") as f:
            json.dump({"pid": os.getpid(), "start": _pid_start(os.getpid()),
                       "namespaces": [n.ns for n in self.nodes.values()]}, f)

    def _start_reaper(self) -> None:
        # a child that deletes our namespaces when our end of its stdin
        # closes without "done" - i.e. when we die, even by SIGKILL
        self._reaper = subprocess.Popen(
            [sys.executable, "-m", "pccl.testing.netns", "reap", self.prefix],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, cwd=self.workdir, close_fds=True,
        )

    def up(self) -> Testbed:
        """Create everything; on any failure, tear down what was made and
        raise :class:`NetnsError`."""
        with self._lock:
            if self._is_up:
                return self
            reason = unavailable_reason()
            if reason:
                raise NetnsUnavailable(reason)
            if not self.nodes:
                raise ValueError("an empty testbed")
            if self._nft and shutil.which("nft") is None:
                reason = ensure_nft()
                if reason:
                    raise NetnsUnavailable(reason)
            t0 = time.monotonic()
            _install_exit_hooks()
            existing = set(list_namespaces())
            if any(n.ns in existing for n in self.nodes.values()):
                raise NetnsError(f"namespaces with prefix {self.prefix} already exist")
            self.workdir = tempfile.mkdtemp(prefix=f"{self.prefix}-")
            self._register()
            _live.add(self)
            self._is_up = True  # from here on down() has something to undo
            try:
                self._start_reaper()
                self._build()
            except BaseException:
                self.down()
                raise
            self.timings["up"] = time.monotonic() - t0
            return self

    def _batch(self, tool: str, ns: str, lines: list[str]) -> None:
        if lines:
            _run([tool, "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n")

    def _build(self) -> None:
        nodes = list(self.nodes.values())
        _run(["ip", "-batch", "-"], input="".join(f"netns add {n.ns}\n" for n in nodes))
        # sysctls first, so interfaces created next inherit the defaults
        procs = []
        for n in nodes:
            argv = ["ip", "netns", "exec", n.ns, "sysctl", "-q", "-w"]
            argv += [f"{k}={v}" for k, v in n.sysctls.items()]
            procs.append((argv, subprocess.Popen(argv, stdout=subprocess.PIPE,
                                                 stderr=subprocess.PIPE, text=True)))
        for argv, p in procs:
            _, err = p.communicate(timeout=_CMD_TIMEOUT)
            if p.returncode != 0:
                raise NetnsError(f"`{' '.join(argv)}` failed: {err.strip()}")

        create: dict[str, list[str]] = {n.ns: [] for n in nodes}
        conf: dict[str, list[str]] = {n.ns: ["link set lo up"] for n in nodes}
        for name, (brif, _, _) in self.bridges.items():
            ns = self.nodes[name].ns
            # no multicast from the bridge itself: it would send an IGMP
            # report (54 bytes) to every port when it comes up
            create[ns].append(f"link add {brif} type bridge stp_state 0 forward_delay 0 "
                              "mcast_snooping 0")
            conf[ns] += [f"link set {brif} multicast off", f"link set {brif} up"]
        for n in nodes:
            for addr, _ in n.dummies:
                # on lo: the kernel here may lack the dummy driver, and lo is
                # what a router's loopback address is anyway
                conf[n.ns].append(f"addr add {addr}/32 dev lo")
        for ln in self.links.values():
            ans, bns = self.nodes[ln.a].ns, self.nodes[ln.b].ns
            create[ans].append(f"link add {ln.a_if} address {ln.a_mac} type veth peer name "
                               f"{ln.b_if} address {ln.b_mac} netns {bns}")
            if ln.gso_max_segs is not None:
                create[ans].append(f"link set {ln.a_if} gso_max_segs {ln.gso_max_segs}")
                conf[bns].append(f"link set {ln.b_if} gso_max_segs {ln.gso_max_segs}")
            conf[ans] += [f"addr add {ln.a_addr}/{ln.prefixlen} dev {ln.a_if}",
                          f"link set {ln.a_if} up"]
            if ln.is_port:
                conf[bns] += [f"link set {ln.b_if} master {self.bridges[ln.b][0]}",
                              f"link set {ln.b_if} up"]
            else:
                conf[bns] += [f"addr add {ln.b_addr}/{ln.prefixlen} dev {ln.b_if}",
                              f"link set {ln.b_if} up"]
                # static neighbours: no ARP on the link, counters see test traffic only
                conf[ans].append(f"neigh replace {ln.b_addr} lladdr {ln.b_mac} dev {ln.a_if} "
                                 "nud permanent")
                conf[bns].append(f"neigh replace {ln.a_addr} lladdr {ln.a_mac} dev {ln.b_if} "
                                 "nud permanent")
        fdb: dict[str, list[str]] = {}
        for name, (_, _, ports) in self.bridges.items():
            bns = self.nodes[name].ns
            members = [self.links[p] for p in ports]
            for p in members:
                # the bridge knows every port's MAC (no flooding of first frames)
                fdb.setdefault(bns, []).append(f"fdb add {p.a_mac} dev {p.b_if} master static")
                for q in members:
                    if q is not p:
                        conf[self.nodes[p.a].ns].append(
                            f"neigh replace {q.a_addr} lladdr {q.a_mac} dev {p.a_if} "
                            "nud permanent")
        for r in self._routes:
            conf[self.nodes[r.node].ns].append(self._route_cmd(r))
        for ru in self._rules:
            pr = f" priority {ru.priority}" if ru.priority is not None else ""
            conf[self.nodes[ru.node].ns].append(f"rule add {ru.selector} table {ru.table}{pr}")
        for ns, lines in create.items():
            self._batch("ip", ns, lines)
        tc: dict[str, list[str]] = {n.ns: [] for n in nodes}
        for ln in self.links.values():
            for node, ifn, rate in ((ln.a, ln.a_if, ln.rate_ab), (ln.b, ln.b_if, ln.rate_ba)):
                if rate is not None:
                    qd = self._tbf(ln, "ab" if ifn == ln.a_if else "ba", rate)
                    tc[self.nodes[node].ns].append(f"qdisc add dev {ifn} root {qd}")
        for ns in conf:
            self._batch("ip", ns, conf[ns])
            self._batch("tc", ns, tc[ns])
            self._batch("bridge", ns, fdb.get(ns, []))
        for node, rulesets in self._nft.items():
            for text in rulesets:
                self.nft(node, text)
        self._wait_carrier()

    def _wait_carrier(self, timeout: float = 10.0) -> None:
        """Return when every interface has carrier: veth carrier follows the
        peer asynchronously (linkwatch, up to ~1 s), and a SYN sent before
        that is lost and retried only after 1 s."""
        deadline = time.monotonic() + timeout
        pending = list(self.nodes.values())
        while pending:
            still = []
            for n in pending:
                r = _run(["ip", "-n", n.ns, "-j", "link", "show"])
                if any("NO-CARRIER" in x.get("flags", []) for x in json.loads(r.stdout)):
                    still.append(n)
            pending = still
            if pending:
                if time.monotonic() > deadline:
                    raise NetnsError(f"no carrier after {timeout} s in "
                                     f"{', '.join(n.name for n in pending)}")
                time.sleep(0.02)

    def _route_cmd(self, r: _Route) -> str:
        tail = ""
        if r.table is not None:
            tail += f" table {r.table}"
        if r.src:
            tail += f" src {r.src}"
        if len(r.hops) == 1:
            dev, gw = r.hops[0]
            return f"route add {r.dst} via {gw} dev {dev}{tail}"
        hops = " ".join(
            f"nexthop via {gw} dev {dev} weight {(r.weights or [1] * len(r.hops))[i]}"
            for i, (dev, gw) in enumerate(r.hops))
        return f"route add {r.dst}{tail} {hops}"

    @staticmethod
    def _tbf(ln: Link, d: str, mbit: float) -> str:
        burst, limit = tbf_bucket(mbit, ln.burst, ln.limit, ln.buckets.get(d, 0))
        ln.buckets[d] = burst
        return f"tbf rate {_fmt_rate(mbit)} burst {burst} limit {limit}"

    def down(self) -> None:
        """Kill every process started in the testbed and delete its
        namespaces (idempotent; never raises for what is already gone)."""
        with self._lock:
            if not self._is_up:
                return
            t0 = time.monotonic()
            for p in self._procs:
                self._kill(p)
            self._procs.clear()
            _delete_namespaces(n.ns for n in self.nodes.values())
            for ifname in _root_links_with(self.prefix):
                _run(["ip", "link", "del", ifname], check=False)
            try:
                os.unlink(os.path.join(REGISTRY, self.prefix))
            except OSError:
                pass
            if self._reaper is not None:
                try:
                    self._reaper.stdin.write(b"done\n")
                    self._reaper.stdin.close()
                except (OSError, ValueError):
                    pass
                try:
                    self._reaper.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._reaper.kill()
                    self._reaper.wait(timeout=5)
                self._reaper = None
            if self.workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
                self.workdir = None
            self._is_up = False
            _live.discard(self)
            self.timings["down"] = time.monotonic() - t0

    # -- running things -------------------------------------------------

    def _require_up(self) -> None:
        if not self._is_up:
            raise RuntimeError("the testbed is not up")

    def _exec_argv(self, node: str, argv: Sequence[str]) -> list[str]:
        if isinstance(argv, str):
            raise TypeError("argv is a sequence of strings, not one string")
        return ["ip", "netns", "exec", self.nodes[node].ns, *argv]

    def run(self, node: str, argv: Sequence[str], *, check: bool = True,
            timeout: float = 60.0, input: str | bytes | None = None, text: bool = True,
            cwd: str | None = None, env: Mapping[str, str] | None = None,
            ) -> subprocess.CompletedProcess:
        """Run ``argv`` in ``node``'s namespace to completion (bounded by
        ``timeout``); stdout and stderr are captured."""
        self._require_up()
        argv2 = self._exec_argv(node, argv)
        r = subprocess.run(argv2, input=input, capture_output=True, text=text,
                           timeout=timeout, cwd=cwd or self.workdir,
                           env=dict(env) if env is not None else None)
        if check and r.returncode != 0:
            raise NetnsError(f"`{' '.join(argv)}` in {node} failed ({r.returncode}): "
                             f"{(r.stderr or '').strip()[-2000:]}")
        return r

    def popen(self, node: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` in ``node``'s namespace (in its own process group,
        cwd the run's scratch directory unless given); killed by
        :meth:`down` if still running."""
        self._require_up()
        kwargs.setdefault("cwd", self.workdir)
        kwargs.setdefault("start_new_session", True)
        p = subprocess.Popen(self._exec_argv(node, argv), **kwargs)
        with self._lock:
            self._procs = [q for q in self._procs if q.poll() is None]
            self._procs.append(p)
        return p

    @staticmethod
    def _kill(p: subprocess.Popen) -> None:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                p.kill()
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass

    def python(self, node: str, module: str, *args: str, **kwargs) -> subprocess.Popen:
        """``popen`` of ``python -m module args`` with this interpreter."""
        return self.popen(node, [sys.executable, "-m", module, *args], **kwargs)

    # -- counters -------------------------------------------------------

    def counters(self, node: str) -> dict[str, dict[str, int]]:
        """Per-interface statistics of ``node``: ``{ifname: {"rx_bytes",
        "tx_bytes", "rx_packets", "tx_packets", "rx_dropped",
        "tx_dropped"}}`` (from ``ip -s -j link``)."""
        self._require_up()
        r = _run(["ip", "-n", self.nodes[node].ns, "-s", "-j", "link", "show"])
        out: dict[str, dict[str, int]] = {}
        for x in json.loads(r.stdout):
            st = x.get("stats64") or x.get("stats") or {}
            rx, tx = st.get("rx", {}), st.get("tx", {})
            out[x["ifname"]] = {
                "rx_bytes": rx.get("bytes", 0), "tx_bytes": tx.get("bytes", 0),
                "rx_packets": rx.get("packets", 0), "tx_packets": tx.get("packets", 0),
                "rx_dropped": rx.get("dropped", 0), "tx_dropped": tx.get("dropped", 0),
            }
        return out

    def link_bytes(self, link: Link | str) -> tuple[int, int]:
        """Bytes sent so far over ``link`` (a->b, b->a), counted at each
        sending end (what left the shaper; a black-holed link sends
        nothing)."""
        ln = self.links[link] if isinstance(link, str) else link
        a = self.counters(ln.a)[ln.a_if]["tx_bytes"]
        b = self.counters(ln.b)[ln.b_if]["tx_bytes"]
        return a, b

    def all_link_bytes(self) -> dict[str, tuple[int, int]]:
        """``link_bytes`` of every link, one ``ip`` call per node."""
        per_node = {n: self.counters(n) for n in self.nodes}
        return {name: (per_node[ln.a][ln.a_if]["tx_bytes"], per_node[ln.b][ln.b_if]["tx_bytes"])
                for name, ln in self.links.items()}

    # -- changing the network while it runs -----------------------------

    def set_rate(self, link: Link | str, mbit: float | None, direction: str = "both") -> None:
        """Change a link's rate while traffic runs (``direction``: "ab",
        "ba" or "both"; None removes the shaper).  On a black-holed link
        the new rate applies when it is restored."""
        self._require_up()
        ln = self.links[link] if isinstance(link, str) else link
        self._check_rate(mbit)
        if direction not in ("ab", "ba", "both"):
            raise ValueError("direction is 'ab', 'ba' or 'both'")
        with self._lock:
            for d in (("ab", "ba") if direction == "both" else (direction,)):
                if d == "ab":
                    ln.rate_ab = mbit
                else:
                    ln.rate_ba = mbit
                if not ln.blackholed:
                    self._apply_qdisc(ln, d)

    def _apply_qdisc(self, ln: Link, d: str) -> None:
        node, ifn, rate = ((ln.a, ln.a_if, ln.rate_ab) if d == "ab" else
                           (ln.b, ln.b_if, ln.rate_ba))
        ns = self.nodes[node].ns
        if ln.blackholed:
            _run(["tc", "-n", ns, "qdisc", "replace", "dev", ifn, "root", "blackhole"])
            ln.buckets[d] = 0  # the queue went with the old qdisc
        elif rate is None:
            _run(["tc", "-n", ns, "qdisc", "del", "dev", ifn, "root"], check=False)
            ln.buckets[d] = 0  # veth's default is no queue
        else:
            _run(["tc", "-n", ns, "qdisc", "replace", "dev", ifn, "root",
                  *self._tbf(ln, d, rate).split()])

    def blackhole(self, link: Link | str) -> None:
        """Drop every packet on ``link`` in both directions; the interfaces
        and routes stay up (senders see no error, only silence)."""
        self._require_up()
        ln = self.links[link] if isinstance(link, str) else link
        with self._lock:
            ln.blackholed = True
            self._apply_qdisc(ln, "ab")
            self._apply_qdisc(ln, "ba")

    def restore(self, link: Link | str) -> None:
        """Undo :meth:`blackhole` (the link's rates come back)."""
        self._require_up()
        ln = self.links[link] if isinstance(link, str) else link
        with self._lock:
            ln.blackholed = False
            self._apply_qdisc(ln, "ab")
            self._apply_qdisc(ln, "ba")

    # -- nftables -------------------------------------------------------

    def nft_at_up(self, node: str, ruleset: str) -> None:
        """Load ``ruleset`` (nft syntax) into ``node`` when the testbed
        comes up."""
        self._nft.setdefault(node, []).append(ruleset)

    def nft(self, node: str, ruleset: str) -> None:
        """Load ``ruleset`` (``nft -f -`` syntax) into ``node`` now;
        installs nftables with apt when ``nft`` is missing."""
        self._require_up()
        reason = ensure_nft()
        if reason:
            raise NetnsUnavailable(reason)
        _run(["ip", "netns", "exec", self.nodes[node].ns, "nft", "-f", "-"], input=ruleset)

    def nft_delete_table(self, node: str, family: str, table: str) -> None:
        self._require_up()
        _run(["ip", "netns", "exec", self.nodes[node].ns, "nft", "delete", "table", family,
              table], check=False)

    def describe(self) -> str:
        """A text listing of nodes, links, addresses and rates."""
        lines = [f"testbed {self.prefix}: {len(self.nodes)} nodes, {len(self.links)} links"]
        for ln in self.links.values():
            lines.append(
                f"  {ln.name:<20} {ln.a}:{ln.a_if}={ln.a_addr}/{ln.prefixlen} -> "
                f"{ln.b}:{ln.b_if}={ln.b_addr or '(port)'}  "
                f"{ln.rate_ab or '-'}/{ln.rate_ba or '-'} Mbit/s")
        for n in self.nodes.values():
            if n.labels:
                lines.append(f"  {n.name}: " + ", ".join(f"{k}={v}" for k, v in n.labels.items()))
        return "\n".join(lines)
