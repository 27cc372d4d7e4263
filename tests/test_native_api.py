"""The Python API over the native core: bindings agree with pccl.h, errors
map onto the exception hierarchy, arguments are validated before any byte
is sent, and the connection edge cases (secrets, refused ports, abort,
timeouts, close) end within their deadlines."""

from __future__ import annotations

import contextlib
import errno
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import pccl
from pccl import _native, errors

lib = _native.lib

HEADER = Path(__file__).resolve().parents[1] / "native" / "include" / "pccl.h"

pytestmark = pytest.mark.timeout(60)


def header_text() -> str:
    return re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)


def header_enum(name: str) -> dict[str, int]:
    """Members of ``enum name { ... }`` in pccl.h, with their values."""
    m = re.search(r"enum\s+" + name + r"\s*\{(.*?)\}", header_text(), flags=re.S)
    assert m, f"enum {name} not found in {HEADER}"
    return {
        k: int(v, 0) for k, v in re.findall(r"(PCCL_\w+)\s*=\s*(0x[0-9a-fA-F]+|\d+)", m.group(1))
    }


@contextlib.contextmanager
def two_rings(*per_rank: dict, **kwargs) -> Iterator[list[pccl.StaticRing]]:
    """Ranks 0 and 1 of one ring in this process, not connected yet
    (``per_rank[r]``: more arguments for rank r); closed on exit."""
    rings: list[pccl.StaticRing] = []
    try:
        for r in range(2):
            rings.append(pccl.StaticRing(r, 2, **kwargs, **(per_rank[r] if per_rank else {})))
        yield rings
    finally:
        for ring in rings:
            ring.close()


def reduce_together(rings, xs, timeout: float) -> None:
    """All-reduce ``xs[r]`` on ``rings[r]``, every rank at once (in place)."""
    handles = [ring.all_reduce_async(x) for ring, x in zip(rings, xs, strict=True)]
    for h in handles:
        h.wait(timeout=timeout)


# --------------------------------------------------------------------------
# Bindings and the error table.


def test_every_public_function_is_reachable():
    names = sorted(set(re.findall(r"\b(pccl_\w+)\s*\(", header_text())))
    assert len(names) >= 10, names
    missing = [n for n in names if not hasattr(lib, n)]
    assert not missing, f"declared in pccl.h but not in pccl._pccl_native.lib: {missing}"


@pytest.mark.parametrize(
    "py_enum, c_prefix, c_enum",
    [
        (pccl.ReduceOp, "PCCL_", "pccl_op"),
        (pccl.Quantization, "PCCL_QUANT_", "pccl_quant"),
        (pccl.DType, "PCCL_", "pccl_dtype"),
    ],
)
def test_enum_values_match_the_header(py_enum, c_prefix, c_enum):
    c_values = header_enum(c_enum)
    for member in py_enum:
        c_name = c_prefix + member.name
        assert getattr(lib, c_name) == member.value == c_values[c_name], c_name
    # Every C value (but the *_COUNT sentinel) has a Python member.
    real = {k: v for k, v in c_values.items() if not k.endswith("_COUNT")}
    assert sorted(real.values()) == sorted(m.value for m in py_enum)
    count = [v for k, v in c_values.items() if k.endswith("_COUNT")]
    assert count == [len(py_enum)]


def test_error_table_maps_every_code():
    codes = header_enum("pccl_error")
    for name, code in codes.items():
        assert getattr(lib, name) == code, name
        if name in ("PCCL_OK", "PCCL_ESYSERR"):
            continue
        cls = _native._ERRORS.get(code)
        assert cls is not None and cls is not errors.PcclError, f"{name} has no exception class"
        exc = _native.error_for(code, "op")
        assert type(exc) is cls and exc.code == code
        assert str(exc).startswith("op: ") and len(str(exc)) > 5
    # Distinct codes, distinct classes.
    classes = [_native._ERRORS[c] for n, c in codes.items() if n not in ("PCCL_OK", "PCCL_ESYSERR")]
    assert len(set(classes)) == len(classes)
    _native.check(0)  # no exception


def test_strerror_never_returns_null():
    ffi = _native.ffi
    for rv in (0, 1, 14, 15, 999, -1, 2**31 - 1, lib.PCCL_ESYSERR | errno.EPIPE):
        s = lib.pccl_strerror(rv)
        assert s != ffi.NULL and ffi.string(s)


def test_system_errors_carry_errno():
    exc = _native.error_for(lib.PCCL_ESYSERR | errno.ECONNRESET, "send")
    assert isinstance(exc, errors.PcclOSError) and isinstance(exc, OSError)
    assert exc.errno == errno.ECONNRESET and exc.code == lib.PCCL_ESYSERR | errno.ECONNRESET
    with pytest.raises(errors.PcclOSError):
        _native.check(lib.PCCL_ESYSERR | errno.ENOMEM)


# The built-in each class of the C error table must also be.
BUILTINS = {
    "InvalidArgumentError": ValueError,
    "NotSupportedError": ValueError,
    "AddressError": ValueError,
    "PcclTimeoutError": TimeoutError,
    "PeerLostError": ConnectionError,
    "AbortedError": ConnectionError,
    "ClosedError": ConnectionError,
    "RingBrokenError": ConnectionError,
    "ProtocolError": ConnectionError,
    "AuthenticationError": ConnectionError,
    "PcclConnectionRefusedError": ConnectionRefusedError,
    "StateError": RuntimeError,
    "BusyError": RuntimeError,
    "PcclOSError": OSError,
    "OutOfMemoryError": MemoryError,
}


def test_every_error_class_derives_from_pcclerror_and_a_builtin():
    defined = {
        n: v
        for n, v in vars(errors).items()
        if isinstance(v, type) and issubclass(v, BaseException) and v.__module__ == errors.__name__
    }
    assert set(BUILTINS) <= set(defined), set(BUILTINS) - set(defined)
    for name, cls in defined.items():
        assert issubclass(cls, errors.PcclError), name
        assert getattr(pccl, name) is cls, f"pccl.{name} is not exported"
        if cls is errors.PcclError:
            continue
        # Some built-in other than Exception itself, so `except` clauses work.
        builtins_ = [b for b in cls.__mro__ if b.__module__ == "builtins"]
        assert any(b not in (Exception, BaseException, object) for b in builtins_), name
        if name in BUILTINS:
            assert issubclass(cls, BUILTINS[name]), f"{name} is not a {BUILTINS[name].__name__}"
        exc = cls("msg", 3)
        assert exc.code == 3 and str(exc) == "msg"
    # Every class of the C error table is among them.
    assert set(_native._ERRORS.values()) <= set(defined.values())


def test_version():
    v = pccl.version()
    assert isinstance(v, str) and v
    assert pccl.__version__


# --------------------------------------------------------------------------
# World 1: identity, and argument checks that never reach the network.

NUMPY_DTYPES = ["float32", "float64", "float16", "int8", "int16", "int32", "int64", "uint8"]
TORCH_DTYPES = NUMPY_DTYPES + ["bfloat16"]


@pytest.mark.parametrize("op", list(pccl.ReduceOp), ids=lambda o: o.name)
@pytest.mark.parametrize(
    "lib_dtype",
    [("numpy", d) for d in NUMPY_DTYPES] + [("torch", d) for d in TORCH_DTYPES],
    ids="-".join,
)
def test_world1_is_identity(ring1, lib_dtype, op):
    kind, dtype = lib_dtype
    rng = np.random.default_rng(5)
    if dtype.startswith(("float", "bfloat")):
        vals = rng.uniform(-3, 3, size=(3, 37))
    else:
        info = np.iinfo(dtype)
        vals = rng.integers(info.min, info.max, size=(3, 37), endpoint=True)
    if kind == "numpy":
        x = vals.astype(dtype)
        raw = x.tobytes()
        out = np.zeros_like(x)
        info_ = ring1.all_reduce(x, out=out, op=op)
        assert out.tobytes() == raw and x.tobytes() == raw
        ring1.all_reduce(x, op=op)
        assert x.tobytes() == raw
    else:
        x = torch.from_numpy(vals).to(getattr(torch, dtype))
        ref = x.clone()
        out = torch.zeros_like(x)
        info_ = ring1.all_reduce(x, out=out, op=op)
        assert torch.equal(out, ref) and torch.equal(x, ref)
        ring1.all_reduce(x, op=op)
        assert torch.equal(x, ref)
    assert info_.world_size == 1


def test_world1_quantized_and_empty(ring1):
    x = np.linspace(-1, 1, 1000, dtype=np.float32)
    y = x.copy()
    ring1.all_reduce(y, quantization=pccl.Quantization.UINT8_MINMAX)
    # One peer: whatever the quantizer does, it stays within one step.
    assert np.max(np.abs(y - x)) <= 2.0 / 255
    for empty in (
        np.zeros(0, np.float32),
        torch.zeros(0, dtype=torch.bfloat16),
        np.zeros((0, 5), np.int64),
    ):
        ring1.all_reduce(empty)


def test_async_handle_world1(ring1):
    x = np.arange(10, dtype=np.int32)
    h = ring1.all_reduce_async(x, tag=3)
    info = h.wait(timeout=10)
    assert info.world_size == 1 and h.done()
    assert h.wait() == info  # idempotent
    assert np.array_equal(x, np.arange(10, dtype=np.int32))


@pytest.mark.parametrize(
    "x",
    [
        np.zeros(4, np.complex64),
        np.zeros(4, np.bool_),
        np.zeros(4, object),
        np.zeros(4, np.uint16),
        np.zeros(4, np.uint32),
        np.zeros(4, np.longdouble),
        np.zeros(4, "U3"),
        torch.zeros(4, dtype=torch.bool),
        torch.zeros(4, dtype=torch.complex64),
        torch.zeros(4, dtype=torch.uint16),
    ],
    ids=lambda x: f"{type(x).__module__.split('.')[0]}-{x.dtype}",
)
def test_rejects_unsupported_dtypes(ring1, x):
    with pytest.raises(pccl.InvalidArgumentError) as ei:
        ring1.all_reduce(x)
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, pccl.PcclError)


@pytest.mark.parametrize(
    "x",
    [[1.0, 2.0], b"abcd", 3.0, None, memoryview(b"1234")],
    ids=["list", "bytes", "float", "None", "memoryview"],
)
def test_rejects_non_tensors(ring1, x):
    with pytest.raises(pccl.InvalidArgumentError):
        ring1.all_reduce(x)


def _non_contiguous():
    a = np.arange(20, dtype=np.float32)
    m = np.arange(12, dtype=np.float64).reshape(3, 4)
    t = torch.arange(20, dtype=torch.float32)
    tm = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    return {
        "numpy-stride": a[::2],
        "numpy-fortran": np.asfortranarray(m),
        "numpy-transpose": m.T,
        "numpy-column": m[:, 1],
        "torch-stride": t[::2],
        "torch-transpose": tm.t(),
        "torch-expand": torch.zeros(1, 4).expand(3, 4),
    }


@pytest.mark.parametrize("name", list(_non_contiguous()))
def test_rejects_non_contiguous(ring1, name):
    x = _non_contiguous()[name]
    with pytest.raises(ValueError):
        ring1.all_reduce(x)
    # As the output too.
    if isinstance(x, np.ndarray):
        src = np.zeros(x.shape, x.dtype)
    else:
        src = torch.zeros(tuple(x.shape), dtype=x.dtype)
    with pytest.raises(ValueError):
        ring1.all_reduce(src, out=x)


def test_rejects_non_cpu_tensor(ring1):
    x = torch.empty(8, device="meta")
    with pytest.raises(ValueError, match="meta"):
        ring1.all_reduce(x)


def test_read_only_input(ring1):
    x = np.arange(6, dtype=np.float32)
    x.flags.writeable = False
    with pytest.raises(ValueError):
        ring1.all_reduce(x)
    with pytest.raises(ValueError):
        ring1.all_reduce(x, out=x)
    # A read-only source is fine when the result goes elsewhere...
    out = np.zeros_like(x)
    ring1.all_reduce(x, out=out)
    assert np.array_equal(out, np.arange(6, dtype=np.float32))
    # ...but not a read-only destination.
    with pytest.raises(ValueError):
        ring1.all_reduce(out, out=x)


@pytest.mark.parametrize(
    "out",
    [
        np.zeros(7, np.float32),
        np.zeros((2, 3), np.float32),
        np.zeros(6, np.float64),
        np.zeros(6, np.int32),
        torch.zeros(6, dtype=torch.float16),
        torch.zeros(7, dtype=torch.float32),
    ],
    ids=["longer", "reshaped", "float64", "int32", "torch-float16", "torch-longer"],
)
def test_rejects_mismatched_out(ring1, out):
    x = np.arange(6, dtype=np.float32)
    with pytest.raises(ValueError):
        ring1.all_reduce(x, out=out)
    assert np.array_equal(x, np.arange(6, dtype=np.float32))


def test_rejects_partially_overlapping_out(ring1):
    buf = np.arange(10, dtype=np.int32)
    with pytest.raises(ValueError):
        ring1.all_reduce(buf[:8], out=buf[2:])
    assert np.array_equal(buf, np.arange(10, dtype=np.int32))


@pytest.mark.parametrize("dtype", ["int8", "int16", "int32", "int64", "uint8"])
def test_quantization_needs_a_float_dtype(ring1, dtype):
    x = np.ones(16, dtype)
    with pytest.raises(pccl.InvalidArgumentError) as ei:
        ring1.all_reduce(x, quantization=pccl.Quantization.UINT8_MINMAX)
    assert isinstance(ei.value, ValueError)
    assert "floating dtype" in str(ei.value)
    # The C core, asked the same directly, answers with the code of the
    # same class: Python's early check and C's agree.
    lib, ffi = _native.lib, _native.ffi
    h = ffi.new("pccl_op_handle **")
    addr = x.ctypes.data
    rv = lib.pccl_comm_all_reduce_start(
        ring1._comm, ffi.cast("void *", addr), ffi.cast("void *", addr), x.size,
        int(_native.buffer_info(x)[2]), int(pccl.ReduceOp.SUM),
        int(pccl.Quantization.UINT8_MINMAX), 0, h,
    )
    assert rv != 0
    assert type(_native.error_for(rv)) is type(ei.value)


def test_rejects_unknown_op_and_quantization(ring1):
    x = np.ones(4, np.float32)
    for kwargs in ({"op": 17}, {"op": "SUM"}, {"quantization": 9}, {"quantization": None}):
        with pytest.raises(pccl.InvalidArgumentError) as ei:
            ring1.all_reduce(x, **kwargs)
        assert isinstance(ei.value, ValueError)


@pytest.mark.parametrize("tag", [-1, 2**64, 1.5, "0", None, True])
def test_rejects_bad_tags(ring1, tag):
    x = np.ones(4, np.float32)
    with pytest.raises(pccl.InvalidArgumentError) as ei:
        ring1.all_reduce(x, tag=tag)
    assert isinstance(ei.value, ValueError)
    np.testing.assert_array_equal(x, np.ones(4, np.float32))


@pytest.mark.parametrize("tag", [0, 2**64 - 1])
def test_accepts_tag_range(ring1, tag):
    x = np.ones(4, np.float32)
    ring1.all_reduce(x, tag=tag)


@pytest.mark.parametrize("k", [0, 65, -1, 1000])
def test_p2p_connections_out_of_range(k):
    with pytest.raises(ValueError):
        pccl.StaticRing(0, 1, p2p_connections=k)


@pytest.mark.parametrize("k", [1, 64])
def test_p2p_connections_limits_accepted(k):
    with pccl.StaticRing(0, 1, p2p_connections=k) as ring:
        assert ring.p2p_connections == k


@pytest.mark.parametrize("slice_bytes", [0, 100, 4095, 16777217, 2**31])
def test_slice_bytes_out_of_range(slice_bytes):
    with pytest.raises((ValueError, OverflowError)):
        pccl.StaticRing(0, 1, slice_bytes=slice_bytes)


@pytest.mark.parametrize(
    "listen",
    # Only strings that fail before any name lookup: no DNS traffic.
    ["", ":", "127.0.0.1:99999", "127.0.0.1:-1", "127.0.0.1:port", "[::1:0", "127.0.0.1:0:0"],
)
def test_bad_listen_address(listen):
    with pytest.raises(ValueError) as ei:
        pccl.StaticRing(0, 1, listen=listen)
    assert isinstance(ei.value, pccl.PcclError)


def test_listen_address_not_on_this_host():
    # 192.0.2.0/24 is TEST-NET-1: bind() fails, nothing is sent.
    with pytest.raises(pccl.PcclError) as ei:
        pccl.StaticRing(0, 1, listen="192.0.2.1:0")
    assert isinstance(ei.value, (pccl.AddressError, OSError))


def test_listen_address_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(pccl.PcclError) as ei:
            pccl.StaticRing(0, 1, listen=f"127.0.0.1:{port}")
        assert isinstance(ei.value, (pccl.AddressError, OSError))


def test_listen_address_is_bound_and_reported():
    with pccl.StaticRing(0, 1) as ring:
        host, port = ring.address.rsplit(":", 1)
        assert host == "127.0.0.1" and 0 < int(port) < 65536
        with socket.create_connection((host, int(port)), timeout=5):
            pass  # something listens there


@pytest.mark.parametrize("rank, world", [(0, 0), (2, 2), (-1, 3), (5, 1)])
def test_bad_rank_or_world(rank, world):
    with pytest.raises(ValueError):
        pccl.StaticRing(rank, world)


def test_connect_wants_one_address_per_rank():
    with pccl.StaticRing(0, 2) as ring:
        with pytest.raises(ValueError):
            ring.connect([ring.address])
        with pytest.raises(ValueError):
            ring.connect([ring.address] * 3)


def test_secret_must_not_be_empty():
    with pytest.raises(ValueError):
        pccl.StaticRing(0, 1, secret=b"")


def test_all_reduce_without_a_ring():
    with _native.NativeComm() as comm:
        with pytest.raises(pccl.StateError):
            comm.all_reduce(np.ones(4, np.float32))


def test_closed_communicator():
    ring = pccl.StaticRing(0, 1)
    ring.connect([ring.address], timeout=10)
    ring.close()
    ring.close()  # idempotent
    x = np.ones(4, np.float32)
    with pytest.raises(pccl.ClosedError) as ei:
        ring.all_reduce(x)
    assert isinstance(ei.value, ConnectionError)
    with pytest.raises(pccl.ClosedError):
        ring.all_reduce_async(x)
    with pytest.raises(pccl.ClosedError):
        ring.connect([ring.address])
    ring.abort()  # a no-op once closed
    with pccl.StaticRing(0, 1) as ring2:
        pass
    with pytest.raises(pccl.ClosedError):
        ring2.all_reduce(x)


# --------------------------------------------------------------------------
# Two ranks in this process.


def test_pair_sum_and_info(ring_pair):
    xs = [np.arange(1000, dtype=np.int64) * (r + 1) for r in range(2)]
    handles = [ring.all_reduce_async(x, tag=1) for ring, x in zip(ring_pair, xs, strict=True)]
    infos = [h.wait(timeout=20) for h in handles]
    for x in xs:
        assert np.array_equal(x, np.arange(1000, dtype=np.int64) * 3)
    for info in infos:
        assert info.world_size == 2
        # Each rank sends one chunk in each phase, plus headers.
        assert info.tx_bytes >= 8000 and info.rx_bytes >= 8000


def test_matching_secret(connect_concurrently):
    with two_rings(secret="s3cret", p2p_connections=3) as rings:
        errs, _ = connect_concurrently(rings, [r.address for r in rings], 10)
        assert errs == [None, None]
        xs = [np.full(100, r + 1, np.float32) for r in range(2)]
        reduce_together(rings, xs, timeout=20)
        assert all(np.all(x == 3) for x in xs)


@pytest.mark.parametrize(
    "secrets",
    [("alpha", "beta"), ("alpha", None), (None, "beta")],
    ids=["different", "only-rank0", "only-rank1"],
)
def test_wrong_secret_fails_within_timeout(connect_concurrently, secrets):
    timeout = 5.0
    with two_rings(*({"secret": s} for s in secrets), handshake_timeout=2.0) as rings:
        errs, elapsed = connect_concurrently(rings, [r.address for r in rings], timeout)
        assert all(isinstance(e, pccl.PcclError) for e in errs), errs
        assert all(isinstance(e, ConnectionError) for e in errs), errs
        assert any(isinstance(e, pccl.AuthenticationError) for e in errs), errs
        assert elapsed < timeout + 1.0


def test_connect_to_a_port_nobody_listens_on():
    timeout = 1.5
    with socket.socket() as s:  # holds the port so nobody else takes it
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
        with pccl.StaticRing(0, 2) as ring:
            t0 = time.monotonic()
            with pytest.raises(pccl.PcclError) as ei:
                ring.connect([ring.address, dead], timeout=timeout)
            elapsed = time.monotonic() - t0
    assert isinstance(ei.value, (ConnectionError, TimeoutError)), ei.value
    assert elapsed < timeout + 1.0


def test_previous_rank_never_connects():
    """Rank 0's successor listens but the predecessor never dials in."""
    timeout = 1.0
    with pccl.StaticRing(0, 3) as ring, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        t0 = time.monotonic()
        with pytest.raises(pccl.PcclError) as ei:
            ring.connect(
                [ring.address, f"127.0.0.1:{s.getsockname()[1]}", "127.0.0.1:1"], timeout=timeout
            )
        elapsed = time.monotonic() - t0
    assert isinstance(ei.value, (TimeoutError, ConnectionError)), ei.value
    assert elapsed < timeout + 1.5


def test_abort_wakes_an_operation_in_flight(ring_pair):
    """Rank 1 never joins; an abort from another thread ends rank 0's
    call with AbortedError, its input unchanged."""
    x = np.arange(100_000, dtype=np.float32)
    h = ring_pair[0].all_reduce_async(x)
    timer = threading.Timer(0.3, ring_pair[0].abort)
    t0 = time.monotonic()
    timer.start()
    try:
        with pytest.raises(pccl.AbortedError) as ei:
            h.wait(timeout=10)
    finally:
        timer.cancel()
    assert time.monotonic() - t0 < 2.0
    assert isinstance(ei.value, ConnectionError)
    assert np.array_equal(x, np.arange(100_000, dtype=np.float32))
    # The ring is broken until it is rebuilt.
    with pytest.raises(ConnectionError):
        ring_pair[0].all_reduce(np.ones(4, np.float32), timeout=5)


def test_timeout_aborts_and_leaves_input(ring_pair):
    x = torch.arange(5000, dtype=torch.float64)
    t0 = time.monotonic()
    with pytest.raises(pccl.PcclTimeoutError) as ei:
        ring_pair[0].all_reduce(x, timeout=0.5)
    elapsed = time.monotonic() - t0
    assert isinstance(ei.value, TimeoutError)
    assert 0.4 <= elapsed < 2.0
    assert torch.equal(x, torch.arange(5000, dtype=torch.float64))


def test_wait_with_timeout_then_wait_again(ring_pair):
    """A wait that times out leaves the operation running."""
    xs = [np.full(1000, r + 1, np.int32) for r in range(2)]
    h0 = ring_pair[0].all_reduce_async(xs[0], tag=9)
    with pytest.raises(pccl.PcclTimeoutError):
        h0.wait(timeout=0.2)
    assert not h0.done()
    h1 = ring_pair[1].all_reduce_async(xs[1], tag=9)
    assert h0.wait(timeout=20).world_size == 2
    h1.wait(timeout=20)
    assert np.all(xs[0] == 3) and np.all(xs[1] == 3)


def test_rebuild_ring_after_abort(ring_pair, connect_concurrently):
    x = np.ones(10, np.float32)
    h = ring_pair[0].all_reduce_async(x)
    ring_pair[0].abort()
    with pytest.raises(pccl.AbortedError):
        h.wait(timeout=10)
    errs, _ = connect_concurrently(ring_pair, [r.address for r in ring_pair], 10, epoch=1)
    assert errs == [None, None]
    xs = [np.full(10, r + 1.0, np.float32) for r in range(2)]
    reduce_together(ring_pair, xs, timeout=20)
    assert all(np.all(y == 3) for y in xs)


def test_close_wakes_an_operation_in_flight(ring_pair):
    x = np.arange(100_000, dtype=np.float32)
    h = ring_pair[0].all_reduce_async(x)
    timer = threading.Timer(0.3, ring_pair[0].close)
    t0 = time.monotonic()
    timer.start()
    try:
        with pytest.raises(pccl.ClosedError):
            h.wait(timeout=10)
    finally:
        timer.cancel()
        timer.join(5)
    assert time.monotonic() - t0 < 2.0
    assert np.array_equal(x, np.arange(100_000, dtype=np.float32))
    del h  # frees the op after its communicator: must not crash


def test_abort_wakes_connect():
    """A ring whose neighbour never answers: abort() from another thread
    ends connect() long before its timeout."""
    with pccl.StaticRing(0, 2) as ring, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)  # accepts at the kernel level, never handshakes
        timer = threading.Timer(0.3, ring.abort)
        t0 = time.monotonic()
        timer.start()
        try:
            with pytest.raises(pccl.AbortedError):
                ring.connect([ring.address, f"127.0.0.1:{s.getsockname()[1]}"], timeout=20)
        finally:
            timer.cancel()
            timer.join(5)
        assert time.monotonic() - t0 < 3.0


@pytest.mark.timeout(60)
def test_64_connections(connect_concurrently):
    with two_rings(p2p_connections=64) as rings:
        errs, _ = connect_concurrently(rings, [r.address for r in rings], 20)
        assert errs == [None, None]
        xs = [np.full(1_000_003, r + 1, np.int32) for r in range(2)]
        reduce_together(rings, xs, timeout=30)
        assert all(np.all(x == 3) for x in xs)


def test_bind_addresses(connect_concurrently):
    """Connections bound to given local addresses (any 127/8 address is
    loopback on Linux)."""
    with two_rings(p2p_connections=3) as rings:
        addrs = [r.address for r in rings]
        errs = [None, None]

        def run(i):
            try:
                rings[i].connect(addrs, timeout=10, bind_addrs=["127.0.0.1", "127.0.0.2"])
            except BaseException as e:
                errs[i] = e

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert not any(t.is_alive() for t in threads)
        assert errs == [None, None]
        xs = [np.full(1000, r + 1.5, np.float64) for r in range(2)]
        reduce_together(rings, xs, timeout=20)
        assert all(np.all(x == 4.0) for x in xs)


@pytest.mark.parametrize("bind", ["127.0.0.1:99999", "", "127.0.0.1:x", "192.0.2.1"])
def test_bad_bind_address(bind):
    """Malformed, or not an address of this host (192.0.2.0/24 is
    TEST-NET-1: bind() fails, nothing is sent)."""
    with pccl.StaticRing(0, 2) as ring, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        t0 = time.monotonic()
        with pytest.raises(pccl.PcclError) as ei:
            ring.connect(
                [ring.address, f"127.0.0.1:{s.getsockname()[1]}"], timeout=3, bind_addrs=[bind]
            )
        assert time.monotonic() - t0 < 4.0
    if bind.startswith("192."):
        assert isinstance(ei.value, (pccl.AddressError, OSError)), ei.value
    else:
        assert isinstance(ei.value, pccl.AddressError), ei.value
