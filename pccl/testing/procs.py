"""Child processes for tests and benchmarks, every wait bounded.

* :class:`Lines` - the lines of a pipe, read by a thread, waited for with a
  deadline;
* :class:`Child` - a process started in a scratch directory (what it
  writes stays out of the checkout) whose stdout lines are handed to :meth:`Child._on_line` by a
  reader thread and whose stderr is kept for error messages; ``kill()``
  always reaps it;
* :class:`JsonChild` - a child driven by JSON lines (the workers of
  :mod:`pccl.testing.peer_worker`, :mod:`pccl.testing.state_worker` and
  :mod:`pccl.testing.ring_worker`);
* :class:`MasterProcess` - a real ``pccl-master``.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

LISTENING = re.compile(r"^pccl-master listening on (\S+)$")
STATUS = re.compile(r"^pccl-master status on (\S+)$")

EOF = object()
"""Put in a :class:`Child`'s queues when its stdout closes."""


class ChildError(RuntimeError):
    """A child died, did not answer in time or answered with an error."""


class Lines:
    """Lines (without their newline), appended by a reader, waited for
    with a deadline."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.closed = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    @classmethod
    def follow(cls, pipe, name: str) -> Lines:
        """The lines of ``pipe``, read by a daemon thread until EOF."""
        lines = cls()
        lines._thread = threading.Thread(target=lines._pump, args=(pipe,), daemon=True, name=name)
        lines._thread.start()
        return lines

    def _pump(self, pipe) -> None:
        try:
            for line in pipe:
                self.append(line)
        finally:
            self.close()

    def append(self, line: str) -> None:
        with self._cond:
            self.lines.append(line.rstrip("\n"))
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def wait_for(self, pattern: str | re.Pattern, timeout: float, start: int = 0) -> re.Match:
        """The first line at index >= start matching pattern (re.search)."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    match = regex.search(line)
                    if match:
                        return match
                start = len(self.lines)
                remaining = deadline - time.monotonic()
                if self.closed or remaining <= 0:
                    raise TimeoutError(
                        f"no line matching {regex.pattern!r} within {timeout:g} s; "
                        f"last lines: {self.lines[-5:]}"
                    )
                self._cond.wait(remaining)

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)


def child_env(**defaults: str) -> dict[str, str]:
    """This process's environment without ``PYTHONPATH`` (children import
    the installed pccl, the editable one of ``make install`` included, never
    a path the parent happened to have), plus ``defaults`` where unset."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    for key, value in defaults.items():
        env.setdefault(key, value)
    return env


class Child:
    """``argv`` started in ``workdir``; ``label`` names it in errors."""

    def __init__(
        self,
        argv: Sequence[str],
        workdir: str,
        label: str,
        *,
        stdin: bool = False,
        env: dict[str, str] | None = None,
    ):
        self.label = label
        self.proc = subprocess.Popen(
            list(argv),
            cwd=workdir,
            env=child_env() if env is None else env,
            text=True,
            bufsize=1,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.pid = self.proc.pid
        self.stderr = Lines.follow(self.proc.stderr, f"{label}-stderr")
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"{label}-reader")
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._on_line(line)
        self._on_eof()

    def _on_line(self, line: str) -> None:
        raise NotImplementedError

    def _on_eof(self) -> None:
        pass

    def started(self, fn, *args):
        """``fn(*args)``, killing this child if it raises (for constructors)."""
        try:
            return fn(*args)
        except BaseException:
            self.kill()
            raise

    def write_line(self, msg: dict, what: str) -> None:
        """``msg`` as one JSON line on the child's stdin."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except (OSError, ValueError) as exc:  # a dead child, or a closed pipe
            raise ChildError(
                f"{self.label}: cannot send {what}: {exc}\n" + self.stderr_tail()
            ) from None

    def _get(self, q: queue.Queue, timeout: float, what: str):
        """The next item of ``q``; ChildError on timeout or once stdout closed."""
        try:
            item = q.get(timeout=timeout)
        except queue.Empty:
            raise ChildError(
                f"{self.label}: no {what} within {timeout:g} s\n" + self.stderr_tail()
            ) from None
        if item is EOF:
            q.put(EOF)  # later calls fail fast too
            try:
                code = self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = None
            raise ChildError(
                f"{self.label}: exited (code {code}) before {what}\n" + self.stderr_tail()
            )
        return item

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stderr_tail(self, limit: int = 6000) -> str:
        if self.proc.poll() is not None:
            self.stderr.join(1.0)  # what it wrote before exiting
        text = "\n".join(self.stderr.lines)[-limit:]
        return f"--- {self.label} stderr ---\n{text}" if text else ""

    def log_mark(self) -> int:
        """The current end of stderr, to wait only for lines after it."""
        return len(self.stderr.lines)

    def wait_for_log(self, pattern: str, timeout: float = 10.0, start: int = 0) -> str:
        return self.stderr.wait_for(pattern, timeout, start).string

    def kill(self) -> None:
        """SIGKILL (also ends a stopped process), reap, close pipes.  Idempotent."""
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except OSError:
                pass
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
        self.stderr.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


class JsonChild(Child):
    """A child that writes one JSON object a line: those with an ``event``
    key go to ``events``, the others to ``replies`` (one queue for both
    where ``split`` is false)."""

    split = True

    def __init__(self, argv: Sequence[str], workdir: str, label: str, **kwargs) -> None:
        self.replies: queue.Queue = queue.Queue()
        self.events: queue.Queue = queue.Queue() if self.split else self.replies
        super().__init__(argv, workdir, label, stdin=True, **kwargs)

    def _on_line(self, line: str) -> None:
        try:
            msg = json.loads(line)
        except ValueError:
            msg = {"event": "garbage", "line": line}
        (self.events if "event" in msg else self.replies).put(msg)

    def _on_eof(self) -> None:
        self.replies.put(EOF)
        self.events.put(EOF)

    def wait_event(self, name: str, timeout: float, **match) -> dict:
        """The next ``name`` event whose fields equal ``match`` (earlier
        events, e.g. of previous commands, are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self._get(self.events, max(0.0, deadline - time.monotonic()), f"{name} event")
            if msg.get("event") == name and all(msg.get(k) == v for k, v in match.items()):
                return msg


class MasterProcess(Child):
    """``python -m pccl.master --listen 127.0.0.1:0 ...`` in ``workdir``,
    started by the constructor (also a context manager); ``address`` is
    what its stdout says it bound, ``status_address`` the same for
    ``--status``.  ``stdout`` and ``stderr`` are :class:`Lines`."""

    def __init__(
        self,
        workdir: str,
        *,
        heartbeat_timeout: float | None = None,
        heartbeat_interval: float | None = None,
        vote_timeout: float | None = None,
        extra: Sequence[str] = (),
        start_timeout: float = 30.0,
    ):
        args = [] if "--listen" in extra else ["--listen", "127.0.0.1:0"]
        for flag, value in (
            ("--heartbeat-timeout", heartbeat_timeout),
            ("--heartbeat-interval", heartbeat_interval),
            ("--vote-timeout", vote_timeout),
        ):
            if value is not None:
                args += [flag, str(value)]
        self.args = [*args, *extra]
        self.stdout = Lines()
        self.status_address: str | None = None
        super().__init__(
            [sys.executable, "-m", "pccl.master", *self.args],
            workdir,
            "master",
            env=child_env(PYTHONUNBUFFERED="1"),
        )
        self.address: str = self.started(self._wait_line, LISTENING, start_timeout)
        if "--status" in self.args:
            self.status_address = self.started(self._wait_line, STATUS, start_timeout)

    def _on_line(self, line: str) -> None:
        self.stdout.append(line)

    def _on_eof(self) -> None:
        self.stdout.close()

    def _wait_line(self, regex: re.Pattern, timeout: float) -> str:
        try:
            return self.stdout.wait_for(regex, timeout).group(1)
        except TimeoutError as exc:
            raise ChildError(f"master: {exc}\n" + self.stderr_tail()) from None
