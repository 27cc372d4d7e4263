"""Plain TCP traffic between testbed hosts, to measure what a link gives.

Run inside a namespace (``Testbed.python(node, "pccl.testing.netns.traffic", ...)``):

* ``recv --bind ADDR --conns K [--timeout T]`` listens on port 0, prints
  ``{"port": P}``, receives K connections to EOF concurrently and prints
  one JSON line: per connection the bytes and the times of the first and
  last byte, plus the process's CPU seconds and wall seconds;
* ``send --to ADDR --port P --bytes N [--conns K] [--sports LO-HI | a,b,..]
  [--src ADDR] [--timeout T]`` opens K connections (each bound to the next
  source port of the list or range, if given), sends N bytes on each and
  prints the same kind of line; ``--targets A:P,B:Q,..`` instead opens one
  connection to each target (all at once).

:func:`tcp_transfer` drives both from the test process, every wait
bounded, and returns a :class:`Transfer`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

MODULE = "pccl.testing.netns.traffic"
_CHUNK = 1 << 20


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _parse_ports(spec: str | None) -> list[int] | None:
    if not spec:
        return None
    if "-" in spec:
        lo, hi = (int(x) for x in spec.split("-", 1))
        return list(range(lo, hi + 1))
    return [int(x) for x in spec.split(",")]


def _recv_main(a: argparse.Namespace) -> int:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((a.bind, 0))
    srv.listen(max(a.conns, 8))
    srv.settimeout(a.timeout)
    print(json.dumps({"port": srv.getsockname()[1]}), flush=True)
    t0, c0 = time.monotonic(), _cpu()
    deadline = t0 + a.timeout
    results: list[dict] = []
    lock = threading.Lock()

    def serve(conn: socket.socket, peer) -> None:
        n, first, last = 0, None, None
        buf = bytearray(_CHUNK)
        conn.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            while True:
                k = conn.recv_into(buf)
                if not k:
                    break
                now = time.monotonic()
                if first is None:
                    first = now
                last = now
                n += k
        except OSError as e:
            err = str(e)
        else:
            err = None
        finally:
            conn.close()
        with lock:
            results.append({"peer": f"{peer[0]}:{peer[1]}", "bytes": n, "first": first,
                            "last": last, "error": err})

    threads = []
    try:
        for _ in range(a.conns):
            conn, peer = srv.accept()
            th = threading.Thread(target=serve, args=(conn, peer), daemon=True)
            th.start()
            threads.append(th)
    except OSError as e:
        print(json.dumps({"error": f"accept: {e}"}), flush=True)
        return 1
    for th in threads:
        th.join(max(0.0, deadline - time.monotonic()) + 1)
    print(json.dumps({"conns": results, "cpu": _cpu() - c0, "wall": time.monotonic() - t0}),
          flush=True)
    return 0


def _send_main(a: argparse.Namespace) -> int:
    ports = _parse_ports(a.sports)
    if ports is not None and len(ports) < a.conns:
        print(json.dumps({"error": "fewer source ports than connections"}), flush=True)
        return 2
    payload = memoryview(bytes(_CHUNK))
    t0, c0 = time.monotonic(), _cpu()
    results: list[dict] = [{} for _ in range(a.conns)]
    targets = ([(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in a.targets.split(",")]
               if a.targets else [(a.to, a.port)] * a.conns)
    a.conns = len(targets)
    socks = []
    for i in range(a.conns):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(a.timeout)
        if ports is not None or a.src:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((a.src or "0.0.0.0", ports[i] if ports is not None else 0))
        s.connect(targets[i])
        socks.append(s)

    def push(i: int, s: socket.socket) -> None:
        left = a.bytes
        ts = time.monotonic()
        try:
            while left > 0:
                k = min(left, _CHUNK)
                s.sendall(payload[:k])
                left -= k
            s.shutdown(socket.SHUT_WR)
            # wait for the receiver's close, so "done" means delivered
            s.recv(1)
            err = None
        except OSError as e:
            err = str(e)
        finally:
            results[i] = {"sport": s.getsockname()[1], "bytes": a.bytes - left,
                          "seconds": time.monotonic() - ts, "error": err}
            s.close()

    threads = [threading.Thread(target=push, args=(i, s), daemon=True)
               for i, s in enumerate(socks)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(a.timeout + 1)
    print(json.dumps({"conns": results, "cpu": _cpu() - c0, "wall": time.monotonic() - t0}),
          flush=True)
    return 0 if all(r.get("error") is None for r in results) else 1


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recv")
    r.add_argument("--bind", required=True)
    r.add_argument("--conns", type=int, default=1)
    r.add_argument("--timeout", type=float, default=30.0)
    s = sub.add_parser("send")
    s.add_argument("--to")
    s.add_argument("--port", type=int)
    s.add_argument("--targets", default=None, help="ADDR:PORT,... (one connection each)")
    s.add_argument("--bytes", type=int, required=True)
    s.add_argument("--conns", type=int, default=1)
    s.add_argument("--sports", default=None, help="LO-HI or a,b,c")
    s.add_argument("--src", default=None)
    s.add_argument("--timeout", type=float, default=30.0)
    a = ap.parse_args(argv)
    if a.cmd == "send" and not a.targets and (a.to is None or a.port is None):
        ap.error("send needs --to and --port, or --targets")
    return _recv_main(a) if a.cmd == "recv" else _send_main(a)


@dataclasses.dataclass
class Transfer:
    """What :func:`tcp_transfer` measured.  ``mbit`` is the goodput seen
    by the receiver (all bytes over first-to-last byte); ``*_cpu`` are the
    CPU seconds of each process, ``wall`` the receiver's wall seconds."""

    nbytes: int
    seconds: float
    mbit: float
    recv_cpu: float
    send_cpu: float
    wall: float
    conns: list[dict]
    sports: list[int]

    @property
    def cpu_fraction(self) -> float:
        """CPU used by sender + receiver per second of transfer (2.0 would
        be both cores busy)."""
        return (self.recv_cpu + self.send_cpu) / max(self.seconds, 1e-9)


def _read_json_line(p: subprocess.Popen, what: str, timeout: float) -> dict:
    out: list[str] = []
    th = threading.Thread(target=lambda: out.append(p.stdout.readline()), daemon=True)
    th.start()
    th.join(timeout)
    if not out or not out[0]:
        p.kill()
        err = p.stderr.read() if p.poll() is not None else ""
        raise TimeoutError(f"{what}: no result within {timeout} s {err.strip()[-500:]}")
    d = json.loads(out[0])
    if "error" in d and "conns" not in d:
        raise ConnectionError(f"{what}: {d['error']}")
    return d


def tcp_transfer(tb, src: str, dst: str, addr: str, nbytes: int, *, conns: int = 1,
                 sports: Sequence[int] | tuple[int, int] | None = None,
                 src_addr: str | None = None, timeout: float = 30.0) -> Transfer:
    """Send ``nbytes`` on each of ``conns`` TCP connections from node
    ``src`` to a receiver in node ``dst`` listening on ``addr``; source
    ports from ``sports`` (a list, or an inclusive ``(lo, hi)`` range)."""
    recv = tb.python(dst, MODULE, "recv", "--bind", addr, "--conns", str(conns),
                     "--timeout", str(timeout), stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)
    try:
        port = _read_json_line(recv, f"receiver in {dst}", 15)["port"]
        args = ["send", "--to", addr, "--port", str(port), "--bytes", str(nbytes),
                "--conns", str(conns), "--timeout", str(timeout)]
        if sports is not None:
            if isinstance(sports, tuple) and len(sports) == 2:
                args += ["--sports", f"{sports[0]}-{sports[1]}"]
            else:
                args += ["--sports", ",".join(str(x) for x in sports)]
        if src_addr:
            args += ["--src", src_addr]
        send = tb.python(src, MODULE, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        try:
            s = _read_json_line(send, f"sender in {src}", timeout + 5)
            send.wait(5)
        finally:
            if send.poll() is None:
                send.kill()
                send.wait(5)
        r = _read_json_line(recv, f"receiver in {dst}", timeout + 5)
        recv.wait(5)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait(5)
    errors = [c["error"] for c in s["conns"] + r["conns"] if c.get("error")]
    if errors:
        raise ConnectionError(f"transfer {src}->{dst} {addr}: {errors[0]}")
    got = sum(c["bytes"] for c in r["conns"])
    firsts = [c["first"] for c in r["conns"] if c["first"] is not None]
    lasts = [c["last"] for c in r["conns"] if c["last"] is not None]
    seconds = (max(lasts) - min(firsts)) if firsts else 0.0
    return Transfer(got, seconds, got * 8 / max(seconds, 1e-9) / 1e6, r["cpu"], s["cpu"],
                    r["wall"], r["conns"], [c["sport"] for c in s["conns"]])


if __name__ == "__main__":
    sys.exit(main())
