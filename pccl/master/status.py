"""The ``--status`` endpoint: / (a page), /status (JSON), /metrics (Prometheus).

A deliberately tiny HTTP/1.1 responder on the master's event loop: it
answers one GET per connection and closes it.  Requests are bounded in size
and time, so a slow or hostile client costs one short-lived task.

``/`` is ``status_page.html`` (beside this module): one self-contained page,
no external asset, that polls ``/status`` every second.  ``/status`` is the
state machine's snapshot plus what this module derives from it over time
(docs/operations.md lists every field):

* ``rates``: collectives decided per second (ok and aborted) over the last
  ``RATE_WINDOW`` seconds, from the master's counters sampled every
  ``SAMPLE_INTERVAL``;
* ``pending``: the ids of the peers waiting to be admitted;
* ``groups[i].edges``: the ring's links in send order, ``{"from", "to"}``
  (a rank sends to the next one); each edge gets ``bytes_per_s`` once peers
  report a cumulative ``tx_bytes`` (each peer sends only to its successor,
  so the rate of its counter is that link's bandwidth), and before that
  the master's estimate from probes or passive measurement (``source``);
  ``groups[i].bottleneck`` is the slowest of them, ``groups[i].matrix``
  every estimated edge of the group and ``groups[i].topology`` the last
  solve (docs/topology.md);
* ``heartbeat`` (``interval``, ``timeout``: the master's settings, so a
  reader can tell a late heartbeat), ``uptime_s`` and ``time`` (the
  master's wall clock, seconds since the Unix epoch).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from importlib import resources
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .. import _wire as protocol

if TYPE_CHECKING:
    from .server import MasterServer

log = logging.getLogger("pccl.master")

MAX_REQUEST = 8192  # bytes of request line + headers
REQUEST_TIMEOUT = 5.0
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
HTML_TYPE = "text/html; charset=utf-8"
SAMPLE_INTERVAL = 0.5  # seconds between samples of the counters
RATE_WINDOW = 5.0  # seconds the rates are averaged over


def status_page() -> bytes:
    """The status page's HTML (read from the installed package)."""
    return resources.files(__package__).joinpath("status_page.html").read_bytes()


def ring_edges(ring: list[str]) -> list[dict[str, Any]]:
    """The links of a ring in send order: rank i sends to rank i+1."""
    if len(ring) < 2:
        return []
    return [{"from": a, "to": ring[(i + 1) % len(ring)]} for i, a in enumerate(ring)]


class RateSampler:
    """Samples the master's counters (and peers' ``tx_bytes`` when they
    report it) and turns them into per-second rates over ``window`` s."""

    def __init__(self, window: float = RATE_WINDOW):
        self.window = window
        # (time, ops_ok, ops_aborted, {peer_id: tx_bytes})
        self.samples: deque[tuple[float, int, int, dict[str, int]]] = deque()

    def add(self, now: float, ops_ok: int, ops_aborted: int, tx: dict[str, int]) -> None:
        self.samples.append((now, ops_ok, ops_aborted, tx))
        # Keep one sample at least `window` old, so a rate always spans it.
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()

    def annotate(self, now: float, doc: dict[str, Any]) -> None:
        """Add ``rates`` and edge ``bytes_per_s`` to a /status document."""
        counters = doc["counters"]
        rates: dict[str, Any] = {"window_s": 0.0, "collectives_per_s": None, "aborted_per_s": None}
        tx_rate: dict[str, float] = {}
        if self.samples:
            t0, ok0, ab0, tx0 = self.samples[0]
            span = now - t0
            if span >= SAMPLE_INTERVAL / 2:
                rates = {
                    "window_s": round(span, 3),
                    "collectives_per_s": round((counters["ops_ok"] - ok0) / span, 2),
                    "aborted_per_s": round((counters["ops_aborted"] - ab0) / span, 2),
                }
                for p in doc["peers"]:
                    if "tx_bytes" in p and p["peer_id"] in tx0:
                        delta = int(p["tx_bytes"]) - tx0[p["peer_id"]]
                        tx_rate[p["peer_id"]] = max(0.0, delta / span)
        doc["rates"] = rates
        for group in doc["groups"]:
            for edge in group["edges"]:
                if edge["from"] in tx_rate:
                    edge["bytes_per_s"] = round(tx_rate[edge["from"]], 1)


class MasterCollector:
    """Exposes the master's state at scrape time: the state machine keeps
    plain counters, so they are read here rather than mirrored on every
    change."""

    def __init__(self, master: MasterServer):
        self.master = master

    def describe(self):
        return []  # collected lazily; no fixed description needed

    def collect(self):
        state = self.master.state
        counters = dict(state.counters, **self.master.counters)

        peers = GaugeMetricFamily(
            "pccl_master_peers", "Peers connected to the master, by state", labels=["state"]
        )
        for name in ("pending", "admitted"):
            peers.add_metric([name], sum(1 for p in state.peers.values() if p.state == name))
        yield peers
        # One series per peer, labelled with its id and its own name ("" when
        # it gave none), so a dashboard can show the name the user chose.
        heartbeat = GaugeMetricFamily(
            "pccl_master_peer_heartbeat_age_seconds",
            "Seconds since the master last heard from the peer",
            labels=["peer", "name", "group", "state"],
        )
        now = self.master.now()
        for p in state.peers.values():
            heartbeat.add_metric(
                [p.peer_id, p.name or "", str(p.group), p.state], max(0.0, now - p.last_seen)
            )
        yield heartbeat
        yield GaugeMetricFamily("pccl_master_epoch", "Current topology epoch", value=state.epoch)
        yield GaugeMetricFamily(
            "pccl_master_groups", "Peer groups with a ring at this epoch", value=len(state.rings)
        )
        yield GaugeMetricFamily(
            "pccl_master_open_ops",
            "Collective operations awaiting their outcome",
            value=sum(state._open_ops.values()),
        )
        ops = CounterMetricFamily(
            "pccl_master_ops_decided", "Collective outcomes decided", labels=["outcome"]
        )
        ops.add_metric(["ok"], counters["ops_ok"])
        ops.add_metric(["aborted"], counters["ops_aborted"])
        yield ops
        for key, help_text in (
            ("peers_joined", "Peers that completed the handshake"),
            ("peers_admitted", "Peers admitted into the run"),
            ("peers_lost", "Peers declared lost (closed connection or silence)"),
            ("peers_evicted", "Peers evicted for missing a vote or ring report"),
            ("peers_left", "Peers that left cleanly"),
            ("messages_received", "Messages received from welcomed peers"),
            ("messages_rejected", "Connections closed for breaking the protocol"),
            ("handshakes_failed", "Connections that failed the handshake"),
            ("connections_accepted", "TCP connections accepted"),
        ):
            yield CounterMetricFamily(f"pccl_master_{key}", help_text, value=counters[key])
        for name, hist, help_text in (
            (
                "pccl_master_verdict_seconds",
                self.master.verdict_seconds,
                "From reading an operation's last op_done to every op_outcome written",
            ),
            (
                "pccl_master_vote_seconds",
                self.master.vote_seconds,
                "From reading a vote round's last update_topology to every topology written",
            ),
        ):
            yield HistogramMetricFamily(
                name, help_text, buckets=hist.buckets(), sum_value=hist.sum
            )
        yield from _topology_metrics(state)



def _topology_metrics(state):
    """The measured matrix, the ring's bottleneck and the last solve
    (docs/topology.md)."""
    edges = GaugeMetricFamily(
        "pccl_master_edge_bytes_per_second",
        "Estimated directed bandwidth of an edge (0: unreachable), from probes and live traffic",
        labels=["group", "src", "dst", "source"],
    )
    bottleneck = GaugeMetricFamily(
        "pccl_master_ring_bottleneck_bytes_per_second",
        "Slowest estimated edge of the installed ring (0 if an edge is unknown)",
        labels=["group"],
    )
    predicted = GaugeMetricFamily(
        "pccl_master_topology_predicted_bus_bytes_per_second",
        "Bus bandwidth the last optimize_topology() or re-route predicts for its ring",
        labels=["group"],
    )
    probe_s = GaugeMetricFamily(
        "pccl_master_topology_probe_seconds",
        "Duration of the probe phase of the last optimize_topology()",
        labels=["group"],
    )
    groups = {p.peer_id: p.group for p in state.peers.values()}
    for (a, b), e in sorted(state.topology.edges.items()):
        g = groups.get(a)
        if g is not None and groups.get(b) == g:
            edges.add_metric([str(g), a, b, e.source], e.bytes_per_s)
    for g, ring in sorted(state.rings.items()):
        if len(ring) > 1:
            vals = [state.topology.edges.get((a, ring[(i + 1) % len(ring)])) for i, a in
                    enumerate(ring)]
            bottleneck.add_metric([str(g)], min((e.bytes_per_s if e else 0.0) for e in vals))
    for g, res in sorted(state.topology_results.items()):
        predicted.add_metric([str(g)], res["predicted_bus_bandwidth"])
        probe_s.add_metric([str(g)], res["probe_seconds"])
    yield from (edges, bottleneck, predicted, probe_s)


class StatusServer:
    def __init__(self, master: MasterServer, host: str, port: int):
        self.master = master
        self.host = host
        self.port = port
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(MasterCollector(master))
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._sampler_task: asyncio.Task | None = None
        self.rates = RateSampler()
        self.started_at = 0.0
        self._page: bytes | None = None

    async def start(self) -> str:
        self._page = status_page()  # read once: a missing file fails here, not per request
        self._server = await asyncio.start_server(
            self._on_connect, self.host, self.port, reuse_address=True, limit=MAX_REQUEST
        )
        loop = asyncio.get_running_loop()
        self.started_at = loop.time()
        self._sampler_task = loop.create_task(self._sample_loop(), name="pccl-master-status")
        sockname = self._server.sockets[0].getsockname()
        return protocol.format_hostport(str(sockname[0]), int(sockname[1]))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._sampler_task is not None:
            self._sampler_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._sampler_task, 2.0)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            status, ctype, body = self._respond(head)
        except (asyncio.LimitOverrunError, ValueError):
            status, ctype, body = (
                "431 Request Header Fields Too Large",
                "text/plain",
                b"too large\n",
            )
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, OSError):
            writer.close()
            return
        try:
            writer.write(
                (
                    f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                ).encode("ascii")
                + body
            )
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (asyncio.TimeoutError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), REQUEST_TIMEOUT)

    async def _sample_loop(self) -> None:
        while True:
            try:
                state = self.master.state
                tx = {
                    pid: int(p.tx_bytes)  # type: ignore[attr-defined]
                    for pid, p in state.peers.items()
                    if getattr(p, "tx_bytes", None) is not None
                }
                c = state.counters
                self.rates.add(self.master.now(), c["ops_ok"], c["ops_aborted"], tx)
            except Exception:  # a bug must not stop the endpoint
                log.exception("status: sampling the counters failed")
            await asyncio.sleep(SAMPLE_INTERVAL)

    def document(self) -> dict[str, Any]:
        """The /status document: the master's snapshot plus derived fields."""
        now = self.master.now()
        doc = self.master.status()
        doc["pending"] = [p["peer_id"] for p in doc["peers"] if p["state"] == "pending"]
        for group in doc["groups"]:
            group["edges"] = ring_edges(group["ring"])
            known = {(e["from"], e["to"]): e for e in group.get("matrix", ())}
            for edge in group["edges"]:  # measured estimates; live tx rates override
                est = known.get((edge["from"], edge["to"]))
                if est is not None:
                    edge["bytes_per_s"] = est["bytes_per_s"]
                    edge["source"] = est["source"]
            rated = [e.get("bytes_per_s") for e in group["edges"]]
            if rated and all(r is not None for r in rated):
                group["bottleneck"] = min(rated)
        self.rates.annotate(now, doc)
        state = self.master.state
        doc["heartbeat"] = {
            "interval": state.heartbeat_interval,
            "timeout": state.heartbeat_timeout,
        }
        doc["uptime_s"] = round(now - self.started_at, 3)
        doc["time"] = round(time.time(), 3)
        return doc

    def _respond(self, head: bytes) -> tuple[str, str, bytes]:
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return "400 Bad Request", "text/plain", b"bad request\n"
        method, target, _ = parts
        if method != "GET":
            return "405 Method Not Allowed", "text/plain", b"only GET\n"
        path = target.split("?", 1)[0]
        if path == "/status":
            doc = json.dumps(self.document(), indent=1, sort_keys=True)
            return "200 OK", "application/json", doc.encode() + b"\n"
        if path == "/metrics":
            return "200 OK", PROMETHEUS_TYPE, generate_latest(self.registry)
        if path in ("/", "/index.html"):
            return "200 OK", HTML_TYPE, self._page or status_page()
        return "404 Not Found", "text/plain", b"not found: try /, /status or /metrics\n"
