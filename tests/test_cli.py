"""The ``pccl`` console script, run as installed (a subprocess) against a
real ``pccl-master`` with real peers: ``pccl status`` (tables, --json,
--watch, errors) and ``pccl master``."""

from __future__ import annotations

import http.server
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pccl.testing.peer_worker import PeerRun, join_all
from pccl.testing.procs import Child, child_env

RUN_TIMEOUT = 30


def pccl_script() -> str:
    """The installed ``pccl`` script (beside this interpreter, else on PATH)."""
    beside = Path(sys.executable).with_name("pccl")
    if beside.exists():
        return str(beside)
    found = shutil.which("pccl")
    assert found, "the pccl console script is not installed"
    return found


def pccl(*args: str, cwd, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [pccl_script(), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env=child_env(), stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def live_run(tmp_path_factory):
    """A master with --status and three admitted peers."""
    workdir = tmp_path_factory.mktemp("cli-run")
    with PeerRun(str(workdir), extra=["--status", "127.0.0.1:0"]) as run:
        peers = [run.peer(i) for i in range(3)]
        ids = [r["peer_id"] for r in join_all(peers)]
        yield run, ids


def test_json_is_the_raw_status(live_run, tmp_path):
    run, ids = live_run
    result = pccl("status", run.master.status_address, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["listen"] == run.master.address
    assert sorted(p["peer_id"] for p in doc["peers"]) == sorted(ids)
    assert {p["state"] for p in doc["peers"]} == {"admitted"}
    (group,) = doc["groups"]
    assert sorted(group["ring"]) == sorted(ids)
    assert len(group["edges"]) == 3 and "rates" in doc and doc["pending"] == []


def test_tables_show_the_peers_and_the_ring(live_run, tmp_path):
    run, ids = live_run
    result = pccl("status", run.master.status_address, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    doc = json.loads(pccl("status", run.master.status_address, "--json", cwd=tmp_path).stdout)
    names = {p["peer_id"]: p.get("name") for p in doc["peers"]}

    def label(pid):  # how the table names a peer: "name (id)", or the bare id
        return f"{names[pid]} ({pid})" if names.get(pid) else pid

    ring = [label(pid) for pid in doc["groups"][0]["ring"]]
    for heading in ("groups (ring in send order)", "peers", "recent events", "collectives/s"):
        assert heading in out, out
    # The ring in send order, back to its first member.
    assert " -> ".join([*ring, ring[0]]) in out, out
    peer_rows = [ln for ln in out.splitlines() if "admitted" in ln and "127.0.0.1:" in ln]
    assert sorted(ln.split()[0] for ln in peer_rows) == sorted(names.get(i) or i for i in ids), out
    assert "\x1b[" not in out  # no colour codes into a pipe


class LineChild(Child):
    """A child whose stdout lines are kept, to wait on with a deadline."""

    def __init__(self, argv, workdir, label):
        self.lines: list[str] = []
        self.cond = threading.Condition()
        super().__init__(argv, str(workdir), label)

    def _on_line(self, line: str) -> None:
        with self.cond:
            self.lines.append(line.rstrip("\n"))
            self.cond.notify_all()

    def wait_until(self, predicate, timeout: float = RUN_TIMEOUT) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: predicate(self.lines), timeout=timeout), (
                self.lines[-20:], self.stderr_tail()
            )


def test_watch_refreshes_until_interrupted(live_run, tmp_path):
    run, ids = live_run
    argv = [pccl_script(), "status", run.master.status_address, "--watch", "--interval", "0.2"]
    with LineChild(argv, tmp_path, "pccl-watch") as w:
        # Three views, each headed by "pccl-master <listen address>".
        w.wait_until(lambda lines: sum(ln.startswith("pccl-master ") for ln in lines) >= 3)
        w.signal(signal.SIGINT)
        assert w.wait(RUN_TIMEOUT) == 0, w.stderr_tail()
        assert "Traceback" not in w.stderr_tail()
    text = "\n".join(w.lines)
    assert all(pid in text for pid in ids)


def test_watch_json_is_json_lines(live_run, tmp_path):
    run, ids = live_run
    argv = [pccl_script(), "status", run.master.status_address, "--watch", "--json",
            "--interval", "0.2"]
    with LineChild(argv, tmp_path, "pccl-watch-json") as w:
        w.wait_until(lambda lines: len(lines) >= 2)
        w.signal(signal.SIGINT)
        assert w.wait(RUN_TIMEOUT) == 0, w.stderr_tail()
        assert "Traceback" not in w.stderr_tail()
    docs = [json.loads(ln) for ln in w.lines]
    assert len(docs) >= 2
    assert all(sorted(p["peer_id"] for p in d["peers"]) == sorted(ids) for d in docs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_is_one_line_and_exit_1(tmp_path):
    result = pccl("status", f"127.0.0.1:{_free_port()}", "--timeout", "3", cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pccl status: cannot reach"), result.stderr
    assert result.stdout == ""


class _Garbage(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the handler's name
        body = b"<html>not a status</html>" if self.path == "/status" else b"{}"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _Silent(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.server.release.wait(30)  # never answers within the client's timeout

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("handler,needle", [(_Garbage, "did not answer JSON"),
                                            (_Silent, "within 1 s")])
def test_garbage_or_silence_is_one_line_and_exit_1(tmp_path, handler, needle):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.release = threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        result = pccl("status", f"127.0.0.1:{port}", "--timeout", "1", cwd=tmp_path)
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr


def test_bad_endpoint_is_a_usage_error(tmp_path):
    result = pccl("status", "no-port-here", cwd=tmp_path)
    assert result.returncode == 2 and "HOST:PORT" in result.stderr


@pytest.mark.parametrize(
    "args,needles",
    [
        ([], ["status", "master"]),
        (["status"], ["HOST:PORT", "--watch", "--json", "--interval", "--timeout"]),
        (["master"], ["--listen", "--status", "--heartbeat-timeout", "--secret-file"]),
    ],
)
def test_help_on_every_subcommand(tmp_path, args, needles):
    result = pccl(*args, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for needle in needles:
        assert needle in result.stdout, result.stdout


def test_pccl_master_is_pccl_master(tmp_path):
    argv = [pccl_script(), "master", "--listen", "127.0.0.1:0", "--status", "127.0.0.1:0"]
    prefix = "pccl-master status on "
    with LineChild(argv, tmp_path, "pccl-master") as master:
        master.wait_until(lambda lines: any(ln.startswith(prefix) for ln in lines))
        status = next(ln for ln in master.lines if ln.startswith(prefix)).split()[-1]
        result = pccl("status", status, "--json", cwd=tmp_path)
        assert result.returncode == 0 and json.loads(result.stdout)["peers"] == []
        master.signal(signal.SIGTERM)
        assert master.wait(RUN_TIMEOUT) == 0


def test_watch_on_a_terminal_is_live_and_ctrl_c_exits_cleanly(live_run, tmp_path):
    """On a terminal --watch redraws in place (rich Live); SIGINT (Ctrl-C)
    ends it with exit code 0 and no traceback."""
    import fcntl
    import os
    import pty
    import struct
    import termios
    import time

    run, ids = live_run
    master_fd, slave_fd = pty.openpty()
    fcntl.ioctl(slave_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 140, 0, 0))
    chunks: list[bytes] = []
    cond = threading.Condition()

    def pump() -> None:
        while True:
            try:
                data = os.read(master_fd, 65536)
            except OSError:  # EIO once the child closed the terminal
                return
            if not data:
                return
            with cond:
                chunks.append(data)
                cond.notify_all()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    proc = subprocess.Popen(
        [pccl_script(), "status", run.master.status_address, "--watch", "--interval", "0.2"],
        cwd=tmp_path, stdin=slave_fd, stdout=slave_fd, stderr=slave_fd, env=child_env(),
    )
    try:
        def seen() -> str:
            return b"".join(chunks).decode(errors="replace")

        with cond:
            # Redrawn in place: rich erases the previous lines (ESC [2K) each time.
            ok = cond.wait_for(
                lambda: all(pid in seen() for pid in ids) and seen().count("\x1b[2K") > 20,
                timeout=RUN_TIMEOUT,
            )
        assert ok, seen()[-3000:]
        proc.send_signal(signal.SIGINT)
        code = proc.wait(RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(slave_fd)
        deadline = time.monotonic() + 10
        reader.join(max(0.0, deadline - time.monotonic()))
        os.close(master_fd)
    out = b"".join(chunks).decode(errors="replace")
    assert code == 0, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
