"""pccl: fault-tolerant collective communication over TCP.

Public names (docs/api.md lists every call with its signature):

* :class:`Communicator` - a peer of a ``pccl-master`` run (dynamic membership).
* :class:`MasterNode` - a ``pccl-master`` running inside this process.
* :class:`StaticRing` - a master-less ring for tests and benchmarks.
* :class:`ReduceOp`, :class:`Quantization`, :class:`ReduceInfo`,
  :class:`ReduceHandle` (what ``all_reduce_async`` returns, on both).
* :class:`SharedState`, :class:`SyncStrategy`, :class:`SyncInfo` - for
  ``Communicator.sync_shared_state`` (docs/shared-state.md).
* :class:`PcclError` and its subclasses (each also a built-in exception).
"""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _distribution_version

from . import _log
from ._native import StaticRing, version
from ._probe import TopologyInfo
from .communicator import Communicator
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
from .types import DType, PeerInfo, Quantization, ReduceHandle, ReduceInfo, ReduceOp

_log.configure_from_env()  # PCCL_LOG=debug|info|warning|error|off

try:
    __version__: str = _distribution_version("pccl")
except _PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AbortedError",
    "AddressError",
    "AuthenticationError",
    "BusyError",
    "ClosedError",
    "Communicator",
    "DType",
    "EvictedError",
    "InvalidArgumentError",
    "MasterConnectionError",
    "MasterNode",
    "NotFoundError",
    "NotSupportedError",
    "OutOfMemoryError",
    "PcclConnectionRefusedError",
    "PcclError",
    "PcclOSError",
    "PcclTimeoutError",
    "PeerInfo",
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
    "TopologyInfo",
    "version",
]
