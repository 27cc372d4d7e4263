"""A DiLoCo peer as a child process, for tests: the worker and its harness.

``python -m pccl.testing.diloco_worker --master HOST:PORT --index I --world
N --seed S --sync-every H [--async]`` trains :class:`TinyLM` with
:class:`pccl.diloco.DiLoCo` (or ``AsyncDiLoCo``), driven by JSON lines on
stdin: ``{"cmd": "go"}`` = inner steps up to the next outer step, answered
with an ``outer`` event carrying a hash of the shared state (outer
parameters, momentum, counter); ``{"cmd": "go", "die_mid_reduce": true}``
SIGKILLs the worker once two of the outer step's reductions succeeded;
``{"cmd": "finish"}`` ends the run (``finished``).

:class:`DiLoCoPeer` starts one (a :class:`pccl.testing.procs.JsonChild`:
scratch directory, bounded waits, always reaped).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from typing import Any

import torch

import pccl
from pccl.diloco import AsyncDiLoCo, DiLoCo

from .procs import ChildError, JsonChild, child_env

WAIT = 60.0  # seconds, for any one event


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 8)
        self.hidden = torch.nn.Linear(8, 16)
        self.out = torch.nn.Linear(16, 11)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(self.emb(x))))


def batches(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 11, (12,), generator=g) for _ in range(n)]


def inner_step(model, opt, x):
    opt.zero_grad()
    logits = model(x[:-1])
    torch.nn.functional.cross_entropy(logits, x[1:]).backward()
    opt.step()



class DiLoCoPeer(JsonChild):
    """One worker process; ``expect(event)`` is its next event, which must
    be ``event``."""

    def __init__(
        self, workdir: str, master: str, index: int, *, world: int, seed: int,
        sync_every: int, async_: bool,
    ) -> None:
        self.index = index
        argv = [
            sys.executable, "-m", "pccl.testing.diloco_worker",
            "--master", master, "--index", str(index), "--world", str(world),
            "--seed", str(seed), "--sync-every", str(sync_every),
        ]
        if async_:
            argv.append("--async")
        super().__init__(argv, workdir, f"peer{index}", env=child_env(OMP_NUM_THREADS="1"))

    def send(self, cmd: str, **fields: Any) -> None:
        self.write_line({"cmd": cmd, **fields}, cmd)

    def expect(self, event: str, timeout: float = WAIT) -> dict:
        msg = self._get(self.events, timeout, f"{event} event")
        if msg.get("event") != event:
            raise ChildError(f"{self.label}: wanted {event}, got {msg}\n{self.stderr_tail()}")
        return msg


def _state_hash(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


class _DyingComm:
    """Forwards to the communicator; when armed, its next all_reduce_many of
    more than one tensor starts every operation as all_reduce_many does
    (tensor i = tag i, all in flight), waits until the first two succeeded,
    and SIGKILLs this process."""

    def __init__(self, comm):
        self._comm = comm
        self.armed = False

    def __getattr__(self, name):
        return getattr(self._comm, name)

    def all_reduce_many(self, tensors, *, op=pccl.ReduceOp.SUM,
                        quantization=pccl.Quantization.NONE, **kw):
        if self.armed and len(tensors) > 1:
            handles = [self._comm.all_reduce_async(t, op=op, quantization=quantization, tag=i)
                       for i, t in enumerate(tensors)]
            handles[0].wait()
            handles[1].wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return self._comm.all_reduce_many(tensors, op=op, quantization=quantization, **kw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--master", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument(
        "--world",
        type=int,
        required=True,
        help="peers to wait for before training (0: join a running run)",
    )
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--sync-every", type=int, required=True)
    parser.add_argument("--async", dest="async_", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s peer{args.index} %(name)s %(message)s")

    def emit(event: str, **fields) -> None:
        sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
        sys.stdout.flush()

    torch.manual_seed(args.seed)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    data = batches(1000 + args.index, 10_000)
    with pccl.Communicator(args.master, p2p_connections=2) as real_comm:
        emit("hello")
        real_comm.connect(timeout=60)
        deadline = time.monotonic() + 60
        while real_comm.world_size < args.world:  # peers that start together
            assert time.monotonic() < deadline, "the others never arrived"
            real_comm.update_topology(timeout=60)
        comm = _DyingComm(real_comm)
        cls = AsyncDiLoCo if args.async_ else DiLoCo
        diloco = cls(model, comm, opt, sync_every=args.sync_every)
        emit("ready", hash=_state_hash(diloco.shared_state()), outer_step=diloco.outer_step)
        batch = iter(data)
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["cmd"] == "go":
                comm.armed = bool(cmd.get("die_mid_reduce"))
                info = None
                while info is None:
                    inner_step(model, opt, next(batch))
                    info = diloco.step()
                emit(
                    "outer",
                    hash=_state_hash(diloco.shared_state()),
                    outer_step=info.outer_step,
                    world=info.world_size,
                    group=info.group_world_size,
                )
            elif cmd["cmd"] == "finish":
                diloco.finish()
                emit(
                    "finished",
                    hash=_state_hash(diloco.shared_state()),
                    model_hash=_state_hash(dict(model.named_parameters())),
                )
            else:
                break
    return 0



if __name__ == "__main__":
    sys.exit(main())
