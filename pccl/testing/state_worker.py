"""A :class:`pccl.Communicator` with a shared state, in a child process.

The shared-state tests and benchmark start ``python -m
pccl.testing.state_worker --master HOST:PORT --index I`` per peer and drive
it with JSON lines exactly like :mod:`pccl.testing.peer_worker` (whose
membership commands it inherits: ``connect``, ``sync_world``,
``update_topology``, ``wait_pending`` ...), plus:

* ``make_state(tensors, revision)``: build the shared state from specs
  ``{"name", "kind", "n", "fill", "seed"}`` (kinds below; fill ``"seed"``
  gives the same values on every peer with the same seed, ``"iota"`` too
  but cheaply, ``"zeros"`` a joiner's placeholders);
* ``sync(strategy, bump, revision, pause_after_first_chunk)``: one
  ``sync_shared_state``; with ``pause_after_first_chunk`` the worker emits a
  ``chunk`` event after its first fetched chunk and holds every fetch
  thread at its next chunk until the driver sends any line (so the driver
  can SIGKILL a distributor mid-transfer);
* ``digests``: per tensor, pccl's xxh3-128 and an independent SHA-256 of
  the bytes; ``flip(name, byte, bit)``: corrupt one bit.
"""

from __future__ import annotations

import hashlib
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .peer_worker import PeerProcess, _Worker, serve

KINDS = {
    "float32": np.float32,
    "float64": np.float64,
    "float16": np.float16,
    "int64": np.int64,
    "int8": np.int8,
    "uint8": np.uint8,
}


def make_tensor(kind: str, n: int, fill: str, seed: int):
    """A tensor of ``n`` elements.  Kinds: numpy dtype names, ``torch_bf16``,
    ``torch_f32``, ``unaligned_f32`` (a float32 view at an odd address)."""
    if fill == "iota" and kind in KINDS:  # cheap for GiB-sized benchmark state
        x = np.arange(n, dtype=KINDS[kind])
        x += seed
        return x
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(n) * 100 if fill == "seed" else np.zeros(n)
    if kind in KINDS:
        return values.astype(KINDS[kind])
    if kind == "unaligned_f32":
        raw = bytearray(n * 4 + 1)
        view = np.frombuffer(raw, dtype=np.float32, count=n, offset=1)
        view[:] = values
        assert view.ctypes.data % 4 != 0
        return view
    import torch

    if kind == "torch_bf16":
        return torch.tensor(values, dtype=torch.float32).to(torch.bfloat16)
    if kind == "torch_f32":
        return torch.tensor(values, dtype=torch.float32)
    raise ValueError(f"unknown tensor kind {kind!r}")


class _StateWorker(_Worker):
    state: Any = None

    def cmd_make_state(self, tensors: list[dict], revision: int = 0) -> dict:
        self.state = self.pccl.SharedState(
            {
                t["name"]: make_tensor(t["kind"], t["n"], t.get("fill", "seed"), t.get("seed", 0))
                for t in tensors
            },
            revision=revision,
        )
        return self.cmd_digests()

    def cmd_digests(self) -> dict:
        from pccl.shared_state import hash_memory, memory_view, tensor_memory

        out = {}
        for name, x in self.state.tensors.items():
            address, nbytes, _, _ = tensor_memory(x)
            out[name] = {
                "xxh3": hash_memory(address, nbytes).hex(),
                "sha256": hashlib.sha256(memory_view(address, nbytes)).hexdigest(),
                "nbytes": nbytes,
            }
        return {"digests": out, "revision": self.state.revision}

    def cmd_flip(self, name: str, byte: int, bit: int = 0) -> dict:
        from pccl.shared_state import tensor_memory

        address, nbytes, _, _ = tensor_memory(self.state.tensors[name])
        assert 0 <= byte < nbytes
        ffi = self.pccl._native.ffi
        p = ffi.cast("unsigned char *", address)
        p[byte] = p[byte] ^ (1 << bit)
        return self.cmd_digests()

    def cmd_set_tensor(
        self, name: str, kind: str, n: int, fill: str = "seed", seed: int = 0
    ) -> dict:
        self.state.tensors[name] = make_tensor(kind, n, fill, seed)
        return self.cmd_digests()

    def cmd_drop_tensor(self, name: str) -> dict:
        del self.state.tensors[name]
        return self.cmd_digests()

    def cmd_sync(
        self,
        strategy: str = "ENFORCE_POPULAR",
        bump: bool = True,
        revision: int | None = None,
        pause_after_first_chunk: bool = False,
    ) -> dict:
        from pccl import shared_state

        if revision is not None:
            self.state.revision = revision
        elif bump:
            self.state.revision += 1
        if pause_after_first_chunk:
            shared_state._chunk_hook = self._pausing_hook()
        self.emit({"event": "syncing", "t": time.monotonic()})
        t0 = time.perf_counter()
        try:
            info = self.comm.sync_shared_state(
                self.state, strategy=self.pccl.SyncStrategy[strategy]
            )
        finally:
            shared_state._chunk_hook = None
        seconds = time.perf_counter() - t0
        return dict(
            self.cmd_digests(),
            tx_bytes=info.tx_bytes,
            rx_bytes=info.rx_bytes,
            info_revision=info.revision,
            seconds=seconds,
            timings=dict(shared_state.last_sync_timings),
        )

    def _pausing_hook(self):
        first = threading.Lock()
        released = threading.Event()

        def hook(name: str, offset: int, length: int, source: str) -> None:
            if first.acquire(blocking=False):
                self.emit({"event": "chunk", "name": name, "source": source})
                sys.stdin.readline()  # the driver says go (after it killed someone)
                released.set()
            released.wait()

        return hook


def main(argv: Sequence[str] | None = None) -> int:
    return serve(_StateWorker, argv, __doc__, connections=1)


class StatePeer(PeerProcess):
    """The driver side of one state worker (a :class:`PeerProcess` whose
    child runs this module)."""

    def __init__(
        self,
        workdir: str,
        master: str,
        index: int,
        *,
        secret: str | None = None,
        start_timeout: float = 60.0,
    ):
        super().__init__(
            workdir,
            master,
            index,
            connections=1,
            secret=secret,
            start_timeout=start_timeout,
            module="pccl.testing.state_worker",
        )


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
