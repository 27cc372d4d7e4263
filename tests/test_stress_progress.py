"""The stress tool's progress: plain summary lines when its output is a
pipe (no carriage-return frames), the tqdm bar on a terminal."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import tempfile
import termios
import threading

import pytest

RUN_TIMEOUT = 90  # a 3 s run plus start-up and shutdown on a busy 2-core box

SHORT_RUN = [
    sys.executable, "-m", "pccl.testing.stress",
    "--duration", "3", "--peers", "2", "--warmup", "1", "--cooldown", "1",
    "--min-kills", "0", "--min-stops", "0", "--min-joins", "0", "--min-cuts", "0",
    "--tensor-elems", "1024", "--progress-interval", "1", "--seed", "7",
]
LINE = re.compile(r"^progress +\d+/3 s( done)?  rev \d+ peers \d+ K\d+ S\d+ J\d+ C\d+ ab\d+$")


def _summary(stdout: str) -> dict:
    for line in reversed(stdout.splitlines()):
        if line.startswith("STRESS-SUMMARY "):
            return json.loads(line[len("STRESS-SUMMARY "):])
    raise AssertionError(f"no STRESS-SUMMARY line:\n{stdout[-3000:]}")


def _env() -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    return env


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_progress_off_a_terminal_is_summary_lines():
    with tempfile.TemporaryDirectory(prefix="pccl-stress-progress-") as cwd:
        proc = subprocess.run(
            SHORT_RUN, cwd=cwd, capture_output=True, env=_env(), timeout=RUN_TIMEOUT
        )
    out, err = proc.stdout.decode(), proc.stderr.decode()
    report = f"\n--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-3000:]}"
    assert proc.returncode == 0, report
    assert _summary(out)["ok"], report
    assert b"\r" not in proc.stdout and b"\r" not in proc.stderr, report
    lines = [ln for ln in err.splitlines() if ln.startswith("progress")]
    assert all(LINE.match(ln) for ln in lines), report
    # Every ~1 s of a 3 s run, plus the closing line.
    assert len(lines) >= 2, report
    assert lines[-1].startswith("progress     3/3 s done"), report


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_progress_on_a_terminal_is_the_bar():
    master_fd, slave_fd = pty.openpty()
    # A terminal with no size gets no bar from tqdm: give it 120 columns.
    fcntl.ioctl(slave_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    chunks: list[bytes] = []

    def pump() -> None:
        while True:
            try:
                data = os.read(master_fd, 65536)
            except OSError:  # EIO once the last writer closed the slave
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        with tempfile.TemporaryDirectory(prefix="pccl-stress-progress-") as cwd:
            proc = subprocess.run(
                SHORT_RUN, cwd=cwd, stdout=subprocess.PIPE, stderr=slave_fd,
                stdin=subprocess.DEVNULL, env=_env(), timeout=RUN_TIMEOUT,
            )
    finally:
        os.close(slave_fd)
        reader.join(10)
        os.close(master_fd)
    tty = b"".join(chunks).decode(errors="replace")
    report = f"\n--- stdout ---\n{proc.stdout.decode()[-3000:]}\n--- tty ---\n{tty[-3000:]}"
    assert proc.returncode == 0, report
    # tqdm redraws its bar in place: "\r" followed by the bar, many times.
    frames = re.findall(r"\r *\d+%\|[^\r]*\| \d+/3 s[^\r]*rev \d+ peers", tty)
    assert len(frames) >= 2, report
    assert not any(LINE.match(ln.strip()) for ln in tty.splitlines()), report
