"""A static ring of worker processes on 127.0.0.1, for tests.

:class:`RingCluster` starts one ``python -m pccl.testing.ring_worker``
process per rank (in a scratch directory), collects the addresses the workers bound
(port 0), sends every worker the full list, and waits until the ring is
up.  Every wait has a deadline; :meth:`RingCluster.close` (also on exit of
the ``with`` block) kills whatever is still running.

>>> with RingCluster(world=3, connections=4) as cluster:
...     replies = cluster.request({"cmd": "matrix"}, timeout=120)
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any

from .procs import ChildError, JsonChild, child_env

WorkerError = ChildError


class WorkerProcess(JsonChild):
    """One ring_worker child: JSON lines in on stdin, out on stdout."""

    split = False  # events and replies in one queue, in order

    def __init__(self, rank: int, args: Sequence[str], workdir: str):
        self.rank = rank
        # Many workers share few cores: torch's OpenMP threads would spin
        # between ops and starve the ring's I/O threads.
        super().__init__(
            [sys.executable, "-m", "pccl.testing.ring_worker", *args],
            workdir,
            f"rank{rank}",
            env=child_env(OMP_NUM_THREADS="1"),
        )

    def send(self, msg: dict) -> None:
        self.write_line(msg, str(msg.get("cmd")))

    def recv(self, timeout: float, what: str = "a reply") -> dict:
        """The next message; raises WorkerError on timeout, exit or error."""
        msg = self._get(self.replies, timeout, what)
        if msg.get("event") == "error":
            raise WorkerError(
                f"{self.label}: {msg['type']}: {msg['message']}\n{msg.get('traceback', '')}"
            )
        return msg

    def request_exit(self) -> None:
        """Ask the worker to exit (it does once its current command ends)."""
        if self.proc.poll() is None and not self.proc.stdin.closed:  # type: ignore[union-attr]
            try:
                self.send({"cmd": "exit"})
                self.proc.stdin.close()  # type: ignore[union-attr]
            except (WorkerError, OSError):
                pass

    def stop(self, deadline: float | None = None) -> None:
        """Wait for the exit until ``deadline`` (monotonic), then kill;
        always reaps the process and closes its pipes."""
        self.request_exit()
        if deadline is None:
            deadline = time.monotonic() + 5.0
        try:
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        self.kill()


class RingCluster:
    """``world`` worker processes forming one static ring.

    :meth:`reconfigure` turns the same processes into another ring (other
    world, K, slice size): starting a process (and importing torch) costs
    more than most tests.  Workers beyond the current world sit idle.
    """

    def __init__(self, world: int, **ring: Any):
        """``ring``: the other arguments of :meth:`reconfigure`."""
        self.world = 0
        self.workdir = tempfile.mkdtemp(prefix="pccl-ring-")
        self.workers: list[WorkerProcess] = []
        self.addresses: list[str] = []
        try:
            self.reconfigure(world, **ring)
        except BaseException:
            self.close()
            raise

    def reconfigure(
        self,
        world: int,
        connections: int = 4,
        slice_bytes: int | None = None,
        secret: str | None = None,
        progress_timeout: float | None = None,
        start_timeout: float = 60.0,
        connect_timeout: float = 30.0,
    ) -> None:
        """Close the current ring and build a new one over ranks
        0..world-1, starting processes as needed."""
        ring = {
            "world": world,
            "connections": connections,
            "slice_bytes": slice_bytes,
            "secret": secret,
            "progress_timeout": progress_timeout,
        }
        deadline = time.monotonic() + start_timeout
        reused = list(range(min(world, len(self.workers))))
        self.send({"cmd": "reset", **ring}, reused)
        self.send({"cmd": "idle"}, range(world, len(self.workers)))
        for rank in range(len(self.workers), world):
            args = ["--rank", str(rank), "--world", str(world), "--connections", str(connections)]
            if slice_bytes:
                args += ["--slice-bytes", str(slice_bytes)]
            if secret is not None:
                args += ["--secret", secret]
            if progress_timeout is not None:
                args += ["--progress-timeout", str(progress_timeout)]
            self.workers.append(WorkerProcess(rank, args, self.workdir))
        self.gather(
            max(0.1, deadline - time.monotonic()), range(world, len(self.workers)), what="idle"
        )
        hellos = self.gather(
            max(0.1, deadline - time.monotonic()), range(world), what="its address"
        )
        self.world = world
        self.addresses = [hellos[r]["address"] for r in range(world)]
        self.request(
            {"cmd": "connect", "addresses": self.addresses, "timeout": connect_timeout},
            timeout=connect_timeout + 10,
        )

    def __enter__(self) -> RingCluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def send(self, msg: dict, ranks: Iterable[int] | None = None) -> None:
        for r in self._ranks(ranks):
            self.workers[r].send(msg)

    def gather(
        self, timeout: float, ranks: Iterable[int] | None = None, what: str = "a reply"
    ) -> dict[int, dict]:
        """One message from each of ``ranks``, all within ``timeout``."""
        deadline = time.monotonic() + timeout
        return {
            r: self.workers[r].recv(max(0.1, deadline - time.monotonic()), what)
            for r in self._ranks(ranks)
        }

    def request(
        self, msg: dict, timeout: float, ranks: Iterable[int] | None = None
    ) -> dict[int, dict]:
        """Send ``msg`` to ``ranks`` (default: the ring) and gather the replies."""
        ranks = self._ranks(ranks)
        self.send(msg, ranks)
        return self.gather(timeout, ranks, what=f"reply to {msg['cmd']}")

    def kill(self, rank: int, sig: int = signal.SIGKILL) -> None:
        self.workers[rank].signal(sig)

    def _ranks(self, ranks: Iterable[int] | None) -> list[int]:
        return list(range(self.world)) if ranks is None else list(ranks)

    def close(self) -> None:
        """Stop every worker (killing those that do not exit) and remove
        the scratch directory.  Idempotent."""
        workers, self.workers = self.workers, []
        self.world = 0
        for w in workers:
            w.request_exit()
        deadline = time.monotonic() + 5.0
        for w in workers:
            w.stop(deadline)
        shutil.rmtree(self.workdir, ignore_errors=True)
