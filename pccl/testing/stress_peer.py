"""One peer of the churn stress test (:mod:`pccl.testing.stress`).

``python -m pccl.testing.stress_peer --master HOST:PORT --seed S --slot K``
runs a training-like loop until told to exit::

    update_topology -> sync_shared_state(revision + 1)
    -> all_reduce_many(unquantized tensors) -> all_reduce_many(uint8 tensors)
    -> deterministic update of the shared state -> report

Every contribution is a deterministic function of ``(seed, slot, revision,
tensor)`` (:func:`contribution`), so the orchestrator can recompute every
sum from the contributors alone.  Each unquantized tensor carries a one-hot
tail (1.0 at this peer's slot), so its reduced tail says exactly which
peers contributed to that very tensor, even when ``all_reduce_many``
retried part of the tensors among fewer peers.

Protocol: one JSON object per line on stdout (events, see :func:`emit`);
commands on stdin, one JSON object per line: ``{"cmd": "cut"}`` shuts the
master connection's socket down (a network cut as the master sees it),
``{"cmd": "exit"}`` (or EOF) ends the loop and leaves cleanly.  Logs go to
stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading
import time

import numpy as np
import xxhash

AMPLITUDE = 1000  # contributions are integers in [-AMPLITUDE, AMPLITUDE]
SAMPLES = 16  # elements of each quantized result reported for the value check
KIND_U, KIND_Q = 1, 2


def contribution(seed: int, slot: int, revision: int, kind: int, index: int, n: int) -> np.ndarray:
    """The values peer ``slot`` reduces at ``revision`` into tensor ``index``
    of ``kind`` (small integers as float32, so every sum is exact)."""
    rng = np.random.default_rng([seed, slot, revision, kind, index])
    return rng.integers(-AMPLITUDE, AMPLITUDE + 1, size=n).astype(np.float32)


def sample_indices(revision: int, n: int) -> np.ndarray:
    """The elements of a quantized result that are reported for checking."""
    rng = np.random.default_rng([revision, 7])
    return np.sort(rng.choice(n, size=min(SAMPLES, n), replace=False))


def digest(*arrays: np.ndarray) -> str:
    h = xxhash.xxh3_128()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


_out_lock = threading.Lock()


def emit(ev: str, **fields) -> None:
    fields["ev"] = ev
    line = json.dumps(fields, separators=(",", ":"))
    with _out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


class Peer:
    def __init__(self, args: argparse.Namespace):
        import pccl

        self.pccl = pccl
        self.args = args
        self.n = args.tensor_elems
        self.slots = args.max_slots
        self.exit = threading.Event()
        self.comm = pccl.Communicator(
            args.master,
            p2p_connections=2,
            connect_timeout=10.0,
            ring_timeout=15.0,
            progress_timeout=args.progress_timeout,
        )
        self.w = np.zeros(self.n, dtype=np.float32)
        self.count = np.zeros(1, dtype=np.int64)
        self.state = pccl.SharedState({"w": self.w, "count": self.count}, revision=0)
        # Peers started at the beginning all hold the same initial state;
        # a joiner's or a rejoiner's tensors are placeholders.
        self.receive_only = args.joiner
        self.skip_vote = False

    # -- commands from the orchestrator (stdin thread) -------------------

    def read_commands(self) -> None:
        for line in sys.stdin:
            try:
                cmd = json.loads(line).get("cmd")
            except ValueError:
                continue
            if cmd == "cut":
                self.cut()
            elif cmd == "exit":
                self.exit.set()
        # EOF: the orchestrator is gone; never outlive it for long.
        self.exit.set()
        threading.Timer(10.0, os._exit, args=(4,)).start()

    def cut(self) -> None:
        link = self.comm._link
        sock = getattr(link, "_sock", None)
        try:
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
                emit("cut_done")
                return
        except OSError as exc:
            emit("cut_failed", why=str(exc))
            return
        emit("cut_failed", why="no master connection")

    # -- the loop ----------------------------------------------------------

    def connect(self) -> bool:
        errors = self.pccl.errors
        try:
            self.comm.connect(timeout=self.args.connect_timeout)
        except (errors.PcclTimeoutError, errors.MasterConnectionError, errors.EvictedError,
                errors.RingBrokenError, errors.PeerLostError) as exc:
            emit("connect_failed", why=f"{type(exc).__name__}: {exc}")
            return False
        emit("admitted", id=self.comm.peer_id, world=self.comm.world_size)
        # connect() returned inside the others' vote: join their step at the
        # sync, without voting again (docs/failure-semantics.md).
        self.skip_vote = True
        return True

    def run(self) -> int:
        pccl = self.pccl
        errors = pccl.errors
        threading.Thread(target=self.read_commands, daemon=True, name="commands").start()
        connected = False
        while not self.exit.is_set():
            if not connected:
                connected = self.connect()
                continue
            try:
                self.step()
            except errors.PeerLostError as exc:
                emit("aborted", rev=self.state.revision, why=str(exc)[:200])
            except (errors.MasterConnectionError, errors.EvictedError) as exc:
                emit("lost", why=f"{type(exc).__name__}: {exc}"[:300])
                connected = False
                self.receive_only = True
            except errors.StateError as exc:
                emit("error", why=f"{type(exc).__name__}: {exc}"[:300])
                if self.receive_only:
                    # Every peer asked to receive (nobody holds the state): vote.
                    self.receive_only = False
                else:
                    # "ahead of the run": become outdated and receive.
                    self.state.revision = 0
                    self.receive_only = True
            except (errors.RingBrokenError, errors.PcclTimeoutError) as exc:
                emit("error", why=f"{type(exc).__name__}: {exc}"[:300])
        emit("exiting")
        self.comm.close()
        return 0

    def step(self) -> None:
        pccl = self.pccl
        comm, state, n, a = self.comm, self.state, self.n, self.args
        t0 = time.time()
        if self.skip_vote:
            self.skip_vote = False
        else:
            comm.update_topology()
        sync = pccl.SyncStrategy
        strategy = sync.RECEIVE_ONLY if self.receive_only else sync.ENFORCE_POPULAR
        before = state.revision
        state.revision = before + 1
        try:
            info = comm.sync_shared_state(state, strategy)
        except BaseException:
            state.revision = before
            raise
        self.receive_only = False
        rev = state.revision
        sync_hash = digest(self.w, self.count)

        u = []
        for j in range(a.unquantized):
            t = np.zeros(n + self.slots, dtype=np.float32)
            t[:n] = contribution(a.seed, a.slot, rev, KIND_U, j, n)
            t[n + a.slot] = 1.0
            u.append(t)
        q = [contribution(a.seed, a.slot, rev, KIND_Q, j, n) for j in range(a.quantized)]

        ring_u = (comm.epoch, list(comm._ring.order))
        comm.all_reduce_many(u, max_in_flight=a.unquantized)
        after_u = (comm.epoch, list(comm._ring.order))
        uint8 = pccl.Quantization.UINT8_MINMAX
        comm.all_reduce_many(q, quantization=uint8, max_in_flight=a.quantized)
        after_q = (comm.epoch, list(comm._ring.order))

        # Deterministic update from the reduced values (identical everywhere).
        upd = u[0][:n] * np.float32(1e-4) + q[0] * np.float32(1e-4)
        np.multiply(self.w, np.float32(0.9), out=self.w)
        np.add(self.w, upd, out=self.w)
        self.count += 1

        idx = sample_indices(rev, n)
        report = {
            "rev": rev,
            "hash": digest(self.w, self.count),
            "sync_hash": sync_hash,
            "rx": info.rx_bytes,
            "tx": info.tx_bytes,
            "world": comm.world_size,
            "epoch": comm.epoch,
            # An all_reduce_many retried part of its tensors (a peer was lost).
            "retried": ring_u[0] != after_u[0] or after_u[0] != after_q[0],
            "id": comm.peer_id,
            "t0": t0,
            "t1": time.time(),
            "u": [
                {
                    "c": [int(s) for s in np.flatnonzero(t[n:])],
                    "tail_ok": bool(np.all((t[n:] == 0) | (t[n:] == 1))),
                    "h": digest(t[:n]),
                }
                for t in u
            ],
            # The ring the master gave for the unquantized call, if no
            # retry changed it meanwhile (then every tensor had that ring).
            "ring_u": ring_u[1] if ring_u[0] == after_u[0] else None,
            "ring_q": after_u[1] if after_u[0] == after_q[0] else None,
            "q": [
                {"h": digest(t), "idx": idx.tolist(), "v": t[idx].tolist()} for t in q
            ],
        }
        emit("step", **report)
        if a.step_sleep > 0:
            self.exit.wait(a.step_sleep)  # pretend compute


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pccl.testing.stress_peer",
        description="One peer of the pccl churn stress test (started by pccl.testing.stress).",
    )
    p.add_argument("--master", required=True, help="HOST:PORT of the pccl-master")
    p.add_argument("--seed", type=int, required=True, help="run seed (contributions)")
    p.add_argument("--slot", type=int, required=True, help="this peer's unique slot index")
    p.add_argument("--max-slots", type=int, default=256, help="length of the one-hot tail")
    p.add_argument("--tensor-elems", type=int, default=2048, help="elements per tensor")
    p.add_argument("--unquantized", type=int, default=3, help="float32 tensors per step")
    p.add_argument("--quantized", type=int, default=2, help="uint8-quantized tensors per step")
    p.add_argument("--joiner", action="store_true", help="first sync receives only")
    p.add_argument("--connect-timeout", type=float, default=30.0, help="admission bound (s)")
    p.add_argument("--progress-timeout", type=float, default=20.0, help="ring stall bound (s)")
    p.add_argument("--step-sleep", type=float, default=0.0, help="pretend compute per step (s)")
    p.add_argument("--log-level", default="WARNING", help="logging level (stderr)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.slot < args.max_slots:
        raise SystemExit("--slot must be in [0, --max-slots)")
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr,
        format=f"%(asctime)s slot{args.slot} %(levelname)s %(name)s %(message)s",
    )
    return Peer(args).run()


if __name__ == "__main__":
    sys.exit(main())
