"""The master protocol: framing, schema validation and handshake MACs.

Pure functions shared by ``pccl-master`` and the peer side; docs/protocol.md
is the prose version of this file.  A frame is a 4-byte big-endian length and
that many bytes of msgpack (a map with a ``"type"`` key).  Every message is
checked against :data:`SCHEMAS` before anything else looks at it; whatever
is malformed raises :class:`ProtocolViolation` and never another exception.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import secrets
import struct
from collections.abc import Callable
from typing import Any

import msgpack

PROTOCOL_VERSION = 1
MAX_MESSAGE = 1 << 20  # bytes of msgpack in one frame, the length prefix excluded
HEADER = struct.Struct(">I")
NONCE_LEN = 32
MAC_LEN = 32  # HMAC-SHA256; an empty MAC means "no secret configured"
MAX_INT = 2**63 - 1  # ints on the wire are non-negative and fit an int64
MAX_REASON = 1024  # characters in an error/evicted/abort reason
MAX_PEER_ID = 64
MAX_PEER_NAME = 64  # characters in a peer's self-given name (hello.name)
MAX_ADDRESS = 262  # "[" + 253-character host + "]:" + 5-digit port, rounded up
MAX_RING = 65536  # peer ids in one topology message
MAX_FLOAT = 1e9  # seconds; any timeout above this is nonsense
MAX_NAME = 128  # characters in a peer's name (Communicator(name=...))

# Directions, as passed to validate() and read_message().
TO_MASTER = "peer->master"
TO_PEER = "master->peer"

_HELLO_LABEL = b"pccl-hello\0"
_WELCOME_LABEL = b"pccl-welcome\0"


class ProtocolViolation(ValueError):
    """A frame or message that breaks the protocol; the connection that sent
    it is closed (and only it)."""


class ConnectionClosed(EOFError):
    """The other side closed the connection cleanly, between two frames."""


# --------------------------------------------------------------------------
# Field checkers.  Each takes the value and returns an error string or None.


def _is_int(value: Any) -> bool:
    # bool is an int subclass in Python; on the wire they are distinct types.
    return isinstance(value, int) and not isinstance(value, bool)


def _uint(value: Any) -> str | None:
    if type(value) is int and 0 <= value <= MAX_INT:  # the common case, first
        return None
    if not _is_int(value):
        return f"expected int, got {type(value).__name__}"
    if value < 0 or value > MAX_INT:
        return f"int {value} out of range [0, 2**63)"
    return None


def _opt_uint(value: Any) -> str | None:
    return None if value is None else _uint(value)


def _bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"expected bool, got {type(value).__name__}"


def _seconds(value: Any) -> str | None:
    if not (isinstance(value, float) or _is_int(value)):
        return f"expected float, got {type(value).__name__}"
    if not math.isfinite(value) or value <= 0 or value > MAX_FLOAT:
        return f"duration {value!r} out of range (0, {MAX_FLOAT:g}]"
    return None


def _bin(*lengths: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not isinstance(value, bytes):
            return f"expected bin, got {type(value).__name__}"
        if len(value) not in lengths:
            return f"bin of {len(value)} bytes, expected {' or '.join(map(str, lengths))}"
        return None

    return check


def _str(max_len: int, *, nonempty: bool = False) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not isinstance(value, str):
            return f"expected str, got {type(value).__name__}"
        if len(value) > max_len:
            return f"str of {len(value)} characters exceeds {max_len}"
        if nonempty and not value:
            return "empty str"
        return None

    return check


def parse_hostport(text: str, *, allow_port_zero: bool = False) -> tuple[str, int]:
    """Split ``"host:port"`` or ``"[v6]:port"``; raise ValueError when malformed."""
    if not isinstance(text, str) or len(text) > MAX_ADDRESS:
        raise ValueError(f"address must be a str of at most {MAX_ADDRESS} characters")
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"address {text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"address {text!r}: write IPv6 hosts in brackets, [::1]:PORT")
    if not host or any(c.isspace() or c in "[]/\0" for c in host):
        raise ValueError(f"address {text!r} has an invalid host")
    if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
        raise ValueError(f"address {text!r} has an invalid port")
    port = int(port_text)
    if port > 65535 or (port == 0 and not allow_port_zero):
        raise ValueError(f"address {text!r}: port {port} out of range")
    return host, port


def format_hostport(host: str, port: int) -> str:
    """The inverse of :func:`parse_hostport` (brackets IPv6 hosts)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _address(value: Any) -> str | None:
    try:
        parse_hostport(value)
    except ValueError as exc:
        return str(exc)
    return None


def _opt_address(value: Any) -> str | None:
    return None if value is None else _address(value)


def _peer_id_list(value: Any) -> str | None:
    if not isinstance(value, list):
        return f"expected array, got {type(value).__name__}"
    if len(value) > MAX_RING:
        return f"array of {len(value)} items exceeds {MAX_RING}"
    check = _str(MAX_PEER_ID, nonempty=True)
    for item in value:
        error = check(item)
        if error:
            return "ring item: " + error
    return None


def _version(value: Any) -> str | None:
    # Any int passes here; a version other than ours is refused with an
    # "error" reply by the receiver, not as a malformed message.
    return _uint(value)


_peer_id = _str(MAX_PEER_ID, nonempty=True)
_reason = _str(MAX_REASON)


def _peer_name(value: Any) -> str | None:
    # A label for logs, /status and /metrics: printable, no control characters.
    error = _str(MAX_PEER_NAME, nonempty=True)(value)
    if error:
        return error
    if not value.isprintable():
        return "name has a control character"
    return None

# --------------------------------------------------------------------------
# Shared state (docs/shared-state.md).

MAX_TENSOR_NAME = 256
MAX_DIMS = 32
MAX_TENSORS = 16384  # tensors in one shared state (the 1 MiB frame cap binds first)
MAX_SOURCES = 64  # distributors listed for one tensor
HASH_LEN = 16  # xxh3-128, big-endian
SYNC_STRATEGIES = ("enforce_popular", "receive_only", "send_only")
SYNC_ERRORS = ("", "invalid", "state")

_tensor_name = _str(MAX_TENSOR_NAME, nonempty=True)
_dtype_name = _str(16, nonempty=True)
_hash = _bin(HASH_LEN)


def _one_of(*values: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value not in values or not isinstance(value, str):
            return f"expected one of {', '.join(map(repr, values))}, got {str(value)[:32]!r}"
        return None

    return check


def _list_of_maps(
    max_len: int, fields: dict[str, Callable[[Any], str | None]]
) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not isinstance(value, list):
            return f"expected array, got {type(value).__name__}"
        if len(value) > max_len:
            return f"array of {len(value)} items exceeds {max_len}"
        for i, item in enumerate(value):
            if not isinstance(item, dict) or set(item) != set(fields):
                return f"item {i}: expected a map with exactly {sorted(fields)}"
            for name, field_check in fields.items():
                error = field_check(item[name])
                if error:
                    return f"item {i}.{name}: {error}"
        return None

    return check


def _shape(value: Any) -> str | None:
    if not isinstance(value, list) or len(value) > MAX_DIMS:
        return f"expected an array of at most {MAX_DIMS} ints"
    for dim in value:
        error = _uint(dim)
        if error:
            return error
    return None


def _address_list(value: Any) -> str | None:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_SOURCES:
        return f"expected an array of 1..{MAX_SOURCES} addresses"
    for item in value:
        error = _address(item)
        if error:
            return error
    return None


_tensor_list = _list_of_maps(
    MAX_TENSORS,
    {"name": _tensor_name, "dtype": _dtype_name, "shape": _shape, "nbytes": _uint, "hash": _hash},
)
_fetch_list = _list_of_maps(
    MAX_TENSORS,
    {"name": _tensor_name, "hash": _hash, "nbytes": _uint, "from": _address_list},
)

# --------------------------------------------------------------------------
# Point-to-point (docs/p2p.md): a peer's name in its hello, the run's
# peers in every topology message, and peer_lost when one leaves the run.

_name = _str(MAX_NAME)
_peer_list = _list_of_maps(
    MAX_RING,
    {"peer_id": _peer_id, "num": _uint, "name": _name, "group": _uint, "rank": _uint,
     "address": _address},
)

# --------------------------------------------------------------------------
# The schema table: direction -> type -> field -> checker.  Every field is
# required and no other field is allowed (a version-1 message is exactly
# this; anything else is a different protocol), except the few optional
# fields of OPTIONAL below.

SCHEMAS: dict[str, dict[str, dict[str, Callable[[Any], str | None]]]] = {
    TO_MASTER: {
        "hello": {
            "version": _version,
            "nonce": _bin(NONCE_LEN),
            "mac": _bin(0, MAC_LEN),
            "peer_group": _uint,
            "p2p_address": _address,
            "p2p_connections": _uint,
            "name": _peer_name,  # optional (OPTIONAL below)
        },
        "update_topology": {"req": _uint, "ring_ok": _bool, "admit": _bool},
        "pending_query": {"req": _uint},
        "ring_ready": {"epoch": _uint, "ok": _bool},
        "op_done": {"epoch": _uint, "tag": _uint, "seq": _uint, "ok": _bool},
        "heartbeat": {},
        "leave": {},
        "sync_state": {
            "req": _uint,
            "revision": _uint,
            "strategy": _one_of(*SYNC_STRATEGIES),
            "tensors": _tensor_list,
        },
        "sync_done": {"revision": _uint, "ok": _bool},
    },
    TO_PEER: {
        "challenge": {"version": _version, "nonce": _bin(NONCE_LEN), "auth": _bool},
        "welcome": {
            "peer_id": _peer_id,
            "mac": _bin(0, MAC_LEN),
            "heartbeat_interval": _seconds,
            "heartbeat_timeout": _seconds,
        },
        "error": {"reason": _reason},
        "pending_reply": {"req": _uint, "pending": _bool},
        "topology": {
            "req": _opt_uint,
            "epoch": _uint,
            "changed": _bool,
            "rank": _uint,
            "world_size": _uint,
            "group_world_size": _uint,
            "next": _opt_address,
            "ring": _peer_id_list,
            "run": _uint,  # optional: the run's token (point-to-point handshakes)
            "peers": _peer_list,  # optional: every admitted peer of the run
        },
        "peer_lost": {"peer_id": _peer_id, "reason": _reason},
        "topology_ready": {"epoch": _uint, "ok": _bool},
        "op_outcome": {"epoch": _uint, "tag": _uint, "seq": _uint, "ok": _bool},
        "heartbeat_ack": {},
        "abort": {"epoch": _uint, "reason": _reason},
        "evicted": {"reason": _reason},
        "sync_plan": {
            "req": _uint,
            "revision": _uint,
            "error": _one_of(*SYNC_ERRORS),
            "reason": _reason,
            "fetch": _fetch_list,
            "serve": _bool,
        },
        "sync_end": {"revision": _uint, "ok": _bool},
    },
}


# Fields a message may leave out (added after version 1 without a version
# bump: an older peer or master simply does not send them).
OPTIONAL: dict[str, dict[str, frozenset[str]]] = {
    TO_MASTER: {"hello": frozenset({"name"})},
    TO_PEER: {"topology": frozenset({"run", "peers"})},
}

# --------------------------------------------------------------------------
# Topology optimisation (docs/topology.md): optimize_topology() is a
# collective; the master answers each caller with a sequence of numbered
# messages (``step`` 0, 1, ...): ``probe`` instructions, then one
# ``topology_info``.


def _nonneg_float(value: Any) -> str | None:
    if not (isinstance(value, float) or _is_int(value)):
        return f"expected float, got {type(value).__name__}"
    if not math.isfinite(value) or value < 0:
        return f"value {value!r} must be finite and >= 0"
    return None


_edge_list = _list_of_maps(
    MAX_RING,
    {"from": _peer_id, "to": _peer_id, "bytes_per_s": _nonneg_float, "rtt_s": _nonneg_float,
     "age_s": _nonneg_float, "source": _one_of("probe", "passive", "unreachable")},
)

SCHEMAS[TO_MASTER].update({
    "optimize_topology": {"req": _uint},
    "probe_result": {
        "req": _uint,
        "src": _peer_id,
        "ok": _bool,
        "bytes_per_s": _nonneg_float,
        "rtt_s": _nonneg_float,
        "bytes": _uint,
        "seconds": _nonneg_float,
        "reason": _reason,
    },
})
SCHEMAS[TO_PEER].update({
    "probe": {
        "req": _uint,
        "step": _uint,
        "src": _peer_id,
        "address": _address,
        "seconds": _seconds,
        "connections": _uint,
    },
    "topology_info": {
        "req": _uint,
        "step": _uint,
        "ring": _peer_id_list,
        "feasible": _bool,
        "reason": _reason,
        "bottleneck": _nonneg_float,
        "predicted_bus_bandwidth": _nonneg_float,
        "edges": _edge_list,
        "probes": _uint,
        "probe_seconds": _nonneg_float,
        "install": _bool,
    },
})

# op_done may carry the sender's passive link sample (native link_stats
# deltas since its last report) for the master's per-edge estimates.
SCHEMAS[TO_MASTER]["op_done"].update({"link_bytes": _uint, "link_busy_ns": _uint})
OPTIONAL[TO_MASTER]["op_done"] = frozenset({"link_bytes", "link_busy_ns"})

# SCHEMAS prepared for validate(): per direction and type, the exact key set
# of a well-formed message, its (field, checker) pairs and the fields it may leave out.
_COMPILED = {
    direction: {
        kind: (
            frozenset(schema) | {"type"},
            tuple(schema.items()),
            OPTIONAL.get(direction, {}).get(kind, frozenset()),
        )
        for kind, schema in table.items()
    }
    for direction, table in SCHEMAS.items()
}


def validate(msg: Any, direction: str) -> dict:
    """Return ``msg`` if it is a well-formed message for ``direction``
    (:data:`TO_MASTER` or :data:`TO_PEER`); raise ProtocolViolation otherwise.

    This runs on every message (every collective sends and receives one),
    so the well-formed case is a key-set comparison and one call per field."""
    try:
        table = _COMPILED[direction]
    except (KeyError, TypeError):
        raise ValueError(f"unknown direction {direction!r}") from None
    if not isinstance(msg, dict):
        raise ProtocolViolation(f"message is a {type(msg).__name__}, not a map")
    kind = msg.get("type")
    if not isinstance(kind, str):
        raise ProtocolViolation("message has no str 'type' field")
    compiled = table.get(kind)
    if compiled is None:
        raise ProtocolViolation(f"unknown message type {kind[:64]!r} ({direction})")
    keys, checks, optional = compiled
    if msg.keys() != keys:
        for key in msg:
            if key not in keys:
                raise ProtocolViolation(f"{kind}: unexpected field {str(key)[:64]!r}")
        for field, _ in checks:
            if field not in msg and field not in optional:
                raise ProtocolViolation(f"{kind}: missing field {field!r}")
    for field, check in checks:
        if field not in msg:
            continue  # an optional field left out
        error = check(msg[field])
        if error:
            raise ProtocolViolation(f"{kind}.{field}: {error}")
    return msg


# --------------------------------------------------------------------------
# Framing.


def encode(msg: dict) -> bytes:
    """One frame: length prefix + msgpack.  Raises ValueError for a message
    over :data:`MAX_MESSAGE` (a bug in the sender, not hostile input)."""
    body = msgpack.packb(msg, use_bin_type=True)
    if len(body) > MAX_MESSAGE:
        raise ValueError(f"message of {len(body)} bytes exceeds MAX_MESSAGE")
    return HEADER.pack(len(body)) + body


def decode(body: bytes) -> dict:
    """Unpack one frame body (without the prefix) into a map, or raise
    ProtocolViolation.  The message is not yet validated."""
    try:
        msg = msgpack.unpackb(
            body,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_bin_len=MAX_MESSAGE,
            max_str_len=MAX_MESSAGE,
            max_array_len=MAX_RING,
            max_map_len=64,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolViolation(f"not msgpack: {type(exc).__name__}: {str(exc)[:120]}") from None
    if not isinstance(msg, dict):
        raise ProtocolViolation(f"message is a {type(msg).__name__}, not a map")
    return msg


async def read_message(
    reader: asyncio.StreamReader, timeout: float, direction: str | None = None
) -> dict:
    """Read one frame within ``timeout`` seconds (for the prefix, then again
    for the body).  The length is checked against MAX_MESSAGE before a byte
    of the body is read.  With ``direction`` the message is also validated.

    Raises ConnectionClosed (clean EOF before a frame), TimeoutError, or
    ProtocolViolation (truncated frame, oversize length, bad msgpack or schema).
    """
    try:
        header = await asyncio.wait_for(reader.readexactly(HEADER.size), timeout)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise ConnectionClosed("connection closed") from None
        raise ProtocolViolation(f"truncated frame: {len(exc.partial)} of 4 prefix bytes") from None
    except asyncio.TimeoutError:
        raise TimeoutError(f"no message within {timeout:g} s") from None
    (length,) = HEADER.unpack(header)
    if length > MAX_MESSAGE:
        raise ProtocolViolation(f"frame length {length} exceeds cap {MAX_MESSAGE}")
    if length == 0:
        raise ProtocolViolation("empty frame")
    try:
        body = await asyncio.wait_for(reader.readexactly(length), timeout)
    except asyncio.IncompleteReadError as exc:
        raise ProtocolViolation(
            f"truncated frame: {len(exc.partial)} of {length} body bytes"
        ) from None
    except asyncio.TimeoutError:
        raise ProtocolViolation(
            f"frame body of {length} bytes not received in {timeout:g} s"
        ) from None
    msg = decode(body)
    if direction is not None:
        validate(msg, direction)
    return msg


# --------------------------------------------------------------------------
# Handshake authentication.


def new_nonce() -> bytes:
    """A fresh 32-byte nonce from the OS CSPRNG."""
    return secrets.token_bytes(NONCE_LEN)


def hello_mac(
    secret: bytes | None, nonce_m: bytes, nonce_p: bytes, p2p_address: str, peer_group: int
) -> bytes:
    """The peer's proof: binds both nonces and what the peer claims about
    itself, so neither a replay nor an edited hello verifies.  Empty without
    a secret."""
    if not secret:
        return b""
    data = (
        _HELLO_LABEL
        + nonce_m
        + nonce_p
        + p2p_address.encode("utf-8")
        + b"\0"
        + str(int(peer_group)).encode("ascii")
    )
    return hmac.new(secret, data, hashlib.sha256).digest()


def welcome_mac(secret: bytes | None, nonce_p: bytes, nonce_m: bytes) -> bytes:
    """The master's proof to the peer (mutual authentication).  Empty without
    a secret."""
    if not secret:
        return b""
    return hmac.new(secret, _WELCOME_LABEL + nonce_p + nonce_m, hashlib.sha256).digest()


def macs_equal(a: bytes, b: bytes) -> bool:
    """Constant-time comparison."""
    return hmac.compare_digest(a, b)
