"""Exceptions raised by pccl.

Every exception derives from :class:`PcclError`; each subclass also derives
from the matching built-in, so ``except TimeoutError`` or
``except ConnectionError`` work as a user expects.  The C result codes map
onto these classes in one table in :mod:`pccl._native`.
"""

from __future__ import annotations


class PcclError(Exception):
    """Base class of every pccl error.  ``code`` is the C result code (0 if
    the error was raised by Python code)."""

    def __init__(self, message: str = "", code: int = 0):
        super().__init__(message)
        self.code = code


class InvalidArgumentError(PcclError, ValueError):
    """A bad argument: dtype, shape, contiguity, device, address, size."""


class NotSupportedError(PcclError, ValueError):
    """A valid but unsupported combination (e.g. quantizing integers)."""


class AddressError(PcclError, ValueError):
    """An address that cannot be parsed or bound."""


class PcclTimeoutError(PcclError, TimeoutError):
    """A deadline passed."""


class PeerLostError(PcclError, ConnectionError):
    """A peer taking part in the operation was lost; survivors all raise it
    for the same operation, with their inputs unchanged."""


class AbortedError(PcclError, ConnectionError):
    """The operation was aborted from another thread."""


class ClosedError(PcclError, ConnectionError):
    """The communicator was closed."""


class RingBrokenError(PcclError, ConnectionError):
    """An earlier failure broke the ring; rebuild it before reducing again."""


class ProtocolError(PcclError, ConnectionError):
    """A peer sent malformed, out-of-range or stale data."""


class AuthenticationError(PcclError, ConnectionError):
    """The other side failed the shared-secret handshake."""


class PcclConnectionRefusedError(PcclError, ConnectionRefusedError):
    """Nobody listens at the address."""


class StateError(PcclError, RuntimeError):
    """The call is not valid in the current state."""


class BusyError(PcclError, RuntimeError):
    """An operation with the same tag is already in flight."""


class NotFoundError(PcclError, LookupError):
    """Nothing is published under the key a shared-state transfer asked for."""


class PcclOSError(PcclError, OSError):
    """An operating-system error inside the native core."""


class OutOfMemoryError(PcclError, MemoryError):
    """The native core could not allocate memory."""


class MasterConnectionError(PcclError, ConnectionError):
    """The master cannot be reached, closed the connection, or was silent
    for longer than the heartbeat timeout."""


class EvictedError(PcclError, ConnectionError):
    """The master removed this peer from the run (it missed a vote or a
    ring report within the vote timeout); ``connect()`` again to rejoin."""


def check_int(value: object, name: str, low: int = 0, high: int | None = None) -> int:
    """``value`` when it is an int (a bool is not) with ``low <= value`` and
    ``value < high`` (no upper bound when None); otherwise
    :class:`InvalidArgumentError` naming ``name`` and the allowed range."""
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= low
        and (high is None or value < high)
    ):
        return int(value)
    if high is None:
        allowed = f">= {low}"
    else:
        bits = high.bit_length() - 1
        upper = f"2**{bits}" if high == 1 << bits and bits > 16 else str(high)
        allowed = f"in [{low}, {upper})"
    raise InvalidArgumentError(f"{name} must be an int {allowed}, got {value!r}")
