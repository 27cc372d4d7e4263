"""cffi handles over the native core, and the one table of its error codes.

Everything that touches ``pccl._pccl_native`` lives here: the rest of the
package sees Python objects (:class:`NativeComm`, :class:`AllReduceHandle`)
and :mod:`pccl.errors` exceptions.  Calls into the core release the GIL
(cffi API mode), so a background thread keeps running while an all-reduce
blocks.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import errors
from ._pccl_native import ffi, lib
from .types import DType, Quantization, ReduceHandle, ReduceInfo, ReduceOp

# --------------------------------------------------------------------------
# Errors: one table, one checking function with a fast path.

_ERRORS: dict[int, type[errors.PcclError]] = {
    lib.PCCL_EINVAL: errors.InvalidArgumentError,
    lib.PCCL_ENOMEM: errors.OutOfMemoryError,
    lib.PCCL_ETIMEDOUT: errors.PcclTimeoutError,
    lib.PCCL_EABORTED: errors.AbortedError,
    lib.PCCL_ECLOSED: errors.ClosedError,
    lib.PCCL_EPEERLOST: errors.PeerLostError,
    lib.PCCL_EPROTO: errors.ProtocolError,
    lib.PCCL_EAUTH: errors.AuthenticationError,
    lib.PCCL_ESTATE: errors.StateError,
    lib.PCCL_EBUSY: errors.BusyError,
    lib.PCCL_ENOTSUP: errors.NotSupportedError,
    lib.PCCL_EADDR: errors.AddressError,
    lib.PCCL_ECONNREFUSED: errors.PcclConnectionRefusedError,
    lib.PCCL_ERINGBROKEN: errors.RingBrokenError,
    lib.PCCL_ENOTFOUND: errors.NotFoundError,
}


def error_for(rv: int, what: str = "") -> errors.PcclError:
    """The exception for a non-zero result code of the core."""
    if rv & lib.PCCL_ESYSERR:
        errno = rv & ~lib.PCCL_ESYSERR
        import os

        exc: errors.PcclError = errors.PcclOSError(
            f"{what}: {os.strerror(errno)} (errno {errno})" if what else os.strerror(errno), rv
        )
        exc.errno = errno
        return exc
    cls = _ERRORS.get(rv, errors.PcclError)
    text = ffi.string(lib.pccl_strerror(rv)).decode()
    return cls(f"{what}: {text}" if what else text, rv)


def check(rv: int, what: str = "") -> None:
    """Raise the matching :class:`pccl.PcclError` unless ``rv`` is 0."""
    if rv:
        raise error_for(rv, what)


def version() -> str:
    """Version string of the compiled core."""
    return ffi.string(lib.pccl_version()).decode()


# --------------------------------------------------------------------------
# Buffers: numpy arrays and contiguous CPU torch tensors, never copied.

_NUMPY_DTYPES = {
    np.dtype(np.float32): DType.FLOAT32,
    np.dtype(np.float64): DType.FLOAT64,
    np.dtype(np.float16): DType.FLOAT16,
    np.dtype(np.int8): DType.INT8,
    np.dtype(np.int16): DType.INT16,
    np.dtype(np.int32): DType.INT32,
    np.dtype(np.int64): DType.INT64,
    np.dtype(np.uint8): DType.UINT8,
}

_torch_dtypes: dict[Any, DType] | None = None


def _torch_dtype_table() -> dict[Any, DType]:
    global _torch_dtypes
    if _torch_dtypes is None:
        import torch

        _torch_dtypes = {
            torch.float32: DType.FLOAT32,
            torch.float64: DType.FLOAT64,
            torch.float16: DType.FLOAT16,
            torch.bfloat16: DType.BFLOAT16,
            torch.int8: DType.INT8,
            torch.int16: DType.INT16,
            torch.int32: DType.INT32,
            torch.int64: DType.INT64,
            torch.uint8: DType.UINT8,
        }
    return _torch_dtypes


def _is_torch_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "data_ptr")


def buffer_info(x: Any, name: str = "tensor", writable: bool = False):
    """``(address, element count, DType, shape)`` of ``x`` without copying.

    Raises :class:`pccl.InvalidArgumentError` (a ``ValueError``) for
    anything the core cannot read in place: other types, unsupported
    dtypes, non-contiguous layouts, non-CPU devices, read-only arrays
    when ``writable``.
    """
    if isinstance(x, np.ndarray):
        dtype = _NUMPY_DTYPES.get(x.dtype)
        if dtype is None:
            raise errors.InvalidArgumentError(
                f"{name}: dtype {x.dtype} is not supported "
                f"(use one of {', '.join(str(d) for d in _NUMPY_DTYPES)}, or torch.bfloat16)"
            )
        if not x.flags.c_contiguous:
            raise errors.InvalidArgumentError(f"{name}: array must be C-contiguous")
        if writable and not x.flags.writeable:
            raise errors.InvalidArgumentError(f"{name}: array is read-only")
        return x.ctypes.data, x.size, dtype, x.shape
    if _is_torch_tensor(x):
        dtype = _torch_dtype_table().get(x.dtype)
        if dtype is None:
            raise errors.InvalidArgumentError(f"{name}: dtype {x.dtype} is not supported")
        if x.device.type != "cpu":
            raise errors.InvalidArgumentError(
                f"{name}: tensor is on {x.device}; pccl reduces CPU tensors"
            )
        if not x.is_contiguous():
            raise errors.InvalidArgumentError(f"{name}: tensor must be contiguous")
        return x.data_ptr(), x.numel(), dtype, tuple(x.shape)
    raise errors.InvalidArgumentError(
        f"{name}: expected a numpy array or a CPU torch tensor, got {type(x).__name__}"
    )


def _overlap(a_addr: int, a_len: int, b_addr: int, b_len: int) -> bool:
    return a_addr < b_addr + b_len and b_addr < a_addr + a_len


def _enum_arg(enum_cls, value, name: str):
    """``enum_cls(value)``, or InvalidArgumentError naming the argument."""
    try:
        return enum_cls(value)
    except (ValueError, TypeError):
        choices = ", ".join(f"{enum_cls.__name__}.{m.name}" for m in enum_cls)
        raise errors.InvalidArgumentError(
            f"{name} must be one of {choices}, got {value!r}"
        ) from None


def _timeout_ms(timeout: float | None) -> int:
    if timeout is None:
        return -1
    if timeout < 0:
        raise errors.InvalidArgumentError("timeout must be >= 0 or None")
    return min(int(timeout * 1000), 2**31 - 1)


# --------------------------------------------------------------------------
# Handles.


class AllReduceHandle(ReduceHandle):
    """An all-reduce of the native core in flight (a :class:`pccl.ReduceHandle`);
    the buffers stay referenced until ``wait`` returned or raised."""

    __slots__ = ("_h", "_keep", "_result", "_lock", "_progress_timeout", "_what", "__weakref__")

    def __init__(self, h, keep: tuple, progress_timeout: float | None = None,
                 what: str = "all_reduce"):
        self._what = what  # the collective, for messages
        self._h = h
        self._keep = keep
        self._result: ReduceInfo | BaseException | None = None
        self._lock = threading.Lock()
        self._progress_timeout = progress_timeout

    def wait(self, timeout: float | None = None) -> ReduceInfo:
        """Block until the operation ends.  With a ``timeout`` (seconds)
        :class:`pccl.PcclTimeoutError` is raised when it passes and the
        operation keeps running; call ``wait`` again or abort the comm."""
        if not self._lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            raise errors.PcclTimeoutError(
                f"{self._what} wait: another thread is waiting; not done after {timeout:g} s"
            )
        try:
            if self._result is None:
                info = ffi.new("pccl_reduce_info *")
                rv = lib.pccl_op_wait(self._h, _timeout_ms(timeout), info)
                if rv == lib.PCCL_ETIMEDOUT and timeout is not None:
                    raise errors.PcclTimeoutError(
                        f"{self._what} wait: the operation is still running after {timeout:g} s "
                        "(wait again, or abort)",
                        rv,
                    )
                if rv == lib.PCCL_ETIMEDOUT:
                    self._result = errors.PcclTimeoutError(
                        f"{self._what}: the ring moved no byte for the progress timeout"
                        + (f" ({self._progress_timeout:g} s)" if self._progress_timeout else ""),
                        rv,
                    )
                elif rv:
                    self._result = error_for(rv, self._what)
                else:
                    self._result = ReduceInfo(info.world, info.tx_bytes, info.rx_bytes)
                self._release()
        finally:
            self._lock.release()
        if isinstance(self._result, BaseException):
            raise self._result
        return self._result

    def done(self) -> bool:
        """True once ``wait`` has returned or raised."""
        return self._result is not None

    def _release(self) -> None:
        h, self._h = self._h, None
        if h is not None:
            lib.pccl_op_free(h)  # aborts and waits if still running
        self._keep = ()

    def __del__(self):
        # Free (abort + join) before the referenced buffers can go away.
        try:
            self._release()
        except Exception:
            pass


class P2PHandle:
    """A send or recv of the native core in flight; the buffer stays
    referenced until ``wait`` returned or raised."""

    __slots__ = ("_h", "_keep", "_result", "_lock", "_what", "_timeout", "__weakref__")

    def __init__(self, h, keep: tuple, what: str, timeout: float | None):
        self._h = h
        self._keep = keep
        self._result: int | BaseException | None = None
        self._lock = threading.Lock()
        self._what = what
        self._timeout = timeout

    def wait(self, timeout: float | None = None) -> int:
        """Block until the operation ends; returns the message size in bytes.
        With a ``timeout`` (seconds) :class:`pccl.PcclTimeoutError` is raised
        when it passes and the operation keeps running."""
        if not self._lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            raise errors.PcclTimeoutError(f"{self._what} wait: another thread is waiting")
        try:
            if self._result is None:
                nbytes = ffi.new("uint64_t *")
                rv = lib.pccl_p2p_wait(self._h, _timeout_ms(timeout), nbytes)
                if rv == lib.PCCL_ETIMEDOUT and timeout is not None:
                    raise errors.PcclTimeoutError(
                        f"{self._what} wait: still running after {timeout:g} s", rv
                    )
                if rv == lib.PCCL_ETIMEDOUT:
                    self._result = errors.PcclTimeoutError(
                        f"{self._what}: not done within its deadline"
                        + (f" ({self._timeout:g} s)" if self._timeout else ""), rv)
                elif rv:
                    self._result = error_for(rv, self._what)
                else:
                    self._result = int(nbytes[0])
                self._release()
        finally:
            self._lock.release()
        if isinstance(self._result, BaseException):
            raise self._result
        return self._result

    def done(self) -> bool:
        """True once ``wait`` has returned or raised."""
        return self._result is not None

    def _release(self) -> None:
        h, self._h = self._h, None
        if h is not None:
            lib.pccl_p2p_free(h)  # aborts if still running
        self._keep = ()

    def __del__(self):
        try:
            self._release()
        except Exception:
            pass


class NativeComm:
    """One native communicator: a listener, an I/O thread and at most one
    ring of K striped TCP connections per neighbour.

    The master-driven :class:`pccl.Communicator` and the master-less
    :class:`pccl.StaticRing` are both built on it.
    """

    def __init__(
        self,
        listen: str = "127.0.0.1:0",
        p2p_connections: int = 4,
        secret: bytes | str | None = None,
        slice_bytes: int | None = None,
        progress_timeout: float | None = 60.0,
        handshake_timeout: float = 5.0,
    ):
        cfg = ffi.new("pccl_comm_config *")
        check(lib.pccl_comm_config_init(cfg), "config")
        listen_c = ffi.new("char[]", listen.encode())
        cfg.listen_addr = listen_c
        if not 1 <= p2p_connections <= lib.PCCL_MAX_CONNECTIONS:
            raise errors.InvalidArgumentError(
                f"p2p_connections must be in 1..{lib.PCCL_MAX_CONNECTIONS}, got {p2p_connections}"
            )
        cfg.p2p_connections = p2p_connections
        if slice_bytes is not None:
            cfg.slice_bytes = slice_bytes
        cfg.progress_timeout_ms = -1 if progress_timeout is None else _timeout_ms(progress_timeout)
        cfg.handshake_timeout_ms = _timeout_ms(handshake_timeout)
        secret_c = None
        if secret is not None:
            secret_b = secret.encode() if isinstance(secret, str) else bytes(secret)
            if not secret_b:
                raise errors.InvalidArgumentError("secret must not be empty")
            secret_c = ffi.new("uint8_t[]", secret_b)
            cfg.secret = secret_c
            cfg.secret_len = len(secret_b)
        out = ffi.new("pccl_comm **")
        check(lib.pccl_comm_create(cfg, out), f"create communicator listening on {listen}")
        self._comm = ffi.gc(out[0], lib.pccl_comm_free)
        self.p2p_connections = p2p_connections
        self._progress_timeout = progress_timeout
        self._closed = False
        buf = ffi.new("char[]", lib.PCCL_ADDRSTRLEN)
        check(lib.pccl_comm_listen_address(self._comm, buf, len(buf)), "listen address")
        self.address: str = ffi.string(buf).decode()
        self.world_size = 1
        self.ring_rank = 0

    # -- ring -------------------------------------------------------------

    def set_ring(
        self,
        epoch: int,
        rank: int,
        world: int,
        next_addr: str | None,
        bind_addrs: Sequence[str] | None = None,
        timeout: float | None = 30.0,
        port_ranges: Sequence[tuple[int, int] | None] | None = None,
        out_weights: Sequence[int] | None = None,
        in_weights: Sequence[int] | None = None,
    ) -> None:
        """Replace the ring (blocks until all 2K connections are up).

        A flow-splitting plan (``docs/flowsplit.md``), each a list of K
        entries or None: ``port_ranges[k]`` pins outbound connection k to a
        path by binding a free source port of ``(lo, hi)`` (None: any);
        ``out_weights[k]`` is the share of every operation's slices that
        outbound connection k carries; ``in_weights`` are the previous
        rank's ``out_weights`` (both ends must agree).  All None: equal
        striping, no pin."""
        self._check_open()
        if world < 1 or not 0 <= rank < world:
            raise errors.InvalidArgumentError(f"rank {rank} is not in a world of {world}")
        ring = ffi.new("pccl_ring_config *")
        ring.epoch = epoch
        ring.rank = rank
        ring.world = world
        keep = []
        if world > 1:
            if not next_addr:
                raise errors.InvalidArgumentError("next_addr is required when world > 1")
            keep.append(ffi.new("char[]", next_addr.encode()))
            ring.next_addr = keep[-1]
        if bind_addrs:
            arr = ffi.new("char *[]", len(bind_addrs))
            for i, a in enumerate(bind_addrs):
                keep.append(ffi.new("char[]", a.encode()))
                arr[i] = keep[-1]
            keep.append(arr)
            ring.bind_addrs = arr
            ring.n_bind_addrs = len(bind_addrs)
        ring.timeout_ms = _timeout_ms(timeout)
        k_conns = self.p2p_connections
        if port_ranges is not None:
            if len(port_ranges) != k_conns:
                raise errors.InvalidArgumentError(
                    f"port_ranges has {len(port_ranges)} entries, "
                    f"the ring has {k_conns} connections"
                )
            lo = ffi.new("uint16_t[]", k_conns)
            hi = ffi.new("uint16_t[]", k_conns)
            for k, pr in enumerate(port_ranges):
                if pr is None:
                    continue
                a, b = int(pr[0]), int(pr[1])
                if not 1 <= a <= b <= 65535:
                    raise errors.InvalidArgumentError(
                        f"port range {pr!r} is not 1 <= lo <= hi <= 65535"
                    )
                lo[k], hi[k] = a, b
            keep += [lo, hi]
            ring.out_port_lo = lo
            ring.out_port_hi = hi
        for name, ws in (("out_weights", out_weights), ("in_weights", in_weights)):
            if ws is None:
                continue
            if len(ws) != k_conns:
                raise errors.InvalidArgumentError(
                    f"{name} has {len(ws)} entries, the ring has {k_conns} connections"
                )
            arr = ffi.new("uint32_t[]", [int(w) for w in _fit_weights(ws, name)])
            keep.append(arr)
            setattr(ring, name, arr)
        rv = lib.pccl_comm_set_ring(self._comm, ring)
        if rv == lib.PCCL_ETIMEDOUT and timeout is not None:
            raise errors.PcclTimeoutError(
                f"set ring (epoch {epoch}): the ring's connections were not all up "
                f"after {timeout:g} s",
                rv,
            )
        check(rv, f"set ring (epoch {epoch})")
        self.world_size = world
        self.ring_rank = rank

    def conn_address(self, k: int) -> str:
        """The local ``host:port`` of outbound ring connection ``k`` (to
        check a path pin)."""
        self._check_open()
        buf = ffi.new("char[]", lib.PCCL_ADDRSTRLEN)
        check(lib.pccl_comm_ring_conn_address(self._comm, int(k), buf, len(buf)), "conn address")
        return ffi.string(buf).decode()

    # -- all-reduce -------------------------------------------------------

    def _prepare(self, x, out, op, quantization, tag):
        """Check the arguments of an all-reduce; returns the C arguments
        (src, dst, count, dtype, op, quantization, tag) and the objects to
        keep alive while it runs."""
        self._check_open()
        op = _enum_arg(ReduceOp, op, "op")
        quantization = _enum_arg(Quantization, quantization, "quantization")
        tag = errors.check_int(tag, "tag", 0, 2**64)
        src, count, dtype, shape = buffer_info(x, "x")
        if out is None or out is x:
            if isinstance(x, np.ndarray) and not x.flags.writeable:
                raise errors.InvalidArgumentError("x: array is read-only (pass out=)")
            dst = src
            keep = (x,)
        else:
            dst, ocount, odtype, oshape = buffer_info(out, "out", writable=True)
            if odtype != dtype or oshape != shape:
                raise errors.InvalidArgumentError(
                    f"out must match x: x is {dtype.name}{list(shape)}, "
                    f"out is {odtype.name}{list(oshape)}"
                )
            nbytes = count * _ELEMENT_SIZE[dtype]
            if dst != src and _overlap(src, nbytes, dst, nbytes):
                raise errors.InvalidArgumentError("x and out overlap partially")
            keep = (x, out)
        if quantization != Quantization.NONE and dtype not in _FLOAT_DTYPES:
            # The core answers PCCL_EINVAL (a bad argument) for this too.
            raise errors.InvalidArgumentError(
                f"quantization {quantization.name} needs a floating dtype, got {dtype.name}"
            )
        args = (ffi.cast("void *", src), ffi.cast("void *", dst), count, int(dtype), int(op),
                int(quantization), tag)
        return args, keep

    def _start(self, x, out, op, quantization, tag):
        args, keep = self._prepare(x, out, op, quantization, tag)
        h = ffi.new("pccl_op_handle **")
        check(lib.pccl_comm_all_reduce_start(self._comm, *args, h), "all_reduce")
        return AllReduceHandle(h[0], keep, self._progress_timeout)

    def all_reduce_async(
        self, x: Any, out: Any = None, *, op: ReduceOp | int = ReduceOp.SUM,
        quantization: Quantization | int = Quantization.NONE, tag: int = 0,
    ) -> ReduceHandle:
        """Start an all-reduce striped over all connections; returns a
        :class:`pccl.ReduceHandle` whose ``wait(timeout=None)`` gives the
        :class:`ReduceInfo`."""
        return self._start(x, out, op, quantization, tag)

    def all_reduce(
        self, x: Any, out: Any = None, *, op: ReduceOp | int = ReduceOp.SUM,
        quantization: Quantization | int = Quantization.NONE, tag: int = 0,
        timeout: float | None = None,
    ) -> ReduceInfo:
        """Reduce ``x`` across the ring into ``out`` (in place when None).

        On failure ``x`` is unchanged.  A ``timeout`` (seconds) that passes
        aborts the ring (:class:`pccl.PcclTimeoutError`)."""
        # The blocking C call (GIL released by cffi): when the engine
        # thread is idle it runs the operation on this thread, with no
        # hand-off between threads; a timeout breaks the ring.
        args, keep = self._prepare(x, out, op, quantization, tag)
        info = ffi.new("pccl_reduce_info *")
        rv = lib.pccl_comm_all_reduce(self._comm, *args, _timeout_ms(timeout), info)
        del keep
        if rv == lib.PCCL_ETIMEDOUT and timeout is not None:
            raise errors.PcclTimeoutError(
                f"all_reduce: not finished after {timeout:g} s (the ring is now broken)", rv
            )
        if rv == lib.PCCL_ETIMEDOUT:
            raise errors.PcclTimeoutError(
                "all_reduce: the ring moved no byte for the progress timeout"
                + (f" ({self._progress_timeout:g} s)" if self._progress_timeout else ""),
                rv,
            )
        check(rv, "all_reduce")
        return ReduceInfo(info.world, info.tx_bytes, info.rx_bytes)

    # -- broadcast, all-gather, reduce-scatter, barrier (docs/collectives.md)
    #
    # Every argument is checked here, before any byte moves; the blocking
    # forms are start + wait.  On failure an input (the root's buffer, x)
    # is unchanged; an output-only buffer (out, a non-root's x) holds
    # anything.

    def _handle(self, rv: int, h, keep: tuple, what: str) -> AllReduceHandle:
        check(rv, what)
        return AllReduceHandle(h[0], keep, self._progress_timeout, what)

    def broadcast_async(self, x: Any, root: int = 0, *, tag: int = 0) -> ReduceHandle:
        """Start a broadcast of ``x`` from ring rank ``root`` into ``x`` on
        every other rank; returns a :class:`pccl.ReduceHandle`."""
        self._check_open()
        root = errors.check_int(root, "root", 0, self.world_size)
        tag = errors.check_int(tag, "tag", 0, 2**64)
        addr, count, dtype, _ = buffer_info(x, "x", writable=self.ring_rank != root)
        h = ffi.new("pccl_op_handle **")
        rv = lib.pccl_comm_broadcast_start(self._comm, ffi.cast("void *", addr), count,
                                           int(dtype), root, tag, h)
        return self._handle(rv, h, (x,), "broadcast")

    def broadcast(self, x: Any, root: int = 0, *, tag: int = 0,
                  timeout: float | None = None) -> ReduceInfo:
        """Broadcast ``x`` from ring rank ``root`` (in place).  A ``timeout``
        (seconds) that passes aborts the ring (:class:`pccl.PcclTimeoutError`)."""
        self._check_open()
        root = errors.check_int(root, "root", 0, self.world_size)
        tag = errors.check_int(tag, "tag", 0, 2**64)
        addr, count, dtype, _ = buffer_info(x, "x", writable=self.ring_rank != root)
        info = ffi.new("pccl_reduce_info *")
        # Blocking in C (GIL released): the caller's thread drives the op
        # when the engine is idle, as for all_reduce.
        rv = lib.pccl_comm_broadcast(self._comm, ffi.cast("void *", addr), count, int(dtype),
                                     root, tag, _timeout_ms(timeout), info)
        return self._blocking_result(rv, info, "broadcast", timeout)

    def _blocking_result(self, rv: int, info, what: str, timeout: float | None) -> ReduceInfo:
        """The outcome of a blocking C collective, errors as all_reduce's."""
        if rv == lib.PCCL_ETIMEDOUT and timeout is not None:
            raise errors.PcclTimeoutError(
                f"{what}: not finished after {timeout:g} s (the ring is now broken)", rv
            )
        if rv == lib.PCCL_ETIMEDOUT:
            raise errors.PcclTimeoutError(
                f"{what}: the ring moved no byte for the progress timeout"
                + (f" ({self._progress_timeout:g} s)" if self._progress_timeout else ""),
                rv,
            )
        check(rv, what)
        return ReduceInfo(info.world, info.tx_bytes, info.rx_bytes)

    def _gather_args(self, x: Any, out: Any):
        src, count, dtype, _ = buffer_info(x, "x")
        dst, ocount, odtype, _ = buffer_info(out, "out", writable=True)
        if odtype != dtype:
            raise errors.InvalidArgumentError(
                f"out must have x's dtype: x is {dtype.name}, out is {odtype.name}"
            )
        return src, count, dst, ocount, dtype

    def all_gather_async(self, x: Any, out: Any, *, tag: int = 0) -> ReduceHandle:
        """Start an all-gather of every rank's ``x`` into ``out`` (``world *
        x.size`` elements, rank order); returns a :class:`pccl.ReduceHandle`."""
        src, dst, count, dtype, tag = self._all_gather_args(x, out, tag)
        h = ffi.new("pccl_op_handle **")
        rv = lib.pccl_comm_all_gather_start(self._comm, ffi.cast("void *", src),
                                            ffi.cast("void *", dst), count, int(dtype), tag, h)
        return self._handle(rv, h, (x, out), "all_gather")

    def _all_gather_args(self, x: Any, out: Any, tag: int):
        self._check_open()
        tag = errors.check_int(tag, "tag", 0, 2**64)
        src, count, dst, ocount, dtype = self._gather_args(x, out)
        n = self.world_size
        if ocount != n * count:
            raise errors.InvalidArgumentError(
                f"all_gather: out must have group_world_size * x.size = {n} * {count} "
                f"elements, has {ocount}"
            )
        es = _ELEMENT_SIZE[dtype]
        if _overlap(src, count * es, dst, ocount * es) and src != dst + self.ring_rank * count * es:
            raise errors.InvalidArgumentError(
                "all_gather: x overlaps out other than as out's block for this rank"
            )
        return src, dst, count, dtype, tag

    def all_gather(self, x: Any, out: Any, *, tag: int = 0,
                   timeout: float | None = None) -> ReduceInfo:
        """Gather every rank's ``x`` into ``out`` in rank order."""
        src, dst, count, dtype, tag = self._all_gather_args(x, out, tag)
        info = ffi.new("pccl_reduce_info *")
        rv = lib.pccl_comm_all_gather(self._comm, ffi.cast("void *", src),
                                      ffi.cast("void *", dst), count, int(dtype), tag,
                                      _timeout_ms(timeout), info)
        return self._blocking_result(rv, info, "all_gather", timeout)

    def reduce_scatter_async(
        self, x: Any, out: Any, *, op: ReduceOp | int = ReduceOp.SUM,
        quantization: Quantization | int = Quantization.NONE, tag: int = 0,
    ) -> ReduceHandle:
        """Start a reduce-scatter: ``x`` has ``world * out.size`` elements;
        ring rank r receives chunk r reduced over every rank into ``out``.
        Returns a :class:`pccl.ReduceHandle`."""
        args = self._reduce_scatter_args(x, out, op, quantization, tag)
        h = ffi.new("pccl_op_handle **")
        rv = lib.pccl_comm_reduce_scatter_start(self._comm, *args, h)
        return self._handle(rv, h, (x, out), "reduce_scatter")

    def _reduce_scatter_args(self, x, out, op, quantization, tag) -> tuple:
        self._check_open()
        op = _enum_arg(ReduceOp, op, "op")
        quantization = _enum_arg(Quantization, quantization, "quantization")
        tag = errors.check_int(tag, "tag", 0, 2**64)
        src, count, dst, ocount, dtype = self._gather_args(x, out)
        n = self.world_size
        if count != n * ocount:
            raise errors.InvalidArgumentError(
                f"reduce_scatter: x must have group_world_size * out.size = {n} * {ocount} "
                f"elements, has {count}"
            )
        es = _ELEMENT_SIZE[dtype]
        if _overlap(src, count * es, dst, ocount * es):
            raise errors.InvalidArgumentError("reduce_scatter: x and out overlap")
        if quantization != Quantization.NONE and dtype not in _FLOAT_DTYPES:
            raise errors.InvalidArgumentError(
                f"quantization {quantization.name} needs a floating dtype, got {dtype.name}"
            )
        return (ffi.cast("void *", src), ffi.cast("void *", dst), count, int(dtype), int(op),
                int(quantization), tag)

    def reduce_scatter(
        self, x: Any, out: Any, *, op: ReduceOp | int = ReduceOp.SUM,
        quantization: Quantization | int = Quantization.NONE, tag: int = 0,
        timeout: float | None = None,
    ) -> ReduceInfo:
        """Reduce ``x`` over the ring; this rank's chunk goes to ``out``."""
        args = self._reduce_scatter_args(x, out, op, quantization, tag)
        info = ffi.new("pccl_reduce_info *")
        rv = lib.pccl_comm_reduce_scatter(self._comm, *args, _timeout_ms(timeout), info)
        return self._blocking_result(rv, info, "reduce_scatter", timeout)

    def barrier_async(self, *, tag: int = 0) -> ReduceHandle:
        """Start a barrier: its ``wait()`` returns once every rank entered."""
        self._check_open()
        tag = errors.check_int(tag, "tag", 0, 2**64)
        h = ffi.new("pccl_op_handle **")
        rv = lib.pccl_comm_barrier_start(self._comm, tag, h)
        return self._handle(rv, h, (), "barrier")

    def barrier(self, *, tag: int = 0, timeout: float | None = None) -> ReduceInfo:
        """Return once every rank of the ring entered the barrier."""
        self._check_open()
        tag = errors.check_int(tag, "tag", 0, 2**64)
        info = ffi.new("pccl_reduce_info *")
        rv = lib.pccl_comm_barrier(self._comm, tag, _timeout_ms(timeout), info)
        return self._blocking_result(rv, info, "barrier", timeout)

    # -- shared-state transfers --------------------------------------------

    def publish(self, key: int, address: int, nbytes: int) -> None:
        """Serve ``nbytes`` at ``address`` read-only under ``key`` to
        authenticated peers (:meth:`fetch`).  The memory must stay valid and
        unchanged until :meth:`unpublish` returns; the caller keeps it alive."""
        self._check_open()
        check(
            lib.pccl_comm_publish(self._comm, key, ffi.cast("const void *", address), nbytes),
            f"publish key {key:#x}",
        )

    def unpublish(self, key: int) -> int:
        """Withdraw ``key`` (cutting off sends in flight); returns the payload
        bytes served from it."""
        tx = ffi.new("uint64_t *")
        if self._closed:
            return 0
        check(lib.pccl_comm_unpublish(self._comm, key, tx), f"unpublish key {key:#x}")
        return int(tx[0])

    def fetch(
        self,
        address: str,
        key: int,
        offset: int,
        nbytes: int,
        dst: int,
        timeout: float | None = 30.0,
    ) -> tuple[int, errors.PcclError | None]:
        """Copy bytes ``[offset, offset + nbytes)`` of what the peer at
        ``address`` published under ``key`` to memory at ``dst``.  Returns
        ``(bytes received, error or None)``: the bytes received are a prefix
        of the range, also when the transfer failed.  Releases the GIL, so
        several threads can fetch at once.  ``timeout``: seconds without
        progress."""
        self._check_open()
        got = ffi.new("uint64_t *")
        rv = lib.pccl_comm_fetch(
            self._comm,
            address.encode(),
            key,
            offset,
            nbytes,
            ffi.cast("void *", dst),
            _timeout_ms(timeout),
            got,
        )
        if rv == lib.PCCL_ETIMEDOUT and timeout is not None:
            return int(got[0]), errors.PcclTimeoutError(
                f"fetch from {address}: no byte for {timeout:g} s", rv
            )
        return int(got[0]), (error_for(rv, f"fetch from {address}") if rv else None)

    # -- point-to-point (core/p2p.c) ----------------------------------------

    def set_peer_id(self, run_token: int, peer_number: int) -> None:
        """Name this peer for point-to-point: the run's token and its peer
        number (the same values every time)."""
        self._check_open()
        check(lib.pccl_comm_set_peer_id(self._comm, run_token, peer_number), "set peer id")

    def send_async(self, x: Any, peer_number: int, peer_address: str, tag: int = 0,
                   timeout: float | None = None) -> P2PHandle:
        """Start sending the bytes of ``x`` to the peer; ``wait`` returns
        once the receiver holds all of them.  ``x`` is only read."""
        self._check_open()
        tag = errors.check_int(tag, "tag", 0, 2**64)
        addr, count, dtype, _ = buffer_info(x, "x")
        h = ffi.new("pccl_p2p_handle **")
        check(lib.pccl_comm_send_start(self._comm, peer_number, peer_address.encode(),
                                       ffi.cast("const void *", addr),
                                       count * _ELEMENT_SIZE[dtype], tag, _timeout_ms(timeout),
                                       h), "send")
        return P2PHandle(h[0], (x,), "send", timeout)

    def recv_async(self, out: Any, peer_number: int, tag: int = 0,
                   timeout: float | None = None) -> P2PHandle:
        """Start receiving exactly ``out``'s size in bytes from the peer into
        ``out`` (unspecified after a failure)."""
        self._check_open()
        tag = errors.check_int(tag, "tag", 0, 2**64)
        addr, count, dtype, _ = buffer_info(out, "out", writable=True)
        h = ffi.new("pccl_p2p_handle **")
        check(lib.pccl_comm_recv_start(self._comm, peer_number, ffi.cast("void *", addr),
                                       count * _ELEMENT_SIZE[dtype], tag, _timeout_ms(timeout),
                                       h), "recv")
        return P2PHandle(h[0], (out,), "recv", timeout)

    def peer_lost(self, peer_number: int) -> None:
        """The control plane lost this peer: its sends/recvs fail now and later."""
        if not self._closed:
            check(lib.pccl_comm_peer_lost(self._comm, peer_number), "peer lost")
    def link_stats(self) -> tuple[int, int]:
        """``(bytes, busy_ns)`` of the outbound ring link as of the last
        completed op: bytes written while the link was the limit, and for
        how long (cumulative; see ``pccl_comm_link_stats``)."""
        if self._closed:
            return 0, 0
        b = ffi.new("uint64_t *")
        ns = ffi.new("uint64_t *")
        check(lib.pccl_comm_link_stats(self._comm, b, ns), "link stats")
        return int(b[0]), int(ns[0])

    # -- lifetime -----------------------------------------------------------

    def abort(self) -> None:
        """Fail every operation in flight (AbortedError) and break the ring.
        Never blocks; any thread."""
        if not self._closed:
            check(lib.pccl_comm_abort(self._comm), "abort")

    def abort_ring(self) -> None:
        """:meth:`abort` for the ring alone: point-to-point transfers go on."""
        if not self._closed:
            check(lib.pccl_comm_abort_ring(self._comm), "abort ring")

    def close(self) -> None:
        """Close every connection and stop the I/O thread.  Idempotent."""
        if not self._closed:
            self._closed = True
            lib.pccl_comm_close(self._comm)
            ffi.release(self._comm)

    def _check_open(self) -> None:
        if self._closed:
            raise errors.ClosedError("communicator is closed", lib.PCCL_ECLOSED)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_ELEMENT_SIZE = {d: 0 for d in DType}
for _d in DType:
    _sz = ffi.new("size_t *")
    check(lib.pccl_dtype_size(int(_d), _sz))
    _ELEMENT_SIZE[_d] = _sz[0]
del _d, _sz



def element_size(dtype: DType) -> int:
    """Bytes per element of ``dtype``."""
    return _ELEMENT_SIZE[dtype]


def tensor_memory(x: Any, name: str = "tensor") -> tuple[int, int, str, tuple[int, ...]]:
    """``(address, nbytes, dtype name, shape)`` of a contiguous tensor,
    without copying (for the shared-state layer)."""
    address, count, dtype, shape = buffer_info(x, name)
    return address, count * _ELEMENT_SIZE[dtype], dtype.name.lower(), tuple(int(d) for d in shape)


def memory_view(address: int, nbytes: int) -> bytes | memoryview:
    """A buffer over ``nbytes`` at ``address`` (no copy; the caller keeps
    the memory alive while the buffer is used)."""
    if nbytes == 0:
        return b""
    return memoryview(ffi.buffer(ffi.cast("char *", address), nbytes))


def copy_memory(dst: int, src: int, nbytes: int) -> None:
    """``memmove(dst, src, nbytes)`` between two addresses."""
    if nbytes:
        ffi.memmove(ffi.cast("void *", dst), ffi.cast("const void *", src), nbytes)


_FLOAT_DTYPES = frozenset({DType.FLOAT32, DType.FLOAT64, DType.FLOAT16, DType.BFLOAT16})


def _fit_weights(ws: Sequence[int], name: str) -> list[int]:
    """Non-negative integer weights, divided by their gcd and, if still
    above 32 bits, scaled down (the C side takes uint32)."""
    vals = []
    for w in ws:
        if isinstance(w, bool) or int(w) != w or w < 0:
            raise errors.InvalidArgumentError(f"{name} must be non-negative integers, got {w!r}")
        vals.append(int(w))
    g = math.gcd(*vals) if any(vals) else 1
    vals = [v // g for v in vals]
    top = max(vals)
    if top >= 1 << 32:
        vals = [max(1, v * ((1 << 32) - 1) // top) if v else 0 for v in vals]
    return vals


class StaticRing(NativeComm):
    """A ring without a master: every rank knows every other rank's address
    (like Gloo's full-mesh rendezvous).  For tests and benchmarks; training
    jobs use :class:`pccl.Communicator`.

    >>> ring = StaticRing(rank, world)            # binds 127.0.0.1:0
    >>> addresses = exchange(ring.address)        # your rendezvous
    >>> ring.connect(addresses)
    >>> ring.all_reduce(x)
    """

    def __init__(self, rank: int, world: int, listen: str = "127.0.0.1:0", **kwargs: Any) -> None:
        if world < 1 or not 0 <= rank < world:
            raise errors.InvalidArgumentError(f"rank {rank} is not in a world of {world}")
        super().__init__(listen=listen, **kwargs)
        self.rank = rank
        self.world = world

    def connect(
        self,
        addresses: Sequence[str],
        timeout: float | None = 30.0,
        epoch: int = 0,
        bind_addrs: Sequence[str] | None = None,
        port_ranges: Sequence[tuple[int, int] | None] | None = None,
        out_weights: Sequence[int] | None = None,
        in_weights: Sequence[int] | None = None,
    ) -> None:
        """Build the ring from every rank's address (index = rank).  The
        flow-splitting arguments are those of :meth:`set_ring`
        (:func:`pccl.flowsplit.ring_pins` makes them from a plan)."""
        if len(addresses) != self.world:
            raise errors.InvalidArgumentError(
                f"expected {self.world} addresses, got {len(addresses)}"
            )
        nxt = addresses[(self.rank + 1) % self.world] if self.world > 1 else None
        self.set_ring(
            epoch,
            self.rank,
            self.world,
            nxt,
            bind_addrs=bind_addrs,
            timeout=timeout,
            port_ranges=port_ranges,
            out_weights=out_weights,
            in_weights=in_weights,
        )

