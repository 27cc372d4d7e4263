"""A training loop that survives peers joining, dying and freezing.

Run one peer of a job whose master is already running::

    pccl-master --listen 0.0.0.0:48148 &
    python examples/allreduce_dynamic.py --master 127.0.0.1:48148 --steps 200

or a whole job on this machine (an in-process master and ``--peers``
processes; ``--chaos`` SIGKILLs one peer mid-run and starts a new one)::

    python examples/allreduce_dynamic.py --local --peers 3 --chaos

Each step every peer computes a "gradient", averages it with
``all_reduce``, applies it, and votes (``update_topology()``: admits
newcomers).  When a peer is lost during the all-reduce, every survivor
gets ``pccl.PeerLostError`` for the same step with its gradient unchanged,
so it simply votes again and retries the step.  See
docs/failure-semantics.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import time

import numpy as np

import pccl


def train(
    master: str,
    steps: int,
    group: int = 0,
    secret: str | None = None,
    size: int = 1 << 16,
    step_time: float = 0.0,
) -> None:
    rng = np.random.default_rng(os.getpid())
    weights = np.zeros(size, dtype=np.float32)
    step = 0
    with pccl.Communicator(master, peer_group=group, secret=secret) as comm:
        comm.connect()  # blocks until the running peers admit us at their next vote
        print(f"[{comm.peer_id}] admitted: world {comm.world_size}", flush=True)
        epoch = None
        while True:
            if comm.epoch != epoch:
                # The ring changed (a peer joined or was lost): copy rank 0's
                # state to everybody, so a newcomer starts where the others are.
                weights, step = share_state(comm, weights, step)
                epoch = comm.epoch
            if step >= steps:
                break
            # 1. Local work.  (A real loop runs forward/backward here.)
            grad = rng.standard_normal(size).astype(np.float32)
            time.sleep(step_time)
            # 2. Average over the peers of this group.
            try:
                comm.all_reduce(grad, op=pccl.ReduceOp.AVG)
            except pccl.PeerLostError as exc:
                # Every survivor raises for this same step, and grad is
                # unchanged: vote (drops the lost peer, rebuilds the ring)
                # and retry the step.
                print(f"[{comm.peer_id}] step {step}: {exc}; retrying", flush=True)
                comm.update_topology()
                continue
            # 3. Every peer applies bit-identical values.
            weights -= 0.01 * grad
            step += 1
            if step % 50 == 0:
                digest = hashlib.sha256(weights.tobytes()).hexdigest()[:12]
                print(
                    f"[{comm.peer_id}] step {step} world {comm.world_size} weights {digest}",
                    flush=True,
                )
            # 4. Every peer votes once per step, at the same point: this
            #    admits newcomers (whose connect() returns here, so they
            #    start the next step with everybody else).  With nobody
            #    pending it costs one master round trip.
            comm.update_topology()
        # close() (end of the with block) leaves the run without failing the others.


def share_state(comm: pccl.Communicator, weights: np.ndarray, step: int):
    """Everybody gets rank 0's weights and step, bit for bit: rank 0 adds its
    values, every other peer adds zeros (x + 0 == x exactly).  The master
    orders each ring by join time, so rank 0 is never a newcomer.  (Real
    jobs use comm.sync_shared_state, which moves only what differs.)"""
    state = np.concatenate([weights, np.array([step], dtype=np.float32)])
    if comm.rank != 0:
        state[:] = 0.0
    while True:
        try:
            comm.all_reduce(state, tag=1)
            return state[:-1].copy(), int(state[-1])
        except pccl.PeerLostError:
            comm.update_topology()


def local_job(peers: int, steps: int, chaos: bool, step_time: float) -> int:
    """An in-process master plus ``peers`` peer processes of this script."""
    with pccl.MasterNode(listen="127.0.0.1:0") as master:
        print(f"master at {master.address}", flush=True)

        def spawn() -> subprocess.Popen:
            return subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--master",
                    master.address,
                    "--steps",
                    str(steps),
                    "--step-time",
                    str(step_time),
                ]
            )

        procs = [spawn() for _ in range(peers)]
        try:
            if chaos:
                time.sleep(2.0)  # a demo, not a test: let training get going
                victim = procs.pop(0)
                print(f"*** SIGKILL peer pid {victim.pid}", flush=True)
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                procs.append(spawn())  # a replacement joins at the next vote
            codes = [p.wait(timeout=600) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    return max(codes, default=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--master", help="HOST:PORT of a running pccl-master")
    parser.add_argument(
        "--local", action="store_true", help="start a master and --peers peers on this machine"
    )
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--group", type=int, default=0, help="peer group")
    parser.add_argument(
        "--step-time", type=float, default=0.02, help="seconds of pretend compute per step"
    )
    parser.add_argument("--chaos", action="store_true", help="with --local: kill a peer mid-run")
    args = parser.parse_args()
    secret = os.environ.get("PCCL_SECRET")  # same secret as pccl-master --secret-file
    if args.local:
        return local_job(args.peers, args.steps, args.chaos, args.step_time)
    if not args.master:
        parser.error("give --master HOST:PORT or --local")
    train(args.master, args.steps, args.group, secret, step_time=args.step_time)
    return 0


if __name__ == "__main__":
    sys.exit(main())
