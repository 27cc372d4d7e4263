"""The peer's side of ``optimize_topology()``: bandwidth probes over the
shared-state transfer channel, and the :class:`TopologyInfo` it returns.

A probe of the directed edge j -> i is peer i fetching peer j's published
probe buffer (``pccl_comm_fetch``: an authenticated connection per range,
bytes flowing j -> i, read straight into a scratch buffer), first on one
connection, then K fetches at once on K connections, each for a bounded
time; the faster counts.  (On a link with a small queue, K fresh
connections starting at once lose packets in slow start and measure up to
40 % low, which the ring's long-lived connections do not; on a long fat
pipe one connection is window-limited and K measure the link.)  Each
measurement:

1. **latency**: the best of three empty fetches (TCP connect, the
   authenticated handshake and one request/reply: a few round trips);
2. **pilot**: K concurrent fetches of ``PILOT_BYTES`` each, to size the
   next step;
3. **measurement**: each of the K threads fetches ranges back to back
   (sized from the pilot: about four per thread within the budget) until
   the budget is spent; throughput = all bytes / (last end - start), so
   a connection that stalls leaves its share to the others rather than
   the link idle.  One connection ending far behind the
   others (a lost SYN, an early retransmission timeout of a fresh
   connection on a small queue) leaves the link idle at the end, so then
   the measurement runs once more and the better one counts.

Each range rides a fresh connection: the transfer channel closes its
connection after one range.  A probe therefore sees a connection's start
(slow start) once, as a ring's long-lived connections do not; that is
why each range is a quarter of the budget, not a sliver.

The buffer is served read-only without copying, so every thread can fetch
the same range; it is published for the whole ``optimize_topology()`` call
and withdrawn at its end.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace

import numpy as np

from . import errors

PROBE_KEY = 0x7063636C_70726F62  # "pcclprob": never a content hash in practice
PROBE_BUFFER_BYTES = 16 << 20
PILOT_BYTES = 256 << 10
MIN_CHUNK = 256 << 10
FETCH_TIMEOUT = 3.0  # seconds without a byte before a fetch fails


@dataclass(frozen=True)
class TopologyInfo:
    """The answer of ``optimize_topology()`` (DESIGN §3).

    * ``matrix``: ``{(from_peer_id, to_peer_id): bytes/s}``, directed,
      every edge of the group measured (by a probe or by live traffic);
      unreachable edges are absent (see ``unreachable``).
    * ``ring``: peer ids in send order (``ring[i]`` sends to ``ring[i+1]``),
      the ring the master installs at the next ``update_topology()``
      (or the current one when nothing better exists); empty when
      ``feasible`` is False.
    * ``bottleneck``, ``predicted_bus_bandwidth``: bytes/s of the ring's
      slowest edge, and the ring all-reduce bus bandwidth that predicts.
    * ``feasible``: a ring avoiding every unreachable edge exists;
      ``reason`` says why not when it does not.
    * ``rtt``: ``{(from, to): seconds}`` of an empty fetch (connect,
      handshake, request: a few round trips), for probed edges.
    * ``unreachable``: edges whose probe failed; never used.
    * ``probes``, ``probe_seconds``: probes run by this call and the
      wall time of the probe phase (0 when nothing needed measuring).
    * ``install``: the ring differs from the current one and is installed
      at the next ``update_topology()``.
    """

    matrix: dict[tuple[str, str], float]
    ring: list[str]
    bottleneck: float
    predicted_bus_bandwidth: float
    feasible: bool = True
    reason: str = ""
    rtt: dict[tuple[str, str], float] = field(default_factory=dict)
    unreachable: list[tuple[str, str]] = field(default_factory=list)
    probes: int = 0
    probe_seconds: float = 0.0
    install: bool = False

    @classmethod
    def from_message(cls, msg: dict) -> TopologyInfo:
        matrix: dict[tuple[str, str], float] = {}
        rtt: dict[tuple[str, str], float] = {}
        unreachable: list[tuple[str, str]] = []
        for e in msg["edges"]:
            key = (e["from"], e["to"])
            if e["source"] == "unreachable":
                unreachable.append(key)
                continue
            matrix[key] = float(e["bytes_per_s"])
            if e["rtt_s"] > 0:
                rtt[key] = float(e["rtt_s"])
        ring = list(msg["ring"])
        bottleneck = float(msg["bottleneck"])
        predicted = float(msg["predicted_bus_bandwidth"])
        if len(ring) == 1:  # nothing moves: the model's bandwidth is unbounded
            bottleneck = predicted = float("inf")
        return cls(
            matrix=matrix,
            ring=ring,
            bottleneck=bottleneck,
            predicted_bus_bandwidth=predicted,
            feasible=bool(msg["feasible"]),
            reason=msg["reason"],
            rtt=rtt,
            unreachable=unreachable,
            probes=int(msg["probes"]),
            probe_seconds=float(msg["probe_seconds"]),
            install=bool(msg["install"]),
        )


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    bytes_per_s: float = 0.0
    rtt_s: float = 0.0
    nbytes: int = 0
    seconds: float = 0.0
    reason: str = ""
    per_k: dict[int, float] = field(default_factory=dict)  # bytes/s by connections


class ProbeSource:
    """The probe buffer this peer publishes while ``optimize_topology()``
    runs (a context manager: published on enter, withdrawn on exit)."""

    def __init__(self, native, nbytes: int = PROBE_BUFFER_BYTES):
        self._native = native
        self.nbytes = nbytes
        self._buf = np.full(nbytes, 0xA5, dtype=np.uint8)  # touched: no lazy zero pages
        self._published = False

    def __enter__(self) -> ProbeSource:
        try:
            self._native.publish(PROBE_KEY, self._buf.ctypes.data, self.nbytes)
        except errors.PcclError as exc:
            if getattr(exc, "code", None) != 10:  # PCCL_EBUSY: left over, still valid
                raise
            self._native.unpublish(PROBE_KEY)
            self._native.publish(PROBE_KEY, self._buf.ctypes.data, self.nbytes)
        self._published = True
        return self

    def __exit__(self, *exc) -> None:
        if self._published:
            self._published = False
            try:
                self._native.unpublish(PROBE_KEY)
            except errors.PcclError:
                pass


def _parallel(native, address: str, conns: int, size: int, until: float | None,
              scratch: list[np.ndarray]) -> tuple[int, float, list[float], str]:
    """K threads fetching ``size`` bytes each, one connection per fetch,
    again and again until ``until`` (once when None).  Returns (bytes,
    seconds until the last ended, each thread's seconds, first error)."""
    got = [0] * conns
    ends = [0.0] * conns
    failure: list[str] = []
    t0 = time.monotonic()

    def worker(k: int) -> None:
        dst = scratch[k].ctypes.data
        while True:
            n, err = native.fetch(address, PROBE_KEY, 0, size, dst, timeout=FETCH_TIMEOUT)
            got[k] += n
            ends[k] = time.monotonic() - t0
            if err is not None:
                failure.append(str(err))
                return
            if until is None or time.monotonic() >= until or failure:
                return

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(got), time.monotonic() - t0, ends, failure[0] if failure else ""


def measure(native, address: str, conns: int, seconds: float,
            buffer_bytes: int = PROBE_BUFFER_BYTES) -> ProbeResult:
    """Probe the edge from the peer at ``address`` to this peer with one
    connection, then (``conns`` > 1) with ``conns``, ``seconds`` each, and
    keep the faster (see the module doc).  ``per_k`` has both.  Never
    raises for a network failure: ``ok`` is False."""
    one = _measure(native, address, 1, seconds, buffer_bytes)
    if not one.ok or conns <= 1:
        return replace(one, per_k={1: one.bytes_per_s} if one.ok else {})
    many = _measure(native, address, int(conns), seconds, buffer_bytes)
    per_k = {1: one.bytes_per_s}
    if many.ok:
        per_k[int(conns)] = many.bytes_per_s
    best = many if many.ok and many.bytes_per_s > one.bytes_per_s else one
    return replace(best, rtt_s=min(one.rtt_s, many.rtt_s or one.rtt_s), per_k=per_k)


def _measure(native, address: str, conns: int, seconds: float,
             buffer_bytes: int) -> ProbeResult:
    conns = max(1, int(conns))
    start = time.monotonic()
    rtts = []
    for _ in range(3):
        t0 = time.monotonic()
        _, err = native.fetch(address, PROBE_KEY, 0, 0, 0, timeout=FETCH_TIMEOUT)
        if err is not None:
            return ProbeResult(False, reason=f"empty fetch: {err}")
        rtts.append(time.monotonic() - t0)
    rtt = min(rtts)
    scratch = [np.empty(buffer_bytes, dtype=np.uint8) for _ in range(conns)]
    nbytes, took, _, err = _parallel(native, address, conns, min(PILOT_BYTES, buffer_bytes),
                                     None, scratch)
    if err:
        return ProbeResult(False, rtt_s=rtt, reason=f"pilot: {err}")
    rate = nbytes / max(took, 1e-6)
    best: ProbeResult | None = None
    for attempt in range(2):
        left = max(seconds - (time.monotonic() - start), seconds / 2)
        chunk = int(min(buffer_bytes, max(MIN_CHUNK, rate * left / conns / 4)))
        nbytes, took, ends, err = _parallel(native, address, conns, chunk,
                                            time.monotonic() + left, scratch)
        if err or nbytes == 0:
            return ProbeResult(False, rtt_s=rtt, reason=err or "no byte moved")
        result = ProbeResult(True, nbytes / took, rtt, nbytes, took)
        if best is None or result.bytes_per_s > best.bytes_per_s:
            best = result
        rate = max(rate, result.bytes_per_s) if attempt == 0 else rate
        # One connection far behind the others (a lost SYN or an early
        # retransmission timeout of a fresh connection) leaves the link
        # idle at the end: measure once more and keep the better.
        ends.sort()
        if ends[-1] <= 1.3 * ends[len(ends) // 2]:
            break
    assert best is not None
    return best
