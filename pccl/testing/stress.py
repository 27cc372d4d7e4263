"""Churn stress test: ``python -m pccl.testing.stress``.

Starts a real ``pccl-master`` and ``--peers`` peer processes
(:mod:`pccl.testing.stress_peer`) on 127.0.0.1.  Each peer loops
``update_topology`` -> ``sync_shared_state`` -> ``all_reduce_many``
(unquantized and uint8) -> deterministic update of the shared state, and
reports every step as a JSON line.  At seeded random times the orchestrator
SIGKILLs peers, SIGSTOPs them (some longer than the heartbeat timeout, so
they are evicted and must rejoin as newcomers) and SIGCONTs them, starts
newcomers and cuts peers' master connections, keeping the peer count
between ``--min-peers`` and ``--max-peers``.

Checks, all the time:

* every peer that reports revision r reports the same shared-state hash,
  the same hash of the state it received from the sync, and bit-identical
  results of every reduction (quantized ones included);
* every unquantized result equals the sum recomputed here from the
  contributors (read from the one-hot tail each peer adds), and those
  contributors are the ring the master gave when no retry intervened;
* every sampled quantized result is within the uint8 error bound of the sum
  recomputed from the master's ring;
* progress: the newest revision advances at least every ``--hang-timeout``;
* no peer exits unless the orchestrator killed it or told it to.

Exit code 0 when everything held and the requested minimum numbers of
faults happened, 1 otherwise (the reason is printed), 130 on Ctrl-C.  The
last line of stdout is ``STRESS-SUMMARY {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .stress_peer import AMPLITUDE, KIND_Q, KIND_U, contribution, digest

LISTENING = re.compile(r"pccl-master listening on (\S+)")


class StressFailure(Exception):
    """A check failed (disagreement, wrong value, hang, crash, schedule)."""


@dataclass
class PeerProc:
    slot: int
    proc: subprocess.Popen
    log_path: str
    joiner: bool
    started: float
    ids: list[str] = field(default_factory=list)
    stopped: bool = False
    cont_at: float = 0.0
    killed: bool = False
    exiting: bool = False
    in_sync: bool = False  # reported a step since its last (re)connection
    steps: int = 0

    @property
    def alive(self) -> bool:
        return not self.killed and self.proc.poll() is None

    def send(self, msg: dict) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except (OSError, ValueError):
            pass

    def log_tail(self, limit: int = 3000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-limit:]
        except OSError:
            return ""


@dataclass
class RevisionRecord:
    first_slot: int
    hash: str
    sync_hash: str
    u_hash: list[str]
    q_hash: list[str]
    reporters: int = 1


class Progress:
    """The run's progress on stderr: a tqdm bar on a terminal; elsewhere (a
    pipe, a CI log) one plain line every ``interval`` seconds, so a log file
    gets a few lines rather than megabytes of carriage-return frames.
    ``counts`` (of :meth:`update`) is the short status text shown beside the
    bar or on the line.
    """

    def __init__(
        self, duration: float, *, enabled: bool = True, interval: float = 5.0, stream=None
    ):
        self.stream = sys.stderr if stream is None else stream
        self.duration = duration
        self.enabled = enabled
        self.interval = interval
        self.tty = _isatty(self.stream)
        self._bar = None
        self._next_line = time.monotonic() + interval
        if enabled and self.tty:
            from tqdm import tqdm

            self._bar = tqdm(
                total=int(duration), unit="s", file=self.stream,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} s {postfix}",
            )

    def update(self, elapsed: float, counts: str) -> None:
        if self._bar is not None:
            self._bar.n = min(int(elapsed), int(self.duration))
            self._bar.set_postfix_str(counts, refresh=True)
        elif self.enabled and time.monotonic() >= self._next_line:
            self._next_line = time.monotonic() + self.interval
            self._line(elapsed, counts)

    def write(self, text: str) -> None:
        """A log line that does not break the bar."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self, elapsed: float, counts: str) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled:
            self._line(min(elapsed, self.duration), counts, " done")

    def _line(self, elapsed: float, counts: str, note: str = "") -> None:
        print(
            f"progress {elapsed:5.0f}/{self.duration:g} s{note}  {counts}",
            file=self.stream,
            flush=True,
        )


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


class Orchestrator:
    def __init__(self, args: argparse.Namespace):
        self.a = args
        self.rng = random.Random(args.seed)
        self.workdir = tempfile.mkdtemp(prefix="pccl-stress-")
        self.events: queue.Queue = queue.Queue()
        self.master: subprocess.Popen | None = None
        self.master_addr = ""
        self.peers: dict[int, PeerProc] = {}
        self.next_slot = 0
        self.revs: dict[int, RevisionRecord] = {}
        self.max_rev = 0
        self.last_progress = time.monotonic()
        self.t_start = time.monotonic()
        self.counts = dict(
            steps=0, kills=0, stops=0, long_stops=0, conts=0, joins=0, cuts=0,
            aborted=0, rejoins=0, peer_errors=0, parity_checks=0, value_checks=0,
            quant_checks=0, ring_checks=0,
        )
        self.faults: list[tuple[float, str]] = []  # (wall time, kind) awaiting recovery
        self.recoveries: list[tuple[float, str]] = []
        self.pending_ring_checks: list[tuple[int, dict]] = []
        self.expected_cache: dict[tuple, np.ndarray] = {}
        self.schedule: list[tuple[float, str]] = []
        self.stop_index = 0
        self.failures: list[str] = []
        self.warnings: list[str] = []
        self.shutting_down = False
        self.aborted_keys: set[tuple[str, int]] = set()
        self.id_to_slot: dict[str, int] = {}

    # -- processes ---------------------------------------------------------

    def start_master(self) -> None:
        a = self.a
        hb = a.heartbeat_timeout
        argv = [
            sys.executable, "-m", "pccl.master", "--listen", "127.0.0.1:0",
            "--heartbeat-timeout", str(hb), "--heartbeat-interval", str(hb / 5),
            "--vote-timeout", str(a.vote_timeout), "--sync-timeout", str(a.vote_timeout),
            "--log-level", "WARNING",
        ]
        log = open(os.path.join(self.workdir, "master.log"), "w")
        self.master = subprocess.Popen(
            argv, cwd=self.workdir, stdout=subprocess.PIPE, stderr=log, text=True,
            start_new_session=True,
        )
        log.close()
        found: queue.Queue = queue.Queue()

        def pump() -> None:
            assert self.master is not None and self.master.stdout is not None
            for line in self.master.stdout:
                m = LISTENING.search(line)
                if m:
                    found.put(m.group(1))
            found.put(None)

        threading.Thread(target=pump, daemon=True, name="master-stdout").start()
        try:
            addr = found.get(timeout=30)
        except queue.Empty:
            addr = None
        if not addr:
            raise StressFailure("pccl-master did not report its address within 30 s:\n"
                                + self.master_log())
        self.master_addr = addr

    def master_log(self, limit: int = 3000) -> str:
        try:
            with open(os.path.join(self.workdir, "master.log"), errors="replace") as f:
                return f.read()[-limit:]
        except OSError:
            return ""

    def spawn_peer(self, joiner: bool) -> PeerProc:
        a = self.a
        slot = self.next_slot
        self.next_slot += 1
        argv = [
            sys.executable, "-m", "pccl.testing.stress_peer", "--master", self.master_addr,
            "--seed", str(a.seed), "--slot", str(slot), "--max-slots", str(a.max_slots),
            "--tensor-elems", str(a.tensor_elems),
            "--unquantized", str(a.unquantized), "--quantized", str(a.quantized),
            "--connect-timeout", str(a.hang_timeout),
            "--progress-timeout", str(a.progress_timeout),
            "--step-sleep", str(a.step_sleep),
            "--log-level", a.peer_log_level,
        ]
        if joiner:
            argv.append("--joiner")
        log_path = os.path.join(self.workdir, f"peer{slot}.log")
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                argv, cwd=self.workdir, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=log, text=True, start_new_session=True,
            )
        peer = PeerProc(slot, proc, log_path, joiner, time.monotonic())
        self.peers[slot] = peer
        threading.Thread(
            target=self._pump_peer, args=(peer,), daemon=True, name=f"peer{slot}"
        ).start()
        return peer

    def _pump_peer(self, peer: PeerProc) -> None:
        assert peer.proc.stdout is not None
        for line in peer.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            self.events.put((peer.slot, time.time(), msg))
        self.events.put((peer.slot, time.time(), {"ev": "eof"}))

    def cleanup(self) -> None:
        """SIGCONT + SIGKILL every child still running and reap it (bounded)."""
        procs = [p.proc for p in self.peers.values()]
        if self.master is not None:
            procs.append(self.master)
        for proc in procs:
            if proc.poll() is None:
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    try:
                        proc.send_signal(sig)
                    except OSError:
                        pass
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.warnings.append(f"pid {proc.pid} did not die within 10 s of SIGKILL")
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass

    # -- the fault schedule ----------------------------------------------

    def build_schedule(self) -> None:
        a = self.a
        lo, hi = a.warmup, max(a.warmup + 1.0, a.duration - a.cooldown)
        window = hi - lo
        for kind, rate, minimum in (
            ("kill", a.kill_rate, a.min_kills),
            ("stop", a.stop_rate, a.min_stops),
            ("join", a.join_rate, a.min_joins),
            ("cut", a.cut_rate, a.min_cuts),
        ):
            n = max(minimum, int(np.random.default_rng([a.seed, len(kind)]).poisson(rate * window)))
            # Spread evenly with jitter, so the minimums fit in the window.
            for i in range(n):
                t = lo + window * (i + self.rng.random()) / n
                self.schedule.append((t, kind))
        self.schedule.sort()

    def healthy(self, exclude: int | None = None) -> list[PeerProc]:
        return [
            p for p in self.peers.values()
            if p.alive and not p.stopped and not p.exiting and p.in_sync and p.slot != exclude
        ]

    def running(self) -> list[PeerProc]:
        return [p for p in self.peers.values() if p.alive and not p.exiting]

    def try_fault(self, kind: str) -> bool:
        a = self.a
        alive = self.running()
        keep = max(1, min(2, a.min_peers))
        if kind == "join":
            if len(alive) >= a.max_peers or self.next_slot >= a.max_slots:
                return False
            newcomer = self.spawn_peer(joiner=True)
            self.counts["joins"] += 1
            self.log(f"JOIN slot {newcomer.slot}")
            self.fault("join")
            return True
        if len(alive) - 1 < a.min_peers and kind == "kill":
            return False
        candidates = [p for p in alive if not p.stopped]
        if kind == "cut":
            candidates = [p for p in candidates if p.in_sync]
        candidates = [p for p in candidates if len(self.healthy(exclude=p.slot)) >= keep]
        if not candidates:
            return False
        victim = self.rng.choice(candidates)
        if kind == "kill":
            victim.killed = True
            victim.proc.send_signal(signal.SIGKILL)
            self.counts["kills"] += 1
            self.log(f"SIGKILL slot {victim.slot}")
        elif kind == "stop":
            hb = a.heartbeat_timeout
            lo, hi = a.stop_seconds
            # Alternate: long stops (evicted, rejoin as newcomers), short ones.
            if self.stop_index % 2 == 0 and hi > hb:
                secs = self.rng.uniform(max(lo, hb * 1.3), max(hi, hb * 1.3))
            else:
                secs = self.rng.uniform(lo, min(hi, hb * 0.7) if lo < hb * 0.7 else hi)
            self.stop_index += 1
            victim.proc.send_signal(signal.SIGSTOP)
            victim.stopped = True
            victim.in_sync = False
            victim.cont_at = time.monotonic() + secs
            self.counts["stops"] += 1
            if secs > hb:
                self.counts["long_stops"] += 1
            self.log(f"SIGSTOP slot {victim.slot} for {secs:.1f} s")
        elif kind == "cut":
            victim.send({"cmd": "cut"})
            victim.in_sync = False
            self.counts["cuts"] += 1
            self.log(f"CUT slot {victim.slot}'s master connection")
        self.fault(kind)
        return True

    def fault(self, kind: str) -> None:
        self.faults.append((time.time(), kind))

    def tick_schedule(self, now: float) -> None:
        for p in self.peers.values():
            if p.stopped and now >= p.cont_at:
                if p.alive:
                    p.proc.send_signal(signal.SIGCONT)
                    self.log(f"SIGCONT slot {p.slot}")
                p.stopped = False
                self.counts["conts"] += 1
        elapsed = now - self.t_start
        remaining = []
        for t, kind in self.schedule:
            if t <= elapsed and not self.try_fault(kind):
                remaining.append((elapsed + 0.5, kind))  # postponed
            elif t > elapsed:
                remaining.append((t, kind))
        self.schedule = sorted(remaining)

    # -- events and checks ---------------------------------------------

    def log(self, text: str) -> None:
        if self.a.verbose:
            self._write(f"[{time.monotonic() - self.t_start:7.2f}] {text}")

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    bar = None

    def fail(self, text: str) -> None:
        self.failures.append(text)
        raise StressFailure(text)

    def slot_of(self, peer_id: str) -> int | None:
        return self.id_to_slot.get(peer_id)

    def expected(self, kind: int, index: int, rev: int, slots: tuple[int, ...]) -> np.ndarray:
        key = (kind, index, rev, slots)
        hit = self.expected_cache.get(key)
        if hit is None:
            total = np.zeros(self.a.tensor_elems, dtype=np.float64)
            for s in slots:
                total += contribution(self.a.seed, s, rev, kind, index, self.a.tensor_elems)
            hit = total.astype(np.float32)  # exact: small integer sums
            if len(self.expected_cache) > 512:
                self.expected_cache.clear()
            self.expected_cache[key] = hit
        return hit

    def handle(self, slot: int, wall: float, msg: dict) -> None:
        peer = self.peers[slot]
        ev = msg.get("ev")
        if ev == "step":
            self.on_step(peer, wall, msg)
        elif ev == "admitted":
            peer.ids.append(msg["id"])
            self.id_to_slot[msg["id"]] = slot
            self.log(f"slot {slot} admitted as {msg['id']} (world {msg['world']})")
        elif ev == "aborted":
            self.aborted_keys.add(("failed", msg["rev"]))  # every survivor reports it
            self.counts["aborted"] = len(self.aborted_keys)
            self.log(f"slot {slot} step aborted at rev {msg['rev']}: {msg['why']}")
        elif ev == "lost":
            self.counts["rejoins"] += 1
            peer.in_sync = False
            self.log(f"slot {slot} lost the master: {msg['why']}")
        elif ev in ("error", "connect_failed", "cut_failed"):
            self.counts["peer_errors"] += 1
            self.log(f"slot {slot} {ev}: {msg.get('why')}")
        elif ev == "eof":
            try:
                code = peer.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                code = None
            if not peer.killed and not peer.exiting and not self.shutting_down:
                self.fail(
                    f"peer slot {slot} (pid {peer.proc.pid}) exited unexpectedly with code "
                    f"{code}; its log ends:\n{peer.log_tail()}"
                )

    def on_step(self, peer: PeerProc, wall: float, msg: dict) -> None:
        rev = msg["rev"]
        peer.in_sync = True
        peer.steps += 1
        self.counts["steps"] += 1
        rec = self.revs.get(rev)
        u_hash = [t["h"] for t in msg["u"]]
        q_hash = [t["h"] for t in msg["q"]]
        if rec is None:
            # First report of this revision: verify the values.
            self.verify_values(peer, msg)
            if msg["retried"]:
                self.aborted_keys.add(("retry", rev))  # the group's failed attempt, once
                self.counts["aborted"] = len(self.aborted_keys)
            self.revs[rev] = RevisionRecord(
                peer.slot, msg["hash"], msg["sync_hash"], u_hash, q_hash
            )
            if rev > self.max_rev:
                self.max_rev = rev
                self.last_progress = time.monotonic()
        else:
            for what, mine, theirs in (
                ("shared-state hash after the step", msg["hash"], rec.hash),
                ("shared-state hash after the sync", msg["sync_hash"], rec.sync_hash),
                ("unquantized results", u_hash, rec.u_hash),
                ("quantized results", q_hash, rec.q_hash),
            ):
                if mine != theirs:
                    self.fail(
                        f"DISAGREEMENT at revision {rev}: {what} of slot {peer.slot} "
                        f"({msg['id']}) differ from slot {rec.first_slot}'s: {mine} != {theirs}"
                    )
            rec.reporters += 1
            self.counts["parity_checks"] += 1
        self.pending_ring_checks.append((peer.slot, msg))
        # Recovery: the first step that started after a fault and completed.
        still = []
        for t_fault, kind in self.faults:
            if msg["t0"] > t_fault:
                self.recoveries.append((msg["t1"] - t_fault, kind))
            else:
                still.append((t_fault, kind))
        self.faults = still

    def verify_values(self, peer: PeerProc, msg: dict) -> None:
        rev, n = msg["rev"], self.a.tensor_elems
        for j, t in enumerate(msg["u"]):
            if not t["tail_ok"]:
                self.fail(f"revision {rev}: tensor u{j}'s one-hot tail is not 0/1 "
                          f"(slot {peer.slot})")
            slots = tuple(t["c"])
            if peer.slot not in slots:
                self.fail(f"revision {rev}: slot {peer.slot}'s own contribution is missing "
                          f"from tensor u{j} (contributors {slots})")
            want = digest(self.expected(KIND_U, j, rev, slots))
            if want != t["h"]:
                self.fail(
                    f"WRONG SUM at revision {rev}, tensor u{j}: reported by slot {peer.slot}, "
                    f"contributors {slots}"
                )
            self.counts["value_checks"] += 1
        del n

    def check_rings(self, final: bool = False) -> None:
        """Cross-check the one-hot contributors against the master's ring,
        and the quantized samples against the sum over that ring (needs
        every ring member's peer id -> slot, so it may wait for events)."""
        keep = []
        for slot, msg in self.pending_ring_checks:
            ring_u, ring_q = msg.get("ring_u"), msg.get("ring_q")
            ids = set((ring_u or []) + (ring_q or []))
            mapped = {i: self.slot_of(i) for i in ids}
            if any(v is None for v in mapped.values()):
                if final:
                    self.warnings.append(f"rev {msg['rev']}: ring ids {sorted(ids)} not all known")
                else:
                    keep.append((slot, msg))
                continue
            rev = msg["rev"]
            if ring_u is not None:
                want = sorted(mapped[i] for i in ring_u)
                for j, t in enumerate(msg["u"]):
                    if sorted(t["c"]) != want:
                        self.fail(
                            f"revision {rev}: tensor u{j} was reduced by slots {t['c']} but the "
                            f"master's ring was slots {want} (report of slot {slot})"
                        )
                self.counts["ring_checks"] += 1
            if ring_q is not None and self.revs.get(rev) and self.revs[rev].first_slot == slot:
                slots = tuple(sorted(mapped[i] for i in ring_q))
                k = len(slots)
                # Each of the k-1 reduce-scatter hops and the final owner
                # quantize a partial sum of range <= 2*k*A to 255 levels.
                bound = k * (2 * k * AMPLITUDE) / 255.0 + 1e-3
                for j, t in enumerate(msg["q"]):
                    exact = self.expected(KIND_Q, j, rev, slots)[np.asarray(t["idx"])]
                    err = np.abs(np.asarray(t["v"], dtype=np.float64) - exact)
                    if err.max() > bound or err.mean() > AMPLITUDE / 4:
                        self.fail(
                            f"QUANTIZED SUM OFF at revision {rev}, tensor q{j}: max error "
                            f"{err.max():.1f} (bound {bound:.1f}), mean {err.mean():.1f}, "
                            f"ring slots {slots}"
                        )
                self.counts["quant_checks"] += 1
        self.pending_ring_checks = keep

    def check_crashes(self) -> None:
        if self.master is not None and self.master.poll() is not None:
            self.fail(f"pccl-master exited with code {self.master.returncode}:\n"
                      + self.master_log())

    # -- the run -----------------------------------------------------------

    def run(self) -> int:
        a = self.a
        self.start_master()
        for _ in range(a.peers):
            self.spawn_peer(joiner=False)
        self.build_schedule()
        self.t_start = time.monotonic()
        self.last_progress = self.t_start
        self.bar = Progress(
            a.duration, enabled=not a.no_progress, interval=a.progress_interval
        )
        try:
            last_ring_check = 0.0
            while True:
                now = time.monotonic()
                elapsed = now - self.t_start
                if elapsed >= a.duration:
                    break
                try:
                    slot, wall, msg = self.events.get(timeout=0.05)
                    self.handle(slot, wall, msg)
                    for _ in range(500):  # drain what is there, boundedly
                        slot, wall, msg = self.events.get_nowait()
                        self.handle(slot, wall, msg)
                except queue.Empty:
                    pass
                self.check_crashes()
                self.tick_schedule(now)
                if now - last_ring_check > 1.0:
                    self.check_rings()
                    last_ring_check = now
                if now - self.last_progress > a.hang_timeout:
                    self.fail(self.hang_report())
                self.bar.update(elapsed, self.progress_text())
            self.finish()
        finally:
            self.bar.close(time.monotonic() - self.t_start, self.progress_text())
            self.bar = None
        return 0

    def progress_text(self) -> str:
        c = self.counts
        return (
            f"rev {self.max_rev} peers {len(self.running())} "
            f"K{c['kills']} S{c['stops']} J{c['joins']} C{c['cuts']} ab{c['aborted']}"
        )

    def hang_report(self) -> str:
        lines = [f"HANG: no new revision for {self.a.hang_timeout:g} s (newest {self.max_rev})"]
        for p in self.peers.values():
            if p.alive:
                lines.append(f"--- slot {p.slot} (stopped={p.stopped}) log tail:\n"
                             + p.log_tail(1500))
        lines.append("--- master log tail:\n" + self.master_log(1500))
        return "\n".join(lines)

    def finish(self) -> None:
        """Resume stopped peers, let the group take a few more steps, then
        ask every peer to exit (bounded), and check the schedule was met."""
        self.shutting_down = False
        for p in self.peers.values():
            if p.stopped and p.alive:
                p.proc.send_signal(signal.SIGCONT)
                p.stopped = False
                self.counts["conts"] += 1
        target = self.max_rev + 3
        deadline = time.monotonic() + self.a.hang_timeout
        while self.max_rev < target and time.monotonic() < deadline:
            try:
                self.handle(*self.events.get(timeout=0.1))
            except queue.Empty:
                self.check_crashes()
        if self.max_rev < target:
            self.fail(self.hang_report())
        self.shutting_down = True
        for p in self.running():
            p.exiting = True
            p.send({"cmd": "exit"})
        deadline = time.monotonic() + 20
        for p in self.peers.values():
            if p.killed:
                continue
            try:
                code = p.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                if code != 0:
                    self.warnings.append(f"slot {p.slot} exited with {code} when asked to exit")
            except subprocess.TimeoutExpired:
                self.warnings.append(f"slot {p.slot} did not exit within 20 s; killed")
        try:
            while True:
                self.handle(*self.events.get_nowait())
        except queue.Empty:
            pass
        self.check_rings(final=True)
        a, c = self.a, self.counts
        for name, got, want in (
            ("kills", c["kills"], a.min_kills),
            ("stops", c["stops"], a.min_stops),
            ("joins", c["joins"], a.min_joins),
            ("cuts", c["cuts"], a.min_cuts),
        ):
            if got < want:
                self.fail(f"SCHEDULE NOT MET: {got} {name} < --min-{name} {want}")
        if c["parity_checks"] == 0:
            self.fail("no parity check ran (no revision was reported by two peers)")

    def summary(self, ok: bool, reason: str | None) -> dict:
        worst = max(self.recoveries, default=(0.0, "-"))
        c = dict(self.counts)
        c.update(
            ok=ok,
            reason=reason,
            seed=self.a.seed,
            revisions=self.max_rev,
            duration=round(time.monotonic() - self.t_start, 1),
            worst_recovery_s=round(worst[0], 3),
            worst_recovery_fault=worst[1],
            unrecovered_faults=len(self.faults),
            peers_started=self.next_slot,
            warnings=self.warnings[:20],
            workdir=self.workdir,
        )
        return c


def print_summary(s: dict) -> None:
    rows = [
        ("result", "PASS" if s["ok"] else "FAIL"),
        ("seed", s["seed"]),
        ("duration (s)", s["duration"]),
        ("steps reported", s["steps"]),
        ("revisions", s["revisions"]),
        ("peers started", s["peers_started"]),
        ("kills", s["kills"]),
        ("stops (longer than heartbeat timeout)", f"{s['stops']} ({s['long_stops']})"),
        ("joins", s["joins"]),
        ("connection cuts", s["cuts"]),
        ("rejoins after eviction / cut", s["rejoins"]),
        ("aborted operations (steps retried or failed)", s["aborted"]),
        ("parity checks passed", s["parity_checks"]),
        ("exact sum checks passed", s["value_checks"]),
        ("ring = contributors checks", s["ring_checks"]),
        ("quantized error-bound checks", s["quant_checks"]),
        ("other peer errors", s["peer_errors"]),
        ("worst recovery time (s)", f"{s['worst_recovery_s']} ({s['worst_recovery_fault']})"),
    ]
    width = max(len(k) for k, _ in rows)
    print("=" * (width + 20))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("=" * (width + 20))
    if s["reason"]:
        print(f"FAILURE: {s['reason']}")
    for w in s["warnings"]:
        print(f"warning: {w}")
    print("STRESS-SUMMARY " + json.dumps(s, sort_keys=True), flush=True)


def _stop_seconds(text: str) -> tuple[float, float]:
    parts = [float(x) for x in text.split(",")]
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not 0 < parts[0] <= parts[1]:
        raise argparse.ArgumentTypeError("give SECONDS or LO,HI with 0 < LO <= HI")
    return parts[0], parts[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pccl.testing.stress",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("peers")
    g.add_argument("--peers", type=int, default=4, help="peers started at the beginning")
    g.add_argument("--min-peers", type=int, default=None,
                   help="never kill below this many running peers "
                   "(default: max(2, peers-2))%(default).0s")
    g.add_argument("--max-peers", type=int, default=None,
                   help="never start a newcomer above this many (default: peers+2)%(default).0s")
    g.add_argument("--max-slots", type=int, default=128,
                   help="most peer processes over the whole run (length of the one-hot tail)")
    g = p.add_argument_group("run")
    g.add_argument("--duration", type=float, default=60.0, help="seconds of faults and steps")
    g.add_argument("--seed", type=int, default=None, help="seed of the fault schedule and "
                   "of the contributions (default: random, printed)%(default).0s")
    g.add_argument("--tensor-elems", type=int, default=8192,
                   help="elements per reduced tensor (keep it small on a 2-core machine)")
    g.add_argument("--tensors", type=int, default=5,
                   help="tensors reduced per step (one all_reduce_many per kind)")
    g.add_argument("--quantize-share", type=float, default=0.4,
                   help="share of those tensors reduced with uint8 quantization (at least "
                   "one of each kind)")
    g.add_argument("--step-sleep", type=float, default=0.0,
                   help="pretend compute per step on each peer (seconds)")
    g = p.add_argument_group("faults (times are seeded; rates are per second of the fault "
                             "window, minimums are guaranteed)")
    g.add_argument("--kill-rate", type=float, default=0.0, help="SIGKILLs per second")
    g.add_argument("--stop-rate", type=float, default=0.0, help="SIGSTOPs per second")
    g.add_argument("--join-rate", type=float, default=0.0, help="newcomers per second")
    g.add_argument("--cut-rate", type=float, default=0.0,
                   help="master-connection cuts per second (the peer shuts its socket down)")
    g.add_argument("--min-kills", type=int, default=5, help="at least this many SIGKILLs")
    g.add_argument("--min-stops", type=int, default=2, help="at least this many SIGSTOPs")
    g.add_argument("--min-joins", type=int, default=5, help="at least this many newcomers")
    g.add_argument("--min-cuts", type=int, default=2, help="at least this many cuts")
    g.add_argument("--stop-seconds", type=_stop_seconds, default=None, metavar="LO[,HI]",
                   help="how long a SIGSTOP lasts before SIGCONT; stops alternate between "
                   "longer than --heartbeat-timeout (evicted, rejoin as newcomers) and "
                   "shorter (default: 0.3x,2x the heartbeat timeout)%(default).0s")
    g.add_argument("--warmup", type=float, default=3.0, help="seconds before the first fault")
    g.add_argument("--cooldown", type=float, default=6.0,
                   help="seconds without new faults at the end")
    g = p.add_argument_group("timeouts")
    g.add_argument("--heartbeat-timeout", type=float, default=2.0,
                   help="the master's heartbeat timeout (interval: a fifth of it)")
    g.add_argument("--vote-timeout", type=float, default=15.0, help="the master's vote timeout")
    g.add_argument("--progress-timeout", type=float, default=20.0,
                   help="peers' native progress timeout")
    g.add_argument("--hang-timeout", type=float, default=45.0,
                   help="fail when no new revision completes for this long")
    g = p.add_argument_group("output")
    g.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    g.add_argument("--progress-interval", type=float, default=5.0, metavar="SECONDS",
                   help="when stderr is not a terminal, print a one-line summary this often "
                   "instead of a progress bar")
    g.add_argument("-v", "--verbose", action="store_true", help="log every fault and event")
    g.add_argument("--peer-log-level", default="WARNING", help="peers' log level (their logs "
                   "are in the work directory, printed on failure)")
    g.add_argument("--keep-workdir", action="store_true", help="keep the logs after a pass")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.seed is None:
        a.seed = random.SystemRandom().randrange(2**31)
    if a.min_peers is None:
        a.min_peers = max(2, a.peers - 2)
    if a.max_peers is None:
        a.max_peers = a.peers + 2
    if a.stop_seconds is None:
        a.stop_seconds = (0.3 * a.heartbeat_timeout, 2.0 * a.heartbeat_timeout)
    if not 2 <= a.min_peers <= a.peers <= a.max_peers:
        parser.error("need 2 <= --min-peers <= --peers <= --max-peers")
    if a.tensors < 2 or not 0.0 <= a.quantize_share <= 1.0:
        parser.error("need --tensors >= 2 and 0 <= --quantize-share <= 1")
    a.quantized = min(a.tensors - 1, max(1, round(a.tensors * a.quantize_share)))
    a.unquantized = a.tensors - a.quantized
    if a.peers > a.max_slots:
        parser.error("--max-slots must be at least --peers")
    print(f"pccl stress: seed {a.seed}, {a.peers} peers ({a.min_peers}..{a.max_peers}), "
          f"{a.duration:g} s", flush=True)
    orch = Orchestrator(a)
    ok, reason, code = False, None, 1

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt  # clean up the children below

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        orch.run()
        ok, code = True, 0
    except StressFailure as exc:
        reason = str(exc)
    except KeyboardInterrupt:
        reason, code = "interrupted", 130
    finally:
        orch.shutting_down = True
        orch.cleanup()
    s = orch.summary(ok, reason)
    print_summary(s)
    if ok and not a.keep_workdir:
        shutil.rmtree(orch.workdir, ignore_errors=True)
    else:
        print(f"logs kept in {orch.workdir}")
    return code


if __name__ == "__main__":
    sys.exit(main())
