"""The ``--status`` endpoint: /status (JSON) and /metrics (Prometheus).

A deliberately tiny HTTP/1.1 responder on the master's event loop: it
answers one GET per connection and closes it.  Requests are bounded in size
and time, so a slow or hostile client costs one short-lived task.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .. import _wire as protocol

if TYPE_CHECKING:
    from .server import MasterServer

log = logging.getLogger("pccl.master")

MAX_REQUEST = 8192  # bytes of request line + headers
REQUEST_TIMEOUT = 5.0
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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


class StatusServer:
    def __init__(self, master: MasterServer, host: str, port: int):
        self.master = master
        self.host = host
        self.port = port
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(MasterCollector(master))
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(
            self._on_connect, self.host, self.port, reuse_address=True, limit=MAX_REQUEST
        )
        sockname = self._server.sockets[0].getsockname()
        return protocol.format_hostport(str(sockname[0]), int(sockname[1]))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
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
            doc = json.dumps(self.master.status(), indent=1, sort_keys=True)
            return "200 OK", "application/json", doc.encode() + b"\n"
        if path == "/metrics":
            return "200 OK", PROMETHEUS_TYPE, generate_latest(self.registry)
        return "404 Not Found", "text/plain", b"not found: try /status or /metrics\n"
