"""All-reduce over emulated WAN links: pccl with K striped connections vs gloo.

Every byte between peers crosses the user-space link emulator
(:mod:`pccl.testing.linkemu`), which runs in this process and gives each
link a one-way delay (RTT/2), a rate shared by all connections of the link
(per direction) and a per-connection in-flight window, so that one TCP
flow gets at most window/RTT - the long-fat-pipe case where a single flow
uses a fraction of the link.  Defaults: 4 peers, RTT 40 ms, 200 Mbit/s per
link, window for 25 Mbit/s per flow, one 64 MiB float32 tensor.

* **pccl**: ``pccl.StaticRing`` with K = 1, 2, 4, 8, 16; rank r dials the
  emulator's front for the link r -> r+1 instead of rank r+1 (all K
  connections of a ring edge share that link).  Plus one run with
  ``Quantization.UINT8_MINMAX`` at the largest K.
* **gloo**: ``torch.distributed``'s ProcessGroupGloo.  Gloo connects a
  full mesh of pairs, using the addresses each rank publishes in the
  store; a store wrapper rewrites, for each reader, every peer's address
  into the front of an emulated link reader -> peer (in a link emulator
  inside the reader's process).  Gloo decides which side of a pair dials
  by comparing the two addresses (IP first), so the devices bind
  127.0.0.128 and the front for peer p is opened on 127.0.0.(1+p), below
  the device, or 127.0.0.(129+p), above it: exactly one side of each pair
  sees its peer below and dials, through its own link; the other side's
  link stays unused.  One TCP connection per pair (all n(n-1)/2 pairs, not
  only ring neighbours), each its own link with the same rate, delay and
  window: the same emulated network as pccl's ring edges.  The run checks
  that every ring edge really moved its share, 2(n-1)/n * bytes, through
  an emulated link (the relays' byte counters) and prints it.

Reported: bus bandwidth = 2(n-1)/n * bytes / time, as a fraction of the
emulated link rate; the ratio to gloo; the quantized speed-up.  Targets:
pccl with K >= 8 reaches >= 0.8 of link capacity; uint8 quantization is
>= 3x faster than unquantized at the same K.

The emulator is one Python thread; when the rates asked for exceed what it
can relay on this machine, the numbers measure the relay.  ``--scale``
multiplies every rate (link and per-flow) and keeps their ratios, the
point of the experiment; the run reports the relay's CPU use and warns
when it was the bottleneck.

    python benchmarks/wan.py            # full: 64 MiB, K = 1..16, gloo, uint8; 3-5 min
    python benchmarks/wan.py --quick    # 16 MiB, K = 1, 4, 16, gloo, uint8; ~1 min
    python benchmarks/wan.py --no-gloo  # pccl only
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import tempfile
import time
from pathlib import Path

import _common as c
import numpy as np

TARGET_FRACTION = 0.8   # pccl, K >= 8, of the link rate
TARGET_QUANT = 3.0      # uint8 vs float32 wall time, same K
GLOO_DEVICE_IP = "127.0.0.128"
GLOO_MAX_WORLD = 126    # fronts on 127.0.0.(1+p) and 127.0.0.(129+p)
GLOO_EDGE_MIN = 0.9     # of 2(n-1)/n * bytes: what each ring edge must relay


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _check(x: np.ndarray, world: int, tol: float = 0.0) -> str | None:
    want = world * (world + 1) / 2
    block = 1 << 16
    for start in range(0, x.size, block):
        part = x[start:start + block]
        bad = np.abs(part - want) > tol * want
        if bad.any():
            i = start + int(np.flatnonzero(bad)[0])
            return f"element {i} is {x[i]!r}, expected {want}"
    return None


# --------------------------------------------------------------------------
# Workers (in child processes).


class PcclWanWorker:
    """A StaticRing rank whose successor is reached through the emulator."""

    def __init__(self, rank: int, world: int, options: dict):
        import pccl

        self.pccl = pccl
        self.rank, self.world = rank, world
        self.quant = (pccl.Quantization.UINT8_MINMAX if options.get("quant")
                      else pccl.Quantization.NONE)
        self.ring = pccl.StaticRing(rank, world, listen="127.0.0.1:0",
                                    p2p_connections=int(options["k"]),
                                    progress_timeout=options.get("progress_timeout", 120.0),
                                    **c.slice_kwargs(options))
        self.x = None

    def info(self) -> dict:
        return {"address": self.ring.address, "version": self.pccl.version()}

    def connect(self, infos: list[dict]) -> None:
        addresses = [i["address"] for i in infos]
        nxt = (self.rank + 1) % self.world
        addresses[nxt] = infos[nxt]["via"]     # the front of link rank -> nxt
        self.ring.connect(addresses, timeout=60)

    def alloc(self, nbytes: int) -> None:
        self.x = np.empty(nbytes // 4, dtype=np.float32)
        self.x.fill(self.rank + 1)

    def verify(self) -> dict:
        """The first (timed) operation, checked."""
        t0 = c.now()
        self.ring.all_reduce(self.x, quantization=self.quant)
        t1 = c.now()
        err = _check(self.x, self.world, tol=0.01 if self.quant else 0.0)
        return {"error": err, "span": (t0, t1)}

    def run(self, n: int) -> None:
        for _ in range(n):
            self.x.fill(self.rank + 1)
            self.ring.all_reduce(self.x, quantization=self.quant)

    def free(self) -> None:
        self.x = None

    def close(self) -> None:
        self.ring.close()


def _rank_info_address_offset(value: bytes) -> int | None:
    """Offset of the sockaddr in gloo's serialized rank info (hostname
    length + hostname, address length + address = sockaddr_storage + seq,
    then one sequence number per rank), or None if it is not one."""
    if len(value) < 16:
        return None
    (host_len,) = struct.unpack_from("<Q", value, 0)
    off = 8 + host_len
    if host_len > 1024 or off + 8 > len(value):
        return None
    (addr_len,) = struct.unpack_from("<Q", value, off)
    off += 8
    if addr_len < 16 or off + addr_len > len(value):
        return None
    (family,) = struct.unpack_from("<H", value, off)
    return off if family == 2 else None


def _ip_port(value: bytes, off: int) -> tuple[str, int]:
    (port,) = struct.unpack_from(">H", value, off + 2)
    return ".".join(str(b) for b in value[off + 4:off + 8]), port


class GlooWanWorker:
    """torch.distributed ProcessGroupGloo whose pairs dial emulated links.

    Gloo learns its peers' addresses from the store; a store wrapper
    rewrites each peer's address into the front of a link opened by this
    process's own link emulator (one link per peer, same rate, delay and
    window as pccl's ring edges).  Gloo picks the dialing side of a pair
    by comparing the two addresses, IP first (``Device::isInitiator``), so
    the devices bind 127.0.0.128 and the front for peer p listens on
    127.0.0.(1+p) if the real peer address is below this rank's, else on
    127.0.0.(129+p) (port 0: the IPs always differ, the port is never
    compared): both ends of a pair reach the same verdict, exactly one of
    them dials, and it dials through its own emulated link.  The other
    end's link for that pair carries nothing."""

    def __init__(self, rank: int, world: int, options: dict):
        import torch
        import torch.distributed as dist

        from pccl.testing.linkemu import LinkEmulator

        if world > GLOO_MAX_WORLD:
            raise ValueError(f"gloo through the emulator supports at most {GLOO_MAX_WORLD} ranks")
        self.torch, self.dist = torch, dist
        self.rank, self.world = rank, world
        self.options = options
        self.emu = LinkEmulator(delay=options["delay"], rate_bps=options["link_bps"],
                                window=options["window"]).start()
        self.pg = None
        self.x = None

    def info(self) -> dict:
        return {"version": self.torch.__version__}

    def _store(self):
        dist, rank, emu = self.dist, self.rank, self.emu
        own: list[tuple[str, int]] = []
        fronts: dict[int, str] = {}

        class RoutedStore(dist.Store):
            """Passes everything through; rewrites peers' gloo addresses."""

            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def set(self, key, value):
                off = _rank_info_address_offset(value)
                if off is not None and key.rsplit("/", 1)[-1] == str(rank):
                    own.append(_ip_port(value, off))
                return self.inner.set(key, value)

            def get(self, key):
                value = self.inner.get(key)
                peer = key.rsplit("/", 1)[-1]
                off = _rank_info_address_offset(value)
                if off is None or not peer.isdigit() or int(peer) == rank or not own:
                    return value
                p = int(peer)
                ip, port = _ip_port(value, off)
                if p not in fronts:
                    below = (ip, port) < own[0]
                    host = f"127.0.0.{(1 if below else 129) + p}"
                    fronts[p] = emu.add_link(f"{ip}:{port}", name=f"gloo {rank}->{p}",
                                             host=host)
                fhost, fport = fronts[p].rsplit(":", 1)
                b = bytearray(value)
                struct.pack_into(">H", b, off + 2, int(fport))
                b[off + 4:off + 8] = bytes(int(x) for x in fhost.split("."))
                return bytes(b)

            def add(self, key, n):
                return self.inner.add(key, n)

            def wait(self, keys, timeout=None):
                return self.inner.wait(keys) if timeout is None else self.inner.wait(keys, timeout)

            def check(self, keys):
                return self.inner.check(keys)

            def compare_set(self, key, expected, desired):
                return self.inner.compare_set(key, expected, desired)

            def delete_key(self, key):
                return self.inner.delete_key(key)

            def num_keys(self):
                return self.inner.num_keys()

            def set_timeout(self, timeout):
                return self.inner.set_timeout(timeout)

        return RoutedStore(dist.FileStore(self.options["store"], self.world))

    def connect(self, infos: list[dict]) -> None:
        from datetime import timedelta

        dist = self.dist
        opts = dist.ProcessGroupGloo._Options()
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=GLOO_DEVICE_IP)]
        opts._timeout = timedelta(seconds=float(self.options.get("timeout", 300)))
        self.pg = dist.ProcessGroupGloo(self._store(), self.rank, self.world, opts)

    def alloc(self, nbytes: int) -> None:
        self.x = self.torch.full((nbytes // 4,), float(self.rank + 1), dtype=self.torch.float32)

    def verify(self) -> dict:
        """The first (timed) operation, checked; with the bytes each of this
        rank's links relayed (forward = this rank -> peer) and the relay
        thread's CPU seconds during the operation."""
        cpu0 = _thread_cpu_seconds(self.emu.thread_id)
        t0 = c.now()
        self.pg.allreduce([self.x]).wait()
        t1 = c.now()
        cpu = _thread_cpu_seconds(self.emu.thread_id) - cpu0
        # A rank is done once it has received everything, while its own
        # last bytes may still be in its relay: count them after every rank
        # is done (past a barrier), when every relay has delivered them.
        self.pg.barrier().wait()
        links = {n: [s.forward.bytes, s.reverse.bytes, s.connections_total]
                 for n, s in self.emu.stats().items()}
        return {"error": _check(self.x.numpy(), self.world), "span": (t0, t1),
                "links": links, "relay_cpu_s": cpu}

    def run(self, n: int) -> None:
        for _ in range(n):
            self.x.fill_(float(self.rank + 1))
            self.pg.allreduce([self.x]).wait()

    def free(self) -> None:
        self.x = None

    def close(self) -> None:
        self.pg = None
        self.emu.stop()


def _thread_cpu_seconds(tid: int | None) -> float:
    """CPU seconds (user + system) of thread ``tid`` of this process."""
    if tid is None:
        return 0.0
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def gloo_ring_bytes(link_reports: list[dict], world: int) -> dict:
    """From the workers' link counters ({"gloo a->b": [fwd, rev, conns]}),
    the bytes that crossed emulated links on each ring edge.  Gloo's ring
    sends to one neighbour and receives from the other; which way round is
    gloo's business, so both orientations are measured and the busier one
    is taken as the ring."""
    moved: dict[tuple[int, int], int] = {}
    for links in link_reports:
        for name, (fwd, rev, _conns) in links.items():
            a, b = (int(x) for x in name.split()[-1].split("->"))
            moved[(a, b)] = moved.get((a, b), 0) + fwd
            moved[(b, a)] = moved.get((b, a), 0) + rev
    rings = [[(r, (r + step) % world) for r in range(world)] for step in (1, -1)]
    edges = max(rings, key=lambda ring: min(moved.get(e, 0) for e in ring))
    return {"edges": [[a, b, moved.get((a, b), 0)] for a, b in edges],
            "total": sum(moved.values())}


# --------------------------------------------------------------------------
# The run (parent process).


class RoutedGroup(c.WorkerGroup):
    """A WorkerGroup whose address rendezvous passes through ``router``
    (which opens the emulator links once the ranks' addresses are known)."""

    def __init__(self, router, *args, **kwargs):
        self.router = router
        super().__init__(*args, **kwargs)

    def call(self, *cmd, timeout: float = 60.0) -> list:
        if cmd[0] == "connect" and self.router is not None:
            cmd = ("connect", self.router(cmd[1]))
        return super().call(*cmd, timeout=timeout)


def _relay_cpu() -> float:
    """CPU seconds of this process (the relay thread is nearly all of it)."""
    return time.process_time()


def _measure(name: str, group: c.WorkerGroup, nbytes: int, world: int, args,
             expected_s: float) -> dict:
    timeout = 60 + 4 * expected_s
    cpu0, wall0 = _relay_cpu(), time.monotonic()
    replies = group.call("alloc", nbytes, timeout=timeout)
    errors = [r["error"] for r in replies if r["error"]]
    if errors:
        raise c.BenchmarkError(f"{name}: wrong result: {errors[0]}")
    samples = [max(r["span"][1] for r in replies) - min(r["span"][0] for r in replies)]
    extra = 0 if args.quick else max(0, min(args.iters - 1, int(args.budget / samples[0])))
    for _ in range(extra):
        spans = group.call("run", 1, timeout=timeout)
        samples.append(max(t1 for _, t1 in spans) - min(t0 for t0, _ in spans))
    cpu = (_relay_cpu() - cpu0) / max(time.monotonic() - wall0, 1e-9)
    if any("relay_cpu_s" in r for r in replies):
        # Relays inside the workers (gloo): the busiest one, first operation.
        cpu = max(r["relay_cpu_s"] for r in replies) / max(samples[0], 1e-9)
    t = float(np.median(samples))
    busbw = c.bus_bandwidth(nbytes, world, t) * 1e9      # bytes/s
    out = {"name": name, "seconds": t, "samples_s": samples, "busbw_Bps": busbw,
           "fraction": busbw / (args.link_bps / 8), "relay_cpu": cpu}
    if any("links" in r for r in replies):
        out["gloo_links"] = [r["links"] for r in replies]
    return out


def run(args) -> dict:
    from pccl.testing.linkemu import LinkEmulator

    world, nbytes = args.world, args.size
    rtt = args.rtt_ms / 1000
    window = int(args.flow_bps / 8 * rtt)
    emu = LinkEmulator(delay=rtt / 2, rate_bps=args.link_bps, window=window).start()
    per_link = 2 * (world - 1) / world * nbytes
    results: list[dict] = []
    t_start = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="pccl-wan-") as tmpdir:
            configs = [(f"pccl K={k}", {"k": k, "slice": args.slice_bytes}) for k in args.ks]
            if args.quant:
                configs.append((f"pccl K={max(args.ks)} uint8",
                                {"k": max(args.ks), "quant": 1, "slice": args.slice_bytes}))
            for name, opts in configs:
                tag = name.replace(" ", "_")

                def route(infos, tag=tag):
                    out = [dict(i) for i in infos]
                    for r in range(world):
                        nxt = (r + 1) % world
                        out[nxt]["via"] = emu.add_link(infos[nxt]["address"],
                                                       name=f"{tag}:{r}->{nxt}")
                    return out

                k = opts["k"]
                payload = per_link / (4 if opts.get("quant") else 1)
                expected = payload / min(args.link_bps / 8, k * args.flow_bps / 8)
                log(f"{name}: expecting ~{expected:.1f} s per operation")
                try:
                    with RoutedGroup(route, PcclWanWorker, world, opts, name=name) as g:
                        res = _measure(name, g, nbytes, world, args, expected)
                except c.BenchmarkError as e:
                    log(f"{name}: FAILED: {e}")
                    results.append({"name": name, "error": str(e).splitlines()[0]})
                    continue
                res.update(kind="pccl", k=k, quant=bool(opts.get("quant")))
                results.append(res)
                log(f"{name}: {res['seconds']:.2f} s, {res['fraction']:.2f} of link, "
                    f"relay CPU {res['relay_cpu']:.0%}")
            if args.gloo:
                results.append(_run_gloo(args, tmpdir, nbytes, per_link))
    finally:
        stats = {n: vars(s) | {"forward": vars(s.forward), "reverse": vars(s.reverse)}
                 for n, s in emu.stats().items()}
        emu.stop()
    return {"benchmark": "wan", "args": {k: v for k, v in vars(args).items()},
            "window_bytes": window, "machine": c.machine_info(),
            "elapsed_s": time.monotonic() - t_start, "results": results, "links": stats}


def _run_gloo(args, tmpdir: str, nbytes: int, per_link: float) -> dict:
    rtt = args.rtt_ms / 1000
    opts = {"store": os.path.join(tmpdir, "gloo-store"), "delay": rtt / 2,
            "link_bps": args.link_bps, "window": int(args.flow_bps / 8 * rtt)}
    expected = per_link / min(args.link_bps / 8, args.flow_bps / 8)
    log(f"gloo: expecting ~{expected:.1f} s per operation (one flow per pair)")
    try:
        with RoutedGroup(None, GlooWanWorker, args.world, opts, name="gloo",
                         start_timeout=60) as g:
            res = _measure("gloo", g, nbytes, args.world, args, expected)
    except c.BenchmarkError as e:
        log(f"gloo: FAILED: {e}")
        return {"name": "gloo", "error": str(e).splitlines()[0]}
    ring = gloo_ring_bytes(res["gloo_links"], args.world)
    least = min(b for _, _, b in ring["edges"]) / per_link
    res.update(kind="gloo", k=1, quant=False, gloo_ring=ring, gloo_edge_min=least)
    edges = ", ".join(f"{a}->{b} {by / per_link:.3f}" for a, b, by in ring["edges"])
    log(f"gloo: {res['seconds']:.2f} s, {res['fraction']:.2f} of link, relayed per ring edge "
        f"(of 2(n-1)/n * bytes): {edges}")
    if least < GLOO_EDGE_MIN:
        msg = (f"a ring edge relayed only {least:.2f} of its share through the emulator "
               f"(< {GLOO_EDGE_MIN}): gloo's traffic did not cross the emulated links")
        log(f"gloo: FAILED: {msg}")
        return {"name": "gloo", "error": msg, "gloo_ring": ring}
    return res


# --------------------------------------------------------------------------
# Report.


def report(data: dict, args) -> list[str]:
    ok = [r for r in data["results"] if not r.get("error")]
    gloo = next((r for r in ok if r["kind"] == "gloo"), None)
    gloo_note = ("gloo time / this time = this contender's speed relative to gloo"
                 if gloo else "not measured (--no-gloo or gloo failed)")
    kmax = max(args.ks)
    plain = next((r for r in ok if r["kind"] == "pccl" and r["k"] == kmax and not r["quant"]),
                 None)
    quant = next((r for r in ok if r["quant"]), None)
    cols = ["contender", "time (s)", "bus bw (Mbit/s)", "of link", "vs gloo", "relay CPU"]
    rows, styles, verdicts = [], [], []
    for r in data["results"]:
        if r.get("error"):
            rows.append([r["name"], "error", "-", "-", "-", "-"])
            styles.append([None, "red", None, None, None, None])
            continue
        vs = f"{gloo['seconds'] / r['seconds']:.2f}x" if gloo else "-"
        st = [None] * 6
        if r["kind"] == "pccl" and r["k"] >= 8 and not r["quant"]:
            st[3] = "green" if r["fraction"] >= TARGET_FRACTION else "red"
        if r["relay_cpu"] > 0.8:
            st[5] = "yellow"
        rows.append([r["name"], f"{r['seconds']:.2f}", f"{r['busbw_Bps'] * 8 / 1e6:.1f}",
                     f"{r['fraction']:.2f}", vs, f"{r['relay_cpu']:.0%}"])
        styles.append(st)
    for r in ok:
        if r["kind"] == "pccl" and r["k"] >= 8 and not r["quant"]:
            verdicts.append(f"pccl K={r['k']}: {r['fraction']:.2f} of link capacity "
                            f"(target >= {TARGET_FRACTION}): "
                            f"{'PASS' if r['fraction'] >= TARGET_FRACTION else 'FAIL'}")
    if gloo:
        verdicts.append(f"gloo: every ring edge relayed >= {gloo['gloo_edge_min']:.3f} of "
                        f"2(n-1)/n * bytes through an emulated link (required >= "
                        f"{GLOO_EDGE_MIN})")
        best = max((r for r in ok if r["kind"] == "pccl" and not r["quant"]),
                   key=lambda r: r["fraction"], default=None)
        if best:
            verdicts.append(f"pccl/gloo speed at pccl's best K={best['k']}: "
                            f"{gloo['seconds'] / best['seconds']:.2f}x "
                            f"({best['fraction']:.2f} vs {gloo['fraction']:.2f} of link)")
    if plain and quant:
        sp = plain["seconds"] / quant["seconds"]
        verdicts.append(f"uint8 speed-up at K={kmax}: {sp:.2f}x (target >= {TARGET_QUANT}x): "
                        f"{'PASS' if sp >= TARGET_QUANT else 'FAIL'}")
    scale = f" (rates scaled by {args.scale:g})" if args.scale != 1 else ""
    caption = (f"{args.world} peers, one {c.fmt_size(args.size)} float32 SUM all-reduce, "
               f"RTT {args.rtt_ms:g} ms, link {args.link_bps / 1e6:g} Mbit/s per direction, "
               f"window {data['window_bytes']} B per connection = "
               f"{args.flow_bps / 1e6:g} Mbit/s per flow{scale}.\n"
               f"bus bw = 2(n-1)/n * bytes / time (median); 'of link' = bus bw / link rate; "
               f"'vs gloo' = {gloo_note}.  relay CPU = CPU share of the relay during "
               f"the measurement (pccl: this process, nearly all of it the emulator "
               f"thread; gloo: the busiest rank's emulator thread); near 100% means "
               f"the relay, not the link, was the limit.")
    c.print_table("all-reduce over emulated WAN links", cols, rows, styles, caption)
    for v in verdicts:
        print(v)
    if any(r["relay_cpu"] > 0.8 for r in ok):
        log("warning: the relay thread was CPU-bound in some runs; rerun with --scale 0.5")
    return verdicts


def plot(data: dict, path: Path, args) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in data["results"] if not r.get("error")]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = [r["name"] for r in ok]
    fr = [r["fraction"] for r in ok]
    colours = ["tab:orange" if r["kind"] == "gloo" else
               ("tab:green" if r["quant"] else "tab:blue") for r in ok]
    bars = ax.bar(names, fr, color=colours)
    gloo = next((r for r in ok if r["kind"] == "gloo"), None)
    for b, r in zip(bars, ok, strict=True):
        label = f"{r['seconds']:.1f} s"
        if gloo and r is not gloo:
            label += f"\n{gloo['seconds'] / r['seconds']:.2f}x gloo"
        ax.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.axhline(TARGET_FRACTION, color="grey", ls="--", lw=1, label=f"target {TARGET_FRACTION}")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_ylim(0, max(fr + [1.0]) * 1.18)     # room for the labels
    ax.set_ylabel("bus bandwidth / link rate")
    ax.set_title(f"{args.world} peers, {c.fmt_size(args.size)}, RTT {args.rtt_ms:g} ms, "
                 f"{args.link_bps / 1e6:g} Mbit/s links, {args.flow_bps / 1e6:g} Mbit/s per flow")
    ax.tick_params(axis="x", rotation=20)
    ax.legend(loc="upper left")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="All-reduce through emulated WAN links (delay, shared link rate, "
                    "per-connection window): pccl with K connections vs gloo.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--world", type=int, default=4, help="peers")
    ap.add_argument("--slice-bytes", type=c.parse_size, default=None, metavar="BYTES",
                    help="pccl's largest slice on the wire (default: the library's)")
    ap.add_argument("--size", type=c.parse_size, default=None,
                    help="tensor bytes (float32) [64M; --quick 16M]")
    ap.add_argument("--ks", default=None,
                    help="pccl connection counts [1,2,4,8,16; --quick 1,4,16]")
    ap.add_argument("--rtt-ms", type=float, default=40.0, help="round-trip time of every link")
    ap.add_argument("--link-mbit", type=float, default=200.0,
                    help="link rate per direction, shared by the link's connections")
    ap.add_argument("--flow-mbit", type=float, default=25.0,
                    help="per-connection rate cap; the window is this * RTT")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply link and flow rates (for a relay that cannot keep up)")
    ap.add_argument("--gloo", action=argparse.BooleanOptionalAction, default=True,
                    help="also run real gloo (torch.distributed) through emulated links "
                         "(relays inside each gloo process)")
    ap.add_argument("--no-quant", dest="quant", action="store_false",
                    help="skip the uint8 run")
    ap.add_argument("--iters", type=int, default=3, help="timed operations at most per config")
    ap.add_argument("--budget", type=float, default=20.0,
                    help="seconds per config for extra timed operations after the first")
    ap.add_argument("--quick", action="store_true", help="smoke run, under a minute")
    ap.add_argument("--out", type=Path, default=c.OUT_DIR / "wan.json",
                    help="JSON output (a PNG plot is written beside it)")
    args = ap.parse_args(argv)
    q = args.quick
    args.size = args.size or c.parse_size("16M" if q else "64M")
    args.ks = c.parse_list(args.ks or ("1,4,16" if q else "1,2,4,8,16"))
    args.link_bps = args.link_mbit * 1e6 * args.scale
    args.flow_bps = args.flow_mbit * 1e6 * args.scale
    if args.world < 2:
        ap.error("--world must be >= 2")
    if args.gloo and args.world > GLOO_MAX_WORLD:
        ap.error(f"--gloo supports --world <= {GLOO_MAX_WORLD}")
    if args.size % 4:
        ap.error("--size must be a multiple of 4")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    c.install_cleanup()
    data = run(args)
    verdicts = report(data, args)
    data["verdicts"] = verdicts
    out = args.out if not args.quick else args.out.with_name(args.out.stem + "_quick.json")
    log(f"wrote {c.write_json(out, data)}")
    png = plot(data, out.with_suffix(".png"), args)
    if png:
        log(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
