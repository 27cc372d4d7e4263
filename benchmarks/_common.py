"""Shared helpers for pccl's benchmarks.

* :class:`WorkerGroup` starts ``world`` worker processes (multiprocessing
  ``spawn``), runs the address rendezvous through the parent, and drives
  them with commands over pipes.  Every wait is bounded; the workers die
  with the parent (``PR_SET_PDEATHSIG`` plus a watchdog thread) and
  :func:`kill_all_workers` runs at exit and on SIGTERM.
* :func:`measure` times one collective on a group: warm-up, then the median
  of timed samples, each started together after a barrier (the parent only
  releases a sample once every rank reported the previous one).
* :class:`PeakMemory` reads the peak RSS of a worker over a window
  (``/proc/self/clear_refs`` resets the high-water mark, ``VmHWM`` reads
  it; without that, ``ru_maxrss`` deltas).
* :func:`print_table` renders a table with ``rich`` (plain text when
  ``rich`` is not installed); :func:`write_json` stores the numbers.

A worker class is instantiated in the child as ``cls(rank, world,
options)`` and must provide ``info() -> dict`` (sent to every rank by the
rendezvous), ``connect(infos)``, ``alloc(nbytes)``, ``verify() -> str |
None``, ``run(n)`` (``n`` back-to-back operations on the current buffer),
``free()`` and ``close()``.
"""

from __future__ import annotations

import atexit
import gc
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import signal
import socket
import statistics
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import wait as mp_wait
from pathlib import Path
from typing import Any

CTX = mp.get_context("spawn")
OUT_DIR = Path(__file__).resolve().parent / "out"

KIB = 1024
MIB = 1024 * 1024


# --------------------------------------------------------------------------
# Small utilities.


def parse_size(text: str) -> int:
    """``"64K"``, ``"1M"``, ``"1MiB"``, ``"4096"`` -> bytes (binary units)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": KIB, "M": MIB, "G": 1024 * MIB}.get(t[-1:], 1)
    if mult != 1:
        t = t[:-1]
    return int(float(t) * mult)


def fmt_size(nbytes: int) -> str:
    for unit, mult in (("GiB", 1024 * MIB), ("MiB", MIB), ("KiB", KIB)):
        if nbytes >= mult and nbytes % mult == 0:
            return f"{nbytes // mult} {unit}"
    return f"{nbytes} B"


def parse_list(text: str, conv=int) -> list:
    return [conv(p) for p in text.split(",") if p.strip()]


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bind port 0, read it, close).

    Racy by nature; only for libraries that insist on a number.  Prefer
    letting the listener bind port 0 itself and publishing the address."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def now() -> float:
    """A clock shared by every process on the machine (CLOCK_MONOTONIC)."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def bus_bandwidth(nbytes: int, world: int, seconds: float) -> float:
    """Ring all-reduce bus bandwidth in GB/s: 2(n-1)/n * bytes / time."""
    if seconds <= 0 or world < 2:
        return 0.0
    return 2 * (world - 1) / world * nbytes / seconds / 1e9


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    for key in ("net/core/rmem_max", "net/core/wmem_max", "net/ipv4/tcp_rmem", "net/ipv4/tcp_wmem"):
        try:
            info[key.replace("/", ".")] = Path("/proc/sys", key).read_text().split()
        except OSError:
            pass
    return info


def machine_cpu_seconds() -> tuple[float, float] | None:
    """(busy, total) CPU-seconds of the whole machine since boot."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)   # idle + iowait
    total = sum(fields[:8])                                     # without guest time
    return (total - idle) / hz, total / hz


def _own_cpu_seconds() -> float:
    """CPU-seconds of this process and of every child it has reaped."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


class ForeignLoad:
    """How much CPU other processes used while we measured: the machine's
    busy time minus ours (this process and its reaped workers).  Benchmarks
    on a shared machine are only as good as this number is small."""

    def __init__(self) -> None:
        self.start_machine = machine_cpu_seconds()
        self.start_own = _own_cpu_seconds()

    def report(self) -> dict[str, float]:
        end = machine_cpu_seconds()
        if self.start_machine is None or end is None:
            return {}
        busy = end[0] - self.start_machine[0]
        capacity = end[1] - self.start_machine[1]
        own = _own_cpu_seconds() - self.start_own
        foreign = max(0.0, busy - own)
        return {
            "machine_busy_cpu_s": busy,
            "machine_capacity_cpu_s": capacity,
            "own_cpu_s": own,
            "foreign_cpu_s": foreign,
            "foreign_share": foreign / capacity if capacity > 0 else 0.0,
        }


def wait_for_quiet(max_wait_s: float, busy_below: float = 0.15, window_s: float = 2.0,
                   log=None) -> float:
    """Wait (at most ``max_wait_s``) until the machine's CPUs are less than
    ``busy_below`` busy over ``window_s``; returns the last busy fraction."""
    deadline = time.monotonic() + max_wait_s
    frac = 1.0
    while True:
        a = machine_cpu_seconds()
        time.sleep(window_s)
        b = machine_cpu_seconds()
        if a is None or b is None:
            return 0.0
        frac = (b[0] - a[0]) / max(b[1] - a[1], 1e-9)
        if frac < busy_below or time.monotonic() >= deadline:
            return frac
        if log:
            log(f"machine is {frac:.0%} busy; waiting for it to calm down "
                f"({deadline - time.monotonic():.0f} s left)")


# --------------------------------------------------------------------------
# Peak memory of the current process.


def _status_bytes(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _ru_maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Extra resident memory over a window: peak RSS in the window minus the
    RSS at its start.  Start the window after the tensor is allocated and
    touched, so the result is what the operation itself added."""

    def __init__(self) -> None:
        self.baseline = 0
        self.method = "none"

    def start(self) -> None:
        try:
            # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            rss = _status_bytes("VmRSS")
            if rss is not None and _status_bytes("VmHWM") is not None:
                self.baseline, self.method = rss, "VmHWM"
                return
        except OSError:
            pass
        # ru_maxrss cannot be reset: a later window only shows new peaks.
        self.baseline, self.method = _ru_maxrss_bytes(), "ru_maxrss"

    def extra(self) -> int:
        if self.method == "VmHWM":
            peak = _status_bytes("VmHWM") or 0
        elif self.method == "ru_maxrss":
            peak = _ru_maxrss_bytes()
        else:
            return 0
        return max(0, peak - self.baseline)


# --------------------------------------------------------------------------
# Worker processes.


class BenchmarkError(RuntimeError):
    """A worker failed, died or did not answer in time."""


_LIVE: set[Any] = set()
_LIVE_LOCK = threading.Lock()


def kill_all_workers() -> None:
    """SIGKILL every worker process still alive (idempotent)."""
    with _LIVE_LOCK:
        procs = list(_LIVE)
        _LIVE.clear()
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=2)


def install_cleanup() -> None:
    """Kill the workers at exit and turn SIGTERM/SIGHUP into a clean exit."""
    atexit.register(kill_all_workers)

    def on_signal(signum, _frame):
        kill_all_workers()
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)


def _die_with_parent(parent_pid: int) -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watchdog() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(3)

    threading.Thread(target=watchdog, name="parent-watchdog", daemon=True).start()


def slice_kwargs(options: dict) -> dict:
    """``slice_bytes=`` for a pccl StaticRing when a worker's options set
    ``slice`` (a benchmark's ``--slice-bytes``), else nothing."""
    return {"slice_bytes": int(options["slice"])} if options.get("slice") else {}


def pin_cpus() -> list[int]:
    """The CPUs ranks are pinned to, in order (rank r on cpus[r % n])."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return []


def _worker_main(conn, rank: int, world: int, worker_cls, options: dict, parent_pid: int,
                 cpu: int | None = None):
    # Ctrl-C reaches the whole process group: the parent handles it and
    # kills the workers, so a worker never dies half-way through a reply.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    if cpu is not None:
        # Before the library starts any thread: they all inherit it.
        os.sched_setaffinity(0, {cpu})
    worker = None
    mem = PeakMemory()
    idle_rss = rss_before_alloc = 0
    try:
        worker = worker_cls(rank, world, options)
        conn.send(("ok", worker.info()))
        while True:
            cmd, *args = conn.recv()
            try:
                if cmd == "exit":
                    break
                if cmd == "connect":
                    result = worker.connect(*args)
                    idle_rss = _status_bytes("VmRSS") or 0
                elif cmd == "alloc":
                    # The window opens once the tensor is resident, and
                    # before the first operation (the check), so buffers a
                    # library allocates on first use count as extra.
                    rss_before_alloc = _status_bytes("VmRSS") or 0
                    worker.alloc(*args)
                    mem.start()
                    result = worker.verify()
                elif cmd == "run":
                    t0 = now()
                    worker.run(*args)
                    result = (t0, now())
                elif cmd == "mem":
                    result = {"extra": mem.extra(), "method": mem.method,
                              "rss": _status_bytes("VmRSS") or 0, "idle_rss": idle_rss}
                elif cmd == "free":
                    worker.free()
                    gc.collect()
                    # What the library keeps after the tensor is gone
                    # (caches, pools): resident now minus before the alloc.
                    result = {"retained": (_status_bytes("VmRSS") or 0) - rss_before_alloc}
                else:
                    raise ValueError(f"unknown command {cmd!r}")
            except Exception:
                conn.send(("error", f"rank {rank}: {traceback.format_exc()}"))
                continue
            conn.send(("ok", result))
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        pass
    except Exception:
        try:
            conn.send(("error", f"rank {rank}: {traceback.format_exc()}"))
        except OSError:
            pass
    finally:
        if worker is not None:
            try:
                worker.close()
            except Exception:
                pass
        conn.close()


class WorkerGroup:
    """``world`` worker processes of one kind, connected into a ring/mesh.

    >>> with WorkerGroup(MyWorker, 4, {"k": 4}) as g:
    ...     g.call("alloc", 1 << 20)
    ...     spans = g.call("run", 10)
    """

    def __init__(self, worker_cls, world: int, options: dict | None = None,
                 name: str = "", start_timeout: float = 120.0, pin: bool = False):
        self.world = world
        cpus = pin_cpus() if pin else []
        self.name = name or worker_cls.__name__
        self.conns = []
        self.procs = []
        self._closed = False
        try:
            for rank in range(world):
                parent_end, child_end = CTX.Pipe(duplex=True)
                p = CTX.Process(
                    target=_worker_main,
                    args=(child_end, rank, world, worker_cls, dict(options or {}), os.getpid(),
                          cpus[rank % len(cpus)] if cpus else None),
                    name=f"{self.name}-r{rank}",
                    daemon=True,
                )
                p.start()
                child_end.close()
                with _LIVE_LOCK:
                    _LIVE.add(p)
                self.conns.append(parent_end)
                self.procs.append(p)
            self.infos = self._gather(start_timeout, "start")
            self.call("connect", self.infos, timeout=start_timeout)
        except BaseException:
            self.close()
            raise

    def _gather(self, timeout: float, what: str) -> list:
        deadline = time.monotonic() + timeout
        replies: dict[int, Any] = {}
        errors: list[str] = []
        by_conn = {c: i for i, c in enumerate(self.conns)}
        by_sentinel = {p.sentinel: i for i, p in enumerate(self.procs)}
        while len(replies) + len(errors) < self.world:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = [i for i in range(self.world) if i not in replies]
                raise BenchmarkError(f"{self.name}: {what}: ranks {missing} did not answer "
                                     f"within {timeout:.0f} s")
            pending = [c for c, i in by_conn.items() if i not in replies]
            ready = mp_wait(pending + list(by_sentinel), timeout=remaining)
            for obj in ready:
                if obj in by_conn:
                    i = by_conn[obj]
                    try:
                        status, payload = obj.recv()
                    except EOFError:
                        status, payload = "error", f"rank {i}: pipe closed"
                    if status == "ok":
                        replies[i] = payload
                    else:
                        errors.append(payload)
                        replies[i] = None
                else:
                    i = by_sentinel.pop(obj)
                    if i not in replies or replies[i] is None:
                        code = self.procs[i].exitcode
                        errors.append(f"rank {i}: process exited with code {code}")
            if errors:
                raise BenchmarkError(f"{self.name}: {what} failed:\n" + "\n".join(errors))
        return [replies[i] for i in range(self.world)]

    def call(self, *cmd, timeout: float = 60.0) -> list:
        """Send ``cmd`` to every rank; the list of their results, by rank."""
        if self._closed:
            raise BenchmarkError(f"{self.name}: group is closed")
        for c in self.conns:
            c.send(cmd)
        return self._gather(timeout, str(cmd[0]))

    def close(self) -> None:
        """Ask the workers to exit, then kill whatever is left.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        for c in self.conns:
            try:
                c.send(("exit",))
            except OSError:
                pass
        deadline = time.monotonic() + 5.0
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=2)
            with _LIVE_LOCK:
                _LIVE.discard(p)
        for c in self.conns:
            c.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------
# Timing.


@dataclass
class TimingPolicy:
    warmup: int = 3            # warm-up operations (fewer for slow sizes)
    iters: int = 20            # timed samples at most
    min_iters: int = 5         # timed samples at least
    target_sample_s: float = 0.02   # batch fast ops so one sample lasts this long
    budget_s: float = 4.0      # aim for this much timed work per measurement
    max_batch: int = 2000


@dataclass
class Measurement:
    nbytes: int
    world: int
    median_s: float = 0.0
    min_s: float = 0.0
    max_s: float = 0.0
    samples_s: list[float] = field(default_factory=list)
    batch: int = 1
    extra_mem: list[int] = field(default_factory=list)
    idle_rss: list[int] = field(default_factory=list)
    retained: list[int] = field(default_factory=list)
    mem_method: str = ""
    error: str | None = None

    @property
    def busbw(self) -> float:
        return bus_bandwidth(self.nbytes, self.world, self.median_s)

    def as_dict(self) -> dict[str, Any]:
        return {
            "bytes": self.nbytes,
            "world": self.world,
            "median_s": self.median_s,
            "min_s": self.min_s,
            "max_s": self.max_s,
            "busbw_GBps": self.busbw,
            "busbw_best_GBps": bus_bandwidth(self.nbytes, self.world, self.min_s),
            "batch": self.batch,
            "samples_s": self.samples_s,
            "extra_mem_bytes_per_rank": self.extra_mem,
            "extra_mem_max_MiB": max(self.extra_mem, default=0) / MIB,
            "extra_mem_over_tensor": max(self.extra_mem, default=0) / self.nbytes,
            "idle_rss_bytes_per_rank": self.idle_rss,
            "retained_after_free_bytes_per_rank": self.retained,
            "mem_method": self.mem_method,
            "error": self.error,
        }


def _span(results: list) -> float:
    """From the first rank starting to the last rank finishing."""
    return max(t1 for _, t1 in results) - min(t0 for t0, _ in results)


class _Timing:
    """One group's measurement of one size, carried out over several rounds."""

    def __init__(self, group: WorkerGroup, nbytes: int, policy: TimingPolicy, timeout: float):
        self.group = group
        self.policy = policy
        self.timeout = timeout
        self.m = Measurement(nbytes=nbytes, world=group.world)
        self.batch = 0
        self.n = 0
        self.extra = [0] * group.world
        self.retained = [0] * group.world

    def round(self, index: int, rounds: int) -> None:
        """Allocate, check, warm up, take this round's share of the
        samples, read the memory, free."""
        g, p, t = self.group, self.policy, self.timeout
        verdicts = g.call("alloc", self.m.nbytes, timeout=t)
        bad = [v for v in verdicts if v]
        if bad:
            raise BenchmarkError(f"{g.name}: wrong result at {fmt_size(self.m.nbytes)}: {bad[0]}")
        est = _span(g.call("run", 1, timeout=t))
        if index == 0:
            for _ in range(p.warmup - 1):
                if est * p.warmup > p.budget_s:
                    break
                est = _span(g.call("run", 1, timeout=t))
            self.batch = max(1, min(p.max_batch, math.ceil(p.target_sample_s / max(est, 1e-7))))
            n = int(p.budget_s / max(est * self.batch, 1e-7))
            self.n = max(p.min_iters, min(p.iters, n))
            self.est = est
        share = self.n * (index + 1) // rounds - self.n * index // rounds
        run_timeout = max(t, 30 * self.est * self.batch)
        for _ in range(share):
            span = _span(g.call("run", self.batch, timeout=run_timeout))
            self.m.samples_s.append(span / self.batch)
        mem = g.call("mem", timeout=t)
        freed = g.call("free", timeout=t)
        self.extra = [max(a, r["extra"]) for a, r in zip(self.extra, mem, strict=True)]
        self.retained = [max(a, r["retained"]) for a, r in zip(self.retained, freed, strict=True)]
        self.m.idle_rss = [r["idle_rss"] for r in mem]
        self.m.mem_method = mem[0]["method"]

    def result(self) -> Measurement:
        m = self.m
        m.batch = self.batch
        m.median_s = statistics.median(m.samples_s)
        m.min_s = min(m.samples_s)
        m.max_s = max(m.samples_s)
        m.extra_mem = self.extra
        m.retained = self.retained
        return m


def measure_interleaved(groups: list[WorkerGroup], nbytes: int, policy: TimingPolicy,
                        rounds: int = 3, timeout: float = 120.0,
                        ) -> list[Measurement | BenchmarkError]:
    """Time one collective of ``nbytes`` on each group, fairly.

    Each group's samples are split over ``rounds`` rounds, and every round
    visits every group in turn (allocating its tensor, checking the result,
    one warm-up operation, its share of samples, freeing), so a change in
    the machine's load during the measurement hits all groups alike and the
    ratios between them stay honest on a shared machine.

    One sample: the parent waits until every rank finished the previous one
    (a barrier), releases all ranks, each runs ``batch`` back-to-back
    operations; sample time = (last end - first start) / batch on the
    shared monotonic clock.  A result is the median over samples; the extra
    memory is the highest peak over the rounds.

    A group that fails gets its :class:`BenchmarkError` in its place and is
    out of step (some ranks may still be inside the collective): the caller
    closes it rather than trying to go on.
    """
    timings: list[_Timing | BenchmarkError] = [
        _Timing(g, nbytes, policy, timeout) for g in groups]
    for index in range(rounds):
        for i, tm in enumerate(timings):
            if isinstance(tm, BenchmarkError):
                continue
            try:
                tm.round(index, rounds)
            except BenchmarkError as e:
                timings[i] = e
    return [tm if isinstance(tm, BenchmarkError) else tm.result() for tm in timings]


def measure(group: WorkerGroup, nbytes: int, policy: TimingPolicy,
            timeout: float = 120.0) -> Measurement:
    """:func:`measure_interleaved` for one group in one round; raises
    :class:`BenchmarkError` on failure."""
    (m,) = measure_interleaved([group], nbytes, policy, rounds=1, timeout=timeout)
    if isinstance(m, BenchmarkError):
        raise m
    return m


# --------------------------------------------------------------------------
# Output.


def print_table(title: str, columns: list[str], rows: list[list[str]],
                styles: list[list[str | None]] | None = None, caption: str = "") -> None:
    """A table on stdout: ``rich`` when available, aligned text otherwise.
    ``styles`` (same shape as ``rows``) colours cells under rich."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
                  for i, c in enumerate(columns)]
        print(title)
        print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
        for r in rows:
            print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))
        if caption:
            print(caption)
        return
    table = Table(title=title, caption=caption, caption_justify="left")
    for c in columns:
        table.add_column(c, justify="right", no_wrap=True)
    for i, r in enumerate(rows):
        cells = []
        for j, v in enumerate(r):
            style = styles[i][j] if styles else None
            cells.append(f"[{style}]{v}[/{style}]" if style and v else v)
        table.add_row(*cells)
    # Not a terminal (a log file, a pipe): wide enough for every column.
    width = _terminal_width() or 200
    Console(width=width).print(table)


def _terminal_width() -> int:
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns
    except OSError:
        return 0


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path
