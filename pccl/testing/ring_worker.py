"""One rank of a test ring, driven by JSON lines.

Started by :class:`pccl.testing.cluster.RingCluster` as
``python -m pccl.testing.ring_worker --rank R --world W ...``.  The worker
binds a :class:`pccl.StaticRing` on 127.0.0.1 port 0 and writes
``{"event": "address", ...}`` on stdout; then it reads one command per line
on stdin and answers each with one line (a few commands also send an
intermediate ``started`` line).  Anything else printed goes to stderr, so
stdout carries only the protocol.

Workers check their own results: every rank can regenerate every other
rank's input (:mod:`pccl.testing.reference`), and it reports a hash of each
result so the parent can check that all peers hold the same bits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import PcclError, StaticRing
from ..errors import BusyError
from ..types import Quantization, ReduceOp
from . import reference as ref

Send = Callable[[dict], None]

OP_TIMEOUT = 60.0  # a hang becomes an error long before the parent gives up


class Worker:
    def __init__(self, args: argparse.Namespace, send: Send):
        self.rank = args.rank
        self.send = send
        self.ring: StaticRing | None = None
        self._make_ring(
            args.world, args.connections, args.slice_bytes, args.secret, args.progress_timeout
        )
        self.x: Any = None  # the input of the last `inflight` command
        self.x_hash = ""
        self._withheld: Any = None  # the victim's own op under another tag (inflight)

    def _make_ring(self, world, connections, slice_bytes=None, secret=None, progress_timeout=None):
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        kwargs: dict[str, Any] = {"p2p_connections": connections}
        if slice_bytes:
            kwargs["slice_bytes"] = slice_bytes
        if secret is not None:
            kwargs["secret"] = secret
        if progress_timeout is not None:
            kwargs["progress_timeout"] = progress_timeout
        self.world = world
        self.ring = StaticRing(self.rank, world, **kwargs)

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None

    # -- ring ---------------------------------------------------------------

    def cmd_reset(self, msg: dict) -> dict:
        """Close the ring and bind a new one (another world, K, ...): the
        same process serves many configurations."""
        self._make_ring(
            msg["world"],
            msg["connections"],
            msg.get("slice_bytes"),
            msg.get("secret"),
            msg.get("progress_timeout"),
        )
        return {"event": "address", "address": self.ring.address}

    def cmd_idle(self, msg: dict) -> dict:
        """Close the ring (this rank sits out the next configuration)."""
        self.close()
        return {"event": "idle"}

    def cmd_connect(self, msg: dict) -> dict:
        self.ring.connect(
            msg["addresses"], timeout=msg.get("timeout", 30.0), epoch=msg.get("epoch", 0)
        )
        return {"event": "connected"}

    def cmd_rebuild(self, msg: dict) -> dict:
        """A new ring among ``addresses`` (e.g. the survivors), this worker
        at position ``rank``."""
        addrs = msg["addresses"]
        rank = msg["rank"]
        world = len(addrs)
        nxt = addrs[(rank + 1) % world] if world > 1 else None
        self.ring.set_ring(msg["epoch"], rank, world, nxt, timeout=msg.get("timeout", 30.0))
        return {"event": "connected"}

    def cmd_ping(self, msg: dict) -> dict:
        return {"event": "pong"}

    # -- the dtype x op x size matrix -----------------------------------------

    def cmd_matrix(self, msg: dict) -> dict:
        seed = msg.get("seed", 0)
        cases = ref.matrix_cases(self.world)
        if "only" in msg:  # a subset, by name (for a reproduction)
            cases = [c for c in cases if c.name in set(msg["only"])]
        results = []
        broken = None
        self.reduce_seconds = 0.0
        t0 = time.monotonic()
        for case in cases:
            if broken is not None:
                results.append([case.name, "", f"not run: ring broken by {broken}"])
                continue
            digest, error = self._run_case(case, seed, tag=case.index % 3)
            results.append([case.name, digest, error])
            if error and error.startswith("ring broken:"):
                broken = case.name
        return {
            "event": "matrix",
            "results": results,
            "seconds": time.monotonic() - t0,
            "reduce_seconds": self.reduce_seconds,
        }

    def _run_case(self, case: ref.Case, seed: int, tag: int) -> tuple[str, str | None]:
        vals = ref.input_values(case, self.rank, self.world, seed)
        x = ref.make_tensor(vals, case.dtype, case.use_torch)
        before = ref.tensor_hash(x)
        out = None
        if not case.in_place:
            out = ref.empty_like_garbage(x)
            if isinstance(x, np.ndarray):
                x.flags.writeable = False  # the source is never written
        t0 = time.monotonic()
        try:
            info = self.ring.all_reduce(
                x, out=out, op=case.op, quantization=case.quant, tag=tag, timeout=OP_TIMEOUT
            )
        except PcclError as e:
            unchanged = ref.tensor_hash(x) == before
            text = f"{type(e).__name__}: {e}" + ("" if unchanged else " (and x was modified)")
            if isinstance(e, ConnectionError):
                return "", "ring broken: " + text
            return "", text
        self.reduce_seconds += time.monotonic() - t0
        result = x if case.in_place else out
        digest = ref.tensor_hash(result)
        problems = []
        if not case.in_place and ref.tensor_hash(x) != before:
            problems.append("out-of-place call modified x")
        if info.world_size != self.world:
            problems.append(f"ReduceInfo.world_size {info.world_size} != {self.world}")
        problems += self._check_bytes_moved(case, x, info)
        # One rank per case checks the reference (they take turns): the
        # parent checks that every rank holds the same bits.
        if case.index % self.world == self.rank:
            inputs = [
                vals if r == self.rank else ref.input_values(case, r, self.world, seed)
                for r in range(self.world)
            ]
            wrong = ref.check_result(case, inputs, ref.tensor_values(result, case.dtype))
            if wrong:
                problems.append(wrong)
        return digest, "; ".join(problems) or None

    def _check_bytes_moved(self, case: ref.Case, x: Any, info) -> list[str]:
        w = self.world
        if w == 1 or case.size < 1000:
            return []
        esize = x.itemsize if isinstance(x, np.ndarray) else x.element_size()
        nbytes = case.size * esize
        # Each peer sends every chunk but one in each phase.
        floor = 2 * (nbytes - -(-case.size // w) * esize)
        if case.quant == Quantization.NONE:
            if info.tx_bytes < floor or info.rx_bytes < floor:
                return [f"moved too few bytes: tx {info.tx_bytes} rx {info.rx_bytes} < {floor}"]
        elif esize >= 4 and info.tx_bytes >= floor / 2:
            return [f"quantized op sent {info.tx_bytes} bytes, unquantized needs {floor}"]
        return []

    # -- special values ---------------------------------------------------------

    def cmd_special(self, msg: dict) -> dict:
        """NaN, infinities, -0.0 and subnormals through every floating
        dtype x op, quantized and not."""
        seed = msg.get("seed", 0)
        results = []
        index = 20_000
        for dtype in ref.FLOAT_DTYPES:
            for op in ReduceOp:
                for quant in Quantization:
                    index += 1
                    case = ref.Case(
                        index, dtype, op, quant, ref.SPECIAL_SIZE, True, dtype == "bfloat16"
                    )
                    vals = ref.special_input(case, self.rank, self.world, seed)
                    x = ref.make_tensor(vals, dtype, case.use_torch)
                    try:
                        self.ring.all_reduce(x, op=op, quantization=quant, timeout=OP_TIMEOUT)
                    except PcclError as e:
                        results.append(["special-" + case.name, "", f"{type(e).__name__}: {e}"])
                        continue
                    inputs = [
                        vals if r == self.rank else ref.special_input(case, r, self.world, seed)
                        for r in range(self.world)
                    ]
                    wrong = ref.check_special(case, inputs, ref.tensor_values(x, dtype))
                    results.append(["special-" + case.name, ref.tensor_hash(x), wrong])
        return {"event": "special", "results": results}

    # -- concurrency ----------------------------------------------------------

    CONCURRENT = [
        ("float32", ReduceOp.SUM, Quantization.NONE, 300_007),
        ("int32", ReduceOp.MAX, Quantization.NONE, 100_003),
        ("float64", ReduceOp.AVG, Quantization.NONE, 50_021),
        ("float16", ReduceOp.SUM, Quantization.NONE, 7),
        ("bfloat16", ReduceOp.MIN, Quantization.NONE, 0),
        ("int64", ReduceOp.PROD, Quantization.NONE, 20_011),
        ("uint8", ReduceOp.SUM, Quantization.NONE, 1),
        ("float32", ReduceOp.SUM, Quantization.UINT8_MINMAX, 200_003),
    ]

    def cmd_concurrent(self, msg: dict) -> dict:
        """Several ops in flight at once, one tag each, started and waited
        for in a different order on every rank; then again with the same
        tags (the n-th op of a tag meets the n-th op of that tag)."""
        seed = msg.get("seed", 0)
        results = []
        for rnd in range(msg.get("rounds", 2)):
            rng = np.random.default_rng([seed, rnd, self.rank])
            running = {}
            for i in rng.permutation(len(self.CONCURRENT)):
                dtype, op, quant, size = self.CONCURRENT[i]
                case = ref.Case(
                    10_000 + 100 * rnd + int(i),
                    dtype,
                    op,
                    quant,
                    size,
                    in_place=bool(i % 2),
                    use_torch=bool(i % 3 == 0),
                )
                vals = ref.input_values(case, self.rank, self.world, seed)
                x = ref.make_tensor(vals, dtype, case.use_torch)
                out = None if case.in_place else ref.empty_like_garbage(x)
                h = self.ring.all_reduce_async(
                    x, out=out, op=op, quantization=quant, tag=100 + int(i)
                )
                running[int(i)] = (case, vals, x, out, h)
            for i in rng.permutation(len(self.CONCURRENT)):
                case, vals, x, out, h = running[int(i)]
                name = f"round{rnd}-tag{100 + int(i)}-{case.name}"
                try:
                    h.wait(OP_TIMEOUT)
                except PcclError as e:
                    results.append([name, "", f"{type(e).__name__}: {e}"])
                    continue
                result = x if case.in_place else out
                if not case.in_place and not np.array_equal(
                    ref.tensor_values(x, case.dtype), vals, equal_nan=True
                ):
                    results.append([name, "", "out-of-place call modified x"])
                    continue
                inputs = [
                    vals if r == self.rank else ref.input_values(case, r, self.world, seed)
                    for r in range(self.world)
                ]
                wrong = ref.check_result(case, inputs, ref.tensor_values(result, case.dtype))
                results.append([name, ref.tensor_hash(result), wrong])
        return {"event": "concurrent", "results": results}

    def cmd_burst(self, msg: dict) -> dict:
        """Many small ops in flight at once, one tag each, started in a
        different order on every rank; integer SUMs checked exactly."""
        n_ops = msg.get("ops", 256)
        rng = np.random.default_rng([msg.get("seed", 0), self.rank])
        xs = {}
        handles = {}
        for i in rng.permutation(n_ops):
            i = int(i)
            xs[i] = np.full(i % 37, (self.rank + 1) * (i + 1), np.int64)
            handles[i] = self.ring.all_reduce_async(xs[i], tag=5000 + i)
        results = []
        expected_factor = self.world * (self.world + 1) // 2
        for i in rng.permutation(n_ops):
            i = int(i)
            name = f"burst-tag{5000 + i}-n{i % 37}"
            try:
                handles[i].wait(OP_TIMEOUT)
            except PcclError as e:
                results.append([name, "", f"{type(e).__name__}: {e}"])
                continue
            ok = np.all(xs[i] == expected_factor * (i + 1))
            results.append([name, ref.tensor_hash(xs[i]), None if ok else f"got {xs[i][:3]}"])
        return {"event": "burst", "results": results}

    def cmd_busy(self, msg: dict) -> dict:
        """Start an op, then another with the same tag while the first is
        in flight: the second must fail with BusyError."""
        x = ref.ramp_input(msg.get("elements", 1 << 20), self.rank)
        y = x.copy()
        h = self.ring.all_reduce_async(x, tag=7)
        second = None
        try:
            h2 = self.ring.all_reduce_async(y, tag=7)
        except BusyError:
            second = "BusyError"
        except PcclError as e:
            second = f"{type(e).__name__}: {e}"
        else:
            second = "started"
            try:
                h2.wait(OP_TIMEOUT)
            except PcclError as e:
                second += f" then {type(e).__name__}: {e}"
        try:
            h.wait(OP_TIMEOUT)
            first = ref.ramp_sum_matches(x, list(range(self.world))) or "ok"
        except PcclError as e:
            first = f"{type(e).__name__}: {e}"
        return {"event": "busy", "first": first, "second": second, "hash": ref.tensor_hash(x)}

    # -- one large tensor -------------------------------------------------------

    def cmd_big(self, msg: dict) -> dict:
        n = msg["elements"]
        x = ref.ramp_input(n, self.rank)
        t0 = time.monotonic()
        info = self.ring.all_reduce(x, timeout=OP_TIMEOUT)
        seconds = time.monotonic() - t0
        error = ref.ramp_sum_matches(x, list(range(self.world)))
        return {
            "event": "big",
            "hash": ref.tensor_hash(x),
            "error": error,
            "seconds": seconds,
            "tx_bytes": info.tx_bytes,
            "rx_bytes": info.rx_bytes,
        }

    # -- failures -----------------------------------------------------------------

    def cmd_inflight(self, msg: dict) -> dict:
        """Start a SUM and say "started"; report how it ended.

        ``withhold`` makes this worker the victim that withholds its part,
        so that the others' operation cannot complete while it lives:
        ``"never"`` starts no operation at all (a peer killed before it
        joins); ``"other_tag"`` starts the same reduction under another tag
        (its engine and connections busy, its frames parked at its
        neighbour, none of them for the others' operation).  Either way it
        says "started" and blocks until killed."""
        n = msg["elements"]
        in_place = msg.get("in_place", True)
        self.x = ref.ramp_input(n, self.rank)
        self.x_hash = ref.tensor_hash(self.x)
        withhold = msg.get("withhold")
        if withhold is not None:
            if withhold == "other_tag":
                self._withheld = self.ring.all_reduce_async(self.x, tag=msg.get("tag", 0) + 1)
            elif withhold != "never":
                raise ValueError(f"withhold must be 'never' or 'other_tag', got {withhold!r}")
            self.send({"event": "started", "t": time.monotonic()})
            sys.stdin.readline()  # until killed
            return {"event": "released"}
        out = None if in_place else np.full_like(self.x, 7.0)
        h = self.ring.all_reduce_async(self.x, out=out)
        self.send({"event": "started", "t": time.monotonic()})
        try:
            h.wait(msg.get("timeout", 10.0))
        except PcclError as e:
            t = time.monotonic()
            return _failed(
                "outcome",
                e,
                t=t,
                connection_error=isinstance(e, ConnectionError),
                timeout_error=isinstance(e, TimeoutError),
                input_unchanged=ref.tensor_hash(self.x) == self.x_hash,
            )
        return {"event": "outcome", "ok": True, "t": time.monotonic()}

    def cmd_reduce_again(self, msg: dict) -> dict:
        """All-reduce the (unchanged) input of the last ``inflight`` again,
        in place, and check it equals the sum over ``members``."""
        self.ring.all_reduce(self.x, timeout=OP_TIMEOUT)
        error = ref.ramp_sum_matches(self.x, msg["members"])
        return {"event": "reduced", "hash": ref.tensor_hash(self.x), "error": error}

    def cmd_try_reduce(self, msg: dict) -> dict:
        """A small all-reduce; report whether (and how) it failed."""
        x = np.ones(16, np.float32)
        try:
            self.ring.all_reduce(x, timeout=msg.get("timeout", 5.0))
        except PcclError as e:
            return _failed("tried", e, connection_error=isinstance(e, ConnectionError))
        return {"event": "tried", "ok": True}

    def cmd_mismatch(self, msg: dict) -> dict:
        """All-reduce a size that differs between ranks; report the outcome."""
        n = msg["sizes"][self.rank]
        x = ref.ramp_input(n, self.rank)
        t0 = time.monotonic()
        try:
            self.ring.all_reduce(x, timeout=msg.get("timeout", 10.0))
        except PcclError as e:
            return _failed("outcome", e, seconds=time.monotonic() - t0)
        return {"event": "outcome", "ok": True, "seconds": time.monotonic() - t0}


def _failed(event: str, e: Exception, **fields: Any) -> dict:
    """The reply ``event`` for an operation that raised ``e``."""
    return {"event": event, "ok": False, "type": type(e).__name__, "message": str(e), **fields}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--slice-bytes", type=int, default=0)
    parser.add_argument("--secret", default=None)
    parser.add_argument("--progress-timeout", type=float, default=None)
    args = parser.parse_args(argv)

    # stdout is the protocol channel; everything else printed goes to stderr.
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(msg: dict) -> None:
        channel.write(json.dumps(msg) + "\n")
        channel.flush()

    worker = Worker(args, send)
    send({"event": "address", "address": worker.ring.address, "pid": os.getpid()})
    try:
        for line in sys.stdin:
            msg = json.loads(line)
            cmd = msg["cmd"]
            if cmd == "exit":
                break
            try:
                reply = getattr(worker, "cmd_" + cmd)(msg)
            except Exception as e:  # reported to the parent, which fails the test
                reply = {
                    "event": "error",
                    "type": type(e).__name__,
                    "message": str(e),
                    "connection_error": isinstance(e, ConnectionError),
                    "traceback": traceback.format_exc(),
                }
            send(reply)
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    code = main()
    # Skip the interpreter's (and torch's) slow teardown: the ring is closed.
    sys.stderr.flush()
    os._exit(code)
