"""Shared state: hash-verified synchronisation of named tensors.

``comm.sync_shared_state(SharedState({...}, revision=r), strategy)`` makes
every peer of the group hold bit-identical tensors at one revision.  Each
peer hashes its tensors (xxh3-128 over the tensor memory, no copy) and
reports the hashes to the master, which elects per tensor the content most
peers hold (see :mod:`pccl.master.sync`).  Peers whose tensors differ fetch
exactly those from the peers holding the elected content, each tensor's
byte range striped across several distributors, verify the hash and only
then overwrite their tensors.  Peers already in sync pay one hash pass and
one master round trip and move no byte.  docs/shared-state.md is the user's
guide; the wire side is in docs/protocol.md.

Threads: the calling thread drives the sync; fetches run on short-lived
worker threads (the native fetch releases the GIL), several per
distributor.  A distributor serves from its published tensors on the
native core's threads until the master says every receiver is done.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import xxhash

from . import errors
from ._native import copy_memory, memory_view, tensor_memory

log = logging.getLogger("pccl.shared_state")

CHUNK_BYTES = 16 << 20  # one fetch request moves at most this much
FETCHES_PER_SOURCE = 2  # parallel connections to one distributor
BATCH_BYTES = 1 << 30  # temporaries held at once by a receiver (one tensor may exceed it)
FETCH_TIMEOUT = 30.0  # seconds without a byte before a distributor counts as failed

# Where the last sync on this process spent its time (seconds): "hash"
# (own tensors), "plan" (publish + master round trip), "fetch" (striped
# transfer, verification, copy), "serve" (waiting for the other receivers).
# For benchmarks and logs; not part of the API.
last_sync_timings: dict[str, float] = {}

# Called after every fetched chunk as hook(name, offset, length, source), on
# a fetch thread; a test sets it to act at a known moment of a transfer.
_chunk_hook: Callable[[str, int, int, str], None] | None = None


class SyncStrategy(enum.Enum):
    """How a peer takes part in a shared-state sync (PCCL's strategies).

    * ``ENFORCE_POPULAR``: send and receive as needed so that every peer
      ends with the content most peers at the current revision hold.
    * ``RECEIVE_ONLY``: this peer's content does not vote and it never
      sends; it receives whatever the group elects (e.g. a joiner that
      knows its tensors are placeholders).
    * ``SEND_ONLY``: this peer's content must be the group's; it never
      receives.  If several peers say SEND_ONLY, only they vote, and one
      whose content differs from the elected one gets an error.
    """

    ENFORCE_POPULAR = "enforce_popular"
    RECEIVE_ONLY = "receive_only"
    SEND_ONLY = "send_only"


@dataclass(frozen=True)
class SyncInfo:
    """What one sync did on this peer: payload bytes sent to and received
    from other peers (both 0 when the peer was already in sync and nobody
    fetched from it), the group's revision after the sync, how many peers
    the plan let this one fetch from (0 when it fetched nothing) and the
    wall time of the call in seconds."""

    tx_bytes: int
    rx_bytes: int
    revision: int
    sources: int = 0
    seconds: float = 0.0


class SharedState:
    """Named tensors (numpy arrays or contiguous CPU torch tensors) that every
    peer of a group keeps bit-identical, and their revision.

    The revision must advance by exactly one per sync.  After a successful
    sync ``revision`` holds the group's revision (an outdated peer, e.g. a
    joiner, learns it here).  The tensors must not change while a sync runs.
    """

    def __init__(self, tensors: Mapping[str, Any], revision: int = 0) -> None:
        if not isinstance(tensors, Mapping):
            raise errors.InvalidArgumentError(
                f"SharedState needs a mapping of name -> tensor, got {type(tensors).__name__}"
            )
        for name in tensors:
            if not isinstance(name, str) or not name or len(name) > 256:
                raise errors.InvalidArgumentError(
                    f"shared-state names are non-empty str of at most 256 characters: {name!r}"
                )
        self.tensors: dict[str, Any] = dict(tensors)
        self.revision = revision

    @property
    def revision(self) -> int:
        return self._revision

    @revision.setter
    def revision(self, value: int) -> None:
        self._revision = errors.check_int(value, "revision", 0, 2**63)

    def __repr__(self) -> str:
        return f"<pccl.SharedState revision={self._revision} tensors={list(self.tensors)}>"


# --------------------------------------------------------------------------
# Hashing.


def hash_memory(address: int, nbytes: int) -> bytes:
    """xxh3-128 of the bytes at ``address`` (16 bytes, big-endian)."""
    return xxhash.xxh3_128_digest(memory_view(address, nbytes))


def hash_tensor(x: Any) -> bytes:
    """xxh3-128 of a tensor's bytes; any dtype, any alignment, no copy."""
    address, nbytes, _, _ = tensor_memory(x)
    return hash_memory(address, nbytes)


def key_of(digest: bytes) -> int:
    """The 64-bit key a content is published under (part of its hash)."""
    return int.from_bytes(digest[8:16], "big")


@dataclass
class _Entry:
    name: str
    tensor: Any
    address: int
    nbytes: int
    dtype: str
    shape: tuple
    digest: bytes

    @property
    def key(self) -> int:
        return key_of(self.digest)


def _describe(state: SharedState, strategy: SyncStrategy) -> list[_Entry]:
    entries = []
    for name in sorted(state.tensors):
        x = state.tensors[name]
        address, nbytes, dtype, shape = tensor_memory(x, f"shared state {name!r}")
        if (
            strategy != SyncStrategy.SEND_ONLY
            and isinstance(x, np.ndarray)
            and not x.flags.writeable
        ):
            raise errors.InvalidArgumentError(
                f"shared state {name!r} is a read-only array, but a sync may overwrite it "
                "(use SEND_ONLY to only send)"
            )
        digest = hash_memory(address, nbytes)
        entries.append(_Entry(name, x, address, nbytes, dtype, shape, digest))
    return entries


# --------------------------------------------------------------------------
# Receiving: striped fetches from several distributors.


@dataclass
class _Want:
    """A tensor to fetch into a temporary."""

    entry: _Entry
    digest: bytes
    sources: list[str]
    buf: np.ndarray


class _Striper:
    """Fetch every byte range of ``wants`` with up to FETCHES_PER_SOURCE
    threads per distributor.  Chunks go to whichever thread of a source that
    holds the tensor asks first (a fast distributor takes more); when a
    distributor fails, the bytes it did not deliver go back to the queue and
    it gets no more work."""

    def __init__(self, native, wants: list[_Want], timeout: float):
        self.native = native
        self.wants = wants
        self.timeout = timeout
        self.cv = threading.Condition()
        self.pending: deque[tuple[int, int, int]] = deque()  # (want index, offset, length)
        self.in_flight = 0
        self.dead: dict[str, errors.PcclError] = {}
        self.fatal: BaseException | None = None
        self.rx = 0
        for i, w in enumerate(wants):
            n = w.entry.nbytes
            step = max(1, min(CHUNK_BYTES, -(-n // max(1, len(w.sources) * FETCHES_PER_SOURCE))))
            step = max(step, min(n, 1 << 20))  # no tiny chunks: each is a connection
            for off in range(0, n, step):
                self.pending.append((i, off, min(step, n - off)))

    def run(self) -> int:
        sources = sorted({s for w in self.wants for s in w.sources})
        threads = [
            threading.Thread(target=self._work, args=(s,), name=f"pccl-fetch-{s}", daemon=True)
            for s in sources
            for _ in range(FETCHES_PER_SOURCE)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.fatal is not None:
            raise self.fatal
        if self.pending:  # every source died with work left
            raise self._unreachable(self.pending[0][0])
        return self.rx

    def _unreachable(self, i: int) -> errors.PcclError:
        w = self.wants[i]
        why = "; ".join(f"{s}: {self.dead[s]}" for s in w.sources if s in self.dead)
        return errors.PeerLostError(
            f"sync_shared_state: tensor {w.entry.name!r}: every distributor failed ({why})"
        )

    def _take(self, source: str) -> tuple[int, int, int] | None:
        with self.cv:
            while True:
                if self.fatal is not None or source in self.dead:
                    return None
                for item in self.pending:
                    if source in self.wants[item[0]].sources:
                        self.pending.remove(item)
                        self.in_flight += 1
                        return item
                # A chunk that no live source can fetch ends the transfer.
                for i, _, _ in self.pending:
                    if all(s in self.dead for s in self.wants[i].sources):
                        self.fatal = self._unreachable(i)
                        self.cv.notify_all()
                        return None
                if self.in_flight == 0:
                    return None  # nothing left for this source
                self.cv.wait()  # a failing chunk may come back

    def _work(self, source: str) -> None:
        while (item := self._take(source)) is not None:
            i, off, length = item
            w = self.wants[i]
            try:
                got, err = self.native.fetch(
                    source,
                    key_of(w.digest),
                    off,
                    length,
                    w.buf.ctypes.data + off,
                    timeout=self.timeout,
                )
            except BaseException as exc:  # closed communicator, a bug: end everything
                with self.cv:
                    self.fatal = self.fatal or exc
                    self.in_flight -= 1
                    self.cv.notify_all()
                return
            with self.cv:
                self.in_flight -= 1
                self.rx += got
                if err is not None:
                    if isinstance(err, errors.ClosedError):
                        self.fatal = self.fatal or err
                    log.warning("fetch of %r [%d, +%d) from %s failed after %d bytes: %s",
                                w.entry.name, off, length, source, got, err)
                    self.dead.setdefault(source, err)
                    self.pending.appendleft((i, off + got, length - got))
                self.cv.notify_all()
            if err is None and _chunk_hook is not None:
                _chunk_hook(w.entry.name, off, length, source)


def _fetch_one_source(native, w: _Want, source: str, timeout: float) -> int:
    """Fetch the whole tensor from one distributor (after a striped fetch
    did not verify: one of several sources sent other bytes)."""
    got, err = native.fetch(source, key_of(w.digest), 0, w.entry.nbytes, w.buf.ctypes.data,
                            timeout=timeout)
    if err is not None:
        raise err
    return got


def _receive(native, wants: list[_Want], timeout: float) -> int:
    """Fetch, verify and commit ``wants``; returns the bytes received."""
    rx = _Striper(native, wants, timeout).run()
    for w in wants:
        if xxhash.xxh3_128_digest(memory_view(w.buf.ctypes.data, w.entry.nbytes)) != w.digest:
            log.warning("tensor %r did not verify after a striped fetch; fetching it whole",
                        w.entry.name)
            for source in w.sources:
                try:
                    rx += _fetch_one_source(native, w, source, timeout)
                except errors.PcclError as exc:
                    log.warning("fetch of %r from %s failed: %s", w.entry.name, source, exc)
                    continue
                if hash_memory(w.buf.ctypes.data, w.entry.nbytes) == w.digest:
                    break
            else:
                raise errors.ProtocolError(
                    f"sync_shared_state: tensor {w.entry.name!r}: no distributor delivered "
                    "content with the elected hash"
                )
    for w in wants:  # verified: now, and only now, the user's tensor changes
        copy_memory(w.entry.address, w.buf.ctypes.data, w.entry.nbytes)
    return rx


def _batches(wants: list[tuple[_Entry, dict]]) -> list[list[tuple[_Entry, dict]]]:
    out: list[list[tuple[_Entry, dict]]] = [[]]
    size = 0
    for e, f in wants:
        if out[-1] and size + e.nbytes > BATCH_BYTES:
            out.append([])
            size = 0
        out[-1].append((e, f))
        size += e.nbytes
    return out


# --------------------------------------------------------------------------
# The peer side of a sync.


class _Publications:
    """The keys this peer serves, one per distinct content."""

    def __init__(self, native):
        self.native = native
        self.by_key: dict[int, _Entry] = {}
        self.tx = 0

    def publish(self, e: _Entry) -> None:
        have = self.by_key.get(e.key)
        if have is not None:
            if have.digest != e.digest:  # a 64-bit key collision: serve the first only
                log.warning("shared state %r and %r share a key; serving %r only",
                            have.name, e.name, have.name)
            return
        self.native.publish(e.key, e.address, e.nbytes)
        self.by_key[e.key] = e

    def unpublish(self, key: int) -> None:
        self.by_key.pop(key)
        try:
            self.tx += self.native.unpublish(key)
        except errors.PcclError as exc:  # closed meanwhile: nothing is served any more
            log.debug("unpublish: %s", exc)

    def unpublish_all(self) -> None:
        for key in list(self.by_key):
            self.unpublish(key)


class Transfers(Protocol):
    """The native side of a sync (:class:`pccl._native.NativeComm` has it)."""

    def publish(self, key: int, address: int, nbytes: int) -> None: ...

    def unpublish(self, key: int) -> int: ...

    def fetch(
        self, address: str, key: int, offset: int, nbytes: int, dst: int,
        timeout: float | None = ...,
    ) -> tuple[int, errors.PcclError | None]: ...


class SyncPort(Protocol):
    """What :func:`synchronize` needs from a communicator: its native
    transfers and three exchanges with the master.  The communicator builds
    one per sync (``Communicator._sync_port``), after checking it is
    connected and admitted."""

    @property
    def transfers(self) -> Transfers: ...

    def plan(self, report: dict[str, Any]) -> dict[str, Any]:
        """Send a ``sync_state`` report (without ``type``/``req``) and
        return the master's ``sync_plan``."""
        ...

    def done(self, revision: int, ok: bool) -> None:
        """Tell the master this receiver's fetches ended (``sync_done``)."""
        ...

    def wait_released(self, revision: int) -> None:
        """Block until the master releases the distributors (``sync_end``)."""
        ...


def synchronize(port: SyncPort, state: SharedState, strategy: SyncStrategy) -> SyncInfo:
    """The body of :meth:`pccl.Communicator.sync_shared_state`."""
    if not isinstance(state, SharedState):
        raise errors.InvalidArgumentError(
            f"sync_shared_state needs a pccl.SharedState, got {type(state).__name__}"
        )
    try:
        strategy = SyncStrategy(strategy)
    except ValueError:
        raise errors.InvalidArgumentError(f"unknown SyncStrategy {strategy!r}") from None
    native = port.transfers
    started = time.perf_counter()
    clock = [started]
    timings: dict[str, float] = {}

    def lap(what: str) -> None:
        now = time.perf_counter()
        timings[what] = now - clock[0]
        clock[0] = now

    entries = _describe(state, strategy)
    lap("hash")
    by_name = {e.name: e for e in entries}
    pubs = _Publications(native)
    rx = 0
    try:
        if strategy != SyncStrategy.RECEIVE_ONLY:
            # Published before the report, so a receiver never asks too early.
            for e in entries:
                pubs.publish(e)
        plan = port.plan(
            {
                "revision": state.revision,
                "strategy": strategy.value,
                "tensors": [
                    {"name": e.name, "dtype": e.dtype, "shape": list(e.shape),
                     "nbytes": e.nbytes, "hash": e.digest}
                    for e in entries
                ],
            }
        )
        lap("plan")
        if plan["error"]:
            cls = errors.InvalidArgumentError if plan["error"] == "invalid" else errors.StateError
            raise cls(f"sync_shared_state: {plan['reason']}")
        revision = plan["revision"]
        fetch = plan["fetch"]
        written = {f["name"] for f in fetch}
        unknown = written - set(by_name)
        if unknown or (fetch and strategy == SyncStrategy.SEND_ONLY):
            raise errors.ProtocolError(f"sync_shared_state: the master sent a bad plan {fetch!r}")
        # Serve only what others may fetch, and never from a tensor about to
        # be overwritten (a key published from one moves to a twin if any).
        keep = {e.key for e in entries if e.name not in written} if plan["serve"] else set()
        for k, e in list(pubs.by_key.items()):
            if k not in keep or e.name in written:
                pubs.unpublish(k)
        for e in entries:
            if e.key in keep and e.name not in written:
                pubs.publish(e)
        if fetch:
            ok = False
            try:
                for batch in _batches([(by_name[f["name"]], f) for f in fetch]):
                    wants = [
                        _Want(e, f["hash"], list(f["from"]), np.empty(e.nbytes, dtype=np.uint8))
                        for e, f in batch
                    ]
                    rx += _receive(native, wants, FETCH_TIMEOUT)
                ok = True
            finally:
                try:
                    port.done(revision, ok)
                except errors.PcclError:
                    pass  # the link's own error is what the caller sees next
            lap("fetch")
        if plan["serve"]:
            port.wait_released(revision)
            lap("serve")
    finally:
        pubs.unpublish_all()
        last_sync_timings.clear()
        last_sync_timings.update(timings)
    state.revision = revision
    return SyncInfo(
        tx_bytes=pubs.tx, rx_bytes=rx, revision=revision,
        sources=len({s for f in fetch for s in f["from"]}),
        seconds=time.perf_counter() - started,
    )
