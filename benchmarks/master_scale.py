"""The master at scale: a real ``pccl-master`` against n simulated peers.

For each n of ``--sizes`` (default 16, 64, 256, 1024) it starts
``pccl-master --listen 127.0.0.1:0 --status 127.0.0.1:0`` and ``--workers``
client processes (default 2: one per core at most, uvloop), each running
n / workers protocol-level peers: they speak the msgpack protocol of
``pccl/_wire.py`` over real TCP connections and have no data plane (a
collective is its control traffic only: one ``op_done`` per peer, one
``op_outcome`` back; a ring is "ready" as soon as its topology arrives;
a shared-state fetch is done as soon as its plan arrives).  The clients
batch their sends: one encoded frame written to every connection that
sends the same message.  Then, in order:

1. **heartbeats**: ``--duration`` / 2 s of heartbeats only (every peer,
   every ``heartbeat_interval``, spread evenly): messages/s the master
   handled (its own counter, from ``/metrics``) and its CPU.
2. **steady**: ``--duration`` s of the load model: every peer steps
   ``--steps-per-s`` times a second (default 1); a step is
   ``--collectives`` collectives (default 10, ``--collective-gap`` apart,
   every peer reporting at the same moment, the burst a ring produces) and
   one ``update_topology`` vote with nobody pending (the loop of
   docs/failure-semantics.md votes once per step; ``--no-step-vote`` drops
   it).  Measured: master CPU (``/proc/<pid>/stat`` utime+stime over the
   window), messages/s, the clients' CPU, and the **verdict latency**: for
   each collective, the time from the last peer's ``op_done`` leaving its
   client to each peer's ``op_outcome`` arriving (p50/p99 over every
   peer of every collective).  The clients' clocks are CLOCK_MONOTONIC,
   shared by every process of the machine.
3. **update_topology with one joiner** (``--topology-rounds`` times): a new
   peer connects and is pending; every admitted peer votes at the same
   moment; timed from the last vote sent until every peer (the newcomer
   too) has its ``topology`` and then its ``topology_ready`` (each peer
   answers ``ring_ready`` at once): what ``update_topology()`` costs when
   building the ring is free.
4. **sync_shared_state** over ``--tensors`` tensors (default 1000): every
   peer reports the same hashes except the last joiner, whose tensors all
   differ; timed from the last ``sync_state`` sent until every plan is
   received, and until every distributor has its ``sync_end`` (the joiner
   reports ``sync_done`` as soon as its plan arrives).
5. master RSS (``VmRSS``) and peak (``VmHWM``) at the end.

**What the client-side numbers include.**  Latencies are measured where a
peer would see them, so they include the client processes' own scheduling
delay: a client process that receives 512 verdicts in a burst timestamps
the last one after it decoded the others, and the clients compete with the
master for the machine's cores (the table shows their CPU beside the
master's; the machine may also be shared with other work: the "foreign"
column is the CPU other processes used meanwhile).  The master-side
columns come from the master's own histograms on ``/metrics``: the time
from reading an operation's last ``op_done`` to having written every
verdict, and the same for a vote's last ``update_topology`` and every
``topology`` (absent from masters that predate them).

Targets (issue 19) at n = 256: p99 verdict latency <= 20 ms,
``update_topology()`` <= 250 ms, master CPU <= 50 % of one core.

    .venv/bin/python benchmarks/master_scale.py                     # ~3 minutes
    .venv/bin/python benchmarks/master_scale.py --sizes 16,64 --duration 4
    .venv/bin/python benchmarks/master_scale.py --json              # JSON on stdout

Numbers also go to ``benchmarks/out/master_scale.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as mp_wait
from pathlib import Path
from typing import Any

import _common as c
import msgpack

TARGET_N = 256
TARGET_VERDICT_P99_MS = 20.0
TARGET_TOPOLOGY_MS = 250.0
TARGET_CPU_PCT = 50.0

HEADER = struct.Struct(">I")
now = time.monotonic  # CLOCK_MONOTONIC: one clock for every process of the machine


def frame(msg: dict) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    return HEADER.pack(len(body)) + body


# --------------------------------------------------------------------------
# The simulated peers (in the worker processes).


class Client(asyncio.Protocol):
    """One simulated peer: a TCP connection to the master and what it was told."""

    def __init__(self, sim: Sim, port: int):
        self.sim = sim
        self.port = port  # the fake p2p port it advertises
        self.transport: asyncio.Transport | None = None
        self.rx = bytearray()
        self.peer_id: str | None = None
        self.admitted = False
        self.epoch = 0
        self.closed = False
        self.welcomed: asyncio.Future = sim.loop.create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        t = now()
        rx = self.rx
        rx += data
        start = 0
        unpack = msgpack.unpackb
        while len(rx) - start >= 4:
            (length,) = HEADER.unpack_from(rx, start)
            end = start + 4 + length
            if len(rx) < end:
                break
            msg = unpack(rx[start + 4 : end], raw=False)
            start = end
            self.sim.on_message(self, msg, t)
        if start:
            del rx[:start]

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.sim.errors.append(f"{self.peer_id}: connection lost ({exc})")
        if not self.welcomed.done():
            self.welcomed.set_exception(ConnectionError("closed before welcome"))

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)


class Sim:
    """The peers of one worker process and the commands the parent sends."""

    def __init__(self, loop, address: str, index: int, heartbeat_interval: float):
        self.loop = loop
        host, port = address.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.index = index
        self.heartbeat_interval = heartbeat_interval
        self.clients: list[Client] = []
        self.errors: list[str] = []
        self.heartbeat_task: asyncio.Task | None = None
        self.req = index * 10_000_000
        self.seq = 0
        self.reset()

    def reset(self) -> None:
        self.outcomes: dict[tuple, list[float]] = {}
        self.failed_ops = 0
        self.topology: dict[Any, list[float]] = {}  # req (None: newcomer) -> arrival times
        self.changed = 0
        self.ready: list[float] = []
        self.plans: list[float] = []
        self.plan_errors: list[str] = []
        self.serving = 0
        self.ends: list[float] = []

    # -- messages in ---------------------------------------------------

    def on_message(self, client: Client, msg: dict, t: float) -> None:
        kind = msg.get("type")
        if kind == "heartbeat_ack":
            return
        if kind == "op_outcome":
            self.outcomes.setdefault((msg["epoch"], msg["tag"], msg["seq"]), []).append(t)
            if not msg["ok"]:
                self.failed_ops += 1
        elif kind == "topology":
            client.admitted = True
            client.epoch = msg["epoch"]
            self.topology.setdefault(msg["req"], []).append(t)
            if msg["changed"]:
                self.changed += 1
                client.write(frame({"type": "ring_ready", "epoch": msg["epoch"], "ok": True}))
        elif kind == "topology_ready":
            self.ready.append(t)
            if not msg["ok"]:
                self.errors.append(f"{client.peer_id}: topology_ready ok=false")
        elif kind == "sync_plan":
            self.plans.append(t)
            if msg["error"]:
                self.plan_errors.append(msg["reason"])
            if msg["serve"]:
                self.serving += 1
            if msg["fetch"] and not msg["error"]:  # a free data plane: fetched at once
                client.write(frame({"type": "sync_done", "revision": msg["revision"], "ok": True}))
        elif kind == "sync_end":
            self.ends.append(t)
        elif kind == "challenge":
            hello = {
                "type": "hello",
                "version": 1,
                "nonce": os.urandom(32),
                "mac": b"",
                "peer_group": 0,
                "p2p_address": f"127.0.0.1:{client.port}",
                "p2p_connections": 1,
            }
            client.write(frame(hello))
        elif kind == "welcome":
            client.peer_id = msg["peer_id"]
            client.welcomed.set_result(None)
        elif kind == "pending_reply":
            pass
        else:  # abort, evicted, error: nothing of the kind should happen here
            self.errors.append(f"{client.peer_id}: {kind} {msg.get('reason', '')}")

    # -- helpers ---------------------------------------------------------

    async def until(self, t: float) -> None:
        delay = t - now()
        if delay > 0:
            await asyncio.sleep(delay)

    async def wait_for(self, cond, timeout: float, what: str) -> None:
        deadline = now() + timeout
        while not cond():
            if now() > deadline:
                raise TimeoutError(f"worker {self.index}: {what} not done within {timeout:g} s")
            await asyncio.sleep(0.002)

    async def heartbeats(self) -> None:
        """Every client heartbeats once per interval, spread over 10 slices."""
        hb = frame({"type": "heartbeat"})
        slices = 10
        k = 0
        while True:
            await asyncio.sleep(self.heartbeat_interval / slices)
            for cl in self.clients[k % slices :: slices]:
                cl.write(hb)
            k += 1

    def admitted(self) -> list[Client]:
        return [cl for cl in self.clients if cl.admitted and not cl.closed]

    # -- commands ----------------------------------------------------------

    async def cmd_connect(self, count: int, first_port: int, timeout: float = 120.0) -> list[str]:
        new: list[Client] = []
        batch = 32
        for i in range(0, count, batch):
            part = [Client(self, first_port + i + j) for j in range(min(batch, count - i))]
            connect = self.loop.create_connection
            await asyncio.gather(*(connect(lambda cl=cl: cl, self.host, self.port) for cl in part))
            new += part
        await asyncio.wait_for(asyncio.gather(*(cl.welcomed for cl in new)), timeout)
        self.clients += new
        if self.heartbeat_task is None:
            self.heartbeat_task = self.loop.create_task(self.heartbeats())
        return [cl.peer_id for cl in new]

    async def cmd_cpu(self) -> float:
        return time.process_time()

    async def cmd_vote(self, at: float, timeout: float = 120.0) -> dict:
        """Every admitted client votes at ``at``; wait until every client
        has a topology (and topology_ready when it changed)."""
        self.reset()
        voters = self.admitted()
        self.req += 1
        req = self.req
        vote = frame({"type": "update_topology", "req": req, "ring_ok": True, "admit": True})
        await self.until(at)
        first = now()
        for cl in voters:
            cl.write(vote)
        last = now()
        total = len(self.clients)
        await self.wait_for(
            lambda: sum(map(len, self.topology.values())) >= total, timeout, "topology"
        )
        if self.changed:
            await self.wait_for(lambda: len(self.ready) >= total, timeout, "topology_ready")
        arrivals = [t for ts in self.topology.values() for t in ts]
        return {
            "voters": len(voters),
            "first_send": first,
            "last_send": last,
            "topology": arrivals,
            "ready": list(self.ready),
            "changed": self.changed,
            "errors": self.errors[-5:],
        }

    async def cmd_steady(
        self,
        t0: float,
        duration: float,
        steps_per_s: float,
        collectives: int,
        gap: float,
        step_vote: bool,
        timeout: float = 60.0,
    ) -> dict:
        self.reset()
        cpu0 = time.process_time()
        clients = self.admitted()
        sent: dict[tuple, float] = {}
        votes: dict[int, float] = {}
        nsteps = max(1, int(duration * steps_per_s))
        period = 1.0 / steps_per_s
        late = 0
        n = len(clients)
        for k in range(nsteps):
            ts = t0 + k * period
            if step_vote:
                # update_topology() blocks until its answer: a peer never
                # votes again before it has its previous vote's topology.
                # A master that answers later than the step period makes
                # the steps late (counted), as it would a real run.
                prev = self.req
                if votes:
                    await self.wait_for(
                        lambda q=prev: len(self.topology.get(q, ())) >= n, timeout, "vote answer"
                    )
                if now() > ts + period * 0.1:
                    late += 1
                    ts = now()
                self.req += 1
                vote = frame(
                    {"type": "update_topology", "req": self.req, "ring_ok": True, "admit": True}
                )
                await self.until(ts)
                for cl in clients:
                    cl.write(vote)
                votes[self.req] = now()
            for j in range(collectives):
                await self.until(ts + period * 0.1 + j * gap)
                self.seq += 1
                epoch = clients[0].epoch
                report = frame(
                    {"type": "op_done", "epoch": epoch, "tag": 0, "seq": self.seq, "ok": True}
                )
                for cl in clients:
                    cl.write(report)
                sent[(epoch, 0, self.seq)] = now()
        complete = True
        try:
            await self.wait_for(
                lambda: all(len(self.outcomes.get(k, ())) >= n for k in sent)
                and (not step_vote or all(len(self.topology.get(r, ())) >= n for r in votes)),
                timeout,
                "steady verdicts",
            )
        except TimeoutError:  # the master fell behind: report what arrived
            complete = False
        cpu = time.process_time() - cpu0
        return {
            "ops": {k: (t, self.outcomes.get(k, [])) for k, t in sent.items()},
            "votes": {r: (t, self.topology.get(r, [])) for r, t in votes.items()},
            "failed_ops": self.failed_ops,
            "complete": complete,
            "late_steps": late,
            "cpu_s": cpu,
            "errors": self.errors[-5:],
        }

    async def cmd_sync(self, at: float, tensors: int, odd: str | None, timeout: float = 300.0):
        """Every client reports its shared state at ``at``; the client
        ``odd`` (a peer id) holds different content for every tensor."""
        self.reset()
        self.req += 1

        def state(odd_content: bool) -> bytes:
            return frame(
                {
                    "type": "sync_state",
                    "req": self.req,
                    "revision": 1,
                    "strategy": "enforce_popular",
                    "tensors": [
                        {
                            "name": f"layer.{i}.weight",
                            "dtype": "float32",
                            "shape": [64, 64],
                            "nbytes": 16384,
                            "hash": (b"\xff" if odd_content else b"\x01") + i.to_bytes(15, "big"),
                        }
                        for i in range(tensors)
                    ],
                }
            )

        common = state(False)
        different = state(True) if any(cl.peer_id == odd for cl in self.clients) else b""
        clients = self.admitted()
        await self.until(at)
        for cl in clients:
            cl.write(different if cl.peer_id == odd else common)
        last = now()
        await self.wait_for(lambda: len(self.plans) >= len(clients), timeout, "sync plans")
        return {"last_send": last, "plans": list(self.plans), "serving": self.serving,
                "plan_errors": self.plan_errors[:3], "bytes": len(common),
                "errors": self.errors[-5:]}

    async def cmd_sync_ends(self, count: int, timeout: float = 60.0) -> list[float]:
        await self.wait_for(lambda: len(self.ends) >= count, timeout, "sync_end")
        return list(self.ends)


def worker_main(conn: Connection, index: int, address: str, heartbeat_interval: float,
                parent_pid: int) -> None:
    c._die_with_parent(parent_pid)
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    sim = Sim(loop, address, index, heartbeat_interval)
    inbox: asyncio.Queue = asyncio.Queue()

    def read_commands() -> None:
        # A blocking reader thread: the loop's own readers would make the
        # pipe non-blocking, and a large reply would then fail with EAGAIN.
        while True:
            try:
                item = conn.recv()
            except (EOFError, OSError):
                item = ("quit", {})
            loop.call_soon_threadsafe(inbox.put_nowait, item)
            if item[0] == "quit":
                return

    threading.Thread(target=read_commands, name="commands", daemon=True).start()

    async def serve() -> None:
        while True:
            cmd, kwargs = await inbox.get()
            if cmd == "quit":
                return
            try:
                result = await getattr(sim, "cmd_" + cmd)(**kwargs)
                conn.send(("ok", result))
            except Exception:
                conn.send(("error", traceback.format_exc()))

    try:
        loop.run_until_complete(serve())
    finally:
        if sim.heartbeat_task is not None:
            sim.heartbeat_task.cancel()
            loop.run_until_complete(asyncio.gather(sim.heartbeat_task, return_exceptions=True))
        for cl in sim.clients:
            if cl.transport is not None:
                cl.transport.abort()
        loop.close()


# --------------------------------------------------------------------------
# The parent: the master process, the workers, the measurements.


class Workers:
    def __init__(self, count: int, address: str, heartbeat_interval: float):
        self.conns: list[Connection] = []
        self.procs = []
        for i in range(count):
            parent, child = c.CTX.Pipe()
            p = c.CTX.Process(
                target=worker_main,
                args=(child, i, address, heartbeat_interval, os.getpid()),
                name=f"master-scale-{i}",
                daemon=True,
            )
            p.start()
            child.close()
            with c._LIVE_LOCK:
                c._LIVE.add(p)
            self.conns.append(parent)
            self.procs.append(p)

    def send(self, i: int, cmd: str, **kwargs) -> None:
        self.conns[i].send((cmd, kwargs))

    def recv(self, i: int, timeout: float) -> Any:
        conn = self.conns[i]
        if not mp_wait([conn, self.procs[i].sentinel], timeout) or not conn.poll():
            alive = self.procs[i].is_alive()
            raise c.BenchmarkError(f"worker {i} {'did not answer' if alive else 'died'}")
        status, value = conn.recv()
        if status != "ok":
            raise c.BenchmarkError(f"worker {i}:\n{value}")
        return value

    def call(self, i: int, cmd: str, wait: float = 400.0, **kwargs) -> Any:
        self.send(i, cmd, **kwargs)
        return self.recv(i, wait)

    def all(self, cmd: str, wait: float = 400.0, per_worker=None, **kwargs) -> list:
        """``cmd`` on every worker (``kwargs`` and its ``per_worker`` entry);
        the replies, each waited for at most ``wait`` seconds."""
        for i in range(len(self.conns)):
            self.send(i, cmd, **dict(kwargs, **(per_worker[i] if per_worker else {})))
        return [self.recv(i, wait) for i in range(len(self.conns))]

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("quit", {}))
            except OSError:
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=2)
            with c._LIVE_LOCK:
                c._LIVE.discard(p)


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_mem(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1]) * 1024
    return out


_METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def scrape(status_address: str) -> dict[str, float]:
    """The master's /metrics as {"name{labels}": value}."""
    with urllib.request.urlopen(f"http://{status_address}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def histogram_quantiles(before: dict, after: dict, name: str, qs=(0.5, 0.99)) -> dict | None:
    """Quantiles of a Prometheus histogram's observations between two
    scrapes (interpolated within buckets); None when the master has no such
    histogram or nothing was observed."""
    prefix = name + "_bucket{"
    buckets = []
    for key, value in after.items():
        if key.startswith(prefix):
            le = re.search(r'le="([^"]+)"', key).group(1)
            buckets.append((math.inf if le == "+Inf" else float(le), value - before.get(key, 0.0)))
    if not buckets:
        return None
    buckets.sort()
    total = buckets[-1][1]
    if total <= 0:
        return None
    out = {"count": int(total)}
    for q in qs:
        # Linear interpolation inside the bucket that holds the quantile (as
        # Prometheus' histogram_quantile does); the +Inf bucket reports its
        # lower bound.
        rank, lower, below = q * total, 0.0, 0.0
        for le, n in buckets:
            if n >= rank:
                if math.isinf(le) or n == below:
                    out[f"p{round(q * 100)}"] = lower
                else:
                    out[f"p{round(q * 100)}"] = lower + (le - lower) * (rank - below) / (n - below)
                break
            lower, below = le, n
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def run_size(n: int, args, workdir: str, log, res: dict[str, Any]) -> dict:
    """Measure one size into ``res`` (filled as it goes: a failure keeps
    what was measured before it)."""
    from pccl.testing.procs import MasterProcess

    res["n"] = n
    nworkers = max(1, min(args.workers, n))
    shares = [n // nworkers + (1 if i < n % nworkers else 0) for i in range(nworkers)]
    master = MasterProcess(
        workdir,
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_timeout=args.heartbeat_timeout,
        vote_timeout=120.0,
        extra=["--status", "127.0.0.1:0", "--log-level", "WARNING"],
    )
    workers = None
    try:
        pid = master.pid
        workers = Workers(nworkers, master.address, args.heartbeat_interval)
        # The first peer alone (admitted at once), then everybody, then one
        # vote admits them all.
        port = 10000
        workers.call(0, "connect", count=1, first_port=port)
        port += 1
        shares[0] -= 1
        per = []
        for share in shares:
            per.append({"count": share, "first_port": port})
            port += share
        t = now()
        workers.all("connect", per_worker=per)
        res["connect_s"] = now() - t
        workers.all("vote", at=now() + 0.2)
        log(f"n={n}: {n} peers admitted ({res['connect_s']:.1f} s to connect)")
        res["rss_idle"] = proc_mem(pid)["VmRSS"]

        def window(run) -> tuple[dict, Any]:
            m0, cpu0, c0 = scrape(master.status_address), proc_cpu_s(pid), workers.all("cpu")
            machine0 = c.machine_cpu_seconds()
            t0 = now()
            value = run()
            wall = now() - t0
            m1, cpu1, c1 = scrape(master.status_address), proc_cpu_s(pid), workers.all("cpu")
            machine1 = c.machine_cpu_seconds()
            clients = sum(b - a for a, b in zip(c0, c1, strict=True))
            # Everything else the machine ran meanwhile (other users' work).
            foreign = 0.0
            if machine0 and machine1:
                foreign = max(0.0, machine1[0] - machine0[0] - (cpu1 - cpu0) - clients)
            msgs = m1.get("pccl_master_messages_received_total", 0) - m0.get(
                "pccl_master_messages_received_total", 0
            )
            return {
                "wall_s": wall,
                "master_cpu_pct": 100 * (cpu1 - cpu0) / wall,
                "clients_cpu_pct": 100 * clients / wall,
                "foreign_cpu_pct": 100 * foreign / wall,
                "messages_per_s": msgs / wall,
                "metrics": (m0, m1),
            }, value

        # 1. heartbeats only.
        hb_s = max(2.0, args.duration / 2)
        stats, _ = window(lambda: time.sleep(hb_s))
        stats.pop("metrics")
        res["heartbeat"] = stats
        log(f"n={n}: heartbeats {stats['messages_per_s']:.0f} msg/s, "
            f"master CPU {stats['master_cpu_pct']:.1f} %")

        # 2. steady load.
        t0 = now() + 0.3
        stats, replies = window(
            lambda: workers.all(
                "steady",
                t0=t0,
                duration=args.duration,
                steps_per_s=args.steps_per_s,
                collectives=args.collectives,
                gap=args.collective_gap,
                step_vote=not args.no_step_vote,
                timeout=30.0,
            )
        )
        m0, m1 = stats.pop("metrics")
        lat, vote_lat, missing = [], [], 0
        for key in replies[0]["ops"]:
            last = max(r["ops"][key][0] for r in replies)
            arrivals = [t for r in replies for t in r["ops"][key][1]]
            missing += n - len(arrivals)
            lat += [t - last for t in arrivals]
        for req_i in range(len(replies[0]["votes"])):
            reqs = [sorted(r["votes"])[req_i] for r in replies]
            last = max(r["votes"][q][0] for r, q in zip(replies, reqs, strict=True))
            vote_lat += [t - last for r, q in zip(replies, reqs, strict=True)
                         for t in r["votes"][q][1]]
        stats.update(
            collectives=len(replies[0]["ops"]),
            verdict_ms={"p50": 1e3 * pct(lat, 0.5), "p99": 1e3 * pct(lat, 0.99),
                        "max": 1e3 * max(lat, default=math.nan), "samples": len(lat)},
            vote_ms={"p50": 1e3 * pct(vote_lat, 0.5), "p99": 1e3 * pct(vote_lat, 0.99),
                     "samples": len(vote_lat)},
            missing_verdicts=missing,
            complete=all(r["complete"] for r in replies),
            late_steps=max(r["late_steps"] for r in replies),
            master_us_per_message=1e6 * stats["master_cpu_pct"] / 100 * stats["wall_s"]
            / max(1.0, stats["messages_per_s"] * stats["wall_s"]),
            failed_ops=sum(r["failed_ops"] for r in replies),
            worker_errors=[e for r in replies for e in r["errors"]],
            master_verdict_ms=_ms(histogram_quantiles(m0, m1, "pccl_master_verdict_seconds")),
            master_vote_ms=_ms(histogram_quantiles(m0, m1, "pccl_master_vote_seconds")),
        )
        res["steady"] = stats
        log(f"n={n}: steady: master CPU {stats['master_cpu_pct']:.1f} %, verdict p50 "
            f"{stats['verdict_ms']['p50']:.2f} ms p99 {stats['verdict_ms']['p99']:.2f} ms"
            + ("" if stats["complete"] else
               f"; SATURATED: {missing} verdicts still missing 30 s after the window"))

        # 3. update_topology with one joiner.
        rounds = []
        joiner = None
        for _ in range(args.topology_rounds):
            m0 = scrape(master.status_address)
            joiner = workers.call(0, "connect", count=1, first_port=port)[0]
            port += 1
            replies = workers.all("vote", at=now() + 0.2)
            m1 = scrape(master.status_address)
            last = max(r["last_send"] for r in replies)
            rounds.append({
                "peers": sum(len(r["topology"]) for r in replies),
                "topology_ms": 1e3 * (max(t for r in replies for t in r["topology"]) - last),
                "ready_ms": 1e3 * (max(t for r in replies for t in r["ready"]) - last),
                "master_vote_ms": _ms(histogram_quantiles(m0, m1, "pccl_master_vote_seconds",
                                                          qs=(1.0,))),
                "errors": [e for r in replies for e in r["errors"]],
            })
        res["topology"] = {
            "rounds": rounds,
            "ready_ms_median": statistics.median(r["ready_ms"] for r in rounds),
            "ready_ms_max": max(r["ready_ms"] for r in rounds),
        }
        log(f"n={n}: update_topology with a joiner: "
            f"{res['topology']['ready_ms_median']:.1f} ms (median of {len(rounds)})")

        # 4. sync_shared_state with one joiner.
        if args.tensors > 0:
            cpu0 = proc_cpu_s(pid)
            replies = workers.all("sync", at=now() + 0.3, tensors=args.tensors, odd=joiner)
            last = max(r["last_send"] for r in replies)
            plans_at = max(t for r in replies for t in r["plans"])
            serving = [r["serving"] for r in replies]
            ends = workers.all("sync_ends", per_worker=[{"count": s} for s in serving])
            ends_at = max((t for e in ends for t in e), default=plans_at)
            res["sync"] = {
                "tensors": args.tensors,
                "report_bytes": replies[0]["bytes"],
                "plans_ms": 1e3 * (plans_at - last),
                "sync_end_ms": 1e3 * (ends_at - last),
                "distributors": sum(serving),
                "master_cpu_s": proc_cpu_s(pid) - cpu0,
                "plan_errors": [e for r in replies for e in r["plan_errors"]],
            }
            log(f"n={n}: sync of {args.tensors} tensors: plans after "
                f"{res['sync']['plans_ms']:.0f} ms")
        res["memory"] = proc_mem(pid)
        lost = master.stderr.lines
        res["master_warnings"] = [ln for ln in lost if "lost" in ln or "evicted" in ln][:5]
    finally:
        if workers is not None:
            workers.close()
        master.signal()
        try:
            master.wait(10)
        except Exception:
            pass
        master.kill()
    return res


def _ms(q: dict | None) -> dict | None:
    if q is None:
        return None
    return {k: (v * 1e3 if k != "count" else v) for k, v in q.items()}


# --------------------------------------------------------------------------
# Output.


def fmt(v, digits=1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


def table(results: list[dict], args) -> None:
    cols = ["n", "hb msg/s", "hb cpu%", "msg/s", "cpu%", "us/msg", "clients%", "other%",
            "verdict p50", "verdict p99", "master p99", "vote p99", "update_topo",
            "sync plans", "sync end", "RSS MiB"]
    rows, styles = [], []
    for r in results:
        s, hb, topo = r["steady"], r["heartbeat"], r["topology"]
        mv = s.get("master_verdict_ms")
        row = [
            str(r["n"]), fmt(hb["messages_per_s"], 0), fmt(hb["master_cpu_pct"]),
            fmt(s["messages_per_s"], 0), fmt(s["master_cpu_pct"]),
            fmt(s["master_us_per_message"]), fmt(s["clients_cpu_pct"]),
            fmt(s["foreign_cpu_pct"], 0), fmt(s["verdict_ms"]["p50"], 2),
            fmt(s["verdict_ms"]["p99"], 2) + ("" if s["complete"] else "*"),
            fmt(mv["p99"], 2) if mv else "-",
            fmt(s["vote_ms"]["p99"], 2), fmt(topo["ready_ms_median"]),
            fmt(r.get("sync", {}).get("plans_ms"), 0), fmt(r.get("sync", {}).get("sync_end_ms"), 0),
            fmt(r["memory"]["VmRSS"] / c.MIB, 0),
        ]
        style: list[str | None] = [None] * len(row)
        if r["n"] == TARGET_N:
            for col, value, target in (
                (9, s["verdict_ms"]["p99"], TARGET_VERDICT_P99_MS),
                (4, s["master_cpu_pct"], TARGET_CPU_PCT),
                (12, topo["ready_ms_median"], TARGET_TOPOLOGY_MS),
            ):
                style[col] = "green" if value <= target else "red"
        rows.append(row)
        styles.append(style)
    caption = (
        "hb: heartbeats alone; msg/s, cpu% (the master's, of one core), us/msg (master CPU per "
        "message received), clients% and other% (the rest of the machine) under the steady "
        "load; times in ms.\n"
        f"targets at n = {TARGET_N}: verdict p99 <= {TARGET_VERDICT_P99_MS:g} ms, "
        f"update_topology <= {TARGET_TOPOLOGY_MS:g} ms, master CPU <= {TARGET_CPU_PCT:g} % "
        f"(load: {args.steps_per_s:g} step/s x {args.collectives} collectives"
        f"{'' if args.no_step_vote else ' + 1 vote'} per step, heartbeats every "
        f"{args.heartbeat_interval:g} s; {args.workers} client processes).\n"
        "verdict: last op_done sent -> each peer's op_outcome received, at the clients (includes "
        "their scheduling delay); master p99: last op_done read -> every verdict written, at the "
        "master.\nupdate_topology: last vote sent -> every peer has topology_ready (one joiner, "
        "median of rounds); sync: last sync_state sent -> every plan / every sync_end received."
        + ("\n* the master fell behind: some verdicts had not arrived 30 s after the window"
           if any(not r["steady"]["complete"] for r in results) else "")
        + "".join(f"\nn={r['n']}: {r['steady']['late_steps']} steps started late (the previous "
                  "vote's answer came after the step's start)"
                  for r in results if r["steady"].get("late_steps"))
    )
    c.print_table("pccl-master at scale", cols, rows, styles, caption)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="See the module docstring (benchmarks/master_scale.py) for what is measured.",
    )
    ap.add_argument("--sizes", default="16,64,256,1024", help="peer counts (default %(default)s)")
    ap.add_argument("--duration", type=float, default=10.0,
                    help="seconds of steady load per size; heartbeats alone run half as long "
                         "(default %(default)s)")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                    help="client processes (default: one per core, at most 2)")
    ap.add_argument("--steps-per-s", type=float, default=1.0, help="default %(default)s")
    ap.add_argument("--collectives", type=int, default=10,
                    help="collectives per step (default %(default)s)")
    ap.add_argument("--collective-gap", type=float, default=0.04,
                    help="seconds between a step's collectives (default %(default)s)")
    ap.add_argument("--no-step-vote", action="store_true",
                    help="no update_topology vote per step")
    ap.add_argument("--topology-rounds", type=int, default=3,
                    help="update_topology rounds with one joiner each (default %(default)s)")
    ap.add_argument("--tensors", type=int, default=1000,
                    help="tensors in the shared-state sync; 0 skips it (default %(default)s)")
    ap.add_argument("--heartbeat-interval", type=float, default=0.5, help="default %(default)s")
    ap.add_argument("--heartbeat-timeout", type=float, default=30.0,
                    help="the master's; generous, so a loaded machine loses nobody "
                         "(default %(default)s)")
    ap.add_argument("--json", nargs="?", const="-", metavar="PATH",
                    help="write the results as JSON to PATH (stdout without PATH) "
                         "instead of the table")
    args = ap.parse_args(argv)
    sizes = c.parse_list(args.sizes)
    if not sizes or min(sizes) < 2:
        ap.error("--sizes: every size must be at least 2")
    if args.duration <= 0 or args.steps_per_s <= 0 or args.collectives < 1:
        ap.error("--duration and --steps-per-s must be positive, --collectives at least 1")
    if args.collectives * args.collective_gap > 0.8 / args.steps_per_s:
        ap.error("--collectives x --collective-gap must fit in 80 % of a step")
    c.install_cleanup()

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    results, failed = [], []
    doc = {"benchmark": "master_scale", "args": vars(args), "machine": c.machine_info(),
           "loadavg_start": os.getloadavg(), "results": results, "failed": failed}
    path = c.OUT_DIR / "master_scale.json"
    with tempfile.TemporaryDirectory(prefix="pccl-master-scale-") as workdir:
        for n in sizes:
            partial: dict[str, Any] = {}
            try:
                results.append(run_size(n, args, workdir, log, partial))
            except Exception as exc:  # one size failing must not lose the others
                log(f"n={n}: FAILED: {exc}")
                failed.append({"n": n, "error": str(exc)[-2000:], "partial": partial})
            doc["loadavg_end"] = os.getloadavg()
            c.write_json(path, doc)  # after every size: a later failure keeps the earlier ones
    if args.json == "-":
        json.dump(doc, sys.stdout, indent=2, default=str)
        print()
    else:
        if args.json:
            Path(args.json).write_text(json.dumps(doc, indent=2, default=str) + "\n")
        if results:
            table(results, args)
        for f in failed:
            print(f"n={f['n']}: FAILED (see {path})")
        print(f"results: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
