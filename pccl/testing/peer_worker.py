"""A :class:`pccl.Communicator` in a child process, driven by JSON lines.

Multi-process membership tests and the control-plane benchmark start
``python -m pccl.testing.peer_worker --master HOST:PORT --index I`` (one
per peer) and send it commands on stdin, one JSON object per line; each
command is answered by one line with the same ``id``.  Lines with an
``event`` key are progress notes (``hello`` at start, ``started`` just
before a collective blocks), so the driver can act at a known moment (for
instance SIGKILL a peer while a collective is in flight) without sleeping.

Times are ``time.monotonic()``: CLOCK_MONOTONIC is one clock for every
process on the machine, so a driver can subtract its own readings.

The driver side is here too: :class:`PeerProcess` (one worker), with
:class:`~pccl.testing.procs.MasterProcess` (a real ``pccl-master``)
re-exported; both have bounded waits and a ``kill()`` that always reaps.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np

from .procs import ChildError, JsonChild, MasterProcess

__all__ = [
    "DriverError",
    "MasterProcess",
    "PeerProcess",
    "PeerRun",
    "admit",
    "digest",
    "gather",
    "join_all",
    "make_input",
    "p2p_payload",
    "request_all",
    "send_all",
    "serve",
]

# --------------------------------------------------------------------------
# Inputs and hashes, shared by the workers and the tests.


def make_input(seed: int, index: int, n: int, dtype: str = "float32") -> np.ndarray:
    """Peer ``index``'s contribution to the operation ``seed`` (deterministic)."""
    rng = np.random.default_rng([seed, index])
    if dtype.startswith("float"):
        return rng.standard_normal(n).astype(dtype)
    return rng.integers(-100, 100, n).astype(dtype)


def p2p_payload(seed: int, n: int) -> np.ndarray:
    """n deterministic bytes for point-to-point tests (a random 64 KiB
    block repeated, so 256 MiB costs no 256 MiB of random numbers)."""
    block = np.random.default_rng(seed).integers(0, 256, min(n, 65536), dtype=np.uint8)
    return np.resize(block, n) if n > block.size else block


def digest(x: np.ndarray) -> str:
    """A hash of the bytes of ``x``: equal hashes = bit-identical tensors."""
    return hashlib.sha256(np.ascontiguousarray(x).view(np.uint8)).hexdigest()[:32]


# --------------------------------------------------------------------------
# The worker.


class _Worker:
    def __init__(self, args: argparse.Namespace):
        import pccl

        self.pccl = pccl
        self.index = args.index
        self.args = args
        self.comm = self._new_comm()

    def _new_comm(self):
        a = self.args
        return self.pccl.Communicator(
            a.master,
            peer_group=a.group,
            p2p_connections=a.connections,
            secret=a.secret,
            progress_timeout=a.progress_timeout,
            name=f"peer{a.index}",
        )

    def emit(self, msg: dict) -> None:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()

    def info(self) -> dict:
        c = self.comm
        return {
            "peer_id": c.peer_id,
            "world_size": c.world_size,
            "group_world_size": c.group_world_size,
            "rank": c.rank,
            "epoch": c.epoch,
        }

    # Commands: each returns the reply's fields (without id/ok).

    def cmd_connect(self, timeout: float | None = 60.0, fresh: bool = False) -> dict:
        if fresh:
            self.comm.close()
            self.comm = self._new_comm()
        self.comm.connect(timeout=timeout)
        return self.info()

    def cmd_update_topology(self) -> dict:
        self.comm.update_topology()
        return self.info()

    def cmd_sync_world(self, n: int, timeout: float = 60.0) -> dict:
        """Vote until the run has ``n`` admitted peers (every admitted peer
        runs this, so each vote completes)."""
        deadline = time.monotonic() + timeout
        votes = 0
        while self.comm.world_size != n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"world is {self.comm.world_size}, not {n}, after {votes} votes")
            self.comm.update_topology(timeout=max(0.1, deadline - time.monotonic()))
            votes += 1
        return dict(self.info(), votes=votes)

    def cmd_wait_pending(self, timeout: float = 60.0) -> dict:
        """Ask ``are_peers_pending()`` until it says True (bounded)."""
        deadline = time.monotonic() + timeout
        queries = 0
        while not self.comm.are_peers_pending():
            queries += 1
            if time.monotonic() > deadline:
                raise TimeoutError(f"no pending peer after {queries} queries")
            time.sleep(0.01)  # the condition is polled, as a training loop would
        return {"queries": queries}

    def cmd_pending(self) -> dict:
        return {"pending": self.comm.are_peers_pending()}

    def cmd_info(self) -> dict:
        return self.info()

    def cmd_all_reduce(
        self,
        n: int,
        seed: int,
        dtype: str = "float32",
        op: str = "SUM",
        tag: int = 0,
        inplace: bool = True,
        quantization: str = "NONE",
        retry: bool = False,
        max_retries: int = 5,
    ) -> dict:
        pccl = self.pccl
        x = make_input(seed, self.index, n, dtype)
        before = digest(x)
        out = None if inplace else np.empty_like(x)
        reply: dict[str, Any] = {"retries": 0}
        while True:
            self.emit({"event": "started", "t": time.monotonic(), "seed": seed})
            try:
                info = self.comm.all_reduce(
                    x,
                    out,
                    op=pccl.ReduceOp[op],
                    quantization=pccl.Quantization[quantization],
                    tag=tag,
                )
            except pccl.PeerLostError as exc:
                reply.setdefault("t_error", time.monotonic())
                reply.setdefault("first_error", type(exc).__name__)
                reply.setdefault("first_message", str(exc))
                reply["x_unchanged"] = reply.get("x_unchanged", True) and digest(x) == before
                if not retry or reply["retries"] >= max_retries:
                    return dict(reply, ok=False, error=type(exc).__name__, message=str(exc))
                reply["retries"] += 1
                self.comm.update_topology()
                continue
            break
        result = x if inplace else out
        reply.update(
            self.info(),
            t_done=time.monotonic(),
            hash=digest(result),
            checksum=float(result.astype(np.float64).sum()),
            world=info.world_size,
            tx_bytes=info.tx_bytes,
            rx_bytes=info.rx_bytes,
        )
        return reply

    def cmd_all_reduce_many(
        self,
        count: int,
        n: int,
        seed: int,
        max_in_flight: int = 8,
        dtype: str = "float32",
        die_after: int | None = None,
    ) -> dict:
        xs = [make_input(seed * 1000 + i, self.index, n, dtype) for i in range(count)]
        self.emit({"event": "started", "t": time.monotonic(), "seed": seed})
        if die_after is not None:
            # Start every operation as all_reduce_many would (tensor i =
            # tag i), see the first die_after through, then die.
            handles = [self.comm.all_reduce_async(x, tag=i) for i, x in enumerate(xs)]
            for h in handles[:die_after]:
                h.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        infos = self.comm.all_reduce_many(xs, max_in_flight=max_in_flight)
        return dict(
            self.info(),
            t_done=time.monotonic(),
            hashes=[digest(x) for x in xs],
            checksums=[float(x.astype(np.float64).sum()) for x in xs],
            worlds=[i.world_size for i in infos],
        )

    def cmd_bench(self, n: int, iters: int, warmup: int = 5) -> dict:
        """Time ``iters`` back-to-back all-reduces of ``n`` float32 (in
        place); returns per-op seconds."""
        x = np.ones(n, dtype=np.float32)
        for _ in range(warmup):
            self.comm.all_reduce(x)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            self.comm.all_reduce(x)
            times.append(time.perf_counter() - t0)
        return {"times": times}

    # -- broadcast, all-gather, reduce-scatter, barrier ----------------------

    def cmd_collective(
        self,
        kind: str,
        n: int,
        seed: int,
        dtype: str = "float32",
        op: str = "SUM",
        root: int = 0,
        quantization: str = "NONE",
        tag: int = 0,
        withhold: bool = False,
        retry: bool = False,
        max_retries: int = 5,
    ) -> dict:
        """Run one ``kind`` (broadcast, all_gather, reduce_scatter, barrier)
        on this peer's input for ``seed``: ``n`` elements (all_gather: per
        peer; reduce_scatter: per peer of the output, the input has
        group_world_size * n).  ``withhold``: emit "started" and run
        nothing (a victim that never joins).  ``retry``: after a
        PeerLostError, update_topology() and run it again (inputs remade
        for the new group size)."""
        pccl = self.pccl
        comm = self.comm
        reply: dict[str, Any] = {"retries": 0, "index": self.index}
        while True:
            gws = comm.group_world_size
            if kind == "reduce_scatter":
                x = make_input(seed, self.index, gws * n, dtype)
                out = np.empty(n, dtype=dtype)
            elif kind == "all_gather":
                x = make_input(seed, self.index, n, dtype)
                out = np.empty(gws * n, dtype=dtype)
            else:
                x = make_input(seed, self.index, n, dtype)
                out = None
            before = digest(x)
            self.emit({"event": "started", "t": time.monotonic(), "seed": seed})
            if withhold:
                return dict(reply, withheld=True)
            try:
                if kind == "broadcast":
                    info = comm.broadcast(x, root=root, tag=tag)
                elif kind == "all_gather":
                    info = comm.all_gather(x, out, tag=tag)
                elif kind == "reduce_scatter":
                    info = comm.reduce_scatter(
                        x, out, op=pccl.ReduceOp[op],
                        quantization=pccl.Quantization[quantization], tag=tag,
                    )
                elif kind == "barrier":
                    info = comm.barrier(tag=tag)
                else:
                    raise ValueError(f"unknown collective {kind!r}")
            except pccl.PeerLostError as exc:
                reply.setdefault("t_error", time.monotonic())
                reply.setdefault("first_error", type(exc).__name__)
                reply.setdefault("first_message", str(exc))
                # The input: x, except on a non-root of a broadcast (output).
                if kind != "broadcast" or comm.rank == root:
                    reply["x_unchanged"] = reply.get("x_unchanged", True) and digest(x) == before
                if not retry or reply["retries"] >= max_retries:
                    return dict(reply, ok=False, error=type(exc).__name__, message=str(exc))
                reply["retries"] += 1
                comm.update_topology()
                continue
            break
        result = out if out is not None else x
        reply.update(
            self.info(),
            t_done=time.monotonic(),
            hash=digest(result),
            result=result.astype(np.float64).tolist() if result.size <= 4096 else None,
            checksum=float(result.astype(np.float64).sum()),
            x_unchanged_after=kind == "broadcast" and comm.rank != root or digest(x) == before,
            world=info.world_size,
        )
        return reply

    def cmd_collective_errors(self) -> dict:
        """Call every collective with bad arguments; the error type of each
        (all must be raised before any byte moves, and count no op)."""
        comm, n = self.comm, self.comm.group_world_size
        x = np.zeros(10, np.float32)
        calls = {
            "root_out_of_range": lambda: comm.broadcast(x, root=n),
            "gather_out_size": lambda: comm.all_gather(x, np.empty(n * 10 + 1, np.float32)),
            "gather_dtype": lambda: comm.all_gather(x, np.empty(n * 10, np.float64)),
            "scatter_in_size": lambda: comm.reduce_scatter(np.zeros(n * 10 + 1, np.float32), x),
            "scatter_dtype": lambda: comm.reduce_scatter(np.zeros(n * 10, np.int32), x),
        }
        raised = {}
        for name, call in calls.items():
            try:
                call()
                raised[name] = None
            except Exception as exc:  # reported to the driver
                raised[name] = [type(exc).__name__, isinstance(exc, ValueError),
                                isinstance(exc, self.pccl.PcclError)]
        return {"raised": raised}
    # Point-to-point (tests/test_p2p.py).

    def cmd_peers(self) -> dict:
        return {
            "self": self.comm.peer_id,
            "rank": self.comm.rank,
            "peers": [
                {"peer_id": p.peer_id, "name": p.name, "group": p.group, "rank": p.rank,
                 "addresses": p.addresses}
                for p in self.comm.peers()
            ],
        }

    def cmd_p2p(self, ops: list[dict], timeout: float = 60.0, label: str = "") -> dict:
        """Start every op of ``ops`` at once (each ``{"op": "send"|"recv",
        "peer", "tag", "n", "seed"}``: n bytes of p2p_payload(seed)), then
        wait for all; replies each recv's digest and each op's outcome.
        The ``started`` event (with ``label``) comes once all are started."""
        pccl = self.pccl
        handles = []
        for op in ops:
            if op["op"] == "send":
                buf = p2p_payload(op["seed"], op["n"])
                h = self.comm.send_async(buf, op["peer"], op["tag"], timeout=timeout)
            else:
                buf = np.empty(op["n"], dtype=np.uint8)
                h = self.comm.recv_async(buf, op["peer"], op["tag"], timeout=timeout)
            handles.append((op, buf, h))
        self.emit({"event": "started", "t": time.monotonic(), "label": label})
        results = []
        for op, buf, h in handles:
            try:
                h.wait()
                results.append({"ok": True, "hash": digest(buf) if op["op"] == "recv" else None})
            except pccl.PcclError as exc:
                results.append({"ok": False, "error": type(exc).__name__, "message": str(exc),
                                "t_error": time.monotonic()})
        return {"results": results, "t_done": time.monotonic()}

    def cmd_close(self) -> dict:
        self.comm.close()
        return {}


def _error_reply(exc: BaseException) -> dict:
    import pccl

    return {
        "ok": False,
        "error": type(exc).__name__,
        "message": str(exc),
        "pccl_error": isinstance(exc, pccl.PcclError),
        "connection_error": isinstance(exc, ConnectionError),
        "timeout_error": isinstance(exc, TimeoutError),
        "t_error": time.monotonic(),
        "traceback": traceback.format_exc(limit=8),
    }


def serve(
    worker_class: type[_Worker], argv: Sequence[str] | None, doc: str, connections: int = 2
) -> int:
    """Parse the worker's flags, then answer one JSON command a line on
    stdin until ``exit`` or EOF (``readline``, not iteration: a state
    worker's fetch hook reads stdin too)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--master", required=True, help="HOST:PORT of pccl-master")
    parser.add_argument("--index", type=int, required=True, help="this peer's input index")
    parser.add_argument("--group", type=int, default=0, help="peer group")
    parser.add_argument("--connections", type=int, default=connections, help="p2p connections")
    parser.add_argument("--secret", default=None)
    parser.add_argument("--progress-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s peer{args.index} %(name)s %(levelname)s %(message)s",
    )
    worker = worker_class(args)
    worker.emit({"event": "hello", "pid": os.getpid(), "index": args.index})
    while True:
        line = sys.stdin.readline()
        if not line:
            break
        if not line.strip():
            continue
        cmd = json.loads(line)
        name = cmd.pop("cmd")
        cmd_id = cmd.pop("id", None)
        if name == "exit":
            break
        try:
            reply = {"ok": True, **getattr(worker, f"cmd_{name}")(**cmd)}
        except Exception as exc:  # reported to the driver, which decides
            reply = _error_reply(exc)
        reply["id"] = cmd_id
        worker.emit(reply)
    worker.comm.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return serve(_Worker, argv, __doc__)


# --------------------------------------------------------------------------
# The driver side (the master: :class:`pccl.testing.procs.MasterProcess`).

DriverError = ChildError


class PeerProcess(JsonChild):
    """One worker (``module``, by default this one); :meth:`request` sends
    a command and returns its reply."""

    def __init__(
        self,
        workdir: str,
        master: str,
        index: int,
        *,
        group: int = 0,
        connections: int = 2,
        secret: str | None = None,
        progress_timeout: float | None = None,
        start_timeout: float = 60.0,
        module: str = "pccl.testing.peer_worker",
    ):
        argv = [
            sys.executable,
            "-m",
            module,
            "--master",
            master,
            "--index",
            str(index),
            "--group",
            str(group),
            "--connections",
            str(connections),
        ]
        if secret is not None:
            argv += ["--secret", secret]
        if progress_timeout is not None:
            argv += ["--progress-timeout", str(progress_timeout)]
        super().__init__(argv, workdir, f"peer{index}")
        self.index = index
        self._ids = iter(range(1, 1 << 62))
        self.started(self.wait_event, "hello", start_timeout)

    def send(self, cmd: str, **fields: Any) -> int:
        cmd_id = next(self._ids)
        self.write_line({"cmd": cmd, "id": cmd_id, **fields}, cmd)
        return cmd_id

    def reply(self, timeout: float, what: str = "a reply") -> dict:
        return self._get(self.replies, timeout, what)

    def request(self, cmd: str, timeout: float = 60.0, check: bool = True, **fields: Any) -> dict:
        self.send(cmd, **fields)
        msg = self.reply(timeout, f"reply to {cmd}")
        if check and not msg["ok"]:
            raise DriverError(
                f"{self.label}: {cmd} failed: {msg['error']}: {msg['message']}\n"
                f"{msg.get('traceback', '')}"
            )
        return msg

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the worker to exit (closing its communicator), then kill."""
        if self.proc.poll() is None:
            try:
                self.send("exit")
                self.proc.wait(timeout=timeout)
            except (DriverError, subprocess.TimeoutExpired):
                pass
        self.kill()


def send_all(peers: Sequence[PeerProcess], cmd: str, **fields: Any) -> None:
    for p in peers:
        p.send(cmd, **fields)


def gather(
    peers: Sequence[PeerProcess], timeout: float, check: bool = True, what: str = "a reply"
) -> list[dict]:
    """One reply from each peer, all within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    replies = []
    for p in peers:
        msg = p.reply(max(0.0, deadline - time.monotonic()), what)
        if check and not msg["ok"]:
            raise DriverError(
                f"{p.label}: {msg['error']}: {msg['message']}\n"
                f"{msg.get('traceback', '')}\n{p.stderr_tail()}"
            )
        replies.append(msg)
    return replies


def request_all(
    peers: Sequence[PeerProcess], cmd: str, timeout: float = 60.0, check: bool = True, **fields: Any
) -> list[dict]:
    """Send ``cmd`` to every peer at once, then gather the replies."""
    send_all(peers, cmd, **fields)
    return gather(peers, timeout, check, f"reply to {cmd}")


def join_all(peers: Sequence[PeerProcess], timeout: float = 60.0) -> list[dict]:
    """Connect every peer, then vote until all are admitted; returns the
    ``sync_world`` replies."""
    send_all(peers, "connect", timeout=timeout)
    send_all(peers, "sync_world", n=len(peers), timeout=timeout)
    gather(peers, timeout + 10, what="connect")
    return gather(peers, timeout + 10, what="sync_world")


def admit(peers: Sequence[PeerProcess], joiner: PeerProcess, what: str = "connect") -> dict:
    """Connect ``joiner``, wait until ``peers`` see it pending, admit it
    with their vote; returns the joiner's reply to ``connect``."""
    joiner.send("connect", timeout=60)
    peers[0].request("wait_pending", timeout=30)
    request_all(peers, "update_topology")
    return joiner.reply(30, what)


class PeerRun:
    """A master and the peers (``peer_class``) of one test or benchmark in
    ``workdir``; :meth:`close` (also at the end of a ``with`` block) kills
    every one of them."""

    def __init__(
        self, workdir: str, peer_class: type[PeerProcess] = PeerProcess, **master: Any
    ) -> None:
        self.workdir = workdir
        self.peer_class = peer_class
        self.master = MasterProcess(workdir, **master)
        self.peers: list[Any] = []

    def peer(self, index: int, **kwargs: Any) -> Any:
        p = self.peer_class(self.workdir, self.master.address, index, **kwargs)
        self.peers.append(p)
        return p

    def close(self) -> None:
        for p in self.peers:
            p.signal(signal.SIGCONT)  # harmless unless a test stopped it
            p.kill()
        self.master.kill()

    def __enter__(self) -> PeerRun:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
