"""Enumerations and result records shared by the whole package.

The numeric values equal the C enums in ``native/include/pccl.h`` (they are
part of the wire format); a test checks they agree with the compiled core.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass


class ReduceOp(enum.IntEnum):
    """How contributions are combined.  AVG sums, then divides once by the
    number of contributors (integers: truncating division)."""

    SUM = 0
    AVG = 1
    MIN = 2
    MAX = 3
    PROD = 4


class Quantization(enum.IntEnum):
    """Wire compression.  UINT8_MINMAX: one byte per element plus (min,
    scale) per slice, for floating dtypes; results stay bit-identical on
    every peer."""

    NONE = 0
    UINT8_MINMAX = 1


class DType(enum.IntEnum):
    """Element types the core reduces."""

    FLOAT32 = 0
    FLOAT64 = 1
    FLOAT16 = 2
    BFLOAT16 = 3
    INT8 = 4
    INT16 = 5
    INT32 = 6
    INT64 = 7
    UINT8 = 8


@dataclass(frozen=True)
class ReduceInfo:
    """What one all-reduce did: peers taking part and bytes moved by this
    peer (payload and frame headers)."""

    world_size: int
    tx_bytes: int
    rx_bytes: int


class ReduceHandle(abc.ABC):
    """An operation in flight, as ``all_reduce_async`` returns it on both
    :class:`pccl.Communicator` and :class:`pccl.StaticRing`.

    ``wait(timeout=None)`` blocks until the operation ends and returns its
    :class:`ReduceInfo` or raises its error; calling it again returns or
    raises the same.  With a ``timeout`` (seconds) that passes first,
    :class:`pccl.PcclTimeoutError` is raised and the operation carries on:
    call ``wait`` again.  The buffers stay in use until ``wait`` returned
    or raised.
    """

    __slots__ = ()

    @abc.abstractmethod
    def wait(self, timeout: float | None = None) -> ReduceInfo:
        """The operation's :class:`ReduceInfo` (see the class doc)."""

    @abc.abstractmethod
    def done(self) -> bool:
        """True once ``wait()`` has returned or raised (not on a timeout)."""
