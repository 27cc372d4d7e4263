"""pccl: fault-tolerant collective communication over TCP.

Public names (see docs/api.md):

* :class:`Communicator` - a peer of a ``pccl-master`` run (dynamic membership).
* :class:`MasterNode` - a ``pccl-master`` running inside this process.
* :class:`StaticRing` - a master-less ring for tests and benchmarks.
* :class:`ReduceOp`, :class:`Quantization`, :class:`ReduceInfo`.
* :class:`SharedState`, :class:`SyncStrategy`, :class:`SyncInfo` - for
  ``Communicator.sync_shared_state`` (docs/shared-state.md).
* :class:`PcclError` and its subclasses (each also a built-in exception).
"""

from ._native import AllReduceHandle, NativeComm, StaticRing, version
from .communicator import Communicator, ReduceHandle
from .errors import (
    AbortedError,
    AddressError,
    AuthenticationError,
    BusyError,
    ClosedError,
    EvictedError,
    InvalidArgumentError,
    MasterConnectionError,
    NotFoundError,
    NotSupportedError,
    OutOfMemoryError,
    PcclConnectionRefusedError,
    PcclError,
    PcclOSError,
    PcclTimeoutError,
    PeerLostError,
    ProtocolError,
    RingBrokenError,
    StateError,
)
from .master import MasterNode
from .shared_state import SharedState, SyncInfo, SyncStrategy
from .types import DType, Quantization, ReduceInfo, ReduceOp

__version__ = "0.1.0"

__all__ = [
    "AbortedError",
    "AddressError",
    "AllReduceHandle",
    "AuthenticationError",
    "BusyError",
    "ClosedError",
    "Communicator",
    "DType",
    "EvictedError",
    "InvalidArgumentError",
    "MasterConnectionError",
    "MasterNode",
    "NativeComm",
    "NotFoundError",
    "NotSupportedError",
    "OutOfMemoryError",
    "PcclConnectionRefusedError",
    "PcclError",
    "PcclOSError",
    "PcclTimeoutError",
    "PeerLostError",
    "ProtocolError",
    "Quantization",
    "ReduceHandle",
    "ReduceInfo",
    "ReduceOp",
    "RingBrokenError",
    "SharedState",
    "StateError",
    "StaticRing",
    "SyncInfo",
    "SyncStrategy",
    "version",
]
