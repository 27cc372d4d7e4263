"""A static ring of worker processes on 127.0.0.1, for tests.

:class:`RingCluster` starts one ``python -m pccl.testing.ring_worker``
process per rank (in a scratch directory, so a source checkout cannot
shadow the installed package), collects the addresses the workers bound
(port 0), sends every worker the full list, and waits until the ring is
up.  Every wait has a deadline; :meth:`RingCluster.close` (also on exit of
the ``with`` block) kills whatever is still running.

>>> with RingCluster(world=3, connections=4) as cluster:
...     replies = cluster.request({"cmd": "matrix"}, timeout=120)
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

_EOF = object()


class WorkerError(RuntimeError):
    """A worker died, timed out or answered with an error."""


class WorkerProcess:
    """One ring_worker child: JSON lines in on stdin, out on stdout."""

    def __init__(self, rank: int, args: Sequence[str], workdir: str):
        self.rank = rank
        self.stderr_path = os.path.join(workdir, f"rank{rank}.stderr")
        self._stderr = open(self.stderr_path, "wb")
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # the installed package, not a checkout
        # Many workers share few cores: torch's OpenMP threads would spin
        # between ops and starve the ring's I/O threads.
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pccl.testing.ring_worker", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=workdir,
            env=env,
            text=True,
            bufsize=1,
        )
        self.pid = self.proc.pid
        self._messages: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"rank{rank}-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self._messages.put(json.loads(line))
            except ValueError:
                self._messages.put({"event": "garbage", "line": line})
        self._messages.put(_EOF)

    def send(self, msg: dict) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except (OSError, ValueError) as e:  # a dead worker, or a closed pipe
            raise WorkerError(
                f"rank {self.rank}: cannot send {msg.get('cmd')}: {e}\n" + self.stderr_tail()
            ) from None

    def recv(self, timeout: float, what: str = "a reply") -> dict:
        """The next message; raises WorkerError on timeout, exit or error."""
        try:
            msg = self._messages.get(timeout=timeout)
        except queue.Empty:
            raise WorkerError(
                f"rank {self.rank}: no {what} within {timeout} s\n" + self.stderr_tail()
            ) from None
        if msg is _EOF:
            self._messages.put(_EOF)  # later calls fail fast too
            try:
                code = self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = None
            raise WorkerError(
                f"rank {self.rank}: exited (code {code}) before {what}\n" + self.stderr_tail()
            )
        if msg.get("event") == "error":
            raise WorkerError(
                f"rank {self.rank}: {msg['type']}: {msg['message']}\n{msg.get('traceback', '')}"
            )
        return msg

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def stderr_tail(self, limit: int = 4000) -> str:
        try:
            self._stderr.flush()
            with open(self.stderr_path, "rb") as f:
                data = f.read()
        except OSError:
            return ""
        text = data[-limit:].decode(errors="replace")
        return f"--- rank {self.rank} stderr ---\n{text}" if text else ""

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
            self.proc.kill()  # also ends a SIGSTOPped process
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - a kernel problem
                pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        self._reader.join(timeout=5)
        self._stderr.close()


class RingCluster:
    """``world`` worker processes forming one static ring.

    :meth:`reconfigure` turns the same processes into another ring (other
    world, K, slice size): starting a process (and importing torch) costs
    more than most tests.  Workers beyond the current world sit idle.
    """

    def __init__(
        self,
        world: int,
        connections: int = 4,
        slice_bytes: int | None = None,
        secret: str | None = None,
        progress_timeout: float | None = None,
        start_timeout: float = 60.0,
        connect_timeout: float = 30.0,
    ):
        self.world = 0
        self.workdir = tempfile.mkdtemp(prefix="pccl-ring-")
        self.workers: list[WorkerProcess] = []
        self.addresses: list[str] = []
        try:
            self.reconfigure(
                world,
                connections,
                slice_bytes,
                secret,
                progress_timeout,
                start_timeout=start_timeout,
                connect_timeout=connect_timeout,
            )
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
